"""Every setting of a training run, with its defaults and the checks that refuse settings
that cannot train; saved in the run so it can be reproduced."""

from __future__ import annotations

from dataclasses import dataclass, replace

from instructlm.data.encode import MAX_LENGTH
from instructlm.errors import InstructlmError
from instructlm.model.adapters import LoraSettings
from instructlm.model.base import EMBEDDED
from instructlm.model.devices import PRECISIONS
from instructlm.model.loss import AVERAGES, DEFAULT_AVERAGE
from instructlm.training.budget import DEFAULT_SCHEDULE, MIN_STEPS, SCHEDULES
from instructlm.training.layer_decay import LAYER_DECAY
from instructlm.training.preference import DEFAULT_BETA, DEFAULT_NLL_WEIGHT, METHODS

FULL_LR = 1e-4  # 2e-4 won on the tuning half, lost on the check half: docs/experiments.md
LORA_LR = 2e-3  # adapters start at zero and are few: they need larger steps
# DPO moves a tuned model away from its own answers: far smaller steps than teaching
# (TRL's default is 1e-6 for large models). ORPO teaches from a base, as supervised
# training does, and takes its rates.
DPO_LR = 2e-5
DPO_LORA_LR = 2e-4
DPO_EPOCHS = 3  # TRL's default too


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of a run; saved in the run so it can be reproduced."""

    base: str = EMBEDDED
    template: str = "auto"  # auto: seed-en; chat for LoRA and for examples with earlier turns
    epochs: int | None = None  # None: chosen from the file's size (budget.py)
    min_steps: int = MIN_STEPS  # with epochs None: train at least this many steps
    schedule: str = DEFAULT_SCHEDULE  # of the learning rate after warm-up: budget.SCHEDULES
    lr: float | None = None  # None: FULL_LR, or LORA_LR with lora (DPO: DPO_LR, DPO_LORA_LR)
    layer_decay: float = LAYER_DECAY  # each layer's rate as a multiple of the one above
    batch_size: int = 8
    max_length: int = MAX_LENGTH
    seed: int = 42
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto: a CUDA GPU if there is one, else the CPU
    trust_remote_code: bool = False
    end_token: bool = True  # False: the tutorial's way, the model never learns to stop
    # True: the instruction is learned too, not only the response (encode.py); supervised
    # runs only. Off: on the suite it made no more answers right (docs/experiments.md).
    prompt_loss: bool = False
    loss_average: str = DEFAULT_AVERAGE  # how a batch's loss averages its tokens: loss.AVERAGES
    lora: bool = False  # train LoRA adapters on frozen base weights instead of every weight
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "auto"  # module names separated by commas; auto: per architecture
    save_every: int = 0  # steps between checkpoints (0: none); see checkpoints.py
    method: str = "sft"  # sft: supervised; dpo or orpo: from preference pairs (preference.py)
    beta: float = DEFAULT_BETA  # DPO's beta, ORPO's lambda
    nll_weight: float = DEFAULT_NLL_WEIGHT  # DPO: the chosen answers' cross-entropy added

    def resolved(self) -> "TrainSettings":
        """These settings with the defaults that depend on others filled in."""
        if self.method == "dpo":
            return replace(self, lr=self.lr or (DPO_LORA_LR if self.lora else DPO_LR))
        return replace(self, lr=self.lr or (LORA_LR if self.lora else FULL_LR))

    @property
    def preference(self) -> bool:
        return self.method != "sft"

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout,
                            self.lora_targets)

    def check(self) -> None:
        """Refuse settings that cannot train, before anything is loaded."""
        problems = [f"--{name.replace('_', '-')} must be {rule}" for name, ok, rule in (
            ("epochs", self.epochs is None or self.epochs >= 1, "at least 1"),
            ("min_steps", self.min_steps >= 1, "at least 1"),
            ("schedule", self.schedule in SCHEDULES, " or ".join(SCHEDULES)),
            ("lr", self.lr is None or self.lr > 0, "above 0"),
            ("layer_decay", 0 < self.layer_decay <= 1, "in (0, 1]"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("max_length", self.max_length >= 2, "at least 2"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("precision", self.precision in PRECISIONS, " or ".join(PRECISIONS)),
            ("loss_average", self.loss_average in AVERAGES, " or ".join(AVERAGES)),
            ("lora_rank", self.lora_rank >= 1, "at least 1"),
            ("lora_alpha", self.lora_alpha > 0, "above 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("save_every", self.save_every >= 0, "0 or more"),
            ("method", self.method in METHODS, " or ".join(METHODS)),
            ("beta", self.beta > 0, "above 0"),
            ("nll_weight", self.nll_weight >= 0, "0 or more"),
            # A pair's two answers share their prompt: there is nothing in it to prefer.
            ("prompt_loss", not (self.prompt_loss and self.preference),
             "off for --method dpo and orpo"),
            # A preference loss is a mean over pairs; it has no tokens to average.
            ("loss_average", self.loss_average == "token" or not self.preference,
             "token for --method dpo and orpo"),
        ) if not ok]
        if problems:
            raise InstructlmError("; ".join(problems))

"""LoRA adapters (PEFT): train small low-rank matrices beside frozen base weights.

A LoRA run stores only its adapter (adapter_model.safetensors and adapter_config.json, a few
MB) and names its base model in instructlm.json. Loading the run puts the adapter on the base
and merges it into the weights, so answers cost what a full model's do; `merge` writes that
merged model out as a standalone run.
"""

from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from instructlm.errors import InstructlmError
from instructlm.model.architectures import architecture
from instructlm.model.base import ADAPTER_CONFIG, load_model, load_tokenizer, resolve_base
from instructlm.runs import (
    DATA_FILE,
    LOSS_FILE,
    RUN_FILE,
    is_run,
    read_run_info,
    staged_run,
    write_json,
)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: str = "auto"  # auto, or module names separated by commas


def target_modules(model: Any, targets: str) -> list[str] | str:
    if targets != "auto":
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(architecture(model).lora_targets) or "all-linear"


def add_lora(model: Any, settings: LoraSettings) -> Any:
    """The model wrapped with fresh adapters; only the adapters will train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, task_type="CAUSAL_LM",
                        target_modules=target_modules(model, settings.targets),
                        fan_in_fan_out=architecture(model).conv1d)
    try:
        with _quiet():
            return get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module the model does not have
        raise InstructlmError(f"cannot add LoRA adapters: {err}",
                              hint="check --lora-targets against the model's layer names"
                              ) from None


def adapter_summary(peft_model: Any) -> dict[str, Any]:
    """What the run records about its adapter."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    config = peft_model.peft_config["default"]
    return {"rank": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": sorted(config.target_modules) if not isinstance(
                config.target_modules, str) else config.target_modules,
            "trainable_parameters": trainable, "total_parameters": total}


def is_adapter_run(run: str | Path) -> bool:
    return (Path(run) / ADAPTER_CONFIG).is_file()


def load_merged(run: str | Path, base_spec: str, trust_remote_code: bool = False) -> Any:
    """A LoRA run's base model with the run's adapter merged into its weights."""
    from peft import PeftModel

    try:
        source = resolve_base(base_spec)
    except InstructlmError as err:
        raise InstructlmError(f"{run} holds only a LoRA adapter, and its base model "
                              f"{base_spec!r} cannot be found: {err.message}",
                              hint="put the base model back, or train without --lora"
                              ) from None
    base = load_weights(source, trust_remote_code)
    with _quiet():
        return PeftModel.from_pretrained(base, str(run)).merge_and_unload()


def load_weights(source: str, trust_remote_code: bool = False, dtype: Any = None) -> Any:
    """A model folder or hub id as `base.load_model` loads it; a LoRA run as its base with
    the run's adapter merged (a run trained from a LoRA run, in turn, from its own)."""
    if not is_adapter_run(source):
        return load_model(source, trust_remote_code, dtype)
    model = load_merged(source, read_run_info(source)["base"]["spec"], trust_remote_code)
    model.requires_grad_(True)  # PEFT loads an adapter to answer: every weight frozen
    return model.to(dtype) if dtype is not None else model


@contextmanager
def _quiet() -> Iterator[None]:
    """PEFT calls transformers APIs that transformers has deprecated; the warnings say
    nothing to a user of instructlm."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def merge(run: str | Path, output: str | Path | None = None, force: bool = False) -> Path:
    """Write a LoRA run's merged model as a standalone run (default: RUN-merged)."""
    run = Path(run)
    if not is_run(run):
        raise InstructlmError(f"{run} is not a trained run")
    if not is_adapter_run(run):
        raise InstructlmError(f"{run} is a full model already: there is nothing to merge",
                              hint="merge is for runs trained with --lora")
    info = read_run_info(run)
    output = Path(output) if output else run.with_name(f"{run.name}-merged")
    model = load_merged(run, info["base"]["spec"], info["settings"].get("trust_remote_code",
                                                                         False))
    with staged_run(output, force) as staging:
        model.save_pretrained(staging)
        load_tokenizer(str(run)).save_pretrained(staging)
        for name in (DATA_FILE, LOSS_FILE, "README.md"):
            if (run / name).exists():
                shutil.copy2(run / name, staging / name)
        write_json(staging / RUN_FILE,
                   {**info, "name": output.name, "merged_from": str(run)})
    return output

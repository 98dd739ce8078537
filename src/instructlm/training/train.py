"""`instructlm train`: instruction file -> tuned model in a run directory, in three steps.

`_prepare` (tokenizer, encoded examples, the budget, device and precision, the model),
`fit` (the loop, in fit.py), `_save` (the held-out answers, the run written into place).
`resume` goes on from a checkpoint through the same steps.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from instructlm import __version__
from instructlm.answering.answerer import Answerer
from instructlm.data.encode import EncodedExample, EncodedPair, encode_examples, encode_pairs
from instructlm.data.formats import Example, InstructionSet, read_instruction_file
from instructlm.data.templates import Template, template_to_teach, unshown_turns
from instructlm.errors import InstructlmError, Report
from instructlm.measuring.evaluate import EvalResult, EvalSet, evaluate
from instructlm.measuring.scores import describe_summary
from instructlm.model.adapters import adapter_summary, add_lora, load_weights
from instructlm.model.base import EMBEDDED, EMBEDDED_NAME, load_tokenizer, resolve_base
from instructlm.model.devices import pick_device, resolve_precision
from instructlm.runs import (
    DATA_FILE,
    LOSS_FILE,
    RUN_FILE,
    check_free_space,
    check_output,
    output_lock,
    run_template,
    staged_run,
    write_examples,
    write_json,
    write_losses,
)
from instructlm.training import checkpoints
from instructlm.training.budget import Budget, choose_budget
from instructlm.training.distributed import (
    broadcast_object_list,
    fsdp_plugin,
    gather_objects,
    launched,
    main_process,
    make_accelerator,
)
from instructlm.training.fit import Trainee, fit
from instructlm.training.model_card import model_card
from instructlm.training.optimize import TrainStep
from instructlm.training.preference import PreferenceObjective, with_references
from instructlm.training.settings import DPO_EPOCHS, TrainSettings


def default_output(file: str | Path) -> Path:
    return Path("runs") / Path(file).stem


def train(file: str | Path, output: str | Path | None = None,
          settings: TrainSettings = TrainSettings(), force: bool = False,
          report: Report = print, progress: bool = True) -> Path:
    """Train on an instruction file and save a run; return the run directory."""
    settings.check()
    output = Path(output) if output else default_output(file)
    data = read_instruction_file(file, preferences=settings.preference)
    with _one_training(output):
        folder = checkpoints.checkpoint_dir(output)
        checkpoints.tidy(folder)
        if folder.exists():
            if not force:
                raise InstructlmError(f"{folder} holds the checkpoint of an interrupted run",
                                      hint=f"continue it with `instructlm train --resume "
                                           f"{output}`, or pass --force to start over")
            checkpoints.remove(folder)
        return _train(data, output, settings.resolved(), force, report, progress)


def resume(output: str | Path, report: Report = print, progress: bool = True) -> Path:
    """Continue an interrupted run from its last checkpoint, with its own file and settings."""
    output = Path(output)
    with _one_training(output):
        folder = checkpoints.checkpoint_dir(output)
        checkpoints.tidy(folder)
        about = checkpoints.read_about(folder)
        data = read_instruction_file(about["file"],
                                     preferences=about["settings"].get("method", "sft") != "sft")
        if data.sha256 != about["sha256"]:
            raise InstructlmError(f"{about['file']} has changed since the interrupted run "
                                  "began", hint="resuming needs the same examples; train "
                                                "afresh with --force to use the new file")
        if main_process():
            report(f"Resuming {output} from its checkpoint after step {about['done']}")
        # A checkpoint from before the schedule could be chosen was trained with "linear".
        settings = TrainSettings(**{"schedule": "linear", **about["settings"]})
        return _train(data, output, settings, about["force"], report, progress,
                      checkpoints.load(folder))


@contextmanager
def _one_training(output: Path) -> Iterator[None]:
    """The output held by this training (its main process) until it ends."""
    if not main_process():
        yield
        return
    with output_lock(output):
        yield


@dataclass
class Prepared:
    """A training ready to start: the trainee, and what the saved run will need."""

    trainee: Trainee
    settings: TrainSettings  # with the epochs the budget chose
    budget: Budget
    source: str
    tokenizer: Any
    template: Template
    adapted: Any  # the LoRA-wrapped model, or None
    lora: dict[str, Any] | None  # what the run records of its adapter


def _train(data: InstructionSet, output: Path, settings: TrainSettings, force: bool,
           report: Report, progress: bool,
           resumed: checkpoints.Checkpoint | None = None) -> Path:
    check_output(output, force)  # refuse now, not after minutes of training
    accelerator = make_accelerator() if launched() else None
    if accelerator and not accelerator.is_main_process:  # one voice: the main process
        report, progress = (lambda message: None), False
    run = _prepare(data, output, settings, accelerator, report)
    started = time.perf_counter()
    saving = _checkpointing(run, output, data, force) if run.settings.save_every else None
    losses, step = fit(run.trainee, run.settings, report, progress, saving, resumed)
    seconds = time.perf_counter() - started
    model, adapted = run.trainee.model, run.adapted
    if run.trainee.fsdp:  # the sharded weights, whole again in a model of the main process
        weights = step.full_weights()
        if run.trainee.main:
            model, adapted = unsharded(weights, run.source, run.settings,
                                       run.trainee.device, run.trainee.precision)
    if run.trainee.main:
        _save(run, model, adapted, data, output, force, losses, seconds, report)
    return output


def _prepare(data: InstructionSet, output: Path, settings: TrainSettings, accelerator: Any,
             report: Report) -> Prepared:
    """Tokenizer, encoded examples, budget, device, precision and the model to train."""
    fsdp = fsdp_plugin(accelerator) if accelerator else None
    for warning in data.warnings:
        report(f"warning: {warning}")
    source, tokenizer, template = load_tokenizer_and_template(settings, data, report)
    train_set = encode_reporting(data.train, template, tokenizer, settings, report)
    # The eval loss is the responses' alone, comparable whatever was learned.
    eval_set = encode_reporting(data.eval, template, tokenizer, settings, report,
                                held_out=True)
    if not train_set:
        raise InstructlmError(f"{data.path}: no training example fits --max-length "
                              f"{settings.max_length}", hint="raise --max-length")
    budget = _budget(settings, len(train_set))
    settings = replace(settings, epochs=budget.epochs)  # saved so: a resumed run keeps it
    device = _device_name(accelerator.device) if accelerator else pick_device(settings.device)
    precision = _precision(settings.precision, device, accelerator, fsdp)
    model = load_for_training(source, settings, device, precision)
    adapted = add_lora(model, settings.lora_settings()) if settings.lora else None
    lora = adapter_summary(adapted) if adapted else None
    objective = None
    if settings.preference:
        objective = PreferenceObjective(settings.method, settings.beta,
                                        settings.nll_weight if settings.method == "dpo" else 0)
        if settings.method == "dpo":  # the reference: the model before training, once
            train_set, eval_set = (
                with_references(model, pairs, settings.batch_size, tokenizer.pad_token_id,
                                device, precision, adapted) for pairs in (train_set, eval_set))
    trainee = Trainee(model, train_set, eval_set, tokenizer.pad_token_id, device, precision,
                      accelerator, fsdp, objective)
    if trainee.main:
        _check_disk(output, adapted or model, settings.save_every > 0)
    processes = ""
    if accelerator:
        n = accelerator.num_processes
        processes = f" in {n} process{'es' if n > 1 else ''}" + (" (FSDP)" if fsdp else "")
    what = _describe_lora(lora) if lora else ""
    kind = "preference pairs" if settings.preference else "examples"
    report(f"Training {_base_name(settings.base)}{what} on {len(train_set)} {kind} "
           f"({len(eval_set)} for evaluation), template {template.name}, {precision} on "
           f"{device}{processes}")
    taught = "; the instructions learned too" if settings.prompt_loss else ""
    if not settings.preference:
        taught += ("; each example's loss weighs the same" if settings.loss_average == "example"
                   else "; the loss averaged over all answer tokens")
    layers = (f" at the top layer, {settings.layer_decay:g}x a layer below"
              if settings.layer_decay != 1 else "")
    report(f"Budget: {budget.why}; learning rate {settings.lr:g}{layers}, "
           f"{settings.schedule} schedule{taught}")
    if settings.preference:
        report(_describe_preference(settings, adapted is not None))
    return Prepared(trainee, settings, budget, source, tokenizer, template, adapted, lora)


def _budget(settings: TrainSettings, n_train: int) -> Budget:
    """How long to train on `n_train` examples (or pairs)."""
    if settings.method == "dpo" and settings.epochs is None:
        # DPO nudges a run that answers in form already: the minimum of steps that
        # teaching needs over-fitted the pairs (docs/experiments.md)
        steps = math.ceil(n_train / settings.batch_size) * DPO_EPOCHS
        return Budget(DPO_EPOCHS, steps, f"{DPO_EPOCHS} epochs, {steps} steps, as DPO takes "
                                         "by default")
    return choose_budget(n_train, settings.batch_size, settings.epochs, settings.min_steps,
                         "pairs" if settings.preference else "examples")


def _describe_preference(settings: TrainSettings, lora: bool) -> str:
    if settings.method == "orpo":
        return f"Preference: ORPO, lambda {settings.beta:g}; no reference"
    return (f"Preference: DPO, beta {settings.beta:g}; the reference: the starting model"
            f"{' with its adapters off' if lora else ''}, computed once; the chosen answers' "
            f"cross-entropy added with weight {settings.nll_weight:g}")


def _precision(asked: str, device: str, accelerator: Any, fsdp: Any) -> str:
    """The precision every process trains in: the main process's choice."""
    precision = resolve_precision(asked, device)
    if accelerator:
        precision = broadcast_object_list([precision], from_process=0)[0]
    if fsdp and precision == "fp16":  # (FSDP's loss scaling would need every shard's check)
        if asked != "fp16":  # auto, on a GPU without bf16
            return "fp32"
        raise InstructlmError("FSDP trains in bf16 or fp32, not fp16",
                              hint="pass --precision fp32, or launch with DDP "
                                   "(distributed_type MULTI_GPU) for fp16")
    return precision


def _checkpointing(run: Prepared, output: Path, data: InstructionSet,
                   force: bool) -> Callable[[int, list[dict[str, Any]], TrainStep], None]:
    """What `fit` calls every `save_every` steps: a checkpoint beside the run."""
    folder = checkpoints.checkpoint_dir(output)
    about = {"file": str(Path(data.path).resolve()), "sha256": data.sha256,
             "settings": asdict(run.settings), "force": force}
    main = run.trainee.main

    def save_checkpoint(done: int, records: list[dict[str, Any]], step: TrainStep) -> None:
        # Every process's generators (each draws its own dropout masks); with FSDP every
        # process also helps gather the training state.
        rngs = gather_objects([checkpoints.rng_state()]) if run.trainee.accelerator \
            else [checkpoints.rng_state()]
        state = step.state_dict() if main or step.fsdp else None
        if main:
            checkpoints.save(folder, done, records, state, about, rngs)

    return save_checkpoint


def _save(run: Prepared, model: Any, adapted: Any, data: InstructionSet, output: Path,
          force: bool, losses: list[dict[str, Any]], seconds: float, report: Report) -> None:
    """Answer the held-out part, and write the run into place with its scores."""
    tokenizer = run.tokenizer
    with staged_run(output, force) as staging:
        closing = closing_answers(Answerer(model, tokenizer, run.template, output.name), data)
        info = _run_info(output, run, data, losses, seconds)
        info["metrics"]["answer_scores"] = closing.summary
        info["metrics"]["closing_answers"] = closing.rows
        if adapted is not None:  # the adapter alone; the run names its base
            info["lora"] = run.lora
            adapted.save_pretrained(staging)
        else:
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_losses(staging / LOSS_FILE, losses)
        write_examples(staging / DATA_FILE, data)
        (staging / "README.md").write_text(model_card(info, closing.rows), encoding="utf-8")
        write_json(staging / RUN_FILE, info)  # written last: the run is complete
    checkpoints.remove(checkpoints.checkpoint_dir(output))
    report(f"Saved the run to {output} ({seconds:.0f} s of training)")
    report(format_answers(closing.rows))
    which = "Held-out" if data.eval else "Training"
    report(f"{which} answers: {describe_summary(closing.summary)}")


def load_tokenizer_and_template(settings: TrainSettings, data: InstructionSet,
                                report: Report) -> tuple[str, Any, Template]:
    """The base model's source, its tokenizer, and the template the examples are shown in."""
    source = resolve_base(settings.base)
    tokenizer = load_tokenizer(source, settings.trust_remote_code)
    template = template_to_teach(settings.template, tokenizer, data.train, settings.lora,
                                 run_template(source))
    for warning in unshown_turns(template, data.train):
        report(f"warning: {warning}")
    return source, tokenizer, template


def encode_reporting(examples: list[Example], template: Template, tokenizer: Any,
                     settings: TrainSettings, report: Report, held_out: bool = False
                     ) -> list[EncodedExample] | list[EncodedPair]:
    """Encoded examples (preference pairs, for a preference method); the ones that do not
    fit are dropped with a warning. Held-out ones teach their responses alone."""
    if settings.preference:
        encoded, warnings = encode_pairs(examples, template, tokenizer, settings.max_length,
                                         settings.end_token)
    else:
        encoded, warnings = encode_examples(examples, template, tokenizer,
                                            settings.max_length, settings.end_token,
                                            settings.prompt_loss and not held_out)
    for warning in warnings:
        report(f"warning: {warning}")
    return encoded


def load_for_training(source: str, settings: TrainSettings, device: str,
                      precision: str) -> Any:
    """The base model on `device`, ready to train in `precision`.

    With LoRA in bf16 the frozen base weights are loaded in bf16, at half the memory: only
    the adapters need fp32 master weights.
    """
    import torch

    torch.manual_seed(settings.seed)  # the same start in every process
    dtype = torch.bfloat16 if settings.lora and precision == "bf16" else torch.float32
    return load_weights(source, settings.trust_remote_code, dtype).to(device)


def unsharded(weights: dict[str, Any], source: str, settings: TrainSettings, device: str,
              precision: str) -> tuple[Any, Any]:
    """(model, LoRA-wrapped model or None) holding the trained `weights` gathered by FSDP."""
    model = load_for_training(source, settings, device, precision)
    adapted = add_lora(model, settings.lora_settings()) if settings.lora else None
    model.load_state_dict(weights)
    return model, adapted


def _check_disk(output: Path, model: Any, checkpoints_too: bool) -> None:
    """Refuse now, not after the training, when the disk cannot hold what will be saved:
    the trained weights in fp32, and with checkpoints two of them (the last one stays until
    the next is whole) with AdamW's two moments."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    needed = trained + (2 * 3 * trained if checkpoints_too else 0)
    check_free_space(output.parent, int(needed * 1.05) + 50_000_000, f"the run {output}")


def _device_name(device: Any) -> str:
    return "cpu" if device.type == "cpu" else str(device)  # all CPU processes share one


def _describe_lora(summary: dict[str, Any]) -> str:
    share = summary["trainable_parameters"] / summary["total_parameters"]
    return (f" with LoRA adapters (rank {summary['rank']}, "
            f"{summary['trainable_parameters'] / 1e6:.1f}M trainable parameters, "
            f"{share:.1%})")


def closing_answers(answerer: Answerer, data: InstructionSet, n_train: int = 3) -> EvalResult:
    """Scored answers to the eval part (or a few training examples): did the model learn?"""
    examples = data.eval or data.train[:n_train]
    return evaluate(answerer, EvalSet(data.path, examples, data.train + data.eval,
                                      taught=data.train), with_loss=False)


def format_answers(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        marks = [text for bad, text in ((not row["format"], "other format"),
                                        (row.get("copied"), "a taught answer"),
                                        (not row["stopped"], "did not stop")) if bad]
        lines += [f"> {row['instruction']}", f"  expected: {row['expected']}",
                  f"  answer:   {row['answer']}" + (f"  [{', '.join(marks)}]" if marks else "")]
    return "\n".join(lines)


def _base_name(spec: str) -> str:
    return EMBEDDED_NAME if spec in ("", EMBEDDED) else spec


def _run_info(output: Path, run: Prepared, data: InstructionSet, losses: list[dict[str, Any]],
              seconds: float) -> dict[str, Any]:
    settings, train_set, eval_set = run.settings, run.trainee.train_set, run.trainee.eval_set
    train_losses = [r["loss"] for r in losses if "loss" in r]
    budget = run.budget
    return {
        "name": output.name,
        "instructlm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {"spec": settings.base, "name": _base_name(settings.base),
                 "source": run.source},
        "template": run.template.to_dict(),
        "settings": {**asdict(settings), "precision_used": run.trainee.precision},
        "budget": {"epochs": budget.epochs, "steps": budget.steps, "why": budget.why},
        "data": {"file": data.path, "format": data.format, "sha256": data.sha256,
                 "n_train": len(train_set), "n_eval": len(eval_set),
                 "n_dropped": len(data.train) + len(data.eval) - len(train_set) - len(eval_set)},
        "metrics": {
            "steps": len(train_losses),
            "final_train_loss": train_losses[-1] if train_losses else None,
            "eval_loss": [r["eval_loss"] for r in losses if "eval_loss" in r],
            "train_seconds": round(seconds, 3),
            "train_tokens": sum(r.get("tokens", 0) for r in losses),
            "train_padded_tokens": sum(r.get("padded_tokens", 0) for r in losses),
            # preference tuning: the held-out pairs after each epoch
            "rewards": [{k: r[k] for k in ("epoch", "reward_accuracy", "reward_margin")}
                        for r in losses if "reward_accuracy" in r],
        },
    }

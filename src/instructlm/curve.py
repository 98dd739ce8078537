"""How many instructions are enough? Train on growing subsets, score each on the same held-out
part, and plot the scores against the number of training examples.

Subsets are nested (the 8 include the 4) and drawn evenly from the instruction families, so a
small subset sees as many kinds of instruction as it can rather than many of one kind.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import replace
from pathlib import Path

from instructlm.answering.answerer import Answerer, DecodeSettings
from instructlm.data.formats import EVAL_MARKER, Example, read_instruction_file
from instructlm.errors import InstructlmError, Report
from instructlm.measuring.evaluate import EvalResult, EvalSet, evaluate
from instructlm.measuring.scores import describe_summary
from instructlm.model.devices import pick_device, resolve_precision
from instructlm.training.budget import choose_budget
from instructlm.training.fit import Trainee, fit
from instructlm.training.train import (
    TrainSettings,
    encode_reporting,
    load_for_training,
    load_tokenizer_and_template,
)


def family(example: Example, words: int = 2) -> str:
    """The instruction's first words: 'Tell me a spell about…' and 'Tell me a spell…' group."""
    return " ".join(re.findall(r"\w+", example.instruction.lower())[:words])


def spread_order(examples: list[Example], seed: int) -> list[Example]:
    """All examples, reordered so every prefix is spread evenly over the families.

    Each family is shuffled (fixed seed); then one example is taken from each family in turn,
    largest family first.
    """
    families: dict[str, list[Example]] = {}
    for ex in examples:
        families.setdefault(family(ex), []).append(ex)
    rng = random.Random(seed)
    for members in families.values():
        rng.shuffle(members)
    queues = sorted(families.values(), key=len, reverse=True)  # stable: ties keep file order
    ordered = []
    for i in range(max(len(q) for q in queues)):
        ordered += [q[i] for q in queues if i < len(q)]
    return ordered


def parse_sizes(text: str | None, n_train: int) -> list[int]:
    """'4,8,16,all' -> [4, 8, 16, n_train]. Default: 0 (untuned), 4, 8, 16, ... and all."""
    if not text:
        sizes, n = [0], 4
        while n < n_train:
            sizes.append(n)
            n *= 2
        return sizes + [n_train]
    sizes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            sizes.append(n_train)
        elif part.isdigit() and int(part) <= n_train:
            sizes.append(int(part))
        else:
            raise InstructlmError(f"--sizes: {part!r} is not a number from 0 to {n_train} "
                                  "(the training examples in the file) or 'all'",
                                  hint="e.g. --sizes 4,8,16,all; 0 is the untuned model")
    if not sizes:
        raise InstructlmError("--sizes names no size", hint="e.g. --sizes 4,8,16,all")
    return sorted(set(sizes))


def learning_curve(file: str | Path, sizes: str | None = None,
                   settings: TrainSettings = TrainSettings(),
                   decode: DecodeSettings = DecodeSettings(), report: Report = print,
                   progress: bool = True) -> list[EvalResult]:
    """One scored evaluation per training size; each result's `extra` holds `n_train`."""
    import torch

    settings.check()
    if settings.lora or settings.save_every:
        raise InstructlmError("curve trains every size afresh in full; --lora and "
                              "--save-every are for train")
    settings = settings.resolved()
    data = read_instruction_file(file)
    if not data.eval:
        raise InstructlmError(f"{file} has no held-out examples to measure the curve on",
                              hint=f"start the held-out part with a '# {EVAL_MARKER}' comment "
                                   "line (in JSONL: \"split\": \"eval\")")
    counts = parse_sizes(sizes, len(data.train))
    source, tokenizer, template = load_tokenizer_and_template(settings, data, report)
    device = pick_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    model = load_for_training(source, settings, device, precision)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ordered = spread_order(data.train, settings.seed)
    eval_set = EvalSet(f"{file} (its eval part)", data.eval, data.train + data.eval)
    results = []
    for n in counts:
        model.load_state_dict(initial)  # every size starts from the same base model
        torch.manual_seed(settings.seed)
        started = time.perf_counter()
        if n:
            subset = encode_reporting(ordered[:n], template, tokenizer, settings, report)
            # Each size gets the budget `train` would give a file of that size.
            budget = choose_budget(len(subset), settings.batch_size, settings.epochs,
                                   settings.min_steps)
            fit(Trainee(model, subset, [], tokenizer.pad_token_id, device, precision),
                replace(settings, epochs=budget.epochs), report, progress)
        seconds = time.perf_counter() - started
        label = f"{n} examples" if n else "untuned (0)"
        result = evaluate(Answerer(model, tokenizer, template, label),
                          replace(eval_set, taught=ordered[:n] if n else None), decode)
        result.extra = {"n_train": n, "train_seconds": round(seconds, 1),
                        "epochs": budget.epochs if n else 0}
        report(f"{label}: {describe_summary(result.summary)} ({seconds:.0f} s training)")
        results.append(result)
    return results

"""`instructlm inspect`: what a file holds, how long its examples are in tokens, and every
warning `train` would give about it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from instructlm.data.encode import MAX_LENGTH, encode_examples, encode_pairs
from instructlm.data.formats import InstructionSet, read_instruction_file
from instructlm.data.templates import Template, unshown_turns

TOKEN_COUNT_MAX_LENGTH = 1_000_000  # count everything; truncation is train's business


def inspect_file(file: str | Path, base: str | None = None, template: str | None = None,
                 tokens: bool = True, preferences: bool = False,
                 max_length: int = MAX_LENGTH) -> dict[str, Any]:
    """A JSON-ready report: parsed examples (with `preferences`, pairs: a `rejected`
    answer beside the chosen `response`), token length statistics, warnings (with
    `tokens`, also those of encoding at `max_length`, as `train` gives them)."""
    data = read_instruction_file(file, preferences=preferences)
    report: dict[str, Any] = {
        "file": data.path, "format": data.format, "sha256": data.sha256,
        "train": [ex.to_dict() for ex in data.train],
        "eval": [ex.to_dict() for ex in data.eval],
        "warnings": list(data.warnings),
    }
    if not tokens:
        return report
    from instructlm.data.templates import template_to_teach
    from instructlm.model.base import load_tokenizer, resolve_base
    from instructlm.runs import run_template

    source = resolve_base(base)
    tokenizer = load_tokenizer(source)
    chosen = template_to_teach(template or "auto", tokenizer, data.train,
                               base_template=run_template(source))
    encode = encode_pairs if data.pairs else encode_examples
    _, warnings = encode(data.train + data.eval, chosen, tokenizer, max_length)
    report["warnings"] += [*unshown_turns(chosen, data.train), *warnings]
    report["template"] = chosen.name
    report["token_stats"] = _token_stats(data, chosen, tokenizer)
    return report


def _token_stats(data: InstructionSet, template: Template, tokenizer: Any) -> dict[str, Any]:
    """Tokens an example, prompt and response, for each split: min, mean, max, total."""
    stats: dict[str, Any] = {}
    for split, examples in (("train", data.train), ("eval", data.eval)):
        encoded, _ = encode_examples(examples, template, tokenizer, TOKEN_COUNT_MAX_LENGTH)
        lengths = [len(e.input_ids) for e in encoded]
        if data.pairs:  # a pair is as long as its longer answer
            other, _ = encode_examples([replace(ex, response=ex.rejected or ex.response)
                                        for ex in examples], template, tokenizer,
                                       TOKEN_COUNT_MAX_LENGTH)
            lengths = [max(a, len(b.input_ids)) for a, b in zip(lengths, other, strict=True)]
        stats[split] = lengths and {
            "min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths), "total": sum(lengths)}
    return stats

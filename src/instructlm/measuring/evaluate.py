"""Evaluation: answer held-out instructions, score each answer, compare models and decodings.

    examples + references (for the format rule) -> answers -> scores -> one EvalResult
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from instructlm.answering.answerer import BATCH_SIZE, Answerer, DecodeSettings, load_answerer
from instructlm.data.encode import encode_examples
from instructlm.data.formats import Example, read_instruction_file
from instructlm.data.templates import Template
from instructlm.errors import InstructlmError, Report
from instructlm.measuring.scores import FormatJudge, score_answer, summarize, taught_answers
from instructlm.model.loss import mean_loss
from instructlm.runs import is_run, read_run_examples, read_run_info


@dataclass
class EvalSet:
    """What to ask, every example the data knows (the format rule learns from them), and
    what the model was taught (to tell a copied answer; None for a base model)."""

    source: str
    examples: list[Example]
    references: list[Example]
    note: str = ""  # said to the user: e.g. that training examples are being scored
    taught: list[Example] | None = None


@dataclass
class EvalResult:
    model: str
    decode: str
    source: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    eval_loss: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "decode": self.decode, "source": self.source,
                "summary": self.summary, "eval_loss": self.eval_loss,
                "seconds": round(self.seconds, 2), **self.extra, "examples": self.rows}


def eval_set_for(model: str | None, file: str | None) -> EvalSet:
    """The eval part of FILE, else of the run's own data.

    A FILE without an eval part is scored whole; a run without one has its training examples
    scored, which shows memorisation rather than generalisation, and says so.
    """
    taught: list[Example] = []
    pairs = False  # a preference run is asked on pairs: their chosen answers are expected
    run = bool(model and is_run(model))
    if run:
        pairs = read_run_info(model)["settings"].get("method", "sft") != "sft"
        taught, held_out = read_run_examples(model)
        if file is None:
            if held_out:
                return EvalSet(f"{model} (its eval part)", held_out, taught + held_out,
                               taught=taught)
            return EvalSet(f"{model} (its training examples)", taught, taught,
                           note=f"{model} has no held-out examples, so its training examples "
                                "are scored: this shows memorisation, not generalisation. "
                                "Pass an instruction file to evaluate on new ones.",
                           taught=taught)
    if file is None:
        raise InstructlmError(f"{model or 'the embedded model'} is not a trained run, so it "
                              "has no examples to evaluate on",
                              hint="give a run folder made by `instructlm train`, or an "
                                   "instruction file to evaluate a base model on")
    data = read_instruction_file(file, need_train=False, preferences=pairs)
    known = taught if run else None
    if data.eval:
        return EvalSet(f"{file} (its eval part)", data.eval, taught + data.train + data.eval,
                       taught=known)
    return EvalSet(str(file), data.train, taught + data.train,
                   note=f"{file} has no '# _EVAL_' part: all its examples are scored",
                   taught=known)


def evaluate(answerer: Answerer, eval_set: EvalSet, decode: DecodeSettings = DecodeSettings(),
             decode_label: str = "greedy", batch_size: int = BATCH_SIZE,
             with_loss: bool = True) -> EvalResult:
    """Answer every example of `eval_set`, score the answers, and measure the eval loss."""
    started = time.perf_counter()
    judge = FormatJudge(eval_set.references)
    taught = None if eval_set.taught is None else taught_answers(eval_set.taught)
    rows, scores = [], []
    for ex, answer in zip(eval_set.examples,
                          answerer.answer(eval_set.examples, decode, batch_size)):
        score = score_answer(judge, ex, answer.response, answer.finish_reason, taught)
        scores.append(score)
        rows.append({"instruction": ex.instruction, "input": ex.input, "expected": ex.response,
                     "answer": answer.response, "finish_reason": answer.finish_reason,
                     **score.to_dict()})
    loss = answer_loss(answerer, eval_set.examples) if with_loss else None
    return EvalResult(answerer.name, decode_label, eval_set.source, rows, summarize(scores),
                      loss, time.perf_counter() - started)


def answer_loss(answerer: Answerer, examples: list[Example], batch_size: int = 8) -> float | None:
    """Mean loss per token of the expected answers: how surprised the model is by them.

    Computed in the model's own dtype (fp32 unless loaded otherwise), never by a speed probe:
    the number must not change with the machine."""
    tok = answerer.tokenizer
    encoded, _ = encode_examples(examples, answerer.template, tok,
                                 min(tok.model_max_length, 4096))
    if not encoded:
        return None
    device = str(answerer.model.device.type)
    return round(mean_loss(answerer.model, encoded, batch_size, tok.pad_token_id, device,
                           "fp32"), 5)


# --- compare --------------------------------------------------------------------------------

_DECODE_SPEC = re.compile(r"(greedy)|beams?(\d+)|sample(\d*\.?\d*)")


def parse_decodes(text: str, max_new_tokens: int) -> list[tuple[str, DecodeSettings]]:
    """'greedy,beams5,sample0.7' -> labelled decode settings."""
    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        m = _DECODE_SPEC.fullmatch(spec)
        if not m:
            raise InstructlmError(f"unknown decoding {spec!r}",
                                  hint="use greedy, beamsN (e.g. beams5) or sampleT "
                                       "(temperature T, e.g. sample0.7)")
        if m.group(1):
            settings = DecodeSettings(max_new_tokens=max_new_tokens)
        elif m.group(2):
            settings = DecodeSettings(max_new_tokens=max_new_tokens, beams=int(m.group(2)))
        else:
            settings = DecodeSettings(max_new_tokens=max_new_tokens, sample=True,
                                      temperature=float(m.group(3) or 0.7))
        settings.check()
        out.append((spec, settings))
    if not out:
        raise InstructlmError("--decode names no decoding", hint="e.g. --decode greedy,beams5")
    return out


def compare(models: list[str], eval_set: EvalSet, decodes: list[tuple[str, DecodeSettings]],
            with_bases: bool = False, batch_size: int = BATCH_SIZE,
            report: Report = print, device: str = "auto") -> list[EvalResult]:
    """Every model (runs, base models, and with `with_bases` each run's untuned base, asked
    with the run's template) under every decoding, on the same examples."""
    results = []
    for spec, template, label in _models_to_compare(models, with_bases):
        answerer = load_answerer(spec, template, device=device)
        answerer.name = label or answerer.name
        loss = answer_loss(answerer, eval_set.examples)
        for label, decode in decodes:
            report(f"{answerer.name}, {label} ...")
            result = evaluate(answerer, eval_set, decode, label, batch_size, with_loss=False)
            result.eval_loss = loss
            results.append(result)
        del answerer  # one model in memory at a time
    return results


def _models_to_compare(models: list[str],
                       with_bases: bool) -> list[tuple[str, Template | None, str]]:
    """(spec, template, label); template and label are set only for a run's untuned base,
    which is asked with the run's template."""
    pairs: list[tuple[str, Template | None, str]] = [(m, None, "") for m in models]
    if with_bases:
        seen = set()
        for m in models:
            if is_run(m):
                info = read_run_info(m)
                key = (info["base"]["spec"], str(info["template"]))
                if key not in seen:
                    seen.add(key)
                    pairs.append((info["base"]["spec"], Template.from_dict(info["template"]),
                                  f"{info['base']['name']} (untuned, "
                                  f"{info['template']['name']} template)"))
        if not seen:
            raise InstructlmError("--base adds the untuned base model of each run, but none "
                                  "of the models is a run")
    return pairs

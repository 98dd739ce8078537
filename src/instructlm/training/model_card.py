"""The run's README.md: what it is, how it was made, how to ask it."""

from __future__ import annotations

from typing import Any

from instructlm.measuring.scores import describe_summary


def model_card(info: dict[str, Any], answers: list[dict[str, Any]]) -> str:
    """A short README for the run: what it is, how it was made, how to ask it.

    `answers` are scored rows (instruction, expected, answer) from the end of training.
    """
    s, d, m = info["settings"], info["data"], info["metrics"]
    lines = [
        f"# {info['name']}",
        "",
        f"Instruction-tuned with instructlm {info['instructlm_version']} from "
        f"`{info['base']['name']}` on `{d['file']}` "
        f"({d['n_train']} training, {d['n_eval']} evaluation examples).",
        "",
        "## Ask it",
        "",
        f"    instructlm ask {info['name']} \"your instruction\"",
        "",
        "## How it was trained",
        "",
        f"- template: `{info['template']['name']}`",
        *(f"- {k}: {v}" for k, v in s.items()),
        f"- data SHA-256: `{d['sha256']}`",
        f"- final training loss: {m.get('final_train_loss')}",
        f"- eval loss per epoch: {m.get('eval_loss')}",
        f"- training time: {m.get('train_seconds')} s",
    ]
    if m.get("answer_scores"):
        lines += [f"- answers at the end: {describe_summary(m['answer_scores'])}"]
    if answers:
        lines += ["", "## Sample answers", "", "| instruction | expected | answer |",
                  "|---|---|---|"]
        for a in answers:
            cells = [a["instruction"], a["expected"], a["answer"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")
                                            for c in cells) + " |")
    return "\n".join(lines) + "\n"

"""Showing evaluation results: terminal tables, one self-contained HTML page, a PNG plot."""

from __future__ import annotations

import base64
import html
import shutil
from pathlib import Path
from typing import Any, Sequence

from instructlm.measuring.evaluate import EvalResult
from instructlm.measuring.scores import fraction

YES, NO = "✓", "✗"


# --- terminal -------------------------------------------------------------------------------

def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
               width: int | None = None) -> str:
    """Columns that fit the terminal: the widest columns are cut, with '…', until they fit."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    cells = [[str(c).replace("\n", " ⏎ ") for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    budget = width - 2 * (len(widths) - 1)
    while sum(widths) > budget and max(widths) > 8:
        widest = widths.index(max(widths))
        widths[widest] -= 1

    def cut(text: str, w: int) -> str:
        return text if len(text) <= w else text[:w - 1] + "…"

    lines = ["  ".join(cut(c, w).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_rows(results: list[EvalResult]) -> tuple[list[str], list[list[Any]]]:
    """One row per model and decoding: the shares and means."""
    checked = any(r.summary.get("n_checked") for r in results)
    taught = any(r.summary.get("copied") is not None for r in results)
    headers = ["model", "decode", "format", "exact", "stopped", *(["copied"] if taught else []),
               "chrF"]
    headers += ["check"] if checked else []
    headers += ["eval loss", "seconds"]
    rows = []
    for r in results:
        s = r.summary
        row = [r.model, r.decode, fraction(s, "format"), fraction(s, "exact"),
               fraction(s, "stopped"), *([fraction(s, "copied")] if taught else []),
               f"{s['chrf']:.1f}"]
        row += [fraction(s, "check", "n_checked")] if checked else []
        row += ["" if r.eval_loss is None else f"{r.eval_loss:.3f}", f"{r.seconds:.1f}"]
        rows.append(row)
    return headers, rows


def example_rows(result: EvalResult) -> tuple[list[str], list[list[Any]]]:
    """One row per example: asked, expected, answered, and the marks (True/False/None)."""
    checked = result.summary.get("n_checked", 0) > 0
    taught = result.summary.get("copied") is not None
    headers = ["#", "instruction", "expected", "answer", "format", "exact", "stopped",
               *(["copied"] if taught else []), "chrF"]
    headers += ["check"] if checked else []
    rows = []
    for i, r in enumerate(result.rows, start=1):
        asked = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        row = [str(i), asked, r["expected"], r["answer"], r["format"], r["exact"],
               r["stopped"], *([_copied(r)] if taught else []), f"{r['chrf']:.0f}"]
        rows.append(row + ([r["check"]] if checked else []))
    return headers, rows


def _copied(row: dict[str, Any]) -> str:
    """A copied answer is a bad sign, so not a (green) tick: 'yes' or nothing."""
    return "yes" if row.get("copied") else ""


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return YES if value else NO
    return str(value)


def eval_table(result: EvalResult, width: int | None = None) -> str:
    headers, rows = example_rows(result)
    return text_table(headers, [[_plain(v) for v in row] for row in rows], width)


def compare_table(results: list[EvalResult], width: int | None = None) -> str:
    headers, rows = summary_rows(results)
    return text_table(headers, rows, width)


# --- HTML -----------------------------------------------------------------------------------

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 80rem;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; }
td.yes { color: #176117; background: #eaf6ea; text-align: center; }
td.no { color: #8a1c1c; background: #fbecec; text-align: center; }
.note { color: #555; }
img { max-width: 100%; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


_TEXT_COLUMNS = {"instruction", "expected", "answer"}


def _td(value: Any, column: str) -> str:
    if isinstance(value, bool):
        return f'<td class="{"yes" if value else "no"}">{YES if value else NO}</td>'
    cls = ' class="text"' if column in _TEXT_COLUMNS else ""
    return f"<td{cls}>{_esc(_plain(value))}</td>"


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_td(v, h) for v, h in zip(row, headers)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, sections: list[tuple[str, str]], note: str = "") -> str:
    """A whole page: no scripts, no external assets, images inline."""
    parts = [f"<h1>{_esc(title)}</h1>"]
    if note:
        parts.append(f'<p class="note">{_esc(note)}</p>')
    for heading, body in sections:
        parts.append(f"<h2>{_esc(heading)}</h2>{body}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def results_page(title: str, results: list[EvalResult], note: str = "",
                 plot_png: bytes | None = None) -> str:
    """Summary (and plot) first, then each result's examples."""
    sections = [("Summary", html_table(*summary_rows(results)) + _rule_note())]
    if plot_png:
        sections.insert(0, ("Learning curve", png_img(plot_png, "learning curve")))
    for r in results:
        sections.append((f"{r.model}, {r.decode}: {len(r.rows)} examples from {r.source}",
                         html_table(*example_rows(r))))
    return html_page(title, sections, note)


def png_img(data: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _rule_note() -> str:
    return ('<p class="note">format: the answer has the expected answer\'s shape (punctuation, '
            "word slots, list items, fixed words of its family), whatever its content words. "
            "exact: equal after trimming. stopped: the model ended the answer itself. copied: "
            "the answer is one the model was taught, word for word, where another was "
            "expected. chrF: "
            "character n-gram F-score, 0-100. eval loss: mean loss per token of the expected "
            "answers.</p>")


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- plot -----------------------------------------------------------------------------------

def plot_curve(points: list[dict[str, Any]], title: str) -> bytes:
    """PNG of format match, exact match and stop rate (and chrF/100) against training size."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    xs = [p["n_train"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label, style in (("format", "format match", "o-"), ("exact", "exact match", "s-"),
                              ("stopped", "stopped", "^-")):
        ax.plot(xs, [100 * p["summary"][key] for p in points], style, label=label)
    ax.plot(xs, [p["summary"]["chrf"] for p in points], "d--", label="chrF", alpha=0.7)
    ax.set_xlabel("training examples")
    ax.set_ylabel("% of held-out answers (chrF: 0-100)")
    ax.set_ylim(-5, 105)
    ax.set_xticks(xs)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()

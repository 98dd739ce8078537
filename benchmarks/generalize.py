"""Do the training defaults teach files they were not chosen on? Train every file of the suite,
answer its held-out part, and score the answers.

    .venv/bin/python benchmarks/generalize.py [--files NAMES] [--half tuning|check|fresh|all]
                                              [--seeds 42,43,44] [-- TRAIN FLAGS...]

`make generalize` runs it with the defaults. Every file is trained by `instructlm train` as a
user would run it (flags after `--` go to it, e.g. `-- --lr 2e-5 --no-end-token`), and
scored with the answers `train` gives at its end (greedy, at most 200 new tokens) and
instructlm's own scores, among them how many answers repeat a taught response word for word
where that is not the expected answer (in the taught format, but nothing learned beyond
it). One table per part of the suite (benchmarks/suite/halves.json: rules are chosen on the
tuning half only; the check half and the fresh files report them), then a last line of
JSON with the totals.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "suite"
# Rules are chosen on the tuning half only; the check half and the fresh files (families
# neither half has, written after the defaults were chosen) report them.
HALVES = ("tuning", "check", "fresh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", help="suite file names (without .txt), comma-separated")
    parser.add_argument("--half", choices=(*HALVES, "all"), default="all")
    parser.add_argument("--seeds", default="42", help="training seeds, comma-separated")
    parser.add_argument("--show", action="store_true",
                        help="print every answer not in the taught format, or not stopped")
    parser.add_argument("flags", nargs="*", help="after --: flags for `instructlm train`")
    args = parser.parse_args()
    halves = json.loads((SUITE / "halves.json").read_text(encoding="utf-8"))
    wanted = set(args.files.split(",")) if args.files else None
    seeds = [int(s) for s in args.seeds.split(",")]
    totals: dict[str, Any] = {"flags": args.flags, "seeds": seeds}
    seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for half in HALVES:
            names = [n for n in halves[half] if wanted is None or n in wanted]
            if args.half not in (half, "all") or not names:
                continue
            rows = [run_file(name, seed, args.flags, Path(tmp), args.show)
                    for name in names for seed in seeds]
            print(table(half, rows), flush=True)
            totals[half] = total(rows)
            seconds += sum(r["train_s"] for r in rows)
    totals["train_seconds"] = round(seconds, 1)
    print(json.dumps(totals))


def run_file(name: str, seed: int, flags: list[str], tmp: Path, show: bool) -> dict[str, Any]:
    """Train one suite file as a user would, and read what the run says of its answers."""
    output = tmp / f"{name}-{seed}"
    command = [sys.executable, "-m", "instructlm", "train", str(SUITE / f"{name}.txt"),
               "--output", str(output), "--force", "--quiet", "--seed", str(seed), *flags]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}: training failed\n{done.stdout}\n{done.stderr}")
    info = json.loads((output / "instructlm.json").read_text(encoding="utf-8"))
    metrics, settings = info["metrics"], info["settings"]
    answers = metrics["closing_answers"]
    if show:
        for a in answers:
            if not (a["format"] and a["stopped"]) or a["copied"]:
                note = " (a taught response)" if a["copied"] else ""
                print(f"  {name} seed {seed}: {a['instruction']!r}\n    expected {a['expected']!r}"
                      f"\n    answer   {a['answer'][:160]!r}{note}", file=sys.stderr)
    print(f"{name} seed {seed}: {metrics['answer_scores']['format']:.2f} in format "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return {"file": name, "seed": seed, "n_train": info["data"]["n_train"],
            "epochs": settings["epochs"], "steps": metrics.get("steps"),
            "precision": settings["precision_used"],
            "n": len(answers), "format": sum(a["format"] for a in answers),
            "stopped": sum(a["stopped"] for a in answers),
            "exact": sum(a["exact"] for a in answers),
            "copied": sum(a["copied"] for a in answers),
            "chrf": sum(a["chrf"] for a in answers),
            "train_s": metrics["train_seconds"]}


def total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(r["n"] for r in rows)
    return {"answers": n,
            **{k: sum(r[k] for r in rows) for k in ("format", "stopped", "exact", "copied")},
            "format_share": round(sum(r["format"] for r in rows) / n, 4),
            "stopped_share": round(sum(r["stopped"] for r in rows) / n, 4),
            "chrf": round(sum(r["chrf"] for r in rows) / n, 2),
            "train_seconds": round(sum(r["train_s"] for r in rows), 1)}


def table(half: str, rows: list[dict[str, Any]]) -> str:
    title = f"{half} files" if half == "fresh" else f"{half} half"
    lines = [f"\n{title}", "| file | seed | train lines | epochs | steps | format | stopped "
             "| exact | copied | chrF | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    precisions = sorted({r["precision"] for r in rows})
    lines[0] += f" (trained in {', '.join(precisions)})"
    for r in rows:
        lines.append(f"| {r['file']} | {r['seed']} | {r['n_train']} | {r['epochs']} | "
                     f"{r['steps']} | {r['format']}/{r['n']} | {r['stopped']}/{r['n']} | "
                     f"{r['exact']}/{r['n']} | {r['copied']}/{r['n']} | {r['chrf'] / r['n']:.1f} | "
                     f"{r['train_s']:.0f} |")
    t = total(rows)
    lines.append(f"| **all** | | | | | **{t['format']}/{t['answers']}** | "
                 f"**{t['stopped']}/{t['answers']}** | {t['exact']}/{t['answers']} | "
                 f"{t['copied']}/{t['answers']} | {t['chrf']:.1f} | {t['train_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

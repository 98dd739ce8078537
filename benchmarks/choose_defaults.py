"""Measure the choices behind train's and ask's defaults on examples/spells.txt.

    .venv/bin/python benchmarks/choose_defaults.py [--lrs 2e-5,1e-4,2e-4] [--decodes greedy,beams5]

For each learning rate it trains the embedded model (4 epochs, otherwise defaults), then answers
the held-out instructions with each decoding and prints how many follow the taught format and
stop on their own. Takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_embedded_slow import EXAMPLE, follows_taught_format  # noqa: E402

from instructlm.base import quiet_libraries  # noqa: E402
from instructlm.formats import read_instruction_file  # noqa: E402
from instructlm.generate import DecodeSettings, load_answerer  # noqa: E402
from instructlm.train import TrainSettings, train  # noqa: E402

DECODES = {"greedy": DecodeSettings(), "beams5": DecodeSettings(beams=5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="2e-5,1e-4,2e-4")
    parser.add_argument("--decodes", default="greedy,beams5")
    args = parser.parse_args()
    quiet_libraries()
    data = read_instruction_file(EXAMPLE)
    held_out = [ex.instruction for ex in data.eval]
    print("| lr | decoding | format match | stopped | final eval loss | train s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for lr in (float(x) for x in args.lrs.split(",")):
            started = time.perf_counter()
            run = train(EXAMPLE, Path(tmp) / f"lr{lr}", TrainSettings(lr=lr),
                        report=lambda m: None, progress=False)
            seconds = time.perf_counter() - started
            eval_loss = json.loads((run / "instructlm.json").read_text())["metrics"]["eval_loss"]
            answerer = load_answerer(str(run))
            for name in args.decodes.split(","):
                answers = list(answerer.answer(held_out, DECODES[name]))
                fmt = sum(follows_taught_format(a.instruction, a.response) for a in answers)
                stopped = sum(a.finish_reason == "stop" for a in answers)
                print(f"| {lr:g} | {name} | {fmt}/{len(answers)} | {stopped}/{len(answers)} "
                      f"| {eval_loss[-1]:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

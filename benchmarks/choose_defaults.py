"""Measure the choices behind train's and ask's defaults on an instruction file.

    .venv/bin/python benchmarks/choose_defaults.py [FILE] [--lrs 2e-5,1e-4,2e-4]
                                                   [--decode greedy,beams5] [--lora]
                                                   [--seeds 42]

For each learning rate (and seed) it trains the embedded model (otherwise the defaults), then scores the
held-out answers of every run and of the untuned base model under each decoding, with
`instructlm compare`'s code. Takes several minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from instructlm.measuring.evaluate import compare, eval_set_for, parse_decodes
from instructlm.measuring.report import compare_table
from instructlm.model.base import quiet_libraries
from instructlm.training.settings import TrainSettings
from instructlm.training.train import train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=str(ROOT / "examples" / "spells.txt"))
    parser.add_argument("--lrs", default="2e-5,1e-4,2e-4")
    parser.add_argument("--decode", default="greedy,beams5")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters")
    parser.add_argument("--seeds", default="42", help="training seeds, comma-separated")
    args = parser.parse_args()
    quiet_libraries()
    decodes = parse_decodes(args.decode, 200)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for lr in (float(x) for x in args.lrs.split(",")):
            for seed in (int(x) for x in args.seeds.split(",")):
                started = time.perf_counter()
                settings = TrainSettings(lr=lr, seed=seed, lora=args.lora)
                runs.append(str(train(args.file, Path(tmp) / f"lr{lr:g}-seed{seed}", settings,
                                      report=lambda m: None, progress=False)))
                print(f"lr {lr:g}, seed {seed}: trained in "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        eval_set = eval_set_for(runs[0], None)
        results = compare(runs, eval_set, decodes, with_bases=True,
                          report=lambda m: print(m, file=sys.stderr, flush=True))
    print(compare_table(results, width=200))


if __name__ == "__main__":
    main()

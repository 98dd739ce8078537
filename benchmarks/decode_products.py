"""How much a decode step costs for 1, 8 and 32 rows, with nn.Linear's x @ W.T and with the
weight-first W @ x.T that answers use on a CPU (instructlm/weight_first.py).

    .venv/bin/python benchmarks/decode_products.py [--base embedded] [--rows 1,8,32]

Two copies of the base model in one process, stepped alternately (two rounds, so that a
slow moment of the machine shows up as a disagreement between rounds): the median seconds
of a decode step after a prompt of `--context` tokens, the ratio of the two orders, and
each order's cost of N rows against one row (what bounds the speed-up of batched answers
and of the server's shared steps). Then one line of JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any


def step_seconds(model: Any, rows: int, context: int, steps: int) -> float:
    """The median seconds of one decode step for `rows` rows after `context` tokens."""
    import torch

    ids = torch.randint(100, model.config.vocab_size - 100, (rows, context),
                        generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, last = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            started = time.perf_counter()
            out = model(last, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - started)
            last = out.logits[:, -1].argmax(-1, keepdim=True)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--context", type=int, default=60)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()

    from instructlm.model.base import load_model, quiet_libraries, resolve_base
    from instructlm.model.weight_first import use_weight_first

    quiet_libraries()
    plain = load_model(resolve_base(args.base)).eval()
    models = {"x @ W.T": plain, "W @ x.T": use_weight_first(copy.deepcopy(plain))}
    rows = [int(r) for r in args.rows.split(",")]
    rounds: list[dict[str, dict[int, float]]] = []
    for _ in range(2):
        rounds.append({name: {r: step_seconds(m, r, args.context, args.steps) for r in rows}
                       for name, m in models.items()})
    print(f"decode step of {args.base}, after {args.context} tokens (median of {args.steps}; "
          f"two rounds)\n")
    print(f"| rows | x @ W.T s | W @ x.T s | time saved | x @ W.T against {rows[0]} row(s) | "
          f"W @ x.T against {rows[0]} row(s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for got in rounds:
            old, new = got["x @ W.T"][r], got["W @ x.T"][r]
            cells.append((old, new, 1 - new / old, old / got["x @ W.T"][rows[0]],
                          new / got["W @ x.T"][rows[0]]))
        print(f"| {r} | " + " | ".join(" / ".join(fmt.format(c[i]) for c in cells)
                                       for i, fmt in enumerate(("{:.3f}", "{:.3f}", "{:.0%}",
                                                                "{:.2f}x", "{:.2f}x"))) + " |")
    print(json.dumps({"base": args.base, "context": args.context, "rounds": [
        {name: {str(r): round(s, 4) for r, s in got.items()} for name, got in x.items()}
        for x in rounds]}))


if __name__ == "__main__":
    main()

"""Where does training time go, and what does each speed path give? One epoch per variant.

    .venv/bin/python benchmarks/profile_step.py [FILE] [--epochs 1] [--profile VARIANT]

Each variant trains the embedded model for `--epochs` on FILE's examples (default:
examples/zauber.txt, batch 8, after one warm-up step) and prints seconds, non-pad tokens per
second and the share of this machine's bound (the faster of the bf16 and fp32 matmul peaks,
measured in the same process, / 6 x parameters). The variants add one change at a time:

    plain         fp32, every example's logits, dense embedding gradient
    +labels       the output layer only where there are labels
    +sparse       a sparse gradient for the (tied) input embedding
    +prefix       a prompt opening shared by the batch computed once
    +packed       each batch's rows packed into one, without padding: instructlm's fp32 path
    grouped       +prefix with batches grouped by length (less padding; not used: it hurt the
                  held-out answers, see train.py)
    bf16-autocast bf16 compute under autocast, fp32 weights
    bf16-master   bf16 weights for compute, fp32 master weights: instructlm's bf16 path
    eager         +prefix with the eager attention kernel instead of SDPA
    compiled      +packed with the decoder under torch.compile (dynamic shapes); not run
                  unless named in --variants: compiling takes minutes (printed apart)

`--profile NAME` also prints the torch.profiler table of that variant's slowest operators.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from instructlm.data.batches import collate
from instructlm.data.encode import encode_examples
from instructlm.data.formats import read_instruction_file
from instructlm.data.templates import choose_template
from instructlm.model.base import load_model, load_tokenizer, quiet_libraries, resolve_base
from instructlm.model.devices import matmul_gflops
from instructlm.training.optimize import SpeedPaths, TrainStep

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["plain", "+labels", "+sparse", "+prefix", "+packed", "grouped", "bf16-autocast",
            "bf16-master", "eager"]


def run_variant(name: str, source: str, encoded: list, pad_id: int, epochs: int,
                batch_size: int, profile: bool) -> tuple[float, int]:
    """Seconds and non-pad tokens of `epochs` epochs (after a warm-up step)."""
    later = VARIANTS.index(name) if name in VARIANTS else len(VARIANTS)
    model = load_model(source, attention="eager" if name == "eager" else None)
    steps_per_epoch = -(-len(encoded) // batch_size)
    step = TrainStep(model, lr=1e-4, weight_decay=0.01, warmup_ratio=0.1,
                     total_steps=steps_per_epoch * epochs + 1, device="cpu",
                     precision="bf16" if name.startswith("bf16") else "fp32",
                     speed=SpeedPaths(labels_only=later >= 1, sparse_embedding=later >= 2,
                                      share_prefix=later >= 3,
                                      pack=later >= 4 and name != "grouped",
                                      master_weights=name != "bf16-autocast"))
    if name == "compiled":
        model.base_model.compile(dynamic=True)
    generator = torch.Generator().manual_seed(0)
    lengths = [len(e.input_ids) for e in encoded]
    started = time.perf_counter()
    step(collate(encoded[:batch_size], pad_id))  # warm-up: allocations, kernel choice
    if name == "compiled":
        print(f"compiled: the first step took {time.perf_counter() - started:.0f} s",
              flush=True)
    context = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
               if profile else None)
    if context:
        context.__enter__()
    started, tokens = time.perf_counter(), 0
    for _ in range(epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        if name == "grouped":  # sort chunks of 4 batches by length, shuffle the batches
            chunks = [sorted(order[i:i + 4 * batch_size], key=lengths.__getitem__)
                      for i in range(0, len(order), 4 * batch_size)]
            order = [i for chunk in chunks for i in chunk]
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for indices in batches:
            batch = collate([encoded[i] for i in indices], pad_id)
            tokens += int(batch["attention_mask"].sum())
            step(batch)
    seconds = time.perf_counter() - started
    if context:
        context.__exit__(None, None, None)
        print(context.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=str(ROOT / "examples" / "zauber.txt"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", default="")
    args = parser.parse_args()
    quiet_libraries()
    source = resolve_base(None)
    tokenizer = load_tokenizer(source)
    encoded, _ = encode_examples(read_instruction_file(args.file).train,
                                 choose_template(None, tokenizer), tokenizer, 512)
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    params = sum(p.numel() for p in load_model(source).parameters())
    bound = max(bf16, fp32) * 1e9 / (6 * params)
    print(f"matmul peak: bf16 {bf16:.0f}, fp32 {fp32:.0f} GFLOP/s -> bound {bound:.0f} "
          f"tokens/s for {params / 1e6:.0f}M parameters; {len(encoded)} examples")
    print("| variant | seconds | non-pad tokens/s | of bound |")
    print("|---|---|---|---|")
    for name in args.variants.split(","):
        seconds, tokens = run_variant(name, source, encoded, tokenizer.pad_token_id,
                                      args.epochs, args.batch_size, name == args.profile)
        print(f"| {name} | {seconds:.1f} | {tokens / seconds:.0f} | "
              f"{tokens / seconds / bound:.0%} |", flush=True)


if __name__ == "__main__":
    main()

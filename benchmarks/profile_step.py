"""Where does a training step's time go? Times one step of the embedded model under variants.

    .venv/bin/python benchmarks/profile_step.py [FILE] [--steps 4] [--profile VARIANT]

Each variant runs `--steps` steps (after one warm-up step) on the same batches of FILE's
examples (default: examples/zauber.txt, batch 8) and prints seconds per step and non-pad tokens
per second, with the bf16 matmul peak of this machine measured in the same process.
`--profile NAME` also prints the torch.profiler table of the slowest operators for that one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from instructlm.base import load_model, load_tokenizer, quiet_libraries, resolve_base
from instructlm.encode import collate, encode_examples
from instructlm.formats import read_instruction_file
from instructlm.optimize import TrainStep
from instructlm.devices import matmul_gflops
from instructlm.templates import choose_template

ROOT = Path(__file__).resolve().parent.parent


def batches(file: str, batch_size: int) -> tuple[list[dict], int, int, object]:
    source = resolve_base(None)
    tokenizer = load_tokenizer(source)
    template = choose_template(None, tokenizer)
    data = read_instruction_file(file)
    encoded, _ = encode_examples(data.train, template, tokenizer, 512)
    out = [collate(encoded[i:i + batch_size], tokenizer.pad_token_id)
           for i in range(0, len(encoded), batch_size)]
    return out, sum(len(e.input_ids) for e in encoded), len(encoded), source


def run_variant(name: str, source: str, data: list[dict], steps: int, profile: bool) -> float:
    """Seconds per step, averaged over `steps` steps after a warm-up step."""
    model = load_model(source, attention="eager" if "eager" in name else None)
    step = TrainStep(model, lr=1e-4, weight_decay=0.01, warmup_ratio=0.1,
                     total_steps=steps + 1, device="cpu",
                     precision="fp32" if "fp32" in name else "bf16",
                     labels_only="all-logits" not in name,
                     master_weights="autocast" not in name)
    step(data[0])  # warm-up: allocations, kernels chosen
    started = time.perf_counter()
    context = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
               if profile else None)
    if context:
        context.__enter__()
    for i in range(steps):
        step(data[i % len(data)])
    if context:
        context.__exit__(None, None, None)
        print(context.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return (time.perf_counter() - started) / steps


VARIANTS = ["fp32", "bf16-autocast-all-logits", "bf16-autocast", "bf16-master-all-logits",
            "bf16-master", "bf16-master-eager"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=str(ROOT / "examples" / "zauber.txt"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", default="")
    args = parser.parse_args()
    quiet_libraries()
    data, tokens, n, source = batches(args.file, args.batch_size)
    per_step = tokens / len(data)  # mean non-pad tokens per batch
    peak = matmul_gflops(torch.bfloat16)
    params = sum(p.numel() for p in load_model(source).parameters())
    bound = peak * 1e9 / (6 * params)
    print(f"bf16 matmul peak {peak:.0f} GFLOP/s -> bound {bound:.0f} tokens/s for "
          f"{params / 1e6:.0f}M parameters; {n} examples, {per_step:.0f} tokens a batch")
    print("| variant | s/step | tokens/s | of bound |")
    print("|---|---|---|---|")
    for name in args.variants.split(","):
        seconds = run_variant(name, source, data, args.steps, name == args.profile)
        print(f"| {name} | {seconds:.3f} | {per_step / seconds:.0f} | "
              f"{per_step / seconds / bound:.0%} |", flush=True)


if __name__ == "__main__":
    main()

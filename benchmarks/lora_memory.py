"""Peak memory of `instructlm train --lora --precision bf16` on a 1.5B-parameter BLOOM model.

The tutorial fine-tuned malteos/bloom-1b5-clp-german fully, in about 24 GB. That model cannot
be downloaded here, so one of its exact shape (its config.json, below) is built with random
weights and the embedded model's tokenizer: memory does not depend on the weights' values.
The training runs as a user runs it, in a child process, whose peak RSS is measured.

    python benchmarks/lora_memory.py [FILE] [--lines 16] [--epochs 1]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MB = 8 * 1024
# config.json of malteos/bloom-1b5-clp-german on the Hugging Face hub.
BLOOM_1B5_CLP_GERMAN = dict(hidden_size=2048, n_head=16, n_layer=24, vocab_size=50304,
                            layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
                            apply_residual_connection_post_layernorm=False)


def build_model(folder: Path) -> int:
    """Save a random-weight model of the tutorial's shape, in bf16; return its size."""
    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    from instructlm.model.base import resolve_base

    torch.set_default_dtype(torch.bfloat16)  # never hold the 5 GB fp32 version
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(**BLOOM_1B5_CLP_GERMAN))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_base("embedded")).save_pretrained(folder)
    return n


def training_lines(file: Path, n: int) -> str:
    """The first `n` training examples of the file (held-out ones are not needed here)."""
    from instructlm.data.formats import read_instruction_file

    data = read_instruction_file(file)
    return "".join(f"{ex.instruction.replace('#', chr(92) + '#')}#"
                   f"{ex.response.replace('#', chr(92) + '#')}\n" for ex in data.train[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=str(ROOT / "examples" / "zauber.txt"))
    parser.add_argument("--lines", type=int, default=16, help="training examples to use")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base, data = Path(tmp) / "bloom-1b5", Path(tmp) / "data.txt"
        started = time.perf_counter()
        params = build_model(base)
        print(f"built a random BLOOM model of {params / 1e9:.2f}B parameters "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        data.write_text(training_lines(Path(args.file), args.lines), encoding="utf-8")
        command = [sys.executable, "-m", "instructlm", "train", str(data), "--base", str(base),
                   "--lora", "--precision", "bf16", "--epochs", str(args.epochs),
                   "--template", "seed-de", "--output", str(Path(tmp) / "run"), "--quiet"]
        print("$ instructlm " + " ".join(command[3:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
        # The largest RSS of any child waited for: the training process (kB on Linux).
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        run = json.loads((Path(tmp) / "run" / "instructlm.json").read_text())
        adapter_mb = (Path(tmp) / "run" / "adapter_model.safetensors").stat().st_size / 2**20

    result = {"params": params, "trainable": run["lora"]["trainable_parameters"],
              "lines": args.lines, "epochs": args.epochs, "wall_s": round(seconds, 1),
              "train_s": run["metrics"]["train_seconds"], "adapter_mb": round(adapter_mb, 1),
              "peak_rss_mb": round(peak_mb), "limit_mb": LIMIT_MB,
              "within_limit": peak_mb < LIMIT_MB}
    print(f"\npeak RSS {peak_mb / 1024:.2f} GB (limit {LIMIT_MB / 1024:.0f} GB), "
          f"{result['trainable'] / 1e6:.1f}M trainable of {params / 1e9:.2f}B parameters, "
          f"adapter file {adapter_mb:.1f} MB, {seconds:.0f} s in all")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Two processes (torchrun, gloo on the CPU) train like one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructlm.distributed import Shard
from instructlm.train import train

from conftest import EIGHT_FACTS, tiny_settings

# 8 training examples in global batches of 3: every third step has a short last batch.
DATA = EIGHT_FACTS


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("lora, precision, tolerance", [
    (False, "fp32", 2e-3), (True, "fp32", 2e-3), (False, "bf16", 2e-2)],
    ids=["full", "lora", "full-bf16"])
def test_two_processes_give_the_loss_curve_of_one(tmp_path, tiny_base, write, lora, precision,
                                                  tolerance):
    data = write("facts.txt", DATA)
    settings = tiny_settings(tiny_base, epochs=6, lora=lora, lr=1e-2 if lora else 3e-3,
                             lora_dropout=0.0, warmup_ratio=0.1,  # the command's default
                             precision=precision)  # not left to a timing probe
    one = train(data, tmp_path / "one", settings, report=lambda m: None, progress=False)
    torchrun = Path(sys.executable).with_name("torchrun")
    flags = ["--base", str(tiny_base), "--template", "seed-en", "--epochs", "6",
             "--batch-size", "3", "--lr", str(settings.lr), "--seed", "0", "--precision",
             precision, "--quiet"] + (["--lora", "--lora-dropout", "0"] if lora else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "instructlm",
                           "train", str(data), "--output", str(tmp_path / "two"), *flags],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 2 processes" in proc.stdout
    assert proc.stdout.count("Saved the run") == 1  # the main process alone saves
    a, b = step_losses(one), step_losses(tmp_path / "two")
    assert len(a) == len(b) == 18
    assert b == pytest.approx(a, rel=tolerance)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two")]


def test_shards_split_each_global_batch_and_weigh_by_response_tokens():
    class Two:
        num_processes, process_index = 2, 1

    shard = Shard(Two())
    tokens = [4, 1, 2, 3, 5]
    assert shard.rows([0, 1, 2]) == ([1], True)
    assert shard.rows([4]) == ([4], False)  # nothing left for this process: a dummy row
    # Weighted so that DDP's average of the two processes is the whole batch's mean.
    assert shard.share([1], True, [0, 1, 2], tokens) == pytest.approx(1 * 2 / 7)
    assert shard.share([4], False, [4], tokens) == 0.0
    assert Shard().rows([0, 1, 2]) == ([0, 1, 2], True)


@pytest.mark.parametrize("name", ["one_gpu", "multi_gpu", "multi_node"])
def test_the_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parent.parent / "examples" /
                                       "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "no"
    assert config.num_processes >= config.num_machines >= 1

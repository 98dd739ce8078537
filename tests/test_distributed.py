"""Two processes (`accelerate launch` with the shipped configs, gloo on the CPU), with DDP or
FSDP, train like one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EIGHT_FACTS, tiny_settings
from safetensors.torch import load_file

from instructlm.training.distributed import Shard, decoder_layers, launched
from instructlm.training.train import train

# 8 training examples in global batches of 3: every third step has a short last batch.
DATA = EIGHT_FACTS


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run) if "loss" in r]


def eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"] for r in records(run) if "eval_loss" in r]


CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "accelerate"


def launch(*args: str, cwd: Path, fsdp: bool = False) -> subprocess.CompletedProcess:
    """Two gloo processes on this CPU, started by `accelerate launch` with the shipped
    config a user would use: examples/accelerate/multi_gpu.yaml, or with `fsdp` fsdp.yaml."""
    config = CONFIGS / ("fsdp.yaml" if fsdp else "multi_gpu.yaml")
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
               str(config), "--num_processes", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def flags(base: Path, lr: float, precision: str, lora: bool, dropout: float = 0.0) -> list[str]:
    """The command line of tiny_settings(base, epochs=6, ...)."""
    return (["--base", str(base), "--template", "seed-en", "--epochs", "6", "--batch-size", "3",
             "--lr", str(lr), "--seed", "0", "--precision", precision, "--quiet"]
            + (["--lora", "--lora-dropout", str(dropout)] if lora else []))


@pytest.mark.parametrize("fsdp, lora, precision, tolerance", [
    (False, False, "fp32", 2e-3), (False, True, "fp32", 2e-3), (False, False, "bf16", 2e-2),
    (True, False, "fp32", 2e-3), (True, True, "fp32", 2e-3), (True, False, "bf16", 2e-2)],
    ids=["ddp", "ddp-lora", "ddp-bf16", "fsdp", "fsdp-lora", "fsdp-bf16"])
def test_two_processes_give_the_loss_curve_of_one(tmp_path, tiny_base, write, fsdp, lora,
                                                  precision, tolerance):
    data = write("facts.txt", DATA)
    settings = tiny_settings(tiny_base, epochs=6, lora=lora, lr=1e-2 if lora else 3e-3,
                             lora_dropout=0.0, warmup_ratio=0.1,  # the command's default
                             precision=precision)  # not left to a timing probe
    one = train(data, tmp_path / "one", settings, report=lambda m: None, progress=False)
    proc = launch("-m", "instructlm", "train", str(data), "--output", str(tmp_path / "two"),
                    *flags(tiny_base, settings.lr, precision, lora), cwd=tmp_path, fsdp=fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 2 processes" in proc.stdout and ("(FSDP)" in proc.stdout) == fsdp
    assert proc.stdout.count("Saved the run") == 1  # the main process alone saves
    a, b = step_losses(one), step_losses(tmp_path / "two")
    assert len(a) == len(b) == 18
    assert b == pytest.approx(a, rel=tolerance)
    assert eval_losses(tmp_path / "two") == pytest.approx(eval_losses(one), rel=tolerance)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two")]
    # The saved model is whole (FSDP gathers its shards) and the one a single process trains.
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    mine, theirs = load_file(one / name), load_file(tmp_path / "two" / name)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.allclose(mine[key], theirs[key], atol=tolerance), key


@pytest.mark.parametrize("fsdp, lora", [(False, True), (True, False), (True, True)],
                         ids=["ddp-lora", "fsdp", "fsdp-lora"])
def test_a_resumed_multi_process_run_equals_an_uninterrupted_one(tmp_path, tiny_base, write,
                                                                 fsdp, lora):
    data = write("facts.txt", DATA)
    # With dropout, each process draws its own masks, and must draw them again alike.
    args = flags(tiny_base, 1e-2 if lora else 3e-3, "bf16", lora, dropout=0.1)
    whole = launch("-m", "instructlm", "train", str(data), "--output", "whole", *args,
                     cwd=tmp_path, fsdp=fsdp)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = launch(str(Path(__file__).with_name("interrupted.py")), "11", "train", str(data),
                   "--output", "cut", "--save-every", "4", *args, cwd=tmp_path, fsdp=fsdp)
    assert cut.returncode != 0 and not (tmp_path / "cut").exists()
    assert json.loads((tmp_path / "cut.checkpoint" / "state.json").read_text())["done"] == 8
    again = launch("-m", "instructlm", "train", "--resume", "cut", cwd=tmp_path, fsdp=fsdp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming cut from its checkpoint after step 8" in again.stdout
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "whole")
    assert eval_losses(tmp_path / "cut") == eval_losses(tmp_path / "whole")
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_fsdp_refuses_fp16_with_a_clear_message(tmp_path, tiny_base, write):
    data = write("facts.txt", DATA)
    proc = launch("-m", "instructlm", "train", str(data), "--output", "fp16",
                    *flags(tiny_base, 3e-3, "fp16", lora=False), cwd=tmp_path, fsdp=True)
    assert proc.returncode != 0
    assert "error: FSDP trains in bf16 or fp32, not fp16" in proc.stderr
    # The launcher prints its own traceback on a failed process; instructlm's code none
    assert 'src/instructlm/' not in proc.stderr and "instructlm/train.py" not in proc.stderr
    assert not (tmp_path / "fp16").exists()


def test_deepspeed_is_refused_before_anything_starts(monkeypatch):
    from instructlm.errors import InstructlmError
    from instructlm.training.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(InstructlmError, match="DeepSpeed is not supported") as refused:
        make_accelerator()
    assert "fsdp.yaml" in refused.value.hint


def test_launched_means_a_launcher_with_several_processes_or_fsdp(monkeypatch):
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    assert not launched()  # a plain command
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched()  # torchrun with one process: the plain path
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launched()  # FSDP asked for, even in one process
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()


def test_fsdp_shards_each_decoder_layer_also_under_lora(tiny_base):
    from instructlm.model.adapters import LoraSettings, add_lora
    from instructlm.model.base import load_model

    model = load_model(str(tiny_base))
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert decoder_layers(add_lora(model, LoraSettings())) == layers


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


@pytest.mark.parametrize("name", ["one_gpu", "multi_gpu", "fsdp", "multi_node"])
def test_the_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.mixed_precision == "no"
    assert config.num_processes >= config.num_machines >= 1


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_tune_preferences_like_one(tmp_path, tiny_base, write, fsdp):
    """DPO in two processes: every pair's reference computed in each, each global batch of
    pairs split between them (the last one, of a single pair, leaves one process a row of
    no weight), the same losses and rewards as one process."""
    from test_preference import PAIRS

    data = write("pairs.txt", PAIRS)
    settings = tiny_settings(tiny_base, method="dpo", epochs=3, lr=1e-3, warmup_ratio=0.1,
                             precision="fp32")
    one = train(data, tmp_path / "one", settings, report=lambda m: None, progress=False)
    proc = launch("-m", "instructlm", "train", str(data), "--output", str(tmp_path / "two"),
                  "--method", "dpo", *flags(tiny_base, settings.lr, "fp32", False),
                  "--epochs", "3", cwd=tmp_path, fsdp=fsdp)  # the last --epochs counts
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 2 processes" in proc.stdout and "Preference: DPO" in proc.stdout
    a, b = step_losses(one), step_losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=2e-3)
    rewards = [[r["reward_margin"] for r in records(run) if "reward_margin" in r]
               for run in (one, tmp_path / "two")]
    assert rewards[1] == pytest.approx(rewards[0], rel=2e-3, abs=1e-4)

"""LoRA on tiny random models: only adapters train, the run keeps only them, merge is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_FILE, tiny_settings
from safetensors.torch import load_file

from instructlm.answering.answerer import load_answerer
from instructlm.cli import main
from instructlm.data.batches import collate
from instructlm.data.encode import encode_example
from instructlm.data.formats import Example
from instructlm.data.templates import NAMED_TEMPLATES
from instructlm.errors import InstructlmError
from instructlm.model.adapters import LoraSettings, add_lora, merge
from instructlm.runs import RUN_FILE
from instructlm.training.optimize import TrainStep
from instructlm.training.train import train

QUESTIONS = ["Say hello.", "Name three fruits.", "Tell me a spell."]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    (folder / "facts.txt").write_text(TINY_FILE, encoding="utf-8")
    return train(folder / "facts.txt", folder / "facts",
                 tiny_settings(tiny_base, lora=True, lr=1e-2), report=lambda m: None,
                 progress=False)


def test_a_lora_run_stores_only_the_adapter_and_names_its_base(lora_run, tiny_base):
    names = {p.name for p in lora_run.iterdir()}
    assert ADAPTER_FILES <= names and "model.safetensors" not in names
    weights = load_file(lora_run / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert all(t.dtype == torch.float32 for t in weights.values())
    info = json.loads((lora_run / RUN_FILE).read_text())
    assert info["base"]["spec"] == str(tiny_base)
    assert info["settings"]["lr"] == 1e-2 and info["settings"]["lora"] is True
    assert info["lora"]["targets"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert 0 < info["lora"]["trainable_parameters"] < info["lora"]["total_parameters"] / 2


def test_the_lora_run_learned_and_is_asked_transparently(lora_run, capsys):
    answers = list(load_answerer(str(lora_run)).answer(QUESTIONS))
    assert answers[0].response == "Hello!" and answers[0].finish_reason == "stop"
    assert main(["ask", str(lora_run), "Tell me a spell.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["response"] == answers[2].response


def test_merge_writes_a_standalone_run_that_answers_like_the_adapter(lora_run, tmp_path):
    merged = merge(lora_run, tmp_path / "merged")
    names = {p.name for p in merged.iterdir()}
    assert "model.safetensors" in names and not ADAPTER_FILES & names
    assert json.loads((merged / RUN_FILE).read_text())["merged_from"] == str(lora_run)
    adapter, whole = load_answerer(str(lora_run)), load_answerer(str(merged))
    assert [a.response for a in adapter.answer(QUESTIONS)] == \
        [a.response for a in whole.answer(QUESTIONS)]
    ids = torch.tensor([whole.prompt_ids(Example("Say hello.", ""))], device=whole.model.device)
    with torch.no_grad():
        torch.testing.assert_close(whole.model(ids).logits, adapter.model(ids).logits)


def test_merge_refuses_what_it_cannot_merge(lora_run, tmp_path, tiny_base, capsys):
    with pytest.raises(InstructlmError, match="nothing to merge"):
        merge(merge(lora_run, tmp_path / "m1"))
    assert main(["merge", str(tiny_base)]) == 2
    assert "not a trained run" in capsys.readouterr().err
    with pytest.raises(InstructlmError, match="already holds a trained run"):
        merge(lora_run, tmp_path / "m1")


def test_a_missing_base_is_named(lora_run, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in lora_run.iterdir():
        (moved / p.name).write_bytes(p.read_bytes())
    info = json.loads((moved / RUN_FILE).read_text())
    info["base"]["spec"] = str(tmp_path / "gone")
    (moved / RUN_FILE).write_text(json.dumps(info))
    with pytest.raises(InstructlmError, match="holds only a LoRA adapter"):
        load_answerer(str(moved))


def tiny_config(kind: str):
    from transformers import BloomConfig, GPT2Config, LlamaConfig

    return {
        "gpt2": GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "bloom": BloomConfig(vocab_size=400, hidden_size=64, n_layer=2, n_head=4),
        "llama": LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    }[kind]


@pytest.mark.parametrize("kind, targets", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("bloom", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),
])
def test_only_the_adapters_of_each_architecture_train(kind, targets, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind))
    adapted = add_lora(model, LoraSettings(rank=4))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == targets
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    example = encode_example(Example("Say hello.", "Hello!"), NAMED_TEMPLATES["seed-en"],
                             tiny_tokenizer, 64)
    batch = collate([example, example], tiny_tokenizer.pad_token_id)
    step = TrainStep(model, 1e-2, 0.0, 0.0, 3, "cpu", "fp32")
    losses = [step(batch) for _ in range(3)]
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_bad_lora_settings_are_refused_before_loading(tmp_path, tiny_base, write):
    data = write("facts.txt", TINY_FILE)
    with pytest.raises(InstructlmError, match="--lora-rank must be at least 1"):
        train(data, tmp_path / "x", tiny_settings(tiny_base, lora=True, lora_rank=0))
    with pytest.raises(InstructlmError, match="cannot add LoRA adapters"):
        train(data, tmp_path / "y", tiny_settings(tiny_base, lora=True, lora_targets="nope"),
              report=lambda m: None, progress=False)

"""Layer-wise learning rates: which rate each parameter gets, and that training obeys them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EIGHT_FACTS, tiny_settings

from instructlm.training.layer_decay import parameter_groups, rate_multipliers
from instructlm.training.train import train

LLAMA = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.2.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]


def test_the_top_layer_learns_at_the_full_rate_each_lower_one_at_decay_times_the_next():
    assert rate_multipliers(LLAMA, 0.5) == pytest.approx([0.125, 0.25, 0.25, 0.5, 1, 1, 1])
    gpt2 = ["transformer.wte.weight", "transformer.wpe.weight",
            "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
            "transformer.ln_f.weight"]
    assert rate_multipliers(gpt2, 0.5) == pytest.approx([0.25, 0.25, 0.5, 1, 1])
    neox = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.dense.weight",
            "gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "gpt_neox.final_layer_norm.weight",
            "embed_out.weight"]  # an output layer of its own: at the top, not the bottom
    assert rate_multipliers(neox, 0.5) == pytest.approx([0.25, 0.5, 1, 1, 1])
    bloom = ["transformer.word_embeddings.weight", "transformer.word_embeddings_layernorm.bias",
             "transformer.h.0.self_attention.dense.weight", "transformer.ln_f.weight"]
    assert rate_multipliers(bloom, 0.5) == pytest.approx([0.5, 0.5, 1, 1])
    lora = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]
    assert rate_multipliers(lora, 0.5) == pytest.approx([0.5, 1])
    assert rate_multipliers(LLAMA, 1.0) == [1.0] * len(LLAMA)


def test_groups_share_a_rate_and_decay_only_matrices():
    params = [torch.zeros(2, 2) if "norm" not in n else torch.zeros(2) for n in LLAMA]
    groups = parameter_groups(LLAMA, params, 1e-3, 0.1, 0.5)
    by_rate = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_rate == {(1.25e-4, 0.1): 1, (2.5e-4, 0.1): 1, (2.5e-4, 0.0): 1, (5e-4, 0.1): 1,
                       (1e-3, 0.1): 2, (1e-3, 0.0): 1}
    assert len(parameter_groups(LLAMA, params, 1e-3, 0.1, 1.0)) == 2  # as before: two groups


def test_lower_layers_move_less_and_the_run_keeps_the_setting(tmp_path, tiny_base):
    (tmp_path / "facts.txt").write_text(EIGHT_FACTS, encoding="utf-8")
    base = {n: p.detach().clone() for n, p in _model(tiny_base).named_parameters()}
    moved = {}
    for decay in (1.0, 0.1):
        said: list[str] = []
        run = train(tmp_path / "facts.txt", tmp_path / f"run-{decay}",
                    tiny_settings(tiny_base, epochs=2, batch_size=4, layer_decay=decay),
                    report=said.append, progress=False)
        assert json.loads((run / "instructlm.json").read_text())["settings"]["layer_decay"] \
            == decay
        assert any(line.startswith("Budget: ") and ("0.1x a layer below" in line) == (decay < 1)
                   for line in said)
        tuned = dict(_model(run).named_parameters())
        moved[decay] = {layer: (tuned[f"model.layers.{layer}.mlp.up_proj.weight"]
                                - base[f"model.layers.{layer}.mlp.up_proj.weight"]).norm().item()
                        for layer in (0, 1)}
    # Every layer alike: both move comparably; with 0.1 the lower one moves far less than that.
    assert moved[1.0][0] / moved[1.0][1] > 0.3
    assert moved[0.1][0] / moved[0.1][1] < 0.5 * moved[1.0][0] / moved[1.0][1]
    assert moved[0.1][1] > 0


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)

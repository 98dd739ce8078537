"""Every family in the registry is checked against a tiny model of that family, built from
its config: what the record says of it must be true."""

from __future__ import annotations

import pytest
import torch

from instructlm.model.architectures import ARCHITECTURES, UNKNOWN, architecture

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SMALL)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_record_holds_for_a_model_of_the_family(model_type):
    model = tiny(model_type)
    record = architecture(model)
    assert record is ARCHITECTURES[model_type]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        if record.plain_head:  # the logits are the output layer of the last hidden state
            head = model.get_output_embeddings()(out.hidden_states[-1])
            torch.testing.assert_close(head, out.logits)
        if record.positions_and_cache:  # explicit positions give the same logits
            positions = torch.arange(7).expand(2, 7)
            torch.testing.assert_close(model(ids, position_ids=positions).logits, out.logits)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(record.lora_targets) <= names, names
    from transformers.pytorch_utils import Conv1D

    has_conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    assert record.conv1d == has_conv1d


def test_a_family_not_listed_gets_the_safe_defaults():
    model = tiny("gpt_bigcode")
    assert architecture(model) is UNKNOWN
    assert not (UNKNOWN.plain_head or UNKNOWN.positions_and_cache or UNKNOWN.lora_targets)

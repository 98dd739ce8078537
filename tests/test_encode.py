"""Token ids and labels: the response and the end token carry loss, and with prompt loss the
instruction too, never the prompt's opening."""

from __future__ import annotations

import pytest

from instructlm.data.batches import collate
from instructlm.data.encode import IGNORE_INDEX, encode_example, encode_examples, encode_prompt
from instructlm.data.formats import Example
from instructlm.data.templates import around_instruction, parse_template, render_prompt
from instructlm.errors import InstructlmError
from instructlm.training.settings import TrainSettings


def test_labels_mask_prompt_and_end_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    t = parse_template("seed-en")
    ex = Example("Name three fruits.", "Apple, banana, cherry")
    enc = encode_example(ex, t, tok, max_length=512)
    prompt_ids = encode_prompt(render_prompt(t, ex), tok, t)
    response_ids = tok(ex.response, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    assert tok.decode([i for i in enc.labels if i != IGNORE_INDEX]) == ex.response + "<eos>"
    assert not enc.truncated


def test_without_end_token_as_the_tutorial_did(tiny_tokenizer):
    t = parse_template("seed-en")
    ex = Example("Name three fruits.", "Apple, banana, cherry")
    with_end = encode_example(ex, t, tiny_tokenizer, 512)
    without = encode_example(ex, t, tiny_tokenizer, 512, end_token=False)
    assert without.input_ids == with_end.input_ids[:-1]
    assert tiny_tokenizer.eos_token_id not in without.labels


def test_chat_prompt_is_encoded_as_rendered(tiny_tokenizer):
    t = parse_template("chat")
    ex = Example("Hi", "Hello")
    enc = encode_example(ex, t, tiny_tokenizer, 512)
    text = tiny_tokenizer.decode(enc.input_ids)
    assert text == "<|user|>Hi<|end|>\n<|assistant|>Hello<eos>"


def test_truncation_cuts_response_and_drops_prompt_only(tiny_tokenizer):
    t = parse_template("Q {instruction} A")
    ex = Example("x", "a long long long response")
    n_prompt = len(encode_prompt(render_prompt(t, ex), tiny_tokenizer, t))
    cut = encode_example(ex, t, tiny_tokenizer, max_length=n_prompt + 2)
    assert cut.truncated and len(cut.input_ids) == n_prompt + 2 and cut.n_labels == 2
    assert encode_example(ex, t, tiny_tokenizer, max_length=n_prompt) is None
    kept, warnings = encode_examples([Example("x", "y", source="f:1")], t, tiny_tokenizer,
                                     n_prompt)
    assert kept == [] and warnings == ["f:1: dropped, the prompt alone is longer than "
                                       f"--max-length {n_prompt} tokens"]


def test_collate_right_pads_with_masked_labels(tiny_tokenizer):
    t = parse_template("seed-en")
    a = encode_example(Example("a", "b"), t, tiny_tokenizer, 512)
    b = encode_example(Example("a longer instruction here", "b c d"), t, tiny_tokenizer, 512)
    batch = collate([a, b], pad_id=tiny_tokenizer.pad_token_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b.input_ids) - n)
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, n:].eq(tiny_tokenizer.pad_token_id).all()
    assert batch["labels"][1].tolist() == b.labels


def test_prompt_loss_learns_the_instruction_but_not_the_opening(tiny_tokenizer):
    tok = tiny_tokenizer
    earlier = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})
    for name, history in (("seed-en", ()), ("chat", earlier)):
        t = parse_template(name)
        ex = Example("Name three fruits.", "Apple, banana, cherry", history=history)
        plain = encode_example(ex, t, tok, 512)
        learned = encode_example(ex, t, tok, 512, prompt_loss=True)
        assert learned.input_ids == plain.input_ids
        masked = learned.labels.count(IGNORE_INDEX)
        before, after = around_instruction(t, ex, tok)
        # The opening (a system text, earlier turns) is the same for every example: not
        # learned. Everything from the instruction on is.
        assert tok.decode(learned.input_ids[:masked]) == before.rstrip(" ")
        assert learned.labels[masked:] == learned.input_ids[masked:]
        assert tok.decode(learned.labels[masked:]).strip().startswith("Name three fruits.")
        assert learned.n_labels == plain.n_labels + len(encode_prompt(
            render_prompt(t, ex, tok), tok, t)) - masked
        # The response's labels are the same either way.
        assert learned.labels[-plain.n_labels:] == plain.labels[-plain.n_labels:]


def test_prompt_loss_is_asked_for_and_for_supervised_runs_only():
    assert not TrainSettings().prompt_loss
    TrainSettings(prompt_loss=True).check()
    for method in ("dpo", "orpo"):
        with pytest.raises(InstructlmError, match="--prompt-loss must be off for --method"):
            TrainSettings(method=method, prompt_loss=True).check()


def test_held_out_examples_teach_their_responses_alone(tiny_tokenizer):
    from instructlm.training.train import encode_reporting

    t = parse_template("seed-en")
    examples = [Example("Name three fruits.", "Apple, banana, cherry")]
    settings = TrainSettings(prompt_loss=True)
    taught = encode_reporting(examples, t, tiny_tokenizer, settings, print)
    held_out = encode_reporting(examples, t, tiny_tokenizer, settings, print, held_out=True)
    assert held_out == encode_examples(examples, t, tiny_tokenizer, 512)[0]
    assert taught[0].n_labels > held_out[0].n_labels

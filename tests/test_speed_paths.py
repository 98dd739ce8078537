"""Every speed path gives the same numbers as the plain one: correct first, then fast."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from instructlm.data.batches import collate, packing_pays, shared_prefix_length
from instructlm.data.encode import IGNORE_INDEX, encode_examples
from instructlm.data.formats import Example
from instructlm.data.templates import parse_template
from instructlm.model import devices
from instructlm.model import loss as loss_module
from instructlm.model.loss import batch_loss
from instructlm.training.optimize import SpeedPaths, TrainStep, clip_gradients

EXAMPLES = [Example("Name three fruits.", "Apple, banana, cherry"), Example("Hi", "Hello!"),
            Example("Tell me a spell about three cities.", "Hocus A, Esotericus B, Alohomora!"),
            Example("Say hello.", "Hello!")]


@pytest.fixture
def encoded(tiny_tokenizer):
    return encode_examples(EXAMPLES, parse_template("seed-en"), tiny_tokenizer, 512)[0]


def test_output_layer_on_labels_only_gives_the_models_own_loss(tiny_tokenizer, encoded):
    model = make_tiny_model(tiny_tokenizer)
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    full = batch_loss(model, batch, "cpu", "fp32", labels_only=False)
    fast = batch_loss(model, batch, "cpu", "fp32", labels_only=True)
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)


def _other_architecture(name: str, tokenizer):
    from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2,
                                          n_head=4, n_positions=512))
    return BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2,
                                        n_head=4))


@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_fast_loss_and_sparse_embedding_on_other_architectures(tiny_tokenizer, encoded, name):
    """GPT-2 and BLOOM (the tutorial's family) take the same fast paths, with the same loss."""
    model = _other_architecture(name, tiny_tokenizer).eval()  # eval: no dropout
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    full = batch_loss(model, batch, "cpu", "fp32", labels_only=False)
    fast = batch_loss(model, batch, "cpu", "fp32")
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)
    step = TrainStep(model, 3e-3, 0.0, 0.0, 100, "cpu", "fp32")
    assert step.sparse_embedding  # both tie the embedding to the output layer
    losses = [step(batch) for _ in range(10)]
    step.finish()
    assert losses[-1] < 0.7 * losses[0]  # it learns


def test_shared_prompt_opening_computed_once_gives_the_same_loss_and_gradients(
        tiny_tokenizer, encoded):
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    start = shared_prefix_length(batch)
    opening = tiny_tokenizer("Below is an instruction", add_special_tokens=False)["input_ids"]
    assert start >= len(opening)  # the seed-en template's opening is shared
    assert (batch["labels"][:, :start + 1] == IGNORE_INDEX).all()
    shared = make_tiny_model(tiny_tokenizer)
    plain = copy.deepcopy(shared)
    with_sharing = batch_loss(shared, batch, "cpu", "fp32", share_prefix=True)
    without = batch_loss(plain, batch, "cpu", "fp32", share_prefix=False)
    with_sharing.backward()
    without.backward()
    assert with_sharing.item() == pytest.approx(without.item(), rel=1e-5)
    for a, b in zip(shared.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_no_shared_prefix_for_one_row_or_identical_responses(tiny_tokenizer, encoded):
    pad = tiny_tokenizer.pad_token_id
    assert shared_prefix_length(collate(encoded[:1], pad)) == 0
    # Two identical examples share everything, but only the prompt may be skipped.
    same = collate([encoded[0], encoded[0]], pad)
    start = shared_prefix_length(same)
    first_label = int((same["labels"][0] != IGNORE_INDEX).nonzero()[0])
    assert start == first_label - 1


def test_padding_does_not_change_an_examples_loss(tiny_tokenizer, encoded):
    """Which examples share a batch changes only the padding, which carries no loss."""
    model = make_tiny_model(tiny_tokenizer).eval()
    pad = tiny_tokenizer.pad_token_id
    short = min(encoded, key=lambda e: len(e.input_ids))
    long = max(encoded, key=lambda e: len(e.input_ids))
    alone = batch_loss(model, collate([short], pad), "cpu", "fp32")
    # In a batch with a longer example, the short one is padded; its own loss must not move.
    together = batch_loss(model, collate([short, long], pad), "cpu", "fp32")
    long_alone = batch_loss(model, collate([long], pad), "cpu", "fp32")
    n_short, n_long = short.n_labels, long.n_labels
    mixed = (alone.item() * n_short + long_alone.item() * n_long) / (n_short + n_long)
    assert together.item() == pytest.approx(mixed, rel=1e-4)


@pytest.mark.parametrize("path", ["packed", "shared prefix", "plain", "model's own"])
def test_example_average_is_the_mean_of_each_examples_own_loss(tiny_tokenizer, encoded,
                                                                path, monkeypatch):
    """Averaged per example, a batch's loss is the mean of its examples' losses, however
    many tokens each answer has, on every path the loss can take."""
    model = make_tiny_model(tiny_tokenizer).eval()
    pad = tiny_tokenizer.pad_token_id
    monkeypatch.setattr(loss_module, "packing_pays", lambda *args: path == "packed")
    options = {"share_prefix": path != "plain", "labels_only": path != "model's own"}
    alone = [batch_loss(model, collate([e], pad), "cpu", "fp32", **options).item()
             for e in encoded]
    assert len({e.n_labels for e in encoded}) > 1  # answers of different lengths
    batch = collate(encoded, pad)
    per_example = batch_loss(model, batch, "cpu", "fp32", average="example", **options)
    per_token = batch_loss(model, batch, "cpu", "fp32", average="token", **options)
    assert per_example.item() == pytest.approx(sum(alone) / len(alone), rel=1e-5)
    weighted = sum(x * e.n_labels for x, e in zip(alone, encoded, strict=True))
    assert per_token.item() == pytest.approx(weighted / sum(e.n_labels for e in encoded),
                                             rel=1e-5)
    assert per_example.item() != pytest.approx(per_token.item(), rel=1e-3)


def test_sparse_embedding_gradient_equals_the_dense_one(tiny_tokenizer, encoded):
    dense_model = make_tiny_model(tiny_tokenizer)
    sparse_model = copy.deepcopy(dense_model)
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    steps = [TrainStep(m, 1e-3, 0.0, 0.0, 2, "cpu", "fp32",
                       speed=SpeedPaths(sparse_embedding=sparse))
             for m, sparse in ((dense_model, False), (sparse_model, True))]
    assert steps[1].sparse_embedding and not steps[0].sparse_embedding
    for step in steps:
        step(batch)
        step.finish()
    for a, b in zip(dense_model.parameters(), sparse_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not sparse_model.get_input_embeddings().sparse  # back to normal after training


@pytest.mark.parametrize("case", ["small", "at the limit", "large", "overflowed"])
def test_gradient_clipping_does_what_the_library_does(case):
    generator = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (30,), (7, 3, 5)]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn(a.shape, generator=generator) * (1e-3 if case == "small" else 1)
        b.grad = a.grad.clone()
    if case == "overflowed":
        ours[1].grad[3] = theirs[1].grad[3] = float("inf")
    total = float(torch.cat([p.grad.flatten() for p in ours]).norm())
    limit = total if case == "at the limit" else 1.0
    norm = clip_gradients(ours, limit)
    expected = torch.nn.utils.clip_grad_norm_(theirs, limit)
    assert norm == pytest.approx(float(expected), rel=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=0, equal_nan=True)
    if case == "small":  # left exactly as they were
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))
    if case == "large":
        assert float(torch.cat([p.grad.flatten() for p in ours]).norm()) \
            == pytest.approx(1.0, rel=1e-5)


def test_bf16_master_weights_track_fp32_training(tiny_tokenizer, encoded):
    """bf16 compute with fp32 master weights follows fp32 training closely, and leaves an
    fp32 model behind (with fp32 buffers throughout)."""
    reference = make_tiny_model(tiny_tokenizer)
    models = {"fp32": reference, "bf16": copy.deepcopy(reference),
              "autocast": copy.deepcopy(reference)}
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    losses = {}
    for name, model in models.items():
        step = TrainStep(model, 3e-3, 0.0, 0.0, 1000, "cpu",
                         "fp32" if name == "fp32" else "bf16",
                         speed=SpeedPaths(master_weights=name != "autocast"))
        if name == "bf16":
            assert next(model.parameters()).dtype == torch.bfloat16
        losses[name] = [step(batch) for _ in range(30)]
        step.finish()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    for name in ("bf16", "autocast"):
        assert losses[name][-1] < losses[name][0] / 4  # it learns
        assert losses[name][-1] == pytest.approx(losses["fp32"][-1], rel=0.05)


def test_precision_follows_the_matmul_probe(monkeypatch):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert devices.resolve_precision("auto", "cpu") == "fp32"
        return
    devices.bf16_speedup.cache_clear()
    monkeypatch.setattr(devices, "bf16_speedup", lambda: 0.5)
    assert devices.resolve_precision("auto", "cpu") == "fp32"  # bf16 slower here: fp32
    monkeypatch.setattr(devices, "bf16_speedup", lambda: 3.0)
    assert devices.resolve_precision("auto", "cpu") == "bf16"
    assert devices.resolve_precision("fp32", "cpu") == "fp32"


def test_benchmark_runs_on_the_tiny_model(tiny_base, tmp_path):
    """`make bench`'s code end to end on the tiny model, so that it cannot rot."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench

    data = tmp_path / "facts.txt"
    data.write_text("Say hello.#Hello!\nName three fruits.#Apple, banana, cherry\n"
                    "Tell me a spell.#Hocus Pocus!\n# _EVAL_\nSay hi.#Hello!\n",
                    encoding="utf-8")
    # A small probe: where bf16 has no hardware support, one 2048-wide bf16 matmul takes ~25 s.
    results = bench.bench(str(data), str(tiny_base), epochs=1, probe_seconds=0.05,
                          probe_size=128, n_gen=4)
    for key in ("speedup", "tokens_per_s", "bound_fraction", "peak_rss_mb", "gen_speedup",
                "first_answer_s"):
        assert results[key] > 0, key
    assert results["baseline"]["padded_tokens"] > results["baseline"]["tokens"]
    assert results["generation"]["same_answers"] == 4
    bench.print_table(results)


def _left_padded(tokenizer, texts):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _decoded(model, ids, mask, *args, **kwargs) -> list[list[int]]:
    """Every row's new tokens, in row order."""
    from instructlm.answering.decode_loop import answers_as_they_end

    answers = dict(answers_as_they_end(model, ids, mask, *args, **kwargs))
    assert sorted(answers) == list(range(ids.shape[0]))
    return [answers[row] for row in range(ids.shape[0])]


def _until_end(tokens: list[int], end: int) -> list[int]:
    return tokens[:tokens.index(end) + 1] if end in tokens else tokens


OPENING = "Below is an instruction that describes a task. Instruction: "


@pytest.mark.parametrize("opening", ["", OPENING])
def test_dropping_finished_answers_gives_generates_greedy_answers(tiny_tokenizer, opening):
    """Same answers as `generate`, also when the prompts share an opening (run once)."""
    from transformers import GenerationConfig

    from instructlm.answering.decode_loop import answers_as_they_end
    from instructlm.data.batches import shared_opening_first

    model = make_tiny_model(tiny_tokenizer).eval()
    ids, mask = _left_padded(tiny_tokenizer, [
        opening + t for t in ("Name three fruits.", "Hi", "Tell me a spell.",
                              "Say hello to everybody here.")])
    assert bool(shared_opening_first(ids, mask)[0]) == bool(opening)
    width = ids.shape[1]
    with torch.inference_mode():
        free = model.generate(input_ids=ids, attention_mask=mask,
                              generation_config=GenerationConfig(
                                  max_new_tokens=12, do_sample=False, eos_token_id=[-5],
                                  pad_token_id=tiny_tokenizer.pad_token_id))[:, width:]
    end = int(free[0, 3])  # an "end token" that ends row 0 early and others at other steps
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask,
                                  generation_config=GenerationConfig(
                                      max_new_tokens=12, do_sample=False, eos_token_id=[end],
                                      pad_token_id=tiny_tokenizer.pad_token_id))[:, width:]
        got = _decoded(model, ids, mask, 12, [end])
    assert [_until_end(row.tolist(), end) for row in expected] == got, end
    assert len({len(g) for g in got}) > 1  # rows really ended at different steps
    # Each answer is handed over as soon as it has ended, while the others are decoded on.
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    handed = [(len(tokens), len(calls)) for _, tokens in
              answers_as_they_end(model, ids, mask, 12, [end])]
    assert [n for n, _ in handed] == sorted(len(g) for g in got)
    assert handed[0][1] < handed[-1][1]


def test_answers_come_in_input_order_as_soon_as_those_before_have_ended(tiny_tokenizer,
                                                                        monkeypatch):
    from instructlm.answering import answerer as answerer_module
    from instructlm.answering.answerer import Answerer

    events = []

    def ends_in_this_order(model, ids, *args, **kwargs):
        for row in (2, 0, 3, 1):
            events.append(f"ended {row}")
            yield row, [5 + row]

    monkeypatch.setattr(answerer_module, "answers_as_they_end", ends_in_this_order)
    answerer = Answerer(make_tiny_model(tiny_tokenizer), tiny_tokenizer,
                        parse_template("seed-en"), "tiny")
    for answer in answerer.answer(["a", "b", "c", "d"]):
        events.append(f"answer {answer.instruction}")
    assert events == ["ended 2", "ended 0", "answer a", "ended 3", "ended 1", "answer b",
                      "answer c", "answer d"]


def test_dropping_finished_answers_samples_reproducibly(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer).eval()
    ids, mask = _left_padded(tiny_tokenizer, ["Name three fruits.", "Hi"])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        with torch.inference_mode():
            runs.append(_decoded(model, ids, mask, 8, [-1], sample=True, temperature=0.7,
                                 top_p=0.9))
    assert runs[0] == runs[1] and all(len(r) == 8 for r in runs[0])


@pytest.mark.parametrize("average", ["example", "token"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_packed_rows_give_the_padded_rows_loss_and_gradients(tiny_tokenizer, encoded,
                                                            share_prefix, average, monkeypatch):
    """One packed row without padding: the same loss and gradients as the padded rows."""
    batch = collate(encoded, tiny_tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # there is padding to leave out
    # Whether it pays is the next test's matter: here the two must agree.
    monkeypatch.setattr(loss_module, "packing_pays", lambda *args: True)
    packed = make_tiny_model(tiny_tokenizer)
    padded = copy.deepcopy(packed)
    calls = []
    packed.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        kwargs["input_ids"].shape), with_kwargs=True)
    a = batch_loss(packed, batch, "cpu", "fp32", share_prefix=share_prefix, pack=True,
                   average=average)
    b = batch_loss(padded, batch, "cpu", "fp32", share_prefix=share_prefix, pack=False,
                   average=average)
    shared = shared_prefix_length(batch) if share_prefix else 0
    assert shared or not share_prefix
    # One call, one row: every real token once, the shared prefix once for all rows.
    assert calls == [(1, int(batch["attention_mask"].sum()) - (len(encoded) - 1) * shared)]
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    for x, y in zip(packed.parameters(), padded.parameters(), strict=True):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_packing_is_left_out_where_it_would_cost_more():
    """Attention in a packed row spans every example: with long examples and little padding
    the padded rows are cheaper, and a batch without padding has nothing to gain."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536)  # the embedded model's
    mask = torch.ones(2, 100, dtype=torch.long)
    assert not packing_pays(config, mask, 0)  # no padding
    mask[1, 90:] = 0
    assert packing_pays(config, mask, 0)  # short: the padding costs more
    long = torch.ones(8, 2000, dtype=torch.long)
    long[1:, 1900:] = 0
    assert not packing_pays(config, long, 0)  # long: attention costs more
    windowed = LlamaConfig(hidden_size=576, intermediate_size=1536, sliding_window=150)
    assert not packing_pays(windowed, mask, 0)  # 190 tokens > the window


def test_lookup_decoding_keeps_the_greedy_answer(tiny_tokenizer):
    """A lone greedy answer continues by prompt lookup: fewer calls of the model, the same
    tokens as `generate`, also where a proposed token is the end token."""
    from transformers import GenerationConfig

    model = make_tiny_model(tiny_tokenizer).eval()
    # This random model repeats the prompt's last token; the prompt holds that token twice
    # followed by others, which lookup then proposes, wrongly.
    ids = torch.tensor([tiny_tokenizer("Tell me a spell.")["input_ids"] + [23, 23, 40, 41, 23]])
    mask = torch.ones_like(ids)
    width = ids.shape[1]

    def greedy(limit, end):
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 generation_config=GenerationConfig(
                                     max_new_tokens=limit, do_sample=False, eos_token_id=[end],
                                     pad_token_id=tiny_tokenizer.pad_token_id))
        return _until_end(out[0, width:].tolist(), end)

    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    free = greedy(80, -5)
    with torch.inference_mode():
        calls.clear()
        got = _decoded(model, ids, mask, 80, [-5])[0]
    assert got == free
    # The 80 tokens took far fewer calls, some of which checked proposals that were wrong.
    assert len(calls) < 20 and max(calls[1:]) > 1
    assert sum(calls[1:]) > len(got) - 1
    end = free[50]
    with torch.inference_mode():
        assert _decoded(model, ids, mask, 80, [end])[0] == greedy(80, end)
        assert len(_decoded(model, ids, mask, 37, [-5])[0]) == 37


def test_look_up_proposes_what_followed_the_last_tokens_before():
    from instructlm.answering.decode_loop import _look_up

    assert _look_up([5, 6, 7, 8, 5, 6], 2) == [7, 8]  # after "5 6" came "7 8"
    assert _look_up([1, 2, 9, 1, 3, 9], 3) == [1, 3, 9]  # the latest "9": "1 3", then on
    assert _look_up([4, 5, 4, 5], 5) == [4, 5, 4, 5, 4]  # a repetition repeats on
    assert _look_up([1, 2, 3], 4) == []  # "3" did not occur before
    assert _look_up([7], 3) == []


def test_streamed_text_adds_up_to_the_answer_and_stops_when_asked(tiny_tokenizer):
    """Streaming goes through the same decoding (prompt lookup included): the same text
    and tokens as the whole answer, and it ends early once asked to."""
    from instructlm.answering.answerer import Answerer, DecodeSettings

    answerer = Answerer(make_tiny_model(tiny_tokenizer), tiny_tokenizer,
                        parse_template("seed-en"), "tiny")
    decode = DecodeSettings(max_new_tokens=60)
    whole = next(answerer.answer(["Tell me a spell."], decode))
    pieces: list[str] = []
    streamed = answerer.answer_streaming("Tell me a spell.", decode, pieces.append)
    assert streamed == whole and whole.new_tokens == 60
    assert "".join(pieces).strip() == whole.response
    asked = []
    short = answerer.answer_streaming("Tell me a spell.", decode, lambda text: None,
                                      should_stop=lambda: asked.append(1) or len(asked) > 3)
    # Asked after every token, also among those one call of lookup decoding accepted.
    assert short.new_tokens == 4 and whole.response.startswith(short.response)


def test_weight_first_products_give_the_plain_logits_and_leave_training_alone(tiny_tokenizer):
    """While answering, every linear layer multiplies W @ x.T: the same logits as nn.Linear
    (to rounding), for one row and for a batch; outside inference mode, exactly nn.Linear's,
    and gradients still flow."""
    from instructlm.model.weight_first import WeightFirstLinear, use_weight_first

    plain = make_tiny_model(tiny_tokenizer).eval()
    fast = use_weight_first(copy.deepcopy(plain))
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is WeightFirstLinear for m in linears)
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # still tied
    ids = torch.randint(3, len(tiny_tokenizer), (5, 7))
    for rows in (ids[:1], ids):
        with torch.inference_mode():
            want, got = plain(rows).logits, fast(rows).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # outside inference mode: nn.Linear's own numbers
        assert torch.equal(fast(ids).logits, plain(ids).logits)
    fast(ids).logits.sum().backward()  # training: gradients flow as before
    assert fast.lm_head.weight.grad is not None


def test_weight_first_leaves_subclasses_of_linear_alone():
    from instructlm.model.weight_first import use_weight_first

    class Quantised(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), Quantised(3, 2))
    use_weight_first(model)
    assert type(model[1]) is Quantised
    x = torch.randn(2, 4)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), model[1](torch.nn.functional.linear(
            x, model[0].weight, model[0].bias)))


def test_the_decode_products_benchmark_runs_on_a_tiny_model(tiny_base):
    """benchmarks/decode_products.py end to end, small, so that it cannot rot."""
    import json
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_products.py"
    proc = subprocess.run([sys.executable, str(script), "--base", str(tiny_base), "--rows",
                           "1,3", "--context", "4", "--steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rounds = json.loads(proc.stdout.splitlines()[-1])["rounds"]
    assert len(rounds) == 2
    assert all(s > 0 for got in rounds for order in got.values() for s in order.values())
    assert "| 3 |" in proc.stdout

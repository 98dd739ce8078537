"""Preference tuning (DPO, ORPO): the pair files, the losses, and training runs on the tiny
model, checked against TRL's own DPOTrainer."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_settings

from instructlm.data.formats import read_instruction_file
from instructlm.errors import InstructionFileError, InstructlmError

PAIRS = """\
# yes/no answers, preferred short
Is water wet?#Yes.#Yes, water is wet, as everyone knows.
Is fire cold?#No.#No, fire is hot, it is not cold at all.
Is ice cold?#Yes.#Yes, ice is very cold indeed.
Is sand a fruit?#No.#No, sand is not a fruit, it is sand.
# _EVAL_
Is snow white?#Yes.#Yes, snow is white, very white indeed.
Is grass blue?#No.
"""


def test_text_pairs_are_read_for_preference_tuning_only(write):
    path = write("p.txt", PAIRS)
    data = read_instruction_file(path, preferences=True)
    assert data.pairs
    assert (data.train[1].instruction, data.train[1].response, data.train[1].rejected) == (
        "Is fire cold?", "No.", "No, fire is hot, it is not cold at all.")
    assert data.eval[0].rejected and data.eval[1].rejected == ""  # a plain line to check form
    assert "rejected" in data.eval[0].to_dict() and "rejected" not in data.eval[1].to_dict()
    plain = read_instruction_file(path)  # supervised: everything after the first '#'
    assert plain.train[0].response == "Yes.#Yes, water is wet, as everyone knows."
    assert not plain.pairs
    assert any("--method dpo" in w for w in plain.warnings) is False  # the eval line has one '#'


def test_a_supervised_read_of_only_pair_lines_warns(write):
    data = read_instruction_file(write("p.txt", "a#b#c\nd#e#f\n"))
    assert [ex.response for ex in data.train] == ["b#c", "e#f"]
    assert len(data.warnings) == 1 and "--method dpo" in data.warnings[0]


def test_escaped_hashes_in_pairs(write):
    data = read_instruction_file(write("p.txt", r"Rank \#1?#\#1#\#2 # or 3" + "\n"),
                                 preferences=True)
    ex = data.train[0]
    assert (ex.instruction, ex.response, ex.rejected) == ("Rank #1?", "#1", "#2 # or 3")


@pytest.mark.parametrize("line, message", [
    ("Is water wet?#Yes.", "no rejected answer"),
    ("Is water wet?#Yes.#", "empty rejected answer"),
    ("Is water wet?##No.", "empty chosen answer"),
    ("Is water wet?", "no '#'"),
])
def test_bad_pair_lines_name_file_and_line(write, line, message):
    with pytest.raises(InstructionFileError) as err:
        read_instruction_file(write("p.txt", f"a#b#c\n{line}\n"), preferences=True)
    assert message in str(err.value) and "p.txt:2" in str(err.value)


def test_trl_jsonl_pairs_strings_and_messages(write):
    records = [
        {"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Is fire cold?"}],
         "chosen": [{"role": "assistant", "content": "No."}],
         "rejected": [{"role": "assistant", "content": "Yes."}], "split": "eval"},
    ]
    path = write("p.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    data = read_instruction_file(path, preferences=True)
    assert data.format == "jsonl-preference"
    assert (data.train[0].response, data.train[0].rejected) == ("Yes.", "No.")
    assert data.eval[0].history == ({"role": "system", "content": "Be brief."},)
    assert data.eval[0].instruction == "Is fire cold?" and data.eval[0].rejected == "Yes."
    with pytest.raises(InstructionFileError, match="preference pairs"):
        read_instruction_file(path)  # supervised training refuses pairs, with what to do


def test_preference_tuning_refuses_a_file_without_pairs(write):
    path = write("s.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(InstructionFileError, match="not preference pairs"):
        read_instruction_file(path, preferences=True)


def test_bad_jsonl_pair_names_its_line(write):
    path = write("p.jsonl", json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                 + json.dumps({"prompt": "a", "chosen": [{"role": "user", "content": "b"}],
                               "rejected": "c"}) + "\n")
    with pytest.raises(InstructionFileError, match=r"p.jsonl:2.*one assistant message"):
        read_instruction_file(path, preferences=True)


# --- the losses ---------------------------------------------------------------------------

def test_dpo_loss_is_ln2_when_the_policy_is_the_reference():
    import torch

    from instructlm.training.preference import pair_scores

    logps = torch.tensor([-3.0, -7.5, -4.0, -2.0])
    scores = pair_scores("dpo", 0.1, logps, torch.tensor([2, 5, 3, 1]), reference=logps)
    assert float(scores.loss) == pytest.approx(math.log(2), abs=1e-7)
    moved = pair_scores("dpo", 0.1, logps + torch.tensor([1.0, 1.0, 0.0, 0.0]),
                        torch.tensor([2, 5, 3, 1]), reference=logps)
    assert float(moved.loss) < math.log(2)  # the chosen answers became likelier
    assert moved.chosen.tolist() == pytest.approx([0.1, 0.1])
    # with the chosen answers' cross-entropy: 10.5 nats over their 7 tokens
    both = pair_scores("dpo", 0.1, logps, torch.tensor([2, 5, 3, 1]), reference=logps,
                       nll_weight=1.0)
    assert float(both.loss) == pytest.approx(math.log(2) + 10.5 / 7, abs=1e-6)


def test_orpo_loss_matches_its_formula():
    import torch

    from instructlm.training.preference import pair_scores

    logps, counts = torch.tensor([-2.0, -9.0]), torch.tensor([4, 3])
    pc, pr = -2.0 / 4, -9.0 / 3
    log_odds = (pc - pr) - (math.log(1 - math.exp(pc)) - math.log(1 - math.exp(pr)))
    expected = 2.0 / 4 - 0.1 * math.log(1 / (1 + math.exp(-log_odds)))
    scores = pair_scores("orpo", 0.1, logps, counts)
    assert float(scores.loss) == pytest.approx(expected, rel=1e-6)


# --- training -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_base):
    """A supervised run on the chosen answers' long form: the start that DPO corrects."""
    from instructlm.training.train import train

    folder = tmp_path_factory.mktemp("sft")
    long_form = "\n".join(f"{line.split('#')[0]}#{line.split('#')[2]}"
                          for line in PAIRS.splitlines() if line.count("#") == 2
                          and not line.startswith("#"))
    (folder / "long.txt").write_text(long_form + "\n", encoding="utf-8")
    return train(folder / "long.txt", folder / "long", tiny_settings(tiny_base, epochs=20),
                 report=lambda m: None, progress=False)


def _loss_records(run):
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def test_dpo_from_a_run_starts_at_ln2_and_prefers_the_chosen(tmp_path, write, sft_run):
    from instructlm.training.train import train

    messages = []
    run = train(write("pairs.txt", PAIRS), tmp_path / "dpo",
                tiny_settings(str(sft_run), template="auto", method="dpo", lr=1e-3, epochs=5,
                              batch_size=4, warmup_ratio=0.0, nll_weight=0.0,
                              precision="fp32"),
                report=messages.append, progress=False)
    records = _loss_records(run)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # one batch: all pairs
    info = json.loads((run / "instructlm.json").read_text())
    assert info["settings"]["method"] == "dpo" and info["template"]["name"] == "seed-en"
    rewards = info["metrics"]["rewards"]
    assert len(rewards) == 5 and rewards[-1]["reward_accuracy"] == 1.0
    assert rewards[-1]["reward_margin"] > rewards[0]["reward_margin"] > 0
    assert any("Preference: DPO, beta 0.1" in m for m in messages)
    assert info["metrics"]["closing_answers"]  # the eval part is answered and scored as ever
    from instructlm.measuring.evaluate import eval_set_for

    # `eval RUN FILE` reads a preference run's file as pairs: the chosen answer is expected
    asked = eval_set_for(str(run), str(tmp_path / "pairs.txt"))
    assert [ex.response for ex in asked.examples] == ["Yes.", "No."]


def test_dpo_with_lora_uses_the_adapter_off_model_as_reference(tmp_path, write, sft_run):
    from instructlm.training.train import train

    run = train(write("pairs.txt", PAIRS), tmp_path / "dpo-lora",
                tiny_settings(str(sft_run), template="auto", method="dpo", lora=True,
                              lr=1e-2, epochs=4, batch_size=4, warmup_ratio=0.0,
                              nll_weight=0.0),
                report=lambda m: None, progress=False)
    assert _loss_records(run)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    info = json.loads((run / "instructlm.json").read_text())
    assert info["lora"] and info["metrics"]["rewards"][-1]["reward_margin"] > 0


def test_orpo_from_a_base_learns_the_chosen_answers(tmp_path, write, tiny_base):
    from instructlm.training.train import train

    run = train(write("pairs.txt", PAIRS), tmp_path / "orpo",
                tiny_settings(tiny_base, method="orpo", epochs=40, batch_size=4),
                report=lambda m: None, progress=False)
    info = json.loads((run / "instructlm.json").read_text())
    assert info["metrics"]["rewards"][-1]["reward_accuracy"] == 1.0
    answers = {row["instruction"]: row["answer"] for row in info["metrics"]["closing_answers"]}
    assert answers["Is snow white?"] == "Yes."


def test_dpo_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path, write, sft_run):
    import shutil

    from instructlm.training import checkpoints
    from instructlm.training.train import resume, train

    path = write("pairs.txt", PAIRS)
    settings = tiny_settings(str(sft_run), template="auto", method="dpo", lr=1e-3, epochs=4,
                             batch_size=2, save_every=3)  # with the default cross-entropy
    whole = train(path, tmp_path / "whole", settings, report=lambda m: None, progress=False)
    # An interruption after step 3: the checkpoint of a second run, and no run yet.
    part = tmp_path / "part"
    real_save = checkpoints.save

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    checkpoints.save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(path, part, settings, report=lambda m: None, progress=False)
    finally:
        checkpoints.save = real_save
    resume(part, report=lambda m: None, progress=False)
    losses = [r["loss"] for r in _loss_records(part) if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in _loss_records(whole) if "loss" in r],
                                   abs=1e-5)
    shutil.rmtree(part)


def test_preference_methods_refuse_what_they_cannot_do(tmp_path, write, tiny_base):
    from instructlm.training.settings import TrainSettings
    from instructlm.training.train import train

    with pytest.raises(InstructlmError, match="--method must be"):
        TrainSettings(method="kto").check()
    with pytest.raises(InstructlmError, match="--beta must be"):
        TrainSettings(method="dpo", beta=0).check()
    with pytest.raises(InstructlmError, match="--nll-weight must be"):
        TrainSettings(method="dpo", nll_weight=-1).check()
    with pytest.raises(InstructionFileError, match="no rejected answer"):
        train(write("plain.txt", "a#b\n"), tmp_path / "x",
              tiny_settings(tiny_base, method="dpo"), report=lambda m: None, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("nll_weight, loss_type", [(0.0, ["sigmoid"]),
                                                   (1.0, ["sigmoid", "sft"])])
def test_dpo_steps_match_trls_dpo_trainer(tmp_path, write, tiny_base, tiny_tokenizer,
                                          nll_weight, loss_type):
    """The same pairs, model, optimizer and schedule: the losses of every step agree with
    those of TRL's DPOTrainer (sigmoid loss, reference log-probs precomputed; with the
    chosen answers' cross-entropy added, TRL's "sft" loss beside it)."""
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from instructlm.data.templates import NAMED_TEMPLATES, render_prompt
    from instructlm.training.train import train

    data = read_instruction_file(write("pairs.txt", PAIRS), preferences=True)
    steps = 4
    run = train(write("train.txt", PAIRS), tmp_path / "ours",
                tiny_settings(tiny_base, method="dpo", lr=1e-3, epochs=steps, batch_size=4,
                              warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                              nll_weight=nll_weight, precision="fp32"),  # as TRL's, here
                report=lambda m: None, progress=False)
    ours = [r["loss"] for r in _loss_records(run) if "loss" in r]

    template = NAMED_TEMPLATES["seed-en"]
    rows = [{"prompt": render_prompt(template, ex, tiny_tokenizer), "chosen": ex.response,
             "rejected": ex.rejected} for ex in data.train]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                     max_steps=steps, learning_rate=1e-3, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, beta=0.1, max_grad_norm=1.0,
                     loss_type=loss_type, loss_weights=[1.0] * len(loss_type),
                     precompute_ref_log_probs=True, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, seed=0, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_base), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=tiny_tokenizer)
        trainer.train()
    theirs = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(theirs) == len(ours) == steps
    if not nll_weight:
        assert ours[0] == pytest.approx(math.log(2), abs=1e-4)
    else:
        assert ours[0] > math.log(2) + 1  # the chosen answers' loss, on a random model
    assert ours == pytest.approx(theirs, abs=2e-3)
    assert ours[-1] < ours[0] - 0.05  # and they moved: the comparison is not of constants


def test_the_command_line_trains_dpo_and_inspects_pairs(tmp_path, write, sft_run, capsys):
    from instructlm.cli import main

    path = write("pairs.txt", PAIRS)
    assert main(["inspect", str(path), "--pairs", "--no-tokens"]) == 0
    shown = capsys.readouterr().out
    assert "chosen:   No." in shown and "rejected: No, fire is hot" in shown
    assert main(["train", str(path), "--method", "dpo", "--base", str(sft_run), "--epochs",
                 "2", "--lr", "1e-3", "--quiet", "-o", str(tmp_path / "dpo")]) == 0
    out = capsys.readouterr().out
    assert "on 4 preference pairs (1 for evaluation)" in out
    assert "Preference: DPO, beta 0.1; the reference: the starting model" in out
    assert "cross-entropy added with weight 1" in out
    assert "reward accuracy" in out and "Held-out answers:" in out


def test_budgets_of_the_preference_methods():
    from instructlm.training.settings import TrainSettings
    from instructlm.training.train import _budget

    dpo = _budget(TrainSettings(method="dpo"), 24)
    assert (dpo.epochs, dpo.steps) == (3, 9) and "as DPO takes by default" in dpo.why
    assert _budget(TrainSettings(method="dpo", epochs=5), 24).epochs == 5  # --epochs decides
    orpo = _budget(TrainSettings(method="orpo"), 24)  # teaching: at least 30 steps
    assert (orpo.epochs, orpo.steps) == (10, 30) and "24 pairs are 3 steps" in orpo.why
    assert TrainSettings(method="dpo").resolved().lr == 2e-5
    assert TrainSettings(method="dpo", lora=True).resolved().lr == 2e-4
    assert TrainSettings(method="orpo").resolved().lr == TrainSettings().resolved().lr


def test_a_lora_run_as_base_is_merged_and_compare_shows_both_runs(tmp_path, write, tiny_base,
                                                                   capsys):
    """`--base RUN` with a LoRA run: its adapter merged into its base, trained further in
    its template; `compare` then answers the preference run's held-out part with both."""
    from instructlm.cli import main
    from instructlm.training.train import train

    taught = train(write("long.txt", "Is water wet?#Yes, water is wet.\n"), tmp_path / "lora",
                   tiny_settings(tiny_base, lora=True, lr=1e-2, epochs=10),
                   report=lambda m: None, progress=False)
    run = train(write("pairs.txt", PAIRS), tmp_path / "dpo",
                tiny_settings(str(taught), template="auto", method="dpo", lr=1e-3, epochs=2),
                report=lambda m: None, progress=False)
    info = json.loads((run / "instructlm.json").read_text())
    assert info["template"]["name"] == "seed-en" and info["base"]["spec"] == str(taught)
    assert _loss_records(run)[0]["loss"] > math.log(2)  # with the chosen answers' loss
    assert main(["compare", str(run), str(taught)]) == 0
    table = capsys.readouterr().out
    assert "2 examples from" in table and "dpo " in table and "lora " in table

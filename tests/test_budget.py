"""The training budget: epochs from the file's size, the schedules, and where they show."""

from __future__ import annotations

import json

import pytest
from conftest import EIGHT_FACTS, tiny_settings

from instructlm.curve import learning_curve
from instructlm.model.loss import DEFAULT_AVERAGE
from instructlm.training.budget import DEFAULT_EPOCHS, choose_budget, make_scheduler
from instructlm.training.train import train


@pytest.mark.parametrize("n, batch, epochs, steps", [
    (10, 8, 16, 32),     # 2 steps an epoch: raised to reach 32 steps
    (24, 8, 11, 33),     # 3 steps an epoch
    (100, 8, 4, 52),     # large enough: the default epochs
    (500, 8, 4, 252),
    (1, 8, 32, 32),
])
def test_small_files_get_more_epochs_large_ones_the_default(n, batch, epochs, steps):
    budget = choose_budget(n, batch, None, min_steps=32)
    assert (budget.epochs, budget.steps) == (epochs, steps)
    assert budget.epochs >= DEFAULT_EPOCHS and str(budget.epochs) in budget.why


def test_epochs_asked_for_are_kept():
    budget = choose_budget(10, 8, 2, min_steps=32)
    assert (budget.epochs, budget.steps) == (2, 4) and "as asked" in budget.why


def rates(schedule: str, total: int = 20) -> list[float]:
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, schedule, 0.1, total)
    out = []
    for _ in range(total):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_warm_up_then_keep_or_decay_the_rate():
    linear, constant = rates("linear"), rates("constant")
    cosine, wsd = rates("cosine"), rates("wsd")
    for lrs in (linear, constant, cosine, wsd):
        assert lrs[0] == 0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert constant[2:] == pytest.approx([1.0] * 18)
    assert linear[-1] < 0.1 and cosine[-1] < 0.05 and linear[10] < 1.0
    assert wsd[2:16] == pytest.approx([1.0] * 14) and wsd[-1] < 0.5  # decays in the last 20%


def test_train_says_and_saves_what_it_chose(tmp_path, tiny_base):
    (tmp_path / "facts.txt").write_text(EIGHT_FACTS, encoding="utf-8")
    said: list[str] = []
    run = train(tmp_path / "facts.txt", tmp_path / "run",
                tiny_settings(tiny_base, epochs=None, min_steps=9, batch_size=4,
                              schedule="constant"), report=said.append, progress=False)
    info = json.loads((run / "instructlm.json").read_text())
    assert info["budget"]["epochs"] == 5 and info["budget"]["steps"] == 10  # 2 steps an epoch
    assert info["settings"]["epochs"] == 5 and info["settings"]["schedule"] == "constant"
    assert info["metrics"]["steps"] == 10
    assert any(line.startswith("Budget: 5 epochs") and "constant schedule" in line
               for line in said)
    assert info["settings"]["loss_average"] == DEFAULT_AVERAGE


def test_the_token_average_is_an_option_the_run_keeps(tmp_path, tiny_base):
    """`--loss-average token` trains another model, says so, and lands in the run."""
    (tmp_path / "facts.txt").write_text(EIGHT_FACTS, encoding="utf-8")
    losses = {}
    for average in ("example", "token"):
        said: list[str] = []
        run = train(tmp_path / "facts.txt", tmp_path / average,
                    tiny_settings(tiny_base, epochs=2, batch_size=4, loss_average=average),
                    report=said.append, progress=False)
        info = json.loads((run / "instructlm.json").read_text())
        assert info["settings"]["loss_average"] == average
        said_average = {"example": "each example's loss weighs the same",
                        "token": "the loss averaged over all answer tokens"}[average]
        assert any(line.startswith("Budget: ") and said_average in line for line in said)
        records = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
        losses[average] = [r["loss"] for r in records if "loss" in r]
    assert losses["example"][0] != pytest.approx(losses["token"][0], rel=1e-4)


def test_curve_gives_each_size_the_budget_train_would(tmp_path, tiny_base):
    (tmp_path / "facts.txt").write_text(EIGHT_FACTS, encoding="utf-8")
    results = learning_curve(tmp_path / "facts.txt", "2,8",
                             tiny_settings(tiny_base, epochs=None, min_steps=6, batch_size=4),
                             report=lambda m: None, progress=False)
    assert [r.extra["epochs"] for r in results] == [6, 4]  # 1 and 2 steps an epoch

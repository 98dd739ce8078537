"""Preference tuning: "this answer, not that one", from pairs of answers to one prompt.

Two objectives, as TRL computes them:

* **DPO** (sigmoid, Rafailov et al. 2023): the policy's log-probability of each answer
  (summed over its tokens) against a frozen reference's; the loss is
  `-log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))`, ln 2 at the
  first step, where the policy is the reference. The reference's log-probabilities are
  computed once, before training (`with_references`), so no second model is kept in memory;
  with LoRA the reference is the base with its adapters switched off. `nll_weight` adds the
  chosen answers' cross-entropy (RPO, Pang et al. 2024; TRL's `sft` loss beside `sigmoid`):
  pure DPO also lowers the chosen answers' likelihood while it widens the gap, and the
  greedy answers of a small model fell apart (docs/experiments.md).
* **ORPO** (Hong et al. 2024), without a reference: the chosen answer's cross-entropy, minus
  `beta * log sigmoid(log odds ratio)` of the two answers' mean token probabilities.

A pair's reward is `beta` times its log-ratio (DPO) or its mean token log-probability
(ORPO); the held-out pairs report how often the chosen answer's reward is the larger
(accuracy) and by how much on average (margin).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from instructlm.data.batches import collate_pairs
from instructlm.data.encode import IGNORE_INDEX, EncodedPair
from instructlm.model.architectures import architecture
from instructlm.model.loss import autocast

METHODS = ("sft", "dpo", "orpo")
DEFAULT_BETA = 0.1
DEFAULT_NLL_WEIGHT = 1.0  # DPO's added cross-entropy of the chosen answers


@dataclass
class PairScores:
    """The loss of a batch of pairs and each pair's two rewards."""

    loss: Any
    chosen: Any  # rewards, one a pair
    rejected: Any


def sequence_logps(model: Any, batch: dict[str, Any], device: str, precision: str,
                   labels_only: bool = True) -> tuple[Any, Any]:
    """For each row of a collated batch: the summed log-probability of its labelled tokens
    (the answer and its end token), and how many there are. With `labels_only` the output
    layer runs only where there are labels; without, the model's own forward runs (as a
    sharded model needs, whose forward gathers its weights)."""
    import torch

    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    targets = batch["labels"].to(device)[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    with autocast(model, device, precision):
        if labels_only and architecture(model).plain_head:
            hidden = model.base_model(input_ids=ids, attention_mask=mask,
                                      use_cache=False).last_hidden_state[:, :-1]
            logits = model.get_output_embeddings()(hidden[keep])
        else:
            logits = model(input_ids=ids, attention_mask=mask,
                           use_cache=False).logits[:, :-1][keep]
    logps = logits.float().log_softmax(-1).gather(-1, targets[keep][:, None])[:, 0]
    row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(targets)[keep]
    sums = torch.zeros(ids.shape[0], device=ids.device).index_add(0, row, logps)
    return sums, keep.sum(1)


def pair_scores(method: str, beta: float, logps: Any, counts: Any,
                reference: Any = None, nll_weight: float = 0.0) -> PairScores:
    """The loss and rewards of a batch laid out as `collate_pairs` does (chosen rows, then
    rejected rows)."""
    import torch.nn.functional as F

    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    nll = -chosen.sum() / n_chosen.sum()  # the chosen answers' mean loss per token
    if method == "dpo":
        ref_chosen, ref_rejected = reference.to(logps.device).chunk(2)
        chosen_reward = beta * (chosen - ref_chosen)
        rejected_reward = beta * (rejected - ref_rejected)
        loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
        if nll_weight:
            loss = loss + nll_weight * nll
        return PairScores(loss, chosen_reward.detach(), rejected_reward.detach())
    if method == "orpo":
        mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
        # log(p / (1 - p)) of each answer's mean token probability p; log(-expm1(x)) is
        # log(1 - e^x) without losing digits near p = 1
        log_odds = (mean_chosen - mean_rejected) \
            - (_log1m_exp(mean_chosen) - _log1m_exp(mean_rejected))
        loss = nll - beta * F.logsigmoid(log_odds).mean()
        return PairScores(loss, (beta * mean_chosen).detach(), (beta * mean_rejected).detach())
    raise ValueError(f"unknown preference method {method!r}")


def _log1m_exp(x: Any) -> Any:
    import torch

    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


class PreferenceObjective:
    """The training loss of a batch of pairs (what `optimize.loss_module` calls)."""

    def __init__(self, method: str, beta: float, nll_weight: float = 0.0) -> None:
        self.method, self.beta, self.nll_weight = method, beta, nll_weight

    def scores(self, logps: Any, counts: Any, reference: Any) -> PairScores:
        return pair_scores(self.method, self.beta, logps, counts, reference, self.nll_weight)

    def __call__(self, model: Any, batch: dict[str, Any], device: str, precision: str,
                 labels_only: bool = True) -> Any:
        logps, counts = sequence_logps(model, batch, device, precision, labels_only)
        return self.scores(logps, counts, batch.get("reference")).loss


def with_references(model: Any, pairs: list[EncodedPair], batch_size: int, pad_id: int,
                    device: str, precision: str, adapted: Any = None) -> list[EncodedPair]:
    """`pairs` with the reference model's log-probabilities of both answers: `model` as it
    is now (before training), with LoRA adapters (`adapted`) switched off."""
    from contextlib import nullcontext

    import torch

    out: list[EncodedPair] = []
    was_training = model.training
    model.eval()
    off = adapted.disable_adapter() if adapted is not None else nullcontext()
    with off, torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            logps, _ = sequence_logps(model, collate_pairs(chunk, pad_id), device, precision)
            chosen, rejected = logps.tolist()[:len(chunk)], logps.tolist()[len(chunk):]
            out += [replace(p, reference=(c, r))
                    for p, c, r in zip(chunk, chosen, rejected, strict=True)]
    model.train(was_training)
    return out


def pair_metrics(model: Any, pairs: list[EncodedPair], objective: PreferenceObjective,
                 batch_size: int, pad_id: int, device: str, precision: str,
                 labels_only: bool = True) -> dict[str, float]:
    """Loss, reward accuracy and reward margin over `pairs`, without touching gradients."""
    import torch

    was_training = model.training
    model.eval()
    losses, chosen, rejected = [], [], []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate_pairs(chunk, pad_id)
            logps, counts = sequence_logps(model, batch, device, precision, labels_only)
            scores = objective.scores(logps, counts, batch.get("reference"))
            losses.append(float(scores.loss) * len(chunk))
            chosen += scores.chosen.tolist()
            rejected += scores.rejected.tolist()
    model.train(was_training)
    n = max(len(pairs), 1)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"loss": sum(losses) / n,
            "reward_accuracy": sum(m > 0 for m in margins) / n,
            "reward_margin": sum(margins) / n}

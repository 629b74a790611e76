"""Preference metrics on held-out pairs: the log-probability a model gives each answer, and DPO's implicit reward.

For a pair (prompt, chosen, rejected) and a model, ``logp`` is the sum of the answer tokens' log-probabilities given
the prompt. A model *prefers* chosen when logp(chosen) > logp(rejected). Against a reference model, the implicit
reward of an answer is beta * (logp_model - logp_reference) (DPO, Rafailov et al. 2023); reward accuracy is the share
of pairs whose chosen reward exceeds the rejected one, and the reward margin is the mean difference of the two.
"""

from __future__ import annotations

from typing import Any

import torch


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def answer_logps(model, sequences: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int = 8):
    """Summed log-probability of each answer after its prompt, for (prompt_ids, answer_ids) pairs."""
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for batch in _batches(sequences, batch_size):
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        answer = torch.zeros_like(ids, dtype=torch.bool)
        for i, (prompt, reply) in enumerate(batch):
            ids[i, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
            mask[i, : len(prompt) + len(reply)] = 1
            answer[i, len(prompt) : len(prompt) + len(reply)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        out += (logps * answer[:, 1:].to(device)).sum(dim=1).tolist()
    return out


def pair_logps(model, dataset, pad_token_id: int, batch_size: int = 8, max_examples: int | None = None):
    """(chosen, rejected) summed log-probabilities for the pairs of a tokenized preference dataset."""
    rows = list(zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True))
    rows = rows[:max_examples]
    chosen = answer_logps(model, [(p, c) for p, c, _ in rows], pad_token_id, batch_size)
    rejected = answer_logps(model, [(p, r) for p, _, r in rows], pad_token_id, batch_size)
    return chosen, rejected


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def metrics(
    chosen: list[float], rejected: list[float], reference: tuple[list[float], list[float]] | None, beta: float
) -> dict[str, Any]:
    """Log-probabilities and preference of one model; rewards when a reference's log-probabilities are given."""
    out = {
        "pairs": len(chosen),
        "logp_chosen": _mean(chosen),
        "logp_rejected": _mean(rejected),
        "prefers_chosen": _mean([float(c > r) for c, r in zip(chosen, rejected, strict=True)]),
    }
    if reference is not None:
        ref_chosen, ref_rejected = reference
        chosen_rewards = [beta * (c - rc) for c, rc in zip(chosen, ref_chosen, strict=True)]
        rejected_rewards = [beta * (r - rr) for r, rr in zip(rejected, ref_rejected, strict=True)]
        pairs = list(zip(chosen_rewards, rejected_rewards, strict=True))
        out["reward_accuracy"] = _mean([float(c > r) for c, r in pairs])
        out["reward_margin"] = _mean([c - r for c, r in pairs])
    return out

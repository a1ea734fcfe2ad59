"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weights decay; biases and LayerNorm weights (any 1-d parameter) do not."""
    decay, no_decay = [], []
    seen = set()
    for param in model.parameters():  # .parameters() yields a tied weight once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, schedule: str, warmup_steps: int, max_steps: int, lr: float, lr2: float,
                  pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> float:  # fmt: skip
    """Factor applied to the peak learning rate at optimizer step `step` (0-based, before the update).

    linear (LucaOne): 0 -> lr over warmup_steps, then lr -> lr2 linearly, reaching lr2 at max_steps.
    cosine: same warmup, then a half cosine from lr to lr2.  constant: warmup, then lr.
    one_cycle (torch's OneCycleLR, cosine both ways): lr / div_factor -> lr over pct_start of max_steps,
    then down to lr / div_factor / final_div_factor at max_steps.
    """
    if schedule == "one_cycle":
        start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
        # OneCycleLR's phase ends: the peak at pct_start * total - 1, the end at total - 1 (0-based steps).
        peak = max(1.0, pct_start * max_steps - 1)
        last = max(peak + 1, max_steps - 1)
        if step <= peak:
            return _cosine_between(start, 1.0, step / peak)
        return _cosine_between(1.0, end, min(1.0, (step - peak) / (last - peak)))
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr2 / lr
    if schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    if schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: linear, cosine, constant, one_cycle")


def _cosine_between(begin: float, finish: float, progress: float) -> float:
    return finish + (begin - finish) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as the SimCLR paper trains.

    For a parameter w with gradient g in a group with `lars: True`: d = g + weight_decay * w, and the
    step is lr * eta * ||w|| / ||d|| * d (ratio 1 when either norm is 0), through momentum. Groups with
    `lars: False` (biases, norm weights) take plain momentum SGD steps, without weight decay.
    """

    def __init__(self, groups, lr: float, momentum: float = 0.9, trust_coefficient: float = 0.001):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=0.0, lars=True, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if group["lars"]:
                    if group["weight_decay"]:
                        d = d.add(w, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * trust
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                w.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss

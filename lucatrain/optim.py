"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

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


def lr_multiplier(step: int, schedule: str, warmup_steps: int, max_steps: int, lr: float, lr2: float) -> float:
    """Factor applied to the peak learning rate at optimizer step `step` (0-based, before the update).

    linear (LucaOne): 0 -> lr over warmup_steps, then lr -> lr2 linearly, reaching lr2 at max_steps.
    cosine: same warmup, then a half cosine from lr to lr2.  constant: warmup, then lr.
    """
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
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: linear, cosine, constant")

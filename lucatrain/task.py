"""The Task seam: the `nn.Module` DeepSpeed wraps, owning its training step and its evaluation.

A model family's Task subclasses `Task` and implements

    forward(batch, totals) -> (loss, report)     one micro-batch; `report` holds summable tensors
    count_targets(batch) -> {name: count}        what the loss of `batch` is normalised by
    metrics() -> {name: Metric}                  every reported metric, declared once with its direction
    summarize(sums) -> {metric: value}           summed reports (over micro-batches and ranks) -> metrics

and inherits a default `train_step` and `evaluate`, which it may replace: a contrastive Task needs one
forward over the whole local batch (its negatives), or a chunked step for batches beyond memory.

**The loss normaliser, stated once.** The default `train_step` counts each term's targets over all of
this rank's micro-batches, sums the counts over ranks (one all-reduce), and hands the totals to every
forward, which combines its summed per-target losses with `normalised_loss`: each term divided by its
total over the whole step. The losses of all micro-batches and ranks then add up to the per-target mean
over the global batch. The engine's `backward` contract is that it accumulates the gradient of that
*sum* over micro-batches and ranks (it undoes DeepSpeed's own averaging), so the update is exactly that
of one big batch, whatever the split.

**Reports.** `report` values are tensors that are summed over micro-batches, ranks and evaluation
batches, so every rank must report the same keys with the same shapes for every batch (an empty batch
reports zeros), and the trainer all-reduces them in one collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from lucatrain import dist

# The epoch value collators are given for dev/test batches, so evaluation never changes between runs
# of it (masks and augmentations derived from it are the same every time).
EVAL_EPOCH = 0xFFFF_FFFF


@dataclass(frozen=True)
class Metric:
    """A metric a Task reports, declared once: its name and which direction is better."""

    name: str
    higher_is_better: bool

    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than


def lower_is_better(name: str) -> Metric:
    return Metric(name, higher_is_better=False)


def higher_is_better(name: str) -> Metric:
    return Metric(name, higher_is_better=True)


@dataclass
class Split:
    """Rows of a prepared dataset that a Task evaluates on, with the collator that turns them into tensors."""

    name: str
    data: object  # a PreparedDataset
    rows: np.ndarray
    collate: Callable[[dict, int], dict]
    batch_size: int
    columns: tuple[str, ...] | None = None

    def rank_batches(self, world_size: int, rank: int) -> list[tuple[np.ndarray, bool]]:
        """This rank's (rows, is_padding) evaluation batches.

        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each
        one), so ranks short of a batch run a padding batch whose report is discarded.
        """
        per_rank = max(1, math.ceil(len(self.rows) / (world_size * self.batch_size)))
        parts = np.array_split(self.rows, world_size * per_rank)[rank::world_size]
        return [(part, False) if len(part) else (self.rows[:1], True) for part in parts]


class Task(nn.Module):
    """Base class of every family's Task (module docstring)."""

    def forward(self, batch: dict, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch, totals)")

    def count_targets(self, batch: dict) -> dict[str, float]:
        """Targets per loss term in one micro-batch; by default every sample is one target."""
        return {"samples": float(len(batch["sample_ids"]))}

    def metrics(self) -> dict[str, Metric]:
        """Every metric `summarize` can return, with its direction (`best/` selection reads this)."""
        return {"loss": lower_is_better("loss")}

    def summarize(self, sums: dict) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} must implement summarize(sums)")

    # ------------------------------------------------------------------ state that survives a restart

    def run_state(self) -> dict:
        """Non-tensor state the Task keeps between steps (JSON), saved in every checkpoint."""
        return {}

    def load_run_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no run state, but the checkpoint has {sorted(state)}")

    # ------------------------------------------------------------------ the step

    def train_step(self, micro_batches: list[dict], engine) -> dict:
        """One optimizer step over this rank's micro-batches; returns the report summed over them.

        An override must call `engine.backward` and `engine.step` the same number of times on every
        rank (DeepSpeed updates at the accumulation boundary) and return summable values.
        """
        counts: dict[str, float] = {}
        for mb in micro_batches:
            accumulate(counts, self.count_targets(mb))
        totals = dist.all_reduce_dict(counts, engine.device)  # the normaliser (module docstring)

        summed: dict = {}
        for mb in micro_batches:
            loss, report = engine(to_device(mb, engine.device), totals)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates only at the accumulation boundary
            accumulate(summed, as_numbers(report))
        return summed

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, splits: dict[str, Split], engine) -> dict[str, dict[str, float]]:
        """Metrics per split (every rank calls this; results are the same on all)."""
        engine.eval()
        try:
            return {name: self.evaluate_split(split, engine) for name, split in splits.items()}
        finally:
            engine.train()

    def evaluate_split(self, split: Split, engine) -> dict[str, float]:
        """Summed reports over the split, each batch normalised by its own counts, then `summarize`."""
        sums: dict = {}
        for rows, is_padding in split.rank_batches(dist.world_size(), dist.rank()):
            batch = to_device(split.collate(split.data.rows(rows, split.columns), EVAL_EPOCH), engine.device)
            local = {k: float(v) for k, v in self.count_targets(batch).items()}
            _, report = engine(batch, local)
            values = as_numbers(report)
            if is_padding:  # counted as zeros, so every rank joins the all-reduce with the same keys
                values = {k: v * 0.0 for k, v in values.items()}
            accumulate(sums, values)
        return self.summarize(dist.all_reduce_dict(sums, engine.device))


# ---------------------------------------------------------------------------- helpers


def normalised_loss(start: torch.Tensor | None, loss_sums: dict[str, torch.Tensor], weights: dict[str, float],
                    totals: dict[str, float]) -> torch.Tensor:  # fmt: skip
    """The loss of one micro-batch: `start + sum over terms of weight x summed loss / targets in the step`.

    `totals` are the term's targets over the whole optimizer step (all micro-batches and ranks, from
    `count_targets`); a term no sample of the step has adds its empty sum (0) and keeps its parameters
    in the graph. `start` (e.g. a graph-connected zero) may be None.
    """
    loss = start
    for name, loss_sum in loss_sums.items():
        term = weights.get(name, 1.0) * loss_sum / max(totals.get(name, 0), 1)
        loss = term if loss is None else loss + term
    return loss


def accumulate(into: dict, values: dict) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + value


def as_numbers(report: dict[str, torch.Tensor]) -> dict:
    """A report as Python floats (scalars) and float64 numpy arrays (per-label vectors)."""
    return {k: v.item() if v.ndim == 0 else v.detach().cpu().numpy().astype(np.float64) for k, v in report.items()}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

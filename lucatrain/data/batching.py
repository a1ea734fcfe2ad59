"""The epoch plan: which samples form each optimizer step, and which rank gets which of them.

The plan is a pure function of (seed, epoch, dataset fingerprint, lengths, global batch
definition). It never depends on the rank, and on the world size only through the number of
micro-batches a global batch is split into (`world_size * gradient_accumulation_steps`), so every
rank computes the same plan without communicating, and the global sample stream stays the same
when world size and accumulation change with the same product.

Two global batch definitions:
- fixed: `batch_size * accumulation * world_size` consecutive samples of the epoch's permutation;
- token budget (`max_tokens` > 0): the permutation is cut into pools that are sorted by length, so
  a global batch holds sequences of similar length; a global batch is the longest contiguous run
  whose every micro-batch fits `max_tokens` padded tokens. The order of global batches is shuffled
  again so that lengths are not visited short-to-long.

A global batch is split into micro-batches of neighbouring lengths (sorted, then cut into equal
counts), and the micro-batches are dealt to ranks in snake order to balance tokens across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_rng(seed: int, epoch: int, fingerprint: str) -> np.random.Generator:
    """The generator behind one epoch's order: seeded by (seed, epoch, dataset fingerprint)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, int(fingerprint[:16], 16) & 0xFFFFFFFF])


def padded_lengths(residue_lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Tokens a sample occupies after [CLS]/[SEP] and truncation."""
    return np.minimum(residue_lengths.astype(np.int64) + 2, max_length)


def truncation_summary(residue_lengths: np.ndarray, max_length: int, side: str) -> str | None:
    """One log line on what `max_length` cuts off (records and residues), or None when nothing is cut."""
    # No temporary as large as the input: at 10 M records each costs a good part of a second.
    limit = max_length - 2
    longer = residue_lengths[residue_lengths > limit]
    records = int(longer.size)
    if not records:
        return None
    cut = int(longer.sum(dtype=np.int64)) - records * limit
    total = int(residue_lengths.sum(dtype=np.int64))
    size = residue_lengths.size
    return (f"{records} of {size} records ({100 * records / size:.1f}%) are longer than data.max_length={max_length} "
            f"allows and are cut at the {'end' if side == 'right' else 'start'} (data.truncation={side}): {cut:,} of {total:,} residues ({100 * cut / max(total, 1):.1f}%) "
            "are not trained")  # fmt: skip


@dataclass(frozen=True)
class BatchSpec:
    """The global batch definition. `micro_batches_per_step` = world_size x accumulation."""

    micro_batches_per_step: int
    batch_size: int = 8  # fixed mode: samples per micro-batch
    max_tokens: int = 0  # > 0: token-budget mode, padded tokens per micro-batch
    max_length: int = 1026
    sort_pool_size: int = 4096  # token-budget mode: samples sorted together by length

    def order_key(self) -> dict:
        """What the epoch's sequence of global batches depends on, besides seed, epoch and data.

        Fixed mode: only the global batch size, so world size, micro-batch and accumulation may
        change freely with it constant. Token-budget mode: the split count and the budget.
        """
        if self.max_tokens <= 0:
            return {"mode": "fixed", "global_batch": self.batch_size * self.micro_batches_per_step}
        return {
            "mode": "tokens",
            "micro_batches_per_step": self.micro_batches_per_step,
            "max_tokens": self.max_tokens,
            "max_length": self.max_length,
            "sort_pool_size": self.sort_pool_size,
        }


def plan_epoch(lengths: np.ndarray, spec: BatchSpec, seed: int, epoch: int, fingerprint: str) -> list[np.ndarray]:
    """Global batches of one epoch, each an array of row indices into the prepared dataset.

    `lengths` are residue counts (PreparedDataset.lengths). Incomplete tail batches are dropped
    (every micro-batch of a step must hold at least one sample on every rank).
    """
    order, ends = plan_epoch_flat(lengths, spec, seed, epoch, fingerprint)
    return batches_of(order, ends)


def plan_epoch_flat(lengths: np.ndarray, spec: BatchSpec, seed: int, epoch: int, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    """`plan_epoch` as (every planned row in order, the end of each global batch in it): at 10 M
    records a million small arrays cost seconds to build, the flat form a fraction of one."""
    rng = epoch_rng(seed, epoch, fingerprint)
    order = rng.permutation(len(lengths))
    if spec.max_tokens <= 0:
        global_size = spec.batch_size * spec.micro_batches_per_step
        n_steps = len(order) // global_size
        return order[: n_steps * global_size], np.arange(1, n_steps + 1, dtype=np.int64) * global_size

    tokens = padded_lengths(lengths, spec.max_length)
    batches: list[np.ndarray] = []
    for start in range(0, len(order), spec.sort_pool_size):
        pool = order[start : start + spec.sort_pool_size]
        pool = pool[np.argsort(tokens[pool], kind="stable")]
        batches.extend(_cut_by_token_budget(pool, tokens[pool], spec))
    # Shuffle whole global batches so training does not sweep each pool from short to long.
    shuffled = [batches[i] for i in rng.permutation(len(batches))]
    if not shuffled:
        return order[:0], np.zeros(0, dtype=np.int64)
    return np.concatenate(shuffled), np.cumsum([len(batch) for batch in shuffled], dtype=np.int64)


def batches_of(order: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """The global batches of a flat plan, as views of `order`."""
    ends = ends.tolist()
    return [order[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def _cut_by_token_budget(pool: np.ndarray, pool_tokens: np.ndarray, spec: BatchSpec) -> list[np.ndarray]:
    """Cut a length-sorted pool into global batches of at most M * floor(max_tokens / L_max) samples."""
    m = spec.micro_batches_per_step
    out = []
    i = 0
    while i < len(pool):
        # Capacity shrinks as the run's longest sequence grows; iterate to the fixed point.
        n = m * max(1, spec.max_tokens // int(pool_tokens[i]))
        while True:
            end = min(i + n, len(pool))
            fit = m * max(1, spec.max_tokens // int(pool_tokens[end - 1]))
            if fit >= end - i:
                break
            n = fit
        if end - i >= m:
            out.append(pool[i:end])
        i = end
    return out


def split_global_batch(batch: np.ndarray, lengths: np.ndarray, num_micro_batches: int) -> list[np.ndarray]:
    """Sort by length and cut into `num_micro_batches` near-equal runs (neighbouring lengths pad little)."""
    ordered = batch[np.argsort(lengths[batch], kind="stable")]
    return [part for part in np.array_split(ordered, num_micro_batches)]


def rank_micro_batches(
    batch: np.ndarray, lengths: np.ndarray, world_size: int, rank: int, accumulation: int
) -> list[np.ndarray]:
    """This rank's `accumulation` micro-batches of one global batch.

    Micro-batches (sorted short to long) are dealt in snake order, 0..W-1 then W-1..0, so each rank
    gets a mix of short and long ones and ranks finish their steps at about the same time.
    """
    parts = split_global_batch(batch, lengths, world_size * accumulation)
    mine = []
    for k, part in enumerate(parts):
        lap, pos = divmod(k, world_size)
        owner = pos if lap % 2 == 0 else world_size - 1 - pos
        if owner == rank:
            mine.append(part)
    return mine

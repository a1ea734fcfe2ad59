"""Tokenize, mask and pad a micro-batch of records into tensors.

Masking randomness is *counter-based*: every random number is a hash of
(seed, epoch, sample_id, position). A sample therefore gets the same mask whichever
micro-batch, worker, rank or world size it lands in, and a resumed run re-creates exactly the masks
an uninterrupted run would have drawn, without any RNG state to carry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
import torch

from lucatrain.data import alphabet

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mix, vectorised (uint64 arithmetic wraps by design)."""
    x = np.array(x, dtype=_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


@functools.lru_cache(maxsize=64)
def _epoch_base(seed: int, epoch: int) -> int:
    base = _splitmix64(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=_U64))
    return int(_splitmix64(base ^ np.array([epoch], dtype=_U64))[0])


def sample_keys(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per sample, from (seed, epoch, sample_id)."""
    return _splitmix64(_U64(_epoch_base(seed, epoch)) ^ np.asarray(sample_ids, dtype=np.int64).astype(_U64))


# Every residue position draws a 32-bit hash (MurmurHash3's finaliser) that decides whether it is
# selected. A selected position's 64-bit hash (SplitMix64) is cut into two independent 21-bit
# fields: what happens to it ([MASK] / random / kept) and which random residue. 1/2**21 resolution
# is far finer than any masking probability needs.
FIELD_BITS = 21
FIELD_ACTION, FIELD_REPLACEMENT = 22, 1  # bit offsets


def _threshold(probability: float) -> int:
    """A field value below this has the given probability."""
    return int(round(probability * (1 << FIELD_BITS)))


@dataclass(frozen=True)
class MaskingConfig:
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1


_GOLDEN32 = 0x9E3779B9
_GOLDEN64 = 0x9E3779B97F4A7C15


@numba.njit(cache=True, nogil=True)
def _collate_kernel(joined, starts, n_residues, obj_types, keys, lookup, do_mask, select_below, mask_cut, random_cut,
                    gene_ids, prot_ids, input_ids, labels, token_types, attention_mask):  # fmt: skip
    """Tokenize, pad and mask a micro-batch in one pass over its residues (compiled by numba).

    Fills the preallocated (B, W) outputs (input_ids zeros, labels IGNORE_INDEX, the rest zeros).
    Returns -1, or the index into `joined` of the first byte that is not a valid residue.
    """
    u64 = np.uint64
    low32, low21 = u64(0xFFFFFFFF), u64((1 << FIELD_BITS) - 1)
    for i in range(len(n_residues)):
        n, kind, key = n_residues[i], obj_types[i], u64(keys[i])
        last = n + 1
        for col in range(last + 1):
            attention_mask[i, col] = 1
            token_types[i, col] = kind
        input_ids[i, 0] = alphabet.CLS_ID
        input_ids[i, last] = alphabet.SEP_ID
        for col in range(1, last):
            token = lookup[kind * 256 + joined[starts[i] + col - 1]]
            if token < 0:
                return starts[i] + col - 1
            input_ids[i, col] = token
        if not do_mask or n == 0:
            continue

        key_high = key >> u64(32)
        selected_any, lowest, lowest_col = False, u64(0xFFFFFFFF), 1
        for col in range(1, last + 1):
            is_fallback = col == last  # after the residues: select the lowest draw if none was selected
            if is_fallback:
                if selected_any:
                    break
                target = lowest_col
            else:
                draw = (key_high + u64(col) * u64(_GOLDEN32)) & low32  # MurmurHash3 fmix32
                draw ^= draw >> u64(16)
                draw = (draw * u64(0x85EBCA6B)) & low32
                draw ^= draw >> u64(13)
                draw = (draw * u64(0xC2B2AE35)) & low32
                draw ^= draw >> u64(16)
                if draw < lowest:
                    lowest, lowest_col = draw, col
                if draw >= select_below:
                    continue
                selected_any = True
                target = col
            # The selected residue: keep its label, then [MASK] / random residue / unchanged.
            labels[i, target] = input_ids[i, target]
            h = key + u64(target) * u64(_GOLDEN64)  # SplitMix64
            h = (h ^ (h >> u64(30))) * u64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> u64(27))) * u64(0x94D049BB133111EB)
            h ^= h >> u64(31)
            action = (h >> u64(FIELD_ACTION)) & low21
            if action < mask_cut:
                input_ids[i, target] = alphabet.MASK_ID
            elif action < mask_cut + random_cut:
                pick = (h >> u64(FIELD_REPLACEMENT)) & low21
                choices = gene_ids if kind == alphabet.GENE else prot_ids
                input_ids[i, target] = choices[(pick * u64(len(choices))) >> u64(FIELD_BITS)]
    return -1


class Collator:
    """rows (from PreparedDataset.rows) + epoch -> dict of tensors for one micro-batch.

    Output, padded right to the longest sequence in the micro-batch:
      input_ids, token_type_ids, attention_mask, labels: (B, L) int64
      sample_ids: (B,) int64; num_tokens: () real tokens including CLS/SEP.
    `masking=None` produces no labels (inference / embedding).
    `labels(rows, n_residues, cuts, width) -> {name: array}` (a model family's label encoder) adds its
    label tensors, aligned with the tokens: row i keeps `n_residues[i]` residues after `cuts[i]` were
    cut from the left by truncation, padded to `width` tokens ([CLS] first).
    """

    def __init__(self, max_length: int, truncation: str = "right", masking: MaskingConfig | None = None, seed: int = 0,
                 labels=None):  # fmt: skip
        self.max_length = max_length
        self.truncation = truncation
        self.masking = masking
        self.seed = seed
        self.labels = labels

    def __call__(self, rows: dict, epoch: int) -> dict[str, torch.Tensor]:
        obj_types = np.asarray(rows["obj_type"], dtype=np.int64)
        sample_ids = np.asarray(rows["sample_id"], dtype=np.int64)
        residues = [self._truncate(seq) for seq in rows["seq"]]
        n_residues = np.array([len(seq) for seq in residues], dtype=np.int64)
        starts = np.zeros_like(n_residues)
        np.cumsum(n_residues[:-1], out=starts[1:])
        joined = np.frombuffer("".join(residues).encode("ascii", errors="replace"), dtype=np.uint8)
        batch, width = len(residues), int(n_residues.max()) + 2

        input_ids = np.zeros((batch, width), dtype=np.int64)  # [PAD] is 0
        labels = np.full((batch, width), alphabet.IGNORE_INDEX, dtype=np.int64)
        token_types = np.zeros((batch, width), dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        m = self.masking or MaskingConfig()
        bad = _collate_kernel(
            joined, starts, n_residues, obj_types, sample_keys(self.seed, epoch, sample_ids), alphabet.LOOKUP_FLAT,
            self.masking is not None, np.uint64(min(int(m.mask_prob * 2**32), 2**32 - 1)),
            np.uint64(_threshold(m.mask_token_prob)), np.uint64(_threshold(m.random_token_prob)),
            alphabet.GENE_RANDOM_IDS, alphabet.PROT_RANDOM_IDS, input_ids, labels, token_types, attention_mask,
        )  # fmt: skip
        if bad >= 0:
            row = int(np.searchsorted(starts, bad, side="right")) - 1
            alphabet.residue_ids(residues[row], int(obj_types[row]))  # raises, naming the letter

        out = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_types),
            "attention_mask": torch.from_numpy(attention_mask),
            "sample_ids": torch.from_numpy(sample_ids),
            "num_tokens": torch.from_numpy(np.asarray(n_residues.sum() + 2 * batch)),
        }
        if self.masking is not None:
            out["labels"] = torch.from_numpy(labels)
        if self.labels is not None:
            lengths = np.array([len(seq) for seq in rows["seq"]], dtype=np.int64)
            cuts = lengths - n_residues if self.truncation == "left" else np.zeros_like(lengths)
            encoded = self.labels(rows, n_residues, cuts, width)
            out.update({key: torch.from_numpy(value) for key, value in encoded.items()})
        return out

    def _truncate(self, seq: str) -> str:
        keep = self.max_length - 2
        if len(seq) <= keep:
            return seq
        return seq[:keep] if self.truncation == "right" else seq[len(seq) - keep :]

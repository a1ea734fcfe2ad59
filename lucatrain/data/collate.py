"""Tokenize, mask and pad a micro-batch of records into tensors.

Masking randomness is *counter-based*: every random number is a hash of
(seed, epoch, sample_id, position, stream). A sample therefore gets the same mask whichever
micro-batch, worker, rank or world size it lands in, and a resumed run re-creates exactly the masks
an uninterrupted run would have drawn, without any RNG state to carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lucatrain.data import alphabet

# Streams separate the independent random draws made for one (sample, position).
_STREAM_SELECT, _STREAM_ACTION, _STREAM_REPLACEMENT = 1, 2, 3
# The epoch value used for dev/test masks, so evaluation masks never change between evaluations.
EVAL_EPOCH = 0xFFFF_FFFF

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mix, vectorised (uint64 arithmetic wraps by design)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def sample_keys(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per sample, from (seed, epoch, sample_id)."""
    base = _splitmix64(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=_U64))
    base = _splitmix64(base ^ np.array([epoch], dtype=_U64))
    return _splitmix64(base ^ np.asarray(sample_ids, dtype=np.int64).astype(_U64))


def uniform(keys: np.ndarray, length: int, stream: int) -> np.ndarray:
    """(B, length) floats in [0, 1): draw `stream` at positions 0..length-1 of each keyed sample."""
    positions = np.arange(length, dtype=_U64) * _U64(4) + _U64(stream)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(keys[:, None] + positions[None, :] * _U64(0x9E3779B97F4A7C15))
    return (mixed >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class MaskingConfig:
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1


def mask_tokens(
    input_ids: np.ndarray, token_types: np.ndarray, residue_mask: np.ndarray, keys: np.ndarray, cfg: MaskingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """BERT-style masking of residue positions, in place on a copy.

    input_ids, token_types, residue_mask: (B, L); residue_mask is True on residues (not CLS/SEP/PAD).
    Selects round(mask_prob * n) residues per sequence (at least one), then of those replaces
    mask_token_prob with [MASK], random_token_prob with a random residue *of the same molecule*, and
    keeps the rest. Returns (masked_ids, labels) with labels = original id on selected positions and
    IGNORE_INDEX elsewhere.
    """
    batch, length = input_ids.shape
    with np.errstate(over="ignore"):
        select_u = uniform(keys, length, _STREAM_SELECT)
        action_u = uniform(keys, length, _STREAM_ACTION)
        replace_u = uniform(keys, length, _STREAM_REPLACEMENT)

    # Rank residues by their draw; the k smallest are selected (k exact, so statistics are tight).
    select_u[~residue_mask] = np.inf
    rank = np.argsort(np.argsort(select_u, axis=1, kind="stable"), axis=1, kind="stable")
    n_residues = residue_mask.sum(axis=1)
    n_select = np.maximum(1, np.rint(cfg.mask_prob * n_residues)).astype(np.int64)
    n_select = np.minimum(n_select, n_residues)  # a record always has >= 1 residue
    selected = (rank < n_select[:, None]) & residue_mask

    labels = np.where(selected, input_ids, alphabet.IGNORE_INDEX)
    masked = input_ids.copy()
    to_mask = selected & (action_u < cfg.mask_token_prob)
    to_random = selected & (action_u >= cfg.mask_token_prob) & (action_u < cfg.mask_token_prob + cfg.random_token_prob)
    masked[to_mask] = alphabet.MASK_ID

    # Random replacements come from the molecule's own canonical residues only.
    is_gene = token_types == alphabet.GENE
    gene_pick = alphabet.GENE_RANDOM_IDS[(replace_u * len(alphabet.GENE_RANDOM_IDS)).astype(np.int64)]
    prot_pick = alphabet.PROT_RANDOM_IDS[(replace_u * len(alphabet.PROT_RANDOM_IDS)).astype(np.int64)]
    masked[to_random] = np.where(is_gene, gene_pick, prot_pick)[to_random]
    return masked, labels


class Collator:
    """rows (from PreparedDataset.rows) + epoch -> dict of tensors for one micro-batch.

    Output, padded right to the longest sequence in the micro-batch:
      input_ids, token_type_ids, attention_mask, labels: (B, L) int64
      sample_ids: (B,) int64; num_tokens: () real tokens including CLS/SEP.
    `masking=None` produces no labels (inference / embedding).
    """

    def __init__(self, max_length: int, truncation: str = "right", masking: MaskingConfig | None = None, seed: int = 0):
        self.max_length = max_length
        self.truncation = truncation
        self.masking = masking
        self.seed = seed

    def __call__(self, rows: dict, epoch: int) -> dict[str, torch.Tensor]:
        encoded = [
            alphabet.encode(seq, obj_type, self.max_length, self.truncation)
            for seq, obj_type in zip(rows["seq"], rows["obj_type"])
        ]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        batch, width = len(encoded), int(lengths.max())
        input_ids = np.full((batch, width), alphabet.PAD_ID, dtype=np.int64)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = ids
        positions = np.arange(width)[None, :]
        attention_mask = positions < lengths[:, None]
        obj_types = np.asarray(rows["obj_type"], dtype=np.int64)
        token_types = np.where(attention_mask, obj_types[:, None], 0)
        sample_ids = np.asarray(rows["sample_id"], dtype=np.int64)

        out = {
            "token_type_ids": torch.from_numpy(token_types),
            "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
            "sample_ids": torch.from_numpy(sample_ids),
            "num_tokens": torch.tensor(int(lengths.sum())),
        }
        if self.masking is None:
            out["input_ids"] = torch.from_numpy(input_ids)
            return out
        residue_mask = (positions >= 1) & (positions < lengths[:, None] - 1)
        keys = sample_keys(self.seed, epoch, sample_ids)
        masked, labels = mask_tokens(input_ids, token_types, residue_mask, keys, self.masking)
        out["input_ids"] = torch.from_numpy(masked)
        out["labels"] = torch.from_numpy(labels)
        return out

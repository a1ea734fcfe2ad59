"""Tokenize, mask and pad a micro-batch of records into tensors.

Masking randomness is *counter-based*: every random number is a hash of
(seed, epoch, sample_id, position). A sample therefore gets the same mask whichever
micro-batch, worker, rank or world size it lands in, and a resumed run re-creates exactly the masks
an uninterrupted run would have drawn, without any RNG state to carry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from lucatrain.data import alphabet

# The epoch value used for dev/test masks, so evaluation masks never change between evaluations.
EVAL_EPOCH = 0xFFFF_FFFF

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


def select_hash(keys: np.ndarray, length: int) -> np.ndarray:
    """(B, length) uint32 hashes deciding selection: MurmurHash3's 32-bit finaliser.

    Selection is the only decision made at every position, so it gets a 32-bit hash (numpy
    vectorises 32-bit multiplies, not 64-bit ones); the few selected positions then get the 64-bit
    hash for their other decisions.
    """
    positions = np.arange(length, dtype=np.uint32) * np.uint32(0x9E3779B9)
    x = (keys >> _U64(32)).astype(np.uint32)[:, None] + positions[None, :]
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


# A selected position's 64-bit hash is cut into two independent 21-bit fields: what happens to it
# ([MASK] / random / kept) and which random residue. 1/2**21 resolution is far finer than any
# masking probability needs.
FIELD_BITS = 21
FIELD_ACTION, FIELD_REPLACEMENT = 22, 1  # bit offsets
_FIELD_MASK = _U64((1 << FIELD_BITS) - 1)


def position_hash(keys: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """64-bit hashes of positions `cols` of the samples keyed by `keys[rows]`."""
    with np.errstate(over="ignore"):
        return _splitmix64(keys[rows] + cols.astype(_U64) * _U64(0x9E3779B97F4A7C15))


def hash_field(hashes: np.ndarray, offset: int) -> np.ndarray:
    """The 21-bit field at `offset` as int64 in [0, 2**21)."""
    return ((hashes >> _U64(offset)) & _FIELD_MASK).astype(np.int64)


def _threshold(probability: float) -> int:
    """A field value below this has the given probability."""
    return int(round(probability * (1 << FIELD_BITS)))


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
    Selects each residue with probability mask_prob (at least one per sequence), then of those replaces
    mask_token_prob with [MASK], random_token_prob with a random residue *of the same molecule*, and
    keeps the rest. Returns (masked_ids, labels) with labels = original id on selected positions and
    IGNORE_INDEX elsewhere.
    """
    # Selection is decided for every position from a 32-bit hash (the hot loop: each line below is
    # one numpy pass over B x L); the ~15% selected positions then get a 64-bit hash whose fields
    # decide [MASK] / random / kept and which random residue.
    select_draw = select_hash(keys, input_ids.shape[1])  # (B, L) uint32
    selected = select_draw < np.uint32(min(int(cfg.mask_prob * 2**32), 2**32 - 1))
    selected &= residue_mask
    empty = ~selected.any(axis=1)
    if empty.any():  # a sequence with no selected residue gets its lowest draw
        rows = np.flatnonzero(empty)
        draws = np.where(residue_mask[rows], select_draw[rows], np.uint32(2**32 - 1))
        selected[rows, np.argmin(draws, axis=1)] = True

    flat = np.flatnonzero(selected)  # flat (row-major) indices of the selected positions
    labels = np.full(input_ids.shape, alphabet.IGNORE_INDEX, dtype=np.int64)
    labels.reshape(-1)[flat] = input_ids.reshape(-1)[flat]
    masked = input_ids.copy()
    rows, cols = np.divmod(flat, input_ids.shape[1])
    chosen = position_hash(keys, rows, cols)  # (N,) 64-bit hashes of the selected positions
    action = hash_field(chosen, FIELD_ACTION)
    mask_cut = _threshold(cfg.mask_token_prob)
    to_mask = action < mask_cut
    to_random = (action >= mask_cut) & (action < mask_cut + _threshold(cfg.random_token_prob))
    masked_flat = masked.reshape(-1)  # a view: writes land in `masked`
    masked_flat[flat[to_mask]] = alphabet.MASK_ID

    # Random replacements come from the molecule's own canonical residues only.
    random_at = flat[to_random]
    pick = hash_field(chosen[to_random], FIELD_REPLACEMENT)
    is_gene = token_types.reshape(-1)[random_at] == alphabet.GENE
    gene_choice = alphabet.GENE_RANDOM_IDS[(pick * len(alphabet.GENE_RANDOM_IDS)) >> FIELD_BITS]
    prot_choice = alphabet.PROT_RANDOM_IDS[(pick * len(alphabet.PROT_RANDOM_IDS)) >> FIELD_BITS]
    masked_flat[random_at] = np.where(is_gene, gene_choice, prot_choice)
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
        obj_types = np.asarray(rows["obj_type"], dtype=np.int64)
        sample_ids = np.asarray(rows["sample_id"], dtype=np.int64)
        residues = [self._truncate(seq) for seq in rows["seq"]]
        n_residues = np.array([len(seq) for seq in residues], dtype=np.int64)
        lengths = n_residues + 2  # [CLS] ... [SEP]
        batch, width = len(residues), int(lengths.max())

        # Tokenize the whole micro-batch with one table lookup: all residues joined into one byte
        # string, each byte looked up in its molecule's table.
        joined = np.frombuffer("".join(residues).encode("ascii", errors="replace"), dtype=np.uint8)
        table_offset = np.repeat(obj_types * 256, n_residues)  # row of LOOKUP_FLAT per byte
        table_offset += joined
        ids = alphabet.LOOKUP_FLAT.take(table_offset)
        if ids.size and ids.min() < 0:
            bad_row = int(np.searchsorted(np.cumsum(n_residues), np.flatnonzero(ids < 0)[0], side="right"))
            alphabet.residue_ids(residues[bad_row], int(obj_types[bad_row]))  # raises, naming the letter

        positions = np.arange(width)[None, :]
        attention_mask = positions < lengths[:, None]
        residue_mask = attention_mask.copy()  # minus [CLS] and [SEP]
        residue_mask[:, 0] = False
        residue_mask[np.arange(batch), lengths - 1] = False
        input_ids = np.zeros((batch, width), dtype=np.int64)  # [PAD] is 0
        input_ids[:, 0] = alphabet.CLS_ID
        input_ids[residue_mask] = ids  # row-major order = concatenation order
        input_ids[np.arange(batch), lengths - 1] = alphabet.SEP_ID
        token_types = attention_mask * obj_types[:, None]  # 0 on padding

        out = {
            "token_type_ids": torch.from_numpy(token_types),
            "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
            "sample_ids": torch.from_numpy(sample_ids),
            "num_tokens": torch.from_numpy(np.asarray(lengths.sum())),
        }
        if self.masking is None:
            out["input_ids"] = torch.from_numpy(input_ids)
            return out
        keys = sample_keys(self.seed, epoch, sample_ids)
        masked, labels = mask_tokens(input_ids, token_types, residue_mask, keys, self.masking)
        out["input_ids"] = torch.from_numpy(masked)
        out["labels"] = torch.from_numpy(labels)
        return out

    def _truncate(self, seq: str) -> str:
        keep = self.max_length - 2
        if len(seq) <= keep:
            return seq
        return seq[:keep] if self.truncation == "right" else seq[len(seq) - keep :]

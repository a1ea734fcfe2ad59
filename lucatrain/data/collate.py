"""Tokenize, mask and pad a micro-batch of records into tensors.

Masking randomness is *counter-based*: every random number is a hash of
(seed, epoch, sample_id, position). A sample therefore gets the same mask whichever
micro-batch, worker, rank or world size it lands in, and a resumed run re-creates exactly the masks
an uninterrupted run would have drawn, without any RNG state to carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lucatrain.data import alphabet

# The epoch value used for dev/test masks, so evaluation masks never change between evaluations.
EVAL_EPOCH = 0xFFFF_FFFF

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mix, vectorised (uint64 arithmetic wraps by design).

    Works in place on a copy of `x` (hashing is the collate's largest cost; temporaries add ~40%).
    """
    x = np.array(x, dtype=_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def sample_keys(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per sample, from (seed, epoch, sample_id)."""
    base = _splitmix64(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=_U64))
    base = _splitmix64(base ^ np.array([epoch], dtype=_U64))
    return _splitmix64(base ^ np.asarray(sample_ids, dtype=np.int64).astype(_U64))


# One 64-bit hash per (sample, position) is cut into three independent 21-bit fields: whether the
# residue is selected, what happens to it ([MASK] / random / kept), and which random residue.
# 1/2**21 resolution is far finer than any masking probability needs.
FIELD_BITS = 21
FIELD_SELECT, FIELD_ACTION, FIELD_REPLACEMENT = 43, 22, 1  # bit offsets
_FIELD_MASK = _U64((1 << FIELD_BITS) - 1)


def position_hash(keys: np.ndarray, length: int) -> np.ndarray:
    """(B, length) uint64 hashes of positions 0..length-1 of each keyed sample."""
    positions = np.arange(length, dtype=_U64) * _U64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        return _splitmix64(keys[:, None] + positions[None, :])


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
    hashes = position_hash(keys, input_ids.shape[1])  # (B, L)

    # Selection: a residue whose select field falls under the threshold. Integer compares on the
    # hash, no floats and no sorting: this is the only pass over every position.
    select_field = np.where(residue_mask, hash_field(hashes, FIELD_SELECT), 1 << FIELD_BITS)
    selected = select_field < _threshold(cfg.mask_prob)
    empty = ~selected.any(axis=1)
    if empty.any():  # a sequence with no selected residue gets its lowest draw
        rows = np.flatnonzero(empty)
        selected[rows, np.argmin(select_field[rows], axis=1)] = True

    labels = np.where(selected, input_ids, alphabet.IGNORE_INDEX)
    masked = input_ids.copy()
    # What happens to each selected residue: only ~15% of positions from here on.
    flat = np.flatnonzero(selected)  # flat (row-major) indices of the selected positions
    chosen = hashes.reshape(-1)[flat]
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
        residue_mask = (positions >= 1) & (positions < lengths[:, None] - 1)
        input_ids = np.zeros((batch, width), dtype=np.int64)  # [PAD] is 0
        input_ids[:, 0] = alphabet.CLS_ID
        input_ids[residue_mask] = ids  # row-major order = concatenation order
        input_ids[np.arange(batch), lengths - 1] = alphabet.SEP_ID
        token_types = np.where(attention_mask, obj_types[:, None], 0)

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

"""A plain-numpy reference of the collate's masking, to check the compiled kernel against exactly.

Test-only: it spells out the same counter-based rules as lucatrain.data.collate's kernel, one
numpy pass at a time.
"""

import numpy as np

from lucatrain.data import alphabet
from lucatrain.data.collate import (
    _U64,
    FIELD_ACTION,
    FIELD_BITS,
    FIELD_REPLACEMENT,
    MaskingConfig,
    _splitmix64,
    _threshold,
)

_FIELD_MASK = _U64((1 << FIELD_BITS) - 1)


def position_hash(keys: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """64-bit hashes of positions `cols` of the samples keyed by `keys[rows]`."""
    with np.errstate(over="ignore"):
        return _splitmix64(keys[rows] + cols.astype(_U64) * _U64(0x9E3779B97F4A7C15))


def hash_field(hashes: np.ndarray, offset: int) -> np.ndarray:
    """The 21-bit field at `offset` as int64 in [0, 2**21)."""
    return ((hashes >> _U64(offset)) & _FIELD_MASK).astype(np.int64)


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



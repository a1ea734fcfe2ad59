"""The LucaOne gene_prot vocabulary and a vectorized tokenizer.

39 tokens; the order below *is* the id assignment (LucaOne/LucaVirus checkpoints depend on it).
Nucleotides are rewritten to the digits 1-5 before lookup so that DNA/RNA letters never share an
id with amino-acid letters: A->1, T/U->2, C->3, G->4, anything else (N, IUPAC codes) ->5.

Tokenizing is a byte lookup table applied with numpy: one table per molecule type maps each
ASCII byte straight to its token id, so a 3 kb sequence costs one `np.frombuffer` and one
fancy-index, not 3,000 Python dict lookups.
"""

from __future__ import annotations

import numpy as np

VOCAB: tuple[str, ...] = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "1", "2", "3", "4", "5",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", "J", ".", "-", "*",
)  # fmt: skip
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)  # 39

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
IGNORE_INDEX = -100

# Molecule types, used as token_type_ids (LucaOne: gene = 0, protein = 1).
GENE, PROT = 0, 1
OBJ_TYPE_NAMES = {"gene": GENE, "prot": PROT}

# Letters accepted in a gene record. A/C/G/T/U map to 1-4; the IUPAC ambiguity codes and N map
# to 5, as LucaOne does. Anything else (digits, 'J', '*', ...) is a malformed record.
GENE_LETTERS = "ACGTUNRYSWKMBDHV"
# Every upper-case letter is in the vocabulary, plus '.', '-' and '*'; lower case is upper-cased.
PROT_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ.-*"

# Residues a masked position may be replaced with (the "10% random" case): the same molecule's
# canonical letters only, never a special token and never the other molecule's letters.
GENE_RANDOM_IDS = np.array([TOKEN_TO_ID[c] for c in "1234"], dtype=np.int64)
PROT_RANDOM_IDS = np.array([TOKEN_TO_ID[c] for c in "ACDEFGHIKLMNPQRSTVWY"], dtype=np.int64)


def _gene_table() -> np.ndarray:
    table = np.full(256, -1, dtype=np.int64)
    for letter in GENE_LETTERS:
        digit = {"A": "1", "T": "2", "U": "2", "C": "3", "G": "4"}.get(letter, "5")
        table[ord(letter)] = table[ord(letter.lower())] = TOKEN_TO_ID[digit]
    return table


def _prot_table() -> np.ndarray:
    table = np.full(256, -1, dtype=np.int64)
    for letter in PROT_LETTERS:
        table[ord(letter)] = table[ord(letter.lower())] = TOKEN_TO_ID[letter]
    return table


# Index with GENE or PROT. -1 marks a byte that is not a valid residue for that molecule.
LOOKUP_TABLES = (_gene_table(), _prot_table())
# Both tables end to end, to look up a whole micro-batch at once: index obj_type * 256 + byte.
LOOKUP_FLAT = np.concatenate(LOOKUP_TABLES)


def residue_ids(seq: str, obj_type: int) -> np.ndarray:
    """Token ids of the residues of `seq` (no CLS/SEP). Raises ValueError on an invalid letter."""
    raw = np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)
    ids = LOOKUP_TABLES[obj_type][raw]
    if ids.size and ids.min() < 0:
        bad = sorted({seq[i] for i in np.flatnonzero(ids < 0)[:20]})
        kind = "gene" if obj_type == GENE else "prot"
        raise ValueError(f"invalid {kind} residue(s) {bad!r} at position {int(np.argmax(ids < 0))}")
    return ids


def first_invalid_residue(seq: str, obj_type: int) -> tuple[int, str] | None:
    """(position, letter) of the first letter not allowed for `obj_type`, or None if all valid."""
    raw = np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)
    bad = np.flatnonzero(LOOKUP_TABLES[obj_type][raw] < 0)
    if bad.size == 0:
        return None
    return int(bad[0]), seq[int(bad[0])]


def encode(seq: str, obj_type: int, max_length: int, truncation: str = "right") -> np.ndarray:
    """`[CLS] residues [SEP]` as int64 ids, at most `max_length` long (CLS and SEP count).

    truncation="right" keeps the start of the sequence, "left" keeps the end.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (CLS + one residue + SEP), got {max_length}")
    ids = residue_ids(seq, obj_type)
    keep = max_length - 2
    if ids.size > keep:
        ids = ids[:keep] if truncation == "right" else ids[ids.size - keep :]
    out = np.empty(ids.size + 2, dtype=np.int64)
    out[0], out[1:-1], out[-1] = CLS_ID, ids, SEP_ID
    return out


def decode(ids) -> str:
    """Tokens joined by spaces; for debugging and tests."""
    return " ".join(VOCAB[int(i)] for i in ids)

"""DNA barcode tokenisation for a BarcodeBERT-style tower: non-overlapping k-mers of a padded barcode.

A barcode is upper-cased, cut or right-padded with N to `length` nucleotides (660, the COI barcode
region), and split into `length // k` non-overlapping k-mers. The vocabulary keeps BarcodeBERT's
order, as CLIBD uses it, so its checkpoints' embedding rows line up:

    0 [MASK]   1 [CLS]   2 [UNK]   3 .. 3 + 4^k - 1: the ACGT k-mers in lexicographic order   4^k + 3: [PAD]

A k-mer holding any letter other than A, C, G, T (N, an IUPAC ambiguity code) is [UNK]. Unlike CLIBD,
k-mers made only of the padding are [PAD] and masked out (`attention_mask` 0), so pooling and attention
never see the padding; a barcode starts with [CLS].
"""

from __future__ import annotations

import numpy as np

MASK_ID, CLS_ID, UNK_ID = 0, 1, 2
NUM_SPECIALS = 3
BARCODE_LENGTH = 660

_CODE = np.full(256, -1, dtype=np.int64)  # byte -> 0..3 for A, C, G, T (either case), -1 otherwise
for _index, _letter in enumerate("ACGT"):
    _CODE[ord(_letter)] = _CODE[ord(_letter.lower())] = _index


def vocab_size(k: int) -> int:
    return NUM_SPECIALS + 4**k + 1


def pad_id(k: int) -> int:
    return NUM_SPECIALS + 4**k


def kmer_tokens(barcodes: list[str], k: int = 4, length: int = BARCODE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, 1 + length // k) int64, for a batch of barcodes."""
    if k < 1 or length < k:
        raise ValueError(f"need 1 <= k <= length, got k={k}, length={length}")
    n_kmers = length // k
    codes = np.full((len(barcodes), n_kmers * k), -1, dtype=np.int64)
    real = np.zeros((len(barcodes), n_kmers * k), dtype=bool)
    for row, barcode in enumerate(barcodes):
        raw = np.frombuffer(barcode.encode("ascii", errors="replace")[: n_kmers * k], dtype=np.uint8)
        codes[row, : raw.size] = _CODE[raw]
        real[row, : raw.size] = True
    codes = codes.reshape(len(barcodes), n_kmers, k)
    valid = (codes >= 0).all(axis=2)
    weights = 4 ** np.arange(k - 1, -1, -1, dtype=np.int64)  # the first letter is the most significant
    ids = np.where(valid, NUM_SPECIALS + (np.maximum(codes, 0) * weights).sum(axis=2), UNK_ID)
    used = real.reshape(len(barcodes), n_kmers, k).any(axis=2)  # a k-mer with at least one real letter
    ids = np.where(used, ids, pad_id(k))
    input_ids = np.concatenate([np.full((len(barcodes), 1), CLS_ID, dtype=np.int64), ids], axis=1)
    attention_mask = np.concatenate([np.ones((len(barcodes), 1), dtype=np.int64), used.astype(np.int64)], axis=1)
    return input_ids, attention_mask

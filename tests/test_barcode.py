"""BarcodeBERT-style k-mer tokens (lucatrain/data/barcode.py), against a vocabulary written out here."""

import itertools

import numpy as np
import pytest

from lucatrain.data.barcode import CLS_ID, UNK_ID, kmer_tokens, pad_id, vocab_size


def reference_ids(barcode: str, k: int, length: int) -> list[int]:
    """BarcodeBERT's order: [MASK], [CLS], [UNK], then every ACGT k-mer as itertools.product lists them."""
    vocab = {"".join(kmer): 3 + i for i, kmer in enumerate(itertools.product("ACGT", repeat=k))}
    padded = barcode.upper()[:length].ljust(length, "N")
    ids = [CLS_ID]
    for start in range(0, (length // k) * k, k):
        kmer = padded[start : start + k]
        if start >= len(barcode):
            ids.append(pad_id(k))
        else:
            ids.append(vocab.get(kmer, UNK_ID))
    return ids


@pytest.mark.parametrize("k", [3, 4, 5])
def test_kmer_ids_follow_barcodebert_vocabulary(k):
    rng = np.random.default_rng(k)
    barcodes = ["".join(rng.choice(list("ACGT"), size=n)) for n in (660, 700, 37, 1)]
    barcodes.append("ACGTNACGTRYACGTacgt" * 10)  # ambiguity codes and lower case
    ids, mask = kmer_tokens(barcodes, k=k)
    assert ids.shape == mask.shape == (len(barcodes), 1 + 660 // k)
    for row, barcode in enumerate(barcodes):
        assert ids[row].tolist() == reference_ids(barcode, k, 660), (k, row)
        assert mask[row].tolist() == [1 if token != pad_id(k) else 0 for token in ids[row]]
    assert vocab_size(k) == 3 + 4**k + 1 and ids.max() < vocab_size(k)


def test_known_ids_for_k4():
    ids, mask = kmer_tokens(["AAAAACGTTTTTNAAA"], k=4, length=24)
    assert ids.tolist() == [[CLS_ID, 3, 3 + 27, 3 + 255, UNK_ID, pad_id(4), pad_id(4)]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="need 1 <= k <= length"):
        kmer_tokens(["ACGT"], k=0)

import numpy as np
import pytest

from lucatrain.data import alphabet


def test_vocabulary_order_matches_lucaone():
    assert alphabet.VOCAB_SIZE == 39
    assert alphabet.VOCAB[:5] == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert "".join(alphabet.VOCAB[5:10]) == "12345"
    assert "".join(alphabet.VOCAB[10:]) == "LAGVSERTIDPKQNFYMHWCXBUZOJ.-*"


def test_gene_rewrite_exact_ids():
    # A->1(5) T->2(6) U->2(6) C->3(7) G->4(8) N,R->5(9); lower case too.
    ids = alphabet.encode("ATUCGNRacgt", alphabet.GENE, max_length=100)
    np.testing.assert_array_equal(ids, [2, 5, 6, 6, 7, 8, 9, 9, 5, 7, 8, 6, 3])


def test_protein_exact_ids():
    ids = alphabet.encode("MKLAx*", alphabet.PROT, max_length=100)
    np.testing.assert_array_equal(ids, [2, 26, 21, 10, 11, 30, 38, 3])


def test_protein_and_gene_letters_never_share_ids():
    gene = set(alphabet.encode("ACGTN", alphabet.GENE, 100)[1:-1].tolist())
    prot = set(alphabet.encode("ACGTN", alphabet.PROT, 100)[1:-1].tolist())
    assert gene == {5, 6, 7, 8, 9}
    assert prot == {11, 29, 12, 17, 23}
    assert not gene & prot


def test_truncation_counts_cls_and_sep():
    seq = "ACGTACGTAC"  # 10 residues
    right = alphabet.encode(seq, alphabet.GENE, max_length=6)
    left = alphabet.encode(seq, alphabet.GENE, max_length=6)
    assert len(right) == 6
    np.testing.assert_array_equal(right, [2, 5, 7, 8, 6, 3])  # keeps A C G T
    left = alphabet.encode(seq, alphabet.GENE, max_length=6, truncation="left")
    np.testing.assert_array_equal(left, [2, 8, 6, 5, 7, 3])  # keeps G T A C


@pytest.mark.parametrize("seq,obj_type", [("ACG7T", alphabet.GENE), ("ACGJ", alphabet.GENE), ("MK1L", alphabet.PROT)])
def test_invalid_residues_raise_with_letter(seq, obj_type):
    with pytest.raises(ValueError, match="invalid"):
        alphabet.encode(seq, obj_type, 100)
    pos, letter = alphabet.first_invalid_residue(seq, obj_type)
    assert seq[pos] == letter

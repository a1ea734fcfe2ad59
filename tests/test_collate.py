import numpy as np
import pytest
import torch

from lucatrain.data import alphabet
from lucatrain.data.collate import FIELD_ACTION, FIELD_BITS, FIELD_REPLACEMENT, Collator, MaskingConfig, sample_keys
from reference_collate import hash_field, mask_tokens, position_hash, select_hash

GENE_IDS = set(alphabet.GENE_RANDOM_IDS.tolist())
PROT_IDS = set(alphabet.PROT_RANDOM_IDS.tolist())


def rows(seqs, types, ids=None):
    return {
        "seq": list(seqs),
        "obj_type": list(types),
        "sample_id": list(ids if ids is not None else range(len(seqs))),
        "labels": ["{}"] * len(seqs),
    }


def real_rows(n=64):
    rng = np.random.default_rng(0)
    genes = ["".join(rng.choice(list("ACGT"), size=rng.integers(50, 400))) for _ in range(n // 2)]
    prots = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=rng.integers(50, 400))) for _ in range(n // 2)]
    return rows(genes + prots, [0] * (n // 2) + [1] * (n // 2))


def test_padding_and_shapes_exact():
    out = Collator(max_length=10)(rows(["ACG", "MK"], [0, 1]), epoch=0)
    np.testing.assert_array_equal(out["input_ids"], [[2, 5, 7, 8, 3], [2, 26, 21, 3, 0]])
    np.testing.assert_array_equal(out["token_type_ids"], [[0, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert int(out["num_tokens"]) == 9
    assert "labels" not in out


def test_masking_statistics_and_rules():
    collate = Collator(max_length=512, masking=MaskingConfig(0.15, 0.8, 0.1), seed=7)
    batch = collate(real_rows(200), epoch=0)
    original = Collator(max_length=512)(real_rows(200), epoch=0)["input_ids"]
    labels, ids, types = batch["labels"], batch["input_ids"], batch["token_type_ids"]
    selected = labels != alphabet.IGNORE_INDEX
    residues = (original > 4)
    # Only residues are ever selected, and labels hold the original ids.
    assert not (selected & ~residues).any()
    assert torch.equal(labels[selected], original[selected])
    # 15% of residues overall (200 sequences, ~45k residues: binomial sd ~0.2%), at least one per sequence.
    assert abs(selected.sum().item() / residues.sum().item() - 0.15) < 0.006
    assert (selected.sum(1) >= 1).all()
    # 80 / 10 / 10 split of the selected positions.
    masked = selected & (ids == alphabet.MASK_ID)
    kept = selected & (ids == original)
    random_ = selected & ~masked & ~kept
    total = selected.sum().item()
    assert abs(masked.sum().item() / total - 0.8) < 0.02
    # A random draw equal to the original counts as kept: expected kept = 0.1 + 0.1 * P(same letter).
    assert 0.08 < random_.sum().item() / total < 0.105
    assert 0.095 < kept.sum().item() / total < 0.13
    # Random replacements come from the same molecule's residues only.
    gene_repl = set(ids[random_ & (types == 0)].tolist())
    prot_repl = set(ids[random_ & (types == 1)].tolist())
    assert gene_repl and gene_repl <= GENE_IDS
    assert prot_repl and prot_repl <= PROT_IDS


def test_at_least_one_mask_on_short_sequence():
    batch = Collator(max_length=20, masking=MaskingConfig(), seed=1)(rows(["A", "MK"], [0, 1]), epoch=0)
    assert ((batch["labels"] != -100).sum(1) >= 1).all()


def test_masks_depend_on_sample_not_on_batch_composition():
    collate = Collator(max_length=512, masking=MaskingConfig(), seed=3)
    data = real_rows(8)
    together = collate(data, epoch=2)
    alone = collate({k: v[5:6] for k, v in data.items()}, epoch=2)
    n = int(alone["attention_mask"].sum())
    assert torch.equal(together["labels"][5, :n], alone["labels"][0, :n])
    assert torch.equal(together["input_ids"][5, :n], alone["input_ids"][0, :n])
    # A different epoch or seed gives a different mask.
    assert not torch.equal(collate(data, epoch=3)["labels"], together["labels"])
    other_seed = Collator(max_length=512, masking=MaskingConfig(), seed=4)
    assert not torch.equal(other_seed(data, epoch=2)["labels"], together["labels"])


def test_hash_draws_are_uniform_and_independent():
    keys = sample_keys(0, 0, np.arange(1000))
    select = select_hash(keys, 100) / 2**32
    rows, cols = np.divmod(np.arange(1000 * 100), 100)
    hashes = position_hash(keys, rows, cols)
    action = hash_field(hashes, FIELD_ACTION) / 2**FIELD_BITS
    replacement = hash_field(hashes, FIELD_REPLACEMENT) / 2**FIELD_BITS
    for u in (select.ravel(), action, replacement):
        assert u.min() >= 0 and u.max() < 1
        assert abs(u.mean() - 0.5) < 0.005
        assert abs((u < 0.1).mean() - 0.1) < 0.005
    joint = ((select.ravel() < 0.15) & (action < 0.8)).mean()
    assert abs(joint - 0.15 * 0.8) < 0.004
    joint = ((action < 0.8) & (replacement < 0.25)).mean()
    assert abs(joint - 0.8 * 0.25) < 0.004


def test_invalid_residue_in_collate_raises():
    with pytest.raises(ValueError, match="invalid gene residue"):
        Collator(max_length=20)(rows(["AC9"], [0]), epoch=0)


def test_compiled_kernel_equals_numpy_reference_exactly():
    """The numba kernel and a plain-numpy spelling of the same rules give identical tensors."""
    data = real_rows(64)
    data["seq"][3] = data["seq"][3][:1]  # a 1-residue sequence exercises the at-least-one rule
    cfg = MaskingConfig(0.15, 0.8, 0.1)
    got = Collator(max_length=300, masking=cfg, seed=11)(data, epoch=5)
    plain = Collator(max_length=300)(data, epoch=5)
    ids, types, attention = plain["input_ids"].numpy(), plain["token_type_ids"].numpy(), plain["attention_mask"].numpy()
    lengths = attention.sum(1)
    positions = np.arange(ids.shape[1])[None, :]
    residue_mask = (positions >= 1) & (positions < lengths[:, None] - 1)
    keys = sample_keys(11, 5, np.asarray(data["sample_id"]))
    want_ids, want_labels = mask_tokens(ids, types, residue_mask, keys, cfg)
    np.testing.assert_array_equal(got["input_ids"].numpy(), want_ids)
    np.testing.assert_array_equal(got["labels"].numpy(), want_labels)
    assert (want_labels[3] != -100).sum() == 1

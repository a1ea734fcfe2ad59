"""Retrieval metrics (lucatrain/retrieval.py) against a computation written out here with numpy."""

import numpy as np
import pytest

from lucatrain.retrieval import harmonic_mean, nearest_keys, topk_accuracy

SPECIES = np.array(["Aedes aegypti", "Apis mellifera", "Bombus terrestris", "Culex pipiens", "Drosophila melanogaster"])


def brute_force(queries, keys, query_labels, key_labels, ks):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    kk = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    order = np.argsort(-(q @ kk.T), axis=1, kind="stable")
    out = {}
    for k in ks:
        hits = [query_labels[i] in set(key_labels[order[i, :k]]) for i in range(len(q))]
        out[f"top{k}_micro"] = sum(hits) / len(hits)
        per_class = {}
        for label, hit in zip(query_labels, hits):
            per_class.setdefault(label, []).append(hit)
        out[f"top{k}_macro"] = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    return order, out


def test_topk_accuracy_matches_a_brute_force_computation():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(40, 8)) * rng.uniform(0.5, 3, size=(40, 1))  # norms differ: cosine, not dot product
    queries = rng.normal(size=(25, 8))
    key_labels = SPECIES[rng.integers(0, 5, size=40)]
    query_labels = SPECIES[np.r_[np.zeros(15, dtype=int), rng.integers(1, 5, size=10)]]  # one dominant class
    order, want = brute_force(queries, keys, query_labels, key_labels, (1, 3, 5))
    neighbours = nearest_keys(queries, keys, k=5)
    np.testing.assert_array_equal(neighbours, order[:, :5])
    got = topk_accuracy(query_labels, key_labels, neighbours, ks=(1, 3, 5))
    assert got == pytest.approx(want, abs=1e-12)
    assert got["top1_micro"] != pytest.approx(got["top1_macro"])  # the dominant class makes them differ
    assert got["top1_micro"] <= got["top3_micro"] <= got["top5_micro"]


def test_a_perfect_embedding_scores_one_and_the_errors_are_clear():
    keys = np.eye(5)
    got = topk_accuracy(SPECIES, SPECIES, nearest_keys(np.eye(5) * 2, keys, k=1), ks=(1,))
    assert got == {"top1_micro": 1.0, "top1_macro": 1.0}
    with pytest.raises(ValueError, match="queries have 3 dimensions, keys 5"):
        nearest_keys(np.ones((2, 3)), keys, k=1)
    with pytest.raises(ValueError, match="top-5 needs at least 5 neighbours"):
        topk_accuracy(SPECIES, SPECIES, np.zeros((5, 3), dtype=int), ks=(1, 5))


def test_harmonic_mean_of_seen_and_unseen():
    assert harmonic_mean([0.8, 0.2]) == pytest.approx(2 / (1 / 0.8 + 1 / 0.2))
    assert harmonic_mean([0.9, 0.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])

"""Retrieval evaluation as CLIBD reports it: nearest keys by inner product of L2-normalised embeddings
(faiss), then top-k accuracy of the keys' labels at each taxonomic level, micro and macro.

    neighbours = nearest_keys(query_vectors, key_vectors, k=5)                 # (Q, 5) key rows
    scores = topk_accuracy(query_species, key_species, neighbours, ks=(1, 3, 5))
    # {"top1_micro": ..., "top1_macro": ..., "top3_micro": ..., ...}

micro: the share of queries whose own label is among the labels of their k nearest keys.
macro: that share per label of the queries, averaged over the labels that occur among the queries
(a rare species counts as much as a common one). `harmonic_mean` combines seen and unseen scores.
"""

from __future__ import annotations

import numpy as np


def normalised(vectors) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def nearest_keys(queries, keys, k: int) -> np.ndarray:
    """(Q, k) int64: for each query the rows of `keys` with the largest cosine similarity, best first."""
    import faiss  # lazy: only evaluation needs it

    queries, keys = normalised(queries), normalised(keys)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dimensions, keys {keys.shape[1]}")
    if not 1 <= k <= len(keys):
        raise ValueError(f"k must be between 1 and the number of keys ({len(keys)}), got {k}")
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    _, found = index.search(queries, k)
    return found.astype(np.int64)


def topk_accuracy(query_labels, key_labels, neighbours: np.ndarray, ks=(1, 3, 5)) -> dict[str, float]:
    """`top<k>_micro` and `top<k>_macro` for each k (module docstring); labels may be strings or ints."""
    query_labels, key_labels = np.asarray(query_labels), np.asarray(key_labels)
    if neighbours.shape[0] != len(query_labels):
        raise ValueError(f"{neighbours.shape[0]} neighbour rows for {len(query_labels)} queries")
    if max(ks) > neighbours.shape[1]:
        raise ValueError(f"top-{max(ks)} needs at least {max(ks)} neighbours per query, got {neighbours.shape[1]}")
    retrieved = key_labels[neighbours]  # (Q, k_max) labels of the nearest keys
    classes, per_query_class = np.unique(query_labels, return_inverse=True)
    scores = {}
    for k in ks:
        hit = (retrieved[:, :k] == query_labels[:, None]).any(axis=1)
        scores[f"top{k}_micro"] = float(hit.mean())
        per_class = np.bincount(per_query_class, weights=hit, minlength=len(classes)) / np.bincount(per_query_class)
        scores[f"top{k}_macro"] = float(per_class.mean())
    return scores


def harmonic_mean(values) -> float:
    """len / sum(1 / x); 0 when any value is 0 (a model that fails on unseen species scores 0)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic_mean of nothing")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)

"""Comparing embeddings that took different paths through the model.

The same text embedded alone, or in a batch of other texts, gives slightly different vectors: the
batch's padding and shape change the order of the model's sums.  In float32 the difference is in
the 7th decimal; in bfloat16 (what `dtype: auto` picks on a CPU with AVX512-BF16 or AMX) it reaches
5e-4 per component.  So vectors from different requests are compared by cosine, as TEI's tests do,
with a bound that holds in bfloat16: a wrong vector (another text's, a truncated input's) is far
below it.  Exact equality is only for one vector read twice, never for two runs of the model.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

# Same text, other batch: >= 0.99995 seen in bfloat16 on an AMX Xeon; other texts of the test
# corpora are below 0.99.
MIN_COSINE = 0.9999


def as_matrix(vectors: Iterable[Any]) -> np.ndarray:
    """pgvector values (Vector, numpy arrays or lists) as one float64 matrix, a row each."""
    return np.array([np.asarray(v.to_list() if hasattr(v, "to_list") else v, dtype=np.float64)
                     for v in vectors])


def cosines(a: Iterable[Any], b: Iterable[Any]) -> np.ndarray:
    """Row-wise cosine similarity of two equally long lists of vectors."""
    x, y = as_matrix(a), as_matrix(b)
    assert x.shape == y.shape, f"{x.shape} vectors against {y.shape}"
    return (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def assert_same_embeddings(a: Iterable[Any], b: Iterable[Any], min_cosine: float = MIN_COSINE) -> None:
    """Each pair of rows is the same text's embedding (see the module doc)."""
    cos = cosines(a, b)
    worst = int(np.argmin(cos)) if len(cos) else 0
    assert len(cos) == 0 or cos.min() >= min_cosine, f"row {worst}: cosine {cos[worst]:.6f} < {min_cosine}"

"""In-process retrieval metrics (numpy) for validation during development and benchmarks.

Same definitions as :mod:`ml.eval.metrics` (Pre@K over all queries; a query whose target is not
in its list, or that has no list, is a miss; MRR over the whole list). The evaluation job remains
the reference: bench/ checks both agree.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def hit_metrics(topk: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> Dict[str, float]:
    """topk (Q, K) candidate ids per query (-1 = none), targets (Q,) -> {"Pre@k": .., "MRR": ..}."""
    hit = topk == targets[:, None]  # (Q, K)
    found = hit.any(axis=1)
    rank = np.where(found, hit.argmax(axis=1) + 1, 0)
    out = {f"Pre@{k}": float(np.mean(found & (rank <= k))) for k in ks}
    out["MRR"] = float(np.mean(np.where(found, 1.0 / np.maximum(rank, 1), 0.0)))
    return out

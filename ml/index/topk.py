"""Faiss top-K: index choice by catalogue size, search, self-exclusion, deterministic ties.

Vectors are L2-normalised, so inner product = cosine. Small catalogues get an exact
``IndexFlatIP``; large ones an ``IndexIVFFlat`` (nlist ~ 4·sqrt(n), nprobe from config) trained
on a deterministic sample. The IVF vectors are assigned to their lists on a GPU when faiss-gpu and a
GPU are present; the index returned is a CPU index either way.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import faiss
import numpy as np

from ml.errors import InvalidInput

log = logging.getLogger(__name__)


def build_index(vectors: np.ndarray, kind: str = "auto", exact_max: int = 200_000, nlist: Optional[int] = None,
                nprobe: int = 32, seed: int = 0, use_gpu: bool = True) -> faiss.Index:
    """Index over ``vectors`` (n, d) float32; positions are the ids (map them outside)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if kind == "auto":
        kind = "flat" if n <= exact_max else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * math.sqrt(n)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.cp.seed = seed
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    else:
        raise InvalidInput(f"index kind={kind!r}; expected auto, flat or ivf")
    if kind == "ivf" and use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        # An IVF add's cost is assigning every vector to a list (n x nlist products): on one GPU, and the
        # index back on the CPU, where it is written and searched (the executors search a CPU copy).
        # Across all GPUs each replica would repeat the whole add, and the IndexReplicas it gives
        # cannot be written. A flat add is a copy: the CPU does it.
        index.nprobe = 1  # the GPU copy refuses nprobe above 2,048 (its k-selection bound); the add needs none
        gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        gpu.add(x)
        index = faiss.index_gpu_to_cpu(gpu)
        index.nprobe = min(nprobe, nlist)
    else:
        index.add(x)
    log.info("faiss %s index: %d x %d", kind, n, d)
    return index


def search_topk(index: faiss.Index, queries: np.ndarray, query_pos: Optional[np.ndarray], k: int,
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k index positions and scores per query, excluding the query's own position.

    Asks Faiss for k+1 and drops the self hit (or the last one). Ties in score are broken by
    the smaller position, so equal scores always give the same order.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, pos = index.search(q, k + 1)
    if query_pos is not None:
        drop = pos == query_pos[:, None]
        # rows without a self hit drop their last (weakest) result instead
        no_self = ~drop.any(axis=1)
        drop[no_self, -1] = True
        pos = pos[~drop].reshape(len(q), k)
        scores = scores[~drop].reshape(len(q), k)
    else:
        pos, scores = pos[:, :k], scores[:, :k]
    valid = pos >= 0
    order = np.lexsort((np.where(valid, pos, np.iinfo(np.int64).max), -np.where(valid, scores, -np.inf)), axis=1)
    return np.take_along_axis(pos, order, 1), np.take_along_axis(scores, order, 1)

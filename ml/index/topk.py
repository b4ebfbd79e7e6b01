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


MAX_TIED_EXTRA = 1024  # hits searched beyond 2(k+1) to place ties at the k-th score (search_topk)


def search_topk(index: faiss.Index, queries: np.ndarray, query_pos: Optional[np.ndarray], k: int,
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k index positions and scores per query, excluding the query's own position.

    Ties in score go to the smaller position, also at the k-th place. Faiss orders equal scores
    as it meets them, and returns an arbitrary subset of the items tied at its last place; so the
    hits are sorted by (score, position) before the self hit (or, where the query's own position is
    not among them, the weakest) is dropped, and a query whose k-th kept score equals the weakest
    score Faiss returned is searched again with twice the hits until it does not (or the index is
    exhausted): an equal-scored item of smaller position that Faiss left out is not lost. The
    search stops at twice the first search's hits + :data:`MAX_TIED_EXTRA`: in a larger group of equal
    scores (many identical vectors) the cut is among those. Positions -1 (fewer hits than k, with IVF) come last.
    """
    # Faiss computes inner products with BLAS from a batch size on (nq x d >= 128,000 in faiss 1.15)
    # and pair by pair below it, and the two differ in the last bits (every row of 600 256-d queries,
    # by up to 8e-7): a query's scores, and the order of its near-ties, depended on how many queries
    # shared its batch. Always BLAS: the same bits in every batch size (tested); as fast or faster from
    # 16 queries a search on (the job's searches hold thousands), 3x slower for a query alone.
    faiss.cvar.distance_compute_blas_threshold = 0
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if k <= 0 or not len(q):
        return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
    fetch = k + (query_pos is not None)
    pos, scores, last = _cut(index, q, query_pos, k, fetch)
    rows = np.arange(len(q))
    most = min(index.ntotal, 2 * fetch + MAX_TIED_EXTRA)
    while fetch < most:
        rows = rows[(pos[rows, k - 1] >= 0) & (scores[rows, k - 1] == last[rows])]
        if not len(rows):
            break
        fetch = min(2 * fetch, most)
        pos[rows], scores[rows], last[rows] = _cut(index, q[rows], None if query_pos is None else query_pos[rows],
                                                  k, fetch)
    return pos, scores


def _cut(index: faiss.Index, q: np.ndarray, query_pos: Optional[np.ndarray], k: int, fetch: int,
         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k of ``fetch`` hits by (score desc, position asc) without the query's own position,
    and the weakest score returned (NaN where Faiss returned fewer than ``fetch``: nothing was left)."""
    scores, pos = index.search(q, fetch)
    valid = pos >= 0
    order = np.lexsort((np.where(valid, pos, np.iinfo(np.int64).max), -np.where(valid, scores, -np.inf)), axis=1)
    pos, scores = np.take_along_axis(pos, order, 1), np.take_along_axis(scores, order, 1)
    last = np.where(pos[:, -1] >= 0, scores[:, -1], np.nan)
    drop = (pos == query_pos[:, None]) & (pos >= 0) if query_pos is not None else np.zeros(pos.shape, bool)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :k]  # the hits in order, the self hit moved past the k-th
    return np.take_along_axis(pos, keep, 1), np.take_along_axis(scores, keep, 1), last

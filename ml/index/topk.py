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
    if kind == "ivf":
        index.make_direct_map()  # position -> vector, for search_topk's rescoring
    log.info("faiss %s index: %d x %d", kind, n, d)
    return index


MAX_TIED_EXTRA = 1024  # hits searched beyond 2 x the first search's to place ties at the k-th score (search_topk)
EXTRA_HITS = 8  # hits searched beyond k (+1 for the query itself) at first: the margin that settles most cuts
_RESCORE_FLOATS = 1 << 21  # vector values gathered at once to rescore hits (16 MiB in float64, ~60 MiB at the peak)


def search_topk(index: faiss.Index, queries: np.ndarray, query_pos: Optional[np.ndarray], k: int,
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k index positions and scores per query, excluding the query's own position.

    A query's hits and scores do not depend on the queries searched beside it, nor on the CPU's
    BLAS: Faiss's float32 products differ in their last bits with the batch size (on an AVX-512 AMD
    EPYC, 294 of 600 256-d queries' scores alone vs in one batch, and at batch sizes 16 to 333 too),
    and so would a near-tie's order. Faiss only finds the candidates; each hit is rescored as a
    float64 sum of the float32 products (exact products; rounded to float32 once), the same bits
    in any batch. Faiss's error bounds where the cut can fall: a query whose k-th kept score is not
    above the weakest score Faiss returned by more than that bound (d x 2^-24 x |q| x the hits'
    largest norm: the catalogue's, as its vectors are L2-normalised) is searched again with twice the
    hits, until it is (or the index is exhausted), so an item Faiss ranked just below its last hit is
    never lost. An IVF index's lists to scan are chosen by rescored centroid scores the same way.

    Ties in score go to the smaller position, also at the k-th place; Faiss returns an arbitrary
    subset of the items tied at its last place, and the same search again settles it. The searches
    stop at twice the first search's hits + :data:`MAX_TIED_EXTRA`: in a larger group of equal scores
    (many identical vectors) the cut is among those. Positions -1 (fewer hits than k, with IVF) come last.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if k <= 0 or not len(q):
        return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
    if not index.ntotal:
        return np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf, np.float32)
    fetch = k + (query_pos is not None) + EXTRA_HITS
    pos, scores, last = _cut(index, q, query_pos, k, fetch)
    rows = np.arange(len(q))
    most = min(index.ntotal, 2 * fetch + MAX_TIED_EXTRA)
    while fetch < most:
        rows = rows[(pos[rows, k - 1] >= 0) & (scores[rows, k - 1] <= last[rows])]
        if not len(rows):
            break
        fetch = min(2 * fetch, most)
        pos[rows], scores[rows], last[rows] = _cut(index, q[rows], None if query_pos is None else query_pos[rows],
                                                  k, fetch)
    return pos, scores


def _cut(index: faiss.Index, q: np.ndarray, query_pos: Optional[np.ndarray], k: int, fetch: int,
         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k of ``fetch`` hits by (exact score desc, position asc) without the query's own
    position, and the score a kept hit must be above to be sure of its place: Faiss's weakest score
    plus its error bound (NaN where Faiss returned fewer than ``fetch``: nothing was left)."""
    approx, pos = _search(index, q, fetch)
    returned_all = pos[:, -1] >= 0
    pos, scores, largest_norm = _ranked(index, q, pos)
    # Faiss's float32 sum of d products errs by at most d x 2^-24 x |q| |x| (+ the rounding of ours)
    bound = (q.shape[1] + 4) * 2.0 ** -24 * np.linalg.norm(q.astype(np.float64), axis=1) * largest_norm
    last = np.where(returned_all, approx[:, -1] + bound, np.nan)
    drop = (pos == query_pos[:, None]) & (pos >= 0) if query_pos is not None else np.zeros(pos.shape, bool)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :k]  # the hits in order, the self hit moved past the k-th
    return np.take_along_axis(pos, keep, 1), np.take_along_axis(scores, keep, 1), last


def _search(index: faiss.Index, q: np.ndarray, fetch: int) -> Tuple[np.ndarray, np.ndarray]:
    """Faiss's ``fetch`` best hits. An IVF index's lists to scan are chosen here by the centroids'
    rescored scores (ties to the smaller list): Faiss's own float32 centroid scores differ with the
    batch too, and a near-tie at the nprobe-th list would change which lists a query scans."""
    if not isinstance(index, faiss.IndexIVF):
        return index.search(q, fetch)
    nprobe = min(index.nprobe, index.nlist)
    quantizer = faiss.downcast_index(index.quantizer)
    _, lists = quantizer.search(q, min(nprobe + EXTRA_HITS, index.nlist))
    lists, exact, _ = _ranked(quantizer, q, lists)
    return index.search_preassigned(q, fetch, lists[:, :nprobe], exact[:, :nprobe])


def _ranked(index: faiss.Index, q: np.ndarray, pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's hits (index positions) rescored (:func:`_rescore`, rounded to float32) and ordered
    by (score desc, position asc), the -1s last with score -inf; and per query the largest norm among
    its hits."""
    valid = pos >= 0
    exact, largest_norm = _rescore(index, q, pos, valid)
    scores = np.where(valid, exact.astype(np.float32), -np.inf)
    order = np.lexsort((np.where(valid, pos, np.iinfo(np.int64).max), -scores), axis=1)
    return np.take_along_axis(pos, order, 1), np.take_along_axis(scores, order, 1), largest_norm


def _rescore(index: faiss.Index, q: np.ndarray, pos: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each hit's inner product with its query as a float64 sum of float32 products (exact), summed
    in one order whatever the batch; and per query the largest norm among its hits (the catalogue's,
    for L2-normalised vectors). Invalid hits (-1) score 0."""
    n, fetch = pos.shape
    exact, largest = np.zeros((n, fetch)), np.zeros(n)
    step = max(1, _RESCORE_FLOATS // max(1, fetch * q.shape[1]))
    for s in range(0, n, step):
        p, v = pos[s:s + step], valid[s:s + step]
        x = _vectors(index, np.where(v, p, 0).ravel()).astype(np.float64).reshape(*p.shape, -1)
        x[~v] = 0.0
        exact[s:s + step] = (x * q[s:s + step, None, :].astype(np.float64)).sum(axis=2)
        largest[s:s + step] = np.sqrt((x * x).sum(axis=2).max(axis=1, initial=0.0))
    return exact, largest


def _vectors(index: faiss.Index, positions: np.ndarray) -> np.ndarray:
    """The stored vectors at ``positions``: a flat index's own array, an IVF's through its direct map
    (:func:`build_index` makes it; made here for an IVF index built elsewhere)."""
    if isinstance(index, faiss.IndexFlat):
        return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)[positions]
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.make_direct_map()
    return index.reconstruct_batch(positions)

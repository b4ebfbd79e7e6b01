"""bench.ml1m_sparse fuses the cooc and NATM lists by reciprocal rank: order, weights, ties, empty lists."""
import numpy as np

from bench.ml1m_sparse import fuse


def test_fuse_sums_weighted_reciprocal_ranks_and_breaks_ties_by_id():
    a = np.array([[10, 11, 12], [-1, -1, -1]])
    b = np.array([[12, 13, -1], [-1, -1, -1]])
    # rrf_k 0: 10 -> 1, 11 -> 1/2, 12 -> 1/3 + 1, 13 -> 1/2 (ties with 11: smaller id first)
    out = fuse([a, b], [1.0, 1.0], rrf_k=0.0, depth=5)
    assert out.tolist() == [[12, 10, 11, 13, -1], [-1, -1, -1, -1, -1]]
    # a small weight on the second list: 12 -> 1/3 + 0.1 stays behind 11 -> 1/2
    assert fuse([a, b], [1.0, 0.1], rrf_k=0.0, depth=3).tolist() == [[10, 11, 12], [-1, -1, -1]]
    # depth beyond the candidates pads with -1; rrf_k 60 flattens ranks but keeps the order here
    assert fuse([a, b], [1.0, 1.0], depth=6)[0].tolist() == [12, 10, 11, 13, -1, -1]

"""search_topk on hand-built exact indexes: self-exclusion, the weakest hit dropped, ties by position."""
import numpy as np

from ml.index.topk import build_index, search_topk


def _unit(*angles):
    return np.array([[np.cos(a), np.sin(a)] for a in angles], np.float32)


def test_ties_go_to_the_smaller_position_and_never_to_the_query_itself():
    # positions 0, 1, 2 hold the same vector: for the query at 0 they tie at score 1, and the
    # list must read [1, 2] (smaller position first, stable across runs), never containing 0
    index = build_index(_unit(0, 0, 0, 1), kind="flat", use_gpu=False)
    pos, scores = search_topk(index, _unit(0, 0), np.array([0, 2]), k=2)
    assert pos.tolist() == [[1, 2], [0, 1]]
    np.testing.assert_allclose(scores, 1.0, rtol=1e-6)


def test_a_row_without_its_self_hit_drops_its_weakest_result():
    # query 0 (an asymmetric query vector) scores its own position 4 lowest: its k+1 hits are
    # 0, 1, 2 and it must keep the two best (0, 1), not lose its best (0) to keep 2
    index = build_index(_unit(0.0, 0.2, 0.4, 0.6, 1.5), kind="flat", use_gpu=False)
    q = _unit(0.0, 0.6)
    pos, scores = search_topk(index, q, np.array([4, 3]), k=2)
    assert pos.tolist() == [[0, 1], [2, 1]]  # row 1 had its self hit (3) first: the two after it
    assert scores[0, 0] > scores[0, 1] and np.isclose(scores[0, 0], 1.0)
    # without query positions, the plain top k
    pos, _ = search_topk(index, q, None, k=2)
    assert pos.tolist() == [[0, 1], [3, 2]]

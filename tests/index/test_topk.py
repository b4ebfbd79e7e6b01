"""search_topk on hand-built exact indexes: self-exclusion, the weakest hit dropped, ties by position
(at the k-th place too), and exact scores that do not depend on the batch."""
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


def test_ties_at_the_cut_go_to_the_smaller_position_whatever_faiss_returned():
    # three equal vectors, k = 1: Faiss returns query 2's two hits as [1, 0], and the weakest was dropped
    # before the sort (the list read [1]); it must be [0]
    index = build_index(np.array([[1, 0]] * 3, np.float32), kind="flat", use_gpu=False)
    pos, _ = search_topk(index, np.array([[1, 0]] * 3, np.float32), np.arange(3), k=1)
    assert pos.tolist() == [[1], [0], [0]]
    # 200 equal vectors: Faiss returns some k + 1 of them, not the smallest positions; the tied items it
    # left out are fetched by searching again, so every list is the smallest positions but its own
    x = np.array([[0.6, 0.8]] * 200 + [[1, 0]] * 5, np.float32)
    index = build_index(x, kind="flat", use_gpu=False)
    queries = np.array([0, 3, 150, 199, 200], np.int64)
    pos, scores = search_topk(index, x[queries], queries, k=4)
    assert pos.tolist() == [[1, 2, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3], [0, 1, 2, 3], [201, 202, 203, 204]]
    np.testing.assert_allclose(scores, 1.0, rtol=1e-6)
    pos, _ = search_topk(index, x[[0]], None, k=3)  # u2i: no self to drop
    assert pos.tolist() == [[0, 1, 2]]
    # IVF scans its lists nearest first and keeps the first of equal scores: positions 0 and 1 score the
    # same for the query, 1 sits in the list scanned first, and Faiss's top 1 is [1]; it must be [0]
    rng = np.random.default_rng(0)

    def around(v, n):
        y = np.array(v, np.float32) + 0.05 * rng.standard_normal((n, 2)).astype(np.float32)
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    c, s = np.cos(0.3), np.sin(0.3)
    xi = np.vstack([[[c, -s], [c, s]], around([0.5, 0.866], 50), around([0, -1], 50)]).astype(np.float32)
    ivf = build_index(xi, kind="ivf", nlist=2, nprobe=2, use_gpu=False)
    q = np.array([[1, 0]], np.float32)
    assert ivf.search(q, 1)[1].tolist() == [[1]]  # what Faiss alone answers
    assert search_topk(ivf, q, None, k=1)[0].tolist() == [[0]]
    # an item with no row in the index (position -1) keeps k hits, and a -1 from IVF is never taken as it
    pos, _ = search_topk(index, x[[0]], np.array([-1]), k=2)
    assert pos.tolist() == [[0, 1]]


def test_a_querys_scores_are_the_same_bits_in_any_batch():
    # Faiss's float32 products differ in their last bits with the batch size (BLAS blocks, and its
    # pair-by-pair products below a batch size): on an AVX-512 AMD EPYC, Faiss alone gave 294 of these
    # 600 queries other scores alone than in one batch, and others again in batches of 16 to 333
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 256)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x, kind="flat", use_gpu=False)
    q = np.arange(600)
    pos, scores = search_topk(index, x[q], q, k=10)
    for size in (1, 7, 16, 333):
        parts = [search_topk(index, x[q[i:i + size]], q[i:i + size], k=10) for i in range(0, 600, size)]
        assert np.array_equal(np.vstack([p for p, _ in parts]), pos), size
        assert np.array_equal(np.vstack([s for _, s in parts]), scores), size
    # and they are the exact top 10: float64 products, ties by position, the query itself left out
    ref = (x[q].astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    ref[q, q] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(3000), ref.shape), -ref), axis=1)[:, :10]
    assert np.array_equal(pos, order)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, 1), rtol=0, atol=1e-7)


def test_an_ivf_index_rescored_through_its_direct_map_also_when_built_elsewhere():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    import faiss

    ivf = build_index(x, kind="ivf", nlist=8, nprobe=8, use_gpu=False)  # every list probed: exact
    pos, scores = search_topk(ivf, x[:50], np.arange(50), k=5)
    flat_pos, flat_scores = search_topk(build_index(x, kind="flat", use_gpu=False), x[:50], np.arange(50), k=5)
    assert np.array_equal(pos, flat_pos) and np.array_equal(scores, flat_scores)
    plain = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 8, faiss.METRIC_INNER_PRODUCT)  # no direct map
    plain.train(x)
    plain.add(x)
    plain.nprobe = 8
    assert np.array_equal(search_topk(plain, x[:50], np.arange(50), k=5)[0], flat_pos)
    # with some lists probed, the lists scanned are chosen by rescored centroid scores: any batch alike
    ivf.nprobe = 2
    pos, scores = search_topk(ivf, x[:50], np.arange(50), k=5)
    alone = [search_topk(ivf, x[[i]], np.array([i]), k=5) for i in range(50)]
    assert np.array_equal(np.vstack([p for p, _ in alone]), pos)
    assert np.array_equal(np.vstack([s for _, s in alone]), scores)


def test_the_search_again_for_ties_is_bounded(monkeypatch):
    # 5,000 identical vectors tie for every query: the first search asks k + 1 + EXTRA_HITS, and the
    # searches stop at twice that + MAX_TIED_EXTRA hits
    from ml.index import topk

    fetched = []
    real = topk._cut
    monkeypatch.setattr(topk, "_cut", lambda index, q, qp, k, fetch: fetched.append(fetch) or real(index, q, qp, k, fetch))
    x = np.array([[1, 0]] * 5000, np.float32)
    index = build_index(x, kind="flat", use_gpu=False)
    pos, _ = search_topk(index, x[:3], np.arange(3), k=3)
    assert pos.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3]]
    first = 3 + 1 + topk.EXTRA_HITS
    assert fetched[0] == first and max(fetched) == 2 * first + topk.MAX_TIED_EXTRA
    assert search_topk(index, x[:2], None, k=0)[0].shape == (2, 0)
    # an empty index: no hit for any query (-1, as Faiss gives), not an error from the rescoring
    import faiss

    pos, scores = search_topk(faiss.IndexFlatIP(2), x[:2], np.arange(2), k=3)
    assert pos.tolist() == [[-1] * 3] * 2 and np.isneginf(scores).all()


class _ErringFaiss:
    """A flat index whose scores err within Faiss's float32 bound (d x 2^-24 x |q||x|), the way its
    BLAS blocks can: items nearly tied come back in the reverse of their exact order."""

    def __init__(self, x):
        self.x, self.ntotal, self.d = x, len(x), x.shape[1]

    def search(self, q, fetch):
        exact = q.astype(np.float64) @ self.x.astype(np.float64).T
        near = exact > exact.max(axis=1, keepdims=True) - 1e-5
        # the near ones scored just under the worst of them, in the reverse of their exact order
        rank = np.argsort(np.argsort(-np.where(near, exact, -np.inf), axis=1), axis=1)
        low = np.where(near, exact, np.inf).min(axis=1, keepdims=True)
        approx = np.where(near, low - (near.sum(axis=1, keepdims=True) - 1 - rank) * 1e-8, exact)
        pos = np.argsort(-approx, axis=1, kind="stable")[:, :fetch]
        return np.take_along_axis(approx, pos, 1).astype(np.float32), pos

    def reconstruct_batch(self, positions):
        return self.x[positions]


def test_an_item_faiss_placed_below_its_last_hit_within_its_error_is_found():
    # 20 items within 2e-6 of the best score (Faiss's bound at d = 64 is 4e-6), scored just under the
    # worst of them, worst first: the first search's hits (k + 8) hold none of the best, and their exact
    # scores are all above the weakest score returned; the refetch within the bound finds it
    rng = np.random.default_rng(0)
    base = rng.standard_normal(64)
    base /= np.linalg.norm(base)
    near = base + 1e-4 * rng.standard_normal((20, 64))
    far = rng.standard_normal((30, 64))
    x = np.vstack([near, far])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = base[None].astype(np.float32)
    exact = (x.astype(np.float64) @ base).astype(np.float32)
    assert np.ptp(exact[:20]) < 2e-6
    erring = _ErringFaiss(x)
    assert exact.argmax() not in erring.search(q, 1 + 8)[1][0]  # what the first search returns
    pos, scores = search_topk(erring, q, None, k=1)
    assert pos.tolist() == [[int(np.lexsort((np.arange(50), -exact))[0])]] and scores[0, 0] == exact.max()

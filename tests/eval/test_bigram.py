"""bench.ml1m_i2i_ceiling's neural bigram (also bench.ml1m_bigram's): its pairs and what it learns."""
import numpy as np

from bench.ml1m_i2i_ceiling import Split, bigram_pairs, neural_bigram


def test_bigram_pairs_keep_distance_d_with_probability_w_d_and_never_self_pairs():
    seqs = [np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 5])] * 400  # target 5 (holdout 1) never pairs
    sp = Split(seqs, 1)
    x, y = bigram_pairs(sp, 1, "1/d", np.random.default_rng(0))
    assert len(x) == 400 * 8  # 9 -> 9 is dropped, nothing past the holdout
    assert ((y - x) == 1).all()
    x, y = bigram_pairs(sp, 3, "1/d", np.random.default_rng(0))
    d = (y - x).numpy()
    assert set(np.unique(d)) == {1, 2, 3} and (x != y).all()
    # 1/d: distance 2 kept about half as often as distance 1, distance 3 a third
    assert abs((d == 2).sum() / (d == 1).sum() - 0.5) < 0.1
    assert abs((d == 3).sum() / (d == 1).sum() - 1 / 3) < 0.1


def test_cosine_bigram_learns_a_directed_ring_far_above_popularity():
    V, rng = 30, np.random.default_rng(0)
    # each line walks the ring 1 -> 2 -> ... -> 29 -> 1 from a random start; b follows a, never a follows b
    seqs = [(np.arange(s, s + 12) % (V - 1)) + 1 for s in rng.integers(0, V - 1, 300)]
    sp = Split(seqs, 1)
    logp, _, n = neural_bigram(sp, dim=16, cosine=10.0, steps=300, batch_size=256, lr=0.03)
    assert n == 300 * 10
    nxt = np.arange(1, V) % (V - 1) + 1
    scores = logp[1:, 1:].copy()
    scores[np.arange(V - 1), np.arange(V - 1)] = -np.inf
    top1 = scores.argmax(1) + 1
    assert (top1 == nxt).mean() > 0.9  # popularity is flat here: top-1 by it would be ~1/28
    assert sp.metrics(logp)["Pre@1"] > 0.9

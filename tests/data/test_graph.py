"""Co-occurrence graph on hand-made sequences: every option changes the edges as documented."""
import logging
import random

from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import GraphConfig
from ml.data import graph
from ml.data.graph import build_cooccurrence_graph, item_counts, windowed_pairs


def _seqs(spark, rows):
    return spark.createDataFrame([(u, items, list(range(len(items))), len(items)) for u, items in rows], S.SEQUENCES)


def _edges(spark, rows, **kw):
    cfg = GraphConfig(**{"top_n": 100, **kw})
    return {(r.item_id, r.neighbor_id): (r.weight, r["count"], r.rank)
            for r in build_cooccurrence_graph(_seqs(spark, rows), cfg).collect()}


def test_window_one_directed_counts_adjacent_pairs(spark):
    e = _edges(spark, [(1, [1, 2, 3]), (2, [1, 2])], window=1)
    assert e == {(1, 2): (2.0, 2, 1), (2, 3): (1.0, 1, 1)}


def test_window_and_decay(spark):
    e = _edges(spark, [(1, [1, 2, 3, 4])], window=2, decay=True)
    assert e[(1, 2)][0] == 1.0 and e[(1, 3)][0] == 0.5 and (1, 4) not in e
    assert e[(1, 2)][2] == 1 and e[(1, 3)][2] == 2


def test_symmetric_pairs_come_from_one_scan_per_offset(spark):
    # the reverse direction was a union with the directed plan, which Spark computed again from the
    # sequences: 2 x window scans instead of window
    seqs = _seqs(spark, [(1, [1, 2, 3, 1]), (2, [3, 2])])
    plan = windowed_pairs(seqs, 3, symmetric=True)._jdf.queryExecution().optimizedPlan().toString()
    assert plan.count("LogicalRDD") == 3
    pairs = sorted(tuple(r) for r in windowed_pairs(seqs, 3, symmetric=True).collect())
    directed = sorted(tuple(r) for r in windowed_pairs(seqs, 3).collect())
    assert pairs == sorted(directed + [(b, a, u) for a, b, u in directed])


def test_symmetric_adds_reverse_edges(spark):
    e = _edges(spark, [(1, [1, 2])], window=1, symmetric=True)
    assert set(e) == {(1, 2), (2, 1)}


def test_self_pairs_skipped_and_min_count(spark):
    e = _edges(spark, [(1, [1, 1, 2]), (2, [1, 2]), (3, [3, 4])], window=1, min_count=2)
    assert e == {(1, 2): (2.0, 2, 1)}


def test_top_n_ties_broken_by_count_then_id(spark):
    # item 1 -> 5, 3, 4 once each (equal weight and count): ranks by neighbour id
    rows = [(1, [1, 5]), (2, [1, 3]), (3, [1, 4]), (4, [1, 9]), (5, [1, 9])]
    e = _edges(spark, rows, window=1, top_n=3)
    assert [k[1] for k, v in sorted(e.items(), key=lambda kv: kv[1][2]) if k[0] == 1] == [9, 3, 4]
    # the extreme BIGINT ids rank as ids (negating -2^63 overflows: an error under ANSI, else the largest)
    lo, hi = -(2 ** 63), 2 ** 63 - 1
    e = _edges(spark, [(1, [1, hi]), (2, [1, 0]), (3, [1, lo])], window=1, top_n=3)
    assert [k[1] for k, v in sorted(e.items(), key=lambda kv: kv[1][2]) if k[0] == 1] == [lo, 0, hi]
    # decayed weight ties: count decides (2 x 0.5 = 1 x 1.0)
    e = _edges(spark, [(1, [1, 7, 8]), (2, [1, 6, 8]), (3, [1, 6])], window=2, decay=True, top_n=3)
    assert e[(1, 6)][2] == 1 and e[(1, 8)][2] == 2 and e[(1, 7)][2] == 3  # 6: 2.0; 8: 1.0 (count 2); 7: 1.0 (count 1)


def test_decayed_weights_are_exact_so_ties_fall_to_the_id(spark):
    """1 -> 5 at distances 2, 3 and 6 and 1 -> 9 at distance 3 three times: both weigh exactly 1 with
    count 3, so the smaller id ranks first. Summed as floats, 0.5 + 1/3 + 1/6 = 0.9999999999999999
    and 9 would rank first on rounding noise."""
    rows = [(1, [1, 100, 5]), (2, [1, 101, 102, 5]), (3, [1, 103, 104, 105, 106, 107, 5])]
    rows += [(4 + u, [1, 200 + 2 * u, 201 + 2 * u, 9]) for u in range(3)]
    e = _edges(spark, rows, window=6, decay=True)
    assert e[(1, 5)] == (1.0, 3, 1) and e[(1, 9)] == (1.0, 3, 2)
    assert graph.weight_scale(6, True) == 60 and graph.weight_scale(6, False) == 1
    assert graph.weight_scale(22, True) == 232_792_560 and graph.weight_scale(23, True) == 0  # decimal weights


def test_decay_beyond_exact_window_sums_rounded_decimals_the_same_in_any_order(spark, caplog):
    with caplog.at_level(logging.WARNING, logger="ml.data.graph"):
        e = _edges(spark, [(1, [1, 2, 3]), (2, [1, 3])], window=23, decay=True)
    assert e[(1, 3)] == (1.5, 2, 1) and e[(1, 2)] == (1.0, 1, 2)
    assert "window=23 with decay" in caplog.text and "not exact" in caplog.text  # said, not silent
    # 1/2 + 1/3 + 1/6 (distances 2, 3 and 6 in three users): as floats 0.9999999999999999 or 1.0 by the
    # order the shuffle adds them in; as decimals rounded to 18 places 1.0 in every order
    # (7, 9) the same from three more users: equal weight and count, so the smaller id ranks first, and
    # both above the weight-1.0 edges of count 1 (a float sum a little under 1 ranked below all of them)
    e = _edges(spark, [(1, [7, 10, 8]), (2, [7, 11, 12, 8]), (3, [7, 13, 14, 15, 16, 17, 8]),
                       (4, [7, 18, 9]), (5, [7, 19, 20, 9]), (6, [7, 21, 22, 23, 24, 25, 9])], window=23, decay=True)
    assert e[(7, 8)] == (1.0, 3, 1) and e[(7, 9)] == (1.0, 3, 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ml.data.graph"):
        _edges(spark, [(1, [1, 2, 3])], window=22, decay=True)
    assert "not exact" not in caplog.text


def test_user_cap_keeps_most_recent_items(spark):
    e = _edges(spark, [(1, [1, 2, 3, 4, 5])], window=1, max_user_length=3)
    assert set(e) == {(3, 4), (4, 5)}


def test_pairs_are_linear_in_length_not_quadratic(spark):
    n, w = 2000, 3
    pairs = windowed_pairs(_seqs(spark, [(1, list(range(n)))]), window=w)
    assert pairs.count() == sum(n - d for d in range(1, w + 1))


def test_top_n_is_a_bounded_aggregate_not_a_sort(spark):
    g = build_cooccurrence_graph(_seqs(spark, [(1, [1, 2, 3])]), GraphConfig(top_n=2))
    plan = g._jdf.queryExecution().executedPlan().toString()
    if graph.has_top_k_aggregate(g):  # Spark >= 4.2: max_by(.., k), no sort of the edges at all
        assert "partial_max_by" in plan and "Window" not in plan
    else:  # older Spark: a window with a per-partition group limit before the shuffle
        assert "WindowGroupLimit" in plan


def test_top_n_above_max_by_limit_uses_the_window(spark, monkeypatch):
    monkeypatch.setattr(graph, "MAX_BY_K_LIMIT", 1)
    g = build_cooccurrence_graph(_seqs(spark, [(1, [1, 2, 3, 1, 3])]), GraphConfig(window=2, top_n=2))
    assert "Window" in g._jdf.queryExecution().executedPlan().toString()
    assert sorted((r.item_id, r.neighbor_id, r.rank) for r in g.collect()) == [
        (1, 2, 2), (1, 3, 1), (2, 1, 1), (2, 3, 2), (3, 1, 1)]  # 1->3 twice; 2->1 / 2->3 tie: smaller id


def test_top_k_aggregate_and_window_give_the_same_rows(spark, monkeypatch):
    """Many tied weights and counts around the cut: both top-N paths pick and rank the same edges."""
    rng = random.Random(7)
    rows = [(u, [rng.randrange(12) for _ in range(rng.randrange(2, 15))]) for u in range(60)]
    cfg = GraphConfig(window=2, decay=True, top_n=4)
    fast = build_cooccurrence_graph(_seqs(spark, rows), cfg).collect()
    monkeypatch.setattr(graph, "has_top_k_aggregate", lambda df: False)
    slow = build_cooccurrence_graph(_seqs(spark, rows), cfg).collect()
    assert sorted(fast) == sorted(slow) and len(fast) == 12 * 4


def test_no_eval_target_leakage(spark, warehouse):
    """The held-out last item never creates an edge: the graph reads training sequences only."""
    from ml.config import SequencesConfig
    from ml.data.sequences import build_sequences

    acts = spark.createDataFrame([(1, 10, 1, None, None, None), (1, 11, 2, None, None, None),
                                  (1, 99, 3, None, None, None)], S.ACTIONS)
    seqs, targets = build_sequences(acts, SequencesConfig())
    edges = build_cooccurrence_graph(seqs, GraphConfig(window=5, symmetric=True))
    assert targets.first().target_item == 99
    assert edges.where((F.col(S.ITEM_ID) == 99) | (F.col(S.NEIGHBOR_ID) == 99)).count() == 0
    assert {r.item_id: r["count"] for r in item_counts(seqs).collect()} == {10: 1, 11: 1}


def test_per_user_counts_each_user_once_per_edge_at_its_nearest_distance(spark):
    # one user alternating 1, 2, 1, 2, ... made edge (1, 2) alone, past min_count and over the edge two
    # users made; per user, weight and count are over users
    rows = [(1, [1, 2, 1, 2, 1, 2, 1, 2]), (2, [1, 3]), (3, [1, 3])]
    assert _edges(spark, rows, window=1, min_count=3) == {(1, 2): (4.0, 4, 1), (2, 1): (3.0, 3, 1)}
    per_user = _edges(spark, rows, window=1, min_count=2, per_user=True)
    assert per_user == {(1, 3): (2.0, 2, 1)}
    top = _edges(spark, rows, window=1, per_user=True, top_n=1)
    assert top[(1, 3)] == (2.0, 2, 1) and (1, 2) not in top
    # with decay, a user's nearest occurrence counts: 1 -> 2 at distance 2 and at 1 gives weight 1
    e = _edges(spark, [(1, [1, 9, 2, 1, 2])], window=2, decay=True, per_user=True)
    assert e[(1, 2)] == (1.0, 1, 1) and e[(9, 1)] == (0.5, 1, 2)


def test_an_empty_graph_is_written_with_a_warning_and_natm_refuses_to_train_on_it(spark, tmp_path, caplog):
    # a min_count above every pair's count: the graph job writes what the settings give (the other
    # models' pipelines run on), and NATM, whose neighbour slots would all be padding, stops naming
    # the keys (before: it trained on padding after an INFO line "0 graph edges")
    import pyarrow as pa
    import pytest
    from deltalake import write_deltalake

    from jobs import graph as graph_job
    from ml.config import load_config
    from ml.data import io
    from ml.errors import InvalidInput
    from ml.train.natm_task import build_natm

    cfg = load_config(None, [f"warehouse={tmp_path / 'wh'}", "graph.window=1", "graph.min_count=3", "model=natm"])
    io.write_table(spark, _seqs(spark, [(1, [1, 2, 3]), (2, [1, 2])]), cfg.table_path(S.T_SEQUENCES))
    with caplog.at_level("WARNING", logger="jobs.graph"):
        assert graph_job.run(cfg, spark)["edges"] == 0
    assert [r.getMessage() for r in caplog.records] == [
        "item_graph is empty: no pair of items within graph.window=1 reaches graph.min_count=3 (NATM cannot train "
        "on it)"]
    write_deltalake(cfg.table_path("noise_q"), pa.table({"item_id": pa.array([1, 2, 3], pa.int64())}))
    with pytest.raises(InvalidInput, match=r"item_graph has no edge between training items: .*graph.window=1 "
                                           r"reaches graph.min_count=3, .*or set natm.num_neighbors=0"):
        build_natm(cfg)

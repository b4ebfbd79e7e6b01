"""Multi-trigger recall (``recent``): fused scores on a hand-computed case, exclusions, the job."""
import pytest
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import ConfigError, RecentConfig, load_config
from ml.data import graph
from ml.index.recent import fuse_recent, recent_triggers
from tests.data.test_graph import _seqs


def _i2i(spark, lists):
    rows = [(item, nb, 1.0 / r, r, "m") for item, nbs in lists.items() for r, nb in enumerate(nbs, 1)]
    return spark.createDataFrame(rows, S.I2I_TOPK)


# user 1 saw 1, 2, 3 (3 last); user 2 saw only 3; user 3's last item has no list
LISTS = {3: [10, 11, 2], 2: [11, 12, 3, 1], 7: [10]}
SEQS = [(1, [1, 2, 3]), (2, [3]), (3, [5])]


def _fused(spark, **kw):
    cfg = RecentConfig(**{"triggers": 2, "decay": 0.5, "rrf_k": 0.0, "k": 10, **kw})
    out = fuse_recent(_seqs(spark, SEQS), _i2i(spark, LISTS), cfg, "m_recent")
    assert [(f.name, f.dataType) for f in out.schema] == [(f.name, f.dataType) for f in S.U2I_TOPK]
    return {u: [(r.item_id, r.score, r.rank) for r in sorted(rows, key=lambda r: r.rank)]
            for u, rows in _by_user(out.collect()).items()}


def _by_user(rows):
    out = {}
    for r in rows:
        out.setdefault(r.user_id, []).append(r)
    return out


def test_recent_triggers_are_the_last_items_newest_first(spark):
    rows = recent_triggers(_seqs(spark, [(1, [4, 5, 6, 7]), (2, [9])]), 3).collect()
    assert sorted((r.user_id, r.step, r.trigger_id) for r in rows) == [(1, 0, 7), (1, 1, 6), (1, 2, 5), (2, 0, 9)]


def test_fused_scores_by_hand(spark):
    got = _fused(spark)
    # user 1: item 3 (step 0, weight 1) lists 10, 11, 2; item 2 (step 1, weight 0.5) lists 11, 12, 3, 1
    # 10: 1/1 = 1; 11: 1/2 + 0.5/1 = 1 (tie: smaller id first); 12: 0.5/2; 1: 0.5/4; 2, 3 are triggers
    assert got[1] == [(10, 1.0, 1), (11, 1.0, 2), (12, 0.25, 3), (1, 0.125, 4)]
    assert got[2][:2] == [(10, 1.0, 1), (11, 0.5, 2)]  # one item: its own list
    assert got[2][2][0] == 2 and got[2][2][1] == pytest.approx(1 / 3, abs=1e-12)  # scores in units of 2^-40
    assert 3 not in got  # no list for the only trigger: no rows (evaluation counts a miss)


def test_a_hot_trigger_is_joined_in_salts_and_gives_the_same_lists(spark, monkeypatch):
    # 30 users end on item 3 (a hot trigger), 10 on item 2: above HOT_TRIGGER_ROWS rows, a trigger's
    # rows are split over salts by user and its list copied to each (adaptive skew handling splits by
    # bytes, and these rows are a few bytes each: one task made all of a hot item's rows x K)
    from ml.index import recent as recent_mod

    seqs = _seqs(spark, [(u, [1 + u % 4, 3]) for u in range(30)] + [(100 + u, [2]) for u in range(10)])
    cfg = RecentConfig(triggers=2, decay=0.5, rrf_k=1.0, k=10)
    plain = fuse_recent(seqs, _i2i(spark, LISTS), cfg, "m_recent")
    assert "_salt" not in plain._jdf.queryExecution().optimizedPlan().toString()
    expected = sorted(tuple(r) for r in plain.collect())
    monkeypatch.setattr(recent_mod, "HOT_TRIGGER_ROWS", 4)  # item 3: 37 rows, 10 salts; item 2: 18, 5 salts
    salted = fuse_recent(seqs, _i2i(spark, LISTS), cfg, "m_recent")
    plan = salted._jdf.queryExecution().optimizedPlan().toString()
    assert "_salt" in plan and "xxhash64(recent-salt" in plan
    assert sorted(tuple(r) for r in salted.collect()) == expected and len(expected) > 100
    joined = recent_mod._join_spreading_hot_triggers(recent_triggers(seqs, 2), _i2i(spark, LISTS).select(
        F.col(S.ITEM_ID).alias("trigger_id"), F.col(S.NEIGHBOR_ID).alias(S.ITEM_ID), S.RANK))
    # each trigger row x its list, once: 30 x item 3's 3, the step-1 items 2 (8 users) and 3 (7; items 1
    # and 4 have no list), 10 x item 2's 4
    assert joined.count() == 30 * 3 + 8 * 4 + 7 * 3 + 10 * 4


def test_history_exclusion_and_k(spark):
    assert _fused(spark, exclude="history")[1] == [(10, 1.0, 1), (11, 1.0, 2), (12, 0.25, 3)]
    assert [i for i, _, _ in _fused(spark, k=2)[1]] == [10, 11]
    # rrf_k damps the head: 11 (ranks 2 and 1) now beats 10 (rank 1 once)
    assert [i for i, _, _ in _fused(spark, rrf_k=10.0)[1]][:2] == [11, 10]


@pytest.mark.parametrize("exclude", ["triggers", "history"])
def test_one_shuffle_by_user_for_the_sums_the_exclusion_and_the_top_k(spark, exclude):
    # it was three: by (user, item) for the sums, by (user, item) for the excluded pairs, by user for the top k
    cfg = RecentConfig(triggers=2, decay=0.5, rrf_k=0.0, k=10, exclude=exclude)
    plan = fuse_recent(_seqs(spark, SEQS), _i2i(spark, LISTS), cfg, "m")._jdf.queryExecution().executedPlan()
    shuffles = [line for line in plan.toString().splitlines() if "Exchange hashpartitioning" in line]
    assert len([x for x in shuffles if "user_id" in x]) == 1 and not [x for x in shuffles if "item_id" in x]


@pytest.mark.parametrize("small", [99, -(2 ** 63)])  # -2^63: the smallest BIGINT, whose negation overflows
def test_equal_rank_multisets_tie_exactly_and_the_smaller_id_wins(spark, small):
    # Items 100 and 99 hold ranks 1..5 in the lists of the last five items, in different orders.
    # The real sums are equal; summed as floats they can differ in the last bit (1/11 + ... + 1/15
    # is 0.38926073926073923 in one order, 0.3892607392607393 in another), and the order Spark adds
    # them in decides which item wins. Integer units make it a tie, broken by the smaller id.
    rank_100, rank_99 = [2, 4, 5, 1, 3], [1, 2, 3, 4, 5]  # as floats 100's sum is larger, either way round
    lists = {}
    for step, trigger in enumerate([5, 4, 3, 2, 1]):  # item 5 is the last one (step 0)
        row = [200 + 10 * trigger + r for r in range(1, 6)]
        row[rank_100[step] - 1], row[rank_99[step] - 1] = 100, small
        lists[trigger] = row
    out = fuse_recent(_seqs(spark, [(1, [1, 2, 3, 4, 5])]), _i2i(spark, lists),
                      RecentConfig(triggers=5, decay=1.0, rrf_k=10.0, k=2), "m_recent").collect()
    top = sorted(out, key=lambda r: r.rank)
    assert [r.item_id for r in top] == [small, 100] and top[0].score == top[1].score


def test_top_k_aggregate_and_window_give_the_same_fused_rows(spark, monkeypatch):
    fast = _fused(spark, rrf_k=1.0)
    monkeypatch.setattr(graph, "has_top_k_aggregate", lambda df: False)
    assert _fused(spark, rrf_k=1.0) == fast


@pytest.mark.parametrize("key, value", [("decay", 0.0), ("decay", 1.5), ("exclude", "seen"), ("k", 0), ("triggers", -1)])
def test_bad_recent_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"recent.{key}"):
        load_config(None, [f"recent.{key}={value}"])


def test_recent_job_needs_triggers_and_a_source_list(spark, warehouse):
    from jobs import recent

    with pytest.raises(ConfigError, match="recent.triggers"):
        recent.run(load_config(None, [f"warehouse={warehouse}"]), spark)
    with pytest.raises(ValueError, match=r"run the topk stage \(jobs.topk\) for model=natm first"):
        recent.run(load_config(None, [f"warehouse={warehouse}", "recent.triggers=3", "model=natm"]), spark)
    with pytest.raises(ValueError, match="run jobs.baseline --model pop first"):  # a baseline's lists: its own job
        recent.run(load_config(None, [f"warehouse={warehouse}", "recent.triggers=3", "model=pop"]), spark)


def test_recent_job_fuses_only_its_models_lists(spark, warehouse):
    from jobs import recent
    from ml.data import io

    cfg = load_config(None, [f"warehouse={warehouse}", "model=cooc", "recent.triggers=2", "recent.decay=0.5",
                             "recent.rrf_k=0", "recent.k=10", "eval.ks=[1, 5, 10]"])
    io.write_table(spark, _seqs(spark, SEQS), cfg.table_path(S.T_SEQUENCES))
    other = {3: [20, 21], 2: [22]}  # another model's lists of the same items
    lists = _i2i(spark, LISTS).withColumn(S.MODEL, F.lit("cooc")).unionByName(
        _i2i(spark, other).withColumn(S.MODEL, F.lit("natm")))
    io.write_table(spark, lists, cfg.table_path(S.T_I2I_TOPK), partition_by=[S.MODEL])
    recent.run(cfg, spark)
    got = io.read_table(spark, cfg.table_path(S.T_U2I_TOPK)).where(F.col(S.MODEL) == "cooc_recent")
    assert {u: [(r.item_id, r.score, r.rank) for r in sorted(rows, key=lambda r: r.rank)]
            for u, rows in _by_user(got.collect()).items()} == _fused(spark)


def test_empty_lists_stop_the_stage_that_made_them_with_the_reason(spark, warehouse):
    # a catalogue of two items, each user has seen both: every fused list is empty (history excluded),
    # and a catalogue of one item has no i2i list at all. Before, the next stage blamed a stage
    # that had just run ("run jobs.baseline first", "run its topk (or recent) stage first").
    from jobs import baseline, recent
    from ml.data import io

    cfg = load_config(None, [f"warehouse={warehouse}", "model=cooc", "recent.triggers=2", "recent.exclude=history"])
    io.write_table(spark, _seqs(spark, [(1, [1, 2, 1]), (2, [2, 1])]), cfg.table_path(S.T_SEQUENCES))
    assert baseline.run(cfg, spark)["rows"] == 2  # 1 -> 2 and 2 -> 1
    # yesterday's fused lists, which the empty run must leave as they are (before, it replaced them
    # with nothing and then raised)
    u2i = cfg.table_path(S.T_U2I_TOPK)
    io.write_table(spark, spark.createDataFrame([(1, 5, 1.0, 1, "cooc_recent")], S.U2I_TOPK), u2i,
                   partition_by=[S.MODEL])
    with pytest.raises(ValueError, match=r"u2i_topk\[cooc_recent\]: every user's list is empty: .*recent.exclude="
                                         r"history .*recent.triggers=0 leaves the stage out; the fused lists are "
                                         "left as they were"):
        recent.run(cfg, spark)
    assert io.table_version(u2i) == 0 and [tuple(r) for r in io.read_table(spark, u2i).collect()] == [
        (1, 5, 1.0, 1, "cooc_recent")]
    i2i = cfg.table_path(S.T_I2I_TOPK)
    kept = sorted(tuple(r) for r in io.read_table(spark, i2i).collect())
    io.write_table(spark, _seqs(spark, [(1, [7, 7]), (2, [7])]), cfg.table_path(S.T_SEQUENCES), mode="overwrite")
    version = io.table_version(i2i)
    with pytest.raises(ValueError, match=r"i2i_topk\[cooc\]: no item has a list: the training sequences hold 1 "
                                         r"item\(s\), and a list never holds its own item; the model's lists are "
                                         "left as they were"):
        baseline.run(cfg, spark)
    assert io.table_version(i2i) == version and sorted(tuple(r) for r in io.read_table(spark, i2i).collect()) == kept
    assert len(kept) == 2


def test_baseline_lists_are_spread_by_their_rows_not_by_the_ids_bytes(spark, warehouse, monkeypatch):
    # the catalogue's ids are small in bytes: adaptive execution gave the k + 1 rows per id (10^9 at
    # 10^7 items) the few tasks their bytes asked for. Now one task per baseline.LIST_ROWS_PER_TASK rows.
    from deltalake import DeltaTable

    from jobs import baseline
    from ml.data import io

    cfg = load_config(None, [f"warehouse={warehouse}", "baseline.k=20", "eval.ks=[1, 5]"])
    io.write_table(spark, _seqs(spark, [(u, [(u * 7 + j) % 40 + 1 for j in range(6)]) for u in range(1, 31)]),
                   cfg.table_path(S.T_SEQUENCES))
    monkeypatch.setattr(baseline, "LIST_ROWS_PER_TASK", 40 * 21 // 5)  # 40 items x (k + 1) rows: five tasks
    for model in ("pop", "cooc"):
        baseline.run(cfg, spark, model)
        lists = io.read_table(spark, cfg.table_path(S.T_I2I_TOPK)).where(F.col(S.MODEL) == model)
        assert lists.count() == 40 * 20  # every item a full list (cooc: most of it filled from the popular items)
        # pop: the five tasks; cooc: the fill-ins' five and the graph's part (at most 2 shuffle partitions
        # here). Before: as many as adaptive execution coalesced the ids' bytes to (2 files, and 2 + 2)
        files = len(DeltaTable(cfg.table_path(S.T_I2I_TOPK)).file_uris([(S.MODEL, "=", model)]))
        assert 5 <= files <= (5 if model == "pop" else 7), (model, files)

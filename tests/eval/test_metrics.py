"""Metrics on a hand-computed example, and the i2i_topk contract of the baselines."""
import pytest
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import BaselineConfig
from ml.data import io
from ml.data.baselines import cooccurrence_topk, popularity_topk
from ml.data.graph import item_counts
from ml.errors import InvalidInput
from ml.eval.metrics import (check_lists, compute_metrics, format_paired, format_table, paired_comparison,
                             paired_comparisons, score_lists, target_ranks)


def _topk(spark, rows, model="m"):
    return spark.createDataFrame([(i, n, 1.0 / r, r, model) for i, n, r in rows], S.I2I_TOPK)


def test_metrics_hand_computed(spark):
    topk = _topk(spark, [(1, 2, 1), (1, 3, 2), (1, 4, 3), (5, 6, 1), (5, 7, 2)])
    targets = spark.createDataFrame([
        (1, 1, 3, 0, 1),   # rank 2
        (2, 1, 2, 0, 1),   # rank 1
        (3, 5, 9, 0, 1),   # not in list
        (4, 8, 2, 0, 1),   # trigger has no list -> a miss, still counted
        (5, 1, 4, 0, 1),   # rank 3; item 4 has no category: in the overall row only
    ], S.EVAL_TARGETS)
    items = spark.createDataFrame([(3, 100, None, None, None), (2, 100, None, None, None), (9, 200, None, None, None)],
                                  S.ITEMS_TABLE)
    rows = compute_metrics(targets, topk, [1, 2, 3], "m", items).collect()
    overall_rows = [r for r in rows if r.category_id is None]
    assert len(overall_rows) == 4  # one per metric (a null-category group used to add a second "overall")
    overall = {(r.metric, r.k): r.value for r in overall_rows}
    assert overall == {("pre", 1): 0.2, ("pre", 2): 0.4, ("pre", 3): 0.6,
                       ("mrr", None): pytest.approx((0.5 + 1.0 + 1 / 3) / 5)}
    assert {r.n_users for r in overall_rows} == {5}
    cat100 = {(r.metric, r.k): r.value for r in rows if r.category_id == 100}
    assert cat100[("pre", 1)] == pytest.approx(1 / 3) and cat100[("mrr", None)] == pytest.approx(1.5 / 3)
    cat200 = {(r.metric, r.k): r.value for r in rows if r.category_id == 200}
    assert cat200[("pre", 3)] == 0.0
    text = format_table([r.asDict() for r in rows], [1, 2, 3])
    assert "0.2000" in text and "0.3667" in text


def test_lists_that_would_be_scored_wrongly_are_refused_naming_the_model_and_a_list(spark):
    # each of these was scored as given: a row twice counted a user twice (Pre@1 0.25 over 4 "users" of 3),
    # two items at rank 1 were two hits at K = 1, rank 0 divided by zero, a self-neighbour made a
    # target equal to its trigger a hit
    targets = spark.createDataFrame([(1, 1, 3, 0, 1), (2, 5, 6, 0, 1), (3, 4, 4, 0, 1)], S.EVAL_TARGETS)
    def _topk(spark, rows):  # any rank, 0 included
        return spark.createDataFrame([(i, n, 1.0 / (r + 1), r, "m") for i, n, r in rows], S.I2I_TOPK)

    others = [(5, 6, 1), (4, 7, 1), (9, 9, 1)]  # 9 lists itself, but no target looks it up
    check_lists(_topk(spark, [(1, 2, 1), (1, 3, 2)] + others), "i2i", "m", targets)
    for rows, why in (([(1, 3, 1), (1, 3, 2)], "an item listed twice"),
                      ([(1, 2, 1), (1, 3, 1)], "ranks other than 1..n"),
                      ([(1, 2, 0), (1, 3, 1)], "ranks other than 1..n"),
                      ([(1, 2, 1), (1, 3, 3)], "ranks other than 1..n"),
                      ([(1, 1, 1), (1, 3, 2)], "its own item in the list")):
        with pytest.raises(InvalidInput, match=rf"i2i_topk, model 'm': 1 lists with {why}.*\(e\.g\. item_id 1\)"):
            check_lists(_topk(spark, rows + others), "i2i", "m", targets)
    from pyspark.sql.types import StructField, StructType

    nullable = StructType([StructField(f.name, f.dataType, True) for f in S.I2I_TOPK.fields])  # not the contract's
    for score in (None, float("nan")):
        with pytest.raises(InvalidInput, match="1 lists with a null or NaN score"):
            check_lists(spark.createDataFrame([(1, 3, score, 1, "m")], nullable), "i2i", "m", targets)
    u2i = spark.createDataFrame([(1, 3, 0.9, 1, "m"), (1, 7, 0.8, 1, "m"), (2, 1, 0.5, 1, "m")], S.U2I_TOPK)
    with pytest.raises(InvalidInput, match=r"u2i_topk, model 'm': 1 lists with ranks other than 1\.\.n .*\(e\.g\. user_id 1\)"):
        check_lists(u2i, "u2i", "m", targets)


def test_u2i_metrics_hand_computed(spark):
    u2i = spark.createDataFrame([(1, 3, 0.9, 1, "m"), (1, 7, 0.8, 2, "m"), (2, 5, 0.9, 1, "m"), (2, 2, 0.5, 2, "m")],
                                S.U2I_TOPK)
    targets = spark.createDataFrame([
        (1, 9, 7, 0, 1),   # user 1: target at rank 2 (the trigger plays no part in u2i)
        (2, 9, 5, 0, 1),   # user 2: rank 1
        (3, 9, 5, 0, 1),   # user 3 has no list -> a miss, still counted
    ], S.EVAL_TARGETS)
    rows = compute_metrics(targets, u2i, [1, 2], "m", kind="u2i").collect()
    got = {(r.metric, r.k): r.value for r in rows}
    assert got == {("u2i_hr", 1): pytest.approx(1 / 3), ("u2i_hr", 2): pytest.approx(2 / 3),
                   ("u2i_mrr", None): pytest.approx(1.5 / 3)}
    assert "m u2i" in format_table([r.asDict() for r in rows], [1, 2])


def test_paired_comparison_hand_computed(spark):
    """Model vs baseline user by user: per-target differences, their mean, 95 % interval, p-value,
    wins and losses, a miss counting 0 on either side; a u2i model against i2i baseline lists."""
    import math
    import statistics

    a = _topk(spark, [(1, 3, 1), (1, 2, 2), (5, 6, 1), (5, 7, 2)], "a")
    b = _topk(spark, [(1, 2, 1), (1, 3, 2), (8, 2, 1)], "b")
    targets = spark.createDataFrame([
        (1, 1, 3, 0, 1),  # a rank 1, b rank 2
        (2, 1, 2, 0, 1),  # a rank 2, b rank 1
        (3, 5, 6, 0, 1),  # a rank 1, b has no list for 5
        (4, 8, 2, 0, 1),  # a has no list for 8, b rank 1
        (5, 5, 7, 0, 1),  # a rank 2, b none
    ], S.EVAL_TARGETS)
    rows = {(r["metric"], r["k"]): r for r in paired_comparison(targets, a, b, [1, 2], "a", "b")}
    assert set(rows) == {("pre", 1), ("pre", 2), ("mrr", None)}
    per_user = {("pre", 1): ([1, 0, 1, 0, 0], [0, 1, 0, 1, 0]), ("pre", 2): ([1, 1, 1, 0, 1], [1, 1, 0, 1, 0]),
                ("mrr", None): ([1, .5, 1, 0, .5], [.5, 1, 0, 1, 0])}
    for key, (va, vb) in per_user.items():
        r, d = rows[key], [x - y for x, y in zip(va, vb)]
        half = 1.959964 * statistics.stdev(d) / math.sqrt(5)
        assert r["value"] == pytest.approx(sum(va) / 5) and r["baseline_value"] == pytest.approx(sum(vb) / 5)
        assert r["diff"] == pytest.approx(sum(d) / 5)
        if key[0] == "mrr":  # normal interval of the mean difference
            assert (r["ci_low"], r["ci_high"]) == pytest.approx((sum(d) / 5 - half, sum(d) / 5 + half))
        assert (r["wins"], r["losses"], r["n_users"]) == (sum(x > 0 for x in d), sum(x < 0 for x in d), 5)
    # hits with few disagreements: the exact interval that goes with McNemar's exact test. Pre@1: 2 wins,
    # 2 losses: Clopper-Pearson for 2 of 4 is [0.067586, 0.932414], so (4 / 5) (2 pi - 1) = -+0.69186
    assert (rows[("pre", 1)]["ci_low"], rows[("pre", 1)]["ci_high"]) == pytest.approx((-0.69186, 0.69186), abs=1e-4)
    # Pre@2: d = 0, 0, 1, -1, 1: 2 wins, 1 loss; McNemar's exact test: p = 2 (1 + 3) / 8 = 1 (the
    # normal approximation of z = mean / (sd / sqrt(n)) said 0.593, flattering the model)
    assert rows[("pre", 2)]["p_value"] == pytest.approx(1.0)
    assert rows[("pre", 1)]["p_value"] == pytest.approx(1.0)  # 2 wins, 2 losses: no difference
    # MRR (not 0/1): d = 0.5, -0.5, 1, -1, 0.5: the z test, mean 0.1, sd 0.8216, p = 0.785
    assert rows[("mrr", None)]["p_value"] == pytest.approx(0.785, abs=1e-3)
    # the numpy twin (bench/) from the same ranks (0 = not in the list) gives the same rows
    from ml.eval.offline import paired_ranks
    twin = paired_ranks([1, 2, 1, 0, 2], [2, 1, 0, 1, 0], [1, 2])
    for (metric, k), name in ((("pre", 1), "Pre@1"), (("pre", 2), "Pre@2"), (("mrr", None), "MRR")):
        for col in ("value", "baseline_value", "diff", "ci_low", "ci_high", "p_value", "wins", "losses"):
            assert twin[name][col] == pytest.approx(rows[(metric, k)][col]), (name, col)
    text = format_paired(list(rows.values()))
    assert "a vs b, paired over 5 eval users" in text and "+0.2000" in text and "0.785" in text

    u2i = spark.createDataFrame([(1, 3, 0.9, 1, "r"), (4, 2, 0.9, 1, "r")], S.U2I_TOPK)  # users 1 and 4 hit at 1
    got = paired_comparison(targets, u2i, b, [1], "r", "b", kind="u2i", baseline_kind="i2i")
    pre1 = next(r for r in got if r["k"] == 1)
    assert (pre1["metric"], pre1["baseline_kind"], pre1["wins"], pre1["losses"]) == ("u2i_hr", "i2i", 1, 1)
    assert "r u2i vs b" in format_paired(got)
    one = paired_comparison(targets.where("user_id = 3"), a, b, [1], "a", "b")  # one user: no spread
    assert math.isnan(one[0]["p_value"]) and one[0]["ci_low"] == -math.inf and one[0]["diff"] == 1.0
    same = paired_comparison(targets.where("user_id in (3, 5)"), a, b, [2], "a", "b")  # both +1 at Pre@2
    # two wins, no loss: p = 0.5 and an interval that includes 0 (Clopper-Pearson for 2 of 2: [0.158, 1])
    assert same[0]["p_value"] == pytest.approx(0.5) and same[0]["ci_high"] == same[0]["diff"] == 1.0
    assert same[0]["ci_low"] == pytest.approx(2 * math.sqrt(0.025) - 1, abs=1e-6)
    with pytest.raises(ValueError, match="eval_targets is empty"):
        paired_comparison(targets.where("user_id = 0"), a, b, [1], "a", "b")


def test_hit_p_values_are_exact_when_few_users_disagree():
    from ml.eval.offline import EXACT_BELOW, paired_stats, sign_test

    n = 6040
    for wins, losses, exact in ((1, 0, 1.0), (3, 0, 0.25), (5, 1, 0.21875)):
        mean = (wins - losses) / n
        sd = ((wins + losses) / n - mean ** 2) ** 0.5 * (n / (n - 1)) ** 0.5
        assert paired_stats(mean, sd, n, wins, losses, hits=True)[2] == pytest.approx(exact)
        assert paired_stats(mean, sd, n, wins, losses)[2] < exact  # the z test: too small here
    assert sign_test(30, 10) == pytest.approx(0.002221, abs=1e-6)
    big_w, big_l = EXACT_BELOW + 20, EXACT_BELOW - 10  # enough disagreement: the z test again
    mean = (big_w - big_l) / n
    sd = ((big_w + big_l) / n - mean ** 2) ** 0.5
    assert paired_stats(mean, sd, n, big_w, big_l, hits=True)[2] == paired_stats(mean, sd, n, big_w, big_l)[2]


def _seqs(spark, rows):
    return spark.createDataFrame([(u, items, list(range(len(items))), len(items)) for u, items in rows], S.SEQUENCES)


SEQS = [(1, [1, 2, 3, 1, 2]), (2, [2, 3, 4]), (3, [1, 2, 5]), (4, [6, 2])]


def _contract(df, k):
    assert [(f.name, f.dataType.simpleString()) for f in df.schema] == [
        (f.name, f.dataType.simpleString()) for f in S.I2I_TOPK]
    rows = df.collect()
    assert all(r.item_id != r.neighbor_id for r in rows)
    by_item = {}
    for r in rows:
        by_item.setdefault(r.item_id, []).append(r)
    for lst in by_item.values():
        ranks = sorted(r.rank for r in lst)
        assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= k
        assert len({r.neighbor_id for r in lst}) == len(lst)
        ordered = sorted(lst, key=lambda r: r.rank)
        assert all(a.score >= b.score for a, b in zip(ordered, ordered[1:]))
    return by_item


def test_pop_baseline_contract(spark):
    seqs = _seqs(spark, SEQS)
    counts = item_counts(seqs)
    cat = counts.select(S.ITEM_ID).union(spark.createDataFrame([(77,)], "item_id long"))
    by_item = _contract(popularity_topk(cat, counts, 3), 3)
    # popularity: 2 (x5), 1 (x3), 3 (x2), then 4/5/6 (x1) by id
    assert [r.neighbor_id for r in sorted(by_item[77], key=lambda r: r.rank)] == [2, 1, 3]
    assert [r.neighbor_id for r in sorted(by_item[2], key=lambda r: r.rank)] == [1, 3, 4]  # never itself
    # every item's list is the popularity order without the item itself, first k (the ranks are
    # computed, not sorted: an item in the middle of the order shifts only the entries below it)
    order = [2, 1, 3, 4, 5, 6]
    for item, lst in by_item.items():
        assert [(r.neighbor_id, r.rank) for r in sorted(lst, key=lambda r: r.rank)] == \
            [(n, i) for i, n in enumerate([n for n in order if n != item][:3], 1)], item
    assert set(by_item) == {1, 2, 3, 4, 5, 6, 77}
    assert [r.score for r in sorted(by_item[1], key=lambda r: r.rank)] == [5.0, 2.0, 1.0]
    plan = popularity_topk(cat, counts, 3)._jdf.queryExecution().executedPlan().toString()
    assert "Window" not in plan  # no per-item sort of catalogue x (k + 1) rows


def test_cooc_baseline_graph_first_then_popularity_fill(spark):
    seqs = _seqs(spark, SEQS)
    counts = item_counts(seqs)
    by_item = _contract(cooccurrence_topk(seqs, counts.select(S.ITEM_ID), counts,
                                          BaselineConfig(k=4, window=1, symmetric=False)), 4)
    six = [r.neighbor_id for r in sorted(by_item[6], key=lambda r: r.rank)]
    assert six == [2, 1, 3, 4]  # 6 -> 2 from the graph, then popular items (not 6, not 2 again)
    one = sorted(by_item[1], key=lambda r: r.rank)
    assert one[0].neighbor_id == 2 and one[0].score == 3.0  # 1 -> 2 three times


def _cooc_by_sorting(seqs, catalogue, counts, cfg):
    """The cooc lists as a per-item sort of graph and fill-in candidates would rank them (the plan the
    baseline had): the reference the computed fill-in ranks must equal."""
    from pyspark.sql import Window

    from ml.data.baselines import most_popular
    from ml.data.graph import cooccurrence_edges, top_n_neighbours

    k = cfg.k
    graph = top_n_neighbours(cooccurrence_edges(seqs, cfg.window, cfg.decay, cfg.symmetric, cfg.min_count,
                                                cfg.per_user), k)
    cands = graph.select(S.ITEM_ID, S.NEIGHBOR_ID, F.col(S.WEIGHT).alias(S.SCORE), F.lit(0).alias("prio"),
                         F.col(S.RANK).alias("order")).unionByName(
        catalogue.select(S.ITEM_ID).distinct().crossJoin(most_popular(counts, 2 * k + 1)).select(
            S.ITEM_ID, S.NEIGHBOR_ID, (-F.col("pop_rank")).cast("double").alias(S.SCORE), F.lit(1).alias("prio"),
            F.col("pop_rank").alias("order")))
    cands = cands.withColumn("_r", F.row_number().over(
        Window.partitionBy(S.ITEM_ID, S.NEIGHBOR_ID).orderBy("prio"))).where("_r = 1")
    order = Window.partitionBy(S.ITEM_ID).orderBy("prio", F.desc(S.SCORE), "order", S.NEIGHBOR_ID)
    ranked = cands.where(F.col(S.ITEM_ID) != F.col(S.NEIGHBOR_ID)).withColumn(S.RANK, F.row_number().over(order))
    return {(r[0], r[1], r[2], r[3]) for r in ranked.where(F.col(S.RANK) <= k)
            .select(S.ITEM_ID, S.NEIGHBOR_ID, S.SCORE, S.RANK).collect()}


# k = 30: the 2k + 1 most popular are more than the log has items, so every list is short and its
# fill-ins run past the last popular item
@pytest.mark.parametrize("k,window,symmetric", [(2, 1, False), (5, 2, True), (12, 3, False), (30, 2, False)])
def test_cooc_fill_in_ranks_are_computed_as_a_per_item_sort_would_rank_them(spark, k, window, symmetric):
    import random

    rnd = random.Random(k)
    # a Zipf-ish log: popular items in many lists (skipped by their fill-ins), items with a short list,
    # items only in the catalogue (all fill-in), ties of popularity
    seqs = _seqs(spark, [(u, [min(int(rnd.paretovariate(1.2)), 40) for _ in range(rnd.randint(1, 8))])
                         for u in range(60)])
    counts = item_counts(seqs)
    catalogue = counts.select(S.ITEM_ID).union(spark.createDataFrame([(900,), (901,), (None,)], "item_id long"))
    cfg = BaselineConfig(k=k, window=window, symmetric=symmetric)
    got = cooccurrence_topk(seqs, catalogue, counts, cfg)
    _contract(got, k)
    assert {(r[0], r[1], r[2], r[3]) for r in got.select(S.ITEM_ID, S.NEIGHBOR_ID, S.SCORE, S.RANK).collect()} == \
        _cooc_by_sorting(seqs, catalogue, counts, cfg)
    assert "Window" not in got._jdf.queryExecution().executedPlan().toString()  # no per-item sort


def test_cooc_baseline_ranks_equal_weights_as_the_graph_does(spark):
    # with 1/d decay, 9 -> 3 once at distance 1 and 9 -> 8 twice at distance 2 both weigh 1.0: the
    # graph ranks the larger count first (8, then 3); the cooc list re-ranked its top-k by id (3, 8)
    from ml.config import GraphConfig
    from ml.data.graph import build_cooccurrence_graph

    seqs = _seqs(spark, [(1, [9, 3]), (2, [9, 4, 8]), (3, [9, 5, 8])])
    counts = item_counts(seqs)
    graph = build_cooccurrence_graph(seqs, GraphConfig(window=2, decay=True, symmetric=False, top_n=2))
    assert [r.neighbor_id for r in graph.where("item_id = 9").orderBy("rank").collect()] == [8, 3]
    cfg = BaselineConfig(k=2, window=2, symmetric=False, decay=True)
    nine = sorted(_contract(cooccurrence_topk(seqs, counts.select(S.ITEM_ID), counts, cfg), 2)[9],
                  key=lambda r: r.rank)
    assert [(r.neighbor_id, r.score) for r in nine] == [(8, 1.0), (3, 1.0)]


def test_rerun_of_one_model_leaves_the_other(spark, warehouse):
    path = f"{warehouse}/i2i"
    a = _topk(spark, [(1, 2, 1), (1, 3, 2)], "pop")
    b = _topk(spark, [(1, 4, 1)], "cooc")
    for df, m in ((a, "pop"), (b, "cooc")):
        io.write_table(spark, df, path, partition_by=[S.MODEL], replace_where={S.MODEL: m})
    io.write_table(spark, _topk(spark, [(1, 9, 1)], "pop"), path, partition_by=[S.MODEL], replace_where={S.MODEL: "pop"})
    got = sorted((r.model, r.neighbor_id) for r in io.read_table(spark, path).collect())
    assert got == [("cooc", 4), ("pop", 9)]


@pytest.mark.parametrize("wins,losses", [(4, 0), (5, 0), (6, 0), (7, 1), (10, 2), (20, 9), (3, 3), (0, 0)])
def test_exact_interval_excludes_zero_exactly_when_the_exact_test_rejects(wins, losses):
    # with few disagreements the p-value is McNemar's exact test; the normal interval beside it
    # excluded 0 at 4 wins, 0 losses (p = 0.125)
    from ml.eval.offline import paired_stats

    n = 6040
    lo, hi, p = paired_stats((wins - losses) / n, 0.03, n, wins, losses, hits=True)
    assert lo <= (wins - losses) / n <= hi
    assert (lo > 0 or hi < 0) == (p < 0.05)
    if wins + losses:
        assert -1 <= lo * n / (wins + losses) and hi * n / (wins + losses) <= 1


def test_report_says_which_models_were_scored_on_other_eval_targets(spark, warehouse):
    from jobs import evaluate
    from ml.config import load_config

    cfg = load_config(None, [f"warehouse={warehouse}", "eval.compare_to=[]"])
    path = cfg.table_path(S.T_I2I_TOPK)
    for m in ("pop", "cooc"):
        io.write_table(spark, _topk(spark, [(1, 2, 1), (5, 6, 1)], m), path, partition_by=[S.MODEL],
                       replace_where={S.MODEL: m})
    targets = [(1, 1, 2, 0, 1), (2, 5, 7, 0, 1), (3, 5, 6, 0, 1)]
    io.write_table(spark, spark.createDataFrame(targets, S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    evaluate.run(cfg, spark, ["pop"])
    io.write_table(spark, spark.createDataFrame(targets[:2], S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    out = evaluate.run(cfg, spark, ["cooc"])  # pop's metrics are still those of the 3 earlier users
    html = open(out["report"]).read()
    assert "note: pop were scored on other eval targets than today&#x27;s 2 users" in html
    assert "cooc were" not in html
    # other targets for as many users (ML-1M's validation and test splits: 6,040 each): the count alone
    # did not tell them apart
    other = [(1, 1, 2, 0, 1), (2, 5, 6, 0, 1)]
    io.write_table(spark, spark.createDataFrame(other, S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    html = open(evaluate.run(cfg, spark, ["pop"])["report"]).read()
    assert "note: cooc were scored on other eval targets than today&#x27;s 2 users" in html
    assert "pop were" not in html
    # the same targets in another order (a rewrite of eval_targets): the same fingerprint
    io.write_table(spark, spark.createDataFrame(other[::-1], S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    html = open(evaluate.run(cfg, spark, ["cooc"])["report"]).read()
    assert "note:" not in html


def test_empty_eval_targets_is_an_error_and_writes_nothing(spark, warehouse):
    from jobs import evaluate
    from ml.config import load_config

    cfg = load_config(None, [f"warehouse={warehouse}", "eval.compare_to=[]"])
    io.write_table(spark, _topk(spark, [(1, 2, 1)], "pop"), cfg.table_path(S.T_I2I_TOPK), partition_by=[S.MODEL],
                   replace_where={S.MODEL: "pop"})
    io.write_table(spark, spark.createDataFrame([(1, 1, 2, 0, 1)], S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    evaluate.run(cfg, spark, ["pop"])
    before = io.table_version(cfg.table_path(S.T_METRICS))
    io.write_table(spark, spark.createDataFrame([], S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    with pytest.raises(InvalidInput, match="eval_targets is empty"):  # not metrics averaged over no one
        evaluate.run(cfg, spark, ["pop"])
    assert io.table_version(cfg.table_path(S.T_METRICS)) == before


@pytest.mark.parametrize("raced", [False, True])
def test_a_metrics_table_from_before_the_targets_column_gets_it(spark, warehouse, monkeypatch, raced):
    from jobs import evaluate
    from ml.config import load_config

    cfg = load_config(None, [f"warehouse={warehouse}", "eval.compare_to=[]"])
    io.write_table(spark, _topk(spark, [(1, 2, 1)], "pop"), cfg.table_path(S.T_I2I_TOPK), partition_by=[S.MODEL],
                   replace_where={S.MODEL: "pop"})
    io.write_table(spark, spark.createDataFrame([(1, 1, 2, 0, 1)], S.EVAL_TARGETS), cfg.table_path(S.T_EVAL_TARGETS))
    old_schema = S.METRICS.fieldNames()[:-1]
    import datetime

    old = spark.createDataFrame([("cooc", "pre", 1, None, 0.5, 1, datetime.datetime(2026, 1, 1))],
                                "model string, metric string, k int, category_id bigint, value double, "
                                "n_users bigint, run_ts timestamp").select(*old_schema)
    io.write_table(spark, old, cfg.table_path(S.T_METRICS), partition_by=[S.MODEL])
    if raced:  # another evaluation adds the column, with its own cooc rows, as this one rewrites the table
        write, other = io.write_table, []

        def racing(*args, **kwargs):
            if kwargs.get("base_version") is not None and not other:
                other.append(1)
                newer = old.withColumn(S.VALUE, F.lit(0.7)).withColumn(S.TARGETS, F.lit("other"))
                write(spark, newer, cfg.table_path(S.T_METRICS), partition_by=[S.MODEL], overwrite_schema=True)
            return write(*args, **kwargs)

        monkeypatch.setattr(io, "write_table", racing)
    evaluate.run(cfg, spark, ["pop"])
    got = io.read_table(spark, cfg.table_path(S.T_METRICS))
    assert S.TARGETS in got.columns
    by_model = {r.model: (r.value, r.targets) for r in got.where(F.col(S.K) == 1).collect()}
    # raced: the other job's rows stay; the stale copy read before them was not written over them
    assert by_model["cooc"] == ((0.7, "other") if raced else (0.5, None)) and by_model["pop"][1].startswith("1:")


def test_an_item_listed_twice_in_items_counts_its_targets_once(spark):
    # before: the overall row was aggregated after the category join, so a target whose item had two
    # items rows was two users (Pre@1 0.2 over 5 "users" instead of 0.3333 over 3)
    topk = _topk(spark, [(1, 20, 1), (1, 30, 2)])
    targets = spark.createDataFrame([(1, 1, 20, 0, 1), (2, 1, 40, 0, 1), (3, 1, 20, 0, 1)], S.EVAL_TARGETS)
    items = spark.createDataFrame([(20, 200, None, None, None), (20, 100, None, None, None),
                                   (40, 100, None, None, None)], S.ITEMS_TABLE)
    alone = {(r.metric, r.k): (r.value, r.n_users) for r in compute_metrics(targets, topk, [1], "m").collect()}
    assert alone == {("pre", 1): (pytest.approx(2 / 3), 3), ("mrr", None): (pytest.approx(2 / 3), 3)}
    rows = compute_metrics(targets, topk, [1], "m", items).collect()
    assert {(r.metric, r.k): (r.value, r.n_users) for r in rows if r.category_id is None} == alone
    # item 20 in one category (the smaller id), so each target is in one category row
    assert {(r.category_id, r.metric): (r.value, r.n_users) for r in rows if r.category_id is not None} == {
        (100, "pre"): (pytest.approx(2 / 3), 3), (100, "mrr"): (pytest.approx(2 / 3), 3)}


def test_models_and_kinds_scored_in_one_pass_give_each_models_rows(spark):
    # the evaluation job scores the lists of every model and kind in one aggregation, and compares every
    # pair in another: each row must be what that model's lists alone give, checked against a
    # target-by-target count here (a model without a hit, a u2i model, per category, a target row
    # listed twice: counted twice, as every eval target row is a user)
    import random
    from decimal import ROUND_HALF_UP, Decimal
    from fractions import Fraction

    rnd = random.Random(7)
    n_items, users, ks = 40, 300, [1, 5]
    lists = {m: [(i, n, 1.0 / r, r, m) for i in range(n_items)
                 for r, n in enumerate(rnd.sample([x for x in range(n_items) if x != i], 12), 1)]
             for m in ("a", "b")}
    lists["c"] = [(999, 1, 1.0, 1, "c")]  # one list, for no target's trigger
    lists["d"] = [(u, (u + j) % n_items, 1.0, j + 1, "d") for u in range(0, users, 2) for j in (0, 1)]  # u2i
    topk = spark.createDataFrame(lists["a"] + lists["b"] + lists["c"], S.I2I_TOPK)
    u2i = spark.createDataFrame(lists["d"], S.U2I_TOPK)
    def rank(m, row):
        key = row[0] if m == "d" else row[1]
        return next((r for k, n, _, r, _ in lists[m] if k == key and n == row[2]), None)

    rows = [(u, rnd.randrange(n_items), rnd.randrange(n_items), 0, 1) for u in range(users)]
    rows.append(next(r for r in rows if rank("a", r) and not rank("b", r)))  # a target row twice, a hit of a's
    targets = spark.createDataFrame(rows, S.EVAL_TARGETS)
    items = spark.createDataFrame([(i, i % 4, None, None, None) for i in range(n_items - 1)], S.ITEMS_TABLE)
    cat = {i: i % 4 for i in range(n_items - 1)}  # the last item has no category: overall rows only

    got = {(r.model, r.metric, r.k, r.category_id): (r.value, r.n_users) for r in
           score_lists(targets, [("i2i", topk, ["a", "b", "c"]), ("u2i", u2i, ["d"])], ks, items).collect()}
    expected = {}
    for m in "abcd":
        hit, mrr = ("u2i_hr", "u2i_mrr") if m == "d" else ("pre", "mrr")
        for c in [None, 0, 1, 2, 3]:
            mine = [rank(m, r) for r in rows if c is None or cat.get(r[2]) == c]
            for k in ks:
                expected[(m, hit, k, c)] = (sum(1 for x in mine if x and x <= k) / len(mine), len(mine))
            expected[(m, mrr, None, c)] = (pytest.approx(sum(1 / x for x in mine if x) / len(mine), rel=1e-15),
                                           len(mine))
    assert got == expected
    assert 0 < got[("a", "pre", 5, None)][0] < 1 and got[("d", "u2i_hr", 5, None)][0] > 0
    assert all(v[0] == 0 for k, v in got.items() if k[0] == "c")
    alone = {(r.model, r.metric, r.k, r.category_id): (r.value, r.n_users)
             for r in compute_metrics(targets, u2i, ks, "d", items, kind="u2i").collect()}
    assert alone == {k: v for k, v in got.items() if k[0] == "d"}
    with pytest.raises(ValueError, match="no lists to score"):
        score_lists(targets, [], [1])

    # the comparisons: three pairs in one pass (a u2i model against i2i lists, lists that hit nothing)
    frames = {("a", "i2i"): topk.where("model = 'a'"), ("b", "i2i"): topk.where("model = 'b'"),
              ("c", "i2i"): topk.where("model = 'c'"), ("d", "u2i"): u2i}
    pairs = [(("a", "i2i"), ("b", "i2i")), (("c", "i2i"), ("a", "i2i")), (("d", "u2i"), ("a", "i2i"))]
    for ((m, _), (b, _)), prs in zip(pairs, paired_comparisons(targets, frames, pairs, ks)):
        for r in prs:
            k = r[S.K]
            # a hit, or the reciprocal rank as Spark keeps it (the double 1 / rank, by its decimal
            # string, as a decimal(20,18))
            value = ((lambda x: 1 if x and x <= k else 0) if k is not None
                     else (lambda x: Fraction(Decimal(repr(1 / x)).quantize(Decimal("1e-18"), ROUND_HALF_UP))
                           if x else 0))
            va, vb = [value(rank(m, t)) for t in rows], [value(rank(b, t)) for t in rows]
            d = [x - y for x, y in zip(va, vb)]
            assert (r["wins"], r["losses"], r[S.N_USERS]) == (sum(x > 0 for x in d), sum(x < 0 for x in d), users + 1)
            assert all(type(r[c]) is int for c in ("wins", "losses", S.N_USERS))  # the contract's longs
            # exact sums: the same doubles
            assert (r[S.VALUE], r["baseline_value"], r["diff"]) == (
                float(Fraction(sum(va), len(rows))), float(Fraction(sum(vb), len(rows))), float(Fraction(sum(d), len(rows))))
            assert r[S.VALUE] == got[(m, r[S.METRIC], k, None)][0]  # the same value as in metrics
            assert r["baseline_kind"] == ("u2i" if b == "d" else "i2i")

    # the lists of several models checked in one pass: each bad model named with its reason
    bad = spark.createDataFrame(lists["a"] + [(1, 1, 1.0, 1, "x"), (2, 3, 1.0, 1, "y"), (2, 4, 1.0, 1, "y")],
                                S.I2I_TOPK)
    check_lists(topk, "i2i", None, targets)
    with pytest.raises(InvalidInput, match=r"model 'x': 1 lists with its own item in the list.*; "
                                           r"model 'y': 1 lists with ranks other than 1\.\.n"):
        check_lists(bad, "i2i", None, targets.union(spark.createDataFrame([(0, 1, 2, 0, 1), (1, 2, 3, 0, 1)],
                                                                          S.EVAL_TARGETS)))


def test_mrr_is_the_double_avg_gives_where_one_more_rounding_would_differ(spark):
    # from a review: the sum divided as a decimal(30,18) is a decimal(38,26), rounded once more than
    # Spark's avg() rounds; at 10,000,019 users and this sum the two doubles differ in the last bit.
    # Spark's own avg() over n decimal(20,18) values summing to it is the reference.
    from decimal import Decimal

    from ml.eval.metrics import _mean_reciprocal

    total, n = Decimal("2298872.082080427288786972"), 10_000_019
    full = int(total // 99)
    value = (F.when(F.col("id") < full, F.lit(99)).when(F.col("id") == full, F.lit(total - 99 * full))
             .otherwise(F.lit(0)).cast("decimal(20,18)"))
    row = spark.range(n).select(value.alias("v")).agg(
        F.avg("v").cast("double").alias("avg"), F.sum("v").alias("total"), F.count(F.lit(1)).alias("n")).first()
    assert (row["total"], row["n"]) == (total, n)
    pair = spark.createDataFrame([(total, n)], "total decimal(30,18), n long")
    ours = pair.select(_mean_reciprocal(F.col("total"), F.col("n"))).first()[0]
    three_roundings = pair.select((F.col("total") / F.col("n").cast("decimal(20,0)")).cast("decimal(24,22)")
                                  .cast("double")).first()[0]
    assert ours == row["avg"] and three_roundings != row["avg"]


def _ranked(spark, ranks, parts):
    """u2i lists and eval targets giving user u the target at rank ranks[u] (a miss for None),
    as targets in ``parts`` partitions in the order given."""
    u2i = spark.createDataFrame([(u, 1000 + u, 1.0, r, "m") for u, r in enumerate(ranks) if r], S.U2I_TOPK)
    rows = [(u, 0, 1000 + u, 0, 1) for u in range(len(ranks))]
    return spark.sparkContext.parallelize(rows, parts).toDF(S.EVAL_TARGETS), u2i


def test_mrr_and_its_paired_interval_do_not_depend_on_the_order_of_the_targets(spark):
    # before: reciprocal ranks were summed as doubles in partition order, and a shuffle merges partial
    # sums in the order their blocks arrive: the same targets could give an MRR differing in its last bits
    ranks = [1, 3, 6, 7, 11, 13, 29, 2, 97, 5, None, 4] * 3
    base = [None, 2, 1, 9, 3, 13, 8, 1, None, 5, 17, 4] * 3
    seen_mrr, seen_paired = set(), set()
    for order in (lambda x: x, lambda x: x[::-1]):
        for parts in (1, 3, 7):
            targets, u2i = _ranked(spark, order(ranks), parts)
            _, b = _ranked(spark, order(base), parts)
            mrr = [r.value for r in compute_metrics(targets, u2i, [1], "m", kind="u2i").collect() if r.k is None]
            seen_mrr.add(mrr[0].hex())
            row = [r for r in paired_comparison(targets, u2i, b, [1], "m", "b", kind="u2i", baseline_kind="u2i")
                   if r[S.K] is None][0]
            seen_paired.add(tuple(float(row[c]).hex() for c in (S.VALUE, "baseline_value", "diff", "ci_low",
                                                               "ci_high", "p_value")))
    assert len(seen_mrr) == 1 and len(seen_paired) == 1
    exact = sum(1 / r for r in ranks if r) / len(ranks)
    assert float.fromhex(seen_mrr.pop()) == pytest.approx(exact, rel=1e-15)


def test_format_paired_ratio_is_model_over_baseline(spark):
    # the case of test_paired_comparison_hand_computed: Pre@2 0.8 vs 0.6, MRR 0.6 vs 0.5. An inverted
    # ratio (baseline / model) would print 0.750 and 0.833: the better model reading as the worse
    a = _topk(spark, [(1, 3, 1), (1, 2, 2), (5, 6, 1), (5, 7, 2)], "a")
    b = _topk(spark, [(1, 2, 1), (1, 3, 2), (8, 2, 1)], "b")
    targets = spark.createDataFrame([(1, 1, 3, 0, 1), (2, 1, 2, 0, 1), (3, 5, 6, 0, 1), (4, 8, 2, 0, 1),
                                     (5, 5, 7, 0, 1)], S.EVAL_TARGETS)
    lines = format_paired(paired_comparison(targets, a, b, [1, 2], "a", "b")).splitlines()
    end = lines[1].index("ratio") + len("ratio")  # the columns are right-aligned under their names
    ratios = {line.split()[0]: line[end - 8:end].strip() for line in lines[2:]}
    assert ratios == {"Pre@1": "1.000", "Pre@2": "1.333", "MRR": "1.200"}


def test_the_ranks_found_once_serve_the_metrics_and_the_comparisons(spark):
    # the evaluation job joins the lists with the targets once (target_ranks, checked and cached) and
    # hands the ranks to both: the same rows as each function reading the lists on its own
    a = _topk(spark, [(1, 3, 1), (1, 2, 2), (5, 6, 1), (5, 7, 2)], "a")
    b = _topk(spark, [(1, 2, 1), (1, 3, 2), (8, 2, 1)], "b")
    targets = spark.createDataFrame([(1, 1, 3, 0, 1), (2, 1, 2, 0, 1), (3, 5, 6, 0, 1), (4, 8, 2, 0, 1),
                                     (5, 5, 7, 0, 1), (5, 5, 7, 0, 1)], S.EVAL_TARGETS)  # user 5 twice: counts twice
    parts = [("i2i", a.unionByName(b), ["a", "b"])]
    ranks = target_ranks(targets, parts, persist=True)
    try:
        assert sorted((r.model, r.user_id, r.w, r.rank) for r in ranks.rows.collect()) == [
            ("a", 1, 1, 1), ("a", 2, 1, 2), ("a", 3, 1, 1), ("a", 5, 2, 2), ("b", 1, 1, 2), ("b", 2, 1, 1), ("b", 4, 1, 1)]

        def rows(df):
            return sorted(tuple(r[c] for c in ("model", "metric", "k", "value", "n_users")) for r in df.collect())
        scored = rows(score_lists(targets, parts, [1, 2], ranks=ranks))
        assert scored == rows(score_lists(targets, parts, [1, 2]))
        # by hand, over the 6 target rows: a hits users 1, 3 at rank 1 and 2, 5, 5 at rank 2; b 2, 4 / 1
        assert [(m, metric, k, v) for m, metric, k, v, n in scored if n == 6] == [
            ("a", "mrr", None, pytest.approx(3.5 / 6, rel=1e-15)), ("a", "pre", 1, 2 / 6), ("a", "pre", 2, 5 / 6),
            ("b", "mrr", None, pytest.approx(2.5 / 6, rel=1e-15)), ("b", "pre", 1, 2 / 6), ("b", "pre", 2, 3 / 6)]
        lists = {("a", "i2i"): a, ("b", "i2i"): b}
        pair = [(("a", "i2i"), ("b", "i2i"))]

        def strip(prs):
            return [{k: v for k, v in r.items() if k != S.RUN_TS} for r in prs[0]]
        assert strip(paired_comparisons(targets, lists, pair, [1, 2], ranks=ranks)) == strip(
            paired_comparisons(targets, lists, pair, [1, 2]))
        # ranks not found in a list asked for would score it as all misses: refused
        only_a = target_ranks(targets, [("i2i", a, ["a"])])
        with pytest.raises(ValueError, match=r"score_lists: the ranks given were not found in the lists of \[\('b', 'i2i'\)\]"):
            score_lists(targets, parts, [1], ranks=only_a)
        with pytest.raises(ValueError, match=r"paired_comparisons: .*\[\('b', 'i2i'\)\]"):
            paired_comparisons(targets, lists, pair, [1], ranks=only_a)
    finally:
        ranks.unpersist()
    # the checks come first: a list with the trigger in it is refused, naming the model
    bad = a.unionByName(_topk(spark, [(1, 1, 1)], "c"))
    with pytest.raises(InvalidInput, match=r"model 'c': 1 lists with its own item in the list"):
        target_ranks(targets, [("i2i", bad, ["a", "c"])])


def test_a_comparison_is_stale_only_where_metrics_has_another_value_for_its_model_or_baseline():
    from ml.eval.metrics import stale_comparisons

    import datetime as dt

    ts = dt.datetime(2026, 1, 1)

    def row(model, metric, k, value, n=100):
        return {S.MODEL: model, S.METRIC: metric, S.K: k, S.CATEGORY_ID: None, S.VALUE: value, S.N_USERS: n,
                S.RUN_TS: ts}

    def pair(model, baseline, kind, metric, k, value, base_value, n=100):
        return {S.MODEL: model, S.BASELINE: baseline, "baseline_kind": kind, S.METRIC: metric, S.K: k,
                S.VALUE: value, "baseline_value": base_value, S.N_USERS: n, S.RUN_TS: ts}

    overall = [row("natm", "pre", 1, 0.05), row("natm", "mrr", None, 0.1), row("cooc", "pre", 1, 0.06),
               row("cooc", "mrr", None, 0.12), row("natm_recent", "u2i_hr", 1, 0.07),
               {**row("cooc", "pre", 1, 0.9), S.CATEGORY_ID: 3}]  # a category's row is not the overall one
    same = [pair("natm", "cooc", "i2i", "pre", 1, 0.05, 0.06 + 1e-12), pair("natm", "cooc", "i2i", "mrr", None, 0.1, 0.12)]
    assert stale_comparisons(overall, same) == {}
    # a baseline never scored into metrics cannot be checked: kept
    assert stale_comparisons(overall, [pair("natm", "pop", "i2i", "pre", 1, 0.05, 0.01)]) == {}
    # the baseline's MRR moved (its lists rebuilt): the comparison is stale, its MRR named
    moved = [same[0], pair("natm", "cooc", "i2i", "mrr", None, 0.1, 0.11)]
    assert list(stale_comparisons(overall, moved)) == [("natm", "i2i", "cooc", "i2i")]
    assert stale_comparisons(overall, moved)[("natm", "i2i", "cooc", "i2i")].startswith("cooc MRR is 0.1200 over 100")
    # a fused list against the baseline's i2i lists: the baseline's i2i row is the one checked
    fused = [pair("natm_recent", "cooc", "i2i", "u2i_hr", 1, 0.07, 0.06)]
    assert stale_comparisons(overall, fused) == {}
    assert list(stale_comparisons(overall, [pair("natm_recent", "cooc", "i2i", "u2i_hr", 1, 0.07, 0.05)])) == [
        ("natm_recent", "u2i", "cooc", "i2i")]
    # scored on other eval users, the same value: stale
    assert list(stale_comparisons(overall, [pair("natm", "cooc", "i2i", "pre", 1, 0.05, 0.06, n=99)])) == [
        ("natm", "i2i", "cooc", "i2i")]
    # a baseline row older than the comparison (a baseline is compared with, not scored: its row can
    # predate the lists the comparison read) says nothing about it; as new or newer, it does
    later = [{**p, S.RUN_TS: dt.datetime(2026, 2, 1)} for p in moved]
    assert stale_comparisons(overall, later) == {}
    assert list(stale_comparisons([{**r, S.RUN_TS: dt.datetime(2026, 2, 1)} for r in overall], later)) == [
        ("natm", "i2i", "cooc", "i2i")]
    # a model with i2i and u2i lists against a baseline with i2i lists: two comparisons, one stale
    both = [pair("dat", "cooc", "i2i", "pre", 1, 0.3, 0.06), pair("dat", "cooc", "i2i", "u2i_hr", 1, 0.2, 0.05)]
    dat = [row("dat", "pre", 1, 0.3), row("dat", "u2i_hr", 1, 0.2)]
    assert list(stale_comparisons(overall + dat, both)) == [("dat", "u2i", "cooc", "i2i")]

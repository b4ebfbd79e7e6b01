"""Sample sets on hand-made data: counts, exclusions, recorded q, determinism, strata."""
import pytest
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import SamplesConfig
from ml.data.graph import item_counts
from ml.data.samples import (LABEL, NEGATIVES, POSITIVE_ITEM, Q_NEGATIVES, Q_POSITIVE, adjacent_pairs,
                             build_dat_samples, build_natm_samples, category_counts, noise_distribution)


def _seqs(spark, rows):
    return spark.createDataFrame([(u, items, list(range(len(items))), len(items)) for u, items in rows], S.SEQUENCES)


def test_noise_distribution_does_not_depend_on_row_order(spark):
    # q's normaliser was a float sum, whose last bits follow the order partial sums arrive in
    rows = [(i, (i * 7919) % 1000 + 1) for i in range(3000)]
    forward = spark.createDataFrame(rows, "item_id long, count long").repartition(1)
    backward = spark.createDataFrame(rows[::-1], "item_id long, count long").repartition(7, "count")
    a = {r.item_id: r.q for r in noise_distribution(forward, "unigram", 0.75).collect()}
    b = {r.item_id: r.q for r in noise_distribution(backward, "unigram", 0.75).collect()}
    assert a == b


def test_noise_distribution_unigram_and_uniform(spark):
    counts = spark.createDataFrame([(1, 1), (2, 4)], "item_id long, count long")
    q = {r.item_id: r.q for r in noise_distribution(counts, "unigram", 0.5).collect()}
    assert q[1] == pytest.approx(1 / 3) and q[2] == pytest.approx(2 / 3)
    q = {r.item_id: r.q for r in noise_distribution(counts, "uniform", 0.75).collect()}
    assert q == {1: 0.5, 2: 0.5}


def test_adjacent_pairs_skip_repeats_and_single_action_users(spark):
    pairs = adjacent_pairs(_seqs(spark, [(1, [1, 2, 3]), (2, [4]), (3, [5, 5, 6])]))
    assert sorted((r.trigger_item, r.positive_item) for r in pairs.collect()) == [(1, 2), (2, 3), (5, 6)]


def test_rows_the_excluded_items_leave_short_are_completed_from_q_on_the_other_items(spark):
    # q from counts 50, 40, 9, 1 (alpha 0.75): every row's trigger and positive (items 1 and 2) hold 85 %
    # of it, so nearly every row is short of 9 valid draws among its 22. The rest must come from q
    # conditioned on items 3 and 4 (0.839 / 0.161), as the valid draws do; the uniform completion of
    # before gave item 3 about 0.63 of the negatives
    counts = spark.createDataFrame([(1, 50), (2, 40), (3, 9), (4, 1)], "item_id long, count long")
    q = noise_distribution(counts, "unigram", 0.75).cache()
    qd = {r.item_id: r.q for r in q.collect()}
    seqs = _seqs(spark, [(u, [1, 2]) for u in range(1, 2001)])
    rows = build_natm_samples(spark, seqs, q, SamplesConfig(num_negatives=9), seed=5).collect()
    negatives = [n for r in rows for n in r[NEGATIVES]]
    assert len(rows) == 2000 and len(negatives) == 18000 and set(negatives) == {3, 4}
    assert all(r[Q_NEGATIVES] == [qd[n] for n in r[NEGATIVES]] for r in rows)
    share = negatives.count(3) / len(negatives)
    assert share == pytest.approx(qd[3] / (qd[3] + qd[4]), abs=0.015), share  # sd 0.003
    again = build_natm_samples(spark, seqs, q, SamplesConfig(num_negatives=9), seed=5).collect()
    assert sorted(map(tuple, rows)) == sorted(map(tuple, again))  # the completion is seeded per row


SEQS = [(u, [(u * 7 + i) % 40 + 1 for i in range(12)]) for u in range(1, 30)]


def test_natm_negatives_exclusions_q_and_determinism(spark):
    seqs = _seqs(spark, SEQS)
    q = noise_distribution(item_counts(seqs), "unigram", 0.75).cache()
    qd = {r.item_id: r.q for r in q.collect()}
    cfg = SamplesConfig(num_negatives=5)
    rows = build_natm_samples(spark, seqs, q, cfg, seed=3).collect()
    assert len(rows) == adjacent_pairs(seqs).count()
    for r in rows:
        assert len(r[NEGATIVES]) == 5 and len(r[Q_NEGATIVES]) == 5
        assert r[POSITIVE_ITEM] not in r[NEGATIVES] and r.trigger_item not in r[NEGATIVES]
        assert r[Q_POSITIVE] == qd[r[POSITIVE_ITEM]]  # noise_q's value itself
        assert r[Q_NEGATIVES] == [qd[n] for n in r[NEGATIVES]]  # exactly, as the positive's
    again = build_natm_samples(spark, seqs, q, cfg, seed=3).collect()
    key = lambda r: (r.user_id, r.position)  # noqa: E731
    assert sorted(rows, key=key) == sorted(again, key=key)
    other = build_natm_samples(spark, seqs, q, cfg, seed=4).collect()
    assert sorted(rows, key=key) != sorted(other, key=key)


def test_negatives_are_the_first_valid_inverse_cdf_draws_of_the_documented_hashes(spark):
    # The draw is part of the table's contract (a rerun, or another version of the code, writes the
    # same samples): draw j of a row is U = pmod(xxhash64(seed, 'natm', user_id, position, j), 2^52) / 2^52
    # with j an INT, the item the first cumulative q above U, and the row keeps the first k that are
    # neither its trigger nor its positive. Computed here one (row, j) at a time, apart from the job.
    import numpy as np

    seqs = _seqs(spark, SEQS)
    q = noise_distribution(item_counts(seqs), "unigram", 0.75)
    k, seed = 3, 7
    got = {(r.user_id, r.position): r[NEGATIVES]
           for r in build_natm_samples(spark, seqs, q, SamplesConfig(num_negatives=k), seed=seed).collect()}
    qs = sorted((r.item_id, r.q) for r in q.collect())
    ids, cdf = np.array([i for i, _ in qs]), np.cumsum([v for _, v in qs])
    cdf /= cdf[-1]
    draws = (adjacent_pairs(seqs).crossJoin(spark.range(2 * k + 4).select(F.col("id").cast("int").alias("j")))
             .select(S.USER_ID, "position", S.TRIGGER_ITEM, POSITIVE_ITEM, "j",
                     (F.pmod(F.xxhash64(F.lit(seed), F.lit("natm"), S.USER_ID, "position", "j"), F.lit(2 ** 52))
                      .cast("double") / float(2 ** 52)).alias("u")).collect())
    by_row = {}
    for d in sorted(draws, key=lambda d: d.j):
        by_row.setdefault((d.user_id, d.position), []).append(d)
    assert set(by_row) == set(got)
    for key, ds in by_row.items():
        drawn = [int(ids[min(np.searchsorted(cdf, d.u, side="right"), len(ids) - 1)]) for d in ds]
        valid = [i for i in drawn if i not in (ds[0].trigger_item, ds[0][POSITIVE_ITEM])]
        assert got[key] == valid[:k], key


def test_natm_samples_keep_the_sequences_order_with_a_large_noise_table(spark):
    # q(positive) came from a join; with noise_q over the broadcast limit (a large catalogue) that is a
    # sort-merge join, and every output partition came out sorted by positive item, row groups of one
    # item after another for the training reader. It is looked up with the negatives' arrays now.
    seqs = _seqs(spark, [(u, [(u * 11 + i * 7) % 50 + 1 for i in range(10)]) for u in range(1, 40)])
    q = noise_distribution(item_counts(seqs), "unigram", 0.75)
    spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")
    try:
        df = build_natm_samples(spark, seqs, q, SamplesConfig(num_negatives=2), seed=1)
        positives = [r[POSITIVE_ITEM] for r in df.collect()]
    finally:
        spark.conf.unset("spark.sql.autoBroadcastJoinThreshold")
    assert positives != sorted(positives) and len(positives) == adjacent_pairs(seqs).count()


def test_no_training_items_is_a_clear_error(spark):
    from ml.errors import InvalidInput

    seqs = _seqs(spark, [])
    q = noise_distribution(item_counts(seqs), "unigram", 0.75)
    with pytest.raises(InvalidInput, match="noise_q has no items"):
        build_natm_samples(spark, seqs, q, SamplesConfig(), seed=1)


def test_negatives_follow_q(spark):
    seqs = _seqs(spark, [(u, [1, 2] * 20 + [3]) for u in range(1, 40)] + [(99, [4, 5])])
    q = noise_distribution(item_counts(seqs), "unigram", 1.0)
    rows = build_natm_samples(spark, seqs, q, SamplesConfig(num_negatives=9), seed=1)
    freq = rows.select(F.explode(NEGATIVES).alias("n")).groupBy("n").count().collect()
    freq = {r.n: r["count"] for r in freq}
    # trigger/positive are 1/2 most of the time, so negatives are mostly 3, 4, 5 with 3 the most common
    assert freq[3] > freq.get(4, 0) and freq[3] > freq.get(5, 0)


def test_tiny_catalogue_still_gets_k_negatives(spark):
    seqs = _seqs(spark, [(1, [1, 2, 3])])
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    rows = build_natm_samples(spark, seqs, q, SamplesConfig(num_negatives=9), seed=1).collect()
    for r in rows:
        assert len(r[NEGATIVES]) == 9 and not {r.trigger_item, r[POSITIVE_ITEM]} & set(r[NEGATIVES])


def test_cap_limit_water_filling():
    from ml.data.samples import _cap_limit

    L = _cap_limit([700, 100, 100, 100], 0.3)
    assert L == pytest.approx(0.3 * (L + 300))  # after capping, the big category holds exactly 30%
    assert _cap_limit([10, 10], 0.9) == 10  # nothing to cap
    assert _cap_limit([50, 5, 5], 0.2) == 5  # 0.2 x 3 categories < 1: equalise
    # the categories' sizes arrive from Spark in no fixed order: the limit (a float) must not depend on it
    import random

    rnd = random.Random(0)
    for _ in range(50):
        sizes = [rnd.randint(1, 10**6) for _ in range(rnd.randint(3, 200))]
        limits = {_cap_limit(rnd.sample(sizes, len(sizes)), 0.1) for _ in range(5)}
        assert len(limits) == 1, limits


def _items(spark, n_items, cat):
    return spark.createDataFrame([(i, cat(i), None, None, None) for i in range(1, n_items + 1)], S.ITEMS_TABLE)


def test_dat_rows_labels_features(spark):
    seqs = _seqs(spark, SEQS)
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    users = spark.createDataFrame([(1, {"gender": "F"})], S.USERS_TABLE)
    cfg = SamplesConfig(dat_negatives=3)
    df = build_dat_samples(spark, seqs, q, _items(spark, 40, lambda i: i % 4), users, cfg, seed=1).cache()
    n_pos = sum(len(s[1]) for s in SEQS)
    assert df.where(F.col(LABEL) == 1.0).count() == n_pos and df.where(F.col(LABEL) == 0.0).count() == 3 * n_pos
    pos = {(r.user_id, r.position): r.item_id for r in df.where(F.col(LABEL) == 1.0).collect()}
    for r in df.where(F.col(LABEL) == 0.0).collect():
        assert r.item_id != pos[(r.user_id, r.position)]
    feats = df.select(S.USER_ID, LABEL, "user_features").collect()
    assert all(r.user_features == {"gender": "F"} for r in feats if r.user_id == 1)  # positives and negatives
    assert {r.label for r in feats if r.user_id == 1} == {0.0, 1.0}
    assert all(r.user_features is None for r in feats if r.user_id != 1)
    assert df.where(F.col(S.CATEGORY_ID).isNull()).count() == 0
    df.unpersist()


def test_dat_rows_carry_their_items_category_negatives_too(spark):
    # the negatives' categories come from an array beside q (a join by item put a hot item's rows in
    # one task): each row's category is its item's, null where the item has none
    seqs = _seqs(spark, SEQS)
    q = noise_distribution(item_counts(seqs), "unigram", 0.75)
    # hashed category keys (ingest.string_ids) fill 64 bits: float64 would round 2^62 + 1 to 2^62
    category = {i: (None if i % 5 == 0 else 2 ** 62 + i % 3 + 1) for i in range(1, 41)}
    cfg = SamplesConfig(dat_negatives=4)
    df = build_dat_samples(spark, seqs, q, _items(spark, 40, category.get), None, cfg, seed=3)
    # the positive and its negatives come from one row: the positives (explode, join with the items,
    # shuffle) are computed once (a union computed them twice)
    assert df._jdf.queryExecution().optimizedPlan().toString().count("posexplode(items") == 1
    rows = df.collect()
    assert {r.label for r in rows} == {0.0, 1.0} and len(rows) == 5 * sum(len(s[1]) for s in SEQS)
    assert all(r.category_id == category[r.item_id] for r in rows)
    assert any(r.category_id is None and r.label == 0.0 for r in rows)
    # the same rows from other input and shuffle partitionings; each file's rows in hash order
    before = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "5")
    try:
        other = build_dat_samples(spark, seqs.repartition(3), q, _items(spark, 40, category.get), None, cfg,
                                  seed=3).collect()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
    key = lambda r: (r.user_id, r.position, r.label, r.item_id)  # noqa: E731
    assert sorted(rows, key=key) == sorted(other, key=key)
    # no items table: every category null, the same draws
    bare = build_dat_samples(spark, seqs, q, None, None, cfg, seed=3).collect()
    pairs = lambda rs: [(r.user_id, r.item_id) for r in sorted(rs, key=key)]  # noqa: E731
    assert pairs(bare) == pairs(rows)
    assert {r.category_id for r in bare} == {None}


def test_a_noise_table_listing_an_item_twice_is_refused(spark):
    # q joined with a side table holding an item twice would count its q twice in the CDF
    seqs = _seqs(spark, SEQS)
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    with pytest.raises(ValueError, match=r"noise_q lists item 7 more than once"):
        build_natm_samples(spark, seqs, q.unionByName(q.where("item_id = 7")), SamplesConfig(), seed=1)


def test_dat_stratification_caps_the_major_category(spark):
    # category 0 holds 70% of the positives
    seqs = _seqs(spark, [(u, [1 + (u + i) % 7 if (u + i) % 10 < 7 else 8 + (u + i) % 3 for i in range(30)])
                         for u in range(1, 60)])
    items = _items(spark, 10, lambda i: 0 if i <= 7 else i)
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    shares = {}
    for strategy in ("proportional", "capped", "balanced"):
        cfg = SamplesConfig(stratify=strategy, category_cap=0.3, dat_negatives=1, dat_max_positives_per_user=None)
        counts = {r.category_id: r.positives
                  for r in category_counts(build_dat_samples(spark, seqs, q, items, None, cfg, 2)).collect()}
        shares[strategy] = counts[0] / sum(counts.values())
    assert shares["proportional"] == pytest.approx(0.7, abs=0.02)
    assert shares["capped"] == pytest.approx(0.3, abs=0.05) and shares["balanced"] < shares["proportional"]


def test_dat_stratification_caps_items_without_a_category_too(spark):
    # items 1-6 have no category (60% of positives), 7-9 category 1 (30%), 10 category 2 (10%): the
    # null group counted in the cap but a plain join never matched it, so it was never down-sampled
    seqs = _seqs(spark, [(u, [(u + i) % 10 + 1 for i in range(30)]) for u in range(1, 60)])
    items = _items(spark, 10, lambda i: None if i <= 6 else (1 if i <= 9 else 2))
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    cfg = SamplesConfig(stratify="capped", category_cap=0.4, dat_negatives=1, dat_max_positives_per_user=None)
    counts = {r.category_id: r.positives
              for r in category_counts(build_dat_samples(spark, seqs, q, items, None, cfg, 2)).collect()}
    total = sum(counts.values())
    assert counts[None] / total == pytest.approx(0.4, abs=0.05) and max(counts.values()) / total < 0.45


def test_dat_batches_mix_categories(spark):
    """Rows are written in hash order: any 64 consecutive rows hold several categories incl. the major one."""
    seqs = _seqs(spark, [(u, sorted((u * 13 + i * 5) % 60 + 1 for i in range(20))) for u in range(1, 80)])
    items = _items(spark, 60, lambda i: 0 if i <= 30 else i % 6 + 1)
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    df = build_dat_samples(spark, seqs, q, items, None, SamplesConfig(dat_negatives=1), 5)
    cats = [r.category_id for r in df.collect()]  # written order within partitions
    major = 0
    for start in range(0, len(cats) - 64, 64):
        window = set(cats[start:start + 64])
        assert major in window and len(window) >= 3


def test_dat_cap_keeps_the_most_recent_positives(spark):
    # sequences run oldest -> newest: a cap of 5 on 12 distinct items keeps the last 5 (the user's
    # present taste), not the first 5
    seqs = _seqs(spark, SEQS)
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    cfg = SamplesConfig(dat_negatives=1, dat_max_positives_per_user=5)
    df = build_dat_samples(spark, seqs, q, None, None, cfg, seed=1)
    got = {}
    for r in df.where(F.col(LABEL) == 1.0).collect():
        got.setdefault(r.user_id, []).append(r.item_id)
    assert {u: sorted(v) for u, v in got.items()} == {u: sorted(items[-5:]) for u, items in SEQS}


def test_dat_negatives_are_drawn_per_positive_not_per_user(spark):
    # each (user, position) gets its own draw: keyed by the user alone, all 12 positives of a user
    # would share one negative list (a user's negatives would be the same 4 items for every positive)
    seqs = _seqs(spark, SEQS)
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    cfg = SamplesConfig(dat_negatives=4, dat_max_positives_per_user=None)
    df = build_dat_samples(spark, seqs, q, None, None, cfg, seed=1)
    negs = {}
    for r in df.where(F.col(LABEL) == 0.0).collect():
        negs.setdefault((r.user_id, r.position), []).append(r.item_id)
    assert len(negs) == sum(len(items) for _, items in SEQS)
    for u, items in SEQS:
        lists = {tuple(sorted(negs[(u, p)])) for p in range(len(items))}
        assert len(lists) >= 0.9 * len(items), (u, lists)


def test_dat_balanced_brings_every_category_down_to_the_median_size(spark):
    # positives per category 350 / 50 / 50 / 50: balanced keeps ~50 of each, so the major category
    # holds ~1/4 (down to the mean, 125, it would still hold ~45%)
    seqs = _seqs(spark, [(u, [1 + (u + i) % 7 for i in range(7)] + [8, 9, 10]) for u in range(1, 51)])
    items = _items(spark, 10, lambda i: 0 if i <= 7 else i)
    q = noise_distribution(item_counts(seqs), "uniform", 0.75)
    cfg = SamplesConfig(stratify="balanced", dat_negatives=1, dat_max_positives_per_user=None)
    counts = {r.category_id: r.positives
              for r in category_counts(build_dat_samples(spark, seqs, q, items, None, cfg, 2)).collect()}
    assert counts[8] == counts[9] == counts[10] == 50  # at the median already: all kept
    assert counts[0] / sum(counts.values()) == pytest.approx(0.25, abs=0.05)

"""Training sample sets: ``samples_natm`` (trigger, positive, k negatives + q) and ``samples_dat``.

NATM (paper §2.2): positives are adjacent pairs (s, s+) of the training sequences; each gets k
negatives drawn from the noise distribution q(.) (unigram count^alpha, or uniform, over training
items), never equal to the positive or the trigger. q of the positive and of every negative is
stored with the row because the NCE loss needs k·q(s_c).

DAT (paper §2.3): (user, item, label) rows — each positive (a recent item of the user) plus S
negatives drawn from q(.). Positives are category-stratified (proportional / capped / balanced) and
each file's rows are in hash order, so any contiguous run of rows — and so every training batch —
mixes categories, the major one included, as the Category Alignment Loss needs.

Sampling is reproducible: every random draw is a hash of (seed, user, position, draw index),
computed on executors; the q table (one row per training item) is the only broadcast, as arrays
(for DAT with the items' categories beside it).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import ArrayType, DoubleType, LongType, StructField, StructType

from ml import schemas as S
from ml.config import SamplesConfig
from ml.data.arrays import fixed_lists
from ml.data.graph import shifted_pairs
from ml.errors import InvalidInput

POSITIVE_ITEM = "positive_item"
Q_POSITIVE = "q_positive"
NEGATIVES = "negatives"
Q_NEGATIVES = "q_negatives"
LABEL = "label"
USER_FEATURES = "user_features"
POSITION = "position"

NATM_SAMPLES = StructType([
    StructField(S.USER_ID, LongType(), False),
    StructField(POSITION, LongType(), False),  # index of the trigger in the user's sequence
    StructField(S.TRIGGER_ITEM, LongType(), False),
    StructField(POSITIVE_ITEM, LongType(), False),
    StructField(Q_POSITIVE, DoubleType(), False),
    StructField(NEGATIVES, ArrayType(LongType(), False), False),
    StructField(Q_NEGATIVES, ArrayType(DoubleType(), False), False),
])
NOISE_Q = StructType([
    StructField(S.ITEM_ID, LongType(), False),
    StructField("q", DoubleType(), False),
])
T_SAMPLES_NATM = "samples_natm"
T_SAMPLES_DAT = "samples_dat"
T_NOISE_Q = "noise_q"

_MASK = 2**52


def noise_distribution(counts: DataFrame, noise: str, alpha: float) -> DataFrame:
    """q(.) over training items: count^alpha normalised (unigram) or 1/N (uniform)."""
    w = F.pow(F.col(S.COUNT).cast("double"), F.lit(alpha)) if noise == "unigram" else F.lit(1.0)
    weighted = counts.select(S.ITEM_ID, w.alias("w"))
    # The total in exact decimal arithmetic: a float sum depends on the order the shuffle delivers the
    # partial sums in, so a rerun could write other last bits of every q.
    total = weighted.agg(F.sum(F.col("w").cast("decimal(38,12)")).cast("double").alias("t"))
    return weighted.crossJoin(total).select(S.ITEM_ID, (F.col("w") / F.col("t")).alias("q"))


def _noise_arrays(q: DataFrame, attr: Optional[str] = None) -> Tuple[np.ndarray, ...]:
    """(ids sorted, cumulative q, q as stored, attr) for inverse-CDF sampling; one row per training
    item. ``attr``: a BIGINT column of ``q`` also wanted per drawn item, as (values, null flags): a
    nullable long would come back from pandas as a float."""
    cols = [S.ITEM_ID, "q"] + ([F.coalesce(attr, F.lit(0)).alias("_a"), F.col(attr).isNull().alias("_null")]
                               if attr else [])
    # bounded by the catalogue, not by the action count; sorted here (ids are unique, checked below): a
    # global orderBy was a sampling job and a range shuffle of every item before the collect
    pdf = q.select(*cols).toPandas()
    pdf = pdf.iloc[np.argsort(pdf[S.ITEM_ID].to_numpy(np.int64), kind="stable")].reset_index(drop=True)
    if pdf.empty:
        raise InvalidInput("cannot draw negatives: noise_q has no items (the sequences table is empty)")
    ids = pdf[S.ITEM_ID].to_numpy(np.int64)
    twice = ids[1:][ids[1:] == ids[:-1]]
    if len(twice):  # an item's q counted twice in the CDF (q joined with a side table holding it twice)
        raise InvalidInput(f"cannot draw negatives: noise_q lists item {int(twice[0])} more than once")
    cdf = np.cumsum(pdf["q"].to_numpy(np.float64))
    cdf /= cdf[-1]
    values = (pdf["_a"].to_numpy(np.int64), pdf["_null"].to_numpy(bool)) if attr else None
    return ids, cdf, pdf["q"].to_numpy(np.float64), values


def _uniforms(seed: int, salt: str, n: int, *cols) -> F.Column:
    """Array of n deterministic U[0,1) per row from hashes of (seed, salt, cols, j), j = 0..n-1 (an INT).

    One expression per draw, not a ``transform`` over ``sequence(0, n - 1)``: Spark evaluates a
    higher-order function's lambda without code generation, which made the 22 draws of a NATM row 4×
    the time of reading and exploding the sequences (the same values either way)."""
    return F.array(*[F.pmod(F.xxhash64(F.lit(seed), F.lit(salt), *cols, F.lit(j)), F.lit(_MASK)).cast("double")
                     / float(_MASK) for j in range(n)])


def _inverse_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Positions drawn by uniforms ``u`` through the normalised ``cdf`` (the last one for u at 1)."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _positions(ids: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(positions of ``x`` in the sorted ``ids``, whether each is there)."""
    at = np.minimum(np.searchsorted(ids, x), len(ids) - 1)
    return at, ids[at] == x


def draw_excluding(cdf: np.ndarray, excluded: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positions drawn (with replacement) from the distribution of the normalised ``cdf`` conditioned
    on not being one of the positions ``excluded``: a uniform over the remaining mass, moved past each
    excluded item's interval of the CDF it reaches, then the inverse CDF. O(n log items) per call,
    whatever the catalogue (a mask over the catalogue per row was O(items) for every row a hot item
    leaves short). At least one position must be allowed."""
    excluded = np.unique(excluded)
    lo = np.where(excluded > 0, cdf[np.maximum(excluded - 1, 0)], 0.0)
    mass = cdf[excluded] - lo
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while len(todo):  # a draw moved onto an excluded item's edge by rounding (~1e-16 per draw): drawn again
        u = rng.random(len(todo)) * (cdf[-1] - mass.sum())
        for a, m in zip(lo, mass):  # ascending: each move can only reach the later intervals
            u = np.where(u >= a, u + m, u)
        got = _inverse_cdf(cdf, u)
        bad = np.isin(got, excluded)
        out[todo[~bad]] = got[~bad]
        todo = todo[bad]
    return out


def draw_negatives(spark: SparkSession, rows: DataFrame, q: DataFrame, k: int, seed: int, salt: str,
                   exclude_cols: Tuple[str, ...], key_cols: Tuple[str, ...],
                   q_of: Optional[Tuple[str, str]] = None, attr_of: Optional[Tuple[str, str]] = None) -> DataFrame:
    """Add ``negatives`` (k ids drawn from q, none equal to any of ``exclude_cols``) and ``q_negatives``;
    ``q_of=(item column, name)`` also adds that column's q(.) as ``name`` (every row's item must be in q);
    ``attr_of=(q column, name)`` adds the array of that BIGINT column's values of the k negatives
    (a lookup in one more broadcast array, not a join by item: the hot items, drawn most often, would
    put their rows in one task).

    2k+4 candidate draws per row (with replacement, as in NCE) come from hashes of ``key_cols``; the
    first k valid ones are kept: draws from q conditioned on the allowed items. A row left short
    (when the excluded items hold much of q: a tiny catalogue, or one hot item beside the trigger) is
    completed by a per-row seeded generator from the same conditional q (:func:`draw_excluding`;
    until 2026-12-08 uniformly over the allowed items, which the recorded q did not describe).
    """
    ids, cdf, stored, attrs = _noise_arrays(q, attr_of[0] if attr_of else None)
    if len(ids) <= len(exclude_cols):
        raise InvalidInput(f"cannot draw negatives: only {len(ids)} training items")
    # three arrays of 8 bytes per training item go to every executor (the catalogue, not the action
    # log; with attr_of, 9 bytes more: the value and its null flag); q of a drawn negative and of a
    # looked-up positive are both noise_q's own values (the negatives' were the normalised CDF's
    # differences, a fourth array, a few ulps off)
    b_ids, b_cdf, b_q = (spark.sparkContext.broadcast(a) for a in (ids, cdf, stored))
    b_attrs = spark.sparkContext.broadcast(attrs) if attr_of else None
    n_draw = 2 * k + 4
    keys = [F.col(c) for c in key_cols]
    staged = rows.withColumn("_u", _uniforms(seed, salt, n_draw, *keys)).withColumn(
        "_rs", F.xxhash64(F.lit(seed), F.lit(salt + "-fallback"), *keys))
    looked_up = [StructField(q_of[1], DoubleType(), False)] if q_of else []
    out_schema = StructType(rows.schema.fields + looked_up + [
        StructField(NEGATIVES, ArrayType(LongType(), False), False),
        StructField(Q_NEGATIVES, ArrayType(DoubleType(), False), False)]
        + ([StructField(attr_of[1], ArrayType(LongType(), True), False)] if attr_of else []))
    names = rows.columns

    n_in = len(names)
    arrow_schema = to_arrow_schema(out_schema)

    def sample(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        ids_, cdf_, q_ = b_ids.value, b_cdf.value, b_q.value
        for batch in batches:
            b = batch.num_rows
            if not b:
                continue
            u = batch.column("_u").flatten().to_numpy().reshape(b, n_draw)
            pos = _inverse_cdf(cdf_, u)
            cand = ids_[pos]
            ok = np.ones_like(cand, dtype=bool)
            excl = [batch.column(c).to_numpy() for c in exclude_cols]
            for e in excl:
                ok &= cand != e[:, None]
            # first k valid draws per row, vectorised: a stable sort brings valid columns to the front
            order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
            sel = np.take_along_axis(pos, order, axis=1)  # (B, k) positions into ids_
            short = np.flatnonzero(ok.sum(axis=1) < k)
            if len(short):  # the excluded items hold much of q: complete from a per-row seeded generator
                rs = batch.column("_rs").to_numpy()
                for r in short:
                    rng = np.random.default_rng(int(rs[r]) & 0x7FFFFFFFFFFFFFFF)
                    at, found = _positions(ids_, np.array([int(e[r]) for e in excl], dtype=np.int64))
                    valid = pos[r][ok[r]]
                    sel[r] = np.concatenate([valid, draw_excluding(cdf_, at[found], k - len(valid), rng)])
            cols = [batch.column(i) for i in range(n_in)]  # the rows' own columns, passed through as they are
            if q_of:
                item = batch.column(q_of[0]).to_numpy()
                at, found = _positions(ids_, item)
                if not found.all():
                    raise ValueError(f"{q_of[0]} {item[~found][:5].tolist()} not in noise_q")
                cols.append(pa.array(q_[at]))  # noise_q's own value, as the join gave it
            flat = sel.ravel()
            cols += [fixed_lists(ids_[flat], k), fixed_lists(q_[flat], k)]
            if b_attrs is not None:
                values, nulls = b_attrs.value
                cols.append(fixed_lists(pa.array(values[flat], mask=nulls[flat]), k))
            yield pa.RecordBatch.from_arrays(cols, schema=arrow_schema)

    return staged.select(*names, "_u", "_rs").mapInArrow(sample, out_schema)


def adjacent_pairs(sequences: DataFrame) -> DataFrame:
    """(user_id, position, trigger_item, positive_item) for consecutive items a != b."""
    return (sequences.where(F.size(S.ITEMS) > 1)
            .select(S.USER_ID, F.posexplode(shifted_pairs(1)).alias(POSITION, "x"))
            .select(S.USER_ID, F.col(POSITION).cast("long").alias(POSITION), F.col("x.a").alias(S.TRIGGER_ITEM),
                    F.col("x.b").alias(POSITIVE_ITEM))
            .where(F.col(S.TRIGGER_ITEM) != F.col(POSITIVE_ITEM)))


def build_natm_samples(spark: SparkSession, sequences: DataFrame, q: DataFrame, cfg: SamplesConfig,
                       seed: int) -> DataFrame:
    """``samples_natm``: adjacent positives, k negatives from q, q recorded for all candidates."""
    # q(positive) is looked up in the arrays the negatives are drawn from, not joined: a join with a
    # noise_q too large to broadcast is a sort-merge join, and its output, sorted by positive item,
    # would reach the training reader (which shuffles within a row group) one item after another.
    pos = adjacent_pairs(sequences)
    out = draw_negatives(spark, pos, q, cfg.num_negatives, seed, "natm", (S.TRIGGER_ITEM, POSITIVE_ITEM),
                         (S.USER_ID, POSITION), q_of=(POSITIVE_ITEM, Q_POSITIVE))
    return out.select(*[F.col(f.name) for f in NATM_SAMPLES.fields])


def _stratify(pos: DataFrame, cfg: SamplesConfig, seed: int) -> DataFrame:
    """Down-sample positives of over-represented categories (capped / balanced); keep all otherwise."""
    if cfg.stratify == "proportional":
        return pos
    per_cat = pos.groupBy(S.CATEGORY_ID).agg(F.count(F.lit(1)).alias("_n"))
    sizes = [r["_n"] for r in per_cat.collect()]  # one row per category, not per sample
    if cfg.stratify == "capped":
        limit = F.lit(_cap_limit(sizes, cfg.category_cap))
    else:  # balanced: every category down to the median category size
        limit = F.lit(float(np.median(sizes)) if sizes else 1.0)
    keep = F.least(F.lit(1.0), limit / F.col("_n"))
    u = F.pmod(F.xxhash64(F.lit(seed), F.lit("stratify"), S.USER_ID, S.ITEM_ID, POSITION), F.lit(_MASK)) / float(_MASK)
    # Items without a category are one group, capped like the others (a plain equi-join never matches
    # null = null, so they were counted in the cap but never down-sampled).
    cat = "_cat"
    sized = F.broadcast(per_cat.withColumnRenamed(S.CATEGORY_ID, cat))
    return (pos.join(sized, pos[S.CATEGORY_ID].eqNullSafe(sized[cat]), "left").where(u < keep)
            .drop("_n", cat))


def _cap_limit(sizes: list, cap: float) -> float:
    """Largest per-category size L with L <= cap * sum(min(n, L)): after capping every category at L,
    none holds more than ``cap`` of the positives (water-filling; bisection on a concave function)."""
    if not sizes:
        return 1.0
    sizes = sorted(sizes)  # the float sums below must not depend on the order the rows arrived in
    if cap * len(sizes) <= 1.0:  # the cap cannot hold for every category: equalise them
        return float(min(sizes))
    lo, hi = 0.0, float(max(sizes))
    if hi <= cap * sum(sizes):
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid <= cap * sum(min(n, mid) for n in sizes):
            lo = mid
        else:
            hi = mid
    return max(lo, 1.0)


def build_dat_samples(spark: SparkSession, sequences: DataFrame, q: DataFrame, items: DataFrame | None,
                      users: DataFrame | None, cfg: SamplesConfig, seed: int) -> DataFrame:
    """``samples_dat``: (user, item, label, category, user features), S negatives per positive."""
    seqs = sequences
    if cfg.dat_max_positives_per_user:
        n = F.size(S.ITEMS)
        m = cfg.dat_max_positives_per_user
        seqs = seqs.withColumn(S.ITEMS, F.when(n > m, F.slice(S.ITEMS, n - m + 1, m)).otherwise(F.col(S.ITEMS)))
    pos = seqs.select(S.USER_ID, F.posexplode(S.ITEMS).alias(POSITION, S.ITEM_ID)).withColumn(
        POSITION, F.col(POSITION).cast("long"))

    def with_categories(t: DataFrame) -> DataFrame:  # no items table: every category null, no join
        if items is None:
            return t.withColumn(S.CATEGORY_ID, F.lit(None).cast("long"))
        return t.join(items.select(S.ITEM_ID, S.CATEGORY_ID), S.ITEM_ID, "left")

    pos = with_categories(pos)  # a hot item's positives: a skewed join AQE splits
    # spread by (user, position) after that join: the negatives are drawn (in Python) evenly, not
    # a hot item's positives in one task (684k of 2M positives, 13 s against a median of 1 s)
    pos = _stratify(pos, cfg, seed).repartition(S.USER_ID, POSITION)
    # The negatives' categories come with their draw, from an array beside q (q joined with the items,
    # each item once on either side), not from a join of every row by item: that put a hot item's
    # negatives, drawn in proportion to its q, in one task (with an item in 30 % of 2.6M actions, 1.4M
    # of the 9.9M rows in one of 16 tasks) and AQE did not split it.
    neg_cat = "_neg_category"
    # The positive and its negatives come out of one row: a union of the positives with the drawn
    # rows computed the positives twice (the sequences' scan, the explode, the join with the items and
    # the shuffle above; the two sides' columns differ, so Spark shared no exchange). The positive's
    # category rides through the draw as a non-null BIGINT and a null flag: pandas would carry a
    # nullable BIGINT as float64, which rounds hashed ids above 2^53.
    pc, pc_null = "_pos_category", "_pos_category_null"
    carried = pos.select(S.USER_ID, POSITION, S.ITEM_ID, F.coalesce(S.CATEGORY_ID, F.lit(0).cast("long")).alias(pc),
                         F.col(S.CATEGORY_ID).isNull().alias(pc_null))
    with_negs = draw_negatives(spark, carried,
                               with_categories(q),  # one row per item on either side
                               cfg.dat_negatives, seed, "dat", (S.ITEM_ID,), (S.USER_ID, POSITION),
                               attr_of=(S.CATEGORY_ID, neg_cat))
    # the positive first, then its negatives zipped with their categories (natives: a transform()
    # lambda runs without code generation); the label is the position in that array
    positive = F.struct(F.col(S.ITEM_ID).alias(S.ITEM_ID), F.when(~F.col(pc_null), F.col(pc)).alias(S.CATEGORY_ID))
    drawn = F.arrays_zip(F.col(NEGATIVES).alias(S.ITEM_ID), F.col(neg_cat).alias(S.CATEGORY_ID))
    # the user's features joined once per positive, before the explode: after it, the join shuffled
    # and sorted 1 + dat_negatives rows per positive
    if users is not None:
        with_negs = with_negs.join(users.select(S.USER_ID, F.col(S.FEATURES).alias(USER_FEATURES)), S.USER_ID, "left")
    else:
        with_negs = with_negs.withColumn(USER_FEATURES, F.lit(None).cast("map<string,string>"))
    rows = (with_negs.select(S.USER_ID, POSITION, USER_FEATURES,
                             F.posexplode(F.concat(F.array(positive), drawn)).alias("_i", "_n"))
            .select(S.USER_ID, POSITION, USER_FEATURES, "_n.*",
                    F.when(F.col("_i") == 0, F.lit(1.0)).otherwise(F.lit(0.0)).alias(LABEL)))
    # hash order: contiguous rows (and so batches) mix users and categories
    order = F.xxhash64(F.lit(seed), F.lit("order"), S.USER_ID, POSITION, S.ITEM_ID, LABEL)
    # (hash partitions, each sorted by the hash: a range partitioning samples its input in a job of its
    # own, which with no shuffle before it, since the negatives' categories need no join, drew every
    # negative twice)
    return (rows.withColumn("_o", order).repartition("_o").sortWithinPartitions("_o")
            .select(F.col(S.USER_ID).cast("long"), F.col(S.ITEM_ID).cast("long"), F.col(LABEL).cast("double"),
                    F.col(S.CATEGORY_ID).cast("long"), USER_FEATURES, POSITION))


def category_counts(samples: DataFrame) -> DataFrame:
    """Positives per category, largest first (logged by the job; the major category is the first)."""
    return (samples.where(F.col(LABEL) == 1.0).groupBy(S.CATEGORY_ID).agg(F.count(F.lit(1)).alias("positives"))
            .orderBy(F.desc("positives"), F.asc(S.CATEGORY_ID)))

"""Synthetic action logs with the shape of e-commerce traffic and a planted sequential signal.

Everything is computed per row from hashes of (seed, ids, salt), so the output is identical for a
given config and seed whatever the partitioning, and nothing proportional to the data lives on the
driver. Shape:

* user activity ~ Pareto(``activity_alpha``), capped at ``max_actions_per_user`` (a few users have
  tens of thousands of actions at scale);
* items live in clusters of ``cluster_size``; cluster popularity is a power law; a contiguous run of
  clusters forms a category, with category sizes growing linearly (a few big, many small);
* a user's actions come in sessions: each session picks a cluster (half the time near the user's
  home cluster, otherwise by popularity) and **walks forward through it** with stride 1 or 2, so
  item a is followed by a+1 / a+2 of its cluster; with probability 1 - ``stay_prob`` an action is
  replaced by a popularity-drawn noise item. A model that learns the walk beats popularity.
"""
from __future__ import annotations

import math

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import CANONICAL_FIELDS, GenerateConfig

BASE_TS = 1_700_000_000  # 2023-11-14, seconds
_MASK = 2**52


def _uniform(seed: int, salt: str, *cols: Column) -> Column:
    """Deterministic U[0, 1) from a hash of (seed, salt, cols)."""
    h = F.xxhash64(F.lit(seed), F.lit(salt), *cols)
    return F.pmod(h, F.lit(_MASK)).cast("double") / float(_MASK)


def _coprime_multiplier(n: int) -> int:
    """A multiplier coprime to n, for a cheap bijective scramble i -> (i * m + 7) mod n."""
    m = int(n * 0.6180339887) | 1
    while math.gcd(m, n) != 1:
        m += 2
    return m


def generate_actions(spark: SparkSession, cfg: GenerateConfig, seed: int) -> DataFrame:
    """Return an ``actions``-schema DataFrame (see module docstring for its shape)."""
    n_clusters = max(1, cfg.num_items // cfg.cluster_size)
    clustered_items = n_clusters * cfg.cluster_size
    item_mult = _coprime_multiplier(cfg.num_items)
    cluster_mult = _coprime_multiplier(n_clusters)
    skew = 1.0 + cfg.popularity_exponent

    def popular_cluster(u: Column) -> Column:  # popularity rank -> scrambled cluster index
        rank = F.floor(F.pow(u, skew) * n_clusters).cast("long")
        return F.pmod(rank * cluster_mult + 3, F.lit(n_clusters))

    def item_id(idx: Column) -> Column:  # scramble so ids reveal nothing about clusters
        return F.pmod(idx * item_mult + 7, F.lit(cfg.num_items)) + 1

    def category_of(idx: Column) -> Column:  # contiguous cluster ranges; category k spans ~(2k+1) units
        cluster = F.floor(idx / cfg.cluster_size)
        in_clusters = F.floor(F.sqrt(cluster / n_clusters) * cfg.num_categories)
        return (F.when(idx < clustered_items, in_clusters).otherwise(F.pmod(idx, F.lit(cfg.num_categories)))
                .cast("long") + 1)

    alpha = cfg.activity_alpha
    mean_extra = max(cfg.actions_per_user - cfg.min_actions_per_user, 1.0)
    x_m = mean_extra * (alpha - 1) / alpha if alpha > 1 else mean_extra / 2
    users = spark.range(1, cfg.num_users + 1, numPartitions=cfg.num_partitions).withColumnRenamed("id", S.USER_ID)
    uid = F.col(S.USER_ID)
    pareto = x_m * F.pow(1.0 - _uniform(seed, "activity", uid), -1.0 / alpha)
    n_actions = F.least(F.lit(cfg.max_actions_per_user),
                        F.floor(pareto).cast("long") + cfg.min_actions_per_user)
    users = users.select(uid, n_actions.alias("n"),
                         popular_cluster(_uniform(seed, "home", uid)).alias("home"),
                         F.floor(_uniform(seed, "t0", uid) * 30 * 86400).cast("long").alias("t0"))
    users = users.where(F.col("n") > 0)

    L = cfg.session_length
    sessions = users.select("*", F.explode(F.sequence(F.lit(0), F.ceil(F.col("n") / L).cast("long") - 1)).alias("s"))
    s_col = F.col("s")
    near_home = _uniform(seed, "near", uid, s_col) < 0.5
    cluster = F.when(near_home, F.pmod(F.col("home") + F.floor(_uniform(seed, "hop", uid, s_col) * 4), F.lit(n_clusters))
                     ).otherwise(popular_cluster(_uniform(seed, "cluster", uid, s_col))).cast("long")
    sessions = sessions.select(
        S.USER_ID, "t0", "s", cluster.alias("c"),
        F.floor(_uniform(seed, "start", uid, s_col) * cfg.cluster_size).cast("long").alias("start"),
        (F.floor(_uniform(seed, "stride", uid, s_col) * 2) + 1).cast("long").alias("stride"),
        F.least(F.lit(L), F.col("n") - s_col * L).alias("len"))

    events = sessions.select("*", F.explode(F.sequence(F.lit(0), F.col("len") - 1)).alias("j"))
    j = F.col("j")
    walk_idx = F.col("c") * cfg.cluster_size + F.pmod(F.col("start") + j * F.col("stride"), F.lit(cfg.cluster_size))
    noise_idx = F.floor(F.pow(_uniform(seed, "noise_item", uid, s_col, j), skew) * cfg.num_items).cast("long")
    noise_idx = F.pmod(noise_idx * cluster_mult + 11, F.lit(cfg.num_items))
    stay = _uniform(seed, "stay", uid, s_col, j) < cfg.stay_prob
    idx = F.when(stay, walk_idx).otherwise(noise_idx)
    b = _uniform(seed, "behavior", uid, s_col, j)
    behavior = F.when(b < 0.90, "pv").when(b < 0.95, "cart").when(b < 0.98, "fav").otherwise("buy")
    ts = F.lit(BASE_TS) + F.col("t0") + s_col * 3600 + j * 30
    out = events.select(uid, idx.alias("idx"), ts.alias(S.TS), behavior.alias(S.BEHAVIOR), "s", "j")
    out = out.select(uid, item_id(F.col("idx")).alias(S.ITEM_ID), S.TS, S.BEHAVIOR,
                     category_of(F.col("idx")).alias(S.CATEGORY_ID), "s", "j")
    out = _inject_defects(out, cfg, seed)
    return out.select(*[F.col(f.name).cast(f.dataType) for f in S.ACTIONS.fields if f.name in CANONICAL_FIELDS])


def _inject_defects(df: DataFrame, cfg: GenerateConfig, seed: int) -> DataFrame:
    """Optionally break a few rows (null item, unknown behaviour) and duplicate a few events."""
    key = (F.col(S.USER_ID), F.col("s"), F.col("j"))
    if cfg.duplicate_fraction > 0:
        copies = F.when(_uniform(seed, "dup", *key) < cfg.duplicate_fraction, F.array(F.lit(0), F.lit(1))
                        ).otherwise(F.array(F.lit(0)))
        df = df.select("*", F.explode(copies).alias("_copy")).drop("_copy")
    if cfg.bad_row_fraction > 0:
        u = _uniform(seed, "bad", *key)
        half = cfg.bad_row_fraction / 2
        df = (df.withColumn(S.ITEM_ID, F.when(u < half, F.lit(None)).otherwise(F.col(S.ITEM_ID)))
              .withColumn(S.BEHAVIOR, F.when((u >= half) & (u < 2 * half), F.lit("unknown"))
                          .otherwise(F.col(S.BEHAVIOR))))
    return df

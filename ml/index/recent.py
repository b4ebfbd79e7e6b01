"""Multi-trigger recall: a user's top-K list fused from the i2i lists of their most recent items.

Serving layers rarely retrieve from one trigger: they look up the i2i lists of a user's last few
items and merge them. This is that merge as a Spark job over ``sequences`` and ``i2i_topk``, for any
model's lists. The item j steps before the user's last one weighs ``decay ** j``; a neighbour at
rank r in that item's list adds ``decay ** j / (rrf_k + r)`` (reciprocal rank fusion: it needs no
common score scale, so co-occurrence weights and cosines fuse alike); sums per (user, item), the
``k`` best per user, ties to the smaller item id. Terms are rounded to units of 2^-40 and summed
as integers, so a score does not depend on the order Spark adds the terms in; sums equal only in
exact arithmetic (1/12 = 1/20 + 0.7/21 at the defaults) can round a unit apart and are then ordered
by the rounding, not the id (the same order on every run).

Cost is O(users x triggers x list length), linear in the data: the user x trigger rows join the
lists on the trigger item, then the contributions and the items to leave out are shuffled once, by
user, for the sums, the exclusion and a bounded per-user top k. A popular trigger (the last item of
millions of users) would make one join task produce its rows x K: its rows are spread over
``ceil(rows / HOT_TRIGGER_ROWS)`` salts by a hash of the user, and its K-row list copied to each
(adaptive skew-join handling did not act on it: it splits by the input's bytes, 5x the median and
256 MB, and these rows are ~30 bytes each). Nothing is collected on the driver but the hot triggers'
counts (at most rows / HOT_TRIGGER_ROWS of them).
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import RecentConfig
from ml.data.graph import top_k_per_key

TRIGGER = "trigger_id"
STEP = "step"  # 0 = the user's last item, 1 = the one before, ...
UNITS = "units"
SEEN = "seen"  # 1 on the rows of items the list must leave out
SCORE_UNITS = float(2**40)  # each term <= 1, so a sum of up to 2^23 terms fits a long
SALT = "_salt"
HOT_TRIGGER_ROWS = 100_000  # a trigger's user rows per join task (x K output rows each)
MAX_SALTS = 4096


def recent_triggers(sequences: DataFrame, triggers: int) -> DataFrame:
    """Rows ``(user_id, step, trigger_id)`` for each user's last ``triggers`` items."""
    n = F.size(S.ITEMS)
    last = F.reverse(F.slice(S.ITEMS, F.greatest(n - triggers + 1, F.lit(1)), F.least(n, F.lit(triggers))))
    return sequences.where(n > 0).select(S.USER_ID, F.posexplode(last).alias(STEP, TRIGGER))


def fuse_recent(sequences: DataFrame, i2i: DataFrame, cfg: RecentConfig, model: str) -> DataFrame:
    """``sequences`` + one model's ``i2i_topk`` rows -> ``u2i_topk`` rows with ``model``."""
    recent = recent_triggers(sequences, cfg.triggers)
    lists = i2i.select(F.col(S.ITEM_ID).alias(TRIGGER), F.col(S.NEIGHBOR_ID).alias(S.ITEM_ID), S.RANK)
    term = F.pow(F.lit(float(cfg.decay)), F.col(STEP)) / (F.lit(float(cfg.rrf_k)) + F.col(S.RANK))
    # Summed as integer units of 2^-40: a float sum depends on the order the shuffle delivers the
    # terms in (a rerun could change a score's last bits, and which of two tied items wins).
    contrib = _join_spreading_hot_triggers(recent, lists).select(
        S.USER_ID, S.ITEM_ID, F.round(term * SCORE_UNITS).cast("long").alias(UNITS), F.lit(0).alias(SEEN))
    if cfg.exclude == "history":
        seen = sequences.select(S.USER_ID, F.explode(F.array_distinct(S.ITEMS)).alias(S.ITEM_ID))
    else:
        seen = recent.select(S.USER_ID, F.col(TRIGGER).alias(S.ITEM_ID))
    # The excluded items ride along as rows flagged SEEN, and everything is shuffled once, by user: the
    # sum per (user, item), the exclusion and the per-user top k all run on that partitioning (hash
    # partitioning by user clusters every (user, item)). As a sum by (user, item), an anti-join with the
    # excluded pairs and a top k by user it was three shuffles. A user brings at most triggers x K
    # contributions (and, with exclude=history, up to sequences.max_length items: keep that cap set, or
    # a bot's whole history goes to one task), so no task gets a hot key.
    rows = contrib.unionByName(seen.select(S.USER_ID, S.ITEM_ID, F.lit(0).cast("long").alias(UNITS),
                                           F.lit(1).alias(SEEN))).repartition(S.USER_ID)
    scores = (rows.groupBy(S.USER_ID, S.ITEM_ID).agg(F.sum(UNITS).alias(UNITS), F.max(SEEN).alias(SEEN))
              .where(F.col(SEEN) == 0))
    top = top_k_per_key(scores, S.USER_ID, [F.col(UNITS), F.bitwise_not(F.col(S.ITEM_ID))],  # ties: the smaller id
                        [S.ITEM_ID, UNITS], cfg.k)  # (~id = -id - 1: -id overflows for -2^63)
    return top.select(F.col(S.USER_ID).cast("long"), F.col(S.ITEM_ID).cast("long"),
                      (F.col(UNITS) / F.lit(SCORE_UNITS)).cast("double").alias(S.SCORE),
                      F.col(S.RANK).cast("int"), F.lit(model).alias(S.MODEL))


def _join_spreading_hot_triggers(recent: DataFrame, lists: DataFrame) -> DataFrame:
    """``recent`` joined with ``lists`` on the trigger; a trigger with more than HOT_TRIGGER_ROWS user
    rows is joined in salts (its rows by a hash of the user, its list copied to every salt)."""
    counts = recent.groupBy(TRIGGER).agg(F.count(F.lit(1)).alias("_n")).where(F.col("_n") > HOT_TRIGGER_ROWS)
    hot = [(r[TRIGGER], min(MAX_SALTS, -(-r["_n"] // HOT_TRIGGER_ROWS))) for r in counts.collect()]
    if not hot:
        return recent.join(lists, TRIGGER)
    salts = F.broadcast(recent.sparkSession.createDataFrame(hot, f"{TRIGGER} long, _salts int"))
    n = F.coalesce(F.col("_salts"), F.lit(1))
    users = recent.join(salts, TRIGGER, "left").withColumn(
        SALT, F.pmod(F.xxhash64(F.lit("recent-salt"), S.USER_ID), n).cast("int")).drop("_salts")
    copies = lists.join(salts, TRIGGER, "left").withColumn(SALT, F.explode(F.sequence(F.lit(0), n - 1))).drop("_salts")
    return users.join(copies, [TRIGGER, SALT]).drop(SALT)

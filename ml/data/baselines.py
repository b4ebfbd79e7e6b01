"""Non-learned i2i producers writing the ``i2i_topk`` contract: ``pop`` and ``cooc``."""
from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import BaselineConfig
from ml.data.graph import cooccurrence_edges, top_n_neighbours


def most_popular(counts: DataFrame, n: int) -> DataFrame:
    """The ``n`` most frequent training items as ``(neighbor_id, pop_rank, count)``; ties: smaller id.

    ``n`` is small (a list length), so this global top is a tiny sort-limit, not a full sort; its
    <= n rows are ranked on the driver (a window over them would have no partition key, and Spark
    warns of "serious performance degradation" for every such window).
    """
    top = counts.orderBy(F.desc(S.COUNT), F.asc(S.ITEM_ID)).limit(n).select(S.ITEM_ID, S.COUNT).collect()
    return counts.sparkSession.createDataFrame([(r[0], rank, r[1]) for rank, r in enumerate(top, 1)],
                                               f"{S.NEIGHBOR_ID} long, pop_rank int, {S.COUNT} long")


def _finish(candidates: DataFrame, k: int, model: str) -> DataFrame:
    """Rank candidates per item by (priority, score desc, ``order`` asc, neighbour id); drop self; keep k.

    ``order`` is the candidate's rank in its source list (the graph's, whose ties go to the larger
    count, or the popularity list's), so equal scores keep the order the source gave them.
    """
    order = Window.partitionBy(S.ITEM_ID).orderBy(F.asc("prio"), F.desc(S.SCORE), F.asc("order"),
                                                  F.asc(S.NEIGHBOR_ID))
    ranked = (candidates.where(F.col(S.ITEM_ID) != F.col(S.NEIGHBOR_ID))
              .withColumn(S.RANK, F.row_number().over(order)).where(F.col(S.RANK) <= k))
    return ranked.select(F.col(S.ITEM_ID).cast("long"), F.col(S.NEIGHBOR_ID).cast("long"),
                         F.col(S.SCORE).cast("double"), F.col(S.RANK).cast("int"), F.lit(model).alias(S.MODEL))


def popularity_topk(catalogue: DataFrame, counts: DataFrame, k: int) -> DataFrame:
    """Every catalogue item -> the k most popular training items other than itself.

    Every list is the same popular items with the item itself left out, so the rank needs no sort:
    an entry keeps its popularity rank, minus one when the item itself ranks above it. No sort of the
    catalogue x (k + 1) rows per item (a window did one: 10^10 rows at 10^8 items); one shuffle, the
    catalogue's distinct ids, and two broadcasts of k + 1 rows.
    """
    top = most_popular(counts, k + 1)
    own = top.select(F.col(S.NEIGHBOR_ID).alias(S.ITEM_ID), F.col("pop_rank").alias("_own"))
    rows = (catalogue.select(S.ITEM_ID).distinct().join(F.broadcast(own), S.ITEM_ID, "left")
            .crossJoin(F.broadcast(top)).where(F.col(S.ITEM_ID) != F.col(S.NEIGHBOR_ID)))
    rank = F.col("pop_rank") - F.when(F.col("_own") < F.col("pop_rank"), 1).otherwise(0)
    return rows.withColumn(S.RANK, rank).where(F.col(S.RANK) <= k).select(
        F.col(S.ITEM_ID).cast("long"), F.col(S.NEIGHBOR_ID).cast("long"), F.col(S.COUNT).cast("double").alias(S.SCORE),
        F.col(S.RANK).cast("int"), F.lit("pop").alias(S.MODEL))


def cooccurrence_topk(sequences: DataFrame, catalogue: DataFrame, counts: DataFrame, cfg: BaselineConfig) -> DataFrame:
    """Each item's top-k co-occurrence neighbours, then popular items to fill short lists.

    score = co-occurrence weight for graph neighbours and ``-pop_rank`` for fill-ins, so a
    filled item always ranks below every real neighbour.
    """
    k = cfg.k
    edges = cooccurrence_edges(sequences, cfg.window, cfg.decay, cfg.symmetric, cfg.min_count, cfg.per_user)
    graph = top_n_neighbours(edges, k).select(S.ITEM_ID, S.NEIGHBOR_ID, F.col(S.WEIGHT).alias(S.SCORE),
                                              F.lit(0).alias("prio"), F.col(S.RANK).alias("order"))
    # Fill-in candidates: enough popular items to complete any list after removing self and overlaps.
    short = (catalogue.select(S.ITEM_ID).distinct()
             .join(graph.groupBy(S.ITEM_ID).agg(F.count(F.lit(1)).alias("n")), S.ITEM_ID, "left")
             .where(F.coalesce(F.col("n"), F.lit(0)) < k).select(S.ITEM_ID))
    fill = short.crossJoin(F.broadcast(most_popular(counts, 2 * k + 1))).select(
        S.ITEM_ID, S.NEIGHBOR_ID, (-F.col("pop_rank")).cast("double").alias(S.SCORE), F.lit(1).alias("prio"),
        F.col("pop_rank").alias("order"))
    cands = graph.unionByName(fill)
    # an item both in the graph list and in the fill keeps its graph entry
    best = Window.partitionBy(S.ITEM_ID, S.NEIGHBOR_ID).orderBy(F.asc("prio"))
    cands = cands.withColumn("_r", F.row_number().over(best)).where("_r = 1").drop("_r")
    return _finish(cands, k, "cooc")

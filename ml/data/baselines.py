"""Non-learned i2i producers writing the ``i2i_topk`` contract: ``pop`` and ``cooc``."""
from __future__ import annotations

from typing import Optional

from pyspark.sql import DataFrame
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


def cooccurrence_topk(sequences: DataFrame, catalogue: DataFrame, counts: DataFrame, cfg: BaselineConfig,
                      tasks: Optional[int] = None) -> DataFrame:
    """Each item's top-k co-occurrence neighbours, then popular items to fill short lists.

    score = co-occurrence weight for graph neighbours (rank = the graph's: weight, then the larger
    count, then the smaller id) and ``-pop_rank`` for fill-ins, which follow in popularity order,
    skipping the item itself and its listed neighbours, so a filled item always ranks below every
    real neighbour.

    No per-item sort: the graph's top-k is a bounded aggregate, and an item with n < k neighbours
    gets its fill-ins as the first k - n of the 2k + 1 popularity ranks it does not skip (its
    neighbours' and its own, at most n + 1), ranked n + 1, n + 2, ...: only the rows it lacks, from
    native array functions. Sorting the candidates per item instead (a window over item x (k + 2k + 1)
    rows) is 3·10¹⁰ rows at 10⁸ items and k = 100; a cross join with the 2k + 1 popular items and a
    lambda counting the skipped ranks below each (what this did until 2026-12-07) evaluated that
    lambda, without code generation, on 2k + 1 rows per short item. ``tasks``: the fill-ins' tasks
    (see jobs.baseline.catalogue).
    """
    k = cfg.k
    edges = cooccurrence_edges(sequences, cfg.window, cfg.decay, cfg.symmetric, cfg.min_count, cfg.per_user)
    graph = top_n_neighbours(edges, k)  # ranks 1..n per item, no self-edges
    # enough to complete any list after the skips (validated sequences hold no null id; none is listed)
    top = F.broadcast(most_popular(counts.where(F.col(S.ITEM_ID).isNotNull()), 2 * k + 1))
    ranks = top.select(S.NEIGHBOR_ID, "pop_rank")
    listed = (graph.join(ranks, S.NEIGHBOR_ID, "left").groupBy(S.ITEM_ID)
              .agg(F.count(F.lit(1)).alias("n"), F.collect_list("pop_rank").alias("skip")))  # nulls not collected
    own = ranks.select(F.col(S.NEIGHBOR_ID).alias(S.ITEM_ID), F.col("pop_rank").alias("own"))
    items = catalogue.select(S.ITEM_ID).where(F.col(S.ITEM_ID).isNotNull()).distinct()  # a null id has no list
    short = (items.join(listed, S.ITEM_ID, "left").join(own, S.ITEM_ID, "left")
             .select(S.ITEM_ID, F.coalesce("n", F.lit(0)).alias("n"),
                     F.concat(F.coalesce("skip", F.array().cast("array<int>")),
                              F.when(F.col("own").isNull(), F.array().cast("array<int>"))
                              .otherwise(F.array("own"))).alias("skip"))
             .where(F.col("n") < k))
    if tasks:  # each short item becomes up to k rows: spread by rows, not by the ids' bytes
        short = short.repartition(tasks, S.ITEM_ID)
    # The popularity ranks an item does not skip, in order (array_except keeps the first array's order;
    # the skipped ranks are distinct: listed neighbours and the item itself): the j-th of them is the
    # item's (n + j)-th entry, as many as its list lacks. Ranks past the catalogue's most popular find
    # no row in ``top`` and are the last ones, so the ranks stay 1..k without a gap.
    allowed = F.array_except(F.sequence(F.lit(1), F.lit(2 * k + 1)), F.col("skip"))
    fill = (short.select(S.ITEM_ID, "n", F.posexplode(F.slice(allowed, 1, F.lit(k) - F.col("n"))).alias("_j", "pop_rank"))
            .join(top, "pop_rank")
            .select(S.ITEM_ID, S.NEIGHBOR_ID, (-F.col("pop_rank")).alias(S.SCORE),
                    (F.col("n") + F.col("_j") + 1).alias(S.RANK)))
    rows = graph.select(S.ITEM_ID, S.NEIGHBOR_ID, F.col(S.WEIGHT).alias(S.SCORE), S.RANK).unionByName(fill)
    return rows.select(F.col(S.ITEM_ID).cast("long"), F.col(S.NEIGHBOR_ID).cast("long"),
                       F.col(S.SCORE).cast("double"), F.col(S.RANK).cast("int"), F.lit("cooc").alias(S.MODEL))

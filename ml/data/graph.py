"""``sequences`` -> weighted item co-occurrence graph with top-N neighbours per item (NATM §2.3).

Cost is O(actions x window): pairs come from sliding each sequence against itself shifted by
1..window positions, never from a user x user self-join (O(length^2) per user). Pairs are summed
per (item, neighbour) with map-side partial aggregation, so a hot item's edges are spread over
many tasks by the pair key. The top-N per item is a bounded top-k aggregate (``max_by(..., k)``,
Spark >= 4.2), planned as a sort aggregate on item id within each task: a task keeps at most N
candidates per item before the shuffle, so a hot item's millions of neighbours shuffle as N rows
per task, and no edge is sorted by weight (1.4x faster than the window at 10M actions). On
Spark 4.0/4.1 (or N > 100,000, max_by's limit) it falls back to a ``row_number() <= N`` window,
which Spark plans as a per-partition group limit before the shuffle. Both give the same rows.
Weights are sums of integer units (:func:`weight_scale`), so they are exact, and ties are ties.
"""
from __future__ import annotations

import inspect
import logging
import math
from decimal import Decimal
from functools import reduce
from typing import List, Tuple

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DecimalType

from ml import schemas as S
from ml.config import GraphConfig

MAX_BY_K_LIMIT = 100_000  # Spark rejects max_by(.., k) with k above this
MAX_EXACT_SCALE = 2**31  # integer weight units while lcm(1..window) stays under this (window <= 22)
DECIMAL_PLACES = 18  # beyond it, 1/d as decimal(38, 18): sums up to 10^20, in any order the same
UNITS = "units"

log = logging.getLogger(__name__)


def cap_sequences(sequences: DataFrame, max_user_length: int | None) -> DataFrame:
    """Keep the most recent ``max_user_length`` items of pathological (very long) sequences."""
    if not max_user_length:
        return sequences
    n = F.size(S.ITEMS)
    return sequences.withColumn(S.ITEMS, F.when(n > max_user_length, F.slice(S.ITEMS, n - max_user_length + 1,
                                                                            max_user_length))
                                .otherwise(F.col(S.ITEMS)))


def weight_scale(window: int, decay: bool) -> int:
    """L: a pair at distance d adds L // d integer units to its edge, and weight = units / L.

    Summing integers makes the weights exact and independent of the order Spark adds them in: a
    float sum of 1/d values is not (0.5 + 1/3 + 1/6 is 0.9999999999999999, 1/6 + 1/3 + 0.5 is 1.0),
    so two edges of equal weight and count could be ranked by rounding noise instead of by id, and
    differently on a rerun whose shuffle delivered rows in another order. L = lcm(1..window) with
    decay (60 for window 5), 1 without; 0 where that lcm exceeds ``MAX_EXACT_SCALE`` (decay with a
    window over 22), and the pairs then carry 1/d rounded to ``DECIMAL_PLACES`` places as decimals,
    whose sums are also the same in any order (not exact: 1/3 is rounded once per pair).
    """
    if not decay:
        return 1
    scale = reduce(math.lcm, range(1, window + 1), 1)
    return scale if scale <= MAX_EXACT_SCALE else 0


def shifted_pairs(d: int) -> Column:
    """``items`` zipped with itself shifted by ``d``: an array of structs (a, b), b the item ``d``
    positions after a, the i-th pair starting at position i; null for a sequence of ``d`` items or
    fewer (keep those out with ``size(items) > d``). slice/arrays_zip are code-generated natives,
    ~8x faster than a ``transform()`` lambda, which Spark evaluates without code generation."""
    n = F.size(S.ITEMS)
    return F.arrays_zip(F.slice(S.ITEMS, 1, n - d).alias("a"), F.slice(S.ITEMS, d + 1, n - d).alias("b"))


def windowed_pairs(sequences: DataFrame, window: int, decay: bool = False, symmetric: bool = False,
                   keep_user: bool = False) -> DataFrame:
    """Rows ``(item_id, neighbor_id, units)`` (``user_id`` first with ``keep_user``): b follows a within
    ``window`` positions (a != b), and with ``symmetric`` also (b, a); ``units`` = L // d for distance d
    (:func:`weight_scale`; 1 without decay)."""
    # For each offset d, zip the sequence with itself shifted by d: O(length) per d, no self-join.
    n = F.size(S.ITEMS)
    scale = weight_scale(window, decay)
    out = None
    for d in range(1, window + 1):
        zipped = shifted_pairs(d)
        units = F.lit((scale // d if scale else _decimal_reciprocal(d)) if decay else 1)
        user = [S.USER_ID] if keep_user else []
        pairs = (sequences.where(n > d).select(*user, F.explode(zipped).alias("p"))
                 .select(*user, F.col("p.a").alias(S.ITEM_ID), F.col("p.b").alias(S.NEIGHBOR_ID))
                 .where(F.col(S.ITEM_ID) != F.col(S.NEIGHBOR_ID)))
        if symmetric:  # both directions from the one scan (a union with the reverse rescanned it all)
            both = F.array(F.struct(F.col(S.ITEM_ID).alias("a"), F.col(S.NEIGHBOR_ID).alias("b")),
                           F.struct(F.col(S.NEIGHBOR_ID).alias("a"), F.col(S.ITEM_ID).alias("b")))
            pairs = pairs.select(*user, F.explode(both).alias("p")).select(
                *user, F.col("p.a").alias(S.ITEM_ID), F.col("p.b").alias(S.NEIGHBOR_ID))
        pairs = pairs.withColumn(UNITS, units)
        out = pairs if out is None else out.unionByName(pairs)
    return out


def _decimal_reciprocal(d: int) -> Column:
    """1/d rounded to :data:`DECIMAL_PLACES` places, as a decimal(38, DECIMAL_PLACES) literal."""
    places = Decimal(1).scaleb(-DECIMAL_PLACES)
    return F.lit((Decimal(1) / Decimal(d)).quantize(places)).cast(DecimalType(38, DECIMAL_PLACES))


def aggregate_edges(pairs: DataFrame, scale: int, min_count: int = 1, per_user: bool = False) -> DataFrame:
    """Sum :func:`windowed_pairs` rows into edges ``(item_id, neighbor_id, weight, count)``, weight =
    units / ``scale`` (from :func:`weight_scale`; 0: the units are decimal weights already); drop
    edges seen fewer than ``min_count`` times. ``per_user`` (pairs with ``user_id``): each user adds
    an edge once, at its nearest distance, so ``count`` is the number of users (a user alternating
    between two items added to their edge at every step, and alone met any ``min_count``)."""
    if per_user:  # keyed by (user, a, b) with map-side partial maxima: a heavy user spreads over tasks
        pairs = pairs.groupBy(S.USER_ID, S.ITEM_ID, S.NEIGHBOR_ID).agg(F.max(UNITS).alias(UNITS))
    summed = F.sum(UNITS)
    edges = pairs.groupBy(S.ITEM_ID, S.NEIGHBOR_ID).agg(
        (summed / F.lit(scale) if scale else summed).cast("double").alias(S.WEIGHT),
        F.count(F.lit(1)).alias(S.COUNT))
    return edges.where(F.col(S.COUNT) >= min_count) if min_count > 1 else edges


def cooccurrence_edges(sequences: DataFrame, window: int, decay: bool = False, symmetric: bool = False,
                       min_count: int = 1, per_user: bool = False) -> DataFrame:
    """``sequences`` -> every edge ``(item_id, neighbor_id, weight, count)`` of the windowed graph."""
    scale = weight_scale(window, decay)
    if not scale:
        log.warning("co-occurrence: window=%d with decay: lcm(1..%d) is over 2^31, so the weights are sums of "
                    "1/d rounded to %d decimal places, not exact (the same on every run, in any order); two "
                    "edges of equal true weight can differ in the last place and rank by that, not by count and "
                    "id. Windows up to 22 are exact.", window, window, DECIMAL_PLACES)
    return aggregate_edges(windowed_pairs(sequences, window, decay, symmetric, keep_user=per_user), scale,
                           min_count, per_user)


def top_n_neighbours(edges: DataFrame, n: int) -> DataFrame:
    """Keep the ``n`` heaviest neighbours per item, rank 1..n; ties: larger count, then smaller id."""
    # The ordering is unique per neighbour (it ends in ~neighbor_id = -neighbor_id - 1, decreasing in
    # the id like the negation, which overflows for -2^63), so the top n and their order are fully
    # determined, whichever plan top_k_per_key picks.
    order = [F.col(S.WEIGHT), F.col(S.COUNT), F.bitwise_not(F.col(S.NEIGHBOR_ID))]
    ranked = top_k_per_key(edges, S.ITEM_ID, order, [S.NEIGHBOR_ID, S.WEIGHT, S.COUNT], n)
    return ranked.select(F.col(S.ITEM_ID).cast("long"), F.col(S.NEIGHBOR_ID).cast("long"),
                         F.col(S.WEIGHT).cast("double"), F.col(S.COUNT).cast("long"), F.col(S.RANK).cast("int"))


def top_k_per_key(df: DataFrame, key: str, order: List[Column], values: List[str], n: int) -> DataFrame:
    """Rows ``key, *values, rank``: the ``n`` rows per ``key`` largest by ``order`` (columns compared in
    turn, descending; the last should be unique per key so ties are broken), rank 1..n.

    A bounded top-k aggregate (``max_by(..., n)``, Spark >= 4.2) where available, else a
    ``row_number() <= n`` window; both give the same rows.
    """
    if n <= MAX_BY_K_LIMIT and has_top_k_aggregate(df):
        value = F.struct(*[F.col(c) for c in values])
        ordering = F.struct(*[c.alias(f"o{i}") for i, c in enumerate(order)])
        top = df.groupBy(key).agg(F.max_by(value, ordering, n).alias("top"))
        return top.select(key, F.posexplode("top").alias("pos", "e")).select(
            key, *[F.col(f"e.{c}").alias(c) for c in values], (F.col("pos") + 1).alias(S.RANK))
    window = Window.partitionBy(key).orderBy(*[c.desc() for c in order])
    return (df.withColumn(S.RANK, F.row_number().over(window)).where(F.col(S.RANK) <= n)
            .select(key, *values, S.RANK))


def has_top_k_aggregate(df: DataFrame) -> bool:
    """``max_by(col, ord, k)`` exists from Spark 4.2 on (and the pyspark in use must expose it)."""
    major, minor = (int(x) for x in df.sparkSession.version.split(".")[:2])
    return (major, minor) >= (4, 2) and "k" in inspect.signature(F.max_by).parameters


def build_cooccurrence_graph(sequences: DataFrame, cfg: GraphConfig) -> DataFrame:
    """``sequences`` -> ``item_graph`` (see module docstring)."""
    seqs = cap_sequences(sequences, cfg.max_user_length)
    edges = cooccurrence_edges(seqs, cfg.window, cfg.decay, cfg.symmetric, cfg.min_count, cfg.per_user)
    return top_n_neighbours(edges, cfg.top_n)


def item_counts(sequences: DataFrame) -> DataFrame:
    """Occurrences of each item in the training sequences (for popularity and q(.) later)."""
    return (sequences.select(F.explode(S.ITEMS).alias(S.ITEM_ID)).groupBy(S.ITEM_ID)
            .agg(F.count(F.lit(1)).alias(S.COUNT)))


def capped_users(sequences: DataFrame, max_user_length: int | None) -> Tuple[DataFrame, int | None]:
    """Sequences longer than the cap (for logging: how many users were truncated)."""
    if not max_user_length:
        return sequences.limit(0), None
    return sequences.where(F.col(S.LENGTH) > max_user_length), max_user_length

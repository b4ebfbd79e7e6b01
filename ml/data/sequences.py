"""``actions`` -> per-user training ``sequences`` and leave-last-out ``eval_targets``."""
from __future__ import annotations

from typing import Tuple

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import SequencesConfig
from ml.data.graph import MAX_BY_K_LIMIT, has_top_k_aggregate


def build_sequences(actions: DataFrame, cfg: SequencesConfig) -> Tuple[DataFrame, DataFrame]:
    """Order each user's actions by (ts, ts_micros, item_id) and hold out the last one.

    Returns ``(sequences, eval_targets)``. ``sequences`` holds the training part only (every
    action but the last, the most recent ``max_length`` of them when set); ``eval_targets`` holds
    (user, trigger = the item before the last, target = the last item). Users with fewer than
    ``min_length`` actions (after ``collapse_repeats``) appear in neither. ``holdout=2`` first drops
    every user's last action (a validation split from training data: tune on it, test on holdout=1).
    """
    return split_user_events(user_events(actions, cfg), cfg)


def user_events(actions: DataFrame, cfg: SequencesConfig) -> DataFrame:
    """One row per user: ``ev`` (their events in order, as :func:`build_sequences` uses them), ``n``
    and ``m``. The one shuffle of every action that both of :func:`split_user_events`'s tables come from
    (a job writing both persists it). Users with fewer than ``min_length`` actions are still here, for
    the job to count from these rows without another shuffle; :func:`split_user_events` drops them."""
    if cfg.behaviors:
        actions = actions.where(F.col(S.BEHAVIOR).isin(list(cfg.behaviors)))
    # Within a second, the source's finer time orders the events (ts_micros; an actions table written
    # before it had only seconds, and then the item id decides, as it does between events of one µs)
    fine = F.col(S.TS) * 1_000_000
    if S.TS_MICROS in actions.columns:
        fine = F.coalesce(F.col(S.TS_MICROS), fine)
    actions = actions.withColumn("_f", fine)
    if cfg.collapse_repeats:
        # Before the aggregation, so that it stays bounded: a row whose item is the user's previous
        # one (in (ts, ts_micros, item_id) order) goes. A window sort per user spills; a run of repeats
        # can be any length, so collapsing after a bounded top-k would have needed every event in memory.
        order = Window.partitionBy(S.USER_ID).orderBy(S.TS, "_f", S.ITEM_ID)
        actions = (actions.withColumn("_prev", F.lag(S.ITEM_ID).over(order))
                   .where(F.col("_prev").isNull() | (F.col("_prev") != F.col(S.ITEM_ID))).drop("_prev"))
    # sort_array on (ts, µs, item_id) structs: time order with an explicit, stable tie-break.
    event = F.struct(F.col(S.TS).alias("t"), F.col("_f").alias("f"), F.col(S.ITEM_ID).alias("i"))
    bound = _events_needed(cfg)
    if bound and bound <= MAX_BY_K_LIMIT and has_top_k_aggregate(actions):
        # Only the most recent `bound` events can reach the tables: a bounded top-k aggregate keeps
        # at most that many per user in each task, so a bot with 10^8 events is not one 2 GB row.
        collected = F.max_by(event, event, bound)
    elif bound:
        # The same cut without that aggregate (Spark 4.0/4.1, or a bound over its limit): each user's
        # events numbered from the most recent by a window (a sort that spills, not an array), and
        # only the first `bound` collected; the count still sees them all.
        recent = Window.partitionBy(S.USER_ID).orderBy(F.col(S.TS).desc(), F.col("_f").desc(),
                                                       F.col(S.ITEM_ID).desc())
        actions = actions.withColumn("_r", F.row_number().over(recent))
        collected = F.collect_list(F.when(F.col("_r") <= bound, event))  # nulls are not collected
    else:  # no max_length: every event is wanted (the config's choice, README "Table contracts", sequences)
        collected = F.collect_list(event)
    events = actions.groupBy(S.USER_ID).agg(F.sort_array(collected).alias("ev"), F.count(F.lit(1)).alias("total"))
    if cfg.holdout > 1:  # validation split: the last holdout-1 actions are never seen
        events = events.withColumn("ev", F.expr(f"slice(ev, 1, greatest(size(ev) - {cfg.holdout - 1}, 0))"))
    # n: the user's actions up to the target (all of them, also those beyond the bound); m: those in ev
    n = F.greatest(F.col("total") - (cfg.holdout - 1), F.lit(0))
    # Users in id order within each partition: the aggregation emits them in the order their rows
    # arrived, and a cluster fetches shuffle blocks in a random order, so the same actions gave
    # sequences files in another row order each run, and so the NATM samples read from them, and the
    # training order (another model). Sorted, a file's rows are a function of its users.
    return events.withColumn("n", n).withColumn("m", F.size("ev")).sortWithinPartitions(S.USER_ID)


def kept(cfg: SequencesConfig):
    """The rows of :func:`user_events` whose user has ``min_length`` actions (a Column)."""
    return F.col("n") >= cfg.min_length


def split_user_events(events: DataFrame, cfg: SequencesConfig) -> Tuple[DataFrame, DataFrame]:
    """:func:`user_events` -> ``(sequences, eval_targets)`` (see :func:`build_sequences`)."""
    events = events.where(kept(cfg))
    train = F.slice("ev", 1, F.col("m") - 1)
    if cfg.max_length:
        keep = F.least(F.col("m") - 1, F.lit(cfg.max_length))
        train = F.slice("ev", F.col("m") - keep, keep)
    events = events.withColumn("train", train)
    sequences = events.select(
        F.col(S.USER_ID),
        F.col("train.i").alias(S.ITEMS),  # a field of an array of structs: the array of that field
        F.col("train.t").alias(S.TIMESTAMPS),
        F.size("train").alias(S.LENGTH))
    last = F.element_at("ev", -1)
    eval_targets = events.select(
        F.col(S.USER_ID),
        F.element_at("ev", -2)["i"].alias(S.TRIGGER_ITEM),
        last["i"].alias(S.TARGET_ITEM),
        last["t"].alias(S.TARGET_TS),
        (F.col("n") - 1).cast("int").alias(S.HISTORY_LENGTH))
    return (_conform(sequences, S.SEQUENCES), _conform(eval_targets, S.EVAL_TARGETS))


def _events_needed(cfg: SequencesConfig) -> int | None:
    """How many of a user's most recent events the tables can use (None: all of them): the last
    ``max_length`` training items, the target and the held-out ones (``min_length`` is checked on
    the user's full count; repeats are collapsed before)."""
    if not cfg.max_length:
        return None
    return cfg.max_length + cfg.holdout


def _conform(df: DataFrame, schema) -> DataFrame:
    """Cast to the contract's types (non-null ids survive Spark's nullable inference via the casts)."""
    types = {f.name: f.dataType for f in df.schema.fields}
    return df.select(*[F.col(f.name) if types[f.name].simpleString() == f.dataType.simpleString()
                       else F.col(f.name).cast(f.dataType) for f in schema.fields])

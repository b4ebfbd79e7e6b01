"""``actions`` -> per-user training ``sequences`` and leave-last-out ``eval_targets``."""
from __future__ import annotations

from typing import Tuple

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import SequencesConfig


def build_sequences(actions: DataFrame, cfg: SequencesConfig) -> Tuple[DataFrame, DataFrame]:
    """Order each user's actions by (ts, item_id) and hold out the last one.

    Returns ``(sequences, eval_targets)``. ``sequences`` holds the training part only (every
    action but the last, the most recent ``max_length`` of them when set); ``eval_targets`` holds
    (user, trigger = the item before the last, target = the last item). Users with fewer than
    ``min_length`` actions (after ``collapse_repeats``) appear in neither. ``holdout=2`` first drops
    every user's last action (a validation split from training data: tune on it, test on holdout=1).
    """
    if cfg.behaviors:
        actions = actions.where(F.col(S.BEHAVIOR).isin(list(cfg.behaviors)))
    # sort_array on (ts, item_id) structs: time order with an explicit, stable tie-break.
    events = (actions.groupBy(S.USER_ID)
              .agg(F.sort_array(F.collect_list(F.struct(F.col(S.TS).alias("t"), F.col(S.ITEM_ID).alias("i"))))
                   .alias("ev")))
    if cfg.collapse_repeats:
        events = events.withColumn("ev", F.expr("filter(ev, (x, k) -> k = 0 OR x.i != ev[k - 1].i)"))
    if cfg.holdout > 1:  # validation split: the last holdout-1 actions are never seen
        events = events.withColumn("ev", F.expr(f"slice(ev, 1, greatest(size(ev) - {cfg.holdout - 1}, 0))"))
    events = events.withColumn("n", F.size("ev")).where(F.col("n") >= cfg.min_length)
    train = F.slice("ev", 1, F.col("n") - 1)
    if cfg.max_length:
        keep = F.least(F.col("n") - 1, F.lit(cfg.max_length))
        train = F.slice("ev", F.col("n") - keep, keep)
    events = events.withColumn("train", train)
    sequences = events.select(
        F.col(S.USER_ID),
        F.transform("train", lambda x: x["i"]).alias(S.ITEMS),
        F.transform("train", lambda x: x["t"]).alias(S.TIMESTAMPS),
        F.size("train").alias(S.LENGTH))
    last = F.element_at("ev", -1)
    eval_targets = events.select(
        F.col(S.USER_ID),
        F.element_at("ev", -2)["i"].alias(S.TRIGGER_ITEM),
        last["i"].alias(S.TARGET_ITEM),
        last["t"].alias(S.TARGET_TS),
        (F.col("n") - 1).cast("int").alias(S.HISTORY_LENGTH))
    return (_conform(sequences, S.SEQUENCES), _conform(eval_targets, S.EVAL_TARGETS))


def _conform(df: DataFrame, schema) -> DataFrame:
    """Cast to the contract's types (non-null ids survive Spark's nullable inference via the casts)."""
    types = {f.name: f.dataType for f in df.schema.fields}
    return df.select(*[F.col(f.name) if types[f.name].simpleString() == f.dataType.simpleString()
                       else F.col(f.name).cast(f.dataType) for f in schema.fields])

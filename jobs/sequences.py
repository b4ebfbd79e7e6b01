"""``actions`` -> ``sequences`` (training part) + ``eval_targets`` (each user's last item).

    python -m jobs.sequences --conf conf/ml1m_natm.yaml
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from pyspark import StorageLevel
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import Config
from ml.data import io
from ml.data.sequences import kept, split_user_events, user_events
from ml.data.session import get_spark
from ml.errors import InvalidInput

from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.sequences")


def _check_one_ingest(cfg: Config) -> None:
    """``actions``, ``items``, ``users`` and ``id_keys`` are committed one after another by one run of
    jobs.ingest: written by two runs, that run was killed between its commits, and the categories,
    user features or keys downstream are another source's (its ids plain integers, or hashes)."""
    actions = cfg.table_path(S.T_ACTIONS)
    for t in (S.T_ID_KEYS, S.T_ITEMS, S.T_USERS):
        if io.written_by_two_runs(actions, cfg.table_path(t)):
            raise InvalidInput(f"{actions} and {cfg.table_path(t)} were written by different runs of jobs.ingest (one "
                               "killed between its commits?): the tables may be of two sources; rerun jobs.ingest "
                               "(the pipeline reruns it and the stages after it)")


@io.job_run
def run(cfg: Config, spark=None) -> dict:
    spark = spark or get_spark(cfg.spark)
    mode = cfg.io.delta_mode
    _check_one_ingest(cfg)
    actions = io.read_table(spark, cfg.table_path(S.T_ACTIONS), delta_mode=mode)
    # Both tables come from one per-user aggregation of every action (the pipeline's largest shuffle):
    # persisted, the second write reuses it instead of running it again, and the users left out are
    # counted from its rows (a distinct count of the actions' users would be another full shuffle).
    events = user_events(actions, cfg.sequences).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        cap = cfg.sequences.max_length
        longer = kept(cfg.sequences) & (F.col("n") - 1 > F.lit(cap)) if cap else F.lit(False)
        users = events.agg(F.count(F.lit(1)).alias("all"),
                           F.count(F.when(kept(cfg.sequences), 1)).alias("kept"),
                           F.count(F.when(longer, 1)).alias("truncated")).first()
        if not users["kept"]:
            _no_users(actions, cfg)
        sequences, targets = split_user_events(events, cfg.sequences)
        # The targets first: a run killed between the two commits then leaves new targets beside the
        # previous training sequences, which end before them. The other order left the previous
        # targets beside new sequences that hold them, each user's old last item now a training
        # action: the graph and the models would learn the very transitions they are scored on.
        io.write_table(spark, targets, cfg.table_path(S.T_EVAL_TARGETS), mode="overwrite", delta_mode=mode,
                       overwrite_schema=True)
        io.write_table(spark, sequences, cfg.table_path(S.T_SEQUENCES), mode="overwrite", delta_mode=mode,
                       overwrite_schema=True)
    finally:
        events.unpersist()
    seq = io.read_table(spark, cfg.table_path(S.T_SEQUENCES), delta_mode=mode)
    s = seq.agg(F.count("*").alias("users"), F.sum(S.LENGTH).alias("actions"),
                F.max(S.LENGTH).alias("max_len"), F.avg(S.LENGTH).alias("avg_len")).first()
    out = {"users": s["users"], "train_actions": s["actions"] or 0, "max_length": s["max_len"],
           "avg_length": float(s["avg_len"] or 0.0), "excluded_users": users["all"] - users["kept"],
           "truncated_users": users["truncated"]}
    log.info("sequences: %d users (%d excluded: fewer than %d actions), %d training actions, "
             "avg length %.1f, max %s; %d eval targets", out["users"], out["excluded_users"],
             cfg.sequences.min_length, out["train_actions"], out["avg_length"], out["max_length"], out["users"])
    if out["truncated_users"]:
        log.info("sequences: %d users have more than sequences.max_length=%d training actions and keep their "
                 "most recent %d", out["truncated_users"], cap, cap)
    return out


class NoSequencesError(InvalidInput):
    """No user has enough actions: ``sequences`` would be emptied, so the job stops instead."""


def _no_users(actions, cfg: Config) -> None:
    """Raise :class:`NoSequencesError`, saying which setting removed the users; ``sequences`` and
    ``eval_targets`` keep their previous versions (an empty overwrite would empty every later table)."""
    sc = cfg.sequences
    if sc.behaviors and not actions.where(F.col(S.BEHAVIOR).isin(list(sc.behaviors))).limit(1).count():
        found = [r[0] for r in actions.select(S.BEHAVIOR).distinct().limit(20).collect()]  # at most 20 values
        raise NoSequencesError(f"sequences: no action has a behavior in sequences.behaviors={list(sc.behaviors)}; "
                               f"actions has {sorted(map(str, found))}; sequences left at its previous version")
    raise NoSequencesError(f"sequences: no user has sequences.min_length={sc.min_length} actions"
                           + (f" (with sequences.holdout={sc.holdout})" if sc.holdout > 1 else "")
                           + "; sequences left at its previous version")


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"{out['users']:,} users, {out['train_actions']:,} training actions, "
          f"{out['excluded_users']:,} users excluded (< {cfg.sequences.min_length} actions)"
          + (f", {out['truncated_users']:,} cut to their last {cfg.sequences.max_length:,}" if out["truncated_users"]
             else ""))
    print_tables(cfg, [S.T_SEQUENCES, S.T_EVAL_TARGETS])


if __name__ == "__main__":
    main()

"""Raw logs -> ``actions`` (+ ``actions_rejected``, ``items``, ``users`` where the source has them, ``id_keys``,
``companions_rejected``).

    python -m jobs.ingest --conf conf/ml1m_natm.yaml
    python -m jobs.ingest --set ingest.format=taobao --set ingest.path=UserBehavior.csv
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from pyspark import StorageLevel
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import MAPPED_FORMATS, Config
from ml.data import io
from ml.data.formats import read_source, source_read_errors
from ml.data.ingest import (BAD_BEHAVIOR, BAD_CATEGORY, BAD_ITEM, BAD_TS, BAD_USER, MISSING_BEHAVIOR,
                            TS_OUT_OF_RANGE, good_actions, id_collisions, id_keys, items_from_actions,
                            rejected_actions, validate_actions)
from ml.data.session import get_spark
from ml.errors import InvalidInput

from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.ingest")


@io.job_run
def run(cfg: Config, spark=None) -> dict:
    """Ingest ``cfg.ingest``; return counts (input rows, actions, rejected by reason; users and items
    approximate: an exact distinct count of billions of actions is a full shuffle only for a log line)."""
    spark = spark or get_spark(cfg.spark)
    ic, mode = cfg.ingest, cfg.io.delta_mode
    src = read_source(spark, ic, cfg.table_path(cfg.generate.table), mode)
    validated = validate_actions(src.actions, behaviors=src.behaviors, ts_unit=src.ts_unit,
                                 ts_format=ic.ts_format, min_ts=ic.min_ts, max_ts=ic.max_ts,
                                 string_ids=ic.string_ids)
    validated = validated.persist(StorageLevel.MEMORY_AND_DISK)
    with source_read_errors(ic):  # the first action over the source reads it (then the persisted rows)
        try:
            actions = good_actions(validated)
            if not actions.limit(1).count():  # on the persisted rows: the writes below reuse the pass it makes
                _no_actions(spark, cfg, validated)
            io.write_table(spark, actions, cfg.table_path(S.T_ACTIONS), mode="overwrite", delta_mode=mode,
                           overwrite_schema=True)
            io.write_table(spark, rejected_actions(validated), cfg.table_path(S.T_ACTIONS_REJECTED),
                           mode="overwrite", delta_mode=mode, overwrite_schema=True)
            # Always written, empty when the ids are integers: a previous source's keys must not name
            # this one's ids.
            keys = id_keys(validated) if ic.string_ids else spark.createDataFrame([], S.ID_KEYS)
            io.write_table(spark, keys.select(*[F.col(f.name).cast(f.dataType) for f in S.ID_KEYS.fields]),
                           cfg.table_path(S.T_ID_KEYS), mode="overwrite", delta_mode=mode, overwrite_schema=True)
        finally:
            validated.unpersist()
    actions = io.read_table(spark, cfg.table_path(S.T_ACTIONS), delta_mode=mode)
    keys = io.read_table(spark, cfg.table_path(S.T_ID_KEYS), delta_mode=mode) if ic.string_ids else None
    items = src.items if src.items is not None else items_from_actions(actions, keys)
    io.write_table(spark, items.select(*[F.col(f.name).cast(f.dataType) for f in S.ITEMS_TABLE.fields]),
                   cfg.table_path(S.T_ITEMS), mode="overwrite", delta_mode=mode, overwrite_schema=True)
    # Always written, empty when the source has no users: a previous dataset's users table left in
    # the warehouse would give its features to the new data's users (ids are plain integers).
    users = src.users if src.users is not None else spark.createDataFrame([], S.USERS_TABLE)
    io.write_table(spark, users.select(*[F.col(f.name).cast(f.dataType) for f in S.USERS_TABLE.fields]),
                   cfg.table_path(S.T_USERS), mode="overwrite", delta_mode=mode, overwrite_schema=True)
    # Always written, empty when the source has no companion files (or all their lines were read)
    companions = src.rejected if src.rejected is not None else spark.createDataFrame([], S.COMPANIONS_REJECTED)
    io.write_table(spark, companions.select(*[F.col(f.name).cast(f.dataType) for f in S.COMPANIONS_REJECTED.fields]),
                   cfg.table_path(S.T_COMPANIONS_REJECTED), mode="overwrite", delta_mode=mode, overwrite_schema=True)
    tables = [S.T_ACTIONS, S.T_ACTIONS_REJECTED, S.T_ITEMS, S.T_USERS, S.T_ID_KEYS, S.T_COMPANIONS_REJECTED]
    collisions = id_collisions(keys) if ic.string_ids else {}
    for kind, n in sorted(collisions.items()):
        log.warning("ingest.string_ids: %d %s ids were hashed from more than one key (their actions are one %s's; "
                    "the keys are in %s)", n, kind, kind, cfg.table_path(S.T_ID_KEYS))
    # HLL sketches (Apache DataSketches, lgConfigK 14: about 0.8 % error) rather than approx_count_distinct
    # at 1 %: its 2^14-register buffer cost every input partition ~0.2 s and the single final merge more
    # (24 s at 100 partitions of 10⁷ rows against 1.0 s, on 2 cores; at thousands of partitions, minutes)
    stats = actions.agg(F.count("*").alias("n"), F.hll_sketch_estimate(F.hll_sketch_agg(S.USER_ID, 14)).alias("u"),
                        F.hll_sketch_estimate(F.hll_sketch_agg(S.ITEM_ID, 14)).alias("i"),
                        F.max(S.TS).alias("last")).first()
    rejected = {r[S.REASON]: r["count"] for r in io.read_table(
        spark, cfg.table_path(S.T_ACTIONS_REJECTED), delta_mode=mode).groupBy(S.REASON).count().collect()}
    companion_lines = {(r["file"], r[S.REASON]): r["count"] for r in io.read_table(  # a few files and reasons
        spark, cfg.table_path(S.T_COMPANIONS_REJECTED), delta_mode=mode).groupBy("file", S.REASON).count().collect()}
    out = {"actions": stats["n"], "users": stats["u"], "items": stats["i"], "rejected": rejected,
           "companion_lines_rejected": companion_lines,
           "input_rows": stats["n"] + sum(rejected.values()), "tables": tables, "id_collisions": collisions}
    log.info("ingested %s: %d input rows -> %d actions (about %d users, %d items); rejected %s",
             ic.format, out["input_rows"], out["actions"], out["users"], out["items"], rejected or "none")
    every_row = {**rejected, None: stats["n"]}  # None: the good rows
    hints = f"{_ts_hint(cfg, every_row)}{_key_hint(cfg, every_row)}{_filter_hint(cfg, every_row)}"
    if hints:  # most rows rejected for one cause: the job succeeds on the rest, and says what to check
        log.warning("ingest: most input rows were rejected%s", hints)
    if ic.ts_unit in ("ms", "us", "ns") and stats["last"] is not None and stats["last"] < EARLY_1973:
        log.warning("ingest: every ts is before 1973 (the latest: %d s since the epoch) with ingest.ts_unit=%s: "
                    "if the source counts in a coarser unit, set it (s, ms, us, ns)", stats["last"], ic.ts_unit)
    return out


EARLY_1973 = 100_000_000  # 1973-03-03 in seconds: a log of ms read as µs lands on 1970-01-20


class NoActionsError(InvalidInput):
    """The source gave no valid action: ``actions`` would be emptied, so ingest stops instead."""


def _no_actions(spark, cfg: Config, validated) -> None:
    """Raise :class:`NoActionsError`. ``actions`` (and every table after it) keeps its previous
    version, since an overwrite with nothing would empty everything downstream; the rejected rows,
    if any, are written to ``actions_rejected`` first, so that what was wrong with them is kept."""
    mode, src = cfg.io.delta_mode, cfg.ingest.path or cfg.table_path(cfg.generate.table)
    rejected = rejected_actions(validated)
    reasons = {r[S.REASON]: r["count"] for r in rejected.groupBy(S.REASON).count().collect()}  # a few reasons
    if not reasons:
        raise NoActionsError(f"ingest: {src} ({cfg.ingest.format}) has no rows; actions left at its previous version")
    io.write_table(spark, rejected, cfg.table_path(S.T_ACTIONS_REJECTED), mode="overwrite", delta_mode=mode,
                   overwrite_schema=True)
    raise NoActionsError(
        f"ingest: none of the {sum(reasons.values()):,} rows of {src} ({cfg.ingest.format}) is a valid action "
        f"(rejected: {dict(sorted(reasons.items()))}; the rows and reasons are in "
        f"{cfg.table_path(S.T_ACTIONS_REJECTED)}); actions left at its previous version{_ts_hint(cfg, reasons)}"
        f"{_key_hint(cfg, reasons)}{_filter_hint(cfg, reasons)}")


def _most(reasons: dict, wanted: set) -> bool:
    """Do the rows with these reasons make up more than half of ``reasons``' rows? (A stray malformed
    line or duplicate must not hide the setting that rejected everything else.)"""
    total = sum(reasons.values())
    return 2 * sum(n for r, n in reasons.items() if r in wanted) > total


def _ts_hint(cfg: Config, reasons: dict) -> str:
    """Where most rows' ts is unreadable, the keys that say how ts is read are the likely cause."""
    ic = cfg.ingest
    if not _most(reasons, {BAD_TS}) or ic.format not in MAPPED_FORMATS:  # the others fix the unit
        return ""
    how = f"ingest.ts_unit={ic.ts_unit}" + (f", ingest.ts_format={ic.ts_format!r}" if ic.ts_unit == "string" else "")
    return f"; no ts could be read: check ingest.ts_unit / ingest.ts_format ({how})"


def _key_hint(cfg: Config, reasons: dict) -> str:
    """Where most rows' ids or categories are text, ``ingest.string_ids`` is the likely way out."""
    text_keys = {BAD_USER, BAD_ITEM, BAD_CATEGORY}
    if cfg.ingest.string_ids or not _most(reasons, text_keys) or cfg.ingest.format not in MAPPED_FORMATS:
        return ""
    return ("; ids and categories must be integers unless ingest.string_ids=true (user_id, item_id and "
            "category_id are then text keys, hashed to BIGINT ids)")


def _filter_hint(cfg: Config, reasons: dict) -> str:
    """Where most rows fell to a filter of the config, the filter's key and value."""
    ic = cfg.ingest
    if _most(reasons, {BAD_BEHAVIOR, MISSING_BEHAVIOR}) and ic.format in MAPPED_FORMATS:  # others fix the values
        return (f"; most rows' behaviour is missing or not in ingest.behaviors={ic.behaviors} (set the values "
                f"your log uses, or ingest.behaviors=null to accept any; a behaviour column under another name "
                f"is mapped with ingest.columns)")
    if _most(reasons, {TS_OUT_OF_RANGE}):
        return (f"; most ts are outside ingest.min_ts={ic.min_ts} .. ingest.max_ts={ic.max_ts} (seconds since the "
                f"epoch, after ingest.ts_unit={ic.ts_unit} is applied)")
    return ""


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"{out['input_rows']:,} input rows -> {out['actions']:,} actions "
          f"(about {out['users']:,} users, {out['items']:,} items)")
    for reason, n in sorted(out["rejected"].items()):
        print(f"  rejected {reason:<18} {n:,}")
    for (file, reason), n in sorted(out["companion_lines_rejected"].items()):
        print(f"  {os.path.basename(file)}: {n:,} lines left out ({reason})")
    print_tables(cfg, out["tables"])


if __name__ == "__main__":
    main()

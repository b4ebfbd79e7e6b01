"""Raw action rows (all text) -> typed ``actions`` + ``actions_rejected`` with a reason per row."""
from __future__ import annotations

import re
from typing import Optional, Sequence

from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import LongType

from ml import schemas as S
from ml.config import CANONICAL_FIELDS, TS_UNITS, ConfigError

# Rejection reasons, checked in this order (the first that applies is recorded).
MALFORMED = "malformed_row"
MISSING_USER = "missing_user_id"
BAD_USER = "bad_user_id"
MISSING_ITEM = "missing_item_id"
BAD_ITEM = "bad_item_id"
MISSING_TS = "missing_ts"
BAD_TS = "bad_ts"
TS_OUT_OF_RANGE = "ts_out_of_range"
MISSING_BEHAVIOR = "missing_behavior"
BAD_BEHAVIOR = "unknown_behavior"
BAD_CATEGORY = "bad_category_id"
DUPLICATE = "duplicate"

# A whole number, as digits or as a decimal with only zeros after the point ("4.0", "4."): pandas writes an
# integer column holding a missing value as floats, and the text is still exact.
_INT_RE = r"(?U)^\s*[+-]?[0-9]+(\.0*)?\s*$"  # (?U): white space as _strip takes it


def _strip(c):
    """The text without white space at either end: tabs, line breaks, no-break and ideographic spaces
    too (Unicode's White_Space; Spark's ``trim`` takes spaces only, and a tab-only id was a key)."""
    return F.regexp_replace(F.col(c), r"(?U)^\s+|\s+$", "")


def _blank(c):
    return F.col(c).isNull() | (_strip(c) == "")


# What a decoder puts for bytes it cannot read (CSV is read as ingest.csv_encoding, UTF-8 by default):
# two keys that differ only there would be one key after decoding, so such a key is a bad id.
UNDECODED = "\ufffd"


def to_long(c):
    """Text -> BIGINT only for whole numbers that fit ("4", "4.0", " 4 "; no silent truncation of 12.7
    or overflow). Ids and integer timestamps alike."""
    text = F.col(c)
    digits = F.regexp_extract(text, r"(?U)^\s*([+-]?[0-9]+)", 1)  # any leading white space, tabs too, as a cast reads it
    return F.when(text.rlike(_INT_RE), digits.try_cast(LongType()))


def _has_zone(ts_format: str) -> bool:
    """Does the datetime pattern read a zone or offset (letters outside '...' literals)?"""
    return bool(re.search(r"[VzOXxZ]", re.sub(r"'[^']*'", "", ts_format)))


def _parse_ts(ts_format: str):
    text = _strip(S.TS)
    if not _has_zone(ts_format):
        # A wall-clock time is read as UTC, not in spark.sql.session.timeZone (a notebook's or a
        # cluster's zone would otherwise change every ts, and the rows a time window rejects).
        text, ts_format = F.concat(text, F.lit(" UTC")), f"{ts_format} VV"
    return F.try_to_timestamp(text, F.lit(ts_format))


def check_ts_format(spark: SparkSession, ts_format: str) -> None:
    """Raise :class:`ConfigError` naming ``ingest.ts_format`` for a pattern Spark refuses, or one that
    cannot read back a time it writes itself. Either would otherwise surface from inside the job's
    query: Spark's own exception (a bug's traceback, naming no key), or every row rejected as
    ``bad_ts``. One literal is formatted and parsed on a one-row frame; the data is not read."""
    try:
        probe = spark.range(1).select(
            F.date_format(F.lit("2001-02-03 14:05:06.789").cast("timestamp"), ts_format).alias(S.TS))
        row = probe.select(S.TS, _parse_ts(ts_format).alias("t")).first()
    except PySparkException as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise ConfigError(f"ingest.ts_format={ts_format!r} is not a datetime pattern Spark can parse with: "
                          f"{why}") from e
    if row["t"] is None:
        raise ConfigError(f"ingest.ts_format={ts_format!r} cannot parse a time it formats itself "
                          f"({row[S.TS]!r}); see Spark's datetime patterns")


# Seconds a TIMESTAMP can hold (0001-01-01 to 9999-12-31 UTC). A numeric ts outside them is no
# time: most often a finer unit than ingest.ts_unit says (ns read as seconds is the year 5 * 10^10).
MIN_TS_SECONDS, MAX_TS_SECONDS = -62_135_596_800, 253_402_300_799


def _to_seconds(ts_unit: str, ts_format: str):
    if ts_unit == "string":
        return F.unix_timestamp(_parse_ts(ts_format))
    per_second = TS_UNITS[ts_unit]
    secs = to_long(S.TS) if per_second == 1 else _floor_div(to_long(S.TS), per_second)
    return F.when(secs.between(MIN_TS_SECONDS, MAX_TS_SECONDS), secs)


def _floor_div(x, n: int):
    """floor(x / n) for a BIGINT column, exact: the double quotient (a ns count rounds to 256 ns there,
    and 1500000000999999999 ns would floor to the next second) corrected by the remainder in BIGINT
    arithmetic. Floor, not truncation, for times before 1970. Null where the correction overflows
    (within a second of the BIGINT range's ends: no time for ms or us, 2262 for ns), which is
    ``bad_ts`` then. A decimal division, exact too, took 3x as long."""
    q = F.floor(x / F.lit(float(n))).cast(LongType())  # within 1 of the quotient for any time 0001-9999
    r = F.try_subtract(x, F.try_multiply(q, F.lit(n)))
    return F.when(r < 0, q - 1).when(r >= n, q + 1).when(r.isNotNull(), q)


def _to_fine(ts_unit: str, ts_format: str):
    """The ts in the source's finest unit where it is finer than a second (ms, us, ns, or a string with
    a fraction of a second), for telling duplicates apart; null for whole seconds."""
    if ts_unit == "string":
        return F.unix_micros(_parse_ts(ts_format))
    return to_long(S.TS) if ts_unit != "s" else F.lit(None).cast(LongType())


def _micros(fine, ts_unit: str):
    """:func:`_to_fine`'s column in microseconds (``actions.ts_micros``, which orders a user's events
    within a second); null for whole seconds. Nanoseconds are floored."""
    per_second = TS_UNITS[ts_unit]
    if per_second is None or per_second in (1, 1_000_000):  # a string's µs, null for seconds, or µs
        return fine
    if per_second > 1_000_000:
        return _floor_div(fine, per_second // 1_000_000)
    return F.try_multiply(fine, F.lit(1_000_000 // per_second))


def string_id(c):
    """A text key -> BIGINT: Spark's xxhash64 of the stripped text's UTF-8 bytes (xxHash64, seed 42;
    null for a blank key, and for one holding :data:`UNDECODED`, so a ``bad_*_id`` row), a function
    of the key alone: the same id on every run and cluster. Two keys share an id with probability
    about n^2 / 2^65 for n keys (3 * 10^-4 at 10^8 items), counted by :func:`id_collisions`."""
    key = _strip(c)  # null for a null key: so is the id
    return F.when((key != "") & ~F.col(c).contains(UNDECODED), F.xxhash64(key))


def id_keys(validated: DataFrame) -> DataFrame:
    """The ``id_keys`` rows of the good actions of :func:`validate_actions` (``string_ids``): each
    distinct (kind, key, id) once; kind ``user``, ``item`` or ``category``."""
    good = validated.where(F.col(S.REASON).isNull())
    users = good.select(F.lit("user").alias("kind"), _strip(S.USER_ID).alias("key"), F.col("_u").alias("id"))
    items = good.select(F.lit("item").alias("kind"), _strip(S.ITEM_ID).alias("key"), F.col("_i").alias("id"))
    cats = good.where(F.col("_c").isNotNull()).select(F.lit("category").alias("kind"),
                                                      _strip(S.CATEGORY_ID).alias("key"), F.col("_c").alias("id"))
    return users.unionByName(items).unionByName(cats).distinct()


def id_collisions(keys: DataFrame) -> dict:
    """{kind: ids that more than one key was hashed to} (kinds without any left out)."""
    shared = keys.groupBy("kind", "id").count().where(F.col("count") > 1)
    return {r["kind"]: r["n"] for r in shared.groupBy("kind").agg(F.count("*").alias("n")).collect()}


def validate_actions(raw: DataFrame, behaviors: Optional[Sequence[str]] = None, ts_unit: str = "s",
                     ts_format: str = "yyyy-MM-dd HH:mm:ss", min_ts: Optional[int] = None,
                     max_ts: Optional[int] = None, string_ids: bool = False) -> DataFrame:
    """Type and check raw rows; return them with typed columns ``_u, _i, _t, _c`` and ``reason``.

    ``reason`` is null for a good row. Exact duplicates of a good event (same user, item, ts in the
    source's own unit, behaviour and category) keep one copy; the others get reason ``duplicate``.
    Two events 400 ms apart are two events, although ``actions.ts`` holds both as the same second.
    A ``ts_format`` Spark cannot parse with is a :class:`ConfigError`, raised here. With
    ``string_ids`` every non-blank user_id / item_id / category_id is a key, hashed to its id
    (:func:`string_id`).
    """
    if ts_unit == "string":
        check_ts_format(raw.sparkSession, ts_format)
    to_id = string_id if string_ids else to_long
    df = raw.select(*[F.col(c) for c in raw.columns], to_id(S.USER_ID).alias("_u"), to_id(S.ITEM_ID).alias("_i"),
                    _to_seconds(ts_unit, ts_format).alias("_t"), to_id(S.CATEGORY_ID).alias("_c"),
                    F.nullif(_strip(S.BEHAVIOR), F.lit("")).alias("_b"),
                    _to_fine(ts_unit, ts_format).alias("_tms"))
    df = df.withColumn("_tus", _micros(F.col("_tms"), ts_unit))
    ts_ok = F.lit(True)
    if min_ts is not None:
        ts_ok = ts_ok & (F.col("_t") >= min_ts)
    if max_ts is not None:
        ts_ok = ts_ok & (F.col("_t") <= max_ts)
    reason = (F.when(F.col(S.RAW_RECORD).isNotNull(), MALFORMED)
              .when(_blank(S.USER_ID), MISSING_USER).when(F.col("_u").isNull(), BAD_USER)
              .when(_blank(S.ITEM_ID), MISSING_ITEM).when(F.col("_i").isNull(), BAD_ITEM)
              .when(_blank(S.TS), MISSING_TS).when(F.col("_t").isNull(), BAD_TS)
              .when(~ts_ok, TS_OUT_OF_RANGE))
    if behaviors:
        # A blank behaviour is none of the allowed ones; it needs its own test, since null.isin(...)
        # is null and would let the row through as a good action.
        reason = (reason.when(F.col("_b").isNull(), MISSING_BEHAVIOR)
                  .when(~F.col("_b").isin(list(behaviors)), BAD_BEHAVIOR))
    reason = reason.when(~_blank(S.CATEGORY_ID) & F.col("_c").isNull(), BAD_CATEGORY)
    df = df.withColumn(S.REASON, reason)
    # One copy of each exact duplicate survives; the key is the whole event, so a hot item or a
    # power user does not concentrate rows in one task (duplicates of one event are few). The copy
    # kept is the first good row by the raw text, so which raw row lands in actions_rejected (" 4 "
    # or "4") does not depend on the order rows reach the task: a rerun rejects the same rows. Bad
    # rows are never duplicates and each gets its own window partition (a unique salt): they cannot
    # push a good row out, and garbage lines, whose keys are all null, are not sorted in one task.
    df = df.withColumn("_salt", F.when(F.col(S.REASON).isNull(), F.lit(-1))
                       .otherwise(F.monotonically_increasing_id()))
    key = ["_u", "_i", "_t", "_tms", "_b", "_c", "_salt"]
    raw_order = [F.col(c).asc_nulls_first() for c in (*CANONICAL_FIELDS, S.RAW_RECORD) if c in raw.columns]
    dup_rank = F.row_number().over(Window.partitionBy(*key).orderBy(*raw_order))
    df = df.withColumn(S.REASON, F.when(F.col(S.REASON).isNull() & (dup_rank > 1), F.lit(DUPLICATE))
                       .otherwise(F.col(S.REASON))).drop("_tms", "_salt")
    return df


def good_actions(validated: DataFrame) -> DataFrame:
    return validated.where(F.col(S.REASON).isNull()).select(
        F.col("_u").alias(S.USER_ID), F.col("_i").alias(S.ITEM_ID), F.col("_t").alias(S.TS),
        F.col("_b").alias(S.BEHAVIOR), F.col("_c").alias(S.CATEGORY_ID), F.col("_tus").alias(S.TS_MICROS))


def rejected_actions(validated: DataFrame) -> DataFrame:
    return validated.where(F.col(S.REASON).isNotNull()).select(
        *[F.col(f.name).cast(f.dataType) for f in S.ACTIONS_REJECTED.fields])


def items_from_actions(actions: DataFrame, keys: Optional[DataFrame] = None) -> DataFrame:
    """One row per item; category = the item's most frequent category (ties: smallest id), named by
    its key in ``keys`` (``id_keys`` under ``string_ids``; the smallest key where two share an id),
    else by the id's digits."""
    counts = actions.where(F.col(S.CATEGORY_ID).isNotNull()).groupBy(S.ITEM_ID, S.CATEGORY_ID).count()
    best = counts.groupBy(S.ITEM_ID).agg(
        F.min(F.struct(-F.col("count"), F.col(S.CATEGORY_ID))).alias("b"))
    all_items = actions.select(S.ITEM_ID).distinct()
    out = all_items.join(best, S.ITEM_ID, "left").select(S.ITEM_ID, F.col(f"b.{S.CATEGORY_ID}").alias(S.CATEGORY_ID))
    name = F.col(S.CATEGORY_ID).cast("string")
    if keys is not None:
        names = (keys.where(F.col("kind") == "category").groupBy(F.col("id").alias("_cid"))
                 .agg(F.min("key").alias("_name")))
        out = out.join(names, out[S.CATEGORY_ID] == names["_cid"], "left")
        name = F.coalesce(F.col("_name"), name)
    return out.select(
        S.ITEM_ID, S.CATEGORY_ID, name.alias(S.CATEGORY_NAME),
        F.lit(None).cast("string").alias(S.TITLE),
        F.lit(None).cast("map<string,string>").alias(S.FEATURES))


def category_names(items: DataFrame, ids) -> dict:
    """{category_id: category_name} for the given ids (a few: those a log line or a plot shows), from
    the ``items`` table; the smallest name where an id has several, ids without a name left out."""
    ids = sorted({int(i) for i in ids if i is not None})
    if not ids:
        return {}
    wanted = items.sparkSession.createDataFrame([(i,) for i in ids], f"{S.CATEGORY_ID} long")
    named = (items.where(F.col(S.CATEGORY_NAME).isNotNull()).join(F.broadcast(wanted), S.CATEGORY_ID)
             .groupBy(S.CATEGORY_ID).agg(F.min(S.CATEGORY_NAME).alias(S.CATEGORY_NAME)))
    return {r[0]: r[1] for r in named.collect()}  # at most len(ids) rows

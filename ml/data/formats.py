"""Input formats -> raw action rows, every value still text.

Each reader returns a :class:`RawSource`: ``actions`` with string columns ``user_id, item_id, ts,
behavior, category_id, raw_record`` (``raw_record`` is set only for lines that could not be split
into fields) plus, where the source has them, ``items`` and ``users`` DataFrames in the canonical
schemas. Validation and typing happen in :mod:`ml.data.ingest`, so every format gets the same
bad-row handling.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
from dataclasses import dataclass
from functools import reduce
from typing import List, Optional, Tuple
from urllib.parse import unquote

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window
from pyspark.sql.types import LongType, StringType, StructField, StructType

from ml import schemas as S
from ml.config import CANONICAL_FIELDS, ConfigError, IngestConfig
from ml.data import files, io
from ml.data.delta_files import is_uri
from ml.data.ingest import to_long
from ml.errors import InvalidInput, MissingInput

log = logging.getLogger(__name__)

RAW_COLUMNS = list(CANONICAL_FIELDS) + [S.RAW_RECORD]
_CORRUPT = "_corrupt_record"

# ML-1M genres in the order of its README; category_id = position + 1.
ML1M_GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
               "Thriller", "War", "Western"]
TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior", "ts"]
TAOBAO_BEHAVIORS = ["pv", "buy", "cart", "fav"]
# Spark's CSV parser fails the whole read on a line with more fields than its ``maxColumns`` (20,480 by
# default), instead of reading it as a malformed row; at 2^20 a garbled line of up to a million
# separators is a malformed row, for no cost in time (the parser's one array of this length per task).
CSV_MAX_FIELDS = 1 << 20
# header-less CSV and Taobao: lines read to tell a wrong column list from a few bad lines
FIELD_COUNT_SAMPLE = 1000


class SourceSchemaError(InvalidInput):
    """The source's columns do not match the configured mapping."""


@dataclass
class RawSource:
    actions: DataFrame
    items: Optional[DataFrame] = None
    users: Optional[DataFrame] = None
    behaviors: Optional[list] = None  # allowed behaviour values imposed by the format
    ts_unit: str = "s"
    # the companion files' lines left out (``companions_rejected``: file, line, reason); None: no companions
    rejected: Optional[DataFrame] = None


def _raw_select(df: DataFrame, mapping: dict, corrupt_col: Optional[str] = None) -> DataFrame:
    cols = []
    for f in CANONICAL_FIELDS:
        src = mapping.get(f)
        cols.append((F.col(f"`{src}`").cast("string") if src else F.lit(None).cast("string")).alias(f))
    raw = F.col(corrupt_col) if corrupt_col else F.lit(None).cast("string")
    return df.select(*cols, raw.alias(S.RAW_RECORD))


def _sep_hint(source_cols: list) -> str:
    """A header read as one column that holds another separator: the likely fix, ``ingest.csv_sep``."""
    if len(source_cols) != 1:
        return ""
    for sep, label, setting in ((";", "';'", ";"), ("\t", "a tab", "\\t"), ("|", "'|'", "|")):
        if sep in str(source_cols[0]):
            return (f"; the header was read as one column holding {label}: if that separates the fields, "
                    f"--set 'ingest.csv_sep={setting}'")
    return ""


def _with_same_names(mapping: dict, source_cols: list) -> dict:
    """``ingest.columns`` plus, for every canonical field it leaves out, the source column of the same
    name (unless the mapping reads that column as another field): mapping one renamed column does not
    make the user map the columns that already have their names."""
    taken = set(mapping.values())
    same = {f: f for f in CANONICAL_FIELDS if f not in mapping and f in source_cols and f not in taken}
    return {**mapping, **same}


def _check_mapping(source_cols: list, mapping: dict, allow_extra: bool, where: str) -> None:
    missing = [f"{canon}->{src}" for canon, src in mapping.items() if src not in source_cols]
    unmapped = [req for req in ("user_id", "item_id", "ts") if req not in mapping]
    if unmapped:
        what = f"field {unmapped[0]!r}" if len(unmapped) == 1 else f"fields {unmapped}"
        how = " ".join(f"--set ingest.columns.{req}=<column>" for req in unmapped)
        raise SourceSchemaError(f"{where}: ingest.columns has no mapping for required {what}; source has "
                                f"{source_cols} (map {'it' if len(unmapped) == 1 else 'them'} with {how})"
                                f"{_sep_hint(source_cols)}")
    extra = [c for c in source_cols if c not in mapping.values()]
    if missing or (extra and not allow_extra):
        msg = f"{where}: columns do not match ingest.columns; source has {source_cols}"
        if missing:
            msg += f"; missing mapped columns {missing}"
        if extra and not allow_extra:
            msg += f"; extra columns {extra} (map them or set ingest.allow_extra_columns=true)"
        raise SourceSchemaError(msg + _sep_hint(source_cols))


def read_csv_lines(spark: SparkSession, path: str, columns: list, sep: str, header: bool,
                   encoding: str = "UTF-8") -> DataFrame:
    """All-string CSV read; lines with the wrong number of fields land in ``_corrupt_record``.

    Column pruning is off for this read: with it, Spark parses only the columns the query uses and
    no longer checks a line's field count, so with an unmapped column (``allow_extra_columns``) a line
    missing a field was read with its values shifted into the wrong columns, as a good row.
    """
    schema = StructType([StructField(c, StringType()) for c in columns] + [StructField(_CORRUPT, StringType())])
    return (spark.read.schema(schema)
            .option("header", header).option("sep", sep).option("encoding", encoding)
            .option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", _CORRUPT)
            .option("columnPruning", False)
            .option("enforceSchema", False)
            .option("maxColumns", CSV_MAX_FIELDS)
            .csv(path))


def _first_line_field_count(spark: SparkSession, path: str, sep: str, encoding: str = "UTF-8") -> int:
    """The number of fields of the first non-blank line, as Spark's CSV reader splits it: its quoting,
    and ``sep`` as Spark reads it (``\\t`` written out is a tab there, as the config's help says)."""
    n = len(spark.read.option("header", False).option("sep", sep).option("encoding", encoding)
            .option("maxColumns", CSV_MAX_FIELDS).csv(path).columns)
    if n == 0:
        raise SourceSchemaError(f"{path}: the file is empty")
    return n


def _check_field_count(spark: SparkSession, path: str, columns: list, sep: str, what: str,
                       encoding: str = "UTF-8") -> None:
    """Fail when a header-less source's lines do not have the fields ``columns`` names: when most of
    the first :data:`FIELD_COUNT_SAMPLE` lines Spark reads have another count (a wrong
    ``ingest.csv_schema``, or another format). A few such lines are bad rows, not a wrong schema:
    they are read as ``malformed_row`` and kept in ``actions_rejected``. The error names the file
    with the most such lines among those read, and that file's first line's field count."""
    # the first lines Spark reads, in partition order (a limit collected scans partitions one after
    # another, as far as it needs: no task per split of the whole source); a data column is in the
    # query as Spark refuses a CSV query that reads the corrupt-record column alone
    sample = (read_csv_lines(spark, path, columns, sep, header=False, encoding=encoding)
              .select(F.col(f"`{columns[0]}`").isNull().alias("c0"), F.col(_CORRUPT).isNotNull().alias("bad"),
                      F.col("_metadata.file_path").alias("f"))
              .limit(FIELD_COUNT_SAMPLE).collect())
    n, bad = len(sample), sum(r["bad"] for r in sample)
    if not n:
        raise SourceSchemaError(f"{path}: the file is empty")
    if bad * 2 <= n:
        return
    per_file = collections.Counter(r["f"] for r in sample if r["bad"])
    where = min(per_file, key=lambda f: (-per_file[f], f))  # the file with the most such lines
    where = unquote(where)  # Spark's file path is a URI: a space in a name is %20 there
    try:  # a second read of that one file, for the message only: never an error of its own
        first = _first_line_field_count(spark, where, sep, encoding)
        detail = (f"extra columns at positions {list(range(len(columns) + 1, first + 1))}" if first > len(columns)
                  else f"missing columns {columns[first:]}" if first < len(columns) else "other lines differ")
        detail = f"; its first line has {first} fields: {detail}"
    except Exception:  # noqa: BLE001 - a name Spark reads as a glob ([ab].csv), say
        detail = ""
    raise SourceSchemaError(f"{where}: {bad:,} of the first {n:,} lines read do not have the {len(columns)} fields "
                            f"{what} {columns}{detail}")


# The character sets Spark 4's CSV reader takes (others only with spark.sql.legacy.javaCharsets=true)
SPARK_CHARSETS = ("utf-8", "utf-16", "utf-16be", "utf-16le", "utf-32", "iso-8859-1", "us-ascii")


def _check_encoding(spark: SparkSession, encoding: str) -> None:
    """``ingest.csv_encoding`` must be one Spark reads: its own error, from inside the read, names no key."""
    if encoding.lower() in SPARK_CHARSETS or spark.conf.get("spark.sql.legacy.javaCharsets", "false").lower() == "true":
        return
    raise ConfigError(f"ingest.csv_encoding={encoding!r} is not a character set Spark reads CSV in; expected one of "
                      f"{list(SPARK_CHARSETS)} (another Java character set, windows-1252 say, with --set "
                      "spark.conf.spark.sql.legacy.javaCharsets=true)")


def read_csv(spark: SparkSession, cfg: IngestConfig) -> RawSource:
    mapping = dict(cfg.columns)
    _check_encoding(spark, cfg.csv_encoding)
    if cfg.csv_header:
        columns = (spark.read.option("header", True).option("sep", cfg.csv_sep).option("encoding", cfg.csv_encoding)
                   .csv(cfg.path).columns)
        if not columns:
            raise SourceSchemaError(f"{cfg.path}: the file is empty (no header line; ingest.csv_header=true)")
    else:
        if not cfg.csv_schema:
            raise SourceSchemaError("ingest.csv_schema (column names in file order) is required when "
                                    "ingest.csv_header=false")
        columns = list(cfg.csv_schema)
        _check_field_count(spark, cfg.path, columns, cfg.csv_sep, "ingest.csv_schema names", cfg.csv_encoding)
    mapping = _with_same_names(mapping, columns)  # default: same names, as Parquet
    _check_mapping(columns, mapping, cfg.allow_extra_columns, cfg.path)
    df = read_csv_lines(spark, cfg.path, columns, cfg.csv_sep, cfg.csv_header, cfg.csv_encoding)
    return RawSource(_raw_select(df, mapping, _CORRUPT), behaviors=cfg.behaviors, ts_unit=cfg.ts_unit)


_ID_FIELDS = ("user_id", "item_id", "category_id")
_CLOCK_TYPES = (T.TimestampType, T.TimestampNTZType, T.DateType)  # a ts column with a clock of its own
_FLOATS = (T.FloatType, T.DoubleType)  # read as a category_id only (:func:`_float_category`)


def _check_types(df: DataFrame, mapping: dict, where: str, string_ids: bool = False) -> None:
    """A typed source's mapped columns have types ingest can read row by row: ids integers (or
    strings, checked per row like CSV text), ts integers, strings or a timestamp / date. Anything
    else (float user or item ids, say) would make every row a rejected one, so it is a schema error
    naming the column. A float category_id is read (:func:`_float_category`): pandas writes an integer
    column with a missing value as floats."""
    types = {f.name: f.dataType for f in df.schema.fields}
    whole = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.StringType)
    for canon, src in mapping.items():
        t = types[src]
        if canon in _ID_FIELDS or canon == "ts":
            ok = isinstance(t, whole) or (isinstance(t, T.DecimalType) and t.scale == 0) or (
                canon == "ts" and isinstance(t, _CLOCK_TYPES)) or (
                canon == "category_id" and isinstance(t, _FLOATS) and not string_ids)  # hashed, 4.5 would be a key
            if not ok:
                expected = ("an integer (s, ms, us or ns since the epoch: ingest.ts_unit), a string or a timestamp" if canon == "ts"
                            else "an integer or a string of digits")
                raise SourceSchemaError(f"{where}: column {src!r} ({canon}) is {t.simpleString()}; expected {expected} "
                                        f"(cast it in the source, or map another column with ingest.columns.{canon})")


def _float_category(col, exact: int):
    """A float category id as text ``to_long`` reads: a whole number below 2^53 for a double, 2^24 for a
    float (where every integer is exact) as its digits; anything else (4.5, NaN, 1e17) as Spark writes
    it, so the row is rejected as ``bad_category_id``, not truncated."""
    whole = (col % 1 == 0) & (F.abs(col) < exact)
    return F.when(whole, col.cast("long").cast("string")).otherwise(col.cast("string"))


def read_table_source(spark: SparkSession, cfg: IngestConfig, path: str, fmt: str,
                      delta_mode: str = "auto") -> RawSource:
    if fmt == "parquet" and _is_delta_table(spark, path):
        # read as Parquet, a Delta table's folder is every file any version ever wrote: rows deleted or
        # replaced since come back as live actions
        raise SourceSchemaError(f"{path} is a Delta table (it has a _delta_log); read it with "
                                "ingest.format=delta, not as the Parquet files under it")
    df = (io.read_table(spark, path, delta_mode=delta_mode) if fmt == "delta"
          else _read_parquet(spark, path, dict(cfg.columns).get("ts", "ts")))
    mapping = _with_same_names(dict(cfg.columns), df.columns)
    _check_mapping(df.columns, mapping, cfg.allow_extra_columns, path)
    _check_types(df, mapping, path, cfg.string_ids)
    ts_unit = cfg.ts_unit
    if isinstance(df.schema[mapping["ts"]].dataType, _CLOCK_TYPES):  # a clock of its own, whatever ts_unit says
        df = df.withColumn(mapping["ts"], _epoch_micros(df, mapping["ts"]))
        ts_unit = "us"  # Spark's own precision, so that two events 400 us apart are not duplicates
    cat = mapping.get("category_id")
    cat_type = df.schema[cat].dataType if cat else None
    if isinstance(cat_type, _FLOATS):
        df = df.withColumn(cat, _float_category(F.col(f"`{cat}`"), 2 ** 24 if isinstance(cat_type, T.FloatType) else 2 ** 53))
    return RawSource(_raw_select(df, mapping), behaviors=cfg.behaviors, ts_unit=ts_unit)


def _is_delta_table(spark: SparkSession, path: str) -> bool:
    """Whether the folder ``path`` holds a ``_delta_log``: looked up on the local disk, or for a URI
    through the session's Hadoop file system (the one its read would use; delta-rs would first probe
    a cloud's metadata service for credentials). False where that cannot be asked (Spark Connect)."""
    local = files.local_path(path)
    if local is not None:
        return os.path.isdir(os.path.join(local, "_delta_log"))
    try:
        jvm = spark._jvm
        log_dir = jvm.org.apache.hadoop.fs.Path(path.rstrip("/") + "/_delta_log")
        return bool(log_dir.getFileSystem(spark._jsc.hadoopConfiguration()).exists(log_dir))
    except Exception:  # noqa: BLE001 - only the check is lost
        return False


def _read_parquet(spark: SparkSession, path: str, ts_column: str) -> DataFrame:
    """``spark.read.parquet``, with Spark's refusal of nanosecond timestamps (pandas' default when it
    writes Parquet; one such column, mapped or not, fails the whole read) as a
    :class:`SourceSchemaError` naming the columns and the way out for each."""
    try:
        return spark.read.parquet(path)
    except AnalysisException as e:
        if "NANOS" not in str(e):
            raise
        cols = _nanos_columns(path)
        as_long = "--set spark.conf.spark.sql.legacy.parquet.nanosAsLong=true"
        if cols is None:
            how = (f"or read them as integers with {as_long}, and --set ingest.ts_unit=ns if the ts column ({ts_column!r}) "
                   "is one of them")
        elif ts_column in cols:
            how = f"or read them as integer nanoseconds with {as_long} --set ingest.ts_unit=ns"
        else:
            how = (f"or, as {ts_column!r} (ts) is not one of them, read them as integers with {as_long} (ts is read "
                   "as ingest.ts_unit says), or leave them out of the source")
        which = f"column{'s' if cols and len(cols) > 1 else ''} {', '.join(map(repr, cols))}" if cols else "TIMESTAMP(NANOS)"
        raise SourceSchemaError(
            f"{path}: Spark cannot read Parquet timestamps in nanoseconds ({which}; pandas writes them by default). "
            "Write them in microseconds (pandas: df.to_parquet(path, coerce_timestamps='us', "
            f"allow_truncated_timestamps=True, index=False)), {how}") from e


def _nanos_columns(path: str) -> Optional[List[str]]:
    """The columns of the Parquet files under ``path`` that hold nanosecond timestamps; None where
    Arrow cannot open them (a URI it has no filesystem for)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        schema = ds.dataset(path, format="parquet").schema
    except Exception:  # only the message depends on it
        return None
    return [f.name for f in schema if pa.types.is_timestamp(f.type) and f.type.unit == "ns"]


def _epoch_micros(df: DataFrame, name: str):
    """Epoch us of a TIMESTAMP (an instant), or of a TIMESTAMP_NTZ / DATE read as UTC wall-clock
    time: the same number whatever ``spark.sql.session.timeZone`` the session has (a cast of NTZ to
    TIMESTAMP would read it in the session's zone)."""
    col, t = F.col(f"`{name}`"), df.schema[name].dataType
    if isinstance(t, T.TimestampType):
        return F.unix_micros(col)
    text = F.concat(col.cast("string"), F.lit(" 00:00:00 UTC" if isinstance(t, T.DateType) else " UTC"))
    return F.unix_micros(text.cast("timestamp"))


def read_taobao(spark: SparkSession, cfg: IngestConfig) -> RawSource:
    """Taobao UserBehavior CSV: ``user_id,item_id,category_id,behavior,timestamp``, no header."""
    _check_field_count(spark, cfg.path, TAOBAO_COLUMNS, ",", "of Taobao UserBehavior")
    df = read_csv_lines(spark, cfg.path, TAOBAO_COLUMNS, ",", header=False)
    actions = _raw_select(df, {c: c for c in TAOBAO_COLUMNS}, _CORRUPT)
    return RawSource(actions, behaviors=cfg.behaviors or TAOBAO_BEHAVIORS, ts_unit="s")


MALFORMED_LINE = "malformed_line"  # companion lines: wrong field count, or an id that is not a whole number
DUPLICATE_ID = "duplicate_id"  # companion lines for an id an earlier (smaller) line already gives


def _companion_rows(df: DataFrame, path: str, ids: List[str], values: List[str],
                    sep: str) -> Tuple[DataFrame, DataFrame]:
    """A companion file's lines (from :func:`read_csv_lines`) -> (one row per ``ids[0]``, ids as
    BIGINT; the lines left out, as ``companions_rejected`` rows).

    A line with the wrong field count or an id that is not a whole number (a header, a garbled line)
    is left out as ``malformed_line``, and a second line for an id already listed loses to the
    smallest of its lines (by ``values``, then the line, so the pick does not depend on the order
    lines are read) as ``duplicate_id``: both are counted, logged and kept with the file's path and
    the line (as read: its fields joined by ``sep`` where it split into them), and a file with lines
    but none usable is a :class:`SourceSchemaError`. The ids are try-cast, so the result is the same
    whether ``spark.sql.ansi.enabled`` is on (a plain cast fails the job on one such line) or off (a
    plain cast makes it null and a filter dropped it unseen). One pass over the file for the counts,
    one per later use: a companion file is a catalogue, not the action log.
    """
    fields = [*ids, *values]
    # (an empty field is read as null, which concat_ws would skip: as "", the line keeps its fields)
    line = F.coalesce(F.col(_CORRUPT), F.concat_ws(sep, *[F.coalesce(F.col(f"`{c}`"), F.lit("")) for c in fields]))
    typed = df.select(*[to_long(c).alias(c) for c in ids], *values, line.alias("_line"), _CORRUPT)
    good = reduce(lambda a, b: a & b, [F.col(c).isNotNull() for c in ids], F.col(_CORRUPT).isNull())
    key = ids[0]
    # the malformed lines share one null window partition; a catalogue's few, not a skew that matters
    first = Window.partitionBy(F.when(good, F.col(key))).orderBy(*ids[1:], *values, "_line")
    reason = F.when(~good, F.lit(MALFORMED_LINE)).when(F.row_number().over(first) > 1, F.lit(DUPLICATE_ID))
    ranked = typed.withColumn(S.REASON, reason)
    c = ranked.agg(F.sum((F.col(S.REASON) == MALFORMED_LINE).cast("long")).alias("bad"),
                   F.sum((F.col(S.REASON) == DUPLICATE_ID).cast("long")).alias("dup"),
                   F.count(F.when(F.col(S.REASON).isNull(), 1)).alias("ids")).first()
    bad, dup = c["bad"] or 0, c["dup"] or 0
    if bad and not c["ids"]:
        raise SourceSchemaError(f"{path}: none of its {bad:,} lines has the expected fields "
                                f"{fields} with whole-number ids {ids}")
    if bad or dup:
        log.warning("%s: %d lines left out (wrong field count or an id %s that is not a whole number), "
                    "%d lines for ids already listed (the smallest line of each id kept); the lines are in "
                    "%s", path, bad, ids, dup, S.T_COMPANIONS_REJECTED)
    rejected = ranked.where(F.col(S.REASON).isNotNull()).select(
        F.lit(path).alias("file"), F.col("_line").alias("line"), S.REASON)
    return ranked.where(F.col(S.REASON).isNull()).select(*fields), rejected


def _ml1m_movies(spark: SparkSession, path: str) -> Tuple[DataFrame, DataFrame]:
    """movies.dat -> (movie_id, title, genres array), one row per movie, and the lines left out.
    Latin-1, ``::``-separated."""
    df = read_csv_lines(spark, path, ["movie_id", "title", "genres"], "::", header=False, encoding="ISO-8859-1")
    movies, rejected = _companion_rows(df, path, ["movie_id"], ["title", "genres"], "::")
    return movies.select("movie_id", "title", F.split("genres", r"\|").alias("genres")), rejected


def items_from_movies(spark: SparkSession, movies: DataFrame) -> DataFrame:
    """Items with one primary genre each: the item's **rarest** genre across the catalogue.

    ML-1M lists genres alphabetically, so "first genre" would make Action/Adventure/Animation
    swallow most films; the rarest genre is the most specific one (Toy Story -> Animation, not
    Comedy). Ties go to the earlier genre in ML-1M's list. Only ML-1M's 18 genres are categories: a
    genre outside them (a custom ``movies.dat``'s "IMAX") is left out of the choice, counted and logged,
    and a film with none of the 18 has no category. Input needs ``item_id, title, genres``, one row per
    item (the readers make it so: a repeated item would be a repeated ``items`` row).
    """
    genre_ids = spark.createDataFrame([(g, i + 1) for i, g in enumerate(ML1M_GENRES)], "genre string, gid long")
    exploded = movies.select(S.ITEM_ID, F.explode("genres").alias("genre"))
    unknown = (exploded.join(F.broadcast(genre_ids), "genre", "left_anti").groupBy("genre").count()
               .orderBy(F.desc("count"), "genre").limit(10).collect())
    if unknown:
        log.warning("genres that are not ML-1M's 18 left out of the films' categories (film count): %s",
                    ", ".join(f"{r['genre']!r} ({r['count']:,})" for r in unknown))
    known = exploded.join(F.broadcast(genre_ids), "genre")
    freq = known.groupBy("genre").count()
    ranked = (known.join(freq, "genre")
              .groupBy(S.ITEM_ID)
              .agg(F.min(F.struct("count", "gid", "genre")).alias("p")))
    return (movies.join(ranked, S.ITEM_ID, "left")
            .select(F.col(S.ITEM_ID).cast(LongType()),
                    F.col("p.gid").alias(S.CATEGORY_ID),
                    F.col("p.genre").alias(S.CATEGORY_NAME),
                    F.col("title").alias(S.TITLE),
                    F.create_map(F.lit("genres"), F.array_join("genres", "|")).alias(S.FEATURES)))


def _ml1m_users(spark: SparkSession, path: str) -> Tuple[DataFrame, DataFrame]:
    """users.dat -> (orig_user_id, features map), one row per user, and the lines left out."""
    cols = ["user_id", "gender", "age", "occupation", "zip"]
    df = read_csv_lines(spark, path, cols, "::", header=False, encoding="ISO-8859-1")
    users, rejected = _companion_rows(df, path, cols[:1], cols[1:], "::")
    return users.select(F.col("user_id").alias("orig_user_id"),
                        F.create_map(*[x for c in cols[1:] for x in (F.lit(c), F.col(c))]).alias(S.FEATURES)), rejected


def _with_item_categories(actions: DataFrame, items: DataFrame) -> DataFrame:
    cats = items.select(F.col(S.ITEM_ID).cast("string").alias("_iid"), F.col(S.CATEGORY_ID).cast("string").alias("_cid"))
    return (actions.join(cats, actions[S.ITEM_ID] == cats["_iid"], "left")
            .withColumn(S.CATEGORY_ID, F.coalesce(S.CATEGORY_ID, "_cid")).drop("_iid", "_cid")
            .select(*RAW_COLUMNS))


def read_ml1m(spark: SparkSession, cfg: IngestConfig) -> RawSource:
    """Original MovieLens-1M: ``path`` is the folder with ratings.dat, movies.dat, users.dat."""
    ratings, movies_path, users_path = _ml1m_files(cfg)
    df = read_csv_lines(spark, ratings, ["user_id", "item_id", "rating", "ts"], "::", header=False,
                        encoding="ISO-8859-1")
    actions = df.select("user_id", "item_id", "ts", F.col("rating").alias(S.BEHAVIOR),
                        F.lit(None).cast("string").alias(S.CATEGORY_ID), F.col(_CORRUPT).alias(S.RAW_RECORD))
    movies, rejected = _ml1m_movies(spark, movies_path)
    items = items_from_movies(spark, movies.withColumnRenamed("movie_id", S.ITEM_ID))
    users = None
    if _companion_present(users_path, "ingest.ml1m_users" if cfg.ml1m_users else None):
        users, bad_users = _ml1m_users(spark, users_path)
        users, rejected = users.withColumnRenamed("orig_user_id", S.USER_ID), rejected.unionByName(bad_users)
    else:
        log.warning("no %s: MovieLens users get no features (gender, age, occupation)", users_path)
    return RawSource(_with_item_categories(actions, items), items=items, users=users,
                     behaviors=cfg.behaviors, ts_unit="s", rejected=rejected)


def read_sasrec(spark: SparkSession, cfg: IngestConfig) -> RawSource:
    """SASRec text: line n = user n's items in time order, space separated.

    Item ids are kept exactly as in the file; user id = 1-based line number; ts = 0-based position
    in the line (the format has no clock). Categories come from ``sas_to_original_items.txt`` +
    ``movies.dat`` next to the file (or ``ingest.sasrec_item_map`` / ``ingest.sasrec_movies``).
    """
    files = spark.read.text(cfg.path).inputFiles()  # a path with nothing there fails here, as PATH_NOT_FOUND (read_source names it)
    if len(files) > 1:  # the line numbers, the user ids, would follow the file system's listing order
        raise InvalidInput(f"ingest.path={cfg.path}: {len(files)} files (e.g. {sorted(files)[:2]}); the sasrec "
                           "format's user ids are line numbers of one file: concatenate them in their order")
    lines = spark.sparkContext.textFile(cfg.path).zipWithIndex()  # order-preserving, distributed
    df = spark.createDataFrame(lines, "line string, idx long")  # a schema of its own: an empty file has no row to infer from
    df = df.select((F.col("idx") + 1).cast("string").alias(S.USER_ID),
                   F.posexplode(F.split(F.trim("line"), r"\s+")).alias("pos", S.ITEM_ID))
    actions = df.where(F.col(S.ITEM_ID) != "").select(
        S.USER_ID, S.ITEM_ID, F.col("pos").cast("string").alias(S.TS),
        F.lit(None).cast("string").alias(S.BEHAVIOR), F.lit(None).cast("string").alias(S.CATEGORY_ID),
        F.lit(None).cast("string").alias(S.RAW_RECORD))
    item_map, movies_path, user_map, users_path = _sasrec_companions(cfg)
    items = users = None
    rejected = []  # the companions' lines left out
    # (both checked, so that a key naming a file that is not there is an error, not a warning)
    has_map = _companion_present(item_map, "ingest.sasrec_item_map" if cfg.sasrec_item_map else None)
    if _companion_present(movies_path, "ingest.sasrec_movies" if cfg.sasrec_movies else None) and has_map:
        imap, bad_map = _id_map(spark, item_map, "sas_id", "movie_id")
        movies, bad_movies = _ml1m_movies(spark, movies_path)
        rejected += [bad_map, bad_movies]
        joined = imap.join(movies, "movie_id", "left").select(F.col("sas_id").alias(S.ITEM_ID), "title", "genres")
        items = items_from_movies(spark, joined)
        actions = _with_item_categories(actions, items)
    else:
        log.warning("no %s / %s: SASRec items get no categories", item_map, movies_path)
    has_users = _companion_present(users_path, "ingest.ml1m_users" if cfg.ml1m_users else None)
    if _companion_present(user_map) and has_users:  # the user id map has no key: always beside the file
        umap, bad_map = _id_map(spark, user_map, S.USER_ID, "orig_user_id")
        features, bad_users = _ml1m_users(spark, users_path)
        users = umap.join(features, "orig_user_id", "left").select(S.USER_ID, S.FEATURES)
        rejected += [bad_map, bad_users]
    else:
        log.warning("no %s / %s: SASRec users get no features", user_map, users_path)
    return RawSource(actions, items=items, users=users, behaviors=cfg.behaviors, ts_unit="s",
                     rejected=reduce(DataFrame.unionByName, rejected) if rejected else None)


def _ml1m_files(cfg: IngestConfig) -> List[str]:
    """ratings.dat, movies.dat and users.dat (or ``ingest.ml1m_users``) of the ``ml1m`` folder."""
    return [os.path.join(cfg.path, "ratings.dat"), os.path.join(cfg.path, "movies.dat"),
            cfg.ml1m_users or os.path.join(cfg.path, "users.dat")]


def _companion_present(path: str, key: Optional[str] = None) -> bool:
    """Whether a companion file is there to read. ``key``: the config key that named it, if one did;
    then it must be there (a misspelt path was a warning for SASRec and nothing at all for ml1m's
    users, and the genres or the user features went without a word).
    A URI (``s3://``, ``dbfs:/``, ``file:/``) is taken as there: Spark reads it, and a missing one fails
    that read, naming it."""
    if is_uri(path) or path.startswith("file:") or os.path.exists(path):
        return True
    if key is not None:
        raise MissingInput(f"{key}={path!r}: nothing there (leave the key out to read the file beside "
                           "ingest.path, when there is one)")
    return False


def _sasrec_companions(cfg: IngestConfig) -> List[str]:
    """The files ``sasrec`` reads beside its text file (or from their ``ingest.*`` keys): item id map,
    movies.dat, user id map, users.dat."""
    folder = os.path.dirname(cfg.path)
    return [cfg.sasrec_item_map or os.path.join(folder, "sas_to_original_items.txt"),
            cfg.sasrec_movies or os.path.join(folder, "movies.dat"),
            os.path.join(folder, "sas_to_original_users.txt"), cfg.ml1m_users or os.path.join(folder, "users.dat")]


def source_files(cfg: IngestConfig) -> List[str]:
    """The paths ingest reads for ``cfg``: ``ingest.path`` and, for ml1m / sasrec, the companion
    files its reader reads (the same functions list them for both), whether present or not (a
    companion that appears later changes the input)."""
    if cfg.format == "ml1m":
        return _ml1m_files(cfg)
    if cfg.format == "sasrec":
        return [cfg.path, *_sasrec_companions(cfg)]
    return [cfg.path]


def _id_map(spark: SparkSession, path: str, left: str, right: str) -> Tuple[DataFrame, DataFrame]:
    """A SASRec id map (``left right`` per line) -> one ``right`` per ``left``, and the lines left out
    (see :func:`_companion_rows`)."""
    df = read_csv_lines(spark, path, [left, right], " ", header=False)
    return _companion_rows(df, path, [left, right], [], " ")


def read_source(spark: SparkSession, cfg: IngestConfig, default_path: str, delta_mode: str = "auto") -> RawSource:
    """Dispatch on ``cfg.format``; ``default_path`` is used for delta/parquet when ``cfg.path`` is unset."""
    # No os.path check: Spark resolves globs, file:/ and scheme-less paths against the cluster's own
    # default file system (HDFS, DBFS); it says when nothing is there, and so does delta-rs.
    try:
        return _read_source(spark, cfg, default_path, delta_mode)
    except (AnalysisException, io.TableNotFoundError) as e:
        if not cfg.path or (isinstance(e, AnalysisException) and "PATH_NOT_FOUND" not in str(e)):
            raise  # the generated default table's error names its producing job
        raise MissingInput(f"ingest.path={cfg.path!r}: nothing there (ingest.format={cfg.format}): "
                           f"{str(e).splitlines()[0]}") from e


@contextlib.contextmanager
def source_read_errors(cfg: IngestConfig):
    """Around the first actions over a source: a CSV file whose header differs from the first file's
    (the columns in another order, say), which Spark finds only as it reads that file, as a
    :class:`SourceSchemaError` naming the file and both headers instead of a JVM trace."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised as it is unless it is that failure
        text = str(e)
        if cfg.format != "csv" or "CSV header does not conform to the schema" not in text:
            raise
        found = {k: re.search(rf"^\s*{k}:\s*(.*)$", text, re.M) for k in ("Header", "Schema", "CSV file")}
        got = {k: m[1].strip() for k, m in found.items() if m}
        raise SourceSchemaError(
            f"{got.get('CSV file', cfg.path)}: its header ({got.get('Header', '?')}) is not the header the source "
            f"was read with ({got.get('Schema', '?')}, the first file's): every CSV file under ingest.path needs "
            "the same columns in the same order") from None


def _read_source(spark: SparkSession, cfg: IngestConfig, default_path: str, delta_mode: str) -> RawSource:
    if cfg.format in ("delta", "parquet"):
        return read_table_source(spark, cfg, cfg.path or default_path, cfg.format, delta_mode)
    if not cfg.path:
        raise SourceSchemaError(f"ingest.path is required for ingest.format={cfg.format!r}")
    readers = {"csv": read_csv, "taobao": read_taobao, "ml1m": read_ml1m, "sasrec": read_sasrec}
    return readers[cfg.format](spark, cfg)

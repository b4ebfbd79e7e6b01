"""Delta table I/O: the only module that knows how tables are stored.

Two ways to the same real Delta tables:

* **native** — ``format("delta")`` when the Delta jars are on the JVM classpath (Databricks, or a
  cluster started with ``--packages io.delta:delta-spark_2.13:...``).
* **delta-rs** — no jars needed. Spark writes Parquet into a fresh directory inside the table and
  the driver commits those files in one Delta transaction with delta-rs (``deltalake``). Reads ask
  delta-rs for the files of a version and hand them to ``spark.read.parquet``. A failed or killed
  write commits nothing: readers never see its files (``vacuum(full=True)`` removes them later).

Both are readable by delta-rs, Spark with Delta, and each other. Callers use :func:`read_table`,
:func:`write_table` and :func:`table_version` with a path, a mode, an optional partition
predicate (``replace_where={"model": "natm"}``) and an optional version.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import functools
import json
import logging
import math
import os
import re
import random
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, create_table_with_add_actions
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import StringType, StructField, StructType, TimestampType

from ml import schemas as S
from ml.config import ConfigError
from ml.data.delta_files import PARTITION_PREFIX, check_readable, data_files, table_root
from ml.errors import InvalidInput, MissingInput

log = logging.getLogger(__name__)
COMMIT_ATTEMPTS = 10  # a delta-rs commit that lost a race with another job's is made again (same files) on the new version
WRITE_ID_KEY = "spark_i2i.write_id"  # in each delta-rs commit's info: the data folder it committed
PROCESS_KEY = "spark_i2i.process"  # in each commit's info (native: its userMetadata): the writing process
PROCESS_ID = uuid.uuid4().hex  # this process's, so that a job can tell its own commits from another's
RUN_KEY = "spark_i2i.run"  # in each commit's info made inside job_run: that run of the job
PARTITION_KEY = "spark_i2i.replace_where"  # in each commit's info: the partition values it replaced ({}: all)
_RUN: contextvars.ContextVar = contextvars.ContextVar("spark_i2i_run", default=None)

WRITE_MODES = ("append", "overwrite")
WRITE_TIME = "%Y%m%dT%H%M%S"  # UTC start of a delta-rs write, in its data folder's name (data-<time>-<id>)
_JITTER = random.Random()  # the waits between commit attempts, apart from the seeded random state


class TableNotFoundError(MissingInput):
    """No Delta table at the given path (or not at the requested version)."""


class ConcurrentWriteError(InvalidInput):
    """Another job committed to the table after the version this write's data was read from."""


class SchemaMismatchError(InvalidInput):
    """The DataFrame's columns do not match the table's."""


def table_uri(path: str) -> str:
    """Absolute local path or the URI unchanged (s3://, abfss://, dbfs:/, file:/...)."""
    return table_root(path)


_DELTA_JARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # SparkContext -> bool


def has_delta_jars(spark: SparkSession) -> bool:
    """True when ``format("delta")`` works in this session (Delta classes on the JVM classpath).
    Looked up once per SparkContext: its classpath is set when it starts, and each miss is a
    ClassNotFoundException across Py4J (~35 ms; every read and write asks)."""
    try:
        jvm = spark._jvm  # None / missing under Spark Connect, where Delta is the platform's own
    except Exception:  # noqa: BLE001 - pyspark raises various errors under Connect
        return True
    if jvm is None:
        return True
    sc = spark.sparkContext
    if sc not in _DELTA_JARS:
        _DELTA_JARS[sc] = _delta_classes_found(jvm)
    return _DELTA_JARS[sc]


def _delta_classes_found(jvm) -> bool:
    # --packages / --jars / spark.jars add to Spark's context class loader, not the system one that
    # a plain Class.forName searches from a Py4J thread
    try:
        loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
        if loader is None:  # no context loader: the system one
            jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        else:  # searches its parents (the system loader) too
            jvm.java.lang.Class.forName("io.delta.tables.DeltaTable", False, loader)
        return True
    except Exception:  # noqa: BLE001 - Py4JJavaError: ClassNotFoundException
        return False


def delta_package() -> str:
    """The Delta jars' Maven coordinate for this Spark: the version of the delta-spark wheel pip chose
    beside this pyspark (as ``delta.configure_spark_with_delta_pip`` does; Delta 4.0.x is for Spark 4.0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"io.delta:delta-spark_2.13:{version('delta-spark')}"
    except PackageNotFoundError:
        return "io.delta:delta-spark_2.13:<the Delta release for your Spark>"


def use_native(spark: SparkSession, delta_mode: str = "auto") -> bool:
    if delta_mode == "native":
        if not has_delta_jars(spark):
            raise ConfigError("io.delta_mode=native but this Spark session has no Delta classes (io.delta.tables."
                              f"DeltaTable); start it with the Delta jars (--packages {delta_package()} "
                              "and the Delta SQL extension, see README) or use io.delta_mode=auto")
        return True
    if delta_mode == "delta-rs":
        return False
    return has_delta_jars(spark)


def table_exists(path: str) -> bool:
    if "://" not in path and os.path.isfile(path):  # a local file is never a table (delta-rs errors on it)
        return False
    return DeltaTable.is_deltatable(table_uri(path))


# Commits that change neither the data nor its files: Delta's and delta-rs's VACUUM write a START and
# an END commit (commit info only) around the files they delete.
MAINTENANCE_OPERATIONS = frozenset({"VACUUM START", "VACUUM END"})
_HISTORY_SCAN = 100  # commits looked through for the latest one that wrote data


DATA_VERSION_KEY = "spark_i2i.data_version"  # in a vacuum's commits: the data version it found


def _commit_keys(info: dict) -> dict:
    """This project's keys of a commit: delta-rs commits carry them as keys of the commit info, native
    ones as a JSON object in its userMetadata."""
    keys = {k: v for k, v in info.items() if k.startswith("spark_i2i.")}
    try:
        extra = json.loads(info.get("userMetadata") or "{}")
    except (TypeError, ValueError):
        extra = None
    if isinstance(extra, dict):
        keys.update({k: v for k, v in extra.items() if k.startswith("spark_i2i.")})
    return keys


def _latest_data_commit(path: str, partition: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """``{"version", PROCESS_KEY, RUN_KEY}`` (the writer and its job run, None when unknown) of the
    table's newest commit that is not maintenance (:data:`MAINTENANCE_OPERATIONS`). A vacuum by
    :func:`vacuum_table` records the data version and its writer in its own commits, so they are
    known after the log entry of that write has expired (the log keeps 30 days): a table whose data
    is older than that, vacuumed every night, is still the same table. ``partition``: the newest
    commit that may have written it (a partition replace of other values skipped; no vacuum record)."""
    recorded = None
    for info in DeltaTable(table_uri(path)).history(_HISTORY_SCAN):  # newest first
        keys = _commit_keys(info)
        if info.get("operation") not in MAINTENANCE_OPERATIONS:
            if partition:
                touched = _may_touch(keys, partition)
                if touched is None:
                    return None  # a commit that does not say what it wrote (before the key, another writer's)
                if not touched:
                    continue
            # the newest data commit still in the log is the truth, also over what a later vacuum
            # recorded: a write can commit between a vacuum's reading of the data version and its commits
            return {"version": info.get("version"), PROCESS_KEY: keys.get(PROCESS_KEY), RUN_KEY: keys.get(RUN_KEY)}
        if recorded is None and DATA_VERSION_KEY in keys:
            recorded = {"version": int(keys[DATA_VERSION_KEY]), PROCESS_KEY: keys.get(PROCESS_KEY) or None,
                        RUN_KEY: keys.get(RUN_KEY) or None}
    return None if partition else recorded  # the log holds no data commit any more (expired): the newest vacuum's record


def _may_touch(keys: dict, partition: Mapping[str, str]) -> Optional[bool]:
    """Whether a commit with these keys may have written ``partition``: a replace of other values did
    not, a write of the whole table may have; None where the commit does not say (a commit made
    before :data:`PARTITION_KEY`, or another writer's)."""
    try:
        replaced = json.loads(keys[PARTITION_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    return all(c not in replaced or str(v) in replaced[c] for c, v in partition.items())


def data_version(path: str) -> int:
    """The version of the table's newest commit that wrote data. A vacuum adds versions but leaves
    every row and file of the current version as it was: the pipeline's stage state reads this, so a
    stage is not rerun because its output was vacuumed."""
    _require_table(path)
    info = _latest_data_commit(path)
    return int(info["version"]) if info and info.get("version") is not None else table_version(path)


def last_writer(path: str) -> Optional[str]:
    """The process (:data:`PROCESS_ID`) that made the table's latest data commit (vacuums skipped);
    None when its commit info does not say (a writer other than this project's, or one from before
    the key)."""
    info = _latest_data_commit(path)
    return None if info is None else info.get(PROCESS_KEY)


def job_run(fn: Callable) -> Callable:
    """Decorate a job's ``run``: every commit it makes carries one id of this call (:data:`RUN_KEY`),
    which :func:`written_by_two_runs` compares. A call inside another's (a pipeline stage) is a run of its own."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        token = _RUN.set(uuid.uuid4().hex)
        try:
            return fn(*args, **kwargs)
        finally:
            _RUN.reset(token)

    return run


def _commit_info(write_id: str, replace_where: Optional[Mapping[str, object]]) -> dict:
    """This project's keys of a write's commit: its write id, process, job run (inside :func:`job_run`)
    and the partition values it replaced (none: the whole table, or an append)."""
    info = {WRITE_ID_KEY: write_id, PROCESS_KEY: PROCESS_ID}
    run = _RUN.get()
    if run is not None:
        info[RUN_KEY] = run
    info[PARTITION_KEY] = json.dumps({c: [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
                                      for c, v in (replace_where or {}).items()}, sort_keys=True)  # {}: every partition
    return info


def written_by_two_runs(path_a: str, path_b: str, partition: Optional[Mapping[str, str]] = None) -> bool:
    """Whether the latest data commits of two tables that one job commits one after the other were
    made by two runs of it (the job killed between its commits, and rerun only in part).
    ``partition`` (``{"model": "dat"}``): the latest commits that wrote that partition of each.
    Compares the commits' job runs (:func:`job_run`); where neither has one (both written before the
    key), their processes. False when either table is absent, one commit was made outside a job (a
    table written by hand) or names no writer (another writer's), the partition's latest commit does
    not say what it wrote or is not among the latest 100, or delta-rs cannot read the logs from here
    (a URI whose credentials only Spark or the executors have)."""
    try:
        if not (table_exists(path_a) and table_exists(path_b)):
            return False
        a, b = _latest_data_commit(path_a, partition), _latest_data_commit(path_b, partition)
    except Exception:  # noqa: BLE001 - the check is lost, not the job
        return False
    if not a or not b:
        return False
    if a.get(RUN_KEY) or b.get(RUN_KEY):  # one without a run: written outside a job (by hand), not checked
        return bool(a.get(RUN_KEY)) and bool(b.get(RUN_KEY)) and a[RUN_KEY] != b[RUN_KEY]
    return bool(a.get(PROCESS_KEY)) and bool(b.get(PROCESS_KEY)) and a[PROCESS_KEY] != b[PROCESS_KEY]


def table_version(path: str) -> int:
    """Latest committed version of the table at ``path``."""
    _require_table(path)
    return DeltaTable(table_uri(path)).version()


def vacuum_table(spark: Optional[SparkSession], path: str, retention_hours: float, delta_mode: str = "auto",
                 dry_run: bool = False) -> int:
    """Delta VACUUM: delete the data files no version newer than ``retention_hours`` ago reads, and
    the files of writes that never committed (a killed job's) once they are that old. Returns how
    many files it deleted (``dry_run``: would delete). Readers pinned to a version older than that
    lose it. A write in progress is told from a killed one by the age of its files only: the
    retention must exceed the longest write (``io.retention_hours`` is at least 24).

    delta-rs (``full=True``, which also finds the uncommitted files; then a log checkpoint, the
    removal of log entries past the table's log retention, 30 days by default, and of the emptied
    write folders), or Delta's own ``VACUUM ... RETAIN n HOURS`` on the native path. Both add two
    commits (VACUUM START / END) that change no data; they record the data version and its writer
    (:data:`DATA_VERSION_KEY`), which :func:`data_version` and :func:`last_writer` report.
    """
    uri = table_uri(path)
    native = spark is not None and use_native(spark, delta_mode)
    if not native:
        _require_table(path)
    try:  # what the vacuum's commits record; a native table delta-rs cannot read records nothing
        info = _latest_data_commit(path) or {}
    except Exception:  # noqa: BLE001 - delta-rs cannot open it (a dbfs: path, a table feature)
        info = {}
    keys = {DATA_VERSION_KEY: str(info["version"])} if info.get("version") is not None else {}
    for key in (PROCESS_KEY, RUN_KEY):
        if info.get(key):
            keys[key] = info[key]
    if native:
        confs = {"spark.databricks.delta.retentionDurationCheck.enabled": "false",  # else a week at least
                 "spark.databricks.delta.commitInfo.userMetadata": json.dumps(keys)}
        before = {k: spark.conf.get(k, None) for k in confs}
        vacuum = f"VACUUM delta.`{uri}` RETAIN {float(retention_hours)} HOURS"
        try:
            for k, v in confs.items():
                spark.conf.set(k, v)
            n = spark.sql(vacuum + " DRY RUN").count()  # the real run does not say how many
            if not dry_run and n:
                spark.sql(vacuum).collect()
        finally:
            for k, v in before.items():
                if v is None:
                    spark.conf.unset(k)
                else:
                    spark.conf.set(k, v)
        return n
    table = DeltaTable(uri)
    removed = table.vacuum(retention_hours=int(math.ceil(retention_hours)), dry_run=dry_run,
                           enforce_retention_duration=False, full=True,
                           commit_properties=CommitProperties(custom_metadata=keys))
    if not dry_run:
        table = DeltaTable(uri)
        table.create_checkpoint()
        table.cleanup_metadata()
        if "://" not in uri:
            _remove_empty_write_dirs(uri, retention_hours)
    return len(removed)


def _remove_empty_write_dirs(root: str, retention_hours: float) -> None:
    """The folders of this project's writes (``data-<UTC time>-<id>``, :func:`_write_delta_rs`) begun
    more than ``retention_hours`` ago that a vacuum emptied: a nightly run would leave one per table
    each night. Only empty folders go (``rmdir`` refuses any other)."""
    cutoff = time.time() - retention_hours * 3600
    for name in os.listdir(root):
        m = re.fullmatch(r"data-(\d{8}T\d{6})-[0-9a-f]+", name)
        if not m or dt.datetime.strptime(m[1], WRITE_TIME).replace(tzinfo=dt.timezone.utc).timestamp() > cutoff:
            continue
        for folder, _, _ in sorted(os.walk(os.path.join(root, name)), key=lambda w: -len(w[0])):
            try:
                os.rmdir(folder)
            except OSError:  # not empty: data the table still reads
                pass


def _require_table(path: str) -> None:
    if not table_exists(path):
        raise TableNotFoundError(f"no Delta table at {table_uri(path)} (has its producing job run?)")


def _delta_table(path: str, version: Optional[int]) -> DeltaTable:
    _require_table(path)
    uri = table_uri(path)
    try:
        return DeltaTable(uri, version=version) if version is not None else DeltaTable(uri)
    except Exception as e:  # noqa: BLE001 - delta-rs raises DeltaError/TableNotFoundError per case
        raise TableNotFoundError(f"Delta table {uri} has no readable version {version}: {e}") from e


def _spark_schema(dt: DeltaTable) -> StructType:
    return from_arrow_schema(pa.schema(dt.schema().to_arrow()), prefer_timestamp_ntz=False)


def read_table(spark: SparkSession, path: str, version: Optional[int] = None,
               delta_mode: str = "auto", partitions: Optional[Mapping[str, Sequence[str]]] = None) -> DataFrame:
    """Read the latest (or a given) version of the Delta table at ``path``.

    ``partitions``: {string partition column: values}, e.g. ``{"model": ["natm"]}``: only the rows
    (and the files) of those partitions. Without the Delta jars the partition values are joined on
    after the read, so a ``where`` on them would still read every file; this reads only the matching
    ones. Other columns (a date partition, say): filter with ``where``.
    """
    uri = table_uri(path)
    wanted = {c: {str(v) for v in vs} for c, vs in (partitions or {}).items()}
    if use_native(spark, delta_mode):
        _require_table(path) if "://" not in uri else None
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        df = reader.load(uri)
        if wanted:
            detail = spark.sql(f"DESCRIBE DETAIL delta.`{uri}`").first()
            _check_partition_filter(uri, wanted, list(detail["partitionColumns"]), df.schema)
        for c, vs in wanted.items():
            df = df.where(F.col(c).isin(sorted(vs)))  # Delta prunes the files by the filter
        return df
    dt = _delta_table(path, version)
    check_readable(dt, uri)
    schema = _spark_schema(dt)
    partition_cols = list(dt.metadata().partition_columns)
    _check_partition_filter(uri, wanted, partition_cols, schema)
    data_schema = StructType([f for f in schema.fields if f.name not in partition_cols])
    files = [(f, values) for f, values in data_files(dt, uri)
             if all(values[c] is not None and values[c] in vs for c, vs in wanted.items())]
    if not files:
        return spark.createDataFrame([], schema)
    df = spark.read.schema(data_schema).parquet(*[f for f, _ in files])
    read = df.inputFiles()
    if len(read) != len(files):
        # Spark takes ? * [ { in a path as a glob and skips files named _x or .x: rows would be read
        # from files outside the table, or missing, without a word
        raise RuntimeError(f"Spark lists {len(read)} files for the {len(files)} data files of {uri}'s log "
                           "(a path with glob characters, or hidden file names?): read it with delta-rs or the "
                           "Delta jars")
    if partition_cols:
        df = _attach_partition_values(spark, df, files, schema, partition_cols)
    return df.select(*[f.name for f in schema.fields])


def partitions_with_rows(spark: SparkSession, path: str, column: str, values: Sequence[str],
                         version: Optional[int] = None, delta_mode: str = "auto") -> set:
    """Which of ``values`` of the string partition ``column`` hold at least one row at ``version``.
    Without the Delta jars, from the log alone (each add action's row count; no Spark job), a value
    whose files carry no count by reading one row of it; with the jars, by reading one row of each."""
    values = list(dict.fromkeys(str(v) for v in values))

    def has_rows(v: str) -> bool:
        return read_table(spark, path, version, delta_mode, partitions={column: [v]}).limit(1).count() > 0

    if use_native(spark, delta_mode):
        return {v for v in values if has_rows(v)}
    dt, uri = _delta_table(path, version), table_uri(path)
    check_readable(dt, uri)
    _check_partition_filter(uri, {column: set(values)}, list(dt.metadata().partition_columns), _spark_schema(dt))
    adds = pa.table(dt.get_add_actions(flatten=True))
    keep = [c for c in ("num_records", PARTITION_PREFIX + column) if c in adds.column_names]
    adds = adds.select(keep).to_pydict()  # not every file's stats: 10^5 files are 10^5 rows of them
    counted, uncounted = set(), set()
    values_of = adds.get(PARTITION_PREFIX + column) or []
    counts = adds.get("num_records") or [None] * len(values_of)
    for v, n in zip(values_of, counts):
        if v is None or str(v) not in values:
            continue
        if n is None:  # a file written without statistics
            uncounted.add(str(v))
        elif n > 0:
            counted.add(str(v))
    return counted | {v for v in uncounted - counted if has_rows(v)}


def _check_partition_filter(uri: str, wanted: Mapping[str, set], partition_cols: Sequence[str],
                            schema: StructType) -> None:
    # a table of the user's (an i2i_topk written by another tool, say) that is not partitioned as the
    # contract says: an InvalidInput, one line from the command line, not a traceback
    if set(wanted) - set(partition_cols):
        raise InvalidInput(f"{uri}: {sorted(set(wanted) - set(partition_cols))} are not partition columns "
                           f"({list(partition_cols)})")
    typed = sorted(c for c in wanted if not isinstance(schema[c].dataType, StringType))
    if typed:  # the log's values of other types are typed, with their own spellings: compare with where()
        raise InvalidInput(f"{uri}: partitions= takes string partition columns; {typed} are not (filter them "
                           "with where())")


def _attach_partition_values(spark: SparkSession, df: DataFrame, files: Sequence, schema: StructType,
                             partition_cols: Sequence[str]) -> DataFrame:
    """Join each row's file with its partition values from the Delta log (one small broadcast).

    Files are matched on the driver by their full path with the scheme and percent-encoding removed
    (Spark names a file by its percent-encoded URI; the log's side is the decoded path, see
    :func:`ml.data.delta_files.data_files`), so any layout works, not only Hive-style
    ``col=value`` directories; every file Spark reads must match one, or the read refuses. Rows
    are then joined on Spark's own name of their file, with no per-row decoding (decoding every
    row's path took 5.3 s of a 4M-row read that now takes 0.8 s).
    """
    by_file = {_normalise_path(f): values for f, values in files}
    rows, unmatched = [], []
    for spark_file in df.inputFiles():  # Spark's own (percent-encoded) names of the files it reads
        values = by_file.get(_normalise_path(unquote(spark_file)))
        if values is None:
            unmatched.append(spark_file)
            continue
        for key in _spark_names(spark_file):
            rows.append([key] + [values[c] for c in partition_cols])
    if unmatched:
        raise RuntimeError(f"{len(unmatched)} data files match no add action of the Delta log, "
                           f"e.g. {unmatched[0]} (log paths e.g. {next(iter(by_file))})")
    # joined on the name Spark gives each row's file, as is: no decoding per row. One row's name is
    # checked first (a file system spelling names otherwise would make the join drop every row);
    # if it is not a key, each row's name is decoded as the driver's were.
    seen = df.select(F.col("_metadata.file_path")).limit(1).collect()
    if seen and seen[0][0] not in {r[0] for r in rows}:
        rows = [[k] + [v[c] for c in partition_cols] for k, v in by_file.items()]
        log.info("partition join on decoded paths (Spark names files e.g. %s)", seen[0][0])
        spark_path = F.url_decode(F.replace(F.col("_metadata.file_path"), F.lit("+"), F.lit("%2B")))
        df = df.withColumn("_file", F.regexp_replace(spark_path, _SCHEME_RE, ""))
    else:
        df = df.withColumn("_file", F.col("_metadata.file_path"))
    for i, c in enumerate(partition_cols):
        if isinstance(schema[c].dataType, TimestampType):  # an instant, whatever the session's zone
            for r in rows:
                r[i + 1] = None if r[i + 1] is None else _utc_instant(r[i + 1])
    names = ["_file"] + [f"_p{i}" for i in range(len(partition_cols))]
    # typed: a partition column null in every file left nothing to infer a type from
    parts = spark.createDataFrame(rows, StructType([StructField(n, StringType()) for n in names]))
    for i, c in enumerate(partition_cols):
        parts = parts.withColumn(c, F.col(f"_p{i}").cast(schema[c].dataType)).drop(f"_p{i}")
    return df.join(F.broadcast(parts), "_file").drop("_file")


_SCHEME_RE = r"^([a-zA-Z][a-zA-Z0-9+.-]*:)?/*"


def _spark_names(input_file: str) -> list:
    """The spellings ``_metadata.file_path`` may give a file ``inputFiles()`` names: a local file is
    "file:/..." in one and "file:///..." in the other."""
    return list(dict.fromkeys([input_file, re.sub(r"^file:/+", "file:/", input_file)]))


def _normalise_path(p: str) -> str:
    """A decoded path or URI without its scheme and leading slashes (the join key of both sides)."""
    return re.sub(_SCHEME_RE, "", p)


def _check_schema(df_schema: StructType, table: StructType, path: str) -> None:
    have = {f.name: f.dataType for f in df_schema.fields}
    want = {f.name: f.dataType for f in table.fields}
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    wrong = [f"{c}: table has {want[c].simpleString()}, data has {have[c].simpleString()}"
             for c in want if c in have and have[c].simpleString() != want[c].simpleString()]
    if missing or extra or wrong:
        raise SchemaMismatchError(
            f"schema mismatch writing {path}: missing columns {missing}, extra columns {extra}, "
            f"type differences {wrong}")


def write_table(spark: SparkSession, df: DataFrame, path: str, mode: str = "overwrite",
                partition_by: Optional[Sequence[str]] = None,
                replace_where: Optional[Mapping[str, object]] = None,
                delta_mode: str = "auto", overwrite_schema: bool = False, base_version: Optional[int] = None,
                refuse_empty: Optional[Callable[[], BaseException]] = None) -> int:
    """Write ``df`` as a new version of the Delta table at ``path``; return that version.

    mode: ``append`` or ``overwrite``. ``replace_where`` (overwrite only) replaces just the rows of
    the given partition values (a list: any of them) (every column in it must be a partition column), leaving the rest
    of the table untouched. The first write creates the table. The schema must match an existing
    table's unless ``overwrite_schema`` (full overwrite only). A write that lost a race with another
    job's commit is made again on the new version, unless ``base_version`` (the version ``df`` was
    read from) is given: then any commit after it fails the write with :class:`ConcurrentWriteError`.
    ``refuse_empty``: when ``df`` has no rows, the error it returns is raised and the table keeps the
    rows it had (a stage that found nothing to write must not replace yesterday's output with nothing).
    Without the Delta jars nothing is committed; with them (Spark commits as it writes) the commit is
    undone by one more version (see :func:`_undo_native`).
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {list(WRITE_MODES)}")
    partition_by = list(partition_by or [])
    if replace_where:
        if mode != "overwrite":
            raise ValueError("replace_where needs mode='overwrite'")
        not_part = [c for c in replace_where if c not in partition_by]
        if not_part:
            raise ValueError(f"replace_where columns {not_part} are not partition columns {partition_by}")
        df = df.filter(_predicate_column(replace_where))
    uri = table_uri(path)
    exists = table_exists(path)
    dt = DeltaTable(uri) if exists else None
    native = use_native(spark, delta_mode)
    if dt is not None:
        _check_target(dt, df.schema, uri, mode, partition_by, replace_where, overwrite_schema, native)
    if replace_where and not native and any(
            v is None or (isinstance(v, (list, tuple)) and None in v) for v in replace_where.values()):
        raise ValueError(f"replace_where={dict(replace_where)!r}: a null partition value needs the Delta jars "
                         "(io.delta_mode=native); delta-rs commits take no null partition filter")
    if base_version is not None and (dt is None or dt.version() != base_version):
        raise ConcurrentWriteError(f"{uri}: at version {dt.version() if dt else None}, this write read version "
                                   f"{base_version}; not written, so another job's rows are not replaced by a "
                                   "stale copy: run it again")
    if native:
        # Delta checks conflicts from the version its own transaction starts at: a commit between the
        # check above and that start goes unseen (a moment; the delta-rs path has no such gap)
        before = dt.version() if dt is not None else None
        version = _write_native(spark, df, uri, mode, partition_by, replace_where, overwrite_schema)
        if refuse_empty is not None:
            written = read_table(spark, path, version=version, delta_mode=delta_mode)
            if replace_where:
                written = written.filter(_predicate_column(replace_where))
            if not written.limit(1).count():
                _undo_native(spark, path, uri, version, before, mode, partition_by, replace_where, overwrite_schema,
                             delta_mode, refuse_empty())
        return version
    return _write_delta_rs(df, uri, mode, partition_by, replace_where, exists, overwrite_schema, base_version,
                           refuse_empty)


def _undo_native(spark: SparkSession, path: str, uri: str, version: int, before: Optional[int], mode: str,
                 partition_by: list, replace_where: Optional[Mapping[str, object]], overwrite_schema: bool,
                 delta_mode: str, error: BaseException) -> None:
    """Raise ``error`` after putting back what the empty commit ``version`` replaced: a RESTORE to
    ``before`` when no other job has committed since (metadata only: the same files again), else a
    write of ``before``'s replaced rows. A write that created the table leaves it, empty."""
    if before is None:
        raise error
    try:
        if DeltaTable(uri).version() == version:
            spark.sql(f"RESTORE TABLE delta.`{uri}` TO VERSION AS OF {before}").collect()
        else:  # another job's commit since: restoring the table would undo it too
            old = read_table(spark, path, version=before, delta_mode=delta_mode)
            if replace_where:
                old = old.filter(_predicate_column(replace_where))
            token = _RUN.set(None)  # the previous rows, not this run's
            try:
                _write_native(spark, old, uri, mode, partition_by, replace_where, overwrite_schema)
            finally:
                _RUN.reset(token)
    except Exception as e:  # noqa: BLE001 - the refusal is the error to see; the failed undo is its cause
        raise error from e
    raise error


def _check_target(dt: DeltaTable, schema: StructType, uri: str, mode: str, partition_by: list,
                  replace_where: Optional[Mapping[str, object]], overwrite_schema: bool, native: bool) -> None:
    """Refuse a write the table at ``dt``'s version cannot take: other columns (unless a full
    overwrite with ``overwrite_schema``), other partition columns, rules a delta-rs commit would not
    enforce."""
    if not (overwrite_schema and mode == "overwrite" and not replace_where):
        _check_schema(schema, _spark_schema(dt), uri)
    existing_parts = list(dt.metadata().partition_columns)
    if existing_parts != partition_by:  # also with overwrite_schema: delta-rs keeps the old partitioning
        raise SchemaMismatchError(
            f"table {uri} is partitioned by {existing_parts}, the write asks for {partition_by}; "
            "partitioning cannot change in place: write a new table")
    if not native:
        _check_enforceable(dt, uri)


def _check_enforceable(dt: DeltaTable, uri: str) -> None:
    """Refuse a delta-rs commit into a table whose rules it would not enforce: the files are written
    by Spark as plain Parquet, so CHECK constraints and generated columns would be bypassed."""
    conf = dt.metadata().configuration
    constraints = sorted(k for k in conf if k.startswith("delta.constraints."))
    generated = [f.name for f in dt.schema().fields if "delta.generationExpression" in (f.metadata or {})]
    if constraints or generated:
        what = (f"CHECK constraints {constraints}" if constraints else "") + (
            f"{' and ' if constraints else ''}generated columns {generated}" if generated else "")
        raise InvalidInput(f"Delta table {uri} has {what}, which a write without the Delta jars would not "
                           "enforce: write it with the Delta jars (io.delta_mode=native)")


def replace_model_partition(spark: SparkSession, df: DataFrame, path: str, model: str,
                            delta_mode: str = "auto",
                            refuse_empty: Optional[Callable[[], BaseException]] = None) -> tuple[int, int]:
    """Replace the ``model = <model>`` partition of a table partitioned by ``model`` (one commit;
    other models' rows untouched). Returns (the new version, the model's rows in it). ``refuse_empty``:
    as :func:`write_table`'s (no rows: its error, and the model keeps its previous rows)."""
    version = write_table(spark, df, path, mode="overwrite", partition_by=[S.MODEL], replace_where={S.MODEL: model},
                          delta_mode=delta_mode, refuse_empty=refuse_empty)
    rows = read_table(spark, path, version=version, delta_mode=delta_mode, partitions={S.MODEL: [model]}).count()
    return version, rows


def _predicate_column(replace_where: Mapping[str, object]):
    cond = None
    for c, v in replace_where.items():
        if isinstance(v, (list, tuple)):
            term = F.col(c).isin(list(v))
        else:
            term = F.col(c).isNull() if v is None else (F.col(c) == F.lit(v))
        cond = term if cond is None else cond & term
    return cond


def _sql_term(c: str, v: object) -> str:
    if isinstance(v, (list, tuple)):
        return f"`{c}` IN ({', '.join(_sql_literal(x) for x in v)})"
    return f"`{c}` IS NULL" if v is None else f"`{c}` = {_sql_literal(v)}"


def _rs_filter(c: str, v: object) -> tuple:
    if isinstance(v, (list, tuple)):
        return (c, "in", [str(x) for x in v])
    return (c, "=", None if v is None else str(v))


def _write_native(spark, df, uri, mode, partition_by, replace_where, overwrite_schema) -> int:
    # the commit carries a write id, by which its version is found afterwards, as on the delta-rs path
    meta = json.dumps(_commit_info(uuid.uuid4().hex, replace_where))
    writer = df.write.format("delta").mode(mode).option("userMetadata", meta)
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if replace_where:
        sql = " AND ".join(_sql_term(c, v) for c, v in replace_where.items())
        writer = writer.option("replaceWhere", sql)
    if overwrite_schema:
        writer = writer.option("overwriteSchema", "true")
    writer.save(uri)
    from delta.tables import DeltaTable as SparkDeltaTable  # only importable with the jars present

    recent = SparkDeltaTable.forPath(spark, uri).history(COMMIT_ATTEMPTS + 20).select("version", "userMetadata")
    return own_version([(r[0], r[1]) for r in recent.collect()], meta)  # at most COMMIT_ATTEMPTS + 20 rows


def own_version(history: Sequence[Tuple[int, Optional[str]]], user_metadata: str) -> int:
    """The version of the commit whose userMetadata is ``user_metadata`` among the table's latest
    ``(version, userMetadata)`` rows: another job (a second model replacing its own partition of a
    shared table) may have committed after this one, so the latest version need not be this write's.
    The latest, should the commit be older than the rows read."""
    return int(next((v for v, m in history if m == user_metadata), max(v for v, _ in history)))


def _sql_literal(v: object) -> str:
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


def _lost_race(e: Exception) -> bool:
    """A delta-rs 1.6 commit with its retries off that failed because another commit took its version
    (with retries off delta-rs runs no conflict check, so this is the only race error it gives)."""
    return isinstance(e, CommitFailedError) and bool(re.fullmatch(r"Failed to commit transaction: \d+", str(e).strip()))


def _write_delta_rs(df: DataFrame, uri: str, mode: str, partition_by: list,
                    replace_where: Optional[Mapping[str, object]], exists: bool,
                    overwrite_schema: bool, base_version: Optional[int] = None,
                    refuse_empty: Optional[Callable[[], BaseException]] = None) -> int:
    """Stage ``df``'s files with Spark, then commit them with delta-rs (see :func:`write_table`)."""
    write_id = f"data-{time.strftime(WRITE_TIME, time.gmtime())}-{uuid.uuid4().hex[:12]}"
    staging = f"{uri}/{write_id}"
    writer = df.write.mode("error")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    try:
        writer.parquet(staging)
        adds = _add_actions(uri, write_id, partition_by, _timestamp_zones(df, partition_by))
        if refuse_empty is not None and not sum(json.loads(a.stats)["numRecords"] for a in adds):
            raise refuse_empty()  # before the commit: the table keeps its rows
    except BaseException:
        _remove_dir(staging)  # best effort; uncommitted files are invisible to readers anyway
        raise
    arrow_schema = to_arrow_schema(df.schema, timezone="UTC")
    # The commit carries its write id, this process and its job run. delta-rs's own retries are off: a commit
    # it retried after another job's moved onto the newer version without checking what that job
    # wrote, so two first writes of one table, or of one new partition, both kept their rows (a
    # doubled table). Here a lost race fails, and the loop below writes again on a fresh snapshot,
    # which replaces what the other job committed where the write replaces anything.
    props = CommitProperties(custom_metadata=_commit_info(write_id, replace_where), max_commit_retries=0)
    version = None
    if not exists:
        from deltalake import Schema

        try:
            create_table_with_add_actions(uri, Schema.from_arrow(arrow_schema), adds, mode="error",
                                          partition_by=partition_by or None, commit_properties=props)
            version = 0
        except Exception as e:  # noqa: BLE001 - delta-rs raises a plain error for an existing table
            if "table already exists" not in str(e) and not _lost_race(e):
                raise
            # another job created it since this one looked (two models' first runs at once): commit
            # into it as into any existing table
            log.warning("%s was created by another job meanwhile; committing into it", uri)
    if version is None:
        filters = [_rs_filter(c, v) for c, v in replace_where.items()] if replace_where else None
        for attempt in range(COMMIT_ATTEMPTS):
            # the snapshot the commit is made on: the latest, or the one the data was read from; checked
            # again, as the table may be another job's since write_table looked (created by it, or
            # its schema overwritten)
            dt = DeltaTable(uri) if base_version is None else DeltaTable(uri, version=base_version)
            _check_target(dt, df.schema, uri, mode, partition_by, replace_where, overwrite_schema, native=False)
            try:
                dt.create_write_transaction(adds, mode=mode, schema=arrow_schema, partition_by=partition_by or None,
                                            partition_filters=filters, commit_properties=props)
                version = dt.version() + 1  # without retries, a commit is the snapshot's next version
                break
            except CommitFailedError as e:
                if not _lost_race(e):
                    raise  # not a conflict with another commit (an append-only table, say): no retry
                if base_version is not None:
                    raise ConcurrentWriteError(
                        f"{uri}: another job committed version {base_version + 1} after this write read version "
                        f"{base_version}; not written, so that job's rows are not replaced by a stale copy: "
                        "run it again") from e
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise ConcurrentWriteError(f"{uri}: every one of {COMMIT_ATTEMPTS} commits lost a race with "
                                               "another job's commit; not written: run it again") from e
                log.warning("commit to %s met another job's commit; writing again on the new version", uri)
                time.sleep(min(0.2 * 2 ** attempt, 5.0) * (1 + _JITTER.random()))
    log.info("committed %d files to %s as version %d (%s)", len(adds), uri, version, mode)
    return version


def _filesystem(uri: str):
    if "://" not in uri:  # a local path, which may hold characters a URI would need escaped
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def _remove_dir(uri: str) -> None:
    try:
        fs, root = _filesystem(uri)
        fs.delete_dir(root)
    except Exception:  # noqa: BLE001 - cleanup of invisible files must not mask the real error
        log.warning("could not remove uncommitted files under %s", uri)


def _timestamp_zones(df: DataFrame, partition_by: list) -> dict:
    """{partition column: the session's time zone} for the TIMESTAMP partition columns of ``df``:
    Spark names their directories by the wall-clock time in ``spark.sql.session.timeZone``."""
    cols = [c for c in partition_by if isinstance(df.schema[c].dataType, TimestampType)]
    if not cols:
        return {}
    name = df.sparkSession.conf.get("spark.sql.session.timeZone")
    try:  # Spark's own reading of the name: its short ids (PST, IST, ...) are Java's, not Python's
        jvm = df.sparkSession.sparkContext._jvm
        name = str(jvm.java.time.ZoneId.of(name, jvm.java.time.ZoneId.SHORT_IDS).getId())
    except Exception:  # noqa: BLE001 - no JVM gateway (Spark Connect): the name as given
        pass
    zone = session_zone(name)
    return {c: zone for c in cols}


_OFFSET_RE = re.compile(r"^(?:UTC|GMT|UT)?([+-])(\d{1,2})(?::?(\d{2}))?(?::?(\d{2}))?$")


def session_zone(name: str) -> dt.tzinfo:
    """A ``spark.sql.session.timeZone`` value (a region id or an offset) as a Python time zone."""
    if name in ("Z", "UTC", "GMT", "UT"):
        return dt.timezone.utc
    m = _OFFSET_RE.match(name)
    if m:
        sign, h, mi, sec = m.group(1), int(m.group(2)), int(m.group(3) or 0), int(m.group(4) or 0)
        off = dt.timedelta(hours=h, minutes=mi, seconds=sec)
        return dt.timezone(-off if sign == "-" else off)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError(f"spark.sql.session.timeZone={name!r}: not a time zone Python knows, so the "
                          "TIMESTAMP partition values cannot be written as UTC; use a region id "
                          "(Europe/Berlin) or an offset (+01:00)") from e


def _utc_instant(value) -> str:
    """A TIMESTAMP partition value from the log (delta-rs gives an instant; a string without an
    offset is UTC, as delta-rs reads it) as ISO 8601 in UTC, which Spark's cast reads as the same
    instant in any session zone (a zone-less string would be read in the session's zone)."""
    t = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    t = t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_partition_value(wall_clock: str, zone: dt.tzinfo, column: str) -> str:
    """A TIMESTAMP partition value Spark wrote as wall-clock time in ``zone`` -> the Delta log's
    unambiguous form, ISO 8601 in UTC (``2020-01-01T12:00:00.000000Z``), which delta-rs and Delta
    Spark read as the same instant whatever their session's zone (a zone-less value is read as UTC
    by delta-rs and in the session zone by Spark). A wall-clock time that the zone's clock shows
    twice (the hour a daylight-saving change repeats) names no single instant: refused."""
    local = dt.datetime.fromisoformat(wall_clock)
    if local.tzinfo is None:
        first, second = local.replace(tzinfo=zone, fold=0), local.replace(tzinfo=zone, fold=1)
        if first.utcoffset() != second.utcoffset():
            raise InvalidInput(f"partition column {column!r} has the value {wall_clock}, a time the session zone "
                               f"{zone} shows twice (a daylight-saving change), so its directory names no single "
                               "instant: partition by a date or a UTC string column, or set "
                               "spark.sql.session.timeZone=UTC")
        local = first
    return _utc_instant(local)


def _add_actions(table: str, write_id: str, partition_by: list, zones: dict) -> list:
    fs, root = _filesystem(f"{table}/{write_id}")
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        stats = list(pool.map(lambda i: _file_stats(fs, i.path), infos))
    adds = []
    for info, st in zip(infos, stats):
        rel = write_id + "/" + os.path.relpath(info.path, root).replace(os.sep, "/")
        # The stored name itself: delta-rs percent-encodes it into the log's URI on commit.
        adds.append(AddAction(path=rel, size=info.size,
                              partition_values=_partition_values(rel, partition_by, zones),
                              modification_time=int(info.mtime.timestamp() * 1000), data_change=True,
                              stats=st))
    return adds


def _partition_values(rel_path: str, partition_by: list, zones: dict) -> dict:
    """{column: the log's string} from Spark's ``col=value`` directories (TIMESTAMP columns, whose
    directories are wall-clock times in ``zones[col]``, as UTC ISO 8601)."""
    values = {}
    for seg in rel_path.split("/")[:-1]:
        if "=" in seg:
            k, v = seg.split("=", 1)
            if k in partition_by:
                v = unquote(v)
                v = None if v == "__HIVE_DEFAULT_PARTITION__" else v
                values[k] = _utc_partition_value(v, zones[k], k) if v is not None and k in zones else v
    missing = [c for c in partition_by if c not in values]
    if missing:
        raise RuntimeError(f"file {rel_path} has no directory for partition columns {missing}")
    return values


def _stat_value(t: pa.DataType, v: object) -> object:
    """A Parquet footer min/max as Delta's stats JSON writes it; None for a type it is not kept for."""
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return None if isinstance(v, float) and v != v else v  # NaN: no usable bound
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return v if isinstance(v, str) else None
    if pa.types.is_date32(t):
        return v.isoformat() if hasattr(v, "isoformat") else None
    return None


def _file_stats(fs, path: str) -> str:
    """Delta ``stats`` JSON from the Parquet footer: numRecords, nullCount, and min/max of numbers,
    strings and dates, exact (from every row group).

    min/max are written for every top-level column or for none: delta-rs prunes a file whose stats
    have min/max (even an empty set) without the filtered column, so a filter on a string or a
    timestamp column returned no rows from tables whose numbers alone had bounds. A column without
    bounds (a timestamp, which Spark writes as INT96 with no footer statistics, a boolean, a
    decimal, one that is all null or holds NaN) leaves the file with numRecords and nullCount.
    """
    md = pq.ParquetFile(fs.open_input_file(path)).metadata
    schema = md.schema.to_arrow_schema()
    stats: dict = {"numRecords": md.num_rows, "nullCount": {}}
    lows, highs, bounded = {}, {}, True
    for ci in range(md.num_columns):
        col = md.row_group(0).column(ci) if md.num_row_groups else None
        if col is None or "." in col.path_in_schema:
            continue  # nested leaves (arrays, maps): no stats; no reader filters on them
        name = col.path_in_schema
        t = schema.field(name).type
        nulls, lo, hi, ok = 0, None, None, True
        for rg in range(md.num_row_groups):
            s = md.row_group(rg).column(ci).statistics
            if s is None:
                ok = False
                break
            nulls += s.null_count or 0
            a, b = (_stat_value(t, s.min), _stat_value(t, s.max)) if s.has_min_max else (None, None)
            if a is None or b is None:
                bounded = False
                continue
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
        if not ok:
            bounded = False
            continue
        stats["nullCount"][name] = nulls
        if lo is None:
            bounded = False
        else:
            lows[name], highs[name] = lo, hi
    if bounded and lows:
        stats["minValues"], stats["maxValues"] = lows, highs
    return json.dumps(stats)

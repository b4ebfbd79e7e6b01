"""The one place that builds (or reuses) the SparkSession."""
from __future__ import annotations

import atexit
import functools
import glob
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid

from pyspark.sql import SparkSession

from ml.config import SparkConfig

log = logging.getLogger(__name__)


def get_spark(cfg: SparkConfig | None = None) -> SparkSession:
    """Return the active session (cluster, notebook) or build one from ``cfg``.

    Under spark-submit the submitter's master and ``--conf`` values win; ``cfg`` fills in the rest.
    Local sessions: UTC, console progress bar off, Arrow on, shuffle partitions from config.
    An active session is reused untouched, its log level too (``spark.log_level`` is not applied): its
    owner configured it.
    """
    cfg = cfg or SparkConfig()
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Under spark-submit the JVM already runs with the submitter's master and --conf values: keep
    # them (the cluster's, e.g. spark.sql.shuffle.partitions) and only fill in what is unset.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    given = set()
    if submitted:
        from pyspark import SparkConf

        given = {k for k, _ in SparkConf().getAll()}
    else:
        # Executors (python workers) must run the same interpreter as the driver in local mode.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.app_name)
    if cfg.master and not submitted:
        builder = builder.master(cfg.master)
    for k, v in session_settings(cfg, submitted, given).items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    _quiet_loggers(spark, cfg.log_level)
    log.info("Spark %s session %s (master=%s)", spark.version, cfg.app_name, spark.sparkContext.master)
    return spark


def tasks_for(spark: SparkSession, rows: int, rows_per_task: int) -> int:
    """Tasks for work whose cost grows with the rows of an input small in bytes (item ids to embed,
    ids each given a list of k + 1 rows): one per ``rows_per_task`` (no floor at the cluster's cores:
    a small catalogue on a large cluster would be a thousand files and model loads). Given to
    ``repartition(n, ...)``, which adaptive execution does not coalesce: sized by bytes, 10^7 ids
    (80 MB) became one to three tasks where AQE coalesces to 64 MB
    (``coalescePartitions.parallelismFirst=false``) or a table was compacted to a few files."""
    return max(1, -(-rows // rows_per_task))


def session_settings(cfg: SparkConfig, submitted: bool, given: set) -> dict:
    """The settings a new session is built with: ``cfg``'s, less the keys the submitter set
    (``given``); under spark-submit (``submitted``) the UI and Spark's default shuffle partitions
    are the cluster's."""
    settings = {
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "false",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.skewJoin.enabled": "true",
        "spark.driver.memory": cfg.driver_memory,
        "spark.sql.parquet.compression.codec": "snappy",
        # INT96 (Spark's default) reads back through delta-rs as nanoseconds: years outside 1677-2262
        # overflow there; microseconds are what Delta readers expect
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Without Hadoop's native libs on a laptop, Spark logs a warning per job otherwise.
        "spark.hadoop.parquet.summary.metadata.level": "NONE",
    }
    if submitted:
        # on a cluster: the UI is the cluster's to decide, and the laptop default of 8 shuffle partitions
        # would put billions of rows through 8 tasks (Spark's own 200, which adaptive execution coalesces,
        # unless the config or the submitter sets a number)
        settings.pop("spark.ui.enabled")
        if cfg.shuffle_partitions == SparkConfig().shuffle_partitions:
            settings.pop("spark.sql.shuffle.partitions")
    else:
        # the driver's log4j setup from its first line: Spark's default profile at WARN (where pyspark
        # puts it anyway, with a notice; spark.log_level applies once the session is up), without the
        # notices about itself and the native Hadoop library a laptop lacks. Only where the JVM is
        # ours to start; spark.conf's own spark.driver.extraJavaOptions replaces it
        settings["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile={_log4j2_file()}"
    for k, v in cfg.conf.items():  # a null value unsets the key: Spark's own default, not ours (e.g. the
        if v is None:  # JVM's time zone, not UTC)
            settings.pop(k, None)
        else:
            settings[k] = str(v)
    return {k: v for k, v in settings.items() if k not in given}


_LOG4J2 = """# spark-i2i: a local session's driver logging (ml/data/session.py): Spark's default profile at WARN
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.native.name = org.apache.hadoop.util.NativeCodeLoader
logger.native.level = error
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
logger.jetty2.name = org.sparkproject.jetty.util.component.AbstractLifeCycle
logger.jetty2.level = error
logger.parquet.name = org.apache.parquet.CorruptStatistics
logger.parquet.level = error
"""


def _log4j2_file() -> str:
    """:data:`_LOG4J2` as a file under the temp dir (one per user, rewritten only when it differs)."""
    path = os.path.join(tempfile.gettempdir(), f"i2i-log4j2-{os.getuid()}.properties")
    try:
        with open(path) as f:
            if f.read() == _LOG4J2:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(_LOG4J2)
    os.replace(tmp, path)  # atomic: a JVM starting beside us reads a whole file
    return path


# Spark loggers that print a Java stack trace at WARN for a condition the jobs report in one line
# (FileStreamSink: every read of a path that does not exist, before PATH_NOT_FOUND is raised).
QUIET_LOGGERS = ("org.apache.spark.sql.execution.streaming.FileStreamSink",
                 "org.apache.spark.sql.execution.streaming.sinks.FileStreamSink")


# In local mode the tasks run in the driver's JVM, and a failed one is logged with its Java stack
# (~80 lines) by the executor and again by the scheduler before the job's own one-line error (a
# Parquet column of another type in one file, a CSV header in another order, pandas' nanosecond
# timestamps), and the other tasks, cancelled, warn for each temporary shuffle file. The failure
# reaches the driver whole (its trace under --log-level DEBUG), so these are off there unless
# spark.log_level asks for Spark's INFO or more; on a cluster they stay.
LOCAL_TASK_LOGGERS = ("org.apache.spark.executor.Executor", "org.apache.spark.scheduler.TaskSetManager",
                      "org.apache.spark.storage.DiskBlockObjectWriter")


def _quiet_loggers(spark: SparkSession, log_level: str = "WARN") -> None:
    try:
        jvm = spark.sparkContext._jvm
        level = jvm.org.apache.logging.log4j.Level
        configurator = jvm.org.apache.logging.log4j.core.config.Configurator
        for name in QUIET_LOGGERS:
            configurator.setLevel(name, level.ERROR)
        local = spark.sparkContext.master.startswith("local[") or spark.sparkContext.master == "local"
        if local and log_level.upper() in ("WARN", "ERROR", "FATAL", "OFF"):
            for name in LOCAL_TASK_LOGGERS:
                configurator.setLevel(name, level.OFF)
            _load_quietly(jvm, SKETCH_MEMORY_CLASS)
    except Exception as e:  # another logging backend: the trace stays, nothing else changes
        log.debug("could not quiet Spark's loggers: %s", e)


# Spark's shaded DataSketches (the HLL sketches of ingest's counts) prints "Warning: Java versions >
# Java 11 can only operate in restricted mode where no off-heap operations are allowed!" to stderr
# from this class's static initialiser, on every JVM newer than 11 and with no setting to turn it
# off; the sketches are on the heap and never need off-heap memory, so the line says nothing to act on.
SKETCH_MEMORY_CLASS = "org.apache.datasketches.memory.internal.ResourceImpl"


def _load_quietly(jvm, name: str) -> None:
    """Load (and initialise) JVM class ``name`` with the JVM's stderr swallowed: in a local session
    the driver's JVM is the executors', so it is not printed again. Any failure leaves stderr as it was."""
    system = jvm.java.lang.System
    err = system.err
    system.setErr(jvm.java.io.PrintStream(jvm.java.io.OutputStream.nullOutputStream()))
    try:
        jvm.java.lang.Class.forName(name)
    finally:
        system.setErr(err)


SHIP_PREFIX = "i2i-ship-"
STALE_SHIP_DIR_SECONDS = 3600


@functools.lru_cache(maxsize=1)
def _ship_dir() -> str:
    sweep_stale_ship_dirs()
    path = tempfile.mkdtemp(prefix=f"{SHIP_PREFIX}{_host()}-{os.getpid()}-")
    atexit.register(shutil.rmtree, path, True)
    return path


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def sweep_stale_ship_dirs(root: str | None = None, min_age_s: float = STALE_SHIP_DIR_SECONDS) -> list:
    """Remove ship directories left by drivers of this host that died without running atexit
    (SIGKILL, OOM kill): the directory names the driver's pid; one whose process is gone and that
    is older than ``min_age_s`` is removed. Returns the removed paths."""
    root = root or tempfile.gettempdir()
    prefix = f"{SHIP_PREFIX}{_host()}-"  # then <pid>-<mkdtemp's random part>
    removed = []
    for path in glob.glob(os.path.join(root, f"{prefix}*-*")):
        pid = os.path.basename(path)[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            if time.time() - os.path.getmtime(path) < min_age_s:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d ship directories of dead drivers under %s", len(removed), root)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def ship_path(name: str) -> str:
    """A fresh driver-side path for a file to hand to ``SparkContext.addFile`` (a model, an index).

    The name gets a unique tag (addFile keeps one file per name for the session's life). Every such
    file of the process lives in one temporary directory, removed when the driver exits: not
    before, since an executor that joins the session later fetches every added file. A driver
    killed before exit leaves its directory behind; the next driver on the host removes it
    (:func:`sweep_stale_ship_dirs`).
    """
    stem, ext = os.path.splitext(name)
    return os.path.join(_ship_dir(), f"{stem}-{uuid.uuid4().hex[:12]}{ext}")

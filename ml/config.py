"""Frozen run configuration: YAML files in ``conf/`` plus ``--set key.path=value`` overrides.

Every job takes one :class:`Config`. Sections are dataclasses validated in ``__post_init__``;
an unknown or invalid key raises :class:`ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ml.errors import InvalidInput


class ConfigError(InvalidInput):
    """A configuration key is unknown, missing or has a value outside its allowed set."""


def _check_choice(key: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; expected one of {list(allowed)}")


def _check_names(key: str, values: Optional[Sequence[Any]], what: str, allow_empty: bool = False) -> None:
    """A list of non-empty strings (None passes): ``[]`` meant "any" where a list of none was written,
    and a number was compared with a string column."""
    if values is None:
        return
    if not values and not allow_empty:
        raise ConfigError(f"{key}=[] lists nothing; expected a list of {what}")
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"{key}: {bad[0]!r} is not a name; expected a list of {what} (quote numbers in YAML)")


def _check_positive(key: str, value: Optional[float], allow_none: bool = False, allow_zero=False) -> None:
    if value is None and allow_none:
        return
    if value is None or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be a number {bound}")


@dataclass(frozen=True)
class SparkConfig:
    master: Optional[str] = "local[2]"  # ignored when a session is already active (cluster, notebook)
    app_name: str = "spark-i2i"
    driver_memory: str = "4g"  # local mode only: the driver is the executor
    shuffle_partitions: int = 8  # small for a laptop; set to ~2-3x total cores on a cluster
    log_level: str = "WARN"
    conf: Mapping[str, str] = field(default_factory=dict)  # extra spark.* settings passed verbatim

    def __post_init__(self) -> None:
        _check_positive("spark.shuffle_partitions", self.shuffle_partitions)
        _check_choice("spark.log_level", self.log_level, ["ALL", "DEBUG", "INFO", "WARN", "ERROR", "OFF"])
        # Spark's own check runs in the JVM it starts, and comes back as a JAVA_GATEWAY_EXITED traceback
        if self.master is not None and not re.fullmatch(r"local(\[(\*|\d+)(,\s*\d+)?\])?|local-cluster\[.+\]|yarn|"
                                                        r"(spark|k8s)://.+", self.master):
            raise ConfigError(f"spark.master={self.master!r} is not a Spark master URL; expected local, local[N], "
                              "local[*], yarn, spark://host:port or k8s://https://host:port")
        if "spark.sql.shuffle.partitions" in self.conf:
            raise ConfigError("spark.conf.spark.sql.shuffle.partitions: set spark.shuffle_partitions instead "
                              "(one key, not two that could disagree)")
        for conf_key, ours in (("spark.driver.memory", "spark.driver_memory"), ("spark.master", "spark.master"),
                               ("spark.app.name", "spark.app_name")):
            if conf_key in self.conf:  # spark.conf was applied last, so it won, past the checks of ours
                raise ConfigError(f"spark.conf.{conf_key}: set {ours} instead (one key, not two that could disagree)")
        # the local JVM gets -Xmx<value>, and refuses a bad one at its start (a JAVA_GATEWAY_EXITED
        # traceback without the key); a bare number is bytes there: too small a heap
        if not (isinstance(self.driver_memory, str) and re.fullmatch(r"\d+[kmgt]", self.driver_memory, re.IGNORECASE)):
            raise ConfigError(f"spark.driver_memory={self.driver_memory!r} is not a memory size; expected a whole "
                              "number with a unit k, m, g or t, e.g. 512m, 4g")


MIN_RETENTION_HOURS = 24
# what the stages write under the warehouse (ml.schemas' T_* and the samples job's tables), and its folders
_PIPELINE_TABLES = frozenset({
    "actions", "actions_rejected", "companions_rejected", "items", "users", "id_keys", "sequences", "eval_targets",
    "item_graph", "item_counts", "noise_q", "samples_natm", "samples_dat", "item_embeddings", "user_embeddings", "i2i_topk",
    "u2i_topk", "metrics", "metrics_paired", "models", "checkpoints", "report"})


@dataclass(frozen=True)
class IOConfig:
    # auto: native format("delta") when the Delta jars are on the classpath, else delta-rs commits
    delta_mode: str = "auto"
    # jobs.vacuum: data files no version of the last this-many hours reads are deleted (Delta's default: a week)
    retention_hours: float = 168.0

    def __post_init__(self) -> None:
        _check_choice("io.delta_mode", self.delta_mode, ["auto", "native", "delta-rs"])
        if not isinstance(self.retention_hours, (int, float)) or self.retention_hours < MIN_RETENTION_HOURS:
            raise ConfigError(f"io.retention_hours={self.retention_hours!r}: expected a number of hours >= "
                              f"{MIN_RETENTION_HOURS}. A vacuum also deletes the files of writes that have not "
                              "committed yet once they are that old, and readers lose the versions it passes")


@dataclass(frozen=True)
class GenerateConfig:
    """Synthetic action log with power-law users/items, skewed categories and planted sessions."""

    num_users: int = 20_000
    num_items: int = 5_000
    num_categories: int = 30
    actions_per_user: float = 50.0  # mean; the activity distribution is a power law around it
    activity_alpha: float = 1.5  # Pareto shape of user activity: smaller = heavier tail
    max_actions_per_user: int = 50_000  # cap for the heaviest users
    min_actions_per_user: int = 3
    cluster_size: int = 25  # items per planted cluster; a session walks forward through one cluster
    session_length: int = 8  # mean actions per session
    stay_prob: float = 0.8  # chance the next action continues the session's walk (else a popular item)
    popularity_exponent: float = 2.0  # skew of cluster / noise-item popularity (higher = more skewed)
    bad_row_fraction: float = 0.0  # share of deliberately broken rows (to exercise ingestion)
    duplicate_fraction: float = 0.0  # share of exact duplicate events
    # tasks that generate the log; null: one per GENERATE_ROWS_PER_TASK expected actions, at least 8
    # (8 tasks for 10^9 actions were 125M rows each; the rows are the same for any number)
    partitions: Optional[int] = None
    table: str = "raw_actions"  # table under the warehouse the generator writes

    def __post_init__(self) -> None:
        for key in ("num_users", "num_items", "num_categories", "actions_per_user", "cluster_size",
                    "session_length", "max_actions_per_user", "activity_alpha", "popularity_exponent"):
            _check_positive(f"generate.{key}", getattr(self, key))
        _check_positive("generate.partitions", self.partitions, allow_none=True)
        _check_positive("generate.min_actions_per_user", self.min_actions_per_user, allow_zero=True)
        for key in ("stay_prob", "bad_row_fraction", "duplicate_fraction"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"generate.{key}={v!r} must be in [0, 1]")
        if self.num_items < self.cluster_size:
            raise ConfigError("generate.num_items must be >= generate.cluster_size")
        if self.min_actions_per_user > self.max_actions_per_user:  # the cap won, silently
            raise ConfigError(f"generate.min_actions_per_user={self.min_actions_per_user} must be <= "
                              f"generate.max_actions_per_user={self.max_actions_per_user}")
        # the generator writes under the warehouse: a pipeline table's name would be overwritten by its stage
        # (in lower case: on a case-insensitive file system Items is items)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.table) or self.table.lower() in _PIPELINE_TABLES:
            raise ConfigError(f"generate.table={self.table!r} must be a table name (a letter, then letters, digits or _) under "
                              f"the warehouse, not one of the pipeline's own tables {sorted(_PIPELINE_TABLES)}")


    @property
    def num_partitions(self) -> int:
        """``partitions``, or one task per GENERATE_ROWS_PER_TASK expected actions (at least 8)."""
        if self.partitions is not None:
            return int(self.partitions)
        return max(8, math.ceil(self.num_users * self.actions_per_user / GENERATE_ROWS_PER_TASK))


GENERATE_ROWS_PER_TASK = 2_000_000

INPUT_FORMATS = ("csv", "parquet", "delta", "ml1m", "sasrec", "taobao")
# the formats whose columns, id types and ts unit are the source's own (the others fix them)
MAPPED_FORMATS = ("csv", "parquet", "delta")
MAX_TS_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
CANONICAL_FIELDS = ("user_id", "item_id", "ts", "behavior", "category_id")
# "name type" in ingest.csv_schema is a schema string's habit, not a column name
_SPARK_TYPE_NAMES = {"string", "long", "bigint", "int", "integer", "short", "smallint", "byte", "tinyint", "double",
                     "float", "real", "decimal", "numeric", "boolean", "bool", "timestamp", "timestamp_ntz", "date",
                     "binary", "varchar", "char"}
# numeric ts units and their parts of a second; "string" parses ingest.ts_format
TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000, "string": None}


@dataclass(frozen=True)
class IngestConfig:
    """Raw logs -> ``actions``. ``path`` is a file, a directory or a table, by ``format``."""

    format: str = "delta"
    path: Optional[str] = None  # None: the generator's table under the warehouse
    # canonical field -> source column (csv/parquet/delta). Unmapped optional fields become null.
    columns: Mapping[str, str] = field(default_factory=dict)
    csv_header: bool = True
    csv_sep: str = ","
    csv_schema: Optional[list] = None  # column names of a header-less CSV, in file order
    # the CSV's character set (UTF-8, UTF-16, UTF-32, ISO-8859-1, US-ASCII: what Spark 4 reads; see
    # formats.SPARK_CHARSETS); bytes it cannot decode read as U+FFFD, and a string id holding one is a bad id row
    csv_encoding: str = "UTF-8"
    allow_extra_columns: bool = False  # source columns not in the mapping: error unless True
    # ids that are strings (SKUs, UUIDs): user_id, item_id and category_id are hashed to BIGINT (Spark's xxhash64 of
    # the text stripped of white space at both ends: the same id for the same key on every run and
    # cluster), and each key is kept with its id in the table id_keys. csv, parquet and delta only
    string_ids: bool = False
    ts_unit: str = "s"  # numeric ts: s, ms, us or ns since epoch; "string" parses ts_format
    ts_format: str = "yyyy-MM-dd HH:mm:ss"
    behaviors: Optional[list] = None  # allowed behaviour values; None accepts any
    min_ts: Optional[int] = None  # seconds; rows outside [min_ts, max_ts] are rejected
    max_ts: Optional[int] = None
    # sasrec: companions for categories (ids map + movies.dat); resolved next to `path` if None
    sasrec_item_map: Optional[str] = None
    sasrec_movies: Optional[str] = None
    ml1m_users: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("ingest.format", self.format, INPUT_FORMATS)
        _check_choice("ingest.ts_unit", self.ts_unit, list(TS_UNITS))
        if self.format not in MAPPED_FORMATS:
            # the fixed formats read their own separator, encoding and ts unit: a value set here was
            # ignored, and a Taobao file in ms came out as every row bad_ts with no word of this key
            default = IngestConfig.__dataclass_fields__
            ignored = [k for k in ("ts_unit", "ts_format", "csv_header", "csv_sep", "csv_schema", "csv_encoding")
                       if getattr(self, k) != default[k].default]
            if ignored:
                k = ignored[0]
                which = "csv" if k.startswith("csv_") else "csv, parquet and delta"
                raise ConfigError(f"ingest.{k}={getattr(self, k)!r}: ingest.format={self.format!r} has a fixed layout "
                                  "(see README, Input formats: its own separator, character set and ts); "
                                  f"ingest.{k} is for {which} sources. A file in another layout: "
                                  "ingest.format=csv with ingest.columns")
        for name in self.csv_schema or ():
            words = name.split() if isinstance(name, str) else []
            if not words or (len(words) == 2 and words[1].lower().split("(")[0] in _SPARK_TYPE_NAMES):
                raise ConfigError(f"ingest.csv_schema: {name!r} is not a column name; the key lists the names in "
                                  "file order, without types (every column is read as text and checked per row)")
        if self.csv_schema is not None:
            seen = [n.strip().lower() for n in self.csv_schema]  # Spark's column names are case-insensitive
            twice = sorted({n for n in self.csv_schema if seen.count(n.strip().lower()) > 1})
            if twice:  # Spark's COLUMN_ALREADY_EXISTS, as a traceback from the read
                raise ConfigError(f"ingest.csv_schema names {twice} more than once (names are case-insensitive)")
            if self.csv_header:  # the header's names were read and these ignored
                raise ConfigError("ingest.csv_schema names the columns of a header-less CSV; set "
                                  "ingest.csv_header=false with it (with a header line, its names are the columns)")
        _check_names("ingest.behaviors", self.behaviors, "behaviour values, or null for any")
        for k, v in self.columns.items():
            if k not in CANONICAL_FIELDS:  # the key is ours, the value the source's column
                raise ConfigError(f"ingest.columns.{k}={v!r}: {k!r} is not a field; expected one of "
                                  f"{list(CANONICAL_FIELDS)} (each mapped to a column of the source)")
            if not isinstance(v, str) or not v:
                quote = (" (quote it in YAML: YAML reads on/off/yes/no as booleans)" if isinstance(v, bool)
                         else " (an empty value is no value: give the column's name)" if v is None or v == ""
                         else " (quote it in YAML)")
                raise ConfigError(f"ingest.columns.{k}={v!r} must be a column name{quote}")
        if self.columns and self.format not in MAPPED_FORMATS:
            raise ConfigError(f"ingest.columns={dict(self.columns)!r}: ingest.format={self.format!r} has fixed "
                              "columns (see README, Input formats); ingest.columns is for csv, parquet and delta")
        if self.string_ids and self.format not in MAPPED_FORMATS:
            raise ConfigError(f"ingest.string_ids=true is for csv, parquet and delta sources; ingest.format="
                              f"{self.format!r} has integer ids")
        if self.format in ("csv", "parquet") and not self.path:
            raise ConfigError(f"ingest.path is required for ingest.format={self.format!r}")
        if not self.csv_encoding:  # one Spark cannot read CSV in is refused when the CSV is read (formats.py)
            raise ConfigError("ingest.csv_encoding must not be empty; e.g. UTF-8, ISO-8859-1")
        if not self.csv_sep:  # Spark's own error ("Delimiter cannot be empty") names no key, after Spark starts
            raise ConfigError(f"ingest.csv_sep={self.csv_sep!r} must not be empty; e.g. --set 'ingest.csv_sep=;' "
                              "(a tab: --set 'ingest.csv_sep=\\t')")
        for key, value in (("min_ts", self.min_ts), ("max_ts", self.max_ts)):
            # ts is stored in seconds whatever ingest.ts_unit reads: a window in ms or µs holds no row
            if value is not None and not -MAX_TS_SECONDS <= value <= MAX_TS_SECONDS:
                raise ConfigError(f"ingest.{key}={value} is not a time in seconds since the epoch (|{key}| <= "
                                  f"{MAX_TS_SECONDS}, the end of year 9999); the window is in seconds whatever "
                                  f"ingest.ts_unit reads, e.g. {value // 1000} for a value in milliseconds")
        if self.min_ts is not None and self.max_ts is not None and self.min_ts > self.max_ts:
            # every row would be rejected, and only after a full scan of the source
            raise ConfigError(f"ingest.min_ts={self.min_ts} must be <= ingest.max_ts={self.max_ts} (rows outside "
                              "[min_ts, max_ts] are rejected: this window holds none)")


@dataclass(frozen=True)
class SequencesConfig:
    """``actions`` -> per-user training ``sequences`` + leave-last-out ``eval_targets``."""

    min_length: int = 2  # users with fewer actions are excluded (and counted in the log)
    # keep the most recent items of each user's training part (counted in the log). A cap by default:
    # a bot or a shared anonymous id with 10^8 events would otherwise be one multi-GB row, and as many
    # NATM samples. None: no cap (every user's whole history is one row).
    max_length: Optional[int] = 10_000
    collapse_repeats: bool = False  # drop an item equal to the one right before it
    behaviors: Optional[list] = None  # keep only these behaviours (None: all)
    # 1: leave-last-out (the test protocol). 2: drop each user's last action entirely and hold out the
    # one before it - a validation split carved from training data, for choosing hyper-parameters.
    holdout: int = 1

    def __post_init__(self) -> None:
        if self.min_length < 2:
            raise ConfigError(f"sequences.min_length={self.min_length} must be >= 2 (trigger + target)")
        _check_positive("sequences.max_length", self.max_length, allow_none=True)
        _check_positive("sequences.holdout", self.holdout)
        _check_names("sequences.behaviors", self.behaviors, "behaviour values, or null for all")


@dataclass(frozen=True)
class GraphConfig:
    """``sequences`` -> ``item_graph``: weighted co-occurrence, top-N neighbours per item."""

    window: int = 3  # b is a neighbour of a when it follows a within this many positions
    decay: bool = False  # weight each co-occurrence by 1/distance instead of 1
    symmetric: bool = False  # also count a as a neighbour of b (undirected graph)
    min_count: int = 1  # drop edges seen fewer times than this (co-occurrence noise filter)
    # count each user once per edge, at its nearest distance: weight and min_count over users, not
    # occurrences (a user alternating between two items cannot make their edge alone)
    per_user: bool = False
    top_n: int = 9  # neighbours kept per item (NATM paper's best N = 9)
    max_user_length: Optional[int] = 5000  # longer sequences keep their most recent items (logged)

    def __post_init__(self) -> None:
        for k in ("window", "min_count", "top_n"):
            _check_positive(f"graph.{k}", getattr(self, k))
        _check_positive("graph.max_user_length", self.max_user_length, allow_none=True)


@dataclass(frozen=True)
class BaselineConfig:
    """Non-learned i2i producers: ``pop`` and ``cooc`` (graph neighbours + popularity fill-in)."""

    k: int = 100  # list length written to i2i_topk
    window: int = 3
    decay: bool = False
    symmetric: bool = True
    min_count: int = 1
    per_user: bool = False  # as graph.per_user
    # Faiss index of the topk job (learned models): auto = exact up to exact_max items, else IVF
    index: str = "auto"  # auto | flat | ivf
    exact_max: int = 200_000
    nlist: Optional[int] = None  # IVF lists (None: 4*sqrt(n))
    nprobe: int = 32  # IVF lists searched per query: raise it for embeddings that are not well clustered

    def __post_init__(self) -> None:
        for key in ("k", "window", "min_count", "exact_max", "nprobe"):
            _check_positive(f"baseline.{key}", getattr(self, key))
        _check_positive("baseline.nlist", self.nlist, allow_none=True)
        _check_choice("baseline.index", self.index, ["auto", "flat", "ivf"])


@dataclass(frozen=True)
class RecentConfig:
    """Multi-trigger recall: a user's list fused from the i2i lists of their last ``triggers`` items.

    Written to ``u2i_topk`` as model ``<model>_recent``. Item j steps back from the last one counts
    ``decay ** j``; a neighbour at rank r in its list adds ``decay ** j / (rrf_k + r)`` (reciprocal
    rank fusion, so any model's lists fuse, whatever its score scale).
    """

    triggers: int = 0  # recent items fused per user (0: the stage is off)
    decay: float = 0.7  # weight of the item j steps before the last one: decay ** j
    rrf_k: float = 10.0  # reciprocal-rank constant: a smaller value favours the heads of the lists
    k: int = 100  # list length written per user
    exclude: str = "triggers"  # never recommend: "triggers" (the fused items) or "history" (every item seen)

    def __post_init__(self) -> None:
        _check_positive("recent.triggers", self.triggers, allow_zero=True)
        _check_positive("recent.k", self.k)
        _check_positive("recent.rrf_k", self.rrf_k, allow_zero=True)
        if not (isinstance(self.decay, (int, float)) and 0 < self.decay <= 1):
            raise ConfigError(f"recent.decay={self.decay!r} must be in (0, 1]")
        _check_choice("recent.exclude", self.exclude, ["triggers", "history"])


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple = (1, 5, 10, 50, 100)  # Pre@K (= HitRate@K) cut-offs; MRR uses the whole list
    per_category: bool = True  # also break metrics down by the target item's category
    # baselines each evaluated model is compared with, user by user (table metrics_paired: the
    # difference, its 95 % interval, p-value, wins/losses); a baseline without lists is skipped, logged
    compare_to: tuple = ()

    def __post_init__(self) -> None:
        if not isinstance(self.compare_to, (list, tuple)) or not all(isinstance(m, str) and m for m in self.compare_to):
            raise ConfigError(f"eval.compare_to={self.compare_to!r} must be a list of model names, e.g. [cooc]")
        known = list(MODELS) + [f"{m}_recent" for m in MODELS]
        for m in self.compare_to:  # a misspelt name was a warning that no lists exist, and no comparison
            _check_choice("eval.compare_to", m, known)
        if not self.ks or any((not isinstance(k, int)) or isinstance(k, bool) or k <= 0 for k in self.ks):
            raise ConfigError(f"eval.ks={self.ks!r} must be a non-empty list of positive integers")
        if len(set(self.ks)) < len(self.ks):  # one metric row twice; the scoring's columns collided
            raise ConfigError(f"eval.ks={list(self.ks)} names a cut-off more than once")


@dataclass(frozen=True)
class SamplesConfig:
    """``sequences`` (+ ``items``, ``users``) -> ``samples_natm``, ``samples_dat``, ``noise_q``."""

    num_negatives: int = 9  # k negatives per NATM positive (paper's best ~9)
    noise: str = "unigram"  # q(.): "unigram" (count^alpha) or "uniform" over training items
    alpha: float = 0.75  # unigram exponent
    dat_negatives: int = 4  # S random negatives per DAT positive
    dat_max_positives_per_user: Optional[int] = 200  # most recent positives per user (caps power users)
    stratify: str = "proportional"  # category strategy for DAT positives: proportional | capped | balanced
    category_cap: float = 0.3  # capped: no category holds more than this share of positives (in expectation)
    # From the samples on, per-item (and for DAT per-user) arrays live whole in one process: the noise
    # table on the driver and in every executor, id tables in every training rank, vectors in the
    # top-K driver (README, "Memory at catalogue scale"). Above these the samples job stops with an
    # error before writing anything, instead of failing later on memory; raise them where it fits.
    max_items: Optional[int] = 10_000_000
    max_users: Optional[int] = 10_000_000  # DAT / two-tower: one id vector and one augmented vector per user

    def __post_init__(self) -> None:
        _check_positive("samples.max_items", self.max_items, allow_none=True)
        _check_positive("samples.max_users", self.max_users, allow_none=True)
        _check_positive("samples.num_negatives", self.num_negatives)
        _check_positive("samples.dat_negatives", self.dat_negatives)
        _check_choice("samples.noise", self.noise, ["unigram", "uniform"])
        _check_choice("samples.stratify", self.stratify, ["proportional", "capped", "balanced"])
        _check_positive("samples.alpha", self.alpha, allow_zero=True)
        _check_positive("samples.dat_max_positives_per_user", self.dat_max_positives_per_user, allow_none=True)
        if not 0 < self.category_cap <= 1:
            raise ConfigError(f"samples.category_cap={self.category_cap!r} must be in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """One training entry point for every model (jobs.train)."""

    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (per rank) if set
    batch_size: int = 256  # per rank
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to 0 over the run)
    warmup_steps: int = 0
    grad_clip: Optional[float] = 1.0  # max global grad norm; None disables
    checkpoint_every: int = 500  # steps; a checkpoint is also written at each epoch end
    # checkpoints go to <checkpoint_dir>/<model>; default: <warehouse>/checkpoints/<model> (a URI warehouse: see jobs/train.py)
    checkpoint_dir: Optional[str] = None
    launcher: str = "local"  # local (one process) | torchrun | distributor (pyspark TorchDistributor)
    num_processes: int = 1  # DDP world size for torchrun / distributor
    # distributor: true = the processes run on the driver (a laptop, a single-node cluster); false =
    # on the executors, in a barrier stage (GPU executors when the cluster schedules GPUs)
    distributor_local: bool = True
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    # mixed precision: auto = bf16 autocast on a GPU with native bf16 (compute capability 8.0+; an older
    # one trains in fp32, with a warning), fp32 on CPU; bf16 = bf16 autocast on CPU too (where
    # the CPU has native bf16: AVX512-BF16 or AMX; else fp32 with a warning); off = fp32 everywhere.
    # YAML true / false (or on / off) mean auto / off. The weights and optimizer stay fp32 either way.
    amp: Any = "auto"
    deterministic: bool = True  # torch's deterministic kernels: the same data and seed give the same model
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_buffer: int = 10_000  # rows held for shuffling by each reader worker
    log_every: int = 50  # steps between metric log lines
    mlflow: bool = False  # also log to MLflow when installed and configured

    def __post_init__(self) -> None:
        for k in ("epochs", "batch_size", "lr", "checkpoint_every", "num_processes", "log_every"):
            _check_positive(f"train.{k}", getattr(self, k))
        _check_positive("train.shuffle_buffer", self.shuffle_buffer, allow_zero=True)  # 0: the files' row order
        _check_positive("train.max_steps", self.max_steps, allow_none=True)
        _check_positive("train.grad_clip", self.grad_clip, allow_none=True)
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train.num_workers", self.num_workers, allow_zero=True)
        _check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_choice("train.optimizer", self.optimizer, ["adam", "adamw", "sgd"])
        _check_choice("train.lr_schedule", self.lr_schedule, ["constant", "cosine", "linear"])
        _check_choice("train.launcher", self.launcher, ["local", "torchrun", "distributor"])
        if self.launcher == "local" and self.num_processes > 1:
            # it would train in one process anyway, and a change of it reruns the pipeline's training
            raise ConfigError(f"train.num_processes={self.num_processes} is the world size of train.launcher="
                              "torchrun or distributor; train.launcher='local' trains in one process: set "
                              "train.launcher=distributor (or torchrun), or train.num_processes=1")
        _check_choice("train.device", self.device, ["auto", "cpu", "cuda"])
        if isinstance(self.amp, bool):  # YAML true/false, on/off
            object.__setattr__(self, "amp", "auto" if self.amp else "off")
        _check_choice("train.amp", self.amp, ["auto", "bf16", "off"])


@dataclass(frozen=True)
class NATMSection:
    """NATM hyper-parameters (see ml/models/natm.py); the item count comes from the data."""

    num_neighbors: int = 9  # N neighbours in the quasi-sequence (0 = no augmentation)
    dim: int = 64
    layers: int = 2  # 0 = MLP only (paper's ablation); paper's best is 4
    heads: int = 4
    ffn_mult: int = 2
    dropout: float = 0.1
    weight_buckets: int = 16
    gamma: float = 10.0  # NCE smoothing factor
    mlm_prob: float = 0.15
    mlm_weight: float = 0.1
    # sampled softmax with this many uniform negatives; None: full softmax up to full_softmax_max items,
    # 8,192 negatives beyond (the full softmax's logits are masked tokens x items)
    mlm_negatives: Optional[int] = None
    separate_encoders: bool = False  # trigger and candidate towers, each with its own id table (directed R)
    trigger_projection: bool = False  # learned D x D map on the trigger side: directed R without a second encoder
    item_bias: bool = False  # a per-item popularity term inside the unit vectors (dim + 1 wide; ml/models/natm.py)
    residual: bool = False  # layers 0: r = x_item + MLP(item, neighbours), not the MLP alone (ml/models/natm.py)
    neighbor_pointer: bool = False  # trigger vector + learned weights x its top-N neighbours' candidate vectors
    learn_nce_offset: bool = True  # learned NCE normaliser c in exp(gamma*R - c); False = paper's formula
    # nce (the paper's) | softmax (sampled softmax over the batch's candidates, logQ-corrected) |
    # full (exact softmax over every training item each step; up to full_softmax_max items)
    loss: str = "nce"
    full_softmax_max: int = 100_000
    negatives: Optional[int] = None  # train on the first n of each sample's negatives (None: all of samples.num_negatives)
    use_categories: bool = True  # add the item's category embedding to every token

    def __post_init__(self) -> None:
        _check_positive("natm.num_neighbors", self.num_neighbors, allow_zero=True)
        _check_positive("natm.layers", self.layers, allow_zero=True)
        _check_choice("natm.loss", self.loss, ["nce", "softmax", "full"])
        _check_positive("natm.full_softmax_max", self.full_softmax_max)
        _check_positive("natm.negatives", self.negatives, allow_none=True)
        _check_positive("natm.mlm_negatives", self.mlm_negatives, allow_none=True)
        for k in ("dim", "heads", "gamma", "ffn_mult"):
            _check_positive(f"natm.{k}", getattr(self, k))
        _check_positive("natm.mlm_weight", self.mlm_weight, allow_zero=True)
        if self.weight_buckets < 2:  # one bucket holds every count: the weight embedding would say nothing
            raise ConfigError(f"natm.weight_buckets={self.weight_buckets!r} must be >= 2 (log2 buckets of the "
                              "co-occurrence weight; one bucket would hold every weight)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"natm.dropout={self.dropout!r} must be in [0, 1)")
        # here, so that a bad combination fails when the config is read, not after ingest, graph and
        # samples have run; the model (ml.models.natm.NATMConfig) runs the same checks when it is built
        check_natm_combinations(self)
        if self.mlm_weight and self.mlm_prob and self.num_neighbors and not self.layers:
            # The MLP encoder's token states are its inputs: a masked slot's state is the mask token plus
            # its position and weight bucket, nothing from the other tokens to predict the item from.
            # (The model turns the term off there; a user who asked for it is told.)
            raise ConfigError(f"natm.mlm_weight={self.mlm_weight} needs a transformer to predict masked "
                              "neighbours from their context; natm.layers=0 (the MLP encoder) has none: set "
                              "natm.mlm_weight=0 or natm.layers >= 1")


def check_natm_combinations(s: Any) -> None:
    """The NATM settings that only work together, for :class:`NATMSection` and the model's own
    ``NATMConfig`` (any object with these attributes)."""
    if s.layers and s.dim % s.heads:
        raise ConfigError(f"natm.dim={s.dim} must be divisible by natm.heads={s.heads} (natm.layers > 0)")
    if not 0 <= s.mlm_prob < 1:
        raise ConfigError(f"natm.mlm_prob={s.mlm_prob} must be in [0, 1)")
    if s.separate_encoders and s.trigger_projection:
        raise ConfigError("natm.separate_encoders and natm.trigger_projection are alternatives "
                          "(two encoders, or one encoder plus a trigger-side map); set one of them")
    if s.residual and s.layers:
        raise ConfigError(f"natm.residual is for natm.layers=0 (the MLP encoder); natm.layers={s.layers} "
                          "already has the transformer's residual stream: set natm.residual=false")
    if s.neighbor_pointer and not s.num_neighbors:
        raise ConfigError("natm.neighbor_pointer points at the trigger's neighbours; natm.num_neighbors=0 has "
                          "none: set natm.neighbor_pointer=false")


@dataclass(frozen=True)
class DATSection:
    """DAT / two-tower hyper-parameters (see ml/models/dat.py); model=two_tower turns AMM and CAL off."""

    id_dim: int = 32
    feature_dim: int = 8
    hidden: tuple = (256, 128, 32)  # paper's FC 256-128-32
    user_fields: tuple = ("gender", "age", "occupation")  # keys of users.features used as features
    lambda_u: float = 0.5
    lambda_v: float = 0.5
    lambda_ca: float = 1.0
    use_amm: bool = True
    use_cal: bool = True
    cal_min_items: int = 4
    logit_scale: float = 10.0

    def __post_init__(self) -> None:
        for k in ("id_dim", "feature_dim", "logit_scale"):
            _check_positive(f"dat.{k}", getattr(self, k))
        for k in ("lambda_u", "lambda_v", "lambda_ca"):  # a negative weight would push apart what the term aligns
            _check_positive(f"dat.{k}", getattr(self, k), allow_zero=True)
        if self.cal_min_items < 2:  # one item has no covariance: it would count as a zero matrix
            raise ConfigError(f"dat.cal_min_items={self.cal_min_items!r} must be >= 2 (a category's items in a batch "
                              "needed for its covariance)")
        if not self.hidden or any(not isinstance(h, int) or isinstance(h, bool) or h <= 0 for h in self.hidden):
            raise ConfigError(f"dat.hidden={self.hidden!r} must be a non-empty list of positive sizes")
        _check_names("dat.user_fields", self.user_fields, "keys of the users table's features", allow_empty=True)


MODELS = ("pop", "cooc", "natm", "dat", "two_tower")


@dataclass(frozen=True)
class Config:
    warehouse: str = "warehouse"  # directory (or URI) under which every table lives
    seed: int = 42
    spark: SparkConfig = field(default_factory=SparkConfig)
    io: IOConfig = field(default_factory=IOConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    sequences: SequencesConfig = field(default_factory=SequencesConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    recent: RecentConfig = field(default_factory=RecentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    natm: NATMSection = field(default_factory=NATMSection)
    dat: DATSection = field(default_factory=DATSection)
    model: str = "cooc"  # which model the pipeline trains/produces and evaluates

    def __post_init__(self) -> None:
        _check_choice("model", self.model, MODELS)
        # every job hashes it with the rows (xxhash64) and the training seeds numpy and torch with it:
        # a negative one passed the Spark stages and stopped the training reader, unnamed
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"seed={self.seed!r} must be a whole number in [0, 2^63)")
        if self.natm.negatives is not None and self.natm.negatives > self.samples.num_negatives:
            raise ConfigError(f"natm.negatives={self.natm.negatives} must be <= samples.num_negatives="
                              f"{self.samples.num_negatives} (the negatives stored with each sample)")
        if self.model == "natm" and self.natm.num_neighbors > self.graph.top_n:
            # the item graph keeps graph.top_n neighbours per item: the other slots would always be padding
            raise ConfigError(f"natm.num_neighbors={self.natm.num_neighbors} must be <= graph.top_n="
                              f"{self.graph.top_n} (the neighbours kept per item; the extra slots would always "
                              "be padding): raise graph.top_n or lower natm.num_neighbors")
        if max(self.eval.ks) > self.baseline.k:
            raise ConfigError(f"eval.ks={list(self.eval.ks)} goes up to {max(self.eval.ks)}, but baseline.k="
                              f"{self.baseline.k} writes lists of {self.baseline.k} items: raise baseline.k or "
                              "drop the larger cut-offs from eval.ks")
        if self.recent.triggers and max(self.eval.ks) > self.recent.k:  # HR@50 of a 10-item list is HR@10
            raise ConfigError(f"eval.ks={list(self.eval.ks)} goes up to {max(self.eval.ks)}, but recent.k="
                              f"{self.recent.k} writes fused lists of {self.recent.k} items: raise recent.k or "
                              "drop the larger cut-offs from eval.ks")
        if not self.warehouse.strip():  # the tables were written into the working directory
            raise ConfigError(f"warehouse={self.warehouse!r} must name a directory or URI")

    def table_path(self, name: str) -> str:
        """Location of table ``name`` under the warehouse."""
        return os.path.join(self.warehouse, name) if "://" not in self.warehouse else (
            self.warehouse.rstrip("/") + "/" + name)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'; allowed keys: {sorted(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            value = _check_type(f"{prefix}{key}", value, hint)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


# annotation -> (does a YAML value fit it, what the error says it must be)
_FIELD_TYPES = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    tuple: (lambda v: isinstance(v, (list, tuple)), "a list"),
    list: (lambda v: isinstance(v, (list, tuple)), "a list"),
}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` (from YAML or ``--set``) if it has the type of the field's annotation ``hint``, else a
    ConfigError naming the key and the type expected: checked before any section is built, so a
    wrong type fails when the config is read, not in a job after Spark work (``window=2.5``).
    One conversion: a string that reads as a number, for a number field (PyYAML reads ``1e-3``
    as a string: YAML 1.1 wants ``1.0e-3``)."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return value
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin in (Mapping, dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping (key: value)")
        nested = [k for k, v in value.items() if isinstance(v, (Mapping, list, tuple))]
        if nested:
            raise ConfigError(f"{key}.{nested[0]}={value[nested[0]]!r} must be a single value (a string or a "
                              f"number), not a mapping or a list")
        return value
    if hint is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if hint not in _FIELD_TYPES:  # a field of another type: its section's __post_init__ checks it
        return value
    fits, expected = _FIELD_TYPES[hint]
    if not fits(value):
        quote = " (quote it in YAML: YAML reads on/off/yes/no as booleans)" if hint is str and isinstance(value, bool) else ""
        if hint in (list, tuple):  # on the command line a list is written in brackets
            quote = f", e.g. --set '{key}=[{value if isinstance(value, str) else 'a, b'}]' (YAML: [a, b])"
            if key == "ingest.csv_schema":
                quote = ", e.g. --set 'ingest.csv_schema=[user_id, item_id, ts]': the column names in file order, no types"
        if hint is str and value is None:
            quote = " (an empty value is no value: give one)"
        raise ConfigError(f"{key}={value!r} must be {expected}{quote}")
    return value


def _set_path(d: dict, dotted: str, value: Any) -> None:
    parts = _split_key(dotted)
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def _split_key(dotted: str) -> list:
    """A --set key's path; inside a mapping field the rest is one key, dots and all
    (spark.conf.spark.sql.session.timeZone)."""
    for free in sorted(_mapping_fields()):
        if dotted.startswith(free + ".") and len(dotted) > len(free) + 1:
            return free.split(".") + [dotted[len(free) + 1:]]
    return dotted.split(".")


def _field_hint(parts: typing.Sequence[str]) -> Any:
    """The annotation of the field at ``parts`` (a mapping's value type for a key inside a mapping
    field), or None where the path names no field (``_build`` reports an unknown key)."""
    hint: Any = Config
    for p in parts:
        if dataclasses.is_dataclass(hint):
            hint = typing.get_type_hints(hint).get(p)
        elif typing.get_origin(hint) in (Mapping, dict, collections.abc.Mapping) and len(typing.get_args(hint)) == 2:
            hint = typing.get_args(hint)[1]
        else:
            return None
        if hint is None:
            return None
    return hint


def _is_str_field(hint: Any) -> bool:
    return hint is str or (typing.get_origin(hint) is typing.Union and str in typing.get_args(hint)
                           and all(a in (str, type(None)) for a in typing.get_args(hint)))


_YAML_NULLS = ("null", "Null", "NULL", "~")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last value,
    so a second ``train:`` section would silently drop the first one's settings."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: the base class merges it in
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {first + 1}); "
                    "merge the two", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError, line: bool = True) -> str:
    """One line for a YAML error: what is wrong and where (the job prints config errors as one line)."""
    if isinstance(e, yaml.MarkedYAMLError):
        what = ", ".join(x for x in (e.context, e.problem) if x) or "malformed"
        mark = e.problem_mark or e.context_mark
        if mark is not None:
            what += f" (line {mark.line + 1}, column {mark.column + 1})" if line else f" (column {mark.column + 1})"
        return what
    return " ".join(str(e).split())


def _override_value(dotted: str, parts: typing.Sequence[str], raw: str) -> Any:
    """The value of ``--set dotted=raw``: the text as written for a string field (YAML would make
    ``|`` and ``>`` '', ``#x`` null and ``OFF`` false), unless it is quoted or null; YAML otherwise."""
    text = raw.strip()
    if raw == "" or text in _YAML_NULLS:
        return None
    if _is_str_field(_field_hint(parts)) and text[:1] not in ("'", '"'):
        return text or raw  # spaces around the text go, as YAML dropped them; a value of spaces stays
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted + '=' + raw!r}: not valid YAML: {_yaml_problem(e, line=False)}; a list is "
                          f"written [a, b], a mapping {{k: v}}, text with YAML's own characters in quotes") from None


def parse_overrides(items: typing.Iterable[str]) -> dict:
    """``["a.b=3", "c=x"]`` -> nested dict with YAML-typed values (a string field takes the text)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_path(out, key, _override_value(key, _split_key(key), raw))
    return out


@functools.lru_cache(maxsize=None)
def _mapping_fields(cls: Optional[type] = None, prefix: str = "") -> frozenset:
    """Dotted names of the fields that hold a free mapping (``spark.conf``, ``ingest.columns``)."""
    out = set()
    for name, hint in typing.get_type_hints(cls or Config).items():
        if dataclasses.is_dataclass(hint):
            out |= _mapping_fields(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) in (Mapping, dict, collections.abc.Mapping):
            out.add(prefix + name)
    return frozenset(out)


def _merge(base: dict, over: Mapping, prefix: str = "") -> dict:
    """``over`` on top of ``base``, key by key; an explicit empty mapping for a mapping field
    (``ingest.columns: {}``) replaces the inherited one instead of adding nothing to it."""
    out = dict(base)
    for k, v in over.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and not v and path in _mapping_fields():
            out[k] = {}
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v, path + ".")
        else:
            out[k] = v
    return out


def load_config(path: Optional[str | Path] = None, overrides: typing.Iterable[str] = (),
                extra: Optional[Mapping] = None) -> Config:
    """Load ``path`` (YAML; may name ``base:`` files to inherit from) and apply overrides."""
    data: dict = {}
    if path is not None:
        data = _load_yaml(Path(path))
    if extra:
        data = _merge(data, extra)
    for item in overrides:  # one at a time, in order: --set 'ingest.columns={}' --set ingest.columns.user_id=u
        data = _merge(data, parse_overrides([item]))
    return _build(Config, data, "")


def _load_yaml(path: Path, _chain: tuple = ()) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist" + (f" (base: of {_chain[-1]})" if _chain else ""))
    if path.resolve() in (p.resolve() for p in _chain):
        raise ConfigError(f"config file {path}: its base: files inherit from it again: "
                          + " -> ".join(str(p) for p in (*_chain, path)))
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder" + (f" (base: of {_chain[-1]})" if _chain else ""))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    bases = data.pop("base", None)
    if bases:
        bases = [bases] if isinstance(bases, str) else bases
        if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
            raise ConfigError(f"config file {path}: base={bases!r} must be a file name or a list of them")
        merged: dict = {}
        for b in bases:
            merged = _merge(merged, _load_yaml(path.parent / b, (*_chain, path)))
        data = _merge(merged, data)
    return data


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)

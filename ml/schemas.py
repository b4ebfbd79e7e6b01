"""Column names and schemas of every table (the table contracts of README.md)."""
from __future__ import annotations

from pyspark.sql.types import (ArrayType, DoubleType, IntegerType, LongType, MapType, StringType,
                               StructField, StructType, TimestampType)

from ml.errors import InvalidInput

USER_ID = "user_id"
ITEM_ID = "item_id"
TS = "ts"  # BIGINT seconds since epoch (or the position in the source, for position-only formats)
BEHAVIOR = "behavior"
CATEGORY_ID = "category_id"
CATEGORY_NAME = "category_name"
TITLE = "title"
FEATURES = "features"
REASON = "reason"
RAW_RECORD = "raw_record"
SOURCE = "source"
ITEMS = "items"
TIMESTAMPS = "timestamps"
LENGTH = "length"
TRIGGER_ITEM = "trigger_item"
TARGET_ITEM = "target_item"
TARGET_TS = "target_ts"
HISTORY_LENGTH = "history_length"
NEIGHBOR_ID = "neighbor_id"
WEIGHT = "weight"
SCORE = "score"
RANK = "rank"
MODEL = "model"
TS_MICROS = "ts_micros"

ACTIONS = StructType([
    StructField(USER_ID, LongType(), False),
    StructField(ITEM_ID, LongType(), False),
    StructField(TS, LongType(), False),
    StructField(BEHAVIOR, StringType(), True),
    StructField(CATEGORY_ID, LongType(), True),
    # The event time in microseconds where the source is finer than seconds (ms / us / ns integers,
    # timestamp columns, time strings); null for whole seconds. Orders a user's events within a second.
    StructField(TS_MICROS, LongType(), True),
])

# Rejected rows keep every source value as text so nothing is lost, plus why they were rejected.
ACTIONS_REJECTED = StructType([
    StructField(USER_ID, StringType(), True),
    StructField(ITEM_ID, StringType(), True),
    StructField(TS, StringType(), True),
    StructField(BEHAVIOR, StringType(), True),
    StructField(CATEGORY_ID, StringType(), True),
    StructField(RAW_RECORD, StringType(), True),
    StructField(REASON, StringType(), False),
])

# The lines of the source's companion files (movies.dat, users.dat, the SASRec id maps) that ingest left
# out: the file, the line as read, and why (malformed_line, duplicate_id).
COMPANIONS_REJECTED = StructType([
    StructField("file", StringType(), False),
    StructField("line", StringType(), True),
    StructField(REASON, StringType(), False),
])

ITEMS_TABLE = StructType([
    StructField(ITEM_ID, LongType(), False),
    StructField(CATEGORY_ID, LongType(), True),
    StructField(CATEGORY_NAME, StringType(), True),
    StructField(TITLE, StringType(), True),
    StructField(FEATURES, MapType(StringType(), StringType()), True),
])

USERS_TABLE = StructType([
    StructField(USER_ID, LongType(), False),
    StructField(FEATURES, MapType(StringType(), StringType()), True),
])

SEQUENCES = StructType([
    StructField(USER_ID, LongType(), False),
    StructField(ITEMS, ArrayType(LongType(), False), False),
    StructField(TIMESTAMPS, ArrayType(LongType(), False), False),
    StructField(LENGTH, IntegerType(), False),
])

EVAL_TARGETS = StructType([
    StructField(USER_ID, LongType(), False),
    StructField(TRIGGER_ITEM, LongType(), False),
    StructField(TARGET_ITEM, LongType(), False),
    StructField(TARGET_TS, LongType(), False),
    StructField(HISTORY_LENGTH, IntegerType(), False),
])

COUNT = "count"
METRIC = "metric"
K = "k"
VALUE = "value"
N_USERS = "n_users"
RUN_TS = "run_ts"
TARGETS = "targets"

ITEM_GRAPH = StructType([
    StructField(ITEM_ID, LongType(), False),
    StructField(NEIGHBOR_ID, LongType(), False),
    StructField(WEIGHT, DoubleType(), False),  # summed (optionally 1/distance-decayed) co-occurrences
    StructField(COUNT, LongType(), False),  # raw co-occurrence count
    StructField(RANK, IntegerType(), False),  # 1 = strongest neighbour
])

ITEM_COUNTS = StructType([
    StructField(ITEM_ID, LongType(), False),
    StructField(COUNT, LongType(), False),  # occurrences in training sequences (noise distribution q)
])

I2I_TOPK = StructType([
    StructField(ITEM_ID, LongType(), False),
    StructField(NEIGHBOR_ID, LongType(), False),
    StructField(SCORE, DoubleType(), False),
    StructField(RANK, IntegerType(), False),
    StructField(MODEL, StringType(), False),
])

# Per-user top-K lists. DAT / two-tower: the user (query) tower's top-K items for every user, no items
# removed (the user's history included: a serving layer filters what it has already shown).
# `<model>_recent` (jobs.recent): the i2i lists of the user's last items fused, without the fused
# items (or the whole history, recent.exclude=history).
U2I_TOPK = StructType([
    StructField(USER_ID, LongType(), False),
    StructField(ITEM_ID, LongType(), False),
    StructField(SCORE, DoubleType(), False),
    StructField(RANK, IntegerType(), False),
    StructField(MODEL, StringType(), False),
])

METRICS = StructType([
    StructField(MODEL, StringType(), False),
    StructField(METRIC, StringType(), False),  # "pre" (= HitRate) or "mrr" (i2i); "u2i_hr" or "u2i_mrr" (u2i)
    StructField(K, IntegerType(), True),  # cut-off for pre; null for mrr
    StructField(CATEGORY_ID, LongType(), True),  # null = all users; else the target item's category
    StructField(VALUE, DoubleType(), False),
    StructField(N_USERS, LongType(), False),
    StructField(RUN_TS, TimestampType(), False),
    StructField(TARGETS, StringType(), True),  # fingerprint of the eval targets scored (null: before 2026-12-05)
])

# One model against a baseline on the same eval targets, user by user (jobs.evaluate, eval.compare_to):
# value - baseline_value = diff, its 95 % confidence interval and two-sided p-value from the per-user
# differences (normal approximation, paired), and the users where only the model (wins) or only the
# baseline (losses) hit. Overall only (no categories).
BASELINE = "baseline"
METRICS_PAIRED = StructType([
    StructField(MODEL, StringType(), False),
    StructField(BASELINE, StringType(), False),
    StructField(METRIC, StringType(), False),  # the model's metric, as in ``metrics``
    StructField(K, IntegerType(), True),  # null for mrr
    StructField("baseline_kind", StringType(), False),  # the baseline lists scored: "i2i" or "u2i"
    StructField(VALUE, DoubleType(), False),
    StructField("baseline_value", DoubleType(), False),
    StructField("diff", DoubleType(), False),
    StructField("ci_low", DoubleType(), False),
    StructField("ci_high", DoubleType(), False),
    StructField("p_value", DoubleType(), False),
    StructField("wins", LongType(), False),  # users whose value is higher with the model
    StructField("losses", LongType(), False),  # users whose value is higher with the baseline
    StructField(N_USERS, LongType(), False),
    StructField(RUN_TS, TimestampType(), False),
])

# ingest.string_ids: each user / item / category key of the source and the BIGINT id it was hashed to
# (empty when the ids are integers). kind is "user", "item" or "category"; two keys with one id (a hash
# collision) are both listed.
ID_KEYS = StructType([
    StructField("kind", StringType(), False),
    StructField("key", StringType(), False),
    StructField("id", LongType(), False),
])

# Canonical table names under the warehouse.
T_ACTIONS = "actions"
T_ACTIONS_REJECTED = "actions_rejected"
T_COMPANIONS_REJECTED = "companions_rejected"
T_ITEMS = "items"
T_USERS = "users"
T_ID_KEYS = "id_keys"
T_SEQUENCES = "sequences"
T_EVAL_TARGETS = "eval_targets"
T_ITEM_GRAPH = "item_graph"
T_ITEM_COUNTS = "item_counts"
T_I2I_TOPK = "i2i_topk"
T_METRICS = "metrics"
T_METRICS_PAIRED = "metrics_paired"
T_ITEM_EMBEDDINGS = "item_embeddings"
T_USER_EMBEDDINGS = "user_embeddings"
T_U2I_TOPK = "u2i_topk"


def check_columns(df_schema: StructType, expected: StructType, what: str) -> None:
    """Raise ValueError naming missing columns or type mismatches of ``df_schema`` vs ``expected``."""
    have = {f.name: f.dataType for f in df_schema.fields}
    missing = [f.name for f in expected.fields if f.name not in have]
    wrong = [f"{f.name}: expected {f.dataType.simpleString()}, got {have[f.name].simpleString()}"
             for f in expected.fields if f.name in have and have[f.name] != f.dataType]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if wrong:
            parts.append("wrong types [" + "; ".join(wrong) + "]")
        raise InvalidInput(f"{what}: " + ", ".join(parts))

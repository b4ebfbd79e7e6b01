"""The data files of one Delta snapshot, as paths Spark and pyarrow open, with their partition values.

Shared by the Spark reader (:mod:`ml.data.io`, delta-rs mode) and the training reader
(:mod:`ml.train.reader`); no Spark import, so the training workers do not need a JVM.

Why not ``DeltaTable.file_uris()``: it percent-encodes the table root and decodes the add path, so
for a table under ``/tmp/my tables`` it names ``/tmp/my%20tables/...``, a file that does not exist.
An add action's ``path`` is, per the Delta protocol, a percent-encoded URI relative to the table
root (or absolute); the file is the table root as the caller gave it joined with the decoded path.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple
from urllib.parse import unquote

import pyarrow as pa
from deltalake import DeltaTable

from ml.errors import UnsupportedTable

PARTITION_PREFIX = "partition."


def is_uri(path: str) -> bool:
    """A URI (s3a://, abfss://, file://..., or dbfs:/) rather than a local path."""
    return "://" in path or path.startswith("dbfs:")


def table_root(path: str) -> str:
    """Absolute local path, or the URI unchanged (s3://, abfss://, dbfs:/, file:/...)."""
    if is_uri(path):
        return path.rstrip("/")
    return os.path.abspath(path)


def _file_path(root: str, add_path: str) -> str:
    if "://" not in add_path:
        return f"{root}/{unquote(add_path)}"
    if add_path.startswith("file://"):  # an absolute local URI: the local path it names
        return unquote(add_path[len("file://"):])
    return unquote(add_path)


def data_files(dt: DeltaTable, table_path: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``(file, {partition column: value})`` for every data file of the snapshot ``dt`` of the table
    at ``table_path``, sorted by file. Values as delta-rs types them (str, int, date, datetime, ...; None
    for a null partition)."""
    adds = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
    partition_columns = list(dt.metadata().partition_columns)
    root = table_root(table_path)
    out = [(_file_path(root, p), {c: adds[f"{PARTITION_PREFIX}{c}"][i] for c in partition_columns})
           for i, p in enumerate(adds["path"])]
    return sorted(out, key=lambda fv: fv[0])


def check_readable(dt: DeltaTable, table_path: str) -> None:
    """Refuse table features that make the raw Parquet rows differ from the table's rows."""
    mapping = dt.metadata().configuration.get("delta.columnMapping.mode") or "none"
    if mapping != "none":
        raise UnsupportedTable(
            f"Delta table {table_path} uses column mapping ({mapping!r}): Parquet column names differ "
            "from the table's; rewrite the table without column mapping, or read it with the Delta "
            "jars (io.delta_mode=native)")
    features = dt.protocol().reader_features or []
    if "deletionVectors" in features and pa.table(dt.deletion_vectors()).num_rows > 0:
        raise UnsupportedTable(
            f"Delta table {table_path} has deletion vectors: some Parquet rows are deleted; run "
            "OPTIMIZE/REORG (purge) on the table, or read it with the Delta jars (io.delta_mode=native)")

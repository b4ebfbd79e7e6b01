"""Delta VACUUM of every table under the warehouse: the data files of versions older than
``io.retention_hours`` (a week by default), and of writes killed before they committed.

Every run of a job writes a new version and keeps the old one's files for readers pinned to it, so
a warehouse rebuilt every night grows by a full copy of its tables each night until it is vacuumed.
Schedule this after the nightly run (or weekly):

    python -m jobs.vacuum --conf conf/ml1m_natm.yaml [--set io.retention_hours=336] [--dry-run]

A vacuum changes no table's data: the pipeline skips the same stages after it as before.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

import pyarrow.fs as pafs

from ml.config import Config
from ml.data import io
from ml.data.files import arrow_filesystem, local_path
from ml.data.session import get_spark
from ml.errors import InvalidInput

from jobs._cli import command, parse

log = logging.getLogger("jobs.vacuum")


def warehouse_tables(cfg: Config) -> list:
    """The Delta tables directly under the warehouse (a local or mounted folder, or a URI Arrow's
    filesystems reach: s3://, s3a://, gs://, abfss://, hdfs://), by name; none when the warehouse
    does not exist. A warehouse that cannot be listed (permissions, credentials) is an error."""
    local = local_path(cfg.warehouse)
    try:
        if local is not None:
            if not os.path.isdir(local):
                return []
            fs, root = pafs.LocalFileSystem(), os.path.abspath(local)
        else:
            fs, root = arrow_filesystem(cfg.warehouse)
        folders = [e.base_name for e in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                   if e.type == pafs.FileType.Directory]
        # a table has a commit or a checkpoint in its log (a folder whose first commit never landed: none)
        names = sorted(n for n in folders if any(
            e.base_name.endswith((".json", ".checkpoint.parquet")) for e in
            fs.get_file_info(pafs.FileSelector(f"{root}/{n}/_delta_log", allow_not_found=True))))
    except OSError as e:  # permissions, credentials: a nightly vacuum must fail, not report 0 tables
        raise InvalidInput(f"cannot list the tables under warehouse={cfg.warehouse}: {e}") from e
    return [n for n in names if not n.startswith(("_", "."))]


def run(cfg: Config, spark=None, dry_run: bool = False) -> dict:
    """{table: files deleted (``dry_run``: that would be)} for every table under the warehouse."""
    t = time.time()
    tables = warehouse_tables(cfg)
    if spark is None and cfg.io.delta_mode != "delta-rs" and tables:
        spark = get_spark(cfg.spark)  # to tell whether the Delta jars (native VACUUM) are there
    out = {}
    for name in tables:
        out[name] = io.vacuum_table(spark, cfg.table_path(name), cfg.io.retention_hours, cfg.io.delta_mode, dry_run)
        log.info("%s: %d files %s", name, out[name], "would be deleted" if dry_run else "deleted")
    log.info("vacuum of %d tables under %s (io.retention_hours=%g)%s in %.1fs", len(tables), cfg.warehouse,
             cfg.io.retention_hours, ", dry run" if dry_run else "", time.time() - t)
    return out


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, args = parse(__doc__, argv, extra=lambda p: p.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted, delete nothing"))
    out = run(cfg, dry_run=args.dry_run)
    verb = "would be deleted" if args.dry_run else "deleted"
    for name, n in out.items():
        print(f"  {name:<18} {n:>8,} files {verb}")
    print(f"{sum(out.values()):,} files {verb} from {len(out)} tables under {cfg.warehouse} "
          f"(versions older than {cfg.io.retention_hours:g} hours)")


if __name__ == "__main__":
    main()

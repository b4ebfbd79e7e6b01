"""``sequences`` (+ ``items``, ``users``) -> ``samples_natm``, ``samples_dat``, ``noise_q``.

    python -m jobs.samples --conf conf/ml1m_natm.yaml --set samples.num_negatives=9
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from pyspark import StorageLevel
from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import Config
from ml.data import io
from ml.data.graph import item_counts
from ml.data.ingest import category_names
from ml.data.samples import (T_NOISE_Q, T_SAMPLES_DAT, T_SAMPLES_NATM, build_dat_samples, build_natm_samples,
                             category_counts, noise_distribution)
from ml.data.session import get_spark
from ml.errors import InvalidInput

from jobs._cli import command, parse, print_tables
from jobs.embed import USER_MODELS

log = logging.getLogger("jobs.samples")


def _optional(spark, cfg: Config, name: str):
    path = cfg.table_path(name)
    return io.read_table(spark, path, delta_mode=cfg.io.delta_mode) if io.table_exists(path) else None


class CatalogueTooLarge(InvalidInput):
    """More items (or DAT users) than the per-process arrays of the later stages are allowed to hold."""


def _check_size(what: str, n: int, limit: int, key: str) -> None:
    if n > limit:
        raise CatalogueTooLarge(
            f"samples: {n:,} {what}, above {key}={limit:,}. From the samples on, per-id arrays are held whole "
            f"in one process (the noise table on the driver and in every executor, the id tables in every "
            f"training rank, the vectors on the top-K driver; README, 'Memory at catalogue scale'): at this "
            f"size expect out-of-memory failures. Raise {key} (--set {key}=...) if your driver and executors "
            f"have the memory, or cut the catalogue upstream (rare items); nothing was written")


@io.job_run
def run(cfg: Config, spark=None, which: Sequence[str] = ("natm", "dat")) -> dict:
    spark = spark or get_spark(cfg.spark)
    mode, sc = cfg.io.delta_mode, cfg.samples
    seqs = io.read_table(spark, cfg.table_path(S.T_SEQUENCES), delta_mode=mode)
    if cfg.model in USER_MODELS and sc.max_users:  # only a model with a user tower holds a table per user
        _check_size("users", seqs.count(), sc.max_users, "samples.max_users")  # Parquet footers: no scan
    # persisted: counted (the catalogue-size check), then written without computing it again
    q = noise_distribution(item_counts(seqs), sc.noise, sc.alpha).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        if sc.max_items:
            _check_size("training items", q.count(), sc.max_items, "samples.max_items")
        io.write_table(spark, q, cfg.table_path(T_NOISE_Q), mode="overwrite", delta_mode=mode, overwrite_schema=True)
    finally:
        q.unpersist()
    q = io.read_table(spark, cfg.table_path(T_NOISE_Q), delta_mode=mode)
    out: dict = {}
    if "natm" in which:
        io.write_table(spark, build_natm_samples(spark, seqs, q, sc, cfg.seed), cfg.table_path(T_SAMPLES_NATM),
                       mode="overwrite", delta_mode=mode, overwrite_schema=True)
        out["natm"] = io.read_table(spark, cfg.table_path(T_SAMPLES_NATM), delta_mode=mode).count()
        log.info("samples_natm: %d positives x %d negatives (noise=%s alpha=%.2f)", out["natm"], sc.num_negatives,
                 sc.noise, sc.alpha)
    if "dat" in which:
        dat = build_dat_samples(spark, seqs, q, _optional(spark, cfg, S.T_ITEMS), _optional(spark, cfg, S.T_USERS),
                                sc, cfg.seed)
        io.write_table(spark, dat, cfg.table_path(T_SAMPLES_DAT), mode="overwrite", delta_mode=mode,
                       overwrite_schema=True)
        written = io.read_table(spark, cfg.table_path(T_SAMPLES_DAT), delta_mode=mode)
        out["dat"] = written.count()
        per_cat = category_counts(written).limit(1000).collect()  # categories, not rows: small
        out["dat_categories"] = {r[S.CATEGORY_ID]: r["positives"] for r in per_cat}
        shown = list(out["dat_categories"].items())[:20]
        items = _optional(spark, cfg, S.T_ITEMS)
        names = category_names(items, [c for c, _ in shown]) if items is not None else {}
        log.info("samples_dat: %d rows (%s stratification); positives per category (largest first): %s",
                 out["dat"], sc.stratify, ", ".join(f"{names.get(c, c)}:{n}" for c, n in shown))
    return out


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"samples_natm: {out.get('natm', 0):,} rows; samples_dat: {out.get('dat', 0):,} rows over "
          f"{len(out.get('dat_categories', {}))} categories")
    print_tables(cfg, [T_SAMPLES_NATM, T_SAMPLES_DAT, T_NOISE_Q])


if __name__ == "__main__":
    main()

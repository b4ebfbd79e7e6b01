"""Write a synthetic action log (``generate.table`` under the warehouse).

    python -m jobs.generate --conf conf/synthetic.yaml --set generate.num_users=1000000
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

from ml.config import Config
from ml.data import io
from ml.data.generate import generate_actions
from ml.data.session import get_spark

from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.generate")


@io.job_run
def run(cfg: Config, spark=None) -> dict:
    spark = spark or get_spark(cfg.spark)
    start = time.time()
    df = generate_actions(spark, cfg.generate, cfg.seed)
    path = cfg.table_path(cfg.generate.table)
    version = io.write_table(spark, df, path, mode="overwrite", delta_mode=cfg.io.delta_mode,
                             overwrite_schema=True)
    rows = io.read_table(spark, path, delta_mode=cfg.io.delta_mode).count()
    log.info("generated %d actions for %d users into %s (version %d) in %.1fs", rows,
             cfg.generate.num_users, path, version, time.time() - start)
    return {"rows": rows, "path": path, "version": version}


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"generated {out['rows']:,} actions")
    print_tables(cfg, [cfg.generate.table])


if __name__ == "__main__":
    main()

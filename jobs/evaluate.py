"""``i2i_topk`` + ``eval_targets`` -> ``metrics`` (Pre@K and MRR over all eval users; per category).

    python -m jobs.evaluate --conf conf/ml1m_natm.yaml --model pop --model cooc
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import Config
from ml.data import io
from ml.data.session import get_spark
from ml.eval.metrics import compute_metrics, format_table

from jobs._cli import parse, print_tables

log = logging.getLogger("jobs.evaluate")


def run(cfg: Config, spark=None, models: Optional[List[str]] = None) -> dict:
    spark = spark or get_spark(cfg.spark)
    mode = cfg.io.delta_mode
    models = models or [cfg.model]
    targets = io.read_table(spark, cfg.table_path(S.T_EVAL_TARGETS), delta_mode=mode)
    topk_all = io.read_table(spark, cfg.table_path(S.T_I2I_TOPK), delta_mode=mode)
    items = None
    if cfg.eval.per_category and io.table_exists(cfg.table_path(S.T_ITEMS)):
        items = io.read_table(spark, cfg.table_path(S.T_ITEMS), delta_mode=mode)
    rows = []
    for m in models:
        topk = topk_all.where(F.col(S.MODEL) == m)
        metrics = compute_metrics(targets, topk, list(cfg.eval.ks), m, items)
        io.write_table(spark, metrics, cfg.table_path(S.T_METRICS), mode="overwrite", partition_by=[S.MODEL],
                       replace_where={S.MODEL: m}, delta_mode=mode)
        written = io.read_table(spark, cfg.table_path(S.T_METRICS), delta_mode=mode).where(F.col(S.MODEL) == m)
        rows += [r.asDict() for r in written.where(F.col(S.CATEGORY_ID).isNull()).collect()]  # <= len(ks)+1 rows
    table = format_table(rows, list(cfg.eval.ks))
    log.info("metrics\n%s", table)
    return {"rows": rows, "table": table}


def main(argv: Optional[Sequence[str]] = None) -> None:
    def extra(p):
        p.add_argument("--model", action="append", help="model(s) to evaluate (default: the config's model)")

    cfg, args = parse(__doc__, argv, extra)
    out = run(cfg, models=args.model)
    print(out["table"])
    print_tables(cfg, [S.T_METRICS])


if __name__ == "__main__":
    main()

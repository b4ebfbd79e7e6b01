"""``i2i_topk`` + ``eval_targets`` -> ``metrics`` (Pre@K and MRR over all eval users; per category);
``u2i_topk`` too for models that have one (DAT / two-tower, and ``<model>_recent``: HR@K and MRR of the
user's last item).

    python -m jobs.evaluate --conf conf/ml1m_natm.yaml --model pop --model cooc
"""
from __future__ import annotations

import datetime as dt
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
    models = models or default_models(cfg)
    targets = io.read_table(spark, cfg.table_path(S.T_EVAL_TARGETS), delta_mode=mode)
    topk_all = None
    if io.table_exists(cfg.table_path(S.T_I2I_TOPK)):
        topk_all = io.read_table(spark, cfg.table_path(S.T_I2I_TOPK), delta_mode=mode)
    items = None
    if cfg.eval.per_category and io.table_exists(cfg.table_path(S.T_ITEMS)):
        items = io.read_table(spark, cfg.table_path(S.T_ITEMS), delta_mode=mode)
    u2i_all = None
    if io.table_exists(cfg.table_path(S.T_U2I_TOPK)):
        u2i_all = io.read_table(spark, cfg.table_path(S.T_U2I_TOPK), delta_mode=mode)
    run_ts = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    rows = []
    for m in models:
        # i2i lists (every model but the fused "<model>_recent"), u2i lists (DAT, two-tower, *_recent)
        parts = [(kind, t.where(F.col(S.MODEL) == m)) for kind, t in (("i2i", topk_all), ("u2i", u2i_all))
                 if t is not None]
        parts = [(kind, t) for kind, t in parts if t.limit(1).count()]
        if not parts:
            raise ValueError(f"model {m!r} has no rows in i2i_topk or u2i_topk: run its topk (or recent) stage first")
        metrics = None
        for kind, t in parts:
            part = compute_metrics(targets, t, list(cfg.eval.ks), m, items, run_ts, kind=kind)
            metrics = part if metrics is None else metrics.unionByName(part)
        io.write_table(spark, metrics, cfg.table_path(S.T_METRICS), mode="overwrite", partition_by=[S.MODEL],
                       replace_where={S.MODEL: m}, delta_mode=mode)
        written = io.read_table(spark, cfg.table_path(S.T_METRICS), delta_mode=mode).where(F.col(S.MODEL) == m)
        rows += [r.asDict() for r in written.where(F.col(S.CATEGORY_ID).isNull()).collect()]  # <= len(ks)+1 rows
    table = format_table(rows, list(cfg.eval.ks))
    log.info("metrics\n%s", table)
    report = write_evaluation_report(cfg, spark)
    log.info("report: %s", report)
    return {"rows": rows, "table": table, "report": report}


def default_models(cfg: Config) -> List[str]:
    """The config's model, and its fused recent-items lists when the recent stage is on."""
    from jobs.recent import model_name

    return [cfg.model] + ([model_name(cfg)] if cfg.recent.triggers > 0 else [])


def write_evaluation_report(cfg: Config, spark) -> str:
    """Report over every model in the metrics table (they share the eval targets)."""
    import os

    from ml.eval.report import read_loss_curve, write_report

    mode = cfg.io.delta_mode
    metrics = io.read_table(spark, cfg.table_path(S.T_METRICS), delta_mode=mode)
    all_rows = [r.asDict() for r in metrics.collect()]  # models x metrics x categories: small
    overall = [r for r in all_rows if r[S.CATEGORY_ID] is None]
    names = None
    if io.table_exists(cfg.table_path(S.T_ITEMS)):
        cats = io.read_table(spark, cfg.table_path(S.T_ITEMS), delta_mode=mode).select(S.CATEGORY_ID, S.CATEGORY_NAME)
        names = {r[0]: r[1] for r in cats.where(F.col(S.CATEGORY_ID).isNotNull()).distinct().limit(10_000).collect()}
    models = sorted({r[S.MODEL] for r in all_rows})
    curves = {m: read_loss_curve(cfg.table_path(os.path.join("models", m, "train_metrics.jsonl"))) for m in models}
    return write_report(cfg.table_path("report"), all_rows, list(cfg.eval.ks), format_table(overall, list(cfg.eval.ks)),
                        curves, names, title=f"spark-i2i evaluation ({cfg.warehouse})")


def main(argv: Optional[Sequence[str]] = None) -> None:
    def extra(p):
        p.add_argument("--model", action="append", help="model(s) to evaluate (default: the config's model)")

    cfg, args = parse(__doc__, argv, extra)
    out = run(cfg, models=args.model)
    print(out["table"])
    print_tables(cfg, [S.T_METRICS])
    print(f"  {'report':<18} {out['report']}")


if __name__ == "__main__":
    main()

"""Write a baseline's i2i top-K lists (``model`` = pop or cooc) into ``i2i_topk``.

    python -m jobs.baseline --conf conf/ml1m_natm.yaml --set model=pop
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from pyspark.sql import DataFrame

from ml import schemas as S
from ml.config import Config, ConfigError
from ml.data import io
from ml.data.baselines import cooccurrence_topk, popularity_topk
from ml.data.graph import cap_sequences, item_counts
from ml.data.session import get_spark, tasks_for
from ml.errors import InvalidInput

from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.baseline")
BASELINES = ("pop", "cooc")
LIST_ROWS_PER_TASK = 5_000_000  # list rows written per task (at 10^7 items and k = 100: 202 tasks)


def catalogue(spark, cfg: Config, counts) -> tuple[DataFrame, int]:
    """(every item that can be a trigger: the items table plus every training item, the tasks its lists
    take). The ids are spread over one task per LIST_ROWS_PER_TASK rows of lists (k + 1 per item):
    they are small in bytes, and adaptive execution sized their tasks by that, though each id becomes
    a list."""
    items = counts.select(S.ITEM_ID)
    n = counts.count()  # cached by the caller
    path = cfg.table_path(S.T_ITEMS)
    if io.table_exists(path):
        table = io.read_table(spark, path, delta_mode=cfg.io.delta_mode).select(S.ITEM_ID)
        items, n = items.unionByName(table), n + table.count()  # an upper bound is enough to size the tasks
    tasks = tasks_for(spark, n * (cfg.baseline.k + 1), LIST_ROWS_PER_TASK)
    return items.repartition(tasks, S.ITEM_ID).distinct(), tasks  # the distinct keeps these partitions


@io.job_run
def run(cfg: Config, spark=None, model: Optional[str] = None) -> dict:
    model = model or cfg.model
    if model not in BASELINES:
        raise ConfigError(f"model={model!r} is not a baseline; expected one of {list(BASELINES)}")
    spark = spark or get_spark(cfg.spark)
    mode = cfg.io.delta_mode
    seqs = io.read_table(spark, cfg.table_path(S.T_SEQUENCES), delta_mode=mode)
    counts = item_counts(seqs).cache()
    cat, tasks = catalogue(spark, cfg, counts)
    if model == "pop":
        topk = popularity_topk(cat, counts, cfg.baseline.k)
    else:
        # the graph's cap on pathological users (bots): their pairs would be one huge row each, and
        # edges NATM's graph never sees
        topk = cooccurrence_topk(cap_sequences(seqs, cfg.graph.max_user_length), cat, counts, cfg.baseline,
                                 tasks=tasks)

    def empty() -> InvalidInput:  # before: the next stage said "run jobs.baseline first", of the stage that had just run
        return InvalidInput(f"i2i_topk[{model}]: no item has a list: the training sequences hold {counts.count():,} "
                            f"item(s), and a list never holds its own item; the model's lists are left as they were")

    try:
        version, n = io.replace_model_partition(spark, topk, cfg.table_path(S.T_I2I_TOPK), model, mode,
                                                refuse_empty=empty)
    finally:
        counts.unpersist()
    log.info("i2i_topk[%s]: %d rows (k=%d), version %d", model, n, cfg.baseline.k, version)
    return {"model": model, "rows": n, "version": version}


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    def extra(p):
        p.add_argument("--model", choices=BASELINES, help="overrides the config's model")

    cfg, args = parse(__doc__, argv, extra)
    out = run(cfg, model=args.model)
    print(f"i2i_topk[{out['model']}]: {out['rows']:,} rows")
    print_tables(cfg, [S.T_I2I_TOPK])


if __name__ == "__main__":
    main()

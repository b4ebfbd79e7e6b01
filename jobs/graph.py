"""``sequences`` -> ``item_graph`` (top-N co-occurrence neighbours) + ``item_counts``.

    python -m jobs.graph --conf conf/ml1m_natm.yaml --set graph.window=5 --set graph.decay=true
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

from pyspark.sql import functions as F

from ml import schemas as S
from ml.config import Config
from ml.data import io
from ml.data.graph import build_cooccurrence_graph, capped_users, item_counts
from ml.data.session import get_spark

from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.graph")


@io.job_run
def run(cfg: Config, spark=None) -> dict:
    spark = spark or get_spark(cfg.spark)
    mode, g = cfg.io.delta_mode, cfg.graph
    t = time.time()
    seqs = io.read_table(spark, cfg.table_path(S.T_SEQUENCES), delta_mode=mode)
    capped, cap = capped_users(seqs, g.max_user_length)
    n_capped = capped.count() if cap else 0
    if n_capped:
        log.info("graph: %d users longer than graph.max_user_length=%d keep their most recent items", n_capped, cap)
    # An empty graph is written (it is what these sequences and settings give, and pipelines of the
    # other models run on): NATM's training refuses it (natm_task.build_natm), and this log says it.
    io.write_table(spark, build_cooccurrence_graph(seqs, g), cfg.table_path(S.T_ITEM_GRAPH), mode="overwrite",
                   delta_mode=mode, overwrite_schema=True)
    io.write_table(spark, item_counts(seqs), cfg.table_path(S.T_ITEM_COUNTS), mode="overwrite", delta_mode=mode,
                   overwrite_schema=True)
    graph = io.read_table(spark, cfg.table_path(S.T_ITEM_GRAPH), delta_mode=mode)
    # every item in the graph has exactly one rank-1 neighbour: its items counted without a distinct
    # (a shuffle of every edge at 10⁸ items, for a log line)
    s = graph.agg(F.count(F.lit(1)).alias("edges"), F.count_if(F.col(S.RANK) == 1).alias("items")).first()
    out = {"edges": s["edges"], "items_with_neighbours": s["items"], "capped_users": n_capped,
           "seconds": time.time() - t}
    log.info("item_graph: %d edges over %d items (window=%d decay=%s symmetric=%s min_count=%d top_n=%d) in %.1fs",
             out["edges"], out["items_with_neighbours"], g.window, g.decay, g.symmetric, g.min_count, g.top_n,
             out["seconds"])
    if not out["edges"]:
        log.warning("item_graph is empty: no pair of items within graph.window=%d reaches graph.min_count=%d "
                    "(NATM cannot train on it)", g.window, g.min_count)
    return out


@command
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse(__doc__, argv)
    out = run(cfg)
    print(f"{out['edges']:,} edges over {out['items_with_neighbours']:,} items; "
          f"{out['capped_users']:,} long users capped")
    print_tables(cfg, [S.T_ITEM_GRAPH, S.T_ITEM_COUNTS])


if __name__ == "__main__":
    main()

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
from ml.errors import InvalidInput

from jobs._cli import command, parse, print_tables

log = logging.getLogger("jobs.graph")


def run(cfg: Config, spark=None) -> dict:
    spark = spark or get_spark(cfg.spark)
    mode, g = cfg.io.delta_mode, cfg.graph
    t = time.time()
    seqs = io.read_table(spark, cfg.table_path(S.T_SEQUENCES), delta_mode=mode)
    capped, cap = capped_users(seqs, g.max_user_length)
    n_capped = capped.count() if cap else 0
    if n_capped:
        log.info("graph: %d users longer than graph.max_user_length=%d keep their most recent items", n_capped, cap)
    # no edge at all (a min_count above every pair's count): NATM would train on padding alone, after
    # an INFO line; the graph of the last good run stays, and so does item_counts
    io.write_table(spark, build_cooccurrence_graph(seqs, g), cfg.table_path(S.T_ITEM_GRAPH), mode="overwrite",
                   delta_mode=mode, overwrite_schema=True, refuse_empty=lambda: InvalidInput(
                       f"item_graph: no edge: no pair of items within graph.window={g.window} of each other in the "
                       f"training sequences reaches graph.min_count={g.min_count}"
                       f"{' users (graph.per_user)' if g.per_user else ''}: lower graph.min_count or widen "
                       "graph.window; item_graph and item_counts are left as they were"))
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

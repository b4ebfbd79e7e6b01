"""The main job: run the stages for one config, every table under ``warehouse``.

    python -m jobs.pipeline --conf conf/synthetic.yaml [--set warehouse=DIR]

Stages: generate (synthetic configs only) -> ingest -> sequences -> graph -> samples -> train -> embed
-> topk -> evaluate. For the baselines (``model`` = pop | cooc) the topk stage writes their lists and
samples/train/embed are skipped.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

from ml.config import Config
from ml.data.session import get_spark

from jobs import baseline, embed, evaluate, generate, graph, ingest, samples, sequences, topk, train
from jobs._cli import parse, print_tables

log = logging.getLogger("jobs.pipeline")

STAGES = ("generate", "ingest", "sequences", "graph", "samples", "train", "embed", "topk", "evaluate")


def run(cfg: Config, spark=None, start_from: Optional[str] = None) -> dict:
    spark = spark or get_spark(cfg.spark)
    stages = list(STAGES)
    # generate only when ingest reads the generator's table
    if not (cfg.ingest.format == "delta" and not cfg.ingest.path):
        stages.remove("generate")
    if cfg.model in baseline.BASELINES:
        stages = [s for s in stages if s not in ("samples", "train", "embed")]
    if start_from:
        stages = [s for s in stages if STAGES.index(s) >= STAGES.index(start_from)]
    results = {}
    for stage in stages:
        t = time.time()
        log.info("stage %s ...", stage)
        if stage == "train":
            results[stage] = train.run(cfg)  # torch, no Spark; launcher from train.launcher
        elif stage == "topk" and cfg.model in baseline.BASELINES:
            results[stage] = baseline.run(cfg, spark)
        else:
            job = {"generate": generate, "ingest": ingest, "sequences": sequences, "graph": graph,
                   "samples": samples, "embed": embed, "topk": topk, "evaluate": evaluate}[stage]
            results[stage] = job.run(cfg, spark)
        log.info("stage %s done in %.1fs", stage, time.time() - t)
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    def extra(p):
        p.add_argument("--from", dest="start_from", choices=STAGES, help="start at this stage")

    cfg, args = parse(__doc__, argv, extra)
    t = time.time()
    res = run(cfg, start_from=args.start_from)
    ing, seq = res.get("ingest"), res.get("sequences")
    print(f"\npipeline finished in {time.time() - t:.0f}s")
    if ing:
        print(f"ingest: {ing['input_rows']:,} rows -> {ing['actions']:,} actions, {ing['users']:,} users, "
              f"{ing['items']:,} items; rejected {ing['rejected'] or 'none'}")
    if seq:
        print(f"sequences: {seq['users']:,} users, {seq['train_actions']:,} training actions")
    if res.get("evaluate"):
        print(f"\nmetrics over all eval users ({cfg.model}):")
        print(res["evaluate"]["table"])
        print(f"report: {res['evaluate']['report']}")
    print("tables:")
    print_tables(cfg, ["actions", "actions_rejected", "items", "sequences", "eval_targets", "item_graph",
                       "item_counts"] + ([] if cfg.model in baseline.BASELINES else
                                         ["samples_natm", "samples_dat", "item_embeddings"]) + ["i2i_topk"]
                + (["user_embeddings", "u2i_topk"] if cfg.model in embed.USER_MODELS else []) + ["metrics"])


if __name__ == "__main__":
    main()

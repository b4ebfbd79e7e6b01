"""Train NATM on ML-1M and measure i2i quality in-process (for tuning and ablations).

    python -m bench.ml1m_natm --warehouse /tmp/wh_ml --set train.max_steps=400 [--set natm.layers=4 ...]

Expects the warehouse to hold ingest..samples tables of conf/ml1m_natm.yaml (run the pipeline
first). Trains with jobs.train (local launcher), embeds every item, searches top-100 with Faiss
(trigger excluded) and prints Pre@K / MRR over all eval users, plus train time.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench._machine import describe
from jobs import train as train_job
from jobs._cli import setup_logging
from ml.config import load_config
from ml.eval.offline import hit_metrics
from ml.index.topk import build_index, search_topk
from ml.train.natm_task import embed_items, load_artifact
from ml.train.tables import read_columns

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 5, 10, 50, 100)


def natm_lists(artifact: str, triggers: np.ndarray, depth: int = 100) -> np.ndarray:
    """(len(triggers), depth) item ids nearest each trigger's NATM embedding by cosine (Faiss exact, the
    trigger excluded); a trigger outside the model's vocabulary gets -1s (a miss)."""
    model, vocab, _ = load_artifact(artifact)
    idx = torch.arange(1, vocab.size + 1)
    trig_vec, cand_vec = embed_items(model, idx)
    index = build_index(cand_vec.numpy(), kind="flat", use_gpu=False)
    trig = vocab.index(torch.from_numpy(np.asarray(triggers, dtype=np.int64).copy()))
    known = trig > 0
    topk = np.full((len(trig), depth), -1, dtype=np.int64)
    pos, _ = search_topk(index, trig_vec[trig[known] - 1].numpy(), (trig[known] - 1).numpy(), depth)
    topk[known.numpy()] = vocab.ids.numpy()[pos]
    return topk


def evaluate_artifact(cfg, artifact: str) -> dict:
    t = read_columns(cfg.table_path("eval_targets"), ["trigger_item", "target_item"])
    topk = natm_lists(artifact, t.column("trigger_item").to_numpy())
    return hit_metrics(topk, t.column("target_item").to_numpy(), KS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warehouse", default="/tmp/wh_ml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    setup_logging("WARNING")
    cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", [f"warehouse={a.warehouse}", "train.log_every=1000000",
                                                         *a.overrides])
    t = time.time()
    res = train_job.run(cfg)
    secs = time.time() - t
    m = evaluate_artifact(cfg, str(Path(train_job.model_dir(cfg)) / "model.pt"))
    print(f"{' '.join(a.overrides) or 'defaults'} | steps {res['steps']} | train {secs:.0f}s | "
          + " ".join(f"{k} {v:.4f}" for k, v in m.items()) + f" | {describe()}", flush=True)


if __name__ == "__main__":
    main()

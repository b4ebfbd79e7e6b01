"""NATM ablations on ML-1M in one run, the shape of the paper's Tables 3-5, plus our loss options.

    python -m bench.ml1m_natm_ablation --warehouse /tmp/wh_ml --groups layers neighbours negatives loss \
        [--steps 240] [--set train.batch_size=2048 ...]

Every variant trains from scratch with the same budget (steps x batch), the same samples and
seed, then is scored exactly like bench.ml1m_natm (trigger's embedding vs every item, cosine,
Faiss exact, trigger excluded, all eval users). Point ``--warehouse`` at a validation warehouse
(conf/ml1m_natm.yaml with ``sequences.holdout=2``, see the README) to choose settings without
touching the test targets. The paper reports: best at 4 layers, 9 neighbours, ~9 negatives.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench._machine import describe
from bench.ml1m_natm import evaluate_artifact
from jobs import train as train_job
from jobs._cli import setup_logging
from ml.config import load_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    # paper Table 3: encoder depth (0 = MLP over the item and its neighbours)
    "layers": [("layers=0", ["natm.layers=0"]), ("layers=1", ["natm.layers=1"]), ("layers=2", ["natm.layers=2"])],
    # paper Table 4: neighbours in the quasi-sequence (0 = no graph augmentation)
    "neighbours": [("neighbours=0", ["natm.num_neighbors=0"]), ("neighbours=3", ["natm.num_neighbors=3"]),
                   ("neighbours=9", ["natm.num_neighbors=9"])],
    # paper Table 5: negatives per positive
    "negatives": [("negatives=1", ["natm.negatives=1"]), ("negatives=4", ["natm.negatives=4"]),
                  ("negatives=9", ["natm.negatives=9"])],
    # ours: the paper's NCE vs a sampled softmax over the batch; shared vs separate encoders
    "loss": [("nce", ["natm.loss=nce"]), ("softmax", ["natm.loss=softmax"]),
             ("softmax + separate encoders", ["natm.loss=softmax", "natm.separate_encoders=true"])],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--warehouse", default="/tmp/wh_ml")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="applied to every variant (the base: layers=0 and batch 2048 unless set here)")
    a = p.parse_args()
    setup_logging("WARNING")
    base = ["natm.layers=0", "train.batch_size=2048", "train.lr=0.01", "train.warmup_steps=20",
            f"train.max_steps={a.steps}", "train.log_every=1000000", *a.overrides]
    print(f"machine: {describe()}\nwarehouse {a.warehouse}; base: {' '.join(base)}", flush=True)
    rows = []
    for group in a.groups:
        for name, over in GROUPS[group]:
            cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", [f"warehouse={a.warehouse}", *base, *over])
            t = time.time()
            res = train_job.run(cfg)
            secs = time.time() - t
            m = evaluate_artifact(cfg, str(Path(train_job.model_dir(cfg)) / "model.pt"))
            rows.append((group, name, m, secs, res["steps"]))
            print(f"{group:<10} {name:<28} " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
                  + f" | {res['steps']} steps, {secs:.0f}s", flush=True)
    keys = list(rows[0][2])
    print("\n| group | variant | " + " | ".join(keys) + " | train |")
    print("|---|---|" + "---|" * len(keys) + "---|")
    for group, name, m, secs, steps in rows:
        print(f"| {group} | {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + f" | {secs:.0f} s |")


if __name__ == "__main__":
    main()

"""NATM ablations on ML-1M in one run, the shape of the paper's Tables 3-5, around the chosen config.

    python -m bench.ml1m_natm_ablation --warehouse /tmp/wh_val \
        [--groups layers neighbours pointer negatives loss] [--steps 240] [--set train.lr=0.002 ...]

Every variant is ``conf/ml1m_natm.yaml`` (layers 0 with the residual MLP, the neighbour pointer,
separate towers, the exact softmax, dim 256, bf16 autocast where the CPU has it) with one thing
changed, trained from scratch for the same steps x batch on the same samples and seed, then scored
exactly like bench.ml1m_natm (trigger's embedding vs every item, cosine, Faiss exact, trigger
excluded, all eval users). A variant whose config equals one already trained (the chosen config
appears in several groups) is reported from that run. Point ``--warehouse`` at a validation
warehouse (the pipeline with ``--set sequences.holdout=2``, see the README) to choose settings
without touching the test targets. The paper reports: best at 4 layers, 9 neighbours, ~9 negatives.

Where a variant cannot keep a setting of the config, it says so in its overrides: the transformer
(layers > 0) has its own residual stream (``natm.residual=false``), and with no neighbours there is
nothing for the pointer to point at (``natm.neighbor_pointer=false``). The exact softmax uses no
sampled negatives, so the negatives group trains with the paper's NCE.
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
CHOSEN = ("chosen: layers 0 (residual MLP), 9 neighbours, pointer, exact softmax", [])
GROUPS = {
    # paper Table 3: encoder depth (0 = MLP over the item and its neighbours)
    "layers": [CHOSEN,
               ("layers 1 (transformer, no natm.residual)", ["natm.layers=1", "natm.residual=false"]),
               ("layers 2 (transformer, no natm.residual)", ["natm.layers=2", "natm.residual=false"])],
    # paper Table 4: neighbours in the quasi-sequence (0 = no graph augmentation)
    "neighbours": [("neighbours 0 (id embedding only, so no pointer)", ["natm.num_neighbors=0", "natm.neighbor_pointer=false"]),
                   ("neighbours 3", ["natm.num_neighbors=3"]),
                   CHOSEN],
    # ours: the trigger's vector pointing at its neighbours' candidate vectors
    "pointer": [("no neighbour pointer (9 neighbours in the MLP only)", ["natm.neighbor_pointer=false"]), CHOSEN],
    # paper Table 5: negatives per positive, under the paper's NCE (the exact softmax has every item)
    "negatives": [("NCE, 1 negative", ["natm.loss=nce", "natm.negatives=1"]),
                  ("NCE, 4 negatives", ["natm.loss=nce", "natm.negatives=4"]),
                  ("NCE, 9 negatives", ["natm.loss=nce", "natm.negatives=9"])],
    # ours: the paper's NCE vs a sampled softmax over the batch vs the exact softmax over all items
    "loss": [("NCE (9 negatives)", ["natm.loss=nce"]),
             ("sampled softmax over the batch", ["natm.loss=softmax"]),
             CHOSEN],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warehouse", default="/tmp/wh_ml")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="applied to every variant (on top of conf/ml1m_natm.yaml)")
    a = p.parse_args()
    setup_logging("WARNING")
    base = [f"train.max_steps={a.steps}", "train.log_every=1000000", *a.overrides]
    print(f"machine: {describe()}\nwarehouse {a.warehouse}; conf/ml1m_natm.yaml with {' '.join(base)}", flush=True)
    rows, done = [], {}
    for group in a.groups:
        for name, over in GROUPS[group]:
            cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", [f"warehouse={a.warehouse}", *base, *over])
            key = repr((cfg.natm, cfg.train, cfg.samples))
            if key not in done:
                t = time.time()
                res = train_job.run(cfg)
                secs = time.time() - t
                m = evaluate_artifact(cfg, str(Path(train_job.model_dir(cfg)) / "model.pt"))
                done[key] = (m, secs, res["steps"], res["precision"])
            m, secs, steps, precision = done[key]
            rows.append((group, name, m, secs, steps))
            print(f"{group:<10} {name:<44} " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
                  + f" | {steps} steps, {secs:.0f}s, {precision}", flush=True)
    keys = list(rows[0][2])
    print("\n| group | variant | " + " | ".join(keys) + " | train |")
    print("|---|---|" + "---|" * len(keys) + "---|")
    for group, name, m, secs, steps in rows:
        print(f"| {group} | {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + f" | {secs:.0f} s |")


if __name__ == "__main__":
    main()

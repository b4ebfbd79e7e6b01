"""What beats co-occurrence on ML-1M: NATM's cosine fused with the directed co-occurrence signal.

    python -m bench.ml1m_hybrid --warehouse /tmp/wh_val --window 5 --decay --betas 0 0.25 0.5 1 2 1000   # choose beta
    python -m bench.ml1m_hybrid --warehouse /tmp/wh_ml --window 5 --decay --betas 0.5                  # report it

Needs a trained NATM artifact in the warehouse (bench.ml1m_natm or the pipeline). For trigger t
and candidate c: score = cos(r_t, r_c) + beta * log(1 + n(t->c)) / log(1 + max_c' n(t->c')), with
n(t->c) the directed count of c within ``--window`` positions after t in the training sequences
(each pair weighted 1/d with ``--decay``; window 1 by default: c directly follows t), from the
same training data only. beta = 0 is NATM alone; a huge beta is co-occurrence with NATM breaking
its ties and filling short lists. Same protocol as the other benches: trigger excluded, all eval
users, Pre@K and MRR over the top 100.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench._machine import describe
from ml.eval.offline import hit_metrics
from ml.train.natm_task import embed_items, load_artifact
from ml.train.tables import read_columns

KS = (1, 5, 10, 50, 100)


def transitions(warehouse: str, index_of, window: int = 1, decay: bool = False) -> np.ndarray:
    """Directed counts n(a -> b): b within ``window`` positions after a in one user's sequence,
    each pair weighted 1/d when ``decay`` (the `cooc` baseline's graph at the same settings)."""
    seqs = read_columns(str(Path(warehouse) / "sequences"), ["items"]).column("items")
    flat = seqs.combine_chunks()
    offsets = flat.offsets.to_numpy()
    items = index_of(flat.values.to_numpy())
    user = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    n = int(max(items.max(), 0)) + 1
    counts = np.zeros((n, n), dtype=np.float64)  # ML-1M: 3.4k x 3.4k; a bench, not the Spark path
    for d in range(1, window + 1):
        # pairs d positions apart inside each sequence: drop the pairs that straddle two users
        a, b = items[:-d], items[d:]
        ok = (user[:-d] == user[d:]) & (a > 0) & (b > 0) & (a != b)
        np.add.at(counts, (a[ok], b[ok]), 1.0 / d if decay else 1.0)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warehouse", default="/tmp/wh_ml")
    p.add_argument("--betas", nargs="+", type=float, default=[0, 0.5, 1, 2, 4, 8, 1000])
    p.add_argument("--window", type=int, default=1, help="co-occurrence window of the count term")
    p.add_argument("--decay", action="store_true", help="weight a pair d apart by 1/d")
    a = p.parse_args()
    if a.window < 1:
        p.error(f"--window must be >= 1 (positions after the trigger), got {a.window}")
    model, vocab, _ = load_artifact(str(Path(a.warehouse) / "models" / "natm" / "model.pt"))
    V = vocab.size
    trig_vec, cand_vec = embed_items(model, torch.arange(1, V + 1))
    sims = (trig_vec @ cand_vec.T).numpy()  # (V, V), row/col i = item index i+1
    ids = vocab.ids.numpy()

    def index_of(x):
        return vocab.index(torch.from_numpy(np.asarray(x, dtype=np.int64))).numpy()

    counts = transitions(a.warehouse, index_of, a.window, a.decay)[1:V + 1, 1:V + 1]
    norm = np.log1p(counts) / np.maximum(np.log1p(counts.max(axis=1, keepdims=True)), 1e-9)
    t = read_columns(str(Path(a.warehouse) / "eval_targets"), ["trigger_item", "target_item"])
    trig = index_of(t.column("trigger_item").to_numpy()) - 1
    target = t.column("target_item").to_numpy()
    known = trig >= 0
    print(f"warehouse {a.warehouse}; {len(target)} eval users, {V} items; count term: window {a.window}"
          f"{' 1/d' if a.decay else ''} directed; machine: {describe()}")
    print(f"{'beta':>8}" + "".join(f"{'Pre@' + str(k):>9}" for k in KS) + f"{'MRR':>9}")
    for beta in a.betas:
        score = sims[trig[known]] + beta * norm[trig[known]]
        score[np.arange(known.sum()), trig[known]] = -np.inf  # never the trigger itself
        # top 100 by score, ties to the smaller item index (stable sort of -score)
        top = np.argsort(-score, axis=1, kind="stable")[:, :100]
        topk = np.full((len(target), 100), -1, dtype=np.int64)
        topk[known] = ids[top]
        m = hit_metrics(topk, target, KS)
        print(f"{beta:>8g}" + "".join(f"{m[f'Pre@{k}']:>9.4f}" for k in KS) + f"{m['MRR']:>9.4f}", flush=True)


if __name__ == "__main__":
    main()

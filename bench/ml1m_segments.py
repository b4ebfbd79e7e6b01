"""Where does each model win? i2i metrics by how often the trigger (or the target) occurs in training.

    python -m bench.ml1m_segments --warehouse /tmp/wh_pipe [--models pop cooc natm] [--buckets 4]

Reads a warehouse the pipeline (and ``jobs.baseline`` for pop / cooc) has written: ``eval_targets``,
``item_counts`` (training occurrences per item, from the graph job) and ``i2i_topk``. The eval users
are split into ``--buckets`` groups of equal size by the training count of their trigger item, then
again by that of their target item (ties broken by user id), and every model's Pre@K and MRR are
computed in each group with the evaluation job's definitions (all users of the group; a trigger with
no list is a miss). The question it answers: NATM smooths an item's list through its neighbours'
embeddings, which should pay where co-occurrence counts are thin (rare triggers) and cost where they
are plentiful; the overall table hides which.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench._machine import describe
from ml.eval.offline import hit_metrics
from ml.train.tables import read_columns

KS = (1, 10, 50, 100)


def lists(i2i_topk: pa.Table, model: str, queries: np.ndarray, depth: int = 100) -> np.ndarray:
    """(len(queries), depth) neighbour ids of each item of ``queries`` in ``model``'s rows of ``i2i_topk``
    (-1 = none)."""
    m = i2i_topk.column("model").to_numpy(zero_copy_only=False) == model
    if not m.any():
        raise SystemExit(f"model {model!r} has no rows in i2i_topk: run its topk / baseline job first")
    item = i2i_topk.column("item_id").to_numpy()[m]
    nb = i2i_topk.column("neighbor_id").to_numpy()[m]
    rank = i2i_topk.column("rank").to_numpy()[m]
    ids, inverse = np.unique(queries, return_inverse=True)  # sorted
    row = np.clip(np.searchsorted(ids, item), 0, len(ids) - 1)
    ok = (ids[row] == item) & (rank >= 1) & (rank <= depth)
    out = np.full((len(ids), depth), -1, dtype=np.int64)
    out[row[ok], rank[ok] - 1] = nb[ok]
    return out[inverse]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warehouse", default="/tmp/wh_pipe")
    p.add_argument("--models", nargs="+", help="default: every model in i2i_topk")
    p.add_argument("--buckets", type=int, default=4)
    a = p.parse_args()
    wh = a.warehouse
    i2i = read_columns(str(Path(wh) / "i2i_topk"), ["model", "item_id", "neighbor_id", "rank"])  # read once
    models = a.models or sorted(set(i2i.column("model").to_pylist()))
    t = read_columns(str(Path(wh) / "eval_targets"), ["user_id", "trigger_item", "target_item"])
    user = t.column("user_id").to_numpy()
    trig = t.column("trigger_item").to_numpy()
    target = t.column("target_item").to_numpy()
    if not 1 <= a.buckets <= len(user):
        raise SystemExit(f"--buckets={a.buckets}: expected 1..{len(user)} (the number of eval users in {wh}/eval_targets)")
    c = read_columns(str(Path(wh) / "item_counts"), ["item_id", "count"])
    counts = dict(zip(c.column("item_id").to_pylist(), c.column("count").to_pylist()))  # one row per item
    topk = {m: lists(i2i, m, trig) for m in models}
    print(f"warehouse {wh}; {len(user):,} eval users; models {models}; machine: {describe()}")
    cols = [f"Pre@{k}" for k in KS] + ["MRR"]
    for side, items in (("trigger", trig), ("target", target)):
        n = np.array([counts.get(int(i), 0) for i in items], dtype=np.int64)
        order = np.lexsort((user, n))  # by training count, ties by user id
        print(f"\nby the {side} item's training count ({a.buckets} groups of equal size)")
        print(f"{'group':<24}{'users':>7}  {'model':<10}" + "".join(f"{c:>9}" for c in cols))
        for g, idx in enumerate(np.array_split(order, a.buckets)):
            label = f"{g + 1}: count {n[idx].min():,}-{n[idx].max():,}"
            for m in models:
                v = hit_metrics(topk[m][idx], target[idx], KS)
                print(f"{label:<24}{len(idx):>7}  {m:<10}" + "".join(f"{v[c]:>9.4f}" for c in cols))
                label = ""
        print(f"{'all':<24}{len(user):>7}  " + "  ".join(
            f"{m} Pre@10 {hit_metrics(topk[m], target, KS)['Pre@10']:.4f}" for m in models))


if __name__ == "__main__":
    main()

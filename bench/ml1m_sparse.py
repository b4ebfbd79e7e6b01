"""Does NATM beat co-occurrence when the counts are thin? ML-1M with each user's history cut short.

    python -m bench.ml1m_sparse [--lengths 10 20] [--epochs 10 20] [--warehouse /tmp/bench_ml1m_sparse]

On full ML-1M (289 training actions per item) plain co-occurrence beats the NATM embedding at every K
(README, "Results"). NATM smooths an item's list through its neighbours' embeddings, which should pay
where the counts are thin. This bench thins them the way a short log retention does: every user's
training sequence keeps only their last L actions before the held-out target (``sequences.max_length``;
the same 6,040 users, the same trigger and target), so items are seen about L/165 as often. For each L
the whole data path runs on the cut sequences (graph, samples, the ``pop`` and ``cooc`` baselines of
conf/ml1m_natm.yaml, NATM training with that config); the one setting re-chosen per L is the number
of epochs (the cut sequences have about L/165 of the samples, so two epochs are a few dozen steps):
chosen on the validation split (every user's last action dropped, the test targets never seen) by the
sum of the six metrics, then run once on the test split. Beside them, the cooc and NATM lists fused
by reciprocal rank (1 / (60 + rank), NATM's weight chosen on validation from 0.5 / 1 / 2): where
each wins on a different part of the list, the fusion shows whether the two add up. Metrics are the
evaluation protocol's: all 6,040 users, trigger excluded, a miss counts.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

from bench._machine import describe
from bench.ml1m_natm import natm_lists
from bench.ml1m_segments import lists
from jobs import baseline, evaluate, graph, ingest, samples, sequences
from jobs import train as train_job
from jobs._cli import setup_logging
from ml.config import load_config
from ml.data.session import get_spark
from ml.eval.offline import hit_metrics
from ml.train.tables import read_columns

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 5, 10, 50, 100)
COLS = [f"Pre@{k}" for k in KS] + ["MRR"]
WEIGHTS = (0.5, 1.0, 2.0)  # NATM's weight in the fused list (cooc's is 1), chosen on validation


def _values(rows) -> dict:
    out = {f"Pre@{r['k']}": r["value"] for r in rows if r["metric"] == "pre"}
    out["MRR"] = next(r["value"] for r in rows if r["metric"] == "mrr")
    return out


def _row(label: str, vals: dict) -> str:
    return f"{label:<40}" + "".join(f"{vals[c]:>9.4f}" for c in COLS) + f"{sum(vals[c] for c in COLS):>9.4f}"


def overrides(args, holdout: int, length: int) -> list:
    return [f"warehouse={args.warehouse}/holdout{holdout}", f"ingest.path={Path(args.data) / 'train_input.txt'}",
            f"sequences.holdout={holdout}", f"sequences.max_length={length}", "model=natm", "train.log_every=1000000"]


def prepare(spark, base: list, first: bool) -> tuple[dict, dict]:
    """Rebuild the cut sequences and everything after them; returns (baseline metrics, density)."""
    cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", base)
    if first:  # the actions are the same for every L: ingest once per split
        ingest.run(cfg, spark)
    sequences.run(cfg, spark)
    graph.run(cfg, spark)
    samples.run(cfg, spark, which=("natm",))
    for m in ("pop", "cooc"):
        baseline.run(cfg, spark, m)
    rows = evaluate.run(cfg, spark, ["pop", "cooc"])["rows"]
    found = {m: _values([r for r in rows if r["model"] == m]) for m in ("pop", "cooc")}
    counts = read_columns(cfg.table_path("item_counts"), ["count"]).column("count").to_numpy()
    n_samples = read_columns(cfg.table_path("samples_natm"), ["position"]).num_rows
    density = {"actions": int(counts.sum()), "items": len(counts), "per_item": float(counts.mean()),
               "under5": float(np.mean(counts < 5)), "samples": n_samples}
    return found, density


def _density(d: dict) -> str:
    return (f"{d['actions']:,} training actions, {d['items']:,} items, {d['per_item']:.1f} per item, "
            f"{d['under5']:.0%} of items seen < 5 times, {d['samples']:,} NATM samples")


def fuse(ranked: list, weights: list, rrf_k: float = 60.0, depth: int = 100) -> np.ndarray:
    """Reciprocal-rank fusion of per-query ranked lists ((Q, K_m) ids, -1 = none): item c scores
    sum_m w_m / (rrf_k + rank_m(c)); the top ``depth`` per query, ties by the smaller id."""
    ids = np.concatenate(ranked, axis=1)
    score = np.concatenate([np.broadcast_to(w / (rrf_k + np.arange(1, r.shape[1] + 1)), r.shape)
                            for r, w in zip(ranked, weights)], axis=1)
    out = np.full((ids.shape[0], depth), -1, dtype=np.int64)
    for q in range(ids.shape[0]):  # a bench over thousands of queries, not a job
        u, inv = np.unique(ids[q], return_inverse=True)
        s = np.bincount(inv, weights=score[q])
        u, s = u[u >= 0], s[u >= 0]
        top = np.lexsort((u, -s))[:depth]
        out[q, :len(top)] = u[top]
    return out


def train_natm(base: list, epochs: int) -> tuple[dict, dict, float, int]:
    """Train NATM for ``epochs``; returns (NATM metrics, {weight: metrics of cooc + NATM fused}, s, steps)."""
    cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", base + [f"train.epochs={epochs}"])
    t = time.time()
    res = train_job.run(cfg)
    secs = time.time() - t
    targets = read_columns(cfg.table_path("eval_targets"), ["trigger_item", "target_item"])
    trig, target = (targets.column(c).to_numpy() for c in ("trigger_item", "target_item"))
    natm = natm_lists(os.path.join(train_job.model_dir(cfg), "model.pt"), trig)
    cooc = lists(read_columns(cfg.table_path("i2i_topk"), ["model", "item_id", "neighbor_id", "rank"]), "cooc", trig)
    fused = {w: hit_metrics(fuse([cooc, natm], [1.0, w]), target, KS) for w in WEIGHTS}
    return hit_metrics(natm, target, KS), fused, secs, res["steps"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-1m"))
    p.add_argument("--warehouse", default="/tmp/bench_ml1m_sparse")
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 20],
                   help="training actions kept per user (the last L before the target)")
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 20], help="NATM epochs tried on validation")
    args = p.parse_args()
    for flag, values in (("--lengths", args.lengths), ("--epochs", args.epochs)):
        if min(values) < 1:
            raise SystemExit(f"{flag} must be >= 1 (got {min(values)})")
    if not (Path(args.data) / "train_input.txt").exists():
        raise SystemExit(f"ML-1M not found at {args.data}: pass --data")
    setup_logging("WARNING")
    header = f"{'':<40}" + "".join(f"{c:>9}" for c in COLS) + f"{'sum':>9}"
    print(f"ML-1M, each user's training sequence cut to their last L actions; 6,040 eval users; "
          f"machine: {describe()}", flush=True)
    t0 = time.time()
    spark = get_spark(load_config(ROOT / "conf" / "ml1m_natm.yaml").spark)
    chosen = {}
    for i, length in enumerate(args.lengths):
        base = overrides(args, 2, length)
        found, dens = prepare(spark, base, i == 0)
        print(f"\nL = {length}, validation split: {_density(dens)}\n{header}")
        for m in ("pop", "cooc"):
            print(_row(m, found[m]), flush=True)
        tried, fusions = {}, {}
        for e in args.epochs:
            tried[e], fusions[e], secs, steps = train_natm(base, e)
            print(_row(f"natm, {e} epochs ({steps} steps, {secs:.0f} s)", tried[e]), flush=True)
            for w, m in fusions[e].items():
                print(_row(f"  cooc + natm fused, natm weight {w}", m), flush=True)
        e = max(tried, key=lambda e: sum(tried[e].values()))
        w = max(fusions[e], key=lambda w: sum(fusions[e][w].values()))
        chosen[length] = e, w
        print(f"chosen on validation: {e} epochs; natm weight {w} in the fused list")

    summary = []
    for i, length in enumerate(args.lengths):
        base = overrides(args, 1, length)
        found, dens = prepare(spark, base, i == 0)
        e, w = chosen[length]
        natm, fused, secs, steps = train_natm(base, e)
        print(f"\nL = {length}, test split: {_density(dens)}\n{header}")
        for m in ("pop", "cooc"):
            print(_row(m, found[m]))
        print(_row(f"natm, {e} epochs ({steps} steps, {secs:.0f} s)", natm))
        print(_row(f"cooc + natm fused, natm weight {w}", fused[w]), flush=True)
        summary.append((length, dens, found["cooc"], natm, fused[w]))

    print(f"\nsummary, test split, ratio to cooc{'':<10}" + "".join(f"{c:>9}" for c in COLS))
    for length, dens, cooc, *rows in summary:
        for name, m in zip(("natm", "fused"), rows):
            print(f"L = {length:<4} ({dens['per_item']:6.1f} per item) {name:<6}" + "".join(
                f"{m[c] / cooc[c]:>9.2f}" if cooc[c] else f"{'-':>9}" for c in COLS))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    logging.getLogger("py4j").setLevel(logging.ERROR)
    main()

"""ML-1M i2i quality of the baselines under the NATM benchmark protocol, beside the paper's Table 2.

    python -m bench.ml1m_quality [--data ../shared/data/ml-1m] [--warehouse /tmp/bench_ml1m] [--holdout 2]

Protocol (../shared/data/README.md): SASRec's train_input.txt; per user the target is the last item
of the line and the trigger the one before; everything before the target is training data; Pre@K =
share of all 6,040 users whose target is in the trigger's top K (trigger excluded). ``--holdout 2``
scores the validation split instead (every user's last action dropped): choose settings there,
report them on the test split.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from bench._machine import describe
from jobs import baseline, evaluate, ingest, sequences
from jobs._cli import setup_logging
from ml.config import load_config
from ml.data.session import get_spark

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # NATM paper, Table 2 (ML-1M); only the cells the paper reports
    "POP (paper)": {"Pre@50": 0.1035},
    "GCN (paper)": {"Pre@50": 0.1457},
    "Bert4Rec (paper)": {"Pre@50": 0.1748},
    "GAT (paper)": {"Pre@50": 0.1909},
    "EGES (paper)": {"Pre@50": 0.2079},
    "NATM (paper)": {"Pre@1": 0.0127, "Pre@5": 0.0449, "Pre@50": 0.2402},
}
COOC_SETTINGS = [  # (label, window, symmetric, decay)
    ("cooc w1 dir", 1, False, False),
    ("cooc w1 sym", 1, True, False),
    ("cooc w3 dir decay", 3, False, True),
    ("cooc w5 dir decay", 5, False, True),
    ("cooc w10 dir decay", 10, False, True),
    ("cooc w3 sym", 3, True, False),
    ("cooc w3 sym decay", 3, True, True),
    ("cooc w5 sym decay", 5, True, True),
    ("cooc w10 sym decay", 10, True, True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-1m"))
    p.add_argument("--warehouse", default="/tmp/bench_ml1m")
    p.add_argument("--holdout", type=int, default=1, help="1: test split; 2: validation split")
    args = p.parse_args()
    setup_logging("WARNING")
    train = Path(args.data) / "train_input.txt"
    if not train.exists():
        raise SystemExit(f"ML-1M not found at {train}: pass --data")
    base = [f"warehouse={args.warehouse}", f"ingest.path={train}", f"sequences.holdout={args.holdout}"]
    cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", base)
    spark = get_spark(cfg.spark)
    t = time.time()
    ingest.run(cfg, spark)
    sequences.run(cfg, spark)
    print(f"ingest + sequences: {time.time() - t:.0f}s")
    ks = list(cfg.eval.ks)
    results = {}
    t = time.time()
    baseline.run(cfg, spark, "pop")
    results["pop"] = (evaluate.run(cfg, spark, ["pop"])["rows"], time.time() - t)
    for label, w, sym, decay in COOC_SETTINGS:
        c = load_config(ROOT / "conf" / "ml1m_natm.yaml",
                        base + [f"baseline.window={w}", f"baseline.symmetric={sym}", f"baseline.decay={decay}"])
        t = time.time()
        baseline.run(c, spark, "cooc")
        results[label] = (evaluate.run(c, spark, ["cooc"])["rows"], time.time() - t)
    cols = [f"Pre@{k}" for k in ks] + ["MRR"]
    split = "test" if args.holdout == 1 else f"validation (holdout {args.holdout})"
    n_users = next(iter(results.values()))[0][0]["n_users"]
    print(f"\nML-1M i2i, {split} split, {n_users:,} eval users, machine: {describe()}")
    print(f"{'method':<22}" + "".join(f"{c:>9}" for c in cols) + f"{'time':>8}")
    for label, (rows, secs) in results.items():
        vals = {(f"Pre@{r['k']}" if r["metric"] == "pre" else "MRR"): r["value"] for r in rows}
        print(f"{label:<22}" + "".join(f"{vals[c]:>9.4f}" for c in cols) + f"{secs:>7.0f}s")
    for label, vals in (PAPER.items() if args.holdout == 1 else ()):
        print(f"{label:<22}" + "".join(f"{vals[c]:>9.4f}" if c in vals else f"{'-':>9}" for c in cols))


if __name__ == "__main__":
    logging.getLogger("py4j").setLevel(logging.ERROR)
    main()

"""How much does the embedding's width limit a single-trigger i2i embedding on ML-1M? A neural bigram.

    python -m bench.ml1m_bigram [--dim 64] [--window 1] [--decay 1/d] [--cosine 10] [--steps 1440]

The id-vector core of NATM's directed towers without the neighbours: an input vector per trigger,
an output vector per candidate, trained with an exact softmax over all 3,416 items on the training
transitions (the trigger itself masked), scored as NATM scores — gamma * cos(in_a, out_b), what a
Faiss inner-product search over unit vectors serves — or, with ``--cosine 0``, by dot product plus
an item bias. ``--window W``: positives at distance d <= W too, each pair kept with probability
w(d) (1/d, 0.5^(d-1) or 1), as the co-occurrence window counts them. Validation split by default
(holdout 2), one seed; prints the six metrics and their sum, as ``bench.ml1m_i2i_ceiling``, whose
``Split`` it uses (ties to the more popular item, then the smaller id; all 6,040 users).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench._machine import describe
from bench.ml1m_i2i_ceiling import COLS, DECAYS, Split, load_sequences, neural_bigram

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-1m"))
    p.add_argument("--holdout", type=int, default=2, help="2 = validation (default), 1 = test")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--decay", choices=sorted(DECAYS), default="1/d")
    p.add_argument("--cosine", type=float, default=10.0, help="gamma of the cosine logits; 0 = dot + bias")
    p.add_argument("--steps", type=int, default=1440, help="1,440 x 4,096 = 6 epochs of the adjacent pairs")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    seqs = load_sequences(a.data)
    sp = Split(seqs, a.holdout)
    score, secs, n = neural_bigram(sp, a.dim, a.cosine, a.window, a.decay, a.steps, a.batch_size, a.lr, a.seed)
    m = sp.metrics(score)
    split = {1: "test", 2: "validation"}.get(a.holdout, f"holdout {a.holdout}")
    settings = {k: v for k, v in vars(a).items() if k != "data"}
    print(f"neural bigram, {split} split, {settings}; {n:,} pairs; train {secs:.0f} s "
          f"({torch.get_num_threads()} threads); machine: {describe()}")
    print("".join(f"{c:>9}" for c in COLS) + f"{'sum':>9}")
    print("".join(f"{m[c]:>9.4f}" for c in COLS) + f"{sum(m.values()):>9.4f}")


if __name__ == "__main__":
    main()

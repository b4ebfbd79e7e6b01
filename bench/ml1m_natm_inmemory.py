"""NATM on ML-1M in one process, for fast what-ifs: the graph in numpy, the exact-softmax loss, no Spark.

    python -m bench.ml1m_natm_inmemory [--holdout 2] [--epochs 1] [--graph dir5] [--separate-encoders]
        [--layers 1] [--lr 0.01] ...

The pipeline's path (bench.ml1m_natm) needs a warehouse per split and the reader; this one builds the
top-N neighbour table straight from ``train_input.txt`` (directed window 5 with 1/d decay, as the
``cooc`` baseline of conf/ml1m_natm.yaml, or symmetric window 3, as its NATM graph), trains
:class:`ml.models.natm.NATM` on every adjacent pair of the training sequences with
``NATM.full_softmax_loss`` (``natm.loss=full``: each trigger against all 3,416 items), then scores
the trigger embedding against every item by cosine, trigger excluded, over all 6,040 users, and
prints the difference from the counts (directed window 5, 1/d, the same scorer) user by user, with
95 % intervals and p-values (:func:`ml.eval.offline.paired_ranks`, as the evaluation job's
``metrics_paired``). The default split is validation (holdout 2: target = second-last item), where
settings are chosen.
No item categories (the pipeline adds them); one seed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench._machine import describe
from bench.ml1m_i2i_ceiling import COLS, KS, Split, load_sequences
from ml.eval.offline import p_text, paired_ranks
from ml.models.natm import NATM, NATMConfig, build_neighbor_table
from ml.train.loop import autocast_dtype

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = {"dir5": dict(W=5, decay="1/d", sym=False), "sym3": dict(W=3, decay="none", sym=True),
          "dir1": dict(W=1, decay="none", sym=False)}


def neighbour_table(sp: Split, graph: str, n: int):
    g = GRAPHS[graph]
    w = sp.window(g["W"], g["decay"], 1.0 if g["sym"] else 0.0)
    np.fill_diagonal(w, 0.0)
    w[0, :] = w[:, 0] = 0.0  # id 0 is not an item
    # heaviest n per row; ties to the smaller neighbour id (a stable sort of -weight)
    order = np.argsort(-w, axis=1, kind="stable")[:, :n]
    weight = np.take_along_axis(w, order, axis=1)
    item = np.repeat(np.arange(sp.V), n)
    keep = (weight.reshape(-1) > 0) & (item > 0)
    rank = np.tile(np.arange(1, n + 1), sp.V)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x.reshape(-1)[keep]))  # noqa: E731
    return build_neighbor_table(sp.V - 1, t(item), t(order), t(weight), t(rank), n, 16)


def train(sp: Split, a) -> tuple[NATM, float]:
    torch.manual_seed(a.seed)
    cfg = NATMConfig(num_items=sp.V - 1, num_neighbors=a.neighbors, dim=a.dim, layers=a.layers, heads=4,
                     gamma=a.gamma, dropout=a.dropout, mlm_weight=0.0, loss="full",
                     separate_encoders=a.separate_encoders, item_bias=a.item_bias,
                     residual=a.residual, neighbor_pointer=a.neighbor_pointer)
    model = NATM(cfg, neighbour_table(sp, a.graph, a.neighbors) if a.neighbors else
                 build_neighbor_table(sp.V - 1, *(torch.tensor([]),) * 4, 0, 16))
    x, y = map(torch.from_numpy, sp.pairs(1))
    x, y = x[x != y], y[x != y]
    steps = max(1, int(a.epochs * len(x) / a.batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(  # 20 warm-up steps, then cosine to 0, as the pipeline's loop
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(a.seed)
    bf16 = autocast_dtype("bf16" if a.bf16 else "off", torch.device("cpu"), warn=True) is not None
    model.train()
    t0, step = time.time(), 0
    with tqdm(total=steps, desc="NATM full softmax", mininterval=10) as bar:
        while step < steps:
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x) - a.batch_size + 1, a.batch_size):
                if step == steps:
                    break
                b = perm[i:i + a.batch_size]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model.full_softmax_loss(x[b], y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval(), time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-1m"))
    p.add_argument("--holdout", type=int, default=2, help="2 = validation (default), 1 = test")
    p.add_argument("--graph", choices=sorted(GRAPHS), default="dir5")
    p.add_argument("--neighbors", type=int, default=9)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--gamma", type=float, default=10.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--separate-encoders", action="store_true")
    p.add_argument("--item-bias", action="store_true", help="natm.item_bias: a popularity coordinate")
    p.add_argument("--residual", action="store_true", help="natm.residual: r = x_item + MLP (layers 0)")
    p.add_argument("--neighbor-pointer", action="store_true",
                   help="natm.neighbor_pointer: the trigger vector plus weighted candidate vectors of its neighbours")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast in training, as train.amp=bf16 (fp32 on a CPU without native bf16); "
                        "the embeddings are scored in fp32")
    p.add_argument("--ensemble", type=int, default=1,
                   help="N models from seeds seed..seed+N-1, scored by the mean cosine: one embedding of N*dim "
                        "(the models' unit vectors side by side, divided by sqrt(N))")
    a = p.parse_args()
    seqs = load_sequences(a.data)
    sp = Split(seqs, a.holdout)
    score, secs = np.full((sp.V, sp.V), -np.inf), 0.0
    score[1:, 1:] = 0.0
    for seed in range(a.seed, a.seed + a.ensemble):  # --ensemble N: the mean of N models' cosines
        model, took = train(sp, argparse.Namespace(**{**vars(a), "seed": seed}))
        secs += took
        with torch.no_grad():
            items = torch.arange(1, sp.V)
            t, c = model.encode(items, "trigger"), model.encode(items, "candidate")
            score[1:, 1:] += (t @ c.T).numpy() / a.ensemble
    m = sp.metrics(score)
    split = {1: "test", 2: "validation"}.get(a.holdout, f"holdout {a.holdout}")
    settings = {k: v for k, v in vars(a).items() if k not in ("data",)}
    print(f"NATM in-memory, {split} split, {settings}; train {secs:.0f} s; machine: {describe()}")
    print("".join(f"{c:>9}" for c in COLS) + f"{'sum':>9}")
    print("".join(f"{m[c]:>9.4f}" for c in COLS) + f"{sum(m.values()):>9.4f}")
    # against the counts (the cooc baseline's graph: directed window 5, 1/d) on the same users, paired
    cooc = sp.window(5, "1/d")
    in_list = lambda r: np.where(r <= 100, r, 0)  # noqa: E731  (lists of 100, as the pipeline's)
    paired = paired_ranks(in_list(sp.ranks(score)), in_list(sp.ranks(cooc)), KS)
    print(f"vs cooc w5 directed 1/d (same scorer), paired over {len(sp.target):,} users:")
    print(f"{'':>9}" + "".join(f"{c:>19}" for c in COLS))
    for key, fmt in (("baseline_value", "{:>19.4f}"), ("diff", "{:>+19.4f}")):
        print(f"{'cooc' if key == 'baseline_value' else 'diff':>9}" + "".join(fmt.format(paired[c][key]) for c in COLS))
    intervals = [f"[{paired[c]['ci_low']:+.4f},{paired[c]['ci_high']:+.4f}]" for c in COLS]
    print(f"{'95 %':>9}" + "".join(f"{x:>19}" for x in intervals))
    print(f"{'p':>9}" + "".join(f"{p_text(paired[c]['p_value']):>19}" for c in COLS))


if __name__ == "__main__":
    main()

"""DAT vs two-tower vs POP on ML-1M, user-to-item (u2i): HR@50, HR@100, MRR and per-genre HR@100.

    python -m bench.ml1m_dat --warehouse /tmp/wh_ml [--seeds 1 2 3] [--ablations] [--amp off bf16]
        [--set train.epochs=1 ...]

Needs the warehouse of conf/ml1m_natm.yaml through the graph and samples jobs (POP ranks by
``item_counts``; the tables are read before any training, so a missing one stops the bench at
once). Every model trains with conf/ml1m_dat.yaml's settings (the two-tower with ``model=two_tower``, as conf/ml1m_two_tower.yaml), on
samples_dat (training data only); the query is the user tower, the target the user's held-out
last item, candidates every item (the user's training items are not removed, the same for all).
With several ``--seeds`` every model trains once per seed (initialisation and data order change)
and the table gives each seed's row, the mean and standard deviation, and DAT's gain over the
two-tower per seed (paired: same seed, same data order), since one run's difference is noise-sized.
With several ``--amp`` settings every model also trains once per setting (``train.amp``), the
settings alternating within each seed, and the table gives each setting's training time and
figures side by side (the config's own setting when the flag is absent).
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
from ml.train.dat_task import embed, load_dat_artifact
from ml.train.tables import read_columns

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "ml1m_dat.yaml"  # DAT's schedule; the two-tower is the same config with model=two_tower
KS = (10, 50, 100)


def u2i(cfg, artifact: str):
    model, users, items = load_dat_artifact(artifact)
    uv = embed(model, torch.arange(1, users.size + 1), "user")
    iv = embed(model, torch.arange(1, items.size + 1), "item")
    t = read_columns(cfg.table_path("eval_targets"), ["user_id", "target_item"])
    u = users.index(torch.from_numpy(t.column("user_id").to_numpy().copy()))
    target = t.column("target_item").to_numpy()
    index = build_index(iv.numpy(), kind="flat", use_gpu=False)
    pos, _ = search_topk(index, uv[u - 1].numpy(), None, 100)
    return pos, items, target


def with_amp(variants: dict, amps: list) -> dict:
    """The variants once per ``train.amp`` setting, named "model setting" when there are several
    (one setting: the same names with it set; ``[None]``: the variants unchanged)."""
    if len(amps) > 1:
        return {f"{m} {amp}": [*over, f"train.amp={amp}"] for m, over in variants.items() for amp in amps}
    if amps[0] is not None:
        return {m: [*over, f"train.amp={amps[0]}"] for m, over in variants.items()}
    return dict(variants)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warehouse", default="/tmp/wh_ml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--ablations", action="store_true", help="also DAT with AMM only and with CAL only")
    p.add_argument("--seeds", nargs="+", type=int, default=[None], help="train every model once per seed (default: config's)")
    p.add_argument("--amp", nargs="+", choices=["auto", "bf16", "off"], default=[None],
                   help="train every model once per train.amp setting (default: the config's)")
    a = p.parse_args()
    setup_logging("WARNING")
    cats = read_columns(str(Path(a.warehouse) / "items"), ["item_id", "category_name"]).to_pydict()
    counts = read_columns(str(Path(a.warehouse) / "item_counts"), ["item_id", "count"]).to_pydict()
    cat_of = dict(zip(cats["item_id"], cats["category_name"]))
    results = {}  # model -> [(metrics, seconds, topk) per seed]
    variants = {"two_tower": ["model=two_tower"], "dat": ["model=dat"]}
    if a.ablations:  # the paper's ablations: each half of DAT alone
        variants.update({"dat AMM only": ["model=dat", "dat.use_cal=false"],
                         "dat CAL only": ["model=dat", "dat.use_amm=false"]})
    variants = with_amp(variants, a.amp)
    for seed in a.seeds:
        for model, over in variants.items():
            cfg = load_config(CONF, [f"warehouse={a.warehouse}", *over, "train.log_every=1000000",
                                     *([f"seed={seed}"] if seed is not None else []), *a.overrides])
            t = time.time()
            res = train_job.run(cfg)
            secs = time.time() - t
            pos, items, target = u2i(cfg, str(Path(train_job.model_dir(cfg)) / "model.pt"))
            topk = items.ids.numpy()[pos]
            results.setdefault(model, []).append((hit_metrics(topk, target, KS), secs, topk))
            print(f"seed {seed} {model} ({res['precision']}): HR@100 {results[model][-1][0]['Pre@100']:.4f} "
                  f"({secs:.0f}s)", flush=True)
    order = np.lexsort((np.array(counts["item_id"]), -np.array(counts["count"])))
    pop = np.tile(np.array(counts["item_id"])[order][:100], (len(target), 1))
    results["pop"] = [(hit_metrics(pop, target, KS), 0.0, pop)]
    cols = [f"Pre@{k}" for k in KS] + ["MRR"]
    print(f"ML-1M u2i, {len(target)} users, seeds {a.seeds}, train.amp {a.amp}; machine: {describe()}")
    print(f"{'model':<22}" + "".join(f"{'HR@' + str(k):>9}" for k in KS) + f"{'MRR':>9}{'train':>8}")
    for m, runs in results.items():
        for seed, (vals, secs, _) in zip(a.seeds, runs):
            label = m if len(runs) == 1 else f"{m} (seed {seed})"
            print(f"{label:<22}" + "".join(f"{vals[c]:>9.4f}" for c in cols) + f"{secs:>7.0f}s")
        if len(runs) > 1:
            mean = {c: np.mean([r[0][c] for r in runs]) for c in cols}
            std = {c: np.std([r[0][c] for r in runs], ddof=1) for c in cols}
            print(f"{m + ' mean':<22}" + "".join(f"{mean[c]:>9.4f}" for c in cols))
            print(f"{m + ' std':<22}" + "".join(f"{std[c]:>9.4f}" for c in cols))
    if len(a.amp) > 1:  # each setting's training time against the first's, model by model, seed by seed
        for m in variants:
            base = f"{m.rsplit(' ', 1)[0]} {a.amp[0]}"
            if m != base:
                ratio = np.array([b[1] / r[1] for r, b in zip(results[m], results[base])])
                print(f"{m} vs {base}, training time per seed: " + " ".join(f"{x:.2f}x faster" for x in ratio)
                      + f"; mean {ratio.mean():.2f}x")
    if len(a.seeds) > 1:
        for m in [m for m in results if m.startswith("dat")]:
            tt = "two_tower" + (f" {m.rsplit(' ', 1)[1]}" if len(a.amp) > 1 else "")  # the same setting's two-tower
            gains = [d[0]["Pre@100"] / t[0]["Pre@100"] - 1 for d, t in zip(results[m], results[tt])]
            diff = np.array([d[0]["Pre@100"] - t[0]["Pre@100"] for d, t in zip(results[m], results[tt])])
            t_stat = diff.mean() / (diff.std(ddof=1) / np.sqrt(len(diff))) if diff.std(ddof=1) > 0 else float("nan")
            print(f"{m} vs {tt}, HR@100 per seed: " + " ".join(f"{g:+.1%}" for g in gains)
                  + f"; mean {np.mean(gains):+.1%}; paired t {t_stat:.2f} on {len(diff) - 1} degrees of freedom")
    genres = sorted({cat_of.get(int(x)) for x in target if cat_of.get(int(x))})
    print("per-genre HR@100, mean over seeds (target's primary genre; users):")
    for g in sorted(genres, key=lambda g: sum(cat_of.get(int(x)) == g for x in target)):
        mask = np.array([cat_of.get(int(x)) == g for x in target])
        row = "  ".join(f"{m} {np.mean([(r[2][mask] == target[mask, None]).any(1).mean() for r in runs]):.3f}"
                        for m, runs in results.items())
        print(f"  {g:<12} ({mask.sum():>4})  {row}")


if __name__ == "__main__":
    main()

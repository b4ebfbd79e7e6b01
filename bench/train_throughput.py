"""Training-loop throughput: Delta reader -> DDP vs the same model fed from in-memory tensors.

    python -m bench.train_throughput --warehouse /tmp/wh_ml [--steps 150] [--procs 1 2]
    python -m bench.train_throughput --warehouse /tmp/wh_ml --procs 1 --amp off bf16 [--repeats 2]

Needs a warehouse with samples_natm, item_graph, noise_q, items (run the pipeline + samples job).
Both paths train the same NATM config for the same number of steps with the same training loop
(ml.train.loop.train), one after the other in this run; the figure of merit is the ratio
reader / in-memory samples/s (goal >= 0.7: the data path is not the bottleneck).

With ``--amp``, the reader path (the pipeline's) is timed under each ``train.amp`` setting instead,
the settings alternating ``--repeats`` times, and the ratio of each to the first is printed
(bf16 vs fp32 on the same box in one run).
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _worker(rank: int, world: int, port: int, wh: str, path: str, steps: int, overrides: list, out_dir: str,
            tag: str = "") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from ml.config import load_config
    from ml.train.distributed import cleanup, init_distributed
    from ml.train.loop import train
    from ml.train.natm_task import SAMPLE_COLUMNS, NATMTrainer, build_natm, natm_batches
    from ml.train.tables import read_columns

    cfg = load_config(ROOT / "conf" / "ml1m_natm.yaml", [f"warehouse={wh}", f"train.max_steps={steps}",
                                                         "train.log_every=1000000", "train.checkpoint_every=1000000",
                                                         *overrides])
    ctx = init_distributed("cpu")
    model, vocab = build_natm(cfg)
    if path == "reader":
        make, _ = natm_batches(cfg, vocab, ctx.rank, ctx.world_size)
    else:  # the same rows, loaded into memory up front, this rank's share, fixed batches
        t = read_columns(cfg.table_path("samples_natm"), SAMPLE_COLUMNS)
        n = t.num_rows // world
        t = t.slice(rank * n, n)
        trig = vocab.index(torch.from_numpy(t.column("trigger_item").to_numpy().copy()))
        pos = vocab.index(torch.from_numpy(t.column("positive_item").to_numpy().copy()))
        neg = vocab.index(torch.tensor(t.column("negatives").to_pylist()))
        qp = torch.from_numpy(t.column("q_positive").to_numpy().copy()).float()
        qn = torch.tensor(t.column("q_negatives").to_pylist()).float()
        B = cfg.train.batch_size

        def make(epoch: int):
            g = torch.Generator().manual_seed(epoch)
            perm = torch.randperm(len(trig), generator=g)
            for i in range(0, len(perm) - B + 1, B):
                j = perm[i:i + B]
                yield {"trigger": trig[j], "positive": pos[j], "negatives": neg[j], "q_positive": qp[j],
                       "q_negatives": qn[j]}
    res = train(NATMTrainer(model, cfg.samples.num_negatives), make, lambda m, b: m(b), cfg.train, ctx,
                tempfile.mkdtemp(), seed=cfg.seed)
    if ctx.is_main:
        with open(os.path.join(out_dir, f"{path}-{world}{tag}.txt"), "w") as f:
            f.write(f"{res['samples_per_s']} {res['precision']}")
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warehouse", default="/tmp/wh_ml")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--amp", nargs="+", choices=["off", "auto", "bf16"],
                   help="time the reader path under these train.amp settings instead (e.g. off bf16)")
    p.add_argument("--repeats", type=int, default=2, help="with --amp: runs of each setting, alternating")
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats {a.repeats}: must be >= 1")
    from bench._machine import describe

    out = tempfile.mkdtemp()
    print(f"machine: {describe()}; torch {torch.__version__}; {a.steps} steps per run")
    if a.amp:
        for world in a.procs:
            runs: dict = {amp: [] for amp in a.amp}
            for rep in range(a.repeats):
                for amp in a.amp:
                    t, tag = time.time(), f"-{amp}-{rep}"
                    mp.spawn(_worker, args=(world, _free_port(), a.warehouse, "reader", a.steps,
                                            [*a.overrides, f"train.amp={amp}"], out, tag), nprocs=world)
                    rate, precision = open(os.path.join(out, f"reader-{world}{tag}.txt")).read().split()
                    runs[amp].append(float(rate))
                    print(f"  {world} proc(s), train.amp={amp} ({precision}): {float(rate):8.0f} samples/s "
                          f"({time.time() - t:.0f}s wall)", flush=True)
            base = sum(runs[a.amp[0]]) / len(runs[a.amp[0]])
            print(f"{world} proc(s): " + ", ".join(
                f"train.amp={amp} {sum(r) / len(r):.0f} samples/s ({sum(r) / len(r) / base:.2f}x)" for amp, r in runs.items()))
        return
    for world in a.procs:
        figures = {}
        for path in ("memory", "reader"):
            t = time.time()
            mp.spawn(_worker, args=(world, _free_port(), a.warehouse, path, a.steps, a.overrides, out), nprocs=world)
            figures[path] = float(open(os.path.join(out, f"{path}-{world}.txt")).read().split()[0])
            print(f"  {world} proc(s), {path:<6}: {figures[path]:8.0f} samples/s  ({time.time() - t:.0f}s wall)",
                  flush=True)
        print(f"{world} proc(s): reader / in-memory = {figures['reader'] / figures['memory']:.2f}")


if __name__ == "__main__":
    main()

"""Training loop, checkpoints, exact resume, a real 2-process gloo DDP run and deferred init."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ml.config import ConfigError, TrainConfig
from ml.errors import InvalidInput
from ml.train import checkpoint as checkpoint_module
from ml.train.checkpoint import (capture_rng_state, checkpoint_name, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, save_checkpoint)
from ml.train.distributed import DistContext, cleanup, init_distributed, launch, torchrun_command
from ml.train.init import build_deferred
from ml.train.loop import lr_multiplier, train
from tests.conftest import ROOT

CPU = DistContext()  # rank 0 of a 1-process world on the CPU


def regression_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return x, x @ w + 0.01 * torch.randn(n, 1, generator=g)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0):
    """make_batches(epoch): a different but reproducible order each epoch."""
    def make(epoch: int):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            yield {"x": x[idx], "y": y[idx]}
    return make


def mse_loss(model: nn.Module, batch: dict):
    pred = model(batch["x"])
    return nn.functional.mse_loss(pred, batch["y"]), {"mae": (pred - batch["y"]).abs().mean()}


def mlp(seed: int, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 1))


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        out = nn.functional.mse_loss(model(x), y).item()
    model.train()
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_single_process_regression_loss_falls(tmp_path):
    x, y = regression_data(240)
    model = nn.Linear(8, 1)
    before = full_loss(model, x, y)
    cfg = TrainConfig(epochs=8, batch_size=16, lr=0.05, log_every=5, checkpoint_every=1000,
                      device="cpu", amp=False)
    metrics = tmp_path / "metrics.jsonl"
    res = train(model, shuffled_batches(x, y, 16), mse_loss, cfg, CPU, str(tmp_path / "ckpt"),
                metrics_path=str(metrics))
    after = full_loss(model, x, y)
    assert after < 0.01 * before
    assert res["steps"] == 8 * 15 and res["epochs"] == 8
    assert res["final_loss"] < 0.01 * before and res["samples_per_s"] > 0
    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "step"]
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(5, 121, 5))
    assert len(epochs) == 8 and epochs[-1]["step"] == 120
    expected_keys = {"loss", "lr", "mae", "grad_norm", "epoch", "samples_per_s", "elapsed_s", "time"}
    assert expected_keys <= steps[0].keys()
    # one checkpoint per epoch end, the newest 3 kept
    assert [Path(p).name for p in list_checkpoints(str(tmp_path / "ckpt"))] == \
        [checkpoint_name(s) for s in (90, 105, 120)]


def test_max_steps_stops_and_writes_final_checkpoint(tmp_path):
    x, y = regression_data(64)
    cfg = TrainConfig(epochs=5, max_steps=7, batch_size=16, checkpoint_every=100, device="cpu", amp=False)
    res = train(nn.Linear(8, 1), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, str(tmp_path))
    assert res["steps"] == 7 and res["epochs"] == 1
    state = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == (7, 1, 3)


def test_a_resume_in_another_precision_says_so(tmp_path, monkeypatch, caplog):
    # train.amp=auto resolves per device: a CPU run in fp32 continued on a bf16 GPU changed precision
    # without a word
    from ml.train import loop

    x, y = regression_data(64)
    cfg = TrainConfig(epochs=2, max_steps=3, batch_size=16, checkpoint_every=100, device="cpu", amp="auto")
    monkeypatch.setattr(loop, "autocast_dtype", lambda *a, **k: None)
    train(nn.Linear(8, 1), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, str(tmp_path))
    assert load_checkpoint(latest_checkpoint(str(tmp_path)))["extra"]["precision"] == "fp32"
    more = dataclasses.replace(cfg, max_steps=5)
    with caplog.at_level("WARNING", logger=loop.logger.name):
        train(nn.Linear(8, 1), shuffled_batches(x, y, 16), mse_loss, more, CPU, str(tmp_path), resume=True)
    assert "was trained in" not in caplog.text  # the same precision: nothing to say
    monkeypatch.setattr(loop, "autocast_dtype", lambda *a, **k: torch.bfloat16)
    with caplog.at_level("WARNING", logger=loop.logger.name):
        res = train(nn.Linear(8, 1), shuffled_batches(x, y, 16), mse_loss, dataclasses.replace(cfg, max_steps=7),
                    CPU, str(tmp_path), resume=True)
    assert res["precision"] == "bf16" and "was trained in fp32 and continues in bf16 (train.amp=auto on cpu)" in caplog.text


# crash in the loss of step `crash_at`; the newest checkpoint is then mid-epoch 0 or mid-epoch 1
@pytest.mark.parametrize("crash_at,resume_step,resume_pos", [(11, 8, (0, 8)), (23, 20, (1, 5))])
def test_killed_run_resumes_bit_identical(tmp_path, crash_at, resume_step, resume_pos):
    x, y = regression_data(240)
    make = shuffled_batches(x, y, 16, seed=3)  # 15 batches per epoch
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, optimizer="adamw", weight_decay=0.01,
                      lr_schedule="cosine", warmup_steps=3, grad_clip=0.5, checkpoint_every=4,
                      log_every=5, device="cpu", amp=False)
    kw = dict(seed=7, steps_per_epoch=15)

    uninterrupted = mlp(0)
    metrics_a = tmp_path / "a_metrics.jsonl"
    res_a = train(uninterrupted, make, mse_loss, cfg, CPU, str(tmp_path / "a"), metrics_path=str(metrics_a), **kw)
    assert res_a["steps"] == 30

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("simulated crash")
        return mse_loss(model, batch)

    metrics = tmp_path / "b_metrics.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(mlp(0), make, crashing_loss, cfg, CPU, str(tmp_path / "b"), metrics_path=str(metrics), **kw)
    state = load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    assert (state["step"], (state["epoch"], state["batches_done_in_epoch"])) == (resume_step, resume_pos)

    def counted_loss(model, batch):
        calls["n"] += 1
        return mse_loss(model, batch)

    calls["n"] = 0
    # a save killed mid-write left its temporary file: the next run removes it
    (tmp_path / "b" / ".ckpt-killed.tmp").write_bytes(b"half a checkpoint")
    resumed = mlp(123)  # different init: the weights must come from the checkpoint
    res_b = train(resumed, make, counted_loss, cfg, CPU, str(tmp_path / "b"), resume=True, metrics_path=str(metrics),
                  **kw)
    assert calls["n"] == 30 - resume_step
    # the crashed run's records after its checkpoint are dropped: each step is logged once, in order
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps == list(range(5, 31, 5))

    # and they are the uninterrupted run's records: each step record averages the same steps, and the
    # resumed epoch's record its every step (before, only those since the resume), to the same bits
    def records(path):
        timing = {"run", "elapsed_s", "time", "samples_per_s"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]

    assert records(metrics) == records(metrics_a)
    assert [r["event"] for r in records(metrics)].count("epoch") == 2
    # a resume that finds no checkpoint starts over, and so does its metrics file
    train(mlp(0), make, mse_loss, cfg, CPU, str(tmp_path / "empty"), resume=True, metrics_path=str(metrics), **kw)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps == list(range(5, 31, 5))
    assert res_b["steps"] == 30 and res_b["epochs"] == 2
    assert not list((tmp_path / "b").glob(".ckpt-*.tmp"))
    assert_same_weights(uninterrupted.state_dict(), resumed.state_dict())
    assert res_b["final_loss"] == res_a["final_loss"]


# a stop by train.max_steps between checkpoints (10) and at one (8); the model has dropout, so the
# resumed run matches only if its RNG goes on as a run never stopped would
@pytest.mark.parametrize("stop_at", [10, 8])
def test_a_run_stopped_by_max_steps_and_resumed_longer_is_the_run_never_stopped(tmp_path, stop_at):
    x, y = regression_data(240)
    make = shuffled_batches(x, y, 16, seed=3)  # 15 batches per epoch
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, checkpoint_every=4, log_every=3, device="cpu", amp=False)
    whole = mlp(0)
    metrics_a, metrics_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    res_a = train(whole, make, mse_loss, cfg, CPU, str(tmp_path / "a"), seed=7, metrics_path=str(metrics_a))
    stopped = mlp(0)
    res = train(stopped, make, mse_loss, dataclasses.replace(cfg, max_steps=stop_at), CPU, str(tmp_path / "b"),
                seed=7, metrics_path=str(metrics_b))
    assert res["steps"] == stop_at
    resumed = mlp(5)
    res_b = train(resumed, make, mse_loss, cfg, CPU, str(tmp_path / "b"), seed=7, resume=True,
                  metrics_path=str(metrics_b))
    assert res_b["steps"] == res_a["steps"] == 30
    assert_same_weights(whole.state_dict(), resumed.state_dict())

    def records(path):
        timing = {"run", "elapsed_s", "time", "samples_per_s"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in path.read_text().splitlines()]

    # the stopped epoch's partial record stays; the others are the uninterrupted run's
    assert [r for r in records(metrics_b) if r.get("complete") is not False] == records(metrics_a)


def test_a_new_run_never_resumes_an_earlier_runs_checkpoint(tmp_path):
    # Before: a finished 4-epoch run left ckpt-45..60; a new 2-epoch run's checkpoints (steps 4..28)
    # were pruned as soon as written (the newest 3 by step were the old run's), and --resume after
    # its crash handed back the 4-epoch model. Now a run without resume starts over, and a resume
    # from a checkpoint written with other settings is refused, naming them.
    x, y = regression_data(240)
    make = shuffled_batches(x, y, 16, seed=3)
    ckpt = str(tmp_path / "ck")
    base = dict(batch_size=16, lr=0.01, lr_schedule="cosine", checkpoint_every=4, device="cpu", amp=False)
    long_cfg, short_cfg = TrainConfig(epochs=4, **base), TrainConfig(epochs=2, **base)
    kw = dict(seed=7, steps_per_epoch=15)
    train(mlp(0), make, mse_loss, long_cfg, CPU, ckpt, settings={"lr": 0.01, "data": 1}, **kw)
    assert Path(latest_checkpoint(ckpt)).name == checkpoint_name(60)

    uninterrupted = mlp(0)
    train(uninterrupted, make, mse_loss, short_cfg, CPU, str(tmp_path / "ref"), settings={"lr": 0.01, "data": 2}, **kw)
    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("simulated crash")
        return mse_loss(model, batch)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(mlp(0), make, crashing_loss, short_cfg, CPU, ckpt, settings={"lr": 0.01, "data": 2}, **kw)
    assert [Path(p).name for p in list_checkpoints(ckpt)] == [checkpoint_name(s) for s in (4, 8)]
    with pytest.raises(ValueError, match=r"other settings \(data: checkpoint 2, this run 3\)"):
        train(mlp(1), make, mse_loss, short_cfg, CPU, ckpt, resume=True, settings={"lr": 0.01, "data": 3}, **kw)
    # the same settings, tensors of other shapes (a checkpoint of an earlier version of the code, whose
    # vocabulary held more items): refused as a user error naming the tensor, not torch's RuntimeError
    wider = nn.Sequential(nn.Linear(8, 33), nn.ReLU(), nn.Dropout(0.2), nn.Linear(33, 1))
    with pytest.raises(InvalidInput, match=r"cannot resume from .*: its tensors have other shapes than this "
                                           r"run's model \(size mismatch for 0.weight.*Run without --resume"):
        train(wider, make, mse_loss, short_cfg, CPU, ckpt, resume=True, settings={"lr": 0.01, "data": 2}, **kw)
    resumed = mlp(123)
    res = train(resumed, make, mse_loss, short_cfg, CPU, ckpt, resume=True, settings={"lr": 0.01, "data": 2}, **kw)
    assert res["steps"] == 30
    assert_same_weights(uninterrupted.state_dict(), resumed.state_dict())


def test_a_checkpoint_of_another_warehouse_is_not_cleared_and_an_older_one_still_resumes(tmp_path):
    # one train.checkpoint_dir for the test and the validation warehouses: a run in the second, which
    # cannot continue the first's killed run, deleted its checkpoints when it started over
    x, y = regression_data(240)
    make = shuffled_batches(x, y, 16, seed=3)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, checkpoint_every=4, device="cpu", amp=False)
    ckpt = str(tmp_path / "ck")
    test_wh = {"lr": 0.01, "warehouse": "/data/test_wh", "table ids": {"noise_q": "a"}}
    train(mlp(0), make, mse_loss, dataclasses.replace(cfg, max_steps=8), CPU, ckpt, seed=7, settings=test_wh)
    kept = list_checkpoints(ckpt)
    assert kept
    with pytest.raises(InvalidInput, match=r"holds checkpoints of a training in another warehouse \(/data/test_wh; "
                                           r"this run's: /data/val_wh\).*its own train.checkpoint_dir"):
        train(mlp(0), make, mse_loss, cfg, CPU, ckpt, seed=7, settings={**test_wh, "warehouse": "/data/val_wh"})
    assert list_checkpoints(ckpt) == kept
    # another table id in the same warehouse: resuming is refused, naming it
    with pytest.raises(ValueError, match=r"other settings \(table ids: checkpoint \{'noise_q': 'a'\}, this run "
                                         r"\{'noise_q': 'b'\}\)"):
        train(mlp(0), make, mse_loss, cfg, CPU, ckpt, seed=7, resume=True,
              settings={**test_wh, "table ids": {"noise_q": "b"}})
    # a checkpoint written before the warehouse and table ids were recorded resumes as it did
    old = str(tmp_path / "old")
    train(mlp(0), make, mse_loss, dataclasses.replace(cfg, max_steps=8), CPU, old, seed=7, settings={"lr": 0.01})
    assert train(mlp(0), make, mse_loss, cfg, CPU, old, seed=7, resume=True, settings=test_wh)["steps"] == 30


def test_resume_reads_the_checkpoint_on_the_cpu_and_restores_rng_states_held_on_a_device(tmp_path, monkeypatch):
    # Before, the loop read the checkpoint with map_location=<the training device>: on a GPU the
    # numpy RNG key tensor came back on it, and restoring it raised ("can't convert cuda:0 device
    # type tensor to numpy"), so every --resume on CUDA failed.
    from ml.train import loop
    from ml.train.checkpoint import read_checkpoint, restore_rng_state

    x, y = regression_data(64)
    cfg = TrainConfig(epochs=2, batch_size=16, checkpoint_every=2, device="cpu", amp=False)
    ckpt = str(tmp_path / "ck")
    train(mlp(0), shuffled_batches(x, y, 16), mse_loss, dataclasses.replace(cfg, max_steps=3), CPU, ckpt)
    seen = []

    def recording_read(path, map_location="cpu", **kw):
        seen.append(map_location)
        return read_checkpoint(path, map_location, **kw)

    monkeypatch.setattr(loop, "read_checkpoint", recording_read)
    assert train(mlp(1), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, ckpt, resume=True)["steps"] == 8
    assert seen == ["cpu"]  # load_state_dict moves the weights and optimizer state to the model's device

    class OnDevice:
        """A tensor on a device numpy cannot read (CUDA here): .numpy() raises, .cpu() copies it."""

        def __init__(self, t):
            self.t = t

        def numpy(self):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def cpu(self):
            return self.t

    np.random.seed(3)
    state = capture_rng_state()
    expected = np.random.rand(3)
    state["numpy"]["keys"] = OnDevice(state["numpy"]["keys"])
    state["torch"] = OnDevice(state["torch"])
    np.random.seed(4)
    restore_rng_state(state)
    assert np.array_equal(np.random.rand(3), expected)


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    # Before it was only logged: each rank skipped its count of batches of a deal made for another
    # world size (a 2-rank run resumed by 1 process trained 3202 of 10000 rows twice, 202 never).
    x, y = regression_data(64)
    cfg = TrainConfig(epochs=1, batch_size=16, checkpoint_every=2, device="cpu", amp=False)
    ckpt = str(tmp_path / "ck")
    save_checkpoint(ckpt, model=mlp(0), step=2, epoch=0, batches_done_in_epoch=2, extra={"world_size": 2})
    with pytest.raises(ValueError, match=r"written by 2 training processes, this run has 1 \(train.num_processes"):
        train(mlp(0), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, ckpt, resume=True)
    save_checkpoint(ckpt, model=mlp(0), step=3, epoch=0, batches_done_in_epoch=3, extra={"world_size": 1})
    assert train(mlp(0), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, ckpt, resume=True)["steps"] == 4


# ---------------------------------------------------------------- 2-process DDP (gloo)

DDP_BATCHES = {0: 7, 1: 4}  # uneven on purpose: rank 1 runs out first and must Join
DDP_BS = 8


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import faulthandler

    faulthandler.enable()  # a C++ abort (SIGABRT) prints where each thread was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout=timedelta(seconds=60))
    try:
        assert (ctx.rank, ctx.world_size, ctx.is_main) == (rank, world, rank == 0)
        x, y = regression_data(DDP_BS * sum(DDP_BATCHES.values()), seed=1)
        start = DDP_BS * sum(DDP_BATCHES[r] for r in range(rank))
        xs, ys = x[start:start + DDP_BS * DDP_BATCHES[rank]], y[start:start + DDP_BS * DDP_BATCHES[rank]]
        cfg = TrainConfig(epochs=3, batch_size=DDP_BS, lr=0.01, checkpoint_every=3, log_every=2,
                          device="cpu", amp=False)
        make = shuffled_batches(xs, ys, DDP_BS, seed=rank)
        a, b = os.path.join(out, "a"), os.path.join(out, "b")

        model = mlp(100 + rank)  # different init per rank: DDP must start from rank 0's
        before = full_loss(model, x, y)
        res = train(model, make, mse_loss, cfg, ctx, a, seed=5, metrics_path=os.path.join(out, "m.jsonl"),
                    keep_checkpoints=None)
        after = full_loss(model, x, y)
        torch.save(model.state_dict(), os.path.join(out, f"a{rank}.pt"))

        # a run "killed" right after the step-12 checkpoint: rank 0 is 5 batches into epoch 1,
        # rank 1 has already joined (4 batches); then resumed
        dist.barrier()
        if rank == 0:
            os.makedirs(b)
            shutil.copy(os.path.join(a, checkpoint_name(12)), b)
        dist.barrier()
        resumed = mlp(999 + rank)
        res_b = train(resumed, make, mse_loss, cfg, ctx, b, resume=True, seed=5)
        torch.save(resumed.state_dict(), os.path.join(out, f"b{rank}.pt"))
        # stopped by train.max_steps at step 10 (no checkpoint step; both ranks mid-epoch 1), then run
        # to the end: each rank's dropout masks go on as in the run never stopped
        d, d_metrics = os.path.join(out, "d"), os.path.join(out, "d.jsonl")
        train(mlp(100 + rank), make, mse_loss, dataclasses.replace(cfg, max_steps=10), ctx, d, seed=5,
              metrics_path=d_metrics)
        longer = mlp(7 + rank)
        train(longer, make, mse_loss, cfg, ctx, d, resume=True, seed=5, metrics_path=d_metrics)
        torch.save(longer.state_dict(), os.path.join(out, f"d{rank}.pt"))
        # checkpoints in a node-local folder: rank 1 (another host) cannot see the file rank 0 found,
        # and every rank stops with the same error instead of rank 1 alone failing or hanging
        c = os.path.join(out, "c")
        if rank == 0:
            shutil.copytree(b, c)
        dist.barrier()
        seen_by_rank_1 = None
        if rank == 1:
            real_exists = os.path.exists
            os.path.exists = lambda p: False if str(p).startswith(c) else real_exists(p)
        try:
            train(mlp(1), make, mse_loss, cfg, ctx, c, resume=True, seed=5)
        except ConfigError as e:
            seen_by_rank_1 = str(e)
        finally:
            if rank == 1:
                os.path.exists = real_exists
        with open(os.path.join(out, f"r{rank}.json"), "w") as f:
            json.dump({"before": before, "after": after, "steps": res["steps"], "steps_b": res_b["steps"],
                       "epochs": res["epochs"], "node_local": seen_by_rank_1}, f)
        # leave together: a rank tearing gloo down while its peer still talks aborts in C++
        # ("terminate called without an active exception"), seen once in CI
        dist.barrier()
    finally:
        cleanup()
    # Its work done and written, the rank skips the interpreter's finalization: gloo's worker threads,
    # destroyed there with tensors that still hold Python references, aborted a rank after a good run
    # ("terminate called without an active exception", SIGABRT) in about 1 of 50 runs here
    # (pytorch/pytorch#179291)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    """A port free now, below the kernel's ephemeral range: rank 0 binds it seconds later, and a port the
    kernel hands out for bind(0) or an outgoing connection (py4j's, Spark's, another test's) could be
    handed out again in between; one outside that range only an explicit bind takes."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the kernel's pick
        low = 0
    rng = random.Random()  # not the tests' seeded generators: two runs on one box should not pick alike
    for port in ([rng.randrange(max(1024, low // 2), low) for _ in range(50)] if low > 2048 else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def test_two_process_gloo_ddp_uneven_batches(tmp_path):
    procs = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                               join=False, start_method="spawn")
    deadline = time.time() + 600  # a hang guard (the run takes seconds), not a timing: far above a busy box's
    while not procs.join(timeout=2):
        if time.time() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 600 s (a collective waiting for a rank that left?)")
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    # 3 epochs of max(7, 4) steps: the step count is the same on both ranks
    assert r0["steps"] == r1["steps"] == 21 and r0["steps_b"] == r1["steps_b"] == 21
    assert r0["epochs"] == 3
    assert r0["after"] < 0.3 * r0["before"]
    for r in (r0, r1):
        assert "is not visible to every rank; set train.checkpoint_dir to a folder all training hosts share" in r["node_local"]
    a0, a1 = (torch.load(tmp_path / f"a{r}.pt") for r in (0, 1))
    assert_same_weights(a0, a1)
    for r in (0, 1):  # resume reproduces the uninterrupted DDP run on every rank
        assert_same_weights(torch.load(tmp_path / f"b{r}.pt"), a0)
        assert_same_weights(torch.load(tmp_path / f"d{r}.pt"), a0)  # and so does a longer run after a stop
    logged = [json.loads(s) for s in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["event"] == "epoch"] == [7, 14, 21]
    timing = {"run", "elapsed_s", "time", "samples_per_s"}

    def records(name):
        return [{k: v for k, v in json.loads(s).items() if k not in timing}
                for s in (tmp_path / name).read_text().splitlines()]

    # the stopped epoch's partial record stays; every other record is the uninterrupted run's
    assert [r for r in records("d.jsonl") if r.get("complete") is not False] == records("m.jsonl")


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_restores_model_optimizer_scheduler_rng(tmp_path):
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    sched.step()
    torch.manual_seed(11)
    np.random.seed(12)
    import random
    random.seed(13)
    path = save_checkpoint(str(tmp_path), model=model, optimizer=opt, scheduler=sched, step=5, epoch=1,
                           batches_done_in_epoch=2, extra={"note": "x"})
    expected = (torch.rand(3), np.random.rand(3), random.random())

    other = mlp(1)
    opt2 = torch.optim.Adam(other.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = load_checkpoint(path, model=other, optimizer=opt2, scheduler=sched2, restore_rng=True)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    assert_same_weights(model.state_dict(), other.state_dict())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == (5, 1, 2)
    assert state["extra"] == {"note": "x"}
    assert latest_checkpoint(str(tmp_path)) == path


def test_checkpoint_of_ddp_wrapper_saves_bare_module_and_other_ranks_do_not_write(tmp_path):
    model = mlp(0)
    assert save_checkpoint(str(tmp_path), model=model, step=1, epoch=0, rank=1) is None
    assert latest_checkpoint(str(tmp_path)) is None
    wrapped = nn.parallel.DataParallel(model)  # same .module unwrapping as DDP
    path = save_checkpoint(str(tmp_path), model=wrapped, step=1, epoch=0)
    assert set(load_checkpoint(path)["model"]) == set(model.state_dict())


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = mlp(0)
    good = save_checkpoint(str(tmp_path), model=model, step=10, epoch=0)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), model=model, step=20, epoch=0)
    assert sorted(os.listdir(tmp_path)) == [checkpoint_name(10)]
    assert latest_checkpoint(str(tmp_path)) == good


def test_rng_capture_is_loadable_weights_only(tmp_path):
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    assert set(torch.load(tmp_path / "rng.pt", weights_only=True)) == {"python", "numpy", "torch", "cuda"}


# ---------------------------------------------------------------- deferred init, launchers, schedule

def test_deferred_init_materialises_deterministic_embedding():
    def factory() -> nn.Module:
        return nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 4))

    rng_before = torch.get_rng_state()
    a = build_deferred(factory, "cpu", seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    b = build_deferred(factory, "cpu", seed=3)
    c = build_deferred(factory, "cpu", seed=4)
    for p in a.parameters():
        assert p.device.type == "cpu" and not p.is_meta and torch.isfinite(p).all()
    assert_same_weights(a.state_dict(), b.state_dict())
    assert not torch.equal(a[0].weight, c[0].weight)
    assert abs(a[0].weight.std().item() - 1.0) < 0.05  # nn.Embedding's N(0, 1) init really ran


def test_deferred_init_rejects_module_without_reset_parameters():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.zeros(10, 4))

    with pytest.raises(ValueError, match="reset_parameters"):
        build_deferred(Bare, "cpu")


def test_single_process_context_and_launchers(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.device) == (0, 1, True, torch.device("cpu"))
    assert launch(lambda a, b: a + b, TrainConfig(launcher="local"), 2, 3) == 5
    with pytest.raises(ConfigError, match="torch.distributed.run"):
        launch(lambda: None, TrainConfig(launcher="torchrun", num_processes=2))
    assert torchrun_command(["-m", "jobs.train", "--conf", "c.yaml"], 2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "jobs.train", "--conf", "c.yaml"]


def test_gpu_placement_errors_and_the_distributors_gpu_setting(spark, monkeypatch, tmp_path):
    """The choices made for GPUs, on this CPU box with torch.cuda's answers set by hand."""
    from ml.train import distributed as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("auto", 1) == torch.device("cuda", 1)
    # a third rank on a 2-GPU node wrapped onto GPU 0 before, and NCCL failed with "Duplicate GPU detected"
    with pytest.raises(ConfigError, match=r"local rank 2 on a node with 2 visible GPU\(s\): .* at most 2 per node"):
        D.resolve_device("cuda", 2)
    # On the driver without declared GPUs, TorchDistributor(use_gpu=True) refuses to start ("GPUs were
    # unable to be found on the driver"): each process takes cuda:<local rank> itself, one per GPU
    assert "gpu" not in spark.sparkContext.resources
    assert D._distributor_use_gpu(True, local=True, num_processes=2) is False
    with pytest.raises(ConfigError, match=r"train.num_processes=3 .* 2 GPU\(s\) here: .* at most 2"):
        D._distributor_use_gpu(True, local=True, num_processes=3)
    assert D._distributor_use_gpu(True, local=False, num_processes=8) is True  # Spark schedules executors' GPUs
    # a driver that declares 1 GPU: TorchDistributor would quietly train 1 process for the 2 asked
    monkeypatch.setattr(spark.sparkContext, "getConf", lambda: {"spark.driver.resource.gpu.amount": "1"})
    with pytest.raises(ConfigError, match=r"train.num_processes=2 .* declares 1 GPU\(s\) \(spark.driver.resource"):
        D._distributor_use_gpu(True, local=True, num_processes=2)
    assert D._distributor_use_gpu(True, local=True, num_processes=1) is True
    assert D._distributor_use_gpu(False, local=True, num_processes=3) is False
    # On the executors rank 0 keeps nothing in a driver folder its host does not have
    monkeypatch.setenv("RANK", "0")
    assert D._Rank0Output(lambda a: a + 1, None)(1) == 2
    with pytest.raises(InvalidInput, match="boom"):
        D._Rank0Output(lambda: (_ for _ in ()).throw(InvalidInput("boom")), None)()


def _rank_value(base):
    rank = int(os.environ["RANK"])
    if base == -2 or (base == -1 and rank == 1):
        raise InvalidInput(f"rank {rank}: no column 'item_id' in samples_natm")
    return base + 10 * rank


def test_distributor_returns_rank_0s_value_and_raises_a_process_error_as_itself(spark, monkeypatch, tmp_path):
    # real TorchDistributor (local mode, 2 processes under torchrun): the driver gets rank 0's return
    # value, and a training process's own error, whether or not TorchDistributor noticed it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                      os.environ.get("PYTHONPATH", "")]))
    cfg = TrainConfig(launcher="distributor", num_processes=2, device="cpu")
    import glob
    import tempfile

    # a temporary folder of the test's own (torchrun inherits TMPDIR): other jobs' folders in /tmp do not count
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delenv("PET_LOG_DIR", raising=False)
    assert launch(_rank_value, cfg, 5) == 5
    # torchrun's log folder went with the launch: before, each launch left a torchelastic_* one there
    assert glob.glob(os.path.join(tmp_path, "torchelastic_*")) == [] and "PET_LOG_DIR" not in os.environ
    # rank 1 fails, rank 0 returns: pyspark's torchrun wrapper exits 0 and TorchDistributor returned
    # rank 0's value as a success
    with pytest.raises(InvalidInput, match="rank 1: no column 'item_id'"):
        launch(_rank_value, cfg, -1)
    # every rank fails: TorchDistributor's RuntimeError is the cause, the lowest rank's error is raised
    with pytest.raises(InvalidInput, match="rank 0: no column 'item_id'") as err:
        launch(_rank_value, cfg, -2)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_a_log_dir_the_user_set_for_torchrun_is_kept(monkeypatch, tmp_path):
    from ml.train.distributed import _torchrun_logs_in

    monkeypatch.setenv("PET_LOG_DIR", "/var/log/mine")
    with _torchrun_logs_in(str(tmp_path)):
        assert os.environ["PET_LOG_DIR"] == "/var/log/mine"
    assert os.environ["PET_LOG_DIR"] == "/var/log/mine"  # not removed after the launch either
    monkeypatch.delenv("PET_LOG_DIR")
    with pytest.raises(RuntimeError):  # a failed launch does not leave ours set
        with _torchrun_logs_in(str(tmp_path)):
            assert os.environ["PET_LOG_DIR"] == os.path.join(str(tmp_path), "torchrun")
            raise RuntimeError("a rank failed")
    assert "PET_LOG_DIR" not in os.environ


def test_lr_schedule_warmup_then_decay():
    assert lr_multiplier(0, "cosine", 4, 104) == 0.25 and lr_multiplier(3, "cosine", 4, 104) == 1.0
    assert lr_multiplier(54, "cosine", 4, 104) == pytest.approx(0.5)
    assert lr_multiplier(104, "linear", 4, 104) == 0.0
    assert lr_multiplier(1000, "cosine", 0, None) == 1.0  # unknown length: constant after warm-up


def test_release_freed_memory_trims_the_c_heap_on_glibc():
    import platform

    from ml.train.loop import release_freed_memory

    released = release_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert isinstance(released, bool)
        # ~200 MB of small allocations freed below a block still in use: free() alone leaves them in
        # the process (the heap's top cannot shrink); the trim hands them back (in a fresh process, so
        # that nothing else of the test session's heap decides the figures)
        code = """
import os
from ml.train.loop import release_freed_memory
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
x = [bytes(1000) for _ in range(200_000)]
keep = bytes(1000)
del x
freed = rss()
print(release_freed_memory(), (freed - rss()) >> 20)
"""
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        trimmed, mib = out.stdout.split()
        assert trimmed == "True" and int(mib) > 100, out.stdout
        from ml.train.loop import _malloc_trim

        assert _malloc_trim() is not None  # the trim is wired, not silently a no-op
        assert _malloc_trim() is _malloc_trim()  # libc is looked up once, not every log_every steps
    else:
        assert released is False


def _gather_grads(threads: int) -> set:
    """Gradient bytes of a gather-then-reduce model (the trigger side's unique/inverse gather, whose
    backward is a scatter-add), computed 16 times from identical inputs on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        emb = nn.Embedding(2000, 32)
        idx = torch.randint(0, 2000, (8192,), generator=torch.Generator().manual_seed(0))
        w = torch.randn(8192, 32, generator=torch.Generator().manual_seed(1))
        seen = set()
        for _ in range(16):
            emb.zero_grad()
            uniq, inverse = torch.unique(idx, return_inverse=True)
            (emb(uniq)[inverse] * w).sum().backward()
            seen.add(emb.weight.grad.numpy().tobytes())
        return seen
    finally:
        torch.set_num_threads(before)


def test_training_turns_on_deterministic_kernels(tmp_path):
    x, y = regression_data(64)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for on in (False, True):
            cfg = TrainConfig(epochs=1, batch_size=16, log_every=5, checkpoint_every=1000, device="cpu", amp=False,
                              deterministic=on)
            train(nn.Linear(8, 1), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, str(tmp_path / f"ck{on}"))
            assert torch.are_deterministic_algorithms_enabled() is on
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without a kernel warns, never fails
        assert len(_gather_grads(threads=2)) == 1  # the same gradient every time, on 2 threads
    finally:
        torch.use_deterministic_algorithms(was)


def test_deterministic_training_on_cuda_computes_attention_with_the_math_kernel(tmp_path, monkeypatch):
    """The fused GPU attention kernels' backward is not deterministic (atomic adds; torch only warns under
    warn_only), so deterministic CUDA training must select the math kernel. No GPU here: the helper's
    kernel flags are checked for a CUDA device, a transformer's step runs inside it, and train() is
    checked to compute each loss inside it."""
    from ml.train import loop

    def flags():
        b = torch.backends.cuda
        return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()

    before = flags()
    with loop.deterministic_attention(True, torch.device("cuda")):
        assert flags() == (False, False, True)
        layer = nn.TransformerEncoderLayer(16, 4, 32, 0.0, batch_first=True)
        layer(torch.randn(3, 10, 16)).sum().backward()  # the math kernel runs where there is no GPU too
    assert flags() == before
    for on, device in ((False, "cuda"), (True, "cpu")):
        with loop.deterministic_attention(on, torch.device(device)):
            assert flags() == before

    seen = []

    def recording(on, device):
        seen.append((on, device.type))
        return loop.contextlib.nullcontext()

    monkeypatch.setattr(loop, "deterministic_attention", recording)
    x, y = regression_data(32)
    cfg = TrainConfig(epochs=1, batch_size=16, log_every=5, checkpoint_every=1000, device="cpu", amp=False)
    train(nn.Linear(8, 1), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, str(tmp_path / "ck"))
    assert seen == [(True, "cpu")] * 2  # once per step, with the run's setting and device


def test_deferred_allocation_without_init_leaves_the_init_to_the_caller():
    calls = []

    class Counted(nn.Embedding):
        def reset_parameters(self) -> None:
            calls.append(self.weight.device.type)
            super().reset_parameters()

    m = build_deferred(lambda: Counted(100, 8), "cpu", initialise=False)
    assert not m.weight.is_meta and m.weight.shape == (100, 8)
    assert calls == ["meta"]  # the constructor's call, on shapes only: allocated, never filled
    calls.clear()
    build_deferred(lambda: Counted(100, 8), "cpu")
    assert calls == ["meta", "cpu"]


@pytest.mark.parametrize("given,expected", [(True, "auto"), (False, "off"), ("auto", "auto"), ("bf16", "bf16"),
                                            ("off", "off")])
def test_amp_setting_accepts_yaml_booleans(given, expected):
    assert TrainConfig(amp=given).amp == expected


def test_amp_setting_rejects_other_precisions():
    from ml.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"train.amp='fp16' is not allowed; expected one of \['auto', 'bf16', 'off'\]"):
        load_config(None, ["train.amp=fp16"])
    assert load_config(None, ["train.amp=off"]).train.amp == "off"  # YAML reads off as false


def test_autocast_dtype_by_device_and_setting(monkeypatch, caplog):
    from ml.train import loop
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.autocast_dtype("auto", cpu) is None  # the default keeps CPU training in fp32
    assert loop.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert loop.autocast_dtype("off", cpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # Ampere and later
    assert loop.autocast_dtype("auto", cuda) is torch.bfloat16
    assert loop.autocast_dtype("bf16", cuda) is torch.bfloat16
    assert loop.autocast_dtype("off", cuda) is None
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)  # emulated bf16: slower than fp32
    with caplog.at_level("WARNING", logger="ml.train.loop"):
        assert loop.autocast_dtype("bf16", cpu, warn=True) is None
    assert "no native bf16" in caplog.text
    # a V100 or T4 (compute capability 7.x) emulates bf16, slower than fp32: before, auto chose it there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    caplog.clear()
    with caplog.at_level("WARNING", logger="ml.train.loop"):
        assert loop.autocast_dtype("auto", cuda, warn=True) is None
        assert loop.autocast_dtype("bf16", cuda) is None
    assert "this GPU (compute capability 7.5, below 8.0) has no native bf16" in caplog.text
    assert len(caplog.records) == 1  # warn=False is silent


def test_bf16_on_cpu_computes_in_bf16_keeps_fp32_weights_and_is_deterministic(tmp_path, monkeypatch):
    from ml.train import loop
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)  # emulated where absent: same numbers
    x, y = regression_data(128)
    seen = set()

    def loss_fn(model, batch):
        pred = model(batch["x"])
        seen.add(pred.dtype)
        return nn.functional.mse_loss(pred.float(), batch["y"])

    runs = []
    for name in ("a", "b"):
        model = mlp(0, dropout=0.0)
        before = full_loss(model, x, y)
        cfg = TrainConfig(epochs=6, batch_size=16, lr=0.01, checkpoint_every=1000, device="cpu", amp="bf16")
        res = train(model, shuffled_batches(x, y, 16), loss_fn, cfg, CPU, str(tmp_path / name), seed=3)
        assert res["precision"] == "bf16"
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert full_loss(model, x, y) < 0.2 * before  # it still learns
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert seen == {torch.bfloat16}
    assert_same_weights(*runs)
    # and it is not fp32 under another name: the same run in fp32 ends elsewhere
    model = mlp(0, dropout=0.0)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.01, checkpoint_every=1000, device="cpu", amp="off")
    assert train(model, shuffled_batches(x, y, 16), loss_fn, cfg, CPU, str(tmp_path / "c"), seed=3)["precision"] == "fp32"
    assert seen == {torch.bfloat16, torch.float32}
    assert not torch.equal(model[0].weight, runs[0]["0.weight"])


def test_resume_trims_the_metrics_file_to_the_resumed_runs_records(tmp_path):
    from ml.train.loop import _trim_metrics

    path = tmp_path / "m.jsonl"
    recs = [{"event": "step", "run": "a", "step": s} for s in (5, 10, 15)] + [{"event": "step", "run": "b", "step": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"event": "st')  # a crash mid-write
    _trim_metrics(str(path), 10, "a")
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs[:2]
    _trim_metrics(str(path), 0, None)  # resumed from nothing: starts over
    assert path.read_text() == ""


def test_a_diverging_run_stops_naming_the_settings_and_saves_no_checkpoint_of_it(tmp_path):
    from ml.train.loop import TrainingDiverged

    x, y = regression_data(160)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30, optimizer="sgd", grad_clip=None, checkpoint_every=4,
                      log_every=2, device="cpu", amp=False)
    with pytest.raises(TrainingDiverged, match=r"training diverged by step [0-9]+: .*Lower train.lr \(now 1e\+30\), "
                                               r"set train.grad_clip \(now None\)"):
        train(mlp(0, dropout=0.0), shuffled_batches(x, y, 16), mse_loss, cfg, CPU, str(tmp_path), seed=1)
    for path in list_checkpoints(str(tmp_path)):  # what was saved before it diverged is finite
        weights = load_checkpoint(path)["model"]
        assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    # with no log step to see the loss, non-finite weights are caught before the checkpoint at the end
    one = TrainConfig(epochs=1, batch_size=16, lr=0.01, max_steps=3, checkpoint_every=100, log_every=100,
                      device="cpu", amp=False, grad_clip=None)
    model = nn.Linear(8, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"2 weight tensors \(weight, bias\) hold NaN or inf"):
        train(model, shuffled_batches(x, y, 16), mse_loss, one, CPU, str(tmp_path / "inf"), seed=1)
    assert list_checkpoints(str(tmp_path / "inf")) == []


def test_mlflow_asked_for_without_mlflow_installed_logs_json_lines_and_says_so(tmp_path, caplog):
    import importlib.util

    from ml.train.loop import _MetricsSink

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here: this checks the environment without it")
    path = tmp_path / "m" / "train_metrics.jsonl"
    with caplog.at_level("WARNING", logger="ml.train.loop"):
        sink = _MetricsSink(str(path), use_mlflow=True, enabled=True)
    assert "train.mlflow=true but mlflow is not installed" in caplog.text
    sink.emit({"event": "train", "step": 3, "loss": 1.5})
    assert [json.loads(l) for l in path.read_text().splitlines()] == [{"event": "train", "step": 3, "loss": 1.5}]
    _MetricsSink(str(tmp_path / "other.jsonl"), use_mlflow=True, enabled=False).emit({"event": "train", "step": 1})
    assert not (tmp_path / "other.jsonl").exists()  # ranks other than 0 write nothing

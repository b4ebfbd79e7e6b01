"""Model-agnostic training loop: one process or DDP, checkpoints, exact resume, metrics.

The caller supplies the model, a batch source and a loss:

- ``make_batches(epoch)`` returns an iterable of dict batches (tensors are moved to the device
  here). It must yield the same batches for the same epoch (on a given rank) and draw any
  randomness from its own generator seeded by the epoch, not lazily from the global RNGs. The
  loop creates the iterator and takes its first batch under a fixed per-(seed, rank, epoch) seed,
  so a ``DataLoader``'s worker/sampler seeds are reproducible too.
- ``loss_fn(model, batch)`` returns the loss, or ``(loss, {name: value})`` for extra metrics. Under
  DDP ``model`` is the DDP wrapper: the forward pass must go through one ``model(...)`` call.

Resume: checkpoints record the epoch in progress and how many of its batches were trained on;
a resumed run loads the newest one and skips that many batches of that epoch's stream. RNG
streams are re-seeded from ``(seed, rank, step)`` at every checkpoint step and epoch end (rank 0's
states are stored in the checkpoint as well), so every rank's RNG state at a checkpoint is known
without communication and a killed and resumed run reproduces the uninterrupted one bit for bit
on CPU, in one process or under DDP with the same world size (a resume with another is refused).

DDP with uneven batch counts per rank runs under ``Join``: ranks that run out shadow the
gradient all-reduce until the last rank finishes. While joined, a rank does not step its
optimizer, so at each epoch end the optimizer and LR-scheduler state of the rank that trained
longest is broadcast to the others (DDP itself re-syncs the parameters). Mid-epoch checkpoints are
written by rank 0 alone, without collectives (a joined peer could not answer one), and only while
rank 0 is still training; the epoch-end checkpoint is always written.

LR schedule: linear warm-up over ``warmup_steps``, then constant / cosine / linear decay to 0
over the total number of steps: ``max_steps`` if set, else ``epochs * steps_per_epoch``. When
neither is known (no ``max_steps`` and no ``steps_per_epoch`` argument), the LR stays constant
after warm-up whatever ``lr_schedule`` says, and a warning is logged.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import json
import logging
import math
import os
import random
import sys
import time
import uuid
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ml.config import ConfigError, TrainConfig
from ml.errors import InvalidInput
from ml.train.checkpoint import (apply_checkpoint, capture_rng_state, latest_checkpoint, list_checkpoints,
                                 read_checkpoint, remove_partial_saves, restore_rng_state, save_checkpoint)
from ml.train.distributed import DistContext, rank0_value

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
LossOutput = Union[torch.Tensor, tuple[torch.Tensor, dict[str, Any]]]

_STEP_STREAM = 0  # seed-derivation tags: training RNG at a step, data RNG of an epoch
_DATA_STREAM = 1


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and the non-negative integer ``keys``."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (momentum 0.9) with ``cfg.lr`` and ``cfg.weight_decay``."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise InvalidInput(f"train.optimizer={cfg.optimizer!r} is not allowed; "
                       "expected one of ['adam', 'adamw', 'sgd']")


def total_training_steps(cfg: TrainConfig, steps_per_epoch: Optional[int] = None) -> Optional[int]:
    """Optimizer steps the run will take, or None when unknown."""
    by_epochs = cfg.epochs * steps_per_epoch if steps_per_epoch else None
    if cfg.max_steps is None:
        return by_epochs
    return min(cfg.max_steps, by_epochs) if by_epochs is not None else cfg.max_steps


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: Optional[int]) -> float:
    """Factor on the base LR for the optimizer step with 0-based index ``step``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise InvalidInput(f"train.lr_schedule={schedule!r} is not allowed; "
                       "expected one of ['constant', 'cosine', 'linear']")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: Optional[int],
                    warn: bool = True) -> LambdaLR:
    """LambdaLR applying :func:`lr_multiplier`; ``warn`` logs a decay schedule without a run length."""
    if warn and total_steps is None and cfg.lr_schedule != "constant":
        logger.warning("train.lr_schedule=%s needs the run length (max_steps or steps_per_epoch); "
                       "using a constant LR after warm-up", cfg.lr_schedule)

    def factor(step: int) -> float:
        return lr_multiplier(step, cfg.lr_schedule, cfg.warmup_steps, total_steps)

    return LambdaLR(optimizer, factor)


def use_deterministic_ops(on: bool, device: torch.device) -> None:
    """``train.deterministic``: torch's deterministic kernels, so a rerun gives the same model.

    Without them two CPU threads already diverge: a 40-step ML-1M NATM run gave a different model
    on each of two runs with 2 threads (the same one with 1 thread, or with this on, at no measured
    cost: 200 steps in 43 vs 42 s). ``warn_only``: an op with no deterministic kernel warns instead
    of failing the run. On CUDA, cuBLAS needs its workspace fixed before first use.
    """
    if not on:
        torch.use_deterministic_algorithms(False)
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def deterministic_attention(on: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """``train.deterministic`` on CUDA: attention through the math kernel (matmuls and a softmax).

    The fused kernels torch picks on a GPU (memory-efficient, flash) accumulate the backward's
    gradients with atomic adds, so two runs differ; under ``warn_only`` torch only warns (for the
    memory-efficient kernel once the neighbour list passes one key block, N >= 64). The math kernel
    is deterministic and, for NATM's 1 + N tokens, costs little. A no-op on CPU and when off.
    """
    if not (on and device.type == "cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX, through oneDNN).
    Elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively: compute capability 8 (Ampere) or above. Older ones
    (V100, T4) run bf16 through emulation, slower than fp32, though ``torch.cuda.is_bf16_supported()``
    says yes."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(amp: str, device: torch.device, warn: bool = False) -> Optional[torch.dtype]:
    """The autocast dtype ``train.amp`` gives on ``device``, or None for fp32.

    auto: bf16 on a GPU with native bf16, fp32 on CPU. bf16: bf16 on a GPU or a CPU with native bf16.
    A GPU or (for bf16) a CPU without it runs fp32, with a warning when ``warn``: emulated bf16 is
    slower. off: fp32. Autocast computes the matmuls in bf16 and keeps the weights, the optimizer,
    the softmax and the losses in fp32."""
    if amp == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return torch.bfloat16
        if warn:
            major, minor = torch.cuda.get_device_capability(device)
            logger.warning("train.amp=%s: this GPU (compute capability %d.%d, below 8.0) has no native bf16, "
                           "where it would be slower than fp32; training in fp32", amp, major, minor)
        return None
    if amp != "bf16":
        return None
    if not cpu_has_native_bf16():
        if warn:
            logger.warning("train.amp=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where it "
                           "would be slower than fp32; training in fp32")
        return None
    return torch.bfloat16


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A training step frees tensors of many sizes (the exact softmax's (B, V) logits among them)
    while the reader allocates the next batch between them; glibc keeps the freed chunks in its
    heap, so without a trim the process grew without bound: on ML-1M, 0.9 -> 2.3 GiB over 350
    steps, against a flat 0.5 GiB with a trim every 50 steps. Called every ``log_every`` steps.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _to_device(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _batch_len(batch: Any) -> int:
    values = batch.values() if isinstance(batch, dict) else [batch]
    for v in values:
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    return 0


_END = object()


def _epoch_stream(make_batches: Callable[[int], Iterable[Batch]], epoch: int, data_seed: int,
                  skip: int) -> Iterator[Batch]:
    """The epoch's batches, minus the first ``skip``; the training RNG state is left untouched."""
    saved = capture_rng_state()
    try:
        seed_everything(data_seed)
        it = iter(make_batches(epoch))
        first = next(it, _END)  # lazily seeded samplers draw their seed here
    finally:
        restore_rng_state(saved)
    if first is _END:
        return iter(())
    stream = itertools.chain((first,), it)
    return itertools.islice(stream, skip, None) if skip else stream


def _broadcast_optimizer_state(optimizer: torch.optim.Optimizer, src: int, comm_device: torch.device) -> None:
    """Make every rank's optimizer state a copy of rank ``src``'s, in place where shapes allow."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    spec: list[Any] = [None]
    if dist.get_rank() == src:
        spec[0] = [(i, key, ("tensor", tuple(v.shape), v.dtype, v.device.type) if torch.is_tensor(v)
                    else ("value", v))
                   for i, p in enumerate(params) for key, v in optimizer.state.get(p, {}).items()]
    dist.broadcast_object_list(spec, src=src)
    for i, key, desc in spec[0]:
        state = optimizer.state[params[i]]
        if desc[0] == "value":
            state[key] = desc[1]
            continue
        _, shape, dtype, device_type = desc
        t = state.get(key)
        if not (torch.is_tensor(t) and tuple(t.shape) == shape and t.dtype == dtype):
            device = params[i].device if device_type != "cpu" else torch.device("cpu")
            t = state[key] = torch.empty(shape, dtype=dtype, device=device)
        wire = t if t.device == comm_device else t.to(comm_device)
        dist.broadcast(wire, src=src)
        if wire is not t:
            t.copy_(wire)


def _sync_ranks(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, ctx: DistContext, step: int,
                batches_done: int, stopped: bool) -> tuple[int, int, bool]:
    """After an epoch's Join: agree on step / position / stop, copy optimizer state from the leader."""
    comm_device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.tensor([step, batches_done, int(stopped)], dtype=torch.int64, device=comm_device)
    gathered = [torch.zeros_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    rows = [g.tolist() for g in gathered]
    max_step = max(r[0] for r in rows)
    # the same rank DDP's join hook takes the final parameters from: the highest of the last joiners
    leader = max(i for i, r in enumerate(rows) if r[0] == max_step)
    if any(r[0] != max_step for r in rows):
        _broadcast_optimizer_state(optimizer, leader, comm_device)
        sched = [scheduler.state_dict() if ctx.rank == leader else None]
        dist.broadcast_object_list(sched, src=leader)
        if ctx.rank != leader:
            scheduler.load_state_dict(sched[0])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
    return max_step, rows[leader][1], any(r[2] for r in rows)


def _trim_metrics(path: Optional[str], step: int, run_id: Optional[str]) -> None:
    """Keep the records of the metrics file that belong to run ``run_id`` up to ``step``: a resumed
    run appends from there, so the file holds each step of this run once (and no other run's, e.g.
    an earlier run's file copied from the model folder). Unreadable lines (a crash mid-write) go."""
    if not path or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def keep(line: str) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        return isinstance(rec, dict) and rec.get("run") == run_id and rec.get("step", 0) <= step

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class _MetricsSink:
    """JSON lines (and MLflow when asked for and importable) on rank 0; a no-op elsewhere."""

    def __init__(self, path: Optional[str], use_mlflow: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.path = path if enabled else None
        self.mlflow = None
        if enabled and use_mlflow:
            try:
                import mlflow
                self.mlflow = mlflow
            except ImportError:
                logger.warning("train.mlflow=true but mlflow is not installed; logging to JSON lines only")
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def emit(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.mlflow is not None:
            prefix = record["event"]
            numeric = {f"{prefix}/{k}": float(v) for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in ("step", "time")}
            self.mlflow.log_metrics(numeric, step=record["step"])


class _Window:
    """Running sums over a span of steps, kept as tensors so that no step waits on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.steps = 0
        self.samples = 0
        self.t0 = time.time()

    def add(self, loss: torch.Tensor, metrics: dict[str, Any], samples: int) -> None:
        for k, v in (("loss", loss), *metrics.items()):
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.samples += samples

    def record(self) -> dict[str, Any]:
        seconds = max(time.time() - self.t0, 1e-9)
        out = {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}
        out["samples_per_s"] = self.samples / seconds
        return out

    def state(self) -> dict[str, Any]:
        """For a checkpoint: the sums as Python floats (a float32 sum's value exactly), so a resumed
        run's next record averages the same steps, to the same bits, as a run never interrupted."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps,
                "samples": self.samples, "seconds": time.time() - self.t0}

    @classmethod
    def restored(cls, state: Optional[dict[str, Any]]) -> "_Window":
        window = cls()
        if state:  # None: a checkpoint from before windows were saved, or at an epoch's start
            window.sums, window.steps, window.samples = dict(state["sums"]), state["steps"], state["samples"]
            window.t0 -= state["seconds"]  # samples/s over the steps' own time, not the time since the resume
        return window


class TrainingDiverged(InvalidInput):
    """The loss or the weights went NaN or infinite: nothing is checkpointed or published from here."""


def _check_finite(model: nn.Module, step: int, loss: Optional[float], cfg: TrainConfig) -> None:
    """Raise :class:`TrainingDiverged` when the loss is not finite or a weight is NaN or infinite."""
    params = list(model.named_parameters())
    # a sum per tensor (inf or NaN where an element is), one wait on the device, no tensor-sized temporary
    sums = torch.stack([p.detach().float().sum() for _, p in params]) if params else torch.zeros(0)
    if bool(torch.isfinite(sums).all()) and (loss is None or math.isfinite(loss)):
        return
    bad = [name for (name, p), s in zip(params, sums.tolist()) if not math.isfinite(s)]
    what = f"{len(bad)} weight tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) hold NaN or inf" if bad \
        else f"the loss is {loss}"
    raise TrainingDiverged(f"training diverged by step {step}: {what}. No checkpoint or model was written from it "
                           f"(a published model stays as it was). Lower train.lr (now {cfg.lr}), set train.grad_clip "
                           f"(now {cfg.grad_clip}), or train in fp32 (train.amp=off, now {cfg.amp})")


RUN_LENGTH_KEYS = ("train.epochs", "train.max_steps")  # may change on resume: continue training
# settings recorded since 2026-12-07: a checkpoint written before has none, and is compared without them
LATER_KEYS = ("warehouse", "table ids")


def differing_settings(saved: dict[str, Any], settings: dict[str, Any]) -> list:
    """The keys whose values differ between a checkpoint's settings and this run's (a key of
    :data:`LATER_KEYS` that the checkpoint does not record is not compared)."""
    keys = set(saved) | {k for k in settings if k not in LATER_KEYS or k in saved}
    return [k for k in sorted(keys, key=str) if saved.get(k) != settings.get(k)]


def _other_warehouse(checkpoint_dir: str, settings: Optional[dict[str, Any]]) -> Optional[str]:
    """Why this run must not clear ``checkpoint_dir``: its latest checkpoint is another warehouse's
    (one ``train.checkpoint_dir`` for the test and the validation warehouses); None otherwise."""
    path = latest_checkpoint(checkpoint_dir) if settings and settings.get("warehouse") else None
    if path is None:
        return None
    theirs = (read_checkpoint(path)["extra"].get("settings") or {}).get("warehouse")
    if theirs is None or theirs == settings["warehouse"]:
        return None
    return (f"{checkpoint_dir} holds checkpoints of a training in another warehouse ({theirs}; this run's: "
            f"{settings['warehouse']}), which starting over would delete: give each warehouse its own "
            "train.checkpoint_dir, or delete the folder's checkpoints if that run is not to be continued")


def _check_same_settings(path: str, saved: Optional[dict[str, Any]], settings: Optional[dict[str, Any]]) -> None:
    """Refuse to resume from a checkpoint written by a run with other settings (another config or
    data version): its weights, step and schedule belong to that run."""
    if settings is None:
        return
    if saved is None:
        logger.warning("%s records no run settings (written by an older version); resuming from it unchecked", path)
        return
    keys = differing_settings(saved, settings)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {settings.get(k)!r}" for k in keys]
    length = [d for k, d in zip(keys, differ) if k in RUN_LENGTH_KEYS]
    differ = [d for k, d in zip(keys, differ) if k not in RUN_LENGTH_KEYS]
    if length and not differ:  # training longer (or shorter) from where it stopped is a resume
        logger.warning("resuming %s with another run length (%s); a decaying LR schedule is stretched to the "
                       "new length from here on", path, "; ".join(length))
    if differ:
        raise InvalidInput(f"cannot resume from {path}: it was written by a run with other settings ("
                           + "; ".join(differ) + "). Run without --resume to start over, or resume with the "
                           "settings of that run")


def _check_same_world_size(path: str, saved: int, world_size: int) -> None:
    """Refuse to resume with another number of processes. A checkpoint's position in the epoch is a
    count of each rank's batches, and the reader deals rows to ranks by the world size: under another
    one every rank skips batches of a layout that no longer exists (a 2-rank run resumed by 1 process
    trained 32 % of the epoch's rows twice and 2 % never). Every rank reads the same checkpoint, so
    every rank raises."""
    if saved != world_size:
        raise InvalidInput(f"cannot resume from {path}: it was written by {saved} training processes, this run "
                           f"has {world_size} (train.num_processes, or torchrun's --nproc_per_node): its "
                           f"position in the epoch is per rank. Resume with train.num_processes={saved}, or run "
                           "without --resume to start over")


def train(model: nn.Module, make_batches: Callable[[int], Iterable[Batch]],
          loss_fn: Callable[[nn.Module, Batch], LossOutput], cfg: TrainConfig, ctx: DistContext,
          checkpoint_dir: str, resume: bool = False, seed: int = 0,
          metrics_path: Optional[str] = None, *, steps_per_epoch: Optional[int] = None,
          find_unused_parameters: bool = False, keep_checkpoints: Optional[int] = 3,
          settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train ``model`` in place for ``cfg.epochs`` epochs or ``cfg.max_steps`` steps.

    ``steps_per_epoch`` (an estimate is fine) sizes the cosine/linear LR decay when ``max_steps`` is
    unset. ``keep_checkpoints`` keeps the newest N checkpoint files (None keeps all).
    Without ``resume`` the run starts over: checkpoints left in ``checkpoint_dir`` by an earlier run
    are removed first (else the pruning, which keeps the highest steps, would delete this run's own).
    ``settings`` (what determines the run: config, data version) are stored in each checkpoint; a
    resume from a checkpoint written with other settings is refused, naming the keys that differ.
    Returns ``{steps, epochs, final_loss, seconds, samples_per_s, checkpoint, precision}``: ``steps`` counts
    optimizer steps since the start of training (including before a resume), ``epochs`` the
    completed epochs, ``final_loss`` this rank's last batch loss, ``seconds`` / ``samples_per_s``
    this call's wall time and throughput summed over ranks, ``checkpoint`` rank 0's last file,
    ``precision`` bf16 (autocast, ``cfg.amp``) or fp32.
    """
    t_start = time.time()
    device = ctx.device
    use_deterministic_ops(cfg.deterministic, device)
    model.to(device)
    model.train()
    optimizer = build_optimizer(model.parameters(), cfg)
    total_steps = total_training_steps(cfg, steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg, total_steps, warn=ctx.is_main)
    amp_dtype = autocast_dtype(cfg.amp, device, warn=ctx.is_main)
    precision = "bf16" if amp_dtype else "fp32"
    if ctx.is_main:
        logger.info("training on %s in %s", device, "bf16 autocast" if amp_dtype else "fp32")

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    step, epoch, batches_done = 0, 0, 0
    last_loss: Optional[float] = None
    resumed_windows: Optional[dict[str, Any]] = None
    last_checkpoint: Optional[str] = None
    run_id: Optional[str] = uuid.uuid4().hex[:16]  # tags this run's metrics records (a resume keeps its run's)
    seed_everything(derive_seed(seed, ctx.rank, _STEP_STREAM, 0))
    if ctx.is_main and remove_partial_saves(checkpoint_dir):
        logger.info("removed the partial files of checkpoint saves killed before they finished from %s",
                    checkpoint_dir)
    if not resume:
        clash = rank0_value(lambda: _other_warehouse(checkpoint_dir, settings))
        if clash:
            raise InvalidInput(clash)
    if not resume and ctx.is_main:
        if metrics_path and os.path.exists(metrics_path):
            os.remove(metrics_path)  # the metrics of this run only (a resume appends to its own)
        stale = list_checkpoints(checkpoint_dir)
        for old in stale:
            os.remove(old)
        if stale:
            logger.warning("removed %d checkpoints of an earlier run from %s (a run without --resume starts over)",
                        len(stale), checkpoint_dir)
    if resume:
        path = rank0_value(lambda: latest_checkpoint(checkpoint_dir))  # every rank resumes from the file rank 0 saw
        if ctx.distributed and path is not None:  # a node-local folder: another host's rank cannot read it
            seen = torch.tensor([int(os.path.exists(path))],
                                device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(seen, op=dist.ReduceOp.MIN)
            if not seen.item():
                raise ConfigError(f"resume: checkpoint {path} is not visible to every rank; set "
                                  "train.checkpoint_dir to a folder all training hosts share")
        if path is None:
            if ctx.is_main:
                logger.info("resume: no checkpoint in %s, starting from scratch", checkpoint_dir)
                _trim_metrics(metrics_path, 0, None)  # a run from scratch: its own metrics only
        else:
            # on the CPU: load_state_dict moves the weights and the optimizer state to the parameters'
            # devices, while the RNG states must stay host tensors (mapped to a GPU, restoring numpy's
            # failed) and Adam's step counters stay on the CPU as in a fresh run (no sync per step)
            state = read_checkpoint(path, map_location="cpu")
            _check_same_world_size(path, state["extra"].get("world_size", ctx.world_size), ctx.world_size)
            _check_same_settings(path, state["extra"].get("settings"), settings)  # before anything is applied
            try:
                apply_checkpoint(state, model=model, optimizer=optimizer, scheduler=scheduler)
            except RuntimeError as e:
                if "size mismatch" not in str(e):
                    raise
                # same settings, other shapes: a checkpoint of an earlier version of the code (until
                # 2026-12-06 the item vocabulary also held catalogue items without a training action);
                # torch's message: a heading line, then one line per mismatched tensor
                lines = str(e).splitlines()
                first = lines[1].strip() if len(lines) > 1 else str(e)
                raise InvalidInput(f"cannot resume from {path}: its tensors have other shapes than this run's "
                                   f"model ({first}); it was written by another version of the code. Run "
                                   f"without --resume (the pipeline: --force) to start over") from e
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done_in_epoch"]
            resumed_windows = state["extra"].get("windows")  # the records' running sums, on rank 0
            last_loss = state["extra"].get("last_loss")
            run_id = state["extra"].get("run_id")  # the resumed run's (None: written before run ids)
            written_in = state["extra"].get("precision")  # None: written before it was recorded
            if ctx.is_main and written_in not in (None, precision):
                # train.amp=auto resolves per device: a CPU run continued on a GPU (or the reverse)
                logger.warning("resume: %s was trained in %s and continues in %s (train.amp=%s on %s): the "
                               "run is no longer the same as one that was never interrupted", path, written_in,
                               precision, cfg.amp, device)
            last_checkpoint = path
            seed_everything(derive_seed(seed, ctx.rank, _STEP_STREAM, step))
            rng_by_rank = state["extra"].get("rng_by_rank")  # a stop by train.max_steps under DDP: every rank's
            if rng_by_rank:
                restore_rng_state(rng_by_rank[ctx.rank])
            if ctx.is_main:
                # records after the checkpoint (a crashed run's last steps) are trained again
                _trim_metrics(metrics_path, step, run_id)
                restore_rng_state(state["rng"])
                logger.info("resumed from %s: step %d, epoch %d, %d batches into it",
                            path, step, epoch, batches_done)

    net: nn.Module = model
    if ctx.distributed:
        # Buffers are broadcast from rank 0 only for running statistics (batch norm). NATM's and DAT's
        # are constant lookup tables that every rank builds alike from the same pinned table versions;
        # sending them each step cost 22 ms per 72 MB table on loopback gloo, and at wrap time (NATM's
        # neighbour tables reach GBs at 10^7 items) would only copy what each rank has. torch 2.13
        # deprecates broadcast_buffers for forward_sync_buffers, which always syncs at wrap time, and
        # says to keep broadcast_buffers=False until init_sync_buffers exists: its warning is silenced.
        running_stats = any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers. is deprecated", category=FutureWarning)
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=find_unused_parameters,
                                          broadcast_buffers=running_stats)

    def checkpoint(epoch_pos: int, batches_pos: int, windows: Optional[dict[str, Any]] = None,
                   rng_by_rank: Optional[list[dict[str, Any]]] = None) -> Optional[str]:
        extra = {"last_loss": last_loss, "seed": seed, "world_size": ctx.world_size, "settings": settings,
                 "run_id": run_id, "precision": precision, "windows": windows, "rng_by_rank": rng_by_rank}
        return save_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                               step=step, epoch=epoch_pos, batches_done_in_epoch=batches_pos,
                               extra=extra, rank=ctx.rank, keep_last=keep_checkpoints)

    sink = _MetricsSink(metrics_path, cfg.mlflow, ctx.is_main)
    # in a log file (not a terminal) a bar line every 30 s instead of every step
    bar = tqdm(total=total_steps, initial=step, disable=not ctx.is_main, desc="train", unit="step",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    samples_seen = 0
    stopped = cfg.max_steps is not None and step >= cfg.max_steps
    redirect = contextlib.ExitStack()
    if ctx.is_main:  # log lines go above the bar instead of being glued to the end of its line
        redirect.enter_context(logging_redirect_tqdm())
    try:
        while epoch < cfg.epochs and not stopped:
            stream = _epoch_stream(make_batches, epoch, derive_seed(seed, ctx.rank, _DATA_STREAM, epoch),
                                   batches_done)
            # mid-epoch after a resume: the windows go on from the checkpoint's sums, so the records
            # are those of a run never interrupted (then empty, from the next epoch on)
            windows, resumed_windows = resumed_windows or {}, None
            window, epoch_window = _Window.restored(windows.get("step")), _Window.restored(windows.get("epoch"))
            last_loss_t: Optional[torch.Tensor] = None
            with Join([net]) if ctx.distributed else contextlib.nullcontext():
                for batch in stream:
                    n = _batch_len(batch)
                    batch = _to_device(batch, device)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(), deterministic_attention(cfg.deterministic, device):
                        out = loss_fn(net, batch)
                    loss, metrics = out if isinstance(out, tuple) else (out, {})
                    loss.backward()
                    if cfg.grad_clip is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        metrics = {**metrics, "grad_norm": grad_norm}
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    batches_done += 1
                    samples_seen += n
                    last_loss_t = loss.detach()
                    bar.update(1)
                    if step % cfg.log_every == 0:
                        release_freed_memory()
                    if ctx.is_main:
                        window.add(loss, metrics, n)
                        epoch_window.add(loss, metrics, n)
                        if step % cfg.log_every == 0:
                            rec = {"event": "step", "run": run_id, "epoch": epoch, "step": step, "lr": lr,
                                   **window.record(), "elapsed_s": time.time() - t_start,
                                   "time": time.time(), "world_size": ctx.world_size}
                            if not math.isfinite(rec["loss"]):
                                _check_finite(model, step, rec["loss"], cfg)
                            sink.emit(rec)
                            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                            logger.info("epoch %d step %d loss %.5f lr %.3g %.0f samples/s",
                                        epoch, step, rec["loss"], lr, rec["samples_per_s"])
                            window = _Window()
                    stopped = cfg.max_steps is not None and step >= cfg.max_steps
                    if stopped:
                        break
                    if step % cfg.checkpoint_every == 0:
                        last_loss = float(last_loss_t)
                        # before every checkpoint, on every rank (DDP keeps the weights alike): all stop
                        # together, none waits on the others, and a diverged run's weights are never saved
                        _check_finite(model, step, last_loss, cfg)
                        seed_everything(derive_seed(seed, ctx.rank, _STEP_STREAM, step))
                        if ctx.is_main:
                            last_checkpoint = checkpoint(epoch, batches_done,
                                                         {"step": window.state(), "epoch": epoch_window.state()})
            if last_loss_t is not None:
                last_loss = float(last_loss_t)
            if ctx.distributed:
                step, batches_done, stopped = _sync_ranks(optimizer, scheduler, ctx, step, batches_done,
                                                          stopped)
                bar.update(step - bar.n)  # rank 0 may have joined early and missed steps
            if ctx.is_main and epoch_window.steps:
                rec = {"event": "epoch", "run": run_id, "epoch": epoch, "step": step,
                       "lr": scheduler.get_last_lr()[0],
                       **epoch_window.record(), "elapsed_s": time.time() - t_start, "time": time.time(),
                       "world_size": ctx.world_size, "complete": not stopped}
                sink.emit(rec)
                logger.info("epoch %d %s at step %d: mean loss %.5f", epoch,
                            "stopped" if stopped else "done", step, rec["loss"])
            if not stopped:
                epoch, batches_done = epoch + 1, 0
            rng_by_rank = None
            if not stopped or step % cfg.checkpoint_every == 0:  # where a run never stopped reseeds too
                seed_everything(derive_seed(seed, ctx.rank, _STEP_STREAM, step))
            elif ctx.distributed:
                # stopped by train.max_steps between reseeds: the checkpoint keeps each rank's RNG as it
                # is (rank 0's alone is in every checkpoint), so that a resume with more steps draws
                # the dropout masks and negatives of a run never stopped
                rng_by_rank = [None] * ctx.world_size
                dist.all_gather_object(rng_by_rank, capture_rng_state())
            _check_finite(model, step, last_loss, cfg)
            # stopped by train.max_steps inside the epoch: a resume with more steps goes on with its sums
            saved = checkpoint(epoch, batches_done,
                               {"step": window.state(), "epoch": epoch_window.state()} if stopped else None,
                               rng_by_rank)
            last_checkpoint = saved or last_checkpoint
    finally:
        bar.close()
        redirect.close()

    seconds = time.time() - t_start
    if ctx.distributed:
        total = torch.tensor([samples_seen], dtype=torch.int64,
                             device=ctx.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
        samples_seen = int(total.item())
    result = {"steps": step, "epochs": epoch, "final_loss": last_loss, "seconds": seconds,
              "samples_per_s": samples_seen / max(seconds, 1e-9), "checkpoint": last_checkpoint,
              "precision": precision, "run_id": run_id}
    if ctx.is_main:
        logger.info("training finished: %d steps, %d epochs, final loss %s, %.1f s, %.0f samples/s",
                    step, epoch, last_loss, seconds, result["samples_per_s"])
    return result

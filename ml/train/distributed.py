"""Process-group setup and launchers for single-process and DDP training.

This module is the only place that reads ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``. Those are set
by ``torchrun`` (``torch.distributed.run``) and by pyspark's ``TorchDistributor`` (which runs
torchrun underneath); a plain ``python -m jobs.train`` has none of them and trains in one process.

Launchers (``train.launcher``):

- ``local``: ``launch`` calls the training function in this process.
- ``torchrun``: the job is started by torchrun itself, e.g.
  ``torchrun --standalone --nproc_per_node=2 -m jobs.train --conf ...``;
  :func:`torchrun_command` builds that command line with the current interpreter.
- ``distributor``: ``launch`` hands the function to
  ``pyspark.ml.torch.distributor.TorchDistributor(num_processes=N, local_mode=True)``, which needs
  an active SparkSession and pickles the function and its arguments (cloudpickle) into its workers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ml.config import ConfigError, TrainConfig
from ml.errors import InvalidInput

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: its ranks, the world size and its torch device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main: bool = True  # rank 0: the only process that logs and writes checkpoints / metrics

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# How long a rank waits in a collective: while rank 0 alone writes a checkpoint or publishes the model
# (gigabytes at 10^7 items, to a shared mount), the others wait in the next barrier. NCCL's own default
# is 10 minutes (gloo's 30); past it the watchdog tears the waiting ranks down.
DIST_TIMEOUT = timedelta(minutes=30)


def resolve_device(device_pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` requires it."""
    if device_pref not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"device={device_pref!r} is not allowed; expected one of ['auto', 'cpu', 'cuda']")
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch.cuda.is_available() is False; expected auto or cpu here")
    n = torch.cuda.device_count()
    if local_rank >= n:  # wrapped onto a GPU another rank uses, NCCL would fail with "Duplicate GPU detected"
        raise ConfigError(f"training process with local rank {local_rank} on a node with {n} visible GPU(s): one "
                          f"process per GPU, so at most {n} per node (train.num_processes, torchrun's --nproc-per-node)")
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto", timeout: Optional[timedelta] = None) -> DistContext:
    """Join the process group when the launcher set ``WORLD_SIZE > 1``; otherwise a 1-process context.

    Backend: nccl on CUDA, gloo on CPU. Rendezvous is ``env://`` (``MASTER_ADDR``/``MASTER_PORT``,
    set by torchrun and TorchDistributor). Calling it again in an initialised process reuses the group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_pref, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=timeout or DIST_TIMEOUT)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    ctx = DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                      is_main=rank == 0)
    if ctx.is_main:
        logger.info("training on %s, world size %d", device, world_size)
    return ctx


def rank0_value(compute: Callable[[], Any]) -> Any:
    """``compute()`` as rank 0 gets it, on every rank of an initialised process group (only rank 0
    calls it); in a single process, simply ``compute()``. For what must be the same on every rank: a
    table version, a checkpoint path, a decision about a checkpoint."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    """Leave the process group, if one was joined (safe to call in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N <argv>`` as an argv list.

    ``argv`` is what torchrun runs, e.g. ``["-m", "jobs.train", "--conf", "conf/ml1m_natm.yaml"]``.
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *argv]


def _under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ


class _Rank0Output:
    """Runs ``fn`` and keeps rank 0's return value in ``path``.

    TorchDistributor has every rank pickle its output to the same file, so the value it returns
    is that of whichever rank finished last; in local mode the driver can read this file instead.
    """

    def __init__(self, fn: Callable[..., Any], path: Optional[str]) -> None:
        self.fn = fn
        self.path = path  # None on the executors: the driver's folder is not on their hosts

    def __call__(self, *args: Any) -> Any:
        rank = int(os.environ.get("RANK", "0"))
        try:
            out = self.fn(*args)
        except Exception as e:
            if self.path is not None:
                _keep_error(e, f"{self.path}.error{rank}")
            raise
        if rank == 0 and self.path is not None:
            with open(self.path + ".tmp", "wb") as f:
                pickle.dump(out, f)
            os.replace(self.path + ".tmp", self.path)
        return out


def _keep_error(e: Exception, path: str) -> None:
    """Pickle a training process's exception to ``path`` for the driver (best effort)."""
    try:
        data = pickle.dumps(e)
        pickle.loads(data)  # an exception whose constructor takes other arguments does not come back
    except Exception:  # noqa: BLE001 - the driver then reports TorchDistributor's own error
        return
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _process_error(path: str) -> Optional[Exception]:
    """The exception a local-mode training process kept (the lowest rank's), if any."""
    folder, name = os.path.split(path)
    kept = sorted((f for f in os.listdir(folder) if f.startswith(name + ".error") and f[len(name) + 6:].isdigit()),
                  key=lambda f: int(f[len(name) + 6:]))
    if not kept:
        return None
    with open(os.path.join(folder, kept[0]), "rb") as f:
        return pickle.load(f)


def _distributor_gpu(device: str, local: bool) -> bool:
    """Whether TorchDistributor's processes get GPUs: ``train.device`` when it says; under ``auto``,
    the driver's CUDA (local mode) or whether the cluster schedules GPUs to executors' tasks."""
    if device != "auto":
        return device == "cuda"
    if local:
        return torch.cuda.is_available()
    from pyspark.sql import SparkSession

    conf = SparkSession.getActiveSession().sparkContext.getConf()
    return float(conf.get("spark.task.resource.gpu.amount", "0") or 0) > 0


def _distributor_use_gpu(gpu: bool, local: bool, num_processes: int) -> bool:
    """TorchDistributor's ``use_gpu`` for processes that train on GPUs (``gpu``). On the executors,
    True: Spark schedules the GPUs (``spark.task.resource.gpu.amount``) and each task sees its own. On
    the driver, True only where the driver declares GPUs (``spark.driver.resource.gpu.amount``; each
    process then sees those): TorchDistributor refuses to start without them ("GPUs were unable to be
    found on the driver"), which a plain session does not set. Without them each process takes
    ``cuda:<local rank>`` of the GPUs it sees, so there must be at least ``num_processes``."""
    if not gpu:
        return False
    if not local:
        return True
    from pyspark.sql import SparkSession

    conf = SparkSession.getActiveSession().sparkContext.getConf()
    declared = int(float(conf.get("spark.driver.resource.gpu.amount", "0") or 0))
    # declared: TorchDistributor would quietly train with fewer processes than asked
    n, where = ((declared, f", which declares {declared} GPU(s) (spark.driver.resource.gpu.amount)") if declared
                else (torch.cuda.device_count(), f" and {torch.cuda.device_count()} GPU(s) here"))
    if num_processes > n:
        raise ConfigError(f"train.num_processes={num_processes} with train.launcher=distributor on the driver{where}: "
                          f"one process per GPU, so expected at most {n}")
    return bool(declared)


@contextlib.contextmanager
def _torchrun_logs_in(folder: str) -> Iterator[None]:
    """Point the torchrun that TorchDistributor starts at ``folder`` for its log files (``--log-dir``
    read from ``PET_LOG_DIR``), so that they go with the launch's temporary folder: without a log
    directory torchrun makes a ``/tmp/torchelastic_*`` one per launch and never removes it. A
    ``PET_LOG_DIR`` the user set is kept (their logs stay where they asked)."""
    if "PET_LOG_DIR" in os.environ:
        yield
        return
    os.environ["PET_LOG_DIR"] = os.path.join(folder, "torchrun")
    try:
        yield
    finally:
        os.environ.pop("PET_LOG_DIR", None)


def launch(train_fn: Callable[..., Any], cfg_train: TrainConfig, *args: Any) -> Any:
    """Run ``train_fn(*args)`` with ``cfg_train.launcher``; returns what rank 0's call returned.

    ``torchrun`` cannot start itself from inside a running job: under torchrun (``WORLD_SIZE``
    set) or with ``num_processes == 1`` the function runs in this process, otherwise this raises
    with the command to use (see :func:`torchrun_command`). ``distributor`` runs on the driver
    (``train.distributor_local``, the default) or on the executors, on GPUs per
    :func:`_distributor_gpu`, and needs an active SparkSession (``jobs.train`` starts one).
    """
    launcher = cfg_train.launcher
    if launcher == "local":
        return train_fn(*args)
    if launcher == "torchrun":
        if _under_launcher() or cfg_train.num_processes == 1:
            return train_fn(*args)
        cmd = torchrun_command(["-m", "jobs.train", *sys.argv[1:]], cfg_train.num_processes)
        raise ConfigError("train.launcher=torchrun: start the job under torchrun, e.g. "
                           + shlex.join(cmd))
    if launcher == "distributor":
        # Imported here so that torch-only users (and torchrun workers) never load pyspark.
        from pyspark.ml.torch.distributor import TorchDistributor

        local = cfg_train.distributor_local
        use_gpu = _distributor_use_gpu(_distributor_gpu(cfg_train.device, local), local, cfg_train.num_processes)
        distributor = TorchDistributor(num_processes=cfg_train.num_processes, local_mode=local, use_gpu=use_gpu)
        if not local:
            # TorchDistributor returns the first task's value (every rank returns rank 0's: train_worker)
            # and reports a failed one as its own error; the exception and traceback are in that
            # executor's log
            return distributor.run(_Rank0Output(train_fn, None), *args)
        with tempfile.TemporaryDirectory(prefix="launch-") as tmp, _torchrun_logs_in(tmp):
            path = os.path.join(tmp, "rank0_output.pkl")
            try:
                out = distributor.run(_Rank0Output(train_fn, path), *args)
            except RuntimeError as e:
                # TorchDistributor reports any process's failure as its own RuntimeError; in local mode
                # the process's own exception (a config or input error, say) is raised instead
                original = _process_error(path)
                if original is None:
                    raise
                raise original from e
            original = _process_error(path)
            if original is not None:
                # pyspark's torchrun wrapper exits 0 whatever torchrun's status, so a failed process
                # is not reported when another rank wrote its output
                raise original
            if os.path.exists(path):
                with open(path, "rb") as f:
                    out = pickle.load(f)
        return out
    raise InvalidInput(f"train.launcher={launcher!r} is not allowed; "
                       "expected one of ['local', 'torchrun', 'distributor']")

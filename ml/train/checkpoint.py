"""Training checkpoints: model, optimizer, scheduler, position in the data stream and RNG states.

A checkpoint is one ``ckpt-<step>.pt`` file holding a dict::

    {"format": 1, "model": state_dict, "optimizer": ..., "scheduler": ..., "step": int,
     "epoch": int, "batches_done_in_epoch": int, "rng": {"python", "numpy", "torch", "cuda" (or None)},
     "extra": {...}}

``epoch`` / ``batches_done_in_epoch`` say where to resume: the epoch in progress and how many of
its batches were already trained on (a checkpoint written at an epoch end says ``epoch + 1, 0``).
The model state is that of the bare module (a DDP wrapper's ``.module``), so a checkpoint loads
into an unwrapped model for inference. Files are written to a temporary file in the same
directory and renamed over the target, so a killed writer never leaves a truncated checkpoint.
Only rank 0 writes; every rank may load, mapped to its own device.
"""
from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ml.errors import InvalidInput

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.pt"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy's global generator, torch CPU and the current CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # plain types + a tensor, so that the checkpoint loads with torch.load(weights_only=True)
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        # the current device only: one device per process, and reading every device's state
        # would create a CUDA context on each of them
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; a saved CUDA state goes to the current CUDA device.

    Every tensor is brought to the CPU first: a checkpoint read with ``map_location`` set to a GPU
    holds the states on it, where ``.numpy()`` raises."""
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda.cpu())
        else:
            logger.warning("checkpoint holds a CUDA RNG state but CUDA is not available; not restored")


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _is_writer(rank: Optional[int]) -> bool:
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return rank == 0


def save_checkpoint(checkpoint_dir: str, *, model: nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None, step: int, epoch: int,
                    batches_done_in_epoch: int = 0, extra: Optional[dict[str, Any]] = None,
                    rank: Optional[int] = None, keep_last: Optional[int] = None) -> Optional[str]:
    """Write ``<checkpoint_dir>/ckpt-<step>.pt`` atomically on rank 0; other ranks return None.

    Not a collective: rank 0 may call it alone (``rank`` defaults to the process-group rank). The
    RNG states captured are the calling process's. ``keep_last`` deletes all but the newest
    N checkpoints after a successful write (None keeps all).
    """
    if not _is_writer(rank):
        return None
    os.makedirs(checkpoint_dir, exist_ok=True)
    state = {
        "format": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "batches_done_in_epoch": int(batches_done_in_epoch),
        "rng": capture_rng_state(),
        "extra": dict(extra or {}),
    }
    path = os.path.join(checkpoint_dir, checkpoint_name(step))
    fd, tmp = tempfile.mkstemp(dir=checkpoint_dir, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(checkpoint_dir)
    if keep_last is not None:
        for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
            os.remove(old)
    logger.info("checkpoint step %d -> %s", step, path)
    return path


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_saves(checkpoint_dir: str) -> int:
    """Remove the temporary files of saves that never finished (a process killed while writing a
    checkpoint leaves its ``.ckpt-*.tmp``, up to a checkpoint's size, one per kill). Call it from the
    one process that writes ``checkpoint_dir``, before it saves. Returns how many went."""
    if not os.path.isdir(checkpoint_dir):
        return 0
    partial = [n for n in os.listdir(checkpoint_dir) if n.startswith(".ckpt-") and n.endswith(".tmp")]
    for name in partial:
        os.remove(os.path.join(checkpoint_dir, name))
    return len(partial)


def list_checkpoints(checkpoint_dir: str) -> list[str]:
    """Complete checkpoint files in ``checkpoint_dir``, oldest step first (temporary files excluded)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(checkpoint_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """Path of the checkpoint with the highest step, or None when there is none."""
    paths = list_checkpoints(checkpoint_dir)
    return paths[-1] if paths else None


def read_checkpoint(path: str, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """The checkpoint dict at ``path``, its format checked; nothing applied (see :func:`apply_checkpoint`).

    ``weights_only=False`` is needed only when ``extra`` holds objects other than tensors and
    plain Python containers/scalars.
    """
    state = torch.load(path, map_location=map_location, weights_only=weights_only)
    if state.get("format") != FORMAT_VERSION:
        raise InvalidInput(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state


def apply_checkpoint(state: dict[str, Any], *, model: Optional[nn.Module] = None,
                     optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Optional[Any] = None,
                     restore_rng: bool = False) -> None:
    """Fill whichever of model / optimizer / scheduler are given from a :func:`read_checkpoint` dict.

    ``restore_rng`` sets python/numpy/torch RNGs to the saved states (the writer's, i.e. rank 0's).
    """
    if model is not None:
        unwrap_model(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        restore_rng_state(state["rng"])


def load_checkpoint(path: str, *, model: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Optional[Any] = None,
                    map_location: Any = "cpu", restore_rng: bool = False,
                    weights_only: bool = True) -> dict[str, Any]:
    """:func:`read_checkpoint` then :func:`apply_checkpoint`; returns the dict."""
    state = read_checkpoint(path, map_location, weights_only)
    apply_checkpoint(state, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng)
    return state

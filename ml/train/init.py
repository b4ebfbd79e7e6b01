"""Deferred initialisation of large modules (big embedding tables) without torchdistx.

``build_deferred`` constructs the module on the ``meta`` device (shapes only, no memory, no init
work), allocates it once on the target device with ``to_empty`` and then initialises it by calling
``reset_parameters()`` on every submodule, children before parents (the order eager construction
runs them in, so a parent's re-initialisation of a child wins).

Contract for modules built this way: **all initialisation lives in ``reset_parameters``**. Any
``nn.init`` call, ``torch.arange`` buffer or copied constant in ``__init__`` runs on meta tensors
and is lost; ``to_empty`` leaves uninitialised memory. Every module that directly owns a parameter
or a buffer must therefore define ``reset_parameters`` (``_reset_parameters`` is accepted too, for
``nn.MultiheadAttention``); :func:`build_deferred` raises otherwise.
"""
from __future__ import annotations

import contextlib

import logging
from typing import Callable, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _reset_fn(module: nn.Module) -> Optional[Callable[[], None]]:
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def _post_order(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        out.extend(_post_order(child, f"{prefix}.{name}" if prefix else name))
    out.append((prefix, module))
    return out


def build_deferred(factory: Callable[[], nn.Module], device: Union[str, torch.device],
                   seed: Optional[int] = 0, initialise: bool = True) -> nn.Module:
    """Build ``factory()`` on meta, materialise it on ``device`` and run every ``reset_parameters``.

    ``seed`` makes the initial weights a function of the seed (for a given device type: CPU and
    CUDA generators differ); the global RNG state is left as it was. ``seed=None`` draws from the
    global RNG instead. ``initialise=False``: allocate only (uninitialised memory), for a caller
    that initialises the weights itself, so a table of billions of values is not filled twice.
    """
    device = torch.device(device)
    with torch.device("meta"):
        module = factory()
    if not initialise:
        return module.to_empty(device=device)
    modules = _post_order(module)
    missing = [name or type(module).__name__ for name, m in modules
               if _reset_fn(m) is None and (any(True for _ in m.parameters(recurse=False))
                                            or any(True for _ in m.buffers(recurse=False)))]
    if missing:
        raise ValueError("deferred init needs reset_parameters() on every module that owns parameters "
                         f"or buffers; missing on: {missing}")
    module = module.to_empty(device=device)
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
        if seed is not None:
            # seed only the generators forked above (torch.manual_seed would touch every GPU's)
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(fork_devices[0]):
                    torch.cuda.manual_seed(seed)
        with torch.no_grad():
            for _, m in modules:
                fn = _reset_fn(m)
                if fn is not None:
                    fn()
    n_params = sum(p.numel() for p in module.parameters())
    logger.debug("deferred init of %s: %d parameters on %s", type(module).__name__, n_params, device)
    return module


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """Run the block with torch's CPU generator seeded by ``seed``; restore the global state after.

    Model constructors draw their initial weights from the global generator, which torch seeds
    from OS entropy at start-up: without this, the first model built in a process gets different
    weights on every run (later ones inherit whatever the previous training left).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield

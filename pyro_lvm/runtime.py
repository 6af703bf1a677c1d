"""Scoped runtime settings: seeds, threads, devices, dtypes and Pyro's parameter handling.

The library never changes global state its caller did not ask for. Each helper here is a context
manager that sets one thing for the duration of a block and restores the caller's value afterwards;
:func:`pyro_lvm.fit`, :func:`pyro_lvm.evaluate` and the experiments use them at their entry points.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyro
import torch

#: torch threads used by the command-line entry points when ``--threads`` is not given. One thread: on
#: the 2-core machines this suite is measured on, a second thread made the MNIST VAE step at most ~1.3x
#: faster when the machine was idle and several times slower when another job held a core (README,
#: "Threads"), and the small models gain nothing.
DEFAULT_THREADS = 1

#: device names accepted by :func:`resolve_device` (``pyro_lvm.load(device=...)``); ``auto`` picks cuda, then mps,
#: then cpu
DEVICES = ("cpu", "cuda", "mps", "auto")
#: names accepted by ``--accelerator`` / ``accelerator=`` (Lightning's, with ``cuda`` read as ``gpu``)
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block with torch's, NumPy's and Python's global RNGs seeded by ``seed``, restoring the caller's
    states afterwards; with ``seed=None`` nothing is seeded or restored (draws advance the caller's RNG)."""
    if seed is None:
        yield
        return
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads and at most ``n`` threads in the BLAS and OpenMP pools that
    NumPy and scikit-learn use (threadpoolctl; ``None``: leave the caller's settings). The second matters: the
    factor-analysis baseline's EM at OpenBLAS's default thread count took 73 s on a busy 2-core machine, 3 s at one
    thread."""
    if n is None:
        yield
        return
    from pyro_lvm.config import MAX_THREADS

    if int(n) < 1:
        raise ValueError(f"threads: must be >= 1, got {n}")
    if int(n) > MAX_THREADS:  # torch would try to start them all: 100,000 crashed the process
        raise ValueError(f"threads: must be at most {MAX_THREADS}, got {n}")
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        torch.set_num_threads(previous)


def cli_threads(n: int | None) -> int:
    """The thread count a command-line run uses: ``n``, else ``$PYRO_LVM_THREADS``, else :data:`DEFAULT_THREADS`."""
    if n is not None:
        return n
    env = os.environ.get("PYRO_LVM_THREADS")
    return int(env) if env and env.isdigit() and int(env) > 0 else DEFAULT_THREADS


def accelerator_device(name: str | None) -> torch.device:
    """The torch device of a Lightning accelerator name (``None``: the CPU)."""
    return resolve_device({None: "cpu", "gpu": "cuda"}.get(name, name)) or torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device | None:
    """``"auto"`` -> the best available of cuda, mps, cpu; a name -> that device, checked to be available."""
    if name is None or isinstance(name, torch.device):
        return name
    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise ValueError(f"device: unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError("device: 'mps' asked for, but this torch build has no usable MPS backend; use cpu or auto")
    return torch.device(name)


@contextmanager
def local_params(*modules: object) -> Iterator[None]:
    """Pyro's ``module_local_params`` on for a block: every ``PyroModule`` keeps its own parameters, so
    models and guides fitted side by side never share them through Pyro's global parameter store.

    Pyro decides a module's mode when it is built; ``modules`` (and their submodules) built outside this
    setting get the empty local parameter state Pyro would have given them, so they work inside it.
    """
    local_state(*modules)
    with pyro.settings.context(module_local_params=True):
        yield


def local_state(*modules: object) -> None:
    """Give ``modules`` (and their submodules, and a guide's model) built outside ``module_local_params`` the empty
    local parameter state Pyro would have given them inside it (see :func:`local_params`); once is enough."""
    # a guide refers to its model as ``_model = (model,)`` (not a submodule), and may run it (autoguides)
    modules = modules + tuple(m._model[0] for m in modules if isinstance(getattr(m, "_model", None), tuple))
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for sub in m.modules():
                ctx = getattr(sub, "_pyro_context", None)
                if ctx is not None and not hasattr(ctx, "param_state"):
                    ctx.param_state = {"params": {}, "constraints": {}}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run a block with torch's default dtype set to ``dtype``, restoring the caller's afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def module_device(*modules: object) -> torch.device:
    """The device of the first parameter or buffer of ``modules`` (cpu when they have none)."""
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for t in (*m.parameters(), *m.buffers()):
                return t.device
    return torch.device("cpu")


def module_dtype(*modules: object) -> torch.dtype:
    """The dtype of the first floating parameter or buffer of ``modules`` (torch's default when none)."""
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for t in (*m.parameters(), *m.buffers()):
                if t.is_floating_point():
                    return t.dtype
    return torch.get_default_dtype()

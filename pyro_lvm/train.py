"""Fitting by stochastic variational inference: ``fit(model, guide, train, valid, TrainConfig(...))``.

The objective is Pyro's ELBO (``Trace_ELBO`` by default) used as a differentiable loss, optimised
with Adam over minibatches (the data plate rescales each minibatch to the full data set), with
gradient clipping, optional linear KL warm-up, early stopping on the validation ELBO with restore
of the best state, checkpoints, and a NaN guard that names the epoch and step.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.metadata
import logging
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro.infer import ELBO, JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from pyro_lvm.config import ConfigError, ReadableConfig, check_choice, check_config, to_dict
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.registry import Registry
from pyro_lvm.runtime import ACCELERATORS, local_params, module_device, seeded
from pyro_lvm.runtime import threads as runtime_threads

from .evaluate import EvalConfig
from .objectives import OBJECTIVES, objective_problem, parse_objective
from .saving import read_checkpoint

__all__ = ["ELBOS", "OPTIMIZERS", "STEPS", "AnnealLatents", "FitResult", "FusedAdam", "TrainConfig", "TrainingError",
           "check_elbo", "data_checked", "fit", "load_checkpoint", "resolve_elbo"]

#: where a fit says, once, why its steps run eagerly where the traced step would not apply
STEP_LOG = logging.getLogger("pyro_lvm.train")


if TYPE_CHECKING:  # Lightning is imported when a fit starts: a command that only reports a bad flag starts 3 s faster
    from lightning.pytorch.callbacks import Callback


class TrainingError(RuntimeError):
    """Training stopped: the loss or the parameters became non-finite, or the loss diverged."""


class AnnealLatents(Messenger):
    """Multiply the log-density of the named latent sites by ``beta`` (KL warm-up), in model and guide."""

    def __init__(self, sites: set[str], beta: float = 1.0) -> None:
        super().__init__()
        self.sites, self.beta = sites, beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        # a tensor beta (the traced step's input) always multiplies: by exactly 1 once warm-up is over. A wrapped
        # function's local sites are latents scored as observed (z = T(u), marked pyro_lvm_local): annealed too
        latent = (msg["name"] in self.sites and not msg["is_observed"]) or \
            msg.get("infer", {}).get("pyro_lvm_local", False)
        if msg["type"] == "sample" and latent and (isinstance(self.beta, torch.Tensor) or self.beta != 1.0):
            msg["scale"] = msg["scale"] * self.beta



class TraceGraphLoss(TraceGraph_ELBO):
    """``TraceGraph_ELBO`` (score-function terms with per-site downstream costs and baselines) as a
    differentiable loss: its value is −ELBO and its gradient the surrogate's, baseline fit included."""

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -torch.as_tensor(elbo).detach() + (surrogate - surrogate.detach())


ELBOS: Registry[Callable[..., ELBO]] = Registry("ELBO")
ELBOS.register("trace")(Trace_ELBO)
ELBOS.register("meanfield")(TraceMeanField_ELBO)  # analytic KL where Pyro knows it
ELBOS.register("jit")(JitTrace_ELBO)
ELBOS.register("tracegraph")(TraceGraphLoss)  # score function with Rao-Blackwellised costs and baselines
ELBOS.register("traceenum")(TraceEnum_ELBO)  # sums enumerated discrete sites out exactly


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` whose step, once every parameter has its state, calls the fused kernel with
    the lists it built before instead of rebuilding them: the same kernel on the same tensors with the same
    hyperparameters (read from ``param_groups`` at every step, so learning-rate schedules apply), hence the same
    numbers to the bit, without ``Adam.step``'s per-parameter bookkeeping and grouping by device and dtype (about
    50 µs a step, which a full-batch factor-model step of 1-2 ms notices).

    The short way is taken only in the plain case: no closure, no gradient scaler, every parameter of a group with
    a gradient, one device and dtype per group, no AMSGrad, ``maximize``, ``differentiable`` or decoupled weight
    decay; anything else, and the first step (which creates the state), goes through ``Adam.step``. Loading a
    state dict or adding a group drops the lists."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        self._lists: list[tuple[list[torch.Tensor], ...]] | None = None
        super().__init__(params, fused=True, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._lists = None
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._lists = None
        super().load_state_dict(state_dict)

    def _build(self) -> list[tuple[list[torch.Tensor], ...]] | None:
        lists = []
        for group in self.param_groups:
            params = list(group["params"])
            states = [self.state.get(p) for p in params]
            if not params or any(not s for s in states) or len({(p.device, p.dtype) for p in params}) > 1:
                return None
            lists.append((params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                          [s["step"] for s in states]))
        return lists

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        lists = self._lists
        if closure is None and lists is not None and getattr(self, "grad_scale", None) is None \
                and getattr(self, "found_inf", None) is None:
            grads = [[p.grad for p in params] for params, *_ in lists]
            if all(g is not None for gs in grads for g in gs) and not any(
                    group["amsgrad"] or group["maximize"] or group["differentiable"] or
                    group["decoupled_weight_decay"] or any(isinstance(v, torch.Tensor) for v in (group["lr"],
                                                                                                 *group["betas"]))
                    for group in self.param_groups):
                for group, (params, exp_avgs, exp_avg_sqs, steps), gs in zip(self.param_groups, lists, grads,
                                                                            strict=True):
                    beta1, beta2 = group["betas"]
                    torch._foreach_add_(steps, 1)
                    torch._fused_adam_(params, gs, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                       lr=group["lr"], beta1=beta1, beta2=beta2,
                                       weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                                       grad_scale=None, found_inf=None)
                return None
        loss = super().step(closure)
        self._lists = self._build()
        return loss


def adam(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Adam with its update in one fused kernel over all parameters where torch has one for them (CPU, CUDA, MPS:
    floating-point parameters; :class:`FusedAdam`), else in one multi-tensor (``foreach``) pass. The same update as
    the per-tensor loop (``adam-loop``), rounded differently in the last bits: on the MNIST VAE's 688k parameters at
    one CPU thread the loop takes 1.2 ms a step, the fused kernel 0.4 ms."""
    params = list(params)
    try:
        return FusedAdam(params, **kwargs)
    except RuntimeError:  # parameters fused Adam does not take: the multi-tensor loop does
        return torch.optim.Adam(params, foreach=True, **kwargs)


#: optimisers by name: ``OPTIMIZERS[name](params, lr=...)``
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.register("adam")(adam)
# Adam's fused kernel, asked for by name (an error where torch has none for the parameters)
OPTIMIZERS.register("adam-fused", origin=(__name__, "adam-fused"))(functools.partial(torch.optim.Adam, fused=True))
# Adam's per-tensor loop, the default before the fused kernel: reproduces earlier figures to the last bit
OPTIMIZERS.register("adam-loop", origin=(__name__, "adam-loop"))(functools.partial(torch.optim.Adam, foreach=False))
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
# Adam with the infinity norm in place of the second moment: the optimiser of van den Berg et al. (2018) and
# Tomczak & Welling (2018), so their protocols run as written (--optimizer adamax --lr 5e-4)
OPTIMIZERS.register("adamax")(torch.optim.Adamax)
OPTIMIZERS.register("sgd")(torch.optim.SGD)  # plain gradient steps: the update is proportional to the gradient

#: Lightning strategies that train this library's plan (DDP averages gradients over processes)
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_notebook")
#: Lightning precisions; ``None`` trains in the model's own dtype
PRECISIONS = ("64-true", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
#: how a step computes the loss (``TrainConfig.step``)
STEPS = ("auto", "traced", "compiled", "eager")
#: ``step="auto"`` traces the loss when the fit plans at least this many steps: tracing a graph and checking it
#: against Pyro's loss takes about 0.1 s (0.07-0.12 s for the MNIST VAE, 10-20 of its eager steps), which a
#: shorter fit of a small model would not win back
TRACE_MIN_STEPS = 100
#: ``step="auto"`` also compiles the traced graph (``torch.compile``, Inductor) when the fit plans at least this many
#: steps: compiling takes about 20 s per minibatch shape in a fresh process at one thread (3 s with Inductor's
#: on-disk cache warm) and makes the MNIST VAE's step 0-0.3 ms (0-4%) faster than the simplified traced graph
#: (pyro_lvm.graphs), so it pays from about 70,000 steps at best: 200 epochs of MNIST's minibatches of 100
COMPILE_MIN_STEPS = 100_000


@dataclass
class TrainConfig(ReadableConfig):
    """How :func:`fit` trains. Every field is checked when the config is made (``ValueError`` naming it)."""

    #: passes over the training data
    epochs: int = 100
    #: minibatch size; ``None`` uses the whole training set each step
    batch_size: int | None = 100
    #: the optimiser's (initial) learning rate
    lr: float = 1e-3
    #: the learning rate decays exponentially to ``lr * lr_final_factor`` over the epochs (1: constant)
    lr_final_factor: float = 1.0
    #: clip the global gradient norm to this value (``None``: no clipping)
    clip_norm: float | None = 100.0
    #: samples of the latents per data point in each ELBO estimate (vectorised)
    num_particles: int = 1
    #: ELBO estimator, a name in ``ELBOS``; ``None``: the model's own default (``model.default_elbo``)
    elbo: str | None = None
    #: training objective: ``elbo`` (the estimator above), ``iwae:K`` (per-point importance-weighted bound, K draws
    #: per point) or ``iwae-dreg:K`` (the same bound, DReG gradients for the guide); see ``pyro_lvm.objectives``
    objective: str = "elbo"
    #: epochs over which the weight on the latent terms (the KL) rises linearly to 1; 0 = no warm-up
    warmup_epochs: int = 0
    #: stop after this many epochs without a better validation ELBO (``None``: never)
    patience: int | None = None
    #: samples per validation point for the validation ELBO
    val_samples: int = 1
    #: evaluate the validation ELBO every this many epochs
    eval_every: int = 1
    #: restore the state with the best validation ELBO at the end (False: keep the last iterate)
    restore_best: bool = True
    #: write ``last.pt`` every this many epochs (``best.pt`` is written on every improvement)
    checkpoint_every: int = 1
    #: ...and at most once per this many seconds (0: every time; the first epoch's and the last are always written),
    #: so a model whose epochs take milliseconds is not slowed by its checkpoints yet never loses more than this
    checkpoint_seconds: float = 0.0
    #: optimise the model's parameters (False: hold the model fixed, train only the guide)
    train_model: bool = True
    #: optimise the guide's parameters
    train_guide: bool = True
    #: fixes initialisation-free randomness of the fit (minibatch order, samples); ``None``: the caller's RNG
    seed: int | None = None
    #: torch threads during the fit (``None``: leave the caller's setting)
    threads: int | None = None
    #: optimiser, a name in ``OPTIMIZERS`` (adam: fused where torch can; adam-fused, adam-loop, adamw, adamax, sgd)
    optimizer: str = "adam"
    #: how each step computes the loss: ``traced`` replays Trace_ELBO's loss as a graph traced once per minibatch
    #: shape (checked against Pyro's on its first step), ``compiled`` also compiles that graph (torch.compile: seconds
    #: per shape), ``eager`` runs Pyro's ELBO every step; ``auto`` traces where it applies (elbo 'trace', one process,
    #: plain precision, reparameterised sites, a fit of at least TRACE_MIN_STEPS steps), compiles too for a fit of at
    #: least COMPILE_MIN_STEPS steps (where the compiler's seconds pay), and says in the log, once, why not otherwise
    step: str = "auto"
    #: cpu, gpu, mps or auto: where Lightning trains (``None``: where the model is)
    accelerator: str | None = None
    #: processes (one per device) that train data-parallel on each node
    devices: int = 1
    #: machines that train together (each runs ``devices`` processes)
    num_nodes: int = 1
    #: Lightning strategy: auto, ddp, ddp_find_unused_parameters_true or ddp_notebook
    strategy: str = "auto"
    #: seconds each data-parallel process waits for all the others to join at the start (a node that never starts)
    #: before it stops with an error
    ddp_timeout: float = 300.0
    #: Lightning precision, e.g. 32-true, 64-true, bf16-mixed (``None``: the model's dtype, no casting)
    precision: str | None = None
    #: worker processes that load training minibatches (0: in the training process)
    workers: int = 0
    #: directory for checkpoints (``None``: no checkpoints)
    output: str | None = None
    #: no progress bar
    quiet: bool = False
    #: where the output is not a terminal (a log file, a CI job, a notebook), a progress line (epoch, step, train
    #: loss, last validation bound, elapsed, ETA) every this many seconds of wall time, on stderr; 0: none. A
    #: terminal gets a progress bar instead
    progress_seconds: float = 30.0
    #: stop after this many optimiser steps in total (tests, benchmarks)
    max_steps: int | None = None
    #: resume from this checkpoint (a ``last.ckpt`` written by an earlier fit of the same model and guide); "last":
    #: from ``output/last.ckpt`` when there is one, else start afresh
    resume: str | None = None

    def __post_init__(self) -> None:
        check_config(self, positive_int=("epochs", "batch_size", "num_particles", "patience", "val_samples",
                                         "eval_every", "checkpoint_every", "max_steps", "threads", "devices",
                                         "num_nodes"),
                     nonneg_int=("warmup_epochs", "workers"),
                     positive=("lr", "clip_norm", "lr_final_factor", "ddp_timeout"),
                     nonneg=("checkpoint_seconds", "progress_seconds"))
        if self.lr_final_factor > 1:
            raise ConfigError("lr_final_factor", f"must be in (0, 1] (the rate decays), got {self.lr_final_factor}")
        check_choice(self, "elbo", ELBOS.names())
        try:
            parse_objective(self.objective)
        except (KeyError, ValueError) as e:
            raise ConfigError("objective", str(e).strip("'\"")) from None
        if self.objective.partition(":")[0] != "elbo" and self.elbo == "jit":
            raise ConfigError("objective", f"{self.objective!r} does not run under the JIT (elbo='jit', the VAE's "
                              "--jit); train it without the JIT")
        check_choice(self, "optimizer", OPTIMIZERS.names())
        check_choice(self, "step", STEPS)
        check_choice(self, "accelerator", ACCELERATORS)
        check_choice(self, "strategy", STRATEGIES)
        check_choice(self, "precision", PRECISIONS)
        if self.step in ("traced", "compiled"):  # asked for by name: refused where it cannot apply
            if self.elbo not in (None, "trace") or self.objective != "elbo":
                raise ConfigError("step", f"{self.step!r} traces Trace_ELBO's loss; elbo={self.elbo!r} with "
                                  f"objective={self.objective!r} is computed eagerly (step 'auto' or 'eager')")
            if self.devices * self.num_nodes > 1:
                raise ConfigError("step", f"{self.step!r} runs in one process; data-parallel training "
                                  "(devices x num_nodes > 1) computes Pyro's loss eagerly (step 'auto' or 'eager')")
        if self.elbo == "jit" and self.devices * self.num_nodes > 1:
            raise ConfigError("elbo", "'jit' reads parameters from Pyro's global parameter store and cannot train "
                              "data-parallel; use 'trace' (the same estimator) with --devices > 1")
        if self.warmup_epochs > 0 and self.warmup_epochs >= self.epochs:
            # every epoch would train the tempered objective (β < 1): no best state, and numbers that are not the ELBO
            raise ConfigError("warmup_epochs", f"{self.warmup_epochs} epochs of KL warm-up leave none of the "
                              f"{self.epochs} epochs to train the ELBO itself; raise --epochs (epochs) above "
                              f"{self.warmup_epochs} or lower --warmup-epochs (warmup_epochs) below {self.epochs}")


def default_warmup(warmup_epochs: int, epochs: int) -> int:
    """A default KL warm-up fitted to ``epochs``: unchanged when shorter than them, else half of them (rounded down),
    so that at least half of the epochs train the ELBO itself. (A warm-up the user chose is never shortened:
    :class:`TrainConfig` refuses one of ``epochs`` or more.)"""
    return warmup_epochs if warmup_epochs < epochs else max(0, min(warmup_epochs, epochs // 2))


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history and the facts of the fit. It prints as a few summary lines
    (model, guide, epochs, best validation bound, time per epoch); ``.history`` holds every epoch's row."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    #: the best validation value of the monitored bound (``monitor``: the ELBO, or IWAE-K under an iwae objective)
    best_valid_elbo: float | None = None
    #: the history column that early stopping and the best checkpoint followed
    monitor: str = "valid_elbo"
    train_seconds: float = 0.0
    steps: int = 0
    #: the estimator that was used (a name in ``ELBOS``)
    elbo: str = ""
    #: wall time of every optimiser step (loss, backward, update), for benchmarks
    step_seconds: list[float] = field(default_factory=list)
    #: when this fit was chosen among several (restarts), all of them, itself included
    restarts: list[FitResult] = field(default_factory=list)
    #: the best checkpoint's path (``None`` without an output directory)
    best_checkpoint: str | None = None
    #: this process's rank among the data-parallel processes (0: the one that evaluates and writes)
    rank: int = 0
    #: how the steps computed the loss: ``traced``, ``compiled`` or ``eager`` (see ``TrainConfig.step``), and, for
    #: ``eager`` where tracing was considered, why it did not apply
    step: str = ""
    step_note: str = ""
    #: the fitted model's registered name and the guide's spec (``""`` where not known)
    model_name: str = ""
    guide_spec: str = ""

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(1, len(self.history))

    def __repr__(self) -> str:
        """A few summary lines, not the history: ``FitResult(model=vae, guide=iaf:2, epochs=100 (best 97), valid
        ELBO -92.010, 25.2 s/epoch)``, then steps, estimator and where the rest is."""
        head = [f"{k}={v}" for k, v in (("model", self.model_name), ("guide", self.guide_spec)) if v]
        if not self.history:
            return f"FitResult({', '.join([*head, 'no epoch trained'])})"
        epochs = int(self.history[-1].get("epoch", len(self.history)))
        head.append(f"epochs={epochs}" + (f" (best {self.best_epoch})" if self.best_epoch else ""))
        if self.best_valid_elbo is not None:
            bound = {"valid_elbo": "valid ELBO", "valid_iwae": "valid IWAE-K"}.get(self.monitor, self.monitor)
            head.append(f"{bound} {self.best_valid_elbo:.3f}")
        elif "train_loss" in self.history[-1]:
            head.append(f"train loss {self.history[-1]['train_loss']:.3f} (last epoch)")
        spe = self.seconds_per_epoch
        head.append(f"{spe:.1f} s/epoch" if spe >= 1 else f"{spe:.2g} s/epoch")
        lines = [f"FitResult({', '.join(head)})"]
        how = [f"{self.steps} steps" + (f" ({self.step})" if self.step else "")]
        if self.elbo:
            how.append(f"estimator {self.elbo}")
        if self.rank:
            how.append(f"rank {self.rank}")
        how.append(f".history: {len(self.history)} rows")
        lines.append("  " + ", ".join(how))
        if self.restarts:
            lines.append(f"  best of {len(self.restarts)} restarts (.restarts)")
        if self.best_checkpoint:
            lines.append(f"  best checkpoint: {self.best_checkpoint}")
        return "\n".join(lines)


def check_elbo(traits: ModelTraits, name: str | None) -> str:
    """The estimator to train a model with ``traits``: ``name``, or the model's default; refuses one that would
    optimise the wrong objective for this model (e.g. ``trace`` on an enumerated site). Needs no data and no
    parameters, so an experiment checks it before loading anything."""
    name = name or traits.default_elbo
    ELBOS[name]  # noqa: B018 - an unknown name raises, listing the valid ones
    if name not in traits.elbos:
        note = f" ({traits.elbo_note})" if traits.elbo_note else ""
        raise ConfigError("elbo", f"{name!r} cannot train this {traits.name} model{note}; "
                          f"usable: {', '.join(traits.elbos)}")
    return name


def resolve_elbo(model: LatentModel, name: str | None) -> str:
    """:func:`check_elbo` for a built model."""
    return check_elbo(model.traits, name)


def load_checkpoint(path: str | Path, model: LatentModel, guide: torch.nn.Module) -> dict[str, Any]:
    """Restore model and guide parameters from a checkpoint written by :func:`fit` (Lightning's ``.ckpt``), into
    a freshly built guide too (a Pyro autoguide's lazily built parameters are made first)."""
    from .saving import materialize

    ckpt = read_checkpoint(path, map_location=module_device(model))
    state = ckpt["state_dict"]
    if isinstance(guide, torch.nn.Module) and any(k.startswith("guide.") for k in state) and \
            not dict(guide.named_parameters()):
        materialize(model, guide)
    model.load_state_dict(_prefixed(state, "model."))
    guide.load_state_dict(_prefixed(state, "guide."))
    return ckpt


def _prefixed(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _latent_sites(model: LatentModel) -> set[str]:
    return {model.local_site} if model.local_site else set(model.global_sites)


#: set while :func:`fit` trains on data it checked when they came in: a model may skip its per-call data check
_DATA_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("pyro_lvm_data_checked", default=False)


def data_checked() -> bool:
    """Whether the data a model is called on now were checked at the library's boundary (inside :func:`fit`, which
    checks training and validation data once, as they come in), so that its per-minibatch check can be skipped."""
    return _DATA_CHECKED.get()


@contextlib.contextmanager
def _checked_data() -> Iterator[None]:
    token = _DATA_CHECKED.set(True)
    try:
        yield
    finally:
        _DATA_CHECKED.reset(token)


def _step_kind(config: TrainConfig, elbo_name: str, objective: str, steps: int, has_params: bool) -> tuple[str, str]:
    """How this fit's steps compute the loss (``traced``, ``compiled`` or ``eager``), and, where tracing does not
    apply, why (empty where that is no news: asked for eagerly, nothing to train, a fit too short to gain)."""
    if config.step == "eager" or not has_params:
        return "eager", ""
    if objective != "elbo":
        return "eager", f"the objective {config.objective!r} has no traced step"
    if elbo_name != "trace":
        return "eager", f"the traced step computes Trace_ELBO; elbo {elbo_name!r} runs in Pyro"
    if config.devices * config.num_nodes > 1:
        return "eager", "data-parallel training (DDP) computes Pyro's loss in every process"
    if config.precision not in (None, "32-true", "64-true"):
        return "eager", f"precision {config.precision!r} casts inside the step, which a traced graph would fix"
    if config.step == "auto" and steps < TRACE_MIN_STEPS:
        return "eager", ""
    if config.step == "compiled" or (config.step == "auto" and steps >= COMPILE_MIN_STEPS):
        return "compiled", ""
    return "traced", ""


def _fit(model: LatentModel, guide: Any, train: torch.Tensor, valid: torch.Tensor | None, config: TrainConfig,
         elbo_name: str, user_callbacks: Sequence[Callback] = ()) -> FitResult:
    from lightning import pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar

    from .plan import (
        ArrayDataModule,
        AtomicCheckpointIO,
        BestCheckpoint,
        DivergenceGuard,
        EarlyStop,
        KLWarmup,
        LastCheckpoint,
        MetricsCSV,
        NoProfiler,
        PeakMemory,
        ProgressLines,
        SVIPlan,
        data_parallel_strategy,
        fingerprint,
    )

    n = train.shape[0]
    batch = n if config.batch_size is None else min(int(config.batch_size), n)
    objective, draws = parse_objective(config.objective)
    if objective != "elbo":  # checked against the model in fit()
        elbo = OBJECTIVES[objective].make(draws)
        elbo_name = f"{objective}:{draws}"
    else:
        jit = {"ignore_jit_warnings": True} if elbo_name == "jit" else {}
        elbo = ELBOS[elbo_name](num_particles=config.num_particles, vectorize_particles=config.num_particles > 1,
                                max_plate_nesting=getattr(model, "max_plate_nesting", 1), **jit)
    if callable(getattr(guide, "init_from_data", None)):
        guide.init_from_data(train)  # data-dependent initialisation of the guide, where it has one
    # an IWAE objective is validated (and its checkpoints and early stopping judged) on IWAE-K with its own K
    val = EvalConfig(iwae_k=max(config.val_samples, draws or 1), posterior_samples=config.val_samples)
    plan = SVIPlan(model, guide, elbo, latent_sites=_latent_sites(model), total_size=n,
                   optimizer=functools.partial(OPTIMIZERS[config.optimizer], lr=config.lr),
                   clip_norm=config.clip_norm, val_config=val, val_bound="elbo" if objective == "elbo" else "iwae")
    try:
        plan(train[: min(2, n)])  # creates the lazily built parameters of autoguides, before optimiser and DDP see them
    except (NotImplementedError, KeyError) as e:  # DReG scores z under a detached copy of q, which flows without
        entry = OBJECTIVES[objective]                   # an analytic inverse cannot do
        if entry is None or not entry.needs_density or (isinstance(e, KeyError) and "cache" not in str(e)):
            raise  # (Pyro's planar and radial raise a KeyError about their cache; any other KeyError is a bug)
        raise ConfigError("objective", f"{config.objective!r} needs a guide whose q(z|x) can score a given z "
                          f"(Gaussian guides, exact, iaf, householder); {getattr(guide, 'spec', type(guide).__name__)}"
                          " cannot (its flow has no analytic inverse); use iwae:K") from None
    model_ids = {id(p) for p in model.parameters()}
    params = list(model.parameters()) if config.train_model else []
    if config.train_guide and isinstance(guide, torch.nn.Module):
        params += [p for p in guide.parameters() if id(p) not in model_ids]
    params = [p for p in params if p.requires_grad]
    epochs = config.epochs if params else min(config.epochs, 1)  # nothing to learn: one pass for the record
    plan.set_trainable(params, config.lr_final_factor ** (1 / epochs) if config.lr_final_factor != 1.0 else None)
    # minibatch order: its own generator, from the fit's seed (else drawn from the caller's RNG)
    order_seed = config.seed if config.seed is not None else int(torch.randint(2**62, ()).item())
    accelerator = _accelerator(config.accelerator, model)
    data = ArrayDataModule(train, valid, batch=batch, valid_batch=max(1, val.max_rows // val.iwae_k), seed=order_seed,
                           drop_last=elbo_name == "jit",  # a traced graph is specialised to its input shape
                           workers=config.workers, pin_memory=accelerator == "gpu" and train.device.type == "cpu")
    planned = epochs * len(data.sampler)
    steps = min(planned, config.max_steps or planned)
    step, why = _step_kind(config, elbo_name, objective, steps, bool(params))
    if step != "eager":
        plan.use_traced_step(compile=step == "compiled")
        if step == "compiled" and config.step == "auto":
            STEP_LOG.info("fit: %d steps planned: the traced step is compiled (torch.compile, about 20 s once per "
                          "minibatch shape; --step traced skips it)", steps)
    else:
        plan.step_note = why
        if why:
            STEP_LOG.info("fit: %s; training with Pyro's %s step", why, elbo_name)

    out_dir = Path(config.output) if config.output else None
    scratch = tempfile.TemporaryDirectory(prefix="pyro_lvm_fit_") if out_dir is None and config.restore_best else None
    ckpt_dir = out_dir or (Path(scratch.name) if scratch else None)
    monitor = plan.monitor if valid is not None else "train_elbo"
    callbacks: list[Any] = [KLWarmup(config.warmup_epochs), DivergenceGuard(), PeakMemory(), *user_callbacks]
    best = last = None
    if config.restore_best and ckpt_dir is not None:
        best = BestCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max", save_top_k=1,
                              auto_insert_metric_name=False, enable_version_counter=False)
        best.scratch = scratch is not None  # deleted when fit returns: errors must not point at it
        callbacks.append(best)
    if out_dir is not None:
        last = LastCheckpoint(out_dir, every_n_epochs=config.checkpoint_every, min_seconds=config.checkpoint_seconds)
        callbacks.append(last)
    if out_dir is not None:
        callbacks.append(MetricsCSV(out_dir / "metrics.csv", min_seconds=config.checkpoint_seconds))
    if config.patience is not None:
        callbacks.append(EarlyStop(monitor=monitor, mode="max", patience=config.patience, check_finite=False))
    show_bar = not config.quiet and sys.stderr.isatty()
    if show_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, len(data.sampler) // 50)))
    elif not config.quiet and config.progress_seconds > 0 and \
            not any(isinstance(cb, ProgressLines) for cb in callbacks):  # a caller's own ProgressLines replaces it
        callbacks.append(ProgressLines(config.progress_seconds, label=str(getattr(guide, "spec", ""))))
    trainer = pl.Trainer(
        accelerator=accelerator, devices=config.devices, num_nodes=config.num_nodes,
        strategy=data_parallel_strategy(config.strategy, config.devices * config.num_nodes, config.ddp_timeout),
        precision=config.precision, max_epochs=epochs, max_steps=config.max_steps or -1,
        check_val_every_n_epoch=config.eval_every, num_sanity_val_steps=0,
        limit_val_batches=None if valid is not None else 0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=best is not None or last is not None, enable_progress_bar=show_bar,
        enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
        default_root_dir=str(ckpt_dir) if ckpt_dir else None, plugins=[AtomicCheckpointIO()],
        profiler=NoProfiler())
    plan.extra_checkpoint_state = {
        "version": _version(), "train_config": to_dict(config), "elbo": elbo_name,
        "model": {"name": getattr(model, "name", type(model).__name__),
                  "config": to_dict(getattr(model, "config", None))},
        "guide": {"spec": getattr(guide, "spec", type(guide).__name__),
                  "config": to_dict(getattr(guide, "guide_config", None))},
        "data": fingerprint(train) if out_dir is not None or config.resume is not None else None}
    plan.restore_rng = config.seed is not None
    resume = config.resume
    if resume == "last":
        resume = str(out_dir / "last.ckpt") if out_dir is not None and (out_dir / "last.ckpt").is_file() else None
    elif resume is not None and not Path(resume).is_file():
        raise ConfigError("resume", f"no checkpoint at {resume}; give a last.ckpt written by an earlier fit")
    if resume is not None:
        read_checkpoint(resume)  # refused here, in one line naming it, if it is unreadable or would run code
    try:
        result = _run_trainer(trainer, plan, data, resume, best, valid, elbo_name, scratch is not None)
        result.model_name = getattr(model, "name", "") or type(model).__name__
        result.guide_spec = getattr(guide, "spec", "") or type(guide).__name__
        return result
    finally:
        if scratch is not None:
            scratch.cleanup()


def _run_trainer(trainer: Any, plan: Any, data: Any, resume: str | None, best: Any, valid: torch.Tensor | None,
                 elbo_name: str, scratch: bool) -> FitResult:
    """``trainer.fit``, with Lightning's Ctrl-C exit and distribution-check errors turned into ours; then the best
    state restored (in every process: they all read rank 0's file, and wait for each other before it may go)."""
    from .plan import kept, nonfinite_parameters, where

    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(plan, datamodule=data, ckpt_path=resume, weights_only=True)  # data, never code
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1); the caller gets the KeyboardInterrupt back
            signal.signal(signal.SIGINT, previous_sigint)
            raise KeyboardInterrupt from None
        raise
    except ValueError as e:  # distribution argument checks reject non-finite parameters
        bad = nonfinite_parameters(plan)
        if not bad:
            raise
        error = TrainingError(f"parameters became non-finite ({', '.join(bad[:3])}) before {where(trainer)}; "
                              f"the previous step diverged{kept(trainer)}")
        raise _rolled_back(error, plan, best) from e
    except TrainingError as e:
        raise _rolled_back(e, plan, best) from None
    device = trainer.strategy.root_device
    result = FitResult(history=plan.history, elbo=elbo_name, steps=len(plan.step_seconds), monitor=plan.monitor,
                       step_seconds=plan.step_seconds, rank=trainer.global_rank,
                       train_seconds=plan.history[-1]["seconds"] if plan.history else 0.0,
                       step=plan.step_kind, step_note=plan.step_note)
    if best is not None and best.best_model_path:
        ckpt = read_checkpoint(best.best_model_path)
        result.best_epoch = ckpt["pyro_lvm"]["history"][-1]["epoch"]
        result.best_valid_elbo = float(best.best_model_score) if valid is not None else None
        result.best_checkpoint = None if scratch else best.best_model_path
        plan.load_state_dict(ckpt["state_dict"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0's scratch directory outlives every process's read of it
    plan.to(device)  # Lightning's teardown leaves the module on the CPU
    return result

def fit(
    model: LatentModel,
    guide: Any,
    train: object,
    valid: object | None = None,
    config: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    **overrides: Any,
) -> FitResult:
    """Maximise the ELBO of ``model`` with ``guide`` on ``train``; returns the per-epoch history.

    ``train``/``valid`` are arrays, tensors or DataFrames of shape (points, features) of any float dtype;
    they are checked and converted to the model's dtype and device. ``overrides`` replace fields of
    ``config`` (``fit(model, guide, x, epochs=50, seed=0)``). ``callbacks`` are Lightning callbacks of your own,
    run beside the plan's.

    ``resume=".../last.ckpt"`` continues a fit from its checkpoint: parameters, optimiser, learning-rate schedule,
    epoch, early-stopping and best-checkpoint state, minibatch order, history and (for a seeded fit) the random
    stream; the result equals the uninterrupted fit's. A checkpoint of a different model, guide or data set is
    refused, naming what differs.

    The best state by validation ELBO (or by training loss when there is no validation set) is
    restored at the end unless ``config.restore_best`` is False.

    Training runs on PyTorch Lightning (:mod:`pyro_lvm.plan`): ``accelerator``, ``devices``, ``num_nodes``,
    ``strategy`` and ``precision`` go to its ``Trainer``. With ``devices * num_nodes > 1`` every process runs
    this function (Lightning re-launches the script); only ``rank == 0`` of the result should evaluate and write.
    Afterwards model and guide are on the device they trained on.

    Side effects are the caller's choice: ``seed=None`` leaves the caller's RNG alone (a seed fixes the
    run and restores the caller's RNG state afterwards); ``threads`` applies only when given;
    the fit runs with Pyro's ``module_local_params`` on (models never share parameters) and restores the
    caller's setting. With ``elbo="jit"`` (``JitTrace_ELBO``, which reads parameters from Pyro's global
    parameter store), the fit runs with module-local parameters off inside a fresh parameter-store scope,
    so the caller's own parameters are untouched.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides) if overrides else (config or TrainConfig())
    from pyro_lvm.guides import check_guide_belongs
    from pyro_lvm.wrap import model_for

    model = model_for(model, guide)
    elbo_name = resolve_elbo(model, config.elbo)
    problem = objective_problem(model.traits, config.objective, config.elbo, config.num_particles)
    if problem is not None:
        raise ConfigError("objective", problem)
    check_guide_belongs(model, guide)
    train = model.validate_training(train, name="training data")
    valid = None if valid is None else model.validate(valid, name="validation data")
    # the data are checked here, once: the models' per-minibatch checks stand down inside the fit
    with runtime_threads(config.threads), seeded(config.seed), _lightning_scope(), _checked_data():
        if elbo_name != "jit":
            with local_params(model, guide):
                return _fit(model, guide, train, valid, config, elbo_name, callbacks)
        with pyro.settings.context(module_local_params=False), pyro.get_param_store().scope(), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            return _fit(model, guide, train, valid, config, elbo_name, callbacks)


def _rolled_back(error: TrainingError, plan: Any, best: Any) -> TrainingError:
    """After a divergence, model and guide in memory go back to the best state so far, where there is one."""
    if best is None or not best.best_model_path:
        return error
    ckpt = read_checkpoint(best.best_model_path)
    plan.load_state_dict(ckpt["state_dict"])
    epoch = ckpt["pyro_lvm"]["history"][-1]["epoch"]
    return TrainingError(f"{error}; model and guide rolled back to the best state (epoch {epoch})")


def _version() -> str:
    try:
        return importlib.metadata.version("pyro-lvm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _accelerator(name: str | None, model: LatentModel) -> str:
    """Lightning's accelerator name: ``name`` (``cuda`` read as ``gpu``), or where the model already is."""
    if name is None:
        return {"cuda": "gpu", "mps": "mps"}.get(module_device(model).type, "cpu")
    name = "gpu" if name == "cuda" else name
    if name == "gpu" and not torch.cuda.is_available():
        raise ConfigError("accelerator", "'gpu' asked for, but torch sees no CUDA device; use cpu or auto")
    return name


@contextlib.contextmanager
def _lightning_scope() -> Iterator[None]:
    """Lightning, quietly and without lasting effects: its INFO lines (devices found, tips) and the warnings that
    do not apply to this plan are silenced, and what a DDP launch changes (torch threads, ``OMP_NUM_THREADS``) is
    put back afterwards."""
    import lightning.pytorch  # noqa: F401 - first: importing it sets its loggers' levels, which are saved here

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    n_threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            for message in _QUIET:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


#: Lightning warnings that say nothing about this plan: it loads data in-process on purpose, logs values it has
#: already reduced over processes, writes checkpoints beside the run's other files, may have nothing
#: to optimise; and torch deprecates a pytree API (LeafSpec) that Lightning 2.6 still calls
_QUIET = (".*does not have many workers.*", ".*exists and is not empty.*",
          ".*configure_optimizers.* returned `None`.*", ".*GPU available but not used.*",
          ".*`training_step` returns `None`.*", ".*You defined a `validation_step` but have no `val_dataloader`.*",
          ".*LeafSpec.*", ".*sync_dist=True.*")

"""Fitting by stochastic variational inference: ``fit(model, guide, train, valid, TrainConfig(...))``.

The objective is Pyro's ELBO (``Trace_ELBO`` by default) used as a differentiable loss, optimised
with Adam over minibatches (the data plate rescales each minibatch to the full data set), with
gradient clipping, optional linear KL warm-up, early stopping on the validation ELBO with restore
of the best state, checkpoints, and a NaN guard that names the epoch and step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from pyro_lvm.config import ConfigError, check_choice, check_config, to_dict
from pyro_lvm.models.base import LatentModel, ModelTraits
from pyro_lvm.registry import Registry
from pyro_lvm.runtime import DEVICES, local_params, module_device, resolve_device, seeded
from pyro_lvm.runtime import threads as runtime_threads

from .evaluate import EvalConfig, bounds
from .saving import atomic_torch_save


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


class TrainingError(RuntimeError):
    """Training stopped: the loss or the parameters became non-finite."""


@dataclass
class TrainConfig:
    """How :func:`fit` trains. Every field is checked when the config is made (``ValueError`` naming it)."""

    #: passes over the training data
    epochs: int = 100
    #: minibatch size; ``None`` uses the whole training set each step
    batch_size: int | None = 100
    #: Adam's learning rate
    lr: float = 1e-3
    #: the learning rate decays exponentially to ``lr * lr_final_factor`` over the epochs (1: constant)
    lr_final_factor: float = 1.0
    #: clip the global gradient norm to this value (``None``: no clipping)
    clip_norm: float | None = 100.0
    #: samples of the latents per data point in each ELBO estimate (vectorised)
    num_particles: int = 1
    #: ELBO estimator, a name in ``ELBOS``; ``None``: the model's own default (``model.default_elbo``)
    elbo: str | None = None
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
    #: optimise the model's parameters (False: hold the model fixed, train only the guide)
    train_model: bool = True
    #: optimise the guide's parameters
    train_guide: bool = True
    #: fixes initialisation-free randomness of the fit (minibatch order, samples); ``None``: the caller's RNG
    seed: int | None = None
    #: torch threads during the fit (``None``: leave the caller's setting)
    threads: int | None = None
    #: "cpu", "cuda", "mps" or "auto": move model, guide and data there first (``None``: the model's device)
    device: str | None = None
    #: directory for checkpoints (``None``: no checkpoints)
    output: str | None = None
    #: no progress bar
    quiet: bool = False
    #: stop after this many optimiser steps in total (tests, benchmarks)
    max_steps: int | None = None

    def __post_init__(self) -> None:
        check_config(self, positive_int=("epochs", "batch_size", "num_particles", "patience", "val_samples",
                                         "eval_every", "checkpoint_every", "max_steps", "threads"),
                     nonneg_int=("warmup_epochs",), positive=("lr", "clip_norm", "lr_final_factor"))
        if self.lr_final_factor > 1:
            raise ConfigError("lr_final_factor", f"must be in (0, 1] (the rate decays), got {self.lr_final_factor}")
        check_choice(self, "elbo", ELBOS.names())
        check_choice(self, "device", DEVICES)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError("seed", f"must be an integer or None, got {self.seed!r}")


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_elbo: float | None = None
    train_seconds: float = 0.0
    steps: int = 0
    #: the estimator that was used (a name in ``ELBOS``)
    elbo: str = ""
    #: wall time of every optimiser step (loss, backward, update), for benchmarks
    step_seconds: list[float] = field(default_factory=list)
    #: when this fit was chosen among several (restarts), all of them, itself included
    restarts: list[FitResult] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(1, len(self.history))


class AnnealLatents(Messenger):
    """Multiply the log-density of the named latent sites by ``beta`` (KL warm-up), in model and guide."""

    def __init__(self, sites: set[str], beta: float = 1.0) -> None:
        super().__init__()
        self.sites, self.beta = sites, beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and msg["name"] in self.sites and not msg["is_observed"] and self.beta != 1.0:
            msg["scale"] = msg["scale"] * self.beta


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
    """Restore model and guide parameters from a checkpoint written by :func:`fit`."""
    ckpt = torch.load(path, weights_only=False, map_location=module_device(model))
    model.load_state_dict(ckpt["model"])
    guide.load_state_dict(ckpt["guide"])
    return ckpt


def _latent_sites(model: LatentModel) -> set[str]:
    return {model.local_site} if model.local_site else set(model.global_sites)


def _fit(model: LatentModel, guide: Any, train: torch.Tensor, valid: torch.Tensor | None, config: TrainConfig,
         elbo_name: str) -> FitResult:
    n = train.shape[0]
    batch = n if config.batch_size is None else min(int(config.batch_size), n)

    anneal = AnnealLatents(_latent_sites(model))
    jit = {"ignore_jit_warnings": True} if elbo_name == "jit" else {}
    elbo = ELBOS[elbo_name](num_particles=config.num_particles, vectorize_particles=config.num_particles > 1,
                            max_plate_nesting=1, **jit)

    # beta travels as a keyword so that JitTrace_ELBO (which hashes keywords) retraces when it changes
    def model_fn(x: torch.Tensor, total_size: int | None = None, beta: float = 1.0) -> None:
        anneal.beta = beta
        with anneal:
            model(x, total_size)

    def guide_fn(x: torch.Tensor, total_size: int | None = None, beta: float = 1.0) -> None:
        anneal.beta = beta
        with anneal:
            guide(x, total_size)

    def loss_fn(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        # total_size as a keyword: JitTrace_ELBO traces tensor arguments and hashes keyword arguments
        return elbo.differentiable_loss(model_fn, guide_fn, x, total_size=n, beta=beta) / n

    if callable(getattr(guide, "init_from_data", None)):
        guide.init_from_data(train)  # data-dependent initialisation of the guide, where it has one
    loss_fn(train[: min(2, n)])  # creates the lazily built parameters of autoguides
    model_ids = {id(p) for p in model.parameters()}
    params = list(model.parameters()) if config.train_model else []
    if config.train_guide and isinstance(guide, torch.nn.Module):
        params += [p for p in guide.parameters() if id(p) not in model_ids]
    params = [p for p in params if p.requires_grad]
    optim = torch.optim.Adam(params, lr=config.lr) if params else None
    if optim is None:  # nothing to learn (e.g. the exact guide on a fixed model): one pass for the record
        config = dataclasses.replace(config, epochs=min(config.epochs, 1))
    decay = None
    if optim is not None and config.lr_final_factor != 1.0 and config.epochs > 0:
        decay = torch.optim.lr_scheduler.ExponentialLR(optim, config.lr_final_factor ** (1 / config.epochs))

    out_dir = Path(config.output) if config.output else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    result = FitResult(elbo=elbo_name)
    best_state = _state(model, guide)
    best_score, since_best, last_good = -math.inf, 0, None
    # minibatch order: its own generator, from the fit's seed (else drawn from the caller's RNG)
    order_seed = config.seed if config.seed is not None else int(torch.randint(2**62, ()).item())
    gen = torch.Generator().manual_seed(order_seed)
    # a traced graph is specialised to its input shape, so the JIT drops a last, smaller minibatch
    steps_per_epoch = n // batch if elbo_name == "jit" else math.ceil(n / batch)
    quiet = config.quiet or not sys.stderr.isatty()
    bar = tqdm(range(1, config.epochs + 1), desc="train", disable=quiet, leave=False)
    t0 = time.perf_counter()
    for epoch in bar:
        beta = min(1.0, epoch / config.warmup_epochs) if config.warmup_epochs > 0 else 1.0
        perm = (torch.randperm(n, generator=gen) if batch < n else torch.arange(n)).to(train.device)
        total, count = 0.0, 0
        for step in range(1, steps_per_epoch + 1):
            xb = train[perm[(step - 1) * batch: step * batch]]
            t_step = time.perf_counter()
            try:
                loss = loss_fn(xb, beta)
            except ValueError as e:  # distribution argument checks reject non-finite parameters
                bad = [name for name, p in _named_parameters(model, guide) if not torch.isfinite(p).all()]
                if not bad:
                    raise
                raise TrainingError(f"parameters became non-finite ({', '.join(bad[:3])}) before "
                                    f"{_where(epoch, step, result.steps)}; the previous step diverged"
                                    f"{_kept(last_good)}") from e
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at {_where(epoch, step, result.steps)}"
                                    f"{_kept(last_good)}")
            if optim is not None:
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                optim.step()
            total += loss.item() * len(xb)
            result.step_seconds.append(time.perf_counter() - t_step)
            count += len(xb)
            result.steps += 1
            if config.max_steps and result.steps >= config.max_steps:
                break
        row: dict[str, float] = {"epoch": epoch, "train_loss": total / count, "beta": beta,
                                 "seconds": time.perf_counter() - t0, "max_rss_mib": _max_rss_mib()}
        if valid is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
            model.eval()
            if isinstance(guide, torch.nn.Module):
                guide.eval()
            val = EvalConfig(iwae_k=config.val_samples, posterior_samples=config.val_samples)
            row["valid_elbo"] = bounds(model, guide, valid, val)["elbo"].mean().item()
            model.train()
            if isinstance(guide, torch.nn.Module):
                guide.train()
        result.history.append(row)
        if decay is not None:
            decay.step()
        score = row.get("valid_elbo", -row["train_loss"])
        # during warm-up the objective is not yet the ELBO, so early stopping waits for it to end
        if beta == 1.0 and ("valid_elbo" in row or valid is None):
            if score > best_score:
                best_score, since_best, result.best_epoch = score, 0, epoch
                if config.restore_best:
                    best_state = _state(model, guide)
                if out_dir and config.restore_best:
                    atomic_torch_save({**best_state, "epoch": epoch, "config": to_dict(config)}, out_dir / "best.pt")
            else:
                since_best += 1
        if out_dir and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
            last_good = out_dir / "last.pt"
            atomic_torch_save({**_state(model, guide), "epoch": epoch, "history": result.history,
                               "optimizer": optim.state_dict() if optim else None,
                               "config": to_dict(config)}, last_good)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", valid=f"{row.get('valid_elbo', float('nan')):.3f}")
        if config.patience is not None and since_best >= config.patience:
            break
        if config.max_steps and result.steps >= config.max_steps:
            break
    result.train_seconds = time.perf_counter() - t0
    if best_score > -math.inf and config.restore_best:
        model.load_state_dict(best_state["model"])
        if isinstance(guide, torch.nn.Module):
            guide.load_state_dict(best_state["guide"])
    result.best_valid_elbo = best_score if valid is not None and best_score > -math.inf else None
    return result


def fit(
    model: LatentModel,
    guide: Any,
    train: object,
    valid: object | None = None,
    config: TrainConfig | None = None,
    **overrides: Any,
) -> FitResult:
    """Maximise the ELBO of ``model`` with ``guide`` on ``train``; returns the per-epoch history.

    ``train``/``valid`` are arrays, tensors or DataFrames of shape (points, features) of any float dtype;
    they are checked and converted to the model's dtype and device. ``overrides`` replace fields of
    ``config`` (``fit(model, guide, x, epochs=50, seed=0)``).

    The best state by validation ELBO (or by training loss when there is no validation set) is
    restored at the end unless ``config.restore_best`` is False.

    Side effects are the caller's choice: ``seed=None`` leaves the caller's RNG alone (a seed fixes the
    run and restores the caller's RNG state afterwards); ``threads`` and ``device`` apply only when given;
    the fit runs with Pyro's ``module_local_params`` on (models never share parameters) and restores the
    caller's setting. With ``elbo="jit"`` (``JitTrace_ELBO``, which reads parameters from Pyro's global
    parameter store), the fit runs with module-local parameters off inside a fresh parameter-store scope,
    so the caller's own parameters are untouched.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides) if overrides else (config or TrainConfig())
    elbo_name = resolve_elbo(model, config.elbo)
    device = resolve_device(config.device)
    if device is not None:
        model.to(device)
        if isinstance(guide, torch.nn.Module):
            guide.to(device)
    train = model.validate_training(train, name="training data")
    valid = None if valid is None else model.validate(valid, name="validation data")
    with runtime_threads(config.threads), seeded(config.seed):
        if elbo_name != "jit":
            with local_params(model, guide):
                return _fit(model, guide, train, valid, config, elbo_name)
        with pyro.settings.context(module_local_params=False), pyro.get_param_store().scope(), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            return _fit(model, guide, train, valid, config, elbo_name)


def _where(epoch: int, step: int, steps_done: int) -> str:
    return f"epoch {epoch}, step {step} (global step {steps_done + 1})"


def _kept(last_good: Path | None) -> str:
    return f"; last good checkpoint: {last_good}" if last_good else ""


def _max_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _named_parameters(model: LatentModel, guide: Any) -> list[tuple[str, torch.Tensor]]:
    out = [(f"model.{n}", p) for n, p in model.named_parameters()]
    if isinstance(guide, torch.nn.Module):
        out += [(f"guide.{n}", p) for n, p in guide.named_parameters()]
    return out


def _state(model: LatentModel, guide: Any) -> dict[str, Any]:
    return {"model": copy.deepcopy(model.state_dict()),
            "guide": copy.deepcopy(guide.state_dict()) if isinstance(guide, torch.nn.Module) else {}}

"""The training plan: Pyro's ELBO module inside a ``LightningModule``, the data as a ``LightningDataModule``,
and the few callbacks Lightning lacks (KL warm-up, the divergence guard, the peak-memory record).

Lightning runs the loop: epochs, minibatches, backward, gradient clipping, the optimiser and its learning-rate
schedule, validation, checkpoints, early stopping, the progress bar, the CSV log, and data parallelism. What is
ours is the objective and its bookkeeping:

* :class:`SVIPlan` -- ``training_step`` returns ``-ELBO(x_b) / N``, Pyro's estimate of the full-data ELBO from a
  minibatch (the data plate scales the minibatch's log-likelihood by ``N / B``), divided by ``N`` so that the loss
  and its gradient are per data point. Under data parallelism each of R processes computes this estimate from its
  own minibatch, with the plate scaled to the *full* data set, and DDP averages the R gradients: the average of
  R unbiased estimates of ``∇ ELBO / N`` is again one, with the variance of a minibatch R times larger; a prior
  term (no plate) enters each process's loss once and so the average once. Summing instead of averaging, or
  scaling each plate to the process's shard, would each train a different objective.
* :class:`ArrayDataModule` -- rows of one tensor, in index minibatches from :class:`MinibatchSampler`, which
  shards one shared permutation over the processes.

Nothing here reads or writes global state: the plan holds its own generator for minibatch order and draws
samples from the torch RNG the caller (or ``fit(seed=...)``) set up.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.profilers import PassThroughProfiler
from pyro.infer import ELBO

from .evaluate import EvalConfig, bounds
from .objectives import TracedLoss, TraceUnsupported, reparameterized_elbo_loss
from .report import atomic_write
from .saving import atomic_torch_save
from .train import STEP_LOG, AnnealLatents, TrainingError


# ---------------------------------------------------------------------------------------------- objective
class Annealed(torch.nn.Module):
    """``module(x, total_size)`` run under :class:`AnnealLatents` at weight ``beta``.

    The wrapped module is held in a tuple, not registered: the plan owns model and guide (their parameters and
    state-dict keys are ``model.*`` and ``guide.*``), this is only the callable Pyro's ELBO module calls.
    ``beta`` arrives as a keyword so that ``JitTrace_ELBO`` (which hashes keyword arguments) retraces when it
    changes."""

    def __init__(self, module: Callable[..., Any], anneal: AnnealLatents) -> None:
        super().__init__()
        self._module, self._anneal = (module,), anneal

    def forward(self, x: torch.Tensor, total_size: int | None = None, beta: float = 1.0) -> Any:
        self._anneal.beta = beta
        with self._anneal:
            return self._module[0](x, total_size)


class SVIPlan(pl.LightningModule):
    """One SVI fit: ``model`` and ``guide`` (registered submodules) and the ELBO module ``elbo(model, guide)``.

    ``optimizer(params)`` builds the optimiser. What it optimises is set by :meth:`set_trainable`, once the plan
    has been run and every lazily built parameter exists (until then, and with none, the plan only records the
    loss, e.g. the exact guide on a fixed model)."""

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module, elbo: ELBO, *, latent_sites: set[str],
                 total_size: int, optimizer: Callable[[list[torch.Tensor]], Any], clip_norm: float | None,
                 val_config: EvalConfig, val_bound: str = "elbo") -> None:
        super().__init__()
        self.model, self.guide = model, guide
        anneal = AnnealLatents(latent_sites)
        self.loss = elbo(Annealed(model, anneal), Annealed(guide, anneal))  # Pyro's ELBOModule
        self.total_size, self.val_config = total_size, val_config
        #: the held-out bound that validation reports and checkpoints follow: ``elbo``, or ``iwae`` when the
        #: objective is IWAE-K (logged as ``valid_<bound>``)
        self.val_bound = val_bound
        self.monitor = f"valid_{val_bound}"
        self._optimizer, self.clip_norm = optimizer, clip_norm
        self._params: list[torch.Tensor] = []
        self._lr_gamma: float | None = None
        # the step is written out in training_step (Lightning's manual optimisation: its backward, its gradient
        # clipping, its optimiser wrapper); the automatic loop's closure machinery cost ~8% of an MNIST VAE step
        self.automatic_optimization = False
        self.beta = 1.0
        self.history: list[dict[str, float]] = []
        self.row: dict[str, float] = {}
        self.step_seconds: list[float] = []
        self.extra_checkpoint_state: dict[str, Any] = {}
        #: on resume, continue the checkpoint's random stream (only when the fit is seeded: else the caller's RNG
        #: is the caller's)
        self.restore_rng = False
        self._sum, self._count = 0.0, 0
        self.last_loss = math.nan  # the latest minibatch's loss, read by _record
        self._vsum = self._vcount = None
        self._t0 = self._t_step = self._tv = 0.0
        self._train_seconds_before = 0.0  # time of the epochs done before a resume
        #: the training loss as a traced graph (:meth:`use_traced_step`), ``None``: Pyro's ELBO module each step
        self.traced: TracedLoss | None = None
        #: why the steps run eagerly where the traced step would not apply (see :attr:`step_note`)
        self._eager_note = ""
        self._beta_tensor: torch.Tensor | None = None
        # the step without Lightning's backward and optimiser wrappers (single process, plain precision, no callback
        # on the backward or optimiser hooks): decided when training starts
        self._direct = False
        self._guard: DivergenceGuard | None = None

    def set_trainable(self, params: list[torch.Tensor], lr_gamma: float | None = None) -> None:
        """Optimise ``params``; ``lr_gamma`` is the per-epoch factor of an exponential learning-rate decay
        (``None``: constant)."""
        self._params, self._lr_gamma = params, lr_gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``-ELBO(x) / N``, the per-point training loss (the plate scales the minibatch to ``N`` points)."""
        return self.loss(x, total_size=self.total_size, beta=self.beta) / self.total_size

    def use_traced_step(self, compile: bool = False) -> None:
        """Train on the traced loss (:class:`~pyro_lvm.objectives.TracedLoss`): ``Trace_ELBO``'s loss and gradient for
        reparameterised sites, traced once per minibatch shape and replayed; the first step of each shape is checked
        against Pyro's. The KL warm-up weight is an input of the graph (one trace serves every epoch of warm-up).
        Where tracing fails, training goes on with Pyro's loss and says why once (``step_note``)."""
        elbo, model, guide = self.loss.elbo, self.loss.model, self.loss.guide
        total = self.total_size

        def traced(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
            return reparameterized_elbo_loss(elbo, model, guide, x, total_size=total, beta=beta) / total

        def reference(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
            return self.loss(x, total_size=total, beta=beta) / total

        self.traced = TracedLoss(self, traced, reference, compile=compile)

    @property
    def step_kind(self) -> str:
        """How the steps run: ``compiled``, ``traced`` (also where the compiler gave way) or ``eager``."""
        if self.traced is None:
            return "eager"
        return "compiled" if self.traced.compile else "traced"

    @property
    def step_note(self) -> str:
        """Why the steps do not run as asked (tracing does not apply, or the compiler gave way), else ``""``."""
        return self._eager_note if self.traced is None else self.traced.note

    @step_note.setter
    def step_note(self, why: str) -> None:
        self._eager_note = why

    def _stop_tracing(self, e: TraceUnsupported) -> None:
        """Train with Pyro's loss from now on, and say why once."""
        self.traced, self._eager_note = None, str(e)
        STEP_LOG.info("fit: %s; training with Pyro's Trace_ELBO step instead", e)

    def training_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The minibatch's training loss, as :meth:`forward`, through the traced graph where there is one."""
        if self.traced is not None and torch.is_grad_enabled():
            try:
                return self.traced(x, self._beta())
            except TraceUnsupported as e:
                self._stop_tracing(e)
        return self(x)

    def _joint_loss_and_grads(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]] | None:
        """The loss and its gradients from the traced graph that holds backward too (one process, no hooks between
        the loss and the update: :meth:`_can_step_directly`), or ``None`` where the step has no traced graph."""
        if self.traced is None:
            return None
        try:
            return self.traced.loss_and_grads(x, self._beta())
        except TraceUnsupported as e:
            self._stop_tracing(e)
            return None

    def _beta(self) -> torch.Tensor:
        """The warm-up weight as a 0-d tensor (an input of the traced graph), made once per value."""
        b = self._beta_tensor
        if b is None or float(b) != self.beta:
            like = next(iter(self._params), None)
            b = self._beta_tensor = torch.tensor(self.beta, dtype=like.dtype if like is not None else None,
                                                 device=self.device)
        return b

    def configure_optimizers(self) -> Any:
        if not self._params:
            return None
        optim = self._optimizer(self._params)
        if self._lr_gamma is None:
            return optim
        decay = torch.optim.lr_scheduler.ExponentialLR(optim, self._lr_gamma)
        return {"optimizer": optim, "lr_scheduler": {"scheduler": decay, "interval": "epoch"}}

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_train_start(self) -> None:
        # every process starts from the same seed (same initialisation, same data order); their noise must
        # differ, or the R minibatches' draws of ε would repeat each other (still unbiased, but R times less
        # averaging than R processes should give). Each offsets one shared draw by its rank: one seed fixes all.
        if self.trainer.world_size > 1:
            base = int(torch.randint(2**62, ()).item())
            torch.manual_seed(base + self.trainer.global_rank)
        self._direct = self._can_step_directly()
        if self.traced is not None:
            self.traced.refresh()  # Lightning may have moved the parameters (and resumed them) since

    #: hooks that Lightning's backward and optimiser wrappers run; a callback on any of them keeps those wrappers
    _STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")

    def _can_step_directly(self) -> bool:
        """Whether :meth:`training_step` may call backward, clipping and the optimiser itself: one process, a plain
        precision (no scaler, no autocast), and no hook of its own or of a callback's on those steps except the
        divergence guard's, which the step runs itself."""
        from lightning.pytorch.plugins.precision import DoublePrecision, Precision

        trainer = self.trainer
        if trainer.world_size > 1 or type(trainer.precision_plugin) not in (Precision, DoublePrecision):
            return False
        if any(getattr(type(self), hook) is not getattr(pl.LightningModule, hook) for hook in self._STEP_HOOKS):
            return False
        for cb in trainer.callbacks:
            if isinstance(cb, DivergenceGuard):
                if type(cb).on_before_backward is not DivergenceGuard.on_before_backward:
                    return False
                continue
            if any(getattr(type(cb), hook) is not getattr(Callback, hook) for hook in self._STEP_HOOKS):
                return False
        self._guard = next((cb for cb in trainer.callbacks if isinstance(cb, DivergenceGuard)), None)
        return True

    def on_train_epoch_start(self) -> None:
        # callbacks ran first: KLWarmup has set this epoch's beta
        self.row = {"epoch": self.current_epoch + 1, "beta": self.beta}
        self._sum, self._count = 0.0, 0
        self._t_step = time.perf_counter()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if not self._params:  # nothing to learn: record the loss only
            with torch.no_grad():
                self._record(self(batch), batch)
            return
        optim = self.optimizers()
        if self._direct:  # what the wrappers below do on one process, without their dispatch through hooks
            joint = self._joint_loss_and_grads(batch)
            loss = self.training_loss(batch) if joint is None else joint[0]
            self._record(loss, batch)
            if self._guard is not None:
                self._guard.on_before_backward(self.trainer, self, loss)
            for p in self._params:  # zero_grad(set_to_none=True), without its per-call dynamo guard (0.1 ms)
                p.grad = None
            if joint is None:
                loss.backward()
            else:  # the joint graph's gradients, where backward would have put them
                for p, g in zip(self.traced.grad_params(), joint[1], strict=True):  # type: ignore[union-attr]
                    p.grad = g
            if self.clip_norm:
                clip_grad_norm(self._params, self.clip_norm)
            optim._on_before_step()  # the loop's step count (global_step, max_steps), as LightningOptimizer.step
            optim.optimizer.step()
            optim._on_after_step()
            return
        loss = self.training_loss(batch)
        self._record(loss, batch)
        optim.zero_grad(set_to_none=True)
        self.manual_backward(loss)  # DivergenceGuard's on_before_backward checks the loss first
        if self.clip_norm:
            self.clip_gradients(optim, gradient_clip_val=self.clip_norm, gradient_clip_algorithm="norm")
        optim.step()

    def _record(self, loss: torch.Tensor, batch: torch.Tensor) -> None:
        # read once per step as a Python float (one synchronisation, which the hand-written loop paid too), for
        # the epoch's mean here and the divergence guard's check; tensor accumulation would add three kernel
        # launches per step
        self.last_loss = loss.item()
        self._sum += self.last_loss * len(batch)
        self._count += len(batch)

    @property
    def epoch_loss(self) -> float:
        """The mean training loss (−ELBO per point) of this epoch's steps so far, in this process; NaN before any."""
        return self._sum / self._count if self._count else math.nan

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # wall time per iteration, end to end: data, forward, backward, clipping, update and every hook
        now = time.perf_counter()
        self.step_seconds.append(now - self._t_step)
        self._t_step = now

    def on_train_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            sums = torch.tensor([self._sum, self._count], dtype=torch.float64, device=self.device)
            total, count = self.trainer.strategy.reduce(sums, reduce_op="sum")
            self.row["train_loss"] = (total / count).item()
        else:  # the same float64 division
            self.row["train_loss"] = self._sum / self._count
        self.row["seconds"] = self._train_seconds_before + time.perf_counter() - self._t0
        self.history.append(self.row)
        # only what the callbacks watch is published to them; the whole row is in the history and metrics.csv
        self._publish("train_elbo", -self.row["train_loss"])
        decay = self.lr_schedulers() if self._params else None
        if decay is not None:  # once per epoch, after its validation (manual optimisation steps it here)
            decay.step()

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._tv = time.perf_counter()
        self._vsum, self._vcount = torch.zeros((), dtype=torch.float64, device=self.device), 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        value = bounds(self.model, self.guide, batch, self.val_config)[self.val_bound]
        self._vsum += value.double().sum()
        self._vcount += len(value)

    def on_validation_epoch_end(self) -> None:
        # one reduction over the processes for both sums, as at the end of a training epoch
        sums = torch.stack([self._vsum, torch.tensor(float(self._vcount), dtype=torch.float64, device=self.device)])
        total, count = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self.row[self.monitor] = (total / count).item()
        self.row["valid_seconds"] = time.perf_counter() - self._tv
        self._publish(self.monitor, self.row[self.monitor])

    def _publish(self, name: str, value: float) -> None:
        """``value`` as ``trainer.callback_metrics[name]``, where checkpoints and early stopping read it: what
        ``self.log(name, value, on_epoch=True)`` leaves there (a 0-d tensor of the default float dtype, float32 at
        least, reduced over one value), without the result collection that ``self.log`` keeps, which costs a
        full-batch fit of a small model some milliseconds per epoch, a thousand times over."""
        dtype = torch.get_default_dtype()
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self.trainer.callback_metrics[name] = torch.tensor(value, dtype=dtype, device=self.device)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Beside Lightning's state (parameters, optimiser, schedule, loops, callbacks, data order): what the fit
        was (configs of model, guide and training, library version, data fingerprint), its history, and every RNG
        state, so a checkpoint stands alone and a resumed fit continues the same random stream."""
        checkpoint["pyro_lvm"] = {**self.extra_checkpoint_state, "history": list(self.history),
                                  "rng": rng_states()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("pyro_lvm")
        if state is None:
            raise ValueError("resume: the checkpoint was not written by pyro_lvm.fit (no 'pyro_lvm' entry)")
        differ = [f"{key}: checkpoint {state.get(key)!r}, this fit {mine!r}"
                  for key, mine in self.extra_checkpoint_state.items()
                  if key in ("model", "guide", "data") and state.get(key) != mine]
        if differ:  # say what differs before Lightning loads mismatched tensors
            raise ValueError("resume: the checkpoint belongs to a different fit; " + "; ".join(differ))
        self.history = list(state.get("history", []))
        if self.history:
            self._train_seconds_before = self.history[-1].get("seconds", 0.0)
        if self.restore_rng and "rng" in state:
            set_rng_states(state["rng"])


# ---------------------------------------------------------------------------------------------- data
class MinibatchSampler(torch.utils.data.Sampler):
    """Index minibatches, one shuffled pass per epoch, sharded over ``world`` processes.

    A private generator seeded by ``seed`` draws each epoch's permutation; every process draws the same one (same
    seed, same number of draws) and process ``rank`` takes its every ``world``-th index, padded by wrapping round
    (as ``DistributedSampler``) so every process runs the same number of steps. With one process the order is a
    fresh ``randperm(n)`` per epoch from one generator, cut into batches of ``batch`` and a smaller last one.
    ``shuffle=False`` keeps the data order and does not pad (evaluation: each point once)."""

    def __init__(self, n: int, batch: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.shuffle, self.drop_last, self.rank, self.world = n, batch, shuffle, drop_last, \
            rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def _shard_size(self) -> int:
        return math.ceil(self.n / self.world) if self.shuffle else len(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        m = self._shard_size()
        return m // self.batch if self.drop_last else math.ceil(m / self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle and self.batch < self.n:
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.arange(self.n)
        if self.shuffle and self.world > 1:
            m = self._shard_size()
            order = torch.cat([order, order[: m * self.world - self.n]])  # pad so every shard has m
        order = order[self.rank::self.world]
        for i in range(len(self)):
            yield order[i * self.batch: (i + 1) * self.batch]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        # index_select, not x[index]: the same rows, gathered in 11 µs against 49 µs for 100 MNIST rows at one thread
        if isinstance(self.x, torch.Tensor) and isinstance(index, torch.Tensor) and index.dim() == 1:
            return torch.index_select(self.x, 0, index)
        return self.x[index]  # rows streamed from a file (MappedRows) gather themselves


class ArrayDataModule(pl.LightningDataModule):
    """Training and validation rows of two tensors, as minibatches from :class:`MinibatchSampler`.

    The training sampler is built once (its generator carries the minibatch order across epochs and into
    checkpoints); rank and world size are read from the trainer when the loaders are built, so the same module
    serves one process or many. ``workers`` > 0 loads batches in worker processes; ``pin_memory`` pins them for a
    faster copy to a GPU."""

    def __init__(self, train: torch.Tensor, valid: torch.Tensor | None, *, batch: int, valid_batch: int,
                 seed: int, drop_last: bool = False, workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        # rows are gathered every step: a row-major copy makes that a read of B contiguous rows (a column-major
        # 50,000 x 784 tensor, as NumPy's unpacking can leave MNIST, cost 0.8 ms per minibatch of 100)
        self.train_x = train.contiguous()
        self.valid_x = None if valid is None else valid.contiguous()
        self.batch, self.valid_batch, self.drop_last = batch, valid_batch, drop_last
        self.workers, self.pin_memory = workers, pin_memory
        self.sampler = MinibatchSampler(train.shape[0], batch, seed=seed, drop_last=drop_last)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, x: torch.Tensor, sampler: MinibatchSampler) -> torch.utils.data.DataLoader:
        # the loader's own generator: DataLoader draws a base seed per epoch, and must not draw it from the global RNG
        return torch.utils.data.DataLoader(_Rows(x), sampler=sampler, batch_size=None, num_workers=self.workers,
                                           pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0),
                                           persistent_workers=self.workers > 0)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self.sampler.rank, self.sampler.world = self._rank_world()
        return self._loader(self.train_x, self.sampler)

    def val_dataloader(self) -> Any:
        if self.valid_x is None:
            return []
        rank, world = self._rank_world()
        sampler = MinibatchSampler(self.valid_x.shape[0], self.valid_batch, shuffle=False, rank=rank, world=world)
        return self._loader(self.valid_x, sampler)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


# ---------------------------------------------------------------------------------------------- callbacks
class KLWarmup(Callback):
    """Linear KL warm-up: the weight on the latent sites' log-densities is ``min(1, epoch / epochs)``."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        epoch = trainer.current_epoch + 1
        plan.beta = min(1.0, epoch / self.epochs) if self.epochs > 0 else 1.0


class DivergenceGuard(Callback):
    """Stops training with a :class:`TrainingError` naming epoch and step when it diverges. The rule:

    * the loss is NaN or ±inf; or
    * the loss rises by two orders of magnitude over the lowest loss seen in this fit:
      ``loss > best + EXPLOSION * max(|best|, 1)`` (per data point, so the scale is the model's nats per point:
      an MNIST VAE starts near 550 and falls, a factor model near 10-50; minibatch noise and KL warm-up move a
      healthy loss by tens of percent, never a hundredfold); or
    * a parameter leaves ±``MAX_PARAMETER`` (1e8: where float32 can no longer resolve a unit change), checked at
      every epoch's end.

    The loss is checked before backward, so the update that would spread a bad value never runs; parameters are
    checked before any checkpoint of that epoch is written, so no checkpoint holds a diverged state."""

    EXPLOSION = 100.0
    MAX_PARAMETER = 1e8

    def __init__(self) -> None:
        self.best = math.inf
        self._watched: list[torch.Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        # the parameters, once per fit (after Lightning has placed and restored them): walking the module tree and
        # detaching at every epoch's end cost a full-batch fit a tenth of a millisecond per epoch
        self._watched = self._parameters(plan)

    @staticmethod
    def _parameters(plan: SVIPlan) -> list[torch.Tensor]:
        return [p.detach() for p in plan.parameters() if p.numel()]

    def on_before_backward(self, trainer: pl.Trainer, plan: SVIPlan, loss: torch.Tensor) -> None:
        value = plan.last_loss  # this loss, already read to a float by the plan
        if not math.isfinite(value):
            bad = nonfinite_parameters(plan)  # the loss is non-finite because the parameters are: say that
            if bad:
                raise TrainingError(f"parameters became non-finite ({', '.join(bad[:3])}) before {where(trainer)}; "
                                    f"the previous step diverged{kept(trainer)}")
            raise TrainingError(f"loss became {value} at {where(trainer)}{kept(trainer)}")
        if self.best < math.inf and value > self.best + self.EXPLOSION * max(abs(self.best), 1.0):
            raise TrainingError(f"loss diverged at {where(trainer)}: {value:.4g} nats per point against a best of "
                                f"{self.best:.4g} (a rise over {self.EXPLOSION:.0f}x its size); lower --lr / lr "
                                f"(the learning rate) or raise --warmup-epochs / warmup_epochs (the KL warm-up)"
                                f"{kept(trainer)}")
        self.best = min(self.best, value)

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        # one pass over every parameter (the largest magnitude: NaN where any entry is NaN, and NaN <= x is False);
        # the names are looked up only when something is wrong
        params = self._watched if self._watched is not None else self._parameters(plan)
        if not params:
            return
        norms = torch._foreach_norm(params, math.inf)  # the largest magnitude of all, in three operations
        if not _one_kind(norms):
            norms = [m.to(norms[0]) for m in norms]
        if float(torch.stack(norms).max()) <= self.MAX_PARAMETER:
            return
        bad = nonfinite_parameters(plan)
        if bad:
            raise TrainingError(f"parameters became non-finite ({', '.join(bad[:3])}) by the end of epoch "
                                f"{trainer.current_epoch + 1}{kept(trainer)}")
        huge = [name for name, p in plan.named_parameters()
                if p.numel() and p.detach().abs().max() > self.MAX_PARAMETER]  # an empty head (k = 1) has no max
        if huge:
            raise TrainingError(f"parameters diverged ({', '.join(huge[:3])} beyond ±{self.MAX_PARAMETER:.0e}) by "
                                f"the end of epoch {trainer.current_epoch + 1}; lower --lr / lr (the learning rate)"
                                f"{kept(trainer)}")

    def on_train_end(self, trainer: pl.Trainer, plan: SVIPlan) -> None:  # a max_steps stop ends mid-epoch
        self.on_train_epoch_end(trainer, plan)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}  # a resumed fit judges divergence against the same best

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


class PeakMemory(Callback):
    """Records the peak resident memory of the process (and of the GPU, when there is one) in each epoch's row."""

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        plan.row["max_rss_mib"] = max_rss_mib()
        if plan.device.type == "cuda":
            plan.row["max_gpu_mib"] = torch.cuda.max_memory_allocated(plan.device) / 2**20


class MetricsCSV(Checkpoint):
    """``metrics.csv``: every epoch's row of the history (losses, validation ELBO, warm-up weight, times, memory),
    rewritten whole and atomically after each epoch. Lightning's ``CSVLogger`` appends rows in place, so a kill
    during a write could leave a torn last line; this file is complete or absent, and after a resume it holds
    the epochs from before the stop too (the history travels in the checkpoint). A ``Checkpoint`` subclass so
    that Lightning runs it with the checkpoints, after the plan has closed the epoch's row."""

    def __init__(self, path: Any, min_seconds: float = 0.0) -> None:
        # at most once per min_seconds (as last.ckpt): a model whose epochs take milliseconds would otherwise spend
        # its time flushing this file to disk
        self.path, self.min_seconds, self._written_at = path, min_seconds, -math.inf

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        if time.monotonic() - self._written_at >= self.min_seconds:
            self._write(trainer, plan)

    def on_train_end(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        self._write(trainer, plan)

    def _write(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        if not trainer.is_global_zero or not plan.history:
            return
        self._written_at = time.monotonic()
        fields = list(dict.fromkeys(k for row in plan.history for k in row))

        def write(f: Any) -> None:
            out = csv.DictWriter(f, fieldnames=fields)
            out.writeheader()
            out.writerows(plan.history)

        atomic_write(self.path, write)


class _CachedStateKey:
    """Lightning formats a callback's ``state_key`` (a repr of its settings) on every hook call, once per callback
    and hook, to name a profiler action; the key never changes, so it is computed once."""

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_cached_state_key")
        if key is None:
            key = self.__dict__["_cached_state_key"] = super().state_key  # type: ignore[misc]
        return key


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler does nothing, but through a generator-based context manager entered around
    every hook call (some 80 per training step); this one hands out one shared null context."""

    _null = contextlib.nullcontext()

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return self._null


class _AfterWarmup:
    """During KL warm-up the objective is not yet the ELBO: best checkpoints and early stopping wait."""

    @staticmethod
    def warming_up(trainer: pl.Trainer) -> bool:
        return getattr(trainer.lightning_module, "beta", 1.0) < 1.0


class BestCheckpoint(_CachedStateKey, _AfterWarmup, ModelCheckpoint):
    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not self.warming_up(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)


class LastCheckpoint(_CachedStateKey, ModelCheckpoint):
    """``last.ckpt`` every ``every_n_epochs`` epochs but at most once per ``min_seconds`` (the first is always
    written), and once more when training ends, whenever that is."""

    def __init__(self, dirpath: Any, every_n_epochs: int, min_seconds: float = 0.0) -> None:
        # at the end of every training epoch, whether or not it validated (by default Lightning would wait for the
        # validation epochs when validation is not every epoch)
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, every_n_epochs=every_n_epochs,
                         enable_version_counter=False, save_on_train_epoch_end=True)
        self.min_seconds, self._written_at = min_seconds, -math.inf

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: pl.LightningModule) -> None:
        if time.monotonic() - self._written_at < self.min_seconds:
            return
        step = self._last_global_step_saved
        super().on_train_epoch_end(trainer, plan)
        if self._last_global_step_saved != step:
            self._written_at = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, plan: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))


class EarlyStop(_CachedStateKey, _AfterWarmup, EarlyStopping):
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if not self.warming_up(trainer):
            super()._run_early_stopping_check(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, flushed to disk and renamed over the target: a checkpoint file is
    complete or absent, whatever stops the process."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)



# ---------------------------------------------------------------------------------------------- data parallelism
class RendezvousError(TrainingError):
    """The data-parallel processes did not all join within ``TrainConfig.ddp_timeout`` seconds."""


#: seconds a process of a one-node data-parallel run waits silently for its peers (Lightning starts them itself)
#: before it says what it waits for; a process of several nodes says it at once
QUIET_WAIT_SECONDS = 5.0


def data_parallel_strategy(name: str, world: int, timeout: float) -> Any:
    """The ``Trainer``'s strategy: ``name`` itself for one process; for several, the DDP strategy ``name`` stands for
    (``auto``: the one Lightning would choose) as a :class:`WaitingDDP` whose rendezvous gives up after ``timeout``
    seconds, says what it waits for, and can be interrupted."""
    from lightning.pytorch.strategies import StrategyRegistry
    from lightning.pytorch.trainer.connectors.accelerator_connector import _IS_INTERACTIVE

    if world <= 1:
        return name
    if name == "auto":
        name = "ddp_fork" if _IS_INTERACTIVE else "ddp"
    if name not in StrategyRegistry or StrategyRegistry[name]["strategy"] is not pl.strategies.DDPStrategy:
        return name
    return WaitingDDP(rendezvous_timeout=timeout, **StrategyRegistry[name]["init_params"])


class WaitingDDP(pl.strategies.DDPStrategy):
    """Lightning's DDP, with a rendezvous (every process joining at ``MASTER_ADDR:MASTER_PORT``) that

    * says once on stderr what it waits for (at once when the run spans nodes, else after
      :data:`QUIET_WAIT_SECONDS`): a peer that never starts no longer means a silent hang;
    * honours SIGINT and SIGTERM while it waits: the wait runs in a helper thread, so the main thread stays in Python
      where signal handlers run (torch's TCPStore wait, in C++, would hold it until it times out);
    * gives up after ``rendezvous_timeout`` seconds with a :class:`RendezvousError` (one line at the command line).

    The timeout bounds the rendezvous only: once every process has joined, the process group's collectives get
    torch's default timeout back."""

    def __init__(self, *, rendezvous_timeout: float, **kwargs: Any) -> None:
        import datetime

        super().__init__(timeout=datetime.timedelta(seconds=rendezvous_timeout), **kwargs)
        self.rendezvous_timeout = rendezvous_timeout

    def setup_distributed(self) -> None:
        import threading

        self.set_world_ranks()
        env = self.cluster_environment
        assert env is not None
        address = f"{env.main_address}:{env.main_port}"
        failure: list[BaseException] = []

        def rendezvous() -> None:
            try:
                if self.root_device.type == "cuda":  # the CUDA device is per thread: this one's as the main thread's
                    torch.cuda.set_device(self.root_device)
                super(WaitingDDP, self).setup_distributed()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failure.append(e)

        helper = threading.Thread(target=rendezvous, name="pyro_lvm-rendezvous", daemon=True)
        helper.start()
        helper.join(0.0 if self.num_nodes > 1 else QUIET_WAIT_SECONDS)
        if helper.is_alive():
            print(f"rank {self.global_rank} (node {self.node_rank} of {self.num_nodes}): waiting for all "
                  f"{self.world_size} data-parallel processes ({self.num_processes} per node) to join at {address} "
                  f"(MASTER_ADDR:MASTER_PORT); giving up after {self.rendezvous_timeout:g} s (ddp_timeout)",
                  file=sys.stderr, flush=True)
        while helper.is_alive():  # short joins: SIGINT and SIGTERM handlers run between them
            helper.join(0.2)
        if failure:
            e = failure[0]
            if isinstance(e, torch.distributed.DistError):
                raise RendezvousError(
                    f"the {self.world_size} data-parallel processes did not all join within "
                    f"{self.rendezvous_timeout:g} s ({' '.join(str(e).split())[:200]}) ({address}, rank "
                    f"{self.global_rank}, node {self.node_rank} of {self.num_nodes}); start the same command on every "
                    f"node (NODE_RANK 0 to {self.num_nodes - 1}) with the same MASTER_ADDR and MASTER_PORT, reachable "
                    "from every node, or raise ddp_timeout (--ddp-timeout)") from None
            raise e
        set_timeout = getattr(torch.distributed.distributed_c10d, "_set_pg_timeout", None)
        if set_timeout is not None:  # collectives: torch's default, not the rendezvous's bound
            from torch.distributed.constants import default_pg_timeout

            set_timeout(default_pg_timeout, None)


# ---------------------------------------------------------------------------------------------- helpers
class ProgressLines(Callback):
    """Progress for output that is not a terminal (a log file, a CI job, a notebook cell), where a progress bar would
    print nothing useful: one line on ``stream`` (default: ``sys.stderr``) at least every ``every`` seconds of wall
    time, read from ``clock`` (``time.monotonic``; inject another to test without real time)::

        amortized: epoch 3/100, step 120/4000, train loss 12.345, valid ELBO -12.5 (epoch 3), 1m30s elapsed, ETA 48m10s

    The clock is read after every step and at the end of every epoch, after its validation: a step at which the
    interval has run out prints a line then (a long epoch reports within it), and an epoch in which the interval
    ran out prints one more line at its end, with its validation bound. A fit that printed a line ends with a
    ``done`` line. The train loss is the mean of the epoch's steps so far (−ELBO per point); the ETA is the
    remaining steps at this run's mean time per step (early stopping may end the fit sooner). Only the process of
    rank 0 prints. :func:`pyro_lvm.fit` adds one (``TrainConfig.progress_seconds``, ``--progress-seconds``) where
    stderr is not a terminal, unless ``callbacks`` hold one already."""

    #: the default clock, a class attribute so that a test can set a fake one for every fit of a process
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, every: float = 30.0, *, label: str = "", clock: Callable[[], float] | None = None,
                 stream: Any = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int | float) or not math.isfinite(every) or every <= 0:
            raise ValueError(f"every: must be a finite number of seconds > 0, got {every!r}")
        self.every, self.label, self.stream = float(every), label, stream
        if clock is not None:
            self.clock = clock  # type: ignore[method-assign]
        self.printed = 0
        self._t0 = self._due = 0.0
        self._steps = 0  # steps of this run (a resumed fit's earlier steps are not timed here)
        self._crossed = False
        self._last: int | None = None  # the step of the latest line
        self._valid: tuple[float, int] | None = None

    def on_train_start(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        self._t0 = self.clock()
        self._due, self._steps, self.printed, self._crossed, self._last = self._t0 + self.every, 0, 0, False, None
        seen = [(row[plan.monitor], int(row["epoch"])) for row in plan.history if plan.monitor in row]
        self._valid = seen[-1] if seen else None  # a resumed fit's last validation

    def on_train_batch_end(self, trainer: pl.Trainer, plan: SVIPlan, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps += 1
        if batch_idx + 1 >= self._per_epoch(trainer):
            return  # the epoch's last step: its end reports, after the validation
        now = self.clock()
        if now >= self._due:
            self._crossed = True
            self._say(trainer, plan, now, trainer.current_epoch * self._per_epoch(trainer) + batch_idx + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        # callbacks run before the plan's own hook: the validation of this epoch is in its row, the loss not yet
        epoch = trainer.current_epoch + 1
        if plan.monitor in plan.row:
            self._valid = (plan.row[plan.monitor], epoch)
        now = self.clock()
        if now >= self._due or self._crossed:
            self._crossed = False
            self._say(trainer, plan, now, epoch * self._per_epoch(trainer))

    def on_train_end(self, trainer: pl.Trainer, plan: SVIPlan) -> None:
        step = self._step_now(trainer)
        if self.printed and self._last != step:
            self._say(trainer, plan, self.clock(), step, done=True)

    @staticmethod
    def _per_epoch(trainer: pl.Trainer) -> int:
        n = trainer.num_training_batches
        return int(n) if isinstance(n, int) or (isinstance(n, float) and math.isfinite(n)) else 0

    def _total(self, trainer: pl.Trainer) -> int:
        total = (trainer.max_epochs or 0) * self._per_epoch(trainer)
        return min(total, trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else total

    def _step_now(self, trainer: pl.Trainer) -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.total.completed

    def _say(self, trainer: pl.Trainer, plan: SVIPlan, now: float, step: int, done: bool = False) -> None:
        self._due, self._last = now + self.every, step
        if not trainer.is_global_zero:
            return
        per_epoch, total = self._per_epoch(trainer), self._total(trainer)
        epoch = min(trainer.max_epochs or 0, (step - 1) // per_epoch + 1) if per_epoch else trainer.current_epoch + 1
        parts = [f"epoch {epoch}/{trainer.max_epochs}", f"step {step}/{total}" if total else f"step {step}"]
        loss = plan.epoch_loss if not done or not plan.history else plan.history[-1]["train_loss"]
        if math.isfinite(loss):
            parts.append(f"train loss {loss:.5g}")
        if self._valid is not None:
            bound = "ELBO" if plan.val_bound == "elbo" else f"IWAE-{plan.val_config.iwae_k}"
            parts.append(f"valid {bound} {self._valid[0]:.5g} (epoch {self._valid[1]})")
        elapsed = now - self._t0
        parts.append(f"{duration(elapsed)} elapsed")
        if not done and self._steps and total > step:
            parts.append(f"ETA {duration(elapsed / self._steps * (total - step))}")
        head = f"{self.label}: " if self.label else ""
        print(head + ("done, " if done else "") + ", ".join(parts), file=self.stream or sys.stderr, flush=True)
        self.printed += 1


def duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h02m``: a wall time as a progress line shows it."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def where(trainer: pl.Trainer) -> str:
    plan = trainer.lightning_module
    step = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return f"epoch {trainer.current_epoch + 1}, step {step} (global step {len(plan.step_seconds) + 1})"


def kept(trainer: pl.Trainer) -> str:
    # a checkpoint in the fit's scratch directory (``scratch``: no output was asked for) is gone when the error arrives
    paths = [getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
             for cb in trainer.checkpoint_callbacks if not getattr(cb, "scratch", False)]
    paths = [p for p in paths if p]
    return f"; last good checkpoint: {paths[-1]}" if paths else ""


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]


def _one_kind(tensors: list[torch.Tensor]) -> bool:
    """Whether all ``tensors`` share the first one's device and dtype (one stack, one multi-tensor kernel)."""
    return all(t.device == tensors[0].device and t.dtype == tensors[0].dtype for t in tensors)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``, the same numbers, without its pass over every gradient
    when there is nothing to clip (the scale ``max_norm / (norm + 1e-6)`` clamped to 1 multiplies by exactly 1)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if _one_kind(grads) and all(type(g) is torch.Tensor for g in grads):
        # what get_total_norm computes for one device and dtype (the per-tensor norms, then the norm of those),
        # without its grouping by device and dtype (11 µs of a factor model's 40)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    else:
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if norm.item() < max_norm * (1 - 1e-4):  # far from the threshold: the float32 test below is surely passed
        return
    if bool(max_norm / (norm + 1e-6) >= 1.0):  # NaN: not >= 1, so scaled as torch does
        return
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def rng_states() -> dict[str, Any]:
    """Every global RNG's state, as tensors and plain values (so ``torch.load(weights_only=True)`` reads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {"torch": torch.get_rng_state(),
                           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                           "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(x: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and BLAKE2b digest of a tensor's values: a resumed fit must see the same data."""
    if hasattr(x, "fingerprint"):  # data streamed from a file (pyro_lvm.data.MappedRows): the same digest, by blocks
        return x.fingerprint()
    arr = x.detach().cpu().contiguous().numpy()
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "blake2b": hashlib.blake2b(arr.data).hexdigest()}


def max_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024

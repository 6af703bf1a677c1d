"""The hand-written SVI loop that ``pyro_lvm.train.fit`` used before it ran on Lightning, frozen for the
step-time benchmark (``benchmarks/lightning_overhead.py``): same estimator, same minibatch order, same
validation, same checkpoints. Not used by the library.

Its per-step time is measured like the Lightning path's: wall time from the end of one optimiser step to the
end of the next (minibatch indexing and the loop's own bookkeeping included).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pyro_lvm.config import to_dict
from pyro_lvm.evaluate import EvalConfig, bounds
from pyro_lvm.models.base import LatentModel
from pyro_lvm.runtime import local_params, seeded
from pyro_lvm.saving import atomic_torch_save
from pyro_lvm.train import ELBOS, AnnealLatents, FitResult, TrainConfig, TrainingError, resolve_elbo


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
        t_step = time.perf_counter()
        for step in range(1, steps_per_epoch + 1):
            xb = train[perm[(step - 1) * batch: step * batch]]
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
            now = time.perf_counter()
            result.step_seconds.append(now - t_step)
            t_step = now
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


def _latent_sites(model: LatentModel) -> set[str]:
    return {model.local_site} if model.local_site else set(model.global_sites)


def fit_handwritten(model: LatentModel, guide: Any, train: torch.Tensor, valid: torch.Tensor | None,
                    config: TrainConfig) -> FitResult:
    """The old ``fit`` (no JIT, no device move): validate, seed, run the loop with module-local parameters."""
    elbo_name = resolve_elbo(model, config.elbo)
    train = model.validate_training(train, name="training data")
    valid = None if valid is None else model.validate(valid, name="validation data")
    with seeded(config.seed), local_params(model, guide):
        return _fit(model, guide, train, valid, config, elbo_name)

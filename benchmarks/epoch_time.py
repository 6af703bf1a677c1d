"""Benchmark: seconds per epoch of the MNIST VAE job, and where the epoch goes.

    python -m benchmarks.epoch_time --threads 1,2 --seeds 0,1,2 --output runs/bench_epoch

The job (the one a peer library was timed on): 784-300-300-40 VAE, Bernoulli decoder, diagonal Gaussian
encoder, ``Trace_ELBO``, Adam 1e-3, minibatches of 100 from the 50,000 training images, 5 epochs, the validation
ELBO on the 10,000 validation images after every epoch, ``best``/``last`` checkpoints as an experiment writes
them. Data loading is included: the epoch is timed from the first minibatch to the end of its checkpoints.

Variants (``--variants``): ``default`` (``fit`` with ``TrainConfig``'s own ``elbo``, ``optimizer`` and ``step``:
the library as a user calls it), ``lightning`` (``fit`` today: the traced ``Trace_ELBO`` step and Adam's fused kernel),
``lightning-eager-loop`` (``fit``'s default before them: Pyro every step, Adam's per-tensor loop),
``lightning-compiled`` (the traced step compiled by ``torch.compile``), ``lightning-jit`` (the same estimator through
``JitTrace_ELBO``), ``lightning-fused`` and ``lightning-jit-fused`` (the same with Adam's fused kernel,
``--optimizer adam-fused``), ``lightning-no-checkpoints`` (no output directory), ``handwritten`` (the loop ``fit``
used before Lightning, ``benchmarks/handwritten_loop.py``). Rounds interleave variants and thread counts, one seed per
round. The profile splits each epoch into training iterations (sum of step times), validation, checkpoint
writes, and the rest (epoch starts and ends, Lightning's hooks between steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import pyro_lvm.plan
from pyro_lvm.data import DataConfig, load_dataset
from pyro_lvm.experiments.cli import positive_int, run_main
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.runtime import seeded, threads
from pyro_lvm.train import TrainConfig, fit

from . import write_outputs
from .handwritten_loop import fit_handwritten

VARIANTS: dict[str, dict[str, Any]] = {
    # the library as a user calls it: TrainConfig's own elbo, optimizer and step (none of them set here)
    "default": {"checkpoints": True, "runner": fit},
    "lightning": {"elbo": "trace", "checkpoints": True, "runner": fit},
    # fit's default before the traced step and the fused optimiser: Pyro's Trace_ELBO each step, Adam's per-tensor loop
    "lightning-eager-loop": {"elbo": "trace", "step": "eager", "optimizer": "adam-loop", "checkpoints": True,
                             "runner": fit},
    "lightning-compiled": {"elbo": "trace", "step": "compiled", "checkpoints": True, "runner": fit},
    "lightning-jit": {"elbo": "jit", "checkpoints": True, "runner": fit},
    "lightning-fused": {"elbo": "trace", "optimizer": "adam-fused", "checkpoints": True, "runner": fit},
    "lightning-jit-fused": {"elbo": "jit", "optimizer": "adam-fused", "checkpoints": True, "runner": fit},
    "lightning-no-checkpoints": {"elbo": "trace", "checkpoints": False, "runner": fit},
    "handwritten": {"elbo": "trace", "checkpoints": True, "runner": fit_handwritten},
}


class _CheckpointTimer:
    """Adds up the wall time of every checkpoint write (Lightning's and the hand-written loop's)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._save = pyro_lvm.plan.atomic_torch_save

    def __enter__(self) -> _CheckpointTimer:
        import benchmarks.handwritten_loop as hw

        def timed(*args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            self._save(*args, **kwargs)
            self.seconds += time.perf_counter() - t0

        pyro_lvm.plan.atomic_torch_save = hw.atomic_torch_save = timed
        return self

    def __exit__(self, *exc: object) -> None:
        import benchmarks.handwritten_loop as hw

        pyro_lvm.plan.atomic_torch_save = hw.atomic_torch_save = self._save


def one_run(variant: str, seed: int, epochs: int, train: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
    spec = VARIANTS[variant]
    with seeded(seed):
        model = VAE(VAEConfig(data_dim=784, latent_dim=40, hidden=(300, 300)))
        guide = build_guide("amortized", model, GuideConfig(hidden=(300, 300)))
    runner: Callable[..., Any] = spec["runner"]
    with tempfile.TemporaryDirectory() as tmp, _CheckpointTimer() as ckpt:
        knobs = {k: spec[k] for k in ("elbo", "optimizer", "step") if k in spec}  # unset: TrainConfig's default
        cfg = TrainConfig(epochs=epochs, batch_size=100, lr=1e-3, seed=seed, quiet=True, **knobs,
                          output=tmp if spec["checkpoints"] else None, restore_best=spec["checkpoints"])
        t0 = time.perf_counter()
        fr = runner(model, guide, train, valid, cfg)
        wall = time.perf_counter() - t0
    n = len(fr.history)
    total = fr.train_seconds
    steps = sum(fr.step_seconds)
    valid_s = sum(h.get("valid_seconds", 0.0) for h in fr.history)
    # wall: the whole fit call (setup, every epoch with its checkpoints, restoring the best state) per epoch
    return {"seconds_per_epoch": total / n, "wall_seconds_per_epoch": wall / n,
            "steps_per_epoch": steps / n, "valid_per_epoch": valid_s / n,
            "checkpoints_per_epoch": ckpt.seconds / n, "rest_per_epoch": (total - steps - valid_s - ckpt.seconds) / n,
            "final_valid_elbo": fr.history[-1].get("valid_elbo", float("nan")), "step": fr.step}


def run(variants: Sequence[str], thread_counts: Sequence[int], seeds: Sequence[int], epochs: int,
        data_dir: str | None, subset: int | None) -> dict[str, Any]:
    ds = load_dataset("binarized_mnist", DataConfig(data_dir=data_dir, seed=0, subset=subset))
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:  # one round per seed; within it every variant at every thread count
        for n_threads in thread_counts:
            for variant in variants:
                with threads(n_threads):
                    r = one_run(variant, seed, epochs, ds.train, ds.valid)
                runs.setdefault(f"{variant}@{n_threads}", []).append(r)
                print(f"seed {seed} {variant} threads {n_threads}: {r['seconds_per_epoch']:.2f} s/epoch",
                      file=sys.stderr)
    summary = {}
    for key, rs in runs.items():
        spe = [r["seconds_per_epoch"] for r in rs]
        summary[key] = {
            "seconds_per_epoch_median": statistics.median(spe),
            "seconds_per_epoch_mean": statistics.fmean(spe),
            "seconds_per_epoch_sd": statistics.stdev(spe) if len(spe) > 1 else 0.0,
            "wall_seconds_per_epoch_median": statistics.median(r["wall_seconds_per_epoch"] for r in rs),
            "profile_median": {k: statistics.median(r[k] for r in rs)
                               for k in ("steps_per_epoch", "valid_per_epoch", "checkpoints_per_epoch",
                                         "rest_per_epoch")},
            "final_valid_elbo": [r["final_valid_elbo"] for r in rs],
            "runs": rs,
        }
    return {"benchmark": "epoch_time", "job": "MNIST VAE 784-300-300-40, Adam 1e-3, batch 100, validation every epoch",
            "train_points": len(ds.train), "valid_points": len(ds.valid), "epochs": epochs, "seeds": list(seeds),
            "results": summary}


def table(res: dict[str, Any]) -> str:
    lines = ["| variant @ threads | s / epoch (median) | mean ± sd | whole fit / epochs | steps | validation | "
             "checkpoints | rest |", "|---|---|---|---|---|---|---|---|"]
    for key, v in res["results"].items():
        p = v["profile_median"]
        lines.append(f"| {key} | {v['seconds_per_epoch_median']:.2f} | {v['seconds_per_epoch_mean']:.2f} ± "
                     f"{v['seconds_per_epoch_sd']:.2f} | {v['wall_seconds_per_epoch_median']:.2f} | "
                     f"{p['steps_per_epoch']:.2f} | {p['valid_per_epoch']:.2f} | "
                     f"{p['checkpoints_per_epoch']:.3f} | {p['rest_per_epoch']:.3f} |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.epoch_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="lightning,lightning-jit,lightning-no-checkpoints,handwritten")
    p.add_argument("--threads", type=_ints, default=[1, 2], help="comma-separated torch thread counts")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--subset", type=positive_int, default=None, help="training images (default: all 50,000)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", default="runs/bench_epoch")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    res = run(variants, a.threads, a.seeds, a.epochs, a.data_dir, a.subset)
    write_outputs(a.output, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

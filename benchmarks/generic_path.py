"""Benchmark: what the generic path costs. The MNIST VAE of the README's table as the built-in ``VAE`` model and
as a plain Pyro function through ``pyro_lvm.wrap_model``, the same guide, seconds per training step.

    python -m benchmarks.generic_path --threads 1 --output runs/bench_generic

Both are 784-300-300-40 with a Bernoulli decoder, minibatches of 100, Adam, the ``amortized`` guide with a
300-300 encoder; the wrapped model is :class:`MnistVAE` below (ordinary Pyro: a ``PyroModule`` whose ``forward``
samples z in ``pyro.plate("data", len(x))``). The generic path adds the unconstrained vector ``_u``, the write-back
of each site and the per-point scaling messenger; the target is at most 1.10× the built-in path. Rounds
interleave the two, so drift in machine speed hits each alike; each figure is the median over rounds of the
per-round median step (after warm-up steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.util import set_rng_seed as set_seed
from torch import nn

import pyro_lvm
from pyro_lvm.data import DataConfig, load_dataset
from pyro_lvm.experiments.cli import positive_int, run_main
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.train import TrainConfig, fit

from . import write_outputs

STEPS_PER_EPOCH = 500  # 50,000 training images in minibatches of 100


class MnistVAE(PyroModule):
    """z ~ N(0, I₄₀), x | z ~ Bernoulli(π(z)), π a 40-300-300-784 tanh MLP: the built-in VAE's model, as a user
    would write it."""

    def __init__(self, data_dim: int = 784, latent: int = 40, hidden: int = 300) -> None:
        super().__init__()
        self.latent = latent
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, data_dim))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


def build(path: str, seed: int) -> tuple[Any, Any]:
    set_seed(seed)
    if path == "built-in":
        model = VAE(VAEConfig(data_dim=784, latent_dim=40, hidden=(300, 300)))
    else:
        model = pyro_lvm.wrap_model(MnistVAE(), data_dim=784, encoder_input="identity")
    return model, build_guide("amortized", model, GuideConfig(hidden=(300, 300)))


def run(steps: int, warmup: int, seed: int, data_dir: str | None, threads: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    train = load_dataset("binarized_mnist", DataConfig(data_dir=data_dir, seed=seed)).train
    per_round: dict[str, list[float]] = {"built-in": [], "generic": []}
    for _ in range(repeats):
        for path in per_round:
            model, guide = build(path, seed)
            cfg = TrainConfig(epochs=1, batch_size=100, max_steps=warmup + steps, quiet=True, seed=seed,
                              restore_best=False)
            per_round[path].append(statistics.median(fit(model, guide, train, None, cfg).step_seconds[warmup:]))
    ratios = [g / b for g, b in zip(per_round["generic"], per_round["built-in"], strict=True)]
    timing = {k: {"seconds_per_step": statistics.median(v), "seconds_per_epoch": STEPS_PER_EPOCH * statistics.median(v)}
              for k, v in per_round.items()}
    return {"benchmark": "generic_path", "network": "784-300-300-40", "guide": "amortized", "batch_size": 100,
            "steps": steps, "warmup_steps": warmup, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "timing": timing, "ratio_generic_to_builtin": statistics.median(ratios), "ratio_per_round": ratios,
            "target_ratio": 1.10}


def table(res: dict[str, Any]) -> str:
    lines = ["| path | ms / step | s / epoch (500 steps) |", "|---|---|---|"]
    for k, v in res["timing"].items():
        lines.append(f"| {k} | {1000 * v['seconds_per_step']:.1f} | {v['seconds_per_epoch']:.1f} |")
    lines += ["", f"generic ÷ built-in: {res['ratio_generic_to_builtin']:.3f} (target ≤ {res['target_ratio']:.2f}; "
              f"per round {', '.join(f'{r:.3f}' for r in res['ratio_per_round'])}). Median over {res['repeats']} "
              f"interleaved rounds of the per-round median of {res['steps']} steps (after {res['warmup_steps']} "
              f"warm-up), {res['torch_threads']} torch thread(s)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generic_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--warmup", type=positive_int, default=10)
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds of the interleaved paths")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench_generic")
    a = p.parse_args(argv)
    res = run(a.steps, a.warmup, a.seed, a.data_dir, a.threads, a.repeats)
    write_outputs(a.output, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Benchmark: the price of each VAE family of the MNIST table, in seconds per training step and per epoch.

    python -m benchmarks.family_step_time --threads 1 --output runs/bench_families

The MNIST job of the README's table (784-300-300-40, Bernoulli decoder, minibatches of 100, Adam) trained by
``fit`` for a few hundred steps per family; each family's median step time, the ratio to the plain-PyTorch
vanilla VAE of ``benchmarks.vae_step_time`` (the same math written by hand: the reference measured in the same
rounds) and the implied seconds per epoch (500 steps). Rounds interleave the families, so drift in machine speed
(frequency, other load) hits each alike; each figure is the median over rounds of the per-round median.

Families (``--families``, each ``GUIDE[+PRIOR][/OBJECTIVE]``): the guide spec, the prior spec (``vamp:500``) and
the training objective (``iwae-dreg:5``), e.g. ``iaf:2+vamp:500`` or ``amortized/iwae-dreg:5``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch
from pyro.util import set_rng_seed as set_seed

from pyro_lvm.data import DataConfig, load_dataset
from pyro_lvm.experiments.cli import positive_int, run_main
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.train import TrainConfig, fit

from . import write_outputs
from .vae_step_time import plain_pytorch_steps

FAMILIES = ("amortized", "iaf:2", "planar:10", "sylvester-o:4", "sylvester-h:4", "sylvester-t:4",
            "amortized+vamp:500", "iaf:2+vamp:500", "amortized/iwae-dreg:5")
STEPS_PER_EPOCH = 500  # 50,000 training images in minibatches of 100


def parse_family(text: str) -> tuple[str, str, str]:
    """``"iaf:2+vamp:500/iwae-dreg:5"`` -> ("iaf:2", "vamp:500", "iwae-dreg:5"); prior and objective default to
    ``standard`` and ``elbo``."""
    rest, _, objective = text.partition("/")
    guide, _, prior = rest.partition("+")
    return guide, prior or "standard", objective or "elbo"


def build(family: str, seed: int, device: str = "cpu") -> tuple[VAE, Any]:
    guide_spec, prior, _ = parse_family(family)
    set_seed(seed)
    model = VAE(VAEConfig(data_dim=784, latent_dim=40, hidden=(300, 300), prior=prior)).to(device)
    return model, build_guide(guide_spec, model, GuideConfig(hidden=(300, 300), flow_hidden=(300,))).to(device)


def run(families: Sequence[str], steps: int, warmup: int, seed: int, data_dir: str | None, threads: int | None,
        repeats: int, device: str = "cpu") -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    # on a GPU the training images live on it, as fit's data module would pin and move them
    train = load_dataset("binarized_mnist", DataConfig(data_dir=data_dir, seed=seed)).train.to(device)
    paths = ["plain_pytorch", *families]
    per_round: dict[str, list[float]] = {k: [] for k in paths}
    params: dict[str, int] = {}
    for _ in range(repeats):
        for path in paths:
            if path == "plain_pytorch":
                model, guide = build("amortized", seed, device)
                times = plain_pytorch_steps(model, guide, train, warmup + steps, 100, seed)
            else:
                model, guide = build(path, seed, device)
                params[path] = sum(p.numel() for p in guide.parameters())
                cfg = TrainConfig(epochs=1, batch_size=100, max_steps=warmup + steps, quiet=True, seed=seed,
                                  restore_best=False, objective=parse_family(path)[2])
                times = fit(model, guide, train, None, cfg).step_seconds
            per_round[path].append(statistics.median(times[warmup:]))
    base = per_round["plain_pytorch"]
    vanilla = per_round.get("amortized")
    timing = {}
    for k, v in per_round.items():
        ratios = [a / b for a, b in zip(v, base, strict=True)]
        step = statistics.median(v)
        timing[k] = {"seconds_per_step": step, "seconds_per_epoch": STEPS_PER_EPOCH * step,
                     "ratio_to_plain": statistics.median(ratios), "ratio_per_round": ratios,
                     "ratio_to_vanilla": (statistics.median([a / b for a, b in zip(v, vanilla, strict=True)])
                                          if vanilla else None),
                     "guide_parameters": params.get(k)}
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    return {"benchmark": "family_step_time", "device": name, "network": "784-300-300-40", "batch_size": 100,
            "steps": steps,
            "warmup_steps": warmup, "repeats": repeats, "torch_threads": torch.get_num_threads(), "timing": timing}


def table(res: dict[str, Any]) -> str:
    lines = ["| family | ms / step | s / epoch (500 steps) | ratio to plain PyTorch (vanilla) | ratio to `amortized` "
             "| guide parameters |", "|---|---|---|---|---|---|"]
    for k, v in res["timing"].items():
        vanilla = "—" if v["ratio_to_vanilla"] is None else f"{v['ratio_to_vanilla']:.2f}"
        n = "—" if v["guide_parameters"] is None else f"{v['guide_parameters'] / 1e6:.2f} M"
        lines.append(f"| {k} | {1000 * v['seconds_per_step']:.1f} | {v['seconds_per_epoch']:.1f} | "
                     f"{v['ratio_to_plain']:.2f} | {vanilla} | {n} |")
    lines += ["", f"Median over {res['repeats']} interleaved rounds of the per-round median of {res['steps']} steps "
              f"(after {res['warmup_steps']} warm-up), {res['torch_threads']} torch thread(s), on "
              f"{res.get('device', 'cpu')}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.family_step_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated GUIDE[+PRIOR][/OBJECTIVE]")
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--warmup", type=positive_int, default=10)
    p.add_argument("--repeats", type=positive_int, default=3, help="rounds of the interleaved families")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where model, guide and data live")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench_families")
    a = p.parse_args(argv)
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    res = run(families, a.steps, a.warmup, a.seed, a.data_dir, a.threads, a.repeats, a.device)
    write_outputs(a.output, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

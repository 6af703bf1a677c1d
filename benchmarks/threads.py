"""How many torch threads to use: step time of a small and a large model at 1 and 2 threads.

    python -m benchmarks.threads --output runs/bench_threads            # idle machine
    python -m benchmarks.threads --busy --output runs/bench_threads_busy  # with a CPU-bound process beside it

Two workloads: the MNIST-sized VAE step (784-300-300-40, minibatch 100, random 0/1 data of MNIST's
density, no data file needed) and a factor-analysis step (30 features, k = 5, 341 points, full batch).
Rounds interleave the thread counts, so drift in machine load hits each alike; each figure is the median
over rounds of the per-round median step time. ``--busy`` starts one CPU-bound process (a Python busy
loop) for the duration, as when another job shares a 2-core machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from pyro_lvm import TrainConfig, build_guide, build_model, fit
from pyro_lvm.guides import GuideConfig
from pyro_lvm.runtime import seeded, threads

from . import write_outputs


def _spin(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def _vae() -> tuple[Any, Any, torch.Tensor]:
    with seeded(0):
        model = build_model("vae", data_dim=784, latent_dim=40, hidden=(300, 300))
        guide = build_guide("amortized", model, GuideConfig(hidden=(300, 300)))
        x = (torch.rand(2000, 784) < 0.13).float()
    return model, guide, x


def _fa() -> tuple[Any, Any, torch.Tensor]:
    with seeded(0):
        model = build_model("factor_analysis", data_dim=30, latent_dim=5)
        guide = build_guide("amortized", model, GuideConfig(hidden=()))
        x = torch.randn(341, 30)
    return model, guide, x


WORKLOADS = {"vae_mnist_step": (_vae, 100), "fa_full_batch_step": (_fa, None)}


def step_time(workload: str, n_threads: int, steps: int) -> float:
    make, batch = WORKLOADS[workload]
    model, guide, x = make()
    with threads(n_threads):
        fr = fit(model, guide, x, None, TrainConfig(epochs=100, batch_size=batch, max_steps=steps + 5, quiet=True,
                                                    seed=0))
    return statistics.median(fr.step_seconds[5:])


def run(steps: int, rounds: int, busy: bool) -> dict[str, Any]:
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,), daemon=True) if busy else None
    if spinner:
        spinner.start()
    try:
        per: dict[str, dict[int, list[float]]] = {w: {1: [], 2: []} for w in WORKLOADS}
        for _ in range(rounds):
            for w in WORKLOADS:
                for n in (1, 2):
                    per[w][n].append(step_time(w, n, steps))
    finally:
        stop.set()
        if spinner:
            spinner.join()
    out = {w: {f"threads_{n}_ms": 1000 * statistics.median(v) for n, v in d.items()} for w, d in per.items()}
    for d in out.values():
        d["speedup_2_over_1"] = d["threads_1_ms"] / d["threads_2_ms"]
    return {"benchmark": "threads", "busy": busy, "steps": steps, "rounds": rounds, "results": out}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy", action="store_true", help="run a CPU-bound process beside the measurement")
    p.add_argument("--output", default="runs/bench_threads")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(a.steps, a.rounds, a.busy)
    res["seconds"] = time.perf_counter() - t0
    lines = ["| workload | 1 thread ms/step | 2 threads ms/step | speed-up of 2 |", "|---|---|---|---|"]
    lines += [f"| {w} | {d['threads_1_ms']:.2f} | {d['threads_2_ms']:.2f} | {d['speedup_2_over_1']:.2f}x |"
              for w, d in res["results"].items()]
    write_outputs(a.output, res, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

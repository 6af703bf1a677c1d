"""Benchmark: an IAF guide's training step with one reversal object shared by every position (the code before
this release) against a cached reversal per position (now), on the MNIST VAE.

    python -m benchmarks.iaf_reversal --flows 2,4 --output runs/bench_iaf_reversal

Scoring the guide's own draw walks the flow backwards and finds each step's input in that step's cache; one
transform object used at two positions caches only the later one, so every IAF layer before an earlier position
was inverted, k sequential passes of its network with their backward pass (k = 40 here). With two layers there is
one position and nothing is missed; from three layers on, one inversion per earlier position. Median ms per step
(Trace_ELBO, Adam, minibatch 100 of synthetic binary images, 784-300-300-40) over interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions.transforms as T
import torch

import pyro_lvm.guides.flows as flows
from pyro_lvm.experiments.cli import positive_int, run_main
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.runtime import local_params

from . import write_outputs


def _shared(k: int) -> Any:
    """Pyro's Permute (cache_size=1) as the guides held it: one object for every position."""
    shared = T.Permute(torch.arange(k - 1, -1, -1))
    return lambda: shared


#: variant -> (latent dim -> the factory ``flows.reversal`` is replaced by)
VARIANTS = {"shared": _shared, "per-position": lambda k: flows.reversal}


def median_step(num_flows: int, variant: str, steps: int, warmup: int, seed: int) -> float:
    original = flows.reversal
    flows.reversal = VARIANTS[variant](40)  # the guide looks it up at every call
    try:
        torch.manual_seed(seed)
        model = VAE(VAEConfig(data_dim=784, latent_dim=40, hidden=(300, 300)))
        guide = build_guide(f"iaf:{num_flows}", model, GuideConfig(hidden=(300, 300), flow_hidden=(300,)))
        x = torch.bernoulli(torch.full((100, 784), 0.3))
        elbo, params = pyro.infer.Trace_ELBO(), [*model.parameters(), *guide.parameters()]
        optim = torch.optim.Adam(params, lr=1e-3)
        times = []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            with local_params(model, guide):
                loss = elbo.differentiable_loss(model, guide, x)
            optim.zero_grad()
            loss.backward()
            optim.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[warmup:])
    finally:
        flows.reversal = original


def run(flow_counts: Sequence[int], steps: int, warmup: int, repeats: int, threads: int, seed: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    per_round: dict[str, list[float]] = {f"iaf:{k} {v}": [] for k in flow_counts for v in VARIANTS}
    for _ in range(repeats):
        for k in flow_counts:
            for v in VARIANTS:
                per_round[f"iaf:{k} {v}"].append(median_step(k, v, steps, warmup, seed))
    rows = []
    for k in flow_counts:
        before, now = per_round[f"iaf:{k} shared"], per_round[f"iaf:{k} per-position"]
        rows.append({"guide": f"iaf:{k}", "shared_ms": 1000 * statistics.median(before),
                     "per_position_ms": 1000 * statistics.median(now),
                     "speedup": statistics.median([a / b for a, b in zip(before, now, strict=True)]),
                     "rounds_shared_ms": [1000 * t for t in before], "rounds_per_position_ms": [1000 * t for t in now]})
    return {"benchmark": "iaf_reversal", "steps": steps, "warmup": warmup, "repeats": repeats, "threads": threads,
            "results": rows}


def table(res: dict[str, Any]) -> str:
    lines = ["| guide | shared reversal (before): ms / step | a reversal per position (now): ms / step | speed-up |",
             "|---|---|---|---|"]
    lines += [f"| {r['guide']} | {r['shared_ms']:.1f} | {r['per_position_ms']:.1f} | {r['speedup']:.2f}x |"
              for r in res["results"]]
    lines += ["", f"Median over {res['repeats']} interleaved rounds of the per-round median of {res['steps']} steps "
              f"(after {res['warmup']} warm-up), {res['threads']} torch thread(s)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.iaf_reversal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flows", default="2,4", help="comma-separated numbers of IAF layers")
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--warmup", type=positive_int, default=5)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench_iaf_reversal")
    a = p.parse_args(argv)
    res = run([int(k) for k in a.flows.split(",")], a.steps, a.warmup, a.repeats, a.threads, a.seed)
    write_outputs(a.output, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

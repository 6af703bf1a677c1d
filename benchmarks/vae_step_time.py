"""Benchmark: the Lightning training path against the hand-written loop it replaced and a plain-PyTorch loop
doing the same math, in one process.

    python -m benchmarks.vae_step_time --threads 1 --output runs/bench_vae

Both train the same vanilla VAE (784-300-300-40, Bernoulli decoder, diagonal Gaussian encoder) on
binarized MNIST minibatches of 100 with Adam, the same single-sample ELBO estimator
log p(x|z) + log p(z) − log q(z|x) at z = μ + σ ε, and the same per-step work (NaN check, loss read-out).
The plain loop uses the very modules of the Pyro model and guide. Paths:

* ``plain_pytorch`` -- the ELBO written out by hand, the reference;
* ``handwritten_trace`` -- ``Trace_ELBO`` in the hand-written loop that ``fit`` used before Lightning
  (``benchmarks/handwritten_loop.py``, frozen);
* ``lightning_trace`` -- ``fit`` today: ``Trace_ELBO`` in :class:`pyro_lvm.plan.SVIPlan` on Lightning's ``Trainer``;
* ``lightning_jit`` -- the same with ``JitTrace_ELBO`` (TorchScript);
* ``lightning_compiled`` (``--compile``) -- ``Trace_ELBO`` with encoder and decoder networks ``torch.compile``-d.

Every path's step is timed end to end (from the end of one optimiser step to the end of the next: minibatch,
loss, backward, clipping, update and, for Lightning, every hook). Reported: median seconds per step after
warm-up, the ratio to plain PyTorch, and Lightning's overhead over the hand-written loop; then the peak memory and
time of IWAE-K evaluation (time for the full test set extrapolated from the points evaluated).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from pyro.util import set_rng_seed as set_seed

from pyro_lvm.data import DataConfig, load_dataset
from pyro_lvm.evaluate import per_point_bounds
from pyro_lvm.experiments.cli import positive_int, run_main
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.train import TrainConfig, fit

from . import write_outputs
from .handwritten_loop import fit_handwritten


def build(seed: int) -> tuple[VAE, Any]:
    set_seed(seed)
    model = VAE(VAEConfig(data_dim=784, latent_dim=40, hidden=(300, 300)))
    return model, build_guide("amortized", model, GuideConfig(hidden=(300, 300)))


def plain_pytorch_steps(model: VAE, guide: Any, x: torch.Tensor, steps: int, batch: int, seed: int) -> list[float]:
    """The same ELBO and update as fit(), written directly in PyTorch with the same modules."""
    params = list(model.parameters()) + list(guide.parameters())
    optim = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    n, times = x.shape[0], []
    normal = torch.distributions.Normal
    t0 = time.perf_counter()
    for step in range(steps):
        if step % (n // batch) == 0:
            perm = torch.randperm(n, generator=gen)
        i = step % (n // batch)
        xb = x[perm[i * batch:(i + 1) * batch]]
        h = guide.encoder(xb)
        loc, scale = guide.loc(h), torch.nn.functional.softplus(guide.scale(h)) + 1e-6
        z = loc + scale * torch.randn_like(loc)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            model.decoder.net(z), xb, reduction="none").sum(-1)
        log_prior = normal(torch.zeros_like(z), 1.0).log_prob(z).sum(-1)
        log_q = normal(loc, scale).log_prob(z).sum(-1)
        loss = -(log_lik + log_prior - log_q).sum() * (n / batch) / n
        if not torch.isfinite(loss):
            raise RuntimeError(f"plain loop: loss became {loss.item()} at step {step}")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 100.0)
        optim.step()
        loss.item()
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
    return times


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class PeakRSS:
    """Samples the resident set size every 5 ms on a thread; ``peak - start`` is the memory a block added."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def run(steps: int, warmup: int, iwae_k: int, eval_points: int, seed: int, data_dir: str | None,
        threads: int | None, repeats: int = 3, compile_nets: bool = False, contiguous: bool = False) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    ds = load_dataset("binarized_mnist", DataConfig(data_dir=data_dir, seed=seed))
    # --contiguous: every path gets a row-major copy, isolating the loops' own overhead from the gather cost of
    # the loaded (column-major) tensor, which the Lightning path's data module removes by itself
    train = ds.train.contiguous() if contiguous else ds.train
    # rounds interleave the paths, so drift in machine speed (frequency, other load) hits each alike;
    # each path's figure is the median over rounds of its per-round median step time
    paths = ["plain_pytorch", "handwritten_trace", "lightning_trace", "lightning_jit"]
    if compile_nets:
        paths.append("lightning_compiled")
    per_round: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for path in paths:
            model, guide = build(seed)
            if path == "plain_pytorch":
                times = plain_pytorch_steps(model, guide, train, warmup + steps, 100, seed)
            else:
                cfg = TrainConfig(epochs=1, batch_size=100, max_steps=warmup + steps, quiet=True, seed=seed,
                                  restore_best=False, elbo="jit" if path == "lightning_jit" else "trace")
                if path == "lightning_compiled":
                    guide.encoder = torch.compile(guide.encoder)
                    model.decoder.net = torch.compile(model.decoder.net)
                runner = fit_handwritten if path == "handwritten_trace" else fit
                times = runner(model, guide, train, None, cfg).step_seconds
            per_round[path].append(statistics.median(times[warmup:]))
    base = statistics.median(per_round["plain_pytorch"])
    timing = {k: {"seconds_per_step": statistics.median(v), "ratio_to_plain": statistics.median(v) / base,
                  "ratio_per_round": [a / b for a, b in zip(v, per_round["plain_pytorch"], strict=True)]}
              for k, v in per_round.items()}
    overhead = [a / b for a, b in zip(per_round["lightning_trace"], per_round["handwritten_trace"], strict=True)]
    lightning_overhead = {"ratio": statistics.median(overhead), "ratio_per_round": overhead}

    # IWAE-K evaluation: peak memory above the process's peak so far, and time per test point
    model, guide = build(seed)
    test = ds.test[:eval_points]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        bounds = per_point_bounds(model, guide, test, iwae_k)
        seconds = time.perf_counter() - t0
    evaluation = {
        "iwae_k": iwae_k,
        "points_evaluated": len(test),
        "seconds": seconds,
        "seconds_per_point": seconds / len(test),
        "extrapolated_seconds_full_test": seconds / len(test) * len(ds.test),
        "rss_mib_before": mem.start,
        "peak_rss_increase_mib": mem.peak - mem.start,
        "mean_iwae_untrained": bounds["iwae"].mean().item(),
    }
    return {"benchmark": "vae_step_time", "network": "784-300-300-40", "batch_size": 100, "steps": steps,
            "warmup_steps": warmup, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "contiguous_input": contiguous,
            "timing": timing,
            "lightning_over_handwritten": lightning_overhead,
            "iwae_evaluation": evaluation}


def table(res: dict[str, Any]) -> str:
    lines = ["| path | ms / step | ratio to plain PyTorch | ratio in each round |", "|---|---|---|---|"]
    for k, v in res["timing"].items():
        rounds = ", ".join(f"{r:.3f}" for r in v["ratio_per_round"])
        lines.append(f"| {k} | {1000 * v['seconds_per_step']:.2f} | {v['ratio_to_plain']:.3f} | {rounds} |")
    o = res["lightning_over_handwritten"]
    lines += ["", f"Lightning / hand-written loop, same estimator (Trace_ELBO): {o['ratio']:.3f} "
              f"(rounds: {', '.join(f'{r:.3f}' for r in o['ratio_per_round'])})"]
    e = res["iwae_evaluation"]
    lines += ["", f"IWAE-{e['iwae_k']} on {e['points_evaluated']} test points: {e['seconds']:.1f} s "
              f"({e['seconds_per_point']:.3f} s/point, ~{e['extrapolated_seconds_full_test'] / 60:.0f} min for "
              f"the full test set), peak RSS increase {e['peak_rss_increase_mib']:.0f} MiB"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vae_step_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--warmup", type=positive_int, default=20)
    p.add_argument("--iwae-k", type=positive_int, default=5000)
    p.add_argument("--eval-points", type=positive_int, default=1000)
    p.add_argument("--repeats", type=positive_int, default=3, help="rounds of the interleaved paths")
    p.add_argument("--compile", action="store_true", help="add a path with torch.compile-d encoder and decoder")
    p.add_argument("--contiguous", action="store_true", help="give every path a row-major copy of the data")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench_vae")
    a = p.parse_args(argv)
    res = run(a.steps, a.warmup, a.iwae_k, a.eval_points, a.seed, a.data_dir, a.threads, a.repeats, a.compile,
              a.contiguous)
    write_outputs(a.output, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Benchmark: ms per step of the MNIST VAE: ``fit`` with its defaults against plain PyTorch doing the same math
and NumPyro's jitted SVI step, in interleaved rounds; then IWAE-K evaluation's time and memory.

    python -m benchmarks.vae_step_time --threads 1 --output runs/bench_vae

Every path trains the same vanilla VAE (784-300-300-40, Bernoulli decoder, diagonal Gaussian encoder) on binarized
MNIST minibatches of 100 with Adam 1e-3 and gradient clipping at norm 100, the same single-sample ELBO estimator
log p(x|z) + log p(z) − log q(z|x) at z = μ + σ ε, and the same per-step work (NaN check, loss read-out). Paths
(``--paths``; the first four by default, and NumPyro unless ``--no-numpyro``):

* ``plain_pytorch`` -- the ELBO written out by hand with the very modules of the Pyro model and guide, per-tensor Adam:
  the reference;
* ``fit_default`` -- ``fit`` as a user calls it for a fit under ``COMPILE_MIN_STEPS`` (100,000) steps:
  ``Trace_ELBO``'s loss and gradients traced once into one graph, shortened (``pyro_lvm.graphs``) and replayed
  (``step="auto"``), Adam's fused kernel, Lightning's loop;
* ``fit_compiled`` -- ``fit`` as a user calls it for a longer fit (200 epochs of MNIST or more): the same graph also
  compiled by ``torch.compile`` (Inductor), which ``step="auto"`` does from 100,000 planned steps (asked for here by
  ``step="compiled"``, as the benchmark's fits are short; its compile time, about 20 s cold, is not in the step's);
* ``fit_eager_loop`` -- ``fit`` as it was by default before: Pyro's ``Trace_ELBO`` every step and Adam's per-tensor
  loop (``step="eager", optimizer="adam-loop"``);
* ``fit_jit`` -- ``JitTrace_ELBO`` (TorchScript, deprecated upstream) with the default optimiser;
* ``handwritten_trace`` -- ``Trace_ELBO`` in the hand-written loop that ``fit`` used before Lightning (frozen);
* ``numpyro`` -- NumPyro's ``SVI`` + ``Trace_ELBO`` with ``jax.jit(svi.update)``, the same net, initialisation,
  optimiser and clipping (``benchmarks/peer_numpyro.py``), run in its own virtual environment once per round (built
  with pip when missing: numpyro 0.22.0, jax and jaxlib 0.10.2; where it cannot be built, one line says so and the
  other rows stand).

Every path's step is timed end to end (from the end of one optimiser step to the end of the next: minibatch, loss,
backward, clipping, update and, for Lightning, every hook). Each round runs every path once, in an order rotated from
round to round so that drift in the machine's speed (frequency, other load) hits each alike; a path's figure is the
median over rounds of its per-round median step time after warm-up, and each ratio is also given per round (on a
busy machine read the ratios). Torch and XLA are held to ``--threads`` threads (default 1), and the process (with
NumPyro's, which inherits it) to as many CPUs: XLA's flags alone let its runtime use a second core. Then the peak
memory and time of IWAE-K evaluation (time for the full test set extrapolated from the points evaluated;
``--eval-points 0`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from pyro.util import set_rng_seed as set_seed

from pyro_lvm.data import DataConfig, load_dataset, read_binarized_mnist
from pyro_lvm.evaluate import per_point_bounds
from pyro_lvm.experiments.cli import positive_int, run_main
from pyro_lvm.guides import GuideConfig, build_guide
from pyro_lvm.models import VAE, VAEConfig
from pyro_lvm.train import TrainConfig, fit

from . import name_list, pin_cpus, write_outputs
from .handwritten_loop import fit_handwritten


def build(seed: int) -> tuple[VAE, Any]:
    set_seed(seed)
    model = VAE(VAEConfig(data_dim=784, latent_dim=40, hidden=(300, 300)))
    return model, build_guide("amortized", model, GuideConfig(hidden=(300, 300)))


def plain_pytorch_steps(model: VAE, guide: Any, x: torch.Tensor, steps: int, batch: int, seed: int,
                        cpu: list[float] | None = None) -> list[float]:
    """The same ELBO and update as fit(), written directly in PyTorch with the same modules; the wall time of each
    step (and its CPU time, appended to ``cpu``)."""
    params = list(model.parameters()) + list(guide.parameters())
    optim = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    n, times = x.shape[0], []
    normal = torch.distributions.Normal
    t0, c0 = time.perf_counter(), time.process_time()
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
        now, c = time.perf_counter(), time.process_time()
        times.append(now - t0)
        if cpu is not None:
            cpu.append(c - c0)
        t0, c0 = now, c
    return times


class CPUClock(Callback):
    """The process's CPU time of every training iteration (batch end to batch end, as ``FitResult.step_seconds``
    times the wall clock): a machine shared with other jobs stretches the wall time of a one-thread step, much less
    its CPU time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._c0 = 0.0

    def on_train_epoch_start(self, trainer: Any, plan: Any) -> None:
        self._c0 = time.process_time()

    def on_train_batch_end(self, trainer: Any, plan: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        c = time.process_time()
        self.seconds.append(c - self._c0)
        self._c0 = c


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


#: the paths this benchmark can time (see the module's docstring)
PATHS = ("plain_pytorch", "fit_default", "fit_eager_loop", "fit_compiled", "fit_jit", "handwritten_trace", "numpyro")
DEFAULT_PATHS = ("plain_pytorch", "fit_default", "fit_compiled", "fit_eager_loop", "numpyro")
FIT_SETTINGS: dict[str, dict[str, Any]] = {
    "fit_default": {},
    "fit_eager_loop": {"step": "eager", "optimizer": "adam-loop"},
    "fit_compiled": {"step": "compiled"},
    "fit_jit": {"elbo": "jit"},
    "handwritten_trace": {"elbo": "trace"},
}
NUMPYRO_VENV = os.environ.get("NUMPYRO_VENV", "/tmp/numpyro-venv")
NUMPYRO_PINS = ("numpyro==0.22.0", "jax==0.10.2", "jaxlib==0.10.2")


def numpyro_python(given: str | None) -> tuple[str | None, str]:
    """The interpreter of NumPyro's environment (``given``, else ``$NUMPYRO_VENV/bin/python``, built with pip when
    missing), or ``None`` and why not."""
    python = given or str(Path(NUMPYRO_VENV) / "bin" / "python")
    check = [python, "-c", "import numpyro, jax"]
    try:
        if subprocess.run(check, capture_output=True, timeout=300).returncode == 0:
            return python, ""
    except (OSError, subprocess.TimeoutExpired):
        pass
    if given:
        return None, f"{given} cannot import numpyro and jax"
    base = shutil.which("python3.11") or getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", NUMPYRO_VENV], [python, "-m", "pip", "install", "-q", *NUMPYRO_PINS]]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"`{' '.join(cmd)}` failed ({e})"
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).split())[-200:]
            return None, f"`{' '.join(cmd)}` failed: {tail}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"{python} was built but cannot import numpyro and jax"
    return python, ""


def numpyro_round(python: str, data: Path, steps: int, warmup: int, threads: int, seed: int) -> dict[str, Any]:
    """One run of ``benchmarks/peer_numpyro.py`` in NumPyro's environment; its JSON."""
    script = Path(__file__).with_name("peer_numpyro.py")
    cmd = [python, str(script), "--data", str(data), "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(threads), "--seed", str(seed), "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"peer_numpyro.py failed: {' '.join(done.stderr.split())[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(steps: int, warmup: int, iwae_k: int, eval_points: int, seed: int, data_dir: str | None,
        threads: int, repeats: int = 3, paths: Sequence[str] = DEFAULT_PATHS, contiguous: bool = False,
        numpyro: str | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    cpus = pin_cpus(threads)
    ds = load_dataset("binarized_mnist", DataConfig(data_dir=data_dir, seed=seed))
    # --contiguous: every path gets a row-major copy, isolating the loops' own overhead from the gather cost of
    # the loaded (column-major) tensor, which the Lightning path's data module removes by itself
    train = ds.train.contiguous() if contiguous else ds.train
    notes: list[str] = []
    paths = list(paths)
    python = None
    if "numpyro" in paths:
        _, where = read_binarized_mnist(data_dir)
        python, why = numpyro_python(numpyro) if where.suffix == ".npz" else (None, f"{where} is not the .npz file")
        if python is None:
            notes.append(f"numpyro: not run, its environment could not be made ({why})")
            print(notes[-1], file=sys.stderr, flush=True)
            paths.remove("numpyro")
    per_round: dict[str, list[float]] = {k: [] for k in paths}
    cpu_round: dict[str, list[float]] = {k: [] for k in paths}
    kinds: dict[str, str] = {}
    cpu_ratio: dict[str, list[float]] = {k: [] for k in paths}
    versions: dict[str, str] = {}
    for r in range(repeats):
        order = paths[r % len(paths):] + paths[: r % len(paths)]  # rotated: no path always runs first or last
        for path in order:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if path == "numpyro":
                assert python is not None
                out = numpyro_round(python, where, steps, warmup, threads, seed)
                per_round[path].append(out["seconds_per_step"])
                cpu_round[path].append(out["cpu_seconds_per_step"])
                cpu_ratio[path].append(out["cpu_seconds_per_wall_second"])
                kinds[path] = f"jit ({out['library']}, jax {out['jax']})"
                versions["numpyro"] = out["library"]
                continue
            model, guide = build(seed)
            cpu: list[float] = []
            if path == "plain_pytorch":
                times = plain_pytorch_steps(model, guide, train, warmup + steps, 100, seed, cpu)
                kinds[path] = "eager, per-tensor Adam"
            else:
                cfg = TrainConfig(epochs=1, batch_size=100, max_steps=warmup + steps, quiet=True, seed=seed,
                                  restore_best=False, **FIT_SETTINGS[path])
                if path == "handwritten_trace":
                    fr = fit_handwritten(model, guide, train, None, cfg)
                else:
                    clock = CPUClock()
                    fr = fit(model, guide, train, None, cfg, callbacks=[clock])
                    cpu = clock.seconds
                times = fr.step_seconds
                kinds[path] = f"{getattr(fr, 'step', '') or 'eager'}, {cfg.optimizer}" + \
                    (f", elbo {cfg.elbo}" if cfg.elbo else "")
            per_round[path].append(statistics.median(times[warmup:]))
            if cpu:
                cpu_round[path].append(statistics.median(cpu[warmup:]))
            cpu_ratio[path].append((time.process_time() - cpu0) / (time.perf_counter() - wall0))
    timing = {}
    for k, v in per_round.items():
        entry: dict[str, Any] = {"steps_ran_as": kinds.get(k, ""), "seconds_per_step": statistics.median(v),
                                 "seconds_per_step_per_round": v,
                                 "cpu_seconds_per_wall_second": statistics.median(cpu_ratio[k])}
        for name, ref, per_round_key in (("plain", per_round.get("plain_pytorch"), "ratio_per_round"),
                                         ("numpyro", per_round.get("numpyro"), "ratio_to_numpyro_per_round")):
            if ref:
                entry[f"ratio_to_{name}"] = statistics.median(v) / statistics.median(ref)
                entry[per_round_key] = [a / b for a, b in zip(v, ref, strict=True)]
        c = cpu_round[k]
        if c:  # the same on the CPU clock: the step's own cost, less stretched by other jobs on the machine
            entry["cpu_seconds_per_step"] = statistics.median(c)
            entry["cpu_seconds_per_step_per_round"] = c
            for name in ("plain_pytorch", "numpyro"):
                ref = cpu_round.get(name)
                if ref:
                    short = "plain" if name == "plain_pytorch" else name
                    entry[f"cpu_ratio_to_{short}"] = statistics.median(c) / statistics.median(ref)
                    entry[f"cpu_ratio_to_{short}_per_round"] = [a / b for a, b in zip(c, ref, strict=True)]
        timing[k] = entry
    res: dict[str, Any] = {
        "benchmark": "vae_step_time", "network": "784-300-300-40", "batch_size": 100, "steps": steps,
        "warmup_steps": warmup, "repeats": repeats, "torch_threads": torch.get_num_threads(), "threads": threads,
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "cpus": cpus, "load_average_at_end": os.getloadavg(),
        "contiguous_input": contiguous, "paths": paths, "notes": notes, "versions": versions, "timing": timing}
    if "handwritten_trace" in per_round and "fit_eager_loop" in per_round:
        overhead = [a / b for a, b in zip(per_round["fit_eager_loop"], per_round["handwritten_trace"], strict=True)]
        res["lightning_over_handwritten"] = {"ratio": statistics.median(overhead), "ratio_per_round": overhead}
    if eval_points > 0:
        res["iwae_evaluation"] = iwae_evaluation(ds, seed, iwae_k, eval_points)
    return res


def iwae_evaluation(ds: Any, seed: int, iwae_k: int, eval_points: int) -> dict[str, Any]:
    """IWAE-K evaluation: peak memory above the process's peak so far, and time per test point."""
    model, guide = build(seed)
    test = ds.test[:eval_points]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        bounds = per_point_bounds(model, guide, test, iwae_k)
        seconds = time.perf_counter() - t0
    return {
        "iwae_k": iwae_k,
        "points_evaluated": len(test),
        "seconds": seconds,
        "seconds_per_point": seconds / len(test),
        "extrapolated_seconds_full_test": seconds / len(test) * len(ds.test),
        "rss_mib_before": mem.start,
        "peak_rss_increase_mib": mem.peak - mem.start,
        "mean_iwae_untrained": bounds["iwae"].mean().item(),
    }


def table(res: dict[str, Any]) -> str:
    has_peer = any("ratio_to_numpyro" in v for v in res["timing"].values())
    head = "| path | steps ran as | ms / step | ÷ plain PyTorch | " + ("÷ NumPyro | " if has_peer else "") + \
        "÷ plain PyTorch, each round | CPU s / wall s |"
    lines = [f"MNIST VAE 784-300-300-40, minibatch 100, Adam 1e-3; {res['threads']} thread(s), {res['repeats']} "
             f"interleaved rounds of {res['steps']} steps after {res['warmup_steps']} (medians); torch "
             f"{res['torch']}, {res['cpu_count']} CPUs, load average at the end "
             f"{', '.join(f'{x:.1f}' for x in res['load_average_at_end'])}", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for k, v in res["timing"].items():
        rounds = ", ".join(f"{r:.3f}" for r in v.get("ratio_per_round", []))
        cells = [k, v["steps_ran_as"], f"{1000 * v['seconds_per_step']:.2f}",
                 f"{v['ratio_to_plain']:.3f}" if "ratio_to_plain" in v else "",
                 *([f"{v['ratio_to_numpyro']:.3f}" if "ratio_to_numpyro" in v else ""] if has_peer else []),
                 rounds, f"{v['cpu_seconds_per_wall_second']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cpu_rows = {k: v for k, v in res["timing"].items() if "cpu_seconds_per_step" in v}
    if cpu_rows:
        head = "| path | CPU ms / step | ÷ plain PyTorch | " + ("÷ NumPyro | " if has_peer else "") + \
            "÷ plain PyTorch, each round | " + ("÷ NumPyro, each round |" if has_peer else "")
        lines += ["", "The same on the process's CPU clock (CPU seconds per step, medians; what one thread spends, "
                  "less stretched by other jobs than the wall clock):", "", head.rstrip(" |") + " |",
                  "|" + "---|" * (head.rstrip(" |").count("|"))]
        for k, v in cpu_rows.items():
            cells = [k, f"{1000 * v['cpu_seconds_per_step']:.2f}", f"{v.get('cpu_ratio_to_plain', float('nan')):.3f}",
                     *([f"{v.get('cpu_ratio_to_numpyro', float('nan')):.3f}"] if has_peer else []),
                     ", ".join(f"{r:.3f}" for r in v.get("cpu_ratio_to_plain_per_round", [])),
                     *([", ".join(f"{r:.3f}" for r in v.get("cpu_ratio_to_numpyro_per_round", []))] if has_peer
                       else [])]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + res["notes"]
    if "lightning_over_handwritten" in res:
        o = res["lightning_over_handwritten"]
        lines += ["", f"Lightning / hand-written loop, same estimator (Trace_ELBO, eager): {o['ratio']:.3f} "
                  f"(rounds: {', '.join(f'{r:.3f}' for r in o['ratio_per_round'])})"]
    if "iwae_evaluation" in res:
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
    p.add_argument("--paths", type=name_list(PATHS), default=list(DEFAULT_PATHS),
                   help=f"comma-separated, from: {', '.join(PATHS)} (default: {','.join(DEFAULT_PATHS)})")
    p.add_argument("--no-numpyro", action="store_true", help="leave NumPyro out")
    p.add_argument("--numpyro-python", default=None,
                   help=f"the interpreter of an environment with numpyro and jax (default: {NUMPYRO_VENV}/bin/python, "
                        "built when missing; $NUMPYRO_VENV moves it)")
    p.add_argument("--iwae-k", type=positive_int, default=5000)
    p.add_argument("--eval-points", type=int, default=1000, help="test points for IWAE-K (0: no evaluation)")
    p.add_argument("--repeats", type=positive_int, default=3, help="rounds of the interleaved paths")
    p.add_argument("--contiguous", action="store_true", help="give every path a row-major copy of the data")
    p.add_argument("--threads", type=positive_int, default=1, help="torch (and XLA) threads")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench_vae")
    a = p.parse_args(argv)
    paths = [x for x in a.paths if not (a.no_numpyro and x == "numpyro")]
    res = run(a.steps, a.warmup, a.iwae_k, a.eval_points, a.seed, a.data_dir, a.threads, a.repeats, paths,
              a.contiguous, a.numpyro_python)
    write_outputs(a.output, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""The suite in about a minute on embedded data: every model family, several guides, one table each.

    python -m pyro_lvm.experiments.quickstart [--seed 0] [--output runs/quickstart] [--quiet] [--jobs N]

* factor analysis on scikit-learn's breast_cancer (k = 5): guides against the exact log-likelihood
  and scikit-learn's FactorAnalysis;
* a Gaussian-decoder VAE on scikit-learn's digits: diagonal vs flow guides on ELBO and IWAE-K;
* a Gaussian mixture on iris (K = 3, full covariance): MAP and mean-field globals against scikit-learn's EM.

Each section writes its own ``results.json`` / ``results.md`` under ``--output``; the tables are printed, in this
order. The sections are independent: where the process may use several CPUs they run at once, one process each
(``--jobs``), with the same results as one after another.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pyro_lvm.harness import run_experiment
from pyro_lvm.registry import Registry
from pyro_lvm.report import results_table
from pyro_lvm.runtime import cli_threads
from pyro_lvm.runtime import threads as runtime_threads

from . import factor_analysis, gaussian_mixture, vae
from .cli import ArgumentParser, Terminated, plain_text, run_main, terminate_as_exception

#: section name -> run(seed, output_dir, smoke) -> results payload; ``smoke`` shrinks it to seconds (tests)
SECTIONS: Registry[Callable[[int, str, bool], dict[str, Any]]] = Registry("quickstart section")


@SECTIONS.register("factor_analysis")
def fa_section(seed: int, output: str, smoke: bool) -> dict[str, Any]:
    d = factor_analysis.FAExperimentConfig()
    cfg = factor_analysis.FAExperimentConfig(
        seed=seed, output=output, quiet=True, iwae_k=5 if smoke else 500,
        guides=("exact", "amortized", "amortized-fullcov", "iaf:2"), sklearn_max_iter=200 if smoke else 10_000,
        train=dataclasses.replace(d.train, epochs=3 if smoke else 1000, lr=0.03))
    return run_experiment(factor_analysis.FactorAnalysisExperiment(), cfg)


@SECTIONS.register("vae_digits")
def vae_section(seed: int, output: str, smoke: bool) -> dict[str, Any]:
    d = vae.VAEExperimentConfig()
    cfg = vae.VAEExperimentConfig(
        dataset="digits", guides=("amortized", "planar:4", "iaf:2"), latent_dim=4, hidden=(64,), flow_hidden=(32,),
        iwae_k=5 if smoke else 500, seed=seed, output=output, quiet=True,
        train=dataclasses.replace(d.train, epochs=2 if smoke else 25, warmup_epochs=1 if smoke else 5,
                                  batch_size=100, lr=3e-3, patience=None))
    return run_experiment(vae.VAEExperiment(), cfg)


@SECTIONS.register("gaussian_mixture")
def gmm_section(seed: int, output: str, smoke: bool) -> dict[str, Any]:
    d = gaussian_mixture.GMMExperimentConfig()
    cfg = gaussian_mixture.GMMExperimentConfig(
        dataset="iris", guides=("map", "meanfield"), restarts=1 if smoke else 2, iwae_k=5 if smoke else 100,
        posterior_samples=5 if smoke else 100, seed=seed, output=output, quiet=True,
        train=dataclasses.replace(d.train, epochs=3 if smoke else 400))
    return run_experiment(gaussian_mixture.GaussianMixtureExperiment(), cfg)


def _section(name: str, *, seed: int, output: str, smoke: bool, quiet: bool, threads: int | None,
             t0: float) -> tuple[dict[str, Any], float]:
    """One section's results and its seconds, in this process or a worker."""
    t = time.perf_counter()
    if not quiet:  # a line as each section starts: a log file or a CI job sees the run move
        print(f"[{time.perf_counter() - t0:5.0f}s] {name}: fitting every guide ...", file=sys.stderr, flush=True)
    with runtime_threads(cli_threads(threads)):
        payload = SECTIONS[name](seed, str(Path(output) / name), smoke)
    return payload, time.perf_counter() - t


def _worker(run: Callable[[str], Any], name: str, send: Any) -> None:
    """A worker process: ``run(name)``'s result (or its error) sent back; Ctrl-C is the main process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # and it ends with the main process, however that ends (Linux)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    try:
        send.send((True, run(name)))
    except Exception as e:  # noqa: BLE001 - handed to the main process, which reports it as it would its own
        send.send((False, e))
    finally:
        send.close()


def _at_once(run: Callable[[str], Any], names: list[str], jobs: int) -> Iterator[Any]:
    """``run(name)`` for every name, at most ``jobs`` at once, each in a process forked from this one (already
    imported); the results in the order of ``names``. The sections are independent (each seeds its own fits), so
    the results are those of one after another. On any way out but the normal one (an error, Ctrl-C, SIGTERM) the
    workers still running are killed: their files are written atomically, so none is left half-written."""
    ctx = multiprocessing.get_context("fork")
    waiting, running, results = list(names), {}, {}
    try:
        for name in names:
            while name not in results:
                while waiting and len(running) < jobs:
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_worker, args=(run, waiting[0], send), daemon=True)
                    proc.start()
                    send.close()
                    running[recv] = (waiting.pop(0), proc)
                for recv in multiprocessing.connection.wait(list(running), timeout=1.0):
                    done, proc = running.pop(recv)
                    try:
                        ok, value = recv.recv()
                    except EOFError:  # the worker died without a word (killed, out of memory)
                        proc.join()
                        raise RuntimeError(f"the {done} section's process ended with exit status {proc.exitcode} "
                                           "before it finished; run it alone with --jobs 1 to see why") from None
                    proc.join()
                    if not ok:
                        raise value
                    results[done] = value
            yield results.pop(name)
    finally:
        for _, proc in running.values():
            proc.kill()
            proc.join()


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="pyro-lvm quickstart", description=plain_text(__doc__ or ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/quickstart")
    p.add_argument("--sections", default=",".join(SECTIONS.names()),
                   help=f"comma-separated subset of: {', '.join(SECTIONS.names())}")
    p.add_argument("--quiet", action="store_true", help="print only the tables")
    p.add_argument("--smoke", action="store_true", help="a few steps per section, to check the plumbing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1; see the README)")
    p.add_argument("--jobs", type=int, default=None,
                   help="sections run at once, each in its own process (default: one per CPU this process may use, "
                        "at most one per section); 1 runs them one after another in this process")
    a = p.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads: must be an integer >= 1, got {a.threads}")
    if a.jobs is not None and a.jobs < 1:
        p.error(f"--jobs: must be an integer >= 1, got {a.jobs}")
    names = [s.strip() for s in a.sections.split(",") if s.strip()]
    for name in names:
        SECTIONS[name]  # unknown names fail here, before any work
    jobs = min(len(names), a.jobs if a.jobs is not None else len(os.sched_getaffinity(0)))
    summary, t0 = {}, time.perf_counter()
    run = functools.partial(_section, seed=a.seed, output=a.output, smoke=a.smoke, quiet=a.quiet, threads=a.threads,
                            t0=t0)
    done: Iterator[tuple[dict[str, Any], float]] = (run(name) for name in names) if jobs <= 1 else \
        _at_once(run, names, jobs)
    try:
        with terminate_as_exception():  # SIGTERM unwinds as Ctrl-C does: the workers are stopped on the way out
            for name, (payload, seconds) in zip(names, done, strict=True):
                summary[name] = {"seconds": seconds, "results": f"{a.output}/{name}/results.json"}
                print(results_table(payload, brief=True), flush=True)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    summary["total_seconds"] = time.perf_counter() - t0
    Path(a.output).mkdir(parents=True, exist_ok=True)
    (Path(a.output) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not a.quiet:
        print(f"done in {summary['total_seconds']:.0f}s; results under {a.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))

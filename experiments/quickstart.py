"""The suite in about a minute on embedded data: every model family, several guides, one table each.

    python -m pyro_lvm.experiments.quickstart [--seed 0] [--output runs/quickstart] [--quiet]

* factor analysis on scikit-learn's breast_cancer (k = 5): guides against the exact log-likelihood
  and scikit-learn's FactorAnalysis;
* a Gaussian-decoder VAE on scikit-learn's digits: diagonal vs flow guides on ELBO and IWAE-K;
* a Gaussian mixture on iris (K = 3, full covariance): MAP and mean-field globals against scikit-learn's EM.

Each section writes its own ``results.json`` / ``results.md`` under ``--output``; the tables are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyro_lvm.harness import run_experiment
from pyro_lvm.registry import Registry
from pyro_lvm.report import results_table
from pyro_lvm.runtime import cli_threads
from pyro_lvm.runtime import threads as runtime_threads

from . import factor_analysis, gaussian_mixture, vae
from .cli import ArgumentParser, plain_text, run_main

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
    a = p.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads: must be an integer >= 1, got {a.threads}")
    names = [s.strip() for s in a.sections.split(",") if s.strip()]
    runs = [(name, SECTIONS[name]) for name in names]  # unknown names fail here, before any work
    summary, t0 = {}, time.perf_counter()
    for name, section in runs:
        t = time.perf_counter()
        if not a.quiet:  # a line as each section starts: a log file or a CI job sees the run move
            print(f"[{time.perf_counter() - t0:5.0f}s] {name}: fitting every guide ...", file=sys.stderr, flush=True)
        with runtime_threads(cli_threads(a.threads)):
            payload = section(a.seed, str(Path(a.output) / name), a.smoke)
        summary[name] = {"seconds": time.perf_counter() - t, "results": f"{a.output}/{name}/results.json"}
        print(results_table(payload, brief=True), flush=True)
    summary["total_seconds"] = time.perf_counter() - t0
    Path(a.output).mkdir(parents=True, exist_ok=True)
    (Path(a.output) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not a.quiet:
        print(f"done in {summary['total_seconds']:.0f}s; results under {a.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))

"""Does data-parallel training reach the single-process answer? The MNIST VAE on a 10,000-image subset, trained
by the real command line in one process and in two DDP processes (gloo, CPU), 3 seeds each.

    python -m benchmarks.ddp_agreement --seeds 0,1,2 --epochs 10 --output runs/ddp_agreement

Both runs take the same optimiser steps on the same global minibatch size: one process with minibatches of
``B``, two processes with ``B / 2`` each (Lightning's ``--batch-size`` is per process; the gradient of the
two half-batches is averaged, which is the gradient of their union). Reported: test ELBO and test NLL
(−IWAE-K on a seeded test subset) per seed, their mean and spread, and the difference of the means against the
seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyro_lvm.experiments.cli import positive_int, run_main

from . import write_outputs


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def one(seed: int, devices: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    batch = args.batch_size // devices
    cmd = [sys.executable, "-m", "pyro_lvm.experiments.vae", "--dataset", "binarized_mnist", "--subset",
           str(args.subset), "--epochs", str(args.epochs), "--batch-size", str(batch), "--guide", "amortized",
           "--iwae-k", str(args.iwae_k), "--test-subset", str(args.test_points), "--seed", str(seed), "--threads",
           "1", "--quiet", "--output", str(out), "--accelerator", "cpu", "--devices", str(devices)]
    if devices > 1:
        cmd += ["--strategy", "ddp"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    row = json.loads((out / "results.json").read_text())["results"][0]
    return {"seed": seed, "devices": devices, "batch_per_process": batch, "test_elbo": row["test"]["elbo"],
            "test_nll": -row["test"]["iwae"], "seconds": time.perf_counter() - t0,
            "seconds_per_epoch": row["seconds_per_epoch"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--subset", type=positive_int, default=10_000)
    p.add_argument("--batch-size", type=positive_int, default=100, help="global minibatch size")
    p.add_argument("--iwae-k", type=positive_int, default=500)
    p.add_argument("--test-points", type=positive_int, default=2000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", default="runs/ddp_agreement")
    a = p.parse_args(argv)
    out = Path(a.output)
    runs = [one(seed, devices, a, out / f"devices{devices}_seed{seed}") for seed in a.seeds for devices in (1, 2)]
    summary: dict[str, Any] = {}
    for devices in (1, 2):
        rs = [r for r in runs if r["devices"] == devices]
        for key in ("test_elbo", "test_nll"):
            vals = [r[key] for r in rs]
            summary[f"devices{devices}_{key}"] = {"mean": statistics.fmean(vals),
                                                  "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    diff = summary["devices2_test_nll"]["mean"] - summary["devices1_test_nll"]["mean"]
    spread = max(summary["devices1_test_nll"]["sd"], summary["devices2_test_nll"]["sd"])
    res = {"benchmark": "ddp_agreement", "config": vars(a), "runs": runs, "summary": summary,
           "nll_difference_of_means": diff, "largest_seed_sd": spread}
    lines = [f"| processes | batch per process | test ELBO (mean ± sd) | test NLL, IWAE-{a.iwae_k} (mean ± sd) | "
             "per seed NLL |", "|---|---|---|---|---|"]
    for devices in (1, 2):
        e, n = summary[f"devices{devices}_test_elbo"], summary[f"devices{devices}_test_nll"]
        per = ", ".join(f"{r['test_nll']:.2f}" for r in runs if r["devices"] == devices)
        lines.append(f"| {devices} | {a.batch_size // devices} | {e['mean']:.2f} ± {e['sd']:.2f} | "
                     f"{n['mean']:.2f} ± {n['sd']:.2f} | {per} |")
    lines += ["", f"difference of the mean NLLs (2 − 1 processes): {diff:+.2f} nats; largest seed-to-seed sd: "
              f"{spread:.2f}"]
    write_outputs(out, res, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

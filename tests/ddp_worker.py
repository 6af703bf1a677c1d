"""Run by tests/test_distributed.py in a subprocess: fit factor analysis with its exact posterior as the guide
(whose ELBO gradient is the exact ∇ log p(x): deterministic, whatever the sample) by plain SGD, in one process or
data-parallel; Lightning re-launches this script for the second process. Rank 0 saves the parameters.

    python tests/ddp_worker.py OUT.pt --devices 2 --batch-size 4 --epochs 3

``--num-nodes 2 --ddp-timeout S`` (with MASTER_ADDR, MASTER_PORT, NODE_RANK in the environment) runs one process of
a two-node run, for the rendezvous tests; errors are one line and exit status 2, as at the command line.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pyro_lvm import TrainConfig, build_guide, fit
from pyro_lvm.data import make_factor_analysis_data
from pyro_lvm.models import FactorAnalysis, FactorAnalysisConfig
from pyro_lvm.runtime import seeded


def train(devices: int, batch_size: int, epochs: int, num_nodes: int = 1, ddp_timeout: float = 300.0) -> dict | None:
    """The fit; rank 0 returns the parameters, history and step count (other ranks ``None``)."""
    x, _ = make_factor_analysis_data(8, 4, 2, seed=0)
    with seeded(0):
        model = FactorAnalysis(FactorAnalysisConfig(4, 2))
    guide = build_guide("exact", model)
    fr = fit(model, guide, x, None, TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer="sgd", lr=0.05, clip_norm=None, restore_best=False,
        seed=0, quiet=True, accelerator="cpu", devices=devices, num_nodes=num_nodes, ddp_timeout=ddp_timeout,
        strategy="ddp" if devices * num_nodes > 1 else "auto"))
    if fr.rank != 0:
        return None
    return {"state": model.state_dict(), "history": fr.history, "steps": fr.steps}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--ddp-timeout", type=float, default=300.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    result = train(args.devices, args.batch_size, args.epochs, args.num_nodes, args.ddp_timeout)
    if result is not None:
        torch.save(result, args.out)
    return 0


if __name__ == "__main__":
    from pyro_lvm.experiments.cli import run_main

    sys.exit(run_main(main))

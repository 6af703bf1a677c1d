"""Data-parallel training is the same objective: two real processes (Lightning DDP, gloo) against one process and
against the closed-form gradient step.

The first process of each data-parallel run is forked from the session's warm interpreter (tests/cli_runner.py),
which saves its imports; Lightning starts the second one as a fresh interpreter, as it always does."""

from __future__ import annotations

import json
from pathlib import Path

import ddp_worker
import pytest
import torch
from cli_runner import WarmCLI

from pyro_lvm.data import make_factor_analysis_data
from pyro_lvm.models import FactorAnalysis, FactorAnalysisConfig
from pyro_lvm.runtime import default_dtype, seeded

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(cli: WarmCLI, out: Path, *args: str) -> dict:
    """``python tests/ddp_worker.py OUT *args`` (forked), run in ``out``'s directory."""
    proc = cli.run("", [str(out), *args], out.parent, script=WORKER, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _closed_form_sgd(epochs: int, lr: float) -> dict[str, torch.Tensor]:
    """SGD on −(1/N) Σ log N(x_i; μ, WWᵀ + Ψ), the full-data objective, by autograd on the marginal."""
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            x, _ = make_factor_analysis_data(8, 4, 2, seed=0)
            with seeded(0):
                model = FactorAnalysis(FactorAnalysisConfig(4, 2))
            for _ in range(epochs):
                loss = -model.log_likelihood(x).mean()
                grads = torch.autograd.grad(loss, list(model.parameters()))
                with torch.no_grad():
                    for p, g in zip(model.parameters(), grads, strict=True):
                        p -= lr * g
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        finally:
            torch.set_default_dtype(torch.float32)


def test_two_processes_average_gradients_of_full_data_scaled_minibatches(tmp_path: Path, warm_cli: WarmCLI) -> None:
    # 8 points; two processes with minibatches of 4 (one step per epoch each), one process with all 8: the
    # union of the two minibatches. The exact guide's ELBO gradient is ∇ log p(x) whatever z is drawn, so the
    # updates are deterministic and plain SGD (unlike Adam) moves in proportion to the gradient: summing the
    # processes' gradients, or scaling each plate to its shard of 4 instead of the 8 points, doubles or halves it.
    two = _run(warm_cli, tmp_path / "two.pt", "--devices", "2", "--batch-size", "4", "--epochs", "3")
    with default_dtype(torch.float64):  # one process: the same fit in this process (no launch to pay for)
        one = ddp_worker.train(devices=1, batch_size=8, epochs=3)
    exact = _closed_form_sgd(epochs=3, lr=0.05)
    assert two["steps"] == one["steps"] == 3
    start = _closed_form_sgd(epochs=0, lr=0.05)
    for name, want in exact.items():
        moved = (want - start[name]).abs().max().item()
        assert moved > 1e-3  # the step is large enough that a factor 2 shows
        torch.testing.assert_close(two["state"][name], want, rtol=0, atol=1e-10)
        torch.testing.assert_close(one["state"][name], want, rtol=0, atol=1e-10)
    # the per-epoch training loss is reduced over both processes: the mean over all 8 points
    assert [h["train_loss"] for h in two["history"]] == pytest.approx([h["train_loss"] for h in one["history"]],
                                                                      abs=1e-12)


def test_experiment_command_line_trains_data_parallel_and_writes_once(tmp_path: Path, warm_cli: WarmCLI) -> None:
    out = tmp_path / "run"
    proc = warm_cli.run("pyro_lvm.experiments.factor_analysis", [
        "--dataset", "synthetic", "--guide", "exact", "--epochs", "2", "--iwae-k", "10", "--devices", "2",
        "--strategy", "ddp", "--accelerator", "cpu", "--output", str(out), "--quiet"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert [r["guide"] for r in doc["results"]] == ["exact"]
    assert doc["results"][0]["config"]["train"]["devices"] == 2
    assert (out / "checkpoints" / "exact" / "last.ckpt").is_file()

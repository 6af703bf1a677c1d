"""The benchmark modules run end to end with tiny flags (their numbers are measured, never asserted)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cli_runner import WarmCLI

from benchmarks import fullcov_ablation, iwae_eval, vae_step_time


def test_step_time_benchmark_runs_and_reports_ratios(tmp_path: Path, fake_mnist: Path) -> None:
    code = vae_step_time.main(["--steps", "3", "--warmup", "1", "--repeats", "2", "--iwae-k", "4", "--no-numpyro",
                               "--paths", "plain_pytorch,fit_default,fit_eager_loop,fit_jit,handwritten_trace",
                               "--eval-points", "8", "--data-dir", str(fake_mnist), "--output", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and (tmp_path / "results.md").is_file()
    timing = res["timing"]
    assert set(timing) == {"plain_pytorch", "fit_default", "fit_eager_loop", "fit_jit", "handwritten_trace"}
    assert timing["plain_pytorch"]["ratio_to_plain"] == 1
    plain = timing["plain_pytorch"]["seconds_per_step"]
    for v in timing.values():
        assert v["ratio_to_plain"] == pytest.approx(v["seconds_per_step"] / plain, rel=1e-12)
        assert len(v["ratio_per_round"]) == 2
    for k in ("plain_pytorch", "fit_default", "fit_eager_loop"):
        assert len(timing[k]["cpu_ratio_to_plain_per_round"]) == 2
    assert res["iwae_evaluation"]["points_evaluated"] == 8
    over = res["lightning_over_handwritten"]
    assert over["ratio_per_round"] == pytest.approx([a / b for a, b in zip(
        timing["fit_eager_loop"]["seconds_per_step_per_round"],
        timing["handwritten_trace"]["seconds_per_step_per_round"], strict=True)], rel=1e-12)


def test_iwae_eval_benchmark_reports_flops_the_gemm_limit_and_both_paths(tmp_path: Path, fake_mnist: Path) -> None:
    k = 6
    code = iwae_eval.main(["--iwae-k", str(k), "--points", "3", "--rounds", "2", "--gemm-rows", "8", "--gemm-flops",
                           "1e5", "--max-rows", "12", "--data-dir", str(fake_mnist), "--output", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and "| wall |" in (tmp_path / "results.md").read_text()
    flops = res["flops_per_image"]
    assert flops["decoder"] == 2 * k * (40 * 300 + 300 * 300 + 300 * 784)
    assert flops["encoder"] == 2 * (784 * 300 + 300 * 300 + 2 * 300 * 40)
    assert flops["total"] == flops["decoder"] + flops["encoder"]
    for clock in ("wall", "cpu"):
        c = res["clocks"][clock]
        assert math.isfinite(c["gemm_gflops"]) and c["gemm_gflops"] > 0
        assert math.isfinite(c["limit_seconds_per_image"]) and c["limit_seconds_per_image"] > 0
        for path in ("fused", "traces"):
            p = c[path]
            assert math.isfinite(p["ratio_to_limit"]) and p["ratio_to_limit"] > 0
            per_round = [s / lim for s, lim in zip(p["seconds_per_image_per_round"],
                                                   c["limit_seconds_per_image_per_round"], strict=True)]
            assert len(per_round) == 2 and p["ratio_to_limit_per_round"] == pytest.approx(per_round, rel=1e-12)
            assert p["ratio_to_limit"] == pytest.approx(statistics.median(per_round), rel=1e-12)
    # the same draws by both paths: the same bounds
    assert res["bounds"]["fused"]["iwae"] == pytest.approx(res["bounds"]["traces"]["iwae"], abs=1e-3)


def test_step_time_benchmark_says_in_one_line_when_numpyro_cannot_run(
        tmp_path: Path, fake_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = vae_step_time.main(["--steps", "2", "--warmup", "1", "--repeats", "1", "--eval-points", "0",
                               "--paths", "plain_pytorch,numpyro", "--numpyro-python", str(tmp_path / "no-python"),
                               "--data-dir", str(fake_mnist), "--output", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0 and set(res["timing"]) == {"plain_pytorch"}
    assert len(res["notes"]) == 1 and res["notes"][0].startswith("numpyro: not run")
    assert res["notes"][0] in capsys.readouterr().err


def test_fullcov_ablation_frozen_cholesky_is_the_diagonal_guide(tmp_path: Path, fake_mnist: Path) -> None:
    """With its off-diagonal head frozen at zero, the full-covariance guide trains exactly like the diagonal
    one from the same seed (same draws, same updates); the other variants run and give finite bounds."""
    code = fullcov_ablation.main(["--subset", "200", "--epochs", "2", "--warmup-epochs", "1", "--test-points", "50",
                                  "--iwae-k", "4", "--data-dir", str(fake_mnist), "--output", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert code == 0
    rows = {r["guide"]: r["test"] for r in res["results"]}
    assert set(rows) == set(fullcov_ablation.VARIANTS)
    assert all(math.isfinite(t["elbo"]) and math.isfinite(t["iwae"]) for t in rows.values())
    assert rows["cholesky-frozen"]["elbo"] == pytest.approx(rows["diagonal"]["elbo"], rel=1e-4)
    assert rows["cholesky"]["elbo"] != pytest.approx(rows["diagonal"]["elbo"], rel=1e-4)


def test_fullcov_ablation_rejects_unknown_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fullcov_ablation.run_main(fullcov_ablation.main, ["--variants", "nope", "--output", str(tmp_path)]) == 2
    assert "valid: diagonal" in capsys.readouterr().err


def test_threads_benchmark_runs_and_reports_both_counts(tmp_path: Path) -> None:
    from benchmarks import threads

    assert threads.main(["--steps", "2", "--rounds", "1", "--output", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for d in res["results"].values():
        assert d["speedup_2_over_1"] == pytest.approx(d["threads_1_ms"] / d["threads_2_ms"], rel=1e-12)


def test_epoch_time_benchmark_runs_and_profiles_the_epoch(tmp_path: Path, fake_mnist: Path) -> None:
    from benchmarks import epoch_time

    code = epoch_time.main(["--variants", "lightning,handwritten", "--threads", "1", "--seeds", "0", "--epochs", "2",
                            "--subset", "200", "--data-dir", str(fake_mnist), "--output", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and (tmp_path / "results.md").is_file()
    runs = {k: v["runs"][0] for k, v in res["results"].items()}
    assert set(runs) == {"lightning@1", "handwritten@1"}
    for r in runs.values():  # the profile's parts add up to the epoch
        parts = r["steps_per_epoch"] + r["valid_per_epoch"] + r["checkpoints_per_epoch"] + r["rest_per_epoch"]
        assert parts == pytest.approx(r["seconds_per_epoch"], rel=1e-9)
    # the Lightning loop and the hand-written one it replaced fit the same: same minibatches, same draws
    assert runs["lightning@1"]["final_valid_elbo"] == pytest.approx(runs["handwritten@1"]["final_valid_elbo"],
                                                                    rel=1e-5)


def test_family_step_time_benchmark_parses_families_and_reports_ratios(tmp_path: Path, fake_mnist: Path) -> None:
    from benchmarks import family_step_time

    assert family_step_time.parse_family("iaf:2+vamp:500/iwae-dreg:5") == ("iaf:2", "vamp:500", "iwae-dreg:5")
    assert family_step_time.parse_family("amortized") == ("amortized", "standard", "elbo")
    code = family_step_time.main(["--families", "amortized+vamp:3/iwae-dreg:2", "--steps", "2",
                                  "--warmup", "1", "--repeats", "1", "--data-dir", str(fake_mnist),
                                  "--output", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert code == 0 and (tmp_path / "results.md").is_file()
    timing = res["timing"]
    assert list(timing) == ["plain_pytorch", "amortized+vamp:3/iwae-dreg:2"]
    for v in timing.values():
        assert v["seconds_per_epoch"] == pytest.approx(500 * v["seconds_per_step"], rel=1e-12)
        assert v["ratio_to_plain"] == pytest.approx(v["seconds_per_step"] / timing["plain_pytorch"]["seconds_per_step"],
                                                    rel=1e-12)
    assert timing["amortized+vamp:3/iwae-dreg:2"]["guide_parameters"] > 0


def test_budget_runner_scores_a_run_stopped_by_its_budget_from_its_checkpoint(
        tmp_path: Path, fake_mnist: Path, warm_cli: WarmCLI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gated-conv protocol runner, on the MLP for speed: a run still training when its budget ends is stopped
    by SIGTERM (exit 143, checkpoints kept) and scored by the same command with --from-checkpoints. The budget ends
    by an event, not a clock: when the run's first last.ckpt exists (one whole epoch), however slow the machine.

    The runner's commands (``python -m pyro_lvm.experiments.vae ...``, output appended to a log) run as processes
    forked from the session's warm interpreter (tests/cli_runner.py) rather than fresh ones, to save their imports;
    with one guide, the runner's processes never overlap (the warm interpreter runs one at a time)."""
    from benchmarks import gated_conv_budget

    launched: list[list[str]] = []

    def popen(cmd: list[str], *, stdout: Any, stderr: int) -> Any:
        """``subprocess.Popen(cmd, stdout=<log opened "ab">, stderr=subprocess.STDOUT)``, forked."""
        assert cmd[:2] == [sys.executable, "-m"] and stderr == subprocess.STDOUT and stdout.mode == "ab", cmd
        launched.append(cmd)
        return warm_cli.submit(cmd[2], cmd[3:], os.getcwd(), stdout=stdout.name, stderr=stdout.name, append=True)

    monkeypatch.setattr(gated_conv_budget, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT))

    out = tmp_path / "budget"
    last = out / "amortized" / "checkpoints" / "amortized" / "last.ckpt"
    code = gated_conv_budget.main([
        "--guides", "amortized", "--architecture", "mlp", "--latent-dim", "2", "--accelerator", "cpu",
        "--epochs", "100000", "--warmup-epochs", "0", "--eval-seconds", "3600", "--iwae-k", "3",
        "--test-subset", "20", "--subset", "100",
        "--threads", "1", "--data-dir", str(fake_mnist), "--output", str(out)], budget_ended=last.is_file)
    res = json.loads((out / "results.json").read_text())
    row = res["results"][0]
    assert code == 0 and row["exit_code"] == 143 and row["stopped_by_budget"] and row["eval_exit_code"] == 0
    assert row["epochs_trained"] >= 1 and row["test"]["iwae"] >= row["test"]["elbo"]  # IWAE-K bounds the ELBO
    assert (out / "amortized" / "checkpoints" / "amortized" / "last.ckpt").is_file()
    assert "| amortized | " in (out / "results.md").read_text()
    assert [c[2] for c in launched] == ["pyro_lvm.experiments.vae"] * 2 and "--from-checkpoints" in launched[1]


def test_iaf_reversal_benchmark_reports_both_variants(tmp_path: Path) -> None:
    from benchmarks import iaf_reversal

    assert iaf_reversal.main(["--flows", "3", "--steps", "2", "--warmup", "1", "--repeats", "1", "--output",
                              str(tmp_path)]) == 0
    row = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert row["guide"] == "iaf:3" and row["shared_ms"] > 0 and row["per_position_ms"] > 0

"""A shared checkpoint is data, never code (issue 22).

One small factor-analysis run is made once; each test copies it, plants an object whose ``__reduce__`` calls
``os.system`` (the payload touches a marker file) in a checkpoint, and goes through one load path: the API's
``load`` and ``fit(resume=...)``, and the command line's ``--from-checkpoints``, ``inference_gaps
--from-checkpoints`` and ``--resume`` (a finished guide's ``fitted.pt``; an unfinished guide's ``last.ckpt``, which
Lightning reads). Each must refuse the file, naming it, and the marker must never appear.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runner import WarmCLI

import pyro_lvm

GUIDE = "amortized"
BASE = ["--dataset", "iris", "--latent-dim", "2", "--epochs", "2", "--iwae-k", "4", "--seed", "0", "--quiet"]


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do with a worse command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f"touch {self.marker}",)


def cli(warm_cli: WarmCLI, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pyro_lvm.experiments *args`` in ``cwd``, forked from the session's warm interpreter
    (tests/cli_runner.py): its own process, so a payload that ran would run there, as in a fresh one."""
    return warm_cli.run("pyro_lvm.experiments", args, cwd)


def plant(path: Path, marker: Path) -> None:
    """Add the payload to the checkpoint at ``path`` (under an entry every reader would unpickle)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt.setdefault("meta" if "format" in ckpt else "pyro_lvm", {})["note"] = Payload(marker)
    torch.save(ckpt, path)


def assert_refused(res: subprocess.CompletedProcess, marker: Path, needle: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert needle in lines[0] and "run code" in lines[0]
    assert "Traceback" not in res.stdout + res.stderr
    assert not marker.exists(), "the payload ran"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, warm_cli: WarmCLI) -> Path:
    out = tmp_path_factory.mktemp("sec") / "R"
    res = cli(warm_cli, "factor_analysis", *BASE, "--guide", GUIDE, "--output", str(out), cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture
def poisoned(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "R"
    shutil.copytree(run, out)
    return out, tmp_path / "PWNED"


def test_a_clean_fit_loads_as_data(run: Path) -> None:
    """The files the suite writes need no code to load: plain ``torch.load(weights_only=True)`` reads them."""
    for name in ("fitted.pt", "last.ckpt"):
        assert isinstance(torch.load(run / "checkpoints" / GUIDE / name, weights_only=True), dict)
    assert isinstance(pyro_lvm.load(run / "checkpoints" / GUIDE / "fitted.pt").meta["versions"]["torch"], str)


def test_load_refuses_a_fitted_file_that_runs_code(poisoned: tuple[Path, Path]) -> None:
    out, marker = poisoned
    path = out / "checkpoints" / GUIDE / "fitted.pt"
    plant(path, marker)
    with pytest.raises(ValueError, match="run code") as e:
        pyro_lvm.load(path)
    assert str(path) in str(e.value) and not marker.exists()


def test_fit_resume_refuses_a_checkpoint_that_runs_code(poisoned: tuple[Path, Path]) -> None:
    out, marker = poisoned
    last = out / "checkpoints" / GUIDE / "last.ckpt"
    plant(last, marker)
    fitted = pyro_lvm.load(out / "checkpoints" / GUIDE / "fitted.pt")
    x = torch.randn(20, fitted.model.data_dim)
    with pytest.raises(ValueError, match="run code"):
        pyro_lvm.fit(fitted.model, fitted.guide, x, epochs=3, resume=str(last), seed=0)
    assert not marker.exists()


def test_from_checkpoints_refuses_a_file_that_runs_code(poisoned: tuple[Path, Path], warm_cli: WarmCLI) -> None:
    out, marker = poisoned
    plant(out / "checkpoints" / GUIDE / "fitted.pt", marker)
    res = cli(warm_cli, "factor_analysis", *BASE, "--guide", GUIDE, "--from-checkpoints", str(out),
              "--output", str(out.parent / "scored"), cwd=out.parent)
    assert_refused(res, marker, "fitted.pt")


def test_inference_gaps_refuses_a_file_that_runs_code(poisoned: tuple[Path, Path], warm_cli: WarmCLI) -> None:
    out, marker = poisoned
    plant(out / "checkpoints" / GUIDE / "fitted.pt", marker)
    res = cli(warm_cli, "inference_gaps", "--from-checkpoints", str(out), "--guide", GUIDE, "--points", "3",
              "--output", str(out.parent / "gaps"), cwd=out.parent)
    assert_refused(res, marker, "fitted.pt")


def test_resume_refuses_a_finished_guides_file_that_runs_code(poisoned: tuple[Path, Path],
                                                              warm_cli: WarmCLI) -> None:
    out, marker = poisoned
    plant(out / "checkpoints" / GUIDE / "fitted.pt", marker)
    res = cli(warm_cli, "factor_analysis", *BASE, "--guide", GUIDE, "--resume", str(out), cwd=out.parent)
    assert_refused(res, marker, "fitted.pt")


def test_resume_refuses_a_training_checkpoint_that_runs_code(poisoned: tuple[Path, Path],
                                                             warm_cli: WarmCLI) -> None:
    """An unfinished guide (no fitted.pt, no row): its last.ckpt is read by the harness and by Lightning."""
    out, marker = poisoned
    (out / "checkpoints" / GUIDE / "fitted.pt").unlink()
    (out / "results.json").unlink()
    plant(out / "checkpoints" / GUIDE / "last.ckpt", marker)
    res = cli(warm_cli, "factor_analysis", *BASE, "--guide", GUIDE, "--resume", str(out), cwd=out.parent)
    assert_refused(res, marker, "last.ckpt")


# ---------------------------------------------------------------------------------------------- damaged files
DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "garbage": lambda b: b"not a checkpoint\n" * 64,
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_resume_with_a_damaged_training_checkpoint_is_one_error_line(poisoned: tuple[Path, Path],
                                                                     warm_cli: WarmCLI, how: str) -> None:
    """An unfinished guide whose last.ckpt was cut short (a copy interrupted), overwritten or emptied: ``--resume``
    says which file and what to do, in one line and exit 2, and writes nothing."""
    out, _ = poisoned
    (out / "checkpoints" / GUIDE / "fitted.pt").unlink()
    (out / "results.json").unlink()
    last = out / "checkpoints" / GUIDE / "last.ckpt"
    last.write_bytes(DAMAGE[how](last.read_bytes()))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    res = cli(warm_cli, "factor_analysis", *BASE, "--guide", GUIDE, "--resume", str(out), cwd=out.parent)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stdout + res.stderr
    assert "last.ckpt" in lines[0] and "not a readable pyro_lvm file" in lines[0] and "delete it" in lines[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize("entry", [("guide", "spec"), ("model", "config"), ("model",)])
def test_a_fitted_file_missing_an_entry_is_one_error_naming_it(run: Path, tmp_path: Path, warm_cli: WarmCLI,
                                                                entry: tuple[str, ...]) -> None:
    """``load`` of a fitted.pt without an entry it needs: a ``ValueError`` naming the entry (not a ``KeyError``);
    through ``--from-checkpoints``, the same as one error line and exit 2."""
    out = tmp_path / "R"
    shutil.copytree(run, out)
    path = out / "checkpoints" / GUIDE / "fitted.pt"
    ckpt = torch.load(path, weights_only=True)
    parent = ckpt
    for k in entry[:-1]:
        parent = parent[k]
    del parent[entry[-1]]
    torch.save(ckpt, path)
    name = ".".join(entry)
    with pytest.raises(ValueError, match=rf"damaged pyro_lvm file, it has no entry '{name}'"):
        pyro_lvm.load(path)
    res = cli(warm_cli, "factor_analysis", *BASE, "--guide", GUIDE, "--from-checkpoints", str(out),
              "--output", str(tmp_path / "scored"), cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert f"no entry '{name}'" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "scored" / "results.json").exists()

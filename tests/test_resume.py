"""Stopping a run (Ctrl-C, SIGTERM, kill -9) loses nothing: every file under --output is complete or absent, and
``--resume`` finishes the run with the numbers of the uninterrupted one. Real command lines, in subprocesses."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_fake_mnist

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _flags(data: Path, out: Path) -> list[str]:
    return ["--data-dir", str(data), "--guide", "amortized,planar:2", "--epochs", "6", "--latent-dim", "2",
            "--hidden", "16", "--iwae-k", "20", "--seed", "3", "--quiet", "--output", str(out)]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyro_lvm.experiments.vae", *args]


def _numbers(out: Path) -> list[tuple[str, dict]]:
    doc = json.loads((out / "results.json").read_text())
    return [(r["guide"], r["test"]) for r in doc["results"]]


def _start_and_stop(cmd: list[str], out: Path, sig: int, wait_for: Path) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` once ``wait_for`` exists (training is under way), return the finished process."""
    # SIGINT back to its default in the child: a test run started in the background by a non-interactive shell
    # (``pytest &``) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored, so Ctrl-C would do nothing
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not wait_for.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _assert_complete_or_absent(out: Path) -> None:
    """Every file under ``out`` loads; only our own hidden temporary files (``.name.*.tmp``) may be stale."""
    for path in out.rglob("*"):
        if path.is_dir() or (path.name.startswith(".") and path.name.endswith(".tmp")):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".ckpt", ".pt"):
            torch.load(path, weights_only=False)
        elif path.suffix == ".csv":
            rows = list(csv.reader(path.open()))
            assert rows and all(len(r) == len(rows[0]) for r in rows), path
        elif path.suffix == ".png":
            assert path.read_bytes()[-8:] == b"IEND\xaeB`\x82", path  # a PNG ends with its IEND chunk


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("whole")
    data = write_fake_mnist(root / "data")
    out = root / "run"
    proc = subprocess.run(_cmd(*_flags(data, out)), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, _numbers(out)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted")])
def test_a_stopped_run_says_how_to_continue_and_resume_finishes_it(
        tmp_path: Path, uninterrupted: tuple[Path, list], sig: int, code: int, word: str) -> None:
    """Ctrl-C in a real process; SIGTERM's path (the same stop, exit 143) is checked in-process below, and the
    kill -9 test resumes too."""
    data, whole = uninterrupted
    out = tmp_path / "run"
    # stop once the first guide is written, while the second one trains: the first guide's results must survive.
    # (Waiting for the second guide's first checkpoint instead left too little of the run on a loaded machine:
    # it could finish before the signal arrived.)
    stopped = _start_and_stop(_cmd(*_flags(data, out)), out, sig, out / "results.json")
    assert stopped.returncode == code, stopped.stderr[-2000:]
    lines = stopped.stderr.strip().splitlines()
    assert "Traceback" not in stopped.stderr and len(lines) == 1 and lines[0].startswith(f"{word}: "), lines
    assert lines[0].endswith(f"--resume {out}")
    assert [g for g, _ in _numbers(out)] == ["amortized"]
    _assert_complete_or_absent(out)
    if sig != signal.SIGINT:
        return
    again = lines[0].split("continue with: ")[1].split()[2:]  # drop "pyro-lvm vae"
    resumed = subprocess.run(_cmd(*again), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _numbers(out) == whole


def test_kill_9_leaves_only_complete_files_and_resume_finishes_the_run(
        tmp_path: Path, uninterrupted: tuple[Path, list]) -> None:
    data, whole = uninterrupted
    out = tmp_path / "run"
    killed = _start_and_stop(_cmd(*_flags(data, out)), out, signal.SIGKILL,
                             out / "checkpoints" / "amortized" / "metrics.csv")
    assert killed.returncode == -signal.SIGKILL
    _assert_complete_or_absent(out)
    resumed = subprocess.run(_cmd(*_flags(data, out)[:-2], "--resume", str(out)), env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _numbers(out) == whole
    assert not list(out.rglob(".*.tmp"))  # a resumed run clears the temporary files a kill left behind


def test_sigterm_stops_a_run_between_guides_like_ctrl_c(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM (a scheduler's stop) while the second guide trains: one line naming the command that continues,
    exit 143, the first guide's results kept, every file complete. In this process, so no interpreter start is paid
    for: a thread sends the signal once the first guide's results are written; the handler runs in the main thread."""
    import threading

    from pyro_lvm.experiments import factor_analysis as fa_experiment

    out = tmp_path / "run"

    def stop_after_first_guide() -> None:
        deadline = time.monotonic() + 60
        while not (out / "results.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=stop_after_first_guide, daemon=True)
    sender.start()
    # the model held at scikit-learn's fit: the exact guide has nothing to learn (one pass), the amortized one trains
    # until stopped
    code = fa_experiment.main(["--dataset", "wine", "--latent-dim", "2", "--guide", "exact,amortized", "--fix-model",
                               "sklearn", "--epochs", "100000", "--iwae-k", "8", "--output", str(out), "--quiet"])
    sender.join(timeout=10)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143 and len(err) == 1 and err[0].startswith("terminated: "), err
    assert err[0].endswith(f"--resume {out}")
    assert [g for g, _ in _numbers(out)] == ["exact"]
    _assert_complete_or_absent(out)

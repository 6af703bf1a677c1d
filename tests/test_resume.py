"""Stopping a run (Ctrl-C, SIGTERM, kill -9) loses nothing: every file under --output is complete or absent, and
``--resume`` finishes the run with the numbers of the uninterrupted one. Real command lines: Ctrl-C hits a fresh
interpreter; the other runs, the one killed with -9 too, are real processes forked from the session's warm
interpreter (tests/cli_runner.py). The Ctrl-C test also shows that the two agree: the first guide's row, written by
the fresh interpreter, must equal the forked uninterrupted run's (tests/test_faults.py compares what the two
print)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_runner import Pending, WarmCLI, fresh_env, sigint_default
from conftest import write_fake_mnist

#: the stop tests wait for an event (the run has paused at a chosen write), however slow the machine; only a run
#: that has not reached it after this long is taken to hang, and the test fails saying so (no signal is sent before
#: the event)
HANG_GUARD_S = 900

VAE = "pyro_lvm.experiments.vae"

#: ``python -c PAUSING TARGET N WHEN MARKER MODULE ARGS...`` is ``python -m MODULE ARGS`` (in a fresh interpreter,
#: or forked from the warm one as a script) that pauses (sleeps) at the N-th atomic rename onto the file TARGET,
#: just ``before`` or ``after`` it, once it has created MARKER: the test then stops it there with a real signal from
#: outside. The library writes every file through one rename (``pyro_lvm.report.atomic_target``), so a pause
#: ``before`` one leaves its complete temporary file beside the target, as a kill during the write would; and a stop
#: is never raced against the run's end.
PAUSING = textwrap.dedent(f"""
    import os, runpy, sys, time

    target, nth, when, marker, module = sys.argv[1:6]
    nth, seen, real_replace = int(nth), 0, os.replace


    def pause():
        open(marker, "w").close()
        time.sleep({HANG_GUARD_S})


    def replace(src, dst, *args, **kwargs):
        global seen
        hit = os.path.abspath(os.fspath(dst)) == target
        if hit:
            seen += 1
        if hit and seen == nth and when == "before":
            pause()
        real_replace(src, dst, *args, **kwargs)
        if hit and seen == nth and when == "after":
            pause()


    os.replace = replace
    sys.argv = [module, *sys.argv[6:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


def _flags(data: Path, out: Path) -> list[str]:
    # three epochs per guide: the stops below land after a guide's first or second epoch, with more to come
    return ["--data-dir", str(data), "--subset", "100", "--guide", "amortized,planar:2", "--epochs", "3",
            "--latent-dim", "2", "--hidden", "8", "--iwae-k", "4", "--seed", "3", "--quiet", "--output", str(out)]


def _numbers(out: Path) -> list[tuple[str, dict]]:
    doc = json.loads((out / "results.json").read_text())
    return [(r["guide"], r["test"]) for r in doc["results"]]


def _start_and_stop(args: list[str], sig: int, pause: tuple[Path, int, str], marker: Path,
                    warm_cli: WarmCLI | None = None) -> subprocess.CompletedProcess:
    """``python -m pyro_lvm.experiments.vae *args`` in a fresh interpreter (forked from ``warm_cli`` if given), paused
    at ``pause`` (see :data:`PAUSING`); once it is paused there, send ``sig`` and return the finished process."""
    target, nth, when = pause
    pausing = [str(target), str(nth), when, str(marker), VAE, *args]
    if warm_cli is not None:
        script = marker.with_name("pausing.py")
        script.write_text(PAUSING)
        proc: subprocess.Popen | Pending = warm_cli.submit("", pausing, marker.parent, script=script)
    else:
        # SIGINT back to its default in the child: a test run started in the background by a non-interactive shell
        # (``pytest &``) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored, so Ctrl-C would do
        # nothing
        proc = subprocess.Popen([sys.executable, "-c", PAUSING, *pausing], env=fresh_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)

    def finish(timeout: float) -> subprocess.CompletedProcess:
        if isinstance(proc, Pending):
            return proc.result(timeout)
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    deadline = time.monotonic() + HANG_GUARD_S
    while not marker.exists() and proc.poll() is None:
        if time.monotonic() > deadline:  # a hang, not a slow machine: never signal before the run has paused
            os.kill(proc.pid, signal.SIGKILL)
            stderr = finish(120).stderr
            pytest.fail(f"the run did not reach {pause} within {HANG_GUARD_S} s; it was killed: {stderr[-2000:]}")
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before {pause}: " + finish(120).stderr[-2000:]
    proc.send_signal(sig)
    return finish(120)


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
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, warm_cli: WarmCLI) -> tuple[Path, Path, Pending]:
    """The run the stopped ones must finish like: started (forked) here, waited for where its numbers are needed, so
    that it runs while the test starts its fresh interpreter."""
    root = tmp_path_factory.mktemp("whole")
    data = write_fake_mnist(root / "data")
    out = root / "run"
    return data, out, warm_cli.submit(VAE, _flags(data, out))


def _whole(uninterrupted: tuple[Path, Path, Pending]) -> list:
    _, out, pending = uninterrupted
    proc = pending.result()
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _numbers(out)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted")])
def test_a_stopped_run_says_how_to_continue_and_resume_finishes_it(
        tmp_path: Path, uninterrupted: tuple[Path, Path, Pending], warm_cli: WarmCLI, sig: int, code: int,
        word: str) -> None:
    """Ctrl-C in a real process, while the second guide trains (its first epoch's checkpoint written, the first
    guide's results too): those results survive, and the resume continues the second guide from its checkpoint.
    SIGTERM's path (the same stop, exit 143) is checked in-process below; the kill -9 test resumes too. The first
    guide's row comes from the fresh interpreter, the uninterrupted run's from a forked one: they must agree."""
    data = uninterrupted[0]
    out = tmp_path / "run"
    stopped = _start_and_stop(_flags(data, out), sig, (out / "checkpoints" / "planar_2" / "last.ckpt", 1, "after"),
                              tmp_path / "paused")
    assert stopped.returncode == code, stopped.stderr[-2000:]
    lines = stopped.stderr.strip().splitlines()
    assert "Traceback" not in stopped.stderr and len(lines) == 1 and lines[0].startswith(f"{word}: "), lines
    assert lines[0].endswith(f"--resume {out}")
    assert [g for g, _ in _numbers(out)] == ["amortized"]
    _assert_complete_or_absent(out)
    if sig != signal.SIGINT:
        return
    again = lines[0].split("continue with: ")[1].split()[2:]  # drop "pyro-lvm vae"
    resumed = warm_cli.run(VAE, again)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "planar:2 continues from the last checkpoint" in resumed.stderr, resumed.stderr
    assert _numbers(out) == _whole(uninterrupted)


def test_kill_9_leaves_only_complete_files_and_resume_finishes_the_run(
        tmp_path: Path, uninterrupted: tuple[Path, Path, Pending], warm_cli: WarmCLI) -> None:
    """kill -9 in the middle of writing the first guide's second checkpoint: its temporary file is left, the first
    checkpoint is whole, and the resume clears the one and continues from the other. The killed run is forked from
    the warm interpreter: kill -9 gives a process no say, whatever it imported first."""
    data = uninterrupted[0]
    out = tmp_path / "run"
    last = out / "checkpoints" / "amortized" / "last.ckpt"
    killed = _start_and_stop(_flags(data, out), signal.SIGKILL, (last, 2, "before"), tmp_path / "paused", warm_cli)
    assert killed.returncode == -signal.SIGKILL
    assert list(last.parent.glob(".last.ckpt.*.tmp")), "the kill did not land in the middle of a write"
    assert last.is_file() and not (out / "results.json").exists()
    _assert_complete_or_absent(out)
    resumed = warm_cli.run(VAE, [*_flags(data, out)[:-2], "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "amortized continues from the last checkpoint" in resumed.stderr, resumed.stderr
    assert _numbers(out) == _whole(uninterrupted)
    assert not list(out.rglob(".*.tmp"))  # a resumed run clears the temporary files a kill left behind


def test_sigterm_stops_a_run_between_guides_like_ctrl_c(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM (a scheduler's stop) while the second guide trains: one line naming the command that continues,
    exit 143, the first guide's results kept, every file complete. In this process, so no interpreter start is paid
    for: a thread sends the signal once the first guide's results are written; the handler runs in the main thread."""
    import threading

    from pyro_lvm.experiments import factor_analysis as fa_experiment

    out = tmp_path / "run"
    stop_sender, timed_out = threading.Event(), threading.Event()

    def stop_after_first_guide() -> None:
        # SIGTERM once results.json exists, however long that takes; should it never appear (a hang), the run is
        # stopped all the same so that the test can end, but ``timed_out`` makes it fail saying so
        deadline = time.monotonic() + HANG_GUARD_S
        while not (out / "results.json").exists():
            if stop_sender.is_set():  # the run ended on its own: nothing to stop
                return
            if time.monotonic() > deadline:
                timed_out.set()
                break
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=stop_after_first_guide, daemon=True)
    sender.start()
    # the model held at scikit-learn's fit: the exact guide has nothing to learn (one pass), the amortized one trains
    # until stopped
    try:
        code = fa_experiment.main(["--dataset", "wine", "--latent-dim", "2", "--guide", "exact,amortized",
                                   "--fix-model", "sklearn", "--epochs", "100000", "--iwae-k", "8", "--output",
                                   str(out), "--quiet"])
    finally:
        stop_sender.set()
    sender.join(timeout=10)
    assert not timed_out.is_set(), f"{out / 'results.json'} did not appear within {HANG_GUARD_S} s"
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143 and len(err) == 1 and err[0].startswith("terminated: "), err
    assert err[0].endswith(f"--resume {out}")
    assert [g for g, _ in _numbers(out)] == ["exact"]
    _assert_complete_or_absent(out)


# ---------------------------------------------------------------------------------------------------------------
# --resume and --from-checkpoints check what an earlier run left against this run (audit issue 22); the output
# directory is locked while a run writes it

FA_FLAGS = ["--latent-dim", "2", "--epochs", "2", "--iwae-k", "5", "--seed", "0"]


def _pyro_lvm(cli: WarmCLI, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m pyro_lvm.experiments factor_analysis *args``, forked from the warm interpreter."""
    return cli.run("pyro_lvm.experiments", ["factor_analysis", *args], cwd)


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, an ``error:`` line holding ``needles``, no traceback, no table."""
    shown = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-3000:]}\n--- stdout\n{proc.stdout[-1000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert "###" not in proc.stdout and "results written" not in proc.stdout, shown
    missing = [n for n in needles if n not in lines[0]]
    assert not missing, f"the error line lacks {missing}: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def wine_run(tmp_path_factory: pytest.TempPathFactory, warm_cli: WarmCLI) -> Path:
    """A finished factor_analysis run on wine with the exact and amortized guides (copied by each test)."""
    out = tmp_path_factory.mktemp("wine") / "R"
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized", *FA_FLAGS, "--quiet", "--output",
                     str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture
def run_copy(wine_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "R"
    shutil.copytree(wine_run, out)
    return out


def _unchanged(out: Path, wine_run: Path) -> None:
    assert (out / "results.json").read_bytes() == (wine_run / "results.json").read_bytes()
    assert not (out / ".lock").exists()


def test_resume_refuses_finished_guides_fitted_on_other_data(run_copy: Path, wine_run: Path,
                                                             warm_cli: WarmCLI) -> None:
    proc = _pyro_lvm(warm_cli, "--dataset", "iris", "--guide", "exact,amortized,amortized-fullcov", *FA_FLAGS,
                     "--resume", str(run_copy))
    _refused(proc, "--resume:", str(run_copy / "checkpoints" / "exact" / "fitted.pt"), "fitted on wine",
             "this run uses iris")
    _unchanged(run_copy, wine_run)
    assert not (run_copy / "checkpoints" / "amortized-fullcov").exists()


def test_resume_refuses_finished_guides_of_another_latent_dim(run_copy: Path, wine_run: Path,
                                                              warm_cli: WarmCLI) -> None:
    flags = [*FA_FLAGS]
    flags[1] = "3"
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized", *flags, "--resume",
                     str(run_copy))
    _refused(proc, "--resume:", "fitted.pt", "latent_dim: saved 2, this run 3")
    _unchanged(run_copy, wine_run)


def test_resume_refuses_other_settings_of_the_results(run_copy: Path, wine_run: Path, warm_cli: WarmCLI) -> None:
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized", *FA_FLAGS[:-4], "--iwae-k", "7",
                     "--seed", "0", "--resume", str(run_copy))
    _refused(proc, "--resume:", "results.json", "--iwae-k: saved 5, this run 7")
    _unchanged(run_copy, wine_run)


def test_resume_refuses_a_finished_guide_saved_from_a_vae(run_copy: Path, wine_run: Path, warm_cli: WarmCLI) -> None:
    import pyro_lvm

    model = pyro_lvm.build_model("vae", 13, latent_dim=2)
    pyro_lvm.save(run_copy / "checkpoints" / "amortized" / "fitted.pt", model, pyro_lvm.build_guide("amortized", model))
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized", *FA_FLAGS, "--resume",
                     str(run_copy))
    _refused(proc, "--resume:", str(run_copy / "checkpoints" / "amortized" / "fitted.pt"),
             "model: saved 'vae', this run 'factor_analysis'")
    _unchanged(run_copy, wine_run)


@pytest.mark.parametrize("text", ["[]", '{"rows": 3}', '{"results": [3]}'], ids=["list", "no-results", "bad-row"])
def test_resume_refuses_a_results_json_of_the_wrong_shape(run_copy: Path, text: str, warm_cli: WarmCLI) -> None:
    (run_copy / "results.json").write_text(text)
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized", *FA_FLAGS, "--resume",
                     str(run_copy))
    _refused(proc, "--resume:", str(run_copy / "results.json"), "not a results.json")
    assert (run_copy / "results.json").read_text() == text and not (run_copy / ".lock").exists()


def test_resume_of_a_finished_run_says_so_and_reports_it_again(run_copy: Path, wine_run: Path,
                                                               warm_cli: WarmCLI) -> None:
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized", *FA_FLAGS, "--quiet", "--resume",
                     str(run_copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "every guide (exact, amortized) had finished" in lines[0], lines
    assert _numbers(run_copy) == _numbers(wine_run)
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized", *FA_FLAGS, "--resume",
                     str(run_copy))
    assert proc.returncode == 0 and "### factor_analysis on wine" in proc.stdout, proc.stderr[-2000:]
    assert sum("had finished" in line for line in proc.stderr.splitlines()) == 1
    assert not (run_copy / ".lock").exists()


def test_resume_with_a_new_guide_says_which_guides_continue(run_copy: Path, wine_run: Path, warm_cli: WarmCLI) -> None:
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact,amortized,amortized-fullcov", *FA_FLAGS,
                     "--quiet", "--resume", str(run_copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"resuming {run_copy}: exact, amortized had finished"), lines
    assert "amortized-fullcov starts anew" in lines[0]
    assert _numbers(run_copy)[:2] == _numbers(wine_run)
    assert [g for g, _ in _numbers(run_copy)] == ["exact", "amortized", "amortized-fullcov"]


def test_from_checkpoints_into_its_own_output_keeps_the_rows_not_rescored(run_copy: Path, wine_run: Path,
                                                                          warm_cli: WarmCLI) -> None:
    proc = _pyro_lvm(warm_cli, "--dataset", "wine", "--guide", "exact", *FA_FLAGS, "--quiet", "--from-checkpoints",
                     str(run_copy), "--output", str(run_copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "keeping the rows of amortized" in proc.stderr
    assert dict(_numbers(run_copy)) == dict(_numbers(wine_run))


def test_a_live_lock_is_refused_and_a_dead_ones_is_taken_over(run_copy: Path, wine_run: Path,
                                                              warm_cli: WarmCLI) -> None:
    import socket

    lock = run_copy / ".lock"
    args = ["--dataset", "wine", "--guide", "exact,amortized", *FA_FLAGS, "--quiet", "--resume", str(run_copy)]
    live = subprocess.Popen(["sleep", "300"])
    try:
        lock.write_text(f"{live.pid} {socket.gethostname()}\n")
        _refused(_pyro_lvm(warm_cli, *args), "--resume:", "in use by another run", f"pid {live.pid}", str(lock))
        assert lock.read_text() == f"{live.pid} {socket.gethostname()}\n"  # another run's lock is left alone
        assert (run_copy / "results.json").read_bytes() == (wine_run / "results.json").read_bytes()
    finally:
        live.kill()
        live.wait()
    # the pid is dead now (reaped): a run killed with -9 left this lock, and the next run takes it over
    proc = _pyro_lvm(warm_cli, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not lock.exists()


def test_a_fresh_output_is_locked_while_the_run_writes_and_removed_when_refused(tmp_path: Path,
                                                                                warm_cli: WarmCLI) -> None:
    """A run refused after its lock was taken leaves no lock and no directory it created."""
    out = tmp_path / "new" / "R"
    proc = _pyro_lvm(warm_cli, "--data", str(tmp_path / "missing.csv"), "--guide", "exact", *FA_FLAGS, "--output",
                     str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_a_stop_before_the_first_checkpoint_suggests_no_resume(tmp_path: Path, wine_run: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the data load: nothing to --resume and no results.json to point to; the output directory the run
    made is gone. The same stop on --resume of a run with checkpoints says how to continue."""
    from pyro_lvm import harness
    from pyro_lvm.experiments import factor_analysis as fa_experiment

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "load_data", interrupted)
    out = tmp_path / "R"
    code = fa_experiment.main(["--dataset", "wine", "--guide", "exact", *FA_FLAGS, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("interrupted: "), err
    assert "--resume" not in err[0] and "results.json" not in err[0], err
    assert not out.exists()

    shutil.copytree(wine_run, out)
    code = fa_experiment.main(["--dataset", "wine", "--guide", "exact", *FA_FLAGS, "--resume", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1, err
    assert f"finished guides are in {out / 'results.json'}" in err[0] and err[0].endswith(f"--resume {out}"), err
    assert not (out / ".lock").exists()

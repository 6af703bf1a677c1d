"""Issue 22: what a run does when the world misbehaves, with no test depending on the machine's speed.

* a full disk: every atomic write (``torch.save`` checkpoints, results, the ``--inspect`` netCDF) fails with one
  :class:`~pyro_lvm.report.WriteError` (one ``error:`` line at the command line, exit 2), nothing half-written left;
* a data-parallel process whose peer never starts: it says what it waits for, gives up after ``ddp_timeout`` with
  one ``error:`` line, and stops at once on SIGTERM or SIGINT.

The processes are real ones with their own pid, exit status, signals and resource limits, forked from the session's
warm interpreter (tests/cli_runner.py) rather than started fresh, which saves each its imports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runner import WarmCLI

from pyro_lvm import report
from pyro_lvm.experiments.cli import run_main
from pyro_lvm.report import WriteError, atomic_write_text
from pyro_lvm.saving import atomic_torch_save

WORKER = Path(__file__).with_name("ddp_worker.py")


# ---------------------------------------------------------------------------------------------- a full disk
class _FullDisk:
    """A binary file whose writes fail with ENOSPC once ``room`` bytes are written (as on a full disk)."""

    def __init__(self, path: Any, mode: str, room: int) -> None:
        self.f, self.room = open(path, mode), room  # noqa: SIM115 - closed by __exit__

    def write(self, data: Any) -> int:
        n = len(data)
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def _fill_disk(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    monkeypatch.setattr(report, "open", lambda path, mode="r", *a, **k: _FullDisk(path, mode, room), raising=False)


@pytest.mark.parametrize("room", [0, 700])  # no room at all; room for torch's header, not its data
def test_torch_save_on_a_full_disk_is_one_clean_error_and_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    old = path.read_bytes()
    _fill_disk(monkeypatch, room)
    with pytest.raises(WriteError) as info:  # not torch's "RuntimeError: [enforce fail at inline_container.cc]"
        atomic_torch_save({"w": torch.randn(10_000)}, path)
    e = info.value
    assert isinstance(e, OSError) and isinstance(e, ValueError)
    assert e.errno == errno.ENOSPC
    text = str(e)
    assert "\n" not in text and "no space left on device" in text and str(path) in text and "free disk space" in text
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stop_that_arrives_while_torch_writes_stops_the_run_not_a_disk_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]) -> None:
    """Ctrl-C or SIGTERM raised while the checkpoint goes to disk stops the run (it ends as interrupted), and is
    not reported as a full disk (CI once printed "could not write last.ckpt: the write failed part way", when
    torch wrote to the file itself and wrapped the stop in ``RuntimeError: [enforce fail] unexpected pos``)."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    old = path.read_bytes()

    class _Stopped(_FullDisk):
        def write(self, data: Any) -> int:
            if self.room < len(data):
                raise stop
            return super().write(data)

    monkeypatch.setattr(report, "open", lambda p, mode="r", *a, **k: _Stopped(p, mode, 700), raising=False)
    with pytest.raises(stop):
        atomic_torch_save({"w": torch.randn(10_000)}, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_stop_between_torchs_last_record_and_its_finalization_does_not_abort_the_process(
        tmp_path: Path, warm_cli: WarmCLI) -> None:
    """A stop handled at the first instruction of torch's zip writer ``__exit__`` (after its last record, before it
    finalizes the archive) leaves the writer to finalize itself in its destructor. Given an open file, that
    destructor wrote to the file after ``atomic_write`` had closed it, and the process died ("terminate called
    after throwing an instance of 'pybind11::error_already_set' ... write to closed file", exit -6: seen once in
    the suite beside two CPU-bound jobs, where a run stopped by SIGTERM aborted after printing its last line).
    The stop lands in a forked process of its own (an abort must not take the test's process with it)."""
    path = tmp_path / "last.ckpt"
    script = tmp_path / "stop.py"
    script.write_text(f"""
import gc, torch, torch.serialization as ts
from pyro_lvm.saving import atomic_torch_save
atomic_torch_save({{"w": torch.zeros(3)}}, {str(path)!r})
def stopped(self, *exc):
    raise KeyboardInterrupt
ts._open_zipfile_writer_buffer.__exit__ = stopped
try:
    atomic_torch_save({{"w": torch.ones(10_000)}}, {str(path)!r})
except KeyboardInterrupt:
    print("stopped")
gc.collect()
print("alive")
""")
    proc = warm_cli.run("", [], tmp_path, script=script, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["stopped", "alive"], proc.stderr[-2000:]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))  # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "stop.py"]


def test_a_full_disk_is_one_error_line_and_exit_2_at_the_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _fill_disk(monkeypatch, 0)

    def main() -> int:
        atomic_write_text(tmp_path / "results.json", "{}\n" * 100)
        return 0

    assert run_main(main) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not write results.json: no space left on device (")
    assert "free disk space" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_write_netcdf_on_a_full_disk_is_one_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import arviz as az

    from pyro_lvm import posterior_report as pr

    idata = az.from_dict(posterior={"a": np.arange(24.0).reshape(2, 4, 3)}, attrs={"guide": "g"})
    path = pr.write_netcdf(idata, tmp_path / "fit.nc")
    old = path.read_bytes()
    _fill_disk(monkeypatch, 100)
    with pytest.raises(WriteError, match="could not write fit.nc: no space left on device"):
        pr.write_netcdf(idata, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["fit.nc"]


def test_netcdf_made_in_memory_is_what_arviz_writes(tmp_path: Path) -> None:
    import arviz as az

    from pyro_lvm.posterior_report import write_netcdf

    idata = az.from_dict(posterior={"a": np.arange(24.0).reshape(2, 4, 3), "k": np.ones((2, 4), dtype=np.int64)},
                         observed_data={"x": np.arange(3.0)}, attrs={"guide": "g"})
    write_netcdf(idata, tmp_path / "ours.nc")
    idata.to_netcdf(str(tmp_path / "arviz.nc"))
    ours, theirs = az.from_netcdf(tmp_path / "ours.nc"), az.from_netcdf(tmp_path / "arviz.nc")
    assert ours.groups() == theirs.groups() and ours.attrs == theirs.attrs
    for g in theirs.groups():
        assert getattr(ours, g).identical(getattr(theirs, g)), g


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a stand-in for a full disk")
def test_writes_that_the_file_system_refuses_end_in_one_error_not_a_crash(tmp_path: Path, warm_cli: WarmCLI) -> None:
    """A real failing file system (a file-size limit: writes past it fail with EFBIG, as ENOSPC on a full disk):
    the netCDF writer used to die with a segmentation fault inside HDF5, torch.save with an enforce-fail traceback.
    Each write runs in a process of its own (forked: the limit is that process's alone); its stderr goes to a file
    outside the directory written to, and the one line expected is far below the limit."""
    target = tmp_path / "target"
    target.mkdir()
    script = tmp_path / "write.py"
    script.write_text(f"""
import resource, signal, sys
import numpy as np, arviz as az, torch
from pyro_lvm.experiments.cli import run_main
from pyro_lvm.posterior_report import write_netcdf
from pyro_lvm.saving import atomic_torch_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
idata = az.from_dict(posterior={{"a": np.random.default_rng(0).normal(size=(4, 500, 100))}})
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.RLIM_INFINITY))
write = {{"nc": lambda: write_netcdf(idata, {str(target / 'fit.nc')!r}),
         "pt": lambda: atomic_torch_save({{"w": torch.zeros(100_000)}}, {str(target / 'last.ckpt')!r})}}[sys.argv[1]]
sys.exit(run_main(lambda: write() and 0))
""")
    for kind, name in (("nc", "fit.nc"), ("pt", "last.ckpt")):
        proc = warm_cli.run("", [kind], tmp_path, script=script, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith(f"error: could not write {name}: file too large"), proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and list(target.iterdir()) == []


# ---------------------------------------------------------------------------------------------- a missing peer
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_of_two_nodes() -> dict[str, str]:
    """The environment added for rank 0 of a two-node run whose other node never starts."""
    return {"PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "NODE_RANK": "0"}


def test_a_rank_whose_peer_never_starts_gives_up_after_ddp_timeout(tmp_path: Path, warm_cli: WarmCLI) -> None:
    proc = warm_cli.run("", [str(tmp_path / "out.pt"), "--num-nodes", "2", "--ddp-timeout", "2"], tmp_path,
                        script=WORKER, env=_one_of_two_nodes(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    waiting = [ln for ln in lines if "waiting for all 2 data-parallel processes" in ln]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(waiting) == 1 and "127.0.0.1:" in waiting[0] and "giving up after 2 s" in waiting[0]
    assert len(errors) == 1 and "did not all join within 2 s" in errors[0] and "--ddp-timeout" in errors[0]
    assert not (tmp_path / "out.pt").exists()


#: a guard against a hang only: the waiting line comes as soon as the process reaches the rendezvous
HANG_GUARD_S = 280


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGINT, 130, "interrupted")])
def test_a_waiting_rank_stops_on_a_signal(tmp_path: Path, warm_cli: WarmCLI, sig: int, code: int, word: str) -> None:
    """The command line, one process of two nodes: once it says it is waiting (no clock raced), the signal ends it
    (before, torch's rendezvous held the main thread in C++ and only kill -9 stopped it). The process is forked from
    the warm interpreter, whose SIGINT is at its default (``pytest &`` would have it ignored), as a fresh one's."""
    stderr = tmp_path / "stderr.txt"
    proc = warm_cli.submit(
        "pyro_lvm.experiments.factor_analysis",
        ["--dataset", "synthetic", "--guide", "exact", "--epochs", "2", "--num-nodes", "2", "--strategy", "ddp",
         "--accelerator", "cpu", "--output", str(tmp_path / "run"), "--quiet"],
        tmp_path, stdout=tmp_path / "stdout.txt", stderr=stderr, env=_one_of_two_nodes())

    def err() -> str:
        return stderr.read_text() if stderr.exists() else ""

    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while "waiting for all 2 data-parallel processes" not in err():  # polled: the line, not a clock, decides
            assert proc.poll() is None, f"exited {proc.returncode} before waiting: {err()[-3000:]}"
            assert time.monotonic() < deadline, f"no waiting line within {HANG_GUARD_S} s (a hang): {err()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, err()[-3000:]
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may have ended since
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    text = err()
    assert "Traceback" not in text and text.splitlines()[-1].startswith(f"{word}:"), text[-3000:]
    assert not (tmp_path / "run").exists()  # nothing written: the output it made is removed again


def test_resume_inspect_redoes_a_truncated_netcdf(tmp_path: Path, warm_cli: WarmCLI) -> None:
    """A finished guide whose ``.nc`` was cut short (a crash, a full disk elsewhere) is inspected again on
    ``--resume --inspect``: the same bytes as the first run, exit 0, no traceback. Both runs are real command lines,
    forked from the warm interpreter."""
    out = tmp_path / "R"
    args = ["factor_analysis", "--dataset", "iris", "--latent-dim", "2", "--guide", "amortized", "--epochs", "2",
            "--iwae-k", "5", "--seed", "0", "--inspect", "--inspect-points", "5", "--inspect-samples", "25", "--quiet"]
    first = warm_cli.run("pyro_lvm.experiments", [*args, "--output", str(out)], tmp_path)
    assert first.returncode == 0, first.stderr
    nc = out / "amortized.nc"
    whole = nc.read_bytes()
    nc.write_bytes(whole[: len(whole) // 2])
    again = warm_cli.run("pyro_lvm.experiments", [*args, "--resume", str(out)], tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert nc.read_bytes() == whole

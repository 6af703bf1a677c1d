"""Several nodes, actually run: the experiment command line started twice as the two nodes of one data-parallel fit
(``--num-nodes 2 --devices 1``, ``NODE_RANK`` 0 and 1, the rendezvous on 127.0.0.1) trains to the single-process
fit's parameters, to the tolerance of ``tests/test_distributed.py``.

The command is the documented multi-node command (docs/guide/scaling.md, "Two nodes, tested"; a test below keeps
the two the same, flag for flag), run on one machine (each node's command differs from the other's
only in ``NODE_RANK``):

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 NODE_RANK=0 \\
        python -m pyro_lvm.experiments.factor_analysis --dataset synthetic --guide exact --optimizer sgd \\
        --epochs 20 --keep last --iwae-k 10 --seed 0 --accelerator cpu --num-nodes 2 --devices 1 --strategy ddp \\
        --output runs/fa_two_nodes --quiet            # and the same with NODE_RANK=1 on the second node

(The test picks a free MASTER_PORT, sets OMP_NUM_THREADS=1, and runs the single process, the same command without
``--num-nodes 2 --devices 1 --strategy ddp``, after the two nodes. Node 1 is a fresh interpreter; node 0 and the
single process are real processes forked from the session's warm interpreter (tests/cli_runner.py), which saves
their imports: a fresh node and a forked one train together to the fit of a forked single process.)

Why the two fits agree to rounding: factor analysis with its exact posterior as the guide has an ELBO gradient equal
to ∇ log p(x) whatever z is drawn, the fit is full-batch (each node takes half of the 1200 training points, one
step an epoch; the plate scales each half to all 1200 and DDP averages the two gradients: the full-data gradient),
and plain SGD moves in proportion to the gradient, so any error in how the nodes combine (a sum, a plate scaled to
the node's half) would show as a factor of 2, not as rounding.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import Pending, WarmCLI

import pyro_lvm

#: the command line of the module doc, flag for flag: ``command(out, TWO_NODES)`` is each node's, ``command(out)``
#: the single process's (the same without the three data-parallel flags)
TWO_NODES = ("--num-nodes", "2", "--devices", "1", "--strategy", "ddp")


def command(out: Path, parallel: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "pyro_lvm.experiments.factor_analysis", "--dataset", "synthetic", "--guide",
            "exact", "--optimizer", "sgd", "--epochs", "20", "--keep", "last", "--iwae-k", "10", "--seed", "0",
            "--accelerator", "cpu", *parallel, "--output", str(out), "--quiet"]
#: a guard against a hang only (a node that never joins, a deadlocked collective), never a speed limit
HANG_GUARD_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    # a suite started in the background by a non-interactive shell (``pytest &``) inherits SIGINT ignored, Python
    # keeps an ignored SIGINT ignored, and Ctrl-C would not stop the child: give it the default back
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_default_sigint,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg",
                                 **env})


def _finish(procs: dict[str, subprocess.Popen | Pending]) -> dict[str, str]:
    """Each process's stderr, once all have exited with status 0 and no traceback (any still running is killed)."""
    errs: dict[str, str] = {}
    try:
        for name, proc in procs.items():
            if isinstance(proc, Pending):
                errs[name] = proc.result(HANG_GUARD_S).stderr
            else:
                _, errs[name] = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it may have ended since
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{errs.get(name, '')[-3000:]}"
        assert "Traceback" not in errs[name], errs[name][-3000:]
    return errs


def _train_losses(out: Path) -> list[float]:
    with open(out / "checkpoints" / "exact" / "metrics.csv", newline="") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f)]


def _fork(cli: WarmCLI, args: list[str], cwd: Path, **env: str) -> Pending:
    """``args`` (``python -m MODULE ...``) forked from the warm interpreter, with :func:`_start`'s environment."""
    assert args[:2] == [sys.executable, "-m"]
    return cli.submit(args[2], args[3:], cwd, env={"PYTHONWARNINGS": "ignore", **env})


def test_two_nodes_on_one_machine_train_to_the_single_process_fit(tmp_path: Path, warm_cli: WarmCLI) -> None:
    two, one = tmp_path / "two_nodes", tmp_path / "one"
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = {  # the same command on both nodes (one output, as on a shared file system: only rank 0 writes)
        "node 0": _fork(warm_cli, command(two, TWO_NODES), tmp_path, NODE_RANK="0", **rendezvous),
        "node 1": _start(command(two, TWO_NODES), tmp_path, NODE_RANK="1", **rendezvous),
        # the warm interpreter serves one request at a time: this one starts once node 0 has finished
        "one process": _fork(warm_cli, command(one), tmp_path),
    }
    _finish(procs)

    doc_two, doc_one = (json.loads((d / "results.json").read_text()) for d in (two, one))
    (row_two,), (row_one,) = doc_two["results"], doc_one["results"]
    assert row_two["config"]["train"]["num_nodes"] == 2 and row_two["config"]["train"]["strategy"] == "ddp"
    assert row_one["config"]["train"]["num_nodes"] == 1
    assert doc_two["data"] == doc_one["data"]  # the same data, split alike on every node

    # the parameters, to tests/test_distributed.py's tolerance (the loss falls by over 0.01 nats a point, below: they
    # move far more than it)
    fit_two, fit_one = (pyro_lvm.load(d / "checkpoints" / "exact" / "fitted.pt") for d in (two, one))
    state_two, state_one = fit_two.model.state_dict(), fit_one.model.state_dict()
    assert state_two.keys() == state_one.keys()
    for name, want in state_one.items():
        torch.testing.assert_close(state_two[name], want, rtol=0, atol=1e-10)
    losses_two, losses_one = _train_losses(two), _train_losses(one)
    assert len(losses_two) == len(losses_one) == 20
    assert losses_one[-1] < losses_one[0] - 1e-2  # it trained
    assert losses_two == pytest.approx(losses_one, abs=1e-12)  # reduced over both nodes: the mean over all points
    for metric in ("exact_log_likelihood", "elbo", "iwae"):
        assert row_two["test"][metric] == pytest.approx(row_one["test"][metric], abs=1e-10), metric


def test_the_documented_two_node_command_is_the_one_this_test_runs() -> None:
    """docs/guide/scaling.md's "Two nodes, tested" command, token for token, is :func:`command` with
    :data:`TWO_NODES` (the output it names), with the rendezvous of one node in its environment."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "scaling.md").read_text()
    block = re.search(r"\*\*Two nodes, tested\.\*\*.*?```bash\n(.*?)```", page, re.S).group(1)
    tokens = shlex.split(block.replace("\\\n", " "), comments=True)
    env = [t for t in tokens if re.fullmatch(r"[A-Z_]+=\S*", t)]
    assert env == ["MASTER_ADDR=127.0.0.1", "MASTER_PORT=29500", "NODE_RANK=0"]
    documented = tokens[len(env):]
    out = documented[documented.index("--output") + 1]
    assert documented == ["python", *command(Path(out), TWO_NODES)[1:]]

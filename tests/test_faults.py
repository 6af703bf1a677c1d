"""Bad input through the real command line: one ``error:`` line, exit status 2, no traceback, nothing half-written.

Every case of issue 10's lists (and the ones handled before it) runs ``python -m pyro_lvm.experiments.X ARGS`` in a
working directory of its own and must give: exit status 2; exactly one line on stderr, starting with ``error:``
(and naming what the case is about); no ``Traceback`` in stdout or stderr; and under ``--output`` no temporary file
left behind and no ``results.json`` that does not parse.

Starting Python and importing torch, Pyro and Lightning takes seconds, and there are dozens of cases, so they run in
processes forked from one interpreter that has made those imports once (the session's ``warm_cli``, see
tests/cli_runner.py): each child changes to its own directory, points its stdout and stderr at files, and runs the
module as ``__main__`` with :mod:`runpy`, as ``python -m`` does; its exit status is the command's.
:func:`test_forked_runs_match_fresh_interpreters` runs a few cases in fresh interpreters too and checks they print
the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runner import WarmCLI, fresh_env, sigint_default

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: tiny-run flags for the VAE on the fake MNIST below
VAE_TINY = ["--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--iwae-k", "2", "--quiet"]


@dataclass
class Case:
    id: str
    #: experiment module under pyro_lvm.experiments ("" runs the package: ``python -m pyro_lvm.experiments``)
    module: str
    #: arguments; ``{shared}`` is the directory of shared inputs, ``{cwd}`` the case's own directory
    args: list[str]
    #: words the error line must hold (the flag or file it is about, the estimators that fit, ...)
    needles: list[str] = field(default_factory=list)
    #: expected exit status (0 only for the runs that other cases read)
    status: int = 2
    #: files or directories to make in the case's directory first: name -> "file", "dir" or "readonly-dir"
    make: dict[str, str] = field(default_factory=dict)
    #: (source, destination) directories copied, without fitted.pt, before the case runs (after earlier cases)
    copy_without_fitted: tuple[str, str] | None = None
    #: needs a user that file permissions apply to (root writes anywhere)
    needs_non_root: bool = False


CASES = [
    # ---------------------------------------------------------------- runs that later cases read
    Case("setup-vae-run", "vae", ["--data-dir", "{shared}/mnist", *VAE_TINY, "--output", "{shared}/run"], status=0),
    # ---------------------------------------------------------------- issue 10: wrong answers that exited 0
    Case("gmm-enumerated-with-trace", "gaussian_mixture", ["--assignments", "enumerated", "--elbo", "trace"],
         ["--elbo", "'trace'", "usable: traceenum"]),
    Case("vae-negative-warmup", "vae", ["--warmup-epochs", "-5"], ["--warmup-epochs", "-5"]),
    Case("vae-lr-final-factor-0", "vae", ["--lr-final-factor", "0"], ["--lr-final-factor"]),
    Case("gmm-negative-separation", "gaussian_mixture", ["--dataset", "synthetic_mixture", "--separation", "-1"],
         ["--separation"]),
    Case("vae-bernoulli-on-grey-data", "vae", ["--data", "{shared}/grey.csv", "--decoder", "bernoulli", *VAE_TINY],
         ["Bernoulli", "binary", "--decoder gaussian"]),
    # ---------------------------------------------------------------- issue 10: tracebacks or dumps
    Case("vae-output-is-a-file", "vae", ["--output", "taken"], ["--output", "not a directory"], make={"taken": "file"}),
    Case("fa-output-is-a-file", "factor_analysis", ["--output", "taken"], ["--output"], make={"taken": "file"}),
    Case("gmm-output-is-a-file", "gaussian_mixture", ["--output", "taken"], ["--output"], make={"taken": "file"}),
    Case("fa-output-under-a-file", "factor_analysis", ["--output", "taken/run"], ["--output", "is a file"],
         make={"taken": "file"}),
    Case("vae-output-unwritable", "vae", ["--data-dir", "{shared}/mnist", *VAE_TINY, "--output", "locked"],
         ["--output", "permission denied"], make={"locked": "readonly-dir"}, needs_non_root=True),
    Case("fa-output-unwritable", "factor_analysis", ["--epochs", "1", "--output", "locked/run"],
         ["--output", "permission denied"], make={"locked": "readonly-dir"}, needs_non_root=True),
    Case("gmm-output-unwritable", "gaussian_mixture", ["--epochs", "1", "--output", "locked"],
         ["--output", "permission denied"], make={"locked": "readonly-dir"}, needs_non_root=True),
    Case("vae-from-checkpoints-other-hidden", "vae",
         ["--data-dir", "{shared}/mnist", *VAE_TINY, "--hidden", "16", "--from-checkpoints", "{shared}/run"],
         ["--from-checkpoints", "fitted.pt", "model.hidden: saved [8], this run [16]"]),
    Case("vae-from-training-checkpoint-other-hidden", "vae",
         ["--data-dir", "{shared}/mnist", *VAE_TINY, "--hidden", "16", "--from-checkpoints", "{cwd}/run"],
         ["--from-checkpoints", "shape"], copy_without_fitted=("{shared}/run", "{cwd}/run")),
    Case("vae-from-checkpoints-other-data", "vae",
         ["--data", "{shared}/grey.csv", *VAE_TINY, "--from-checkpoints", "{shared}/run"],
         ["--from-checkpoints", "model.data_dim: saved 784, this run 3"]),
    Case("gmm-amortized-with-meanfield", "gaussian_mixture", ["--assignments", "amortized", "--elbo", "meanfield"],
         ["--elbo", "usable: tracegraph, trace"]),
    Case("vae-lr-inf", "vae", ["--lr", "inf"], ["--lr", "inf"]),
    Case("vae-unknown-flag", "vae", ["--bogus"], ["--bogus", "--help"]),
    Case("fa-bad-int", "factor_analysis", ["--epochs", "x"], ["--epochs", "'x'", "--help"]),
    Case("gmm-bad-choice", "gaussian_mixture", ["--covariance", "spherical"], ["--covariance", "spherical"]),
    Case("gmm-flag-without-value", "gaussian_mixture", ["--components"], ["--components"]),
    Case("fa-bad-float-list", "factor_analysis", ["--split", "0.6,x,0.2"], ["--split"]),
    Case("vae-amat-not-binary", "vae", ["--data-dir", "{shared}/amat_grey", *VAE_TINY],
         ["binarized_mnist_train.amat", "not 0 or 1", "row 3, column 5"]),
    Case("vae-amat-wrong-width", "vae", ["--data-dir", "{shared}/amat_narrow", *VAE_TINY],
         ["binarized_mnist_train.amat", "784", "(20, 783)"]),
    # ---------------------------------------------------------------- handled before: bad data
    Case("fa-nan-in-csv", "factor_analysis", ["--data", "{shared}/nan.csv", "--latent-dim", "1"],
         ["nan.csv", "NaN at row 1, column 1"]),
    Case("gmm-inf-in-npy", "gaussian_mixture", ["--data", "{shared}/inf.npy"], ["inf.npy", "inf at row 2"]),
    Case("fa-three-dimensional-array", "factor_analysis", ["--data", "{shared}/cube.npy"], ["cube.npy", "2-D"]),
    Case("fa-latent-dim-too-wide-for-data", "factor_analysis", ["--data", "{shared}/grey.csv", "--latent-dim", "5"],
         ["--latent-dim", "3 features"]),
    Case("fa-missing-data-file", "factor_analysis", ["--data", "missing.csv"], ["missing.csv"]),
    Case("fa-data-is-a-directory", "factor_analysis", ["--data", "folder.csv"], ["folder.csv", "not a file"],
         make={"folder.csv": "dir"}),
    Case("fa-unknown-column", "factor_analysis", ["--data", "{shared}/grey.csv", "--columns", "zz"], ["'zz'"]),
    Case("vae-missing-mnist", "vae", ["--data-dir", "empty", *VAE_TINY], ["binarized MNIST not found", "--data-dir"],
         make={"empty": "dir"}),
    Case("vae-unreadable-mnist-npz", "vae", ["--data-dir", "{shared}/npz_junk", *VAE_TINY],
         ["binarized_mnist.npz", "cannot read"]),
    Case("gmm-more-components-than-points", "gaussian_mixture", ["--data", "{shared}/grey.csv", "--components", "50"],
         ["--components", "50 components"]),
    # ---------------------------------------------------------------- handled before: bad flags
    Case("fa-unknown-guide", "factor_analysis", ["--guide", "exact,nope"], ["unknown guide 'nope'", "valid guides"]),
    Case("gmm-guide-that-does-not-fit", "gaussian_mixture", ["--guide", "exact"], ["'exact'", "usable guides"]),
    Case("vae-bad-guide-argument", "vae", ["--guide", "planar:0"], ["planar:0"]),
    Case("gmm-zero-components", "gaussian_mixture", ["--components", "0"], ["--components", "got 0"]),
    Case("fa-unknown-dataset", "factor_analysis", ["--dataset", "nope"], ["unknown dataset 'nope'"]),
    Case("fa-dataset-without-the-needed-kind", "factor_analysis", ["--dataset", "binarized_mnist"],
         ["--dataset", "lacks continuous"]),
    Case("fa-split-not-summing-to-one", "factor_analysis", ["--split", "0.5,0.2,0.2"], ["--split", "sum"]),
    Case("gmm-split-without-test", "gaussian_mixture", ["--split", "0.7,0.3,0"], ["--split", "test"]),
    Case("gmm-zero-encoder-layer", "gaussian_mixture", ["--encoder-hidden", "0"], ["--encoder-hidden"]),
    Case("fa-zero-threads", "factor_analysis", ["--threads", "0"], ["--threads"]),
    Case("fa-from-checkpoints-not-a-directory", "factor_analysis", ["--from-checkpoints", "nowhere"],
         ["--from-checkpoints", "nowhere"]),
    Case("fa-from-checkpoints-without-checkpoints", "factor_analysis", ["--epochs", "1", "--from-checkpoints", "."],
         ["no checkpoint", "--from-checkpoints"]),
    Case("vae-from-checkpoints-missing-guide", "vae",
         ["--data-dir", "{shared}/mnist", *VAE_TINY, "--guide", "amortized,planar:2", "--from-checkpoints",
          "{shared}/run"], ["planar_2", "no checkpoint"]),
    Case("vae-from-checkpoints-corrupt-file", "vae",
         ["--data-dir", "{shared}/mnist", *VAE_TINY, "--from-checkpoints", "{shared}/junk_run"],
         ["fitted.pt", "not a readable"]),
    Case("unknown-experiment", "", ["nope"], ["unknown experiment 'nope'"]),
    Case("quickstart-unknown-section", "", ["quickstart", "--sections", "nope"], ["unknown quickstart section"]),
]
CASE_IDS = [c.id for c in CASES]

def _env() -> dict[str, str]:
    return fresh_env()


def _fill(text: str, shared: Path, cwd: Path) -> str:
    return text.replace("{shared}", str(shared)).replace("{cwd}", str(cwd))


def _module(case: Case) -> str:
    return f"pyro_lvm.experiments.{case.module}" if case.module else "pyro_lvm.experiments"


def _args(case: Case, shared: Path, cwd: Path) -> list[str]:
    args = [_fill(a, shared, cwd) for a in case.args]
    return args if "--output" in args or not case.module else [*args, "--output", "out"]


def _write_inputs(shared: Path) -> None:
    """Small inputs every case may read: a fake MNIST, grey (non-binary) and broken tables, .amat files."""
    rng = np.random.default_rng(0)
    (shared / "mnist").mkdir()
    np.savez_compressed(shared / "mnist" / "binarized_mnist.npz",
                        **{k: np.packbits(rng.random((40, 784)) < 0.13, axis=1) for k in ("train", "valid", "test")})
    grey = rng.random((40, 3)).round(3)
    np.savetxt(shared / "grey.csv", grey, delimiter=",", header="a,b,c", comments="")
    nan = grey.copy()
    nan[1, 1] = np.nan
    np.savetxt(shared / "nan.csv", nan, delimiter=",", header="a,b,c", comments="")
    inf = grey.copy()
    inf[2, 0] = np.inf
    np.save(shared / "inf.npy", inf)
    np.save(shared / "cube.npy", np.zeros((4, 3, 2)))
    for name, width, value in (("amat_grey", 784, 0.5), ("amat_narrow", 783, 1)):
        (shared / name).mkdir()
        for split in ("train", "valid", "test"):
            a = (rng.random((20, width)) < 0.2).astype(float)
            a[3, 5] = value
            np.savetxt(shared / name / f"binarized_mnist_{split}.amat", a, fmt="%g")
    (shared / "npz_junk").mkdir()
    (shared / "npz_junk" / "binarized_mnist.npz").write_text("not a zip file")
    (shared / "junk_run" / "checkpoints" / "amortized").mkdir(parents=True)
    (shared / "junk_run" / "checkpoints" / "amortized" / "fitted.pt").write_text("not a checkpoint")


def _prepare(case: Case, cwd: Path) -> None:
    cwd.mkdir(parents=True)
    for name, kind in case.make.items():
        if kind == "file":
            (cwd / name).write_text("already here\n")
        else:
            (cwd / name).mkdir()
            if kind == "readonly-dir":
                (cwd / name).chmod(0o555)


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    output: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs every case may read (see :func:`_write_inputs`)."""
    path = tmp_path_factory.mktemp("faults") / "shared"
    path.mkdir()
    _write_inputs(path)
    return path


def _run_fresh(step: dict[str, Any]) -> int:
    """One case in a fresh interpreter: ``python -m MODULE ARGS`` in its directory; its output goes to files there."""
    if step["copy"]:
        shutil.copytree(*step["copy"], ignore=shutil.ignore_patterns("fitted.pt"))
    proc = subprocess.run([sys.executable, "-m", step["module"], *step["args"]], cwd=step["cwd"], env=_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=sigint_default)
    (Path(step["cwd"]) / "stdout.txt").write_text(proc.stdout)
    (Path(step["cwd"]) / "stderr.txt").write_text(proc.stderr)
    return proc.returncode


def _run_forked(cli: WarmCLI, step: dict[str, Any]) -> int:
    """One case forked from the warm interpreter (after the copy it needs, so after the cases before it)."""
    if step["copy"]:
        shutil.copytree(*step["copy"], ignore=shutil.ignore_patterns("fitted.pt"))
    cwd = Path(step["cwd"])
    return cli.run(step["module"], step["args"], cwd, stdout=cwd / "stdout.txt", stderr=cwd / "stderr.txt").returncode


def _plan(case: Case, shared: Path, cwd: Path) -> dict[str, Any]:
    _prepare(case, cwd)
    copy = [_fill(p, shared, cwd) for p in case.copy_without_fitted] if case.copy_without_fitted else None
    return {"id": case.id, "module": _module(case), "args": _args(case, shared, cwd), "cwd": str(cwd), "copy": copy}


def _outcome(step: dict[str, Any], status: int) -> Outcome:
    cwd, args = Path(step["cwd"]), step["args"]
    output = Path(args[args.index("--output") + 1]) if "--output" in args else Path("out")
    return Outcome(status, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text(),
                   output if output.is_absolute() else cwd / output)


#: cases also run in a fresh interpreter, to show that forking from a warm one changes nothing
FRESH = ["fa-bad-int", "vae-amat-not-binary"]


@pytest.fixture(scope="module")
def outcomes(shared: Path, warm_cli: WarmCLI) -> Iterator[dict[str, Outcome]]:
    """Every case run once, in order, each in its own directory (forked from one interpreter, see the module doc);
    meanwhile, on another core, the :data:`FRESH` cases in fresh interpreters (keys ``fresh:<id>``)."""
    root = shared.parent
    cases = [c for c in CASES if not (c.needs_non_root and IS_ROOT)]
    plan = [_plan(case, shared, root / case.id) for case in cases]
    by_id = {c.id: c for c in CASES}
    fresh_plan = [_plan(by_id[i], shared, root / "fresh" / i) for i in FRESH]
    fresh_status: dict[str, int] = {}
    thread = threading.Thread(target=lambda: fresh_status.update({s["id"]: _run_fresh(s) for s in fresh_plan}))
    thread.start()
    try:
        status = {step["id"]: _run_forked(warm_cli, step) for step in plan}
    finally:
        thread.join()
    out = {step["id"]: _outcome(step, status[step["id"]]) for step in plan}
    out.update({f"fresh:{step['id']}": _outcome(step, fresh_status[step["id"]]) for step in fresh_plan})
    yield out
    for case in cases:  # let pytest clean up the read-only directories
        for name, kind in case.make.items():
            if kind == "readonly-dir":
                (root / case.id / name).chmod(0o755)


def _check_output_dir(output: Path) -> None:
    """Nothing half-written under ``output``: no temporary file of an atomic write, every results.json parses."""
    if not output.is_dir():
        return
    leftovers = [p for p in output.rglob("*") if p.name.endswith((".tmp", ".part")) or p.name.startswith(".")]
    assert not leftovers, f"half-written files left under {output}: {leftovers}"
    for results in output.rglob("results.json"):
        json.loads(results.read_text())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_is_one_line_and_exit_status_2(case: Case, outcomes: dict[str, Outcome]) -> None:
    if case.needs_non_root and IS_ROOT:
        pytest.skip("root may write to read-only directories")
    got = outcomes[case.id]
    shown = f"exit {got.status}\n--- stderr\n{got.stderr[-3000:]}\n--- stdout\n{got.stdout[-1000:]}"
    assert "Traceback" not in got.stdout + got.stderr, shown
    assert got.status == case.status, shown
    _check_output_dir(got.output)
    if case.status == 0:
        assert (got.output / "results.json").is_file(), shown
        return
    lines = got.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert "usage:" not in got.stderr and "tensor(" not in got.stderr, shown
    missing = [n for n in case.needles if n not in lines[0]]
    assert not missing, f"the error line lacks {missing}: {lines[0]}"


@pytest.mark.parametrize("case_id", FRESH)
def test_forked_runs_match_fresh_interpreters(case_id: str, outcomes: dict[str, Outcome]) -> None:
    """The fork-from-one-interpreter shortcut prints what ``python -m`` in a fresh interpreter prints."""
    forked, fresh = outcomes[case_id], outcomes[f"fresh:{case_id}"]
    assert (fresh.status, fresh.stdout, fresh.stderr) == (forked.status, forked.stdout, forked.stderr)


def test_a_plain_pyro_loop_cannot_score_grey_data_with_the_bernoulli_decoder() -> None:
    """The decoder skips Pyro's per-call argument checks (a NaN would print a tensor), so the model checks the
    observed data itself: ``Trace_ELBO`` outside :func:`pyro_lvm.fit` refuses non-binary data too."""
    from pyro.infer import Trace_ELBO

    from pyro_lvm.guides import GuideConfig, build_guide
    from pyro_lvm.models import VAE, VAEConfig
    from pyro_lvm.runtime import local_params

    model = VAE(VAEConfig(data_dim=5, latent_dim=2, hidden=(4,)))
    guide = build_guide("amortized", model, GuideConfig(hidden=(4,)))
    with local_params(model, guide):
        assert torch.isfinite(torch.as_tensor(Trace_ELBO().loss(model, guide, torch.ones(3, 5))))
        with pytest.raises(ValueError, match="the Bernoulli decoder needs binary 0/1 data, but 3 rows"):
            Trace_ELBO().loss(model, guide, torch.full((3, 5), 0.5))


def test_config_errors_name_the_argument_in_the_api() -> None:
    """The API refuses the same values with a ValueError naming the field (the command line names the flag)."""
    from pyro_lvm.data import DataConfig
    from pyro_lvm.experiments.factor_analysis import FAExperimentConfig
    from pyro_lvm.experiments.gaussian_mixture import GMMExperimentConfig
    from pyro_lvm.experiments.vae import VAEExperimentConfig

    cases: list[tuple[Any, dict[str, Any], str]] = [
        (FAExperimentConfig, {"split": (0.5, 0.6, -0.1)}, "split: fractions must be finite numbers >= 0"),
        (FAExperimentConfig, {"encoder_hidden": (0,)}, "encoder_hidden: layer sizes"),
        (GMMExperimentConfig, {"split": (0.7, 0.3, 0.0)}, "split: the train and test fractions must be > 0"),
        (GMMExperimentConfig, {"separation": -1.0}, "separation: must be a finite number > 0"),
        (VAEExperimentConfig, {"flow_hidden": (3, -1)}, "flow_hidden: layer sizes"),
        (DataConfig, {"subset": 0}, "subset: must be an integer >= 1"),
    ]
    for cls, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)

"""The documentation works: the tutorials run and say what they claim (tiny settings), the rendered notebooks match
their sources, the README's examples run in order and its links resolve, and ``mkdocs build --strict`` passes
with the command-line and API references complete."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pyro_lvm

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "docs" / "tutorials"

#: runs one tutorial as a script and prints the globals the test reads, as JSON (tables as {column: {row: value}})
DRIVER = textwrap.dedent("""
    import json, runpy, sys
    import matplotlib
    matplotlib.use("Agg")
    import torch
    torch.set_num_threads(1)
    g = runpy.run_path(sys.argv[1])
    out = {}
    for name in sys.argv[2].split(","):
        v = g[name]
        out[name] = json.loads(v.to_json()) if hasattr(v, "to_json") else v
    print("RESULT " + json.dumps(out, default=float))
""")


def run_tutorial(name: str, names: list[str], tmp_path: Path, warm_cli: object) -> dict:
    """The tutorial as a script, in a process forked from the suite's warm interpreter (its imports done once: a
    fresh interpreter per tutorial cost ~5 s each), at the tiny settings."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = warm_cli.run("", [str(TUTORIALS / f"{name}.py"), ",".join(names)], cwd=tmp_path,  # type: ignore[attr-defined]
                        script=driver, env={"PYRO_LVM_TUTORIAL_TINY": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def _num(v: object) -> float:
    return -math.inf if v is None else float(v)  # pandas writes -inf as null


def test_compare_families_tutorial_orders_the_bounds_and_the_exact_guide_closes_the_gap(tmp_path: Path,
                                                                                       warm_cli: object) -> None:
    r = run_tutorial("compare_families", ["table", "baseline", "IWAE_K"], tmp_path, warm_cli)
    table, k = r["table"], r["IWAE_K"]
    guides = list(table["ELBO"])
    assert guides == ["exact", "amortized", "amortized-fullcov", "iaf:2"]
    for g in guides:
        elbo, iwae, exact = table["ELBO"][g], table[f"IWAE-{k}"][g], table["exact log p(x)"][g]
        assert elbo <= iwae + 1e-6 and iwae <= exact + 0.05, (g, elbo, iwae, exact)
        assert table["gap exact − ELBO"][g] == pytest.approx(exact - elbo, abs=1e-9)
    assert abs(table["gap exact − ELBO"]["exact"]) < 1e-4 and _num(table["mean k̂"]["exact"]) == -math.inf
    # the fitted model beats independent standard normals on the standardized test data (10 features)
    assert table["exact log p(x)"]["exact"] > -0.5 * 10 * math.log(2 * math.pi) - 5.0 + 1.0
    assert abs(table["exact log p(x)"]["exact"] - r["baseline"]) < 2.0  # SVI in reach of scikit-learn's EM


def test_inspect_tutorial_flags_the_diagonal_guide_and_splits_its_gap(tmp_path: Path, warm_cli: object) -> None:
    r = run_tutorial("inspect_and_trust", ["verdict", "report", "error_raw", "error_psis"], tmp_path, warm_cli)
    verdict, report = r["verdict"], r["report"]
    assert verdict["share k̂ ≤ 0.7"]["exact"] == 1.0 and verdict["verdict"]["exact"] == "use the draws"
    assert verdict["share k̂ ≤ 0.7"]["amortized"] < 0.5  # too narrow in the correlated direction
    mf = report["analytic mean-field gap"]["amortized"]
    assert mf > 1.0  # the rotation made the posterior correlated
    # the per-point optimum of the diagonal family cannot beat the analytic mean-field optimum
    assert report["approximation_gap"]["amortized"] >= mf - 0.05
    # the full-covariance family contains the posterior: far less is the family's
    assert report["approximation_gap"]["amortized-fullcov"] < report["approximation_gap"]["amortized"] - 0.5
    for g in report["log_px"]:
        total = report["log_px"][g] - report["amortized_elbo"][g]
        assert report["approximation_gap"][g] + report["amortization_gap"][g] == pytest.approx(total, abs=1e-6)
    assert r["error_psis"] < r["error_raw"]  # PSIS moves the trusted points' means toward the exact ones


def test_own_model_tutorial_refuses_the_bad_function_and_recovers_the_size_factor(tmp_path: Path,
                                                                                  warm_cli: object) -> None:
    r = run_tutorial("own_model", ["refusal", "table", "baseline", "correlation", "GUIDES"], tmp_path, warm_cli)
    assert "'c'" in r["refusal"] and "discrete" in r["refusal"]
    table = r["table"]
    assert list(table["ELBO"]) == r["GUIDES"]
    for g in r["GUIDES"]:
        assert table["IWAE − baseline"][g] > 10.0, table  # the latents carry what independent Poissons miss
    assert r["correlation"] > 0.5  # E_q[s | x] tracks the size factor that made the data


@pytest.mark.parametrize("name", ["compare_families", "inspect_and_trust", "own_model"])
def test_rendered_notebook_matches_its_source(name: str) -> None:
    import jupytext  # the docs tools are in the test extra: missing, the test fails rather than skips
    import nbformat
    source = [c.source for c in jupytext.read(TUTORIALS / f"{name}.py").cells]
    rendered = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    assert [c.source for c in rendered.cells] == source, \
        f"docs/tutorials/{name}.ipynb is stale: run python docs/execute_tutorials.py {name}"
    code = [c for c in rendered.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell was executed"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "the figures are in it"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_verbs_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three verbs' Python examples, in the README's order (the second and third continue the first)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### 1. Run an experiment"):readme.index("## Your own model")]
    blocks = _python_blocks(section)
    assert len(blocks) == 3
    code = "\n".join(blocks).replace("epochs=300", "epochs=30")  # the same calls, fewer passes
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    with pyro_lvm.runtime.seeded(0):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    s = namespace["s"]
    assert s["elbo"] <= s["iwae"] + 1e-6 and s["iwae"] <= s["exact_log_likelihood"] + 0.05
    idata = namespace["idata"]
    k_hat = idata.sample_stats["pareto_k"].values
    z_psis = idata.sample_stats["z_mean_psis"].values
    assert idata.posterior["z"].sizes["draw"] == 1000 and k_hat.shape == (len(namespace["ds"].test),)
    assert (np.isnan(z_psis).any(axis=-1) == (k_hat > 0.7)).all()  # corrected only where k̂ allows it


def test_readme_is_short_and_its_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_screen = "\n".join(readme.splitlines()[:40])
    for verb in ("Run an experiment", "Swap guides and read the comparison", "Inspect a posterior in ArviZ"):
        assert verb in first_screen
    targets = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert targets
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, missing


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    import importlib

    for plugin in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter"):
        importlib.import_module(plugin)  # in the test extra: a missing plugin fails the test, never skips it
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    cli = (site / "reference" / "cli.html").read_text()
    from pyro_lvm.experiments import STANDALONE, load_all
    from pyro_lvm.harness import EXPERIMENTS

    load_all()
    for name in [*EXPERIMENTS.names(), *STANDALONE]:
        assert f'id="{name}"' in cli, name
    for flag in ("--latent-dim", "--fix-model", "--guide", "--epochs", "--resume", "--inspect", "--sections"):
        assert f"<code>{flag}</code>" in cli, flag
    assert ":math:" not in cli and ":class:" not in cli
    api = "".join(p.read_text() for p in (site / "reference" / "api").glob("*.html"))
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from hooks import api_identifier
    finally:
        sys.path.remove(str(REPO / "docs"))
    for name in pyro_lvm.__all__:
        assert f'id="{api_identifier(name)}"' in api, name
    assert 'id="pyro_lvm.evaluate.PsisAccumulator"' not in api  # the function is documented, not its module
    for tutorial in ("compare_families", "inspect_and_trust", "own_model"):
        page = (site / "tutorials" / f"{tutorial}.html").read_text()
        assert "data:image/png;base64" in page, tutorial  # the figures render

"""The public API (``import pyro_lvm``): the README's notebook example, save/load/sample/posterior for every
model x guide pair, and a library that changes no global state, installed under one name."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_lvm
from pyro_lvm import GUIDES, MODELS, build_guide, build_model, evaluate, fit, load, save
from pyro_lvm.guides import GuideConfig
from pyro_lvm.runtime import seeded

REPO = Path(__file__).resolve().parents[1]
SMALL = GuideConfig(hidden=(8,), flow_hidden=(8,))
PAIRS = [(m, g) for m in MODELS.names() for g in GUIDES.names()
         if GUIDES[g].requires(MODELS[m].example()[0].traits) is None]


def _run(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_readme_notebook_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### 1. Run an experiment"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    scores = namespace["scores"]
    assert scores["iwae"] >= scores["elbo"] - 1e-4 and scores["exact_log_likelihood"] >= scores["iwae"] - 0.05
    assert namespace["z"].shape == (len(namespace["ds"].test), 2)
    assert (tmp_path / "fa.pt").is_file() and isinstance(namespace["fitted"].model, pyro_lvm.LatentModel)


def test_import_changes_no_global_setting(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import random, numpy as np, torch, pyro, matplotlib
        before = (pyro.settings.get("module_local_params"), torch.get_num_threads(), torch.get_default_dtype(),
                  torch.get_rng_state().sum().item(), np.random.get_state()[1].sum(), matplotlib.get_backend(),
                  len(pyro.get_param_store()))
        random.seed(5)
        r = random.getstate()
        import pyro_lvm, pyro_lvm.experiments, pyro_lvm.harness
        from pyro_lvm.report import plot_training_curves
        plot_training_curves({"a": [{"epoch": 1, "train_loss": 1.0}]}, "curves.png")
        after = (pyro.settings.get("module_local_params"), torch.get_num_threads(), torch.get_default_dtype(),
                 torch.get_rng_state().sum().item(), np.random.get_state()[1].sum(), matplotlib.get_backend(),
                 len(pyro.get_param_store()))
        assert random.getstate() == r, "python's RNG moved"
        assert before == after, (before, after)
        import matplotlib.pyplot  # the caller's backend choice is still open: nothing forced Agg
        print("ok", matplotlib.get_backend())
    """)
    out = _run(code, tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def test_one_installed_name_and_a_users_own_models_package_does_not_break_it(tmp_path: Path) -> None:
    for name in ("models", "guides", "experiments"):  # a user's project with folders of the same names
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user\\'s own package')\n")
    out = _run("import pyro_lvm.models, pyro_lvm.guides; import models", tmp_path)
    assert "the user's own package" in out.stderr  # `models` is theirs, not ours
    (tmp_path / "models" / "__init__.py").write_text("")
    out = _run("", tmp_path, "-m", "pyro_lvm.experiments.vae", "--help")
    assert out.returncode == 0 and "--latent-dim" in out.stdout, out.stderr
    out = _run("import importlib.util as u; print(u.find_spec('models').origin)", tmp_path)
    assert str(tmp_path) in out.stdout


def test_console_script_lists_experiments_models_guides_and_data_sets(capsys: pytest.CaptureFixture[str]) -> None:
    from pyro_lvm.experiments.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("factor_analysis", "gaussian_mixture", "vae", "quickstart", "planar:K", "exact", "binarized_mnist",
                 "breast_cancer", "--data FILE"):
        assert name in out, name
    assert main(["nope"]) == 2 and "unknown experiment 'nope'" in capsys.readouterr().err


def test_registering_twice_is_harmless_on_reload_and_a_clash_otherwise() -> None:
    import pyro_lvm.guides.flows as flows
    import pyro_lvm.models.vae as vae

    # a reload rebinds the modules' globals (VAE, the flow classes) to new classes in place: the originals are put
    # back afterwards, or every later test's models would see their own class's methods compare against impostors
    saved = {module: dict(vars(module)) for module in (vae, flows)}
    try:
        importlib.reload(vae)
        importlib.reload(flows)
        assert "vae" in MODELS and "planar" in GUIDES
        with pytest.raises(ValueError, match="'vae' is already registered"):
            MODELS.register("vae")(type("Impostor", (), {}))
    finally:
        for module, namespace in saved.items():
            vars(module).clear()
            vars(module).update(namespace)


@pytest.mark.parametrize("model_name,guide_name", PAIRS)
def test_save_load_round_trip_for_every_model_and_guide(tmp_path: Path, model_name: str, guide_name: str) -> None:
    with seeded(0):
        model, x = MODELS[model_name].example(seed=0)
        guide = build_guide(guide_name, model, SMALL)
    fit(model, guide, x, None, epochs=2, batch_size=None, lr=1e-2, seed=0, quiet=True)
    before = evaluate(model, guide, x, iwae_k=3, posterior_samples=2, seed=1)
    save(tmp_path / "fit.pt", model, guide, meta={"note": "test"})
    fitted = load(tmp_path / "fit.pt")
    after = evaluate(fitted.model, fitted.guide, x, iwae_k=3, posterior_samples=2, seed=1)
    assert after["elbo"] == pytest.approx(before["elbo"], rel=1e-6, abs=1e-6)
    assert after["iwae"] == pytest.approx(before["iwae"], rel=1e-6, abs=1e-6)
    assert fitted.meta["meta"] == {"note": "test"} and fitted.meta["guide_spec"] == guide_name
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file left behind


def test_load_refuses_what_is_not_a_saved_fit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved fit"):
        load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable pyro_lvm file"):
        load(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyro_lvm fitted-model file"):
        load(tmp_path / "other.pt")


@pytest.mark.parametrize("model_name", MODELS.names())
def test_every_model_samples_draws_and_means(model_name: str) -> None:
    model, x = MODELS[model_name].example(seed=0)
    guide = build_guide(next(g for g in GUIDES if GUIDES[g].requires(model.traits) is None), model, SMALL)
    draws = model.sample(500, guide=guide, seed=0)
    means = model.sample(500, guide=guide, seed=0, mean=True)
    assert draws.shape == means.shape == (500, model.data_dim)
    assert torch.equal(draws, model.sample(500, guide=guide, seed=0))  # a seed fixes the draws
    assert not torch.equal(draws, means) and torch.isfinite(draws).all()
    # draws scatter around the conditional means: the spread of x is larger than that of E[x|z]
    assert draws.var(0).sum() > means.var(0).sum()


def test_the_mixture_needs_its_guide_to_sample() -> None:
    model = build_model("gaussian_mixture", data_dim=2, num_components=2)
    with pytest.raises(ValueError, match="pass the fitted guide"):
        model.sample(3)


def test_posterior_and_encode_for_new_points() -> None:
    fa, x = MODELS["factor_analysis"].example(seed=0)
    exact = build_guide("exact", fa)
    q = exact.posterior(x.numpy().astype(np.float64))
    assert q.batch_shape == (len(x),) and q.event_shape == (fa.latent_dim,)
    torch.testing.assert_close(exact.encode(x), fa.exact_posterior(x).mean)
    flow = build_guide("iaf:2", fa, SMALL)
    assert flow.encode(x, seed=0).shape == (len(x), fa.latent_dim)
    gmm, xg = MODELS["gaussian_mixture"].example(seed=0)
    resp = build_guide("map", gmm).encode(xg)
    torch.testing.assert_close(resp.sum(-1), torch.ones(len(xg), dtype=resp.dtype))
    with pytest.raises(ValueError, match="expected 6 features"):
        exact.posterior(np.zeros((2, 3)))


def test_constructor_arguments_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match=r"latent_dim: must be <= data_dim \(3\), got 5"):
        build_model("factor_analysis", data_dim=3, latent_dim=5)
    with pytest.raises(ValueError, match="valid config fields: data_dim, latent_dim"):
        build_model("factor_analysis", data_dim=3, latent=1)
    with pytest.raises(ValueError, match="decoder: unknown value 'poisson'"):
        build_model("vae", data_dim=4, decoder="poisson")
    with pytest.raises(ValueError, match="architecture: 'conv' makes outputs of width"):
        build_model("vae", data_dim=10, architecture="conv")
    with pytest.raises(ValueError, match="hidden: layer sizes must be integers >= 1"):
        GuideConfig(hidden=(0,))
    model = build_model("factor_analysis", data_dim=3, latent_dim=1)
    with pytest.raises(ValueError, match="NaN"):
        model.init_from_data(np.array([[0.0, np.nan, 1.0]] * 4))


def test_a_seed_varies_the_models_initialisation() -> None:
    def start(seed: int) -> torch.Tensor:
        with seeded(seed):
            return build_model("factor_analysis", data_dim=6, latent_dim=2).W.detach().clone()

    assert torch.equal(start(0), start(0)) and not torch.equal(start(0), start(1))


def test_a_csv_of_a_builtin_set_gives_the_same_held_out_numbers(tmp_path: Path) -> None:
    """The issue's check: a CSV written from scikit-learn's data set and the built-in loader, on the same split,
    give the same results.json numbers through the real command line."""
    from sklearn.datasets import load_wine

    from pyro_lvm.experiments import factor_analysis as fa

    frame = load_wine(as_frame=True).data
    frame.to_csv(tmp_path / "wine.csv", index=False)
    common = ["--latent-dim", "2", "--guide", "exact,amortized", "--epochs", "20", "--iwae-k", "20", "--quiet"]
    assert fa.main(["--data", str(tmp_path / "wine.csv"), *common, "--output", str(tmp_path / "csv")]) == 0
    assert fa.main(["--dataset", "wine", *common, "--output", str(tmp_path / "builtin")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("csv", "builtin"))
    for ra, rb in zip(a["results"], b["results"], strict=True):
        for key in ("elbo", "iwae", "exact_log_likelihood"):
            assert ra["test"][key] == pytest.approx(rb["test"][key], rel=1e-9), key
    assert a["baselines"][0]["test"] == pytest.approx(b["baselines"][0]["test"], rel=1e-9)
    prov = a["data"]["provenance"]
    assert prov["source"].endswith("wine.csv") and len(prov["sha256"]) == 64 and prov["shape"] == [178, 13]
    row = a["results"][1]
    assert row["config"]["seed"] == 0 and row["config"]["train"]["epochs"] == 20
    assert Path(row["config"]["fitted"]).is_file()  # each guide's fit, loadable with pyro_lvm.load


def test_a_guide_belongs_to_its_model() -> None:
    """``fit``/``evaluate`` refuse a guide built for another model (an exact guide reads its own model's
    parameters: with another model it would train and leave a gap while called exact) or of another dtype."""
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    a, b = (build_model("factor_analysis", data_dim=4, latent_dim=2) for _ in range(2))
    guide = build_guide("exact", a)
    with pytest.raises(ValueError, match="^guide: 'exact' was built for another model"):
        fit(b, guide, x, epochs=1, seed=0)
    with pytest.raises(ValueError, match="^guide: 'exact' was built for another model"):
        evaluate(b, guide, x, iwae_k=2, seed=0)
    other = build_guide("amortized", a)
    other.to(torch.float64)
    with pytest.raises(ValueError, match=r"^guide: its parameters are torch.float64"):
        fit(a, other, x, epochs=1, seed=0)
    fit(a, build_guide("amortized", a), x, epochs=1, seed=0)  # its own guide trains

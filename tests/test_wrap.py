"""Your own Pyro model function through ``pyro_lvm.wrap_model`` (issue 23, first slice).

A contract over every usable guide family × model functions whose local sites differ in support (real vector,
positive scalar, simplex, unit interval) and number; the closed-form check that factor analysis written as a
function scores exactly as the built-in model; every wrap-time rule; save/load in a fresh process; and on held-out
counts the amortized guides beat an independent-Poisson baseline.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_lvm
from pyro_lvm.guides import usable_guides
from pyro_lvm.models import functions
from pyro_lvm.wrap import FunctionModel


def beta_share(x: torch.Tensor) -> None:
    """A unit-interval scalar per point: ρ_n ~ Beta(2, 2), x_n | ρ_n ~ N(ρ_n a, 1)."""
    a = pyro.param("a", lambda: torch.ones(x.shape[-1]))
    with pyro.plate("data", len(x)):
        rho = pyro.sample("rho", dist.Beta(2.0, 2.0))
        pyro.sample("x", dist.Normal(rho.unsqueeze(-1) * a, 1.0).to_event(1), obs=x)


FUNCTIONS = {"poisson_pca": functions.poisson_pca, "factor_analysis": functions.factor_analysis,
             "topic_weights": functions.topic_weights, "beta_share": beta_share}
SUPPORTS = {"poisson_pca": {"z": "real", "s": "positive"}, "factor_analysis": {"z": "real"},
            "topic_weights": {"theta": "simplex"}, "beta_share": {"rho": "unit"}}


def _data(name: str, n: int = 24, d: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "poisson_pca":
        return torch.poisson(3.0 * torch.rand(n, d, generator=g), generator=g)
    return torch.randn(n, d, generator=g)


# every family on the two-site model (real vector + positive scalar); every other support with a Gaussian and a flow
CASES = ([("poisson_pca", g) for g in usable_guides(FunctionModel.traits_for(None))]
         + [(f, g) for f in FUNCTIONS if f != "poisson_pca" for g in ("amortized", "iaf:2")])


@pytest.mark.parametrize("fn_name,guide_name", CASES)
def test_every_guide_family_fits_scores_and_inspects_every_function(fn_name: str, guide_name: str,
                                                                    tmp_path: Path) -> None:
    x = _data(fn_name)
    with pyro_lvm.runtime.seeded(0):
        model = pyro_lvm.wrap_model(FUNCTIONS[fn_name], data_dim=x.shape[1])
        guide = pyro_lvm.build_guide(guide_name, model)
    pyro_lvm.fit(model, guide, x, epochs=2, batch_size=8, seed=0)
    k = 64
    res = pyro_lvm.evaluate(model, guide, x, iwae_k=k, seed=0)
    assert math.isfinite(res["elbo"]) and math.isfinite(res["iwae"])
    # IWAE-K ≥ ELBO holds in expectation; per draw it may dip by Monte Carlo error, never by much
    assert res["iwae"] >= res["elbo"] - 0.05 * abs(res["elbo"])
    assert res["per_point"]["pareto_k"].shape == (x.shape[0],)
    idata = pyro_lvm.to_inference_data(model, guide, x, num_samples=25, points=[0, 1, 2], seed=0)
    for site, support in SUPPORTS[fn_name].items():
        v = torch.as_tensor(idata.posterior[site].values)
        ok = {"real": torch.isfinite(v), "positive": v > 0, "unit": (v > 0) & (v < 1),
              "simplex": (v >= 0) & ((v.sum(-1, keepdim=True) - 1).abs() < 1e-4)}[support]
        assert bool(ok.all()), site
    path = pyro_lvm.save(tmp_path / "fit.pt", model, guide)
    loaded = pyro_lvm.load(path)
    again = pyro_lvm.evaluate(loaded.model, loaded.guide, x, iwae_k=k, seed=0)
    assert again["elbo"] == pytest.approx(res["elbo"], rel=1e-6)


def test_factor_analysis_as_a_function_scores_as_the_built_in_model(float64: None) -> None:
    """The same W, μ, Ψ and the same guide weights: per-point ELBO, IWAE-K and KL agree to float64 rounding, and
    the evaluator splits log p(x|z) from log p(z) for the function's sites exactly as for the built-in model."""
    g = torch.Generator().manual_seed(0)
    W, mu = torch.randn(6, 2, generator=g), torch.randn(6, generator=g)
    x = mu + torch.randn(40, 2, generator=g) @ W.T + 0.5 * torch.randn(40, 6, generator=g)
    builtin = pyro_lvm.build_model("factor_analysis", data_dim=6, latent_dim=2)
    builtin.set_parameters(W, mu, torch.full((6,), 0.25))
    wrapped = pyro_lvm.wrap_model(functions.factor_analysis, data_dim=6)
    wrapped.set_parameters(W=W.T, mu=mu, psi=torch.full((6,), 0.25))
    for spec in ("amortized", "iaf:2"):
        gb, gw = pyro_lvm.build_guide(spec, builtin), pyro_lvm.build_guide(spec, wrapped)
        gb.load_state_dict({k.replace("encoder.net.", "encoder."): v for k, v in gw.state_dict().items()})
        rb = pyro_lvm.evaluate(builtin, gb, x, iwae_k=100, seed=1)
        rw = pyro_lvm.evaluate(wrapped, gw, x, iwae_k=100, seed=1)
        for key in ("elbo", "iwae", "reconstruction", "kl"):
            assert rw[key] == pytest.approx(rb[key], rel=1e-12, abs=1e-10), (spec, key)


def test_the_exact_posterior_as_guide_closes_the_gap_through_the_generic_path(float64: None) -> None:
    """With an amortized full-covariance guide set to the exact Gaussian posterior of factor analysis (affine in
    x), the wrapped model's ELBO equals the built-in model's exact log p(x) for every point."""
    g = torch.Generator().manual_seed(1)
    W, mu, psi = torch.randn(4, 2, generator=g), torch.randn(4, generator=g), torch.full((4,), 0.5)
    x = mu + torch.randn(30, 2, generator=g) @ W.T + psi.sqrt() * torch.randn(30, 4, generator=g)
    builtin = pyro_lvm.build_model("factor_analysis", data_dim=4, latent_dim=2)
    builtin.set_parameters(W, mu, psi)
    wrapped = pyro_lvm.wrap_model(functions.factor_analysis, data_dim=4)
    wrapped.set_parameters(W=W.T, mu=mu, psi=psi)
    guide = pyro_lvm.build_guide("exact", builtin)
    exact = builtin.log_likelihood(x)
    post = guide.distribution(x)  # p(z|x) under the built-in model
    # score the wrapped model's log joint at posterior draws: log p(x, z) − log p(z|x) = log p(x) for every draw
    z = post.sample((7,))
    from pyro import poutine
    with pyro_lvm.local_params(wrapped):
        tr = poutine.trace(poutine.condition(wrapped, {"_u": z})).get_trace(x)
        tr.compute_log_prob()
    joint = sum(s["log_prob"] for name, s in tr.nodes.items()
                if s["type"] == "sample" and name != "data" and "log_prob" in s)
    torch.testing.assert_close(joint - post.log_prob(z), exact.expand(7, -1), rtol=0, atol=1e-9)


def _no_plate(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([len(x), 2]).to_event(2))
    pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).expand([len(x), x.shape[-1]]).to_event(2), obs=x)


def _plate_at_dim_2(x):
    with pyro.plate("data", len(x), dim=-2):
        pyro.sample("z", dist.Normal(torch.zeros(len(x), 1), 1.0))
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([len(x), x.shape[-1]]), obs=x)


def _not_per_point(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([2, len(x)]))
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)


def _discrete(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).expand([len(x), x.shape[-1]]).to_event(1), obs=x)


def _global_latent(x):
    tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), tau).expand([len(x), x.shape[-1]]).to_event(1), obs=x)


def _no_latent(x):
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)


@pytest.mark.parametrize("fn,needle", [
    (_no_plate, "site 'z' is outside pyro.plate('data'"),
    (_plate_at_dim_2, "at dim -2"),
    (_not_per_point, "site 'z' has batch shape (2, 3)"),
    (_discrete, "local site 'c' is discrete"),
    (_global_latent, "latent site 'tau' is outside"),
    (_no_latent, "no local latent site"),
])
def test_each_rule_is_one_error_naming_the_site_at_wrap_time(fn: object, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        pyro_lvm.wrap_model(fn, data_dim=3)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_bare_function_is_refused_with_the_fix() -> None:
    x = _data("poisson_pca")
    model = pyro_lvm.wrap_model(functions.poisson_pca, data_dim=5)
    guide = pyro_lvm.build_guide("amortized", model)
    for call in (lambda: pyro_lvm.build_guide("amortized", functions.poisson_pca),
                 lambda: pyro_lvm.fit(functions.poisson_pca, guide, x, epochs=1),
                 lambda: pyro_lvm.evaluate(functions.poisson_pca, guide, x)):
        with pytest.raises(ValueError, match=r"^model: poisson_pca is a plain Pyro model; wrap it first"):
            call()


def test_the_encoder_input_follows_the_likelihood_and_is_stored(tmp_path: Path) -> None:
    counts = pyro_lvm.wrap_model(functions.poisson_pca, data_dim=5)
    gauss = pyro_lvm.wrap_model(functions.factor_analysis, data_dim=5)
    assert counts.encoder_input_name == "log1p" and gauss.encoder_input_name == "identity"
    mine = pyro_lvm.wrap_model(functions.poisson_pca, data_dim=5, encoder_input="identity")
    assert mine.encoder_input_name == "identity"
    with pytest.raises(ValueError, match="encoder input"):
        pyro_lvm.wrap_model(functions.poisson_pca, data_dim=5, encoder_input="sqrt-ish")
    guide = pyro_lvm.build_guide("amortized", counts)
    x = torch.full((2, 5), 1305.0)
    h_seen = guide.encoder(x)
    h_log = guide.encoder.net(torch.log1p(x))
    torch.testing.assert_close(h_seen, h_log)
    loaded = pyro_lvm.load(pyro_lvm.save(tmp_path / "c.pt", counts, guide))
    assert loaded.model.encoder_input_name == "log1p"


def test_a_function_in_a_file_loads_in_a_fresh_process_by_its_import_path(tmp_path: Path) -> None:
    src = tmp_path / "mymodels.py"
    src.write_text(textwrap.dedent('''
        import pyro, pyro.distributions as dist, torch

        def scaled(x):
            w = pyro.param("w", lambda: torch.ones(x.shape[-1]))
            with pyro.plate("data", len(x)):
                s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
                pyro.sample("x", dist.Normal(s.unsqueeze(-1) * w, 1.0).to_event(1), obs=x)
    '''))
    script = textwrap.dedent(f'''
        import sys, torch, pyro_lvm
        from pyro_lvm.wrap import import_target
        fn = import_target({str(src) + ":scaled"!r})
        m = pyro_lvm.wrap_model(fn, data_dim=3, target={str(src) + ":scaled"!r})
        g = pyro_lvm.build_guide("amortized", m)
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
        pyro_lvm.fit(m, g, x, epochs=2, seed=0)
        pyro_lvm.save({str(tmp_path / "f.pt")!r}, m, g)
        print(pyro_lvm.evaluate(m, g, x, iwae_k=8, seed=0)["elbo"])
    ''')
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    load = textwrap.dedent(f'''
        import torch, pyro_lvm
        f = pyro_lvm.load({str(tmp_path / "f.pt")!r})
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
        print(pyro_lvm.evaluate(f.model, f.guide, x, iwae_k=8, seed=0)["elbo"])
    ''')
    second = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert float(second.stdout) == pytest.approx(float(first.stdout), rel=1e-6)
    src.unlink()  # the module is gone: load says what to import
    third = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=600)
    assert third.returncode != 0 and "make the module that defines it importable" in third.stderr


def test_held_out_counts_beat_an_independent_poisson_baseline() -> None:
    """Counts from a rank-2 Poisson model with per-point size factors; every point of the held-out split is scored
    in one pass. Both guides' held-out IWAE-K beat the independent-Poisson MLE fitted on the training split (which
    ignores the correlations the latents carry), and the flow's is at least the diagonal guide's up to Monte Carlo
    error."""
    g = torch.Generator().manual_seed(3)
    n, d = 400, 8
    W = 0.8 * torch.randn(2, d, generator=g)
    z = torch.randn(n, 2, generator=g)
    s = torch.exp(0.5 * torch.randn(n, 1, generator=g))
    x = torch.poisson(s * torch.exp(0.5 + z @ W), generator=g)
    train, test = x[:300], x[300:]
    rate = train.mean(0)
    baseline = float(dist.Poisson(rate).log_prob(test).sum(-1).mean())
    scores = {}
    for spec in ("amortized", "iaf:2"):
        with pyro_lvm.runtime.seeded(0):
            model = pyro_lvm.wrap_model(functions.poisson_pca, data_dim=d)
            guide = pyro_lvm.build_guide(spec, model)
        pyro_lvm.fit(model, guide, train, epochs=150, batch_size=100, lr=1e-2, seed=0)
        res = pyro_lvm.evaluate(model, guide, test, iwae_k=200, seed=0)
        assert res["num_points"] == len(test)
        scores[spec] = res["iwae"]
    assert scores["amortized"] > baseline + 1.0 and scores["iaf:2"] > baseline + 1.0, (scores, baseline)
    assert scores["iaf:2"] >= scores["amortized"] - 0.5, scores


def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own model"):]
    code = __import__("re").search(r"```python\n(.*?)```", section, __import__("re").S).group(1)
    code = code.replace("epochs=100", "epochs=3")  # the same calls, fewer passes
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    with pyro_lvm.runtime.seeded(0):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    idata = namespace["idata"]
    assert set(idata.posterior.data_vars) >= {"z", "s"} and bool((idata.posterior["s"] > 0).all())


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "pyro_lvm.experiments", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("body,needle", [
    ("""
def model(x):
    tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), tau).expand([len(x), x.shape[-1]]).to_event(1), obs=x)
""", "latent site 'tau' is outside"),
    ("""
def model(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).expand([len(x), x.shape[-1]]).to_event(1), obs=x)
""", "local site 'c' is discrete"),
    (None, "cannot import"),
])
def test_fit_command_refuses_a_broken_model_in_one_line(tmp_path: Path, body: str | None, needle: str) -> None:
    src = tmp_path / "mine.py"
    if body is not None:
        src.write_text("import pyro, pyro.distributions as dist, torch\n" + body)
    out = tmp_path / "out"
    res = _cli("fit", "--model", f"{src}:model", "--dataset", "wine", "--epochs", "1", "--iwae-k", "2",
               "--output", str(out), cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert needle in lines[0] and "Traceback" not in res.stdout + res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_fit_command_runs_a_count_model_end_to_end(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    import numpy as np

    np.save(tmp_path / "counts.npy", torch.poisson(3.0 * torch.rand(90, 6, generator=g), generator=g).numpy())
    out = tmp_path / "R"
    res = _cli("fit", "--model", "pyro_lvm.models.functions:poisson_pca", "--data", str(tmp_path / "counts.npy"),
               "--no-standardize", "--guide", "amortized,iaf:2", "--epochs", "2", "--iwae-k", "8", "--inspect",
               "--inspect-points", "4", "--inspect-samples", "25", "--output", str(out), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = __import__("json").loads((out / "results.json").read_text())
    rows = {r["guide"]: r for r in doc["results"]}
    assert set(rows) == {"amortized", "iaf:2"}
    for row in rows.values():
        assert row["test"]["iwae"] >= row["test"]["elbo"] - 1.0
        assert row["model"]["encoder_input"] == "log1p" and row["model"]["local_sites"] == ["z", "s"]
    assert (out / "amortized.nc").is_file()
    loaded = pyro_lvm.load(out / "checkpoints" / "amortized" / "fitted.pt")
    assert loaded.model.sites.keys() == {"z", "s"}

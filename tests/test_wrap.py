"""Your own Pyro model function through ``pyro_lvm.wrap_model`` (issue 23, first slice).

A contract over every usable guide family × model functions whose local sites differ in support (real vector,
positive scalar, simplex, unit interval) and number; the closed-form check that factor analysis written as a
function scores exactly as the built-in model; every wrap-time rule; save/load in a fresh process; and on held-out
counts the amortized guides beat an independent-Poisson baseline.
"""

from __future__ import annotations

import math
import subprocess
import textwrap
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from cli_runner import WarmCLI

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
             "topic_weights": functions.topic_weights, "beta_share": beta_share,
             "latent_clusters": functions.latent_clusters}  # the last with a discrete site, summed out
SUPPORTS = {"poisson_pca": {"z": "real", "s": "positive"}, "factor_analysis": {"z": "real"},
            "topic_weights": {"theta": "simplex"}, "beta_share": {"rho": "unit"},
            "latent_clusters": {"z": "real", "c": "cluster"}}


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
              "simplex": (v >= 0) & ((v.sum(-1, keepdim=True) - 1).abs() < 1e-4),
              "cluster": (v >= 0) & (v < functions.CLUSTERS) & (v == v.round())}[support]
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


def _global_discrete(x):
    k = pyro.sample("k", dist.Poisson(2.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + k, 1.0).expand([len(x), x.shape[-1]]).to_event(1), obs=x)


def _global_without_prior(x):
    tau = pyro.sample("tau", dist.ImproperUniform(dist.constraints.positive, (), ()))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), tau).expand([len(x), x.shape[-1]]).to_event(1), obs=x)


def _global_follows_points(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([len(x)]).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal((z + w).unsqueeze(-1), 1.0).expand([len(x), x.shape[-1]]).to_event(1), obs=x)


def _observed_outside(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(0.0, 1.0).expand([len(x), x.shape[-1]]).to_event(2), obs=x)


def _no_latent(x):
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1), obs=x)


RULES = [
    (_no_plate, "no site is inside pyro.plate('data', len(x)) (sites: 'z', 'x')"),
    (_global_follows_points, "site 'w' is outside pyro.plate('data', len(x)) but its shape follows the points"),
    (_plate_at_dim_2, "at dim -2"),
    (_not_per_point, "site 'z' has batch shape (2, 3)"),
    (_discrete, "local site 'c' is discrete"),
    (_global_discrete, "global latent site 'k' is discrete"),
    (_global_without_prior, "global latent site 'tau' has no prior"),
    (_observed_outside, "observed site 'x' is outside pyro.plate('data'"),
    (_no_latent, "no local latent site"),
]


@pytest.mark.parametrize("fn,needle", RULES)
def test_each_rule_is_one_error_naming_the_site_at_wrap_time(fn: object, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        pyro_lvm.wrap_model(fn, data_dim=3)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_bare_function_is_wrapped_by_build_guide_and_found_again_by_fit_evaluate_and_save(tmp_path: Path) -> None:
    """``build_guide(spec, fn, data_dim=D)`` wraps the function into a model of the guide's own; ``fit``,
    ``evaluate``, ``to_inference_data`` and ``save`` given the function and that guide use that model: the same
    numbers, bit for bit, as the explicit ``wrap_model`` path under one seed. Two guides built from one function
    never share its parameters (a comparison of families would otherwise train one model twice)."""
    fn, x = functions.poisson_pca, _data("poisson_pca")
    torch.manual_seed(1)
    explicit = pyro_lvm.wrap_model(fn, data_dim=5)
    g_explicit = pyro_lvm.build_guide("amortized", explicit)
    pyro_lvm.fit(explicit, g_explicit, x, epochs=3, seed=0)
    torch.manual_seed(1)
    g = pyro_lvm.build_guide("amortized", fn, data_dim=5)
    other = pyro_lvm.build_guide("amortized", fn, data_dim=5)
    before = pyro_lvm.load(pyro_lvm.save(tmp_path / "other0.pt", fn, other)).model.state_dict()
    pyro_lvm.fit(fn, g, x, epochs=3, seed=0)
    ours, theirs = (pyro_lvm.evaluate(m, gg, x, iwae_k=8, seed=0) for m, gg in ((fn, g), (explicit, g_explicit)))
    assert ours["elbo"] == theirs["elbo"] and ours["iwae"] == theirs["iwae"]
    loaded = pyro_lvm.load(pyro_lvm.save(tmp_path / "g.pt", fn, g))
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    after = pyro_lvm.load(pyro_lvm.save(tmp_path / "other1.pt", fn, other)).model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the other guide's model did not train
    idata = pyro_lvm.to_inference_data(fn, g, x, num_samples=4, seed=0)
    assert (idata.posterior["s"] > 0).all()


def test_a_bare_function_without_its_guide_is_refused_with_the_fix() -> None:
    fn, x = functions.poisson_pca, _data("poisson_pca")
    with pytest.raises(ValueError, match=r"^data_dim: poisson_pca is a plain Pyro model function.*data_dim=D"):
        pyro_lvm.build_guide("amortized", fn)
    autoguide = pyro.infer.autoguide.AutoNormal(fn)  # not amortized: it cannot score a held-out point
    for call in (lambda: pyro_lvm.fit(fn, autoguide, x, epochs=1),
                 lambda: pyro_lvm.evaluate(fn, autoguide, x)):
        with pytest.raises(ValueError, match=r"^model: poisson_pca is a plain Pyro model function and this guide "
                                             r"\(\w+\) was not built for it by pyro_lvm.build_guide"):
            call()
    mine = pyro_lvm.build_guide("amortized", fn, data_dim=5)
    with pytest.raises(ValueError, match=r"^model: the guide was built for the function poisson_pca, not "
                                         r"factor_analysis"):
        pyro_lvm.evaluate(functions.factor_analysis, mine, _data("factor_analysis"))
    namespace: dict[str, object] = {}
    exec(textwrap.dedent(__import__("inspect").getsource(fn)), vars(functions) | namespace, namespace)  # noqa: S102
    with pytest.raises(ValueError, match=r"^model: the guide was built for another poisson_pca than this one \(the "
                                         r"function was defined again"):
        pyro_lvm.evaluate(namespace["poisson_pca"], mine, x)  # a notebook cell run twice
    import copy

    with pytest.raises(ValueError, match=r"^model: this guide was built by pyro_lvm.build_guide, but a copy"):
        pyro_lvm.evaluate(fn, copy.deepcopy(mine), x)


class _Scaled(pyro.nn.PyroModule):
    """A per-point positive scale s_n ~ LogNormal(0, 1), x_n | s_n ~ N(s_n w, I): a PyroModule model."""

    def __init__(self, data_dim: int = 3) -> None:
        super().__init__()
        self.w = pyro.nn.PyroParam(torch.ones(data_dim))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(s.unsqueeze(-1) * self.w, 1.0).to_event(1), obs=x)


def test_a_pyromodule_class_goes_in_as_a_function_does_and_an_instance_is_refused(tmp_path: Path) -> None:
    x = _data("scaled")
    guide = pyro_lvm.build_guide("amortized", _Scaled, data_dim=5)  # built afresh for this guide
    pyro_lvm.fit(_Scaled, guide, x, epochs=2, seed=0)
    assert pyro_lvm.evaluate(_Scaled, guide, x, iwae_k=4, seed=0)["iwae"] > -1e9
    fitted = pyro_lvm.load(pyro_lvm.save(tmp_path / "s.pt", _Scaled, guide))
    w = fitted.model.net.w  # the PyroParam trained as the model's own parameter (Pyro's global store untouched)
    assert w.shape == (5,) and not torch.equal(w.detach(), torch.ones(5))
    with pytest.raises(ValueError, match=r"^model: _Scaled is a PyroModule instance, whose weights every guide"):
        pyro_lvm.build_guide("amortized", _Scaled(5), data_dim=5)


def test_a_function_load_could_not_import_is_refused_by_save_and_main_is_explained(tmp_path: Path) -> None:
    def nested(x: torch.Tensor) -> None:  # defined inside this test: <locals> in its qualified name
        functions.factor_analysis(x)

    guide = pyro_lvm.build_guide("amortized", nested, data_dim=5)
    with pytest.raises(ValueError, match=r"^model: its function .*<locals>.* is a lambda or defined inside"):
        pyro_lvm.save(tmp_path / "n.pt", nested, guide)
    assert not (tmp_path / "n.pt").exists()
    with pytest.raises(ValueError, match=r"^fn: .* has no import path"):
        pyro_lvm.wrap_model(__import__("functools").partial(functions.factor_analysis), data_dim=5)
    from pyro_lvm.wrap import import_target

    with pytest.raises(ValueError, match=r"define my_model in the one that loads it too"):
        import_target("__main__:my_model")  # a fit saved from a script, loaded where the script did not run


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


def _script(warm_cli: WarmCLI, tmp_path: Path, name: str, code: str) -> subprocess.CompletedProcess:
    """``python tmp_path/name.py`` holding ``code``: a process of its own, forked from the session's warm
    interpreter (imports made, nothing run: no function, model or fit of this test is in it)."""
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    return warm_cli.run("", [], tmp_path, script=path)


def test_a_function_in_a_file_loads_in_a_fresh_process_by_its_import_path(tmp_path: Path, warm_cli: WarmCLI) -> None:
    src = tmp_path / "mymodels.py"
    src.write_text(textwrap.dedent('''
        import pyro, pyro.distributions as dist, torch

        def scaled(x):
            w = pyro.param("w", lambda: torch.ones(x.shape[-1]))
            with pyro.plate("data", len(x)):
                s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
                pyro.sample("x", dist.Normal(s.unsqueeze(-1) * w, 1.0).to_event(1), obs=x)
    '''))
    # the user's file, and the shipped example functions of every kind of site: positive and real, simplex, a
    # summed-out discrete site, global latents (a LOCAL+GLOBAL pair)
    cases = [(str(src) + ":scaled", "amortized", "gauss"),
             ("pyro_lvm.models.functions:poisson_pca", "iaf:2", "counts"),
             ("pyro_lvm.models.functions:topic_weights", "amortized", "gauss"),
             ("pyro_lvm.models.functions:latent_clusters", "amortized", "gauss"),
             ("pyro_lvm.models.functions:bayesian_pca", "amortized+meanfield", "gauss")]
    data = ("g = torch.Generator().manual_seed(0); X = {'gauss': torch.randn(16, 3, generator=g), "
            "'counts': torch.poisson(3 * torch.rand(16, 3, generator=g), generator=g)}")
    script = textwrap.dedent(f'''
        import json, torch, pyro_lvm
        from pyro_lvm.wrap import import_target
        {data}
        out = []
        for i, (target, spec, kind) in enumerate({cases!r}):
            m = pyro_lvm.wrap_model(import_target(target), data_dim=3, target=target)
            g = pyro_lvm.build_guide(spec, m)
            pyro_lvm.fit(m, g, X[kind], epochs=2, seed=0)
            pyro_lvm.save({str(tmp_path)!r} + f"/f{{i}}.pt", m, g)
            out.append(pyro_lvm.evaluate(m, g, X[kind], iwae_k=8, seed=0)["elbo"])
        print(json.dumps(out))
    ''')
    first = _script(warm_cli, tmp_path, "fit_and_save", script)
    assert first.returncode == 0, first.stderr
    load = textwrap.dedent(f'''
        import json, torch, pyro_lvm
        {data}
        out = []
        for i, (target, spec, kind) in enumerate({cases!r}):
            f = pyro_lvm.load({str(tmp_path)!r} + f"/f{{i}}.pt")
            out.append(pyro_lvm.evaluate(f.model, f.guide, X[kind], iwae_k=8, seed=0)["elbo"])
        print(json.dumps(out))
    ''')
    second = _script(warm_cli, tmp_path, "load", load)
    assert second.returncode == 0, second.stderr
    import json

    assert json.loads(second.stdout) == pytest.approx(json.loads(first.stdout), rel=1e-6)
    src.unlink()  # the module is gone: load says what to import
    third = _script(warm_cli, tmp_path, "load_again", load)
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
    """``pyro-lvm ARGS`` in ``cwd``, through the same ``main`` in this process (the tests that need a process of
    their own, e.g. a refusal's exit status and stderr, fork one from the warm interpreter instead)."""
    import contextlib
    import io
    import os

    from pyro_lvm.experiments.__main__ import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.random.fork_rng(devices=[]):
            code = main(list(args))
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("body,needle", [
    ("""
def model(x):
    tau = pyro.sample("tau", dist.Gamma(1.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), tau).expand([len(x), x.shape[-1]]).to_event(1), obs=x)
""", "global latent sites (tau); name a family for each, LOCAL+GLOBAL, e.g. amortized+meanfield"),
    ("""
def model(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).expand([len(x), x.shape[-1]]).to_event(1), obs=x)
""", "local site 'c' is discrete"),
    (None, "cannot import"),
])
def test_fit_command_refuses_a_broken_model_in_one_line(tmp_path: Path, warm_cli: WarmCLI, body: str | None,
                                                       needle: str) -> None:
    src = tmp_path / "mine.py"
    if body is not None:
        src.write_text("import pyro, pyro.distributions as dist, torch\n" + body)
    out = tmp_path / "out"
    res = warm_cli.run("pyro_lvm.experiments", ["fit", "--model", f"{src}:model", "--dataset", "wine", "--epochs",
                                                "1", "--iwae-k", "2", "--output", str(out)], tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert needle in lines[0] and "Traceback" not in res.stdout + res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_each_rule_through_the_real_command_line_is_one_error_line_and_nothing_written(
        tmp_path: Path, warm_cli: WarmCLI) -> None:
    """Every wrap-time rule of :data:`RULES`, the function given to ``python -m pyro_lvm.experiments fit --model
    FILE:NAME`` (a process of its own, forked from the session's warm interpreter): exit 2, exactly one
    ``error:`` line naming the site and the rule, no traceback, and the output directory left empty."""
    import inspect as _inspect

    src = tmp_path / "broken.py"
    src.write_text("import pyro, pyro.distributions as dist, torch\n\n\n"
                   + "\n\n".join(_inspect.getsource(fn) for fn, _ in RULES))
    pending = [(fn.__name__, needle, tmp_path / fn.__name__,
                warm_cli.submit("pyro_lvm.experiments", ["fit", "--model", f"{src}:{fn.__name__}", "--dataset",
                                                         "wine", "--epochs", "1", "--iwae-k", "2", "--output",
                                                         str(tmp_path / fn.__name__)], tmp_path))
               for fn, needle in RULES]
    for name, needle, out, job in pending:
        res = job.result()
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (name, res.stderr)
        needle = needle.split(" has batch shape")[0] if "batch shape" in needle else needle  # N is the data's
        assert needle in lines[0] and "Traceback" not in res.stdout + res.stderr, (name, lines[0])
        assert not out.exists() or not any(out.iterdir()), name


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
    import arviz as az

    nc = az.from_netcdf(out / "amortized.nc")  # each site under its own name, its event dim named after it
    assert nc.posterior["z"].dims == ("chain", "draw", "point", "z_dim_0") and nc.posterior["s"].dims[-1] == "point"
    # the built-in experiments' --from-checkpoints and --resume, for a user's function: the same held-out numbers
    flags = ["fit", "--model", "pyro_lvm.models.functions:poisson_pca", "--data", str(tmp_path / "counts.npy"),
             "--no-standardize", "--guide", "amortized,iaf:2", "--epochs", "2", "--iwae-k", "8", "--quiet"]
    scored = tmp_path / "S"
    res = _cli(*flags, "--from-checkpoints", str(out), "--output", str(scored), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    again = {r["guide"]: r for r in __import__("json").loads((scored / "results.json").read_text())["results"]}
    assert {k: again[k]["test"] for k in rows} == {k: rows[k]["test"] for k in rows}
    res = _cli(*flags, "--inspect", "--inspect-points", "4", "--inspect-samples", "25", "--resume", str(out),
               "--output", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    resumed = {r["guide"]: r for r in __import__("json").loads((out / "results.json").read_text())["results"]}
    assert {k: resumed[k]["test"] for k in rows} == {k: rows[k]["test"] for k in rows}
    # kept, not retrained: a second fit would have taken another wall-clock time
    assert {k: resumed[k]["train_seconds"] for k in rows} == {k: rows[k]["train_seconds"] for k in rows}


# ---------------------------------------------------------------------------------------------- global latents
GLOBAL_FUNCTIONS = {"shifted_normal": functions.shifted_normal, "bayesian_pca": functions.bayesian_pca}
GLOBAL_SUPPORTS = {"shifted_normal": {"z": "real", "tau": "real"},
                   "bayesian_pca": {"z": "real", "W": "real", "sigma": "positive"}}
GLOBAL_FAMILIES = ("map", "meanfield", "fullrank", "lowrank:2", "auto-iaf:2")
# every global family beside a Gaussian local guide on the model with plated globals; two local families each way
GLOBAL_CASES = ([("bayesian_pca", f"amortized+{g}") for g in GLOBAL_FAMILIES]
                + [("shifted_normal", "iaf:2+meanfield"), ("shifted_normal", "amortized-fullcov+map")])


@pytest.mark.parametrize("fn_name,spec", GLOBAL_CASES)
def test_every_global_family_pairs_with_a_local_one(fn_name: str, spec: str, tmp_path: Path) -> None:
    """A function with global latent sites: a LOCAL+GLOBAL pair fits, scores (IWAE-K ≥ ELBO within Monte Carlo error,
    k̂ per point), exports every site in its support (the globals as draws of q(θ)) and round-trips save/load."""
    x = _data(fn_name, d=3)
    with pyro_lvm.runtime.seeded(0):
        model = pyro_lvm.wrap_model(GLOBAL_FUNCTIONS[fn_name], data_dim=3)
        guide = pyro_lvm.build_guide(spec, model)
    assert model.global_sites == tuple(k for k in GLOBAL_SUPPORTS[fn_name] if k != "z")
    pyro_lvm.fit(model, guide, x, epochs=2, batch_size=8, seed=0)
    res = pyro_lvm.evaluate(model, guide, x, iwae_k=32, seed=0, global_draws=3)
    assert math.isfinite(res["elbo"]) and res["iwae"] >= res["elbo"] - 0.05 * abs(res["elbo"])
    assert res["per_point"]["pareto_k"].shape == (x.shape[0],)
    idata = pyro_lvm.to_inference_data(model, guide, x, num_samples=25, points=[0, 1], seed=0)
    for site, support in GLOBAL_SUPPORTS[fn_name].items():
        v = torch.as_tensor(idata.posterior[site].values)
        assert bool((torch.isfinite(v) if support == "real" else v > 0).all()), site
        if site != "z":  # a global: one value per draw, not per point
            assert "point" not in idata.posterior[site].dims
    loaded = pyro_lvm.load(pyro_lvm.save(tmp_path / "fit.pt", model, guide))
    again = pyro_lvm.evaluate(loaded.model, loaded.guide, x, iwae_k=32, seed=0, global_draws=3)
    assert again["elbo"] == pytest.approx(res["elbo"], rel=1e-6)
    assert loaded.guide.spec == spec


def test_held_out_bounds_of_a_global_model_target_log_p_x_given_theta(float64: None) -> None:
    """τ ~ N(0, 1), z_n ~ N(0, I), x_n ~ N(z_n + τ, I): given τ, p(z_n | x_n, τ) = N((x_n − τ)/2, I/2) and
    log p(x_n | τ) = Σ_d log N(x_nd; τ, 2). With q(θ) a point mass (``map``) and the exact conditional as the local
    guide, every log weight equals log p(x_n | τ̂): the per-point ELBO and IWAE-K are that number to rounding and k̂
    is −inf. A global prior counted once per point (the defect this replaces) would shift each by log N(τ̂; 0, 1)."""
    from pyro.nn import PyroModule

    from pyro_lvm.models.base import data_plate

    class ExactLocal(PyroModule):
        def __init__(self, tau: torch.Tensor) -> None:
            super().__init__()
            self.tau = tau

        def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
            with data_plate(x.shape[0], total_size, x.device):
                pyro.sample("_u", dist.Normal((x - self.tau) / 2, math.sqrt(0.5)).to_event(1))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64) * math.sqrt(2.0) + 0.5
    with pyro_lvm.runtime.seeded(0):
        model = pyro_lvm.wrap_model(functions.shifted_normal, data_dim=3).double()
        guide = pyro_lvm.build_guide("amortized+map", model).double()
    tau = guide.point_estimate(x)["tau"]
    guide.local = ExactLocal(tau)
    exact = torch.distributions.Normal(tau, math.sqrt(2.0)).log_prob(x).sum(-1)
    res = pyro_lvm.evaluate(model, guide, x, iwae_k=50, seed=0)
    for bound in ("elbo", "iwae"):
        torch.testing.assert_close(res["per_point"][bound], exact, rtol=0, atol=1e-9)
    assert bool((res["per_point"]["pareto_k"] == -math.inf).all())


def test_minibatches_scale_the_per_point_terms_not_the_global_prior(float64: None) -> None:
    """log p of a minibatch of B of N points: log p(τ) once + (N/B) Σ_batch [log p(z_n) + log p(x_n | z_n, τ)]."""
    x = torch.randn(6, 3, dtype=torch.float64)
    model = pyro_lvm.wrap_model(functions.shifted_normal, data_dim=3).double()
    u, tau = torch.randn(6, 3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    conditioned = pyro.poutine.condition(model, data={"_u": u, "tau": tau})
    with pyro_lvm.runtime.local_params(model):
        total = pyro.poutine.trace(conditioned).get_trace(x, total_size=60).log_prob_sum()
    prior = dist.Normal(0.0, 1.0).log_prob(tau)
    per_point = dist.Normal(0.0, 1.0).log_prob(u).sum() + dist.Normal(u + tau, 1.0).log_prob(x).sum()
    torch.testing.assert_close(total, prior + 10.0 * per_point)


def test_an_unconditioned_global_latent_is_never_scored_per_point() -> None:
    """The evaluator's per-point terms refuse a global latent drawn inside the particle plate (it would add log p(θ)
    to every point) rather than sum it N times."""
    from pyro_lvm.evaluate import importance_traces, trace_terms

    x = torch.randn(5, 3)
    model = pyro_lvm.wrap_model(functions.shifted_normal, data_dim=3)
    guide = pyro_lvm.build_guide("amortized+meanfield", model)
    with pyro_lvm.runtime.local_params(model, guide):
        guide_tr, model_tr = importance_traces(model, guide, x, 4)
    with pytest.raises(ValueError, match="'tau' is a global latent"):
        trace_terms(model, guide_tr, model_tr, (4, 5))


def test_fit_command_trains_guide_pairs_for_a_model_with_global_latents(tmp_path: Path) -> None:
    out = tmp_path / "R"
    res = _cli("fit", "--model", "pyro_lvm.models.functions:bayesian_pca", "--dataset", "iris", "--guide",
               "amortized+map,iaf:2+meanfield", "--epochs", "2", "--iwae-k", "8", "--output", str(out), "--quiet",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = __import__("json").loads((out / "results.json").read_text())
    rows = {r["guide"]: r for r in doc["results"]}
    assert set(rows) == {"amortized+map", "iaf:2+meanfield"}
    assert all(r["model"]["global_sites"] == ["W", "sigma"] and r["model"]["standardized"] for r in rows.values())
    loaded = pyro_lvm.load(out / "checkpoints" / "iaf_2+meanfield" / "fitted.pt")
    assert loaded.guide.spec == "iaf:2+meanfield" and loaded.model.global_sites == ("W", "sigma")


def test_a_two_layer_vae_as_a_pyro_module_fits_and_reloads_from_its_class(tmp_path: Path) -> None:
    """Two stochastic layers (z₂ → z₁ → x) with learned p(z₁|z₂): one amortized q over both sites; the module is
    stored by its class and rebuilt for the data's width, its weights from the file."""
    from pyro_lvm.models.functions import TwoLayerVAE

    x = (torch.rand(32, 20, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    with pyro_lvm.runtime.seeded(0):
        model = pyro_lvm.wrap_model(TwoLayerVAE(data_dim=20), data_dim=20)
        guide = pyro_lvm.build_guide("iaf:2", model)
    assert list(model.sites) == ["z2", "z1"] and model.latent_dim == 60
    pyro_lvm.fit(model, guide, x, epochs=2, batch_size=16, seed=0)
    res = pyro_lvm.evaluate(model, guide, x, iwae_k=16, seed=0)
    assert math.isfinite(res["elbo"]) and res["iwae"] >= res["elbo"] - 0.05 * abs(res["elbo"])
    loaded = pyro_lvm.load(pyro_lvm.save(tmp_path / "hvae.pt", model, guide))
    assert pyro_lvm.evaluate(loaded.model, loaded.guide, x, iwae_k=16, seed=0)["elbo"] == pytest.approx(res["elbo"])


def test_a_pyro_module_class_wraps_as_load_rebuilds_it_and_runs_from_the_command_line(tmp_path: Path) -> None:
    """``--model package.module:Class`` (and ``wrap_model(Class, ...)``) builds the module for the data's width, as
    ``load`` does; its Bernoulli likelihood keeps the 0/1 data raw; the encoder's sizes and the training protocol's
    warm-up, patience and learning-rate decay are flags."""
    import json

    import numpy as np

    from pyro_lvm.experiments.fit import _observed_is_discrete

    model = pyro_lvm.wrap_model(functions.TwoLayerVAE, data_dim=12)
    assert model.config.target == "pyro_lvm.models.functions:TwoLayerVAE" and model.net.decoder[-1].out_features == 12
    assert _observed_is_discrete("pyro_lvm.models.functions:TwoLayerVAE")
    x = (torch.rand(60, 12, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    np.save(tmp_path / "bits.npy", x.numpy())
    out = tmp_path / "R"
    res = _cli("fit", "--model", "pyro_lvm.models.functions:TwoLayerVAE", "--data", str(tmp_path / "bits.npy"),
               "--guide", "amortized", "--epochs", "3", "--warmup-epochs", "1", "--patience", "5",
               "--lr-final-factor", "0.3", "--eval-every", "1", "--hidden", "16,8", "--flow-hidden", "8",
               "--iwae-k", "4", "--output", str(out), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert row["model"]["standardized"] is False and row["config"]["guide"]["hidden"] == [16, 8]
    assert row["config"]["train"]["warmup_epochs"] == 1 and row["epochs_run"] == 3


def fa_with_total_size(x: torch.Tensor, total_size: int | None = None) -> None:
    """:func:`pyro_lvm.models.functions.factor_analysis` as Pyro's tutorials write a minibatched model: the data
    plate sized by a ``total_size`` argument (the library rescales minibatches itself and calls ``fn(x)``)."""
    d = x.shape[-1]
    W = pyro.param("W", lambda: 0.1 * torch.randn(functions.K, d))
    mu = pyro.param("mu", lambda: torch.zeros(d))
    psi = pyro.param("psi", lambda: torch.ones(d), constraint=dist.constraints.positive)
    with pyro.plate("data", total_size or len(x), subsample_size=len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([functions.K]).to_event(1))
        pyro.sample("x", dist.Normal(mu + z @ W, psi.sqrt()).to_event(1), obs=x)


def test_a_function_that_takes_total_size_still_works() -> None:
    """Minibatches of 8 from 24 points: the function with a ``total_size`` argument trains and scores exactly as
    the one without (the library's rescaling, not the function's, applies in both)."""
    x = _data("factor_analysis")
    results = []
    for fn in (functions.factor_analysis, fa_with_total_size):
        torch.manual_seed(3)
        model = pyro_lvm.wrap_model(fn, data_dim=5)
        guide = pyro_lvm.build_guide("amortized", model)
        pyro_lvm.fit(model, guide, x, epochs=3, batch_size=8, seed=0)
        results.append((pyro_lvm.evaluate(model, guide, x, iwae_k=8, seed=0), model.state_dict()))
    (a, sa), (b, sb) = results
    assert a["elbo"] == b["elbo"] and a["iwae"] == b["iwae"]
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())

"""The fast default path of ``fit``: the traced Trace_ELBO step, Adam's fused kernel, data checked once at the
boundary, the step without Lightning's wrappers, and the fallback to Pyro's step where tracing does not apply.

The default must train the same estimator as the plain path it replaces (Pyro's ``Trace_ELBO`` every step, Adam's
per-tensor loop): the same loss and gradients on a fixed draw, the same parameters after a few steps."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import binary_data

import pyro_lvm.train as train_module
from pyro_lvm import TrainConfig, build_guide, build_model, fit
from pyro_lvm.data import make_factor_analysis_data
from pyro_lvm.evaluate import EvalConfig
from pyro_lvm.guides import GuideConfig
from pyro_lvm.models import VAE, FactorAnalysis, FactorAnalysisConfig, VAEConfig
from pyro_lvm.objectives import TracedLoss, TraceUnsupported
from pyro_lvm.plan import SVIPlan, clip_grad_norm
from pyro_lvm.runtime import local_params, seeded
from pyro_lvm.train import ELBOS, OPTIMIZERS, AnnealLatents, FusedAdam

N = 48


def _vae(seed: int = 0) -> tuple[VAE, Any]:
    with seeded(seed):
        model = VAE(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,)))
        guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
    return model, guide


def _plan(model: VAE, guide: Any, n: int) -> SVIPlan:
    plan = SVIPlan(model, guide, ELBOS["trace"](max_plate_nesting=1), latent_sites={"z"}, total_size=n,
                   optimizer=OPTIMIZERS["adam"], clip_norm=100.0, val_config=EvalConfig())
    plan.set_trainable([p for p in plan.parameters() if p.requires_grad])
    return plan


def _loss_and_grads(plan: SVIPlan, x: torch.Tensor, traced: bool, seed: int) -> tuple[torch.Tensor, list]:
    params = [p for p in plan.parameters() if p.requires_grad]
    with seeded(seed):
        loss = plan.training_loss(x) if traced else plan(x)
    return loss.detach(), list(torch.autograd.grad(loss, params))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_traced_loss_and_gradients_equal_pyro_trace_elbo_on_a_fixed_draw(beta: float) -> None:
    x = binary_data(N, 12).double()
    model, guide = _vae()
    plan = _plan(model, guide, 10 * N)  # a minibatch of a larger data set: the plate scales it
    plan.beta = beta
    with local_params(model, guide), train_module._checked_data():
        plan(x[:2])  # builds nothing lazily here, but as fit does
        want_loss, want = _loss_and_grads(plan, x, traced=False, seed=3)
        plan.use_traced_step()
        for _ in range(2):  # the first call traces (and checks against Pyro), the second only replays
            loss, grads = _loss_and_grads(plan, x, traced=True, seed=3)
            assert plan.traced is not None and plan.traced.traces == 1
            assert loss.dtype == torch.float64
            assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
            for a, b in zip(grads, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        # the graph that holds backward too (what a one-process fit's step runs): the same loss and gradients,
        # for the same parameters in the same order, with autograd nowhere in the replay
        assert plan.traced.grad_params() == [p for p in plan.parameters() if p.requires_grad]
        for _ in range(2):
            with seeded(3):
                loss, grads = plan.traced.loss_and_grads(x, plan._beta())
            assert plan.traced.traces == 2 and not loss.requires_grad
            assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
            for a, b in zip(grads, want, strict=True):
                assert a is not None and not a.requires_grad
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert plan.step_kind == "traced"


def test_tracing_draws_what_pyro_draws_and_leaves_the_stream_where_pyro_does() -> None:
    x = binary_data(N, 12)
    model, guide = _vae()
    plan = _plan(model, guide, N)
    with local_params(model, guide), train_module._checked_data():
        with seeded(5):
            plan(x)
            after_eager = torch.rand(3)
        plan.use_traced_step()
        for _ in range(2):  # tracing (and its check), then a replay
            with seeded(5):
                plan.training_loss(x)
                assert torch.equal(torch.rand(3), after_eager)


def _fit_params(model: Any, guide: Any, x: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
    fr = fit(model, guide, x, x[:16], TrainConfig(**{"epochs": 3, "batch_size": 16, "quiet": True, "seed": 0,
                                                     "restore_best": False, **kw}))
    flat = torch.cat([p.detach().flatten() for p in [*model.parameters(), *guide.parameters()]])
    return flat, fr


@pytest.mark.usefixtures("float64")
def test_default_fit_trains_the_same_parameters_as_eager_trace_elbo_with_per_tensor_adam(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "TRACE_MIN_STEPS", 1)  # the default traces fits of any length here
    x = binary_data(N, 12).double()
    fast, fr_fast = _fit_params(*_vae(), x)
    slow, fr_slow = _fit_params(*_vae(), x, step="eager", optimizer="adam-loop")
    assert (fr_fast.step, fr_slow.step) == ("traced", "eager") and fr_fast.steps == fr_slow.steps == 9
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    for a, b in zip(fr_fast.history, fr_slow.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a["valid_elbo"] == pytest.approx(b["valid_elbo"], rel=1e-12)
    # the traced step alone (the same optimiser) gives the very same parameters: its gradients are Pyro's
    same, _ = _fit_params(*_vae(), x, step="traced", optimizer="adam-loop")
    assert torch.equal(same, slow)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guide_name", ["iaf:2"])
def test_traced_factor_analysis_steps_train_the_parameters_pyros_step_does(guide_name: str) -> None:
    # the factor model's graphs are the ones pyro_lvm.graphs shortens most (a standard normal prior's constants,
    # several vectorised particles, a flow): the simplified graph's gradients are still Pyro's, step after step
    # (tests/test_contract.py does the same for one particle over every kind of guide)
    x, _ = make_factor_analysis_data(40, 6, 2, seed=0)

    def run(step: str) -> tuple[torch.Tensor, Any]:
        with seeded(0):
            model = FactorAnalysis(FactorAnalysisConfig(6, 2))
            guide = build_guide(guide_name, model)
        return _fit_params(model, guide, x, step=step, optimizer="adam-loop", num_particles=4, batch_size=None)

    (traced, fr), (eager, _) = run("traced"), run("eager")
    assert fr.step == "traced" and fr.steps == 3
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-13)


@pytest.mark.usefixtures("float64")
def test_a_graph_with_a_data_dependent_shape_trains_traced_as_traced() -> None:
    # the Gaussian mixture's graph holds a shape known only from the data (make_fx's unbacked symbol): it is
    # replayed as traced, unshortened, and trains what Pyro's step trains
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 4, generator=g) + 3, torch.randn(20, 4, generator=g) - 3]).double()

    def run(step: str) -> tuple[torch.Tensor, Any]:
        with seeded(0):
            model = build_model("gaussian_mixture", data_dim=4)
            guide = build_guide("meanfield", model)  # its global q's graph holds the data-dependent shape
        return _fit_params(model, guide, x, step=step, batch_size=None)

    (traced, fr), (eager, _) = run("traced"), run("eager")
    assert fr.step == "traced" and not fr.step_note
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-13)


@pytest.mark.usefixtures("float64")
def test_auto_compiles_a_long_fit_and_trains_the_same_parameters_as_the_eager_step(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # the thresholds lowered so that a 9-step fit counts as long: auto compiles the traced graph (Inductor, about
    # 10 s here, once); its kernels round differently from the eager step's, float64 keeps that far below 1e-9
    monkeypatch.setattr(train_module, "TRACE_MIN_STEPS", 1)
    monkeypatch.setattr(train_module, "COMPILE_MIN_STEPS", 9)
    x = binary_data(N, 12).double()
    with caplog.at_level(logging.INFO, logger=train_module.STEP_LOG.name):
        fast, fr_fast = _fit_params(*_vae(), x)
    assert fr_fast.step == "compiled" and fr_fast.step_note == ""
    assert any("compiled" in r.getMessage() for r in caplog.records)
    slow, fr_slow = _fit_params(*_vae(), x, step="eager", optimizer="adam-loop")
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-11)
    for a, b in zip(fr_fast.history, fr_slow.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)


@pytest.mark.parametrize("how", ["fails", "disagrees"])
def test_a_compiler_that_fails_or_rounds_too_far_leaves_the_traced_graph_running_and_says_so(
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    def broken_compile(graph: Any, **kwargs: Any) -> Any:
        if how == "fails":
            def run(*args: Any) -> Any:
                raise RuntimeError("no C++ compiler")
        else:  # kernels whose loss is off by more than the check's tolerance
            def run(*args: Any) -> Any:
                out = graph(*args)
                return [out[0] * 1.01, *out[1:]]
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = binary_data(N, 12)
    _, fr = _fit_params(*_vae(), x, step="compiled")
    traced, fr_traced = _fit_params(*_vae(), x, step="traced")
    assert fr.step == "traced" and ("failed" if how == "fails" else "disagrees") in fr.step_note
    assert fr.history[-1]["train_loss"] == fr_traced.history[-1]["train_loss"]


def test_traced_fit_is_deterministic_and_warm_up_needs_one_trace_per_shape() -> None:
    x = binary_data(50, 12)  # 50 points in minibatches of 16: two shapes, 16 and 2
    runs = []
    for _ in range(2):
        model, guide = _vae()
        fr = fit(model, guide, x, x[:10], TrainConfig(epochs=4, warmup_epochs=3, batch_size=16, quiet=True, seed=1,
                                                      step="traced"))
        runs.append(torch.cat([p.detach().flatten() for p in [*model.parameters(), *guide.parameters()]]))
        assert fr.step == "traced" and [h["beta"] for h in fr.history] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert torch.equal(runs[0], runs[1])


def test_data_are_checked_once_at_the_boundary_not_per_minibatch(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyro_lvm.models.vae as vae_module

    # the class the VAE builds now (read from its module: another test reloads that module, which leaves a class
    # imported at collection time stale)
    decoder_class = vae_module.BernoulliDecoder
    calls: list[str] = []
    original = decoder_class.validate

    def counting(x: torch.Tensor, name: str) -> None:
        calls.append(name)
        original(x, name)

    monkeypatch.setattr(decoder_class, "validate", staticmethod(counting))
    x = binary_data(64, 12)
    model, guide = _vae()
    fit(model, guide, x, x[:16], TrainConfig(epochs=3, batch_size=8, quiet=True, seed=0, step="eager"))
    assert calls == ["training data", "validation data"]  # 24 steps and 3 validations: no per-call checks
    with local_params(model):
        model(x)  # outside fit, a plain Pyro loop still gets its check
    assert calls[-1] == "data"
    with pytest.raises(ValueError, match="binary 0/1"):  # and bad data are still refused, at the boundary
        fit(model, guide, x + 0.5, None, TrainConfig(epochs=1, quiet=True))


class _Branching(FactorAnalysis):
    """Factor analysis whose Python branches on a tensor's value: no graph can hold it."""

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        if bool(x.sum() > -1e30):
            super().forward(x, total_size)


class _Discrete(FactorAnalysis):
    """Factor analysis with an extra Bernoulli site, which Trace_ELBO scores by its score function."""

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        pyro.sample("coin", dist.Bernoulli(torch.tensor(0.5)))
        super().forward(x, total_size)


def _with_coin(guide: Any) -> Any:
    def run(x: torch.Tensor, total_size: int | None = None) -> None:
        pyro.sample("coin", dist.Bernoulli(torch.tensor(0.5)))
        guide(x, total_size)
    return run


@pytest.mark.parametrize("case", ["branching", "meanfield"])
def test_where_tracing_does_not_apply_the_fit_says_so_once_and_trains_eagerly(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    x, _ = make_factor_analysis_data(60, 5, 2, seed=0, dtype=torch.float32)
    model = (_Branching if case == "branching" else FactorAnalysis)(FactorAnalysisConfig(5, 2))
    model.init_from_data(x)
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    kw = {"step": "traced"} if case == "branching" else {"elbo": "meanfield", "step": "auto"}
    with caplog.at_level(logging.INFO, logger="pyro_lvm.train"):
        fr = fit(model, guide, x, None, TrainConfig(epochs=400, batch_size=None, quiet=True, seed=0, **kw))
    notes = [r.getMessage() for r in caplog.records if r.name == "pyro_lvm.train"]
    assert fr.step == "eager" and len(notes) == 1 and fr.step_note in notes[0]
    assert ("cannot be traced" if case == "branching" else "'meanfield' runs in Pyro") in notes[0]
    assert fr.steps == 400


@pytest.mark.parametrize("fields,elbo,objective,steps,expected", [
    ({}, "trace", "elbo", 1000, ("traced", "")),
    ({}, "trace", "elbo", train_module.COMPILE_MIN_STEPS, ("compiled", "")),
    ({}, "trace", "elbo", train_module.TRACE_MIN_STEPS - 1, ("eager", "")),  # too short to gain: no news
    ({"step": "eager"}, "trace", "elbo", 1000, ("eager", "")),
    ({"devices": 2}, "trace", "elbo", 1000, ("eager", "data-parallel training (DDP)")),
    ({"num_nodes": 2}, "trace", "elbo", 1000, ("eager", "data-parallel training (DDP)")),
    ({"precision": "bf16-mixed"}, "trace", "elbo", 1000, ("eager", "precision 'bf16-mixed' casts")),
    ({}, "meanfield", "elbo", 1000, ("eager", "elbo 'meanfield' runs in Pyro")),
    ({"objective": "iwae:5"}, "trace", "iwae", 1000, ("eager", "the objective 'iwae:5' has no traced step")),
])
def test_each_reason_the_fast_step_does_not_apply_is_named(fields: dict[str, Any], elbo: str, objective: str,
                                                            steps: int, expected: tuple[str, str]) -> None:
    """The default step's choice, case by case: the compiled and traced steps where they train the same estimator;
    eager otherwise, with the reason the fit logs once (data parallelism, a casting precision, another estimator
    or objective), and no note where eager is what was asked for or the fit is too short to gain."""
    kind, note = train_module._step_kind(TrainConfig(**fields), elbo, objective, steps, has_params=True)
    assert kind == expected[0] and (expected[1] in note if expected[1] else note == "")


def test_a_guide_site_that_is_not_reparameterised_is_refused_by_the_traced_loss() -> None:
    x, _ = make_factor_analysis_data(20, 5, 2, seed=0, dtype=torch.float32)
    model = _Discrete(FactorAnalysisConfig(5, 2))
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    plan = SVIPlan(model, _with_coin(guide), ELBOS["trace"](max_plate_nesting=1), latent_sites={"z"}, total_size=20,
                   optimizer=OPTIMIZERS["adam"], clip_norm=None, val_config=EvalConfig())
    plan.guide = guide  # the plan's parameters: the guide's module (the wrapper above holds no state)
    with local_params(model, guide):
        plan.use_traced_step()
        loss = plan.training_loss(x)  # falls back to Pyro's loss, which handles the score-function term
    assert plan.step_kind == "eager" and "not reparameterised" in plan.step_note and torch.isfinite(loss)


def test_traced_loss_refuses_python_that_reads_tensor_values() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    owner = torch.nn.Module()
    owner.w = w

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (w * x).sum() * (2.0 if float(x[0]) > 0 else 1.0)

    with pytest.raises(TraceUnsupported, match="cannot be traced"):
        TracedLoss(owner, loss)(torch.ones(3))


def test_joint_graph_leaves_none_where_the_loss_does_not_depend_on_a_parameter_and_skips_frozen_ones() -> None:
    owner = torch.nn.Module()
    owner.a, owner.unused = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.ones(2))
    owner.frozen = torch.nn.Parameter(torch.tensor(3.0), requires_grad=False)
    owner.register_buffer("shift", torch.tensor(0.5))

    def loss(x: torch.Tensor) -> torch.Tensor:  # d/da = 2 a x^2 frozen, as autograd has it
        return ((owner.a * x) ** 2).sum() * owner.frozen + owner.shift

    def reference(x: torch.Tensor) -> torch.Tensor:
        return loss(x)

    traced = TracedLoss(owner, loss, reference)
    x = torch.tensor([0.5, -1.0])
    for _ in range(2):  # traced and checked against the reference, then replayed
        value, grads = traced.loss_and_grads(x)
        assert traced.grad_params() == [owner.a, owner.unused]
        assert value.item() == pytest.approx(3.0 * (0.25 + 4.0) + 0.5)
        assert grads[1] is None
        torch.testing.assert_close(grads[0], 2 * owner.a.detach() * x ** 2 * 3.0)
    owner.a.data.mul_(2)  # the replay reads the parameters' current values
    torch.testing.assert_close(traced.loss_and_grads(x)[1][0], 2 * owner.a.detach() * x ** 2 * 3.0)


def test_explicit_traced_step_is_refused_where_it_cannot_apply() -> None:
    from pyro_lvm import ConfigError

    with pytest.raises(ConfigError, match="step"):
        TrainConfig(step="traced", elbo="meanfield")
    with pytest.raises(ConfigError, match="step"):
        TrainConfig(step="compiled", devices=2)
    with pytest.raises(ConfigError, match="step"):
        TrainConfig(step="nope")


def test_default_adam_is_the_fused_kernel_and_adam_loop_the_per_tensor_loop() -> None:
    p = [torch.nn.Parameter(torch.randn(3))]
    assert OPTIMIZERS["adam"](p, lr=1e-3).defaults["fused"] is True
    assert isinstance(OPTIMIZERS["adam"](p, lr=1e-3), FusedAdam)
    loop = OPTIMIZERS["adam-loop"](p, lr=1e-3).defaults
    assert loop["foreach"] is False and not loop["fused"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adams_short_step_updates_as_torchs_fused_adam_to_the_bit(dtype: torch.dtype) -> None:
    # a learning-rate schedule, weight decay, a parameter left without a gradient for a step, a fresh optimiser
    # from a state dict (as a resumed fit builds it) and an earlier state loaded into the running one: every step is
    # torch's Adam(fused=True)'s, to the last bit
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (5, 2)]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(8)]
    grads[3][1] = None

    def run(make: Any, reload_at: int | None = None) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.7)
        for i, step in enumerate(grads):
            if i == 2:
                early = copy.deepcopy(opt.state_dict())
            if i == 6:
                opt.load_state_dict(early)
            if i == reload_at:
                state = opt.state_dict()
                opt = make(params)
                opt.load_state_dict(state)
                sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.7, last_epoch=i - 1)
            for p, gr in zip(params, step, strict=True):
                p.grad = None if gr is None else gr.clone()
            opt.step()
            sched.step()
        return [p.detach() for p in params]

    want = run(lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01, fused=True))
    short = FusedAdam([torch.nn.Parameter(t) for t in init], lr=0.1)
    short.step()  # no gradients: nothing to do, no state, and no lists
    assert short._lists is None
    for got in (run(lambda ps: FusedAdam(ps, lr=0.1, weight_decay=0.01)),
                run(lambda ps: FusedAdam(ps, lr=0.1, weight_decay=0.01), reload_at=5)):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_clip_grad_norm_is_torchs_to_the_bit(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (5, 2)]
    grads = [torch.randn(s, generator=g) * scale for s in shapes]
    a = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    b = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for pa, pb, gr in zip(a, b, grads, strict=True):
        pa.grad, pb.grad = gr.clone(), gr.clone()
    torch.nn.utils.clip_grad_norm_(a, 1.0)
    clip_grad_norm(b, 1.0)
    assert all(torch.equal(pa.grad, pb.grad) for pa, pb in zip(a, b, strict=True))


def test_anneal_with_a_tensor_weight_scales_as_a_float_weight() -> None:
    anneal = AnnealLatents({"z"})
    for beta in (1.0, torch.tensor(1.0)):
        anneal.beta = beta
        msg = {"type": "sample", "name": "z", "is_observed": False, "scale": 4.0}
        anneal._process_message(msg)
        assert float(msg["scale"]) == 4.0


def test_a_traced_fit_resumed_from_its_checkpoint_equals_the_uninterrupted_one(tmp_path: Any) -> None:
    x = binary_data(50, 12)
    kw = {"batch_size": 16, "quiet": True, "seed": 2, "step": "traced", "restore_best": False}

    def params(model: Any, guide: Any) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in [*model.parameters(), *guide.parameters()]])

    straight = _vae()
    fit(*straight, x, x[:10], TrainConfig(epochs=4, **kw))
    stopped = _vae()
    fit(*stopped, x, x[:10], TrainConfig(epochs=2, output=str(tmp_path), **kw))
    resumed = _vae()
    fr = fit(*resumed, x, x[:10], TrainConfig(epochs=4, output=str(tmp_path), resume="last", **kw))
    assert fr.step == "traced" and len(fr.history) == 4
    assert torch.equal(params(*resumed), params(*straight))

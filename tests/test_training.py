"""The training layer (``pyro_lvm.train.fit``): divergence guards, early stopping, warm-up, the estimator
choice, and the promise that a fit changes no global state its caller did not ask it to."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pytest
import torch
from conftest import binary_data
from lightning.pytorch.callbacks import Callback

from pyro_lvm import ConfigError, TrainConfig, build_guide, build_model, fit
from pyro_lvm.data import make_factor_analysis_data
from pyro_lvm.evaluate import EvalConfig, evaluate
from pyro_lvm.guides import FLOWS, GuideConfig
from pyro_lvm.models import VAE, FactorAnalysis, FactorAnalysisConfig, GaussianMixture, GaussianMixtureConfig, VAEConfig
from pyro_lvm.runtime import seeded
from pyro_lvm.train import TrainingError, load_checkpoint


def _fa(seed: int = 0) -> tuple[FactorAnalysis, torch.Tensor]:
    x, _ = make_factor_analysis_data(120, 5, 2, seed=seed, dtype=torch.float32)
    with seeded(seed):
        model = FactorAnalysis(FactorAnalysisConfig(5, 2))
    model.init_from_data(x)
    return model, x


def _rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class _Exploding(FactorAnalysis):
    """Factor analysis that breaks from its ``after``-th call on: its log-density turns NaN
    (``how="loss"``) or its loading matrix does (``how="parameters"``, as a diverged step would leave it)."""

    def __init__(self, config: FactorAnalysisConfig, after: int, how: str) -> None:
        super().__init__(config)
        self.calls, self.after, self.how = 0, after, how

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        self.calls += 1
        if self.calls > self.after and self.how == "parameters":
            with torch.no_grad():
                self.W.fill_(float("nan"))
        super().forward(x, total_size)
        if self.calls > self.after and self.how == "loss":
            pyro.factor("poison", torch.tensor(float("nan")))


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("how,match", [
    ("loss", r"loss became nan at epoch 4, step 1 \(global step 7\)"),
    ("parameters", r"parameters became non-finite \(model.W\) before epoch 4, step 1 \(global step 7\)"),
])
def test_divergence_stops_training_naming_the_step_and_keeps_the_last_checkpoint(
        tmp_path: Path, how: str, match: str) -> None:
    x, _ = make_factor_analysis_data(40, 4, 1, seed=0)
    model = _Exploding(FactorAnalysisConfig(4, 1), after=7, how=how)  # 1 call builds parameters, 2 steps/epoch
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    with pyro.validation_enabled(how == "parameters"), pytest.raises(TrainingError, match=match) as err:
        fit(model, guide, x, None, TrainConfig(epochs=10, batch_size=20, quiet=True, output=str(tmp_path)))
    assert str(tmp_path / "last.ckpt") in str(err.value)
    fresh = FactorAnalysis(FactorAnalysisConfig(4, 1))
    ckpt = load_checkpoint(tmp_path / "last.ckpt", fresh, build_guide("amortized", fresh, GuideConfig(hidden=())))
    assert ckpt["pyro_lvm"]["history"][-1]["epoch"] == 3 and all(torch.isfinite(p).all() for p in fresh.parameters())


@pytest.mark.usefixtures("float64")
def test_early_stopping_restores_the_best_validation_state() -> None:
    x, _ = make_factor_analysis_data(200, 5, 2, seed=0)
    model = FactorAnalysis(FactorAnalysisConfig(5, 2))
    model.init_from_data(x)
    guide = build_guide("exact", model)
    r = fit(model, guide, x[:150], x[150:], TrainConfig(epochs=60, batch_size=None, lr=0.5, patience=5,
                                                        val_samples=1, quiet=True))
    best = max(h["valid_elbo"] for h in r.history)
    assert r.best_valid_elbo == best and r.history[r.best_epoch - 1]["valid_elbo"] == best
    pyro.set_rng_seed(0)
    after = evaluate(model, guide, x[150:], EvalConfig(iwae_k=1))["elbo"]  # exact guide: ELBO = log p(x)
    assert after == pytest.approx(best, abs=1e-8)




def test_kl_warmup_is_linear_and_early_stopping_waits_for_it() -> None:
    x = binary_data(40, 12)
    model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(8,)))
    guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
    r = fit(model, guide, x, x[:10], TrainConfig(epochs=6, batch_size=20, warmup_epochs=4, patience=1, quiet=True))
    assert [h["beta"] for h in r.history[:4]] == [0.25, 0.5, 0.75, 1.0]
    assert r.best_epoch >= 4


# every flow family; of the three Sylvester variants, which share one transform, only the orthogonal one
@pytest.mark.parametrize("spec", ["amortized", "amortized-fullcov"]
                         + [f"{name}:2" for name in FLOWS.names() if name not in ("sylvester-h", "sylvester-t")])
def test_jit_training_matches_trace_setup_and_leaves_no_global_state(spec: str) -> None:
    x = binary_data(40, 12)
    model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(8,)))
    guide = build_guide(spec, model, GuideConfig(hidden=(8,), flow_hidden=(8,)))
    before = [p.detach().clone() for p in guide.parameters()]
    store_before = dict(pyro.get_param_store().items())
    r = fit(model, guide, x, None, TrainConfig(epochs=3, batch_size=20, warmup_epochs=2, elbo="jit", quiet=True))
    assert all(math.isfinite(h["train_loss"]) for h in r.history)
    assert any(not torch.equal(b, p) for b, p in zip(before, guide.parameters(), strict=True))
    assert dict(pyro.get_param_store().items()).keys() == store_before.keys()  # the caller's store, untouched
    assert pyro.settings.get("module_local_params") is False  # Pyro's default, which the library never changes




# ------------------------------------------------------------------------------------------------
# seeds, scopes and global state


def test_a_seed_fixes_the_fit_and_leaves_the_callers_rng_alone() -> None:
    runs = []
    for _ in range(2):
        model, x = _fa()
        with seeded(1):  # the guide's initial weights come from the caller's RNG, like nn.Linear's
            guide = build_guide("amortized", model, GuideConfig(hidden=()))
        before = _rng_states()
        fit(model, guide, x, None, TrainConfig(epochs=3, batch_size=40, quiet=True, seed=7))
        assert _same_rng(before, _rng_states())  # seeded: the caller's RNG is restored
        runs.append([p.detach().clone() for p in (*model.parameters(), *guide.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_without_a_seed_fit_draws_from_the_callers_rng_and_never_reseeds_it() -> None:
    model, x = _fa()
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    torch.manual_seed(123)
    expected_next = torch.rand(1)  # what the caller's stream gives next if nothing reseeds it ...
    torch.manual_seed(123)
    fit(model, guide, x, None, TrainConfig(epochs=1, batch_size=None, quiet=True))
    # ... the fit consumed draws from that stream, so the caller does not see a reset stream
    assert not torch.equal(torch.rand(1), expected_next)


def test_the_model_default_estimator_is_used_and_a_wrong_one_is_refused() -> None:
    x = torch.cat([torch.randn(15, 2) - 3, torch.randn(15, 2) + 3])
    model = GaussianMixture(GaussianMixtureConfig(2, 2, assignments="enumerated"))
    model.init_from_data(x, seed=0)
    guide = build_guide("map", model)
    assert fit(model, guide, x, None, TrainConfig(epochs=1, batch_size=None, quiet=True)).elbo == "traceenum"
    with pytest.raises(ValueError, match=r"elbo: 'trace' cannot train this gaussian_mixture model .*usable: traceenum"):
        fit(model, guide, x, None, TrainConfig(epochs=1, quiet=True, elbo="trace"))
    amortized = GaussianMixture(GaussianMixtureConfig(2, 2, assignments="amortized"))
    amortized.init_from_data(x, seed=0)
    with pytest.raises(ValueError, match="usable: tracegraph, trace"):
        fit(amortized, build_guide("map", amortized), x, None, TrainConfig(epochs=1, quiet=True, elbo="meanfield"))


@pytest.mark.parametrize("local", [False, True])
def test_jit_fit_runs_in_its_own_param_store_scope(local: bool) -> None:
    """The caller's own Pyro parameters (global store) survive a JIT fit, and so does their setting."""
    x = binary_data(40, 12)
    model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(8,)))
    guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
    with pyro.settings.context(module_local_params=local), pyro.get_param_store().scope():
        mine = pyro.param("users_own_parameter", torch.tensor([1.0, 2.0]))
        fit(model, guide, x, None, TrainConfig(epochs=2, batch_size=20, elbo="jit", quiet=True))
        assert list(pyro.get_param_store().keys()) == ["users_own_parameter"]
        assert torch.equal(pyro.param("users_own_parameter").detach(), mine.detach())
        assert pyro.settings.get("module_local_params") is local


def test_threads_and_accelerator_apply_only_inside_the_fit() -> None:
    model, x = _fa()
    guide = build_guide("amortized", model, GuideConfig(hidden=()))
    before = torch.get_num_threads()
    fit(model, guide, x, None, TrainConfig(epochs=1, quiet=True, threads=1, accelerator="cpu"))
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="accelerator: unknown value 'tpu'; valid: cpu, gpu, cuda, mps, auto"):
        TrainConfig(accelerator="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            fit(model, guide, x, None, TrainConfig(epochs=1, quiet=True, accelerator="gpu"))


def test_float64_numpy_and_dataframes_train_a_float32_model() -> None:
    pd = pytest.importorskip("pandas")
    x64 = np.random.default_rng(0).normal(size=(60, 4))  # NumPy's default dtype
    model = build_model("factor_analysis", data_dim=4, latent_dim=1)
    model.init_from_data(x64)
    guide = build_guide("amortized", model)
    r = fit(model, guide, x64, pd.DataFrame(x64[:10], columns=list("abcd")), epochs=2, seed=0, quiet=True)
    assert model.W.dtype == torch.float32 and all(math.isfinite(h["valid_elbo"]) for h in r.history)


@pytest.mark.parametrize("field,value,match", [
    ("warmup_epochs", -5, "warmup_epochs: must be an integer >= 0, got -5"),
    ("lr_final_factor", 0.0, "lr_final_factor: must be a finite number > 0, got 0.0"),
    ("lr_final_factor", 2.0, r"lr_final_factor: must be in \(0, 1\]"),
    ("lr", float("inf"), "lr: must be a finite number > 0, got inf"),
    ("epochs", 0, "epochs: must be an integer >= 1, got 0"),
    ("batch_size", 0, "batch_size: must be an integer >= 1"),
    ("clip_norm", -1.0, "clip_norm: must be a finite number > 0"),
    ("elbo", "renyi", "elbo: unknown value 'renyi'"),
])
def test_train_config_refuses_bad_values_naming_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value})
    model, x = _fa()
    with pytest.raises(ValueError, match=match):  # the same check through fit's keyword overrides
        fit(model, build_guide("amortized", model), x, **{field: value})


class _InterruptAt(Callback):
    """Ctrl-C at the start of epoch ``epoch`` (1-based): the fit stops after ``epoch - 1`` whole epochs."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Any, plan: Any) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            raise KeyboardInterrupt


def _vae_fit(out: Path, hidden: tuple[int, ...] = (8,), **kw: Any) -> tuple[VAE, Any, Any]:
    x = binary_data(60, 12)
    with seeded(0):
        model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=hidden))
        guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
    cfg = TrainConfig(epochs=6, batch_size=16, warmup_epochs=2, patience=3, lr_final_factor=0.5, seed=1, quiet=True,
                      output=str(out))
    return model, guide, fit(model, guide, x, x[:20], cfg, **kw)


def test_a_fit_interrupted_and_resumed_equals_the_uninterrupted_fit(tmp_path: Path) -> None:
    model, guide, whole = _vae_fit(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _vae_fit(tmp_path / "cut", callbacks=[_InterruptAt(4)])
    saved = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert [h["epoch"] for h in saved["pyro_lvm"]["history"]] == [1, 2, 3]  # three whole epochs, then the stop
    model2, guide2, resumed = _vae_fit(tmp_path / "cut", resume=str(tmp_path / "cut" / "last.ckpt"))
    keys = ("epoch", "beta", "train_loss", "valid_elbo")
    assert [[h.get(k) for k in keys] for h in resumed.history] == [[h.get(k) for k in keys] for h in whole.history]
    assert (resumed.best_epoch, resumed.best_valid_elbo) == (whole.best_epoch, whole.best_valid_elbo)
    for a, b in zip([*model.state_dict().values(), *guide.state_dict().values()],
                    [*model2.state_dict().values(), *guide2.state_dict().values()], strict=True):
        assert torch.equal(a, b)  # same minibatches, same draws, same optimiser state: the same numbers


def test_resuming_a_different_model_says_what_differs(tmp_path: Path) -> None:
    _vae_fit(tmp_path)
    with pytest.raises(ValueError, match=r"resume: the checkpoint belongs to a different fit; model: .*\[8\]"):
        _vae_fit(tmp_path, hidden=(5,), resume=str(tmp_path / "last.ckpt"))
    with pytest.raises(ValueError, match="resume: no checkpoint at"):
        _vae_fit(tmp_path, resume=str(tmp_path / "nope.ckpt"))


def test_a_loss_that_explodes_without_a_nan_stops_training_naming_the_step(tmp_path: Path) -> None:
    # lr 1e4 sends this VAE's loss from ~8 nats per point to ~1e8 and beyond without ever producing a NaN
    x = binary_data(200, 12)
    with seeded(0):
        model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(8,)))
        guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
    with pytest.raises(TrainingError, match=r"loss diverged at epoch 1, step \d+ \(global step \d+\): .* against a "
                                            r"best of .*; lower --lr") as err:
        fit(model, guide, x, None, TrainConfig(epochs=5, batch_size=20, lr=1e4, seed=0, quiet=True,
                                               output=str(tmp_path)))
    assert "tensor(" not in str(err.value)
    # the same fit at a sane rate runs to the end: the rule does not fire on a healthy run
    with seeded(0):
        model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(8,)))
        guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
    r = fit(model, guide, x, None, TrainConfig(epochs=5, batch_size=20, lr=1e-2, seed=0, quiet=True))
    assert len(r.history) == 5


def test_a_mixture_checkpoint_loads_into_a_freshly_built_guide(tmp_path: Path) -> None:
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    with seeded(0):
        model = build_model("gaussian_mixture", data_dim=2, num_components=2)
        guide = build_guide("map", model)
    fit(model, guide, x, None, epochs=3, batch_size=None, output=str(tmp_path), quiet=True, seed=0, restore_best=False)
    fresh = build_model("gaussian_mixture", data_dim=2, num_components=2)
    fresh_guide = build_guide("map", fresh)  # never called: its autoguide parameters do not exist yet
    load_checkpoint(tmp_path / "last.ckpt", fresh, fresh_guide)
    for a, b in zip([*model.state_dict().values(), *guide.state_dict().values()],
                    [*fresh.state_dict().values(), *fresh_guide.state_dict().values()], strict=True):
        if isinstance(a, torch.Tensor):  # (the model's extra state, its initial values, is a dict)
            assert torch.equal(a, b)

"""Issue 22: settings that trained the wrong thing, crashed, or wrote half a run are refused before training.

KL warm-up longer than the fit, seeds outside [0, 2**32 - 1], absurd thread counts and layer sizes, two spellings of
one guide; the Gaussian mixture's posterior draws seeded by the run's seed; divergence messages that name what both
the API and the command line call the settings, and no deleted temporary checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cli_runner import WarmCLI
from test_faults import Case, _outcome, _plan, _run_forked, _write_inputs

from pyro_lvm.config import MAX_SEED, MAX_THREADS, ConfigError
from pyro_lvm.train import TrainConfig, default_warmup

HUGE = str(2**70)

CASES = [
    Case("vae-warmup-longer-than-epochs", "vae", ["--dataset", "digits", "--epochs", "5", "--warmup-epochs", "10"],
         ["--warmup-epochs", "raise --epochs", "lower --warmup-epochs"]),
    Case("vae-default-warmup-set-explicitly", "vae", ["--dataset", "digits", "--epochs", "5", "--warmup-epochs", "5"],
         ["--warmup-epochs"]),
    Case("vae-negative-seed", "vae", ["--dataset", "digits", "--seed", "-1"], ["--seed", "-1", "2**32 - 1"]),
    Case("gmm-negative-seed", "gaussian_mixture", ["--seed", "-1"], ["--seed", "-1"]),
    Case("gmm-seed-2-to-the-70", "gaussian_mixture", ["--seed", HUGE], ["--seed", HUGE, "2**32 - 1"]),
    Case("gmm-seed-plus-restarts-overflows", "gaussian_mixture", ["--seed", str(MAX_SEED)], ["--seed", "restart"]),
    Case("fa-100000-threads", "factor_analysis", ["--threads", "100000"], ["--threads", str(MAX_THREADS)]),
    Case("vae-hidden-100000000", "vae", ["--dataset", "digits", "--hidden", "100000000"], ["--hidden", "GB"]),
    Case("vae-duplicate-guide", "vae", ["--dataset", "digits", "--guide", "amortized,amortized"],
         ["--guide", "'amortized' is given twice"]),
    Case("vae-guide-k-with-a-sign", "vae", ["--dataset", "digits", "--guide", "amortized,planar:+2"],
         ["--guide", "planar:+2", "plain digits"]),
    Case("vae-guide-k-two-spellings", "vae", ["--dataset", "digits", "--guide", "planar:2,planar:02"],
         ["--guide", "'planar:2' is given twice", "'planar:02'"]),
    Case("fa-duplicate-guide", "factor_analysis", ["--guide", "exact,exact"], ["--guide", "given twice"]),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, warm_cli: WarmCLI) -> dict[str, Any]:
    """Every case through the real command line, forked from one warm interpreter (tests/cli_runner.py)."""
    root = tmp_path_factory.mktemp("trust")
    shared = root / "shared"
    shared.mkdir()
    _write_inputs(shared)
    plan = [_plan(case, shared, root / case.id) for case in CASES]
    return {step["id"]: _outcome(step, _run_forked(warm_cli, step)) for step in plan}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_line_before_anything_is_written(case: Case, outcomes: dict[str, Any]) -> None:
    got = outcomes[case.id]
    shown = f"exit {got.status}\n--- stderr\n{got.stderr[-3000:]}\n--- stdout\n{got.stdout[-1000:]}"
    assert got.status == 2 and "Traceback" not in got.stdout + got.stderr, shown
    lines = got.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    missing = [n for n in case.needles if n not in lines[0]]
    assert not missing, f"the error line lacks {missing}: {lines[0]}"
    assert not got.output.exists(), f"{got.output} was created"


# ---------------------------------------------------------------------------------------------- 1. warm-up
def test_train_config_refuses_a_warmup_as_long_as_the_fit() -> None:
    with pytest.raises(ConfigError, match=r"warmup_epochs: 10 epochs of KL warm-up .* 5 epochs") as err:
        TrainConfig(epochs=5, warmup_epochs=10)
    assert err.value.field == "warmup_epochs"
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(epochs=5, warmup_epochs=5)
    TrainConfig(epochs=5, warmup_epochs=4)
    TrainConfig(epochs=1, warmup_epochs=0)
    assert [default_warmup(10, e) for e in (1, 2, 5, 10, 11, 100)] == [0, 1, 2, 5, 10, 10]


def test_the_vae_default_warmup_gives_way_to_a_short_fit_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    from pyro_lvm.experiments.cli import parse_config
    from pyro_lvm.experiments.vae import VAEExperiment

    notes: list[str] = []
    cfg = parse_config(VAEExperiment(), ["--epochs", "5"], notes)
    assert cfg.train.warmup_epochs == 2 and cfg.train.epochs == 5
    assert len(notes) == 1 and "warm-up shortened to 2" in notes[0] and "--warmup-epochs" in notes[0]
    notes.clear()
    assert parse_config(VAEExperiment(), ["--epochs", "50"], notes).train.warmup_epochs == 10 and not notes
    assert parse_config(VAEExperiment(), ["--epochs", "5", "--warmup-epochs", "3"], notes).train.warmup_epochs == 3
    assert not notes
    with pytest.raises(SystemExit) as exit_:  # the default's value, but given: the user's choice is not overridden
        parse_config(VAEExperiment(), ["--epochs", "5", "--warmup-epochs", "10"], notes)
    assert exit_.value.code == 2 and "--warmup-epochs" in capsys.readouterr().err


def test_the_best_state_and_its_score_come_from_an_untempered_epoch() -> None:
    from conftest import binary_data

    from pyro_lvm.guides import GuideConfig, build_guide
    from pyro_lvm.models import VAE, VAEConfig
    from pyro_lvm.runtime import seeded
    from pyro_lvm.train import fit

    x = binary_data(120, 10)
    with seeded(0):
        model = VAE(VAEConfig(data_dim=10, latent_dim=2, hidden=(6,)))
        guide = build_guide("amortized", model, GuideConfig(hidden=(6,)))
    r = fit(model, guide, x[:80], x[80:], TrainConfig(epochs=4, batch_size=40, warmup_epochs=3, seed=0, quiet=True))
    betas = {h["epoch"]: h["beta"] for h in r.history}
    assert betas[r.best_epoch] == 1.0 and r.best_epoch >= 3 and r.best_valid_elbo is not None


# ---------------------------------------------------------------------------------------------- 2, 3. ranges
def test_seeds_threads_and_layer_sizes_are_checked_in_the_api() -> None:
    from pyro_lvm.evaluate import EvalConfig
    from pyro_lvm.experiments.gaussian_mixture import GMMExperimentConfig
    from pyro_lvm.experiments.vae import VAEExperimentConfig
    from pyro_lvm.models import VAEConfig

    for make in (lambda s: TrainConfig(seed=s), lambda s: EvalConfig(seed=s),
                 lambda s: VAEExperimentConfig(seed=s), lambda s: GMMExperimentConfig(seed=s, restarts=1)):
        for bad in (-1, 2**32, 2**70):
            with pytest.raises(ConfigError, match=r"seed: must be in \[0, 2\*\*32 - 1\]"):
                make(bad)
        make(0)
        make(MAX_SEED)
    with pytest.raises(ConfigError, match="seed: restart 2"):
        GMMExperimentConfig(seed=MAX_SEED, restarts=3)
    for make in (lambda n: TrainConfig(threads=n), lambda n: EvalConfig(threads=n),
                 lambda n: VAEExperimentConfig(threads=n)):
        with pytest.raises(ConfigError, match=f"threads: must be at most {MAX_THREADS}, got 100000"):
            make(100000)
        make(MAX_THREADS)
    from pyro_lvm.runtime import threads

    with pytest.raises(ValueError, match="threads: must be at most"), threads(100000):
        pass
    with pytest.raises(ConfigError, match=r"hidden: .*GB to train") as err:
        VAEConfig(data_dim=784, hidden=(100_000_000,))
    assert err.value.field == "hidden"
    assert VAEConfig(data_dim=784, hidden=(300, 300)).parameter_count() == 41 * 300 + 301 * 300 + 301 * 784


# ---------------------------------------------------------------------------------------------- 4. guide spellings
def test_guide_specs_have_one_spelling_and_a_guide_is_named_once() -> None:
    from pyro_lvm.experiments.gaussian_mixture import GMMExperimentConfig
    from pyro_lvm.experiments.vae import VAEExperimentConfig
    from pyro_lvm.guides.registry import canonical_guide_specs

    assert canonical_guide_specs([" amortized ", "planar:02", "iaf:1", "planar"]) == \
        ("amortized", "planar:2", "iaf:1", "planar")
    assert VAEExperimentConfig(guides=("planar:010",)).guides == ("planar:10",)
    for specs, match in ((["amortized", "amortized"], "'amortized' is given twice"),
                         (["planar", "planar:10"], "'planar:10' is given twice .*same guide"),
                         (["planar:+2"], "plain digits"), (["planar:2_0"], "plain digits"),
                         (["planar: 2"], "plain digits")):
        with pytest.raises(ConfigError, match=match) as err:
            canonical_guide_specs(specs)
        assert err.value.field == "guides"
    with pytest.raises(ConfigError, match="guides: guide 'meanfield' is given twice"):
        GMMExperimentConfig(guides=("meanfield", "meanfield "))


# ---------------------------------------------------------------------------------------------- 5. mixture draws
def _strip_timings(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip_timings(x) for k, x in v.items() if "seconds" not in k}
    if isinstance(v, list):
        return [_strip_timings(x) for x in v]
    return v


def test_divergence_messages_name_field_and_flag_and_no_scratch_checkpoint(tmp_path: Path) -> None:
    from pyro_lvm.plan import kept

    scratch = SimpleNamespace(best_model_path=str(tmp_path / "pyro_lvm_fit_x" / "best.ckpt"), scratch=True)
    kept_one = SimpleNamespace(last_model_path=str(tmp_path / "last.ckpt"))
    assert kept(SimpleNamespace(checkpoint_callbacks=[scratch])) == ""
    assert kept(SimpleNamespace(checkpoint_callbacks=[scratch, kept_one])).endswith("last.ckpt")

    from conftest import binary_data

    from pyro_lvm.guides import GuideConfig, build_guide
    from pyro_lvm.models import VAE, VAEConfig
    from pyro_lvm.runtime import seeded
    from pyro_lvm.train import TrainingError, fit

    x = binary_data(200, 12)
    with seeded(0):
        model = VAE(VAEConfig(data_dim=12, latent_dim=2, hidden=(8,)))
        guide = build_guide("amortized", model, GuideConfig(hidden=(8,)))
    with pytest.raises(TrainingError) as err:  # no output: checkpoints go to a scratch directory
        fit(model, guide, x, x[:40], TrainConfig(epochs=5, batch_size=20, lr=1e4, seed=0, quiet=True))
    text = str(err.value)
    assert "--lr / lr" in text and "warmup_epochs" in text and "--warmup-epochs" in text
    assert "pyro_lvm_fit_" not in text and "checkpoint:" not in text

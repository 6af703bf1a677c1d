"""What a person reads: ``--help`` without reStructuredText markup, a ``Dataset`` in a few lines."""

from __future__ import annotations

import re

import pytest

import pyro_lvm
from pyro_lvm.experiments import STANDALONE, load_all
from pyro_lvm.experiments.__main__ import main
from pyro_lvm.harness import EXPERIMENTS

load_all()
MARKUP = re.compile(r":[a-z]+:`|``|\\math|\.\. math::")


@pytest.mark.parametrize("name", sorted([*EXPERIMENTS, *STANDALONE]))
def test_help_renders_without_markup(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--" in text and not MARKUP.search(text), MARKUP.findall(text)


def test_a_dataset_prints_as_a_few_summary_lines() -> None:
    ds = pyro_lvm.load_dataset("wine")
    lines = repr(ds).splitlines()
    assert 2 <= len(lines) <= 6 and "tensor" not in repr(ds)
    assert lines[0] == f"Dataset 'wine': train {len(ds.train)}, valid {len(ds.valid)}, test {len(ds.test)} points"
    assert "13 features" in lines[1] and "standardized" in lines[1]


def test_the_terminal_table_leads_with_a_few_columns_and_says_where_the_rest_are() -> None:
    from pyro_lvm.report import results_table

    test = {"elbo": -5.0, "iwae": -4.9, "log_lik_at_point_estimate": -4.8, "predictive_log_likelihood": -4.85,
            "expected_log_likelihood": -4.86, "assignment_gap": 0.1, "assignment_gap_iwae": 0.05,
            "pareto_k_theta": 0.4, "ess_theta": 50.0, "kl_theta_lower_bound": 0.01, "iwae_k": 10}
    payload = {"experiment": "gaussian_mixture", "dataset": "iris", "results": [{"guide": "map", "test": test}],
               "baselines": []}
    full, brief = results_table(payload), results_table(payload, brief=True)
    head = brief.splitlines()[2]
    assert head.replace("\\|", "").count("|") - 1 == 5  # guide, three metrics, train s (\| is inside a cell)
    assert "ELBO" in head and "IWAE-K" in head and "log p(x\\|θ̂)" in head
    assert "7 more columns" in brief and "results.md" in brief
    assert full.splitlines()[2].replace("\\|", "").count("|") - 1 == 12 and "more columns" not in full


# ------------------------------------------------------------------ configs and results in a few lines

def _short(text: str, lines: int = 5, width: int = 200) -> bool:
    return len(text.splitlines()) <= lines and all(len(line) <= width for line in text.splitlines())


def test_configs_print_only_the_fields_that_differ_from_their_defaults() -> None:
    import dataclasses
    import json

    import torch

    from pyro_lvm.config import to_dict
    from pyro_lvm.experiments.factor_analysis import FAExperimentConfig
    from pyro_lvm.gaps import GapConfig

    cfg = pyro_lvm.TrainConfig(epochs=5, lr=0.01, seed=3)
    assert repr(cfg) == "TrainConfig(epochs=5, lr=0.01, seed=3)"
    assert repr(pyro_lvm.TrainConfig()) == "TrainConfig()"
    assert repr(pyro_lvm.EvalConfig(iwae_k=100)) == "EvalConfig(iwae_k=100)"
    assert repr(pyro_lvm.DataConfig(subset=50, dtype=torch.float64)) == "DataConfig(subset=50, dtype=torch.float64)"
    assert repr(pyro_lvm.GuideConfig(hidden=(32, 32))) == "GuideConfig(hidden=(32, 32))"
    assert repr(GapConfig()) == "GapConfig()"
    # a model's config: its required fields always, then what differs (a VAE's "vamp:500" is two fields)
    vae = pyro_lvm.build_model("vae", data_dim=6, latent_dim=2, hidden=(8,), prior="vamp:5")
    assert repr(vae.config) == "VAEConfig(data_dim=6, latent_dim=2, hidden=(8,), prior='vamp', prior_components=5)"
    fa = pyro_lvm.build_model("factor_analysis", data_dim=13, latent_dim=3)
    assert repr(fa.config) == "FactorAnalysisConfig(data_dim=13, latent_dim=3)"
    # an experiment's config nests its TrainConfig, changed fields only, and its own defaults count as unchanged
    exp = FAExperimentConfig(latent_dim=2, train=dataclasses.replace(FAExperimentConfig().train, epochs=7))
    assert repr(exp) == "FAExperimentConfig(train=TrainConfig(epochs=7), latent_dim=2)"
    # every field changed: still a few bounded lines, and the default dataclass repr is gone
    busy = pyro_lvm.TrainConfig(**{f.name: v for f, v in zip(dataclasses.fields(pyro_lvm.TrainConfig), (
        9, 7, 0.5, 0.5, 3.0, 2, "meanfield", "elbo", 1, 4, 3, 2, False, 5, 1.0, False, True, 11, 2, "adamw",
        "eager", "cpu"), strict=False)})
    text = repr(busy)
    assert _short(text, width=110) and "accelerator='cpu'" in text and "ddp_timeout" not in text
    from pyro_lvm.config import ReadableConfig

    Wide = dataclasses.make_dataclass("Wide", [(f"field_{i}", int, 0) for i in range(60)], bases=(ReadableConfig,))
    text = repr(Wide(**{f"field_{i}": 10**6 + i for i in range(60)}))
    assert _short(text, width=110) and text.startswith("Wide(field_0=1000000, ") and "more changed fields" in text
    # the rest of the dataclass is as it was: asdict, equality, the JSON record
    assert dataclasses.asdict(cfg)["epochs"] == 5 and len(dataclasses.asdict(cfg)) == len(
        dataclasses.fields(pyro_lvm.TrainConfig))
    assert cfg == pyro_lvm.TrainConfig(epochs=5, lr=0.01, seed=3) and cfg != pyro_lvm.TrainConfig()
    assert json.loads(json.dumps(to_dict(cfg)))["lr"] == 0.01


def test_a_config_that_writes_its_own_repr_keeps_it() -> None:
    import dataclasses

    from pyro_lvm.config import ReadableConfig, readable

    @dataclasses.dataclass
    class Own(ReadableConfig):
        a: int = 1

        def __repr__(self) -> str:
            return "mine"

    @readable
    @dataclasses.dataclass
    class Plain:
        a: int = 1
        b: str = "x"

    assert repr(Own(a=2)) == "mine" and repr(Plain(b="y")) == "Plain(b='y')"


def test_a_fit_result_and_a_loaded_fit_print_as_a_few_summary_lines(tmp_path: object) -> None:
    import torch

    torch.manual_seed(0)
    x = torch.randn(40, 4)
    model = pyro_lvm.build_model("factor_analysis", data_dim=4, latent_dim=2)
    guide = pyro_lvm.build_guide("amortized", model)
    fr = pyro_lvm.fit(model, guide, x, x[:10], epochs=3, batch_size=20, seed=0, quiet=True)
    text = repr(fr)
    lines = text.splitlines()
    assert _short(text) and "tensor" not in text and "history=[" not in text
    assert lines[0].startswith("FitResult(model=factor_analysis, guide=amortized, epochs=3 (best ")
    assert f"valid ELBO {fr.best_valid_elbo:.3f}" in lines[0] and "s/epoch" in lines[0]
    assert "6 steps" in lines[1] and ".history: 3 rows" in lines[1]
    assert repr(pyro_lvm.FitResult()) == "FitResult(no epoch trained)"
    path = pyro_lvm.save(tmp_path / "fit.pt", model, guide)  # type: ignore[operator]
    loaded = repr(pyro_lvm.load(path))
    assert _short(loaded) and "Linear(" not in loaded and "Parameter" not in loaded
    assert loaded.splitlines()[0] == "Fitted(model=factor_analysis, guide=amortized)"
    assert "FactorAnalysisConfig(data_dim=4, latent_dim=2)" in loaded


# ------------------------------------------------------------------ progress where the output is not a terminal

class _Clock:
    """A fake wall clock: it moves only when the test says (no test may depend on wall-clock speed)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_at_the_interval_of_a_fake_clock() -> None:
    import io

    import torch
    from lightning.pytorch.callbacks import Callback

    from pyro_lvm.plan import ProgressLines

    clock = _Clock()

    class TenSecondsAStep(Callback):  # before ProgressLines in the list: each step "takes" 10 s
        def on_train_batch_end(self, *args: object) -> None:
            clock.now += 10.0

    torch.manual_seed(0)
    x = torch.randn(40, 4)
    model = pyro_lvm.build_model("factor_analysis", data_dim=4, latent_dim=2)
    guide = pyro_lvm.build_guide("amortized", model)
    out = io.StringIO()
    progress = ProgressLines(25, label="amortized", clock=clock, stream=out)
    fr = pyro_lvm.fit(model, guide, x, x[:10], epochs=3, batch_size=10, seed=0, callbacks=[TenSecondsAStep(), progress])
    lines = out.getvalue().splitlines()
    # 4 steps an epoch, 12 in all: the interval runs out at steps 3, 7 and 11 (mid-epoch lines), and each of those
    # epochs reports again at its end, with its validation bound
    assert [ln.split(", ")[1] for ln in lines] == [f"step {s}/12" for s in (3, 4, 7, 8, 11, 12)], lines
    assert re.fullmatch(r"amortized: epoch 1/3, step 3/12, train loss [\d.]+, 30s elapsed, ETA 1m30s", lines[0]), lines
    valid = [h["valid_elbo"] for h in fr.history]
    assert f"valid ELBO {valid[0]:.5g} (epoch 1), 40s elapsed, ETA 1m20s" in lines[1]
    assert lines[3].endswith(f"valid ELBO {valid[1]:.5g} (epoch 2), 1m20s elapsed, ETA 40s")
    assert lines[5].endswith("2m00s elapsed") and "ETA" not in lines[5]
    assert progress.printed == 6


def test_progress_ends_with_a_done_line_and_says_nothing_before_its_interval() -> None:
    import io

    import torch

    from pyro_lvm.plan import ProgressLines, duration

    x = torch.randn(30, 3)
    for every, expect in ((1e9, 0), (0.5, None)):
        clock = _Clock()

        def tick(c: _Clock = clock) -> float:  # every reading: one second later
            c.now += 1.0
            return c.now

        model = pyro_lvm.build_model("factor_analysis", data_dim=3, latent_dim=1)
        guide = pyro_lvm.build_guide("amortized", model)
        out = io.StringIO()
        pyro_lvm.fit(model, guide, x, epochs=2, batch_size=10, seed=0, max_steps=5,
                     callbacks=[ProgressLines(every, clock=tick, stream=out)])
        lines = out.getvalue().splitlines()
        if expect == 0:
            assert lines == []
        else:  # a max_steps stop mid-epoch: the last line says done, at step 5
            assert lines[-1].startswith("done, epoch 2/2, step 5/5, train loss ") and "ETA" not in lines[-1], lines
    assert (duration(0.4), duration(65), duration(3 * 3600 + 150)) == ("0s", "1m05s", "3h02m")
    with pytest.raises(ValueError, match="every"):
        ProgressLines(0)


CLOCKED_CLI = '''
import itertools
import sys

from pyro_lvm.plan import ProgressLines

ticks = itertools.count(0.0, 20.0)  # each reading of the clock: 20 s later
ProgressLines.clock = staticmethod(lambda: next(ticks))

from pyro_lvm.experiments.__main__ import main

sys.exit(main(sys.argv[1:]))
'''


def test_the_command_line_prints_progress_lines_where_its_output_is_not_a_terminal(tmp_path: object,
                                                                                   warm_cli: object) -> None:
    """The real command line, its stdout and stderr files (not a terminal), with a fake clock (20 s a reading)
    against the default 30 s interval: lines with epoch, step, loss, elapsed and ETA, and a done line per guide;
    ``--progress-seconds 0`` and ``--quiet`` print none."""
    script = tmp_path / "clocked.py"  # type: ignore[operator]
    script.write_text(CLOCKED_CLI)
    flags = ["factor_analysis", "--dataset", "wine", "--latent-dim", "2", "--epochs", "3", "--iwae-k", "4",
             "--guide", "amortized,planar:2"]
    runs = {name: warm_cli.submit("", [*flags, *extra, "--output", str(tmp_path / name)], script=script)  # type: ignore
            for name, extra in (("default", []), ("off", ["--progress-seconds", "0"]), ("quiet", ["--quiet"]))}
    got = {name: run.result() for name, run in runs.items()}
    for name, proc in got.items():
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    lines = got["default"].stderr.splitlines()
    progress = [ln for ln in lines if re.match(r"(amortized|planar:2): (done, )?epoch \d/3, step \d/3, ", ln)]
    assert [ln.split(":")[0] for ln in progress] == ["amortized", "amortized", "planar", "planar"], lines
    assert re.fullmatch(r"amortized: epoch 2/3, step 2/3, train loss -?[\d.]+, 40s elapsed, ETA 20s", progress[0])
    assert progress[1].startswith("amortized: done, epoch 3/3, step 3/3, ") and progress[1].endswith("1m20s elapsed")
    for name in ("off", "quiet"):
        assert not [ln for ln in got[name].stderr.splitlines() if "elapsed" in ln], got[name].stderr


def test_progress_seconds_is_a_checked_flag_of_every_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["factor_analysis", "--help"])
    assert done.value.code == 0 and "--progress-seconds" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["factor_analysis", "--dataset", "wine", "--progress-seconds", "-1"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: --progress-seconds: must be a finite number >= 0"), err


# ------------------------------------------------------------------ the prior in the posterior figure

def test_the_posterior_figure_draws_the_standard_normal_prior_dashed_with_a_legend_entry(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib
    import torch

    from pyro_lvm import posterior_report as pr

    matplotlib.use("Agg")
    drawn: list[list[tuple[str, str]]] = []

    def keep(fig: object, path: object) -> object:  # read the artists before the figure is saved and cleared
        axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]  # type: ignore[attr-defined]
        drawn.append([(line.get_label(), line.get_linestyle()) for ax in axes for line in ax.get_lines()] +
                     [("legend:" + t.get_text(), "") for ax in axes if ax.get_legend() is not None
                      for t in ax.get_legend().get_texts()])
        return save(fig, path)

    save = pr._save
    monkeypatch.setattr(pr, "_save", keep)
    torch.manual_seed(0)
    x = torch.randn(30, 4)
    model = pyro_lvm.build_model("factor_analysis", data_dim=4, latent_dim=2)
    guide = pyro_lvm.build_guide("amortized", model)
    assert pr.normal_priors(model, x[:2]) == {"z": (0.0, 1.0)}
    pr.inspect_fit(model, guide, x, tmp_path, "amortized", num_points=6, num_samples=30)
    posterior = drawn[0]
    prior = [(label, style) for label, style in posterior if label.startswith("prior")]
    assert prior and all(style == "--" for _, style in prior) and prior[0][0] == "prior N(0, 1)"
    assert ("legend:prior N(0, 1)", "") in posterior and ("legend:exact p(z|x)", "") in posterior
    # where the prior is not known in closed form (a VAE's learned mixture prior), none is drawn
    vae = pyro_lvm.build_model("vae", data_dim=4, latent_dim=2, hidden=(8,), decoder="gaussian", prior="mog:3")
    assert pr.normal_priors(vae, x[:2]) == {}
    drawn.clear()
    idata = pyro_lvm.to_inference_data(model, guide, x, num_samples=30, points=list(range(6)))
    pr.plot_posterior(idata, tmp_path / "no_prior.png")  # type: ignore[operator]
    assert not [label for label, _ in drawn[0] if "prior" in label]


def test_each_posterior_panel_names_its_points_khat_in_red_above_the_threshold() -> None:
    """The posterior figure's panels, one per (point, latent): the title carries the point's k̂, red where it is
    above :data:`~pyro_lvm.posterior_report.PARETO_K_THRESHOLD` (the draws are not to be trusted), black where it is
    below or −inf (the exact posterior), and no k̂ where none was estimated."""
    import arviz as az
    import matplotlib.colors as mcolors
    import numpy as np
    from matplotlib.figure import Figure

    from pyro_lvm import posterior_report as pr

    ks = [0.2, pr.PARETO_K_THRESHOLD + 0.2, float("-inf"), float("nan")]
    import xarray as xr

    points = [10, 11, 12, 13]
    idata = az.from_dict(posterior={"z": np.zeros((1, 5, 4, 2))}, coords={"point": points, "latent": [0, 1]},
                         dims={"z": ["point", "latent"]})
    idata.add_groups(sample_stats=xr.Dataset({"pareto_k": ("point", ks)}, coords={"point": points}))
    axes = Figure().subplots(4, 2).ravel()
    pr._mark_reference(idata, idata.posterior, axes, None, {})
    red = mcolors.to_rgba("tab:red")
    for i, k in enumerate(ks):
        for ax in axes[2 * i: 2 * i + 2]:  # the point's two latents
            title = ax.title
            assert (mcolors.to_rgba(title.get_color()) == red) == (k > pr.PARETO_K_THRESHOLD), (k, title.get_text())
            assert ("k̂ = " in title.get_text()) == bool(np.isfinite(k)), (k, title.get_text())
    assert "k̂ = 0.90" in axes[2].title.get_text()

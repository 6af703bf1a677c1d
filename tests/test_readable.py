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

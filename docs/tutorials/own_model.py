# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bring your own Pyro model
#
# The suite's built-in models are `LatentModel` subclasses, but you do not need one: **any Pyro model function
# whose per-point sites sit in `pyro.plate("data", len(x))`** gets every amortized guide and flow, held-out ELBO
# and IWAE-K, per-point k̂, ArviZ and `save`/`load` through `pyro_lvm.wrap_model`.
#
# This tutorial writes a count model — Poisson PCA with a per-point size factor, two local latent sites of
# different supports — simulates data from it with known truth, fits it with three guides, checks the fit
# against a baseline, and looks at the posterior of the size factor against the values that made the data.
#
# Set `PYRO_LVM_TUTORIAL_TINY=1` for a seconds-long run; the rendered page used the full settings.

# %%
import os

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

import pyro_lvm
from pyro_lvm.runtime import seeded

TINY = os.environ.get("PYRO_LVM_TUTORIAL_TINY") == "1"
EPOCHS = 40 if TINY else 300
IWAE_K = 100 if TINY else 1000
GUIDES = ["amortized", "iaf:2"] if TINY else ["amortized", "amortized-fullcov", "iaf:2"]

# %% [markdown]
# ## The model: ordinary Pyro
#
# Nothing of the suite's is inside. `W` and `b` are `pyro.param`s — point estimates the wrapped model owns, so
# `fit`, `save` and `load` see them. `z` (a real vector) and `s` (a positive scalar) are the local latents.

# %%
D, LATENT = 12, 2


def poisson_pca(x):
    W = pyro.param("W", lambda: 0.1 * torch.randn(LATENT, x.shape[-1]))
    b = pyro.param("b", lambda: torch.zeros(x.shape[-1]))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        rate = s.unsqueeze(-1) * (b + z @ W).exp()
        pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)


# %% [markdown]
# ## Data with known truth
#
# Counts from the same generative story, with loadings, size factors and latents we keep to check against.

# %%
g = torch.Generator().manual_seed(1)
n = 600
true_W = 0.8 * torch.randn(LATENT, D, generator=g)
true_z = torch.randn(n, LATENT, generator=g)
true_s = torch.exp(0.5 * torch.randn(n, generator=g))
counts = torch.poisson(true_s.unsqueeze(-1) * torch.exp(1.0 + true_z @ true_W), generator=g)
train, test = counts[:480], counts[480:]
s_test = true_s[480:]
print(f"counts: mean {counts.mean():.1f}, max {counts.max():.0f}, zeros {(counts == 0).float().mean():.0%}")

# %% [markdown]
# ## Wrap it: the rules are checked at once
#
# `wrap_model` traces the function on a few points and checks its rules (per-point sites in the `data` plate at
# dim −1, continuous local latents with a support `biject_to` knows, ...). A function that breaks one is refused
# in one line naming the site — here a model with a discrete per-point site, which no reparameterized guide can
# propose:

# %%
def with_a_discrete_site(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(0.5))                       # discrete: refused
        rate = (1.0 + 4.0 * c).unsqueeze(-1).expand(len(x), x.shape[-1])
        pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)


try:
    pyro_lvm.wrap_model(with_a_discrete_site, data_dim=D)
except ValueError as error:
    refusal = str(error)
    print("refused:", refusal)

# %% [markdown]
# The real model passes. Counts reach the encoder through `log1p` automatically (the observed site's support is
# non-negative integers); the data are **not** standardized — a Poisson likelihood needs the raw counts.

# %%
fits = {}
for spec in GUIDES:
    with seeded(0):
        model = pyro_lvm.wrap_model(poisson_pca, data_dim=D)
        guide = pyro_lvm.build_guide(spec, model)
    history = pyro_lvm.fit(model, guide, train, epochs=EPOCHS, batch_size=120, lr=1e-2, seed=0, quiet=True)
    scores = pyro_lvm.evaluate(model, guide, test, iwae_k=IWAE_K, seed=0)
    fits[spec] = {"model": model, "guide": guide, "history": history, "scores": scores}

# %% [markdown]
# ## Is the fit any good? Held-out bounds against a baseline
#
# The model has no closed-form log p(x), so `exact log p(x)` is absent: IWAE-K is the best estimate, a lower
# bound. As a yardstick, the independent-Poisson model (one rate per feature, fitted on the training counts)
# ignores everything the latents carry.

# %%
rate = train.mean(0)
baseline = float(dist.Poisson(rate).log_prob(test).sum(-1).mean())
table = pd.DataFrame({spec: {"ELBO": f["scores"]["elbo"], f"IWAE-{IWAE_K}": f["scores"]["iwae"],
                             "mean k̂": f["scores"]["pareto_k_mean"],
                             "share k̂ > 0.7": f["scores"]["pareto_k_frac_above_0.7"]}
                      for spec, f in fits.items()}).T
table["IWAE − baseline"] = table[f"IWAE-{IWAE_K}"] - baseline
print(f"independent-Poisson baseline: {baseline:.3f} nats per test point")
table.round(3)

# %% [markdown]
# Read it as in the [first tutorial](compare_families.ipynb): the latents are worth the difference to the baseline
# in nats per test point; ELBO ≤ IWAE-K, and the share of points with k̂ > 0.7 says where IWAE-K may still be far
# below log p(x). A family that can correlate z with log s (full covariance, flows) is a better proposal where the
# two trade off.

# %% [markdown]
# ## The posterior of each site, under its own name
#
# The guides see one unconstrained vector per point (z and log s together, so they can model correlations between
# sites); `to_inference_data` writes each site back under its own name and support: `z` (point, latent) and `s`
# (point), positive.

# %%
best = max(fits, key=lambda spec: fits[spec]["scores"]["iwae"])
model, guide = fits[best]["model"], fits[best]["guide"]
idata = pyro_lvm.to_inference_data(model, guide, test, num_samples=400, seed=0)
print("best guide by held-out IWAE:", best)
print("posterior variables:", dict(idata.posterior.sizes), list(idata.posterior.data_vars))
az.summary(idata, var_names=["s"], coords={"point": [0, 1, 2]}, kind="stats")

# %% [markdown]
# Does the size factor the model infers track the one that made the data? s and the scale of exp(zW + b) can
# partly trade off, so compare on the log scale by rank, and look:

# %%
s_mean = idata.posterior["s"].mean(("chain", "draw")).values
points = idata.posterior["point"].values.copy()
s_true = s_test[points].numpy()
correlation = float(pd.Series(np.log(s_mean)).corr(pd.Series(np.log(s_true)), method="spearman"))
print(f"rank correlation of E_q[s | x] with the true size factor: {correlation:.2f}")

fig, (ax_s, ax_ppc) = plt.subplots(1, 2, figsize=(11, 4))
ax_s.scatter(np.log(s_true), np.log(s_mean), s=12)
ax_s.set_xlabel("log of the true size factor s")
ax_s.set_ylabel("log of the posterior mean of s")
ax_s.set_title(f"{best}: E_q[s | x] per test point")
# posterior predictive check: each point's total count, replicated under the guide's draws
replicated = idata.posterior_predictive["x"].sum("feature").values.ravel()
observed = idata.observed_data["x"].sum("feature").values
ax_ppc.hist(np.log1p(replicated), bins=40, density=True, alpha=0.6, label="replicated (posterior predictive)")
ax_ppc.hist(np.log1p(observed), bins=20, density=True, alpha=0.6, label="observed test points")
ax_ppc.set_xlabel("log(1 + total count per point)")
ax_ppc.set_title("posterior predictive check")
ax_ppc.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Save it, and run it from the command line
#
# The function is stored by its **import path**, never pickled, so keep it in a module (`mymodels.py`) for
# `pyro_lvm.load` to import in a fresh process. The same file runs through the command line with the built-in
# experiments' results, checkpoints, `--resume` and `--inspect`:
#
# ```bash
# pyro-lvm fit --model mymodels.py:poisson_pca --data counts.npy --no-standardize \
#     --guide amortized,iaf:2 --seed 0 --inspect --output runs/counts
# ```
#
# What the suite cannot handle yet is refused in one line naming the site; the rules in full are on
# [Your own model](../own-model.md). More example functions: `pyro_lvm.models.functions`.

r"""Bayesian factor analysis: priors on W, μ, Ψ, the factors z summed out, so every latent is global."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyro_lvm.config import check_config
from pyro_lvm.registry import register_model

from .base import CONTINUOUS_ELBOS, LatentModel, ModelTraits, data_plate

Params = dict[str, torch.Tensor]

#: the global sites, in the order the autoguides see them
GLOBAL_SITES: tuple[str, ...] = ("W", "mu", "psi")

#: what is identifiable from p(x | θ) = N(μ, WWᵀ + Ψ): W only up to W R for an orthogonal R (rotations and
#: sign flips, under which the prior is invariant too), so posteriors are compared on these
IDENTIFIABLE_NOTE = ("W is not identifiable (W and W R give the same p(x) and prior for any orthogonal R: "
                     "rotations, sign flips, column swaps); compared are the identifiable mu, psi and "
                     "cov = W W^T + diag(psi)")


@dataclass
class BayesianFAConfig:
    data_dim: int
    latent_dim: int
    #: s_W: prior std of each loading W_dj, in units of feature d's std σ̂_d
    loading_prior_scale: float = 1.0
    #: s_μ: prior std of each mean μ_d around the data mean, in units of σ̂_d
    loc_prior_scale: float = 3.0
    #: w: std of log Ψ_d around log(σ̂_d² / 2); a proper prior on the log scale keeps Ψ off zero (no Heywood case)
    noise_prior_width: float = 1.0

    def __post_init__(self) -> None:
        check_config(self, positive_int=("data_dim", "latent_dim"),
                     positive=("loading_prior_scale", "loc_prior_scale", "noise_prior_width"))
        if self.latent_dim > self.data_dim:
            raise ValueError(f"latent_dim: must be <= data_dim ({self.data_dim}), got {self.latent_dim}")


@register_model("bayesian_fa")
class BayesianFactorAnalysis(LatentModel):
    r"""Bayesian factor analysis: priors on W, μ, Ψ, with z summed out.

    .. math::
        W_{dj} \sim \mathcal N(0, (s_W \hat\sigma_d)^2), \quad
        \mu_d \sim \mathcal N(m_{0d}, (s_\mu \hat\sigma_d)^2), \quad
        \Psi_d \sim \mathrm{LogNormal}(\log(\hat\sigma_d^2 / 2), w^2),

        z_n \sim \mathcal N(0, I_k), \qquad x_n \mid z_n, \theta \sim \mathcal N(\mu + W z_n, \mathrm{diag}\,\Psi),

    and the model that SVI and NUTS see has z integrated out in closed form:
    :math:`x_n \mid \theta \sim \mathcal N(\mu, W W^\top + \mathrm{diag}\,\Psi)` (``LowRankMultivariateNormal``,
    O(D k²) per point). So θ = (W, μ, Ψ) are its only latents, all global (``local_site = None``), and every
    global guide (``map``, ``meanfield``, ``fullrank``, ``lowrank:R``, ``auto-iaf:K``) fits it.

    m₀ and σ̂ are the training data's mean and per-feature std (:meth:`init_from_data`), so the priors are
    weak on any scale, as the mixture's are. Prior on Ψ: a log-normal, not an inverse gamma. Both keep
    Ψ_d off zero (the Heywood case, where one feature's noise variance collapses and the likelihood grows
    without bound). The log-normal does it with a Gaussian penalty on log Ψ_d, symmetric on the log scale
    and light-tailed both ways, centred where half of each feature's variance is noise (the usual FA start).
    In the unconstrained space (log Ψ) that the autoguides and NUTS work in, it is then exactly Gaussian.
    An inverse gamma's density on log Ψ is skewed, with an exp(−b/Ψ) wall towards zero and a heavy right
    tail, which is harder geometry for both. The mixture's scales get the same prior, so the two models
    read alike.

    Identifiability: p(x | θ) and the prior are invariant under W → W R for any orthogonal R, so W's
    posterior is a ring of rotations and sign flips. Summaries use μ, Ψ and C = W Wᵀ + Ψ (:meth:`identifiable`).
    """

    Config = BayesianFAConfig
    local_site = None
    global_sites = GLOBAL_SITES
    evaluator = "bayesian_fa"

    @classmethod
    def traits_for(cls, config: BayesianFAConfig) -> ModelTraits:
        # JitTrace_ELBO is not offered, as for the mixture's globals: forced through it, auto-iaf's loss did not
        # move in 30 steps (meanfield's and fullrank's did), so the JIT path is not known to train these guides
        elbos = tuple(e for e in CONTINUOUS_ELBOS if e != "jit")
        return ModelTraits(cls.name, None, GLOBAL_SITES, None, False, "trace", elbos,
                           "the global guides have no tested JIT path")

    def __init__(self, config: BayesianFAConfig) -> None:
        super().__init__()
        _register_inference()  # see there: importing pyro_lvm.evaluate here would be circular
        self.config = config
        self.data_dim, self.latent_dim = config.data_dim, config.latent_dim
        self.register_buffer("data_loc", torch.zeros(config.data_dim))
        self.register_buffer("data_scale", torch.ones(config.data_dim))
        self.initial_values: Params | None = None

    @classmethod
    def example(cls, seed: int = 0) -> tuple[BayesianFactorAnalysis, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        W, mu = torch.randn(4, 1, generator=g), torch.randn(4, generator=g)
        x = mu + torch.randn(24, 1, generator=g) @ W.T + 0.5 * torch.randn(24, 4, generator=g)
        model = cls(BayesianFAConfig(4, 1))
        x = x.to(torch.get_default_dtype())
        model.init_from_data(x)
        return model, x

    # ------------------------------------------------------------------ data and initialisation

    def validate_training(self, x: object, name: str = "training data") -> torch.Tensor:
        x = self.validate(x, name)
        if x.shape[0] < 2:
            raise ValueError(f"{name}: {x.shape[0]} point(s); a factor model needs at least 2 to set its priors' "
                             "scale")
        return x

    def init_from_data(self, x: object) -> None:
        """Centre the priors on the data (m₀, σ̂) and set ``initial_values`` to the PPCA solution.

        W = U_k (Λ_k − σ²)^½ from the top-k eigenpairs of the sample covariance S, σ² the mean of the other
        eigenvalues (Tipping & Bishop 1999), Ψ = diag(S − W Wᵀ) floored at 5% of each feature's variance:
        a start near the posterior's bulk for the autoguides (``init_to_value``) and for NUTS.
        """
        x = self.validate_training(x)
        with torch.no_grad():
            self.data_loc.copy_(x.mean(0))
            self.data_scale.copy_(x.std(0).clamp_min(1e-3))
            self.initial_values = ppca_start(x, self.latent_dim)

    def get_extra_state(self) -> dict[str, Any]:
        """The PPCA start travels with the state dict (a saved model can be re-fitted from it)."""
        return {"initial_values": self.initial_values}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.initial_values = state.get("initial_values")

    # ------------------------------------------------------------------ the Pyro model

    def priors(self) -> dict[str, dist.Distribution]:
        """The prior of each global site (event shapes (D, k), (D,), (D,))."""
        c, sd = self.config, self.data_scale
        D, k = self.data_dim, self.latent_dim
        return {
            "W": dist.Normal(torch.zeros_like(sd).unsqueeze(-1).expand(D, k),
                             (c.loading_prior_scale * sd).unsqueeze(-1).expand(D, k)).to_event(2),
            "mu": dist.Normal(self.data_loc, c.loc_prior_scale * sd).to_event(1),
            "psi": dist.LogNormal((sd ** 2 / 2).log(), c.noise_prior_width * torch.ones_like(sd)).to_event(1),
        }

    def sample_globals(self) -> Params:
        return {name: pyro.sample(name, prior) for name, prior in self.priors().items()}

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        p = self.sample_globals()
        # globals may carry leading particle dims (..., D, k): they broadcast against the data plate (dim -1)
        with data_plate(x.shape[0], total_size, x.device):
            pyro.sample("x", marginal(p), obs=x)

    # ------------------------------------------------------------------ closed forms at a given θ

    def log_likelihood_at(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Collapsed log p(x_n | θ) = log N(x_n; μ, W Wᵀ + Ψ), shape (..., N) for θ with leading dims (...)."""
        return marginal(_lift(p)).log_prob(x)

    def log_joint_at(self, x: torch.Tensor, z: torch.Tensor, p: Params) -> torch.Tensor:
        """The uncollapsed log p(x_n, z_n | θ) = log N(z_n; 0, I) + log N(x_n; μ + W z_n, Ψ), shape (N,)."""
        loc = p["mu"] + z @ p["W"].T
        return (dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                + dist.Normal(loc, p["psi"].sqrt()).log_prob(x).sum(-1))

    def posterior_z_at(self, x: torch.Tensor, p: Params) -> dist.MultivariateNormal:
        """p(z_n | x_n, θ) = N(G Wᵀ Ψ⁻¹ (x_n − μ), G), G = (I + Wᵀ Ψ⁻¹ W)⁻¹, batch (N,)."""
        W, psi = p["W"], p["psi"]
        precision = torch.eye(self.latent_dim, dtype=W.dtype, device=W.device) + (W.T / psi) @ W
        G = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        mean = ((x - p["mu"]) / psi) @ W @ G
        return dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(G))

    def identifiable(self, p: Params) -> Params:
        """The identifiable functions of θ: ``mu`` (..., D), ``psi`` (..., D), ``cov`` = W Wᵀ + diag Ψ (..., D, D)."""
        return {"mu": p["mu"], "psi": p["psi"], "cov": covariance(p)}

    def _sample(self, n: int, *, mean: bool, guide: object) -> torch.Tensor:
        theta = self._globals_to_sample_from(guide, "a Bayesian factor model")
        z = torch.randn(n, self.latent_dim, dtype=self.data_loc.dtype, device=self.data_loc.device)
        loc = theta["mu"] + z @ theta["W"].T  # (n, D): E[x | z, θ̂]
        return loc if mean else loc + theta["psi"].sqrt() * torch.randn_like(loc)

    def num_free_parameters(self) -> int:
        D, k = self.data_dim, self.latent_dim
        return D * k + 2 * D


class RotationQuotient:
    r"""The Bayesian factor model with W's rotations factored out, for NUTS: the same posterior over μ, Ψ and C.

    The likelihood and the prior are invariant under W → W Q for every orthogonal Q, so the posterior over W is
    a ring (k = 2) or a manifold of rotations, around which NUTS's trajectories wander without a U-turn: the
    trees hit their depth limit and r̂ stays high. Every full-rank W is W = W̃ Q with Q ∈ O(k) and W̃ zero above
    the diagonal in k anchor rows a_1..a_k and positive on it (an LQ decomposition of those rows), and, by the
    Jacobian of the QR decomposition (Muirhead 1982, Theorem 2.1.13) applied to the anchor rows (the other rows
    are W̃'s rotated by Q, a Jacobian of 1)

    .. math:: dW = \prod_{i=1}^{k} \tilde W_{a_i i}^{\,k-i}\; d\tilde W\, dQ_{\mathrm{Haar}},

    so the posterior of W̃ is p(x | W̃, μ, Ψ) p(W̃) p(μ) p(Ψ) ∏ W̃_{a_i i}^{k−i} on that set (the prior of W
    restricted to it: half-normals on the diagonal, zeros above it), and W = W̃ Q with Q Haar-distributed and
    independent is a draw of the model's own W. Sites: ``W_free`` (the D k − k(k+1)/2 entries not in an
    anchor row's diagonal or above it), ``W_diag`` (k), ``mu``, ``psi``. The anchors are the k rows a
    pivoted QR of the start W₀ᵀ picks (the most linearly independent loadings), which keeps W̃'s diagonal away
    from 0.
    """

    sites = ("W_free", "W_diag", "mu", "psi")

    def __init__(self, model: BayesianFactorAnalysis, start: Params | None = None) -> None:
        from scipy.linalg import qr

        self.model = model
        D, k = model.data_dim, model.latent_dim
        start = start if start is not None else model.initial_values
        if start is None:
            raise ValueError("model: call init_from_data first (its start picks the anchor rows)")
        _, _, pivots = qr(start["W"].detach().cpu().double().numpy().T, pivoting=True)
        anchors = [int(a) for a in pivots[:k]]
        self.anchors = anchors
        # positions of W̃: the anchor rows' diagonal, the free entries (everything else but the zeros above it)
        row = torch.arange(D).unsqueeze(-1).expand(D, k)
        col = torch.arange(k).expand(D, k)
        rank = torch.full((D,), k, dtype=torch.long)  # anchor a_i has rank i: columns j > i are 0, j = i the diagonal
        rank[anchors] = torch.arange(k)
        self.diag_mask = (col == rank.unsqueeze(-1))
        self.free_mask = (col < rank.unsqueeze(-1))
        self.free_rows = row[self.free_mask]
        self.diag_rows = torch.as_tensor(anchors)
        with torch.no_grad():
            tilde = self.canonical(start["W"])
        #: start values of the sites, for ``init_to_value``
        self.initial_values = {"W_free": tilde[self.free_mask],
                               "W_diag": torch.stack([tilde[a, i] for i, a in enumerate(anchors)]),
                               "mu": start["mu"], "psi": start["psi"]}

    def canonical(self, W: torch.Tensor) -> torch.Tensor:
        """W̃ = W Qᵀ, the representative of W's orbit in the identified form (anchor rows lower triangular with a
        positive diagonal); W (..., D, k)."""
        top = W[..., self.anchors, :]  # (..., k, k)
        q, r = torch.linalg.qr(top.transpose(-1, -2))  # topᵀ = q r, so top = rᵀ qᵀ: L = rᵀ, Q = qᵀ
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        return W @ (q * signs.unsqueeze(-2))  # W Qᵀ with Q = diag(signs) qᵀ

    def assemble(self, free: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        """W̃ (..., D, k) from its free entries (..., F) and its anchor diagonal (..., k)."""
        D, k = self.model.data_dim, self.model.latent_dim
        W = free.new_zeros(free.shape[:-1] + (D, k))
        W[..., self.free_mask] = free
        W[..., self.diag_mask] = diag[..., torch.argsort(self.diag_rows)]
        return W

    def __call__(self, x: torch.Tensor) -> None:
        m, c = self.model, self.model.config
        k = m.latent_dim
        sd = c.loading_prior_scale * m.data_scale
        free = pyro.sample("W_free", dist.Normal(0.0, sd[self.free_rows]).to_event(1))
        diag = pyro.sample("W_diag", dist.HalfNormal(sd[self.diag_rows]).to_event(1))
        # the Jacobian of W -> (W̃, Q): ∏_i W̃_{a_i i}^{k−i} (i = 1..k)
        powers = torch.arange(k - 1, -1, -1, dtype=diag.dtype, device=diag.device)
        pyro.factor("rotation_jacobian", (powers * diag.log()).sum(-1))
        priors = m.priors()
        p = {"W": self.assemble(free, diag), "mu": pyro.sample("mu", priors["mu"]),
             "psi": pyro.sample("psi", priors["psi"])}
        with data_plate(x.shape[0], None, x.device):
            pyro.sample("x", marginal(p), obs=x)

    def to_globals(self, draws: Params) -> Params:
        """Draws of the sites (S, ...) -> draws of the model's W, μ, Ψ: W = W̃ Q with Q Haar on O(k) per draw (from
        torch's RNG), so W is distributed as in the model's own posterior."""
        tilde = self.assemble(draws["W_free"], draws["W_diag"])
        S, k = tilde.shape[0], self.model.latent_dim
        q, r = torch.linalg.qr(torch.randn(S, k, k, dtype=tilde.dtype, device=tilde.device))
        Q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar on O(k) (Mezzadri 2007)
        return {"W": tilde @ Q, "mu": draws["mu"], "psi": draws["psi"]}


def marginal(p: Params) -> dist.LowRankMultivariateNormal:
    """p(x | θ) = N(μ, W Wᵀ + diag Ψ) with z integrated out; batch shape θ's leading dims."""
    return dist.LowRankMultivariateNormal(p["mu"], p["W"], p["psi"])


def covariance(p: Params) -> torch.Tensor:
    """C = W Wᵀ + diag Ψ, shape (..., D, D)."""
    return p["W"] @ p["W"].transpose(-1, -2) + torch.diag_embed(p["psi"])


def _lift(p: Params) -> Params:
    """θ with leading dims (...) -> (..., 1): a singleton for the points, so log_prob(x) is (..., N)."""
    return {"W": p["W"].unsqueeze(-3), "mu": p["mu"].unsqueeze(-2), "psi": p["psi"].unsqueeze(-2)}


@torch.no_grad()
def ppca_start(x: torch.Tensor, k: int) -> Params:
    """The PPCA maximum-likelihood W, μ and a per-feature Ψ (see :meth:`BayesianFactorAnalysis.init_from_data`)."""
    mu = x.mean(0)
    S = torch.cov((x - mu).T, correction=0).reshape(x.shape[1], x.shape[1])
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    d = x.shape[1]
    sigma2 = evals[k:].mean() if k < d else 0.1 * evals.mean()
    W = evecs[:, :k] * (evals[:k] - sigma2).clamp_min(0).sqrt()
    var = S.diagonal()
    psi = torch.maximum(var - (W ** 2).sum(-1), 0.05 * var).clamp_min(1e-6)
    return {"W": W.clone(), "mu": mu.clone(), "psi": psi.clone()}


# ---------------------------------------------------------------------- held-out bounds and ArviZ draws


def _theta_draw(guide: Any, x: torch.Tensor, shapes: dict[str, torch.Size]) -> Params:
    """One θ ~ q(θ) with the shapes of the point estimate (no particle-plate padding)."""
    return {k: v.reshape(shapes[k]) for k, v in guide.sample_globals(x).items() if k in shapes}


@torch.no_grad()
def bayesian_fa_bounds(model: BayesianFactorAnalysis, guide: Any, x: torch.Tensor, config: Any
                       ) -> dict[str, torch.Tensor]:
    r"""Held-out bounds of the Bayesian factor model, per point, under S draws θ_s ~ q(θ).

    S = ``config.posterior_samples`` (one for a point mass, ``map``). z is summed out in closed form, so for
    every θ_s the bound over the local latent is tight. The columns, as the mixture's with exact assignments:

    * ``elbo`` = ``iwae`` = ``expected_log_likelihood`` = mean_s log p(x_n | θ_s) = mean_s log N(x_n; μ_s,
      W_s W_sᵀ + Ψ_s): the local ELBO and IWAE-K over z (with the exact p(z | x_n, θ_s), for any K) equal
      log p(x_n | θ_s), averaged over q(θ). (``iwae_k`` draws nothing here: there is no local guide.)
    * ``predictive_log_likelihood`` = log (1/S) Σ_s p(x_n | θ_s): the posterior predictive with q(θ) for the
      posterior; it is ≥ ``elbo`` by Jensen, the more so the wider q(θ) is.
    * ``log_lik_at_point_estimate`` = log p(x_n | θ̂) at the guide's point estimate (the MAP for ``map``): a
      plug-in score, not the model's log p(x), so no ``exact_log_likelihood`` (and no ``gap_elbo``) is reported;
      how far q(θ) is from p(θ | x_train) is :func:`pyro_lvm.evaluate.global_pareto_k`'s question.
    """
    samples = 1 if guide.is_point_mass else config.posterior_samples
    point = guide.point_estimate(x)
    shapes = {k: v.shape for k, v in point.items()}
    lp = torch.stack([model.log_likelihood_at(x, _theta_draw(guide, x, shapes)) for _ in range(samples)])  # (S, N)
    expected = lp.mean(0)
    return {"elbo": expected, "iwae": expected.clone(), "expected_log_likelihood": expected.clone(),
            "predictive_log_likelihood": torch.logsumexp(lp, 0) - math.log(samples),
            "log_lik_at_point_estimate": model.log_likelihood_at(x, point)}


def bayesian_fa_draws(model: BayesianFactorAnalysis, guide: Any, x: torch.Tensor, num_samples: int) -> Any:
    r"""θ_s ~ q(θ), z_{s,n} ~ p(z | x_n, θ_s) (exact given θ), x^{rep}_{s,n} ~ N(μ_s + W_s z_{s,n}, Ψ_s).

    ``posterior``: ``W`` (feature, latent), ``mu`` and ``psi`` (feature), the identifiable ``cov`` = W Wᵀ + Ψ
    (feature_row, feature_col), and ``z`` (point, latent). ``log_likelihood`` = log p(x_n | θ_s), z summed out.
    ``log_p`` = log p(x_n, z_{s,n} | θ_s) and ``log_q`` = log p(z_{s,n} | x_n, θ_s), so log_p − log_q =
    log p(x_n | θ_s): each point's weights vary over θ only, as the mixture's with exact assignments.
    """
    from pyro_lvm.inspect import Draws

    point = guide.point_estimate(x)
    shapes = {k: v.shape for k, v in point.items()}
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("W", "mu", "psi", "cov", "z", "x_rep", "log_lik", "log_p",
                                                        "log_q")}
    for _ in range(num_samples):
        theta = _theta_draw(guide, x, shapes)
        post = model.posterior_z_at(x, theta)
        z = post.sample()  # (N, k)
        loc = theta["mu"] + z @ theta["W"].T
        values = {**theta, "cov": covariance(theta), "z": z,
                  "x_rep": loc + theta["psi"].sqrt() * torch.randn_like(loc),
                  "log_lik": model.log_likelihood_at(x, theta),
                  "log_p": model.log_joint_at(x, z, theta), "log_q": post.log_prob(z)}
        for k, v in values.items():
            out[k].append(v.detach().cpu().numpy())
    arrays = {k: np.stack(v) for k, v in out.items()}
    dims = {"W": ["feature", "latent"], "mu": ["feature"], "psi": ["feature"], "cov": ["feature_row", "feature_col"],
            "z": ["point", "latent"]}
    return Draws({k: arrays[k] for k in dims}, dims, arrays["x_rep"], arrays["log_lik"], arrays["log_p"],
                 arrays["log_q"], note="theta ~ q(theta); cov = W W^T + diag(psi); z ~ p(z|x,theta) (exact); "
                                       "x_rep ~ p(x|z,theta); log_likelihood = log p(x|theta) (z summed out)")


def _register_inference() -> None:
    """Register :func:`bayesian_fa_bounds` in ``pyro_lvm.evaluate.EVALUATORS`` and :func:`bayesian_fa_draws` in
    ``pyro_lvm.inspect.INSPECTORS`` under ``bayesian_fa`` (idempotent: the same functions from the same place).

    Called when a model is built, which is before anything can evaluate or inspect one: at import time of this
    module ``pyro_lvm.evaluate`` is itself still being imported (it imports the models package), so its
    registry does not exist yet.
    """
    from pyro_lvm.evaluate import EVALUATORS
    from pyro_lvm.inspect import INSPECTORS

    EVALUATORS.register("bayesian_fa")(bayesian_fa_bounds)
    INSPECTORS.register("bayesian_fa")(bayesian_fa_draws)


__all__ = ["IDENTIFIABLE_NOTE", "BayesianFAConfig", "BayesianFactorAnalysis", "RotationQuotient", "bayesian_fa_bounds",
           "bayesian_fa_draws", "covariance", "marginal", "ppca_start"]

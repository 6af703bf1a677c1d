r"""Gaussian mixture models with three ways to treat the assignments (collapsed, enumerated, amortized)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import Distribution
from pyro.ops.indexing import Vindex

from pyro_lvm.config import check_choice, check_config
from pyro_lvm.registry import Registry, register_model

from .base import LatentModel, ModelTraits, data_plate

COMPONENTS_PLATE = "components"
Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AssignmentScheme:
    """How the assignments c_n enter the model and which ELBO estimator trains it."""

    #: c is a sample site (otherwise it is summed out inside the likelihood)
    sampled: bool
    #: the site is enumerated in parallel by ``TraceEnum_ELBO``
    enumerated: bool
    #: a guide must propose c (an amortized q(c|x))
    guided: bool
    #: name in ``pyro_lvm.train.ELBOS`` of the default estimator
    elbo: str
    summary: str
    #: every estimator that trains the right objective under this scheme
    elbos: tuple[str, ...] = ()
    #: why the others are refused
    elbo_note: str = ""


ASSIGNMENTS: Registry[AssignmentScheme] = Registry("assignment scheme")
ASSIGNMENTS.register("collapsed")(AssignmentScheme(
    False, False, False, "trace", "c summed out in the likelihood (MixtureSameFamily); Trace_ELBO",
    ("trace", "meanfield", "tracegraph", "traceenum"), "the mixture's globals have no JIT path"))
ASSIGNMENTS.register("enumerated")(AssignmentScheme(
    True, True, False, "traceenum", "c a sample site enumerated in parallel; TraceEnum_ELBO",
    ("traceenum",), "an enumerated site must be summed out by TraceEnum_ELBO: any other estimator samples c "
    "from the prior with no gradient for it (a silently wrong objective)"))
ASSIGNMENTS.register("amortized")(AssignmentScheme(
    True, False, True, "tracegraph", "c proposed by a neural q(c|x); TraceGraph_ELBO (score function + baseline)",
    ("tracegraph", "trace"), "the discrete q(c|x) needs a score-function estimator (TraceMeanField_ELBO and the "
    "enumerating and JIT paths do not train a proposed discrete site)"))


class DiagonalCovariance:
    r"""Σ_k = diag(s_k)², with s_kd ~ LogNormal(log σ̂_d, w) around the data's scale σ̂."""

    sites: ClassVar[tuple[str, ...]] = ("scales",)
    #: event dims of each global site, for indexing components by c
    event_dims: ClassVar[dict[str, int]] = {"scales": 1}

    def sample(self, model: GaussianMixture) -> Params:
        prior = dist.LogNormal(model.data_scale.log(), model.config.scale_prior_width).to_event(1)
        return {"scales": pyro.sample("scales", prior)}

    def component(self, locs: torch.Tensor, p: Params) -> Distribution:
        return dist.Normal(locs, p["scales"]).to_event(1)

    def covariance(self, p: Params) -> torch.Tensor:
        return torch.diag_embed(p["scales"] ** 2)

    def num_parameters(self, d: int) -> int:
        return d


class FullCovariance(DiagonalCovariance):
    r"""Σ_k = diag(s_k) L_k L_kᵀ diag(s_k), with L_k ~ LKJCholesky(D, η) and s_k as for the diagonal case."""

    sites = ("scales", "corr_chol")
    event_dims = {"scales": 1, "corr_chol": 2}

    def sample(self, model: GaussianMixture) -> Params:
        p = super().sample(model)
        p["corr_chol"] = pyro.sample("corr_chol", dist.LKJCholesky(model.data_dim,
                                                                  model.data_loc.new_tensor(model.config.lkj_concentration)))
        return p

    @staticmethod
    def scale_tril(p: Params) -> torch.Tensor:
        return p["scales"].unsqueeze(-1) * p["corr_chol"]  # diag(s) @ L, (..., K, D, D)

    def component(self, locs: torch.Tensor, p: Params) -> Distribution:
        return dist.MultivariateNormal(locs, scale_tril=self.scale_tril(p))

    def covariance(self, p: Params) -> torch.Tensor:
        L = self.scale_tril(p)
        return L @ L.transpose(-1, -2)

    def num_parameters(self, d: int) -> int:
        return d * (d + 1) // 2


COVARIANCES: Registry[type[DiagonalCovariance]] = Registry("covariance type")
COVARIANCES.register("diag")(DiagonalCovariance)
COVARIANCES.register("full")(FullCovariance)


@dataclass
class GaussianMixtureConfig:
    data_dim: int
    num_components: int = 3
    #: "diag" or "full" (a name in COVARIANCES)
    covariance: str = "full"
    #: "collapsed", "enumerated" or "amortized" (a name in ASSIGNMENTS)
    assignments: str = "collapsed"
    #: α of the symmetric Dirichlet prior on the weights (1: flat, so MAP weights are the MLE)
    concentration: float = 1.0
    #: s₀ / σ̂: prior std of each mean around the data mean, in units of the data's std
    loc_prior_scale: float = 3.0
    #: w: std of log s_kd around log σ̂_d; a proper prior keeps MAP scales off zero (no collapse)
    scale_prior_width: float = 1.0
    #: η of the LKJ prior on correlations (1: uniform over correlation matrices)
    lkj_concentration: float = 1.0

    def __post_init__(self) -> None:
        check_config(self, positive_int=("data_dim", "num_components"),
                     positive=("concentration", "loc_prior_scale", "scale_prior_width", "lkj_concentration"))
        check_choice(self, "covariance", COVARIANCES.names())
        check_choice(self, "assignments", ASSIGNMENTS.names())


@register_model("gaussian_mixture")
class GaussianMixture(LatentModel):
    r"""A K-component Gaussian mixture with priors on every global parameter.

    .. math::
        \pi \sim \mathrm{Dir}(\alpha 1_K), \quad
        \mu_k \sim \mathcal N(m_0, s_0^2 I), \quad
        s_{kd} \sim \mathrm{LogNormal}(\log \hat\sigma_d, w^2), \quad
        L_k \sim \mathrm{LKJCholesky}(D, \eta)\ \text{(full covariance only)},

        c_n \sim \mathrm{Cat}(\pi), \qquad
        x_n \mid c_n \sim \mathcal N(\mu_{c_n}, \Sigma_{c_n}), \quad
        \Sigma_k = \mathrm{diag}(s_k)\, L_k L_k^\top \mathrm{diag}(s_k)\ \ (\text{or } \mathrm{diag}(s_k)^2).

    m₀ and σ̂ are the training data's mean and per-dimension std (set by :meth:`init_from_data`), so the
    priors are weak on any scale; s₀ = ``loc_prior_scale`` σ̂. Every global is a latent site, guided by an
    autoguide (``map`` = AutoDelta gives MAP point estimates). The assignments are, per ``assignments``:
    summed out (``collapsed``: x_n ~ Σ_k π_k N(μ_k, Σ_k)), enumerated by ``TraceEnum_ELBO``
    (``enumerated``), or proposed by an amortized guide q(c|x) (``amortized``).

    Label switching: the likelihood is invariant to permuting components, so summaries order them by
    weight (:func:`component_order`); a unimodal variational posterior sits in one labelling.
    """

    Config = GaussianMixtureConfig
    local_site = None
    evaluator = "mixture"

    @classmethod
    def traits_for(cls, config: GaussianMixtureConfig) -> ModelTraits:
        scheme = ASSIGNMENTS[config.assignments]
        return ModelTraits(cls.name, None, ("weights", "locs", *COVARIANCES[config.covariance].sites),
                           "c" if scheme.guided else None, False, scheme.elbo, scheme.elbos, scheme.elbo_note)

    def __init__(self, config: GaussianMixtureConfig) -> None:
        super().__init__()
        self.config = config
        self.scheme = ASSIGNMENTS[config.assignments]
        self.covariance = COVARIANCES[config.covariance]()
        self.data_dim, self.num_components = config.data_dim, config.num_components
        self.latent_dim = config.num_components  # c is one-of-K
        traits = self.traits
        self.global_sites, self.local_discrete_site = traits.global_sites, traits.local_discrete_site
        self.default_elbo = traits.default_elbo
        self.register_buffer("data_loc", torch.zeros(config.data_dim))
        self.register_buffer("data_scale", torch.ones(config.data_dim))
        self.initial_values: Params | None = None

    @classmethod
    def example(cls, seed: int = 0) -> tuple[GaussianMixture, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.cat([torch.randn(10, 2, generator=g) - 3, torch.randn(10, 2, generator=g) + 3])
        model = cls(GaussianMixtureConfig(data_dim=2, num_components=2, assignments="amortized"))
        x = x.to(torch.get_default_dtype())
        model.init_from_data(x, seed=seed)
        return model, x

    # ------------------------------------------------------------------ data and initialisation

    def validate_training(self, x: object, name: str = "training data") -> torch.Tensor:
        x = self.validate(x, name)
        if x.shape[0] < self.num_components:
            raise ValueError(f"{name}: {x.shape[0]} points cannot fit {self.num_components} components; "
                             "use fewer components or more data")
        return x

    def init_from_data(self, x: object, seed: int | None = None) -> None:
        """Centre the priors on the data and seed the components by k-means++ (``initial_values``).

        ``seed`` fixes the k-means++ draws; ``None`` draws them from torch's global RNG.
        """
        x = self.validate_training(x)
        with torch.no_grad():
            self.data_loc.copy_(x.mean(0))
            self.data_scale.copy_(_data_std(x))
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        values = kmeans_init(x.detach().cpu(), self.num_components, self.covariance, seed)
        self.initial_values = {k: v.to(x.device) for k, v in values.items()}

    def get_extra_state(self) -> dict[str, Any]:
        """The k-means++ start travels with the state dict (saved fits can still be re-started from it)."""
        return {"initial_values": self.initial_values}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.initial_values = state.get("initial_values")

    # ------------------------------------------------------------------ the Pyro model

    def sample_globals(self) -> Params:
        K = self.num_components
        p = {"weights": pyro.sample("weights", dist.Dirichlet(self.data_loc.new_full((K,), self.config.concentration)))}
        with pyro.plate(COMPONENTS_PLATE, K, dim=-1):
            s0 = self.config.loc_prior_scale * self.data_scale
            p["locs"] = pyro.sample("locs", dist.Normal(self.data_loc, s0).to_event(1))
            p.update(self.covariance.sample(self))
        return p

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        p = self.sample_globals()
        # globals may carry leading particle dims: (..., K) for weights, (..., K, D) for locs
        lead = p["locs"].shape[:-2]
        prior_c = dist.Categorical(probs=p["weights"].reshape(lead + (1, self.num_components)))
        with data_plate(x.shape[0], total_size, x.device):
            if not self.scheme.sampled:
                comp = self.covariance.component(_lift(p["locs"], 1), {k: _lift(p[k], e) for k, e in
                                                                       self.covariance.event_dims.items()})
                pyro.sample("x", dist.MixtureSameFamily(prior_c, comp), obs=x)
                return
            infer = {"enumerate": "parallel"} if self.scheme.enumerated else {}
            c = pyro.sample("c", prior_c, infer=infer)
            chosen = {k: _index(p[k], c, e) for k, e in self.covariance.event_dims.items()}
            pyro.sample("x", self.covariance.component(_index(p["locs"], c, 1), chosen), obs=x)

    # ------------------------------------------------------------------ closed forms

    def log_joint(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """log π_k + log N(x_n; μ_k, Σ_k), shape (N, K), for one (unbatched) set of parameters."""
        comp = self.covariance.component(p["locs"], p)  # batch (K,)
        return p["weights"].clamp_min(1e-30).log() + comp.log_prob(x.unsqueeze(-2))

    def log_likelihood_at(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Collapsed log p(x_n | θ) = logsumexp_k [log π_k + log N(x_n; μ_k, Σ_k)], shape (N,)."""
        return torch.logsumexp(self.log_joint(x, p), -1)

    def responsibilities(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """p(c_n = k | x_n, θ), shape (N, K); each row sums to 1."""
        return torch.softmax(self.log_joint(x, p), -1)

    def _sample(self, n: int, *, mean: bool, guide: object) -> torch.Tensor:
        theta = self._globals_to_sample_from(guide, "a Gaussian mixture")
        c = torch.distributions.Categorical(probs=theta["weights"]).sample((n,))  # (n,) component of each draw
        locs = theta["locs"][c]  # (n, D): E[x | c]
        if mean:
            return locs
        return self.covariance.component(locs, {k: theta[k][c] for k in self.covariance.sites}).sample()

    def component_covariances(self, p: Params) -> torch.Tensor:
        return self.covariance.covariance(p)

    def num_free_parameters(self) -> int:
        K, D = self.num_components, self.data_dim
        return (K - 1) + K * D + K * self.covariance.num_parameters(D)


def _lift(t: torch.Tensor, event_dim: int) -> torch.Tensor:
    """(..., K, <event>) -> (..., 1, K, <event>): a singleton for the data plate left of the components."""
    return t.unsqueeze(-2 - event_dim)


def _index(t: torch.Tensor, c: torch.Tensor, event_dim: int) -> torch.Tensor:
    """t[..., c, <event>] for t of shape (..., K, <event>) and c of any batch shape (enumeration-safe)."""
    return Vindex(_lift(t, event_dim))[(Ellipsis, c) + (slice(None),) * event_dim]


def _data_std(x: torch.Tensor) -> torch.Tensor:
    """σ̂: each dimension's std (floored at 1e-3; ones for a single point), the scale the priors are set on."""
    return x.std(0).clamp_min(1e-3) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)


def component_order(p: Params) -> torch.Tensor:
    """Component indices by decreasing weight: a canonical labelling for summaries (label switching)."""
    return torch.argsort(p["weights"].detach(), descending=True)


def reorder(p: Params, order: torch.Tensor, batch_dims: int = 0) -> Params:
    """Parameters with their components permuted by ``order``; the component dim follows ``batch_dims``."""
    return {k: v.index_select(batch_dims, order) for k, v in p.items()}


@torch.no_grad()
def kmeans_init(x: torch.Tensor, k: int, covariance: DiagonalCovariance, seed: int, iters: int = 20) -> Params:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) refined by Lloyd iterations, as initial values.

    Means are the centres; weights the cluster shares (smoothed by one point); scales each cluster's
    per-dimension std (the data's where a cluster has fewer than 2 points); correlations the identity.
    Seeds spread over the data, so no component starts on top of another (the usual cause of collapse).
    """
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    centres = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(-1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=g)]])
    for _ in range(iters):
        label = torch.cdist(x, centres).argmin(-1)
        for j in range(k):
            if (label == j).any():
                centres[j] = x[label == j].mean(0)
    label = torch.cdist(x, centres).argmin(-1)
    counts = torch.bincount(label, minlength=k).to(x.dtype)
    data_sd = _data_std(x)
    scales = torch.stack([x[label == j].std(0) if counts[j] >= 2 else data_sd for j in range(k)])
    scales = torch.maximum(scales, 0.05 * data_sd)  # a cluster of identical points still gets a width
    values = {"weights": (counts + 1) / (counts + 1).sum(), "locs": centres.clone(), "scales": scales}
    if "corr_chol" in covariance.sites:
        values["corr_chol"] = torch.eye(d, dtype=x.dtype).expand(k, d, d).clone()
    return values


def make_mixture_data(
    num_points: int, data_dim: int, num_components: int, separation: float = 6.0, seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw from a mixture with known weights, means and full covariances; returns (x, truth).

    Every pair of means is at least ``separation`` apart (component standard deviations lie in
    [0.5, 1.5], so ``separation`` = 6 keeps components well apart); covariances are random rotations of
    diag(U(0.5, 1.5)²); weights are within a factor of 2 of each other. ``truth`` holds ``weights``,
    ``locs``, ``covariances`` and the drawn ``labels``.
    """
    if data_dim < 1 or num_points < 1:
        raise ValueError(f"need data_dim >= 1 and num_points >= 1, got {data_dim}, {num_points}")
    if num_components < 1:
        raise ValueError(f"the number of components must be >= 1, got {num_components}")
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 + torch.rand(num_components, generator=g, dtype=dtype)  # shares within a factor of 2
    weights = weights / weights.sum()
    locs = torch.zeros(0, data_dim, dtype=dtype)
    tries = 0
    while len(locs) < num_components:  # rejection: every pair of means at least ``separation`` apart
        tries += 1
        if tries > 10_000:
            raise ValueError(f"could not place {num_components} means {separation} apart")
        m = separation * math.sqrt(num_components) * torch.randn(1, data_dim, generator=g, dtype=dtype)
        if len(locs) == 0 or torch.cdist(m, locs).min() >= separation:
            locs = torch.cat([locs, m])
    covs = []
    for _ in range(num_components):
        q, _ = torch.linalg.qr(torch.randn(data_dim, data_dim, generator=g, dtype=dtype))
        sd = 0.5 + torch.rand(data_dim, generator=g, dtype=dtype)
        covs.append(q @ torch.diag(sd ** 2) @ q.T)
    covariances = torch.stack(covs)
    labels = torch.multinomial(weights, num_points, replacement=True, generator=g)
    chol = torch.linalg.cholesky(covariances)
    eps = torch.randn(num_points, data_dim, generator=g, dtype=dtype)
    x = locs[labels] + (chol[labels] @ eps.unsqueeze(-1)).squeeze(-1)
    return x, {"weights": weights, "locs": locs, "covariances": covariances, "labels": labels}

"""Variational autoencoder decoders as Pyro models, with swappable likelihoods and priors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import Distribution, constraints
from torch import nn

from pyro_lvm.config import ConfigError, check_choice, check_config, check_parameter_memory, dense_parameters
from pyro_lvm.nn import ACTIVATIONS, ARCHITECTURES, MLP, decoder_network
from pyro_lvm.registry import Registry, register_model, split_spec
from pyro_lvm.runtime import seeded

from .base import LatentModel, data_plate, row_blocks

PRIORS: Registry[type[nn.Module]] = Registry("prior")
DECODERS: Registry[type[nn.Module]] = Registry("decoder")


@dataclass
class VAEConfig:
    data_dim: int
    latent_dim: int = 40
    hidden: tuple[int, ...] = (300, 300)
    #: likelihood: "bernoulli" (binary data, logits) or "gaussian" (continuous data)
    decoder: str = "bernoulli"
    #: networks (pyro_lvm.nn.ARCHITECTURES): "mlp", "gated-mlp", or "conv" / "gated-conv" for 28x28 images
    architecture: str = "mlp"
    activation: str = "relu"
    #: Gaussian decoder's log-scale: "pixel" (one learned per dimension) or "shared" (one for all)
    gaussian_scale: str = "pixel"
    #: prior p(z): a name in PRIORS ("standard", "mog", "vamp"); "NAME:K" also sets prior_components to K
    prior: str = "standard"
    #: components of a learned mixture prior: Gaussians of "mog", pseudo-inputs of "vamp"
    prior_components: int = 10

    def __post_init__(self) -> None:
        self.prior, k = parse_prior(self.prior)  # "vamp:500" -> prior "vamp", 500 components
        self.prior_components = k if k is not None else self.prior_components
        check_config(self, positive_int=("data_dim", "latent_dim", "prior_components"))
        self.hidden = tuple(self.hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"layer sizes must be integers >= 1, got {self.hidden}")
        check_choice(self, "decoder", DECODERS.names())
        check_choice(self, "architecture", ARCHITECTURES.names())
        check_choice(self, "activation", ACTIVATIONS)
        check_choice(self, "gaussian_scale", ("pixel", "shared"))
        widths = ARCHITECTURES[self.architecture][1]
        if widths is not None and self.data_dim not in widths:
            raise ConfigError("architecture", f"{self.architecture!r} makes outputs of width {widths}, but "
                              f"data_dim is {self.data_dim}; use 'mlp' or 'gated-mlp'")
        if widths is None:  # before any layer is allocated: --hidden 100000000 asked for hundreds of GB
            check_parameter_memory("hidden", self.parameter_count(), f"a decoder of hidden sizes {self.hidden} "
                                   f"(latent_dim {self.latent_dim}, data_dim {self.data_dim})")

    def parameter_count(self) -> int:
        """The decoder network's weights and biases, estimated from the config alone (dense architectures; a gated
        layer has two): what :func:`pyro_lvm.config.check_parameter_memory` weighs before anything is built."""
        if ARCHITECTURES[self.architecture][1] is not None:
            return 0  # the fixed 28x28 convolutional networks: small, and not sized by hidden
        gated = 2 if self.architecture.startswith("gated") else 1
        return dense_parameters((self.latent_dim, *self.hidden, self.data_dim)) * gated


def parse_prior(spec: str) -> tuple[str, int | None]:
    """``"vamp:500"`` -> ("vamp", 500); ``"standard"`` -> ("standard", None). A ``ConfigError`` naming ``prior`` for
    an unknown name or a K that is not an integer >= 1 (the config and the experiment's flag share this check)."""
    try:
        name, k = split_spec(spec, "prior", "K (components)")
    except ValueError as e:
        raise ConfigError("prior", str(e).removeprefix("prior ")) from None
    if name not in PRIORS:
        raise ConfigError("prior", f"unknown prior {name!r}; valid: {', '.join(PRIORS.names())} (each NAME or NAME:K)")
    return name, k


def _network(config: VAEConfig) -> nn.Module:
    return decoder_network(config.architecture, config.latent_dim, config.hidden, config.data_dim, config.activation)


@DECODERS.register("bernoulli")
class BernoulliDecoder(nn.Module):
    r"""p(x|z) = Π_d Bernoulli(x_d; σ(f_θ(z)_d)), for binary data."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.net = _network(config)

    def forward(self, z: torch.Tensor) -> Distribution:
        # no per-call validation of the logits (a NaN would print a tensor); the observed data are checked to be
        # 0/1 by validate, at the library's boundary and again in VAE.forward for callers who bypass it
        return dist.Bernoulli(logits=self.net(z), validate_args=False).to_event(1)

    @staticmethod
    def validate(x: torch.Tensor, name: str) -> None:
        if bool(torch.count_nonzero(x * (x - 1))):  # 0 exactly where x is 0 or 1 (NaN and inf are not): one pass
            bad = int((~((x == 0) | (x == 1))).any(-1).sum())
            raise ValueError(f"{name}: the Bernoulli decoder needs binary 0/1 data, but {bad} rows have other "
                             "values; binarize the data or use --decoder gaussian")

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z))

    def log_prob_rows(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r"""log p(x|z) = Σ_d log σ(s_d l_d) = −Σ_d softplus(−s_d l_d), s = 2x − 1, for z (..., k) and binary x
        broadcastable to (..., D): what ``self(z).log_prob(x)`` gives, in one in-place pass over the logits l
        (sign flip, softplus, sum) instead of binary cross-entropy's several. Each term −softplus(·) ≤ 0 is summed
        as is (no Σ x·l − Σ softplus(l), which would cancel). softplus(t) is taken as t above −log eps, where
        log1p(e^t) − t < eps: exact to the dtype's rounding, and e^t never overflows."""
        logits = _forward_inplace(self.net, z)
        threshold = -math.log(torch.finfo(logits.dtype).eps)
        flipped = logits.mul_(1.0 - 2.0 * x)  # −s l
        if torch.is_grad_enabled():
            return nn.functional.softplus(flipped, threshold=threshold).sum(-1).neg_()
        # in place: a second block-sized buffer, freed with the first, would hand both back to the OS (glibc
        # trims a heap top above twice its mmap threshold) and page-fault them in again at every block
        return torch.ops.aten.softplus.out(flipped, 1.0, threshold, out=flipped).sum(-1).neg_()

    #: VampPrior pseudo-inputs: where data live (hardtanh to [0, 1], as Tomczak & Welling's code) and their
    #: initial N(mean, sd²) (theirs: 0.05, 0.01, near-blank images)
    PSEUDO_INIT = (0.05, 0.01)

    @staticmethod
    def to_data_space(u: torch.Tensor) -> torch.Tensor:
        return nn.functional.hardtanh(u, 0.0, 1.0)


@DECODERS.register("gaussian")
class GaussianDecoder(nn.Module):
    r"""p(x|z) = Π_d N(x_d; f_θ(z)_d, s_d²) with learned log-scales (per dimension or shared)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.net = _network(config)
        self.log_scale = nn.Parameter(torch.zeros(config.data_dim if config.gaussian_scale == "pixel" else 1))

    def forward(self, z: torch.Tensor) -> Distribution:
        scale = self.log_scale.clamp(min=-7.0).exp()  # floor avoids degenerate variance on constant pixels
        return dist.Normal(self.net(z), scale, validate_args=False).to_event(1)

    @staticmethod
    def validate(x: torch.Tensor, name: str) -> None:
        return None

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    #: VampPrior pseudo-inputs: unconstrained, starting near the origin
    PSEUDO_INIT = (0.0, 0.01)

    @staticmethod
    def to_data_space(u: torch.Tensor) -> torch.Tensor:
        return u


@PRIORS.register("standard")
class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.register_buffer("zero", torch.zeros(config.latent_dim))

    def forward(self) -> Distribution:
        return dist.Normal(self.zero, 1.0).to_event(1)


@PRIORS.register("mog")
class MixturePrior(nn.Module):
    r"""A learned mixture of Gaussians, p(z) = Σ_c π_c N(z; m_c, diag s_c²): one answer to the prior hole."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c, k = config.prior_components, config.latent_dim
        self.logits = nn.Parameter(torch.zeros(c))
        self.locs = nn.Parameter(torch.randn(c, k))  # torch's global RNG: a seed fixes it
        self.log_scales = nn.Parameter(torch.zeros(c, k))

    def forward(self) -> Distribution:
        comp = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), comp)


class DiagonalGaussianMixture(dist.TorchDistribution):
    r"""(1/K) Σ_k N(z; μ_k, diag σ_k²) with equal weights, event shape (k,).

    ``log_prob`` expands the Mahalanobis term, Σ_d (z_d − μ_kd)²/σ_kd² = (z²)·(1/σ_k²) − 2 z·(μ_k/σ_k²) +
    Σ_d μ_kd²/σ_kd², into two (…, k) @ (k, K) products, so scoring S×B draws never holds an (S, B, K, k)
    tensor: with K = 500 pseudo-inputs and k = 40 that would be 25 times the decoder's (S, B, 784) output,
    which is what the IWAE evaluator sizes its chunks by. The expansion costs float32 round-off of about
    1e-7 × the largest Σ_d z_d²/σ_kd² among the components that dominate the log-sum-exp: under 1e-3 nats
    for trained priors (the tests compare it with MixtureSameFamily in float64).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = loc, scale  # (K, k) each
        super().__init__(torch.Size(), loc.shape[-1:], validate_args=validate_args)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        precision = self.scale.pow(-2)  # (K, k)
        maha = z.pow(2) @ precision.T - 2 * z @ (self.loc * precision).T  # (..., K)
        const = (self.loc.pow(2) * precision).sum(-1) + 2 * self.scale.log().sum(-1)  # (K,)
        k = self.loc.shape[-1]
        log_comp = -0.5 * (maha + const + k * math.log(2 * math.pi))
        return torch.logsumexp(log_comp, -1) - math.log(self.loc.shape[0])

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            c = torch.randint(self.loc.shape[0], tuple(sample_shape), device=self.loc.device)
            return self.loc[c] + self.scale[c] * torch.randn(c.shape + self.loc.shape[-1:], dtype=self.loc.dtype,
                                                            device=self.loc.device)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.mean(0)


@PRIORS.register("vamp")
class VampPrior(nn.Module):
    r"""The VampPrior (Tomczak & Welling 2018): a mixture of the guide's posteriors at K learned pseudo-inputs,

    .. math:: p_\lambda(z) = \frac1K \sum_{k=1}^K q_\phi(z \mid u_k),

    with u_k in data space (``decoder.to_data_space`` of free parameters: [0, 1] for binary data) and q_φ the
    encoder the guide trains. The prior therefore shares the guide's encoder, which is bound to it when the guide
    is built (:func:`pyro_lvm.build_guide` calls :meth:`VAE.bind_guide`); the model alone has no prior. The guide
    supplies the component through ``prior_component(u)``: its Gaussian q(z|u) for the diagonal and full-covariance
    guides, and for flow guides the Gaussian base q₀(z|u) before the flow (a flow without an analytic inverse
    cannot score an arbitrary z, and the paper's prior is a mixture of the encoder's Gaussians).

    The KL term KL(q(z|x) ‖ p(z)) then has no closed form: every ELBO estimates it by Monte Carlo,
    log q(z|x) − log p(z) at the drawn z. ``--elbo meanfield`` (TraceMeanField_ELBO) would be wrong to promise an
    analytic KL here: Pyro finds none registered and falls back to the same estimate (a test checks that the two
    losses agree draw for draw).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        decoder = DECODERS[config.decoder]
        mean, sd = decoder.PSEUDO_INIT
        # torch's global RNG, like every other initial weight of the model: a seed fixes it
        self.pseudo_inputs = nn.Parameter(mean + sd * torch.randn(config.prior_components, config.data_dim))
        self._to_data_space = decoder.to_data_space
        self._guide: tuple[nn.Module, ...] = ()  # the guide whose encoder it shares: not a submodule

    def bind(self, guide: nn.Module) -> None:
        if not callable(getattr(guide, "prior_component", None)):
            spec = getattr(guide, "spec", type(guide).__name__)
            raise ValueError(f"prior: 'vamp' pushes its pseudo-inputs through the guide's encoder, and guide {spec!r} "
                             "has none; use an amortized or flow guide, or another prior")
        self._guide = (guide,)

    def inputs(self) -> torch.Tensor:
        """The pseudo-inputs u_k in data space, (K, data_dim)."""
        return self._to_data_space(self.pseudo_inputs)

    def forward(self) -> Distribution:
        if not self._guide:
            raise ValueError("prior: the VampPrior is a mixture of the guide's q(z|u_k) and no guide is bound; build "
                             "the guide for this model (pyro_lvm.build_guide(spec, model)) before using the model")
        component = self._guide[0].prior_component(self.inputs())  # batch (K,), event (k,)
        base = getattr(component, "base_dist", None)
        if isinstance(component, dist.Independent) and isinstance(base, dist.Normal):
            return DiagonalGaussianMixture(base.loc, base.scale)
        logits = self.pseudo_inputs.new_zeros(component.batch_shape[0])
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), component)


def _forward_inplace(net: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``net(z)`` for scoring without gradients: an :class:`~pyro_lvm.nn.MLP`'s ReLUs applied in place on each
    layer's fresh output (no copy per layer); any other network as called."""
    layers = getattr(net, "net", None)
    if type(net) is not MLP or not isinstance(layers, nn.Sequential) or torch.is_grad_enabled():
        return net(z)
    h = z
    for layer in layers:
        h = h.relu_() if type(layer) is nn.ReLU and h is not z else layer(h)
    return h


def _diagonal_normal(d: Distribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(loc, scale) of ``Normal(loc, scale).to_event(1)``, else ``None``."""
    if (isinstance(d, torch.distributions.Independent) and d.reinterpreted_batch_ndims == 1
            and type(d.base_dist) in (dist.Normal, torch.distributions.Normal)):
        return d.base_dist.loc, d.base_dist.scale
    return None


def _normal_log_prob(eps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, diag scale²) summed over the last dim, from eps = (z − loc) / scale: one pass over the draws
    (torch's ``Normal.log_prob`` makes six, and checks its argument)."""
    k = eps.shape[-1]
    return (torch.linalg.vector_norm(eps, dim=-1).square_().mul_(-0.5)
            - scale.log().expand(eps.shape[-scale.dim():]).sum(-1) - 0.5 * k * math.log(2 * math.pi))


@register_model("vae")
class VAE(LatentModel):
    r"""A variational autoencoder's generative model.

    .. math:: z_n \sim p(z), \qquad x_n \mid z_n \sim p_\theta(x_n \mid f_\theta(z_n))

    with p(z) from :data:`PRIORS` (standard normal by default; a learned mixture ``mog``; the VampPrior ``vamp``,
    which shares the guide's encoder) and p_θ(x|z) from :data:`DECODERS` (Bernoulli logits for binary data,
    Gaussian with learned scales for continuous data).
    """

    Config = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.data_dim, self.latent_dim = config.data_dim, config.latent_dim
        self.decoder = DECODERS[config.decoder](config)
        self.prior = PRIORS[config.prior](config)

    @classmethod
    def example(cls, seed: int = 0) -> tuple[VAE, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(16, 12, generator=g) < 0.3).to(torch.get_default_dtype())
        with seeded(seed):
            return cls(VAEConfig(data_dim=12, latent_dim=3, hidden=(8,))), x

    def validate(self, x: object, name: str = "data") -> torch.Tensor:
        x = super().validate(x, name)
        for _, rows in row_blocks(x):  # streamed data: block by block
            self.decoder.validate(rows, name)
        return x

    def bind_guide(self, guide: nn.Module) -> None:
        """Hand the guide to a prior that uses it (the VampPrior's encoder); other priors ignore it."""
        if callable(getattr(self.prior, "bind", None)):
            self.prior.bind(guide)

    def init_from_data(self, x: object, seed: int | None = None) -> None:
        """Start the VampPrior's pseudo-inputs at K distinct training points drawn with ``seed`` (Tomczak &
        Welling's data initialisation; the default is their N(0.05, 0.01²) noise). Other priors: nothing."""
        if not isinstance(self.prior, VampPrior):
            return
        x = self.validate_training(x)
        k = self.prior.pseudo_inputs.shape[0]
        if k > len(x):
            raise ValueError(f"x: the VampPrior has {k} pseudo-inputs but only {len(x)} training points were given")
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0 if seed is None else seed))[:k]
        with torch.no_grad():
            self.prior.pseudo_inputs.copy_(x[pick.to(x.device)])

    def forward(self, x: torch.Tensor, total_size: int | None = None) -> None:
        from pyro_lvm.train import data_checked  # here: pyro_lvm.train imports the models

        # fit checked its data once as they came in; a plain Pyro loop (SVI + Trace_ELBO) gets the check every call
        if not torch.jit.is_tracing() and not data_checked():
            self.decoder.validate(x, "data")
        prior = self.prior()
        with data_plate(x.shape[0], total_size, x.device):
            z = pyro.sample("z", prior)  # (..., N, k)
            pyro.sample("x", self.decoder(z), obs=x)

    #: bytes of the decoder's widest activation per row block in :meth:`importance_sampler`: a block of rows
    #: (668 rows of MNIST's 784 pixels in float32) stays in a core's L2 cache between the GEMM that writes it
    #: and the likelihood's pass that reads it, and the GEMMs are tall enough to run at full speed
    EVAL_BLOCK_BYTES = 2 << 20

    def importance_sampler(self, guide: object, x: torch.Tensor) -> Callable[[int], dict[str, torch.Tensor]] | None:
        r"""The fused importance pass of :func:`pyro_lvm.evaluate.per_point_bounds` for the points ``x`` (N, D):
        a function of S that draws z ~ q(z|x) (S, N, k) and returns ``log_lik``, ``log_prior``, ``log_q`` (S, N)
        and ``z``, what :func:`~pyro_lvm.evaluate.log_weight_terms` returns, from the same random numbers (same
        shapes, same order) without Pyro traces. The encoder runs once for the points, however many draws
        follow; the decoder sees the draws in row blocks of :attr:`EVAL_BLOCK_BYTES` and its Bernoulli
        likelihood is scored in one fused pass (:meth:`BernoulliDecoder.log_prob_rows`; other decoders by their
        distribution's ``log_prob``).

        ``None`` (score by traces instead) unless this is the plain VAE's ``forward`` and ``guide`` an amortized
        guide whose ``forward`` samples the local site from ``guide.distribution(x)`` in the data plate, as
        :class:`~pyro_lvm.guides.amortized.AmortizedGuide`'s does."""
        from pyro_lvm.guides.amortized import AmortizedGuide
        from pyro_lvm.train import data_checked  # here: pyro_lvm.train imports the models

        if (type(self).forward is not VAE.forward or not isinstance(guide, AmortizedGuide)
                or type(guide).forward is not AmortizedGuide.forward or guide.site != self.local_site):
            return None
        if not data_checked():
            self.decoder.validate(x, "data")
        q, prior = guide.distribution(x), self.prior()
        widest = max(self.data_dim, *self.config.hidden)
        rows = max(1, self.EVAL_BLOCK_BYTES // (widest * x.element_size()))
        score = getattr(self.decoder, "log_prob_rows", None)

        q_normal, prior_normal = _diagonal_normal(q), _diagonal_normal(prior)

        def draw(num_samples: int) -> dict[str, torch.Tensor]:
            if q_normal is not None:  # Normal.rsample's draw, z = loc + eps * scale, keeping eps for log q
                loc, scale = q_normal
                eps = torch.empty((num_samples, *loc.shape), dtype=loc.dtype, device=loc.device).normal_()
                log_q = _normal_log_prob(eps, scale)
                z = eps.mul_(scale).add_(loc)  # in place: eps is spent
            else:
                z = q.rsample((num_samples,)) if q.has_rsample else q.sample((num_samples,))  # as pyro.sample draws
                log_q = q.log_prob(z)
            if prior_normal is None:
                log_prior = prior.log_prob(z)
            else:
                p_loc, p_scale = prior_normal
                standard = bool((p_loc == 0).all()) and bool((p_scale == 1).all())  # N(0, I): z is its own eps
                log_prior = _normal_log_prob(z if standard else (z - p_loc) / p_scale, p_scale)
            log_lik = z.new_empty(z.shape[:2])
            # blocks of ~rows draws: one point's draws at a time (a 2-D strided view, which a GEMM reads as is), or
            # all draws of several points when S is small (copied: a strided 3-D input costs F.linear 4x)
            tiles: list[tuple[slice, int | slice]]
            if num_samples >= rows:
                tiles = [(slice(s0, s0 + rows), n) for n in range(z.shape[1]) for s0 in range(0, num_samples, rows)]
            else:
                per = max(1, rows // num_samples)
                tiles = [(slice(None), slice(n0, n0 + per)) for n0 in range(0, z.shape[1], per)]
            for s, n in tiles:
                zb, xb = z[s, n], x[n]
                zb = zb if zb.dim() == 2 else zb.contiguous()
                log_lik[s, n] = score(zb, xb) if score is not None else self.decoder(zb).log_prob(xb)
            return {"log_lik": log_lik, "log_prior": log_prior, "log_q": log_q, "z": z}

        return draw

    def _sample(self, n: int, *, mean: bool, guide: object) -> torch.Tensor:
        z = self.prior().sample((n,))
        return self.decoder.mean(z) if mean else self.decoder(z).sample()

    @property
    def num_decoder_params(self) -> int:
        return sum(p.numel() for p in self.decoder.parameters())

r"""Amortized normalizing-flow guides.

A diagonal Gaussian base from the encoder is pushed through K transforms whose parameters are
produced by hypernetworks from the encoder's hidden features h(x):

.. math::
    z_0 \sim \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2), \qquad
    z_K = f_K \circ \dots \circ f_1(z_0; h(x)),
    \qquad \log q_K(z_K \mid x) = \log q_0(z_0 \mid x)
        - \sum_{k=1}^K \log \left|\det \frac{\partial f_k}{\partial z_{k-1}}\right|

Each family is a registry entry (``planar:K``, ``radial:K``, ``iaf:K``, ``householder:K``, ``spline:K``,
``sylvester-o:K``, ``sylvester-h:K``, ``sylvester-t:K``):
a transform factory handed to :class:`AmortizedFlowGuide`, as Pyro's ``AutoIAFNormal`` is a factory handed
to ``AutoNormalizingFlow``, with the two halves of Pyro's ``.condition(h)``: the per-point parameters a
conditional transform computes from the context h, and the transform those parameters give. Per-point
inference (:func:`pyro_lvm.gaps.inference_gaps`) frees the former, one set per data point.

Sylvester flows (van den Berg, Hasenclever, Tomczak & Welling 2018) generalise the planar flow's single hidden
unit to M of them:

.. math::
    z' = z + Q R \tanh(\tilde R Q^\top z + b), \qquad
    \log\left|\det \frac{\partial z'}{\partial z}\right|
        = \sum_{i=1}^M \log\left(1 + r_{ii} \tilde r_{ii} \tanh'\big(\tilde R Q^\top z + b\big)_i\right)

with Q (Z×M) of orthonormal columns, R, R̃ (M×M) upper triangular and b ∈ ℝᴹ, all produced per point by a
hypernetwork. By Sylvester's determinant identity det(I_Z + A B) = det(I_M + B A) the Jacobian determinant is
det(I_M + diag(tanh') R̃ QᵀQ R) = det(I_M + diag(tanh') R̃ R), triangular, hence the sum of logs; it needs QᵀQ = I.
The three families differ in how Q is kept orthonormal: by iterative orthogonalisation (``sylvester-o``, M ≤ Z
columns), as a product of Householder reflections (``sylvester-h``), or as a fixed permutation alternating
between the identity and the reversal (``sylvester-t``: then R, R̃ are the triangular maps themselves).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.distributions import Distribution, constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms.householder import ConditionedHouseholder
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.nn import DenseNN
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributions import Transform

from pyro_lvm.models.base import LatentModel
from pyro_lvm.registry import Registry

from .amortized import DiagonalGaussianGuide
from .config import GuideConfig
from .registry import register_guide

#: factory(latent_dim, context_dim, hidden_dims) -> a (conditional) transform module
TransformFactory = Callable[[int, int, list[int]], nn.Module]
#: (transform module, context h (N, C)) -> its per-point parameters {name: (N, ...)}
LocalParameters = Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]
#: (transform module, per-point parameters) -> the transform they give (``module.condition(h)`` at h's parameters)
FromParameters = Callable[[nn.Module, dict[str, torch.Tensor]], Transform]


class Reverse(Transform):
    """z ↦ (z_k, …, z_1): the coordinate order reversed, a volume-preserving bijection (log|det| = 0).

    Pyro's ``Permute(torch.arange(k - 1, -1, -1))`` does the same through an index tensor it keeps outside any
    module's buffers, so a guide moved to a GPU still holds it on the CPU and its first step fails; ``flip`` has no
    state and runs on whatever device z is on."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    volume_preserving = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reverse)

    def __hash__(self) -> int:
        return hash(Reverse)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.flip(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[:-1])

    def with_cache(self, cache_size: int = 1) -> Reverse:
        return self if self._cache_size == cache_size else Reverse(cache_size=cache_size)


@dataclass(frozen=True)
class HypernetOutputs:
    """Per-point parameters of a transform whose hypernetwork ``module.nn`` maps h to a tuple of tensors (planar:
    b, u, w; radial: x₀, α', β'): the outputs themselves, named ``names``. Freed per point, they make the flow
    a per-point planar (radial) flow with no hypernetwork: the family the amortized one is a subset of. (A class,
    not a closure, so a guide holding it pickles.)"""

    names: tuple[str, ...]

    def __call__(self, module: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, module.nn(h), strict=True))


def _planar(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return ConditionedPlanar((p["bias"], p["u"], p["w"]))  # what ConditionalPlanar.condition(h) builds


def _radial(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return ConditionedRadial((p["x0"], p["alpha"], p["beta"]))


def _householder_vectors(module: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """``u``: the unnormalised reflection vectors (N, count, k), as ``ConditionalHouseholder.condition`` makes them."""
    out = module.nn(h)
    return {"u": out.unsqueeze(-2) if module.count_transforms == 1 else torch.stack(out, dim=-2)}


def _householder(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return ConditionedHouseholder(p["u"])


def free_context(module: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autoregressive flows (IAF, splines): the per-point input is the context h (N, C) itself, fed to the
    conditional MADE with every point's own copy. Freed per point, the family is "this MADE conditioned on a free
    context": a subset of a fully free IAF (whose weights would be per point too), so the approximation gap it
    measures is an upper bound on that of the amortization-free family."""
    return {"context": h}


def _conditioned_on_context(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return module.condition(p["context"])


# ---------------------------------------------------------------------------------------------------------------------
# Sylvester flows (van den Berg et al. 2018)


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log cosh x = |x| + log(1 + e^{−2|x|}) − log 2, without overflow."""
    return x.abs() + F.softplus(-2 * x.abs()) - math.log(2.0)


def one_plus_tanh_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 + tanh(a) tanh(b) = cosh(a + b) / (cosh a cosh b), > 0 for all finite a, b.

    Through the logs there is no cancellation where tanh(a) tanh(b) → −1 (float32 rounds tanh to ±1 beyond
    |x| ≈ 9, where 1 + tanh(a) tanh(b) would come out 0 and the log-determinant −∞); clamped at the dtype's
    smallest normal number, reached only beyond |a|, |b| ≈ 44 in float32 (350 in float64)."""
    return torch.exp(_log_cosh(a + b) - _log_cosh(a) - _log_cosh(b)).clamp_min(torch.finfo(a.dtype).tiny)


def _bjorck(q: torch.Tensor, max_iterations: int, tolerance: float) -> torch.Tensor:
    """The iteration of :func:`orthonormalize` on (B, Z, M), without gradients."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    q = q / torch.linalg.matrix_norm(q)[:, None, None]
    for step in range(max_iterations + 1):
        gram = q.mT @ q
        error = torch.linalg.matrix_norm(eye - gram)  # (B,)
        if not bool((error > tolerance).any()):  # NaN compares False: passed on, not iterated on
            return q
        if step < max_iterations:
            q = torch.baddbmm(q, q, gram, beta=1.5, alpha=-0.5)  # Q (I + (I − QᵀQ)/2) = 1.5 Q − 0.5 Q QᵀQ
    raise RuntimeError(f"orthonormalize: ‖QᵀQ − I‖_F = {error.max().item():.3g} > tolerance {tolerance:.3g} after "
                       f"{max_iterations} iterations; the hypernetwork output is numerically rank-deficient")


class _PolarFactor(torch.autograd.Function):
    """Q = polar factor of A (B, Z, M): forward by :func:`_bjorck`, backward by implicit differentiation."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, max_iterations: int, tolerance: float) -> torch.Tensor:  # type: ignore[override]
        q = _bjorck(a, max_iterations, tolerance)
        ctx.save_for_backward(a, q)
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        a, q = ctx.saved_tensors
        p = q.mT @ a
        # NaN (a diverged network, passed through by the forward) gets a NaN gradient, not an eigh failure
        bad = ~torch.isfinite(p).all(-1).all(-1)[:, None, None]
        p = torch.where(bad, torch.eye(p.shape[-1], dtype=p.dtype, device=p.device), (p + p.mT) / 2)
        s, v = torch.linalg.eigh(p)  # P = V diag(s) Vᵀ, s the singular values of A
        qg = q.mT @ g
        y = v @ ((v.mT @ qg @ v) / (s.unsqueeze(-1) + s.unsqueeze(-2))) @ v.mT  # P Y + Y P = Qᵀ Ḡ
        grad = q @ (y - y.mT)
        if a.shape[-1] < a.shape[-2]:  # (I − QQᵀ) vanishes for square A
            grad = grad + (g - q @ qg) @ (v / s.unsqueeze(-2)) @ v.mT  # (I − QQᵀ) Ḡ P⁻¹
        return grad.masked_fill(bad, math.nan), None, None


def orthonormalize(q: torch.Tensor, max_iterations: int = 100, tolerance: float | None = None) -> torch.Tensor:
    r"""The matrix with orthonormal columns nearest to each ``q`` (..., Z, M), M ≤ Z: its polar factor U Vᵀ
    (q = U S Vᵀ), by the iteration of Björck & Bowie (1971) that van den Berg et al. (2018) use:

    .. math::
        Q_0 = q / \|q\|_F, \qquad Q_{t+1} = Q_t \big(I + \tfrac12 (I - Q_t^\top Q_t)\big)

    Each singular value σ of Q_t maps to σ(3 − σ²)/2: Frobenius normalisation puts them all in (0, 1], where
    small ones grow by 3/2 a step and ones near 1 converge quadratically (σ = 1 + ε ↦ 1 − 3ε²/2), so
    ‖QᵀQ − I‖_F, the error checked before each step, reaches rounding in a few tens of steps (25–37 for square
    random 3×3 to 500×500 matrices, float32 or float64; 27–38 for the 40×40 outputs of a fresh
    sylvester-o guide with M = Z = 40).
    Iterates until that error is at most ``tolerance`` for every matrix in the batch; the default, 64·√M·ε of
    the dtype, is ~30× the rounding floor measured on such matrices (≈ 2√M·ε: 7e-7 at M = 40 in float32, 1e-15
    in float64), so it is always reached, and the first step below it lands on that floor in all but rare
    cases: the float64 checks of the log-determinant identity at 1e-8 hold with room to spare. NaN passes
    through (a diverged network is reported where it arises, not here).

    The gradient is the polar factor's own, by implicit differentiation rather than autograd through the
    unrolled steps (2.4× cheaper forward and backward for 100 40×40 matrices on one CPU thread, and no
    per-step memory): with A = Q P, P = QᵀA symmetric positive definite, dQ = QΩ + (I − QQᵀ) dA P⁻¹ where
    PΩ + ΩP = QᵀdA − dAᵀQ, so the pullback of Ḡ is Q(Y − Yᵀ) + (I − QQᵀ) Ḡ P⁻¹ with PY + YP = QᵀḠ, solved in
    P's eigenbasis (Y_ij = C_ij / (s_i + s_j), C = QᵀḠ in that basis). Once differentiable.

    :raises RuntimeError: not converged in ``max_iterations`` (only for a q numerically of rank < M).
    """
    shape, m = q.shape, q.shape[-1]
    if tolerance is None:
        tolerance = 64 * math.sqrt(m) * torch.finfo(q.dtype).eps
    return _PolarFactor.apply(q.reshape(-1, *shape[-2:]), max_iterations, tolerance).reshape(shape)


class ConditionedSylvester(Transform):
    r"""One Sylvester step with given per-point (batched) parameters:

    .. math::
        z' = z + Q R \tanh(\tilde R Q^\top z + b), \qquad
        \log\left|\det \frac{\partial z'}{\partial z}\right| = \sum_{i=1}^M \log\big(1 + r_{ii}\tilde r_{ii}
        (1 - a_i^2)\big), \quad a = \tanh(\tilde R Q^\top z + b)

    Q (..., Z, M) has orthonormal columns (the log-determinant identity needs QᵀQ = I), R, R̃ (..., M, M) are upper
    triangular with r_ii, r̃_ii ∈ (−1, 1) (see :class:`ConditionalSylvester`), b (..., M); the batch dimensions
    broadcast against z's. ``one_plus_rr`` = 1 + r_ii r̃_ii (..., M) is passed in, computed without cancellation
    (:func:`one_plus_tanh_product`), and each factor is evaluated as (1 + r r̃)(1 − a²) + a²: a sum of two
    non-negative terms, positive however close r r̃ is to −1 or a² to 1. No closed-form inverse: as Pyro's planar
    and Sylvester transforms, x is taken from the cache of the forward call that produced y.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, q: torch.Tensor, r: torch.Tensor, r_tilde: torch.Tensor, b: torch.Tensor,
                 one_plus_rr: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        self.q, self.r, self.r_tilde, self.b, self.one_plus_rr = q, r, r_tilde, b, one_plus_rr
        # rows of z times these give (R̃ Qᵀ z)ᵀ and (Q R a)ᵀ: (..., Z, M) each, once per conditioning
        self._in = q @ r_tilde.mT
        self._out = q @ r
        self._cached_log_det: torch.Tensor | None = None

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        a = torch.tanh((z.unsqueeze(-2) @ self._in).squeeze(-2) + self.b)  # (..., M)
        a2 = a.square()
        self._cached_log_det = torch.log(self.one_plus_rr * (1 - a2) + a2).sum(-1)
        return z + (a.unsqueeze(-2) @ self._out.mT).squeeze(-2)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("ConditionedSylvester has no closed-form inverse; it scores only the draws it made "
                                  "(taken from the cache of the forward call)")

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old:
            self(x)  # recomputes y and the log-determinant, and caches them
        return self._cached_log_det


class ConditionalSylvester(ConditionalTransformModule):
    r"""An amortized Sylvester step: a hypernetwork (Pyro's ``DenseNN(context_dim, hidden, ...)``) maps the
    context h to the unconstrained per-point outputs of :meth:`outputs`, and :meth:`build` turns them into a
    :class:`ConditionedSylvester`; ``condition(h)`` is ``build(outputs(h))``.

    Outputs, per point: ``r`` and ``r_tilde`` (M(M−1)/2), the strictly upper triangles of R and R̃, row by row;
    ``r_diag`` and ``r_tilde_diag`` (M), pre-activations ρ, ρ̃ of their diagonals; ``b`` (M); and what the
    subclass builds Q from. Invertibility: r_ii = tanh ρ_i and r̃_ii = tanh ρ̃_i, so r_ii r̃_ii ∈ (−1, 1) and,
    as tanh' ∈ (0, 1], every factor 1 + r_ii r̃_ii tanh'(·) > 0: the Jacobian determinant is positive, the step a
    bijection (van den Berg et al. 2018, Theorem 2, with the paper's tanh diagonal activation). Freeing the
    outputs per point gives the full per-point Sylvester family of the same kind.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, latent_dim: int, context_dim: int, hidden_dims: Sequence[int], num_vectors: int,
                 q_shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.latent_dim, self.num_vectors = latent_dim, num_vectors
        m = num_vectors
        #: per-point shape of each hypernetwork output, in output order
        self.shapes: dict[str, tuple[int, ...]] = {"r": (m * (m - 1) // 2,), "r_tilde": (m * (m - 1) // 2,),
                                                   "r_diag": (m,), "r_tilde_diag": (m,), "b": (m,), **q_shapes}
        self.nn = DenseNN(context_dim, list(hidden_dims), param_dims=[math.prod(s) for s in self.shapes.values()])
        # where each of R's M² entries comes from in [0, strict upper triangle (row by row), diagonal]
        gather = torch.zeros(m, m, dtype=torch.long)
        rows, cols = torch.triu_indices(m, m, 1)
        gather[rows, cols] = torch.arange(1, len(rows) + 1)
        gather[range(m), range(m)] = torch.arange(len(rows) + 1, len(rows) + 1 + m)
        self.register_buffer("_gather", gather.flatten(), persistent=False)

    def outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hypernetwork's outputs at context h (N, C), unconstrained: {name: (N, *shape)}."""
        return {name: out.reshape(*out.shape[:-1], *shape)
                for (name, shape), out in zip(self.shapes.items(), self.nn(h), strict=True)}

    def orthonormal(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Q (..., Z, M), orthonormal columns, from the outputs ``p``."""
        raise NotImplementedError

    def _triangular(self, upper: torch.Tensor, diag_pre: torch.Tensor) -> torch.Tensor:
        """(..., M, M): ``upper`` in the strict upper triangle row by row, tanh(``diag_pre``) on the diagonal."""
        m = self.num_vectors
        # one gather from [0, upper..., tanh(diag)...] into the M² entries (cheaper than zeros + index_put)
        source = torch.cat([upper.new_zeros(*upper.shape[:-1], 1), upper, torch.tanh(diag_pre)], dim=-1)
        return source.index_select(-1, self._gather).reshape(*upper.shape[:-1], m, m)

    def build(self, p: dict[str, torch.Tensor]) -> ConditionedSylvester:
        """The step the outputs ``p`` give (constraints applied here: tanh diagonals, orthonormal Q)."""
        return ConditionedSylvester(self.orthonormal(p), self._triangular(p["r"], p["r_diag"]),
                                    self._triangular(p["r_tilde"], p["r_tilde_diag"]), p["b"],
                                    one_plus_tanh_product(p["r_diag"], p["r_tilde_diag"]))

    def condition(self, context: torch.Tensor) -> ConditionedSylvester:
        return self.build(self.outputs(context))


class OrthogonalSylvester(ConditionalSylvester):
    """``sylvester-o``: Q (Z×M) from an unconstrained Z×M output ``q`` by :func:`orthonormalize` (its polar
    factor). ``num_vectors`` M ≤ Z trades flexibility for cost: R, R̃ are M×M, so M < Z is a rank-M update of z
    per step. The default, min(Z, 8), is the reference code's (M = 8 of Z = 64): with M = Z = 40 the guide's
    forward and backward pass of ``sylvester-o:4`` took 4× that of M = 8 (570 against 140 ms for a batch of 100
    on one CPU thread, 4.7 M against 1.2 M parameters). ``max_iterations`` (100,
    the reference code's) and ``tolerance`` go to :func:`orthonormalize`."""

    def __init__(self, latent_dim: int, context_dim: int, hidden_dims: Sequence[int], num_vectors: int | None = None,
                 max_iterations: int = 100, tolerance: float | None = None) -> None:
        m = min(latent_dim, 8) if num_vectors is None else num_vectors
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= latent_dim:
            raise ValueError(f"num_vectors: need an integer in [1, latent_dim = {latent_dim}] (Q is Z×M with "
                             f"orthonormal columns), got {num_vectors!r}")
        super().__init__(latent_dim, context_dim, hidden_dims, m, {"q": (latent_dim, m)})
        self.max_iterations, self.tolerance = max_iterations, tolerance

    def orthonormal(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return orthonormalize(p["q"], self.max_iterations, self.tolerance)


class HouseholderSylvester(ConditionalSylvester):
    """``sylvester-h``: Q = H_1 ⋯ H_H (Z×Z, M = Z), H_j = I − 2 v_j v_jᵀ / ‖v_j‖², from H unconstrained vectors
    ``v`` (H, Z); ``num_reflections`` H defaults to 8, the reference code's. (Odd or even H: a sign flip of Q's
    columns is absorbed by R, R̃, b since tanh is odd, so det Q = ±1 spans the same family.)"""

    def __init__(self, latent_dim: int, context_dim: int, hidden_dims: Sequence[int],
                 num_reflections: int = 8) -> None:
        if isinstance(num_reflections, bool) or not isinstance(num_reflections, int) or num_reflections < 1:
            raise ValueError(f"num_reflections: need an integer >= 1, got {num_reflections!r}")
        super().__init__(latent_dim, context_dim, hidden_dims, latent_dim, {"v": (num_reflections, latent_dim)})

    def orthonormal(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # the product in one piece (Schreiber & Van Loan's compact WY form, Joffrain et al.'s UT transform):
        # H_1 ⋯ H_H = I − V T⁻¹ Vᵀ, V = [v_1 … v_H] (Z×H), T = (strict upper triangle of VᵀV) + ½ diag(VᵀV);
        # three small products and an H×H triangular solve instead of H rank-one updates of a Z×Z matrix
        v = p["v"].mT  # (..., Z, H)
        gram = v.mT @ v
        t = gram.triu(1) + torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1) / 2)
        eye_h = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
        t_inv = torch.linalg.solve_triangular(t, eye_h.expand_as(t), upper=True)
        return torch.eye(self.latent_dim, dtype=v.dtype, device=v.device) - v @ t_inv @ v.mT


class TriangularSylvester(ConditionalSylvester):
    """``sylvester-t``: Q a fixed permutation (M = Z), the identity at even steps ``layer`` and the reversal of the
    coordinates at odd ones, so that the upper-triangular R, R̃ alternate between upper and lower triangular maps
    of z; a permutation is orthogonal, so the log-determinant identity holds unchanged."""

    def __init__(self, latent_dim: int, context_dim: int, hidden_dims: Sequence[int], layer: int = 0) -> None:
        super().__init__(latent_dim, context_dim, hidden_dims, latent_dim, {})
        self.reverse = layer % 2 == 1

    def orthonormal(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        eye = torch.eye(self.latent_dim, dtype=p["b"].dtype, device=p["b"].device)
        return eye.flip(-1) if self.reverse else eye


def _sylvester_outputs(module: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """The hypernetwork outputs before constraints (see :class:`ConditionalSylvester`)."""
    return module.outputs(h)


def _sylvester(module: nn.Module, p: dict[str, torch.Tensor]) -> Transform:
    return module.build(p)


@dataclass(frozen=True)
class FlowFamily:
    factory: TransformFactory
    #: reverse the coordinate order between layers (autoregressive flows)
    permute: bool
    default_k: int
    summary: str
    #: the per-point parameters one conditioned transform is built from (the first half of ``.condition(h)``)
    local_parameters: LocalParameters = free_context
    #: the transform built from them (the second half): ``from_parameters(m, local_parameters(m, h))`` is
    #: ``m.condition(h)``
    from_parameters: FromParameters = _conditioned_on_context
    #: the factory takes the step's index, ``layer=i`` (0, 1, ...), for steps that differ by position (the
    #: triangular Sylvester flow alternates its permutation)
    layered: bool = False


FLOWS: Registry[FlowFamily] = Registry("flow")


def _iaf(k: int, c: int, hidden: list[int]) -> nn.Module:
    # Kingma et al. (2016)'s numerically stable, sigmoid-gated update: z' = σ(s) z + (1 − σ(s)) m
    return T.conditional_affine_autoregressive(k, c, hidden, stable=True)


def _spline(k: int, c: int, hidden: list[int]) -> nn.Module:
    return T.conditional_spline_autoregressive(k, c, hidden, count_bins=8, bound=5.0)


FLOWS.register("planar")(FlowFamily(T.conditional_planar, False, 10, "planar flows (Rezende & Mohamed 2015)",
                                    HypernetOutputs(("bias", "u", "w")), _planar))
FLOWS.register("radial")(FlowFamily(T.conditional_radial, False, 10, "radial flows (Rezende & Mohamed 2015)",
                                    HypernetOutputs(("x0", "alpha", "beta")), _radial))
FLOWS.register("iaf")(FlowFamily(_iaf, True, 2, "inverse autoregressive flow (Kingma et al. 2016)"))
FLOWS.register("householder")(FlowFamily(lambda k, c, h: T.conditional_householder(k, c, h), False, 4,
                                         "Householder reflections: full-covariance Gaussian (Tomczak & Welling 2016)",
                                         _householder_vectors, _householder))
FLOWS.register("spline")(FlowFamily(_spline, True, 2, "autoregressive rational-quadratic splines (Durkan et al. 2019)"))
FLOWS.register("sylvester-o")(FlowFamily(
    OrthogonalSylvester, False, 4, "orthogonal Sylvester flows, Q by iterative orthogonalisation (van den Berg et al. "
    "2018)", _sylvester_outputs, _sylvester))
FLOWS.register("sylvester-h")(FlowFamily(
    HouseholderSylvester, False, 4, "Householder Sylvester flows, Q from 8 reflections (van den Berg et al. 2018)",
    _sylvester_outputs, _sylvester))
FLOWS.register("sylvester-t")(FlowFamily(
    TriangularSylvester, False, 4, "triangular Sylvester flows, Q alternating identity and reversal (van den Berg "
    "et al. 2018)", _sylvester_outputs, _sylvester, layered=True))


def reversal() -> Reverse:
    """A fresh cached :class:`Reverse` for one position of one flow. Scoring the flow's own draw walks it backwards,
    each step's inverse found in its cache because its input is the very tensor the next step made; one Reverse
    shared by two positions caches only the later one, so the step before the earlier one missed and an IAF layer was
    inverted coordinate by coordinate (k sequential passes) at every training step."""
    return Reverse(cache_size=1)


class AmortizedFlowGuide(DiagonalGaussianGuide):
    """q(z|x): the diagonal Gaussian of :class:`DiagonalGaussianGuide` pushed through conditioned transforms."""

    def __init__(self, model: LatentModel, config: GuideConfig, family: FlowFamily, num_transforms: int) -> None:
        super().__init__(model, config)
        context, hidden = self.encoder.output_dim, list(config.flow_hidden)
        if family.permute and any(h < self.latent_dim for h in hidden):
            raise ValueError(f"autoregressive flows need hidden sizes >= the latent dimension ({self.latent_dim}); "
                             f"got flow_hidden={tuple(hidden)}")
        # the family's two halves of .condition(h), for per-point inference (not the family: its factory may be
        # a lambda, which would keep the guide from pickling)
        self._local_parameters, self._from_parameters = family.local_parameters, family.from_parameters
        self.transforms = nn.ModuleList(
            family.factory(self.latent_dim, context, hidden, **({"layer": i} if family.layered else {}))
            for i in range(num_transforms))
        # reversing the order between autoregressive layers lets every coordinate depend on every other; one cached
        # Reverse per position and call (see reversal), so log q of the guide's own draw inverts nothing
        self.permute = family.permute

    def conditioned(self, h: torch.Tensor) -> list[TransformModule]:
        out: list[TransformModule] = []
        for i, t in enumerate(self.transforms):
            if self.permute and i > 0:
                out.append(reversal())
            out.append(t.condition(h) if isinstance(t, dist.ConditionalTransform) else t)
        return out

    def flow(self, x: torch.Tensor) -> tuple[Distribution, list[TransformModule]]:
        """The base distribution and the conditioned transforms for inputs ``x``."""
        h = self.encoder(x)
        return self.base(h), self.conditioned(h)

    def distribution(self, x: torch.Tensor) -> Distribution:
        base, transforms = self.flow(x)
        return dist.TransformedDistribution(base, transforms)

    def local_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's ``loc`` and unconstrained ``scale`` (N, k), then each transform's per-point parameters as
        ``flow{i}.{name}`` (see the family's ``local_parameters``: hypernetwork outputs for planar, radial,
        Householder and Sylvester; the context h for the autoregressive flows, whose per-point family is then the MADE
        conditioned on a free context, a subset of a fully free IAF, so its gap is an upper bound)."""
        h = self.encoder(x)
        out = self.head_parameters(h)
        for i, t in enumerate(self.transforms):
            if isinstance(t, dist.ConditionalTransform):
                out.update({f"flow{i}.{k}": v for k, v in self._local_parameters(t, h).items()})
        return out

    def distribution_from(self, params: dict[str, torch.Tensor]) -> Distribution:
        """The base N(loc, diag σ²) pushed through the transforms built from each ``flow{i}.*``; batch shape (N,)."""
        base = super().distribution_from(params)
        transforms: list[Transform] = []
        for i, t in enumerate(self.transforms):
            if self.permute and i > 0:
                transforms.append(reversal())
            if not isinstance(t, dist.ConditionalTransform):  # a transform without per-point parameters
                transforms.append(t)
                continue
            prefix = f"flow{i}."
            own = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
            if not own:
                raise ValueError(f"params: no {prefix}* entries for transform {i}; pass what local_parameters(x) "
                                 "returns")
            transforms.append(self._from_parameters(t, own))
        return dist.TransformedDistribution(base, transforms)


def register_flow_family(name: str, family: Any, guide_class: type | None = None) -> None:
    """Register ``name`` as the guide family ``name:K``: ``guide_class(model, config, family, K)`` (default
    :class:`AmortizedFlowGuide`), K defaulting to ``family.default_k``; the zuko flows register through it too."""
    guide_class = guide_class or AmortizedFlowGuide

    def factory(model: LatentModel, config: GuideConfig, k: int | None) -> Any:
        return guide_class(model, config, family, k or family.default_k)

    factory.__name__ = factory.__qualname__ = name
    register_guide(name, arg_name="K (number of transforms)", default_arg=family.default_k,
                   summary=f"{family.summary}, conditioned on the encoder")(factory)


for _name in FLOWS:
    register_flow_family(_name, FLOWS[_name])


def flow_names() -> Sequence[str]:
    return FLOWS.names()

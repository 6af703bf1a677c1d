r"""Training objectives beside the ELBO: the per-point importance-weighted bound (IWAE) and its DReG gradients.

For a model with a per-point latent z_n and K draws z_{n,k} ~ q(z|x_n), with log weights
log w_{n,k} = log p(x_n, z_{n,k}) − log q(z_{n,k}|x_n), the IWAE bound (Burda et al. 2016) is

.. math::
    \mathcal L_K = \sum_{n=1}^N \log \frac1K \sum_{k=1}^K w_{n,k} \;\le\; \sum_n \log p(x_n),

one log-mean-exp **per data point**; a minibatch of B points is rescaled by N / B, so the minibatch objective is an
unbiased estimate of the full-data one. ``K = 1`` is the ELBO.

Why not Pyro's ``RenyiELBO(alpha=0)``: in Pyro 1.9 it keeps an independent data plate out of the
log-mean-exp, so on a full batch it *is* 𝓛_K (equal to float rounding). Under minibatching it puts the
plate's scale N/B inside: it maximises Σ_n log (1/K) Σ_k w_{n,k}^{N/B}. By the power-mean inequality that is
≥ (N/B) Σ_n log (1/K) Σ_k w_{n,k}, the rescaled bound, with equality only for K = 1 or constant weights: it is
not an unbiased estimate of 𝓛_K, nor a lower bound on log p(x), and it overweights the largest weight as N/B
grows (with N/B = 500, as in MNIST's minibatches of 100, one draw dominates). ``tests/test_objectives.py``
checks both statements against Pyro's own loss (the issue is Pyro's #3104 and NumPyro's #1607; plates were
kept out in Pyro PR #2321).

Gradients. ``iwae:K`` differentiates 𝓛_K's Monte Carlo estimate through the reparameterised draws: for the model
Σ_k w̃_k ∇_θ log w_k, for the guide the same with the path through z; both unbiased for ∇𝓛_K, but the guide's
signal-to-noise ratio falls as K grows (Rainforth et al. 2018). ``iwae-dreg:K`` (doubly reparameterised, Tucker
et al. 2019) keeps the model's gradient and gives the guide

.. math::
    \nabla_\phi \mathcal L_K = \mathbb E\Big[\sum_k \tilde w_k^2\,
        \frac{\partial \log w_k}{\partial z_k}\frac{\partial z_k}{\partial \phi}\Big],
    \qquad \tilde w_k = w_k / \textstyle\sum_j w_j,

with log q evaluated at *stopped* guide parameters (only the path through z remains), which is also unbiased and
whose variance vanishes as q approaches the posterior. It is implemented with one backward pass: log w uses a
detached copy of q (``pyro.distributions.util.detach``), the surrogate is −Σ_k w̃_k log w_k, and a gradient hook on
each draw z_k multiplies its incoming gradient by w̃_k, so the guide receives w̃_k² ∂ log w_k/∂z_k while the model
receives w̃_k ∇_θ log p. The guide's q must score a given z at detached parameters: Gaussian guides can, flows
without an analytic inverse (planar, radial) cannot and are refused.

Warm-up (``TrainConfig.warmup_epochs``) scales log p(z) and log q(z|x) by β as for the ELBO (the plate's
minibatch scale is divided out first), so the weights are p(x|z) (p(z)/q(z|x))^β; DReG's guide gradient is then
Σ_k [(1 − β) w̃_k + β w̃_k²] ∂log w_k/∂z_k ∂z_k/∂φ (the score term it rewrites carries β), unbiased for the
tempered bound at every β. Validation under these objectives monitors IWAE-K with the same K (``valid_iwae``), so
early stopping and the restored best state follow the bound that is trained.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import detach, is_identically_zero
from pyro.infer import ELBO
from torch.utils._pytree import tree_flatten, tree_unflatten

from pyro_lvm.graphs import replay, simplify
from pyro_lvm.models.base import DATA_PLATE, ModelTraits, in_data_plate
from pyro_lvm.registry import Registry, split_spec


class IWAELoss(ELBO):
    r"""−𝓛_K, the per-point importance-weighted bound with ``num_samples`` = K draws per point (see the module).

    Called as Pyro calls an ELBO: ``IWAELoss(K)(model, guide)(x, total_size=N)`` or
    ``differentiable_loss(model, guide, x, total_size=N)``. ``dreg=True`` gives the guide DReG gradients.
    Every latent site must sit in the data plate (a per-point latent): a global latent has no per-point bound.
    """

    def __init__(self, num_samples: int, *, dreg: bool = False, max_plate_nesting: int = 1) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: must be an integer >= 1, got {num_samples!r}")
        super().__init__(num_particles=1, max_plate_nesting=max_plate_nesting)
        self.num_samples, self.dreg = num_samples, dreg

    def log_weights(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """(log w of shape (K, B), the guide's draws that carry gradient, the minibatch scale N/B)."""
        with pyro.plate("iwae_particles", self.num_samples, dim=-(self.max_plate_nesting + 1)):
            guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        scale = _plate_scale(model_tr)
        log_w: torch.Tensor | float = 0.0
        draws = []
        self.beta = 1.0  # the warm-up weight on the latent terms, read off the guide's sites
        for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
            for name, site in tr.nodes.items():
                if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
                    continue
                if not in_data_plate(site):
                    raise ValueError(f"iwae: site {name!r} is outside the {DATA_PLATE!r} plate; the per-point bound "
                                     "needs every latent to be per point (train global latents with the ELBO)")
                fn = site["fn"]
                if sign < 0:
                    self.beta = float(site["scale"] / scale)
                    if self.dreg:
                        fn = detach(fn)  # only the path through z reaches the guide's parameters
                        if site["value"].requires_grad:
                            draws.append(site["value"])
                # the site's scale is β (warm-up) × N/B (the plate's minibatch scale): keep β, drop N/B
                log_w = log_w + sign * (site["scale"] / scale) * fn.log_prob(site["value"])
        assert isinstance(log_w, torch.Tensor)
        return log_w.reshape(self.num_samples, -1), draws, scale

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        log_w, draws, scale = self.log_weights(model, guide, *args, **kwargs)
        bound = (torch.logsumexp(log_w, 0) - math.log(self.num_samples)).sum() * scale
        if not self.dreg:
            return -bound
        w = torch.softmax(log_w.detach(), 0)  # (K, B) self-normalised weights
        # the guide's path gradient is Σ_k [(1 − β) w̃_k + β w̃_k²] ∂log w_k/∂z_k ∂z_k/∂φ: the score term that DReG
        # rewrites carries the warm-up weight β of log q (w̃² alone at β = 1). The surrogate gives w̃_k ∂log w_k/∂z_k,
        # so the hook scales z_k's incoming gradient by (1 − β) + β w̃_k.
        factor_kb = (1.0 - self.beta) + self.beta * w
        for z in draws:  # z: (K, B, ...)
            factor = factor_kb.reshape(w.shape + (1,) * (z.dim() - w.dim()))
            z.register_hook(lambda g, f=factor: g * f)
        surrogate = (w * log_w).sum() * scale
        return -bound.detach() - (surrogate - surrogate.detach())

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError("IWAELoss draws its own vectorised traces (log_weights)")


def _plate_scale(trace: Any) -> float:
    """N / B of the data plate in a trace (1 without minibatching)."""
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == DATA_PLATE and frame.full_size is not None:  # size: the minibatch's; full_size: N
                return float(frame.full_size) / float(frame.size)
    return 1.0


@dataclass(frozen=True)
class Objective:
    """A training objective ``NAME[:K]``: ``make(K)`` builds its Pyro loss; ``dreg`` marks DReG gradients."""

    make: Callable[[int], ELBO]
    summary: str
    default_k: int
    #: whether the guide's q must score a given z at stopped parameters
    needs_density: bool = False


#: objectives beside the ELBO estimators of ``pyro_lvm.train.ELBOS``; ``elbo`` means "the estimator in ``elbo``"
OBJECTIVES: Registry[Objective | None] = Registry("objective")
OBJECTIVES.register("elbo")(None)
OBJECTIVES.register("iwae")(Objective(lambda k: IWAELoss(k), "per-point IWAE bound, K draws per point", 5))
OBJECTIVES.register("iwae-dreg")(Objective(lambda k: IWAELoss(k, dreg=True),
                                           "per-point IWAE bound with DReG guide gradients (Tucker et al. 2019)", 5,
                                           needs_density=True))


def parse_objective(spec: str) -> tuple[str, int | None]:
    """``"iwae:5"`` -> ("iwae", 5); ``"elbo"`` -> ("elbo", None). Unknown names raise, listing the valid ones."""
    name, _, arg = str(spec).strip().partition(":")
    entry = OBJECTIVES[name]
    if entry is None:
        if arg:
            raise ValueError(f"objective {spec!r}: 'elbo' takes no ':K' (set num_particles for more draws)")
        return name, None
    k = split_spec(spec, "objective", "K (draws per point)")[1]
    return name, entry.default_k if k is None else k


def objective_problem(traits: ModelTraits, spec: str, elbo: str | None, num_particles: int) -> str | None:
    """Why ``spec`` cannot train a model with ``traits`` under these settings, or ``None`` when it can."""
    name, _ = parse_objective(spec)
    if OBJECTIVES[name] is None:
        return None
    if traits.local_site is None or traits.global_sites or traits.local_discrete_site:
        return (f"{name} is a per-point bound and needs a model whose only latent is a continuous per-point z; "
                f"{traits.name} has global or discrete latents (train it with the ELBO)")
    if elbo not in (None, "trace"):
        return f"{name} replaces the ELBO estimator; leave elbo unset (got elbo={elbo!r}, which would train the ELBO)"
    if num_particles != 1:
        return f"{name}:K draws K samples per point itself; leave num_particles at 1 (got {num_particles})"
    return None


# ---------------------------------------------------------------------------------------------- the traced step
_LOG = logging.getLogger("pyro_lvm.train")


class TraceUnsupported(RuntimeError):
    """The traced loss cannot stand in for Pyro's on this model and guide (the message says why)."""


def reparameterized_elbo_loss(elbo: ELBO, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                              **kwargs: Any) -> torch.Tensor:
    """−ELBO, ``Trace_ELBO``'s differentiable loss for a model and guide whose latent sites are all reparameterised,
    computed without Pyro's host reads (``.item()``) and NaN checks so that it can be traced into a graph.

    Its gradient is ``Trace_ELBO.differentiable_loss``'s, operation for operation (the same surrogate: the model's
    ``log_prob_sum`` per site, minus the guide's entropy terms, over ``num_particles``); its value is the ELBO's
    summed in the tensors' dtype where Pyro's adds the per-site sums as Python floats, so the two can differ in the
    last bits. A guide site with a score-function term (discrete, or not reparameterised) raises
    :class:`TraceUnsupported`: Pyro's estimator adds terms for it that this loss does not."""
    surrogate: torch.Tensor | float = 0.0
    for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
        particle: torch.Tensor | float = 0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                particle = particle + site["log_prob_sum"]
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                if not is_identically_zero(score_function_term):
                    raise TraceUnsupported(f"the guide's site {name!r} is not reparameterised (discrete, or without "
                                           "rsample): its score-function term needs Pyro's Trace_ELBO")
                if not is_identically_zero(entropy_term):
                    particle = particle - entropy_term.sum()
        surrogate = surrogate + (-particle) / elbo.num_particles
    if not isinstance(surrogate, torch.Tensor):
        raise TraceUnsupported("the model and guide have no sample sites")
    return surrogate


class _Bound(torch.nn.Module):
    """``loss(*args, **kwargs)`` as the forward of a module that holds ``owner``, so that
    :func:`torch.func.functional_call` can run it on stand-in parameters."""

    def __init__(self, owner: torch.nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.owner, self._loss = owner, loss

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._loss(*args, **kwargs)


class TracedLoss:
    """A loss over the parameters and buffers of ``owner``, run as a recorded graph of tensor operations.

    ``loss(*args, **kwargs)`` (Python: Pyro's messengers, traces and distributions) is traced once per input
    signature -- the shapes, dtypes and devices of the tensor arguments, the values of the others, grad mode and
    ``owner.training`` -- into an FX graph of ATen operations (``torch.fx.experimental.proxy_tensor.make_fx`` on fake
    tensors: no data are read while tracing), and every later call with that signature replays the graph on the real
    parameters; autograd differentiates the replay as it would the Python. Random draws are operations of the graph,
    so a replay draws from torch's generator exactly as the Python would: the same RNG stream, the same draws.

    Tracing refuses, with :class:`TraceUnsupported`, what a graph cannot hold: Python branching on tensor values
    (``bool(t)``, ``t.item()``), reading data to NumPy, tensors that are neither inputs nor the owner's state. The
    first call of each signature is also run through ``reference`` (Pyro's own loss, with Pyro's checks) on the same
    random state, and the two losses and gradients must agree (else :class:`TraceUnsupported`): a model whose Python
    draws from another generator or whose graph changes in a way the tracer cannot see is caught there. What no
    check can see is a model whose Python behaves differently on later calls (a call counter, say): such a model must
    be trained with the traced step off.

    ``compile=True`` hands each graph to ``torch.compile`` (Inductor, its own random draws replaced by torch's so the
    stream stays the same): fused kernels for forward and backward, at a compile cost of seconds per signature."""

    #: relative agreement asked of the traced loss and gradients with the reference's (they are usually bit-equal)
    RTOL = 1e-5

    def __init__(self, owner: torch.nn.Module, loss: Callable[..., torch.Tensor],
                 reference: Callable[..., torch.Tensor] | None = None, *, compile: bool = False) -> None:
        self.owner, self.reference, self.compile = owner, reference, compile
        self._bound = _Bound(owner, loss)
        self._graphs: dict[Any, Callable[..., torch.Tensor]] = {}
        self._state: tuple[list[str], list[torch.Tensor]] | None = None
        #: signatures traced so far, and seconds spent tracing (and checking) them
        self.traces, self.trace_seconds = 0, 0.0
        #: per joint signature, which of :meth:`grad_params` have a gradient (the graph returns only those)
        self._present: dict[Any, list[bool]] = {}
        #: what went differently than asked (a compiler failure), else ""
        self.note = ""

    def refresh(self) -> None:
        """Read the owner's parameters and buffers again (after they were replaced rather than updated in place)."""
        self._state = None

    def _owner_state(self) -> tuple[list[str], list[torch.Tensor]]:
        if self._state is None:
            named = {**dict(self._bound.named_parameters()), **dict(self._bound.named_buffers())}
            self._state = (list(named), list(named.values()))
        return self._state

    def _key(self, leaves: list[Any], spec: Any, joint: bool) -> Any:
        return (spec, tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else ("value", t)
                            for t in leaves), torch.is_grad_enabled(), self.owner.training, joint)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        leaves, spec = tree_flatten((args, kwargs))
        key = self._key(leaves, spec, joint=False)
        graph = self._graphs.get(key)
        if graph is None:
            return self._first_call(key, leaves, spec, args, kwargs)
        return graph(*self._owner_state()[1], *(v for v in leaves if isinstance(v, torch.Tensor)))[0]

    def grad_params(self) -> list[torch.Tensor]:
        """The owner's parameters that :meth:`loss_and_grads` differentiates: those that require gradients."""
        return [t for t in self._owner_state()[1] if t.requires_grad]

    def loss_and_grads(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The loss (detached) and its gradient with respect to :meth:`grad_params` (``None`` where the loss does
        not depend on one, as ``loss.backward()`` would leave it), from one graph that holds the forward and the
        backward operations: traced once per signature through autograd, then replayed without it (no autograd
        graph is recorded on the way forward and the engine does not run), which saves about 0.5 ms of the MNIST
        VAE's 8 ms step at one thread. The gradients are autograd's, operation for operation."""
        leaves, spec = tree_flatten((args, kwargs))
        key = self._key(leaves, spec, joint=True)
        graph = self._graphs.get(key)
        if graph is None:
            return self._first_call(key, leaves, spec, args, kwargs, joint=True)
        with torch.no_grad():
            return self._unpack(key, graph(*self._owner_state()[1],
                                           *(v for v in leaves if isinstance(v, torch.Tensor))))

    def _unpack(self, key: Any, out: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The joint graph's ``(loss, grads)``, with ``None`` put back where the traced gradient was ``None``."""
        loss, present = out[0], list(out[1:])
        return loss, [present.pop(0) if has else None for has in self._present[key]]

    def _first_call(self, key: Any, leaves: list[Any], spec: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any], joint: bool = False) -> Any:
        import time

        from torch.fx.experimental.proxy_tensor import make_fx

        t0 = time.perf_counter()
        names, state = self._owner_state()
        where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        bound = self._bound
        wrt = [i for i, t in enumerate(state) if t.requires_grad]

        def run(state: list[torch.Tensor], tensors: list[torch.Tensor]) -> torch.Tensor:
            full = list(leaves)
            for i, t in zip(where, tensors, strict=True):
                full[i] = t
            a, k = tree_unflatten(full, spec)
            return torch.func.functional_call(bound, dict(zip(names, state, strict=True)), a, k)

        present: list[bool] = []

        def run_joint(state: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            # the parameters as fresh leaves, so that the graph records autograd's backward operations for them
            state = [t.detach().requires_grad_() if i in wrt else t for i, t in enumerate(state)]
            with torch.enable_grad():
                loss = run(state, tensors)
                grads = torch.autograd.grad(loss, [state[i] for i in wrt], allow_unused=True) \
                    if loss.requires_grad else [None] * len(wrt)
            present[:] = [g is not None for g in grads]
            return [loss.detach(), *(g for g in grads if g is not None)]

        rng = _RandomState([leaves[i] for i in where] + state)
        try:
            with pyro.validation_enabled(False):  # argument checks read values; the reference below runs them
                graph = make_fx(run_joint if joint else run, tracing_mode="fake")(state, [leaves[i] for i in where])
        except TraceUnsupported:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the tracer cannot hold: said, and the caller falls back
            raise TraceUnsupported(f"the model cannot be traced ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:160]})") from e
        finally:
            rng.restore()  # tracing draws nothing, but the stream must not depend on it
        if joint:
            self._present[key] = present
        # operations whose results nothing reads (Pyro's bookkeeping: index ranges, detached copies); random draws
        # and in-place operations count as used, so the replay's draws stay Pyro's
        if joint:  # replayed under no_grad, where a detach only makes another view object: its input serves
            for node in list(graph.graph.nodes):
                if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
                    node.replace_all_uses_with(node.args[0])
                    graph.graph.erase_node(node)
        graph.graph.eliminate_dead_code()
        # positional placeholders in place of make_fx's pytree flattening of (state, tensors) at every call (0.1 ms
        # a step for the MNIST VAE's 30 tensors): the callers pass the flat list themselves, and the graph returns
        # its flat list of outputs ([loss], or [loss, *gradients])
        graph.graph._codegen = torch.fx.graph.CodeGen()
        graph.recompile()
        graph = simplify(graph)  # identities dropped, constants folded (pyro_lvm.graphs): fewer operations to replay
        tensors = [leaves[i] for i in where]
        first = functools.partial(self._first_run, state=state, tensors=tensors, args=args, kwargs=kwargs, rng=rng,
                                  key=key if joint else None)
        if self.compile:
            compiled = torch.compile(graph, dynamic=False, options={"fallback_random": True})
            try:
                loss = first(compiled)
                graph = compiled
            except Exception as e:  # noqa: BLE001 - a compiler failure, or compiled kernels that round past the
                # check's tolerance: the traced graph runs as it is (and is checked itself: a model that cannot be
                # traced at all still raises TraceUnsupported from there)
                self.compile = False
                why = "disagrees with Pyro's loss" if isinstance(e, TraceUnsupported) else "failed"
                self.note = f"torch.compile {why} ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
                _LOG.info("fit: %s; the traced graph runs uncompiled", self.note)
                graph = replay(graph)
                loss = first(graph)
        else:
            graph = replay(graph)
            loss = first(graph)
        self._graphs[key] = graph
        self.traces += 1
        self.trace_seconds += time.perf_counter() - t0
        return loss

    def _first_run(self, graph: Callable[..., Any], *, state: list[torch.Tensor], tensors: list[torch.Tensor],
                   args: tuple[Any, ...], kwargs: dict[str, Any], rng: _RandomState, key: Any = None) -> Any:
        """The graph's loss (or, for a joint graph, whose ``key`` is given, its loss and gradients) on its first
        call, from the random state ``rng``: after the reference (Pyro's loss) was run on the same random state and
        agreed with it, where there is a reference."""
        rng.restore()
        joint = key is not None
        if self.reference is None:
            if not joint:
                return graph(*state, *tensors)[0]
            with torch.no_grad():
                return self._unpack(key, graph(*state, *tensors))
        params = [t for t in state if t.requires_grad] if torch.is_grad_enabled() else []
        expected = self.reference(*args, **kwargs)
        want = torch.autograd.grad(expected, params, allow_unused=True) if params and expected.requires_grad else []
        rng.restore()  # the replay draws what the reference drew, and leaves the stream where it did
        if joint:
            with torch.no_grad():
                out = loss, got = self._unpack(key, graph(*state, *tensors))
        else:
            out = loss = graph(*state, *tensors)[0]
            got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True) \
                if params and loss.requires_grad else []
        if joint and not want:
            got = []
        problem = _disagreement(expected.detach(), loss.detach(), want, got, self.RTOL)
        if problem:
            raise TraceUnsupported(f"the traced loss disagrees with Pyro's ({problem})")
        return out


class _RandomState:
    """The state of torch's generators that draws on ``tensors``' devices may use (the CPU's, and each CUDA
    device's), to be put back."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.cpu = torch.get_rng_state()
        cuda = {t.device for t in tensors if t.device.type == "cuda"}
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in cuda}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda.items():
            torch.cuda.set_rng_state(state, d)


def _disagreement(expected: torch.Tensor, loss: torch.Tensor, want: Sequence[torch.Tensor | None],
                  got: Sequence[torch.Tensor | None], rtol: float) -> str:
    """What differs between a reference loss and gradients and a traced one, or ``""``."""
    if expected.shape != loss.shape or not torch.allclose(loss, expected, rtol=rtol, atol=rtol, equal_nan=True):
        return f"loss {expected.tolist()} against {loss.tolist()}"
    if len(want) != len(got):
        return "a different set of gradients"
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if (a is None) != (b is None):
            return f"gradient {i} is missing on one side"
        if a is not None and b is not None:
            scale = float(a.detach().abs().max()) if a.numel() else 0.0
            if not torch.allclose(b, a, rtol=rtol, atol=rtol * max(scale, 1e-12), equal_nan=True):
                return f"gradient {i} differs by up to {float((a - b).abs().max()):.3g}"
    return ""


__all__ = ["OBJECTIVES", "IWAELoss", "Objective", "TraceUnsupported", "TracedLoss", "objective_problem",
           "parse_objective", "reparameterized_elbo_loss"]

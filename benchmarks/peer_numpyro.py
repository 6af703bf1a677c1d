"""Peer benchmark: NumPyro's time per SVI step on the MNIST VAE of ``benchmarks/vae_step_time.py``.

Runs in its own virtual environment (it imports neither torch nor pyro_lvm), e.g.

    python3.11 -m venv /tmp/numpyro-venv
    /tmp/numpyro-venv/bin/pip install 'numpyro==0.22.0' 'jax==0.10.2' 'jaxlib==0.10.2'
    /tmp/numpyro-venv/bin/python benchmarks/peer_numpyro.py --steps 300 --warmup 20 --threads 1

``python -m benchmarks.vae_step_time`` builds that environment itself when it is missing (``--numpyro-python`` names
another interpreter) and runs this script once per round, between its own paths. (NumPyro 0.19, the first pick, does
not import under JAX 0.10: it reads ``jax.interpreters.pxla.xla_pmap_p``, which JAX removed; 0.22 is the NumPyro
release for it.)

The job, the same as the other paths': a VAE with encoder 784-300-300 (ReLU) -> 40-d diagonal Gaussian (scale =
softplus + 1e-6, the scale head's weights x 0.01 and bias softplus^-1(0.1), as ``pyro_lvm``'s guide) and decoder
40-300-300-784 (ReLU) -> Bernoulli logits, prior N(0, I); PyTorch's default initialisation of every linear layer
(uniform in +-1/sqrt(fan_in)); minibatches of 100 from the 50,000 binarized MNIST training images, one shuffled pass
per epoch (NumPy gathers each minibatch on the host, as the PyTorch loops gather theirs); the single-sample ELBO
estimator ``Trace_ELBO`` with the minibatch scaled to a per-point loss (-ELBO(x_b) N/B / N); Adam with learning
rate 1e-3 after clipping the gradient's global norm to 100 (torch's rule: scale by min(1, 100 / (norm + 1e-6)));
``jax.jit(svi.update)``. Each step ends with the loss read to the host and checked to be finite (the PyTorch paths'
NaN check), which also waits for the step to finish.

Threads: ``--threads n`` confines the process to n CPUs (its affinity mask, inherited by every thread XLA starts)
and asks XLA's CPU client for one thread (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` and ``OMP_NUM_THREADS``, set before JAX is imported; the flags alone left JAX 0.10
at 1.7 CPU seconds per wall second); the process's CPU time per wall second over the timed steps is reported beside
the times, as a check.

Output: one JSON object on stdout (``--json``) or a line of text: the median seconds per step after warm-up (wall
clock, and the process's CPU clock), every step's time, the CPU-time ratio, and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DATA_DIM, HIDDEN, LATENT, BATCH, LR, CLIP = 784, (300, 300), 40, 100, 1e-3, 100.0
INIT_SCALE = 0.1


def _threads(n: int) -> list[int]:
    """Confine XLA (and any OpenMP in its libraries) to ``n`` threads and the process to ``n`` CPUs; before JAX is
    imported. The CPUs it may run on, in order.

    The flags alone do not hold JAX 0.10's CPU client to one thread: with them, measured on the 2-core machine, its
    step used 1.7 CPU seconds per wall second (its runtime's own thread pool), so a "1 thread" NumPyro step had
    nearly two cores against torch's one. The affinity mask does hold every thread it starts to ``n`` CPUs."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cpus = sorted(os.sched_getaffinity(0))
    if n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
    return sorted(os.sched_getaffinity(0))


def load_train(path: Path) -> Any:
    """The training split of binarized_mnist.npz (packed bits, see shared/data/README.md) as float32 0/1."""
    import numpy as np

    with np.load(path) as f:
        packed = f["train"]
    return np.ascontiguousarray(np.unpackbits(packed, axis=1)[:, :DATA_DIM].astype(np.float32))


def run(a: argparse.Namespace) -> dict[str, Any]:
    cpus = _threads(a.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro import handlers
    from numpyro.infer import SVI, Trace_ELBO

    x_all = load_train(Path(a.data))
    n = len(x_all)
    rng = np.random.default_rng(a.seed)

    def linear(fan_in: int, fan_out: int) -> tuple[Any, Any]:
        bound = 1.0 / np.sqrt(fan_in)  # torch.nn.Linear's default initialisation
        w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
        return jnp.asarray(w), jnp.asarray(b)

    def mlp(prefix: str, sizes: tuple[int, ...]) -> list[tuple[Any, Any]]:
        layers = []
        for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            w0, b0 = linear(fi, fo)
            layers.append((numpyro.param(f"{prefix}_w{i}", w0), numpyro.param(f"{prefix}_b{i}", b0)))
        return layers

    def forward(layers: list[tuple[Any, Any]], h: Any, last_relu: bool) -> Any:
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if last_relu or i < len(layers) - 1:
                h = jax.nn.relu(h)
        return h

    def model(x: Any) -> None:
        dec = mlp("dec", (LATENT, *HIDDEN, DATA_DIM))
        with numpyro.plate("data", x.shape[0]), handlers.scale(scale=1.0 / x.shape[0]):  # (N / B) / N
            z = numpyro.sample("z", dist.Normal(jnp.zeros(LATENT), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=forward(dec, z, last_relu=False)).to_event(1), obs=x)

    def guide(x: Any) -> None:
        enc = mlp("enc", (DATA_DIM, *HIDDEN))
        w_loc, b_loc = linear(HIDDEN[-1], LATENT)
        w_s, _ = linear(HIDDEN[-1], LATENT)
        loc_w, loc_b = numpyro.param("loc_w", w_loc), numpyro.param("loc_b", b_loc)
        scale_w = numpyro.param("scale_w", w_s * 0.01)
        scale_b = numpyro.param("scale_b", jnp.full(LATENT, np.log(np.expm1(INIT_SCALE)), dtype=jnp.float32))
        h = forward(enc, x, last_relu=True)
        loc, scale = h @ loc_w + loc_b, jax.nn.softplus(h @ scale_w + scale_b) + 1e-6
        with numpyro.plate("data", x.shape[0]), handlers.scale(scale=1.0 / x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    class ClippedGlobalAdam(numpyro.optim.Adam):
        """Adam after clipping the gradient's global 2-norm, as ``torch.nn.utils.clip_grad_norm_``."""

        def update(self, g: Any, state: Any, value: Any = None) -> Any:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g)))
            coef = jnp.minimum(1.0, CLIP / (norm + 1e-6))
            return super().update(jax.tree.map(lambda v: v * coef, g), state, value)

    svi = SVI(model, guide, ClippedGlobalAdam(LR), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(a.seed), jnp.asarray(x_all[:BATCH]))
    update = jax.jit(svi.update)

    per_epoch = n // BATCH
    total = a.warmup + a.steps
    times: list[float] = []
    cpu_times: list[float] = []
    perm = rng.permutation(n)
    cpu0 = wall0 = 0.0
    t_prev, c_prev = time.perf_counter(), time.process_time()
    for step in range(total):
        if step == a.warmup:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        i = step % per_epoch
        if i == 0 and step:
            perm = rng.permutation(n)
        xb = x_all[perm[i * BATCH:(i + 1) * BATCH]]
        state, loss = update(state, xb)
        value = float(loss)  # to the host: the step has finished
        if not np.isfinite(value):
            raise RuntimeError(f"numpyro: loss became {value} at step {step}")
        now, c = time.perf_counter(), time.process_time()
        times.append(now - t_prev)
        cpu_times.append(c - c_prev)
        t_prev, c_prev = now, c
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    timed = times[a.warmup:]
    return {"benchmark": "peer_numpyro", "library": f"numpyro {numpyro.__version__}",
            "jax": jax.__version__, "python": platform.python_version(), "threads": a.threads, "cpus": cpus,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": a.steps, "warmup_steps": a.warmup,
            "seconds_per_step": statistics.median(timed), "step_seconds": timed,
            "cpu_seconds_per_step": statistics.median(cpu_times[a.warmup:]),
            "cpu_seconds_per_wall_second": cpu / wall if wall > 0 else float("nan"),
            "final_loss": value}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/binarized_mnist.npz", help="binarized_mnist.npz (packed bits)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object (what vae_step_time reads)")
    a = p.parse_args(argv)
    res = run(a)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['library']} (jax {res['jax']}), {res['threads']} thread(s): "
              f"{1000 * res['seconds_per_step']:.2f} ms / step (median of {res['steps']} after {res['warmup_steps']}), "
              f"CPU/wall {res['cpu_seconds_per_wall_second']:.2f}, final loss {res['final_loss']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: IWAE-K evaluation of the MNIST VAE against its GEMM limit, s per test image.

    python -m benchmarks.iwae_eval --threads 1 --iwae-k 5000 --points 20 --rounds 5 --output runs/bench_iwae

The vanilla MNIST VAE (784-300-300-40 MLP decoder with Bernoulli logits, diagonal Gaussian encoder 784-300-300;
random weights) scores K draws per test image (binarized MNIST, ``--data-dir``). Its arithmetic is almost all
in the decoder's three GEMMs, so the limit is

* FLOPs per image: 2·K·(40·300 + 300·300 + 300·784) for the decoder (each Linear layer's in × out, counted from the
  modules), plus the encoder's one pass over the image (784·300 + 300·300 + 2·300·40, both heads), times 2;
* the machine's GEMM rate: ``torch.mm`` of (M, in) by (in, out) in the evaluation's dtype at ``--threads``
  threads, for each decoder layer's shape, at several row counts M (the fused pass's row block, the row count
  the trace path multiplies at once, ``--gemm-rows``); each shape's rate is its best over M;
* limit s / image = Σ_layers FLOPs_layer / rate_layer (+ the encoder's FLOPs at the decoder's overall rate).

and the actual cost is ``pyro_lvm.evaluate(model, guide, x, iwae_k=K, seed=..., threads=...)`` as a user calls it,
per image, by two paths over the same points and the same draws: ``fused`` (the default: the VAE's fused importance
pass) and ``traces`` (``fused=False``: Pyro traces per chunk, as evaluation ran before). Each round measures the
GEMM rates and both paths, in an order rotated from round to round; every figure is a median over rounds, on the
wall clock and on the process's CPU clock (a one-thread job on a shared machine is stretched less on the CPU
clock; the limit is taken on the same clock as the time it is compared with). The peak resident-memory increase
of each path is measured after the rounds, in one more untimed run per path (sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from pyro_lvm.data import DataConfig, load_dataset
from pyro_lvm.evaluate import EvalConfig, evaluate
from pyro_lvm.experiments.cli import positive_int, run_main

from . import name_list, write_outputs
from .vae_step_time import PeakRSS, build

#: the evaluation paths timed (``fused``: the default; ``traces``: ``EvalConfig(fused=False)``)
PATHS = ("fused", "traces")
CLOCKS = ("wall", "cpu")


def linear_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every ``nn.Linear`` in ``module``, in order."""
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def flops_per_image(model: Any, guide: Any, iwae_k: int) -> dict[str, int]:
    """Multiply-adds × 2 per test image: K decoder passes and one encoder pass (trunk and heads)."""
    decoder = 2 * iwae_k * sum(i * o for i, o in linear_shapes(model.decoder))
    encoder = 2 * sum(i * o for i, o in linear_shapes(guide))
    return {"decoder": decoder, "encoder": encoder, "total": decoder + encoder}


def gemm_seconds(rows: int, inner: int, outer: int, dtype: torch.dtype, min_flops: float = 2e8) -> dict[str, float]:
    """Seconds of one ``torch.mm`` (rows, inner) @ (inner, outer) into a preallocated output, on both clocks:
    median of 3 batches of calls, each batch at least ``min_flops`` of work (after one warm-up call)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=g, dtype=dtype)
    b = torch.randn(outer, inner, generator=g, dtype=dtype).T  # a Linear's weight, transposed as F.linear uses it
    out = torch.empty(rows, outer, dtype=dtype)
    torch.mm(a, b, out=out)
    reps = max(1, int(min_flops // (2 * rows * inner * outer)))
    wall, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        wall.append((time.perf_counter() - t0) / reps)
        cpu.append((time.process_time() - c0) / reps)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def gemm_round(shapes: list[tuple[int, int]], rows: list[int], dtype: torch.dtype,
               min_flops: float) -> dict[str, dict[str, dict[int, float]]]:
    """GFLOP/s of every decoder shape at every row count M, per clock: ``{clock: {"in x out": {M: rate}}}``."""
    out: dict[str, dict[str, dict[int, float]]] = {c: {} for c in CLOCKS}
    for i, o in shapes:
        for m in rows:
            secs = gemm_seconds(m, i, o, dtype, min_flops)
            for c in CLOCKS:
                out[c].setdefault(f"{i}x{o}", {})[m] = 2 * m * i * o / max(secs[c], 1e-12) / 1e9
    return out


def limit_seconds(shapes: list[tuple[int, int]], rates: dict[str, float], iwae_k: int,
                  encoder_flops: int) -> tuple[float, float]:
    """(limit s / image, the decoder's overall GFLOP/s) from each shape's best rate."""
    dec = sum(2 * iwae_k * i * o / (rates[f"{i}x{o}"] * 1e9) for i, o in shapes)
    overall = 2 * iwae_k * sum(i * o for i, o in shapes) / dec / 1e9
    return dec + encoder_flops / (overall * 1e9), overall


def eval_round(model: Any, guide: Any, x: torch.Tensor, config: EvalConfig) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluate(model, guide, x, config)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall / len(x), "cpu": cpu / len(x), "iwae": out["iwae"], "elbo": out["elbo"]}


def peak_memory(model: Any, guide: Any, x: torch.Tensor, config: EvalConfig) -> float:
    """MiB the evaluation adds to the resident set at its peak (its own, untimed run: the sampler is a thread)."""
    with PeakRSS() as mem:
        evaluate(model, guide, x, config)
    return mem.peak - mem.start


def run(iwae_k: int, points: int, rounds: int, threads: int, seed: int, data_dir: str | None, max_rows: int,
        gemm_rows: Sequence[int], paths: Sequence[str], min_flops: float = 2e8) -> dict[str, Any]:
    torch.set_num_threads(threads)
    ds = load_dataset("binarized_mnist", DataConfig(data_dir=data_dir, seed=seed))
    model, guide = build(seed)
    x = ds.test[:points].contiguous()
    dtype = next(model.parameters()).dtype
    shapes = linear_shapes(model.decoder)
    flops = flops_per_image(model, guide, iwae_k)
    block = min(iwae_k, max(1, model.EVAL_BLOCK_BYTES // (max(model.data_dim, *model.config.hidden)
                                                         * torch.empty((), dtype=dtype).element_size())))
    chunk_points = max(1, min(len(x), max_rows // iwae_k))  # per_point_bounds' chunk: points × samples
    trace_rows = chunk_points * max(1, min(iwae_k, max_rows // chunk_points))
    rows = sorted({block, trace_rows, *gemm_rows})
    configs = {p: EvalConfig(iwae_k=iwae_k, max_rows=max_rows, seed=seed, threads=threads, fused=p == "fused")
               for p in paths}
    for p in paths:  # warm-up: first calls (ArviZ's import, allocator growth) are not timed
        evaluate(model, guide, x[:1], configs[p])
    gemm: list[dict[str, dict[str, dict[int, float]]]] = []
    evals: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    jobs = ["gemm", *paths]
    for r in range(rounds):
        for job in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:  # rotated: none always first or last
            if job == "gemm":
                gemm.append(gemm_round(shapes, rows, dtype, min_flops))
            else:
                evals[job].append(eval_round(model, guide, x, configs[job]))
    res: dict[str, Any] = {
        "benchmark": "iwae_eval", "network": "784-300-300-40 decoder, 784-300-300 encoder", "iwae_k": iwae_k,
        "points": len(x), "rounds": rounds, "threads": threads, "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."), "max_rows": max_rows, "fused_block_rows": block,
        "trace_chunk_rows": trace_rows, "gemm_rows": rows, "decoder_shapes": [f"{i}x{o}" for i, o in shapes],
        "flops_per_image": flops, "torch": torch.__version__, "cpu_count": os.cpu_count(), "paths": list(paths)}
    per_clock: dict[str, Any] = {}
    for c in CLOCKS:
        # per round: each shape's best rate over M, the limit it gives, and each path's ratio to it
        limits, overall, best_rows = [], [], []
        for g in gemm:
            rates = {s: max(v.values()) for s, v in g[c].items()}
            lim, tot = limit_seconds(shapes, rates, iwae_k, flops["encoder"])
            limits.append(lim)
            overall.append(tot)
            best_rows.append({s: max(v, key=v.get) for s, v in g[c].items()})
        entry: dict[str, Any] = {
            "gemm_gflops": statistics.median(overall), "gemm_gflops_per_round": overall,
            "gemm_gflops_by_shape_and_rows": {s: {m: statistics.median(g[c][s][m] for g in gemm) for m in rows}
                                              for s in gemm[0][c]},
            "gemm_best_rows_per_round": best_rows,
            "limit_seconds_per_image": statistics.median(limits), "limit_seconds_per_image_per_round": limits}
        for p in paths:
            secs = [e[c] for e in evals[p]]
            ratios = [s / lim for s, lim in zip(secs, limits, strict=True)]
            entry[p] = {"seconds_per_image": statistics.median(secs), "seconds_per_image_per_round": secs,
                        "ratio_to_limit": statistics.median(ratios), "ratio_to_limit_per_round": ratios,
                        "extrapolated_minutes_10000_images": statistics.median(secs) * 10_000 / 60}
        if "fused" in paths and "traces" in paths:
            speed = [t[c] / f[c] for t, f in zip(evals["traces"], evals["fused"], strict=True)]
            entry["traces_over_fused"] = statistics.median(speed)
            entry["traces_over_fused_per_round"] = speed
        per_clock[c] = entry
    res["clocks"] = per_clock
    res["peak_rss_increase_mib"] = {p: peak_memory(model, guide, x, configs[p]) for p in paths}
    res["bounds"] = {p: {"iwae": evals[p][-1]["iwae"], "elbo": evals[p][-1]["elbo"]} for p in paths}
    res["load_average_at_end"] = os.getloadavg()
    return res


def table(res: dict[str, Any]) -> str:
    f = res["flops_per_image"]
    lines = [f"IWAE-{res['iwae_k']} of the MNIST VAE ({res['network']}, {res['dtype']}, random weights) on "
             f"{res['points']} test images, {res['threads']} thread(s), {res['rounds']} interleaved rounds (medians); "
             f"torch {res['torch']}, {res['cpu_count']} CPUs, load average at the end "
             f"{', '.join(f'{v:.1f}' for v in res['load_average_at_end'])}", "",
             f"FLOPs per image: {f['total'] / 1e9:.4g} G (decoder {f['decoder'] / 1e9:.4g} G = 2·K·"
             f"({' + '.join(s.replace('x', '·') for s in res['decoder_shapes'])}), "
             f"encoder {f['encoder'] / 1e6:.3g} M); fused row block {res['fused_block_rows']}, "
             f"trace chunk {res['trace_chunk_rows']} rows", ""]
    paths = res["paths"]
    head = "| clock | GEMM GFLOP/s | limit s / image | " + " | ".join(
        f"{p} s / image | {p} ÷ limit" for p in paths) + (" | traces ÷ fused |" if len(paths) == 2 else " |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for c, e in res["clocks"].items():
        cells = [c, f"{e['gemm_gflops']:.1f}", f"{e['limit_seconds_per_image']:.4f}"]
        for p in paths:
            cells += [f"{e[p]['seconds_per_image']:.4f}", f"{e[p]['ratio_to_limit']:.2f}"]
        if "traces_over_fused" in e:
            cells.append(f"{e['traces_over_fused']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "GEMM GFLOP/s by shape and rows M (wall clock, medians):", "",
              "| shape | " + " | ".join(f"M = {m}" for m in res["gemm_rows"]) + " |",
              "|" + "---|" * (len(res["gemm_rows"]) + 1)]
    for s, v in res["clocks"]["wall"]["gemm_gflops_by_shape_and_rows"].items():
        lines.append(f"| {s} | " + " | ".join(f"{v[m]:.1f}" for m in res["gemm_rows"]) + " |")
    mem = ", ".join(f"{p} {v:.0f} MiB" for p, v in res["peak_rss_increase_mib"].items())
    mins = ", ".join(f"{p} {res['clocks']['wall'][p]['extrapolated_minutes_10000_images']:.1f} min" for p in paths)
    lines += ["", f"Peak resident-memory increase (one untimed run each, after the rounds): {mem}. "
              f"The 10,000 test images: {mins} (wall clock)."]
    return "\n".join(lines) + "\n"


def _rows(text: str) -> list[int]:
    try:
        rows = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        rows = [0]
    if any(r < 1 for r in rows):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.iwae_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iwae-k", type=positive_int, default=5000)
    p.add_argument("--points", type=positive_int, default=20, help="test images evaluated per round and path")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds")
    p.add_argument("--paths", type=name_list(PATHS), default=list(PATHS),
                   help=f"comma-separated, from: {', '.join(PATHS)}")
    p.add_argument("--max-rows", type=positive_int, default=EvalConfig.max_rows, help="EvalConfig.max_rows")
    p.add_argument("--gemm-rows", type=_rows, default=[256, 1024, 4096],
                   help="row counts M at which the GEMM rate is also measured (besides the two paths' own)")
    p.add_argument("--gemm-flops", type=float, default=2e8, help="work per timed batch of GEMM calls")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench_iwae")
    a = p.parse_args(argv)
    res = run(a.iwae_k, a.points, a.rounds, a.threads, a.seed, a.data_dir, a.max_rows, a.gemm_rows, a.paths,
              a.gemm_flops)
    write_outputs(a.output, res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

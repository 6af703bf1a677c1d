"""Peer benchmark: seconds per epoch of the MNIST VAE job in pythae 0.1.2, and its test NLL.

Runs in its own virtual environment (it does not import pyro_lvm), e.g.

    python3.11 -m venv /tmp/pythae-venv
    /tmp/pythae-venv/bin/pip install 'torch==2.13.0' 'pythae==0.1.2'   # the CPU wheel of torch 2.13.0
    /tmp/pythae-venv/bin/python benchmarks/peer_pythae.py --data ../shared/data/binarized_mnist.npz \\
        --seeds 0,1,2 --epochs 5 --threads 2 --output runs/bench_pythae

The job (the same as ``benchmarks/epoch_time.py``): a VAE with encoder 784-300-300 (ReLU) -> 40-d diagonal
Gaussian and decoder 40-300-300-784 Bernoulli, written as pythae ``BaseEncoder``/``BaseDecoder`` networks for
pythae's ``VAE`` with ``reconstruction_loss="bce"``; Adam 1e-3, batch size 100 for training and evaluation, 5
epochs on the 50,000 training images, the 10,000 validation images as pythae's eval dataset (evaluated every
epoch), run through ``TrainingPipeline`` -> ``BaseTrainer`` with pythae's default checkpoint and saving behaviour
(no intermediate checkpoints, ``steps_saving=None``; a deep copy of the best model on the eval loss kept each
epoch; the final model written under ``--output/seed_<s>/VAE_training_<timestamp>/final_model``).

Timing, per seed:
  * ``seconds_per_epoch``: wall time of the whole ``TrainingPipeline(...)(train, eval)`` call (data
    preprocessing, dataset checks, model sanity check, all epochs, final save) divided by the epochs: the
    headline number, what a user timing ``pipeline(...)`` sees.
  * ``train_loop_seconds_per_epoch``: ``on_train_begin`` -> ``on_train_end`` (the trainer's epoch loop plus the
    final save) divided by the epochs.
  * ``epoch_seconds``: each epoch from ``on_epoch_begin`` to its ``on_log`` (training steps, evaluation, the
    best-model deep copy, checkpoint writes if any). pythae itself logs no per-epoch times (only tqdm progress
    bars and losses), so these come from a user ``TrainingCallback``.

NLL: after training, ``VAE.get_nll`` (importance sampling with the encoder as proposal) on the first
``--nll-images`` test images with ``--nll-k`` samples, on the model pythae kept as final (best eval loss).
pythae's convention: ``get_nll`` returns the *mean log-likelihood* log p(x) in nats per image (a negative
number, despite the name); the Bernoulli log-likelihood is ``-binary_cross_entropy`` summed over the 784 pixels
(PyTorch clamps its logs at -100), and the 2*pi terms of log p(z) and log q(z|x) are dropped because they
cancel. We report ``nll = -get_nll(...)`` (positive nats, lower is better). ``get_nll`` draws its samples in
batches of ``batch_size`` copies of one image; it rounds K down to a multiple of ``batch_size`` and, when K is
below ``batch_size``, silently uses ``batch_size`` samples, so we pass ``batch_size=min(K, 100)`` and record the
K actually used.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig
from pythae.trainers.training_callbacks import TrainingCallback

DATA_DIM = 784
HIDDEN = (300, 300)
LATENT = 40
BATCH = 100
LR = 1e-3


class Encoder(BaseEncoder):
    """784-300-300 ReLU MLP -> mean and log-variance of a 40-d diagonal Gaussian."""

    def __init__(self) -> None:
        BaseEncoder.__init__(self)
        self.body = nn.Sequential(nn.Linear(DATA_DIM, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU())
        self.mean = nn.Linear(HIDDEN[1], LATENT)
        self.log_var = nn.Linear(HIDDEN[1], LATENT)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        h = self.body(x.reshape(x.shape[0], -1))
        return ModelOutput(embedding=self.mean(h), log_covariance=self.log_var(h))


class Decoder(BaseDecoder):
    """40-300-300-784 ReLU MLP -> Bernoulli means (sigmoid), as pythae's "bce" loss expects."""

    def __init__(self) -> None:
        BaseDecoder.__init__(self)
        self.net = nn.Sequential(nn.Linear(LATENT, HIDDEN[1]), nn.ReLU(), nn.Linear(HIDDEN[1], HIDDEN[0]), nn.ReLU(),
                                 nn.Linear(HIDDEN[0], DATA_DIM), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> ModelOutput:
        return ModelOutput(reconstruction=self.net(z))


class EpochTimer(TrainingCallback):
    """Wall time of each epoch (on_epoch_begin -> on_log) and of the trainer's loop, plus the logged losses."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.losses: list[dict[str, float]] = []
        self.train_begin = self.train_end = float("nan")
        self._t0 = float("nan")

    def on_train_begin(self, training_config, **kwargs):
        self.train_begin = time.perf_counter()

    def on_epoch_begin(self, training_config, **kwargs):
        self._t0 = time.perf_counter()

    def on_log(self, training_config, logs, **kwargs):
        self.epoch_seconds.append(time.perf_counter() - self._t0)
        self.losses.append({k: float(v) for k, v in logs.items()})

    def on_train_end(self, training_config, **kwargs):
        self.train_end = time.perf_counter()


def load_split(path: Path, key: str) -> np.ndarray:
    """One split of binarized_mnist.npz (packed bits, see shared/data/README.md) as float32 0/1, shape (N, 784)."""
    with np.load(path) as f:
        packed = f[key]
    return np.unpackbits(packed, axis=1)[:, :DATA_DIM].astype(np.float32)


def one_seed(seed: int, epochs: int, train: np.ndarray, valid: np.ndarray, test: np.ndarray, out: Path,
             nll_k: int) -> dict[str, Any]:
    torch.manual_seed(seed)  # network initialisation; pythae seeds its training itself from training_config.seed
    model = VAE(VAEConfig(input_dim=(DATA_DIM,), latent_dim=LATENT, reconstruction_loss="bce"),
                encoder=Encoder(), decoder=Decoder())
    cfg = BaseTrainerConfig(output_dir=str(out / f"seed_{seed}"), num_epochs=epochs, learning_rate=LR,
                            per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
                            optimizer_cls="Adam", seed=seed, no_cuda=True)
    pipeline = TrainingPipeline(model=model, training_config=cfg)
    timer = EpochTimer()
    t0 = time.perf_counter()
    pipeline(train_data=train, eval_data=valid, callbacks=[timer])
    total = time.perf_counter() - t0
    trainer = pipeline.trainer
    final = trainer._best_model  # the model pythae saved as final_model (best eval loss)
    res: dict[str, Any] = {
        "seed": seed,
        "pipeline_seconds": total,
        "seconds_per_epoch": total / epochs,
        "train_loop_seconds_per_epoch": (timer.train_end - timer.train_begin) / epochs,
        "epoch_seconds": timer.epoch_seconds,
        "losses": timer.losses,  # pythae's train/eval epoch losses: mean negative ELBO per image, nats
        "final_model_dir": os.path.join(trainer.training_dir, "final_model"),
    }
    if hasattr(final, "get_nll") and len(test) > 0:
        bs = min(nll_k, BATCH)
        k_used = max(1, nll_k // bs) * bs
        x = torch.from_numpy(test)
        final.eval()
        t1 = time.perf_counter()
        with torch.no_grad():
            loglik = float(final.get_nll(x, n_samples=nll_k, batch_size=bs))
        res.update({"test_nll": -loglik, "test_loglik_pythae": loglik, "nll_k_used": k_used,
                    "nll_seconds": time.perf_counter() - t1})
    else:
        res.update({"test_nll": None, "nll_note": "pythae's VAE has no get_nll"})
    return res


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    path = Path(a.data)
    train = load_split(path, "train")
    if a.subset is not None:
        train = train[: a.subset]
    valid = load_split(path, "valid")
    test = load_split(path, "test")[: a.nll_images]
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in a.seeds:
        r = one_seed(seed, a.epochs, train, valid, test, out, a.nll_k)
        runs.append(r)
        nll = f", test NLL {r['test_nll']:.2f} nats (K={r.get('nll_k_used')})" if r["test_nll"] is not None else ""
        print(f"seed {seed}: {r['seconds_per_epoch']:.2f} s/epoch (pipeline), "
              f"{r['train_loop_seconds_per_epoch']:.2f} s/epoch (trainer loop), epochs "
              f"{', '.join(f'{s:.2f}' for s in r['epoch_seconds'])} s{nll}", file=sys.stderr, flush=True)
    spe = [r["seconds_per_epoch"] for r in runs]
    loop = [r["train_loop_seconds_per_epoch"] for r in runs]
    per_epoch = [s for r in runs for s in r["epoch_seconds"]]
    nlls = [r["test_nll"] for r in runs if r["test_nll"] is not None]
    summary = {
        "seconds_per_epoch_mean": statistics.fmean(spe), "seconds_per_epoch_sd": _sd(spe),
        "seconds_per_epoch_median": statistics.median(spe),
        "train_loop_seconds_per_epoch_mean": statistics.fmean(loop), "train_loop_seconds_per_epoch_sd": _sd(loop),
        "callback_epoch_seconds_mean": statistics.fmean(per_epoch), "callback_epoch_seconds_sd": _sd(per_epoch),
        "test_nll_mean": statistics.fmean(nlls) if nlls else None, "test_nll_sd": _sd(nlls) if nlls else None,
    }
    return {
        "benchmark": "peer_pythae",
        "library": f"pythae {importlib.metadata.version('pythae')}",
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "job": "MNIST VAE 784-300-300-40 (ReLU), Bernoulli decoder (bce), diagonal Gaussian encoder, Adam 1e-3, "
               "batch 100 (train and eval), validation on the 10,000 validation images every epoch, "
               "pythae TrainingPipeline/BaseTrainer defaults for checkpoints and saving",
        "train_points": len(train), "valid_points": len(valid), "epochs": a.epochs, "seeds": list(a.seeds),
        "nll": {"test_images": len(test), "k_requested": a.nll_k,
                "convention": "test_nll = -VAE.get_nll(...): pythae's get_nll returns the mean importance-sampled "
                              "log p(x) in nats per image (Bernoulli log-likelihood = -BCE summed over 784 pixels, "
                              "log-terms clamped at -100 by torch; proposal q(z|x); 2*pi terms cancel)"},
        "summary": summary, "runs": runs,
    }


def table(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"# pythae peer benchmark ({res['library']}, torch {res['torch']}, {res['threads']} threads)", "",
             f"{res['train_points']} training images, {res['valid_points']} validation images, {res['epochs']} "
             f"epochs, seeds {', '.join(map(str, res['seeds']))}.", "",
             "| seed | s / epoch (pipeline) | s / epoch (trainer loop) | per-epoch (callback) | final eval loss | "
             "test NLL (nats) |", "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        ev = r["losses"][-1].get("eval_epoch_loss", float("nan")) if r["losses"] else float("nan")
        nll = f"{r['test_nll']:.2f}" if r["test_nll"] is not None else "n/a"
        lines.append(f"| {r['seed']} | {r['seconds_per_epoch']:.2f} | {r['train_loop_seconds_per_epoch']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['epoch_seconds'])} | {ev:.2f} | {nll} |")
    nll_m = (f"{s['test_nll_mean']:.2f} ± {s['test_nll_sd']:.2f}" if s["test_nll_mean"] is not None else "n/a")
    lines += ["", f"s / epoch (pipeline): {s['seconds_per_epoch_mean']:.2f} ± {s['seconds_per_epoch_sd']:.2f} "
                  f"(median {s['seconds_per_epoch_median']:.2f}); trainer loop: "
                  f"{s['train_loop_seconds_per_epoch_mean']:.2f} ± {s['train_loop_seconds_per_epoch_sd']:.2f}; "
                  f"per epoch (callback): {s['callback_epoch_seconds_mean']:.2f} ± "
                  f"{s['callback_epoch_seconds_sd']:.2f}", "",
              f"Test NLL on the first {res['nll']['test_images']} test images, K={res['nll']['k_requested']} "
              f"requested: {nll_m} nats. Convention: {res['nll']['convention']}.", ""]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _pos(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/binarized_mnist.npz", help="binarized_mnist.npz (packed bits)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--epochs", type=_pos, default=5)
    p.add_argument("--threads", type=_pos, default=2, help="torch.set_num_threads")
    p.add_argument("--subset", type=_pos, default=None, help="first N training images (default: all 50,000)")
    p.add_argument("--nll-images", type=int, default=2000, help="first N test images for the NLL (0: skip)")
    p.add_argument("--nll-k", type=_pos, default=5000, help="importance samples per test image")
    p.add_argument("--output", default="runs/bench_pythae")
    a = p.parse_args(argv)
    res = run(a)
    out = Path(a.output)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = table(res)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

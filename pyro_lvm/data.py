"""Data sets: scikit-learn's bundled sets, static binarized MNIST, and synthetic data with known truth.

Every loader returns a :class:`Dataset` of train/valid/test tensors, validated at the boundary.
Nothing here downloads anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_lvm.checks import check_matrix
from pyro_lvm.registry import Registry

#: environment variable naming the directory that holds binarized MNIST
DATA_DIR_ENV = "PYRO_LVM_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DataConfig:
    seed: int = 0
    #: train / valid / test fractions for data sets without a fixed split
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    #: directory with binarized_mnist.npz or binarized_mnist_{train,valid,test}.amat
    data_dir: str | None = None
    #: keep at most this many points per split, drawn at random by ``seed``; ``None`` keeps all
    subset: int | None = None
    dtype: torch.dtype = torch.float32
    #: synthetic data: number of points and dimensions
    num_points: int = 2000
    data_dim: int = 10
    latent_dim: int = 3
    #: synthetic mixture data: components and the least distance between two means
    num_components: int = 3
    separation: float = 6.0
    #: digits_pca: principal components kept
    pca_dim: int = 10


@dataclass
class Dataset:
    name: str
    train: torch.Tensor
    valid: torch.Tensor | None
    test: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    #: True when every value is 0 or 1 (a Bernoulli decoder may be used)
    binary: bool = False
    image_shape: tuple[int, int] | None = None
    #: loader-specific facts: true parameters of synthetic data, dropped columns, file path, ...
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dim(self) -> int:
        return self.train.shape[1]

    def sizes(self) -> dict[str, int]:
        """Points per split and the dimension, as recorded in ``results.json``."""
        return {"train": len(self.train), "valid": 0 if self.valid is None else len(self.valid),
                "test": len(self.test), "dim": self.data_dim}

    def splits(self) -> dict[str, torch.Tensor]:
        out = {"train": self.train, "test": self.test}
        if self.valid is not None:
            out["valid"] = self.valid
        return out


Loader = Callable[[DataConfig], Dataset]
DATASETS: Registry[Loader] = Registry("dataset")
register_dataset = DATASETS.register


def load_dataset(name: str, config: DataConfig | None = None) -> Dataset:
    """Load a registered data set by name (unknown names list the valid ones)."""
    config = config or DataConfig()
    ds = DATASETS[name](config)
    for split, x in ds.splits().items():
        check_matrix(x, name=f"{name} {split} split", width=ds.data_dim)
    return ds


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into train/valid/test parts."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    return [perm[:n_train], perm[n_train:n_train + n_valid], perm[n_train + n_valid:]]


def standardize_splits(
    name: str, x: np.ndarray, y: np.ndarray | None, config: DataConfig, **meta: Any
) -> Dataset:
    """Split ``x`` by ``config``, standardize with train statistics only, drop columns constant in train."""
    x = check_matrix(torch.as_tensor(np.asarray(x, dtype=np.float64)), name=name).numpy()
    parts = split_indices(len(x), config.split, config.seed)
    if len(parts[0]) < 2 or len(parts[2]) == 0:
        raise ValueError(f"{name}: split {config.split} of {len(x)} points leaves too few train or test points")
    train = x[parts[0]]
    mean, std = train.mean(0), train.std(0)
    keep = std > 1e-8
    z = (x[:, keep] - mean[keep]) / std[keep]

    def part(idx: np.ndarray) -> torch.Tensor:
        idx = idx[: config.subset] if config.subset else idx
        return torch.as_tensor(z[idx], dtype=config.dtype)

    def lab(idx: np.ndarray) -> torch.Tensor:
        idx = idx[: config.subset] if config.subset else idx
        return torch.as_tensor(y[idx])

    labels = {} if y is None else {s: lab(i) for s, i in zip(("train", "valid", "test"), parts, strict=True)}
    return Dataset(
        name=name,
        train=part(parts[0]),
        valid=part(parts[1]) if len(parts[1]) else None,
        test=part(parts[2]),
        labels=labels,
        meta={"dropped_constant_columns": np.flatnonzero(~keep).tolist(), "train_mean": mean[keep].tolist(),
              "train_std": std[keep].tolist(), "split": list(config.split), **meta},
    )


def _sklearn_loader(fn_name: str, image_shape: tuple[int, int] | None = None) -> Loader:
    def load(config: DataConfig) -> Dataset:
        import sklearn.datasets

        x, y = getattr(sklearn.datasets, fn_name)(return_X_y=True)
        ds = standardize_splits(fn_name.removeprefix("load_"), x, y, config, source=f"sklearn.datasets.{fn_name}")
        if image_shape is not None and ds.data_dim == image_shape[0] * image_shape[1]:
            ds.image_shape = image_shape
        return ds

    load.__doc__ = f"scikit-learn's bundled ``{fn_name}``, split and standardized by the train split."
    return load


for _name, _fn in [("breast_cancer", "load_breast_cancer"), ("wine", "load_wine"), ("iris", "load_iris")]:
    register_dataset(_name)(_sklearn_loader(_fn))


@register_dataset("digits")
def load_digits(config: DataConfig) -> Dataset:
    """scikit-learn's 8x8 ``digits`` (1797 images), standardized; constant pixels are dropped."""
    ds = _sklearn_loader("load_digits")(config)
    ds.name = "digits"
    if not ds.meta["dropped_constant_columns"]:
        ds.image_shape = (8, 8)
    return ds


@register_dataset("digits_pca")
def load_digits_pca(config: DataConfig) -> Dataset:
    """``digits`` standardized, then projected on its first ``pca_dim`` principal axes (fit on train only)."""
    ds = load_digits(config)
    if not 1 <= config.pca_dim <= ds.data_dim:
        raise ValueError(f"digits_pca: pca_dim must be between 1 and {ds.data_dim}, got {config.pca_dim}")
    train = ds.train.double()
    mean = train.mean(0)
    _, _, vh = torch.linalg.svd(train - mean, full_matrices=False)
    axes = vh[: config.pca_dim].T  # (D, pca_dim)

    def project(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else ((x.double() - mean) @ axes).to(config.dtype)

    return Dataset("digits_pca", project(ds.train), project(ds.valid), project(ds.test), labels=ds.labels,
                   meta={**ds.meta, "pca_dim": config.pca_dim})


# ---------------------------------------------------------------------------------------------
# Static binarized MNIST (Larochelle & Murray 2011)

MNIST_FILE = "binarized_mnist.npz"
MNIST_AMAT = "binarized_mnist_{}.amat"


def mnist_search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where binarized MNIST is looked for, in order: the argument, $PYRO_LVM_DATA_DIR, ../shared/data."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    dirs = []
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    dirs += [Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def read_binarized_mnist(data_dir: str | os.PathLike | None = None) -> tuple[dict[str, np.ndarray], Path]:
    """Read the three splits as uint8 0/1 arrays of shape (N, 784) from ``.npz`` or ``.amat`` files."""
    looked: list[str] = []
    for d in mnist_search_dirs(data_dir):
        npz = d / MNIST_FILE
        looked.append(str(npz))
        if npz.is_file():
            with np.load(npz) as f:
                missing = {"train", "valid", "test"} - set(f.files)
                if missing:
                    raise ValueError(f"{npz}: missing keys {sorted(missing)}; expected train, valid, test")
                return {k: np.unpackbits(f[k], axis=1)[:, :784] for k in ("train", "valid", "test")}, npz
        amats = {k: d / MNIST_AMAT.format(k) for k in ("train", "valid", "test")}
        looked.append(str(d / MNIST_AMAT.format("{train,valid,test}")))
        if all(p.is_file() for p in amats.values()):
            return {k: np.loadtxt(p, dtype=np.uint8).reshape(-1, 784) for k, p in amats.items()}, d
    raise FileNotFoundError(
        "binarized MNIST not found; looked for:\n  " + "\n  ".join(looked)
        + f"\nSupply it with --data-dir DIR or the environment variable {DATA_DIR_ENV}=DIR, where DIR holds "
        f"{MNIST_FILE} (keys train/valid/test, np.packbits(axis=1)) or {MNIST_AMAT.format('{train,valid,test}')}."
    )


@register_dataset("binarized_mnist")
def load_binarized_mnist(config: DataConfig) -> Dataset:
    """Static binarized MNIST with its standard 50000/10000/10000 split."""
    arrays, path = read_binarized_mnist(config.data_dir)
    for k, a in arrays.items():
        if a.ndim != 2 or a.shape[1] != 784 or a.max() > 1:
            raise ValueError(f"{path} [{k}]: expected 0/1 images of 784 pixels, got shape {a.shape}")
    # the files are ordered (the first test images are not representative), so subsets are random
    rng = np.random.default_rng(config.seed)
    t = {k: torch.as_tensor(a[np.sort(rng.permutation(len(a))[: config.subset])] if config.subset else a,
                            dtype=config.dtype) for k, a in arrays.items()}
    return Dataset("binarized_mnist", t["train"], t["valid"], t["test"], binary=True, image_shape=(28, 28),
                   meta={"path": str(path)})


# ---------------------------------------------------------------------------------------------
# Synthetic data with known parameters


def make_factor_analysis_data(
    num_points: int, data_dim: int, latent_dim: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw x = μ + W z + ε with known W, μ, Ψ; returns (x, {"W", "mu", "psi", "cov"})."""
    if latent_dim < 1 or data_dim < 1 or latent_dim > data_dim:
        raise ValueError(f"need 1 <= latent_dim <= data_dim, got latent_dim={latent_dim}, data_dim={data_dim}")
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(data_dim, latent_dim, generator=g, dtype=dtype)
    mu = torch.randn(data_dim, generator=g, dtype=dtype)
    psi = 0.2 + 0.8 * torch.rand(data_dim, generator=g, dtype=dtype)
    z = torch.randn(num_points, latent_dim, generator=g, dtype=dtype)
    x = mu + z @ W.T + psi.sqrt() * torch.randn(num_points, data_dim, generator=g, dtype=dtype)
    return x, {"W": W, "mu": mu, "psi": psi, "cov": W @ W.T + torch.diag(psi)}


def _split_synthetic(name: str, x: torch.Tensor, config: DataConfig, labels: torch.Tensor | None = None,
                     **meta: Any) -> Dataset:
    parts = split_indices(len(x), config.split, config.seed)
    take = [torch.as_tensor(p[: config.subset] if config.subset else p) for p in parts]
    lab = {} if labels is None else {s: labels[t] for s, t in zip(("train", "valid", "test"), take, strict=True)}
    return Dataset(name, x[take[0]].to(config.dtype), x[take[1]].to(config.dtype) if len(take[1]) else None,
                   x[take[2]].to(config.dtype), labels=lab, meta=meta)


@register_dataset("synthetic_mixture")
def load_synthetic_mixture(config: DataConfig) -> Dataset:
    """Gaussian-mixture data from known weights, means and covariances (labels are the true components)."""
    from pyro_lvm.models.gaussian_mixture import make_mixture_data

    x, truth = make_mixture_data(config.num_points, config.data_dim, config.num_components, config.separation,
                                 config.seed)
    return _split_synthetic("synthetic_mixture", x, config, labels=truth["labels"], truth=truth)


@register_dataset("synthetic")
def load_synthetic_fa(config: DataConfig) -> Dataset:
    """Factor-analysis data from known W, μ, Ψ (not standardized, so the truth applies as is)."""
    x, truth = make_factor_analysis_data(config.num_points, config.data_dim, config.latent_dim, config.seed)
    return _split_synthetic("synthetic", x, config, truth=truth)

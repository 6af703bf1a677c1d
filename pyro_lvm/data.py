"""Data sets: scikit-learn's bundled sets, static binarized MNIST, synthetic data with known truth, and the
user's own data (:func:`from_array` for arrays/tensors/DataFrames, :func:`load_file` for .csv/.npy/.npz/.parquet).

Every loader returns a :class:`Dataset` of train/valid/test tensors, validated at the boundary, with a
:meth:`Dataset.provenance` record (source, file hash, shape, splits, preprocessing) for ``results.json``.
Nothing here downloads anything.

Data larger than memory are *streamed*: a ``.npy`` file (``load_file`` when loading it would crowd the memory, see
:func:`load_would_crowd_memory`, or with ``DataConfig(stream=True)``; ``from_array`` given an ``np.memmap`` or the
path of a ``.npy``) is opened as a memory map, and one pass over it in blocks of rows checks every value, computes
the train statistics and records the split; the splits are then :class:`MappedRows`, which read, standardize and
cast only the rows a minibatch asks for. A Parquet file is streamed through a temporary ``.npy`` written row group
by row group. Streamed or not, the same numbers give bit-identical minibatches: both paths compute the statistics
by the same blocked pass.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import mmap
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_lvm.checks import LazyRows, _dataframe_to_numpy, check_matrix, is_dataframe, nonfinite_message, one_line
from pyro_lvm.config import ConfigError, ReadableConfig, check_config
from pyro_lvm.registry import Registry, UnknownNameError

#: environment variable naming the directory that holds binarized MNIST
DATA_DIR_ENV = "PYRO_LVM_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")


@dataclass
class DataConfig(ReadableConfig):
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
    #: the user's data (:func:`load_file`): standardize by train statistics unless every value is 0/1;
    #: ``False`` keeps the values as they are
    standardize: bool = True
    #: the user's data file (:func:`load_file`): stream it from disk (``True``: a ``.npy`` is memory-mapped, a
    #: ``.parquet`` read row group by row group; see :class:`MappedRows`), load it into memory (``False``), or
    #: stream it when loading it would take more than half the memory available (``None``, see
    #: :func:`load_would_crowd_memory`). Either way the minibatches are the same numbers
    stream: bool | None = None

    def __post_init__(self) -> None:
        check_config(self, positive_int=("subset", "num_points", "data_dim", "latent_dim", "num_components",
                                         "pca_dim"), positive=("separation",))
        if self.stream is not None and not isinstance(self.stream, bool):
            raise ConfigError("stream", f"must be True, False or None, got {self.stream!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")


# ---------------------------------------------------------------------------------------------
# Data sets and their provenance


def sha256_files(paths: Sequence[Path]) -> str:
    """sha256 of one file, or of several files' bytes read one after another (MNIST's three .amat files)."""
    if len(paths) == 1:
        with open(paths[0], "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def sha256_arrays(arrays: Iterable[np.ndarray]) -> str:
    """sha256 of the C-order float64 bytes of ``arrays`` in turn: the same numbers hash the same whatever
    dtype they came in (a float32 array and its float64 copy agree)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64))
    return h.hexdigest()


@dataclass
class Origin:
    """Where a :class:`Dataset` came from and what was done to it; read through :meth:`Dataset.provenance`."""

    #: registered name, ``from_array``'s ``name``, or the file's absolute path
    source: str
    #: (rows, columns) of the numeric data before splitting and dropping: all splits together, after ``columns``
    shape: tuple[int, int]
    standardized: bool
    #: indices (into the ``shape[1]`` columns) dropped as constant in the train split
    dropped_constant_columns: list[int] = field(default_factory=list)
    #: train/valid/test fractions of a seeded split; ``None`` where the splits were given
    split_fractions: tuple[float, float, float] | None = None
    seed: int | None = None
    #: the ``columns`` selection asked for, if any
    columns: list[str | int] | None = None
    #: the file or directory read (``None`` for in-memory data)
    path: str | None = None
    #: the files behind ``path``, hashed on the first :meth:`Dataset.provenance` call (MNIST is 60 MB)
    files: tuple[Path, ...] = ()
    #: sha256 of ``files``, or of the float64 bytes of in-memory data (see :func:`sha256_arrays`)
    sha256: str | None = None


@dataclass
class Dataset:
    """Train/valid/test splits (points x features), each a tensor, or a :class:`MappedRows` where the data are
    streamed from a file (:attr:`streamed`)."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor | None
    test: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    #: True when every value is 0 or 1 (a Bernoulli decoder may be used)
    binary: bool = False
    image_shape: tuple[int, int] | None = None
    #: loader-specific facts: true parameters of synthetic data, dropped columns, feature names, file path, ...
    meta: dict[str, Any] = field(default_factory=dict)
    #: where the data came from; see :meth:`provenance`
    origin: Origin | None = field(default=None, repr=False)

    @property
    def data_dim(self) -> int:
        return self.train.shape[1]

    @property
    def streamed(self) -> bool:
        """Whether the splits are read from a file minibatch by minibatch (:class:`MappedRows`), not held in memory."""
        return isinstance(self.train, LazyRows)

    def sizes(self) -> dict[str, int]:
        """Points per split and the dimension, as recorded in ``results.json``."""
        return {"train": len(self.train), "valid": 0 if self.valid is None else len(self.valid),
                "test": len(self.test), "dim": self.data_dim}

    def splits(self) -> dict[str, torch.Tensor]:
        out = {"train": self.train, "test": self.test}
        if self.valid is not None:
            out["valid"] = self.valid
        return out

    def __repr__(self) -> str:
        """A few summary lines, not the tensors: name, splits, dtype, preprocessing, where it came from."""
        sizes = self.sizes()
        splits = ", ".join(f"{k} {sizes[k]}" for k in SPLITS if sizes[k])
        o = self.origin
        facts = [f"{sizes['dim']} features", f"dtype {str(self.train.dtype).removeprefix('torch.')}"]
        if o is not None:
            facts.append("standardized by the train split" if o.standardized else "raw values")
        if self.binary:
            facts.append("binary")
        if self.streamed:
            facts.append("streamed from disk")
        lines = [f"Dataset {self.name!r}: {splits} points", "  " + ", ".join(facts)]
        if o is not None and (o.path or (o.source and o.source != self.name)):
            lines.append(f"  from {o.path or o.source}")
        if self.labels:
            lines.append("  with labels (.labels)")
        return "\n".join(lines)

    def provenance(self) -> dict[str, Any]:
        """What ``results.json`` records about the data: source, sha256, raw shape, split sizes, preprocessing.

        A file's hash is computed on the first call and kept. Fields a hand-made ``Dataset`` (no
        :attr:`origin`) cannot know are ``None``.
        """
        sizes = self.sizes()
        o = self.origin
        if o is not None and o.sha256 is None and o.files:
            o.sha256 = sha256_files(o.files)
        return {
            "source": self.name if o is None else o.source,
            "path": None if o is None else o.path,
            "sha256": None if o is None else o.sha256,
            "shape": None if o is None else list(o.shape),
            "columns": None if o is None else o.columns,
            "splits": {k: sizes[k] for k in SPLITS},
            "standardized": None if o is None else o.standardized,
            "dropped_constant_columns": None if o is None else list(o.dropped_constant_columns),
            "split_fractions": None if o is None or o.split_fractions is None else list(o.split_fractions),
            "seed": None if o is None else o.seed,
        }


# ---------------------------------------------------------------------------------------------
# The registry of named data sets

Loader = Callable[[DataConfig], Dataset]
#: every data set carries exactly one of these tags
KIND_TAGS = frozenset({"continuous", "binary"})


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: its loader, tags for :func:`dataset_names`, and a one-line summary."""

    loader: Loader
    tags: frozenset[str]
    summary: str


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def _canonical(name: str) -> str:
    """Registered names use underscores; ``digits-pca`` finds ``digits_pca``."""
    return name.strip().replace("-", "_")


def register_dataset(name: str, *, tags: Iterable[str], summary: str | None = None) -> Callable[[Loader], Loader]:
    """Decorator registering a loader under ``name`` with ``tags`` (exactly one of ``continuous``/``binary``,
    plus e.g. ``images``, ``clusters``, ``ground-truth``); ``summary`` defaults to the docstring's first line."""
    tag_set = frozenset(tags)
    if name != _canonical(name):
        raise ValueError(f"dataset name {name!r}: use underscores, not hyphens or spaces (hyphens find it anyway)")
    if len(tag_set & KIND_TAGS) != 1:
        raise ValueError(f"dataset {name!r}: tags must hold exactly one of {sorted(KIND_TAGS)}, got {sorted(tag_set)}")

    def decorate(loader: Loader) -> Loader:
        text = summary if summary is not None else (loader.__doc__ or "").strip().split("\n")[0]
        DATASETS.register(name)(DatasetEntry(loader, tag_set, text))
        return loader

    return decorate


def dataset_entry(name: str) -> DatasetEntry:
    """The registry entry of ``name`` (hyphens or underscores); unknown names list the valid ones."""
    try:
        return DATASETS[_canonical(name)]
    except UnknownNameError:
        raise UnknownNameError(
            f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS.names())}"
        ) from None


def dataset_names(tags: Iterable[str] | str | None = None) -> list[str]:
    """Registered names (sorted) whose tags include all of ``tags``; an unknown tag is an error, not ``[]``."""
    wanted = frozenset([tags] if isinstance(tags, str) else tags or ())
    entries = {n: DATASETS[n] for n in DATASETS.names()}
    known = frozenset().union(*(e.tags for e in entries.values()))
    if wanted - known:
        raise ValueError(f"unknown dataset tags {sorted(wanted - known)}; known tags: {', '.join(sorted(known))}")
    return [n for n, e in entries.items() if wanted <= e.tags]


def load_dataset(name: str, config: DataConfig | None = None) -> Dataset:
    """Load a registered data set by name (hyphens or underscores; unknown names list the valid ones)."""
    config = config or DataConfig()
    ds = dataset_entry(name).loader(config)
    for split, x in ds.splits().items():
        check_matrix(x, name=f"{ds.name} {split} split", width=ds.data_dim)
    return ds


# ---------------------------------------------------------------------------------------------
# Splitting and standardizing: shared by the built-in sets and the user's own data


def _split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    return n_train, n_valid, n - n_train - n_valid


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into train/valid/test parts."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_valid, _ = _split_sizes(n, fractions)
    return [perm[:n_train], perm[n_train:n_train + n_valid], perm[n_train + n_valid:]]


def _split_rows(n: int, fractions: tuple[float, float, float], seed: int, where: str) -> list[np.ndarray]:
    """:func:`split_indices`, refusing a split that leaves train under 2 rows or an asked-for split empty."""
    parts = split_indices(n, fractions, seed)

    def enough(sizes: Sequence[int]) -> bool:
        return sizes[0] >= 2 and sizes[2] >= 1 and (sizes[1] >= 1 or fractions[1] == 0)

    if not enough([len(p) for p in parts]):
        least = next((m for m in range(n + 1, 10**6) if enough(_split_sizes(m, fractions))), None)
        wanted = "train, valid and test" if fractions[1] > 0 else "train and test"
        fix = f"give at least {least} rows, " if least else ""
        raise ValueError(
            f"{where}: {n} rows cannot be split {'/'.join(f'{f:g}' for f in fractions)} into non-empty {wanted} sets "
            f"(that gives {'/'.join(str(len(p)) for p in parts)} rows, and train needs 2); "
            f"{fix}other split fractions, or explicit valid/test splits"
        )
    return parts


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _column_positions(columns: Sequence[str | int], names: Sequence[str] | None, width: int, where: str) -> list[int]:
    """Positions of ``columns`` (names or 0-based indices) among ``width`` columns called ``names``."""
    pos: list[int] = []
    for c in columns:
        if isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)):
            if not 0 <= c < width:
                raise ValueError(f"{where}: column index {c} is out of range (the data have {width} columns, "
                                 f"0 to {width - 1})")
            pos.append(int(c))
        elif isinstance(c, str):
            if names is None:
                raise ValueError(f"{where}: column {c!r} asked for by name, but the data have no column names; "
                                 f"select by index (0 to {width - 1})")
            if c not in names:
                raise ValueError(f"{where}: no column named {c!r}; columns: {_preview(names)}")
            pos.append(list(names).index(c))
        else:
            raise ValueError(f"{where}: columns must be names or 0-based indices, got {c!r}")
    if not pos:
        raise ValueError(f"{where}: columns=[] selects no columns")
    repeated = sorted({p for p in pos if pos.count(p) > 1})
    if repeated:
        raise ValueError(f"{where}: column {repeated[0]} is selected twice (columns={list(columns)})")
    return pos


def _select_columns(
    x: Any, columns: Sequence[str | int] | None, names: Sequence[str] | None, where: str
) -> tuple[Any, list[str] | None]:
    """(``x`` restricted to ``columns``, the kept columns' names): DataFrames by their column names, arrays by
    ``names`` (``from_array``'s ``feature_names``); integers are positions in either."""
    if is_dataframe(x):
        if names is not None:
            raise ValueError(f"{where}: feature_names is for arrays and tensors; a DataFrame's columns are used")
        labels = [str(c) for c in x.columns]
        if columns is None:
            return x, labels
        pos = _column_positions(columns, labels, len(labels), where)
        return x.iloc[:, pos], [labels[i] for i in pos]
    if columns is None:
        return x, None if names is None else list(names)
    try:
        a = x if isinstance(x, torch.Tensor) else np.asarray(x)
    except Exception:  # noqa: BLE001 - unreadable: check_matrix says why
        return x, None
    if a.ndim != 2:
        return x, None  # check_matrix reports the shape
    if names is not None and len(names) != a.shape[1]:
        raise ValueError(f"{where}: {len(names)} feature_names for {a.shape[1]} columns")
    pos = _column_positions(columns, names, a.shape[1], where)
    return a[:, pos], None if names is None else [names[i] for i in pos]


def _float64(x: Any, where: str, width: int | None = None) -> np.ndarray:
    """``x`` checked by :func:`check_matrix` as a C-contiguous float64 (N, D) array on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
    return np.ascontiguousarray(check_matrix(x, name=where, width=width, dtype=torch.float64, device="cpu").numpy())


def _is_binary(a: np.ndarray) -> bool:
    return bool(((a == 0) | (a == 1)).all())


def _label(names: Sequence[str] | None, col: int) -> str:
    return f" ({names[col]!r})" if names is not None and col < len(names) else ""


#: the largest magnitude whose square is a finite float64 (about 1.34e154)
MAX_SQUARABLE = float(np.sqrt(np.finfo(np.float64).max))


def _range_limit(standardize: bool, dtype: torch.dtype) -> float | None:
    """The largest magnitude :func:`_check_range` lets through (``None``: no limit)."""
    if standardize:
        return MAX_SQUARABLE
    if not dtype.is_floating_point:
        return None
    limit = float(torch.finfo(dtype).max)
    return None if limit >= np.finfo(np.float64).max else limit  # float64: every value is known to be finite


def _range_error(where: str, value: float, row: int, col: int, n_rows: int, total: int,
                 names: Sequence[str] | None, *, standardize: bool, dtype: torch.dtype) -> ValueError:
    if standardize:
        why = ("is too large to standardize: its square overflows float64, so the column's standard deviation would "
               "be inf")
        fix = "rescale that column (e.g. divide it by a power of 10) or drop those rows"
    else:
        why = f"overflows {dtype} (largest finite {float(torch.finfo(dtype).max):g}): it would become inf"
        fix = "rescale the data, standardize it (standardize=True), or ask for a wider dtype (e.g. torch.float64)"
    return ValueError(f"{where}: {value:g} at row {row}, column {col}{_label(names, col)} (counting from 0) {why} "
                      f"({n_rows} of {total} rows hold such values); {fix}")


def _check_range(a: np.ndarray, where: str, names: Sequence[str] | None, *, standardize: bool,
                 dtype: torch.dtype) -> None:
    """Refuse values that standardizing cannot handle (their square overflows float64, so the column's std
    would be inf and the column all 0) or, kept as they are, the target ``dtype`` cannot hold (inf once cast)."""
    limit = _range_limit(standardize, dtype)
    if limit is None:
        return
    over = np.abs(a) > limit
    if not over.any():
        return
    rows = np.flatnonzero(over.any(1))
    r = int(rows[0])
    c = int(np.flatnonzero(over[r])[0])
    raise _range_error(where, float(a[r, c]), r, c, len(rows), len(a), names, standardize=standardize, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Streaming: blocked statistics, memory-mapped splits

#: what loading a file into memory peaks at, in bytes a value: its float64 table, the splits' float64 copies, the
#: standardized values and the tensors (measured 34-38 for float32 and float64 files of 256 columns)
LOAD_BYTES_PER_VALUE = 40
#: where the memory available cannot be read, ``load_file`` streams a .npy or .parquet file of this many bytes
STREAM_BYTES = 1 << 30


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux: ``MemAvailable``, which counts the page cache that
    can be dropped; elsewhere free pages), or ``None`` where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def load_would_crowd_memory(path: Path) -> bool:
    """``DataConfig(stream=None)``'s rule: stream a ``.npy`` or ``.parquet`` file when loading it whole would take
    more than half the memory available now (:data:`LOAD_BYTES_PER_VALUE` a value; at least :data:`STREAM_BYTES`
    of file where the available memory is unknown). Data that fit are loaded as before, so every experiment can use
    them; the numbers are the same either way."""
    values = None
    try:
        if path.suffix.lower() == ".npy":
            values = int(np.prod(np.load(path, mmap_mode="r", allow_pickle=False).shape))
        elif path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            values = meta.num_rows * meta.num_columns
    except Exception:  # noqa: BLE001 - unreadable or no pyarrow: the reader says why when it loads the file
        return False
    if values is None:
        return False
    available = available_memory()
    if available is None:
        return path.stat().st_size >= STREAM_BYTES
    return values * LOAD_BYTES_PER_VALUE > available / 2
#: the streaming pass reads this many bytes of float64 values at a time (a block of rows)
BLOCK_BYTES = 1 << 25


def _block_rows(width: int) -> int:
    """Rows per block of the streaming pass (and of the in-memory statistics, so that both sum alike)."""
    return max(1, BLOCK_BYTES // (8 * max(1, width)))


class _Moments:
    """Per-column mean and sum of squared deviations of rows added block by block, blocks merged by the pairwise
    update of Chan, Golub & LeVeque (1979): one pass, without the cancellation of E[x²] − E[x]²."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.mean, self.m2 = np.zeros(width), np.zeros(width)

    def add(self, a: np.ndarray) -> None:
        m = len(a)
        if m == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by the caller (non-finite std)
            mean = a.mean(0)
            d = a - mean
            m2 = (d * d).sum(0)
            if self.n == 0:
                self.n, self.mean, self.m2 = m, mean, m2
                return
            n = self.n + m
            delta = mean - self.mean
            self.mean = self.mean + delta * (m / n)
            self.m2 = self.m2 + m2 + delta * delta * (self.n * m / n)
            self.n = n

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            return self.mean, np.sqrt(self.m2 / max(self.n, 1))


def _release(a: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set (they stay in the page cache, and
    are read again from there when next touched). Not for a copy-on-write map (mode ``c``), whose pages are its own."""
    m = getattr(a, "_mmap", None)
    if m is not None and getattr(a, "mode", "c") in ("r", "r+", "w+") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map, or a platform that refuses: only memory is at stake
            pass


class _RowReader:
    """Reads rows of a 2-D array. A memory-mapped file (what ``np.load(path, mmap_mode="r")`` gives) is read with
    positional reads of its file, never through the map: on Linux a page fault maps a whole (large) folio of the
    page cache into the process, so a few hundred random minibatches through the map count the whole file in the
    process's resident memory (measured: 2 GiB after 50 minibatches of 256 random 1 KiB rows, ext4 on 6.18), while
    ``preadv`` puts only the rows asked for in the process, at ~2 µs a row. Other arrays (in memory, or a view of a
    map) are indexed, and a map's pages released after each read."""

    def __init__(self, a: np.ndarray) -> None:
        self.array = a
        self.file: tuple[str, int, int] | None = None  # (path, offset of row 0, bytes a row)
        name = getattr(a, "filename", None)
        if (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.flags.c_contiguous and name
                and os.path.isfile(name) and a.shape[1] > 0):
            self.file = (name, int(a.offset), int(a.dtype.itemsize * a.shape[1]))
        self._fd: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None:  # opened on first use: a pickled reader (a spawned worker) opens its own
            assert self.file is not None
            self._fd = os.open(self.file[0], os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fd

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)  # type: ignore[arg-type]
            except OSError:
                pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__, _fd=None)
        if self.file is not None:  # reopened in the other process, not copied into the pickle
            a = self.array
            state["array"] = ("memmap", self.file[0], self.file[1], a.dtype.str, a.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        a = state["array"]
        if isinstance(a, tuple):
            _, name, offset, dtype, shape = a
            state["array"] = np.memmap(name, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def _pread(self, out: np.ndarray, pieces: Iterable[tuple[int, int]]) -> np.ndarray:
        """Fill ``out`` (C-ordered) from (first row, rows) runs of the file, one after another."""
        assert self.file is not None
        name, offset, row_bytes = self.file
        fd, buf, at = self._descriptor(), memoryview(out).cast("B"), 0
        for row, count in pieces:
            want, pos = count * row_bytes, offset + row * row_bytes
            while want:
                if hasattr(os, "preadv"):
                    got = os.preadv(fd, [buf[at:at + want]], pos)
                else:  # no preadv (e.g. Windows): a copy more
                    chunk = os.pread(fd, want, pos)
                    got = len(chunk)
                    buf[at:at + got] = chunk
                if got <= 0:
                    raise ValueError(f"{name}: the file ends early (was it truncated or rewritten while in use?)")
                want, pos, at = want - got, pos + got, at + got
        return out

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (in the array's dtype, C-ordered)."""
        a = self.array
        stop = min(stop, len(a))
        if self.file is not None:
            return self._pread(np.empty((stop - start, a.shape[1]), dtype=a.dtype), [(start, stop - start)])
        out = np.array(a[start:stop], order="C")
        _release(a)
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` in that order (in the array's dtype, C-ordered)."""
        a = self.array
        if self.file is not None:
            return self._pread(np.empty((len(rows), a.shape[1]), dtype=a.dtype), ((int(r), 1) for r in rows))
        out = np.ascontiguousarray(a[rows])
        _release(a)
        return out


_TENSOR_NAMES = frozenset(dir(torch.Tensor))


class MappedRows(LazyRows):
    """One split of data streamed from a file: rows ``rows`` (in split order) of the 2-D array ``source``
    (usually an ``np.memmap``), columns ``cols``, standardized by ``mean``/``std`` when given, as ``dtype``.

    ``x[index]`` (an index tensor or array, a slice, an int) reads those rows and returns the tensor the in-memory
    path would hold for them, bit for bit: ``(float64(row[cols]) - mean) / std`` cast to ``dtype``, on ``device``.
    The values were checked by the pass that made it (:func:`pyro_lvm.checks.check_matrix` accepts it without
    reading it). Whole-tensor operations are refused with a message: call :meth:`tensor` to load a split that fits
    in memory, or read it in blocks (:meth:`blocks`, ``x[i:j]``). A memory-mapped file is read with positional
    reads (:class:`_RowReader`), so the process holds the minibatches, never the file's pages."""

    def __init__(self, source: np.ndarray, rows: np.ndarray, cols: np.ndarray | None, mean: np.ndarray | None,
                 std: np.ndarray | None, *, dtype: torch.dtype, bound: float, where: str,
                 device: torch.device | str = "cpu") -> None:
        self.source, self.rows, self.cols, self._mean, self._std = source, rows, cols, mean, std
        self.dtype, self.device, self.bound, self._where = dtype, torch.device(device), bound, where
        self._reader = source if isinstance(source, _RowReader) else _RowReader(source)
        self.source = self._reader.array

    # ------------------------------------------------------------------ what a tensor would say
    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return torch.Size((len(self.rows), self.source.shape[1] if self.cols is None else len(self.cols)))

    ndim = 2
    requires_grad = False

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def to(self, *args: Any, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
           **kwargs: Any) -> MappedRows:
        """The same rows read as ``dtype`` onto ``device`` (positional like ``Tensor.to``); nothing is read."""
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            elif isinstance(a, (torch.Tensor, LazyRows)):
                dtype, device = a.dtype, a.device
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.device
        if dtype == self.dtype and device == self.device:
            return self
        return MappedRows(self._reader, self.rows, self.cols, self._mean, self._std, dtype=dtype, bound=self.bound,
                          where=self._where, device=device)

    def double(self) -> MappedRows:
        return self.to(dtype=torch.float64)

    def float(self) -> MappedRows:
        return self.to(dtype=torch.float32)

    def cpu(self) -> MappedRows:
        return self.to(device="cpu")

    def contiguous(self) -> MappedRows:
        return self  # every minibatch read is a fresh row-major tensor

    def detach(self) -> MappedRows:
        return self

    def __repr__(self) -> str:
        n, d = self.shape
        return f"MappedRows({n} x {d} of {self._file()}, dtype={self.dtype}, device={self.device})"

    def _file(self) -> str:
        return str(getattr(self.source, "filename", None) or "an array in memory")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name not in _TENSOR_NAMES:
            raise AttributeError(name)
        n, d = self.shape
        raise AttributeError(f"{self._where}: this split ({n} x {d}) is streamed from {self._file()}, not held in "
                             f"memory, and Tensor.{name} would need all of it at once; index its rows (x[i:j], "
                             "x[index]) or call .tensor() if it fits in memory, or load the data with stream=False")

    # ------------------------------------------------------------------ reading
    def _values(self, rows: np.ndarray) -> np.ndarray:
        """float64 values of file rows ``rows``, standardized: what the in-memory path computes for them."""
        a = self._reader.take(rows)  # a copy of just these rows
        if self.cols is not None:
            a = a[:, self.cols]
        a = np.asarray(a, dtype=np.float64)
        if self._mean is not None:
            a = (a - self._mean) / self._std
        return np.ascontiguousarray(a)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, tuple):
            raise IndexError(f"{self._where}: a streamed split is indexed by rows only (x[rows]), got {index!r}")
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        one = isinstance(index, (int, np.integer))
        rows = np.atleast_1d(self.rows[index])
        t = torch.as_tensor(self._values(rows), dtype=self.dtype)  # row-major, as the in-memory path
        t = t[0] if one else t
        return t if self.device.type == "cpu" else t.to(self.device)

    def blocks(self) -> Any:
        step = _block_rows(self.shape[1])
        for start in range(0, len(self.rows), step):
            yield start, self._values(self.rows[start:start + step])

    def tensor(self) -> torch.Tensor:
        """The whole split as one tensor (as the in-memory path holds it): only for a split that fits in memory."""
        return self[:]

    def fingerprint(self) -> dict[str, Any]:
        """:func:`pyro_lvm.plan.fingerprint` of :meth:`tensor`, read block by block: the same shape, dtype and BLAKE2b
        digest as the in-memory split's, without holding it."""
        h = hashlib.blake2b()
        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        for _, a in self.blocks():
            h.update(torch.as_tensor(a, dtype=self.dtype).numpy().data)
        return {"shape": list(self.shape), "dtype": str(np_dtype), "blake2b": h.hexdigest()}

    # ------------------------------------------------------------------ pickling (spawned data-loader workers)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["source"]  # the reader's array: a map is reopened by the reader, not copied into the pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.source = self._reader.array


def _dataset(
    name: str,
    x: Any,
    valid: Any = None,
    test: Any = None,
    *,
    where: str,
    split: tuple[float, float, float],
    seed: int,
    standardize: bool | None,
    dtype: torch.dtype,
    subset: int | None = None,
    columns: Sequence[str | int] | None = None,
    feature_names: Sequence[str] | None = None,
    labels: Any = None,
    source: str | None = None,
    path: Path | None = None,
    files: tuple[Path, ...] = (),
    meta: Mapping[str, Any] | None = None,
    stream: bool | None = None,
) -> Dataset:
    """The one path from raw data to a :class:`Dataset` (see :func:`from_array` for the arguments).

    ``standardize=None`` standardizes unless every value is 0/1. Statistics come from the full train split;
    a subset (``subset`` points per split) is taken after: the first ``subset`` of a seeded split's
    (already shuffled) rows, as the built-in loaders always did, or a seeded random choice of given splits.
    ``stream=True`` (``None``: where ``x``, ``valid`` or ``test`` is an ``np.memmap`` or a path) gives splits
    read from disk minibatch by minibatch (:func:`_streamed_dataset`), the same numbers as this path's tensors.
    """
    if isinstance(columns, (str, int)):
        columns = [columns]
    if stream or (stream is None and any(_mapped(a) for a in (x, valid, test))):
        return _streamed_dataset(name, x, valid, test, where=where, split=split, seed=seed, standardize=standardize,
                                 dtype=dtype, subset=subset, columns=columns, feature_names=feature_names,
                                 labels=labels, source=source, path=path, files=files, meta=meta)
    x, valid, test = (read_npy(Path(a).expanduser().resolve()).data if isinstance(a, (str, os.PathLike)) else a
                      for a in (x, valid, test))
    given = test is not None
    if valid is not None and not given:
        raise ValueError(f"{where}: valid= was given without test=; give test= too, or neither to split by fractions")
    where_of = {k: f"{where} [{k}]" if given else where for k in SPLITS}

    # raw float64 matrices, all (N_k, D)
    x, names = _select_columns(x, columns, feature_names, where_of["train"])
    first = _float64(x, where_of["train"])
    width = first.shape[1]
    if names is not None and len(names) != width:
        raise ValueError(f"{where}: {len(names)} feature_names for {width} columns")
    if given:
        raw = {"train": first, "valid": None, "test": None}
        for k, v in (("valid", valid), ("test", test)):
            if v is not None:
                raw[k] = _float64(_select_columns(v, columns, feature_names, where_of[k])[0], where_of[k], width)
        if labels is not None and not isinstance(labels, Mapping):
            raise ValueError(f"{where}: with given splits, labels must map split names to arrays")
        label_parts = {k: np.asarray(v) for k, v in (labels or {}).items()}
        fractions = None
        order = [a for a in raw.values() if a is not None]
    else:
        parts = _split_rows(len(first), split, seed, where)
        raw = dict(zip(SPLITS, (first[p] for p in parts), strict=True))
        label_parts = {}
        if labels is not None:
            y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            if len(y) != len(first):
                raise ValueError(f"{where}: {len(y)} labels for {len(first)} rows")
            label_parts = dict(zip(SPLITS, (y[p] for p in parts), strict=True))
        fractions = tuple(split)
        order = [first]
    for k, y in label_parts.items():
        if k not in raw or raw[k] is None or len(y) != len(raw[k]):
            raise ValueError(f"{where}: labels[{k!r}] do not match the {k} split")

    binary_values = all(_is_binary(a) for a in raw.values() if a is not None)
    standardize = not binary_values if standardize is None else standardize
    unsplit = {k: a for k, a in raw.items() if a is not None} if given else {"train": first}  # rows as given
    for k, a in unsplit.items():
        _check_range(a, where_of[k], names, standardize=standardize, dtype=dtype)
    if standardize:
        # the train split's rows in file order, in the blocks the streamed path reads: the same numbers either way
        in_train = None
        if not given:
            in_train = np.zeros(len(first), dtype=bool)
            in_train[parts[0]] = True
        moments = _Moments(width)
        for start in range(0, len(first), _block_rows(width)):
            block = first[start:start + _block_rows(width)]
            moments.add(block if in_train is None else block[in_train[start:start + len(block)]])
        def largest(c: int) -> tuple[int, float]:
            r = int(np.argmax(np.abs(first[:, c])))
            return r, float(first[r, c])

        mean, std, keep = _train_statistics(moments, where, names, largest)
    else:
        mean, std, keep = np.zeros(width), np.ones(width), np.ones(width, dtype=bool)

    rng = np.random.default_rng(seed)
    rows: dict[str, np.ndarray] = {}  # per split, the rows kept by ``subset``
    for k, a in raw.items():
        if a is None:
            continue
        if not subset:
            rows[k] = np.arange(len(a))
        else:
            rows[k] = np.arange(len(a))[:subset] if not given else np.sort(rng.permutation(len(a))[:subset])

    def tensor(k: str) -> torch.Tensor | None:
        a = raw[k]
        if a is None or len(a) == 0:
            return None
        a = a[rows[k]]
        z = (a[:, keep] - mean[keep]) / std[keep] if standardize else a  # (n_k, D_kept)
        return torch.as_tensor(np.ascontiguousarray(z), dtype=dtype)  # row-major, as models expect

    extra, origin = _described(name, standardize, mean, std, keep, fractions, names, columns, seed, source, path,
                               files, shape=(sum(len(a) for a in order), width),
                               sha256=None if files else sha256_arrays(order))
    return Dataset(
        name=name, train=tensor("train"), valid=tensor("valid"), test=tensor("test"),
        labels={k: torch.as_tensor(y[rows[k]]) for k, y in label_parts.items()},
        binary=binary_values and not standardize, meta={**extra, **(meta or {})}, origin=origin,
    )


def _described(name: str, standardize: bool, mean: np.ndarray, std: np.ndarray, keep: np.ndarray,
               fractions: tuple[float, float, float] | None, names: Sequence[str] | None,
               columns: Sequence[str | int] | None, seed: int, source: str | None, path: Path | None,
               files: tuple[Path, ...], *, shape: tuple[int, int], sha256: str | None) -> tuple[dict[str, Any], Origin]:
    """A dataset's ``meta`` facts and :class:`Origin` (in memory or streamed alike)."""
    dropped = np.flatnonzero(~keep).tolist()
    extra: dict[str, Any] = {"standardized": standardize, "dropped_constant_columns": dropped}
    if standardize:
        extra |= {"train_mean": mean[keep].tolist(), "train_std": std[keep].tolist()}
    if fractions is not None:
        extra["split"] = list(fractions)
    if names is not None:
        extra["feature_names"] = [n for n, k in zip(names, keep, strict=True) if k]
    origin = Origin(
        source=source or name, shape=shape, standardized=standardize, dropped_constant_columns=dropped,
        split_fractions=fractions, seed=seed, columns=None if columns is None else list(columns),
        path=None if path is None else str(path), files=files, sha256=sha256,
    )
    return extra, origin


def _mapped(x: Any) -> bool:
    """Whether ``x`` asks to be streamed: a memory-mapped array, or the path of a .npy file."""
    return isinstance(x, (np.memmap, str, os.PathLike))


def _map_npy(path: Path) -> np.ndarray:
    """The array of a .npy file, memory-mapped read-only (nothing read yet); one-line errors."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as .npy ({one_line(e)})") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise ValueError(f"{path}: holds an .npz archive, not one .npy array; rename it to .npz")
    return a


def _stream_source(x: Any, where: str) -> np.ndarray:
    """``x`` as a 2-D array of real numbers to stream from (a path is memory-mapped), with check_matrix's
    messages for what is not one."""
    if isinstance(x, (str, os.PathLike)):
        x = _map_npy(Path(x).expanduser().resolve())
    elif isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        raise ValueError(f"{where}: only NumPy arrays (an np.memmap) and .npy paths are streamed, got "
                         f"{type(x).__name__}; pass it in memory (stream=False)")
    if x.dtype.kind == "c":
        raise ValueError(f"{where}: complex values (dtype {x.dtype}) are not supported; pass real numbers")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: values of dtype {x.dtype} are not numbers; convert them to numbers first")
    if x.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D array (points x features), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: is empty (0 rows, shape {tuple(x.shape)})")
    return x


@dataclass
class _Pass:
    """What the streaming pass learns about one array: the first non-finite value and the rows holding one,
    the first value over each range limit and the rows holding one, whether all are 0/1, per-column extremes."""

    nonfinite: tuple[int, int, float] | None = None
    nonfinite_rows: int = 0
    over: dict[float, tuple[int, int, float]] = field(default_factory=dict)
    over_rows: dict[float, int] = field(default_factory=dict)
    binary: bool = True
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


def _first_over(block: np.ndarray, bad: np.ndarray, start: int) -> tuple[np.ndarray, tuple[int, int, float]]:
    """Rows of ``block`` where ``bad`` holds, and (row + ``start``, column, value) of the first."""
    rows = np.flatnonzero(bad.any(1))
    r = int(rows[0])
    c = int(np.flatnonzero(bad[r])[0])
    return rows, (start + r, c, float(block[r, c]))


def _read_block(reader: _RowReader, cols: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` (columns ``cols``) as a C-ordered float64 array."""
    block = reader.block(start, stop)
    return np.ascontiguousarray(block if cols is None else block[:, cols], dtype=np.float64)


def _scan(a: _RowReader, cols: np.ndarray | None, width: int, which: np.ndarray | None, moments: _Moments | None,
          limits: Sequence[float], hasher: Any) -> _Pass:
    """One pass over ``a`` in blocks of rows (in file order): checks, extremes, the hash of the float64 values,
    and (``moments``) the statistics of the train rows (``which == 0``; every row when ``which`` is ``None``)."""
    out = _Pass()
    step = _block_rows(width)
    for start in range(0, len(a.array), step):
        block = a.block(start, start + step)  # in the file's dtype: extremes and checks need no float64 copy
        if cols is not None:
            block = block[:, cols]
        if hasher is not None:
            hasher.update(np.ascontiguousarray(block, dtype=np.float64))
        lo, hi = block.min(0), block.max(0)  # NaN and inf show here: one reduction each, not an isfinite pass
        if block.dtype.kind == "f" and not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            rows, first = _first_over(block, ~np.isfinite(block), start)
            out.nonfinite = out.nonfinite or first
            out.nonfinite_rows += len(rows)
        if out.nonfinite is not None:
            continue  # refused: only the count of bad rows is still needed
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
        out.lo = lo if out.lo is None else np.minimum(out.lo, lo)
        out.hi = hi if out.hi is None else np.maximum(out.hi, hi)
        out.binary = out.binary and bool(lo.min() >= 0 and hi.max() <= 1) and _is_binary(block)
        peak = max(-float(lo.min()), float(hi.max()))
        for limit in limits:
            if peak > limit:  # only floats can be: the largest int64 is about 9.2e18
                rows, first = _first_over(block, np.abs(block) > limit, start)
                out.over.setdefault(limit, first)
                out.over_rows[limit] = out.over_rows.get(limit, 0) + len(rows)
        if moments is not None:  # float64 of the train rows: the numbers the in-memory path sums, in its blocks
            train = block if which is None else block[which[start:start + len(block)] == 0]
            moments.add(np.ascontiguousarray(train, dtype=np.float64))
    return out


def _train_statistics(moments: _Moments, where: str, names: Sequence[str] | None,
                      largest: Callable[[int], tuple[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, keep) of the train split from its accumulated ``moments``, for the in-memory and the streamed
    path alike: refused where a column's variance overflows float64 (each value's square fits, checked before, yet
    their sum does not; ``largest(c)`` gives the (row, value) to name) or every column is constant."""
    mean, std = moments.mean_std()  # (D,)
    spread = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std)))
    if len(spread):
        c = int(spread[0])
        r, value = largest(c)
        raise ValueError(
            f"{where}: column {c}{_label(names, c)} cannot be standardized: its variance overflows float64 "
            f"(largest value {value:g} at row {r}, counting from 0); rescale that column (e.g. divide it "
            "by a power of 10) or drop its largest values"
        )
    keep = std > 1e-8
    if not keep.any():
        raise ValueError(f"{where}: every column is constant in the train split; nothing is left to model")
    return mean, std, keep


def _largest(a: _RowReader, cols: np.ndarray | None, width: int, col: int) -> tuple[int, float]:
    """(row, value) of the largest magnitude in column ``col`` (first of ties), read block by block."""
    best, row, value = -1.0, 0, 0.0
    step = _block_rows(width)
    for start in range(0, len(a.array), step):
        v = _read_block(a, cols, start, start + step)[:, col]
        r = int(np.argmax(np.abs(v)))
        if abs(v[r]) > best:
            best, row, value = abs(float(v[r])), start + r, float(v[r])
    return row, value


def _streamed_dataset(
    name: str, x: Any, valid: Any, test: Any, *, where: str, split: tuple[float, float, float], seed: int,
    standardize: bool | None, dtype: torch.dtype, subset: int | None, columns: Sequence[str | int] | None,
    feature_names: Sequence[str] | None, labels: Any, source: str | None, path: Path | None,
    files: tuple[Path, ...], meta: Mapping[str, Any] | None,
) -> Dataset:
    """:func:`_dataset` for data larger than memory: one pass over the arrays (memory-mapped) in blocks of rows
    checks the values, records the train statistics (by the same blocked sums as the in-memory path) and the
    extremes, and each split becomes a :class:`MappedRows` over the seeded split's rows. The arrays are never
    held whole; what is held is O(rows) indices (8 bytes a row) and O(columns) statistics."""
    given = test is not None
    if valid is not None and not given:
        raise ValueError(f"{where}: valid= was given without test=; give test= too, or neither to split by fractions")
    where_of = {k: f"{where} [{k}]" if given else where for k in SPLITS}
    if is_dataframe(x):
        raise ValueError(f"{where}: a DataFrame is not streamed; pass a NumPy array, an np.memmap or a .npy path, "
                         "or stream=False")
    srcs = {"train": _stream_source(x, where_of["train"])}
    for k, v in (("valid", valid), ("test", test)):
        if v is not None:
            srcs[k] = _stream_source(v, where_of[k])
    first = srcs["train"]
    names = None if feature_names is None else list(feature_names)
    cols: dict[str, np.ndarray | None] = {}
    for k, a in srcs.items():
        if columns is None:
            cols[k] = None
            continue
        if names is not None and len(names) != a.shape[1]:
            raise ValueError(f"{where_of[k]}: {len(names)} feature_names for {a.shape[1]} columns")
        cols[k] = np.asarray(_column_positions(columns, names, a.shape[1], where_of[k]), dtype=np.int64)
    if columns is not None and names is not None:
        names = [names[i] for i in cols["train"]]
    width = first.shape[1] if cols["train"] is None else len(cols["train"])
    if names is not None and len(names) != width:
        raise ValueError(f"{where}: {len(names)} feature_names for {width} columns")
    if width == 0:
        raise ValueError(f"{where_of['train']}: has no features (0 columns, shape {tuple(first.shape)})")
    for k, a in srcs.items():
        got = a.shape[1] if cols[k] is None else len(cols[k])
        if got != width:
            raise ValueError(f"{where_of[k]}: expected {width} features per point, got {got} (shape {(len(a), got)})")

    n = len(first)
    which = None
    sizes = {k: len(a) for k, a in srcs.items()}
    if given:
        if labels is not None and not isinstance(labels, Mapping):
            raise ValueError(f"{where}: with given splits, labels must map split names to arrays")
        label_parts = {k: np.asarray(v) for k, v in (labels or {}).items()}
        fractions = None
    else:
        parts = _split_rows(n, split, seed, where)
        which = np.empty(n, dtype=np.int8)
        for i, part in enumerate(parts):
            which[part] = i
        sizes = {k: len(part) for k, part in zip(SPLITS, parts, strict=True)}
        label_parts = {}
        if labels is not None:
            y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            if len(y) != n:
                raise ValueError(f"{where}: {len(y)} labels for {n} rows")
            label_parts = dict(zip(SPLITS, (y[p] for p in parts), strict=True))
        fractions = tuple(split)
    for k, y in label_parts.items():
        if k not in sizes or len(y) != sizes[k]:
            raise ValueError(f"{where}: labels[{k!r}] do not match the {k} split")

    # the one pass
    limits = [MAX_SQUARABLE] + [lim for lim in [_range_limit(False, dtype)] if lim is not None]
    hasher = None if files else hashlib.sha256()
    moments = _Moments(width)
    readers = {k: _RowReader(a) for k, a in srcs.items()}  # one open file each, shared by the pass and the splits
    scans = {k: _scan(readers[k], cols[k], width, which, moments if k == "train" else None, limits, hasher)
             for k in srcs}
    for k, sc in scans.items():
        if sc.nonfinite is not None:
            r, c, v = sc.nonfinite
            raise ValueError(nonfinite_message(where_of[k], v, r, c, sc.nonfinite_rows, len(srcs[k])))
    binary_values = all(sc.binary for sc in scans.values())
    standardize = not binary_values if standardize is None else standardize
    limit = _range_limit(standardize, dtype)
    for k in srcs:  # every given split, or the one array before splitting, as the in-memory path
        if limit is not None and limit in scans[k].over:
            r, c, v = scans[k].over[limit]
            raise _range_error(where_of[k], v, r, c, scans[k].over_rows[limit], len(srcs[k]), names,
                               standardize=standardize, dtype=dtype)
    if standardize:
        mean, std, keep = _train_statistics(moments, where, names,
                                            lambda c: _largest(readers["train"], cols["train"], width, c))
    else:
        mean, std, keep = np.zeros(width), np.ones(width), np.ones(width, dtype=bool)

    rng = np.random.default_rng(seed)
    split_rows: dict[str, np.ndarray] = {}  # per split, positions in the split kept by ``subset``
    file_rows: dict[str, np.ndarray] = {}  # ... and the rows of its array they are
    for i, k in enumerate(SPLITS):
        if given:
            if k not in srcs:
                continue
            m = len(srcs[k])
            split_rows[k] = np.arange(m) if not subset else np.sort(rng.permutation(m)[:subset])
            file_rows[k] = split_rows[k]
        else:
            split_rows[k] = np.arange(len(parts[i]))[:subset] if subset else np.arange(len(parts[i]))
            file_rows[k] = parts[i][:subset] if subset else parts[i]

    def mapped(k: str) -> MappedRows | None:
        if k not in file_rows or len(file_rows[k]) == 0:
            return None
        a = readers[k if given else "train"]
        sc = scans[k if given else "train"]
        base = np.arange(width) if cols[k if given else "train"] is None else cols[k if given else "train"]
        kept_cols = None if cols[k if given else "train"] is None and keep.all() else base[keep]
        with np.errstate(over="ignore", invalid="ignore"):  # an inf bound is only loose: check_matrix reads then
            lo, hi = sc.lo[keep], sc.hi[keep]
            if standardize:
                lo, hi = (lo - mean[keep]) / std[keep], (hi - mean[keep]) / std[keep]
            bound = float(max(np.abs(lo).max(), np.abs(hi).max()))
        return MappedRows(a, file_rows[k], kept_cols, mean[keep] if standardize else None,
                          std[keep] if standardize else None, dtype=dtype, bound=bound, where=where_of[k])

    extra, origin = _described(name, standardize, mean, std, keep, fractions, names, columns, seed, source, path,
                               files, shape=(sum(len(a) for a in srcs.values()), width),
                               sha256=None if hasher is None else hasher.hexdigest())
    return Dataset(
        name=name, train=mapped("train"), valid=mapped("valid"), test=mapped("test"),
        labels={k: torch.as_tensor(y[split_rows[k]]) for k, y in label_parts.items()},
        binary=binary_values and not standardize, meta={**extra, **(meta or {})}, origin=origin,
    )


def standardize_splits(
    name: str, x: np.ndarray, y: np.ndarray | None, config: DataConfig, *,
    feature_names: Sequence[str] | None = None, **meta: Any
) -> Dataset:
    """Split ``x`` by ``config``, standardize with train statistics only (unless ``config.standardize`` is off: a
    likelihood that needs the raw values), drop columns constant in train."""
    return _dataset(name, x, where=name, split=config.split, seed=config.seed, standardize=config.standardize,
                    dtype=config.dtype, subset=config.subset, feature_names=feature_names, labels=y, meta=meta)


# ---------------------------------------------------------------------------------------------
# The user's own data


def from_array(
    x: Any,
    *,
    valid: Any = None,
    test: Any = None,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    standardize: bool | None = True,
    seed: int = 0,
    name: str = "array",
    columns: Sequence[str | int] | None = None,
    dtype: torch.dtype = torch.float32,
    labels: Any = None,
    feature_names: Sequence[str] | None = None,
    subset: int | None = None,
    stream: bool | None = None,
) -> Dataset:
    """A NumPy array, tensor or pandas DataFrame (points x features) as the :class:`Dataset` the built-in
    loaders return.

    * ``valid``/``test`` given: they are the splits (``split`` is ignored; ``valid`` may be left out).
      Otherwise ``x`` is split by the ``split`` fractions with ``seed``, exactly as the built-in sets are, so
      the same numbers give bit-identical tensors.
    * ``standardize=True`` standardizes every split with the train split's mean and std and drops columns
      constant in train; ``False`` keeps the values (binary data); ``None`` standardizes unless all are 0/1.
    * ``columns`` (names or 0-based indices) selects columns of ``x`` (and of the given splits); names are a
      DataFrame's column names or ``feature_names``. Kept names go to ``meta["feature_names"]``.
    * ``labels``: one per row of ``x`` (split alike), or, with given splits, a mapping split name -> labels.
    * ``subset`` keeps at most that many points per split (as :attr:`DataConfig.subset`).
    * Data larger than memory: an ``np.memmap`` (``np.load(path, mmap_mode="r")``) or the path of a ``.npy`` file
      is streamed (``stream=None``; ``True`` streams any array, ``False`` loads into memory): one pass in blocks
      of rows checks it and computes the train statistics, and each split is a :class:`MappedRows` that reads,
      standardizes and casts only the rows asked for (``fit`` reads a minibatch at a time). The numbers are those
      of the in-memory path, bit for bit.

    Bad input (NaN/inf, non-numeric columns, too few rows for the split, ...) raises a one-line
    ``ValueError`` that starts with ``name``.
    """
    return _dataset(name, x, valid, test, where=name, split=split, seed=seed, standardize=standardize, dtype=dtype,
                    subset=subset, columns=columns, feature_names=feature_names, labels=labels, stream=stream)


@dataclass(frozen=True)
class RawTable:
    """What a file reader returns: one table to split, or (``test`` not ``None``) the given splits."""

    data: Any
    valid: Any = None
    test: Any = None
    #: what the reader assumed (e.g. "no header"): :func:`load_file` warns with each once the data have loaded
    notes: tuple[str, ...] = ()
    #: the columns' names, for a reader that gives an array (a streamed Parquet file's)
    names: tuple[str, ...] | None = None
    #: whether the reader has already applied ``load_file``'s ``columns`` (a streamed Parquet file reads only those)
    columns_applied: bool = False


FileReader = Callable[[Path], RawTable]
#: a data file must hold at least this many feature columns (every model here needs 2 or more)
MIN_FEATURES = 2
#: suffix (lower case, with the dot) -> reader; add formats with :func:`register_reader`
FILE_READERS: dict[str, FileReader] = {}
#: suffix -> reader for streaming (``DataConfig.stream``): ``reader(path, columns)`` gives a :class:`RawTable` whose
#: data are an array on disk (memory-mapped), never the whole table in memory
STREAM_READERS: dict[str, Callable[[Path, Sequence[str | int] | None], RawTable]] = {}


def register_reader(suffix: str) -> Callable[[FileReader], FileReader]:
    """Decorator registering a reader for files ending in ``suffix`` (e.g. ``".csv"``)."""

    def decorate(reader: FileReader) -> FileReader:
        FILE_READERS[suffix.lower()] = reader
        return reader

    return decorate


def _pandas(path: Path) -> Any:
    try:
        import pandas
    except ImportError:
        raise ValueError(f"{path}: reading {path.suffix} files needs pandas (pip install pandas)") from None
    return pandas


def _is_number(text: str) -> bool:
    """Whether a CSV field reads as a number (an empty field is a missing number)."""
    text = text.strip()
    if not text:
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_has_header(path: Path) -> bool:
    """Whether the first row of a CSV file is a header: some field in it is not a number where the row under it
    has one (so a text column, e.g. species names, does not make a data row a header). A file with one row has
    a header if any field in it is not a number."""
    rows: list[list[str]] = []
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        for row in csv.reader(f):
            if any(field.strip() for field in row):
                rows.append(row)
            if len(rows) == 2:
                break
    if not rows:
        return False
    if len(rows) == 1:
        return not all(_is_number(v) for v in rows[0])
    return any(not _is_number(a) and _is_number(b) for a, b in zip(rows[0], rows[1], strict=False))


#: bytes of a CSV file looked at for its encoding, delimiter, header and widths before pandas reads it
CSV_SNIFF_BYTES = 1 << 16
#: lines of it looked at
CSV_SNIFF_LINES = 50
_DELIMITERS = ((";", "semicolon"), ("\t", "tab"))
_NUMBER_RUN = r"[-+0-9.eE ]*"


def _utf8_error(path: Path) -> tuple[int, int, int] | None:
    """(byte value, line, offset) of the first byte of ``path`` that is not UTF-8, or ``None``."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return chunk[e.start], line + chunk[:e.start].count(b"\n"), offset + e.start
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
    return None


def _not_utf8(path: Path) -> ValueError:
    bad = _utf8_error(path)
    where = f" (byte 0x{bad[0]:02x} on line {bad[1]} is not UTF-8)" if bad else ""
    return ValueError(f"{path}: cannot read as CSV: the file is not UTF-8 text{where}; it is probably latin-1 or "
                      "Windows-1252: re-save it as UTF-8 (e.g. Excel's 'CSV UTF-8', or iconv -f latin1 -t utf-8 "
                      "IN.csv > OUT.csv)")


def _csv_head(path: Path) -> list[str]:
    """The first complete lines of a CSV file, or one ``ValueError`` naming its encoding (UTF-16/32, latin-1)."""
    with open(path, "rb") as f:
        head = f.read(CSV_SNIFF_BYTES)
        complete = not f.read(1)
    utf32 = head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"))
    if utf32 or head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        enc = "UTF-32" if utf32 else "UTF-16"
        why = (f"it starts with a {enc} byte-order mark" if utf32 or head[:2] in (b"\xff\xfe", b"\xfe\xff")
               else "it holds NUL bytes: UTF-16 text without a byte-order mark, or not text at all")
        raise ValueError(f"{path}: cannot read as CSV: the file looks {enc}-encoded ({why}); re-save it as UTF-8 "
                         f"(e.g. Excel's 'CSV UTF-8', or iconv -f {enc} -t utf-8 IN.csv > OUT.csv)")
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=complete)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    lines = text.splitlines()
    if not complete:
        lines = lines[:-1]  # perhaps cut short
    return [line for line in lines if line.strip()][:CSV_SNIFF_LINES]


def _other_delimiter(path: Path, lines: list[str]) -> None:
    """Refuse a file whose lines are separated by ``;``, tabs or spaces rather than commas, naming the fix."""
    if not lines:
        return
    comma = [row for row in csv.reader(lines)]
    comma_table = len({len(r) for r in comma}) == 1 and len(comma[0]) >= 2
    for sep, label in _DELIMITERS:
        counts = {line.count(sep) for line in lines}
        if len(counts) != 1 or 0 in counts:
            continue
        joined = [f for r in comma for f in r if sep in f]
        decimal_comma = bool(joined) and all(re.fullmatch(f"{_NUMBER_RUN}(?:{re.escape(sep)}{_NUMBER_RUN})+",
                                                          f.strip()) for f in joined)
        if comma_table and not (decimal_comma and any(re.search(r"\d,\d", line) for line in lines)):
            continue  # a comma table that happens to hold the character in a text column
        decimal = ", decimal=','" if re.search(r"\d,\d", lines[-1]) else ""
        raise ValueError(
            f"{path}: cannot read as CSV: the file looks {label}-separated (each line holds {counts.pop()} {sep!r}, "
            f"read on commas it gives {'one column' if not comma_table else 'columns of text'}); convert it to "
            f"comma-separated, e.g. pandas.read_csv(IN, sep={sep!r}{decimal}).to_csv(OUT, index=False)"
        )
    widths = {len(line.split()) for line in lines}
    if all(len(r) == 1 for r in comma) and len(widths) == 1 and widths.pop() >= 2 and _is_number(lines[-1].split()[0]):
        raise ValueError(f"{path}: cannot read as CSV: the file looks whitespace-separated (one column when read on "
                         "commas, its values hold spaces); convert it to comma-separated, e.g. "
                         "pandas.read_csv(IN, sep=r'\\s+').to_csv(OUT, index=False), or np.savetxt(..., delimiter=',')")


def _header_rows(lines: list[str]) -> tuple[list[list[str]], list[int]]:
    """The first two non-empty rows of ``lines`` parsed as CSV, and the line (from 1) each starts on."""
    rows: list[list[str]] = []
    starts: list[int] = []
    reader = csv.reader(lines)
    for row in reader:
        if any(f.strip() for f in row):
            rows.append(row)
            starts.append(reader.line_num)
        if len(rows) == 2:
            break
    return rows, starts


def _header_policy(path: Path, lines: list[str]) -> tuple[bool, tuple[str, ...]]:
    """Whether the CSV has a header (:func:`csv_has_header`'s rule), and notes on what was assumed; refuses a
    header whose width differs from the first data row's, and a first row of column numbers 0..D-1 (D >= 3)."""
    rows, starts = _header_rows(lines)
    if not rows:
        return False, ()
    first = rows[0]
    if len(rows) == 1:
        header = not all(_is_number(v) for v in first)
    else:
        header = any(not _is_number(a) and _is_number(b) for a, b in zip(first, rows[1], strict=False))
    if header and len(rows) == 2 and len(first) != len(rows[1]):
        h, w = len(first), len(rows[1])
        if h < w:
            trailing = " (or remove the trailing comma from each row)" if not rows[1][-1].strip() else ""
            lost = "first column" if w - h == 1 else f"first {w - h} columns"
            what = f"pandas would take the {lost} as row labels and lose it; name every column in the header{trailing}"
        else:
            extra = "last named column" if h - w == 1 else f"last {h - w} named columns"
            what = f"the {extra} would be empty; remove the extra names or fill in the values"
        raise ValueError(f"{path}: the header (line {starts[0]}) has {h} names but the first data row (line "
                         f"{starts[1]}) has {w} values; {what}")
    if header:
        return True, ()
    numbers = [v.strip() for v in first]
    if len(numbers) >= 3 and all(re.fullmatch(r"\d+", v) for v in numbers):
        if [int(v) for v in numbers] == list(range(len(numbers))):
            raise ValueError(
                f"{path}: the first row is {numbers[0]}, {numbers[1]}, ..., {numbers[-1]}: column numbers, most likely "
                "a header written by DataFrame.to_csv, but a header of numbers cannot be told from data; give the "
                "columns names that are not numbers (e.g. x0,x1,...) or delete that line (if it is data, save the "
                "table as .npy)"
            )
    return False, (f"{path}: the first row is all numbers, so it is read as data (no header); if it is a header, "
                   "give the columns names that are not numbers (e.g. x0,x1,...) or delete that line",)


@register_reader(".csv")
def read_csv(path: Path) -> RawTable:
    """A comma-separated UTF-8 table; floats are read exactly.

    The header is detected (:func:`csv_has_header`): the first row is a header when some field in it is not a
    number where the row under it has one. **A first row that is all numbers is data** (no header), and
    :func:`load_file` warns once that it assumed so; a first row of column numbers ``0,1,...,D-1`` (D >= 3:
    what ``DataFrame.to_csv`` writes for unnamed columns) is refused instead, as it cannot be told from data.

    Refused with one line that names the fix: a header with fewer or more names than the first data row has
    values (pandas would turn the extra columns into row labels), a UTF-16/32 or latin-1 file (re-save as
    UTF-8), and a ``;``-, tab- or space-separated file (convert to comma-separated).
    """
    pd = _pandas(path)
    # pandas < 3 parses floats to within an ulp unless asked for round trips; pandas 3 is exact (and deprecates it)
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    lines = _csv_head(path)
    _other_delimiter(path, lines)
    header, notes = _header_policy(path, lines)
    try:
        df = pd.read_csv(path, header=0 if header else None, skipinitialspace=True, **exact)
    except UnicodeDecodeError:  # past the bytes looked at
        raise _not_utf8(path) from None
    except Exception as e:  # noqa: BLE001 - ragged rows, empty or binary files: say what the parser said
        raise ValueError(f"{path}: cannot read as CSV ({one_line(e)})") from None
    return RawTable(df, notes=notes)


@register_reader(".npy")
def read_npy(path: Path) -> RawTable:
    """One array (points x features), split by the config's fractions."""
    try:
        with open(path, "rb") as fh:  # our handle: np.load leaks its own when the file is corrupt
            a = np.load(fh, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as .npy ({one_line(e)})") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise ValueError(f"{path}: holds an .npz archive, not one .npy array; rename it to .npz")
    return RawTable(a)


def stream_npy(path: Path, columns: Sequence[str | int] | None = None) -> RawTable:
    """A .npy file memory-mapped read-only: nothing is read until the streaming pass."""
    return RawTable(_map_npy(path))


STREAM_READERS[".npy"] = stream_npy


@register_reader(".npz")
def read_npz(path: Path) -> RawTable:
    """Arrays ``train``/``valid``/``test`` (or ``train``/``test``) used as the splits, or exactly one array."""
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:  # our handle, closed even if corrupt
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - corrupt archives raise all sorts
        raise ValueError(f"{path}: cannot read as .npz ({one_line(e)})") from None
    if set(arrays) in ({"train", "valid", "test"}, {"train", "test"}):
        return RawTable(arrays["train"], arrays.get("valid"), arrays["test"])
    if len(arrays) == 1:
        return RawTable(next(iter(arrays.values())))
    raise ValueError(f"{path}: expected arrays train/valid/test (or train/test), or exactly one array; "
                     f"found {sorted(arrays) if arrays else 'none'}")


@register_reader(".parquet")
def read_parquet(path: Path) -> RawTable:
    """A Parquet table, read by pandas (which needs pyarrow or fastparquet)."""
    pd = _pandas(path)
    try:
        df = pd.read_parquet(path)
    except ImportError:
        raise ValueError(f"{path}: pandas cannot read Parquet without pyarrow or fastparquet; "
                         "pip install pyarrow, or save the data as .csv or .npy") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as Parquet ({one_line(e)})") from None
    return RawTable(df)


def stream_parquet(path: Path, columns: Sequence[str | int] | None = None) -> RawTable:
    """A Parquet table read row group by row group (pyarrow's ``iter_batches``) into a temporary float64 ``.npy``,
    which is memory-mapped and streamed; only ``columns`` (names or 0-based indices) are read. The temporary file
    is unlinked at once (its pages live as long as the map); it needs disk for rows x columns x 8 bytes."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: streaming a Parquet file needs pyarrow (pip install pyarrow); or save the data "
                         "as .npy") from None
    try:
        pf = pq.ParquetFile(path)
        index = (pf.schema_arrow.pandas_metadata or {}).get("index_columns", [])
        labels = [c for c in pf.schema_arrow.names if c not in index]  # a saved pandas index is not data
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read as Parquet ({one_line(e)})") from None
    chosen = labels if columns is None else [
        labels[i] for i in _column_positions([columns] if isinstance(columns, (str, int)) else columns, labels,
                                             len(labels), str(path))]
    n = pf.metadata.num_rows
    if n == 0 or not chosen:
        return RawTable(np.empty((n, len(chosen))), names=tuple(chosen), columns_applied=True)
    fd, tmp = tempfile.mkstemp(prefix="pyro_lvm_parquet_", suffix=".npy")
    os.close(fd)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(n, len(chosen)))
        offset = mm.offset
        del mm
        with open(tmp, "r+b") as f:
            f.seek(offset)
            done = 0
            batches = pf.iter_batches(batch_size=_block_rows(len(chosen)), columns=chosen)
            while True:
                try:
                    df = next(batches, None)
                    if df is None:
                        break
                    df = df.to_pandas()
                except Exception as e:  # noqa: BLE001 - pyarrow's errors, one line
                    raise ValueError(f"{path}: cannot read as Parquet ({one_line(e)})") from None
                # a non-numeric column is refused as check_matrix refuses it (by name; a column's type is the
                # file's, so the first batch shows it)
                np.ascontiguousarray(_dataframe_to_numpy(df, str(path)), dtype=np.float64).tofile(f)
                done += len(df)
        if done != n:
            raise ValueError(f"{path}: cannot read as Parquet (its metadata says {n} rows, its row groups hold {done})")
        data = np.load(tmp, mmap_mode="r")
    finally:
        os.unlink(tmp)
    return RawTable(data, names=tuple(chosen), columns_applied=True)


STREAM_READERS[".parquet"] = stream_parquet


def load_file(
    path: str | os.PathLike,
    config: DataConfig | None = None,
    *,
    columns: Sequence[str | int] | None = None,
    standardize: bool | None = None,
) -> Dataset:
    """The user's data file as a :class:`Dataset`, read by suffix (:data:`FILE_READERS`).

    The split fractions, seed, dtype and subset come from ``config``; ``columns`` selects columns by name or
    0-based index. ``standardize=None`` follows ``config.standardize``: standardize by train statistics unless
    every value is 0/1. Errors are one line starting with the file's absolute path.

    Refused besides what :func:`from_array` refuses: fewer than :data:`MIN_FEATURES` feature columns (after
    ``columns`` and dropping constant columns), and the CSV problems listed in :func:`read_csv` (a CSV whose
    first row is all numbers is read without a header, with a ``UserWarning`` saying so).

    A ``.npy`` or ``.parquet`` file too big to load (:func:`load_would_crowd_memory`; any, with
    ``config.stream=True``) is streamed (:data:`STREAM_READERS`): the splits are :class:`MappedRows` read a minibatch
    at a time, the same numbers as when loaded (``config.stream=False``).
    """
    config = config or DataConfig()
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: is not a file (a directory?); give the path of a data file")
    suffix = path.suffix.lower()
    reader = FILE_READERS.get(suffix)
    if reader is None:
        raise ValueError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; "
                         f"supported: {', '.join(sorted(FILE_READERS))}")
    stream = config.stream
    if stream is None:
        stream = suffix in STREAM_READERS and load_would_crowd_memory(path)
    if stream and suffix not in STREAM_READERS:
        raise ValueError(f"{path}: {suffix} files are not streamed (stream=True); save the data as "
                         f"{' or '.join(sorted(STREAM_READERS))}, or load it into memory (stream=False)")
    table = STREAM_READERS[suffix](path, columns) if stream else reader(path)
    if standardize is None and not config.standardize:
        standardize = False
    ds = _dataset(path.stem, table.data, table.valid, table.test, where=str(path), split=config.split,
                  seed=config.seed, standardize=standardize, dtype=config.dtype, subset=config.subset,
                  columns=None if table.columns_applied else columns, feature_names=table.names, source=str(path),
                  path=path, files=(path,), meta={"path": str(path)}, stream=bool(stream))
    if table.columns_applied and columns is not None and ds.origin is not None:
        ds.origin.columns = [columns] if isinstance(columns, (str, int)) else list(columns)
    if ds.data_dim < MIN_FEATURES:
        raw_width = ds.origin.shape[1] if ds.origin is not None else ds.data_dim
        dropped = ds.meta.get("dropped_constant_columns") or []
        names = ds.meta.get("feature_names")
        what = (f"only {ds.data_dim} feature column{'s' if ds.data_dim != 1 else ''}"
                + (f" ({', '.join(repr(n) for n in names)})" if names else ""))
        if dropped:
            what += f" once {len(dropped)} constant column(s) of {raw_width} are dropped"
        elif columns is not None:
            what += " selected by columns"
        raise ValueError(f"{path}: the data have {what}; the models need at least {MIN_FEATURES} (factor analysis "
                         "needs more columns than --latent-dim); give a table with 2 or more numeric, non-constant "
                         "columns")
    for note in table.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return ds


# ---------------------------------------------------------------------------------------------
# scikit-learn's bundled sets


def _sklearn_loader(fn_name: str, image_shape: tuple[int, int] | None = None) -> Loader:
    def load(config: DataConfig) -> Dataset:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, fn_name)()
        name = fn_name.removeprefix("load_")
        ds = standardize_splits(name, bunch.data, bunch.target, config, feature_names=list(bunch.feature_names),
                                source=f"sklearn.datasets.{fn_name}")
        if image_shape is not None and ds.data_dim == image_shape[0] * image_shape[1]:
            ds.image_shape = image_shape
        return ds

    load.__doc__ = f"scikit-learn's bundled ``{fn_name}``, split and standardized by the train split."
    return load


for _name, _fn, _tags, _summary in [
    ("breast_cancer", "load_breast_cancer", ("continuous",), "569 tumours x 30 features (scikit-learn)"),
    ("wine", "load_wine", ("continuous", "clusters"), "178 wines x 13 features, 3 cultivars (scikit-learn)"),
    ("iris", "load_iris", ("continuous", "clusters"), "150 flowers x 4 features, 3 species (scikit-learn)"),
]:
    register_dataset(_name, tags=_tags, summary=_summary)(_sklearn_loader(_fn))


@register_dataset("digits", tags=("continuous", "images"), summary="1797 8x8 digit images, standardized (scikit-learn)")
def load_digits(config: DataConfig) -> Dataset:
    """scikit-learn's 8x8 ``digits`` (1797 images), standardized; constant pixels are dropped."""
    ds = _sklearn_loader("load_digits")(config)
    ds.name = "digits"
    if ds.origin is not None:
        ds.origin.source = "digits"
    if not ds.meta["dropped_constant_columns"]:
        ds.image_shape = (8, 8)
    return ds


@register_dataset("digits_pca", tags=("continuous", "clusters"),
                  summary="digits projected on their first pca_dim principal axes (fit on train)")
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

    meta = {**ds.meta, "pca_dim": config.pca_dim, "feature_names": [f"pc{i + 1}" for i in range(config.pca_dim)]}
    origin = None if ds.origin is None else replace(ds.origin, source="digits_pca")
    return Dataset("digits_pca", project(ds.train), project(ds.valid), project(ds.test), labels=ds.labels,
                   meta=meta, origin=origin)


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


def _read_mnist_npz(path: Path) -> dict[str, np.ndarray]:
    """The three splits of ``binarized_mnist.npz`` (packed bits, one row per image) as 0/1 uint8 arrays."""
    try:
        with np.load(path) as f:
            packed = {k: f[k] for k in ("train", "valid", "test") if k in f.files}
    except Exception as e:  # noqa: BLE001 - not a zip, truncated, pickled objects: one line
        raise ValueError(f"{path}: cannot read as .npz ({one_line(e)}); expected the keys train, valid, test "
                         "holding np.packbits(images, axis=1)") from None
    missing = sorted({"train", "valid", "test"} - set(packed))
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected train, valid, test")
    out = {}
    for k, a in packed.items():
        if a.ndim != 2 or a.dtype != np.uint8 or a.shape[1] * 8 < 784:
            raise ValueError(f"{path} [{k}]: expected 784-pixel images packed by np.packbits(axis=1) (uint8, at "
                             f"least 98 bytes a row), got dtype {a.dtype} and shape {a.shape}")
        out[k] = np.unpackbits(a, axis=1)[:, :784]
    return out


def _read_mnist_amat(path: Path) -> np.ndarray:
    """One ``.amat`` split: whitespace-separated 0/1 values, 784 a row."""
    def read(dtype: type) -> np.ndarray:
        with warnings.catch_warnings():  # an empty file warns, then gives shape (0, 1): reported below
            warnings.simplefilter("ignore", UserWarning)
            return np.loadtxt(path, dtype=dtype, ndmin=2)

    try:
        a = read(np.uint8)  # a 40 MB array for the 50000 training images, not 300 MB of floats
    except (ValueError, OverflowError):  # "0.5", "-1", "256", ...: read as numbers to say which and where
        try:
            a = read(np.float64)
        except ValueError as e:
            raise ValueError(f"{path}: not a table of numbers ({one_line(e)}); expected 784 values of 0 or 1 a "
                             "line") from None
    if a.shape[1] != 784 or a.shape[0] == 0:
        raise ValueError(f"{path}: expected rows of 784 pixel values, got shape {a.shape}; supply the "
                         "binarized_mnist_{train,valid,test}.amat files as distributed (one image a line)")
    bad = (a != 0) & (a != 1)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"{path}: value {a[row, col]:g} at row {row}, column {col} (counting from 0) is not 0 or 1; "
                         f"{int(bad.any(1).sum())} of {len(a)} images hold values other than 0/1; binarize them first "
                         "(e.g. x > 0.5), or give the data as --data FILE to model grey levels")
    return a.astype(np.uint8)


def read_binarized_mnist(data_dir: str | os.PathLike | None = None) -> tuple[dict[str, np.ndarray], Path]:
    """Read the three splits as uint8 0/1 arrays of shape (N, 784) from ``.npz`` or ``.amat`` files."""
    looked: list[str] = []
    for d in mnist_search_dirs(data_dir):
        npz = d / MNIST_FILE
        looked.append(str(npz))
        if npz.is_file():
            return _read_mnist_npz(npz), npz
        amats = {k: d / MNIST_AMAT.format(k) for k in ("train", "valid", "test")}
        looked.append(str(d / MNIST_AMAT.format("{train,valid,test}")))
        if all(p.is_file() for p in amats.values()):
            return {k: _read_mnist_amat(p) for k, p in amats.items()}, d
    raise FileNotFoundError(
        "binarized MNIST not found; looked for:\n  " + "\n  ".join(looked)
        + f"\nSupply it with --data-dir DIR or the environment variable {DATA_DIR_ENV}=DIR, where DIR holds "
        f"{MNIST_FILE} (keys train/valid/test, np.packbits(axis=1)) or {MNIST_AMAT.format('{train,valid,test}')}."
    )


@register_dataset("binarized_mnist", tags=("binary", "images"),
                  summary="static binarized MNIST, 50000/10000/10000 0/1 images of 28x28 (Larochelle & Murray)")
def load_binarized_mnist(config: DataConfig) -> Dataset:
    """Static binarized MNIST with its standard 50000/10000/10000 split."""
    arrays, path = read_binarized_mnist(config.data_dir)
    for k, a in arrays.items():
        if a.ndim != 2 or a.shape[1] != 784 or len(a) == 0:
            raise ValueError(f"{path} [{k}]: expected images of 784 pixels, got shape {a.shape}")
        if a.max() > 1:  # the readers give 0/1 already: a guard for readers added later
            raise ValueError(f"{path} [{k}]: expected 0/1 pixel values, got values up to {a.max()}; binarize first")
    # the files are ordered (the first test images are not representative), so subsets are random
    rng = np.random.default_rng(config.seed)
    t = {k: torch.as_tensor(a[np.sort(rng.permutation(len(a))[: config.subset])] if config.subset else a,
                            dtype=config.dtype) for k, a in arrays.items()}
    files = (path,) if path.is_file() else tuple(path / MNIST_AMAT.format(k) for k in SPLITS)
    origin = Origin(source="binarized_mnist", shape=(sum(len(a) for a in arrays.values()), 784), standardized=False,
                    seed=config.seed, path=str(path), files=files)
    return Dataset("binarized_mnist", t["train"], t["valid"], t["test"], binary=True, image_shape=(28, 28),
                   meta={"path": str(path)}, origin=origin)


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
    origin = Origin(source=name, shape=(x.shape[0], x.shape[1]), standardized=False,
                    split_fractions=tuple(config.split), seed=config.seed,
                    sha256=sha256_arrays([x.detach().cpu().numpy()]))
    return Dataset(name, x[take[0]].to(config.dtype), x[take[1]].to(config.dtype) if len(take[1]) else None,
                   x[take[2]].to(config.dtype), labels=lab, meta=meta, origin=origin)


@register_dataset("synthetic_mixture", tags=("continuous", "ground-truth", "mixture", "clusters"),
                  summary="Gaussian-mixture data from known weights, means and covariances")
def load_synthetic_mixture(config: DataConfig) -> Dataset:
    """Gaussian-mixture data from known weights, means and covariances (labels are the true components)."""
    from pyro_lvm.models.gaussian_mixture import make_mixture_data

    x, truth = make_mixture_data(config.num_points, config.data_dim, config.num_components, config.separation,
                                 config.seed)
    return _split_synthetic("synthetic_mixture", x, config, labels=truth["labels"], truth=truth)


@register_dataset("synthetic", tags=("continuous", "ground-truth", "factor"),
                  summary="factor-analysis data from known W, mu, Psi (not standardized)")
def load_synthetic_fa(config: DataConfig) -> Dataset:
    """Factor-analysis data from known W, μ, Ψ (not standardized, so the truth applies as is)."""
    x, truth = make_factor_analysis_data(config.num_points, config.data_dim, config.latent_dim, config.seed)
    return _split_synthetic("synthetic", x, config, labels=None, truth=truth)

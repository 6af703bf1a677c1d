"""The user's own data: check_matrix, from_array, load_file, provenance, and the data-set registry's tags."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn.datasets
import torch
from cli_runner import WarmCLI

from pyro_lvm.checks import check_matrix
from pyro_lvm.data import (
    DataConfig,
    Dataset,
    dataset_entry,
    dataset_names,
    from_array,
    load_dataset,
    load_file,
)

SPLITS = ("train", "valid", "test")


def integers(rows: int = 40, cols: int = 5, seed: int = 0) -> np.ndarray:
    """Small integers: exact in every dtype from float16 to int64, so all inputs hold the same numbers."""
    return np.random.default_rng(seed).integers(0, 50, size=(rows, cols))


def same_splits(a: Dataset, b: Dataset) -> bool:
    return all((getattr(a, k) is None and getattr(b, k) is None) or torch.equal(getattr(a, k), getattr(b, k))
               for k in SPLITS)


# ------------------------------------------------------------------------------------------------
# check_matrix


@pytest.mark.parametrize(("x", "dtype", "expected"), [
    (np.ones((2, 3), np.float16), None, torch.float16),
    (np.ones((2, 3), np.float32), None, torch.float32),
    (np.ones((2, 3), np.float64), None, torch.float64),
    (np.ones((2, 3), np.int64), None, torch.float32),  # torch's default dtype
    (np.ones((2, 3), np.uint16), None, torch.float32),
    (np.ones((2, 3), bool), torch.float64, torch.float64),
    ([[1.0, 2.0]], None, torch.float32),  # lists carry no dtype of their own
    (torch.ones(2, 3, dtype=torch.float64), torch.float32, torch.float32),
    (pd.DataFrame({"a": np.ones(2, np.float32), "b": [True, False]}), None, torch.float32),
    (pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]}), None, torch.float64),
])
def test_check_matrix_converts_to_the_asked_or_own_floating_dtype(x: object, dtype: torch.dtype | None,
                                                                 expected: torch.dtype) -> None:
    out = check_matrix(x, dtype=dtype, device="cpu")
    assert out.dtype == expected and out.dim() == 2
    assert torch.equal(out.double(), torch.as_tensor(np.asarray(x, dtype=np.float64)))


@pytest.mark.parametrize(("x", "kwargs", "needles"), [
    (np.zeros(3), {}, ["data:", "2-D", "shape (3,)"]),
    (np.zeros((0, 3)), {}, ["0 rows"]),
    (np.zeros((2, 3)), {"width": 4}, ["expected 4 features per point, got 3"]),
    (np.array([[1.0, 2.0], [3.0, np.nan], [np.inf, 1.0]]), {}, ["NaN at row 1, column 1", "2 of 3 rows", "impute"]),
    (pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [1.0, -np.inf, 2.0]}), {"name": "X"},
     ["X:", "-inf at row 1, column 1 ('b')", "1 of 3 rows"]),
    (pd.DataFrame({"a": [1.0, 2.0], "b": pd.array([1, None], dtype="Int64")}), {}, ["NaN at row 1, column 1 ('b')"]),
    (pd.DataFrame({"a": [1.0, 2.0], "species": ["setosa", "virginica"]}), {},
     ["column 'species' is not numeric", "'setosa' at row 0", "select numeric columns"]),
    ([[1, 2], [3]], {}, ["cannot be read as a numeric matrix"]),
    (np.array([["a", "b"]]), {}, ["not numbers"]),
    (np.ones((2, 2), complex), {}, ["complex"]),
    (np.array([[1.0], [1e300]]), {"dtype": torch.float32}, ["row 1, column 0", "overflows torch.float32"]),
])
def test_check_matrix_errors_say_what_and_where_in_one_line(x: object, kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        check_matrix(x, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


# ------------------------------------------------------------------------------------------------
# from_array


INPUTS: dict[str, Callable[[np.ndarray], object]] = {
    "float64": lambda a: a.astype(np.float64),
    "float32": lambda a: a.astype(np.float32),
    "float16": lambda a: a.astype(np.float16),
    "int64": lambda a: a.astype(np.int64),
    "int32": lambda a: a.astype(np.int32),
    "tensor32": lambda a: torch.as_tensor(a, dtype=torch.float32),
    "tensor_int": lambda a: torch.as_tensor(a),
    "dataframe": lambda a: pd.DataFrame(a, columns=[f"f{i}" for i in range(a.shape[1])]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("kind", list(INPUTS))
def test_from_array_gives_the_asked_dtype_and_identical_splits_for_every_input(
    kind: str, standardize: bool, dtype: torch.dtype
) -> None:
    raw = integers()
    reference = from_array(raw.astype(np.float64), seed=5, dtype=dtype, standardize=standardize)
    ds = from_array(INPUTS[kind](raw), seed=5, dtype=dtype, standardize=standardize)
    assert all(t.dtype == dtype for t in ds.splits().values())
    assert same_splits(ds, reference)
    assert ds.sizes() == {"train": 32, "valid": 4, "test": 4, "dim": 5}
    assert ds.provenance()["sha256"] == reference.provenance()["sha256"]  # the numbers, not their dtype
    if not standardize:  # values as given, rows a seeded permutation of the input
        rows = torch.cat([ds.train, ds.valid, ds.test]).double()
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, raw.astype(float).tolist()))


def test_from_array_split_is_seeded_and_standardized_by_train_only() -> None:
    raw = np.random.default_rng(1).normal(3.0, 2.0, size=(200, 4))
    a, b, c = from_array(raw, seed=1), from_array(raw, seed=1), from_array(raw, seed=2)
    assert same_splits(a, b) and not torch.equal(a.train, c.train)
    torch.testing.assert_close(a.train.double().mean(0), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-6)
    assert a.test.mean(0).abs().max() > 1e-3  # test is scaled by train's statistics, not its own


def test_from_array_given_splits_are_used_as_is_and_scaled_by_train() -> None:
    rng = np.random.default_rng(2)
    train, valid, test = (rng.normal(5.0, 3.0, size=(n, 3)) for n in (50, 7, 9))
    ds = from_array(train, valid=valid, test=test, split=(0.1, 0.1, 0.8), dtype=torch.float64)
    assert ds.sizes() == {"train": 50, "valid": 7, "test": 9, "dim": 3}
    torch.testing.assert_close(ds.test, torch.as_tensor((test - train.mean(0)) / train.std(0)))
    assert ds.provenance()["split_fractions"] is None and ds.provenance()["shape"] == [66, 3]
    no_valid = from_array(train, test=test)
    assert no_valid.valid is None and no_valid.sizes()["test"] == 9
    with pytest.raises(ValueError, match="valid= was given without test="):
        from_array(train, valid=valid)
    with pytest.raises(ValueError, match=r"valid\]: expected 3 features per point, got 2"):
        from_array(train, valid=valid[:, :2], test=test)


def test_constant_columns_are_dropped_with_their_names() -> None:
    raw = integers(30, 4).astype(float)
    raw[:, 2] = 7.0
    df = pd.DataFrame(raw, columns=["a", "b", "const", "d"])
    ds = from_array(df)
    assert ds.data_dim == 3 and ds.meta["feature_names"] == ["a", "b", "d"]
    assert ds.meta["dropped_constant_columns"] == [2] == ds.provenance()["dropped_constant_columns"]
    kept = from_array(df, standardize=False)
    assert kept.data_dim == 4 and kept.meta["feature_names"] == ["a", "b", "const", "d"]


def test_columns_select_by_name_and_by_index() -> None:
    raw = integers(30, 5)
    df = pd.DataFrame(raw, columns=list("abcde"))
    by_name, by_index = from_array(df, columns=["d", "b"]), from_array(df, columns=[3, 1])
    mixed = from_array(df, columns=["d", 1])
    array = from_array(raw, columns=[3, 1])
    named_array = from_array(raw, columns=["d", "b"], feature_names=list("abcde"))
    assert same_splits(by_name, by_index) and same_splits(by_name, mixed) and same_splits(by_name, array)
    assert same_splits(by_name, named_array)
    assert by_name.meta["feature_names"] == ["d", "b"] == named_array.meta["feature_names"]
    assert torch.equal(from_array(df, columns="c", standardize=False).train.flatten(),
                       from_array(raw[:, 2:3], standardize=False).train.flatten())


def test_labels_follow_their_rows() -> None:
    raw = np.column_stack([np.arange(50), integers(50, 2)]).astype(float)
    ds = from_array(raw, labels=np.arange(50), standardize=False, seed=4, subset=10)
    for k in SPLITS:
        assert torch.equal(ds.labels[k].double(), getattr(ds, k)[:, 0].double())
    assert ds.sizes()["train"] == 10


# ------------------------------------------------------------------------------------------------
# load_file


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, list[str]]:
    bunch = sklearn.datasets.load_breast_cancer()
    return bunch.data, list(bunch.feature_names)


@pytest.mark.parametrize("header", [True, False])
def test_breast_cancer_csv_is_bit_identical_to_the_built_in_loader(
    tmp_path: Path, cancer: tuple[np.ndarray, list[str]], header: bool
) -> None:
    x, names = cancer
    path = tmp_path / "cancer.csv"
    pd.DataFrame(x, columns=names).to_csv(path, index=False, header=header)
    config = DataConfig(seed=3)
    mine, builtin = load_file(path, config), load_dataset("breast_cancer", config)
    assert same_splits(mine, builtin) and mine.train.dtype == builtin.train.dtype == torch.float32
    assert mine.meta["train_mean"] == builtin.meta["train_mean"]
    assert (mine.meta["feature_names"] == names) is header


def test_npy_round_trip_and_file_provenance(tmp_path: Path) -> None:
    raw = np.random.default_rng(3).normal(size=(60, 4))
    path = tmp_path / "x.npy"
    np.save(path, raw)
    config = DataConfig(seed=7, split=(0.5, 0.25, 0.25), dtype=torch.float64)
    ds = load_file(path, config)
    assert same_splits(ds, from_array(raw, split=config.split, seed=7, dtype=torch.float64))
    p = ds.provenance()
    assert p["source"] == str(path.resolve()) and p["path"] == str(path.resolve())
    assert p["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert p["shape"] == [60, 4] and sum(p["splits"].values()) == 60 and p["splits"]["valid"] == 15
    assert p["standardized"] is True and p["split_fractions"] == [0.5, 0.25, 0.25] and p["seed"] == 7
    assert ds.name == "x"


def test_npz_with_splits_and_with_one_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    train, valid, test = (rng.normal(size=(n, 3)) for n in (40, 6, 8))
    given = tmp_path / "given.npz"
    np.savez(given, train=train, valid=valid, test=test)
    ds = load_file(given, DataConfig(dtype=torch.float64), standardize=False)
    assert ds.sizes() == {"train": 40, "valid": 6, "test": 8, "dim": 3}
    assert torch.equal(ds.valid, torch.as_tensor(valid)) and ds.provenance()["split_fractions"] is None

    two = tmp_path / "two.npz"
    np.savez(two, train=train, test=test)
    assert load_file(two, DataConfig()).valid is None

    single, npy = tmp_path / "single.npz", tmp_path / "single.npy"
    np.savez_compressed(single, anything=train)
    np.save(npy, train)
    config = DataConfig(seed=2)
    assert same_splits(load_file(single, config), load_file(npy, config))


def test_parquet_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    df = pd.DataFrame(integers(30, 3), columns=["a", "b", "c"])
    path = tmp_path / "x.parquet"
    df.to_parquet(path)
    ds = load_file(path, DataConfig(seed=1), columns=["c", "a"])
    assert same_splits(ds, from_array(df, columns=["c", "a"], split=(0.6, 0.2, 0.2), seed=1))
    assert ds.meta["feature_names"] == ["c", "a"]


def test_csv_columns_by_name_and_index(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    pd.DataFrame(integers(30, 4), columns=["w", "x", "y", "z"]).assign(kind="a").to_csv(path, index=False)
    by_name = load_file(path, DataConfig(), columns=["z", "x"])
    by_index = load_file(path, DataConfig(), columns=[3, 1])
    assert same_splits(by_name, by_index) and by_name.meta["feature_names"] == ["z", "x"]
    assert by_name.provenance()["columns"] == ["z", "x"] and by_name.provenance()["shape"] == [30, 2]


def test_binary_data_are_detected_and_kept_as_is(tmp_path: Path) -> None:
    bits = (np.random.default_rng(5).random((50, 6)) < 0.3).astype(np.uint8)
    path = tmp_path / "bits.npy"
    np.save(path, bits)
    ds = load_file(path, DataConfig())
    assert ds.binary and not ds.provenance()["standardized"]
    assert set(torch.cat(list(ds.splits().values())).unique().tolist()) <= {0.0, 1.0}
    assert not load_file(path, DataConfig(), standardize=True).binary
    assert not from_array(bits).binary and from_array(bits, standardize=False).binary
    assert from_array(bits.astype(bool), standardize=None).binary
    continuous = tmp_path / "continuous.npy"
    np.save(continuous, bits + 0.5)
    assert not load_file(continuous, DataConfig(standardize=False)).meta["standardized"]
    assert load_file(continuous, DataConfig()).meta["standardized"]


def _write(tmp_path: Path, name: str, content: str | bytes | np.ndarray | dict) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        np.save(path, content)
    return path


NAN_CSV = "a,b,c\n" + "".join(f"{i},{i + 1},{i + 2}\n" for i in range(20)).replace("3,4,5", "3,nan,5")
INF_ROWS = np.ones((20, 3))
INF_ROWS[4, 2] = np.inf

ERROR_CASES = {
    "missing file": ("nope.csv", None, {}, FileNotFoundError, ["no such file"]),
    "directory": ("adir.csv", "DIR", {}, FileNotFoundError, ["not a file"]),
    "unknown suffix": ("x.xlsx", "1,2\n", {}, ValueError, ["'.xlsx'", ".csv, .npy, .npz, .parquet"]),
    "ragged csv": ("x.csv", "1,2\n3,4\n5,6,7\n", {}, ValueError, ["cannot read as CSV"]),
    "empty csv": ("x.csv", "", {}, ValueError, ["cannot read as CSV"]),
    "header only": ("x.csv", "a,b\n", {}, ValueError, ["0 rows"]),
    "corrupt npz": ("x.npz", b"PK\x03\x04 definitely not a zip", {}, ValueError, ["cannot read as .npz"]),
    "npz keys": ("x.npz", {"a": np.ones((9, 2)), "b": np.ones((9, 2))}, {}, ValueError, ["found ['a', 'b']"]),
    "npz valid only": ("x.npz", {"train": np.ones((9, 2)), "valid": np.ones((9, 2))}, {}, ValueError,
                       ["found ['train', 'valid']"]),
    "corrupt npy": ("x.npy", b"\x93NUMPY garbage", {}, ValueError, ["cannot read as .npy"]),
    "1-D npy": ("x.npy", np.arange(9.0), {}, ValueError, ["2-D", "shape (9,)"]),
    "NaN in csv": ("x.csv", NAN_CSV, {}, ValueError, ["NaN at row 3, column 1 ('b')", "1 of 20 rows"]),
    "inf in npy": ("x.npy", INF_ROWS, {}, ValueError, ["inf at row 4, column 2", "1 of 20 rows"]),
    "NaN in given split": ("x.npz", {"train": np.ones((9, 2)), "test": np.array([[1.0, np.nan]])}, {}, ValueError,
                           ["[test]: NaN at row 0, column 1"]),
    "non-numeric column": ("x.csv", "a,species\n1,setosa\n2,virginica\n", {}, ValueError,
                           ["column 'species' is not numeric"]),
    "too few rows": ("x.csv", "1,2\n3,4\n5,6\n", {"split": (0.8, 0.1, 0.1)}, ValueError,
                     ["3 rows cannot be split 0.8/0.1/0.1 into non-empty train, valid and test sets"]),
    "unknown column": ("x.csv", "a,b\n1,2\n", {"columns": ["c"]}, ValueError, ["no column named 'c'", "'a', 'b'"]),
    "column index": ("x.npy", np.ones((9, 2)), {"columns": [5]}, ValueError, ["column index 5 is out of range"]),
    "name on array": ("x.npy", np.ones((9, 2)), {"columns": ["a"]}, ValueError, ["no column names"]),
}
try:
    import pyarrow  # noqa: F401
except ImportError:  # pandas then cannot read Parquet at all, and must say so
    ERROR_CASES["parquet without pyarrow"] = ("x.parquet", b"PAR1", {}, ValueError, ["pip install pyarrow"])


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_load_file_errors_name_the_path_in_one_line(tmp_path: Path, case: str) -> None:
    name, content, kwargs, exc, needles = ERROR_CASES[case]
    if isinstance(content, str) and content == "DIR":
        (tmp_path / name).mkdir()
    elif content is not None:
        _write(tmp_path, name, content)
    split = kwargs.pop("split", (0.6, 0.2, 0.2))
    with pytest.raises(exc) as err:
        load_file(tmp_path / name, DataConfig(split=split), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str((tmp_path / name).resolve())), msg
    assert all(n in msg for n in needles), msg
    assert type(err.value) is exc


def test_too_few_rows_in_memory_suggests_how_many_are_needed() -> None:
    with pytest.raises(ValueError, match=r"^array: 3 rows cannot be split 0\.8/0\.1/0\.1 .* at least 8 rows"):
        from_array(integers(3, 2))


# ------------------------------------------------------------------------------------------------
# the registry and the built-in sets' provenance


def test_dataset_tags() -> None:
    assert dataset_names({"binary"}) == ["binarized_mnist"]
    assert dataset_names({"images"}) == ["binarized_mnist", "digits"]
    assert dataset_names({"ground-truth"}) == ["synthetic", "synthetic_mixture"]
    assert dataset_names({"ground-truth", "factor"}) == ["synthetic"]
    assert {"iris", "wine", "digits_pca", "synthetic_mixture"} <= set(dataset_names({"clusters"}))
    everything = dataset_names()
    assert set(dataset_names({"continuous"})) | set(dataset_names({"binary"})) == set(everything)
    assert all(dataset_entry(n).summary for n in everything)
    with pytest.raises(ValueError, match="unknown dataset tags \\['binray'\\]; known tags: binary"):
        dataset_names({"binray"})


def test_hyphens_find_underscored_names() -> None:
    assert dataset_entry("digits-pca") is dataset_entry("digits_pca")
    config = DataConfig(seed=1, pca_dim=3)
    assert same_splits(load_dataset("digits-pca", config), load_dataset("digits_pca", config))
    with pytest.raises(ValueError, match="unknown dataset 'digits-pcb'; valid datasets: .*digits_pca"):
        load_dataset("digits-pcb")


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A directory with a 500-image-per-split ``binarized_mnist.npz`` in the real file's (packed) format."""
    rng = np.random.default_rng(0)
    arrays = {k: np.packbits((rng.random((500, 784)) < 0.13).astype(np.uint8), axis=1) for k in SPLITS}
    np.savez_compressed(tmp_path / "binarized_mnist.npz", **arrays)
    return tmp_path


def test_built_in_sets_record_provenance(tiny_mnist: Path) -> None:
    p = load_dataset("wine", DataConfig(seed=3)).provenance()
    assert p["source"] == "wine" and p["shape"] == [178, 13] and sum(p["splits"].values()) == 178
    assert p["standardized"] and p["split_fractions"] == [0.6, 0.2, 0.2] and p["seed"] == 3
    assert len(p["sha256"]) == 64 and p["sha256"] == load_dataset("wine", DataConfig(seed=4)).provenance()["sha256"]

    ds = load_dataset("binarized_mnist", DataConfig(data_dir=str(tiny_mnist), subset=20))
    p = ds.provenance()
    npz = tiny_mnist / "binarized_mnist.npz"
    assert p["source"] == "binarized_mnist" and p["path"] == str(npz.resolve())
    assert p["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert p["shape"] == [1500, 784] and p["splits"] == {"train": 20, "valid": 20, "test": 20}
    assert not p["standardized"] and p["split_fractions"] is None

    p = load_dataset("synthetic", DataConfig(num_points=100)).provenance()
    assert not p["standardized"] and p["shape"] == [100, 10] and sum(p["splits"].values()) == 100


# ------------------------------------------------------------------------------------------------
# issue 22: CSV shape, header, encoding and delimiter problems; values too large; too few columns


def _table(rows: int = 12, cols: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, cols)).round(3)


def _csv_text(x: np.ndarray, header: str | None = None, sep: str = ",", end: str = "") -> str:
    body = "".join(sep.join(str(float(v)) for v in row) + end + "\n" for row in x)
    return (header + "\n" if header is not None else "") + body


def _load_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ValueError) as err:
        load_file(path, DataConfig(), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path.resolve())), msg
    return msg


@pytest.mark.parametrize("header, end, needles", [
    ("a,b,c", "", ["header (line 1) has 3 names", "first data row (line 2) has 4 values", "row labels"]),
    ("a,b,c,d", ",", ["has 4 names", "has 5 values", "trailing comma"]),
    ("a,b,c,d,e", "", ["has 5 names", "has 4 values", "would be empty"]),
])
def test_csv_header_width_differing_from_the_rows_is_refused(tmp_path: Path, header: str, end: str,
                                                             needles: list[str]) -> None:
    path = _write(tmp_path, "x.csv", _csv_text(_table(), header, end=end))
    msg = _load_error(path)
    assert all(n in msg for n in needles), msg


def test_csv_first_row_of_numbers_is_data_and_says_so(tmp_path: Path) -> None:
    x = _table()
    path = _write(tmp_path, "x.csv", _csv_text(x))
    with pytest.warns(UserWarning, match="first row is all numbers, so it is read as data"):
        ds = load_file(path, DataConfig(split=(0.5, 0.25, 0.25)), standardize=False)
    assert sum(ds.sizes()[k] for k in SPLITS) == len(x) and ds.data_dim == 4
    named = _write(tmp_path, "named.csv", _csv_text(x, "a,b,c,d"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a named header is not an assumption: no warning
        load_file(named, DataConfig())


def test_csv_header_of_column_numbers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    pd.DataFrame(_table(20, 13)).to_csv(path, index=False)  # unnamed columns: header 0,1,...,12
    msg = _load_error(path)
    assert "first row is 0, 1, ..., 12" in msg and "names that are not numbers" in msg, msg


def test_values_whose_square_overflows_float64_are_refused_when_standardizing(tmp_path: Path) -> None:
    x = _table(30)
    x[5, 2] = 1e308
    path = tmp_path / "big.csv"
    pd.DataFrame(x, columns=list("abcd")).to_csv(path, index=False)
    msg = _load_error(path)
    assert "1e+308 at row 5, column 2 ('c')" in msg and "square overflows float64" in msg, msg
    with pytest.raises(ValueError, match=r"^array: 1e\+200 at row 5, column 2 .*square overflows float64"):
        from_array(np.where(x > 1e300, 1e200, x))
    # each square fits, their sum does not: refused by column rather than standardized to 0
    spread = _table(200, 3)
    spread[:, 1] = np.where(np.arange(200) % 2, 1.3e154, -1.3e154)
    with pytest.raises(ValueError, match=r"^array: column 1 cannot be standardized: its variance overflows"):
        from_array(spread)
    kept = from_array(np.where(x > 1e300, 1e200, x), standardize=False, dtype=torch.float64)  # not standardized
    assert bool(torch.isfinite(kept.train).all())


def test_values_the_dtype_cannot_hold_are_refused() -> None:
    x = _table(30)
    with pytest.raises(ValueError, match=r"^array: .* at row 0, column \d \(counting from 0\) overflows torch.float32"):
        from_array(x * 1e39, standardize=False)
    test = x.copy()
    test[4, 1] = 1e39
    with pytest.raises(ValueError, match=r"^array \[test\]: 1e\+39 at row 4, column 1 .*overflows torch.float32"):
        from_array(x, test=test, standardize=False)
    assert bool(torch.isfinite(from_array(x * 1e39, standardize=False, dtype=torch.float64).train).all())
    assert bool(torch.isfinite(from_array(x * 1e39).train).all())  # standardized values fit float32


def test_model_validate_refuses_values_the_model_cannot_score() -> None:
    import pyro_lvm
    from pyro_lvm.models.factor_analysis import FactorAnalysis

    model, x = FactorAnalysis.example()
    guide = pyro_lvm.build_guide("exact", model)
    for value, needle in ((1e300, "overflows torch.float32"), (1e20, "its square overflows")):
        bad = x.double().clone()
        bad[1, 2] = value
        with pytest.raises(ValueError, match=rf"^evaluation data: .* at row 1, column 2 .*{needle}"):
            pyro_lvm.evaluate(model, guide, bad)
        with pytest.raises(ValueError, match=rf"^training data: .*{needle}"):
            model.validate_training(bad)


ENCODINGS = {
    "utf-16": (lambda text: text.encode("utf-16"), ["UTF-16-encoded", "byte-order mark", "re-save it as UTF-8"]),
    "utf-16 without BOM": (lambda text: text.encode("utf-16-le"), ["UTF-16", "NUL bytes", "re-save it as UTF-8"]),
    "latin-1": (lambda text: text.replace("a,", "é,", 1).encode("latin-1"),
                ["not UTF-8", "byte 0xe9 on line 1", "latin-1", "re-save it as UTF-8"]),
    "semicolons": (lambda text: text.replace(",", ";").encode(), ["semicolon-separated", "sep=';'"]),
    "semicolons, decimal commas": (lambda text: text.replace(",", ";").replace(".", ",").encode(),
                                   ["semicolon-separated", "sep=';', decimal=','"]),
    "headerless decimal commas": (lambda text: text.split("\n", 1)[1].replace(",", ";").replace(".", ",").encode(),
                                  ["semicolon-separated", "decimal=','"]),
    "tabs": (lambda text: text.replace(",", "\t").encode(), ["tab-separated", "sep='\\t'"]),
    "spaces": (lambda text: text.split("\n", 1)[1].replace(",", " ").encode(), ["whitespace-separated"]),
}


@pytest.mark.parametrize("case", list(ENCODINGS))
def test_csv_encoding_and_delimiter_problems_name_the_fix(tmp_path: Path, case: str) -> None:
    encode, needles = ENCODINGS[case]
    path = _write(tmp_path, "x.csv", encode(_csv_text(_table(), "a,b,c,d")))
    msg = _load_error(path)
    assert all(n in msg for n in needles), msg


def test_csv_text_column_holding_semicolons_is_not_taken_for_a_delimiter(tmp_path: Path) -> None:
    frame = pd.DataFrame(_table(), columns=list("abcd")).assign(tags="x;y")
    path = tmp_path / "x.csv"
    frame.to_csv(path, index=False)
    assert load_file(path, DataConfig(), columns=list("abcd")).data_dim == 4
    assert "column 'tags' is not numeric" in _load_error(path)


@pytest.mark.parametrize("content, kwargs, needle", [
    ("a\n" + "".join(f"{i}.5\n" for i in range(12)), {}, "only 1 feature column ('a')"),
    ("a,b\n" + "".join(f"{i}.5,{i}\n" for i in range(12)), {"columns": ["a"]}, "selected by columns"),
    ("a,b\n" + "".join(f"{i}.5,1\n" for i in range(12)), {}, "once 1 constant column(s) of 2 are dropped"),
])
def test_fewer_than_two_feature_columns_are_refused_at_load_time(tmp_path: Path, content: str, kwargs: dict,
                                                                 needle: str) -> None:
    msg = _load_error(_write(tmp_path, "x.csv", content), **kwargs)
    assert needle in msg and "at least 2" in msg, msg


def _cli(warm_cli: WarmCLI, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """``python -m pyro_lvm.experiments *args --output out`` in ``tmp_path``: a real process (its own exit status,
    stdout and stderr), forked from the session's warm interpreter (tests/cli_runner.py), which saves its imports."""
    proc = warm_cli.run("pyro_lvm.experiments", [*args, "--output", str(tmp_path / "out")], tmp_path, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("experiment, content, needle", [
    ("factor_analysis", "a\n" + "".join(f"{i}.5\n" for i in range(12)), "only 1 feature column"),
    ("gaussian_mixture", "a\n" + "".join(f"{i}.5\n" for i in range(12)), "only 1 feature column"),
    ("factor_analysis", "a;b;c\n" + "".join(f"{i}.5;{i};{i * i}\n" for i in range(12)), "semicolon-separated"),
])
def test_bad_csv_on_the_command_line_is_one_error_line_and_exit_2(tmp_path: Path, warm_cli: WarmCLI, experiment: str,
                                                                  content: str, needle: str) -> None:
    _write(tmp_path, "data.csv", content)
    status, out, err = _cli(warm_cli, tmp_path, experiment, "--data", "data.csv", "--epochs", "1")
    shown = f"exit {status}\n--- stderr\n{err[-3000:]}\n--- stdout\n{out[-1000:]}"
    assert status == 2 and "Traceback" not in out + err, shown
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], shown
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), shown

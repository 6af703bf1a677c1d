"""Input checks at the boundary: one clear ``ValueError`` that says what is wrong and where.

:func:`check_matrix` is the single gate every data matrix passes (the loaders, ``from_array``/``load_file``
and the models' ``forward``): whatever came in (a NumPy array of any numeric dtype, a tensor, a pandas
DataFrame, nested lists) comes out as a 2-D floating tensor, or the caller gets one line saying what is
wrong, where (row, column, column name) and how to fix it.

pandas is optional: it is never imported here; a DataFrame is recognised only if pandas is already loaded.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: NumPy dtypes that :func:`torch.as_tensor` reads as they are (others are cast first)
_TORCH_READABLE = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                         np.int64, np.uint8, np.bool_)}


def one_line(error: BaseException | str) -> str:
    """An exception's message collapsed to one line (parsers like to spread theirs over several)."""
    return " ".join(str(error).split())


def is_dataframe(x: object) -> bool:
    """Whether ``x`` is a pandas DataFrame, without importing pandas (if it is not loaded, ``x`` is not one)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, pd.DataFrame)


def _dataframe_to_numpy(df: Any, name: str) -> np.ndarray:
    """A numeric DataFrame as one (rows, columns) array; a non-numeric column is named in the error."""
    import pandas as pd  # already loaded: ``df`` is a DataFrame

    if len(df) == 0:  # a header without rows reads as text columns: report the missing rows instead
        return np.empty(df.shape)
    for position, (label, column) in enumerate(df.items()):
        if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_complex_dtype(column.dtype):
            continue
        numbers = pd.to_numeric(column, errors="coerce")
        bad = np.flatnonzero((numbers.isna() & column.notna()).to_numpy())
        where = f", column {position}" if str(label) != str(position) else ""
        first = f"; first non-number {column.iloc[bad[0]]!r} at row {bad[0]}" if len(bad) else ""
        raise ValueError(
            f"{name}: column {label!r} is not numeric (dtype {column.dtype}{where}{first}); "
            "select numeric columns (columns=[...]) or encode it as numbers first"
        )
    try:  # the dtype all columns fit in; pandas' extension dtypes (nullable Int64, ...) have no NumPy one
        common = np.result_type(*(np.dtype(d) for d in df.dtypes)) if df.shape[1] else np.dtype(np.float64)
    except TypeError:
        common = np.dtype(np.float64)
    if common.kind != "f" and bool(df.isna().to_numpy().any()):
        common = np.dtype(np.float64)  # missing values in integer/bool columns: NaN, reported below
    return df.to_numpy(dtype=common, na_value=np.nan) if common.kind == "f" else df.to_numpy(dtype=common)


def _as_tensor(x: object, name: str) -> tuple[torch.Tensor, bool]:
    """``x`` as a real tensor of its own dtype where torch has it; also whether ``x`` carried a floating
    dtype of its own (lists and integer arrays do not, so they get torch's default dtype)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{name}: complex values (dtype {x.dtype}) are not supported; pass real numbers")
        return x, x.is_floating_point()
    if is_dataframe(x):
        a, has_dtype = _dataframe_to_numpy(x, name), True
    else:
        has_dtype = isinstance(x, np.ndarray)
        try:
            a = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - anything NumPy cannot read (ragged lists, ...) is bad input
            raise ValueError(f"{name}: cannot be read as a numeric matrix ({one_line(e)})") from None
    if a.dtype.kind == "c":
        raise ValueError(f"{name}: complex values (dtype {a.dtype}) are not supported; pass real numbers")
    if a.dtype.kind in "USVMm":
        raise ValueError(f"{name}: values of dtype {a.dtype} are not numbers; convert them to numbers first")
    if a.dtype.kind == "O":  # e.g. lists holding None: NaN where a value is missing, else an error
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: cannot be read as numbers ({one_line(e)})") from None
    floating = has_dtype and a.dtype.kind == "f"
    if a.dtype not in _TORCH_READABLE:  # float128, uint16/32/64
        a = a.astype(np.float64)
    elif not a.flags.writeable:  # e.g. a DataFrame's read-only view: torch would share it unprotected
        a = a.copy()
    return torch.as_tensor(a), floating


def nonfinite_message(name: str, value: float, row: int, col: int, n_rows: int, total: int, label: str = "") -> str:
    """The one line :func:`check_matrix` (and the streaming pass of :mod:`pyro_lvm.data`, which never holds the whole
    matrix) gives for NaN or inf: the first bad value, where it is, and how many of ``total`` rows hold one."""
    shown = "NaN" if value != value else f"{value}"
    return (f"{name}: {shown} at row {row}, column {col}{label} (counting from 0); {n_rows} of {total} rows hold NaN "
            "or inf; drop or impute those rows first (e.g. DataFrame.dropna())")


class LazyRows:
    """A (points x features) matrix whose rows are read only when indexed: the train/valid/test splits of data
    streamed from a file larger than memory (:class:`pyro_lvm.data.MappedRows`).

    Its values were checked once, in the pass that made it (finite, representable), so :func:`check_matrix`
    checks its shape and dtype and, from :attr:`bound`, that its values fit the asked dtype (and their squares,
    for ``finite_square``), without reading it (only a bound too large to rule an overflow out makes it read the
    rows); ``x[index]`` (an index tensor, array, slice or int) returns those rows as a tensor. Subclasses set
    ``shape`` (a ``torch.Size``), ``dtype``, ``device`` and ``bound`` (at least the largest magnitude of its
    values, as float64) and implement :meth:`to`, :meth:`__getitem__` and :meth:`blocks`. A rule on the values
    themselves (0/1 data, a support) reads them block by block: :func:`row_blocks`."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    bound: float

    def to(self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LazyRows:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> Any:
        """``(first row, float64 array of the next rows)`` pairs, every row once and in order: the values
        :meth:`__getitem__` returns before their cast to :attr:`dtype`."""
        raise NotImplementedError


def _check_lazy(x: LazyRows, name: str, width: int | None, dtype: torch.dtype | None,
                device: torch.device | str | None, finite_square: bool) -> LazyRows:
    """:func:`check_matrix` for rows read on demand: the same checks and messages, from :attr:`LazyRows.bound`
    (rows are read only to say where a value is that does not fit)."""
    shape = tuple(x.shape)
    if shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 rows, shape {shape})")
    if width is not None and shape[1] != width:
        raise ValueError(f"{name}: expected {width} features per point, got {shape[1]} (shape {shape})")
    if shape[1] == 0:
        raise ValueError(f"{name}: has no features (0 columns, shape {shape})")
    target = dtype or x.dtype
    if not target.is_floating_point:
        raise ValueError(f"{name}: dtype must be a floating dtype, got {target}")
    cast = float(torch.tensor(x.bound, dtype=torch.float64).to(target))  # casting is monotone: the largest value's
    square_limit = math.sqrt(torch.finfo(target).max)
    if math.isinf(cast) or (finite_square and cast > square_limit):
        limit = float(torch.finfo(target).max) if math.isinf(cast) else square_limit
        row = col = -1
        n_rows = 0
        for start, a in x.blocks():  # only to say where: the values are known not to fit
            cast_a = torch.as_tensor(a).to(target).abs()
            over = (cast_a.isinf() if math.isinf(cast) else cast_a > limit).numpy()
            rows = np.flatnonzero(over.any(1))
            if len(rows) and row < 0:
                row, col = start + int(rows[0]), int(np.flatnonzero(over[rows[0]])[0])
                value = float(a[rows[0], col])
            n_rows += len(rows)
        if n_rows == 0:  # the bound was loose (it holds for every split of the file): every value fits
            return x.to(dtype=target, device=device)
        if math.isinf(cast):
            raise ValueError(f"{name}: {value} at row {row}, column {col} (counting from 0) overflows {target} "
                             f"({n_rows} rows affected); rescale the data or ask for a wider dtype")
        raise ValueError(
            f"{name}: {float(torch.tensor(value, dtype=torch.float64).to(target)):g} at row {row}, column {col} "
            f"(counting from 0) is too large for {target}: its square overflows, so the model's likelihood would not "
            f"be finite ({n_rows} of {shape[0]} rows hold such values); standardize or rescale the data")
    return x.to(dtype=target, device=device)


def row_blocks(x: torch.Tensor | LazyRows) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, rows)`` pairs covering ``x`` once, in order: a tensor whole, a :class:`LazyRows` (data streamed
    from a file) block by block, as its dtype on its device. For a check of every value (0/1 data, a support) that
    must not hold a streamed split whole: ``for start, xb in row_blocks(x): ...``."""
    if not isinstance(x, LazyRows):
        yield 0, x
        return
    for start, a in x.blocks():
        yield start, torch.as_tensor(a, dtype=x.dtype).to(x.device)


def _first_bad(x: torch.Tensor) -> tuple[int, int, int, str]:
    """(first bad row, first bad column in it, number of bad rows, "NaN"/"inf"/"-inf") of non-finite ``x``."""
    bad = ~torch.isfinite(x)  # (N, D)
    rows = bad.any(-1).nonzero().flatten()
    row = int(rows[0])
    col = int(bad[row].nonzero()[0, 0])
    value = float(x[row, col])
    return row, col, len(rows), "NaN" if value != value else f"{value}"


def check_matrix(
    x: object,
    *,
    name: str = "data",
    width: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    finite_square: bool = False,
) -> torch.Tensor:
    """Return ``x`` as a 2-D (points x features) floating tensor, or raise a one-line ``ValueError``.

    ``x`` may be a tensor, a NumPy array of any real dtype (float16/32/64, ints, bool), a pandas DataFrame of
    numeric columns, or nested lists. The result has ``dtype`` (default: ``x``'s own floating dtype, else
    torch's default dtype) and lives on ``device`` (default: where ``x`` is). ``name`` starts every message;
    ``width`` is the number of features each point must have. Values finite in ``x`` but not in ``dtype``
    (``1e300`` cast to float32) are refused; ``finite_square=True`` (the models' :meth:`validate`) also refuses
    values whose square overflows ``dtype`` (above about 1.8e19 in float32, 1.3e154 in float64), since no
    Gaussian likelihood of them is finite.

    A :class:`LazyRows` (splits streamed from a file larger than memory) passes the same checks without being read,
    from the bound its streaming pass recorded, and comes back as a :class:`LazyRows` of ``dtype`` on ``device``.
    """
    if isinstance(x, LazyRows):
        return _check_lazy(x, name, width, dtype, device, finite_square)  # type: ignore[return-value]
    columns = list(x.columns) if is_dataframe(x) else None
    t, floating = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D array (points x features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 rows, shape {tuple(t.shape)})")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name}: expected {width} features per point, got {t.shape[1]} (shape {tuple(t.shape)})")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: has no features (0 columns, shape {tuple(t.shape)})")
    target = dtype or (t.dtype if floating else torch.get_default_dtype())
    if not target.is_floating_point:
        raise ValueError(f"{name}: dtype must be a floating dtype, got {target}")

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        row, col, n_rows, _ = _first_bad(t)
        label = f" ({columns[col]!r})" if columns is not None else ""
        raise ValueError(nonfinite_message(name, float(t[row, col]), row, col, n_rows, t.shape[0], label))
    out = t.to(device=device, dtype=target) if device is not None else t.to(dtype=target)
    if out.dtype != t.dtype and not bool(torch.isfinite(out).all()):  # finite before the cast: it overflowed
        row, col, n_rows, _ = _first_bad(out)
        raise ValueError(
            f"{name}: {float(t[row, col])} at row {row}, column {col} (counting from 0) overflows {target} "
            f"({n_rows} rows affected); rescale the data or ask for a wider dtype"
        )
    if finite_square:
        over = out.abs() > math.sqrt(torch.finfo(out.dtype).max)  # (N, D)
        if bool(over.any()):
            rows = over.any(-1).nonzero().flatten()
            row = int(rows[0])
            col = int(over[row].nonzero()[0, 0])
            label = f" ({columns[col]!r})" if columns is not None else ""
            raise ValueError(
                f"{name}: {float(out[row, col]):g} at row {row}, column {col}{label} (counting from 0) is too large "
                f"for {out.dtype}: its square overflows, so the model's likelihood would not be finite ({len(rows)} "
                f"of {out.shape[0]} rows hold such values); standardize or rescale the data"
            )
    return out


__all__ = ["LazyRows", "check_matrix", "is_dataframe", "nonfinite_message", "one_line", "row_blocks"]

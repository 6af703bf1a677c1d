"""Save and load a fitted model and guide, rebuilt from the configs stored beside their parameters.

    pyro_lvm.save("fa.pt", model, guide, data=ds)
    fitted = pyro_lvm.load("fa.pt")           # a Fitted(model, guide, meta) on the CPU
    pyro_lvm.evaluate(fitted.model, fitted.guide, x_new)

A file holds the model's registered name and config, the guide's spec and config, both state dicts, the
library and torch versions, and whatever the caller adds (``data``: a :class:`~pyro_lvm.data.Dataset`'s
provenance; ``meta``: anything JSON-like). It is written atomically (a temporary file renamed into place),
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pyro import poutine

from pyro_lvm.config import from_dict, to_dict
from pyro_lvm.models.base import LatentModel
from pyro_lvm.registry import MODELS
from pyro_lvm.report import atomic_write
from pyro_lvm.runtime import local_params, resolve_device

FORMAT = "pyro_lvm.fitted/1"


def library_version() -> str:
    try:
        return metadata.version("pyro-lvm")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class Fitted(NamedTuple):
    """What :func:`load` returns: the rebuilt model and guide, and the file's metadata."""

    model: LatentModel
    guide: Any
    meta: dict[str, Any]


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` written atomically (:func:`pyro_lvm.report.atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with every tensor detached on the CPU (extra state, e.g. a dict, kept as it is)."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def save(path: str | Path, model: LatentModel, guide: Any, *, data: Any = None,
         meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` and ``guide`` (built by :func:`~pyro_lvm.guides.build_guide`) with their configs.

    ``data`` is a :class:`~pyro_lvm.data.Dataset` (its provenance is stored, so the standardization of
    the training split can be applied to new points) or ``None``; ``meta`` is stored as given.
    """
    if not isinstance(model, LatentModel) or not getattr(type(model), "name", ""):
        raise ValueError("model: expected a registered LatentModel (built by build_model or a model class)")
    if not hasattr(guide, "spec"):
        raise ValueError("guide: expected a guide built by pyro_lvm.build_guide (it records its spec and config)")
    provenance = data.provenance() if hasattr(data, "provenance") else data
    payload = {
        "format": FORMAT,
        "model": {"name": type(model).name, "config": to_dict(model.config),
                  "state": _cpu(model.state_dict())},
        "guide": {"spec": guide.spec, "config": to_dict(guide.guide_config),
                  "state": _cpu(guide.state_dict())},
        "versions": {"pyro_lvm": library_version(), "torch": torch.__version__},
        "data": provenance,
        "meta": meta or {},
    }
    return atomic_torch_save(payload, path)


def materialize(model: LatentModel, guide: Any) -> None:
    """Create a guide's lazily built parameters (Pyro autoguides make them on first call), so a state dict
    can be loaded into a freshly built guide. Runs the guide once on a dummy point; draws nothing that
    matters and leaves the caller's RNG as it was."""
    x = torch.zeros(1, model.data_dim, dtype=model.dtype, device=model.device)
    if hasattr(model, "data_loc"):
        x = model.data_loc.unsqueeze(0).clone()
    state = torch.get_rng_state()
    try:
        with local_params(model, guide), torch.no_grad():
            poutine.trace(guide).get_trace(x)
    finally:
        torch.set_rng_state(state)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` of a checkpoint on the CPU; an unreadable file is one ``ValueError`` line naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, ...: one line
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {' '.join(str(e).split())}); "
                         "delete it or point at the --output of a finished run") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a pyro_lvm checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def checkpoint_states(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, guide state) of a training checkpoint: Lightning's ``state_dict`` with ``model.``/``guide.``
    prefixes, or the older ``model``/``guide`` entries."""
    if isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
        return ({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                {k.removeprefix("guide."): v for k, v in state.items() if k.startswith("guide.")})
    return dict(ckpt.get("model") or {}), dict(ckpt.get("guide") or {})


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def state_differences(saved: dict[str, Any], current: dict[str, Any], what: str, limit: int = 3) -> list[str]:
    """Parameters that differ in name or shape between a saved state dict and the current one (at most ``limit``,
    then a count), e.g. ``model parameter decoder.net.0.weight: saved shape (8, 2), this run (16, 2)``."""
    s, c = _shapes(saved), _shapes(current)
    out = []
    for k in sorted(s.keys() | c.keys()):
        if k not in c:
            out.append(f"{what} parameter {k}: saved, but not in this run's {what}")
        elif k not in s:
            out.append(f"{what} parameter {k}: in this run's {what}, but not saved")
        elif s[k] != c[k]:
            out.append(f"{what} parameter {k}: saved shape {s[k]}, this run {c[k]}")
    return out[:limit] + ([f"and {len(out) - limit} more of the {what}'s parameters"] if len(out) > limit else [])


def config_differences(saved: dict[str, Any], current: dict[str, Any], what: str) -> list[str]:
    """Fields of two :func:`~pyro_lvm.config.to_dict` configs that differ, e.g. ``model.hidden: saved [8], this
    run [16]``."""
    return [f"{what}.{k}: saved {saved.get(k)!r}, this run {current.get(k)!r}"
            for k in [*saved, *(k for k in current if k not in saved)] if saved.get(k) != current.get(k)]


def fit_differences(fitted: Fitted, model: LatentModel, guide: Any) -> list[str]:
    """What differs between a loaded fit and the ``model`` and ``guide`` built now (empty: they match): the
    model's name and every config field; the guide's spec, and its config where its parameters differ (a field
    the guide does not use, e.g. flow sizes for a guide without flows, is no difference), else the parameters."""
    out = []
    if fitted.meta["model_name"] != type(model).name:
        return [f"model: saved {fitted.meta['model_name']!r}, this run {type(model).name!r}"]
    out += config_differences(to_dict(fitted.model.config), to_dict(model.config), "model")
    if fitted.meta["guide_spec"] != getattr(guide, "spec", None):
        return [*out, f"guide: saved {fitted.meta['guide_spec']!r}, this run {getattr(guide, 'spec', None)!r}"]
    materialize(model, guide)
    structure = state_differences(fitted.guide.state_dict(), guide.state_dict(), "guide")
    if structure:  # a guide-config field that changes no parameter (unused by this guide) is no difference
        saved_cfg, this_cfg = (to_dict(getattr(g, "guide_config", None)) or {} for g in (fitted.guide, guide))
        # with no guide-config field to blame, the model's differences explain the guide's shapes
        out += config_differences(saved_cfg, this_cfg, "guide") or ([] if out else structure)
    return out


def load(path: str | Path, *, device: str | torch.device | None = "cpu") -> Fitted:
    """Rebuild the model and guide saved by :func:`save` on ``device`` (``None``: cpu); any device can load a
    file written on any other. Raises ``FileNotFoundError`` or ``ValueError`` with what is wrong."""
    from pyro_lvm.guides import build_guide
    from pyro_lvm.guides.config import GuideConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved fit at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        raise ValueError(f"{path}: not a readable pyro_lvm file ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pyro_lvm fitted-model file (expected format {FORMAT!r})")
    cls = MODELS[ckpt["model"]["name"]]
    with torch.random.fork_rng(devices=[]):  # the throw-away initial values must not use up the caller's RNG
        model = cls(from_dict(cls.Config, ckpt["model"]["config"]))
        guide = build_guide(ckpt["guide"]["spec"], model, from_dict(GuideConfig, ckpt["guide"]["config"]))
    target = resolve_device(device) or torch.device("cpu")
    dtype = next((v.dtype for v in ckpt["model"]["state"].values()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype)
        guide.to(dtype)
    model.load_state_dict(ckpt["model"]["state"])
    materialize(model, guide)
    try:
        guide.load_state_dict(ckpt["guide"]["state"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the stored guide does not fit the rebuilt one ({str(e).splitlines()[0]})") from None
    model.to(target)
    guide.to(target)
    meta = {k: ckpt.get(k) for k in ("versions", "data", "meta")}
    meta.update(model_name=ckpt["model"]["name"], guide_spec=ckpt["guide"]["spec"])
    return Fitted(model, guide, meta)

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

import io
import pickle
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pyro import poutine
from torch.torch_version import TorchVersion

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

    def __repr__(self) -> str:
        """A few summary lines, not the networks: model and guide with their configs, the data, the versions."""
        meta = self.meta if isinstance(self.meta, dict) else {}
        name = meta.get("model_name") or getattr(self.model, "name", "") or type(self.model).__name__
        spec = meta.get("guide_spec") or getattr(self.guide, "spec", "") or type(self.guide).__name__
        lines = [f"Fitted(model={name}, guide={spec})"]
        for what, cfg in (("model", getattr(self.model, "config", None)),
                          ("guide", getattr(self.guide, "guide_config", None))):
            if cfg is not None:
                lines.append(f"  {what}: {' '.join(repr(cfg).split())}"[:160])
        data, versions = meta.get("data"), meta.get("versions")
        facts = []
        if isinstance(data, dict) and data.get("source"):
            facts.append(f"data {data['source']!r}")
        if isinstance(versions, dict) and versions.get("pyro_lvm"):
            facts.append(f"saved by pyro_lvm {versions['pyro_lvm']}")
        if facts:
            lines.append("  " + ", ".join(facts) + " (.meta)")
        return "\n".join(lines)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` written atomically (:func:`pyro_lvm.report.atomic_write`).

    Serialized into memory first, then written: torch's zip writer finalizes itself in its destructor when a stop
    (Ctrl-C, SIGTERM) lands after its last record but before its ``__exit__`` finalizes it, and by then the file it
    was given has been closed, so the process aborts ("terminate called ... write to closed file"); a buffer is
    never closed under it. The write to disk is then one plain write, whose errors (a full disk) are ``OSError``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with buffer.getbuffer() as data:
        return atomic_write(path, lambda f: f.write(data), binary=True)


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with every tensor detached on the CPU (extra state, e.g. a dict, kept as it is)."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def save(path: str | Path, model: LatentModel, guide: Any, *, data: Any = None,
         meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` and ``guide`` (built by :func:`~pyro_lvm.guides.build_guide`) with their configs.

    ``data`` is a :class:`~pyro_lvm.data.Dataset` (its provenance is stored, so the standardization of
    the training split can be applied to new points) or ``None``; ``meta`` is stored as given.
    """
    from pyro_lvm.wrap import model_for

    model = model_for(model, guide) if callable(model) and not isinstance(model, LatentModel) else model
    if not isinstance(model, LatentModel) or not getattr(type(model), "name", ""):
        raise ValueError("model: expected a registered LatentModel (built by build_model or a model class)")
    if not hasattr(guide, "spec"):
        raise ValueError("guide: expected a guide built by pyro_lvm.build_guide (it records its spec and config)")
    target = getattr(getattr(model, "config", None), "target", None)
    if isinstance(target, str) and target:
        from pyro_lvm.wrap import importable

        if not importable(target):
            raise ValueError(f"model: its function {target!r} is a lambda or defined inside another function, so "
                             "load could not import it; define it with def at the top level of a module (or "
                             "script) and wrap that")
    provenance = data.provenance() if hasattr(data, "provenance") else data
    payload = {
        "format": FORMAT,
        "model": {"name": type(model).name, "config": to_dict(model.config),
                  "state": _cpu(model.state_dict())},
        "guide": {"spec": guide.spec, "config": to_dict(guide.guide_config),
                  "state": _cpu(guide.state_dict())},
        "versions": {"pyro_lvm": library_version(), "torch": str(torch.__version__)},  # a str: TorchVersion is code
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


def read_checkpoint(path: str | Path, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint (``fitted.pt`` or Lightning's ``.ckpt``) as data, never code.

    ``torch.load(weights_only=True)``: only tensors and plain containers and scalars are unpickled, so a file
    crafted to run code on load (an object whose ``__reduce__`` calls ``os.system``) is refused, naming the
    file, before anything in it runs. Any unreadable file (truncated, not a torch file, not a dict) is one
    ``ValueError`` line naming it."""
    try:  # TorchVersion (a str subclass, no code) is allowed so files written before 0.1.1 still load
        with torch.serialization.safe_globals([TorchVersion]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        globals_ = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if globals_:  # weights_only refused to import a name: the file wants to build objects, i.e. run code
            raise ValueError(f"{path}: refused, the file holds objects that would run code when loaded "
                             f"({globals_[0][:160]}); pyro_lvm files hold tensors and plain data only: load "
                             "files only from a source you trust, or refit") from None
        raise ValueError(f"{path}: not a readable pyro_lvm file (not a torch checkpoint); delete it or point at "
                         "the --output of a finished run") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, ...: one line
        raise ValueError(f"{path}: not a readable pyro_lvm file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); delete it or point at the --output of a finished "
                         "run") from None
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


def _entry(path: Path, ckpt: dict[str, Any], *keys: str, kind: type | tuple[type, ...] = dict) -> Any:
    """``ckpt[k0][k1]...`` checked for type; a missing or mistyped entry is one ``ValueError`` naming it."""
    value: Any = ckpt
    for i, k in enumerate(keys):
        if not isinstance(value, dict) or k not in value:
            raise ValueError(f"{path}: a damaged pyro_lvm file, it has no entry {'.'.join(keys[:i + 1])!r}; "
                             "save the fit again")
        value = value[k]
    if not isinstance(value, kind):
        raise ValueError(f"{path}: a damaged pyro_lvm file, entry {'.'.join(keys)!r} is a {type(value).__name__}; "
                         "save the fit again")
    return value


def _rebuild(path: Path, ckpt: dict[str, Any]) -> tuple[LatentModel, Any, dict[str, Any], dict[str, Any]]:
    """The model and guide of a fitted-model file, rebuilt from their registered names and stored configs, and
    their stored state dicts (each entry checked, so a damaged file is one line naming what is missing)."""
    from pyro_lvm.guides import build_guide
    from pyro_lvm.guides.config import GuideConfig

    name = _entry(path, ckpt, "model", "name", kind=str)
    if name not in MODELS:
        raise ValueError(f"{path}: model {name!r} is not registered in this process (known: "
                         f"{', '.join(MODELS)}); import the module that defines and registers it, then load")
    cls = MODELS[name]
    spec = _entry(path, ckpt, "guide", "spec", kind=str)
    model_cfg, guide_cfg = _entry(path, ckpt, "model", "config"), _entry(path, ckpt, "guide", "config")
    model_state, guide_state = _entry(path, ckpt, "model", "state"), _entry(path, ckpt, "guide", "state")
    try:
        with torch.random.fork_rng(devices=[]):  # the throw-away initial values must not use up the caller's RNG
            model = cls(from_dict(cls.Config, model_cfg))
            guide = build_guide(spec, model, from_dict(GuideConfig, guide_cfg))
    except ValueError as e:
        if str(e).startswith("model: cannot import"):  # a user's model function: say what to import
            raise ValueError(f"{path}: {e}") from None
        raise ValueError(f"{path}: its stored configuration does not rebuild a model and guide "
                         f"({' '.join(str(e).split())[:200]}); save the fit again") from None
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}: its stored configuration does not rebuild a model and guide "
                         f"({' '.join(str(e).split())[:200]}); save the fit again") from None
    return model, guide, model_state, guide_state


def load(path: str | Path, *, device: str | torch.device | None = "cpu") -> Fitted:
    """Rebuild the model and guide saved by :func:`save` on ``device`` (``None``: cpu); any device can load a
    file written on any other. Raises ``FileNotFoundError`` or ``ValueError`` with what is wrong."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved fit at {path}")
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pyro_lvm fitted-model file (expected format {FORMAT!r})")
    model, guide, model_state, guide_state = _rebuild(path, ckpt)
    target = resolve_device(device) or torch.device("cpu")
    dtype = next((v.dtype for v in model_state.values()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype)
        guide.to(dtype)
    try:
        model.load_state_dict(model_state)
        materialize(model, guide)
        guide.load_state_dict(guide_state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the stored parameters do not fit the rebuilt model and guide "
                         f"({str(e).splitlines()[0]})") from None
    model.to(target)
    guide.to(target)
    meta = {k: ckpt.get(k) for k in ("versions", "data", "meta")}
    meta.update(model_name=ckpt["model"]["name"], guide_spec=ckpt["guide"]["spec"])
    return Fitted(model, guide, meta)

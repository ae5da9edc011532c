"""Save and load models and policies as a directory: weights as safetensors, everything else as JSON.

    model.save_pretrained("my_model")                 # config.json + model.safetensors
    model = pyebm.MLPEnergy.from_pretrained("my_model")
    obj = pyebm.pretrained.from_pretrained("my_model")  # whatever the directory holds
    model.save_pretrained("my_model", descent=cfg, candidates=64)   # an energy with how to minimise it
    cfg, K = pyebm.pretrained.inference_config("my_model")          # (pyebm serve runs minimize with them)

``config.json`` holds the format and its version, the architecture (the class and its constructor
arguments), the weights' dtype and, for policies, the inference configuration (the ``pyebm.Descent``,
candidates, horizon, bounds, normalisation statistics, ...), nested: an ``EnergyPolicy`` holds its energy's
entry under ``"energy"``, a ``PolicyAdapter`` its policy's under ``"policy"``. A bare energy (``MLPEnergy``,
``EBT``, ``EBTPolicy``) saved with ``descent=`` and/or ``candidates=`` also holds an ``"inference"`` entry
``{"descent": {...}, "candidates": K}``: how ``pyebm.minimize`` is to be run on it (``inference_config``
reads it; ``pyebm serve`` serves such a directory). An ``EBT`` whose ``think`` / ``generate`` defaults
(``model.inference``, a ``pyebm.models.EBTInference``) differ from the built-in ones, or saved with
``inference=``, holds them under ``"inference"`` -> ``"ebt"`` (``{"version": 1, "steps": ..., "samples":
..., ...}``, alone or next to ``"descent"`` and ``"candidates"``); ``from_pretrained`` sets them on the
loaded model, and a directory without them (an older one) loads with the defaults. The entry has its own
``"version"`` (a later one is refused with a clear error); ``format_version`` stays 1, so that an older pyebm
still loads the model itself. ``model.safetensors`` holds the state dict of the one module that has weights
(the energy), written with ``safetensors``.

Tensors that share storage (tied weights) are written once; ``config.json`` lists the names that alias
another (``"tied"``), and loading ties them again (the same Parameter under both names). Tensors that
overlap only partly are written as separate copies and load as independent tensors. Every tensor keeps
its dtype. A module with parametrizations is refused (remove them first: its state dict holds the
parametrization's inputs, which the constructor does not rebuild).

Loading refuses, with a ``ValueError`` or ``FileNotFoundError`` that says what is wrong: a missing
directory or file, a format version this pyebm does not read, an unknown architecture, a class other than
the one asked for, constructor arguments the class refuses, missing or unexpected tensors and tensors of
another shape than the architecture has.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from pyebm import _dtypes

FORMAT = "pyebm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# architecture name -> (module, class); resolved when needed, so that this module imports none of them
_ARCHITECTURES: Dict[str, Tuple[str, str]] = {
    "MLPEnergy": ("pyebm.energy", "MLPEnergy"),
    "EBT": ("pyebm.models.ebt", "EBT"),
    "EBTPolicy": ("pyebm.models.ebt_policy", "EBTPolicy"),
    "EnergyPolicy": ("pyebm.policies", "EnergyPolicy"),
    "PolicyAdapter": ("pyebm.adapter", "PolicyAdapter"),
}


def _safetensors():
    """The ``safetensors.torch`` module (the optional dependency ``pip install 'pyebm[save]'``)."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("save_pretrained / from_pretrained write and read weights with the safetensors package: "
                          "pip install safetensors (or pip install 'pyebm[save]')") from None
    return safetensors.torch


def _architecture(name: str) -> type:
    mod, cls = _ARCHITECTURES[name]
    return getattr(importlib.import_module(mod), cls)


def _name_of(obj) -> str:
    for name in _ARCHITECTURES:
        if type(obj) is _architecture(name):
            return name
    raise TypeError(f"save_pretrained: {type(obj).__name__} is not one of pyebm's architectures "
                    f"({', '.join(_ARCHITECTURES)}); a subclass or another energy cannot be rebuilt from its "
                    "constructor arguments")


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for pyebm's models and policies (see ``pyebm.pretrained``).

    A class provides ``_pretrained_args()`` (its constructor arguments as JSON values); a class that holds
    other saved objects names them in ``_PRETRAINED_PARTS`` and rebuilds itself in
    ``_from_pretrained_args(args, parts)``. An ``nn.Module`` is rebuilt as ``cls(**args, dtype=...)``.
    """

    _PRETRAINED_PARTS: Tuple[str, ...] = ()

    def _pretrained_args(self) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_pretrained_args(cls, args: Dict[str, Any], parts: Dict[str, Any]):
        return cls(**parts, **args)

    def save_pretrained(self, directory: "str | os.PathLike", *, descent=None,
                        candidates: Optional[int] = None, inference=None) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed; files of
        an earlier save are replaced). ``descent`` (a ``pyebm.Descent``) and ``candidates`` (K): for a bare
        energy, the inference configuration saved with it; ``inference`` (an ``EBTInference``): an EBT's
        think / generate defaults (see ``save_pretrained``)."""
        save_pretrained(self, directory, descent=descent, candidates=candidates, inference=inference)

    @classmethod
    def from_pretrained(cls, directory: "str | os.PathLike", *, device=None):
        """The object ``save_pretrained`` wrote to ``directory``, its weights on ``device`` (default: CPU).
        The directory must hold this class (``pyebm.pretrained.from_pretrained`` loads any)."""
        return from_pretrained(directory, device=device, expect=cls)


# -- saving -------------------------------------------------------------------------------------------

def _dtype_name(module: nn.Module) -> str:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return _dtypes.name(t.dtype)
    return _dtypes.name(torch.get_default_dtype())


def _spec(obj) -> Dict[str, Any]:
    name = _name_of(obj)
    spec: Dict[str, Any] = {"architecture": name, "config": obj._pretrained_args()}
    if isinstance(obj, nn.Module):
        spec["dtype"] = _dtype_name(obj)
    for part in type(obj)._PRETRAINED_PARTS:
        spec[part] = _spec(getattr(obj, part))
    return spec


def _weights_module(obj) -> nn.Module:
    while not isinstance(obj, nn.Module):
        parts = type(obj)._PRETRAINED_PARTS
        if len(parts) != 1:
            raise TypeError(f"{type(obj).__name__}: expected exactly one part holding the weights; got {parts}")
        obj = getattr(obj, parts[0])
    return obj


def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.device


def _view_key(t: torch.Tensor):
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def _tensors_to_write(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(name -> contiguous tensor, alias -> kept name). Tensors that are the same view of the same storage
    are tied (written once under the first name in sorted order); tensors that overlap otherwise are
    written as separate copies."""
    groups: Dict[tuple, list] = {}
    for name, t in state.items():
        if t.numel() > 0:
            groups.setdefault(_storage_key(t), []).append(name)
    out: Dict[str, torch.Tensor] = {}
    tied: Dict[str, str] = {}
    shared_storage = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        by_view: Dict[tuple, list] = {}
        for n in sorted(names):
            by_view.setdefault(_view_key(state[n]), []).append(n)
        for same in by_view.values():
            for alias in same[1:]:
                tied[alias] = same[0]
        if len(by_view) > 1:  # partly overlapping views: each written on its own
            shared_storage.update(same[0] for same in by_view.values())
    for name, t in state.items():
        if name in tied:
            continue
        t = t.detach()
        out[name] = t.clone(memory_format=torch.contiguous_format) if name in shared_storage else t.contiguous()
    return out, tied


def _write_atomic(path: str, write) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _ebt_entry(obj, inference) -> Optional[Dict[str, Any]]:
    """The ``"ebt"`` part of the ``"inference"`` entry: an EBT's think / generate defaults (``inference``, else
    ``obj.inference`` unless it is the default), or None."""
    from pyebm.models.ebt_inference import EBTInference

    if _name_of(obj) != "EBT":
        if inference is not None:
            raise ValueError(f"save_pretrained: inference= (think / generate defaults) is for an EBT; got a "
                             f"{type(obj).__name__}")
        return None
    if inference is None:
        inference = getattr(obj, "inference", None)
        if inference is None or inference == EBTInference():
            return None
    if not isinstance(inference, EBTInference):
        raise TypeError(f"save_pretrained: inference must be a pyebm.models.EBTInference or None; got "
                        f"{type(inference).__name__}")
    V = obj.config.vocab_size
    if inference.eos_token_id is not None and inference.eos_token_id >= V:
        raise ValueError(f"save_pretrained: inference.eos_token_id={inference.eos_token_id} is not a token id of "
                         f"this model (vocab_size={V})")
    return inference.to_dict()


def _read_ebt_entry(config: Dict[str, Any], where: str):
    """The ``EBTInference`` of a configuration's ``"inference"`` -> ``"ebt"`` entry, or None without one."""
    entry = config.get("inference")
    if not isinstance(entry, dict) or "ebt" not in entry:
        return None
    from pyebm.models.ebt_inference import EBTInference

    try:
        return EBTInference.from_dict(entry["ebt"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"from_pretrained: {where} (\"inference\" -> \"ebt\") is not valid: {e}") from e


def _inference_entry(obj, descent, candidates) -> Optional[Dict[str, Any]]:
    """The ``"inference"`` entry of a bare energy saved with ``descent`` / ``candidates`` (None without)."""
    if descent is None and candidates is None:
        return None
    from pyebm.config import Descent

    if type(obj)._PRETRAINED_PARTS:
        raise ValueError(f"save_pretrained: a {type(obj).__name__} saves its own Descent and candidates; descent= "
                         "and candidates= are for a bare energy (MLPEnergy, EBT, EBTPolicy)")
    if descent is None:
        descent = Descent()
    if not isinstance(descent, Descent):
        raise TypeError(f"save_pretrained: descent must be a pyebm.Descent or None; got {type(descent).__name__}")
    if candidates is None:
        candidates = 1
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"save_pretrained: candidates must be an int >= 1 or None; got {candidates!r}")
    return {"descent": descent.to_dict(), "candidates": int(candidates)}


def save_pretrained(obj, directory: "str | os.PathLike", *, descent=None, candidates: Optional[int] = None,
                    inference=None) -> None:
    """Write ``obj`` (an MLPEnergy, EBT, EBTPolicy, EnergyPolicy or PolicyAdapter) to ``directory``.

    ``descent`` (a ``pyebm.Descent``, default ``Descent()``) and ``candidates`` (K, default 1), given for a
    bare energy, are saved with it as its inference configuration (``inference_config`` reads them back;
    ``pyebm serve`` runs ``pyebm.minimize`` with them). A policy or adapter refuses them: it holds its own.
    ``inference`` (a ``pyebm.models.EBTInference``; default: ``obj.inference`` when it is not the default),
    for an EBT only: the defaults of its ``think`` / ``generate``, set again by ``from_pretrained``."""
    from pyebm import __version__

    st = _safetensors()
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_pretrained: directory must be a path; got {type(directory).__name__}")
    spec = _spec(obj)
    entry = _inference_entry(obj, descent, candidates)
    ebt = _ebt_entry(obj, inference)
    if ebt is not None:
        entry = dict(entry or {}, ebt=ebt)
    if entry is not None:
        spec["inference"] = entry
    module = _weights_module(obj)
    from torch.nn.utils import parametrize

    for name, m in module.named_modules():
        if parametrize.is_parametrized(m):
            raise ValueError(f"save_pretrained: the module {name or type(module).__name__} has parametrizations; "
                             "remove them first (torch.nn.utils.parametrize.remove_parametrizations), so that "
                             "the weights are plain tensors")
    tensors, tied = _tensors_to_write(module.state_dict())
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "pyebm_version": __version__, **spec,
              "tied": tied}
    text = json.dumps(config, indent=2, allow_nan=False)  # fails here, before any file is written
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _write_atomic(os.path.join(directory, WEIGHTS_NAME),
                  lambda p: st.save_file(tensors, p, metadata={"format": "pt"}))

    def write_config(p):
        with open(p, "w") as f:
            f.write(text + "\n")

    _write_atomic(os.path.join(directory, CONFIG_NAME), write_config)


# -- loading ------------------------------------------------------------------------------------------

def _read_config(directory: str) -> Dict[str, Any]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"from_pretrained: {directory!r} is not a directory")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: {directory!r} has no {CONFIG_NAME} (not written by "
                                "save_pretrained)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"from_pretrained: {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"from_pretrained: {path} is not a pyebm configuration (no \"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"from_pretrained: {path} has format_version {version!r}; this pyebm reads "
                         f"format_version {FORMAT_VERSION}")
    return config


def _dtype(name, where: str) -> torch.dtype:
    dtype = _dtypes.named(name)
    if dtype is None:
        raise ValueError(f"from_pretrained: {where} has an unknown dtype {name!r}")
    return dtype


def _build(spec, where: str):
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise ValueError(f"from_pretrained: {where} must be an object with \"architecture\" and \"config\"")
    name = spec.get("architecture")
    if name not in _ARCHITECTURES:
        raise ValueError(f"from_pretrained: {where} has an unknown architecture {name!r}; known: "
                         f"{', '.join(_ARCHITECTURES)}")
    cls = _architecture(name)
    parts = {}
    for part in cls._PRETRAINED_PARTS:
        if part not in spec:
            raise ValueError(f"from_pretrained: {where} ({name}) has no \"{part}\" entry")
        parts[part] = _build(spec[part], f"{where}.{part}")
    try:
        if issubclass(cls, nn.Module):
            return cls(**spec["config"], dtype=_dtype(spec.get("dtype"), where))
        return cls._from_pretrained_args(dict(spec["config"]), parts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"from_pretrained: the saved {name} configuration ({where}) is not valid: {e}") from e


def _owner(module: nn.Module, name: str) -> Tuple[nn.Module, str, str]:
    """(the submodule holding ``name``, the leaf name, "_parameters" or "_buffers")."""
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    for store in ("_parameters", "_buffers"):
        if getattr(owner, store).get(leaf) is not None:
            return owner, leaf, store
    raise ValueError(f"from_pretrained: {name} is neither a parameter nor a buffer")


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, leaf, store = _owner(module, name)
    return getattr(owner, store)[leaf]


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, leaf, store = _owner(module, name)
    getattr(owner, store)[leaf] = value


def _load_weights(module: nn.Module, path: str, tied: Dict[str, str]) -> None:
    st = _safetensors()
    from safetensors import SafetensorError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: {path} is missing")
    try:
        tensors = st.load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"from_pretrained: {path} is not a readable safetensors file: {e}") from None
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError("from_pretrained: \"tied\" must map names to names")
    expected = module.state_dict()
    bad_ties = sorted(f"{a} -> {k}" for a, k in tied.items() if a not in expected or k not in tensors)
    if bad_ties:
        raise ValueError(f"from_pretrained: tied names that the architecture or the file lacks: {bad_ties}")
    names = set(tensors) | set(tied)
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        raise ValueError(f"from_pretrained: {path} does not match the architecture {type(module).__name__}.\n"
                         f"  missing tensors: {missing}\n  unexpected tensors: {unexpected}")
    wrong = [f"{n}: the architecture has {list(expected[n].shape)}, the file {list(tensors[n].shape)}"
             for n in sorted(tensors) if tuple(tensors[n].shape) != tuple(expected[n].shape)]
    if wrong:
        raise ValueError(f"from_pretrained: {path} holds tensors of other shapes than the architecture "
                         f"{type(module).__name__}:\n  " + "\n  ".join(wrong))
    with torch.no_grad():
        for name, t in tensors.items():  # keep each tensor's dtype (a module may mix them)
            if expected[name].dtype != t.dtype:
                current = _get_tensor(module, name)
                current.data = current.data.to(t.dtype)
        for alias, kept in tied.items():
            _set_tensor(module, alias, _get_tensor(module, kept))
        module.load_state_dict({**tensors, **{a: tensors[k] for a, k in tied.items()}}, strict=True)


def from_pretrained(directory: "str | os.PathLike", *, device=None, expect: Optional[type] = None):
    """The object ``save_pretrained`` wrote to ``directory`` (an MLPEnergy, EBT, EBTPolicy, EnergyPolicy or
    PolicyAdapter), its weights moved to ``device`` when given. ``expect``: the class it must be."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"from_pretrained: directory must be a path; got {type(directory).__name__}")
    directory = os.fspath(directory)
    config = _read_config(directory)
    name = config.get("architecture")
    if expect is not None and name in _ARCHITECTURES and _architecture(name) is not expect:
        raise ValueError(f"from_pretrained: {directory!r} holds the architecture {name}, not {expect.__name__}; "
                         f"load it with {name}.from_pretrained or pyebm.pretrained.from_pretrained")
    obj = _build(config, CONFIG_NAME)
    ebt = _read_ebt_entry(config, os.path.join(directory, CONFIG_NAME))
    if ebt is not None:
        if name != "EBT":
            raise ValueError(f"from_pretrained: {directory!r} holds think / generate defaults (\"inference\" -> "
                             f"\"ebt\") for a {name}; only an EBT has them")
        obj.inference = ebt
    module = _weights_module(obj)
    _load_weights(module, os.path.join(directory, WEIGHTS_NAME), config.get("tied", {}))
    if device is not None:
        module.to(device)
    return obj


def inference_config(directory: "str | os.PathLike"):
    """``(descent, candidates)``: the inference configuration a bare energy was saved with
    (``save_pretrained(dir, descent=..., candidates=...)``), or None when the directory holds none (a bare
    energy saved without it, or an EBT saved with its think / generate defaults only; a policy or adapter,
    whose configuration is part of the object). An EBT's think / generate defaults (``"ebt"``) are checked
    here too and set on the model by ``from_pretrained`` (``model.inference``)."""
    from pyebm.config import Descent

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"inference_config: directory must be a path; got {type(directory).__name__}")
    config = _read_config(os.fspath(directory))
    entry = config.get("inference")
    if entry is None:
        return None
    where = f"{os.path.join(os.fspath(directory), CONFIG_NAME)} (\"inference\")"
    if not isinstance(entry, dict) or set(entry) - {"descent", "candidates", "ebt"}:
        raise ValueError(f"from_pretrained: {where} must be an object with \"descent\" and \"candidates\" (and, "
                         "for an EBT, \"ebt\")")
    _read_ebt_entry(config, os.path.join(os.fspath(directory), CONFIG_NAME))
    if "descent" not in entry and "candidates" not in entry:  # an EBT's think / generate defaults only
        return None
    K = entry.get("candidates", 1)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"from_pretrained: {where} has candidates {K!r}; expected an int >= 1")
    try:
        descent = Descent.from_dict(entry.get("descent", {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"from_pretrained: {where} holds an invalid descent: {e}") from e
    return descent, K

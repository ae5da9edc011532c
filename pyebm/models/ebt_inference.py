"""The default options of ``EBT.think`` / ``EBT.generate`` kept with a model (``EBT.inference``) and saved
with it (``save_pretrained``; ``pyebm.pretrained`` reads them without importing the model)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Union

from pyebm.reference import ebt as ref


def _check_number(name: str, value, lo: float, lo_open: bool, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= lo if lo_open else value < lo):
        what = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ValueError(f"EBTInference: {name} must be a finite number {what}"
                         + (" or None" if allow_none else "") + f"; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EBTInference:
    """The default options of :meth:`EBT.think` and :meth:`EBT.generate`, kept with a model.

    ``model.inference`` holds one (default: ``EBTInference()``, the options' own defaults); an option a call
    does not give (None) is read from it. ``model.save_pretrained(dir, inference=EBTInference(...))`` (or a
    model whose ``inference`` differs from the default) saves it in ``config.json`` (``"inference"`` ->
    ``"ebt"``, with a ``"version"``), and ``from_pretrained`` sets it on the loaded model, so a directory
    carries how its model thinks and generates (``pyebm serve`` serves it with them).

    steps, alpha, noise, samples, select, accept_lower, init, grad_clamp   as for :meth:`EBT.think`
    (``init``: ``"normal"``, ``"zeros"`` or None; None for steps / alpha / noise / init / grad_clamp: the
    model's own setting, as in the call); temperature, top_p, eos_token_id   as for :meth:`EBT.generate`.
    """

    VERSION: ClassVar[int] = 1

    steps: Optional[int] = None
    alpha: Optional[float] = None
    noise: Optional[float] = None
    samples: int = 1
    select: str = "min"
    accept_lower: bool = False
    init: Optional[str] = None
    grad_clamp: Union[None, bool, float] = None
    temperature: float = 0.0
    top_p: float = 0.9
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        for name in ("steps", "samples"):
            v = getattr(self, name)
            if (v is not None or name == "samples") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"EBTInference: {name} must be an int >= 1" + (" or None" if name == "steps" else "")
                                 + f"; got {v!r}")
        set_("alpha", _check_number("alpha", self.alpha, 0.0, True))
        set_("noise", _check_number("noise", self.noise, 0.0, False))
        if self.select not in ref.SELECT_MODES:
            raise ValueError(f"EBTInference: select must be one of {ref.SELECT_MODES}; got {self.select!r}")
        if not isinstance(self.accept_lower, bool):
            raise ValueError(f"EBTInference: accept_lower must be True or False; got {self.accept_lower!r}")
        if self.init not in (None, "normal", "zeros"):
            raise ValueError(f"EBTInference: init must be 'normal', 'zeros' or None; got {self.init!r}")
        if self.grad_clamp is not None and self.grad_clamp is not False:
            set_("grad_clamp", _check_number("grad_clamp", self.grad_clamp, 0.0, True, allow_none=False))
        set_("temperature", _check_number("temperature", self.temperature, 0.0, False, allow_none=False))
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"EBTInference: top_p must be a number in (0, 1]; got {top_p!r}")
        set_("top_p", float(top_p))
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
            raise ValueError(f"EBTInference: eos_token_id must be a token id (an int >= 0) or None; got {eos!r}")

    _THINK = ("steps", "alpha", "noise", "samples", "select", "accept_lower", "init", "grad_clamp")

    def think_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :meth:`EBT.think` these options are."""
        return {k: getattr(self, k) for k in self._THINK}

    def generate_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :meth:`EBT.generate` these options are."""
        return {**self.think_kwargs(), "temperature": self.temperature, "top_p": self.top_p,
                "eos_token_id": self.eos_token_id}

    def to_dict(self) -> Dict[str, Any]:
        """JSON values, with the format's ``"version"``."""
        return {"version": self.VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EBTInference":
        """The options of ``to_dict`` (of this version or an earlier one: options it lacks take their
        defaults); a ValueError for a later version, an unknown option or an invalid value."""
        if not isinstance(d, Mapping):
            raise ValueError(f"EBTInference: expected an object of options; got {type(d).__name__}")
        version = d.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"EBTInference: version must be an int >= 1; got {version!r}")
        if version > cls.VERSION:
            raise ValueError(f"EBTInference: version {version} was written by a newer pyebm; this one reads "
                             f"versions up to {cls.VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"version"})
        if unknown:
            raise ValueError(f"EBTInference: unknown options {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k != "version"})

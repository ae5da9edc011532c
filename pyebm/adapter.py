"""A policy adapter with the control-loop interface of robot-learning libraries (LeRobot's ``select_action``).

    adapter = pyebm.adapter.PolicyAdapter(policy, observation_stats={"mean": m, "std": s},
                                          action_stats={"min": lo, "max": hi})
    adapter.reset()                                  # at the start of an episode
    action = adapter.select_action(observation)      # [B, action_dim], one control step

``select_action`` keeps a queue of actions. When the queue is empty it normalises the observation, runs one
``EnergyPolicy.act`` (a whole chunk), un-normalises the first ``n_action_steps`` actions of the executed
window and queues them; every call then returns the next one, [B, action_dim] for a batch of B
observations (each queue entry holds the actions of every batch element for that step, as LeRobot's queue
of [B, action_dim] tensors does). Observations passed while the queue still holds actions are not used,
as in LeRobot. ``reset()`` empties the queue and resets the policy (warm start).

Normalisation (each optional; statistics are float64 tensors converted to the data's dtype and device on
use; ``eps`` is added to the scale in both directions, so that the two maps are inverses):

    "mean"/"std":  x_n = (x - mean) / (std + eps)               x = x_n * (std + eps) + mean
    "min"/"max":   x_n = 2 (x - min) / (max - min + eps) - 1     x = (x_n + 1) / 2 * (max - min + eps) + min

Observation statistics broadcast against one observation (``obs.shape[1:]``); action statistics are a
number or [action_dim]. The energy policy works in normalised units: its bounds and its energy's training
data are normalised actions. ``save_pretrained`` / ``from_pretrained`` keep the statistics with the policy.
"""
from __future__ import annotations

import math
import numbers
from collections import deque
from typing import Deque, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from pyebm.policies import EnergyPolicy
from pyebm.pretrained import Pretrained

_MODES = {frozenset(("mean", "std")): "mean_std", frozenset(("min", "max")): "min_max"}


class Normalization:
    """Mean/std or min/max statistics and the maps to and from normalised units (see ``pyebm.adapter``)."""

    def __init__(self, stats: Mapping[str, object], eps: float, what: str):
        if not isinstance(stats, Mapping):
            raise TypeError(f"PolicyAdapter: {what} must be a mapping {{'mean', 'std'}} or {{'min', 'max'}}; got "
                            f"{type(stats).__name__}")
        mode = _MODES.get(frozenset(stats))
        if mode is None:
            raise ValueError(f"PolicyAdapter: {what} must have the keys 'mean' and 'std', or 'min' and 'max'; got "
                             f"{sorted(map(str, stats))}")
        first, second = ("mean", "std") if mode == "mean_std" else ("min", "max")
        tensors = []
        for key in (first, second):
            try:
                t = torch.as_tensor(stats[key], dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"PolicyAdapter: {what}[{key!r}] must be a number or a tensor of numbers; got "
                                f"{type(stats[key]).__name__}") from None
            t = t.detach().cpu().clone()
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"PolicyAdapter: {what}[{key!r}] must be finite everywhere")
            tensors.append(t)
        a, b = tensors
        if a.shape != b.shape:
            raise ValueError(f"PolicyAdapter: {what}[{first!r}] and {what}[{second!r}] must have the same shape; got "
                             f"{list(a.shape)} and {list(b.shape)}")
        if mode == "mean_std" and not bool((b >= 0).all()):
            raise ValueError(f"PolicyAdapter: {what}['std'] must be >= 0 everywhere")
        if mode == "min_max" and not bool((b >= a).all()):
            raise ValueError(f"PolicyAdapter: {what}['max'] must be >= {what}['min'] everywhere")
        self.mode, self.what, self.eps = mode, what, eps
        self.keys = (first, second)
        self.stats: Dict[str, Tensor] = {first: a, second: b}

    @property
    def shape(self):
        return self.stats[self.keys[0]].shape

    def _on(self, x: Tensor):
        a, b = (self.stats[k].to(device=x.device, dtype=x.dtype) for k in self.keys)
        try:
            torch.broadcast_shapes(a.shape, x.shape[1:])
        except RuntimeError:
            raise ValueError(f"PolicyAdapter: {self.what} of shape {list(a.shape)} do not broadcast against one "
                             f"element of the batch, shape {list(x.shape[1:])}") from None
        return a, b

    def normalize(self, x: Tensor) -> Tensor:
        a, b = self._on(x)
        if self.mode == "mean_std":
            return (x - a) / (b + self.eps)
        return (x - a) / (b - a + self.eps) * 2 - 1

    def unnormalize(self, x: Tensor) -> Tensor:
        a, b = self._on(x)
        if self.mode == "mean_std":
            return x * (b + self.eps) + a
        return (x + 1) / 2 * (b - a + self.eps) + a

    def to_dict(self) -> Dict[str, list]:
        return {k: self.stats[k].tolist() for k in self.keys}  # finite (checked): plain JSON numbers


class PolicyAdapter(Pretrained):
    """``select_action`` / ``reset`` over an ``EnergyPolicy``, with observation and action normalisation.

    Args:
        policy: the ``pyebm.policies.EnergyPolicy`` (working in normalised units).
        n_action_steps: actions queued per chunk, 1 .. ``policy.n_action_steps`` (default: all of the
            policy's executed window). With the policy's ``warm_start`` it must equal
            ``policy.n_action_steps`` (the warm start shifts the chunk by that many steps).
        observation_stats: {"mean", "std"} or {"min", "max"} for the observations, or None (none applied).
        action_stats: the same for the actions (a number or [action_dim] each), or None.
        eps: added to the scale (std, or max - min) in both directions; 1e-8 as LeRobot.
    """

    _PRETRAINED_PARTS = ("policy",)

    def __init__(self, policy: EnergyPolicy, n_action_steps: Optional[int] = None,
                 observation_stats: Optional[Mapping[str, object]] = None,
                 action_stats: Optional[Mapping[str, object]] = None, eps: float = 1e-8):
        if not isinstance(policy, EnergyPolicy):
            raise TypeError(f"PolicyAdapter: policy must be a pyebm.policies.EnergyPolicy; got "
                            f"{type(policy).__name__}")
        if n_action_steps is None:
            n_action_steps = policy.n_action_steps
        if isinstance(n_action_steps, bool) or not isinstance(n_action_steps, numbers.Integral) \
                or not 1 <= n_action_steps <= policy.n_action_steps:
            raise ValueError(f"PolicyAdapter: n_action_steps must be an int in 1..{policy.n_action_steps} (the "
                             f"policy's executed window; set the policy's n_action_steps, up to its horizon, for "
                             f"more); got {n_action_steps!r}")
        if policy.warm_start and n_action_steps != policy.n_action_steps:
            raise ValueError(f"PolicyAdapter: with the policy's warm_start, n_action_steps must equal the policy's "
                             f"n_action_steps = {policy.n_action_steps}; got {n_action_steps}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"PolicyAdapter: eps must be a finite number >= 0; got {eps!r}")
        self.policy = policy
        self.n_action_steps = int(n_action_steps)
        self.eps = float(eps)
        self.observation_norm = None if observation_stats is None else \
            Normalization(observation_stats, self.eps, "observation_stats")
        self.action_norm = None if action_stats is None else Normalization(action_stats, self.eps, "action_stats")
        if self.action_norm is not None and tuple(self.action_norm.shape) not in ((), (policy.action_dim,)):
            raise ValueError(f"PolicyAdapter: action_stats must be numbers or [action_dim={policy.action_dim}] "
                             f"tensors; got shape {list(self.action_norm.shape)}")
        self._queue: Deque[Tensor] = deque(maxlen=self.n_action_steps)

    # -- the control loop -------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the action queue and reset the policy: call at the start of every episode."""
        self._queue.clear()
        self.policy.reset()

    def normalize_observation(self, observation: Tensor) -> Tensor:
        return observation if self.observation_norm is None else self.observation_norm.normalize(observation)

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return action if self.action_norm is None else self.action_norm.unnormalize(action)

    def predict_action_chunk(self, observation: Tensor,
                             generator: Union[None, int, torch.Generator] = None) -> Tensor:
        """The next ``n_action_steps`` actions [B, n_action_steps, action_dim] in the data's units: one
        ``policy.act`` on the normalised observation (the queue is not touched)."""
        if not isinstance(observation, Tensor):
            raise TypeError(f"PolicyAdapter: observation must be a tensor [B, ...]; got {type(observation).__name__}")
        actions = self.policy.act(self.normalize_observation(observation), generator=generator)
        return self.unnormalize_action(actions[:, :self.n_action_steps])

    def select_action(self, observation: Tensor, generator: Union[None, int, torch.Generator] = None) -> Tensor:
        """The action [B, action_dim] to execute now for a batch of observations (see ``pyebm.adapter``):
        the next queued one, after one ``act`` for a new chunk when the queue is empty. ``generator``: the
        random draws of that ``act`` (a torch.Generator or an int seed)."""
        if not isinstance(observation, Tensor) or observation.dim() < 1:
            raise TypeError(f"PolicyAdapter.select_action: observation must be a batched tensor [B, ...]; got "
                            f"{type(observation).__name__ if not isinstance(observation, Tensor) else 'a 0-d tensor'}")
        if self._queue and self._queue[0].shape[0] != observation.shape[0]:
            raise ValueError(f"PolicyAdapter.select_action: a batch of {observation.shape[0]} observations, but the "
                             f"queued actions are for {self._queue[0].shape[0]}; call reset() first")
        if not self._queue:
            chunk = self.predict_action_chunk(observation, generator)
            self._queue.extend(chunk.transpose(0, 1))
        return self._queue.popleft()

    # -- save_pretrained / from_pretrained ----------------------------------------------------------
    def _pretrained_args(self) -> dict:
        return dict(n_action_steps=self.n_action_steps, eps=self.eps,
                    observation_stats=None if self.observation_norm is None else self.observation_norm.to_dict(),
                    action_stats=None if self.action_norm is None else self.action_norm.to_dict())

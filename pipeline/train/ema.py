"""The Polyak (exponential moving) average of a model's weights: the model that is evaluated,
checkpointed and shipped. Ray-free; the Ray Train worker loop and the benchmark suites share it.

At update t (1-based) every floating parameter moves towards the trained one,

    average <- average + (1 - d_t) * (current - average),    d_t = min(decay, (1 + t) / (10 + t)),

so the warm-up keeps a short run from being dominated by its random start; buffers (ActNorm's
`initialized` flag, fixed permutations) are copied as they are. decay = 0 turns averaging off:
the average is then the latest weights.
"""

from __future__ import annotations

import copy
from typing import Any, Generic, TypeVar

import torch
from torch import nn

__all__ = ["EMA", "ema_decay"]

M = TypeVar("M", bound=nn.Module)


def ema_decay(decay: float, updates: int) -> float:
    """The decay used at update number `updates` (1-based): min(decay, (1 + t) / (10 + t))."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA(Generic[M]):
    """An averaged copy of `model`, made where the model is now: create it after the model has
    been moved to its device, so the copy shares its device and dtype (updates never move data).

    Any module works (flowray's Flow, normflows' models in the benchmarks). `state_dict()` holds
    the averaged weights and the update count, so a resumed run continues the same warm-up.
    """

    def __init__(self, model: M, decay: float) -> None:
        self.model: M = copy.deepcopy(model).eval()  # deepcopy keeps each tensor's device/dtype
        self.decay = decay
        self.updates = 0
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: M) -> None:
        """One averaging step towards `model` (the module being trained, not a DDP wrapper)."""
        self.updates += 1
        decay = ema_decay(self.decay, self.updates)
        averages, currents = list(self.model.parameters()), list(model.parameters())
        if len(averages) != len(currents):
            raise ValueError(
                f"EMA.update: expected a model with {len(averages)} parameters, found {len(currents)}"
            )
        # One fused kernel per device and dtype instead of one per parameter (a launch each on a
        # GPU); the same arithmetic as lerp_ per tensor.
        torch._foreach_lerp_(averages, [c.detach() for c in currents], 1 - decay)
        for average, current in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Averaged weights (copied onto this copy's device and dtype) and the update count."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])

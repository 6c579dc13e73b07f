"""The Polyak (exponential moving) average of a model's weights: the model that is evaluated,
checkpointed and shipped. Ray-free; the Ray Train worker loop and the benchmark suites share it.

At update t (1-based) every floating parameter moves towards the trained one,

    average <- average + (1 - d_t) * (current - average),    d_t = min(decay, (1 + t) / (10 + t)),

so the warm-up keeps a short run from being dominated by its random start; buffers (ActNorm's
`initialized` flag, fixed permutations) are copied as they are. decay = 0 turns averaging off:
the average is then the latest weights.

The update count t lives on the average's device, so that a training step that was skipped on
the device (`applied` False) leaves the average and t as they were without the host reading
anything: t and d_t are computed in float64 there, the same IEEE operations as in Python.
"""

from __future__ import annotations

import copy
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

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
        for param in self.model.parameters():
            param.requires_grad_(False)
        device = next(self.model.parameters(), torch.empty(0)).device
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # t, on the device

    @property
    def updates(self) -> int:
        """Updates applied so far (a host read of the device's count)."""
        return int(self.count)

    @updates.setter
    def updates(self, value: int) -> None:
        self.count.fill_(value)

    @torch.no_grad()
    def update(self, model: M, applied: Tensor | None = None) -> None:
        """One averaging step towards `model` (the module being trained, not a DDP wrapper).

        With `applied` (a bool tensor on the device: the training step was applied), a False
        leaves the average and the count as they were: the weight is 0, and `model`'s
        parameters are then its previous, finite ones (`train_step` restored them), so
        average + 0 * (current - average) is the average. No host read either way. On the CPU
        the host reads the count and the verdict, which waits for nothing there, and the update
        is one fused lerp with the weight as a Python number.
        """
        averages, currents = list(self.model.parameters()), list(model.parameters())
        if len(averages) != len(currents):
            raise ValueError(
                f"EMA.update: expected a model with {len(averages)} parameters, found {len(currents)}"
            )
        verdict = self.count if applied is None else applied
        if verdict.device.type == "cpu":  # the host is the device: read it
            if applied is not None and not bool(applied):
                return
            self.count += 1
            decay = ema_decay(self.decay, int(self.count))
            torch._foreach_lerp_(averages, [c.detach() for c in currents], 1 - decay)
            self._copy_buffers(model)
            return
        step = torch.ones_like(self.count) if applied is None else applied.to(self.count.dtype)
        t = self.count + step  # the update number, were it applied
        weight = step * (1 - torch.clamp((1 + t) / (10 + t), max=self.decay))
        self.count.add_(step)
        # One kernel per tensor with a device weight: the same arithmetic as lerp_ with the
        # weight as a Python number (the float64 weight is rounded to the parameters' dtype, as
        # a Python number is).
        by_dtype: dict[torch.dtype, Tensor] = {}
        for average in averages:
            if average.dtype not in by_dtype:
                by_dtype[average.dtype] = weight.to(average.dtype)
        torch._foreach_lerp_(
            averages, [c.detach() for c in currents], [by_dtype[a.dtype] for a in averages]
        )
        self._copy_buffers(model)

    def _copy_buffers(self, model: M) -> None:
        for average, current in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Averaged weights (copied onto this copy's device and dtype) and the update count."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])

"""The Polyak (exponential moving) average of a model's weights: the model that is evaluated,
checkpointed and shipped. At update t (1-based) every floating parameter moves towards the
trained one,

    average <- average + (1 - d_t) * (current - average),    d_t = min(decay, (1 + t) / (10 + t)),

so the warm-up keeps a short run from being dominated by its random start; buffers are copied.
decay = 0 turns averaging off. The count t lives on the average's device (float64, the same IEEE
operations as in Python), so a step skipped on the device leaves it with no host read.
"""

from __future__ import annotations

import copy
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def ema_decay(decay: float, updates: int) -> float:
    return min(decay, (1 + updates) / (10 + updates))


class EMA(Generic[M]):
    """An averaged copy of any `model`, made where the model is now: create it after the model
    is on its device, so updates never move data. `state_dict()` holds the update count too, so
    a resumed run continues the same warm-up.
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
        return int(self.count)

    @torch.no_grad()
    def update(self, model: M, applied: Tensor | None = None) -> None:
        """One averaging step towards `model` (not a DDP wrapper). `applied` False (a bool tensor
        on the device: the step was skipped) makes the weight 0, which leaves the average and
        the count as they were with no host read. On the CPU the host reads them instead.
        """
        averages, currents = list(self.model.parameters()), list(model.parameters())
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
        # The float64 weight rounded to each parameter's dtype, as a Python number would be.
        by_dtype = {dtype: weight.to(dtype) for dtype in {a.dtype for a in averages}}
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
        self.model.load_state_dict(state["model"])
        self.count.fill_(int(state["updates"]))

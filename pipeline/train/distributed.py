"""What the training workers agree on through collectives, with every tensor on the worker's device.

NCCL only reduces CUDA tensors and gloo only CPU ones, so each collective builds its tensors on
the device the worker trains on. Without an initialised process group (one process, a unit test)
each function answers for this worker alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from flowmodel import Flow


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def slowest(seconds: float, device: torch.device) -> float:
    """The largest of the workers' `seconds`."""
    if not is_distributed():
        return seconds
    tensor = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_agree_on_device(flag: torch.Tensor, op: Any) -> torch.Tensor:
    """A bool tensor combined over all workers (op MIN: all true, MAX: any true), answered on
    the device, so the worker does not wait for its device."""
    if not is_distributed():
        return flag
    tensor = flag.reshape(1).to(torch.int32)  # NCCL reduces numbers, not bools
    dist.all_reduce(tensor, op=op)
    return tensor[0].bool()


def check_identical_start(flow: Flow, device: torch.device) -> list[float]:
    """All-gather each worker's checksum after initialisation (the float64 sum of every floating
    parameter and buffer); they must be equal, or the workers would train different models."""
    values = flow.state_dict().values()
    checksum = float(sum(v.detach().double().sum() for v in values if v.is_floating_point()))

    if not is_distributed():
        return [checksum]
    mine = torch.tensor([checksum], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    sums = [float(t.item()) for t in gathered]
    if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
        raise RuntimeError(
            f"workers start from different parameters: expected equal checksums, found {sums}"
        )
    return sums

"""What the training workers agree on through collectives, with every tensor on the worker's device.

NCCL (Ray Train's backend when workers have GPUs) only reduces CUDA tensors, and gloo only CPU
ones, so each collective here builds its tensors on `device`: the device the worker trains on.
Without an initialised process group (one process, a unit test) each function answers for this
worker alone. Ray-free: the Ray Train loop and the GPU bench (a world-size-1 NCCL group) share it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from flowmodel import Flow

__all__ = ["all_agree", "all_agree_on_device", "check_identical_start", "parameter_checksum"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_agree(flag: bool, op: Any, device: torch.device) -> bool:
    """Combine a boolean over all workers: op MIN = all true, MAX = any true."""
    if not _distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=op)
    return bool(tensor.item())


def all_agree_on_device(flag: torch.Tensor, op: Any) -> torch.Tensor:
    """`all_agree` for a bool tensor on the worker's device, answered there (no host read, so
    the worker does not wait for its device): op MIN = all true, MAX = any true."""
    if not _distributed():
        return flag
    tensor = flag.reshape(1).to(torch.int32)  # NCCL reduces numbers, not bools
    dist.all_reduce(tensor, op=op)
    return tensor[0].bool()


def parameter_checksum(flow: Flow) -> float:
    """Sum of every floating parameter and buffer, in float64, computed where they live."""
    total = sum(
        value.detach().double().sum()
        for value in flow.state_dict().values()
        if value.is_floating_point()
    )
    return float(total)


def check_identical_start(flow: Flow, device: torch.device) -> list[float]:
    """All-gather each worker's parameter checksum after initialisation; they must be equal.

    Raises:
        RuntimeError: the workers' checksums differ (they would train different models).
    """
    checksum = parameter_checksum(flow)
    if not _distributed():
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

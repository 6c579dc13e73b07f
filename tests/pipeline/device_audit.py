"""A stand-in accelerator for CPU tests: tensors that compute on the CPU but live, as far as torch
and our code can tell, on another device, and fail like CUDA does when they meet a CPU tensor.

    with AuditDevice():
        flow.to(AUDIT_DEVICE)              # parameters now report device `meta`, values intact
        flow.bits_per_dim(images)          # fine: Flow moves the CPU images to its device
        ema.update(flow)                   # DeviceMismatch if the average stayed on the CPU

`AuditTensor` is a wrapper subclass: it reports `AUDIT_DEVICE` as its device and holds a CPU
tensor that does the arithmetic, so values (and `.item()`) are real, and a result computed on
the audited device is bit-for-bit the CPU result. Under `AuditDevice` (a TorchDispatchMode) every
aten op is checked the way CUDA checks it: an op that mixes an audited tensor with a CPU tensor of
one or more dimensions raises `DeviceMismatch` (0-dim CPU tensors mix, as CUDA allows; copies
between devices are fine), factory calls with `device=AUDIT_DEVICE` make audited tensors, `.to()`
and `.cpu()` move between the two, and `.numpy()` of an audited tensor fails as it does on a GPU.

Every read of an audited tensor's values by the host (`.item()`, `bool()`, `float()`, a copy to
the CPU, an op that answers a Python value such as `torch.equal`) is counted in
`AuditDevice.host_reads`: on CUDA each of them waits for the device's queue to drain.

`torch.tensor(data, device=...)` is routed the same way (it builds below the dispatcher).
The reported device is `meta` because the autograd engine runs only CPU and meta work without a
device backend compiled in; nothing in flowray treats `meta` specially. `audit_collectives`
checks the device of every tensor handed to `torch.distributed.all_reduce` / `all_gather` (as
NCCL would) and then runs them on the CPU values with a real gloo process group.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = [
    "AUDIT_DEVICE",
    "AuditDevice",
    "AuditTensor",
    "CollectiveAudit",
    "DeviceMismatch",
    "audit_collectives",
    "cpu_values",
]

AUDIT_DEVICE = torch.device("meta")
_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}


class DeviceMismatch(RuntimeError):
    """A tensor on the worker's device met one on the CPU, as CUDA would refuse."""


class AuditTensor(torch.Tensor):
    """A CPU tensor (`inner`) that reports AUDIT_DEVICE."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> AuditTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=AUDIT_DEVICE,
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:  # type: ignore[override]
        return f"AuditTensor({self.inner!r})"

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], *_: Any) -> AuditTensor:
        return AuditTensor(inner["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or {})


def cpu_values(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU tensor behind an audited one (any other tensor as it is)."""
    return tensor.inner if isinstance(tensor, AuditTensor) else tensor


def _dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    wrappers: dict[int, AuditTensor] = {}  # id of a CPU value -> the audited tensor holding it
    stray: list[torch.Tensor] = []

    def unwrap(value: Any) -> Any:
        if isinstance(value, AuditTensor):
            wrappers[id(value.inner)] = value
            return value.inner
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            stray.append(value)
        return value

    inner_args, inner_kwargs = tree_map(unwrap, (args, kwargs))
    audited = bool(wrappers)
    host_read = False
    to_audit = kwargs.get("device") == AUDIT_DEVICE
    if to_audit:
        inner_kwargs = {**inner_kwargs, "device": torch.device("cpu")}
    if func in _CROSS_DEVICE:
        # Copies may cross devices; _to_copy stays on its source's device unless told otherwise.
        wrap = to_audit or (audited and "device" not in kwargs)
        if func is torch.ops.aten.copy_.default:  # copy_(destination, source)
            host_read = not isinstance(args[0], AuditTensor) and isinstance(args[1], AuditTensor)
        else:
            host_read = audited and not wrap
    elif audited and stray:
        found = ", ".join(f"{t.device} {list(t.shape)}" for t in stray)
        raise DeviceMismatch(f"{func}: expected every tensor on {AUDIT_DEVICE}, found {found}")
    else:
        wrap = audited or to_audit
    out = func(*inner_args, **inner_kwargs)
    if audited and isinstance(out, bool | int | float | complex):
        host_read = True  # _local_scalar_dense (item, bool, float), equal, is_nonzero...
    if host_read:
        for reads in _HOST_READS:
            reads.append(str(func))

    def rewrap(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in wrappers:  # an in-place op or out=: the very tensor it was given
            return wrappers[id(value)]
        return AuditTensor(value) if wrap else value

    return tree_map(rewrap, out)


_HOST_READS: list[list[str]] = []  # the host_reads lists of the active AuditDevices


class _AuditDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or {})


class _AuditLiterals(TorchFunctionMode):
    """torch.tensor(data, device=...) builds its tensor below the dispatcher's Python layer (a
    meta tensor would come out empty): build it on the CPU and move it, as CUDA does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        device = kwargs.get("device")
        literal = func in (torch.tensor, torch.as_tensor) and device is not None
        if literal and torch.device(device) == AUDIT_DEVICE:
            return func(*args, **{**kwargs, "device": "cpu"}).to(AUDIT_DEVICE)
        return func(*args, **kwargs)


def _forget(reads: list[str]) -> None:
    _HOST_READS[:] = [r for r in _HOST_READS if r is not reads]


@contextmanager
def _capturable_here() -> Iterator[None]:
    """torch's optimizers accept capturable=True on the audited device, as on CUDA."""
    import importlib

    modules = [importlib.import_module(f"torch.optim.{name}") for name in ("adam", "adamax")]
    real = [m._get_capturable_supported_devices for m in modules]

    def supported(supports_xla: bool = True) -> list[str]:
        return [*real[0](supports_xla), AUDIT_DEVICE.type]

    for module in modules:
        module._get_capturable_supported_devices = supported  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, function in zip(modules, real, strict=True):
            module._get_capturable_supported_devices = function  # type: ignore[attr-defined]


class AuditDevice:
    """While active, `AUDIT_DEVICE` is a working device that refuses to mix with the CPU.

    `host_reads` lists the aten op of every read of a device tensor's values by the host (a host
    sync on CUDA), in order; the test clears it or slices it to count a stretch of work.
    Optimizers may be made `capturable` on this device, as on CUDA (their step count then stays
    on the device beside the parameters).
    """

    def __init__(self) -> None:
        self.host_reads: list[str] = []

    def __enter__(self) -> AuditDevice:
        self._modes = ExitStack()
        _HOST_READS.append(self.host_reads)
        self._modes.callback(_forget, self.host_reads)
        self._modes.enter_context(_capturable_here())
        # load_state_dict warns that copying into a meta parameter does nothing; into an audited
        # one it copies (the copy_ reaches _dispatch), so the warning is wrong here.
        self._modes.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r"for .*: copying from a non-meta parameter")
        self._modes.enter_context(_AuditDispatch())
        self._modes.enter_context(_AuditLiterals())
        return self

    def __exit__(self, *exc: object) -> None:
        self._modes.close()


@dataclass
class CollectiveAudit:
    """Every collective call seen: (name, [device of each tensor])."""

    device: torch.device
    calls: list[tuple[str, list[torch.device]]] = field(default_factory=list)

    def check(self, name: str, tensors: list[torch.Tensor]) -> None:
        devices = [t.device for t in tensors]
        self.calls.append((name, devices))
        wrong = [d for d in devices if d != self.device]
        if wrong:
            raise DeviceMismatch(
                f"{name}: expected tensors on {self.device} (the worker's device), "
                f"found {', '.join(map(str, wrong))}"
            )


@contextmanager
def audit_collectives(device: torch.device) -> Iterator[CollectiveAudit]:
    """A world-size-1 gloo group in which all_reduce and all_gather first check that every tensor
    is on `device`, then run on its CPU values (gloo reduces CPU tensors only)."""
    audit = CollectiveAudit(device)
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        audit.check("all_reduce", [tensor])
        return real_reduce(cpu_values(tensor), *args, **kwargs)

    def all_gather(out: list[torch.Tensor], tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
        audit.check("all_gather", [*out, tensor])
        return real_gather([cpu_values(t) for t in out], cpu_values(tensor), *a, **k)

    patches: dict[str, Callable[..., Any]] = {"all_reduce": all_reduce, "all_gather": all_gather}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for name, function in patches.items():
            setattr(dist, name, function)
        yield audit
    finally:
        dist.all_reduce, dist.all_gather = real_reduce, real_gather
        dist.destroy_process_group()

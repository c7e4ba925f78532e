"""Every collective of the package goes through here, so one check sees them all.

An NCCL group serves CUDA tensors only: a CPU tensor handed to it raises at the first call of
a real run, a bug class a CPU test with gloo cannot see. Each wrapper below checks, before
issuing the collective, that its tensors are on a device type the group's backend serves
(`ProcessGroup._device_types`, or what a test declared with `declare_group_device`), and
raises `CollectiveDeviceError` naming the call site otherwise. `record_collectives()` lets a
test list every call (site, op, tensor device, group devices) of a run.

The signatures are those of `torch.distributed`, plus a keyword `site` naming the caller.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "CollectiveCall",
    "CollectiveDeviceError",
    "all_gather_into_tensor",
    "all_reduce",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "declare_group_device",
    "gather",
    "group_device_types",
    "record_collectives",
]


class CollectiveDeviceError(RuntimeError):
    """A collective was handed a tensor on a device its group's backend does not serve."""


@dataclass(frozen=True)
class CollectiveCall:
    site: str
    op: str
    tensor_device: str
    group_devices: tuple[str, ...]

    @property
    def mismatched(self) -> bool:
        return self.tensor_device not in self.group_devices


#: Device types declared for a group (tests; or a group whose backend string does not say).
_DECLARED: "weakref.WeakKeyDictionary[ProcessGroup, tuple[str, ...]]" = weakref.WeakKeyDictionary()
#: While recording: (calls, raise on mismatch).
_RECORDERS: list[tuple[list[CollectiveCall], bool]] = []

_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "xccl": ("xpu",), "mpi": ("cpu", "cuda"), "fake": ("cpu", "cuda")}


def declare_group_device(group: ProcessGroup | None, *device_types: str) -> None:
    """Declare the device types `group` serves, overriding what its backend says."""
    group = group if group is not None else dist.group.WORLD
    if not device_types or not all(isinstance(d, str) and d for d in device_types):
        raise ValueError(f"device_types must be non-empty device type names such as 'cuda', got {device_types!r}")
    _DECLARED[group] = tuple(device_types)


def group_device_types(group: ProcessGroup | None) -> tuple[str, ...]:
    """The device types `group` serves: declared, else from its backend ("cpu:gloo,cuda:nccl" serves both)."""
    group = group if group is not None else dist.group.WORLD
    if group in _DECLARED:
        return _DECLARED[group]
    backend = str(dist.get_backend(group))
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        return tuple(part.split(":")[0] for part in backend.split(","))
    return _BACKEND_DEVICES.get(backend, ("cpu", "cuda"))


def _check(site: str, op: str, group: ProcessGroup | None, tensors: Sequence[torch.Tensor]) -> None:
    served = group_device_types(group)
    for tensor in tensors:
        call = CollectiveCall(site, op, tensor.device.type, served)
        for calls, _ in _RECORDERS:
            calls.append(call)
        if call.mismatched and (not _RECORDERS or any(raise_ for _, raise_ in _RECORDERS)):
            raise CollectiveDeviceError(
                f"{site}: {op} of a {tensor.device} tensor {tuple(tensor.shape)} on a group that serves "
                f"{'/'.join(served)} (backend {dist.get_backend(group)!r}); create it on the group's device"
            )


@contextmanager
def record_collectives(*, raise_on_mismatch: bool = True) -> Iterator[list[CollectiveCall]]:
    """Collect every checked collective issued in this process inside the block."""
    calls: list[CollectiveCall] = []
    entry = (calls, raise_on_mismatch)
    _RECORDERS.append(entry)
    try:
        yield calls
    finally:
        _RECORDERS.remove(entry)


def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *, group=None,
                      async_op=False, site: str):
    _check(site, "all_to_all_single", group, (output, input))
    return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def all_reduce(tensor, op=dist.ReduceOp.SUM, *, group=None, async_op=False, site: str):
    _check(site, "all_reduce", group, (tensor,))
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def broadcast(tensor, src, *, group=None, async_op=False, site: str):
    _check(site, "broadcast", group, (tensor,))
    return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def gather(tensor, gather_list=None, dst=0, *, group=None, site: str):
    _check(site, "gather", group, (tensor, *(gather_list or ())))
    return dist.gather(tensor, gather_list, dst=dst, group=group)


def all_gather_into_tensor(output, input, *, group=None, async_op=False, site: str):
    _check(site, "all_gather_into_tensor", group, (output, input))
    return dist.all_gather_into_tensor(output, input, group=group, async_op=async_op)


def barrier(*, group=None, site: str):
    """A barrier carries no tensor of ours; recorded on the group's own device so that tests see it."""
    served = group_device_types(group)
    for calls, _ in _RECORDERS:
        calls.append(CollectiveCall(site, "barrier", served[0], served))
    return dist.barrier(group=group)

"""Moving exchanged predictions between an accelerator and the host, for transports that send
from host memory (zmq): one device -> pinned host copy per published tensor, and back on receipt.

A CUDA tensor is converted to its wire dtype on the device and copied into page-locked memory
with `non_blocking=True`; the host then waits for a CUDA event recorded after the copy on the
current stream. That wait lasts until everything queued on the stream before the event has run
(the step's forward work that produced the tensor as well as the copy: one host sync per
published tensor), but not for other streams' work, as `torch.cuda.synchronize()` would. A
received message is decoded once into page-locked memory in its wire dtype (`wire.decode`),
copied to the device asynchronously and converted there, ordered before the losses that use it
by the current stream. CPU tensors take the plain path (no pinned memory: it needs
CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dml_cluster.bus.encoding import Sent, from_wire


def to_host(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor` as a contiguous CPU tensor of `dtype` (pinned when it comes from a GPU)."""
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor.to("cpu", dtype).contiguous()
    on_device = tensor.to(dtype).contiguous()
    host = torch.empty(on_device.shape, dtype=dtype, pin_memory=True)
    host.copy_(on_device, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()  # the stream up to here (the forward and the copy), not the device
    return host


def to_device(tensor: Sent, device: torch.device) -> Sent:
    """A received CPU tensor on `device` as float32: for a GPU uploaded asynchronously from
    page-locked memory (a tensor decoded there, `wire.decode(pinned=True)`, is not copied again
    on the host) and converted from its wire dtype on the device. Sparse rows (decoded widened)
    are moved."""
    if not isinstance(tensor, Tensor):
        return tensor.to(device)
    if device.type != "cuda":
        return from_wire(tensor.to(device))
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return from_wire(tensor.to(device, non_blocking=True))

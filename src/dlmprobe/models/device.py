"""Device strings checked before any work starts (``--device cuda`` on a CPU-only torch is one line).

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import torch

from dlmprobe.errors import DlmprobeInputError

_EXAMPLES = "cpu, cuda, cuda:0 or mps"


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names, once it is known to exist on this machine."""
    try:
        device = torch.device(str(spec).strip())
    except (RuntimeError, ValueError, TypeError):
        raise DlmprobeInputError(f"device: expected {_EXAMPLES}, got {spec!r}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DlmprobeInputError(f"device: {spec!r} was requested but this torch has no usable CUDA device; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DlmprobeInputError(f"device: {spec!r} was requested but this machine has {count} CUDA device(s) "
                                     f"(cuda:0 to cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DlmprobeInputError(f"device: {spec!r} was requested but MPS is not available here; use cpu")
        return device
    raise DlmprobeInputError(f"device: expected {_EXAMPLES}, got {spec!r} (a {device.type} device dlmprobe does not support)")

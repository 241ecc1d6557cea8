"""Argument checks shared by the public losses.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong shape or value)
with a message that names the argument and the shapes or values involved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    """A tensor, optionally of exactly ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_floating(name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    """A tensor of dtype float16, bfloat16, float32 or float64."""
    tensor = check_tensor(name, value, ndim=ndim)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {tensor.dtype}"
        )
    return tensor


def check_labels(labels: object, leading_shape: torch.Size, name: str = "labels") -> torch.Tensor:
    """Integer labels whose shape equals the leading shape of the hidden states."""
    tensor = check_tensor(name, labels)
    if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if tensor.shape != leading_shape:
        raise ValueError(
            f"{name} shape {tuple(tensor.shape)} must equal the leading shape "
            f"{tuple(leading_shape)} of the hidden states"
        )
    return tensor


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every counted label lies in [0, vocab)."""
    counted = labels[labels != ignore_index]
    if counted.numel() == 0:
        return
    low, high = int(counted.min()), int(counted.max())
    if low < 0 or high >= vocab:
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index} when "
            f"hard_weight > 0; found values in [{low}, {high}]"
        )


def check_same_device(named: Iterable[tuple[str, torch.Tensor | None]]) -> torch.device:
    """All given tensors live on one device; returns it."""
    present = [(name, t) for name, t in named if t is not None]
    device = present[0][1].device
    for name, tensor in present[1:]:
        if tensor.device != device:
            raise ValueError(
                f"{name} is on {tensor.device} but {present[0][0]} is on {device}; "
                "all tensors must be on one device"
            )
    return device


def check_positive(name: str, value: float) -> float:
    """A finite number > 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """A finite number >= 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """One of the allowed strings."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA and ``"torch"`` elsewhere; check forced choices."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU, "
            "or use backend='torch'"
        )
    return backend

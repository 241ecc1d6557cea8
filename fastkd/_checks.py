"""Argument checks shared by the public losses.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong shape or value)
with a message that names the argument and the shapes or values involved.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable

import torch

from fastkd import csrc

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch", "cpp", "cuda")
# The backends of the C++ / CUDA C++ row ops (csrc/): the vocabulary losses have them, the
# attention loss does not.
NATIVE_BACKENDS = ("cpp", "cuda")
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    """A local tensor (not a sharded DTensor), optionally of exactly ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if _is_dtensor(value):
        raise TypeError(
            f"{name} is a DTensor (sharded, e.g. a parameter of an FSDP2 module outside its "
            "forward); fastkd's losses take local tensors: call the loss inside the module's "
            "forward, where FSDP has gathered the parameter (fastkd.distill does this from a "
            "forward hook on the lm_head)"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def _is_dtensor(value: torch.Tensor) -> bool:
    # A DTensor needs a process group (its device mesh initializes one), so single-process
    # calls never import torch.distributed.tensor.
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def check_floating(name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    """A tensor of dtype float16, bfloat16, float32 or float64."""
    tensor = check_tensor(name, value, ndim=ndim)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {tensor.dtype}"
        )
    return tensor


def check_labels(labels: object, leading_shape: torch.Size, name: str = "labels") -> torch.Tensor:
    """int64 or int32 labels whose shape equals the leading shape of the hidden states.

    Narrower dtypes are refused: they cannot hold every vocabulary id, and ignore_index
    wraps in them (a uint8 label 156 equals -100 mod 256).
    """
    tensor = check_tensor(name, labels)
    if tensor.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{name} must be an int64 or int32 tensor, got {tensor.dtype} (narrower integer "
            "dtypes cannot hold every token id and wrap ignore_index, e.g. uint8 156 == -100 "
            "mod 256; convert exactly with .long())"
        )
    if tensor.shape != leading_shape:
        raise ValueError(
            f"{name} shape {tuple(tensor.shape)} must equal the leading shape "
            f"{tuple(leading_shape)} of the hidden states"
        )
    return tensor


def check_vocab(name: str, shape: torch.Size, dim: int) -> int:
    """The vocab size ``shape[dim]`` of tensor ``name``; a softmax needs at least one entry."""
    vocab = shape[dim]
    if vocab == 0:
        raise ValueError(f"{name} {tuple(shape)} has an empty vocab dimension (size 0)")
    return vocab


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every counted label lies in [0, vocab).

    Under ``torch.compile`` the host read of the label range would break the graph (and fail
    ``fullgraph=True``), so the check is an asynchronous device assert there instead: it
    traces, and a bad label raises a RuntimeError with the same message (without the range
    found) when the graph runs. Eager calls raise the ValueError below.
    """
    if torch.compiler.is_compiling():
        in_range = ((labels >= 0) & (labels < vocab)) | (labels == ignore_index)
        torch._assert_async(
            in_range.all(),
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index} when "
            "hard_weight > 0",
        )
        return
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


def check_real(name: str, value: object) -> float:
    """A real number: a Python or NumPy scalar, not a bool and not a tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (pass a Python number: tensor.item())" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """A bool (True or False), not a number or a tensor."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")
    return value


def check_int(name: str, value: object) -> int:
    """An integer: a Python or NumPy integer, not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_positive(name: str, value: object) -> float:
    """A finite number > 0."""
    number = check_real(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_non_negative(name: str, value: object) -> float:
    """A finite number >= 0."""
    number = check_real(name, value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_loss_weights(soft_weight: object, hard_weight: object) -> tuple[float, float]:
    """soft_weight and hard_weight, each >= 0, not both 0 (the loss would be identically 0)."""
    soft = check_non_negative("soft_weight", soft_weight)
    hard = check_non_negative("hard_weight", hard_weight)
    if soft == 0 and hard == 0:
        raise ValueError("soft_weight and hard_weight are both 0: the loss would be 0 for any "
                         "input")
    return soft, hard


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """One of the allowed strings."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, *, native: bool = False) -> str:
    """Map ``"auto"`` to a backend for ``device``; check forced choices.

    ``"auto"``: "triton" on CUDA; on CPU "cpp" when ``native`` (the loss has C++ row ops) and
    the extension builds (fastkd.csrc.load warns once when it does not), else "torch".
    """
    check_choice("backend", backend, BACKENDS)
    if backend in NATIVE_BACKENDS and not native:
        raise ValueError(f"backend={backend!r} has no kernels for this loss; use 'triton', "
                         "'torch' or 'auto'")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpp" if native and device.type == "cpu" and csrc.available() else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU, "
            "or use backend='torch'"
        )
    if backend in NATIVE_BACKENDS:
        wanted = "cpu" if backend == "cpp" else "cuda"
        if device.type != wanted:
            raise ValueError(f"backend={backend!r} needs {wanted.upper()} tensors, got tensors "
                             f"on {device}; use backend='auto'")
        if not csrc.available():  # a constant under torch.compile
            raise ValueError(f"backend={backend!r}: the C++ row ops are unavailable (see the "
                             "warning above, or FASTKD_CSRC=0 is set); use backend='torch'")
        if backend == "cuda" and not csrc.with_cuda():
            raise ValueError("backend='cuda' needs a CUDA build of torch; this one is "
                             f"{torch.__version__}")
    return backend

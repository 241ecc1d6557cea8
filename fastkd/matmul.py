"""GEMMs with fp32 accumulation for the chunk driver.

Logits are never rounded to bf16/fp16 before the softmax math (docs/design.md section 4): on CUDA,
half-precision operands go to cuBLAS with an fp32 output (``out_dtype``); on CPU, where
``out_dtype`` is unavailable, to the C++ extension's ``addmm_fp32`` (MKL's half GEMMs with fp32
output, csrc/gemm_cpu.cpp), or, where it does not build, upcast. fp32 and fp64 operands are used
as given. Operands of different dtypes (autocast: bf16 hidden states against an fp32 lm_head)
are promoted to fp32 without a full-size copy of the larger one (``mixed_mm``).
"""

from __future__ import annotations

import functools

import torch

HALF = (torch.float16, torch.bfloat16)


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 tensors (gradcheck), fp32 for everything else."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) into ``out`` (M, N), accumulated in fp32 (fp64 for fp64)."""
    if a.dtype != b.dtype or (a.dtype != out.dtype and a.dtype not in HALF):
        return mixed_mm(a, b, out)
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:  # half operands, fp32 output straight from cuBLAS
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    if _cpu_half_gemm(a, out):
        torch.ops.fastkd.addmm_fp32(out, a, b, 0.0)
        return out
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)  # out_dtype is CUDA-only


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """acc (M, N) fp32/fp64 = beta acc + a (M, K) @ b (K, N), without an (M, N) temporary on
    CUDA. ``beta`` is 1 (accumulate) or 0 (overwrite: acc's old contents, even NaN, are never
    read, so acc may come from ``torch.empty``)."""
    if beta not in (0.0, 1.0):
        raise ValueError(f"addmm_: beta must be 0 or 1, got {beta}")
    if _cpu_half_gemm(a, acc):
        torch.ops.fastkd.addmm_fp32(acc, a, b, beta)
    elif not (a.dtype in HALF and a.is_cuda):
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)
    elif _fp32_accumulating_addmm(acc.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:  # bounded fp32 temporaries, SLAB_ROWS rows of acc at a time
        for start in range(0, acc.shape[0], SLAB_ROWS):
            rows = slice(start, start + SLAB_ROWS)
            product = torch.mm(a[rows], b, out_dtype=torch.float32)
            if beta:
                acc[rows] += product
            else:
                acc[rows] = product


SLAB_ROWS = 8192
# Elements of b promoted at a time by mixed_mm (16 MiB in fp32).
SLAB_ELEMENTS = 2**22


def mixed_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) into ``out`` (M, N) in fp32 (fp64 when ``out`` is fp64), for
    operands whose dtypes differ from each other or from ``out``.

    ``a`` is the chunk-sized operand (hidden rows, or d loss / d logits rows) and is promoted
    whole: an (M, K) copy. ``b`` (an lm_head weight or its transpose) is promoted in slabs of
    about ``SLAB_ELEMENTS`` along its longer side, so no full-size copy of it is ever made:
    slabs of columns when N >= K (each reads all of ``a``, which is small), else slabs of rows
    whose products accumulate into the fp32 result (each reads and writes that (M, N) result,
    which is small). A narrower ``out`` (a bf16 grad_hidden) receives the fp32 result rounded
    once, through an (M, N) fp32 temporary.
    """
    compute = torch.float64 if out.dtype == torch.float64 else torch.float32
    a = a.to(compute)
    result = out if out.dtype == compute else torch.empty(out.shape, dtype=compute,
                                                          device=out.device)
    rows, columns = b.shape
    if b.dtype == compute:
        torch.mm(a, b, out=result)
    elif columns >= rows:
        step = max(1, SLAB_ELEMENTS // max(rows, 1))
        for start in range(0, columns, step):
            cols = slice(start, start + step)
            torch.mm(a, b[:, cols].to(compute), out=result[:, cols])
    else:
        step = max(1, SLAB_ELEMENTS // max(columns, 1))
        for start in range(0, rows, step):
            ks = slice(start, start + step)
            result.addmm_(a[:, ks], b[ks].to(compute), beta=0.0 if start == 0 else 1.0)
    if result is not out:
        out.copy_(result)
    return out


def _cpu_half_gemm(a: torch.Tensor, out: torch.Tensor) -> bool:
    """Half operands on CPU into an fp32 output, and the C++ extension is there to take them."""
    if a.dtype not in HALF or a.device.type != "cpu" or out.dtype != torch.float32:
        return False
    from fastkd import csrc

    return csrc.available()


@functools.cache
def _fp32_accumulating_addmm(device: torch.device) -> bool:
    """Whether this torch accepts an fp32 ``input`` to addmm with half operands and
    ``out_dtype=float32`` (some releases require input to share the operands' dtype)."""
    acc = torch.zeros(16, 16, device=device)
    operand = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, operand, operand, out_dtype=torch.float32, out=acc)
    except RuntimeError:
        return False
    return True

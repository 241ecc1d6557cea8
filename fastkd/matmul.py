"""GEMMs with fp32 accumulation for the chunk driver.

Logits are never rounded to bf16/fp16 before the softmax math (DESIGN.md section 4): on CUDA,
half-precision operands go to cuBLAS with an fp32 output (``out_dtype``); elsewhere, where
``out_dtype`` is unavailable, the operands are upcast. fp32 and fp64 operands are used as given.
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 tensors (gradcheck), fp32 for everything else."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) into ``out`` (M, N), accumulated in fp32 (fp64 for fp64)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:  # half operands, fp32 output straight from cuBLAS
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)  # out_dtype is CUDA-only


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (M, N) fp32/fp64 += a (M, K) @ b (K, N), without an (M, N) temporary on CUDA."""
    if a.dtype in HALF and a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))

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


def mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) in ``out_dtype``, accumulated in fp32 (or fp64)."""
    if a.dtype not in HALF:
        return (a @ b).to(out_dtype)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32).to(out_dtype)
    return (a.float() @ b.float()).to(out_dtype)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (M, N) fp32/fp64 += a (M, K) @ b (K, N), without an (M, N) temporary on CUDA."""
    if a.dtype in HALF and a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))

"""fastkd.matmul: the chunk driver's GEMMs with fp32 (fp64) accumulation."""

import pytest
import torch

from fastkd.matmul import accumulation_dtype, addmm_
from tests.helpers import rel_err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_addmm_overwrites_with_beta_zero_and_accumulates_with_one(dtype):
    """beta = 0 never reads the accumulator (the chunk driver hands it torch.empty memory), so
    NaN there cannot leak; beta = 1 adds to it."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 37, generator=gen).to(dtype)
    b = torch.randn(37, 45, generator=gen).to(dtype)
    acc = torch.full((300, 45), float("nan"), dtype=accumulation_dtype(a))
    product = a.double() @ b.double()
    addmm_(acc, a, b, beta=0.0)
    # Each entry sums K = 37 exact products (half products are exact in fp32): at most about
    # K epsilons of the accumulation dtype off.
    bound = 37 * torch.finfo(acc.dtype).eps
    assert rel_err(acc, product) < bound
    addmm_(acc, a, b, beta=1.0)
    assert rel_err(acc, 2 * product) < bound


def test_addmm_refuses_other_betas():
    acc = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="beta must be 0 or 1"):
        addmm_(acc, torch.ones(4, 4), torch.ones(4, 4), beta=0.5)

"""Input builders and error measures shared by the tests."""

from __future__ import annotations

import torch

# The C++ row ops' backend for the test device: "cuda" on a GPU machine, "cpp" on CPU.
NATIVE_BACKEND = "cuda" if torch.cuda.is_available() else "cpp"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf, so it never passes."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def linear_inputs(
    leading: tuple[int, ...],
    hidden: int,
    vocab: int,
    logit_std: float,
    dtype: torch.dtype,
    device: str,
    generator: torch.Generator,
    bias: bool = False,
):
    """Hidden states (*leading, hidden), weight (V, hidden), bias (V,) whose logits have std
    about ``logit_std``: h ~ N(0, 1), W ~ N(0, std^2 / hidden)."""
    h = torch.randn(*leading, hidden, generator=generator)
    w = torch.randn(vocab, hidden, generator=generator) * (logit_std / hidden**0.5)
    b = torch.randn(vocab, generator=generator) * logit_std / 4 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h), cast(w), cast(b)


def random_labels(leading, vocab, generator, device, ignore_fraction=0.25, ignore_index=-100):
    """Token ids in [0, vocab) with about ``ignore_fraction`` set to ``ignore_index``."""
    labels = torch.randint(0, vocab, leading, generator=generator)
    ignored = torch.rand(leading, generator=generator) < ignore_fraction
    return torch.where(ignored, torch.full_like(labels, ignore_index), labels).to(device)


def tolerance(dtype: torch.dtype) -> float:
    """docs/design.md section 5: fp32 under 1e-4, bf16 / fp16 under 1e-2."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2

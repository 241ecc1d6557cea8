"""Bad input to attention_kd_loss raises ValueError / TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

from fastkd.attention import attention_kd_loss


def shapes(b=2, h=4, length=5, d_s=8, d_t=16, kv_s=2, kv_t=1):
    return [
        (b, h, length, d_s),
        (b, kv_s, length, d_s),
        (b, h, length, d_t),
        (b, kv_t, length, d_t),
    ]


def call(shape_list=None, **kwargs):
    tensors = [torch.randn(*s) for s in (shape_list or shapes())]
    return attention_kd_loss(*tensors, **{"backend": "torch", **kwargs})


@pytest.mark.parametrize(
    "shape_list, match",
    [
        ([(2, 4, 5, 8), (2, 2, 5, 8), (2, 3, 5, 16), (2, 1, 5, 16)], "teacher_q shape"),
        (shapes(kv_s=3), "student_k has 3 key heads, which must divide the 4"),
        (shapes(kv_t=3), "teacher_k has 3 key heads"),
        ([(2, 4, 5, 8), (1, 2, 5, 8), (2, 4, 5, 16), (2, 1, 5, 16)], "batch and length"),
        ([(2, 4, 5, 8), (2, 2, 5, 8), (3, 4, 5, 16), (3, 1, 5, 16)], "teacher_q shape"),
        ([(2, 4, 5, 8), (2, 2, 6, 8), (2, 4, 5, 16), (2, 1, 5, 16)], "student_k shape"),
        ([(2, 4, 5, 8), (2, 2, 5, 8), (2, 4, 7, 16), (2, 1, 7, 16)], "teacher_q shape"),
        ([(2, 4, 5, 8), (2, 2, 5, 4), (2, 4, 5, 16), (2, 1, 5, 16)], "student_q head dim 8"),
        ([(2, 4, 5, 8), (2, 2, 5, 8), (2, 4, 5, 16), (2, 1, 5, 32)], "teacher_q head dim 16"),
        ([(2, 4, 5), (2, 2, 5, 8), (2, 4, 5, 16), (2, 1, 5, 16)], "student_q must have 4"),
        ([(2, 4, 0, 8), (2, 2, 0, 8), (2, 4, 0, 16), (2, 1, 0, 16)], "must not be empty"),
    ],
    ids=["query_heads", "kv_s", "kv_t", "batch_k", "batch_t", "length_k", "length_t",
         "head_dim_s", "head_dim_t", "ndim", "empty"],
)  # fmt: skip
def test_shape_errors(shape_list, match):
    with pytest.raises(ValueError, match=match):
        call(shape_list)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 6), r"attention_mask shape \(2, 6\) must be \(B, L\) = \(2, 5\)"),
        (torch.ones(5), "attention_mask must have 2 dimensions"),
        (torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]), r"attention_mask rows \[1\]"),
        (torch.tensor([[1, 2, 1, 1, 1], [1, 1, 1, 1, 1]]), "only 0 .padding. and 1"),
    ],
    ids=["wrong_length", "one_dim", "row_without_keys", "not_binary"],
)
def test_mask_errors(mask, match):
    with pytest.raises(ValueError, match=match):
        call(attention_mask=mask)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss": "cosine"}, "loss must be one of"),
        ({"reduction": "max"}, "reduction must be one of"),
        ({"backend": "gpu"}, "backend must be one of"),
        ({"backend": "cuda"}, "backend='cuda' has no kernels for this loss"),  # vocab losses only
        ({"student_scale": 0.0}, "student_scale must be a finite number > 0"),
        ({"teacher_scale": float("nan")}, "teacher_scale must be a finite number > 0"),
    ],
)
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        call(**kwargs)


def test_type_errors():
    q_s, k_s, q_t, k_t = [torch.randn(*s) for s in shapes()]
    with pytest.raises(TypeError, match="student_k must be a floating tensor"):
        attention_kd_loss(q_s, k_s.long(), q_t, k_t)
    with pytest.raises(TypeError, match="teacher_q must be a torch.Tensor"):
        attention_kd_loss(q_s, k_s, q_t.numpy(), k_t)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention_kd_loss(q_s, k_s, q_t, k_t, causal=1)
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        attention_kd_loss(q_s, k_s, q_t, k_t, attention_mask=[[1] * 5] * 2)


def test_triton_head_dim_limit():
    # With the kernels available (CUDA, or the interpreter set up by conftest) backend="triton"
    # resolves, and head dims above what the kernels tile are refused.
    with pytest.raises(ValueError, match="head dims up to 256"):
        call(shapes(d_t=320), backend="triton")

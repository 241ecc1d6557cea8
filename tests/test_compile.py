"""torch.compile(fullgraph=True) traces every public loss, forward and backward, and matches eager.

The row ops and attention ops are custom ops with fake kernels (fastkd/ops.py), so Dynamo sees
them as opaque calls and the graph never breaks. Most cases compile with the "aot_eager" backend
(Dynamo + AOTAutograd with functionalization of the mutated gradient buffers, the part that
traces our code); one case runs Inductor end to end. Triton runs under the interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastkd import attention_kd_loss, fused_kd_loss, kd_loss, multi_teacher_kd_loss

BACKENDS = ("torch", "triton")
# The vocabulary losses also have the C++ row ops: "auto" picks them on CPU where they build
# (csrc.load()), else the torch ones.
ROW_BACKENDS = (*BACKENDS, "auto")


def _compare(fn, inputs, students, compiler="aot_eager", rtol=1e-5):
    """fn(*inputs) compiled with fullgraph=True equals eager in the loss and student grads."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    outputs = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=counter)):
        for t in students:
            t.grad = None
        out = run(*inputs)
        loss = out[0] if isinstance(out, tuple) else out
        (loss.sum() if loss.dim() else loss).backward()
        outputs.append((out, [t.grad.clone() for t in students]))
    assert counter.frame_count == 1  # one graph, traced once
    (eager, eager_grads), (compiled, compiled_grads) = outputs
    eager = eager if isinstance(eager, tuple) else (eager,)
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6)
    torch._dynamo.reset()


def _linear_inputs(seed, tokens=37, vocab=53, hs=8, ht=12):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hs, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hs, generator=g) * 3).requires_grad_()
    teacher_hidden = torch.randn(tokens, ht, generator=g)
    teacher_weight = torch.randn(vocab, ht, generator=g) * 4
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = -100
    return hidden, weight, teacher_hidden, teacher_weight, labels


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_kd_loss_compiles(backend, reduction):
    hidden, weight, t_hidden, t_weight, labels = _linear_inputs(1)

    def fn(hidden, weight, t_hidden, t_weight, labels):
        return fused_kd_loss(hidden, weight, t_hidden, t_weight, labels, divergence="jsd",
                             beta=0.3, temperature=1.7, hard_weight=0.4, reduction=reduction,
                             backend=backend, chunk_size=16)

    _compare(fn, (hidden, weight, t_hidden, t_weight, labels), (hidden, weight))


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kd_loss_compiles(backend, reduction):
    g = torch.Generator().manual_seed(2)
    student = (torch.randn(3, 7, 41, generator=g) * 10).requires_grad_()
    teacher = torch.randn(3, 7, 41, generator=g) * 10
    labels = torch.randint(0, 41, (3, 7), generator=g)
    labels[0, :3] = -1

    def fn(student, teacher, labels):
        return kd_loss(student, teacher, labels, divergence="reverse_kl", hard_weight=0.5,
                       ignore_index=-1, reduction=reduction, backend=backend)

    _compare(fn, (student, teacher, labels), (student,))


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_multi_teacher_kd_loss_compiles(backend):
    hidden, weight, t_hidden, t_weight, labels = _linear_inputs(3, tokens=29)
    g = torch.Generator().manual_seed(4)
    t_hidden2 = torch.randn(29, 6, generator=g)
    t_weight2 = torch.randn(53, 6, generator=g) * 20

    def fn(hidden, weight, t_hidden, t_weight, t_hidden2, t_weight2, labels):
        return multi_teacher_kd_loss(hidden, weight, [t_hidden, t_hidden2], [t_weight, t_weight2],
                                     labels, teacher_priors=[1.0, 3.0], temperature=2.0,
                                     hard_weight=0.2, backend=backend, return_mixing=True,
                                     chunk_size=16)

    _compare(fn, (hidden, weight, t_hidden, t_weight, t_hidden2, t_weight2, labels),
             (hidden, weight))


@pytest.mark.parametrize("backend", ("torch", "auto"))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_parts_compiles(backend, reduction):
    """The parts are a second, non-differentiable output of the loss's Function: it traces."""
    hidden, weight, t_hidden, t_weight, labels = _linear_inputs(5)

    def fn(hidden, weight, t_hidden, t_weight, labels):
        return fused_kd_loss(hidden, weight, t_hidden, t_weight, labels, divergence="kl",
                             temperature=2.0, soft_weight=0.5, hard_weight=0.0,
                             reduction=reduction, backend=backend, chunk_size=16,
                             return_parts=True)

    _compare(fn, (hidden, weight, t_hidden, t_weight, labels), (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_attention_kd_loss_compiles(backend, loss):
    g = torch.Generator().manual_seed(5)
    q_s = (torch.randn(2, 4, 11, 8, generator=g) * 3).requires_grad_()
    k_s = (torch.randn(2, 2, 11, 8, generator=g) * 3).requires_grad_()
    q_t = torch.randn(2, 4, 11, 16, generator=g) * 3
    k_t = torch.randn(2, 1, 11, 16, generator=g) * 3

    def fn(q_s, k_s, q_t, k_t):
        return attention_kd_loss(q_s, k_s, q_t, k_t, loss=loss, backend=backend)

    _compare(fn, (q_s, k_s, q_t, k_t), (q_s, k_s))


def test_kd_loss_compiles_with_inductor():
    g = torch.Generator().manual_seed(6)
    student = (torch.randn(19, 31, generator=g) * 5).requires_grad_()
    teacher = torch.randn(19, 31, generator=g) * 5
    labels = torch.randint(0, 31, (19,), generator=g)

    def fn(student, teacher, labels):
        return kd_loss(student, teacher, labels, hard_weight=0.3, backend="torch")

    _compare(fn, (student, teacher, labels), (student,), compiler="inductor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_kd_loss_with_mask_compiles(backend):
    g = torch.Generator().manual_seed(7)
    q_s = (torch.randn(2, 2, 9, 8, generator=g) * 3).requires_grad_()
    k_s = (torch.randn(2, 2, 9, 8, generator=g) * 3).requires_grad_()
    q_t = torch.randn(2, 2, 9, 8, generator=g) * 3
    k_t = torch.randn(2, 2, 9, 8, generator=g) * 3
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, :2] = 0

    def fn(q_s, k_s, q_t, k_t, mask):
        return attention_kd_loss(q_s, k_s, q_t, k_t, attention_mask=mask, causal=False,
                                 backend=backend)

    _compare(fn, (q_s, k_s, q_t, k_t, mask), (q_s, k_s))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fused_kd_loss_half_weights_compiles(backend):
    """bf16 lm_heads: fp32 logit GEMMs (csrc's addmm_fp32 on CPU where it builds) and the half
    gradient buffer of several chunks."""
    hidden, weight, t_hidden, t_weight, labels = _linear_inputs(8, tokens=40)
    hidden = hidden.detach().bfloat16().requires_grad_()
    weight = weight.detach().bfloat16().requires_grad_()

    def fn(hidden, weight, t_hidden, t_weight, labels):
        return fused_kd_loss(hidden, weight, t_hidden, t_weight, labels, hard_weight=0.3,
                             backend=backend, chunk_size=16)

    _compare(fn, (hidden, weight, t_hidden.bfloat16(), t_weight.bfloat16(), labels),
             (hidden, weight))


def test_varying_token_counts_compile():
    """A new token count recompiles (the chunk loops specialize on it), never breaks the graph:
    the second count turns the shapes dynamic (automatic dynamic), where the plan's arguments
    are symbolic and are made concrete first."""
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda h, w, th, tw, y: fused_kd_loss(h, w, th, tw, y, hard_weight=0.2, backend="torch"),
        fullgraph=True, backend="aot_eager")
    for tokens in (17, 30, 45):
        hidden, weight, t_hidden, t_weight, labels = _linear_inputs(9 + tokens, tokens=tokens)
        expected = fused_kd_loss(hidden, weight, t_hidden, t_weight, labels, hard_weight=0.2,
                                 backend="torch")
        torch.testing.assert_close(compiled(hidden, weight, t_hidden, t_weight, labels), expected)
    torch._dynamo.reset()

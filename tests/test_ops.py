"""torch.library.opcheck on every fastkd custom op: schema, fake kernel, AOT dispatch.

Small shapes with a realistic logit spread (std 3 to 30); with and without labels and a
gradient buffer. The in-place gradient (grad_out is student_logits) is checked against a
separate buffer, eager and compiled.
"""

from __future__ import annotations

import pytest
import torch

from fastkd import csrc, ops
from fastkd.options import KDOptions, MultiTeacherOptions

ROW_BACKENDS = ("torch", "triton", "cpp")


@pytest.fixture(scope="module", autouse=True)
def native_ops_loaded():
    assert csrc.load(), "the C++ extension did not build (see the warning)"


def _logits(seed: int, *shape: int, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * std


def _labels(seed: int, rows: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed))
    labels[1] = -100
    return labels


# the logit transforms' arguments (fastkd/logit_transforms.py): softcaps and scales
KD_TRANSFORMS = dict(student_softcap=30.0, student_scale=0.5, teacher_softcap=20.0,
                     teacher_scale=0.125)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("transformed", [False, True])
def test_kd_rows_opcheck(backend, with_labels, with_grad, transformed):
    rows, vocab = 5, 37
    student, teacher = _logits(0, rows, vocab, std=3), _logits(1, rows, vocab, std=30)
    labels = _labels(2, rows, vocab) if with_labels else None
    grad = torch.empty(rows, vocab) if with_grad else None
    options = KDOptions(divergence="jsd", beta=0.3, temperature=2.0,
                            hard_weight=0.5 if with_labels else 0.0,
                            **(KD_TRANSFORMS if transformed else {}))
    torch.library.opcheck(ops.row_op(backend, "kd_rows"),
                          (student, teacher, labels, grad, *ops.kd_arguments(options)))


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("transformed", [False, True])
def test_multi_teacher_rows_opcheck(backend, with_labels, with_grad, transformed):
    rows, vocab, teachers = 4, 29, 3
    student, teacher = _logits(3, rows, vocab, std=5), _logits(4, teachers, rows, vocab, std=20)
    labels = _labels(5, rows, vocab) if with_labels else None
    grad = torch.empty(rows, vocab) if with_grad else None
    transforms = dict(student_softcap=10.0, teacher_softcaps=(30.0, 0.0, 5.0),
                      teacher_scales=(1.0, 0.125, 0.5))
    options = MultiTeacherOptions(priors=(0.5, 0.25, 0.25), temperature=1.5,
                                      hard_weight=0.3 if with_labels else 0.0,
                                      **(transforms if transformed else {}))
    torch.library.opcheck(
        ops.row_op(backend, "multi_teacher_rows"),
        (student, teacher, labels, grad, torch.empty(rows, teachers),
         *ops.multi_teacher_arguments(options)),
    )


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("transformed", [False, True])
def test_kd_rows_gradient_in_place(backend, transformed):
    """grad_out may be student_logits: the same loss and gradient as a separate buffer (with a
    transform, f'(z) is read before z is overwritten)."""
    rows, vocab = 6, 41
    student, teacher = _logits(6, rows, vocab, std=10), _logits(7, rows, vocab, std=10)
    labels = _labels(8, rows, vocab)
    arguments = ops.kd_arguments(KDOptions(divergence="reverse_kl", hard_weight=0.2,
                                           **(KD_TRANSFORMS if transformed else {})))
    op = ops.row_op(backend, "kd_rows")
    grad = torch.empty_like(student)
    loss = op(student, teacher, labels, grad, *arguments)

    def in_place(student, teacher, labels):
        student = student.clone()
        return op(student, teacher, labels, student, *arguments), student

    for run in (in_place, torch.compile(in_place, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        loss_in_place, grad_in_place = run(student, teacher, labels)
        torch.testing.assert_close(loss_in_place, loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_in_place, grad, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def _attention_operands(backend, seed=9, with_mask=False):
    batch, heads, length = 2, 4, 7
    q_s = _logits(seed, batch, heads, length, 8, std=3)
    k_s = _logits(seed + 1, batch, 2, length, 8, std=3)  # grouped-query keys
    q_t = _logits(seed + 2, batch, heads, length, 4, std=3)
    k_t = _logits(seed + 3, batch, 1, length, 4, std=3)
    real = None
    if with_mask:
        real = torch.ones(batch, length, dtype=torch.bool)
        real[0, 5:] = False
        real = real.to(torch.int8) if backend == "triton" else real
    return q_s, k_s, q_t, k_t, real


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_opcheck(backend, loss, with_mask):
    operands = _attention_operands(backend, with_mask=with_mask)
    options = (loss, True, 0.35, 0.5)
    forward, backward = ops.attention_ops(backend)
    torch.library.opcheck(forward, (*operands, *options))
    out = forward(*operands, *options)
    row_weight = _logits(20, *operands[0].shape[:3], std=1).abs()
    saved = tuple(out[1:]) if backend == "triton" else ()
    torch.library.opcheck(backward, (*operands, *saved, row_weight, *options))


def test_row_op_table():
    """Every backend of the table names an op of the fastkd namespace with the agreed schema."""
    for backend in ROW_BACKENDS:
        for kind, schema in (("kd_rows", ops.KD_ROWS_SCHEMA),
                             ("multi_teacher_rows", ops.MULTI_TEACHER_ROWS_SCHEMA)):
            op = ops.row_op(backend, kind)
            assert str(op._schema) == f"fastkd::{ops.ROW_OPS[backend][kind]}{schema}"

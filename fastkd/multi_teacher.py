"""``multi_teacher_kd_loss``: K teachers fused per token by entropy-driven weights.

Argument checks and backend choice; the chunk driver and its autograd Function are the ones of
``fused_kd_loss`` (``fastkd.functional.chunked_loss``), with the multi-teacher row op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from fastkd._checks import (
    REDUCTIONS,
    check_choice,
    check_floating,
    check_int,
    check_loss_weights,
    check_positive,
    check_same_device,
    check_vocab,
    resolve_backend,
)
from fastkd.chunked import Linear
from fastkd.functional import (
    STUDENT_NAMES,
    check_linear,
    check_teacher_matches,
    chunked_loss,
    flat_labels,
)
from fastkd.logit_transforms import check_logit_scale, check_softcap, check_teacher_transforms
from fastkd.ops import multi_teacher_arguments, row_op
from fastkd.options import FUSIONS, WEIGHTINGS, MultiTeacherOptions


def multi_teacher_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hiddens: Sequence[torch.Tensor],
    teacher_weights: Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_biases: Sequence[torch.Tensor | None] | None = None,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_tau: float = 1.0,
    teacher_priors: Sequence[float] | torch.Tensor | None = None,
    fusion: str = "mixture",
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    return_mixing: bool = False,
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None | Sequence[float | None] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float | Sequence[float] = 1.0,
):
    """Distill one student from K teachers that share its vocabulary.

    Per token, teacher k's tempered distribution p_k has entropy H_k; its weight is
    w_k = softmax_k(log pi_k - H_k / entropy_tau) (``weighting="entropy"``: confident teachers
    weigh more) or pi_k (``"static"``), pi the normalized ``teacher_priors`` (uniform default).
    With q = softmax(z_s / T)::

        "mixture":     D = KL(sum_k w_k p_k || q)
        "weighted_kl": D = sum_k w_k KL(p_k || q)
        loss = soft_weight * D + hard_weight * CE(z_s, label)

    Mixing weights are constants (no gradient flows through them).

    Args:
        student_hidden: (*, Hs); student_weight (V, Hs); student_bias (V,) optional.
        teacher_hiddens: K tensors (*, H_k); teacher_weights: K tensors (V, H_k);
            teacher_biases: K tensors (V,) or None, or None.
        labels: (*) token ids or None; reduction, ignore_index, backend, chunk_size as in
            ``fused_kd_loss``.
        return_mixing: also return the weights w, shaped (*, K).
        student_softcap, student_logit_scale: the student's logit transform, as in
            ``fused_kd_loss``.
        teacher_softcap, teacher_logit_scale: the teachers' transforms: one value for every
            teacher, or a sequence of K (teacher k's softcap or None, its scale).

    Returns:
        The loss (scalar, or (*) for ``reduction="none"``), or ``(loss, w)``.
    """
    student_hidden = check_floating("student_hidden", student_hidden)
    student_weight = check_floating("student_weight", student_weight, ndim=2)
    check_linear(STUDENT_NAMES, student_hidden, student_weight, student_bias)
    vocab = check_vocab("student_weight", student_weight.shape, 0)
    teachers = _check_teachers(student_hidden, student_weight, teacher_hiddens, teacher_weights,
                               teacher_biases)
    leading = student_hidden.shape[:-1]
    device = check_same_device(
        [("student_hidden", student_hidden), ("student_weight", student_weight),
         ("student_bias", student_bias), ("labels", labels)]
        + [(f"teacher_hiddens[{k}]", t.hidden) for k, t in enumerate(teachers)]
        + [(f"teacher_weights[{k}]", t.weight) for k, t in enumerate(teachers)]
        + [(f"teacher_biases[{k}]", t.bias) for k, t in enumerate(teachers)]
    )
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("fusion", fusion, FUSIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    soft_weight, hard_weight = check_loss_weights(soft_weight, hard_weight)
    options = MultiTeacherOptions(
        priors=_normalized_priors(teacher_priors, len(teachers)),
        temperature=check_positive("temperature", temperature),
        weighting=weighting,
        entropy_tau=check_positive("entropy_tau", entropy_tau),
        fusion=fusion,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ignore_index=check_int("ignore_index", ignore_index),
    )
    teacher_softcaps, teacher_scales = check_teacher_transforms(
        teacher_softcap, teacher_logit_scale, len(teachers))
    options = replace(options, student_softcap=check_softcap("student_softcap", student_softcap),
                      student_scale=check_logit_scale("student_logit_scale", student_logit_scale),
                      teacher_softcaps=teacher_softcaps, teacher_scales=teacher_scales)
    labels = flat_labels(labels, leading, vocab, options)
    tokens = leading.numel()
    mixing = torch.empty(tokens, len(teachers), dtype=torch.float32, device=device)
    backend = resolve_backend(backend, device, native=True)
    loss = chunked_loss(student_hidden, student_weight, student_bias, teachers, labels,
                        _row_op(backend, options, mixing), reduction, ignore_index, chunk_size,
                        backend, "multi_teacher_kd_loss")
    return (loss, mixing.reshape(*leading, len(teachers))) if return_mixing else loss


def _check_teachers(student_hidden, student_weight, hiddens, weights, biases) -> list[Linear]:
    """Teachers as frozen ``Linear``s (hidden flattened to (N, H_k)), after every shape check."""
    for name, value in (("teacher_hiddens", hiddens), ("teacher_weights", weights)):
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    if len(hiddens) == 0:
        raise ValueError("teacher_hiddens is empty: multi_teacher_kd_loss needs >= 1 teacher")
    if len(hiddens) != len(weights):
        raise ValueError(f"teacher_hiddens has {len(hiddens)} tensors but teacher_weights has "
                         f"{len(weights)}: one lm_head weight per teacher")
    if biases is not None and len(biases) != len(hiddens):
        raise ValueError(f"teacher_biases has {len(biases)} entries for {len(hiddens)} teachers")
    teachers = []
    for k, (hidden, weight) in enumerate(zip(hiddens, weights)):
        hidden = check_floating(f"teacher_hiddens[{k}]", hidden)
        weight = check_floating(f"teacher_weights[{k}]", weight, ndim=2)
        bias = None if biases is None else biases[k]
        check_linear((f"teacher_hiddens[{k}]", f"teacher_weights[{k}]", f"teacher_biases[{k}]"),
                     hidden, weight, bias)
        check_teacher_matches((f"teacher_hiddens[{k}]", f"teacher_weights[{k}]"), hidden, weight,
                              student_hidden, student_weight)
        teachers.append(Linear(hidden.detach().reshape(-1, hidden.shape[-1]).contiguous(),
                               weight.detach(), None if bias is None else bias.detach()))
    return teachers


def _normalized_priors(priors, teachers: int) -> tuple[float, ...]:
    """pi: K Python floats summing to 1; uniform when None.

    Computed in Python from a sequence of numbers, so that ``torch.compile`` sees constants
    (a tensor of priors is read to the host: under ``torch.compile`` that is data-dependent,
    so pass a list there).
    """
    if priors is None:
        return (1.0 / teachers,) * teachers
    if isinstance(priors, torch.Tensor):
        shape = tuple(priors.shape)
        values = priors.detach().double().cpu().reshape(-1).tolist()
    else:
        values = [float(p) for p in priors]
        shape = (len(values),)
    if shape != (teachers,):
        raise ValueError(f"teacher_priors has shape {shape} but there are "
                         f"{teachers} teachers: give one prior per teacher")
    total = math.fsum(values)
    if not all(math.isfinite(v) and v >= 0 for v in values) or total <= 0:
        raise ValueError(f"teacher_priors must be finite, >= 0 and not all zero, got "
                         f"{values}")
    return tuple(v / total for v in values)


def _row_op(backend: str, options: MultiTeacherOptions, mixing: torch.Tensor):
    """``op(rows, student, teachers (K, C, V), labels, grad_out)``; writes mixing[rows]."""
    op, arguments = row_op(backend, "multi_teacher_rows"), multi_teacher_arguments(options)

    def multi_teacher(rows, student_logits, teacher_logits, labels, grad_out):
        return op(student_logits, teacher_logits, labels, grad_out, mixing[rows], *arguments)

    return multi_teacher

"""Public loss functions: argument checks, backend choice, reduction.

Shapes: leading dimensions ``*`` of hidden states, logits and labels are any shape (``(N,)``,
``(B, T)``, ...) and are flattened inside; V is the vocabulary size, Hs / Ht the student and
teacher hidden sizes.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from fastkd._checks import (
    REDUCTIONS,
    check_choice,
    check_floating,
    check_int,
    check_label_range,
    check_labels,
    check_loss_weights,
    check_positive,
    check_real,
    check_same_device,
    check_vocab,
    resolve_backend,
)
from fastkd.autograd import ChunkedKDFunction, KDLossFunction
from fastkd.chunked import Linear
from fastkd.logit_transforms import transform_options
from fastkd.matmul import HALF
from fastkd.ops import kd_arguments, row_op
from fastkd.options import DIVERGENCES, KDOptions
from fastkd.plan import plan_chunks

STUDENT_NAMES = ("student_hidden", "student_weight", "student_bias")


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> torch.Tensor:
    """Distillation loss straight from hidden states and lm_head weights.

    Logits ``z = hidden @ weight.T + bias`` are formed chunk by chunk of tokens and never held
    whole. Per token, with q = softmax(z_s / T) and p = softmax(z_t / T)::

        loss = soft_weight * D(p, q) + hard_weight * CE(z_s, label)

    where D is KL(p || q) ("kl"), KL(q || p) ("reverse_kl") or the generalized JSD
    beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q ("jsd"); CE is untempered.

    ``beta`` (jsd only) lies in [0, 1]; as TRL's GKD and Liger-Kernel do, beta = 0 is forward
    KL(p || q) and beta = 1 reverse KL(q || p). These are the limits of JSD / beta as
    beta -> 0 and of JSD / (1 - beta) as beta -> 1 (JSD = beta KL(p || q) + O(beta^2)); the
    JSD itself tends to 0 at both ends, so the loss jumps at beta = 0 and 1.

    Args:
        student_hidden: (*, Hs) student hidden states.
        student_weight: (V, Hs) student lm_head weight; student_bias (V,) optional.
        teacher_hidden: (*, Ht) teacher hidden states (a constant: no gradient flows to it).
        teacher_weight: (V, Ht) teacher lm_head weight; teacher_bias (V,) optional.
        labels: (*) token ids, or None. Tokens equal to ``ignore_index`` do not count.
        reduction: "mean" over counted tokens, "sum", or "none" (per token, shape ``*``).
        backend: "auto" (Triton on CUDA; on CPU the C++ row ops, or torch where they do not
            build), "triton", "torch", "cpp" (C++, CPU) or "cuda" (CUDA C++).
        chunk_size: tokens per chunk; by default the fastest plan within the
            ``FASTKD_CHUNK_MEMORY`` cap on the chunk's working set (fastkd/plan.py).
        student_softcap, teacher_softcap: the models' final-logit softcap c (Gemma 2 / 3's
            ``final_logit_softcapping``), or None: the model's logits are
            f(z) = c tanh(a z / c) of the raw logits z, inside the row ops (never materialized);
            T and the CE apply to f(z) and the gradient flows through f.
        student_logit_scale, teacher_logit_scale: the models' logit scale a > 0 (applied before
            the cap; without one, f(z) = a z): Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``.

    Returns:
        A scalar fp32 loss (fp64 for fp64 inputs), or (*) for ``reduction="none"``.
    """
    student_hidden = check_floating("student_hidden", student_hidden)
    student_weight = check_floating("student_weight", student_weight, ndim=2)
    teacher_hidden = check_floating("teacher_hidden", teacher_hidden)
    teacher_weight = check_floating("teacher_weight", teacher_weight, ndim=2)
    leading = student_hidden.shape[:-1]
    check_linear(STUDENT_NAMES, student_hidden, student_weight, student_bias)
    check_linear(("teacher_hidden", "teacher_weight", "teacher_bias"),
                 teacher_hidden, teacher_weight, teacher_bias)
    check_teacher_matches(("teacher_hidden", "teacher_weight"), teacher_hidden, teacher_weight,
                          student_hidden, student_weight)
    vocab = check_vocab("student_weight", student_weight.shape, 0)
    device = check_same_device([
        ("student_hidden", student_hidden), ("student_weight", student_weight),
        ("student_bias", student_bias), ("teacher_hidden", teacher_hidden),
        ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias), ("labels", labels),
    ])
    options = _kd_options(divergence, beta, temperature, soft_weight, hard_weight, ignore_index)
    options = replace(options, **transform_options(student_softcap, student_logit_scale,
                                                   teacher_softcap, teacher_logit_scale))
    token_labels = flat_labels(labels, leading, vocab, options)
    check_choice("reduction", reduction, REDUCTIONS)
    backend = resolve_backend(backend, device, native=True)
    teacher = Linear(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).contiguous(),
                     teacher_weight.detach(),
                     None if teacher_bias is None else teacher_bias.detach())
    return chunked_loss(student_hidden, student_weight, student_bias, [teacher], token_labels,
                        _row_op(backend, options), reduction, ignore_index, chunk_size, backend)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> torch.Tensor:
    """The loss of ``fused_kd_loss`` on logits that are already materialized.

    Args:
        student_logits: (*, V) raw student logits (before the softcap and scale, when those
            are given); the gradient flows to them.
        teacher_logits: (*, V) raw teacher logits (a constant).
        labels: (*) token ids or None; other arguments as in ``fused_kd_loss``.

    Returns:
        A scalar fp32 loss (fp64 for fp64 inputs), or (*) for ``reduction="none"``.
    """
    student_logits = check_floating("student_logits", student_logits)
    teacher_logits = check_floating("teacher_logits", teacher_logits)
    if student_logits.dim() == 0 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (*, V)"
        )
    device = check_same_device([("student_logits", student_logits),
                                ("teacher_logits", teacher_logits), ("labels", labels)])
    leading = student_logits.shape[:-1]
    vocab = check_vocab("student_logits", student_logits.shape, -1)
    options = _kd_options(divergence, beta, temperature, soft_weight, hard_weight, ignore_index)
    options = replace(options, **transform_options(student_softcap, student_logit_scale,
                                                   teacher_softcap, teacher_logit_scale))
    token_labels = flat_labels(labels, leading, vocab, options)
    check_choice("reduction", reduction, REDUCTIONS)
    backend = resolve_backend(backend, device, native=True)
    row_op = _row_op(backend, options)
    loss = KDLossFunction.apply(
        student_logits.reshape(-1, vocab).contiguous(),
        teacher_logits.detach().reshape(-1, vocab).contiguous(),
        token_labels,
        row_op,
        reduction,
        ignore_index,
        plan_chunks(vocab, 1, backend, half_weights=False,
                    device_type=student_logits.device.type).rows,
        torch.is_grad_enabled() and student_logits.requires_grad,
    )
    return loss.reshape(leading) if reduction == "none" else loss


def check_linear(
    names: tuple[str, str, str],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """hidden (*, H) matches weight (V, H) in size and dtype; bias is (V,) of that dtype.

    ``names`` are the argument names of (hidden, weight, bias) for the messages.
    """
    hidden_name, weight_name, bias_name = names
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} {tuple(hidden.shape)} has hidden size "
            f"{hidden.shape[-1] if hidden.dim() else None} but {weight_name} "
            f"{tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"{hidden_name} dtype {hidden.dtype} differs from {weight_name} dtype {weight.dtype}"
        )
    if bias is not None:
        check_floating(bias_name, bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{bias_name} shape {tuple(bias.shape)} must be ({weight.shape[0]},), "
                f"the vocab size of {weight_name} {tuple(weight.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bias_name} dtype {bias.dtype} differs from {weight_name} dtype "
                            f"{weight.dtype}")


def check_teacher_matches(
    names: tuple[str, str],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
) -> None:
    """A teacher's weight (V, Ht) has the student's vocab, its hidden (*, Ht) the same tokens."""
    hidden_name, weight_name = names
    if weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"{weight_name} {tuple(weight.shape)} has vocab size {weight.shape[0]} but "
            f"student_weight {tuple(student_weight.shape)} has {student_weight.shape[0]}"
        )
    if hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"{hidden_name} leading shape {tuple(hidden.shape[:-1])} differs from "
            f"student_hidden leading shape {tuple(student_hidden.shape[:-1])}: token counts "
            "must match"
        )


def _kd_options(divergence, beta, temperature, soft_weight, hard_weight, ignore_index) -> KDOptions:
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence == "jsd":
        if not 0 <= check_real("beta", beta) <= 1:
            raise ValueError(f"beta must lie in [0, 1] for divergence='jsd', got {beta!r}")
        # beta = 0 / 1: forward / reverse KL (TRL's and Liger-Kernel's convention; the limits
        # of JSD / beta and JSD / (1 - beta)), on their own code paths
        divergence = {0.0: "kl", 1.0: "reverse_kl"}.get(float(beta), divergence)
    soft_weight, hard_weight = check_loss_weights(soft_weight, hard_weight)
    return KDOptions(
        divergence=divergence,
        beta=float(beta) if divergence == "jsd" else 0.5,
        temperature=check_positive("temperature", temperature),
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ignore_index=check_int("ignore_index", ignore_index),
    )


def flat_labels(labels, leading: torch.Size, vocab: int, options) -> torch.Tensor | None:
    """Labels checked against the leading shape (and vocab when hard_weight > 0), flattened."""
    if labels is None:
        if options.hard_weight > 0:
            raise ValueError(f"hard_weight={options.hard_weight} needs labels, got labels=None")
        return None
    # int64 for every check and backend: comparing int32 labels with an ignore_index outside
    # the int32 range would wrap it in torch but not in the kernels
    labels = check_labels(labels, leading).to(torch.int64)
    if options.hard_weight > 0:
        check_label_range(labels, vocab, options.ignore_index)
    return labels.reshape(-1).contiguous()


def chunked_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teachers: list[Linear],
    labels: torch.Tensor | None,
    row_op,
    reduction: str,
    ignore_index: int,
    chunk_size: int | None,
    backend: str,
    loss_name: str = "fused_kd_loss",
) -> torch.Tensor:
    """The chunk-driven loss of checked inputs, in the student's leading shape for "none".

    student_hidden (*, Hs), student_weight (V, Hs), student_bias (V,) or None; ``teachers``
    hold flattened, detached hidden (N, Ht_k), weight (V, Ht_k) and bias; ``chunk_size``
    tokens per chunk (checked here), or None for the plan's choice (fastkd/plan.py).
    """
    if chunk_size is not None:  # a bool is an int to isinstance: check_int refuses it
        chunk_size = check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    widths = (student_weight.shape[1], *(t.weight.shape[1] for t in teachers))
    plan = plan_chunks(student_weight.shape[0], len(teachers), backend,
                       student_weight.dtype in HALF, chunk_size, student_weight.device.type,
                       widths, student_hidden.shape[:-1].numel())
    student_grad = any(t is not None and t.requires_grad
                       for t in (student_hidden, student_weight, student_bias))
    loss = ChunkedKDFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous(), student_weight,
        student_bias, teachers, labels, row_op, reduction, ignore_index, plan,
        torch.is_grad_enabled() and student_grad, loss_name,
    )
    return loss.reshape(student_hidden.shape[:-1]) if reduction == "none" else loss


def _row_op(backend: str, options: KDOptions):
    """The row op of one teacher: ``op(rows, student, teachers (1, C, V), labels, grad_out)``."""
    return partial(_one_teacher, row_op(backend, "kd_rows"), kd_arguments(options))


def _one_teacher(op, arguments, rows, student_logits, teacher_logits, labels, grad_out):
    return op(student_logits, teacher_logits[0], labels, grad_out, *arguments)


__all__ = ["fused_kd_loss", "kd_loss"]

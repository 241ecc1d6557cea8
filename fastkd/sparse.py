"""``sparse_kd_loss``: distillation from a stored sparse (top-k) teacher.

The teacher is given per token by k ids, its raw logits at them and its full-vocabulary
log-sum-exp (what ``fastkd capture`` stores); the student's logits come chunk by chunk from its
hidden states and lm_head, as in ``fused_kd_loss``, and are never held whole. docs/sparse.md
gives the math and the gradient of the tail bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from fastkd._checks import (
    REDUCTIONS,
    check_choice,
    check_floating,
    check_int,
    check_loss_weights,
    check_positive,
    check_same_device,
    check_tensor,
    check_vocab,
    resolve_backend,
)
from fastkd.functional import STUDENT_NAMES, check_linear, chunked_loss, flat_labels
from fastkd.logit_transforms import check_logit_scale, check_softcap
from fastkd.ops import row_op, sparse_kd_arguments
from fastkd.options import KDOptions

TAILS = ("bucket", "renormalize")
SPARSE_DIVERGENCES = ("kl", "reverse_kl")


def sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_lse: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    tail: str = "bucket",
    backend: str = "auto",
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
) -> torch.Tensor:
    """Distillation loss against a sparse teacher: k logits per token plus its full LSE.

    Per token, with s = z_s / T over the full vocabulary (z_s = hidden @ weight.T + bias, formed
    chunk by chunk), q = softmax(s), the stored ids S and tempered teacher logits t = z_t / T::

        p_i = exp(t_i - teacher_lse)            (i in S; exact, given the full LSE)
        p_tail = 1 - sum_S p_i,   q_tail = 1 - sum_S q_i

    ``tail="bucket"``: D over the k + 1 buckets (p_S, p_tail) and (q_S, q_tail); the tail
    term's gradient reaches every other id j through q_j. ``tail="renormalize"``: p and q both
    renormalized onto S (p_i / sum_S p, q_i / sum_S q); no gradient off S, teacher_lse unused
    beyond its check. D is KL(p || q) ("kl") or KL(q || p) ("reverse_kl"); reverse KL floors
    the teacher probabilities at 2^-126 (a -inf logit or a vanishing tail gives a large finite
    loss, not inf). loss = soft_weight * D + hard_weight * CE(z_s, label) (CE untempered, no
    T^2 factor, as ``fused_kd_loss``). With S = every id, "bucket" equals ``fused_kd_loss``.

    Args:
        student_hidden: (*, H) student hidden states.
        student_weight: (V, H) student lm_head weight; student_bias (V,) optional.
        teacher_ids: (*, k) int64 (or int32) ids in [0, V), distinct within each token.
        teacher_logits: (*, k) the teacher's raw (untempered) logits at teacher_ids; -inf
            marks a padded entry (p = 0 there).
        teacher_lse: (*) logsumexp over the full vocabulary of teacher logits / temperature:
            at least the logsumexp of teacher_logits / temperature (up to rounding).
        labels: (*) token ids, or None. Tokens equal to ``ignore_index`` do not count.
        reduction: "mean" over counted tokens, "sum", or "none" (per token, shape ``*``).
        backend: "auto" (Triton on CUDA; on CPU the C++ row op, or torch where it does not
            build), "triton", "torch", "cpp" (C++, CPU) or "cuda" (CUDA C++).
        chunk_size: tokens per chunk; by default the plan's choice (fastkd/plan.py).
        student_softcap, student_logit_scale: the student's logit transform, as in
            ``fused_kd_loss`` (z_s above is then f(z_s)). The teacher has none here: its stored
            logits are what it emitted, its own cap and scale applied at capture.

    Returns:
        A scalar fp32 loss (fp64 for fp64 inputs), or (*) for ``reduction="none"``.
    """
    student_hidden = check_floating("student_hidden", student_hidden)
    student_weight = check_floating("student_weight", student_weight, ndim=2)
    check_linear(STUDENT_NAMES, student_hidden, student_weight, student_bias)
    leading = student_hidden.shape[:-1]
    vocab = check_vocab("student_weight", student_weight.shape, 0)
    device = check_same_device([
        ("student_hidden", student_hidden), ("student_weight", student_weight),
        ("student_bias", student_bias), ("teacher_ids", teacher_ids),
        ("teacher_logits", teacher_logits), ("teacher_lse", teacher_lse), ("labels", labels),
    ])
    check_choice("divergence", divergence, SPARSE_DIVERGENCES)
    check_choice("tail", tail, TAILS)
    check_choice("reduction", reduction, REDUCTIONS)
    soft_weight, hard_weight = check_loss_weights(soft_weight, hard_weight)
    options = KDOptions(divergence=divergence,
                        temperature=check_positive("temperature", temperature),
                        soft_weight=soft_weight, hard_weight=hard_weight,
                        ignore_index=check_int("ignore_index", ignore_index),
                        student_softcap=check_softcap("student_softcap", student_softcap),
                        student_scale=check_logit_scale("student_logit_scale",
                                                        student_logit_scale))
    token_labels = flat_labels(labels, leading, vocab, options)
    ids, logits, lse = check_sparse_teacher(teacher_ids, teacher_logits, teacher_lse, leading,
                                            vocab, options.temperature, tail, token_labels,
                                            options.ignore_index)
    backend = resolve_backend(backend, device, native=True)
    op = partial(_sparse_rows, row_op(backend, "sparse_kd_rows"), ids, logits, lse,
                 sparse_kd_arguments(tail, options))
    return chunked_loss(student_hidden, student_weight, student_bias, [], token_labels, op,
                        reduction, options.ignore_index, chunk_size, backend, "sparse_kd_loss")


def check_sparse_teacher(
    teacher_ids: object,
    teacher_logits: object,
    teacher_lse: object,
    leading: torch.Size,
    vocab: int,
    temperature: float,
    tail: str,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse teacher flattened to ids (N, k) int64, logits (N, k), lse (N,), all checked.

    Refuses: shapes that disagree with the student's leading shape ``*``, non-integer ids, ids
    outside [0, vocab), an id twice in a token, NaN or +inf logits, a non-finite lse, an lse
    below the logsumexp of the given logits / T beyond rounding, and (``tail="renormalize"``)
    a counted token whose k logits are all -inf.
    """
    ids = check_tensor("teacher_ids", teacher_ids)
    logits = check_floating("teacher_logits", teacher_logits)
    lse = check_floating("teacher_lse", teacher_lse)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_ids must be int64 or int32 token ids, got dtype {ids.dtype}")
    if ids.dim() != len(leading) + 1 or ids.shape[:-1] != leading:
        raise ValueError(f"teacher_ids {tuple(ids.shape)} must be (*, k) with * the leading "
                         f"shape {tuple(leading)} of student_hidden")
    if logits.shape != ids.shape:
        raise ValueError(f"teacher_logits {tuple(logits.shape)} must have the shape of "
                         f"teacher_ids {tuple(ids.shape)}")
    if lse.shape != leading:
        raise ValueError(f"teacher_lse {tuple(lse.shape)} must have the leading shape "
                         f"{tuple(leading)} of student_hidden (one value per token)")
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_ids {tuple(ids.shape)} has k = {k} ids per token; k must "
                         f"lie in [1, V = {vocab}] (V from student_weight)")
    ids = ids.reshape(-1, k).to(torch.int64).contiguous()
    logits = logits.detach().reshape(-1, k).contiguous()
    lse = lse.detach().reshape(-1).contiguous()
    shape = tuple(teacher_ids.shape)
    outside = ((ids < 0) | (ids >= vocab)).any(dim=-1)
    _refuse(outside, f"teacher_ids {shape} holds an id outside [0, {vocab}) (V from "
            "student_weight)", lambda row: f"token {row} (flattened): ids {ids[row].tolist()}")
    ordered = ids.sort(dim=-1).values
    _refuse((ordered[:, 1:] == ordered[:, :-1]).any(dim=-1),
            f"teacher_ids {shape} repeats an id within a token: each token's k ids must be "
            "distinct", lambda row: f"token {row} (flattened)")
    _refuse((torch.isnan(logits) | (logits == torch.inf)).any(dim=-1),
            f"teacher_logits {tuple(logits.shape)} holds NaN or +inf; only -inf (a padded "
            "entry, p = 0) is allowed", lambda row: f"token {row} (flattened)")
    _refuse(~torch.isfinite(lse), f"teacher_lse {tuple(lse.shape)} holds NaN or inf values",
            lambda row: f"token {row} (flattened)")
    math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tempered = logits.to(math_dtype) / temperature
    support_lse = torch.logsumexp(tempered, dim=-1)
    # Rounding: the stored logits carry a relative error of eps(teacher_logits.dtype) (so their
    # logsumexp moves by up to that times max |t|), the stored LSE one of eps(lse.dtype) |lse|;
    # 4x, plus 1e-6 for values near 0, covers the sums' own rounding. An excess beyond that is
    # a wrong temperature or LSE.
    finite = tempered.masked_fill(tempered == -torch.inf, 0)
    slack = 4 * (torch.finfo(logits.dtype).eps * finite.abs().amax(dim=-1)
                 + torch.finfo(lse.dtype).eps * lse.abs().to(math_dtype)) + 1e-6
    _refuse(support_lse - lse.to(math_dtype) > slack,
            f"teacher_lse is smaller than the logsumexp of teacher_logits / temperature "
            f"(T = {temperature}): teacher_lse must be the logsumexp over the full vocabulary "
            "of teacher logits / T at this temperature",
            lambda row: f"teacher_lse[{row}] (flattened) = {lse[row].item():.6g} < "
                        f"{support_lse[row].item():.6g}")
    if tail == "renormalize":
        empty = (logits == -torch.inf).all(dim=-1)
        if labels is not None:
            empty &= labels != ignore_index
        _refuse(empty, "teacher_logits has a counted token whose k logits are all -inf: "
                "tail='renormalize' has no teacher mass to renormalize there",
                lambda row: f"token {row} (flattened)")
    return ids, logits, lse


def _refuse(bad: torch.Tensor, message: str, where: Callable[[int], str]) -> None:
    """ValueError(``message``, and ``where(row)`` of the first bad row) if any of ``bad`` (N,).

    Under ``torch.compile`` the host read would break the graph (and fail fullgraph=True), so
    the check is an asynchronous device assert with ``message`` there (as check_label_range).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)
        return
    if bad.any():
        raise ValueError(f"{message}; first at {where(int(bad.nonzero()[0, 0]))}")


def _sparse_rows(op, ids, logits, lse, arguments, rows, student_logits, teacher_logits, labels,
                 grad_out):
    """The chunk driver's row op: the sparse teacher's rows ``rows`` (no dense teacher)."""
    return op(student_logits, ids[rows], logits[rows], lse[rows], labels, grad_out, *arguments)


__all__ = ["sparse_kd_loss"]

"""torch.autograd.Functions of the vocabulary losses; they only orchestrate.

Teachers are constants. For ``reduction="mean"`` / ``"sum"`` the student gradients are built
during forward (the loss is terminal and the teacher frozen) and backward only scales them by
grad_output. For ``"none"`` the incoming per-token gradient is unknown at forward time, so
backward runs the chunk driver again with it as the per-token scale.

With ``want_parts`` a Function also returns the per-token parts (N, 2) (the unweighted
divergence and CE that the row ops wrote in the same pass) as a second, non-differentiable
output; the public functions reduce them.

Both Functions run with autocast disabled (``autocast_off``): their GEMMs pick their own
dtypes (fp32 logits from half or mixed operands, fastkd/matmul.py), which an enclosing
``torch.autocast`` region would otherwise recast to its lower precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from fastkd.chunked import Linear, chunked_kd
from fastkd.matmul import accumulation_dtype
from fastkd.plan import ChunkPlan

RowOp = Callable[..., torch.Tensor]


def refuse_double_backward(loss_name: str) -> None:
    """Raise when a backward runs to build a graph (``create_graph=True``).

    The student gradients are built during forward as constants, so the gradient a backward
    returns cannot be differentiated again; handing it back silently cut from the graph would
    make a gradient penalty built on it add nothing.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{loss_name} does not support double backward (create_graph=True, e.g. a "
            "gradient penalty): its gradients are built during forward as constants and "
            "cannot be differentiated again; call backward / torch.autograd.grad without "
            "create_graph"
        )


def first_order(backward):
    """``once_differentiable``, and a RuntimeError under ``create_graph=True`` (where
    ``once_differentiable`` alone returns a gradient with requires_grad=False, no error).

    The loss's name is ``ctx.loss_name``.
    """
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        refuse_double_backward(ctx.loss_name)
        return inner(ctx, *grad_outputs)

    return wrapper


def autocast_off(method):
    """Run an autograd.Function's ``forward(ctx, ...)`` or ``backward(ctx, ...)`` with autocast
    disabled for the device type of its first tensor argument (a no-op outside autocast)."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not torch.is_autocast_enabled(device_type):
            return method(ctx, *args)
        with torch.autocast(device_type, enabled=False):
            return method(ctx, *args)

    return wrapper


def counted_tokens(
    labels: torch.Tensor | None, tokens: int, ignore_index: int, device: torch.device
) -> torch.Tensor:
    """Number of tokens whose label is not ``ignore_index`` (all tokens without labels)."""
    if labels is None:
        return torch.tensor(tokens, device=device)
    return (labels != ignore_index).sum()


def reduction_scale(count: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """d reduced / d loss_i: 1 / max(count, 1) for "mean", 1 for "sum" (and "none")."""
    if reduction == "mean":
        return 1.0 / count.clamp(min=1).to(dtype)
    return torch.ones((), dtype=dtype, device=count.device)


class ChunkedKDFunction(torch.autograd.Function):
    """Loss of student logits ``h_s W_s^T + b_s`` against fixed teacher logits, chunked.

    One Function serves ``fused_kd_loss`` (one teacher) and ``multi_teacher_kd_loss`` (K
    teachers): they differ only in the row op, which sees the student chunk (C, V) and the
    teachers' chunks (K, C, V).
    """

    @staticmethod
    @autocast_off
    def forward(
        ctx,
        student_hidden: torch.Tensor,  # (N, Hs)
        student_weight: torch.Tensor,  # (V, Hs)
        student_bias: torch.Tensor | None,  # (V,)
        teachers: list[Linear],
        labels: torch.Tensor | None,  # (N,)
        row_op: RowOp,
        reduction: str,
        ignore_index: int,
        plan: ChunkPlan,
        compute_grad: bool,
        loss_name: str = "fused_kd_loss",
        want_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ctx.loss_name = loss_name
        student = Linear(student_hidden, student_weight, student_bias)
        need = tuple(ctx.needs_input_grad[:3]) if compute_grad else (False, False, False)
        ctx.reduction = reduction
        acc_dtype = accumulation_dtype(student_weight)
        parts = _parts_buffer(want_parts, student_hidden.shape[0], acc_dtype, student_hidden.device)
        if reduction == "none":
            loss, _ = chunked_kd(student, teachers, labels, row_op, None, need, plan,
                                 parts=parts)
            ctx.replay = (teachers, row_op, need, plan, ignore_index)
            ctx.save_for_backward(student_hidden, student_weight, student_bias, labels)
            return _with_parts(ctx, loss, parts)
        count = counted_tokens(labels, student_hidden.shape[0], ignore_index, student_hidden.device)
        scale = reduction_scale(count, reduction, acc_dtype)
        loss, grads = chunked_kd(
            student, teachers, labels, row_op, scale if any(need) else None, need, plan,
            ignore_index, parts,
        )
        ctx.save_for_backward(  # fp32 accumulators cast to their input's dtype
            grads.hidden,
            _cast(grads.weight, student_weight),
            _cast(grads.bias, student_bias),
        )
        return _with_parts(ctx, loss.sum() * scale, parts)

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_output: torch.Tensor, grad_parts: torch.Tensor | None = None):
        if ctx.reduction == "none":  # replay the chunks with g_i = d out / d loss_i
            hidden, weight, bias, labels = ctx.saved_tensors
            teachers, row_op, need, plan, ignore_index = ctx.replay
            _, grads = chunked_kd(
                Linear(hidden, weight, bias), teachers, labels, row_op,
                grad_output.to(accumulation_dtype(weight)), need, plan, ignore_index,
            )
            grads = (grads.hidden, _cast(grads.weight, weight), _cast(grads.bias, bias))
        elif not torch.compiler.is_compiling() and torch.equal(
            grad_output, torch.ones_like(grad_output)
        ):  # the usual loss.backward(): no (V, Hs) copy. A traced graph cannot branch on the
            # value of grad_output, so it always scales (the compiler may fuse the multiply).
            grads = ctx.saved_tensors
        else:
            grads = tuple(None if g is None else g * grad_output.to(g.dtype)
                          for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None, None, None, None, None)


class KDLossFunction(torch.autograd.Function):
    """Loss of given student logits (N, V) against fixed teacher logits (N, V).

    The per-token gradient d loss_i / d z_s is built during forward in the student's dtype;
    backward scales its rows by grad_output (a scalar, or per token for "none").
    """

    @staticmethod
    @autocast_off
    def forward(
        ctx,
        student_logits: torch.Tensor,  # (N, V)
        teacher_logits: torch.Tensor,  # (N, V)
        labels: torch.Tensor | None,  # (N,)
        row_op: RowOp,
        reduction: str,
        ignore_index: int,
        chunk_size: int,
        compute_grad: bool,
        want_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ctx.loss_name = "kd_loss"
        tokens = student_logits.shape[0]
        grad = torch.empty_like(student_logits) if compute_grad else None
        loss = torch.empty(tokens, dtype=accumulation_dtype(student_logits),
                           device=student_logits.device)
        parts = _parts_buffer(want_parts, tokens, loss.dtype, loss.device)
        for start in range(0, tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            loss[rows] = row_op(
                rows, student_logits[rows], teacher_logits[None, rows],
                None if labels is None else labels[rows],
                None if grad is None else grad[rows],
                None if parts is None else parts[rows],
            )
        ctx.reduction = reduction
        if reduction == "none":
            ctx.save_for_backward(grad)
            return _with_parts(ctx, loss, parts)
        count = counted_tokens(labels, tokens, ignore_index, student_logits.device)
        scale = reduction_scale(count, reduction, loss.dtype)
        ctx.save_for_backward(None if grad is None else grad.mul_(scale.to(grad.dtype)))
        return _with_parts(ctx, loss.sum() * scale, parts)

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_output: torch.Tensor, grad_parts: torch.Tensor | None = None):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad_output = grad_output[:, None]
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None, None, None


def _parts_buffer(
    want_parts: bool, tokens: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The per-token parts (N, 2) the row ops fill (divergence, CE), or None."""
    return torch.empty(tokens, 2, dtype=dtype, device=device) if want_parts else None


def _with_parts(ctx, loss: torch.Tensor, parts: torch.Tensor | None):
    """``loss``, or ``(loss, parts)`` with the parts marked non-differentiable."""
    if parts is None:
        return loss
    ctx.mark_non_differentiable(parts)
    return loss, parts


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """An fp32 accumulator in the dtype of the input it is the gradient of."""
    return None if grad is None else grad.to(like.dtype)

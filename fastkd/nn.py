"""nn.Module wrappers of the public losses: the options are fixed at construction."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastkd.attention import attention_kd_loss
from fastkd.functional import fused_kd_loss, kd_loss
from fastkd.liger import from_liger_names, liger_forward_names
from fastkd.multi_teacher import multi_teacher_kd_loss


class _LossModule(nn.Module):
    """Holds the keyword options a loss function is called with; shows them in its repr.

    Subclasses name the function (``loss_fn``) and the keyword arguments their forward passes
    itself (``forward_keywords``); every other keyword-only parameter of the function is an
    option, and an unknown option name is a ``TypeError`` at construction.
    """

    loss_fn: Callable[..., Any]
    forward_keywords: tuple[str, ...] = ()

    def __init__(self, **options: Any) -> None:
        super().__init__()
        parameters = inspect.signature(type(self).loss_fn).parameters
        allowed = [name for name, p in parameters.items()
                   if p.kind is p.KEYWORD_ONLY and name not in self.forward_keywords]
        for name in options:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"{type(self).__name__}: unknown option {name!r}{hint}; "
                                f"options are {allowed}")
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedKDLoss(_LossModule):
    """``fused_kd_loss`` with fixed options; forward takes hidden states and lm_head weights.

    Example::

        loss_fn = FusedKDLoss(divergence="jsd", temperature=2.0, hard_weight=0.5)
        loss = loss_fn(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)

    Liger-Kernel's ``LigerFusedLinearJSDLoss`` arguments are accepted too (fastkd/liger.py):
    ``weight_hard_loss`` / ``weight_soft_loss`` are ``hard_weight`` / ``soft_weight``;
    ``beta``, ``temperature``, ``ignore_index`` and ``chunk_size`` mean the same in both;
    ``compiled`` has no effect. With a Liger-only name, unset options take Liger's defaults
    (divergence "jsd", both weights 0.5), so ``FusedKDLoss(**liger_kwargs)`` is Liger's loss;
    forward takes Liger's order (student_input, student_weight, teacher_input, teacher_weight,
    true_labels, student_bias, teacher_bias) and, by keyword, Liger's names as well.
    """

    loss_fn = staticmethod(fused_kd_loss)
    forward_keywords = ("student_bias", "teacher_bias")

    def __init__(self, **options: Any) -> None:
        super().__init__(**from_liger_names(type(self).__name__, options))
        self.register_forward_pre_hook(liger_forward_names, with_kwargs=True)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, **self.options,
        )


class KDLoss(_LossModule):
    """``kd_loss`` with fixed options; forward takes student and teacher logits (*, V)."""

    loss_fn = staticmethod(kd_loss)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, **self.options)


class MultiTeacherKDLoss(_LossModule):
    """``multi_teacher_kd_loss`` with fixed options (weighting, fusion, priors, ...).

    Forward takes the student's hidden states and lm_head weight and lists of the teachers'.
    """

    loss_fn = staticmethod(multi_teacher_kd_loss)
    forward_keywords = ("student_bias", "teacher_biases")

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hiddens: list[torch.Tensor],
        teacher_weights: list[torch.Tensor],
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_biases: list[torch.Tensor | None] | None = None,
    ):
        return multi_teacher_kd_loss(
            student_hidden, student_weight, teacher_hiddens, teacher_weights, labels,
            student_bias=student_bias, teacher_biases=teacher_biases, **self.options,
        )


class AttentionKDLoss(_LossModule):
    """``attention_kd_loss`` with fixed options; forward takes q (B, H, L, D), k (B, H_kv, L, D).

    Example::

        loss_fn = AttentionKDLoss(loss="kl", causal=True)
        loss = loss_fn(q_s, k_s, q_t, k_t, attention_mask=batch["attention_mask"])
    """

    loss_fn = staticmethod(attention_kd_loss)
    forward_keywords = ("attention_mask",)

    def forward(
        self,
        student_q: torch.Tensor,
        student_k: torch.Tensor,
        teacher_q: torch.Tensor,
        teacher_k: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return attention_kd_loss(
            student_q, student_k, teacher_q, teacher_k, attention_mask=attention_mask,
            **self.options,
        )  # fmt: skip

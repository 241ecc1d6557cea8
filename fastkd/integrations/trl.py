"""TRL's GKD trainer with its loss computed by `fastkd.fused_kd_loss`.

TRL's `GKDTrainer.compute_loss` (`trl.experimental.gkd`) runs the student and the teacher to
their full (B, T, V) logits and calls `GKDTrainer.generalized_jsd_loss` on them.
`FusedGKDTrainer` computes the same loss from hidden states and lm_head weights: the student's
loss runs inside its forward (from a hook on the lm_head, as in `fastkd.distill`), the teacher
runs to its final hidden state, and no tokens x vocab logits are held. Everything else (on-policy
generation with probability `lmbda`, `seq_kd`, the data collator, the Trainer's gradient
accumulation) is TRL's own.

What TRL's loss does, and this one does too:

- causal shift: position t is scored on labels[t + 1]; positions whose next label is -100
  (prompt, padding, after EOS in generated completions) are not counted;
- per counted token, beta = 0: KL(teacher || student), beta = 1: KL(student || teacher), else
  beta KL(p || M) + (1 - beta) KL(q || M) with M = beta p + (1 - beta) q (p teacher, q student),
  fastkd's `divergence="jsd"` with the same beta;
- temperature: `compute_loss` calls `generalized_jsd_loss` without one, so the loss is at
  temperature 1 whatever `GKDConfig.temperature` (that one is the sampling temperature);
- reduction: the sum over counted tokens divided by `num_items_in_batch` when the Trainer gives
  it, else by the number of counted tokens of the batch (at least 1), TRL's "batchmean".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastkd import fused_kd_loss
from fastkd.distill.capture import final_hidden, loss_in_forward
from fastkd.distill.heads import Head, logit_transform, output_head, vocab_rows
from fastkd.distill.loss import IGNORE_INDEX, shift_labels

try:
    from trl.experimental.gkd import GKDTrainer
except ImportError as err:  # the optional extra
    raise ModuleNotFoundError(
        "fastkd.integrations.trl needs TRL (the trl extra): pip install 'fastkd[trl]'"
    ) from err

__all__ = ["FusedGKDTrainer", "fused_generalized_jsd_loss"]


def fused_generalized_jsd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: str = "auto",
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> torch.Tensor:
    """TRL's `GKDTrainer.generalized_jsd_loss` (reduction "batchmean") from hidden states.

    Args:
        student_hidden: (B, T, Hs) student hidden states, aligned with `labels` (already
            shifted: position t is scored on labels[t]).
        student_weight: (V, Hs) student lm_head weight.
        teacher_hidden: (B, T, Ht) teacher hidden states (a constant).
        teacher_weight: (V, Ht) teacher lm_head weight (a constant).
        labels: (B, T) with -100 at positions that are not counted, or None (all count).
        beta: 0 forward KL, 1 reverse KL, in between the generalized JSD (TRL's meaning).
        temperature: divides both logits before the softmaxes.
        num_items_in_batch: when given, the loss is the sum over counted tokens divided by it
            (gradient-accumulation-correct); else the mean over counted tokens (0 if none).
        student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale: each
            model's logit transform, logits = cap tanh(scale z / cap) (`fastkd.fused_kd_loss`;
            Gemma 2/3 soft-capping, Granite's and Cohere's logit scales).

    Returns:
        The scalar loss.
    """
    total = fused_kd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias=student_bias, teacher_bias=teacher_bias, divergence="jsd", beta=beta,
        temperature=temperature, ignore_index=IGNORE_INDEX, reduction="sum", backend=backend,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
    )
    return total / _denominator(labels, student_hidden, num_items_in_batch, total.device)


def _denominator(
    labels: torch.Tensor | None,
    hidden: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
    device: torch.device,
) -> torch.Tensor | int:
    """What TRL divides the summed loss by (see `fused_generalized_jsd_loss`)."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return num_items_in_batch.to(device)
        return num_items_in_batch
    if labels is None:
        return max(hidden[..., 0].numel(), 1)
    return (labels != IGNORE_INDEX).sum().clamp_min(1)


class FusedGKDTrainer(GKDTrainer):
    """`trl.experimental.gkd.GKDTrainer` whose loss is `fused_generalized_jsd_loss`.

    Takes exactly GKDTrainer's arguments, plus `fastkd_backend` (fastkd's backend: "auto",
    "torch", "triton", "cpp" or "cuda"). Student and teacher must compute their logits as
    `lm_head(final hidden state)`, soft-capped or scaled only as Gemma 2/3, Granite and Cohere
    do (each model's transform is read from it, `fastkd.distill.heads.logit_transform`), with
    the same vocabulary size (GKDTrainer checks the config's vocab_size too).
    """

    def __init__(self, *args: Any, fastkd_backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        logit_transform(self.model, "student")  # refuse transforms fastkd does not read
        logit_transform(self.teacher_model, "teacher")
        self.fastkd_backend = fastkd_backend
        self.vocab_rows = vocab_rows(self.model)
        teacher_rows = vocab_rows(self.teacher_model)
        if teacher_rows != self.vocab_rows:
            raise ValueError(f"student lm_head has {self.vocab_rows} rows, teacher lm_head "
                             f"{teacher_rows}: GKD needs one vocabulary")

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GKDTrainer's loss on `inputs` (input_ids, attention_mask, unshifted labels), fused."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        targets = shift_labels(inputs["labels"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = final_hidden(self.teacher_model, ids, mask)
        teacher = output_head(self.teacher_model, self.vocab_rows, "teacher")

        def loss_fn(student_hidden: torch.Tensor, student: Head) -> torch.Tensor:
            return fused_generalized_jsd_loss(
                student_hidden, student.weight.to(student_hidden.dtype), teacher_hidden,
                teacher.weight.to(teacher_hidden.dtype), targets, beta=self.beta,
                num_items_in_batch=num_items_in_batch, student_bias=student.bias,
                teacher_bias=teacher.bias, backend=self.fastkd_backend,
                student_softcap=student.softcap, teacher_softcap=teacher.softcap,
                student_logit_scale=student.scale, teacher_logit_scale=teacher.scale,
            )

        loss = loss_in_forward(model, ids, mask, self.vocab_rows, loss_fn)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

"""`DistillationTrainer`: a `transformers.Trainer` whose loss is fastkd's logit distillation,
plus feature alignment of mapped layers when asked (`fastkd.distill.features`).

accelerate brings DDP / FSDP, mixed precision, gradient accumulation, checkpointing and resume;
this class only replaces the loss. Its teachers are models run on each batch, or captures of
them on disk (`fastkd.distill.teachers`). The loss of an optimizer step is the sum over every
counted token of the step (all micro-batches, all processes) divided by their number, so it
equals the loss of one big batch on one process. Feature-alignment projections train with the
student and are checkpointed with the optimizer state (restored on resume, left out of the
saved student).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from .capture import loss_in_forward
from .features import FeatureAlignment, Features, FeatureSettings
from .features.projection_updates import ProjectionUpdates
from .heads import Head, logit_transform, vocab_rows
from .loss import IGNORE_INDEX, LogitKD, LogitParts, shift_labels
from .metrics import StepMeter
from .on_policy import OnPolicyRollouts
from .signals import CapturedSignals
from .teachers import CapturedTeachers, LiveTeachers

logger = logging.getLogger(__name__)


class DistillationTrainer(Trainer):
    """Trains `model` (the student) to match `teachers` on each batch's next-token
    distributions.

    Args:
        teachers: one or more frozen causal LMs sharing the student's tokenizer; their lm_heads
            may have extra padding rows (dropped).
        teacher_signals: instead of `teachers`, captures of them (`fastkd capture`), already
            checked against the data; batches then carry `row_index`, the token block index
            of each row.
        kd: the loss settings.
        vocab_size: tokens in use (the tokenizer's length) or None when unknown; checked
            against the lm_heads.
        features: feature-alignment terms (hidden states, attention, FFN) or None; settings
            without a positive weight add nothing.
        on_policy: rollouts that replace a fraction of the batches by student completions
            (scored with their own loss settings), or None.
        *args, **kwargs: as for `transformers.Trainer` (model = the student). Batches carry
            input_ids, attention_mask and unshifted labels (IGNORE_INDEX at padding).
    """

    # compute_loss already divides by the step's counted tokens: no further division by the
    # number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        teachers: Sequence[PreTrainedModel] = (),
        kd: LogitKD,
        teacher_signals: Sequence[CapturedSignals] = (),
        vocab_size: int | None = None,
        features: FeatureSettings | None = None,
        on_policy: OnPolicyRollouts | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if bool(teachers) == bool(teacher_signals):
            raise ValueError("DistillationTrainer needs teachers or teacher_signals (one of "
                             "them)")
        logit_transform(self.model, "student")  # refuses a transform fastkd does not read
        self.kd = kd
        self.student_rows = rows = vocab_rows(self.model)
        self.source = LiveTeachers(teachers, rows, vocab_size, self.args.device) if teachers \
            else CapturedTeachers(teacher_signals, kd, rows, self.args.device)
        self.teachers = self.source.models
        if features is not None and features.active and not self.teachers:
            raise ValueError("feature alignment needs teacher models; captures hold logit "
                             "signals only")
        self.meter = StepMeter()
        self.on_policy = on_policy
        self.features: FeatureAlignment | None = None
        if features is not None and features.active:
            self.features = FeatureAlignment(features, self.model, self.teachers)
            self.features.to(self.args.device)
            self.add_callback(ProjectionUpdates(self.features))
            logger.info("feature alignment (%s), layer map:\n%s", ", ".join(features.active),
                        self.features.describe())

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor]:
        """The step's micro-batches and its counted tokens, summed over all processes."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.on_policy is not None:  # generated before counting: the count is theirs
            step, student = self.state.global_step, self.accelerator.unwrap_model(self.model)
            batches = [self.on_policy.rollout(student, b, step, k)
                       if self.on_policy.chosen(step, k) else b for k, b in enumerate(batches)]
        count = torch.zeros((), dtype=torch.long, device=device)
        for batch in batches:
            count += (shift_labels(batch["labels"]) != IGNORE_INDEX).sum().to(device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """In training: this micro-batch's summed loss / the step's counted tokens (times the
        process count, which DDP's gradient averaging divides out). Otherwise the mean over
        this batch's counted tokens."""
        loss_sum, counted = self.distill_loss_sum(model, inputs)
        if model.training and num_items_in_batch is not None:
            scale = self.args.world_size / num_items_in_batch.clamp(min=1)
            loss = loss_sum * scale
        else:
            loss = loss_sum / counted.clamp(min=1)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def distill_loss_sum(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over the batch's counted tokens, number of counted tokens).

        Feature terms (when configured) read captures of the same forwards and add their sums
        over the counted tokens; the normalization in `compute_loss` applies to every term
        alike.
        """
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        positions = inputs.get("position_ids")  # packed rows (fastkd.distill.packing)
        targets = shift_labels(inputs["labels"])
        measure = model.training and self._logs_this_step()
        found: dict[str, Any] = {}
        kd = self.on_policy.kd if inputs.get("on_policy") else self.kd

        def logit_term(student_hidden: torch.Tensor, student: Head) -> torch.Tensor:
            # Runs inside the student's forward (see `loss_in_forward`). On logging steps the
            # same call also hands back the logit term's parts (no second loss call).
            logit_sum, found["mixing"], *parts = self.source.loss(
                kd, student_hidden, student, signals, targets, return_parts=measure)
            if measure:
                found["parts"] = parts[0]
            return logit_sum

        with ExitStack() as captures:
            features = self._record_features(captures, model)
            signals = self.source.batch(inputs)
            logit_sum = loss_in_forward(model, ids, mask, self.student_rows, logit_term,
                                        positions)
        mixing = found["mixing"]
        counted_mask = targets != IGNORE_INDEX
        loss_sum, feature_parts = logit_sum, {}
        if self.features is not None:
            feature_sum, feature_parts = self.features(*features, mask, counted_mask, mixing)
            loss_sum = logit_sum + feature_sum
        self.meter.add_tokens(int(ids.numel() if mask is None else mask.sum()))
        if measure:
            self._measure(found["parts"], mixing, counted_mask, feature_parts)
        return loss_sum, counted_mask.sum()

    def _record_features(
        self, captures: ExitStack, model: nn.Module
    ) -> tuple[Features, list[Features]] | None:
        """Enter the feature captures of the student and every teacher (None: no features)."""
        if self.features is None:
            return None
        student = captures.enter_context(self.features.record_student(model))
        teachers = [captures.enter_context(self.features.record_teacher(k, t))
                    for k, t in enumerate(self.teachers)]
        return student, teachers

    def _logs_this_step(self) -> bool:
        """Whether the Trainer logs at the end of the optimizer step now being computed."""
        step = self.state.global_step + 1
        every = self.args.logging_strategy == "steps" and step % self.state.logging_steps == 0
        return every or (step == 1 and self.args.logging_first_step)

    def _measure(
        self,
        logit_parts: LogitParts,
        mixing: torch.Tensor | None,
        counted_mask: torch.Tensor,
        feature_parts: dict[str, torch.Tensor],
    ) -> None:
        """Record the logit term's parts (the divergence and the CE summed over counted tokens),
        each feature term, and the mean mixing weight of each teacher over counted tokens."""
        sums = logit_parts.sums()
        sums.update({f"feature_{name}": v.item() for name, v in feature_parts.items()})
        if mixing is not None:
            w = (mixing.float() * counted_mask.unsqueeze(-1)).sum(dim=(0, 1))
            sums.update({f"mixing_w{k}": v for k, v in enumerate(w.tolist())})
        self.meter.add(float(counted_mask.sum()), sums)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the meter's averages (parts, mixing, tokens/s, memory) to training logs."""
        if "loss" in logs:
            logs = {**logs, **self.meter.flush()}
            if self.on_policy is not None:
                logs.update(self.on_policy.flush())
        super().log(logs, start_time)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus a parameter group for the feature projections."""
        optimizer = super().create_optimizer(model)
        if self.features is not None and not any(
            group.get("name") == "feature_projections" for group in optimizer.param_groups
        ):
            optimizer.add_param_group({"params": list(self.features.parameters()),
                                       "weight_decay": self.args.weight_decay,
                                       "name": "feature_projections"})
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Checkpoint the training state, the feature projections included (they are not part
        of the student model that `save_model` exports)."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.features is not None and self.args.should_save:
            self.features.projections.save(output_dir)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The Trainer's warnings on loading a checkpoint, less the tied weights: a tied
        lm_head (Qwen2's, shared with the embedding) is not saved, and it is loaded through
        the weight it shares."""
        tied = _tied_aliases(self.model)
        missing = [key for key in load_result.missing_keys if key not in tied]
        if len(missing) != len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the training state of a checkpoint, the feature projections included."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.features is not None and checkpoint is not None:
            self.features.projections.load(checkpoint)


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied weights)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases

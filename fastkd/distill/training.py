"""`transformers.TrainingArguments` from a `DistillConfig`, and plain cross-entropy training
under the same settings (the demo's teacher and its CE-only baseline)."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, Trainer, TrainingArguments

from .config import DistillConfig
from .data import CausalCollator


def training_arguments(cfg: DistillConfig, output_dir: str | Path) -> TrainingArguments:
    """TrainingArguments for `cfg`; `cfg.training_args` adds or overrides any of them."""
    base = dict(
        output_dir=str(output_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        bf16=cfg.bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        report_to=list(cfg.report_to),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every student parameter reaches the loss
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    try:
        return TrainingArguments(**{**base, **cfg.training_args})
    except TypeError as err:
        raise ValueError(f"config key 'training_args': {err}") from err


def train_ce(
    model: PreTrainedModel, train: Dataset, cfg: DistillConfig, output_dir: str | Path,
    pad_token_id: int,
) -> PreTrainedModel:
    """Train `model` with next-token cross-entropy (the model's own loss) for `cfg.steps`."""
    trainer = Trainer(model=model, args=training_arguments(cfg, output_dir), train_dataset=train,
                      data_collator=CausalCollator(pad_token_id))
    trainer.train()
    return model


def end_process_group() -> None:
    """Tear the process group down at the end of a torchrun job (nothing otherwise).

    A process that exits with its process group alive can abort in the collective library's
    destructor ("terminate called without an active exception"). No barrier first: a
    collective right before the teardown can leave gloo's worker thread releasing it while the
    group is destroyed, and that deadlocks on CPU.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

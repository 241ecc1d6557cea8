"""On-policy distillation: for a fraction lambda of the batches, the student samples completions
of the batch's prompts, the teacher scores them, and the loss counts the completion tokens only.

`OnPolicySettings` (on_policy_settings.py) holds the settings. `OnPolicyRollouts` turns a
chosen batch into prompt + completion with the prompt's labels ignored, and keeps the metrics
(mean completion length, generation time per step).

Prompts come from `PromptSource`: by default the first `prompt_tokens` tokens of each block of
plain text (`block_prefix`); a batch that carries its own prompts (`prompt_ids` and
`prompt_mask`, left-padded, as a chat collator gives them) uses those instead.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .loss import IGNORE_INDEX, LogitKD
from .on_policy_settings import OnPolicySettings

# (batch, prompt_tokens) -> (prompt ids (B, P) left-padded, prompt mask (B, P))
PromptSource = Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, torch.Tensor]]


def block_prefix(batch: dict[str, torch.Tensor], prompt_tokens: int) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """The batch's prompts, in this order of preference:

    - its own (`prompt_ids`, `prompt_mask`) when it carries them;
    - for unpacked conversation rows (chat or prompt/completion data with the assistant-only
      loss: every row starts with uncounted tokens, labels IGNORE_INDEX), each row's tokens
      before its first counted one (system, user turn and the assistant header), left-padded;
    - else the first min(prompt_tokens, shortest row) tokens of every row (so no prompt holds
      padding).
    """
    if "prompt_ids" in batch:
        return batch["prompt_ids"], batch["prompt_mask"]
    mask = batch["attention_mask"]
    conversations = _conversation_prompts(batch)
    if conversations is not None:
        return conversations
    width = min(prompt_tokens, int(mask.sum(dim=1).min()))
    return batch["input_ids"][:, :width], mask[:, :width]


def _conversation_prompts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                     torch.Tensor] | None:
    """Each row's uncounted head, left-padded, when the rows are single unpacked
    conversations whose heads are all nonempty; else None."""
    if "position_ids" in batch or "labels" not in batch:
        return None  # packed rows hold several documents: no one prompt per row
    counted = (batch["labels"] != IGNORE_INDEX) & batch["attention_mask"].bool()
    if not counted.any(dim=1).all():
        return None
    heads = counted.int().argmax(dim=1)  # index of each row's first counted token
    if int(heads.min()) == 0:
        return None  # plain text: the first token counts, so there is no prompt to cut
    width = int(heads.max())
    ids = batch["input_ids"].new_zeros(len(heads), width)
    prompt_mask = torch.zeros_like(ids)
    for row, head in enumerate(heads.tolist()):
        ids[row, width - head:] = batch["input_ids"][row, :head]
        prompt_mask[row, width - head:] = 1
    return ids, prompt_mask


class OnPolicyRollouts:
    """Replaces a fraction `settings.lmbda` of the training batches by student rollouts.

    Which batches, and what is sampled, depend only on (seed, step, micro-batch index): a
    resumed or repeated run generates the same completions, and the global random state is
    left as it was.

    Args:
        settings: the on-policy settings.
        kd: the loss of generated batches (the run's, with the on-policy divergence, and no
            cross-entropy on sampled tokens).
        seed: the run's seed.
        pad_token_id: fills completions after EOS.
        eos_token_id: ends a completion (kept, counted), as do the stop tokens of the
            student's generation_config (Llama 3 lists several); with neither, completions run
            to max_new_tokens.
        prompts: where prompts come from (default `block_prefix`).
    """

    def __init__(self, settings: OnPolicySettings, kd: LogitKD, seed: int, pad_token_id: int,
                 eos_token_id: int | None, prompts: PromptSource = block_prefix) -> None:
        self.settings = settings
        self.kd = dataclasses.replace(kd, divergence=settings.divergence, beta=settings.beta,
                                      soft_weight=1.0, hard_weight=0.0)
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.prompts = prompts
        self._reset()

    def _reset(self) -> None:
        self._seconds = 0.0
        self._completions = 0
        self._completion_tokens = 0
        self._batches = 0
        self._generated = 0
        self._steps: set[int] = set()

    def chosen(self, step: int, index: int) -> bool:
        """Whether micro-batch `index` of optimizer step `step` is generated."""
        self._batches += 1
        return random.Random(f"{self.seed}/{step}/{index}").random() < self.settings.lmbda

    @torch.no_grad()
    def rollout(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int,
                index: int) -> dict[str, Any]:
        """The batch as prompt + sampled completion.

        Args:
            model: the student (unwrapped: `generate` is called on it, in eval mode).
            batch: input_ids, attention_mask (B, T) (and optionally prompt_ids, prompt_mask).

        Returns:
            input_ids, attention_mask (B, P + L) and labels (IGNORE_INDEX on the prompt, on
            padding and after EOS; the loss shifts them, so the prompt's last position scores
            the first sampled token), and `on_policy: True`.
        """
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in self.prompts(batch,
                                                                       self.settings.prompt_tokens))
        stops = _stop_ids(self.eos_token_id, model)
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(hash((self.seed, step, index)) % 2**62)
                sequences = model.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                    temperature=self.settings.temperature, top_k=0, top_p=1.0,
                    max_new_tokens=self.settings.max_new_tokens,
                    pad_token_id=self.pad_token_id, eos_token_id=stops or None,
                    use_cache=not _checkpointing(model),
                )
        finally:
            model.train(was_training)
        completion = sequences[:, prompt_ids.shape[1]:]
        completion_mask = _until_stop(completion, stops)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        ids = sequences.masked_fill(mask == 0, self.pad_token_id)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[:, :prompt_ids.shape[1]] = IGNORE_INDEX
        self._seconds += time.perf_counter() - start
        self._completions += completion.shape[0]
        self._completion_tokens += int(completion_mask.sum())
        self._generated += 1
        self._steps.add(step)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "on_policy": True}

    def flush(self) -> dict[str, float]:
        """Metrics since the last flush: the fraction of generated batches, the mean completion
        length (tokens, EOS included), generation seconds per optimizer step that generated."""
        out = {}
        if self._batches:
            out["on_policy_fraction"] = self._generated / self._batches
        if self._generated:
            out["on_policy_completion_len"] = self._completion_tokens / self._completions
            out["on_policy_generation_s"] = self._seconds / len(self._steps)
        self._reset()
        return out


def _stop_ids(eos_token_id: int | None, model: nn.Module) -> list[int]:
    """The tokens that end a completion: `eos_token_id` and the model's generation_config's."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = [] if config is None else [config] if isinstance(config, int) else list(config)
    return sorted({*found, *([] if eos_token_id is None else [eos_token_id])})


def _until_stop(completion: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """(B, L) 1 up to and including each row's first stop token, 0 after it."""
    if not stops:
        return torch.ones_like(completion)
    is_stop = torch.isin(completion, torch.tensor(stops, device=completion.device)).long()
    after = (is_stop.cumsum(dim=1) - is_stop) > 0
    return (~after).long()


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on: generation then runs without a KV
    cache (transformers 5 renamed the attribute)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def rollouts_from_config(
    value: float | dict[str, Any] | None, kd: LogitKD, seed: int, pad_token_id: int,
    eos_token_id: int | None, prompts: PromptSource = block_prefix,
) -> OnPolicyRollouts | None:
    """The rollouts of `DistillConfig.on_policy` (`value`), or None when it is unset or its
    lambda is 0: such a run trains exactly as one without on-policy batches."""
    settings = OnPolicySettings.from_value(value)
    if settings is None or settings.lmbda == 0:
        return None
    return OnPolicyRollouts(settings, kd, seed, pad_token_id, eos_token_id, prompts)

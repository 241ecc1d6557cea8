"""LoRA students via peft: `lora: {r, alpha, dropout, target_modules}` in the config.

The fused loss reads the student's base lm_head weight, so the adapters train through the hidden
states the decoder produces; an adapter on the lm_head itself would be left out of the loss, so
a `target_modules` that names it is refused. QLoRA (`qlora: true`) loads the base in 4-bit NF4
through bitsandbytes (CPU or CUDA) with double quantization; transformers keeps the output layer
unquantized, so the fused loss reads a full-precision lm_head as with LoRA, and the adapters
compute in the training precision. The Trainer saves a `PeftModel` as its adapter (checkpoints
and the final student) and resumes from the adapter; `merge_lora` also writes the merged full
model (for QLoRA: the adapters merged into the full-precision base, reloaded from its source,
not into the 4-bit weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

# names peft matches against a module path's last part; these are a causal LM's output layer
_OUTPUT_LAYERS = ("lm_head", "embed_out", "output")


@dataclass(frozen=True)
class LoraSettings:
    """Adapter settings: rank r, scale alpha / r, dropout on the adapter input, and the module
    names (or peft's "all-linear", which leaves the output layer out) to adapt."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    qlora: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraSettings:
        """Build from the config's `lora` mapping; unknown keys and bad values raise naming
        the key."""
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                raise ValueError(f"unknown lora key {key!r}; expected some of {names}")
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, int | float) or isinstance(self.alpha, bool) or \
                not self.alpha > 0:
            raise ValueError(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.qlora, bool):
            raise TypeError(f"lora.qlora must be true or false, got {self.qlora!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = [targets]
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise TypeError(f"lora.target_modules must be a module name or a list of them, got "
                            f"{self.target_modules!r}")
        adapted_head = [t for t in targets if t.split(".")[-1] in _OUTPUT_LAYERS]
        if adapted_head:
            raise ValueError(
                f"lora.target_modules names the output layer ({', '.join(adapted_head)}): the "
                "fused loss reads the base lm_head weight, so an lm_head adapter would not "
                "train; adapt the decoder's modules only"
            )

    def check_runtime(self) -> None:
        """peft must be installed, and bitsandbytes for QLoRA."""
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ValueError("lora needs the peft package: pip install 'fastkd[train]'")
        if self.qlora and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("lora.qlora (a 4-bit base) needs the bitsandbytes package: "
                             "pip install 'fastkd[qlora]'")

    def quantization_config(self, compute_dtype: torch.dtype) -> Any | None:
        """The `from_pretrained` quantization of the student's base: 4-bit NF4 with double
        quantization for QLoRA (matmuls in `compute_dtype`), None for LoRA."""
        if not self.qlora:
            return None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)

    def apply(self, student: Any, seed: int = 0) -> Any:
        """`student` wrapped as a peft `PeftModel` whose adapters alone train; `seed` sets
        the adapters' random initialization (the run's seed: the same run, the same start)."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import set_seed

        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, task_type="CAUSAL_LM")
        from peft.tuners.lora import LoraLayer

        if self.qlora:
            _check_full_precision_head(student)
            # freezes the base and keeps its unquantized parameters (norms, embeddings, head)
            # in fp32; gradient checkpointing stays the training arguments' choice
            student = prepare_model_for_kbit_training(student, use_gradient_checkpointing=False)
        set_seed(seed)
        model = get_peft_model(student, config)
        if isinstance(model.get_output_embeddings(), LoraLayer):
            raise ValueError(
                f"lora.target_modules {self.target_modules!r} matches the output layer: the "
                "fused loss reads the base lm_head weight, so an lm_head adapter would not "
                "train; adapt the decoder's modules only"
            )
        return model

    def merged(self, student: Any, load_base: Callable[[], Any], adapters: Path) -> Any:
        """The student with its adapters merged in: into its own base for LoRA; for QLoRA the
        adapters saved at `adapters` merged into the full-precision base `load_base()` loads
        (merging into 4-bit weights would round the merged weights to NF4)."""
        if not self.qlora:
            return student.merge_and_unload()
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(), str(adapters)).merge_and_unload()


def _check_full_precision_head(student: Any) -> None:
    """The fused loss multiplies by the lm_head weight itself: a quantized one is refused."""
    head = student.get_output_embeddings()
    if head is None or head.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            "lora.qlora: the student's output layer is quantized "
            f"({None if head is None else head.weight.dtype}); the fused loss needs a "
            "full-precision lm_head (leave it out of the quantization)"
        )

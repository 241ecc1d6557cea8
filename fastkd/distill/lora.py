"""LoRA students via peft: `lora: {r, alpha, dropout, target_modules}` in the config.

The fused loss reads the student's base lm_head weight, so the adapters train through the hidden
states the decoder produces; an adapter on the lm_head itself would be left out of the loss, so
a `target_modules` that names it is refused. QLoRA (a 4-bit base) needs bitsandbytes and CUDA
and is refused here (not supported yet). The Trainer saves a `PeftModel` as its adapter
(checkpoints and the final student) and resumes from the adapter; `merge_lora` also writes the
merged full model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

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
        """peft must be installed; QLoRA is refused (it needs bitsandbytes and CUDA)."""
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ValueError("lora needs the peft package: pip install 'fastkd[train]'")
        if self.qlora:
            raise ValueError("lora.qlora (a 4-bit quantized base) is not supported: it needs "
                             "bitsandbytes and a CUDA device; use a full-precision LoRA base")

    def apply(self, student: Any, seed: int = 0) -> Any:
        """`student` wrapped as a peft `PeftModel` whose adapters alone train; `seed` sets
        the adapters' random initialization (the run's seed: the same run, the same start)."""
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, task_type="CAUSAL_LM")
        from peft.tuners.lora import LoraLayer

        set_seed(seed)
        model = get_peft_model(student, config)
        if isinstance(model.get_output_embeddings(), LoraLayer):
            raise ValueError(
                f"lora.target_modules {self.target_modules!r} matches the output layer: the "
                "fused loss reads the base lm_head weight, so an lm_head adapter would not "
                "train; adapt the decoder's modules only"
            )
        return model

"""`OnPolicySettings`: the settings of on-policy batches (`DistillConfig.on_policy`), checked
without importing torch (the config checks run before any heavy import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DIVERGENCES = ("kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class OnPolicySettings:
    """Settings of on-policy batches (`DistillConfig.on_policy`: a number, the lambda, or a
    mapping of these fields, `lambda` for `lmbda`).

    Attributes:
        lmbda: fraction of the batches (chosen at random, seeded) that are generated, in [0, 1].
        temperature: the student's sampling temperature (> 0); the loss keeps the run's.
        max_new_tokens: tokens sampled per prompt (fewer where EOS comes first).
        prompt_tokens: prompt length taken from each block of plain text.
        divergence: the loss on generated tokens, one of `DIVERGENCES` (default reverse KL).
        beta: the JSD mixing coefficient, for divergence "jsd".
    """

    lmbda: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 32
    prompt_tokens: int = 16
    divergence: str = "reverse_kl"
    beta: float = 0.5

    def __post_init__(self) -> None:
        for name, kind in (("lmbda", float), ("temperature", float), ("beta", float),
                           ("max_new_tokens", int), ("prompt_tokens", int),
                           ("divergence", str)):
            value = getattr(self, name)
            ok = isinstance(value, str) if kind is str else (
                isinstance(value, int | float) and not isinstance(value, bool)
                and (kind is float or isinstance(value, int)))
            if not ok:
                raise TypeError(f"on_policy {_key(name)} expects {kind.__name__}, got {value!r}")
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"on_policy lambda must be in [0, 1], got {self.lmbda}")
        if not self.temperature > 0:
            raise ValueError(f"on_policy temperature must be > 0, got {self.temperature}")
        for name in ("max_new_tokens", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"on_policy {name} must be >= 1, got {getattr(self, name)}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown on_policy divergence {self.divergence!r}; expected one "
                             f"of {DIVERGENCES}")
        if self.divergence == "jsd" and not 0 <= self.beta <= 1:
            raise ValueError(f"on_policy beta must be in [0, 1] for divergence 'jsd', got "
                             f"{self.beta}")

    @classmethod
    def from_value(cls, value: float | dict[str, Any] | None) -> OnPolicySettings | None:
        """From `DistillConfig.on_policy`: None (off), a number (lambda) or a mapping."""
        if value is None:
            return None
        if not isinstance(value, dict):
            return cls(lmbda=value)
        names = {_key(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown on_policy key(s) {unknown}; expected some of "
                             f"{sorted(names)}")
        return cls(**{names[k]: _number(v) for k, v in value.items()})

    def check_lengths(self, seq_len: int, name: str = "seq_len") -> None:
        """Prompt plus completion must fit the run's seq_len (checked against the models)."""
        if self.prompt_tokens + self.max_new_tokens > seq_len:
            raise ValueError(
                f"on_policy prompt_tokens + max_new_tokens = {self.prompt_tokens} + "
                f"{self.max_new_tokens} exceeds {name}={seq_len}"
            )


def _key(name: str) -> str:
    """The config key of a field (`lambda` is a Python keyword)."""
    return "lambda" if name == "lmbda" else name


def _number(value: Any) -> Any:
    """A numeric string from YAML 1.1 ('1e-1') as the float it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value

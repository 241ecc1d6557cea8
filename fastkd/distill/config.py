"""`DistillConfig`: every setting of a distillation run, loadable from YAML or JSON.

Unknown keys, values of the wrong type and unknown divergence / weighting / fusion names raise
`ValueError` or `TypeError` naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import FORMATS
from .features.settings import FeatureSettings
from .model_entries import MODEL_DTYPES, ModelEntry
from .on_policy_settings import OnPolicySettings

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
WEIGHTINGS = ("entropy", "static")
FUSIONS = ("mixture", "weighted_kl")
DEMO_SCALES = ("default", "tiny")
TAILS = ("bucket", "renormalize")
CAPTURE_KINDS = ("topk", "hidden")  # fastkd.distill.signals.KINDS, without its torch import
CAPTURE_DTYPES = ("float32", "bfloat16", "float16")
TEACHER_DTYPES = ("bf16", "fp16", "fp32")
TEACHER_SHARDINGS = ("none", "fsdp")
BEST_METRICS = ("eval_kd_loss", "eval_perplexity")
REPORTERS = ("tensorboard", "wandb")


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with a help text (used by the CLI) and extra argparse options."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class DistillConfig:
    """Settings of a distillation run. With no `student` and no `teachers`, the CLI runs the
    embedded synthetic demo (see `fastkd.distill.demo`)."""

    # models and data
    student: str | dict[str, Any] | None = _opt(
        None, "student model directory or hub id (Hugging Face format); in a file also a "
        "mapping {path, revision, dtype, attn_implementation} of its own load options")
    teachers: list[str | dict[str, Any]] = _opt(
        [], "teacher model directories or hub ids; several -> multi-teacher; in a file each "
        "also a mapping {path, revision, dtype, attn_implementation}")
    tokenizer: str | None = _opt(None, "tokenizer directory or hub id (default: the student's)")
    revision: str | None = _opt(None, "the student's hub revision (branch, tag or commit)")
    teacher_revisions: list[str] | None = _opt(None, "hub revision of each teacher", nargs="+")
    dtype: str | None = _opt(None, f"weights dtype of the loaded models, one of {MODEL_DTYPES} "
                             "(default: transformers'; a model entry's own dtype wins); "
                             "torch_dtype is another name for it")
    attn_implementation: str | None = _opt(None, "attention of every model: eager, sdpa, "
                                           "flash_attention_2... (default: transformers'; a "
                                           "model entry's own wins)")
    data: str | None = _opt(None, "training data: a text / JSON lines / parquet file or folder")
    eval_data: str | None = _opt(None, "held-out data (same formats) for perplexity at the end")
    text_field: str = _opt("text", "column holding the text")
    data_format: str = _opt("auto", "text, messages (chat template), prompt_completion, or auto "
                            "(from the columns: messages, prompt + completion, text_field)")
    assistant_only_loss: bool = _opt(True, "messages / prompt_completion data: KD and CE only "
                                     "on assistant / completion tokens")
    seq_len: int = _opt(512, "tokens per training sequence")
    packing: bool = _opt(True, "concatenate documents into seq_len blocks (positions restart "
                         "and attention stays within each document)")
    teacher_signals: list[str] = _opt(
        [], "captured teacher signals (folders written by fastkd capture) to train from "
        "instead of teacher models: no teacher is loaded; several -> multi-teacher")
    # loss
    divergence: str = _opt("kl", f"one of {DIVERGENCES} (one teacher)")
    beta: float = _opt(0.5, "JSD mixing coefficient in [0, 1] (0: forward KL, 1: reverse KL)")
    alpha: float = _opt(0.9, "skew_kl / skew_reverse_kl mixing coefficient in (0, 1] (1: plain "
                        "KL / reverse KL; DistiLLM's lambda is 1 - alpha)")
    temperature: float = _opt(1.0, "softmax temperature of the soft targets")
    soft_weight: float = _opt(1.0, "weight of the divergence to the teacher(s)")
    hard_weight: float = _opt(0.0, "weight of cross-entropy on the data labels")
    weighting: str = _opt("entropy", f"multi-teacher mixing weights, one of {WEIGHTINGS}")
    entropy_tau: float = _opt(1.0, "entropy weighting temperature")
    teacher_priors: list[float] | None = _opt(None, "multi-teacher prior weights", nargs="+")
    fusion: str = _opt("mixture", f"multi-teacher fusion, one of {FUSIONS}")
    topk_tail: str = _opt("bucket", "top-k captures: 'bucket' (KL over the top-k ids plus one "
                          "bucket of the rest) or 'renormalize' (top-k ids only, both "
                          "distributions renormalized on them)")
    on_policy: float | dict[str, Any] | None = _opt(
        None, "on-policy distillation: the fraction LAMBDA of batches whose completions the "
        "student samples (in a file also a mapping: lambda, temperature, max_new_tokens, "
        "prompt_tokens, divergence (reverse_kl by default), beta)", metavar="LAMBDA")
    backend: str = _opt("auto", "fastkd backend: auto, triton, torch, cpp (C++, CPU) or cuda "
                               "(CUDA C++)")
    # feature alignment of mapped layers (0 = off)
    hidden_weight: float = _opt(0.0, "weight of hidden-state alignment (learned projections)")
    hidden_loss: str = _opt("relative_mse", "hidden-state loss: relative_mse "
                            "(||P x_s - x_t||^2 / ||x_t||^2), mse or cosine")
    attention_weight: float = _opt(0.0, "weight of attention-map alignment")
    attention_loss: str = _opt("kl", "attention alignment loss: mse or kl")
    relation_heads: int | None = _opt(None, "MiniLMv2 relation heads R, used where student and "
                                      "teacher query-head counts differ")
    ffn_weight: float = _opt(0.0, "weight of feed-forward (MLP output) alignment, MaKD")
    ffn_loss: str = _opt("relative_mse", "feed-forward loss: relative_mse, mse or cosine")
    layer_map: str | list[list[int]] = _opt(
        "uniform", "'uniform' (student layer i -> teacher round((i+1) Lt / Ls) - 1) or "
        "student:teacher pairs 's:t,s:t'")
    # optimisation
    steps: int = _opt(1000, "optimizer steps")
    batch_size: int = _opt(8, "sequences per device per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(5e-5, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    bf16: bool = _opt(False, "bf16 mixed precision (GPU)")
    seed: int = _opt(0, "random seed")
    # bookkeeping
    output_dir: str = _opt("runs/distill", "checkpoints, metrics.jsonl and the final student")
    resume: str | None = _opt(None, "resume: 'latest' or a checkpoint folder", nargs="?",
                              const="latest")
    logging_steps: int = _opt(10, "log every N steps (metrics.jsonl, progress bar)")
    save_steps: int = _opt(500, "checkpoint every N steps")
    training_args: dict[str, Any] = _opt({}, "extra transformers.TrainingArguments (file only)")
    demo_scale: str = _opt("default", f"embedded demo size, one of {DEMO_SCALES}; the scale "
                           "sets the demo's steps, batch size and learning rate")
    ablation: bool = _opt(False, "embedded demo only: train the student with CE only, logit KD, "
                          "+ hidden, + attention, + FFN and all terms; print perplexities")
    # fastkd capture (flags of that command: --kind, --k, --out, ...)
    capture_kind: str = _opt("topk", f"what to capture, one of {CAPTURE_KINDS}: the k largest "
                             "logits with the full logsumexp, or final hidden states plus "
                             "one copy of the lm_head", capture="--kind")
    capture_k: int = _opt(32, "top-k width (kind topk)", capture="--k")
    capture_out: str | None = _opt(None, "folder to write the capture to (several teachers: "
                                   "one teacher<k> subfolder each)", capture="--out")
    capture_temperatures: list[float] | None = _opt(
        None, "temperatures a topk capture serves (its logsumexp at each); default: "
        "temperature", capture="--temperatures")
    capture_dtype: str | None = _opt(None, f"storage dtype, one of {CAPTURE_DTYPES}; default "
                                     "float32 for top-k logits, bfloat16 for hidden states",
                                     capture="--dtype")
    capture_rows_per_shard: int = _opt(1024, "token blocks per shard file",
                                       capture="--rows-per-shard")
    # LoRA students, teacher memory, evaluation during training (see lora.py, teacher_shard.py,
    # evaluate.py)
    lora: dict[str, Any] | None = _opt(None, "LoRA student via peft: {r, alpha, dropout, "
                                       "target_modules} (file only)")
    merge_lora: bool = _opt(False, "with lora: also save the merged student to output_dir/merged")
    teacher_dtype: str | None = _opt(None, f"teacher weights' dtype, one of {TEACHER_DTYPES} "
                                     "(default: bf16 with --bf16, else the checkpoint's)")
    teacher_sharding: str = _opt("none", f"under torchrun, one of {TEACHER_SHARDINGS}: fsdp "
                                 "shards each teacher decoder layer over the processes")
    eval_steps: int | None = _opt(None, "evaluate on eval_data every N steps (KD loss, CE, "
                                  "perplexity)")
    save_best: bool = _opt(False, "with eval_steps: keep the best student in output_dir/best")
    best_metric: str = _opt("eval_kd_loss", f"save_best's criterion, one of {BEST_METRICS} "
                            "(lower is better)")
    report_to: list[str] = _opt([], f"where logs also go: {REPORTERS}")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("backend", self.backend, ("auto", "triton", "torch", "cpp", "cuda"))
        _check_choice("demo_scale", self.demo_scale, DEMO_SCALES)
        _check_choice("data_format", self.data_format, FORMATS)
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, MODEL_DTYPES)
        if self.teacher_revisions is not None and len(self.teacher_revisions) != len(
            self.teachers
        ):
            raise ValueError(f"teacher_revisions has {len(self.teacher_revisions)} entries for "
                             f"{len(self.teachers)} teachers")
        self._check_model_entries()
        _check_choice("topk_tail", self.topk_tail, TAILS)
        _check_choice("capture_kind", self.capture_kind, CAPTURE_KINDS)
        if self.capture_dtype is not None:
            _check_choice("capture_dtype", self.capture_dtype, CAPTURE_DTYPES)
        for name in ("steps", "batch_size", "grad_accum", "logging_steps", "save_steps",
                     "capture_k", "capture_rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a token predicts the next one), got "
                             f"{self.seq_len}")
        for name in ("temperature", "entropy_tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        temperatures = self.capture_temperatures
        if temperatures is not None and not (
            temperatures and all(math.isfinite(t) and t > 0 for t in temperatures)
        ):
            raise ValueError(f"capture_temperatures must be > 0, got {temperatures}")
        for name in ("learning_rate", "weight_decay", "warmup_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        priors = self.teacher_priors
        if priors is not None and not (
            all(math.isfinite(p) and p >= 0 for p in priors) and sum(priors) > 0
        ):
            raise ValueError(f"teacher_priors must be >= 0 with a positive sum, got "
                             f"{self.teacher_priors}")
        if self.soft_weight < 0 or self.hard_weight < 0 or self.soft_weight + self.hard_weight == 0:
            raise ValueError(
                f"soft_weight and hard_weight must be >= 0 and not both 0, got "
                f"{self.soft_weight} and {self.hard_weight}"
            )
        if self.divergence == "jsd" and not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1] for divergence 'jsd', got {self.beta}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not self.teacher_signals:  # a folder of captures may hold several: checked on opening
            self.check_teacher_count(len(self.teachers))
        if self.teachers and self.teacher_signals:
            raise ValueError("name teachers (models run on each batch) or teacher_signals "
                             "(captures of them), not both")
        if self.teacher_signals and FeatureSettings.from_config(self).active:
            raise ValueError("feature alignment (hidden_weight, attention_weight, ffn_weight) "
                             "needs teacher models run on each batch; a capture holds only "
                             "logit signals: drop teacher_signals or the feature weights")
        if self.ablation and not self.is_demo:
            raise ValueError("ablation runs on the embedded demo: name no student or teachers")
        # checks the feature weights, loss names, relation_heads and layer_map
        FeatureSettings.from_config(self)
        on_policy = OnPolicySettings.from_value(self.on_policy)
        if on_policy is not None:
            if self.teacher_signals and on_policy.lmbda > 0:
                raise ValueError("on_policy needs teacher models to score the student's "
                                 "samples; teacher_signals hold a capture of fixed data")
            if self.ablation:
                raise ValueError("on_policy is not one of the ablation's runs; the demo "
                                 "(no --ablation) trains an on-policy student beside the KD one")
            if not self.is_demo:  # the demo checks against its own sequence length
                on_policy.check_lengths(self.seq_len)
            if len(self.teachers) > 1 and on_policy.divergence != "kl":
                raise ValueError(f"on_policy divergence {on_policy.divergence!r} is for one "
                                 "teacher; several teachers are fused (on_policy divergence: "
                                 "kl)")
        self._check_training_extras()

    def check_teacher_count(self, count: int) -> None:
        """The settings that depend on the number of teachers (models or captures)."""
        if count > 1 and self.divergence != "kl":
            raise ValueError(
                f"divergence {self.divergence!r} is for one teacher; several teachers are fused "
                "by KL to their mixture or by weighted per-teacher KLs (fusion: "
                f"{' or '.join(FUSIONS)})"
            )
        if self.teacher_priors is not None and len(self.teacher_priors) != count:
            raise ValueError(
                f"teacher_priors has {len(self.teacher_priors)} entries for {count} teachers"
            )

    @property
    def student_entry(self) -> ModelEntry | None:
        """The student's path and own load options (None: no student named)."""
        return None if self.student is None else ModelEntry.parse(self.student, "student")

    @property
    def teacher_entries(self) -> list[ModelEntry]:
        """Each teacher's path and own load options."""
        return [ModelEntry.parse(t, f"teachers[{k}]") for k, t in enumerate(self.teachers)]

    def _check_model_entries(self) -> None:
        """Every model entry parses, and no revision is given twice (the entry's and a global
        one)."""
        student = self.student_entry
        if student is not None and student.revision is not None and self.revision is not None:
            raise ValueError("student sets its own revision and revision is given too; name "
                             "the student's revision in one place")
        for k, (entry, global_revision) in enumerate(zip(
                self.teacher_entries, self.teacher_revisions or [None] * len(self.teachers),
                strict=True)):
            if entry.revision is not None and global_revision is not None:
                raise ValueError(f"teachers[{k}] sets its own revision and teacher_revisions "
                                 "gives one too; name its revision in one place")

    def _check_training_extras(self) -> None:
        """LoRA, teacher memory, evaluation and reporting settings."""
        if self.teacher_dtype is not None:
            _check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        _check_choice("teacher_sharding", self.teacher_sharding, TEACHER_SHARDINGS)
        _check_choice("best_metric", self.best_metric, BEST_METRICS)
        for name in self.report_to:
            _check_choice("report_to entry", name, REPORTERS)
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {self.eval_steps}")
        if self.eval_steps is not None and self.eval_data is None and not self.is_demo:
            raise ValueError("eval_steps needs eval_data (the held-out data to evaluate on)")
        if self.save_best and self.eval_steps is None:
            raise ValueError("save_best needs eval_steps (the best is chosen at evaluations)")
        if self.merge_lora and self.lora is None:
            raise ValueError("merge_lora needs lora (there is no adapter to merge)")
        if self.lora is not None:
            from .lora import LoraSettings

            LoraSettings.from_dict(self.lora)

    @property
    def is_demo(self) -> bool:
        """True when no model is named: the CLI then runs the embedded synthetic demo."""
        return self.student is None and not self.teachers and not self.teacher_signals

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
        """Build from a mapping; a key that is not a field raises `ValueError` naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        if "torch_dtype" in values:  # transformers < 5 called `dtype` so
            if "dtype" in values:
                raise ValueError("give dtype or torch_dtype (the same setting), not both")
            values = {("dtype" if k == "torch_dtype" else k): v for k, v in values.items()}
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown config key {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> DistillConfig:
        """Load a `.yaml` / `.yml` or `.json` file holding a mapping of fields.

        A syntax error is a `ValueError` naming the file and the line. In YAML, a float written
        without a dot (`2e-5`) is a string under YAML 1.1's rules; float fields accept such
        numeric strings.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            values = _load_yaml(text, path)
            if isinstance(values, dict):
                values = _numbers_from_strings(values)
        elif path.suffix == ".json":
            try:
                values = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"config file {str(path)!r}, line {err.lineno}, column "
                                 f"{err.colno}: invalid JSON: {err.msg}") from None
        else:
            raise ValueError(f"config file {str(path)!r}: expected .yaml, .yml or .json")
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")
        return cls.from_dict(values)

    def check_runtime(self) -> None:
        """Checks that depend on this machine rather than on the values alone, run by the CLI
        before any model is loaded: the backend's device, and a writable output_dir."""
        if self.backend == "triton":
            import torch

            if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("backend 'triton' needs a CUDA device (none is available); "
                                 "use backend 'torch' or 'auto' on CPU, or set "
                                 "TRITON_INTERPRET=1 to run the kernels in Triton's "
                                 "interpreter (slow)")
        if self.backend in ("cpp", "cuda"):  # the device, and the C++ build (before any model)
            import torch

            from fastkd._checks import resolve_backend

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            resolve_backend(self.backend, device, native=True)
        check_writable_dir(self.output_dir)
        _check_reporters(self.report_to)
        if self.lora is not None:
            from .lora import LoraSettings

            LoraSettings.from_dict(self.lora).check_runtime()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _load_yaml(text: str, path: Path) -> Any:
    """`yaml.safe_load(text)`; a syntax error becomes a one-line `ValueError`."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = "" if mark is None else f", line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ValueError(f"config file {str(path)!r}{where}: invalid YAML: {detail}") from None


def _float_hint(hint: Any) -> bool:
    """Whether a field annotation holds floats (float, float | None, list[float] ...)."""
    if hint is float:
        return True
    return any(_float_hint(h) for h in typing.get_args(hint))


def _as_number(value: Any) -> Any:
    """A numeric string ('2e-5') as a float; anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [_as_number(v) for v in value]
    return value


def _numbers_from_strings(values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads `2e-5` (no dot) as a string: turn such strings into floats where the
    field holds floats."""
    hints = typing.get_type_hints(DistillConfig)
    return {key: _as_number(value) if _float_hint(hints.get(key)) else value
            for key, value in values.items()}


def check_writable_dir(path_text: str, name: str = "output_dir") -> None:
    """Folder `path_text` (or its nearest existing ancestor) must be one this process can
    write; `name` is the setting named in the error."""
    path = Path(path_text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path_text!r} is an existing file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ValueError(f"{name} {path_text!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path_text!r}: {str(existing)!r} is not writable")


def _check_reporters(report_to: list[str]) -> None:
    """Each `report_to` entry's package must be installed (tensorboard runs offline)."""
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "pip install 'fastkd[tensorboard]'"),
             "wandb": ("wandb", "pip install wandb")}
    for name in report_to:
        module, hint = needs[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"report_to {name!r}: the {module} package is not installed "
                             f"({hint})")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise `TypeError` when `value` does not match the field annotation `hint`."""
    if not _matches(value, hint):
        hint_text = ""
        if isinstance(value, str) and _float_hint(hint) and _as_number(value) != value:
            hint_text = " (a number given as a string: write it unquoted, e.g. 2.0e-5)"
        raise TypeError(f"config key {name!r} expects {hint}, got {value!r}{hint_text}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)

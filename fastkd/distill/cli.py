"""`fastkd distill`: flags mirror the fields of `DistillConfig` (`--seq-len` for seq_len, ...);
flags override a `--config` file. With no student and no teachers it runs the embedded demo.

The command parses and checks its settings before it imports transformers or loads a model, so
`--help` and every settings error come back at once, in one line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Sequence
from typing import Any

from . import missing_train_extra
from .config import DistillConfig


def _flag_options(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse options for one config field (bool -> --x/--no-x, list -> several values, also
    over repeated flags)."""
    # The default is shown, not set: a flag left out must not override a --config file.
    help_text = f.metadata["help"].replace("%", "%%")
    if "default" not in help_text:
        help_text += f" (default: {_shown(f)})"
    options: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    if hint is bool:
        return {**options, "action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list:
        # an item that may also be a mapping (teachers) is a string on the command line
        (item,) = typing.get_args(hint)
        kinds = [a for a in typing.get_args(item) or (item,) if typing.get_origin(a) is not dict]
        return {**options, "nargs": "+", "action": "extend", "type": kinds[0]}
    extra = {k: v for k, v in f.metadata.items() if k not in ("help", "capture")}
    return {**options, "type": hint, **extra}


def _shown(f: dataclasses.Field) -> str:
    """A field's default as the help text shows it."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is None or default == []:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default).replace("%", "%%")


# the fields `fastkd capture` takes as flags besides its own (capture_*): the data pipeline
# and the teachers, which a capture must share with the training runs that read it
CAPTURE_FIELDS = ("student", "teachers", "tokenizer", "data", "text_field", "seq_len",
                  "packing", "temperature", "batch_size", "bf16")


def _file_only(hint: Any) -> bool:
    """Mappings (training_args, lora), optional or not, are set in a config file only; a
    field that is a number or a mapping (on_policy) keeps its flag for the number."""
    members = [h for h in (typing.get_args(hint) or (hint,)) if h is not type(None)]
    if typing.get_origin(hint) is dict:
        members = [hint]
    return all(typing.get_origin(h) is dict for h in members)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd")
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser(
        "distill", help="distil teacher(s) into a student; no models given: run the demo",
        description=__doc__.split("\n\n")[0],
    )
    capture = commands.add_parser(
        "capture", help="run the teacher(s) once over the training data and store their "
        "signals (top-k logits or hidden states) for fastkd distill --teacher-signals",
        description="Takes the same --config as fastkd distill (same data, tokenization, "
        "packing and seq_len); writes safetensors shards and capture.json to --out.",
    )
    hints = typing.get_type_hints(DistillConfig)
    for command in (distill, capture):
        command.add_argument("--config", help="YAML or JSON file of DistillConfig fields")
    for f in dataclasses.fields(DistillConfig):
        if _file_only(hints[f.name]):
            continue
        options = _flag_options(f, hints[f.name])
        if "capture" in f.metadata:
            capture.add_argument(f.metadata["capture"], dest=f.name, **options)
            continue
        flag = "--" + f.name.replace("_", "-")
        distill.add_argument(flag, dest=f.name, **options)
        if f.name in CAPTURE_FIELDS:
            capture.add_argument(flag, dest=f.name, **options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastkd` console script."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    missing = missing_train_extra()
    if missing:
        parser.exit(2, f"fastkd {command}: error: the trainer needs the train extra (missing: "
                       f"{', '.join(missing)}): pip install 'fastkd[train]'\n")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = args.pop("config")
        base = DistillConfig.from_file(path).to_dict() if path else {}
        if isinstance(base.get("on_policy"), dict) and "on_policy" in args:
            # --on-policy LAMBDA sets the lambda of the file's on_policy mapping
            args["on_policy"] = {**base["on_policy"], "lambda": args["on_policy"]}
        cfg = DistillConfig.from_dict({**base, **args})
        # the heavy imports (torch, transformers, datasets, the Trainer) only from here on
        if command == "capture":
            from .capture_signals import run_capture
            from .training import end_process_group

            run_capture(cfg)
            end_process_group()
            return 0
        cfg.check_runtime()
        if cfg.ablation:
            from .ablation import run_ablation

            run_ablation(cfg)
            return 0
        if cfg.is_demo:
            from .demo import run_demo

            run_demo(cfg)
            return 0
        from .run import prepare
        from .training import end_process_group

        job = prepare(cfg)
    except (ValueError, TypeError, OSError) as err:
        parser.exit(2, f"fastkd {command}: error: {err}\n")
    job()
    end_process_group()
    return 0

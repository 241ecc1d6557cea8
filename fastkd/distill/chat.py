"""Chat and instruction examples -> token ids and a per-token loss mask.

Three formats (the column names of TRL's dataset formats):

- ``messages``: a list of ``{"role", "content"}`` turns, rendered by the tokenizer's chat
  template (`apply_chat_template`);
- ``prompt`` + ``completion``: two strings, the completion following the prompt (then EOS);
- plain text in `text_field`.

With `assistant_only` the mask counts only what the model is to produce: assistant turns, or the
completion (and its EOS). The mask of a template with ``{% generation %}`` markers comes from
``apply_chat_template(..., return_assistant_tokens_mask=True)``; for other templates it comes
from prefix differences: assistant turn i covers the tokens between the rendering of turns
``[:i]`` with the generation prompt and the rendering of turns ``[:i + 1]``, which must extend
each other token for token (else `ValueError`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config imports FORMATS; datasets loads only with the data
    from datasets import Dataset

FORMATS = ("auto", "text", "messages", "prompt_completion")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def detect_format(ds: Dataset, data_format: str, text_field: str, name: str) -> str:
    """The format of `ds` (`data_format`, or for 'auto' from its columns: ``messages``, then
    ``prompt`` + ``completion``, then `text_field`); a missing column raises `ValueError`."""
    columns = ds.column_names
    needed = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"],
              "text": [text_field]}
    if data_format == "auto":
        data_format = next((f for f, cols in needed.items() if set(cols) <= set(columns)), "")
        if not data_format:
            raise ValueError(f"{name} data has none of the columns 'messages', 'prompt' + "
                             f"'completion' or {text_field!r} (columns: {columns}); set "
                             "text_field or data_format")
    missing = [c for c in needed[data_format] if c not in columns]
    if missing:
        raise ValueError(f"{name} data (data_format {data_format!r}) has no column(s) "
                         f"{missing} (columns: {columns})")
    return data_format


def check_chat_template(tokenizer: Any, data_format: str) -> None:
    """Refuse `messages` data with a tokenizer that has no chat template."""
    if data_format == "messages" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the data holds 'messages', but the tokenizer "
                         f"({type(tokenizer).__name__}, {tokenizer.name_or_path!r}) has no "
                         "chat_template; use a tokenizer with one (tokenizer: ...)")


def encode(
    tokenizer: Any, batch: dict[str, list], data_format: str, text_field: str,
    assistant_only: bool, add_eos: bool,
) -> list[tuple[list[int], list[bool]]]:
    """(token ids, counted flag per token) of each example of a map batch (column -> values);
    see the module docstring.

    add_eos: end each plain-text document with EOS (when packing documents together).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if data_format == "text":  # one tokenizer call for the batch
        texts = batch[text_field]
        ids = tokenizer(texts, add_special_tokens=not add_eos)["input_ids"]
        ids = [x + eos if x and add_eos else x for x in ids]
        return [(x, [True] * len(x)) for x in ids]
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    if data_format == "messages":
        docs = [chat_tokens(tokenizer, row["messages"]) for row in rows]
        return docs if assistant_only else [(ids, [True] * len(ids)) for ids, _ in docs]
    return [_prompt_completion(tokenizer, row, assistant_only, eos) for row in rows]


def _prompt_completion(
    tokenizer: Any, row: dict[str, Any], assistant_only: bool, eos: list[int]
) -> tuple[list[int], list[bool]]:
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            raise TypeError(f"column {key!r} must hold strings, got "
                            f"{type(row[key]).__name__}: {row[key]!r:.60}")
    prompt = tokenizer(row["prompt"])["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
    return prompt + completion, [not assistant_only] * len(prompt) + [True] * len(completion)


def chat_tokens(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, True on the assistant turns' tokens)."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m for m in messages
    ):
        raise TypeError(f"column 'messages' must hold lists of {{'role', 'content'}} turns, "
                        f"got {messages!r:.80}")
    if _GENERATION_BLOCK.search(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    return _prefix_diff_mask(tokenizer, messages)


def _prefix_diff_mask(
    tokenizer: Any, messages: list[dict[str, Any]]
) -> tuple[list[int], list[bool]]:
    def render(turns: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = render(messages, False)
    counted = [False] * len(ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[: i + 1], False)
        if end[: len(start)] != start or ids[: len(end)] != end:
            raise ValueError(
                "the chat template renders a conversation's prefix differently from the "
                f"conversation (assistant turn {i}), so the assistant tokens cannot be found; "
                "use a template with {% generation %} markers or set assistant_only_loss: "
                "false")
        counted[len(start): len(end)] = [True] * (len(end) - len(start))
    return ids, counted

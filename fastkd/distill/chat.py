"""Chat data -> token ids and assistant-only labels.

`chat_labels(tokenizer, messages)` renders a conversation with the tokenizer's chat template and
returns its `input_ids` and `labels` (unshifted), where every token that is not part of an
assistant turn (system, user, the template's role headers) holds IGNORE_INDEX, so it counts in
neither the KD nor the CE term of the trainer's loss.

The mask comes from the template's `{% generation %}` markers
(`apply_chat_template(..., return_assistant_tokens_mask=True)`) where the template has them;
otherwise from prefix differences: the tokens of assistant turn i are those of
`messages[: i + 1]` beyond the rendering of `messages[:i]` with the generation prompt. A
template for which that rendering is not a prefix raises `ValueError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .loss import IGNORE_INDEX


def check_chat_template(tokenizer: Any) -> None:
    """`ValueError` when the tokenizer has no chat template (needed for `messages` data)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat_template, "
                         "which `messages` data needs; use a tokenizer with one, or give "
                         "prompt/completion or text data")


def chat_labels(
    tokenizer: Any, messages: Sequence[dict[str, str]]
) -> dict[str, list[int]]:
    """{"input_ids": (T,), "labels": (T,)} of one conversation; labels = input_ids on
    assistant tokens, IGNORE_INDEX elsewhere."""
    check_chat_template(tokenizer)
    messages = list(messages)
    if "{% generation %}" in tokenizer.chat_template.replace("{%- generation", "{% generation"):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, keep = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, keep = _prefix_mask(tokenizer, messages)
    return {"input_ids": ids,
            "labels": [t if k else IGNORE_INDEX for t, k in zip(ids, keep, strict=True)]}


def _render(tokenizer: Any, messages: list[dict[str, str]], prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=prompt)
    return list(out["input_ids"])


def _prefix_mask(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The whole rendering and a 0/1 mask of its assistant tokens, by prefix differences."""
    ids = _render(tokenizer, messages, prompt=False)
    keep = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True)
        upto = _render(tokenizer, messages[: i + 1], prompt=False)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise ValueError(f"chat template: the rendering before assistant turn {i} is not "
                             "a prefix of the conversation's; add {% generation %} markers "
                             "to the template")
        keep[len(before):len(upto)] = [1] * (len(upto) - len(before))
    return ids, keep

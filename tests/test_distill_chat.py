"""Assistant-only labels of chat data, against a hand-made example."""

import pytest

from fastkd.distill.chat import chat_labels
from fastkd.distill.loss import IGNORE_INDEX

from .distill_helpers import tokenizer

# role headers and turn ends are words of the word-level tokenizer: w3 = system, w4 = user,
# w5 = assistant header, w6 = end of turn
PLAIN = ("{% for m in messages %}{{ {'system': 'w3', 'user': 'w4', 'assistant': 'w5'}[m.role] }}"
         " {{ m.content }} w6 {% endfor %}{% if add_generation_prompt %}w5 {% endif %}")
MARKED = ("{% for m in messages %}{% if m.role == 'assistant' %}w5 {% generation %}"
          "{{ m.content }} w6 {% endgeneration %}{% else %}"
          "{{ {'system': 'w3', 'user': 'w4'}[m.role] }} {{ m.content }} w6 {% endif %}"
          "{% endfor %}")
MESSAGES = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12"},
            {"role": "assistant", "content": "w20 w21"}, {"role": "user", "content": "w13"},
            {"role": "assistant", "content": "w22"}]
X = IGNORE_INDEX


def test_prefix_fallback_masks_all_but_assistant_tokens():
    tok = tokenizer()
    tok.chat_template = PLAIN
    out = chat_labels(tok, MESSAGES)
    # w3 w10 w11 w6 | w4 w12 w6 | w5 [w20 w21 w6] | w4 w13 w6 | w5 [w22 w6]
    assert out["input_ids"] == [3, 10, 11, 6, 4, 12, 6, 5, 20, 21, 6, 4, 13, 6, 5, 22, 6]
    assert out["labels"] == [X, X, X, X, X, X, X, X, 20, 21, 6, X, X, X, X, 22, 6]


def test_generation_markers_give_the_same_mask():
    tok = tokenizer()
    tok.chat_template = MARKED
    out = chat_labels(tok, MESSAGES)
    assert out["input_ids"] == [3, 10, 11, 6, 4, 12, 6, 5, 20, 21, 6, 4, 13, 6, 5, 22, 6]
    assert out["labels"] == [X, X, X, X, X, X, X, X, 20, 21, 6, X, X, X, X, 22, 6]


def test_no_chat_template_is_refused():
    with pytest.raises(ValueError, match="no chat_template"):
        chat_labels(tokenizer(), MESSAGES)

"""Tiny models, tokenizers and batches for the distillation trainer tests, and a float64
reference of the trainer's loss on materialized logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
)

VOCAB = 97  # odd on purpose
SEQ = 12


def llama(vocab: int = VOCAB, width: int = 24, tied: bool = False, seed: int = 0,
          layers: int = 2) -> PreTrainedModel:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=tied,
    ))


def qwen2(vocab: int = VOCAB, width: int = 16, tied: bool = True, seed: int = 1,
          layers: int = 1) -> PreTrainedModel:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, tie_word_embeddings=tied,
    ))


def rows(n: int, vocab: int = VOCAB, seed: int = 0) -> list[dict[str, list[int]]]:
    """n token rows of different lengths (so batches carry padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [SEQ - (3 * i) % 7 for i in range(n)]
    return [{"input_ids": torch.randint(vocab, (k,), generator=g).tolist()} for k in lengths]


def args(out: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", report_to=[],
                remove_unused_columns=False, logging_steps=1, save_strategy="no",
                dataloader_pin_memory=False, seed=0, data_seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def tokenizer(vocab: int = VOCAB, rename: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over words w0..; `rename` changes one word (different content)."""
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    if rename is not None:
        words[f"x{rename}"] = words.pop(f"w{rename}")
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def write_texts(path: Path, n: int, vocab: int = VOCAB, seed: int = 0) -> Path:
    """A JSON lines file of n random 'w..' texts."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        words = torch.randint(3, vocab, (int(torch.randint(5, 30, (1,), generator=g)),),
                              generator=g)
        lines.append('{"text": "' + " ".join(f"w{int(w)}" for w in words) + '"}')
    path.write_text("\n".join(lines) + "\n")
    return path


def model_inputs(batch) -> dict:
    """A batch's model inputs as the trainer passes them: packed rows (position_ids) go with
    no 2-D mask and no KV cache, so transformers keeps each document's attention to itself."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def reference_loss(student, teachers, batch, *, temperature=1.0, soft_weight=1.0,
                   hard_weight=0.0, divergence="kl", beta=0.5, weighting="entropy",
                   entropy_tau=1.0, fusion="mixture") -> torch.Tensor:
    """Mean over counted (shifted, unpadded) tokens, in float64 from the models' own (full)
    logits; differentiable with respect to the student."""
    labels = batch["labels"]
    zs = student(**model_inputs(batch)).logits.double()
    vocab = zs.shape[-1]
    with torch.no_grad():
        zts = [t(**model_inputs(batch)).logits.double()[..., :vocab] for t in teachers]
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    keep = target != -100
    ls = F.log_softmax(zs / temperature, -1)
    lts = [F.log_softmax(z / temperature, -1) for z in zts]
    if len(teachers) == 1:
        lt = lts[0]
        if divergence == "kl":
            div = (lt.exp() * (lt - ls)).sum(-1)
        elif divergence == "reverse_kl":
            div = (ls.exp() * (ls - lt)).sum(-1)
        else:
            lm = torch.logaddexp(lt + torch.tensor(beta).log(), ls + torch.tensor(1 - beta).log())
            div = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    else:
        ent = torch.stack([-(lt.exp() * lt).sum(-1) for lt in lts], -1)
        k = len(teachers)
        w = torch.softmax(-ent / entropy_tau, -1) if weighting == "entropy" else \
            torch.full_like(ent, 1 / k)
        if fusion == "mixture":
            p = sum(w[..., i:i + 1] * lts[i].exp() for i in range(k))
            div = (p * (p.clamp_min(1e-300).log() - ls)).sum(-1)
        else:
            div = sum(w[..., i] * (lts[i].exp() * (lts[i] - ls)).sum(-1) for i in range(k))
    ce = F.cross_entropy(zs.reshape(-1, vocab), target.reshape(-1), reduction="none",
                         ignore_index=-100).view_as(div)
    per = soft_weight * div + hard_weight * ce
    return per[keep].sum() / keep.sum()


# A chat template without {% generation %} markers (the prefix-difference mask) and the same
# rendering with them (the tokenizer's assistant mask); role tags are words of their own.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT_TEMPLATE_MARKED = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|> {% generation %}"
    "{{ m.content }} <|end|> {% endgeneration %}{% else %}<|{{ m.role }}|> {{ m.content }} "
    "<|end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT_WORDS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def chat_tokenizer(template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """`tokenizer()` whose last four words are the chat tags of `template` (None: no
    template)."""
    tok = tokenizer()
    vocab = tok.get_vocab()
    words = dict(vocab)
    for k, tag in enumerate(CHAT_WORDS):
        words[tag] = words.pop(f"w{VOCAB - 4 + k}")
    model = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    chat = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")
    chat.chat_template = template
    return chat


def held_out_batches(values: dict) -> list[dict[str, torch.Tensor]]:
    """The batches of a run config's `eval_data`, as its held-out evaluation forms them."""
    from fastkd.distill.data import CausalCollator, load_texts, tokenize

    blocks = tokenize(load_texts(values["eval_data"], "text"), tokenizer(), "text",
                      values["seq_len"], True, "evaluation")
    size = values["batch_size"]
    return [CausalCollator(0)([blocks[i] for i in range(s, min(s + size, len(blocks)))])
            for s in range(0, len(blocks), size)]


def held_out_reference(student, teacher, values: dict, *, temperature: float,
                       hard_weight: float) -> dict[str, float]:
    """Float64 means over the held-out counted tokens: the KD loss, the student's CE and the
    teacher's CE (float64 models; the evaluation's `eval_kd_loss`, `eval_ce`,
    `eval_teacher_ce`)."""
    kd_sum = ce_sum = teacher_ce_sum = 0.0
    count = 0
    with torch.no_grad():
        for batch in held_out_batches(values):
            n = int((batch["labels"][:, 1:] != -100).sum())
            kd_sum += float(reference_loss(student, [teacher], batch, temperature=temperature,
                                           hard_weight=hard_weight)) * n
            ce_sum += float(reference_loss(student, [teacher], batch, soft_weight=0.0,
                                           hard_weight=1.0)) * n
            logits = teacher(**model_inputs(batch)).logits
            teacher_ce_sum += float(F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum"))
            count += n
    return {"kd": kd_sum / count, "ce": ce_sum / count, "teacher_ce": teacher_ce_sum / count}


def check_trainer_against_reference(trainer, student, teachers, settings: dict,
                                    batch: dict) -> None:
    """The trainer's loss on `batch` and every student gradient equal `reference_loss` of the
    models' own logits. fp32 models and fused loss against a float64 loss of the same fp32
    logits: fp32 rounding (2^-24) over V-term sums stays under 1e-5 in the loss and 1e-4 in
    the gradients' relative norm."""
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    ref = reference_loss(student, teachers, batch, **settings)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for name, p in student.named_parameters():
        err = (got[name].double() - p.grad.double()).norm() / p.grad.double().norm()
        assert err < 1e-4, (name, float(err))

"""Tiny models, a padded batch and float64 materialized references for the feature-alignment
tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


def llama(width: int = 24, layers: int = 3, heads: int = 4, kv_heads: int = 2, seed: int = 0,
          attn: str = "sdpa") -> PreTrainedModel:
    """A Llama teacher: GQA (4 query heads, 2 key heads), head dim 6 by default."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        attn_implementation=attn,
    )).eval()


def qwen2(width: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1, seed: int = 1,
          attn: str = "sdpa") -> PreTrainedModel:
    """A Qwen2 student (q/k/v biases): GQA, head dim width / heads."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        tie_word_embeddings=True, attn_implementation=attn,
    )).eval()


def eager_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights with eager attention."""
    twin = type(model)(model.config.__class__.from_dict(
        {**model.config.to_dict(), "attn_implementation": "eager"}))
    twin.load_state_dict(model.state_dict())
    twin.set_attn_implementation("eager")
    return twin.eval()


def batch(seed: int = 0, lengths: tuple[int, ...] = (11, 7, 4)) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and the counted-token mask (positions whose next
    token is real: they carry a target)."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), length), generator=g)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    counted = F.pad(mask[:, 1:], (0, 1)).bool()
    return {"input_ids": ids, "attention_mask": mask, "counted": counted}


def attention_maps(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """(B, H, L, L) float64 causal softmax(scale q k^T) with padded keys removed."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    length = q.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    return torch.softmax((scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, -torch.inf), -1)


def map_rows(a_s: torch.Tensor, a_t: torch.Tensor, loss: str) -> torch.Tensor:
    """(B, L) per-query-row loss of two materialized maps, mean over heads (MSE / L)."""
    if loss == "mse":
        return (a_s - a_t).pow(2).sum(-1).mean(1) / a_s.shape[-1]
    log_s = torch.log(a_s.clamp_min(1e-300))
    return (torch.xlogy(a_t, a_t) - a_t * log_s).sum(-1).mean(1)


def relation_rows(x_s: list[torch.Tensor], x_t: list[torch.Tensor], r: int, mask: torch.Tensor,
                  loss: str) -> torch.Tensor:
    """(B, L) MiniLMv2 relation loss: q, k, v of each side split into r heads, the Q-Q, K-K
    and V-V self-relation maps compared, averaged over the three."""
    def heads(x: torch.Tensor) -> torch.Tensor:
        b, h, length, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, length, r, h * d // r).permute(0, 2, 1, 3)

    total = 0
    for xs, xt in zip(x_s, x_t, strict=True):
        hs, ht = heads(xs), heads(xt)
        total = total + map_rows(attention_maps(hs, hs, mask), attention_maps(ht, ht, mask), loss)
    return total / 3

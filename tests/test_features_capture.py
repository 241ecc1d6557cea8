"""Captures of feature alignment: post-RoPE q/k through the attention registry (equal to an
eager-attention run, outputs unchanged), decoder-layer and MLP outputs, and clear errors."""

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fastkd.distill.features import (
    FeatureRequest,
    enable_attention_capture,
    record_attention,
    record_features,
)
from tests.features_helpers import attention_maps, batch, eager_copy, llama, qwen2

MODELS = {"llama": llama, "qwen2": qwen2}


def eager_qk(model, inputs, layer):
    """q and k of `layer`, computed by hand from the attention module's inputs in an eager run,
    and the eager run's attention maps of that layer."""
    seen = {}

    def pre_hook(module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["cos_sin"] = kwargs["position_embeddings"]

    attn = model.model.layers[layer].self_attn
    handle = attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
    out = model(**inputs, output_attentions=True)
    handle.remove()
    h = seen["h"]
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *seen["cos_sin"])
    return q, k, out.attentions[layer]


@pytest.mark.parametrize("family", MODELS)
def test_captured_qk_equal_eager_and_outputs_unchanged(family):
    model = MODELS[family]()
    eager = eager_copy(model)
    data = batch()
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    before = model(**inputs).logits
    enable_attention_capture(model)
    with record_attention(model, [0, 1]) as store:
        during = model(**inputs).logits
    after = model(**inputs).logits
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert sorted(store) == [0, 1]
    real = data["attention_mask"].bool()
    for layer in (0, 1):
        q, k, maps = eager_qk(eager, inputs, layer)
        got = store[layer]
        assert got.key.shape[1] == model.config.num_key_value_heads  # not repeated for GQA
        torch.testing.assert_close(got.query, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.key, k, rtol=1e-5, atol=1e-6)
        rebuilt = attention_maps(got.query, got.key, data["attention_mask"], got.scaling)
        for b in range(real.shape[0]):  # real query rows (padded rows have no defined map)
            rows = real[b].nonzero().squeeze(1)
            torch.testing.assert_close(rebuilt[b][:, rows].float(), maps[b][:, rows],
                                       rtol=1e-5, atol=1e-6)
    assert got.query.requires_grad  # gradients reach the model through the captured tensors


def test_layer_and_mlp_outputs():
    model = llama()
    data = batch(seed=3)
    with record_features(model, FeatureRequest(hidden=(0, 1, 2), ffn=(0, 2))) as feats:
        out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                    output_hidden_states=True)
    for j in (0, 1):
        torch.testing.assert_close(feats.hidden[j], out.hidden_states[j + 1], rtol=0, atol=0)
    torch.testing.assert_close(model.model.norm(feats.hidden[2]), out.hidden_states[3])
    for j in (0, 2):  # layer output = mid + mlp(norm(mid)), so mid = output - mlp output
        layer = model.model.layers[j]
        mid = feats.hidden[j] - feats.ffn[j]
        torch.testing.assert_close(layer.mlp(layer.post_attention_layernorm(mid)), feats.ffn[j])
    assert set(feats.attention) == set()


def test_model_without_registry_is_named():
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=16, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="BloomForCausalLM does not use transformers' "
                                         "attention-function registry"):
        enable_attention_capture(bloom)
    with pytest.raises(ValueError, match="BloomForCausalLM: no decoder layer list"):
        with record_features(bloom, FeatureRequest(hidden=(0,))):
            pass


def test_record_attention_needs_enable():
    with pytest.raises(ValueError, match="LlamaForCausalLM is not set up for attention capture"):
        with record_attention(llama(), [0]):
            pass


def test_attention_that_bypasses_the_registry_is_reported():
    model = llama()
    enable_attention_capture(model)
    # layer 1 reads its own config, which still names plain "sdpa"
    model.model.layers[1].self_attn.config = model.config.__class__.from_dict(
        {**model.config.to_dict(), "attn_implementation": "sdpa"})
    data = batch()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: the forward produced no attention "
                                         r"features for layers \[1\]"):
        with record_features(model, FeatureRequest(attention=(0, 1))):
            model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])


def test_sliding_window_shorter_than_sequence_is_refused():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
        max_window_layers=0, max_position_embeddings=64))
    enable_attention_capture(model)
    data = batch()
    with pytest.raises(ValueError, match="layer 0\\) uses a sliding window of 4 < 11 tokens"):
        with record_attention(model, [0]):
            model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])

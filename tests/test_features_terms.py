"""Feature-alignment terms against hand-computed, materialized float64 versions on the same
batch: attention maps (vs an eager-attention run, values and gradients), MiniLMv2 relation
heads, hidden-state MSE / cosine and FFN MSE through the projections, multi-teacher weighting,
and bad input."""

import pytest
import torch
from transformers import LlamaForCausalLM

from fastkd.distill.features import FeatureAlignment, FeatureSettings
from fastkd.distill.features.terms import attention_term, feature_term
from tests.features_helpers import (
    attention_maps,
    batch,
    eager_copy,
    llama,
    map_rows,
    qwen2,
    relation_rows,
)
from tests.helpers import rel_err


def capture(fa, student, teachers, data):
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    with fa.record_student(student) as fs:
        student(**inputs)
    fts = []
    for k, teacher in enumerate(teachers):
        with torch.no_grad(), fa.record_teacher(k, teacher) as ft:
            teacher(**inputs)
        fts.append(ft)
    return fs, fts


def masked_pair_mean(per_pair, counted):
    return sum(torch.where(counted, per, 0).sum() for per in per_pair) / len(per_pair)


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_attention_maps_equal_eager_run(loss):
    """The captured q/k rebuild the eager run's attention maps, and the attention term (value
    and student gradients) equals a float64 loss of the rebuilt maps.

    transformers' eager attention runs its softmax in fp32 even for fp64 models, so its maps
    are good to ~1e-7 absolute only, and a KL of ~7e-4 between near-equal maps inherits ~1e-4
    relative error from them: too coarse a reference for a 1e-4 check. The models run in fp64
    here, the reference maps are rebuilt in fp64 from the captured q/k (docs/design.md section
    7: they equal eager's exactly), and the eager maps are compared with them at the fp32
    precision they have.
    """
    student, teacher = qwen2(heads=4, kv_heads=2).double(), llama().double()  # GQA both
    eager_s, eager_t = eager_copy(student).double(), eager_copy(teacher).double()
    fa = FeatureAlignment(FeatureSettings(attention_weight=1.0, attention_loss=loss), student,
                          [teacher])
    assert fa.pairs == [((0, 1), (1, 2))]
    data = batch()
    fs, (ft,) = capture(fa, student, [teacher], data)
    total, parts = fa(fs, [ft], data["attention_mask"], data["counted"])
    torch.testing.assert_close(total, parts["attention"])
    params = [p for p in student.parameters()]
    got = torch.autograd.grad(parts["attention"], params, retain_graph=True, allow_unused=True)

    mask = data["attention_mask"]
    rebuilt_s = {s: attention_maps(fs.attention[s].query, fs.attention[s].key, mask,
                                   fs.attention[s].scaling) for s in fa.pairs[0][0]}
    rebuilt_t = {t: attention_maps(ft.attention[t].query, ft.attention[t].key, mask,
                                   ft.attention[t].scaling) for t in fa.pairs[0][1]}
    inputs = {"input_ids": data["input_ids"], "attention_mask": mask}
    with torch.no_grad():
        maps_s = eager_s(**inputs, output_attentions=True).attentions
        maps_t = eager_t(**inputs, output_attentions=True).attentions
    for maps, rebuilt in ((maps_s, rebuilt_s), (maps_t, rebuilt_t)):
        for layer, a in rebuilt.items():  # eager's fp32 softmax: ~1e-7 absolute
            assert maps[layer].dtype == torch.float64
            torch.testing.assert_close(maps[layer], a.detach(), rtol=0, atol=1e-6)

    ref = masked_pair_mean([map_rows(rebuilt_s[s], rebuilt_t[t], loss) for s, t in fa.pairs[0]],
                           data["counted"])
    # fp64 throughout; the term's result passes through an fp32 accumulator at most
    torch.testing.assert_close(parts["attention"].double(), ref, rtol=1e-6, atol=0)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    assert any(g is not None for g in got)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert rel_err(g, w) < 1e-6


@pytest.mark.parametrize(("loss", "r"), [("kl", 4), ("mse", 2)])
def test_relation_heads_when_head_counts_differ(loss, r):
    student, teacher = qwen2(), llama()  # 2 vs 4 query heads
    fa = FeatureAlignment(FeatureSettings(attention_weight=1.0, attention_loss=loss,
                                          relation_heads=r), student, [teacher])
    data = batch(seed=1)
    fs, (ft,) = capture(fa, student, [teacher], data)
    _, parts = fa(fs, [ft], data["attention_mask"], data["counted"])

    def qkv(a, dtype=torch.float64):
        return [a.query.to(dtype), a.key.to(dtype), a.value.to(dtype)]

    ref = masked_pair_mean(
        [relation_rows(qkv(fs.attention[s]), qkv(ft.attention[t]), r, data["attention_mask"],
                       loss) for s, t in fa.pairs[0]], data["counted"])
    torch.testing.assert_close(parts["attention"].double(), ref, rtol=1e-4, atol=1e-8)
    params = [p for p in student.parameters()]
    got = torch.autograd.grad(parts["attention"], params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("hidden_loss", "ffn_loss"), [("relative_mse", "relative_mse"),
                                                      ("mse", "cosine"), ("cosine", "mse")])
def test_hidden_and_ffn_terms_and_total(hidden_loss, ffn_loss):
    student, teacher = qwen2(), llama()
    settings = FeatureSettings(hidden_weight=1.5, hidden_loss=hidden_loss, ffn_weight=0.5,
                               ffn_loss=ffn_loss, attention_weight=2.0, relation_heads=4)
    fa = FeatureAlignment(settings, student, [teacher])
    data = batch(seed=2)
    fs, (ft,) = capture(fa, student, [teacher], data)
    total, parts = fa(fs, [ft], data["attention_mask"], data["counted"])
    assert set(parts) == {"hidden", "attention", "ffn"}

    def projected(kind, s, t):
        w = fa.projections.projections[fa.projections.key(0, kind, s, t)].weight.double()
        src = fs.hidden if kind == "hidden" else fs.ffn
        return src[s].double() @ w.T

    def per_token(xs, xt, how):
        if how == "relative_mse":
            return (xs - xt).pow(2).sum(-1) / xt.pow(2).sum(-1)
        if how == "mse":
            return (xs - xt).pow(2).sum(-1) / xt.shape[-1]
        return 1 - (xs * xt).sum(-1) / (xs.norm(dim=-1) * xt.norm(dim=-1))

    hidden = masked_pair_mean([per_token(projected("hidden", s, t), ft.hidden[t].double(),
                                         hidden_loss) for s, t in fa.pairs[0]], data["counted"])
    ffn = masked_pair_mean([per_token(projected("ffn", s, t), ft.ffn[t].double(), ffn_loss)
                            for s, t in fa.pairs[0]], data["counted"])
    torch.testing.assert_close(parts["hidden"].double(), hidden, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(parts["ffn"].double(), ffn, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(total, 1.5 * parts["hidden"] + 2.0 * parts["attention"]
                               + 0.5 * parts["ffn"])
    total.backward()
    assert all(p.grad is not None for p in fa.projections.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("weighting", ["entropy", "static"])
def test_multi_teacher_weighting(weighting):
    student = qwen2()
    teachers = [llama(), llama(width=32, layers=2, seed=5)]
    settings = FeatureSettings(hidden_weight=1.0, weighting=weighting, teacher_priors=(1.0, 3.0))
    fa = FeatureAlignment(settings, student, teachers)
    assert fa.pairs == [((0, 1), (1, 2)), ((0, 0), (1, 1))]
    widths = {k: tuple(v.weight.shape) for k, v in fa.projections.projections.items()}
    assert widths == {"teacher0_hidden_0_1": (24, 16), "teacher0_hidden_1_2": (24, 16),
                      "teacher1_hidden_0_0": (32, 16), "teacher1_hidden_1_1": (32, 16)}
    data = batch(seed=4)
    counted = data["counted"]
    fs, fts = capture(fa, student, teachers, data)
    mixing = torch.softmax(3 * torch.randn(*counted.shape, 2), -1)
    _, parts = fa(fs, fts, data["attention_mask"], counted, mixing)
    if weighting == "entropy":
        w = mixing[counted].mean(0)
    else:
        w = torch.tensor([0.25, 0.75])
    terms = [feature_term(fs.hidden, ft.hidden, fa.pairs[k], fa.projections, k, "hidden",
                          counted) for k, ft in enumerate(fts)]
    torch.testing.assert_close(parts["hidden"], w[0] * terms[0] + w[1] * terms[1])


class NoRegistryLlama(LlamaForCausalLM):
    """A Llama that claims not to route attention through the registry."""

    _supports_attention_backend = False


@pytest.mark.parametrize(("settings", "match"), [
    (dict(attention_weight=1.0, relation_heads=3),
     r"relation_heads=3 must divide both sides' q / k / v widths.*does not divide "
     r"\{'student q': 16, 'student k': 8, 'student v': 8\}"),
    (dict(attention_weight=1.0), "query-head counts differ; set relation_heads"),
    (dict(hidden_weight=1.0, layer_map="0:3"), r"layer pair \(0, 3\) is out of range"),
    (dict(hidden_weight=1.0, layer_map=((0, 0), (2, 1))), r"layer pair \(2, 1\) is out of range"),
    (dict(), "needs a feature term with weight > 0"),
])
def test_bad_alignment(settings, match):
    with pytest.raises(ValueError, match=match):
        FeatureAlignment(FeatureSettings(**settings), qwen2(), [llama()])


@pytest.mark.parametrize(("settings", "match"), [
    (dict(hidden_weight=-1.0), "hidden_weight must be >= 0"),
    (dict(hidden_loss="l1"), "unknown hidden_loss 'l1'"),
    (dict(ffn_loss="kl"), "unknown ffn_loss 'kl'"),
    (dict(attention_loss="cosine"), "unknown attention_loss 'cosine'"),
    (dict(weighting="mean"), "unknown weighting 'mean'"),
    (dict(relation_heads=0), "relation_heads must be >= 1"),
])
def test_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        FeatureSettings(**settings)


def test_inputs_that_cannot_be_captured():
    teacher = llama()
    del teacher.model.layers[2].mlp
    with pytest.raises(ValueError, match="LlamaForCausalLM: decoder layer 2 .* has no `mlp`"):
        FeatureAlignment(FeatureSettings(ffn_weight=1.0), qwen2(), [teacher])
    FeatureAlignment(FeatureSettings(hidden_weight=1.0), qwen2(), [teacher])  # FFN not asked
    torch.manual_seed(0)
    odd = NoRegistryLlama(llama().config)
    with pytest.raises(ValueError, match="NoRegistryLlama does not use transformers' attention"):
        FeatureAlignment(FeatureSettings(attention_weight=1.0, relation_heads=2), qwen2(), [odd])


def test_attention_term_checks_relation_heads():
    student, teacher = qwen2(), llama()
    fa = FeatureAlignment(FeatureSettings(attention_weight=1.0, relation_heads=4), student,
                          [teacher])
    data = batch()
    fs, (ft,) = capture(fa, student, [teacher], data)
    with pytest.raises(ValueError, match="relation_heads=8 must divide"):
        attention_term(fs.attention, ft.attention, fa.pairs[0], data["attention_mask"],
                       data["counted"], relation_heads=8)

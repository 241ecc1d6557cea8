"""`fastkd capture` and training from a capture (`fastkd distill --teacher-signals`): what a
capture stores (against float64 teacher logits), the step losses of training from it (against
a float64 reference and against online KD), refusals before any model loads, resume of an
interrupted capture and of a training run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastkd.distill import signals as signals_module
from fastkd.distill.cli import main
from fastkd.distill.config import DistillConfig
from fastkd.distill.signals import CapturedSignals, shard_path
from tests.distill_helpers import VOCAB, llama, tokenizer, write_texts

SEQ_LEN = 16
ROWS_PER_SHARD = 16


def spread(model, scale: float):
    """Scale the lm_head so that logits have a realistic spread (std of several units)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("capture")
    made = {
        "teacher": (spread(llama(), 30.0), tokenizer()),  # logits std ~3, max ~11
        "teacher2": (spread(llama(width=32, seed=7), 30.0), tokenizer()),
        "student": (spread(llama(width=16, tied=True, layers=1, seed=3), 20.0), tokenizer()),
        "renamed": (llama(width=16, tied=True, layers=1, seed=3), tokenizer(rename=5)),
        "wide": (llama(vocab=VOCAB + 3, width=16, tied=True, layers=1, seed=3), tokenizer()),
    }
    out = {}
    for name, (model, tok) in made.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    out["data"] = str(write_texts(root / "train.jsonl", 40))
    out["other_data"] = str(write_texts(root / "other.jsonl", 40, seed=5))
    for kind, extra in {"topk": ["--k", "8", "--temperatures", "1", "2"],
                        "hidden": [], "hidden32": ["--dtype", "float32"]}.items():
        out[kind] = str(root / kind)
        assert main(capture(out, out[kind], "--kind", kind.removesuffix("32"), *extra)) == 0
    return out


def capture(dirs, out, *extra: str) -> list[str]:
    return ["capture", "--student", dirs["student"], "--teachers", dirs["teacher"],
            "--data", dirs["data"], "--seq-len", str(SEQ_LEN), "--batch-size", "4",
            "--rows-per-shard", str(ROWS_PER_SHARD), "--out", str(out), *extra]


def distill(dirs, out, signals, *extra: str) -> list[str]:
    return ["distill", "--student", dirs["student"], "--teacher-signals", *signals,
            "--data", dirs["data"], "--seq-len", str(SEQ_LEN), "--output-dir", str(out),
            "--logging-steps", "1", *extra]


def step_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def packed_blocks(dirs):
    """The token blocks of the data as fastkd distill makes them: packed documents, with
    input_ids, labels and position_ids (restarting at each document) columns."""
    from fastkd.distill.run import token_blocks

    cfg = DistillConfig(student=dirs["student"], data=dirs["data"], seq_len=SEQ_LEN)
    return token_blocks(cfg, dirs["student"], "student")[1]


def blocks(dirs) -> list[list[int]]:
    return packed_blocks(dirs)["input_ids"]


def targets(dirs) -> list[torch.Tensor]:
    """Each block's next-token targets (L - 1,): IGNORE_INDEX (-100) where a document starts,
    as the trainer shifts the labels."""
    return [torch.tensor(labels[1:]) for labels in packed_blocks(dirs)["labels"]]


@torch.no_grad()
def logits64(model_dir: str, rows: list[list[int]], dirs) -> list[torch.Tensor]:
    """Each row's (L, V) logits, the model run alone on it in float64 with the block's
    document boundaries (its position ids, as in training and capture)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    positions = packed_blocks(dirs)["position_ids"]
    # no KV cache: with one, transformers skips its packed-sequence (block-diagonal) mask
    return [model(input_ids=torch.tensor([r]), position_ids=torch.tensor([p]),
                  use_cache=False).logits[0] for r, p in zip(rows, positions, strict=True)]


def test_topk_capture_holds_the_teachers_top_k_and_full_lse(dirs):
    cap = CapturedSignals(dirs["topk"])
    rows = blocks(dirs)
    meta = cap.meta
    assert (meta.kind, meta.k, meta.temperatures, meta.vocab_size) == ("topk", 8, [1.0, 2.0], 97)
    assert meta.rows == len(rows) and meta.shards == math.ceil(len(rows) / ROWS_PER_SHARD) > 2
    assert meta.tokens == sum(len(r) for r in rows)
    for row, z in zip(range(len(rows)), logits64(dirs["teacher"], rows, dirs), strict=True):
        got = cap.row(row)
        assert got["input_ids"].tolist() == rows[row]
        # The capture runs the teacher in fp32: each logit carries the rounding of a few
        # layers of fp32 dot products of length <= 48, well under 1e-4 of the logits' scale.
        atol = 1e-4 * float(z.abs().max())
        ids = got["ids"].long()
        assert torch.allclose(got["logits"].double(), z.gather(1, ids), atol=atol, rtol=0)
        kth = z.topk(9, dim=-1).values
        assert (got["logits"].double()[:, -1] >= kth[:, 7] - atol).all()
        assert (got["logits"].double()[:, -1] >= kth[:, 8] - atol).all()
        assert all(len(set(x)) == 8 for x in ids.tolist())
        for j, t in enumerate(meta.temperatures):
            assert torch.allclose(got["lse"][:, j].double(), torch.logsumexp(z / t, -1),
                                  atol=atol / t, rtol=0)


def sparse_kl64(zs: torch.Tensor, zt: torch.Tensor, ids: torch.Tensor, t: float) -> torch.Tensor:
    """Per-token KL over the top-k ids plus one tail bucket, float64, from full logits."""
    lp, lq = F.log_softmax(zt / t, -1), F.log_softmax(zs / t, -1)
    p, q = lp.gather(1, ids).exp(), lq.gather(1, ids).exp()
    p_tail, q_tail = (1 - p.sum(1)).clamp_min(0), (1 - q.sum(1)).clamp_min(1e-300)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), 0)
    return (p * (p.log() - q.log())).sum(1) + tail


def one_step_record(cfg: DistillConfig) -> tuple[dict, torch.nn.Module]:
    """The logged record of one step over every row (one batch: order-free) and the
    student."""
    from fastkd.distill.run import prepare

    job = prepare(cfg)
    job.trainer.train()
    return job.trainer.state.log_history[0], job.trainer.model


def one_step_loss(cfg: DistillConfig) -> tuple[float, torch.nn.Module]:
    """The logged loss of one step over every row and the student."""
    record, model = one_step_record(cfg)
    return record["loss"], model


def run_cfg(dirs, tmp_path, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], data=dirs["data"], seq_len=SEQ_LEN, steps=1,
                batch_size=64, logging_steps=1, output_dir=str(tmp_path / "run"),
                learning_rate=0.0, training_args={"save_strategy": "no", "disable_tqdm": True})
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_training_from_topk_capture_matches_float64_sparse_kd(dirs, tmp_path, temperature):
    rows = blocks(dirs)
    assert len(rows) <= 64  # one step sees every row
    cfg = run_cfg(dirs, tmp_path, teacher_signals=[dirs["topk"]], temperature=temperature,
                  hard_weight=0.5)
    record, _ = one_step_record(cfg)
    cap = CapturedSignals(dirs["topk"])
    total, divergence, cross_entropy, count = 0.0, 0.0, 0.0, 0
    for row, zs, zt, labels in zip(range(len(rows)), logits64(dirs["student"], rows, dirs),
                                   logits64(dirs["teacher"], rows, dirs), targets(dirs),
                                   strict=True):
        ids = cap.row(row)["ids"].long()[:-1]  # the last token predicts nothing
        counted = labels != -100
        kl = sparse_kl64(zs[:-1][counted], zt[:-1][counted], ids[counted], temperature)
        ce = F.cross_entropy(zs[:-1][counted], labels[counted], reduction="none")
        total += float((kl + 0.5 * ce).sum())
        divergence += float(kl.sum())
        cross_entropy += float(ce.sum())
        count += int(counted.sum())
    # fp32 logits of both models (rounding ~1e-6 of their scale, ~10) against float64: the
    # per-token loss (a few units) moves by ~1e-5 at most. The logged parts come from the
    # same sparse_kd_loss call (return_parts).
    for name, value in [("loss", total), ("kd_divergence", divergence),
                        ("kd_hard_ce", cross_entropy)]:
        assert abs(record[name] - value / count) <= 1e-4 * abs(value / count), name


def test_hidden_capture_reproduces_online_kd(dirs, tmp_path):
    online, _ = one_step_loss(run_cfg(dirs, tmp_path, teachers=[dirs["teacher"]]))
    exact, _ = one_step_loss(run_cfg(dirs, tmp_path, teacher_signals=[dirs["hidden32"]]))
    stored, _ = one_step_loss(run_cfg(dirs, tmp_path, teacher_signals=[dirs["hidden"]]))
    # float32 storage: the same hidden states and lm_head in the same batch, so the same sums
    assert abs(exact - online) <= 1e-6 * abs(online)
    # bf16 storage: the step's loss is the float64 loss of the teacher's hidden states rounded
    # to bf16 (and online KD's that of the unrounded ones) up to fp32 rounding: each token's
    # term carries a few fp32 ulps (GEMMs of length 24, one log-sum-exp per row), and the mean
    # over ~700 tokens a few more, so 1e-6 of the loss (16 ulps). The bf16 rounding moves the
    # loss by ~1e-5 here, so these checks tell the rounded and the unrounded teacher apart.
    from transformers import AutoModelForCausalLM

    rows = blocks(dirs)
    teacher = AutoModelForCausalLM.from_pretrained(dirs["teacher"], dtype=torch.float64)
    sums = {"fp64": 0.0, "bf16": 0.0}
    positions = packed_blocks(dirs)["position_ids"]
    with torch.no_grad():
        for row, zs, labels, pos in zip(rows, logits64(dirs["student"], rows, dirs),
                                        targets(dirs), positions, strict=True):
            counted = labels != -100
            h = teacher.model(input_ids=torch.tensor([row]), position_ids=torch.tensor([pos]),
                              use_cache=False).last_hidden_state[0, :-1][counted]
            lq = F.log_softmax(zs[:-1][counted], -1)
            for name, hidden in {"fp64": h, "bf16": h.to(torch.bfloat16).double()}.items():
                lp = F.log_softmax(hidden @ teacher.lm_head.weight.T, -1)
                sums[name] += float((lp.exp() * (lp - lq)).sum())
    count = sum(int((labels != -100).sum()) for labels in targets(dirs))
    ref, ref_bf16 = sums["fp64"] / count, sums["bf16"] / count
    assert abs(online - ref) <= 1e-6 * ref
    assert abs(stored - ref_bf16) <= 1e-6 * ref
    assert abs(ref_bf16 - ref) > 4e-6 * ref  # the rounding is seen


def test_hidden_captures_of_two_teachers_train_multi_teacher(dirs, tmp_path):
    config = tmp_path / "capture.yaml"  # the capture's settings as YAML keys
    config.write_text(
        f"student: {dirs['student']}\nteachers: [{dirs['teacher']}, {dirs['teacher2']}]\n"
        f"data: {dirs['data']}\nseq_len: {SEQ_LEN}\ncapture_kind: hidden\n"
        f"capture_dtype: float32\ncapture_out: {tmp_path / 'both'}\n")
    assert main(["capture", "--config", str(config)]) == 0
    assert [CapturedSignals(tmp_path / "both" / f"teacher{k}").meta.hidden_size
            for k in (0, 1)] == [24, 32]
    teachers = [dirs["teacher"], dirs["teacher2"]]
    for fusion in ("mixture", "weighted_kl"):
        online, _ = one_step_loss(run_cfg(dirs, tmp_path, teachers=teachers, fusion=fusion))
        stored, _ = one_step_loss(run_cfg(dirs, tmp_path, fusion=fusion,
                                          teacher_signals=[str(tmp_path / "both")]))
        # float32 storage: the same inputs to the same multi-teacher loss, the same batch
        assert abs(stored - online) <= 1e-6 * abs(online)


def test_training_resumes_aligned_with_grad_accum(dirs, tmp_path):
    out = tmp_path / "run"
    common = ["--batch-size", "2", "--grad-accum", "2", "--save-steps", "2",
              "--learning-rate", "0.05"]
    assert main(distill(dirs, out, [dirs["topk"]], "--steps", "4", *common)) == 0
    straight = step_losses(out)
    assert main(distill(dirs, out, [dirs["topk"]], "--steps", "4", *common, "--resume",
                        str(out / "checkpoint-2"))) == 0
    resumed = step_losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - straight[step]) <= 1e-6 * abs(straight[step])


def _no_model_loads(*args, **kwargs):
    raise AssertionError("a model was loaded before the settings were refused")


@pytest.mark.parametrize("case, message", [
    ("other_data", "data fingerprint"),
    ("seq_len", "its seq_len is 16, this run's 12"),
    ("renamed", "its tokenizer identity"),
    ("wide", "vocabulary rows (the student's lm_head) is 97, this run's 100"),
    ("temperature", "serves temperatures [1.0, 2.0], not 3.0"),
    ("jsd", "divergence 'jsd' needs the teacher's full distribution"),
    ("two_topk", "several topk captures"),
    ("mixed", "mixes topk and hidden captures"),
    ("unfinished", "unfinished capture (1 of 3 shards missing)"),
    ("not_a_capture", "no capture.json"),
    ("with_teachers", "name teachers (models run on each batch) or teacher_signals"),
    ("features", "feature alignment"),
])
def test_mismatched_captures_are_refused_before_any_model_loads(
    dirs, tmp_path, capsys, monkeypatch, case, message
):
    import shutil

    import fastkd.distill.run as run

    monkeypatch.setattr(run, "load_model", _no_model_loads)
    signals, extra = [dirs["topk"]], []
    if case == "unfinished":
        shutil.copytree(dirs["topk"], tmp_path / "cap")
        shard_path(tmp_path / "cap", 1).unlink()
        signals = [str(tmp_path / "cap")]
    extra = {"other_data": ["--data", dirs["other_data"]], "seq_len": ["--seq-len", "12"],
             "renamed": ["--student", dirs["renamed"]], "wide": ["--student", dirs["wide"]],
             "temperature": ["--temperature", "3"], "jsd": ["--divergence", "jsd"],
             "with_teachers": ["--teachers", dirs["teacher"]],
             "features": ["--hidden-weight", "1"]}.get(case, [])
    signals += {"two_topk": [dirs["topk"]], "mixed": [dirs["hidden"]],
                "not_a_capture": [dirs["student"]]}.get(case, [])
    with pytest.raises(SystemExit) as exit_info:
        main([*distill(dirs, tmp_path / "run", signals, "--steps", "1"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # after the tokenization's progress bar (datasets' map)
    errors = [line for line in err.splitlines() if line.startswith("fastkd distill: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_interrupted_capture_resumes_without_rewriting_a_shard(dirs, tmp_path, monkeypatch,
                                                                capsys):
    out = tmp_path / "cap"
    real_replace, renamed = os.replace, []

    def crash_on_third_shard(src, dst):
        if Path(dst).name.startswith("shard-"):
            if len(renamed) == 2:
                raise KeyboardInterrupt  # killed after writing shard 2's temp file
            renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(signals_module.os, "replace", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        main(capture(dirs, out, "--kind", "topk", "--k", "8", "--temperatures", "1", "2"))
    monkeypatch.setattr(signals_module.os, "replace", real_replace)
    written = sorted(p.name for p in out.glob("shard-*"))
    assert written == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(ValueError, match="unfinished capture"):
        CapturedSignals(out)
    (out / ".shard-00002.safetensors.999.tmp").write_bytes(b"cut short")  # a killed writer's
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}
    capsys.readouterr()
    assert main(capture(dirs, out, "--kind", "topk", "--k", "8", "--temperatures", "1",
                        "2")) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "bytes per token" in printed and "tokens/s" in printed
    for name, stat in before.items():  # not written again
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat
    assert not list(out.glob(".*.tmp"))
    resumed, whole = CapturedSignals(out), CapturedSignals(dirs["topk"])
    for row in range(whole.meta.rows):
        for name, value in whole.row(row).items():
            assert torch.equal(resumed.row(row)[name], value), (row, name)
    with pytest.raises(SystemExit):  # other settings into the same folder
        main(capture(dirs, out, "--kind", "topk", "--k", "4"))
    assert "holds a capture with other settings (k, temperatures differ)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--kind", "topk", "--k", "98"], "capture_k must be in [1, 97]"),
    (["--kind", "hidden", "--temperatures", "2"], "capture_temperatures is for kind topk"),
    (["--kind", "sparse"], "unknown capture_kind 'sparse'"),
    (["--dtype", "int8"], "unknown capture_dtype 'int8'"),
    (["--temperatures", "0"], "capture_temperatures must be > 0"),
    (["--out", "FILE"], "capture_out (--out) 'FILE' is an existing file"),
])
def test_bad_capture_settings_are_one_line_errors(dirs, tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("")
    extra = [x.replace("FILE", str(tmp_path / "file")) for x in extra]
    message = message.replace("FILE", str(tmp_path / "file"))
    with pytest.raises(SystemExit) as exit_info:
        main([*capture(dirs, tmp_path / "cap"), *extra])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("fastkd capture: error:")]
    assert len(errors) == 1 and message in errors[0], errors

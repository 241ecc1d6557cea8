"""`fastkd distill` on local model directories and data, its errors before training, and the
embedded demo at its tiny scale."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from fastkd.distill.cli import main
from fastkd.distill.data import tokenize
from tests.distill_helpers import VOCAB, llama, qwen2, tokenizer, write_texts

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Local teacher (lm_head padded to 104 rows), student, mismatched teachers and data."""
    root = tmp_path_factory.mktemp("distill_cli")
    made = {
        "teacher": (llama(vocab=VOCAB + 7), tokenizer()),
        # a Llama student: transformers 5 swaps in its Qwen2 tokenizer class (byte-level BPE)
        # for a qwen2 directory, which this word-level test tokenizer is not
        "student": (llama(width=16, tied=True, layers=1, seed=3), tokenizer()),
        "renamed": (llama(), tokenizer(rename=5)),
        "small": (llama(vocab=VOCAB - 10), None),
        # transformers loads this word-level tokenizer as a byte-level Qwen2Tokenizer, which
        # encodes every text to no tokens, while its vocabulary and special ids stay the same
        "qwen_student": (qwen2(), tokenizer()),
        "qwen_teacher": (qwen2(width=24, tied=False, seed=4), tokenizer()),
    }
    out = {}
    for name, (model, tok) in made.items():
        model.save_pretrained(root / name)
        if tok is not None:
            tok.save_pretrained(root / name)
        out[name] = str(root / name)
    out["data"] = str(write_texts(root / "train.jsonl", 40))
    out["eval"] = str(write_texts(root / "eval.jsonl", 8, seed=1))
    (root / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    out["empty"] = str(root / "empty.jsonl")
    (root / "blank.jsonl").write_text("")
    out["blank"] = str(root / "blank.jsonl")
    return out


def distill(dirs, out, *extra: str) -> list[str]:
    return ["distill", "--student", dirs["student"], "--teachers", dirs["teacher"],
            "--data", dirs["data"], "--seq-len", "16", "--batch-size", "2",
            "--output-dir", str(out), "--logging-steps", "1", *extra]


def losses(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if '"loss"' in x]


def test_cli_distills_then_resumes(dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill(dirs, out, "--steps", "3", "--save-steps", "2", "--eval-data",
                        dirs["eval"], "--hard-weight", "0.5", "--no-packing")) == 0
    assert (out / "final" / "config.json").is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    assert losses(out) == [1, 2, 3]
    assert main(distill(dirs, out, "--steps", "4", "--resume")) == 0
    assert losses(out) == [1, 2, 3, 4]
    # metrics.jsonl holds one history: resuming from an earlier checkpoint drops the lines
    # after it, and a fresh run into the same folder starts the file again.
    assert main(distill(dirs, out, "--steps", "4", "--resume", str(out / "checkpoint-2"))) == 0
    assert losses(out) == [1, 2, 3, 4]
    assert main(distill(dirs, out, "--steps", "1")) == 0
    assert losses(out) == [1]


def test_resume_of_a_finished_run_does_nothing(dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(distill(dirs, out, "--steps", "2", "--save-steps", "2")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    before = (out / "metrics.jsonl").read_text()
    import fastkd.distill.run as run

    monkeypatch.setattr(run, "load_model", _no_model_loads)
    capsys.readouterr()
    assert main(distill(dirs, out, "--steps", "2", "--resume")) == 0
    assert "is finished" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_after_a_truncated_metrics_line(dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill(dirs, out, "--steps", "2", "--save-steps", "1")) == 0
    # killed mid-write after checkpoint-1: the last line is cut short
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 4.1')
    assert main(distill(dirs, out, "--steps", "3", "--resume", str(out / "checkpoint-1"))) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # one summary line per training session, each naming the step it started from
    summaries = [r for r in records if r.get("summary")]
    assert [(r["step"], r["resumed_from_step"]) for r in summaries] == [(3, 1)]
    assert "train_loss" in summaries[0]


def _no_model_loads(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_config_file_and_flags(dirs, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"student: {dirs['student']}\nteachers: [{dirs['teacher']}]\n"
                      f"data: {dirs['data']}\nseq_len: 16\nsteps: 5\ndivergence: jsd\n"
                      f"output_dir: {tmp_path / 'run'}\nlogging_steps: 1\n")
    assert main(["distill", "--config", str(config), "--steps", "2"]) == 0
    assert losses(tmp_path / "run") == [1, 2]


BAD = [
    (dict(student="missing"), "student path .* does not exist"),
    (dict(teacher="missing"), "teacher path .* does not exist"),
    (dict(data="missing"), "data path .* does not exist"),
    (dict(data="empty"), "training dataset is empty after tokenization"),
    (dict(teacher="renamed"), "tokenizer differs from the student's"),
    (dict(teacher="small"), "fewer than the student's"),
    (dict(data="blank"), r"data path .*blank.jsonl': the file is empty"),
    (dict(student="qwen_student"), r"the student's tokenizer \(Qwen2Tokenizer\) encodes non-empty "
                                   r"text to no tokens"),
    (dict(student="qwen_student", teacher="qwen_teacher"), r"\(Qwen2Tokenizer\) encodes non-empty"),
]


@pytest.mark.parametrize("swap, message", BAD)
def test_bad_input_fails_before_training(dirs, tmp_path, capsys, swap, message):
    paths = {**dirs, **{k: dirs.get(v, str(tmp_path / v)) for k, v in swap.items()}}
    with pytest.raises(SystemExit) as exit_info:
        main(distill(paths, tmp_path / "run", "--steps", "1"))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_token_documents_are_refused_before_training(dirs, tmp_path, capsys):
    # Unpacked, each document is a sequence of its own; one token predicts nothing.
    data = tmp_path / "one_word.jsonl"
    data.write_text('{"text": "w5"}\n{"text": "w7"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(distill({**dirs, "data": str(data)}, tmp_path / "run", "--no-packing"))
    assert exit_info.value.code == 2
    assert "training dataset is empty after tokenization" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "100"], "seq_len=100 exceeds student's max_position_embeddings=64"),
    (["--divergence", "kld"], "unknown divergence 'kld'"),
    (["--resume"], "no checkpoint-"),
])
def test_bad_settings_fail_before_training(dirs, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(distill(dirs, tmp_path / "run", "--steps", "1", *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--learning-rate", "-1"], "learning_rate must be >= 0, got -1.0"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--entropy-tau", "0", "--teachers", "TEACHER"], "entropy_tau must be > 0, got 0.0"),
    (["--backend", "triton"], "backend 'triton' needs a CUDA device"),
    (["--backend", "cuda"], "backend='cuda' needs CUDA tensors"),
    (["--output-dir", "FILE"], "is an existing file, not a folder"),
    (["--output-dir", "FILE/run"], "is a file, not a folder"),
])
def test_settings_are_refused_before_any_model_loads(dirs, tmp_path, capsys, monkeypatch, extra,
                                                     message):
    if "triton" in extra or "cuda" in extra:
        if torch.cuda.is_available():
            pytest.skip("a CUDA device runs the triton and cuda backends")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import fastkd.distill.run as run

    for name in ("load_model", "load_config", "load_tokenizer"):
        monkeypatch.setattr(run, name, _no_model_loads)
    (tmp_path / "file").write_text("")
    extra = [x.replace("TEACHER", dirs["teacher"]).replace("FILE", str(tmp_path / "file"))
             for x in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(distill(dirs, tmp_path / "run", "--steps", "1", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 2\nteachers: [a\n")
    with pytest.raises(SystemExit):
        main(["distill", "--config", str(config)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c.yaml', line 3" in err and "Traceback" not in err, err


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


HEAVY = ("transformers", "datasets", "accelerate", "yaml", "fastkd.distill.trainer")


def test_help_and_settings_errors_come_before_heavy_imports():
    code = (
        "import sys\n"
        "from fastkd.distill.cli import main\n"
        "for argv in (['distill', '--help'], ['distill', '--student', 's', '--teachers', 't',"
        " '--data', 'd', '--learning-rate', '-1']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n"
        f"print('heavy', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exit 0" in done.stdout and "exit 2" in done.stdout, done.stdout
    assert "(default: 512)" in done.stdout
    assert "heavy []" in done.stdout, done.stdout
    assert "learning_rate must be >= 0" in done.stderr


def test_missing_train_extra_is_named_in_one_line():
    block = "import sys; sys.modules['accelerate'] = None\n"
    done = _python(block + "from fastkd.distill.cli import main; sys.exit(main(['distill']))")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "missing: accelerate" in done.stderr and "pip install 'fastkd[train]'" in done.stderr
    done = _python(block + "import fastkd.distill\n"
                           "try:\n    fastkd.distill.DistillationTrainer\n"
                           "except ModuleNotFoundError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'fastkd[train]'" in done.stdout, done.stdout


def test_models_without_data_are_refused(dirs, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--student", dirs["student"], "--teachers", dirs["teacher"]])
    assert "needs student, teachers and data" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text('{"hard_wieght": 0.5}')
    with pytest.raises(SystemExit):
        main(["distill", "--config", str(config)])
    assert "unknown config key 'hard_wieght' (did you mean 'hard_weight'?)" in \
        capsys.readouterr().err


def test_module_runs_the_tiny_demo(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "fastkd.distill", "--demo-scale", "tiny", "--output-dir",
         str(tmp_path), "--logging-steps", "2"], capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # each phase is named before its progress bar, and the output is said
    for phase in ("[1/3] teacher:", "[2/3] KD student:", "[3/3] CE-only student:"):
        assert phase in done.stdout, done.stdout
    assert f"per-step metrics of the KD student: {tmp_path / 'metrics.jsonl'}" in done.stdout
    table = dict(re.findall(r"^(teacher|KD student|CE student)\s+\d+\s+([\d.]+)", done.stdout,
                            re.MULTILINE))
    assert set(table) == {"teacher", "KD student", "CE student"}, done.stdout
    assert all(1 < float(v) < 10_000 for v in table.values())
    # seeded: distillation already puts the student ahead of cross-entropy after 6 steps
    assert float(table["KD student"]) < float(table["CE student"])
    assert losses(tmp_path)


class _NoTokens:
    """A tokenizer that maps every text to no ids (as a mismatched tokenizer class can)."""

    eos_token_id = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[] for _ in texts]}


def test_a_tokenizer_that_gives_no_tokens_is_named():
    texts = Dataset.from_dict({"text": ["w1 w2 w3", "w4 w5", ""]})
    with pytest.raises(ValueError, match=r"its 2 non-empty texts gave 0 tokens: does the "
                                         r"tokenizer \(_NoTokens\) fit this data\?"):
        tokenize(texts, _NoTokens(), "text", 8, True, "training")


def test_tokenizers_that_split_text_differently_are_refused():
    from tokenizers import pre_tokenizers

    from fastkd.distill.vocab import check_same_tokenizer

    other = tokenizer()
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # splits off ","
    assert other.get_vocab() == tokenizer().get_vocab()
    check_same_tokenizer(tokenizer(), tokenizer(), "t", ["w3 w4"])
    with pytest.raises(ValueError, match=r"teacher 't': its tokenizer .* encodes 'Distillation "
                                         r"probe.* as \[2, 2, 2, 2"):
        check_same_tokenizer(tokenizer(), other, "t", ["w3 w4"])

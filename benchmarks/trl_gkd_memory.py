"""Peak memory of one TRL GKD training step, with TRL's own loss and with fastkd's
(`fastkd.integrations.trl.FusedGKDTrainer`), at a shape where the logits dominate.

    python benchmarks/trl_gkd_memory.py                 # V=65,536, seq 256, batch 2 (CPU)
    python benchmarks/trl_gkd_memory.py --vocab 32768 --out DIR

Each trainer runs in a fresh subprocess: tiny Llama student and teacher (hidden 64 and 128,
one layer, untied heads), a GKDConfig with lmbda=0 (no generation: the step is the loss path
only), one warm-up `training_step` (forward + backward), then the peak RSS (VmHWM, reset just
before) of a second one above the RSS before it: the step's extra memory. The loss of the
measured step is recorded beside it (both trainers compute the same loss). Writes
results/trl-gkd-memory-<date>.json with the machine and its load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_kernels import _proc_status, _reset_peak_rss, environment

HERE = Path(__file__).resolve().parent


def _models(vocab: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(width: int, seed: int):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=seq, tie_word_embeddings=False))

    return llama(64, 1), llama(128, 0)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def worker(kind: str, vocab: int, seq: int, batch: int) -> dict:
    """One trainer's measured step (run in its own process)."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fastkd.integrations.trl import FusedGKDTrainer

    student, teacher = _models(vocab, seq)
    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(output_dir=out, per_device_train_batch_size=batch, report_to=[],
                           lmbda=0.0, bf16=False, gradient_checkpointing=False,
                           max_length=seq, save_strategy="no", disable_tqdm=True)
        cls = FusedGKDTrainer if kind == "fastkd" else GKDTrainer
        trainer = cls(model=student, teacher_model=teacher, args=config,
                      processing_class=_tokenizer(vocab),
                      train_dataset=Dataset.from_dict({"messages": [[]]}))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # a prompt quarter, as GKD's collator masks it
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
        trainer.training_step(trainer.model, dict(inputs))  # warm-up
        trainer.model.zero_grad(set_to_none=False)
        before = _proc_status("VmRSS")
        _reset_peak_rss()
        loss = trainer.training_step(trainer.model, dict(inputs))
        peak = _proc_status("VmHWM")
    return {"trainer": cls.__name__, "loss": float(loss), "rss_before_mib": before / 2**20,
            "peak_extra_mib": (peak - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", choices=["trl", "fastkd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab, args.seq, args.batch)))
        return
    runs = {}
    for kind in ("trl", "fastkd"):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--vocab", str(args.vocab), "--seq",
             str(args.seq), "--batch", str(args.batch)], capture_output=True, text=True,
            check=False)
        if done.returncode != 0:
            sys.exit(f"trl_gkd_memory.py: the {kind} worker failed:\n{done.stderr[-3000:]}")
        runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{runs[kind]['trainer']:>16}: loss {runs[kind]['loss']:.6f}, peak extra "
              f"{runs[kind]['peak_extra_mib']:8.1f} MiB", flush=True)
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"one fp32 (B, T, V) logit tensor: {logits_mib:.1f} MiB; fastkd / TRL extra memory "
          f"{runs['fastkd']['peak_extra_mib'] / runs['trl']['peak_extra_mib']:.3f}")
    record = {
        "environment": environment("cpu"),
        "shape": {"vocab": args.vocab, "seq": args.seq, "batch": args.batch,
                  "student_hidden": 64, "teacher_hidden": 128},
        "fp32_logits_mib": logits_mib, "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"trl-gkd-memory-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()

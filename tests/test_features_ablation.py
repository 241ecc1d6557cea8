"""`fastkd distill --ablation` at the tiny demo scale: every row trains and is reported."""

from __future__ import annotations

import math
import re

from fastkd.distill.ablation import ROWS
from fastkd.distill.cli import main


def test_ablation_runs_every_row(tmp_path, capsys):
    assert main(["distill", "--ablation", "--demo-scale", "tiny", "--output-dir", str(tmp_path),
                 "--logging-steps", "2"]) == 0
    out = capsys.readouterr().out
    table = {name: (float(ppl), float(wall)) for name, ppl, wall in
             re.findall(r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \|$", out, re.MULTILINE)}
    assert list(table) == list(ROWS), out
    assert all(1 < ppl < 10_000 and math.isfinite(wall) for ppl, wall in table.values())
    # the CE-only row matches the demo's CE student; every distilled row beats it (seeded)
    assert all(table[name][0] < table["CE only"][0] for name in ("logits KD", "+ hidden",
                                                                 "+ attention", "+ FFN"))
    # the feature rows logged their terms
    logged = (tmp_path / "ablation" / "plus_FFN" / "metrics.jsonl").read_text()
    assert all(f'"feature_{t}"' in logged for t in ("hidden", "attention", "ffn"))

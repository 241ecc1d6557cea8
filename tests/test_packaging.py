"""The built wheel installs fastkd with its kernels (kernels/ -> fastkd.kernels) and csrc/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_imports_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fastkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastkd/kernels/kd_rows.py" in names
    assert "fastkd/kernels/multi_teacher_rows.py" in names
    assert "fastkd/csrc/__init__.py" in names
    # PEP 639: the license is an SPDX expression (a TOML table is deprecated by setuptools)
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    modules = sorted(
        "fastkd." + str(path.relative_to(target / "fastkd").with_suffix("")).replace("/", ".")
        for path in (target / "fastkd").rglob("*.py")
        if path.name != "__init__.py" and path.name != "__main__.py"
    )
    script = (
        "import importlib, fastkd\n"
        f"assert fastkd.__file__.startswith({str(target)!r}), fastkd.__file__\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(len(fastkd.__all__))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(target), "TRITON_INTERPRET": "1",
                                          "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) >= 3

"""Every Triton kernel compiles to a Hopper (sm_90) cubin, on this machine, without a GPU.

The interpreter accepts Python that the compiler rejects (tl.dot blocks below 16, shapes that
are not constexpr, ...); compiling ahead of time for the H100's target catches that here.
The compiler needs the interpreter off, so it runs in a subprocess (tests/hopper_compile.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("hopper_compile.py")


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=SCRIPT.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_compiles_for_sm90(results):
    assert len(results) >= 12 + 32 + 14
    failures = {name: message for name, message in results.items() if message != "ok"}
    assert not failures, failures

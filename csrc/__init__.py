"""The C++ (CPU) and CUDA C++ row ops, built on first use with ninja.

``load()`` compiles ops.cpp (the schemas), rows_cpu.cpp and, on a CUDA build of torch,
rows_cuda.cu into ``torch.ops.fastkd`` with ``torch.utils.cpp_extension.load``. The build
folder is keyed by the torch version and the CPU instruction level that ATen dispatches to
(``torch.backends.cpu.get_cpu_capability()``), never ``-march=native``: a cache shared by
machines of different CPUs never serves a binary built for another one.

``FASTKD_CSRC=0`` turns the extension off; ``FASTKD_CSRC=1`` makes a failed build an error
(by default it warns once and the "torch" backend serves instead).
"""

from __future__ import annotations

import fcntl
import functools
import os
import warnings
from pathlib import Path

import torch

SOURCES = Path(__file__).parent
# ATen's vector headers pick their SIMD width from CPU_CAPABILITY_*; without these flags
# at::vec is scalar (about 8x slower). x86-64-v4 / v3 are the instruction levels ATen's
# AVX512 / AVX2 kernels are built for.
CAPABILITY_FLAGS = {
    "AVX512": ["-march=x86-64-v4", "-mprefer-vector-width=512", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-march=x86-64-v3", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}


def mode() -> str:
    """``FASTKD_CSRC``: "0" (off), "1" (required) or "auto" (the default)."""
    value = os.environ.get("FASTKD_CSRC", "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise ValueError(f"FASTKD_CSRC must be 0, 1 or auto, got {value!r}")
    return value


def cpu_capability() -> str:
    """The instruction level ATen dispatches to here: AVX512, AVX2 or DEFAULT."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in CAPABILITY_FLAGS else "DEFAULT"


def build_directory() -> Path:
    """Where the extension is built: one folder per torch version, CPU level and CUDA build."""
    root = os.environ.get("FASTKD_CSRC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastkd", "csrc")
    cuda = f"-cu{torch.version.cuda}" if with_cuda() else ""
    return Path(root) / f"torch{torch.__version__.replace('+', '-')}{cuda}-{cpu_capability()}"


def with_cuda() -> bool:
    """A CUDA build of torch with a GPU: build rows_cuda.cu too."""
    return torch.version.cuda is not None and torch.cuda.is_available()


@functools.cache
def load() -> bool:
    """Build (or reuse) and load the extension; True when ``torch.ops.fastkd.kd_rows`` exists.

    Returns False with one warning saying why when the build fails (``FASTKD_CSRC=1``: raises)
    or when ``FASTKD_CSRC=0``.
    """
    if mode() == "0":
        return False
    try:
        _build_and_load()
    except Exception as error:  # a compiler or ninja missing, a failed build
        if mode() == "1":
            raise RuntimeError(f"fastkd: building the C++ row ops failed: {error}") from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        warnings.warn(f"fastkd: the C++ row ops did not build ({first_line}); backend='auto' "
                      "uses the torch row ops on CPU (FASTKD_CSRC=1 makes this an error)",
                      RuntimeWarning, stacklevel=3)
        return False
    from fastkd.ops import register_native_fakes

    register_native_fakes()  # the shared fake kernels, so torch.compile traces the C++ ops
    return True


@torch.compiler.assume_constant_result
def available() -> bool:
    """``load()``, for code that torch.compile traces: the build-or-load (files, locks, a
    compiler) runs once at trace time and its answer is a constant of the graph."""
    return load()


def _build_and_load() -> None:
    from torch.utils.cpp_extension import load as cpp_load

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)  # cpp_extension's lock needs the folder
    sources = [SOURCES / "ops.cpp", SOURCES / "rows_cpu.cpp", SOURCES / "gemm_cpu.cpp"]
    if with_cuda():
        sources.append(SOURCES / "rows_cuda.cu")
    # cpp_extension guards a build with a lock file that a killed build leaves behind, and then
    # every later load waits on it forever. An flock is released when its process dies: whoever
    # holds it is the only builder, so a lock file found then is stale.
    with open(folder / "fastkd.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        cpp_load(
            name="fastkd_csrc",
            sources=[str(s) for s in sources],
            build_directory=str(folder),
            # at::parallel_for is an OpenMP loop in ATen's headers: without -fopenmp it runs
            # every row on one thread (libgomp itself comes with torch)
            extra_cflags=["-O3", "-fopenmp", *CAPABILITY_FLAGS[cpu_capability()]],
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"],
            is_python_module=False,
            verbose=False,
        )

"""How dovetail's kernel library is compiled: one place for the runtime's first-use build and the wheel's (setup.py).

It imports nothing from the package, so setup.py can load it by path before the package is installed. The
library's file name carries a digest of its sources and flags: a wheel's prebuilt copy and a cached one are
found under the same name, and a changed source never runs an old binary. One binary serves AVX2 and AVX-512
CPUs (the kernels choose their path at run time), and libstdc++ is linked in statically so that it loads on
deploy machines whose libstdc++ is older than the build machine's.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FOLDER = Path(__file__).parent / "kernels"
SOURCES = [FOLDER / name for name in ("library.cpp", "matmul_rows.cpp", "matmul_float_rows.cpp", "tree_attention.cpp",
                                      "arena.h", "ops.h", "ort_abi.h")]
COMPILE = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-static-libstdc++", "-static-libgcc"]


def library_name() -> str:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(COMPILE).encode()).hexdigest()[:16]
    return f"libdovetail_rows-{digest}.so"


def find_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def compile_library(compiler: str, library: Path) -> str:
    """Build the library at `library` (atomically: a reader never sees half a file); '' or the first error line."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        sources = [str(source) for source in SOURCES if source.suffix == ".cpp"]
        run = subprocess.run([compiler, *COMPILE, *sources, "-o", str(built)], capture_output=True, text=True)
        if run.returncode:
            first = next((line for line in run.stderr.splitlines() if "error" in line), run.stderr.strip()[:200])
            return first or f"{compiler} exited with status {run.returncode}"
        os.replace(built, library)
    return ""

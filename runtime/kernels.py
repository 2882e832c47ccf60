"""dovetail's own ONNX Runtime kernels, built from source on first use.

ORT's MatMulNBits and GroupQueryAttention compute a lone row by another path than a row among several, so a
quantized verify forward had to be padded to stay exact; MatMulNBits unpacks its weights again for every row, and
GroupQueryAttention sums a tree row's keys in another order than sequential decoding. `MatMulNBitsRows`
(kernels/matmul_rows.cpp) computes every row alike and unpacks each weight tile once for up to 8 rows;
`TreeAttention` (kernels/tree_attention.cpp) computes every row alike and a tree row as its token decoded alone;
`MatMulFloatRows` (kernels/matmul_float_rows.cpp) streams fp32 weights from huge pages faster than ORT's MatMul.
C++ with AVX-512 VNNI intrinsics where they pay (AVX2 elsewhere), compiled once per source version into one library
in the cache folder; where no compiler or no such CPU is found, the runtime keeps ORT's kernels and says why.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from dovetail_onnx.runtime.errors import DovetailError

SOURCES = [Path(__file__).parent / "kernels" / name
           for name in ("library.cpp", "matmul_rows.cpp", "matmul_float_rows.cpp", "tree_attention.cpp", "arena.h",
                        "ops.h", "ort_abi.h")]
DOMAIN, ROWS_OP, FLOAT_ROWS_OP, ATTENTION_OP = "dovetail", "MatMulNBitsRows", "MatMulFloatRows", "TreeAttention"
COMPILE = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]


def cache_folder() -> Path:
    """$DOVETAIL_CACHE/kernels, else ~/.cache/dovetail-onnx/kernels (export/load.py keeps models beside it)."""
    return Path(os.environ.get("DOVETAIL_CACHE", Path.home() / ".cache" / "dovetail-onnx")) / "kernels"


def cpu_supports_rows_kernel() -> bool:
    """AVX2, FMA and F16C at least (AVX-512 VNNI is used where present), as /proc/cpuinfo lists them (Linux);
    other systems keep ORT's kernels."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


@functools.cache
def rows_library() -> tuple[Path | None, str]:
    """(path of the built library, '') or (None, why it is not used). DOVETAIL_KERNELS=0 turns it off, to compare
    with or fall back to ONNX Runtime's own kernels; DOVETAIL_KERNEL_ISA=avx2 makes it take its AVX2 path."""
    if (switch := os.environ.get("DOVETAIL_KERNELS", "1")) not in ("0", "1"):
        raise DovetailError(f"DOVETAIL_KERNELS={switch} is neither 0 nor 1; set 0 for ONNX Runtime's own kernels, "
                            "1 (or unset it) for dovetail's")
    if (isa := os.environ.get("DOVETAIL_KERNEL_ISA", "avx2")) != "avx2":
        raise DovetailError(f"DOVETAIL_KERNEL_ISA={isa} is not avx2, the one path it can choose; unset it to let the "
                            "CPU decide")
    if switch == "0":
        return None, "DOVETAIL_KERNELS=0"
    if not cpu_supports_rows_kernel():
        return None, "this CPU has no AVX2"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        return None, "no C++ compiler found (install g++ or set CXX)"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(COMPILE).encode()).hexdigest()[:16]
    library = cache_folder() / f"libdovetail_rows-{digest}.so"
    if library.is_file():
        return library, ""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            sources = [str(source) for source in SOURCES if source.suffix == ".cpp"]
            run = subprocess.run([compiler, *COMPILE, *sources, "-o", str(built)], capture_output=True, text=True)
            if run.returncode:
                first = next((line for line in run.stderr.splitlines() if "error" in line), run.stderr.strip()[:200])
                return None, f"building it failed ({first})"
            os.replace(built, library)
    except OSError as exc:  # an unwritable cache folder, a CXX that does not exist
        return None, f"building it failed ({exc.strerror or exc}: {exc.filename}; set DOVETAIL_CACHE or CXX)"
    return library, ""


def rows_kernel_takes(bits: int, k: int, n: int, block_size: int, inputs: int, float_zero_points: bool = False) -> bool:
    """Which MatMulNBits nodes MatMulNBitsRows computes: 4 or 8 bits, symmetric (A, B and scales) or with float
    zero points as a fourth input (no packed ones, group index or bias), whole 16-column tiles, and K and the block
    in whole 16-value vectors."""
    return (bits in (4, 8) and (inputs == 3 or inputs == 4 and float_zero_points) and n % 16 == 0 and k % 16 == 0
            and block_size % 16 == 0)

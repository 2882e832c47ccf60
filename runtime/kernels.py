"""dovetail's own ONNX Runtime kernels, built from source on first use.

ORT's MatMulNBits and GroupQueryAttention compute a lone row by another path than a row among several, so a
quantized verify forward had to be padded to stay exact; MatMulNBits unpacks its weights again for every row, and
GroupQueryAttention sums a tree row's keys in another order than sequential decoding. `MatMulNBitsRows`
(kernels/matmul_rows.cpp) computes every row alike and unpacks each weight tile once for up to 8 rows;
`TreeAttention` (kernels/tree_attention.cpp) computes every row alike and a tree row as its token decoded alone;
`MatMulFloatRows` (kernels/matmul_float_rows.cpp) streams fp32 weights from huge pages faster than ORT's MatMul.
C++ with AVX-512 VNNI intrinsics where they pay (AVX2 elsewhere), in one library: a wheel carries it prebuilt, a
source install compiles it once per source version into the cache folder (kernel_build.py); where neither is
possible (no compiler, no such CPU), the runtime keeps ORT's kernels and says why.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.kernel_build import FOLDER, compile_library, find_compiler, library_name

DOMAIN, ROWS_OP, FLOAT_ROWS_OP, ATTENTION_OP = "dovetail", "MatMulNBitsRows", "MatMulFloatRows", "TreeAttention"


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
    prebuilt, library = FOLDER / library_name(), cache_folder() / library_name()
    for found in (prebuilt, library):  # a wheel's copy, else one built here before
        if found.is_file():
            return found, ""
    compiler = find_compiler()
    if not compiler:
        return None, "no C++ compiler found (install g++ or set CXX, or install a wheel that carries the kernels)"
    try:
        if error := compile_library(compiler, library):
            return None, f"building it failed ({error})"
    except OSError as exc:  # an unwritable cache folder, a CXX that does not exist
        return None, f"building it failed ({exc.strerror or exc}: {exc.filename}; set DOVETAIL_CACHE or CXX)"
    return library, ""


def rows_kernel_takes(bits: int, k: int, n: int, block_size: int, inputs: int, float_zero_points: bool = False) -> bool:
    """Which MatMulNBits nodes MatMulNBitsRows computes: 4 or 8 bits, symmetric (A, B and scales) or with float
    zero points as a fourth input (no packed ones, group index or bias), whole 16-column tiles, and K and the block
    in whole 16-value vectors."""
    return (bits in (4, 8) and (inputs == 3 or inputs == 4 and float_zero_points) and n % 16 == 0 and k % 16 == 0
            and block_size % 16 == 0)

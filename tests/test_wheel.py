"""A built wheel carries the compiled kernel library and runs it on a machine that cannot compile."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dovetail_onnx.runtime.kernel_build import library_name

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """`pip wheel` of this checkout (build isolation off: the venv's setuptools, no download), and what it printed."""
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(ROOT),
                          "-w", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    [built] = out.glob("*.whl")
    return built, run.stdout + run.stderr


def test_the_wheel_holds_the_kernels_and_builds_quietly(wheel):
    built, printed = wheel
    assert "would be ignored" not in printed and "Warning" not in printed, printed
    assert built.name.endswith("-py3-none-linux_x86_64.whl")  # one platform wheel for every Python version
    names = zipfile.ZipFile(built).namelist()
    assert f"dovetail_onnx/runtime/kernels/{library_name()}" in names
    assert "dovetail_onnx/setup.py" not in names and not any(n.split("/")[0] in ("export", "runtime", "serve", "cli")
                                                              for n in names)


def test_an_install_from_the_wheel_runs_its_kernels_without_a_compiler(wheel, tmp_path):
    target, cache = tmp_path / "site", tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel[0])],
                   check=True, capture_output=True)
    environment = {**os.environ, "PYTHONPATH": str(target), "CXX": "/no/such/compiler", "DOVETAIL_CACHE": str(cache)}
    run = subprocess.run([sys.executable, "-c", "from dovetail_onnx.runtime.kernels import rows_library; "
                          "print(rows_library())"], env=environment, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert str(target / "dovetail_onnx" / "runtime" / "kernels" / library_name()) in run.stdout, run.stdout
    assert not cache.exists()  # nothing was compiled

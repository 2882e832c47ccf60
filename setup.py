"""A built wheel carries dovetail's compiled kernel library, so a deploy machine with no C++ compiler runs at full
speed. Everything else is declared in pyproject.toml; a source or editable install compiles the kernels at first
use instead (runtime/kernels.py)."""
import importlib.util
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py


def kernel_build():
    """runtime/kernel_build.py, loaded by path: the package is not importable while it is being built."""
    spec = importlib.util.spec_from_file_location("kernel_build", Path(__file__).parent / "runtime" / "kernel_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernels(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        """The repository's root is the package dovetail_onnx (pyproject.toml), and this file is not one of its
        modules."""
        return [module for module in super().find_package_modules(package, package_dir)
                if (module[0], module[1]) != ("dovetail_onnx", "setup")]

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        build = kernel_build()
        compiler = build.find_compiler()
        if not compiler:  # a source install still works: the runtime compiles at first use, or keeps ORT's kernels
            self.warn("no C++ compiler (g++, or CXX): this build carries no kernel library")
            return
        library = Path(self.build_lib) / "dovetail_onnx" / "runtime" / "kernels" / build.library_name()
        for old in library.parent.glob("libdovetail_rows-*.so"):  # an earlier build's, of other sources
            old.unlink()
        if error := build.compile_library(compiler, library):
            raise SystemExit(f"error: compiling dovetail's kernels failed: {error}")


class WithKernels(Distribution):
    """Installs into platlib and tags the wheel with its platform: it holds a compiled library."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """The library is plain C ABI (ONNX Runtime's custom-op API), not a Python extension: one wheel per platform
    serves every Python version."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(distclass=WithKernels, cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": PlatformWheel})

"""Builds the optional C++ extension `affect_jax.ops._native`, XLA FFI custom calls: oneDNN
convolutions (affect_jax/ops/onednn_conv.cc), Winograd F(4x4, 3x3) convolutions (winograd.cc;
oneDNN matmul), BatchNorm and max-pool kernels (batch_norm.cc, max_pool.cc; OpenMP), and the
revision check (native.cc). Each .cc file is driven by the Python module of the same stem.

Everything else about the package is in pyproject.toml. The extension is compiled from source
by this install, against the headers of the `onednn-devel-cpu-gomp` build dependency and the
`libdnnl.so.3` of `onednn-cpu-gomp` (both from PyPI), and the vendored XLA FFI headers of
jaxlib 0.10.2 (third_party/xla_ffi). If that is impossible (no C++ compiler, another platform,
AFFECT_JAX_BUILD_NATIVE_KERNELS=0), the install still succeeds without it and affect-jax falls
back to XLA's code (`affect_jax.ops.native.unavailable_reason()` says why).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _dist_file(dist: str, suffix: str) -> Path | None:
    """The installed file of distribution `dist` whose recorded path ends with `suffix`."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.as_posix().endswith(suffix):
            return Path(str(f.locate())).resolve()
    return None


SOURCES = ("native", "onednn_conv", "winograd", "batch_norm", "max_pool")
HEADERS = ("kernel_util", "onednn_util")


def _build_switched_off() -> bool:
    if "AFFECT_JAX_BUILD_NATIVE_KERNELS" in os.environ:
        return os.environ["AFFECT_JAX_BUILD_NATIVE_KERNELS"] == "0"
    if "AFFECT_JAX_BUILD_ONEDNN" in os.environ:
        print(
            "affect-jax: AFFECT_JAX_BUILD_ONEDNN is renamed AFFECT_JAX_BUILD_NATIVE_KERNELS; "
            "honouring it"
        )
        return os.environ["AFFECT_JAX_BUILD_ONEDNN"] == "0"
    return False


def _native_extension() -> list[Extension]:
    if _build_switched_off():
        print("affect-jax: switched off, not building the native extension")
        return []
    if sys.platform != "linux" or platform.machine() != "x86_64":
        print("affect-jax: the native extension is built on Linux x86_64 only")
        return []
    header = _dist_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    library = _dist_file("onednn-cpu-gomp", "/libdnnl.so.3")
    if header is None or library is None:
        print(
            "affect-jax: onednn-devel-cpu-gomp not found in the build environment; "
            "building without the native extension"
        )
        return []
    return [
        Extension(
            "affect_jax.ops._native",
            sources=[f"affect_jax/ops/{stem}.cc" for stem in SOURCES],
            depends=[f"affect_jax/ops/{stem}.h" for stem in HEADERS],
            include_dirs=[str(header.parent.parent.parent), str(ROOT / "third_party" / "xla_ffi")],
            # Linking the file records its soname (libdnnl.so.3) as a dependency; at run time
            # affect_jax.ops.native loads the installed onednn-cpu-gomp copy before the extension.
            extra_objects=[str(library)],
            # No FMA contraction: the BatchNorm kernels recompute the forward's ReLU mask exactly.
            extra_compile_args=["-std=c++17", "-O3", "-fopenmp", "-ffp-contract=off", "-w"],
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]


def _not_built(error: Exception) -> None:
    print(
        f"affect-jax: WARNING: native extension not built ({error}); affect-jax will use XLA's code"
    )


class OptionalBuildExt(build_ext):
    """A failed extension build is a warning: the package works without it.

    Both steps are guarded: a failed compile, and then (editable installs) the copy of the
    library that was never built.
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler/toolchain failure
            _not_built(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            _not_built(e)


setup(ext_modules=_native_extension(), cmdclass={"build_ext": OptionalBuildExt})

"""The optional C++ extension (`affect_jax.ops._native`): loading it, registering its kernels
with XLA, calling them, and the choice between them and XLA's own code.

The extension holds four kinds of kernels, each driven by the Python module of the same stem:
oneDNN's direct convolutions (`onednn_conv.cc`), Winograd F(4x4, 3x3) convolutions
(`winograd.cc`), training-mode BatchNorm (`batch_norm.cc`) and max pooling (`max_pool.cc`);
`native.cc` reports the extension's revision and the oneDNN version it was built against. It
is compiled by the package's own install (setup.py) against the oneDNN of the
`onednn-cpu-gomp` wheel. Each op module declares its XLA FFI targets with `register_targets`
(as jax's `examples/ffi` modules do); they are registered with XLA:CPU when the extension is
loaded, on first use.

When the extension was not built, cannot be loaded, is out of date, or is switched off with
``AFFECT_JAX_NATIVE_KERNELS=0``, `available()` is False, every op's 'auto' choice is XLA and
`unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

ONEDNN_DIST = "onednn-cpu-gomp"
ONEDNN_VERSION = 30200  # 3.2.0, the version setup.py compiles against
# affect_jax_extension_revision() of the current C++ sources (native.cc; bumped with handler
# signatures and with the build).
EXTENSION_REVISION = 8
EXTENSION = "affect_jax.ops._native"
_OLD_EXTENSION = "affect_jax.ops._onednn"  # its name before revision 5
SWITCH = "AFFECT_JAX_NATIVE_KERNELS"
_OLD_SWITCH = "AFFECT_JAX_ONEDNN"  # its name before revision 5; honoured with a warning
# The values of config.conv_impl, config.batch_norm_impl and config.pool_impl.
IMPLS = ("auto", "xla", "native")
# What the kernels compute in (activations; statistics and sums are float32 or wider).
DTYPES = (jnp.float32, jnp.bfloat16)

# FFI target name -> handler symbol in the extension, as the op modules declare them.
_SYMBOLS: dict[str, str] = {}
_registered: set[str] = set()


def register_targets(symbols: Mapping[str, str]) -> None:
    """Declares an op module's FFI targets (target name -> the extension's handler symbol).

    They are registered with XLA:CPU when the extension loads (`available()`), or on their
    first `call_kernel` if it was loaded before they were declared.
    """
    _SYMBOLS.update(symbols)


def _switched_off() -> str:
    """The variable that switches the kernels off ('' if none does)."""
    off = ("0", "false", "off", "no")
    if SWITCH in os.environ:
        return SWITCH if os.environ[SWITCH].strip().lower() in off else ""
    if _OLD_SWITCH in os.environ:
        logging.warning(
            "%s is renamed %s; honouring %s=%s",
            _OLD_SWITCH,
            SWITCH,
            _OLD_SWITCH,
            os.environ[_OLD_SWITCH],
        )
        return _OLD_SWITCH if os.environ[_OLD_SWITCH].strip().lower() in off else ""
    return ""


def _find_libdnnl() -> str:
    try:
        files = metadata.distribution(ONEDNN_DIST).files or []
    except metadata.PackageNotFoundError as e:
        raise OSError(f"the {ONEDNN_DIST} wheel is not installed") from e
    for f in files:
        if f.name == "libdnnl.so.3":
            return str(f.locate())
    raise OSError(f"{ONEDNN_DIST} is installed but holds no libdnnl.so.3")


def _not_built() -> str:
    if importlib.util.find_spec(_OLD_EXTENSION) is not None:
        return (
            f"only an extension of an older affect-jax is built ({_OLD_EXTENSION}); "
            "reinstall affect-jax to rebuild it"
        )
    return (
        "the extension was not built at install time (see the install log; it needs g++ "
        "and the onednn-devel-cpu-gomp build dependency)"
    )


def _register(lib: ctypes.CDLL, target: str) -> None:
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[target])), platform="cpu"
    )
    _registered.add(target)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """Loads the extension once and registers the declared targets: (library, '') or
    (None, why not)."""
    switch = _switched_off()
    if switch:
        return None, f"switched off by {switch}"
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or not spec.origin:
        return None, _not_built()
    try:
        # Global so the extension's DT_NEEDED libdnnl.so.3 resolves to this copy.
        ctypes.CDLL(_find_libdnnl(), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        return None, f"cannot load the extension: {e}"
    lib.affect_jax_onednn_version.restype = ctypes.c_int
    version = lib.affect_jax_onednn_version()
    if version != ONEDNN_VERSION:
        return None, f"libdnnl is version {version}, the extension was built for {ONEDNN_VERSION}"
    missing = [symbol for symbol in _SYMBOLS.values() if not hasattr(lib, symbol)]
    revision = lib.affect_jax_extension_revision()
    if missing or revision != EXTENSION_REVISION:
        what = (
            f"no {', '.join(missing)}"
            if missing
            else (f"revision {revision}, the Python code needs {EXTENSION_REVISION}")
        )
        return None, f"the extension is out of date ({what}); reinstall affect-jax to rebuild it"
    for target in _SYMBOLS:
        _register(lib, target)
    return lib, ""


def available() -> bool:
    """True when the extension is built, loadable, current and not switched off."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


def call_kernel(
    what: str,
    target: str,
    out: Any,
    *operands: jax.Array,
    aliases: Mapping[int, int] | None = None,
    **attrs: Any,
) -> Any:
    """Runs the extension's FFI target `target` (of op `what`, for the error) on `operands`;
    `aliases` maps operand indices to the results that are written into their buffers."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"native {what} is unavailable: {unavailable_reason()}")
    if target not in _registered:
        if not hasattr(lib, _SYMBOLS[target]):
            raise RuntimeError(
                f"the extension is out of date (no {_SYMBOLS[target]}); "
                "reinstall affect-jax to rebuild it"
            )
        _register(lib, target)
    return jax.ffi.ffi_call(target, out, input_output_aliases=dict(aliases or {}))(
        *operands, **attrs
    )


def library() -> ctypes.CDLL:
    """The loaded extension, for its plain C functions (those that are not FFI handlers)."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the C++ extension is unavailable: {unavailable_reason()}")
    return lib


def allowed_impls(impl: str) -> str | None:
    """What an impl setting may be, when `impl` is not one of IMPLS (None when it is)."""
    if impl in IMPLS:
        return None
    hint = ""
    if impl in ("onednn", "winograd"):
        hint = " ('native', the extension's kernels, replaced 'onednn' and 'winograd')"
    elif impl in ("dot1x1", "dot", "im2col"):
        hint = " (the XLA variants are no longer options: 'auto' picks the fastest path)"
    return f"one of {', '.join(map(repr, IMPLS))}{hint}"


def check_impl(field: str, impl: str) -> None:
    """Raises one clear line unless `impl` is one of IMPLS; `field` names the setting (the ops'
    guard for direct callers; a run's config is checked by `config_checks`)."""
    allowed = allowed_impls(impl)
    if allowed:
        raise ValueError(f"{field}={impl!r} is not an option: expected {allowed}")


def applies(dtype: Any = jnp.float32) -> bool:
    """Whether 'auto' picks the extension's kernels: float32/bfloat16 on CPU with the extension
    available and one device in the process (a custom call has no partitioning rule, so with
    several devices XLA would gather the batch onto each)."""
    return (
        jnp.dtype(dtype) in DTYPES
        and jax.default_backend() == "cpu"
        and available()
        and jax.device_count() == 1
    )


def resolve_impl(what: str, impl: str, dtype: Any = jnp.float32) -> str:
    """Validates `impl` (one of IMPLS) for op `what` and maps 'auto' to 'native' where
    `applies(dtype)`, else to 'xla'."""
    check_impl(f"{what} impl", impl)
    if impl == "native" and not available():
        raise ValueError(
            f"{what} impl 'native' is unavailable: {unavailable_reason()}; "
            "use 'auto' to fall back to XLA"
        )
    if impl != "auto":
        return impl
    return "native" if applies(dtype) else "xla"

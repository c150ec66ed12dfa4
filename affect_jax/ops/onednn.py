"""oneDNN convolutions for XLA:CPU through XLA FFI custom calls (`onednn_conv.cc`).

The same extension holds affect-jax's Winograd convolutions and its training-mode BatchNorm and
max-pool kernels (`winograd_kernels.cc`, `batch_norm_kernels.cc`, `max_pool_kernels.cc`, used
by `ops.winograd`, `ops.batch_norm` and `ops.pool`); this module loads and registers them all.

The shared library is compiled by the package's own install (setup.py) against the oneDNN of
the `onednn-cpu-gomp` wheel. When it was not built, cannot be loaded, or is switched off with
``AFFECT_JAX_ONEDNN=0``, `available()` is False and `ops.conv` falls back to XLA's kernels;
`unavailable_reason()` says why.

`conv2d` is differentiable (custom VJP: oneDNN's input- and weight-gradient kernels) and
computes `lax.conv_general_dilated`'s function for NHWC x HWIO in float32 or bfloat16.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ONEDNN_DIST = 'onednn-cpu-gomp'
ONEDNN_VERSION = 30200  # 3.2.0, the version setup.py compiles against
# affect_jax_extension_revision() of the current C++ sources (bumped with handler signatures).
EXTENSION_REVISION = 4
_EXTENSION = 'affect_jax.ops._onednn'
_TARGETS = {
    'forward': ('affect_jax_onednn_conv_forward', 'AffectJaxConvForward'),
    'backward_data': ('affect_jax_onednn_conv_backward_data', 'AffectJaxConvBackwardData'),
    'backward_weights': ('affect_jax_onednn_conv_backward_weights',
                         'AffectJaxConvBackwardWeights'),
}
# The training-mode BatchNorm kernels built into the same extension (batch_norm_kernels.cc),
# called by ops.batch_norm.
BATCH_NORM_TARGETS = {
    'forward': ('affect_jax_batch_norm_forward', 'AffectJaxBatchNormForward'),
    'backward': ('affect_jax_batch_norm_backward', 'AffectJaxBatchNormBackward'),
    'forward_add': ('affect_jax_batch_norm_add_forward', 'AffectJaxBatchNormAddForward'),
    'backward_add': ('affect_jax_batch_norm_add_backward', 'AffectJaxBatchNormAddBackward'),
}
# The max-pool kernels (max_pool_kernels.cc), called by ops.pool.
MAX_POOL_TARGETS = {
    'forward': ('affect_jax_max_pool_forward', 'AffectJaxMaxPoolForward'),
    'backward': ('affect_jax_max_pool_backward', 'AffectJaxMaxPoolBackward'),
}
# The Winograd F(4x4, 3x3) convolution kernels (winograd_kernels.cc), called by ops.winograd.
WINOGRAD_TARGETS = {
    'forward': ('affect_jax_winograd_forward', 'AffectJaxWinogradForward'),
    'backward_weights': ('affect_jax_winograd_backward_weights',
                         'AffectJaxWinogradBackwardWeights'),
}
DTYPES = (jnp.float32, jnp.bfloat16)
Pads = tuple[tuple[int, int], tuple[int, int]]


def _find_libdnnl() -> str:
    try:
        files = metadata.distribution(ONEDNN_DIST).files or []
    except metadata.PackageNotFoundError as e:
        raise OSError(f'the {ONEDNN_DIST} wheel is not installed') from e
    for f in files:
        if f.name == 'libdnnl.so.3':
            return str(f.locate())
    raise OSError(f'{ONEDNN_DIST} is installed but holds no libdnnl.so.3')


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """Loads and registers the custom calls once: (library, '') or (None, why not)."""
    if os.environ.get('AFFECT_JAX_ONEDNN', '1').strip().lower() in ('0', 'false', 'off', 'no'):
        return None, 'switched off by AFFECT_JAX_ONEDNN'
    spec = importlib.util.find_spec(_EXTENSION)
    if spec is None or not spec.origin:
        return None, ('the oneDNN extension was not built at install time (see the install log; '
                      'it needs g++ and the onednn-devel-cpu-gomp build dependency)')
    try:
        # Global so the extension's DT_NEEDED libdnnl.so.3 resolves to this copy.
        ctypes.CDLL(_find_libdnnl(), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        return None, f'cannot load the oneDNN extension: {e}'
    lib.affect_jax_onednn_version.restype = ctypes.c_int
    version = lib.affect_jax_onednn_version()
    if version != ONEDNN_VERSION:
        return None, f'libdnnl is version {version}, the extension was built for {ONEDNN_VERSION}'
    targets = (*_TARGETS.values(), *BATCH_NORM_TARGETS.values(), *MAX_POOL_TARGETS.values(),
               *WINOGRAD_TARGETS.values())
    missing = [symbol for _, symbol in targets if not hasattr(lib, symbol)]
    revision = (lib.affect_jax_extension_revision()
                if hasattr(lib, 'affect_jax_extension_revision') else 1)
    if missing or revision != EXTENSION_REVISION:
        what = f'no {", ".join(missing)}' if missing else (
            f'revision {revision}, the Python code needs {EXTENSION_REVISION}')
        return None, (f'the oneDNN extension is out of date ({what}); '
                      'reinstall affect-jax to rebuild it')
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform='cpu')
    return lib, ''


def available() -> bool:
    """True when the oneDNN custom calls are built, loadable and registered."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


# The paths of the extension's hand-written kernels (ops.batch_norm, ops.pool).
KERNEL_IMPLS = ('auto', 'xla', 'native')


def resolve_kernel_impl(what: str, impl: str, dtype: Any) -> str:
    """Validates `impl` (one of KERNEL_IMPLS) for op `what`; maps 'auto' to 'native' for
    float32/bfloat16 on CPU when the extension is available and the process has one device (a
    custom call has no partitioning rule), else to 'xla'."""
    if impl not in KERNEL_IMPLS:
        raise ValueError(f'{what} impl must be one of {KERNEL_IMPLS}, got {impl!r}')
    if impl == 'native' and not available():
        raise ValueError(f"{what} impl 'native' is unavailable: "
                         f"{unavailable_reason()}; use 'auto' to fall back to XLA")
    if impl != 'auto':
        return impl
    native = (jnp.dtype(dtype) in DTYPES and jax.default_backend() == 'cpu' and available()
              and jax.device_count() == 1)
    return 'native' if native else 'xla'


def call_kernel(what: str, target: str, out: Any, *operands: jax.Array, **attrs: Any) -> Any:
    """Runs the extension's custom call `target` (op `what`, for the error) on `operands`."""
    if not available():  # also registers the kernels
        raise RuntimeError(f'native {what} is unavailable: {unavailable_reason()}')
    return jax.ffi.ffi_call(target, out)(*operands, **attrs)


def _require() -> None:
    if not available():
        raise RuntimeError(f'oneDNN convolutions are unavailable: {unavailable_reason()}')


def _call(direction: str, out: Any, *operands: jax.Array, strides: tuple[int, int],
          pads: Pads, **attrs: int) -> Any:
    _require()
    (pt, pb), (pl, pr) = pads
    return jax.ffi.ffi_call(_TARGETS[direction][0], out)(
        *operands, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
        pad_right=np.int64(pr), **{k: np.int64(v) for k, v in attrs.items()})


def _out_shape(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads
               ) -> tuple[int, int, int, int]:
    (pt, pb), (pl, pr) = pads
    kh, kw, _, cout = kernel.shape
    ho = (x.shape[1] + pt + pb - kh) // strides[0] + 1
    wo = (x.shape[2] + pl + pr - kw) // strides[1] + 1
    return (x.shape[0], ho, wo, cout)


def _written(dtype: Any, compute: Any) -> Any:
    """oneDNN writes float32 results directly; other dtypes are computed in `compute`."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float32 else compute


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads,
           compute_dtype: Any = None, bias: jax.Array | None = None,
           relu: bool = False) -> jax.Array:
    """NHWC x HWIO convolution (+ `bias` [O], then a ReLU if `relu`) by oneDNN; `strides` and
    `pads` as `lax` takes.

    Computes in `compute_dtype` (float32 or bfloat16; default `x.dtype`) and returns `x.dtype`,
    so bfloat16 convolutions can sit between float32 activations: inputs are cast inside,
    float32 results are written by oneDNN directly, and the gradients come back in the dtypes
    of `x`, `kernel` and `bias`. The input gradient is computed in `compute_dtype` (the dtype
    autodiff of a `lax.conv` in that dtype gives it, and Keras's `mixed_bfloat16` uses): with
    float32 activations around a bfloat16 convolution, half the bytes written (VGG16's bfloat16
    step 1.16x, bit-identical, since VGG16 rounds every input gradient to bfloat16 before
    using it anyway). The ReLU is applied by the convolution kernel to its float32 sums, and
    its gradient mask comes from the output, so no pre-activation is kept.
    """
    compute = jnp.dtype(compute_dtype or x.dtype)
    if compute not in DTYPES:
        raise TypeError(f'oneDNN conv computes in float32 or bfloat16, not {compute}')
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), jnp.float32)
    return _conv2d(x, kernel, bias, strides, pads, compute, bool(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv2d(x, kernel, bias, strides, pads, compute, relu):
    xc, kc = x.astype(compute), kernel.astype(compute)
    out = jax.ShapeDtypeStruct(_out_shape(xc, kc, strides, pads), _written(x.dtype, compute))
    y = _call('forward', out, xc, kc, bias.astype(jnp.float32), strides=strides, pads=pads,
              relu=relu)
    return y.astype(x.dtype)


def _conv2d_fwd(x, kernel, bias, strides, pads, compute, relu):
    xc = x.astype(compute)  # saved in the compute dtype: half the memory for bfloat16
    y = _conv2d(x, kernel, bias, strides, pads, compute, relu)
    if not relu:
        return y, (xc, kernel, bias)
    # The ReLU's mask is y > 0, read from y in the compute dtype: the same value (and, after
    # XLA's common-subexpression elimination, the same buffer) a following convolution saves
    # as its input. Rounding to bfloat16 keeps the sign of every normal float32 (bfloat16 has
    # float32's exponent range).
    return y, (xc, kernel, bias, y.astype(compute))


def _conv2d_bwd(strides, pads, compute, relu, residuals, dy):
    xc, kernel, bias = residuals[:3]
    if relu:
        dy = jnp.where(residuals[3] > 0, dy, jnp.zeros((), dy.dtype))
    kc, dyc = kernel.astype(compute), dy.astype(compute)
    dx = _call('backward_data', jax.ShapeDtypeStruct(xc.shape, compute), dyc, kc,
               strides=strides, pads=pads)
    dw, db = _call('backward_weights', (
        jax.ShapeDtypeStruct(kc.shape, _written(kernel.dtype, compute)),
        jax.ShapeDtypeStruct(bias.shape, jnp.float32)), xc, dyc, strides=strides, pads=pads)
    return dx.astype(dy.dtype), dw.astype(kernel.dtype), db.astype(bias.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)

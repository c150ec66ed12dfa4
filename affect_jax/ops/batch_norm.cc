// Training-mode BatchNorm (forward and backward; optionally fused with a ReLU, and with a
// ResNet block's residual sum before it) as XLA FFI handlers.
//
// Why hand-written: XLA:CPU (jaxlib 0.10) runs every reduction as a separate fusion that first
// writes its float32 input expression to memory (the bfloat16 -> float32 convert, then
// x - mean), so BatchNorm, most of a ResNet50 train step outside the convolutions, makes
// several extra passes over each activation (docs/performance.md). These kernels make the
// textbook minimum: forward one read for the statistics and one read + write to normalise;
// backward one read of (x, dy) for the two channel sums and one read + write for dx. With a
// residual, y = relu(BatchNorm(x) + residual) is formed in float32 and rounded once, and the
// backward pass also writes the residual's gradient (dy through the ReLU) next to dx.
//
// Layout: x, y, dy, dx are [rows, channels] row-major (NHWC flattened), float32 or bfloat16;
// statistics and parameters are float32 [channels]. Sums are accumulated in double, per
// thread over a fixed row split and then added in thread order, so results are deterministic
// for a given thread count and at least as exact as XLA's float32 two-pass statistics (the
// shift by each channel's first value keeps E[(x-k)^2] - E[x-k]^2 exact for large means).
// Arithmetic outside the sums is float32, expression for expression as ops/batch_norm.py,
// and compiled without FMA contraction, so the backward pass recomputes the forward's ReLU
// mask exactly.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "kernel_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using affect_jax::Load;
using affect_jax::ParallelRows;
using affect_jax::Store;

ALWAYS_INLINE float Normalised(float x, float mean, float scale_inv, float bias) {
  return (x - mean) * scale_inv + bias;
}

// Sums over rows [r0, r1) of (x - shift) and (x - shift)^2 into sum[c], sum[C + c].
template <typename T>
ALWAYS_INLINE void StatsImpl(const T* __restrict x, int64_t r0, int64_t r1, int64_t C,
                             const float* __restrict shift, double* __restrict sum) {
  double* __restrict sq = sum + C;
  int64_t r = r0;
  // Four rows per sweep: a quarter of the accumulator loads and stores.
  for (; r + 4 <= r1; r += 4) {
    const T* __restrict row = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const double v0 = static_cast<double>(Load(row, c) - shift[c]);
      const double v1 = static_cast<double>(Load(row + C, c) - shift[c]);
      const double v2 = static_cast<double>(Load(row + 2 * C, c) - shift[c]);
      const double v3 = static_cast<double>(Load(row + 3 * C, c) - shift[c]);
      sum[c] += (v0 + v1) + (v2 + v3);
      sq[c] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
    }
  }
  for (; r < r1; ++r) {
    const T* __restrict row = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const double v = static_cast<double>(Load(row, c) - shift[c]);
      sum[c] += v;
      sq[c] += v * v;
    }
  }
}

VECTOR_CLONES void StatsRows(bool bf16, const void* x, int64_t r0, int64_t r1, int64_t C,
                             const float* shift, double* sum) {
  if (bf16) {
    StatsImpl(static_cast<const uint16_t*>(x), r0, r1, C, shift, sum);
  } else {
    StatsImpl(static_cast<const float*>(x), r0, r1, C, shift, sum);
  }
}

// Instantiates CALL(T, kRelu, kResidual) for the run-time dtype, ReLU and residual flags.
#define AFFECT_JAX_DISPATCH(CALL)                                      \
  if (bf16) {                                                          \
    if (relu && residual) CALL(uint16_t, true, true);                  \
    else if (relu) CALL(uint16_t, true, false);                        \
    else if (residual) CALL(uint16_t, false, true);                    \
    else CALL(uint16_t, false, false);                                 \
  } else {                                                             \
    if (relu && residual) CALL(float, true, true);                     \
    else if (relu) CALL(float, true, false);                           \
    else if (residual) CALL(float, false, true);                       \
    else CALL(float, false, false);                                    \
  }

// The forward's output before rounding: BatchNorm, plus the residual, then the ReLU.
template <bool kRelu, bool kResidual, typename T>
ALWAYS_INLINE float Output(float x, const T* __restrict res, int64_t c, float mean,
                           float scale_inv, float bias) {
  float v = Normalised(x, mean, scale_inv, bias);
  if constexpr (kResidual) v += Load(res, c);
  if constexpr (kRelu) v = std::max(v, 0.0f);
  return v;
}

template <bool kRelu, bool kResidual, typename T>
ALWAYS_INLINE void NormaliseImpl(const T* __restrict x, const T* __restrict res,
                                 T* __restrict y, int64_t r0, int64_t r1, int64_t C,
                                 const float* __restrict mean,
                                 const float* __restrict scale_inv,
                                 const float* __restrict bias) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict in = x + r * C;
    const T* __restrict rr = kResidual ? res + r * C : nullptr;
    T* __restrict out = y + r * C;
    for (int64_t c = 0; c < C; ++c) {
      Store(out, c, Output<kRelu, kResidual>(Load(in, c), rr, c, mean[c], scale_inv[c],
                                             bias[c]));
    }
  }
}

VECTOR_CLONES void NormaliseRows(bool bf16, bool relu, bool residual, const void* x,
                                 const void* res, void* y, int64_t r0, int64_t r1, int64_t C,
                                 const float* mean, const float* scale_inv, const float* bias) {
#define CALL(T, R, S)                                                                       \
  NormaliseImpl<R, S>(static_cast<const T*>(x), static_cast<const T*>(res),                 \
                      static_cast<T*>(y), r0, r1, C, mean, scale_inv, bias)
  AFFECT_JAX_DISPATCH(CALL)
#undef CALL
}

// dy with the ReLU's mask applied (the forward's expression, so the mask is the same).
template <bool kRelu, bool kResidual, typename T>
ALWAYS_INLINE float MaskedGrad(float x, const T* __restrict res, const T* __restrict dy,
                               int64_t c, float mean, float scale_inv, float bias) {
  const float g = Load(dy, c);
  if constexpr (!kRelu) return g;
  float pre = Normalised(x, mean, scale_inv, bias);
  if constexpr (kResidual) pre += Load(res, c);
  // A bit mask, not `? g : 0`, which GCC turns into conditional stores to the sums (no SIMD).
  uint32_t bits;
  std::memcpy(&bits, &g, sizeof(bits));
  bits &= -static_cast<uint32_t>(pre > 0.0f);
  float masked;
  std::memcpy(&masked, &bits, sizeof(masked));
  return masked;
}

// Sums over rows of g (dy through the ReLU, whose mask includes the residual) and g * x_hat
// into sum[c], sum[C + c].
template <bool kRelu, bool kResidual, typename T>
ALWAYS_INLINE void GradSumsImpl(const T* __restrict x, const T* __restrict res,
                                const T* __restrict dy, int64_t r0, int64_t r1, int64_t C,
                                const float* __restrict mean, const float* __restrict inv,
                                const float* __restrict scale_inv,
                                const float* __restrict bias, double* __restrict sum) {
  double* __restrict sum_xhat = sum + C;
  auto terms = [&](int64_t row, int64_t c, double* g_out, double* gx_out) {
    const int64_t i = row * C;
    const float xv = Load(x + i, c);
    const float g = MaskedGrad<kRelu, kResidual>(xv, kResidual ? res + i : nullptr, dy + i, c,
                                                 mean[c], scale_inv[c], bias[c]);
    *g_out = static_cast<double>(g);
    *gx_out = static_cast<double>(g * ((xv - mean[c]) * inv[c]));
  };
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {  // four rows per sweep, as StatsImpl
    for (int64_t c = 0; c < C; ++c) {
      double g0, g1, g2, g3, h0, h1, h2, h3;
      terms(r, c, &g0, &h0);
      terms(r + 1, c, &g1, &h1);
      terms(r + 2, c, &g2, &h2);
      terms(r + 3, c, &g3, &h3);
      sum[c] += (g0 + g1) + (g2 + g3);
      sum_xhat[c] += (h0 + h1) + (h2 + h3);
    }
  }
  for (; r < r1; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      double g, h;
      terms(r, c, &g, &h);
      sum[c] += g;
      sum_xhat[c] += h;
    }
  }
}

VECTOR_CLONES void GradSumsRows(bool bf16, bool relu, bool residual, const void* x,
                                const void* res, const void* dy, int64_t r0, int64_t r1,
                                int64_t C, const float* mean, const float* inv,
                                const float* scale_inv, const float* bias, double* sum) {
#define CALL(T, R, S)                                                                       \
  GradSumsImpl<R, S>(static_cast<const T*>(x), static_cast<const T*>(res),                  \
                     static_cast<const T*>(dy), r0, r1, C, mean, inv, scale_inv, bias, sum)
  AFFECT_JAX_DISPATCH(CALL)
#undef CALL
}

// dx = (scale * inv / n) * (n * g - sum_g - x_hat * sum_g_x_hat), as ops/batch_norm.py; with
// a residual also its gradient dres = g.
template <bool kRelu, bool kResidual, typename T>
ALWAYS_INLINE void GradInputImpl(const T* __restrict x, const T* __restrict res,
                                 const T* __restrict dy, T* __restrict dx, T* __restrict dres,
                                 int64_t r0, int64_t r1, int64_t C,
                                 const float* __restrict mean, const float* __restrict inv,
                                 const float* __restrict scale_inv,
                                 const float* __restrict bias, const float* __restrict factor,
                                 const float* __restrict sum_g,
                                 const float* __restrict sum_g_x_hat, float n) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * C;
    const T* __restrict rr = kResidual ? res + r * C : nullptr;
    const T* __restrict dr = dy + r * C;
    T* __restrict out = dx + r * C;
    T* __restrict dres_r = kResidual ? dres + r * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const float xv = Load(xr, c);
      const float g = MaskedGrad<kRelu, kResidual>(xv, rr, dr, c, mean[c], scale_inv[c],
                                                   bias[c]);
      if constexpr (kResidual) Store(dres_r, c, g);
      const float x_hat = (xv - mean[c]) * inv[c];
      Store(out, c, factor[c] * (n * g - sum_g[c] - x_hat * sum_g_x_hat[c]));
    }
  }
}

VECTOR_CLONES void GradInputRows(bool bf16, bool relu, bool residual, const void* x,
                                 const void* res, const void* dy, void* dx, void* dres,
                                 int64_t r0, int64_t r1, int64_t C, const float* mean,
                                 const float* inv, const float* scale_inv, const float* bias,
                                 const float* factor, const float* sum_g,
                                 const float* sum_g_x_hat, float n) {
#define CALL(T, R, S)                                                                       \
  GradInputImpl<R, S>(static_cast<const T*>(x), static_cast<const T*>(res),                 \
                      static_cast<const T*>(dy), static_cast<T*>(dx), static_cast<T*>(dres), \
                      r0, r1, C, mean, inv, scale_inv, bias, factor, sum_g, sum_g_x_hat, n)
  AFFECT_JAX_DISPATCH(CALL)
#undef CALL
}

// Two per-channel sums over all rows: sums(r0, r1, acc) adds rows [r0, r1) into acc[0, 2C).
// Each thread accumulates its own block; the blocks are added in thread order (deterministic).
template <typename Sums>
std::vector<double> ChannelSums(int64_t rows, int64_t C, Sums sums) {
  const int max_threads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(max_threads) * 2 * C, 0.0), total(2 * C, 0.0);
  ParallelRows(rows, [&](int64_t r0, int64_t r1, int t) { sums(r0, r1, &partial[t * 2 * C]); });
  for (int t = 0; t < max_threads; ++t) {
    for (int64_t i = 0; i < 2 * C; ++i) total[i] += partial[t * 2 * C + i];
  }
  return total;
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("affect_jax BatchNorm: " + what);
}

ffi::Error CheckActivation(const ffi::AnyBuffer& b, const char* what, int64_t* rows,
                           int64_t* C) {
  if (b.element_type() != ffi::DataType::F32 && b.element_type() != ffi::DataType::BF16) {
    return Invalid(std::string(what) + " must be float32 or bfloat16");
  }
  auto d = b.dimensions();
  if (d.size() != 2) return Invalid(std::string(what) + " must be rank 2 [rows, channels]");
  *rows = d[0];
  *C = d[1];
  return ffi::Error::Success();
}

ffi::Error CheckChannels(const ffi::AnyBuffer& b, const char* what, int64_t C) {
  if (b.element_type() != ffi::DataType::F32 || b.dimensions().size() != 1 ||
      b.dimensions()[0] != C) {
    return Invalid(std::string(what) + " must be float32 [channels]");
  }
  return ffi::Error::Success();
}

float* F32(ffi::AnyBuffer& b) { return static_cast<float*>(b.untyped_data()); }

ffi::Error CheckLike(const ffi::AnyBuffer& b, const char* what, const ffi::AnyBuffer& x) {
  int64_t rows, C, r, c;
  if (auto e = CheckActivation(x, "x", &rows, &C); e.failure()) return e;
  if (auto e = CheckActivation(b, what, &r, &c); e.failure()) return e;
  if (b.element_type() != x.element_type() || r != rows || c != C) {
    return Invalid(std::string(what) + " must have x's shape and dtype");
  }
  return ffi::Error::Success();
}

// (y, mean, biased variance, 1 / sqrt(variance + epsilon)) of x over its rows, where
// y = BatchNorm(x) [+ residual] [then ReLU].
ffi::Error ForwardImpl(ffi::AnyBuffer x, const ffi::AnyBuffer* residual_buffer,
                       ffi::AnyBuffer scale, ffi::AnyBuffer bias, ffi::AnyBuffer y,
                       ffi::AnyBuffer mean_out, ffi::AnyBuffer var_out, ffi::AnyBuffer inv_out,
                       float epsilon, bool relu) {
  int64_t rows, C;
  if (auto e = CheckActivation(x, "x", &rows, &C); e.failure()) return e;
  if (auto e = CheckLike(y, "y", x); e.failure()) return e;
  if (residual_buffer != nullptr) {
    if (auto e = CheckLike(*residual_buffer, "residual", x); e.failure()) return e;
  }
  if (rows == 0) return Invalid("x has no rows");
  for (auto [b, what] : {std::pair{&scale, "scale"}, {&bias, "bias"}, {&mean_out, "mean"},
                         {&var_out, "var"}, {&inv_out, "inv"}}) {
    if (auto e = CheckChannels(*b, what, C); e.failure()) return e;
  }
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  const bool residual = residual_buffer != nullptr;
  const void* res = residual ? residual_buffer->untyped_data() : nullptr;
  std::vector<float> shift(C), scale_inv(C);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = bf16 ? Load(static_cast<const uint16_t*>(x.untyped_data()), c)
                    : Load(static_cast<const float*>(x.untyped_data()), c);
  }
  std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
  const std::vector<double> total = ChannelSums(rows, C, [&](int64_t r0, int64_t r1, double* acc) {
    StatsRows(bf16, x.untyped_data(), r0, r1, C, shift.data(), acc);
  });
  float *mean = F32(mean_out), *var = F32(var_out), *inv = F32(inv_out);
  const float* s = F32(scale);
  for (int64_t c = 0; c < C; ++c) {
    const double m = total[c] / rows;
    mean[c] = static_cast<float>(shift[c] + m);
    var[c] = static_cast<float>(std::max(total[C + c] / rows - m * m, 0.0));
    inv[c] = 1.0f / std::sqrt(var[c] + epsilon);
    scale_inv[c] = s[c] * inv[c];
  }
  ParallelRows(rows, [&](int64_t r0, int64_t r1, int) {
    NormaliseRows(bf16, relu, residual, x.untyped_data(), res, y.untyped_data(), r0, r1, C,
                  mean, scale_inv.data(), F32(bias));
  });
  return ffi::Error::Success();
}

// (dx, dscale, dbias) and, with a residual, its gradient dres (dy through the ReLU), from x,
// dy and the forward's mean and inv.
ffi::Error BackwardImpl(ffi::AnyBuffer x, const ffi::AnyBuffer* residual_buffer,
                        ffi::AnyBuffer dy, ffi::AnyBuffer mean, ffi::AnyBuffer inv,
                        ffi::AnyBuffer scale, ffi::AnyBuffer bias, ffi::AnyBuffer dx,
                        ffi::AnyBuffer* dres_buffer, ffi::AnyBuffer dscale,
                        ffi::AnyBuffer dbias, bool relu) {
  int64_t rows, C;
  if (auto e = CheckActivation(x, "x", &rows, &C); e.failure()) return e;
  for (auto [b, what] : {std::pair{&dy, "dy"}, {&dx, "dx"}}) {
    if (auto e = CheckLike(*b, what, x); e.failure()) return e;
  }
  const bool residual = residual_buffer != nullptr;
  if (residual) {
    if (auto e = CheckLike(*residual_buffer, "residual", x); e.failure()) return e;
    if (auto e = CheckLike(*dres_buffer, "dresidual", x); e.failure()) return e;
  }
  if (rows == 0) return Invalid("x has no rows");
  for (auto [b, what] : {std::pair{&mean, "mean"}, {&inv, "inv"}, {&scale, "scale"},
                         {&bias, "bias"}, {&dscale, "dscale"}, {&dbias, "dbias"}}) {
    if (auto e = CheckChannels(*b, what, C); e.failure()) return e;
  }
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  const void* res = residual ? residual_buffer->untyped_data() : nullptr;
  void* dres = residual ? dres_buffer->untyped_data() : nullptr;
  const float *m = F32(mean), *iv = F32(inv), *s = F32(scale);
  const float n = static_cast<float>(rows);
  std::vector<float> scale_inv(C), factor(C);
  for (int64_t c = 0; c < C; ++c) {
    scale_inv[c] = s[c] * iv[c];
    factor[c] = s[c] * iv[c] / n;
  }
  std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
  const std::vector<double> total = ChannelSums(rows, C, [&](int64_t r0, int64_t r1, double* acc) {
    GradSumsRows(bf16, relu, residual, x.untyped_data(), res, dy.untyped_data(), r0, r1, C, m,
                 iv, scale_inv.data(), F32(bias), acc);
  });
  // dbias and dscale are the two sums (of g and g * x_hat); dx is computed from them.
  float *sum_g = F32(dbias), *sum_g_x_hat = F32(dscale);
  for (int64_t c = 0; c < C; ++c) {
    sum_g[c] = static_cast<float>(total[c]);
    sum_g_x_hat[c] = static_cast<float>(total[C + c]);
  }
  ParallelRows(rows, [&](int64_t r0, int64_t r1, int) {
    GradInputRows(bf16, relu, residual, x.untyped_data(), res, dy.untyped_data(),
                  dx.untyped_data(), dres, r0, r1, C, m, iv, scale_inv.data(), F32(bias),
                  factor.data(), sum_g, sum_g_x_hat, n);
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                   ffi::Result<ffi::AnyBuffer> var, ffi::Result<ffi::AnyBuffer> inv,
                   float epsilon, int64_t relu) {
  return ForwardImpl(x, nullptr, scale, bias, *y, *mean, *var, *inv, epsilon, relu != 0);
}

ffi::Error ForwardAdd(ffi::AnyBuffer x, ffi::AnyBuffer residual, ffi::AnyBuffer scale,
                      ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                      ffi::Result<ffi::AnyBuffer> inv, float epsilon, int64_t relu) {
  return ForwardImpl(x, &residual, scale, bias, *y, *mean, *var, *inv, epsilon, relu != 0);
}

ffi::Error Backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                    ffi::AnyBuffer inv, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                    ffi::Result<ffi::AnyBuffer> dbias, int64_t relu) {
  return BackwardImpl(x, nullptr, dy, mean, inv, scale, bias, *dx, nullptr, *dscale, *dbias,
                      relu != 0);
}

ffi::Error BackwardAdd(ffi::AnyBuffer x, ffi::AnyBuffer residual, ffi::AnyBuffer dy,
                       ffi::AnyBuffer mean, ffi::AnyBuffer inv, ffi::AnyBuffer scale,
                       ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> dx,
                       ffi::Result<ffi::AnyBuffer> dresidual, ffi::Result<ffi::AnyBuffer> dscale,
                       ffi::Result<ffi::AnyBuffer> dbias, int64_t relu) {
  ffi::AnyBuffer dres = *dresidual;
  return BackwardImpl(x, &residual, dy, mean, inv, scale, bias, *dx, &dres, *dscale, *dbias,
                      relu != 0);
}

}  // namespace

// Forward: x[, residual], scale, bias -> y, mean, var, inv. Backward: x[, residual], dy, mean,
// inv, scale, bias -> dx[, dresidual], dscale, dbias.
#define AFFECT_JAX_ARGS_3 .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
#define AFFECT_JAX_ARGS_4 AFFECT_JAX_ARGS_3.Arg<ffi::AnyBuffer>()
#define AFFECT_JAX_ARGS_6 AFFECT_JAX_ARGS_3 AFFECT_JAX_ARGS_3
#define AFFECT_JAX_ARGS_7 AFFECT_JAX_ARGS_6.Arg<ffi::AnyBuffer>()
#define AFFECT_JAX_RETS_3 .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
#define AFFECT_JAX_RETS_4 AFFECT_JAX_RETS_3.Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxBatchNormForward, Forward,
                              ffi::Ffi::Bind() AFFECT_JAX_ARGS_3 AFFECT_JAX_RETS_4
                                  .Attr<float>("epsilon").Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxBatchNormAddForward, ForwardAdd,
                              ffi::Ffi::Bind() AFFECT_JAX_ARGS_4 AFFECT_JAX_RETS_4
                                  .Attr<float>("epsilon").Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxBatchNormBackward, Backward,
                              ffi::Ffi::Bind() AFFECT_JAX_ARGS_6 AFFECT_JAX_RETS_3
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxBatchNormAddBackward, BackwardAdd,
                              ffi::Ffi::Bind() AFFECT_JAX_ARGS_7 AFFECT_JAX_RETS_4
                                  .Attr<int64_t>("relu"));

// Max pooling (forward and backward) of NHWC activations as XLA FFI handlers.
//
// Why hand-written: XLA:CPU (jaxlib 0.10) differentiates `reduce_window(max)` into a variadic
// reduce-window it runs slowly, and the strided-view form of ops/max_pool.py still makes
// several float32 passes (docs/performance.md). These kernels make one read of the input and
// one write of the output and of the argmax forward, and one pass backward, which reads the
// small argmax and output gradient and writes each input gradient once.
//
// Semantics (the same as ops/max_pool.py's XLA path and TensorFlow's MaxPool/MaxPoolGrad):
// 'VALID' windows; the maximum is taken in the input dtype (exact); the gradient of each
// output goes to the first maximal element of its window in row-major order; a NaN in a
// window propagates to the output (as jnp.maximum) and takes the gradient. The backward pass
// sums the gradients an input receives from overlapping windows in float32, in the XLA path's
// order, and rounds once.
//
// Layout: x, y, dy, dx NHWC row-major, float32 or bfloat16; argmax is uint8 [B, Ho, Wo, C],
// the row-major position of the maximum within its window (so windows hold at most 256).

#include <cstdint>
#include <cstring>
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

struct Geometry {
  int64_t B, H, W, C, Ho, Wo, kh, kw, sh, sw;
};

// Output row (b, oh) of the forward pass: y and argmax for all (ow, c). `best` and `arg` are
// C-long scratch rows.
template <typename T>
ALWAYS_INLINE void ForwardRowImpl(const T* __restrict x, T* __restrict y,
                                  uint8_t* __restrict argmax, const Geometry& g, int64_t b,
                                  int64_t oh, float* __restrict best, int32_t* __restrict arg) {
  const int64_t C = g.C;
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    const T* __restrict first = x + ((b * g.H + oh * g.sh) * g.W + ow * g.sw) * C;
    for (int64_t c = 0; c < C; ++c) {
      best[c] = Load(first, c);
      arg[c] = 0;
    }
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      for (int64_t kj = ki == 0 ? 1 : 0; kj < g.kw; ++kj) {
        const T* __restrict p = x + ((b * g.H + oh * g.sh + ki) * g.W + ow * g.sw + kj) * C;
        const int32_t k = static_cast<int32_t>(ki * g.kw + kj);
        for (int64_t c = 0; c < C; ++c) {
          const float v = Load(p, c);
          // Strictly greater keeps the first maximum; a NaN is taken unless one already was.
          const bool take = v > best[c] || (v != v && best[c] == best[c]);
          best[c] = take ? v : best[c];
          arg[c] = take ? k : arg[c];
        }
      }
    }
    T* __restrict out = y + ((b * g.Ho + oh) * g.Wo + ow) * C;
    uint8_t* __restrict where = argmax + ((b * g.Ho + oh) * g.Wo + ow) * C;
    for (int64_t c = 0; c < C; ++c) {
      Store(out, c, best[c]);  // exact: best is one of the inputs
      where[c] = static_cast<uint8_t>(arg[c]);
    }
  }
}

VECTOR_CLONES void ForwardRow(bool bf16, const void* x, void* y, uint8_t* argmax,
                              const Geometry& g, int64_t b, int64_t oh, float* best,
                              int32_t* arg) {
  if (bf16) {
    ForwardRowImpl(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), argmax, g, b,
                   oh, best, arg);
  } else {
    ForwardRowImpl(static_cast<const float*>(x), static_cast<float*>(y), argmax, g, b, oh,
                   best, arg);
  }
}

// The outputs (along one axis) whose windows hold input position i: [lo, hi).
ALWAYS_INLINE void Covering(int64_t i, int64_t k, int64_t s, int64_t n_out, int64_t* lo,
                            int64_t* hi) {
  *lo = i < k ? 0 : (i - k) / s + 1;
  *hi = std::min(i / s + 1, n_out);
}

// v where `take`, else 0: a bit mask, not `take ? v : 0`, which GCC does not vectorise here.
ALWAYS_INLINE float Selected(bool take, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= -static_cast<uint32_t>(take);
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Input row (b, h) of the backward pass: dx for all (w, c). `acc` is a C-long scratch row.
template <typename T>
ALWAYS_INLINE void BackwardRowImpl(const uint8_t* __restrict argmax, const T* __restrict dy,
                                   T* __restrict dx, const Geometry& g, int64_t b, int64_t h,
                                   float* __restrict acc) {
  const int64_t C = g.C;
  int64_t oh0, oh1;
  Covering(h, g.kh, g.sh, g.Ho, &oh0, &oh1);
  for (int64_t w = 0; w < g.W; ++w) {
    for (int64_t c = 0; c < C; ++c) acc[c] = 0.0f;
    int64_t ow0, ow1;
    Covering(w, g.kw, g.sw, g.Wo, &ow0, &ow1);
    // Windows in descending order, i.e. this input's window positions in ascending row-major
    // order: the order in which ops/max_pool.py's XLA path adds them, so float32 sums match.
    for (int64_t oh = oh1 - 1; oh >= oh0; --oh) {
      for (int64_t ow = ow1 - 1; ow >= ow0; --ow) {
        const int64_t at = ((b * g.Ho + oh) * g.Wo + ow) * C;
        const uint8_t k = static_cast<uint8_t>((h - oh * g.sh) * g.kw + (w - ow * g.sw));
        const uint8_t* __restrict where = argmax + at;
        const T* __restrict grad = dy + at;
        for (int64_t c = 0; c < C; ++c) acc[c] += Selected(where[c] == k, Load(grad, c));
      }
    }
    T* __restrict out = dx + ((b * g.H + h) * g.W + w) * C;
    for (int64_t c = 0; c < C; ++c) Store(out, c, acc[c]);
  }
}

VECTOR_CLONES void BackwardRow(bool bf16, const uint8_t* argmax, const void* dy, void* dx,
                               const Geometry& g, int64_t b, int64_t h, float* acc) {
  if (bf16) {
    BackwardRowImpl(argmax, static_cast<const uint16_t*>(dy), static_cast<uint16_t*>(dx), g,
                    b, h, acc);
  } else {
    BackwardRowImpl(argmax, static_cast<const float*>(dy), static_cast<float*>(dx), g, b, h,
                    acc);
  }
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("affect_jax max pool: " + what);
}

std::string Shape(int64_t b, int64_t h, int64_t w, int64_t c) {
  return "[" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(w) + ", " +
         std::to_string(c) + "]";
}

// Checks the attributes and that `input` [B, H, W, C] pools to `output`/`argmax`
// [B, Ho, Wo, C] with `output` in the input's dtype; fills `g`.
ffi::Error CheckGeometry(const ffi::AnyBuffer& input, const char* input_name,
                         const ffi::AnyBuffer& output, const char* output_name,
                         const ffi::AnyBuffer& argmax, int64_t kh, int64_t kw, int64_t sh,
                         int64_t sw, Geometry* g) {
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1) {
    return Invalid("window and strides must be >= 1");
  }
  if (kh * kw > 256) return Invalid("window has more than 256 positions (uint8 argmax)");
  for (const ffi::AnyBuffer* b : {&input, &output}) {
    const char* name = b == &input ? input_name : output_name;
    if (b->element_type() != ffi::DataType::F32 && b->element_type() != ffi::DataType::BF16) {
      return Invalid(std::string(name) + " must be float32 or bfloat16");
    }
    if (b->dimensions().size() != 4) return Invalid(std::string(name) + " must be NHWC");
  }
  if (output.element_type() != input.element_type()) {
    return Invalid(std::string(output_name) + " must have " + input_name + "'s dtype");
  }
  auto d = input.dimensions();
  *g = Geometry{d[0], d[1], d[2], d[3], 0, 0, kh, kw, sh, sw};
  if (g->H < kh || g->W < kw) {
    return Invalid(std::string(input_name) + " is smaller than the window");
  }
  g->Ho = (g->H - kh) / sh + 1;
  g->Wo = (g->W - kw) / sw + 1;
  const std::string pooled = Shape(g->B, g->Ho, g->Wo, g->C);
  auto o = output.dimensions();
  if (o[0] != g->B || o[1] != g->Ho || o[2] != g->Wo || o[3] != g->C) {
    return Invalid(std::string(output_name) + " must be " + pooled);
  }
  auto a = argmax.dimensions();
  if (argmax.element_type() != ffi::DataType::U8 || a.size() != 4 || a[0] != g->B ||
      a[1] != g->Ho || a[2] != g->Wo || a[3] != g->C) {
    return Invalid("argmax must be uint8 " + pooled);
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> argmax, int64_t kh, int64_t kw, int64_t sh,
                   int64_t sw) {
  Geometry g;
  if (auto e = CheckGeometry(x, "x", *y, "y", *argmax, kh, kw, sh, sw, &g); e.failure()) {
    return e;
  }
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  uint8_t* where = static_cast<uint8_t*>(argmax->untyped_data());
  std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
  ParallelRows(g.B * g.Ho, [&](int64_t r0, int64_t r1, int) {
    std::vector<float> best(g.C);
    std::vector<int32_t> arg(g.C);
    for (int64_t r = r0; r < r1; ++r) {
      ForwardRow(bf16, x.untyped_data(), y->untyped_data(), where, g, r / g.Ho, r % g.Ho,
                 best.data(), arg.data());
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::AnyBuffer argmax, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                    int64_t kh, int64_t kw, int64_t sh, int64_t sw) {
  Geometry g;
  if (auto e = CheckGeometry(*dx, "dx", dy, "dy", argmax, kh, kw, sh, sw, &g); e.failure()) {
    return e;
  }
  const bool bf16 = dx->element_type() == ffi::DataType::BF16;
  const uint8_t* where = static_cast<const uint8_t*>(argmax.untyped_data());
  std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
  ParallelRows(g.B * g.H, [&](int64_t r0, int64_t r1, int) {
    std::vector<float> acc(g.C);
    for (int64_t r = r0; r < r1; ++r) {
      BackwardRow(bf16, where, dy.untyped_data(), dx->untyped_data(), g, r / g.H, r % g.H,
                  acc.data());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define AFFECT_JAX_POOL_ATTRS                                                              \
  .Attr<int64_t>("window_h").Attr<int64_t>("window_w").Attr<int64_t>("stride_h")         \
      .Attr<int64_t>("stride_w")

// Forward: x -> y, argmax. Backward: argmax, dy -> dx.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxMaxPoolForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_POOL_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxMaxPoolBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_POOL_ATTRS);

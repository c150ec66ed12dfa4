// oneDNN 2-D convolutions (forward, input gradient, weight gradient) as XLA FFI handlers.
//
// Why hand-written: XLA:CPU (jaxlib 0.10) runs convolutions, above all their gradients, far
// below the machine's speed and never uses AMX for bfloat16; no XLA flag routes them to oneDNN
// (docs/performance.md). These handlers let jitted JAX code call oneDNN's convolution kernels
// (AVX-512 for float32, AMX for bfloat16) with XLA-owned buffers and no copies.
//
// Layouts are the ones JAX uses: activations NHWC, kernels HWIO, row-major. Activations stay
// NHWC (oneDNN's brgemm kernels run on it directly); the kernel is reordered to the blocked
// layout the chosen kernel wants on every call (a small copy next to the convolution).
// Primitive descriptors are built once per (direction, dtype, shape, stride, padding) and
// cached; scratch memory is per call so concurrent calls from XLA threads are safe.

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

enum Direction : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Convolution geometry in JAX's terms: input NHWC, kernel HWIO, strides and explicit padding.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr;
  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
};

using Key = std::tuple<int64_t, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

Key MakeKey(Direction d, memory::data_type dt, const Geometry& g) {
  return Key(d, static_cast<int>(dt), g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.sh, g.sw, g.pt,
             g.pb, g.pl, g.pr);
}

struct Plan {
  dnnl::primitive primitive;
  memory::desc src, dst, weights_user, weights_primitive, scratchpad;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;  // user->primitive (forward, data) or back (weights)
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::shared_ptr<Plan> BuildPlan(Direction d, memory::data_type dt, const Geometry& g) {
  auto plan = std::make_shared<Plan>();
  plan->src = memory::desc({g.n, g.c, g.h, g.w}, dt, Tag::nhwc);
  plan->dst = memory::desc({g.n, g.o, g.oh(), g.ow()}, dt, Tag::nhwc);
  plan->weights_user = memory::desc({g.o, g.c, g.kh, g.kw}, dt, Tag::hwio);
  const memory::desc weights_any({g.o, g.c, g.kh, g.kw}, dt, Tag::any);
  const memory::dims strides = {g.sh, g.sw}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, algo, plan->src, weights_any, plan->dst,
      strides, pad_l, pad_r, attr);
  if (d == kForward) {
    plan->weights_primitive = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
    plan->primitive = dnnl::convolution_forward(fwd);
  } else if (d == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        Engine(), algo, plan->src, weights_any, plan->dst, strides, pad_l, pad_r, fwd, attr);
    plan->weights_primitive = bwd.weights_desc();
    plan->scratchpad = bwd.scratchpad_desc();
    plan->primitive = dnnl::convolution_backward_data(bwd);
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        Engine(), algo, plan->src, weights_any, plan->dst, strides, pad_l, pad_r, fwd, attr);
    plan->weights_primitive = bwd.diff_weights_desc();
    plan->scratchpad = bwd.scratchpad_desc();
    plan->primitive = dnnl::convolution_backward_weights(bwd);
  }
  plan->reorder_weights = plan->weights_primitive != plan->weights_user;
  if (plan->reorder_weights) {
    plan->weights_reorder =
        d == kBackwardWeights
            ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plan->weights_primitive,
                                                          Engine(), plan->weights_user))
            : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), plan->weights_user, Engine(),
                                                          plan->weights_primitive));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(Direction d, memory::data_type dt, const Geometry& g) {
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<Plan>> cache;
  const Key key = MakeKey(d, dt, g);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto plan = BuildPlan(d, dt, g);  // outside the lock: building JIT-compiles kernels
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, plan).first->second;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<void, FreeDeleter>;

Buffer Allocate(size_t bytes) {
  if (bytes == 0) return Buffer(nullptr);
  const size_t rounded = (bytes + 63) / 64 * 64;
  return Buffer(std::aligned_alloc(64, rounded));
}

ffi::Error DataTypeOf(ffi::DataType t, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32: *out = memory::data_type::f32; return ffi::Error::Success();
    case ffi::DataType::BF16: *out = memory::data_type::bf16; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("affect_jax oneDNN conv: dtype must be f32 or bf16");
  }
}

ffi::Error CheckRank4(const ffi::AnyBuffer& b, const char* what) {
  if (b.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument(std::string("affect_jax oneDNN conv: ") + what +
                                       " must be rank 4");
  }
  return ffi::Error::Success();
}

// Runs direction `d`. `act` is the NHWC input (forward, weights) or input gradient (data);
// `out` the NHWC output (forward) or output gradient (data, weights); `weights` HWIO.
ffi::Error Run(Direction d, ffi::AnyBuffer act, ffi::AnyBuffer out, ffi::AnyBuffer weights,
               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  for (auto [b, what] : {std::pair{&act, "input"}, {&out, "output"}, {&weights, "kernel"}}) {
    if (auto e = CheckRank4(*b, what); e.failure()) return e;
  }
  memory::data_type dt;
  if (auto e = DataTypeOf(act.element_type(), &dt); e.failure()) return e;
  if (out.element_type() != act.element_type() || weights.element_type() != act.element_type()) {
    return ffi::Error::InvalidArgument("affect_jax oneDNN conv: operands differ in dtype");
  }
  auto a = act.dimensions(), k = weights.dimensions(), o = out.dimensions();
  Geometry g{a[0], a[1], a[2], a[3], k[0], k[1], k[3], sh, sw, pt, pb, pl, pr};
  if (k[2] != g.c || o[0] != g.n || o[1] != g.oh() || o[2] != g.ow() || o[3] != g.o) {
    return ffi::Error::InvalidArgument("affect_jax oneDNN conv: inconsistent shapes");
  }
  try {
    auto plan = GetPlan(d, dt, g);
    // One convolution at a time: each already uses every core (OpenMP), and XLA may run
    // independent custom calls (e.g. a layer's two gradients) concurrently, which would
    // oversubscribe the cores and stall OpenMP's barriers.
    static std::mutex execution;
    std::lock_guard<std::mutex> serial(execution);
    auto& engine = Engine();
    dnnl::stream stream(engine);
    memory act_m(plan->src, engine, act.untyped_data());
    memory out_m(plan->dst, engine, out.untyped_data());
    memory weights_user(plan->weights_user, engine, weights.untyped_data());
    Buffer weights_buffer, scratch_buffer = Allocate(plan->scratchpad.get_size());
    memory weights_m = weights_user;
    if (plan->reorder_weights) {
      weights_buffer = Allocate(plan->weights_primitive.get_size());
      weights_m = memory(plan->weights_primitive, engine, weights_buffer.get());
    }
    memory scratch_m(plan->scratchpad, engine, scratch_buffer.get());
    if (d != kBackwardWeights && plan->reorder_weights) {
      plan->weights_reorder.execute(stream, weights_user, weights_m);
    }
    if (d == kForward) {
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, act_m}, {DNNL_ARG_WEIGHTS, weights_m},
                                       {DNNL_ARG_DST, out_m}, {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else if (d == kBackwardData) {
      plan->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, act_m},
                                       {DNNL_ARG_WEIGHTS, weights_m},
                                       {DNNL_ARG_DIFF_DST, out_m},
                                       {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, act_m},
                                       {DNNL_ARG_DIFF_WEIGHTS, weights_m},
                                       {DNNL_ARG_DIFF_DST, out_m},
                                       {DNNL_ARG_SCRATCHPAD, scratch_m}});
      if (plan->reorder_weights) {
        plan->weights_reorder.execute(stream, weights_m, weights_user);
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("affect_jax oneDNN conv: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("affect_jax oneDNN conv: out of memory");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(kForward, x, *y, w, sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardData, *dx, dy, w, sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr) {
  return Run(kBackwardWeights, x, dy, *dw, sh, sw, pt, pb, pl, pr);
}

}  // namespace

#define AFFECT_JAX_CONV_ATTRS                                                            \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")        \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_CONV_ATTRS);

// Lets Python check it loaded the library it was built against.
extern "C" int affect_jax_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// oneDNN 2-D convolutions (forward, input gradient, weight gradient) as XLA FFI handlers.
//
// Why hand-written: XLA:CPU (jaxlib 0.10) runs convolutions, above all their gradients, far
// below the machine's speed and never uses AMX for bfloat16; no XLA flag routes them to oneDNN
// (docs/performance.md). These handlers let jitted JAX code call oneDNN's convolution kernels
// (AVX-512 for float32, AMX for bfloat16) with XLA-owned buffers and no copies.
//
// Layouts are the ones JAX uses: activations NHWC, kernels HWIO, row-major. Activations stay
// NHWC (oneDNN's brgemm kernels run on it directly); the kernel is reordered to the blocked
// layout the chosen kernel wants on every call (a small copy next to the convolution), except
// at inference on a kernel packed once into that layout (PackWeights, RunPacked). The
// bias is added by the forward kernel and its gradient comes with the weight gradient; with
// bfloat16 compute, results may be written as float32 (no separate conversion pass). The
// forward kernel can also apply a ReLU to its float32 sums (a oneDNN post-op), so a
// conv + bias + ReLU layer is one pass over its output; at inference it can first add a residual
// that XLA passed in the output buffer (oneDNN's sum post-op), so a ResNet block's last
// convolution, BatchNorm folded in, shortcut sum and ReLU are one pass too.
// Primitive descriptors are built once per (direction, post-ops, dtype, shape, stride, padding)
// and cached; scratch memory is per call so concurrent calls from XLA threads are safe.
//
// A packed kernel is a uint8 buffer: a PackHeader (the geometry and dtype it was packed for)
// then the kernel in the layout oneDNN's inference kernel chose for that geometry. The layout
// can depend on the batch and image size, so a call on another geometry compares layouts and,
// if they differ, reorders the packed kernel into the one it needs (correct either way).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// One oneDNN primitive (or BatchNorm or max-pool kernel) at a time: each already
// uses every core (OpenMP), and XLA may run independent custom calls (e.g. a layer's two
// gradients) concurrently, which would oversubscribe the cores and stall OpenMP's barriers.
std::mutex& AffectJaxExecutionMutex() {
  static std::mutex mutex;
  return mutex;
}

dnnl::engine& AffectJaxCpuEngine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

namespace {

using dnnl::memory;
using Tag = dnnl::memory::format_tag;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<void, FreeDeleter>;

Buffer Allocate(size_t bytes) {
  if (bytes == 0) return Buffer(nullptr);
  const size_t rounded = (bytes + 63) / 64 * 64;
  return Buffer(std::aligned_alloc(64, rounded));
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("affect_jax oneDNN conv: " + what);
}

ffi::Error DataTypeOf(ffi::DataType t, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32: *out = memory::data_type::f32; return ffi::Error::Success();
    case ffi::DataType::BF16: *out = memory::data_type::bf16; return ffi::Error::Success();
    default: return Invalid("dtype must be f32 or bf16");
  }
}

// kForward is the training forward pass; kInference the inference one (oneDNN may choose other
// kernels and layouts for it).
enum Direction : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2, kInference = 3 };

// Convolution geometry in JAX's terms: input NHWC, kernel HWIO, strides and explicit padding.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr;
  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
};

// Direction, post-ops (bit 0: ReLU, bit 1: residual sum), the dtypes of the activation / output-side / kernel buffers, then the
// geometry.
using Key = std::tuple<int64_t, int, int, int, int, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t>;

struct Dtypes {
  memory::data_type act, out, weights, compute;
};

Key MakeKey(Direction d, int post, const Dtypes& t, const Geometry& g) {
  return Key(d, post, static_cast<int>(t.act), static_cast<int>(t.out),
             static_cast<int>(t.weights), g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.sh, g.sw, g.pt,
             g.pb, g.pl, g.pr);
}

struct Plan {
  dnnl::primitive primitive;
  memory::desc src, dst, bias, weights_user, weights_primitive, scratchpad;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;  // user->primitive (forward, data) or back (weights)
};

// Post-ops of the forward kernel (bits of `post`).
constexpr int kRelu = 1;  // max(0, .) of its results before writing them
constexpr int kSum = 2;   // adds the output buffer's previous contents (before the ReLU)

std::shared_ptr<Plan> BuildPlan(Direction d, int post, const Dtypes& t, const Geometry& g) {
  auto plan = std::make_shared<Plan>();
  const memory::dims src_dims = {g.n, g.c, g.h, g.w}, dst_dims = {g.n, g.o, g.oh(), g.ow()};
  const memory::dims weights_dims = {g.o, g.c, g.kh, g.kw};
  plan->src = memory::desc(src_dims, t.act, Tag::nhwc);
  plan->dst = memory::desc(dst_dims, t.out, Tag::nhwc);
  plan->bias = memory::desc({g.o}, memory::data_type::f32, Tag::a);
  plan->weights_user = memory::desc(weights_dims, t.weights, Tag::hwio);
  const memory::desc weights_any(weights_dims, d == kBackwardWeights ? t.weights : t.compute,
                                 Tag::any);
  const memory::dims strides = {g.sh, g.sw}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
  auto& engine = AffectJaxCpuEngine();
  const auto training = dnnl::prop_kind::forward_training;
  if (d == kForward || d == kInference) {
    dnnl::post_ops post_ops;
    if (post & kSum) post_ops.append_sum(1.f);
    if (post & kRelu) post_ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(post_ops);
    const auto prop =
        d == kInference || post & kSum ? dnnl::prop_kind::forward_inference : training;
    dnnl::convolution_forward::primitive_desc fwd(engine, prop, algo, plan->src, weights_any,
                                                  plan->bias, plan->dst, strides, pad_l, pad_r,
                                                  attr);
    plan->weights_primitive = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
    plan->primitive = dnnl::convolution_forward(fwd);
  } else {
    // The forward pass these gradients belong to (oneDNN picks matching kernels from it).
    const memory::desc src_c(src_dims, t.compute, Tag::nhwc), dst_c(dst_dims, t.compute,
                                                                     Tag::nhwc);
    const memory::desc weights_c(weights_dims, t.compute, Tag::any);
    dnnl::convolution_forward::primitive_desc hint(engine, training, algo, src_c, weights_c,
                                                   plan->bias, dst_c, strides, pad_l, pad_r);
    if (d == kBackwardData) {
      dnnl::convolution_backward_data::primitive_desc bwd(
          engine, algo, plan->src, weights_any, plan->dst, strides, pad_l, pad_r, hint, attr);
      plan->weights_primitive = bwd.weights_desc();
      plan->scratchpad = bwd.scratchpad_desc();
      plan->primitive = dnnl::convolution_backward_data(bwd);
    } else {
      dnnl::convolution_backward_weights::primitive_desc bwd(
          engine, algo, plan->src, weights_any, plan->bias, plan->dst, strides, pad_l, pad_r, hint,
          attr);
      plan->weights_primitive = bwd.diff_weights_desc();
      plan->scratchpad = bwd.scratchpad_desc();
      plan->primitive = dnnl::convolution_backward_weights(bwd);
    }
  }
  plan->reorder_weights = plan->weights_primitive != plan->weights_user;
  if (plan->reorder_weights) {
    plan->weights_reorder =
        d == kBackwardWeights
            ? dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->weights_primitive, engine,
                                                          plan->weights_user))
            : dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->weights_user, engine,
                                                          plan->weights_primitive));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(Direction d, int post, const Dtypes& t, const Geometry& g) {
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<Plan>> cache;
  const Key key = MakeKey(d, post, t, g);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto plan = BuildPlan(d, post, t, g);  // outside the lock: building JIT-compiles kernels
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, plan).first->second;
}

// Runs direction `d`. `act` is the NHWC input (forward, weights) or input gradient (data);
// `out` the NHWC output (forward) or output gradient (data, weights); `weights` the HWIO kernel
// (forward, data) or its gradient (weights); `bias` [O] float32, the bias (forward) or its
// gradient (weights). The compute dtype is that of the kernel (forward, data) or of the input
// (weights); the buffers written may be float32 instead. `post`: the forward's post-ops (kRelu,
// kSum: `out` holds the residual to add).
ffi::Error Run(Direction d, ffi::AnyBuffer act, ffi::AnyBuffer out, ffi::AnyBuffer weights,
               ffi::AnyBuffer* bias, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr, int post = 0) {
  for (auto [b, what] : {std::pair{&act, "input"}, {&out, "output"}, {&weights, "kernel"}}) {
    if (b->dimensions().size() != 4) return Invalid(std::string(what) + " must be rank 4");
  }
  Dtypes t;
  if (auto e = DataTypeOf(act.element_type(), &t.act); e.failure()) return e;
  if (auto e = DataTypeOf(out.element_type(), &t.out); e.failure()) return e;
  if (auto e = DataTypeOf(weights.element_type(), &t.weights); e.failure()) return e;
  // Which buffers are read in the compute dtype, and which may be written as float32.
  const memory::data_type read[2] = {
      d == kForward ? t.act : t.out, d == kBackwardWeights ? t.act : t.weights};
  const memory::data_type written = d == kForward ? t.out : d == kBackwardData ? t.act
                                                                              : t.weights;
  t.compute = read[1];
  if (read[0] != read[1]) return Invalid("the operands it reads differ in dtype");
  if (written != t.compute && written != memory::data_type::f32) {
    return Invalid("the result must be float32 or the compute dtype");
  }
  auto a = act.dimensions(), k = weights.dimensions(), o = out.dimensions();
  Geometry g{a[0], a[1], a[2], a[3], k[0], k[1], k[3], sh, sw, pt, pb, pl, pr};
  if (k[2] != g.c || o[0] != g.n || o[1] != g.oh() || o[2] != g.ow() || o[3] != g.o) {
    return Invalid("inconsistent shapes");
  }
  if (bias != nullptr && (bias->element_type() != ffi::DataType::F32 ||
                          bias->dimensions().size() != 1 || bias->dimensions()[0] != g.o)) {
    return Invalid("bias must be float32 [O]");
  }
  return affect_jax::CatchOneDnnErrors("affect_jax oneDNN conv", [&]() -> ffi::Error {
    auto plan = GetPlan(d, post, t, g);
    std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
    auto& engine = AffectJaxCpuEngine();
    dnnl::stream stream(engine);
    memory act_m(plan->src, engine, act.untyped_data());
    memory out_m(plan->dst, engine, out.untyped_data());
    memory bias_m(plan->bias, engine, bias != nullptr ? bias->untyped_data() : nullptr);
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
                                       {DNNL_ARG_BIAS, bias_m}, {DNNL_ARG_DST, out_m},
                                       {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else if (d == kBackwardData) {
      plan->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, act_m},
                                       {DNNL_ARG_WEIGHTS, weights_m},
                                       {DNNL_ARG_DIFF_DST, out_m},
                                       {DNNL_ARG_SCRATCHPAD, scratch_m}});
    } else {
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, act_m},
                                       {DNNL_ARG_DIFF_WEIGHTS, weights_m},
                                       {DNNL_ARG_DIFF_BIAS, bias_m},
                                       {DNNL_ARG_DIFF_DST, out_m},
                                       {DNNL_ARG_SCRATCHPAD, scratch_m}});
      if (plan->reorder_weights) {
        plan->weights_reorder.execute(stream, weights_m, weights_user);
      }
    }
    stream.wait();
    return ffi::Error::Success();
  });
}


// Puts the residual a sum post-op adds into the output buffer: XLA passes it there (the call
// aliases them); if it did not, it is copied.
ffi::Error PlaceResidual(ffi::AnyBuffer residual, ffi::AnyBuffer y) {
  auto r = residual.dimensions(), d = y.dimensions();
  if (residual.element_type() != y.element_type() ||
      !std::equal(r.begin(), r.end(), d.begin(), d.end())) {
    return Invalid("the residual must have the output's shape and dtype");
  }
  if (residual.untyped_data() != y.untyped_data()) {
    std::memcpy(y.untyped_data(), residual.untyped_data(), residual.size_bytes());
  }
  return ffi::Error::Success();
}


ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardData, *dx, dy, w, nullptr, sh, sw, pt, pb, pl, pr);
}

// (dw, dbias) from x and dy.
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Result<ffi::AnyBuffer> dbias, int64_t sh, int64_t sw,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  ffi::AnyBuffer db = *dbias;
  return Run(kBackwardWeights, x, dy, *dw, &db, sh, sw, pt, pb, pl, pr);
}

// What a packed kernel begins with: the geometry, dtype and post-ops it was packed for. The
// packed layout is that of GetPlan(kInference, post, {dtype x4}, geometry)->weights_primitive.
struct PackHeader {
  int64_t magic, n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr, dtype, post;
};
constexpr int64_t kPackMagic = 0x314b4341504a41;  // "AJPACK1"
constexpr size_t kPackHeaderBytes = 128;          // keeps the kernel 64-byte aligned
static_assert(sizeof(PackHeader) <= kPackHeaderBytes);

Dtypes Uniform(memory::data_type t) { return Dtypes{t, t, t, t}; }

Geometry GeometryOf(const PackHeader& p) {
  return Geometry{p.n, p.h, p.w, p.c, p.kh, p.kw, p.o, p.sh, p.sw, p.pt, p.pb, p.pl, p.pr};
}

std::shared_ptr<Plan> PackPlan(const PackHeader& p) {
  return GetPlan(kInference, static_cast<int>(p.post),
                 Uniform(static_cast<memory::data_type>(p.dtype)), GeometryOf(p));
}

size_t PackedBytes(const PackHeader& p) {
  return kPackHeaderBytes + PackPlan(p)->weights_primitive.get_size();
}

// The reorder from a packed layout to the one another plan's kernel wants, built once per pair.
dnnl::reorder& Repack(const Plan* from, const Plan* to) {
  static std::mutex mutex;
  static std::map<std::pair<const Plan*, const Plan*>, dnnl::reorder> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({from, to});
  if (it == cache.end()) {
    auto& engine = AffectJaxCpuEngine();
    it = cache
             .emplace(std::pair{from, to},
                      dnnl::reorder(dnnl::reorder::primitive_desc(
                          engine, from->weights_primitive, engine, to->weights_primitive)))
             .first;
  }
  return it->second;
}

// Packs the HWIO `kernel` for inference on an [n, h, w, C] input with these strides, padding
// and post-ops (relu: 0 or 1): `packed` gets the header, then the kernel in oneDNN's layout.
ffi::Error PackWeights(ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> packed, int64_t n,
                       int64_t h, int64_t w, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                       int64_t pl, int64_t pr, int64_t relu) {
  if (relu != 0 && relu != 1) return Invalid("relu must be 0 or 1");
  if (kernel.dimensions().size() != 4) return Invalid("kernel must be rank 4");
  if (packed->element_type() != ffi::DataType::U8) return Invalid("packed must be uint8");
  memory::data_type dtype;
  if (auto e = DataTypeOf(kernel.element_type(), &dtype); e.failure()) return e;
  auto k = kernel.dimensions();
  const PackHeader header{kPackMagic, n,  h,  w,  k[2], k[0], k[1], k[3],
                          sh,         sw, pt, pb, pl,   pr,   static_cast<int64_t>(dtype),
                          relu == 1 ? kRelu : 0};
  return affect_jax::CatchOneDnnErrors("affect_jax oneDNN conv pack", [&]() -> ffi::Error {
    auto plan = PackPlan(header);
    if (packed->size_bytes() != kPackHeaderBytes + plan->weights_primitive.get_size()) {
      return Invalid("packed has the wrong size for this kernel and geometry");
    }
    auto* out = static_cast<uint8_t*>(packed->untyped_data());
    std::memset(out, 0, kPackHeaderBytes);
    std::memcpy(out, &header, sizeof(header));
    std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
    auto& engine = AffectJaxCpuEngine();
    dnnl::stream stream(engine);
    memory user(plan->weights_user, engine, kernel.untyped_data());
    memory blocked(plan->weights_primitive, engine, out + kPackHeaderBytes);
    if (plan->reorder_weights) {
      plan->weights_reorder.execute(stream, user, blocked);
      stream.wait();
    } else {
      std::memcpy(out + kPackHeaderBytes, kernel.untyped_data(), kernel.size_bytes());
    }
    return ffi::Error::Success();
  });
}

// y = conv(x, packed kernel) + bias (+ y's previous contents if `post` has kSum), then the
// ReLU if `post` has kRelu: the inference forward pass on a kernel PackWeights packed.
ffi::Error RunPacked(ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::AnyBuffer bias,
                     ffi::AnyBuffer y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                     int64_t pl, int64_t pr, int post) {
  if (x.dimensions().size() != 4 || y.dimensions().size() != 4) {
    return Invalid("input and output must be rank 4");
  }
  if (packed.element_type() != ffi::DataType::U8 || packed.size_bytes() < kPackHeaderBytes) {
    return Invalid("packed must be a uint8 kernel from PackWeights");
  }
  PackHeader p;
  std::memcpy(&p, packed.untyped_data(), sizeof(p));
  if (p.magic != kPackMagic) return Invalid("packed must be a uint8 kernel from PackWeights");
  auto a = x.dimensions(), o = y.dimensions();
  const Geometry g{a[0], a[1], a[2], a[3], p.kh, p.kw, p.o, sh, sw, pt, pb, pl, pr};
  if (p.c != g.c || std::tuple(p.sh, p.sw, p.pt, p.pb, p.pl, p.pr) !=
                        std::tuple(sh, sw, pt, pb, pl, pr)) {
    return Invalid("the packed kernel was packed for other channels, strides or padding");
  }
  if (o[0] != g.n || o[1] != g.oh() || o[2] != g.ow() || o[3] != g.o) {
    return Invalid("inconsistent shapes");
  }
  if (bias.element_type() != ffi::DataType::F32 || bias.dimensions().size() != 1 ||
      bias.dimensions()[0] != g.o) {
    return Invalid("bias must be float32 [O]");
  }
  Dtypes t;
  if (auto e = DataTypeOf(x.element_type(), &t.act); e.failure()) return e;
  if (auto e = DataTypeOf(y.element_type(), &t.out); e.failure()) return e;
  t.weights = t.compute = static_cast<memory::data_type>(p.dtype);
  if (t.act != t.compute) return Invalid("the input's dtype differs from the packed kernel's");
  if (t.out != t.compute && t.out != memory::data_type::f32) {
    return Invalid("the result must be float32 or the compute dtype");
  }
  return affect_jax::CatchOneDnnErrors("affect_jax oneDNN conv", [&]() -> ffi::Error {
    auto pack_plan = PackPlan(p);
    if (packed.size_bytes() != kPackHeaderBytes + pack_plan->weights_primitive.get_size()) {
      return Invalid("packed has the wrong size for its header");
    }
    auto plan = GetPlan(kInference, post, t, g);
    std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
    auto& engine = AffectJaxCpuEngine();
    dnnl::stream stream(engine);
    auto* blocked = static_cast<uint8_t*>(packed.untyped_data()) + kPackHeaderBytes;
    memory weights_m(pack_plan->weights_primitive, engine, blocked);
    Buffer repacked;
    if (plan->weights_primitive != pack_plan->weights_primitive) {
      repacked = Allocate(plan->weights_primitive.get_size());
      memory to(plan->weights_primitive, engine, repacked.get());
      Repack(pack_plan.get(), plan.get()).execute(stream, weights_m, to);
      weights_m = to;
    }
    Buffer scratch_buffer = Allocate(plan->scratchpad.get_size());
    memory scratch_m(plan->scratchpad, engine, scratch_buffer.get());
    memory act_m(plan->src, engine, x.untyped_data());
    memory out_m(plan->dst, engine, y.untyped_data());
    memory bias_m(plan->bias, engine, bias.untyped_data());
    plan->primitive.execute(stream, {{DNNL_ARG_SRC, act_m}, {DNNL_ARG_WEIGHTS, weights_m},
                                     {DNNL_ARG_BIAS, bias_m}, {DNNL_ARG_DST, out_m},
                                     {DNNL_ARG_SCRATCHPAD, scratch_m}});
    stream.wait();
    return ffi::Error::Success();
  });
}

// The forward pass on the HWIO kernel `w`, or at inference on a kernel packed for oneDNN
// (PackWeights) or for Winograd (winograd.cc): y = conv(x, w) + bias (+ y's previous contents
// if `post` has kSum), then max(0, .) if `post` has kRelu.
ffi::Error RunForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias, ffi::AnyBuffer y,
                      int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                      int post) {
  if (w.element_type() != ffi::DataType::U8) {
    return Run(kForward, x, y, w, &bias, sh, sw, pt, pb, pl, pr, post);
  }
  if (!affect_jax::IsWinogradPacked(w)) {
    return RunPacked(x, w, bias, y, sh, sw, pt, pb, pl, pr, post);
  }
  auto a = x.dimensions(), o = y.dimensions();
  if (a.size() != 4 || o.size() != 4 || sh != 1 || sw != 1 || o[1] != a[1] + pt + pb - 2 ||
      o[2] != a[2] + pl + pr - 2) {
    return Invalid("a kernel packed for Winograd needs a 3x3 stride-1 geometry");
  }
  return affect_jax::WinogradForwardPacked(x, w, bias, y, pt, pl, post & kRelu, post & kSum);
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t relu) {
  if (relu != 0 && relu != 1) return Invalid("relu must be 0 or 1");
  return RunForward(x, w, bias, *y, sh, sw, pt, pb, pl, pr, relu == 1 ? kRelu : 0);
}

// Forward + residual before the ReLU (inference). XLA passes `residual` in y's buffer (the
// call aliases them); if it did not, it is copied there first.
ffi::Error ForwardAdd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                      ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y, int64_t sh,
                      int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t relu) {
  if (relu != 0 && relu != 1) return Invalid("relu must be 0 or 1");
  if (auto e = PlaceResidual(residual, *y); e.failure()) return e;
  return RunForward(x, w, bias, *y, sh, sw, pt, pb, pl, pr, kSum | (relu == 1 ? kRelu : 0));
}

}  // namespace

// The bytes of a packed kernel (header included) for PackWeights's arguments: `geometry` holds
// n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr; `bfloat16` 0 or 1; -1 if oneDNN cannot
// build the convolution. Python sizes PackWeights's result with it.
extern "C" int64_t affect_jax_conv_packed_bytes(const int64_t* geometry, int bfloat16, int relu) {
  const int64_t* q = geometry;
  const PackHeader header{kPackMagic, q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9],
                          q[10], q[11], q[12],
                          static_cast<int64_t>(bfloat16 ? memory::data_type::bf16
                                                        : memory::data_type::f32),
                          relu ? kRelu : 0};
  try {
    return static_cast<int64_t>(PackedBytes(header));
  } catch (const std::exception&) {
    return -1;
  }
}

#define AFFECT_JAX_CONV_ATTRS                                                            \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")        \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_CONV_ATTRS
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvForwardAdd, ForwardAdd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_CONV_ATTRS
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() AFFECT_JAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxConvPackWeights, PackWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("batch")
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width") AFFECT_JAX_CONV_ATTRS
                                  .Attr<int64_t>("relu"));

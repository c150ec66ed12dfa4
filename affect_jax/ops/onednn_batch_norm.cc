// oneDNN training-mode batch normalization (forward with batch statistics, backward) as XLA
// FFI handlers.
//
// Why hand-written: outside the convolutions, BatchNorm is most of a ResNet50 train step on
// XLA:CPU, which spends about a dozen passes over every activation on its forward and backward
// (docs/performance.md); oneDNN's kernels make the minimum (statistics, normalise; two reductions
// and one elementwise pass back). Activations are NHWC (float32 or bfloat16); scale, shift and
// the statistics are float32 [C]. Variance is the biased batch variance, as Keras and Flax use.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "affect_jax/ops/onednn_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace affect_jax;  // NOLINT: the shared helpers of onednn_common.h
using Tag = dnnl::memory::format_tag;

struct Plan {
  dnnl::primitive primitive;
  memory::desc data, stats, scratchpad;
};

using Key = std::tuple<bool, int, int64_t, int64_t, int64_t, int64_t, float>;

std::shared_ptr<Plan> BuildPlan(bool backward, memory::data_type dt, int64_t n, int64_t h,
                                int64_t w, int64_t c, float epsilon) {
  auto plan = std::make_shared<Plan>();
  plan->data = memory::desc({n, c, h, w}, dt, Tag::nhwc);
  plan->stats = memory::desc({c}, memory::data_type::f32, Tag::a);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  dnnl::batch_normalization_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, plan->data, plan->data, epsilon, flags,
      attr);
  if (!backward) {
    plan->scratchpad = fwd.scratchpad_desc();
    plan->primitive = dnnl::batch_normalization_forward(fwd);
  } else {
    dnnl::batch_normalization_backward::primitive_desc bwd(
        Engine(), dnnl::prop_kind::backward, plan->data, plan->data, plan->data, epsilon, flags,
        fwd, attr);
    plan->scratchpad = bwd.scratchpad_desc();
    plan->primitive = dnnl::batch_normalization_backward(bwd);
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(bool backward, memory::data_type dt, int64_t n, int64_t h,
                              int64_t w, int64_t c, float epsilon) {
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<Plan>> cache;
  const Key key(backward, static_cast<int>(dt), n, h, w, c, epsilon);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto plan = BuildPlan(backward, dt, n, h, w, c, epsilon);
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, plan).first->second;
}

ffi::Error CheckStats(const ffi::AnyBuffer& b, int64_t c, const char* what) {
  if (b.element_type() != ffi::DataType::F32 || b.dimensions().size() != 1 ||
      b.dimensions()[0] != c) {
    return ffi::Error::InvalidArgument(std::string("affect_jax oneDNN batch_norm: ") + what +
                                       " must be float32 [C]");
  }
  return ffi::Error::Success();
}

// x [N,H,W,C]; scale, shift [C] -> y [N,H,W,C], batch mean and biased variance [C].
ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                   ffi::Result<ffi::AnyBuffer> var, float epsilon) {
  if (auto e = CheckRank(x, 4, "batch_norm", "x"); e.failure()) return e;
  memory::data_type dt;
  if (auto e = DataTypeOf(x.element_type(), "batch_norm", &dt); e.failure()) return e;
  auto d = x.dimensions();
  for (auto [b, what] : {std::pair{&scale, "scale"}, {&shift, "shift"}}) {
    if (auto e = CheckStats(*b, d[3], what); e.failure()) return e;
  }
  try {
    auto plan = GetPlan(false, dt, d[0], d[1], d[2], d[3], epsilon);
    auto& engine = Engine();
    Buffer scratch = Allocate(plan->scratchpad.get_size());
    std::lock_guard<std::mutex> serial(ExecutionMutex());
    dnnl::stream stream(engine);
    plan->primitive.execute(stream, {
        {DNNL_ARG_SRC, memory(plan->data, engine, x.untyped_data())},
        {DNNL_ARG_DST, memory(plan->data, engine, y->untyped_data())},
        {DNNL_ARG_SCALE, memory(plan->stats, engine, scale.untyped_data())},
        {DNNL_ARG_SHIFT, memory(plan->stats, engine, shift.untyped_data())},
        {DNNL_ARG_MEAN, memory(plan->stats, engine, mean->untyped_data())},
        {DNNL_ARG_VARIANCE, memory(plan->stats, engine, var->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, memory(plan->scratchpad, engine, scratch.get())}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("affect_jax oneDNN batch_norm: ") + e.what());
  }
  return ffi::Error::Success();
}

// x, dy [N,H,W,C]; mean, var, scale [C] -> dx [N,H,W,C], dscale, dshift [C].
ffi::Error Backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean, ffi::AnyBuffer var,
                    ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dscale, ffi::Result<ffi::AnyBuffer> dshift,
                    float epsilon) {
  if (auto e = CheckRank(x, 4, "batch_norm", "x"); e.failure()) return e;
  memory::data_type dt;
  if (auto e = DataTypeOf(x.element_type(), "batch_norm", &dt); e.failure()) return e;
  if (dy.element_type() != x.element_type() || dy.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("affect_jax oneDNN batch_norm: dy must match x");
  }
  auto d = x.dimensions();
  for (auto [b, what] : {std::pair{&mean, "mean"}, {&var, "var"}, {&scale, "scale"}}) {
    if (auto e = CheckStats(*b, d[3], what); e.failure()) return e;
  }
  try {
    auto plan = GetPlan(true, dt, d[0], d[1], d[2], d[3], epsilon);
    auto& engine = Engine();
    Buffer scratch = Allocate(plan->scratchpad.get_size());
    std::lock_guard<std::mutex> serial(ExecutionMutex());
    dnnl::stream stream(engine);
    plan->primitive.execute(stream, {
        {DNNL_ARG_SRC, memory(plan->data, engine, x.untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(plan->data, engine, dy.untyped_data())},
        {DNNL_ARG_MEAN, memory(plan->stats, engine, mean.untyped_data())},
        {DNNL_ARG_VARIANCE, memory(plan->stats, engine, var.untyped_data())},
        {DNNL_ARG_SCALE, memory(plan->stats, engine, scale.untyped_data())},
        {DNNL_ARG_DIFF_SRC, memory(plan->data, engine, dx->untyped_data())},
        {DNNL_ARG_DIFF_SCALE, memory(plan->stats, engine, dscale->untyped_data())},
        {DNNL_ARG_DIFF_SHIFT, memory(plan->stats, engine, dshift->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, memory(plan->scratchpad, engine, scratch.get())}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("affect_jax oneDNN batch_norm: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxBatchNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxBatchNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon"));

// Lets Python check it loaded the libdnnl it was built against.
extern "C" int affect_jax_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

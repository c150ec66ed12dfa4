// Engine, serialisation, buffers and argument checks for the oneDNN custom calls.
#ifndef AFFECT_JAX_OPS_ONEDNN_COMMON_H_
#define AFFECT_JAX_OPS_ONEDNN_COMMON_H_

#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace affect_jax {

namespace ffi = xla::ffi;
using dnnl::memory;

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One oneDNN primitive at a time: each already uses every core (OpenMP), and XLA may run
// independent custom calls (e.g. a layer's two gradients) concurrently, which would
// oversubscribe the cores and stall OpenMP's barriers.
inline std::mutex& ExecutionMutex() {
  static std::mutex mutex;
  return mutex;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<void, FreeDeleter>;

inline Buffer Allocate(size_t bytes) {
  if (bytes == 0) return Buffer(nullptr);
  const size_t rounded = (bytes + 63) / 64 * 64;
  return Buffer(std::aligned_alloc(64, rounded));
}

inline ffi::Error DataTypeOf(ffi::DataType t, const char* op, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32: *out = memory::data_type::f32; return ffi::Error::Success();
    case ffi::DataType::BF16: *out = memory::data_type::bf16; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(std::string("affect_jax oneDNN ") + op +
                                         ": dtype must be f32 or bf16");
  }
}

inline ffi::Error CheckRank(const ffi::AnyBuffer& b, size_t rank, const char* op,
                            const char* what) {
  if (b.dimensions().size() != rank) {
    return ffi::Error::InvalidArgument(std::string("affect_jax oneDNN ") + op + ": " + what +
                                       " must be rank " + std::to_string(rank));
  }
  return ffi::Error::Success();
}

}  // namespace affect_jax

#endif  // AFFECT_JAX_OPS_ONEDNN_COMMON_H_

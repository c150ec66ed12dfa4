// Helpers shared by the extension's hand-written kernels (batch_norm.cc, max_pool.cc): the
// execution lock, float32/bfloat16 element access and the OpenMP row split.

#ifndef AFFECT_JAX_OPS_KERNEL_UTIL_H_
#define AFFECT_JAX_OPS_KERNEL_UTIL_H_

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>

// The lock every kernel of the extension holds while it runs (defined in onednn_conv.cc): one
// OpenMP parallel region at a time.
std::mutex& AffectJaxExecutionMutex();

namespace affect_jax {

#define ALWAYS_INLINE inline __attribute__((always_inline))
// AVX-512 where the CPU has it, else AVX2 or baseline x86-64: GCC builds each row kernel for
// all three and the loader picks one at run time.
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// bfloat16 values are handled as their uint16_t bits.
ALWAYS_INLINE float Load(const float* p, int64_t i) { return p[i]; }
ALWAYS_INLINE float Load(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
ALWAYS_INLINE void Store(float* p, int64_t i, float v) { p[i] = v; }
// Round to nearest even, as XLA's convert; NaN stays a (quiet) NaN.
ALWAYS_INLINE void Store(uint16_t* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  p[i] = static_cast<uint16_t>(v != v ? ((bits >> 16) | 0x40u) : rounded);
}

// Runs body(r0, r1, thread) over a fixed split of the rows, one block per thread.
template <typename Body>
void ParallelRows(int64_t rows, Body body) {
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    body(rows * t / nt, rows * (t + 1) / nt, t);
  }
}

}  // namespace affect_jax

#endif  // AFFECT_JAX_OPS_KERNEL_UTIL_H_

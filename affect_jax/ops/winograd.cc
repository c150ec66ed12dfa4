// 3x3 stride-1 float32 convolutions by Winograd's minimal filtering F(4x4, 3x3), as XLA FFI
// handlers.
//
// Why hand-written: a float32 3x3 convolution by oneDNN 3.2 (direct, AVX-512) runs near the
// machine's float32 matrix-product speed, and oneDNN 3.x has no CPU Winograd kernels left;
// F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input tile with 36 instead of 144
// multiplications per channel pair, so VGG16's float32 convolutions and both their gradients
// need a quarter of the multiply-adds (docs/performance.md). XLA cannot do the transforms well
// (its fusion of the 36 strided tile slices is memory-bound and slow), so they are written
// here.
//
// Algorithm (Lavin & Gray 2016), per 4x4 output tile and channel pair:
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A,   d: the 6x6 input tile, g: the 3x3 kernel.
// Here, in chunks of tiles so that the transformed tiles stay small:
//   forward: U = G g G^T [36, C, K] once per call; V = B^T d B per tile; M[p] = V[p] @ U[p]
//            for the 36 positions p (a batched oneDNN matmul); Y = A^T M A (+ bias, ReLU);
//   input gradient: the same on dY with the kernel rotated by 180 degrees and its channel
//            roles swapped (a 3x3 stride-1 convolution's input gradient is that convolution);
//   weights: dU[p] = sum over tiles V[p]^T @ dM[p] with dM = A dY A^T (the transpose of the
//            output transform), then dg = G^T dU G, and the bias gradient.
//
// Layout: activations NHWC float32, row-major. Padding is explicit (pad_top, pad_left; the
// output size comes from y's / dy's shape); positions outside the input read as zero.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernel_util.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using affect_jax::ParallelRows;
using dnnl::memory;

constexpr int64_t kPositions = 36;  // 6x6 transformed positions per tile
constexpr int64_t kBlock = 64;      // channels handled together (a few AVX-512 vectors)

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("affect_jax winograd conv: " + what);
}

// Input (or dy) geometry and the tiling of the output.
struct Tiling {
  int64_t n, h, w, c;    // input NHWC
  int64_t oh, ow, k;     // output spatial size and channels
  int64_t pt, pl;        // padding before the first row / column
  int64_t th() const { return (oh + 3) / 4; }
  int64_t tw() const { return (ow + 3) / 4; }
  int64_t tiles() const { return n * th() * tw(); }
};

// out[r][0..n) = sum_i coef[r][i] * in[i][0..n) for B^T's six rows, unrolled so that each
// channel loop vectorizes.
ALWAYS_INLINE void BtRows(const float* const in[6], float* const out[6], int64_t n) {
  // No aliasing between `in` and `out` (distinct scratch rows), so: vectorize.
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    const float d0 = in[0][q], d1 = in[1][q], d2 = in[2][q], d3 = in[3][q], d4 = in[4][q],
                d5 = in[5][q];
    out[0][q] = 4.f * d0 - 5.f * d2 + d4;
    out[1][q] = -4.f * d1 - 4.f * d2 + d3 + d4;
    out[2][q] = 4.f * d1 - 4.f * d2 - d3 + d4;
    out[3][q] = -2.f * d1 - d2 + 2.f * d3 + d4;
    out[4][q] = 2.f * d1 - d2 - 2.f * d3 + d4;
    out[5][q] = 4.f * d1 - 5.f * d3 + d5;
  }
}

// A^T's four rows applied to six inputs.
ALWAYS_INLINE void AtRows(const float* const in[6], float* const out[4], int64_t n) {
  // No aliasing between `in` and `out` (distinct scratch rows), so: vectorize.
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    const float m0 = in[0][q], m1 = in[1][q], m2 = in[2][q], m3 = in[3][q], m4 = in[4][q],
                m5 = in[5][q];
    const float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
    out[0][q] = m0 + s12 + s34;
    out[1][q] = d12 + 2.f * d34;
    out[2][q] = s12 + 4.f * s34;
    out[3][q] = d12 + 8.f * d34 + m5;
  }
}

// A's six rows applied to four inputs (the transpose of AtRows).
ALWAYS_INLINE void ARows(const float* const in[4], float* const out[6], int64_t n) {
  // No aliasing between `in` and `out` (distinct scratch rows), so: vectorize.
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    const float y0 = in[0][q], y1 = in[1][q], y2 = in[2][q], y3 = in[3][q];
    const float s02 = y0 + y2, s13 = y1 + y3;
    out[0][q] = y0;
    out[1][q] = s02 + s13;
    out[2][q] = s02 - s13;
    out[3][q] = y0 + 2.f * y1 + 4.f * y2 + 8.f * y3;
    out[4][q] = y0 - 2.f * y1 + 4.f * y2 - 8.f * y3;
    out[5][q] = y3;
  }
}

// Tile number t (row-major over n, tile row, tile column) -> its first output row / column.
struct TileOrigin {
  int64_t b, y0, x0;
};
ALWAYS_INLINE TileOrigin Origin(const Tiling& g, int64_t t) {
  const int64_t tw = g.tw(), th = g.th();
  return {t / (th * tw), (t / tw) % th * 4, t % tw * 4};
}

// V[p][t - t0][c] = (B^T d B)[p] for tiles [t0, t1); V rows are `ld` tiles apart per position.
VECTOR_CLONES void InputTransformTiles(const float* __restrict x, const Tiling& g, int64_t t0,
                                       int64_t t1, int64_t tile0, int64_t ld,
                                       float* __restrict v) {
  alignas(64) float d[6][6][kBlock], r[6][6][kBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const TileOrigin o = Origin(g, t);
    for (int64_t c0 = 0; c0 < g.c; c0 += kBlock) {
      const int64_t nc = std::min(kBlock, g.c - c0);
      for (int i = 0; i < 6; ++i) {
        const int64_t yy = o.y0 - g.pt + i;
        for (int j = 0; j < 6; ++j) {
          const int64_t xx = o.x0 - g.pl + j;
          if (yy < 0 || yy >= g.h || xx < 0 || xx >= g.w) {
            std::memset(d[i][j], 0, nc * sizeof(float));
          } else {
            std::memcpy(d[i][j], x + ((o.b * g.h + yy) * g.w + xx) * g.c + c0,
                        nc * sizeof(float));
          }
        }
      }
      for (int j = 0; j < 6; ++j) {  // columns: r[a][j] = sum_i B^T[a][i] d[i][j]
        const float* in[6] = {d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]};
        float* out[6] = {r[0][j], r[1][j], r[2][j], r[3][j], r[4][j], r[5][j]};
        BtRows(in, out, nc);
      }
      for (int a = 0; a < 6; ++a) {  // rows: V[a][b] = sum_j B^T[b][j] r[a][j]
        const float* in[6] = {r[a][0], r[a][1], r[a][2], r[a][3], r[a][4], r[a][5]};
        float* out[6];
        for (int b = 0; b < 6; ++b) out[b] = v + ((a * 6 + b) * ld + (t - tile0)) * g.c + c0;
        BtRows(in, out, nc);
      }
    }
  }
}

// y tile = A^T M A (+ bias, + y's previous contents if `accumulate`, then ReLU if `relu`) for
// tiles [t0, t1); M rows are `ld` tiles apart.
VECTOR_CLONES void OutputTransformTiles(const float* __restrict m, const float* __restrict bias,
                                        bool relu, bool accumulate, const Tiling& g, int64_t t0,
                                        int64_t t1, int64_t tile0, int64_t ld,
                                        float* __restrict y) {
  alignas(64) float r[4][6][kBlock], out[4][4][kBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const TileOrigin o = Origin(g, t);
    for (int64_t k0 = 0; k0 < g.k; k0 += kBlock) {
      const int64_t nk = std::min(kBlock, g.k - k0);
      for (int b = 0; b < 6; ++b) {  // r[i][b] = sum_a A^T[i][a] M[a][b]
        const float* in[6];
        for (int a = 0; a < 6; ++a) in[a] = m + ((a * 6 + b) * ld + (t - tile0)) * g.k + k0;
        float* dst[4] = {r[0][b], r[1][b], r[2][b], r[3][b]};
        AtRows(in, dst, nk);
      }
      for (int i = 0; i < 4; ++i) {  // out[i][j] = sum_b A^T[j][b] r[i][b]
        const float* in[6] = {r[i][0], r[i][1], r[i][2], r[i][3], r[i][4], r[i][5]};
        float* dst[4] = {out[i][0], out[i][1], out[i][2], out[i][3]};
        AtRows(in, dst, nk);
      }
      for (int i = 0; i < 4 && o.y0 + i < g.oh; ++i) {
        for (int j = 0; j < 4 && o.x0 + j < g.ow; ++j) {
          float* dst = y + ((o.b * g.oh + o.y0 + i) * g.ow + o.x0 + j) * g.k + k0;
          const float* src = out[i][j];
          const float* bb = bias + k0;
          if (accumulate && relu) {
#pragma omp simd
            for (int64_t q = 0; q < nk; ++q) dst[q] = std::max(src[q] + bb[q] + dst[q], 0.f);
          } else if (accumulate) {
#pragma omp simd
            for (int64_t q = 0; q < nk; ++q) dst[q] = src[q] + bb[q] + dst[q];
          } else if (relu) {
#pragma omp simd
            for (int64_t q = 0; q < nk; ++q) dst[q] = std::max(src[q] + bb[q], 0.f);
          } else {
#pragma omp simd
            for (int64_t q = 0; q < nk; ++q) dst[q] = src[q] + bb[q];
          }
        }
      }
    }
  }
}

// dM[p][t - t0][k] = (A dY A^T)[p] for tiles [t0, t1) (dY zero outside the output), and
// db[k] += the sum of those dY.
VECTOR_CLONES void GradTransformTiles(const float* __restrict dy, const Tiling& g, int64_t t0,
                                      int64_t t1, int64_t tile0, int64_t ld,
                                      float* __restrict dm, double* __restrict db) {
  alignas(64) float e[4][4][kBlock], r[6][4][kBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const TileOrigin o = Origin(g, t);
    for (int64_t k0 = 0; k0 < g.k; k0 += kBlock) {
      const int64_t nk = std::min(kBlock, g.k - k0);
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          if (o.y0 + i >= g.oh || o.x0 + j >= g.ow) {
            std::memset(e[i][j], 0, nk * sizeof(float));
          } else {
            const float* src = dy + ((o.b * g.oh + o.y0 + i) * g.ow + o.x0 + j) * g.k + k0;
            std::memcpy(e[i][j], src, nk * sizeof(float));
            for (int64_t q = 0; q < nk; ++q) db[k0 + q] += src[q];
          }
        }
      }
      for (int j = 0; j < 4; ++j) {  // r[a][j] = sum_i A[a][i] e[i][j]
        const float* in[4] = {e[0][j], e[1][j], e[2][j], e[3][j]};
        float* out[6] = {r[0][j], r[1][j], r[2][j], r[3][j], r[4][j], r[5][j]};
        ARows(in, out, nk);
      }
      for (int a = 0; a < 6; ++a) {  // dM[a][b] = sum_j A[b][j] r[a][j]
        const float* in[4] = {r[a][0], r[a][1], r[a][2], r[a][3]};
        float* out[6];
        for (int b = 0; b < 6; ++b) out[b] = dm + ((a * 6 + b) * ld + (t - tile0)) * g.k + k0;
        ARows(in, out, nk);
      }
    }
  }
}

// G (6x3): the kernel transform's matrix.
constexpr float kG[6][3] = {{1.f / 4, 0.f, 0.f},
                            {-1.f / 6, -1.f / 6, -1.f / 6},
                            {-1.f / 6, 1.f / 6, -1.f / 6},
                            {1.f / 24, 1.f / 12, 1.f / 6},
                            {1.f / 24, -1.f / 12, 1.f / 6},
                            {0.f, 0.f, 1.f}};

// u[p][c][k] = (G w G^T)[p] for the HWIO kernel w [3, 3, C, K], rows c of [c0, c1); with
// `flip` of the kernel rotated by 180 degrees (w[2 - i][2 - j]).
VECTOR_CLONES void TransformKernelRows(const float* __restrict w, int64_t cdim, int64_t kdim,
                                       bool flip, int64_t c0, int64_t c1, float* __restrict u) {
  for (int64_t c = c0; c < c1; ++c) {
    const float* tap[3][3];
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        const int ii = flip ? 2 - i : i, jj = flip ? 2 - j : j;
        tap[i][j] = w + ((ii * 3 + jj) * cdim + c) * kdim;
      }
    }
    for (int a = 0; a < 6; ++a) {
      for (int b = 0; b < 6; ++b) {
        float* __restrict out = u + ((a * 6 + b) * cdim + c) * kdim;
        float coef[3][3];
        for (int i = 0; i < 3; ++i) {
          for (int j = 0; j < 3; ++j) coef[i][j] = kG[a][i] * kG[b][j];
        }
#pragma omp simd
        for (int64_t k = 0; k < kdim; ++k) {
          float acc = 0.f;
          for (int i = 0; i < 3; ++i) {
            for (int j = 0; j < 3; ++j) acc += coef[i][j] * tap[i][j][k];
          }
          out[k] = acc;
        }
      }
    }
  }
}

// dw[i][j][c][k] = (G^T du G)[i][j] (the adjoint of the kernel transform), rows c of [c0, c1).
VECTOR_CLONES void UntransformKernelRows(const float* __restrict du, int64_t cdim, int64_t kdim,
                                         int64_t c0, int64_t c1, float* __restrict dw) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        float* __restrict out = dw + ((i * 3 + j) * cdim + c) * kdim;
        for (int64_t k = 0; k < kdim; ++k) out[k] = 0.f;
        for (int p = 0; p < kPositions; ++p) {
          const float coef = kG[p / 6][i] * kG[p % 6][j];
          if (coef == 0.f) continue;
          const float* __restrict in = du + (p * cdim + c) * kdim;
#pragma omp simd
          for (int64_t k = 0; k < kdim; ++k) out[k] += coef * in[k];
        }
      }
    }
  }
}

// A batched matmul over the 36 positions, for a chunk of `rows` tiles:
//   kForward: dst[p] (rows x N) = src[p] (rows x K) @ wei[p] (K x N); the weights (the
//             transformed kernel, the same for every chunk) are reordered once per call into
//             the layout the matmul kernel wants, instead of by the kernel on every chunk;
//   kWeights: dst[p] (K x N) += src[p]^T (K x rows) @ wei[p] (rows x N), src stored rows x K.
enum MatmulKind : int { kForward = 0, kWeights = 1 };
using MatmulKey = std::tuple<int, int64_t, int64_t, int64_t, bool>;

struct Matmul {
  dnnl::matmul primitive;
  memory::desc src, wei, wei_user, dst, scratchpad;
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;
};

// `transposed` (kForward): the weights are stored [36][N][K] (the transformed kernel of the
// input gradient, whose channel roles are swapped).
std::shared_ptr<Matmul> GetMatmul(MatmulKind kind, int64_t rows, int64_t kdim, int64_t ndim,
                                  bool transposed = false) {
  static std::mutex mutex;
  static std::map<MatmulKey, std::shared_ptr<Matmul>> cache;
  const MatmulKey key(kind, rows, kdim, ndim, transposed);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto mm = std::make_shared<Matmul>();
  const auto f32 = memory::data_type::f32;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (kind == kForward) {
    mm->src = memory::desc({kPositions, rows, kdim}, f32, memory::format_tag::abc);
    mm->wei_user = transposed
        ? memory::desc({kPositions, kdim, ndim}, f32, {kdim * ndim, 1, kdim})
        : memory::desc({kPositions, kdim, ndim}, f32, memory::format_tag::abc);
    mm->dst = memory::desc({kPositions, rows, ndim}, f32, memory::format_tag::abc);
    const memory::desc wei_any({kPositions, kdim, ndim}, f32, memory::format_tag::any);
    dnnl::matmul::primitive_desc pd(AffectJaxCpuEngine(), mm->src, wei_any, mm->dst, attr);
    mm->wei = pd.weights_desc();
    mm->scratchpad = pd.scratchpad_desc();
    mm->primitive = dnnl::matmul(pd);
    mm->reorder_weights = mm->wei != mm->wei_user;
    if (mm->reorder_weights) {
      mm->weights_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(AffectJaxCpuEngine(), mm->wei_user, AffectJaxCpuEngine(),
                                        mm->wei));
    }
  } else {
    mm->src = memory::desc({kPositions, kdim, rows}, f32, {rows * kdim, 1, kdim});
    mm->wei = memory::desc({kPositions, rows, ndim}, f32, memory::format_tag::abc);
    mm->dst = memory::desc({kPositions, kdim, ndim}, f32, memory::format_tag::abc);
    dnnl::post_ops accumulate;
    accumulate.append_sum(1.f);
    attr.set_post_ops(accumulate);
    dnnl::matmul::primitive_desc pd(AffectJaxCpuEngine(), mm->src, mm->wei, mm->dst, attr);
    mm->scratchpad = pd.scratchpad_desc();
    mm->primitive = dnnl::matmul(pd);
  }
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, mm).first->second;
}

// Runs `mm` on buffers the caller owns; `scratch` is at least mm.scratchpad's size.
void RunMatmul(const Matmul& mm, const float* src, const float* wei, float* dst, void* scratch) {
  auto& engine = AffectJaxCpuEngine();
  dnnl::stream stream(engine);
  memory src_m(mm.src, engine, const_cast<float*>(src));
  memory wei_m(mm.wei, engine, const_cast<float*>(wei));
  memory dst_m(mm.dst, engine, dst);
  memory scratch_m(mm.scratchpad, engine, scratch);
  mm.primitive.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, wei_m},
                                {DNNL_ARG_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch_m}});
  stream.wait();
}

ffi::Error CheckF32(ffi::AnyBuffer b, const char* what, size_t rank) {
  if (b.element_type() != ffi::DataType::F32 || b.dimensions().size() != rank) {
    return Invalid(std::string(what) + " must be float32 of rank " + std::to_string(rank));
  }
  return ffi::Error::Success();
}

// The tiling of x [N, H, W, C] -> out [N, Ho, Wo, K] with padding (pt, pl) for a 3x3 window.
ffi::Error MakeTiling(ffi::AnyBuffer x, ffi::AnyBuffer out, const char* out_name, int64_t pt,
                      int64_t pl, int64_t chunk, Tiling* g) {
  if (auto e = CheckF32(x, "x", 4); e.failure()) return e;
  if (auto e = CheckF32(out, out_name, 4); e.failure()) return e;
  auto a = x.dimensions(), o = out.dimensions();
  *g = Tiling{a[0], a[1], a[2], a[3], o[1], o[2], o[3], pt, pl};
  if (o[0] != a[0]) return Invalid(std::string(out_name) + " and x differ in batch size");
  if (pt < 0 || pl < 0 || pt > 2 || pl > 2) return Invalid("padding must be 0, 1 or 2");
  // Padding after the input, implied by the output size: also 0..2 for a 3x3 window.
  const int64_t pb = g->oh + 2 - g->h - pt, pr = g->ow + 2 - g->w - pl;
  if (g->oh < 1 || g->ow < 1 || pb < 0 || pb > 2 || pr < 0 || pr > 2) {
    return Invalid(std::string(out_name) + " has no 3x3 stride-1 output size of x");
  }
  if (chunk < 1) return Invalid("chunk_tiles must be >= 1");
  return ffi::Error::Success();
}

// y = A^T [(B^T d B) @ U] A (+ bias, + y's previous contents if `accumulate`, then ReLU if
// `relu`) over every tile of g, `ld` tiles per batched matmul `mm`; `u` is the transformed
// kernel in mm's weights layout. Every chunk runs `ld` rows (the last one's extra rows are
// never read back), so one matmul and one weight layout serve all chunks.
void ForwardTiles(const float* xp, const Tiling& g, int64_t ld, const Matmul& mm, const float* u,
                  const float* bias, bool relu, bool accumulate, float* yp) {
  std::vector<float> v(kPositions * ld * g.c), m(kPositions * ld * g.k);
  std::vector<char> scratch(mm.scratchpad.get_size());
  for (int64_t t0 = 0; t0 < g.tiles(); t0 += ld) {
    const int64_t rows = std::min(ld, g.tiles() - t0);
    ParallelRows(rows, [&](int64_t r0, int64_t r1, int) {
      InputTransformTiles(xp, g, t0 + r0, t0 + r1, t0, ld, v.data());
    });
    RunMatmul(mm, v.data(), u, m.data(), scratch.data());
    ParallelRows(rows, [&](int64_t r0, int64_t r1, int) {
      OutputTransformTiles(m.data(), bias, relu, accumulate, g, t0 + r0, t0 + r1, t0, ld, yp);
    });
  }
}

// u [36, wc, wk] (the matmul's user layout) = the kernel transform of the HWIO kernel w.
std::vector<float> TransformKernel(const float* w, int64_t wc, int64_t wk, bool flip) {
  std::vector<float> u(kPositions * wc * wk);
  ParallelRows(wc, [&](int64_t c0, int64_t c1, int) {
    TransformKernelRows(w, wc, wk, flip, c0, c1, u.data());
  });
  return u;
}

// y = conv3x3(x, w) + bias (then max(0, .) if relu) for the HWIO kernel w [3, 3, C, K]; with
// `flip`, of the kernel rotated by 180 degrees with its channel roles swapped (w [3, 3, K, C]),
// which makes this the input gradient of the convolution by w.
ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y, int64_t pad_top, int64_t pad_left,
                   int64_t relu, int64_t flip, int64_t chunk_tiles) {
  Tiling g;
  if (auto e = MakeTiling(x, *y, "y", pad_top, pad_left, chunk_tiles, &g); e.failure()) return e;
  if (relu != 0 && relu != 1) return Invalid("relu must be 0 or 1");
  if (flip != 0 && flip != 1) return Invalid("flip must be 0 or 1");
  if (auto e = CheckF32(w, "kernel", 4); e.failure()) return e;
  if (auto e = CheckF32(bias, "bias", 1); e.failure()) return e;
  auto wd = w.dimensions();
  const int64_t wc = flip ? g.k : g.c, wk = flip ? g.c : g.k;
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != wc || wd[3] != wk) {
    return Invalid(flip ? "kernel must be [3, 3, K, C] for y's K and x's C"
                        : "kernel must be [3, 3, C, K] for x's C and y's K");
  }
  if (bias.dimensions()[0] != g.k) return Invalid("bias must be [K]");
  const int64_t ld = std::min(chunk_tiles, g.tiles());
  const float* wp = static_cast<const float*>(w.untyped_data());
  return affect_jax::CatchOneDnnErrors("affect_jax winograd conv", [&]() -> ffi::Error {
    auto mm = GetMatmul(kForward, ld, g.c, g.k, flip == 1);
    std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
    std::vector<float> u = TransformKernel(wp, wc, wk, flip == 1);
    std::vector<char> blocked;
    const float* up = u.data();
    if (mm->reorder_weights) {
      blocked.resize(mm->wei.get_size());
      dnnl::stream stream(AffectJaxCpuEngine());
      memory user(mm->wei_user, AffectJaxCpuEngine(), u.data());
      memory reordered(mm->wei, AffectJaxCpuEngine(), blocked.data());
      mm->weights_reorder.execute(stream, user, reordered);
      stream.wait();
      up = reinterpret_cast<const float*>(blocked.data());
    }
    ForwardTiles(static_cast<const float*>(x.untyped_data()), g, ld, *mm, up,
                 static_cast<const float*>(bias.untyped_data()), relu == 1, false,
                 static_cast<float*>(y->untyped_data()));
    return ffi::Error::Success();
  });
}

// What a packed kernel (Pack) begins with: its channels and the batched matmul whose weights
// layout the transformed kernel after the header has.
struct PackHeader {
  int64_t magic, c, k, rows, chunk_tiles;
};
constexpr int64_t kPackMagic = 0x314f4e49574a41;  // "AJWINO1"
constexpr size_t kPackHeaderBytes = 128;          // keeps the kernel 64-byte aligned
static_assert(sizeof(PackHeader) <= kPackHeaderBytes);

size_t PackedBytes(const PackHeader& p) {
  return kPackHeaderBytes + GetMatmul(kForward, p.rows, p.c, p.k)->wei.get_size();
}

// The reorder from one forward matmul's weights layout to another's, built once per pair.
dnnl::reorder& Relayout(const Matmul* from, const Matmul* to) {
  static std::mutex mutex;
  static std::map<std::pair<const Matmul*, const Matmul*>, dnnl::reorder> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({from, to});
  if (it == cache.end()) {
    auto& engine = AffectJaxCpuEngine();
    it = cache
             .emplace(std::pair{from, to}, dnnl::reorder(dnnl::reorder::primitive_desc(
                                               engine, from->wei, engine, to->wei)))
             .first;
  }
  return it->second;
}

// Packs the HWIO kernel w [3, 3, C, K] for inference: `packed` gets the header, then the
// transformed kernel in the weights layout of the forward matmul of `rows` tiles (the rows a
// call on the geometry it is packed for runs), chunks of `chunk_tiles` tiles at run time.
ffi::Error Pack(ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> packed, int64_t rows,
                int64_t chunk_tiles) {
  if (auto e = CheckF32(w, "kernel", 4); e.failure()) return e;
  auto wd = w.dimensions();
  if (wd[0] != 3 || wd[1] != 3) return Invalid("kernel must be [3, 3, C, K]");
  if (packed->element_type() != ffi::DataType::U8) return Invalid("packed must be uint8");
  if (rows < 1 || chunk_tiles < 1 || rows > chunk_tiles) {
    return Invalid("rows must be 1..chunk_tiles");
  }
  const PackHeader header{kPackMagic, wd[2], wd[3], rows, chunk_tiles};
  return affect_jax::CatchOneDnnErrors("affect_jax winograd pack", [&]() -> ffi::Error {
    auto mm = GetMatmul(kForward, rows, header.c, header.k);
    if (packed->size_bytes() != PackedBytes(header)) {
      return Invalid("packed has the wrong size for this kernel");
    }
    auto* out = static_cast<uint8_t*>(packed->untyped_data());
    std::memset(out, 0, kPackHeaderBytes);
    std::memcpy(out, &header, sizeof(header));
    std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
    std::vector<float> u =
        TransformKernel(static_cast<const float*>(w.untyped_data()), header.c, header.k, false);
    if (mm->reorder_weights) {
      dnnl::stream stream(AffectJaxCpuEngine());
      memory user(mm->wei_user, AffectJaxCpuEngine(), u.data());
      memory blocked(mm->wei, AffectJaxCpuEngine(), out + kPackHeaderBytes);
      mm->weights_reorder.execute(stream, user, blocked);
      stream.wait();
    } else {
      std::memcpy(out + kPackHeaderBytes, u.data(), u.size() * sizeof(float));
    }
    return ffi::Error::Success();
  });
}

// dw [3, 3, C, K] = G^T (sum over tiles of V^T dM) G, and db [K] = sum of dy, from x and dy.
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Result<ffi::AnyBuffer> db, int64_t pad_top, int64_t pad_left,
                           int64_t chunk_tiles) {
  Tiling g;
  if (auto e = MakeTiling(x, dy, "dy", pad_top, pad_left, chunk_tiles, &g); e.failure()) {
    return e;
  }
  if (auto e = CheckF32(*dw, "dw", 4); e.failure()) return e;
  if (auto e = CheckF32(*db, "db", 1); e.failure()) return e;
  auto wd = dw->dimensions();
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != g.c || wd[3] != g.k || db->dimensions()[0] != g.k) {
    return Invalid("dw must be [3, 3, C, K] and db [K] for x's C and dy's K");
  }
  const int64_t tiles = g.tiles(), ld = std::min(chunk_tiles, tiles);
  const float* xp = static_cast<const float*>(x.untyped_data());
  const float* dyp = static_cast<const float*>(dy.untyped_data());
  float* dwp = static_cast<float*>(dw->untyped_data());
  float* dbp = static_cast<float*>(db->untyped_data());
  return affect_jax::CatchOneDnnErrors("affect_jax winograd conv", [&]() -> ffi::Error {
    auto mm = GetMatmul(kWeights, ld, g.c, g.k);  // every chunk `ld` rows, as in Forward
    std::vector<float> v(kPositions * ld * g.c), dm(kPositions * ld * g.k);
    std::vector<float> du(kPositions * g.c * g.k);  // zero: the matmuls accumulate into it
    std::vector<char> scratch(mm->scratchpad.get_size());
    // Bias-gradient sums in double per thread: up to N*Ho*Wo terms each.
    std::vector<std::vector<double>> db_part(omp_get_max_threads(), std::vector<double>(g.k));
    std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
    for (int64_t t0 = 0; t0 < tiles; t0 += ld) {
      const int64_t rows = std::min(ld, tiles - t0);
      ParallelRows(rows, [&](int64_t r0, int64_t r1, int thread) {
        InputTransformTiles(xp, g, t0 + r0, t0 + r1, t0, ld, v.data());
        GradTransformTiles(dyp, g, t0 + r0, t0 + r1, t0, ld, dm.data(),
                           db_part[thread].data());
      });
      if (rows < ld) {  // the last chunk's unused rows must add nothing
        for (int64_t p = 0; p < kPositions; ++p) {
          std::memset(dm.data() + (p * ld + rows) * g.k, 0, (ld - rows) * g.k * sizeof(float));
        }
      }
      RunMatmul(*mm, v.data(), dm.data(), du.data(), scratch.data());
    }
    ParallelRows(g.c, [&](int64_t c0, int64_t c1, int) {
      UntransformKernelRows(du.data(), g.c, g.k, c0, c1, dwp);
    });
    for (int64_t q = 0; q < g.k; ++q) {
      double s = 0.0;
      for (const auto& part : db_part) s += part[q];
      dbp[q] = static_cast<float>(s);
    }
    return ffi::Error::Success();
  });
}

}  // namespace

namespace affect_jax {

bool IsWinogradPacked(ffi::AnyBuffer packed) {
  if (packed.element_type() != ffi::DataType::U8 || packed.size_bytes() < kPackHeaderBytes) {
    return false;
  }
  int64_t magic;
  std::memcpy(&magic, packed.untyped_data(), sizeof(magic));
  return magic == kPackMagic;
}

ffi::Error WinogradForwardPacked(ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::AnyBuffer bias,
                                 ffi::AnyBuffer y, int64_t pad_top, int64_t pad_left, bool relu,
                                 bool accumulate) {
  if (!IsWinogradPacked(packed)) return Invalid("packed must be a kernel from Pack");
  PackHeader p;
  std::memcpy(&p, packed.untyped_data(), sizeof(p));
  Tiling g;
  if (auto e = MakeTiling(x, y, "y", pad_top, pad_left, p.chunk_tiles, &g); e.failure()) {
    return e;
  }
  if (g.c != p.c || g.k != p.k) {
    return Invalid("the packed kernel was packed for other channels than x's and y's");
  }
  if (auto e = CheckF32(bias, "bias", 1); e.failure()) return e;
  if (bias.dimensions()[0] != g.k) return Invalid("bias must be [K]");
  const int64_t ld = std::min(p.chunk_tiles, g.tiles());
  return affect_jax::CatchOneDnnErrors("affect_jax winograd conv", [&]() -> ffi::Error {
    if (packed.size_bytes() != PackedBytes(p)) {
      return Invalid("packed has the wrong size for its header");
    }
    auto from = GetMatmul(kForward, p.rows, g.c, g.k), mm = GetMatmul(kForward, ld, g.c, g.k);
    std::lock_guard<std::mutex> serial(AffectJaxExecutionMutex());
    auto* u = static_cast<uint8_t*>(packed.untyped_data()) + kPackHeaderBytes;
    std::vector<char> relaid;
    // oneDNN 3.2 on AVX-512 lays the weights out alike for every row count; another ISA or
    // version may not, and then a call on another batch or size reorders them once.
    if (mm->wei != from->wei) {
      relaid.resize(mm->wei.get_size());
      dnnl::stream stream(AffectJaxCpuEngine());
      memory src(from->wei, AffectJaxCpuEngine(), u);
      memory dst(mm->wei, AffectJaxCpuEngine(), relaid.data());
      Relayout(from.get(), mm.get()).execute(stream, src, dst);
      stream.wait();
      u = reinterpret_cast<uint8_t*>(relaid.data());
    }
    ForwardTiles(static_cast<const float*>(x.untyped_data()), g, ld, *mm,
                 reinterpret_cast<const float*>(u),
                 static_cast<const float*>(bias.untyped_data()), relu, accumulate,
                 static_cast<float*>(y.untyped_data()));
    return ffi::Error::Success();
  });
}

}  // namespace affect_jax

// The bytes of Pack's result (header included) for a [3, 3, c, k] kernel and `rows`; -1 if
// oneDNN cannot build the matmul. Python sizes Pack's result with it.
extern "C" int64_t affect_jax_winograd_packed_bytes(int64_t c, int64_t k, int64_t rows) {
  try {
    return static_cast<int64_t>(PackedBytes(PackHeader{kPackMagic, c, k, rows, rows}));
  } catch (const std::exception&) {
    return -1;
  }
}

// Forward (with flip = 1 the input gradient): x, w, bias -> y. Weights: x, dy -> dw, db.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxWinogradForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("flip")
                                  .Attr<int64_t>("chunk_tiles"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxWinogradBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("chunk_tiles"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffectJaxWinogradPack, Pack,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("chunk_tiles"));

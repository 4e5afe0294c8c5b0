// Expert tiles on the GPU: forward and backward of one phase (slot) per launch, launchers in
// experts_cuda.h; CUDA headers only, so plain nvcc compiles it (.ci/check_cuda_sources.sh).
//
// Grid: args.grid blocks of kThreads; block i takes chunks i, i + grid, ... of the phase's rows,
// walks each chunk's runs of one expert, and decodes a run kTileTokens tokens at a time: a tile.
// Mirrors experts_cpu.cpp: activations token-major per tile ([T][C][H][W] here, the CPU keeps the
// token innermost for its vector lanes), phase-split ("folded") 3x3 convolutions of the upsampled
// maps, per-run weight-gradient accumulation. Each layer's weights go through a shared-memory stage
// (chunks of rows / output channels; convolutions folded while staging), read from global memory
// with consecutive threads on consecutive addresses. Activations live in shared memory behind the
// stage when they fit (args.shared_bytes), else in the block's slice of a global workspace. With
// args.tensor_cores the wide convolutions and their input gradients are implicit GEMMs on wmma tiles
// (conv_fwd_mma, conv_bwd_data_mma; experts_cuda.h "Precision").
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "experts_cuda.h"

namespace smoe_fast {
namespace {

constexpr int kThreads = 256;
constexpr int T = kTileTokens;
// Weight stage in scalars; also the conv weight-gradient scratch (kThreads * (16 folded taps + bias)).
constexpr int kStageScalars = kThreads * 18;
// Tensor-core convolutions (conv_fwd_mma): 16 x 16 tiles, each warp's scratch one such fp32 tile.
constexpr int kMmaTile = 16;
constexpr int kMmaWarpScalars = kMmaTile * kMmaTile;
constexpr int kMmaScratchScalars = kThreads / 32 * kMmaWarpScalars;
// B tiles staged column-major with a leading dimension of K + kMmaPad (staggers the columns' banks).
constexpr int kMmaPad = 8;
constexpr int kMmaKChunk = (kStageScalars / kMmaTile - kMmaPad) / kMmaTile * kMmaTile;  // K rows staged at once (272)

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Reads of z, grad_out and the weights in the compute type (half inputs always compute in fp32).
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// NaN in, NaN out for every activation (comparisons are false for NaN; exp/expm1 keep it).
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float expm1_of(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_of(double x) { return expm1(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t activate(scalar_t x, Activation act) {
  switch (act) {
    case Activation::kRelu: return x < scalar_t(0) ? scalar_t(0) : x;  // NaN stays NaN, like torch.relu
    case Activation::kElu: return x > scalar_t(0) ? x : expm1_of(x);
    case Activation::kSigmoid: return scalar_t(1) / (scalar_t(1) + exp_of(-x));
    default: return x;
  }
}

// d(activation)/d(input), written in terms of the activation's output a (as experts_cpu.cpp: a NaN a
// passes the gradient through, like torch's threshold_backward and elu_backward).
template <typename scalar_t>
__device__ __forceinline__ scalar_t activation_grad(scalar_t a, Activation act) {
  switch (act) {
    case Activation::kRelu: return a <= scalar_t(0) ? scalar_t(0) : scalar_t(1);
    case Activation::kElu: return a <= scalar_t(0) ? a + scalar_t(1) : scalar_t(1);
    case Activation::kSigmoid: return a * (scalar_t(1) - a);
    default: return scalar_t(1);
  }
}

// Weight-gradient targets are block-private: the expert's gradient (accumulate) or a partial slot
// (overwritten by the run's first tile, then accumulated).
template <typename scalar_t>
__device__ __forceinline__ void add_to(scalar_t* p, scalar_t v, bool overwrite) {
  *p = overwrite ? v : *p + v;
}

__host__ __device__ inline int boundary_size(const DecoderPlan& plan, int i) {
  return i == 0 ? plan.layers[0].in_size() : plan.layers[i - 1].out_size();
}

// Largest boundary of each parity: forward ping-pongs activations (and backward their gradients)
// between two buffers, boundary i in buffer i % 2.
__host__ __device__ inline int parity_size(const DecoderPlan& plan, int parity) {
  int size = 0;
  for (int i = parity; i <= plan.num_layers; i += 2) size = size > boundary_size(plan, i) ? size : boundary_size(plan, i);
  return size;
}

__host__ __device__ inline int64_t all_boundaries_size(const DecoderPlan& plan) {
  int64_t size = 0;
  for (int i = 0; i <= plan.num_layers; ++i) size += boundary_size(plan, i);
  return size;
}

// 3x3 tap k of output phase 0 or 1 -> its folded tap (experts_cpu.cpp's folded_tap).
__device__ __forceinline__ int folded_tap(int phase, int k) { return phase == 0 ? (k == 0 ? 0 : 1) : (k == 2 ? 1 : 0); }

// ------------------------------------------------------------------------------------------------
// Layers on a tile. in: [T][in_size], out: [T][out_size]; weight, bias: this expert's.

// out[t][o] = act(bias[o] + sum_k W[o,k] in[t][k]). Rows of W staged with stride K + 1 (no bank
// conflicts); threads on (t, o) with o fastest.
template <typename scalar_t, typename w_t>
__device__ void linear_fwd(const Layer& layer, const scalar_t* in, const w_t* weight, const w_t* bias, scalar_t* out,
                           scalar_t* stage) {
  const int K = layer.in_c, N = layer.out_size(), ld = K + 1;
  const int rows = kStageScalars / ld;
  for (int o0 = 0; o0 < N; o0 += rows) {
    const int nr = min(rows, N - o0);
    for (int j = threadIdx.x; j < nr * K; j += blockDim.x) stage[(j / K) * ld + j % K] = widen(weight[static_cast<int64_t>(o0) * K + j]);
    __syncthreads();
    for (int j = threadIdx.x; j < T * nr; j += blockDim.x) {
      const int t = j / nr, o = j % nr;
      const scalar_t* w = stage + o * ld;
      const scalar_t* x = in + t * K;
      scalar_t acc = widen(bias[o0 + o]);
      for (int k = 0; k < K; ++k) acc += w[k] * x[k];
      out[t * N + o0 + o] = activate(acc, layer.act);
    }
    __syncthreads();
  }
}

// grad_in[t][k] = sum_o W[o,k] d[t][o]; weight and bias gradients summed over the tile's n tokens.
template <typename scalar_t, typename w_t>
__device__ void linear_bwd(const Layer& layer, const scalar_t* in, const w_t* weight, const scalar_t* d, int n,
                           scalar_t* grad_in, scalar_t* grad_weight, scalar_t* grad_bias, bool overwrite,
                           scalar_t* stage) {
  const int K = layer.in_c, N = layer.out_size(), ld = K + 1;
  const int rows = kStageScalars / ld;
  for (int j = threadIdx.x; j < T * K; j += blockDim.x) grad_in[j] = scalar_t(0);  // each j keeps its thread
  for (int o0 = 0; o0 < N; o0 += rows) {
    const int nr = min(rows, N - o0);
    for (int j = threadIdx.x; j < nr * K; j += blockDim.x) stage[(j / K) * ld + j % K] = widen(weight[static_cast<int64_t>(o0) * K + j]);
    __syncthreads();
    for (int j = threadIdx.x; j < T * K; j += blockDim.x) {
      const int t = j / K, k = j % K;
      const scalar_t* g = d + t * N + o0;
      scalar_t acc = 0;
      for (int o = 0; o < nr; ++o) acc += stage[o * ld + k] * g[o];
      grad_in[j] += acc;
    }
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < static_cast<int64_t>(N) * K; j += blockDim.x) {
    const int o = static_cast<int>(j / K), k = static_cast<int>(j % K);
    scalar_t acc = 0;
    for (int t = 0; t < n; ++t) acc += d[t * N + o] * in[t * K + k];
    add_to(grad_weight + j, acc, overwrite);
  }
  for (int o = threadIdx.x; o < N; o += blockDim.x) {
    scalar_t acc = 0;
    for (int t = 0; t < n; ++t) acc += d[t * N + o];
    add_to(grad_bias + o, acc, overwrite);
  }
  __syncthreads();
}

// A 3x3, padding-1 conv of the input upsampled by UP, per output phase (a, c) as in experts_cpu.cpp:
// output (p*UP + a, q*UP + c) reads low-res (p + a - 1 + r, q + c - 1 + s), r, s < R, with the
// folded kernel F[co][phase][ci][r][s] (UP = 1: one phase, F = the 3x3 kernel).
template <int UP>
struct Folding {
  static constexpr int R = UP == 2 ? 2 : 3, RR = R * R, PH = UP * UP;
};

// Folded tap (r, s) of output phase ph for one (co, ci) pair's 3x3 kernel w.
template <int UP, typename scalar_t, typename w_t>
__device__ __forceinline__ scalar_t folded_weight(const w_t* w, int ph, int r, int s) {
  if (UP == 1) return widen(w[r * 3 + s]);
  scalar_t v = 0;
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      if (folded_tap(ph / 2, kh) == r && folded_tap(ph % 2, kw) == s) v += widen(w[kh * 3 + kw]);
  return v;
}

// Stages F for output channels [co0, co0 + nco): stage[((col * PH + ph) * Cin + ci) * RR + r * R + s].
template <int UP, typename scalar_t, typename w_t>
__device__ void stage_folded(const Layer& layer, const w_t* weight, int co0, int nco, scalar_t* stage) {
  using F = Folding<UP>;
  const int Cin = layer.in_c;
  for (int j = threadIdx.x; j < nco * F::PH * Cin * F::RR; j += blockDim.x) {
    const int s = j % F::R, r = (j / F::R) % F::R, ci = (j / F::RR) % Cin, ph = (j / (F::RR * Cin)) % F::PH;
    const int col = j / (F::RR * Cin * F::PH);
    stage[j] = folded_weight<UP, scalar_t>(weight + (static_cast<int64_t>(co0 + col) * Cin + ci) * 9, ph, r, s);
  }
}

template <int UP>
__host__ __device__ inline int channels_per_stage(const Layer& layer) {
  const int per_channel = Folding<UP>::PH * layer.in_c * Folding<UP>::RR;
  return kStageScalars / per_channel < layer.out_c ? kStageScalars / per_channel : layer.out_c;
}

// Threads on (output channel, pixel), pixel fastest; the tile's T tokens in registers.
template <int UP, typename scalar_t, typename w_t>
__device__ void conv_fwd(const Layer& layer, const scalar_t* in, const w_t* weight, const w_t* bias, scalar_t* out,
                         scalar_t* stage) {
  using F = Folding<UP>;
  const int Cin = layer.in_c, H = layer.in_h, W = layer.in_w, Wo = layer.out_w, HWo = layer.out_h * Wo;
  const int in_size = layer.in_size(), out_size = layer.out_size();
  const int nco_max = channels_per_stage<UP>(layer);
  for (int co0 = 0; co0 < layer.out_c; co0 += nco_max) {
    const int nco = min(nco_max, layer.out_c - co0);
    stage_folded<UP>(layer, weight, co0, nco, stage);
    __syncthreads();
    for (int o = threadIdx.x; o < nco * HWo; o += blockDim.x) {
      const int col = o / HWo, pix = o % HWo, y = pix / Wo, x = pix % Wo;
      const int p = y / UP, a = y % UP, q = x / UP, c = x % UP;
      const scalar_t* wf = stage + (col * F::PH + a * UP + c) * Cin * F::RR;
      scalar_t acc[T];
      for (int t = 0; t < T; ++t) acc[t] = widen(bias[co0 + col]);
      for (int ci = 0; ci < Cin; ++ci) {
        const scalar_t* src = in + ci * H * W;
#pragma unroll
        for (int r = 0; r < F::R; ++r) {
          const int iy = p + a - 1 + r;
          if (iy < 0 || iy >= H) continue;
#pragma unroll
          for (int s = 0; s < F::R; ++s) {
            const int ix = q + c - 1 + s;
            if (ix < 0 || ix >= W) continue;
            const scalar_t wv = wf[ci * F::RR + r * F::R + s];
#pragma unroll
            for (int t = 0; t < T; ++t) acc[t] += wv * src[t * in_size + iy * W + ix];
          }
        }
      }
      for (int t = 0; t < T; ++t) out[t * out_size + (co0 + col) * HWo + pix] = activate(acc[t], layer.act);
    }
    __syncthreads();
  }
}

// Tensor-core operands (args.tensor_cores, experts_cuda.h "Precision"): TF32 for fp32 tiles, the
// input's own half type under autocast or in a half model; fp32 accumulation. sm_80 and later.
template <typename in_t>
struct MmaOperand {
  static constexpr bool kAvailable = false;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // mma.h's own tf32 / bf16 condition (it undefines its macro)
template <>
struct MmaOperand<float> {
  static constexpr bool kAvailable = true;
  using storage = float;
  using fragment = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
  __device__ static float round(float x) { return nvcuda::wmma::__float_to_tf32(x); }
  __device__ static void store(float* p, float v) { *p = v; }
};
template <typename half_t>
struct HalfMmaOperand {
  static constexpr bool kAvailable = true;
  using storage = half_t;
  using fragment = half_t;
  static constexpr int kK = 16;
  __device__ static half_t round(half_t x) { return x; }
  __device__ static void store(half_t* p, float v) { *p = static_cast<half_t>(v); }  // round to nearest even
};
template <>
struct MmaOperand<__half> : HalfMmaOperand<__half> {};
template <>
struct MmaOperand<__nv_bfloat16> : HalfMmaOperand<__nv_bfloat16> {};
#endif

// One warp's 16 x 16 tile on the tensor cores: c = sum over k in [0, k_size) of A[m0 + i][k] B[k][j],
// k_size a multiple of 16. a_at(m, k) gives A's elements (0 outside); B is column-major in `b` with
// leading dimension ldb. `a` (the A tile, in the operand type) and `c` (the result, column-major,
// fp32) are the warp's scratch, the same kMmaWarpScalars floats.
template <typename Op, typename AFn>
__device__ void warp_tile_mma(const AFn& a_at, int m0, int k_size, const typename Op::storage* b, int ldb,
                              typename Op::storage* a, float* c) {
  namespace wmma = nvcuda::wmma;
  constexpr int N16 = kMmaTile;
  const int lane = threadIdx.x % 32;
  wmma::fragment<wmma::accumulator, 16, 16, Op::kK, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k0 = 0; k0 < k_size; k0 += N16) {
    for (int e = lane; e < N16 * N16; e += 32) Op::store(a + e, a_at(m0 + e % N16, k0 + e / N16));  // column-major
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < N16; kk += Op::kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, Op::kK, typename Op::fragment, wmma::col_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, typename Op::fragment, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + kk * N16, N16);
      wmma::load_matrix_sync(fb, b + k0 + kk, ldb);
      for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = Op::round(fa.x[i]);
      for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = Op::round(fb.x[i]);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    __syncwarp();
  }
  wmma::store_matrix_sync(c, acc, N16, wmma::mem_col_major);
  __syncwarp();
}

// The warps' tensor-core scratch: kMmaWarpScalars floats each, right behind the weight stage.
template <typename scalar_t>
__device__ __forceinline__ scalar_t* warp_scratch_of(scalar_t* stage) {
  return stage + kStageScalars + threadIdx.x / 32 * kMmaWarpScalars;
}

// conv_fwd as an implicit GEMM on the tensor cores, per output phase (a, c) and 16 output channels:
// rows m = (token t, low-res position p, q) of the tile, K = (ci, r, s) folded taps, so
// out[t][co][p*UP + a][q*UP + c] = act(bias[co] + sum_k A[m][k] B[k][co]). B: the phase's folded
// weights, staged column-major (K contiguous). Each warp takes 16-row tiles m0, m0 + 16 * warps, ...
// (warp_tile_mma: A built column-major, so lanes on consecutive rows read consecutive pixels).
// Returns false (and does nothing) where tensor cores are unavailable or the layer does not fit
// (16-column output and K steps, so a one-channel conv stays on FMA; one phase of 16 channels'
// folded weights within the stage): the caller runs conv_fwd.
template <int UP, typename in_t, typename scalar_t, typename w_t>
__device__ bool conv_fwd_mma(const Layer& layer, const scalar_t* in, const w_t* weight, const w_t* bias,
                             scalar_t* out, scalar_t* stage) {
  if constexpr (!MmaOperand<in_t>::kAvailable || !std::is_same<scalar_t, float>::value) {
    return false;
  } else {
    using Op = MmaOperand<in_t>;
    using S = typename Op::storage;
    using F = Folding<UP>;
    constexpr int N16 = kMmaTile;
    const int Cin = layer.in_c, H = layer.in_h, W = layer.in_w, HW = H * W, Wo = layer.out_w;
    const int HWo = layer.out_h * Wo, in_size = layer.in_size(), out_size = layer.out_size();
    const int K = Cin * F::RR, M = T * HW, m_tiles = (M + N16 - 1) / N16, ldb = K + kMmaPad;
    if (layer.out_c % N16 != 0 || K % N16 != 0 || N16 * ldb > kStageScalars) return false;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    S* b = reinterpret_cast<S*>(stage);                     // [16 columns][ldb]
    float* c = warp_scratch_of(stage);                      // [16 co][16 m], after the GEMM
    S* a = reinterpret_cast<S*>(c);                         // [16 k][16 m]
    for (int co0 = 0; co0 < layer.out_c; co0 += N16)
      for (int ph = 0; ph < F::PH; ++ph) {
        const int pa = ph / UP, pc = ph % UP;
        for (int j = threadIdx.x; j < N16 * K; j += blockDim.x) {
          const int col = j / K, k = j % K, ci = k / F::RR, r = (k % F::RR) / F::R, s = k % F::R;
          Op::store(b + col * ldb + k,
                    folded_weight<UP, float>(weight + (static_cast<int64_t>(co0 + col) * Cin + ci) * 9, ph, r, s));
        }
        __syncthreads();
        const auto a_at = [&](int m, int k) {
          const int t = m / HW, p = (m % HW) / W, q = m % W;
          const int ci = k / F::RR, iy = p + pa - 1 + (k % F::RR) / F::R, ix = q + pc - 1 + k % F::R;
          const bool inside = m < M && iy >= 0 && iy < H && ix >= 0 && ix < W;
          return inside ? in[t * in_size + ci * HW + iy * W + ix] : 0.0f;
        };
        for (int m0 = warp * N16; m0 < m_tiles * N16; m0 += warps * N16) {
          warp_tile_mma<Op>(a_at, m0, K, b, ldb, a, c);
          for (int e = lane; e < N16 * N16; e += 32) {
            const int m = m0 + e % N16, co = co0 + e / N16;
            if (m >= M) continue;
            const int t = m / HW, p = (m % HW) / W, q = m % W;
            out[t * out_size + co * HWo + (p * UP + pa) * Wo + q * UP + pc] = activate(c[e] + widen(bias[co]), layer.act);
          }
          __syncwarp();
        }
        __syncthreads();
      }
    return true;
  }
}

// A conv layer's forward: conv_fwd_mma on the tensor cores when enabled and it takes the layer, else
// conv_fwd.
template <int UP, typename in_t, typename scalar_t, typename w_t>
__device__ void conv_layer_fwd(const Layer& layer, const scalar_t* in, const w_t* weight, const w_t* bias,
                               scalar_t* out, scalar_t* stage, bool tensor_cores) {
  if (!(tensor_cores && conv_fwd_mma<UP, in_t>(layer, in, weight, bias, out, stage)))
    conv_fwd<UP>(layer, in, weight, bias, out, stage);
}

// The input gradient of conv_bwd on the tensor cores: grad_in[t][ci][iy][ix] = sum over k = (co,
// phase (a, c), r, s) of A[m][k] B[k][ci], rows m = (t, iy, ix), A[m][k] = d[t][co][(p*UP + a),
// (q*UP + c)] at p = iy - a + 1 - r, q = ix - c + 1 - s (0 outside), B = the folded weights. K is
// staged in chunks of kMmaKChunk rows of 16 input channels' B (column-major), each chunk's tile
// added to grad_in (zeroed first) by the warp that owns the rows, so chunks add in order. Returns false
// (and does nothing) where tensor cores are unavailable or the input channels are not a multiple of
// 16 (K needs no such rule: its last step is padded with zeros): the caller runs conv_bwd_data.
template <int UP, typename in_t, typename scalar_t, typename w_t>
__device__ bool conv_bwd_data_mma(const Layer& layer, const w_t* weight, const scalar_t* d, scalar_t* grad_in,
                                  scalar_t* stage) {
  if constexpr (!MmaOperand<in_t>::kAvailable || !std::is_same<scalar_t, float>::value) {
    return false;
  } else {
    using Op = MmaOperand<in_t>;
    using S = typename Op::storage;
    using F = Folding<UP>;
    constexpr int N16 = kMmaTile, TAPS = F::PH * F::RR;
    const int Cin = layer.in_c, H = layer.in_h, W = layer.in_w, HW = H * W, Wo = layer.out_w;
    const int HWo = layer.out_h * Wo, in_size = layer.in_size(), out_size = layer.out_size();
    const int K = layer.out_c * TAPS, K16 = (K + N16 - 1) / N16 * N16, M = T * HW, m_tiles = (M + N16 - 1) / N16;
    if (Cin % N16 != 0) return false;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    S* b = reinterpret_cast<S*>(stage);                     // [16 columns][chunk + pad]
    float* c = warp_scratch_of(stage);                      // [16 ci][16 m], after the GEMM
    S* a = reinterpret_cast<S*>(c);                         // [16 k][16 m]
    for (int j = threadIdx.x; j < T * in_size; j += blockDim.x) grad_in[j] = scalar_t(0);  // each j keeps its thread
    for (int n0 = 0; n0 < Cin; n0 += N16)
      for (int k0 = 0; k0 < K16; k0 += kMmaKChunk) {
        const int kc = min(kMmaKChunk, K16 - k0);
        for (int j = threadIdx.x; j < N16 * kc; j += blockDim.x) {
          const int col = j / kc, k = k0 + j % kc, co = k / TAPS, ph = (k % TAPS) / F::RR;
          const int r = (k % F::RR) / F::R, s = k % F::R;
          const float v = k < K ? folded_weight<UP, float>(weight + (static_cast<int64_t>(co) * Cin + n0 + col) * 9, ph, r, s)
                                : 0.0f;
          Op::store(b + col * (kc + kMmaPad) + j % kc, v);
        }
        __syncthreads();
        const auto a_at = [&](int m, int kl) {
          const int k = k0 + kl, t = m / HW, iy = (m % HW) / W, ix = m % W;
          const int co = k / TAPS, ph = (k % TAPS) / F::RR, pa = ph / UP, pc = ph % UP;
          const int p = iy - pa + 1 - (k % F::RR) / F::R, q = ix - pc + 1 - k % F::R;
          const bool inside = m < M && k < K && p >= 0 && p < H && q >= 0 && q < W;
          return inside ? d[t * out_size + co * HWo + (p * UP + pa) * Wo + q * UP + pc] : 0.0f;
        };
        for (int m0 = warp * N16; m0 < m_tiles * N16; m0 += warps * N16) {
          warp_tile_mma<Op>(a_at, m0, kc, b, kc + kMmaPad, a, c);
          for (int e = lane; e < N16 * N16; e += 32) {
            const int m = m0 + e % N16, ci = n0 + e / N16;
            if (m < M) grad_in[(m / HW) * in_size + ci * HW + m % HW] += c[e];
          }
          __syncwarp();
        }
        __syncthreads();
      }
    return true;
  }
}

// The folded-tap gradients acc[phase][r][s] (then the bias) of one (co, ci) pair, mapped back to
// its 3x3 taps (the transpose of the fold, experts_cpu.cpp's unfold_conv_grad) and added.
template <int UP, typename scalar_t>
__device__ __forceinline__ void unfold_add(const scalar_t* acc, scalar_t* grad_weight, scalar_t* grad_bias,
                                           bool overwrite) {
  constexpr int NF = Folding<UP>::PH * Folding<UP>::RR;
#pragma unroll
  for (int kh = 0; kh < 3; ++kh)
#pragma unroll
    for (int kw = 0; kw < 3; ++kw) {
      scalar_t sum = 0;
      if (UP == 1) {
        sum = acc[kh * 3 + kw];
      } else {
#pragma unroll
        for (int ph = 0; ph < 4; ++ph) sum += acc[ph * 4 + folded_tap(ph / 2, kh) * 2 + folded_tap(ph % 2, kw)];
      }
      add_to(grad_weight + kh * 3 + kw, sum, overwrite);
    }
  if (grad_bias != nullptr) add_to(grad_bias, acc[NF], overwrite);
}

// grad_in = conv^T(d) on the FMA units: threads on input pixels, the tile's T tokens in registers.
template <int UP, typename scalar_t, typename w_t>
__device__ void conv_bwd_data(const Layer& layer, const w_t* weight, const scalar_t* d, scalar_t* grad_in,
                              scalar_t* stage) {
  using F = Folding<UP>;
  const int Cin = layer.in_c, Cout = layer.out_c, H = layer.in_h, W = layer.in_w, HW = H * W;
  const int Wo = layer.out_w, HWo = layer.out_h * Wo;
  const int in_size = layer.in_size(), out_size = layer.out_size();
  const int nco_max = channels_per_stage<UP>(layer);
  for (int j = threadIdx.x; j < Cin * HW; j += blockDim.x)
    for (int t = 0; t < T; ++t) grad_in[t * in_size + j] = scalar_t(0);
  for (int co0 = 0; co0 < Cout; co0 += nco_max) {
    const int nco = min(nco_max, Cout - co0);
    stage_folded<UP>(layer, weight, co0, nco, stage);
    __syncthreads();
    for (int j = threadIdx.x; j < Cin * HW; j += blockDim.x) {
      const int ci = j / HW, iy = (j % HW) / W, ix = j % W;
      scalar_t acc[T] = {};
      for (int col = 0; col < nco; ++col)
        for (int ph = 0; ph < F::PH; ++ph) {
          const int a = ph / UP, c = ph % UP;
          const scalar_t* wf = stage + ((col * F::PH + ph) * Cin + ci) * F::RR;
          const scalar_t* g = d + (co0 + col) * HWo;
#pragma unroll
          for (int r = 0; r < F::R; ++r) {
            const int p = iy - a + 1 - r;
            if (p < 0 || p >= H) continue;
#pragma unroll
            for (int s = 0; s < F::R; ++s) {
              const int q = ix - c + 1 - s;
              if (q < 0 || q >= W) continue;
              const scalar_t wv = wf[r * F::R + s];
              const int o = (p * UP + a) * Wo + q * UP + c;
#pragma unroll
              for (int t = 0; t < T; ++t) acc[t] += wv * g[t * out_size + o];
            }
          }
        }
      for (int t = 0; t < T; ++t) grad_in[t * in_size + j] += acc[t];
    }
    __syncthreads();
  }
}

// grad_in = conv^T(d) (conv_bwd_data_mma on the tensor cores when enabled and it takes the layer, else
// conv_bwd_data); weight gradients folded per (co, ci) pair in registers, then unfolded to the 3x3
// taps (experts_cpu.cpp's unfold_conv_grad).
template <int UP, typename in_t, typename scalar_t, typename w_t>
__device__ void conv_bwd(const Layer& layer, const scalar_t* in, const w_t* weight, const scalar_t* d, int n,
                         scalar_t* grad_in, scalar_t* grad_weight, scalar_t* grad_bias, bool overwrite,
                         scalar_t* stage, bool tensor_cores) {
  using F = Folding<UP>;
  const int Cin = layer.in_c, Cout = layer.out_c, H = layer.in_h, W = layer.in_w, HW = H * W;
  const int Wo = layer.out_w, HWo = layer.out_h * Wo;
  const int in_size = layer.in_size(), out_size = layer.out_size();
  if (!(tensor_cores && conv_bwd_data_mma<UP, in_t>(layer, weight, d, grad_in, stage)))
    conv_bwd_data<UP>(layer, weight, d, grad_in, stage);
  // Weight and bias gradients: work item (pair, g) sums low-res positions g, g + G, ...; with G > 1
  // the G partial sums of a pair are added in g order through the stage.
  constexpr int NF = F::PH * F::RR;
  const int pairs = Cout * Cin, G = max(1, static_cast<int>(blockDim.x) / pairs);
  for (int item = threadIdx.x; item < pairs * G; item += blockDim.x) {
    const int pair = item / G, g = item % G, co = pair / Cin, ci = pair % Cin;
    scalar_t acc[NF + 1] = {};  // folded taps, then the bias
    for (int t = 0; t < n; ++t) {
      const scalar_t* src = in + t * in_size + ci * HW;
      const scalar_t* grad = d + t * out_size + co * HWo;
      for (int pos = g; pos < HW; pos += G) {
        const int p = pos / W, q = pos % W;
        scalar_t patch[9];  // low-res rows p - 1 .. p + 1, columns q - 1 .. q + 1, zero outside
#pragma unroll
        for (int u = 0; u < 3; ++u)
#pragma unroll
          for (int v = 0; v < 3; ++v) {
            const int iy = p + u - 1, ix = q + v - 1;
            patch[u * 3 + v] = iy >= 0 && iy < H && ix >= 0 && ix < W ? src[iy * W + ix] : scalar_t(0);
          }
#pragma unroll
        for (int ph = 0; ph < F::PH; ++ph) {
          const int a = ph / UP, c = ph % UP;
          const scalar_t dv = grad[(p * UP + a) * Wo + q * UP + c];
          acc[NF] += dv;
#pragma unroll
          for (int r = 0; r < F::R; ++r)
#pragma unroll
            for (int s = 0; s < F::R; ++s) acc[ph * F::RR + r * F::R + s] += dv * patch[(a + r) * 3 + c + s];
        }
      }
    }
    if (G == 1) {
      unfold_add<UP>(acc, grad_weight + static_cast<int64_t>(pair) * 9, ci == 0 ? grad_bias + co : nullptr, overwrite);
    } else {
#pragma unroll
      for (int f = 0; f <= NF; ++f) stage[item * (NF + 1) + f] = acc[f];
    }
  }
  if (G > 1) {
    __syncthreads();
    for (int pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
      const int co = pair / Cin, ci = pair % Cin;
      scalar_t acc[NF + 1] = {};
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int f = 0; f <= NF; ++f) acc[f] += stage[(pair * G + g) * (NF + 1) + f];
      unfold_add<UP>(acc, grad_weight + static_cast<int64_t>(pair) * 9, ci == 0 ? grad_bias + co : nullptr, overwrite);
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Tiles, runs and chunks.

// Where a tile's activations live in the block's region: forward keeps boundary i in buffer i % 2;
// backward keeps every boundary (act) and ping-pongs their gradients (grad).
template <typename scalar_t>
struct TileBuffers {
  scalar_t* base;
  const DecoderPlan* plan;
  bool backward;
  __device__ scalar_t* act(int i) const {
    if (!backward) return base + (i % 2 == 0 ? 0 : T * parity_size(*plan, 0));
    int64_t offset = 0;
    for (int j = 0; j < i; ++j) offset += boundary_size(*plan, j);
    return base + T * offset;
  }
  __device__ scalar_t* grad(int i) const {
    return base + T * (all_boundaries_size(*plan) + (i % 2 == 0 ? 0 : parity_size(*plan, 0)));
  }
};

// The tile's rows: flat index (token * K + slot) and token, set by the first T threads.
struct TileRows {
  int64_t flat[T];
  int64_t token[T];
};

// A run: the rows [row, end) of one expert within a chunk. continues: the expert's rows began in an
// earlier chunk, so its weight gradients go to the chunk's partial slot.
struct Run {
  int64_t expert, end;
  bool continues;
};

template <typename Args>
__device__ __forceinline__ void phase_rows(const Args& args, int64_t* begin, int64_t* end) {
  if (args.key_offsets == nullptr) {  // soft: phase k is every token, in order, for expert k
    *begin = 0;
    *end = args.num_tokens;
    return;
  }
  const int64_t k0 = args.phase * args.num_experts;
  *begin = args.key_offsets[k0];
  *end = args.key_offsets[k0 + args.num_experts];
}

template <typename Args>
__device__ __forceinline__ Run find_run(const Args& args, int64_t row, int64_t chunk_begin, int64_t chunk_end) {
  if (args.key_offsets == nullptr) return Run{args.phase, chunk_end, chunk_begin > 0};
  const int64_t k0 = args.phase * args.num_experts;
  const int64_t key = find_key(args.key_offsets, k0, k0 + args.num_experts, row);
  return Run{key - k0, min64(chunk_end, args.key_offsets[key + 1]), args.key_offsets[key] < chunk_begin};
}

template <typename Args>
__device__ void load_tile_rows(const Args& args, int64_t r0, int n, TileRows& rows) {
  if (threadIdx.x < n) {
    const int64_t r = r0 + threadIdx.x;
    const int64_t flat = args.sorted_rows != nullptr ? args.sorted_rows[r] : r * args.slots + args.phase;
    rows.flat[threadIdx.x] = flat;
    rows.token[threadIdx.x] = flat / args.slots;
  }
  __syncthreads();
}

// Decodes the tile's z through `expert`: buffers.act(0) .. act(num_layers).
template <typename Args, typename scalar_t = typename Args::acc_type>
__device__ void decode_tile(const Args& args, int64_t expert, const TileRows& rows, int n,
                            const TileBuffers<scalar_t>& buffers, scalar_t* stage) {
  const DecoderPlan& plan = args.plan;
  const int L = static_cast<int>(args.latent);
  scalar_t* z = buffers.act(0);
  for (int j = threadIdx.x; j < T * L; j += blockDim.x) {
    const int t = j / L;
    z[j] = t < n ? widen(args.z[rows.token[t] * L + j % L]) : scalar_t(0);  // unused lanes decode zeros
  }
  __syncthreads();
  for (int i = 0; i < plan.num_layers; ++i) {
    const Layer& layer = plan.layers[i];
    const auto* weight = args.weight[i] + expert * layer.weight_size();
    const auto* bias = args.bias[i] + expert * layer.bias_size();
    using in_t = typename Args::input_type;
    if (!layer.is_conv) {
      linear_fwd(layer, buffers.act(i), weight, bias, buffers.act(i + 1), stage);
    } else if (layer.up == 2) {
      conv_layer_fwd<2, in_t>(layer, buffers.act(i), weight, bias, buffers.act(i + 1), stage, args.tensor_cores);
    } else {
      conv_layer_fwd<1, in_t>(layer, buffers.act(i), weight, bias, buffers.act(i + 1), stage, args.tensor_cores);
    }
  }
}

// Every tile of the block's chunks, in order: body(expert, r0, n, chunk, continues, first tile of run).
template <typename Args, typename Body>
__device__ void for_each_tile(const Args& args, Body& body) {
  int64_t phase_begin, phase_end;
  phase_rows(args, &phase_begin, &phase_end);
  for (int64_t chunk = blockIdx.x;; chunk += gridDim.x) {
    const int64_t chunk_begin = phase_begin + chunk * args.rows_per_chunk;
    if (chunk_begin >= phase_end) break;
    const int64_t chunk_end = min64(chunk_begin + args.rows_per_chunk, phase_end);
    for (int64_t row = chunk_begin; row < chunk_end;) {
      const Run run = find_run(args, row, chunk_begin, chunk_end);
      for (int64_t r0 = row; r0 < run.end; r0 += T)
        body(run.expert, r0, static_cast<int>(min64(T, run.end - r0)), chunk, run.continues, r0 == row);
      row = run.end;
    }
  }
}

// Shared memory: the weight stage, the warps' tensor-core scratch (only with args.tensor_cores), then
// the tile's activations when they fit (else the block's slice of the workspace).
template <typename Args>
__host__ __device__ inline int stage_and_scratch_scalars(const Args& args) {
  return kStageScalars + (args.tensor_cores ? kMmaScratchScalars : 0);
}

template <typename Args, typename scalar_t = typename Args::acc_type>
__device__ __forceinline__ scalar_t* block_region(const Args& args, scalar_t* stage) {
  return args.workspace != nullptr ? args.workspace + blockIdx.x * args.acts_per_block
                                   : stage + stage_and_scratch_scalars(args);
}

// ------------------------------------------------------------------------------------------------
// Kernels.

template <typename Args>
struct ForwardTile {
  using scalar_t = typename Args::acc_type;
  const Args& args;
  TileBuffers<scalar_t> buffers;
  scalar_t* stage;
  TileRows& rows;
  __device__ void operator()(int64_t expert, int64_t r0, int n, int64_t, bool, bool) {
    load_tile_rows(args, r0, n, rows);
    decode_tile(args, expert, rows, n, buffers, stage);
    const scalar_t* y = buffers.act(args.plan.num_layers);  // [T][784]
    for (int pix = threadIdx.x; pix < kImagePixels; pix += blockDim.x)
      for (int t = 0; t < n; ++t) {
        const scalar_t gate = args.gates != nullptr ? args.gates[rows.flat[t]] : scalar_t(1);
        scalar_t* dst = args.out + rows.token[t] * kImagePixels + pix;
        *dst = args.phase == 0 ? gate * y[t * kImagePixels + pix] : *dst + gate * y[t * kImagePixels + pix];
      }
    __syncthreads();
  }
};

// Grid: args.grid blocks of kThreads (see the file comment); out[b] (+)= gate * D_e(z[b]) for phase k.
template <typename Args>
__global__ void __launch_bounds__(kThreads, 1) experts_fwd_kernel(const __grid_constant__ Args args) {
  using scalar_t = typename Args::acc_type;
  extern __shared__ __align__(128) unsigned char shared_raw[];  // wmma tiles: 32-byte aligned
  __shared__ TileRows rows;
  scalar_t* stage = reinterpret_cast<scalar_t*>(shared_raw);
  ForwardTile<Args> body{args, TileBuffers<scalar_t>{block_region(args, stage), &args.plan, false}, stage, rows};
  for_each_tile(args, body);
}

template <typename Args>
struct BackwardTile {
  using scalar_t = typename Args::acc_type;
  const Args& args;
  TileBuffers<scalar_t> buffers;
  scalar_t* stage;
  TileRows& rows;
  __device__ void operator()(int64_t expert, int64_t r0, int n, int64_t chunk, bool continues, bool first_tile) {
    using in_t = typename Args::input_type;
    const DecoderPlan& plan = args.plan;
    const int nl = plan.num_layers;
    load_tile_rows(args, r0, n, rows);
    decode_tile(args, expert, rows, n, buffers, stage);
    // dy = gate * grad_out; grad_gates = <grad_out, y> per token (a fixed-order block reduction).
    const scalar_t* y = buffers.act(nl);
    scalar_t* dy = buffers.grad(nl);
    scalar_t dgate[T];
    for (int t = 0; t < T; ++t) {
      dgate[t] = 0;
      const scalar_t gate = t < n ? args.gates[rows.flat[t]] : scalar_t(0);
      for (int pix = threadIdx.x; pix < kImagePixels; pix += blockDim.x) {
        const scalar_t g = t < n ? widen(args.grad_out[rows.token[t] * kImagePixels + pix]) : scalar_t(0);
        dy[t * kImagePixels + pix] = gate * g;
        dgate[t] += g * y[t * kImagePixels + pix];
      }
      stage[t * blockDim.x + threadIdx.x] = dgate[t];
    }
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride)
        for (int t = 0; t < T; ++t) stage[t * blockDim.x + threadIdx.x] += stage[t * blockDim.x + threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x < n) args.grad_gates[rows.flat[threadIdx.x]] = stage[threadIdx.x * blockDim.x];
    __syncthreads();
    const bool overwrite = continues && first_tile;
    scalar_t* partial = args.partials + chunk * args.params;
    for (int i = nl - 1; i >= 0; --i) {
      const Layer& layer = plan.layers[i];
      scalar_t* d = buffers.grad(i + 1);
      const scalar_t* a = buffers.act(i + 1);
      for (int j = threadIdx.x; j < T * layer.out_size(); j += blockDim.x) d[j] *= activation_grad(a[j], layer.act);
      __syncthreads();
      const auto* weight = args.weight[i] + expert * layer.weight_size();
      scalar_t* gw = continues ? partial + param_offset(plan, i) : args.grad_weight[i] + expert * layer.weight_size();
      scalar_t* gb = continues ? gw + layer.weight_size() : args.grad_bias[i] + expert * layer.bias_size();
      if (!layer.is_conv) {
        linear_bwd(layer, buffers.act(i), weight, d, n, buffers.grad(i), gw, gb, overwrite, stage);
      } else if (layer.up == 2) {
        conv_bwd<2, in_t>(layer, buffers.act(i), weight, d, n, buffers.grad(i), gw, gb, overwrite, stage,
                          args.tensor_cores);
      } else {
        conv_bwd<1, in_t>(layer, buffers.act(i), weight, d, n, buffers.grad(i), gw, gb, overwrite, stage,
                          args.tensor_cores);
      }
    }
    const int L = static_cast<int>(args.latent);
    const scalar_t* dz = buffers.grad(0);
    for (int j = threadIdx.x; j < n * L; j += blockDim.x) {
      scalar_t* dst = args.grad_z + rows.token[j / L] * L + j % L;
      *dst = args.phase == 0 ? dz[j] : *dst + dz[j];
    }
    __syncthreads();
  }
};

// Grid: args.grid blocks of kThreads; phase k's grad_z (+)=, grad_gates, weight gradients.
template <typename Args>
__global__ void __launch_bounds__(kThreads, 1) experts_bwd_kernel(const __grid_constant__ Args args) {
  using scalar_t = typename Args::acc_type;
  extern __shared__ __align__(128) unsigned char shared_raw[];  // wmma tiles: 32-byte aligned
  __shared__ TileRows rows;
  scalar_t* stage = reinterpret_cast<scalar_t*>(shared_raw);
  BackwardTile<Args> body{args, TileBuffers<scalar_t>{block_region(args, stage), &args.plan, true}, stage, rows};
  for_each_tile(args, body);
}

// Grid: ceil(B * K / 256) blocks, one row each thread. NaN for rows with an out-of-range expert.
template <typename Args>
__global__ void experts_mark_invalid_kernel(const __grid_constant__ Args args, bool backward) {
  using scalar_t = typename Args::acc_type;
  const int64_t f = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (f >= args.num_tokens * args.slots) return;
  const int64_t e = args.expert_idx[f];
  if (e >= 0 && e < args.num_experts) return;
  const scalar_t nan = static_cast<scalar_t>(NAN);
  const int64_t token = f / args.slots;
  if (!backward) {
    for (int pix = 0; pix < kImagePixels; ++pix) args.out[token * kImagePixels + pix] = nan;
  } else {
    for (int64_t l = 0; l < args.latent; ++l) args.grad_z[token * args.latent + l] = nan;
    args.grad_gates[f] = nan;
  }
}

template <typename Kernel>
cudaError_t set_shared(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace

template <typename Args>
int64_t plan_experts_launch(Args& args, bool backward, int max_shared_bytes, int num_sms) {
  using scalar_t = typename Args::acc_type;
  const DecoderPlan& plan = args.plan;
  args.params = param_offset(plan, plan.num_layers);
  // About 8 chunks per SM (load balance under skewed routing); backward's partial slots kept <= 2^24 scalars.
  int64_t chunks = 8 * static_cast<int64_t>(num_sms);
  if (backward) chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, (int64_t{1} << 24) / args.params));
  const int64_t B = std::max<int64_t>(args.num_tokens, 1);
  args.rows_per_chunk = ((B + chunks - 1) / chunks + T - 1) / T * T;
  args.num_chunks = (B + args.rows_per_chunk - 1) / args.rows_per_chunk;
  const int64_t per_token = backward ? all_boundaries_size(plan) + parity_size(plan, 0) + parity_size(plan, 1)
                                     : parity_size(plan, 0) + parity_size(plan, 1);
  args.acts_per_block = T * per_token;
  const int64_t stage_bytes = stage_and_scratch_scalars(args) * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t acts_bytes = args.acts_per_block * static_cast<int64_t>(sizeof(scalar_t));
  const bool in_shared = stage_bytes + acts_bytes + 1024 <= max_shared_bytes;  // 1 KB: static shared
  args.shared_bytes = static_cast<int>(in_shared ? stage_bytes + acts_bytes : stage_bytes);
  int64_t grid = std::min<int64_t>(args.num_chunks, 2 * static_cast<int64_t>(num_sms));
  if (!in_shared) grid = std::min<int64_t>(grid, std::max<int64_t>(1, (int64_t{1} << 28) / acts_bytes));  // <= 256 MB
  args.grid = static_cast<int>(grid);
  return in_shared ? 0 : grid * args.acts_per_block;
}

template <typename Args>
cudaError_t experts_fwd_cuda(const Args& args, cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;
  cudaError_t err = set_shared(experts_fwd_kernel<Args>, args.shared_bytes);
  if (err != cudaSuccess) return err;
  experts_fwd_kernel<Args><<<args.grid, kThreads, args.shared_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename Args>
cudaError_t experts_bwd_cuda(const Args& args, cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;
  cudaError_t err = set_shared(experts_bwd_kernel<Args>, args.shared_bytes);
  if (err != cudaSuccess) return err;
  experts_bwd_kernel<Args><<<args.grid, kThreads, args.shared_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename Args>
cudaError_t experts_mark_invalid_cuda(const Args& args, bool backward, cudaStream_t stream) {
  const int64_t rows = args.num_tokens * args.slots;
  if (rows == 0 || args.expert_idx == nullptr) return cudaSuccess;
  const int64_t blocks = (rows + 255) / 256;
  experts_mark_invalid_kernel<Args><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(args, backward);
  return cudaGetLastError();
}

#define SMOE_FAST_INSTANTIATE(scalar_t, in_t, w_t)                                                     \
  template int64_t plan_experts_launch(ExpertsCudaArgs<scalar_t, in_t, w_t>&, bool, int, int);          \
  template cudaError_t experts_fwd_cuda(const ExpertsCudaArgs<scalar_t, in_t, w_t>&, cudaStream_t);     \
  template cudaError_t experts_bwd_cuda(const ExpertsCudaArgs<scalar_t, in_t, w_t>&, cudaStream_t);     \
  template cudaError_t experts_mark_invalid_cuda(const ExpertsCudaArgs<scalar_t, in_t, w_t>&, bool, cudaStream_t);
SMOE_FAST_FOR_EACH_PRECISION(SMOE_FAST_INSTANTIATE)
#undef SMOE_FAST_INSTANTIATE

}  // namespace smoe_fast

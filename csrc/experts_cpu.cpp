// CPU implementations of the smoe_fast ops (schemas in torch_bindings.cpp).
//
// Layout of the work: rows (token, slot) are grouped by (slot, expert) with a stable counting sort;
// slot k forms phase k, so within a phase every token appears once and outputs / dz can be written
// or accumulated without races and in a fixed order. A phase's rows of one expert are split into
// chunks (work items); an item decodes its rows in blocks of `kLanes` tokens held
// token-innermost ([C][H][W][lanes]), so every multiply-add is a vector over the lanes. In the
// forward (float, AVX2 or AVX-512), the last rows of an expert (past its full blocks) share a block
// with up to three other experts' tails (SharedBlock: consecutive lanes per expert; the linear layers
// pick each lane's weights from the experts' interleaved ones, the convs' are expanded per lane), so
// that many experts with few tokens each do not leave most lanes empty.
// Items are scheduled dynamically (parallel_items), blocks write disjoint outputs, so results do not
// depend on the thread count.
// The up == 2 convolutions run phase-split (the nearest upsampling folded into four 2x2 kernels) as
// register-tiled micro-kernels (conv_up2_*), forward and backward, with the folded weights packed
// once per item. Weight gradients: an item accumulates per lane, then adds into the expert's gradient
// (its first item) or into its own partial slot; partial slots are added in item order at the end,
// so the result does not depend on the thread count or timing.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace smoe_fast {
namespace {

// ----------------------------------------------------------------------------------------------
// Grouping: stable counting sort.

// order[r] = the r-th index i in (key, i) order; offsets[k]..offsets[k+1] is key k's range.
template <typename key_t>
void stable_counting_sort(const key_t* keys, int64_t n, int64_t num_keys, int64_t* offsets, int64_t* order) {
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 32768));
  const int64_t chunk = (n + num_chunks - 1) / std::max<int64_t>(num_chunks, 1);
  std::vector<int64_t> cursor(num_chunks * num_keys, 0);  // [chunk][key] counts, then start positions
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hist = cursor.data() + c * num_keys;
      for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) {
        const int64_t key = static_cast<int64_t>(keys[i]);
        TORCH_CHECK(key >= 0 && key < num_keys, "expert index ", key, " at position ", i, " is out of range [0, ",
                    num_keys, ")");
        ++hist[key];
      }
    }
  });
  int64_t running = 0;
  for (int64_t key = 0; key < num_keys; ++key) {
    offsets[key] = running;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = cursor[c * num_keys + key];
      cursor[c * num_keys + key] = running;
      running += count;
    }
  }
  offsets[num_keys] = running;
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = cursor.data() + c * num_keys;
      for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) order[next[keys[i]]++] = i;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_by_expert_cpu(const at::Tensor& expert_idx_in,
                                                                               int64_t num_experts) {
  CHECK_INDEX(expert_idx_in);
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  const at::Tensor expert_idx = expert_idx_in.contiguous();
  const int64_t n = expert_idx.numel();
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "expert_idx has ", n, " entries; at most 2^31 - 2 fit int32 routing");
  std::vector<int64_t> offsets(num_experts + 1), order(n);
  AT_DISPATCH_INDEX_TYPES(expert_idx.scalar_type(), "cpp_group_by_expert", [&] {
    stable_counting_sort(expert_idx.data_ptr<index_t>(), n, num_experts, offsets.data(), order.data());
  });
  const auto int_options = expert_idx.options().dtype(at::kInt);
  at::Tensor counts = alloc_output({num_experts}, int_options);
  at::Tensor offsets_out = alloc_output({num_experts + 1}, int_options);
  at::Tensor sorted_token_idx = alloc_output({n}, int_options);
  at::Tensor token_sorted_pos = alloc_output({n}, int_options);
  int32_t* counts_ptr = counts.data_ptr<int32_t>();
  int32_t* offsets_ptr = offsets_out.data_ptr<int32_t>();
  for (int64_t e = 0; e <= num_experts; ++e) offsets_ptr[e] = static_cast<int32_t>(offsets[e]);
  for (int64_t e = 0; e < num_experts; ++e) counts_ptr[e] = static_cast<int32_t>(offsets[e + 1] - offsets[e]);
  int32_t* sorted_ptr = sorted_token_idx.data_ptr<int32_t>();
  int32_t* pos_ptr = token_sorted_pos.data_ptr<int32_t>();
  at::parallel_for(0, n, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      sorted_ptr[r] = static_cast<int32_t>(order[r]);
      pos_ptr[order[r]] = static_cast<int32_t>(r);
    }
  });
  return {counts, offsets_out, sorted_token_idx, token_sorted_pos};
}

// ----------------------------------------------------------------------------------------------
// Decoder layers on blocks of kLanes tokens. Activations are [C][H + 2 pad][W + 2 pad][lanes];
// a conv's input buffer has pad 1 (zero border) so its taps need no bounds checks. Vec is one
// hardware vector of lanes (GCC/Clang vector extensions; the extension is built for the machine it
// runs on, see smoe_fast/extension.py), and a tile's accumulators stay in registers: auto-vectorised
// plain loops and vectors wider than the hardware both spilled them to the stack (measured 2x slower).

#if defined(SMOE_FAST_VEC_BYTES)
constexpr int kVecBytes = SMOE_FAST_VEC_BYTES;
#elif defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;  // SSE2, NEON
#endif
typedef float VecFloat __attribute__((vector_size(kVecBytes)));
typedef double VecDouble __attribute__((vector_size(kVecBytes)));
typedef int32_t VecInt __attribute__((vector_size(kVecBytes)));
template <typename scalar_t> struct VecOf;
template <> struct VecOf<float> { using type = VecFloat; };
template <> struct VecOf<double> { using type = VecDouble; };
template <typename scalar_t> using Vec = typename VecOf<scalar_t>::type;

template <typename scalar_t>
constexpr int kLanes = kVecBytes / sizeof(scalar_t);

// Register tiles need their loops fully unrolled so that the accumulators stay in registers.
#define SMOE_FAST_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define SMOE_FAST_UNROLL SMOE_FAST_PRAGMA(unroll)
#else
#define SMOE_FAST_UNROLL SMOE_FAST_PRAGMA(GCC unroll 32)
#endif
constexpr int kOutBlock = 8;                     // output channels per register tile

// Vector registers the register tiles below are sized for: 32 with AVX-512 (zmm0-31) and on AArch64,
// 16 with AVX / AVX2 and SSE. Tiles sized for 32 spilled on AVX2: measured on a Zen 2 (AVX2) at
// E = 64, B = 65,536, the hard lite forward ran at 41% of that process's sgemm rate.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif
// Rows of a linear layer's register tile: accumulators plus the input vector and one broadcast weight.
constexpr int kLinearTileRows = kVecRegs >= 32 ? 24 : 12;

template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* p) {
  Vec<scalar_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar_t>
inline void store(scalar_t* p, const Vec<scalar_t>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename scalar_t>
inline Vec<scalar_t> broadcast(scalar_t x) {
  return x - Vec<scalar_t>{};  // x - 0 == x for every x (x + 0 is not, for -0), so this compiles to one broadcast
}

// One weight of a layer as a vector over the lanes. NE = 1: the block's one expert, p[0] in every lane.
// NE = kLanes (a shared block's conv layers): the weight already expanded to the lanes' own experts, p[t].
template <int NE, typename scalar_t>
inline Vec<scalar_t> bcast(const scalar_t* p) {
  static_assert(NE == 1 || NE == kLanes<scalar_t>, "weights are per block (NE = 1) or per lane (NE = kLanes)");
  if constexpr (NE == 1) {
    return broadcast(*p);
  } else {
    return load(p);
  }
}

// p[0 .. 4): one weight of a shared block's (up to) four experts; lane t takes p[slots[t]]: the four
// broadcast to every 128-bit lane, then permuted within lanes (vpermilps). Measured in a micro-benchmark
// on a Zen 4 (a 24 x 1 linear tile): at 0.6x the multiply-add rate of a plain broadcast with zmm, at the
// same rate with ymm (the cross-lane vpermps: 0.9x), so only the linear layers use it (their weights
// are read once per block); the convs expand their weights once per block (expand_lanes).
inline VecFloat gather_slots(const float* p, const VecInt& slots) {
#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
  return _mm512_permutevar_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(p)), reinterpret_cast<const __m512i&>(slots));
#elif defined(__AVX2__) && !defined(SMOE_FAST_VEC_BYTES)
  return _mm256_permutevar_ps(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)),
                              reinterpret_cast<const __m256i&>(slots));
#else
  VecFloat v;
  for (int t = 0; t < kLanes<float>; ++t) v[t] = p[slots[t]];
  return v;
#endif
}
inline VecDouble gather_slots(const double* p, const VecInt& slots) {  // compiled, never run: float64 never shares blocks
  VecDouble v;
  for (int t = 0; t < kLanes<double>; ++t) v[t] = p[slots[t]];
  return v;
}

// An empty asm that claims to change v: the load that produced it cannot be folded into its users.
// Generic vectors (SMOE_FAST_VEC_BYTES) may be wider than a hardware register: left alone.
template <typename V>
inline void keep_in_register(V& v) {
#if defined(SMOE_FAST_VEC_BYTES)
  (void)v;
#elif defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#else
  (void)v;
#endif
}

template <typename scalar_t>
inline scalar_t lane_sum(const Vec<scalar_t>& v) {
  scalar_t sum = 0;
  for (int t = 0; t < kLanes<scalar_t>; ++t) sum += v[t];
  return sum;
}

// exp of a vector of floats, branch-free (Cephes expf: range reduction by ln 2, degree-7 polynomial; about
// 1 ulp). Measured: libm's scalar expm1f/expf took ~40% of the lite decoder's time.
inline VecFloat exp_vec(VecFloat x) {
  x = x > 88.3f ? 88.3f : x;  // keeps 2^n finite; a NaN fails both tests and stays NaN
  x = x < -87.3f ? -87.3f : x;
  const VecFloat magic = broadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VecFloat n = (x * 1.44269504088896341f + magic) - magic;
  const VecFloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
  VecFloat p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VecInt bits = (__builtin_convertvector(n, VecInt) + 127) << 23;
  VecFloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp(x) - 1 without cancellation near 0: a Taylor polynomial for |x| < 1/4 (error < 5e-8 relative).
inline VecFloat expm1_vec(VecFloat x) {
  VecFloat taylor = broadcast(1.0f / 720.0f);
  taylor = taylor * x + 1.0f / 120.0f;
  taylor = taylor * x + 1.0f / 24.0f;
  taylor = taylor * x + 1.0f / 6.0f;
  taylor = taylor * x + 0.5f;
  taylor = (taylor * x + 1.0f) * x;
  const VecFloat via_exp = exp_vec(x) - 1.0f;
  return (x > -0.25f && x < 0.25f) ? taylor : via_exp;
}

#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
// AVX-512 forms of ELU and sigmoid (16 lanes): vscalefps applies 2^n without integer tricks, and the
// max/min operand order keeps NaN (the second operand is returned when either is NaN). ELU costs
// 17 instructions instead of 33 (expm1 and exp evaluated separately and blended): in the lite
// decoder it runs on as many vectors as 1/32 of conv1's multiply-adds.
inline __m512 expm1_avx512(__m512 x) {  // x <= 0 (or anything: only the ELU's negative side is used)
  x = _mm512_max_ps(_mm512_set1_ps(-100.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);  // |r| <= ln(2) / 2
  // expm1(r) = r + r^2 (1/2 + r/6 + ... + r^5/5040): Taylor to degree 7, relative error < 4e-8 here.
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  const __m512 em = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r);
  // expm1(x) = 2^n expm1(r) + (2^n - 1): exact in n = 0, no cancellation near 0.
  const __m512 scale = _mm512_scalef_ps(_mm512_set1_ps(1.0f), n);
  return _mm512_fmadd_ps(scale, em, _mm512_sub_ps(scale, _mm512_set1_ps(1.0f)));
}

inline __m512 sigmoid_avx512(__m512 x) {
  // u = -x clamped to [-87, 87] (exp(u) and its reciprocal stay normal floats; NaN passes through).
  __m512 u = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_sub_ps(_mm512_setzero_ps(), x));
  u = _mm512_min_ps(_mm512_set1_ps(87.0f), u);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(u, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), u);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);  // Cephes expf polynomial
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  // 1 / d: rcp14 and one Newton step (relative error ~2^-28).
  const __m512 e = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(e, _mm512_fnmadd_ps(d, e, _mm512_set1_ps(2.0f)));
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && !defined(SMOE_FAST_VEC_BYTES)
#define SMOE_FAST_AVX2 1
// AVX2 forms of the same (8 lanes; Zen 2 and other machines without AVX-512): 2^n by integer
// exponent arithmetic instead of vscalefps, so x is clamped where 2^n stays a normal float (ELU:
// x >= -87, where expm1 is -1 in float anyway; sigmoid: |x| <= 87), and 1 / d from rcpps and one
// Newton step (relative error ~2^-23). max / min keep NaN as in the AVX-512 forms. Measured on a
// Zen 2: the generic ELU (33 instructions) ran on as many vectors as 1/32 of conv1's multiply-adds,
// i.e. about as many instructions as conv1 itself.
inline __m256 pow2_avx2(__m256 n) {  // 2^n for integral n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

inline __m256 expm1_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  const __m256 em = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r);
  const __m256 scale = pow2_avx2(n);
  return _mm256_fmadd_ps(scale, em, _mm256_sub_ps(scale, _mm256_set1_ps(1.0f)));
}

inline __m256 sigmoid_avx2(__m256 x) {
  __m256 u = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_sub_ps(_mm256_setzero_ps(), x));
  u = _mm256_min_ps(_mm256_set1_ps(87.0f), u);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(u, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), u);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 d = _mm256_fmadd_ps(p, pow2_avx2(n), _mm256_set1_ps(1.0f));
  const __m256 e = _mm256_rcp_ps(d);
  return _mm256_mul_ps(e, _mm256_fnmadd_ps(d, e, _mm256_set1_ps(2.0f)));
}
#endif

inline void activate(VecFloat& v, Activation act) {
#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
  if (act == Activation::kElu) {
    const __m512 x = v;
    v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), expm1_avx512(x), x);
    return;
  }
  if (act == Activation::kSigmoid) {
    v = sigmoid_avx512(v);
    return;
  }
#elif defined(SMOE_FAST_AVX2)
  if (act == Activation::kElu) {
    const __m256 x = v;
    v = _mm256_blendv_ps(expm1_avx2(x), x, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ));
    return;
  }
  if (act == Activation::kSigmoid) {
    v = sigmoid_avx2(v);
    return;
  }
#endif
  switch (act) {
    case Activation::kRelu: v = v < 0.0f ? 0.0f : v; break;  // NaN stays NaN, like torch.relu
    case Activation::kElu: v = v > 0.0f ? v : expm1_vec(v); break;
    case Activation::kSigmoid: v = 1.0f / (1.0f + exp_vec(-v)); break;
    default: break;
  }
}

// float64 keeps libm's exp/expm1: the fp64 contract is 1e-12, beyond a short polynomial.
inline void activate(VecDouble& v, Activation act) {
  for (int t = 0; t < kLanes<double>; ++t) {
    const double x = v[t];
    switch (act) {
      case Activation::kRelu: v[t] = x < 0.0 ? 0.0 : x; break;
      case Activation::kElu: v[t] = x > 0.0 ? x : std::expm1(x); break;
      case Activation::kSigmoid: v[t] = 1.0 / (1.0 + std::exp(-x)); break;
      default: break;
    }
  }
}

// act over n vectors, the switch hoisted out of the loop.
template <typename scalar_t, int N>
inline void activate_tile(Vec<scalar_t>* v, Activation act) {
  switch (act) {
    case Activation::kNone: break;
    case Activation::kRelu: SMOE_FAST_UNROLL for (int i = 0; i < N; ++i) activate(v[i], Activation::kRelu); break;
    case Activation::kElu: SMOE_FAST_UNROLL for (int i = 0; i < N; ++i) activate(v[i], Activation::kElu); break;
    case Activation::kSigmoid: SMOE_FAST_UNROLL for (int i = 0; i < N; ++i) activate(v[i], Activation::kSigmoid); break;
  }
}

// d(activation)/d(input), written in terms of the activation's output a. A NaN a passes the gradient
// through (derivative 1), as torch's threshold_backward and elu_backward do (kernels/activations.py).
template <typename scalar_t>
inline Vec<scalar_t> activation_grad(const Vec<scalar_t>& a, Activation act) {
  const Vec<scalar_t> one = broadcast(scalar_t(1)), zero = broadcast(scalar_t(0));
  switch (act) {
    case Activation::kRelu: return a <= zero ? zero : one;
    case Activation::kElu: return a <= zero ? a + one : one;
    case Activation::kSigmoid: return a * (one - a);
    default: return one;
  }
}

inline int64_t buffer_size(int c, int h, int w, int pad, int lanes) {
  return static_cast<int64_t>(c) * (h + 2 * pad) * (w + 2 * pad) * lanes;
}

// Offsets (in pixels) of flat outputs o, o + 1, ... of a layer with output shape [c][h][w] in a buffer
// with `pad`, walked with the divisions done once, not per output (perf annotate of the hard lite
// forward at E = 8,192: the fc's output loop, three idiv per output, took ~5% of the shared blocks' time).
struct PixelWalk {
  int c, y, x, out_h, out_w, pad;
  PixelWalk(const Layer& layer, int o, int pad_)
      : c(o / (layer.out_h * layer.out_w)), y((o % (layer.out_h * layer.out_w)) / layer.out_w), x(o % layer.out_w),
        out_h(layer.out_h), out_w(layer.out_w), pad(pad_) {}
  int64_t offset() const { return (static_cast<int64_t>(c) * (out_h + 2 * pad) + y + pad) * (out_w + 2 * pad) + x + pad; }
  void next() {
    if (++x < out_w) return;
    x = 0;
    if (++y < out_h) return;
    y = 0;
    ++c;
  }
};

// out[o] = act(bias[o] + sum_k W[o,k] in[k]) for outputs o0 .. o0 + OB; w_tile: rows o0 .. o0 + OB of W
// (NE > 1: weights and biases of a shared block's NE experts interleaved, lane t reading slot slots[t]).
template <typename scalar_t, int OB, int NE, int KC>
inline void linear_fwd_tile(const Layer& layer, const scalar_t* in, const scalar_t* w_tile, const scalar_t* bias,
                            const VecInt* slots, int o0, scalar_t* out, int out_pad) {
  constexpr int T = kLanes<scalar_t>;
  const int K = KC > 0 ? KC : layer.in_c;
  auto weight = [&](const scalar_t* p) {
    if constexpr (NE == 1) {
      return broadcast(*p);
    } else {
      return gather_slots(p, *slots);
    }
  };
  Vec<scalar_t> acc[OB];
  SMOE_FAST_UNROLL
  for (int ob = 0; ob < OB; ++ob) acc[ob] = weight(bias + (o0 + ob) * NE);
  for (int k = 0; k < K; ++k) {
    const Vec<scalar_t> src = load(in + k * T);
    SMOE_FAST_UNROLL
    for (int ob = 0; ob < OB; ++ob) acc[ob] += weight(w_tile + (static_cast<int64_t>(ob) * K + k) * NE) * src;
  }
  PixelWalk at(layer, o0, out_pad);
  for (int ob = 0; ob < OB; ++ob, at.next()) {
    activate(acc[ob], layer.act);
    store(out + at.offset() * T, acc[ob]);
  }
}

// Not inlined (nor conv_up2_fwd): inlined into the shared-block item loop (AVX2), GCC kept the
// tile's accumulators on the stack.
// KC: the input size as a constant (0: layer.in_c at run time). With K known, a tile's OB weight rows
// sit at immediate offsets from one pointer; with K at run time they took OB pointers and the
// accumulators went through the stack. With NE > 1 the weights are the NE experts' own [N][K] rows
// (experts[e]), interleaved one tile at a time into tile_buf (OB * K * NE scalars, stays in L1): the
// whole-layer interleave before the layer wrote and re-read 200 KB per block (lite fc, NE = 4).
template <typename scalar_t, int NE, int KC>
__attribute__((noinline)) void linear_fwd_k(const Layer& layer, const scalar_t* in, const scalar_t* const* experts, const scalar_t* bias,
                  const VecInt* slots, scalar_t* out, int out_pad, scalar_t* tile_buf) {
  const int N = layer.out_size(), K = KC > 0 ? KC : layer.in_c;
  auto tile = [&](auto tile_rows, int o) {
    constexpr int OB = decltype(tile_rows)::value;
    const scalar_t* w_tile = experts[0] + static_cast<int64_t>(o) * K;
    if constexpr (NE > 1) {
      const int64_t n = static_cast<int64_t>(OB) * K, first = static_cast<int64_t>(o) * K;
      for (int64_t j = 0; j < n; ++j)
        SMOE_FAST_UNROLL
        for (int e = 0; e < NE; ++e) tile_buf[j * NE + e] = experts[e][first + j];
      w_tile = tile_buf;
    }
    linear_fwd_tile<scalar_t, OB, NE, KC>(layer, in, w_tile, bias, slots, o, out, out_pad);
  };
  int o = 0;
  // kLinearTileRows accumulators: each weight is used once per block, so the tile only needs to hide
  // FMA latency.
  for (; o + kLinearTileRows <= N; o += kLinearTileRows) tile(std::integral_constant<int, kLinearTileRows>{}, o);
  for (; o + kOutBlock <= N; o += kOutBlock) tile(std::integral_constant<int, kOutBlock>{}, o);
  for (; o < N; ++o) tile(std::integral_constant<int, 1>{}, o);
}

// experts: NE pointers to the experts' [N][K] weights; when NE > 1, slots: each lane's expert (0 .. NE) and
// tile_buf: kLinearTileRows * K * NE scalars.
template <typename scalar_t, int NE = 1>
void linear_fwd(const Layer& layer, const scalar_t* in, const scalar_t* const* experts, const scalar_t* bias, scalar_t* out,
                int out_pad, const VecInt* slots = nullptr, scalar_t* tile_buf = nullptr) {
  if (layer.in_c == 32) return linear_fwd_k<scalar_t, NE, 32>(layer, in, experts, bias, slots, out, out_pad, tile_buf);  // L = 32
  linear_fwd_k<scalar_t, NE, 0>(layer, in, experts, bias, slots, out, out_pad, tile_buf);
}

// grad_in = W^T grad_out; per-lane weight and bias gradients accumulate (summed over lanes later).
// Whether linear_bwd accumulates the weight gradient as a plain [N][K] matrix (summed over the lanes
// as it goes) instead of per-lane vectors reduced at the end of the item: whole tiles of
// kDenseGradRows rows x kDenseGradVecs vectors of K (every decoder layer at L = 32 or 64).
constexpr int kDenseGradRows = 4, kDenseGradVecs = 2;  // 8 accumulators; per lane 4 broadcasts + 2 loads
template <typename scalar_t>
inline bool linear_grad_is_dense(const Layer& layer) {
  return !layer.is_conv && layer.out_size() % kDenseGradRows == 0 && layer.in_c % (kDenseGradVecs * kLanes<scalar_t>) == 0;
}

// grad_in[k] = sum_o W[o][k] grad_out[o] (lanes: tokens), 8 rows k of grad_in held in registers over
// all o; grad_bias_lanes[o] += grad_out[o]; and the weight gradient:
// offsets: scratch for N offsets (grad_out's padded layout, in lanes).
// - linear_grad_is_dense: grad_weight[o][k] += sum_t grad_out[o][t] in[k][t], a small GEMM over the
//   block's lanes (in_t: scratch for in transposed to [t][k]), one tile of 4 rows x 2 vectors at a time. The
//   per-lane accumulators read and wrote N x K vectors per block (800 KB for the lite fc, 13 MB for
//   mlp's fc2): measured 10.6% of a one-thread soft step (lite, B = 1,024, E = 64).
// - else grad_weight_lanes[o][k] += grad_out[o] in[k], reduced over the lanes by the caller.
template <typename scalar_t>
__attribute__((noinline)) void linear_bwd(const Layer& layer, const scalar_t* in, const scalar_t* weight, const scalar_t* grad_out, int out_pad,
                scalar_t* grad_in, scalar_t* in_t, int64_t* offsets, scalar_t* grad_weight, Vec<scalar_t>* grad_weight_lanes,
                Vec<scalar_t>* grad_bias_lanes) {
  constexpr int T = kLanes<scalar_t>;
  constexpr int KB = 8;
  const int K = layer.in_c, N = layer.out_size();
  PixelWalk at(layer, 0, out_pad);
  for (int o = 0; o < N; ++o, at.next()) {
    offsets[o] = at.offset() * T;
    grad_bias_lanes[o] += load(grad_out + offsets[o]);
  }
  int k0 = 0;
  for (; k0 + KB <= K; k0 += KB) {
    Vec<scalar_t> acc[KB] = {};
    for (int o = 0; o < N; ++o) {
      const Vec<scalar_t> g = load(grad_out + offsets[o]);
      const scalar_t* w = weight + static_cast<int64_t>(o) * K + k0;
      SMOE_FAST_UNROLL
      for (int j = 0; j < KB; ++j) acc[j] += w[j] * g;
    }
    SMOE_FAST_UNROLL
    for (int j = 0; j < KB; ++j) store(grad_in + (k0 + j) * T, acc[j]);
  }
  for (; k0 < K; ++k0) {
    Vec<scalar_t> acc{};
    for (int o = 0; o < N; ++o) acc += weight[static_cast<int64_t>(o) * K + k0] * load(grad_out + offsets[o]);
    store(grad_in + k0 * T, acc);
  }
  if (!linear_grad_is_dense<scalar_t>(layer)) {
    for (int o = 0; o < N; ++o) {
      const Vec<scalar_t> g = load(grad_out + offsets[o]);
      Vec<scalar_t>* gw_row = grad_weight_lanes + static_cast<int64_t>(o) * K;
      for (int k = 0; k < K; ++k) gw_row[k] += g * load(in + k * T);
    }
    return;
  }
  for (int k = 0; k < K; ++k)
    for (int t = 0; t < T; ++t) in_t[t * K + k] = in[k * T + t];
  constexpr int RB = kDenseGradRows, KC = kDenseGradVecs;
  for (int kv = 0; kv < K / T; kv += KC)
    for (int o = 0; o < N; o += RB) {
      Vec<scalar_t> acc[RB][KC];
      SMOE_FAST_UNROLL
      for (int r = 0; r < RB; ++r)
        SMOE_FAST_UNROLL
        for (int c = 0; c < KC; ++c) acc[r][c] = load(grad_weight + static_cast<int64_t>(o + r) * K + (kv + c) * T);
      for (int t = 0; t < T; ++t) {
        Vec<scalar_t> x[KC];
        SMOE_FAST_UNROLL
        for (int c = 0; c < KC; ++c) x[c] = load(in_t + t * K + (kv + c) * T);
        SMOE_FAST_UNROLL
        for (int r = 0; r < RB; ++r) {
          const Vec<scalar_t> g = broadcast(grad_out[offsets[o + r] + t]);
          SMOE_FAST_UNROLL
          for (int c = 0; c < KC; ++c) acc[r][c] += g * x[c];
        }
      }
      SMOE_FAST_UNROLL
      for (int r = 0; r < RB; ++r)
        SMOE_FAST_UNROLL
        for (int c = 0; c < KC; ++c) store(grad_weight + static_cast<int64_t>(o + r) * K + (kv + c) * T, acc[r][c]);
    }
}

// A 3x3, padding-1 conv of the input upsampled by `up`, computed per output phase (a, c): for up == 2
// the output pixel (2p + a, 2q + c) only sees low-res rows p + a - 1 + r and columns q + c - 1 + s,
// r, s in {0, 1}, so the 3x3 kernel folds into four 2x2 kernels (2.25x fewer multiply-adds than
// convolving the upsampled image). For up == 1 there is one phase with the 3x3 kernel itself.
inline int folded_tap(int phase, int k) {  // 3x3 tap k -> folded tap of output phase 0 or 1
  return phase == 0 ? (k == 0 ? 0 : 1) : (k == 2 ? 1 : 0);
}

inline int64_t folded_size(const Layer& layer) {
  return static_cast<int64_t>(layer.out_c) * layer.in_c * (layer.up == 2 ? 16 : 9);
}

// folded[ph][co][ci][r][s] from weight[co][ci][3][3].
template <typename scalar_t>
void fold_conv_weight(const Layer& layer, const scalar_t* weight, scalar_t* folded) {
  const int64_t n = static_cast<int64_t>(layer.out_c) * layer.in_c;
  if (layer.up == 1) {
    std::copy(weight, weight + n * 9, folded);
    return;
  }
  std::fill(folded, folded + 4 * n * 4, scalar_t(0));
  for (int ph = 0; ph < 4; ++ph)
    for (int64_t j = 0; j < n; ++j)
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw)
          folded[(ph * n + j) * 4 + folded_tap(ph / 2, kh) * 2 + folded_tap(ph % 2, kw)] += weight[j * 9 + kh * 3 + kw];
}

// grad_weight[co][ci][3][3] += the gradient of the folded kernels mapped back (the transpose of the fold).
template <typename scalar_t>
void unfold_conv_grad(const Layer& layer, const scalar_t* grad_folded, scalar_t* grad_weight) {
  const int64_t n = static_cast<int64_t>(layer.out_c) * layer.in_c;
  if (layer.up == 1) {
    for (int64_t j = 0; j < n * 9; ++j) grad_weight[j] += grad_folded[j];
    return;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int kh = 0; kh < 3; ++kh)
      for (int kw = 0; kw < 3; ++kw) {
        scalar_t sum = 0;
        for (int ph = 0; ph < 4; ++ph) sum += grad_folded[(ph * n + j) * 4 + folded_tap(ph / 2, kh) * 2 + folded_tap(ph % 2, kw)];
        grad_weight[j * 9 + kh * 3 + kw] += sum;
      }
}

// folded_vec: the folded weights, each broadcast to a Vec (saves a shuffle per multiply-add).
template <typename scalar_t, int R, int OB>
inline void conv_fwd_tile(const Layer& layer, const scalar_t* in, const Vec<scalar_t>* folded_vec, const scalar_t* bias,
                          int phase, int co0, scalar_t* out, int out_pad) {
  constexpr int T = kLanes<scalar_t>;
  const int Cin = layer.in_c, H = layer.in_h, W = layer.in_w, up = layer.up;
  const int a = up == 2 ? phase / 2 : 0, c = up == 2 ? phase % 2 : 0;
  const int in_w = W + 2, out_h = layer.out_h + 2 * out_pad, out_w = layer.out_w + 2 * out_pad;
  const Vec<scalar_t>* w_tile = folded_vec + (static_cast<int64_t>(phase) * layer.out_c + co0) * Cin * R * R;
  for (int p = 0; p < H; ++p) {
    for (int q = 0; q < W; ++q) {
      Vec<scalar_t> acc[OB];
      for (int ob = 0; ob < OB; ++ob) acc[ob] = broadcast(bias[co0 + ob]);
      for (int ci = 0; ci < Cin; ++ci) {
        // Folded tap (r, s) reads low-res (p + a + r - 1, q + c + s - 1), i.e. (p + a + r, q + c + s) with the border.
        const scalar_t* src_c = in + ((static_cast<int64_t>(ci) * (H + 2) + p + a) * in_w + q + c) * T;
        const Vec<scalar_t>* w_c = w_tile + ci * R * R;
        for (int r = 0; r < R; ++r)
          for (int s = 0; s < R; ++s) {
            const Vec<scalar_t> src = load(src_c + (r * in_w + s) * T);
            for (int ob = 0; ob < OB; ++ob) acc[ob] += w_c[static_cast<int64_t>(ob) * Cin * R * R + r * R + s] * src;
          }
      }
      const int oy = p * up + a + out_pad, ox = q * up + c + out_pad;
      for (int ob = 0; ob < OB; ++ob) {
        activate(acc[ob], layer.act);
        store(out + ((static_cast<int64_t>(co0 + ob) * out_h + oy) * out_w + ox) * T, acc[ob]);
      }
    }
  }
}

template <typename scalar_t, int R>
void conv_fwd_taps(const Layer& layer, const scalar_t* in, const Vec<scalar_t>* folded, const scalar_t* bias, scalar_t* out,
                   int out_pad) {
  for (int phase = 0; phase < layer.up * layer.up; ++phase) {
    int co = 0;
    for (; co + kOutBlock <= layer.out_c; co += kOutBlock)
      conv_fwd_tile<scalar_t, R, kOutBlock>(layer, in, folded, bias, phase, co, out, out_pad);
    for (; co < layer.out_c; ++co) conv_fwd_tile<scalar_t, R, 1>(layer, in, folded, bias, phase, co, out, out_pad);
  }
}

// Forward micro-kernels of the up == 2 convs. The input is [Cin][W + 2][W + 2][lanes] (square, pad 1,
// W a template constant so that every tap is an immediate displacement); a folded 2x2 tap (r, s) of
// output phase (a, c) at low-res pixel (p, q) reads padded (p + a + r, q + c + s). Both kernels keep
// the accumulators in registers and load at most one input vector or weight per 2 multiply-adds
// (the sgemm micro-kernel's 4x6 tile loads 10 per 24); the previous one-channel tile loaded 17 per
// 24 and ran at 55% of a 4x6 sgemm micro-kernel measured next to it.

// One phase, OB output channels x NP low-res pixels (any pixels: in_off[j] is pixel j's padded top-left
// tap, out_off[j] its phase-(0, 0) output, in lanes). packed_cog: [ci][r][s][OB] of this phase and
// channel group (pack_conv_up2).
template <typename scalar_t, int OB, int NP, int W, int NE>
inline void conv_up2_phase_tile(int Cin, const scalar_t* in, const scalar_t* packed_cog, const scalar_t* bias,
                                const int32_t* in_off, const int32_t* out_off, int64_t out_channel, Activation act,
                                scalar_t* out) {
  constexpr int T = kLanes<scalar_t>;
  constexpr int in_w = W + 2;
  constexpr int64_t in_channel = static_cast<int64_t>(in_w) * in_w * T;
  Vec<scalar_t> acc[OB][NP];
  SMOE_FAST_UNROLL
  for (int ob = 0; ob < OB; ++ob)
    SMOE_FAST_UNROLL
    for (int j = 0; j < NP; ++j) acc[ob][j] = bcast<NE>(bias + ob * NE);
  const scalar_t* src[NP];
  SMOE_FAST_UNROLL
  for (int j = 0; j < NP; ++j) src[j] = in + static_cast<int64_t>(in_off[j]) * T;
  for (int ci = 0; ci < Cin; ++ci) {
    const scalar_t* w_c = packed_cog + ci * 4 * OB * NE;
    SMOE_FAST_UNROLL
    for (int tap = 0; tap < 4; ++tap) {
      Vec<scalar_t> w[OB];
      SMOE_FAST_UNROLL
      for (int ob = 0; ob < OB; ++ob) {
        w[ob] = bcast<NE>(w_c + (tap * OB + ob) * NE);
        if constexpr (NE > 1) keep_in_register(w[ob]);  // else folded into each of its NP multiply-adds
      }
      SMOE_FAST_UNROLL
      for (int j = 0; j < NP; ++j) {
        Vec<scalar_t> x = load(src[j] + ci * in_channel + ((tap / 2) * in_w + tap % 2) * T);
        if constexpr (kVecRegs >= 32) keep_in_register(x);
        SMOE_FAST_UNROLL
        for (int ob = 0; ob < OB; ++ob) acc[ob][j] += w[ob] * x;
      }
    }
  }
  activate_tile<scalar_t, OB * NP>(&acc[0][0], act);
  SMOE_FAST_UNROLL
  for (int ob = 0; ob < OB; ++ob)
    SMOE_FAST_UNROLL
    for (int j = 0; j < NP; ++j) store(out + ob * out_channel + static_cast<int64_t>(out_off[j]) * T, acc[ob][j]);
}

// All four phases of one output channel for NP consecutive low-res pixels of a row (for out_c not a
// multiple of kPhaseTileChannels, e.g. the lite decoder's last conv): each input vector feeds every
// phase and pixel that reads it. src: the row's (padded) top-left tap; packed_co: [ci][phase][r][s].
template <typename scalar_t, int NP, int W, int NE>
inline void conv_up2_row_tile(int Cin, const scalar_t* src, const scalar_t* packed_co, const scalar_t* bias, int out_w,
                              Activation act, scalar_t* out) {
  constexpr int T = kLanes<scalar_t>;
  constexpr int in_w = W + 2;
  constexpr int64_t in_channel = static_cast<int64_t>(in_w) * in_w * T;
  Vec<scalar_t> acc[4][NP];
  SMOE_FAST_UNROLL
  for (int ph = 0; ph < 4; ++ph)
    SMOE_FAST_UNROLL
    for (int j = 0; j < NP; ++j) acc[ph][j] = bcast<NE>(bias);
  for (int ci = 0; ci < Cin; ++ci) {
    const scalar_t* w_c = packed_co + ci * 16 * NE;
    const scalar_t* src_c = src + ci * in_channel;
    SMOE_FAST_UNROLL
    for (int a = 0; a < 2; ++a)
      SMOE_FAST_UNROLL
      for (int r = 0; r < 2; ++r) {
        Vec<scalar_t> w[2][2];  // [c][s]
        SMOE_FAST_UNROLL
        for (int c = 0; c < 2; ++c)
          SMOE_FAST_UNROLL
          for (int s = 0; s < 2; ++s) {
            w[c][s] = bcast<NE>(w_c + ((a * 2 + c) * 4 + r * 2 + s) * NE);
            if constexpr (NE > 1) keep_in_register(w[c][s]);
          }
        SMOE_FAST_UNROLL
        for (int u = 0; u < NP + 2; ++u) {
          Vec<scalar_t> x = load(src_c + ((a + r) * in_w + u) * T);
          if constexpr (kVecRegs >= 32) keep_in_register(x);
          SMOE_FAST_UNROLL
          for (int c = 0; c < 2; ++c)
            SMOE_FAST_UNROLL
            for (int s = 0; s < 2; ++s) {
              const int j = u - c - s;
              if (j >= 0 && j < NP) acc[a * 2 + c][j] += w[c][s] * x;
            }
        }
      }
  }
  activate_tile<scalar_t, 4 * NP>(&acc[0][0], act);
  SMOE_FAST_UNROLL
  for (int ph = 0; ph < 4; ++ph)
    SMOE_FAST_UNROLL
    for (int j = 0; j < NP; ++j) store(out + (static_cast<int64_t>(ph / 2) * out_w + 2 * j + ph % 2) * T, acc[ph][j]);
}

constexpr int kPhaseTileChannels = 4;  // OB of conv_up2_phase_tile
// NP: 24 accumulators + 4 weights + 1 input of 32 vector registers; of 16, 12 + 4 (the input vector an
// FMA's memory operand). With 32 the tiles hold the input in a register (keep_in_register): GCC 12
// folded its load into each of the OB multiply-adds instead, spilled accumulators, and the hard lite
// forward ran 1.15-1.2x slower (E = 8 and E = 8,192, B = 65,536, AVX-512 on a Zen 4; shared blocks
// then also take 6 pixels, not 5).
constexpr int kPhaseTilePixels = kVecRegs >= 32 ? 6 : 3;

// Packed weights of an up == 2 conv, folded straight from weight[co][ci][3][3] (no folded[] pass):
// out_c % 4 == 0: [phase][co / 4][ci][r][s][co % 4] (phase tiles); else [co][ci][phase][r][s] (row tiles).
// Folded tap (r, s) of phase (a, c) sums the 3x3 taps kh in rows(a, r), kw in rows(c, s), with
// rows(0, 0) = {0}, rows(0, 1) = {1, 2}, rows(1, 0) = {0, 1}, rows(1, 1) = {2}. Measured at E = 8,192,
// B = 65,536: the generic fold + pack (index arithmetic per tap) took 8% of the hard lite forward.
// stride > 1 packs one expert of a shared block straight into its interleaved place (packed[j * NE]).
template <typename scalar_t>
void pack_conv_up2(const Layer& layer, const scalar_t* weight, scalar_t* packed, int stride = 1) {
  const int Cout = layer.out_c, Cin = layer.in_c;
  constexpr int OB = kPhaseTileChannels;
  const bool phase_tiles = Cout % OB == 0;
  for (int co = 0; co < Cout; ++co)
    for (int ci = 0; ci < Cin; ++ci) {
      const scalar_t* w = weight + (static_cast<int64_t>(co) * Cin + ci) * 9;
      // row[a][r][kw]: the 3x3 rows of folded row tap r of phase a, summed.
      scalar_t row[2][2][3];
      for (int kw = 0; kw < 3; ++kw) {
        row[0][0][kw] = w[kw];
        row[0][1][kw] = w[3 + kw] + w[6 + kw];
        row[1][0][kw] = w[kw] + w[3 + kw];
        row[1][1][kw] = w[6 + kw];
      }
      for (int a = 0; a < 2; ++a)
        for (int c = 0; c < 2; ++c)
          for (int r = 0; r < 2; ++r) {
            const scalar_t* x = row[a][r];
            const scalar_t folded[2] = {c == 0 ? x[0] : x[0] + x[1], c == 0 ? x[1] + x[2] : x[2]};
            for (int s_tap = 0; s_tap < 2; ++s_tap) {
              const int ph = a * 2 + c, t = r * 2 + s_tap;
              const int64_t j = phase_tiles
                  ? (((static_cast<int64_t>(ph) * (Cout / OB) + co / OB) * Cin + ci) * 4 + t) * OB + co % OB
                  : (static_cast<int64_t>(co) * Cin + ci) * 16 + ph * 4 + t;
              packed[j * stride] = folded[s_tap];
            }
          }
    }
}

// Software prefetch (into L2) of memory the next work item will read, a few cache lines per register
// tile of the current item's convolutions, so that those reads overlap compute. Used for the weights
// of the next shared block's experts: at E = 8,192 they come from DRAM (fc alone is 50 KB per expert,
// 411 MB per call) and the weight copy of each shared block waited on them. Locality hint 1
// (prefetcht2): with hint 2 the convs ran 10-20% slower (perf samples, E = 8,192, Zen 4), without any
// prefetch the fc's weight copy took 2.5x as long.
struct Prefetcher {
  static constexpr int kMaxRanges = 8;
  static constexpr int kLinesPerTile = 24;  // ~3,500 lines over the ~190 conv tiles of a lite block
  const char* next[kMaxRanges];
  const char* end[kMaxRanges];
  int count = 0, current = 0;

  void clear() { count = current = 0; }
  void add(const void* p, int64_t bytes) {
    if (count == kMaxRanges) return;
    next[count] = static_cast<const char*>(p);
    end[count] = next[count] + bytes;
    ++count;
  }
  void step() {
    for (int lines = 0; lines < kLinesPerTile && current < count;) {
      if (next[current] >= end[current]) {
        ++current;
        continue;
      }
      __builtin_prefetch(next[current], 0, 1);
      next[current] += 64;
      ++lines;
    }
  }
};

template <typename scalar_t, int NP, int W, int NE>
inline void conv_up2_row_tiles_from(const Layer& layer, const scalar_t* in, const scalar_t* packed, const scalar_t* bias,
                                    scalar_t* out, int out_pad, int q0, Prefetcher* prefetch) {
  constexpr int T = kLanes<scalar_t>;
  const int out_w = layer.out_w + 2 * out_pad;
  const int64_t out_channel = static_cast<int64_t>(layer.out_h + 2 * out_pad) * out_w * T;
  for (int co = 0; co < layer.out_c; ++co)
    for (int p = 0; p < W; ++p) {
      conv_up2_row_tile<scalar_t, NP, W, NE>(layer.in_c, in + (static_cast<int64_t>(p) * (W + 2) + q0) * T,
                                             packed + static_cast<int64_t>(co) * layer.in_c * 16 * NE, bias + co * NE, out_w, layer.act,
                                         out + co * out_channel + ((2 * p + out_pad) * static_cast<int64_t>(out_w) + 2 * q0 + out_pad) * T);
      if (prefetch) prefetch->step();
    }
}

template <typename scalar_t, int W, int NE>
__attribute__((noinline)) void conv_up2_fwd(const Layer& layer, const scalar_t* in, const scalar_t* packed, const scalar_t* bias, scalar_t* out,
                  int out_pad, Prefetcher* prefetch) {
  constexpr int T = kLanes<scalar_t>;
  const int out_w = layer.out_w + 2 * out_pad;
  const int64_t out_channel = static_cast<int64_t>(layer.out_h + 2 * out_pad) * out_w * T;
  if (layer.out_c % kPhaseTileChannels != 0) {
    // Row tiles (4 x NP accumulators): W = 7 as 4 + 3 pixels, W = 14 as 5 + 5 + 4; with 16 vector
    // registers 3 + 2 + 2 and 3 + 3 + 3 + 3 + 2.
    if (kVecRegs < 32 && W == 7) {
      conv_up2_row_tiles_from<scalar_t, 3, W, NE>(layer, in, packed, bias, out, out_pad, 0, prefetch);
      conv_up2_row_tiles_from<scalar_t, 2, W, NE>(layer, in, packed, bias, out, out_pad, 3, prefetch);
      conv_up2_row_tiles_from<scalar_t, 2, W, NE>(layer, in, packed, bias, out, out_pad, 5, prefetch);
    } else if (kVecRegs < 32) {
      for (int q0 = 0; q0 < 12; q0 += 3)
        conv_up2_row_tiles_from<scalar_t, 3, W, NE>(layer, in, packed, bias, out, out_pad, q0, prefetch);
      conv_up2_row_tiles_from<scalar_t, 2, W, NE>(layer, in, packed, bias, out, out_pad, 12, prefetch);
    } else if (W == 7) {
      conv_up2_row_tiles_from<scalar_t, 4, W, NE>(layer, in, packed, bias, out, out_pad, 0, prefetch);
      conv_up2_row_tiles_from<scalar_t, 3, W, NE>(layer, in, packed, bias, out, out_pad, 4, prefetch);
    } else {
      conv_up2_row_tiles_from<scalar_t, 5, W, NE>(layer, in, packed, bias, out, out_pad, 0, prefetch);
      conv_up2_row_tiles_from<scalar_t, 5, W, NE>(layer, in, packed, bias, out, out_pad, 5, prefetch);
      conv_up2_row_tiles_from<scalar_t, 4, W, NE>(layer, in, packed, bias, out, out_pad, 10, prefetch);
    }
    return;
  }
  constexpr int OB = kPhaseTileChannels, NP = kPhaseTilePixels;
  constexpr int pixels = W * W, full = pixels / NP * NP, rest = pixels - full;
  int32_t in_off[pixels], out_off[pixels];
  for (int m = 0; m < pixels; ++m) {
    const int p = m / W, q = m % W;
    in_off[m] = p * (W + 2) + q;
    out_off[m] = (2 * p + out_pad) * out_w + 2 * q + out_pad;
  }
  const int Cin = layer.in_c, groups = layer.out_c / OB;
  for (int ph = 0; ph < 4; ++ph) {
    const int a = ph / 2, c = ph % 2;
    const scalar_t* in_ph = in + (a * (W + 2) + c) * T;
    scalar_t* out_ph = out + (a * out_w + c) * T;
    for (int g = 0; g < groups; ++g) {
      const scalar_t* w = packed + (static_cast<int64_t>(ph) * groups + g) * Cin * 4 * OB * NE;
      scalar_t* out_g = out_ph + g * OB * out_channel;
      for (int m = 0; m < full; m += NP) {
        conv_up2_phase_tile<scalar_t, OB, NP, W, NE>(Cin, in_ph, w, bias + g * OB * NE, in_off + m, out_off + m,
                                                     out_channel, layer.act, out_g);
        if (prefetch) prefetch->step();
      }
      if (rest > 0)
        conv_up2_phase_tile<scalar_t, OB, rest == 0 ? 1 : rest, W, NE>(Cin, in_ph, w, bias + g * OB * NE, in_off + full,
                                                                       out_off + full, out_channel, layer.act, out_g);
    }
  }
}

// Whether conv_up2_fwd has an instance for this layer (the decoders' up == 2 layers all do).
inline bool has_up2_kernel(const Layer& layer) {
  return layer.is_conv && layer.up == 2 && layer.in_h == layer.in_w && (layer.in_w == 7 || layer.in_w == 14);
}

// NE > 1 (several experts' tokens in one block) only for layers with an up == 2 kernel.
template <typename scalar_t, int NE = 1>
void conv_fwd(const Layer& layer, const scalar_t* in, const scalar_t* packed, const Vec<scalar_t>* folded_vec,
              const scalar_t* bias, scalar_t* out, int out_pad, Prefetcher* prefetch = nullptr) {
  if (has_up2_kernel(layer) && layer.in_w == 7) {
    conv_up2_fwd<scalar_t, 7, NE>(layer, in, packed, bias, out, out_pad, prefetch);
  } else if (has_up2_kernel(layer)) {
    conv_up2_fwd<scalar_t, 14, NE>(layer, in, packed, bias, out, out_pad, prefetch);
  } else if (NE > 1) {
    TORCH_CHECK(false, "internal: shared-expert blocks need an up == 2 conv kernel");
  } else if (layer.up == 2) {
    conv_fwd_taps<scalar_t, 2>(layer, in, folded_vec, bias, out, out_pad);
  } else {
    conv_fwd_taps<scalar_t, 3>(layer, in, folded_vec, bias, out, out_pad);
  }
}

// Backward of the up == 2 convs, as register tiles like the forward. The output gradient is first
// regrouped per phase into low-res maps with a zero border, gph [phase][Cout][W + 2][W + 2][lanes];
// then grad_in is a plain gather (a conv of gph over (co, phase, r, s)) and each folded weight's
// gradient a sum over pixels of gph times the input it multiplied. Measured: the scatter form
// (per-pixel read-modify-write of grad_in and of per-lane weight-gradient accumulators in memory) ran
// the lite decoder's backward at a fifth of the forward's multiply-add rate.

// W^T packed for the grad_in tiles: [ci / 4][co][phase][r][s][ci % 4] from folded[phase][co][ci][r][s].
template <typename scalar_t>
void pack_conv_up2_transposed(const Layer& layer, const scalar_t* folded, scalar_t* packed) {
  const int Cout = layer.out_c, Cin = layer.in_c;
  const int64_t n = static_cast<int64_t>(Cout) * Cin;
  constexpr int OB = kPhaseTileChannels;
  for (int ph = 0; ph < 4; ++ph)
    for (int co = 0; co < Cout; ++co)
      for (int ci = 0; ci < Cin; ++ci)
        for (int t = 0; t < 4; ++t)
          packed[(((static_cast<int64_t>(ci / OB) * Cout + co) * 4 + ph) * 4 + t) * OB + ci % OB] =
              folded[(ph * n + static_cast<int64_t>(co) * Cin + ci) * 4 + t];
}

// grad_in[ci0 .. ci0 + OB) at NP interior pixels (in_off[j]: pixel j's padded position in grad_in, also
// its padded position in each gph map): sum over co and the 16 (phase, r, s) of W x gph[phase][co] at
// (y - a - r + 1, x - c - s + 1).
template <typename scalar_t, int OB, int NP, int W>
inline void conv_up2_grad_in_tile(int Cout, const scalar_t* gph, const scalar_t* packed_cib, const int32_t* in_off,
                                  scalar_t* grad_in_cib) {
  constexpr int T = kLanes<scalar_t>;
  constexpr int in_w = W + 2;
  constexpr int64_t map = static_cast<int64_t>(in_w) * in_w * T;
  Vec<scalar_t> acc[OB][NP];
  SMOE_FAST_UNROLL
  for (int ob = 0; ob < OB; ++ob)
    SMOE_FAST_UNROLL
    for (int j = 0; j < NP; ++j) acc[ob][j] = Vec<scalar_t>{};
  for (int co = 0; co < Cout; ++co) {
    const scalar_t* w_co = packed_cib + static_cast<int64_t>(co) * 16 * OB;
    SMOE_FAST_UNROLL
    for (int k = 0; k < 16; ++k) {
      const int ph = k / 4, a = ph / 2, c = ph % 2, r = (k / 2) % 2, s = k % 2;
      const scalar_t* g = gph + (static_cast<int64_t>(ph) * Cout + co) * map + ((1 - a - r) * in_w + 1 - c - s) * T;
      Vec<scalar_t> w[OB];
      SMOE_FAST_UNROLL
      for (int ob = 0; ob < OB; ++ob) w[ob] = broadcast(w_co[k * OB + ob]);
      SMOE_FAST_UNROLL
      for (int j = 0; j < NP; ++j) {
        Vec<scalar_t> x = load(g + static_cast<int64_t>(in_off[j]) * T);
        if constexpr (kVecRegs >= 32) keep_in_register(x);
        SMOE_FAST_UNROLL
        for (int ob = 0; ob < OB; ++ob) acc[ob][j] += w[ob] * x;
      }
    }
  }
  SMOE_FAST_UNROLL
  for (int ob = 0; ob < OB; ++ob)
    SMOE_FAST_UNROLL
    for (int j = 0; j < NP; ++j) store(grad_in_cib + ob * map + static_cast<int64_t>(in_off[j]) * T, acc[ob][j]);
}

// Per-lane folded-weight gradients of one phase, OB output channels and one input channel: the 4 taps
// x OB channels stay in registers over all pixels (each pixel: OB gradient and 4 input loads, 4 OB
// multiply-adds), then are added to the per-lane accumulators in memory.
template <typename scalar_t, int OB, int W>
inline void conv_up2_grad_weight_tile(const scalar_t* gph_ph_co, const scalar_t* in_ph_ci, Vec<scalar_t>* gw,
                                      int64_t gw_co_stride) {
  constexpr int T = kLanes<scalar_t>;
  constexpr int in_w = W + 2;
  constexpr int64_t map = static_cast<int64_t>(in_w) * in_w * T;
  Vec<scalar_t> acc[OB][4];
  SMOE_FAST_UNROLL
  for (int ob = 0; ob < OB; ++ob)
    SMOE_FAST_UNROLL
    for (int t = 0; t < 4; ++t) acc[ob][t] = Vec<scalar_t>{};
  for (int p = 0; p < W; ++p)
    for (int q = 0; q < W; ++q) {
      const int64_t at = (static_cast<int64_t>(p) * in_w + q) * T;
      Vec<scalar_t> g[OB];
      SMOE_FAST_UNROLL
      for (int ob = 0; ob < OB; ++ob) g[ob] = load(gph_ph_co + ob * map + at + (in_w + 1) * T);
      SMOE_FAST_UNROLL
      for (int t = 0; t < 4; ++t) {
        Vec<scalar_t> x = load(in_ph_ci + at + ((t / 2) * in_w + t % 2) * T);
        if constexpr (kVecRegs >= 32) keep_in_register(x);
        SMOE_FAST_UNROLL
        for (int ob = 0; ob < OB; ++ob) acc[ob][t] += g[ob] * x;
      }
    }
  SMOE_FAST_UNROLL
  for (int ob = 0; ob < OB; ++ob)
    SMOE_FAST_UNROLL
    for (int t = 0; t < 4; ++t) gw[ob * gw_co_stride + t] += acc[ob][t];
}

// The same for a single output channel (out_c not a multiple of 4): all four phases of one input
// channel together, the 3x3 neighbourhood loaded once per pixel for the 16 (phase, tap) accumulators.
template <typename scalar_t, int W>
inline void conv_up2_grad_weight_1co(const scalar_t* gph_co, int64_t gph_phase_stride, const scalar_t* in_ci,
                                     Vec<scalar_t>* gw_co_ci, int64_t gw_phase_stride) {
  constexpr int T = kLanes<scalar_t>;
  constexpr int in_w = W + 2;
  Vec<scalar_t> acc[4][4];
  SMOE_FAST_UNROLL
  for (int ph = 0; ph < 4; ++ph)
    SMOE_FAST_UNROLL
    for (int t = 0; t < 4; ++t) acc[ph][t] = Vec<scalar_t>{};
  for (int p = 0; p < W; ++p)
    for (int q = 0; q < W; ++q) {
      const int64_t at = (static_cast<int64_t>(p) * in_w + q) * T;
      Vec<scalar_t> g[4];
      SMOE_FAST_UNROLL
      for (int ph = 0; ph < 4; ++ph) g[ph] = load(gph_co + ph * gph_phase_stride + at + (in_w + 1) * T);
      SMOE_FAST_UNROLL
      for (int dy = 0; dy < 3; ++dy)
        SMOE_FAST_UNROLL
        for (int dx = 0; dx < 3; ++dx) {
          Vec<scalar_t> x = load(in_ci + at + (dy * in_w + dx) * T);
          if constexpr (kVecRegs >= 32) keep_in_register(x);
          SMOE_FAST_UNROLL
          for (int a = 0; a < 2; ++a)
            SMOE_FAST_UNROLL
            for (int c = 0; c < 2; ++c) {
              const int r = dy - a, s = dx - c;
              if (r >= 0 && r < 2 && s >= 0 && s < 2) acc[a * 2 + c][r * 2 + s] += g[a * 2 + c] * x;
            }
        }
    }
  SMOE_FAST_UNROLL
  for (int ph = 0; ph < 4; ++ph)
    SMOE_FAST_UNROLL
    for (int t = 0; t < 4; ++t) gw_co_ci[ph * gw_phase_stride + t] += acc[ph][t];
}

// grad_in (padded like in; only the interior is written, the border stays as it was) and the per-lane
// folded-weight and bias gradients of an up == 2 conv. gph: scratch of 4 * Cout * (W + 2)^2 lanes
// whose border is zero (only its interior is ever written).
// Out of line (as linear_bwd) so that profiles show the backward layers apart from the engine.
template <typename scalar_t, int W>
__attribute__((noinline)) void conv_up2_bwd(const Layer& layer, const scalar_t* in, const scalar_t* packed_t, const scalar_t* grad_out,
                  int out_pad, scalar_t* gph, scalar_t* grad_in, Vec<scalar_t>* grad_folded_lanes,
                  Vec<scalar_t>* grad_bias_lanes) {
  constexpr int T = kLanes<scalar_t>;
  constexpr int in_w = W + 2;
  constexpr int64_t map = static_cast<int64_t>(in_w) * in_w * T;
  const int Cin = layer.in_c, Cout = layer.out_c;
  const int out_w = layer.out_w + 2 * out_pad;
  const int64_t out_channel = static_cast<int64_t>(layer.out_h + 2 * out_pad) * out_w * T;
  for (int ph = 0; ph < 4; ++ph)
    for (int co = 0; co < Cout; ++co) {
      const scalar_t* src = grad_out + co * out_channel + ((ph / 2 + out_pad) * static_cast<int64_t>(out_w) + ph % 2 + out_pad) * T;
      scalar_t* dst = gph + (static_cast<int64_t>(ph) * Cout + co) * map + (in_w + 1) * T;
      Vec<scalar_t> bias_sum{};
      for (int p = 0; p < W; ++p)
        for (int q = 0; q < W; ++q) {
          const Vec<scalar_t> g = load(src + (2 * p * static_cast<int64_t>(out_w) + 2 * q) * T);
          bias_sum += g;
          store(dst + (p * in_w + q) * T, g);
        }
      grad_bias_lanes[co] += bias_sum;
    }
  // grad_in over the interior pixels, OB input channels x NP pixels per tile.
  constexpr int OB = kPhaseTileChannels, NP = kPhaseTilePixels;
  constexpr int pixels = W * W, full = pixels / NP * NP;
  int32_t in_off[pixels];
  for (int m = 0; m < pixels; ++m) in_off[m] = (m / W + 1) * in_w + m % W + 1;
  for (int cib = 0; cib < Cin / OB; ++cib) {
    const scalar_t* w = packed_t + static_cast<int64_t>(cib) * Cout * 16 * OB;
    scalar_t* gi = grad_in + cib * OB * map;
    for (int m = 0; m < full; m += NP) conv_up2_grad_in_tile<scalar_t, OB, NP, W>(Cout, gph, w, in_off + m, gi);
    for (int m = full; m < pixels; ++m) conv_up2_grad_in_tile<scalar_t, OB, 1, W>(Cout, gph, w, in_off + m, gi);
  }
  // Folded-weight gradients, laid out [phase][co][ci][r][s] like the folded weights.
  const int64_t n = static_cast<int64_t>(Cout) * Cin;
  if (Cout % OB == 0) {
    for (int ph = 0; ph < 4; ++ph) {
      const scalar_t* in_ph = in + ((ph / 2) * in_w + ph % 2) * T;
      for (int co = 0; co < Cout; co += OB)
        for (int ci = 0; ci < Cin; ++ci)
          conv_up2_grad_weight_tile<scalar_t, OB, W>(gph + (static_cast<int64_t>(ph) * Cout + co) * map, in_ph + ci * map,
                                                     grad_folded_lanes + (ph * n + static_cast<int64_t>(co) * Cin + ci) * 4,
                                                     static_cast<int64_t>(Cin) * 4);
    }
  } else {
    for (int co = 0; co < Cout; ++co)
      for (int ci = 0; ci < Cin; ++ci)
        conv_up2_grad_weight_1co<scalar_t, W>(gph + co * map, Cout * map, in + ci * map,
                                              grad_folded_lanes + (static_cast<int64_t>(co) * Cin + ci) * 4, n * 4);
  }
}

// Whether conv_up2_bwd handles this layer.
inline bool has_up2_bwd_kernel(const Layer& layer) { return has_up2_kernel(layer) && layer.in_c % kPhaseTileChannels == 0; }

// grad_in (padded like in) = conv^T(grad_out); per-lane folded-weight and bias gradients accumulate.
template <typename scalar_t>
void conv_bwd(const Layer& layer, const scalar_t* in, const scalar_t* folded, const scalar_t* grad_out, int out_pad,
              scalar_t* grad_in, Vec<scalar_t>* grad_folded_lanes, Vec<scalar_t>* grad_bias_lanes) {
  constexpr int T = kLanes<scalar_t>;
  const int Cin = layer.in_c, H = layer.in_h, W = layer.in_w, up = layer.up, R = up == 2 ? 2 : 3;
  const int in_w = W + 2, out_h = layer.out_h + 2 * out_pad, out_w = layer.out_w + 2 * out_pad;
  std::fill(grad_in, grad_in + buffer_size(Cin, H, W, 1, T), scalar_t(0));
  for (int phase = 0; phase < up * up; ++phase) {
    const int a = up == 2 ? phase / 2 : 0, c = up == 2 ? phase % 2 : 0;
    for (int co = 0; co < layer.out_c; ++co) {
      const int64_t w_co = (static_cast<int64_t>(phase) * layer.out_c + co) * Cin * R * R;
      for (int p = 0; p < H; ++p)
        for (int q = 0; q < W; ++q) {
          const Vec<scalar_t> g =
              load(grad_out + ((static_cast<int64_t>(co) * out_h + p * up + a + out_pad) * out_w + q * up + c + out_pad) * T);
          grad_bias_lanes[co] += g;
          for (int ci = 0; ci < Cin; ++ci) {
            const int64_t src_c = ((static_cast<int64_t>(ci) * (H + 2) + p + a) * in_w + q + c) * T;
            const int64_t w_c = w_co + static_cast<int64_t>(ci) * R * R;
            for (int r = 0; r < R; ++r)
              for (int s = 0; s < R; ++s) {
                const int64_t at = src_c + (r * in_w + s) * T;
                grad_folded_lanes[w_c + r * R + s] += g * load(in + at);
                store(grad_in + at, load(grad_in + at) + folded[w_c + r * R + s] * g);
              }
          }
        }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// The experts engine: hard (K = 1, no gates), top-k (K slots) and soft (K = E, slot k = expert k).

// Runs body(i, following, state) for every i in [begin, end) on up to at::get_num_threads() threads, each
// taking the next index from a shared counter, with per-thread state from make_state() (scratch buffers).
// Dynamic because items differ in cost (shared tail blocks come after whole-expert items, and empty items
// cost nothing): at::parallel_for's split into contiguous halves left one thread idle for much of a call.
// kClaimAhead: a thread claims its next index before running the current one and passes it as
// `following` (so the body can prefetch for it; it holds at most one item back from the others, so use
// it where the last items are small); else following == end. Results never depend on which thread ran
// an index.
template <bool kClaimAhead, typename MakeState, typename Body>
void parallel_items(int64_t begin, int64_t end, const MakeState& make_state, const Body& body) {
  if (begin >= end) return;
  std::atomic<int64_t> next{begin};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), end - begin);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    int64_t i = next.fetch_add(1);
    while (i < end) {
      const int64_t following = kClaimAhead ? next.fetch_add(1) : end;
      body(i, following, state);
      i = kClaimAhead ? following : next.fetch_add(1);
    }
  });
}

struct WorkItem {
  int64_t slot, expert, row_begin, row_end;
  int64_t partial;  // -1: accumulate straight into the expert's gradient; else a partial slot
};

template <typename scalar_t>
struct ExpertsProblem {
  DecoderPlan plan;
  int64_t num_tokens, latent, slots, num_experts;
  const scalar_t* z;                 // [B, L]
  const scalar_t* gates;             // [B * K] or nullptr (hard: gate 1)
  const int64_t* rows;               // [B * K] flat (token * K + slot), grouped by (slot, expert)
  std::vector<WorkItem> items;       // in (slot, expert, row) order
  std::vector<int64_t> phase_begin;  // items of slot k: phase_begin[k] .. phase_begin[k + 1]
  const scalar_t* weight[kMaxLayers];
  const scalar_t* bias[kMaxLayers];
};

// Per-item scratch: activations and their gradients per layer boundary, folded conv weights, and
// per-lane weight-gradient accumulators (conv: of the folded weights) summed over lanes per item.
template <typename scalar_t>
struct Scratch {
  // phase_grad: conv_up2_bwd's per-phase output gradients, one per layer (their borders must stay zero).
  std::vector<std::vector<scalar_t>> act, grad, folded, packed, packed_t, phase_grad, grad_weight, grad_bias;
  // A shared block's weights and biases per layer: conv layers' packed weights and biases expanded per
  // lane (shared_pack: their interleaved form, expanded from); linear layers' biases interleaved and one
  // tile's weight rows (linear_fwd's tile_buf).
  std::vector<std::vector<scalar_t>> shared_weight, shared_bias, shared_pack;

  std::vector<std::vector<Vec<scalar_t>>> folded_vec, grad_weight_lanes, grad_bias_lanes;
  std::vector<scalar_t> in_t;             // linear_bwd's transposed input
  std::vector<int64_t> linear_offsets;  // and its output offsets
  int pad[kMaxLayers + 1];
  Prefetcher prefetch;  // the next shared block's weights

  Scratch(const DecoderPlan& plan, bool backward) {
    constexpr int T = kLanes<scalar_t>;
    const int nl = plan.num_layers;
    act.resize(nl + 1);
    pad[0] = 0;
    act[0].assign(static_cast<int64_t>(plan.layers[0].in_size()) * T, scalar_t(0));
    for (int i = 0; i < nl; ++i) {
      const Layer& layer = plan.layers[i];
      pad[i + 1] = (i + 1 < nl && plan.layers[i + 1].is_conv) ? 1 : 0;
      act[i + 1].assign(buffer_size(layer.out_c, layer.out_h, layer.out_w, pad[i + 1], T), scalar_t(0));
    }
    folded.resize(nl);
    packed.resize(nl);
    packed_t.resize(nl);
    folded_vec.resize(nl);
    for (int i = 0; i < nl; ++i) {
      if (!plan.layers[i].is_conv) continue;
      folded[i].resize(folded_size(plan.layers[i]));
      packed[i].resize(folded_size(plan.layers[i]));
      if (backward) packed_t[i].resize(folded_size(plan.layers[i]));
      folded_vec[i].resize(folded_size(plan.layers[i]));
    }
    if (!backward) return;
    phase_grad.resize(nl);
    for (int i = 0; i < nl; ++i)
      if (has_up2_bwd_kernel(plan.layers[i]))
        phase_grad[i].assign(4 * buffer_size(plan.layers[i].out_c, plan.layers[i].in_h, plan.layers[i].in_w, 1, T), scalar_t(0));
    grad.resize(nl + 1);
    for (int i = 0; i <= nl; ++i) grad[i].assign(act[i].size(), scalar_t(0));
    grad_weight.resize(nl);
    grad_bias.resize(nl);
    grad_weight_lanes.resize(nl);
    grad_bias_lanes.resize(nl);
    for (int i = 0; i < nl; ++i) {
      const Layer& layer = plan.layers[i];
      grad_weight[i].resize(layer.is_conv ? folded_size(layer) : layer.weight_size());
      grad_bias[i].resize(layer.bias_size());
      if (!linear_grad_is_dense<scalar_t>(layer)) grad_weight_lanes[i].resize(grad_weight[i].size());
      grad_bias_lanes[i].resize(layer.bias_size());
      if (layer.is_conv) continue;
      in_t.resize(std::max<size_t>(in_t.size(), static_cast<size_t>(layer.in_c) * T));
      linear_offsets.resize(std::max<size_t>(linear_offsets.size(), static_cast<size_t>(layer.out_size())));
    }
  }
};

// Decodes rows[r0 .. r0 + n) (n <= lanes) of `expert` into scratch.act; returns the token of each lane.
template <typename scalar_t>
void decode_block(const ExpertsProblem<scalar_t>& pb, Scratch<scalar_t>& s, int64_t expert, int64_t r0, int n,
                  int64_t* tokens) {
  constexpr int T = kLanes<scalar_t>;
  const int64_t L = pb.latent;
  scalar_t* zt = s.act[0].data();  // [L][T]
  for (int t = 0; t < T; ++t) {
    tokens[t] = t < n ? pb.rows[r0 + t] / pb.slots : -1;
    for (int64_t l = 0; l < L; ++l) zt[l * T + t] = t < n ? pb.z[tokens[t] * L + l] : scalar_t(0);
  }
  for (int i = 0; i < pb.plan.num_layers; ++i) {
    const Layer& layer = pb.plan.layers[i];
    const scalar_t* bias = pb.bias[i] + expert * layer.bias_size();
    if (layer.is_conv) {
      conv_fwd(layer, s.act[i].data(), s.packed[i].data(), s.folded_vec[i].data(), bias, s.act[i + 1].data(), s.pad[i + 1]);
    } else {
      const scalar_t* weight = pb.weight[i] + expert * layer.weight_size();
      linear_fwd(layer, s.act[i].data(), &weight, bias, s.act[i + 1].data(), s.pad[i + 1]);
    }
  }
}

template <typename scalar_t>
void fold_item_weights(const ExpertsProblem<scalar_t>& pb, Scratch<scalar_t>& s, int64_t expert) {
  for (int i = 0; i < pb.plan.num_layers; ++i) {
    const Layer& layer = pb.plan.layers[i];
    if (!layer.is_conv) continue;
    const scalar_t* weight = pb.weight[i] + expert * layer.weight_size();
    if (has_up2_kernel(layer)) {  // the up == 2 kernels broadcast from packed scalar weights
      pack_conv_up2(layer, weight, s.packed[i].data());
      if (!s.packed_t[i].empty()) {  // backward: the folded weights feed the transposed pack or conv_bwd
        fold_conv_weight(layer, weight, s.folded[i].data());
        if (has_up2_bwd_kernel(layer)) pack_conv_up2_transposed(layer, s.folded[i].data(), s.packed_t[i].data());
      }
      continue;
    }
    fold_conv_weight(layer, weight, s.folded[i].data());
    for (size_t j = 0; j < s.folded[i].size(); ++j) s.folded_vec[i][j] = broadcast(s.folded[i][j]);
  }
}

#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
// In-register transpose of 16 x 16 floats: r[i][t] -> r[t][i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// One block's worth of lane vectors transposed in registers: r[i][t] -> r[t][i] (kLanes x kLanes).
inline void transpose_lanes(VecFloat r[16]) {
  __m512 m[16];
  for (int i = 0; i < 16; ++i) m[i] = r[i];
  transpose16(m);
  for (int i = 0; i < 16; ++i) r[i] = m[i];
}
#elif defined(SMOE_FAST_AVX2)
// In-register transpose of 8 x 8 floats: r[i][t] -> r[t][i].
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

inline void transpose_lanes(VecFloat r[8]) {
  __m256 m[8];
  for (int i = 0; i < 8; ++i) m[i] = r[i];
  transpose8(m);
  for (int i = 0; i < 8; ++i) r[i] = m[i];
}
#endif

#if (defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)) || defined(SMOE_FAST_AVX2)
// The block's outputs y [784][lanes] to out[token] (token-major; lanes with token -1 are skipped),
// times the gates, = or +=: kLanes pixels of every lane at a time, transposed in registers.
// Measured: the scalar strided loop below took 15% of the hard lite decoder's time (AVX-512), 7% (AVX2).
inline void write_block_output(const float* y, const int64_t* tokens, const float* gate, bool accumulate,
                               float* out) {
  constexpr int T = kLanes<float>;
  static_assert(kImagePixels % T == 0, "the transpose works on kLanes pixels at a time");
#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
  // A token's 16 pixels are one whole 64-byte line of its output row (784 floats = 49 lines): written
  // with streaming stores, the line is not first read from memory (the write-once output is 205 MB at
  // B = 65,536, hard lite).
  const bool stream = !accumulate && reinterpret_cast<uintptr_t>(out) % 64 == 0;
#else
  [[maybe_unused]] constexpr bool stream = false;  // AVX2: half-line streaming stores measured 6-12% slower (Zen 3)
#endif
  for (int pix = 0; pix < kImagePixels; pix += T) {
    VecFloat r[T];
    for (int i = 0; i < T; ++i) r[i] = load(y + (pix + i) * T);
    transpose_lanes(r);
    for (int t = 0; t < T; ++t) {
      if (tokens[t] < 0) continue;
      float* dst = out + tokens[t] * kImagePixels + pix;
      const VecFloat v = broadcast(gate[t]) * r[t];
#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
      if (stream) {
        _mm512_stream_ps(dst, v);
        continue;
      }
#endif
      store(dst, accumulate ? load(dst) + v : v);
    }
  }
#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the block's item ends
#endif
}

// The transpose of write_block_output for the backward: dy [784][lanes] = gate * grad_out[token] and
// dgate = sum over pixels of grad_out[token] * y, per lane; g_rows[t]: lane t's row of grad_out (a
// row of zeros for lanes past the block's tokens). The scalar strided loop below took 9% of a
// one-thread soft step (lite, B = 1,024, E = 64).
inline void read_block_grad(const float* y, const float* const* g_rows, const float* gate, float* dy, float* dgate) {
  constexpr int T = kLanes<float>;
  const VecFloat gate_v = load(gate);
  VecFloat dot{};
  for (int pix = 0; pix < kImagePixels; pix += T) {
    VecFloat r[T];
    for (int t = 0; t < T; ++t) r[t] = load(g_rows[t] + pix);
    transpose_lanes(r);
    for (int i = 0; i < T; ++i) {
      store(dy + (pix + i) * T, gate_v * r[i]);
      dot += r[i] * load(y + (pix + i) * T);
    }
  }
  store(dgate, dot);
}
#endif

// out[j] = the sum of v[j]'s lanes (lane 0 first), for j < n: the per-lane weight-gradient accumulators
// of a backward item, reduced once per item. AVX-512 float: 16 accumulators at a time, transposed in
// registers and added as vectors (5 instructions per sum instead of ~30 for the extract-and-add of
// lane_sum; with 128-row items in soft gating this reduction runs once per 8 blocks).
inline void lane_sums(const VecFloat* v, int64_t n, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__) && !defined(SMOE_FAST_VEC_BYTES)
  for (; j + 16 <= n; j += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = v[j + i];
    transpose16(r);
    __m512 sum = r[0];
    for (int t = 1; t < 16; ++t) sum = _mm512_add_ps(sum, r[t]);
    _mm512_storeu_ps(out + j, sum);
  }
#endif
  for (; j < n; ++j) out[j] = lane_sum<float>(v[j]);
}

inline void lane_sums(const VecDouble* v, int64_t n, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = lane_sum<double>(v[j]);
}

template <typename scalar_t>
void write_block_output(const scalar_t* y, const int64_t* tokens, const scalar_t* gate, bool accumulate,
                        scalar_t* out) {
  constexpr int T = kLanes<scalar_t>;
  for (int t = 0; t < T; ++t) {
    if (tokens[t] < 0) continue;
    scalar_t* dst = out + tokens[t] * kImagePixels;
    if (accumulate) {
      for (int pix = 0; pix < kImagePixels; ++pix) dst[pix] += gate[t] * y[pix * T + t];
    } else {
      for (int pix = 0; pix < kImagePixels; ++pix) dst[pix] = gate[t] * y[pix * T + t];
    }
  }
}

template <typename scalar_t>
void read_block_grad(const scalar_t* y, const scalar_t* const* g_rows, const scalar_t* gate, scalar_t* dy, scalar_t* dgate) {
  constexpr int T = kLanes<scalar_t>;
  for (int t = 0; t < T; ++t) {
    scalar_t dot = 0;
    for (int pix = 0; pix < kImagePixels; ++pix) {
      dot += g_rows[t][pix] * y[pix * T + t];
      dy[pix * T + t] = gate[t] * g_rows[t][pix];
    }
    dgate[t] = dot;
  }
}

// A block shared by up to kSharedSlots experts' tails, so that many experts with few tokens each do not
// leave most lanes empty (E = 8,192 at B = 65,536: about 8 tokens per expert). Slot e holds rows
// row_begin[e] .. + count[e] of expert[e] in lanes first[e] .. first[e] + count[e] (consecutive);
// lanes past the last slot are empty. An expert's tail may continue in the next block.
constexpr int kSharedSlots = 4;
struct SharedBlock {
  int64_t expert[kSharedSlots], row_begin[kSharedSlots];
  int first[kSharedSlots], count[kSharedSlots];
  int used;  // slots in use (>= 1); expert[used ..] repeats the last used one (the linear layers read all four)
};

// Whether blocks may hold several experts: float on AVX2 or AVX-512 (8 or 16 lanes; float64 keeps
// one-expert blocks) and an up == 2 kernel for every conv.
template <typename scalar_t>
bool can_share_blocks(const DecoderPlan& plan) {
  if (!std::is_same<scalar_t, float>::value || kLanes<scalar_t> < 8) return false;
  for (int i = 0; i < plan.num_layers; ++i)
    if (plan.layers[i].is_conv && !has_up2_kernel(plan.layers[i])) return false;
  return true;
}

// Moves the tails (the rows past the last full block) of the items[begin, end) of one phase into shared
// blocks, in expert order, each block filled lane by lane (a tail split across two blocks if need be)
// until its lanes or its kSharedSlots slots run out. Lanes in use at E = 8,192, B = 65,536 (uniform
// routing, 16 lanes): 99.9%, against 84% with the previous fixed slots of 4 lanes (lane t in slot t % 4)
// and about 50% with one-expert blocks only.
inline void share_tails(std::vector<WorkItem>& items, int64_t begin, int64_t end, int lanes,
                        std::vector<SharedBlock>& shared) {
  SharedBlock open{};
  int lanes_used = 0;
  auto flush = [&]() {
    for (int e = open.used; e < kSharedSlots; ++e) open.expert[e] = open.expert[open.used - 1];
    shared.push_back(open);
    open.used = 0;
    lanes_used = 0;
  };
  for (int64_t i = begin; i < end; ++i) {
    WorkItem& item = items[i];
    const bool last_of_expert = i + 1 == end || items[i + 1].expert != item.expert;
    const int tail = static_cast<int>((item.row_end - item.row_begin) % lanes);
    if (!last_of_expert || tail == 0) continue;
    item.row_end -= tail;
    for (int64_t r = item.row_end; r < item.row_end + tail;) {
      const int n = static_cast<int>(std::min<int64_t>(lanes - lanes_used, item.row_end + tail - r));
      const int e = open.used++;
      open.expert[e] = item.expert;
      open.row_begin[e] = r;
      open.first[e] = lanes_used;
      open.count[e] = n;
      lanes_used += n;
      r += n;
      if (lanes_used == lanes || open.used == kSharedSlots) flush();
    }
  }
  if (open.used > 0) flush();
}

// p[j * T + t] = packed[j * kSharedSlots + slots[t]] for j < n: a shared block's interleaved conv weights
// or biases expanded to each lane's expert.
template <typename scalar_t>
void expand_lanes(const scalar_t* packed, int64_t n, const VecInt& slots, scalar_t* p) {
  constexpr int T = kLanes<scalar_t>;
  for (int64_t j = 0; j < n; ++j) store(p + j * T, gather_slots(packed + j * kSharedSlots, slots));
}

// Decodes a shared block: the linear layers read the experts' weights interleaved (gather_slots), the
// convs per lane (expand_lanes); meanwhile prefetches the weights of `next` (the shared block this
// thread runs next, or nullptr).
template <typename scalar_t>
void decode_shared_block(const ExpertsProblem<scalar_t>& pb, Scratch<scalar_t>& s, const SharedBlock& b,
                         const SharedBlock* next, int64_t* tokens, scalar_t* gate) {
  constexpr int T = kLanes<scalar_t>, NE = kSharedSlots;
  const DecoderPlan& plan = pb.plan;
  const int64_t L = pb.latent;
  scalar_t* zt = s.act[0].data();
  VecInt slots;
  for (int t = 0; t < T; ++t) {
    int e = 0;
    while (e + 1 < b.used && t >= b.first[e + 1]) ++e;
    const int j = t - b.first[e];
    const bool valid = j < b.count[e];
    slots[t] = e;
    const int64_t row = valid ? pb.rows[b.row_begin[e] + j] : -1;
    tokens[t] = valid ? row / pb.slots : -1;
    gate[t] = valid && pb.gates ? pb.gates[row] : scalar_t(1);
    for (int64_t l = 0; l < L; ++l) zt[l * T + t] = valid ? pb.z[tokens[t] * L + l] : scalar_t(0);
  }
  // Biases and conv weights interleaved expert-innermost (unused slots repeat the last used expert), each
  // distinct expert folded and packed straight into its interleaved place; the convs' then expanded
  // per lane. (A separate interleave pass over per-expert packs took 5% of the forward at E = 8,192.)
  for (int i = 0; i < plan.num_layers; ++i) {
    const Layer& layer = plan.layers[i];
    scalar_t* sb = layer.is_conv ? s.shared_pack[i].data() : s.shared_bias[i].data();
    for (int e = 0; e < NE; ++e) {
      const scalar_t* bias = pb.bias[i] + b.expert[e] * layer.bias_size();
      for (int j = 0; j < layer.bias_size(); ++j) sb[j * NE + e] = bias[j];
    }
    if (!layer.is_conv) continue;
    expand_lanes(sb, layer.bias_size(), slots, s.shared_bias[i].data());
    scalar_t* sw = s.shared_pack[i].data();
    for (int e = 0; e < b.used; ++e)
      pack_conv_up2(layer, pb.weight[i] + b.expert[e] * layer.weight_size(), sw + e, NE);
    expand_lanes(sw, folded_size(layer), slots, s.shared_weight[i].data());
  }
  // The next block's latent rows (random tokens: each a cache miss when the copy loop above reached it).
  for (int e = 0; next != nullptr && e < next->used; ++e)
    for (int j = 0; j < next->count[e]; ++j) {
      const scalar_t* z_row = pb.z + pb.rows[next->row_begin[e] + j] / pb.slots * L;
      for (int64_t l = 0; l < L; l += 64 / sizeof(scalar_t)) __builtin_prefetch(z_row + l, 0, 3);
    }
  s.prefetch.clear();
  for (int e = 0; next != nullptr && e < next->used; ++e)
    s.prefetch.add(pb.weight[0] + next->expert[e] * plan.layers[0].weight_size(),
                   plan.layers[0].weight_size() * static_cast<int64_t>(sizeof(scalar_t)));
  for (int i = 0; i < plan.num_layers; ++i) {
    const Layer& layer = plan.layers[i];
    if (layer.is_conv) {
      conv_fwd<scalar_t, T>(layer, s.act[i].data(), s.shared_weight[i].data(), nullptr, s.shared_bias[i].data(),
                            s.act[i + 1].data(), s.pad[i + 1], &s.prefetch);
    } else {
      const scalar_t* weight[NE];
      for (int e = 0; e < NE; ++e) weight[e] = pb.weight[i] + b.expert[e] * layer.weight_size();
      linear_fwd<scalar_t, NE>(layer, s.act[i].data(), weight, s.shared_bias[i].data(), s.act[i + 1].data(), s.pad[i + 1],
                               &slots, s.shared_weight[i].data());
    }
  }
}

// out[b] = sum_k gate[b, k] * D_{expert(b, k)}(z[b]), slot by slot. Within a slot every token is in
// exactly one block, so blocks write their tokens' outputs without races and in a fixed order.
template <typename scalar_t>
void experts_forward(const ExpertsProblem<scalar_t>& pb, scalar_t* out) {
  constexpr int T = kLanes<scalar_t>;
  const bool share = can_share_blocks<scalar_t>(pb.plan);
  std::vector<WorkItem> items = pb.items;
  for (int64_t k = 0; k < pb.slots; ++k) {
    std::vector<SharedBlock> shared;
    if (share) share_tails(items, pb.phase_begin[k], pb.phase_begin[k + 1], T, shared);
    const int64_t num_items = pb.phase_begin[k + 1] - pb.phase_begin[k];
    auto make_scratch = [&]() {
      Scratch<scalar_t> s(pb.plan, false);
      if (share) {
        const int nl = pb.plan.num_layers;
        s.shared_weight.resize(nl);
        s.shared_bias.resize(nl);
        s.shared_pack.resize(nl);
        for (int i = 0; i < nl; ++i) {
          const Layer& layer = pb.plan.layers[i];
          const int64_t bias = layer.bias_size(), conv = layer.is_conv ? folded_size(layer) : 0;
          s.shared_weight[i].resize(layer.is_conv ? conv * T : kSharedSlots * kLinearTileRows * static_cast<int64_t>(layer.in_c));
          s.shared_bias[i].resize((layer.is_conv ? T : kSharedSlots) * bias);
          s.shared_pack[i].resize(kSharedSlots * std::max(bias, conv));
        }
      }
      return s;
    };
    const int64_t num_work = num_items + static_cast<int64_t>(shared.size());
    parallel_items<true>(0, num_work, make_scratch, [&](int64_t i, int64_t following, Scratch<scalar_t>& s) {
      int64_t tokens[T];
      scalar_t gate[T];
      if (i >= num_items) {
        const SharedBlock* next = following < num_work ? &shared[following - num_items] : nullptr;
        decode_shared_block<scalar_t>(pb, s, shared[i - num_items], next, tokens, gate);
        write_block_output(s.act[pb.plan.num_layers].data(), tokens, gate, k > 0, out);
        return;
      }
      const WorkItem& item = items[pb.phase_begin[k] + i];
      if (item.row_begin == item.row_end) return;
      fold_item_weights(pb, s, item.expert);
      for (int64_t r0 = item.row_begin; r0 < item.row_end; r0 += T) {
        const int n = static_cast<int>(std::min<int64_t>(T, item.row_end - r0));
        decode_block(pb, s, item.expert, r0, n, tokens);
        for (int t = 0; t < n; ++t) gate[t] = pb.gates ? pb.gates[pb.rows[r0 + t]] : scalar_t(1);
        write_block_output(s.act[pb.plan.num_layers].data(), tokens, gate, k > 0, out);
      }
    });
  }
}

// Gradients of experts_forward: grad_z [B, L], grad_gates [B * K] (if gates), grad_weight/bias per layer.
template <typename scalar_t>
void experts_backward(const ExpertsProblem<scalar_t>& pb, const scalar_t* grad_out, scalar_t* grad_z,
                      scalar_t* grad_gates, scalar_t* const* grad_weight, scalar_t* const* grad_bias) {
  constexpr int T = kLanes<scalar_t>;
  const DecoderPlan& plan = pb.plan;
  const int nl = plan.num_layers;
  int64_t params = 0;  // one expert's parameters: the size of a partial slot
  for (int i = 0; i < nl; ++i) params += plan.layers[i].weight_size() + plan.layers[i].bias_size();
  int64_t num_partials = 0;
  for (const WorkItem& item : pb.items) num_partials = std::max(num_partials, item.partial + 1);
  std::vector<scalar_t> partials(num_partials * params, scalar_t(0));

  for (int64_t k = 0; k < pb.slots; ++k) {
    parallel_items<false>(pb.phase_begin[k], pb.phase_begin[k + 1], [&]() { return Scratch<scalar_t>(plan, true); },
                          [&](int64_t i, int64_t, Scratch<scalar_t>& s) {
      int64_t tokens[T];
      const WorkItem& item = pb.items[i];
      fold_item_weights(pb, s, item.expert);
      for (int l = 0; l < nl; ++l) {
        std::fill(s.grad_weight_lanes[l].begin(), s.grad_weight_lanes[l].end(), Vec<scalar_t>{});
        if (linear_grad_is_dense<scalar_t>(plan.layers[l])) std::fill(s.grad_weight[l].begin(), s.grad_weight[l].end(), scalar_t(0));
        std::fill(s.grad_bias_lanes[l].begin(), s.grad_bias_lanes[l].end(), Vec<scalar_t>{});
      }
      for (int64_t r0 = item.row_begin; r0 < item.row_end; r0 += T) {
        const int n = static_cast<int>(std::min<int64_t>(T, item.row_end - r0));
        decode_block(pb, s, item.expert, r0, n, tokens);
        static const scalar_t zero_row[kImagePixels] = {};
        const scalar_t* g_rows[T];
        scalar_t gate[T], dgate[T];
        for (int t = 0; t < T; ++t) {
          g_rows[t] = t < n ? grad_out + tokens[t] * kImagePixels : zero_row;
          gate[t] = t < n && pb.gates ? pb.gates[pb.rows[r0 + t]] : scalar_t(1);
        }
        read_block_grad(s.act[nl].data(), g_rows, gate, s.grad[nl].data(), dgate);
        if (grad_gates)
          for (int t = 0; t < n; ++t) grad_gates[pb.rows[r0 + t]] = dgate[t];
        for (int l = nl - 1; l >= 0; --l) {
          const Layer& layer = plan.layers[l];
          const scalar_t* a = s.act[l + 1].data();
          scalar_t* d = s.grad[l + 1].data();
          for (size_t j = 0; j < s.grad[l + 1].size(); j += T) store(d + j, load(d + j) * activation_grad<scalar_t>(load(a + j), layer.act));
          if (layer.is_conv) {
            if (has_up2_bwd_kernel(layer) && layer.in_w == 7) {
              conv_up2_bwd<scalar_t, 7>(layer, s.act[l].data(), s.packed_t[l].data(), d, s.pad[l + 1], s.phase_grad[l].data(),
                                        s.grad[l].data(), s.grad_weight_lanes[l].data(), s.grad_bias_lanes[l].data());
            } else if (has_up2_bwd_kernel(layer)) {
              conv_up2_bwd<scalar_t, 14>(layer, s.act[l].data(), s.packed_t[l].data(), d, s.pad[l + 1], s.phase_grad[l].data(),
                                         s.grad[l].data(), s.grad_weight_lanes[l].data(), s.grad_bias_lanes[l].data());
            } else {
              conv_bwd(layer, s.act[l].data(), s.folded[l].data(), d, s.pad[l + 1], s.grad[l].data(),
                       s.grad_weight_lanes[l].data(), s.grad_bias_lanes[l].data());
            }
          } else {
            linear_bwd(layer, s.act[l].data(), pb.weight[l] + item.expert * layer.weight_size(), d, s.pad[l + 1],
                       s.grad[l].data(), s.in_t.data(), s.linear_offsets.data(), s.grad_weight[l].data(), s.grad_weight_lanes[l].data(),
                       s.grad_bias_lanes[l].data());
          }
        }
        const scalar_t* dzt = s.grad[0].data();
        for (int t = 0; t < n; ++t) {
          scalar_t* dst = grad_z + tokens[t] * pb.latent;
          for (int64_t l = 0; l < pb.latent; ++l) dst[l] = (k == 0 ? scalar_t(0) : dst[l]) + dzt[l * T + t];
        }
      }
      // The item's weight gradients go to the expert's gradient or to the item's partial slot.
      scalar_t* partial = item.partial >= 0 ? partials.data() + item.partial * params : nullptr;
      for (int l = 0; l < nl; ++l) {
        const Layer& layer = plan.layers[l];
        lane_sums(s.grad_bias_lanes[l].data(), static_cast<int64_t>(s.grad_bias[l].size()), s.grad_bias[l].data());
        if (!linear_grad_is_dense<scalar_t>(layer))
          lane_sums(s.grad_weight_lanes[l].data(), static_cast<int64_t>(s.grad_weight[l].size()), s.grad_weight[l].data());
        scalar_t* gw = partial ? partial : grad_weight[l] + item.expert * layer.weight_size();
        if (layer.is_conv) {
          unfold_conv_grad(layer, s.grad_weight[l].data(), gw);
        } else {
          for (int j = 0; j < layer.weight_size(); ++j) gw[j] += s.grad_weight[l][j];
        }
        if (partial) partial += layer.weight_size();
        scalar_t* gb = partial ? partial : grad_bias[l] + item.expert * layer.bias_size();
        for (int j = 0; j < layer.bias_size(); ++j) gb[j] += s.grad_bias[l][j];
        if (partial) partial += layer.bias_size();
      }
    });
  }
  // Partial slots, added in item order per expert: deterministic.
  std::vector<std::vector<int64_t>> expert_partials(pb.num_experts);
  for (const WorkItem& item : pb.items)
    if (item.partial >= 0) expert_partials[item.expert].push_back(item.partial);
  at::parallel_for(0, pb.num_experts, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e)
      for (int64_t slot : expert_partials[e]) {
        const scalar_t* partial = partials.data() + slot * params;
        for (int l = 0; l < nl; ++l) {
          const Layer& layer = plan.layers[l];
          scalar_t* gw = grad_weight[l] + e * layer.weight_size();
          for (int j = 0; j < layer.weight_size(); ++j) gw[j] += *partial++;
          scalar_t* gb = grad_bias[l] + e * layer.bias_size();
          for (int j = 0; j < layer.bias_size(); ++j) gb[j] += *partial++;
        }
      }
  });
}

// Rows grouped by (slot, expert) and split into work items; `rows` receives the flat row indices.
// soft: K = E and slot k holds every token for expert k. top-k / hard: a counting sort on k * E + e.
void plan_items(const at::Tensor& idx, int64_t num_tokens, int64_t slots, int64_t num_experts, int lanes,
                std::vector<int64_t>& rows, std::vector<WorkItem>& items, std::vector<int64_t>& phase_begin) {
  const int64_t total = num_tokens * slots;
  rows.resize(total);
  std::vector<int64_t> key_offsets;
  if (!idx.defined()) {
    key_offsets.assign(slots + 1, 0);
    for (int64_t k = 0; k <= slots; ++k) key_offsets[k] = k * num_tokens;
    for (int64_t k = 0; k < slots; ++k)
      for (int64_t b = 0; b < num_tokens; ++b) rows[k * num_tokens + b] = b * slots + k;
  } else {
    std::vector<int64_t> keys(total);
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "cpp_experts_plan", [&] {
      const index_t* expert = idx.data_ptr<index_t>();
      for (int64_t f = 0; f < total; ++f) {
        const int64_t e = static_cast<int64_t>(expert[f]);
        TORCH_CHECK(e >= 0 && e < num_experts, "expert index ", e, " at flat position ", f, " is out of range [0, ",
                    num_experts, ")");
        keys[f] = (f % slots) * num_experts + e;
      }
    });
    key_offsets.resize(slots * num_experts + 1);
    stable_counting_sort(keys.data(), total, slots * num_experts, key_offsets.data(), rows.data());
  }
  // Chunks depend on the sizes only (never on the thread count): at most ~64 per phase beyond one per
  // group, so that soft gating (E phases of B rows, one expert each) still has several items per phase
  // to spread over the threads (64 per call left soft B=1,024, E=64 with one item per phase).
  const int64_t chunk = std::max<int64_t>(8 * lanes, ((num_tokens + 63) / 64 + lanes - 1) / lanes * lanes);
  std::vector<bool> expert_seen(num_experts, false);
  int64_t next_partial = 0;
  phase_begin.assign(slots + 1, 0);
  const int64_t groups_per_slot = idx.defined() ? num_experts : 1;
  for (int64_t k = 0; k < slots; ++k) {
    phase_begin[k] = static_cast<int64_t>(items.size());
    for (int64_t g = 0; g < groups_per_slot; ++g) {
      const int64_t key = k * groups_per_slot + g;
      const int64_t expert = idx.defined() ? g : k;
      for (int64_t r = key_offsets[key]; r < key_offsets[key + 1]; r += chunk) {
        const int64_t partial = expert_seen[expert] ? next_partial++ : -1;
        expert_seen[expert] = true;
        items.push_back(WorkItem{k, expert, r, std::min(r + chunk, key_offsets[key + 1]), partial});
      }
    }
  }
  phase_begin[slots] = static_cast<int64_t>(items.size());
}

// Shared set-up of the forward and backward ops. idx: [B, K] expert indices, or undefined for soft.
template <typename scalar_t>
ExpertsProblem<scalar_t> make_problem(const DecoderPlan& plan, const at::Tensor& z, const at::Tensor& idx,
                                      const at::Tensor& gates, int64_t slots, int64_t num_experts,
                                      const std::vector<at::Tensor>& weights, std::vector<int64_t>& rows) {
  ExpertsProblem<scalar_t> pb;
  pb.plan = plan;
  pb.num_tokens = z.size(0);
  pb.latent = z.size(1);
  pb.slots = slots;
  pb.num_experts = num_experts;
  pb.z = z.data_ptr<scalar_t>();
  pb.gates = gates.defined() ? gates.data_ptr<scalar_t>() : nullptr;
  for (int i = 0; i < plan.num_layers; ++i) {
    pb.weight[i] = weights[2 * i].data_ptr<scalar_t>();
    pb.bias[i] = weights[2 * i + 1].data_ptr<scalar_t>();
  }
  plan_items(idx, pb.num_tokens, slots, num_experts, kLanes<scalar_t>, rows, pb.items, pb.phase_begin);
  pb.rows = rows.data();
  return pb;
}

at::Tensor experts_fwd_common(const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& gates_in,
                              at::TensorList weights_in, c10::string_view kind, bool soft) {
  CHECK_FLOAT(z_in);
  CHECK_DIM(z_in, 2);
  int64_t num_experts = 0;
  const DecoderPlan plan = checked_plan(kind, z_in, weights_in, &num_experts);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor idx = idx_in.defined() ? idx_in.contiguous() : idx_in;
  const at::Tensor gates = gates_in.defined() ? gates_in.contiguous() : gates_in;
  const std::vector<at::Tensor> weights = contiguous_all(weights_in);
  const int64_t B = z.size(0);
  const int64_t slots = soft ? num_experts : (idx.dim() == 2 ? idx.size(1) : 1);
  if (gates.defined()) {
    CHECK_SAME_DTYPE(gates, z);
    CHECK_SHAPE(gates, B, slots);
  }
  at::Tensor out = alloc_output({B, 1, 28, 28}, z.options());
  if (B == 0) return out;
  std::vector<int64_t> rows;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "cpp_experts_fwd", [&] {
    const auto pb = make_problem<scalar_t>(plan, z, idx, gates, slots, num_experts, weights, rows);
    experts_forward(pb, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> experts_bwd_common(
    const at::Tensor& grad_out_in, const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& gates_in,
    at::TensorList weights_in, c10::string_view kind, bool soft) {
  CHECK_FLOAT(z_in);
  CHECK_DIM(z_in, 2);
  int64_t num_experts = 0;
  const DecoderPlan plan = checked_plan(kind, z_in, weights_in, &num_experts);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor idx = idx_in.defined() ? idx_in.contiguous() : idx_in;
  const at::Tensor gates = gates_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const std::vector<at::Tensor> weights = contiguous_all(weights_in);
  const int64_t B = z.size(0);
  const int64_t slots = soft ? num_experts : idx.size(1);
  CHECK_SAME_DTYPE(gates, z);
  CHECK_SHAPE(gates, B, slots);
  CHECK_SAME_DTYPE(grad_out, z);
  TORCH_CHECK(grad_out.numel() == B * kImagePixels, "grad_out must have shape (", B, ", 1, 28, 28), got ", grad_out.sizes());
  at::Tensor grad_z = alloc_output(z.sizes(), z.options());
  at::Tensor grad_gates = alloc_output(gates.sizes(), gates.options());
  std::vector<at::Tensor> grad_weights;
  for (const auto& w : weights) grad_weights.push_back(at::zeros_like(w));
  if (B == 0) return {grad_z, grad_gates, grad_weights};
  std::vector<int64_t> rows;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "cpp_experts_bwd", [&] {
    const auto pb = make_problem<scalar_t>(plan, z, idx, gates, slots, num_experts, weights, rows);
    scalar_t* gw[kMaxLayers];
    scalar_t* gb[kMaxLayers];
    for (int i = 0; i < plan.num_layers; ++i) {
      gw[i] = grad_weights[2 * i].data_ptr<scalar_t>();
      gb[i] = grad_weights[2 * i + 1].data_ptr<scalar_t>();
    }
    experts_backward(pb, grad_out.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(), grad_gates.data_ptr<scalar_t>(),
                     gw, gb);
  });
  return {grad_z, grad_gates, grad_weights};
}

at::Tensor experts_hard_cpu(const at::Tensor& z, const at::Tensor& expert_idx, at::TensorList weights,
                            c10::string_view kind) {
  CHECK_INDEX(expert_idx);
  CHECK_DIM(expert_idx, 1);
  TORCH_CHECK(expert_idx.size(0) == z.size(0), "expert_idx must have one entry per token (", z.size(0), "), got ",
              expert_idx.size(0));
  return experts_fwd_common(z, expert_idx, at::Tensor(), weights, kind, false);
}

at::Tensor experts_topk_fwd_cpu(const at::Tensor& z, const at::Tensor& topk_idx, const at::Tensor& topk_gates,
                                at::TensorList weights, c10::string_view kind) {
  CHECK_INDEX(topk_idx);
  CHECK_DIM(topk_idx, 2);
  TORCH_CHECK(topk_idx.size(0) == z.size(0), "topk_idx must have one row per token (", z.size(0), "), got ", topk_idx.size(0));
  return experts_fwd_common(z, topk_idx, topk_gates, weights, kind, false);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> experts_topk_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& topk_idx, const at::Tensor& topk_gates,
    at::TensorList weights, c10::string_view kind) {
  CHECK_INDEX(topk_idx);
  CHECK_DIM(topk_idx, 2);
  TORCH_CHECK(topk_idx.size(0) == z.size(0), "topk_idx must have one row per token (", z.size(0), "), got ", topk_idx.size(0));
  return experts_bwd_common(grad_out, z, topk_idx, topk_gates, weights, kind, false);
}

at::Tensor experts_soft_fwd_cpu(const at::Tensor& z, const at::Tensor& gates, at::TensorList weights,
                                c10::string_view kind) {
  return experts_fwd_common(z, at::Tensor(), gates, weights, kind, true);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> experts_soft_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& gates, at::TensorList weights,
    c10::string_view kind) {
  return experts_bwd_common(grad_out, z, at::Tensor(), gates, weights, kind, true);
}

}  // namespace
}  // namespace smoe_fast

TORCH_LIBRARY_IMPL(smoe_fast, CPU, m) {
  m.impl("cpp_group_by_expert", &smoe_fast::group_by_expert_cpu);
  m.impl("cpp_experts_hard", &smoe_fast::experts_hard_cpu);
  m.impl("cpp_experts_topk_fwd", &smoe_fast::experts_topk_fwd_cpu);
  m.impl("cpp_experts_topk_bwd", &smoe_fast::experts_topk_bwd_cpu);
  m.impl("cpp_experts_soft_fwd", &smoe_fast::experts_soft_fwd_cpu);
  m.impl("cpp_experts_soft_bwd", &smoe_fast::experts_soft_bwd_cpu);
}

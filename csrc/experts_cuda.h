// Launchers of the CUDA kernels: grouping_cuda.cu (stable grouping), experts_cuda.cu (expert tiles),
// wgrad_reduce_cuda.cu (weight-gradient segment sums). Plain C++ with CUDA runtime types only: raw
// pointers, sizes and a stream in, a cudaError_t back. The torch glue is experts_cuda_glue.cpp.
//
// Expert work is laid out as on the CPU (experts_cpu.cpp): rows (token, slot) are grouped by the key
// slot * E + expert, so slot k's rows form phase k and every token appears once per phase. One launch
// per phase, so outputs and grad_z accumulate over slots in slot order without races. A phase's rows
// are cut into chunks of `rows_per_chunk` (one thread block each); a block walks its chunk's runs of
// one expert in tiles of kTileTokens tokens, staging that expert's weights in shared memory.
//
// Weight gradients (bitwise reproducible, no float atomics): the run holding an expert's first row of
// the phase adds straight into the expert's gradient; a run that continues an expert from an earlier
// chunk c writes partial slot c. After each phase, experts_wgrad_reduce_cuda adds every expert's
// partial slots in chunk order.
//
// Precision (the modes of the Triton kernels): z and grad_out are read in their own dtype in_t (fp32,
// fp64, or fp16 / bf16 under autocast or in a half model), the weights in theirs, w_t (fp32 masters,
// or the half model's own dtype); everything is computed and accumulated in scalar_t (fp32, fp64 for
// fp64): activations, the weight stage, outputs over slots, grad_z over slots, weight gradients and
// their partial slots. The glue casts the fp32 outputs to the caller's dtypes once at the end (x_hat
// and grad_z in z's, weight gradients in the weights'). tensor_cores (set by the glue on sm_80 and
// later for fp16 / bf16 z, and for fp32 z when torch allows TF32 matmuls): the decoder's convolutions
// with at least 16 output channels (lite conv1, medium conv1 / conv2; forward and the backward's
// recomputation) and the input gradients of those with at least 16 input channels (lite conv2,
// medium conv1 / conv2 / conv3) multiply on the tensor cores, in TF32 for fp32 z and in z's half
// dtype otherwise, accumulating in fp32. Everything else stays IEEE on the FMA units: fp64, the
// linear layers (fc, the mlp's; a tile of 4 tokens is a quarter of an MMA's rows), the one-channel
// convolutions' forward, lite conv1's input gradient (8 channels) and every weight gradient. The TF32
// switch is torch's matmul one, as for the Triton kernels (torch's convolutions follow
// cudnn.allow_tf32, on by default, which would put every default fp32 run on TF32). fp16 operands
// overflow to inf above 65,504, as torch's fp16 convolutions do; bf16 has fp32's range.
//
// Out-of-range expert indices (ops.py's check_indices=False): never read or written out of bounds.
// Grouping sorts such rows after every key (rows offsets[num_keys] .. n, stable), so sorted_token_idx
// stays a permutation and counts leave them out. The expert ops write NaN for them: the token's whole
// output, its grad_z and that slot's gate gradient are NaN, and no weight gradient is touched. (The
// CPU backend raises instead; a GPU kernel cannot raise without a host synchronisation.)
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "decoder_plan.h"

namespace smoe_fast {

constexpr int kTileTokens = 4;  // tokens of one expert decoded together (register accumulators per thread)

// Scratch of group_by_expert_cuda, in int32 elements, for n rows and num_keys keys.
int64_t group_workspace_size(int64_t n, int64_t num_keys);

// Stable grouping of n rows by key = (row % slots) * num_experts + expert_idx[row], in two launches
// (count + last-block scan, scatter), no host synchronisation. num_keys = slots * num_experts.
// counts [num_keys] (may be nullptr), offsets [num_keys + 1], sorted_rows [n], row_sorted_pos [n]
// (may be nullptr), int32; workspace: group_workspace_size(n, num_keys) int32.
cudaError_t group_by_expert_cuda(const int64_t* expert_idx, int64_t n, int64_t slots, int64_t num_experts,
                                 int32_t* counts, int32_t* offsets, int32_t* sorted_rows, int32_t* row_sorted_pos,
                                 int32_t* workspace, cudaStream_t stream);

// scalar_t: compute and accumulation type (float or double); in_t: z and grad_out; w_t: the weights.
template <typename scalar_t, typename in_t = scalar_t, typename w_t = scalar_t>
struct ExpertsCudaArgs {
  using acc_type = scalar_t;
  using input_type = in_t;
  using weight_type = w_t;
  DecoderPlan plan;
  int64_t num_tokens, latent, slots, num_experts;
  int64_t phase;               // slot k of this launch
  const in_t* z;               // [B, L]
  const int64_t* expert_idx;   // [B, K]; nullptr: soft (K = E, slot k is expert k, no grouping)
  const int32_t* sorted_rows;  // [B * K] flat rows b * K + k grouped by key (nullptr: soft)
  const int32_t* key_offsets;  // [K * E + 1] (nullptr: soft)
  const scalar_t* gates;       // [B, K]; nullptr: hard (gate 1)
  const w_t* weight[kMaxLayers];
  const w_t* bias[kMaxLayers];
  scalar_t* out;               // forward: [B, 784]
  const in_t* grad_out;        // backward: [B, 784]
  scalar_t* grad_z;            // [B, L]
  scalar_t* grad_gates;        // [B, K]
  scalar_t* grad_weight[kMaxLayers];  // zero-initialised, [E, ...]
  scalar_t* grad_bias[kMaxLayers];
  scalar_t* partials;          // [num_chunks, params]: per-chunk weight-gradient partials
  int64_t params;              // one expert's parameter count (all layers' weights and biases)
  int64_t rows_per_chunk;      // a multiple of kTileTokens
  int64_t num_chunks;          // ceil(B / rows_per_chunk): chunks of one phase
  int grid;                    // blocks (each loops over chunks)
  scalar_t* workspace;         // activations, [grid][acts_per_block], when they do not fit shared memory
  int64_t acts_per_block;
  int shared_bytes;            // dynamic shared memory per block: the weight stage, the tensor-core
                               // scratch (with tensor_cores), the activations if they fit
  bool tensor_cores;           // wide convolutions (forward, input gradient) on the tensor cores ("Precision")
};

// The (scalar_t, in_t, w_t) combinations the glue dispatches to and every .cu file instantiates:
// fp64; fp32; fp16 / bf16 z with fp32 weights (autocast); fp16 / bf16 z and weights (a half model).
#define SMOE_FAST_FOR_EACH_PRECISION(X)                                                     \
  X(double, double, double) X(float, float, float) X(float, __half, float)                 \
  X(float, __nv_bfloat16, float) X(float, __half, __half) X(float, __nv_bfloat16, __nv_bfloat16)

// The launch plan: rows per chunk, chunks, grid, activation size, shared memory and whether the
// activations live in shared memory; fills those fields of args (set args.tensor_cores first). max_shared_bytes: the device's
// opt-in shared memory per block; num_sms: its multiprocessors. Returns the workspace size (scalars).
template <typename Args>
int64_t plan_experts_launch(Args& args, bool backward, int max_shared_bytes, int num_sms);

// Where layer `layer`'s weight starts in one expert's parameters (weight, bias per layer, in order);
// param_offset(plan, num_layers) is the expert's parameter count. The partial slots use this layout.
SMOE_FAST_HOST_DEVICE inline int64_t param_offset(const DecoderPlan& plan, int layer) {
  int64_t offset = 0;
  for (int i = 0; i < layer; ++i) offset += plan.layers[i].weight_size() + plan.layers[i].bias_size();
  return offset;
}

// Phase args.phase of the forward: out[b] (+)= gate * D_e(z[b]) for the phase's rows.
template <typename Args>
cudaError_t experts_fwd_cuda(const Args& args, cudaStream_t stream);

// Phase args.phase of the backward: grad_z (+)=, grad_gates, weight gradients (direct or partial slots).
template <typename Args>
cudaError_t experts_bwd_cuda(const Args& args, cudaStream_t stream);

// After the last phase: NaN into out (forward) or grad_z / grad_gates (backward) of out-of-range rows.
template <typename Args>
cudaError_t experts_mark_invalid_cuda(const Args& args, bool backward, cudaStream_t stream);

// After phase args.phase of the backward: add each expert's partial slots, in chunk order, into its gradient.
template <typename Args>
cudaError_t experts_wgrad_reduce_cuda(const Args& args, cudaStream_t stream);

#if defined(__CUDACC__)
// The key in [lo, hi) whose rows hold `row`: the last key with offsets[key] <= row (empty keys skipped).
// Requires offsets[lo] <= row < offsets[hi]. Shared by the expert tiles and the segment sums.
__device__ __forceinline__ int64_t find_key(const int32_t* offsets, int64_t lo, int64_t hi, int64_t row) {
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}
#endif

}  // namespace smoe_fast

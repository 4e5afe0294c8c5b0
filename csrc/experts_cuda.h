// Launchers of the CUDA kernels (experts_cuda.cu). Plain C++ with CUDA runtime types only: raw
// pointers, sizes and a stream in, a cudaError_t back. The torch glue is experts_cuda_glue.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "decoder_plan.h"

namespace smoe_fast {

// Stable grouping in two launches, no host synchronisation. expert_idx [n] int64 (flat b * K + k);
// outputs int32: counts [E], offsets [E + 1], sorted_token_idx [n], token_sorted_pos [n]; cursor [E] is scratch.
cudaError_t group_by_expert_cuda(const int64_t* expert_idx, int64_t n, int64_t num_experts, int32_t* counts,
                                 int32_t* offsets, int32_t* sorted_token_idx, int32_t* token_sorted_pos,
                                 int32_t* cursor, cudaStream_t stream);

// One token per thread block at a time (grid-stride over tokens); its K slots in order, so outputs and
// dz accumulate without races and deterministically. Activations live in `workspace`
// ([grid][workspace_per_block]). Weight gradients accumulate with atomics.
template <typename scalar_t>
struct ExpertsCudaArgs {
  DecoderPlan plan;
  int64_t num_tokens, latent, slots, num_experts;
  const scalar_t* z;           // [B, L]
  const int64_t* expert_idx;   // [B, K]; nullptr: soft (K = E, slot k is expert k)
  const scalar_t* gates;       // [B, K]; nullptr: hard (gate 1)
  const scalar_t* weight[kMaxLayers];
  const scalar_t* bias[kMaxLayers];
  scalar_t* out;               // forward: [B, 784]
  const scalar_t* grad_out;    // backward: [B, 784]
  scalar_t* grad_z;            // [B, L]
  scalar_t* grad_gates;        // [B, K]
  scalar_t* grad_weight[kMaxLayers];  // zero-initialised, [E, ...]
  scalar_t* grad_bias[kMaxLayers];
  scalar_t* workspace;
  int64_t workspace_per_block;
  int grid;
};

// Scalars of workspace one block needs: activations (and, for backward, their gradients).
int64_t experts_workspace_per_block(const DecoderPlan& plan, bool backward);

template <typename scalar_t>
cudaError_t experts_fwd_cuda(const ExpertsCudaArgs<scalar_t>& args, cudaStream_t stream);

template <typename scalar_t>
cudaError_t experts_bwd_cuda(const ExpertsCudaArgs<scalar_t>& args, cudaStream_t stream);

}  // namespace smoe_fast

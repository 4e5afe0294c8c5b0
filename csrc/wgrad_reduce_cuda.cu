// Weight-gradient segment sums after one backward phase (launcher in experts_cuda.h): every expert's
// partial slots added, in chunk order, into its gradient, so the result is bitwise reproducible.
//
// Grid: (num_chunks, ceil(params / kThreads)). Block (c, j) works only when chunk c is the first
// chunk that continues an expert e (e's rows began in chunk c - 1); its threads own parameters
// j * kThreads + tid and add slots c, c + 1, ... while the chunks still hold e's rows.
#include <cuda_runtime.h>

#include "experts_cuda.h"

namespace smoe_fast {
namespace {

constexpr int kThreads = 256;

template <typename Args>
__global__ void __launch_bounds__(kThreads) experts_wgrad_reduce_kernel(const __grid_constant__ Args args) {
  using scalar_t = typename Args::acc_type;
  const int64_t chunk = blockIdx.x, C = args.rows_per_chunk;
  int64_t phase_begin = 0, phase_end = args.num_tokens, expert = args.phase, expert_begin = 0, expert_end = phase_end;
  if (args.key_offsets != nullptr) {
    const int64_t k0 = args.phase * args.num_experts;
    phase_begin = args.key_offsets[k0];
    phase_end = args.key_offsets[k0 + args.num_experts];
  }
  const int64_t row = phase_begin + chunk * C;
  if (row >= phase_end) return;
  if (args.key_offsets != nullptr) {
    const int64_t k0 = args.phase * args.num_experts;
    const int64_t key = find_key(args.key_offsets, k0, k0 + args.num_experts, row);
    expert = key - k0;
    expert_begin = args.key_offsets[key];
    expert_end = args.key_offsets[key + 1];
  }
  if (!(expert_begin < row && expert_begin >= row - C)) return;  // not the expert's first continuing chunk
  const int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= args.params) return;
  // Parameter j of the expert: layer i's weight, then its bias (param_offset's layout).
  scalar_t* target = nullptr;
  for (int i = 0; i < args.plan.num_layers; ++i) {
    const Layer& layer = args.plan.layers[i];
    const int64_t w0 = param_offset(args.plan, i), b0 = w0 + layer.weight_size();
    if (j >= w0 && j < b0) target = args.grad_weight[i] + expert * layer.weight_size() + (j - w0);
    if (j >= b0 && j < b0 + layer.bias_size()) target = args.grad_bias[i] + expert * layer.bias_size() + (j - b0);
  }
  scalar_t sum = *target;
  for (int64_t c = chunk; phase_begin + c * C < expert_end; ++c) sum += args.partials[c * args.params + j];
  *target = sum;
}

}  // namespace

template <typename Args>
cudaError_t experts_wgrad_reduce_cuda(const Args& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.num_chunks < 2) return cudaSuccess;  // one chunk: nothing continues
  const dim3 grid(static_cast<unsigned>(args.num_chunks), static_cast<unsigned>((args.params + kThreads - 1) / kThreads));
  experts_wgrad_reduce_kernel<Args><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

#define SMOE_FAST_INSTANTIATE(scalar_t, in_t, w_t) \
  template cudaError_t experts_wgrad_reduce_cuda(const ExpertsCudaArgs<scalar_t, in_t, w_t>&, cudaStream_t);
SMOE_FAST_FOR_EACH_PRECISION(SMOE_FAST_INSTANTIATE)
#undef SMOE_FAST_INSTANTIATE

}  // namespace smoe_fast

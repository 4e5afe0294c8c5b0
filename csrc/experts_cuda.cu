// CUDA kernels of the smoe_fast ops and their launchers; CUDA headers only (no torch), so this file
// compiles with plain nvcc (.ci/check_cuda_sources.sh). Glue: experts_cuda_glue.cpp.
#include <cuda_runtime.h>

#include "experts_cuda.h"

namespace smoe_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kGroupThreads = 1024;

// ------------------------------------------------------------------------------------------------
// Grouping: launch 1 counts, launch 2 (one block) scans the counts and scatters stably.

__global__ void group_count_kernel(const int64_t* expert_idx, int64_t n, int64_t num_experts, int32_t* counts) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = expert_idx[i];
    if (e >= 0 && e < num_experts) atomicAdd(counts + e, 1);  // ops.py range-checks; never write out of bounds
  }
}

__global__ void group_scatter_kernel(const int64_t* expert_idx, int64_t n, int64_t num_experts, const int32_t* counts,
                                     int32_t* offsets, int32_t* cursor, int32_t* sorted_token_idx,
                                     int32_t* token_sorted_pos) {
  __shared__ int32_t scan[kGroupThreads];
  __shared__ int32_t carry;
  const int tid = threadIdx.x;
  if (tid == 0) carry = 0;
  __syncthreads();
  // Exclusive scan of counts, one tile of blockDim experts at a time.
  for (int64_t base = 0; base < num_experts; base += blockDim.x) {
    const int64_t e = base + tid;
    const int32_t count = e < num_experts ? counts[e] : 0;
    scan[tid] = count;
    __syncthreads();
    for (int step = 1; step < blockDim.x; step <<= 1) {
      const int32_t add = tid >= step ? scan[tid - step] : 0;
      __syncthreads();
      scan[tid] += add;
      __syncthreads();
    }
    if (e < num_experts) {
      offsets[e] = carry + scan[tid] - count;
      cursor[e] = carry + scan[tid] - count;
    }
    __syncthreads();
    if (tid == blockDim.x - 1) carry += scan[tid];
    __syncthreads();
  }
  if (tid == 0) offsets[num_experts] = carry;
  __syncthreads();
  // Stable scatter: tiles in order, warps of a tile in order; within a warp, lanes with the same
  // expert take consecutive slots in lane order.
  const int lane = tid & 31, warp = tid >> 5, num_warps = blockDim.x >> 5;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + tid;
    const bool valid = i < n && expert_idx[i] >= 0 && expert_idx[i] < num_experts;
    const long long e = valid ? expert_idx[i] : -1;
    for (int w = 0; w < num_warps; ++w) {
      if (warp == w) {
        const unsigned active = __ballot_sync(0xffffffffu, valid);
        if (valid) {
          const unsigned peers = __match_any_sync(active, e);
          const int leader = __ffs(peers) - 1;
          const int rank = __popc(peers & ((1u << lane) - 1u));
          int32_t start = 0;
          if (lane == leader) {
            start = cursor[e];
            cursor[e] = start + __popc(peers);
          }
          start = __shfl_sync(peers, start, leader);
          sorted_token_idx[start + rank] = static_cast<int32_t>(i);
          token_sorted_pos[i] = start + rank;
        }
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Experts: one thread block decodes one (token, slot) at a time; activations [C][H][W] in workspace.

template <typename scalar_t>
__device__ __forceinline__ scalar_t activate(scalar_t x, Activation act) {
  switch (act) {
    case Activation::kRelu: return x < scalar_t(0) ? scalar_t(0) : x;  // NaN stays NaN, like torch.relu
    case Activation::kElu: return x > scalar_t(0) ? x : expm1(x);
    case Activation::kSigmoid: return scalar_t(1) / (scalar_t(1) + exp(-x));
    default: return x;
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t activation_grad(scalar_t a, Activation act) {
  switch (act) {
    case Activation::kRelu: return a > scalar_t(0) ? scalar_t(1) : scalar_t(0);
    case Activation::kElu: return a > scalar_t(0) ? scalar_t(1) : a + scalar_t(1);
    case Activation::kSigmoid: return a * (scalar_t(1) - a);
    default: return scalar_t(1);
  }
}

// Offsets of the layer-boundary activations act[0] (z) .. act[num_layers] (x_hat) in a block's workspace.
__device__ __forceinline__ int64_t act_offset(const DecoderPlan& plan, int boundary) {
  int64_t offset = 0;
  for (int i = 0; i < boundary; ++i) offset += i == 0 ? plan.layers[0].in_size() : plan.layers[i - 1].out_size();
  return offset;
}

__host__ __device__ inline int64_t activations_size(const DecoderPlan& plan) {
  int64_t size = plan.layers[0].in_size();
  for (int i = 0; i < plan.num_layers; ++i) size += plan.layers[i].out_size();
  return size;
}

// Value of the upsampled-by-`up` input at (ci, uy, ux), zero outside (the conv's padding).
template <typename scalar_t>
__device__ __forceinline__ scalar_t upsampled(const Layer& layer, const scalar_t* in, int ci, int uy, int ux) {
  if (uy < 0 || ux < 0 || uy >= layer.out_h || ux >= layer.out_w) return scalar_t(0);
  return in[(ci * layer.in_h + uy / layer.up) * layer.in_w + ux / layer.up];
}

template <typename scalar_t>
__device__ void layer_fwd(const Layer& layer, const scalar_t* in, const scalar_t* weight, const scalar_t* bias,
                          scalar_t* out) {
  const int n = layer.out_size();
  for (int o = threadIdx.x; o < n; o += blockDim.x) {
    scalar_t acc;
    if (layer.is_conv) {
      const int hw = layer.out_h * layer.out_w;
      const int co = o / hw, y = (o % hw) / layer.out_w, x = o % layer.out_w;
      acc = bias[co];
      for (int ci = 0; ci < layer.in_c; ++ci) {
        const scalar_t* w = weight + (co * layer.in_c + ci) * 9;
        for (int kh = 0; kh < 3; ++kh)
          for (int kw = 0; kw < 3; ++kw) acc += w[kh * 3 + kw] * upsampled(layer, in, ci, y + kh - 1, x + kw - 1);
      }
    } else {
      acc = bias[o];
      const scalar_t* w = weight + static_cast<int64_t>(o) * layer.in_c;
      for (int k = 0; k < layer.in_c; ++k) acc += w[k] * in[k];
    }
    out[o] = activate(acc, layer.act);
  }
  __syncthreads();
}

// Decode z[token] through `expert` into the workspace activations.
template <typename scalar_t>
__device__ void decode_token(const ExpertsCudaArgs<scalar_t>& args, int64_t token, int64_t expert, scalar_t* acts) {
  const DecoderPlan& plan = args.plan;
  for (int l = threadIdx.x; l < args.latent; l += blockDim.x) acts[l] = args.z[token * args.latent + l];
  __syncthreads();
  for (int i = 0; i < plan.num_layers; ++i) {
    const Layer& layer = plan.layers[i];
    layer_fwd(layer, acts + act_offset(plan, i), args.weight[i] + expert * layer.weight_size(),
              args.bias[i] + expert * layer.bias_size(), acts + act_offset(plan, i + 1));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) experts_fwd_kernel(ExpertsCudaArgs<scalar_t> args) {
  scalar_t* acts = args.workspace + blockIdx.x * args.workspace_per_block;
  const scalar_t* y = acts + act_offset(args.plan, args.plan.num_layers);
  for (int64_t token = blockIdx.x; token < args.num_tokens; token += gridDim.x) {
    for (int64_t k = 0; k < args.slots; ++k) {
      const int64_t row = token * args.slots + k;
      const int64_t expert = args.expert_idx ? args.expert_idx[row] : k;
      const scalar_t gate = args.gates ? args.gates[row] : scalar_t(1);
      decode_token(args, token, expert, acts);
      scalar_t* dst = args.out + token * kImagePixels;
      for (int pix = threadIdx.x; pix < kImagePixels; pix += blockDim.x)
        dst[pix] = (k == 0 ? scalar_t(0) : dst[pix]) + gate * y[pix];
      __syncthreads();
    }
  }
}

template <typename scalar_t>
__device__ scalar_t block_sum(scalar_t value, scalar_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const scalar_t total = shared[0];
  __syncthreads();
  return total;
}

// grad_in = d(layer)/d(in)^T grad_pre; weight and bias gradients added atomically.
template <typename scalar_t>
__device__ void layer_bwd(const Layer& layer, const scalar_t* in, const scalar_t* weight, const scalar_t* grad_pre,
                          scalar_t* grad_in, scalar_t* grad_weight, scalar_t* grad_bias) {
  const int n_in = layer.in_size(), n_out = layer.out_size();
  if (layer.is_conv) {
    const int hw_in = layer.in_h * layer.in_w, hw_out = layer.out_h * layer.out_w;
    for (int j = threadIdx.x; j < n_in; j += blockDim.x) {  // gather over the outputs each input feeds
      const int ci = j / hw_in, iy = (j % hw_in) / layer.in_w, ix = j % layer.in_w;
      scalar_t acc = 0;
      for (int a = 0; a < layer.up; ++a)
        for (int c = 0; c < layer.up; ++c) {
          const int uy = iy * layer.up + a, ux = ix * layer.up + c;
          for (int co = 0; co < layer.out_c; ++co) {
            const scalar_t* w = weight + (co * layer.in_c + ci) * 9;
            const scalar_t* g = grad_pre + co * hw_out;
            for (int kh = 0; kh < 3; ++kh) {
              const int oy = uy - kh + 1;
              if (oy < 0 || oy >= layer.out_h) continue;
              for (int kw = 0; kw < 3; ++kw) {
                const int ox = ux - kw + 1;
                if (ox >= 0 && ox < layer.out_w) acc += w[kh * 3 + kw] * g[oy * layer.out_w + ox];
              }
            }
          }
        }
      grad_in[j] = acc;
    }
    for (int j = threadIdx.x; j < layer.weight_size(); j += blockDim.x) {
      const int co = j / (layer.in_c * 9), ci = (j / 9) % layer.in_c, kh = (j % 9) / 3, kw = j % 3;
      const scalar_t* g = grad_pre + co * hw_out;
      scalar_t acc = 0;
      for (int oy = 0; oy < layer.out_h; ++oy)
        for (int ox = 0; ox < layer.out_w; ++ox)
          acc += g[oy * layer.out_w + ox] * upsampled(layer, in, ci, oy + kh - 1, ox + kw - 1);
      atomicAdd(grad_weight + j, acc);
    }
    for (int co = threadIdx.x; co < layer.out_c; co += blockDim.x) {
      scalar_t acc = 0;
      for (int p = 0; p < hw_out; ++p) acc += grad_pre[co * hw_out + p];
      atomicAdd(grad_bias + co, acc);
    }
  } else {
    for (int k = threadIdx.x; k < n_in; k += blockDim.x) {
      scalar_t acc = 0;
      for (int o = 0; o < n_out; ++o) acc += weight[static_cast<int64_t>(o) * n_in + k] * grad_pre[o];
      grad_in[k] = acc;
    }
    for (int64_t j = threadIdx.x; j < static_cast<int64_t>(n_out) * n_in; j += blockDim.x)
      atomicAdd(grad_weight + j, grad_pre[j / n_in] * in[j % n_in]);
    for (int o = threadIdx.x; o < n_out; o += blockDim.x) atomicAdd(grad_bias + o, grad_pre[o]);
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) experts_bwd_kernel(ExpertsCudaArgs<scalar_t> args) {
  __shared__ scalar_t reduce[kThreads];
  const DecoderPlan& plan = args.plan;
  const int nl = plan.num_layers;
  const int64_t act_size = activations_size(plan);
  scalar_t* acts = args.workspace + blockIdx.x * args.workspace_per_block;
  scalar_t* grads = acts + act_size;  // same layout as acts
  for (int64_t token = blockIdx.x; token < args.num_tokens; token += gridDim.x) {
    for (int64_t k = 0; k < args.slots; ++k) {
      const int64_t row = token * args.slots + k;
      const int64_t expert = args.expert_idx ? args.expert_idx[row] : k;
      const scalar_t gate = args.gates ? args.gates[row] : scalar_t(1);
      decode_token(args, token, expert, acts);
      const scalar_t* y = acts + act_offset(plan, nl);
      scalar_t* dy = grads + act_offset(plan, nl);
      const scalar_t* g = args.grad_out + token * kImagePixels;
      scalar_t dgate = 0;
      for (int pix = threadIdx.x; pix < kImagePixels; pix += blockDim.x) {
        dgate += g[pix] * y[pix];
        dy[pix] = gate * g[pix];
      }
      dgate = block_sum(dgate, reduce);
      if (threadIdx.x == 0 && args.grad_gates) args.grad_gates[row] = dgate;
      for (int i = nl - 1; i >= 0; --i) {
        const Layer& layer = plan.layers[i];
        scalar_t* d = grads + act_offset(plan, i + 1);
        const scalar_t* a = acts + act_offset(plan, i + 1);
        for (int j = threadIdx.x; j < layer.out_size(); j += blockDim.x) d[j] *= activation_grad(a[j], layer.act);
        __syncthreads();
        layer_bwd(layer, acts + act_offset(plan, i), args.weight[i] + expert * layer.weight_size(), d,
                  grads + act_offset(plan, i), args.grad_weight[i] + expert * layer.weight_size(),
                  args.grad_bias[i] + expert * layer.bias_size());
      }
      scalar_t* dz = args.grad_z + token * args.latent;
      for (int l = threadIdx.x; l < args.latent; l += blockDim.x) dz[l] = (k == 0 ? scalar_t(0) : dz[l]) + grads[l];
      __syncthreads();
    }
  }
}

}  // namespace

cudaError_t group_by_expert_cuda(const int64_t* expert_idx, int64_t n, int64_t num_experts, int32_t* counts,
                                 int32_t* offsets, int32_t* sorted_token_idx, int32_t* token_sorted_pos,
                                 int32_t* cursor, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(counts, 0, num_experts * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  if (n > 0) {
    const int blocks = static_cast<int>((n + kThreads - 1) / kThreads < 4096 ? (n + kThreads - 1) / kThreads : 4096);
    group_count_kernel<<<blocks, kThreads, 0, stream>>>(expert_idx, n, num_experts, counts);
  }
  group_scatter_kernel<<<1, kGroupThreads, 0, stream>>>(expert_idx, n, num_experts, counts, offsets, cursor,
                                                         sorted_token_idx, token_sorted_pos);
  return cudaGetLastError();
}

int64_t experts_workspace_per_block(const DecoderPlan& plan, bool backward) {
  return activations_size(plan) * (backward ? 2 : 1);
}

template <typename scalar_t>
cudaError_t experts_fwd_cuda(const ExpertsCudaArgs<scalar_t>& args, cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;
  experts_fwd_kernel<scalar_t><<<args.grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t experts_bwd_cuda(const ExpertsCudaArgs<scalar_t>& args, cudaStream_t stream) {
  if (args.num_tokens == 0) return cudaSuccess;
  experts_bwd_kernel<scalar_t><<<args.grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template cudaError_t experts_fwd_cuda<float>(const ExpertsCudaArgs<float>&, cudaStream_t);
template cudaError_t experts_fwd_cuda<double>(const ExpertsCudaArgs<double>&, cudaStream_t);
template cudaError_t experts_bwd_cuda<float>(const ExpertsCudaArgs<float>&, cudaStream_t);
template cudaError_t experts_bwd_cuda<double>(const ExpertsCudaArgs<double>&, cudaStream_t);

}  // namespace smoe_fast

// Stable grouping of rows by key on the GPU (launcher in experts_cuda.h); CUDA headers only.
//
// Grid: P blocks, block p owns rows [p * R, (p + 1) * R). Launch 1 counts each block's keys (a shared
// memory histogram when the keys fit, else the block's own row of the workspace); the last block to
// finish (a ticket) scans the counts in (key, block) order into offsets and per-block start rows.
// Launch 2: each block scatters its rows in order, warp by warp, so rows keep their order within a
// key (stable). Out-of-range expert indices go to an extra key num_keys, after every real key.
#include <cuda_runtime.h>

#include <algorithm>

#include "experts_cuda.h"

namespace smoe_fast {
namespace {

constexpr int kGroupThreads = 512;
constexpr int64_t kMaxBlockCounts = int64_t{1} << 20;  // P * (num_keys + 1): bounds the last block's scan
constexpr int kSharedHistogramBytes = 48 * 1024;

struct GroupLayout {
  int64_t blocks, rows_per_block, keys;  // keys = num_keys + 1 (the out-of-range key)
  bool shared_histogram;
};

GroupLayout group_layout(int64_t n, int64_t num_keys) {
  GroupLayout g;
  g.keys = num_keys + 1;
  const int64_t by_rows = (n + 1023) / 1024;
  g.blocks = std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(by_rows, 1024), kMaxBlockCounts / g.keys));
  g.rows_per_block = std::max<int64_t>(1, (n + g.blocks - 1) / g.blocks);
  g.shared_histogram = g.keys * static_cast<int64_t>(sizeof(int32_t)) <= kSharedHistogramBytes;
  return g;
}

__device__ __forceinline__ int32_t row_key(const int64_t* expert_idx, int64_t row, int64_t slots, int64_t num_experts) {
  const int64_t e = expert_idx[row];
  if (e < 0 || e >= num_experts) return static_cast<int32_t>(slots * num_experts);  // the out-of-range key
  return static_cast<int32_t>((row % slots) * num_experts + e);
}

// Exclusive scan of values[0 .. n) in place by one block; returns the total.
__device__ int32_t block_exclusive_scan(int32_t* values, int64_t n) {
  __shared__ int32_t warp_totals[kGroupThreads / 32];
  __shared__ int32_t carry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int32_t v = i < n ? values[i] : 0;
    int32_t inclusive = v;
    for (int step = 1; step < 32; step <<= 1) {
      const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, step);
      if (lane >= step) inclusive += up;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      int32_t total = lane < blockDim.x / 32 ? warp_totals[lane] : 0;
      for (int step = 1; step < 32; step <<= 1) {
        const int32_t up = __shfl_up_sync(0xffffffffu, total, step);
        if (lane >= step) total += up;
      }
      if (lane < blockDim.x / 32) warp_totals[lane] = total;  // inclusive over warps
    }
    __syncthreads();
    const int32_t before = carry + (warp > 0 ? warp_totals[warp - 1] : 0);
    if (i < n) values[i] = before + inclusive - v;
    __syncthreads();
    if (threadIdx.x == 0) carry += warp_totals[blockDim.x / 32 - 1];
    __syncthreads();
  }
  return carry;
}

// Launch 1. block_counts [P][keys]; the last block turns them into start rows and writes offsets, counts.
__global__ void __launch_bounds__(kGroupThreads)
    group_count_kernel(const int64_t* expert_idx, int64_t n, int64_t slots, int64_t num_experts, GroupLayout g,
                       int32_t* block_counts, unsigned* ticket, int32_t* counts, int32_t* offsets) {
  extern __shared__ int32_t shared_histogram[];
  __shared__ bool is_last;
  int32_t* own = block_counts + blockIdx.x * g.keys;
  int32_t* hist = g.shared_histogram ? shared_histogram : own;
  for (int64_t key = threadIdx.x; key < g.keys; key += blockDim.x) hist[key] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * g.rows_per_block, end = begin + g.rows_per_block < n ? begin + g.rows_per_block : n;
  for (int64_t row = begin + threadIdx.x; row < end; row += blockDim.x)
    atomicAdd(hist + row_key(expert_idx, row, slots, num_experts), 1);  // integer: order-independent
  __syncthreads();
  if (g.shared_histogram)
    for (int64_t key = threadIdx.x; key < g.keys; key += blockDim.x) own[key] = hist[key];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1u) == static_cast<unsigned>(g.blocks - 1);
  __syncthreads();
  if (!is_last) return;
  // The last block: totals per key (into offsets), their scan, then each block's start row per key.
  for (int64_t key = threadIdx.x; key < g.keys; key += blockDim.x) {
    int32_t total = 0;
    for (int64_t p = 0; p < g.blocks; ++p) total += __ldcg(block_counts + p * g.keys + key);
    offsets[key] = total;
  }
  __syncthreads();
  block_exclusive_scan(offsets, g.keys);  // offsets[num_keys] = rows with an in-range expert
  for (int64_t key = threadIdx.x; key < g.keys; key += blockDim.x) {
    int32_t running = offsets[key];
    for (int64_t p = 0; p < g.blocks; ++p) {
      const int32_t count = __ldcg(block_counts + p * g.keys + key);
      block_counts[p * g.keys + key] = running;
      running += count;
    }
    if (counts != nullptr && key + 1 < g.keys) counts[key] = running - offsets[key];
  }
}

// Launch 2. Block p places its rows, in order, from its start rows (a cursor per key).
__global__ void __launch_bounds__(kGroupThreads)
    group_scatter_kernel(const int64_t* expert_idx, int64_t n, int64_t slots, int64_t num_experts, GroupLayout g,
                         int32_t* block_counts, int32_t* sorted_rows, int32_t* row_sorted_pos) {
  extern __shared__ int32_t shared_cursor[];
  int32_t* own = block_counts + blockIdx.x * g.keys;
  int32_t* cursor = g.shared_histogram ? shared_cursor : own;
  if (g.shared_histogram)
    for (int64_t key = threadIdx.x; key < g.keys; key += blockDim.x) cursor[key] = own[key];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const int64_t begin = blockIdx.x * g.rows_per_block, end = begin + g.rows_per_block < n ? begin + g.rows_per_block : n;
  for (int64_t base = begin; base < end; base += blockDim.x) {
    const int64_t row = base + threadIdx.x;
    const bool valid = row < end;
    const int32_t key = valid ? row_key(expert_idx, row, slots, num_experts) : -1;
    // Warps in order; within a warp, lanes with one key take consecutive places in lane order.
    for (int w = 0; w < num_warps; ++w) {
      if (warp == w) {
        const unsigned active = __ballot_sync(0xffffffffu, valid);
        if (valid) {
          const unsigned peers = __match_any_sync(active, key);
          const int leader = __ffs(peers) - 1;
          const int rank = __popc(peers & ((1u << lane) - 1u));
          int32_t start = 0;
          if (lane == leader) {
            start = cursor[key];
            cursor[key] = start + __popc(peers);
          }
          start = __shfl_sync(peers, start, leader);
          sorted_rows[start + rank] = static_cast<int32_t>(row);
          if (row_sorted_pos != nullptr) row_sorted_pos[row] = start + rank;
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace

int64_t group_workspace_size(int64_t n, int64_t num_keys) {
  const GroupLayout g = group_layout(n, num_keys);
  return g.blocks * g.keys + 1;  // block counts, ticket
}

cudaError_t group_by_expert_cuda(const int64_t* expert_idx, int64_t n, int64_t slots, int64_t num_experts,
                                 int32_t* counts, int32_t* offsets, int32_t* sorted_rows, int32_t* row_sorted_pos,
                                 int32_t* workspace, cudaStream_t stream) {
  const int64_t num_keys = slots * num_experts;
  if (n == 0) {
    cudaError_t err = cudaMemsetAsync(offsets, 0, (num_keys + 1) * sizeof(int32_t), stream);
    if (err == cudaSuccess && counts != nullptr) err = cudaMemsetAsync(counts, 0, num_keys * sizeof(int32_t), stream);
    return err;
  }
  const GroupLayout g = group_layout(n, num_keys);
  int32_t* block_counts = workspace;
  unsigned* ticket = reinterpret_cast<unsigned*>(workspace + g.blocks * g.keys);
  cudaError_t err = cudaMemsetAsync(ticket, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  const size_t shared = g.shared_histogram ? g.keys * sizeof(int32_t) : 0;
  const int blocks = static_cast<int>(g.blocks);
  group_count_kernel<<<blocks, kGroupThreads, shared, stream>>>(expert_idx, n, slots, num_experts, g, block_counts,
                                                                ticket, counts, offsets);
  group_scatter_kernel<<<blocks, kGroupThreads, shared, stream>>>(expert_idx, n, slots, num_experts, g, block_counts,
                                                                  sorted_rows, row_sorted_pos);
  return cudaGetLastError();
}

}  // namespace smoe_fast

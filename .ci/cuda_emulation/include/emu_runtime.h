// CPU emulation of the CUDA subset used by smoe_fast's kernels: one std::thread per CUDA thread,
// blocks run one after another, __syncthreads = std::barrier, warp intrinsics by exchange.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#define __CUDACC__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n)

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 1, cudaDevAttrMultiProcessorCount = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 1 };
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {} };
struct uint3_ { unsigned x = 0, y = 0, z = 0; };

namespace emu {
inline thread_local uint3_ tl_thread;
inline uint3_ g_block;
inline dim3 g_block_dim, g_grid_dim;
inline std::vector<unsigned char> g_dynamic_shared;
inline std::barrier<>* g_barrier = nullptr;
inline int g_max_shared = 101376, g_num_sms = 3;
inline int64_t g_launches = 0;

inline unsigned char* dynamic_shared() { return g_dynamic_shared.data(); }
inline void syncthreads() { g_barrier->arrive_and_wait(); }

struct WarpState {
  std::mutex m;
  std::condition_variable cv;
  struct Round { int arrived = 0, left = 0; bool done = false; uint64_t vals[32]; };
  std::map<unsigned, Round> rounds;
};
inline std::vector<WarpState>* g_warps = nullptr;

// All lanes of `mask` call this; each gets every lane's value.
inline void exchange(unsigned mask, uint64_t v, uint64_t out[32]) {
  const int lane = tl_thread.x % 32;
  if (!(mask >> lane & 1u)) { fprintf(stderr, "lane %d not in mask %x\n", lane, mask); abort(); }
  WarpState& w = (*g_warps)[tl_thread.x / 32];
  std::unique_lock<std::mutex> lock(w.m);
  w.cv.wait(lock, [&] { auto it = w.rounds.find(mask); return it == w.rounds.end() || !it->second.done; });
  auto& r = w.rounds[mask];
  r.vals[lane] = v;
  const int need = __builtin_popcount(mask);
  if (++r.arrived == need) { r.done = true; r.left = need; w.cv.notify_all(); }
  else w.cv.wait(lock, [&] { return w.rounds[mask].done; });
  auto& rr = w.rounds[mask];
  std::memcpy(out, rr.vals, sizeof(rr.vals));
  if (--rr.left == 0) { w.rounds.erase(mask); w.cv.notify_all(); }
}

template <typename F>
cudaError_t launch(dim3 grid, dim3 block, size_t shared, cudaStream_t, F&& body) {
  ++g_launches;
  if (static_cast<int>(shared) > g_max_shared) { fprintf(stderr, "shared %zu > max %d\n", shared, g_max_shared); return 1; }
  g_grid_dim = grid; g_block_dim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      g_block.x = bx; g_block.y = by;
      g_dynamic_shared.assign(shared + 16, 0xFF);  // garbage-ish (NaN bytes for floats)
      std::barrier<> bar(block.x);
      g_barrier = &bar;
      std::vector<WarpState> warps((block.x + 31) / 32);
      g_warps = &warps;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t) threads.emplace_back([&, t] { tl_thread.x = t; body(); });
      for (auto& th : threads) th.join();
    }
  return cudaSuccess;
}
}  // namespace emu

#define threadIdx (emu::tl_thread)
#define blockIdx (emu::g_block)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)
#define __syncthreads() emu::syncthreads()
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T> T __ldcg(const T* p) { return std::atomic_ref<T>(*const_cast<T*>(p)).load(); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned __ballot_sync(unsigned mask, bool pred) {
  uint64_t vals[32]; emu::exchange(mask, pred, vals);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) if ((mask >> l & 1u) && vals[l]) bits |= 1u << l;
  return bits;
}
template <typename T> unsigned __match_any_sync(unsigned mask, T key) {
  uint64_t v = 0; std::memcpy(&v, &key, sizeof(T));
  uint64_t vals[32]; emu::exchange(mask, v, vals);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) if ((mask >> l & 1u) && vals[l] == v) bits |= 1u << l;
  return bits;
}
template <typename T> T __shfl_sync(unsigned mask, T value, int src) {
  uint64_t v = 0; std::memcpy(&v, &value, sizeof(T));
  uint64_t vals[32]; emu::exchange(mask, v, vals);
  T out; std::memcpy(&out, &vals[src], sizeof(T)); return out;
}
template <typename T> T __shfl_up_sync(unsigned mask, T value, int delta) {
  uint64_t v = 0; std::memcpy(&v, &value, sizeof(T));
  uint64_t vals[32]; emu::exchange(mask, v, vals);
  const int lane = threadIdx.x % 32;
  if (lane < delta) return value;
  T out; std::memcpy(&out, &vals[lane - delta], sizeof(T)); return out;
}
inline int __ffs(unsigned x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
using std::min;
using std::max;
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
template <typename K> cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  const char* shared = std::getenv("EMU_MAX_SHARED"); const char* sms = std::getenv("EMU_SMS");
  emu::g_max_shared = shared ? std::atoi(shared) : 101376;
  emu::g_num_sms = sms ? std::atoi(sms) : 3;
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::g_max_shared : emu::g_num_sms; return cudaSuccess;
}

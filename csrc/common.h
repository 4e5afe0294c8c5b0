// Torch-side helpers shared by the CPU implementation and the CUDA glue: argument checks that name
// the argument, decoder-kind parsing and weight checks, and output allocation.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include "decoder_plan.h"

#define CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), " like z, got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                        \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_FLOAT(x)                                                                        \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble,           \
              #x " must be float32 or float64, got ", (x).scalar_type())
#define CHECK_INDEX(x)                                                                        \
  TORCH_CHECK((x).scalar_type() == at::kLong || (x).scalar_type() == at::kInt,               \
              #x " must be an int64 or int32 index tensor, got ", (x).scalar_type())
#define CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " must have the dtype of " #y " (", (y).scalar_type(), "), got ", (x).scalar_type())

namespace smoe_fast {

inline DecoderKind parse_kind(c10::string_view kind) {
  if (kind == "lite") return DecoderKind::kLite;
  if (kind == "medium") return DecoderKind::kMedium;
  if (kind == "mlp") return DecoderKind::kMlp;
  TORCH_CHECK(false, "unknown decoder kind '", std::string(kind), "'; expected 'lite', 'medium' or 'mlp'");
}

// The decoder plan for `kind`, after checking the (weight, bias) pairs against it; returns E in *num_experts.
// The weights share one dtype: z's, or with fp32_masters_ok (the CUDA kernels) fp32 for an fp16 / bf16 z.
inline DecoderPlan checked_plan(c10::string_view kind, const at::Tensor& z, at::TensorList weights, int64_t* num_experts,
                                bool fp32_masters_ok = false) {
  const DecoderKind decoder = parse_kind(kind);
  TORCH_CHECK(!weights.empty(), "weights must hold the (weight, bias) tensors of every layer, got none");
  const at::ScalarType z_type = z.scalar_type(), w_type = weights[0].scalar_type();
  const bool half_z = z_type == at::kHalf || z_type == at::kBFloat16;
  TORCH_CHECK(w_type == z_type || (fp32_masters_ok && half_z && w_type == at::kFloat), "the expert weights must have z's dtype (",
              z_type, fp32_masters_ok && half_z ? ") or be float32" : ")", ", got ", w_type);
  const int hidden = decoder == DecoderKind::kMlp && weights[0].dim() == 3 ? static_cast<int>(weights[0].size(1)) : 1;
  const DecoderPlan plan = make_plan(decoder, static_cast<int>(z.size(1)), hidden);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 2 * plan.num_layers, "decoder '", std::string(kind), "' takes ",
              2 * plan.num_layers, " weight tensors (weight, bias per layer), got ", weights.size());
  const int64_t E = weights[0].size(0);
  TORCH_CHECK(E >= 1, "weights[0] must have a leading number of experts >= 1, got shape ", weights[0].sizes());
  for (int i = 0; i < plan.num_layers; ++i) {
    const Layer& layer = plan.layers[i];
    const at::Tensor& w = weights[2 * i];
    const at::Tensor& b = weights[2 * i + 1];
    TORCH_CHECK(w.dim() >= 1 && w.size(0) == E && w.numel() == E * layer.weight_size(), "weights[", 2 * i,
                "] must hold ", E, " experts x ", layer.weight_size(), " values for layer ", i, ", got shape ", w.sizes());
    TORCH_CHECK(b.dim() >= 1 && b.size(0) == E && b.numel() == E * layer.bias_size(), "weights[", 2 * i + 1,
                "] must hold ", E, " experts x ", layer.bias_size(), " bias values for layer ", i, ", got shape ", b.sizes());
    TORCH_CHECK(w.scalar_type() == w_type && b.scalar_type() == w_type, "every expert weight must have the dtype of weights[0] (",
                w_type, "), got ", w.scalar_type(), " and ", b.scalar_type(), " for layer ", i);
    CHECK_DEVICE(w, z.device());
    CHECK_DEVICE(b, z.device());
  }
  *num_experts = E;
  return plan;
}

// CPU outputs of 2 MiB and more live on transparent huge pages (2 MiB-aligned, madvise'd; torch's
// THP_MEM_ALLOC_ENABLE does the same for all its allocations), and a freed one is kept for the next
// output of its size, as torch's CUDA caching allocator keeps device memory. The ops write an output
// once, right after allocating it, so its first touch is part of every call: with 4 KiB pages the
// hard lite output at B = 65,536 (205 MB) took ~50,000 page faults, 74 ms to allocate and fill on 2
// threads, against 28 ms on fresh huge pages (the kernel zeroes each page: 8-11% of a one-thread hard
// lite forward in perf) and 15 ms to refill a reused buffer. The cache holds at most
// SMOE_FAST_CPU_OUTPUT_CACHE_MB (default 512; 0 keeps nothing), oldest freed block evicted first.
class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;

  static HugePageAllocator& instance() {
    static HugePageAllocator* allocator = new HugePageAllocator();  // never destroyed: outputs may outlive statics
    return *allocator;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) return {nullptr, nullptr, &release, cpu};
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = take_cached(size);
    if (data == nullptr) {
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&data, kHugePage, size) == 0, "smoe_fast: could not allocate ",
                       nbytes, " bytes for a CPU output (2 MiB-aligned); free memory or use a smaller batch");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(data, size, MADV_HUGEPAGE);  // advice only: without THP the pages are ordinary ones
#endif
    }
    std::lock_guard<std::mutex> lock(mutex_);
    live_[data] = size;
    return {data, data, &release, cpu};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  HugePageAllocator() {
    const char* mb = std::getenv("SMOE_FAST_CPU_OUTPUT_CACHE_MB");
    cache_limit_ = (mb != nullptr ? static_cast<size_t>(std::max(0L, std::atol(mb))) : size_t{512}) << 20;
  }

  void* take_cached(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = cached_.begin(); it != cached_.end(); ++it) {
      if (it->second != size) continue;
      void* data = it->first;
      cached_bytes_ -= size;
      cached_.erase(it);
      return data;
    }
    return nullptr;
  }

  static void release(void* data) {
    if (data == nullptr) return;
    HugePageAllocator& self = instance();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      const auto live = self.live_.find(data);
      const size_t size = live->second;
      self.live_.erase(live);
      if (size > self.cache_limit_) {
        evicted.push_back(data);
      } else {
        self.cached_.emplace_back(data, size);
        self.cached_bytes_ += size;
        while (self.cached_bytes_ > self.cache_limit_) {
          evicted.push_back(self.cached_.front().first);
          self.cached_bytes_ -= self.cached_.front().second;
          self.cached_.pop_front();
        }
      }
    }
    for (void* p : evicted) std::free(p);
  }

  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;       // block -> its size, rounded to huge pages
  std::deque<std::pair<void*, size_t>> cached_;  // freed blocks, oldest first
  size_t cached_bytes_ = 0, cache_limit_ = 0;
};

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (!options.device().is_cpu() || nbytes < static_cast<int64_t>(HugePageAllocator::kHugePage)) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &HugePageAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

// Kernel outputs, NaN-filled when SMOE_FAST_POISON_OUTPUTS=1 (as smoe_fast.contract.alloc_output) so
// that tests catch unwritten elements.
inline at::Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = empty_output(sizes, options);
  const char* poison = std::getenv("SMOE_FAST_POISON_OUTPUTS");
  if (poison != nullptr && std::string(poison) == "1") {
    if (at::isFloatingType(options.dtype().toScalarType())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-(int64_t{1} << 31) + 1);
    }
  }
  return out;
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

}  // namespace smoe_fast

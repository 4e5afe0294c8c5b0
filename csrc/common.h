// Torch-side helpers shared by the CPU implementation and the CUDA glue: argument checks that name
// the argument, decoder-kind parsing and weight checks, and output allocation.
#pragma once

#include <cstdlib>
#include <limits>
#include <string>

#include <ATen/ATen.h>

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
inline DecoderPlan checked_plan(c10::string_view kind, const at::Tensor& z, at::TensorList weights, int64_t* num_experts) {
  const DecoderKind decoder = parse_kind(kind);
  TORCH_CHECK(!weights.empty(), "weights must hold the (weight, bias) tensors of every layer, got none");
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
    CHECK_SAME_DTYPE(w, z);
    CHECK_SAME_DTYPE(b, z);
    CHECK_DEVICE(w, z.device());
    CHECK_DEVICE(b, z.device());
  }
  *num_experts = E;
  return plan;
}

// Kernel outputs, NaN-filled when SMOE_FAST_POISON_OUTPUTS=1 (as smoe_fast.contract.alloc_output) so
// that tests catch unwritten elements.
inline at::Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const char* poison = std::getenv("SMOE_FAST_POISON_OUTPUTS");
  if (poison != nullptr && std::string(poison) == "1") {
    if (at::isFloatingType(options.dtype().toScalarType())) {
      return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
    }
    return at::full(sizes, -(int64_t{1} << 31) + 1, options);
  }
  return at::empty(sizes, options);
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

}  // namespace smoe_fast

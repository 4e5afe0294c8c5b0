// CUDA implementations of the smoe_fast ops: tensor checks, device guard, current stream, then the
// raw-pointer launchers of experts_cuda.cu. Compiled only when torch has CUDA (smoe_fast/extension.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "experts_cuda.h"

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got one on ", (x).device())
#define CHECK_LAUNCH(err) TORCH_CHECK((err) == cudaSuccess, "smoe_fast CUDA launch failed: ", cudaGetErrorString(err))

namespace smoe_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_by_expert_cuda_op(const at::Tensor& expert_idx_in,
                                                                                   int64_t num_experts) {
  CHECK_CUDA(expert_idx_in);
  CHECK_INDEX(expert_idx_in);
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  const c10::cuda::CUDAGuard guard(expert_idx_in.device());
  const at::Tensor expert_idx = expert_idx_in.to(at::kLong).contiguous();
  const int64_t n = expert_idx.numel();
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "expert_idx has ", n, " entries; at most 2^31 - 2 fit int32 routing");
  const auto int_options = expert_idx.options().dtype(at::kInt);
  at::Tensor counts = alloc_output({num_experts}, int_options);
  at::Tensor offsets = alloc_output({num_experts + 1}, int_options);
  at::Tensor sorted_token_idx = alloc_output({n}, int_options);
  at::Tensor token_sorted_pos = alloc_output({n}, int_options);
  at::Tensor cursor = at::empty({num_experts}, int_options);
  CHECK_LAUNCH(group_by_expert_cuda(expert_idx.data_ptr<int64_t>(), n, num_experts, counts.data_ptr<int32_t>(),
                                    offsets.data_ptr<int32_t>(), sorted_token_idx.data_ptr<int32_t>(),
                                    token_sorted_pos.data_ptr<int32_t>(), cursor.data_ptr<int32_t>(),
                                    c10::cuda::getCurrentCUDAStream()));
  return {counts, offsets, sorted_token_idx, token_sorted_pos};
}

// Common set-up: contiguous inputs, the plan, pointers; idx undefined for soft, gates undefined for hard.
template <typename scalar_t>
ExpertsCudaArgs<scalar_t> make_args(const DecoderPlan& plan, const at::Tensor& z, const at::Tensor& idx,
                                    const at::Tensor& gates, int64_t slots, int64_t num_experts,
                                    const std::vector<at::Tensor>& weights, bool backward, at::Tensor& workspace) {
  ExpertsCudaArgs<scalar_t> args{};
  args.plan = plan;
  args.num_tokens = z.size(0);
  args.latent = z.size(1);
  args.slots = slots;
  args.num_experts = num_experts;
  args.z = z.data_ptr<scalar_t>();
  args.expert_idx = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  args.gates = gates.defined() ? gates.data_ptr<scalar_t>() : nullptr;
  for (int i = 0; i < plan.num_layers; ++i) {
    args.weight[i] = weights[2 * i].data_ptr<scalar_t>();
    args.bias[i] = weights[2 * i + 1].data_ptr<scalar_t>();
  }
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, z.get_device()));
  const int64_t max_blocks = 4 * static_cast<int64_t>(num_sms);  // a few blocks per SM; each loops over tokens
  args.grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(args.num_tokens, max_blocks)));
  args.workspace_per_block = experts_workspace_per_block(plan, backward);
  workspace = at::empty({args.grid * args.workspace_per_block}, z.options());
  args.workspace = workspace.data_ptr<scalar_t>();
  return args;
}

struct Prepared {
  DecoderPlan plan;
  int64_t num_experts, slots;
  at::Tensor z, idx, gates;
  std::vector<at::Tensor> weights;
};

Prepared prepare(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& gates, at::TensorList weights,
                 c10::string_view kind, bool soft) {
  CHECK_CUDA(z);
  CHECK_FLOAT(z);
  CHECK_DIM(z, 2);
  Prepared p;
  p.plan = checked_plan(kind, z, weights, &p.num_experts);
  p.z = z.contiguous();
  p.weights = contiguous_all(weights);
  if (idx.defined()) {
    CHECK_INDEX(idx);
    CHECK_DEVICE(idx, z.device());
    TORCH_CHECK(idx.size(0) == z.size(0), "expert indices must have one row per token (", z.size(0), "), got ", idx.size(0));
    p.idx = idx.to(at::kLong).contiguous();
  }
  p.slots = soft ? p.num_experts : (idx.dim() == 2 ? idx.size(1) : 1);
  if (gates.defined()) {
    CHECK_DEVICE(gates, z.device());
    CHECK_SAME_DTYPE(gates, z);
    CHECK_SHAPE(gates, z.size(0), p.slots);
    p.gates = gates.contiguous();
  }
  return p;
}

at::Tensor experts_fwd_cuda_op(const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& gates_in,
                               at::TensorList weights_in, c10::string_view kind, bool soft) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  Prepared p = prepare(z_in, idx_in, gates_in, weights_in, kind, soft);
  at::Tensor out = alloc_output({p.z.size(0), 1, 28, 28}, p.z.options());
  AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "cpp_experts_fwd_cuda", [&] {
    at::Tensor workspace;
    auto args = make_args<scalar_t>(p.plan, p.z, p.idx, p.gates, p.slots, p.num_experts, p.weights, false, workspace);
    args.out = out.data_ptr<scalar_t>();
    CHECK_LAUNCH(experts_fwd_cuda(args, c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> experts_bwd_cuda_op(
    const at::Tensor& grad_out_in, const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& gates_in,
    at::TensorList weights_in, c10::string_view kind, bool soft) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  Prepared p = prepare(z_in, idx_in, gates_in, weights_in, kind, soft);
  CHECK_DEVICE(grad_out_in, z_in.device());
  CHECK_SAME_DTYPE(grad_out_in, z_in);
  TORCH_CHECK(grad_out_in.numel() == p.z.size(0) * kImagePixels, "grad_out must have shape (", p.z.size(0),
              ", 1, 28, 28), got ", grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_z = alloc_output(p.z.sizes(), p.z.options());
  at::Tensor grad_gates = alloc_output(p.gates.sizes(), p.gates.options());
  std::vector<at::Tensor> grad_weights;
  for (const auto& w : p.weights) grad_weights.push_back(at::zeros_like(w));
  AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "cpp_experts_bwd_cuda", [&] {
    at::Tensor workspace;
    auto args = make_args<scalar_t>(p.plan, p.z, p.idx, p.gates, p.slots, p.num_experts, p.weights, true, workspace);
    args.grad_out = grad_out.data_ptr<scalar_t>();
    args.grad_z = grad_z.data_ptr<scalar_t>();
    args.grad_gates = grad_gates.data_ptr<scalar_t>();
    for (int i = 0; i < p.plan.num_layers; ++i) {
      args.grad_weight[i] = grad_weights[2 * i].data_ptr<scalar_t>();
      args.grad_bias[i] = grad_weights[2 * i + 1].data_ptr<scalar_t>();
    }
    CHECK_LAUNCH(experts_bwd_cuda(args, c10::cuda::getCurrentCUDAStream()));
  });
  return {grad_z, grad_gates, grad_weights};
}

at::Tensor experts_hard_cuda(const at::Tensor& z, const at::Tensor& expert_idx, at::TensorList weights,
                             c10::string_view kind) {
  CHECK_DIM(expert_idx, 1);
  return experts_fwd_cuda_op(z, expert_idx, at::Tensor(), weights, kind, false);
}

at::Tensor experts_topk_fwd_cuda(const at::Tensor& z, const at::Tensor& topk_idx, const at::Tensor& topk_gates,
                                 at::TensorList weights, c10::string_view kind) {
  CHECK_DIM(topk_idx, 2);
  return experts_fwd_cuda_op(z, topk_idx, topk_gates, weights, kind, false);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> experts_topk_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& topk_idx, const at::Tensor& topk_gates,
    at::TensorList weights, c10::string_view kind) {
  CHECK_DIM(topk_idx, 2);
  return experts_bwd_cuda_op(grad_out, z, topk_idx, topk_gates, weights, kind, false);
}

at::Tensor experts_soft_fwd_cuda(const at::Tensor& z, const at::Tensor& gates, at::TensorList weights,
                                 c10::string_view kind) {
  return experts_fwd_cuda_op(z, at::Tensor(), gates, weights, kind, true);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> experts_soft_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& gates, at::TensorList weights,
    c10::string_view kind) {
  return experts_bwd_cuda_op(grad_out, z, at::Tensor(), gates, weights, kind, true);
}

}  // namespace
}  // namespace smoe_fast

TORCH_LIBRARY_IMPL(smoe_fast, CUDA, m) {
  m.impl("cpp_group_by_expert", &smoe_fast::group_by_expert_cuda_op);
  m.impl("cpp_experts_hard", &smoe_fast::experts_hard_cuda);
  m.impl("cpp_experts_topk_fwd", &smoe_fast::experts_topk_fwd_cuda);
  m.impl("cpp_experts_topk_bwd", &smoe_fast::experts_topk_bwd_cuda);
  m.impl("cpp_experts_soft_fwd", &smoe_fast::experts_soft_fwd_cuda);
  m.impl("cpp_experts_soft_bwd", &smoe_fast::experts_soft_bwd_cuda);
}

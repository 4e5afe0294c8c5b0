// CUDA implementations of the smoe_fast ops: tensor checks, device guard, current stream, then the
// raw-pointer launchers of experts_cuda.h (grouping_cuda.cu, experts_cuda.cu, wgrad_reduce_cuda.cu).
// Compiled only when torch has CUDA (smoe_fast/extension.py). Same schemas and checks as the CPU ops,
// with two differences (experts_cuda.h): fp16 / bf16 z (with fp32 or same-dtype weights) is taken
// as is, x_hat and every gradient come back in their input's dtype, accumulated in fp32 (tensor-core
// convolutions in z's dtype, or TF32 when torch allows it: experts_cuda.h "Precision"); out-of-range
// expert indices give NaN rows here (the CPU raises).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <type_traits>

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
  TORCH_CHECK(num_experts < std::numeric_limits<int32_t>::max(), "num_experts must be < 2^31 - 1, got ", num_experts);
  const c10::cuda::CUDAGuard guard(expert_idx_in.device());
  const at::Tensor expert_idx = expert_idx_in.to(at::kLong).contiguous();
  const int64_t n = expert_idx.numel();
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "expert_idx has ", n, " entries; at most 2^31 - 2 fit int32 routing");
  const auto int_options = expert_idx.options().dtype(at::kInt);
  at::Tensor counts = alloc_output({num_experts}, int_options);
  at::Tensor offsets = alloc_output({num_experts + 1}, int_options);
  at::Tensor sorted_token_idx = alloc_output({n}, int_options);
  at::Tensor token_sorted_pos = alloc_output({n}, int_options);
  at::Tensor workspace = at::empty({group_workspace_size(n, num_experts)}, int_options);
  CHECK_LAUNCH(group_by_expert_cuda(expert_idx.data_ptr<int64_t>(), n, 1, num_experts, counts.data_ptr<int32_t>(),
                                    offsets.data_ptr<int32_t>(), sorted_token_idx.data_ptr<int32_t>(),
                                    token_sorted_pos.data_ptr<int32_t>(), workspace.data_ptr<int32_t>(),
                                    c10::cuda::getCurrentCUDAStream()));
  return {counts, offsets, sorted_token_idx, token_sorted_pos};
}

struct Prepared {
  DecoderPlan plan;
  int64_t num_experts, slots;
  at::ScalarType acc_type;  // the kernels' compute type: double for fp64, else float (experts_cuda.h)
  at::Tensor z, idx, gates;  // z in its own dtype; gates in acc_type
  std::vector<at::Tensor> weights;
};

Prepared prepare(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& gates, at::TensorList weights,
                 c10::string_view kind, bool soft) {
  CHECK_CUDA(z);
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble || z.scalar_type() == at::kHalf ||
                  z.scalar_type() == at::kBFloat16,
              "z must be float32, float64, float16 or bfloat16, got ", z.scalar_type());
  CHECK_DIM(z, 2);
  Prepared p;
  p.plan = checked_plan(kind, z, weights, &p.num_experts, /*fp32_masters_ok=*/true);
  p.acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.z = z.contiguous();
  p.weights = contiguous_all(weights);
  if (idx.defined()) {
    CHECK_INDEX(idx);
    CHECK_DEVICE(idx, z.device());
    TORCH_CHECK(idx.size(0) == z.size(0), "expert indices must have one row per token (", z.size(0), "), got ", idx.size(0));
    p.idx = idx.to(at::kLong).contiguous();
  }
  p.slots = soft ? p.num_experts : (idx.dim() == 2 ? idx.size(1) : 1);
  TORCH_CHECK(p.z.size(0) * p.slots < std::numeric_limits<int32_t>::max() &&
                  p.slots * p.num_experts < std::numeric_limits<int32_t>::max(),
              "B * K (", p.z.size(0) * p.slots, ") and K * E (", p.slots * p.num_experts, ") must be < 2^31 - 1 (int32 routing)");
  for (int i = 0; i < p.plan.num_layers; ++i)
    TORCH_CHECK(p.plan.layers[i].is_conv || p.plan.layers[i].in_c <= 4095, "the CUDA kernels take linear layers with at most ",
                "4095 inputs (they stage whole weight rows), got ", p.plan.layers[i].in_c);
  if (gates.defined()) {
    CHECK_DEVICE(gates, z.device());
    TORCH_CHECK(at::isFloatingType(gates.scalar_type()), "gates must be a floating-point tensor, got ", gates.scalar_type());
    CHECK_SHAPE(gates, z.size(0), p.slots);
    p.gates = gates.to(p.acc_type).contiguous();
  }
  return p;
}

// Runs f(Args{}) with the ExpertsCudaArgs of z's and the weights' dtypes (SMOE_FAST_FOR_EACH_PRECISION).
template <typename F>
void dispatch_precision(const Prepared& p, F&& f) {
  const at::ScalarType w_type = p.weights[0].scalar_type();
  switch (p.z.scalar_type()) {
    case at::kDouble: return f(ExpertsCudaArgs<double>{});
    case at::kFloat: return f(ExpertsCudaArgs<float>{});
    case at::kHalf:
      return w_type == at::kHalf ? f(ExpertsCudaArgs<float, __half, __half>{}) : f(ExpertsCudaArgs<float, __half, float>{});
    case at::kBFloat16:
      return w_type == at::kBFloat16 ? f(ExpertsCudaArgs<float, __nv_bfloat16, __nv_bfloat16>{})
                                     : f(ExpertsCudaArgs<float, __nv_bfloat16, float>{});
    default: TORCH_CHECK(false, "unsupported dtype ", p.z.scalar_type());
  }
}

// A tensor's data as the kernels' element type (at::Half / at::BFloat16 have __half's / __nv_bfloat16's layout).
template <typename T>
T* data_as(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Whether torch allows TF32 matmuls, read as torch's own cuBLAS calls read it: the fp32_precision
// API (allowTF32CuBLAS() raises once a user has set that API, a "mix of legacy and new APIs").
bool torch_allows_tf32_matmul() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return !at::NoTF32Guard::should_disable_tf32() &&
         at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
             at::Float32Precision::TF32;
#else
  return !at::NoTF32Guard::should_disable_tf32() && at::globalContext().allowTF32CuBLAS();
#endif
}

// experts_cuda.h "Precision": tensor cores on sm_80 and later, for half z always, for fp32 z when
// torch allows TF32 matmuls, never for fp64.
template <typename Args>
bool uses_tensor_cores(int device) {
  using in_t = typename Args::input_type;
  if (std::is_same<typename Args::acc_type, double>::value) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return false;
  return !std::is_same<in_t, float>::value || torch_allows_tf32_matmul();
}

// Everything a phase launch needs, with its scratch tensors: the (slot, expert) grouping (not for soft),
// the activation workspace (when the activations do not fit shared memory) and the partial slots.
template <typename Args>
struct Launch {
  using scalar_t = typename Args::acc_type;
  Args args{};
  at::Tensor sorted_rows, key_offsets, workspace, partials;

  Launch(const Prepared& p, bool backward, cudaStream_t stream) {
    args.plan = p.plan;
    args.num_tokens = p.z.size(0);
    args.latent = p.z.size(1);
    args.slots = p.slots;
    args.num_experts = p.num_experts;
    args.z = data_as<const typename Args::input_type>(p.z);
    args.gates = p.gates.defined() ? data_as<const scalar_t>(p.gates) : nullptr;
    for (int i = 0; i < p.plan.num_layers; ++i) {
      args.weight[i] = data_as<const typename Args::weight_type>(p.weights[2 * i]);
      args.bias[i] = data_as<const typename Args::weight_type>(p.weights[2 * i + 1]);
    }
    const auto int_options = p.z.options().dtype(at::kInt);
    if (p.idx.defined()) {
      const int64_t rows = args.num_tokens * args.slots, keys = args.slots * args.num_experts;
      args.expert_idx = p.idx.data_ptr<int64_t>();
      sorted_rows = at::empty({rows}, int_options);
      key_offsets = at::empty({keys + 1}, int_options);
      at::Tensor group_workspace = at::empty({group_workspace_size(rows, keys)}, int_options);
      CHECK_LAUNCH(group_by_expert_cuda(args.expert_idx, rows, args.slots, args.num_experts, nullptr,
                                        key_offsets.data_ptr<int32_t>(), sorted_rows.data_ptr<int32_t>(), nullptr,
                                        group_workspace.data_ptr<int32_t>(), stream));
      args.sorted_rows = sorted_rows.data_ptr<int32_t>();
      args.key_offsets = key_offsets.data_ptr<int32_t>();
    }
    const int device = p.z.get_device();
    int max_shared = 0, num_sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
    args.tensor_cores = uses_tensor_cores<Args>(device);
    const auto acc_options = p.z.options().dtype(p.acc_type);
    const int64_t workspace_size = plan_experts_launch(args, backward, max_shared, num_sms);
    if (workspace_size > 0) {
      workspace = at::empty({workspace_size}, acc_options);
      args.workspace = data_as<scalar_t>(workspace);
    }
    if (backward) {
      partials = at::empty({args.num_chunks * args.params}, acc_options);
      args.partials = data_as<scalar_t>(partials);
    }
  }
};

// The kernels accumulate every output in the compute type; the caller gets it in `like`'s dtype.
at::Tensor in_dtype_of(const at::Tensor& t, const at::Tensor& like) {
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

at::Tensor experts_fwd_cuda_op(const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& gates_in,
                               at::TensorList weights_in, c10::string_view kind, bool soft) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  Prepared p = prepare(z_in, idx_in, gates_in, weights_in, kind, soft);
  at::Tensor out = alloc_output({p.z.size(0), 1, 28, 28}, p.z.options().dtype(p.acc_type));
  if (p.z.size(0) == 0) return in_dtype_of(out, z_in);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_precision(p, [&](auto tag) {
    using Args = decltype(tag);
    Launch<Args> launch(p, false, stream);
    launch.args.out = data_as<typename Args::acc_type>(out);
    for (int64_t k = 0; k < p.slots; ++k) {  // one launch per slot: outputs accumulate in slot order
      launch.args.phase = k;
      CHECK_LAUNCH(experts_fwd_cuda(launch.args, stream));
    }
    CHECK_LAUNCH(experts_mark_invalid_cuda(launch.args, false, stream));
  });
  return in_dtype_of(out, z_in);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> experts_bwd_cuda_op(
    const at::Tensor& grad_out_in, const at::Tensor& z_in, const at::Tensor& idx_in, const at::Tensor& gates_in,
    at::TensorList weights_in, c10::string_view kind, bool soft) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  Prepared p = prepare(z_in, idx_in, gates_in, weights_in, kind, soft);
  CHECK_DEVICE(grad_out_in, z_in.device());
  TORCH_CHECK(grad_out_in.numel() == p.z.size(0) * kImagePixels, "grad_out must have shape (", p.z.size(0),
              ", 1, 28, 28), got ", grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.to(p.z.scalar_type()).contiguous();  // x_hat's dtype is z's
  const auto acc_options = p.z.options().dtype(p.acc_type);
  at::Tensor grad_z = alloc_output(p.z.sizes(), acc_options);
  at::Tensor grad_gates = alloc_output(p.gates.sizes(), acc_options);
  std::vector<at::Tensor> grad_weights;
  for (const auto& w : p.weights) grad_weights.push_back(at::zeros(w.sizes(), acc_options));
  const auto results = [&] {
    std::vector<at::Tensor> weight_grads;
    for (size_t i = 0; i < grad_weights.size(); ++i) weight_grads.push_back(in_dtype_of(grad_weights[i], p.weights[i]));
    return std::make_tuple(in_dtype_of(grad_z, z_in), in_dtype_of(grad_gates, gates_in), weight_grads);
  };
  if (p.z.size(0) == 0) return results();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_precision(p, [&](auto tag) {
    using Args = decltype(tag);
    using scalar_t = typename Args::acc_type;
    Launch<Args> launch(p, true, stream);
    auto& args = launch.args;
    args.grad_out = data_as<const typename Args::input_type>(grad_out);
    args.grad_z = data_as<scalar_t>(grad_z);
    args.grad_gates = data_as<scalar_t>(grad_gates);
    for (int i = 0; i < p.plan.num_layers; ++i) {
      args.grad_weight[i] = data_as<scalar_t>(grad_weights[2 * i]);
      args.grad_bias[i] = data_as<scalar_t>(grad_weights[2 * i + 1]);
    }
    for (int64_t k = 0; k < p.slots; ++k) {  // per slot: the tiles, then the partial slots' segment sums
      args.phase = k;
      CHECK_LAUNCH(experts_bwd_cuda(args, stream));
      CHECK_LAUNCH(experts_wgrad_reduce_cuda(args, stream));
    }
    CHECK_LAUNCH(experts_mark_invalid_cuda(args, true, stream));
  });
  return results();
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

// Op schemas of the smoe_fast C++/CUDA extension: torch.ops.smoe_fast.cpp_*.
// Implementations per dispatch key: experts_cpu.cpp (CPU), experts_cuda_glue.cpp (CUDA, built only
// when torch has CUDA); fake (meta) implementations live in smoe_fast/extension.py.
// No op mutates its inputs: every output is freshly allocated.
#include <torch/library.h>

TORCH_LIBRARY(smoe_fast, m) {
  // Stable grouping of expert_idx [B] or [B,K] by expert: counts [E], offsets [E+1], sorted_token_idx, token_sorted_pos [B*K] (int32).
  m.def("cpp_group_by_expert(Tensor expert_idx, int num_experts) -> (Tensor expert_counts, Tensor expert_offsets, Tensor sorted_token_idx, Tensor token_sorted_pos)");
  // Hard-gated experts: x_hat[b] = D_{expert_idx[b]}(z[b]); z [B,L], expert_idx [B] -> [B,1,28,28].
  m.def("cpp_experts_hard(Tensor z, Tensor expert_idx, Tensor[] weights, str kind) -> Tensor");
  // Top-k experts forward: x_hat[b] = sum_k topk_gates[b,k] * D_{topk_idx[b,k]}(z[b]).
  m.def("cpp_experts_topk_fwd(Tensor z, Tensor topk_idx, Tensor topk_gates, Tensor[] weights, str kind) -> Tensor");
  // Top-k experts backward: grads of z [B,L], topk_gates [B,K] and every (weight, bias) tensor.
  m.def("cpp_experts_topk_bwd(Tensor grad_out, Tensor z, Tensor topk_idx, Tensor topk_gates, Tensor[] weights, str kind) -> (Tensor grad_z, Tensor grad_gates, Tensor[] grad_weights)");
  // Soft-gated experts forward: x_hat = sum_e gates[:,e] * D_e(z); gates [B,E].
  m.def("cpp_experts_soft_fwd(Tensor z, Tensor gates, Tensor[] weights, str kind) -> Tensor");
  // Soft-gated experts backward: grads of z [B,L], gates [B,E] and every (weight, bias) tensor.
  m.def("cpp_experts_soft_bwd(Tensor grad_out, Tensor z, Tensor gates, Tensor[] weights, str kind) -> (Tensor grad_z, Tensor grad_gates, Tensor[] grad_weights)");
}

// Decoder kinds as a short list of layers, shared by the CPU kernels and the CUDA kernels.
// Plain C++ (no torch, no CUDA headers) so that nvcc can compile it without torch.
//
// Every layer reads one activation and writes one: linear layers read a flat [in_c] vector, conv
// layers read [in_c, in_h, in_w] and (when up == 2) see it nearest-upsampled by 2 before a 3x3,
// padding-1 convolution. Weights come as (weight, bias) pairs in layer order:
//   lite:   fc [392,L], conv1 [16,8,3,3], conv2 [1,16,3,3]
//   medium: fc [1568,L], conv1 [64,32,3,3], conv2 [32,64,3,3], conv3 [1,32,3,3]
//   mlp:    fc1 [H,L], fc2 [784,H]
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SMOE_FAST_HOST_DEVICE __host__ __device__
#else
#define SMOE_FAST_HOST_DEVICE
#endif

namespace smoe_fast {

enum class Activation : int { kNone = 0, kRelu = 1, kElu = 2, kSigmoid = 3 };
enum class DecoderKind : int { kLite = 0, kMedium = 1, kMlp = 2 };

constexpr int kImagePixels = 784;
constexpr int kMaxLayers = 4;

struct Layer {
  bool is_conv;
  int in_c, in_h, in_w;    // input shape (linear: in_c features, in_h = in_w = 1)
  int out_c, out_h, out_w; // output shape (conv: in_h * up, in_w * up)
  int up;                  // nearest upsampling factor before a conv (1 or 2)
  Activation act;
  SMOE_FAST_HOST_DEVICE int in_size() const { return in_c * in_h * in_w; }
  SMOE_FAST_HOST_DEVICE int out_size() const { return out_c * out_h * out_w; }
  SMOE_FAST_HOST_DEVICE int weight_size() const { return is_conv ? out_c * in_c * 9 : out_size() * in_c; }
  SMOE_FAST_HOST_DEVICE int bias_size() const { return is_conv ? out_c : out_size(); }
};

struct DecoderPlan {
  int num_layers;
  Layer layers[kMaxLayers];
};

inline Layer linear_layer(int in_features, int out_c, int out_h, int out_w, Activation act) {
  return Layer{false, in_features, 1, 1, out_c, out_h, out_w, 1, act};
}

inline Layer conv_layer(int in_c, int in_h, int in_w, int out_c, int up, Activation act) {
  return Layer{true, in_c, in_h, in_w, out_c, in_h * up, in_w * up, up, act};
}

// The layers of one expert's decoder; hidden_dim only matters for kMlp.
inline DecoderPlan make_plan(DecoderKind kind, int latent_dim, int hidden_dim) {
  DecoderPlan plan{};
  if (kind == DecoderKind::kLite) {
    plan.num_layers = 3;
    plan.layers[0] = linear_layer(latent_dim, 8, 7, 7, Activation::kNone);
    plan.layers[1] = conv_layer(8, 7, 7, 16, 2, Activation::kElu);
    plan.layers[2] = conv_layer(16, 14, 14, 1, 2, Activation::kSigmoid);
  } else if (kind == DecoderKind::kMedium) {
    plan.num_layers = 4;
    plan.layers[0] = linear_layer(latent_dim, 32, 7, 7, Activation::kNone);
    plan.layers[1] = conv_layer(32, 7, 7, 64, 2, Activation::kElu);
    plan.layers[2] = conv_layer(64, 14, 14, 32, 2, Activation::kElu);
    plan.layers[3] = conv_layer(32, 28, 28, 1, 1, Activation::kSigmoid);
  } else {
    plan.num_layers = 2;
    plan.layers[0] = linear_layer(latent_dim, hidden_dim, 1, 1, Activation::kRelu);
    plan.layers[1] = linear_layer(hidden_dim, 1, 28, 28, Activation::kSigmoid);
  }
  return plan;
}

}  // namespace smoe_fast

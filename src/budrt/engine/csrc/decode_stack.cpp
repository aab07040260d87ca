// Every decoder layer of a decode-only step in one call, on the GGUF's 4-bit weights (small
// steps) or on the bf16 weights oneDNN packed at load (any other decode-only step).
//
// At one to a few decoding rows the arithmetic of a SmolLM2 layer takes a few tens of
// microseconds, and walking the layer in Python (module calls, checks, views, ten op dispatches)
// costs about as much again; at 64 rows the walk is still ~0.3 ms a layer with one of the two
// CPUs idle. This runs the same ops in the same order as llama.py's DecoderLayer (add + RMSNorm,
// fused q/k/v matmul, RoPE + cache write + paged attention, output matmul, add + RMSNorm, gate/up
// matmul, SiLU(gate) * up, down matmul), through the same kernels (rms_norm.cpp, rope_cache.cpp,
// silu_mul.cpp; for the linears q4_linear.cpp's tiles or ATen's int4 matmul, whichever quant.pack
// chose, or oneDNN's packed bf16 linear, the op PackedLinear calls), so the tokens are exactly
// the same.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <functional>
#include <string>
#include <vector>

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
std::vector<torch::Tensor> add_rms_norm(
    const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
at::Tensor rope_cache_decode_attention(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& block_tables,
    const at::Tensor& lengths, int64_t num_heads, double scale);
at::Tensor q4_tiles_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, int64_t rounds);

namespace budrt_stack {

constexpr int64_t kGroup = 32;  // GGUF Q4 block size = the int4 matmul's group size
constexpr int64_t kLinearsPerLayer = 4;  // qkv, o, gate_up, down

// quant.matmul's choice, made by the packing: tiles are one flat uint8 tensor (quant.pack_tiles).
inline at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  if (packed.dim() == 1) return q4_tiles_linear(x, packed, scales, 2);
  return at::_weight_int4pack_mm_for_cpu(x, packed, kGroup, scales);
}

// oneDNN's linear on a weight `torch.ops.mkldnn._reorder_linear_weight` packed (packed_linear.py),
// no bias: the op is registered by torch's library, not declared in ATen's headers, so it is
// called through the dispatcher.
inline at::Tensor packed_bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{
      x, weight, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// linear(i, input): the layers' i-th linear (4 per layer: qkv, o, gate_up, down) applied to input.
using Linear = std::function<at::Tensor(int64_t, const at::Tensor&)>;

std::vector<at::Tensor> run_layers(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& lengths,
    const std::vector<at::Tensor>& norms, int64_t num_heads, double scale, double eps, const Linear& linear) {
  const int64_t layers = cache.size(0);
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers, "decode layers: 2 norms per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode layers: x must be a contiguous [N, hidden]");
  at::Tensor hidden = x;
  at::Tensor residual;
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor normed;
    if (l == 0) {
      residual = hidden;
      normed = rms_norm(hidden, norms[0], eps);
    } else {
      auto pair = add_rms_norm(residual, hidden, norms[2 * l], eps);
      residual = pair[0];
      normed = pair[1];
    }
    const int64_t w = kLinearsPerLayer * l;
    const at::Tensor qkv = linear(w, normed);
    const at::Tensor layer_cache = cache.select(0, l);
    const at::Tensor attended = rope_cache_decode_attention(
        qkv, cos, sin, layer_cache.select(0, 0), layer_cache.select(0, 1), slots, block_tables,
        lengths, num_heads, scale);
    const at::Tensor projected = linear(w + 1, attended);
    auto pair = add_rms_norm(residual, projected, norms[2 * l + 1], eps);
    residual = pair[0];
    const at::Tensor gate_up = linear(w + 2, pair[1]);
    hidden = linear(w + 3, silu_mul(gate_up));
  }
  return {hidden, residual};
}

}  // namespace budrt_stack

// x: the step's embeddings `[N, hidden]` (bf16). Per layer l: norms[2l] (input) and norms[2l+1]
// (post-attention) RMSNorm weights; packed[4l + i] / scales[4l + i] the int4 weights of qkv, o,
// gate_up and down. cache `[layers, 2, blocks, block_size, kv_heads, D]`. Returns {the last
// layer's MLP output, the residual stream}, as the Python layers leave them.
std::vector<at::Tensor> q4_decode_layers(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& lengths,
    const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& packed,
    const std::vector<at::Tensor>& scales, int64_t num_heads, double scale, double eps) {
  using namespace budrt_stack;
  TORCH_CHECK(static_cast<int64_t>(packed.size()) == kLinearsPerLayer * cache.size(0) &&
                  packed.size() == scales.size(),
              "q4_decode_layers: 4 packed linears per layer");
  return run_layers(
      x, cos, sin, cache, slots, block_tables, lengths, norms, num_heads, scale, eps,
      [&](int64_t i, const at::Tensor& input) { return q4_linear(input, packed[i], scales[i]); });
}

// As q4_decode_layers, with weights[4l + i] the oneDNN-packed bf16 weights of layer l's linears.
std::vector<at::Tensor> bf16_decode_layers(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& lengths,
    const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& weights, int64_t num_heads,
    double scale, double eps) {
  using namespace budrt_stack;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kLinearsPerLayer * cache.size(0),
              "bf16_decode_layers: 4 packed linears per layer");
  return run_layers(
      x, cos, sin, cache, slots, block_tables, lengths, norms, num_heads, scale, eps,
      [&](int64_t i, const at::Tensor& input) { return packed_bf16_linear(input, weights[i]); });
}

// Every decoder layer of a small decode-only step in one call, on the GGUF's 4-bit weights.
//
// At one to a few decoding rows the arithmetic of a SmolLM2 layer takes a few tens of
// microseconds, and walking the layer in Python (module calls, checks, views, ten op dispatches)
// costs about as much again. This runs the same ops in the same order as llama.py's DecoderLayer
// for that case (add + RMSNorm, fused q/k/v matmul, RoPE + cache write + paged attention, output
// matmul, add + RMSNorm, gate/up matmul, SiLU(gate) * up, down matmul), through the same kernels
// (rms_norm.cpp, rope_cache.cpp, silu_mul.cpp, and q4_linear.cpp's tiles or ATen's int4 matmul,
// whichever quant.pack chose), so the tokens are exactly the same.

#include <torch/extension.h>

#include <vector>

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
std::vector<torch::Tensor> add_rms_norm(
    const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
at::Tensor rope_cache_decode_attention(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& block_tables,
    const at::Tensor& lengths, int64_t num_heads, double scale);
at::Tensor q4_tiles_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm);

namespace budrt_stack {

constexpr int64_t kGroup = 32;  // GGUF Q4 block size = the int4 matmul's group size
constexpr int64_t kLinearsPerLayer = 4;  // qkv, o, gate_up, down

// quant.matmul's choice, made by the packing: tiles are one flat uint8 tensor (quant.pack_tiles).
inline at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  if (packed.dim() == 1) return q4_tiles_linear(x, packed, scales);
  return at::_weight_int4pack_mm_for_cpu(x, packed, kGroup, scales);
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
  const int64_t layers = cache.size(0);
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers, "q4_decode_layers: 2 norms per layer");
  TORCH_CHECK(static_cast<int64_t>(packed.size()) == kLinearsPerLayer * layers &&
                  packed.size() == scales.size(),
              "q4_decode_layers: 4 packed linears per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "q4_decode_layers: x must be a contiguous [N, hidden]");
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
    const at::Tensor qkv = q4_linear(normed, packed[w], scales[w]);
    const at::Tensor layer_cache = cache.select(0, l);
    const at::Tensor attended = rope_cache_decode_attention(
        qkv, cos, sin, layer_cache.select(0, 0), layer_cache.select(0, 1), slots, block_tables,
        lengths, num_heads, scale);
    const at::Tensor projected = q4_linear(attended, packed[w + 1], scales[w + 1]);
    auto pair = add_rms_norm(residual, projected, norms[2 * l + 1], eps);
    residual = pair[0];
    const at::Tensor gate_up = q4_linear(pair[1], packed[w + 2], scales[w + 2]);
    hidden = q4_linear(silu_mul(gate_up), packed[w + 3], scales[w + 3]);
  }
  return {hidden, residual};
}

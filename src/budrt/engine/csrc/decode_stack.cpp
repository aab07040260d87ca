// Every decoder layer of a decode-only step in one call, on the GGUF's 4-bit weights (small
// steps) or on the dense weights (any other decode-only step), bf16 or fp32 activations.
//
// At one to a few decoding rows the arithmetic of a SmolLM2 layer takes a few tens of
// microseconds, and walking the layer in Python (module calls, checks, views, ten op dispatches)
// costs about as much again; at 64 rows the walk is still ~0.3 ms a layer with one of the two
// CPUs idle. This runs the same ops in the same order as llama.py's DecoderLayer (add + RMSNorm,
// fused q/k/v matmul, RoPE + cache write + paged attention, output matmul, add + RMSNorm, gate/up
// matmul, SiLU(gate) * up, down matmul), through the same kernels (rms_norm.cpp, rope_cache.cpp,
// silu_mul.cpp; for the linears q4_linear.cpp's tiles, or the dense op the Python linear calls: oneDNN's packed linear for bf16, at::linear for
// fp32), so the tokens are exactly the same. Dense linears may run at most `split_rows` rows per
// call, as the Python linears do for seeded steps (step_path.EXACT_ROWS), so those steps can
// take the stack too.

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

// The row count a packed bf16 linear of `rows` rows runs at: linear.onednn_rows's rule (8, or the
// next power of two or 3/4 of it), so oneDNN builds and caches a primitive for a few row counts.
int64_t onednn_rows(int64_t rows) {
  if (rows <= 8) return 8;
  int64_t power = 1;
  while (power < rows) power <<= 1;
  return rows <= power * 3 / 4 ? power * 3 / 4 : power;
}

namespace budrt_stack {

constexpr int64_t kLinearsPerLayer = 4;  // qkv, o, gate_up, down

// The 4-bit tiles (quant.pack_tiles) with two int8 roundings of x, as linear.Linear calls them.
inline at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm) {
  return q4_tiles_linear(x, packed, dm, 2);
}

// oneDNN's linear on a weight `torch.ops.mkldnn._reorder_linear_weight` packed (engine/linear.py),
// no bias, its rows padded as the Python linear pads them: the op is registered by torch's
// library, not declared in ATen's headers, so it is called through the dispatcher.
inline at::Tensor packed_bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  const int64_t rows = x.size(0), padded = onednn_rows(rows);
  at::Tensor input = padded == rows ? x : at::constant_pad_nd(x, {0, 0, 0, padded - rows}, 0);
  torch::jit::Stack stack{
      input, weight, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  at::Tensor out = stack[0].toTensor();
  return padded == rows ? out : out.narrow(0, 0, rows);
}

// The dense linear the Python layers call: oneDNN's packed op for bf16, at::linear for fp32 (the
// op nn.Linear calls, so the same bits); at most `split_rows` rows per call when it is > 0.
inline at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, int64_t split_rows) {
  auto one = [&](const at::Tensor& part) {
    return x.scalar_type() == at::kBFloat16 ? packed_bf16_linear(part, weight) : at::linear(part, weight);
  };
  if (split_rows <= 0 || x.size(0) <= split_rows) return one(x);
  std::vector<at::Tensor> parts;
  for (const at::Tensor& part : x.split(split_rows)) parts.push_back(one(part));
  return at::cat(parts);
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

// kind "q4": linears[4l + i] / scales[4l + i] are quant.pack_tiles' 4-bit tiles of layer l's qkv, o,
// gate_up and down; "dense": linears are their dense weights (bf16: oneDNN-packed, as
// linear.Linear.weight; fp32: plain `[out, in]`), scales unused. x: the step's embeddings
// `[N, hidden]` (bf16 or fp32: norms, cache and dense weights of its dtype). Per layer l: norms[2l]
// (input) and norms[2l+1] (post-attention) RMSNorm weights. cache `[layers, 2, blocks, block_size,
// kv_heads, D]`. split_rows: dense linears take at most this many rows per call (0: no limit).
// Returns {the last layer's MLP output, the residual stream}, as the Python layers leave them.
std::vector<at::Tensor> decode_layers(
    const std::string& kind, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& cache, const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& lengths,
    const std::vector<at::Tensor>& norms, const std::vector<at::Tensor>& linears,
    const std::vector<at::Tensor>& scales, int64_t num_heads, double scale, double eps, int64_t split_rows) {
  using namespace budrt_stack;
  TORCH_CHECK(kind == "q4" || kind == "dense", "decode_layers: kind must be \"q4\" or \"dense\"");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "decode_layers: x must be bf16 or fp32");
  TORCH_CHECK(static_cast<int64_t>(linears.size()) == kLinearsPerLayer * cache.size(0),
              "decode_layers: 4 linears per layer");
  TORCH_CHECK(kind == "dense" || linears.size() == scales.size(), "decode_layers: one scales tensor per 4-bit linear");
  const Linear linear = [&](int64_t i, const at::Tensor& input) {
    return kind == "q4" ? q4_linear(input, linears[i], scales[i]) : dense_linear(input, linears[i], split_rows);
  };
  return run_layers(x, cos, sin, cache, slots, block_tables, lengths, norms, num_heads, scale, eps, linear);
}

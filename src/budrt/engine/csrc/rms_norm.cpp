// RMSNorm for bf16 activations in one pass, with the residual add that precedes it fused in.
//
// The torch path (engine/llama.py RMSNorm) upcasts to fp32, normalizes with five or six small
// ops, casts back and multiplies by the weight: about twelve op dispatches per norm, two norms per
// layer, which at one decoding row cost more than the arithmetic. This computes the same values in
// the same order as transformers' LlamaRMSNorm: the row in fp32, its mean square, x * rsqrt(ms +
// eps) rounded to bf16, then times the bf16 weight, rounded to bf16. The add is x + delta rounded
// to bf16, as torch's bf16 add does.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace budrt_norm {

using bf16 = at::BFloat16;

// One row: `out = weight * bf16(row * rsqrt(mean(row^2) + eps))`.
inline void norm_row(const bf16* row, const bf16* weight, bf16* out, int64_t width, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < width; ++i) {
    const float v = static_cast<float>(row[i]);
    sum += v * v;
  }
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
  for (int64_t i = 0; i < width; ++i) {
    const bf16 normed = static_cast<bf16>(static_cast<float>(row[i]) * scale);
    out[i] = static_cast<bf16>(static_cast<float>(weight[i]) * static_cast<float>(normed));
  }
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, name, " must be a bf16 CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Rows per task: a decode step has one to a few rows, which run inline without waking threads.
constexpr int64_t kGrain = 16;

}  // namespace budrt_norm

// x [N, H] -> RMSNorm(x) [N, H], bf16.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  using namespace budrt_norm;
  check(x, "x");
  check(weight, "weight");
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.numel() == width, "weight must have ", width, " elements");
  auto out = torch::empty_like(x);
  const int64_t rows = x.numel() / width;
  const bf16* src = x.data_ptr<bf16>();
  const bf16* w = weight.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      norm_row(src + r * width, w, dst + r * width, width, static_cast<float>(eps));
    }
  });
  return out;
}

// h = x + delta (bf16), then {h, RMSNorm(h)}: the residual stream and the next sublayer's input.
std::vector<torch::Tensor> add_rms_norm(
    const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps) {
  using namespace budrt_norm;
  check(x, "x");
  check(delta, "delta");
  check(weight, "weight");
  TORCH_CHECK(x.sizes() == delta.sizes(), "x and delta must have the same shape");
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.numel() == width, "weight must have ", width, " elements");
  auto sum = torch::empty_like(x);
  auto out = torch::empty_like(x);
  const int64_t rows = x.numel() / width;
  const bf16* a = x.data_ptr<bf16>();
  const bf16* b = delta.data_ptr<bf16>();
  const bf16* w = weight.data_ptr<bf16>();
  bf16* h = sum.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * width;
      for (int64_t i = 0; i < width; ++i) {
        h[o + i] = static_cast<bf16>(static_cast<float>(a[o + i]) + static_cast<float>(b[o + i]));
      }
      norm_row(h + o, w, dst + o, width, static_cast<float>(eps));
    }
  });
  return {sum, out};
}

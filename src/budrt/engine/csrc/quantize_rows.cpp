// Rows of fp32 activations -> per-row int8 levels for engine/int8.py's FBGEMM linears.
//
// Each block of `block` inputs (a power of 4 dividing the width, so 1/sqrt(block) is exact) is
// first rotated by the orthonormal Hadamard matrix (a fast Walsh-Hadamard transform: log2(block)
// passes of sums and differences); the weights were rotated alike at load, so the product is
// unchanged. The rotation spreads a few large channels over their block: the row's scale (its
// largest value over `levels`) then leaves the others more levels (SmolLM2's linears: 4.4% error
// per product without, 1.8% with 64-wide blocks). Then each value is rounded to an integer in
// -levels..levels, returned as fp32 with the row's scale.
//
// Every row is computed on its own by the same code, whatever the batch: a seeded row's levels
// are the same bits in any step.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace budrt_quantize {

inline void hadamard_block(float* x, int64_t block, float norm) {
  for (int64_t half = 1; half < block; half *= 2) {
    for (int64_t start = 0; start < block; start += 2 * half) {
      for (int64_t j = start; j < start + half; ++j) {
        const float a = x[j], b = x[j + half];
        x[j] = a + b;
        x[j + half] = a - b;
      }
    }
  }
  for (int64_t j = 0; j < block; ++j) x[j] *= norm;
}

inline float quantize_row(const float* src, float* dst, int64_t width, int64_t block, float norm, float levels) {
  std::copy(src, src + width, dst);
  if (block > 1) {
    for (int64_t b = 0; b < width; b += block) hadamard_block(dst + b, block, norm);
  }
  float largest = 0.f;
  for (int64_t j = 0; j < width; ++j) largest = std::max(largest, std::abs(dst[j]));
  const float scale = std::max(largest / levels, std::numeric_limits<float>::min());
  for (int64_t j = 0; j < width; ++j) dst[j] = std::nearbyint(dst[j] / scale);
  return scale;
}

}  // namespace budrt_quantize

// x `[N, K]` fp32 -> (levels `[N, K]` fp32 integers in -levels..levels, scales `[N, 1]` fp32):
// x rotated blockwise ~= levels * scales. `block`: 1 (no rotation) or a power of 4 dividing K.
std::tuple<torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x, int64_t block, int64_t levels) {
  using namespace budrt_quantize;
  TORCH_CHECK(
      x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
      "quantize_rows: x must be a contiguous fp32 CPU tensor [N, K]");
  const int64_t rows = x.size(0), width = x.size(1);
  const bool power_of_4 = block >= 1 && (block & (block - 1)) == 0 && (__builtin_ctzll(block) % 2) == 0;
  TORCH_CHECK(power_of_4 && width % block == 0, "quantize_rows: block must be a power of 4 dividing K");
  TORCH_CHECK(levels >= 1 && levels <= 127, "quantize_rows: levels must be in 1..127");
  auto out = torch::empty_like(x);
  auto scales = torch::empty({rows, 1}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  float* scale = scales.data_ptr<float>();
  const float norm = 1.f / std::sqrt(static_cast<float>(block));  // exact: block is a power of 4
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scale[r] = quantize_row(src + r * width, dst + r * width, width, block, norm, static_cast<float>(levels));
    }
  });
  return {out, scales};
}

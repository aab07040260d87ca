// Grammar masks on logits: every token a row's grammar forbids gets -inf, in place.
//
// The masks are llguidance's packed bits (int32 words, bit k of word w = token 32 w + k allowed).
// Torch has no op that reads packed bits; a byte lookup into a [256, 8] bias table and an add took
// 2.6-4.8 ms a step for 64 rows of SmolLM2's 49k tokens. Here each word is read once: a word of
// nothing allowed (most of them, in a grammar's usual step) is 32 stores of -inf, a word of
// everything allowed is skipped.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace budrt_token_masks {

inline void mask_row(float* row, int64_t width, const int32_t* words, int64_t num_words) {
  const float forbidden = -INFINITY;
  for (int64_t w = 0; w < num_words; ++w) {
    const int64_t base = w * 32;
    if (base >= width) return;
    const uint32_t bits = static_cast<uint32_t>(words[w]);
    if (bits == 0xFFFFFFFFu) continue;
    const int64_t n = std::min<int64_t>(32, width - base);
    float* out = row + base;
    if (bits == 0) {
      for (int64_t k = 0; k < n; ++k) out[k] = forbidden;
      continue;
    }
    for (int64_t k = 0; k < n; ++k) {
      if (!((bits >> k) & 1u)) out[k] = forbidden;
    }
  }
  for (int64_t i = num_words * 32; i < width; ++i) row[i] = forbidden;  // beyond the grammar's vocabulary
}

}  // namespace budrt_token_masks

// logits `[M, V]` fp32 (rows contiguous), rows `[R]` int64 (each < M), bitmask `[R, W]` int32:
// row rows[r] of logits takes the mask bitmask[r].
void apply_token_masks(torch::Tensor& logits, const torch::Tensor& rows, const torch::Tensor& bitmask) {
  using namespace budrt_token_masks;
  TORCH_CHECK(
      logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
          logits.stride(1) == 1,
      "apply_token_masks: logits must be an fp32 CPU tensor [M, V] with contiguous rows");
  TORCH_CHECK(
      rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous() &&
          bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.is_contiguous() &&
          bitmask.size(0) == rows.size(0),
      "apply_token_masks: rows must be int64 [R] and bitmask int32 [R, W], both contiguous");
  const int64_t num_rows = rows.size(0), width = logits.size(1), stride = logits.stride(0);
  const int64_t num_words = bitmask.size(1), height = logits.size(0);
  const int64_t* row_index = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < num_rows; ++r) {
    TORCH_CHECK(row_index[r] >= 0 && row_index[r] < height, "apply_token_masks: a row index is out of range");
  }
  float* base = logits.data_ptr<float>();
  const int32_t* words = bitmask.data_ptr<int32_t>();
  at::parallel_for(0, num_rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      mask_row(base + row_index[r] * stride, width, words + r * num_words, num_words);
    }
  });
}

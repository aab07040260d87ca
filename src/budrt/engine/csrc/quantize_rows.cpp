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
// are the same bits in any step. The passes run in vector lanes (the pairs within one vector by
// lane swaps): the same sums and differences in the same order as one value at a time, ~4-5x
// faster (64 x 576 values: 119 -> 28 us on AVX2); it was ~15% of a 64-row step.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace budrt_quantize {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// One pass of the transform, pairs `half` apart, within each group of 2 * half values.
inline void butterfly_scalar(float* x, int64_t block, int64_t half) {
  for (int64_t start = 0; start < block; start += 2 * half) {
    for (int64_t j = start; j < start + half; ++j) {
      const float a = x[j], b = x[j + half];
      x[j] = a + b;
      x[j + half] = a - b;
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The passes whose pairs lie within one vector: each lane gets a + b (lower of its pair) or
// a - b (upper), from the vector and its lanes swapped `half` apart. The same sums and
// differences as the scalar passes, so the same bits.
template <int64_t Half>
inline Vec butterfly_in_vector(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  __m512 swapped;
  if constexpr (Half == 8) {
    swapped = _mm512_shuffle_f32x4(x, x, 0x4E);
  } else if constexpr (Half == 4) {
    swapped = _mm512_shuffle_f32x4(x, x, 0xB1);
  } else if constexpr (Half == 2) {
    swapped = _mm512_permute_ps(x, 0x4E);
  } else {
    swapped = _mm512_permute_ps(x, 0xB1);
  }
  constexpr __mmask16 kUpper = Half == 8 ? 0xFF00 : (Half == 4 ? 0xF0F0 : (Half == 2 ? 0xCCCC : 0xAAAA));
  // lower lanes: x + swapped = a + b; upper lanes: swapped - x = a - b
  return _mm512_mask_sub_ps(_mm512_add_ps(x, swapped), kUpper, swapped, x);
#else
  const __m256 x = v;
  __m256 swapped;
  if constexpr (Half == 4) {
    swapped = _mm256_permute2f128_ps(x, x, 0x01);
  } else if constexpr (Half == 2) {
    swapped = _mm256_permute_ps(x, 0x4E);
  } else {
    swapped = _mm256_permute_ps(x, 0xB1);
  }
  constexpr int kUpper = Half == 4 ? 0xF0 : (Half == 2 ? 0xCC : 0xAA);
  return _mm256_blend_ps(_mm256_add_ps(x, swapped), _mm256_sub_ps(swapped, x), kUpper);
#endif
}

// A block of `block` values (a multiple of the vector width), in place: the passes within a
// vector, then those between vectors.
inline void hadamard_block_vec(float* x, int64_t block) {
  for (int64_t i = 0; i < block; i += kLanes) {
    Vec v = Vec::loadu(x + i);
    v = butterfly_in_vector<1>(v);
    v = butterfly_in_vector<2>(v);
    v = butterfly_in_vector<4>(v);
#if defined(CPU_CAPABILITY_AVX512)
    v = butterfly_in_vector<8>(v);
#endif
    v.store(x + i);
  }
  for (int64_t half = kLanes; half < block; half *= 2) {
    for (int64_t start = 0; start < block; start += 2 * half) {
      for (int64_t j = start; j < start + half; j += kLanes) {
        const Vec a = Vec::loadu(x + j), b = Vec::loadu(x + j + half);
        (a + b).store(x + j);
        (a - b).store(x + j + half);
      }
    }
  }
}
#endif

inline void hadamard_block(float* x, int64_t block) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (block % kLanes == 0) {
    hadamard_block_vec(x, block);
    return;
  }
#endif
  for (int64_t half = 1; half < block; half *= 2) butterfly_scalar(x, block, half);
}

inline float quantize_row(const float* src, float* dst, int64_t width, int64_t block, float norm, float levels) {
  std::copy(src, src + width, dst);
  if (block > 1) {
    for (int64_t b = 0; b < width; b += block) hadamard_block(dst + b, block);
  }
  // Scaled by 1/sqrt(block) (1 without rotation: exact) and rounded to levels: vectors over the
  // row, a scalar tail.
  const Vec vnorm(norm);
  const int64_t whole = width - width % kLanes;
  Vec vlargest(0.f);
  for (int64_t j = 0; j < whole; j += kLanes) {
    const Vec v = Vec::loadu(dst + j) * vnorm;
    v.store(dst + j);
    vlargest = at::vec::maximum(vlargest, v.abs());
  }
  alignas(64) float lanes[kLanes];
  vlargest.store(lanes);
  float largest = *std::max_element(lanes, lanes + kLanes);
  for (int64_t j = whole; j < width; ++j) {
    dst[j] *= norm;
    largest = std::max(largest, std::abs(dst[j]));
  }
  const float scale = std::max(largest / levels, std::numeric_limits<float>::min());
  const Vec vscale(scale);
  for (int64_t j = 0; j < whole; j += kLanes) (Vec::loadu(dst + j) / vscale).round().store(dst + j);
  for (int64_t j = whole; j < width; ++j) dst[j] = std::nearbyint(dst[j] / scale);
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
  // Rows in pieces of ~32k values: smaller calls stay on one thread (a parallel region's start
  // costs more than the work).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scale[r] = quantize_row(src + r * width, dst + r * width, width, block, norm, static_cast<float>(levels));
    }
  });
  return {out, scales};
}

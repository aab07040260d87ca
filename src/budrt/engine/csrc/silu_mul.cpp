// SiLU(gate) * up for the MLP, from the fused gate/up projection's output, in one pass.
//
// The torch path (chunk, F.silu, multiply) makes two bf16 temporaries of [N, intermediate] and
// two passes over them. This computes each element as torch does: silu in fp32 as
// x / (1 + exp(-x)) with ATen's vectorized exp, rounded to bf16, then times up, rounded to bf16; in
// fp32 the same without the roundings to bf16 (the tail too in vector lanes, as torch's loops do).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

namespace budrt_silu {

using bf16 = at::BFloat16;
using FVec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<bf16>;

inline FVec silu(const FVec& x) { return x / (FVec(1.f) + x.neg().exp()); }

inline void silu_mul_row(const bf16* gate, const bf16* up, bf16* out, int64_t width) {
  constexpr int64_t step = BVec::size();
  int64_t i = 0;
  for (; i + step <= width; i += step) {
    auto [g0, g1] = at::vec::convert_to_float<bf16>(BVec::loadu(gate + i));
    auto [a0, a1] = at::vec::convert_to_float<bf16>(at::vec::convert_from_float<bf16>(silu(g0), silu(g1)));
    auto [u0, u1] = at::vec::convert_to_float<bf16>(BVec::loadu(up + i));
    at::vec::convert_from_float<bf16>(a0 * u0, a1 * u1).store(out + i);
  }
  for (; i < width; ++i) {
    const float g = static_cast<float>(gate[i]);
    const bf16 activated = static_cast<bf16>(g / (1.f + std::exp(-g)));
    out[i] = static_cast<bf16>(static_cast<float>(activated) * static_cast<float>(up[i]));
  }
}

inline void silu_mul_row(const float* gate, const float* up, float* out, int64_t width) {
  constexpr int64_t step = FVec::size();
  for (int64_t i = 0; i < width; i += step) {
    const int64_t count = std::min<int64_t>(step, width - i);
    const FVec g = FVec::loadu(gate + i, count), u = FVec::loadu(up + i, count);
    (silu(g) * u).store(out + i, count);
  }
}

template <typename T>
void silu_mul_rows(const torch::Tensor& gate_up, torch::Tensor& out) {
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  const T* src = gate_up.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  // A few rows run inline: waking the pool costs more than a decode row's arithmetic.
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      silu_mul_row(src + r * 2 * width, src + r * 2 * width + width, dst + r * width, width);
    }
  });
}

}  // namespace budrt_silu

// gate_up `[N, 2 * I]` bf16 or fp32 (gate first, then up) -> `[N, I]` of its dtype.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  using namespace budrt_silu;
  TORCH_CHECK(
      gate_up.device().is_cpu() &&
          (gate_up.scalar_type() == at::kBFloat16 || gate_up.scalar_type() == at::kFloat) &&
          gate_up.is_contiguous() && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
      "silu_mul: gate_up must be a contiguous bf16 or fp32 CPU tensor [N, 2 * I]");
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gate_up, out);
  } else {
    silu_mul_rows<bf16>(gate_up, out);
  }
  return out;
}

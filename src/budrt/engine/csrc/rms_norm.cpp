// RMSNorm for bf16 or fp32 activations in one pass, with the residual add that precedes it fused in.
//
// The torch path (engine/llama.py RMSNorm) upcasts to fp32, normalizes with five or six small
// ops, casts back and multiplies by the weight: about twelve op dispatches per norm, two norms per
// layer, which at one decoding row cost more than the arithmetic. This computes the same values in
// the same order as transformers' LlamaRMSNorm: the row in fp32, its mean square (summed in vector
// lanes), x * rsqrt(ms + eps) rounded to bf16, then times the bf16 weight, rounded to bf16. The
// add is x + delta rounded to bf16, as torch's bf16 add does. In fp32 it follows the torch path's
// fp32 ops the same way: x * rsqrt(mean(x^2) + eps), then weight * that, each rounded to fp32.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

namespace budrt_norm {

using bf16 = at::BFloat16;
using FVec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<bf16>;
constexpr int64_t kStep = BVec::size();  // bf16 elements per vector (two float vectors)

// One row: `out = weight * bf16(row * rsqrt(mean(row^2) + eps))`. The sum of squares runs in
// vector lanes (as torch's own mean does), so its fp32 rounding may differ from a sequential sum.
inline void norm_row(const bf16* row, const bf16* weight, bf16* out, int64_t width, float eps) {
  FVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kStep <= width; i += kStep) {
    auto [x0, x1] = at::vec::convert_to_float<bf16>(BVec::loadu(row + i));
    acc0 = at::vec::fmadd(x0, x0, acc0);
    acc1 = at::vec::fmadd(x1, x1, acc1);
  }
  float sum = at::vec::vec_reduce_all<float>([](FVec& a, FVec& b) { return a + b; }, acc0 + acc1);
  for (int64_t j = i; j < width; ++j) {
    const float v = static_cast<float>(row[j]);
    sum += v * v;
  }
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
  const FVec vscale(scale);
  for (i = 0; i + kStep <= width; i += kStep) {
    auto [x0, x1] = at::vec::convert_to_float<bf16>(BVec::loadu(row + i));
    // Round the normalized row to bf16 first, as the torch path's `.to(dtype)` does.
    auto [n0, n1] = at::vec::convert_to_float<bf16>(at::vec::convert_from_float<bf16>(x0 * vscale, x1 * vscale));
    auto [w0, w1] = at::vec::convert_to_float<bf16>(BVec::loadu(weight + i));
    at::vec::convert_from_float<bf16>(w0 * n0, w1 * n1).store(out + i);
  }
  for (; i < width; ++i) {
    const bf16 normed = static_cast<bf16>(static_cast<float>(row[i]) * scale);
    out[i] = static_cast<bf16>(static_cast<float>(weight[i]) * static_cast<float>(normed));
  }
}

// One fp32 row: `out = weight * (row * rsqrt(mean(row^2) + eps))`, the sum of squares in vector
// lanes as above.
inline void norm_row(const float* row, const float* weight, float* out, int64_t width, float eps) {
  constexpr int64_t step = FVec::size();
  FVec acc(0.f);
  int64_t i = 0;
  for (; i + step <= width; i += step) {
    const FVec x = FVec::loadu(row + i);
    acc = at::vec::fmadd(x, x, acc);
  }
  float sum = at::vec::vec_reduce_all<float>([](FVec& a, FVec& b) { return a + b; }, acc);
  for (int64_t j = i; j < width; ++j) sum += row[j] * row[j];
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
  const FVec vscale(scale);
  for (i = 0; i + step <= width; i += step) {
    (FVec::loadu(weight + i) * (FVec::loadu(row + i) * vscale)).store(out + i);
  }
  for (; i < width; ++i) {
    const float normed = row[i] * scale;
    out[i] = weight[i] * normed;
  }
}

// h = bf16(a + b), elementwise over one row.
inline void add_row(const bf16* a, const bf16* b, bf16* h, int64_t width) {
  int64_t i = 0;
  for (; i + kStep <= width; i += kStep) {
    auto [a0, a1] = at::vec::convert_to_float<bf16>(BVec::loadu(a + i));
    auto [b0, b1] = at::vec::convert_to_float<bf16>(BVec::loadu(b + i));
    at::vec::convert_from_float<bf16>(a0 + b0, a1 + b1).store(h + i);
  }
  for (; i < width; ++i) h[i] = static_cast<bf16>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

// h = a + b in fp32.
inline void add_row(const float* a, const float* b, float* h, int64_t width) {
  constexpr int64_t step = FVec::size();
  int64_t i = 0;
  for (; i + step <= width; i += step) (FVec::loadu(a + i) + FVec::loadu(b + i)).store(h + i);
  for (; i < width; ++i) h[i] = a[i] + b[i];
}

// x's dtype (bf16 or fp32), which every other tensor must share.
void check(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  t.scalar_type() == x.scalar_type(),
              name, " must be a bf16 or fp32 CPU tensor of x's dtype");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Rows per task: a decode step has one to a few rows, which run inline without waking threads.
constexpr int64_t kGrain = 16;

template <typename T>
void norm_rows(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out) {
  const int64_t width = x.size(-1), rows = x.numel() / width;
  const T* src = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      norm_row(src + r * width, w, dst + r * width, width, static_cast<float>(eps));
    }
  });
}

template <typename T>
void add_norm_rows(
    const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps,
    torch::Tensor& sum, torch::Tensor& out) {
  const int64_t width = x.size(-1), rows = x.numel() / width;
  const T* a = x.data_ptr<T>();
  const T* b = delta.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* h = sum.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * width;
      add_row(a + o, b + o, h + o, width);
      norm_row(h + o, w, dst + o, width, static_cast<float>(eps));
    }
  });
}

}  // namespace budrt_norm

// x [N, H] -> RMSNorm(x) [N, H], bf16 or fp32 (weight of x's dtype).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  using namespace budrt_norm;
  check(x, "x", x);
  check(weight, "weight", x);
  TORCH_CHECK(weight.numel() == x.size(-1), "weight must have ", x.size(-1), " elements");
  auto out = torch::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x, weight, eps, out);
  } else {
    norm_rows<bf16>(x, weight, eps, out);
  }
  return out;
}

// h = x + delta (bf16 or fp32), then {h, RMSNorm(h)}: the residual stream and the next sublayer's input.
std::vector<torch::Tensor> add_rms_norm(
    const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps) {
  using namespace budrt_norm;
  check(x, "x", x);
  check(delta, "delta", x);
  check(weight, "weight", x);
  TORCH_CHECK(x.sizes() == delta.sizes(), "x and delta must have the same shape");
  TORCH_CHECK(weight.numel() == x.size(-1), "weight must have ", x.size(-1), " elements");
  auto sum = torch::empty_like(x);
  auto out = torch::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    add_norm_rows<float>(x, delta, weight, eps, sum, out);
  } else {
    add_norm_rows<bf16>(x, delta, weight, eps, sum, out);
  }
  return {sum, out};
}

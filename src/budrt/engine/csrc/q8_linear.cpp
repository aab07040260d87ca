// x @ W^T with W in GGUF's Q8_0 layout, kept as the file stores it: int8 values in groups of 32
// along the input, one scale per group, w = value * scale.
//
// SmolLM2's token embedding (its tied lm_head) is Q8_0 in the GGUF. In bf16 the logits matmul
// reads 57 MB per step, a third of a one-row decode step; these 8-bit weights are 30 MB. Each
// group is widened to the file's fp32 values (value * scale, exact) once for all the step's rows,
// which accumulate their products in fp32; for bf16 x the result is rounded to bf16 as the bf16
// linear's is, fp32 x gets the fp32 sums. Vector code for AVX-512 or AVX2 + FMA (a scalar loop
// elsewhere), chosen by the compiler flags of the ISA level being built.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#define BUDRT_Q8_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define BUDRT_Q8_AVX2 1
#include <immintrin.h>
#endif

#include <vector>

namespace budrt_q8 {

constexpr int64_t kGroup = 32;
constexpr int64_t kMaxRows = 8;  // rows kept in registers at once; more rows run in passes

// out[m][n - n0] for rows [0, rows) of xf (fp32, `k` wide) and weight rows [n0, n1).
template <int Rows>
void q8_rows(
    const float* xf, int64_t k, const int8_t* values, const float* scales, int64_t n0, int64_t n1,
    float* out, int64_t out_stride) {
  const int64_t groups = k / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = values + n * k;
    const float* s = scales + n * groups;
#if defined(BUDRT_Q8_AVX512)
    __m512 acc[Rows];
    for (int m = 0; m < Rows; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* wg = w + g * kGroup;
      // The group's weights as the file defines them (value * scale: exact in fp32), once for all rows.
      const __m512 scale = _mm512_set1_ps(s[g]);
      const __m512 w0 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)))), scale);
      const __m512 w1 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16)))), scale);
      for (int m = 0; m < Rows; ++m) {
        const float* xg = xf + m * k + g * kGroup;
        acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), acc[m]));
      }
    }
    for (int m = 0; m < Rows; ++m) out[m * out_stride + n] = _mm512_reduce_add_ps(acc[m]);
#elif defined(BUDRT_Q8_AVX2)
    __m256 acc[Rows];
    for (int m = 0; m < Rows; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* wg = w + g * kGroup;
      const __m256 scale = _mm256_set1_ps(s[g]);
      __m256 wv[4];  // the group's weights as the file defines them (exact in fp32), once for all rows
      for (int j = 0; j < 4; ++j) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wg + 8 * j));
        wv[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), scale);
      }
      for (int m = 0; m < Rows; ++m) {
        const float* xg = xf + m * k + g * kGroup;
        __m256 a = acc[m];
        for (int j = 0; j < 4; ++j) a = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xg + 8 * j), a);
        acc[m] = a;
      }
    }
    for (int m = 0; m < Rows; ++m) {
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      r = _mm_add_ps(r, _mm_movehl_ps(r, r));
      out[m * out_stride + n] = _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
    }
#else
    for (int m = 0; m < Rows; ++m) {
      const float* xm = xf + m * k;
      float total = 0.f;
      for (int64_t i = 0; i < k; ++i) total += static_cast<float>(w[i]) * s[i / kGroup] * xm[i];
      out[m * out_stride + n] = total;
    }
#endif
  }
}

template <int Rows>
void q8_pass(const float* xf, int64_t k, const at::Tensor& values, const at::Tensor& scales, float* out, int64_t n) {
  const int8_t* v = values.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  // Grain: 256 weight rows (~150 KB at k = 576) per task, so both threads stream their own span.
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) { q8_rows<Rows>(xf, k, v, s, begin, end, out, n); });
}

}  // namespace budrt_q8

// x `[M, K]` bf16 or fp32, values `[N, K]` int8, scales `[N, K / 32]` fp32 -> `[M, N]` in x's dtype.
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& scales) {
  using namespace budrt_q8;
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.dim() == 2,
              "q8_linear: x must be bf16 or fp32 [M, K]");
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 2 && values.is_contiguous(), "q8_linear: values must be contiguous int8 [N, K]");
  const int64_t rows = x.size(0), k = x.size(1), n = values.size(0);
  TORCH_CHECK(values.size(1) == k && k % kGroup == 0, "q8_linear: K must match and be a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == k / kGroup,
              "q8_linear: scales must be contiguous fp32 [N, K / 32]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({rows, n}, x.options().dtype(at::kFloat));
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int64_t count = std::min(kMaxRows, rows - m0);
    const float* xm = xf.data_ptr<float>() + m0 * k;
    float* om = out.data_ptr<float>() + m0 * n;
    switch (count) {
      case 1: q8_pass<1>(xm, k, values, scales, om, n); break;
      case 2: q8_pass<2>(xm, k, values, scales, om, n); break;
      case 3: q8_pass<3>(xm, k, values, scales, om, n); break;
      case 4: q8_pass<4>(xm, k, values, scales, om, n); break;
      case 5: q8_pass<5>(xm, k, values, scales, om, n); break;
      case 6: q8_pass<6>(xm, k, values, scales, om, n); break;
      case 7: q8_pass<7>(xm, k, values, scales, om, n); break;
      default: q8_pass<8>(xm, k, values, scales, om, n); break;
    }
  }
  return out.to(x.scalar_type());  // no copy for fp32 x
}

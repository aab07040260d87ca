// x @ W^T with W in GGUF's Q4_0 / Q4_1 blocks (4-bit values q, per 32 inputs an fp16 scale d and
// min m: w = q * d + m), by integer dot products.
//
// Each 32-input block of a row of x is written as dx * qx + dx2 * qx2 with qx, qx2 int8 (the second
// rounds what the first left), so a block's contribution is d * (dx * sum(q * qx) + dx2 *
// sum(q * qx2)) + m * sum(x): the sums of products are exact in int32. The weights are repacked at
// load into tiles of 16 output rows (quant.pack_tiles): per block, 4 x 64 bytes whose low and high
// nibbles are 4 consecutive inputs of each of the 16 rows (the low 32 bytes rows 0-7), and the 16
// rows' d and m side by side. A tile's lanes are its output rows, so nothing is summed across lanes.
//
// Two builds of the same scheme, chosen by the compiler flags of the ISA level being built:
// - AVX512-VNNI (+BF16): one `vpdpbusd` per 4 inputs x 16 rows;
// - AVX2 + FMA + F16C: a tile is two 8-lane halves; per 4 inputs x 8 rows one `vpmaddubsw`
//   (u8 weights 0..15 x s8 activations: pairs summed in int16, at most 2 * 15 * 127), eight of
//   which are added in int16 (at most 30,480: no overflow) before one `vpmaddwd` by ones widens
//   each row's lane to int32.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__) && \
    defined(__F16C__)
#define BUDRT_Q4_AVX512 1
#define BUDRT_Q4_TILES 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define BUDRT_Q4_AVX2 1
#define BUDRT_Q4_TILES 1
#include <immintrin.h>
#endif

namespace budrt_q4 {

constexpr int64_t kGroup = 32;       // inputs per block
constexpr int64_t kTile = 16;        // output rows per tile
constexpr int64_t kTileBlockBytes = kTile * kGroup / 2;  // one block of a tile: 256 bytes
constexpr int64_t kAhead = 2048;    // bytes: the weights stream in order, fetched this far ahead

#if defined(BUDRT_Q4_AVX512)
constexpr int64_t kRowsAtOnce = 8;  // rows of x sharing one unpacking of the weights

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Rows of x as two int8 blocks each: x ~ dx * q + dx2 * q2, where q = round(x / dx) with
// dx = max|x| / 127, and q2 rounds the remainder the same way. The remainder's error is at most
// 1/2 of dx2 ~ max|x| / 64,000 — finer than bf16's own rounding. Also each block's exact sum.
template <typename T>
void quantize(const T* x, int64_t rows, int64_t k, int rounds, int8_t* q, float* dx, float* sums) {
  const int64_t blocks = k / kGroup;
  auto round_block = [](__m512 lo, __m512 hi, int8_t* out, float* scale_out) {
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float scale = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(qhi));
    *scale_out = scale;
    const __m512 s = _mm512_set1_ps(scale);  // what is left: x - scale * q, exact in fp32
    return std::make_pair(_mm512_fnmadd_ps(_mm512_cvtepi32_ps(qlo), s, lo), _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qhi), s, hi));
  };
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const T* xb = x + i * kGroup;
    const __m512 lo = load16(xb), hi = load16(xb + 16);
    const auto rest = round_block(lo, hi, q + 2 * i * kGroup, dx + 2 * i);
    if (rounds == 2) round_block(rest.first, rest.second, q + (2 * i + 1) * kGroup, dx + 2 * i + 1);
    sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
}

// The 16 outputs of one tile for R rows of x. `w`: the tile's blocks; `dm`: per block, 16 d then 16 m.
template <int R, int Rounds, typename T>
void tile_rows(const uint8_t* w, const at::Half* dm, int64_t blocks, const int8_t* q, const float* dx,
               const float* sums, T* out, int64_t out_stride) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = w + b * kTileBlockBytes;
    for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + 64 * l), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(dm + b * 2 * kTile) + kAhead / 4, _MM_HINT_T0);
    __m512i wv[8];  // wv[g]: inputs 4g..4g+3 of the block, 4 bytes per row
    for (int l = 0; l < 4; ++l) {
      const __m512i raw = _mm512_loadu_si512(p + 64 * l);
      wv[l] = _mm512_and_si512(raw, nibble);
      wv[l + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + b * 2 * kTile)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + b * 2 * kTile + kTile)));
    for (int r = 0; r < R; ++r) {
      const int64_t i = r * blocks + b;  // this row's block
      const int32_t* xq = reinterpret_cast<const int32_t*>(q + 2 * i * kGroup);
      const int32_t* xq2 = reinterpret_cast<const int32_t*>(q + (2 * i + 1) * kGroup);
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();  // independent chains
      for (int g = 0; g < 8; ++g) {
        s0 = _mm512_dpbusd_epi32(s0, wv[g], _mm512_set1_epi32(xq[g]));
        if constexpr (Rounds == 2) s1 = _mm512_dpbusd_epi32(s1, wv[g], _mm512_set1_epi32(xq2[g]));
      }
      __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(s0), _mm512_set1_ps(dx[2 * i]));
      if constexpr (Rounds == 2) dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(dx[2 * i + 1]), dot);
      acc[r] = _mm512_fmadd_ps(dot, d, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(out + r * out_stride, acc[r]);
    } else {  // rounded to nearest even, as torch rounds fp32 to bf16
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride), (__m256i)_mm512_cvtneps_pbh(acc[r]));
    }
  }
}
#elif defined(BUDRT_Q4_AVX2)
constexpr int64_t kRowsAtOnce = 4;  // rows of x sharing one unpacking of the weights

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float reduce_max(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}

inline float reduce_add(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

// One 32-input block v[0..3] -> 32 int8 at `out` (round(v / scale), scale = max|v| / 127) and
// the remainder v - scale * q, exact in fp32, left in v.
inline void round_block(__m256* v, int8_t* out, float* scale_out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_andnot_ps(sign, v[0]);
  for (int j = 1; j < 4; ++j) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  const float scale = reduce_max(amax) / 127.f;
  const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f), s = _mm256_set1_ps(scale);
  __m256i qi[4];
  for (int j = 0; j < 4; ++j) {
    qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // nearest even, as MXCSR leaves it
    v[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(qi[j]), s, v[j]);
  }
  // packs work within 128-bit lanes: the bytes come out as 4-value runs in the order 0 2 4 6 1 3 5 7.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), ordered);
  *scale_out = scale;
}

// As the AVX-512 build's: x ~ dx * q + dx2 * q2 per block (q2 rounds q's remainder), and the
// block's exact sum.
template <typename T>
void quantize(const T* x, int64_t rows, int64_t k, int rounds, int8_t* q, float* dx, float* sums) {
  const int64_t blocks = k / kGroup;
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const T* xb = x + i * kGroup;
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = load8(xb + 8 * j);
    sums[i] = reduce_add(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    round_block(v, q + 2 * i * kGroup, dx + 2 * i);
    if (rounds == 2) round_block(v, q + (2 * i + 1) * kGroup, dx + 2 * i + 1);
  }
}

// sum over the block's 32 inputs of w * x in int32, one lane per row of a half tile: wv[g] holds
// inputs 4g..4g+3 of each row (u8), xq the block's int8 activations.
inline __m256i dot_block(const __m256i* wv, const int32_t* xq) {
  __m256i s[2];  // two chains: half the latency of one
  for (int g = 0; g < 2; ++g) s[g] = _mm256_maddubs_epi16(wv[g], _mm256_set1_epi32(xq[g]));
  for (int g = 2; g < 8; ++g) s[g & 1] = _mm256_add_epi16(s[g & 1], _mm256_maddubs_epi16(wv[g], _mm256_set1_epi32(xq[g])));
  return _mm256_madd_epi16(_mm256_add_epi16(s[0], s[1]), _mm256_set1_epi16(1));
}

template <typename T>
inline void store8(T* out, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, v);
  } else {  // rounded to nearest even (NaN kept), as torch rounds fp32 to bf16
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int j = 0; j < 8; ++j) out[j] = static_cast<at::BFloat16>(tmp[j]);
  }
}

// The 16 outputs of one tile for R rows of x, as two halves of 8 rows. `w`: the tile's blocks;
// `dm`: per block, 16 d then 16 m.
template <int R, int Rounds, typename T>
void tile_rows(const uint8_t* w, const at::Half* dm, int64_t blocks, const int8_t* q, const float* dx,
               const float* sums, T* out, int64_t out_stride) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = w + b * kTileBlockBytes;
    for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + 64 * l), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(dm + b * 2 * kTile) + kAhead / 4, _MM_HINT_T0);
    const at::Half* dmb = dm + b * 2 * kTile;
    for (int h = 0; h < 2; ++h) {
      __m256i wv[8];  // wv[g]: inputs 4g..4g+3 of the block, 4 bytes per row of this half
      for (int l = 0; l < 4; ++l) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * l + 32 * h));
        wv[l] = _mm256_and_si256(raw, nibble);
        wv[l + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dmb + 8 * h)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dmb + kTile + 8 * h)));
      for (int r = 0; r < R; ++r) {
        const int64_t i = r * blocks + b;  // this row's block
        const __m256i s0 = dot_block(wv, reinterpret_cast<const int32_t*>(q + 2 * i * kGroup));
        __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(dx[2 * i]));
        if constexpr (Rounds == 2) {
          const __m256i s1 = dot_block(wv, reinterpret_cast<const int32_t*>(q + (2 * i + 1) * kGroup));
          dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(dx[2 * i + 1]), dot);
        }
        acc[r][h] = _mm256_fmadd_ps(dot, d, acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(sums[i]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    store8(out + r * out_stride, acc[r][0]);
    store8(out + r * out_stride + 8, acc[r][1]);
  }
}
#endif

#if defined(BUDRT_Q4_TILES)
// tile_rows for `count` (1..R) rows: the row count is a template argument, so the accumulators stay
// in registers.
template <int R, int Rounds, typename T>
void tile_count(int64_t count, const uint8_t* w, const at::Half* dm, int64_t blocks, const int8_t* q,
                const float* dx, const float* sums, T* out, int64_t out_stride) {
  if constexpr (R > 1) {
    if (count < R) return tile_count<R - 1, Rounds, T>(count, w, dm, blocks, q, dx, sums, out, out_stride);
  }
  tile_rows<R, Rounds, T>(w, dm, blocks, q, dx, sums, out, out_stride);
}

template <int Rounds, typename T>
void run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1), n = out.size(1), blocks = k / kGroup;
  std::vector<int8_t> q(2 * rows * k);
  std::vector<float> dx(2 * rows * blocks), sums(rows * blocks);
  quantize(x.data_ptr<T>(), rows, k, Rounds, q.data(), dx.data(), sums.data());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const at::Half* dmp = dm.data_ptr<at::Half>();
  T* op = out.data_ptr<T>();
  // Grain: 4 tiles (64 output rows, 18 KB of weights at k = 576) per task.
  at::parallel_for(0, n / kTile, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* w = wp + t * blocks * kTileBlockBytes;
      const at::Half* d = dmp + t * blocks * 2 * kTile;
      for (int64_t r0 = 0; r0 < rows; r0 += kRowsAtOnce) {
        const int64_t count = std::min(kRowsAtOnce, rows - r0);
        const int8_t* qr = q.data() + 2 * r0 * k;
        const float* dxr = dx.data() + 2 * r0 * blocks;
        const float* sr = sums.data() + r0 * blocks;
        T* o = op + r0 * n + t * kTile;
        tile_count<kRowsAtOnce, Rounds, T>(count, w, d, blocks, qr, dxr, sr, o, n);
      }
    }
  });
}

template <typename T>
void run_rounds(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, int64_t rounds, at::Tensor& out) {
  if (rounds == 1) {
    run<1, T>(x, packed, dm, out);
  } else {
    run<2, T>(x, packed, dm, out);
  }
}
#endif

}  // namespace budrt_q4

// Whether this build has the tile kernel (AVX512-VNNI + BF16, or AVX2 + FMA, both with F16C).
bool q4_tiles_supported() {
#if defined(BUDRT_Q4_TILES)
  return true;
#else
  return false;
#endif
}

// x `[M, K]` bf16 or fp32; packed uint8 `[N * K / 2]` and dm fp16 `[N / 16, K / 32, 2, 16]` as
// quant.pack_tiles makes them -> `[M, N]` in x's dtype. `rounds`: int8 roundings per block of x,
// 2 (the second rounds the first's remainder: about fp32's accuracy) or 1 (about bf16's, and
// about twice as fast where the integer work is the limit, as it is at one row with AVX2).
at::Tensor q4_tiles_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, int64_t rounds) {
  using namespace budrt_q4;
  TORCH_CHECK(q4_tiles_supported(), "q4_tiles_linear: this CPU build has no tile kernel (needs AVX2, FMA and F16C)");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "q4_tiles_linear: x must be a contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "q4_tiles_linear: x must be bf16 or fp32");
  TORCH_CHECK(rounds == 1 || rounds == 2, "q4_tiles_linear: rounds must be 1 or 2");
  TORCH_CHECK(
      dm.scalar_type() == at::kHalf && dm.dim() == 4 && dm.size(2) == 2 && dm.size(3) == kTile && dm.is_contiguous(),
      "q4_tiles_linear: dm must be contiguous fp16 [N / 16, K / 32, 2, 16]");
  const int64_t k = x.size(1), n = dm.size(0) * kTile;
  TORCH_CHECK(k % kGroup == 0 && dm.size(1) == k / kGroup, "q4_tiles_linear: K must be 32 x dm's blocks");
  TORCH_CHECK(
      packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous() && packed.numel() == n * k / 2,
      "q4_tiles_linear: packed must be contiguous uint8 [N * K / 2]");
  auto out = at::empty({x.size(0), n}, x.options());
#if defined(BUDRT_Q4_TILES)
  if (x.size(0) > 0) {
    if (x.scalar_type() == at::kBFloat16) {
      run_rounds<at::BFloat16>(x, packed, dm, rounds, out);
    } else {
      run_rounds<float>(x, packed, dm, rounds, out);
    }
  }
#endif
  return out;
}

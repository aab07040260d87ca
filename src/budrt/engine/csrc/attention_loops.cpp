// The inner loops of paged decode attention (paged_attention.cpp): widening loads, the score
// block with its shared reduction tree, the value sums, and the look-ahead that fetches the next
// task's cached rows while one task computes.
//
// Part of the one translation unit engine/kernel_build.py compiles (before paged_attention.cpp).
// ATen's Vectorized<float> picks the vector width from the CPU_CAPABILITY_* macro the loader
// defines to match torch's own dispatch.

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

namespace budrt_attention {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline Vec load_f32(const float* p) { return Vec::loadu(p); }
inline Vec load_f32(const at::BFloat16* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline Vec load_f32(const at::Half* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen horizontal sums at once: lane r of the result is the sum of a[r]'s lanes. Summing each
// vector alone costs a shuffle tree per score; this shares one tree among sixteen rows.
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: row i in 128-bit lanes 0-1, row i+8 in 2-3
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: rows i, i+8, i+4, i+12
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // pairs within each 128-bit lane
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[i], c[i + 2], 0x88), _mm512_shuffle_ps(c[i], c[i + 2], 0xDD));
  }
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  // Element 4k+j of e holds row order[j] + offset[k]; gather the rows back into order.
  static const __m512i index = [] {
    alignas(64) int32_t idx[16];
    const int order[4] = {0, 2, 1, 3}, offset[4] = {0, 8, 4, 12};
    for (int k = 0; k < 4; ++k) {
      for (int j = 0; j < 4; ++j) idx[order[j] + offset[k]] = 4 * k + j;
    }
    return _mm512_load_si512(idx);
  }();
  return _mm512_permutexvar_ps(index, e);
}

// Scores of one query head against up to 16 key rows of a block (`row_stride` apart), written to
// out[0..rows). qf: the head's query in fp32, already scaled; q: the same query as given (T),
// the keys as cached (C).
template <typename C, typename T, int NV>
inline void block_scores16(
    const C* k, int64_t rows, int64_t row_stride, const float* qf, const T* q, float scale, float* out) {
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  bool scaled = false;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<C, at::BFloat16>) {
    // bf16 x bf16 pairs summed in fp32 by the CPU (exact products): no widening of the keys.
    __m512bh qv[NV / 2];
    for (int j = 0; j < NV / 2; ++j) qv[j] = (__m512bh)_mm512_loadu_si512(q + 32 * j);
    for (int64_t r = 0; r < rows; ++r) {
      const C* kr = k + r * row_stride;
      for (int j = 0; j < NV / 2; ++j) acc[r] = _mm512_dpbf16_ps(acc[r], qv[j], (__m512bh)_mm512_loadu_si512(kr + 32 * j));
    }
  } else
#endif
  {
    __m512 qv[NV];
    for (int j = 0; j < NV; ++j) qv[j] = _mm512_loadu_ps(qf + 16 * j);
    for (int64_t r = 0; r < rows; ++r) {
      const C* kr = k + r * row_stride;
      for (int j = 0; j < NV; ++j) acc[r] = _mm512_fmadd_ps(qv[j], __m512(load_f32(kr + 16 * j)), acc[r]);
    }
    scaled = true;
  }
  __m512 sums = reduce16(acc);
  if (!scaled) sums = _mm512_mul_ps(sums, _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << rows) - 1), sums);
}
#endif

// Asks for `rows` rows, `row_stride` elements apart, ahead of their use: the blocks are scattered
// through the cache, so the hardware prefetcher cannot guess the next one.
template <typename T>
inline void prefetch_rows(const T* first, int64_t rows, int64_t row_stride) {
  // The first line of each row is enough: the CPU's own prefetchers fetch the lines next to it.
  for (int64_t r = 0; r < rows; ++r) __builtin_prefetch(first + r * row_stride, 0, 3);
}

// Shapes and strides shared by every task of one call.
struct Geometry {
  int64_t heads, kv_heads, group, dim, block_size, max_blocks;
  int64_t cache_block_stride, cache_row_stride;  // elements between blocks / between rows
  int64_t q_row_stride, q_head_stride, out_row_stride;
  float scale;
};

// The next task's cached rows, asked for (into L2) a few cache lines at a time while this task
// computes. Alone, a task waits for its rows, then computes on them; with this, one task's
// arithmetic overlaps the next one's reads (64 x 290 positions: ~20% less time per step).
// A block's rows are walked as runs of contiguous lines: the whole block when the task takes
// every kv head (its rows are adjacent), else one run per row.
template <typename T, typename Index>
struct Lookahead {
  const T* caches[2] = {nullptr, nullptr};  // keys, then values
  const Index* table = nullptr;
  const Geometry* g = nullptr;
  int64_t len = 0;         // positions of the next task
  int64_t span = 0;        // elements of one position that the task reads
  int which = 2;           // the cache being fetched; 2 = done (or no next task)
  int64_t block = 0;       // the block being fetched
  const char* run = nullptr;  // the current run of lines; nullptr = the block is not entered yet
  int64_t run_lines = 0, runs_left = 0, line = 0;

  void start(const T* keys, const T* values, const Index* next_table, int64_t next_len, int64_t span_elems,
             const Geometry& geometry) {
    caches[0] = keys;
    caches[1] = values;
    table = next_table;
    g = &geometry;
    len = next_len;
    span = span_elems;
    which = next_len > 0 ? 0 : 2;
    block = 0;
    run = nullptr;
  }

  int64_t total_lines() const {
    return 2 * len * ((span * static_cast<int64_t>(sizeof(T)) + 63) / 64);
  }

  void advance(int64_t lines) {
    while (lines > 0 && which < 2) {
      if (run == nullptr) {  // enter the block: where its runs start, how many, how long
        const int64_t rows = std::min(g->block_size, len - block * g->block_size);
        run = reinterpret_cast<const char*>(caches[which] + static_cast<int64_t>(table[block]) * g->cache_block_stride);
        const bool adjacent = span == g->cache_row_stride;
        const int64_t run_elems = adjacent ? rows * span : span;
        run_lines = (run_elems * static_cast<int64_t>(sizeof(T)) + 63) / 64;
        runs_left = adjacent ? 1 : rows;
        line = 0;
      }
      const int64_t n = std::min(lines, run_lines - line);
      for (int64_t i = 0; i < n; ++i) __builtin_prefetch(run + 64 * (line + i), 0, 2);  // L2 and below
      line += n;
      lines -= n;
      if (line < run_lines) return;
      line = 0;
      if (--runs_left > 0) {
        run += g->cache_row_stride * static_cast<int64_t>(sizeof(T));
        continue;
      }
      run = nullptr;
      if (++block * g->block_size >= len) {  // on to the values (or done)
        block = 0;
        ++which;
      }
    }
  }
};

// Query heads summed at once per kv head: their accumulators (heads x NV vectors) stay within
// half the vector registers. Sharing each widened value row among them cuts the value pass's
// loads and conversions by the group size.
template <int NV>
constexpr int64_t kJointHeads = NV <= 4 ? 4 : (NV <= 8 ? 2 : 1);

// acc[c * D + d] = sum over positions t of p[c * len + t] * v[t][kv][d], for C query heads.
template <typename T, typename Index, int NV, int C>
inline void weighted_sum(
    const T* v_cache, const Index* table, int64_t len, int64_t kv, const float* p, float* acc,
    const Geometry& g, Lookahead<T, Index>& ahead, int64_t quota) {
  Vec sum[C][NV];
  for (int c = 0; c < C; ++c) {
    for (int j = 0; j < NV; ++j) sum[c][j] = Vec(0.f);
  }
  for (int64_t bi = 0; bi * g.block_size < len; ++bi) {
    const T* vb = v_cache + static_cast<int64_t>(table[bi]) * g.cache_block_stride + kv * g.dim;
    const int64_t first = bi * g.block_size, rows = std::min(g.block_size, len - first);
    ahead.advance(quota * C);
    for (int64_t r = 0; r < rows; ++r) {
      const T* vr = vb + r * g.cache_row_stride;
      Vec value[NV];
      for (int j = 0; j < NV; ++j) value[j] = load_f32(vr + j * kLanes);
      for (int c = 0; c < C; ++c) {
        const Vec w(p[c * len + first + r]);
        for (int j = 0; j < NV; ++j) sum[c][j] = at::vec::fmadd(w, value[j], sum[c][j]);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int j = 0; j < NV; ++j) sum[c][j].store(acc + c * g.dim + j * kLanes);
  }
}

template <typename T, typename Index, int NV>
inline void weighted_sums(
    int64_t n, const T* v_cache, const Index* table, int64_t len, int64_t kv, const float* p, float* acc,
    const Geometry& g, Lookahead<T, Index>& ahead, int64_t quota) {
  if (n == 4) return weighted_sum<T, Index, NV, 4>(v_cache, table, len, kv, p, acc, g, ahead, quota);
  if (n == 3) return weighted_sum<T, Index, NV, 3>(v_cache, table, len, kv, p, acc, g, ahead, quota);
  if (n == 2) return weighted_sum<T, Index, NV, 2>(v_cache, table, len, kv, p, acc, g, ahead, quota);
  weighted_sum<T, Index, NV, 1>(v_cache, table, len, kv, p, acc, g, ahead, quota);
}

}  // namespace budrt_attention

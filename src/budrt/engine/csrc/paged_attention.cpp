// Decode attention straight from the paged KV cache: one query token per sequence attends over its
// cached keys/values, found through the block table, with no gathered copy and no padding.
//
// A task is one sequence (or, with few sequences, one sequence's kv head), so a block is read as
// one contiguous span; the query heads that share a kv head (GQA) are done together, so each key
// row comes from memory once for all of them. Scores, softmax and the weighted sum are in fp32
// whatever the storage type. Decode attention reads every cached byte once per step, so memory
// bandwidth, not arithmetic, is the limit: the loops aim to keep the loads streaming, and while a
// task computes it asks for the next task's rows (Lookahead), so that reads and arithmetic overlap.
//
// Built at first use by budrt/engine/kernels.py, after attention_loops.cpp (the inner loops). With
// AVX-512 the scores of a 16-row block share one reduction tree (and use AVX512-BF16 dot products
// for bf16 when the CPU has them).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using namespace budrt_attention;

// One sequence, kv heads [kv0, kv0 + kv_count) and their query heads, over `len` cached
// positions. Taking several kv heads at once reads each block's rows as one contiguous span.
// NV is the number of Vec registers per head_dim row (head_dim == NV * kLanes); NV == 0 is the
// generic scalar path.
template <typename T, typename C, typename Index, int NV>
void attend(
    const T* q, const C* k_cache, const C* v_cache, const Index* table, int64_t len, T* out,
    int64_t kv_count, const Geometry& g, float* qf, float* scores, float* acc, Lookahead<C, Index>& ahead) {
  const int64_t G = g.group, D = g.dim, heads = kv_count * G;
  // The next task's lines, spread evenly over this task's block visits (once per block in the
  // score pass, once per block and query head in the value pass).
  const int64_t visits = std::max<int64_t>(1, ((len + g.block_size - 1) / g.block_size) * (1 + heads));
  const int64_t quota = (ahead.total_lines() + visits - 1) / visits;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t d = 0; d < D; ++d) {
      qf[h * D + d] = static_cast<float>(q[h * g.q_head_stride + d]) * g.scale;
    }
  }
  if (len <= 0) {  // nothing to attend to: a defined output rather than garbage
    for (int64_t i = 0; i < heads * D; ++i) out[i] = static_cast<T>(0.f);
    return;
  }
  const int64_t nblocks = (len + g.block_size - 1) / g.block_size;
  auto block_rows = [&](int64_t bi) { return std::min(g.block_size, len - bi * g.block_size); };
  auto block_start = [&](const C* cache, int64_t bi) {
    return cache + static_cast<int64_t>(table[bi]) * g.cache_block_stride;
  };

  // Scores: each key row is dotted with every query head that shares it.
  prefetch_rows(block_start(k_cache, 0), block_rows(0), g.cache_row_stride);
  for (int64_t bi = 0; bi < nblocks; ++bi) {
    const C* kb = block_start(k_cache, bi);
    const int64_t rows = block_rows(bi);
    ahead.advance(quota);
    if (bi + 1 < nblocks) prefetch_rows(block_start(k_cache, bi + 1), block_rows(bi + 1), g.cache_row_stride);
    prefetch_rows(block_start(v_cache, bi), rows, g.cache_row_stride);  // for the last pass
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (NV == 4 || NV == 8) {
      if (g.block_size == 16) {
        for (int64_t h = 0; h < heads; ++h) {
          block_scores16<C, T, NV>(
              kb + (h / G) * D, rows, g.cache_row_stride, qf + h * D, q + h * g.q_head_stride, g.scale,
              scores + h * len + bi * 16);
        }
        continue;
      }
    }
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = bi * g.block_size + r;
      for (int64_t kv = 0; kv < kv_count; ++kv) {
        const C* kr = kb + r * g.cache_row_stride + kv * D;
        if constexpr (NV > 0) {
          Vec kvec[NV];
          for (int j = 0; j < NV; ++j) kvec[j] = load_f32(kr + j * kLanes);
          for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
            const float* qh = qf + h * D;
            Vec s = Vec::loadu(qh) * kvec[0];
            for (int j = 1; j < NV; ++j) s = at::vec::fmadd(Vec::loadu(qh + j * kLanes), kvec[j], s);
            scores[h * len + t] = hsum(s);
          }
        } else {
          for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
            const float* qh = qf + h * D;
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += qh[d] * static_cast<float>(kr[d]);
            scores[h * len + t] = s;
          }
        }
      }
    }
  }

  // Softmax per head, max-subtracted; the weights stay unnormalised until the end.
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * len;
    float m = -std::numeric_limits<float>::infinity();
    int64_t t = 0;
    if (len >= kLanes) {
      Vec vm = Vec::loadu(s);
      for (t = kLanes; t + kLanes <= len; t += kLanes) vm = at::vec::maximum(vm, Vec::loadu(s + t));
      m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
    }
    for (; t < len; ++t) m = std::max(m, s[t]);
    const Vec vmax(m);
    Vec vsum(0.f);
    for (t = 0; t + kLanes <= len; t += kLanes) {
      const Vec e = (Vec::loadu(s + t) - vmax).exp_u20();
      e.store(s + t);
      vsum = vsum + e;
    }
    float sum = hsum(vsum);
    for (; t < len; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    acc[heads * D + h] = 1.f / sum;  // acc holds heads * D sums, then one 1/sum per head
  }

  // Weighted sum of value rows. The query heads that share a kv head are summed together, a few
  // at a time with their accumulators in registers, so each value row is loaded and widened once
  // for all of them (it comes from cache: prefetched in the score pass).
  for (int64_t kv = 0; kv < kv_count; ++kv) {
    for (int64_t h = kv * G; h < (kv + 1) * G;) {
      if constexpr (NV > 0) {
        const int64_t n = std::min<int64_t>(kJointHeads<NV>, (kv + 1) * G - h);
        weighted_sums<C, Index, NV>(
            n, v_cache, table, len, kv, scores + h * len, acc + h * D, g, ahead, quota);
        h += n;
      } else {
        const float* p = scores + h * len;
        float* ah = acc + h * D;
        std::fill(ah, ah + D, 0.f);
        for (int64_t bi = 0; bi < nblocks; ++bi) {
          const C* vb = block_start(v_cache, bi) + kv * D;
          const int64_t rows = block_rows(bi);
          for (int64_t r = 0; r < rows; ++r) {
            const float w = p[bi * g.block_size + r];
            const C* vr = vb + r * g.cache_row_stride;
            for (int64_t d = 0; d < D; ++d) ah[d] += w * static_cast<float>(vr[d]);
          }
        }
        h += 1;
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float inv = acc[heads * D + h];
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<T>(acc[h * D + d] * inv);
  }
}

template <typename T, typename C, typename Index, int NV>
void run(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& lengths, at::Tensor& out, const Geometry& g) {
  const int64_t batch = q.size(0);
  const T* qp = q.data_ptr<T>();
  const C* kp = k_cache.data_ptr<C>();
  const C* vp = v_cache.data_ptr<C>();
  const Index* tp = block_tables.data_ptr<Index>();
  const Index* lp = lengths.data_ptr<Index>();
  T* op = out.data_ptr<T>();
  // Check every block id that will be read up front: a bad table must be an error, not a read
  // outside the cache.
  const int64_t num_blocks = k_cache.size(0);
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lp[b];
    TORCH_CHECK(
        len >= 0 && len <= g.max_blocks * g.block_size, "paged_decode_attention: length ", len,
        " does not fit the block table");
    max_len = std::max<int64_t>(max_len, len);
    for (int64_t bi = 0; bi * g.block_size < len; ++bi) {
      const int64_t block = tp[b * g.max_blocks + bi];
      TORCH_CHECK(block >= 0 && block < num_blocks, "paged_decode_attention: block id ", block, " out of range");
    }
  }
  // Whole sequences per task read whole block spans; with few sequences, split them by kv head
  // so that every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = batch >= 4 * threads ? 1 : g.kv_heads;
  const int64_t kv_per_task = g.kv_heads / splits;
  const int64_t task_heads = kv_per_task * g.group;
  // Grain 1: a task is a whole sequence's context, and lengths differ.
  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(task_heads * g.dim), acc(task_heads * (g.dim + 1));
    std::vector<float> scores(task_heads * std::max<int64_t>(max_len, 1));
    Lookahead<C, Index> ahead;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits, kv0 = (task % splits) * kv_per_task;
      const int64_t h0 = kv0 * g.group;
      if (task + 1 < end) {
        const int64_t nb = (task + 1) / splits, nkv0 = ((task + 1) % splits) * kv_per_task;
        ahead.start(
            kp + nkv0 * g.dim, vp + nkv0 * g.dim, tp + nb * g.max_blocks, lp[nb], kv_per_task * g.dim, g);
      } else {
        ahead.start(kp, vp, tp, 0, 0, g);  // this thread's last task: nothing to fetch
      }
      attend<T, C, Index, NV>(
          qp + b * g.q_row_stride + h0 * g.q_head_stride, kp + kv0 * g.dim, vp + kv0 * g.dim,
          tp + b * g.max_blocks, lp[b], op + b * g.out_row_stride + h0 * g.dim, kv_per_task, g,
          qf.data(), scores.data(), acc.data(), ahead);
    }
  });
}

template <typename T, typename C, typename Index>
void dispatch_width(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bt,
    const at::Tensor& len, at::Tensor& out, const Geometry& g) {
  // The common head sizes get the register-blocked path; anything else the scalar one.
  if (g.dim == 4 * kLanes) return run<T, C, Index, 4>(q, k, v, bt, len, out, g);
  if (g.dim == 8 * kLanes) return run<T, C, Index, 8>(q, k, v, bt, len, out, g);
  if (g.dim == 2 * kLanes) return run<T, C, Index, 2>(q, k, v, bt, len, out, g);
  if (g.dim == 16 * kLanes) return run<T, C, Index, 16>(q, k, v, bt, len, out, g);
  return run<T, C, Index, 0>(q, k, v, bt, len, out, g);
}

template <typename T, typename C>
void dispatch_index(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bt,
    const at::Tensor& len, at::Tensor& out, const Geometry& g) {
  if (bt.scalar_type() == at::kInt) return dispatch_width<T, C, int32_t>(q, k, v, bt, len, out, g);
  return dispatch_width<T, C, int64_t>(q, k, v, bt, len, out, g);
}

}  // namespace

// q `[B, heads, D]`, k/v cache `[num_blocks, block_size, kv_heads, D]`, block_tables
// `[B, max_blocks]`, lengths `[B]` (same integer type) -> `[B, heads, D]` in q's dtype. The cache
// is of q's dtype, or 16-bit (bf16 or fp16) under fp32 q: half the bytes to keep and to read.
at::Tensor paged_decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "paged_decode_attention: bad ranks");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_decode_attention: k/v cache shapes differ");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode_attention: k/v cache dtypes differ");
  TORCH_CHECK(
      q.scalar_type() == k_cache.scalar_type() || q.scalar_type() == at::kFloat,
      "paged_decode_attention: q must be fp32 or of the cache's dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: cache not contiguous");
  TORCH_CHECK(q.stride(2) == 1, "paged_decode_attention: q's last dim must be contiguous");
  TORCH_CHECK(
      block_tables.dim() == 2 && lengths.dim() == 1 && block_tables.size(0) == q.size(0) &&
          lengths.size(0) == q.size(0),
      "paged_decode_attention: block_tables/lengths do not match the batch");
  TORCH_CHECK(
      (block_tables.scalar_type() == at::kLong || block_tables.scalar_type() == at::kInt) &&
          lengths.scalar_type() == block_tables.scalar_type(),
      "paged_decode_attention: block_tables and lengths must both be int64 or both int32");
  const auto bt = block_tables.contiguous();
  const auto lens = lengths.contiguous();
  const int64_t heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim, "paged_decode_attention: head_dim differs between q and cache");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "paged_decode_attention: heads not a multiple of kv_heads");
  auto out = at::empty({q.size(0), heads, dim}, q.options());
  if (q.size(0) == 0) return out;
  Geometry g{};
  g.heads = heads;
  g.kv_heads = kv_heads;
  g.group = heads / kv_heads;
  g.dim = dim;
  g.block_size = k_cache.size(1);
  g.max_blocks = bt.size(1);
  g.cache_block_stride = k_cache.stride(0);
  g.cache_row_stride = k_cache.stride(1);
  g.q_row_stride = q.stride(0);
  g.q_head_stride = q.stride(1);
  g.out_row_stride = heads * dim;
  g.scale = static_cast<float>(scale);
  switch (k_cache.scalar_type()) {  // q is fp32 or the cache's dtype (checked above)
    case at::kFloat:
      dispatch_index<float, float>(q, k_cache, v_cache, bt, lens, out, g);
      break;
    case at::kBFloat16:
      if (q.scalar_type() == at::kFloat) {
        dispatch_index<float, at::BFloat16>(q, k_cache, v_cache, bt, lens, out, g);
      } else {
        dispatch_index<at::BFloat16, at::BFloat16>(q, k_cache, v_cache, bt, lens, out, g);
      }
      break;
    case at::kHalf:
      if (q.scalar_type() == at::kFloat) {
        dispatch_index<float, at::Half>(q, k_cache, v_cache, bt, lens, out, g);
      } else {
        dispatch_index<at::Half, at::Half>(q, k_cache, v_cache, bt, lens, out, g);
      }
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", k_cache.scalar_type());
  }
  return out;
}

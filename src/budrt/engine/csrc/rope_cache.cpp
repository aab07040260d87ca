// One call per layer for a decode-only step on CPU: RoPE on q and k, k and v written into the paged
// cache at their slots, then paged decode attention (paged_attention.cpp) over the cache. Steps
// with prompt chunks take the RoPE and the cache write alone (rope_cache_write).
//
// The torch path does the same in about fifteen small ops per layer (slices, roll, two multiplies
// and an add for RoPE, two index_copy_ for the cache, the attention call), each costing more
// dispatch than arithmetic at one decoding row. RoPE here rounds exactly as torch's bf16 ops do:
// x * cos and roll(x) * signed_sin are each rounded to bf16, then their sum. fp32 is the same
// without the roundings to bf16: each product and the sum rounded to fp32, as torch's three fp32 ops
// round them (kept from being fused into an FMA, which g++ does by default even in ISO mode).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <vector>

at::Tensor paged_decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& lengths, double scale);

namespace budrt_rope {

using bf16 = at::BFloat16;

// dst[d] = x[d] * cos[d] + x[(d + D/2) % D] * signed_sin[d], each product and the sum rounded to T
// as torch's ops in T round them.
template <typename T>
inline void rope_head(const T* x, const T* cos, const T* sin, T* dst, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const T rolled = x[d < half ? d + half : d - half];
    float a = static_cast<float>(static_cast<T>(static_cast<float>(x[d]) * static_cast<float>(cos[d])));
    float b = static_cast<float>(static_cast<T>(static_cast<float>(rolled) * static_cast<float>(sin[d])));
    if constexpr (std::is_same_v<T, float>) {
#if defined(__GNUC__)
      asm("" : "+x"(a), "+x"(b));  // the products as rounded values: no multiply-add across this line
#endif
    }
    dst[d] = static_cast<T>(a + b);
  }
}

}  // namespace budrt_rope

namespace budrt_rope {

// The cache holds T (the activations' dtype), or C = bf16/fp16 under fp32 activations: then a key
// is RoPE'd in fp32 and rounded once to C, a value rounded once (ATen's vectorized conversions).
template <typename T, typename C>
void rope_and_write(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const int64_t* slot, int64_t num_heads, at::Tensor& q, T* keys_out) {
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(2), dim = k_cache.size(3);
  const int64_t width = (num_heads + 2 * kv_heads) * dim;
  const T* src = qkv.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  T* q_out = q.data_ptr<T>();
  C* keys = k_cache.data_ptr<C>();
  C* values = v_cache.data_ptr<C>();
  const int64_t slot_stride = kv_heads * dim;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<T> rotated(keys_out != nullptr ? 0 : dim);  // a key before its rounding to C
    for (int64_t n = begin; n < end; ++n) {
      const T* row = src + n * width;
      const T* cn = c + n * dim;
      const T* sn = s + n * dim;
      for (int64_t h = 0; h < num_heads; ++h) {
        rope_head(row + h * dim, cn, sn, q_out + (n * num_heads + h) * dim, dim);
      }
      C* k_dst = keys + slot[n] * slot_stride;
      C* v_dst = values + slot[n] * slot_stride;
      for (int64_t j = 0; j < kv_heads; ++j) {
        const T* v_src = row + (num_heads + kv_heads + j) * dim;
        if constexpr (std::is_same_v<T, C>) {
          rope_head(row + (num_heads + j) * dim, cn, sn, k_dst + j * dim, dim);
          if (keys_out != nullptr) std::copy(k_dst + j * dim, k_dst + (j + 1) * dim, keys_out + (n * kv_heads + j) * dim);
          std::copy(v_src, v_src + dim, v_dst + j * dim);
        } else {
          T* key = keys_out != nullptr ? keys_out + (n * kv_heads + j) * dim : rotated.data();
          rope_head(row + (num_heads + j) * dim, cn, sn, key, dim);
          at::vec::convert(key, k_dst + j * dim, dim);
          at::vec::convert(v_src, v_dst + j * dim, dim);
        }
      }
    }
  });
}

// RoPE'd q `[N, heads, D]`, after writing each row's RoPE'd key and value at its slot of the cache;
// the RoPE'd keys also go to `keys` (`[N, kv_heads, D]`) when it is defined. bf16 or fp32, all alike.
at::Tensor rope_and_write(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, int64_t num_heads, const at::Tensor& keys, const char* who) {
  const auto dtype = qkv.scalar_type(), cache_dtype = k_cache.scalar_type();
  for (const at::Tensor* t : {&qkv, &cos, &sin, &k_cache, &v_cache}) {
    const auto expected = (t == &k_cache || t == &v_cache) ? cache_dtype : dtype;
    TORCH_CHECK(t->device().is_cpu() && (dtype == at::kBFloat16 || dtype == at::kFloat) &&
                    t->scalar_type() == expected && t->is_contiguous(),
                who, ": contiguous CPU tensors, all bf16 or all fp32 (the cache may be bf16/fp16 under fp32)");
  }
  TORCH_CHECK(
      cache_dtype == dtype || (dtype == at::kFloat && (cache_dtype == at::kBFloat16 || cache_dtype == at::kHalf)),
      who, ": the cache must be of qkv's dtype, or bf16/fp16 under fp32");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1, who, ": slots int64 [N]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), who, ": k/v cache [blocks, block_size, kv_heads, D]");
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(2), dim = k_cache.size(3);
  const int64_t width = (num_heads + 2 * kv_heads) * dim;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width, who, ": qkv must be [N, ", width, "]");
  TORCH_CHECK(cos.numel() == rows * dim && sin.numel() == rows * dim, who, ": cos/sin [N, D]");
  TORCH_CHECK(slots.size(0) == rows && dim % 2 == 0, who, ": bad slots or head_dim");
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  const auto slot_ids = slots.contiguous();
  const int64_t* slot = slot_ids.data_ptr<int64_t>();
  for (int64_t n = 0; n < rows; ++n) {
    TORCH_CHECK(slot[n] >= 0 && slot[n] < capacity, who, ": slot ", slot[n], " out of range");
  }
  auto q = at::empty({rows, num_heads, dim}, qkv.options());
  if (dtype == at::kBFloat16) {
    rope_and_write<bf16, bf16>(qkv, cos, sin, k_cache, v_cache, slot, num_heads, q, keys.defined() ? keys.data_ptr<bf16>() : nullptr);
    return q;
  }
  float* keys_out = keys.defined() ? keys.data_ptr<float>() : nullptr;
  if (cache_dtype == at::kFloat) {
    rope_and_write<float, float>(qkv, cos, sin, k_cache, v_cache, slot, num_heads, q, keys_out);
  } else if (cache_dtype == at::kBFloat16) {
    rope_and_write<float, bf16>(qkv, cos, sin, k_cache, v_cache, slot, num_heads, q, keys_out);
  } else {
    rope_and_write<float, at::Half>(qkv, cos, sin, k_cache, v_cache, slot, num_heads, q, keys_out);
  }
  return q;
}

}  // namespace budrt_rope

// qkv `[N, (heads + 2 kv_heads) * D]` (the fused projection's output), cos/signed sin `[N, D]`,
// k/v cache `[num_blocks, block_size, kv_heads, D]`, slots `[N]` int64, block_tables and lengths
// as paged_decode_attention takes them -> `[N, heads * D]`; all bf16 or all fp32 (the cache may be
// bf16/fp16 under fp32).
at::Tensor rope_cache_decode_attention(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& block_tables,
    const at::Tensor& lengths, int64_t num_heads, double scale) {
  const auto q = budrt_rope::rope_and_write(
      qkv, cos, sin, k_cache, v_cache, slots, num_heads, at::Tensor(), "rope_cache_decode_attention");
  const int64_t rows = qkv.size(0), dim = k_cache.size(3);
  return paged_decode_attention(q, k_cache, v_cache, block_tables, lengths, scale).view({rows, num_heads * dim});
}

// The same RoPE and cache write for a step with prompt chunks, whose attention is done apart
// (engine/attention.py): -> (q `[N, heads, D]`, keys `[N, kv_heads, D]`), both RoPE'd.
std::tuple<at::Tensor, at::Tensor> rope_cache_write(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, int64_t num_heads) {
  TORCH_CHECK(k_cache.dim() == 4, "rope_cache_write: k/v cache [blocks, block_size, kv_heads, D]");
  auto keys = at::empty({qkv.size(0), k_cache.size(2), k_cache.size(3)}, qkv.options());
  auto q = budrt_rope::rope_and_write(
      qkv, cos, sin, k_cache, v_cache, slots, num_heads, keys, "rope_cache_write");
  return {q, keys};
}

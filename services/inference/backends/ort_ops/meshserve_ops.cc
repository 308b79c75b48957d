// meshserve's own ONNX Runtime operators (domain "meshserve.ops"), loaded into the CPU provider with
// SessionOptions.register_custom_ops_library. Built against ONNX Runtime's C API version 23 (the header
// of Debian's libonnxruntime-dev 1.23): a newer runtime serves older API versions, so this library loads
// into the pinned onnxruntime wheel (tests/integration/test_ort_ops.py proves it on every run).
//
// RowQuantize(x float [..., k]) -> (codes uint8 [..., k], scale float [..., 1])
//   Symmetric int8 per row, stored with the zero point 128 that MatMulIntegerToFloat takes:
//   code = round_half_even(x' / scale) + 128, scale = max|x'| / 127, where x' is x, or with
//   attribute hadamard_block = b > 0, x times the orthonormal block-diagonal Sylvester-Hadamard
//   matrix of blocks of b (the weights were rotated alike offline). One kernel instead of the six
//   standard operators it replaces; each row depends on its own values alone.
//
// PackedAttention(qkv, seg_slots, seg_cached, seg_lengths, cos, sin, past_key, past_value)
//     -> (attn, present_key, present_value)
//   Causal grouped-query attention with rotary embedding over packed rows of different lengths: one
//   step's tokens, decode rows (1 token) and prefill chunks alike, in one [T, ...] tensor with no padding.
//   Segment s is seg_lengths[s] consecutive tokens of KV-cache slot seg_slots[s], at positions
//   seg_cached[s] + 0, 1, ...; it attends to that slot's cached positions and its own tokens up to each.
//     qkv          float [T, (H + 2G) * D]   q of H heads, then k and v of G heads, per token
//     seg_*        int64 [S]                 segments in token order; lengths >= 1 summing to T
//     cos, sin     float [P, D / 2]          rotary tables (non-interleaved halves), P positions
//     past_key     cache [N, G, C / 16, D, 16]   keys after RoPE, in blocks of 16 positions, each block
//                                             stored dimension-major, so 16 keys' scores are 16-wide FMAs
//     past_value   cache [N, G, C, D]          (cache: float16, or float32; a kernel for each)
//     attn         float [T, H * D]
//     present_*    the caches with the step's keys and values written in; bind them to past_*'s memory
//                  (then nothing else is copied), otherwise past is copied into them first.
//   A float16 cache is what the quantized models serve: a decode step is bound by reading the cache, and
//   half the bytes is what makes it faster. Keys and values are rounded to the nearest float16 (saturating
//   at +-65504) when written; every read widens them exactly and all arithmetic is float32. The float32
//   cache keeps the fp32 model an exact reference.
//   Every query is computed by one thread in one fixed order that depends only on its position and the
//   cached values, never on the other rows of the step: output is batch-invariant by construction.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <mutex>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT  // the runtime hands its API table to RegisterCustomOps
#include "onnxruntime_lite_custom_op.h"

namespace {

constexpr const char* kDomain = "meshserve.ops";
// __builtin_cpu_supports reads what __builtin_cpu_init filled in, which a static initializer must call itself
const bool kHasAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}();

// In-place fast Walsh-Hadamard transform of n = 2^m values, scaled to be orthonormal.
void hadamard_in_place(float* v, int64_t n) {
  for (int64_t h = 1; h < n; h <<= 1) {
    for (int64_t i = 0; i < n; i += h << 1) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int64_t i = 0; i < n; ++i) v[i] *= norm;
}

// The same transform for one block of 64 in four AVX-512 registers: stages 1-8 exchange lanes inside a
// register (the lane whose bit h is set takes partner - self, the other self + partner), stages 16 and 32
// combine registers. Same additions in the same order as hadamard_in_place, so the same result.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // inside GCC 12's _mm512_permutexvar_ps
__attribute__((target("avx512f"))) void hadamard64_avx512(float* v) {
  __m512 r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm512_loadu_ps(v + 16 * i);
  // lane ^ h for h = 1, 2, 4, 8; and the lanes whose bit h is set
  static const __m512i partner[4] = {
      _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1),
      _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2),
      _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4),
      _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8)};
  static constexpr __mmask16 upper[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  for (int stage = 0; stage < 4; ++stage) {
    for (auto& x : r) {
      const __m512 p = _mm512_permutexvar_ps(partner[stage], x);
      x = _mm512_mask_sub_ps(_mm512_add_ps(x, p), upper[stage], p, x);
    }
  }
  for (int h = 1; h < 4; h <<= 1) {
    for (int i = 0; i < 4; ++i) {
      if (i & h) continue;
      const __m512 a = r[i], b = r[i + h];
      r[i] = _mm512_add_ps(a, b);
      r[i + h] = _mm512_sub_ps(a, b);
    }
  }
  const __m512 norm = _mm512_set1_ps(0.125f);  // 1 / sqrt(64)
  for (int i = 0; i < 4; ++i) _mm512_storeu_ps(v + 16 * i, _mm512_mul_ps(r[i], norm));
}
#pragma GCC diagnostic pop

// One row: peak, scale, codes. Cloned for AVX-512, AVX2 and baseline x86-64 (picked at load time),
// written so that each loop vectorizes: no libm calls, rounding by the 1.5 * 2^23 trick (round half to
// even in the default rounding mode, exact for |v| < 2^22, and |v| <= 127 here).
__attribute__((target_clones("avx512f", "avx2", "default"))) float quantize_row(const float* values, int64_t k,
                                                                               uint8_t* dst) {
  float peak = 0.0f;
#pragma omp simd reduction(max : peak)
  for (int64_t i = 0; i < k; ++i) {
    const float a = values[i] < 0.0f ? -values[i] : values[i];
    peak = a > peak ? a : peak;
  }
  const float s = peak > 0.0f ? peak / 127.0f : 1.0f;
  const float inv = 1.0f / s;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) {
    float q = (values[i] * inv + kRound) - kRound;
    q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
    dst[i] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
  }
  return s;
}

struct RowQuantize {
  RowQuantize(const OrtApi* api, const OrtKernelInfo* info) {
    int64_t block = 0;
    OrtStatus* status = api->KernelInfoGetAttribute_int64(info, "hadamard_block", &block);
    if (status != nullptr) {
      api->ReleaseStatus(status);  // the attribute is optional
      block = 0;
    }
    if (block < 0 || (block & (block - 1)) != 0) {
      ORT_CXX_API_THROW("RowQuantize: hadamard_block must be 0 or a power of two", ORT_INVALID_ARGUMENT);
    }
    hadamard_block_ = block;
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      Ort::Custom::Tensor<uint8_t>& codes, Ort::Custom::Tensor<float>& scales) {
    const std::vector<int64_t> shape = x.Shape();
    if (shape.empty()) return Ort::Status("RowQuantize: x must have at least one dimension", ORT_INVALID_ARGUMENT);
    const int64_t k = shape.back();
    if (hadamard_block_ > 0 && k % hadamard_block_ != 0) {
      return Ort::Status("RowQuantize: the last dimension is not a multiple of hadamard_block", ORT_INVALID_ARGUMENT);
    }
    std::vector<int64_t> scale_shape = shape;
    scale_shape.back() = 1;
    Rows job{x.Data(), codes.Allocate(shape), scales.Allocate(scale_shape), k, hadamard_block_,
             k == 0 ? 0 : x.NumberOfElement() / k};
    // a decode step's few rows are cheaper than waking the thread pool; a prefill chunk's are not
    constexpr int64_t kRowsPerTask = 16;
    const int64_t tasks = (job.rows + kRowsPerTask - 1) / kRowsPerTask;
    if (tasks <= 1 || job.rows * k < (1 << 16)) {
      job.run(0, job.rows);
    } else {
      job.per_task = kRowsPerTask;
      Ort::KernelContext(context).ParallelFor(&Rows::task, static_cast<size_t>(tasks), 0, &job);
    }
    return Ort::Status{nullptr};
  }

  struct Rows {
    const float* in;
    uint8_t* out;
    float* scale;
    int64_t k, hadamard_block, rows, per_task = 0;

    void run(int64_t first, int64_t last) const {
      std::vector<float> row(hadamard_block > 0 ? static_cast<size_t>(k) : 0);
      for (int64_t r = first; r < last; ++r) {
        const float* values = in + r * k;
        if (hadamard_block > 0) {
          std::memcpy(row.data(), values, sizeof(float) * static_cast<size_t>(k));
          for (int64_t b = 0; b < k; b += hadamard_block) {
            if (hadamard_block == 64 && kHasAvx512) {
              hadamard64_avx512(row.data() + b);
            } else {
              hadamard_in_place(row.data() + b, hadamard_block);
            }
          }
          values = row.data();
        }
        scale[r] = quantize_row(values, k, out + r * k);
      }
    }

    static void task(void* self, size_t index) {
      const Rows& job = *static_cast<const Rows*>(self);
      const int64_t first = static_cast<int64_t>(index) * job.per_task;
      job.run(first, std::min(job.rows, first + job.per_task));
    }
  };

  int64_t hadamard_block_ = 0;
};


// e^x for x <= 0 (Cephes' expf polynomial), in arithmetic alone so that loops over it vectorize.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: round to nearest
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

constexpr int64_t kKeyBlock = 16;  // positions per key block of the cache (one AVX-512 register of scores)

using Half = Ort::Float16_t;
static_assert(sizeof(Half) == sizeof(uint16_t), "Ort::Float16_t is the 16 bits of an IEEE half");

// The one rounding of the cache, the same on every CPU: nearest even, saturating instead of infinity.
inline Half to_half(float x) {
  constexpr float kMax = 65504.0f;
  return Half(x > kMax ? kMax : (x < -kMax ? -kMax : x));
}
inline float to_float(Half h) { return h.ToFloat(); }  // exact
inline float to_float(float x) { return x; }
inline void store(Half* dst, float x) { *dst = to_half(x); }
inline void store(float* dst, float x) { *dst = x; }

// 16 cache values at p, as float32 (halves widened exactly, as to_float)
// (the zero-masked form: GCC 12's _mm512_cvtph_ps warns of its own undefined source register)
__attribute__((target("avx512f"))) inline __m512 load16(const Half* p) {
  return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// AVX-512 kernels for head_dim 64 (the generic loops in PackedAttentionJob::run serve other shapes and CPUs).
// Scores of one block of 16 keys (dimension-major) for R query rows: two partial sums a row (even and odd
// dimensions), so that independent FMA chains overlap; a row's arithmetic does not depend on R.
template <int R, typename Cache>
__attribute__((target("avx512f"))) void block_scores64_rows(const Cache* kt, const float* const* q, float* const* out) {
  __m512 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  for (int i = 0; i < 64; i += 2) {
    const __m512 k0 = load16(kt + i * kKeyBlock), k1 = load16(kt + (i + 1) * kKeyBlock);
    for (int r = 0; r < R; ++r) {
      even[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][i]), k0, even[r]);
      odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][i + 1]), k1, odd[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], _mm512_add_ps(even[r], odd[r]));
}

template <typename Cache>
__attribute__((target("avx512f"))) void block_scores64(int64_t rows, const Cache* kt, const float* const* q,
                                                        float* const* out) {
  switch (rows) {
    case 1: return block_scores64_rows<1, Cache>(kt, q, out);
    case 2: return block_scores64_rows<2, Cache>(kt, q, out);
    case 3: return block_scores64_rows<3, Cache>(kt, q, out);
    case 4: return block_scores64_rows<4, Cache>(kt, q, out);
    case 5: return block_scores64_rows<5, Cache>(kt, q, out);
    case 6: return block_scores64_rows<6, Cache>(kt, q, out);
    case 7: return block_scores64_rows<7, Cache>(kt, q, out);
    default: return block_scores64_rows<8, Cache>(kt, q, out);  // rows <= 8 (the caller's `fast` condition)
  }
}

// dst = scale * sum_k p[k] v[k] over n value rows of 64: even and odd keys in separate accumulators.
template <typename Cache>
__attribute__((target("avx512f"))) void weighted_values64(const float* p, const Cache* v, int64_t n, float scale,
                                                           float* dst) {
  __m512 a[8];
  for (auto& x : a) x = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 1 < n; k += 2, v += 128) {
    const __m512 w0 = _mm512_set1_ps(p[k]), w1 = _mm512_set1_ps(p[k + 1]);
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm512_fmadd_ps(w0, load16(v + 16 * i), a[i]);
      a[4 + i] = _mm512_fmadd_ps(w1, load16(v + 64 + 16 * i), a[4 + i]);
    }
  }
  if (k < n) {
    const __m512 w = _mm512_set1_ps(p[k]);
    for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(w, load16(v + 16 * i), a[i]);
  }
  const __m512 factor = _mm512_set1_ps(scale);
  for (int i = 0; i < 4; ++i) _mm512_storeu_ps(dst + 16 * i, _mm512_mul_ps(_mm512_add_ps(a[i], a[4 + i]), factor));
}

struct AttentionShape {
  int64_t heads, kv_heads, head_dim, slots, capacity, positions;
  int64_t group() const { return heads / kv_heads; }
  int64_t qkv_width() const { return (heads + 2 * kv_heads) * head_dim; }
  // offsets into the caches: keys [N, G, C/16, D, 16], values [N, G, C, D]
  int64_t key_block(int64_t slot, int64_t g, int64_t position) const {
    return ((slot * kv_heads + g) * (capacity / kKeyBlock) + position / kKeyBlock) * head_dim * kKeyBlock;
  }
  int64_t value_row(int64_t slot, int64_t g, int64_t position) const {
    return ((slot * kv_heads + g) * capacity + position) * head_dim;
  }
};

// Rotates x [D] at one position (non-interleaved halves) into out, times `scale`.
inline void rotate(const float* x, const float* cos, const float* sin, int64_t d, float scale, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = (x[i] * cos[i] - x[i + half] * sin[i]) * scale;
    out[i + half] = (x[i + half] * cos[i] + x[i] * sin[i]) * scale;
  }
}

template <typename Cache>
struct PackedAttentionJob {
  AttentionShape shape;
  const float *qkv, *cos, *sin;
  const Cache* keys;    // present_key, already holding the step's keys
  const Cache* values;  // present_value
  float* out;
  struct Task {
    int64_t slot, g, first_position, first_token, count;
  };
  std::vector<Task> tasks;

  static void task(void* self, size_t index) {
    const auto& job = *static_cast<const PackedAttentionJob<Cache>*>(self);
    job.run(job.tasks[index]);
  }

  // The query heads of kv head `g` for `count` consecutive tokens of one segment, two tokens at a time
  // (they share the loads of each key block). A token's arithmetic is the same alone or paired.
  __attribute__((target_clones("avx512f", "avx2", "default"))) void run(const Task& t) const {
    const AttentionShape& s = shape;
    const int64_t d = s.head_dim, group = s.group();
    const bool fast = kHasAvx512 && d == 64 && group <= 8;
    const int64_t pair = fast && 2 * group <= 8 ? 2 : 1;
    thread_local std::vector<float> scores, query, acc;
    scores.resize(static_cast<size_t>(pair * group * s.capacity));
    query.resize(static_cast<size_t>(pair * group * d));
    acc.resize(static_cast<size_t>(group * d));
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    for (int64_t j0 = 0; j0 < t.count; j0 += pair) {
      const int64_t tokens = std::min(pair, t.count - j0), rows = tokens * group;
      const float* q_rows[16];
      float* score_rows[16];
      for (int64_t j = 0; j < tokens; ++j) {
        const int64_t position = t.first_position + j0 + j;
        const float* row = qkv + (t.first_token + j0 + j) * s.qkv_width();
        for (int64_t h = 0; h < group; ++h) {
          const int64_t r = j * group + h;
          rotate(row + (t.g * group + h) * d, cos + position * (d / 2), sin + position * (d / 2), d, scale,
                 query.data() + r * d);
          q_rows[r] = query.data() + r * d;
          score_rows[r] = scores.data() + r * s.capacity;
        }
      }
      // scores, a block of 16 keys at a time: up to the last token's position
      const int64_t last_seen = t.first_position + j0 + tokens;
      for (int64_t b = 0; b * kKeyBlock < last_seen; ++b) {
        const Cache* block = keys + s.key_block(t.slot, t.g, b * kKeyBlock);
        float* out_rows[16];
        for (int64_t r = 0; r < rows; ++r) out_rows[r] = score_rows[r] + b * kKeyBlock;
        if (fast) {
          block_scores64(rows, block, q_rows, out_rows);
          continue;
        }
        for (int64_t r = 0; r < rows; ++r) {
          float lanes[kKeyBlock] = {};
          for (int64_t i = 0; i < d; ++i) {
            const float qi = q_rows[r][i];
#pragma omp simd
            for (int64_t l = 0; l < kKeyBlock; ++l) lanes[l] += qi * to_float(block[i * kKeyBlock + l]);
          }
          std::memcpy(out_rows[r], lanes, sizeof(lanes));
        }
      }
      // per token and head: softmax over positions [0, position], then the weighted sum of values
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = r / group, h = r % group, token = t.first_token + j0 + j;
        const int64_t keys_seen = t.first_position + j0 + j + 1;
        float* p = score_rows[r];
        float peak = p[0];
#pragma omp simd reduction(max : peak)
        for (int64_t k = 0; k < keys_seen; ++k) peak = p[k] > peak ? p[k] : peak;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < keys_seen; ++k) {
          p[k] = exp_nonpositive(p[k] - peak);
          sum += p[k];
        }
        const Cache* v = values + s.value_row(t.slot, t.g, 0);
        float* dst = out + token * s.heads * d + (t.g * group + h) * d;
        if (fast) {
          weighted_values64(p, v, keys_seen, 1.0f / sum, dst);
          continue;
        }
        float* a = acc.data();
        std::fill(a, a + d, 0.0f);
        for (int64_t k = 0; k < keys_seen; ++k, v += d) {
          const float w = p[k];
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += w * to_float(v[i]);
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < d; ++i) dst[i] = a[i] * inv;
      }
    }
  }
};

template <typename Cache>
struct PackedAttention {
  PackedAttention(const OrtApi* api, const OrtKernelInfo* info) {
    heads_ = required(api, info, "num_heads");
    kv_heads_ = required(api, info, "kv_num_heads");
    if (heads_ < 1 || kv_heads_ < 1 || heads_ % kv_heads_ != 0 || heads_ / kv_heads_ > 64) {
      ORT_CXX_API_THROW("PackedAttention: num_heads must be a multiple of kv_num_heads, at most 64 times it",
                        ORT_INVALID_ARGUMENT);
    }
  }

  static int64_t required(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
    int64_t value = 0;
    if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, name, &value)) {
      api->ReleaseStatus(status);
      ORT_CXX_API_THROW(std::string("PackedAttention: attribute ") + name + " is required", ORT_INVALID_ARGUMENT);
    }
    return value;
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& qkv,
                      const Ort::Custom::Tensor<int64_t>& seg_slots, const Ort::Custom::Tensor<int64_t>& seg_cached,
                      const Ort::Custom::Tensor<int64_t>& seg_lengths, const Ort::Custom::Tensor<float>& cos,
                      const Ort::Custom::Tensor<float>& sin, const Ort::Custom::Tensor<Cache>& past_key,
                      const Ort::Custom::Tensor<Cache>& past_value, Ort::Custom::Tensor<float>& attn,
                      Ort::Custom::Tensor<Cache>& present_key, Ort::Custom::Tensor<Cache>& present_value) {
    auto invalid = [](const std::string& why) { return Ort::Status(("PackedAttention: " + why).c_str(), ORT_INVALID_ARGUMENT); };
    const auto kshape = past_key.Shape(), vshape = past_value.Shape(), qshape = qkv.Shape(), rshape = cos.Shape();
    if (rshape.size() != 2 || sin.Shape() != rshape) return invalid("cos and sin must both be [positions, head_dim / 2]");
    AttentionShape s{heads_, kv_heads_, 2 * rshape[1], 0, 0, rshape[0]};
    if (s.head_dim % 16 != 0) return invalid("head_dim must be a multiple of 16");
    if (kshape.size() != 5 || kshape[1] != s.kv_heads || kshape[3] != s.head_dim || kshape[4] != kKeyBlock) {
      return invalid("past_key must be [slots, kv_num_heads, capacity / 16, head_dim, 16]");
    }
    s.slots = kshape[0];
    s.capacity = kshape[2] * kKeyBlock;
    if (vshape != std::vector<int64_t>{s.slots, s.kv_heads, s.capacity, s.head_dim}) {
      return invalid("past_value must be [slots, kv_num_heads, capacity, head_dim], matching past_key");
    }
    if (qshape.size() != 2 || qshape[1] != s.qkv_width()) return invalid("qkv must be [tokens, (num_heads + 2 kv_num_heads) head_dim]");
    const int64_t tokens = qshape[0], segments = seg_slots.NumberOfElement();
    if (seg_cached.NumberOfElement() != segments || seg_lengths.NumberOfElement() != segments) {
      return invalid("seg_slots, seg_cached and seg_lengths must have one value per segment");
    }
    const int64_t *slot = seg_slots.Data(), *cached = seg_cached.Data(), *length = seg_lengths.Data();
    int64_t counted = 0;
    for (int64_t i = 0; i < segments; ++i) {
      if (slot[i] < 0 || slot[i] >= s.slots) return invalid("a segment's slot is outside the cache");
      if (length[i] < 1 || cached[i] < 0) return invalid("segments need a length >= 1 and a cached length >= 0");
      if (cached[i] + length[i] > std::min(s.capacity, s.positions)) return invalid("a segment runs past the cache or the rotary table");
      counted += length[i];
    }
    if (counted != tokens) return invalid("seg_lengths must sum to the number of tokens");

    Cache* keys = present_key.Allocate(kshape);
    Cache* values = present_value.Allocate(vshape);
    if (keys != past_key.Data()) std::memcpy(keys, past_key.Data(), sizeof(Cache) * static_cast<size_t>(past_key.NumberOfElement()));
    if (values != past_value.Data()) std::memcpy(values, past_value.Data(), sizeof(Cache) * static_cast<size_t>(past_value.NumberOfElement()));
    PackedAttentionJob<Cache> job{s, qkv.Data(), cos.Data(), sin.Data(), keys, values,
                           attn.Allocate({tokens, s.heads * s.head_dim}), {}};
    // 1. the step's keys (rotated) and values into the cache, so that every query reads them from there
    const int64_t d = s.head_dim, half = d / 2;
    std::vector<float> rotated(static_cast<size_t>(d));
    for (int64_t i = 0, token = 0; i < segments; ++i) {
      for (int64_t j = 0; j < length[i]; ++j, ++token) {
        const int64_t position = cached[i] + j;
        const float* row = job.qkv + token * s.qkv_width();
        for (int64_t g = 0; g < s.kv_heads; ++g) {
          rotate(row + (s.heads + g) * d, job.cos + position * half, job.sin + position * half, d, 1.0f, rotated.data());
          Cache* block = keys + s.key_block(slot[i], g, position);
          for (int64_t e = 0; e < d; ++e) store(block + e * kKeyBlock + position % kKeyBlock, rotated[static_cast<size_t>(e)]);
          const float* value = row + (s.heads + s.kv_heads + g) * d;
          Cache* cached_value = values + s.value_row(slot[i], g, position);
          for (int64_t e = 0; e < d; ++e) store(cached_value + e, value[e]);
        }
      }
    }
    // 2. attention: a task per kv head and run of up to 8 tokens of a segment
    constexpr int64_t kTokensPerTask = 8;
    for (int64_t i = 0, token = 0; i < segments; token += length[i], ++i) {
      for (int64_t first = 0; first < length[i]; first += kTokensPerTask) {
        for (int64_t g = 0; g < s.kv_heads; ++g) {
          job.tasks.push_back({slot[i], g, cached[i] + first, token + first, std::min(kTokensPerTask, length[i] - first)});
        }
      }
    }
    if (job.tasks.size() == 1) {
      job.run(job.tasks[0]);
    } else {
      Ort::KernelContext(context).ParallelFor(&PackedAttentionJob<Cache>::task, job.tasks.size(), 0, &job);
    }
    return Ort::Status{nullptr};
  }

  int64_t heads_ = 0, kv_heads_ = 0;
};

}  // namespace

extern "C" {

// The entry point ONNX Runtime calls when the library is registered with a session's options.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than the header cannot serve its API version
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "meshserve.ops needs ONNX Runtime C API version 23 (onnxruntime >= 1.23); upgrade onnxruntime");
  }
  Ort::InitApi(api);
  // ONNX Runtime keeps pointers to the domain and its operators for the sessions' lifetime.
  static Ort::CustomOpDomain domain{kDomain};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> row_quantize{
      Ort::Custom::CreateLiteCustomOp<RowQuantize>("RowQuantize", "CPUExecutionProvider")};
  // one operator, a kernel per cache type (the session picks it by past_key's type)
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> packed_attention_half{
      Ort::Custom::CreateLiteCustomOp<PackedAttention<Half>>("PackedAttention", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> packed_attention_float{
      Ort::Custom::CreateLiteCustomOp<PackedAttention<float>>("PackedAttention", "CPUExecutionProvider")};
  static std::once_flag added;
  std::call_once(added, [] {
    domain.Add(row_quantize.get());
    domain.Add(packed_attention_half.get());
    domain.Add(packed_attention_float.get());
  });
  try {
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"

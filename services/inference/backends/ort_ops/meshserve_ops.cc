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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <mutex>
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
  static std::once_flag added;
  std::call_once(added, [] { domain.Add(row_quantize.get()); });
  try {
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"

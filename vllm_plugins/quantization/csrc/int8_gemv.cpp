// CPU W8A8 GEMM for small batches: int8 per-channel weights, dynamic
// per-token symmetric int8 activations (scale max|x| / 127, round half to even,
// clamp to +-127), int32 accumulation.
//
// Weights stay in the checkpoint's layout, int8 [N, K] row-major, K % 64 == 0,
// N % 4 == 0. wsum[n] = sum_k w[n, k] (int32) is precomputed at load.
// out[m, n] = (sum_k qx[m, k] * w[n, k]) * sx[m] * sw[n], in x's dtype.
//
// The AVX512-VNNI path shifts the activations to unsigned (qx + 128) for
// vpdpbusd (u8 x s8 -> s32) and subtracts 128 * wsum[n]; integer sums are
// exact, so it agrees bit for bit with the portable path. From
// dequant_min_rows rows on, one int8 GEMM (at::_int_mm) runs instead.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define VP_X86 1
#else
#define VP_X86 0
#endif

namespace {

constexpr int64_t kRows = 4;
constexpr int64_t kBlock = 64;
constexpr int64_t kMaxRows = 4;  // activation rows per weight pass

bool cpu_has_avx512vnni() {
#if VP_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Per-token quantization as vllm_plugins.quantization.packing.quantize_per_token_int8.
void quantize_rows(const at::Tensor& x, std::vector<int8_t>& q, std::vector<float>& s) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t m = xf.size(0), k = xf.size(1);
  const float* xp = xf.data_ptr<float>();
  q.resize(m * k);
  s.resize(m);
  for (int64_t i = 0; i < m; ++i) {
    const float* row = xp + i * k;
    float amax = 0.f;
    for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::fabs(row[j]));
    const float scale = std::max(amax, 1e-10f) / 127.f;
    s[i] = scale;
    for (int64_t j = 0; j < k; ++j) {
      const float v = std::nearbyint(row[j] / scale);
      q[i * k + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
  }
}

void tile_portable(const int8_t* q, int64_t mb, const int8_t* w, int64_t k, int32_t* out) {
  for (int64_t b = 0; b < mb; ++b)
    for (int64_t r = 0; r < kRows; ++r) {
      int32_t acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += static_cast<int32_t>(q[b * k + j]) * w[r * k + j];
      out[b * kRows + r] = acc;
    }
}

#if VP_X86
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(const uint8_t* xu, const int8_t* w,
                                                                         int64_t k, const int32_t* wsum,
                                                                         int32_t* out) {
  __m512i acc[MB][kRows];
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) acc[b][r] = _mm512_setzero_si512();
  for (int64_t c = 0; c < k; c += kBlock) {
    __m512i wr[kRows];
    for (int r = 0; r < kRows; ++r) wr[r] = _mm512_loadu_si512(w + r * k + c);
    for (int b = 0; b < MB; ++b) {
      const __m512i xb = _mm512_loadu_si512(xu + b * k + c);
      for (int r = 0; r < kRows; ++r) acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], xb, wr[r]);
    }
  }
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) out[b * kRows + r] = _mm512_reduce_add_epi32(acc[b][r]) - 128 * wsum[r];
}
#endif

at::Tensor finish(const at::Tensor& acc, const std::vector<float>& sx, const at::Tensor& sw, at::ScalarType dtype) {
  const at::Tensor sxt = at::from_blob(const_cast<float*>(sx.data()), {static_cast<int64_t>(sx.size()), 1},
                                       at::TensorOptions().dtype(at::kFloat));
  return (acc.to(at::kFloat) * sxt * sw.reshape({1, -1})).to(dtype);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& sw,
                       int64_t dequant_min_rows, bool portable) {
  TORCH_CHECK(x.dim() == 2, "int8_linear: x must be 2-D");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_linear: weight must be contiguous int8 [N, K]");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k, "int8_linear: x has ", k, " inputs, the weight ", w.size(1));
  TORCH_CHECK(n % kRows == 0 && k % kBlock == 0, "int8_linear: needs N % 4 == 0 and K % 64 == 0, got N=", n,
              " K=", k);
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == n && sw.scalar_type() == at::kFloat &&
                  sw.numel() == n,
              "int8_linear: wsum must be int32 [N] and scales float32 [N]");
  std::vector<int8_t> q;
  std::vector<float> sx;
  quantize_rows(x, q, sx);
  if (m >= dequant_min_rows) {
    const at::Tensor qt = at::from_blob(q.data(), {m, k}, at::TensorOptions().dtype(at::kChar));
    return finish(at::_int_mm(qt, w.t()), sx, sw, x.scalar_type());
  }
  at::Tensor acc = at::empty({m, n}, at::TensorOptions().dtype(at::kInt));
  const bool fast = !portable && cpu_has_avx512vnni();
  std::vector<uint8_t> xu;
  if (fast) {
    xu.resize(q.size());
    for (size_t i = 0; i < q.size(); ++i) xu[i] = static_cast<uint8_t>(static_cast<int32_t>(q[i]) + 128);
  }
  const int8_t* wp = w.data_ptr<int8_t>();
  const int32_t* sp = wsum.contiguous().data_ptr<int32_t>();
  int32_t* ap = acc.data_ptr<int32_t>();
  at::parallel_for(0, n / kRows, 4, [&](int64_t t0, int64_t t1) {
    int32_t res[kMaxRows * kRows];
    for (int64_t t = t0; t < t1; ++t) {
      const int8_t* wt = wp + t * kRows * k;
      for (int64_t i = 0; i < m;) {
        const int64_t mb = std::min<int64_t>(kMaxRows, m - i);
#if VP_X86
        if (fast) {
          const uint8_t* xi = xu.data() + i * k;
          const int32_t* st = sp + t * kRows;
          if (mb == 4)
            tile_avx512<4>(xi, wt, k, st, res);
          else if (mb == 3)
            tile_avx512<3>(xi, wt, k, st, res);
          else if (mb == 2)
            tile_avx512<2>(xi, wt, k, st, res);
          else
            tile_avx512<1>(xi, wt, k, st, res);
        } else
#endif
          tile_portable(q.data() + i * k, mb, wt, k, res);
        for (int64_t b = 0; b < mb; ++b)
          for (int64_t r = 0; r < kRows; ++r) ap[(i + b) * n + t * kRows + r] = res[b * kRows + r];
        i += mb;
      }
    }
  });
  return finish(acc, sx, sw, x.scalar_type());
}

bool int8_has_fast_path() { return cpu_has_avx512vnni(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_plugins_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor wsum, Tensor scales, int dequant_min_rows, bool portable=False) "
        "-> Tensor");
  m.def("int8_has_fast_path() -> bool", &int8_has_fast_path);
}

TORCH_LIBRARY_IMPL(vllm_plugins_cpu, CPU, m) { m.impl("int8_linear", &int8_linear); }

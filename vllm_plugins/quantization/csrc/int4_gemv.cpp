// CPU int4 weight-only GEMM for small batches (decode), symmetric uint4b8.
//
// Layout (built by vllm_plugins.quantization.cpu_ext.pack_tiles; tested
// there as a contract). Weights W[N, K] are stored nibbles u = q + 8 in 0..15,
// N % 4 == 0, K % 128 == 0:
//   qw: uint8 [N / 4, K / 128, 4, 64]  -- tile t holds rows 4t..4t+3; for
//       chunk c (inputs 128c..128c+127) and row r, 32 little-endian uint16
//       words; nibble i (bits 4i..4i+3) of word j is u[4t + r, 128c + 32i + j].
//   sc: float32 [N / 4, G, 4]           -- sc[t, g, r] = scale of row 4t + r, group g.
// out[m, n] = sum_k x[m, k] * (u[n, k] - 8) * sc[n, k / group_size], float32
// accumulation, bfloat16 result.
//
// The AVX512-BF16 path turns a nibble into the bfloat16 number 128 + u by
// OR-ing it into 0x4300, and takes 32-pair dot products with vdpbf16ps; the
// offset 136 * sum(x over the group) is subtracted once per group. It is
// compiled with a target attribute and chosen at run time only where the CPU
// reports avx512_bf16. The portable path computes the same sum in scalar code.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define VP_X86 1
#else
#define VP_X86 0
#endif

namespace {

constexpr int64_t kRows = 4;      // rows per tile
constexpr int64_t kChunk = 128;   // inputs per chunk
constexpr int64_t kChunkBytes = 64;
constexpr int64_t kMaxBlock = 4;  // activation rows per weight pass

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

bool cpu_has_avx512bf16() {
#if VP_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// 136 * sum of x over each group: 128 + u - 136 = u - 8.
void group_offsets(const uint16_t* x, int64_t k, int64_t gs, float* out) {
  for (int64_t g = 0; g < k / gs; ++g) {
    float s = 0.f;
    for (int64_t i = 0; i < gs; ++i) s += bf16_to_float(x[g * gs + i]);
    out[g] = 136.f * s;
  }
}

void tile_portable(const uint16_t* x, const uint8_t* qw, const float* sc, int64_t k,
                   int64_t gs, float* out) {
  const int64_t chunks = k / kChunk;
  float acc[kRows] = {0.f, 0.f, 0.f, 0.f};
  float part[kRows] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t kq = c * kChunk + 32 * i;  // first input of this quarter
      for (int64_t r = 0; r < kRows; ++r) {
        const uint8_t* w = qw + (c * kRows + r) * kChunkBytes;
        float s = 0.f;
        for (int64_t j = 0; j < 32; ++j) {
          const uint16_t word = static_cast<uint16_t>(w[2 * j] | (w[2 * j + 1] << 8));
          const int u = (word >> (4 * i)) & 0xF;
          s += bf16_to_float(x[kq + j]) * static_cast<float>(u - 8);
        }
        part[r] += s;
      }
      if ((kq + 32) % gs == 0) {
        const int64_t g = kq / gs;
        for (int64_t r = 0; r < kRows; ++r) {
          acc[r] += part[r] * sc[g * kRows + r];
          part[r] = 0.f;
        }
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) out[r] = acc[r];
}

#if VP_X86
// GPC: groups per 128-input chunk (4 for gs 32, 2 for 64, 1 for >= 128).
// MB: activation rows sharing each unpacked weight chunk. With one row, two
// accumulators per output keep enough dot products in flight.
template <int GPC, int MB>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_avx512(
    const uint16_t* x, int64_t k, const float* xoff, int64_t groups, const uint8_t* qw, const float* sc,
    int64_t gs, float* out) {
  constexpr int NA = MB == 1 ? 2 : 1;
  const int64_t chunks = k / kChunk;
  const int64_t cpg = GPC == 1 ? gs / kChunk : 1;  // chunks per group
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  __m512 tot[MB][kRows], acc[NA][MB][kRows];
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) tot[b][r] = _mm512_setzero_ps();

  for (int64_t c0 = 0; c0 < chunks; c0 += cpg) {
    for (int a = 0; a < NA; ++a)
      for (int b = 0; b < MB; ++b)
        for (int r = 0; r < kRows; ++r) acc[a][b][r] = _mm512_setzero_ps();
    for (int64_t c = c0; c < c0 + cpg; ++c) {
      const uint8_t* wc = qw + c * kRows * kChunkBytes;
      _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * kRows * kChunkBytes), _MM_HINT_T0);
      for (int r = 0; r < kRows; ++r) {
        const __m512i w = _mm512_loadu_si512(wc + r * kChunkBytes);
        const __m512bh q0 = (__m512bh)_mm512_ternarylogic_epi32(w, low4, bias, 0xEA);
        const __m512bh q1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low4, bias, 0xEA);
        const __m512bh q2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), low4, bias, 0xEA);
        const __m512bh q3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 12), bias);
        for (int b = 0; b < MB; ++b) {
          const uint16_t* xc = x + b * k + c * kChunk;
          const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xc);
          const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xc + 32);
          const __m512bh x2 = (__m512bh)_mm512_loadu_si512(xc + 64);
          const __m512bh x3 = (__m512bh)_mm512_loadu_si512(xc + 96);
          if constexpr (GPC == 1) {
            acc[0][b][r] = _mm512_dpbf16_ps(acc[0][b][r], q0, x0);
            acc[NA - 1][b][r] = _mm512_dpbf16_ps(acc[NA - 1][b][r], q1, x1);
            acc[0][b][r] = _mm512_dpbf16_ps(acc[0][b][r], q2, x2);
            acc[NA - 1][b][r] = _mm512_dpbf16_ps(acc[NA - 1][b][r], q3, x3);
          } else if constexpr (GPC == 2) {
            const int64_t g = 2 * c;
            __m512 p = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q0, x0), q1, x1);
            tot[b][r] = _mm512_fmadd_ps(p, _mm512_set1_ps(sc[g * kRows + r]), tot[b][r]);
            p = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), q2, x2), q3, x3);
            tot[b][r] = _mm512_fmadd_ps(p, _mm512_set1_ps(sc[(g + 1) * kRows + r]), tot[b][r]);
          } else {
            const int64_t g = 4 * c;
            const __m512 z = _mm512_setzero_ps();
            tot[b][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, q0, x0), _mm512_set1_ps(sc[g * kRows + r]), tot[b][r]);
            tot[b][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, q1, x1), _mm512_set1_ps(sc[(g + 1) * kRows + r]), tot[b][r]);
            tot[b][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, q2, x2), _mm512_set1_ps(sc[(g + 2) * kRows + r]), tot[b][r]);
            tot[b][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, q3, x3), _mm512_set1_ps(sc[(g + 3) * kRows + r]), tot[b][r]);
          }
        }
      }
    }
    if constexpr (GPC == 1) {
      const int64_t g = c0 / cpg;
      for (int b = 0; b < MB; ++b)
        for (int r = 0; r < kRows; ++r) {
          const __m512 sum = NA == 2 ? _mm512_add_ps(acc[0][b][r], acc[NA - 1][b][r]) : acc[0][b][r];
          tot[b][r] = _mm512_fmadd_ps(sum, _mm512_set1_ps(sc[g * kRows + r]), tot[b][r]);
        }
    }
  }
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) {
      float corr = 0.f;
      for (int64_t g = 0; g < groups; ++g) corr += sc[g * kRows + r] * xoff[b * groups + g];
      out[b * kRows + r] = _mm512_reduce_add_ps(tot[b][r]) - corr;
    }
}

template <int MB>
void tile_avx512_any(const uint16_t* x, int64_t k, const float* xoff, int64_t groups, const uint8_t* qw,
                     const float* sc, int64_t gs, float* out) {
  if (gs == 32)
    tile_avx512<4, MB>(x, k, xoff, groups, qw, sc, gs, out);
  else if (gs == 64)
    tile_avx512<2, MB>(x, k, xoff, groups, qw, sc, gs, out);
  else
    tile_avx512<1, MB>(x, k, xoff, groups, qw, sc, gs, out);
}
#endif

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, int64_t group_size,
                     bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_gemm: x must be 2-D bfloat16");
  TORCH_CHECK(qw.dim() == 4 && qw.scalar_type() == at::kByte && qw.size(2) == kRows && qw.size(3) == kChunkBytes,
              "int4_gemm: qw must be uint8 [N/4, K/128, 4, 64]");
  const int64_t m = x.size(0), k = x.size(1), tiles = qw.size(0), n = tiles * kRows;
  TORCH_CHECK(qw.size(1) * kChunk == k, "int4_gemm: x has ", k, " inputs, qw ", qw.size(1) * kChunk);
  const int64_t gs = group_size == -1 ? k : group_size;
  TORCH_CHECK(gs >= 32 && gs % 32 == 0 && k % gs == 0 && (gs < kChunk ? kChunk % gs == 0 : gs % kChunk == 0),
              "int4_gemm: group size ", group_size, " does not fit K=", k);
  const int64_t groups = k / gs;
  TORCH_CHECK(sc.dim() == 3 && sc.scalar_type() == at::kFloat && sc.size(0) == tiles && sc.size(1) == groups &&
                  sc.size(2) == kRows,
              "int4_gemm: scales must be float32 [N/4, K/group, 4]");
  const at::Tensor xc = x.contiguous(), qc = qw.contiguous(), scc = sc.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());

  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* qp = qc.data_ptr<uint8_t>();
  const float* sp = scc.data_ptr<float>();
  auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());

  std::vector<float> xoff(m * groups);
  for (int64_t i = 0; i < m; ++i) group_offsets(xp + i * k, k, gs, xoff.data() + i * groups);
  const bool fast = !portable && cpu_has_avx512bf16();
  const int64_t tile_bytes = (k / kChunk) * kRows * kChunkBytes;

  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    float res[kMaxBlock * kRows];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* q = qp + t * tile_bytes;
      const float* s = sp + t * groups * kRows;
      for (int64_t i = 0; i < m;) {
        const uint16_t* xi = xp + i * k;
        const float* oi = xoff.data() + i * groups;
        int64_t mb = 1;
#if VP_X86
        if (fast) {
          mb = std::min<int64_t>(kMaxBlock, m - i);
          if (mb == 4)
            tile_avx512_any<4>(xi, k, oi, groups, q, s, gs, res);
          else if (mb == 3)
            tile_avx512_any<3>(xi, k, oi, groups, q, s, gs, res);
          else if (mb == 2)
            tile_avx512_any<2>(xi, k, oi, groups, q, s, gs, res);
          else
            tile_avx512_any<1>(xi, k, oi, groups, q, s, gs, res);
        } else
#endif
          tile_portable(xi, q, s, k, gs, res);
        for (int64_t b = 0; b < mb; ++b)
          for (int64_t r = 0; r < kRows; ++r) op[(i + b) * n + t * kRows + r] = c10::BFloat16(res[b * kRows + r]);
        i += mb;
      }
    }
  });
  return out;
}

#if VP_X86
// One tile's rows as bfloat16: a 16-entry table (u - 8) * s per row and group,
// looked up 32 nibbles at a time with vpermw. Same rounding as the scalar path.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dequant_tile_avx512(
    const uint8_t* qw, const float* sc, int64_t k, int64_t gs, c10::BFloat16* rows) {
  const __m512 steps = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  for (int64_t r = 0; r < kRows; ++r) {
    int64_t g_cur = -1;
    __m512i table = _mm512_setzero_si512();
    for (int64_t c = 0; c < k / kChunk; ++c) {
      const __m512i w = _mm512_loadu_si512(qw + (c * kRows + r) * kChunkBytes);
      for (int i = 0; i < 4; ++i) {
        const int64_t g = (c * kChunk + 32 * i) / gs;
        if (g != g_cur) {
          const __m256bh half = _mm512_cvtneps_pbh(_mm512_mul_ps(steps, _mm512_set1_ps(sc[g * kRows + r])));
          table = _mm512_castsi256_si512((__m256i)half);
          g_cur = g;
        }
        const __m512i idx = _mm512_and_si512(_mm512_srl_epi16(w, _mm_cvtsi32_si128(4 * i)), low4);
        _mm512_storeu_si512(rows + r * k + c * kChunk + 32 * i, _mm512_permutexvar_epi16(idx, table));
      }
    }
  }
}
#endif

// The bfloat16 weight [N, K], for batches large enough that a bfloat16 GEMM
// beats unpacking the nibbles once per activation row.
at::Tensor int4_dequant(const at::Tensor& qw, const at::Tensor& sc, int64_t group_size, bool portable) {
  TORCH_CHECK(qw.dim() == 4 && qw.scalar_type() == at::kByte && qw.size(2) == kRows && qw.size(3) == kChunkBytes,
              "int4_dequant: qw must be uint8 [N/4, K/128, 4, 64]");
  const int64_t tiles = qw.size(0), chunks = qw.size(1), n = tiles * kRows, k = chunks * kChunk;
  const int64_t gs = group_size == -1 ? k : group_size;
  TORCH_CHECK(gs % 32 == 0 && k % gs == 0 && sc.dim() == 3 && sc.scalar_type() == at::kFloat &&
                  sc.size(0) == tiles && sc.size(1) == k / gs && sc.size(2) == kRows,
              "int4_dequant: scales must be float32 [N/4, K/group, 4]");
  const at::Tensor qc = qw.contiguous(), scc = sc.contiguous();
  at::Tensor out = at::empty({n, k}, qw.options().dtype(at::kBFloat16));
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float* sp = scc.data_ptr<float>();
  auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());
  const int64_t groups = k / gs;
  const bool fast = !portable && cpu_has_avx512bf16();
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
#if VP_X86
      if (fast) {
        dequant_tile_avx512(qp + t * chunks * kRows * kChunkBytes, sp + t * groups * kRows, k, gs,
                            op + t * kRows * k);
        continue;
      }
#endif
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t r = 0; r < kRows; ++r) {
          const uint8_t* w = qp + ((t * chunks + c) * kRows + r) * kChunkBytes;
          c10::BFloat16* row = op + (t * kRows + r) * k + c * kChunk;
          for (int64_t i = 0; i < 4; ++i) {
            const float s = sp[(t * groups + (c * kChunk + 32 * i) / gs) * kRows + r];
            for (int64_t j = 0; j < 32; ++j) {
              const int u = ((w[2 * j] | (w[2 * j + 1] << 8)) >> (4 * i)) & 0xF;
              row[32 * i + j] = c10::BFloat16(static_cast<float>(u - 8) * s);
            }
          }
        }
    }
  });
  return out;
}

// What the linear layers call: the GEMV below dequant_min_rows rows, a
// bfloat16 GEMM on the dequantized weight from there on. One op, so that the
// choice on the batch size stays outside torch.compile's graph.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, int64_t group_size,
                       int64_t dequant_min_rows) {
  if (x.size(0) >= dequant_min_rows) return at::linear(x, int4_dequant(qw, sc, group_size, false));
  return int4_gemm(x, qw, sc, group_size, false);
}

bool has_fast_path() { return cpu_has_avx512bf16(); }

}  // namespace

TORCH_LIBRARY(vllm_plugins_cpu, m) {
  m.def("int4_gemm(Tensor x, Tensor qw, Tensor scales, int group_size, bool portable=False) -> Tensor");
  m.def("int4_dequant(Tensor qw, Tensor scales, int group_size, bool portable=False) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qw, Tensor scales, int group_size, int dequant_min_rows) -> Tensor");
  m.def("int4_has_fast_path() -> bool", &has_fast_path);
}

TORCH_LIBRARY_IMPL(vllm_plugins_cpu, CPU, m) {
  m.impl("int4_gemm", &int4_gemm);
  m.impl("int4_dequant", &int4_dequant);
  m.impl("int4_linear", &int4_linear);
}

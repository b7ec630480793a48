// AVX512-BF16 path of the CPU int4 GEMM (layout: int4_kernels.h).
//
// A nibble u becomes the bfloat16 number 128 + u by one OR into 0x4300, and
// 32-pair dot products run on vdpbf16ps; the offset 136 * sum(x over the
// group) is subtracted once per group and output row. Each 32-input quarter
// of a weight chunk is unpacked once (4 rows of the tile) and used for a block
// of up to kBlock activation rows: the registers hold kBlock x 4 accumulators
// (plus, for groups of 64 inputs or more, as many per-group partial sums).
// Compiled with a target attribute; called only where the CPU reports the
// flags (avx512bf16_supported).

#include "int4_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <type_traits>

namespace vllm_plugins_int4 {

#if defined(__x86_64__) && defined(__GNUC__)

#define VP_AVX512 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define VP_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline))

namespace {

constexpr int kBlock = 3;              // activation rows per pass over a tile (registers: 2 x 4 x 3 + 4 + 2)
constexpr int64_t kPrefetchChunks = 8;  // chunks ahead (8 x 256 bytes)

inline float bf16_to_float(uint16_t v) {
  return c10::BFloat16(v, c10::BFloat16::from_bits());
}

// Quarter I of a chunk row as bfloat16 (128 + u).
template <int I>
VP_AVX512_INLINE inline __m512bh unpack(const uint8_t* row, __m512i low4, __m512i bias) {
  const __m512i w = _mm512_loadu_si512(row);
  if constexpr (I == 0) return (__m512bh)_mm512_ternarylogic_epi32(w, low4, bias, 0xEA);  // (w & low4) | bias
  if constexpr (I == 3) return (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 12), bias);
  return (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4 * I), low4, bias, 0xEA);
}

// One tile (4 output rows) times MB activation rows. GPC: groups per chunk
// (4 for groups of 32, 2 for 64, 1 for 128 and more: then gs / 128 chunks share
// one scale). res[b * 4 + r] = sum over k of x[b, k] * (u - 8) * scale.
template <int GPC, int MB>
VP_AVX512 void tile_block(const uint16_t* x, int64_t k, const float* xoff, int64_t groups, const uint8_t* qw,
                          const float* sc, int64_t gs, float* res) {
  constexpr int NA = MB == 1 ? 2 : 1;  // one row: alternate two accumulator sets to hide the dot latency
  const int64_t chunks = k / kChunk;
  const int64_t cpg = GPC == 1 ? gs / kChunk : 1;  // chunks per group
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const __m512 zero = _mm512_setzero_ps();
  __m512 tot[MB][kRows];
  __m512 acc[NA][MB][kRows];
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) tot[b][r] = zero;

  auto quarter = [&](auto I_, const uint8_t* wc, const uint16_t* xc, int64_t c) VP_AVX512_INLINE {
    constexpr int I = decltype(I_)::value;
    __m512bh q[kRows];
    for (int r = 0; r < kRows; ++r) q[r] = unpack<I>(wc + r * kChunkBytes, low4, bias);
    for (int b = 0; b < MB; ++b) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xc + b * k + 32 * I);
      if constexpr (GPC == 4) {
        const float* s = sc + (4 * c + I) * kRows;
        for (int r = 0; r < kRows; ++r)
          tot[b][r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, q[r], xv), _mm512_set1_ps(s[r]), tot[b][r]);
      } else {
        for (int r = 0; r < kRows; ++r) acc[I % NA][b][r] = _mm512_dpbf16_ps(acc[I % NA][b][r], q[r], xv);
      }
    }
    if constexpr (GPC == 2 && I % 2 == 1) {
      const float* s = sc + (2 * c + I / 2) * kRows;
      for (int b = 0; b < MB; ++b)
        for (int r = 0; r < kRows; ++r) {
          const __m512 sum = NA == 2 ? _mm512_add_ps(acc[0][b][r], acc[NA - 1][b][r]) : acc[0][b][r];
          tot[b][r] = _mm512_fmadd_ps(sum, _mm512_set1_ps(s[r]), tot[b][r]);
          for (int a = 0; a < NA; ++a) acc[a][b][r] = zero;
        }
    }
  };

  for (int64_t c0 = 0; c0 < chunks; c0 += cpg) {
    for (int a = 0; a < NA; ++a)
      for (int b = 0; b < MB; ++b)
        for (int r = 0; r < kRows; ++r) acc[a][b][r] = zero;
    for (int64_t c = c0; c < c0 + cpg; ++c) {
      const uint8_t* wc = qw + c * kRows * kChunkBytes;
      const char* ahead = reinterpret_cast<const char*>(wc + kPrefetchChunks * kRows * kChunkBytes);
      for (int l = 0; l < kRows; ++l) _mm_prefetch(ahead + l * kChunkBytes, _MM_HINT_T0);
      const uint16_t* xc = x + c * kChunk;
      quarter(std::integral_constant<int, 0>{}, wc, xc, c);
      quarter(std::integral_constant<int, 1>{}, wc, xc, c);
      quarter(std::integral_constant<int, 2>{}, wc, xc, c);
      quarter(std::integral_constant<int, 3>{}, wc, xc, c);
    }
    if constexpr (GPC == 1) {
      const float* s = sc + (c0 / cpg) * kRows;
      for (int b = 0; b < MB; ++b)
        for (int r = 0; r < kRows; ++r) {
          const __m512 sum = NA == 2 ? _mm512_add_ps(acc[0][b][r], acc[NA - 1][b][r]) : acc[0][b][r];
          tot[b][r] = _mm512_fmadd_ps(sum, _mm512_set1_ps(s[r]), tot[b][r]);
        }
    }
  }
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) {
      float corr = 0.f;
      for (int64_t g = 0; g < groups; ++g) corr += sc[g * kRows + r] * xoff[b * groups + g];
      res[b * kRows + r] = _mm512_reduce_add_ps(tot[b][r]) - corr;
    }
}

template <int GPC>
void tile_all_rows(const uint16_t* x, const float* xoff, const Problem& p, int64_t t, const Out& out) {
  const uint8_t* q = p.qw + t * p.tile_bytes();
  const float* s = p.sc + t * p.groups * kRows;
  float res[kBlock * kRows];
  for (int64_t i = 0; i < p.m;) {
    // Blocks of 3 rows; 4 left go as 2 + 2 (a 1-row pass costs nearly as much as a 3-row one).
    const int64_t left = p.m - i;
    const int64_t mb = left == 1 ? 1 : (left == 2 || left == 4 ? 2 : 3);
    const uint16_t* xi = x + i * p.k;
    const float* oi = xoff + i * p.groups;
    if (mb == 3)
      tile_block<GPC, 3>(xi, p.k, oi, p.groups, q, s, p.gs, res);
    else if (mb == 2)
      tile_block<GPC, 2>(xi, p.k, oi, p.groups, q, s, p.gs, res);
    else
      tile_block<GPC, 1>(xi, p.k, oi, p.groups, q, s, p.gs, res);
    for (int64_t b = 0; b < mb; ++b)
      for (int64_t r = 0; r < kRows; ++r) out.put((i + b) * p.n + t * kRows + r, res[b * kRows + r]);
    i += mb;
  }
}

}  // namespace

bool avx512bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// 136 * sum of x over each group: 128 + u - 136 = u - 8.
void avx512_offsets(const uint16_t* x, const Problem& p, float* xoff) {
  for (int64_t b = 0; b < p.m; ++b)
    for (int64_t g = 0; g < p.groups; ++g) {
      float s = 0.f;
      for (int64_t i = 0; i < p.gs; ++i) s += bf16_to_float(x[b * p.k + g * p.gs + i]);
      xoff[b * p.groups + g] = 136.f * s;
    }
}

void avx512_tiles(const uint16_t* x, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out) {
  for (int64_t t = t0; t < t1; ++t) {
    if (p.gs == 32)
      tile_all_rows<4>(x, xoff, p, t, out);
    else if (p.gs == 64)
      tile_all_rows<2>(x, xoff, p, t, out);
    else
      tile_all_rows<1>(x, xoff, p, t, out);
  }
}

// One tile's rows as bfloat16: a 16-entry table (u - 8) * s per row and group,
// looked up 32 nibbles at a time with vpermw. Same rounding as the scalar path.
VP_AVX512 void avx512_dequant_tile(const uint8_t* qw, const float* sc, int64_t k, int64_t gs, c10::BFloat16* rows) {
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

#else  // not x86 / not GCC-compatible: never selected

bool avx512bf16_supported() { return false; }
void avx512_offsets(const uint16_t*, const Problem&, float*) {}
void avx512_tiles(const uint16_t*, const float*, const Problem&, int64_t, int64_t, const Out&) {}
void avx512_dequant_tile(const uint8_t*, const float*, int64_t, int64_t, c10::BFloat16*) {}

#endif

}  // namespace vllm_plugins_int4

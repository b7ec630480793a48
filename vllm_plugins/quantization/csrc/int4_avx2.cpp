// AVX2 + FMA path of the CPU int4 GEMM, for x86 CPUs without AVX-512 (same
// layout as the other paths: int4_kernels.h).
//
// Without a bfloat16 dot product, the weights go to float32 with two
// operations per 8 nibbles and no shift: a 32-bit lane of a chunk row holds
// words j and j + 1, i.e. nibble i of both at bits 4i and 16 + 4i. The lane
// shifted right by 16 (once per 16 bytes) and the lane itself, masked with
// 0xF << 4i, are the integers u * 2^(4i), converted exactly by vcvtdq2ps. The
// activations are rewritten once per call (avx2_prepare) in the matching
// order and scaled by 2^(-4i) (exact), so that a plain FMA gives x * u; the
// offset 8 * sum(x over the group) is subtracted once per group.

#include "int4_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vllm_plugins_int4 {

#if defined(__x86_64__) && defined(__GNUC__)

#define VP_AVX2 __attribute__((target("avx2,fma")))

namespace {

constexpr int kBlock = 4;               // activation rows per pass over a tile
constexpr int64_t kPrefetchChunks = 4;  // chunks ahead (4 x 256 bytes)

// xp[c, h, i, e, d] = x[128c + 32i + 16h + 2d + e] * 2^(-4i): 8 floats for
// (h, i, e), in the order the tile loop reads them.
inline int64_t xp_index(int64_t h, int64_t i, int64_t e) { return ((h * 4 + i) * 2 + e) * 8; }

// One tile (4 output rows) times MB activation rows; res[b * 4 + r].
template <int MB>
VP_AVX2 void tile_block(const float* xp, int64_t k, const float* xoff, int64_t groups, const uint8_t* qw,
                        const float* sc, int64_t gs, float* res) {
  const int64_t chunks = k / kChunk;
  const int64_t quarters_per_group = gs < kChunk ? gs / 32 : 4;  // a chunk closes its group's partial sums
  const int64_t cpg = gs < kChunk ? 1 : gs / kChunk;
  __m256 tot[MB][kRows];
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) tot[b][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* wc = qw + c * kRows * kChunkBytes;
    const char* ahead = reinterpret_cast<const char*>(wc + kPrefetchChunks * kRows * kChunkBytes);
    for (int l = 0; l < kRows; ++l) _mm_prefetch(ahead + l * kChunkBytes, _MM_HINT_T0);
    const float* xc = xp + c * kChunk;
    for (int r = 0; r < kRows; ++r) {
      __m256i lane[2][2];  // [h][e]
      for (int h = 0; h < 2; ++h) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + r * kChunkBytes + 32 * h));
        lane[h][0] = w;
        lane[h][1] = _mm256_srli_epi32(w, 16);
      }
      __m256 acc[MB][2];
      for (int b = 0; b < MB; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        const __m256i mask = _mm256_set1_epi32(0xF << (4 * i));
        for (int h = 0; h < 2; ++h)
          for (int e = 0; e < 2; ++e) {
            const __m256 u = _mm256_cvtepi32_ps(_mm256_and_si256(lane[h][e], mask));
            for (int b = 0; b < MB; ++b)
              acc[b][e] = _mm256_fmadd_ps(u, _mm256_loadu_ps(xc + b * k + xp_index(h, i, e)), acc[b][e]);
          }
        if ((i + 1) % quarters_per_group == 0) {
          const int64_t g = gs < kChunk ? (c * 4 + i) / quarters_per_group : c / cpg;
          const __m256 s = _mm256_set1_ps(sc[g * kRows + r]);
          for (int b = 0; b < MB; ++b) {
            tot[b][r] = _mm256_fmadd_ps(_mm256_add_ps(acc[b][0], acc[b][1]), s, tot[b][r]);
            acc[b][0] = acc[b][1] = _mm256_setzero_ps();
          }
        }
      }
    }
  }
  for (int b = 0; b < MB; ++b)
    for (int r = 0; r < kRows; ++r) {
      float corr = 0.f;
      for (int64_t g = 0; g < groups; ++g) corr += sc[g * kRows + r] * xoff[b * groups + g];
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(tot[b][r]), _mm256_extractf128_ps(tot[b][r], 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      res[b * kRows + r] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q))) - corr;
    }
}

}  // namespace

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

void avx2_prepare(const float* x, const Problem& p, float* xp, float* xoff) {
  for (int64_t b = 0; b < p.m; ++b) {
    const float* xb = x + b * p.k;
    for (int64_t c = 0; c < p.k / kChunk; ++c) {
      float* out = xp + b * p.k + c * kChunk;
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t e = 0; e < 2; ++e)
            for (int64_t d = 0; d < 8; ++d)
              out[xp_index(h, i, e) + d] = xb[c * kChunk + 32 * i + 16 * h + 2 * d + e] * (1.f / float(1 << (4 * i)));
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      float s = 0.f;
      for (int64_t i = 0; i < p.gs; ++i) s += xb[g * p.gs + i];
      xoff[b * p.groups + g] = 8.f * s;
    }
  }
}

void avx2_tiles(const float* xp, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out) {
  float res[kBlock * kRows];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* q = p.qw + t * p.tile_bytes();
    const float* s = p.sc + t * p.groups * kRows;
    for (int64_t i = 0; i < p.m;) {
      const int64_t left = p.m - i;
      const int64_t mb = left >= kBlock ? kBlock : left;
      const float* xi = xp + i * p.k;
      const float* oi = xoff + i * p.groups;
      if (mb == 4)
        tile_block<4>(xi, p.k, oi, p.groups, q, s, p.gs, res);
      else if (mb == 3)
        tile_block<3>(xi, p.k, oi, p.groups, q, s, p.gs, res);
      else if (mb == 2)
        tile_block<2>(xi, p.k, oi, p.groups, q, s, p.gs, res);
      else
        tile_block<1>(xi, p.k, oi, p.groups, q, s, p.gs, res);
      for (int64_t b = 0; b < mb; ++b)
        for (int64_t r = 0; r < kRows; ++r) out.put((i + b) * p.n + t * kRows + r, res[b * kRows + r]);
      i += mb;
    }
  }
}

#else  // not x86 / not GCC-compatible: never selected

bool avx2_supported() { return false; }
void avx2_prepare(const float*, const Problem&, float*, float*) {}
void avx2_tiles(const float*, const float*, const Problem&, int64_t, int64_t, const Out&) {}

#endif

}  // namespace vllm_plugins_int4

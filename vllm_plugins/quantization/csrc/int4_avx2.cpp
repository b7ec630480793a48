// AVX2 + FMA path of the CPU int4 GEMM, for x86 CPUs without AVX-512 (layout:
// int4_kernels.h).
//
// Without a bfloat16 dot product, the weights go to float32 with two
// operations per 8 nibbles and no per-nibble shift: 32 bytes of a block are 8
// outputs, and the 32-bit lane of output n holds nibble i of input 8c + 2i + e
// at bits 4i + 16e. The lane (e = 0) or the lane shifted right by 16 (e = 1,
// once per 32 bytes), masked with 0xF << 4i, is the integer u * 2^(4i),
// converted exactly by vcvtdq2ps. The activations are scaled once per call by
// 2^(-4i) (avx2_prepare; exact), so a plain FMA with the broadcast activation
// gives x * u; the offset 8 * sum(x over the group) is subtracted once per
// group. Float32 arithmetic throughout, for bfloat16 or float32 activations.

#include "int4_kernels.h"

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vllm_plugins_int4 {

#if defined(__x86_64__) && defined(__GNUC__)

#define VP_AVX2 __attribute__((target("avx2,fma")))

namespace {

constexpr int64_t kPrefetchBlocks = 16;  // blocks ahead in each tile's stream (1 KiB)

// MB rows of tile t (2 vectors of 8 outputs each); res[b * 16 + n]. A accumulator
// chains per output vector (inputs j % A): an FMA's latency is several cycles, so
// one or two rows need two chains to keep the FMA pipes busy.
template <int MB>
VP_AVX2 void block(const float* xp, const float* xoff, const Problem& p, int64_t t, float* res) {
  constexpr int A = MB <= 2 ? 2 : 1;
  const int64_t kpg = p.gs / kBlockK;
  const uint8_t* w = p.tile_weights(t);
  const float* s = p.tile_scales(t);
  // Totals live in memory (res): touched once per group, they leave the registers to the accumulators.
  for (int64_t j = 0; j < MB * kTile; ++j) res[j] = 0.f;

  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 acc[MB][2][A];
    for (int b = 0; b < MB; ++b)
      for (int h = 0; h < 2; ++h)
        for (int a = 0; a < A; ++a) acc[b][h][a] = _mm256_setzero_ps();
    for (int64_t c = g * kpg; c < (g + 1) * kpg; ++c) {
      const float* xc = xp + c * kBlockK;
      const uint8_t* blk = w + c * kBlockBytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * kBlockBytes), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * h));
        const __m256i hi = _mm256_srli_epi32(lo, 16);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {  // input 8c + j = 8c + 2i + e
          const int i = j / 2, e = j % 2;
          const __m256i mask = _mm256_set1_epi32(0xF << (4 * i));
          const __m256 u = _mm256_cvtepi32_ps(_mm256_and_si256(e ? hi : lo, mask));
          for (int b = 0; b < MB; ++b)
            acc[b][h][j % A] = _mm256_fmadd_ps(u, _mm256_broadcast_ss(xc + b * p.k + j), acc[b][h][j % A]);
        }
      }
    }
    for (int b = 0; b < MB; ++b) {
      const __m256 off = _mm256_set1_ps(xoff[b * p.groups + g]);
      for (int h = 0; h < 2; ++h) {
        __m256 sum = acc[b][h][0];
        for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[b][h][a]);
        float* tot = res + b * kTile + 8 * h;
        _mm256_storeu_ps(tot, _mm256_fmadd_ps(_mm256_sub_ps(sum, off), _mm256_loadu_ps(s + g * kTile + 8 * h),
                                              _mm256_loadu_ps(tot)));
      }
    }
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
    for (int64_t kk = 0; kk < p.k; ++kk) xp[b * p.k + kk] = xb[kk] * (1.f / float(1 << (4 * ((kk % kBlockK) / 2))));
    for (int64_t g = 0; g < p.groups; ++g) {
      float s = 0.f;
      for (int64_t i = 0; i < p.gs; ++i) s += xb[g * p.gs + i];
      xoff[b * p.groups + g] = 8.f * s;
    }
  }
}

void avx2_tiles(const float* xp, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out) {
  // One tile at a time, each unpacked vector serving up to 4 rows. (Two tiles
  // per pass at one row need 16 accumulators with the 2 chains per vector:
  // all 16 ymm registers, so they spill; 1 tile took about 27% less CPU time
  // per step of the 0.5B shapes, loaded machine.)
  for_each_block(p, t0, t1, 1, out, [&](int64_t i, int64_t mb, int64_t t, int64_t, float* res) {
    const float* xi = xp + i * p.k;
    const float* oi = xoff + i * p.groups;
    switch (mb) {
      case 4: block<4>(xi, oi, p, t, res); break;
      case 3: block<3>(xi, oi, p, t, res); break;
      case 2: block<2>(xi, oi, p, t, res); break;
      default: block<1>(xi, oi, p, t, res);
    }
  });
}

#else  // not x86 / not GCC-compatible: never selected

bool avx2_supported() { return false; }
void avx2_prepare(const float*, const Problem&, float*, float*) {}
void avx2_tiles(const float*, const float*, const Problem&, int64_t, int64_t, const Out&) {}

#endif

}  // namespace vllm_plugins_int4

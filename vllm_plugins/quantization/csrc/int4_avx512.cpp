// AVX512-BF16 path of the CPU int4 GEMM (layout: int4_kernels.h).
//
// A nibble u becomes the bfloat16 number 128 + u by one OR into 0x4300; a
// 64-byte block (16 outputs x 8 inputs) gives four such vectors, one per input
// pair, each multiplied by the broadcast activation pair with vdpbf16ps (16
// outputs per instruction). The registers hold MB activation rows x NV tiles
// of accumulators, so each unpacked vector serves MB rows and each broadcast NV
// tiles. At a group's end, (acc - 136 * sum(x over the group)) * scale goes
// into the row's total (128 + u - 136 = u - 8). Compiled with a target
// attribute; called only where the CPU reports the flags (avx512bf16_supported).

#include "int4_kernels.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vllm_plugins_int4 {

#if defined(__x86_64__) && defined(__GNUC__)

#define VP_AVX512 __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace {

constexpr int kMaxRows = 4;             // activation rows per pass (MB)
constexpr int kMaxTiles = 4;            // tiles per pass (NV); MB x NV accumulators
constexpr int kOneRowTiles = 1;         // one row: one weight stream, 4 accumulators (bandwidth-bound; 1 beat 2 and 4)
constexpr int64_t kPrefetchBlocks = 64;  // blocks ahead in each tile's stream (4 KiB; 1 KiB read ~10% slower)

VP_AVX512 inline __m512bh pair_of(const uint16_t* x) {  // x[0], x[1] in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return (__m512bh)_mm512_set1_epi32(v);
}

// MB rows x NV tiles starting at tile t; res[b][v * 16 + n].
template <int MB, int NV>
VP_AVX512 void block(const uint16_t* x, const float* xoff, const Problem& p, int64_t t, float* res) {
  constexpr int NA = MB == 1 ? 4 : 1;  // one row: an accumulator set per input pair hides the dot-product latency
  const int64_t kpg = p.gs / kBlockK;  // blocks per group
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const uint8_t* w[NV];
  const float* s[NV];
  for (int v = 0; v < NV; ++v) {
    w[v] = p.qw + (t + v) * p.tile_bytes();
    s[v] = p.sc + (t + v) * p.groups * kTile;
  }
  // Totals live in memory (res): touched once per group, they leave the registers to the accumulators.
  for (int64_t j = 0; j < MB * NV * kTile; ++j) res[j] = 0.f;

  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 acc[NA][MB][NV];
    for (int a = 0; a < NA; ++a)
      for (int b = 0; b < MB; ++b)
        for (int v = 0; v < NV; ++v) acc[a][b][v] = _mm512_setzero_ps();
    for (int64_t c = g * kpg; c < (g + 1) * kpg; ++c) {
      __m512i wv[NV];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* blk = w[v] + c * kBlockBytes;
        _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * kBlockBytes), _MM_HINT_T0);
        wv[v] = _mm512_loadu_si512(blk);
      }
      const uint16_t* xc = x + c * kBlockK;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        for (int v = 0; v < NV; ++v) {
          const __m512i sh = i == 0 ? wv[v] : _mm512_srli_epi16(wv[v], 4 * i);
          const __m512bh q = (__m512bh)_mm512_ternarylogic_epi32(sh, low4, bias, 0xEA);  // (sh & 15) | bias
          for (int b = 0; b < MB; ++b)
            acc[i % NA][b][v] = _mm512_dpbf16_ps(acc[i % NA][b][v], q, pair_of(xc + b * p.k + 2 * i));
        }
      }
    }
    for (int b = 0; b < MB; ++b) {
      const __m512 off = _mm512_set1_ps(xoff[b * p.groups + g]);
      for (int v = 0; v < NV; ++v) {
        __m512 sum = acc[0][b][v];
        for (int a = 1; a < NA; ++a) sum = _mm512_add_ps(sum, acc[a][b][v]);
        float* tot = res + (b * NV + v) * kTile;
        _mm512_storeu_ps(tot, _mm512_fmadd_ps(_mm512_sub_ps(sum, off), _mm512_loadu_ps(s[v] + g * kTile),
                                              _mm512_loadu_ps(tot)));
      }
    }
  }
}

template <int MB>
void rows_block(const uint16_t* x, const float* xoff, const Problem& p, int64_t t, int64_t nv, float* res) {
  switch (nv) {
    case 4: block<MB, 4>(x, xoff, p, t, res); break;
    case 3: block<MB, 3>(x, xoff, p, t, res); break;
    case 2: block<MB, 2>(x, xoff, p, t, res); break;
    default: block<MB, 1>(x, xoff, p, t, res);
  }
}

}  // namespace

bool avx512bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

VP_AVX512 void avx512_offsets(const uint16_t* x, const Problem& p, float* xoff) {
  // 16 bfloat16 at a time (a group is a multiple of 32 inputs): widened to float32 by a 16-bit shift.
  for (int64_t b = 0; b < p.m; ++b)
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint16_t* xg = x + b * p.k + g * p.gs;
      __m512 s = _mm512_setzero_ps();
      for (int64_t i = 0; i < p.gs; i += 16) {
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + i)));
        s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
      }
      xoff[b * p.groups + g] = 136.f * _mm512_reduce_add_ps(s);
    }
}

void avx512_tiles(const uint16_t* x, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out) {
  float res[kMaxRows * kMaxTiles * kTile];
  const int64_t tiles = p.m == 1 ? kOneRowTiles : kMaxTiles;
  for (int64_t t = t0; t < t1; t += tiles) {
    const int64_t nv = std::min<int64_t>(tiles, t1 - t);
    for (int64_t i = 0; i < p.m;) {
      const int64_t mb = std::min<int64_t>(kMaxRows, p.m - i);
      const uint16_t* xi = x + i * p.k;
      const float* oi = xoff + i * p.groups;
      switch (mb) {
        case 4: rows_block<4>(xi, oi, p, t, nv, res); break;
        case 3: rows_block<3>(xi, oi, p, t, nv, res); break;
        case 2: rows_block<2>(xi, oi, p, t, nv, res); break;
        default: rows_block<1>(xi, oi, p, t, nv, res);
      }
      for (int64_t b = 0; b < mb; ++b)
        for (int64_t j = 0; j < nv * kTile; ++j) out.put((i + b) * p.n + t * kTile + j, res[b * nv * kTile + j]);
      i += mb;
    }
  }
}

#else  // not x86 / not GCC-compatible: never selected

bool avx512bf16_supported() { return false; }
void avx512_offsets(const uint16_t*, const Problem&, float*) {}
void avx512_tiles(const uint16_t*, const float*, const Problem&, int64_t, int64_t, const Out&) {}

#endif

}  // namespace vllm_plugins_int4

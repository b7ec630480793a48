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
//
// Per 64-byte block at one row: one load (kept in a register), four vdpbf16ps,
// each taking its activation pair as an embedded broadcast ({1to16}: folded
// into its memory operand), and seven unpack instructions, or six where the CPU
// has AVX512-VBMI2: there the fourth nibble is one vpshrdw ((0x0430:w) >> 12 =
// 0x4300 | w >> 12). With 2+ rows the loop is as before (with these, 16-32 rows
// measured 4-5% slower). Both by
// inline assembly, so the function's target needs no VBMI2 (AVX512-BF16 CPUs
// without it, Cooper Lake, run the seven). One row, 0.5B shapes, from cache:
// 33 GB/s of weights before, 39 GB/s with both (Zen 4), so the arithmetic no
// longer sits at the read rate (~33 GB/s).

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

constexpr int kMaxTiles = kMaxBlockTiles;  // tiles per pass (NV); MB x NV accumulators
constexpr int kOneRowTiles = 1;         // one row: one weight stream, 4 accumulators (bandwidth-bound; 1 beat 2 and 4)
// Several tiles per pass (2+ rows): software prefetch this many blocks ahead in
// each tile's stream (4 KiB). One tile per pass (1 row): none; on huge pages it
// read at the rate of a plain read without it (4 KiB ahead: 2-4% slower), and on
// 4 KiB pages 20% faster than with it (one core, 0.5B shapes, in-process A/B).
constexpr int64_t kPrefetchBlocks = 64;

VP_AVX512 inline __m512bh pair_of(const uint16_t* x) {  // x[0], x[1] in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return (__m512bh)_mm512_set1_epi32(v);
}

// acc + q . (x[0], x[1] in every 32-bit lane): vdpbf16ps with an embedded broadcast
// (one row; with several rows a broadcast register per row, shared by the tiles, as before).
VP_AVX512 inline __m512 dot_pair(__m512 acc, __m512bh q, const uint16_t* x) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(q), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// Nibble i of every 16-bit lane of w as the bfloat16 number 128 + u.
template <bool kVbmi2>
VP_AVX512 inline __m512bh unpack(__m512i w, int i, __m512i low4, __m512i bias, __m512i hi_bias) {
  if (kVbmi2 && i == 3) {  // vpshrdw: low 16 bits of (0x0430:w) >> 12
    __m512i q;
    asm("vpshrdw $12, %2, %1, %0" : "=v"(q) : "v"(w), "v"(hi_bias));
    return (__m512bh)q;
  }
  const __m512i sh = i == 0 ? w : _mm512_srli_epi16(w, 4 * i);
  return (__m512bh)_mm512_ternarylogic_epi32(sh, low4, bias, 0xEA);  // (sh & 15) | bias
}

// MB rows x NV tiles starting at tile t; res[b][v * 16 + n].
template <int MB, int NV, bool kVbmi2>
VP_AVX512 void block(const uint16_t* x, const float* xoff, const Problem& p, int64_t t, float* res) {
  constexpr int NA = MB == 1 ? 4 : 1;  // one row: an accumulator set per input pair hides the dot-product latency
  const int64_t kpg = p.gs / kBlockK;  // blocks per group
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const __m512i hi_bias = _mm512_set1_epi16(0x0430);
  const uint8_t* w[NV];
  const float* s[NV];
  start_block<MB, NV>(p, t, w, s, res);  // totals in memory: the registers are left to the accumulators

  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 acc[NA][MB][NV];
    for (int a = 0; a < NA; ++a)
      for (int b = 0; b < MB; ++b)
        for (int v = 0; v < NV; ++v) acc[a][b][v] = _mm512_setzero_ps();
    for (int64_t c = g * kpg; c < (g + 1) * kpg; ++c) {
      __m512i wv[NV];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* blk = w[v] + c * kBlockBytes;
        if (NV > 1) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * kBlockBytes), _MM_HINT_T0);
        wv[v] = _mm512_loadu_si512(blk);
        if (MB == 1) asm("" : "+v"(wv[v]));  // one row: one load per block, not re-read by each unpack
      }
      const uint16_t* xc = x + c * kBlockK;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        __m512bh xp[MB];
        if (MB > 1)
          for (int b = 0; b < MB; ++b) xp[b] = pair_of(xc + b * p.k + 2 * i);
        for (int v = 0; v < NV; ++v) {
          const __m512bh q = unpack<kVbmi2 && MB == 1>(wv[v], i, low4, bias, hi_bias);
          for (int b = 0; b < MB; ++b)
            acc[i % NA][b][v] = MB == 1 ? dot_pair(acc[i % NA][b][v], q, xc + 2 * i)
                                        : _mm512_dpbf16_ps(acc[i % NA][b][v], q, xp[b]);
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

template <int MB, bool kVbmi2>
void rows_block(const uint16_t* x, const float* xoff, const Problem& p, int64_t t, int64_t nv, float* res) {
  switch (nv) {
    case 4: block<MB, 4, kVbmi2>(x, xoff, p, t, res); break;
    case 3: block<MB, 3, kVbmi2>(x, xoff, p, t, res); break;
    case 2: block<MB, 2, kVbmi2>(x, xoff, p, t, res); break;
    default: block<MB, 1, kVbmi2>(x, xoff, p, t, res);
  }
}

template <bool kVbmi2>
void tiles_pass(const uint16_t* x, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out) {
  for_each_block(p, t0, t1, p.m == 1 ? kOneRowTiles : kMaxTiles, out,
                 [&](int64_t i, int64_t mb, int64_t t, int64_t nv, float* res) {
                   const uint16_t* xi = x + i * p.k;
                   const float* oi = xoff + i * p.groups;
                   switch (mb) {
                     case 4: rows_block<4, kVbmi2>(xi, oi, p, t, nv, res); break;
                     case 3: rows_block<3, kVbmi2>(xi, oi, p, t, nv, res); break;
                     case 2: rows_block<2, kVbmi2>(xi, oi, p, t, nv, res); break;
                     default: rows_block<1, kVbmi2>(xi, oi, p, t, nv, res);
                   }
                 });
}

}  // namespace

bool avx512bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

bool avx512vbmi2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi2");
}

namespace {
__attribute__((target("avx512f"))) int64_t stream_or_avx512(const uint8_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 256) {
    a0 = _mm512_or_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_or_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_or_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_or_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  return _mm512_reduce_or_epi64(_mm512_or_si512(_mm512_or_si512(a0, a1), _mm512_or_si512(a2, a3)));
}
}  // namespace

int64_t stream_or(const uint8_t* p, size_t n) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return stream_or_avx512(p, n);
  uint64_t acc[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < n; i += 32)
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, sizeof(v));
      acc[j] |= v;
    }
  return static_cast<int64_t>(acc[0] | acc[1] | acc[2] | acc[3]);
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

void avx512_tiles(const uint16_t* x, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out,
                  bool vbmi2) {
  if (vbmi2) tiles_pass<true>(x, xoff, p, t0, t1, out);
  else tiles_pass<false>(x, xoff, p, t0, t1, out);
}

#else  // not x86 / not GCC-compatible: never selected

bool avx512bf16_supported() { return false; }
bool avx512vbmi2_supported() { return false; }
int64_t stream_or(const uint8_t* p, size_t n) {
  uint64_t acc = 0;
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, sizeof(v));
    acc |= v;
  }
  return static_cast<int64_t>(acc);
}
void avx512_offsets(const uint16_t*, const Problem&, float*) {}
void avx512_tiles(const uint16_t*, const float*, const Problem&, int64_t, int64_t, const Out&, bool) {}

#endif

}  // namespace vllm_plugins_int4

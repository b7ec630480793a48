// AVX512-VNNI path of the CPU int4 GEMM with int8 activations (W4A8; opt-in,
// never chosen by "auto"; layout: int4_kernels.h).
//
// vnni_prepare quantizes each activation row per 32 inputs (llama.cpp's Q8_0):
// d = max|x| / 127, xq = round-half-even(x / d) in -127..127, and stores the
// int8 values of each block of 8 inputs in the order 0,4,1,5,2,6,3,7. That is
// the byte order of the layout's 32-bit lane n: its low nibbles (lane &
// 0x0F0F0F0F) are the nibbles of inputs 8c+0, 8c+4, 8c+1, 8c+5 and its high
// nibbles ((lane >> 4) & 0x0F0F0F0F) those of 8c+2, 8c+6, 8c+3, 8c+7. So a
// 64-byte block (16 outputs x 8 inputs) is one shift, two ANDs and two
// vpdpbusd (unsigned nibble u x signed int8, four per 32-bit lane) against the
// two broadcast 4-byte halves of the block's activations. Per 32 inputs the
// int32 sums lose 8 * sum(xq) (u - 8 = the signed weight; exact in integers)
// and are scaled by d in float32; at a group's end the group scale multiplies
// them into the row's total.

#include "int4_kernels.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vllm_plugins_int4 {

#if defined(__x86_64__) && defined(__GNUC__)

#define VP_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

namespace {

static_assert(kMaxBlockTiles >= 2);
constexpr int kMaxTiles = 2;             // tiles per pass (int32 + float32 accumulators: 4 x 2 x 2 of 32 registers)
// Several tiles per pass (2+ rows): software prefetch this many blocks ahead in
// each tile's stream (4 KiB). One tile per pass (1 row): none; on huge pages it
// read at the rate of a plain read without it (4 KiB ahead: 2-4% slower), and on
// 4 KiB pages 20% faster than with it (one core, 0.5B shapes, in-process A/B).
constexpr int64_t kPrefetchBlocks = 64;
constexpr int64_t kChunkBlocks = kInt8Chunk / kBlockK;

VP_VNNI inline __m512i quad_of(const int8_t* x) {  // 4 int8 activations in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return _mm512_set1_epi32(v);
}

// MB rows x NV tiles starting at tile t; res[b][v * 16 + n]. NA int32 chains
// per (row, tile): one row and one tile needs several to hide vpdpbusd's latency.
template <int MB, int NV>
VP_VNNI void block(const int8_t* xq, const float* xd, const int32_t* xs, const Problem& p, int64_t t, float* res) {
  constexpr int NA = MB * NV == 1 ? 4 : MB * NV == 2 ? 2 : 1;
  const int64_t chunks = p.k / kInt8Chunk, cpg = p.gs / kInt8Chunk;  // chunks per row, per group
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const uint8_t* w[NV];
  const float* s[NV];
  start_block<MB, NV>(p, t, w, s, res);  // totals in memory: the registers are left to the accumulators

  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 facc[MB][NV];
    for (int b = 0; b < MB; ++b)
      for (int v = 0; v < NV; ++v) facc[b][v] = _mm512_setzero_ps();
    for (int64_t ch = g * cpg; ch < (g + 1) * cpg; ++ch) {
      __m512i acc[NA][MB][NV];
      for (int a = 0; a < NA; ++a)
        for (int b = 0; b < MB; ++b)
          for (int v = 0; v < NV; ++v) acc[a][b][v] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int64_t cc = 0; cc < kChunkBlocks; ++cc) {
        const int64_t c = ch * kChunkBlocks + cc;
        __m512i lo[NV], hi[NV];
        for (int v = 0; v < NV; ++v) {
          const uint8_t* blk = w[v] + c * kBlockBytes;
          if (NV > 1) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * kBlockBytes), _MM_HINT_T0);
          const __m512i wv = _mm512_loadu_si512(blk);
          lo[v] = _mm512_and_si512(wv, low4);
          hi[v] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
        }
        for (int b = 0; b < MB; ++b) {
          const int8_t* xc = xq + b * p.k + c * kBlockK;
          const __m512i xl = quad_of(xc), xh = quad_of(xc + 4);
          for (int v = 0; v < NV; ++v) {
            __m512i& al = acc[(2 * cc) % NA][b][v];
            al = _mm512_dpbusd_epi32(al, lo[v], xl);
            __m512i& ah = acc[(2 * cc + 1) % NA][b][v];
            ah = _mm512_dpbusd_epi32(ah, hi[v], xh);
          }
        }
      }
      for (int b = 0; b < MB; ++b) {
        const __m512i off = _mm512_set1_epi32(xs[b * chunks + ch]);
        const __m512 d = _mm512_set1_ps(xd[b * chunks + ch]);
        for (int v = 0; v < NV; ++v) {
          __m512i sum = acc[0][b][v];
          for (int a = 1; a < NA; ++a) sum = _mm512_add_epi32(sum, acc[a][b][v]);
          facc[b][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, off)), d, facc[b][v]);
        }
      }
    }
    for (int b = 0; b < MB; ++b)
      for (int v = 0; v < NV; ++v) {
        float* tot = res + (b * NV + v) * kTile;
        _mm512_storeu_ps(tot, _mm512_fmadd_ps(facc[b][v], _mm512_loadu_ps(s[v] + g * kTile), _mm512_loadu_ps(tot)));
      }
  }
}

template <int MB>
void rows_block(const int8_t* xq, const float* xd, const int32_t* xs, const Problem& p, int64_t t, int64_t nv,
                float* res) {
  if (nv == 2) block<MB, 2>(xq, xd, xs, p, t, res);
  else block<MB, 1>(xq, xd, xs, p, t, res);
}

}  // namespace

bool avx512vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

VP_VNNI void vnni_prepare(const uint16_t* x, const Problem& p, int8_t* xq, float* xd, int32_t* xs) {
  const int64_t chunks = p.k / kInt8Chunk;
  // Within each 16 inputs (two blocks of 8): 0,4,1,5,2,6,3,7 and the same 8 later.
  const __m512i order = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  for (int64_t b = 0; b < p.m; ++b)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const uint16_t* xc = x + b * p.k + ch * kInt8Chunk;
      __m512 f[2];
      for (int h = 0; h < 2; ++h) {  // bfloat16 -> float32: a 16-bit shift
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 16 * h));
        f[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(f[0]), _mm512_abs_ps(f[1])));
      const float d = amax / 127.f;
      __m512i sum = _mm512_setzero_si512();
      for (int h = 0; h < 2; ++h) {
        // Round half to even (the default MXCSR mode), |x / d| <= 127; all zero where the chunk is.
        const __m512i q = d > 0.f ? _mm512_cvtps_epi32(_mm512_div_ps(f[h], _mm512_set1_ps(d))) : _mm512_setzero_si512();
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * p.k + ch * kInt8Chunk + 16 * h),
                         _mm512_cvtsepi32_epi8(_mm512_permutexvar_epi32(order, q)));
      }
      xd[b * chunks + ch] = d;
      xs[b * chunks + ch] = 8 * _mm512_reduce_add_epi32(sum);
    }
}

void vnni_tiles(const int8_t* xq, const float* xd, const int32_t* xs, const Problem& p, int64_t t0, int64_t t1,
                const Out& out) {
  const int64_t chunks = p.k / kInt8Chunk;
  // One row: one weight stream, as on the bfloat16 path.
  for_each_block(p, t0, t1, p.m == 1 ? 1 : kMaxTiles, out, [&](int64_t i, int64_t mb, int64_t t, int64_t nv, float* res) {
    const int8_t* qi = xq + i * p.k;
    const float* di = xd + i * chunks;
    const int32_t* si = xs + i * chunks;
    switch (mb) {
      case 4: rows_block<4>(qi, di, si, p, t, nv, res); break;
      case 3: rows_block<3>(qi, di, si, p, t, nv, res); break;
      case 2: rows_block<2>(qi, di, si, p, t, nv, res); break;
      default: rows_block<1>(qi, di, si, p, t, nv, res);
    }
  });
}

#else  // not x86 / not GCC-compatible: never selected

bool avx512vnni_supported() { return false; }
void vnni_prepare(const uint16_t*, const Problem&, int8_t*, float*, int32_t*) {}
void vnni_tiles(const int8_t*, const float*, const int32_t*, const Problem&, int64_t, int64_t, const Out&) {}

#endif

}  // namespace vllm_plugins_int4

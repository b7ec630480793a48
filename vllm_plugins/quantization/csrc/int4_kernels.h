// Shared declarations of the CPU int4 GEMM kernels (one .cpp per ISA path).
//
// Layout (built by vllm_plugins.quantization.cpu_ext.pack_tiles; tested
// there as a contract). Weights W[N, K] are stored nibbles u = q + 8 in 0..15,
// N % 4 == 0, K % 128 == 0:
//   qw: uint8 [N / 4, K / 128, 4, 64]  -- tile t holds rows 4t..4t+3; for
//       chunk c (inputs 128c..128c+127) and row r, 32 little-endian uint16
//       words; nibble i (bits 4i..4i+3) of word j is u[4t + r, 128c + 32i + j].
//   sc: float32 [N / 4, G, 4]           -- sc[t, g, r] = scale of row 4t + r, group g.
// out[m, n] = sum_k x[m, k] * (u[n, k] - 8) * sc[n, k / group_size], float32
// accumulation. Every path reads this one layout.

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace vllm_plugins_int4 {

constexpr int64_t kRows = 4;         // output rows per tile
constexpr int64_t kChunk = 128;      // inputs per chunk
constexpr int64_t kChunkBytes = 64;  // bytes of one row's chunk

// One GEMM call, shared by all paths. The paths differ in what they make of
// the activations once per call (prepare) and in the tile loop.
struct Problem {
  int64_t m, k, n, gs, groups;
  const uint8_t* qw;  // [N/4, K/128, 4, 64]
  const float* sc;    // [N/4, G, 4]
  int64_t tile_bytes() const { return (k / kChunk) * kRows * kChunkBytes; }
};

// Writes out[b, 4t + r] (row stride p.n) as float for tiles t0..t1-1.
struct Out {
  float* f32 = nullptr;         // one of the two
  c10::BFloat16* bf16 = nullptr;
  void put(int64_t i, float v) const {
    if (f32 != nullptr) f32[i] = v; else bf16[i] = c10::BFloat16(v);
  }
};

// --- AVX512-BF16 (int4_avx512.cpp). x: bfloat16 bits [m, k]; xoff: 136 * sum
// of x over each group [m, G] (see avx512_offsets).
bool avx512bf16_supported();
void avx512_offsets(const uint16_t* x, const Problem& p, float* xoff);
void avx512_tiles(const uint16_t* x, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out);
void avx512_dequant_tile(const uint8_t* qw, const float* sc, int64_t k, int64_t gs, c10::BFloat16* rows);

// --- AVX2 + FMA (int4_avx2.cpp). xp: float32 x in the order and scaling
// avx2_prepare writes (kChunk floats per chunk per row); xoff: 8 * sum of x
// over each group [m, G].
bool avx2_supported();
void avx2_prepare(const float* x, const Problem& p, float* xp, float* xoff);
void avx2_tiles(const float* xp, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out);

}  // namespace vllm_plugins_int4

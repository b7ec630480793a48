// Shared declarations of the CPU int4 GEMM kernels (one .cpp per ISA path).
//
// Layout (built by vllm_plugins.quantization.cpu_ext.pack_tiles; tested there
// as a contract). Weights W[N, K] are stored nibbles u = q + 8 in 0..15,
// N % 16 == 0, K % 32 == 0:
//   qw: uint8 [N / 16, K / 8, 64] -- tile t holds outputs 16t..16t+15; block c
//       (inputs 8c..8c+7) is 32 little-endian uint16 words; nibble i (bits
//       4i..4i+3) of word 2n + e is u[16t + n, 8c + 2i + e] (n < 16, e < 2).
//   sc: float32 [N / 16, G, 16]  -- sc[t, g, n] = scale of output 16t + n, group g.
// out[m, n] = sum_k x[m, k] * (u[n, k] - 8) * sc[n, k / group_size], float32
// accumulation. Outputs lie in vector lanes (16 per tile), pairs of inputs in
// each 32-bit lane, so a group scale is one vector multiply per 16 outputs and
// group, and one activation pair is broadcast to all lanes. Every path reads
// this one layout.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace vllm_plugins_int4 {

constexpr int64_t kTile = 16;        // outputs per tile
constexpr int64_t kBlockK = 8;       // inputs per block
constexpr int64_t kBlockBytes = 64;  // bytes of one tile's block
constexpr int64_t kMaxRows = 4;      // activation rows per register block, every path
constexpr int64_t kMaxBlockTiles = 4;  // tiles per register block, at most

// One GEMM call, shared by all paths.
struct Problem {
  int64_t m, k, n, gs, groups;
  const uint8_t* qw;  // [N/16, K/8, 64]
  const float* sc;    // [N/16, G, 16]
  int64_t tile_bytes() const { return (k / kBlockK) * kBlockBytes; }
  const uint8_t* tile_weights(int64_t t) const { return qw + t * tile_bytes(); }  // tile t's packed nibbles
  const float* tile_scales(int64_t t) const { return sc + t * groups * kTile; }     // tile t's group scales
};

// The set-up of a register block of MB rows x NV tiles from tile t: each tile's weight and scale
// pointers, and its totals res[b][v * 16 + n] zeroed (they live in memory, touched once per group).
template <int MB, int NV>
inline void start_block(const Problem& p, int64_t t, const uint8_t* (&w)[NV], const float* (&s)[NV], float* res) {
  for (int v = 0; v < NV; ++v) {
    w[v] = p.tile_weights(t + v);
    s[v] = p.tile_scales(t + v);
  }
  for (int64_t j = 0; j < MB * NV * kTile; ++j) res[j] = 0.f;
}

// The output [m, n], float32 or bfloat16.
struct Out {
  float* f32 = nullptr;  // one of the two
  c10::BFloat16* bf16 = nullptr;
  void put(int64_t i, float v) const {
    if (f32 != nullptr) f32[i] = v; else bf16[i] = c10::BFloat16(v);
  }
};

// The pass every path makes over tiles t0..t1-1 and all rows: `tiles` tiles and
// up to kMaxRows rows at a time; block(i, mb, t, nv, res) writes res[b * nv * 16 + j]
// (row i + b, output 16t + j), which goes to out.
template <class Block>
inline void for_each_block(const Problem& p, int64_t t0, int64_t t1, int64_t tiles, const Out& out, const Block& block) {
  TORCH_CHECK(tiles >= 1 && tiles <= kMaxBlockTiles, "int4: ", tiles, " tiles per block");
  float res[kMaxRows * kMaxBlockTiles * kTile];
  for (int64_t t = t0; t < t1; t += tiles) {
    const int64_t nv = std::min<int64_t>(tiles, t1 - t);
    for (int64_t i = 0; i < p.m; i += kMaxRows) {
      const int64_t mb = std::min<int64_t>(kMaxRows, p.m - i);
      block(i, mb, t, nv, res);
      for (int64_t b = 0; b < mb; ++b)
        for (int64_t j = 0; j < nv * kTile; ++j) out.put((i + b) * p.n + t * kTile + j, res[b * nv * kTile + j]);
    }
  }
}

// --- AVX512-BF16 (int4_avx512.cpp). x: bfloat16 bits [m, k]; xoff: 136 * sum
// of x over each group [m, G] (avx512_offsets). Tiles t0..t1-1, all m rows.
// vbmi2: the CPU has AVX512-VBMI2 (avx512vbmi2_supported), which unpacks one
// of the four nibbles in one instruction instead of two.
bool avx512bf16_supported();
bool avx512vbmi2_supported();
void avx512_offsets(const uint16_t* x, const Problem& p, float* xoff);
void avx512_tiles(const uint16_t* x, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out,
                  bool vbmi2);

// The OR of every 64-bit word of p[0, n) (n a multiple of 256): a plain
// streaming read, 512-bit loads in four chains where the CPU has AVX512F,
// else portable C++ (int4_avx512.cpp).
int64_t stream_or(const uint8_t* p, size_t n);

// --- AVX2 + FMA (int4_avx2.cpp). xp: float32 x scaled as avx2_prepare writes
// it [m, k]; xoff: 8 * sum of x over each group [m, G].
bool avx2_supported();
void avx2_prepare(const float* x, const Problem& p, float* xp, float* xoff);
void avx2_tiles(const float* xp, const float* xoff, const Problem& p, int64_t t0, int64_t t1, const Out& out);

// --- AVX512-VNNI with int8 activations (int4_vnni.cpp; opt-in: it rounds x).
// xq: int8 x [m, k], per 32 inputs round-half-even(x / d), d = max|x| / 127,
// each block of 8 inputs in the order 0,4,1,5,2,6,3,7; xd: d [m, k/32];
// xs: 8 * sum of xq over each 32 inputs [m, k/32].
constexpr int64_t kInt8Chunk = 32;  // inputs per activation scale
bool avx512vnni_supported();
void vnni_prepare(const uint16_t* x, const Problem& p, int8_t* xq, float* xd, int32_t* xs);
void vnni_tiles(const int8_t* xq, const float* xd, const int32_t* xs, const Problem& p, int64_t t0, int64_t t1,
                const Out& out);

// Nibble of u[16t + n, 8c + j] in the 32-bit word of (tile, block, n).
inline int nibble(uint32_t word, int64_t j) { return (word >> (4 * (j / 2) + 16 * (j % 2))) & 0xF; }

}  // namespace vllm_plugins_int4

// CPU int4 weight-only GEMM, symmetric uint4b8: the torch ops, the choice of
// ISA path, threading, and the portable C++ path (layout: int4_kernels.h).
//
// Paths, all reading the one tile layout:
//   avx512bf16  bfloat16 activations, vdpbf16ps (int4_avx512.cpp)
//   avx2        AVX2 + FMA, float32 arithmetic; bfloat16 or float32 activations (int4_avx2.cpp)
//   portable    plain C++, the reference for the tests
// `isa` "auto" takes the best the CPU reports; a named one must be supported
// by the CPU (checked here, so a test cannot run AVX-512 code without it).
// float32 activations never take the avx512bf16 path: they run avx2 there.
// The output has the dtype of x.

#include "int4_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

namespace vllm_plugins_int4 {
namespace {

enum class Isa { kAvx512Bf16, kAvx2, kPortable };

bool supported(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return avx512bf16_supported();
    case Isa::kAvx2: return avx2_supported();
    default: return true;
  }
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") {
    for (Isa isa : {Isa::kAvx512Bf16, Isa::kAvx2})
      if (supported(isa)) return isa;
    return Isa::kPortable;
  }
  Isa isa;
  if (name == "avx512bf16") isa = Isa::kAvx512Bf16;
  else if (name == "avx2") isa = Isa::kAvx2;
  else if (name == "portable") isa = Isa::kPortable;
  else TORCH_CHECK(false, "int4: unknown ISA '", name, "' (auto, avx512bf16, avx2 or portable)");
  TORCH_CHECK(supported(isa), "int4: this CPU cannot run the ", name, " path");
  return isa;
}

void portable_tiles_impl(const float* x, const Problem& p, int64_t t0, int64_t t1, const Out& out) {
  const int64_t chunks = p.k / kChunk;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* q = p.qw + t * p.tile_bytes();
    const float* s = p.sc + t * p.groups * kRows;
    for (int64_t b = 0; b < p.m; ++b)
      for (int64_t r = 0; r < kRows; ++r) {
        float acc = 0.f, part = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const uint8_t* w = q + (c * kRows + r) * kChunkBytes;
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t kq = c * kChunk + 32 * i;  // first input of this quarter
            for (int64_t j = 0; j < 32; ++j) {
              const int u = ((w[2 * j] | (w[2 * j + 1] << 8)) >> (4 * i)) & 0xF;
              part += x[b * p.k + kq + j] * static_cast<float>(u - 8);
            }
            if ((kq + 32) % p.gs == 0) {
              acc += part * s[(kq / p.gs) * kRows + r];
              part = 0.f;
            }
          }
        }
        out.put(b * p.n + t * kRows + r, acc);
      }
  }
}

void check_weights(const char* op, const at::Tensor& qw, const at::Tensor& sc, int64_t k, int64_t group_size,
                   int64_t* gs, int64_t* groups) {
  TORCH_CHECK(qw.dim() == 4 && qw.scalar_type() == at::kByte && qw.size(2) == kRows && qw.size(3) == kChunkBytes,
              op, ": qw must be uint8 [N/4, K/128, 4, 64]");
  *gs = group_size == -1 ? k : group_size;
  TORCH_CHECK(*gs >= 32 && *gs % 32 == 0 && k % *gs == 0 && (*gs < kChunk ? kChunk % *gs == 0 : *gs % kChunk == 0),
              op, ": group size ", group_size, " does not fit K=", k);
  *groups = k / *gs;
  TORCH_CHECK(sc.dim() == 3 && sc.scalar_type() == at::kFloat && sc.size(0) == qw.size(0) && sc.size(1) == *groups &&
                  sc.size(2) == kRows,
              op, ": scales must be float32 [N/4, K/group, 4]");
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, int64_t group_size,
                     c10::string_view isa_arg) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "int4_gemm: x must be 2-D bfloat16 or float32");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(qw.dim() == 4 && qw.size(1) * kChunk == k, "int4_gemm: x has ", k, " inputs, qw ",
              qw.dim() == 4 ? qw.size(1) * kChunk : -1);
  int64_t gs = 0, groups = 0;
  check_weights("int4_gemm", qw, sc, k, group_size, &gs, &groups);
  Isa isa = parse_isa(std::string(isa_arg));
  if (isa == Isa::kAvx512Bf16 && x.scalar_type() == at::kFloat) isa = supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kPortable;

  const at::Tensor qc = qw.contiguous(), scc = sc.contiguous();
  const int64_t tiles = qw.size(0), n = tiles * kRows;
  at::Tensor out = at::empty({m, n}, x.options());
  Out o;
  if (x.scalar_type() == at::kFloat) o.f32 = out.data_ptr<float>();
  else o.bf16 = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());
  const Problem p{m, k, n, gs, groups, qc.data_ptr<uint8_t>(), scc.data_ptr<float>()};
  const int64_t grain = std::max<int64_t>(1, 16 / std::max<int64_t>(m, 1));

  if (isa == Isa::kAvx512Bf16) {
    const at::Tensor xc = x.contiguous();
    const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    std::vector<float> xoff(m * groups);
    avx512_offsets(xp, p, xoff.data());
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { avx512_tiles(xp, xoff.data(), p, t0, t1, o); });
    return out;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  if (isa == Isa::kAvx2) {
    std::vector<float> xp(m * k), xoff(m * groups);
    avx2_prepare(xf.data_ptr<float>(), p, xp.data(), xoff.data());
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { avx2_tiles(xp.data(), xoff.data(), p, t0, t1, o); });
    return out;
  }
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { portable_tiles_impl(xf.data_ptr<float>(), p, t0, t1, o); });
  return out;
}

// The bfloat16 weight [N, K], for batches large enough that a bfloat16 GEMM
// beats the tile kernel. AVX512-BF16 table lookups, else plain C++.
at::Tensor int4_dequant(const at::Tensor& qw, const at::Tensor& sc, int64_t group_size, c10::string_view isa_arg) {
  TORCH_CHECK(qw.dim() == 4, "int4_dequant: qw must be uint8 [N/4, K/128, 4, 64]");
  const int64_t tiles = qw.size(0), chunks = qw.size(1), n = tiles * kRows, k = chunks * kChunk;
  int64_t gs = 0, groups = 0;
  check_weights("int4_dequant", qw, sc, k, group_size, &gs, &groups);
  const bool fast = parse_isa(std::string(isa_arg)) == Isa::kAvx512Bf16;
  const at::Tensor qc = qw.contiguous(), scc = sc.contiguous();
  at::Tensor out = at::empty({n, k}, qw.options().dtype(at::kBFloat16));
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float* sp = scc.data_ptr<float>();
  auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (fast) {
        avx512_dequant_tile(qp + t * chunks * kRows * kChunkBytes, sp + t * groups * kRows, k, gs, op + t * kRows * k);
        continue;
      }
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

// What the linear layers call: the tile kernel below dequant_min_rows rows, a
// GEMM on the dequantized weight from there on. One op, so that the choice on
// the batch size stays outside torch.compile's graph.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, int64_t group_size,
                       int64_t dequant_min_rows, c10::string_view isa) {
  if (x.size(0) >= dequant_min_rows) return at::linear(x, int4_dequant(qw, sc, group_size, isa).to(x.scalar_type()));
  return int4_gemm(x, qw, sc, group_size, isa);
}

bool isa_supported(c10::string_view name) {
  const std::string s(name);
  if (s == "avx512bf16") return supported(Isa::kAvx512Bf16);
  if (s == "avx2") return supported(Isa::kAvx2);
  return s == "portable" || s == "auto";
}

}  // namespace
}  // namespace vllm_plugins_int4

TORCH_LIBRARY(vllm_plugins_cpu, m) {
  m.def("int4_gemm(Tensor x, Tensor qw, Tensor scales, int group_size, str isa='auto') -> Tensor");
  m.def("int4_dequant(Tensor qw, Tensor scales, int group_size, str isa='auto') -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qw, Tensor scales, int group_size, int dequant_min_rows, str isa='auto') -> Tensor");
  m.def("int4_isa_supported(str isa) -> bool", &vllm_plugins_int4::isa_supported);
}

TORCH_LIBRARY_IMPL(vllm_plugins_cpu, CPU, m) {
  m.impl("int4_gemm", &vllm_plugins_int4::int4_gemm);
  m.impl("int4_dequant", &vllm_plugins_int4::int4_dequant);
  m.impl("int4_linear", &vllm_plugins_int4::int4_linear);
}

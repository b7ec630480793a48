// CPU int4 weight-only GEMM, symmetric uint4b8: the torch ops, the choice of
// ISA path, threading, and the portable C++ path (layout: int4_kernels.h).
//
// Paths, all reading the one tile layout:
//   avx512bf16  bfloat16 activations, vdpbf16ps (int4_avx512.cpp)
//   avx2        AVX2 + FMA, float32 arithmetic; bfloat16 or float32 activations (int4_avx2.cpp)
//   portable    plain C++, the reference for the tests
// `isa` "auto" takes the best the CPU reports; a named one must be supported
// by the CPU (checked here, so a test cannot run AVX-512 code without it).
// `act` "bf16" (the default) keeps the activations exact on those paths;
// "int8" (opt-in, W4A8 numerics) quantizes them per 32 inputs and runs the
// AVX512-VNNI path (int4_vnni.cpp) whatever `isa` says; bfloat16 x only.
// float32 activations never take the avx512bf16 path: they run avx2 there.
// The output has the dtype of x. Threads split the output tiles
// (at::parallel_for). "avx512bf16_novbmi2" is the avx512bf16 path without its
// one AVX512-VBMI2 instruction, as CPUs with AVX512-BF16 but no VBMI2 run it
// (for the tests; "avx512bf16" takes VBMI2 where the CPU has it).
//
// Also here: int4_huge_pages, a copy of a tensor on transparent huge pages
// (the packed weights: one core streams them ~1.6x faster than from 4 KiB
// pages here), and int4_stream_read, the plain AVX-512 read loop that
// scripts/bench_int4_cpu.py takes as one of its read-bandwidth references.

#include "int4_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vllm_plugins_int4 {
namespace {

enum class Isa { kAvx512Bf16, kAvx512Bf16NoVbmi2, kAvx2, kPortable };

bool supported(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512Bf16NoVbmi2: return avx512bf16_supported();
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
  else if (name == "avx512bf16_novbmi2") isa = Isa::kAvx512Bf16NoVbmi2;
  else if (name == "avx2") isa = Isa::kAvx2;
  else if (name == "portable") isa = Isa::kPortable;
  else TORCH_CHECK(false, "int4: unknown ISA '", name, "' (auto, avx512bf16, avx512bf16_novbmi2, avx2 or portable)");
  TORCH_CHECK(supported(isa), "int4: this CPU cannot run the ", name, " path");
  return isa;
}

// Output 16t + n of row b, straight from the layout formula.
void portable_tiles_impl(const float* x, const Problem& p, int64_t t0, int64_t t1, const Out& out) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* q = p.tile_weights(t);
    const float* s = p.tile_scales(t);
    for (int64_t b = 0; b < p.m; ++b)
      for (int64_t n = 0; n < kTile; ++n) {
        float acc = 0.f;
        for (int64_t g = 0; g < p.groups; ++g) {
          float part = 0.f;
          for (int64_t c = g * p.gs / kBlockK; c < (g + 1) * p.gs / kBlockK; ++c) {
            const uint8_t* w = q + c * kBlockBytes + 4 * n;
            const uint32_t word = w[0] | (w[1] << 8) | (w[2] << 16) | (uint32_t(w[3]) << 24);
            for (int64_t j = 0; j < kBlockK; ++j) part += x[b * p.k + c * kBlockK + j] * float(nibble(word, j) - 8);
          }
          acc += part * s[g * kTile + n];
        }
        out.put(b * p.n + t * kTile + n, acc);
      }
  }
}

void check_weights(const char* op, const at::Tensor& qw, const at::Tensor& sc, int64_t k, int64_t group_size,
                   int64_t* gs, int64_t* groups) {
  TORCH_CHECK(qw.dim() == 3 && qw.scalar_type() == at::kByte && qw.size(2) == kBlockBytes,
              op, ": qw must be uint8 [N/16, K/8, 64]");
  *gs = group_size == -1 ? k : group_size;
  TORCH_CHECK(*gs >= 32 && *gs % 32 == 0 && k % *gs == 0, op, ": group size ", group_size, " does not fit K=", k);
  *groups = k / *gs;
  TORCH_CHECK(sc.dim() == 3 && sc.scalar_type() == at::kFloat && sc.size(0) == qw.size(0) && sc.size(1) == *groups &&
                  sc.size(2) == kTile,
              op, ": scales must be float32 [N/16, K/group, 16]");
}

bool int8_requested(const std::string& act) {
  TORCH_CHECK(act == "bf16" || act == "int8", "int4: unknown activations '", act, "' (bf16 or int8)");
  TORCH_CHECK(act == "bf16" || avx512vnni_supported(), "int4: this CPU cannot run int8 activations (no AVX512-VNNI)");
  return act == "int8";
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, int64_t group_size,
                     c10::string_view isa_arg, c10::string_view act) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "int4_gemm: x must be 2-D bfloat16 or float32");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(qw.dim() == 3 && qw.size(1) * kBlockK == k, "int4_gemm: x has ", k, " inputs, qw ",
              qw.dim() == 3 ? qw.size(1) * kBlockK : -1);
  int64_t gs = 0, groups = 0;
  check_weights("int4_gemm", qw, sc, k, group_size, &gs, &groups);
  Isa isa = parse_isa(std::string(isa_arg));
  const bool int8 = int8_requested(std::string(act));
  TORCH_CHECK(!int8 || x.scalar_type() == at::kBFloat16, "int4_gemm: int8 activations take bfloat16 x");
  const bool avx512 = isa == Isa::kAvx512Bf16 || isa == Isa::kAvx512Bf16NoVbmi2;
  if (avx512 && x.scalar_type() == at::kFloat) isa = supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kPortable;

  const at::Tensor qc = qw.contiguous(), scc = sc.contiguous();
  const int64_t tiles = qw.size(0), n = tiles * kTile;
  at::Tensor out = at::empty({m, n}, x.options());
  Out o;
  if (x.scalar_type() == at::kFloat) o.f32 = out.data_ptr<float>();
  else o.bf16 = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());
  const Problem p{m, k, n, gs, groups, qc.data_ptr<uint8_t>(), scc.data_ptr<float>()};
  const int64_t grain = 4;  // tiles: 64 outputs, the AVX-512 path's widest block

  if (int8) {
    const at::Tensor xc = x.contiguous();
    const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    const int64_t chunks = m * (k / kInt8Chunk);
    std::vector<int8_t> xq(m * k);
    std::vector<float> xd(chunks);
    std::vector<int32_t> xs(chunks);
    vnni_prepare(xp, p, xq.data(), xd.data(), xs.data());
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      vnni_tiles(xq.data(), xd.data(), xs.data(), p, t0, t1, o);
    });
    return out;
  }
  if (isa == Isa::kAvx512Bf16 || isa == Isa::kAvx512Bf16NoVbmi2) {
    const at::Tensor xc = x.contiguous();
    const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    std::vector<float> xoff(m * groups);
    avx512_offsets(xp, p, xoff.data());
    const bool vbmi2 = isa == Isa::kAvx512Bf16 && avx512vbmi2_supported();
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { avx512_tiles(xp, xoff.data(), p, t0, t1, o, vbmi2); });
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
// beats the tile kernel: plain C++, 8 nibbles per 32-bit word, rows in place.
at::Tensor int4_dequant(const at::Tensor& qw, const at::Tensor& sc, int64_t group_size) {
  TORCH_CHECK(qw.dim() == 3, "int4_dequant: qw must be uint8 [N/16, K/8, 64]");
  const int64_t tiles = qw.size(0), blocks = qw.size(1), n = tiles * kTile, k = blocks * kBlockK;
  int64_t gs = 0, groups = 0;
  check_weights("int4_dequant", qw, sc, k, group_size, &gs, &groups);
  const at::Tensor qc = qw.contiguous(), scc = sc.contiguous();
  at::Tensor out = at::empty({n, k}, qw.options().dtype(at::kBFloat16));
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float* sp = scc.data_ptr<float>();
  auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t nn = 0; nn < kTile; ++nn) {
        c10::BFloat16* row = op + (t * kTile + nn) * k;
        for (int64_t c = 0; c < blocks; ++c) {
          const uint8_t* w = qp + (t * blocks + c) * kBlockBytes + 4 * nn;
          const uint32_t word = w[0] | (w[1] << 8) | (w[2] << 16) | (uint32_t(w[3]) << 24);
          const float s = sp[(t * groups + c * kBlockK / gs) * kTile + nn];
          for (int64_t j = 0; j < kBlockK; ++j) row[c * kBlockK + j] = c10::BFloat16(float(nibble(word, j) - 8) * s);
        }
      }
  });
  return out;
}

// What the linear layers call: the tile kernel below dequant_min_rows rows, a
// GEMM on the dequantized weight from there on. One op, so that the choice on
// the batch size stays outside torch.compile's graph.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, int64_t group_size,
                       int64_t dequant_min_rows, c10::string_view isa, c10::string_view act) {
  if (x.size(0) >= dequant_min_rows) return at::linear(x, int4_dequant(qw, sc, group_size).to(x.scalar_type()));
  return int4_gemm(x, qw, sc, group_size, isa, act);
}

// A copy of t in a fresh anonymous mapping that starts on a 2 MiB boundary
// and is advised MADV_HUGEPAGE before its first touch, so that the kernel
// backs it with transparent huge pages where they are enabled ("always" or
// "madvise") and free. (Memory from malloc may be reused, already faulted in
// on 4 KiB pages, which the advice does not change.) The hardware prefetchers
// stop at page boundaries: on 4 KiB pages a tile's stream crosses one every
// 64 blocks. Elsewhere (no THP, not Linux, advice refused) it is the same copy
// on ordinary pages. Tensors under 2 MiB are returned as they are (contiguous).
constexpr size_t kHugePage = size_t(2) << 20;

at::Tensor huge_pages(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const size_t bytes = c.nbytes();
  if (bytes < kHugePage) return c;
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "int4_huge_pages: cannot map ", size, " bytes");
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw), aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > start) munmap(raw, aligned - start);  // trim to [aligned, aligned + size)
  if (start + kHugePage > aligned) munmap(reinterpret_cast<void*>(aligned + size), start + kHugePage - aligned);
  void* mem = reinterpret_cast<void*>(aligned);
  madvise(mem, size, MADV_HUGEPAGE);  // advice only: on failure the copy stays on small pages
  auto release = [size](void* q) { munmap(q, size); };
#else
  void* mem = std::aligned_alloc(kHugePage, size);
  TORCH_CHECK(mem != nullptr, "int4_huge_pages: cannot allocate ", size, " bytes");
  auto release = [](void* q) { std::free(q); };
#endif
  std::memcpy(mem, c.data_ptr(), bytes);  // first touch: the pages are faulted in here, huge where they can be
  return at::from_blob(mem, c.sizes(), c.strides(), release, c.options());
}

// Reads every byte of buf with 512-bit loads (256-bit without AVX-512) in
// four independent chains, no prefetch hints; returns their OR (so the loads
// stay). For the bench's read-bandwidth reference only.
int64_t stream_read(const at::Tensor& buf) {
  TORCH_CHECK(buf.is_contiguous() && buf.nbytes() % 256 == 0, "int4_stream_read: contiguous, a multiple of 256 bytes");
  return stream_or(static_cast<const uint8_t*>(buf.data_ptr()), buf.nbytes());
}

bool isa_supported(c10::string_view name) {
  const std::string s(name);
  if (s == "avx512bf16" || s == "avx512bf16_novbmi2") return supported(Isa::kAvx512Bf16);
  if (s == "avx2") return supported(Isa::kAvx2);
  return s == "portable" || s == "auto";
}

bool int8_supported() { return avx512vnni_supported(); }

}  // namespace
}  // namespace vllm_plugins_int4

TORCH_LIBRARY(vllm_plugins_cpu, m) {
  m.def("int4_gemm(Tensor x, Tensor qw, Tensor scales, int group_size, str isa='auto', str act='bf16') -> Tensor");
  m.def("int4_dequant(Tensor qw, Tensor scales, int group_size) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor qw, Tensor scales, int group_size, int dequant_min_rows, str isa='auto', "
        "str act='bf16') -> Tensor");
  m.def("int4_isa_supported(str isa) -> bool", &vllm_plugins_int4::isa_supported);
  m.def("int4_int8_supported() -> bool", &vllm_plugins_int4::int8_supported);
  m.def("int4_huge_pages(Tensor t) -> Tensor", &vllm_plugins_int4::huge_pages);
  m.def("int4_stream_read(Tensor buf) -> int", &vllm_plugins_int4::stream_read);
}

TORCH_LIBRARY_IMPL(vllm_plugins_cpu, CPU, m) {
  m.impl("int4_gemm", &vllm_plugins_int4::int4_gemm);
  m.impl("int4_dequant", &vllm_plugins_int4::int4_dequant);
  m.impl("int4_linear", &vllm_plugins_int4::int4_linear);
}

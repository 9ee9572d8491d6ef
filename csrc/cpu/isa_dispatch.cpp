// The CPU dispatch table: every (instruction set, dtype) build of the forward and backward loops, written out.
//
// Each entry point is a function template whose target attribute makes GCC/Clang compile the C10_ALWAYS_INLINE loops
// of forward.h and backward.h inlined into it for that instruction set; nothing else in the extension is compiled
// for AVX2 or AVX-512, so no code that may run on an older CPU uses them.

#include "isa_dispatch.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "backward.h"
#include "forward.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define DEFORMABLE_X86_DISPATCH 1
#define DEFORMABLE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DEFORMABLE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#else  // one build: the three rows of the table run the same code
#define DEFORMABLE_X86_DISPATCH 0
#define DEFORMABLE_TARGET_AVX2
#define DEFORMABLE_TARGET_AVX512
#endif

namespace deformable {
namespace cpu {
namespace {

Isa best_cpu_isa() {
#if DEFORMABLE_X86_DISPATCH
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

template <typename scalar_t>
using In = Inputs<scalar_t, at::opmath_type<scalar_t>>;
template <typename scalar_t>
using Grads = GradOutputs<at::opmath_type<scalar_t>>;

template <typename scalar_t>
void forward_base(const In<scalar_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  forward_any(in, out, begin, end);
}
template <typename scalar_t>
DEFORMABLE_TARGET_AVX2 void forward_avx2(const In<scalar_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  forward_any(in, out, begin, end);
}
template <typename scalar_t>
DEFORMABLE_TARGET_AVX512 void forward_avx512(const In<scalar_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  forward_any(in, out, begin, end);
}

template <typename scalar_t>
void backward_base(const In<scalar_t>& in, const scalar_t* grad_out, const Grads<scalar_t>& g, int64_t begin,
                   int64_t end) {
  backward_heads_any(in, grad_out, g, begin, end);
}
template <typename scalar_t>
DEFORMABLE_TARGET_AVX2 void backward_avx2(const In<scalar_t>& in, const scalar_t* grad_out, const Grads<scalar_t>& g,
                                          int64_t begin, int64_t end) {
  backward_heads_any(in, grad_out, g, begin, end);
}
template <typename scalar_t>
DEFORMABLE_TARGET_AVX512 void backward_avx512(const In<scalar_t>& in, const scalar_t* grad_out,
                                              const Grads<scalar_t>& g, int64_t begin, int64_t end) {
  backward_heads_any(in, grad_out, g, begin, end);
}

}  // namespace

Isa cpu_isa() {
  static const Isa best = best_cpu_isa();
  const char* cap = std::getenv("DEFORMABLE_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string name(cap);
  Isa wanted = Isa::kBase;
  if (name == "avx2") {
    wanted = Isa::kAvx2;
  } else if (name == "avx512") {
    wanted = Isa::kAvx512;
  } else {
    TORCH_CHECK(name == "base", "ms_deform_attn: DEFORMABLE_CPU_ISA='", name, "' is not one of base, avx2, avx512");
  }
  return std::min(wanted, best);
}

// The dispatch table: one row per instruction set, in the order of Isa.
template <typename scalar_t>
const CpuKernels<scalar_t>& cpu_kernels(Isa isa) {
  static const CpuKernels<scalar_t> table[] = {
      {forward_base<scalar_t>, backward_base<scalar_t>},      // Isa::kBase
      {forward_avx2<scalar_t>, backward_avx2<scalar_t>},      // Isa::kAvx2
      {forward_avx512<scalar_t>, backward_avx512<scalar_t>},  // Isa::kAvx512
  };
  return table[static_cast<int>(isa)];
}

// The dtypes: value float, double, half and bfloat16 (locations, weights and accumulation in at::opmath_type).
template const CpuKernels<float>& cpu_kernels<float>(Isa);
template const CpuKernels<double>& cpu_kernels<double>(Isa);
template const CpuKernels<c10::Half>& cpu_kernels<c10::Half>(Isa);
template const CpuKernels<c10::BFloat16>& cpu_kernels<c10::BFloat16>(Isa);

}  // namespace cpu
}  // namespace deformable

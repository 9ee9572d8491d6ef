// Which compiled build of the CPU loops a call runs: the instruction set (Isa) and, per dtype, the table of entry
// points (cpu_kernels). The loops are compiled three times, for AVX-512, for AVX2+FMA and for the baseline ISA, and
// picked at run time, so a build made on one machine still runs on CPUs without AVX2.
#pragma once

#include <cstdint>

#include "kernel_common.h"

namespace deformable {
namespace cpu {

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set this CPU supports, capped by the environment variable DEFORMABLE_CPU_ISA (base, avx2
// or avx512) when it is set, to compare the builds or to step around one.
Isa cpu_isa();

// Forward over work items [begin, end) (see forward.h) and backward over (batch, head) pairs [begin, end)
// (see backward.h).
template <typename scalar_t>
using ForwardFn = void (*)(const Inputs<scalar_t, at::opmath_type<scalar_t>>& in, scalar_t* out, int64_t begin,
                           int64_t end);
template <typename scalar_t>
using BackwardFn = void (*)(const Inputs<scalar_t, at::opmath_type<scalar_t>>& in, const scalar_t* grad_out,
                            const GradOutputs<at::opmath_type<scalar_t>>& g, int64_t begin, int64_t end);

template <typename scalar_t>
struct CpuKernels {
  ForwardFn<scalar_t> forward;
  BackwardFn<scalar_t> backward;
};

// The row of the dispatch table (isa_dispatch.cpp) for `isa` and scalar_t: float, double, c10::Half or
// c10::BFloat16 (the four instantiated there).
template <typename scalar_t>
const CpuKernels<scalar_t>& cpu_kernels(Isa isa);

}  // namespace cpu
}  // namespace deformable

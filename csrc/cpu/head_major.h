// The layout and visiting order of calls with many queries per map position (encoder self-attention): a head-major
// copy of value (N, M, S + 1, D), one head's map at a time, with a row of zeros per head that corners outside the
// map read, and the query rows visited in spatial order. Calls with few queries (decoder) keep the input layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../ms_deform_attn.h"

namespace deformable {
namespace cpu {

// Many queries per map position rather than few: such calls use the head-major layout and spatial_order.
bool many_queries(const MSDASizes& s);

// The visiting order of the (N * Lq) query rows (see head_major.cpp); opmath_t is float or double.
template <typename opmath_t>
std::vector<int64_t> spatial_order(const opmath_t* locations, const MSDASizes& s, const int64_t* spatial_shapes);

// Per-thread scratch memory, one buffer per use.
enum class Scratch { kValue = 0, kGradValue = 1 };

// dst[n] = src[n] with dims 1 and 2 swapped, for each n: (N, A, B, D) -> (N, B, A, D); D contiguous in both.
void copy_swapping_dims_1_2(const at::Tensor& dst, const at::Tensor& src);

// A head-major scratch tensor (N, M, S + 1, D) for value of shape (N, S, M, D), of dtype `options`, uninitialised;
// valid until this thread's next call that uses the same buffer, so it must not leave the op.
at::Tensor head_major_scratch(Scratch which, const at::Tensor& value, const at::TensorOptions& options);

// The first S rows of each head of a head-major tensor (N, M, S + 1, D): (N, M, S, D).
at::Tensor without_zero_rows(const at::Tensor& head_major);

// value (N, S, M, D) as a head-major (N, M, S + 1, D) tensor in this thread's scratch memory, row S of every head
// zeros.
at::Tensor head_major_copy(const at::Tensor& value);

}  // namespace cpu
}  // namespace deformable

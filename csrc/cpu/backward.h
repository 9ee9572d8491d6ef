// The CPU backward: gradients of value, sampling locations and attention weights. Parallel over (batch, head)
// pairs: each pair owns its slice of grad_value, so the scatter needs no atomics and its summation order is fixed
// (the call's visiting order), which makes it deterministic whatever the thread count.
//
// Templates only: isa_dispatch.cpp compiles them once per instruction set.
#pragma once

#include <type_traits>

#include "kernel_common.h"

namespace deformable {
namespace cpu {

// Returns grad . v and does gv += scale * grad. The dot product keeps kLanes partial sums: a single
// running sum is a serial chain of dependent adds that the compiler may not reorder or vectorise.
template <int kD, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE opmath_t dot_and_scatter(const opmath_t* __restrict__ grad, const scalar_t* __restrict__ v,
                                           opmath_t* __restrict__ gv, opmath_t scale, int64_t channels) {
  constexpr int kLanes = 32 / sizeof(opmath_t);
  const int64_t n = kD > 0 ? kD : channels;
  opmath_t partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      partial[j] += grad[d + j] * static_cast<opmath_t>(v[d + j]);
      gv[d + j] += scale * grad[d + j];
    }
  }
  opmath_t dot = 0;
  for (; d < n; ++d) {
    dot += grad[d] * static_cast<opmath_t>(v[d]);
    gv[d] += scale * grad[d];
  }
  for (int j = 0; j < kLanes; ++j) dot += partial[j];
  return dot;
}

#if defined(__GNUC__)
#define DEFORMABLE_VECTOR_SUMS 1
// Eight floats as one value (GCC/Clang vector extensions: one AVX register, two SSE registers on the baseline).
typedef float Float8 __attribute__((vector_size(32)));
typedef float Float4 __attribute__((vector_size(16)));
typedef int Int8 __attribute__((vector_size(32)));

// {sum(a), sum(b), sum(c), sum(d)} of four 8-lane vectors: pairwise sums across the four, six shuffles and
// four adds in all, instead of a serial reduction of each.
// Clang has only __builtin_shufflevector (constant lane indices); GCC has __builtin_shuffle (a mask vector), and
// __builtin_shufflevector from GCC 12 on.
C10_ALWAYS_INLINE Float4 sum4(Float8 a, Float8 b, Float8 c, Float8 d) {
#if defined(__clang__)
  const Float8 ab = __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13) +
                    __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
  const Float8 cd = __builtin_shufflevector(c, d, 0, 8, 1, 9, 4, 12, 5, 13) +
                    __builtin_shufflevector(c, d, 2, 10, 3, 11, 6, 14, 7, 15);
  const Float8 r = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
#else
  const Int8 lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const Float8 ab = __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
  const Float8 cd = __builtin_shuffle(c, d, lo) + __builtin_shuffle(c, d, hi);
  const Int8 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const Float8 r = __builtin_shuffle(ab, cd, lo2) + __builtin_shuffle(ab, cd, hi2);
#endif
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(r, r, 0, 1, 2, 3) + __builtin_shufflevector(r, r, 4, 5, 6, 7);
#else
  return Float4{r[0] + r[4], r[1] + r[5], r[2] + r[6], r[3] + r[7]};
#endif
}

// gv += scale * grad and partial[0:8] = lane sums of grad * v over D (float, D a multiple of 8).
template <int kD, typename scalar_t>
C10_ALWAYS_INLINE void dot_partial_and_scatter(const float* __restrict__ grad, const scalar_t* __restrict__ v,
                                               float* __restrict__ gv, float scale, float* __restrict__ partial) {
  float p[8] = {};
  for (int64_t d = 0; d < kD; d += 8) {
    for (int j = 0; j < 8; ++j) {
      p[j] += grad[d + j] * static_cast<float>(v[d + j]);
      gv[d + j] += scale * grad[d + j];
    }
  }
  for (int j = 0; j < 8; ++j) partial[j] = p[j];
}
#else
#define DEFORMABLE_VECTOR_SUMS 0
#endif

// Gradients of every slot of one (query, head), given its grad_output row `grad` (D,).
template <int kD, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void backward_head(const Inputs<scalar_t, opmath_t>& in, const scalar_t* value_nm,
                                     opmath_t* grad_value_nm, const opmath_t* __restrict__ grad, int64_t point0,
                                     const GradOutputs<opmath_t>& g) {
  const auto& s = in.s;
  const auto& t = *in.table;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t total = s.levels * s.points;
  CornerBlock<opmath_t> b;
  for (int64_t first = 0; first < total; first += kBlock) {
    const int64_t count = std::min(kBlock, total - first);
    compute_corners(in.locations + 2 * point0, t, first, count, b);
    alignas(64) int64_t where[4][kBlock];
    corner_offsets(t, b, first, count, in.row_stride(), in.outside_offset(), where);
    const opmath_t* weights = in.weights + point0 + first;
    alignas(64) opmath_t dots[4][kBlock];  // grad . value at each corner (0 outside the map)
#if DEFORMABLE_VECTOR_SUMS
    if constexpr (std::is_same_v<opmath_t, float> && kD > 0 && kD % 8 == 0) {
      // Lane sums per corner first, then the four corners of a slot reduced together.
      alignas(64) float partial[kBlock][4][8];
      for (int64_t i = 0; i < count; ++i) {
        for (int k = 0; k < 4; ++k) {
          if (where[k][i] < 0) {
            for (int j = 0; j < 8; ++j) partial[i][k][j] = 0.0f;
          } else {
            dot_partial_and_scatter<kD>(grad, value_nm + where[k][i], grad_value_nm + where[k][i],
                                        weights[i] * b.bilinear[k][i], partial[i][k]);
          }
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        Float8 lanes[4];
        __builtin_memcpy(lanes, partial[i], sizeof(lanes));
        const Float4 sums = sum4(lanes[0], lanes[1], lanes[2], lanes[3]);
        for (int k = 0; k < 4; ++k) dots[k][i] = sums[k];
      }
    } else
#endif
    {
      for (int64_t i = 0; i < count; ++i) {
        for (int k = 0; k < 4; ++k) {
          dots[k][i] = where[k][i] < 0
                           ? opmath_t(0)
                           : dot_and_scatter<kD>(grad, value_nm + where[k][i], grad_value_nm + where[k][i],
                                                 weights[i] * b.bilinear[k][i], D);
        }
      }
    }
    // The slots' scalar gradients, in passes that vectorise over slots.
    alignas(64) opmath_t grad_x[kBlock], grad_y[kBlock];
    opmath_t* __restrict__ grad_weights = g.weights + point0 + first;
    const opmath_t* widths = t.width.data() + first;
    const opmath_t* heights = t.height.data() + first;
    for (int64_t i = 0; i < count; ++i) {
      const PointGrads<opmath_t> p = bilinear_point_grads(
          b.bilinear[0][i], b.bilinear[1][i], b.bilinear[2][i], b.bilinear[3][i], b.lh[i], b.lw[i], dots[0][i],
          dots[1][i], dots[2][i], dots[3][i], weights[i], heights[i], widths[i]);
      grad_weights[i] = p.weight;
      grad_x[i] = p.x;
      grad_y[i] = p.y;
    }
    opmath_t* __restrict__ grad_locations = g.locations + 2 * (point0 + first);
    for (int64_t i = 0; i < count; ++i) {
      grad_locations[2 * i] = grad_x[i];
      grad_locations[2 * i + 1] = grad_y[i];
    }
  }
}

// Gradients for the (batch, head) pairs [begin, end) of the flattened (N * M). Each pair owns its slice
// of grad_value and visits queries in the call's order (fixed by the inputs), so the result does not depend on
// the thread count.
template <int kD, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void backward_heads(const Inputs<scalar_t, opmath_t>& in, const scalar_t* grad_out,
                                      const GradOutputs<opmath_t>& g, int64_t begin, int64_t end) {
  const auto& s = in.s;
  const int64_t D = s.channels;
  std::vector<opmath_t> grad(D);
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / s.heads, m = nm % s.heads;
    const int64_t head_offset = in.head_offset(n, m);
    const int64_t slots = s.levels * s.points;
    for (int64_t q = 0; q < s.queries; ++q) {
      const int64_t index = n * s.queries + q;
      const int64_t row = in.order != nullptr ? in.order[index] : index;
      const scalar_t* go = grad_out + (row * s.heads + m) * D;
      if (q + kAhead < s.queries) {
        // The rows of this head lie s.heads rows apart in every input and gradient: fetch a few queries ahead.
        const int64_t next = in.order != nullptr ? in.order[index + kAhead] : index + kAhead;
        const int64_t ahead = next * s.heads + m;
        prefetch_span(grad_out + ahead * D, D * sizeof(scalar_t));
        prefetch_item_inputs(in, ahead);
        prefetch_span(g.locations + ahead * slots * 2, slots * 2 * sizeof(opmath_t));
        prefetch_span(g.weights + ahead * slots, slots * sizeof(opmath_t));
      }
      for (int64_t d = 0; d < D; ++d) grad[d] = static_cast<opmath_t>(go[d]);
      backward_head<kD>(in, in.value + head_offset, g.value + head_offset, grad.data(),
                        (row * s.heads + m) * s.levels * s.points, g);
    }
  }
}

template <typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void backward_heads_any(const Inputs<scalar_t, opmath_t>& in, const scalar_t* grad_out,
                                          const GradOutputs<opmath_t>& g, int64_t begin, int64_t end) {
  switch (in.s.channels) {
    case 16: return backward_heads<16>(in, grad_out, g, begin, end);
    case 32: return backward_heads<32>(in, grad_out, g, begin, end);
    case 64: return backward_heads<64>(in, grad_out, g, begin, end);
    default: return backward_heads<0>(in, grad_out, g, begin, end);
  }
}

}  // namespace cpu
}  // namespace deformable

// What the CPU forward and backward loops share: the per-call level table, the block of bilinear corners of up to
// kBlock sampling points, the inputs and gradient outputs of a call, and prefetching.
//
// Layout: value (N, S, M, D) is walked as contiguous D-vectors, so every bilinear corner is one contiguous run of D
// channels and the inner loops vectorise over D. With many queries (encoder self-attention) both kernels work on a
// head-major copy (N, M, S + 1, D), one head's map at a time, and visit queries in spatial order (head_major.h);
// the extra row of each head is zeros, and corners outside the map read it instead of being skipped, so the
// gathers take no data-dependent branch.
//
// Everything here is C10_ALWAYS_INLINE: it is compiled into each instruction set's entry points (isa_dispatch.cpp).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../bilinear.h"
#include "../ms_deform_attn.h"

namespace deformable {
namespace cpu {

// Per call: height, width and level start of each (level, point) slot, so that the per-point loop needs
// neither a division nor a level lookup.
template <typename opmath_t>
struct LevelTable {
  std::vector<opmath_t> height, width;  // (L*P,)
  std::vector<int64_t> start, width_int;
};

template <typename opmath_t>
LevelTable<opmath_t> make_level_table(const int64_t* shapes, const int64_t* starts, int64_t levels, int64_t points) {
  LevelTable<opmath_t> t;
  for (int64_t l = 0; l < levels; ++l) {
    for (int64_t p = 0; p < points; ++p) {
      t.height.push_back(static_cast<opmath_t>(shapes[2 * l]));
      t.width.push_back(static_cast<opmath_t>(shapes[2 * l + 1]));
      t.start.push_back(starts[l]);
      t.width_int.push_back(shapes[2 * l + 1]);
    }
  }
  return t;
}

// Up to kBlock (level, point) slots of one (query, head), structure-of-arrays. Corner k of slot i is the
// spatial position start + offset[i] + {0, 1, W, W + 1}[k]; it lies in the map iff inside[k][i] != 0, and
// its bilinear weight is bilinear[k][i] (0 when outside). lh/lw are the fractional pixel coordinates.
constexpr int64_t kBlock = 32;

template <typename opmath_t>
struct CornerBlock {
  alignas(64) opmath_t bilinear[4][kBlock];
  alignas(64) opmath_t inside[4][kBlock];
  alignas(64) opmath_t lh[kBlock];
  alignas(64) opmath_t lw[kBlock];
  alignas(64) int32_t offset[kBlock];  // h_low * W + w_low within the level; H * W < 2^31 per level
};

// Fills the block for slots [first, first + count) from bilinear_point (../bilinear.h), which is branch-free, so
// that the compiler vectorises this loop over slots (compiled with -fno-trapping-math). A location outside the map,
// NaN or infinite has no corner inside (inside[k] = 0), and no corner of it is ever read.
template <typename opmath_t>
C10_ALWAYS_INLINE void compute_corners(const opmath_t* __restrict__ locations, const LevelTable<opmath_t>& t,
                                       int64_t first, int64_t count, CornerBlock<opmath_t>& b) {
  const opmath_t* __restrict__ heights = t.height.data() + first;
  const opmath_t* __restrict__ widths = t.width.data() + first;
  const opmath_t* __restrict__ loc = locations + 2 * first;
  for (int64_t i = 0; i < count; ++i) {
    const BilinearPoint<opmath_t> p = bilinear_point(loc[2 * i], loc[2 * i + 1], heights[i], widths[i]);
    for (int k = 0; k < 4; ++k) {
      b.inside[k][i] = p.inside[k];
      b.bilinear[k][i] = p.weight[k];
    }
    b.lh[i] = p.frac_h;
    b.lw[i] = p.frac_w;
    b.offset[i] = static_cast<int32_t>(p.h_low) * static_cast<int32_t>(widths[i]) + static_cast<int32_t>(p.w_low);
  }
}

template <typename scalar_t, typename opmath_t>
struct Inputs {
  const scalar_t* value;      // (N, S, M, D)
  const opmath_t* locations;  // (N, Lq, M, L, P, 2)
  const opmath_t* weights;    // (N, Lq, M, L, P)
  const LevelTable<opmath_t>* table;
  MSDASizes s;
  const int64_t* order = nullptr;  // the (N * Lq) query rows in visiting order (null: in order)
  bool head_major = false;         // value laid out (N, M, S + 1, D), row S of each head zeros (head_major_copy)

  // Element offset of head m of batch element n's first value row.
  int64_t head_offset(int64_t n, int64_t m) const {
    return head_major ? (n * s.heads + m) * (s.spatial + 1) * s.channels : (n * s.spatial * s.heads + m) * s.channels;
  }
  // Elements between the value rows of consecutive spatial positions of one head.
  int64_t row_stride() const { return head_major ? s.channels : s.heads * s.channels; }
  // What a corner outside the map gets as its offset: the head's row of zeros, or -1 (skipped) without one.
  int64_t outside_offset() const { return head_major ? s.spatial * s.channels : -1; }
};

// Starts loading [p, p + bytes) into the cache.
C10_ALWAYS_INLINE void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) DEFORMABLE_PREFETCH(c + b);
}

// How many work items ahead the head-major loops fetch their per-item rows (one item takes a few hundred ns,
// about a memory latency).
constexpr int64_t kAhead = 4;

// Starts loading the sampling locations and attention weights of (query row, head) `item` = row * M + m.
template <typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void prefetch_item_inputs(const Inputs<scalar_t, opmath_t>& in, int64_t item) {
  const int64_t slots = in.s.levels * in.s.points;
  prefetch_span(in.locations + item * slots * 2, slots * 2 * sizeof(opmath_t));
  prefetch_span(in.weights + item * slots, slots * sizeof(opmath_t));
}

template <typename opmath_t>
struct GradOutputs {
  opmath_t* value;      // laid out like Inputs::value (see Inputs::head_major), accumulated in opmath_t; a
                        // head-major call's zero rows collect the outside corners' (zero) scatter, discarded
  opmath_t* locations;  // (N, Lq, M, L, P, 2)
  opmath_t* weights;    // (N, Lq, M, L, P)
};

// where[k][i]: the element offset of corner k of block slot i from the head's value pointer, for value rows
// `stride` elements apart; `outside` for a corner outside the map (see Inputs::outside_offset).
template <typename opmath_t>
C10_ALWAYS_INLINE void corner_offsets(const LevelTable<opmath_t>& t, const CornerBlock<opmath_t>& b, int64_t first,
                                      int64_t count, int64_t stride, int64_t outside, int64_t (&where)[4][kBlock]) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t top = (t.start[first + i] + b.offset[i]) * stride;
    const int64_t bottom = top + t.width_int[first + i] * stride;
    where[0][i] = top;
    where[1][i] = top + stride;
    where[2][i] = bottom;
    where[3][i] = bottom + stride;
  }
  for (int k = 0; k < 4; ++k) {
    for (int64_t i = 0; i < count; ++i) where[k][i] = b.inside[k][i] != opmath_t(0) ? where[k][i] : outside;
  }
}

}  // namespace cpu
}  // namespace deformable

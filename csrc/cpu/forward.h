// The CPU forward: out[row, m*D:(m+1)*D] = sum over levels and points of weight * bilinear(value). Parallel over
// (query, head) items (head-major calls) or query rows (otherwise); every output row is computed on its own, so the
// result does not depend on the thread count or the visiting order.
//
// Templates only: isa_dispatch.cpp compiles them once per instruction set.
#pragma once

#include "kernel_common.h"

namespace deformable {
namespace cpu {

// acc[0:D] += w * v[0:D]; with kD > 0 the length is a compile-time constant, so acc stays in registers.
template <int kD, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void axpy(opmath_t* __restrict__ acc, const scalar_t* __restrict__ v, opmath_t w, int64_t d) {
  const int64_t n = kD > 0 ? kD : d;
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<opmath_t>(v[i]);
}
// One (query, head): out[0:D] = sum over levels and points of weight * bilinear(value). kSlots > 0 is the
// number of (level, point) slots known at compile time (the loops over slots then unroll), 0 any number.
template <int kD, int kSlots, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void forward_head(const Inputs<scalar_t, opmath_t>& in, const scalar_t* value_nm, int64_t point0,
                                    opmath_t* acc, scalar_t* out) {
  const auto& s = in.s;
  const auto& t = *in.table;
  const int64_t D = kD > 0 ? kD : s.channels;
  for (int64_t i = 0; i < D; ++i) acc[i] = opmath_t(0);
  const int64_t total = kSlots > 0 ? kSlots : s.levels * s.points;
  CornerBlock<opmath_t> b;
  for (int64_t first = 0; first < total; first += kBlock) {
    const int64_t count = std::min(kBlock, total - first);
    compute_corners(in.locations + 2 * point0, t, first, count, b);
    // Each corner's element offset from value_nm and its weight (attention x bilinear), in one pass over the
    // slots, so that the gather below is a test, a broadcast and D / 8 multiply-adds per corner.
    alignas(64) int64_t where[4][kBlock];
    alignas(64) opmath_t scale[4][kBlock];
    corner_offsets(t, b, first, count, in.row_stride(), in.outside_offset(), where);
    const opmath_t* weights = in.weights + point0 + first;
    for (int64_t i = 0; i < count; ++i) {
      for (int k = 0; k < 4; ++k) scale[k][i] = weights[i] * b.bilinear[k][i];
    }
    if (!in.head_major) {
      // Start every corner's gather before the first multiply-add needs it (head-major: L2 hits, no gain).
      for (int64_t i = 0; i < count; ++i) {
        DEFORMABLE_PREFETCH(value_nm + where[0][i]);
        DEFORMABLE_PREFETCH(value_nm + where[2][i]);
      }
    }
    // Head-major: every corner passes the test (outside ones read the zero row with scale 0), so the branch is
    // always predicted; an outside corner costs a multiply-add, a mispredicted branch cost more. The test stays:
    // without it GCC 12 vectorises this loop across corners and leaves the multiply-adds scalar.
    for (int64_t i = 0; i < count; ++i) {
      for (int k = 0; k < 4; ++k) {
        if (where[k][i] >= 0) axpy<kD>(acc, value_nm + where[k][i], scale[k][i], D);
      }
    }
  }
  for (int64_t i = 0; i < D; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

// The accumulator of one (query, head): a fixed-size array when the channel count is a compile-time constant
// (so that it stays in registers), else heap memory.
template <int kD, typename opmath_t>
struct Accumulator {
  explicit Accumulator(int64_t channels) : dynamic(kD > 0 ? 0 : channels) {}
  opmath_t* data() { return kD > 0 ? fixed : dynamic.data(); }
  opmath_t fixed[kD > 0 ? kD : 1];
  std::vector<opmath_t> dynamic;
};

// Output rows [begin, end) of the flattened (N * Lq) queries.
template <int kD, int kSlots, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void forward_rows(const Inputs<scalar_t, opmath_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  const auto& s = in.s;
  Accumulator<kD, opmath_t> accumulator(s.channels);
  opmath_t* acc = accumulator.data();
  for (int64_t index = begin; index < end; ++index) {
    const int64_t row = in.order != nullptr ? in.order[index] : index;
    const int64_t n = row / s.queries;
    for (int64_t m = 0; m < s.heads; ++m) {
      forward_head<kD, kSlots>(in, in.value + in.head_offset(n, m), (row * s.heads + m) * s.levels * s.points, acc,
                               out + (row * s.heads + m) * s.channels);
    }
  }
}

// Head-major forward (encoder self-attention): work items [begin, end) of the flattened (N * M, Lq), the
// queries of each (batch, head) in visiting order; value is (N, M, S + 1, D), so one head's map (a few MB at most
// for detection sizes) is what the gathers of consecutive items touch, and it stays in L2. The per-item inputs
// are then rows s.heads apart, which the hardware does not fetch ahead: `prefetch_span` does.
template <int kD, int kSlots, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void forward_items(const Inputs<scalar_t, opmath_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  const auto& s = in.s;
  Accumulator<kD, opmath_t> accumulator(s.channels);
  opmath_t* acc = accumulator.data();
  const int64_t slots = s.levels * s.points;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t nm = item / s.queries, k = item % s.queries;
    const int64_t n = nm / s.heads, m = nm % s.heads;
    const int64_t index = n * s.queries + k;
    const int64_t row = in.order != nullptr ? in.order[index] : index;
    if (k + kAhead < s.queries) {  // the inputs and output row of the item kAhead later
      const int64_t next = in.order != nullptr ? in.order[index + kAhead] : index + kAhead;
      const int64_t ahead = next * s.heads + m;
      prefetch_item_inputs(in, ahead);
      prefetch_span(out + ahead * s.channels, s.channels * sizeof(scalar_t));
    }
    forward_head<kD, kSlots>(in, in.value + in.head_offset(n, m), (row * s.heads + m) * slots, acc,
                             out + (row * s.heads + m) * s.channels);
  }
}

// The forward of work items [begin, end): (query, head) items in head-major calls, query rows otherwise.
template <int kD, int kSlots, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void forward_work(const Inputs<scalar_t, opmath_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  if (in.head_major) {
    forward_items<kD, kSlots>(in, out, begin, end);
  } else {
    forward_rows<kD, kSlots>(in, out, begin, end);
  }
}

// Common head sizes get a compile-time channel count, and with it Deformable-DETR's 16 (level, point) slots
// (4 levels x 4 points) a compile-time slot count; any other size takes the generic loop.
template <int kD, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void forward_slots(const Inputs<scalar_t, opmath_t>& in, scalar_t* out, int64_t begin,
                                     int64_t end) {
  if (in.s.levels * in.s.points == 16) return forward_work<kD, 16>(in, out, begin, end);
  forward_work<kD, 0>(in, out, begin, end);
}

template <typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void forward_any(const Inputs<scalar_t, opmath_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  switch (in.s.channels) {
    case 16: return forward_slots<16>(in, out, begin, end);
    case 32: return forward_slots<32>(in, out, begin, end);
    case 64: return forward_slots<64>(in, out, begin, end);
    default: return forward_work<0, 0>(in, out, begin, end);
  }
}

}  // namespace cpu
}  // namespace deformable

// CPU kernels of multi-scale deformable attention.
//
// Layout: value (N, S, M, D) is walked as contiguous D-vectors, so every bilinear corner is one
// contiguous run of D channels and the inner loops vectorise over D. With many queries (encoder
// self-attention) both kernels work on a head-major copy (N, M, S + 1, D), one head's map at a time, and visit
// queries in spatial order (see many_queries); the extra row of each head is zeros, and corners outside the map
// read it instead of being skipped, so the gathers take no data-dependent branch. The forward is parallel over (query, head) items. The
// backward is parallel over (batch, head) pairs: each pair owns its slice of grad_value, so the scatter
// needs no atomics and its summation order is fixed, which makes it deterministic.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"

// The hot loops are compiled three times, for AVX-512, for AVX2+FMA and for the baseline ISA, and picked at run
// time (see cpu_isa): a build made here must still run on CPUs without AVX2.
#if defined(__GNUC__) && defined(__x86_64__)
#define DEFORMABLE_X86_DISPATCH 1
#define DEFORMABLE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DEFORMABLE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#else
#define DEFORMABLE_X86_DISPATCH 0
#define DEFORMABLE_TARGET_AVX2
#define DEFORMABLE_TARGET_AVX512
#endif

namespace deformable {
namespace {

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

// Fills the block for slots [first, first + count). Branch-free so that the compiler vectorises it over
// slots (compiled with -fno-trapping-math). A location outside the map, NaN or infinite fails `in_map` and is moved to -2 before any
// conversion, so no corner of it is ever read.
template <typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void compute_corners(const opmath_t* __restrict__ locations, const LevelTable<opmath_t>& t,
                                       int64_t first, int64_t count, CornerBlock<opmath_t>& b) {
  const opmath_t* __restrict__ heights = t.height.data() + first;
  const opmath_t* __restrict__ widths = t.width.data() + first;
  const opmath_t* __restrict__ loc = locations + 2 * first;
  for (int64_t i = 0; i < count; ++i) {
    const opmath_t height = heights[i], width = widths[i];
    opmath_t h_im = loc[2 * i + 1] * height - opmath_t(0.5);
    opmath_t w_im = loc[2 * i] * width - opmath_t(0.5);
    // Masks as 0/1 values and selects (no && or ||) keep the loop branch-free, hence vectorisable.
    opmath_t in_map = h_im > opmath_t(-1) ? opmath_t(1) : opmath_t(0);
    in_map = w_im > opmath_t(-1) ? in_map : opmath_t(0);
    in_map = h_im < height ? in_map : opmath_t(0);
    in_map = w_im < width ? in_map : opmath_t(0);
    h_im = in_map != opmath_t(0) ? h_im : opmath_t(-2);
    w_im = in_map != opmath_t(0) ? w_im : opmath_t(-2);
    const opmath_t h_low = std::floor(h_im);  // floor, not truncation: h_im in (-1, 0) maps to -1
    const opmath_t w_low = std::floor(w_im);
    const opmath_t lh = h_im - h_low, lw = w_im - w_low;
    // in_map also guards bottom/right: the -2 stand-in would otherwise pass their tests.
    const opmath_t top = h_low >= opmath_t(0) ? in_map : opmath_t(0);
    const opmath_t bottom = h_low + opmath_t(1) < height ? in_map : opmath_t(0);
    const opmath_t left = w_low >= opmath_t(0) ? opmath_t(1) : opmath_t(0);
    const opmath_t right = w_low + opmath_t(1) < width ? opmath_t(1) : opmath_t(0);
    b.inside[0][i] = top * left;
    b.inside[1][i] = top * right;
    b.inside[2][i] = bottom * left;
    b.inside[3][i] = bottom * right;
    b.bilinear[0][i] = b.inside[0][i] * (opmath_t(1) - lh) * (opmath_t(1) - lw);
    b.bilinear[1][i] = b.inside[1][i] * (opmath_t(1) - lh) * lw;
    b.bilinear[2][i] = b.inside[2][i] * lh * (opmath_t(1) - lw);
    b.bilinear[3][i] = b.inside[3][i] * lh * lw;
    b.lh[i] = lh;
    b.lw[i] = lw;
    b.offset[i] = static_cast<int32_t>(h_low) * static_cast<int32_t>(width) + static_cast<int32_t>(w_low);
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
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
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

// acc[0:D] += w * v[0:D]; with kD > 0 the length is a compile-time constant, so acc stays in registers.
template <int kD, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void axpy(opmath_t* __restrict__ acc, const scalar_t* __restrict__ v, opmath_t w, int64_t d) {
  const int64_t n = kD > 0 ? kD : d;
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<opmath_t>(v[i]);
}

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
    compute_corners<scalar_t>(in.locations + 2 * point0, t, first, count, b);
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
        __builtin_prefetch(value_nm + where[0][i]);
        __builtin_prefetch(value_nm + where[2][i]);
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

template <typename opmath_t>
struct GradOutputs {
  opmath_t* value;      // laid out like Inputs::value (see Inputs::head_major), accumulated in opmath_t; a
                        // head-major call's zero rows collect the outside corners' (zero) scatter, discarded
  opmath_t* locations;  // (N, Lq, M, L, P, 2)
  opmath_t* weights;    // (N, Lq, M, L, P)
};

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
C10_ALWAYS_INLINE Float4 sum4(Float8 a, Float8 b, Float8 c, Float8 d) {
  const Int8 lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const Float8 ab = __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
  const Float8 cd = __builtin_shuffle(c, d, lo) + __builtin_shuffle(c, d, hi);
  const Int8 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const Float8 r = __builtin_shuffle(ab, cd, lo2) + __builtin_shuffle(ab, cd, hi2);
  return __builtin_shufflevector(r, r, 0, 1, 2, 3) + __builtin_shufflevector(r, r, 4, 5, 6, 7);
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
    compute_corners<scalar_t>(in.locations + 2 * point0, t, first, count, b);
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
      const opmath_t lh = b.lh[i], lw = b.lw[i], a = weights[i];
      grad_weights[i] = b.bilinear[0][i] * dots[0][i] + b.bilinear[1][i] * dots[1][i] +
                        b.bilinear[2][i] * dots[2][i] + b.bilinear[3][i] * dots[3][i];
      // d(bilinear)/d(w_im) and /d(h_im); w_im = x * W - 0.5, so d/dx carries a factor W (and d/dy H).
      const opmath_t grad_w_im = (opmath_t(1) - lh) * (dots[1][i] - dots[0][i]) + lh * (dots[3][i] - dots[2][i]);
      const opmath_t grad_h_im = (opmath_t(1) - lw) * (dots[2][i] - dots[0][i]) + lw * (dots[3][i] - dots[1][i]);
      grad_x[i] = a * grad_w_im * widths[i];
      grad_y[i] = a * grad_h_im * heights[i];
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

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

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

// The build of the loops a call runs: the widest this CPU supports, capped by the environment variable
// DEFORMABLE_CPU_ISA (base, avx2 or avx512) when it is set, to compare the builds or to step around one.
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

// Non-template entry points, one per instruction set, so that the inlined loops are compiled for it.
#define DEFORMABLE_DEFINE_ISA_ENTRY_POINTS(target, isa, scalar_t, opmath_t, suffix)                               \
  target void forward_##isa##_##suffix(const Inputs<scalar_t, opmath_t>& in, scalar_t* out, int64_t begin,        \
                                       int64_t end) {                                                              \
    forward_any(in, out, begin, end);                                                                              \
  }                                                                                                                \
  target void backward_##isa##_##suffix(const Inputs<scalar_t, opmath_t>& in, const scalar_t* grad_out,           \
                                        const GradOutputs<opmath_t>& g, int64_t begin, int64_t end) {             \
    backward_heads_any(in, grad_out, g, begin, end);                                                               \
  }

#define DEFORMABLE_DEFINE_ENTRY_POINTS(scalar_t, opmath_t, suffix)                                                 \
  DEFORMABLE_DEFINE_ISA_ENTRY_POINTS(DEFORMABLE_TARGET_AVX512, avx512, scalar_t, opmath_t, suffix)                 \
  DEFORMABLE_DEFINE_ISA_ENTRY_POINTS(DEFORMABLE_TARGET_AVX2, avx2, scalar_t, opmath_t, suffix)                     \
  DEFORMABLE_DEFINE_ISA_ENTRY_POINTS(, base, scalar_t, opmath_t, suffix)                                           \
  void dispatch_forward(Isa isa, const Inputs<scalar_t, opmath_t>& in, scalar_t* out, int64_t b, int64_t e) {      \
    switch (isa) {                                                                                                 \
      case Isa::kAvx512: return forward_avx512_##suffix(in, out, b, e);                                            \
      case Isa::kAvx2: return forward_avx2_##suffix(in, out, b, e);                                                \
      default: return forward_base_##suffix(in, out, b, e);                                                        \
    }                                                                                                              \
  }                                                                                                                \
  void dispatch_backward(Isa isa, const Inputs<scalar_t, opmath_t>& in, const scalar_t* go,                        \
                         const GradOutputs<opmath_t>& g, int64_t b, int64_t e) {                                   \
    switch (isa) {                                                                                                 \
      case Isa::kAvx512: return backward_avx512_##suffix(in, go, g, b, e);                                         \
      case Isa::kAvx2: return backward_avx2_##suffix(in, go, g, b, e);                                             \
      default: return backward_base_##suffix(in, go, g, b, e);                                                     \
    }                                                                                                              \
  }

DEFORMABLE_DEFINE_ENTRY_POINTS(float, float, f32)
DEFORMABLE_DEFINE_ENTRY_POINTS(double, double, f64)
DEFORMABLE_DEFINE_ENTRY_POINTS(c10::BFloat16, float, bf16)
DEFORMABLE_DEFINE_ENTRY_POINTS(c10::Half, float, f16)
#undef DEFORMABLE_DEFINE_ENTRY_POINTS
#undef DEFORMABLE_DEFINE_ISA_ENTRY_POINTS

// Many queries per map position (encoder self-attention) rather than few (decoder): the kernels then work one
// head's map at a time, in a head-major copy, and visit queries in spatial_order.
bool many_queries(const MSDASizes& s) { return s.queries * s.levels * s.points >= s.spatial; }

// The visiting order of the (N * Lq) query rows when queries are many: column strips kStrip pixels wide of the
// first level, top to bottom within a strip, by where each query's first sampling point (head 0, level 0,
// point 0) lies. Consecutive queries then gather from a band of value rows about kStrip positions wide on every
// level instead of bands spanning whole map rows (the kernels wait on these gathers far more than they
// compute). Outputs do not depend on the order in the forward (each row is computed on its own, bit-identical
// to visiting rows in order); in the backward it fixes the order of the grad_value sums, whatever the threads.
template <typename opmath_t>
std::vector<int64_t> spatial_order(const opmath_t* locations, const MSDASizes& s, const int64_t* spatial_shapes) {
  constexpr int64_t kStrip = 64;
  const int64_t height = std::max<int64_t>(spatial_shapes[0], 1);  // an empty first level: any order is as good
  const int64_t width = std::max<int64_t>(spatial_shapes[1], 1);
  const int64_t rows = s.batch * s.queries;
  const int64_t stride = s.heads * s.levels * s.points * 2;
  const int64_t strips = std::max<int64_t>(1, (width + kStrip - 1) / kStrip);
  const int64_t keys = s.batch * strips * height;
  std::vector<int64_t> key(rows), order(rows);
  for (int64_t row = 0; row < rows; ++row) {
    opmath_t x = locations[row * stride], y = locations[row * stride + 1];
    x = std::isfinite(x) ? std::min(std::max(x, opmath_t(0)), opmath_t(1)) : opmath_t(0);
    y = std::isfinite(y) ? std::min(std::max(y, opmath_t(0)), opmath_t(1)) : opmath_t(0);
    const int64_t column = std::min<int64_t>(width - 1, static_cast<int64_t>(x * width));
    const int64_t line = std::min<int64_t>(height - 1, static_cast<int64_t>(y * height));
    key[row] = ((row / s.queries) * strips + column / kStrip) * height + line;
  }
  if (keys > 4 * rows + 1024) {  // sparse keys (a tall first level): a comparison sort
    for (int64_t row = 0; row < rows; ++row) order[row] = row;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
    return order;
  }
  // A counting sort: the same stable order as sorting by key, in linear time (this runs before the parallel
  // part of each call).
  std::vector<int64_t> next(keys + 1, 0);
  for (int64_t row = 0; row < rows; ++row) ++next[key[row] + 1];
  for (int64_t k = 0; k < keys; ++k) next[k + 1] += next[k];
  for (int64_t row = 0; row < rows; ++row) order[next[key[row]]++] = row;
  return order;
}

// Scratch memory that a calling thread keeps between calls, one buffer per use. The head-major copies are
// tens of MB; fresh allocations that size are new pages from the OS on every call (glibc maps blocks over
// 32 MB directly), and their page faults cost more than the copy itself on a VM. Kept until the thread
// exits; each buffer grows to the largest call's size.
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(data_); }

  void* get(size_t bytes) {
    constexpr size_t kAlign = 64;
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    if (bytes > capacity_) {
      std::free(data_);
      capacity_ = 0;
      data_ = std::aligned_alloc(kAlign, bytes);
      TORCH_CHECK(data_ != nullptr, "ms_deform_attn: could not allocate ", bytes, " bytes of CPU scratch memory");
      capacity_ = bytes;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

enum class Scratch { kValue = 0, kGradValue = 1 };

// An uninitialised tensor over this thread's scratch buffer `which`: valid until the thread's next call that
// uses the same buffer, so it must not leave the op.
at::Tensor scratch_tensor(Scratch which, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local ScratchBuffer buffers[2];
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  return at::from_blob(buffers[static_cast<int>(which)].get(bytes), sizes, options);
}

// dst[n] = src[n] with dims 1 and 2 swapped, for each n: (N, A, B, D) -> (N, B, A, D). Both must have D
// contiguous. Same dtype: one memcpy per D-row, in parallel over src's (n, a), reading src in order (a little
// faster than ATen's strided copy here). Otherwise (a dtype conversion) ATen's copy, one batch element at a time:
// on the 4-d tensor the strided copy picks a slower loop order.
void copy_swapping_dims_1_2(const at::Tensor& dst, const at::Tensor& src) {
  const int64_t A = src.size(1), B = src.size(2), D = src.size(3);
  if (dst.scalar_type() != src.scalar_type() || src.stride(3) != 1 || dst.stride(3) != 1) {
    for (int64_t n = 0; n < src.size(0); ++n) dst[n].copy_(src[n].transpose(0, 1));
    return;
  }
  const int64_t item = src.element_size();
  char* to = static_cast<char*>(dst.data_ptr());
  const char* from = static_cast<const char*>(src.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, B * D * item));
  at::parallel_for(0, src.size(0) * A, grain, [&](int64_t begin, int64_t end) {
    for (int64_t na = begin; na < end; ++na) {
      const int64_t n = na / A, a = na % A;
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(to + (n * dst.stride(0) + b * dst.stride(1) + a * dst.stride(2)) * item,
                    from + (n * src.stride(0) + a * src.stride(1) + b * src.stride(2)) * item, D * item);
      }
    }
  });
}

// A head-major scratch tensor (N, M, S + 1, D) for value of shape (N, S, M, D), of dtype `options`, uninitialised.
at::Tensor head_major_scratch(Scratch which, const at::Tensor& value, const at::TensorOptions& options) {
  return scratch_tensor(which, {value.size(0), value.size(2), value.size(1) + 1, value.size(3)}, options);
}

// The first S rows of each head of a head-major tensor (N, M, S + 1, D): (N, M, S, D).
at::Tensor without_zero_rows(const at::Tensor& head_major) {
  return head_major.narrow(2, 0, head_major.size(2) - 1);
}

// value (N, S, M, D) as a head-major (N, M, S + 1, D) tensor in this thread's scratch memory, row S of every
// head zeros (see Inputs::head_major).
at::Tensor head_major_copy(const at::Tensor& value) {
  auto copy = head_major_scratch(Scratch::kValue, value, value.options());
  copy_swapping_dims_1_2(without_zero_rows(copy), value);
  copy.select(2, value.size(1)).zero_();
  return copy;
}

struct Contiguous {
  at::Tensor value, shapes, starts, locations, weights;
};

Contiguous contiguous_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  return {value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
          sampling_locations.contiguous(), attention_weights.contiguous()};
}

template <typename scalar_t>
Inputs<scalar_t, at::opmath_type<scalar_t>> make_inputs(const Contiguous& c, const MSDASizes& s,
                                                        const LevelTable<at::opmath_type<scalar_t>>& table) {
  using opmath_t = at::opmath_type<scalar_t>;
  return {c.value.data_ptr<scalar_t>(), c.locations.data_ptr<opmath_t>(), c.weights.data_ptr<opmath_t>(), &table, s};
}

// Marks `in` (whose value is a head_major_copy) head-major, visiting queries in spatial order, kept in `order`
// (which must outlive the kernel's use of `in`).
template <typename scalar_t, typename opmath_t>
void visit_head_major(Inputs<scalar_t, opmath_t>& in, const Contiguous& c, std::vector<int64_t>& order) {
  order = spatial_order(in.locations, in.s, c.shapes.data_ptr<int64_t>());
  in.order = order.data();
  in.head_major = true;
}

template <typename opmath_t>
LevelTable<opmath_t> level_table(const Contiguous& c, const MSDASizes& s) {
  return make_level_table<opmath_t>(c.shapes.data_ptr<int64_t>(), c.starts.data_ptr<int64_t>(), s.levels, s.points);
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const MSDASizes s =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: the CPU kernel got value on ", value.device());
  if (s.batch * s.queries * s.heads * s.channels == 0 || s.spatial == 0) {
    return at::zeros({s.batch, s.queries, s.heads * s.channels}, value.options());
  }
  auto output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());  // every row is written
  // Many queries (encoder self-attention): a head-major copy of value, one head's map at a time, queries in
  // spatial order. Few queries (decoder): the input layout, query by query over all heads.
  const bool head_major = many_queries(s);
  const auto c = contiguous_inputs(head_major ? head_major_copy(value) : value, spatial_shapes, level_start_index,
                                   sampling_locations, attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    const auto table = level_table<at::opmath_type<scalar_t>>(c, s);
    auto in = make_inputs<scalar_t>(c, s, table);
    std::vector<int64_t> order;
    if (head_major) visit_head_major(in, c, order);
    scalar_t* out = output.data_ptr<scalar_t>();
    // ~L*P*4*D multiply-adds per (query, head): a few hundred of them amortise a task.
    const int64_t per_item = s.levels * s.points * s.channels * (head_major ? 1 : s.heads);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_item));
    const int64_t items = s.batch * s.queries * (head_major ? s.heads : 1);
    const Isa isa = cpu_isa();
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { dispatch_forward(isa, in, out, begin, end); });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MSDASizes s =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, s);
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_backward: the CPU kernel got value on ", value.device());
  const auto opmath = sampling_locations.scalar_type();
  // With many queries per position (encoder self-attention) each (batch, head) task touches most of its
  // slice: head-major (N, M, S + 1, D) copies make that slice one contiguous block, which pays for the two
  // transposes, and queries go in spatial order. With few queries (decoder) the copies would dominate, so the
  // input layout and query order are kept.
  const bool head_major = many_queries(s);
  auto grad_value = head_major ? head_major_scratch(Scratch::kGradValue, value, value.options().dtype(opmath)).zero_()
                                : at::zeros(value.sizes(), value.options().dtype(opmath));
  // The kernel writes every element of these two when it runs.
  const bool run = grad_output.numel() > 0 && s.spatial > 0;
  auto grad_locations = run ? at::empty(sampling_locations.sizes(), sampling_locations.options())
                            : at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = run ? at::empty(attention_weights.sizes(), attention_weights.options())
                          : at::zeros(attention_weights.sizes(), attention_weights.options());
  if (run) {
    const auto c = contiguous_inputs(head_major ? head_major_copy(value) : value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights);
    const auto go = grad_output.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto table = level_table<opmath_t>(c, s);
      auto in = make_inputs<scalar_t>(c, s, table);
      std::vector<int64_t> order;
      if (head_major) visit_head_major(in, c, order);
      const GradOutputs<opmath_t> g{grad_value.data_ptr<opmath_t>(), grad_locations.data_ptr<opmath_t>(),
                                    grad_weights.data_ptr<opmath_t>()};
      const scalar_t* grad_out = go.data_ptr<scalar_t>();
      const Isa isa = cpu_isa();
      at::parallel_for(0, s.batch * s.heads, 1,
                       [&](int64_t begin, int64_t end) { dispatch_backward(isa, in, grad_out, g, begin, end); });
    });
  }
  // Gradients are fresh contiguous tensors, as the fake kernel promises.
  if (!head_major && grad_value.scalar_type() == value.scalar_type()) return {grad_value, grad_locations, grad_weights};
  auto grad_value_out = at::empty(value.sizes(), value.options().memory_format(at::MemoryFormat::Contiguous));
  if (head_major) {
    copy_swapping_dims_1_2(grad_value_out, without_zero_rows(grad_value));
  } else {
    grad_value_out.copy_(grad_value);
  }
  return {grad_value_out, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(deformable, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace deformable

// deformable::cope_locate: the sampling locations of MSDeformAttn(offset_mode="cope"), every level and axis in one
// pass. The math of one point, shared by the CPU and CUDA kernels.
//
// A line of W pixels has cumulative counts E[0..W] at its pixel edges (E[0] = 0, non-decreasing; pixel k covers the
// edge coordinate [k, k + 1] with slope d_k = E[k + 1] - E[k]); outside [0, W] the count moves one per pixel. For a
// query q of image n, head m, level l and axis a (0: x along the query's row, 1: y along its column), with the
// line's length S (W_l for x, H_l for y), counting channel r on the line through the reference point, reference edge
// coordinate e = ref[n, q, l, a] * S and point p:
//   c0 = C_r(e)                               the count at the reference
//   x_r = C_r^-1(c0 + u[n, q, m, l, p, a] * s)  the edge coordinate where the count reaches it (exact; a flat run is
//                                             jumped to its end, since the search picks the last k with E[k] <= t)
//   out[n, q, m, l, p, a] = sum_r mix[n, q, m, a, r] * x_r / S
// where s = 1 for 2-d references and s = ref[n, q, l, 2 + a] * S / (2 P) for boxes. The pixel is found by a
// branch-free binary search along the line: O(log S) reads per point.
//
// Layout of the lines: edges[2 l + a] is (N * lines * M * R, S + 1), lines = H_l for x and W_l for y, the line of
// (n, i, m, r) at row ((n * lines + i) * M + m) * R + r. The line a query reads is i = floor(ref[.., 1 - a] * lines),
// clamped to the map (NaN reads line 0).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bilinear.h"  // DEFORMABLE_HOST_DEVICE

namespace deformable {

constexpr int kCopeMaxLevels = 16;  // edges holds 2 * L tensors, passed to the kernels by value

template <typename T>
struct CopeLines {  // the 2 * L line tensors of one call (their gradients, in the backward)
  T* data[2 * kCopeMaxLevels];
};

struct CopeLocateSizes {
  int64_t batch;        // N
  int64_t queries;      // Lq
  int64_t heads;        // M
  int64_t levels;       // L
  int64_t points;       // P
  int64_t channels;     // R
  int64_t ref_dim;      // 2 (points) or 4 (boxes)
  int64_t length[2 * kCopeMaxLevels];  // S of edges[2 l + a]: W_l (a = 0), H_l (a = 1)
};

// Checks ranks, shapes, dtypes and devices; every failure names the argument.
CopeLocateSizes check_cope_locate_inputs(const std::vector<at::Tensor>& edges, const at::Tensor& ref,
                                         const at::Tensor& offsets, const at::Tensor& mix);

// Also checks grad_output (N, Lq, M, L, P, 2), same dtype and device as the rest.
void check_cope_locate_grad(const at::Tensor& grad_output, const at::Tensor& offsets);

// The line tensors, contiguous (the kernels index them as dense rows).
inline std::vector<at::Tensor> contiguous_lines(at::TensorList edges) {
  std::vector<at::Tensor> out;
  out.reserve(edges.size());
  for (const auto& t : edges) out.push_back(t.contiguous());
  return out;
}

// The backward's outputs, allocated: the lines' and references' gradients zeroed (the kernels add into them), the
// offsets' and mix's uninitialised (every entry is written), all zero when there are no points.
using CopeGrads = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>;

inline CopeGrads allocate_cope_grads(const std::vector<at::Tensor>& lines, const at::Tensor& ref,
                                     const at::Tensor& offsets, const at::Tensor& mix) {
  std::vector<at::Tensor> grad_edges;
  for (const auto& t : lines) grad_edges.push_back(at::zeros(t.sizes(), t.options()));
  auto grad_mix = offsets.numel() == 0 ? at::zeros(mix.sizes(), mix.options()) : at::empty(mix.sizes(), mix.options());
  return {grad_edges, at::zeros(ref.sizes(), ref.options()), at::empty(offsets.sizes(), offsets.options()), grad_mix};
}

// Their data pointers, for the kernels (T const for the inputs).
template <typename T>
CopeLines<T> line_pointers(std::vector<at::Tensor>& lines) {
  CopeLines<T> out{};
  for (size_t i = 0; i < lines.size(); ++i) out.data[i] = lines[i].data_ptr<std::remove_const_t<T>>();
  return out;
}

constexpr double kDensityFloor = 1e-12;  // a segment the search picks has E[k + 1] > E[k]; this only bounds 1 / d
// Added before flooring a reference's line index: a reference on the edge between two lines (every encoder point of
// a coarser level lies on one of a finer level) then reads the same line whichever way rounding left it, e.g. 7 and
// 6.9999995 with and without padding in the batch. Python: deformable.cope_locate.LINE_SNAP.
constexpr double kLineSnap = 1e-3;

// Where an edge coordinate lies on a line: region -1 below 0, +1 beyond W (slope 1 there), 0 inside pixel k.
template <typename T>
struct LinePoint {
  int region;
  int64_t k;
  T frac;  // inside: position within pixel k (coordinate) or within its count range (count), in [0, 1)
};

// The pixel holding edge coordinate x (inside: k = floor(x) clamped to [0, W - 1]).
template <typename T>
DEFORMABLE_HOST_DEVICE LinePoint<T> locate_coordinate(T x, int64_t width) {
  if (!(x >= T(0))) return {-1, 0, T(0)};  // also NaN
  if (x > T(width)) return {1, width - 1, T(0)};
  const int64_t k = x >= T(width - 1) ? width - 1 : static_cast<int64_t>(::floor(x));
  return {0, k, x - T(k)};
}

// The count at a located coordinate x.
template <typename T>
DEFORMABLE_HOST_DEVICE T count_at(const T* edges, int64_t width, T x, const LinePoint<T>& at) {
  if (at.region < 0) return x;
  if (at.region > 0) return edges[width] + (x - T(width));
  return edges[at.k] + at.frac * (edges[at.k + 1] - edges[at.k]);
}

// The last k in [0, W - 1] with E[k] <= t, for 0 <= t < E[W] (so E[0] = 0 <= t): a binary search without
// data-dependent branches (the compiler turns the select into a conditional move), ceil(log2 W) steps over a line
// that sits in L1 cache. Measured faster than galloping from the reference, whose short searches mispredict, and
// than searching a head's points in lockstep (the out-of-order core already overlaps consecutive searches).
template <typename T>
DEFORMABLE_HOST_DEVICE int64_t find_segment(const T* edges, int64_t width, T t) {
  int64_t lo = 0, len = width;
  while (len > 1) {
    const int64_t half = len / 2;
    lo = edges[lo + half] <= t ? lo + half : lo;
    len -= half;
  }
  return lo;
}

// The edge coordinate where the count reaches t (and where it is, for the backward).
template <typename T>
DEFORMABLE_HOST_DEVICE T coordinate_at(const T* edges, int64_t width, T t, LinePoint<T>& at) {
  if (!(t >= T(0))) {  // also NaN
    at = {-1, 0, T(0)};
    return t;
  }
  if (t >= edges[width]) {
    at = {1, width - 1, T(0)};
    return T(width) + (t - edges[width]);
  }
  const int64_t k = find_segment(edges, width, t);
  T slope = edges[k + 1] - edges[k];
  slope = slope > T(kDensityFloor) ? slope : T(kDensityFloor);
  at = {0, k, (t - edges[k]) / slope};
  return T(k) + at.frac;
}

}  // namespace deformable

namespace deformable {

// Where one query's point set of one head and axis comes from: the unit of work of both kernels.
struct CopeUnit {
  int64_t nq;    // n * Lq + q
  int64_t n;     // image
  int64_t m;     // head
  int axis;      // 0: x, 1: y
};

// The line index a reference reads across its axis: floor(v * lines + kLineSnap) clamped to [0, lines - 1]; NaN
// reads 0.
template <typename T>
DEFORMABLE_HOST_DEVICE int64_t line_across(T v, int64_t lines) {
  const T x = v * T(lines) + T(kLineSnap);
  if (!(x >= T(0))) return 0;
  if (x >= T(lines - 1)) return lines - 1;
  return static_cast<int64_t>(::floor(x));
}

// One level of a unit: its line length, where its lines start, the reference on the line and the offsets' scale.
template <typename T>
struct UnitLevel {
  int64_t length;         // S
  int64_t first;          // the row of channel 0's line in edges[2 l + axis]
  int64_t base;           // the index of point 0 of the unit in offsets and the output
  T e;                    // the reference's edge coordinate
  T scale;                // 1 for points; half the box over P, in pixels of the line, for boxes
  LinePoint<T> at_ref;    // where e lies on the line
  const T* ref_l;         // ref[n, q, l, :]
};

template <typename T>
DEFORMABLE_HOST_DEVICE UnitLevel<T> unit_level(const T* ref, const CopeLocateSizes& s, const CopeUnit& u, int64_t l) {
  UnitLevel<T> v{};
  v.length = s.length[2 * l + u.axis];
  const int64_t lines = s.length[2 * l + 1 - u.axis];
  v.ref_l = ref + (u.nq * s.levels + l) * s.ref_dim;
  v.e = v.ref_l[u.axis] * T(v.length);
  v.scale = s.ref_dim == 4 ? v.ref_l[2 + u.axis] * T(v.length) / T(2 * s.points) : T(1);
  v.first = ((u.n * lines + line_across(v.ref_l[1 - u.axis], lines)) * s.heads + u.m) * s.channels;
  v.base = ((u.nq * s.heads + u.m) * s.levels + l) * s.points * 2 + u.axis;
  v.at_ref = locate_coordinate(v.e, v.length);
  return v;
}

// The forward of one unit: out[n, q, m, l, p, axis] for every level l and point p.
template <typename T>
DEFORMABLE_HOST_DEVICE void cope_locate_unit(const CopeLines<const T>& edges, const T* ref, const T* offsets,
                                             const T* mix, T* out, const CopeLocateSizes& s, const CopeUnit& u) {
  const T* mix_u = mix + ((u.nq * s.heads + u.m) * 2 + u.axis) * s.channels;
  for (int64_t l = 0; l < s.levels; ++l) {
    const auto v = unit_level(ref, s, u, l);
    for (int64_t p = 0; p < s.points; ++p) out[v.base + 2 * p] = T(0);
    for (int64_t r = 0; r < s.channels; ++r) {
      const T* line = edges.data[2 * l + u.axis] + (v.first + r) * (v.length + 1);
      const T c0 = count_at(line, v.length, v.e, v.at_ref);
      const T weight = mix_u[r] / T(v.length);  // normalised coordinates
      for (int64_t p = 0; p < s.points; ++p) {
        LinePoint<T> at{};
        out[v.base + 2 * p] += weight * coordinate_at(line, v.length, c0 + offsets[v.base + 2 * p] * v.scale, at);
      }
    }
  }
}

// The backward of one unit. Writes g_offsets at the unit's points and g_mix[n, q, m, axis, :]; adds into
// g_ref[n, q, l, axis] (and [2 + axis] for boxes) with add_ref and into the lines' gradients with add_edge: both
// must be atomic where units run in parallel on the same entries (the heads of a query share its reference; many
// units read the same line).
template <typename T, typename AddEdge, typename AddRef>
DEFORMABLE_HOST_DEVICE void cope_locate_unit_backward(const T* grad, const CopeLines<const T>& edges, const T* ref,
                                                      const T* offsets, const T* mix, const CopeLines<T>& g_edges,
                                                      T* g_ref, T* g_offsets, T* g_mix, const CopeLocateSizes& s,
                                                      const CopeUnit& u, AddEdge add_edge, AddRef add_ref) {
  const T* mix_u = mix + ((u.nq * s.heads + u.m) * 2 + u.axis) * s.channels;
  T* g_mix_u = g_mix + ((u.nq * s.heads + u.m) * 2 + u.axis) * s.channels;
  for (int64_t r = 0; r < s.channels; ++r) g_mix_u[r] = T(0);
  for (int64_t l = 0; l < s.levels; ++l) {
    const auto v = unit_level(ref, s, u, l);
    const int64_t length = v.length, base = v.base;
    const LinePoint<T> at_ref = v.at_ref;
    T grad_e = 0, grad_scale = 0;
    for (int64_t p = 0; p < s.points; ++p) g_offsets[base + 2 * p] = T(0);
    for (int64_t r = 0; r < s.channels; ++r) {
      const int64_t row = (v.first + r) * (length + 1);
      const T* line = edges.data[2 * l + u.axis] + row;
      T* g_line = g_edges.data[2 * l + u.axis] + row;
      const T c0 = count_at(line, length, v.e, at_ref);
      const T m = mix_u[r];
      T grad_mix = 0, grad_c0 = 0;
      for (int64_t p = 0; p < s.points; ++p) {
        const T g = grad[base + 2 * p] / T(length);
        const T offset = offsets[base + 2 * p];
        LinePoint<T> at{};
        const T x = coordinate_at(line, length, c0 + offset * v.scale, at);
        grad_mix += g * x;
        const T gx = g * m;
        T dx_dt = T(1);
        if (at.region > 0) {
          add_edge(g_line + length, -gx);  // x = S + t - E[S]
        } else if (at.region == 0) {       // x = k + (t - E[k]) / (E[k+1] - E[k])
          T slope = line[at.k + 1] - line[at.k];
          slope = slope > T(kDensityFloor) ? slope : T(kDensityFloor);
          dx_dt = T(1) / slope;
          add_edge(g_line + at.k, -gx * (T(1) - at.frac) * dx_dt);
          add_edge(g_line + at.k + 1, -gx * at.frac * dx_dt);
        }
        const T grad_t = gx * dx_dt;
        g_offsets[base + 2 * p] += grad_t * v.scale;
        grad_scale += grad_t * offset;
        grad_c0 += grad_t;
      }
      g_mix_u[r] += grad_mix;
      T dc0_de = T(1);  // c0 = e below the line
      if (at_ref.region > 0) {  // c0 = E[S] + e - S
        add_edge(g_line + length, grad_c0);
      } else if (at_ref.region == 0) {  // c0 = E[k] + frac * (E[k+1] - E[k])
        dc0_de = line[at_ref.k + 1] - line[at_ref.k];
        add_edge(g_line + at_ref.k, grad_c0 * (T(1) - at_ref.frac));
        add_edge(g_line + at_ref.k + 1, grad_c0 * at_ref.frac);
      }
      grad_e += grad_c0 * dc0_de;
    }
    T* g_ref_l = g_ref + (v.ref_l - ref);
    add_ref(g_ref_l + u.axis, grad_e * T(length));
    if (s.ref_dim == 4) add_ref(g_ref_l + 2 + u.axis, grad_scale * T(length) / T(2 * s.points));
  }
}

}  // namespace deformable

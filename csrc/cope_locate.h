// deformable::cope_locate: where sampling points land for contextual (counted) offsets along lines of count
// densities, mixed over counting channels. The math of one point, shared by the CPU and CUDA kernels.
//
// A line of W pixels has cumulative counts E[0..W] at its pixel edges (E[0] = 0, non-decreasing; pixel k covers the
// edge coordinate [k, k + 1] with slope d_k = E[k + 1] - E[k]); outside [0, W] the count moves one per pixel. For a
// row b (a query's head on one level), channel r with line L = lines[b, r], reference edge coordinate e = ref[b] and
// point p:
//   c0 = C_L(e)                      the count at the reference
//   x_r = C_L^-1(c0 + offsets[b, p])  the edge coordinate where the count reaches it (exact; a flat run is jumped
//                                     to its end, since the search picks the last k with E[k] <= count)
//   out[b, p] = sum_r mix[b, r] * x_r
// The pixel is found by a branch-free binary search along the line: O(log W) reads per point.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "bilinear.h"  // DEFORMABLE_HOST_DEVICE

namespace deformable {

struct CopeLocateSizes {
  int64_t lines;     // Lines
  int64_t width;     // W (edges has W + 1 columns)
  int64_t rows;      // B
  int64_t channels;  // R
  int64_t points;    // P
};

// Checks ranks, shapes, dtypes and devices; every failure names the argument.
CopeLocateSizes check_cope_locate_inputs(const at::Tensor& edges, const at::Tensor& lines, const at::Tensor& ref,
                                         const at::Tensor& offsets, const at::Tensor& mix);

// Also checks grad_output (B, P), same dtype and device as edges.
void check_cope_locate_grad(const at::Tensor& grad_output, const at::Tensor& edges, const CopeLocateSizes& s);

constexpr double kDensityFloor = 1e-12;  // a segment the search picks has E[k + 1] > E[k]; this only bounds 1 / d

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
// that sits in L1 cache. Measured faster than galloping from the reference, whose short searches mispredict.
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

// Row b of the forward: out[b, :] (all channels and points).
template <typename T>
DEFORMABLE_HOST_DEVICE void cope_locate_row(const T* edges, const int64_t* lines, const T* ref, const T* offsets,
                                            const T* mix, T* out, const CopeLocateSizes& s, int64_t b) {
  const T e = ref[b];
  const LinePoint<T> at_ref = locate_coordinate(e, s.width);
  for (int64_t p = 0; p < s.points; ++p) out[b * s.points + p] = T(0);
  for (int64_t r = 0; r < s.channels; ++r) {
    const T* line = edges + lines[b * s.channels + r] * (s.width + 1);
    const T c0 = count_at(line, s.width, e, at_ref);
    const T m = mix[b * s.channels + r];
    for (int64_t p = 0; p < s.points; ++p) {
      LinePoint<T> at{};
      out[b * s.points + p] += m * coordinate_at(line, s.width, c0 + offsets[b * s.points + p], at);
    }
  }
}

// Row b of the backward. Writes g_ref[b], g_offsets[b, :], g_mix[b, :]; scatters into g_edges with add(ptr, value),
// which must be atomic when rows run in parallel (several rows read the same line).
template <typename T, typename Add>
DEFORMABLE_HOST_DEVICE void cope_locate_row_backward(const T* grad, const T* edges, const int64_t* lines, const T* ref,
                                                     const T* offsets, const T* mix, T* g_edges, T* g_ref,
                                                     T* g_offsets, T* g_mix, const CopeLocateSizes& s, int64_t b,
                                                     Add add) {
  const T e = ref[b];
  const LinePoint<T> at_ref = locate_coordinate(e, s.width);
  const int64_t w = s.width;
  T grad_ref = 0;
  for (int64_t p = 0; p < s.points; ++p) g_offsets[b * s.points + p] = T(0);
  for (int64_t r = 0; r < s.channels; ++r) {
    const int64_t offset = lines[b * s.channels + r] * (w + 1);
    const T* line = edges + offset;
    T* g_line = g_edges + offset;
    const T c0 = count_at(line, w, e, at_ref);
    const T m = mix[b * s.channels + r];
    T grad_mix = 0, grad_c0 = 0;
    for (int64_t p = 0; p < s.points; ++p) {
      const T g = grad[b * s.points + p];
      LinePoint<T> at{};
      const T x = coordinate_at(line, w, c0 + offsets[b * s.points + p], at);
      grad_mix += g * x;
      const T gx = g * m;
      T dx_dt = T(1);
      if (at.region > 0) {
        add(g_line + w, -gx);  // x = W + t - E[W]
      } else if (at.region == 0) {  // x = k + (t - E[k]) / (E[k+1] - E[k])
        T slope = line[at.k + 1] - line[at.k];
        slope = slope > T(kDensityFloor) ? slope : T(kDensityFloor);
        dx_dt = T(1) / slope;
        add(g_line + at.k, -gx * (T(1) - at.frac) * dx_dt);
        add(g_line + at.k + 1, -gx * at.frac * dx_dt);
      }
      g_offsets[b * s.points + p] += gx * dx_dt;
      grad_c0 += gx * dx_dt;
    }
    g_mix[b * s.channels + r] = grad_mix;
    T dc0_de = T(1);  // c0 = e below the line
    if (at_ref.region > 0) {  // c0 = E[W] + e - W
      add(g_line + w, grad_c0);
    } else if (at_ref.region == 0) {  // c0 = E[k] + frac * (E[k+1] - E[k])
      dc0_de = line[at_ref.k + 1] - line[at_ref.k];
      add(g_line + at_ref.k, grad_c0 * (T(1) - at_ref.frac));
      add(g_line + at_ref.k + 1, grad_c0 * at_ref.frac);
    }
    grad_ref += grad_c0 * dc0_de;
  }
  g_ref[b] = grad_ref;
}

}  // namespace deformable

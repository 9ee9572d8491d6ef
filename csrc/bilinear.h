// Bilinear sampling of one point, shared by the CPU and CUDA kernels: where the four corners are, their weights, and
// the gradients of a sample with respect to the point's location and attention weight.
//
// Convention (the original's, and F.grid_sample's with align_corners=False and zero padding): a normalised location
// (x, y) in [0, 1] lies at pixel coordinates (w_im, h_im) = (x * W - 0.5, y * H - 0.5), so pixel centres are at
// integers; corners outside the map read zero. Corner order everywhere: (top, left), (top, right), (bottom, left),
// (bottom, right).
//
// Branch-free on purpose: the CPU kernel calls bilinear_point in a loop over sampling points that the compiler
// vectorises (with -fno-trapping-math), the CUDA kernel once per point and thread.
#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define DEFORMABLE_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define DEFORMABLE_HOST_DEVICE __forceinline
#else
#define DEFORMABLE_HOST_DEVICE inline __attribute__((always_inline))
#endif

// A hint to start loading the cache line of p (GCC and Clang; nothing where the compiler has no such builtin).
#if defined(__GNUC__)
#define DEFORMABLE_PREFETCH(p) __builtin_prefetch(p)
#else
#define DEFORMABLE_PREFETCH(p) ((void)0)
#endif

namespace deformable {

template <typename T>
struct BilinearPoint {
  T in_map;     // 1 when the point touches the map (some corner inside), 0 otherwise (also for NaN and inf)
  T h_low;      // floor(h_im), in [-1, H - 1]; -2 when in_map is 0, so that no corner index is ever in the map
  T w_low;      // floor(w_im), in [-1, W - 1]; likewise
  T frac_h;     // h_im - h_low
  T frac_w;     // w_im - w_low
  T inside[4];  // 1 where corner k lies in the map, else 0
  T weight[4];  // bilinear weight of corner k, 0 where it lies outside
};

template <typename T>
DEFORMABLE_HOST_DEVICE T bilinear_floor(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
    return ::floor(x);
  } else {
    return ::floorf(x);
  }
#else
  return std::floor(x);
#endif
}

// The corners and weights of normalised location (x, y) on a map of height x width pixels (both >= 1).
template <typename T>
DEFORMABLE_HOST_DEVICE BilinearPoint<T> bilinear_point(T x, T y, T height, T width) {
  BilinearPoint<T> p;
  T h_im = y * height - T(0.5);
  T w_im = x * width - T(0.5);
  // Masks as 0/1 values and selects (no && or ||): no branch, hence vectorisable. NaN fails every comparison.
  T in_map = h_im > T(-1) ? T(1) : T(0);
  in_map = w_im > T(-1) ? in_map : T(0);
  in_map = h_im < height ? in_map : T(0);
  in_map = w_im < width ? in_map : T(0);
  // A point off the map moves to -2 before any conversion, so later integer casts stay in range.
  h_im = in_map != T(0) ? h_im : T(-2);
  w_im = in_map != T(0) ? w_im : T(-2);
  p.in_map = in_map;
  p.h_low = bilinear_floor(h_im);  // floor, not truncation: h_im in (-1, 0) maps to -1
  p.w_low = bilinear_floor(w_im);
  p.frac_h = h_im - p.h_low;
  p.frac_w = w_im - p.w_low;
  // in_map also guards bottom and right: the -2 stand-in would otherwise pass their tests.
  const T top = p.h_low >= T(0) ? in_map : T(0);
  const T bottom = p.h_low + T(1) < height ? in_map : T(0);
  const T left = p.w_low >= T(0) ? T(1) : T(0);
  const T right = p.w_low + T(1) < width ? T(1) : T(0);
  p.inside[0] = top * left;
  p.inside[1] = top * right;
  p.inside[2] = bottom * left;
  p.inside[3] = bottom * right;
  const T rest_h = T(1) - p.frac_h, rest_w = T(1) - p.frac_w;
  p.weight[0] = p.inside[0] * rest_h * rest_w;
  p.weight[1] = p.inside[1] * rest_h * p.frac_w;
  p.weight[2] = p.inside[2] * p.frac_h * rest_w;
  p.weight[3] = p.inside[3] * p.frac_h * p.frac_w;
  return p;
}

template <typename T>
struct PointGrads {
  T weight;  // d(sample . grad_out) / d(attention weight)
  T x;       // d/dx of attention weight * (sample . grad_out), x normalised
  T y;       // d/dy likewise
};

// The gradients of attn * bilinear(value at (x, y)) . grad_out, given dot[k] = grad_out . value at corner k (0 for a
// corner outside the map) and the point's weights and fractions. Since w_im = x * W - 0.5, d/dx carries a factor W
// (and d/dy a factor H).
template <typename T>
DEFORMABLE_HOST_DEVICE PointGrads<T> bilinear_point_grads(T weight0, T weight1, T weight2, T weight3, T frac_h,
                                                          T frac_w, T dot0, T dot1, T dot2, T dot3, T attn, T height,
                                                          T width) {
  PointGrads<T> g;
  g.weight = weight0 * dot0 + weight1 * dot1 + weight2 * dot2 + weight3 * dot3;
  const T grad_w_im = (T(1) - frac_h) * (dot1 - dot0) + frac_h * (dot3 - dot2);
  const T grad_h_im = (T(1) - frac_w) * (dot2 - dot0) + frac_w * (dot3 - dot1);
  g.x = attn * grad_w_im * width;
  g.y = attn * grad_h_im * height;
  return g;
}

}  // namespace deformable

// CUDA kernels of deformable::ms_deform_attn and its backward.
//
// Thread layout: the D channels of one (batch, query, head) triple -- a "group" -- are split into chunks of 8
// consecutive channels (4 for double), one chunk per thread, so the bilinear coordinate math of a sampling point is
// done once per chunk instead of once per channel, and value is read with 16-byte loads. A group occupies a
// power-of-two number of consecutive lanes: groups of up to 32 lanes never straddle a warp, which lets the backward
// reduce the location and weight gradients of a point with warp shuffles and store them without atomics. D that is
// not a multiple of the chunk size (or misaligned data) takes a one-channel-per-thread path.

#include "../bilinear.h"
#include "../ms_deform_attn.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuSPARSE/cuBLAS headers
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace deformable {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;  // grid-stride loops cover anything beyond

// Channels per thread on the vectorised path: two 16-byte vectors for float and double (more work per coordinate
// computation), one for half and bfloat16.
template <typename scalar_t>
constexpr int vector_channels() {
  return sizeof(scalar_t) == 2 ? 8 : 32 / static_cast<int>(sizeof(scalar_t));
}

// Sizes the kernels need, with the thread-group layout chosen by the launcher.
struct LaunchShape {
  int64_t num_groups;     // N * Lq * M
  int64_t queries_heads;  // Lq * M
  int64_t spatial;        // S
  int64_t heads;          // M
  int64_t channels;       // D
  int64_t levels;         // L
  int64_t points;         // P
  int64_t chunks;         // threads of a group that own channels: ceil(D / channels per thread)
  int log2_lanes;         // a group spans 2^log2_lanes consecutive threads
};

// Batch and head of a group. Integer division by a runtime value is far cheaper in 32 bits, and the 64-bit form is
// only needed for more than 2^32 groups.
__device__ __forceinline__ void split_group(int64_t group, const LaunchShape& s, int64_t& batch, int64_t& head) {
  if (s.num_groups <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    const auto g = static_cast<uint32_t>(group);
    head = g % static_cast<uint32_t>(s.heads);
    batch = g / static_cast<uint32_t>(s.queries_heads);
  } else {
    head = group % s.heads;
    batch = group / s.queries_heads;
  }
}

// Reads CPT consecutive channels. For CPT > 1 the caller guarantees 16-byte alignment.
template <int CPT, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void load_channels(const scalar_t* __restrict__ src, opmath_t (&dst)[CPT]) {
  if constexpr (CPT == 1) {
    dst[0] = static_cast<opmath_t>(src[0]);
  } else {
    constexpr int kPack = 16 / sizeof(scalar_t);
    static_assert(CPT % kPack == 0, "a thread's channels must be whole 16-byte vectors");
#pragma unroll
    for (int k = 0; k < CPT / kPack; ++k) {
      const uint4 bits = __ldg(reinterpret_cast<const uint4*>(src) + k);
      const auto* v = reinterpret_cast<const scalar_t*>(&bits);
#pragma unroll
      for (int i = 0; i < kPack; ++i) {
        dst[k * kPack + i] = static_cast<opmath_t>(v[i]);
      }
    }
  }
}

template <int CPT, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void store_channels(scalar_t* __restrict__ dst, const opmath_t (&src)[CPT]) {
  if constexpr (CPT == 1) {
    dst[0] = static_cast<scalar_t>(src[0]);
  } else {
    constexpr int kPack = 16 / sizeof(scalar_t);
    static_assert(CPT % kPack == 0, "a thread's channels must be whole 16-byte vectors");
#pragma unroll
    for (int k = 0; k < CPT / kPack; ++k) {
      uint4 bits;
      auto* v = reinterpret_cast<scalar_t*>(&bits);
#pragma unroll
      for (int i = 0; i < kPack; ++i) {
        v[i] = static_cast<scalar_t>(src[k * kPack + i]);
      }
      reinterpret_cast<uint4*>(dst)[k] = bits;
    }
  }
}

// dst[0..3] += (a, b, c, d). Hopper's 128-bit float atomics cut the number of atomic operations by four; dst must be
// 16-byte aligned.
__device__ __forceinline__ void atomic_add4(float* dst, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), make_float4(a, b, c, d));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
  atomicAdd(dst + 2, c);
  atomicAdd(dst + 3, d);
#endif
}

// dst[i] += scale * src[i]; for CPT > 1 the caller guarantees 16-byte alignment.
template <int CPT, typename opmath_t>
__device__ __forceinline__ void atomic_add_channels(opmath_t* dst, const opmath_t (&src)[CPT], opmath_t scale) {
  if constexpr (std::is_same_v<opmath_t, float> && CPT % 4 == 0) {
#pragma unroll
    for (int k = 0; k < CPT; k += 4) {
      atomic_add4(dst + k, scale * src[k], scale * src[k + 1], scale * src[k + 2], scale * src[k + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      atomicAdd(dst + i, scale * src[i]);
    }
  }
}

// The four bilinear corners of a sampling point (weights 0 outside the map), in the order (top, left), (top, right), (bottom, left),
// (bottom, right). Offsets are in elements from the level's first pixel of the thread's head and chunk.
template <typename T>
struct Corners {
  int64_t offset[4];
  T weight[4];
  bool inside[4];
  T frac_h;  // h_im - floor(h_im)
  T frac_w;  // w_im - floor(w_im)
};

// The corners of a sampling point (../bilinear.h: align_corners=False, zero padding, as F.grid_sample) as element
// offsets for this thread. Returns false when the point cannot touch the map; then no corner may be read. Requires
// height, width >= 1 and height * width < 2^31.
template <typename T>
__device__ __forceinline__ bool locate(T x, T y, int height, int width, int64_t pixel_stride, Corners<T>& c) {
  const BilinearPoint<T> p = bilinear_point(x, y, static_cast<T>(height), static_cast<T>(width));
  if (p.in_map == T(0)) {
    return false;  // also NaN and +-inf; otherwise the floors are in [-1, H - 1] and [-1, W - 1], in int range
  }
  const int h0 = static_cast<int>(p.h_low);
  const int w0 = static_cast<int>(p.w_low);
  c.frac_h = p.frac_h;
  c.frac_w = p.frac_w;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    c.inside[k] = p.inside[k] != T(0);
    c.weight[k] = p.weight[k];
  }
  const int64_t top_left = static_cast<int64_t>(h0 * width + w0) * pixel_stride;  // |h0*W + w0| <= H*W
  const int64_t row_stride = static_cast<int64_t>(width) * pixel_stride;
  c.offset[0] = top_left;
  c.offset[1] = top_left + pixel_stride;
  c.offset[2] = top_left + row_stride;
  c.offset[3] = top_left + row_stride + pixel_stride;
  return true;
}

// Values of the four corners, zero for corners outside the map (never read: they may lie outside the tensor).
// All loads are issued before any arithmetic waits on them.
template <int CPT, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void load_corners(const scalar_t* __restrict__ level_value, const Corners<opmath_t>& c,
                                             opmath_t (&v)[4][CPT]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (c.inside[k]) {
      load_channels<CPT>(level_value + c.offset[k], v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        v[k][i] = opmath_t(0);
      }
    }
  }
}

// Level geometry read once per level. Empty levels (H or W zero) are reported so the caller skips them before any
// int conversion; for the others H * W <= S < 2^31 (checked on the host).
struct Level {
  int height;
  int width;
  int64_t start;
  bool empty;
};

__device__ __forceinline__ Level read_level(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                            int64_t l) {
  const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
  Level level;
  level.empty = h <= 0 || w <= 0;
  level.height = level.empty ? 0 : static_cast<int>(h);
  level.width = level.empty ? 0 : static_cast<int>(w);
  level.start = starts[l];
  return level;
}

template <typename scalar_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                                  const int64_t* __restrict__ level_start_index,
                                  const at::opmath_type<scalar_t>* __restrict__ sampling_locations,
                                  const at::opmath_type<scalar_t>* __restrict__ attention_weights,
                                  scalar_t* __restrict__ output, const LaunchShape s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = s.num_groups << s.log2_lanes;
  const int64_t pixel_stride = s.heads * s.channels;
  for (int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; tid < total;
       tid += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t group = tid >> s.log2_lanes;
    const int64_t chunk = tid & ((int64_t{1} << s.log2_lanes) - 1);
    if (chunk >= s.chunks) {
      continue;  // padding lanes of a group whose chunk count is not a power of two
    }
    int64_t batch, head;
    split_group(group, s, batch, head);
    const scalar_t* head_value = value + batch * s.spatial * pixel_stride + head * s.channels + chunk * CPT;
    const int64_t first_point = group * s.levels * s.points;

    opmath_t acc[CPT];
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      acc[i] = opmath_t(0);
    }
    for (int64_t l = 0; l < s.levels; ++l) {
      const Level level = read_level(spatial_shapes, level_start_index, l);
      if (level.empty) {
        continue;
      }
      const scalar_t* level_value = head_value + level.start * pixel_stride;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t point = first_point + l * s.points + p;
        const opmath_t attn = attention_weights[point];
        Corners<opmath_t> c;
        if (!locate(sampling_locations[2 * point], sampling_locations[2 * point + 1], level.height, level.width,
                    pixel_stride, c)) {
          continue;
        }
        opmath_t v[4][CPT];
        load_corners<CPT>(level_value, c, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const opmath_t w = attn * c.weight[k];
#pragma unroll
          for (int i = 0; i < CPT; ++i) {
            acc[i] += w * v[k][i];
          }
        }
      }
    }
    store_channels<CPT>(output + group * s.channels + chunk * CPT, acc);
  }
}

// This thread's share of the gradients of one sampling point -- grads = (attention weight, x, y), summed over the
// group by the caller -- and the scatter of attn * bilinear weight * grad_out into grad_value.
template <int CPT, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void point_backward(const scalar_t* __restrict__ level_value, opmath_t* level_grad,
                                               const opmath_t (&grad_out)[CPT], const Corners<opmath_t>& c,
                                               opmath_t attn, const Level& level, opmath_t (&grads)[3]) {
  opmath_t v[4][CPT];
  load_corners<CPT>(level_value, c, v);
  opmath_t dots[4];  // grad_out . corner value
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    dots[k] = opmath_t(0);
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      dots[k] += grad_out[i] * v[k][i];
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (c.inside[k]) {
      atomic_add_channels<CPT>(level_grad + c.offset[k], grad_out, attn * c.weight[k]);
    }
  }
  const PointGrads<opmath_t> g =
      bilinear_point_grads(c.weight[0], c.weight[1], c.weight[2], c.weight[3], c.frac_h, c.frac_w, dots[0], dots[1],
                           dots[2], dots[3], attn, static_cast<opmath_t>(level.height), static_cast<opmath_t>(level.width));
  grads[0] = g.weight;
  grads[1] = g.x;
  grads[2] = g.y;
}

// Sums over the lanes of a group (lanes a power of two up to 32, groups aligned to it). Every lane of the warp must
// call it: the shuffles name the whole warp.
template <typename T>
__device__ __forceinline__ void group_sum(T (&v)[3], int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      v[j] += __shfl_xor_sync(0xffffffffu, v[j], offset);
    }
  }
}

// grad_value_acc has value's layout in opmath_t. grad_locations and grad_weights must be zero-filled when a group
// spans several warps (then each warp adds its share atomically); otherwise the group's first lane stores them.
template <typename scalar_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                                   const int64_t* __restrict__ spatial_shapes,
                                   const int64_t* __restrict__ level_start_index,
                                   const at::opmath_type<scalar_t>* __restrict__ sampling_locations,
                                   const at::opmath_type<scalar_t>* __restrict__ attention_weights,
                                   at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
                                   at::opmath_type<scalar_t>* __restrict__ grad_locations,
                                   at::opmath_type<scalar_t>* __restrict__ grad_weights, const LaunchShape s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = s.num_groups << s.log2_lanes;
  const int64_t pixel_stride = s.heads * s.channels;
  const int64_t lanes = int64_t{1} << s.log2_lanes;
  const int reduce_lanes = lanes < kWarpSize ? static_cast<int>(lanes) : kWarpSize;
  // The loop bound is uniform per block, so whole warps iterate together and can shuffle; lanes past the end only
  // take part in the shuffles.
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x); base < total;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tid = base + threadIdx.x;
    const bool active = tid < total;  // whole groups are active or not, since total is a multiple of lanes
    const int64_t group = active ? tid >> s.log2_lanes : 0;
    const int64_t chunk = tid & (lanes - 1);
    const bool owns_channels = active && chunk < s.chunks;
    int64_t batch, head;
    split_group(group, s, batch, head);
    const int64_t head_offset = batch * s.spatial * pixel_stride + head * s.channels + chunk * CPT;

    opmath_t grad_out[CPT];
    if (owns_channels) {
      load_channels<CPT>(grad_output + group * s.channels + chunk * CPT, grad_out);
    } else {
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        grad_out[i] = opmath_t(0);
      }
    }
    const int64_t first_point = group * s.levels * s.points;
    for (int64_t l = 0; l < s.levels; ++l) {
      const Level level = read_level(spatial_shapes, level_start_index, l);
      const int64_t level_offset = head_offset + level.start * pixel_stride;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t point = first_point + l * s.points + p;
        opmath_t grads[3] = {opmath_t(0), opmath_t(0), opmath_t(0)};  // attention weight, x, y
        const opmath_t attn = owns_channels ? attention_weights[point] : opmath_t(0);
        Corners<opmath_t> c;
        if (owns_channels && !level.empty &&
            locate(sampling_locations[2 * point], sampling_locations[2 * point + 1], level.height, level.width,
                   pixel_stride, c)) {
          point_backward<CPT>(value + level_offset, grad_value_acc + level_offset, grad_out, c, attn, level, grads);
        }
        group_sum(grads, reduce_lanes);
        if (!active) {
          continue;
        }
        if (lanes <= kWarpSize) {
          if (chunk == 0) {
            grad_weights[point] = grads[0];
            grad_locations[2 * point] = grads[1];
            grad_locations[2 * point + 1] = grads[2];
          }
        } else if ((threadIdx.x & (kWarpSize - 1)) == 0) {  // a group spanning several warps: one add per warp
          atomicAdd(grad_weights + point, grads[0]);
          atomicAdd(grad_locations + 2 * point, grads[1]);
          atomicAdd(grad_locations + 2 * point + 1, grads[2]);
        }
      }
    }
  }
}

bool is_aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

LaunchShape make_launch_shape(const MSDASizes& sizes, int channels_per_thread) {
  LaunchShape s{};
  s.num_groups = sizes.batch * sizes.queries * sizes.heads;
  s.queries_heads = sizes.queries * sizes.heads;
  s.spatial = sizes.spatial;
  s.heads = sizes.heads;
  s.channels = sizes.channels;
  s.levels = sizes.levels;
  s.points = sizes.points;
  s.chunks = (sizes.channels + channels_per_thread - 1) / channels_per_thread;
  s.log2_lanes = 0;
  while ((int64_t{1} << s.log2_lanes) < s.chunks) {
    ++s.log2_lanes;
  }
  return s;
}

dim3 grid_for(const LaunchShape& s) {
  const int64_t threads = s.num_groups << s.log2_lanes;
  return dim3(static_cast<unsigned int>(std::min((threads + kThreads - 1) / kThreads, kMaxBlocks)));
}

// The kernels index pixels inside a level with int; S bounds every level's H * W.
void check_spatial_fits_int(const MSDASizes& sizes, const char* op) {
  TORCH_CHECK(sizes.spatial <= std::numeric_limits<int>::max(), op,
              ": the CUDA kernel supports at most 2^31 - 1 spatial positions (S), got S = ", sizes.spatial);
}

template <typename scalar_t, int CPT>
void launch_forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::Tensor& output,
                    const MSDASizes& sizes) {
  using opmath_t = at::opmath_type<scalar_t>;
  const LaunchShape s = make_launch_shape(sizes, CPT);
  ms_deform_attn_forward_kernel<scalar_t, CPT><<<grid_for(s), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
      level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<opmath_t>(),
      attention_weights.const_data_ptr<opmath_t>(), output.mutable_data_ptr<scalar_t>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int CPT>
void launch_backward(const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
                     const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                     const at::Tensor& attention_weights, at::Tensor& grad_value_acc, at::Tensor& grad_locations,
                     at::Tensor& grad_weights, const MSDASizes& sizes) {
  using opmath_t = at::opmath_type<scalar_t>;
  const LaunchShape s = make_launch_shape(sizes, CPT);
  if ((int64_t{1} << s.log2_lanes) > kWarpSize) {
    grad_locations.zero_();  // groups spanning several warps add their shares atomically
    grad_weights.zero_();
  }
  ms_deform_attn_backward_kernel<scalar_t, CPT><<<grid_for(s), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
      spatial_shapes.const_data_ptr<int64_t>(), level_start_index.const_data_ptr<int64_t>(),
      sampling_locations.const_data_ptr<opmath_t>(), attention_weights.const_data_ptr<opmath_t>(),
      grad_value_acc.mutable_data_ptr<opmath_t>(), grad_locations.mutable_data_ptr<opmath_t>(),
      grad_weights.mutable_data_ptr<opmath_t>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool has_no_work(const MSDASizes& s) {
  return s.batch == 0 || s.queries == 0 || s.spatial == 0 || s.heads == 0 || s.channels == 0;
}

}  // namespace

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const auto sizes =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_cuda: value must be a CUDA tensor, got one on ", value.device());
  check_spatial_fits_int(sizes, "ms_deform_attn");
  c10::cuda::CUDAGuard device_guard(value.device());
  if (has_no_work(sizes)) {
    return at::zeros({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value.options());
  }
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  auto output = at::empty({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
        constexpr int kVec = vector_channels<scalar_t>();
        if (sizes.channels % kVec == 0 && is_aligned16(value_c.const_data_ptr()) &&
            is_aligned16(output.const_data_ptr())) {
          launch_forward<scalar_t, kVec>(value_c, shapes_c, starts_c, locations_c, weights_c, output, sizes);
        } else {
          launch_forward<scalar_t, 1>(value_c, shapes_c, starts_c, locations_c, weights_c, output, sizes);
        }
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const auto sizes =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, sizes);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_backward_cuda: value must be a CUDA tensor, got one on ",
              value.device());
  check_spatial_fits_int(sizes, "ms_deform_attn_backward");
  // grad_value is accumulated with floating-point atomics (and so are the location/weight gradients when D is
  // large), so the summation order, and with it the rounding, changes from run to run.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  c10::cuda::CUDAGuard device_guard(value.device());
  if (has_no_work(sizes)) {
    return {at::zeros(value.sizes(), value.options()),
            at::zeros(sampling_locations.sizes(), sampling_locations.options()),
            at::zeros(attention_weights.sizes(), attention_weights.options())};
  }
  const auto grad_output_c = grad_output.contiguous();
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  // Half/bfloat16 gradients are accumulated in float: summing many small atomic adds in 16 bits loses them.
  const auto acc_dtype = at::toOpMathType(value.scalar_type());
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = at::empty(attention_weights.sizes(), attention_weights.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        constexpr int kVec = vector_channels<scalar_t>();
        if (sizes.channels % kVec == 0 && is_aligned16(value_c.const_data_ptr()) &&
            is_aligned16(grad_output_c.const_data_ptr()) && is_aligned16(grad_value_acc.const_data_ptr())) {
          launch_backward<scalar_t, kVec>(grad_output_c, value_c, shapes_c, starts_c, locations_c, weights_c,
                                          grad_value_acc, grad_locations, grad_weights, sizes);
        } else {
          launch_backward<scalar_t, 1>(grad_output_c, value_c, shapes_c, starts_c, locations_c, weights_c,
                                       grad_value_acc, grad_locations, grad_weights, sizes);
        }
      });
  auto grad_value = acc_dtype == value.scalar_type() ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_locations, grad_weights};
}

TORCH_LIBRARY_IMPL(deformable, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace deformable

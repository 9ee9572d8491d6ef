// CUDA kernels of deformable::cope_locate and its backward (the math is in ../cope_locate.h): one thread per unit (a
// query's head on one axis: every level, channel and point); the lines' and references' gradients are summed with
// atomic adds.

#include "../cope_locate.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace deformable {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;  // the grid-stride loops cover anything beyond

int64_t blocks_for(int64_t units) { return std::min<int64_t>(kMaxBlocks, (units + kThreads - 1) / kThreads); }

template <typename T>
struct AtomicAdd {
  __device__ void operator()(T* address, T value) const { atomicAdd(address, value); }
};

// Unit i: query nq = i / (2 M), head m = (i / 2) % M, axis i % 2.
__device__ CopeUnit unit_at(int64_t i, const CopeLocateSizes& s) {
  const int64_t nq = i / (2 * s.heads);
  return CopeUnit{nq, nq / s.queries, (i / 2) % s.heads, static_cast<int>(i % 2)};
}

template <typename scalar_t>
__global__ void cope_locate_forward_kernel(CopeLines<const scalar_t> edges, const scalar_t* ref,
                                           const scalar_t* offsets, const scalar_t* mix, scalar_t* out,
                                           CopeLocateSizes s, int64_t units) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < units; i += int64_t{blockDim.x} * gridDim.x) {
    cope_locate_unit(edges, ref, offsets, mix, out, s, unit_at(i, s));
  }
}

template <typename scalar_t>
__global__ void cope_locate_backward_kernel(const scalar_t* grad, CopeLines<const scalar_t> edges,
                                            const scalar_t* ref, const scalar_t* offsets, const scalar_t* mix,
                                            CopeLines<scalar_t> g_edges, scalar_t* g_ref, scalar_t* g_offsets,
                                            scalar_t* g_mix, CopeLocateSizes s, int64_t units) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < units; i += int64_t{blockDim.x} * gridDim.x) {
    cope_locate_unit_backward(grad, edges, ref, offsets, mix, g_edges, g_ref, g_offsets, g_mix, s, unit_at(i, s),
                              AtomicAdd<scalar_t>{}, AtomicAdd<scalar_t>{});
  }
}

at::Tensor cope_locate_cuda(at::TensorList edges, const at::Tensor& ref, const at::Tensor& offsets,
                            const at::Tensor& mix) {
  auto lines = contiguous_lines(edges);
  const auto s = check_cope_locate_inputs(lines, ref, offsets, mix);
  TORCH_CHECK(offsets.is_cuda(), "cope_locate_cuda: offsets must be a CUDA tensor, got one on ", offsets.device());
  c10::cuda::CUDAGuard device_guard(offsets.device());
  auto output = at::empty(offsets.sizes(), offsets.options());  // every entry is written
  if (output.numel() == 0) return output;
  const int64_t units = s.batch * s.queries * s.heads * 2;
  const auto rf = ref.contiguous(), u = offsets.contiguous(), mx = mix.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(offsets.scalar_type(), "cope_locate_cuda", [&] {
    cope_locate_forward_kernel<scalar_t><<<blocks_for(units), kThreads, 0, stream>>>(
        line_pointers<const scalar_t>(lines), rf.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
        mx.const_data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), s, units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

CopeGrads cope_locate_backward_cuda(
    const at::Tensor& grad_output, at::TensorList edges, const at::Tensor& ref, const at::Tensor& offsets,
    const at::Tensor& mix) {
  auto lines = contiguous_lines(edges);
  const auto s = check_cope_locate_inputs(lines, ref, offsets, mix);
  check_cope_locate_grad(grad_output, offsets);
  TORCH_CHECK(offsets.is_cuda(), "cope_locate_backward_cuda: offsets must be a CUDA tensor, got one on ",
              offsets.device());
  // The lines' and references' gradients are summed with atomics, so their rounding changes from run to run.
  at::globalContext().alertNotDeterministic("cope_locate_backward_cuda");
  c10::cuda::CUDAGuard device_guard(offsets.device());
  auto grads = allocate_cope_grads(lines, ref, offsets, mix);
  if (offsets.numel() == 0) return grads;
  auto& grad_edges = std::get<0>(grads);  // (named references: lambdas cannot capture structured bindings in C++17)
  auto &grad_ref = std::get<1>(grads), &grad_offsets = std::get<2>(grads), &grad_mix = std::get<3>(grads);
  const int64_t units = s.batch * s.queries * s.heads * 2;
  const auto g = grad_output.contiguous(), rf = ref.contiguous(), u = offsets.contiguous(), mx = mix.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(offsets.scalar_type(), "cope_locate_backward_cuda", [&] {
    cope_locate_backward_kernel<scalar_t><<<blocks_for(units), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), line_pointers<const scalar_t>(lines), rf.const_data_ptr<scalar_t>(),
        u.const_data_ptr<scalar_t>(), mx.const_data_ptr<scalar_t>(), line_pointers<scalar_t>(grad_edges),
        grad_ref.data_ptr<scalar_t>(), grad_offsets.data_ptr<scalar_t>(), grad_mix.data_ptr<scalar_t>(), s, units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(deformable, CUDA, m) {
  m.impl("cope_locate", &cope_locate_cuda);
  m.impl("cope_locate_backward", &cope_locate_backward_cuda);
}

}  // namespace deformable

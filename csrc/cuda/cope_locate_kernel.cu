// CUDA kernels of deformable::cope_locate and its backward (the math is in ../cope_locate.h): one thread per row (a
// query's head on one level: all its channels and points); the edge gradient is scattered with atomic adds.

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

namespace deformable {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;  // the grid-stride loops cover anything beyond

int64_t blocks_for(int64_t rows) { return std::min<int64_t>(kMaxBlocks, (rows + kThreads - 1) / kThreads); }

template <typename T>
struct AtomicAdd {
  __device__ void operator()(T* address, T value) const { atomicAdd(address, value); }
};

template <typename scalar_t>
__global__ void cope_locate_forward_kernel(const scalar_t* edges, const int64_t* lines, const scalar_t* ref,
                                           const scalar_t* offsets, const scalar_t* mix, scalar_t* out,
                                           CopeLocateSizes s) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < s.rows; b += int64_t{blockDim.x} * gridDim.x) {
    cope_locate_row(edges, lines, ref, offsets, mix, out, s, b);
  }
}

template <typename scalar_t>
__global__ void cope_locate_backward_kernel(const scalar_t* grad, const scalar_t* edges, const int64_t* lines,
                                            const scalar_t* ref, const scalar_t* offsets, const scalar_t* mix,
                                            scalar_t* g_edges, scalar_t* g_ref, scalar_t* g_offsets, scalar_t* g_mix,
                                            CopeLocateSizes s) {
  for (int64_t b = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; b < s.rows; b += int64_t{blockDim.x} * gridDim.x) {
    cope_locate_row_backward(grad, edges, lines, ref, offsets, mix, g_edges, g_ref, g_offsets, g_mix, s, b,
                             AtomicAdd<scalar_t>{});
  }
}

at::Tensor cope_locate_cuda(const at::Tensor& edges, const at::Tensor& lines, const at::Tensor& ref,
                            const at::Tensor& offsets, const at::Tensor& mix) {
  const auto s = check_cope_locate_inputs(edges, lines, ref, offsets, mix);
  TORCH_CHECK(edges.is_cuda(), "cope_locate_cuda: edges must be a CUDA tensor, got one on ", edges.device());
  c10::cuda::CUDAGuard device_guard(edges.device());
  auto output = at::empty({s.rows, s.points}, offsets.options());  // every row is written
  if (output.numel() == 0) return output;
  const auto e = edges.contiguous(), l = lines.contiguous(), rf = ref.contiguous();
  const auto u = offsets.contiguous(), mx = mix.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "cope_locate_cuda", [&] {
    cope_locate_forward_kernel<scalar_t><<<blocks_for(s.rows), kThreads, 0, stream>>>(
        e.const_data_ptr<scalar_t>(), l.const_data_ptr<int64_t>(), rf.const_data_ptr<scalar_t>(),
        u.const_data_ptr<scalar_t>(), mx.const_data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cope_locate_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& edges, const at::Tensor& lines, const at::Tensor& ref,
    const at::Tensor& offsets, const at::Tensor& mix) {
  const auto s = check_cope_locate_inputs(edges, lines, ref, offsets, mix);
  check_cope_locate_grad(grad_output, edges, s);
  TORCH_CHECK(edges.is_cuda(), "cope_locate_backward_cuda: edges must be a CUDA tensor, got one on ", edges.device());
  // The edge gradient is summed with atomics, so its rounding changes from run to run.
  at::globalContext().alertNotDeterministic("cope_locate_backward_cuda");
  c10::cuda::CUDAGuard device_guard(edges.device());
  auto grad_edges = at::zeros(edges.sizes(), edges.options());
  auto grad_ref = at::empty(ref.sizes(), ref.options());
  auto grad_offsets = at::empty(offsets.sizes(), offsets.options());
  auto grad_mix = at::empty(mix.sizes(), mix.options());
  if (s.rows == 0) return {grad_edges, grad_ref, grad_offsets, grad_mix};
  const auto g = grad_output.contiguous(), e = edges.contiguous(), l = lines.contiguous();
  const auto rf = ref.contiguous(), u = offsets.contiguous(), mx = mix.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "cope_locate_backward_cuda", [&] {
    cope_locate_backward_kernel<scalar_t><<<blocks_for(s.rows), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(), l.const_data_ptr<int64_t>(),
        rf.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), mx.const_data_ptr<scalar_t>(),
        grad_edges.data_ptr<scalar_t>(), grad_ref.data_ptr<scalar_t>(), grad_offsets.data_ptr<scalar_t>(),
        grad_mix.data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_edges, grad_ref, grad_offsets, grad_mix};
}

}  // namespace

TORCH_LIBRARY_IMPL(deformable, CUDA, m) {
  m.impl("cope_locate", &cope_locate_cuda);
  m.impl("cope_locate_backward", &cope_locate_backward_cuda);
}

}  // namespace deformable

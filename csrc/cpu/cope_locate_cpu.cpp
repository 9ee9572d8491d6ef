// The CPU kernels of deformable::cope_locate and its backward (the math is in ../cope_locate.h).
//
// Rows are split between threads; the edge gradient is scattered with compare-and-swap adds, since rows of different
// threads may read the same line (in an encoder, the queries of one image row share their row's line and sit next to
// each other, so threads rarely meet on a line).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../cope_locate.h"

namespace deformable {
namespace cpu {
namespace {

constexpr int64_t kGrainPoints = 4096;  // rows * channels * points per task

template <typename T>
void atomic_add(T* address, T value) {
  T expected;
  __atomic_load(address, &expected, __ATOMIC_RELAXED);
  T desired = expected + value;
  while (!__atomic_compare_exchange(address, &expected, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    desired = expected + value;
  }
}

// lines index the rows of edges: checked here, on the host, once per call.
void check_line_range(const at::Tensor& lines, int64_t n_lines) {
  if (lines.numel() == 0) return;
  const int64_t low = lines.min().item<int64_t>(), high = lines.max().item<int64_t>();
  TORCH_CHECK(low >= 0 && high < n_lines, "cope_locate: lines holds values in [", low, ", ", high,
              "], outside the ", n_lines, " lines of edges");
}

int64_t grain(const CopeLocateSizes& s) {
  return std::max<int64_t>(1, kGrainPoints / std::max<int64_t>(1, s.points * s.channels));
}

at::Tensor cope_locate_cpu(const at::Tensor& edges, const at::Tensor& lines, const at::Tensor& ref,
                           const at::Tensor& offsets, const at::Tensor& mix) {
  const auto s = check_cope_locate_inputs(edges, lines, ref, offsets, mix);
  TORCH_CHECK(edges.device().is_cpu(), "cope_locate: the CPU kernel got edges on ", edges.device());
  check_line_range(lines, s.lines);
  auto output = at::empty({s.rows, s.points}, offsets.options());  // every row is written
  if (output.numel() == 0) return output;
  const auto e = edges.contiguous(), l = lines.contiguous(), rf = ref.contiguous();
  const auto u = offsets.contiguous(), mx = mix.contiguous();
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "cope_locate_cpu", [&] {
    const scalar_t* edges_p = e.data_ptr<scalar_t>();
    const int64_t* lines_p = l.data_ptr<int64_t>();
    const scalar_t *ref_p = rf.data_ptr<scalar_t>(), *offsets_p = u.data_ptr<scalar_t>();
    const scalar_t* mix_p = mx.data_ptr<scalar_t>();
    scalar_t* out_p = output.data_ptr<scalar_t>();
    at::parallel_for(0, s.rows, grain(s), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) cope_locate_row(edges_p, lines_p, ref_p, offsets_p, mix_p, out_p, s, b);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cope_locate_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& edges, const at::Tensor& lines, const at::Tensor& ref,
    const at::Tensor& offsets, const at::Tensor& mix) {
  const auto s = check_cope_locate_inputs(edges, lines, ref, offsets, mix);
  check_cope_locate_grad(grad_output, edges, s);
  TORCH_CHECK(edges.device().is_cpu(), "cope_locate_backward: the CPU kernel got edges on ", edges.device());
  check_line_range(lines, s.lines);
  auto grad_edges = at::zeros(edges.sizes(), edges.options());
  // Every row of these is written by its task.
  auto grad_ref = at::empty(ref.sizes(), ref.options());
  auto grad_offsets = at::empty(offsets.sizes(), offsets.options());
  auto grad_mix = at::empty(mix.sizes(), mix.options());
  if (s.rows == 0) return {grad_edges, grad_ref, grad_offsets, grad_mix};
  const auto g = grad_output.contiguous(), e = edges.contiguous(), l = lines.contiguous();
  const auto rf = ref.contiguous(), u = offsets.contiguous(), mx = mix.contiguous();
  AT_DISPATCH_FLOATING_TYPES(edges.scalar_type(), "cope_locate_backward_cpu", [&] {
    const scalar_t *grad_p = g.data_ptr<scalar_t>(), *edges_p = e.data_ptr<scalar_t>();
    const int64_t* lines_p = l.data_ptr<int64_t>();
    const scalar_t *ref_p = rf.data_ptr<scalar_t>(), *offsets_p = u.data_ptr<scalar_t>();
    const scalar_t* mix_p = mx.data_ptr<scalar_t>();
    scalar_t *g_edges = grad_edges.data_ptr<scalar_t>(), *g_ref = grad_ref.data_ptr<scalar_t>();
    scalar_t *g_offsets = grad_offsets.data_ptr<scalar_t>(), *g_mix = grad_mix.data_ptr<scalar_t>();
    at::parallel_for(0, s.rows, grain(s), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        cope_locate_row_backward(grad_p, edges_p, lines_p, ref_p, offsets_p, mix_p, g_edges, g_ref, g_offsets, g_mix,
                                 s, b, atomic_add<scalar_t>);
      }
    });
  });
  return {grad_edges, grad_ref, grad_offsets, grad_mix};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(deformable, CPU, m) {
  m.impl("cope_locate", &cpu::cope_locate_cpu);
  m.impl("cope_locate_backward", &cpu::cope_locate_backward_cpu);
}

}  // namespace deformable

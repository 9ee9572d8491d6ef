// The CPU kernels of deformable::ms_deform_attn and its backward: input layout, the parallel loop, and the
// registration. The loops themselves are in forward.h and backward.h, compiled per instruction set in
// isa_dispatch.cpp; the head-major layout of encoder calls is in head_major.cpp.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ms_deform_attn.h"
#include "head_major.h"
#include "isa_dispatch.h"
#include "kernel_common.h"

namespace deformable {
namespace cpu {
namespace {

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
    const auto forward = cpu_kernels<scalar_t>(cpu_isa()).forward;
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { forward(in, out, begin, end); });
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
      const auto backward = cpu_kernels<scalar_t>(cpu_isa()).backward;
      at::parallel_for(0, s.batch * s.heads, 1,
                       [&](int64_t begin, int64_t end) { backward(in, grad_out, g, begin, end); });
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
}  // namespace cpu

TORCH_LIBRARY_IMPL(deformable, CPU, m) {
  m.impl("ms_deform_attn", &cpu::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &cpu::ms_deform_attn_backward_cpu);
}

}  // namespace deformable

// The CPU kernels of deformable::cope_locate and its backward (the math is in ../cope_locate.h).
//
// Queries are split between threads; a query's heads and axes run in one task, so its reference gradient needs no
// atomics. Queries of different threads may read the same line, so each thread sums the lines' gradient into its
// own zeroed copy, and the copies are added at the end (plain adds: measured a third faster than compare-and-swap
// adds into one tensor, and the sum is the same from run to run); where the copies would take more than
// DEFORMABLE_COPE_SCRATCH_MIB (default 64) MiB, the threads share one tensor with compare-and-swap adds instead.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../cope_locate.h"

namespace deformable {
namespace cpu {
namespace {

constexpr int64_t kGrainPoints = 4096;  // searches per task
constexpr int64_t kDefaultScratchMiB = 64;

// The most the threads' copies of the lines' gradient may take: DEFORMABLE_COPE_SCRATCH_MIB, else the default.
int64_t scratch_bytes() {
  const char* text = std::getenv("DEFORMABLE_COPE_SCRATCH_MIB");
  if (text == nullptr || *text == '\0') return kDefaultScratchMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK(*end == '\0' && mib >= 0, "DEFORMABLE_COPE_SCRATCH_MIB must be a whole number of MiB >= 0, got '",
              text, "'");
  return static_cast<int64_t>(mib) << 20;
}

template <typename T>
void atomic_add(T* address, T value) {
  T expected;
  __atomic_load(address, &expected, __ATOMIC_RELAXED);
  T desired = expected + value;
  while (!__atomic_compare_exchange(address, &expected, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    desired = expected + value;
  }
}

int64_t grain(const CopeLocateSizes& s) {
  const int64_t per_query = std::max<int64_t>(1, s.heads * 2 * s.levels * s.channels * s.points);
  return std::max<int64_t>(1, kGrainPoints / per_query);
}

// Calls unit(CopeUnit) for every head and axis of queries [begin, end).
template <typename Fn>
void for_units(int64_t begin, int64_t end, const CopeLocateSizes& s, Fn unit) {
  for (int64_t nq = begin; nq < end; ++nq) {
    for (int64_t m = 0; m < s.heads; ++m) {
      for (int axis = 0; axis < 2; ++axis) unit(CopeUnit{nq, nq / s.queries, m, axis});
    }
  }
}

void check_cpu(const at::Tensor& offsets, const char* name) {
  TORCH_CHECK(offsets.device().is_cpu(), name, ": the CPU kernel got inputs on ", offsets.device());
}

at::Tensor cope_locate_cpu(at::TensorList edges, const at::Tensor& ref, const at::Tensor& offsets,
                           const at::Tensor& mix) {
  auto lines = contiguous_lines(edges);
  const auto s = check_cope_locate_inputs(lines, ref, offsets, mix);
  check_cpu(offsets, "cope_locate");
  auto output = at::empty(offsets.sizes(), offsets.options());  // every entry is written
  if (output.numel() == 0) return output;
  const auto rf = ref.contiguous(), u = offsets.contiguous(), mx = mix.contiguous();
  AT_DISPATCH_FLOATING_TYPES(offsets.scalar_type(), "cope_locate_cpu", [&] {
    const auto e = line_pointers<const scalar_t>(lines);
    const scalar_t *ref_p = rf.const_data_ptr<scalar_t>(), *offsets_p = u.const_data_ptr<scalar_t>();
    const scalar_t* mix_p = mx.const_data_ptr<scalar_t>();
    scalar_t* out_p = output.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.queries, grain(s), [&](int64_t begin, int64_t end) {
      for_units(begin, end, s, [&](const CopeUnit& unit) {
        cope_locate_unit(e, ref_p, offsets_p, mix_p, out_p, s, unit);
      });
    });
  });
  return output;
}

CopeGrads cope_locate_backward_cpu(
    const at::Tensor& grad_output, at::TensorList edges, const at::Tensor& ref, const at::Tensor& offsets,
    const at::Tensor& mix) {
  auto lines = contiguous_lines(edges);
  const auto s = check_cope_locate_inputs(lines, ref, offsets, mix);
  check_cope_locate_grad(grad_output, offsets);
  check_cpu(offsets, "cope_locate_backward");
  auto grads = allocate_cope_grads(lines, ref, offsets, mix);
  if (offsets.numel() == 0) return grads;
  auto& grad_edges = std::get<0>(grads);  // (named references: lambdas cannot capture structured bindings in C++17)
  auto &grad_ref = std::get<1>(grads), &grad_offsets = std::get<2>(grads), &grad_mix = std::get<3>(grads);
  const auto g = grad_output.contiguous(), rf = ref.contiguous(), u = offsets.contiguous(), mx = mix.contiguous();
  int64_t total = 0;  // entries of all line tensors
  for (const auto& t : lines) total += t.numel();
  const int64_t threads = at::get_num_threads();
  const int64_t limit = scratch_bytes();  // read (and checked) on every call
  const bool private_sums = threads > 1 && threads * total * offsets.element_size() <= limit;
  // (threads, total): thread t's copy of every line tensor's gradient, laid end to end
  const auto scratch = private_sums ? at::zeros({threads, total}, offsets.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(offsets.scalar_type(), "cope_locate_backward_cpu", [&] {
    const auto e = line_pointers<const scalar_t>(lines);
    std::vector<CopeLines<scalar_t>> g_e(private_sums ? threads : 1, line_pointers<scalar_t>(grad_edges));
    if (private_sums) {
      for (int64_t t = 0; t < threads; ++t) {
        scalar_t* row = scratch.data_ptr<scalar_t>() + t * total;
        for (size_t i = 0; i < lines.size(); row += lines[i].numel(), ++i) g_e[t].data[i] = row;
      }
    }
    const scalar_t *grad_p = g.const_data_ptr<scalar_t>(), *ref_p = rf.const_data_ptr<scalar_t>();
    const scalar_t *offsets_p = u.const_data_ptr<scalar_t>(), *mix_p = mx.const_data_ptr<scalar_t>();
    scalar_t *g_ref = grad_ref.data_ptr<scalar_t>(), *g_offsets = grad_offsets.data_ptr<scalar_t>();
    scalar_t* g_mix = grad_mix.data_ptr<scalar_t>();
    const auto add = [](scalar_t* address, scalar_t value) { *address += value; };
    at::parallel_for(0, s.batch * s.queries, grain(s), [&](int64_t begin, int64_t end) {
      if (private_sums || threads == 1) {  // this thread's own copy (the only one with one thread)
        const auto& mine = g_e[private_sums ? at::get_thread_num() : 0];
        for_units(begin, end, s, [&](const CopeUnit& unit) {
          cope_locate_unit_backward(grad_p, e, ref_p, offsets_p, mix_p, mine, g_ref, g_offsets, g_mix, s, unit, add,
                                    add);
        });
      } else {
        for_units(begin, end, s, [&](const CopeUnit& unit) {
          cope_locate_unit_backward(grad_p, e, ref_p, offsets_p, mix_p, g_e[0], g_ref, g_offsets, g_mix, s, unit,
                                    atomic_add<scalar_t>, add);
        });
      }
    });
  });
  if (private_sums) {  // each line tensor's gradient is the sum of the threads' copies, written in place
    int64_t start = 0;
    for (auto& t : grad_edges) {
      at::sum_out(t, scratch.narrow(1, start, t.numel()).view({threads, t.size(0), t.size(1)}), 0);
      start += t.numel();
    }
  }
  return grads;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(deformable, CPU, m) {
  m.impl("cope_locate", &cpu::cope_locate_cpu);
  m.impl("cope_locate_backward", &cpu::cope_locate_backward_cpu);
}

}  // namespace deformable

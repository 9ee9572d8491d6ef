// Shared declarations of the multi-scale deformable attention op: sizes and input validation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace deformable {

// Sizes of one ms_deform_attn call, named as in the original: value (N, S, M, D),
// sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P).
struct MSDASizes {
  int64_t batch;     // N
  int64_t spatial;   // S = sum over levels of H_l * W_l
  int64_t heads;     // M
  int64_t channels;  // D, channels per head
  int64_t queries;   // Lq
  int64_t levels;    // L
  int64_t points;    // P
};

// Checks ranks, shapes, dtypes and devices of the op's inputs and that spatial_shapes and
// level_start_index describe S (reads those two small tensors on the host). Every failure is a
// c10::Error whose message names the argument and the problem.
MSDASizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// Additionally checks grad_output against the sizes (shape (N, Lq, M*D), value's dtype and device).
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const MSDASizes& sizes);

}  // namespace deformable

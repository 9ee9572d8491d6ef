// Input validation of deformable::cope_locate (the schema is declared with the other ops in ms_deform_attn.cpp).

#include "cope_locate.h"

#include <c10/util/Exception.h>

#include <utility>

namespace deformable {

CopeLocateSizes check_cope_locate_inputs(const at::Tensor& edges, const at::Tensor& lines, const at::Tensor& ref,
                                         const at::Tensor& offsets, const at::Tensor& mix) {
  TORCH_CHECK(edges.dim() == 2 && edges.size(1) >= 2,
              "cope_locate: edges must have shape (Lines, W + 1) with W >= 1, got ", edges.sizes());
  TORCH_CHECK(lines.dim() == 2, "cope_locate: lines must have shape (B, R), got ", lines.sizes());
  TORCH_CHECK(mix.sizes() == lines.sizes(), "cope_locate: mix has shape ", mix.sizes(), " but lines has ",
              lines.sizes(), "; both must be (B, R)");
  TORCH_CHECK(ref.dim() == 1 && ref.size(0) == lines.size(0), "cope_locate: ref must have shape (B,) = (",
              lines.size(0), ",), got ", ref.sizes());
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == lines.size(0), "cope_locate: offsets must have shape (B, P) with B = ",
              lines.size(0), ", got ", offsets.sizes());
  const auto dtype = edges.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "cope_locate: edges must be float32 or float64, got ",
              dtype);
  TORCH_CHECK(lines.scalar_type() == at::kLong, "cope_locate: lines must be int64, got ", lines.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"ref", ref}, {"offsets", offsets},
                                {"mix", mix}}) {
    TORCH_CHECK(t.scalar_type() == dtype, "cope_locate: ", name, " must have the dtype of edges (", dtype, "), got ",
                t.scalar_type());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"lines", lines}, {"ref", ref},
                                {"offsets", offsets}, {"mix", mix}}) {
    TORCH_CHECK(t.device() == edges.device(), "cope_locate: ", name, " is on ", t.device(), " but edges is on ",
                edges.device(), "; all inputs must be on the same device");
  }
  return {edges.size(0), edges.size(1) - 1, lines.size(0), lines.size(1), offsets.size(1)};
}

void check_cope_locate_grad(const at::Tensor& grad_output, const at::Tensor& edges, const CopeLocateSizes& s) {
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == s.rows && grad_output.size(1) == s.points,
              "cope_locate_backward: grad_output must have shape (B, P) = (", s.rows, ", ", s.points, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == edges.scalar_type(), "cope_locate_backward: grad_output dtype ",
              grad_output.scalar_type(), " does not match edges dtype ", edges.scalar_type());
  TORCH_CHECK(grad_output.device() == edges.device(), "cope_locate_backward: grad_output is on ",
              grad_output.device(), " but edges is on ", edges.device());
}

}  // namespace deformable

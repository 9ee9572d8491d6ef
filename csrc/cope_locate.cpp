// Input validation of deformable::cope_locate (the schema is declared with the other ops in ms_deform_attn.cpp).

#include "cope_locate.h"

#include <c10/util/Exception.h>

#include <utility>

namespace deformable {

CopeLocateSizes check_cope_locate_inputs(const std::vector<at::Tensor>& edges, const at::Tensor& ref,
                                         const at::Tensor& offsets, const at::Tensor& mix) {
  TORCH_CHECK(offsets.dim() == 6 && offsets.size(5) == 2,
              "cope_locate: offsets must have shape (N, Lq, M, L, P, 2), got ", offsets.sizes());
  CopeLocateSizes s{};
  s.batch = offsets.size(0);
  s.queries = offsets.size(1);
  s.heads = offsets.size(2);
  s.levels = offsets.size(3);
  s.points = offsets.size(4);
  TORCH_CHECK(s.levels >= 1 && s.levels <= kCopeMaxLevels, "cope_locate: the kernels take 1 to ", kCopeMaxLevels,
              " levels, got offsets with L = ", s.levels);
  TORCH_CHECK(ref.dim() == 4 && ref.size(0) == s.batch && ref.size(1) == s.queries && ref.size(2) == s.levels &&
                  (ref.size(3) == 2 || ref.size(3) == 4),
              "cope_locate: reference points must have shape (N, Lq, L, 2|4) = (", s.batch, ", ", s.queries, ", ",
              s.levels, ", 2|4) to match offsets ", offsets.sizes(), ", got ", ref.sizes());
  s.ref_dim = ref.size(3);
  TORCH_CHECK(mix.dim() == 5 && mix.size(0) == s.batch && mix.size(1) == s.queries && mix.size(2) == s.heads &&
                  mix.size(3) == 2 && mix.size(4) >= 1,
              "cope_locate: mix must have shape (N, Lq, M, 2, R) = (", s.batch, ", ", s.queries, ", ", s.heads,
              ", 2, R) to match offsets ", offsets.sizes(), ", got ", mix.sizes());
  s.channels = mix.size(4);
  TORCH_CHECK(static_cast<int64_t>(edges.size()) == 2 * s.levels, "cope_locate: edges must hold 2 * L = ",
              2 * s.levels, " line tensors (x then y per level), got ", edges.size());
  const auto dtype = offsets.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "cope_locate: offsets must be float32 or float64, got ",
              dtype);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"reference points", ref}, {"mix", mix}}) {
    TORCH_CHECK(t.scalar_type() == dtype, "cope_locate: ", name, " must have the dtype of offsets (", dtype, "), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == offsets.device(), "cope_locate: ", name, " is on ", t.device(),
                " but offsets is on ", offsets.device(), "; all inputs must be on the same device");
  }
  for (int64_t i = 0; i < 2 * s.levels; ++i) {
    const auto& e = edges[i];
    TORCH_CHECK(e.dim() == 2 && e.size(1) >= 2, "cope_locate: edges[", i, "] must have shape (lines, S + 1) with S >= 1, got ",
                e.sizes());
    TORCH_CHECK(e.scalar_type() == dtype, "cope_locate: edges[", i, "] must have the dtype of offsets (", dtype,
                "), got ", e.scalar_type());
    TORCH_CHECK(e.device() == offsets.device(), "cope_locate: edges[", i, "] is on ", e.device(),
                " but offsets is on ", offsets.device(), "; all inputs must be on the same device");
    s.length[i] = e.size(1) - 1;
  }
  for (int64_t l = 0; l < s.levels; ++l) {
    for (int64_t a = 0; a < 2; ++a) {
      // Every line a reference can read exists: its index is clamped to [0, lines - 1] in the kernels.
      const int64_t expected = s.batch * s.length[2 * l + 1 - a] * s.heads * s.channels;
      TORCH_CHECK(edges[2 * l + a].size(0) == expected, "cope_locate: edges[", 2 * l + a, "] (level ", l,
                  a == 0 ? ", x" : ", y", ") must have N * ", a == 0 ? "H" : "W", " * M * R = ", s.batch, " * ",
                  s.length[2 * l + 1 - a], " * ", s.heads, " * ", s.channels, " = ", expected, " lines, got ",
                  edges[2 * l + a].size(0));
    }
  }
  return s;
}

void check_cope_locate_grad(const at::Tensor& grad_output, const at::Tensor& offsets) {
  TORCH_CHECK(grad_output.sizes() == offsets.sizes(), "cope_locate_backward: grad_output must have the shape of the ",
              "locations ", offsets.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == offsets.scalar_type(), "cope_locate_backward: grad_output dtype ",
              grad_output.scalar_type(), " does not match offsets dtype ", offsets.scalar_type());
  TORCH_CHECK(grad_output.device() == offsets.device(), "cope_locate_backward: grad_output is on ",
              grad_output.device(), " but offsets is on ", offsets.device());
}

}  // namespace deformable

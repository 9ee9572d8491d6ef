// Schemas of the deformable ops (declared once, here) and the input validation of ms_deform_attn (cope_locate's is
// in cope_locate.cpp).
// Kernels live in cpu/ and cuda/ and register themselves with TORCH_LIBRARY_IMPL.

#include "ms_deform_attn.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/_to_copy.h>
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace deformable {

namespace {

at::ScalarType coordinate_dtype(at::ScalarType value_dtype) {
  return at::toOpMathType(value_dtype);  // float for half/bfloat16/float, double for double
}

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

}  // namespace

MSDASizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must have shape (N, S, M, D), got ", value.dim(),
              " dims with shape ", shape_str(value));
  TORCH_CHECK(sampling_locations.dim() == 6,
              "ms_deform_attn: sampling_locations must have shape (N, Lq, M, L, P, 2), got shape ",
              shape_str(sampling_locations));
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must have shape (N, Lq, M, L, P), got shape ",
              shape_str(attention_weights));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must have shape (L, 2) with rows (H, W), got shape ",
              shape_str(spatial_shapes));
  TORCH_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must have shape (L,), got shape ",
              shape_str(level_start_index));

  TORCH_CHECK(at::isFloatingType(value.scalar_type()), "ms_deform_attn: value must be a floating-point tensor, got ",
              value.scalar_type());
  const auto coord = coordinate_dtype(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == coord, "ms_deform_attn: sampling_locations must be ", coord,
              " for value of dtype ", value.scalar_type(), ", got ", sampling_locations.scalar_type(),
              " (deformable.ms_deform_attn casts automatically)");
  TORCH_CHECK(attention_weights.scalar_type() == coord, "ms_deform_attn: attention_weights must be ", coord,
              " for value of dtype ", value.scalar_type(), ", got ", attention_weights.scalar_type(),
              " (deformable.ms_deform_attn casts automatically)");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());

  const auto device = value.device();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"spatial_shapes", spatial_shapes},
                                {"level_start_index", level_start_index},
                                {"sampling_locations", sampling_locations},
                                {"attention_weights", attention_weights}}) {
    TORCH_CHECK(t.device() == device, "ms_deform_attn: ", name, " is on ", t.device(), " but value is on ", device,
                "; all inputs must be on the same device");
  }

  MSDASizes s{};
  s.batch = value.size(0);
  s.spatial = value.size(1);
  s.heads = value.size(2);
  s.channels = value.size(3);
  s.queries = sampling_locations.size(1);
  s.levels = spatial_shapes.size(0);
  s.points = sampling_locations.size(4);

  TORCH_CHECK(s.levels > 0, "ms_deform_attn: spatial_shapes must describe at least one level");
  TORCH_CHECK(level_start_index.size(0) == s.levels, "ms_deform_attn: level_start_index has ",
              level_start_index.size(0), " entries but spatial_shapes describes ", s.levels, " levels");
  TORCH_CHECK(sampling_locations.size(0) == s.batch, "ms_deform_attn: sampling_locations batch size ",
              sampling_locations.size(0), " does not match value batch size ", s.batch);
  TORCH_CHECK(sampling_locations.size(2) == s.heads, "ms_deform_attn: sampling_locations has ",
              sampling_locations.size(2), " heads but value has ", s.heads);
  TORCH_CHECK(sampling_locations.size(3) == s.levels, "ms_deform_attn: sampling_locations has ",
              sampling_locations.size(3), " levels but spatial_shapes describes ", s.levels);
  TORCH_CHECK(sampling_locations.size(5) == 2, "ms_deform_attn: the last dimension of sampling_locations must be 2 (x, y), got ",
              sampling_locations.size(5));
  const std::vector<int64_t> expected_weights{s.batch, s.queries, s.heads, s.levels, s.points};
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef(expected_weights), "ms_deform_attn: attention_weights has shape ",
              shape_str(attention_weights), " but sampling_locations ", shape_str(sampling_locations),
              " requires (N, Lq, M, L, P) = ", at::IntArrayRef(expected_weights));

  // spatial_shapes / level_start_index are tiny: validate their values on the host.
  const auto shapes = spatial_shapes.to(at::kCPU).contiguous();
  const auto starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < s.levels; ++l) {
    const int64_t h = sh[2 * l], w = sh[2 * l + 1];
    TORCH_CHECK(h >= 0 && w >= 0, "ms_deform_attn: spatial_shapes[", l, "] = (", h, ", ", w,
                ") has a negative size");
    TORCH_CHECK(st[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " is inconsistent with spatial_shapes (expected ", total, ")");
    total += h * w;
  }
  TORCH_CHECK(total == s.spatial, "ms_deform_attn: spatial_shapes sum to ", total,
              " positions (sum of H*W) but value has S = ", s.spatial, " positions");
  return s;
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const MSDASizes& s) {
  const std::vector<int64_t> expected{s.batch, s.queries, s.heads * s.channels};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "ms_deform_attn_backward: grad_output has shape ",
              shape_str(grad_output), ", expected ", at::IntArrayRef(expected));
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn_backward: grad_output dtype ",
              grad_output.scalar_type(), " does not match value dtype ", value.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output is on ",
              grad_output.device(), " but value is on ", value.device());
}

namespace {

std::string build_info() {
#ifdef WITH_CUDA
  return std::string("cpu;cuda archs=") + DEFORMABLE_CUDA_ARCHS;
#else
  return "cpu";
#endif
}

}  // namespace

TORCH_LIBRARY(deformable, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
  m.def("cope_locate(Tensor[] edges, Tensor ref, Tensor offsets, Tensor mix) -> Tensor");
  m.def(
      "cope_locate_backward(Tensor grad_output, Tensor[] edges, Tensor ref, Tensor offsets, Tensor mix) -> "
      "(Tensor[], Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

}  // namespace deformable

// An importable (empty) Python module: importing deformable._C loads this library, which runs the
// TORCH_LIBRARY registrations above. No pybind11 bindings.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

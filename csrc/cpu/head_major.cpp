// The head-major layout of the CPU kernels (see head_major.h): the copy, its scratch memory and the spatial order.

#include "head_major.h"

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace deformable {
namespace cpu {

// Many queries per map position (encoder self-attention) rather than few (decoder): the kernels then work one
// head's map at a time, in a head-major copy, and visit queries in spatial_order.
bool many_queries(const MSDASizes& s) { return s.queries * s.levels * s.points >= s.spatial; }

// The visiting order of the (N * Lq) query rows when queries are many: column strips kStrip pixels wide of the
// first level, top to bottom within a strip, by where each query's first sampling point (head 0, level 0,
// point 0) lies. Consecutive queries then gather from a band of value rows about kStrip positions wide on every
// level instead of bands spanning whole map rows (the kernels wait on these gathers far more than they
// compute). Outputs do not depend on the order in the forward (each row is computed on its own, bit-identical
// to visiting rows in order); in the backward it fixes the order of the grad_value sums, whatever the threads.
template <typename opmath_t>
std::vector<int64_t> spatial_order(const opmath_t* locations, const MSDASizes& s, const int64_t* spatial_shapes) {
  constexpr int64_t kStrip = 64;
  const int64_t height = std::max<int64_t>(spatial_shapes[0], 1);  // an empty first level: any order is as good
  const int64_t width = std::max<int64_t>(spatial_shapes[1], 1);
  const int64_t rows = s.batch * s.queries;
  const int64_t stride = s.heads * s.levels * s.points * 2;
  const int64_t strips = std::max<int64_t>(1, (width + kStrip - 1) / kStrip);
  const int64_t keys = s.batch * strips * height;
  std::vector<int64_t> key(rows), order(rows);
  for (int64_t row = 0; row < rows; ++row) {
    opmath_t x = locations[row * stride], y = locations[row * stride + 1];
    x = std::isfinite(x) ? std::min(std::max(x, opmath_t(0)), opmath_t(1)) : opmath_t(0);
    y = std::isfinite(y) ? std::min(std::max(y, opmath_t(0)), opmath_t(1)) : opmath_t(0);
    const int64_t column = std::min<int64_t>(width - 1, static_cast<int64_t>(x * width));
    const int64_t line = std::min<int64_t>(height - 1, static_cast<int64_t>(y * height));
    key[row] = ((row / s.queries) * strips + column / kStrip) * height + line;
  }
  if (keys > 4 * rows + 1024) {  // sparse keys (a tall first level): a comparison sort
    for (int64_t row = 0; row < rows; ++row) order[row] = row;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
    return order;
  }
  // A counting sort: the same stable order as sorting by key, in linear time (this runs before the parallel
  // part of each call).
  std::vector<int64_t> next(keys + 1, 0);
  for (int64_t row = 0; row < rows; ++row) ++next[key[row] + 1];
  for (int64_t k = 0; k < keys; ++k) next[k + 1] += next[k];
  for (int64_t row = 0; row < rows; ++row) order[next[key[row]]++] = row;
  return order;
}

namespace {

// Scratch memory that a calling thread keeps between calls, one buffer per use. The head-major copies are
// tens of MB; fresh allocations that size are new pages from the OS on every call (glibc maps blocks over
// 32 MB directly), and their page faults cost more than the copy itself on a VM. Kept until the thread
// exits; each buffer grows to the largest call's size.
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(data_); }

  void* get(size_t bytes) {
    constexpr size_t kAlign = 64;
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    if (bytes > capacity_) {
      std::free(data_);
      capacity_ = 0;
      data_ = std::aligned_alloc(kAlign, bytes);
      TORCH_CHECK(data_ != nullptr, "ms_deform_attn: could not allocate ", bytes, " bytes of CPU scratch memory");
      capacity_ = bytes;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

// An uninitialised tensor over this thread's scratch buffer `which`: valid until the thread's next call that
// uses the same buffer, so it must not leave the op.
at::Tensor scratch_tensor(Scratch which, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local ScratchBuffer buffers[2];
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  return at::from_blob(buffers[static_cast<int>(which)].get(bytes), sizes, options);
}

}  // namespace

// dst[n] = src[n] with dims 1 and 2 swapped, for each n: (N, A, B, D) -> (N, B, A, D). Both must have D
// contiguous. Same dtype: one memcpy per D-row, in parallel over src's (n, a), reading src in order (a little
// faster than ATen's strided copy here). Otherwise (a dtype conversion) ATen's copy, one batch element at a time:
// on the 4-d tensor the strided copy picks a slower loop order.
void copy_swapping_dims_1_2(const at::Tensor& dst, const at::Tensor& src) {
  const int64_t A = src.size(1), B = src.size(2), D = src.size(3);
  if (dst.scalar_type() != src.scalar_type() || src.stride(3) != 1 || dst.stride(3) != 1) {
    for (int64_t n = 0; n < src.size(0); ++n) dst[n].copy_(src[n].transpose(0, 1));
    return;
  }
  const int64_t item = src.element_size();
  char* to = static_cast<char*>(dst.data_ptr());
  const char* from = static_cast<const char*>(src.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, B * D * item));
  at::parallel_for(0, src.size(0) * A, grain, [&](int64_t begin, int64_t end) {
    for (int64_t na = begin; na < end; ++na) {
      const int64_t n = na / A, a = na % A;
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(to + (n * dst.stride(0) + b * dst.stride(1) + a * dst.stride(2)) * item,
                    from + (n * src.stride(0) + a * src.stride(1) + b * src.stride(2)) * item, D * item);
      }
    }
  });
}

// A head-major scratch tensor (N, M, S + 1, D) for value of shape (N, S, M, D), of dtype `options`, uninitialised.
at::Tensor head_major_scratch(Scratch which, const at::Tensor& value, const at::TensorOptions& options) {
  return scratch_tensor(which, {value.size(0), value.size(2), value.size(1) + 1, value.size(3)}, options);
}

// The first S rows of each head of a head-major tensor (N, M, S + 1, D): (N, M, S, D).
at::Tensor without_zero_rows(const at::Tensor& head_major) {
  return head_major.narrow(2, 0, head_major.size(2) - 1);
}

// value (N, S, M, D) as a head-major (N, M, S + 1, D) tensor in this thread's scratch memory, row S of every
// head zeros (see Inputs::head_major).
at::Tensor head_major_copy(const at::Tensor& value) {
  auto copy = head_major_scratch(Scratch::kValue, value, value.options());
  copy_swapping_dims_1_2(without_zero_rows(copy), value);
  copy.select(2, value.size(1)).zero_();
  return copy;
}

template std::vector<int64_t> spatial_order<float>(const float*, const MSDASizes&, const int64_t*);
template std::vector<int64_t> spatial_order<double>(const double*, const MSDASizes&, const int64_t*);

}  // namespace cpu
}  // namespace deformable

// MatrixView: a non-owning, row-major window on memory in one memory space.
// The space is part of the type, so handing a host view to a device backend
// (or the reverse) does not compile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <ostream>
#include <type_traits>
#include <utility>

#include "lora/core/error.hpp"

#if defined(__CUDACC__)
#define LORA_HOST_DEVICE __host__ __device__
#else
#define LORA_HOST_DEVICE
#endif

namespace lora {

// Memory spaces. The CUDA backend adds its own tag (lora::cuda::DeviceSpace).
struct HostSpace {};

// rows x cols, element (i, j) at data[i * stride + j]; stride >= cols.
// A view is a plain aggregate of four numbers; every public entry point of the
// library checks the views it is given (check_view) before it touches memory.
template <class T, class Space = HostSpace>
struct MatrixView {
  using value_type = T;
  using space = Space;

  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t stride = 0;

  constexpr MatrixView() = default;
  constexpr MatrixView(T* data_, std::int64_t rows_, std::int64_t cols_)
      : data(data_), rows(rows_), cols(cols_), stride(cols_) {}
  constexpr MatrixView(T* data_, std::int64_t rows_, std::int64_t cols_, std::int64_t stride_)
      : data(data_), rows(rows_), cols(cols_), stride(stride_) {}

  // A view of T converts to a view of const T in the same space, never the reverse.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr MatrixView(const MatrixView<U, Space>& other)  // NOLINT(google-explicit-constructor)
      : data(other.data), rows(other.rows), cols(other.cols), stride(other.stride) {}

  constexpr bool empty() const { return data == nullptr || rows == 0 || cols == 0; }
  constexpr std::int64_t size() const { return rows * cols; }
  constexpr bool contiguous() const { return stride == cols; }

  // Host-side element access (only meaningful for HostSpace).
  LORA_HOST_DEVICE T& operator()(std::int64_t i, std::int64_t j) const { return data[i * stride + j]; }

  // Rows [begin, begin + count) as a view with the same stride.
  MatrixView row_block(std::int64_t begin, std::int64_t count) const {
    LORA_CHECK(begin >= 0 && count >= 0 && begin <= rows && count <= rows - begin,
               "row_block(begin " << begin << ", count " << count << ") outside a matrix of " << rows << " rows");
    return MatrixView(data + begin * stride, count, cols, stride);
  }
  // Columns [begin, begin + count) as a view with the same stride.
  MatrixView col_block(std::int64_t begin, std::int64_t count) const {
    LORA_CHECK(begin >= 0 && count >= 0 && begin <= cols && count <= cols - begin,
               "col_block(begin " << begin << ", count " << count << ") outside a matrix of " << cols << " columns");
    return MatrixView(data + begin, rows, count, stride);
  }
};

template <class T, class Space = HostSpace>
using ConstMatrixView = MatrixView<const T, Space>;

namespace detail {
// What a check's message starts with: "call: name", or "name" alone.
struct ArgName {
  const char* call;
  const char* name;
};
inline std::ostream& operator<<(std::ostream& out, const ArgName& arg) {
  if (arg.call != nullptr) out << arg.call << ": ";
  return out << arg.name;
}
}  // namespace detail

// Checks that `view` describes memory it could address, before anything reads
// it: rows, cols >= 0; stride >= cols; data set unless the view is empty; and
// its extent, (rows - 1) stride + cols elements, within std::ptrdiff_t bytes,
// so that no index computed from it overflows. `name` and `call` name the
// argument: "Linear::forward: x: stride 3 is smaller than cols 4".
template <class T, class Space>
void check_view(const MatrixView<T, Space>& view, const char* name, const char* call = nullptr) {
  const detail::ArgName arg{call, name};
  LORA_CHECK(view.rows >= 0 && view.cols >= 0,
             arg << ": shape [" << view.rows << ", " << view.cols << "] has a negative size");
  LORA_CHECK(view.stride >= view.cols,
             arg << ": stride " << view.stride << " is smaller than cols " << view.cols << " (rows would overlap)");
  if (view.rows == 0 || view.cols == 0) return;
  LORA_CHECK(view.data != nullptr,
             arg << ": null data for a non-empty [" << view.rows << ", " << view.cols << "] matrix");
  // (rows - 1) stride + cols <= max, without forming the product.
  constexpr auto max_elements = static_cast<std::int64_t>(std::numeric_limits<std::ptrdiff_t>::max() / sizeof(T));
  LORA_CHECK(view.cols <= max_elements && view.rows - 1 <= (max_elements - view.cols) / view.stride,
             arg << ": [" << view.rows << ", " << view.cols << "] with stride " << view.stride << " spans more than "
                 << max_elements << " elements (the extent overflows)");
}

// Checks that `view` is rows x cols and a valid view (check_view), naming the
// argument when it is not: "Linear::backward: dL_dy: expected shape [8, 16], found [8, 15]".
template <class T, class Space>
void check_shape(const MatrixView<T, Space>& view, std::int64_t rows, std::int64_t cols, const char* name,
                 const char* call = nullptr) {
  const detail::ArgName arg{call, name};
  LORA_CHECK(view.rows == rows && view.cols == cols,
             arg << ": expected shape [" << rows << ", " << cols << "], found [" << view.rows << ", " << view.cols
                 << "]");
  check_view(view, name, call);
}

// True when views a and b share a byte. Exact for strided views: two column
// blocks of one buffer (x and y side by side in one activation matrix)
// interleave row by row without overlapping. Both views must be valid
// (check_view); the cost is one step per row of the shorter view, and only when
// their address ranges intersect at all.
template <class T, class U, class Space>
bool overlaps(const MatrixView<T, Space>& a, const MatrixView<U, Space>& b) {
  if (a.rows == 0 || a.cols == 0 || b.rows == 0 || b.cols == 0) return false;
  // Each view in bytes: rows of `width` bytes, `stride` bytes apart, from `begin`.
  struct Rows {
    std::uintptr_t begin, stride, width, rows;
    std::uintptr_t end() const { return begin + (rows - 1) * stride + width; }
  };
  const auto bytes = [](const auto& v) {
    using E = std::remove_pointer_t<decltype(v.data)>;
    return Rows{reinterpret_cast<std::uintptr_t>(v.data), static_cast<std::uintptr_t>(v.stride) * sizeof(E),
                static_cast<std::uintptr_t>(v.cols) * sizeof(E), static_cast<std::uintptr_t>(v.rows)};
  };
  Rows p = bytes(a), q = bytes(b);
  if (p.end() <= q.begin || q.end() <= p.begin) return false;
  if (p.rows > q.rows) std::swap(p, q);
  for (std::uintptr_t i = 0; i < p.rows; ++i) {
    const std::uintptr_t lo = p.begin + i * p.stride, hi = lo + p.width;  // row i of p: [lo, hi)
    // The first row j of q that ends after lo: q.begin + j q.stride + q.width > lo.
    const std::uintptr_t j = lo < q.begin + q.width ? 0 : (lo - q.begin - q.width) / q.stride + 1;
    if (j < q.rows && q.begin + j * q.stride < hi) return true;
  }
  return false;
}

// Outputs never share memory with inputs: the library reads its inputs while
// (or after) it writes its outputs, so y = x or dL_dx = dL_dy would give wrong
// numbers. Throws naming the call and both arguments.
template <class T, class U, class Space>
void check_disjoint(const char* call, const MatrixView<T, Space>& output, const char* output_name,
                    const MatrixView<U, Space>& input, const char* input_name) {
  LORA_CHECK(!overlaps(output, input), call << ": " << output_name << " overlaps " << input_name
                                            << " in memory; an output must not share memory with an input (give "
                                            << output_name << " a buffer of its own)");
}

}  // namespace lora

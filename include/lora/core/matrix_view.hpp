// MatrixView: a non-owning, row-major window on memory in one memory space.
// The space is part of the type, so handing a host view to a device backend
// (or the reverse) does not compile.
#pragma once

#include <cstdint>
#include <type_traits>

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
    LORA_CHECK(begin >= 0 && count >= 0 && begin + count <= rows,
               "row_block [" << begin << ", " << begin + count << ") outside a matrix of " << rows << " rows");
    return MatrixView(data + begin * stride, count, cols, stride);
  }
  // Columns [begin, begin + count) as a view with the same stride.
  MatrixView col_block(std::int64_t begin, std::int64_t count) const {
    LORA_CHECK(begin >= 0 && count >= 0 && begin + count <= cols,
               "col_block [" << begin << ", " << begin + count << ") outside a matrix of " << cols << " columns");
    return MatrixView(data + begin, rows, count, stride);
  }
};

template <class T, class Space = HostSpace>
using ConstMatrixView = MatrixView<const T, Space>;

// Checks that `view` is rows x cols and names the tensor when it is not:
// "dL_dy: expected shape [8, 16], found [8, 15]".
template <class T, class Space>
void check_shape(const MatrixView<T, Space>& view, std::int64_t rows, std::int64_t cols, const char* name) {
  LORA_CHECK(view.rows == rows && view.cols == cols,
             name << ": expected shape [" << rows << ", " << cols << "], found [" << view.rows << ", "
                  << view.cols << "]");
  LORA_CHECK(view.data != nullptr || view.size() == 0, name << ": null data for a non-empty matrix");
  LORA_CHECK(view.stride >= view.cols, name << ": stride " << view.stride << " is smaller than cols " << view.cols);
}

}  // namespace lora

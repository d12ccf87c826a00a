// Owning GPU memory: DeviceBuffer<T> (n elements) and Matrix<T> (rows x cols,
// row-major, contiguous). Both are move-only; a copy is explicit (clone) so
// that a 64 MB weight is never duplicated by accident. Zero-sized buffers
// allocate nothing and are valid.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/cuda/check.cuh"

namespace lora::cuda {

// The memory space of GPU global memory. A MatrixView<T, DeviceSpace> never
// converts to or from a host view, so mixing them up does not compile.
struct DeviceSpace {};

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // count elements, zero-initialised like the CPU backend's matrices. The
  // allocation and the zeroing synchronise with the device, so allocate
  // outside the hot loop (the layer reallocates only when N changes).
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    LORA_CHECK(count <= std::numeric_limits<std::size_t>::max() / sizeof(T),
               "DeviceBuffer: " << count << " elements of " << sizeof(T) << " bytes overflow size_t");
    if (count == 0) return;
    void* ptr = nullptr;
    LORA_CUDA_CHECK(cudaMalloc(&ptr, bytes()));
    data_ = static_cast<T*>(ptr);
    // The default stream (legacy or per-thread) is synchronised so that the
    // zeros are in place before any stream, blocking or not, sees the buffer.
    try {
      LORA_CUDA_CHECK(cudaMemset(data_, 0, bytes()));
      LORA_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    } catch (...) {
      cudaFree(data_);
      throw;
    }
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);  // never throws; cudaFree waits for the device
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { swap(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    DeviceBuffer(std::move(other)).swap(*this);
    return *this;
  }

  // An independent copy, ordered on `stream` (the copy may still be in flight
  // when this returns, like any work on that stream).
  DeviceBuffer clone(cudaStream_t stream) const {
    DeviceBuffer copy(count_);
    if (count_ != 0) {
      LORA_CUDA_CHECK(cudaMemcpyAsync(copy.data_, data_, bytes(), cudaMemcpyDeviceToDevice, stream));
    }
    return copy;
  }
  // An independent copy after all work on the device has finished.
  DeviceBuffer clone() const {
    LORA_CUDA_CHECK(cudaDeviceSynchronize());
    DeviceBuffer copy = clone(nullptr);
    LORA_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    return copy;
  }

  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }
  T* data() { return data_; }
  const T* data() const { return data_; }

  void swap(DeviceBuffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
  }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

// An owning rows x cols row-major matrix in GPU memory: the CUDA backend's
// Matrix<T>, with the interface of lora::cpu::Matrix minus element access
// (read it with Backend::copy_to_host).
template <class T>
class Matrix {
 public:
  Matrix() = default;
  Matrix(std::int64_t rows, std::int64_t cols) : rows_(rows), cols_(cols), buffer_(checked_size(rows, cols)) {}
  Matrix(Matrix&& other) noexcept { swap(other); }
  Matrix& operator=(Matrix&& other) noexcept {
    Matrix(std::move(other)).swap(*this);
    return *this;
  }
  Matrix(const Matrix&) = delete;
  Matrix& operator=(const Matrix&) = delete;

  Matrix clone(cudaStream_t stream) const { return Matrix(rows_, cols_, buffer_.clone(stream)); }
  Matrix clone() const { return Matrix(rows_, cols_, buffer_.clone()); }

  // rows x cols over the storage it has when that holds rows * cols elements
  // (they keep their values in memory order), else over a new allocation: a
  // workspace grows and is reused when N changes, with no cudaMalloc (which
  // synchronises) on the way down. bytes() is the storage's.
  void reshape(std::int64_t rows, std::int64_t cols) {
    const std::size_t need = checked_size(rows, cols);
    if (need > buffer_.size()) buffer_ = DeviceBuffer<T>(need);
    rows_ = rows;
    cols_ = cols;
  }

  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  std::int64_t size() const { return rows_ * cols_; }
  std::size_t bytes() const { return buffer_.bytes(); }
  T* data() { return buffer_.data(); }
  const T* data() const { return buffer_.data(); }

  MatrixView<T, DeviceSpace> view() { return {buffer_.data(), rows_, cols_}; }
  MatrixView<const T, DeviceSpace> view() const { return {buffer_.data(), rows_, cols_}; }

 private:
  Matrix(std::int64_t rows, std::int64_t cols, DeviceBuffer<T>&& buffer)
      : rows_(rows), cols_(cols), buffer_(std::move(buffer)) {}

  void swap(Matrix& other) noexcept {
    std::swap(rows_, other.rows_);
    std::swap(cols_, other.cols_);
    buffer_.swap(other.buffer_);
  }
  static std::size_t checked_size(std::int64_t rows, std::int64_t cols) {
    LORA_CHECK(rows >= 0 && cols >= 0, "matrix shape [" << rows << ", " << cols << "]: expected non-negative sizes");
    LORA_CHECK(cols == 0 || rows <= std::numeric_limits<std::int64_t>::max() / cols,
               "matrix shape [" << rows << ", " << cols << "]: the element count overflows");
    return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
  }

  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  DeviceBuffer<T> buffer_;
};

}  // namespace lora::cuda

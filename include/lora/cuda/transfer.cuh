// Moving matrices, and so adapters, between the CPU and the GPU:
// to_device(ctx, host view) -> cuda::Matrix, to_host(ctx, device view) -> cpu::Matrix.
// Both return when the copy is complete.
#pragma once

#include "lora/core/matrix_view.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/cuda/backend.hpp"

namespace lora::cuda {

template <class T>
Matrix<T> to_device(Context& ctx, MatrixView<const T, HostSpace> host) {
  Matrix<T> device(host.rows, host.cols);
  Backend::copy_from_host(ctx, host, device.view());
  return device;
}

template <class T>
cpu::Matrix<T> to_host(Context& ctx, MatrixView<const T, DeviceSpace> device) {
  cpu::Matrix<T> host(device.rows, device.cols);
  Backend::copy_to_host(ctx, device, host.view());
  return host;
}

}  // namespace lora::cuda

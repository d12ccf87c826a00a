// The CUDA umbrella header: everything <lora/lora.hpp> holds (configuration,
// layer, optimizer, CPU backend) plus the cuBLAS backend. Include it from .cu
// files only (nvcc); link lora::cuda.
#pragma once

#if !defined(__CUDACC__)
#error "<lora/cuda.hpp> holds CUDA kernels: include it from a .cu file compiled by nvcc"
#endif

// The CPU backend's Eigen runs on the host only. Without EIGEN_NO_CUDA, nvcc
// compiles Eigen's __host__ __device__ functions for the GPU too and warns
// about dozens of them (#20012, #20015). A .cu file that wants Eigen in its own
// device code includes Eigen before this header (then this has no effect).
#if !defined(EIGEN_NO_CUDA) && !defined(EIGEN_CORE_H)
#define EIGEN_NO_CUDA
#endif
#include "lora/lora.hpp"

#include "lora/cuda/backend.cuh"
#include "lora/cuda/check.cuh"
#include "lora/cuda/device_buffer.cuh"
#include "lora/cuda/numeric.cuh"
#include "lora/cuda/transfer.cuh"

namespace lora::cuda {
// lora::cuda::Linear<__nv_bfloat16>, lora::cuda::Adam<float>: the layer and
// optimizer on the GPU (A, B and Adam state in fp32 for 16-bit layers).
template <class T>
using Linear = ::lora::Linear<T, Backend>;
template <class P>
using Adam = ::lora::Adam<P, Backend>;
}  // namespace lora::cuda

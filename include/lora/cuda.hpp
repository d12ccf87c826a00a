// The CUDA umbrella header: everything <lora/lora.hpp> holds (configuration,
// layer, optimizer, CPU backend) plus the cuBLAS backend; link lora::cuda.
// From a .cu file (nvcc) it holds the kernels too, as a header-only library.
// From a host .cpp file (g++, clang) it declares the same types and ops
// without kernels, and one .cu file of the program compiles those for all of
// them: `#define LORA_CUDA_IMPLEMENTATION` before including this header there
// (docs/cuda.md).
#pragma once

#if defined(__CUDACC__)
// The CPU backend's Eigen runs on the host only. Without EIGEN_NO_CUDA, nvcc
// compiles Eigen's __host__ __device__ functions for the GPU too and warns
// about dozens of them (#20012, #20015). A .cu file that wants Eigen in its own
// device code includes Eigen before this header (then this has no effect).
#if !defined(EIGEN_NO_CUDA) && !defined(EIGEN_CORE_H)
#define EIGEN_NO_CUDA
#endif
#elif defined(LORA_CUDA_IMPLEMENTATION)
#error "LORA_CUDA_IMPLEMENTATION compiles the CUDA kernels: define it in a .cu file compiled by nvcc"
#endif

#include "lora/lora.hpp"

#include "lora/base/nf4.hpp"

#include "lora/cuda/backend.hpp"
#include "lora/cuda/check.cuh"
#include "lora/cuda/device_buffer.cuh"
#include "lora/cuda/numeric.cuh"
#include "lora/cuda/transfer.cuh"
#if defined(__CUDACC__)
#include "lora/cuda/backend.cuh"
#endif

namespace lora::cuda {
// lora::cuda::Linear<__nv_bfloat16>, lora::cuda::Adam<float>, ...: the parts
// on the GPU (A, B and Adam state in fp32 for 16-bit layers).
template <class T>
using DenseBase = ::lora::DenseBase<T, Backend>;
template <class T>
using Nf4Base = ::lora::Nf4Base<T, Backend>;  // the 4-bit NF4 frozen base (QLoRA)
template <class T>
using LoraAdapter = ::lora::LoraAdapter<T, Backend>;
template <class T>
using AdapterSet = ::lora::AdapterSet<T, Backend>;
template <class T>
using Linear = ::lora::Linear<T, Backend>;
template <class P>
using Adam = ::lora::Adam<P, Backend>;
}  // namespace lora::cuda

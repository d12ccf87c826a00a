// The CUDA backend's kernels for test_cuda_host, whose other files are host
// C++: the one .cu file such a program needs (docs/cuda.md).
#define LORA_CUDA_IMPLEMENTATION
#include "lora/cuda.hpp"

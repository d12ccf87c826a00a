// The CUDA test files as one nvcc translation unit (test_cuda): nvcc has no
// precompiled headers, and each file alone re-parses GoogleTest, Eigen and the
// library and re-instantiates the same kernels (seven units: 618 s of compile
// on one core; this one: 176 s). Every header the files use is included here
// first, so their own #includes are no-ops; each file then sits in a namespace
// of its own, so helpers with the same name in two files stay apart. A new
// test_cuda_*.cu file is added below (its headers above, if new).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../io_test_util.hpp"
#include "cuda/cuda_test_util.cuh"
#include "cuda/ops_parity.cuh"
#include "lora/io/cuda_dtypes.hpp"
#include "lora/io/model_reader.hpp"

namespace backend_tests {
#include "test_cuda_backend.cu"
}
namespace linear_tests {
#include "test_cuda_linear.cu"
}
namespace model_tests {
#include "test_cuda_model.cu"
}
namespace model_reader_tests {
#include "test_cuda_model_reader.cu"
}
namespace nf4_tests {
#include "test_cuda_nf4.cu"
}
namespace dora_tests {
#include "test_cuda_dora.cu"
}
namespace pissa_tests {
#include "test_cuda_pissa.cu"
}

// Every operation below the model, on the GPU and on the CPU, same inputs,
// as ggml's test-backend-ops: a dense base over a read-only W, one adapter
// with an explicit forward state (dropout on: the counter RNG draws the same
// masks on both backends), inference, a tied layer's two forwards then two
// backwards, an adapter set with a weighted active set, a mixed batch in
// training (a contiguous group, gathered groups, base-only rows) and its
// backward, the same over 1, 3 and 17 adapters of ranks 1 to 64,
// combine, merge and unmerge (tests/cuda/backend_ops.hpp runs each
// op on either backend). The GPU runs in fp32 (TF32 off), bf16 and fp16;
// every output agrees with the CPU's to ||gpu - cpu|| / ||cpu|| <= 1e-5 in
// fp32 and <= 2e-2 in 16 bits, and every output a GPU op writes is NaN-poisoned
// first. The model's own operations are in test_cuda_model_host.cpp.
#include <gtest/gtest.h>

#include <type_traits>
#include <vector>

#include "cuda/ops_parity.cuh"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using namespace lora::backend_ops;    // NOLINT(google-build-using-namespace)
using bf16 = __nv_bfloat16;
using half = __half;
using CpuBackend = lora::cpu::Backend;
using GpuBackend = lora::cuda::Backend;

template <class T>
class CudaModelOps : public CudaTest {
 protected:
  OpInputs in_ = make_inputs<T>();
  lora::cpu::Context cpu_;
};
using OpTypes = ::testing::Types<float, bf16, half>;
TYPED_TEST_SUITE(CudaModelOps, OpTypes);

TYPED_TEST(CudaModelOps, DenseBaseOverReadOnlyW) {
  using T = TypeParam;
  for (bool fan_in_fan_out : {false, true}) {
    SCOPED_TRACE(fan_in_fan_out ? "fan_in_fan_out" : "W: d_out x d_in");
    const Outputs gpu = run_dense_base<T, GpuBackend>(this->ctx(), this->in_, fan_in_fan_out);
    expect_parity(run_dense_base<float, CpuBackend>(this->cpu_, this->in_, fan_in_fan_out), gpu,
                  parity_tolerance<T>());
    EXPECT_EQ(*find_output(gpu, "add_delta refused"), std::vector<float>{1.0f});
  }
}

TYPED_TEST(CudaModelOps, AdapterWithExplicitStateAndATiedLayer) {
  using T = TypeParam;
  for (double dropout : {0.0, 0.3}) {
    SCOPED_TRACE(::testing::Message() << "dropout " << dropout);
    const Outputs gpu = run_adapter<T, GpuBackend>(this->ctx(), this->in_, dropout);
    expect_parity(run_adapter<float, CpuBackend>(this->cpu_, this->in_, dropout), gpu, parity_tolerance<T>());
    // Two forwards then two backwards give the sum of both steps' gradients,
    // on the GPU too (fp32 gradients: only the order of one addition differs).
    expect_close(gpu, "tied dL_dA", "separate dL_dA sum", 1e-5);
    expect_close(gpu, "tied dL_dB", "separate dL_dB sum", 1e-5);
    EXPECT_EQ(*find_output(gpu, "dropout calls"), std::vector<float>{3.0f});
  }
}

TYPED_TEST(CudaModelOps, AdapterSetWithAWeightedActiveSet) {
  using T = TypeParam;
  const Outputs gpu = run_set_weighted<T, GpuBackend>(this->ctx(), this->in_, 0.3);
  expect_parity(run_set_weighted<float, CpuBackend>(this->cpu_, this->in_, 0.3), gpu, parity_tolerance<T>());
}

TYPED_TEST(CudaModelOps, AdapterSetMixedBatchTraining) {
  using T = TypeParam;
  for (double dropout : {0.0, 0.3}) {
    SCOPED_TRACE(::testing::Message() << "dropout " << dropout);
    const Outputs gpu = run_set_mixed<T, GpuBackend>(this->ctx(), this->in_, dropout);
    expect_parity(run_set_mixed<float, CpuBackend>(this->cpu_, this->in_, dropout), gpu, parity_tolerance<T>());
  }
}

// 1, 3 and 17 adapters of different ranks (1 and 64 among them) in one batch:
// the grouped GEMMs (one launch per product kind) against the CPU's loop.
TYPED_TEST(CudaModelOps, AdapterSetMixedBatchOfManyAdapters) {
  using T = TypeParam;
  for (int count : {1, 3, 17}) {
    for (double dropout : {0.0, 0.3}) {
      SCOPED_TRACE(::testing::Message() << count << " adapters, dropout " << dropout);
      const Outputs gpu = run_set_mixed_many<T, GpuBackend>(this->ctx(), this->in_, count, dropout);
      expect_parity(run_set_mixed_many<float, CpuBackend>(this->cpu_, this->in_, count, dropout), gpu,
                    parity_tolerance<T>());
    }
  }
}

TYPED_TEST(CudaModelOps, AdapterSetCombineMergeUnmerge) {
  using T = TypeParam;
  const double tol = parity_tolerance<T>();
  const Outputs gpu = run_set_combine_merge<T, GpuBackend>(this->ctx(), this->in_);
  expect_parity(run_set_combine_merge<float, CpuBackend>(this->cpu_, this->in_), gpu, tol);
  // On the GPU alone: the combined adapter is the weighted activation, merged
  // or not, and unmerging gives W back up to one rounding of T per element.
  expect_close(gpu, "y (combined)", "y (weighted a, b)", tol);
  expect_close(gpu, "y (merged)", "y (combined)", tol);
  const double w_tol = std::is_same_v<T, float> ? 1e-6 : 1e-2;
  EXPECT_LE(rel_err(*find_output(gpu, "W unmerged"), this->in_.W), w_tol);
}

}  // namespace

// lora::Model on the GPU and on the CPU, same inputs (tests/cuda/model_ops.hpp):
// a PeftConfig attaches adapters (target_modules, rank_pattern,
// alpha_pattern, dropout), every adapted module trains a step through an
// explicit state, parameters() names the tensors as PEFT does, one AdamW step
// updates them, the memory report counts the optimizer, and merge writes
// every adapted W. Tolerances as test_cuda_model.cu's.
//
// A host .cpp, compiled by the C++ compiler: <lora/model.hpp> brings RE2,
// whose header nvcc cannot compile, so a trainer's model code on CUDA lives
// in host files like this one, with the CUDA types declared there and their
// kernels compiled in a .cu file of the same program.
#include <gtest/gtest.h>

#include <string>
#include <type_traits>
#include <vector>

#include "cuda/ops_parity.cuh"
// (after the CUDA header, as ops_parity.cuh explains)
#include "cuda/model_ops.hpp"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using namespace lora::backend_ops;    // NOLINT(google-build-using-namespace)

template <class T>
class CudaModel : public CudaTest {};
using ModelTypes = ::testing::Types<float, __nv_bfloat16, __half>;
TYPED_TEST_SUITE(CudaModel, ModelTypes);

TYPED_TEST(CudaModel, PeftConfigTrainingStepAndMergeMatchTheCpu) {
  using T = TypeParam;
  const OpInputs in = make_inputs<T>();
  lora::cpu::Context cpu_ctx;
  const ModelRun cpu = run_model<float, lora::cpu::Backend>(cpu_ctx, in);
  const ModelRun gpu = run_model<T, lora::cuda::Backend>(this->ctx(), in);

  // PEFT's list rule (a name equals an entry or ends with "." + entry), in model order;
  // the read-only lm_head and k_proj are not adapted.
  const std::vector<std::string> expected = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                             "model.layers.0.mlp.down_proj"};
  EXPECT_EQ(gpu.selected, expected);
  std::vector<std::string> names;
  for (const std::string& m : expected) {
    for (const char* ab : {"lora_A", "lora_B"}) names.push_back("base_model.model." + m + "." + ab + ".default.weight");
  }
  EXPECT_EQ(gpu.parameter_names, names);
  EXPECT_EQ(gpu.parameter_names, cpu.parameter_names);

  expect_parity(cpu.outputs, gpu.outputs, parity_tolerance<T>());
  // Adam holds two fp32 moments per trainable element, whatever T is.
  EXPECT_EQ(*find_output(gpu.outputs, "optimizer bytes"), *find_output(gpu.outputs, "8 x trainable parameters"));
  // Merging changes the output by rounding only; the modules without the
  // adapter (k_proj, and lm_head, read-only) keep their W bit for bit.
  expect_close(gpu.outputs, "q_proj y (merged)", "q_proj y (trained)", parity_tolerance<T>());
  EXPECT_EQ(*find_output(gpu.outputs, "model.layers.0.self_attn.k_proj W merged"), in.W);
  EXPECT_EQ(*find_output(gpu.outputs, "lm_head W merged"), in.W);
}

}  // namespace

// The CPU umbrella header: configuration, the LoRA layer and adapter sets,
// Adam/AdamW, the Eigen backend and adapter files (safetensors, PEFT,
// checkpoints). It never includes CUDA headers (for those, <lora/cuda.hpp>
// from .cu files).
#pragma once

#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/parameter.hpp"
#include "lora/core/random.hpp"
#include "lora/core/version.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/io/checkpoint.hpp"
#include "lora/io/peft.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/layers/adapter_set.hpp"
#include "lora/layers/linear.hpp"
#include "lora/optim/adam.hpp"

namespace lora::cpu {
// lora::cpu::Linear<float>, lora::cpu::Adam<float>: the layer and optimizer on the CPU.
template <class T>
using Linear = ::lora::Linear<T, Backend>;
template <class P>
using Adam = ::lora::Adam<P, Backend>;
}  // namespace lora::cpu

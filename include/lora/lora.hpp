// The CPU umbrella header: configuration, the LoRA layer and adapter sets,
// Adam/AdamW, learning-rate schedules and the Eigen backend. Files
// (safetensors, PEFT, checkpoints) are <lora/io.hpp>, which brings JSON, RE2
// and <filesystem>; CUDA is <lora/cuda.hpp> from .cu files. Neither is
// included here.
#pragma once

#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/parameter.hpp"
#include "lora/core/random.hpp"
#include "lora/core/version.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/layers/adapter_set.hpp"
#include "lora/layers/linear.hpp"
#include "lora/optim/adam.hpp"
#include "lora/optim/scheduler.hpp"

namespace lora::cpu {
// lora::cpu::Linear<float>, lora::cpu::Adam<float>: the layer and optimizer on the CPU.
template <class T>
using Linear = ::lora::Linear<T, Backend>;
template <class P>
using Adam = ::lora::Adam<P, Backend>;
}  // namespace lora::cpu

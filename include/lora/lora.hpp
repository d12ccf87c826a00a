// The CPU umbrella header: configuration, the three parts of a LoRA layer
// (a frozen base, base/dense.hpp or the 4-bit base/nf4.hpp; an adapter,
// adapters/lora.hpp; several adapters over one base, layers/adapter_set.hpp;
// lora::Linear, one of each),
// Adam/AdamW, learning-rate schedules and the Eigen backend. Files
// (safetensors, PEFT, checkpoints) are <lora/io.hpp>, which brings JSON, RE2
// and <filesystem>; a whole adapted model is <lora/model.hpp> (it needs the
// files); CUDA is <lora/cuda.hpp>. None of them is included here.
#pragma once

#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/parameter.hpp"
#include "lora/core/random.hpp"
#include "lora/core/version.hpp"
#include "lora/adapters/init.hpp"
#include "lora/adapters/lora.hpp"
#include "lora/base/dense.hpp"
#include "lora/base/nf4.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/layers/adapter_set.hpp"
#include "lora/layers/linear.hpp"
#include "lora/optim/adam.hpp"
#include "lora/optim/scheduler.hpp"

namespace lora::cpu {
// lora::cpu::Linear<float>, lora::cpu::Adam<float>, ...: the parts on the CPU.
template <class T>
using DenseBase = ::lora::DenseBase<T, Backend>;
template <class T>
using Nf4Base = ::lora::Nf4Base<T, Backend>;
template <class T>
using LoraAdapter = ::lora::LoraAdapter<T, Backend>;
template <class T>
using AdapterSet = ::lora::AdapterSet<T, Backend>;
template <class T>
using Linear = ::lora::Linear<T, Backend>;
template <class P>
using Adam = ::lora::Adam<P, Backend>;
}  // namespace lora::cpu

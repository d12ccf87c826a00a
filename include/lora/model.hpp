// The model-level umbrella header: everything of <lora/lora.hpp> and
// <lora/io.hpp>, plus lora::Model (a frozen model's named weights and the
// adapters PEFT's LoraConfig attaches to them). Brings JSON, RE2 and
// <filesystem>, as <lora/io.hpp> does.
#pragma once

#include "lora/io.hpp"
#include "lora/lora.hpp"
#include "lora/model/model.hpp"

namespace lora::cpu {
// lora::cpu::Model<float>: a model on the CPU.
template <class T>
using Model = ::lora::Model<T, Backend>;
}  // namespace lora::cpu

// The files umbrella header: safetensors, PEFT adapter directories, training
// checkpoints, model readers and NF4 weights (lora::io), on top of <lora/lora.hpp>. Host code only:
// it brings nlohmann-json, RE2 and <filesystem>, which CUDA translation units
// need not (and, for RE2, nvcc cannot) compile.
#pragma once

#include "lora/lora.hpp"
#include "lora/io/checkpoint.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_adapter.hpp"
#include "lora/io/init_conversion.hpp"
#include "lora/io/model_reader.hpp"
#include "lora/io/nf4.hpp"
#include "lora/io/peft.hpp"
#include "lora/io/safetensors.hpp"

// The library's version, kept equal to project(VERSION) in CMakeLists.txt.
#pragma once

#define LORA_VERSION_MAJOR 0
#define LORA_VERSION_MINOR 1
#define LORA_VERSION_PATCH 0

namespace lora {
inline constexpr const char* kVersion = "0.1.0";
}  // namespace lora

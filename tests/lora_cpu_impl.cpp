// The CPU backend's Eigen GEMM, compiled once for the whole test suite: every
// test translation unit has LORA_CPU_EXTERN_TEMPLATES (tests/CMakeLists.txt)
// and links this one, as a program of many files would (cpu/backend.hpp).
#define LORA_CPU_IMPLEMENTATION
#include "lora/lora.hpp"

// The three steps bench_paired times, as made by one revision of the library
// (bench/paired_steps.cpp). bench_paired links one revision, the source tree's;
// bench_ab (bench/ab.sh) links two, each compiled under its own namespace.
#pragma once

#include <cstdint>
#include <functional>

namespace paired {

struct Steps {
  std::function<void()> floor;    // the two frozen GEMMs alone (bench::FrozenGemms); empty if not asked for
  std::function<void()> lora;     // a LoRA training step (bench::LoraWorkload)
  std::function<void()> dropout;  // the same with lora_dropout 0.1
};

}  // namespace paired

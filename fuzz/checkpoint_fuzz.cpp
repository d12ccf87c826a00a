// libFuzzer target for load_checkpoint: the safetensors header, the
// checkpoint's metadata (numbers, counts, learning rates) and its tensors.
//
// Every input must either be refused with a lora::Error that changes nothing
// (the layers' A and B, the moments, the step and skip counts, the learning
// rates and the dropout positions stay bit for bit as they were), or be
// restored completely, in which case saving the state again and loading that
// gives the same state. Anything else (a crash, a sanitizer report, another
// exception type escaping, a hang, a half-restored state) is a finding.
// Built and run by fuzz/run.sh; its seed is the checkpoint of the fixed
// training state below, written into the corpus by LLVMFuzzerInitialize when
// LORA_FUZZ_WRITE_SEED names a file.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

#include "lora/io.hpp"

namespace {

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "checkpoint_fuzz: %s\n", what);
  std::abort();
}

// Two layers (5 -> 4 at r = 2 with dropout, 4 -> 3 at r = 1) and AdamW with
// B in a group of its own, after two training steps: every tensor non-zero.
struct Run {
  lora::cpu::Context ctx;
  std::vector<float> W1 = values(4 * 5, 0.3f), W2 = values(3 * 4, 0.7f);
  lora::cpu::Linear<float> l1{ctx, {W1.data(), 4, 5}, {}, config(2, 0.25), 0};
  lora::cpu::Linear<float> l2{ctx, {W2.data(), 3, 4}, {}, config(1, 0.0), 1};
  lora::cpu::Adam<float> adam{ctx, lora::AdamOptions::adamw(1e-2, 0.01)};

  static std::vector<float> values(std::size_t n, float phase) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = 0.5f * static_cast<float>(i % 7) - phase;
    return v;
  }
  static lora::Config config(int r, double dropout) {
    lora::Config c;
    c.r = r;
    c.alpha = 2.0 * r;
    c.dropout = dropout;
    return c;
  }
  Run() {
    adam.add_group({l1.lora_A(), l2.lora_A()});
    adam.add_group({l1.lora_B(), l2.lora_B()}, 4e-2);
    std::vector<float> x = values(3 * 5, 0.1f), h(3 * 4), y(3 * 3), dL_dh(3 * 4);
    for (int step = 0; step < 2; ++step) {
      l1.forward({x.data(), 3, 5}, {h.data(), 3, 4});
      l2.forward({h.data(), 3, 4}, {y.data(), 3, 3});
      l2.backward({h.data(), 3, 4}, {y.data(), 3, 3}, {dL_dh.data(), 3, 4});  // loss 0.5 ||y||^2
      l1.backward({x.data(), 3, 5}, {dL_dh.data(), 3, 4}, {});
      adam.step();
    }
  }
  std::vector<lora::io::NamedLayer<float, lora::cpu::Backend>> layers() { return {{"l1", &l1}, {"l2", &l2}}; }

  // Every bit a restore writes, as bytes.
  std::vector<std::uint8_t> state() {
    std::vector<std::uint8_t> out;
    const auto append = [&](const void* p, std::size_t n) {
      out.insert(out.end(), static_cast<const std::uint8_t*>(p), static_cast<const std::uint8_t*>(p) + n);
    };
    const auto view = [&](lora::MatrixView<const float> v) { append(v.data, static_cast<std::size_t>(v.size()) * 4); };
    for (lora::cpu::Linear<float>* l : {&l1, &l2}) {
      view(l->A());
      view(l->B());
      const std::uint32_t calls = l->dropout_calls();
      append(&calls, sizeof calls);
    }
    for (auto& m : adam.moments()) {
      view(m.m);
      view(m.v);
    }
    const std::int64_t counts[2] = {adam.step_count(), adam.skipped_steps()};
    const double lrs[2] = {adam.lr(0), adam.lr(1)};
    append(counts, sizeof counts);
    append(lrs, sizeof lrs);
    return out;
  }
  std::vector<std::uint8_t> checkpoint() { return lora::io::checkpoint_writer(layers(), adam).to_bytes(); }
  void load(std::vector<std::uint8_t> bytes, const char* source) {
    lora::io::load_checkpoint(lora::io::SafetensorsReader::from_memory(std::move(bytes), source), layers(), adam);
  }
};

Run& run() {
  static Run r;
  return r;
}
const std::vector<std::uint8_t>& baseline() {
  static const std::vector<std::uint8_t> bytes = run().checkpoint();
  return bytes;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* path = std::getenv("LORA_FUZZ_WRITE_SEED")) {
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(baseline().data()), static_cast<std::streamsize>(baseline().size()));
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Run& r = run();
  r.load(baseline(), "baseline");  // every input starts from the same state
  const std::vector<std::uint8_t> before = r.state();
  try {
    r.load(std::vector<std::uint8_t>(data, data + size), "fuzz");
  } catch (const lora::Error&) {
    if (r.state() != before) finding("a refused checkpoint changed the state");
    return 0;
  }
  try {
    const std::vector<std::uint8_t> restored = r.state();
    r.load(r.checkpoint(), "fuzz-again");
    if (r.state() != restored) finding("saving a restored state and loading it again changed it");
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "checkpoint_fuzz: %s\n", e.what());
    finding("a restored state failed to save or load again");
  }
  return 0;
}

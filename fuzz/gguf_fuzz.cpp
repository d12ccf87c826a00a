// libFuzzer target for lora::io::GgufReader and the llama.cpp adapter reader.
// Every input must either be rejected with a lora::Error or be read
// completely; an accepted file must write back (GgufWriter) to bytes that read
// again to the same metadata and tensors, and its adapter reading must give an
// Adapter or a lora::Error. Anything else (a crash, a sanitizer report, another
// exception type, a round trip that changes something, a hang) is a finding.
// Its seed, a llama adapter of two modules, is written by LLVMFuzzerInitialize
// when LORA_FUZZ_WRITE_SEED names a file. Built and run by fuzz/run.sh.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "lora/io/gguf_adapter.hpp"

namespace {

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "gguf_fuzz: %s\n", what);
  std::abort();
}

std::vector<std::uint8_t> seed() {
  lora::io::Adapter a;
  a.config.r = 2;
  a.config.lora_alpha = 4;
  for (const char* name : {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}) {
    lora::io::AdapterModule m;
    m.r = 2;
    m.alpha = 4;
    m.scale = 2;
    m.A = lora::cpu::Matrix<float>(2, 3);
    m.B = lora::cpu::Matrix<float>(4, 2);
    for (std::int64_t i = 0; i < m.A.size(); ++i) m.A.data()[i] = 0.25f * static_cast<float>(i + 1);
    for (std::int64_t i = 0; i < m.B.size(); ++i) m.B.data()[i] = -0.5f * static_cast<float>(i + 1);
    a.modules.emplace(name, std::move(m));
  }
  lora::io::GgufAdapterOptions options;
  options.architecture = "llama";
  options.dtype = lora::io::Dtype::F16;
  options.heads = {1, 1};
  return lora::io::gguf_adapter(a, options).to_bytes();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* path = std::getenv("LORA_FUZZ_WRITE_SEED")) {
    const std::vector<std::uint8_t> bytes = seed();
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  bool accepted = false;
  try {
    const lora::io::GgufReader reader = lora::io::GgufReader::from_memory(std::vector<std::uint8_t>(data, data + size), "fuzz");
    accepted = true;  // from here on, nothing may throw: the file was validated
    lora::io::GgufWriter writer;
    for (const auto& [key, value] : reader.metadata()) writer.set(key, value);
    for (const lora::io::GgufTensorInfo& t : reader.tensors()) {
      const lora::io::RawTensor raw = reader.read_raw(t.name);
      if (raw.bytes.size() != t.bytes()) finding("size mismatch");
      if (lora::io::is_floating(t.dtype) && reader.read<double>(t.name).size() != t.numel) finding("element count mismatch");
      writer.add_raw(t.name, raw);
    }
    const lora::io::GgufReader again = lora::io::GgufReader::from_memory(writer.to_bytes(), "fuzz-again");
    if (again.metadata() != reader.metadata()) finding("metadata changed in a round trip");
    if (again.tensors().size() != reader.tensors().size()) finding("tensor count changed in a round trip");
    for (const lora::io::GgufTensorInfo& t : reader.tensors())
      if (again.read_raw(t.name).bytes != reader.read_raw(t.name).bytes || again.info(t.name).shape != t.shape)
        finding("a tensor changed in a round trip");
    accepted = false;  // the adapter reader may refuse a valid GGUF that is no adapter
    (void)lora::io::adapter_from_gguf(reader, {1, 1});
  } catch (const lora::Error&) {
    if (accepted) finding("an accepted file did not write back");
  }
  return 0;
}

// libFuzzer target for the JSON readers and the PEFT loader:
//
//   input "I<text>"                  <text> is a model.safetensors.index.json (parse_safetensors_index)
//   input "M<index>\0<safetensors>"  a sharded model (ModelReader::from_memory): every shard the
//                                    index names holds the bytes <safetensors>
//   input "<config>\0<safetensors>"  an adapter directory's two files (load_peft_from_memory);
//                                    without a NUL, the whole input is the config and the weights are empty
//
// Every input must either be rejected with a lora::Error or be read completely.
// An adapter that was read must save (to memory, as F32) and load again to the
// same modules, values bit for bit (DoRA magnitudes included), and the same config; an index that was
// read must print and parse again to the same weight_map; every floating tensor
// of a model that was read must read the same as a copy and as load(). Anything else - a
// crash, a sanitizer report, another exception type escaping, a hang - is a
// finding. Built and run by fuzz/run.sh; seeds in fuzz/corpus_peft.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "lora/io/model_reader.hpp"
#include "lora/io/peft.hpp"

namespace {

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "peft_fuzz: %s\n", what);
  std::abort();
}

bool same_values(const lora::cpu::Matrix<float>& a, const lora::cpu::Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0);
}

void index_round_trip(const std::string& text) {
  lora::io::SafetensorsIndex index;
  try {
    index = lora::io::parse_safetensors_index(text, "fuzz-index");
  } catch (const lora::Error&) {
    return;  // rejected: fine
  }
  try {
    const lora::io::SafetensorsIndex again = lora::io::parse_safetensors_index(index.json.dump(2), "fuzz-index-again");
    if (again.weight_map != index.weight_map) finding("printing the index and parsing it again changed its weight_map");
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "peft_fuzz: %s\n", e.what());
    finding("an accepted index failed to parse again");
  }
}

void model_read_all(const std::string& index, const std::vector<std::uint8_t>& shard) {
  std::map<std::string, std::vector<std::uint8_t>> shards;
  try {
    for (const auto& [tensor, file] : lora::io::parse_safetensors_index(index, "fuzz-model").weight_map) shards[file] = shard;
  } catch (const lora::Error&) {
    return;  // (the index alone is fuzzed by "I" inputs)
  }
  std::optional<lora::io::ModelReader> model;
  try {
    model.emplace(lora::io::ModelReader::from_memory(index, shards, "fuzz-model"));
  } catch (const lora::Error&) {
    return;  // rejected: fine
  }
  try {
    for (const std::string& name : model->names()) {
      const lora::io::TensorInfo& t = model->info(name);
      if (!lora::io::is_floating(t.dtype) || t.shape.size() != 2) continue;
      const lora::cpu::Matrix<float> copy = model->read_matrix<float>(name);
      const lora::io::HostTensor<float> loaded = model->load<float>(name);
      const std::size_t bytes = static_cast<std::size_t>(copy.size()) * sizeof(float);
      if (loaded.view().rows != copy.rows() || loaded.view().cols != copy.cols() ||
          (bytes != 0 && std::memcmp(loaded.view().data, copy.data(), bytes) != 0))
        finding("load() and read_matrix() of a tensor differ");
      if (loaded.borrowed() && loaded.view().data != model->view<float>(name).data)
        finding("a borrowed tensor does not point where view() does");
    }
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "peft_fuzz: %s\n", e.what());
    finding("an accepted model failed to hand out a tensor");
  }
}

void adapter_round_trip(const std::string& config, std::vector<std::uint8_t> weights) {
  lora::io::Adapter adapter;
  try {
    adapter = lora::io::load_peft_from_memory(config, std::move(weights), "fuzz");
  } catch (const lora::Error&) {
    return;  // rejected: fine
  }
  try {
    for (const auto& [name, m] : adapter.modules) {
      if (m.A.rows() != m.r || m.B.cols() != m.r || m.r != adapter.config.rank_for(name))
        finding("a loaded module's shapes disagree with its rank");
      if (m.dora() != adapter.config.use_dora || (m.dora() && (m.magnitude.rows() != 1 || m.magnitude.cols() != m.d_out())))
        finding("a loaded module's DoRA magnitude disagrees with use_dora or with d_out");
      (void)adapter.config.layer_config(name);
    }
    const std::vector<std::uint8_t> saved = lora::io::detail::peft_weights(adapter, lora::io::Dtype::F32).to_bytes();
    const lora::io::Adapter again = lora::io::load_peft_from_memory(adapter.config.to_json_text(), saved, "fuzz-again");
    if (again.modules.size() != adapter.modules.size() || again.other_tensors.size() != adapter.other_tensors.size())
      finding("the round trip changed the module or tensor count");
    for (const auto& [name, m] : adapter.modules) {
      const auto it = again.modules.find(name);
      if (it == again.modules.end() || !same_values(m.A, it->second.A) || !same_values(m.B, it->second.B) ||
          !same_values(m.magnitude, it->second.magnitude) || it->second.scale != m.scale)
        finding("the round trip changed a module");
    }
    for (const auto& [key, t] : adapter.other_tensors) {
      const auto it = again.other_tensors.find(key);
      if (it == again.other_tensors.end() || it->second.bytes != t.bytes || it->second.shape != t.shape)
        finding("the round trip changed a non-LoRA tensor");
    }
    if (again.config.to_json_text() != adapter.config.to_json_text()) finding("the round trip changed the config");
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "peft_fuzz: %s\n", e.what());
    finding("an accepted adapter failed to save or load again");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* text = reinterpret_cast<const char*>(data);
  if (size > 0 && data[0] == 'I') {
    index_round_trip(std::string(text + 1, size - 1));
    return 0;
  }
  const void* nul = std::memchr(data, '\0', size);
  if (size > 0 && data[0] == 'M') {
    const std::size_t end = nul ? static_cast<std::size_t>(static_cast<const std::uint8_t*>(nul) - data) : size;
    model_read_all(std::string(text + 1, end - 1),
                   nul ? std::vector<std::uint8_t>(data + end + 1, data + size) : std::vector<std::uint8_t>());
    return 0;
  }
  const std::size_t split = nul ? static_cast<std::size_t>(static_cast<const std::uint8_t*>(nul) - data) : size;
  adapter_round_trip(std::string(text, split),
                     nul ? std::vector<std::uint8_t>(data + split + 1, data + size) : std::vector<std::uint8_t>());
  return 0;
}

// libFuzzer target for lora::io::SafetensorsReader. Every input must either be
// rejected with a lora::Error or be read completely; a file that was read must
// write back and read again to the same tensors and metadata. Anything else -
// a crash, a sanitizer report, another exception type escaping, a round trip
// that changes something, a hang - is a finding. Built and run by fuzz/run.sh.
// An accepted file's NF4 weights (io/nf4.hpp) must each load or be rejected with
// a lora::Error; one that loads must dequantize and write back to the same weight.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "lora/io/nf4.hpp"
#include "lora/io/safetensors.hpp"

namespace {

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "safetensors_fuzz: %s\n", what);
  std::abort();
}

// Reads everything the reader offers, in every form.
void read_all(const lora::io::SafetensorsReader& reader) {
  for (const lora::io::TensorInfo& t : reader.tensors()) {
    const std::vector<std::uint8_t> bytes = reader.read_bytes(t.name);
    if (bytes.size() != t.bytes() || t.bytes() != t.numel * lora::io::dtype_size(t.dtype)) finding("size mismatch");
    if (!lora::io::is_floating(t.dtype)) continue;
    if (reader.read<float>(t.name).size() != t.numel || reader.read<double>(t.name).size() != t.numel)
      finding("element count mismatch");
    if (t.shape.size() == 2) {
      std::vector<float> m(static_cast<std::size_t>(t.numel));
      reader.read_into(t.name, lora::MatrixView<float>(m.data(), t.shape[0], t.shape[1]));
    }
  }
}

// Every NF4 weight of an accepted file: rejected with a lora::Error, or loaded,
// dequantized, and written and read back to the same bytes and statistics.
void load_nf4_weights(const lora::io::SafetensorsReader& reader) {
  std::vector<std::string> names;
  try {
    names = lora::io::nf4_weight_names(reader);
  } catch (const lora::Error&) {
    return;  // an FP4 weight: refused
  }
  for (const std::string& name : names) {
    lora::nf4::Weight w;
    try {
      w = lora::io::load_nf4_weight(reader, name);
    } catch (const lora::Error&) {
      continue;
    }
    if (w.numel() <= (std::int64_t{1} << 20)) (void)lora::nf4::dequantize<float>(w);
    lora::io::SafetensorsWriter writer;
    lora::io::add_nf4_weight(writer, name, w);
    const lora::nf4::Weight again =
        lora::io::load_nf4_weight(lora::io::SafetensorsReader::from_memory(writer.to_bytes(), "fuzz-nf4"), name);
    if (again.packed != w.packed || again.absmax_q != w.absmax_q || again.rows != w.rows || again.cols != w.cols ||
        again.absmax.size() != w.absmax.size() || again.nested_absmax.size() != w.nested_absmax.size())
      finding("an NF4 weight changed in a round trip");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::uint8_t> input(data, data + size);
  bool accepted = false;
  try {
    const lora::io::SafetensorsReader reader = lora::io::SafetensorsReader::from_memory(std::move(input), "fuzz");
    accepted = true;  // from here on, nothing may throw: the file was validated
    read_all(reader);
    load_nf4_weights(reader);
    // A file that was accepted must write back: nothing the reader accepts may be unwritable.
    lora::io::SafetensorsWriter writer;
    for (const auto& [key, value] : reader.metadata()) writer.set_metadata(key, value);
    for (const lora::io::TensorInfo& t : reader.tensors()) writer.add_raw(t.name, reader.read_raw(t.name));
    const std::vector<std::uint8_t> rewritten = writer.to_bytes();
    const lora::io::SafetensorsReader again = lora::io::SafetensorsReader::from_memory(rewritten, "fuzz-rewritten");
    if (again.metadata() != reader.metadata() || again.tensors().size() != reader.tensors().size())
      finding("the round trip changed the metadata or the tensor count");
    for (const lora::io::TensorInfo& t : reader.tensors()) {
      const lora::io::TensorInfo& u = again.info(t.name);
      if (u.dtype != t.dtype || u.shape != t.shape || again.read_bytes(t.name) != reader.read_bytes(t.name))
        finding("the round trip changed a tensor");
    }
    // Our own output is canonical: writing it again gives the same bytes.
    lora::io::SafetensorsWriter canonical;
    for (const auto& [key, value] : again.metadata()) canonical.set_metadata(key, value);
    for (const lora::io::TensorInfo& t : again.tensors()) canonical.add_raw(t.name, again.read_raw(t.name));
    if (canonical.to_bytes() != rewritten) finding("writing our own output again changed its bytes");
  } catch (const lora::Error& e) {
    if (accepted) {  // a rejected input is fine; an accepted one that fails later is not
      std::fprintf(stderr, "safetensors_fuzz: an accepted file failed later: %s\n", e.what());
      finding("lora::Error after validation");
    }
  }
  return 0;
}

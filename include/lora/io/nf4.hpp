// NF4 weights in safetensors files, named and typed as transformers +
// bitsandbytes write a 4-bit model, and the quantization_config of its config.json.
//
// For a weight tensor W (e.g. "model.layers.0.self_attn.q_proj.weight") of
// shape [rows, cols], n = rows * cols values, blocks = ceil(n / blocksize):
//
//   W                                    U8  [(n + 1) / 2, 1]  packed 4-bit indices, first value high nibble
//   W.absmax                             F32 [blocks]          (or U8 [blocks] with double quantization)
//   W.quant_map                          F32 [16]              the NF4 code values
//   W.nested_absmax                      F32 [ceil(blocks / nested_blocksize)]   double quantization only
//   W.nested_quant_map                   F32 [256]             the 8-bit dynamic code, double quantization only
//   W.quant_state.bitsandbytes__nf4      U8  [len]             UTF-8 JSON of the rest:
//     {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [rows, cols],
//      "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0123}
//
// Facts this follows (bitsandbytes-foundation/bitsandbytes, huggingface/transformers):
//   - Linear4bit._save_to_state_dict stores every item of
//     weight.quant_state.as_dict(packed=True) under prefix + "weight." + key.
//   - QuantState.as_dict puts the tensors absmax, quant_map (the code) and, when
//     nested, nested_absmax, nested_quant_map; every other item goes into one
//     tensor "quant_state.bitsandbytes__" + quant_type, made by
//     pack_dict_to_tensor: json.dumps(dict) (Python's default ", " and ": "
//     separators, floats in repr form) encoded as UTF-8, a 1-D uint8 tensor.
//     The JSON keys, in as_dict's order: quant_type, blocksize, dtype (the torch
//     dtype's name without "torch."), shape (a list), and when nested
//     nested_blocksize, nested_dtype, nested_offset (offset.item(), a float).
//   - QuantState.from_dict accepts exactly one such quant_state tensor, ending
//     in bitsandbytes__nf4 or bitsandbytes__fp4, and only the known keys.
//   - quantize_4bit returns the packed tensor as [(n + 1) / 2, 1] of the
//     quant_storage dtype (uint8 by default) and fp32 absmax [blocks]; with
//     compress_statistics the absmax values minus their mean are quantized by
//     quantize_blockwise(blocksize=256) with the dynamic code: U8 absmax,
//     fp32 nested absmax, fp32 code of 256 values, state2.dtype float32.
//   - BitsAndBytesConfig.to_dict writes its fields into config.json's
//     "quantization_config" with the torch dtypes as their names after
//     "torch." (bnb_4bit_compute_dtype, bnb_4bit_quant_storage).
//
// The format itself (how the nibbles and codes dequantize) is in
// <lora/quant/nf4.hpp>; what is accepted and refused is listed in docs/io.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "lora/core/error.hpp"
#include "lora/io/json.hpp"
#include "lora/io/model_reader.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/quant/nf4.hpp"

namespace lora::io {

// The companions of an NF4 weight W are W + "." + these.
inline constexpr const char* kNf4Absmax = "absmax";
inline constexpr const char* kNf4QuantMap = "quant_map";
inline constexpr const char* kNf4NestedAbsmax = "nested_absmax";
inline constexpr const char* kNf4NestedQuantMap = "nested_quant_map";
inline constexpr const char* kNf4QuantState = "quant_state.bitsandbytes__nf4";
// What bitsandbytes writes for its other 4-bit type, which is refused here.
inline constexpr const char* kFp4QuantState = "quant_state.bitsandbytes__fp4";
// The quant state's JSON may not exceed this many bytes (bitsandbytes' is about 200).
inline constexpr std::uint64_t kMaxNf4StateBytes = 1 << 16;

namespace detail {

// The one safetensors file of a reader that holds `name`: the reader itself,
// or the shard of a model.
inline const SafetensorsReader& file_holding(const SafetensorsReader& file, const std::string&) { return file; }
inline const SafetensorsReader& file_holding(const ModelReader& model, const std::string& name) {
  return model.shard_of(name);
}

inline bool ends_with_suffix(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

inline std::vector<std::string> reader_names(const ModelReader& model) { return model.names(); }
inline std::vector<std::string> reader_names(const SafetensorsReader& file) {
  std::vector<std::string> out;
  for (const TensorInfo& t : file.tensors()) out.push_back(t.name);
  std::sort(out.begin(), out.end());
  return out;
}

// The weight names W of every tensor named W + "." + state in `reader`.
template <class Reader>
std::vector<std::string> weights_with_state(const Reader& reader, const std::string& state) {
  std::vector<std::string> out;
  const std::string suffix = "." + state;
  for (const std::string& name : reader_names(reader))
    if (ends_with_suffix(name, suffix)) out.push_back(name.substr(0, name.size() - suffix.size()));
  return out;
}

}  // namespace detail

// The torch dtype names a quant state (and --dtype) uses for the three types an
// NF4 weight dequantizes to: F32 "float32", BF16 "bfloat16", F16 "float16";
// nullptr / nullopt for anything else.
inline const char* nf4_dtype_name(Dtype d) {
  return d == Dtype::F32 ? "float32" : d == Dtype::BF16 ? "bfloat16" : d == Dtype::F16 ? "float16" : nullptr;
}
inline std::optional<Dtype> nf4_dtype_from_name(const std::string& name) {
  for (const Dtype d : {Dtype::F32, Dtype::BF16, Dtype::F16})
    if (name == nf4_dtype_name(d)) return d;
  return std::nullopt;
}

// True when `name` is an NF4 weight: `name`.quant_state.bitsandbytes__nf4 is in the file.
template <class Reader>
bool is_nf4_weight(const Reader& reader, const std::string& name) {
  return reader.contains(name + "." + kNf4QuantState);
}

// Every NF4 weight of the file or model, sorted. A weight quantized to
// bitsandbytes' FP4 is refused with a lora::Error naming it (its values do not
// dequantize with the NF4 code; nothing here reads FP4).
template <class Reader>
std::vector<std::string> nf4_weight_names(const Reader& reader) {
  const std::vector<std::string> fp4 = detail::weights_with_state(reader, kFp4QuantState);
  LORA_CHECK(fp4.empty(), detail::file_holding(reader, fp4.front() + "." + kFp4QuantState).source()
                              << ": tensor " << detail::quote_excerpt(fp4.front())
                              << " is quantized to bitsandbytes' FP4 (quant_state.bitsandbytes__fp4); only NF4 is supported");
  return detail::weights_with_state(reader, kNf4QuantState);
}

// The names of the tensors that store NF4 weight `name` beside `name` itself.
inline std::vector<std::string> nf4_companion_names(const std::string& name, bool nested) {
  std::vector<std::string> out = {name + "." + kNf4Absmax, name + "." + kNf4QuantMap, name + "." + kNf4QuantState};
  if (nested) {
    out.push_back(name + "." + kNf4NestedAbsmax);
    out.push_back(name + "." + kNf4NestedQuantMap);
  }
  return out;
}

// The quant state's JSON for `w`, byte for byte as bitsandbytes' pack_dict_to_tensor writes it.
inline std::string nf4_quant_state_json(const nf4::Weight& w) {
  std::string s = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(w.blocksize) + ", \"dtype\": " +
                  nlohmann::json(w.dtype).dump() + ", \"shape\": [" + std::to_string(w.rows) + ", " +
                  std::to_string(w.cols) + "]";
  if (w.nested()) {
    // nlohmann prints a double as the shortest text that reads back to it, as Python's repr does.
    s += ", \"nested_blocksize\": " + std::to_string(w.nested_blocksize) +
         ", \"nested_dtype\": \"float32\", \"nested_offset\": " + nlohmann::json(static_cast<double>(w.offset)).dump();
  }
  return s + "}";
}

// Adds NF4 weight `w` to `writer` under `name` with all its companions.
inline void add_nf4_weight(SafetensorsWriter& writer, const std::string& name, const nf4::Weight& w) {
  nf4::check(w, name);
  LORA_CHECK(nf4_dtype_from_name(w.dtype).has_value(),
             name << ": NF4 weight: dtype must be \"float32\", \"bfloat16\" or \"float16\", found \"" << w.dtype << "\"");
  const auto f32 = [](const std::vector<float>& v) {
    RawTensor t{Dtype::F32, {static_cast<std::int64_t>(v.size())}, std::vector<std::uint8_t>(v.size() * 4)};
    detail::encode(Dtype::F32, v.data(), v.size(), t.bytes.data());
    return t;
  };
  const auto u8 = [](std::vector<std::int64_t> shape, std::vector<std::uint8_t> bytes) {
    return RawTensor{Dtype::U8, std::move(shape), std::move(bytes)};
  };
  writer.add_raw(name, u8({static_cast<std::int64_t>(w.packed.size()), 1}, w.packed));
  std::vector<float> code(16);
  for (int i = 0; i < 16; ++i) code[static_cast<std::size_t>(i)] = nf4::code_value(i);
  writer.add_raw(name + "." + kNf4QuantMap, f32(code));
  if (w.nested()) {
    writer.add_raw(name + "." + kNf4Absmax, u8({static_cast<std::int64_t>(w.absmax_q.size())}, w.absmax_q));
    writer.add_raw(name + "." + kNf4NestedAbsmax, f32(w.nested_absmax));
    writer.add_raw(name + "." + kNf4NestedQuantMap, f32(w.nested_code));
  } else {
    writer.add_raw(name + "." + kNf4Absmax, f32(w.absmax));
  }
  const std::string json = nf4_quant_state_json(w);
  writer.add_raw(name + "." + kNf4QuantState,
                 u8({static_cast<std::int64_t>(json.size())}, std::vector<std::uint8_t>(json.begin(), json.end())));
}

// Reads NF4 weight `name` and its companions from a safetensors file or a
// model, checking everything first: each tensor present with bitsandbytes'
// dtype and shape, the JSON's keys and values, the quant map equal to the NF4
// code, the nested code sorted in [-1, 1], every statistic finite. Each
// lora::Error names the file and the tensor.
template <class Reader>
nf4::Weight load_nf4_weight(const Reader& reader, const std::string& name) {
  const SafetensorsReader& file = detail::file_holding(reader, name + "." + kNf4QuantState);
  const std::string where = file.source() + ": NF4 weight " + detail::quote_excerpt(name);
  auto tensor = [&](const std::string& suffix) -> const TensorInfo& {
    const std::string full = suffix.empty() ? name : name + "." + suffix;
    LORA_CHECK(reader.contains(full), where << ": tensor " << detail::quote_excerpt(full) << " is missing");
    return reader.info(full);
  };
  auto expect = [&](const TensorInfo& t, Dtype dtype, const std::vector<std::int64_t>& shape) {
    LORA_CHECK(t.dtype == dtype && t.shape == shape,
               where << ": tensor " << detail::quote_excerpt(t.name) << " is " << dtype_name(t.dtype) << " "
                     << shape_string(t.shape) << ", expected " << dtype_name(dtype) << " " << shape_string(shape)
                     << (t.name == name && t.dtype != Dtype::U8
                             ? " (bnb_4bit_quant_storage other than uint8 is not supported)"
                             : ""));
  };
  auto bytes_of = [&](const TensorInfo& t) { return detail::file_holding(reader, t.name).read_bytes(t.name); };
  auto floats_of = [&](const TensorInfo& t) {
    std::vector<float> v = detail::file_holding(reader, t.name).template read<float>(t.name);
    for (std::size_t i = 0; i < v.size(); ++i)
      LORA_CHECK(std::isfinite(v[i]), where << ": tensor " << detail::quote_excerpt(t.name) << " element " << i << " is "
                                            << v[i] << ", expected a finite value");
    return v;
  };

  // 1. The JSON.
  LORA_CHECK(!reader.contains(name + "." + kFp4QuantState),
             where << " also has a quant_state.bitsandbytes__fp4: expected exactly one quant state");
  const TensorInfo& state = tensor(kNf4QuantState);
  LORA_CHECK(state.dtype == Dtype::U8 && state.shape.size() == 1 && state.numel <= kMaxNf4StateBytes,
             where << ": tensor " << detail::quote_excerpt(state.name) << " is " << dtype_name(state.dtype) << " "
                   << shape_string(state.shape) << ", expected U8 [length] of JSON text (at most " << kMaxNf4StateBytes
                   << " bytes)");
  const std::vector<std::uint8_t> text = bytes_of(state);
  const nlohmann::ordered_json j =
      parse_untrusted_json(std::string(text.begin(), text.end()), where + ": tensor \"" + state.name + "\"", 4);
  LORA_CHECK(j.is_object(), where << ": the quant state " << detail::json_excerpt(j) << " is not a JSON object");
  const bool nested = j.contains("nested_offset") || j.contains("nested_blocksize") || j.contains("nested_dtype");
  for (const auto& [key, value] : j.items()) {
    static const char* const kKeys[] = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                                        "nested_offset"};
    bool known = false;
    for (const char* k : kKeys) known = known || key == k;
    LORA_CHECK(known, where << ": the quant state has an unknown key " << detail::quote_excerpt(key)
                            << " (expected quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, "
                               "nested_offset)");
  }
  auto field = [&](const char* key) -> const nlohmann::ordered_json& {
    LORA_CHECK(j.contains(key), where << ": the quant state has no \"" << key << "\"" << (nested ? " (double quantization)" : ""));
    return j.at(key);
  };
  auto positive_int = [&](const char* key) {
    const nlohmann::ordered_json& v = field(key);
    LORA_CHECK(v.is_number_unsigned() && v.get<std::uint64_t>() >= 1 && v.get<std::uint64_t>() <= (std::uint64_t{1} << 40),
               where << ": quant state \"" << key << "\" is " << detail::json_excerpt(v) << ", expected a positive integer");
    return static_cast<std::int64_t>(v.get<std::uint64_t>());
  };
  const nlohmann::ordered_json& quant_type = field("quant_type");
  LORA_CHECK(quant_type == "nf4", where << ": quant state \"quant_type\" is " << detail::json_excerpt(quant_type)
                                        << ", expected \"nf4\"" << (quant_type == "fp4" ? " (FP4 is not supported)" : ""));
  nf4::Weight w;
  w.blocksize = positive_int("blocksize");
  const nlohmann::ordered_json& dtype = field("dtype");
  LORA_CHECK(dtype.is_string() && nf4_dtype_from_name(dtype.get<std::string>()).has_value(),
             where << ": quant state \"dtype\" is " << detail::json_excerpt(dtype)
                   << ", expected \"float32\", \"bfloat16\" or \"float16\"");
  w.dtype = dtype.get<std::string>();
  const nlohmann::ordered_json& shape = field("shape");
  LORA_CHECK(shape.is_array() && shape.size() == 2 && shape[0].is_number_unsigned() && shape[1].is_number_unsigned() &&
                 shape[0].get<std::uint64_t>() >= 1 && shape[1].get<std::uint64_t>() >= 1 &&
                 shape[0].get<std::uint64_t>() <= (std::uint64_t{1} << 31) &&
                 shape[1].get<std::uint64_t>() <= (std::uint64_t{1} << 31),
             where << ": quant state \"shape\" is " << detail::json_excerpt(shape)
                   << ", expected [rows, cols] of a 2-D weight (each 1 to 2^31)");
  w.rows = static_cast<std::int64_t>(shape[0].get<std::uint64_t>());
  w.cols = static_cast<std::int64_t>(shape[1].get<std::uint64_t>());
  LORA_CHECK(w.blocksize % 2 == 0, where << ": quant state \"blocksize\" is " << w.blocksize << ", expected an even number");
  if (nested) {
    w.nested_blocksize = positive_int("nested_blocksize");
    const nlohmann::ordered_json& nested_dtype = field("nested_dtype");
    LORA_CHECK(nested_dtype == "float32", where << ": quant state \"nested_dtype\" is " << detail::json_excerpt(nested_dtype)
                                                << ", expected \"float32\"");
    const nlohmann::ordered_json& offset = field("nested_offset");
    LORA_CHECK(offset.is_number() && std::isfinite(offset.get<double>()),
               where << ": quant state \"nested_offset\" is " << detail::json_excerpt(offset) << ", expected a finite number");
    w.offset = static_cast<float>(offset.get<double>());  // as bitsandbytes: float(...) into an fp32 tensor
  }

  // 2. The tensors, against the JSON's shape and block sizes.
  const std::int64_t n = w.rows * w.cols, blocks = w.blocks();
  const TensorInfo& packed = tensor("");
  expect(packed, Dtype::U8, {(n + 1) / 2, 1});
  const TensorInfo& quant_map = tensor(kNf4QuantMap);
  expect(quant_map, Dtype::F32, {16});
  const std::vector<float> code = floats_of(quant_map);
  for (int i = 0; i < 16; ++i)
    LORA_CHECK(code[static_cast<std::size_t>(i)] == nf4::code_value(i),
               where << ": tensor " << detail::quote_excerpt(quant_map.name) << " element " << i << " is "
                     << code[static_cast<std::size_t>(i)] << ", expected the NF4 code value " << nf4::code_value(i));
  const TensorInfo& absmax = tensor(kNf4Absmax);
  if (nested) {
    expect(absmax, Dtype::U8, {blocks});
    const TensorInfo& nested_absmax = tensor(kNf4NestedAbsmax);
    expect(nested_absmax, Dtype::F32, {(blocks + w.nested_blocksize - 1) / w.nested_blocksize});
    const TensorInfo& nested_code = tensor(kNf4NestedQuantMap);
    expect(nested_code, Dtype::F32, {256});
    w.nested_code = floats_of(nested_code);
    for (std::size_t i = 0; i < 256; ++i)
      LORA_CHECK(std::fabs(w.nested_code[i]) <= 1.0f && (i == 0 || w.nested_code[i - 1] <= w.nested_code[i]),
                 where << ": tensor " << detail::quote_excerpt(nested_code.name) << " element " << i << " is "
                       << w.nested_code[i] << "; the 8-bit code must be sorted values in [-1, 1]");
    w.nested_absmax = floats_of(nested_absmax);
    w.absmax_q = bytes_of(absmax);
  } else {
    for (const char* suffix : {kNf4NestedAbsmax, kNf4NestedQuantMap})
      LORA_CHECK(!reader.contains(name + "." + suffix),
                 where << ": tensor " << detail::quote_excerpt(name + "." + suffix)
                       << " is present but the quant state has no nested_* keys (double quantization)");
    expect(absmax, Dtype::F32, {blocks});
    w.absmax = floats_of(absmax);
  }
  w.packed = bytes_of(packed);
  nf4::check(w, where);
  return w;
}

// ---- config.json: quantization_config -----------------------------------------------------

// What a transformers config.json says about a bitsandbytes 4-bit model.
struct Nf4QuantizationConfig {
  bool double_quant = false;                // bnb_4bit_use_double_quant
  std::string compute_dtype = "float32";    // bnb_4bit_compute_dtype
  std::string quant_storage = "uint8";      // bnb_4bit_quant_storage
};

// The quantization_config of a parsed config.json (`source` names it in
// errors): nullopt when there is none; an NF4 config when it is bitsandbytes
// 4-bit NF4 with uint8 storage; a lora::Error for anything else (8-bit, FP4,
// other storage, other quantization methods), saying what is supported.
inline std::optional<Nf4QuantizationConfig> parse_quantization_config(const nlohmann::ordered_json& config,
                                                                      const std::string& source) {
  if (!config.is_object() || !config.contains("quantization_config")) return std::nullopt;
  const nlohmann::ordered_json& q = config.at("quantization_config");
  const std::string where = source + ": quantization_config";
  LORA_CHECK(q.is_object(), where << " is " << detail::json_excerpt(q) << ", expected an object");
  auto string_or = [&](const char* key, const char* fallback) {
    if (!q.contains(key) || q.at(key).is_null()) return std::string(fallback);
    LORA_CHECK(q.at(key).is_string(), where << ": \"" << key << "\" is " << detail::json_excerpt(q.at(key)) << ", expected a string");
    return q.at(key).get<std::string>();
  };
  auto bool_or = [&](const char* key, bool fallback) {
    if (!q.contains(key) || q.at(key).is_null()) return fallback;
    LORA_CHECK(q.at(key).is_boolean(), where << ": \"" << key << "\" is " << detail::json_excerpt(q.at(key)) << ", expected true or false");
    return q.at(key).get<bool>();
  };
  const std::string method = string_or("quant_method", "bitsandbytes");
  LORA_CHECK(method == "bitsandbytes", where << ": quant_method \"" << method
                                             << "\" is not supported (only bitsandbytes 4-bit NF4 models load)");
  LORA_CHECK(!bool_or("load_in_8bit", false) && !bool_or("_load_in_8bit", false),
             where << ": load_in_8bit (LLM.int8) is not supported; only load_in_4bit with NF4");
  LORA_CHECK(bool_or("load_in_4bit", bool_or("_load_in_4bit", false)),
             where << ": load_in_4bit is not true; only bitsandbytes 4-bit NF4 models are supported");
  const std::string type = string_or("bnb_4bit_quant_type", "fp4");  // BitsAndBytesConfig's default is fp4
  LORA_CHECK(type == "nf4", where << ": bnb_4bit_quant_type \"" << type << "\" is not supported; only \"nf4\"");
  Nf4QuantizationConfig c;
  c.double_quant = bool_or("bnb_4bit_use_double_quant", false);
  c.compute_dtype = string_or("bnb_4bit_compute_dtype", "float32");
  LORA_CHECK(nf4_dtype_from_name(c.compute_dtype).has_value(),
             where << ": bnb_4bit_compute_dtype \"" << c.compute_dtype
                   << "\" is not supported; expected float32, bfloat16 or float16");
  c.quant_storage = string_or("bnb_4bit_quant_storage", "uint8");
  LORA_CHECK(c.quant_storage == "uint8", where << ": bnb_4bit_quant_storage \"" << c.quant_storage
                                               << "\" is not supported; only uint8 (two 4-bit values per byte)");
  return c;
}

// The config.json that belongs to a model path (a directory, or the directory
// of a .safetensors / index file); nullopt when there is none.
inline std::optional<nlohmann::ordered_json> read_model_config(const std::string& model_path) {
  namespace fs = std::filesystem;
  const fs::path p(model_path);
  const fs::path config = (fs::is_directory(p) ? p : p.parent_path()) / "config.json";
  if (!fs::exists(config)) return std::nullopt;
  return read_untrusted_json(config.string(), std::uintmax_t{1} << 24);
}

// quantization_config as transformers' BitsAndBytesConfig.to_dict writes it for `c`.
inline nlohmann::ordered_json quantization_config_json(const Nf4QuantizationConfig& c) {
  return {{"_load_in_4bit", true},
          {"_load_in_8bit", false},
          {"bnb_4bit_compute_dtype", c.compute_dtype},
          {"bnb_4bit_quant_storage", c.quant_storage},
          {"bnb_4bit_quant_type", "nf4"},
          {"bnb_4bit_use_double_quant", c.double_quant},
          {"llm_int8_enable_fp32_cpu_offload", false},
          {"llm_int8_has_fp16_weight", false},
          {"llm_int8_skip_modules", nullptr},
          {"llm_int8_threshold", 6.0},
          {"load_in_4bit", true},
          {"load_in_8bit", false},
          {"quant_method", "bitsandbytes"}};
}

}  // namespace lora::io

// PEFT adapter directories, read and written as Hugging Face PEFT does:
//
//   adapter_model.safetensors  base_model.model.<module>.lora_A.weight   [r, d_in]
//                              base_model.model.<module>.lora_B.weight   [d_out, r]
//                              F32 by default, metadata {"format": "pt"}
//   adapter_config.json        the LoraConfig, json.dumps(indent=2, sort_keys=True)
//
// A and B keep these shapes with fan_in_fan_out too (GPT-2's Conv1D stores W
// transposed, d_in x d_out; only a merge sees the difference: it adds
// (s B A)^T). The scale of a module is s = alpha / r, or alpha / sqrt(r) with
// use_rslora, where r and alpha come from rank_pattern / alpha_pattern when a
// pattern matches the module's name.
//
// lora::io::Adapter is the host-side form of such a directory; it copies to and
// from lora::Linear layers on any backend.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/layers/linear.hpp"

namespace lora::io {

inline constexpr const char* kPeftWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kPeftConfigFile = "adapter_config.json";
inline constexpr const char* kPeftKeyPrefix = "base_model.model.";

// PEFT's LoraConfig: the keys this library acts on, typed; every other key is
// kept in `other` and written back unchanged.
struct PeftConfig {
  int r = 8;
  double lora_alpha = 8.0;
  std::vector<std::string> target_modules;  // module-name suffixes (PEFT's list form)
  std::string target_modules_regex;         // PEFT's string form, a full-match regex; empty with the list form
  bool use_rslora = false;
  bool fan_in_fan_out = false;
  double lora_dropout = 0.0;
  std::string bias = "none";
  // Per-module overrides, in file order; the first pattern that matches wins.
  // A pattern p matches a module name m when the regex "(.*\.)?(p)" matches all of m.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;  // "CAUSAL_LM", "SEQ_CLS", ... or null
  bool inference_mode = true;
  std::optional<std::vector<std::string>> modules_to_save;
  nlohmann::json other = nlohmann::json::object();

  int rank_for(const std::string& module) const {
    const int* r_match = match(rank_pattern, module, "rank_pattern");
    return r_match ? *r_match : r;
  }
  double alpha_for(const std::string& module) const {
    const double* alpha = match(alpha_pattern, module, "alpha_pattern");
    return alpha ? *alpha : lora_alpha;
  }
  // s = alpha / r, or alpha / sqrt(r) with use_rslora.
  double scale_for(const std::string& module) const {
    const double rank = rank_for(module);
    return use_rslora ? alpha_for(module) / std::sqrt(rank) : alpha_for(module) / rank;
  }
  // The lora::Config of a layer that holds `module` (init and seed are left at their defaults).
  Config layer_config(const std::string& module) const {
    Config c;
    c.r = rank_for(module);
    c.alpha = alpha_for(module);
    c.dropout = lora_dropout;
    c.use_rslora = use_rslora;
    c.fan_in_fan_out = fan_in_fan_out;
    return c;
  }

  // From a parsed adapter_config.json (ordered, so pattern order is the file's).
  static PeftConfig from_json(const nlohmann::ordered_json& j, const std::string& source);
  // The JSON PEFT writes: sorted keys (nlohmann::json is ordered by key).
  nlohmann::json to_json() const;
  // Exactly the bytes PEFT writes: json.dumps(indent=2, sort_keys=True), ASCII, no final newline.
  std::string to_json_text() const { return to_json().dump(2, ' ', /*ensure_ascii=*/true); }

 private:
  template <class V>
  static const V* match(const std::vector<std::pair<std::string, V>>& patterns, const std::string& module,
                        const char* what) {
    for (const auto& [pattern, value] : patterns) {
      try {
        if (std::regex_match(module, std::regex("(.*\\.)?(" + pattern + ")"))) return &value;
      } catch (const std::regex_error& e) {
        LORA_CHECK(false, what << " key \"" << pattern << "\" is not a valid regular expression: " << e.what());
      }
    }
    return nullptr;
  }
};

// One LoRA module of an adapter, on the host.
struct AdapterModule {
  cpu::Matrix<float> A;  // lora_A.weight, r x d_in
  cpu::Matrix<float> B;  // lora_B.weight, d_out x r
  int r = 0;
  double alpha = 0.0;
  double scale = 0.0;                  // alpha / r (alpha / sqrt(r) with rsLoRA)
  Dtype stored_dtype = Dtype::F32;     // as found in the file it came from

  std::int64_t d_in() const { return A.cols(); }
  std::int64_t d_out() const { return B.rows(); }
  std::int64_t parameters() const { return A.size() + B.size(); }
};

// A PEFT adapter directory in memory.
struct Adapter {
  PeftConfig config;
  std::map<std::string, AdapterModule> modules;  // by module path, e.g. "transformer.h.0.attn.c_attn"
  // Tensors of the file that are not LoRA pairs (modules_to_save copies, trained
  // biases): kept by full key, reported by lora-tool, written back by save_peft.
  std::map<std::string, RawTensor> other_tensors;
  std::map<std::string, std::string> file_metadata{{"format", "pt"}};

  std::int64_t trainable_parameters() const {
    std::int64_t n = 0;
    for (const auto& [name, m] : modules) n += m.parameters();
    return n;
  }
};

// ---- adapter_config.json -----------------------------------------------------------

namespace detail {

inline bool json_is_integer(const nlohmann::ordered_json& v) { return v.is_number_integer() || v.is_number_unsigned(); }

// An integral double within 2^53 is written as a JSON integer (as PEFT writes lora_alpha = 16), else as a float.
inline nlohmann::json json_number(double x) {
  if (std::isfinite(x) && x == std::floor(x) && std::fabs(x) < 0x1p53) return static_cast<std::int64_t>(x);
  return x;
}

inline std::string read_text_file(const std::string& path, std::uintmax_t max_bytes) {
  std::error_code ec;
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  LORA_CHECK(!ec, "cannot open " << path << ": " << ec.message());
  LORA_CHECK(size <= max_bytes, path << " holds " << size << " bytes, more than the " << max_bytes << " expected");
  std::ifstream in(path, std::ios::binary);
  LORA_CHECK(in.is_open(), "cannot open " << path);
  std::string text(static_cast<std::size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  LORA_CHECK(static_cast<std::uintmax_t>(in.gcount()) == size, "reading " << path << ": short read");
  return text;
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "a.b.c" -> "a\.b\.c": a module name as a pattern that matches only itself (and names ending in it after a dot).
inline std::string escape_module_pattern(const std::string& name) {
  std::string out;
  for (const char c : name) {
    if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

}  // namespace detail

inline PeftConfig PeftConfig::from_json(const nlohmann::ordered_json& j, const std::string& source) {
  LORA_CHECK(j.is_object(), source << ": expected a JSON object, found " << j.type_name());
  PeftConfig c;
  c.other = nlohmann::json::object();
  auto bad = [&](const std::string& key, const char* expected) {
    LORA_CHECK(false, source << ": \"" << key << "\" is " << j.at(key).dump() << ", expected " << expected);
  };
  auto get_bool = [&](const std::string& key, bool& out) {
    if (!j.contains(key) || j.at(key).is_null()) return;
    if (!j.at(key).is_boolean()) bad(key, "true or false");
    out = j.at(key).get<bool>();
  };
  auto get_optional_string = [&](const std::string& key, std::optional<std::string>& out) {
    if (!j.contains(key) || j.at(key).is_null()) return;
    if (!j.at(key).is_string()) bad(key, "a string or null");
    out = j.at(key).get<std::string>();
  };
  auto get_string_list = [&](const std::string& key) {
    std::vector<std::string> out;
    for (const auto& v : j.at(key)) {
      if (!v.is_string()) bad(key, "a list of strings");
      out.push_back(v.get<std::string>());
    }
    return out;
  };

  LORA_CHECK(j.contains("peft_type"), source << ": no \"peft_type\"; is this a PEFT adapter_config.json?");
  LORA_CHECK(j.at("peft_type") == "LORA",
             source << ": peft_type is " << j.at("peft_type").dump() << "; only \"LORA\" adapters are supported");
  if (j.contains("use_dora") && j.at("use_dora") == true)
    LORA_CHECK(false, source << ": use_dora is true: DoRA adapters (lora_magnitude_vector) are not supported yet");
  if (j.contains("lora_bias") && j.at("lora_bias") == true)
    LORA_CHECK(false, source << ": lora_bias is true: a bias on lora_B is not supported yet");

  if (j.contains("r")) {
    if (!detail::json_is_integer(j.at("r")) || j.at("r").get<std::int64_t>() < 1 ||
        j.at("r").get<std::int64_t>() > (1 << 30))
      bad("r", "an integer >= 1");
    c.r = j.at("r").get<int>();
  }
  if (j.contains("lora_alpha")) {
    if (!j.at("lora_alpha").is_number() || !(j.at("lora_alpha").get<double>() > 0.0))
      bad("lora_alpha", "a number > 0");
    c.lora_alpha = j.at("lora_alpha").get<double>();
  }
  if (j.contains("lora_dropout") && !j.at("lora_dropout").is_null()) {
    const auto& v = j.at("lora_dropout");
    if (!v.is_number() || v.get<double>() < 0.0 || v.get<double>() >= 1.0) bad("lora_dropout", "a number in [0, 1)");
    c.lora_dropout = v.get<double>();
  }
  if (j.contains("target_modules") && !j.at("target_modules").is_null()) {
    const auto& v = j.at("target_modules");
    if (v.is_string()) {
      c.target_modules_regex = v.get<std::string>();
    } else if (v.is_array()) {
      c.target_modules = get_string_list("target_modules");
    } else {
      bad("target_modules", "a list of strings, a string or null");
    }
  }
  if (j.contains("modules_to_save") && !j.at("modules_to_save").is_null()) {
    if (!j.at("modules_to_save").is_array()) bad("modules_to_save", "a list of strings or null");
    c.modules_to_save = get_string_list("modules_to_save");
  }
  get_bool("use_rslora", c.use_rslora);
  get_bool("fan_in_fan_out", c.fan_in_fan_out);
  get_bool("inference_mode", c.inference_mode);
  if (j.contains("bias") && !j.at("bias").is_null()) {
    if (!j.at("bias").is_string()) bad("bias", "\"none\", \"all\" or \"lora_only\"");
    c.bias = j.at("bias").get<std::string>();
  }
  get_optional_string("base_model_name_or_path", c.base_model_name_or_path);
  get_optional_string("task_type", c.task_type);
  if (j.contains("rank_pattern") && !j.at("rank_pattern").is_null()) {
    if (!j.at("rank_pattern").is_object()) bad("rank_pattern", "an object of integers");
    for (const auto& [pattern, v] : j.at("rank_pattern").items()) {
      if (!detail::json_is_integer(v) || v.get<std::int64_t>() < 1 || v.get<std::int64_t>() > (1 << 30))
        bad("rank_pattern", "an object of integers >= 1");
      c.rank_pattern.emplace_back(pattern, v.get<int>());
    }
  }
  if (j.contains("alpha_pattern") && !j.at("alpha_pattern").is_null()) {
    if (!j.at("alpha_pattern").is_object()) bad("alpha_pattern", "an object of numbers");
    for (const auto& [pattern, v] : j.at("alpha_pattern").items()) {
      if (!v.is_number() || !(v.get<double>() > 0.0)) bad("alpha_pattern", "an object of numbers > 0");
      c.alpha_pattern.emplace_back(pattern, v.get<double>());
    }
  }
  static const std::set<std::string> kTyped = {
      "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora",
      "fan_in_fan_out", "inference_mode", "bias", "base_model_name_or_path", "task_type", "rank_pattern",
      "alpha_pattern"};
  for (const auto& [key, value] : j.items())
    if (!kTyped.count(key)) c.other[key] = nlohmann::json::parse(value.dump());
  return c;
}

inline nlohmann::json PeftConfig::to_json() const {
  // Keys every PEFT version since rank_pattern (0.6) reads, with PEFT's defaults;
  // a loaded config's own values (in `other`) take their place.
  nlohmann::json j = {{"init_lora_weights", true}, {"layers_pattern", nullptr}, {"layers_to_transform", nullptr},
                      {"revision", nullptr},       {"use_dora", false}};
  for (const auto& [key, value] : other.items()) j[key] = value;
  j["peft_type"] = "LORA";
  j["r"] = r;
  j["lora_alpha"] = detail::json_number(lora_alpha);
  j["lora_dropout"] = lora_dropout;
  if (!target_modules_regex.empty()) {
    j["target_modules"] = target_modules_regex;
  } else if (target_modules.empty()) {
    j["target_modules"] = nullptr;
  } else {
    j["target_modules"] = target_modules;
  }
  j["modules_to_save"] = modules_to_save ? nlohmann::json(*modules_to_save) : nlohmann::json(nullptr);
  j["use_rslora"] = use_rslora;
  j["fan_in_fan_out"] = fan_in_fan_out;
  j["inference_mode"] = inference_mode;
  j["bias"] = bias;
  j["base_model_name_or_path"] = base_model_name_or_path ? nlohmann::json(*base_model_name_or_path) : nlohmann::json(nullptr);
  j["task_type"] = task_type ? nlohmann::json(*task_type) : nlohmann::json(nullptr);
  j["rank_pattern"] = nlohmann::json::object();
  for (const auto& [pattern, value] : rank_pattern) j["rank_pattern"][pattern] = value;
  j["alpha_pattern"] = nlohmann::json::object();
  for (const auto& [pattern, value] : alpha_pattern) j["alpha_pattern"][pattern] = detail::json_number(value);
  return j;
}

// ---- loading and saving a directory -----------------------------------------------------

// Reads dir/adapter_config.json and dir/adapter_model.safetensors. Every LoRA
// pair is checked against the config (r per rank_pattern) and against itself
// (A r x d_in, B d_out x r); tensors that are not LoRA pairs go to
// other_tensors; DoRA and embedding adapters are refused with a lora::Error.
inline Adapter load_peft(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string config_path = (fs::path(dir) / kPeftConfigFile).string();
  const std::string weights_path = (fs::path(dir) / kPeftWeightsFile).string();
  LORA_CHECK(fs::is_directory(dir), dir << ": not a directory (expected a PEFT adapter directory)");
  if (!fs::exists(weights_path) && fs::exists(fs::path(dir) / "adapter_model.bin"))
    LORA_CHECK(false, dir << " holds adapter_model.bin (a pickle) and no " << kPeftWeightsFile
                          << "; convert it with PEFT (save_pretrained(safe_serialization=True)) first");
  LORA_CHECK(fs::is_regular_file(config_path), config_path << ": no such file");
  LORA_CHECK(fs::is_regular_file(weights_path), weights_path << ": no such file");

  nlohmann::ordered_json config_json;
  try {
    config_json = nlohmann::ordered_json::parse(detail::read_text_file(config_path, std::uintmax_t{1} << 24));
  } catch (const nlohmann::json::exception& e) {
    LORA_CHECK(false, config_path << ": not valid JSON: " << e.what());
  }
  Adapter adapter;
  adapter.config = PeftConfig::from_json(config_json, config_path);
  const SafetensorsReader reader = SafetensorsReader::open(weights_path);
  adapter.file_metadata = reader.metadata();

  struct Pair {
    const TensorInfo* A = nullptr;
    const TensorInfo* B = nullptr;
  };
  std::map<std::string, Pair> pairs;
  const std::string prefix = kPeftKeyPrefix;
  for (const TensorInfo& t : reader.tensors()) {
    const std::string& key = t.name;
    LORA_CHECK(key.find("lora_magnitude_vector") == std::string::npos,
               weights_path << ": tensor \"" << key << "\" is a DoRA magnitude vector; DoRA is not supported yet");
    LORA_CHECK(key.find("lora_embedding_A") == std::string::npos && key.find("lora_embedding_B") == std::string::npos,
               weights_path << ": tensor \"" << key
                            << "\" belongs to an embedding adapter (lora_embedding_A/B); only linear layers are supported");
    const bool is_A = detail::ends_with(key, ".lora_A.weight");
    const bool is_B = detail::ends_with(key, ".lora_B.weight");
    if (!is_A && !is_B) {
      LORA_CHECK(key.find(".lora_A.") == std::string::npos && key.find(".lora_B.") == std::string::npos,
                 weights_path << ": tensor \"" << key
                              << "\" is a LoRA tensor of a kind not supported (expected <module>.lora_A.weight or "
                                 "<module>.lora_B.weight)");
      adapter.other_tensors.emplace(key, reader.read_raw(key));
      continue;
    }
    std::string module = key.substr(0, key.size() - std::string(".lora_A.weight").size());
    if (module.compare(0, prefix.size(), prefix) == 0) module = module.substr(prefix.size());
    LORA_CHECK(!module.empty(), weights_path << ": tensor \"" << key << "\" names no module");
    (is_A ? pairs[module].A : pairs[module].B) = &t;
  }

  for (const auto& [module, pair] : pairs) {
    LORA_CHECK(pair.A && pair.B, weights_path << ": module \"" << module << "\" has lora_" << (pair.A ? "A" : "B")
                                              << " but no lora_" << (pair.A ? "B" : "A"));
    for (const TensorInfo* t : {pair.A, pair.B}) {
      LORA_CHECK(is_floating(t->dtype), weights_path << ": tensor \"" << t->name << "\" has dtype "
                                                     << dtype_name(t->dtype) << ", expected F16, BF16, F32 or F64");
      LORA_CHECK(t->shape.size() == 2 && t->shape[0] >= 1 && t->shape[1] >= 1,
                 weights_path << ": tensor \"" << t->name << "\" has shape " << shape_string(t->shape)
                              << ", expected a non-empty matrix");
    }
    const std::int64_t r = pair.A->shape[0];
    LORA_CHECK(pair.B->shape[1] == r, weights_path << ": module \"" << module << "\": lora_A is "
                                                   << shape_string(pair.A->shape) << " (r = " << r << ") but lora_B is "
                                                   << shape_string(pair.B->shape) << ", expected [d_out, " << r << "]");
    const int expected_r = adapter.config.rank_for(module);
    LORA_CHECK(r == expected_r, weights_path << ": module \"" << module << "\" has rank " << r << " but "
                                             << config_path << " gives r = " << expected_r
                                             << (adapter.config.rank_pattern.empty() ? "" : " (after rank_pattern)"));
    AdapterModule m;
    m.r = static_cast<int>(r);
    m.alpha = adapter.config.alpha_for(module);
    m.scale = adapter.config.scale_for(module);
    m.stored_dtype = pair.A->dtype;
    m.A = cpu::Matrix<float>(r, pair.A->shape[1]);
    m.B = cpu::Matrix<float>(pair.B->shape[0], r);
    reader.read_into(pair.A->name, m.A.view());
    reader.read_into(pair.B->name, m.B.view());
    adapter.modules.emplace(module, std::move(m));
  }
  return adapter;
}

// Writes dir/adapter_model.safetensors (LoRA tensors as `dtype`, other tensors
// as they were) and dir/adapter_config.json, each atomically; creates dir.
// Every module's r and alpha must be what the config gives it (r, lora_alpha,
// or a rank_pattern / alpha_pattern entry), or PEFT would load it wrongly.
inline void save_peft(const Adapter& adapter, const std::string& dir, Dtype dtype = Dtype::F32) {
  LORA_CHECK(is_floating(dtype), "save_peft: dtype " << dtype_name(dtype) << ", expected F16, BF16, F32 or F64");
  SafetensorsWriter writer;
  for (const auto& [key, value] : adapter.file_metadata) writer.set_metadata(key, value);
  if (!writer.metadata().count("format")) writer.set_metadata("format", "pt");
  for (const auto& [module, m] : adapter.modules) {
    LORA_CHECK(m.A.rows() == m.r && m.B.cols() == m.r && m.r >= 1,
               "save_peft: module \"" << module << "\": A is [" << m.A.rows() << ", " << m.A.cols() << "], B is ["
                                      << m.B.rows() << ", " << m.B.cols() << "], r = " << m.r);
    const int config_r = adapter.config.rank_for(module);
    const double config_alpha = adapter.config.alpha_for(module);
    LORA_CHECK(config_r == m.r, "save_peft: module \"" << module << "\" has r = " << m.r << " but the config gives "
                                                       << config_r << "; add it to config.rank_pattern");
    LORA_CHECK(config_alpha == m.alpha, "save_peft: module \"" << module << "\" has alpha = " << m.alpha
                                                               << " but the config gives " << config_alpha
                                                               << "; add it to config.alpha_pattern");
    writer.add(kPeftKeyPrefix + module + ".lora_A.weight", m.A.view(), dtype);
    writer.add(kPeftKeyPrefix + module + ".lora_B.weight", m.B.view(), dtype);
  }
  for (const auto& [key, tensor] : adapter.other_tensors) writer.add_raw(key, tensor);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  LORA_CHECK(std::filesystem::is_directory(dir), "save_peft: cannot create directory " << dir << ": " << ec.message());
  writer.write((std::filesystem::path(dir) / kPeftWeightsFile).string());
  write_string_atomically((std::filesystem::path(dir) / kPeftConfigFile).string(), adapter.config.to_json_text());
}

// ---- merging into a base weight ----------------------------------------------------------

// W += factor s B A                      W: d_out x d_in (nn.Linear's layout)
// W += factor s (B A)^T = factor s A^T B^T   W: d_in x d_out (fan_in_fan_out, GPT-2's Conv1D)
// in double, s = module.scale. lora-tool merge calls this with factor = --scale.
inline void add_module_delta(const AdapterModule& module, bool fan_in_fan_out, double factor,
                             MatrixView<double, HostSpace> W) {
  const std::int64_t rows = fan_in_fan_out ? module.d_in() : module.d_out();
  const std::int64_t cols = fan_in_fan_out ? module.d_out() : module.d_in();
  LORA_CHECK(W.rows == rows && W.cols == cols,
             "merge: the base weight is [" << W.rows << ", " << W.cols << "] but the adapter module is B [" << module.d_out()
                                           << ", " << module.r << "] x A [" << module.r << ", " << module.d_in()
                                           << "], expected a [" << rows << ", " << cols << "] weight"
                                           << (fan_in_fan_out ? " (fan_in_fan_out: W stored transposed)" : ""));
  cpu::Context ctx;
  cpu::Matrix<double> A(module.A.rows(), module.A.cols()), B(module.B.rows(), module.B.cols());
  cpu::Backend::convert(ctx, module.A.view(), A.view());
  cpu::Backend::convert(ctx, module.B.view(), B.view());
  const double s = factor * module.scale;
  if (fan_in_fan_out) {
    cpu::Backend::gemm<double, double>(ctx, Op::T, Op::T, s, A.view(), B.view(), 1.0, W);
  } else {
    cpu::Backend::gemm<double, double>(ctx, Op::N, Op::N, s, B.view(), A.view(), 1.0, W);
  }
}

// ---- lora::Linear <-> Adapter ---------------------------------------------------------------

template <class T, class Backend>
struct NamedLayer {
  std::string name;  // the module path, e.g. "model.layers.0.self_attn.q_proj"
  Linear<T, Backend>* layer;
};

// Copies the module's A and B into the layer's trainable tensors (converting to
// the layer's parameter type). The layer must have the module's shape, rank and
// scale, and must not be merged (its W would no longer match).
template <class T, class Backend>
void copy_module_to_layer(const AdapterModule& module, Linear<T, Backend>& layer, const std::string& name = "module") {
  using P = typename Linear<T, Backend>::Param;
  LORA_CHECK(!layer.merged(), name << ": the layer is merged; unmerge() it before loading new adapter weights");
  LORA_CHECK(module.r == layer.rank() && module.d_in() == layer.d_in() && module.d_out() == layer.d_out(),
             name << ": the adapter has A [" << module.r << ", " << module.d_in() << "], B [" << module.d_out() << ", "
                  << module.r << "]; the layer expects A [" << layer.rank() << ", " << layer.d_in() << "], B ["
                  << layer.d_out() << ", " << layer.rank() << "]");
  LORA_CHECK(std::fabs(module.scale - layer.scale()) <= 1e-12 * std::fabs(module.scale),
             name << ": the adapter's scale is " << module.scale << " (alpha " << module.alpha << ", r " << module.r
                  << ") but the layer's is " << layer.scale() << "; build the layer with PeftConfig::layer_config()");
  auto& ctx = layer.context();
  auto copy = [&](const cpu::Matrix<float>& host, MatrixView<P, typename Backend::Space> dst) {
    if constexpr (std::is_same_v<P, float>) {
      Backend::copy_from_host(ctx, host.view(), dst);
    } else {
      cpu::Matrix<P> converted(host.rows(), host.cols());
      for (std::int64_t i = 0; i < host.size(); ++i) converted.data()[i] = static_cast<P>(host.data()[i]);
      Backend::copy_from_host(ctx, MatrixView<const P, HostSpace>(converted.view()), dst);
    }
  };
  copy(module.A, layer.lora_A().value);
  copy(module.B, layer.lora_B().value);
  Backend::synchronize(ctx);
}

// The layer's A and B (as float; a double layer rounds to nearest) with its r, alpha and scale.
template <class T, class Backend>
AdapterModule module_from_layer(const Linear<T, Backend>& layer) {
  using P = typename Linear<T, Backend>::Param;
  auto& ctx = layer.context();
  AdapterModule m;
  m.r = layer.rank();
  m.alpha = layer.config().alpha;
  m.scale = layer.scale();
  auto copy = [&](MatrixView<const P, typename Backend::Space> src) {
    cpu::Matrix<P> host(src.rows, src.cols);
    Backend::copy_to_host(ctx, src, host.view());
    Backend::synchronize(ctx);
    cpu::Matrix<float> out(src.rows, src.cols);
    for (std::int64_t i = 0; i < host.size(); ++i) {
      if constexpr (std::is_same_v<P, double>) {
        out.data()[i] = double_to_float(host.data()[i]);
      } else {
        out.data()[i] = static_cast<float>(host.data()[i]);
      }
    }
    return out;
  };
  m.A = copy(layer.A());
  m.B = copy(layer.B());
  return m;
}

// Loads every module of `adapter` into the layer of the same name. Each layer
// must have a module and each module a layer; everything is checked before any
// layer is written, so a failure leaves every layer as it was.
template <class T, class Backend>
void load_into_layers(const Adapter& adapter, const std::vector<NamedLayer<T, Backend>>& layers) {
  std::set<std::string> seen;
  for (const NamedLayer<T, Backend>& l : layers) {
    LORA_CHECK(l.layer != nullptr, "load_into_layers: layer \"" << l.name << "\" is null");
    LORA_CHECK(seen.insert(l.name).second, "load_into_layers: layer \"" << l.name << "\" is listed twice");
    const auto it = adapter.modules.find(l.name);
    LORA_CHECK(it != adapter.modules.end(), "load_into_layers: the adapter has no module \"" << l.name << "\"");
    LORA_CHECK(l.layer->config().fan_in_fan_out == adapter.config.fan_in_fan_out,
               "\"" << l.name << "\": the layer has fan_in_fan_out = " << l.layer->config().fan_in_fan_out
                      << ", the adapter " << adapter.config.fan_in_fan_out);
    const AdapterModule& m = it->second;
    LORA_CHECK(!l.layer->merged() && m.r == l.layer->rank() && m.d_in() == l.layer->d_in() &&
                   m.d_out() == l.layer->d_out() &&
                   std::fabs(m.scale - l.layer->scale()) <= 1e-12 * std::fabs(m.scale),
               "\"" << l.name << "\": the layer (r " << l.layer->rank() << ", " << l.layer->d_out() << " x " << l.layer->d_in()
                      << ", scale " << l.layer->scale() << (l.layer->merged() ? ", merged" : "")
                      << ") cannot hold the module (r " << m.r << ", " << m.d_out() << " x " << m.d_in() << ", scale "
                      << m.scale << ")");
  }
  for (const auto& [name, m] : adapter.modules)
    LORA_CHECK(seen.count(name), "load_into_layers: no layer given for the adapter's module \"" << name << "\"");
  for (const NamedLayer<T, Backend>& l : layers) copy_module_to_layer(adapter.modules.at(l.name), *l.layer, l.name);
}

// An adapter holding every layer's A and B. The config starts from `config`
// (base model name, task type, ...); r, lora_alpha, use_rslora, fan_in_fan_out
// and lora_dropout come from the first layer, other ranks and alphas go to
// rank_pattern / alpha_pattern, and target_modules (when empty) becomes the
// sorted set of the names' last components.
template <class T, class Backend>
Adapter adapter_from_layers(const std::vector<NamedLayer<T, Backend>>& layers, PeftConfig config = {}) {
  LORA_CHECK(!layers.empty(), "adapter_from_layers: no layers");
  const Config& first = layers.front().layer->config();
  config.r = first.r;
  config.lora_alpha = first.alpha;
  config.use_rslora = first.use_rslora;
  config.fan_in_fan_out = first.fan_in_fan_out;
  config.lora_dropout = first.dropout;
  config.rank_pattern.clear();
  config.alpha_pattern.clear();
  Adapter adapter;
  std::set<std::string> targets;
  for (const NamedLayer<T, Backend>& l : layers) {
    LORA_CHECK(l.layer != nullptr, "adapter_from_layers: layer \"" << l.name << "\" is null");
    LORA_CHECK(!l.name.empty() && !adapter.modules.count(l.name),
               "adapter_from_layers: layer name \"" << l.name << "\" is empty or listed twice");
    const Config& c = l.layer->config();
    LORA_CHECK(c.use_rslora == first.use_rslora && c.fan_in_fan_out == first.fan_in_fan_out,
               "adapter_from_layers: \"" << l.name << "\" differs from \"" << layers.front().name
                                         << "\" in use_rslora or fan_in_fan_out, which PEFT keeps per adapter");
    if (c.r != first.r) config.rank_pattern.emplace_back(detail::escape_module_pattern(l.name), c.r);
    if (c.alpha != first.alpha) config.alpha_pattern.emplace_back(detail::escape_module_pattern(l.name), c.alpha);
    adapter.modules.emplace(l.name, module_from_layer(*l.layer));
    const std::size_t dot = l.name.rfind('.');
    targets.insert(dot == std::string::npos ? l.name : l.name.substr(dot + 1));
  }
  if (config.target_modules.empty() && config.target_modules_regex.empty())
    config.target_modules.assign(targets.begin(), targets.end());
  adapter.config = std::move(config);
  return adapter;
}

}  // namespace lora::io

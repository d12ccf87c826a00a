// PEFT adapter directories, read and written as Hugging Face PEFT does:
//
//   adapter_model.safetensors  base_model.model.<module>.lora_A.weight   [r, d_in]
//                              base_model.model.<module>.lora_B.weight   [d_out, r]
//                              base_model.model.<module>.lora_magnitude_vector   [d_out]
//                                (DoRA only: use_dora = true in the config, one per module)
//                              F32 by default, metadata {"format": "pt"}
//   adapter_config.json        the LoraConfig, json.dumps(indent=2, sort_keys=True)
//
// A and B keep these shapes with fan_in_fan_out too (GPT-2's Conv1D stores W
// transposed, d_in x d_out; only a merge sees the difference: it adds
// (s B A)^T). The scale of a module is s = alpha / r, or alpha / sqrt(r) with
// use_rslora, where r and alpha come from rank_pattern / alpha_pattern when a
// pattern matches the module's name. A DoRA module's merged weight is
// W' = (m / ||W + s B A||_row) o (W + s B A), one norm per output (merge_module).
//
// lora::io::Adapter is the host-side form of such a directory; it copies to and
// from lora::Linear layers and lora::LoraAdapters on any backend (a whole
// lora::Model saves and loads its adapters through it, <lora/model.hpp>).
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>
#include <re2/re2.h>

#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/file.hpp"
#include "lora/io/json.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/layers/linear.hpp"

namespace lora::io {

inline constexpr const char* kPeftWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kPeftConfigFile = "adapter_config.json";
inline constexpr const char* kPeftKeyPrefix = "base_model.model.";

// Bounds on what rank_pattern / alpha_pattern matching accepts (a lora::Error
// beyond): module names are a few dozen bytes in practice; a pattern may be a
// module name with every character escaped.
inline constexpr std::size_t kMaxModuleNameBytes = 4096;
inline constexpr std::size_t kMaxPatternBytes = 2 * kMaxModuleNameBytes;

namespace detail {

// A rank_pattern or alpha_pattern, compiled once. PEFT's rule
// (peft.utils.other.get_pattern_key): the value of the first pattern p, in file
// order, for which re.match(rf"(.*\.)?({p})$", module) matches, i.e. for which
// "(.*\.)?(p)" matches the whole module name. RE2 runs in time linear in the
// name (no backtracking, no recursion), whatever the pattern; it reads
// Python's syntax except lookaround, backreferences and a few more (docs/io.md).
template <class V>
class ModulePatterns {
 public:
  ModulePatterns(const std::vector<std::pair<std::string, V>>& patterns, const char* what) : what_(what) {
    RE2::Options options;
    options.set_log_errors(false);
    for (const auto& [pattern, value] : patterns) {
      LORA_CHECK(pattern.size() <= kMaxPatternBytes, what << " key " << quote_excerpt(pattern, 80) << " has "
                                                          << pattern.size() << " bytes, more than the "
                                                          << kMaxPatternBytes << " accepted");
      auto re = std::make_unique<RE2>("(.*\\.)?(" + pattern + ")", options);
      LORA_CHECK(re->ok(), what << " key " << quote_excerpt(pattern) << " is not a regular expression RE2 accepts: "
                                << quote_excerpt(re->error()) << " (RE2 has no lookaround or backreferences; see docs/io.md)");
      compiled_.emplace_back(std::move(re), value);
    }
  }

  // The value of the first pattern that matches `module`, or nullptr.
  const V* find(const std::string& module) const {
    if (compiled_.empty()) return nullptr;
    LORA_CHECK(module.size() <= kMaxModuleNameBytes, what_ << ": module name " << quote_excerpt(module, 80) << " has "
                                                           << module.size() << " bytes, more than the "
                                                           << kMaxModuleNameBytes << " accepted");
    for (const auto& [re, value] : compiled_)
      if (RE2::FullMatch(module, *re)) return &value;
    return nullptr;
  }

 private:
  const char* what_;
  std::vector<std::pair<std::unique_ptr<RE2>, V>> compiled_;
};

}  // namespace detail

// ---- init_lora_weights ---------------------------------------------------------------

// PEFT's init_lora_weights: true, false or a string.
using PeftInit = std::variant<bool, std::string>;

// The value PEFT writes for an init: true for Init::kaiming_uniform (PEFT's
// default), else its name ("gaussian", "pissa", "pissa_niter_4", "olora").
inline PeftInit peft_init_value(Init init, int pissa_niter = 0) {
  if (init == Init::kaiming_uniform) return true;
  return to_string(init, pissa_niter);
}

// Sets c.init and c.pissa_niter to the init `value` names: true, "gaussian"
// and "olora" (any case, as PEFT compares them), "pissa", "pissa_niter_<N>"
// (N >= 1). Any other value is a lora::Error that names it: false (PEFT then
// leaves B non-zero, a setting for its tests), and the inits this library does
// not run ("loftq", "eva", "corda", "orthogonal", ...). Adapters loaded from
// files never run an init, so those load.
inline void apply_peft_init(const PeftInit& value, Config& c) {
  const std::string expected =
      "; a new adapter starts from init_lora_weights = true, \"gaussian\", \"pissa\", \"pissa_niter_<N>\" or \"olora\"";
  if (const bool* b = std::get_if<bool>(&value)) {
    LORA_CHECK(*b, "init_lora_weights = false: PEFT then leaves A and B at torch's nn.Linear init (B non-zero, so the "
                   "adapter changes the model before any training; PEFT uses it in its tests)"
                       << expected);
    c.init = Init::kaiming_uniform;
    c.pissa_niter = 0;
    return;
  }
  const std::string& name = std::get<std::string>(value);
  std::string lower = name;
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const std::string quoted = detail::quote_excerpt(name, 80);
  c.pissa_niter = 0;
  if (lower == "gaussian") {
    c.init = Init::gaussian;
  } else if (lower == "olora") {
    c.init = Init::olora;
  } else if (name == "pissa") {
    c.init = Init::pissa;
  } else if (name.rfind("pissa_niter_", 0) == 0) {
    const std::string digits = name.substr(12);
    const bool ok = !digits.empty() && digits.size() <= 6 &&
                    std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; }) &&
                    std::stoi(digits) >= 1;
    LORA_CHECK(ok, "init_lora_weights = " << quoted << ": expected \"pissa_niter_<N>\" with N an integer in [1, 999999] "
                                          << "(power iterations of the randomized SVD; \"pissa\" for the exact one)");
    c.init = Init::pissa;
    c.pissa_niter = std::stoi(digits);
  } else if (lower == "loftq") {
    LORA_CHECK(false, "init_lora_weights = " << quoted << " (LoftQ: W replaced by its quantized form and A, B fitted to "
                                             << "the quantization error) is not run by this library" << expected);
  } else if (lower == "eva" || lower.rfind("corda", 0) == 0) {
    LORA_CHECK(false, "init_lora_weights = " << quoted << " initialises from the layers' inputs (a pass over data, "
                                             << "PeftModel's initialize_lora_eva_weights / preprocess_corda), which this "
                                             << "library does not run" << expected);
  } else {
    LORA_CHECK(false, "init_lora_weights = " << quoted << " is not an init this library runs" << expected);
  }
}

// PEFT's LoraConfig: the keys this library acts on, typed; every other key is
// kept in `other` and written back unchanged.
struct PeftConfig {
  int r = 8;
  double lora_alpha = 8.0;
  std::vector<std::string> target_modules;  // module-name suffixes (PEFT's list form)
  std::string target_modules_regex;         // PEFT's string form, a full-match regex, or "all-linear"; empty with the list form
  std::vector<std::string> exclude_modules;  // names never adapted: the list form (equal, or ends with "." + entry) ...
  std::string exclude_modules_regex;         // ... or the string form (full-match regex)
  std::vector<int> layers_to_transform;      // only these layer indices (empty: all), with the list form of target_modules
  std::vector<std::string> layers_pattern;   // the name before the layer index ("layers", "h"); empty: any
  bool use_rslora = false;
  bool fan_in_fan_out = false;
  bool use_dora = false;  // every module has a magnitude m (lora_magnitude_vector, [d_out])
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
  // How a new adapter starts (apply_peft_init): true, "gaussian", "pissa",
  // "pissa_niter_<N>", "olora". Any other value PEFT writes (false, "loftq",
  // ...) is kept and written back, and refused only where an adapter would
  // have to be initialised with it (Model::add_adapter). "pissa" and "olora"
  // in a saved adapter mean its A and B fit the residual base, not the original W.
  PeftInit init_lora_weights = true;
  nlohmann::json other = nlohmann::json::object();

  // r, alpha and scale of many modules, with rank_pattern and alpha_pattern
  // compiled once (the methods of PeftConfig below compile them on each call).
  // Holds a copy of what it needs: it may outlive the config.
  class Resolver {
   public:
    explicit Resolver(const PeftConfig& c)
        : r_(c.r), alpha_(c.lora_alpha), dropout_(c.lora_dropout), use_rslora_(c.use_rslora),
          fan_in_fan_out_(c.fan_in_fan_out), use_dora_(c.use_dora), init_(c.init_lora_weights),
          ranks_(c.rank_pattern, "rank_pattern"),
          alphas_(c.alpha_pattern, "alpha_pattern") {}

    int rank_for(const std::string& module) const {
      const int* r = ranks_.find(module);
      return r ? *r : r_;
    }
    double alpha_for(const std::string& module) const {
      const double* alpha = alphas_.find(module);
      return alpha ? *alpha : alpha_;
    }
    // s = alpha / r, or alpha / sqrt(r) with use_rslora.
    double scale_for(const std::string& module) const {
      const double rank = rank_for(module);
      return use_rslora_ ? alpha_for(module) / std::sqrt(rank) : alpha_for(module) / rank;
    }
    // The lora::Config of a layer that holds `module` (init and seed are left at their defaults).
    Config layer_config(const std::string& module) const {
      Config c;
      c.r = rank_for(module);
      c.alpha = alpha_for(module);
      c.dropout = dropout_;
      c.use_rslora = use_rslora_;
      c.fan_in_fan_out = fan_in_fan_out_;
      c.use_dora = use_dora_;
      return c;
    }
    // The Config of a new adapter on `module`: layer_config with the init that
    // init_lora_weights names (apply_peft_init: a lora::Error for one this
    // library does not run). layer_config leaves the init at its default, so
    // that a layer built to hold a loaded adapter never rewrites its W.
    Config new_adapter_config(const std::string& module) const {
      Config c = layer_config(module);
      apply_peft_init(init_, c);
      return c;
    }

   private:
    int r_;
    double alpha_, dropout_;
    bool use_rslora_, fan_in_fan_out_, use_dora_;
    PeftInit init_;
    detail::ModulePatterns<int> ranks_;
    detail::ModulePatterns<double> alphas_;
  };

  Resolver resolver() const { return Resolver(*this); }
  int rank_for(const std::string& module) const { return resolver().rank_for(module); }
  double alpha_for(const std::string& module) const { return resolver().alpha_for(module); }
  double scale_for(const std::string& module) const { return resolver().scale_for(module); }
  Config layer_config(const std::string& module) const { return resolver().layer_config(module); }

  // From a parsed adapter_config.json (ordered, so pattern order is the file's).
  static PeftConfig from_json(const nlohmann::ordered_json& j, const std::string& source);
  // The JSON PEFT writes: sorted keys (nlohmann::json is ordered by key).
  nlohmann::json to_json() const;
  // Exactly the bytes PEFT writes: json.dumps(indent=2, sort_keys=True), ASCII, no final newline.
  std::string to_json_text() const { return to_json().dump(2, ' ', /*ensure_ascii=*/true); }
};

// One LoRA module of an adapter, on the host.
struct AdapterModule {
  cpu::Matrix<float> A;  // lora_A.weight, r x d_in
  cpu::Matrix<float> B;  // lora_B.weight, d_out x r
  cpu::Matrix<float> magnitude;  // DoRA's lora_magnitude_vector, 1 x d_out; empty (0 x 0) for plain LoRA
  int r = 0;
  double alpha = 0.0;
  double scale = 0.0;                  // alpha / r (alpha / sqrt(r) with rsLoRA)
  Dtype stored_dtype = Dtype::F32;     // as found in the file it came from

  std::int64_t d_in() const { return A.cols(); }
  std::int64_t d_out() const { return B.rows(); }
  bool dora() const { return magnitude.size() != 0; }
  std::int64_t parameters() const { return A.size() + B.size() + magnitude.size(); }
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
  // Every key this library acts on is type-checked; a value from the file is quoted only as an excerpt.
  auto bad = [&](const std::string& key, const char* expected) {
    LORA_CHECK(false, source << ": \"" << key << "\" is " << detail::json_excerpt(j.at(key)) << ", expected " << expected);
  };
  auto given = [&](const char* key) { return j.contains(key) && !j.at(key).is_null(); };
  auto get_bool = [&](const char* key, bool& out) {
    if (!given(key)) return;
    if (!j.at(key).is_boolean()) bad(key, "true or false");
    out = j.at(key).get<bool>();
  };
  auto get_optional_string = [&](const char* key, std::optional<std::string>& out) {
    if (!given(key)) return;
    if (!j.at(key).is_string()) bad(key, "a string or null");
    out = j.at(key).get<std::string>();
  };
  auto get_string_list = [&](const char* key) {
    std::vector<std::string> out;
    if (!j.at(key).is_array()) bad(key, "a list of strings");
    for (const auto& v : j.at(key)) {
      if (!v.is_string()) bad(key, "a list of strings");
      out.push_back(v.get<std::string>());
    }
    return out;
  };
  // An integer in [1, 2^30] (r and rank_pattern's values).
  auto is_rank = [](const nlohmann::ordered_json& v) {
    return detail::json_is_integer(v) && v.get<std::int64_t>() >= 1 && v.get<std::int64_t>() <= (1 << 30);
  };
  auto is_positive_number = [](const nlohmann::ordered_json& v) { return v.is_number() && v.get<double>() > 0.0; };

  LORA_CHECK(j.contains("peft_type"), source << ": no \"peft_type\"; is this a PEFT adapter_config.json?");
  LORA_CHECK(j.at("peft_type") == "LORA", source << ": peft_type is " << detail::json_excerpt(j.at("peft_type"))
                                                 << "; only \"LORA\" adapters are supported");
  bool lora_bias = false;
  get_bool("lora_bias", lora_bias);
  LORA_CHECK(!lora_bias, source << ": lora_bias is true: a bias on lora_B is not supported yet");

  if (j.contains("r")) {
    if (!is_rank(j.at("r"))) bad("r", "an integer in [1, 2^30]");
    c.r = j.at("r").get<int>();
  }
  if (j.contains("lora_alpha")) {
    if (!is_positive_number(j.at("lora_alpha"))) bad("lora_alpha", "a number > 0");
    c.lora_alpha = j.at("lora_alpha").get<double>();
  }
  if (given("lora_dropout")) {
    const auto& v = j.at("lora_dropout");
    if (!v.is_number() || v.get<double>() < 0.0 || v.get<double>() >= 1.0) bad("lora_dropout", "a number in [0, 1)");
    c.lora_dropout = v.get<double>();
  }
  if (given("target_modules")) {
    if (j.at("target_modules").is_string()) {
      c.target_modules_regex = j.at("target_modules").get<std::string>();
    } else if (j.at("target_modules").is_array()) {
      c.target_modules = get_string_list("target_modules");
    } else {
      bad("target_modules", "a list of strings, a string or null");
    }
  }
  if (given("exclude_modules")) {
    if (j.at("exclude_modules").is_string()) {
      c.exclude_modules_regex = j.at("exclude_modules").get<std::string>();
    } else {
      c.exclude_modules = get_string_list("exclude_modules");
    }
  }
  if (given("layers_to_transform")) {
    const auto& v = j.at("layers_to_transform");
    auto is_index = [](const nlohmann::ordered_json& e) {
      return detail::json_is_integer(e) && e.get<std::int64_t>() >= 0 && e.get<std::int64_t>() <= (1 << 30);
    };
    if (is_index(v)) {
      c.layers_to_transform.push_back(v.get<int>());
    } else {
      if (!v.is_array()) bad("layers_to_transform", "an integer >= 0, a list of them, or null");
      for (const auto& e : v) {
        if (!is_index(e)) bad("layers_to_transform", "an integer >= 0, a list of them, or null");
        c.layers_to_transform.push_back(e.get<int>());
      }
    }
  }
  if (given("layers_pattern")) {
    if (j.at("layers_pattern").is_string()) {
      c.layers_pattern.push_back(j.at("layers_pattern").get<std::string>());
    } else {
      c.layers_pattern = get_string_list("layers_pattern");
    }
  }
  if (given("modules_to_save")) c.modules_to_save = get_string_list("modules_to_save");
  get_bool("use_rslora", c.use_rslora);
  get_bool("fan_in_fan_out", c.fan_in_fan_out);
  get_bool("use_dora", c.use_dora);
  get_bool("inference_mode", c.inference_mode);
  if (given("bias")) {
    const auto& v = j.at("bias");
    if (!(v == "none" || v == "all" || v == "lora_only")) bad("bias", "\"none\", \"all\" or \"lora_only\"");
    c.bias = v.get<std::string>();
  }
  get_optional_string("base_model_name_or_path", c.base_model_name_or_path);
  get_optional_string("task_type", c.task_type);
  if (given("rank_pattern")) {
    if (!j.at("rank_pattern").is_object()) bad("rank_pattern", "an object of integers");
    for (const auto& [pattern, v] : j.at("rank_pattern").items()) {
      if (!is_rank(v)) bad("rank_pattern", "an object of integers in [1, 2^30]");
      c.rank_pattern.emplace_back(pattern, v.get<int>());
    }
  }
  if (given("alpha_pattern")) {
    if (!j.at("alpha_pattern").is_object()) bad("alpha_pattern", "an object of numbers");
    for (const auto& [pattern, v] : j.at("alpha_pattern").items()) {
      if (!is_positive_number(v)) bad("alpha_pattern", "an object of numbers > 0");
      c.alpha_pattern.emplace_back(pattern, v.get<double>());
    }
  }
  if (given("init_lora_weights")) {
    const auto& v = j.at("init_lora_weights");
    if (v.is_boolean()) {
      c.init_lora_weights = v.get<bool>();
    } else if (v.is_string()) {
      c.init_lora_weights = v.get<std::string>();
    } else {
      bad("init_lora_weights", "true, false or a string");
    }
  }
  static const std::set<std::string> kTyped = {
      "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora",
      "fan_in_fan_out", "use_dora", "inference_mode", "bias", "base_model_name_or_path", "task_type", "rank_pattern",
      "alpha_pattern", "init_lora_weights"};
  // Kept typed only when given: a null stays in `other` and is written back as it was.
  static const std::set<std::string> kTypedWhenGiven = {"exclude_modules", "layers_to_transform", "layers_pattern"};
  for (const auto& [key, value] : j.items())
    if (!kTyped.count(key) && !(kTypedWhenGiven.count(key) && !value.is_null())) c.other[key] = nlohmann::json::parse(value.dump());  // (depth bounded by the parse)
  return c;
}

inline nlohmann::json PeftConfig::to_json() const {
  // Keys every PEFT version since rank_pattern (0.6) reads, with PEFT's defaults;
  // a loaded config's own values (in `other`) take their place.
  nlohmann::json j = {{"layers_pattern", nullptr}, {"layers_to_transform", nullptr}, {"revision", nullptr}};
  for (const auto& [key, value] : other.items()) j[key] = value;
  j["peft_type"] = "LORA";
  if (const bool* b = std::get_if<bool>(&init_lora_weights)) {
    j["init_lora_weights"] = *b;
  } else {
    j["init_lora_weights"] = std::get<std::string>(init_lora_weights);
  }
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
  if (!exclude_modules_regex.empty()) {
    j["exclude_modules"] = exclude_modules_regex;
  } else if (!exclude_modules.empty()) {
    j["exclude_modules"] = exclude_modules;
  }
  if (!layers_to_transform.empty()) j["layers_to_transform"] = layers_to_transform;
  if (layers_pattern.size() == 1) {
    j["layers_pattern"] = layers_pattern.front();
  } else if (!layers_pattern.empty()) {
    j["layers_pattern"] = layers_pattern;
  }
  j["modules_to_save"] = modules_to_save ? nlohmann::json(*modules_to_save) : nlohmann::json(nullptr);
  j["use_rslora"] = use_rslora;
  j["fan_in_fan_out"] = fan_in_fan_out;
  j["use_dora"] = use_dora;
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

// ---- which modules a config adapts -----------------------------------------------------

// The module names, of `modules` and in their order, that `config` adapts,
// by PEFT's rules (peft.tuners.tuners_utils.check_target_module_exists):
//   - exclude_modules first: a list entry e excludes a name equal to e or
//     ending with "." + e; a string is a full-match regex;
//   - target_modules as a string: a full-match regex;
//   - as a list: a name equal to an entry is adapted; a name ending with
//     "." + entry is adapted if, with layers_to_transform given, its layer index
//     is one of them: the number in ".<p>.<index>." for a layers_pattern p (the
//     first that matches), or in "<any>.<index>." without one (Python's
//     re.match(r".*\.{p}\.(\d+)\.", name): the last such index in the name);
//   - "all-linear" (any case): the list of every module's last name component,
//     less `output_head` (PEFT removes the output layer, model.get_output_embeddings(),
//     by its full name from that set: a top-level "lm_head" goes; one nested deeper does not).
// Regexes run on RE2 (docs/io.md says what of Python's syntax it lacks).
inline std::vector<std::string> select_target_modules(const PeftConfig& config, const std::vector<std::string>& modules,
                                                      const std::string& output_head = "") {
  RE2::Options options;
  options.set_log_errors(false);
  auto compile = [&](const std::string& pattern, const char* what) {
    LORA_CHECK(pattern.size() <= kMaxPatternBytes,
               what << " " << detail::quote_excerpt(pattern, 80) << " has " << pattern.size() << " bytes, more than the "
                    << kMaxPatternBytes << " accepted");
    auto re = std::make_unique<RE2>(pattern, options);
    LORA_CHECK(re->ok(), what << " " << detail::quote_excerpt(pattern) << " is not a regular expression RE2 accepts: "
                              << detail::quote_excerpt(re->error()) << " (RE2 has no lookaround or backreferences; see docs/io.md)");
    return re;
  };
  auto listed = [](const std::string& name, const std::vector<std::string>& list) {
    for (const std::string& e : list)
      if (name == e || detail::ends_with(name, "." + e)) return true;
    return false;
  };
  auto last_component = [](const std::string& name) {
    const std::size_t dot = name.rfind('.');
    return dot == std::string::npos ? name : name.substr(dot + 1);
  };

  std::string lowered = config.target_modules_regex;
  for (char& ch : lowered) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const bool all_linear = lowered == "all-linear";
  bool list_form = config.target_modules_regex.empty() || all_linear;
  std::vector<std::string> targets = config.target_modules;
  if (all_linear) {
    std::set<std::string> names;
    for (const std::string& m : modules) names.insert(last_component(m));
    names.erase(output_head);
    targets.assign(names.begin(), names.end());
  }
  LORA_CHECK(!list_form || !targets.empty() || all_linear,
             "target_modules is empty: name the modules to adapt (a list of names or suffixes, a regex, or \"all-linear\")");
  std::unique_ptr<RE2> target_re, exclude_re;
  if (!list_form) target_re = compile(config.target_modules_regex, "target_modules");
  if (!config.exclude_modules_regex.empty()) exclude_re = compile(config.exclude_modules_regex, "exclude_modules");
  std::vector<std::unique_ptr<RE2>> layer_res;
  if (config.layers_pattern.empty()) {
    layer_res.push_back(compile(R"(^.*\.[^.]*\.(\d+)\.)", "layers_pattern"));
  } else {
    for (const std::string& p : config.layers_pattern)
      layer_res.push_back(compile("^.*\\." + p + R"(\.(\d+)\.)", "layers_pattern"));
  }
  const std::set<int> layers(config.layers_to_transform.begin(), config.layers_to_transform.end());

  std::vector<std::string> out;
  for (const std::string& m : modules) {
    LORA_CHECK(m.size() <= kMaxModuleNameBytes, "module name " << detail::quote_excerpt(m, 80) << " has " << m.size()
                                                               << " bytes, more than the " << kMaxModuleNameBytes
                                                               << " accepted");
    if (exclude_re ? RE2::FullMatch(m, *exclude_re) : listed(m, config.exclude_modules)) continue;
    bool found = false;
    if (!list_form) {
      found = RE2::FullMatch(m, *target_re);
    } else if (std::find(targets.begin(), targets.end(), m) != targets.end()) {
      found = true;  // named in full: layers_to_transform does not apply (as in PEFT)
    } else {
      found = listed(m, targets);
      if (found && !layers.empty()) {
        std::string index;
        bool has_index = false;
        for (const auto& re : layer_res)
          if ((has_index = RE2::PartialMatch(m, *re, &index))) break;
        found = has_index && index.size() <= 9 && layers.count(std::stoi(index)) != 0;
      }
    }
    if (found) out.push_back(m);
  }
  return out;
}

// ---- loading and saving a directory -----------------------------------------------------

namespace detail {

// The adapter that a parsed adapter_config.json and a validated weights file
// describe: load_peft's work once the files are read. Everything is checked
// (pairs, shapes, ranks, names, the memory the tensors need) before any
// tensor is read.
inline Adapter adapter_from(const nlohmann::ordered_json& config_json, const std::string& config_source,
                            const SafetensorsReader& reader) {
  const std::string& weights_path = reader.source();
  Adapter adapter;
  adapter.config = PeftConfig::from_json(config_json, config_source);
  adapter.file_metadata = reader.metadata();

  // 1. Sort the keys: LoRA pairs (and DoRA magnitudes) by module (PEFT writes every key as
  //    base_model.model.<module>.lora_X.weight and base_model.model.<module>.lora_magnitude_vector), the rest aside.
  struct Pair {
    const TensorInfo* A = nullptr;
    const TensorInfo* B = nullptr;
    const TensorInfo* magnitude = nullptr;
  };
  std::map<std::string, Pair> pairs;
  std::vector<const TensorInfo*> others;
  const std::string* unprefixed = nullptr;  // the first LoRA key without the prefix
  const std::string prefix = kPeftKeyPrefix;
  const std::string magnitude_suffix = ".lora_magnitude_vector";
  for (const TensorInfo& t : reader.tensors()) {
    const std::string& key = t.name;
    const bool is_magnitude = ends_with(key, magnitude_suffix);
    // PEFT saves DoRA's magnitude without the ".weight" of its in-memory ModuleDict (and adds it back on load).
    LORA_CHECK(is_magnitude || key.find("lora_magnitude_vector") == std::string::npos,
               weights_path << ": tensor " << quote_excerpt(key) << " is a DoRA magnitude spelled as PEFT never saves "
                            << "it; expected base_model.model.<module>" << magnitude_suffix);
    LORA_CHECK(key.find("lora_embedding_A") == std::string::npos && key.find("lora_embedding_B") == std::string::npos,
               weights_path << ": tensor " << quote_excerpt(key)
                            << " belongs to an embedding adapter (lora_embedding_A/B); only linear layers are supported");
    const bool is_A = ends_with(key, ".lora_A.weight");
    const bool is_B = ends_with(key, ".lora_B.weight");
    if (!is_A && !is_B && !is_magnitude) {
      LORA_CHECK(key.find(".lora_A.") == std::string::npos && key.find(".lora_B.") == std::string::npos,
                 weights_path << ": tensor " << quote_excerpt(key)
                              << " is a LoRA tensor of a kind not supported (expected <module>.lora_A.weight or "
                                 "<module>.lora_B.weight)");
      others.push_back(&t);
      continue;
    }
    std::string module = key.substr(0, key.size() - (is_magnitude ? magnitude_suffix : std::string(".lora_A.weight")).size());
    if (module.compare(0, prefix.size(), prefix) == 0) {
      module = module.substr(prefix.size());
    } else if (!unprefixed) {
      unprefixed = &key;
    }
    LORA_CHECK(!module.empty(), weights_path << ": tensor " << quote_excerpt(key) << " names no module");
    LORA_CHECK(module.size() <= kMaxModuleNameBytes, weights_path << ": tensor " << quote_excerpt(key, 80) << ": the module name has "
                                                                  << module.size() << " bytes, more than the "
                                                                  << kMaxModuleNameBytes << " accepted");
    const TensorInfo*& slot = is_magnitude ? pairs[module].magnitude : is_A ? pairs[module].A : pairs[module].B;
    LORA_CHECK(slot == nullptr, weights_path << ": tensors " << quote_excerpt(slot->name) << " and " << quote_excerpt(key)
                                             << " are both " << (is_magnitude ? "lora_magnitude_vector" : is_A ? "lora_A" : "lora_B")
                                             << " of module " << quote_excerpt(module) << " (with and without the \""
                                             << prefix << "\" prefix)");
    slot = &t;
  }
  LORA_CHECK(!unprefixed, weights_path << ": tensor " << quote_excerpt(*unprefixed) << " lacks the \"" << prefix
                                       << "\" prefix that PEFT writes on every key (PEFT would not load it)");

  // 2. Check every pair against itself and the config, and what holding it all in memory takes.
  const PeftConfig::Resolver resolver = adapter.config.resolver();
  std::uint64_t bytes_needed = 0;
  for (const auto& [module, pair] : pairs) {
    LORA_CHECK(pair.A || pair.B, weights_path << ": module " << quote_excerpt(module)
                                              << " has a lora_magnitude_vector but no lora_A and lora_B");
    LORA_CHECK(pair.A && pair.B, weights_path << ": module " << quote_excerpt(module) << " has lora_"
                                              << (pair.A ? "A" : "B") << " but no lora_" << (pair.A ? "B" : "A"));
    LORA_CHECK(pair.magnitude || !adapter.config.use_dora,
               weights_path << ": module " << quote_excerpt(module) << " has no lora_magnitude_vector, but "
                            << config_source << " has use_dora = true: every module of a DoRA adapter needs one");
    LORA_CHECK(!pair.magnitude || adapter.config.use_dora,
               weights_path << ": tensor " << quote_excerpt(pair.magnitude->name) << " is a DoRA magnitude, but "
                            << config_source << " does not set use_dora = true (PEFT would ignore it); set it, or "
                            << "remove the tensor");
    for (const TensorInfo* t : {pair.A, pair.B}) {
      LORA_CHECK(is_floating(t->dtype), weights_path << ": tensor " << quote_excerpt(t->name) << " has dtype "
                                                     << dtype_name(t->dtype) << ", expected F16, BF16, F32 or F64");
      LORA_CHECK(t->shape.size() == 2 && t->shape[0] >= 1 && t->shape[1] >= 1,
                 weights_path << ": tensor " << quote_excerpt(t->name) << " has shape " << shape_string(t->shape)
                              << ", expected a non-empty matrix");
      bytes_needed += t->numel * sizeof(float);  // (numel * 8 fits 64 bits: the header was validated)
    }
    const std::int64_t r = pair.A->shape[0];
    LORA_CHECK(pair.B->shape[1] == r, weights_path << ": module " << quote_excerpt(module) << ": lora_A is "
                                                   << shape_string(pair.A->shape) << " (r = " << r << ") but lora_B is "
                                                   << shape_string(pair.B->shape) << ", expected [d_out, " << r << "]");
    const int expected_r = resolver.rank_for(module);
    LORA_CHECK(r == expected_r, weights_path << ": module " << quote_excerpt(module) << " has rank " << r << " but "
                                             << config_source << " gives r = " << expected_r
                                             << (adapter.config.rank_pattern.empty() ? "" : " (after rank_pattern)"));
    if (const TensorInfo* t = pair.magnitude) {  // m: one value per output, d_out = the rows of B
      LORA_CHECK(is_floating(t->dtype), weights_path << ": tensor " << quote_excerpt(t->name) << " has dtype "
                                                     << dtype_name(t->dtype) << ", expected F16, BF16, F32 or F64");
      LORA_CHECK(t->shape.size() == 1 && t->shape[0] == pair.B->shape[0],
                 weights_path << ": tensor " << quote_excerpt(t->name) << " has shape " << shape_string(t->shape)
                              << ", expected [" << pair.B->shape[0] << "] (d_out: lora_B is "
                              << shape_string(pair.B->shape) << ")");
      bytes_needed += t->numel * sizeof(float);
    }
  }
  for (const TensorInfo* t : others) bytes_needed += t->bytes();
  check_fits_in_memory(weights_path + ": the adapter's tensors", bytes_needed);

  // 3. Read.
  for (const auto& [module, pair] : pairs) {
    AdapterModule m;
    m.r = static_cast<int>(pair.A->shape[0]);
    m.alpha = resolver.alpha_for(module);
    m.scale = resolver.scale_for(module);
    m.stored_dtype = pair.A->dtype;
    for (const TensorInfo* t : {pair.A, pair.B, pair.magnitude}) {
      if (!t) continue;
      cpu::Matrix<float>& dst = t == pair.A ? m.A : t == pair.B ? m.B : m.magnitude;
      const std::int64_t rows = t == pair.magnitude ? 1 : t->shape[0], cols = t->shape.back();  // m: [d_out] as 1 x d_out
      dst = allocate_for(weights_path + ": tensor " + quote_excerpt(t->name) + " " + shape_string(t->shape) + " as float",
                         t->numel * sizeof(float), [&] { return cpu::Matrix<float>(rows, cols); });
      reader.read_into(t->name, dst.view());
    }
    adapter.modules.emplace(module, std::move(m));
  }
  for (const TensorInfo* t : others) adapter.other_tensors.emplace(t->name, reader.read_raw(t->name));
  return adapter;
}

}  // namespace detail

// Reads dir/adapter_config.json and dir/adapter_model.safetensors. Every LoRA
// pair is checked against the config (r per rank_pattern) and against itself
// (A r x d_in, B d_out x r); every LoRA key must carry PEFT's
// "base_model.model." prefix; tensors that are not LoRA pairs go to
// other_tensors; a DoRA adapter (use_dora) must have a lora_magnitude_vector
// [d_out] for every module, and only a DoRA adapter may have one; embedding
// adapters are refused with a lora::Error.
// Any failure (a missing or special file, a symlink loop, too little memory)
// is a lora::Error naming the file.
inline Adapter load_peft(const std::string& dir) {
  namespace fs = std::filesystem;
  return detail::with_file_errors(dir, [&] {
    const std::string config_path = (fs::path(dir) / kPeftConfigFile).string();
    const std::string weights_path = (fs::path(dir) / kPeftWeightsFile).string();
    std::error_code ec;
    LORA_CHECK(fs::is_directory(dir, ec), dir << ": not a directory (expected a PEFT adapter directory)"
                                              << (ec ? ": " + ec.message() : std::string()));
    if (!fs::exists(weights_path, ec) && fs::exists(fs::path(dir) / "adapter_model.bin", ec))
      LORA_CHECK(false, dir << " holds adapter_model.bin (a pickle) and no " << kPeftWeightsFile
                            << "; convert it with PEFT (save_pretrained(safe_serialization=True)) first");
    detail::check_regular_file(config_path);
    detail::check_regular_file(weights_path);
    const nlohmann::ordered_json config = read_untrusted_json(config_path, std::uintmax_t{1} << 24);
    return detail::adapter_from(config, config_path, SafetensorsReader::open(weights_path));
  });
}

// load_peft from the two files' contents in memory (what the fuzzer and the
// tests use); `source` stands for the directory in messages.
inline Adapter load_peft_from_memory(const std::string& config_json, std::vector<std::uint8_t> weights,
                                     const std::string& source = "<memory>") {
  return detail::with_file_errors(source, [&] {
    const std::string config_source = source + "/" + kPeftConfigFile;
    const nlohmann::ordered_json config = parse_untrusted_json(config_json, config_source);
    return detail::adapter_from(config, config_source,
                                SafetensorsReader::from_memory(std::move(weights), source + "/" + kPeftWeightsFile));
  });
}

namespace detail {

// A DoRA module's m holds one value per output: 1 x d_out.
inline void check_magnitude_shape(const AdapterModule& m, const std::string& what) {
  LORA_CHECK(!m.dora() || (m.magnitude.rows() == 1 && m.magnitude.cols() == m.d_out()),
             what << ": the DoRA magnitude is [" << m.magnitude.rows() << ", " << m.magnitude.cols() << "], expected [1, "
                  << m.d_out() << "] (one per output)");
}

// The adapter_model.safetensors of `adapter`, LoRA tensors as `dtype` (save_peft's checks included).
inline SafetensorsWriter peft_weights(const Adapter& adapter, Dtype dtype) {
  LORA_CHECK(is_floating(dtype), "save_peft: dtype " << dtype_name(dtype) << ", expected F16, BF16, F32 or F64");
  SafetensorsWriter writer;
  for (const auto& [key, value] : adapter.file_metadata) writer.set_metadata(key, value);
  if (!writer.metadata().count("format")) writer.set_metadata("format", "pt");
  const PeftConfig::Resolver resolver = adapter.config.resolver();
  for (const auto& [module, m] : adapter.modules) {
    LORA_CHECK(m.A.rows() == m.r && m.B.cols() == m.r && m.r >= 1,
               "save_peft: module \"" << module << "\": A is [" << m.A.rows() << ", " << m.A.cols() << "], B is ["
                                      << m.B.rows() << ", " << m.B.cols() << "], r = " << m.r);
    const int config_r = resolver.rank_for(module);
    const double config_alpha = resolver.alpha_for(module);
    LORA_CHECK(config_r == m.r, "save_peft: module \"" << module << "\" has r = " << m.r << " but the config gives "
                                                       << config_r << "; add it to config.rank_pattern");
    LORA_CHECK(config_alpha == m.alpha, "save_peft: module \"" << module << "\" has alpha = " << m.alpha
                                                               << " but the config gives " << config_alpha
                                                               << "; add it to config.alpha_pattern");
    LORA_CHECK(m.dora() == adapter.config.use_dora,
               "save_peft: module \"" << module << "\" " << (m.dora() ? "has a" : "has no") << " DoRA magnitude but "
                                      << "config.use_dora is " << (adapter.config.use_dora ? "true" : "false")
                                      << "; PEFT needs one magnitude per module exactly when use_dora is true");
    check_magnitude_shape(m, "save_peft: module \"" + module + "\"");
    writer.add(kPeftKeyPrefix + module + ".lora_A.weight", m.A.view(), dtype);
    writer.add(kPeftKeyPrefix + module + ".lora_B.weight", m.B.view(), dtype);
    if (m.dora())  // PEFT's key and shape: [d_out], no ".weight"
      writer.add(kPeftKeyPrefix + module + ".lora_magnitude_vector", {m.d_out()}, m.magnitude.data(), dtype);
  }
  for (const auto& [key, tensor] : adapter.other_tensors) writer.add_raw(key, tensor);
  return writer;
}

}  // namespace detail

// Writes dir/adapter_model.safetensors (LoRA tensors as `dtype`, other tensors
// as they were) and dir/adapter_config.json as a pair: both go into a fresh
// directory that then takes dir's place in one step (write_directory_atomically:
// other files in dir are carried over, permissions kept, stale temporaries of
// killed saves removed), so a reader never sees new weights beside an old
// config. Every module's r and alpha must be what the config gives it (r,
// lora_alpha, or a rank_pattern / alpha_pattern entry), or PEFT would load it wrongly.
inline void save_peft(const Adapter& adapter, const std::string& dir, Dtype dtype = Dtype::F32) {
  const SafetensorsWriter writer = detail::peft_weights(adapter, dtype);
  const std::string config_text = adapter.config.to_json_text();
  detail::with_file_errors(dir, [&] {
    write_directory_atomically(dir, [&](DirectorySink& files) {
      files.write(kPeftWeightsFile, [&](FileSink& sink) { writer.write_to(sink); });
      files.write(kPeftConfigFile, config_text);
    });
  });
}

// ---- merging into a base weight ----------------------------------------------------------

// W += factor s B A                      W: d_out x d_in (nn.Linear's layout)
// W += factor s (B A)^T = factor s A^T B^T   W: d_in x d_out (fan_in_fan_out, GPT-2's Conv1D)
// in double, s = module.scale. The LoRA part of a merge; merge_module below merges any module.
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

// The module merged into W, as PEFT merges it (in double; lora-tool merge calls
// this with factor = --scale, which multiplies s as PEFT's scale_layer does):
//   LoRA:  W' = W + factor s B A
//   DoRA:  V = W + factor s B A,  W' = (m / n) o V,  n_o = ||V[o, :]||_2, one norm
//          per output o (a row of the d_out x d_in weight; a column of W stored
//          transposed with fan_in_fan_out). PEFT's DoraLinearLayer: the norm of
//          the updated weight, then m / n scales each output's row.
// A zero output row of V has no direction: a lora::Error (PEFT's safe_merge reports NaNs there).
inline void merge_module(const AdapterModule& module, bool fan_in_fan_out, double factor, MatrixView<double, HostSpace> W) {
  detail::check_magnitude_shape(module, "merge");
  add_module_delta(module, fan_in_fan_out, factor, W);
  if (!module.dora()) return;
  // Output o is W(o, :) in nn.Linear's layout and W(:, o) in Conv1D's.
  const std::int64_t outputs = module.d_out(), inputs = module.d_in();
  auto at = [&](std::int64_t o, std::int64_t i) -> double& { return fan_in_fan_out ? W(i, o) : W(o, i); };
  for (std::int64_t o = 0; o < outputs; ++o) {
    double sum = 0.0;
    for (std::int64_t i = 0; i < inputs; ++i) sum += at(o, i) * at(o, i);
    const double norm = std::sqrt(sum);
    LORA_CHECK(norm > 0.0 && std::isfinite(norm),
               "merge: output " << o << " of W + s B A has norm " << norm
                                << ", so DoRA's direction (W + s B A) / ||W + s B A|| is undefined there");
    const double factor_o = static_cast<double>(module.magnitude.data()[o]) / norm;
    for (std::int64_t i = 0; i < inputs; ++i) at(o, i) *= factor_o;
  }
}

// ---- layers and adapters <-> Adapter ----------------------------------------------------

// A module path with its layer (lora::Linear) or its adapter (lora::LoraAdapter).
template <class Layer>
struct Named {
  std::string name;  // the module path, e.g. "model.layers.0.self_attn.q_proj"
  Layer* layer;
};
template <class T, class Backend>
using NamedLayer = Named<Linear<T, Backend>>;
template <class T, class Backend>
using NamedAdapter = Named<LoraAdapter<T, Backend>>;

namespace detail {
// A Linear refuses new weights while merged (its W would no longer match); an
// adapter alone is never merged (its owner, a set or a model, checks that).
template <class T, class Backend>
bool is_merged(const Linear<T, Backend>& layer) {
  return layer.merged();
}
template <class T, class Backend>
bool is_merged(const LoraAdapter<T, Backend>&) {
  return false;
}

// A DoRA module (one with a magnitude) goes only into a DoRA layer, and a
// plain one only into a plain layer: either way round, m would be lost or invented.
template <class Layer>
void check_same_kind(const AdapterModule& module, const Layer& layer, const std::string& name) {
  LORA_CHECK(module.dora() == layer.config().use_dora,
             name << ": the module is " << (module.dora() ? "DoRA (it has a lora_magnitude_vector)" : "plain LoRA")
                  << " but the layer has Config.use_dora = " << (layer.config().use_dora ? "true" : "false")
                  << "; build the layer with PeftConfig::layer_config(), which carries use_dora");
}
}  // namespace detail

// Copies the module's A and B (and a DoRA module's magnitude) into the
// layer's (or adapter's) trainable tensors, converting to its parameter type.
// It must have the module's shape, rank, scale and kind (DoRA or not), and a
// layer must not be merged.
template <class Layer>
void copy_module_to(const AdapterModule& module, Layer& layer, const std::string& name = "module") {
  using P = typename Layer::Param;
  using Backend = typename Layer::backend_type;
  LORA_CHECK(!detail::is_merged(layer), name << ": the layer is merged; unmerge() it before loading new adapter weights");
  detail::check_same_kind(module, layer, name);
  LORA_CHECK(module.r == layer.rank() && module.d_in() == layer.d_in() && module.d_out() == layer.d_out(),
             name << ": the adapter has A [" << module.r << ", " << module.d_in() << "], B [" << module.d_out() << ", "
                  << module.r << "]; the layer expects A [" << layer.rank() << ", " << layer.d_in() << "], B ["
                  << layer.d_out() << ", " << layer.rank() << "]");
  LORA_CHECK(std::fabs(module.scale - layer.scale()) <= 1e-12 * std::fabs(module.scale),
             name << ": the adapter's scale is " << module.scale << " (alpha " << module.alpha << ", r " << module.r
                  << ") but the layer's is " << layer.scale() << "; build the layer with PeftConfig::layer_config()");
  auto& ctx = layer.context();
  auto copy = [&](const cpu::Matrix<float>& host, MatrixView<P, typename Layer::Space> dst) {
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
  if (module.dora()) copy(module.magnitude, layer.lora_magnitude().value);
  Backend::synchronize(ctx);
}
template <class T, class Backend>
void copy_module_to_layer(const AdapterModule& module, Linear<T, Backend>& layer, const std::string& name = "module") {
  copy_module_to(module, layer, name);
}

// The layer's (or adapter's) A and B (and a DoRA layer's magnitude), as
// float (a double one rounds to nearest), with its r, alpha and scale.
template <class Layer>
AdapterModule module_from(const Layer& layer) {
  using P = typename Layer::Param;
  using Backend = typename Layer::backend_type;
  auto& ctx = layer.context();
  AdapterModule m;
  m.r = layer.rank();
  m.alpha = layer.config().alpha;
  m.scale = layer.scale();
  auto copy = [&](MatrixView<const P, typename Layer::Space> src) {
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
  if (layer.config().use_dora) m.magnitude = copy(layer.magnitude());
  return m;
}
template <class T, class Backend>
AdapterModule module_from_layer(const Linear<T, Backend>& layer) {
  return module_from(layer);
}

namespace detail {

template <class Layer>
void load_into(const Adapter& adapter, const std::vector<Named<Layer>>& layers) {
  std::set<std::string> seen;
  for (const Named<Layer>& l : layers) {
    LORA_CHECK(l.layer != nullptr, "load_into_layers: layer \"" << l.name << "\" is null");
    LORA_CHECK(seen.insert(l.name).second, "load_into_layers: layer \"" << l.name << "\" is listed twice");
    const auto it = adapter.modules.find(l.name);
    LORA_CHECK(it != adapter.modules.end(), "load_into_layers: the adapter has no module \"" << l.name << "\"");
    LORA_CHECK(l.layer->config().fan_in_fan_out == adapter.config.fan_in_fan_out,
               "\"" << l.name << "\": the layer has fan_in_fan_out = " << l.layer->config().fan_in_fan_out
                      << ", the adapter " << adapter.config.fan_in_fan_out);
    const AdapterModule& m = it->second;
    check_same_kind(m, *l.layer, "\"" + l.name + "\"");
    const bool merged = is_merged(*l.layer);
    LORA_CHECK(!merged && m.r == l.layer->rank() && m.d_in() == l.layer->d_in() && m.d_out() == l.layer->d_out() &&
                   std::fabs(m.scale - l.layer->scale()) <= 1e-12 * std::fabs(m.scale),
               "\"" << l.name << "\": the layer (r " << l.layer->rank() << ", " << l.layer->d_out() << " x " << l.layer->d_in()
                      << ", scale " << l.layer->scale() << (merged ? ", merged" : "")
                      << ") cannot hold the module (r " << m.r << ", " << m.d_out() << " x " << m.d_in() << ", scale "
                      << m.scale << ")");
  }
  for (const auto& [name, m] : adapter.modules)
    LORA_CHECK(seen.count(name), "load_into_layers: no layer given for the adapter's module \"" << name << "\"");
  for (const Named<Layer>& l : layers) copy_module_to(adapter.modules.at(l.name), *l.layer, l.name);
}

template <class Layer>
Adapter adapter_of(const std::vector<Named<Layer>>& layers, PeftConfig config) {
  LORA_CHECK(!layers.empty(), "adapter_from_layers: no layers");
  LORA_CHECK(layers.front().layer != nullptr, "adapter_from_layers: layer \"" << layers.front().name << "\" is null");
  const Config& first = layers.front().layer->config();
  config.r = first.r;
  config.lora_alpha = first.alpha;
  config.use_rslora = first.use_rslora;
  config.fan_in_fan_out = first.fan_in_fan_out;
  config.lora_dropout = first.dropout;
  config.use_dora = first.use_dora;
  config.rank_pattern.clear();
  config.alpha_pattern.clear();
  Adapter adapter;
  std::set<std::string> targets;
  for (const Named<Layer>& l : layers) {
    LORA_CHECK(l.layer != nullptr, "adapter_from_layers: layer \"" << l.name << "\" is null");
    LORA_CHECK(!l.name.empty() && !adapter.modules.count(l.name),
               "adapter_from_layers: layer name \"" << l.name << "\" is empty or listed twice");
    const Config& c = l.layer->config();
    LORA_CHECK(c.use_rslora == first.use_rslora && c.fan_in_fan_out == first.fan_in_fan_out &&
                   c.use_dora == first.use_dora,
               "adapter_from_layers: \"" << l.name << "\" differs from \"" << layers.front().name
                                         << "\" in use_rslora, fan_in_fan_out or use_dora, which PEFT keeps per adapter");
    if (c.r != first.r) config.rank_pattern.emplace_back(escape_module_pattern(l.name), c.r);
    if (c.alpha != first.alpha) config.alpha_pattern.emplace_back(escape_module_pattern(l.name), c.alpha);
    adapter.modules.emplace(l.name, module_from(*l.layer));
    const std::size_t dot = l.name.rfind('.');
    targets.insert(dot == std::string::npos ? l.name : l.name.substr(dot + 1));
  }
  if (config.target_modules.empty() && config.target_modules_regex.empty())
    config.target_modules.assign(targets.begin(), targets.end());
  adapter.config = std::move(config);
  return adapter;
}

}  // namespace detail

// Loads every module of `adapter` into the layer (or adapter) of the same
// name. Each layer must have a module and each module a layer; everything is
// checked before any layer is written, so a failure leaves every layer as it was.
template <class T, class Backend>
void load_into_layers(const Adapter& adapter, const std::vector<NamedLayer<T, Backend>>& layers) {
  detail::load_into(adapter, layers);
}
template <class T, class Backend>
void load_into_adapters(const Adapter& adapter, const std::vector<NamedAdapter<T, Backend>>& adapters) {
  detail::load_into(adapter, adapters);
}

// An adapter holding every layer's (or adapter's) A and B. The config starts
// from `config` (base model name, task type, ...); r, lora_alpha, use_rslora,
// fan_in_fan_out and lora_dropout come from the first layer, other ranks and
// alphas go to rank_pattern / alpha_pattern, and target_modules (when empty)
// becomes the sorted set of the names' last components.
template <class T, class Backend>
Adapter adapter_from_layers(const std::vector<NamedLayer<T, Backend>>& layers, PeftConfig config = {}) {
  return detail::adapter_of(layers, std::move(config));
}
template <class T, class Backend>
Adapter adapter_from_adapters(const std::vector<NamedAdapter<T, Backend>>& adapters, PeftConfig config = {}) {
  return detail::adapter_of(adapters, std::move(config));
}

}  // namespace lora::io

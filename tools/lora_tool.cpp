// lora-tool: inspect, merge and extract PEFT LoRA adapters, convert them to and
// from llama.cpp's GGUF adapters, and quantize a base to NF4, without Python.
//
//   lora-tool inspect DIR | MODEL
//   lora-tool merge    --base MODEL --adapter DIR --out OUT [--scale S] [--dtype D]
//   lora-tool extract  --base MODEL --tuned MODEL --rank R --out DIR [--target-modules M]
//                      [--svd exact|randomized|auto] [--oversample P] [--niter Q]
//                      [--fan-in-fan-out] [--prefix P] [--base-name NAME]
//   lora-tool quantize --base MODEL --out DIR [--no-double-quant] [--modules M]
//   lora-tool export-gguf --adapter DIR --arch ARCH --out FILE [--dtype D] [--n-head H --n-head-kv K]
//   lora-tool import-gguf --adapter FILE --out DIR [--dtype D] [--n-head H --n-head-kv K]
//
// MODEL is a .safetensors file, a model.safetensors.index.json (a sharded
// model), or a directory holding one of them. Errors go to stderr; the exit
// status is 1 on failure and 2 on a usage error.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lora/io.hpp"
#include "lora/linalg/svd.hpp"

namespace fs = std::filesystem;
using lora::io::Adapter;
using lora::io::AdapterModule;
using lora::io::Dtype;
using lora::io::ModelReader;
using lora::io::SafetensorsReader;
using lora::io::SafetensorsWriter;
using lora::io::TensorInfo;

namespace {

constexpr const char* kUsage =
    "usage:\n"
    "  lora-tool inspect DIR | MODEL\n"
    "      modules, r, alpha, scale, DoRA magnitudes, trainable parameters, bytes and dtype of a PEFT adapter\n"
    "      directory;\n"
    "      of a MODEL: its NF4 weights (shape, blocksize, double quantization, bytes) and quantization_config\n"
    "  lora-tool merge --base MODEL --adapter DIR --out OUT [--scale S] [--dtype float32|bfloat16|float16]\n"
    "      W + S * s * B A (transposed for fan_in_fan_out) into every adapted weight, in double, written in the\n"
    "      base's dtype or --dtype; a DoRA adapter (use_dora) gives (m / ||W + S s B A||_row) o (W + S s B A),\n"
    "      one norm per output; a sharded MODEL gives a directory OUT with the same shards and index.\n"
    "      An NF4 base gives a DENSE model: every NF4 weight dequantized (fp32, as bitsandbytes) plus its\n"
    "      s * B A, rounded once to --dtype (default: its quant state's dtype); the NF4 companion tensors\n"
    "      are dropped and nothing is re-quantized\n"
    "  lora-tool extract --base MODEL --tuned MODEL --rank R --out DIR [--target-modules M]\n"
    "                    [--svd exact|randomized|auto] [--oversample P] [--niter Q] [--fan-in-fan-out] [--prefix P]\n"
    "                    [--base-name NAME]\n"
    "      (tuned - base) of every changed, targeted 2-D weight -> a LoRA by truncated SVD, as PEFT's conversion:\n"
    "      B = U_r S_r, A = V_r^T, lora_alpha = r (scale 1). R: an integer rank, or a share in (0, 1): per\n"
    "      module the smallest r whose S_r^2 keep that share of ||tuned - base||_F^2 (in rank_pattern).\n"
    "      M as quantize's --modules, or all-linear (default: all but embeddings and lm_head). --svd: exact\n"
    "      (BDCSVD), randomized (Halko et al.: r + P columns, default P 10; Q power iterations, default 2)\n"
    "      or auto (default: exact up to min(d_out, d_in) = 1024). Prints each module's r, energy kept, time\n"
    "  lora-tool quantize --base MODEL --out DIR [--no-double-quant] [--modules M]\n"
    "      the linear weights to NF4 as transformers + bitsandbytes store a 4-bit model (blocksize 64, double\n"
    "      quantization unless --no-double-quant), every other tensor copied; DIR gets the same shards and\n"
    "      config.json with a quantization_config. M: a regex (full match) or comma-separated PEFT target\n"
    "      names (suffixes); default every 2-D float .weight but embeddings (embed*, wte, wpe) and lm_head\n"
    "  lora-tool export-gguf --adapter DIR --arch ARCH --out FILE [--dtype float32|bfloat16|float16]\n"
    "                        [--n-head H --n-head-kv K]\n"
    "      the PEFT adapter DIR as a llama.cpp LoRA adapter (GGUF) for a base of architecture ARCH (llama,\n"
    "      mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, gpt2): each module's GGUF tensor name, and the\n"
    "      modules whose scale is not lora_alpha / r (rsLoRA, rank_pattern, alpha_pattern), which get the\n"
    "      difference folded into B; DoRA, modules_to_save and PiSSA / OLoRA adapters are refused. llama and\n"
    "      mistral q_proj / k_proj need the base's num_attention_heads (H) and num_key_value_heads (K)\n"
    "  lora-tool import-gguf --adapter FILE --out DIR [--dtype float32|bfloat16|float16] [--n-head H --n-head-kv K]\n"
    "      a llama.cpp LoRA adapter FILE as a PEFT adapter directory (scale alpha / r, as llama.cpp applies it)\n"
    "MODEL: a .safetensors file, a model.safetensors.index.json, or a directory holding one of them.\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- arguments ---------------------------------------------------------------------

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;
  std::set<std::string> flags;

  bool has(const std::string& key) const { return options.count(key) != 0; }
  const std::string& required(const std::string& key) const {
    const auto it = options.find(key);
    if (it == options.end()) throw UsageError("missing " + key);
    return it->second;
  }
};

Args parse_args(int argc, char** argv, const std::set<std::string>& valued, const std::set<std::string>& flags) {
  Args args;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (valued.count(a)) {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      if (args.options.count(a)) throw UsageError(a + " given twice");
      args.options[a] = argv[++i];
    } else if (flags.count(a)) {
      args.flags.insert(a);
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option " + a);
    } else {
      args.positional.push_back(a);
    }
  }
  return args;
}

double parse_number(const std::string& key, const std::string& text) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || !std::isfinite(v)) throw UsageError(key + " \"" + text + "\" is not a number");
  return v;
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// The base tensor a name from an adapter refers to: the name itself; else the
// name with leading components removed ("transformer.h.0..." -> "h.0..."); else
// the one tensor whose name ends in "." + name. Empty when none (or several) match.
std::string resolve(const ModelReader& model, const std::string& name) {
  for (std::string candidate = name;;) {
    if (model.contains(candidate)) return candidate;
    const std::size_t dot = candidate.find('.');
    if (dot == std::string::npos) break;
    candidate = candidate.substr(dot + 1);
  }
  std::string found;
  for (const std::string& tensor : model.names()) {
    if (tensor.size() > name.size() && tensor.compare(tensor.size() - name.size(), name.size(), name) == 0 &&
        tensor[tensor.size() - name.size() - 1] == '.') {
      if (!found.empty()) return "";
      found = tensor;
    }
  }
  return found;
}

// "base_model.model.classifier.weight" -> "classifier.weight"
std::string strip_peft_prefix(const std::string& key) {
  const std::string prefix = lora::io::kPeftKeyPrefix;
  return key.compare(0, prefix.size(), prefix) == 0 ? key.substr(prefix.size()) : key;
}

std::string format_double(double x) {
  std::ostringstream out;
  out << std::setprecision(8) << x;
  return out.str();
}

// "float32" -> F32, "bfloat16" -> BF16, "float16" -> F16 (the dtype names of torch and of the quant state).
Dtype dtype_from_name(const std::string& option, const std::string& name) {
  if (const auto d = lora::io::nf4_dtype_from_name(name)) return *d;
  throw UsageError(option + " \"" + name + "\" is not float32, bfloat16 or float16");
}

// ---- inspect ----------------------------------------------------------------------------------

// A model (not an adapter): its NF4 weights and the quantization_config beside it.
int inspect_model(const std::string& path) {
  const ModelReader model = ModelReader::open(path);
  std::cout << "model: " << model.source() << " (" << model.size() << " tensors in " << model.shards().size()
            << (model.shards().size() == 1 ? " file" : " shards") << ")\n";
  if (const auto config = lora::io::read_model_config(path)) {
    const auto q = lora::io::parse_quantization_config(*config, "config.json");
    if (q) {
      std::cout << "quantization_config: bitsandbytes nf4, double quant " << (q->double_quant ? "yes" : "no")
                << ", compute dtype " << q->compute_dtype << ", storage " << q->quant_storage << "\n";
    } else {
      std::cout << "quantization_config: none (config.json)\n";
    }
  }
  const std::vector<std::string> names = lora::io::nf4_weight_names(model);
  std::uint64_t nf4_bytes = 0, nf4_parameters = 0, dense_bytes = 0;
  std::set<std::string> parts;
  std::size_t width = 10;
  for (const std::string& name : names) width = std::max(width, name.size());
  if (!names.empty()) {
    std::cout << "\n" << std::left << std::setw(static_cast<int>(width)) << "NF4 weight" << "  " << std::right
              << std::setw(16) << "shape" << std::setw(11) << "blocksize" << std::setw(8) << "double" << std::setw(10)
              << "dtype" << std::setw(14) << "bytes" << std::setw(12) << "bytes/param" << "\n";
  }
  for (const std::string& name : names) {
    const lora::nf4::Weight w = lora::io::load_nf4_weight(model, name);
    std::uint64_t bytes = model.info(name).bytes();
    parts.insert(name);
    for (const std::string& c : lora::io::nf4_companion_names(name, w.nested())) {
      bytes += model.info(c).bytes();
      parts.insert(c);
    }
    nf4_bytes += bytes;
    nf4_parameters += static_cast<std::uint64_t>(w.numel());
    std::cout << std::left << std::setw(static_cast<int>(width)) << name << "  " << std::right << std::setw(16) << lora::io::shape_string({w.rows, w.cols}) << std::setw(11)
              << w.blocksize << std::setw(8) << (w.nested() ? "yes" : "no") << std::setw(10) << w.dtype << std::setw(14)
              << bytes << std::setw(12) << format_double(static_cast<double>(bytes) / static_cast<double>(w.numel()))
              << "\n";
  }
  std::size_t dense = 0;
  for (const std::string& name : model.names())
    if (!parts.count(name)) {
      dense_bytes += model.info(name).bytes();
      ++dense;
    }
  std::cout << "\n" << names.size() << " NF4 weights, " << nf4_parameters << " parameters, " << nf4_bytes
            << " bytes with their companion tensors"
            << (nf4_parameters ? " (" + format_double(static_cast<double>(nf4_bytes) / static_cast<double>(nf4_parameters)) +
                                     " bytes per parameter)"
                               : std::string())
            << "; " << dense << " other tensors, " << dense_bytes << " bytes\n";
  return 0;
}

int inspect(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("inspect takes one adapter directory or model");
  const std::string dir = args.positional[0];
  if (!fs::exists(fs::path(dir) / lora::io::kPeftConfigFile)) return inspect_model(dir);
  const Adapter adapter = lora::io::load_peft(dir);
  const SafetensorsReader file = SafetensorsReader::open((fs::path(dir) / lora::io::kPeftWeightsFile).string());
  const lora::io::PeftConfig& c = adapter.config;

  // 1. The config.
  std::cout << "adapter: " << dir << "\n"
            << "base model: " << c.base_model_name_or_path.value_or("(none)")
            << ", task type: " << c.task_type.value_or("(none)") << "\n"
            << "r = " << c.r << ", lora_alpha = " << format_double(c.lora_alpha)
            << ", use_rslora = " << (c.use_rslora ? "true" : "false")
            << ", fan_in_fan_out = " << (c.fan_in_fan_out ? "true" : "false")
            << ", use_dora = " << (c.use_dora ? "true" : "false") << ", lora_dropout = " << format_double(c.lora_dropout) << ", bias = " << c.bias << "\n";
  std::cout << "target_modules: ";
  if (!c.target_modules_regex.empty()) {
    std::cout << "regex " << c.target_modules_regex;
  } else {
    for (std::size_t i = 0; i < c.target_modules.size(); ++i) std::cout << (i ? ", " : "") << c.target_modules[i];
  }
  std::cout << "\n\n";

  // 2. One line per module, with its tensors' dtype and bytes as stored.
  std::size_t width = 6;
  for (const auto& [name, m] : adapter.modules) width = std::max(width, name.size());
  std::cout << std::left << std::setw(static_cast<int>(width)) << "module" << "  " << std::right << std::setw(4) << "r"
            << std::setw(9) << "alpha" << std::setw(11) << "scale" << std::setw(14) << "A [r, d_in]" << std::setw(15)
            << "B [d_out, r]" << (c.use_dora ? "  m [d_out]" : "") << std::setw(12) << "parameters" << std::setw(7)
            << "dtype" << "\n";
  std::uint64_t lora_bytes = 0;
  std::set<std::string> dtypes;
  for (const auto& [name, m] : adapter.modules) {
    const std::string prefix = lora::io::kPeftKeyPrefix + name;
    const TensorInfo& a = file.info(prefix + ".lora_A.weight");
    const TensorInfo& b = file.info(prefix + ".lora_B.weight");
    lora_bytes += a.bytes() + b.bytes();
    std::string dtype =
        a.dtype == b.dtype ? lora::io::dtype_name(a.dtype)
                           : std::string(lora::io::dtype_name(a.dtype)) + "/" + lora::io::dtype_name(b.dtype);
    std::string magnitude;  // DoRA's m: its shape (its dtype joins the column when it differs from A's or B's)
    if (m.dora()) {
      const TensorInfo& mag = file.info(prefix + ".lora_magnitude_vector");
      lora_bytes += mag.bytes();
      magnitude = lora::io::shape_string(mag.shape);
      if (mag.dtype != a.dtype || mag.dtype != b.dtype) dtype += std::string("/") + lora::io::dtype_name(mag.dtype);
    }
    dtypes.insert(dtype);
    std::cout << std::left << std::setw(static_cast<int>(width)) << name << "  " << std::right << std::setw(4) << m.r
              << std::setw(9) << format_double(m.alpha) << std::setw(11) << format_double(m.scale) << std::setw(14)
              << lora::io::shape_string(a.shape) << std::setw(15) << lora::io::shape_string(b.shape);
    if (c.use_dora) std::cout << std::setw(11) << magnitude;
    std::cout << std::setw(12) << m.parameters() << std::setw(7) << dtype << "\n";
  }
  std::string dtype_list;
  for (const std::string& d : dtypes) dtype_list += (dtype_list.empty() ? "" : ", ") + d;
  std::cout << "\n"
            << adapter.modules.size() << (c.use_dora ? " DoRA modules (A, B and a magnitude m each), " : " LoRA modules, ")
            << adapter.trainable_parameters() << " trainable parameters, " << lora_bytes << " bytes (" << (dtype_list.empty() ? "-" : dtype_list)
            << ")\n";

  // 3. What is not a LoRA pair is listed, never hidden.
  if (!adapter.other_tensors.empty()) {
    std::uint64_t other_bytes = 0;
    for (const auto& [key, t] : adapter.other_tensors) other_bytes += t.bytes.size();
    std::cout << adapter.other_tensors.size() << " non-LoRA tensors (" << other_bytes
              << " bytes; full copies such as modules_to_save, merged by replacing the base's tensor):\n";
    for (const auto& [key, t] : adapter.other_tensors)
      std::cout << "  " << key << "  " << lora::io::dtype_name(t.dtype) << " " << lora::io::shape_string(t.shape) << "  "
                << t.bytes.size() << " bytes\n";
  }
  return 0;
}

// ---- merge ------------------------------------------------------------------------------------

int merge(const Args& args) {
  if (!args.positional.empty()) throw UsageError("merge takes no positional arguments");
  const ModelReader base = ModelReader::open(args.required("--base"));
  const Adapter adapter = lora::io::load_peft(args.required("--adapter"));
  const std::string out = args.required("--out");
  const double factor = args.has("--scale") ? parse_number("--scale", args.required("--scale")) : 1.0;
  const bool fan_in_fan_out = adapter.config.fan_in_fan_out;
  const bool has_dtype = args.has("--dtype");
  const Dtype dtype_option = has_dtype ? dtype_from_name("--dtype", args.required("--dtype")) : Dtype::F32;
  auto out_dtype = [&](Dtype stored) { return has_dtype ? dtype_option : stored; };  // what a computed weight is written as

  // 0. An NF4 base: every NF4 weight read and checked now; it is written back dense, its companions dropped.
  std::map<std::string, lora::nf4::Weight> nf4;
  std::set<std::string> companions;
  for (const std::string& name : lora::io::nf4_weight_names(base)) {
    lora::nf4::Weight w = lora::io::load_nf4_weight(base, name);
    for (const std::string& c : lora::io::nf4_companion_names(name, w.nested())) companions.insert(c);
    nf4.emplace(name, std::move(w));
  }
  // The shape of a weight as the model uses it (an NF4 weight's from its quant state).
  auto weight_shape = [&](const std::string& tensor) {
    const auto it = nf4.find(tensor);
    return it == nf4.end() ? base.info(tensor).shape : std::vector<std::int64_t>{it->second.rows, it->second.cols};
  };

  // 1. Plan: which base tensor each module and each non-LoRA tensor lands on; check everything first.
  std::map<std::string, std::string> lora_target;   // base tensor -> module
  std::map<std::string, std::string> replacement;   // base tensor -> adapter key
  std::vector<std::string> additions;               // adapter keys with no base tensor
  std::vector<std::string> unresolved;
  for (const auto& [module, m] : adapter.modules) {
    const std::string tensor = resolve(base, module + ".weight");
    if (tensor.empty()) {
      unresolved.push_back(module + ".weight");
      continue;
    }
    LORA_CHECK(!lora_target.count(tensor), "modules \"" << lora_target[tensor] << "\" and \"" << module
                                                        << "\" both resolve to the base tensor \"" << tensor << "\"");
    const TensorInfo& t = base.info(tensor);
    LORA_CHECK(lora::io::is_floating(t.dtype) || nf4.count(tensor),
               "base tensor \"" << tensor << "\" is " << lora::io::dtype_name(t.dtype)
                                << "; merging needs a float or an NF4 weight");
    const std::int64_t rows = fan_in_fan_out ? m.d_in() : m.d_out(), cols = fan_in_fan_out ? m.d_out() : m.d_in();
    const std::vector<std::int64_t> shape = weight_shape(tensor);
    LORA_CHECK(shape == std::vector<std::int64_t>({rows, cols}),
               "base tensor \"" << tensor << "\" is " << lora::io::shape_string(shape) << " but module \"" << module
                                << "\" (A [" << m.r << ", " << m.d_in() << "], B [" << m.d_out() << ", " << m.r
                                << "]) needs [" << rows << ", " << cols << "]"
                                << (fan_in_fan_out ? " (fan_in_fan_out: W^T)"
                                                   : " (is the base a Conv1D that needs fan_in_fan_out?)"));
    lora_target[tensor] = module;
  }
  LORA_CHECK(unresolved.empty(), "the base has no tensor for " << unresolved.size() << " adapter module(s), e.g. \""
                                                               << (unresolved.empty() ? "" : unresolved.front())
                                                               << "\"; is this the adapter's base model?");
  for (const auto& [key, t] : adapter.other_tensors) {
    const std::string name = strip_peft_prefix(key);
    const std::string tensor = resolve(base, name);
    if (tensor.empty()) {
      additions.push_back(key);
      continue;
    }
    const TensorInfo& b = base.info(tensor);
    LORA_CHECK(!companions.count(tensor), "adapter tensor \"" << key << "\" would replace \"" << tensor
                                                              << "\", a part of an NF4 weight");
    LORA_CHECK(weight_shape(tensor) == t.shape, "adapter tensor \"" << key << "\" is " << lora::io::shape_string(t.shape)
                                                                    << " but the base's \"" << tensor << "\" is "
                                                                    << lora::io::shape_string(weight_shape(tensor)));
    LORA_CHECK(b.dtype == t.dtype || (lora::io::is_floating(b.dtype) && lora::io::is_floating(t.dtype)) ||
                   (nf4.count(tensor) && lora::io::is_floating(t.dtype)),
               "adapter tensor \"" << key << "\" is " << lora::io::dtype_name(t.dtype) << ", the base's \"" << tensor
                                   << "\" " << lora::io::dtype_name(b.dtype));
    LORA_CHECK(!lora_target.count(tensor) && !replacement.count(tensor),
               "base tensor \"" << tensor << "\" is both a LoRA target and replaced by \"" << key << "\"");
    replacement[tensor] = key;
  }
  if (base.sharded()) {
    LORA_CHECK(fs::path(out).extension() != ".safetensors",
               "the base is sharded (" << base.shards().size() << " files): --out must name a directory, not " << out);
  }

  // 2. Each shard: merged tensors in double, rounded once to the base's dtype (or --dtype); NF4 weights
  //    dequantized (the fp32 values bitsandbytes' dequantize_4bit computes, exact in double), merged
  //    when targeted, rounded once to --dtype or their quant state's dtype; the rest copied byte for byte.
  std::uint64_t total_bytes = 0;
  nlohmann::ordered_json index = base.index().json;
  for (std::size_t s = 0; s < base.shards().size(); ++s) {
    const SafetensorsReader& shard = base.shards()[s];
    SafetensorsWriter writer;
    for (const auto& [key, value] : shard.metadata()) writer.set_metadata(key, value);
    for (const TensorInfo& t : shard.tensors()) {
      const auto quantized = nf4.find(t.name);
      if (companions.count(t.name)) {
        if (base.sharded() && index.contains("weight_map")) index["weight_map"].erase(t.name);
        continue;
      }
      if (replacement.count(t.name)) {
        const lora::io::RawTensor& r = adapter.other_tensors.at(replacement.at(t.name));
        const Dtype dtype = quantized == nf4.end() ? t.dtype : out_dtype(dtype_from_name("dtype", quantized->second.dtype));
        total_bytes += r.bytes.size() / lora::io::dtype_size(r.dtype) * lora::io::dtype_size(dtype);
        if (r.dtype == dtype) {
          writer.add_raw(t.name, r);
        } else {
          const std::vector<double> v = lora::io::values_of<double>(r);
          writer.add(t.name, r.shape, v.data(), dtype);
        }
      } else if (quantized != nf4.end() || lora_target.count(t.name)) {
        const std::vector<std::int64_t> shape = weight_shape(t.name);
        std::vector<double> w = quantized != nf4.end() ? lora::nf4::dequantize<double>(quantized->second)
                                                       : shard.read<double>(t.name);
        if (lora_target.count(t.name))
          lora::io::merge_module(adapter.modules.at(lora_target.at(t.name)), fan_in_fan_out, factor,
                                 lora::MatrixView<double>(w.data(), shape[0], shape[1]));
        const Dtype stored = quantized != nf4.end() ? dtype_from_name("dtype", quantized->second.dtype) : t.dtype;
        writer.add(t.name, shape, w.data(), out_dtype(stored));
        total_bytes += w.size() * lora::io::dtype_size(out_dtype(stored));
      } else {
        writer.add_raw(t.name, shard.read_raw(t.name));
        total_bytes += t.bytes();
      }
    }
    if (s + 1 == base.shards().size()) {
      for (const std::string& key : additions) {
        const std::string name = strip_peft_prefix(key);
        writer.add_raw(name, adapter.other_tensors.at(key));
        total_bytes += adapter.other_tensors.at(key).bytes.size();
        if (base.sharded()) index["weight_map"][name] = base.shard_files()[s];
      }
    }
    if (base.sharded()) {
      fs::create_directories(out);
      writer.write((fs::path(out) / base.shard_files()[s]).string());
    } else {
      writer.write(out);
    }
  }
  if (base.sharded()) {
    if (index.contains("metadata") && index["metadata"].is_object()) index["metadata"]["total_size"] = total_bytes;
    lora::io::write_string_atomically((fs::path(out) / fs::path(base.source()).filename()).string(), index.dump(2) + "\n");
  }

  // 3. Say what happened, including what was not a LoRA pair.
  const char* formula = adapter.config.use_dora
                            ? (fan_in_fan_out ? ", DoRA: W^T = ((m / ||W + s B A||_row) o (W + s B A))^T"
                                              : ", DoRA: W = (m / ||W + s B A||_row) o (W + s B A)")
                            : (fan_in_fan_out ? ", fan_in_fan_out: W^T += s (B A)^T" : ", W += s B A");
  std::cout << "merged " << lora_target.size() << (adapter.config.use_dora ? " DoRA" : " LoRA") << " modules into "
            << args.required("--base") << " (scale x " << format_double(factor) << formula << ")\n";
  for (const auto& [tensor, key] : replacement) std::cout << "replaced " << tensor << " with the adapter's " << key << "\n";
  for (const std::string& key : additions) std::cout << "added " << key << " (not in the base)\n";
  if (!nf4.empty()) {
    std::cout << "dequantized " << nf4.size() << " NF4 weights into a dense model ("
              << (has_dtype ? lora::io::dtype_name(dtype_option) : "each in its quant state's dtype")
              << "); their " << companions.size() << " companion tensors dropped, nothing re-quantized\n";
    const auto config = lora::io::read_model_config(args.required("--base"));
    if (config && config->contains("quantization_config"))
      std::cout << "note: the base's config.json has a quantization_config; the merged model is dense, so the "
                   "config.json that goes with it must not\n";
  }
  std::cout << "wrote " << out << (base.sharded() ? " (" + std::to_string(base.shards().size()) + " shards + index)" : "")
            << "\n";
  return 0;
}

// ---- extract ----------------------------------------------------------------------------------

// PEFT's all-linear for a file without module types: every module but embeddings (a last name
// component with "embed", wte, wpe) and the output head (lm_head), as quantize's default.
bool is_embedding_or_head(const std::string& module) {
  const std::size_t dot = module.rfind('.');
  const std::string last = dot == std::string::npos ? module : module.substr(dot + 1);
  return last.find("embed") != std::string::npos || last == "wte" || last == "wpe" || last == "lm_head";
}

// --rank: an integer >= 1 (that rank everywhere) or a share in (0, 1) (per module, the smallest
// rank whose singular values keep that share of ||tuned - base||_F^2: PEFT's float rank).
struct ExtractRank {
  int fixed = 0;          // > 0: this rank
  double threshold = 0;   // else: this energy share
};

ExtractRank parse_extract_rank(const std::string& text) {
  const double v = parse_number("--rank", text);
  if (v > 0 && v < 1) return ExtractRank{0, v};
  if (v >= 1 && v == std::floor(v) && v <= 65536) return ExtractRank{static_cast<int>(v), 0};
  throw UsageError("--rank \"" + text + "\": expected an integer >= 1 (the rank) or a number in (0, 1) (the share of "
                   "each update's energy to keep)");
}

lora::linalg::SvdOptions parse_svd_options(const Args& args) {
  lora::linalg::SvdOptions o;
  o.oversampling = 10;  // as Halko et al. advise: with none (torch's, --oversample 0) the last triplets lose accuracy
  if (args.has("--svd")) {
    const std::string& m = args.required("--svd");
    if (m == "exact") {
      o.method = lora::linalg::SvdMethod::kExact;
    } else if (m == "randomized") {
      o.method = lora::linalg::SvdMethod::kRandomized;
    } else if (m != "auto") {
      throw UsageError("--svd \"" + m + "\": expected exact, randomized or auto");
    }
  }
  auto count = [&](const char* key, int fallback) {
    if (!args.has(key)) return fallback;
    const double v = parse_number(key, args.required(key));
    if (v < 0 || v != std::floor(v) || v > 1000) throw UsageError(std::string(key) + " must be an integer in [0, 1000]");
    return static_cast<int>(v);
  };
  o.oversampling = count("--oversample", static_cast<int>(o.oversampling));
  o.power_iterations = count("--niter", o.power_iterations);
  return o;
}

int extract(const Args& args) {
  if (!args.positional.empty()) throw UsageError("extract takes no positional arguments");
  const ModelReader base = ModelReader::open(args.required("--base"));
  const ModelReader tuned = ModelReader::open(args.required("--tuned"));
  const ExtractRank rank = parse_extract_rank(args.required("--rank"));
  const lora::linalg::SvdOptions svd_options = parse_svd_options(args);
  const std::string out = args.required("--out");
  const bool fan_in_fan_out = args.flags.count("--fan-in-fan-out") != 0;
  const std::string targets = args.has("--target-modules") ? args.required("--target-modules") : "all-linear";
  const std::string prefix = args.has("--prefix") ? args.required("--prefix") : "";

  // 1. The changed weights: every float tensor of the tuned model against the base's.
  std::vector<std::string> changed;  // modules (weight names less ".weight") with a changed 2-D weight
  for (const std::string& name : tuned.names()) {
    const TensorInfo& t = tuned.info(name);
    LORA_CHECK(base.contains(name), "the tuned model has \"" << name << "\", the base does not");
    const TensorInfo& b = base.info(name);
    LORA_CHECK(b.shape == t.shape, "\"" << name << "\" is " << lora::io::shape_string(b.shape) << " in the base, "
                                        << lora::io::shape_string(t.shape) << " in the tuned model");
    if (!lora::io::is_floating(t.dtype) || !lora::io::is_floating(b.dtype)) continue;
    if (tuned.shard_of(name).read<double>(name) == base.shard_of(name).read<double>(name)) continue;
    const bool is_weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
    if (t.shape.size() == 2 && is_weight) {
      changed.push_back(name.substr(0, name.size() - 7));
    } else {
      std::cerr << "lora-tool: note: \"" << name << "\" changed but is not a 2-D weight; not extracted\n";
    }
  }

  // 2. The targets among them, by PEFT's target_modules rules (a regex, full match, when it has
  //    a regex character; else comma-separated names or suffixes; or all-linear).
  std::vector<std::string> candidates;
  lora::io::PeftConfig selection;
  if (targets == "all-linear") {
    for (const std::string& m : changed)
      if (!is_embedding_or_head(m)) candidates.push_back(m);
    selection.target_modules_regex = "all-linear";
  } else {
    candidates = changed;
    if (targets.find_first_of("*+?()[]{}|^$\\") != std::string::npos) {
      selection.target_modules_regex = targets;
    } else {
      selection.target_modules = split_commas(targets);
      if (selection.target_modules.empty()) throw UsageError("--target-modules is empty");
    }
  }
  const std::vector<std::string> modules =
      candidates.empty() ? candidates : lora::io::select_target_modules(selection, candidates);
  for (const std::string& m : changed)
    if (std::find(modules.begin(), modules.end(), m) == modules.end())
      std::cerr << "lora-tool: note: \"" << m << ".weight\" changed but is not targeted"
                << (targets == "all-linear" && is_embedding_or_head(m)
                        ? " (all-linear leaves out embeddings and lm_head; name it in --target-modules)"
                        : "")
                << "\n";
  LORA_CHECK(!modules.empty(), "no targeted 2-D weight differs between the base and the tuned model");

  // 3. Each module: D = tuned - base as stored, its truncated SVD D ~= U_r diag(S_r) V_r^T, and as
  //    PEFT's conversion: B = U_r diag(S_r) (d_out x r), A = V_r^T (r x d_in), alpha = r (scale 1).
  //    A Conv1D weight (fan_in_fan_out) stores D^T = d_in x d_out: A = (U_r diag(S_r))^T, B = V_r.
  Adapter adapter;
  std::set<std::string> last_components;
  int max_rank = 0;
  for (const std::string& module : modules) {
    const std::string name = module + ".weight";
    const auto started = std::chrono::steady_clock::now();
    std::vector<double> D = tuned.shard_of(name).read<double>(name);
    double energy = 0;
    {
      const std::vector<double> W = base.shard_of(name).read<double>(name);  // freed before the SVD copies D
      for (std::size_t i = 0; i < D.size(); ++i) {
        D[i] -= W[i];
        energy += D[i] * D[i];
      }
    }
    const std::vector<std::int64_t>& shape = tuned.info(name).shape;
    const lora::MatrixView<const double> view(D.data(), shape[0], shape[1]);
    if (rank.fixed > 0)
      LORA_CHECK(rank.fixed <= std::min(shape[0], shape[1]),
                 "--rank " << rank.fixed << " exceeds min(d_out, d_in) = " << std::min(shape[0], shape[1]) << " of \""
                           << name << "\"");
    const lora::linalg::Svd svd = rank.fixed > 0 ? lora::linalg::truncated_svd(view, rank.fixed, svd_options)
                                                 : lora::linalg::svd_for_energy(view, rank.threshold, svd_options);
    const int r = static_cast<int>(svd.rank());
    const std::int64_t d_in = fan_in_fan_out ? shape[0] : shape[1], d_out = fan_in_fan_out ? shape[1] : shape[0];
    AdapterModule m;
    m.r = r;
    m.alpha = r;
    m.scale = 1.0;
    m.A = lora::cpu::Matrix<float>(r, d_in);
    m.B = lora::cpu::Matrix<float>(d_out, r);
    double kept = 0;
    for (int k = 0; k < r; ++k) {
      kept += svd.S[static_cast<std::size_t>(k)] * svd.S[static_cast<std::size_t>(k)];
      const double s = svd.S[static_cast<std::size_t>(k)];
      for (std::int64_t i = 0; i < svd.U.rows(); ++i) {
        const float us = lora::io::double_to_float(svd.U(i, k) * s);
        (fan_in_fan_out ? m.A(k, i) : m.B(i, k)) = us;
      }
      for (std::int64_t j = 0; j < svd.V.rows(); ++j) {
        const float v = lora::io::double_to_float(svd.V(j, k));
        (fan_in_fan_out ? m.B(j, k) : m.A(k, j)) = v;
      }
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
    std::cout << prefix + module << ": [" << d_out << ", " << d_in << "] -> r " << r << ", energy kept "
              << std::fixed << std::setprecision(6) << (energy > 0 ? kept / energy : 1.0) << ", "
              << std::setprecision(1) << ms << " ms" << std::defaultfloat << "\n";
    max_rank = std::max(max_rank, r);
    const std::size_t dot = module.rfind('.');
    last_components.insert(dot == std::string::npos ? module : module.substr(dot + 1));
    adapter.modules.emplace(prefix + module, std::move(m));
  }

  // 4. The config: r = lora_alpha = the largest rank (what a server's max-rank check reads); a
  //    module of another rank gets rank_pattern and alpha_pattern entries, its full name escaped,
  //    so every scale is 1. (PEFT's own conversion writes r = 1 and lists every module: the same
  //    adapter once loaded.)
  adapter.config.r = max_rank;
  adapter.config.lora_alpha = max_rank;
  for (const auto& [module, m] : adapter.modules)
    if (m.r != max_rank) {
      adapter.config.rank_pattern.emplace_back(lora::io::detail::escape_module_pattern(module), m.r);
      adapter.config.alpha_pattern.emplace_back(lora::io::detail::escape_module_pattern(module), m.alpha);
    }
  adapter.config.fan_in_fan_out = fan_in_fan_out;
  if (selection.target_modules_regex.empty()) {
    adapter.config.target_modules = selection.target_modules;
  } else if (targets == "all-linear") {
    adapter.config.target_modules.assign(last_components.begin(), last_components.end());
  } else {
    adapter.config.target_modules_regex = prefix.empty() ? targets : lora::io::detail::escape_module_pattern(prefix) + "(" + targets + ")";
  }
  if (args.has("--base-name")) adapter.config.base_model_name_or_path = args.required("--base-name");
  lora::io::save_peft(adapter, out);
  std::cout << "wrote " << out << ": " << adapter.modules.size() << " modules, r = " << max_rank
            << (adapter.config.rank_pattern.empty() ? "" : " (and " + std::to_string(adapter.config.rank_pattern.size()) +
                                                               " in rank_pattern)")
            << ", lora_alpha = r (scale 1), " << adapter.trainable_parameters() << " trainable parameters\n";
  return 0;
}

// ---- quantize ---------------------------------------------------------------------------------

// The modules (weight names less ".weight") quantize turns to NF4: of every 2-D float "*.weight",
// those `modules` selects (PEFT's target_modules rules: a regex, full match, when it has a regex
// character; else comma-separated names or suffixes), or by default all but embeddings and lm_head.
std::vector<std::string> modules_to_quantize(const ModelReader& base, const std::optional<std::string>& modules) {
  std::vector<std::string> candidates;
  for (const std::string& name : base.names()) {
    const TensorInfo& t = base.info(name);
    if (t.shape.size() == 2 && lora::io::is_floating(t.dtype) && name.size() > 7 &&
        name.compare(name.size() - 7, 7, ".weight") == 0)
      candidates.push_back(name.substr(0, name.size() - 7));
  }
  if (!modules) {
    std::vector<std::string> out;
    for (const std::string& m : candidates)
      if (!is_embedding_or_head(m)) out.push_back(m);
    return out;
  }
  lora::io::PeftConfig config;
  if (modules->find_first_of("*+?()[]{}|^$\\") != std::string::npos) {
    config.target_modules_regex = *modules;
  } else {
    config.target_modules = split_commas(*modules);
    if (config.target_modules.empty()) throw UsageError("--modules is empty");
  }
  return lora::io::select_target_modules(config, candidates);
}

int quantize(const Args& args) {
  if (!args.positional.empty()) throw UsageError("quantize takes no positional arguments");
  const std::string base_path = args.required("--base");
  const ModelReader base = ModelReader::open(base_path);
  const fs::path out = args.required("--out");
  lora::nf4::Options options;
  options.double_quant = args.flags.count("--no-double-quant") == 0;
  const std::vector<std::string> modules =
      modules_to_quantize(base, args.has("--modules") ? std::optional<std::string>(args.required("--modules")) : std::nullopt);
  LORA_CHECK(lora::io::nf4_weight_names(base).empty(), base.source() << " already holds NF4 weights");
  LORA_CHECK(!modules.empty(), "no 2-D float weight of " << base.source() << " is selected"
                                                         << (args.has("--modules") ? " by --modules" : ""));
  std::set<std::string> selected;
  std::set<std::string> dtypes;
  for (const std::string& m : modules) {
    const TensorInfo& t = base.info(m + ".weight");
    LORA_CHECK(lora::io::nf4_dtype_name(t.dtype) != nullptr,
               "\"" << t.name << "\" is " << lora::io::dtype_name(t.dtype)
                    << "; bitsandbytes quantizes float32, bfloat16 and float16 weights only");
    selected.insert(t.name);
    dtypes.insert(lora::io::nf4_dtype_name(t.dtype));
  }

  // 1. Each shard: the selected weights quantized from their stored values (exact as float), the rest copied.
  fs::create_directories(out);
  nlohmann::ordered_json index = base.index().json;
  std::uint64_t dense_bytes = 0, nf4_bytes = 0, total_bytes = 0;
  for (std::size_t s = 0; s < base.shards().size(); ++s) {
    const SafetensorsReader& shard = base.shards()[s];
    SafetensorsWriter writer;
    std::set<std::string> written_nf4;  // the NF4 weights and their companions in this shard
    for (const auto& [key, value] : shard.metadata()) writer.set_metadata(key, value);
    for (const TensorInfo& t : shard.tensors()) {
      if (!selected.count(t.name)) {
        writer.add_raw(t.name, shard.read_raw(t.name));
        continue;
      }
      const std::vector<float> values = shard.read<float>(t.name);
      options.dtype = lora::io::nf4_dtype_name(t.dtype);
      const lora::nf4::Weight w = lora::nf4::quantize(values.data(), t.shape[0], t.shape[1], t.shape[1], options);
      lora::io::add_nf4_weight(writer, t.name, w);
      written_nf4.insert(t.name);
      for (const std::string& c : lora::io::nf4_companion_names(t.name, w.nested())) {
        written_nf4.insert(c);
        if (base.sharded()) index["weight_map"][c] = base.shard_files()[s];
      }
      dense_bytes += t.bytes();
    }
    const fs::path file = out / (base.sharded() ? base.shard_files()[s] : std::string(ModelReader::kSingleFile));
    writer.write(file.string());
    const SafetensorsReader written = SafetensorsReader::open(file.string());  // the header only
    for (const TensorInfo& t : written.tensors()) {
      total_bytes += t.bytes();
      if (written_nf4.count(t.name)) nf4_bytes += t.bytes();
    }
  }
  if (base.sharded()) {
    if (index.contains("metadata") && index["metadata"].is_object()) index["metadata"]["total_size"] = total_bytes;
    lora::io::write_string_atomically((out / ModelReader::kIndexFile).string(), index.dump(2) + "\n");
  }

  // 2. config.json: the base's (when it has one) with transformers' quantization_config.
  nlohmann::ordered_json config = lora::io::read_model_config(base_path).value_or(nlohmann::ordered_json::object());
  LORA_CHECK(config.is_object(), "the base's config.json is not a JSON object");
  lora::io::Nf4QuantizationConfig q;
  q.double_quant = options.double_quant;
  q.compute_dtype = dtypes.size() == 1 ? *dtypes.begin() : "float32";
  config["quantization_config"] = lora::io::quantization_config_json(q);
  lora::io::write_string_atomically((out / "config.json").string(), config.dump(2) + "\n");

  std::cout << "quantized " << selected.size() << " weights to NF4 (blocksize " << options.blocksize
            << (options.double_quant ? ", double quantization" : "") << "): " << dense_bytes << " -> " << nf4_bytes
            << " bytes\nwrote " << out.string() << " (" << base.shards().size()
            << (base.sharded() ? " shards + index" : " file") << ", config.json with quantization_config)\n";
  return 0;
}

lora::io::GgufHeads heads_from(const Args& args) {
  lora::io::GgufHeads heads;
  auto count = [&](const char* key) {
    if (!args.has(key)) return 0;
    const double v = parse_number(key, args.options.at(key));
    if (v < 1 || v > 1e6 || v != std::floor(v)) throw UsageError(std::string(key) + " must be a positive integer");
    return static_cast<int>(v);
  };
  heads.n_head = count("--n-head");
  heads.n_head_kv = count("--n-head-kv");
  return heads;
}

int export_gguf(const Args& args) {
  const Adapter adapter = lora::io::load_peft(args.required("--adapter"));
  lora::io::GgufAdapterOptions options;
  options.architecture = args.required("--arch");
  options.heads = heads_from(args);
  if (args.has("--dtype")) options.dtype = dtype_from_name("--dtype", args.options.at("--dtype"));
  const std::string out = args.required("--out");
  const lora::io::GgufAdapterReport report = lora::io::save_gguf_adapter(adapter, out, options);
  std::cout << std::left << std::setw(48) << "module" << "GGUF tensor (.lora_a / .lora_b)\n";
  for (const auto& [module, name] : report.names) std::cout << std::setw(48) << module << name << "\n";
  std::cout << "adapter.lora.alpha = " << format_double(report.alpha) << "; llama.cpp scales each pair by alpha / r\n";
  for (const auto& [module, factor] : report.folded)
    std::cout << "folded into B: " << module << " x " << format_double(factor) << " (its scale "
              << format_double(adapter.modules.at(module).scale) << " is not alpha / r)\n";
  std::cout << "wrote " << out << " (" << report.names.size() << " modules, " << lora::io::dtype_name(options.dtype)
            << ")\n";
  return 0;
}

int import_gguf(const Args& args) {
  const Adapter adapter = lora::io::load_gguf_adapter(args.required("--adapter"), heads_from(args));
  const Dtype dtype = args.has("--dtype") ? dtype_from_name("--dtype", args.options.at("--dtype")) : Dtype::F32;
  const std::string out = args.required("--out");
  lora::io::save_peft(adapter, out, dtype);
  std::cout << "wrote " << out << ": " << adapter.modules.size() << " modules, r " << adapter.config.r
            << ", lora_alpha " << format_double(adapter.config.lora_alpha) << ", " << adapter.trainable_parameters()
            << " parameters\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  try {
    if (command == "inspect") return inspect(parse_args(argc, argv, {}, {}));
    if (command == "merge")
      return merge(parse_args(argc, argv, {"--base", "--adapter", "--out", "--scale", "--dtype"}, {}));
    if (command == "quantize")
      return quantize(parse_args(argc, argv, {"--base", "--out", "--modules"}, {"--no-double-quant"}));
    if (command == "extract")
      return extract(parse_args(argc, argv,
                                {"--base", "--tuned", "--rank", "--out", "--target-modules", "--prefix", "--base-name",
                                 "--svd", "--oversample", "--niter"},
                                {"--fan-in-fan-out"}));
    if (command == "export-gguf") return export_gguf(parse_args(argc, argv, {"--adapter", "--arch", "--out", "--dtype", "--n-head", "--n-head-kv"}, {}));
    if (command == "import-gguf") return import_gguf(parse_args(argc, argv, {"--adapter", "--out", "--dtype", "--n-head", "--n-head-kv"}, {}));
    if (command == "-h" || command == "--help" || command == "help") {
      std::cout << kUsage;
      return 0;
    }
    throw UsageError(command.empty() ? "no command" : "unknown command \"" + command + "\"");
  } catch (const UsageError& e) {
    std::cerr << "lora-tool: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "lora-tool: error: " << e.what() << "\n";
    return 1;
  }
}

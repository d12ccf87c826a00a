// lora-tool: inspect, merge and extract PEFT LoRA adapters without Python.
//
//   lora-tool inspect DIR
//   lora-tool merge   --base MODEL --adapter DIR --out OUT [--scale S]
//   lora-tool extract --base MODEL --tuned MODEL --rank R --out DIR
//                     [--targets a,b,...] [--fan-in-fan-out] [--prefix P] [--base-name NAME]
//
// MODEL is a .safetensors file, a model.safetensors.index.json (a sharded
// model), or a directory holding one of them. Errors go to stderr; the exit
// status is 1 on failure and 2 on a usage error.
#include <Eigen/Dense>
#include <Eigen/SVD>

#include <algorithm>
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
    "  lora-tool inspect DIR\n"
    "      modules, r, alpha, scale, trainable parameters, bytes and dtype of a PEFT adapter directory\n"
    "  lora-tool merge --base MODEL --adapter DIR --out OUT [--scale S]\n"
    "      W + S * s * B A (transposed for fan_in_fan_out) into every adapted weight, in double, written in the\n"
    "      base's dtype; a sharded MODEL gives a directory OUT with the same shards and index\n"
    "  lora-tool extract --base MODEL --tuned MODEL --rank R --out DIR [--targets a,b] [--fan-in-fan-out]\n"
    "                    [--prefix P] [--base-name NAME]\n"
    "      (tuned - base) of every changed 2-D weight -> a rank-R adapter by truncated SVD:\n"
    "      B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T, lora_alpha = R (scale 1)\n"
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

// ---- inspect ----------------------------------------------------------------------------------

int inspect(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("inspect takes one adapter directory");
  const std::string dir = args.positional[0];
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
            << ", lora_dropout = " << format_double(c.lora_dropout) << ", bias = " << c.bias << "\n";
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
            << "B [d_out, r]" << std::setw(12) << "parameters" << std::setw(7) << "dtype" << "\n";
  std::uint64_t lora_bytes = 0;
  std::set<std::string> dtypes;
  for (const auto& [name, m] : adapter.modules) {
    const std::string prefix = lora::io::kPeftKeyPrefix + name;
    const TensorInfo& a = file.info(prefix + ".lora_A.weight");
    const TensorInfo& b = file.info(prefix + ".lora_B.weight");
    lora_bytes += a.bytes() + b.bytes();
    const std::string dtype =
        a.dtype == b.dtype ? lora::io::dtype_name(a.dtype)
                           : std::string(lora::io::dtype_name(a.dtype)) + "/" + lora::io::dtype_name(b.dtype);
    dtypes.insert(dtype);
    std::cout << std::left << std::setw(static_cast<int>(width)) << name << "  " << std::right << std::setw(4) << m.r
              << std::setw(9) << format_double(m.alpha) << std::setw(11) << format_double(m.scale) << std::setw(14)
              << lora::io::shape_string(a.shape) << std::setw(15) << lora::io::shape_string(b.shape) << std::setw(12)
              << m.parameters() << std::setw(7) << dtype << "\n";
  }
  std::string dtype_list;
  for (const std::string& d : dtypes) dtype_list += (dtype_list.empty() ? "" : ", ") + d;
  std::cout << "\n"
            << adapter.modules.size() << " LoRA modules, " << adapter.trainable_parameters()
            << " trainable parameters, " << lora_bytes << " bytes (" << (dtype_list.empty() ? "-" : dtype_list)
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
    LORA_CHECK(lora::io::is_floating(t.dtype),
               "base tensor \"" << tensor << "\" is " << lora::io::dtype_name(t.dtype) << "; merging needs a float weight");
    const std::int64_t rows = fan_in_fan_out ? m.d_in() : m.d_out(), cols = fan_in_fan_out ? m.d_out() : m.d_in();
    LORA_CHECK(t.shape == std::vector<std::int64_t>({rows, cols}),
               "base tensor \"" << tensor << "\" is " << lora::io::shape_string(t.shape) << " but module \"" << module
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
    LORA_CHECK(b.shape == t.shape, "adapter tensor \"" << key << "\" is " << lora::io::shape_string(t.shape)
                                                       << " but the base's \"" << tensor << "\" is "
                                                       << lora::io::shape_string(b.shape));
    LORA_CHECK(b.dtype == t.dtype || (lora::io::is_floating(b.dtype) && lora::io::is_floating(t.dtype)),
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

  // 2. Each shard: merged tensors in double, rounded once to the base's dtype; the rest copied byte for byte.
  std::uint64_t total_bytes = 0;
  nlohmann::ordered_json index = base.index().json;
  for (std::size_t s = 0; s < base.shards().size(); ++s) {
    const SafetensorsReader& shard = base.shards()[s];
    SafetensorsWriter writer;
    for (const auto& [key, value] : shard.metadata()) writer.set_metadata(key, value);
    for (const TensorInfo& t : shard.tensors()) {
      if (lora_target.count(t.name)) {
        std::vector<double> w = shard.read<double>(t.name);
        lora::io::add_module_delta(adapter.modules.at(lora_target.at(t.name)), fan_in_fan_out, factor,
                                   lora::MatrixView<double>(w.data(), t.shape[0], t.shape[1]));
        writer.add(t.name, t.shape, w.data(), t.dtype);
      } else if (replacement.count(t.name)) {
        const lora::io::RawTensor& r = adapter.other_tensors.at(replacement.at(t.name));
        if (r.dtype == t.dtype) {
          writer.add_raw(t.name, r);
        } else {
          const std::vector<double> v = lora::io::values_of<double>(r);
          writer.add(t.name, t.shape, v.data(), t.dtype);
        }
      } else {
        writer.add_raw(t.name, shard.read_raw(t.name));
      }
    }
    if (s + 1 == base.shards().size()) {
      for (const std::string& key : additions) {
        const std::string name = strip_peft_prefix(key);
        writer.add_raw(name, adapter.other_tensors.at(key));
        if (base.sharded()) index["weight_map"][name] = base.shard_files()[s];
      }
    }
    for (const TensorInfo& t : shard.tensors()) total_bytes += t.bytes();
    if (base.sharded()) {
      fs::create_directories(out);
      writer.write((fs::path(out) / base.shard_files()[s]).string());
    } else {
      writer.write(out);
    }
  }
  if (base.sharded()) {
    for (const std::string& key : additions) total_bytes += adapter.other_tensors.at(key).bytes.size();
    if (index.contains("metadata") && index["metadata"].is_object()) index["metadata"]["total_size"] = total_bytes;
    lora::io::write_string_atomically((fs::path(out) / fs::path(base.source()).filename()).string(), index.dump(2) + "\n");
  }

  // 3. Say what happened, including what was not a LoRA pair.
  std::cout << "merged " << lora_target.size() << " LoRA modules into " << args.required("--base") << " (scale x "
            << format_double(factor) << (fan_in_fan_out ? ", fan_in_fan_out: W^T += s (B A)^T" : ", W += s B A")
            << ")\n";
  for (const auto& [tensor, key] : replacement) std::cout << "replaced " << tensor << " with the adapter's " << key << "\n";
  for (const std::string& key : additions) std::cout << "added " << key << " (not in the base)\n";
  std::cout << "wrote " << out << (base.sharded() ? " (" + std::to_string(base.shards().size()) + " shards + index)" : "")
            << "\n";
  return 0;
}

// ---- extract ----------------------------------------------------------------------------------

int extract(const Args& args) {
  if (!args.positional.empty()) throw UsageError("extract takes no positional arguments");
  const ModelReader base = ModelReader::open(args.required("--base"));
  const ModelReader tuned = ModelReader::open(args.required("--tuned"));
  const double rank_value = parse_number("--rank", args.required("--rank"));
  if (rank_value < 1 || rank_value != std::floor(rank_value) || rank_value > 65536)
    throw UsageError("--rank must be an integer >= 1");
  const int rank = static_cast<int>(rank_value);
  const std::string out = args.required("--out");
  const bool fan_in_fan_out = args.flags.count("--fan-in-fan-out") != 0;
  const std::vector<std::string> targets = args.has("--targets") ? split_commas(args.required("--targets"))
                                                                  : std::vector<std::string>{};
  const std::string prefix = args.has("--prefix") ? args.required("--prefix") : "";
  auto targeted = [&](const std::string& module) {
    if (targets.empty()) return true;
    for (const std::string& t : targets)
      if (module == t || (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
                          module[module.size() - t.size() - 1] == '.'))
        return true;
    return false;
  };

  Adapter adapter;
  std::set<std::string> last_components;
  for (const std::string& name : tuned.names()) {
    const TensorInfo& t = tuned.info(name);
    LORA_CHECK(base.contains(name), "the tuned model has \"" << name << "\", the base does not");
    const TensorInfo& b = base.info(name);
    LORA_CHECK(b.shape == t.shape, "\"" << name << "\" is " << lora::io::shape_string(b.shape) << " in the base, "
                                        << lora::io::shape_string(t.shape) << " in the tuned model");
    if (!lora::io::is_floating(t.dtype) || !lora::io::is_floating(b.dtype)) continue;
    const std::vector<double> tv = tuned.shard_of(name).read<double>(name);
    const std::vector<double> bv = base.shard_of(name).read<double>(name);
    bool changed = false;
    for (std::size_t i = 0; i < tv.size() && !changed; ++i) changed = tv[i] != bv[i];
    if (!changed) continue;
    const bool is_weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
    const std::string module = is_weight ? name.substr(0, name.size() - 7) : name;
    if (t.shape.size() != 2 || !is_weight) {
      if (targeted(module))
        std::cerr << "lora-tool: note: \"" << name << "\" changed but is not a 2-D weight; not extracted\n";
      continue;
    }
    if (!targeted(module)) continue;

    // D = tuned - base as d_out x d_in (a fan_in_fan_out base stores D^T).
    const std::int64_t rows = t.shape[0], cols = t.shape[1];
    Eigen::MatrixXd D(fan_in_fan_out ? cols : rows, fan_in_fan_out ? rows : cols);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) {
        const double d = tv[static_cast<std::size_t>(i * cols + j)] - bv[static_cast<std::size_t>(i * cols + j)];
        if (fan_in_fan_out) {
          D(j, i) = d;
        } else {
          D(i, j) = d;
        }
      }
    LORA_CHECK(rank <= std::min(D.rows(), D.cols()),
               "--rank " << rank << " exceeds min(d_out, d_in) = " << std::min(D.rows(), D.cols()) << " of \"" << name
                         << "\"");
    // D ~= U_r S_r V_r^T;  B = U_r sqrt(S_r) (d_out x r),  A = sqrt(S_r) V_r^T (r x d_in).
    const Eigen::BDCSVD<Eigen::MatrixXd> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Eigen::VectorXd root = svd.singularValues().head(rank).cwiseSqrt();
    const Eigen::MatrixXd B = svd.matrixU().leftCols(rank) * root.asDiagonal();
    const Eigen::MatrixXd A = root.asDiagonal() * svd.matrixV().leftCols(rank).transpose();
    const double norm = D.norm();
    const double residual = norm > 0 ? (D - B * A).norm() / norm : 0.0;

    AdapterModule m;
    m.r = rank;
    m.alpha = rank;
    m.scale = 1.0;
    m.A = lora::cpu::Matrix<float>(rank, D.cols());
    m.B = lora::cpu::Matrix<float>(D.rows(), rank);
    for (std::int64_t i = 0; i < A.rows(); ++i)
      for (std::int64_t j = 0; j < A.cols(); ++j) m.A(i, j) = lora::io::double_to_float(A(i, j));
    for (std::int64_t i = 0; i < B.rows(); ++i)
      for (std::int64_t j = 0; j < B.cols(); ++j) m.B(i, j) = lora::io::double_to_float(B(i, j));
    std::cout << prefix + module << ": [" << D.rows() << ", " << D.cols() << "] -> r " << rank
              << ", relative residual ||D - B A||_F / ||D||_F = " << std::scientific << std::setprecision(3) << residual
              << std::defaultfloat << "\n";
    const std::size_t dot = module.rfind('.');
    last_components.insert(dot == std::string::npos ? module : module.substr(dot + 1));
    adapter.modules.emplace(prefix + module, std::move(m));
  }
  LORA_CHECK(!adapter.modules.empty(), "no targeted 2-D weight differs between the base and the tuned model");

  adapter.config.r = rank;
  adapter.config.lora_alpha = rank;
  adapter.config.fan_in_fan_out = fan_in_fan_out;
  adapter.config.target_modules =
      targets.empty() ? std::vector<std::string>(last_components.begin(), last_components.end()) : targets;
  if (args.has("--base-name")) adapter.config.base_model_name_or_path = args.required("--base-name");
  lora::io::save_peft(adapter, out);
  std::cout << "wrote " << out << ": " << adapter.modules.size() << " modules, r = " << rank << ", lora_alpha = " << rank
            << " (scale 1), " << adapter.trainable_parameters() << " trainable parameters\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  try {
    if (command == "inspect") return inspect(parse_args(argc, argv, {}, {}));
    if (command == "merge") return merge(parse_args(argc, argv, {"--base", "--adapter", "--out", "--scale"}, {}));
    if (command == "extract")
      return extract(parse_args(argc, argv, {"--base", "--tuned", "--rank", "--out", "--targets", "--prefix", "--base-name"},
                                {"--fan-in-fan-out"}));
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

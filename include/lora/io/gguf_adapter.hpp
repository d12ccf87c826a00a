// LoRA adapters as llama.cpp loads them (src/llama-adapter.cpp): a GGUF file
// with general.type = "adapter", general.architecture = the base model's,
// adapter.type = "lora", adapter.lora.alpha (f32), and for each adapted weight
// a pair of tensors named after the base tensor:
//
//   <base>.lora_a   shape [r, d_in]   (PEFT's lora_A.weight as is; ggml ne = [d_in, r])
//   <base>.lora_b   shape [d_out, r]  (PEFT's lora_B.weight as is; ggml ne = [r, d_out])
//
// e.g. blk.3.attn_q.weight.lora_a. llama.cpp scales each pair by
// user_scale * alpha / r, r = the pair's own rank. The export rules:
//
//   names         a module's Hugging Face name maps to its GGUF base tensor by
//                 GgufNames (one table per architecture, extendable); a module
//                 the table does not name is refused by name
//   scale         the file's alpha is the adapter's lora_alpha; a module whose
//                 scale is not alpha / r (rsLoRA, rank_pattern, alpha_pattern)
//                 has its B multiplied by scale * r / alpha, so llama.cpp
//                 applies exactly this library's scale (listed in the report;
//                 rounded once, in the file's dtype)
//   rotary rows   llama and mistral GGUFs store q_proj and k_proj with the rows
//                 of each head interleaved (llama.cpp's rope, not Hugging Face's
//                 rotate-half; convert_hf_to_gguf.py permutes the base weights
//                 and convert_lora_to_gguf.py the B of their adapters): B's rows
//                 are permuted the same way, which needs the head counts
//                 (GgufAdapterOptions::n_head, n_head_kv)
//   fan_in_fan_out A and B have the same layout either way (only the base
//                 weight is stored transposed): written unchanged
//   refused       DoRA magnitudes, modules_to_save copies and other extra
//                 tensors, PiSSA / OLoRA adapters that fit a residual base
//                 (convert them first: converted_to_lora), all by name
//
// Reading does the reverse: each pair becomes a module with r from its shapes,
// alpha from the file and scale alpha / r (the file's alpha 0: scale 1, as
// llama.cpp reads it), named by the table's canonical Hugging Face prefix, the
// rotary rows put back in Hugging Face's order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/peft.hpp"

namespace lora::io {

// Hugging Face module names <-> GGUF base tensor names, per architecture (the
// value of general.architecture). A rule pairs an HF suffix with a GGUF name;
// "{N}" in both stands for the layer index. A module matches a rule when its
// name ends with the HF pattern at a dot (so "base_model.model.model.layers.0.
// self_attn.q_proj" and "layers.0.self_attn.q_proj" both match
// "layers.{N}.self_attn.q_proj"); the GGUF name gets ".weight" appended.
class GgufNames {
 public:
  // Which head count a weight's rotary rows are interleaved by in the GGUF (see the top of this file).
  enum class Rotary { none, query_heads, key_value_heads };
  struct Rule {
    std::string hf;    // e.g. "layers.{N}.self_attn.q_proj"
    std::string gguf;  // e.g. "blk.{N}.attn_q"
    Rotary rotary = Rotary::none;
  };
  struct Architecture {
    std::vector<Rule> rules;
    std::string hf_prefix;        // what reading puts before a rule's HF name: "model." for llama
    bool fan_in_fan_out = false;  // the HF model stores these weights d_in x d_out (GPT-2's Conv1D)
  };

  // llama (also Mistral, whose GGUF architecture is "llama"), qwen2, qwen3,
  // gemma, gemma2, gemma3, phi3 and gpt2: their adaptable linear layers.
  static GgufNames defaults() {
    GgufNames n;
    const std::vector<Rule> llama_like = {
        {"layers.{N}.self_attn.q_proj", "blk.{N}.attn_q"},      {"layers.{N}.self_attn.k_proj", "blk.{N}.attn_k"},
        {"layers.{N}.self_attn.v_proj", "blk.{N}.attn_v"},      {"layers.{N}.self_attn.o_proj", "blk.{N}.attn_output"},
        {"layers.{N}.mlp.gate_proj", "blk.{N}.ffn_gate"},       {"layers.{N}.mlp.up_proj", "blk.{N}.ffn_up"},
        {"layers.{N}.mlp.down_proj", "blk.{N}.ffn_down"},       {"lm_head", "output"},
    };
    std::vector<Rule> llama = llama_like;  // llama.cpp's interleaved rope: q and k rows permuted
    llama[0].rotary = Rotary::query_heads;
    llama[1].rotary = Rotary::key_value_heads;
    for (const char* arch : {"llama", "mistral"}) n.set(arch, Architecture{llama, "model.", false});
    for (const char* arch : {"qwen2", "qwen3", "gemma", "gemma2", "gemma3"})  // rotate-half rope, as in HF
      n.set(arch, Architecture{llama_like, "model.", false});
    n.set("phi3", Architecture{{{"layers.{N}.self_attn.qkv_proj", "blk.{N}.attn_qkv"},
                                {"layers.{N}.self_attn.o_proj", "blk.{N}.attn_output"},
                                {"layers.{N}.mlp.gate_up_proj", "blk.{N}.ffn_up"},
                                {"layers.{N}.mlp.down_proj", "blk.{N}.ffn_down"},
                                {"lm_head", "output"}},
                               "model.", false});
    n.set("gpt2", Architecture{{{"h.{N}.attn.c_attn", "blk.{N}.attn_qkv"},
                                {"h.{N}.attn.c_proj", "blk.{N}.attn_output"},
                                {"h.{N}.mlp.c_fc", "blk.{N}.ffn_up"},
                                {"h.{N}.mlp.c_proj", "blk.{N}.ffn_down"},
                                {"lm_head", "output"}},
                               "transformer.", true});
    return n;
  }

  void set(const std::string& architecture, Architecture a) { table_[architecture] = std::move(a); }
  // Adds one rule to an architecture (made empty, prefix "", if new); later rules are tried after earlier ones.
  void add(const std::string& architecture, std::string hf, std::string gguf) {
    table_[architecture].rules.push_back(Rule{std::move(hf), std::move(gguf)});
  }
  bool knows(const std::string& architecture) const { return table_.count(architecture) != 0; }
  const Architecture& at(const std::string& architecture) const {
    const auto it = table_.find(architecture);
    if (it == table_.end()) {
      std::string known;
      for (const auto& [name, a] : table_) known += (known.empty() ? "" : ", ") + name;
      LORA_CHECK(false, "GGUF names: no table for architecture \"" << architecture << "\" (known: " << known
                                                                   << "; GgufNames::set or add one)");
    }
    return it->second;
  }

  // A name in the other convention, and the rule's rotary kind.
  struct Mapped {
    std::string name;
    Rotary rotary = Rotary::none;
  };
  // "blk.3.attn_q.weight" for module "model.layers.3.self_attn.q_proj", or nothing.
  std::optional<Mapped> to_gguf(const std::string& architecture, const std::string& module) const {
    for (const Rule& rule : at(architecture).rules) {
      for (std::size_t start = 0;; ++start) {  // the suffixes of `module` that begin after a dot
        std::optional<std::string> layer;
        if (match(rule.hf, module, start, &layer)) return Mapped{fill(rule.gguf, layer) + ".weight", rule.rotary};
        start = module.find('.', start);
        if (start == std::string::npos) break;
      }
    }
    return std::nullopt;
  }
  // "model.layers.3.self_attn.q_proj" for "blk.3.attn_q.weight", or nothing.
  std::optional<Mapped> to_hf(const std::string& architecture, const std::string& tensor) const {
    const Architecture& a = at(architecture);
    if (!detail::ends_with(tensor, ".weight")) return std::nullopt;
    const std::string base = tensor.substr(0, tensor.size() - 7);
    for (const Rule& rule : a.rules) {
      std::optional<std::string> layer;
      if (match(rule.gguf, base, 0, &layer)) return Mapped{a.hf_prefix + fill(rule.hf, layer), rule.rotary};
    }
    return std::nullopt;
  }

 private:
  // Does name[start..] equal `pattern`, with "{N}" matching 1 to 9 digits (stored in *layer)?
  static bool match(const std::string& pattern, const std::string& name, std::size_t start, std::optional<std::string>* layer) {
    const std::size_t hole = pattern.find("{N}");
    if (hole == std::string::npos) return name.compare(start, std::string::npos, pattern) == 0;
    if (name.size() - start < pattern.size() - 3 + 1 || name.compare(start, hole, pattern, 0, hole) != 0) return false;
    std::size_t end = start + hole;
    while (end < name.size() && end - (start + hole) < 9 && name[end] >= '0' && name[end] <= '9') ++end;
    if (end == start + hole) return false;
    *layer = name.substr(start + hole, end - (start + hole));
    return name.compare(end, std::string::npos, pattern, hole + 3, std::string::npos) == 0;
  }
  static std::string fill(const std::string& pattern, const std::optional<std::string>& layer) {
    const std::size_t hole = pattern.find("{N}");
    if (hole == std::string::npos || !layer) return pattern;
    return pattern.substr(0, hole) + *layer + pattern.substr(hole + 3);
  }

  std::map<std::string, Architecture> table_;
};

// The base's attention head counts (config.json's num_attention_heads and
// num_key_value_heads): needed for the rotary rows of llama / mistral q and k.
struct GgufHeads {
  int n_head = 0;
  int n_head_kv = 0;
};

struct GgufAdapterOptions {
  std::string architecture;            // general.architecture of the base model: "llama", "qwen2", ...
  Dtype dtype = Dtype::F32;            // of A and B in the file: F32, F16 or BF16
  GgufNames names = GgufNames::defaults();
  GgufHeads heads;
  std::string name;                    // general.name, if any
};

// What an export did: the file's alpha, each module's GGUF name, and the
// modules whose B carries a folded factor (scale * r / alpha) with that factor.
struct GgufAdapterReport {
  double alpha = 0.0;
  std::map<std::string, std::string> names;
  std::map<std::string, double> folded;
};

namespace detail {

// init_lora_weights of an adapter whose A, B fit a residual base (PiSSA, OLoRA): not appliable to the original W.
inline bool fits_residual_base(const PeftInit& init) {
  if (!std::holds_alternative<std::string>(init)) return false;
  const std::string& s = std::get<std::string>(init);
  return s.rfind("pissa", 0) == 0 || s == "olora";
}

// The head count a rotary weight's rows are permuted by, or a lora::Error saying which one is missing.
inline int rotary_heads(GgufNames::Rotary rotary, const GgufHeads& heads, const std::string& what) {
  const bool query = rotary == GgufNames::Rotary::query_heads;
  const int n = query ? heads.n_head : heads.n_head_kv;
  LORA_CHECK(n > 0, what << ": its rows are permuted for llama.cpp's rope by the number of "
                         << (query ? "attention heads (n_head, num_attention_heads)"
                                   : "key/value heads (n_head_kv, num_key_value_heads)")
                         << ", which was not given");
  return n;
}

}  // namespace detail

// The rows of a llama / mistral q_proj or k_proj weight (or of its adapter's B)
// between Hugging Face's rotate-half order and llama.cpp's interleaved one, for
// `heads` heads: within each head of d rows, HF row j d/2 + i is GGUF row 2 i + j
// (convert_hf_to_gguf.py's LlamaModel.permute); to_gguf false goes back.
template <class T>
cpu::Matrix<T> permute_rotary_rows(const cpu::Matrix<T>& W, int heads, bool to_gguf, const std::string& what = "weight") {
  LORA_CHECK(heads > 0 && W.rows() % (2 * heads) == 0,
             what << ": " << W.rows() << " rows do not split into " << heads << " heads of an even size");
  const std::int64_t head_dim = W.rows() / heads, half = head_dim / 2;
  cpu::Matrix<T> out(W.rows(), W.cols());
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t j = 0; j < 2; ++j)
      for (std::int64_t i = 0; i < half; ++i) {
        const std::int64_t hf = h * head_dim + j * half + i, gguf = h * head_dim + 2 * i + j;
        for (std::int64_t c = 0; c < W.cols(); ++c) out(to_gguf ? gguf : hf, c) = W(to_gguf ? hf : gguf, c);
      }
  return out;
}

// The GGUF writer of `adapter` under the export rules at the top of this file.
inline GgufWriter gguf_adapter(const Adapter& adapter, const GgufAdapterOptions& options,
                               GgufAdapterReport* report = nullptr) {
  LORA_CHECK(options.dtype == Dtype::F32 || options.dtype == Dtype::F16 || options.dtype == Dtype::BF16,
             "GGUF adapter: dtype " << dtype_name(options.dtype) << "; llama.cpp adapters are F32, F16 or BF16");
  LORA_CHECK(!detail::fits_residual_base(adapter.config.init_lora_weights),
             "GGUF adapter: this adapter was initialised with PiSSA / OLoRA, so its A and B apply to the residual base "
             "its training wrote, not to the model llama.cpp loads; convert it first (converted_to_lora: an "
             "ordinary LoRA of rank 2r on the original weights) and export that");
  if (!adapter.other_tensors.empty())
    LORA_CHECK(false, "GGUF adapter: tensor \"" << adapter.other_tensors.begin()->first
                                                << "\" is not a LoRA pair (modules_to_save copy or trained bias): "
                                                << "llama.cpp adapters hold only lora_a / lora_b pairs");
  const double alpha = adapter.config.lora_alpha;
  LORA_CHECK(std::isfinite(alpha) && alpha > 0.0 && static_cast<double>(static_cast<float>(alpha)) == alpha,
             "GGUF adapter: lora_alpha " << alpha << " must be positive and exact as an f32 (adapter.lora.alpha)");
  GgufWriter w;
  w.set("general.architecture", GgufValue::string(options.architecture));
  w.set("general.type", GgufValue::string("adapter"));
  if (!options.name.empty()) w.set("general.name", GgufValue::string(options.name));
  w.set("adapter.type", GgufValue::string("lora"));
  w.set("adapter.lora.alpha", GgufValue::f32(static_cast<float>(alpha)));
  GgufAdapterReport r;
  r.alpha = alpha;
  std::set<std::string> written;
  for (const auto& [module, m] : adapter.modules) {
    LORA_CHECK(!m.dora(), "GGUF adapter: module \"" << module << "\" is DoRA (lora_magnitude_vector), which llama.cpp "
                                                    << "does not apply; merge it into the base instead (lora-tool merge)");
    const std::optional<GgufNames::Mapped> mapped = options.names.to_gguf(options.architecture, module);
    LORA_CHECK(mapped.has_value(), "GGUF adapter: module \"" << module << "\" has no GGUF name for architecture \""
                                                             << options.architecture << "\" (GgufNames::add a rule)");
    const std::string& name = mapped->name;
    LORA_CHECK(written.insert(name).second,
               "GGUF adapter: two modules map to \"" << name << "\" (the second is \"" << module << "\")");
    r.names.emplace(module, name);
    const double factor = m.scale * m.r / alpha;  // llama.cpp applies alpha / r; this makes it m.scale
    w.add(name + ".lora_a", m.A.view(), options.dtype);
    if (factor == 1.0 && mapped->rotary == GgufNames::Rotary::none) {
      w.add(name + ".lora_b", m.B.view(), options.dtype);  // bit for bit
      continue;
    }
    cpu::Matrix<double> B(m.B.rows(), m.B.cols());
    for (std::int64_t i = 0; i < B.rows(); ++i)
      for (std::int64_t j = 0; j < B.cols(); ++j) B(i, j) = factor * static_cast<double>(m.B(i, j));
    if (factor != 1.0) r.folded.emplace(module, factor);
    if (mapped->rotary != GgufNames::Rotary::none) {
      const std::string what = "GGUF adapter: module \"" + module + "\"";
      B = permute_rotary_rows(B, detail::rotary_heads(mapped->rotary, options.heads, what), true, what);
    }
    w.add(name + ".lora_b", B.view(), options.dtype);
  }
  if (report) *report = std::move(r);
  return w;
}

inline GgufAdapterReport save_gguf_adapter(const Adapter& adapter, const std::string& path,
                                           const GgufAdapterOptions& options) {
  GgufAdapterReport report;
  gguf_adapter(adapter, options, &report).write(path);
  return report;
}

// An adapter from a llama.cpp LoRA GGUF held by `file` (see the top of this file);
// `heads` is needed when it adapts a llama / mistral q_proj or k_proj.
inline Adapter adapter_from_gguf(const GgufReader& file, const GgufHeads& heads = {},
                                 const GgufNames& names = GgufNames::defaults()) {
  const std::string& source = file.source();
  auto text = [&](const char* key) -> const std::string& {
    const GgufValue* v = file.find(key);
    LORA_CHECK(v && v->type == GgufType::STRING, source << ": not a LoRA adapter: " << key << " is "
                                                        << (v ? gguf_type_name(v->type) : "absent") << ", expected a string");
    return v->text;
  };
  LORA_CHECK(text("general.type") == "adapter", source << ": general.type is \"" << text("general.type")
                                                       << "\", expected \"adapter\"");
  LORA_CHECK(text("adapter.type") == "lora", source << ": adapter.type is \"" << text("adapter.type")
                                                    << "\", expected \"lora\"");
  const std::string& architecture = text("general.architecture");
  const GgufValue& alpha_value = file.get("adapter.lora.alpha", GgufType::F32);
  const double alpha = alpha_value.real;
  LORA_CHECK(std::isfinite(alpha) && alpha >= 0.0, source << ": adapter.lora.alpha is " << alpha);
  const GgufNames::Architecture& arch = names.at(architecture);

  Adapter adapter;
  std::map<int, int> rank_votes;
  std::set<std::string> targets;
  for (const GgufTensorInfo& t : file.tensors()) {
    const bool is_a = detail::ends_with(t.name, ".lora_a");
    LORA_CHECK(is_a || detail::ends_with(t.name, ".lora_b"),
               source << ": tensor \"" << t.name << "\" is neither <name>.lora_a nor <name>.lora_b");
    const std::string base = t.name.substr(0, t.name.size() - 7);
    const std::string other = base + (is_a ? ".lora_b" : ".lora_a");
    LORA_CHECK(file.contains(other), source << ": tensor \"" << t.name << "\" has no \"" << other << "\"");
    if (!is_a) continue;  // each pair once, from its lora_a
    const GgufTensorInfo& b = file.info(other);
    LORA_CHECK(t.shape.size() == 2 && b.shape.size() == 2 && t.shape[0] == b.shape[1] && t.shape[0] > 0,
               source << ": \"" << t.name << "\" " << shape_string(t.shape) << " and \"" << other << "\" "
                      << shape_string(b.shape) << " are not [r, d_in] and [d_out, r] with one r > 0");
    LORA_CHECK(t.shape[0] <= std::numeric_limits<int>::max(), source << ": \"" << t.name << "\": rank " << t.shape[0]);
    const std::optional<GgufNames::Mapped> mapped = names.to_hf(architecture, base);
    LORA_CHECK(mapped.has_value(), source << ": tensor \"" << base << "\" has no Hugging Face name for architecture \""
                                          << architecture << "\" (GgufNames::add a rule)");
    const std::string& module = mapped->name;
    AdapterModule m;
    m.r = static_cast<int>(t.shape[0]);
    m.alpha = alpha == 0.0 ? m.r : alpha;  // llama.cpp: alpha 0 means scale 1
    m.scale = m.alpha / m.r;
    m.stored_dtype = t.dtype;
    m.A = cpu::Matrix<float>(t.shape[0], t.shape[1]);
    m.B = cpu::Matrix<float>(b.shape[0], b.shape[1]);
    file.read_into(t.name, m.A.view());
    file.read_into(other, m.B.view());
    if (mapped->rotary != GgufNames::Rotary::none) {
      const std::string what = source + ": \"" + other + "\"";
      m.B = permute_rotary_rows(m.B, detail::rotary_heads(mapped->rotary, heads, what), false, what);
    }
    ++rank_votes[m.r];
    const std::size_t dot = module.rfind('.');
    targets.insert(dot == std::string::npos ? module : module.substr(dot + 1));
    LORA_CHECK(adapter.modules.emplace(module, std::move(m)).second,
               source << ": two tensor pairs map to module \"" << module << "\"");
  }
  LORA_CHECK(!adapter.modules.empty(), source << ": the adapter holds no lora_a / lora_b pair");
  PeftConfig& c = adapter.config;
  c.r = std::max_element(rank_votes.begin(), rank_votes.end(), [](const auto& x, const auto& y) {
          return x.second < y.second;
        })->first;  // the most common rank; the others by rank_pattern
  c.lora_alpha = alpha == 0.0 ? c.r : alpha;
  c.fan_in_fan_out = arch.fan_in_fan_out;
  c.target_modules.assign(targets.begin(), targets.end());
  for (const auto& [module, m] : adapter.modules) {
    if (m.r != c.r) c.rank_pattern.emplace_back(detail::escape_module_pattern(module), m.r);
    if (alpha == 0.0 && m.r != c.r) c.alpha_pattern.emplace_back(detail::escape_module_pattern(module), m.r);
  }
  return adapter;
}

inline Adapter load_gguf_adapter(const std::string& path, const GgufHeads& heads = {},
                                 const GgufNames& names = GgufNames::defaults()) {
  return adapter_from_gguf(GgufReader::map(path), heads, names);
}

}  // namespace lora::io

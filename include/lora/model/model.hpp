// lora::Model: a frozen model's named weights, each a lora::AdapterSet (its
// base and the adapters on it), and the adapters attached to them by PEFT's
// LoraConfig rules (PEFT's LoraModel: get_peft_model, add_adapter,
// set_adapter, delete_adapter, add_weighted_adapter, merge_and_unload,
// save_pretrained / from_pretrained).
//
//   lora::Model<float, lora::cpu::Backend> model(ctx);
//   model.add_base("model.layers.0.self_attn.q_proj", Wq);        // every frozen weight, by its module name
//   model.add_adapter("default", config);                          // target_modules, rank_pattern, ... as PEFT
//   adam.add_group(model.parameters(), 2e-4);                      // named as PEFT names them
//   model.module("model.layers.0.self_attn.q_proj").forward(x, y, state);   // the trainer's own graph
//   model.save_peft("default", "out/");                            // a PEFT directory
//
// The model does not run the network: the trainer calls each module's
// forward / inference / backward (layers/adapter_set.hpp) where its graph
// uses that weight. What the model does is what a model-level operation
// needs: which weights get adapters, one list of trainable tensors, one memory
// report, one merge, one file per adapter, one checkpoint for the run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "lora/adapters/init.hpp"
#include "lora/base/dense.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/parameter.hpp"
#include "lora/io/checkpoint.hpp"
#include "lora/io/init_conversion.hpp"
#include "lora/io/peft.hpp"
#include "lora/layers/adapter_set.hpp"
#include "lora/optim/adam.hpp"

namespace lora {

template <class T, class Backend, class BaseT = DenseBase<T, Backend>>
class Model {
 public:
  using Base = BaseT;
  using Set = AdapterSet<T, Backend, Base>;
  using Adapter = typename Set::Adapter;
  using Param = typename Adapter::Param;
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;
  using Parameters = std::vector<Parameter<Param, Space>>;

  explicit Model(Context& ctx) : ctx_(&ctx) {}

  Model(Model&&) noexcept = default;
  Model& operator=(Model&&) noexcept = default;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // ---- the frozen model ------------------------------------------------------------

  // A frozen weight under its module name ("model.layers.0.self_attn.q_proj",
  // "transformer.h.0.attn.c_attn"), W borrowed: d_out x d_in, or d_in x d_out
  // with fan_in_fan_out (GPT-2's Conv1D). A read-only W (MatrixView<const T>)
  // works for everything but merging. Its position among the modules is the
  // RNG stream of the adapters on it, so every module draws its own init.
  Set& add_base(const std::string& module, View W, ConstView bias = {}, bool fan_in_fan_out = false) {
    check_new_module(module);
    return add_set(module, Set(*ctx_, W, bias, fan_in_fan_out));
  }
  template <class ConstW, class = std::enable_if_t<std::is_same_v<ConstW, ConstView>>>
  Set& add_base(const std::string& module, ConstW W, ConstView bias = {}, bool fan_in_fan_out = false) {
    check_new_module(module);
    return add_set(module, Set(*ctx_, W, bias, fan_in_fan_out));
  }
  // Any frozen base (a quantized one, ...).
  Set& add_base(const std::string& module, Base base) {
    check_new_module(module);
    return add_set(module, Set(std::move(base)));
  }

  // The module (its base and adapters: forward, inference, backward, mixed batches).
  Set& module(const std::string& name) { return find_module(name, "module")->set; }
  const Set& module(const std::string& name) const { return find_module(name, "module")->set; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // In the order they were added.
  std::vector<std::string> modules() const {
    std::vector<std::string> out;
    for (const auto& m : modules_) out.push_back(m->name);
    return out;
  }

  // The output layer that "all-linear" leaves out (PEFT's
  // model.get_output_embeddings()). Default: "lm_head" when the model has it.
  void set_output_head(const std::string& name) {
    LORA_CHECK(name.empty() || contains(name), "set_output_head: " << unknown_module(name));
    output_head_ = name;
    output_head_set_ = true;
  }
  std::string output_head() const {
    if (output_head_set_) return output_head_;
    return contains("lm_head") ? "lm_head" : "";
  }

  // ---- adapters ----------------------------------------------------------------

  // The modules `config` adapts (PEFT's rules: io::select_target_modules).
  std::vector<std::string> targets(const io::PeftConfig& config) const {
    return io::select_target_modules(config, modules(), output_head());
  }

  // Attaches a new adapter to every module `config` selects, each with its r
  // and alpha from rank_pattern / alpha_pattern, initialised as
  // config.init_lora_weights says (`init`, when given, in its place: the
  // config is then recorded with it) from `seed` and the module's position
  // (a pure function of them): A random and B = 0 (true, "gaussian"), or A
  // and B from W with W rewritten to the residual W - s B A ("pissa",
  // "pissa_niter_<N>", "olora": adapters/init.hpp; every selected base must be
  // dense and writable, and no adapter merged). The first adapter of a model
  // becomes the active one (PEFT's get_peft_model); later ones are added
  // inactive (PEFT's add_adapter). Returns the adapted modules; selects none,
  // a module whose layout (fan_in_fan_out) differs from the config's, or an
  // init this library does not run is an error, and an error changes nothing
  // (every decomposition is computed before any W is written).
  std::vector<std::string> add_adapter(const std::string& name, const io::PeftConfig& config, std::uint64_t seed = 0,
                                       std::optional<Init> init = std::nullopt) {
    check_new_adapter(name, "add_adapter");
    std::vector<std::string> selected = targets(config);
    LORA_CHECK(!selected.empty(), "add_adapter(\"" << name << "\"): target_modules " << describe_targets(config)
                                                   << " match none of the model's " << modules_.size()
                                                   << " modules (e.g. \"" << (modules_.empty() ? "" : modules_.front()->name)
                                                   << "\")");
    io::PeftConfig recorded = config;
    if (init) recorded.init_lora_weights = io::peft_init_value(*init);
    const io::PeftConfig::Resolver resolver = recorded.resolver();
    std::vector<Config> configs;
    for (const std::string& m : selected) {
      Config c = resolver.new_adapter_config(m);
      c.seed = seed;
      c.validate();
      check_layout(name, m, c.fan_in_fan_out);
      configs.push_back(c);
    }
    std::vector<std::optional<WeightInit<Param>>> decompositions(selected.size());
    for (std::size_t k = 0; k < selected.size(); ++k) {
      if (!init_writes_base(configs[k].init)) continue;
      LORA_CHECK(merged_.empty(), "add_adapter(\"" << name << "\"): init " << to_string(configs[k].init)
                                                   << " decomposes W, and adapter \"" << merged_
                                                   << "\" is merged into it; unmerge() first");
      const Module& m = *find_module(selected[k], "add_adapter");
      decompositions[k] =
          weight_init(m.set.base(), configs[k], "add_adapter(\"" + name + "\") on module \"" + selected[k] + "\"");
    }
    for (std::size_t k = 0; k < selected.size(); ++k) {
      Module& m = *find_module(selected[k], "add_adapter");
      auto& added = decompositions[k] ? m.set.add(name, configs[k], m.stream, *decompositions[k])
                                      : m.set.add(name, configs[k], m.stream);
      added.set_dropout_rank(dropout_rank_);
    }
    adapters_.push_back({name, std::move(recorded), selected});
    if (adapters_.size() == 1) set_adapter(name);
    return selected;
  }

  // Data-parallel training: this process's rank in the dropout key of every
  // adapter, present and future (LoraAdapter::set_dropout_rank), so ranks draw
  // different masks; rank 0 draws a single-process run's.
  void set_dropout_rank(std::uint32_t rank) {
    dropout_rank_ = rank;
    for (const AdapterInfo& a : adapters_)
      for (const std::string& m : a.modules) find_module(m, "set_dropout_rank")->set.get(a.name).set_dropout_rank(rank);
  }
  std::uint32_t dropout_rank() const { return dropout_rank_; }

  // Removes an adapter from every module. A merged one is refused (unmerge() first).
  void delete_adapter(const std::string& name) {
    const auto it = find_adapter(name, "delete_adapter");
    LORA_CHECK(merged_ != name, "delete_adapter(\"" << name << "\"): the adapter is merged; unmerge() first");
    for (const std::string& m : it->modules) find_module(m, "delete_adapter")->set.remove(name);
    active_.erase(std::remove_if(active_.begin(), active_.end(), [&](const WeightedAdapter& a) { return a.name == name; }),
                  active_.end());
    adapters_.erase(it);
  }

  // In the order they were added.
  std::vector<std::string> adapters() const {
    std::vector<std::string> out;
    for (const AdapterInfo& a : adapters_) out.push_back(a.name);
    return out;
  }
  bool has_adapter(const std::string& name) const { return find_info(name) != nullptr; }
  // The config it was attached with, and the modules it is on.
  const io::PeftConfig& adapter_config(const std::string& name) const { return info(name, "adapter_config").config; }
  const std::vector<std::string>& adapter_modules(const std::string& name) const {
    return info(name, "adapter_modules").modules;
  }

  // The adapters every module's forward applies, with weights (PEFT's
  // set_adapter; a weighted list as its weighted inference). A module applies
  // those of them it holds. Refused while an adapter is merged (except {merged: 1}).
  void set_adapter(const std::vector<WeightedAdapter>& adapters) {
    std::set<std::string> seen;
    for (const WeightedAdapter& a : adapters) {
      info(a.name, "set_adapter");
      LORA_CHECK(seen.insert(a.name).second, "set_adapter: adapter \"" << a.name << "\" is named twice");
      LORA_CHECK(std::isfinite(a.weight), "set_adapter: adapter \"" << a.name << "\" has weight " << a.weight
                                                                    << ", expected a finite value");
    }
    LORA_CHECK(merged_.empty() || (adapters.size() == 1 && adapters[0].name == merged_ && adapters[0].weight == 1.0),
               "set_adapter: adapter \"" << merged_ << "\" is merged; unmerge() first");
    for (auto& m : modules_) {
      std::vector<WeightedAdapter> here;
      for (const WeightedAdapter& a : adapters)
        if (m->set.contains(a.name)) here.push_back(a);
      m->set.set_active(here);
    }
    active_ = adapters;
  }
  void set_adapter(const std::string& name) { set_adapter(std::vector<WeightedAdapter>{{name, 1.0}}); }
  const std::vector<WeightedAdapter>& active_adapters() const { return active_; }

  // A new adapter equal to sum_k w_k (its term k) on every module any term is
  // on: PEFT's add_weighted_adapter(combination_type="cat"), exact (see
  // AdapterSet::combine). Its config is the first term's, with target_modules
  // the full names of its modules; ranks and alphas go to the file per module.
  std::vector<std::string> add_weighted_adapter(const std::string& name, const std::vector<WeightedAdapter>& terms) {
    check_new_adapter(name, "add_weighted_adapter");
    LORA_CHECK(!terms.empty(), "add_weighted_adapter(\"" << name << "\"): expected at least one adapter, found none");
    std::vector<std::string> union_modules;
    for (const WeightedAdapter& t : terms)
      for (const std::string& m : info(t.name, "add_weighted_adapter").modules)
        if (std::find(union_modules.begin(), union_modules.end(), m) == union_modules.end()) union_modules.push_back(m);
    std::vector<std::string> ordered;  // model order
    for (const auto& m : modules_)
      if (std::find(union_modules.begin(), union_modules.end(), m->name) != union_modules.end()) ordered.push_back(m->name);
    for (const std::string& m : ordered) {
      Module& mod = *find_module(m, "add_weighted_adapter");
      std::vector<WeightedAdapter> here;
      for (const WeightedAdapter& t : terms)
        if (mod.set.contains(t.name)) here.push_back(t);
      mod.set.combine(name, here, mod.stream).set_dropout_rank(dropout_rank_);
    }
    io::PeftConfig config = info(terms.front().name, "add_weighted_adapter").config;
    config.target_modules = ordered;
    config.target_modules_regex.clear();
    config.exclude_modules.clear();
    config.exclude_modules_regex.clear();
    config.layers_to_transform.clear();
    config.layers_pattern.clear();
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.use_rslora = false;
    adapters_.push_back({name, std::move(config), ordered});
    return ordered;
  }

  // ---- training ------------------------------------------------------------------

  // One adapter's trainable tensors on every module, in module order, named as
  // PEFT names the parameters: "base_model.model.<module>.lora_A.<adapter>.weight".
  Parameters parameters(const std::string& adapter) {
    Parameters out;
    for (const std::string& m : info(adapter, "parameters").modules) {
      Adapter& a = find_module(m, "parameters")->set.get(adapter);
      for (Parameter<Param, Space> p : a.parameters()) {
        p.name = io::kPeftKeyPrefix + m + "." + p.name + "." + adapter + ".weight";
        out.push_back(std::move(p));
      }
    }
    return out;
  }
  // The active adapters' tensors (what a training step updates).
  Parameters parameters() {
    Parameters out;
    for (const WeightedAdapter& a : active_) {
      Parameters more = parameters(a.name);
      out.insert(out.end(), more.begin(), more.end());
    }
    return out;
  }

  // Gradients of every adapter to zero (before GradMode::accumulate steps).
  void zero_grad() {
    for (auto& m : modules_)
      for (const std::string& a : m->set.names()) m->set.get(a).zero_grad();
  }

  // sum over modules of r (d_in + d_out), for one adapter or all.
  std::int64_t trainable_parameters(const std::string& adapter = "") const {
    std::int64_t n = 0;
    for (const auto& m : modules_) {
      if (adapter.empty()) {
        n += m->set.trainable_parameters();
      } else if (m->set.contains(adapter)) {
        n += m->set.get(adapter).trainable_parameters();
      }
    }
    return n;
  }
  // What full fine-tuning would train: every base's W and bias.
  std::int64_t frozen_parameters() const {
    std::int64_t n = 0;
    for (const auto& m : modules_) n += m->set.base().parameters();
    return n;
  }

  // Every module's report (bases, adapters, states kept inside the sets,
  // workspaces), plus the optimizer's state when one is given.
  MemoryReport memory() const {
    MemoryReport report;
    for (const auto& m : modules_) report += m->set.memory();
    return report;
  }
  template <class P>
  MemoryReport memory(const Adam<P, Backend>& optimizer) const {
    MemoryReport report = memory();
    report.optimizer_bytes += optimizer.state_bytes();
    return report;
  }

  // ---- merging -------------------------------------------------------------------

  // W <- W + s B A on every module the adapter is on (default: the single
  // active adapter); inference then costs the frozen GEMMs alone. One adapter
  // merged at a time; while merged, training and switching are refused.
  void merge(const std::string& adapter = "") {
    const std::string name = adapter.empty() ? single_active("merge") : adapter;
    LORA_CHECK(merged_.empty(), "merge(\"" << name << "\"): adapter \"" << merged_ << "\" is already merged; unmerge() first");
    const AdapterInfo& a = info(name, "merge");
    for (const std::string& m : a.modules) check_writable(m, "merge");
    for (const std::string& m : a.modules) find_module(m, "merge")->set.merge(name);
    merged_ = name;
    set_adapter(name);
  }
  // W <- W - s B A on every module: restores the base up to rounding.
  void unmerge() {
    LORA_CHECK(!merged_.empty(), "unmerge: no adapter is merged");
    for (const std::string& m : info(merged_, "unmerge").modules) find_module(m, "unmerge")->set.unmerge();
    merged_.clear();
  }
  // The merged adapter, or "".
  const std::string& merged() const { return merged_; }

  // One module's weight of the merged model, dense, in the type U the caller
  // picks, W itself untouched (the way to merge onto a read-only or quantized
  // base): out = W + s B A of `adapter` (AdapterSet::merged_weight), or W
  // (dequantized for a quantized base) on a module the adapter is not on.
  // out is shaped as W is stored. Refused while another adapter is merged.
  template <class U>
  void merged_weight(const std::string& adapter, const std::string& module, MatrixView<U, Space> out) const {
    info(adapter, "merged_weight");
    LORA_CHECK(merged_.empty() || merged_ == adapter, "merged_weight(\"" << adapter << "\"): adapter \"" << merged_
                                                                          << "\" is merged; unmerge() first");
    const Set& set = find_module(module, "merged_weight")->set;
    if (set.contains(adapter)) {
      set.merged_weight(adapter, out);
    } else {
      set.base_weight(out);
    }
  }

  // Merges the active adapter for good and removes every adapter: the bases
  // are the fine-tuned model (PEFT's merge_and_unload).
  void merge_and_unload() {
    if (merged_.empty()) merge();
    merged_.clear();
    for (auto& m : modules_) m->set.merge_and_unload();
    adapters_.clear();
    active_.clear();
  }

  // ---- files ---------------------------------------------------------------------

  // The adapter as a PEFT adapter (host copy): its config, with r and alpha of
  // its modules (others in rank_pattern / alpha_pattern), and A and B.
  io::Adapter to_peft(const std::string& adapter) const {
    const AdapterInfo& a = info(adapter, "save_peft");
    io::Adapter out = io::adapter_from_adapters(named_adapters(a), a.config);
    out.other_tensors = a.other_tensors;
    return out;
  }
  // A PEFT directory (adapter_config.json + adapter_model.safetensors), atomically.
  // For a PiSSA / OLoRA adapter this is its A and B for the residual base,
  // config init_lora_weights "pissa" / "olora" as PEFT writes it: it fits the
  // residual W only. save_peft_as_lora writes one for the original W.
  void save_peft(const std::string& adapter, const std::string& dir, io::Dtype dtype = io::Dtype::F32) const {
    io::save_peft(to_peft(adapter), dir, dtype);
  }

  // A PiSSA / OLoRA adapter as an ordinary LoRA of rank 2r for the original,
  // untouched W (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)):
  // A' = [A; A0], B' = [B, -B0], r and rank_pattern doubled, lora_alpha and
  // alpha_pattern times 2 (sqrt(2) with rsLoRA), init_lora_weights true
  // (io/init_conversion.hpp). Refused for an adapter that did not start from W.
  io::Adapter to_peft_as_lora(const std::string& adapter) const {
    const AdapterInfo& a = info(adapter, "save_peft_as_lora");
    return io::converted_to_lora(to_peft(adapter), io::initial_adapter_of(named_adapters(a), a.config));
  }
  void save_peft_as_lora(const std::string& adapter, const std::string& dir, io::Dtype dtype = io::Dtype::F32) const {
    io::save_peft(to_peft_as_lora(adapter), dir, dtype);
  }
  // A PEFT adapter as a new adapter `name`, on exactly the modules its file
  // holds (each must be in the model, with the layout of its config), with
  // their weights. Everything is checked before the model changes. Tensors
  // that are not LoRA pairs (modules_to_save copies such as a trained
  // classifier head, trained biases) are not applied, since the model borrows
  // W and never replaces it: the model keeps them with the adapter
  // (other_tensors(name)) for the trainer to copy into its own weights, and
  // save_peft writes them back, so loading and saving loses nothing.
  std::vector<std::string> load_peft(const io::Adapter& peft, const std::string& name) {
    check_new_adapter(name, "load_peft");
    const io::PeftConfig::Resolver resolver = peft.config.resolver();
    std::vector<std::string> on;
    for (const auto& m : modules_)  // model order
      if (peft.modules.count(m->name)) on.push_back(m->name);
    for (const auto& [module, weights] : peft.modules) {
      LORA_CHECK(contains(module), "load_peft(\"" << name << "\"): the adapter has module \"" << module
                                                  << "\", which the model does not (" << unknown_module(module) << ")");
      const Set& set = module_set(module);
      check_layout(name, module, peft.config.fan_in_fan_out);
      LORA_CHECK(weights.d_in() == set.d_in() && weights.d_out() == set.d_out(),
                 "load_peft(\"" << name << "\"): module \"" << module << "\" has A [" << weights.r << ", "
                                << weights.d_in() << "], B [" << weights.d_out() << ", " << weights.r
                                << "]; the model's weight is " << set.d_out() << " x " << set.d_in());
    }
    std::vector<io::NamedAdapter<T, Backend>> named;
    for (const std::string& m : on) {
      Module& mod = *find_module(m, "load_peft");
      Config c = resolver.layer_config(m);
      auto& added = mod.set.add(name, c, mod.stream);
      added.set_dropout_rank(dropout_rank_);
      named.push_back({m, &added});
    }
    try {
      io::load_into_adapters(peft, named);
    } catch (...) {
      for (const std::string& m : on) find_module(m, "load_peft")->set.remove(name);
      throw;
    }
    adapters_.push_back({name, peft.config, on, peft.other_tensors});
    if (adapters_.size() == 1) set_adapter(name);
    return on;
  }

  // An adapter's tensors that are not LoRA pairs, by full key
  // ("base_model.model.classifier.weight"): what load_peft found, written back
  // by save_peft. A trainer that updates those layers puts their new values here
  // before saving.
  std::map<std::string, io::RawTensor>& other_tensors(const std::string& adapter) {
    return (*find_adapter(adapter, "other_tensors")).other_tensors;
  }
  const std::map<std::string, io::RawTensor>& other_tensors(const std::string& adapter) const {
    return info(adapter, "other_tensors").other_tensors;
  }
  std::vector<std::string> load_peft(const std::string& dir, const std::string& name) {
    return load_peft(io::load_peft(dir), name);
  }

  // The whole run in one file, atomically: every adapter's A and B and
  // dropout position, and the optimizer (its moments, step, learning rates).
  // load_checkpoint restores it into a model and optimizer built the same way,
  // bit for bit, checking everything before it writes anything.
  template <class P>
  void save_checkpoint(const std::string& path, Adam<P, Backend>& optimizer,
                       const std::map<std::string, std::string>& user = {}) const {
    io::save_checkpoint(path, all_named_adapters("save_checkpoint"), optimizer, user);
  }
  template <class P>
  std::map<std::string, std::string> load_checkpoint(const std::string& path, Adam<P, Backend>& optimizer) {
    LORA_CHECK(merged_.empty(), "load_checkpoint: adapter \"" << merged_ << "\" is merged; unmerge() first");
    return io::load_checkpoint(path, all_named_adapters("load_checkpoint"), optimizer);
  }

 private:
  struct Module {
    std::string name;
    Set set;
    std::uint32_t stream;
  };
  struct AdapterInfo {
    std::string name;
    io::PeftConfig config;
    std::vector<std::string> modules;  // in model order
    std::map<std::string, io::RawTensor> other_tensors = {};  // not LoRA pairs (modules_to_save), from load_peft
  };

  Set& add_set(const std::string& module, Set set) {
    const auto stream = static_cast<std::uint32_t>(next_stream_++);
    modules_.push_back(std::make_unique<Module>(Module{module, std::move(set), stream}));
    index_.emplace(module, modules_.size() - 1);
    return modules_.back()->set;
  }
  void check_new_module(const std::string& module) const {
    LORA_CHECK(!module.empty() && module.size() <= io::kMaxModuleNameBytes,
               "add_base: a module name must have 1 to " << io::kMaxModuleNameBytes << " bytes");
    LORA_CHECK(!contains(module), "add_base: the model already has a module \"" << module << "\"");
    LORA_CHECK(adapters_.empty(), "add_base(\"" << module << "\"): add every base before the first adapter");
  }
  Module* find_module(const std::string& name, const char* what) const {
    const auto it = index_.find(name);
    LORA_CHECK(it != index_.end(), what << ": " << unknown_module(name));
    return modules_[it->second].get();
  }
  const Set& module_set(const std::string& name) const { return find_module(name, "module")->set; }
  std::string unknown_module(const std::string& name) const {
    std::ostringstream out;
    out << "unknown module \"" << name << "\" (the model has " << modules_.size() << " modules";
    for (std::size_t k = 0; k < modules_.size() && k < 3; ++k) out << (k == 0 ? ": \"" : ", \"") << modules_[k]->name << '"';
    if (modules_.size() > 3) out << ", ...";
    out << ')';
    return out.str();
  }

  const AdapterInfo* find_info(const std::string& name) const {
    for (const AdapterInfo& a : adapters_)
      if (a.name == name) return &a;
    return nullptr;
  }
  const AdapterInfo& info(const std::string& name, const char* what) const {
    const AdapterInfo* a = find_info(name);
    if (a == nullptr) {
      std::ostringstream names;
      for (std::size_t k = 0; k < adapters_.size(); ++k) names << (k ? ", \"" : "\"") << adapters_[k].name << '"';
      LORA_CHECK(false, what << ": unknown adapter \"" << name << "\" (the model has "
                             << (adapters_.empty() ? std::string("none") : names.str()) << ")");
    }
    return *a;
  }
  typename std::vector<AdapterInfo>::iterator find_adapter(const std::string& name, const char* what) {
    info(name, what);
    return std::find_if(adapters_.begin(), adapters_.end(), [&](const AdapterInfo& a) { return a.name == name; });
  }
  void check_new_adapter(const std::string& name, const char* what) const {
    LORA_CHECK(!name.empty() && name != Set::kBase,
               what << ": \"" << name << "\" is not a valid adapter name (empty and \"" << Set::kBase
                    << "\" mean the base)");
    LORA_CHECK(find_info(name) == nullptr, what << ": the model already has an adapter \"" << name << "\"");
  }
  void check_layout(const std::string& adapter, const std::string& module, bool fan_in_fan_out) const {
    const Set& set = module_set(module);
    LORA_CHECK(set.fan_in_fan_out() == fan_in_fan_out,
               "adapter \"" << adapter << "\": its config has fan_in_fan_out = " << fan_in_fan_out << " but module \""
                            << module << "\" stores W " << (set.fan_in_fan_out() ? "d_in x d_out" : "d_out x d_in")
                            << " (fan_in_fan_out = " << set.fan_in_fan_out() << ")");
  }
  void check_writable(const std::string& module, const char* what) const {
    if constexpr (std::is_same_v<Base, DenseBase<T, Backend>>) {
      LORA_CHECK(module_set(module).base().writable(),
                 what << ": module \"" << module << "\" was added over a read-only W (MatrixView<const T>); merging "
                      << "writes W, so add the base over a writable view");
    }
  }
  std::string single_active(const char* what) const {
    LORA_CHECK(active_.size() == 1 && active_[0].weight == 1.0,
               what << ": name the adapter (the active set is not one adapter at weight 1)");
    return active_[0].name;
  }
  static std::string describe_targets(const io::PeftConfig& c) {
    if (!c.target_modules_regex.empty()) return "\"" + c.target_modules_regex + "\"";
    std::string out = "[";
    for (std::size_t k = 0; k < c.target_modules.size(); ++k) out += (k ? ", \"" : "\"") + c.target_modules[k] + "\"";
    return out + "]";
  }

  std::vector<io::NamedAdapter<T, Backend>> named_adapters(const AdapterInfo& a) const {
    std::vector<io::NamedAdapter<T, Backend>> out;
    for (const std::string& m : a.modules) out.push_back({m, &find_module(m, "adapter")->set.get(a.name)});
    return out;
  }
  // Every adapter of every module, named "<adapter>/<module>" (a checkpoint's layer names).
  std::vector<io::NamedAdapter<T, Backend>> all_named_adapters(const char* what) const {
    LORA_CHECK(!adapters_.empty(), what << ": the model has no adapter");
    std::vector<io::NamedAdapter<T, Backend>> out;
    for (const AdapterInfo& a : adapters_)
      for (const std::string& m : a.modules) out.push_back({a.name + "/" + m, &find_module(m, what)->set.get(a.name)});
    return out;
  }

  Context* ctx_;
  std::vector<std::unique_ptr<Module>> modules_;  // in the order added; each stays at one address
  std::map<std::string, std::size_t> index_;
  std::size_t next_stream_ = 0;
  std::vector<AdapterInfo> adapters_;             // in the order added
  std::vector<WeightedAdapter> active_;
  std::string merged_;
  std::string output_head_;
  bool output_head_set_ = false;
  std::uint32_t dropout_rank_ = 0;
};

}  // namespace lora

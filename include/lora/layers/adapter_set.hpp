// lora::AdapterSet: several named LoRA adapters over one frozen base (PEFT's
// multi-adapter LoraLayer; the unit a lora::Model holds per adapted weight).
// The set adds the active adapters' paths to one base output
//
//   y = x W^T + bias + sum_k w_k s_k (drop(x) A_k^T) B_k^T        k over the active adapters
//
// or, for a mixed batch where row i names adapter a(i) or none (PEFT's adapter_names),
//
//   y[i, :] = x[i, :] W^T + bias + s_a(i) (drop(x[i, :]) A_a(i)^T) B_a(i)^T,
//
// in training too: backward sends each row's gradient to its own adapter.
// DoRA adapters (Config.use_dora, adapters/lora.hpp) rescale the base's x W^T:
//
//   y = x W^T + bias + sum_k w_k [(c_k - 1) o (x W^T) + c_k o s_k (drop(x) A_k^T) B_k^T]
//
// with c_k = 1 for a plain LoRA adapter (c_k = m_k / ||W + s_k B_k A_k||), one
// base product for all, and one base backward on dL_dy o (1 + sum_k w_k (c_k - 1)).
// Mixed batches and combine() refuse DoRA adapters (PEFT refuses adapter_names
// with DoRA too): a row's c depends on its adapter, and a concatenation of
// DoRA adapters is no DoRA adapter.
// x: N x d_in, W: d_out x d_in (d_in x d_out with fan_in_fan_out), A_k: r_k x d_in,
// B_k: d_out x r_k, y: N x d_out. Adding, removing, switching, combining and
// training adapters never write W; only merge(), unmerge() and adding a
// PiSSA / OLoRA adapter (W becomes the residual: adapters/init.hpp) do.
//
// Two ways to call it. The explicit one: forward(x, y, state) fills a
// ForwardState the caller holds and backward(state, ...) consumes it, so a set
// may run twice before its backwards; inference() is const and safe from many
// threads. The convenient one, as lora::Linear: forward(x, y, Mode) keeps the
// last training state inside the set for backward(x, dL_dy, dL_dx).
// Every view is checked before anything is written, and an output never
// shares memory with an input (y with x, W or bias; dL_dx with x, dL_dy or W).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lora/adapters/init.hpp"
#include "lora/adapters/lora.hpp"
#include "lora/base/dense.hpp"
#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/parameter.hpp"
#include "lora/layers/linear.hpp"

namespace lora {

// An adapter of a set and its weight w_k in y = x W^T + bias + sum_k w_k s_k (x A_k^T) B_k^T.
struct WeightedAdapter {
  std::string name;
  double weight = 1.0;
};

template <class T, class Backend, class BaseT = DenseBase<T, Backend>>
class AdapterSet {
  static_assert(is_backend_v<Backend>, "AdapterSet<T, Backend>: Backend does not satisfy the Backend interface");
  static_assert(is_frozen_base_v<BaseT>, "AdapterSet<T, Backend, Base>: Base is not a frozen base (base/dense.hpp)");

 public:
  using Base = BaseT;
  using Adapter = LoraAdapter<T, Backend>;
  using Param = typename Adapter::Param;
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  template <class U>
  using Matrix = typename Backend::template Matrix<U>;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;

  // In forward_mixed's row list, a row that names kBase (PEFT's "__base__") or
  // the empty string gets the frozen layer alone. No adapter may take either name.
  static constexpr const char* kBase = "__base__";

  // What a training forward leaves for backward: one part per adapter it ran,
  // with the rows it ran on. Held by the caller; reuse one to keep its buffers.
  class ForwardState {
   public:
    bool valid() const { return valid_; }
    std::int64_t rows() const { return rows_; }
    void clear() { valid_ = false; }
    std::size_t bytes() const {
      std::size_t n = 0;
      for (const Part& p : parts_) n += p.state.bytes();
      return n + gathered_rows_.bytes() + xWt_.bytes();
    }

   private:
    friend class AdapterSet;
    struct Part {
      std::string adapter;
      typename Adapter::ForwardState state;
      std::int64_t begin = 0;     // its rows are begin .. begin + count - 1 of x ...
      std::int64_t count = 0;
      std::int64_t offset = 0;    // ... or entries offset .. offset + count - 1 of gathered_rows_
      bool gathered = false;
    };
    Part& part(std::size_t k) {
      if (parts_.size() <= k) parts_.resize(k + 1);
      return parts_[k];
    }
    std::vector<Part> parts_;  // the first used_ are this forward's; the rest keep buffers
    std::size_t used_ = 0;
    Matrix<std::int64_t> gathered_rows_;  // the gathered parts' row lists, side by side
    Matrix<T> xWt_;                       // x W^T (N x d_out) when a DoRA adapter ran
    bool product_ = false;                // xWt_ holds this forward's x W^T
    bool mixed_ = false;                  // filled by forward_mixed: the parts cover some rows each
    std::int64_t rows_ = 0;
    bool valid_ = false;
  };

  // Over an existing base (base/dense.hpp, or any frozen base).
  explicit AdapterSet(Base base) : base_(std::move(base)) {}
  // W: d_out x d_in, or d_in x d_out when fan_in_fan_out (GPT-2's Conv1D);
  // borrowed and frozen, as is bias (1 x d_out or empty). Every adapter's
  // Config.fan_in_fan_out must equal fan_in_fan_out. A read-only W
  // (MatrixView<const T>) works for everything but merge().
  AdapterSet(Context& ctx, View W, ConstView bias = {}, bool fan_in_fan_out = false)
      : base_(checked_base(ctx, W, bias, fan_in_fan_out)) {}
  template <class ConstW, class = std::enable_if_t<std::is_same_v<ConstW, ConstView>>>
  AdapterSet(Context& ctx, ConstW W, ConstView bias = {}, bool fan_in_fan_out = false)
      : base_(checked_base(ctx, W, bias, fan_in_fan_out)) {}

  AdapterSet(AdapterSet&&) noexcept = default;
  AdapterSet& operator=(AdapterSet&&) noexcept = default;
  AdapterSet(const AdapterSet&) = delete;
  AdapterSet& operator=(const AdapterSet&) = delete;

  // ---- the adapters ------------------------------------------------------------

  // A new adapter shaped for the base, initialised from config and stream
  // (A from the seed, B = 0: it changes nothing until trained). Adapters with
  // the same seed and stream start from the same A. The returned reference
  // stays valid until the adapter is removed; the new adapter is not active.
  // With config.init pissa or olora, A and B come from W and W becomes the
  // residual W - s B A (adapters/init.hpp): the base must be dense and
  // writable and no adapter merged, and every other adapter on this base sees
  // the residual from then on (as in PEFT).
  Adapter& add(const std::string& name, const Config& config, std::uint32_t stream = 0) {
    check_new_adapter(name, config, "add");
    if (!init_writes_base(config.init)) {
      entries_.push_back(std::make_unique<Entry>(Entry{name, Adapter(base_, config, stream)}));
      return entries_.back()->adapter;
    }
    return add(name, config, stream, weight_init(base_, config, "add(\"" + name + "\")"));
  }
  // The same for a pissa or olora config, with the decomposition of W already
  // computed (lora::weight_init on this set's base and config): what
  // Model::add_adapter uses to check every module before it writes any W.
  Adapter& add(const std::string& name, const Config& config, std::uint32_t stream, const WeightInit<Param>& init) {
    check_new_adapter(name, config, "add");
    LORA_CHECK(init_writes_base(config.init), "add(\"" << name << "\"): a decomposition of W was given but Config.init = "
                                                       << to_string(config.init));
    entries_.push_back(std::make_unique<Entry>(Entry{name, Adapter(base_, config, stream)}));
    try {
      apply_weight_init(base_, entries_.back()->adapter, init);
    } catch (...) {
      entries_.pop_back();
      throw;
    }
    return entries_.back()->adapter;
  }

  // Deletes an adapter and drops it from the active set. A merged adapter is
  // refused: W would keep its update with nothing left to unmerge it.
  void remove(const std::string& name) {
    const auto it = find_entry(name, "remove");
    LORA_CHECK(merged_ != it->get(), "remove(\"" << name << "\"): the adapter is merged into W; unmerge() first");
    state_.clear();
    active_.erase(std::remove_if(active_.begin(), active_.end(), [&](const Active& a) { return a.entry == it->get(); }),
                  active_.end());
    entries_.erase(it);
  }

  bool contains(const std::string& name) const { return find(name) != nullptr; }
  std::size_t size() const { return entries_.size(); }
  // In the order they were added.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e->name);
    return out;
  }

  // One adapter: its parameters for an Adam, its A and B, its own forward and
  // backward on a base output (adapters/lora.hpp).
  Adapter& get(const std::string& name) { return (*find_entry(name, "get"))->adapter; }
  const Adapter& get(const std::string& name) const {
    const Entry* e = find(name);
    LORA_CHECK(e != nullptr, "get: " << unknown_name(name));
    return e->adapter;
  }

  // ---- which adapters forward() applies ----------------------------------------

  // Exactly these adapters, each with its weight w_k (any finite value, 0 and
  // negative included), each named once. While an adapter is merged the only
  // accepted set is {merged: 1}. On error the active set is unchanged.
  void set_active(const std::vector<WeightedAdapter>& adapters) {
    std::vector<Active> next = resolve(adapters, "set_active");
    if (merged_ != nullptr) {
      LORA_CHECK(next.size() == 1 && next[0].entry == merged_ && next[0].weight == 1.0,
                 "set_active: adapter \"" << merged_->name << "\" is merged into W, so the active set must be exactly {\""
                                          << merged_->name << "\": 1}; unmerge() first");
    }
    state_.clear();
    active_ = std::move(next);
  }
  // {name: 1}.
  void set_active(const std::string& name) { set_active(std::vector<WeightedAdapter>{{name, 1.0}}); }
  // No adapter: forward() computes the frozen layer alone.
  void clear_active() { set_active(std::vector<WeightedAdapter>{}); }

  std::vector<WeightedAdapter> active() const {
    std::vector<WeightedAdapter> out;
    for (const Active& a : active_) out.push_back({a.entry->name, a.weight});
    return out;
  }

  // ---- forward and backward ----------------------------------------------------

  // Training: y = x W^T + bias + sum_k w_k s_k (drop_k(x) A_k^T) B_k^T over the
  // active adapters (x: N x d_in, y: N x d_out), each adapter's dropout at its
  // next position; `state` receives what backward needs. Refused while an
  // adapter is merged.
  void forward(ConstView x, View y, ForwardState& state) {
    detail::check_forward_args("AdapterSet::forward", x, y, d_in(), d_out(), W(), bias());
    check_not_merged("forward(Mode::train)", "unmerge() before training");
    state.valid_ = false;
    state.used_ = 0;
    state.mixed_ = false;
    forward_active(x, y, state, [&](const Active& a, ConstView xWt, OutputMode out) {
      typename ForwardState::Part& p = state.part(state.used_++);
      p.adapter = a.entry->name;
      p.begin = 0;
      p.count = x.rows;
      p.gathered = false;
      a.entry->adapter.forward(base_, x, xWt, y, p.state, a.weight, out);
    });
    state.rows_ = x.rows;
    state.valid_ = true;
  }

  // The same without dropout, keeping nothing: const, safe from many threads
  // on one set. With an adapter merged, y = x W^T + bias (the adapter is inside W).
  // Pass `workspace` to reuse its buffers across calls (one per thread).
  void inference(ConstView x, View y) const {
    ForwardState workspace;
    inference(x, y, workspace);
  }
  void inference(ConstView x, View y, ForwardState& workspace) const {
    detail::check_forward_args("AdapterSet::inference", x, y, d_in(), d_out(), W(), bias());
    workspace.valid_ = false;
    if (merged_ != nullptr) {  // the active set is {merged: 1} (set_active and merge see to it)
      base_.forward(x, y);
      return;
    }
    std::size_t k = 0;
    forward_active(x, y, workspace, [&](const Active& a, ConstView xWt, OutputMode out) {
      a.entry->adapter.inference(base_, x, xWt, y, workspace.part(k++).state, a.weight, out);
    });
  }

  // Training on a batch whose row i names its adapter row_adapters[i] (kBase or
  // "" for the frozen layer alone), whatever the active set:
  //   y[i, :] = x[i, :] W^T + bias + s_a(i) (drop(x[i, :]) A_a(i)^T) B_a(i)^T
  // One base GEMM for all rows, then the LoRA path of every adapter at once,
  // one grouped GEMM per product kind (LoraAdapter::forward_segments): an
  // adapter whose rows are one contiguous run works on its row blocks of x and
  // y; the rows of the others are gathered into a workspace (one gather for
  // all) and their outputs scatter-added back (one scatter). backward(state,
  // ...) gives each adapter the gradient of its own rows only. Refused while an
  // adapter is merged (every row would see it). Everything is checked before y is written.
  void forward_mixed(ConstView x, const std::vector<std::string>& row_adapters, View y, ForwardState& state) {
    run_mixed(x, group_rows(x, y, row_adapters), y, state, x_group_, y_group_, dropped_, true);
  }
  // The same without dropout, keeping nothing: const, safe from many threads.
  void inference_mixed(ConstView x, const std::vector<std::string>& row_adapters, View y) const {
    ForwardState workspace;
    Matrix<T> x_group, y_group, dropped;
    run_mixed(x, group_rows(x, y, row_adapters), y, workspace, x_group, y_group, dropped, false);
  }

  // Given dL_dy (N x d_out) and the x of the training forward that filled `state`:
  //   dL_dx   = dL_dy W + sum_k w_k s_k ((dL_dy B_k) A_k) o mask_k / (1 - p_k)   (skipped when dL_dx is empty)
  //   dL_dB_k = w_k s_k dL_dy_k^T (drop_k(x_k) A_k^T),  dL_dA_k = w_k s_k (dL_dy_k B_k)^T drop_k(x_k)
  // for every adapter that forward ran, x_k and dL_dy_k being the rows it ran
  // on (all rows, or its rows of a mixed batch). grad_mode as in LoraAdapter::backward.
  void backward(const ForwardState& state, ConstView x, ConstView dL_dy, View dL_dx,
                GradMode grad_mode = GradMode::overwrite) {
    LORA_CHECK(state.valid_, "AdapterSet::backward: the state holds no training forward; call forward(x, y, state) "
                             "or forward_mixed(x, rows, y, state) first");
    detail::check_backward_args("AdapterSet::backward", x, dL_dy, dL_dx, state.rows_, d_in(), d_out(), W());
    check_not_merged("backward", "unmerge() before training");
    std::vector<Adapter*> adapters;  // every part's adapter found before anything is written
    std::vector<const typename Adapter::ForwardState*> states;
    for (std::size_t k = 0; k < state.used_; ++k) {
      Entry* e = find(state.parts_[k].adapter);
      LORA_CHECK(e != nullptr, "AdapterSet::backward: adapter \"" << state.parts_[k].adapter
                                                                  << "\" of the forward was removed since");
      adapters.push_back(&e->adapter);
      states.push_back(&state.parts_[k].state);
    }
    if (state.mixed_) return backward_mixed(state, adapters, x, dL_dy, dL_dx, grad_mode);
    // Every adapter ran on all rows: the first writes dL_dx, the rest and
    // then the base path, dL_dy W (with DoRA adapters (dL_dy o C) W), accumulate onto it.
    const ConstView xWt = state.product_ ? ConstView(state.xWt_.view()) : ConstView();
    for (std::size_t k = 0; k < state.used_; ++k) {
      adapters[k]->backward(state.parts_[k].state, x, xWt, dL_dy, dL_dx, grad_mode,
                            k == 0 ? OutputMode::overwrite : OutputMode::accumulate);
    }
    const OutputMode base_mode = state.used_ == 0 ? OutputMode::overwrite : OutputMode::accumulate;
    if (!dL_dx.empty()) Adapter::base_backward(base_, states, dL_dy, dL_dx, base_mode, C_, scaled_dL_dy_);
  }

  // ---- the convenient calls: the last training state kept inside the set ------

  // Mode::train: forward(x, y, state) into the set's own state; Mode::eval:
  // inference(x, y), dropping that state. With an adapter merged, only
  // Mode::eval is allowed.
  void forward(ConstView x, View y, Mode mode = Mode::train) {
    if (mode == Mode::train) return forward(x, y, state_);
    inference(x, y, state_);  // the state's buffers as workspace; it holds no forward after
  }
  // inference_mixed(x, row_adapters, y), dropping the set's own training state.
  void forward_mixed(ConstView x, const std::vector<std::string>& row_adapters, View y) {
    state_.clear();
    inference_mixed(x, row_adapters, y);
  }
  // backward(state, ...) with the state of the last forward(x, y, Mode::train).
  // set_active, remove, merge, unmerge and any other forward drop it.
  void backward(ConstView x, ConstView dL_dy, View dL_dx, GradMode grad_mode = GradMode::overwrite) {
    LORA_CHECK(state_.valid_, "AdapterSet::backward: no cache; call forward(x, y, Mode::train) first (changing the "
                              "active set drops it)");
    backward(state_, x, dL_dy, dL_dx, grad_mode);
  }

  // y = x W^T + bias (x W with fan_in_fan_out): the frozen layer alone.
  void base_forward(ConstView x, View y) const {
    detail::check_forward_args("AdapterSet::base_forward", x, y, d_in(), d_out(), W(), bias());
    base_.forward(x, y);
  }

  // ---- combining and merging ---------------------------------------------------

  // Refused for DoRA adapters. A new adapter new_name equal to sum_k w_k s_k B_k A_k, exactly: PEFT's
  // add_weighted_adapter(combination_type="cat"). The ranks are concatenated,
  //   r = sum_k r_k,  alpha = r (so s = 1, no rsLoRA),
  //   A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   (r x d_in, the A_k stacked as row blocks)
  //   B = [B_1, B_2, ...]                    (d_out x r, the B_k side by side as column blocks)
  // so s B A = sum_k B_k (w_k s_k A_k), and its forward equals the weighted
  // activation of the same terms up to rounding. r may exceed min(d_in, d_out)
  // (any r >= 1 is valid, as in PEFT). Other settings (dropout, seed) come from the first
  // term's Config; stream is the new adapter's. PEFT's "linear" (A = sum sqrt(w s) A_k,
  // B = sum sqrt(w s) B_k) is not offered: its cross terms B_j A_k make it inexact.
  Adapter& combine(const std::string& new_name, const std::vector<WeightedAdapter>& terms, std::uint32_t stream = 0) {
    check_new_name(new_name, "combine");
    LORA_CHECK(!terms.empty(), "combine(\"" << new_name << "\"): expected at least one adapter, found none");
    const std::vector<Active> parts = resolve(terms, "combine");
    for (const Active& p : parts)
      LORA_CHECK(!p.entry->adapter.use_dora(),
                 "combine(\"" << new_name << "\"): adapter \"" << p.entry->name
                              << "\" is a DoRA adapter (Config.use_dora); concatenating ranks is exact only for plain "
                                 "LoRA (each DoRA adapter rescales W + s_k B_k A_k by its own m_k / n_k), so DoRA "
                                 "adapters cannot be combined");
    std::int64_t r = 0;
    for (const Active& p : parts) r += p.entry->adapter.rank();
    LORA_CHECK(r <= std::numeric_limits<int>::max(),
               "combine(\"" << new_name << "\"): the concatenated rank sum_k r_k = " << r << " exceeds Config.r's int");
    Config config = parts.front().entry->adapter.config();
    config.r = static_cast<int>(r);
    config.alpha = static_cast<double>(r);
    config.use_rslora = false;

    Adapter& out = add(new_name, config, stream);
    const MatrixView<Param, Space> A = out.lora_A().value;
    const MatrixView<Param, Space> B = out.lora_B().value;
    std::int64_t begin = 0;
    for (const Active& p : parts) {
      const Adapter& term = p.entry->adapter;
      const std::int64_t rk = term.rank();
      // A[begin : begin + r_k, :] = w_k s_k A_k, rounded once;  B[:, begin : begin + r_k] = B_k
      Backend::fill(context(), A.row_block(begin, rk), Param(0));
      Backend::add_scaled(context(), p.weight * term.scale(), term.A(), A.row_block(begin, rk));
      Backend::convert(context(), term.B(), B.col_block(begin, rk));
      begin += rk;
    }
    return out;
  }

  // W <- W + s B A for one adapter, which becomes the active set {name: 1};
  // inference then costs one GEMM. Only one adapter may be merged at a time.
  // While it is merged the set refuses: set_active other than {name: 1},
  // training forwards, backward, mixed batches, remove(name) and merging
  // another adapter (each would see or keep the wrong W). add, combine and get
  // stay allowed. A base over a read-only W refuses to merge.
  void merge(const std::string& name) {
    Entry& e = **find_entry(name, "merge");
    LORA_CHECK(merged_ == nullptr, "merge(\"" << name << "\"): adapter \"" << merged_->name
                                              << "\" is already merged; unmerge() first (one merged adapter at a time)");
    e.adapter.add_to(base_, +1.0);
    merged_ = &e;
    state_.clear();
    active_ = {Active{&e, 1.0}};
  }
  // W <- W - s B A: restores W up to rounding. The active set stays {name: 1}.
  void unmerge() {
    LORA_CHECK(merged_ != nullptr, "unmerge: no adapter is merged");
    merged_->adapter.add_to(base_, -1.0);
    merged_ = nullptr;
    state_.clear();
  }
  // W keeps the merged adapter's update (if one is merged) for good, and every
  // adapter is removed: the base is now the fine-tuned weight (PEFT's merge_and_unload).
  void merge_and_unload() {
    merged_ = nullptr;
    state_.clear();
    active_.clear();
    entries_.clear();
  }
  // The merged adapter's name, or "" when W is the base alone.
  std::string merged() const { return merged_ != nullptr ? merged_->name : std::string(); }

  // A dense merged weight, W itself untouched (so over a read-only or a
  // quantized base too, and during training), in the layout W is stored and any
  // type U the backend converts to (the dtype the merged model is saved in):
  //   out = W + s B A        (d_out x d_in; d_in x d_out with fan_in_fan_out: out = W + s (B A)^T)
  //   DoRA: out = (m / n) o (W + s B A), rows of the d_out x d_in weight, n = ||W + s B A||
  // W is the base's dense weight (base_weight: W, or dequant(W) for a
  // quantized base); s B A is formed in the parameter type and added once, as
  // merge() does. With `name` merged, W holds it already and out = W.
  template <class U>
  void merged_weight(const std::string& name, MatrixView<U, Space> out) const {
    const Entry* e = find(name);
    LORA_CHECK(e != nullptr, "merged_weight: " << unknown_name(name));
    LORA_CHECK(merged_ == nullptr || merged_ == e, "merged_weight(\"" << name << "\"): adapter \"" << merged_->name
                                                                       << "\" is merged into W; unmerge() first");
    base_weight(out);
    if (merged_ == e) return;
    e->adapter.add_merged(base_, out);
  }
  // The base's dense W as stored into out (d_out x d_in, or d_in x d_out with
  // fan_in_fan_out), in type U: a copy of W, or dequant(W) for a quantized base.
  template <class U>
  void base_weight(MatrixView<U, Space> out) const {
    const std::int64_t rows = fan_in_fan_out() ? d_in() : d_out(), cols = fan_in_fan_out() ? d_out() : d_in();
    check_shape(out, rows, cols, "out", "AdapterSet::base_weight");
    if constexpr (std::is_same_v<Base, DenseBase<T, Backend>>) {
      check_disjoint("AdapterSet::base_weight", out, "out", W(), "W");
      Backend::convert(context(), W(), out);
    } else {
      base_.dequantize(out);
    }
  }

  // ---- shapes and memory -------------------------------------------------------

  const Base& base() const { return base_; }
  std::int64_t d_in() const { return base_.d_in(); }
  std::int64_t d_out() const { return base_.d_out(); }
  bool fan_in_fan_out() const { return base_.fan_in_fan_out(); }
  ConstView W() const { return base_.W(); }
  ConstView bias() const { return base_.bias(); }
  Context& context() const { return base_.context(); }

  // sum_k r_k (d_in + d_out): the elements of every adapter's A and B.
  std::int64_t trainable_parameters() const {
    std::int64_t n = 0;
    for (const auto& e : entries_) n += e->adapter.trainable_parameters();
    return n;
  }

  // Every adapter's report, W and bias counted once, the set's own training
  // state (an activation while backward may use it) and the mixed-batch workspaces.
  MemoryReport memory() const {
    MemoryReport report;
    for (const auto& e : entries_) report += e->adapter.memory();
    report.frozen_bytes += base_.bytes();
    (state_.valid() ? report.activation_bytes : report.workspace_bytes) += state_.bytes();
    report.workspace_bytes +=
        x_group_.bytes() + y_group_.bytes() + dx_group_.bytes() + dropped_.bytes() + C_.bytes() + scaled_dL_dy_.bytes();
    return report;
  }

 private:
  struct Entry {
    std::string name;
    Adapter adapter;
  };
  struct Active {
    Entry* entry;
    double weight;
  };
  // The rows of a mixed batch that name one adapter: rows begin .. begin +
  // count - 1, or (gathered) entries offset .. offset + count - 1 of the row list.
  struct Group {
    Entry* entry;
    std::int64_t begin, count, offset;
    bool gathered;
    std::vector<std::int64_t> rows;
  };
  using Entries = std::vector<std::unique_ptr<Entry>>;

  template <class U>
  static MatrixView<const U, Space> cview(const Matrix<U>& m) {
    return m.view();
  }
  template <class W>
  static Base checked_base(Context& ctx, W weight, ConstView bias, bool fan_in_fan_out) {
    detail::check_base("AdapterSet", ConstView(weight), bias, fan_in_fan_out);
    return Base(ctx, weight, bias, fan_in_fan_out);
  }

  // y = x W^T + bias + the active adapters' terms, each adapter run by
  // run(active, xWt, out). The adapters' terms go first, the first writing y,
  // and the frozen GEMM accumulates onto them; with a DoRA adapter the base
  // goes first, x W^T kept in state (what DoRA rescales), and every adapter adds.
  template <class Run>
  void forward_active(ConstView x, View y, ForwardState& state, Run&& run) const {
    state.product_ =
        std::any_of(active_.begin(), active_.end(), [](const Active& a) { return a.entry->adapter.use_dora(); });
    if (state.product_) {
      product_forward(base_, x, y, state.xWt_);
      for (const Active& a : active_) run(a, ConstView(state.xWt_.view()), OutputMode::accumulate);
      return;
    }
    OutputMode out = OutputMode::overwrite;
    for (const Active& a : active_) {
      run(a, ConstView(), out);
      out = OutputMode::accumulate;
    }
    base_.forward(x, y, out);
  }

  // Checks a mixed batch (everything before y is written) and groups its rows by adapter.
  std::vector<Group> group_rows(ConstView x, View y, const std::vector<std::string>& row_adapters) const {
    detail::check_forward_args("AdapterSet::forward_mixed", x, y, d_in(), d_out(), W(), bias());
    LORA_CHECK(static_cast<std::int64_t>(row_adapters.size()) == x.rows,
               "AdapterSet::forward_mixed: expected one adapter name per row of x (" << x.rows << "), found "
                   << row_adapters.size());
    check_not_merged("forward_mixed", "unmerge() first");
    std::unordered_map<std::string, std::size_t> index_of;
    for (std::size_t k = 0; k < entries_.size(); ++k) index_of.emplace(entries_[k]->name, k);
    std::vector<std::vector<std::int64_t>> rows(entries_.size());
    for (std::size_t i = 0; i < row_adapters.size(); ++i) {
      const std::string& name = row_adapters[i];
      if (name.empty() || name == kBase) continue;
      const auto it = index_of.find(name);
      LORA_CHECK(it != index_of.end(), "forward_mixed: row_adapters[" << i << "]: " << unknown_name(name));
      LORA_CHECK(!entries_[it->second]->adapter.use_dora(),
                 "forward_mixed: row_adapters[" << i << "] names adapter \"" << name
                                                << "\", a DoRA adapter (Config.use_dora); mixed batches are not "
                                                   "supported with DoRA (as in PEFT): run its rows in a batch of "
                                                   "their own with set_active and forward");
      rows[it->second].push_back(static_cast<std::int64_t>(i));
    }
    std::vector<Group> groups;
    std::int64_t offset = 0;
    for (std::size_t k = 0; k < rows.size(); ++k) {
      if (rows[k].empty()) continue;
      const auto n = static_cast<std::int64_t>(rows[k].size());
      const bool gathered = rows[k].back() - rows[k].front() + 1 != n;
      groups.push_back({entries_[k].get(), rows[k].front(), n, gathered ? offset : 0, gathered, std::move(rows[k])});
      if (gathered) offset += n;
    }
    return groups;
  }

  // A mixed batch's forward (train: into `state`; else `state` is a workspace):
  // the base on all rows, then every group's LoRA path in one
  // LoraAdapter::forward_segments, the gathered groups' rows gathered into
  // x_ws at once and their outputs (y_ws) scatter-added into y at once.
  void run_mixed(ConstView x, const std::vector<Group>& groups, View y, ForwardState& state, Matrix<T>& x_ws,
                 Matrix<T>& y_ws, Matrix<T>& dropped, bool train) const {
    state.valid_ = false;
    state.used_ = 0;
    state.product_ = false;
    std::vector<Adapter*> adapters;
    std::vector<std::int64_t> host_rows;  // the gathered groups' rows, side by side
    for (const Group& g : groups) {
      typename ForwardState::Part& p = state.part(state.used_++);
      p.adapter = g.entry->name;
      p.begin = g.begin;
      p.count = g.count;
      p.offset = g.offset;
      p.gathered = g.gathered;
      adapters.push_back(&g.entry->adapter);
      if (g.gathered) host_rows.insert(host_rows.end(), g.rows.begin(), g.rows.end());
    }
    const auto gathered = static_cast<std::int64_t>(host_rows.size());
    state.gathered_rows_.reshape(1, gathered);
    if (gathered > 0) {
      Backend::copy_from_host(context(), MatrixView<const std::int64_t, HostSpace>(host_rows.data(), 1, gathered),
                              state.gathered_rows_.view());
    }
    const MatrixView<const std::int64_t, Space> rows = cview(state.gathered_rows_);
    x_ws.reshape(gathered, d_in());
    y_ws.reshape(gathered, d_out());
    base_.forward(x, y);
    if (gathered > 0) Backend::gather_rows(context(), x, rows, x_ws.view());  // x_ws = x[rows, :]
    Adapter::forward_segments(segments(state, adapters, x, ConstView(), y, x_ws, ConstView(), y_ws.view()), train,
                              dropped);
    if (gathered > 0) Backend::scatter_add_rows(context(), ConstView(y_ws.view()), rows, y);  // y[rows, :] += y_ws
    state.rows_ = x.rows;
    state.mixed_ = true;
    state.valid_ = train;
  }

  // backward(state, ...) for a mixed batch: the base writes dL_dx (dL_dy W),
  // then every part's LoRA path in one LoraAdapter::backward_segments, the
  // gathered parts' rows of x and dL_dy gathered at once and their dL_dx rows
  // scatter-added at once.
  void backward_mixed(const ForwardState& state, const std::vector<Adapter*>& adapters, ConstView x, ConstView dL_dy,
                      View dL_dx, GradMode grad_mode) {
    if (!dL_dx.empty()) base_.backward_input(dL_dy, dL_dx);
    const MatrixView<const std::int64_t, Space> rows = cview(state.gathered_rows_);
    const std::int64_t gathered = rows.cols;
    x_group_.reshape(gathered, d_in());
    y_group_.reshape(gathered, d_out());
    dx_group_.reshape(dL_dx.empty() ? 0 : gathered, d_in());
    if (gathered > 0) {
      Backend::gather_rows(context(), x, rows, x_group_.view());
      Backend::gather_rows(context(), dL_dy, rows, y_group_.view());
    }
    Adapter::backward_segments(segments(state, adapters, x, dL_dy, dL_dx, x_group_, ConstView(y_group_.view()),
                                        dL_dx.empty() ? View() : dx_group_.view()),
                               grad_mode, dropped_);
    if (gathered > 0 && !dL_dx.empty())
      Backend::scatter_add_rows(context(), ConstView(dx_group_.view()), rows, dL_dx);  // dL_dx[rows, :] += dx_group
  }

  // The parts of a mixed batch as segments: a contiguous part on its rows of x,
  // dL_dy and out (accumulating onto what the base wrote); a gathered part on
  // its rows of the gathered xg, dyg and outg (written; the caller scatter-adds).
  // State: ForwardState (forward) or const ForwardState (backward).
  template <class State>
  static auto segments(State& state, const std::vector<Adapter*>& adapters, ConstView x, ConstView dL_dy, View out,
                       const Matrix<T>& xg, ConstView dyg, View outg) {
    using AdapterState = typename Adapter::ForwardState;
    using Segment = typename Adapter::template BasicSegment<
        std::conditional_t<std::is_const_v<State>, const AdapterState, AdapterState>>;
    const auto rows = [](auto v, std::int64_t begin, std::int64_t count) {
      return v.empty() ? v : v.row_block(begin, count);
    };
    std::vector<Segment> list;
    for (std::size_t k = 0; k < state.used_; ++k) {
      auto& p = state.parts_[k];
      if (p.gathered) {
        list.push_back({adapters[k], &p.state, cview(xg).row_block(p.offset, p.count), rows(outg, p.offset, p.count),
                        OutputMode::overwrite, rows(dyg, p.offset, p.count)});
      } else {
        list.push_back({adapters[k], &p.state, x.row_block(p.begin, p.count), rows(out, p.begin, p.count),
                        OutputMode::accumulate, rows(dL_dy, p.begin, p.count)});
      }
    }
    return list;
  }

  Entry* find(const std::string& name) const {
    for (const auto& e : entries_)
      if (e->name == name) return e.get();
    return nullptr;
  }
  typename Entries::iterator find_entry(const std::string& name, const char* what) {
    const auto it = std::find_if(entries_.begin(), entries_.end(), [&](const auto& e) { return e->name == name; });
    LORA_CHECK(it != entries_.end(), what << ": " << unknown_name(name));
    return it;
  }

  // 'unknown adapter "x" (the set holds "a", "b")'
  std::string unknown_name(const std::string& name) const {
    std::ostringstream out;
    out << "unknown adapter \"" << name << "\" (the set holds";
    if (entries_.empty()) out << " none";
    for (std::size_t k = 0; k < entries_.size(); ++k) out << (k == 0 ? " \"" : ", \"") << entries_[k]->name << '"';
    out << ')';
    return out.str();
  }

  void check_new_name(const std::string& name, const char* what) const {
    LORA_CHECK(!name.empty() && name != kBase,
               what << ": \"" << name << "\" is not a valid adapter name (empty and \"" << kBase << "\" mean the base)");
    LORA_CHECK(find(name) == nullptr, what << ": an adapter named \"" << name << "\" already exists");
  }

  void check_new_adapter(const std::string& name, const Config& config, const char* what) const {
    check_new_name(name, what);
    LORA_CHECK(config.fan_in_fan_out == base_.fan_in_fan_out(),
               what << "(\"" << name << "\"): Config.fan_in_fan_out = " << config.fan_in_fan_out << ", expected "
                    << base_.fan_in_fan_out() << " (the layout of this set's W)");
    if (init_writes_base(config.init))
      check_not_merged("add(init " + to_string(config.init, config.pissa_niter) + ")",
                       "unmerge() first (the decomposition would take in the merged update)");
  }

  void check_not_merged(const std::string& what, const char* remedy) const {
    LORA_CHECK(merged_ == nullptr,
               what << ": adapter \"" << (merged_ ? merged_->name : "") << "\" is merged into W; " << remedy);
  }

  // Names to entries, each name known and given once, each weight finite.
  std::vector<Active> resolve(const std::vector<WeightedAdapter>& adapters, const char* what) {
    std::vector<Active> out;
    for (const WeightedAdapter& a : adapters) {
      const auto it = find_entry(a.name, what);
      LORA_CHECK(std::isfinite(a.weight), what << ": adapter \"" << a.name << "\" has weight " << a.weight
                                               << ", expected a finite value");
      for (const Active& seen : out) {
        LORA_CHECK(seen.entry != it->get(), what << ": adapter \"" << a.name << "\" is named twice; add the weights");
      }
      out.push_back({it->get(), a.weight});
    }
    return out;
  }

  Base base_;
  Entries entries_;              // insertion order; each Entry stays at one address until removed
  std::vector<Active> active_;   // what forward() applies
  Entry* merged_ = nullptr;      // the adapter inside W, if any
  ForwardState state_;           // the last forward(x, y, Mode::train)'s, for backward(x, dL_dy, dL_dx)
  Matrix<T> x_group_, y_group_, dx_group_;  // mixed-batch workspaces: the gathered rows' x, output / dL_dy, dL_dx
  Matrix<T> dropped_;                       // mixed-batch dropout: one window of drop(x) or s g A
  Matrix<Param> C_;                         // DoRA backward: the base path's column scale (1 x d_out)
  Matrix<T> scaled_dL_dy_;                  // DoRA backward: dL_dy o C
};

}  // namespace lora

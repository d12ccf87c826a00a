// lora::AdapterSet: several named LoRA adapters over one frozen base W (PEFT's
// multi-adapter LoraLayer). Each adapter is a lora::Linear over the same
// borrowed W view; the set adds the active adapters' paths to one base output
//
//   y = x W^T + bias + sum_k w_k s_k (drop(x) A_k^T) B_k^T        k over the active adapters
//
// or, for a mixed batch where row i names adapter a(i) or none (PEFT's adapter_names),
//
//   y[i, :] = x[i, :] W^T + bias + s_a(i) (x[i, :] A_a(i)^T) B_a(i)^T.
//
// x: N x d_in, W: d_out x d_in (d_in x d_out with fan_in_fan_out), A_k: r_k x d_in,
// B_k: d_out x r_k, y: N x d_out. Adding, removing, switching, combining and
// training adapters never write W; only merge() and unmerge() do. As in
// lora::Linear, every view is checked before anything is written, and an
// output never shares memory with an input (y with x, W or bias; dL_dx with
// x, dL_dy or W).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

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

template <class T, class Backend>
class AdapterSet {
  static_assert(is_backend_v<Backend>, "AdapterSet<T, Backend>: Backend does not satisfy the Backend interface");

 public:
  using Layer = Linear<T, Backend>;
  using Param = typename Layer::Param;
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  template <class U>
  using Matrix = typename Backend::template Matrix<U>;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;

  // In forward_mixed's row list, a row that names kBase (PEFT's "__base__") or
  // the empty string gets the frozen layer alone. No adapter may take either name.
  static constexpr const char* kBase = "__base__";

  // W: d_out x d_in, or d_in x d_out when fan_in_fan_out (GPT-2's Conv1D);
  // borrowed and frozen, as is bias (1 x d_out or empty). Every adapter's
  // Config.fan_in_fan_out must equal fan_in_fan_out.
  AdapterSet(Context& ctx, View W, ConstView bias, bool fan_in_fan_out = false)
      : ctx_(&ctx), W_(W), bias_(bias), fan_in_fan_out_(fan_in_fan_out) {
    detail::check_base("AdapterSet", W, bias, fan_in_fan_out);
    d_out_ = fan_in_fan_out ? W.cols : W.rows;
    d_in_ = fan_in_fan_out ? W.rows : W.cols;
  }

  AdapterSet(AdapterSet&&) noexcept = default;
  AdapterSet& operator=(AdapterSet&&) noexcept = default;
  AdapterSet(const AdapterSet&) = delete;
  AdapterSet& operator=(const AdapterSet&) = delete;

  // ---- the adapters ------------------------------------------------------------

  // A new adapter over W, initialised from config and stream as a lora::Linear
  // (A from the seed, B = 0: it changes nothing until trained). Adapters with
  // the same seed and stream start from the same A. The returned reference
  // stays valid until the adapter is removed; the new adapter is not active.
  Layer& add(const std::string& name, const Config& config, std::uint32_t stream = 0) {
    check_new_name(name, "add");
    LORA_CHECK(config.fan_in_fan_out == fan_in_fan_out_,
               "add(\"" << name << "\"): Config.fan_in_fan_out = " << config.fan_in_fan_out << ", expected "
                        << fan_in_fan_out_ << " (the layout of this set's W)");
    entries_.push_back(std::make_unique<Entry>(Entry{name, Layer(*ctx_, W_, bias_, config, stream)}));
    return entries_.back()->layer;
  }

  // Deletes an adapter and drops it from the active set. A merged adapter is
  // refused: W would keep its update with nothing left to unmerge it.
  void remove(const std::string& name) {
    const auto it = find_entry(name, "remove");
    LORA_CHECK(!(*it)->layer.merged(), "remove(\"" << name << "\"): the adapter is merged into W; unmerge() first");
    drop_training_cache();
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

  // One adapter as a lora::Linear: train it alone with its own forward/backward
  // and hand its parameters() to an Adam. (Its forward sees W as it is, merged
  // adapter included; the set's own operations refuse that state.)
  Layer& get(const std::string& name) { return (*find_entry(name, "get"))->layer; }
  const Layer& get(const std::string& name) const {
    const Entry* e = find(name);
    LORA_CHECK(e != nullptr, "get: " << unknown_name(name));
    return e->layer;
  }

  // ---- which adapters forward() applies ----------------------------------------

  // Exactly these adapters, each with its weight w_k (any finite value, 0 and
  // negative included), each named once. While an adapter is merged the only
  // accepted set is {merged: 1}. On error the active set is unchanged.
  void set_active(const std::vector<WeightedAdapter>& adapters) {
    std::vector<Active> next = resolve(adapters, "set_active");
    if (const Entry* m = merged_entry()) {
      LORA_CHECK(next.size() == 1 && next[0].entry == m && next[0].weight == 1.0,
                 "set_active: adapter \"" << m->name << "\" is merged into W, so the active set must be exactly {\""
                                          << m->name << "\": 1}; unmerge() first");
    }
    drop_training_cache();
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

  // y = x W^T + bias + sum_k w_k s_k (drop(x) A_k^T) B_k^T over the active
  // adapters (x: N x d_in, y: N x d_out). Mode::train applies each adapter's
  // dropout and caches what backward() needs; Mode::eval does neither. With an
  // adapter merged, only Mode::eval with the active set {merged: 1} is allowed,
  // and y = x W^T + bias (the adapter is inside W).
  void forward(ConstView x, View y, Mode mode = Mode::train) {
    detail::check_forward_args("AdapterSet::forward", x, y, d_in_, d_out_, cview_W(), bias_);
    const Entry* m = merged_entry();
    if (m != nullptr) {
      LORA_CHECK(mode == Mode::eval,
                 "forward(Mode::train): adapter \"" << m->name << "\" is merged into W; unmerge() before training");
      LORA_CHECK(active_.size() == 1 && active_[0].entry == m && active_[0].weight == 1.0,
                 "forward: adapter \"" << m->name << "\" is merged into W but the active set is not {\"" << m->name
                                       << "\": 1}");
    }
    drop_training_cache();
    base_forward(x, y);
    if (m != nullptr) return;
    for (const Active& a : active_) a.entry->layer.forward_lora(x, y, mode, a.weight);
    if (mode == Mode::train) {
      cached_ = active_;
      cached_rows_ = x.rows;
      has_cache_ = true;
    }
  }

  // Given dL_dy (N x d_out) and the x of the last forward(x, y, Mode::train):
  //   dL_dx  = dL_dy W + sum_k w_k s_k ((dL_dy B_k) A_k) o mask_k / (1 - p_k)   (skipped when dL_dx is empty)
  //   dL_dB_k = w_k s_k dL_dy^T (drop_k(x) A_k^T),  dL_dA_k = w_k s_k (dL_dy B_k)^T drop_k(x)
  // for every adapter that forward applied; grad_mode as in Linear::backward.
  // The cache is dropped by set_active, remove, merge, unmerge and any other forward.
  void backward(ConstView x, ConstView dL_dy, View dL_dx, GradMode grad_mode = GradMode::overwrite) {
    LORA_CHECK(has_cache_, "AdapterSet::backward: no cache; call forward(x, y, Mode::train) first (changing the "
                           "active set drops it)");
    detail::check_backward_args("AdapterSet::backward", x, dL_dy, dL_dx, cached_rows_, d_in_, d_out_, cview_W());
    if (!dL_dx.empty()) {
      // dL_dx = dL_dy W   (W stored d_out x d_in), or dL_dy W^T (stored d_in x d_out)
      Backend::template gemm<T, T>(*ctx_, Op::N, fan_in_fan_out_ ? Op::T : Op::N, 1.0, dL_dy, cview_W(), 0.0, dL_dx);
    }
    for (const Active& a : cached_) a.entry->layer.backward_lora(x, dL_dy, dL_dx, grad_mode);
  }

  // Inference on a batch whose row i names its adapter row_adapters[i] (kBase or
  // "" for the frozen layer alone), whatever the active set:
  //   y[i, :] = x[i, :] W^T + bias + s_a(i) (x[i, :] A_a(i)^T) B_a(i)^T
  // One base GEMM for all rows, then one LoRA pass per adapter group: a group
  // whose rows are one contiguous run is computed in place on row blocks of x
  // and y; otherwise its rows are gathered into a workspace, run through
  // forward_lora(Mode::eval), and scatter-added back into y. Refused while an
  // adapter is merged (every row would see it). Everything is checked before y
  // is written.
  void forward_mixed(ConstView x, const std::vector<std::string>& row_adapters, View y) {
    detail::check_forward_args("AdapterSet::forward_mixed", x, y, d_in_, d_out_, cview_W(), bias_);
    LORA_CHECK(static_cast<std::int64_t>(row_adapters.size()) == x.rows,
               "AdapterSet::forward_mixed: expected one adapter name per row of x (" << x.rows << "), found "
                   << row_adapters.size());
    check_not_merged("forward_mixed");

    // groups[k]: the rows naming adapter k, ascending.
    std::unordered_map<std::string, std::size_t> index_of;
    for (std::size_t k = 0; k < entries_.size(); ++k) index_of.emplace(entries_[k]->name, k);
    std::vector<std::vector<std::int64_t>> groups(entries_.size());
    for (std::size_t i = 0; i < row_adapters.size(); ++i) {
      const std::string& name = row_adapters[i];
      if (name.empty() || name == kBase) continue;
      const auto it = index_of.find(name);
      LORA_CHECK(it != index_of.end(), "forward_mixed: row_adapters[" << i << "]: " << unknown_name(name));
      groups[it->second].push_back(static_cast<std::int64_t>(i));
    }

    drop_training_cache();
    base_forward(x, y);

    // The row lists of the groups that need a gather go to the backend in one copy.
    const auto contiguous = [](const std::vector<std::int64_t>& rows) {
      return rows.back() - rows.front() + 1 == static_cast<std::int64_t>(rows.size());
    };
    std::vector<std::int64_t> host_rows;
    std::vector<std::int64_t> offset(groups.size(), 0);
    std::int64_t largest = 0;
    for (std::size_t k = 0; k < groups.size(); ++k) {
      if (groups[k].empty() || contiguous(groups[k])) continue;
      offset[k] = static_cast<std::int64_t>(host_rows.size());
      host_rows.insert(host_rows.end(), groups[k].begin(), groups[k].end());
      largest = std::max(largest, static_cast<std::int64_t>(groups[k].size()));
    }
    if (!host_rows.empty()) {
      const auto total = static_cast<std::int64_t>(host_rows.size());
      if (gathered_rows_.cols() < total) gathered_rows_ = Matrix<std::int64_t>(1, total);
      ensure_capacity(x_group_, largest, d_in_);
      ensure_capacity(y_group_, largest, d_out_);
      Backend::copy_from_host(*ctx_, MatrixView<const std::int64_t, HostSpace>(host_rows.data(), 1, total),
                              gathered_rows_.view().col_block(0, total));
    }

    for (std::size_t k = 0; k < groups.size(); ++k) {
      const std::vector<std::int64_t>& rows = groups[k];
      if (rows.empty()) continue;
      Layer& layer = entries_[k]->layer;
      const auto n = static_cast<std::int64_t>(rows.size());
      if (contiguous(rows)) {
        layer.forward_lora(x.row_block(rows.front(), n), y.row_block(rows.front(), n), Mode::eval);
        continue;
      }
      const MatrixView<const std::int64_t, Space> group_rows = cview(gathered_rows_).col_block(offset[k], n);
      View x_group = x_group_.view().row_block(0, n);  // x_group = x[rows, :]       (n x d_in)
      View y_group = y_group_.view().row_block(0, n);  // y_group = s (x_group A^T) B^T (n x d_out)
      Backend::gather_rows(*ctx_, x, group_rows, x_group);
      Backend::fill(*ctx_, y_group, T(0.0f));
      layer.forward_lora(ConstView(x_group), y_group, Mode::eval);
      Backend::scatter_add_rows(*ctx_, ConstView(y_group), group_rows, y);  // y[rows, :] += y_group
    }
  }

  // y = x W^T + bias (x W with fan_in_fan_out): the frozen layer alone.
  void base_forward(ConstView x, View y) {
    detail::check_forward_args("AdapterSet::base_forward", x, y, d_in_, d_out_, cview_W(), bias_);
    Backend::template gemm<T, T>(*ctx_, Op::N, fan_in_fan_out_ ? Op::N : Op::T, 1.0, x, cview_W(), 0.0, y);
    if (!bias_.empty()) Backend::add_row_vector(*ctx_, y, bias_);
  }

  // ---- combining and merging ---------------------------------------------------

  // A new adapter new_name equal to sum_k w_k s_k B_k A_k, exactly: PEFT's
  // add_weighted_adapter(combination_type="cat"). The ranks are concatenated,
  //   r = sum_k r_k,  alpha = r (so s = 1, no rsLoRA),
  //   A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   (r x d_in, the A_k stacked as row blocks)
  //   B = [B_1, B_2, ...]                    (d_out x r, the B_k side by side as column blocks)
  // so s B A = sum_k B_k (w_k s_k A_k), and its forward equals the weighted
  // activation of the same terms up to rounding. r may exceed min(d_in, d_out)
  // (any r >= 1 is valid, as in PEFT). Other settings (dropout, seed) come from the first
  // term's Config; stream is the new adapter's. PEFT's "linear" (A = sum sqrt(w s) A_k,
  // B = sum sqrt(w s) B_k) is not offered: its cross terms B_j A_k make it inexact.
  Layer& combine(const std::string& new_name, const std::vector<WeightedAdapter>& terms, std::uint32_t stream = 0) {
    check_new_name(new_name, "combine");
    LORA_CHECK(!terms.empty(), "combine(\"" << new_name << "\"): expected at least one adapter, found none");
    const std::vector<Active> parts = resolve(terms, "combine");
    std::int64_t r = 0;
    for (const Active& p : parts) r += p.entry->layer.rank();
    LORA_CHECK(r <= std::numeric_limits<int>::max(),
               "combine(\"" << new_name << "\"): the concatenated rank sum_k r_k = " << r << " exceeds Config.r's int");
    Config config = parts.front().entry->layer.config();
    config.r = static_cast<int>(r);
    config.alpha = static_cast<double>(r);
    config.use_rslora = false;

    Layer& out = add(new_name, config, stream);
    const MatrixView<Param, Space> A = out.lora_A().value;
    const MatrixView<Param, Space> B = out.lora_B().value;
    std::int64_t begin = 0;
    for (const Active& p : parts) {
      const Layer& layer = p.entry->layer;
      const std::int64_t rk = layer.rank();
      // A[begin : begin + r_k, :] = w_k s_k A_k, rounded once;  B[:, begin : begin + r_k] = B_k
      Backend::fill(*ctx_, A.row_block(begin, rk), Param(0));
      Backend::add_scaled(*ctx_, p.weight * layer.scale(), layer.A(), A.row_block(begin, rk));
      Backend::convert(*ctx_, layer.B(), B.col_block(begin, rk));
      begin += rk;
    }
    return out;
  }

  // W <- W + s B A for one adapter (Linear::merge), which becomes the active
  // set {name: 1}; forward(Mode::eval) then costs one GEMM. Only one adapter may
  // be merged at a time. While it is merged the set refuses: set_active other
  // than {name: 1}, forward(Mode::train), backward, forward_mixed, remove(name)
  // and merging another adapter (each would see or keep the wrong W). add,
  // combine and get stay allowed.
  void merge(const std::string& name) {
    Entry& e = **find_entry(name, "merge");
    if (const Entry* m = merged_entry()) {
      LORA_CHECK(false, "merge(\"" << name << "\"): adapter \"" << m->name
                                   << "\" is already merged; unmerge() first (one merged adapter at a time)");
    }
    drop_training_cache();
    e.layer.merge();
    active_ = {Active{&e, 1.0}};
  }
  // W <- W - s B A: restores W up to rounding. The active set stays {name: 1}.
  void unmerge() {
    Entry* m = merged_entry();
    LORA_CHECK(m != nullptr, "unmerge: no adapter is merged");
    drop_training_cache();
    m->layer.unmerge();
  }
  // The merged adapter's name, or "" when W is the base alone.
  std::string merged() const {
    const Entry* m = merged_entry();
    return m != nullptr ? m->name : std::string();
  }

  // ---- shapes and memory -------------------------------------------------------

  std::int64_t d_in() const { return d_in_; }
  std::int64_t d_out() const { return d_out_; }
  bool fan_in_fan_out() const { return fan_in_fan_out_; }
  ConstView W() const { return W_; }
  ConstView bias() const { return bias_; }
  Context& context() const { return *ctx_; }

  // sum_k r_k (d_in + d_out): the elements of every adapter's A and B.
  std::int64_t trainable_parameters() const {
    std::int64_t n = 0;
    for (const auto& e : entries_) n += e->layer.trainable_parameters();
    return n;
  }

  // Every adapter's report, W and bias counted once, plus the mixed-batch workspaces.
  MemoryReport memory() const {
    MemoryReport report;
    for (const auto& e : entries_) {
      MemoryReport m = e->layer.memory();
      m.frozen_bytes = 0;
      report += m;
    }
    report.frozen_bytes = static_cast<std::size_t>(d_out_ * d_in_ + (bias_.empty() ? 0 : d_out_)) * sizeof(T);
    report.workspace_bytes += x_group_.bytes() + y_group_.bytes() + gathered_rows_.bytes();
    return report;
  }

 private:
  struct Entry {
    std::string name;
    Layer layer;
  };
  struct Active {
    Entry* entry;
    double weight;
  };
  using Entries = std::vector<std::unique_ptr<Entry>>;

  template <class U>
  static MatrixView<const U, Space> cview(const Matrix<U>& m) {
    return m.view();
  }
  ConstView cview_W() const { return W_; }

  // Makes m at least rows x cols (a workspace whose leading row blocks are used).
  static void ensure_capacity(Matrix<T>& m, std::int64_t rows, std::int64_t cols) {
    if (m.rows() < rows || m.cols() != cols) m = Matrix<T>(rows, cols);
  }

  const Entry* find(const std::string& name) const {
    for (const auto& e : entries_)
      if (e->name == name) return e.get();
    return nullptr;
  }
  typename Entries::iterator find_entry(const std::string& name, const char* what) {
    const auto it = std::find_if(entries_.begin(), entries_.end(), [&](const auto& e) { return e->name == name; });
    LORA_CHECK(it != entries_.end(), what << ": " << unknown_name(name));
    return it;
  }
  Entry* merged_entry() const {
    for (const auto& e : entries_)
      if (e->layer.merged()) return e.get();
    return nullptr;
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

  void check_not_merged(const char* what) const {
    if (const Entry* m = merged_entry()) {
      LORA_CHECK(false, what << ": adapter \"" << m->name << "\" is merged into W; unmerge() first");
    }
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

  void drop_training_cache() {
    has_cache_ = false;
    cached_.clear();
  }

  Context* ctx_;
  View W_;
  ConstView bias_;
  bool fan_in_fan_out_;
  std::int64_t d_in_ = 0;
  std::int64_t d_out_ = 0;

  Entries entries_;              // insertion order; each Entry stays at one address until removed
  std::vector<Active> active_;   // what forward() applies
  std::vector<Active> cached_;   // what the last forward(Mode::train) applied, for backward()
  std::int64_t cached_rows_ = 0;
  bool has_cache_ = false;

  Matrix<T> x_group_, y_group_;     // forward_mixed workspaces: one gathered group's x and LoRA output
  Matrix<std::int64_t> gathered_rows_;       // forward_mixed: the gathered groups' row lists, 1 x (their total)
};

}  // namespace lora

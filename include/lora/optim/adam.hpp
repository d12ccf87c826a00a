// lora::Adam: Adam and AdamW (PyTorch's formulas) over the trainable tensors
// it is given, and nothing else: two moment buffers per tensor, so
// state_bytes() == 2 * sizeof(P) * trainable elements (8 bytes each in fp32).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "lora/core/backend.hpp"
#include "lora/core/error.hpp"
#include "lora/core/parameter.hpp"

namespace lora {

// A learning rate is finite and >= 0 (AdamOptions, add_group, set_lr and
// load_checkpoint all check it here).
inline void check_learning_rate(double lr, const std::string& what) {
  LORA_CHECK(std::isfinite(lr) && lr >= 0.0, what << " = " << lr << ": expected a finite value >= 0");
}

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;  // false: Adam (L2 added to the gradient); true: AdamW
  // Skip a step whose gradients are not all finite (an inf or nan, as an fp16
  // overflow gives), as torch.cuda.amp.GradScaler does: parameters, moments
  // and step count stay as they were and Adam::skipped_steps() counts it. Off
  // by default, as in PyTorch, where such a gradient propagates into the
  // parameters. Costs one reduction over the gradients per step (a sync on CUDA).
  bool skip_nonfinite_steps = false;

  // PyTorch's torch.optim.AdamW defaults.
  static AdamOptions adamw(double lr = 1e-3, double weight_decay = 1e-2) {
    AdamOptions o;
    o.lr = lr;
    o.weight_decay = weight_decay;
    o.decoupled_weight_decay = true;
    return o;
  }

  void validate() const {
    check_learning_rate(lr, "AdamOptions.lr");
    LORA_CHECK(beta1 >= 0.0 && beta1 < 1.0, "AdamOptions.beta1 = " << beta1 << ": expected a value in [0, 1)");
    LORA_CHECK(beta2 >= 0.0 && beta2 < 1.0, "AdamOptions.beta2 = " << beta2 << ": expected a value in [0, 1)");
    LORA_CHECK(std::isfinite(eps) && eps >= 0.0, "AdamOptions.eps = " << eps << ": expected a finite value >= 0");
    LORA_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
               "AdamOptions.weight_decay = " << weight_decay << ": expected a finite value >= 0");
  }
};

// The optimizer holds views of the tensors it is given, not the tensors: they
// belong to their layers, which must outlive it (or the groups they are in).
// A Parameter from a layer carries its StorageToken, so using a tensor whose
// layer was destroyed, or had another layer move-assigned over it, throws
// instead of writing into freed memory; moving a layer (its storage moves with
// it) is fine. A tensor may be in one group only, and only once.
template <class P, class Backend>
class Adam {
  static_assert(is_backend_v<Backend>, "Adam<P, Backend>: Backend does not satisfy the Backend interface");

 public:
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  using Matrix = typename Backend::template Matrix<P>;

  Adam(Context& ctx, const AdamOptions& options) : ctx_(&ctx), options_(options) { options_.validate(); }

  // Adds a parameter group with its own learning rate (and weight decay);
  // returns its index. LoRA+ puts B in a group of its own: add_group({A});
  // add_group({B}, lr * ratio). A tensor (or any memory of it) already held
  // is refused, as PyTorch refuses it: it would be updated twice per step.
  std::size_t add_group(const std::vector<Parameter<P, Space>>& params, std::optional<double> lr = std::nullopt,
                        std::optional<double> weight_decay = std::nullopt) {
    Group group;
    group.lr = lr.value_or(options_.lr);
    group.weight_decay = weight_decay.value_or(options_.weight_decay);
    check_learning_rate(group.lr, "add_group: lr");
    LORA_CHECK(std::isfinite(group.weight_decay) && group.weight_decay >= 0.0,
               "add_group: weight_decay = " << group.weight_decay << ", expected >= 0");
    for (const Parameter<P, Space>& p : params) {
      check_shape(p.grad, p.value.rows, p.value.cols, (p.name + ".grad").c_str());
      LORA_CHECK(p.value.contiguous() && p.grad.contiguous(), p.name << ": the optimizer needs contiguous tensors");
      LORA_CHECK(!tracked(p.storage) || !p.storage.expired(),
                 "add_group: tensor \"" << p.name << "\" was already freed (its layer is gone)");
    }
    check_disjoint(params);
    for (const Parameter<P, Space>& p : params) {
      State state{p, tracked(p.storage), Matrix(p.value.rows, p.value.cols), Matrix(p.value.rows, p.value.cols)};
      Backend::fill(*ctx_, state.m.view(), P(0));
      Backend::fill(*ctx_, state.v.view(), P(0));
      group.states.push_back(std::move(state));
    }
    groups_.push_back(std::move(group));
    return groups_.size() - 1;
  }

  // One update of every tensor, in a single backend call (one launch on CUDA).
  // Returns false, having changed nothing, when options.skip_nonfinite_steps
  // is set and a gradient holds an inf or nan (counted in skipped_steps()).
  bool step() {
    check_storage("Adam::step");
    if (options_.skip_nonfinite_steps && !std::isfinite(grad_squares().sum)) {
      ++skipped_steps_;
      return false;
    }
    ++step_;
    const double t = static_cast<double>(step_);
    AdamStep<P> h{};
    h.beta1 = static_cast<P>(options_.beta1);
    h.beta2 = static_cast<P>(options_.beta2);
    h.one_minus_beta1 = static_cast<P>(1.0 - options_.beta1);
    h.one_minus_beta2 = static_cast<P>(1.0 - options_.beta2);
    h.eps = static_cast<P>(options_.eps);
    h.bias_correction1 = static_cast<P>(1.0 - std::pow(options_.beta1, t));
    h.bias_correction2_sqrt = static_cast<P>(std::sqrt(1.0 - std::pow(options_.beta2, t)));
    h.decoupled = options_.decoupled_weight_decay;
    std::vector<AdamSlot<P>> slots;
    for (Group& g : groups_) {
      for (State& s : g.states) {
        slots.push_back(AdamSlot<P>{s.param.value.data, s.param.grad.data, s.m.data(), s.v.data(), s.param.value.size(),
                                    static_cast<P>(g.lr), static_cast<P>(g.weight_decay)});
      }
    }
    if (!slots.empty()) Backend::adam_step(*ctx_, slots.data(), slots.size(), h);
    return true;
  }

  void zero_grad() {
    check_storage("Adam::zero_grad");
    for (Group& g : groups_)
      for (State& s : g.states) Backend::fill(*ctx_, s.param.grad, P(0));
  }

  // torch.nn.utils.clip_grad_norm_: when the L2 norm of all gradients together
  // exceeds max_norm, every gradient is multiplied by max_norm / (norm + 1e-6).
  // Returns the norm before clipping. A non-finite norm propagates as in
  // PyTorch: norm = inf gives the factor 0 (finite gradients become 0, infinite
  // ones NaN), norm = NaN makes every gradient NaN. With error_if_nonfinite it
  // throws instead, naming the first non-finite tensor, and changes nothing.
  double clip_grad_norm(double max_norm, bool error_if_nonfinite = false) {
    LORA_CHECK(max_norm > 0.0, "clip_grad_norm: max_norm = " << max_norm << ", expected > 0");
    check_storage("Adam::clip_grad_norm");
    const GradSquares squares = grad_squares();
    const double norm = std::sqrt(squares.sum);
    const double coef = max_norm / (norm + 1e-6);
    if (std::isfinite(norm)) {
      if (coef < 1.0) {
        for (Group& g : groups_)
          for (State& s : g.states) Backend::scale(*ctx_, s.param.grad, coef);
      }
      return norm;
    }
    LORA_CHECK(!error_if_nonfinite,
               "Adam::clip_grad_norm: the total gradient norm is " << norm << ", non-finite (first in "
                   << squares.first_nonfinite << "), so it cannot be clipped; the gradients are left as they were "
                   << "(with error_if_nonfinite = false they are scaled by the non-finite norm, as PyTorch does)");
    multiply_gradients_elementwise(coef);
    return norm;
  }

  void set_lr(std::size_t group, double lr) {
    const std::size_t g = checked_group(group, "Adam::set_lr");
    check_learning_rate(lr, "Adam::set_lr: lr");
    groups_[g].lr = lr;
  }
  double lr(std::size_t group) const { return groups_[checked_group(group, "Adam::lr")].lr; }
  std::size_t group_count() const { return groups_.size(); }
  const AdamOptions& options() const { return options_; }

  // Steps taken so far (t in the bias correction); restored from checkpoints.
  std::int64_t step_count() const { return step_; }
  void set_step_count(std::int64_t step) {
    LORA_CHECK(step >= 0, "set_step_count: " << step << ", expected >= 0");
    step_ = step;
  }
  // Steps skipped for non-finite gradients (AdamOptions::skip_nonfinite_steps).
  std::int64_t skipped_steps() const { return skipped_steps_; }
  void set_skipped_steps(std::int64_t skipped) {
    LORA_CHECK(skipped >= 0, "set_skipped_steps: " << skipped << ", expected >= 0");
    skipped_steps_ = skipped;
  }

  // The moments of every tensor, in the order given, for checkpoints.
  struct Moments {
    std::string name;
    MatrixView<P, Space> m, v;
  };
  std::vector<Moments> moments() {
    std::vector<Moments> out;
    for (Group& g : groups_)
      for (State& s : g.states) out.push_back({s.param.name, s.m.view(), s.v.view()});
    return out;
  }

  std::int64_t trainable_parameters() const {
    std::int64_t n = 0;
    for (const Group& g : groups_)
      for (const State& s : g.states) n += s.param.value.size();
    return n;
  }
  // 2 moments x sizeof(P) x trainable elements.
  std::size_t state_bytes() const {
    std::size_t bytes = 0;
    for (const Group& g : groups_)
      for (const State& s : g.states) bytes += s.m.bytes() + s.v.bytes();
    return bytes;
  }

 private:
  struct State {
    Parameter<P, Space> param;
    bool tracked;  // param.storage came from a StorageToken (see check_storage)
    Matrix m, v;
  };
  struct Group {
    double lr = 0.0;
    double weight_decay = 0.0;
    std::vector<State> states;
  };

  std::size_t checked_group(std::size_t group, const char* what) const {
    LORA_CHECK(group < groups_.size(), what << ": group " << group << " does not exist; the optimizer has "
                                            << groups_.size() << (groups_.size() == 1 ? " group" : " groups"));
    return group;
  }

  // Whether w was made from a token at all: an empty weak_ptr and an expired
  // one both report expired(), but only the empty one shares no owner.
  static bool tracked(const std::weak_ptr<const void>& w) {
    const std::weak_ptr<const void> none;
    return w.owner_before(none) || none.owner_before(w);
  }

  // Every tensor's storage still belongs to the layer that handed it over.
  void check_storage(const char* what) const {
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      for (std::size_t i = 0; i < groups_[g].states.size(); ++i) {
        const State& s = groups_[g].states[i];
        LORA_CHECK(!s.tracked || !s.param.storage.expired(),
                   what << ": tensor \"" << s.param.name << "\" (group " << g << ", tensor " << i
                        << ") was freed or replaced after add_group: its layer was destroyed, or another layer was "
                           "move-assigned over it. The optimizer holds views of its layers' tensors and must not "
                           "outlive them; build a new Adam for the new layers");
      }
    }
  }

  // No two buffers the optimizer holds (values and gradients, this group's and
  // every earlier one's) may share an element. Sorted by start, a buffer
  // overlaps an earlier one exactly when it starts before the furthest end so far.
  void check_disjoint(const std::vector<Parameter<P, Space>>& incoming) const {
    struct Extent {
      std::uintptr_t begin, end;
      const Parameter<P, Space>* param;
      std::size_t group, tensor;
      bool grad;
    };
    std::vector<Extent> extents;
    const auto add = [&](const Parameter<P, Space>& p, std::size_t group, std::size_t tensor) {
      for (const bool grad : {false, true}) {
        const MatrixView<P, Space>& v = grad ? p.grad : p.value;
        if (v.size() == 0) continue;
        const auto begin = reinterpret_cast<std::uintptr_t>(v.data);
        extents.push_back({begin, begin + static_cast<std::uintptr_t>(v.size()) * sizeof(P), &p, group, tensor, grad});
      }
    };
    for (std::size_t g = 0; g < groups_.size(); ++g)
      for (std::size_t i = 0; i < groups_[g].states.size(); ++i) add(groups_[g].states[i].param, g, i);
    for (std::size_t i = 0; i < incoming.size(); ++i) add(incoming[i], groups_.size(), i);
    std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
    const auto describe = [&](const Extent& e) {
      std::ostringstream out;
      out << "the " << (e.grad ? "gradient" : "value") << " of \"" << e.param->name << "\" (";
      if (e.group == groups_.size()) {
        out << "tensor " << e.tensor << " of the group being added)";
      } else {
        out << "group " << e.group << ", tensor " << e.tensor << ")";
      }
      return out.str();
    };
    const Extent* furthest = nullptr;
    for (const Extent& e : extents) {
      LORA_CHECK(furthest == nullptr || e.begin >= furthest->end,
                 "add_group: " << describe(e) << " shares memory with " << describe(*furthest)
                               << ": a tensor may be in only one group, and only once; it would be updated more "
                                  "than once per step (PyTorch: \"some parameters appear in more than one parameter "
                                  "group\"). For LoRA+, put B in its own group only");
      if (furthest == nullptr || e.end > furthest->end) furthest = &e;
    }
  }

  // The sum of every gradient's squares, and the first tensor whose own sum
  // is not finite (an inf or nan element, or squares past double's range).
  struct GradSquares {
    double sum = 0.0;
    std::string first_nonfinite;  // e.g. "lora_B" (group 1, tensor 0); empty when all are finite
  };
  GradSquares grad_squares() {
    GradSquares out;
    // Every tensor's sum in one call: on a GPU one transfer and one wait per step.
    std::vector<MatrixView<const P, Space>> grads;
    for (const Group& g : groups_)
      for (const State& s : g.states) grads.emplace_back(s.param.grad);
    std::vector<double> sums(grads.size());
    Backend::sum_squares_each(*ctx_, grads.data(), grads.size(), sums.data());
    std::size_t k = 0;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      for (std::size_t i = 0; i < groups_[g].states.size(); ++i) {
        const Parameter<P, Space>& p = groups_[g].states[i].param;
        const double sum = sums[k++];
        if (!std::isfinite(sum) && out.first_nonfinite.empty()) {
          std::ostringstream where;
          where << '"' << p.name << "\" (group " << g << ", tensor " << i << ')';
          out.first_nonfinite = where.str();
        }
        out.sum += sum;
      }
    }
    return out;
  }

  // grad *= factor for each element as IEEE arithmetic gives it (inf * 0 =
  // NaN), through the host: Backend::scale(0) writes zeros without reading
  // (GEMM's beta = 0). Only a non-finite norm (factor 0 or NaN) comes here.
  void multiply_gradients_elementwise(double factor) {
    const P f = static_cast<P>(factor);
    for (Group& g : groups_) {
      for (State& s : g.states) {
        const MatrixView<P, Space> grad = s.param.grad;
        std::vector<P> host(static_cast<std::size_t>(grad.size()));
        const MatrixView<P, HostSpace> h(host.data(), grad.rows, grad.cols);
        Backend::copy_to_host(*ctx_, MatrixView<const P, Space>(grad), h);  // waits for the copy
        for (P& x : host) x *= f;
        Backend::copy_from_host(*ctx_, MatrixView<const P, HostSpace>(h), grad);
      }
    }
    Backend::synchronize(*ctx_);
  }

  Context* ctx_;
  AdamOptions options_;
  std::vector<Group> groups_;
  std::int64_t step_ = 0;
  std::int64_t skipped_steps_ = 0;
};

}  // namespace lora

// lora::Adam: Adam and AdamW (PyTorch's formulas) over the trainable tensors
// it is given, and nothing else: two moment buffers per tensor, so
// state_bytes() == 2 * sizeof(P) * trainable elements (8 bytes each in fp32).
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lora/core/backend.hpp"
#include "lora/core/error.hpp"
#include "lora/core/parameter.hpp"

namespace lora {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;  // false: Adam (L2 added to the gradient); true: AdamW

  // PyTorch's torch.optim.AdamW defaults.
  static AdamOptions adamw(double lr = 1e-3, double weight_decay = 1e-2) {
    AdamOptions o;
    o.lr = lr;
    o.weight_decay = weight_decay;
    o.decoupled_weight_decay = true;
    return o;
  }

  void validate() const {
    LORA_CHECK(std::isfinite(lr) && lr >= 0.0, "AdamOptions.lr = " << lr << ": expected a finite value >= 0");
    LORA_CHECK(beta1 >= 0.0 && beta1 < 1.0, "AdamOptions.beta1 = " << beta1 << ": expected a value in [0, 1)");
    LORA_CHECK(beta2 >= 0.0 && beta2 < 1.0, "AdamOptions.beta2 = " << beta2 << ": expected a value in [0, 1)");
    LORA_CHECK(std::isfinite(eps) && eps >= 0.0, "AdamOptions.eps = " << eps << ": expected a finite value >= 0");
    LORA_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
               "AdamOptions.weight_decay = " << weight_decay << ": expected a finite value >= 0");
  }
};

template <class P, class Backend>
class Adam {
  static_assert(is_backend_v<Backend>, "Adam<P, Backend>: Backend does not satisfy the Backend interface");

 public:
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  using Matrix = typename Backend::template Matrix<P>;

  Adam(Context& ctx, const AdamOptions& options) : ctx_(&ctx), options_(options) { options_.validate(); }

  // Adds a parameter group with its own learning rate (and weight decay);
  // returns its index. LoRA+ is add_group({layer.lora_B()}, lr * ratio).
  std::size_t add_group(const std::vector<Parameter<P, Space>>& params, std::optional<double> lr = std::nullopt,
                        std::optional<double> weight_decay = std::nullopt) {
    Group group;
    group.lr = lr.value_or(options_.lr);
    group.weight_decay = weight_decay.value_or(options_.weight_decay);
    LORA_CHECK(std::isfinite(group.lr) && group.lr >= 0.0, "add_group: lr = " << group.lr << ", expected >= 0");
    LORA_CHECK(std::isfinite(group.weight_decay) && group.weight_decay >= 0.0,
               "add_group: weight_decay = " << group.weight_decay << ", expected >= 0");
    for (const Parameter<P, Space>& p : params) {
      check_shape(p.grad, p.value.rows, p.value.cols, (p.name + ".grad").c_str());
      LORA_CHECK(p.value.contiguous() && p.grad.contiguous(), p.name << ": the optimizer needs contiguous tensors");
      State state{p, Matrix(p.value.rows, p.value.cols), Matrix(p.value.rows, p.value.cols)};
      Backend::fill(*ctx_, state.m.view(), P(0));
      Backend::fill(*ctx_, state.v.view(), P(0));
      group.states.push_back(std::move(state));
    }
    groups_.push_back(std::move(group));
    return groups_.size() - 1;
  }

  // One update of every tensor, in a single backend call (one launch on CUDA).
  void step() {
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
  }

  void zero_grad() {
    for (Group& g : groups_)
      for (State& s : g.states) Backend::fill(*ctx_, s.param.grad, P(0));
  }

  // Scales every gradient by max_norm / (norm + 1e-6) when the global L2 norm
  // exceeds max_norm (torch.nn.utils.clip_grad_norm_); returns the norm before.
  double clip_grad_norm(double max_norm) {
    LORA_CHECK(max_norm > 0.0, "clip_grad_norm: max_norm = " << max_norm << ", expected > 0");
    double sum = 0.0;
    for (Group& g : groups_)
      for (State& s : g.states) sum += Backend::sum_squares(*ctx_, MatrixView<const P, Space>(s.param.grad));
    const double norm = std::sqrt(sum);
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) {
      for (Group& g : groups_)
        for (State& s : g.states) Backend::scale(*ctx_, s.param.grad, coef);
    }
    return norm;
  }

  void set_lr(std::size_t group, double lr) {
    LORA_CHECK(group < groups_.size(), "set_lr: group " << group << " of " << groups_.size());
    LORA_CHECK(std::isfinite(lr) && lr >= 0.0, "set_lr: lr = " << lr << ", expected >= 0");
    groups_[group].lr = lr;
  }
  double lr(std::size_t group) const { return groups_.at(group).lr; }
  std::size_t group_count() const { return groups_.size(); }
  const AdamOptions& options() const { return options_; }

  // Steps taken so far (t in the bias correction); restored from checkpoints.
  std::int64_t step_count() const { return step_; }
  void set_step_count(std::int64_t step) {
    LORA_CHECK(step >= 0, "set_step_count: " << step << ", expected >= 0");
    step_ = step;
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
    Matrix m, v;
  };
  struct Group {
    double lr = 0.0;
    double weight_decay = 0.0;
    std::vector<State> states;
  };

  Context* ctx_;
  AdamOptions options_;
  std::vector<Group> groups_;
  std::int64_t step_ = 0;
};

}  // namespace lora

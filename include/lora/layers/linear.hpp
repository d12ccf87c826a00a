// lora::Linear: one frozen base and one adapter, the simplest way to train a
// single layer:
//
//   y = x W^T + bias + s (drop(x) A^T) B^T
//   x: N x d_in, W: d_out x d_in, A: r x d_in, B: d_out x r, y: N x d_out
//
// A thin composition of lora::DenseBase (base/dense.hpp: x W^T + bias, dL/dx)
// and lora::LoraAdapter (adapters/lora.hpp: A, B, their gradients) that keeps
// the last training forward's state itself, so forward(x, y) then
// backward(x, dL_dy, dL_dx) is all a caller writes. Several adapters over one
// W are lora::AdapterSet; a whole model is lora::Model (<lora/model.hpp>).
//
// With config.use_dora the adapter is DoRA (adapters/lora.hpp):
//   y = (m / n) o (x W^T + s (drop(x) A^T) B^T) + bias,  n = ||W + s B A|| per output;
// the layer keeps x W^T (N x d_out) from a training forward for backward.
//
// W is borrowed: the layer writes it only in merge()/unmerge() and, with a
// PiSSA / OLoRA config, once in its constructor (W becomes the residual:
// adapters/init.hpp); a layer built over a MatrixView<const T> refuses both.
// inference() is const and safe from many threads; forward(Mode::eval) is the
// same computation but drops the training state (backward then needs a new
// training forward).
#pragma once

#include <cstdint>
#include <type_traits>
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

namespace lora {

// train: dropout on the LoRA path and the state backward needs; eval: neither.
enum class Mode { train, eval };

template <class T, class Backend, class BaseT = DenseBase<T, Backend>>
class Linear {
  static_assert(is_frozen_base_v<BaseT>, "Linear<T, Backend, Base>: Base is not a frozen base (base/dense.hpp)");

 public:
  using Base = BaseT;
  using Adapter = LoraAdapter<T, Backend>;
  using Param = typename Adapter::Param;
  using backend_type = Backend;
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;
  using ParamView = MatrixView<Param, Space>;
  using ConstParamView = MatrixView<const Param, Space>;
  template <class U>
  using Matrix = typename Backend::template Matrix<U>;

  // W: d_out x d_in (d_in x d_out with config.fan_in_fan_out), borrowed and
  // frozen; bias: 1 x d_out or empty, borrowed. `stream` tells layers that
  // share a seed apart (each draws its own init and dropout numbers). Over a
  // read-only W (ConstView) everything works but merge(). With config.init
  // pissa or olora, A and B come from W and W becomes the residual W - s B A
  // (adapters/init.hpp): W must then be writable.
  Linear(Context& ctx, View W, ConstView bias, const Config& config, std::uint32_t stream = 0)
      : base_(checked_base(ctx, W, bias, config)), adapter_(base_, config, stream) {
    start_from_weight();
  }
  template <class ConstW, class = std::enable_if_t<std::is_same_v<ConstW, ConstView>>>
  Linear(Context& ctx, ConstW W, ConstView bias, const Config& config, std::uint32_t stream = 0)
      : base_(checked_base(ctx, W, bias, config)), adapter_(base_, config, stream) {
    start_from_weight();
  }
  // Over any frozen base (a quantized one: base/nf4.hpp); config.fan_in_fan_out
  // must match its layout. A base that is not writable refuses merge() (and
  // the pissa and olora inits).
  Linear(Base base, const Config& config, std::uint32_t stream = 0)
      : base_(std::move(base)), adapter_(checked_layout(base_, config), config, stream) {
    start_from_weight();
  }

  Linear(Linear&&) noexcept = default;
  Linear& operator=(Linear&&) noexcept = default;
  Linear(const Linear&) = delete;
  Linear& operator=(const Linear&) = delete;

  // A from config.init (a pure function of seed and stream), B = 0, gradients
  // 0; DoRA's magnitude back to the row norms of W. For pissa and olora, A and
  // B back to the values W's decomposition gave (W is not touched again: the
  // layer computes the original W once more).
  void reset_parameters() { adapter_.reset_parameters(base_); }

  // y = x W^T + bias + s (drop(x) A^T) B^T             y: N x d_out, x: N x d_in
  // Mode::train applies dropout (p = config.dropout) and keeps xa = drop(x) A^T
  // (N x r) for backward; Mode::eval does neither. A merged layer computes
  // x W^T + bias only (its W holds the update), and cannot train.
  void forward(ConstView x, View y, Mode mode = Mode::train) {
    detail::check_forward_args("Linear::forward", x, y, d_in(), d_out(), base_.W(), base_.bias());
    LORA_CHECK(!(merged_ && mode == Mode::train),
               "Linear::forward(Mode::train) on a merged layer: unmerge() before training");
    if (merged_) {
      base_.forward(x, y);
      state_.clear();
      return;
    }
    if (!adapter_.use_dora()) {
      // The LoRA path writes y, the frozen GEMM accumulates onto it.
      run_adapter(x, y, mode, 1.0, OutputMode::overwrite);
      base_.forward(x, y, OutputMode::accumulate);
      return;
    }
    // DoRA: y = x W^T + bias with x W^T kept (what the adapter rescales, and
    // backward reads for dL/dm), then the adapter's terms.
    product_forward(base_, x, y, xWt_);
    run_adapter(x, y, mode, 1.0, OutputMode::accumulate);
  }

  // forward(x, y, Mode::eval) without touching the training state: const, and
  // safe from many threads on one layer.
  void inference(ConstView x, View y) const {
    detail::check_forward_args("Linear::inference", x, y, d_in(), d_out(), base_.W(), base_.bias());
    if (merged_) {
      base_.forward(x, y);
      return;
    }
    typename Adapter::ForwardState workspace;
    if (!adapter_.use_dora()) {
      adapter_.inference(x, y, workspace, 1.0, OutputMode::overwrite);
      base_.forward(x, y, OutputMode::accumulate);
      return;
    }
    Matrix<T> xWt;
    product_forward(base_, x, y, xWt);
    adapter_.inference(base_, x, ConstView(xWt.view()), y, workspace, 1.0);
  }

  // The LoRA path alone, added to y: y += weight s (drop(x) A^T) B^T (forward()
  // is base_forward() + forward_lora()). Refused on a merged layer, in either
  // mode: the base output already holds the update, so adding it would count it twice.
  // DoRA: y += w [(c - 1) o x W^T + c o s (drop(x) A^T) B^T], for which this
  // call computes x W^T once more (forward() reuses the base's product instead).
  void forward_lora(ConstView x, View y, Mode mode = Mode::train, double weight = 1.0) {
    detail::check_forward_args("Linear::forward_lora", x, y, d_in(), d_out());
    LORA_CHECK(!merged_, "Linear::forward_lora: the adapter is merged into W, so the base output (forward, "
                         "base_forward) already includes its update; call forward(), or unmerge() first");
    if (adapter_.use_dora()) {
      xWt_.reshape(x.rows, d_out());
      base_.matmul(x, xWt_.view());
    }
    run_adapter(x, y, mode, weight, OutputMode::accumulate);
  }

  // y = x W^T + bias (x W with fan_in_fan_out): the frozen layer alone.
  void base_forward(ConstView x, View y) const {
    detail::check_forward_args("Linear::base_forward", x, y, d_in(), d_out(), base_.W(), base_.bias());
    base_.forward(x, y);
  }

  // Given dL_dy (N x d_out) and the x of the last Mode::train forward:
  //   dL_dx  = dL_dy W + s ((dL_dy B) A) o mask / (1 - p)   (N x d_in)    skipped when dL_dx is empty
  //   dL_dB  = s dL_dy^T xa                                  (d_out x r) = (d_out x N)(N x r)
  //   dL_dA  = s (dL_dy B)^T drop(x)                         (r x d_in)  = (r x N)(N x d_in)
  // grad_mode overwrites or accumulates into dL_dA and dL_dB, or skips them.
  // DoRA (c = m / n, n constant): dL_dx = (dL_dy o c) W + the path above with
  // B' = diag(c) B; dL_dB = diag(c) s dL_dy^T xa; dL_dm as in adapters/lora.hpp.
  void backward(ConstView x, ConstView dL_dy, View dL_dx, GradMode grad_mode = GradMode::overwrite) {
    check_state("Linear::backward");
    // Everything checked before dL_dx is written.
    detail::check_backward_args("Linear::backward", x, dL_dy, dL_dx, state_.rows(), d_in(), d_out(), base_.W());
    // The LoRA path writes dL_dx, the frozen GEMM accumulates onto it.
    adapter_.backward(state_, x, ConstView(xWt_.view()), dL_dy, dL_dx, grad_mode, OutputMode::overwrite);
    if (!dL_dx.empty())
      Adapter::base_backward(base_, {&state_}, dL_dy, dL_dx, OutputMode::accumulate, C_, scaled_dL_dy_);
  }

  // The LoRA path's share of backward, for the weight w of the last forward_lora:
  //   dL_dx += w s ((dL_dy B) A) o mask / (1 - p)     (skipped when dL_dx is empty)
  //   dL_dB  = w s dL_dy^T xa,  dL_dA = w s (dL_dy B)^T drop(x)
  // DoRA adds the base term's share, (dL_dy o w (c - 1)) W, to dL_dx (one
  // more base backward; backward() folds it into the base's own).
  void backward_lora(ConstView x, ConstView dL_dy, View dL_dx, GradMode grad_mode = GradMode::overwrite) {
    check_state("Linear::backward_lora");
    detail::check_backward_args("Linear::backward_lora", x, dL_dy, dL_dx, state_.rows(), d_in(), d_out());
    if (adapter_.use_dora() && !dL_dx.empty() && x.rows > 0) {
      scaled_dL_dy_.reshape(x.rows, d_out());
      Backend::scale_columns(context(), state_.base_scale(), dL_dy, 0.0, scaled_dL_dy_.view());
      base_.backward_input(ConstView(scaled_dL_dy_.view()), dL_dx, OutputMode::accumulate);
    }
    adapter_.backward(state_, x, ConstView(xWt_.view()), dL_dy, dL_dx, grad_mode);
  }

  // W <- W + s B A (W^T <- W^T + s (B A)^T with fan_in_fan_out): afterwards the
  // layer costs one GEMM. B A is formed in the parameter type and added once.
  // DoRA: W <- (m / n) o (W + s B A), rows of the d_out x d_in weight.
  void merge() {
    LORA_CHECK(!merged_, "Linear::merge: the adapter is already merged");
    adapter_.add_to(base_, +1.0);
    merged_ = true;
    state_.clear();
  }
  // W <- W - s B A (DoRA: W <- W (n / m) - s B A): restores W up to rounding.
  void unmerge() {
    LORA_CHECK(merged_, "Linear::unmerge: the adapter is not merged");
    adapter_.add_to(base_, -1.0);
    merged_ = false;
    state_.clear();
  }
  bool merged() const { return merged_; }

  // The two parts.
  const Base& base() const { return base_; }
  Adapter& adapter() { return adapter_; }
  const Adapter& adapter() const { return adapter_; }

  // The trainable tensors, for the optimizer (LoRA+ puts B in its own group).
  Parameter<Param, Space> lora_A() { return adapter_.lora_A(); }
  Parameter<Param, Space> lora_B() { return adapter_.lora_B(); }
  // DoRA's magnitude m (1 x d_out), "lora_magnitude_vector".
  Parameter<Param, Space> lora_magnitude() { return adapter_.lora_magnitude(); }
  std::vector<Parameter<Param, Space>> parameters() { return adapter_.parameters(); }

  ConstParamView A() const { return adapter_.A(); }
  ConstParamView B() const { return adapter_.B(); }
  ConstParamView dL_dA() const { return adapter_.dL_dA(); }
  ConstParamView dL_dB() const { return adapter_.dL_dB(); }
  ConstParamView magnitude() const { return adapter_.magnitude(); }
  bool use_dora() const { return adapter_.use_dora(); }
  ConstView W() const { return base_.W(); }
  ConstView bias() const { return base_.bias(); }

  std::int64_t d_in() const { return base_.d_in(); }
  std::int64_t d_out() const { return base_.d_out(); }
  int rank() const { return adapter_.rank(); }
  double scale() const { return adapter_.scale(); }
  const Config& config() const { return adapter_.config(); }
  std::uint32_t stream() const { return adapter_.stream(); }
  Context& context() const { return base_.context(); }

  // r (d_in + d_out): the elements of A and B (+ d_out with DoRA).
  std::int64_t trainable_parameters() const { return adapter_.trainable_parameters(); }
  // d_out d_in (+ d_out with a bias): what full fine-tuning would train.
  std::int64_t frozen_parameters() const { return base_.parameters(); }

  // The number of Mode::train forwards so far: the position of the dropout
  // RNG, saved in checkpoints so a resumed run draws the same masks.
  std::uint32_t dropout_calls() const { return adapter_.dropout_calls(); }
  void set_dropout_calls(std::uint32_t calls) { adapter_.set_dropout_calls(calls); }

  // The adapter's bytes, W and bias (frozen), and the training state (xa,
  // N x r, and with DoRA x W^T, N x d_out: an activation while backward may
  // use it, scratch after).
  MemoryReport memory() const {
    MemoryReport report = adapter_.memory();
    report.frozen_bytes += base_.bytes();
    (state_.valid() ? report.activation_bytes : report.workspace_bytes) += state_.bytes() + xWt_.bytes();
    report.workspace_bytes += C_.bytes() + scaled_dL_dy_.bytes();
    return report;
  }

 private:
  template <class W>
  static Base checked_base(Context& ctx, W weight, ConstView bias, const Config& config) {
    detail::check_base("Linear", ConstView(weight), bias, config.fan_in_fan_out);
    return Base(ctx, weight, bias, config.fan_in_fan_out);
  }
  static const Base& checked_layout(const Base& base, const Config& config) {
    LORA_CHECK(config.fan_in_fan_out == base.fan_in_fan_out(),
               "Linear: Config.fan_in_fan_out = " << config.fan_in_fan_out << ", expected " << base.fan_in_fan_out()
                                                  << " (the layout of the base's W)");
    return base;
  }
  void start_from_weight() {
    if (init_writes_base(adapter_.config().init)) init_from_weight(base_, adapter_, "Linear");
  }
  void check_state(const char* call) const {
    LORA_CHECK(state_.valid(), call << ": no cache; call forward(x, y, Mode::train) first");
  }
  // The adapter's terms written into y or added to it (with DoRA, added, on the x W^T in xWt_).
  void run_adapter(ConstView x, View y, Mode mode, double weight, OutputMode out) {
    if (mode == Mode::train) {
      adapter_.forward(base_, x, ConstView(xWt_.view()), y, state_, weight, out);
    } else {
      adapter_.inference(base_, x, ConstView(xWt_.view()), y, state_, weight, out);  // the state's buffers as workspace
    }
  }

  Base base_;
  Adapter adapter_;
  typename Adapter::ForwardState state_;  // the last Mode::train forward's, for backward()
  Matrix<T> xWt_;                         // DoRA: that forward's x W^T (N x d_out), for backward's dL/dm
  Matrix<Param> C_;                       // DoRA backward: the base path's column scale (1 x d_out)
  Matrix<T> scaled_dL_dy_;                // DoRA backward: dL_dy o C
  bool merged_ = false;
};

}  // namespace lora

// lora::Linear: a frozen linear layer W (borrowed from the caller) plus a
// trainable low-rank update B A, written once against the Backend interface.
//
//   y = x W^T + bias + s (drop(x) A^T) B^T
//   x: N x d_in, W: d_out x d_in, A: r x d_in, B: d_out x r, y: N x d_out
//
// W has no gradient and no optimizer state: the layer never writes it except
// in merge()/unmerge(). B A is never formed during training.
//
// Every view is checked before anything is written (lora::check_view), and an
// output never shares memory with an input: y with x, W or bias; dL_dx with x,
// dL_dy or W. Such calls throw rather than compute wrong numbers.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/parameter.hpp"
#include "lora/core/random.hpp"

namespace lora {

// train: dropout on the LoRA path and the cache backward needs; eval: neither.
enum class Mode { train, eval };

namespace detail {

// The frozen base of a layer (Linear, AdapterSet): W is a valid non-empty view,
// d_out x d_in (d_in x d_out with fan_in_fan_out); bias is empty or 1 x d_out
// and not inside W (merge() writes W). A bias that does not fit is reported
// against W, since a transposed W is the likelier mistake.
template <class T, class Space>
void check_base(const char* call, const MatrixView<T, Space>& W, const MatrixView<const T, Space>& bias,
                bool fan_in_fan_out) {
  check_view(W, "W", call);
  LORA_CHECK(W.rows >= 1 && W.cols >= 1,
             call << ": W: expected a non-empty matrix, found [" << W.rows << ", " << W.cols << "]");
  if (bias.empty()) return;
  check_view(bias, "bias", call);
  const std::int64_t d_out = fan_in_fan_out ? W.cols : W.rows, other = fan_in_fan_out ? W.rows : W.cols;
  LORA_CHECK(bias.rows == 1 && bias.cols == d_out,
             call << ": bias is [" << bias.rows << ", " << bias.cols << "] but W is [" << W.rows << ", " << W.cols
                  << "], stored " << (fan_in_fan_out ? "d_in x d_out (fan_in_fan_out = true)" : "d_out x d_in")
                  << ", so bias must be [1, " << d_out << "]"
                  << (bias.rows * bias.cols == other && other != d_out
                          ? (fan_in_fan_out ? "; is W stored d_out x d_in? Then set Config.fan_in_fan_out = false"
                                            : "; is W transposed? A base stored d_in x d_out (GPT-2's Conv1D) needs "
                                              "Config.fan_in_fan_out = true")
                          : ""));
  check_disjoint(call, W, "W (which merge() writes)", bias, "bias");
}

// The arguments of a forward: x is N x d_in, y is N x d_out, and y shares no
// memory with x or with the base it reads (W and bias; pass empty views when
// the call does not read them).
template <class T, class Space>
void check_forward_args(const char* call, const MatrixView<const T, Space>& x, const MatrixView<T, Space>& y,
                        std::int64_t d_in, std::int64_t d_out, const MatrixView<const T, Space>& W,
                        const MatrixView<const T, Space>& bias) {
  check_shape(x, x.rows, d_in, "x", call);
  check_shape(y, x.rows, d_out, "y", call);
  check_disjoint(call, y, "y", x, "x");
  check_disjoint(call, y, "y", W, "W");
  check_disjoint(call, y, "y", bias, "bias");
}

// The arguments of a backward: x is n x d_in (n rows, as in the cached
// forward), dL_dy is n x d_out, dL_dx is n x d_in or empty (not computed) and
// shares no memory with x, dL_dy or W (an empty view when the call does not read it).
template <class T, class Space>
void check_backward_args(const char* call, const MatrixView<const T, Space>& x,
                         const MatrixView<const T, Space>& dL_dy, const MatrixView<T, Space>& dL_dx, std::int64_t n,
                         std::int64_t d_in, std::int64_t d_out, const MatrixView<const T, Space>& W) {
  LORA_CHECK(x.rows == n, call << ": x: expected " << n << " rows (as in forward), found " << x.rows);
  check_shape(x, n, d_in, "x", call);
  check_shape(dL_dy, n, d_out, "dL_dy", call);
  if (dL_dx.empty()) return;
  check_shape(dL_dx, n, d_in, "dL_dx", call);
  check_disjoint(call, dL_dx, "dL_dx", x, "x");
  check_disjoint(call, dL_dx, "dL_dx", dL_dy, "dL_dy");
  check_disjoint(call, dL_dx, "dL_dx", W, "W");
}

}  // namespace detail

template <class T, class Backend>
class Linear {
  static_assert(is_backend_v<Backend>, "Linear<T, Backend>: Backend does not satisfy the Backend interface");

 public:
  using Param = param_t<T>;  // type of A, B and their gradients
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  template <class U>
  using Matrix = typename Backend::template Matrix<U>;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;
  using ParamView = MatrixView<Param, Space>;
  using ConstParamView = MatrixView<const Param, Space>;

  // W: d_out x d_in (d_in x d_out with config.fan_in_fan_out), borrowed and
  // frozen; bias: 1 x d_out or empty, borrowed. `stream` tells layers that
  // share a seed apart (each draws its own init and dropout numbers).
  Linear(Context& ctx, View W, ConstView bias, const Config& config, std::uint32_t stream = 0)
      : ctx_(&ctx), W_(W), bias_(bias), config_(config), stream_(stream) {
    detail::check_base("Linear", W, bias, config.fan_in_fan_out);
    d_out_ = config.fan_in_fan_out ? W.cols : W.rows;
    d_in_ = config.fan_in_fan_out ? W.rows : W.cols;
    config_.validate(d_in_, d_out_);
    scale_ = config_.scale();
    const int r = config_.r;
    A_ = Matrix<Param>(r, d_in_);
    B_ = Matrix<Param>(d_out_, r);
    dL_dA_ = Matrix<Param>(r, d_in_);
    dL_dB_ = Matrix<Param>(d_out_, r);
    if constexpr (kMixedPrecision) {
      A_compute_ = Matrix<T>(r, d_in_);
      B_compute_ = Matrix<T>(d_out_, r);
    }
    reset_parameters();
  }

  Linear(Linear&&) noexcept = default;
  Linear& operator=(Linear&&) noexcept = default;
  Linear(const Linear&) = delete;
  Linear& operator=(const Linear&) = delete;

  // A from config.init (a pure function of seed and stream), B = 0, gradients 0.
  void reset_parameters() {
    const int r = config_.r;
    std::vector<Param> host(static_cast<std::size_t>(r * d_in_));
    const std::uint64_t s = init_stream(stream_);
    for (std::size_t i = 0; i < host.size(); ++i) {
      if (config_.init == Init::gaussian) {
        host[i] = static_cast<Param>(standard_normal(config_.seed, s, 0, i) / r);
      } else {
        const double bound = 1.0 / std::sqrt(static_cast<double>(d_in_));
        const double u = static_cast<double>(random_bits(config_.seed, s, 0, i)) * 0x1p-32;  // [0, 1)
        host[i] = static_cast<Param>((2.0 * u - 1.0) * bound);
      }
    }
    Backend::copy_from_host(*ctx_, MatrixView<const Param, HostSpace>(host.data(), r, d_in_), A_.view());
    Backend::fill(*ctx_, B_.view(), Param(0));
    Backend::fill(*ctx_, dL_dA_.view(), Param(0));
    Backend::fill(*ctx_, dL_dB_.view(), Param(0));
  }

  // y = x W^T + bias + s (drop(x) A^T) B^T             y: N x d_out, x: N x d_in
  // Mode::train applies dropout (p = config.dropout) and caches xa = drop(x) A^T
  // (N x r) for backward; Mode::eval does neither. A merged layer computes
  // x W^T + bias only (its W holds the update), and cannot train.
  void forward(ConstView x, View y, Mode mode = Mode::train) {
    detail::check_forward_args("Linear::forward", x, y, d_in_, d_out_, cview_W(), bias_);
    LORA_CHECK(!(merged_ && mode == Mode::train),
               "Linear::forward(Mode::train) on a merged layer: unmerge() before training");
    base_forward(x, y);
    if (merged_) {
      has_cache_ = false;
      return;
    }
    forward_lora(x, y, mode);
  }

  // The LoRA path alone, added to y: y += weight s (drop(x) A^T) B^T. forward()
  // is base_forward() + forward_lora(); several adapters over one W (see
  // layers/adapter_set.hpp) each add their own path to one base output.
  // Refused on a merged layer, in either mode: the base output already holds
  // the update (it is inside W), so adding the path would count it twice.
  void forward_lora(ConstView x, View y, Mode mode = Mode::train, double weight = 1.0) {
    const std::int64_t n = x.rows;
    detail::check_forward_args("Linear::forward_lora", x, y, d_in_, d_out_, ConstView(), ConstView());
    LORA_CHECK(!merged_, "Linear::forward_lora: the adapter is merged into W, so the base output (forward, "
                         "base_forward) already includes its update; call forward(), or unmerge() first");
    has_cache_ = false;
    if (n == 0) return;
    refresh_compute_copies();

    ConstView lora_in = x;
    const bool drop = mode == Mode::train && config_.dropout > 0.0;
    if (mode == Mode::train) cache_call_ = dropout_calls_++;
    if (drop) {
      ensure_shape(dropped_x_, n, d_in_);
      Backend::dropout(*ctx_, x, dropped_x_.view(), static_cast<float>(config_.dropout), config_.seed, stream_,
                       cache_call_);
      lora_in = dropped_x_.view();
    }
    // xa = drop(x) A^T                  (N x r) = (N x d_in)(d_in x r)
    ensure_shape(xa_, n, config_.r);
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, 1.0, lora_in, A_compute(), 0.0, xa_.view());
    // y += weight s xa B^T              (N x d_out) = (N x r)(r x d_out)
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, weight * scale_, cview(xa_), B_compute(), 1.0, y);
    if (mode == Mode::train) {
      has_cache_ = true;
      cached_rows_ = n;
      cached_weight_ = weight;
    }
  }

  // y = x W^T + bias (x W with fan_in_fan_out): the frozen layer alone.
  void base_forward(ConstView x, View y) {
    detail::check_forward_args("Linear::base_forward", x, y, d_in_, d_out_, cview_W(), bias_);
    Backend::template gemm<T, T>(*ctx_, Op::N, config_.fan_in_fan_out ? Op::N : Op::T, 1.0, x, cview_W(), 0.0, y);
    if (!bias_.empty()) Backend::add_row_vector(*ctx_, y, bias_);
  }

  // Given dL_dy (N x d_out) and the x of the last Mode::train forward:
  //   dL_dx  = dL_dy W + s ((dL_dy B) A) o mask / (1 - p)   (N x d_in)    skipped when dL_dx is empty
  //   dL_dB  = s dL_dy^T xa                                  (d_out x r) = (d_out x N)(N x r)
  //   dL_dA  = s (dL_dy B)^T drop(x)                         (r x d_in)  = (r x N)(N x d_in)
  // grad_mode overwrites or accumulates into dL_dA and dL_dB, or skips them.
  void backward(ConstView x, ConstView dL_dy, View dL_dx, GradMode grad_mode = GradMode::overwrite) {
    LORA_CHECK(has_cache_, "Linear::backward: no cache; call forward(x, y, Mode::train) first");
    // Everything checked before dL_dx is written.
    detail::check_backward_args("Linear::backward", x, dL_dy, dL_dx, cached_rows_, d_in_, d_out_, cview_W());
    if (!dL_dx.empty()) {
      // dL_dx = dL_dy W   (W stored d_out x d_in), or dL_dy W^T (stored d_in x d_out)
      Backend::template gemm<T, T>(*ctx_, Op::N, config_.fan_in_fan_out ? Op::T : Op::N, 1.0, dL_dy, cview_W(), 0.0,
                                   dL_dx);
    }
    backward_lora(x, dL_dy, dL_dx, grad_mode);
  }

  // The LoRA path's share of backward, for the weight w of the last forward_lora:
  //   dL_dx += w s ((dL_dy B) A) o mask / (1 - p)     (skipped when dL_dx is empty)
  //   dL_dB  = w s dL_dy^T xa,  dL_dA = w s (dL_dy B)^T drop(x)
  // The dropout mask is regenerated from the counter-based RNG, not stored.
  void backward_lora(ConstView x, ConstView dL_dy, View dL_dx, GradMode grad_mode = GradMode::overwrite) {
    const std::int64_t n = x.rows;
    LORA_CHECK(has_cache_, "Linear::backward_lora: no cache; call forward(x, y, Mode::train) first");
    detail::check_backward_args("Linear::backward_lora", x, dL_dy, dL_dx, cached_rows_, d_in_, d_out_, ConstView());
    if (n == 0) return;
    const bool drop = config_.dropout > 0.0;
    const float p = static_cast<float>(config_.dropout);
    const double s = cached_weight_ * scale_;

    // g = dL_dy B                        (N x r) = (N x d_out)(d_out x r)
    ensure_shape(g_, n, config_.r);
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::N, 1.0, dL_dy, B_compute(), 0.0, g_.view());

    if (grad_mode != GradMode::ignore) {
      const double beta = grad_mode == GradMode::accumulate ? 1.0 : 0.0;
      Backend::template gemm<T, Param>(*ctx_, Op::T, Op::N, s, dL_dy, cview(xa_), beta, dL_dB_.view());
      ConstView lora_in = x;
      if (drop) {
        ensure_shape(dropped_x_, n, d_in_);
        Backend::dropout(*ctx_, x, dropped_x_.view(), p, config_.seed, stream_, cache_call_);
        lora_in = dropped_x_.view();
      }
      Backend::template gemm<T, Param>(*ctx_, Op::T, Op::N, s, cview(g_), lora_in, beta, dL_dA_.view());
    }

    if (dL_dx.empty()) return;
    if (!drop) {
      // dL_dx += s g A                   (N x d_in) = (N x r)(r x d_in)
      Backend::template gemm<T, T>(*ctx_, Op::N, Op::N, s, cview(g_), A_compute(), 1.0, dL_dx);
    } else {
      ensure_shape(dropped_x_, n, d_in_);
      auto lora_dx = dropped_x_.view();
      Backend::template gemm<T, T>(*ctx_, Op::N, Op::N, s, cview(g_), A_compute(), 0.0, lora_dx);
      Backend::dropout(*ctx_, ConstView(lora_dx), lora_dx, p, config_.seed, stream_, cache_call_);
      Backend::add_scaled(*ctx_, 1.0, ConstView(lora_dx), dL_dx);
    }
  }

  // W <- W + s B A (W^T <- W^T + s (B A)^T with fan_in_fan_out): afterwards the
  // layer costs one GEMM. B A is formed in the parameter type and added once.
  void merge() {
    LORA_CHECK(!merged_, "Linear::merge: the adapter is already merged");
    add_delta_to_W(+1.0);
    merged_ = true;
  }
  // W <- W - s B A: restores W up to rounding.
  void unmerge() {
    LORA_CHECK(merged_, "Linear::unmerge: the adapter is not merged");
    add_delta_to_W(-1.0);
    merged_ = false;
  }
  bool merged() const { return merged_; }

  // The trainable tensors, for the optimizer (LoRA+ puts B in its own group).
  Parameter<Param, Space> lora_A() { return {A_.view(), dL_dA_.view(), "lora_A", storage_.watch()}; }
  Parameter<Param, Space> lora_B() { return {B_.view(), dL_dB_.view(), "lora_B", storage_.watch()}; }
  std::vector<Parameter<Param, Space>> parameters() { return {lora_A(), lora_B()}; }

  ConstParamView A() const { return A_.view(); }
  ConstParamView B() const { return B_.view(); }
  ConstParamView dL_dA() const { return dL_dA_.view(); }
  ConstParamView dL_dB() const { return dL_dB_.view(); }
  ConstView W() const { return W_; }
  ConstView bias() const { return bias_; }

  std::int64_t d_in() const { return d_in_; }
  std::int64_t d_out() const { return d_out_; }
  int rank() const { return config_.r; }
  double scale() const { return scale_; }
  const Config& config() const { return config_; }
  std::uint32_t stream() const { return stream_; }
  Context& context() const { return *ctx_; }

  // r (d_in + d_out): the elements of A and B.
  std::int64_t trainable_parameters() const { return config_.r * (d_in_ + d_out_); }
  // d_out d_in (+ d_out with a bias): what full fine-tuning would train.
  std::int64_t frozen_parameters() const { return d_in_ * d_out_ + (bias_.empty() ? 0 : d_out_); }

  // The number of Mode::train forwards so far: the position of the dropout
  // RNG, saved in checkpoints so a resumed run draws the same masks.
  std::uint32_t dropout_calls() const { return dropout_calls_; }
  void set_dropout_calls(std::uint32_t calls) { dropout_calls_ = calls; }

  MemoryReport memory() const {
    MemoryReport report;
    report.frozen_bytes = static_cast<std::size_t>(frozen_parameters()) * sizeof(T);
    report.parameter_bytes = A_.bytes() + B_.bytes() + A_compute_.bytes() + B_compute_.bytes();
    report.gradient_bytes = dL_dA_.bytes() + dL_dB_.bytes();
    report.activation_bytes = has_cache_ ? xa_.bytes() : 0;
    report.workspace_bytes = dropped_x_.bytes() + g_.bytes() + (has_cache_ ? 0 : xa_.bytes());
    return report;
  }

 private:
  static constexpr bool kMixedPrecision = !std::is_same_v<T, Param>;

  template <class U>
  static MatrixView<const U, Space> cview(const Matrix<U>& m) {
    return m.view();
  }
  ConstView cview_W() const { return W_; }

  template <class U>
  static void ensure_shape(Matrix<U>& m, std::int64_t rows, std::int64_t cols) {
    if (m.rows() != rows || m.cols() != cols) m = Matrix<U>(rows, cols);
  }

  // With 16-bit activations, the GEMMs read T copies of the fp32 masters.
  void refresh_compute_copies() {
    if constexpr (kMixedPrecision) {
      Backend::convert(*ctx_, cview(A_), A_compute_.view());
      Backend::convert(*ctx_, cview(B_), B_compute_.view());
    }
  }
  ConstView A_compute() const {
    if constexpr (kMixedPrecision) {
      return A_compute_.view();
    } else {
      return A_.view();
    }
  }
  ConstView B_compute() const {
    if constexpr (kMixedPrecision) {
      return B_compute_.view();
    } else {
      return B_.view();
    }
  }

  void add_delta_to_W(double sign) {
    // delta = s B A (d_out x d_in), or s A^T B^T (d_in x d_out) for a transposed base.
    Matrix<Param> delta(W_.rows, W_.cols);
    if (config_.fan_in_fan_out) {
      Backend::template gemm<Param, Param>(*ctx_, Op::T, Op::T, scale_, cview(A_), cview(B_), 0.0, delta.view());
    } else {
      Backend::template gemm<Param, Param>(*ctx_, Op::N, Op::N, scale_, cview(B_), cview(A_), 0.0, delta.view());
    }
    Backend::add_scaled(*ctx_, sign, cview(delta), W_);
    has_cache_ = false;
  }

  Context* ctx_;
  View W_;
  ConstView bias_;
  Config config_;
  std::uint32_t stream_;
  std::int64_t d_in_ = 0;
  std::int64_t d_out_ = 0;
  double scale_ = 0.0;

  Matrix<Param> A_, B_, dL_dA_, dL_dB_;  // masters and gradients
  StorageToken storage_;                 // ends when the four above are freed (see core/parameter.hpp)
  Matrix<T> A_compute_, B_compute_;      // 16-bit copies for the GEMMs (mixed precision only)
  Matrix<T> xa_;                         // drop(x) A^T, cached by a Mode::train forward
  Matrix<T> dropped_x_, g_;              // workspaces: drop(x) (only with dropout), dL_dy B

  bool merged_ = false;
  bool has_cache_ = false;
  std::int64_t cached_rows_ = 0;
  double cached_weight_ = 1.0;  // the weight of the cached forward_lora
  std::uint32_t dropout_calls_ = 0;
  std::uint32_t cache_call_ = 0;
};

}  // namespace lora

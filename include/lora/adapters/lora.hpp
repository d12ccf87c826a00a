// lora::LoraAdapter: the trainable low-rank update of one frozen base,
//
//   y += w s (drop(x) A^T) B^T        x: N x d_in, A: r x d_in, B: d_out x r, y: N x d_out
//
// with s = alpha / r (alpha / sqrt(r) with rsLoRA) and w a weight the caller
// chooses (1 for a single adapter; PEFT's weighted adapters otherwise). The
// adapter owns A, B and their gradients; it never sees W: a base (base/) computes
// x W^T + bias into y first, and the adapter adds its path on top.
//
// What backward needs from forward (xa = drop(x) A^T and the dropout position)
// goes into a ForwardState the caller holds, as tiny-cuda-nn's forward returns
// a context for backward. So:
//   - inference() is const and keeps nothing: many threads may run it on one adapter;
//   - two forwards before their backwards work (a tied layer, recomputation):
//     each has its own state, and GradMode::accumulate sums the gradients.
// Every view is checked before anything is written, and an output never shares
// memory with an input.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora/base/dense.hpp"
#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/parameter.hpp"
#include "lora/core/random.hpp"

namespace lora {

template <class T, class Backend>
class LoraAdapter {
  static_assert(is_backend_v<Backend>, "LoraAdapter<T, Backend>: Backend does not satisfy the Backend interface");

 public:
  using Param = param_t<T>;  // type of A, B and their gradients
  using backend_type = Backend;
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  template <class U>
  using Matrix = typename Backend::template Matrix<U>;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;
  using ParamView = MatrixView<Param, Space>;
  using ConstParamView = MatrixView<const Param, Space>;

  // What a training forward leaves for its backward. Held by the caller; reuse
  // one across steps to keep its buffer (forward resizes it only when N changes).
  class ForwardState {
   public:
    bool valid() const { return adapter_ != 0; }
    std::int64_t rows() const { return rows_; }
    double weight() const { return weight_; }
    std::uint32_t dropout_call() const { return dropout_call_; }
    // Bytes kept for backward: xa, N x r.
    std::size_t bytes() const { return xa_.bytes() + A_.bytes() + B_.bytes(); }
    // Forgets the forward (backward refuses the state); keeps the buffer.
    void clear() { adapter_ = 0; }

   private:
    friend class LoraAdapter;
    Matrix<T> xa_;                   // drop(x) A^T
    Matrix<T> A_, B_;                // inference's 16-bit copies of A and B (mixed precision only)
    std::uint64_t adapter_ = 0;      // id of the adapter that wrote it; 0: empty
    std::int64_t rows_ = 0;
    double weight_ = 1.0;
    std::uint32_t dropout_call_ = 0;
  };

  // An adapter for a d_out x d_in base: A from config.init (a pure function of
  // config.seed and stream), B = 0 (a fresh adapter changes nothing). `stream`
  // tells adapters that share a seed apart.
  LoraAdapter(Context& ctx, std::int64_t d_in, std::int64_t d_out, const Config& config, std::uint32_t stream = 0)
      : ctx_(&ctx), config_(config), stream_(stream), d_in_(d_in), d_out_(d_out), id_(next_id()) {
    config_.validate(d_in, d_out);
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
  // An adapter shaped for `base` (any frozen base: base/dense.hpp).
  template <class Base, class = std::enable_if_t<is_frozen_base_v<Base>>>
  LoraAdapter(const Base& base, const Config& config, std::uint32_t stream = 0)
      : LoraAdapter(base.context(), base.d_in(), base.d_out(), config, stream) {}

  LoraAdapter(LoraAdapter&&) noexcept = default;
  LoraAdapter& operator=(LoraAdapter&&) noexcept = default;
  LoraAdapter(const LoraAdapter&) = delete;
  LoraAdapter& operator=(const LoraAdapter&) = delete;

  // A from config.init, B = 0, gradients 0. With Init::pissa or Init::olora,
  // A and B go back to the initial values the decomposition of W gave
  // (set_initial; adapters/init.hpp), W being left as it is: the layer then
  // computes the original W again (PEFT never re-runs these inits). Before
  // set_initial (an adapter built alone, without its base) both are 0.
  void reset_parameters() {
    if (init_writes_base(config_.init)) {
      if (initial_A_.empty()) {
        Backend::fill(*ctx_, A_.view(), Param(0));
        Backend::fill(*ctx_, B_.view(), Param(0));
      } else {
        Backend::copy_from_host(*ctx_, initial_A(), A_.view());
        Backend::copy_from_host(*ctx_, initial_B(), B_.view());
      }
      zero_grad();
      return;
    }
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
    zero_grad();
  }
  void zero_grad() {
    Backend::fill(*ctx_, dL_dA_.view(), Param(0));
    Backend::fill(*ctx_, dL_dB_.view(), Param(0));
  }

  // ---- forward and backward ----------------------------------------------------

  // Training: y += w s (drop(x) A^T) B^T, dropout with p = config.dropout at
  // the next position of this adapter's dropout stream; `state` receives what
  // backward needs.
  void forward(ConstView x, View y, ForwardState& state, double weight = 1.0) {
    detail::check_forward_args("LoraAdapter::forward", x, y, d_in_, d_out_);
    check_weight(weight, "LoraAdapter::forward");
    const std::int64_t n = x.rows;
    state.adapter_ = 0;
    ensure_shape(state.xa_, n, config_.r);
    state.dropout_call_ = dropout_calls_++;
    state.rows_ = n;
    state.weight_ = weight;
    state.adapter_ = id_;
    if (n == 0) return;
    refresh_compute_copies();
    ConstView lora_in = x;
    if (config_.dropout > 0.0) {
      ensure_shape(dropped_x_, n, d_in_);
      Backend::dropout(*ctx_, x, dropped_x_.view(), static_cast<float>(config_.dropout), config_.seed, stream_,
                       state.dropout_call_);
      lora_in = dropped_x_.view();
    }
    // xa = drop(x) A^T                  (N x r) = (N x d_in)(d_in x r)
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, 1.0, lora_in, A_compute(), 0.0, state.xa_.view());
    // y += w s xa B^T                   (N x d_out) = (N x r)(r x d_out)
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, weight * scale_, ConstView(state.xa_.view()), B_compute(), 1.0,
                                 y);
  }
  ForwardState forward(ConstView x, View y, double weight = 1.0) {
    ForwardState state;
    forward(x, y, state, weight);
    return state;
  }

  // Inference: y += w s (x A^T) B^T, no dropout, nothing kept. Const: safe
  // from many threads on one adapter. Each call allocates its own workspace
  // (N x r, and 16-bit copies of A and B with mixed precision); pass one to
  // reuse it across calls (one per thread; on a GPU this saves an allocation
  // and a free per call).
  void inference(ConstView x, View y, double weight = 1.0) const {
    ForwardState workspace;
    inference(x, y, workspace, weight);
  }
  void inference(ConstView x, View y, ForwardState& workspace, double weight) const {
    detail::check_forward_args("LoraAdapter::inference", x, y, d_in_, d_out_);
    check_weight(weight, "LoraAdapter::inference");
    workspace.adapter_ = 0;  // not a training state
    const std::int64_t n = x.rows;
    if (n == 0) return;
    ensure_shape(workspace.xa_, n, config_.r);
    if constexpr (kMixedPrecision) {
      // The 16-bit copies of the members belong to training; this call converts its own.
      ensure_shape(workspace.A_, config_.r, d_in_);
      ensure_shape(workspace.B_, d_out_, config_.r);
      Backend::convert(*ctx_, ConstParamView(A_.view()), workspace.A_.view());
      Backend::convert(*ctx_, ConstParamView(B_.view()), workspace.B_.view());
      add_path(x, ConstView(workspace.A_.view()), ConstView(workspace.B_.view()), workspace.xa_.view(), y, weight);
    } else {
      add_path(x, ConstView(A_.view()), ConstView(B_.view()), workspace.xa_.view(), y, weight);
    }
  }

  // Given dL_dy (N x d_out), the x of the forward that filled `state`:
  //   dL_dx += w s ((dL_dy B) A) o mask / (1 - p)       (skipped when dL_dx is empty)
  //   dL_dB  = w s dL_dy^T xa,  dL_dA = w s (dL_dy B)^T drop(x)
  // grad_mode overwrites, accumulates into (two forwards of a tied layer: sum)
  // or skips dL_dA and dL_dB. The dropout mask is regenerated, not stored.
  void backward(const ForwardState& state, ConstView x, ConstView dL_dy, View dL_dx,
                GradMode grad_mode = GradMode::overwrite) {
    LORA_CHECK(state.adapter_ == id_, "LoraAdapter::backward: "
                                          << (state.adapter_ == 0 ? "the state holds no training forward"
                                                                  : "the state was filled by another adapter")
                                          << "; pass the state of this adapter's forward(x, y, state)");
    detail::check_backward_args("LoraAdapter::backward", x, dL_dy, dL_dx, state.rows_, d_in_, d_out_);
    const std::int64_t n = x.rows;
    if (n == 0) {
      if (grad_mode == GradMode::overwrite) zero_grad();
      return;
    }
    const bool drop = config_.dropout > 0.0;
    const float p = static_cast<float>(config_.dropout);
    const double s = state.weight_ * scale_;

    // g = dL_dy B                        (N x r) = (N x d_out)(d_out x r)
    ensure_shape(g_, n, config_.r);
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::N, 1.0, dL_dy, B_compute(), 0.0, g_.view());

    if (grad_mode != GradMode::ignore) {
      const double beta = grad_mode == GradMode::accumulate ? 1.0 : 0.0;
      Backend::template gemm<T, Param>(*ctx_, Op::T, Op::N, s, dL_dy, ConstView(state.xa_.view()), beta,
                                       dL_dB_.view());
      ConstView lora_in = x;
      if (drop) {
        ensure_shape(dropped_x_, n, d_in_);
        Backend::dropout(*ctx_, x, dropped_x_.view(), p, config_.seed, stream_, state.dropout_call_);
        lora_in = dropped_x_.view();
      }
      Backend::template gemm<T, Param>(*ctx_, Op::T, Op::N, s, ConstView(g_.view()), lora_in, beta, dL_dA_.view());
    }

    if (dL_dx.empty()) return;
    if (!drop) {
      // dL_dx += s g A                   (N x d_in) = (N x r)(r x d_in)
      Backend::template gemm<T, T>(*ctx_, Op::N, Op::N, s, ConstView(g_.view()), A_compute(), 1.0, dL_dx);
    } else {
      ensure_shape(dropped_x_, n, d_in_);
      auto lora_dx = dropped_x_.view();
      Backend::template gemm<T, T>(*ctx_, Op::N, Op::N, s, ConstView(g_.view()), A_compute(), 0.0, lora_dx);
      Backend::dropout(*ctx_, ConstView(lora_dx), lora_dx, p, config_.seed, stream_, state.dropout_call_);
      Backend::add_scaled(*ctx_, 1.0, ConstView(lora_dx), dL_dx);
    }
  }

  // ---- PiSSA / OLoRA: the values A and B started from -------------------------

  // A = A0, B = B0 (r x d_in, d_out x r, host), and a host copy of both kept
  // as the adapter's initial values: reset_parameters() returns to them, and
  // the conversion to an ordinary LoRA for the original W needs them
  // (io/init_conversion.hpp). lora::init_from_weight (adapters/init.hpp)
  // calls this when it writes the residual into the base; only Init::pissa
  // and Init::olora adapters hold initial values.
  void set_initial(MatrixView<const Param, HostSpace> A0, MatrixView<const Param, HostSpace> B0) {
    LORA_CHECK(init_writes_base(config_.init), "LoraAdapter::set_initial: Config.init = " << to_string(config_.init)
                                                   << "; only pissa and olora adapters start from values of W");
    check_shape(A0, config_.r, d_in_, "A0", "LoraAdapter::set_initial");
    check_shape(B0, d_out_, config_.r, "B0", "LoraAdapter::set_initial");
    std::vector<Param> a(static_cast<std::size_t>(A0.size())), b(static_cast<std::size_t>(B0.size()));
    for (std::int64_t i = 0; i < A0.rows; ++i)
      for (std::int64_t j = 0; j < A0.cols; ++j) a[static_cast<std::size_t>(i * A0.cols + j)] = A0(i, j);
    for (std::int64_t i = 0; i < B0.rows; ++i)
      for (std::int64_t j = 0; j < B0.cols; ++j) b[static_cast<std::size_t>(i * B0.cols + j)] = B0(i, j);
    initial_A_ = std::move(a);
    initial_B_ = std::move(b);
    reset_parameters();
  }
  bool has_initial() const { return !initial_A_.empty(); }
  // A0 (r x d_in) and B0 (d_out x r) on the host; empty views without initial values.
  MatrixView<const Param, HostSpace> initial_A() const {
    return has_initial() ? MatrixView<const Param, HostSpace>(initial_A_.data(), config_.r, d_in_)
                         : MatrixView<const Param, HostSpace>();
  }
  MatrixView<const Param, HostSpace> initial_B() const {
    return has_initial() ? MatrixView<const Param, HostSpace>(initial_B_.data(), d_out_, config_.r)
                         : MatrixView<const Param, HostSpace>();
  }

  // W <- W + sign s B A on `base` (merging: sign +1; unmerging: -1). The caller
  // (Linear, AdapterSet) keeps track of which adapter is merged.
  template <class Base>
  void add_to(Base& base, double sign) const {
    LORA_CHECK(base.d_in() == d_in_ && base.d_out() == d_out_,
               "LoraAdapter: a " << d_out_ << " x " << d_in_ << " adapter cannot merge into a " << base.d_out() << " x "
                                 << base.d_in() << " base");
    base.add_delta(sign * scale_, ConstParamView(B_.view()), ConstParamView(A_.view()));
  }

  // ---- the trainable tensors ---------------------------------------------------

  // For the optimizer (LoRA+ puts B in its own group).
  Parameter<Param, Space> lora_A() { return {A_.view(), dL_dA_.view(), "lora_A", storage_.watch()}; }
  Parameter<Param, Space> lora_B() { return {B_.view(), dL_dB_.view(), "lora_B", storage_.watch()}; }
  std::vector<Parameter<Param, Space>> parameters() { return {lora_A(), lora_B()}; }

  ConstParamView A() const { return A_.view(); }
  ConstParamView B() const { return B_.view(); }
  ConstParamView dL_dA() const { return dL_dA_.view(); }
  ConstParamView dL_dB() const { return dL_dB_.view(); }

  std::int64_t d_in() const { return d_in_; }
  std::int64_t d_out() const { return d_out_; }
  int rank() const { return config_.r; }
  double scale() const { return scale_; }
  const Config& config() const { return config_; }
  std::uint32_t stream() const { return stream_; }
  Context& context() const { return *ctx_; }

  // r (d_in + d_out): the elements of A and B.
  std::int64_t trainable_parameters() const { return config_.r * (d_in_ + d_out_); }

  // The number of training forwards so far: the position of the dropout RNG,
  // saved in checkpoints so a resumed run draws the same masks.
  std::uint32_t dropout_calls() const { return dropout_calls_; }
  void set_dropout_calls(std::uint32_t calls) { dropout_calls_ = calls; }

  // Parameters (with the 16-bit compute copies), gradients and workspaces;
  // a ForwardState's bytes are the caller's (ForwardState::bytes()). A
  // PiSSA / OLoRA adapter's host copies of A0 and B0 count as frozen bytes.
  MemoryReport memory() const {
    MemoryReport report;
    report.frozen_bytes = (initial_A_.size() + initial_B_.size()) * sizeof(Param);
    report.parameter_bytes = A_.bytes() + B_.bytes() + A_compute_.bytes() + B_compute_.bytes();
    report.gradient_bytes = dL_dA_.bytes() + dL_dB_.bytes();
    report.workspace_bytes = dropped_x_.bytes() + g_.bytes();
    return report;
  }

 private:
  static constexpr bool kMixedPrecision = !std::is_same_v<T, Param>;

  static std::uint64_t next_id() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }
  static void check_weight(double weight, const char* call) {
    LORA_CHECK(std::isfinite(weight), call << ": weight = " << weight << ", expected a finite value");
  }
  template <class U>
  static void ensure_shape(Matrix<U>& m, std::int64_t rows, std::int64_t cols) {
    if (m.rows() != rows || m.cols() != cols) m = Matrix<U>(rows, cols);
  }

  // y += w s (x A^T) B^T through the workspace xa (N x r).
  void add_path(ConstView x, ConstView A, ConstView B, View xa, View y, double weight) const {
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, 1.0, x, A, 0.0, xa);
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, weight * scale_, ConstView(xa), B, 1.0, y);
  }

  // With 16-bit activations, the training GEMMs read T copies of the fp32 masters.
  void refresh_compute_copies() {
    if constexpr (kMixedPrecision) {
      Backend::convert(*ctx_, ConstParamView(A_.view()), A_compute_.view());
      Backend::convert(*ctx_, ConstParamView(B_.view()), B_compute_.view());
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

  Context* ctx_;
  Config config_;
  std::uint32_t stream_;
  std::int64_t d_in_ = 0;
  std::int64_t d_out_ = 0;
  double scale_ = 0.0;
  std::uint64_t id_;  // tells ForwardStates apart; moves with the adapter

  Matrix<Param> A_, B_, dL_dA_, dL_dB_;  // masters and gradients
  StorageToken storage_;                 // ends when the four above are freed (see core/parameter.hpp)
  Matrix<T> A_compute_, B_compute_;      // 16-bit copies for the training GEMMs (mixed precision only)
  Matrix<T> dropped_x_, g_;              // workspaces: drop(x) (only with dropout), dL_dy B
  std::vector<Param> initial_A_, initial_B_;  // PiSSA / OLoRA: A0, B0 on the host (set_initial); else empty
  std::uint32_t dropout_calls_ = 0;
};

}  // namespace lora

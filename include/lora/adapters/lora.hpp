// lora::LoraAdapter: the trainable low-rank update of one frozen base,
//
//   y += w s (drop(x) A^T) B^T        x: N x d_in, A: r x d_in, B: d_out x r, y: N x d_out
//
// with s = alpha / r (alpha / sqrt(r) with rsLoRA) and w a weight the caller
// chooses (1 for a single adapter; PEFT's weighted adapters otherwise). The
// adapter owns A, B and their gradients; it never reads W itself: a base
// (base/) computes x W^T + bias into y first, and the adapter adds its path on
// top (DoRA, below, asks the base for W A^T and ||W_i||^2).
//
// What backward needs from forward (xa = drop(x) A^T and the dropout position)
// goes into a ForwardState the caller holds, as tiny-cuda-nn's forward returns
// a context for backward. So:
//   - inference() is const and keeps nothing: many threads may run it on one adapter;
//   - two forwards before their backwards work (a tied layer, recomputation):
//     each has its own state, and GradMode::accumulate sums the gradients.
// Every view is checked before anything is written, and an output never shares
// memory with an input.
//
// DoRA (config.use_dora; Liu et al., 2024, PEFT's use_dora) adds a trainable
// magnitude m (1 x d_out, "lora_magnitude_vector", initialised to the row
// norms ||W[i, :]||) and rescales every output of W + s B A to length m_i:
//
//   y = x W^T + bias + w [(c - 1) o (x W^T) + c o s (drop(x) A^T) B^T],   c = m / n,  n = ||W + s B A||
//
// o scales column j of an N x d_out matrix by c_j; n holds the row norms of
// the d_out x d_in weight W + s B A (for W stored d_in x d_out, fan_in_fan_out,
// the norms of its columns). n is a constant in backward (detached, as in
// the DoRA paper, section 4.3, and PEFT). With w = 1 this is
// y = c o (x W^T + s xa B^T) + bias. With several weighted adapters (AdapterSet),
// each adds its own w_k [...] on the same x W^T. The base term uses x, not
// drop(x): PEFT's training forward with dropout recomputes drop(x) W^T for it
// (one more full GEMM); this library does not.
//
// Exact form used for n, never forming W + s B A (d_out x d_in) per step:
//   n_i^2 = ||W_i||^2 + s sum_k B_ik (2 W A^T + s B (A A^T))_ik
// ||W_i||^2 is cached when the magnitude is initialised (W is frozen); W A^T
// (d_out x r) comes from the base (Base::weight_matmul, so an NF4 base works:
// QDoRA), A A^T is r x r, the rest d_out x r. Costs per forward: one
// d_out x d_in x r product and O(d_out r^2), against the base's N x d_in x d_out.
// The caller passes x W^T (the base's product without bias: Base::matmul),
// which the forward rescales and backward reads again for dL/dm, so a DoRA
// adapter needs no extra full-size GEMM. Backward, with c constant:
//   dL/dx += w s ((dL_dy B') A) o mask,  B' = diag(c) B      (the base path
//            (dL_dy o C) W, C = 1 + sum_k w_k (c_k - 1), is the caller's: one
//            base backward for all adapters; see base_backward)
//   dL/dB  = diag(c) G,  G = w s dL_dy^T xa     dL/dA = w s (dL_dy B')^T drop(x)
//   dL/dm_j = (1 / n_j) [w sum_i dL_dy_ij (x W^T)_ij + sum_k B_jk G_jk]
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <tuple>
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
    // Bytes kept for backward: xa (N x r); with dropout the mask, 1 bit per
    // element of x; DoRA's d_out x r and 1 x d_out scales (the caller keeps
    // x W^T, N x d_out).
    std::size_t bytes() const {
      return xa_.bytes() + mask_.bytes() + A_.bytes() + B_.bytes() + WAt_.bytes() + Z_.bytes() + AAt_.bytes() +
             cross_.bytes() + c_.bytes() + inv_n_.bytes() + base_scale_.bytes() + Bc_.bytes() + Bc_compute_.bytes();
    }
    // Forgets the forward (backward refuses the state); keeps the buffer.
    void clear() { adapter_ = 0; }
    // DoRA: w (c - 1), the scale of the base term (1 x d_out); empty for LoRA.
    ConstParamView base_scale() const { return dora_ ? base_scale_.view() : ConstParamView(); }

   private:
    friend class LoraAdapter;
    Matrix<T> xa_;                   // drop(x) A^T
    Matrix<std::uint32_t> mask_;     // the dropout's keep bits (N x dropout_mask_words(d_in)); empty without dropout
    Matrix<T> A_, B_;                // inference's 16-bit copies of A and B (mixed precision only)
    // DoRA: n, c = m / n and what they are formed from (see the file's comment)
    Matrix<T> WAt_;                  // W A^T through the base (mixed precision only; else in Z_)
    Matrix<Param> Z_;                // 2 W A^T + s B (A A^T)            d_out x r
    Matrix<Param> AAt_;              // A A^T                            r x r
    Matrix<Param> cross_;            // sum_k B_ik Z_ik                  1 x d_out
    Matrix<Param> c_, inv_n_;        // m / n, 1 / n                     1 x d_out
    Matrix<Param> base_scale_;       // w (c - 1), the base term's scale 1 x d_out
    Matrix<Param> Bc_;               // B' = diag(c) B                   d_out x r
    Matrix<T> Bc_compute_;           // B' in T (mixed precision only)
    std::uint64_t adapter_ = 0;      // id of the adapter that wrote it; 0: empty
    std::int64_t rows_ = 0;
    double weight_ = 1.0;
    std::uint32_t dropout_call_ = 0;
    bool dora_ = false;              // filled by a DoRA adapter's forward
  };

  // An adapter for a d_out x d_in base: A from config.init (a pure function of
  // config.seed and stream), B = 0 (a fresh adapter changes nothing). `stream`
  // tells adapters that share a seed apart.
  // A DoRA adapter (config.use_dora) needs its base: the form below.
  LoraAdapter(Context& ctx, std::int64_t d_in, std::int64_t d_out, const Config& config, std::uint32_t stream = 0)
      : LoraAdapter(Shape{}, ctx, d_in, d_out, config, stream) {
    reset_parameters();
  }
  // An adapter shaped for `base` (any frozen base: base/dense.hpp); with
  // config.use_dora, its magnitude starts at the row norms of the base's W.
  template <class Base, class = std::enable_if_t<is_frozen_base_v<Base>>>
  LoraAdapter(const Base& base, const Config& config, std::uint32_t stream = 0)
      : LoraAdapter(Shape{}, base.context(), base.d_in(), base.d_out(), config, stream) {
    reset_parameters(base);
  }

  LoraAdapter(LoraAdapter&&) noexcept = default;
  LoraAdapter& operator=(LoraAdapter&&) noexcept = default;
  LoraAdapter(const LoraAdapter&) = delete;
  LoraAdapter& operator=(const LoraAdapter&) = delete;

  // A from config.init, B = 0, gradients 0. With Init::pissa or Init::olora,
  // A and B go back to the initial values the decomposition of W gave
  // (set_initial; adapters/init.hpp), W being left as it is: the layer then
  // computes the original W again (PEFT never re-runs these inits). Before
  // set_initial (an adapter built alone, without its base) both are 0.
  // A DoRA adapter's magnitude needs the base: reset_parameters(base).
  void reset_parameters() {
    LORA_CHECK(!config_.use_dora, "LoraAdapter::reset_parameters(): a DoRA adapter (Config.use_dora) re-initialises "
                                  "its magnitude from W; call reset_parameters(base)");
    reset_lora();
  }
  // The same, and with DoRA m = ||W[i, :]|| per output (and ||W[i, :]||^2
  // cached for the norms of W + s B A); `base` must be the base this adapter
  // runs on (W is frozen, so the cache stays valid).
  template <class Base>
  void reset_parameters(const Base& base) {
    check_base(base, "LoraAdapter::reset_parameters");
    reset_lora();
    if (!config_.use_dora) return;
    base.row_norms_squared(w_sq_.view());
    std::vector<Param> norms(static_cast<std::size_t>(d_out_));
    Backend::copy_to_host(*ctx_, ConstParamView(w_sq_.view()), MatrixView<Param, HostSpace>(norms.data(), 1, d_out_));
    for (Param& v : norms) v = static_cast<Param>(std::sqrt(static_cast<double>(v)));
    Backend::copy_from_host(*ctx_, MatrixView<const Param, HostSpace>(norms.data(), 1, d_out_), m_.view());
  }

 private:
  struct Shape {};
  LoraAdapter(Shape, Context& ctx, std::int64_t d_in, std::int64_t d_out, const Config& config, std::uint32_t stream)
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
    if (config_.use_dora) {
      m_ = Matrix<Param>(1, d_out_);
      dL_dm_ = Matrix<Param>(1, d_out_);
      w_sq_ = Matrix<Param>(1, d_out_);
    }
  }
  void reset_lora() {
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

 public:
  void zero_grad() {
    Backend::fill(*ctx_, dL_dA_.view(), Param(0));
    Backend::fill(*ctx_, dL_dB_.view(), Param(0));
    if (config_.use_dora) Backend::fill(*ctx_, dL_dm_.view(), Param(0));
  }

  // ---- forward and backward ----------------------------------------------------

  // Training: y += w s (drop(x) A^T) B^T, dropout with p = config.dropout at
  // the next position of this adapter's dropout stream; `state` receives what
  // backward needs. OutputMode::overwrite writes y = w s (drop(x) A^T) B^T
  // instead (a layer then lets its frozen GEMM accumulate onto it).
  void forward(ConstView x, View y, ForwardState& state, double weight = 1.0,
               OutputMode out = OutputMode::accumulate) {
    refuse_dora("forward(x, y, state)", "forward(base, x, xWt, y, state)");
    forward_impl(static_cast<const NoBase*>(nullptr), x, ConstView(), y, state, weight, out);
  }
  // Either kind: as above for LoRA (base and xWt unused); with DoRA,
  //   y += w [(c - 1) o xWt + c o s (drop(x) A^T) B^T],   c = m / ||W + s B A||
  // where xWt = x W^T (N x d_out, the base's product without bias, which must
  // not share memory with y) and `base` is the adapter's base (for W A^T).
  // backward needs the same xWt again. DoRA adds to the base's output, so it
  // refuses OutputMode::overwrite.
  template <class Base>
  void forward(const Base& base, ConstView x, ConstView xWt, View y, ForwardState& state, double weight = 1.0,
               OutputMode out = OutputMode::accumulate) {
    check_base(base, "LoraAdapter::forward");
    forward_impl(&base, x, xWt, y, state, weight, out);
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
  void inference(ConstView x, View y, ForwardState& workspace, double weight,
                 OutputMode out = OutputMode::accumulate) const {
    refuse_dora("inference(x, y)", "inference(base, x, xWt, y, workspace, weight)");
    inference_impl(static_cast<const NoBase*>(nullptr), x, ConstView(), y, workspace, weight, out);
  }
  // Either kind, as forward(base, x, xWt, y, state, weight, out) without dropout.
  template <class Base>
  void inference(const Base& base, ConstView x, ConstView xWt, View y, ForwardState& workspace, double weight,
                 OutputMode out = OutputMode::accumulate) const {
    check_base(base, "LoraAdapter::inference");
    inference_impl(&base, x, xWt, y, workspace, weight, out);
  }

  // Given dL_dy (N x d_out), the x of the forward that filled `state`:
  //   dL_dx += w s ((dL_dy B) A) o mask / (1 - p)       (skipped when dL_dx is empty)
  //   dL_dB  = w s dL_dy^T xa,  dL_dA = w s (dL_dy B)^T drop(x)
  // grad_mode overwrites, accumulates into (two forwards of a tied layer: sum)
  // or skips dL_dA and dL_dB; dx_mode = OutputMode::overwrite writes dL_dx =
  // instead of +=. The dropout mask is the forward's, kept in `state` as bits.
  void backward(const ForwardState& state, ConstView x, ConstView dL_dy, View dL_dx,
                GradMode grad_mode = GradMode::overwrite, OutputMode dx_mode = OutputMode::accumulate) {
    refuse_dora("backward(state, x, dL_dy, dL_dx)", "backward(state, x, xWt, dL_dy, dL_dx)");
    backward(state, x, ConstView(), dL_dy, dL_dx, grad_mode, dx_mode);
  }
  // Either kind; with DoRA (xWt: the forward's x W^T), B is B' = diag(c) B
  // above and
  //   dL_dB  = diag(c) w s dL_dy^T xa
  //   dL_dm_j = (1 / n_j) [w sum_i dL_dy_ij xWt_ij + sum_k B_jk (w s dL_dy^T xa)_jk]
  // The base path's share of dL_dx, (dL_dy o C) W, is the caller's (base_backward).
  void backward(const ForwardState& state, ConstView x, ConstView xWt, ConstView dL_dy, View dL_dx,
                GradMode grad_mode = GradMode::overwrite, OutputMode dx_mode = OutputMode::accumulate) {
    LORA_CHECK(state.adapter_ == id_, "LoraAdapter::backward: "
                                          << (state.adapter_ == 0 ? "the state holds no training forward"
                                                                  : "the state was filled by another adapter")
                                          << "; pass the state of this adapter's forward(x, y, state)");
    detail::check_backward_args("LoraAdapter::backward", x, dL_dy, dL_dx, state.rows_, d_in_, d_out_);
    if (config_.use_dora) check_shape(xWt, x.rows, d_out_, "xWt (x W^T, as in forward)", "LoraAdapter::backward");
    backward_impl(std::vector<ConstSegment>{{this, &state, x, dL_dx, dx_mode, dL_dy}}, grad_mode, xWt, dropout_block_);
  }

  // ---- many adapters, each on its own rows (a mixed batch) ---------------------

  // One adapter's share of a mixed batch: its rows x (N_k x d_in), out (its
  // rows of y in forward; of dL_dx in backward, or empty) written or
  // accumulated into (mode), in backward its rows of dL_dy, and in forward
  // its weight w (backward reads it from the state).
  // Forward fills its segments' states; backward reads them (ConstSegment).
  template <class State>
  struct BasicSegment {
    LoraAdapter* adapter;
    State* state;
    ConstView x;
    View out;
    OutputMode mode;
    ConstView dL_dy = {};
    double weight = 1.0;
  };
  using Segment = BasicSegment<ForwardState>;
  using ConstSegment = BasicSegment<const ForwardState>;

  // forward(x_k, y_k, state_k, w_k, mode_k) for every segment when `train`,
  // else inference(x_k, y_k, state_k, w_k, mode_k) (the states as
  // workspaces), with each product kind one Backend::gemm_grouped call over
  // all segments (one cuBLAS launch on the GPU; S-LoRA's and Punica's
  // segmented GEMMs):  xa_k = drop_k(x_k) A_k^T,  then  y_k (+)= w_k s_k xa_k B_k^T.
  // Masks are drawn per adapter, as forward draws them; drop_k(x_k) is formed
  // in windows of the dropout segments' rows (one window at a time in
  // `window`, as a single adapter's forward does). Plain LoRA adapters on one
  // context and one d_in; outputs must not overlap.
  static void forward_segments(const std::vector<Segment>& segments, bool train, Matrix<T>& window) {
    if (segments.empty()) return;
    const char* call = train ? "LoraAdapter::forward_segments" : "LoraAdapter::inference_segments";
    Context& ctx = check_segments(segments, train, call);
    for (const Segment& sg : segments) {
      detail::check_forward_args(call, sg.x, sg.out, sg.adapter->d_in_, sg.adapter->d_out_);
      check_weight(sg.weight, call);
    }
    std::vector<GemmTerm<T, T, Space>> down, up;  // x A^T, then xa B^T
    if (train) project_down(segments, window);
    for (const Segment& sg : segments) {
      LoraAdapter& a = *sg.adapter;
      ForwardState& st = *sg.state;
      ConstView B;
      if (train) {
        B = a.B_compute();  // xa_k is project_down's
      } else {
        st.adapter_ = 0;  // not a training state
        st.dora_ = false;
        if (sg.x.rows == 0) continue;
        st.xa_.reshape(sg.x.rows, a.config_.r);
        ConstView A;
        std::tie(A, B) = a.inference_operands(st);
        down.push_back({1.0, sg.x, A, 0.0, st.xa_.view()});
      }
      if (sg.x.rows == 0) continue;
      up.push_back({sg.weight * a.scale_, ConstView(st.xa_.view()), B, output_beta(sg.mode), sg.out});
    }
    Backend::template gemm_grouped<T, T>(ctx, Op::N, Op::T, down);
    Backend::template gemm_grouped<T, T>(ctx, Op::N, Op::T, up);
  }

  // backward(state_k, x_k, dL_dy_k, dL_dx_k, grad_mode, mode_k) for every
  // segment of a forward_segments(train = true), each product kind one
  // Backend::gemm_grouped call: g_k = dL_dy_k B_k, dL_dB_k, dL_dA_k, then
  // dL_dx_k (+)= (s_k g_k A_k) o mask_k / (1 - p_k). With dropout, dL_dA and
  // dL_dx are formed window by window, as in forward (`window`: drop(x), then
  // s g A).
  static void backward_segments(const std::vector<ConstSegment>& segments, GradMode grad_mode, Matrix<T>& window) {
    if (segments.empty()) return;
    const char* call = "LoraAdapter::backward_segments";
    check_segments(segments, true, call);
    for (const ConstSegment& sg : segments) {
      const LoraAdapter& a = *sg.adapter;
      LORA_CHECK(sg.state->adapter_ == a.id_, call << ": a segment's state holds no training forward of its adapter");
      detail::check_backward_args(call, sg.x, sg.dL_dy, sg.out, sg.state->rows_, a.d_in_, a.d_out_);
    }
    backward_impl(segments, grad_mode, ConstView(), window);
  }

  // The base path of a backward over adapters that all ran on the same rows
  // (x W^T rescaled by DoRA's c): dL_dx = (dL_dy o C) W with
  // C = 1 + sum_k w_k (c_k - 1) over the DoRA states (one elementwise pass and
  // one base backward, however many adapters), or dL_dy W when none is DoRA;
  // written into dL_dx or (OutputMode::accumulate) added to it.
  // C and dL_dy o C go to the caller's workspaces.
  template <class Base>
  static void base_backward(const Base& base, const std::vector<const ForwardState*>& states, ConstView dL_dy,
                            View dL_dx, OutputMode dx_mode, Matrix<Param>& C, Matrix<T>& scaled_dL_dy) {
    Context& ctx = base.context();
    bool dora = false;
    for (const ForwardState* st : states) dora = dora || !st->base_scale().empty();
    if (!dora) {
      base.backward_input(dL_dy, dL_dx, dx_mode);
      return;
    }
    C.reshape(1, dL_dy.cols);
    scaled_dL_dy.reshape(dL_dy.rows, dL_dy.cols);
    Backend::fill(ctx, C.view(), Param(1));
    for (const ForwardState* st : states)
      if (!st->base_scale().empty()) Backend::add_scaled(ctx, 1.0, st->base_scale(), C.view());
    Backend::scale_columns(ctx, ConstParamView(C.view()), dL_dy, 0.0, scaled_dL_dy.view());
    base.backward_input(ConstView(scaled_dL_dy.view()), dL_dx, dx_mode);
  }

 private:
  template <class Base>
  void forward_impl(const Base* base, ConstView x, ConstView xWt, View y, ForwardState& state, double weight,
                    OutputMode out) {
    detail::check_forward_args("LoraAdapter::forward", x, y, d_in_, d_out_);
    check_weight(weight, "LoraAdapter::forward");
    if (config_.use_dora) check_dora_output(x, xWt, y, out, "LoraAdapter::forward");
    // xa = drop(x) A^T                  (N x r) = (N x d_in)(d_in x r); with
    // dropout the mask once, as bits, for backward too, and drop(x) in windows
    project_down(std::vector<Segment>{{this, &state, x, y, out, {}, weight}}, dropout_block_);
    if (x.rows == 0) return;
    if (config_.use_dora) {
      dora_scales(*base, A_compute(), state, weight);
      dora_add(xWt, state, y, weight);
    } else {
      // y += w s xa B^T                 (N x d_out) = (N x r)(r x d_out)
      Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, weight * scale_, ConstView(state.xa_.view()), B_compute(),
                                   output_beta(out), y);
    }
  }

  template <class Base>
  void inference_impl(const Base* base, ConstView x, ConstView xWt, View y, ForwardState& workspace, double weight,
                      OutputMode out) const {
    detail::check_forward_args("LoraAdapter::inference", x, y, d_in_, d_out_);
    check_weight(weight, "LoraAdapter::inference");
    if (config_.use_dora) check_dora_output(x, xWt, y, out, "LoraAdapter::inference");
    workspace.adapter_ = 0;  // not a training state
    workspace.dora_ = config_.use_dora;
    const std::int64_t n = x.rows;
    if (n == 0) return;
    workspace.xa_.reshape(n, config_.r);
    const auto [A, B] = inference_operands(workspace);
    // xa = x A^T                        (N x r)
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, 1.0, x, A, 0.0, workspace.xa_.view());
    if (config_.use_dora) {
      dora_scales(*base, A, workspace, weight);
      dora_add(xWt, workspace, y, weight);
    } else {
      // y += w s xa B^T                 (N x d_out)
      Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, weight * scale_, ConstView(workspace.xa_.view()), B,
                                   output_beta(out), y);
    }
  }

  // DoRA: n = ||W + s B A|| per output in the exact form of the file's
  // comment, then c = m / n, base_scale = w (c - 1) and B' = diag(c) B, into
  // `st`. A is the adapter's A in T (what the base multiplies).
  template <class Base>
  void dora_scales(const Base& base, ConstView A, ForwardState& st, double weight) const {
    const int r = config_.r;
    st.Z_.reshape(d_out_, r);
    st.AAt_.reshape(r, r);
    st.cross_.reshape(1, d_out_);
    st.c_.reshape(1, d_out_);
    st.inv_n_.reshape(1, d_out_);
    st.base_scale_.reshape(1, d_out_);
    st.Bc_.reshape(d_out_, r);
    // Z = W A^T                          (d_out x r) = (d_out x d_in)(d_in x r), through the base
    if constexpr (kMixedPrecision) {
      st.WAt_.reshape(d_out_, r);
      base.weight_matmul(A, st.WAt_.view());
      Backend::convert(*ctx_, ConstView(st.WAt_.view()), st.Z_.view());
    } else {
      base.weight_matmul(A, st.Z_.view());
    }
    // A A^T                              (r x r) = (r x d_in)(d_in x r)
    Backend::template gemm<Param, Param>(*ctx_, Op::N, Op::T, 1.0, ConstParamView(A_.view()), ConstParamView(A_.view()),
                                         0.0, st.AAt_.view());
    // Z = 2 W A^T + s B (A A^T)          (d_out x r)
    Backend::template gemm<Param, Param>(*ctx_, Op::N, Op::N, scale_, ConstParamView(B_.view()),
                                         ConstParamView(st.AAt_.view()), 2.0, st.Z_.view());
    // cross_i = sum_k B_ik Z_ik;  n_i = sqrt(||W_i||^2 + s cross_i);  c = m / n
    Backend::row_dots(*ctx_, 1.0, ConstParamView(B_.view()), ConstParamView(st.Z_.view()), 0.0, st.cross_.view());
    Backend::magnitude_scale(*ctx_, ConstParamView(m_.view()), ConstParamView(w_sq_.view()),
                             ConstParamView(st.cross_.view()), scale_, st.inv_n_.view(), st.c_.view());
    // base_scale = w (c - 1)
    Backend::fill(*ctx_, st.base_scale_.view(), static_cast<Param>(-weight));
    Backend::add_scaled(*ctx_, weight, ConstParamView(st.c_.view()), st.base_scale_.view());
    // B' = diag(c) B                     (d_out x r)
    Backend::scale_rows(*ctx_, ConstParamView(st.c_.view()), ConstParamView(B_.view()), 0.0, st.Bc_.view());
    if constexpr (kMixedPrecision) {
      st.Bc_compute_.reshape(d_out_, r);
      Backend::convert(*ctx_, ConstParamView(st.Bc_.view()), st.Bc_compute_.view());
    }
  }

  // y += w s xa B'^T + w (c - 1) o xWt: the LoRA path with B' = diag(c) B (= w c o s xa B^T),
  // then the base term, which reuses the caller's x W^T.
  void dora_add(ConstView xWt, const ForwardState& st, View y, double weight) const {
    Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, weight * scale_, ConstView(st.xa_.view()), dora_B(st), 1.0, y);
    Backend::scale_columns(*ctx_, ConstParamView(st.base_scale_.view()), xWt, 1.0, y);
  }

  // B' in T, the B of DoRA's GEMMs.
  ConstView dora_B(const ForwardState& st) const {
    if constexpr (kMixedPrecision) {
      return st.Bc_compute_.view();
    } else {
      return st.Bc_.view();
    }
  }

  // dL_dB and dL_dm of a DoRA backward (beta 0: overwrite, 1: accumulate):
  //   G = w s dL_dy^T xa                 (d_out x r) = (d_out x N)(N x r)
  //   dL_dB = diag(c) G
  //   t_j = w sum_i dL_dy_ij xWt_ij + sum_k B_jk G_jk;  dL_dm = t / n
  void dora_gradients(const ForwardState& st, ConstView xWt, ConstView dL_dy, double beta) {
    G_.reshape(d_out_, config_.r);
    t_.reshape(1, d_out_);
    Backend::template gemm<T, Param>(*ctx_, Op::T, Op::N, st.weight_ * scale_, dL_dy, ConstView(st.xa_.view()), 0.0,
                                     G_.view());
    Backend::scale_rows(*ctx_, ConstParamView(st.c_.view()), ConstParamView(G_.view()), beta, dL_dB_.view());
    Backend::column_dots(*ctx_, st.weight_, dL_dy, xWt, 0.0, t_.view());
    Backend::row_dots(*ctx_, 1.0, ConstParamView(B_.view()), ConstParamView(G_.view()), 1.0, t_.view());
    Backend::scale_columns(*ctx_, ConstParamView(st.inv_n_.view()), ConstParamView(t_.view()), beta, dL_dm_.view());
  }

 public:
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
    reset_lora();
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

  // ---- merging -------------------------------------------------------------------

  // Merging (sign +1): W <- W + s B A on `base`; unmerging (sign -1): W <- W - s B A.
  // DoRA: merging W <- c o (W + s B A), c = m / ||W + s B A|| per output row
  // (a column of W with fan_in_fan_out), keeping 1 / c for unmerging:
  // W <- W / c - s B A, which restores W up to rounding. The caller (Linear,
  // AdapterSet) keeps track of which adapter is merged.
  template <class Base>
  void add_to(Base& base, double sign) {
    check_base(base, "LoraAdapter: merge");
    if (!config_.use_dora) {
      base.add_delta(sign * scale_, ConstParamView(B_.view()), ConstParamView(A_.view()));
      return;
    }
    if (sign > 0) {
      ForwardState ws;
      dora_merge_scale(base, ws);
      base.add_delta(scale_, ConstParamView(B_.view()), ConstParamView(A_.view()));
      base.scale_output_rows(ConstParamView(ws.c_.view()));
      // 1 / c, for unmerge, in double on the host (once per merge)
      std::vector<Param> c(static_cast<std::size_t>(d_out_));
      Backend::copy_to_host(*ctx_, ConstParamView(ws.c_.view()), MatrixView<Param, HostSpace>(c.data(), 1, d_out_));
      for (Param& v : c) v = static_cast<Param>(1.0 / static_cast<double>(v));
      unmerge_scale_ = Matrix<Param>(1, d_out_);
      Backend::copy_from_host(*ctx_, MatrixView<const Param, HostSpace>(c.data(), 1, d_out_), unmerge_scale_.view());
    } else {
      LORA_CHECK(unmerge_scale_.size() == d_out_, "LoraAdapter: unmerge of a DoRA adapter that was not merged");
      base.scale_output_rows(ConstParamView(unmerge_scale_.view()));
      base.add_delta(-scale_, ConstParamView(B_.view()), ConstParamView(A_.view()));
      unmerge_scale_ = Matrix<Param>();
    }
  }

  // out <- out + s B A, where out holds the dense W of `base` as stored (a
  // copy, in any type U: AdapterSet::merged_weight); DoRA:
  // out <- c o (out + s B A), c from `base` (so from the NF4 weight itself over an NF4 base).
  template <class Base, class U>
  void add_merged(const Base& base, MatrixView<U, Space> out) const {
    check_base(base, "LoraAdapter::add_merged");
    DenseBase<U, Backend> dense(*ctx_, out, {}, base.fan_in_fan_out());  // out as the W that merging writes
    dense.add_delta(scale_, ConstParamView(B_.view()), ConstParamView(A_.view()));
    if (!config_.use_dora) return;
    ForwardState ws;
    dora_merge_scale(base, ws);
    dense.scale_output_rows(ConstParamView(ws.c_.view()));
  }

  // ---- the trainable tensors ---------------------------------------------------

  // For the optimizer (LoRA+ puts B in its own group).
  Parameter<Param, Space> lora_A() { return {A_.view(), dL_dA_.view(), "lora_A", storage_.watch()}; }
  Parameter<Param, Space> lora_B() { return {B_.view(), dL_dB_.view(), "lora_B", storage_.watch()}; }
  // DoRA's magnitude m (1 x d_out), named as PEFT names it.
  Parameter<Param, Space> lora_magnitude() {
    LORA_CHECK(config_.use_dora, "LoraAdapter::lora_magnitude: not a DoRA adapter (Config.use_dora is false)");
    return {m_.view(), dL_dm_.view(), "lora_magnitude_vector", storage_.watch()};
  }
  // A, B, and with DoRA the magnitude.
  std::vector<Parameter<Param, Space>> parameters() {
    if (config_.use_dora) return {lora_A(), lora_B(), lora_magnitude()};
    return {lora_A(), lora_B()};
  }

  ConstParamView A() const { return A_.view(); }
  ConstParamView B() const { return B_.view(); }
  ConstParamView dL_dA() const { return dL_dA_.view(); }
  ConstParamView dL_dB() const { return dL_dB_.view(); }
  // DoRA: m and dL/dm (1 x d_out); empty views otherwise.
  ConstParamView magnitude() const { return m_.view(); }
  ConstParamView dL_dm() const { return dL_dm_.view(); }
  bool use_dora() const { return config_.use_dora; }

  std::int64_t d_in() const { return d_in_; }
  std::int64_t d_out() const { return d_out_; }
  int rank() const { return config_.r; }
  double scale() const { return scale_; }
  const Config& config() const { return config_; }
  std::uint32_t stream() const { return stream_; }
  Context& context() const { return *ctx_; }

  // r (d_in + d_out): the elements of A and B (+ d_out for DoRA's magnitude).
  std::int64_t trainable_parameters() const {
    return config_.r * (d_in_ + d_out_) + (config_.use_dora ? d_out_ : 0);
  }

  // The number of training forwards so far: the position of the dropout RNG,
  // saved in checkpoints so a resumed run draws the same masks.
  std::uint32_t dropout_calls() const { return dropout_calls_; }
  void set_dropout_calls(std::uint32_t calls) { dropout_calls_ = calls; }
  // Data-parallel training: the process's rank enters the dropout key, so
  // the ranks of one run draw different masks (each a pure function of
  // (seed, rank, stream, call): a run is reproducible at a given process
  // count). Rank 0 draws the masks of a single-process run.
  std::uint32_t dropout_rank() const { return dropout_rank_; }
  void set_dropout_rank(std::uint32_t rank) { dropout_rank_ = rank; }

  // Parameters (with the 16-bit compute copies), gradients and workspaces;
  // a ForwardState's bytes are the caller's (ForwardState::bytes()).
  // DoRA adds m and dL/dm, and among the workspaces its cached ||W_i||^2
  // (1 x d_out), its backward's d_out x r and 1 x d_out scratch and, while
  // merged, 1 / c. A PiSSA / OLoRA adapter's host copies of A0 and B0 count
  // as frozen bytes.
  MemoryReport memory() const {
    MemoryReport report;
    report.frozen_bytes = (initial_A_.size() + initial_B_.size()) * sizeof(Param);
    report.parameter_bytes = A_.bytes() + B_.bytes() + A_compute_.bytes() + B_compute_.bytes() + m_.bytes();
    report.gradient_bytes = dL_dA_.bytes() + dL_dB_.bytes() + dL_dm_.bytes();
    report.workspace_bytes =
        dropout_block_.bytes() + g_.bytes() + w_sq_.bytes() + G_.bytes() + t_.bytes() + unmerge_scale_.bytes();
    return report;
  }

 private:
  static constexpr bool kMixedPrecision = !std::is_same_v<T, Param>;
  using NoBase = DenseBase<T, Backend>;  // the base type of the LoRA-only calls, which never read it

  static std::uint64_t next_id() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }
  static void check_weight(double weight, const char* call) {
    LORA_CHECK(std::isfinite(weight), call << ": weight = " << weight << ", expected a finite value");
  }
  using ConstMaskView = MatrixView<const std::uint32_t, Space>;

  // One window's share of a segment: its rows [first, first + rows), whose
  // drop(x) (or s g A) sits in `block` of the window's workspace.
  struct Piece {
    std::size_t segment;
    std::int64_t first, rows;
    View block;
  };

  // body(pieces) over the rows of the segments whose adapters drop out, taken
  // in order as one run and cut into windows of about
  // Backend::kRowBlockElements elements of a d_in-wide matrix: each window
  // holds at most one piece of each segment, and `ws` never more than one
  // window (no N x d_in copy of x exists, however many adapters).
  template <class Segments, class Body>
  static void for_dropout_windows(const Segments& segments, Matrix<T>& ws, Body&& body) {
    const std::int64_t total = dropout_rows(segments);
    if (total == 0) return;
    const std::int64_t d_in = segments.front().adapter->d_in_;
    const std::int64_t window = std::clamp<std::int64_t>(Backend::kRowBlockElements / d_in, 1, total);
    ws.reshape(window, d_in);
    std::vector<Piece> pieces;
    std::size_t k = 0;
    std::int64_t next = 0;  // segment k's first row not yet in a window
    for (std::int64_t start = 0; start < total; start += window) {
      const std::int64_t rows = std::min(window, total - start);
      pieces.clear();
      for (std::int64_t filled = 0; filled < rows;) {
        const auto& sg = segments[k];
        if (sg.adapter->config_.dropout <= 0.0 || next == sg.x.rows) {
          ++k;
          next = 0;
          continue;
        }
        const std::int64_t take = std::min(sg.x.rows - next, rows - filled);
        pieces.push_back({k, next, take, ws.view().row_block(filled, take)});
        next += take;
        filled += take;
      }
      body(pieces);
    }
  }

  // A training forward's down projection for every segment: begin_forward
  // (the state's record; the mask drawn where the adapter drops out), then
  // xa_k = x_k A_k^T in one grouped GEMM for the segments without dropout
  // and xa_k = drop_k(x_k) A_k^T window by window for those with it.
  static void project_down(const std::vector<Segment>& segments, Matrix<T>& ws) {
    Context& ctx = *segments.front().adapter->ctx_;
    std::vector<GemmTerm<T, T, Space>> down;
    for (const Segment& sg : segments) {
      LoraAdapter& a = *sg.adapter;
      ForwardState& st = *sg.state;
      a.begin_forward(st, sg.x.rows, sg.weight);
      if (sg.x.rows == 0) continue;
      a.refresh_compute_copies();
      if (a.config_.dropout > 0.0) {
        a.draw_mask(st);
      } else {
        down.push_back({1.0, sg.x, a.A_compute(), 0.0, st.xa_.view()});
      }
    }
    Backend::template gemm_grouped<T, T>(ctx, Op::N, Op::T, down);
    for_dropout_windows(segments, ws, [&](const std::vector<Piece>& pieces) {
      down.clear();
      for (const Piece& pc : pieces) {
        const Segment& sg = segments[pc.segment];
        const LoraAdapter& a = *sg.adapter;
        ForwardState& st = *sg.state;
        Backend::apply_dropout_mask(ctx, sg.x.row_block(pc.first, pc.rows), a.mask_rows(st, pc), a.dropout_p(),
                                    pc.block);
        down.push_back({1.0, ConstView(pc.block), a.A_compute(), 0.0, st.xa_.view().row_block(pc.first, pc.rows)});
      }
      Backend::template gemm_grouped<T, T>(ctx, Op::N, Op::T, down);
    });
  }

  // The backward of `segments` (one adapter's backward, or backward_segments):
  //   g_k = dL_dy_k B_k (B' with DoRA);  dL_dB_k = s_k dL_dy_k^T xa_k (DoRA:
  //   dora_gradients, which reads xWt: only one DoRA segment, alone);
  //   dL_dA_k = s_k g_k^T drop_k(x_k);  dL_dx_k (+)= (s_k g_k A_k) o mask_k / (1 - p_k)
  // each product kind one grouped GEMM; with dropout dL_dA and dL_dx window
  // by window, drop(x) and then s g A in the window (s g A masked in place in
  // dL_dx when it is overwritten).
  static void backward_impl(const std::vector<ConstSegment>& segments, GradMode grad_mode, ConstView xWt,
                            Matrix<T>& ws) {
    Context& ctx = *segments.front().adapter->ctx_;
    const bool grads = grad_mode != GradMode::ignore;
    const double beta = grad_mode == GradMode::accumulate ? 1.0 : 0.0;
    std::vector<GemmTerm<T, T, Space>> g_terms, dx_terms;       // dL_dy B;  s g A
    std::vector<GemmTerm<T, Param, Space>> dB_terms, dA_terms;  // s dL_dy^T xa;  s g^T x
    for (const ConstSegment& sg : segments) {
      LoraAdapter& a = *sg.adapter;
      const ForwardState& st = *sg.state;
      if (sg.x.rows == 0) {
        if (grad_mode == GradMode::overwrite) a.zero_grad();
        continue;
      }
      const double s = st.weight_ * a.scale_;
      a.g_.reshape(sg.x.rows, a.config_.r);
      const ConstView g = a.g_.view();
      g_terms.push_back({1.0, sg.dL_dy, a.config_.use_dora ? a.dora_B(st) : a.B_compute(), 0.0, a.g_.view()});
      if (grads && a.config_.use_dora) {
        a.dora_gradients(st, xWt, sg.dL_dy, beta);
      } else if (grads) {
        dB_terms.push_back({s, sg.dL_dy, ConstView(st.xa_.view()), beta, a.dL_dB_.view()});
      }
      if (a.config_.dropout > 0.0) continue;  // dL_dA and dL_dx in the windows below
      if (grads) dA_terms.push_back({s, g, sg.x, beta, a.dL_dA_.view()});
      if (!sg.out.empty()) dx_terms.push_back({s, g, a.A_compute(), output_beta(sg.mode), sg.out});
    }
    Backend::template gemm_grouped<T, T>(ctx, Op::N, Op::N, g_terms);
    Backend::template gemm_grouped<T, Param>(ctx, Op::T, Op::N, dB_terms);
    Backend::template gemm_grouped<T, Param>(ctx, Op::T, Op::N, dA_terms);
    Backend::template gemm_grouped<T, T>(ctx, Op::N, Op::N, dx_terms);
    std::vector<View> masked;  // per piece: where s g A is masked (empty: no dL_dx)
    for_dropout_windows(segments, ws, [&](const std::vector<Piece>& pieces) {
      dA_terms.clear();
      dx_terms.clear();
      masked.clear();
      for (const Piece& pc : pieces) {
        const ConstSegment& sg = segments[pc.segment];
        LoraAdapter& a = *sg.adapter;
        const ForwardState& st = *sg.state;
        const double s = st.weight_ * a.scale_;
        const ConstView g = ConstView(a.g_.view()).row_block(pc.first, pc.rows);
        if (grads) {  // dL_dA summed over the windows
          Backend::apply_dropout_mask(ctx, sg.x.row_block(pc.first, pc.rows), a.mask_rows(st, pc), a.dropout_p(),
                                      pc.block);
          dA_terms.push_back({s, g, ConstView(pc.block), pc.first == 0 ? beta : 1.0, a.dL_dA_.view()});
        }
        masked.push_back(sg.out.empty() ? View()
                         : sg.mode == OutputMode::overwrite ? sg.out.row_block(pc.first, pc.rows)
                                                             : pc.block);
        if (!masked.back().empty()) dx_terms.push_back({s, g, a.A_compute(), 0.0, masked.back()});
      }
      Backend::template gemm_grouped<T, Param>(ctx, Op::T, Op::N, dA_terms);  // before s g A takes the blocks
      Backend::template gemm_grouped<T, T>(ctx, Op::N, Op::N, dx_terms);
      for (std::size_t i = 0; i < pieces.size(); ++i) {
        if (masked[i].empty()) continue;
        const Piece& pc = pieces[i];
        const ConstSegment& sg = segments[pc.segment];
        mask_dx(ctx, masked[i], sg.adapter->mask_rows(*sg.state, pc), sg.adapter->dropout_p(), sg.mode,
                sg.out.row_block(pc.first, pc.rows));
      }
    });
  }

  float dropout_p() const { return static_cast<float>(config_.dropout); }
  // A piece's rows of the mask its segment's forward drew.
  ConstMaskView mask_rows(const ForwardState& st, const Piece& pc) const {
    return ConstMaskView(st.mask_.view()).row_block(pc.first, pc.rows);
  }

  // dL_dx (+)= (s g A) o mask / (1 - p), s g A already in `masked`: dL_dx itself
  // (mode overwrite) or a workspace (accumulate), masked in place and then added.
  static void mask_dx(Context& ctx, View masked, ConstMaskView mask, float p, OutputMode mode, View dL_dx) {
    Backend::apply_dropout_mask(ctx, ConstView(masked), mask, p, masked);
    if (mode == OutputMode::accumulate) Backend::add_scaled(ctx, 1.0, ConstView(masked), dL_dx);
  }

  // The segments' common context (checked: one context, one d_in, no DoRA,
  // no state in two segments, and when `training` no adapter in two: its g
  // and gradients are one per adapter, and the grouped GEMMs' outputs must
  // not overlap).
  template <class Segments>
  static Context& check_segments(const Segments& segments, bool training, const char* call) {
    std::vector<const void*> adapters, states;
    for (const auto& sg : segments) {
      LORA_CHECK(sg.adapter != nullptr && sg.state != nullptr, call << ": a segment without adapter or state");
      adapters.push_back(sg.adapter);
      states.push_back(sg.state);
    }
    const auto repeats = [](std::vector<const void*> v) {
      std::sort(v.begin(), v.end());
      return std::adjacent_find(v.begin(), v.end()) != v.end();
    };
    LORA_CHECK(!repeats(states), call << ": two segments share one ForwardState; give each segment its own");
    LORA_CHECK(!training || !repeats(adapters),
               call << ": an adapter in two segments of a training call; give it one segment (gather its rows)");
    const LoraAdapter& first = *segments.front().adapter;
    for (const auto& sg : segments) {
      const LoraAdapter& a = *sg.adapter;
      LORA_CHECK(!a.config_.use_dora, call << ": a DoRA adapter (Config.use_dora) rescales the base's x W^T per "
                                              "adapter; run it alone (forward(base, x, xWt, y, state))");
      LORA_CHECK(a.ctx_ == first.ctx_ && a.d_in_ == first.d_in_,
                 call << ": the segments' adapters must share a context and d_in (" << first.d_in_ << "), found "
                      << a.d_in_);
    }
    return *first.ctx_;
  }
  // The rows of the segments whose adapters drop out: the dropped workspace's height.
  template <class Segments>
  static std::int64_t dropout_rows(const Segments& segments) {
    std::int64_t rows = 0;
    for (const auto& sg : segments)
      if (sg.adapter->config_.dropout > 0.0) rows += sg.x.rows;
    return rows;
  }

  void refuse_dora(const char* call, const char* instead) const {
    LORA_CHECK(!config_.use_dora, "LoraAdapter::" << call << ": a DoRA adapter (Config.use_dora) rescales the base's "
                                                   "x W^T and needs the base; call " << instead);
  }
  template <class Base>
  void check_base(const Base& base, const char* call) const {
    LORA_CHECK(base.d_in() == d_in_ && base.d_out() == d_out_,
               call << ": a " << d_out_ << " x " << d_in_ << " adapter cannot run on a " << base.d_out() << " x "
                    << base.d_in() << " base");
  }
  // DoRA: xWt N x d_out, not sharing memory with y (DoRA reads it after
  // writing y), and y holding the base's output (DoRA rescales it).
  static void check_dora_output(ConstView x, ConstView xWt, View y, OutputMode out, const char* call) {
    check_shape(xWt, x.rows, y.cols, "xWt (x W^T, the base's product without bias)", call);
    check_disjoint(call, y, "y", xWt, "xWt");
    LORA_CHECK(out == OutputMode::accumulate, call << ": OutputMode::overwrite with a DoRA adapter (Config.use_dora); "
                                                       "DoRA adds to the base's output, so y must hold x W^T + bias "
                                                       "and the adapter accumulate onto it");
  }

  // c = m / ||W + s B A|| for merging, into ws.c_ (w = 1).
  template <class Base>
  void dora_merge_scale(const Base& base, ForwardState& ws) const {
    if constexpr (kMixedPrecision) {
      ws.A_.reshape(config_.r, d_in_);
      Backend::convert(*ctx_, ConstParamView(A_.view()), ws.A_.view());
      dora_scales(base, ConstView(ws.A_.view()), ws, 1.0);
    } else {
      dora_scales(base, ConstView(A_.view()), ws, 1.0);
    }
  }

  // A training forward's record in `state` (N = n rows, the next dropout call).
  void begin_forward(ForwardState& state, std::int64_t n, double weight) {
    state.adapter_ = 0;
    state.dora_ = config_.use_dora;
    state.xa_.reshape(n, config_.r);
    state.dropout_call_ = dropout_calls_++;
    state.rows_ = n;
    state.weight_ = weight;
    state.adapter_ = id_;
  }
  // The dropout mask of the forward recorded in `state`, drawn into it.
  void draw_mask(ForwardState& state) const {
    state.mask_.reshape(state.rows_, dropout_mask_words(d_in_));
    Backend::dropout_mask(*ctx_, d_in_, static_cast<float>(config_.dropout), dropout_seed(), stream_,
                          state.dropout_call_, state.mask_.view());
  }
  // A and B in T for an inference: the masters, or with mixed precision their
  // copies converted into the workspace (the members' copies belong to training).
  std::pair<ConstView, ConstView> inference_operands(ForwardState& workspace) const {
    if constexpr (kMixedPrecision) {
      workspace.A_.reshape(config_.r, d_in_);
      workspace.B_.reshape(d_out_, config_.r);
      Backend::convert(*ctx_, ConstParamView(A_.view()), workspace.A_.view());
      Backend::convert(*ctx_, ConstParamView(B_.view()), workspace.B_.view());
      return {workspace.A_.view(), workspace.B_.view()};
    } else {
      return {A_.view(), B_.view()};
    }
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
  StorageToken storage_;                 // ends when the four above (and m_, dL_dm_) are freed (see core/parameter.hpp)
  Matrix<T> A_compute_, B_compute_;      // 16-bit copies for the training GEMMs (mixed precision only)
  Matrix<T> dropout_block_, g_;          // workspaces: one window of drop(x) or s g A (dropout only), dL_dy B
  // DoRA (empty otherwise): m and dL/dm, the cached ||W_i||^2, backward's
  // scratch (G = w s dL_dy^T xa, t: dL/dm before / n), 1 / c while merged.
  Matrix<Param> m_, dL_dm_, w_sq_, G_, t_, unmerge_scale_;
  std::vector<Param> initial_A_, initial_B_;  // PiSSA / OLoRA: A0, B0 on the host (set_initial); else empty
  std::uint32_t dropout_calls_ = 0;
  std::uint32_t dropout_rank_ = 0;
  // The dropout key: config.seed, moved by the rank (golden-ratio steps: rank
  // r > 0 lands far from any small seed another adapter might use).
  std::uint64_t dropout_seed() const { return config_.seed + 0x9E3779B97F4A7C15ull * dropout_rank_; }
};

// y = x W^T + bias with x W^T also kept in xWt (resized to N x d_out): the
// base's forward for layers whose DoRA adapters rescale x W^T. One base
// product, one copy.
template <class Base, class M>
void product_forward(const Base& base,
                     MatrixView<const typename Base::value_type, typename Base::backend_type::Space> x,
                     MatrixView<typename Base::value_type, typename Base::backend_type::Space> y, M& xWt) {
  using T = typename Base::value_type;
  using Backend = typename Base::backend_type;
  xWt.reshape(x.rows, base.d_out());
  base.matmul(x, xWt.view());
  Backend::convert(base.context(), MatrixView<const T, typename Backend::Space>(xWt.view()), y);
  if (!base.bias().empty()) Backend::add_row_vector(base.context(), y, base.bias());
}

}  // namespace lora

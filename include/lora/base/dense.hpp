// lora::DenseBase: the frozen layer y = x W^T + bias over a borrowed W.
//
//   W: d_out x d_in (d_in x d_out with fan_in_fan_out, GPT-2's Conv1D), bias: 1 x d_out or empty
//   forward:          y     = x W^T + bias            (x W with fan_in_fan_out)
//   backward_input:   dL_dx = dL_dy W                  (dL_dy W^T with fan_in_fan_out)
//   matmul:           y     = x W^T                    (forward without the bias)
//   weight_matmul:    out   = W a^T                    (DoRA's W A^T, d_out x k)
//
// A base never computes dL/dW and never owns W. It writes W only in add_delta
// (merging an adapter, or PiSSA / OLoRA writing the residual), which needs a
// writable view: a base built over a MatrixView<const T> reads W and refuses
// add_delta with an error. Every
// operation is const except add_delta and scale_output_rows (merging a DoRA
// adapter), so one base is safe to read from many threads.
//
// A frozen base is anything with this shape (the FrozenBase trait / concept
// below): the adapter code (layers/, model/) is written once against it, and
// a quantized base (4-bit W) fits beside the dense one. The trait includes
// what DoRA reads (matmul, weight_matmul; and row_norms_squared, a template
// it cannot name).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora/core/backend.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"

namespace lora {

namespace detail {

// The frozen base of a layer: W is a valid non-empty view, d_out x d_in (d_in
// x d_out with fan_in_fan_out); bias is empty or 1 x d_out and not inside W
// (merging writes W). A bias that does not fit is reported against W, since a
// transposed W is the likelier mistake.
template <class T, class Space>
void check_base(const char* call, const MatrixView<const T, Space>& W, const MatrixView<const T, Space>& bias,
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
// memory with x or with what the call reads (W and bias; empty views when the
// call does not read them).
template <class T, class Space>
void check_forward_args(const char* call, const MatrixView<const T, Space>& x, const MatrixView<T, Space>& y,
                        std::int64_t d_in, std::int64_t d_out, const MatrixView<const T, Space>& W = {},
                        const MatrixView<const T, Space>& bias = {}) {
  check_shape(x, x.rows, d_in, "x", call);
  check_shape(y, x.rows, d_out, "y", call);
  check_disjoint(call, y, "y", x, "x");
  check_disjoint(call, y, "y", W, "W");
  check_disjoint(call, y, "y", bias, "bias");
}

// The arguments of a backward: x is n x d_in (n rows, as in the forward),
// dL_dy is n x d_out, dL_dx is n x d_in or empty (not computed) and shares no
// memory with x, dL_dy or W (an empty view when the call does not read it).
template <class T, class Space>
void check_backward_args(const char* call, const MatrixView<const T, Space>& x,
                         const MatrixView<const T, Space>& dL_dy, const MatrixView<T, Space>& dL_dx, std::int64_t n,
                         std::int64_t d_in, std::int64_t d_out, const MatrixView<const T, Space>& W = {}) {
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
class DenseBase {
  static_assert(is_backend_v<Backend>, "DenseBase<T, Backend>: Backend does not satisfy the Backend interface");
  static_assert(!std::is_const_v<T>,
                "DenseBase<const T, Backend>: name the element type without const; a read-only W is a "
                "MatrixView<const T> passed to the constructor");

 public:
  using value_type = T;
  using backend_type = Backend;
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;

  // A writable W: forward, backward_input and add_delta (merging).
  DenseBase(Context& ctx, View W, ConstView bias = {}, bool fan_in_fan_out = false)
      : DenseBase(ctx, ConstView(W), bias, fan_in_fan_out, W.data) {}
  // A read-only W (exactly a MatrixView<const T>; a braced {data, rows, cols}
  // is the writable form): forward and backward_input; add_delta is refused.
  template <class ConstW, class = std::enable_if_t<std::is_same_v<ConstW, ConstView>>>
  DenseBase(Context& ctx, ConstW W, ConstView bias = {}, bool fan_in_fan_out = false)
      : DenseBase(ctx, W, bias, fan_in_fan_out, nullptr) {}

  std::int64_t d_in() const { return d_in_; }
  std::int64_t d_out() const { return d_out_; }
  bool fan_in_fan_out() const { return fan_in_fan_out_; }
  bool writable() const { return writable_ != nullptr; }
  ConstView W() const { return W_; }
  ConstView bias() const { return bias_; }
  Context& context() const { return *ctx_; }

  // d_out d_in (+ d_out with a bias): what full fine-tuning would train.
  std::int64_t parameters() const { return d_in_ * d_out_ + (bias_.empty() ? 0 : d_out_); }
  std::size_t bytes() const { return static_cast<std::size_t>(parameters()) * sizeof(T); }

  // y = x W^T + bias                                   x: N x d_in, y: N x d_out
  // (y += x W^T + bias with OutputMode::accumulate)
  void forward(ConstView x, View y, OutputMode mode = OutputMode::overwrite) const {
    detail::check_forward_args("DenseBase::forward", x, y, d_in_, d_out_, W_, bias_);
    if (x.rows == 0) return;
    Backend::template gemm<T, T>(*ctx_, Op::N, fan_in_fan_out_ ? Op::N : Op::T, 1.0, x, W_, output_beta(mode), y);
    if (!bias_.empty()) Backend::add_row_vector(*ctx_, y, bias_);
  }

  // y = x W^T, without the bias (what DoRA rescales)   x: N x d_in, y: N x d_out
  void matmul(ConstView x, View y) const {
    detail::check_forward_args("DenseBase::matmul", x, y, d_in_, d_out_, W_);
    if (x.rows == 0) return;
    Backend::template gemm<T, T>(*ctx_, Op::N, fan_in_fan_out_ ? Op::N : Op::T, 1.0, x, W_, 0.0, y);
  }

  // out = W a^T                                        a: k x d_in, out: d_out x k
  // (DoRA's W A^T, the cross term of ||W + s B A||; Ws^T a^T with fan_in_fan_out)
  void weight_matmul(ConstView a, View out) const {
    check_shape(a, a.rows, d_in_, "a", "DenseBase::weight_matmul");
    check_shape(out, d_out_, a.rows, "out", "DenseBase::weight_matmul");
    check_disjoint("DenseBase::weight_matmul", out, "out", W_, "W");
    Backend::template gemm<T, T>(*ctx_, fan_in_fan_out_ ? Op::T : Op::N, Op::T, 1.0, W_, a, 0.0, out);
  }

  // out[0, i] = ||W[i, :]||^2 for each output i, in P (1 x d_out), on the
  // backend and accumulated in double: DoRA's cached base norms.
  template <class P>
  void row_norms_squared(MatrixView<P, Space> out) const {
    check_shape(out, 1, d_out_, "out", "DenseBase::row_norms_squared");
    if (fan_in_fan_out_) {
      Backend::column_dots(*ctx_, 1.0, W_, W_, 0.0, out);
    } else {
      Backend::row_dots(*ctx_, 1.0, W_, W_, 0.0, out);
    }
  }

  // dL_dx = dL_dy W                                    dL_dy: N x d_out, dL_dx: N x d_in
  // (dL_dx += dL_dy W with OutputMode::accumulate)
  void backward_input(ConstView dL_dy, View dL_dx, OutputMode mode = OutputMode::overwrite) const {
    check_shape(dL_dy, dL_dy.rows, d_out_, "dL_dy", "DenseBase::backward_input");
    check_shape(dL_dx, dL_dy.rows, d_in_, "dL_dx", "DenseBase::backward_input");
    check_disjoint("DenseBase::backward_input", dL_dx, "dL_dx", dL_dy, "dL_dy");
    check_disjoint("DenseBase::backward_input", dL_dx, "dL_dx", W_, "W");
    if (dL_dy.rows == 0) return;
    Backend::template gemm<T, T>(*ctx_, Op::N, fan_in_fan_out_ ? Op::T : Op::N, 1.0, dL_dy, W_, output_beta(mode),
                                 dL_dx);
  }

  // W <- W + s B A (W^T <- W^T + s (B A)^T with fan_in_fan_out)      B: d_out x r, A: r x d_in
  // B A is formed in P (the adapter's parameter type) and added to W once.
  template <class P>
  void add_delta(double s, MatrixView<const P, Space> B, MatrixView<const P, Space> A) {
    LORA_CHECK(writable_ != nullptr, "DenseBase::add_delta (merge): this base was built over a read-only W "
                                     "(MatrixView<const T>); merging writes W, so build the base over a writable view");
    LORA_CHECK(B.rows == d_out_ && A.cols == d_in_ && B.cols == A.rows,
               "DenseBase::add_delta: B [" << B.rows << ", " << B.cols << "] x A [" << A.rows << ", " << A.cols
                                           << "] does not give a " << d_out_ << " x " << d_in_ << " update");
    typename Backend::template Matrix<P> delta(W_.rows, W_.cols);
    if (fan_in_fan_out_) {
      Backend::template gemm<P, P>(*ctx_, Op::T, Op::T, s, A, B, 0.0, delta.view());
    } else {
      Backend::template gemm<P, P>(*ctx_, Op::N, Op::N, s, B, A, 0.0, delta.view());
    }
    Backend::add_scaled(*ctx_, 1.0, MatrixView<const P, Space>(delta.view()),
                        View(writable_, W_.rows, W_.cols, W_.stride));
  }

  // W[i, :] <- v[0, i] W[i, :] for each output i (a column of the stored W
  // with fan_in_fan_out): merging a DoRA adapter, W' = (m / n) o (W + s B A).
  template <class P>
  void scale_output_rows(MatrixView<const P, Space> v) {
    LORA_CHECK(writable_ != nullptr, "DenseBase::scale_output_rows (merge): this base was built over a read-only W "
                                     "(MatrixView<const T>); merging writes W, so build the base over a writable view");
    check_shape(v, 1, d_out_, "v", "DenseBase::scale_output_rows");
    const View W(writable_, W_.rows, W_.cols, W_.stride);
    if (fan_in_fan_out_) {
      Backend::scale_columns(*ctx_, v, W_, 0.0, W);
    } else {
      Backend::scale_rows(*ctx_, v, W_, 0.0, W);
    }
  }

  // ||W[i, :]|| for each output i (the L2 norm of row i of the d_out x d_in
  // weight, whatever its storage), in double on the host: what DoRA's
  // magnitude starts from. One reduction per row; not for a hot loop.
  std::vector<double> row_norms() const {
    std::vector<double> out(static_cast<std::size_t>(d_out_));
    for (std::int64_t i = 0; i < d_out_; ++i) {
      const ConstView row = fan_in_fan_out_ ? W_.col_block(i, 1) : W_.row_block(i, 1);
      out[static_cast<std::size_t>(i)] = std::sqrt(Backend::sum_squares(*ctx_, row));
    }
    return out;
  }

 private:
  DenseBase(Context& ctx, ConstView W, ConstView bias, bool fan_in_fan_out, T* writable)
      : ctx_(&ctx), W_(W), bias_(bias), writable_(writable), fan_in_fan_out_(fan_in_fan_out) {
    detail::check_base("DenseBase", W, bias, fan_in_fan_out);
    d_out_ = fan_in_fan_out ? W.cols : W.rows;
    d_in_ = fan_in_fan_out ? W.rows : W.cols;
  }

  Context* ctx_;
  ConstView W_;
  ConstView bias_;
  T* writable_ = nullptr;  // W_.data when the base may write W (add_delta), else null
  bool fan_in_fan_out_;
  std::int64_t d_in_ = 0;
  std::int64_t d_out_ = 0;
};

namespace detail {
template <class B, class = void>
struct is_frozen_base : std::false_type {};
template <class B>
struct is_frozen_base<
    B, std::void_t<typename B::value_type, typename B::backend_type, decltype(std::declval<const B&>().d_in()),
                   decltype(std::declval<const B&>().d_out()), decltype(std::declval<const B&>().bytes()),
                   decltype(std::declval<const B&>().forward(
                       std::declval<MatrixView<const typename B::value_type, typename B::backend_type::Space>>(),
                       std::declval<MatrixView<typename B::value_type, typename B::backend_type::Space>>(),
                       OutputMode::accumulate)),
                   decltype(std::declval<const B&>().backward_input(
                       std::declval<MatrixView<const typename B::value_type, typename B::backend_type::Space>>(),
                       std::declval<MatrixView<typename B::value_type, typename B::backend_type::Space>>(),
                       OutputMode::accumulate)),
                   decltype(std::declval<const B&>().matmul(
                       std::declval<MatrixView<const typename B::value_type, typename B::backend_type::Space>>(),
                       std::declval<MatrixView<typename B::value_type, typename B::backend_type::Space>>())),
                   decltype(std::declval<const B&>().weight_matmul(
                       std::declval<MatrixView<const typename B::value_type, typename B::backend_type::Space>>(),
                       std::declval<MatrixView<typename B::value_type, typename B::backend_type::Space>>()))>>
    : std::true_type {};
}  // namespace detail

// True when B is a frozen base: value_type, backend_type, d_in(), d_out(),
// bytes(), and const forward(x, y, OutputMode) / backward_input(dL_dy, dL_dx, OutputMode) /
// matmul(x, y) / weight_matmul(a, out) (the last two for DoRA, which
// Linear and AdapterSet may run on any base).
template <class B>
inline constexpr bool is_frozen_base_v = detail::is_frozen_base<B>::value;

#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
template <class B>
concept FrozenBase = is_frozen_base_v<B>;
#endif

}  // namespace lora

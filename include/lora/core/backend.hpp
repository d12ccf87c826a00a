// The Backend interface: the few operations the layer and the optimizer need.
// A backend is a policy class with static functions (no virtual base: the set
// of backends is closed and known at compile time). lora::cpu::Backend and
// lora::cuda::Backend implement it; is_backend_v / the Backend concept check it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "lora/core/matrix_view.hpp"

namespace lora {

// op(X) in a GEMM: X itself or its transpose.
enum class Op { N, T };

// Gradients of the trainable tensors are overwritten, accumulated into, or not
// computed at all (tiny-cuda-nn's GradientMode).
enum class GradMode { ignore, overwrite, accumulate };

// An output (y, dL_dx) is overwritten or accumulated into. A layer lets its
// LoRA path write y first and the frozen GEMM accumulate onto it (beta = 1 on
// the big, compute-bound product), rather than the skinny GEMM re-reading and
// re-writing a whole N x d output after it.
enum class OutputMode { overwrite, accumulate };
// A GEMM's beta for an output written in `mode`.
inline double output_beta(OutputMode mode) { return mode == OutputMode::accumulate ? 1.0 : 0.0; }

// The type A, B, their gradients and the optimizer state are kept in: the
// activation type itself for float and double; fp32 master weights for the
// 16-bit types (the CUDA backend specialises this for __nv_bfloat16 and __half).
template <class T>
struct ParamType {
  using type = T;
};
template <class T>
using param_t = typename ParamType<T>::type;

// The sizes of c = op(a) op(b): op(a) is m x k, op(b) is k x n, c is m x n.
struct GemmShape {
  std::int64_t m, n, k;
};

// Checks the three views (check_view), derives m, n, k from the operands and
// checks that they fit together and c; every backend's gemm starts here.
template <class Tin, class Tout, class Space>
GemmShape gemm_shape(Op op_a, Op op_b, const MatrixView<const Tin, Space>& a, const MatrixView<const Tin, Space>& b,
                     const MatrixView<Tout, Space>& c) {
  check_view(a, "gemm: a");
  check_view(b, "gemm: b");
  check_view(c, "gemm: c");
  const std::int64_t m = op_a == Op::N ? a.rows : a.cols;
  const std::int64_t k = op_a == Op::N ? a.cols : a.rows;
  const std::int64_t kb = op_b == Op::N ? b.rows : b.cols;
  const std::int64_t n = op_b == Op::N ? b.cols : b.rows;
  LORA_CHECK(k == kb && c.rows == m && c.cols == n,
             "gemm: op(a) is " << m << " x " << k << ", op(b) is " << kb << " x " << n << ", c is " << c.rows << " x "
                               << c.cols);
  return {m, n, k};
}

// BLAS libraries (CBLAS, cuBLAS) take the sizes and the leading dimensions
// (our row strides) of a GEMM as int.
struct BlasGemmArgs {
  int m, n, k, lda, ldb, ldc;
};

// The int arguments of a BLAS GEMM of `shape` on a, b, c, or nothing when one
// of them exceeds INT_MAX; then *too_large (when given) names it and its value,
// e.g. "k = 3000000000" or "lda (a's row stride) = 2147483712".
template <class Tin, class Tout, class Space>
std::optional<BlasGemmArgs> blas_gemm_args(const GemmShape& shape, const MatrixView<const Tin, Space>& a,
                                           const MatrixView<const Tin, Space>& b, const MatrixView<Tout, Space>& c,
                                           std::string* too_large = nullptr) {
  const std::pair<const char*, std::int64_t> values[6] = {
      {"m", shape.m},
      {"n", shape.n},
      {"k", shape.k},
      {"lda (a's row stride)", a.stride},
      {"ldb (b's row stride)", b.stride},
      {"ldc (c's row stride)", c.stride}};
  int ints[6];
  for (int i = 0; i < 6; ++i) {
    if (values[i].second < 0 || values[i].second > std::numeric_limits<int>::max()) {
      if (too_large != nullptr) *too_large = std::string(values[i].first) + " = " + std::to_string(values[i].second);
      return std::nullopt;
    }
    ints[i] = static_cast<int>(values[i].second);
  }
  return BlasGemmArgs{ints[0], ints[1], ints[2], ints[3], ints[4], ints[5]};
}

// One product of a grouped GEMM (Backend::gemm_grouped): c = alpha op(a) op(b) + beta c.
template <class Tin, class Tout, class Space>
struct GemmTerm {
  double alpha;
  MatrixView<const Tin, Space> a;
  MatrixView<const Tin, Space> b;
  double beta;
  MatrixView<Tout, Space> c;
};

// One trainable tensor for the fused Adam update: n elements of param, grad and
// the two moments, with its group's learning rate and weight decay.
template <class P>
struct AdamSlot {
  P* param;
  const P* grad;
  P* m;
  P* v;
  std::int64_t n;
  P lr;
  P weight_decay;
};

// The values shared by every slot of one step (PyTorch's Adam/AdamW):
//   g  = grad (+ weight_decay * param for Adam, L2 style)
//   m  = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//   param *= 1 - lr weight_decay                       (AdamW, decoupled)
//   param -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - beta_i^t
template <class P>
struct AdamStep {
  P beta1, beta2, eps;
  P bias_correction1;       // 1 - beta1^t
  P bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  bool decoupled;           // AdamW
  // 1 - beta_i, which lora::Adam forms in double before rounding to P (as
  // PyTorch does): in float, 1 - 0.999f is 1.3e-5 off 0.001, enough to move
  // the parameters 1e-6 away from PyTorch's within a few steps.
  P one_minus_beta1 = P(1) - beta1;
  P one_minus_beta2 = P(1) - beta2;
};

namespace detail {
template <class B, class = void>
struct has_backend_types : std::false_type {};
template <class B>
struct has_backend_types<B, std::void_t<typename B::Context, typename B::Space, typename B::template Matrix<float>,
                                        typename B::template View<float>>> : std::true_type {};

template <class B, class = void>
struct has_backend_ops : std::false_type {};
template <class B>
struct has_backend_ops<
    B, std::void_t<decltype(B::template gemm<float, float>(
                       std::declval<typename B::Context&>(), Op::N, Op::T, 1.0, std::declval<MatrixView<const float, typename B::Space>>(),
                       std::declval<MatrixView<const float, typename B::Space>>(), 0.0,
                       std::declval<MatrixView<float, typename B::Space>>())),
                   decltype(B::fill(std::declval<typename B::Context&>(), std::declval<MatrixView<float, typename B::Space>>(), 0.0f)),
                   decltype(B::sum_squares(std::declval<typename B::Context&>(),
                                           std::declval<MatrixView<const float, typename B::Space>>())),
                   decltype(B::adam_step(std::declval<typename B::Context&>(), std::declval<const AdamSlot<float>*>(),
                                         std::size_t{}, std::declval<const AdamStep<float>&>()))>> : std::true_type {};
}  // namespace detail

// True when B provides the types and the core operations of a backend.
template <class B>
inline constexpr bool is_backend_v = detail::has_backend_types<B>::value && detail::has_backend_ops<B>::value;

#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
// For users' own templates on C++20; the library itself static_asserts
// is_backend_v so that C++17 gets the same check.
template <class B>
concept Backend = is_backend_v<B>;
#endif

}  // namespace lora

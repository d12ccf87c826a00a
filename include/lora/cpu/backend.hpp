// lora::cpu::Backend: the CPU implementation of the Backend interface, on
// Eigen 3.4 (row-major maps over MatrixView; Eigen types stay in this file).
// With LORA_HAS_CBLAS (CMake option LORA_USE_CBLAS) the large float/double
// GEMMs go to a CBLAS such as OpenBLAS instead of Eigen's own kernel; this is
// a macro of ours, so Eigen in the user's own code is left as it was.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "lora/core/backend.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/random.hpp"
#include "lora/cpu/dropout.hpp"
#include "lora/quant/nf4.hpp"

#if defined(LORA_HAS_CBLAS)
#include <cblas.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lora::cpu {

// The CPU needs no handle; the type exists so that every backend call has the
// same shape. A layer borrows it and never owns it.
struct Context {};

// An owning, move-only, zero-initialised row-major host matrix. Copies are
// explicit (clone()) so that a 64 MB weight is never copied by accident.
template <class T>
class Matrix {
 public:
  Matrix() = default;
  Matrix(std::int64_t rows, std::int64_t cols) : rows_(rows), cols_(cols), data_(checked_size(rows, cols)) {}
  Matrix(const Matrix&) = delete;
  Matrix& operator=(const Matrix&) = delete;
  Matrix(Matrix&& other) noexcept { swap(other); }
  Matrix& operator=(Matrix&& other) noexcept {
    Matrix(std::move(other)).swap(*this);
    return *this;
  }

  Matrix clone() const {
    Matrix copy(rows_, cols_);
    std::copy_n(data_.begin(), copy.data_.size(), copy.data_.begin());
    return copy;
  }

  // rows x cols over the storage it has when that holds rows * cols elements
  // (they keep their values in memory order), else over new zeroed storage:
  // a workspace grows and is reused when N changes. bytes() is the storage's.
  void reshape(std::int64_t rows, std::int64_t cols) {
    const std::size_t need = checked_size(rows, cols);
    if (need > data_.size()) data_ = std::vector<T>(need);
    rows_ = rows;
    cols_ = cols;
  }

  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  std::int64_t size() const { return rows_ * cols_; }
  std::size_t bytes() const { return data_.size() * sizeof(T); }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  T& operator()(std::int64_t i, std::int64_t j) { return data_[static_cast<std::size_t>(i * cols_ + j)]; }
  const T& operator()(std::int64_t i, std::int64_t j) const { return data_[static_cast<std::size_t>(i * cols_ + j)]; }

  MatrixView<T, HostSpace> view() { return {data_.data(), rows_, cols_}; }
  MatrixView<const T, HostSpace> view() const { return {data_.data(), rows_, cols_}; }

 private:
  static std::size_t checked_size(std::int64_t rows, std::int64_t cols) {
    LORA_CHECK(rows >= 0 && cols >= 0, "matrix shape [" << rows << ", " << cols << "]: expected non-negative sizes");
    LORA_CHECK(cols == 0 || rows <= std::numeric_limits<std::int64_t>::max() / cols,
               "matrix shape [" << rows << ", " << cols << "]: the element count overflows");
    return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
  }
  void swap(Matrix& other) noexcept {
    std::swap(rows_, other.rows_);
    std::swap(cols_, other.cols_);
    data_.swap(other.data_);
  }

  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  std::vector<T> data_;
};

namespace detail {

template <class T>
using EigenRowMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using EigenMap = Eigen::Map<EigenRowMajor<std::remove_const_t<T>>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using EigenConstMap = Eigen::Map<const EigenRowMajor<std::remove_const_t<T>>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
EigenMap<T> map(MatrixView<T, HostSpace> v) {
  return EigenMap<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.stride));
}
template <class T>
EigenConstMap<T> cmap(MatrixView<const T, HostSpace> v) {
  return EigenConstMap<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.stride));
}

// Which GEMMs go to the CBLAS (measured with OpenBLAS 0.3.21 on 2 Zen 3 cores,
// bench/RESULTS.md). From 32^3 multiply-adds on, OpenBLAS beats Eigen's kernel
// (1.4-1.7 vs 2.3-2.7 us at 32^3, 0.26 vs 0.79 ms at 256^3). A product with a
// dimension of 1 (one token: x W^T is a GEMV, dL_dA = g^T x an outer product)
// stays with Eigen, which streams W once (1 x 4096 x 4096: 3.2 ms) where
// OpenBLAS 0.3.21 packs it as for a GEMM (6 ms idle, 30 ms on a busy machine).
// Small products also stay under Eigen's own OpenMP threshold (~1e5
// multiply-adds), whose threads spin-wait on each other and stall for
// milliseconds when the machine is oversubscribed.
inline constexpr std::int64_t kCblasMinMacs = std::int64_t{1} << 15;
inline bool use_cblas(std::int64_t m, std::int64_t n, std::int64_t k) {
  return m > 1 && n > 1 && k > 1 && m * n * k >= kCblasMinMacs;
}
// Elementwise loops (dropout, its mask, Adam) run on several threads only from
// 2^20 elements on, and then on threads of their own (parallel_rows), not on
// OpenMP's pool: OpenMP's threads and OpenBLAS's (pthreads) threads fight over
// the cores when elementwise regions and GEMMs alternate, each pool spinning
// while it waits (libgomp ~8 ms after a region, on a core OpenBLAS's next GEMM
// wants). A LoRA step at d = 1024, N = 512, r = 64 took 29 ms with its two Adam
// tensors (65k each) on two OpenMP threads and 21 ms on one; the dropout-0.1
// step at d = 4096, N = 2048 takes 0.96 x the time with these loops on
// parallel_rows instead of OpenMP regions (bench/ab.sh, bench/RESULTS.md).
// Large tensors gain from the threads (2 Zen 5 cores, 1 -> 2 threads): dropout
// of 8M elements 11.8 -> 6.0 ms, its mask alone 7.9 -> 4.1 ms, Adam over 16.7M
// floats 25-33 -> 19 ms; the same as OpenMP's regions gave, run alone.
inline constexpr std::int64_t kParallelMinElements = std::int64_t{1} << 20;
// Each thread of parallel_rows gets at least this many elements (starting a
// thread costs ~10-50 us; 2^18 elements of the mask take ~0.12 ms).
inline constexpr std::int64_t kParallelMinElementsPerThread = std::int64_t{1} << 18;

// How many threads parallel_rows may use: OpenMP's setting (OMP_NUM_THREADS)
// where the library is built with it (LORA_USE_OPENMP), else one; one inside
// the caller's own OpenMP parallel region (as a nested region would get).
inline std::int64_t elementwise_threads() {
#if defined(_OPENMP)
  if (omp_in_parallel()) return 1;
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

// fn(begin, end) over [0, rows) in contiguous chunks, `elements` being the
// work's size: on the calling thread alone below kParallelMinElements, else
// on it and threads started for this call and joined before returning, so
// none is left spinning beside OpenBLAS's. The chunks and so the results do
// not depend on how many threads run.
template <class F>
void parallel_rows(std::int64_t rows, std::int64_t elements, F&& fn) {
  std::int64_t threads = 1;
  if (elements >= kParallelMinElements)
    threads = std::min({elementwise_threads(), rows, elements / kParallelMinElementsPerThread});
  if (threads <= 1) {
    if (rows > 0) fn(std::int64_t{0}, rows);
    return;
  }
  const auto chunk = [rows, threads](std::int64_t t) { return rows * t / threads; };
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(threads));
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<std::size_t>(threads - 1));
  std::int64_t t = 1;
  try {
    for (; t < threads; ++t) {
      helpers.emplace_back([&fn, &errors, &chunk, t] {
        try {
          fn(chunk(t), chunk(t + 1));
        } catch (...) {
          errors[static_cast<std::size_t>(t)] = std::current_exception();
        }
      });
    }
  } catch (const std::system_error&) {  // no thread to be had: the rest runs here
  }
  try {
    fn(chunk(0), chunk(1));
    for (std::int64_t u = t; u < threads; ++u) fn(chunk(u), chunk(u + 1));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& h : helpers) h.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// x_i = sqrt(x_i), correctly rounded (what std::sqrt gives) and vectorised.
// A loop of std::sqrt is not vectorised (errno), and Eigen's float sqrt is an
// approximation under EIGEN_FAST_MATH, its default; _mm_sqrt_ps/pd are exact.
template <class P>
inline void sqrt_in_place(P* x, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<P, float>) {
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
  } else if constexpr (std::is_same_v<P, double>) {
    for (; i + 2 <= n; i += 2) _mm_storeu_pd(x + i, _mm_sqrt_pd(_mm_loadu_pd(x + i)));
  }
#endif
  for (; i < n; ++i) x[i] = std::sqrt(x[i]);
}

// Adam over elements [begin, begin + len) of one slot, len <= kAdamChunk:
//   g = grad (+ wd theta);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g
//   theta = theta (1 - lr wd, AdamW) - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
inline constexpr std::int64_t kAdamChunk = 2048;
template <bool kDecoupled, class P>
void adam_chunk(const AdamSlot<P>& slot, const AdamStep<P>& h, std::int64_t begin, std::int64_t len) {
  P* __restrict param = slot.param + begin;
  const P* __restrict grad = slot.grad + begin;
  P* __restrict m = slot.m + begin;
  P* __restrict v = slot.v + begin;
  const P step_size = slot.lr / h.bias_correction1;
  const P decay = P(1) - slot.lr * slot.weight_decay;
  P denom[kAdamChunk];
  for (std::int64_t i = 0; i < len; ++i) {
    const P g = kDecoupled ? grad[i] : grad[i] + slot.weight_decay * param[i];
    m[i] = h.beta1 * m[i] + h.one_minus_beta1 * g;
    v[i] = h.beta2 * v[i] + h.one_minus_beta2 * g * g;
    denom[i] = v[i];
  }
  sqrt_in_place(denom, len);
  for (std::int64_t i = 0; i < len; ++i) {
    const P theta = kDecoupled ? param[i] * decay : param[i];
    param[i] = theta - step_size * (m[i] / (denom[i] / h.bias_correction2_sqrt + h.eps));
  }
}

// y[i, j] = v[0, index(i, j)] x[i, j] + beta y[i, j], in the wider of the two
// types; beta == 0 never reads y. On the calling thread only: DoRA runs it
// between the layer's GEMMs, and an OpenMP region there leaves OpenMP's
// threads spinning on the cores OpenBLAS's GEMM needs next (see
// nf4_dequantize_rows); the pass is memory-bound anyway.
template <class Tv, class T, class Index>
void scale_by_vector(MatrixView<const Tv, HostSpace> v, MatrixView<const T, HostSpace> x, double beta,
                     MatrixView<T, HostSpace> y, Index index) {
  using C = std::conditional_t<(sizeof(Tv) > sizeof(T)), Tv, T>;
  const std::int64_t rows = x.rows, cols = x.cols;
  const C b = static_cast<C>(beta);
  for (std::int64_t i = 0; i < rows; ++i) {
    if (beta == 0.0) {
      for (std::int64_t j = 0; j < cols; ++j) y(i, j) = static_cast<T>(static_cast<C>(v(0, index(i, j))) * x(i, j));
    } else {
      for (std::int64_t j = 0; j < cols; ++j)
        y(i, j) = static_cast<T>(static_cast<C>(v(0, index(i, j))) * x(i, j) + b * y(i, j));
    }
  }
}

#if defined(LORA_HAS_CBLAS)
inline CBLAS_TRANSPOSE cblas_op(Op op) { return op == Op::T ? CblasTrans : CblasNoTrans; }
inline void cblas_gemm(Op op_a, Op op_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                       int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, cblas_op(op_a), cblas_op(op_b), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void cblas_gemm(Op op_a, Op op_b, int m, int n, int k, double alpha, const double* a, int lda,
                       const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, cblas_op(op_a), cblas_op(op_b), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#endif

// c = alpha op(a) op(b) + beta c on Eigen's own kernels, for any shape the
// caller has checked. With beta == 0, c is written without being read. Not
// inline: it is most of the cost of compiling the CPU backend (Eigen's GEMM,
// GEMV and small-product paths for four transpose cases, at -O3), and an
// explicit instantiation declaration (below) lets one translation unit
// compile it for a whole program.
template <class T>
void eigen_gemm(Op op_a, Op op_b, T alpha, MatrixView<const T, HostSpace> a, MatrixView<const T, HostSpace> b,
                double beta, MatrixView<T, HostSpace> c) {
  auto cm = map(c);
  const auto am = cmap<T>(a);
  const auto bm = cmap<T>(b);
  auto run = [&](const auto& opa, const auto& opb) {
    if (beta == 0.0) {
      cm.noalias() = alpha * (opa * opb);
    } else {
      if (beta != 1.0) cm *= static_cast<T>(beta);
      cm.noalias() += alpha * (opa * opb);
    }
  };
  if (op_a == Op::N && op_b == Op::N) run(am, bm);
  if (op_a == Op::N && op_b == Op::T) run(am, bm.transpose());
  if (op_a == Op::T && op_b == Op::N) run(am.transpose(), bm);
  if (op_a == Op::T && op_b == Op::T) run(am.transpose(), bm.transpose());
}

}  // namespace detail

// Separate compilation of the Eigen GEMM, for programs (and this project's
// tests) of many translation units: define LORA_CPU_EXTERN_TEMPLATES in every
// one of them, and LORA_CPU_IMPLEMENTATION as well in exactly one, before
// including <lora/lora.hpp>; that one compiles eigen_gemm<float> and
// eigen_gemm<double> for all. Without the macros the library is header-only
// as always; the kernels are the same either way.
#define LORA_CPU_DETAIL_EIGEN_GEMM(T)                                                                            \
  template void detail::eigen_gemm<T>(Op, Op, T, MatrixView<const T, HostSpace>, MatrixView<const T, HostSpace>, \
                                      double, MatrixView<T, HostSpace>)
#if defined(LORA_CPU_EXTERN_TEMPLATES)
extern LORA_CPU_DETAIL_EIGEN_GEMM(float);
extern LORA_CPU_DETAIL_EIGEN_GEMM(double);
#endif
#if defined(LORA_CPU_IMPLEMENTATION)
LORA_CPU_DETAIL_EIGEN_GEMM(float);
LORA_CPU_DETAIL_EIGEN_GEMM(double);
#endif
#undef LORA_CPU_DETAIL_EIGEN_GEMM

struct Backend {
  using Context = cpu::Context;
  using Space = HostSpace;
  template <class T>
  using Matrix = cpu::Matrix<T>;
  template <class T>
  using View = MatrixView<T, HostSpace>;
  static constexpr const char* kName = "cpu";
  // The layer's dropout path works on row blocks of about this many elements
  // of an N x d_in matrix (1 MiB of float: drop(x) of a block is still in the
  // cache when its GEMM reads it).
  static constexpr std::int64_t kRowBlockElements = std::int64_t{1} << 18;

  // c = alpha op(a) op(b) + beta c. With beta == 0, c is written without being
  // read, so stale or NaN contents never leak into the result.
  template <class Tin, class Tout>
  static void gemm(Context&, Op op_a, Op op_b, double alpha, MatrixView<const Tin, HostSpace> a,
                   MatrixView<const Tin, HostSpace> b, double beta, MatrixView<Tout, HostSpace> c) {
    static_assert(std::is_same_v<Tin, Tout>, "the CPU backend computes in one type: float or double");
    const auto [m, n, k] = gemm_shape(op_a, op_b, a, b, c);
    if (m == 0 || n == 0) return;
    if (k == 0) {
      scale(c, beta);
      return;
    }
#if defined(LORA_HAS_CBLAS)
    // CBLAS takes int sizes and strides; a GEMM past them stays with Eigen's
    // 64-bit indices (slower, but right).
    if (detail::use_cblas(m, n, k)) {
      if (const std::optional<BlasGemmArgs> i = blas_gemm_args({m, n, k}, a, b, c)) {
        detail::cblas_gemm(op_a, op_b, i->m, i->n, i->k, static_cast<Tout>(alpha), a.data, i->lda, b.data, i->ldb,
                           static_cast<Tout>(beta), c.data, i->ldc);
        return;
      }
    }
#endif
    detail::eigen_gemm<Tout>(op_a, op_b, static_cast<Tout>(alpha), a, b, beta, c);
  }

  // Every term's c = alpha op(a) op(b) + beta c, in order (the GPU backend's
  // one launch for many small GEMMs; here each term is a GEMM of its own).
  // No term's c may overlap another term's operands or output.
  template <class Tin, class Tout>
  static void gemm_grouped(Context& ctx, Op op_a, Op op_b, const std::vector<GemmTerm<Tin, Tout, HostSpace>>& terms) {
    for (const auto& t : terms) gemm<Tin, Tout>(ctx, op_a, op_b, t.alpha, t.a, t.b, t.beta, t.c);
  }

  // y[i, :] += bias[0, :] for every row i.       y: N x d_out, bias: 1 x d_out
  template <class T>
  static void add_row_vector(Context&, MatrixView<T, HostSpace> y, MatrixView<const T, HostSpace> bias) {
    check_view(y, "add_row_vector: y");
    check_shape(bias, 1, y.cols, "add_row_vector: bias");
    detail::map(y).rowwise() += detail::cmap<T>(bias).row(0);
  }

  // out = x * keep / (1 - p), keep = dropout_keep(seed, stream, call, i * cols + j):
  // a row's keep bits (detail::keep_bits: one Philox call per four elements,
  // sixteen calls side by side), then the bits applied (dropout_mask and
  // apply_dropout_mask, fused per row). Rows run on several threads from 2^20
  // elements (detail::parallel_rows). out may alias x.
  template <class T>
  static void dropout(Context&, MatrixView<const T, HostSpace> x, MatrixView<T, HostSpace> out, float p,
                      std::uint64_t seed, std::uint32_t stream, std::uint32_t call) {
    check_view(x, "dropout: x");
    check_shape(out, x.rows, x.cols, "dropout: out");
    const T keep_scale = static_cast<T>(1.0 / (1.0 - static_cast<double>(p)));
    const std::uint32_t threshold = dropout_keep_threshold(p);
    const std::uint64_t rng_stream = dropout_stream(stream);
    const std::int64_t rows = x.rows, cols = x.cols;
    detail::parallel_rows(rows, rows * cols, [&](std::int64_t begin, std::int64_t end) {
      std::vector<std::uint32_t> randoms(detail::keep_bits_scratch(cols));
      std::vector<std::uint32_t> words(static_cast<std::size_t>(dropout_mask_words(cols)));
      for (std::int64_t i = begin; i < end; ++i) {
        detail::keep_bits(seed, rng_stream, call, static_cast<std::uint64_t>(i * cols), cols, threshold,
                          randoms.data(), words.data());
        detail::apply_bits(x.data + i * x.stride, words.data(), cols, keep_scale, out.data + i * out.stride);
      }
    });
  }

  // The keep bits of a rows x cols dropout, once: bits (rows x
  // dropout_mask_words(cols)) gets bit j % 32 of word j / 32 of row i =
  // dropout_keep(seed, stream, call, i * cols + j, p), the bits past cols 0.
  // 1 bit per element (a 2048 x 4096 mask is 1 MiB), for apply_dropout_mask.
  static void dropout_mask(Context&, std::int64_t cols, float p, std::uint64_t seed, std::uint32_t stream,
                           std::uint32_t call, MatrixView<std::uint32_t, HostSpace> bits) {
    check_view(bits, "dropout_mask: bits");
    LORA_CHECK(cols >= 0 && bits.cols == dropout_mask_words(cols),
               "dropout_mask: bits has " << bits.cols << " words per row, a row of " << cols << " elements needs "
                                         << dropout_mask_words(cols));
    const std::uint32_t threshold = dropout_keep_threshold(p);
    const std::uint64_t rng_stream = dropout_stream(stream);
    const std::int64_t rows = bits.rows;
    detail::parallel_rows(rows, rows * cols, [&](std::int64_t begin, std::int64_t end) {
      std::vector<std::uint32_t> randoms(detail::keep_bits_scratch(cols));
      for (std::int64_t i = begin; i < end; ++i)
        detail::keep_bits(seed, rng_stream, call, static_cast<std::uint64_t>(i * cols), cols, threshold,
                          randoms.data(), bits.data + i * bits.stride);
    });
  }

  // out = keep ? x / (1 - p) : 0, keep from bits (dropout_mask's layout; a
  // row block of the mask goes with the same rows of x): dropout's result bit
  // for bit (1 / (1 - p) rounded to T as dropout rounds it). out may alias x.
  // On the calling thread: the layer runs it on row blocks between its GEMMs.
  template <class T>
  static void apply_dropout_mask(Context&, MatrixView<const T, HostSpace> x,
                                 MatrixView<const std::uint32_t, HostSpace> bits, float p,
                                 MatrixView<T, HostSpace> out) {
    check_view(x, "apply_dropout_mask: x");
    check_shape(bits, x.rows, dropout_mask_words(x.cols), "apply_dropout_mask: bits");
    check_shape(out, x.rows, x.cols, "apply_dropout_mask: out");
    const T keep_scale = static_cast<T>(1.0 / (1.0 - static_cast<double>(p)));
    for (std::int64_t i = 0; i < x.rows; ++i)
      detail::apply_bits(x.data + i * x.stride, bits.data + i * bits.stride, x.cols, keep_scale,
                         out.data + i * out.stride);
  }

  template <class T>
  static void fill(Context&, MatrixView<T, HostSpace> x, T value) {
    check_view(x, "fill: x");
    detail::map(x).setConstant(value);
  }

  // y += alpha x, computed in double and rounded once to Ty.
  template <class Tx, class Ty>
  static void add_scaled(Context&, double alpha, MatrixView<const Tx, HostSpace> x, MatrixView<Ty, HostSpace> y) {
    check_view(x, "add_scaled: x");
    check_shape(y, x.rows, x.cols, "add_scaled: y");
    auto ym = detail::map(y);
    ym = (ym.template cast<double>() + alpha * detail::cmap<Tx>(x).template cast<double>()).template cast<Ty>();
  }

  // dst = src, converting the element type.
  template <class Ts, class Td>
  static void convert(Context&, MatrixView<const Ts, HostSpace> src, MatrixView<Td, HostSpace> dst) {
    check_view(src, "convert: src");
    check_shape(dst, src.rows, src.cols, "convert: dst");
    detail::map(dst) = detail::cmap<Ts>(src).template cast<Td>();
  }

  // Host <-> backend copies (on the CPU both are plain copies).
  template <class T>
  static void copy_from_host(Context& ctx, MatrixView<const T, HostSpace> host, MatrixView<T, HostSpace> dst) {
    convert(ctx, host, dst);
  }
  template <class T>
  static void copy_to_host(Context& ctx, MatrixView<const T, HostSpace> src, MatrixView<T, HostSpace> host) {
    convert(ctx, src, host);
  }

  // dst[i, :] = src[rows[0, i], :] for i < n.   dst: n x c, src: m x c, rows: 1 x n, each in [0, m)
  template <class T>
  static void gather_rows(Context&, MatrixView<const T, HostSpace> src, MatrixView<const std::int64_t, HostSpace> rows,
                          MatrixView<T, HostSpace> dst) {
    check_view(src, "gather_rows: src");
    check_shape(rows, 1, dst.rows, "gather_rows: rows");
    check_shape(dst, rows.cols, src.cols, "gather_rows: dst");
    for (std::int64_t i = 0; i < dst.rows; ++i) {
      const std::int64_t r = rows(0, i);
      LORA_CHECK(r >= 0 && r < src.rows, "gather_rows: rows[" << i << "] = " << r << ", expected [0, " << src.rows << ")");
      std::copy_n(src.data + r * src.stride, src.cols, dst.data + i * dst.stride);
    }
  }

  // dst[rows[0, i], :] += src[i, :] for i < n.   src: n x c, dst: m x c, rows: 1 x n, each in [0, m)
  // and all distinct, so no two rows of src meet in one row of dst (no atomics needed).
  template <class T>
  static void scatter_add_rows(Context&, MatrixView<const T, HostSpace> src,
                               MatrixView<const std::int64_t, HostSpace> rows, MatrixView<T, HostSpace> dst) {
    check_view(dst, "scatter_add_rows: dst");
    check_shape(rows, 1, src.rows, "scatter_add_rows: rows");
    check_shape(src, rows.cols, dst.cols, "scatter_add_rows: src");
    for (std::int64_t i = 0; i < src.rows; ++i) {
      const std::int64_t r = rows(0, i);
      LORA_CHECK(r >= 0 && r < dst.rows,
                 "scatter_add_rows: rows[" << i << "] = " << r << ", expected [0, " << dst.rows << ")");
      detail::map(dst).row(r) += detail::cmap<T>(src).row(i);
    }
  }

  // sum of x_ij^2, accumulated in double.
  template <class T>
  static double sum_squares(Context&, MatrixView<const T, HostSpace> x) {
    check_view(x, "sum_squares: x");
    return detail::cmap<T>(x).template cast<double>().squaredNorm();
  }

  // sums[t] = sum_squares(xs[t]) for each of the count views.
  template <class T>
  static void sum_squares_each(Context& ctx, const MatrixView<const T, HostSpace>* xs, std::size_t count,
                               double* sums) {
    for (std::size_t t = 0; t < count; ++t) sums[t] = sum_squares(ctx, xs[t]);
  }

  // ---- per-row and per-column vectors (DoRA's magnitude, adapters/lora.hpp) ----
  // With beta == 0, y (out) is written without being read. y may be x itself.

  // y[i, j] = v[0, j] x[i, j] + beta y[i, j]           x, y: n x d, v: 1 x d
  template <class Tv, class T>
  static void scale_columns(Context&, MatrixView<const Tv, HostSpace> v, MatrixView<const T, HostSpace> x, double beta,
                            MatrixView<T, HostSpace> y) {
    check_view(x, "scale_columns: x");
    check_shape(v, 1, x.cols, "scale_columns: v");
    check_shape(y, x.rows, x.cols, "scale_columns: y");
    detail::scale_by_vector(v, x, beta, y, [](std::int64_t, std::int64_t j) { return j; });
  }

  // y[i, j] = v[0, i] x[i, j] + beta y[i, j]           x, y: n x d, v: 1 x n
  template <class Tv, class T>
  static void scale_rows(Context&, MatrixView<const Tv, HostSpace> v, MatrixView<const T, HostSpace> x, double beta,
                         MatrixView<T, HostSpace> y) {
    check_view(x, "scale_rows: x");
    check_shape(v, 1, x.rows, "scale_rows: v");
    check_shape(y, x.rows, x.cols, "scale_rows: y");
    detail::scale_by_vector(v, x, beta, y, [](std::int64_t i, std::int64_t) { return i; });
  }

  // out[0, j] = alpha sum_i a[i, j] b[i, j] + beta out[0, j]     a, b: n x d, out: 1 x d
  // Accumulated in double, rounded once to Tout.
  template <class T, class Tout>
  static void column_dots(Context&, double alpha, MatrixView<const T, HostSpace> a, MatrixView<const T, HostSpace> b,
                          double beta, MatrixView<Tout, HostSpace> out) {
    check_view(a, "column_dots: a");
    check_shape(b, a.rows, a.cols, "column_dots: b");
    check_shape(out, 1, a.cols, "column_dots: out");
    std::vector<double> sums(static_cast<std::size_t>(a.cols), 0.0);
    for (std::int64_t i = 0; i < a.rows; ++i) {
      const T* ai = a.data + i * a.stride;
      const T* bi = b.data + i * b.stride;
      for (std::int64_t j = 0; j < a.cols; ++j)
        sums[static_cast<std::size_t>(j)] += static_cast<double>(ai[j]) * static_cast<double>(bi[j]);
    }
    for (std::int64_t j = 0; j < a.cols; ++j) {
      const double kept = beta == 0.0 ? 0.0 : beta * static_cast<double>(out(0, j));
      out(0, j) = static_cast<Tout>(alpha * sums[static_cast<std::size_t>(j)] + kept);
    }
  }

  // out[0, i] = alpha sum_j a[i, j] b[i, j] + beta out[0, i]     a, b: n x d, out: 1 x n
  // Accumulated in double, rounded once to Tout.
  template <class T, class Tout>
  static void row_dots(Context&, double alpha, MatrixView<const T, HostSpace> a, MatrixView<const T, HostSpace> b,
                       double beta, MatrixView<Tout, HostSpace> out) {
    check_view(a, "row_dots: a");
    check_shape(b, a.rows, a.cols, "row_dots: b");
    check_shape(out, 1, a.rows, "row_dots: out");
    for (std::int64_t i = 0; i < a.rows; ++i) {
      double sum = 0.0;
      for (std::int64_t j = 0; j < a.cols; ++j) sum += static_cast<double>(a(i, j)) * static_cast<double>(b(i, j));
      const double kept = beta == 0.0 ? 0.0 : beta * static_cast<double>(out(0, i));
      out(0, i) = static_cast<Tout>(alpha * sum + kept);
    }
  }

  // DoRA's column scale from a squared norm given in two parts, in double:
  //   n_j = sqrt(sq[0, j] + s cross[0, j]);  inv_n[0, j] = 1 / n_j;  c[0, j] = m[0, j] / n_j     (all 1 x d)
  template <class P>
  static void magnitude_scale(Context&, MatrixView<const P, HostSpace> m, MatrixView<const P, HostSpace> sq,
                              MatrixView<const P, HostSpace> cross, double s, MatrixView<P, HostSpace> inv_n,
                              MatrixView<P, HostSpace> c) {
    check_shape(m, 1, m.cols, "magnitude_scale: m");
    check_shape(sq, 1, m.cols, "magnitude_scale: sq");
    check_shape(cross, 1, m.cols, "magnitude_scale: cross");
    check_shape(inv_n, 1, m.cols, "magnitude_scale: inv_n");
    check_shape(c, 1, m.cols, "magnitude_scale: c");
    for (std::int64_t j = 0; j < m.cols; ++j) {
      const double n = std::sqrt(static_cast<double>(sq(0, j)) + s * static_cast<double>(cross(0, j)));
      inv_n(0, j) = static_cast<P>(1.0 / n);
      c(0, j) = static_cast<P>(static_cast<double>(m(0, j)) / n);
    }
  }

  template <class T>
  static void scale(Context&, MatrixView<T, HostSpace> x, double factor) {
    check_view(x, "scale: x");
    scale(x, factor);
  }

  // Rows [first_row, first_row + out.rows) of the NF4 weight w into out
  // (out.cols == w.cols): each value the float nf4::code_value(q) *
  // w.block_absmax(b), then converted to T (nf4::dequantize_rows). On the
  // calling thread only: Nf4Base alternates a tile's dequantization with the
  // tile's GEMM on OpenBLAS's threads, and an OpenMP region between them left
  // OpenMP's threads spinning on the cores the GEMM needed (the LoRA step over
  // an NF4 base at d = 4096, N = 512 took 1.34-1.61 x the dense step with the
  // rows on 2 OpenMP threads, 1.31-1.35 x on one; at N = 1, 7.8 -> 4.7 x;
  // bench/RESULTS.md, NF4). One thread dequantizes ~0.69 ns per value.
  template <class T>
  static void nf4_dequantize_rows(Context&, const nf4::View<HostSpace>& w, std::int64_t first_row,
                                  MatrixView<T, HostSpace> out) {
    check_view(out, "nf4_dequantize_rows: out");
    LORA_CHECK(out.cols == w.cols && first_row >= 0 && first_row + out.rows <= w.rows,
               "nf4_dequantize_rows: rows [" << first_row << ", " << first_row + out.rows << ") into a " << out.rows
                                             << " x " << out.cols << " view, of a " << w.rows << " x " << w.cols
                                             << " weight");
    nf4::dequantize_rows(w, first_row, out.rows, out.data, out.stride);
  }

  // nf4::quantize_blocks: W (any stride, flattened row-major) in blocks of
  // `blocksize` -> packed ((n + 1) / 2 bytes) and absmax (one float per block).
  template <class T>
  static void nf4_quantize_blocks(Context&, MatrixView<const T, HostSpace> W, std::int64_t blocksize,
                                  std::uint8_t* packed, float* absmax) {
    check_view(W, "nf4_quantize_blocks: W");
    nf4::check_quantize_blocks_args(W.rows * W.cols, blocksize, packed, absmax);
    nf4::quantize_blocks(W.data, W.rows, W.cols, W.stride, blocksize, packed, absmax);
  }

  // One Adam/AdamW step over every slot (see lora::AdamStep for the formula).
  // Each element gets exactly the operations of the formula, in its order; the
  // work is cut into cache-sized chunks whose loops the compiler vectorises
  // (detail::sqrt_in_place takes the sqrt out of them), and a large tensor's
  // chunks run on several threads (detail::parallel_rows): 16.7M floats took
  // ~140 ms in one scalar loop, 36 ms this way on one core, 18 ms on two (Zen 3).
  template <class P>
  static void adam_step(Context&, const AdamSlot<P>* slots, std::size_t count, const AdamStep<P>& h) {
    for (std::size_t s = 0; s < count; ++s) {
      const AdamSlot<P>& slot = slots[s];
      const std::int64_t chunks = (slot.n + detail::kAdamChunk - 1) / detail::kAdamChunk;
      detail::parallel_rows(chunks, slot.n, [&](std::int64_t first, std::int64_t last) {
        for (std::int64_t c = first; c < last; ++c) {
          const std::int64_t begin = c * detail::kAdamChunk;
          const std::int64_t len = std::min(detail::kAdamChunk, slot.n - begin);
          if (h.decoupled) {
            detail::adam_chunk<true>(slot, h, begin, len);
          } else {
            detail::adam_chunk<false>(slot, h, begin, len);
          }
        }
      });
    }
  }

  static void synchronize(Context&) {}

 private:
  template <class T>
  static void scale(MatrixView<T, HostSpace> x, double factor) {
    if (factor == 0.0) {
      detail::map(x).setZero();  // beta == 0 never reads x
    } else {
      detail::map(x) *= static_cast<T>(factor);
    }
  }
};

static_assert(is_backend_v<Backend>, "lora::cpu::Backend must satisfy the Backend interface");

}  // namespace lora::cpu

// Host decompositions for building adapters from weights: the truncated SVD
// W ≈ U_r diag(S_r) V_rᵀ (extraction, PiSSA) and the thin QR W = Q R (OLoRA),
// on Eigen, in double. Exact (Eigen's BDCSVD) for small matrices; randomized
// (Halko, Martinsson & Tropp 2011, as torch.svd_lowrank) for large ones.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "lora/core/backend.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/random.hpp"
#include "lora/cpu/backend.hpp"

namespace lora::linalg {

enum class SvdMethod {
  kAuto,        // exact up to SvdOptions::exact_max_dim, randomized above it
  kExact,       // Eigen::BDCSVD of the whole matrix: O(m n min(m, n))
  kRandomized,  // a rank-(r + p) sketch: O(m n (r + p) (2 q + 2)) plus small dense work
};

struct SvdOptions {
  SvdMethod method = SvdMethod::kAuto;
  // kAuto takes the exact path when min(m, n) <= exact_max_dim, or when the
  // sketch would not be much smaller than the matrix (4 (r + p) > min(m, n)).
  std::int64_t exact_max_dim = 1024;
  // Randomized path. The defaults are torch.svd_lowrank(W, q = r, niter = 2),
  // which PEFT's "pissa_niter_N" calls with niter = N: no oversampling.
  std::int64_t oversampling = 0;  // p: the sketch has r + p columns (Halko et al. suggest 5 to 10)
  int power_iterations = 2;       // q: passes of (W Wᵀ), each followed by a QR
  std::uint64_t seed = 0;         // of the Gaussian test matrix (lora::standard_normal, stream 0)
};

// W ≈ U diag(S) Vᵀ with U: m x r, S: r, V: n x r, row-major, in double.
// S descends; the columns of U and V are orthonormal. Sign convention, so
// that a matrix gives the same factors on every run and path: in each column
// of U the entry of largest magnitude (the first one, on a tie) is positive,
// and the matching column of V carries the same sign flip.
struct Svd {
  cpu::Matrix<double> U;
  std::vector<double> S;
  cpu::Matrix<double> V;
  std::int64_t rank() const { return static_cast<std::int64_t>(S.size()); }
};

// W = Q R (thin): Q: m x k with orthonormal columns, R: k x n upper
// triangular, k = min(m, n), row-major, in double. Householder, as LAPACK's
// geqrf that torch.linalg.qr calls: R's diagonal may be negative, as there.
struct Qr {
  cpu::Matrix<double> Q;
  cpu::Matrix<double> R;
};

namespace detail {

using ColMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// W as a row-major double matrix, checked: a valid, non-empty view of finite numbers.
template <class T>
cpu::Matrix<double> to_double(MatrixView<T, HostSpace> W, const char* call) {
  static_assert(std::is_floating_point_v<std::remove_const_t<T>>, "linalg: W must hold float or double");
  check_view(W, "W", call);
  LORA_CHECK(W.rows > 0 && W.cols > 0, call << ": W is empty ([" << W.rows << ", " << W.cols
                                            << "]); a decomposition needs at least one row and one column");
  cpu::Matrix<double> out(W.rows, W.cols);
  for (std::int64_t i = 0; i < W.rows; ++i) std::copy(&W(i, 0), &W(i, 0) + W.cols, &out(i, 0));
  if (Eigen::Map<const RowMajor>(out.data(), out.rows(), out.cols()).allFinite()) return out;
  for (std::int64_t i = 0; i < W.rows; ++i)  // name the first culprit
    for (std::int64_t j = 0; j < W.cols; ++j)
      LORA_CHECK(std::isfinite(out(i, j)), call << ": W(" << i << ", " << j << ") = " << out(i, j)
                                                << "; a decomposition needs finite numbers (check the weight for overflow)");
  return out;
}

inline Eigen::Map<const RowMajor> eigen(const cpu::Matrix<double>& m) {
  return Eigen::Map<const RowMajor>(m.data(), m.rows(), m.cols());
}

template <class Derived>
cpu::Matrix<double> to_matrix(const Eigen::MatrixBase<Derived>& m) {
  cpu::Matrix<double> out(m.rows(), m.cols());
  Eigen::Map<RowMajor>(out.data(), m.rows(), m.cols()) = m;
  return out;
}

// op(a) b on the CPU backend's GEMM (a CBLAS where there is one): the large
// products of the randomized path, where all its time goes.
inline cpu::Matrix<double> product(Op op_a, const cpu::Matrix<double>& a, const cpu::Matrix<double>& b) {
  cpu::Matrix<double> c(op_a == Op::T ? a.cols() : a.rows(), b.cols());
  cpu::Context context;
  cpu::Backend::gemm(context, op_a, Op::N, 1.0, a.view(), b.view(), 0.0, c.view());
  return c;
}

// The orthonormal basis Q (m x k) of Y's columns: thin Householder QR.
inline cpu::Matrix<double> orthonormal_basis(const cpu::Matrix<double>& Y) {
  const Eigen::HouseholderQR<ColMajor> qr(ColMajor(eigen(Y)));
  return to_matrix(ColMajor(qr.householderQ() * ColMajor::Identity(Y.rows(), Y.cols())));
}

// The first r triplets of the thin SVD of A, sign-fixed (see Svd).
inline Svd first_triplets(const ColMajor& U_all, const Eigen::VectorXd& S_all, const ColMajor& V_all,
                          std::int64_t r) {
  ColMajor U = U_all.leftCols(r), V = V_all.leftCols(r);
  for (std::int64_t c = 0; c < r; ++c) {
    Eigen::Index top = 0;
    U.col(c).cwiseAbs().maxCoeff(&top);  // the first maximum on a tie
    if (U(top, c) < 0) {
      U.col(c) = -U.col(c);
      V.col(c) = -V.col(c);
    }
  }
  return Svd{to_matrix(U), std::vector<double>(S_all.data(), S_all.data() + r), to_matrix(V)};
}

inline Svd exact_svd(const cpu::Matrix<double>& A, std::int64_t r) {
  const Eigen::BDCSVD<ColMajor> svd(ColMajor(eigen(A)), Eigen::ComputeThinU | Eigen::ComputeThinV);
  return first_triplets(svd.matrixU(), svd.singularValues(), svd.matrixV(), r);
}

// Halko, Martinsson & Tropp (2011), Algorithm 4.4 then 5.1, as
// torch.svd_lowrank: Ω ~ N(0, 1) (n x k), Q = qr(A Ω); q times
// Q = qr(A qr(Aᵀ Q)) (the QR after each product keeps the small singular
// directions from drowning in rounding); then the exact SVD of the small
// B = Qᵀ A (k x n) = Ub S Vᵀ gives U = Q Ub. U diag(S) Vᵀ = Q Qᵀ A exactly:
// the factors are A projected on the sketch, so ‖U diag(S) Vᵀ‖_F² = Σ S².
inline Svd randomized_svd(const cpu::Matrix<double>& A, std::int64_t r, const SvdOptions& options) {
  const std::int64_t n = A.cols();
  const std::int64_t k = std::min(r + options.oversampling, std::min(A.rows(), n));
  cpu::Matrix<double> omega(n, k);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < k; ++j)
      omega(i, j) = standard_normal(options.seed, 0, 0, static_cast<std::uint64_t>(i * k + j));
  cpu::Matrix<double> Q = orthonormal_basis(product(Op::N, A, omega));  // m x k
  for (int it = 0; it < options.power_iterations; ++it) {
    const cpu::Matrix<double> P = orthonormal_basis(product(Op::T, A, Q));  // n x k
    Q = orthonormal_basis(product(Op::N, A, P));
  }
  const cpu::Matrix<double> B = product(Op::T, Q, A);  // k x n
  const Eigen::BDCSVD<ColMajor> svd(ColMajor(eigen(B)), Eigen::ComputeThinU | Eigen::ComputeThinV);
  const ColMajor U = eigen(Q) * svd.matrixU();
  return first_triplets(U, svd.singularValues(), svd.matrixV(), r);
}

// Whether kAuto (or the method asked) takes the exact path for rank r of an m x n matrix.
inline bool use_exact(std::int64_t min_dim, std::int64_t r, const SvdOptions& options) {
  if (options.method != SvdMethod::kAuto) return options.method == SvdMethod::kExact;
  return min_dim <= options.exact_max_dim || 4 * (r + options.oversampling) > min_dim;
}

inline void check_options(const SvdOptions& options, const char* call) {
  LORA_CHECK(options.oversampling >= 0,
             call << ": oversampling = " << options.oversampling << ", expected >= 0 (0 is torch.svd_lowrank's)");
  LORA_CHECK(options.power_iterations >= 0,
             call << ": power_iterations = " << options.power_iterations << ", expected >= 0 (torch's niter is 2)");
}

}  // namespace detail

// The top r singular triplets of W (m x n, any stride; float or double, const or not).
// Throws lora::Error when r is outside [1, min(m, n)], W is empty or holds a
// NaN or infinity, or an option is negative.
template <class T>
Svd truncated_svd(MatrixView<T, HostSpace> W, std::int64_t r, const SvdOptions& options = {}) {
  constexpr const char* kCall = "linalg::truncated_svd";
  check_view(W, "W", kCall);
  const std::int64_t min_dim = std::min(W.rows, W.cols);
  LORA_CHECK(r >= 1 && r <= min_dim, kCall << ": rank r = " << r << " for W of shape [" << W.rows << ", " << W.cols
                                            << "]; expected 1 <= r <= min(m, n) = " << min_dim);
  detail::check_options(options, kCall);
  const cpu::Matrix<double> A = detail::to_double(W, kCall);
  return detail::use_exact(min_dim, r, options) ? detail::exact_svd(A, r) : detail::randomized_svd(A, r, options);
}

// W = Q R, thin (see Qr), for OLoRA's init. Throws lora::Error when W is empty
// or holds a NaN or infinity.
template <class T>
Qr thin_qr(MatrixView<T, HostSpace> W) {
  const cpu::Matrix<double> A = detail::to_double(W, "linalg::thin_qr");
  const std::int64_t k = std::min(W.rows, W.cols);
  const Eigen::HouseholderQR<detail::ColMajor> qr(detail::ColMajor(detail::eigen(A)));
  const detail::ColMajor Q = qr.householderQ() * detail::ColMajor::Identity(W.rows, k);
  const detail::ColMajor R = qr.matrixQR().topRows(k).template triangularView<Eigen::Upper>();
  return Qr{detail::to_matrix(Q), detail::to_matrix(R)};
}

// The smallest r whose leading energy Σ_{i<r} S_i² reaches threshold ·
// total_energy (PEFT's conversion rule for a float rank; total_energy is
// ‖W‖_F² = Σ over all singular values). S must descend. Returns 0 when the
// given S do not reach it (a sketch too small: grow it; or rounding, when
// total_energy was summed another way and threshold is 1), and 1 for a total of 0.
inline std::int64_t rank_for_energy(const std::vector<double>& S, double total_energy, double threshold) {
  LORA_CHECK(threshold > 0 && threshold <= 1,
             "linalg::rank_for_energy: threshold = " << threshold << ", expected a share in (0, 1]");
  LORA_CHECK(total_energy >= 0, "linalg::rank_for_energy: total_energy = " << total_energy << ", expected >= 0");
  const double target = threshold * total_energy;
  double kept = 0;
  for (std::size_t i = 0; i < S.size(); ++i) {
    kept += S[i] * S[i];
    if (kept >= target) return static_cast<std::int64_t>(i) + 1;
  }
  return 0;
}

// The truncated SVD of W of the smallest rank whose energy Σ S² reaches
// threshold · ‖W‖_F² (PEFT's conversion with a float rank). Exact path: the
// full SVD, the total summed from all its S², as PEFT. Randomized path:
// sketches of rank 16, 32, 64, ... (each from scratch, same seed) until one
// reaches the total, which ‖W‖_F² gives without an SVD; where a sketch would
// not be much smaller than W (see use_exact) the exact path takes over. A
// sketch's S are slightly below W's, so its rank can exceed the exact one by a
// little; what it keeps is still its Σ S² (U diag(S) Vᵀ is W projected).
template <class T>
Svd svd_for_energy(MatrixView<T, HostSpace> W, double threshold, const SvdOptions& options = {}) {
  constexpr const char* kCall = "linalg::svd_for_energy";
  LORA_CHECK(threshold > 0 && threshold <= 1, kCall << ": threshold = " << threshold << ", expected a share in (0, 1]");
  detail::check_options(options, kCall);
  const cpu::Matrix<double> A = detail::to_double(W, kCall);
  const std::int64_t min_dim = std::min(W.rows, W.cols);
  auto truncate = [](const Svd& svd, std::int64_t r) {
    Svd out{cpu::Matrix<double>(svd.U.rows(), r), std::vector<double>(svd.S.begin(), svd.S.begin() + r),
            cpu::Matrix<double>(svd.V.rows(), r)};
    for (std::int64_t i = 0; i < svd.U.rows(); ++i)
      for (std::int64_t c = 0; c < r; ++c) out.U(i, c) = svd.U(i, c);
    for (std::int64_t i = 0; i < svd.V.rows(); ++i)
      for (std::int64_t c = 0; c < r; ++c) out.V(i, c) = svd.V(i, c);
    return out;
  };
  const double total_energy = detail::eigen(A).squaredNorm();
  for (std::int64_t r = 16; r < min_dim && !detail::use_exact(min_dim, r, options); r *= 2) {
    const Svd sketch = detail::randomized_svd(A, r, options);
    const std::int64_t rank = rank_for_energy(sketch.S, total_energy, threshold);
    if (rank > 0) return truncate(sketch, rank);
  }
  const Svd full = detail::exact_svd(A, min_dim);
  double total = 0;
  for (const double s : full.S) total += s * s;
  return truncate(full, rank_for_energy(full.S, total, threshold));  // >= 1: the sum reaches its own total
}

}  // namespace lora::linalg

// linalg::truncated_svd, thin_qr and rank_for_energy against matrices whose
// decomposition is known because the test built it: W = U diag(S) Vᵀ from
// orthonormal factors made here by Gram-Schmidt (not the library's QR).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "io_test_util.hpp"
#include "lora/linalg/svd.hpp"

namespace {

using io_test::expect_error;
using lora::cpu::Matrix;
using lora::linalg::SvdMethod;
using lora::linalg::SvdOptions;

// rows x cols with orthonormal columns: Gaussian columns, modified Gram-Schmidt twice.
Matrix<double> orthonormal_columns(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  Matrix<double> q(rows, cols);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) q(i, j) = lora::standard_normal(seed, 7, 0, i * cols + j);
  for (int pass = 0; pass < 2; ++pass)
    for (std::int64_t j = 0; j < cols; ++j) {
      for (std::int64_t k = 0; k < j; ++k) {
        double dot = 0;
        for (std::int64_t i = 0; i < rows; ++i) dot += q(i, k) * q(i, j);
        for (std::int64_t i = 0; i < rows; ++i) q(i, j) -= dot * q(i, k);
      }
      double norm = 0;
      for (std::int64_t i = 0; i < rows; ++i) norm += q(i, j) * q(i, j);
      for (std::int64_t i = 0; i < rows; ++i) q(i, j) /= std::sqrt(norm);
    }
  return q;
}

// U diag(S) Vᵀ (U: m x k, V: n x k), by a triple loop.
Matrix<double> compose(const Matrix<double>& U, const std::vector<double>& S, const Matrix<double>& V) {
  Matrix<double> w(U.rows(), V.rows());
  for (std::int64_t i = 0; i < U.rows(); ++i)
    for (std::int64_t j = 0; j < V.rows(); ++j)
      for (std::size_t k = 0; k < S.size(); ++k) w(i, j) += U(i, k) * S[k] * V(j, k);
  return w;
}

double frobenius_distance(const Matrix<double>& a, const Matrix<double>& b) {
  double sum = 0;
  for (std::int64_t i = 0; i < a.rows(); ++i)
    for (std::int64_t j = 0; j < a.cols(); ++j) sum += (a(i, j) - b(i, j)) * (a(i, j) - b(i, j));
  return std::sqrt(sum);
}

// max |QᵀQ − I| over the columns of Q.
double orthonormality_error(const Matrix<double>& q) {
  double worst = 0;
  for (std::int64_t a = 0; a < q.cols(); ++a)
    for (std::int64_t b = 0; b < q.cols(); ++b) {
      double dot = 0;
      for (std::int64_t i = 0; i < q.rows(); ++i) dot += q(i, a) * q(i, b);
      worst = std::max(worst, std::abs(dot - (a == b ? 1.0 : 0.0)));
    }
  return worst;
}

SvdOptions with_method(SvdMethod method) {
  SvdOptions o;
  o.method = method;
  return o;
}

// A planted rank-4 matrix (37 x 23): both paths recover S, the product and
// the subspaces, with orthonormal factors; the randomized one at torch's
// defaults (sketch of exactly r columns, 2 power iterations) is exact here
// because the range of W has dimension r.
TEST(TruncatedSvd, RecoversAPlantedRankRMatrixOnBothPaths) {
  const std::vector<double> S = {5.0, 3.0, 2.0, 0.25};
  const Matrix<double> U0 = orthonormal_columns(37, 4, 1), V0 = orthonormal_columns(23, 4, 2);
  const Matrix<double> W = compose(U0, S, V0);
  for (const SvdMethod method : {SvdMethod::kExact, SvdMethod::kRandomized}) {
    SCOPED_TRACE(method == SvdMethod::kExact ? "exact" : "randomized");
    const lora::linalg::Svd svd = lora::linalg::truncated_svd(W.view(), 4, with_method(method));
    ASSERT_EQ(svd.rank(), 4);
    ASSERT_EQ(svd.U.rows(), 37);
    ASSERT_EQ(svd.V.rows(), 23);
    for (int k = 0; k < 4; ++k) EXPECT_NEAR(svd.S[k], S[k], 1e-12 * S[0]) << "sigma " << k;
    EXPECT_LT(frobenius_distance(compose(svd.U, svd.S, svd.V), W), 1e-12 * S[0]);
    EXPECT_LT(orthonormality_error(svd.U), 1e-13);
    EXPECT_LT(orthonormality_error(svd.V), 1e-13);
    // Distinct singular values: each column is the planted one up to sign, |u0ᵀu| = 1.
    for (int k = 0; k < 4; ++k) {
      double dot = 0;
      for (int i = 0; i < 37; ++i) dot += U0(i, k) * svd.U(i, k);
      EXPECT_NEAR(std::abs(dot), 1.0, 1e-12) << "column " << k;
    }
  }
}

// The top 2 of the same matrix, in float with a row stride: the rank-2 truncation.
TEST(TruncatedSvd, TruncatesAStridedFloatMatrix) {
  const std::vector<double> S = {4.0, 2.0, 1.0};
  const Matrix<double> U0 = orthonormal_columns(9, 3, 3), V0 = orthonormal_columns(6, 3, 4);
  const Matrix<double> W = compose(U0, S, V0);
  std::vector<float> storage(9 * 8, 1e30f);  // stride 8 > 6 columns: the padding must not be read
  for (int i = 0; i < 9; ++i)
    for (int j = 0; j < 6; ++j) storage[i * 8 + j] = static_cast<float>(W(i, j));
  const lora::MatrixView<const float> view(storage.data(), 9, 6, 8);
  const lora::linalg::Svd svd = lora::linalg::truncated_svd(view, 2);
  EXPECT_NEAR(svd.S[0], 4.0, 1e-5);
  EXPECT_NEAR(svd.S[1], 2.0, 1e-5);
  Matrix<double> top2(9, 6);  // U0 diag(4, 2, 0) V0ᵀ
  for (int i = 0; i < 9; ++i)
    for (int j = 0; j < 6; ++j)
      for (int k = 0; k < 2; ++k) top2(i, j) += U0(i, k) * S[k] * V0(j, k);
  EXPECT_LT(frobenius_distance(compose(svd.U, svd.S, svd.V), top2), 1e-5);
}

// Every column of U has its largest-magnitude entry positive, and −W gives
// the same U with V negated: the convention fixes the signs, not the input.
TEST(TruncatedSvd, SignConventionMakesFactorsUnique) {
  const std::vector<double> S = {3.0, 2.0, 1.0};
  const Matrix<double> W = compose(orthonormal_columns(11, 3, 5), S, orthonormal_columns(8, 3, 6));
  Matrix<double> negated(11, 8);
  for (int i = 0; i < 11; ++i)
    for (int j = 0; j < 8; ++j) negated(i, j) = -W(i, j);
  for (const SvdMethod method : {SvdMethod::kExact, SvdMethod::kRandomized}) {
    const lora::linalg::Svd a = lora::linalg::truncated_svd(W.view(), 3, with_method(method));
    const lora::linalg::Svd b = lora::linalg::truncated_svd(negated.view(), 3, with_method(method));
    for (int k = 0; k < 3; ++k) {
      int top = 0;
      for (int i = 1; i < 11; ++i)
        if (std::abs(a.U(i, k)) > std::abs(a.U(top, k))) top = i;
      EXPECT_GT(a.U(top, k), 0.0) << "column " << k;
      for (int i = 0; i < 11; ++i) EXPECT_NEAR(b.U(i, k), a.U(i, k), 1e-12);
      for (int j = 0; j < 8; ++j) EXPECT_NEAR(b.V(j, k), -a.V(j, k), 1e-12);
    }
  }
}

// A full-rank 120 x 90 matrix with σ_i = 0.7^i: the randomized path (r = 8,
// p = 5, q = 2) is within 1% of the Eckart–Young optimum ‖W − W_r‖_F =
// sqrt(Σ_{i>=r} σ_i²), and its σ_1..σ_8 match to 1e-6 relative. Without
// the power iterations the same sketch misses both (about 10% above the
// optimum, σ off by ~5e-2 relative: numpy, same sizes). The same seed gives
// the same bits.
TEST(TruncatedSvd, RandomizedMatchesExactOnADecayingSpectrum) {
  constexpr int m = 120, n = 90, r = 8;
  std::vector<double> S(n);
  for (int i = 0; i < n; ++i) S[i] = std::pow(0.7, i);
  const Matrix<double> W = compose(orthonormal_columns(m, n, 8), S, orthonormal_columns(n, n, 9));
  SvdOptions options = with_method(SvdMethod::kRandomized);
  options.oversampling = 5;
  options.power_iterations = 2;
  options.seed = 42;
  const lora::linalg::Svd svd = lora::linalg::truncated_svd(W.view(), r, options);
  double optimum = 0;
  for (int i = r; i < n; ++i) optimum += S[i] * S[i];
  optimum = std::sqrt(optimum);
  EXPECT_LT(frobenius_distance(compose(svd.U, svd.S, svd.V), W), 1.01 * optimum);
  for (int k = 0; k < r; ++k) EXPECT_NEAR(svd.S[k], S[k], 1e-6 * S[k]) << "sigma " << k;
  EXPECT_LT(orthonormality_error(svd.U), 1e-12);
  EXPECT_LT(orthonormality_error(svd.V), 1e-12);

  const lora::linalg::Svd again = lora::linalg::truncated_svd(W.view(), r, options);
  for (int i = 0; i < m; ++i)
    for (int k = 0; k < r; ++k) ASSERT_EQ(again.U(i, k), svd.U(i, k));
}

TEST(TruncatedSvd, RefusesBadArguments) {
  Matrix<double> W(5, 3);
  for (int i = 0; i < 5; ++i) W(i, i % 3) = 1.0;
  expect_error([&] { lora::linalg::truncated_svd(W.view(), 0); }, {"truncated_svd", "r = 0", "1 <= r <= min(m, n) = 3"});
  expect_error([&] { lora::linalg::truncated_svd(W.view(), 4); }, {"r = 4", "[5, 3]", "min(m, n) = 3"});
  SvdOptions options;
  options.oversampling = -1;
  expect_error([&] { lora::linalg::truncated_svd(W.view(), 2, options); }, {"oversampling = -1", ">= 0"});
  options = SvdOptions{};
  options.power_iterations = -2;
  expect_error([&] { lora::linalg::truncated_svd(W.view(), 2, options); }, {"power_iterations = -2", ">= 0"});
  W(2, 1) = std::numeric_limits<double>::quiet_NaN();
  expect_error([&] { lora::linalg::truncated_svd(W.view(), 2); }, {"W(2, 1) = nan", "finite"});
  const Matrix<double> empty(0, 3);
  expect_error([&] { lora::linalg::truncated_svd(empty.view(), 1); }, {"r = 1", "[0, 3]"});
  expect_error([&] { lora::linalg::thin_qr(empty.view()); }, {"thin_qr", "empty"});
}

// W = Q R for a tall and a wide matrix: Q orthonormal, R upper triangular, the product W.
TEST(ThinQr, FactorsTallAndWideMatrices) {
  for (const auto& [m, n] : {std::pair<int, int>{13, 5}, std::pair<int, int>{4, 9}}) {
    Matrix<double> W(m, n);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) W(i, j) = lora::standard_normal(11, 0, 0, i * n + j);
    const lora::linalg::Qr qr = lora::linalg::thin_qr(W.view());
    const int k = std::min(m, n);
    ASSERT_EQ(qr.Q.rows(), m);
    ASSERT_EQ(qr.Q.cols(), k);
    ASSERT_EQ(qr.R.rows(), k);
    ASSERT_EQ(qr.R.cols(), n);
    EXPECT_LT(orthonormality_error(qr.Q), 1e-13);
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < std::min(i, n); ++j) EXPECT_EQ(qr.R(i, j), 0.0) << "R(" << i << ", " << j << ")";
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double sum = 0;
        for (int c = 0; c < k; ++c) sum += qr.Q(i, c) * qr.R(c, j);
        EXPECT_NEAR(sum, W(i, j), 1e-12);
      }
  }
}

// σ = 4, 2, 1, 0.5: energies 16, 4, 1, 0.25 of 21.25; cumulative shares
// 16/21.25 = 0.7529, 20/21.25 = 0.9412, 21/21.25 = 0.9882, 1.
TEST(RankForEnergy, PicksTheSmallestRankReachingTheShare) {
  const std::vector<double> S = {4.0, 2.0, 1.0, 0.5};
  EXPECT_EQ(lora::linalg::rank_for_energy(S, 21.25, 0.5), 1);
  EXPECT_EQ(lora::linalg::rank_for_energy(S, 21.25, 0.75), 1);
  EXPECT_EQ(lora::linalg::rank_for_energy(S, 21.25, 0.76), 2);
  EXPECT_EQ(lora::linalg::rank_for_energy(S, 21.25, 0.95), 3);
  EXPECT_EQ(lora::linalg::rank_for_energy(S, 21.25, 0.99), 4);
  EXPECT_EQ(lora::linalg::rank_for_energy(S, 21.25, 1.0), 4);
  // Only the top two known (a sketch): 0.95 of the total is not reached yet.
  EXPECT_EQ(lora::linalg::rank_for_energy({4.0, 2.0}, 21.25, 0.95), 0);
  EXPECT_EQ(lora::linalg::rank_for_energy({0.0, 0.0}, 0.0, 0.9), 1);
  expect_error([&] { lora::linalg::rank_for_energy(S, 21.25, 0.0); }, {"threshold = 0", "(0, 1]"});
  expect_error([&] { lora::linalg::rank_for_energy(S, 21.25, 1.5); }, {"threshold = 1.5", "(0, 1]"});
}

// The same rule on whole matrices. Exact: σ = 4, 2, 1, 0.5 and 0.95 keep 3.
// Randomized: σ_i = 0.9^i (i < 150), shares 1 − 0.81^r (to 1e-13, the tail
// 0.81^150): 0.9 needs r = 11 (0.81^10 = 0.122, 0.81^11 = 0.0985), reached by
// the first sketch (16); 0.999 needs r = 33 (0.81^32 = 0.00118, 0.81^33 =
// 0.00096), which sketches of 16 and 32 miss and one of 64 reaches.
TEST(SvdForEnergy, KeepsTheSmallestRankReachingTheShareOnBothPaths) {
  const Matrix<double> W4 = compose(orthonormal_columns(10, 4, 12), {4.0, 2.0, 1.0, 0.5}, orthonormal_columns(7, 4, 13));
  const lora::linalg::Svd exact = lora::linalg::svd_for_energy(W4.view(), 0.95);
  ASSERT_EQ(exact.rank(), 3);
  EXPECT_NEAR(exact.S[2], 1.0, 1e-12);
  EXPECT_EQ(exact.U.cols(), 3);
  EXPECT_EQ(exact.V.cols(), 3);

  constexpr int m = 200, n = 150;
  std::vector<double> S(n);
  for (int i = 0; i < n; ++i) S[i] = std::pow(0.9, i);
  const Matrix<double> W = compose(orthonormal_columns(m, n, 14), S, orthonormal_columns(n, n, 15));
  SvdOptions options = with_method(SvdMethod::kRandomized);
  options.oversampling = 5;
  for (const auto& [threshold, rank] : {std::pair<double, int>{0.9, 11}, std::pair<double, int>{0.999, 33}}) {
    const lora::linalg::Svd svd = lora::linalg::svd_for_energy(W.view(), threshold, options);
    EXPECT_EQ(svd.rank(), rank) << "threshold " << threshold;
    for (int k = 0; k < std::min<int>(rank, static_cast<int>(svd.rank())); ++k)
      EXPECT_NEAR(svd.S[k], S[k], 1e-4 * S[k]) << "sigma " << k;  // slow decay: a sketch's σ ~1e-5 low
    EXPECT_LT(orthonormality_error(svd.U), 1e-12);
  }
  expect_error([&] { lora::linalg::svd_for_energy(W.view(), 0.0); }, {"svd_for_energy", "threshold = 0", "(0, 1]"});
}

}  // namespace

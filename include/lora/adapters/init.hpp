// PiSSA and OLoRA: an adapter whose A and B are taken from its base weight W,
// the base being rewritten to the residual so that base + adapter is still W:
//
//   W: the d_out x d_in weight (the transpose of what is stored with fan_in_fan_out), in double on the host
//   pissa:         W = U S V^T, exact (Eigen's BDCSVD)
//   pissa_niter_N: U_r S_r V_r^T from a randomized SVD (Halko et al.'s range finder with N power
//                  iterations, as torch.svd_lowrank(W, q = r, niter = N) which PEFT calls)
//                  A = diag(sqrt(S_r / s)) V_r^T  (r x d_in),   B = U_r diag(sqrt(S_r / s))  (d_out x r)
//                  so s B A = U_r S_r V_r^T, the best rank-r approximation of W (exact SVD)
//   olora:         W = Q R (thin Householder QR)
//                  A = R[:r, :]  (r x d_in),   B = Q[:, :r]  (d_out x r)   (not divided by s, as in PEFT)
//   then           W <- W - s B A          through the base's add_delta, with A and B as rounded
//
// Signs are fixed so that the result is a function of W alone: each pair (u_i,
// v_i) is flipped so that the entry of v_i largest in magnitude (the first of
// equals) is positive; each (column i of Q, row i of R) so that R_ii >= 0
// (the unique thin QR of a W whose leading r columns are independent).
// The randomized sketch draws N(0, 1) numbers from (config.seed, the
// adapter's init stream), so pissa_niter is deterministic too: rebuilding the
// model from the same W, seed and stream gives the same residual bit for bit
// (what a run resumed from a checkpoint relies on).
//
// The decomposition (weight_init) only reads W; writing happens in
// apply_weight_init, so a caller that initialises many modules (Model) can
// decompose all of them before it writes any. The base must be dense
// (DenseBase) and writable: a read-only view or a 4-bit NF4 base is refused.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "lora/base/dense.hpp"
#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/core/random.hpp"
#include "lora/cpu/backend.hpp"

namespace lora {

// A and B as the decomposition of W gives them, rounded once to the adapter's
// parameter type P, on the host.
template <class P>
struct WeightInit {
  cpu::Matrix<P> A;  // r x d_in
  cpu::Matrix<P> B;  // d_out x r
};

namespace detail {

// Top-r singular triplets: W ~ U diag(S) V^T with U: m x r, S: r, V: n x r.
struct Triplets {
  Eigen::MatrixXd U;
  Eigen::VectorXd S;
  Eigen::MatrixXd V;
};

// Flips each pair (u_i, v_i) so that v_i's entry largest in magnitude (the first of equals) is positive.
inline void fix_svd_signs(Triplets& t) {
  for (Eigen::Index i = 0; i < t.V.cols(); ++i) {
    Eigen::Index at = 0;
    for (Eigen::Index k = 1; k < t.V.rows(); ++k)
      if (std::fabs(t.V(k, i)) > std::fabs(t.V(at, i))) at = k;
    if (t.V(at, i) < 0.0) {
      t.U.col(i) *= -1.0;
      t.V.col(i) *= -1.0;
    }
  }
}

inline Triplets exact_svd(const Eigen::MatrixXd& W, int r) {
  const Eigen::BDCSVD<Eigen::MatrixXd> svd(W, Eigen::ComputeThinU | Eigen::ComputeThinV);
  Triplets t{svd.matrixU().leftCols(r), svd.singularValues().head(r), svd.matrixV().leftCols(r)};
  fix_svd_signs(t);
  return t;
}

// An orthonormal basis of the columns of Y (m x q, q <= m): the thin Q of Householder QR.
inline Eigen::MatrixXd orthonormal_basis(const Eigen::MatrixXd& Y) {
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(Y);
  return qr.householderQ() * Eigen::MatrixXd::Identity(Y.rows(), Y.cols());
}

// Halko, Martinsson & Tropp (2011), algorithms 4.4 and 5.1, with q = r columns
// (no oversampling, as PEFT calls torch.svd_lowrank):
//   Q = orth(W Omega)                      Omega: n x r, N(0, 1) from (seed, stream)
//   niter times: Q = orth(W orth(W^T Q))   (power iterations, re-orthonormalised)
//   Q^T W = U_b S V^T,  U = Q U_b
inline Triplets randomized_svd(const Eigen::MatrixXd& W, int r, int niter, std::uint64_t seed, std::uint64_t stream) {
  Eigen::MatrixXd omega(W.cols(), r);
  for (Eigen::Index i = 0; i < omega.rows(); ++i)
    for (Eigen::Index j = 0; j < r; ++j)
      omega(i, j) = standard_normal(seed, stream, 0, static_cast<std::uint64_t>(i * r + j));
  Eigen::MatrixXd Q = orthonormal_basis(W * omega);
  for (int it = 0; it < niter; ++it) Q = orthonormal_basis(W * orthonormal_basis(W.transpose() * Q));
  const Eigen::MatrixXd small = Q.transpose() * W;  // r x n
  const Eigen::BDCSVD<Eigen::MatrixXd> svd(small, Eigen::ComputeThinU | Eigen::ComputeThinV);
  Triplets t{Q * svd.matrixU(), svd.singularValues(), svd.matrixV()};
  fix_svd_signs(t);
  return t;
}

// The base's W as d_out x d_in in double on the host (transposed back with fan_in_fan_out).
template <class T, class Backend>
Eigen::MatrixXd host_weight(const DenseBase<T, Backend>& base) {
  using P = param_t<T>;
  auto& ctx = base.context();
  const MatrixView<const T, typename Backend::Space> W = base.W();
  cpu::Matrix<P> host(W.rows, W.cols);
  if constexpr (std::is_same_v<T, P>) {
    Backend::copy_to_host(ctx, W, host.view());
  } else {  // a 16-bit W: widened on the backend first
    typename Backend::template Matrix<P> wide(W.rows, W.cols);
    Backend::convert(ctx, W, wide.view());
    Backend::copy_to_host(ctx, MatrixView<const P, typename Backend::Space>(wide.view()), host.view());
  }
  Backend::synchronize(ctx);
  Eigen::MatrixXd out(base.d_out(), base.d_in());
  for (std::int64_t i = 0; i < W.rows; ++i)
    for (std::int64_t j = 0; j < W.cols; ++j) {
      const double w = static_cast<double>(host(i, j));
      if (base.fan_in_fan_out()) {
        out(j, i) = w;
      } else {
        out(i, j) = w;
      }
    }
  return out;
}

}  // namespace detail

// A and B of a pissa / olora adapter with `config` over `base`, computed from
// W (which it only reads); `stream` is the adapter's (it seeds
// pissa_niter's sketch). `what` starts every message ("AdapterSet::add(\"p\")").
// Refused: an init that does not read W, a quantized or read-only base, r >
// min(d_out, d_in), a W with a non-finite value.
template <class Base>
WeightInit<param_t<typename Base::value_type>> weight_init(const Base& base, const Config& config,
                                                           std::uint32_t stream, const std::string& what) {
  using T = typename Base::value_type;
  using P = param_t<T>;
  using Backend = typename Base::backend_type;
  LORA_CHECK(init_writes_base(config.init), what << ": Config.init = " << to_string(config.init)
                                                 << " does not start from W (only pissa and olora do)");
  const std::string name = to_string(config.init, config.pissa_niter);
  if constexpr (!std::is_same_v<Base, DenseBase<T, Backend>>) {
    LORA_CHECK(false, what << ": init " << name << " rewrites the base to the residual W - s B A, and this base is "
                           << "quantized (4-bit NF4), which cannot hold it; initialise on the dense W (a DenseBase), "
                           << "then quantize the residual (as QPiSSA does)");
    return {};
  } else {
    LORA_CHECK(base.writable(), what << ": init " << name << " rewrites the base to the residual W - s B A, but this "
                                    << "base was built over a read-only W (MatrixView<const T>); build it over a "
                                    << "writable view of W");
    config.validate(base.d_in(), base.d_out());
    const Eigen::MatrixXd W = detail::host_weight(base);
    for (Eigen::Index i = 0; i < W.rows(); ++i)
      for (Eigen::Index j = 0; j < W.cols(); ++j)
        LORA_CHECK(std::isfinite(W(i, j)), what << ": init " << name << ": W[" << i << ", " << j << "] (as d_out x d_in) is "
                                                << W(i, j) << "; the decomposition needs a finite W");
    const int r = config.r;
    Eigen::MatrixXd A(r, W.cols()), B(W.rows(), r);
    if (config.init == Init::pissa) {
      const detail::Triplets t = config.pissa_niter == 0
                                     ? detail::exact_svd(W, r)
                                     : detail::randomized_svd(W, r, config.pissa_niter, config.seed, init_stream(stream));
      const Eigen::VectorXd root = (t.S / config.scale()).cwiseSqrt();  // sqrt(S_r / s)
      A = root.asDiagonal() * t.V.transpose();
      B = t.U * root.asDiagonal();
    } else {
      const Eigen::Index k = std::min(W.rows(), W.cols());
      const Eigen::HouseholderQR<Eigen::MatrixXd> qr(W);
      Eigen::MatrixXd Q = qr.householderQ() * Eigen::MatrixXd::Identity(W.rows(), k);
      Eigen::MatrixXd R = qr.matrixQR().topRows(k).triangularView<Eigen::Upper>();
      for (Eigen::Index i = 0; i < k; ++i) {
        if (R(i, i) < 0.0) {
          R.row(i) *= -1.0;
          Q.col(i) *= -1.0;
        }
      }
      A = R.topRows(r);
      B = Q.leftCols(r);
    }
    WeightInit<P> out{cpu::Matrix<P>(r, W.cols()), cpu::Matrix<P>(W.rows(), r)};
    for (Eigen::Index i = 0; i < A.rows(); ++i)
      for (Eigen::Index j = 0; j < A.cols(); ++j) out.A(i, j) = static_cast<P>(A(i, j));
    for (Eigen::Index i = 0; i < B.rows(); ++i)
      for (Eigen::Index j = 0; j < B.cols(); ++j) out.B(i, j) = static_cast<P>(B(i, j));
    return out;
  }
}

// A, B <- init (kept as the adapter's initial values), then W <- W - s B A on
// the base (add_delta, with A and B as rounded; the adapter's own merge path
// is not used, since a DoRA adapter's merge would rescale W). `init` comes from weight_init
// on this base with this adapter's config.
template <class Base, class Adapter>
void apply_weight_init(Base& base, Adapter& adapter, const WeightInit<typename Adapter::Param>& init) {
  LORA_CHECK(base.d_in() == adapter.d_in() && base.d_out() == adapter.d_out() && init.A.rows() == adapter.rank() &&
                 init.A.cols() == adapter.d_in() && init.B.rows() == adapter.d_out() && init.B.cols() == adapter.rank(),
             "apply_weight_init: A [" << init.A.rows() << ", " << init.A.cols() << "] and B [" << init.B.rows() << ", "
                                      << init.B.cols() << "] do not fit a rank-" << adapter.rank() << " adapter on a "
                                      << base.d_out() << " x " << base.d_in() << " base");
  adapter.set_initial(init.A.view(), init.B.view());
  base.add_delta(-adapter.scale(), adapter.B(), adapter.A());
}

// weight_init + apply_weight_init for one adapter on its base (what Linear's
// constructors and AdapterSet::add do when config.init is pissa or olora).
template <class Base, class Adapter>
void init_from_weight(Base& base, Adapter& adapter, const std::string& what = "init_from_weight") {
  apply_weight_init(base, adapter, weight_init(base, adapter.config(), adapter.stream(), what));
}

}  // namespace lora

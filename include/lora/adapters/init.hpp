// PiSSA and OLoRA: an adapter whose A and B are taken from its base weight W,
// the base being rewritten to the residual so that base + adapter is still W:
//
//   W: the d_out x d_in weight (the transpose of what is stored with fan_in_fan_out), in double on the host
//   pissa:         W = U S V^T, exact (linalg::truncated_svd, Eigen's BDCSVD)
//   pissa_niter_N: U_r S_r V_r^T from a randomized SVD with r columns and N power
//                  iterations (linalg's, as torch.svd_lowrank(W, q = r, niter = N) which PEFT calls)
//                  A = diag(sqrt(S_r / s)) V_r^T  (r x d_in),   B = U_r diag(sqrt(S_r / s))  (d_out x r)
//                  so s B A = U_r S_r V_r^T, the best rank-r approximation of W (exact SVD)
//   olora:         W = Q R (linalg::thin_qr: Householder, R's signs as LAPACK's geqrf gives them, as torch)
//                  A = R[:r, :]  (r x d_in),   B = Q[:, :r]  (d_out x r)   (not divided by s, as in PEFT)
//   then           W <- W - s B A          through the base's add_delta, with A and B as rounded
//
// The factors are a function of W alone (linalg's sign convention: each
// column of U has its entry of largest magnitude positive); the randomized
// sketch draws from config.seed, so pissa_niter is deterministic too:
// rebuilding the model from the same W and seed gives the same residual bit
// for bit (what a run resumed from a checkpoint relies on).
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

#include "lora/base/dense.hpp"
#include "lora/core/backend.hpp"
#include "lora/core/config.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/linalg/svd.hpp"

namespace lora {

// A and B as the decomposition of W gives them, rounded once to the adapter's
// parameter type P, on the host.
template <class P>
struct WeightInit {
  cpu::Matrix<P> A;  // r x d_in
  cpu::Matrix<P> B;  // d_out x r
};

namespace detail {

// The base's W as d_out x d_in in double on the host (transposed back with
// fan_in_fan_out); a lora::Error naming `what` for a value that is not finite.
template <class T, class Backend>
cpu::Matrix<double> host_weight(const DenseBase<T, Backend>& base, const std::string& what) {
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
  cpu::Matrix<double> out(base.d_out(), base.d_in());
  for (std::int64_t i = 0; i < W.rows; ++i)
    for (std::int64_t j = 0; j < W.cols; ++j) {
      const double w = static_cast<double>(host(i, j));
      LORA_CHECK(std::isfinite(w), what << ": W[" << i << ", " << j << "] (as stored) is " << w
                                        << "; the decomposition needs a finite W");
      (base.fan_in_fan_out() ? out(j, i) : out(i, j)) = w;
    }
  return out;
}

}  // namespace detail

// A and B of a pissa / olora adapter with `config` over `base`, computed from
// W (which it only reads). `what` starts every message ("AdapterSet::add(\"p\")").
// Refused: an init that does not read W, a quantized or read-only base, r >
// min(d_out, d_in), a W with a non-finite value.
template <class Base>
WeightInit<param_t<typename Base::value_type>> weight_init(const Base& base, const Config& config,
                                                           const std::string& what) {
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
    const cpu::Matrix<double> W = detail::host_weight(base, what + ": init " + name);
    const int r = config.r;
    cpu::Matrix<double> A(r, W.cols()), B(W.rows(), r);
    if (config.init == Init::pissa) {
      linalg::SvdOptions options;
      options.method = config.pissa_niter == 0 ? linalg::SvdMethod::kExact : linalg::SvdMethod::kRandomized;
      options.oversampling = 0;  // q = r, as PEFT calls torch.svd_lowrank
      options.power_iterations = config.pissa_niter;
      options.seed = config.seed;
      const linalg::Svd svd = linalg::truncated_svd(W.view(), r, options);
      for (int k = 0; k < r; ++k) {
        const double root = std::sqrt(svd.S[static_cast<std::size_t>(k)] / config.scale());  // sqrt(S_k / s)
        for (std::int64_t j = 0; j < W.cols(); ++j) A(k, j) = root * svd.V(j, k);  // diag(sqrt(S_r / s)) V_r^T
        for (std::int64_t i = 0; i < W.rows(); ++i) B(i, k) = svd.U(i, k) * root;  // U_r diag(sqrt(S_r / s))
      }
    } else {
      const linalg::Qr qr = linalg::thin_qr(W.view());
      for (int k = 0; k < r; ++k) {
        for (std::int64_t j = 0; j < W.cols(); ++j) A(k, j) = qr.R(k, j);  // R[:r, :]
        for (std::int64_t i = 0; i < W.rows(); ++i) B(i, k) = qr.Q(i, k);  // Q[:, :r]
      }
    }
    WeightInit<P> out{cpu::Matrix<P>(r, W.cols()), cpu::Matrix<P>(W.rows(), r)};
    for (std::int64_t i = 0; i < A.size(); ++i) out.A.data()[i] = static_cast<P>(A.data()[i]);
    for (std::int64_t i = 0; i < B.size(); ++i) out.B.data()[i] = static_cast<P>(B.data()[i]);
    return out;
  }
}

// A, B <- init (kept as the adapter's initial values), then W <- W - s B A on
// the base (add_delta, with A and B as rounded). `init` comes from
// weight_init on this base with this adapter's config.
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
  apply_weight_init(base, adapter, weight_init(base, adapter.config(), what));
}

}  // namespace lora

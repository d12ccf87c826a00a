// DoRA (Config.use_dora) on the CPU: the backend's vector ops and the bases'
// products against their plain definitions; the layer against a naive DoRA
// written here from the definition (W + s B A formed explicitly, its row
// norms, m / n), forward and central-difference gradients in double with n
// held constant (detached, as the DoRA paper and PEFT do); fan_in_fan_out,
// dropout, weighted adapters, an NF4 base (QDoRA), merging, Adam on the
// magnitude, what is refused, and a checkpoint resume.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu_test_util.hpp"
#include "io_test_util.hpp"
#include "lora/io.hpp"
#include "lora/model.hpp"

namespace {

using io_test::expect_error;
using io_test::random_matrix;
using io_test::TempDir;
using lora::Config;
using lora::GradMode;
using lora::Mode;
using Backend = lora::cpu::Backend;
template <class T>
using Matrix = lora::cpu::Matrix<T>;
template <class T>
using View = lora::MatrixView<T>;
template <class T>
using ConstView = lora::MatrixView<const T>;

// ---- helpers -----------------------------------------------------------------

// A dense row-major matrix of doubles for the reference.
struct Dense {
  std::int64_t rows = 0, cols = 0;
  std::vector<double> v;
  Dense() = default;
  Dense(std::int64_t r, std::int64_t c) : rows(r), cols(c), v(static_cast<std::size_t>(r * c), 0.0) {}
  double& operator()(std::int64_t i, std::int64_t j) { return v[static_cast<std::size_t>(i * cols + j)]; }
  double operator()(std::int64_t i, std::int64_t j) const { return v[static_cast<std::size_t>(i * cols + j)]; }
};
template <class T>
Dense to_dense(ConstView<T> m) {
  Dense d(m.rows, m.cols);
  for (std::int64_t i = 0; i < m.rows; ++i)
    for (std::int64_t j = 0; j < m.cols; ++j) d(i, j) = static_cast<double>(m(i, j));
  return d;
}
template <class T>
Dense to_dense(const Matrix<T>& m) {
  return to_dense<T>(m.view());
}
template <class T>
void set_from(View<T> dst, const Dense& src) {
  for (std::int64_t i = 0; i < src.rows; ++i)
    for (std::int64_t j = 0; j < src.cols; ++j) dst(i, j) = static_cast<T>(src(i, j));
}
Dense transposed(const Dense& a) {
  Dense t(a.cols, a.rows);
  for (std::int64_t i = 0; i < a.rows; ++i)
    for (std::int64_t j = 0; j < a.cols; ++j) t(j, i) = a(i, j);
  return t;
}
// max_ij |got - want| / max(1e-300, max_ij |want|)
double scaled_error(const Dense& got, const Dense& want) {
  EXPECT_EQ(got.rows, want.rows);
  EXPECT_EQ(got.cols, want.cols);
  double err = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < want.v.size(); ++i) {
    err = std::max(err, std::abs(got.v[i] - want.v[i]));
    scale = std::max(scale, std::abs(want.v[i]));
  }
  return scale > 0.0 ? err / scale : err;
}

// ---- the naive DoRA reference, in double --------------------------------------

// One adapter of the reference: LoRA (m empty) or DoRA.
struct RefAdapter {
  Dense A, B;            // r x d_in, d_out x r
  std::vector<double> m;  // DoRA's magnitude (d_out), empty for LoRA
  double s = 1.0, w = 1.0;
  double p = 0.0;        // dropout
  std::uint64_t seed = 0;
  std::uint32_t stream = 0, call = 0;
};

// ||W[i, :] + s (B A)[i, :]|| per output i, W + s B A formed explicitly (d_out x d_in).
std::vector<double> ref_norms(const Dense& W, const RefAdapter& a) {
  std::vector<double> n(static_cast<std::size_t>(W.rows));
  for (std::int64_t i = 0; i < W.rows; ++i) {
    double sq = 0.0;
    for (std::int64_t j = 0; j < W.cols; ++j) {
      double v = W(i, j);
      for (std::int64_t k = 0; k < a.A.rows; ++k) v += a.s * a.B(i, k) * a.A(k, j);
      sq += v * v;
    }
    n[static_cast<std::size_t>(i)] = std::sqrt(sq);
  }
  return n;
}

// y = x W^T + bias + sum_k w_k [(c_k - 1) o x W^T + c_k o s_k (drop_k(x) A_k^T) B_k^T]
// with c_k = m_k / n_k for DoRA (c_k = 1 for LoRA). norms[k]: n_k held fixed
// (the detached n of a gradient check); empty: computed from the current A_k, B_k.
Dense ref_forward(const Dense& W, const std::vector<double>& bias, const Dense& x, const std::vector<RefAdapter>& ads,
                  const std::vector<std::vector<double>>& norms = {}) {
  const std::int64_t N = x.rows, d_in = W.cols, d_out = W.rows;
  Dense P(N, d_out), y(N, d_out);
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t o = 0; o < d_out; ++o) {
      double v = 0.0;
      for (std::int64_t j = 0; j < d_in; ++j) v += x(i, j) * W(o, j);
      P(i, o) = v;
      y(i, o) = v + (bias.empty() ? 0.0 : bias[static_cast<std::size_t>(o)]);
    }
  for (std::size_t k = 0; k < ads.size(); ++k) {
    const RefAdapter& a = ads[k];
    Dense xd = x;
    for (std::int64_t i = 0; i < N && a.p > 0.0; ++i)
      for (std::int64_t j = 0; j < d_in; ++j) {
        const bool keep = lora::dropout_keep(a.seed, a.stream, a.call, static_cast<std::uint64_t>(i * d_in + j),
                                             static_cast<float>(a.p));
        xd(i, j) = keep ? x(i, j) / (1.0 - static_cast<double>(static_cast<float>(a.p))) : 0.0;
      }
    std::vector<double> c(static_cast<std::size_t>(d_out), 1.0);
    if (!a.m.empty()) {
      const std::vector<double> n = norms.empty() ? ref_norms(W, a) : norms[k];
      for (std::int64_t o = 0; o < d_out; ++o) c[o] = a.m[o] / n[o];
    }
    for (std::int64_t i = 0; i < N; ++i)
      for (std::int64_t o = 0; o < d_out; ++o) {
        double q = 0.0;
        for (std::int64_t k2 = 0; k2 < a.A.rows; ++k2) {
          double xa = 0.0;
          for (std::int64_t j = 0; j < d_in; ++j) xa += xd(i, j) * a.A(k2, j);
          q += xa * a.B(o, k2);
        }
        y(i, o) += a.w * ((c[o] - 1.0) * P(i, o) + c[o] * a.s * q);
      }
  }
  return y;
}

// The logical d_out x d_in weight of a stored W.
Dense logical(const Dense& W_stored, bool fan_in_fan_out) { return fan_in_fan_out ? transposed(W_stored) : W_stored; }

// ---- the backend's vector ops --------------------------------------------------

template <class T>
void check_vector_ops() {
  lora::cpu::Context ctx;
  // A 5 x 7 window (stride 9) of a larger buffer, so strides are honoured.
  Matrix<T> xb = random_matrix<T>(5, 9, 1), yb = random_matrix<T>(5, 9, 2), bb = random_matrix<T>(5, 9, 3);
  const View<T> x = xb.view().col_block(1, 7), y = yb.view().col_block(2, 7), b = bb.view().col_block(0, 7);
  const Matrix<T> vc = random_matrix<T>(1, 7, 4), vr = random_matrix<T>(1, 5, 5);
  const Dense X = to_dense<T>(x), Y = to_dense<T>(y), Bd = to_dense<T>(b);
  const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-15;

  for (const double beta : {0.0, 1.0, -0.5}) {
    SCOPED_TRACE(::testing::Message() << "beta " << beta);
    Matrix<T> out_c(5, 7), out_r(5, 7);
    set_from(out_c.view(), Y);
    set_from(out_r.view(), Y);
    Backend::scale_columns(ctx, vc.view(), ConstView<T>(x), beta, out_c.view());
    Backend::scale_rows(ctx, vr.view(), ConstView<T>(x), beta, out_r.view());
    Dense want_c(5, 7), want_r(5, 7);
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 7; ++j) {
        want_c(i, j) = double(vc(0, j)) * X(i, j) + beta * Y(i, j);
        want_r(i, j) = double(vr(0, i)) * X(i, j) + beta * Y(i, j);
      }
    EXPECT_LE(scaled_error(to_dense(out_c), want_c), tol);
    EXPECT_LE(scaled_error(to_dense(out_r), want_r), tol);

    Matrix<T> cd = random_matrix<T>(1, 7, 6), rd = random_matrix<T>(1, 5, 7);
    const Dense cd0 = to_dense(cd), rd0 = to_dense(rd);
    Backend::column_dots(ctx, 2.0, ConstView<T>(x), ConstView<T>(b), beta, cd.view());
    Backend::row_dots(ctx, 2.0, ConstView<T>(x), ConstView<T>(b), beta, rd.view());
    Dense want_cd(1, 7), want_rd(1, 5);
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 7; ++j) {
        want_cd(0, j) += 2.0 * X(i, j) * Bd(i, j);
        want_rd(0, i) += 2.0 * X(i, j) * Bd(i, j);
      }
    for (int j = 0; j < 7; ++j) want_cd(0, j) += beta * cd0(0, j);
    for (int i = 0; i < 5; ++i) want_rd(0, i) += beta * rd0(0, i);
    EXPECT_LE(scaled_error(to_dense(cd), want_cd), tol);
    EXPECT_LE(scaled_error(to_dense(rd), want_rd), tol);
  }
  // In place: y = v o y.
  Matrix<T> z = random_matrix<T>(5, 7, 8);
  const Dense Z = to_dense(z);
  Backend::scale_columns(ctx, vc.view(), ConstView<T>(z.view()), 0.0, z.view());
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 7; ++j) EXPECT_EQ(z(i, j), static_cast<T>(vc(0, j) * static_cast<T>(Z(i, j))));

  // magnitude_scale: n = sqrt(sq + s cross), inv_n = 1 / n, c = m / n.
  const Matrix<T> m = random_matrix<T>(1, 6, 9), sq = random_matrix<T>(1, 6, 10, 1.0, 2.0),
                  cross = random_matrix<T>(1, 6, 11);
  Matrix<T> inv_n(1, 6), c(1, 6);
  Backend::magnitude_scale(ctx, m.view(), sq.view(), cross.view(), 0.25, inv_n.view(), c.view());
  for (int j = 0; j < 6; ++j) {
    const double n = std::sqrt(double(sq(0, j)) + 0.25 * double(cross(0, j)));
    EXPECT_NEAR(inv_n(0, j), 1.0 / n, tol / n);
    EXPECT_NEAR(c(0, j), double(m(0, j)) / n, tol);
  }
}
TEST(DoraBackendOps, FloatOpsMatchTheirDefinitions) { check_vector_ops<float>(); }
TEST(DoraBackendOps, DoubleOpsMatchTheirDefinitions) { check_vector_ops<double>(); }

// ---- what the bases give DoRA ----------------------------------------------------

TEST(DoraBase, DenseProductsAndNormsMatchLoops) {
  lora::cpu::Context ctx;
  for (const bool fan : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "fan_in_fan_out " << fan);
    const std::int64_t d_out = 6, d_in = 5, N = 3, k = 2;
    Matrix<double> Ws = fan ? random_matrix<double>(d_in, d_out, 1) : random_matrix<double>(d_out, d_in, 1);
    const Matrix<double> bias = random_matrix<double>(1, d_out, 2), x = random_matrix<double>(N, d_in, 3),
                         a = random_matrix<double>(k, d_in, 4);
    lora::cpu::DenseBase<double> base(ctx, Ws.view(), bias.view(), fan);
    const Dense W = logical(to_dense(Ws), fan);
    Matrix<double> y(N, d_out), out(d_out, k), sq(1, d_out);
    base.matmul(x.view(), y.view());
    base.weight_matmul(a.view(), out.view());
    base.row_norms_squared(sq.view());
    Dense want_y(N, d_out), want_out(d_out, k), want_sq(1, d_out);
    for (std::int64_t o = 0; o < d_out; ++o) {
      for (std::int64_t j = 0; j < d_in; ++j) {
        want_sq(0, o) += W(o, j) * W(o, j);
        for (std::int64_t i = 0; i < N; ++i) want_y(i, o) += x(i, j) * W(o, j);  // no bias
        for (std::int64_t q = 0; q < k; ++q) want_out(o, q) += W(o, j) * a(q, j);
      }
    }
    EXPECT_LE(scaled_error(to_dense(y), want_y), 1e-15);
    EXPECT_LE(scaled_error(to_dense(out), want_out), 1e-15);
    EXPECT_LE(scaled_error(to_dense(sq), want_sq), 1e-15);

    // scale_output_rows: W[o, :] *= v[o] of the logical weight.
    const Matrix<double> v = random_matrix<double>(1, d_out, 5);
    base.scale_output_rows(ConstView<double>(v.view()));
    const Dense W2 = logical(to_dense(Ws), fan);
    for (std::int64_t o = 0; o < d_out; ++o)
      for (std::int64_t j = 0; j < d_in; ++j) EXPECT_EQ(W2(o, j), W(o, j) * v(0, o));
  }
}

TEST(DoraBase, Nf4ProductsAndNormsEqualTheDenseBaseOverTheDequantizedWeight) {
  lora::cpu::Context ctx;
  for (const bool fan : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "fan_in_fan_out " << fan);
    const std::int64_t d_out = 24, d_in = 40, k = 3;
    const Matrix<float> Ws = fan ? random_matrix<float>(d_in, d_out, 1) : random_matrix<float>(d_out, d_in, 1);
    auto nf4 = lora::cpu::Nf4Base<float>::quantize(ctx, Ws.view(), {}, {}, fan);
    nf4.set_tile_rows(7);  // several tiles, the last one short
    Matrix<float> deq(Ws.rows(), Ws.cols());
    nf4.dequantize(deq.view());
    lora::cpu::DenseBase<float> dense(ctx, ConstView<float>(deq.view()), {}, fan);
    const Matrix<float> a = random_matrix<float>(k, d_in, 2), x = random_matrix<float>(5, d_in, 3);
    Matrix<float> out_q(d_out, k), out_d(d_out, k), sq_q(1, d_out), sq_d(1, d_out), y_q(5, d_out), y_d(5, d_out);
    nf4.weight_matmul(a.view(), out_q.view());
    dense.weight_matmul(a.view(), out_d.view());
    nf4.row_norms_squared(sq_q.view());
    dense.row_norms_squared(sq_d.view());
    nf4.matmul(x.view(), y_q.view());
    dense.matmul(x.view(), y_d.view());
    EXPECT_LE(scaled_error(to_dense(out_q), to_dense(out_d)), 1e-6);
    EXPECT_LE(scaled_error(to_dense(sq_q), to_dense(sq_d)), 1e-6);
    EXPECT_LE(scaled_error(to_dense(y_q), to_dense(y_d)), 1e-6);
    const Matrix<float> v(1, d_out);
    expect_error([&] { nf4.scale_output_rows(ConstView<float>(v.view())); }, {"NF4", "merged_weight"});
  }
}

// ---- the layer against the reference -------------------------------------------

struct Case {
  std::int64_t d_out, d_in, n;
  int r;
  bool fan_in_fan_out, bias;
  double dropout;
};
const Case kCases[] = {
    {5, 7, 4, 2, false, true, 0.0},  {5, 7, 4, 5, true, false, 0.0},  // r = min(d_in, d_out)
    {6, 3, 1, 1, false, true, 0.0},  // N = 1, r = 1
    {9, 4, 6, 3, true, true, 0.3},   // fan_in_fan_out with dropout
    {4, 8, 5, 2, false, false, 0.5},
};

Config dora_config(const Case& c) {
  Config cfg;
  cfg.r = c.r;
  cfg.alpha = 3.0;
  cfg.dropout = c.dropout;
  cfg.fan_in_fan_out = c.fan_in_fan_out;
  cfg.use_dora = true;
  cfg.seed = 77;
  return cfg;
}

// A DoRA Linear<double> with B and m moved away from their init (B = 0 and
// m = ||W|| would make c = 1 and hide every DoRA term).
struct DoraSetup {
  static constexpr std::uint32_t kStream = 3, kCall = 5;
  explicit DoraSetup(const Case& c)
      : cfg(dora_config(c)),
        W(c.fan_in_fan_out ? random_matrix<double>(c.d_in, c.d_out, 1) : random_matrix<double>(c.d_out, c.d_in, 1)),
        bias(random_matrix<double>(1, c.d_out, 2)),
        x(random_matrix<double>(c.n, c.d_in, 3)),
        layer(ctx, W.view(), c.bias ? ConstView<double>(bias.view()) : ConstView<double>(), cfg, kStream) {
    set_from(layer.lora_B().value, to_dense(random_matrix<double>(c.d_out, c.r, 4)));
    const Dense m0 = to_dense<double>(layer.magnitude());
    for (std::int64_t o = 0; o < c.d_out; ++o) layer.lora_magnitude().value(0, o) = m0(0, o) * (1.0 + 0.1 * (o % 3));
  }
  RefAdapter ref() const {
    RefAdapter a;
    a.A = to_dense<double>(layer.A());
    a.B = to_dense<double>(layer.B());
    a.m = to_dense<double>(layer.magnitude()).v;
    a.s = layer.scale();
    a.p = cfg.dropout;
    a.seed = cfg.seed;
    a.stream = kStream;
    a.call = kCall;
    return a;
  }
  std::vector<double> ref_bias(const Case& c) const { return c.bias ? to_dense(bias).v : std::vector<double>(); }

  lora::cpu::Context ctx;
  Config cfg;
  Matrix<double> W, bias, x;
  lora::cpu::Linear<double> layer;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return std::to_string(c.d_out) + "x" + std::to_string(c.d_in) + "_N" + std::to_string(c.n) + "_r" +
         std::to_string(c.r) + (c.fan_in_fan_out ? "_fanin" : "") + (c.bias ? "_bias" : "") +
         (c.dropout > 0 ? "_dropout" : "");
}

class DoraLayer : public ::testing::TestWithParam<Case> {};

TEST_P(DoraLayer, MagnitudeStartsAtTheRowNormsOfW) {
  const Case c = GetParam();
  lora::cpu::Context ctx;
  Matrix<double> W = c.fan_in_fan_out ? random_matrix<double>(c.d_in, c.d_out, 1) : random_matrix<double>(c.d_out, c.d_in, 1);
  lora::cpu::Linear<double> layer(ctx, W.view(), {}, dora_config(c));
  RefAdapter zero;
  zero.A = to_dense<double>(layer.A());
  zero.B = Dense(c.d_out, c.r);
  const std::vector<double> norms = ref_norms(logical(to_dense(W), c.fan_in_fan_out), zero);
  for (std::int64_t o = 0; o < c.d_out; ++o) EXPECT_NEAR(layer.magnitude()(0, o), norms[o], 1e-14 * norms[o]);
  EXPECT_EQ(layer.trainable_parameters(), c.r * (c.d_in + c.d_out) + c.d_out);
  ASSERT_EQ(layer.parameters().size(), 3u);
  EXPECT_EQ(layer.parameters()[2].name, "lora_magnitude_vector");

  // B = 0, m = ||W||: the layer is the base layer (c = 1), up to the rounding of m / n.
  const Matrix<double> x = random_matrix<double>(c.n, c.d_in, 3);
  Matrix<double> y(c.n, c.d_out), y_base(c.n, c.d_out);
  layer.forward(x.view(), y.view());
  layer.base_forward(x.view(), y_base.view());
  EXPECT_LE(scaled_error(to_dense(y), to_dense(y_base)), 1e-14);
}

TEST_P(DoraLayer, ForwardEqualsTheNaiveDoraLayer) {
  const Case c = GetParam();
  DoraSetup s(c);
  const Dense W = logical(to_dense(s.W), c.fan_in_fan_out);
  const Dense want = ref_forward(W, s.ref_bias(c), to_dense(s.x), {s.ref()});
  Matrix<double> y(c.n, c.d_out);
  s.layer.set_dropout_calls(DoraSetup::kCall);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  EXPECT_LE(scaled_error(to_dense(y), want), 1e-12);
  // eval: no dropout, the same formula with p = 0; inference() and forward(eval) agree.
  RefAdapter no_drop = s.ref();
  no_drop.p = 0.0;
  const Dense want_eval = ref_forward(W, s.ref_bias(c), to_dense(s.x), {no_drop});
  Matrix<double> y_eval(c.n, c.d_out), y_inf(c.n, c.d_out);
  s.layer.forward(s.x.view(), y_eval.view(), Mode::eval);
  s.layer.inference(s.x.view(), y_inf.view());
  EXPECT_LE(scaled_error(to_dense(y_eval), want_eval), 1e-12);
  EXPECT_LE(scaled_error(to_dense(y_inf), want_eval), 1e-12);
  // The split form: base_forward + forward_lora == forward.
  Matrix<double> y_split(c.n, c.d_out);
  s.layer.base_forward(s.x.view(), y_split.view());
  s.layer.forward_lora(s.x.view(), y_split.view(), Mode::eval);
  EXPECT_LE(scaled_error(to_dense(y_split), want_eval), 1e-12);
}

// L = 1/2 ||y - t||^2 with n held at its value for the current A, B (detached):
// the reference's L is quadratic in x, A, B and m, so central differences
// carry rounding error only.
TEST_P(DoraLayer, CentralDifferencesWithDetachedNormMatchBackward) {
  const Case c = GetParam();
  DoraSetup s(c);
  const Dense W = logical(to_dense(s.W), c.fan_in_fan_out);
  const Dense target = to_dense(random_matrix<double>(c.n, c.d_out, 99));
  const RefAdapter base_ref = s.ref();
  const std::vector<std::vector<double>> fixed = {ref_norms(W, base_ref)};

  // Analytic, through the split form too (backward_lora after a base backward must give the same).
  Matrix<double> y(c.n, c.d_out), dL_dy(c.n, c.d_out), dL_dx(c.n, c.d_in);
  s.layer.set_dropout_calls(DoraSetup::kCall);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  for (std::int64_t i = 0; i < y.size(); ++i) dL_dy.data()[i] = y.data()[i] - target.v[static_cast<std::size_t>(i)];
  s.layer.backward(s.x.view(), dL_dy.view(), dL_dx.view());
  const Dense dA = to_dense<double>(s.layer.dL_dA()), dB = to_dense<double>(s.layer.dL_dB()),
              dm = to_dense<double>(s.layer.adapter().dL_dm()), dx = to_dense(dL_dx);

  auto loss = [&](const Dense& x, const RefAdapter& a) {
    const Dense yr = ref_forward(W, s.ref_bias(c), x, {a}, fixed);
    double l = 0.0;
    for (std::size_t i = 0; i < yr.v.size(); ++i) l += 0.5 * (yr.v[i] - target.v[i]) * (yr.v[i] - target.v[i]);
    return l;
  };
  constexpr double h = 1e-4;
  auto numeric = [&](auto&& value_at, std::int64_t rows, std::int64_t cols) {
    Dense g(rows, cols);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) {
        Dense x = to_dense(s.x);
        RefAdapter a = base_ref;
        double& v = value_at(x, a, i, j);
        const double saved = v;
        v = saved + h;
        const double plus = loss(x, a);
        v = saved - h;
        const double minus = loss(x, a);
        g(i, j) = (plus - minus) / (2 * h);
      }
    return g;
  };
  const Dense num_dx = numeric([](Dense& x, RefAdapter&, std::int64_t i, std::int64_t j) -> double& { return x(i, j); },
                               c.n, c.d_in);
  const Dense num_dA = numeric([](Dense&, RefAdapter& a, std::int64_t i, std::int64_t j) -> double& { return a.A(i, j); },
                               c.r, c.d_in);
  const Dense num_dB = numeric([](Dense&, RefAdapter& a, std::int64_t i, std::int64_t j) -> double& { return a.B(i, j); },
                               c.d_out, c.r);
  const Dense num_dm = numeric(
      [](Dense&, RefAdapter& a, std::int64_t, std::int64_t j) -> double& { return a.m[static_cast<std::size_t>(j)]; },
      1, c.d_out);
  EXPECT_LE(scaled_error(dx, num_dx), 1e-7);
  EXPECT_LE(scaled_error(dA, num_dA), 1e-7);
  EXPECT_LE(scaled_error(dB, num_dB), 1e-7);
  EXPECT_LE(scaled_error(dm, num_dm), 1e-7);

  // The split form: base backward (dL_dy W) + backward_lora == backward.
  Matrix<double> dx_split(c.n, c.d_in);
  s.layer.base().backward_input(dL_dy.view(), dx_split.view());
  s.layer.backward_lora(s.x.view(), dL_dy.view(), dx_split.view());
  EXPECT_LE(scaled_error(to_dense(dx_split), dx), 1e-12);

  // GradMode::accumulate adds, ignore leaves the gradients alone.
  s.layer.backward(s.x.view(), dL_dy.view(), {}, GradMode::accumulate);
  Dense twice = dm;
  for (double& v : twice.v) v *= 2.0;
  EXPECT_LE(scaled_error(to_dense<double>(s.layer.adapter().dL_dm()), twice), 1e-14);
  s.layer.backward(s.x.view(), dL_dy.view(), {}, GradMode::ignore);
  EXPECT_LE(scaled_error(to_dense<double>(s.layer.adapter().dL_dm()), twice), 1e-14);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DoraLayer, ::testing::ValuesIn(kCases), case_name);

// ---- several adapters -------------------------------------------------------------

// Two weighted DoRA adapters and a LoRA one on one set: forward against the
// reference, and every gradient by central differences (n detached).
TEST(DoraAdapterSet, WeightedDoraAndLoraAdaptersMatchTheReference) {
  lora::cpu::Context ctx;
  const std::int64_t d_out = 6, d_in = 5, N = 4;
  Matrix<double> Ws = random_matrix<double>(d_out, d_in, 1);
  const Matrix<double> bias = random_matrix<double>(1, d_out, 2), x = random_matrix<double>(N, d_in, 3);
  lora::cpu::AdapterSet<double> set(ctx, Ws.view(), bias.view());
  struct Spec {
    const char* name;
    int r;
    bool dora;
    double w;
    double p;
  };
  const Spec specs[] = {{"d1", 2, true, 0.7, 0.0}, {"l", 3, false, -0.4, 0.2}, {"d2", 1, true, 1.3, 0.25}};
  std::vector<RefAdapter> refs;
  std::vector<lora::WeightedAdapter> active;
  std::uint32_t stream = 0;
  for (const Spec& sp : specs) {
    Config cfg;
    cfg.r = sp.r;
    cfg.alpha = 2.0 * sp.r + 1;
    cfg.use_dora = sp.dora;
    cfg.dropout = sp.p;
    cfg.seed = 5;
    auto& a = set.add(sp.name, cfg, ++stream);
    set_from(a.lora_B().value, to_dense(random_matrix<double>(d_out, sp.r, 10 + stream)));
    RefAdapter ref;
    if (sp.dora) {
      for (std::int64_t o = 0; o < d_out; ++o) a.lora_magnitude().value(0, o) *= 1.0 + 0.2 * ((o + stream) % 3);
      ref.m = to_dense<double>(a.magnitude()).v;
    }
    ref.A = to_dense<double>(a.A());
    ref.B = to_dense<double>(a.B());
    ref.s = a.scale();
    ref.w = sp.w;
    ref.p = sp.p;
    ref.seed = 5;
    ref.stream = stream;
    ref.call = 0;
    refs.push_back(ref);
    active.push_back({sp.name, sp.w});
  }
  set.set_active(active);
  const Dense W = to_dense(Ws);
  const Dense want = ref_forward(W, to_dense(bias).v, to_dense(x), refs);
  Matrix<double> y(N, d_out);
  set.forward(x.view(), y.view(), Mode::train);
  EXPECT_LE(scaled_error(to_dense(y), want), 1e-12);

  const Dense target = to_dense(random_matrix<double>(N, d_out, 98));
  Matrix<double> dL_dy(N, d_out), dL_dx(N, d_in);
  for (std::int64_t i = 0; i < y.size(); ++i) dL_dy.data()[i] = y.data()[i] - target.v[static_cast<std::size_t>(i)];
  set.backward(x.view(), dL_dy.view(), dL_dx.view());

  std::vector<std::vector<double>> fixed;
  for (const RefAdapter& r : refs) fixed.push_back(r.m.empty() ? std::vector<double>() : ref_norms(W, r));
  auto loss = [&](const Dense& xv, const std::vector<RefAdapter>& rs) {
    const Dense yr = ref_forward(W, to_dense(bias).v, xv, rs, fixed);
    double l = 0.0;
    for (std::size_t i = 0; i < yr.v.size(); ++i) l += 0.5 * (yr.v[i] - target.v[i]) * (yr.v[i] - target.v[i]);
    return l;
  };
  constexpr double h = 1e-4;
  auto numeric_of = [&](std::size_t k, int which, std::int64_t rows, std::int64_t cols) {
    Dense g(rows, cols);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) {
        Dense xv = to_dense(x);
        std::vector<RefAdapter> rs = refs;
        double& v = which == 0 ? xv(i, j) : which == 1 ? rs[k].A(i, j) : which == 2 ? rs[k].B(i, j) : rs[k].m[j];
        const double saved = v;
        v = saved + h;
        const double plus = loss(xv, rs);
        v = saved - h;
        g(i, j) = (plus - loss(xv, rs)) / (2 * h);
      }
    return g;
  };
  EXPECT_LE(scaled_error(to_dense(dL_dx), numeric_of(0, 0, N, d_in)), 1e-7);
  for (std::size_t k = 0; k < refs.size(); ++k) {
    SCOPED_TRACE(specs[k].name);
    const auto& a = set.get(specs[k].name);
    EXPECT_LE(scaled_error(to_dense<double>(a.dL_dA()), numeric_of(k, 1, a.rank(), d_in)), 1e-7);
    EXPECT_LE(scaled_error(to_dense<double>(a.dL_dB()), numeric_of(k, 2, d_out, a.rank())), 1e-7);
    if (specs[k].dora) {
      EXPECT_LE(scaled_error(to_dense<double>(a.dL_dm()), numeric_of(k, 3, 1, d_out)), 1e-7);
    }
  }
  EXPECT_EQ(set.trainable_parameters(), 2 * (d_in + d_out) + d_out + 3 * (d_in + d_out) + 1 * (d_in + d_out) + d_out);
}

TEST(DoraAdapterSet, MixedBatchesAndCombineRefuseDoraAdaptersByName) {
  lora::cpu::Context ctx;
  Matrix<float> W = random_matrix<float>(4, 3, 1);
  lora::cpu::AdapterSet<float> set(ctx, W.view());
  Config dora;
  dora.r = 2;
  dora.use_dora = true;
  Config plain;
  plain.r = 2;
  set.add("mag", dora);
  set.add("plain", plain);
  const Matrix<float> x = random_matrix<float>(2, 3, 2);
  Matrix<float> y(2, 4);
  lora::cpu::AdapterSet<float>::ForwardState state;
  expect_error([&] { set.forward_mixed(x.view(), {"plain", "mag"}, y.view(), state); },
               {"row_adapters[1]", "\"mag\"", "DoRA", "mixed batches"});
  expect_error([&] { set.inference_mixed(x.view(), {"mag", "__base__"}, y.view()); }, {"\"mag\"", "DoRA"});
  expect_error([&] { set.combine("both", {{"plain", 1.0}, {"mag", 0.5}}); }, {"\"mag\"", "DoRA", "combined"});
  EXPECT_FALSE(set.contains("both"));
  // A mixed batch of the LoRA adapter alone still works.
  set.forward_mixed(x.view(), {"plain", "__base__"}, y.view(), state);
}

TEST(DoraAdapter, CallsThatCannotServeDoraAreRefused) {
  lora::cpu::Context ctx;
  Config cfg;
  cfg.r = 2;
  cfg.use_dora = true;
  expect_error([&] { lora::LoraAdapter<float, Backend> a(ctx, 3, 4, cfg); }, {"reset_parameters", "DoRA"});
  Matrix<float> W = random_matrix<float>(4, 3, 1);
  lora::cpu::DenseBase<float> base(ctx, W.view());
  lora::LoraAdapter<float, Backend> a(base, cfg);
  expect_error([&] { a.reset_parameters(); }, {"reset_parameters(base)"});
  const Matrix<float> x = random_matrix<float>(2, 3, 2);
  Matrix<float> y(2, 4);
  expect_error([&] { a.forward(x.view(), y.view()); }, {"DoRA", "forward(base, x, xWt, y, state)"});
  expect_error([&] { a.inference(x.view(), y.view()); }, {"DoRA", "inference(base"});
  // xWt must be N x d_out and apart from y.
  lora::LoraAdapter<float, Backend>::ForwardState st;
  expect_error([&] { a.forward(base, x.view(), ConstView<float>(y.view()), y.view(), st); }, {"xWt", "overlaps"});
  // DoRA rescales the base's output, so it cannot be the one that writes y.
  Matrix<float> xWt(2, 4);
  expect_error([&] { a.forward(base, x.view(), xWt.view(), y.view(), st, 1.0, lora::OutputMode::overwrite); },
               {"OutputMode::overwrite", "DoRA"});
  expect_error([&] { a.inference(base, x.view(), xWt.view(), y.view(), st, 1.0, lora::OutputMode::overwrite); },
               {"OutputMode::overwrite", "DoRA"});
  Config plain;
  plain.r = 2;
  lora::LoraAdapter<float, Backend> lora_only(base, plain);
  expect_error([&] { lora_only.lora_magnitude(); }, {"not a DoRA adapter"});
}

// ---- QDoRA: an NF4 base ------------------------------------------------------------

TEST(DoraNf4, QDoraEqualsDoraOverTheDequantizedWeight) {
  lora::cpu::Context ctx;
  for (const bool fan : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "fan_in_fan_out " << fan);
    const std::int64_t d_out = 24, d_in = 40, N = 5;
    const Matrix<float> Ws = fan ? random_matrix<float>(d_in, d_out, 1) : random_matrix<float>(d_out, d_in, 1);
    const Matrix<float> bias = random_matrix<float>(1, d_out, 2), x = random_matrix<float>(N, d_in, 3);
    auto nf4 = lora::cpu::Nf4Base<float>::quantize(ctx, Ws.view(), {}, bias.view(), fan);
    nf4.set_tile_rows(9);
    Matrix<float> deq(Ws.rows(), Ws.cols());
    nf4.dequantize(deq.view());
    lora::AdapterSet<float, Backend, lora::cpu::Nf4Base<float>> qset(std::move(nf4));
    lora::cpu::AdapterSet<float> dset(ctx, ConstView<float>(deq.view()), bias.view(), fan);
    Config cfg;
    cfg.r = 3;
    cfg.alpha = 6;
    cfg.use_dora = true;
    cfg.fan_in_fan_out = fan;
    auto& qa = qset.add("d", cfg, 1);
    auto& da = dset.add("d", cfg, 1);
    EXPECT_LE(scaled_error(to_dense<float>(qa.magnitude()), to_dense<float>(da.magnitude())), 1e-6);
    const Matrix<float> B = random_matrix<float>(d_out, 3, 4);
    set_from(qa.lora_B().value, to_dense(B));
    set_from(da.lora_B().value, to_dense(B));
    qset.set_active("d");
    dset.set_active("d");
    Matrix<float> yq(N, d_out), yd(N, d_out), dy = random_matrix<float>(N, d_out, 5), dxq(N, d_in), dxd(N, d_in);
    qset.forward(x.view(), yq.view(), Mode::train);
    dset.forward(x.view(), yd.view(), Mode::train);
    EXPECT_LE(scaled_error(to_dense(yq), to_dense(yd)), 1e-5);
    qset.backward(x.view(), dy.view(), dxq.view());
    dset.backward(x.view(), dy.view(), dxd.view());
    EXPECT_LE(scaled_error(to_dense(dxq), to_dense(dxd)), 1e-5);
    EXPECT_LE(scaled_error(to_dense<float>(qa.dL_dm()), to_dense<float>(da.dL_dm())), 1e-5);
    EXPECT_LE(scaled_error(to_dense<float>(qa.dL_dB()), to_dense<float>(da.dL_dB())), 1e-5);

    // The dense merged weight: (m / n) o (dequant(W) + s B A), rows of the logical weight.
    Matrix<float> merged(Ws.rows(), Ws.cols());
    qset.merged_weight("d", merged.view());
    RefAdapter ref;
    ref.A = to_dense<float>(qa.A());
    ref.B = to_dense(B);
    ref.s = qa.scale();
    const Dense Wl = logical(to_dense(deq), fan);
    const std::vector<double> n = ref_norms(Wl, ref);
    const Dense m = to_dense<float>(qa.magnitude());
    Dense want(d_out, d_in);
    for (std::int64_t o = 0; o < d_out; ++o)
      for (std::int64_t j = 0; j < d_in; ++j) {
        double v = Wl(o, j);
        for (int k = 0; k < 3; ++k) v += ref.s * ref.B(o, k) * ref.A(k, j);
        want(o, j) = m(0, o) / n[o] * v;
      }
    EXPECT_LE(scaled_error(logical(to_dense(merged), fan), want), 1e-5);
    expect_error([&] { qset.merge("d"); }, {"NF4"});
  }
}

// ---- merging ------------------------------------------------------------------------

TEST(DoraMerge, MergedOutputEqualsUnmergedAndUnmergeRestoresW) {
  for (const bool fan : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "fan_in_fan_out " << fan);
    lora::cpu::Context ctx;
    const std::int64_t d_out = 33, d_in = 17, N = 6;
    Matrix<float> W = fan ? random_matrix<float>(d_in, d_out, 1) : random_matrix<float>(d_out, d_in, 1);
    const Matrix<float> W0 = W.clone(), bias = random_matrix<float>(1, d_out, 2), x = random_matrix<float>(N, d_in, 3);
    Config cfg;
    cfg.r = 4;
    cfg.alpha = 8;
    cfg.use_dora = true;
    cfg.fan_in_fan_out = fan;
    lora::cpu::Linear<float> layer(ctx, W.view(), bias.view(), cfg);
    set_from(layer.lora_B().value, to_dense(random_matrix<float>(d_out, 4, 4, -0.3, 0.3)));
    for (std::int64_t o = 0; o < d_out; ++o) layer.lora_magnitude().value(0, o) *= 1.0f + 0.05f * static_cast<float>(o % 5);

    Matrix<float> y(N, d_out), y_merged(N, d_out);
    layer.inference(x.view(), y.view());
    layer.merge();
    EXPECT_GT(scaled_error(to_dense(W), to_dense(W0)), 1e-3);  // W holds the update
    layer.inference(x.view(), y_merged.view());
    EXPECT_LE(scaled_error(to_dense(y_merged), to_dense(y)), 1e-5);
    layer.unmerge();
    EXPECT_LE(scaled_error(to_dense(W), to_dense(W0)), 1e-6);  // up to rounding
  }
}

// AdapterSet::merged_weight on a dense base equals what merge() writes into W.
TEST(DoraMerge, MergedWeightEqualsTheMergedW) {
  lora::cpu::Context ctx;
  Matrix<double> W = random_matrix<double>(7, 5, 1);
  lora::cpu::AdapterSet<double> set(ctx, W.view());
  Config cfg;
  cfg.r = 2;
  cfg.use_dora = true;
  auto& a = set.add("d", cfg);
  set_from(a.lora_B().value, to_dense(random_matrix<double>(7, 2, 2)));
  a.lora_magnitude().value(0, 3) *= 1.5;
  Matrix<double> out(7, 5);
  set.merged_weight("d", out.view());
  set.merge("d");
  EXPECT_LE(scaled_error(to_dense(out), to_dense(W)), 1e-15);
  set.unmerge();
}

// ---- training ------------------------------------------------------------------------

// A teacher that rescales the outputs of the frozen layer (y = diag(g) x W^T):
// what DoRA's magnitude expresses directly. Adam holds state for m and the loss falls.
TEST(DoraTraining, AdamTrainsTheMagnitude) {
  lora::cpu::Context ctx;
  const std::int64_t d_out = 8, d_in = 6, N = 16;
  Matrix<float> W = random_matrix<float>(d_out, d_in, 1);
  Config cfg;
  cfg.r = 2;
  cfg.alpha = 2;
  cfg.use_dora = true;
  lora::cpu::Linear<float> layer(ctx, W.view(), {}, cfg);
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  adam.set_lr(adam.add_group(layer.parameters()), 2e-2);
  EXPECT_EQ(adam.state_bytes(), 8u * static_cast<std::size_t>(layer.trainable_parameters()));
  const Dense m0 = to_dense<float>(layer.magnitude());

  const Matrix<float> x = random_matrix<float>(N, d_in, 2);
  Matrix<float> t(N, d_out), y(N, d_out), dL_dy(N, d_out);
  layer.base_forward(x.view(), t.view());
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t o = 0; o < d_out; ++o) t(i, o) *= 1.0f + 0.3f * static_cast<float>(o % 3 - 1);
  auto step = [&] {
    layer.forward(x.view(), y.view());
    double l = 0.0;
    for (std::int64_t i = 0; i < y.size(); ++i) {
      dL_dy.data()[i] = y.data()[i] - t.data()[i];
      l += 0.5 * double(dL_dy.data()[i]) * double(dL_dy.data()[i]);
    }
    layer.backward(x.view(), dL_dy.view(), {});
    adam.step();
    return l;
  };
  const double first = step();
  double last = first;
  for (int s = 0; s < 300; ++s) last = step();
  EXPECT_LT(last, 0.01 * first);
  EXPECT_GT(scaled_error(to_dense<float>(layer.magnitude()), m0), 0.1);  // m moved

  // Memory: x W^T (N x d_out) kept as an activation after a training forward.
  layer.forward(x.view(), y.view());
  EXPECT_GE(layer.memory().activation_bytes, static_cast<std::size_t>(N * d_out) * sizeof(float));
  EXPECT_EQ(layer.memory().parameter_bytes,
            static_cast<std::size_t>(layer.trainable_parameters()) * sizeof(float));
}

// A DoRA run stopped and resumed from its checkpoint ends bit-identical to an
// uninterrupted one: m and its Adam moments are saved with A and B.
TEST(DoraCheckpoint, ResumedRunIsBitIdentical) {
  struct Run {
    Run()
        : W(random_matrix<float>(5, 7, 1)),
          layer(ctx, W.view(), {}, config()),
          adam(ctx, lora::AdamOptions::adamw(1e-2, 0.01)) {
      adam.add_group(layer.parameters());
    }
    static Config config() {
      Config c;
      c.r = 3;
      c.alpha = 6;
      c.dropout = 0.25;
      c.seed = 9;
      c.use_dora = true;
      return c;
    }
    void step(int s) {
      const Matrix<float> x = random_matrix<float>(4, 7, 100 + s), t = random_matrix<float>(4, 5, 200 + s);
      Matrix<float> y(4, 5), dy(4, 5);
      layer.forward(x.view(), y.view());
      for (std::int64_t i = 0; i < y.size(); ++i) dy.data()[i] = y.data()[i] - t.data()[i];
      layer.backward(x.view(), dy.view(), {});
      adam.step();
    }
    std::vector<float> state() {
      std::vector<float> out;
      for (ConstView<float> v : {layer.A(), layer.B(), layer.magnitude()}) out.insert(out.end(), v.data, v.data + v.size());
      for (auto& m : adam.moments()) {
        out.insert(out.end(), m.m.data, m.m.data + m.m.size());
        out.insert(out.end(), m.v.data, m.v.data + m.v.size());
      }
      return out;
    }
    std::vector<lora::io::NamedLayer<float, Backend>> layers() { return {{"l", &layer}}; }
    lora::cpu::Context ctx;
    Matrix<float> W;
    lora::cpu::Linear<float> layer;
    lora::cpu::Adam<float> adam;
  };
  Run uninterrupted;
  const std::vector<float> m_start(uninterrupted.layer.magnitude().data,
                                   uninterrupted.layer.magnitude().data + uninterrupted.layer.magnitude().size());
  for (int s = 0; s < 8; ++s) uninterrupted.step(s);
  const ConstView<float> m_end = uninterrupted.layer.magnitude();
  ASSERT_NE(std::memcmp(m_start.data(), m_end.data, m_start.size() * sizeof(float)), 0) << "training must move m";
  TempDir tmp;
  const std::string path = tmp / "dora.safetensors";
  {
    Run first;
    for (int s = 0; s < 3; ++s) first.step(s);
    lora::io::save_checkpoint(path, first.layers(), first.adam);
    const auto reader = lora::io::SafetensorsReader::open(path);
    EXPECT_TRUE(reader.contains("layers.l.lora_magnitude_vector"));
  }
  Run resumed;
  lora::io::load_checkpoint(path, resumed.layers(), resumed.adam);
  for (int s = 3; s < 8; ++s) resumed.step(s);
  const std::vector<float> a = resumed.state(), b = uninterrupted.state();
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);

  // A plain LoRA layer refuses a DoRA checkpoint.
  lora::cpu::Context ctx;
  Matrix<float> W = random_matrix<float>(5, 7, 1);
  Config plain = Run::config();
  plain.use_dora = false;
  lora::cpu::Linear<float> lora_layer(ctx, W.view(), {}, plain);
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions::adamw(1e-2, 0.01));
  adam.add_group(lora_layer.parameters());
  std::vector<lora::io::NamedLayer<float, Backend>> layers = {{"l", &lora_layer}};
  expect_error([&] { lora::io::load_checkpoint(path, layers, adam); }, {"DoRA", "use_dora"});
}

}  // namespace

// lora::Linear on the CPU: central-difference gradients, a naive triple-loop
// reference for forward and backward, and the invariants a LoRA layer
// promises (B = 0 is the base layer, merged == unmerged, W never changes while
// training, GradMode, eval mode, init, parameter counts, memory report).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <ostream>
#include <sstream>
#include <tuple>
#include <random>
#include <string>
#include <vector>

#include "cpu_test_util.hpp"
#include "lora/lora.hpp"

namespace {

using io_test::random_matrix;
using lora::Config;
using lora::GradMode;
using lora::Mode;
using lora::cpu::Matrix;
using Backend = lora::cpu::Backend;

// ---- helpers -----------------------------------------------------------------

// Fills m with U(lo, hi) from std::mt19937_64: test data that does not come
// from the library's own generator.
template <class T>
void fill_uniform(Matrix<T>& m, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(gen));
}
template <class T>
void copy_into(lora::MatrixView<T> dst, const Matrix<T>& src) {
  for (std::int64_t i = 0; i < src.rows(); ++i)
    for (std::int64_t j = 0; j < src.cols(); ++j) dst(i, j) = src(i, j);
}

// A dense row-major matrix of doubles for the reference computations.
struct Dense {
  std::int64_t rows = 0, cols = 0;
  std::vector<double> v;
  Dense(std::int64_t r, std::int64_t c) : rows(r), cols(c), v(static_cast<std::size_t>(r * c), 0.0) {}
  double& operator()(std::int64_t i, std::int64_t j) { return v[static_cast<std::size_t>(i * cols + j)]; }
  double operator()(std::int64_t i, std::int64_t j) const { return v[static_cast<std::size_t>(i * cols + j)]; }
};
template <class T>
Dense to_dense(lora::MatrixView<const T> m) {
  Dense d(m.rows, m.cols);
  for (std::int64_t i = 0; i < m.rows; ++i)
    for (std::int64_t j = 0; j < m.cols; ++j) d(i, j) = static_cast<double>(m(i, j));
  return d;
}
template <class T>
Dense to_dense(const Matrix<T>& m) {
  return to_dense<T>(m.view());
}

// max_ij |got - want| / max_ij |want|: the error relative to the tensor's scale.
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
// ||got - want||_2 / ||want||_2.
double norm_error(const Dense& got, const Dense& want) {
  double diff = 0.0, ref = 0.0;
  for (std::size_t i = 0; i < want.v.size(); ++i) {
    diff += (got.v[i] - want.v[i]) * (got.v[i] - want.v[i]);
    ref += want.v[i] * want.v[i];
  }
  return std::sqrt(diff) / std::sqrt(ref);
}

// The naive LoRA layer, in double, straight from the definition
//   y = x W^T + bias + s (drop(x) A^T) B^T,  drop(x)_ij = x_ij keep_ij / (1 - p)
// with keep_ij = lora::dropout_keep(seed, stream, call, i d_in + j, p).
struct Reference {
  Dense W;  // d_out x d_in (transposed back when the base is stored d_in x d_out)
  std::vector<double> bias;
  Dense A, B;
  double s;
  Dense dropped_x{0, 0};

  Reference(const Dense& W_stored, bool fan_in_fan_out, const Dense& bias_row, const Dense& A_, const Dense& B_, double s_)
      : W(fan_in_fan_out ? W_stored.cols : W_stored.rows, fan_in_fan_out ? W_stored.rows : W_stored.cols),
        A(A_),
        B(B_),
        s(s_) {
    for (std::int64_t o = 0; o < W.rows; ++o)
      for (std::int64_t i = 0; i < W.cols; ++i) W(o, i) = fan_in_fan_out ? W_stored(i, o) : W_stored(o, i);
    bias.assign(static_cast<std::size_t>(W.rows), 0.0);
    for (std::int64_t o = 0; o < bias_row.cols; ++o) bias[static_cast<std::size_t>(o)] = bias_row(0, o);
  }

  Dense forward(const Dense& x, double p, const Config& c, std::uint32_t stream, std::uint32_t call) {
    const std::int64_t n = x.rows, d_in = W.cols, d_out = W.rows, r = A.rows;
    dropped_x = x;
    if (p > 0.0) {
      const float pf = static_cast<float>(p);
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = 0; j < d_in; ++j) {
          const bool keep = lora::dropout_keep(c.seed, stream, call, static_cast<std::uint64_t>(i * d_in + j), pf);
          dropped_x(i, j) = keep ? x(i, j) / (1.0 - static_cast<double>(pf)) : 0.0;
        }
    }
    Dense y(n, d_out);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t o = 0; o < d_out; ++o) {
        double base = bias[static_cast<std::size_t>(o)];
        for (std::int64_t j = 0; j < d_in; ++j) base += x(i, j) * W(o, j);
        double lora = 0.0;
        for (std::int64_t k = 0; k < r; ++k) {
          double xa = 0.0;
          for (std::int64_t j = 0; j < d_in; ++j) xa += dropped_x(i, j) * A(k, j);
          lora += xa * B(o, k);
        }
        y(i, o) = base + s * lora;
      }
    return y;
  }

  // For the x of the last forward: dL_dx_ij = sum_o g_io W_oj + s sum_k (g B)_ik A_kj keep_ij / (1 - p),
  // dL_dB_ok = s sum_i g_io (drop(x) A^T)_ik,  dL_dA_kj = s sum_i (g B)_ik drop(x)_ij.
  void backward(const Dense& x, const Dense& g, Dense& dL_dx, Dense& dL_dA, Dense& dL_dB) const {
    const std::int64_t n = x.rows, d_in = W.cols, d_out = W.rows, r = A.rows;
    dL_dx = Dense(n, d_in);
    dL_dA = Dense(r, d_in);
    dL_dB = Dense(d_out, r);
    Dense gB(n, r), xa(n, r);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t k = 0; k < r; ++k) {
        for (std::int64_t o = 0; o < d_out; ++o) gB(i, k) += g(i, o) * B(o, k);
        for (std::int64_t j = 0; j < d_in; ++j) xa(i, k) += dropped_x(i, j) * A(k, j);
      }
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < d_in; ++j) {
        double base = 0.0, lora = 0.0;
        for (std::int64_t o = 0; o < d_out; ++o) base += g(i, o) * W(o, j);
        for (std::int64_t k = 0; k < r; ++k) lora += gB(i, k) * A(k, j);
        // d drop(x)_ij / d x_ij = dropped_x / x: 1 / (1 - p) or 0 (1 without dropout).
        const double mask = x(i, j) != 0.0 ? dropped_x(i, j) / x(i, j) : 1.0;
        dL_dx(i, j) = base + s * lora * mask;
      }
    for (std::int64_t o = 0; o < d_out; ++o)
      for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t i = 0; i < n; ++i) dL_dB(o, k) += s * g(i, o) * xa(i, k);
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t j = 0; j < d_in; ++j)
        for (std::int64_t i = 0; i < n; ++i) dL_dA(k, j) += s * gB(i, k) * dropped_x(i, j);
  }
};

// One layer shape and configuration.
struct Case {
  std::int64_t n, d_in, d_out;
  int r;
  double dropout;
  bool fan_in_fan_out;
  bool bias;
  bool rslora;
};
std::string case_name(const Case& c) {
  return "N" + std::to_string(c.n) + "_in" + std::to_string(c.d_in) + "_out" + std::to_string(c.d_out) + "_r" +
         std::to_string(c.r) + "_p" + std::to_string(static_cast<int>(c.dropout * 100)) +
         (c.fan_in_fan_out ? "_fifo" : "") + (c.bias ? "_bias" : "") + (c.rslora ? "_rslora" : "");
}

// gtest prints a case by its name rather than as raw bytes.
void PrintTo(const Case& c, std::ostream* out) { *out << case_name(c); }

Config make_config(const Case& c) {
  Config cfg;
  cfg.r = c.r;
  cfg.alpha = 1.5 * c.r + 1.0;  // s != 1, so a missing scale shows
  cfg.dropout = c.dropout;
  cfg.fan_in_fan_out = c.fan_in_fan_out;
  cfg.use_rslora = c.rslora;
  cfg.seed = 0x5eed0000u + static_cast<std::uint64_t>(c.d_in * 131 + c.d_out);
  return cfg;
}

// W (stored), bias, x, a layer over them with a non-zero B, for one case.
template <class T>
struct LayerSetup {
  lora::cpu::Context ctx;
  Case c;
  Config cfg;
  std::uint32_t stream = 3;
  Matrix<T> W, bias, x;
  lora::Linear<T, Backend> layer;

  explicit LayerSetup(const Case& c_, std::uint64_t seed = 1)
      : c(c_),
        cfg(make_config(c_)),
        W(random_matrix<T>(c_.fan_in_fan_out ? c_.d_in : c_.d_out, c_.fan_in_fan_out ? c_.d_out : c_.d_in, seed)),
        bias(c_.bias ? random_matrix<T>(1, c_.d_out, seed + 1) : Matrix<T>()),
        x(random_matrix<T>(c_.n, c_.d_in, seed + 2)),
        layer(ctx, W.view(), bias.view(), cfg, stream) {
    // B starts at zero; make it non-zero so the gradient checks are not trivial.
    copy_into(layer.lora_B().value, random_matrix<T>(c_.d_out, c_.r, seed + 3, -0.5, 0.5));
  }

  Reference reference() const {
    return Reference(to_dense(W), c.fan_in_fan_out, c.bias ? to_dense(bias) : Dense(1, 0), to_dense<T>(layer.A()),
                     to_dense<T>(layer.B()), layer.scale());
  }
};

// A precondition for the dropout cases: the mask must drop some elements and
// keep others, or the case would not test dropout.
void expect_mask_mixes(const Config& c, std::uint32_t stream, std::uint32_t call, std::int64_t elements) {
  int kept = 0;
  for (std::int64_t i = 0; i < elements; ++i)
    kept += lora::dropout_keep(c.seed, stream, call, static_cast<std::uint64_t>(i), static_cast<float>(c.dropout));
  EXPECT_GT(kept, 0) << "the dropout mask keeps nothing";
  EXPECT_LT(kept, elements) << "the dropout mask drops nothing";
}

const Case kCases[] = {
    // n, d_in, d_out, r, dropout, fan_in_fan_out, bias, rslora
    {4, 7, 5, 1, 0.0, false, true, false},     // r = 1
    {4, 7, 5, 5, 0.3, false, true, false},     // r = min(d_in, d_out), dropout
    {1, 13, 11, 3, 0.25, false, false, false}, // N = 1, dropout
    {1, 11, 13, 11, 0.0, false, true, true},   // N = 1, r = min, rsLoRA
    {6, 13, 11, 4, 0.4, true, true, false},    // transposed base, dropout
    {3, 5, 7, 1, 0.5, true, false, true},      // transposed base, r = 1, dropout, rsLoRA
    {5, 9, 6, 6, 0.0, true, true, false},      // transposed base, r = min
    {3, 64, 8, 16, 0.0, false, true, false},   // r > min(d_in, d_out) (PEFT allows it: an 8 x 64 gate, r = 16)
    {4, 8, 12, 16, 0.3, true, true, true},     // r > min, transposed base, dropout, rsLoRA
};

// ---- gradients ----------------------------------------------------------------

class GradientCheck : public ::testing::TestWithParam<Case> {};

// L = 1/2 ||y - t||^2, so dL_dy = y - t. With the dropout call fixed (through
// set_dropout_calls) the mask is a fixed function of (seed, stream, call), and
// L is a smooth function of x, A and B: central differences apply. L is
// quadratic in each of them, so the differences carry rounding error only.
TEST_P(GradientCheck, CentralDifferencesMatchBackwardInDouble) {
  const Case c = GetParam();
  LayerSetup<double> s(c, 11);
  const Matrix<double> target = random_matrix<double>(c.n, c.d_out, 99);
  constexpr std::uint32_t kCall = 5;
  if (c.dropout > 0.0) expect_mask_mixes(s.cfg, s.stream, kCall, c.n * c.d_in);

  Matrix<double> y(c.n, c.d_out);
  auto loss = [&]() {
    s.layer.set_dropout_calls(kCall);
    s.layer.forward(s.x.view(), y.view(), Mode::train);
    double l = 0.0;
    for (std::int64_t i = 0; i < y.size(); ++i) l += 0.5 * (y.data()[i] - target.data()[i]) * (y.data()[i] - target.data()[i]);
    return l;
  };

  // Analytic gradients from backward.
  loss();
  Matrix<double> dL_dy(c.n, c.d_out), dL_dx(c.n, c.d_in);
  for (std::int64_t i = 0; i < y.size(); ++i) dL_dy.data()[i] = y.data()[i] - target.data()[i];
  s.layer.backward(s.x.view(), dL_dy.view(), dL_dx.view(), GradMode::overwrite);
  const Dense dL_dA = to_dense<double>(s.layer.dL_dA()), dL_dB = to_dense<double>(s.layer.dL_dB());
  const Dense dL_dx_analytic = to_dense(dL_dx);

  // Numeric gradient of L with respect to every element of the view v.
  auto numeric = [&](lora::MatrixView<double> v) {
    constexpr double h = 1e-3;
    Dense g(v.rows, v.cols);
    for (std::int64_t i = 0; i < v.rows; ++i)
      for (std::int64_t j = 0; j < v.cols; ++j) {
        const double saved = v(i, j);
        v(i, j) = saved + h;
        const double plus = loss();
        v(i, j) = saved - h;
        const double minus = loss();
        v(i, j) = saved;
        g(i, j) = (plus - minus) / (2 * h);
      }
    return g;
  };
  const Dense num_dx = numeric(s.x.view());
  const Dense num_dA = numeric(s.layer.lora_A().value);
  const Dense num_dB = numeric(s.layer.lora_B().value);

  // The errors seen, in the XML report (--gtest_output=xml).
  for (const auto& [name, got, want] : {std::make_tuple("dL_dx", &dL_dx_analytic, &num_dx),
                                        std::make_tuple("dL_dA", &dL_dA, &num_dA),
                                        std::make_tuple("dL_dB", &dL_dB, &num_dB)}) {
    std::ostringstream error;
    error << std::scientific << std::setprecision(2) << norm_error(*got, *want);
    RecordProperty(std::string(name) + "_relative_error", error.str());
  }
  EXPECT_LE(norm_error(dL_dx_analytic, num_dx), 1e-6);
  EXPECT_LE(norm_error(dL_dA, num_dA), 1e-6);
  EXPECT_LE(norm_error(dL_dB, num_dB), 1e-6);
  // Element by element too, relative to the largest entry of each gradient.
  EXPECT_LE(scaled_error(dL_dx_analytic, num_dx), 1e-6);
  EXPECT_LE(scaled_error(dL_dA, num_dA), 1e-6);
  EXPECT_LE(scaled_error(dL_dB, num_dB), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GradientCheck, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& info) { return case_name(info.param); });

// ---- naive reference -------------------------------------------------------------

template <class T>
void check_against_reference(const Case& c, double tol) {
  LayerSetup<T> s(c, 21);
  const std::uint32_t call = 2;
  s.layer.set_dropout_calls(call);
  Matrix<T> y(c.n, c.d_out);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  EXPECT_EQ(s.layer.dropout_calls(), call + 1);

  Reference ref = s.reference();
  const Dense x = to_dense(s.x);
  EXPECT_LE(scaled_error(to_dense(y), ref.forward(x, c.dropout, s.cfg, s.stream, call)), tol) << "forward";

  const Matrix<T> dL_dy = random_matrix<T>(c.n, c.d_out, 77);
  Matrix<T> dL_dx(c.n, c.d_in);
  s.layer.backward(s.x.view(), dL_dy.view(), dL_dx.view(), GradMode::overwrite);
  Dense ref_dx(0, 0), ref_dA(0, 0), ref_dB(0, 0);
  ref.backward(x, to_dense(dL_dy), ref_dx, ref_dA, ref_dB);
  EXPECT_LE(scaled_error(to_dense(dL_dx), ref_dx), tol) << "dL_dx";
  EXPECT_LE(scaled_error(to_dense<T>(s.layer.dL_dA()), ref_dA), tol) << "dL_dA";
  EXPECT_LE(scaled_error(to_dense<T>(s.layer.dL_dB()), ref_dB), tol) << "dL_dB";

  // Eval mode: the same reference without dropout.
  Matrix<T> y_eval(c.n, c.d_out);
  s.layer.forward(s.x.view(), y_eval.view(), Mode::eval);
  EXPECT_LE(scaled_error(to_dense(y_eval), ref.forward(x, 0.0, s.cfg, s.stream, call)), tol) << "eval forward";
}

// The reference cases plus one whose GEMMs are large enough (m n k >= 2^18) to
// take the CBLAS path when the library is built with it: 70 x 61 x 67; and
// one whose dropout path runs in three row blocks of the CPU backend's
// 2^18 elements (2^18 / 3001 = 87 rows: 87 + 87 + 26), d_in not a multiple
// of the mask's 32-bit words.
const Case kReferenceCases[] = {
    kCases[0], kCases[1], kCases[2], kCases[3], kCases[4], kCases[5], kCases[6], kCases[7], kCases[8],
    {70, 67, 61, 9, 0.2, false, true, false},
    {70, 67, 61, 9, 0.2, true, true, true},
    {200, 3001, 5, 3, 0.3, false, true, false},
};

TEST(Reference, NaiveLoopsMatchForwardAndBackwardDouble) {
  for (const Case& c : kReferenceCases) {
    SCOPED_TRACE(case_name(c));
    check_against_reference<double>(c, 1e-12);
  }
}

TEST(Reference, NaiveLoopsMatchForwardAndBackwardFloat) {
  for (const Case& c : kReferenceCases) {
    SCOPED_TRACE(case_name(c));
    check_against_reference<float>(c, 2e-6);
  }
}

// Views with a stride larger than their width (a block of a bigger buffer)
// give the same numbers, and the dropout mask follows the logical index.
TEST(Reference, StridedViewsMatchContiguous) {
  const Case c{5, 9, 7, 3, 0.3, false, true, false};
  LayerSetup<double> s(c, 31);
  Matrix<double> y(c.n, c.d_out), dL_dx(c.n, c.d_in);
  const Matrix<double> dL_dy = random_matrix<double>(c.n, c.d_out, 32);
  s.layer.set_dropout_calls(0);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  s.layer.backward(s.x.view(), dL_dy.view(), dL_dx.view());
  const Dense dA = to_dense<double>(s.layer.dL_dA()), dB = to_dense<double>(s.layer.dL_dB());

  // The same tensors at column offset 2 of buffers 4 columns wider.
  Matrix<double> x_buf(c.n, c.d_in + 4), y_buf(c.n, c.d_out + 4), g_buf(c.n, c.d_out + 4), dx_buf(c.n, c.d_in + 4);
  fill_uniform(y_buf, 1, 1e3, 2e3);  // garbage around the blocks must not leak in
  fill_uniform(dx_buf, 2, 1e3, 2e3);
  auto xs = x_buf.view().col_block(2, c.d_in), ys = y_buf.view().col_block(2, c.d_out);
  auto gs = g_buf.view().col_block(2, c.d_out), dxs = dx_buf.view().col_block(2, c.d_in);
  copy_into(xs, s.x);
  copy_into(gs, dL_dy);
  s.layer.set_dropout_calls(0);
  s.layer.forward(xs, ys, Mode::train);
  s.layer.backward(xs, gs, dxs);
  EXPECT_LE(scaled_error(to_dense<double>(ys), to_dense(y)), 1e-14);
  EXPECT_LE(scaled_error(to_dense<double>(dxs), to_dense(dL_dx)), 1e-14);
  EXPECT_LE(scaled_error(to_dense<double>(s.layer.dL_dA()), dA), 1e-14);
  EXPECT_LE(scaled_error(to_dense<double>(s.layer.dL_dB()), dB), 1e-14);
  // Columns outside the blocks untouched.
  for (std::int64_t i = 0; i < c.n; ++i) {
    EXPECT_GE(y_buf(i, 0), 1e3);
    EXPECT_GE(y_buf(i, c.d_out + 3), 1e3);
    EXPECT_GE(dx_buf(i, 1), 1e3);
    EXPECT_GE(dx_buf(i, c.d_in + 2), 1e3);
  }
}

// x and y as column blocks of one activation buffer ([x | y], rows
// interleaved in memory) do not overlap: the layer accepts them and gives the
// numbers of separate buffers.
TEST(Reference, XAndYSideBySideInOneBuffer) {
  const Case c{5, 9, 7, 3, 0.0, false, true, false};
  LayerSetup<double> s(c, 33);
  Matrix<double> y(c.n, c.d_out), buf(c.n, c.d_in + c.d_out);
  s.layer.forward(s.x.view(), y.view(), Mode::eval);
  auto xs = buf.view().col_block(0, c.d_in), ys = buf.view().col_block(c.d_in, c.d_out);
  copy_into(xs, s.x);
  s.layer.forward(xs, ys, Mode::eval);
  EXPECT_LE(scaled_error(to_dense<double>(ys), to_dense(y)), 1e-14);
  EXPECT_EQ(scaled_error(to_dense<double>(xs), to_dense(s.x)), 0.0) << "x was written";
}

// ---- OutputMode ------------------------------------------------------------------

// An adapter told to overwrite y and dL_dx writes exactly what it adds onto
// zeros, bit for bit, whatever the outputs held before (NaN here: never read);
// the dropout cases run the masked dL_dx in place, the last one in three row
// blocks (N = 200, d_in = 3001 against the CPU's 2^18-element blocks).
TEST(OutputMode, AdapterOverwriteEqualsAccumulatingOntoZerosBitForBit) {
  for (const Case& c : {Case{7, 9, 5, 3, 0.0, false, true, false}, Case{13, 11, 17, 1, 0.25, true, false, false},
                        Case{200, 3001, 5, 3, 0.3, false, true, false}}) {
    SCOPED_TRACE(case_name(c));
    LayerSetup<float> s(c, 41);
    auto& adapter = s.layer.adapter();
    const Matrix<float> dL_dy = random_matrix<float>(c.n, c.d_out, 42);
    Matrix<float> y_add(c.n, c.d_out), y_write(c.n, c.d_out), dx_add(c.n, c.d_in), dx_write(c.n, c.d_in);
    Backend::fill(s.ctx, y_add.view(), 0.0f);
    Backend::fill(s.ctx, dx_add.view(), 0.0f);
    Backend::fill(s.ctx, y_write.view(), std::numeric_limits<float>::quiet_NaN());
    Backend::fill(s.ctx, dx_write.view(), std::numeric_limits<float>::quiet_NaN());
    lora::LoraAdapter<float, Backend>::ForwardState add_state, write_state;

    adapter.set_dropout_calls(0);
    adapter.forward(s.x.view(), y_add.view(), add_state);
    adapter.backward(add_state, s.x.view(), dL_dy.view(), dx_add.view());
    const Dense dA = to_dense<float>(adapter.dL_dA()), dB = to_dense<float>(adapter.dL_dB());
    adapter.set_dropout_calls(0);  // the same mask
    adapter.forward(s.x.view(), y_write.view(), write_state, 1.0, lora::OutputMode::overwrite);
    adapter.backward(write_state, s.x.view(), dL_dy.view(), dx_write.view(), GradMode::overwrite,
                     lora::OutputMode::overwrite);

    EXPECT_EQ(std::memcmp(y_write.data(), y_add.data(), y_add.bytes()), 0) << "y";
    EXPECT_EQ(std::memcmp(dx_write.data(), dx_add.data(), dx_add.bytes()), 0) << "dL_dx";
    EXPECT_EQ(to_dense<float>(adapter.dL_dA()).v, dA.v);
    EXPECT_EQ(to_dense<float>(adapter.dL_dB()).v, dB.v);
    EXPECT_GT(Backend::sum_squares<float>(s.ctx, y_add.view()), 0.0);  // B != 0: the adapter wrote something
    EXPECT_GT(Backend::sum_squares<float>(s.ctx, dx_add.view()), 0.0);
    // And without the state, the inference path.
    lora::LoraAdapter<float, Backend>::ForwardState workspace;
    Backend::fill(s.ctx, y_write.view(), std::numeric_limits<float>::quiet_NaN());
    Backend::fill(s.ctx, y_add.view(), 0.0f);
    adapter.inference(s.x.view(), y_add.view(), workspace, 0.5);
    adapter.inference(s.x.view(), y_write.view(), workspace, 0.5, lora::OutputMode::overwrite);
    EXPECT_EQ(std::memcmp(y_write.data(), y_add.data(), y_add.bytes()), 0) << "inference y";
  }
}

// ---- invariants -----------------------------------------------------------------

// y_base = x W^T + bias, computed by the backend's GEMM directly (the frozen
// layer as a user would run it without an adapter).
template <class T>
Matrix<T> base_output(lora::cpu::Context& ctx, const Matrix<T>& x, const Matrix<T>& W, const Matrix<T>& bias,
                      std::int64_t d_out, bool fan_in_fan_out) {
  Matrix<T> y(x.rows(), d_out);
  Backend::gemm<T, T>(ctx, lora::Op::N, fan_in_fan_out ? lora::Op::N : lora::Op::T, 1.0, x.view(), W.view(), 0.0,
                      y.view());
  if (bias.size() > 0) Backend::add_row_vector<T>(ctx, y.view(), bias.view());
  return y;
}

TEST(Invariants, FreshAdapterGivesExactlyTheBaseOutput) {
  for (const Case& c : {Case{6, 13, 11, 4, 0.3, false, true, false}, Case{6, 13, 11, 4, 0.3, true, true, false},
                        Case{70, 67, 61, 9, 0.2, false, true, false}}) {
    SCOPED_TRACE(case_name(c));
    lora::cpu::Context ctx;
    const Matrix<float> W = random_matrix<float>(c.fan_in_fan_out ? c.d_in : c.d_out,
                                                 c.fan_in_fan_out ? c.d_out : c.d_in, 3);
    const Matrix<float> bias = random_matrix<float>(1, c.d_out, 4), x = random_matrix<float>(c.n, c.d_in, 5);
    Matrix<float> W_layer = W.clone();
    lora::cpu::Linear<float> layer(ctx, W_layer.view(), bias.view(), make_config(c));
    const Matrix<float> base = base_output(ctx, x, W, bias, c.d_out, c.fan_in_fan_out);
    for (Mode mode : {Mode::train, Mode::eval}) {
      Matrix<float> y(c.n, c.d_out);
      layer.forward(x.view(), y.view(), mode);
      EXPECT_EQ(std::memcmp(y.data(), base.data(), y.bytes()), 0) << (mode == Mode::train ? "train" : "eval");
    }
    // A is not zero (so x A^T is not): the equality rests on B = 0 alone.
    double a_norm = Backend::sum_squares<float>(ctx, layer.A());
    EXPECT_GT(a_norm, 0.0);
  }
}

TEST(Invariants, MergedOutputEqualsUnmergedOutput) {
  for (const Case& c : {Case{9, 37, 29, 6, 0.1, false, true, false}, Case{9, 37, 29, 6, 0.1, true, true, false},
                        Case{9, 64, 8, 16, 0.1, false, true, false}, Case{9, 8, 64, 16, 0.1, true, true, false}}) {
    const bool fifo = c.fan_in_fan_out;
    SCOPED_TRACE(case_name(c));
    LayerSetup<float> s(c, 41);
    const Matrix<float> W_before = s.W.clone();
    Matrix<float> unmerged(c.n, c.d_out), merged(c.n, c.d_out);
    s.layer.forward(s.x.view(), unmerged.view(), Mode::eval);
    s.layer.merge();
    s.layer.forward(s.x.view(), merged.view(), Mode::eval);
    EXPECT_LE(scaled_error(to_dense(merged), to_dense(unmerged)), 1e-5);
    // The adapter's contribution is far larger than that tolerance.
    const Matrix<float> base = base_output(s.ctx, s.x, W_before, s.bias, c.d_out, fifo);
    EXPECT_GT(scaled_error(to_dense(base), to_dense(unmerged)), 1e-2);

    // W changed by s B A (its transpose for a base stored d_in x d_out), from naive loops.
    const Reference ref = s.reference();
    Dense want(s.W.rows(), s.W.cols()), got(s.W.rows(), s.W.cols());
    for (std::int64_t o = 0; o < c.d_out; ++o)
      for (std::int64_t i = 0; i < c.d_in; ++i) {
        double delta = 0.0;
        for (int k = 0; k < c.r; ++k) delta += ref.B(o, k) * ref.A(k, i);
        (fifo ? want(i, o) : want(o, i)) = ref.s * delta;
      }
    for (std::size_t i = 0; i < got.v.size(); ++i)
      got.v[i] = static_cast<double>(s.W.data()[i]) - static_cast<double>(W_before.data()[i]);
    EXPECT_LE(scaled_error(got, want), 1e-5);
  }
}

// add_scaled rounds W + d and then (W + d) - d once each to float (the sums
// are exact in double). Each rounding errs by at most 2^-24 of its result, so
//   |W'' - W| <= 2^-24 (|W'| + |W''|),  W' the merged W, W'' the unmerged one.
TEST(Invariants, MergeThenUnmergeRestoresWWithinRounding) {
  for (bool fifo : {false, true}) {
    const Case c{4, 48, 40, 8, 0.0, fifo, false, false};
    SCOPED_TRACE(case_name(c));
    LayerSetup<float> s(c, 51);
    const Matrix<float> original = s.W.clone();
    s.layer.merge();
    const Matrix<float> merged = s.W.clone();
    s.layer.unmerge();
    int changed_by_merge = 0, not_restored_exactly = 0;
    for (std::int64_t i = 0; i < s.W.size(); ++i) {
      const double w = original.data()[i], w1 = merged.data()[i], w2 = s.W.data()[i];
      changed_by_merge += w1 != w;
      not_restored_exactly += w2 != w;
      EXPECT_LE(std::abs(w2 - w), 0x1p-24 * (std::abs(w1) + std::abs(w2))) << "element " << i;
    }
    EXPECT_GT(changed_by_merge, s.W.size() * 9 / 10);
    RecordProperty("elements_not_restored_bit_exactly", not_restored_exactly);
  }
}

TEST(Invariants, WIsBitIdenticalAfterTrainingWithAdam) {
  const Case c{8, 33, 27, 4, 0.1, false, true, false};
  LayerSetup<float> s(c, 61);
  const Matrix<float> W0 = s.W.clone(), bias0 = s.bias.clone();
  const Dense A_start = to_dense<float>(s.layer.A()), B_start = to_dense<float>(s.layer.B());
  lora::cpu::Adam<float> adam(s.ctx, lora::AdamOptions::adamw(1e-2, 0.1));
  adam.add_group(s.layer.parameters());
  Matrix<float> y(c.n, c.d_out), dL_dx(c.n, c.d_in);
  const Matrix<float> target = random_matrix<float>(c.n, c.d_out, 62);
  for (int step = 0; step < 5; ++step) {
    s.layer.forward(s.x.view(), y.view(), Mode::train);
    Matrix<float> dL_dy(c.n, c.d_out);
    for (std::int64_t i = 0; i < y.size(); ++i) dL_dy.data()[i] = y.data()[i] - target.data()[i];
    s.layer.backward(s.x.view(), dL_dy.view(), dL_dx.view());
    adam.clip_grad_norm(1.0);
    adam.step();
    adam.zero_grad();
  }
  EXPECT_EQ(std::memcmp(s.W.data(), W0.data(), W0.bytes()), 0);
  EXPECT_EQ(std::memcmp(s.bias.data(), bias0.data(), bias0.bytes()), 0);
  // Training did move A and B.
  EXPECT_GT(scaled_error(to_dense<float>(s.layer.A()), A_start), 1e-3);
  EXPECT_GT(scaled_error(to_dense<float>(s.layer.B()), B_start), 1e-3);
}

TEST(Invariants, GradModeAccumulateSumsAndIgnoreLeavesGradientsAlone) {
  const Case c{5, 11, 9, 3, 0.25, false, true, false};
  LayerSetup<double> s(c, 71);
  const Matrix<double> x2 = random_matrix<double>(c.n, c.d_in, 72);
  const Matrix<double> g1 = random_matrix<double>(c.n, c.d_out, 73), g2 = random_matrix<double>(c.n, c.d_out, 74);
  Matrix<double> y(c.n, c.d_out), dx(c.n, c.d_in);

  // Two overwrites, each with its own forward (different inputs, different masks).
  s.layer.set_dropout_calls(0);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  s.layer.backward(s.x.view(), g1.view(), dx.view(), GradMode::overwrite);
  const Dense dA1 = to_dense<double>(s.layer.dL_dA()), dB1 = to_dense<double>(s.layer.dL_dB());
  const Dense dx1 = to_dense(dx);
  s.layer.forward(x2.view(), y.view(), Mode::train);
  s.layer.backward(x2.view(), g2.view(), dx.view(), GradMode::overwrite);
  const Dense dA2 = to_dense<double>(s.layer.dL_dA()), dB2 = to_dense<double>(s.layer.dL_dB());
  const Dense dx2 = to_dense(dx);

  // The same two, the second accumulating.
  s.layer.set_dropout_calls(0);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  s.layer.backward(s.x.view(), g1.view(), dx.view(), GradMode::overwrite);
  s.layer.forward(x2.view(), y.view(), Mode::train);
  s.layer.backward(x2.view(), g2.view(), dx.view(), GradMode::accumulate);
  Dense sum_A = dA1, sum_B = dB1;
  for (std::size_t i = 0; i < sum_A.v.size(); ++i) sum_A.v[i] += dA2.v[i];
  for (std::size_t i = 0; i < sum_B.v.size(); ++i) sum_B.v[i] += dB2.v[i];
  EXPECT_LE(scaled_error(to_dense<double>(s.layer.dL_dA()), sum_A), 1e-14);
  EXPECT_LE(scaled_error(to_dense<double>(s.layer.dL_dB()), sum_B), 1e-14);
  // Neither the sum nor either term alone: the two terms differ.
  EXPECT_GT(scaled_error(dA1, dA2), 1e-2);
  // dL_dx is always overwritten (it is the caller's buffer, one per input).
  EXPECT_LE(scaled_error(to_dense(dx), dx2), 1e-14);

  // ignore: dL_dA and dL_dB keep their (sentinel) contents; dL_dx is still computed.
  auto gA = s.layer.lora_A().grad, gB = s.layer.lora_B().grad;
  Backend::fill(s.ctx, gA, 123.0);
  Backend::fill(s.ctx, gB, -45.0);
  s.layer.set_dropout_calls(0);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  s.layer.backward(s.x.view(), g1.view(), dx.view(), GradMode::ignore);
  for (std::int64_t i = 0; i < gA.size(); ++i) EXPECT_EQ(gA.data[i], 123.0);
  for (std::int64_t i = 0; i < gB.size(); ++i) EXPECT_EQ(gB.data[i], -45.0);
  EXPECT_LE(scaled_error(to_dense(dx), dx1), 1e-14);
}

TEST(Invariants, EvalModeHasNoDropoutAndCachesNothing) {
  const Case c{6, 21, 17, 5, 0.5, false, true, false};
  LayerSetup<float> s(c, 81);
  Matrix<float> y1(c.n, c.d_out), y2(c.n, c.d_out), y_train(c.n, c.d_out);
  const std::uint32_t calls_before = s.layer.dropout_calls();
  s.layer.forward(s.x.view(), y1.view(), Mode::eval);
  EXPECT_EQ(s.layer.memory().activation_bytes, 0u);
  s.layer.forward(s.x.view(), y2.view(), Mode::eval);
  EXPECT_EQ(s.layer.dropout_calls(), calls_before);  // eval draws no masks
  EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.bytes()), 0);

  // The eval output is the no-dropout reference; a train output (p = 0.5) is not.
  Reference ref = s.reference();
  const Dense no_dropout = ref.forward(to_dense(s.x), 0.0, s.cfg, s.stream, 0);
  EXPECT_LE(scaled_error(to_dense(y1), no_dropout), 2e-6);
  s.layer.forward(s.x.view(), y_train.view(), Mode::train);
  EXPECT_GT(scaled_error(to_dense(y_train), no_dropout), 1e-3);
  // x A^T (N x r) and the dropout mask, one bit per element in 32-bit words per row.
  EXPECT_EQ(s.layer.memory().activation_bytes, static_cast<std::size_t>(c.n * c.r) * sizeof(float) +
                                                   static_cast<std::size_t>(c.n * ((c.d_in + 31) / 32)) * 4);
  s.layer.forward(s.x.view(), y1.view(), Mode::eval);
  EXPECT_EQ(s.layer.memory().activation_bytes, 0u);
}

// ---- init -----------------------------------------------------------------------

Dense init_A(int r, std::int64_t d_in, lora::Init init, std::uint64_t seed, std::uint32_t stream) {
  lora::cpu::Context ctx;
  Matrix<float> W(r, d_in);  // d_out = r
  Config c;
  c.r = r;
  c.init = init;
  c.seed = seed;
  lora::cpu::Linear<float> layer(ctx, W.view(), {}, c, stream);
  return to_dense<float>(layer.A());
}

TEST(Init, KaimingUniformHasPeftsBoundAndUniformMoments) {
  const int r = 64;
  const std::int64_t d_in = 1024;  // 65,536 samples
  const Dense A = init_A(r, d_in, lora::Init::kaiming_uniform, 7, 0);
  // PEFT: kaiming_uniform_(A, a = sqrt(5)): gain = sqrt(2 / (1 + a^2)), bound = gain sqrt(3 / fan_in).
  const double a = std::sqrt(5.0);
  const double bound = std::sqrt(2.0 / (1.0 + a * a)) * std::sqrt(3.0 / static_cast<double>(d_in));
  EXPECT_DOUBLE_EQ(bound, 1.0 / 32.0);
  const double n = static_cast<double>(A.v.size());
  double sum = 0, sum2 = 0, sum4 = 0, max_abs = 0;
  int bins[4] = {0, 0, 0, 0};
  for (double v : A.v) {
    EXPECT_LE(std::abs(v), bound);
    max_abs = std::max(max_abs, std::abs(v));
    sum += v;
    sum2 += v * v;
    sum4 += v * v * v * v;
    bins[std::min(3, static_cast<int>((v + bound) / (2 * bound) * 4))]++;
  }
  // U(-b, b): mean 0 (sd b / sqrt(3 n)), E v^2 = b^2 / 3 (sd b^2 sqrt(4 / 45 / n)),
  // E v^4 = b^4 / 5; each checked to 6 standard deviations or better.
  const double b2 = bound * bound;
  EXPECT_NEAR(sum / n, 0.0, 6 * bound / std::sqrt(3 * n));
  EXPECT_NEAR(sum2 / n, b2 / 3, 6 * b2 * std::sqrt(4.0 / 45.0 / n));
  EXPECT_NEAR(sum4 / n / (b2 * b2), 1.0 / 5.0, 0.01);
  EXPECT_GT(max_abs, 0.999 * bound);
  // Each quarter of the interval holds n / 4 (sd sqrt(n 3/16) ~ 111) samples.
  for (int b : bins) EXPECT_NEAR(b, n / 4, 6 * std::sqrt(n * 3.0 / 16.0));
}

TEST(Init, GaussianHasStdOneOverR) {
  const int r = 8;
  const std::int64_t d_in = 8192;  // 65,536 samples
  const Dense A = init_A(r, d_in, lora::Init::gaussian, 9, 0);
  const double n = static_cast<double>(A.v.size());
  double sum = 0, sum2 = 0;
  for (double v : A.v) {
    sum += v;
    sum2 += v * v;
  }
  const double sd = 1.0 / r;
  EXPECT_NEAR(sum / n, 0.0, 6 * sd / std::sqrt(n));
  // Sample variance of N(0, sd^2): sd of the estimate sd^2 sqrt(2 / n).
  EXPECT_NEAR(sum2 / n, sd * sd, 6 * sd * sd * std::sqrt(2.0 / n));
}

TEST(Init, SameSeedAndStreamGiveTheSameA) {
  for (lora::Init init : {lora::Init::kaiming_uniform, lora::Init::gaussian}) {
    const Dense a1 = init_A(4, 50, init, 123, 2), a2 = init_A(4, 50, init, 123, 2);
    const Dense other_stream = init_A(4, 50, init, 123, 3), other_seed = init_A(4, 50, init, 124, 2);
    EXPECT_EQ(a1.v, a2.v);
    int same_stream = 0, same_seed = 0;
    for (std::size_t i = 0; i < a1.v.size(); ++i) {
      same_stream += a1.v[i] == other_stream.v[i];
      same_seed += a1.v[i] == other_seed.v[i];
    }
    EXPECT_EQ(same_stream, 0);
    EXPECT_EQ(same_seed, 0);
  }
}

// Layer streams are 32-bit ids (a hash of the layer's name, say). Streams s
// and s + 2^31 used to draw the same A and the same dropout masks (the RNG
// stream 2 s wrapped in 32 bits); 2^31 - 1 and 2^32 - 1 likewise.
TEST(Init, StreamsThatDifferInTheTopBitDrawDifferentAAndMasks) {
  lora::cpu::Context ctx;
  Matrix<float> ones(16, 64), mask_s(16, 64), mask_t(16, 64);
  for (std::int64_t i = 0; i < ones.size(); ++i) ones.data()[i] = 1.0f;
  for (const auto& [s, t] : {std::pair<std::uint32_t, std::uint32_t>{0u, 0x8000'0000u}, {5u, 0x8000'0005u},
                             {0x7fff'ffffu, 0xffff'ffffu}}) {
    SCOPED_TRACE("streams " + std::to_string(s) + " and " + std::to_string(t));
    for (lora::Init init : {lora::Init::kaiming_uniform, lora::Init::gaussian}) {
      const Dense a_s = init_A(4, 50, init, 123, s), a_t = init_A(4, 50, init, 123, t);
      int same = 0;
      for (std::size_t i = 0; i < a_s.v.size(); ++i) same += a_s.v[i] == a_t.v[i];
      EXPECT_EQ(same, 0) << lora::to_string(init);
    }
    // The masks of forward call 0 at p = 0.5, as the layer draws them.
    Backend::dropout<float>(ctx, ones.view(), mask_s.view(), 0.5f, 123, s, 0);
    Backend::dropout<float>(ctx, ones.view(), mask_t.view(), 0.5f, 123, t, 0);
    int same = 0;
    for (std::int64_t i = 0; i < ones.size(); ++i) same += mask_s.data()[i] == mask_t.data()[i];
    EXPECT_LT(same, ones.size() * 3 / 4) << "independent masks agree on about half of 1024 elements";
  }
}

TEST(Init, BAndGradientsStartAtZeroAndResetRestoresInit) {
  const Case c{3, 10, 8, 2, 0.0, false, false, false};
  LayerSetup<float> s(c, 91);  // B made non-zero by LayerSetup
  const Dense A0 = to_dense<float>(s.layer.A());
  Backend::fill(s.ctx, s.layer.lora_A().value, 5.0f);
  Backend::fill(s.ctx, s.layer.lora_A().grad, 5.0f);
  s.layer.reset_parameters();
  EXPECT_EQ(to_dense<float>(s.layer.A()).v, A0.v);
  for (double v : to_dense<float>(s.layer.B()).v) EXPECT_EQ(v, 0.0);
  for (double v : to_dense<float>(s.layer.dL_dA()).v) EXPECT_EQ(v, 0.0);
  for (double v : to_dense<float>(s.layer.dL_dB()).v) EXPECT_EQ(v, 0.0);
}

// ---- counts and memory ------------------------------------------------------------

TEST(Counts, SeedExample4096Rank8Trains65536Parameters) {
  lora::cpu::Context ctx;
  Matrix<float> W(4096, 4096);
  Config c;
  c.r = 8;
  lora::cpu::Linear<float> layer(ctx, W.view(), {}, c);
  // A is r x d_in, B is d_out x r.
  const std::int64_t expected = layer.A().rows * layer.A().cols + layer.B().rows * layer.B().cols;
  EXPECT_EQ(expected, 8 * 4096 + 4096 * 8);
  EXPECT_EQ(layer.trainable_parameters(), 65536);
  EXPECT_EQ(layer.frozen_parameters(), std::int64_t{4096} * 4096);
  const double share = 100.0 * 65536.0 / 16777216.0;  // 0.390625 %
  EXPECT_DOUBLE_EQ(100.0 * static_cast<double>(layer.trainable_parameters()) / layer.frozen_parameters(), share);
  EXPECT_EQ(std::round(share * 100.0) / 100.0, 0.39);

  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  adam.add_group(layer.parameters());
  EXPECT_EQ(adam.trainable_parameters(), 65536);
  EXPECT_EQ(adam.state_bytes(), 8u * 65536u);  // full fine-tuning: 8 x 16,777,216
}

TEST(Counts, MemoryReportEqualsHandComputedBytes) {
  // d_out = 12, d_in = 10, r = 3, N = 7, float, with bias and dropout.
  const Case c{7, 10, 12, 3, 0.2, false, true, false};
  LayerSetup<float> s(c, 101);
  const std::size_t f = sizeof(float);
  const std::size_t frozen = (12 * 10 + 12) * f;    // W + bias = 528
  const std::size_t params = (3 * 10 + 12 * 3) * f;  // A + B = 264
  auto expect_report = [&](std::size_t activation, std::size_t workspace, const char* when) {
    SCOPED_TRACE(when);
    const lora::MemoryReport m = s.layer.memory();
    EXPECT_EQ(m.frozen_bytes, frozen);
    EXPECT_EQ(m.parameter_bytes, params);
    EXPECT_EQ(m.gradient_bytes, params);
    EXPECT_EQ(m.optimizer_bytes, 0u);
    EXPECT_EQ(m.activation_bytes, activation);
    EXPECT_EQ(m.workspace_bytes, workspace);
    EXPECT_EQ(m.total(), frozen + 2 * params + activation + workspace);
  };
  expect_report(0, 0, "fresh");
  Matrix<float> y(7, 12), dL_dy(7, 12), dL_dx(7, 10);
  s.layer.forward(s.x.view(), y.view(), Mode::train);
  // cached x A^T: N x r, and the dropout mask: one 32-bit word per row (d_in = 10 bits);
  // workspace: a row block of drop(x), here all N x d_in (the CPU's blocks are 2^18 elements).
  const std::size_t mask = 7 * 4;
  expect_report(7 * 3 * f + mask, 7 * 10 * f, "after a train forward");
  s.layer.backward(s.x.view(), dL_dy.view(), dL_dx.view());
  // + dL_dy B: N x r.
  expect_report(7 * 3 * f + mask, 7 * 10 * f + 7 * 3 * f, "after backward");
  s.layer.forward(s.x.view(), y.view(), Mode::eval);
  // The x A^T buffer and the mask stay allocated but are scratch now.
  expect_report(0, 7 * 10 * f + 7 * 3 * f + 7 * 3 * f + mask, "after an eval forward");

  // Without a bias, the frozen bytes are W's alone; double doubles everything.
  lora::cpu::Context ctx;
  Matrix<double> W(12, 10);
  Config cfg;
  cfg.r = 3;
  lora::Linear<double, Backend> plain(ctx, W.view(), {}, cfg);
  EXPECT_EQ(plain.memory().frozen_bytes, 12 * 10 * sizeof(double));
  EXPECT_EQ(plain.memory().parameter_bytes, (3 * 10 + 12 * 3) * sizeof(double));
}

}  // namespace

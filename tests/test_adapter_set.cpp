// lora::AdapterSet: several adapters over one frozen W. Every output is
// compared with a naive loop in double over host copies of W, bias, A_k and
// B_k; W (and every adapter not being trained) is compared bit for bit after
// everything that must not write it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "lora/lora.hpp"

namespace {

using lora::Mode;
using lora::WeightedAdapter;
using Backend = lora::cpu::Backend;
template <class T>
using Set = lora::AdapterSet<T, Backend>;
template <class T>
using Matrix = lora::cpu::Matrix<T>;
template <class T>
using ConstView = lora::MatrixView<const T>;

constexpr std::int64_t kDin = 7;
constexpr std::int64_t kDout = 5;

template <class T>
void fill_random(lora::MatrixView<T> v, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  for (std::int64_t i = 0; i < v.rows; ++i)
    for (std::int64_t j = 0; j < v.cols; ++j) v(i, j) = static_cast<T>(dist(gen));
}

// The elements of a view, row by row.
template <class V>
std::vector<std::remove_const_t<typename V::value_type>> snapshot(const V& v) {
  std::vector<std::remove_const_t<typename V::value_type>> out;
  for (std::int64_t i = 0; i < v.rows; ++i)
    for (std::int64_t j = 0; j < v.cols; ++j) out.push_back(v(i, j));
  return out;
}

template <class T, class V>
bool bit_identical(const std::vector<T>& before, const V& now) {
  const std::vector<T> after = snapshot(now);
  return before.size() == after.size() && std::memcmp(before.data(), after.data(), before.size() * sizeof(T)) == 0;
}

lora::Config make_config(int r, double alpha, std::uint64_t seed, bool fan_in_fan_out) {
  lora::Config c;
  c.r = r;
  c.alpha = alpha;
  c.seed = seed;
  c.fan_in_fan_out = fan_in_fan_out;
  return c;
}

// A frozen 5 x 7 layer with a bias (W stored transposed with fan_in_fan_out)
// and a set over it holding four adapters of different ranks and scales, each
// with a random non-zero B so that every adapter changes the output:
//   a: r 1, alpha 2 (s 2); b: r 3, alpha 5, rsLoRA (s 5/sqrt 3); c: r 2, alpha 4, gaussian A (s 2); d: r 2, alpha 1 (s 0.5)
template <class T>
struct Fixture {
  explicit Fixture(bool fan_in_fan_out)
      : transposed(fan_in_fan_out),
        W(fan_in_fan_out ? kDin : kDout, fan_in_fan_out ? kDout : kDin),
        bias(1, kDout),
        set(ctx, W.view(), bias.view(), fan_in_fan_out) {
    fill_random(W.view(), 101);  // the set borrows W and bias; their values are read at forward
    fill_random(bias.view(), 102);
    lora::Config b = make_config(3, 5.0, 2, transposed);
    b.use_rslora = true;
    lora::Config c = make_config(2, 4.0, 3, transposed);
    c.init = lora::Init::gaussian;
    add("a", make_config(1, 2.0, 1, transposed), 201);
    add("b", b, 202);
    add("c", c, 203);
    add("d", make_config(2, 1.0, 4, transposed), 204);
  }

  void add(const std::string& name, const lora::Config& config, std::uint64_t b_seed) {
    auto& layer = set.add(name, config);
    fill_random(layer.lora_B().value, b_seed);
  }

  // W as d_out x d_in, whatever its storage.
  double w(std::int64_t o, std::int64_t j) const { return transposed ? W(j, o) : W(o, j); }

  // y[i, :] = x[i, :] W^T + bias + sum_k w_k s_k (x[i, :] A_k^T) B_k^T, a naive loop in double.
  std::vector<double> reference_row(ConstView<T> x, std::int64_t i, const std::vector<WeightedAdapter>& terms) const {
    std::vector<double> y(kDout);
    for (std::int64_t o = 0; o < kDout; ++o) {
      double acc = bias(0, o);
      for (std::int64_t j = 0; j < kDin; ++j) acc += w(o, j) * static_cast<double>(x(i, j));
      y[static_cast<std::size_t>(o)] = acc;
    }
    for (const WeightedAdapter& term : terms) {
      const auto& layer = set.get(term.name);
      const auto A = layer.A();
      const auto B = layer.B();
      for (std::int64_t q = 0; q < layer.rank(); ++q) {
        double xa = 0;  // (x A^T)[i, q]
        for (std::int64_t j = 0; j < kDin; ++j) xa += static_cast<double>(x(i, j)) * static_cast<double>(A(q, j));
        for (std::int64_t o = 0; o < kDout; ++o)
          y[static_cast<std::size_t>(o)] += term.weight * layer.scale() * xa * static_cast<double>(B(o, q));
      }
    }
    return y;
  }

  lora::cpu::Context ctx;
  bool transposed;
  Matrix<T> W, bias;
  Set<T> set;
};

// |got - expected| <= tol (1 + |expected|) for every element of row i.
template <class T>
void expect_row_near(ConstView<T> y, std::int64_t i, const std::vector<double>& expected, double tol,
                     const std::string& what) {
  for (std::int64_t o = 0; o < y.cols; ++o) {
    const double e = expected[static_cast<std::size_t>(o)];
    EXPECT_NEAR(static_cast<double>(y(i, o)), e, tol * (1.0 + std::fabs(e))) << what << ", row " << i << ", col " << o;
  }
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected a lora::Error containing \"" << needle << "\"";
  } catch (const lora::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

template <class T>
constexpr double kTol = std::is_same_v<T, float> ? 2e-5 : 1e-12;

template <class T>
class AdapterSetTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
struct ScalarName {
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(AdapterSetTyped, Scalars, ScalarName);

// Rows 4-6 ("c") form one contiguous run (computed in place); "a" and "b" are
// scattered (gathered, computed, scatter-added); "d" is active but named by no
// row; rows 2, 7, 10 are base only.
TYPED_TEST(AdapterSetTyped, MixedBatchEqualsEachRowAloneWithItsOwnAdapter) {
  using T = TypeParam;
  const std::vector<std::string> row_adapters = {"b", "a", "", "b", "c", "c", "c", "__base__", "a", "b", ""};
  const auto n = static_cast<std::int64_t>(row_adapters.size());
  for (bool fan_in_fan_out : {false, true}) {
    SCOPED_TRACE(fan_in_fan_out ? "fan_in_fan_out" : "W stored d_out x d_in");
    Fixture<T> f(fan_in_fan_out);
    // x is a window of a wider buffer (stride d_in + 3): the gather must honour strides.
    Matrix<T> x_buffer(n, kDin + 3);
    fill_random(x_buffer.view(), 7);
    const ConstView<T> x = x_buffer.view().col_block(1, kDin);
    Matrix<T> y(n, kDout);
    Backend::fill(f.ctx, y.view(), std::numeric_limits<T>::quiet_NaN());  // y is written, never read
    f.set.set_active("d");                                                 // forward_mixed ignores the active set

    f.set.forward_mixed(x, row_adapters, y.view());

    for (std::int64_t i = 0; i < n; ++i) {
      const std::string& name = row_adapters[static_cast<std::size_t>(i)];
      const bool base = name.empty() || name == "__base__";
      const std::vector<WeightedAdapter> terms = base ? std::vector<WeightedAdapter>{} : std::vector<WeightedAdapter>{{name, 1.0}};
      const std::vector<double> expected = f.reference_row(x, i, terms);
      expect_row_near<T>(y.view(), i, expected, kTol<T>, "mixed batch vs naive loop");
      if (!base) {  // the adapter must matter, or this test proves nothing
        const std::vector<double> base_only = f.reference_row(x, i, {});
        double change = 0;
        for (std::size_t o = 0; o < expected.size(); ++o) change = std::max(change, std::fabs(expected[o] - base_only[o]));
        EXPECT_GT(change, 1e-2) << "row " << i << ": adapter " << name << " barely changes the output";
      }
      // The same row alone, through forward() with its adapter active.
      if (base) {
        f.set.clear_active();
      } else {
        f.set.set_active(name);
      }
      Matrix<T> y_row(1, kDout);
      f.set.forward(x.row_block(i, 1), y_row.view(), Mode::eval);
      expect_row_near<T>(y_row.view(), 0, expected, kTol<T>, "row alone vs naive loop");
    }
  }
}

TYPED_TEST(AdapterSetTyped, WeightedActivationEqualsNaiveWeightedSum) {
  using T = TypeParam;
  for (bool fan_in_fan_out : {false, true}) {
    Fixture<T> f(fan_in_fan_out);
    const std::int64_t n = 6;
    Matrix<T> x(n, kDin), y(n, kDout);
    fill_random(x.view(), 8);
    const std::vector<WeightedAdapter> terms = {{"a", 0.7}, {"b", -1.3}, {"d", 0.0}};
    f.set.set_active(terms);
    ASSERT_EQ(f.set.active().size(), 3u);
    EXPECT_EQ(f.set.active()[1].name, "b");
    EXPECT_EQ(f.set.active()[1].weight, -1.3);
    f.set.forward(x.view(), y.view(), Mode::eval);
    for (std::int64_t i = 0; i < n; ++i)
      expect_row_near<T>(y.view(), i, f.reference_row(x.view(), i, terms), kTol<T>, "weighted activation");
  }
}

// combine = PEFT's "cat": A = [w_a s_a A_a; w_b s_b A_b], B = [B_a, B_b], s = 1.
TYPED_TEST(AdapterSetTyped, CombinedAdapterReproducesTheWeightedSum) {
  using T = TypeParam;
  for (bool fan_in_fan_out : {false, true}) {
    Fixture<T> f(fan_in_fan_out);
    const std::vector<WeightedAdapter> terms = {{"a", 0.7}, {"b", -1.3}};
    const auto& ab = f.set.combine("ab", terms);
    EXPECT_EQ(ab.rank(), 1 + 3);
    EXPECT_EQ(ab.scale(), 1.0);
    EXPECT_FALSE(ab.config().use_rslora);

    const auto& a = f.set.get("a");
    const auto& b = f.set.get("b");
    for (std::int64_t j = 0; j < kDin; ++j) {
      EXPECT_NEAR(ab.A()(0, j), 0.7 * a.scale() * a.A()(0, j), kTol<T>) << "A row 0";
      for (std::int64_t q = 0; q < 3; ++q)
        EXPECT_NEAR(ab.A()(1 + q, j), -1.3 * b.scale() * b.A()(q, j), kTol<T>) << "A row " << 1 + q;
    }
    for (std::int64_t o = 0; o < kDout; ++o) {
      EXPECT_EQ(ab.B()(o, 0), a.B()(o, 0));
      for (std::int64_t q = 0; q < 3; ++q) EXPECT_EQ(ab.B()(o, 1 + q), b.B()(o, q));
    }

    const std::int64_t n = 5;
    Matrix<T> x(n, kDin), y_combined(n, kDout), y_weighted(n, kDout);
    fill_random(x.view(), 9);
    f.set.set_active("ab");
    f.set.forward(x.view(), y_combined.view(), Mode::eval);
    f.set.set_active(terms);
    f.set.forward(x.view(), y_weighted.view(), Mode::eval);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::vector<double> expected = f.reference_row(x.view(), i, terms);
      expect_row_near<T>(y_combined.view(), i, expected, kTol<T>, "combined adapter vs naive weighted sum");
      std::vector<double> weighted(kDout);
      for (std::int64_t o = 0; o < kDout; ++o) weighted[static_cast<std::size_t>(o)] = y_weighted(i, o);
      expect_row_near<T>(y_combined.view(), i, weighted, kTol<T>, "combined adapter vs weighted activation");
    }
  }
}

// 1 + 3 + 2 = 6 > min(d_in, d_out) = 5: used to be refused ("merge into W
// instead"); any r >= 1 is a valid adapter (PEFT allows it), so the exact
// concatenation is kept, and reproduces the weighted sum.
TEST(AdapterSet, CombineAcceptsARankLargerThanTheLayer) {
  for (bool fan_in_fan_out : {false, true}) {
    Fixture<double> f(fan_in_fan_out);
    const std::vector<WeightedAdapter> terms = {{"a", 1.0}, {"b", -0.5}, {"c", 2.0}};
    EXPECT_EQ(f.set.combine("abc", terms).rank(), 6);
    const std::int64_t n = 4;
    Matrix<double> x(n, kDin), y(n, kDout);
    fill_random(x.view(), 12);
    f.set.set_active("abc");
    f.set.forward(x.view(), y.view(), Mode::eval);
    for (std::int64_t i = 0; i < n; ++i)
      expect_row_near<double>(y.view(), i, f.reference_row(x.view(), i, terms), kTol<double>, "rank-6 combination");
  }
}

// Outputs never share memory with inputs: y with x, W or bias; dL_dx with x,
// dL_dy or W. Each used to compute wrong numbers silently; each throws now,
// before anything is written.
TEST(AdapterSet, RefusesOutputsThatOverlapInputs) {
  Fixture<double> f(false);  // d_in = 7, d_out = 5
  f.set.set_active({{"a", 1.0}, {"b", 0.5}});
  Matrix<double> buf(3, kDin), x(3, kDin), y(3, kDout), dL_dy(3, kDout), dL_dx(3, kDin);
  fill_random(buf.view(), 13);
  fill_random(x.view(), 14);
  fill_random(dL_dy.view(), 15);
  const auto buf_before = snapshot(buf.view());
  const auto W_before = snapshot(f.W.view());
  const auto x_before = snapshot(x.view());
  const auto dL_dy_before = snapshot(dL_dy.view());
  // y = the first five columns of x's own buffer.
  const auto x_in_buf = buf.view(), y_in_buf = buf.view().col_block(0, kDout);
  expect_error([&] { f.set.forward(x_in_buf, y_in_buf, Mode::eval); }, "AdapterSet::inference: y overlaps x");
  expect_error([&] { f.set.forward(x_in_buf, y_in_buf, Mode::train); }, "AdapterSet::forward: y overlaps x");
  expect_error([&] { f.set.base_forward(x_in_buf, y_in_buf); }, "AdapterSet::base_forward: y overlaps x");
  expect_error([&] { f.set.forward_mixed(x_in_buf, {"a", "", "b"}, y_in_buf); },
               "AdapterSet::forward_mixed: y overlaps x");
  expect_error([&] { f.set.forward(x.view(), f.W.view().row_block(1, 3).col_block(0, kDout)); },
               "AdapterSet::forward: y overlaps W");
  Matrix<double> y_and_bias(4, kDout);  // a set whose bias is row 3 of a buffer, and a y that covers it
  Set<double> set_b(f.ctx, f.W.view(), y_and_bias.view().row_block(3, 1));
  expect_error([&] { set_b.forward(x.view(), y_and_bias.view().row_block(1, 3)); },
               "AdapterSet::forward: y overlaps bias");
  EXPECT_TRUE(bit_identical(buf_before, buf.view()));
  EXPECT_TRUE(bit_identical(W_before, f.W.view()));

  f.set.forward(x.view(), y.view(), Mode::train);
  expect_error([&] { f.set.backward(x.view(), dL_dy.view(), x.view()); }, "AdapterSet::backward: dL_dx overlaps x");
  Matrix<double> g_buf(3, kDin);  // dL_dx = g_buf, dL_dy = its columns 2..6
  fill_random(g_buf.view(), 16);
  const auto g_before = snapshot(g_buf.view());
  expect_error([&] { f.set.backward(x.view(), g_buf.view().col_block(2, kDout), g_buf.view()); },
               "AdapterSet::backward: dL_dx overlaps dL_dy");
  expect_error([&] { f.set.backward(x.view(), dL_dy.view(), f.W.view().row_block(0, 3)); },
               "AdapterSet::backward: dL_dx overlaps W");
  EXPECT_TRUE(bit_identical(x_before, x.view()));
  EXPECT_TRUE(bit_identical(dL_dy_before, dL_dy.view()));
  EXPECT_TRUE(bit_identical(g_before, g_buf.view()));
  EXPECT_TRUE(bit_identical(W_before, f.W.view()));
  EXPECT_NO_THROW(f.set.backward(x.view(), dL_dy.view(), dL_dx.view()));  // the cache survived
}

TEST(AdapterSet, BadNamesShapesAndCallOrdersThrowAndChangeNothing) {
  Fixture<double> f(false);
  const lora::Config ok = make_config(2, 2.0, 9, false);
  expect_error([&] { f.set.add("a", ok); }, "an adapter named \"a\" already exists");
  expect_error([&] { f.set.add("", ok); }, "is not a valid adapter name");
  expect_error([&] { f.set.add("__base__", ok); }, "is not a valid adapter name");
  expect_error([&] { f.set.add("e", make_config(2, 2.0, 9, true)); }, "Config.fan_in_fan_out = 1, expected 0");
  expect_error([&] { f.set.add("e", make_config(0, 2.0, 9, false)); }, "Config.r = 0");
  EXPECT_EQ(f.set.names(), (std::vector<std::string>{"a", "b", "c", "d"}));

  expect_error([&] { f.set.remove("zz"); }, "remove: unknown adapter \"zz\" (the set holds \"a\", \"b\", \"c\", \"d\")");
  expect_error([&] { f.set.get("zz"); }, "get: unknown adapter \"zz\"");
  expect_error([&] { f.set.merge("zz"); }, "merge: unknown adapter \"zz\"");

  f.set.set_active({{"a", 0.5}});
  expect_error([&] { f.set.set_active("zz"); }, "set_active: unknown adapter \"zz\"");
  expect_error([&] { f.set.set_active({{"b", 1.0}, {"b", 2.0}}); }, "adapter \"b\" is named twice");
  expect_error([&] { f.set.set_active({{"b", std::nan("")}}); }, "expected a finite value");
  ASSERT_EQ(f.set.active().size(), 1u);  // unchanged by the failed calls
  EXPECT_EQ(f.set.active()[0].name, "a");
  EXPECT_EQ(f.set.active()[0].weight, 0.5);

  expect_error([&] { f.set.combine("a", {{"b", 1.0}}); }, "an adapter named \"a\" already exists");
  expect_error([&] { f.set.combine("e", {}); }, "expected at least one adapter");
  expect_error([&] { f.set.combine("e", {{"zz", 1.0}}); }, "combine: unknown adapter \"zz\"");
  EXPECT_FALSE(f.set.contains("e"));

  Matrix<double> x(3, kDin), y(3, kDout), bad_x(3, kDin + 1), bad_y(2, kDout);
  fill_random(x.view(), 10);
  expect_error([&] { f.set.forward(bad_x.view(), y.view()); }, "x: expected shape [3, 7], found [3, 8]");
  expect_error([&] { f.set.forward(x.view(), bad_y.view()); }, "y: expected shape [3, 5], found [2, 5]");

  // forward_mixed checks every name before it writes y.
  Backend::fill(f.ctx, y.view(), 42.0);
  expect_error([&] { f.set.forward_mixed(x.view(), {"a", "b"}, y.view()); }, "expected one adapter name per row of x (3), found 2");
  expect_error([&] { f.set.forward_mixed(x.view(), {"a", "zz", ""}, y.view()); }, "row_adapters[1]: unknown adapter \"zz\"");
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t o = 0; o < kDout; ++o) EXPECT_EQ(y(i, o), 42.0);

  // backward needs the cache of a Mode::train forward, and changing the active set drops it.
  Matrix<double> dL_dy(3, kDout), dL_dx(3, kDin);
  fill_random(dL_dy.view(), 11);
  expect_error([&] { f.set.backward(x.view(), dL_dy.view(), dL_dx.view()); }, "backward: no cache");
  f.set.forward(x.view(), y.view(), Mode::train);
  f.set.set_active("b");
  expect_error([&] { f.set.backward(x.view(), dL_dy.view(), dL_dx.view()); }, "backward: no cache");
  f.set.forward(x.view(), y.view(), Mode::train);
  expect_error([&] { f.set.backward(x.view().row_block(0, 2), dL_dy.view(), dL_dx.view()); }, "x: expected 3 rows");

  Matrix<double> W(kDout, kDin), bad_bias(1, kDout + 1);
  expect_error([&] { Set<double>(f.ctx, W.view(), bad_bias.view()); },
               "AdapterSet: bias is [1, 6] but W is [5, 7], stored d_out x d_in, so bias must be [1, 5]");
  expect_error([&] { Set<double>(f.ctx, lora::MatrixView<double>(), ConstView<double>()); }, "W: expected a non-empty matrix");
}

// Central differences in double of L = sum(G o y) for the active set {a: 0.7, b: -1.3};
// L is linear in each tensor, so the differences are exact up to rounding.
TEST(AdapterSet, BackwardMatchesCentralDifferencesForWeightedAdapters) {
  for (bool fan_in_fan_out : {false, true}) {
    SCOPED_TRACE(fan_in_fan_out ? "fan_in_fan_out" : "W stored d_out x d_in");
    Fixture<double> f(fan_in_fan_out);
    const std::int64_t n = 4;
    Matrix<double> x(n, kDin), y(n, kDout), G(n, kDout), dL_dx(n, kDin);
    fill_random(x.view(), 12);
    fill_random(G.view(), 13);
    f.set.set_active({{"a", 0.7}, {"b", -1.3}});
    f.set.forward(x.view(), y.view(), Mode::train);
    f.set.backward(x.view(), G.view(), dL_dx.view());

    const auto loss = [&] {
      Matrix<double> out(n, kDout);
      f.set.forward(x.view(), out.view(), Mode::eval);
      double l = 0;
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t o = 0; o < kDout; ++o) l += G(i, o) * out(i, o);
      return l;
    };
    // max |numeric - analytic| / max |numeric| over one tensor.
    const auto check = [&](lora::MatrixView<double> value, ConstView<double> analytic, const char* name) {
      const double h = 1e-3;
      double worst = 0, largest = 0;
      for (std::int64_t i = 0; i < value.rows; ++i)
        for (std::int64_t j = 0; j < value.cols; ++j) {
          const double keep = value(i, j);
          value(i, j) = keep + h;
          const double up = loss();
          value(i, j) = keep - h;
          const double down = loss();
          value(i, j) = keep;
          const double numeric = (up - down) / (2 * h);
          worst = std::max(worst, std::fabs(numeric - analytic(i, j)));
          largest = std::max(largest, std::fabs(numeric));
        }
      EXPECT_GT(largest, 1e-3) << name << ": the gradient is ~0, the check proves nothing";
      EXPECT_LE(worst / largest, 1e-6) << name;
    };
    check(x.view(), dL_dx.view(), "dL_dx");
    for (const char* name : {"a", "b"}) {
      auto& layer = f.set.get(name);
      check(layer.lora_A().value, layer.dL_dA(), name);
      check(layer.lora_B().value, layer.dL_dB(), name);
    }
    // The inactive adapters got no gradient.
    for (const char* name : {"c", "d"}) EXPECT_EQ(Backend::sum_squares(f.ctx, f.set.get(name).dL_dB()), 0.0) << name;
  }
}

struct Snapshot {
  std::vector<double> W, bias;
  std::vector<std::vector<double>> A, B;
};
Snapshot take(const Fixture<double>& f) {
  Snapshot s{snapshot(f.W.view()), snapshot(f.bias.view()), {}, {}};
  for (const std::string& name : f.set.names()) {
    s.A.push_back(snapshot(f.set.get(name).A()));
    s.B.push_back(snapshot(f.set.get(name).B()));
  }
  return s;
}

// Adapter "b" learns a rank-1 target through the set (forward(Mode::train) +
// backward + Adam on b's parameters only) while "c" is trained on its own via
// get(). W, bias, "a" and "d" stay bit-identical; b and c move.
TEST(AdapterSet, TrainingOneAdapterLeavesWAndTheOthersBitIdentical) {
  Fixture<double> f(false);
  const Snapshot before = take(f);
  const std::int64_t n = 32;
  Matrix<double> x(n, kDin), target(n, kDout), y(n, kDout), dL_dy(n, kDout);
  fill_random(x.view(), 14);
  // target = x W^T + bias + (x u^T) v^T, u: 1 x d_in, v: d_out x 1
  Matrix<double> u(1, kDin), v(kDout, 1);
  fill_random(u.view(), 15);
  fill_random(v.view(), 16);
  f.set.base_forward(x.view(), target.view());
  Matrix<double> xu(n, 1);
  Backend::gemm<double, double>(f.ctx, lora::Op::N, lora::Op::T, 1.0, x.view(), u.view(), 0.0, xu.view());
  Backend::gemm<double, double>(f.ctx, lora::Op::N, lora::Op::T, 1.0, xu.view(), v.view(), 1.0, target.view());

  lora::cpu::Adam<double> adam_b(f.ctx, lora::AdamOptions{});
  adam_b.add_group(f.set.get("b").parameters(), 0.02);
  lora::cpu::Adam<double> adam_c(f.ctx, lora::AdamOptions{});
  adam_c.add_group(f.set.get("c").parameters(), 0.02);

  // L = mean (y - target)^2, dL_dy = 2 (y - target) / (N d_out)
  const auto mse_grad = [&] {
    double l = 0;
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t o = 0; o < kDout; ++o) {
        const double d = y(i, o) - target(i, o);
        l += d * d / (n * kDout);
        dL_dy(i, o) = 2 * d / (n * kDout);
      }
    return l;
  };
  f.set.set_active("b");
  double first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    f.set.forward(x.view(), y.view(), Mode::train);
    last = mse_grad();
    if (step == 0) first = last;
    f.set.backward(x.view(), dL_dy.view(), lora::MatrixView<double>());
    adam_b.step();

    auto& c = f.set.get("c");  // c trains alone: the base's output, c's path on it, c's state held here
    f.set.base_forward(x.view(), y.view());
    const auto state = c.forward(x.view(), y.view());
    mse_grad();
    c.backward(state, x.view(), dL_dy.view(), lora::MatrixView<double>());
    adam_c.step();
  }
  EXPECT_LT(last, first / 100) << "loss " << first << " -> " << last;

  EXPECT_TRUE(bit_identical(before.W, f.W.view())) << "W changed";
  EXPECT_TRUE(bit_identical(before.bias, f.bias.view())) << "bias changed";
  const std::vector<std::string> names = f.set.names();
  for (std::size_t k = 0; k < names.size(); ++k) {
    const bool trained = names[k] == "b" || names[k] == "c";
    EXPECT_EQ(bit_identical(before.A[k], f.set.get(names[k]).A()), !trained) << names[k] << ".A";
    EXPECT_EQ(bit_identical(before.B[k], f.set.get(names[k]).B()), !trained) << names[k] << ".B";
  }
}

// Everything except merge()/unmerge() leaves W bit-identical.
TEST(AdapterSet, SwitchingMixingCombiningAndRemovingNeverWriteW) {
  Fixture<double> f(true);
  const std::vector<double> W0 = snapshot(f.W.view());
  const std::int64_t n = 6;
  Matrix<double> x(n, kDin), y(n, kDout), dL_dx(n, kDin);
  fill_random(x.view(), 17);
  for (const std::vector<WeightedAdapter>& terms : std::vector<std::vector<WeightedAdapter>>{
           {{"a", 1.0}}, {{"b", 0.3}, {"c", -2.0}}, {}, {{"d", 1.0}, {"a", 1.0}, {"b", 1.0}}}) {
    f.set.set_active(terms);
    f.set.forward(x.view(), y.view(), Mode::eval);
    f.set.forward(x.view(), y.view(), Mode::train);
    f.set.backward(x.view(), y.view(), dL_dx.view());
  }
  f.set.forward_mixed(x.view(), {"a", "b", "c", "d", "", "a"}, y.view());
  f.set.combine("ab", {{"a", 0.5}, {"b", 0.5}});
  f.set.remove("c");
  f.set.add("c", make_config(2, 2.0, 5, true));
  EXPECT_TRUE(bit_identical(W0, f.W.view()));
}

TEST(AdapterSet, MergedAdapterEqualsUnmergedAndBlocksWhatWouldBeWrong) {
  for (bool fan_in_fan_out : {false, true}) {
    SCOPED_TRACE(fan_in_fan_out ? "fan_in_fan_out" : "W stored d_out x d_in");
    Fixture<double> f(fan_in_fan_out);
    const std::vector<double> W0 = snapshot(f.W.view());
    const std::int64_t n = 4;
    Matrix<double> x(n, kDin), y_unmerged(n, kDout), y_merged(n, kDout), dL_dx(n, kDin);
    fill_random(x.view(), 18);
    f.set.set_active({{"a", 1.0}, {"b", 2.0}});
    f.set.merge("b");
    EXPECT_EQ(f.set.merged(), "b");
    ASSERT_EQ(f.set.active().size(), 1u);  // merge makes the active set {b: 1}
    EXPECT_EQ(f.set.active()[0].name, "b");
    EXPECT_EQ(f.set.active()[0].weight, 1.0);
    EXPECT_FALSE(bit_identical(W0, f.W.view())) << "merge did not write W";

    f.set.forward(x.view(), y_merged.view(), Mode::eval);
    for (std::int64_t i = 0; i < n; ++i)
      expect_row_near<double>(y_merged.view(), i, f.reference_row(x.view(), i, {}), 1e-12, "merged W vs naive base + b");

    expect_error([&] { f.set.set_active("a"); }, "adapter \"b\" is merged into W");
    expect_error([&] { f.set.set_active({{"b", 0.5}}); }, "adapter \"b\" is merged into W");
    expect_error([&] { f.set.clear_active(); }, "adapter \"b\" is merged into W");
    expect_error([&] { f.set.forward(x.view(), y_merged.view(), Mode::train); }, "unmerge() before training");
    expect_error([&] { f.set.forward_mixed(x.view(), {"a", "", "b", "a"}, y_merged.view()); },
                 "forward_mixed: adapter \"b\" is merged into W");
    expect_error([&] { f.set.remove("b"); }, "the adapter is merged into W");
    expect_error([&] { f.set.merge("a"); }, "adapter \"b\" is already merged");
    expect_error([&] { f.set.backward(x.view(), y_merged.view(), dL_dx.view()); }, "backward: no cache");
    // What reads only A and B, or touches another adapter, stays allowed.
    f.set.set_active("b");
    f.set.combine("ac", {{"a", 1.0}, {"c", 1.0}});
    f.set.remove("d");

    f.set.unmerge();
    EXPECT_EQ(f.set.merged(), "");
    const std::vector<double> W1 = snapshot(f.W.view());
    for (std::size_t k = 0; k < W0.size(); ++k) EXPECT_NEAR(W1[k], W0[k], 1e-14) << "W[" << k << "] after unmerge";
    f.set.forward(x.view(), y_unmerged.view(), Mode::eval);
    for (std::int64_t i = 0; i < n; ++i)
      expect_row_near<double>(y_unmerged.view(), i, f.reference_row(x.view(), i, {{"b", 1.0}}), 1e-12,
                              "unmerged b vs naive loop");
    f.set.set_active("a");  // allowed again
  }
}

TEST(AdapterSet, RemoveDropsTheAdapterFromTheActiveSetAndKeepsOtherReferences) {
  Fixture<double> f(false);
  auto& a = f.set.get("a");
  f.set.set_active({{"a", 0.5}, {"b", 1.0}});
  f.set.remove("b");
  EXPECT_FALSE(f.set.contains("b"));
  EXPECT_EQ(f.set.names(), (std::vector<std::string>{"a", "c", "d"}));
  ASSERT_EQ(f.set.active().size(), 1u);
  EXPECT_EQ(f.set.active()[0].name, "a");
  EXPECT_EQ(&f.set.get("a"), &a);  // references to the others stay valid

  // A fresh adapter (B = 0) changes nothing: its output equals the base exactly.
  f.set.add("b", make_config(3, 3.0, 6, false));
  EXPECT_EQ(f.set.names(), (std::vector<std::string>{"a", "c", "d", "b"}));
  const std::int64_t n = 3;
  Matrix<double> x(n, kDin), y(n, kDout), y_base(n, kDout);
  fill_random(x.view(), 19);
  f.set.set_active("b");
  f.set.forward(x.view(), y.view(), Mode::eval);
  f.set.base_forward(x.view(), y_base.view());
  EXPECT_TRUE(bit_identical(snapshot(y_base.view()), y.view()));
  EXPECT_EQ(f.set.trainable_parameters(), (1 + 2 + 2 + 3) * (kDin + kDout));
  const lora::MemoryReport memory = f.set.memory();
  EXPECT_EQ(memory.frozen_bytes, (kDout * kDin + kDout) * sizeof(double));  // W and bias once, not once per adapter
  EXPECT_EQ(memory.parameter_bytes, (1 + 2 + 2 + 3) * (kDin + kDout) * sizeof(double));
}

}  // namespace

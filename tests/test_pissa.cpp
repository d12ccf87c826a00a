// PiSSA and OLoRA (adapters/init.hpp, io/init_conversion.hpp): at init the
// residual base plus s B A is the original W to rounding, and A, B are the
// definition computed here independently (Eigen's JacobiSVD, Gram-Schmidt in
// long double); a model trained a few Adam steps on the residual, saved as a
// rank-2r LoRA and loaded onto the untouched W in a fresh model gives the
// trained model's outputs (plain, rsLoRA, rank_pattern / alpha_pattern, fan_in_fan_out);
// what is refused (read-only or NF4 base, r too large, a merged set, PEFT
// init strings this library does not run) and what is kept (PEFT's strings
// round-trip; loading a "pissa" file never writes W).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <Eigen/SVD>

#include "cpu_test_util.hpp"
#include "io_test_util.hpp"
#include "lora/model.hpp"

namespace {

using io_test::bytes_of;
using io_test::expect_error;
using io_test::random_matrix;
using io_test::fill_random;
using io_test::TempDir;
using lora::Config;
using lora::Init;
using lora::io::PeftConfig;
using Backend = lora::cpu::Backend;
template <class T>
using Matrix = lora::cpu::Matrix<T>;
using LongDense = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;

// A host view as a d_out x d_in matrix in long double (transposed back when stored d_in x d_out).
template <class T>
LongDense as_dense(lora::MatrixView<const T> v, bool transposed = false) {
  LongDense out(transposed ? v.cols : v.rows, transposed ? v.rows : v.cols);
  for (std::int64_t i = 0; i < v.rows; ++i)
    for (std::int64_t j = 0; j < v.cols; ++j) (transposed ? out(j, i) : out(i, j)) = static_cast<long double>(v(i, j));
  return out;
}

long double max_abs(const LongDense& m) { return m.cwiseAbs().maxCoeff(); }


// The stated sign convention (linalg/svd.hpp), applied to an independent SVD:
// each (u_i, v_i) flipped so that u_i's entry largest in magnitude is positive.
void fix_signs(Eigen::MatrixXd& U, Eigen::MatrixXd& V) {
  for (Eigen::Index i = 0; i < U.cols(); ++i) {
    Eigen::Index at = 0;
    U.col(i).cwiseAbs().maxCoeff(&at);
    if (U(at, i) < 0) {
      U.col(i) *= -1;
      V.col(i) *= -1;
    }
  }
}

// PiSSA's A and B from Eigen's JacobiSVD (not the library's BDCSVD).
struct Expected {
  LongDense A, B;
};
Expected pissa_reference(const LongDense& W, int r, double s) {
  const Eigen::MatrixXd Wd = W.cast<double>();
  const Eigen::JacobiSVD<Eigen::MatrixXd> svd(Wd, Eigen::ComputeThinU | Eigen::ComputeThinV);
  Eigen::MatrixXd U = svd.matrixU().leftCols(r), V = svd.matrixV().leftCols(r);
  fix_signs(U, V);
  const Eigen::VectorXd root = (svd.singularValues().head(r) / s).cwiseSqrt();
  return {(root.asDiagonal() * V.transpose()).cast<long double>(), (U * root.asDiagonal()).cast<long double>()};
}

// OLoRA's A = R[:r, :], B = Q[:, :r] by classical Gram-Schmidt (twice, in
// long double) on W's columns: the thin QR with R_ii > 0. Householder (the
// library's, as LAPACK's) may give row i of R and column i of Q the other
// sign; `signs` (R_ii of the result compared) aligns them.
Expected olora_reference(const LongDense& W, int r, const LongDense& signs) {
  const Eigen::Index m = W.rows(), k = std::min(W.rows(), W.cols());
  LongDense Q(m, k);
  for (Eigen::Index j = 0; j < k; ++j) {
    LongDense q = W.col(j);
    for (int pass = 0; pass < 2; ++pass)
      for (Eigen::Index i = 0; i < j; ++i) q -= Q.col(i) * (Q.col(i).transpose() * q)(0, 0);
    Q.col(j) = q / std::sqrt(q.squaredNorm());
  }
  LongDense R = Q.transpose() * W;
  for (Eigen::Index i = 0; i < r; ++i) {
    if (signs(i, i) < 0) {
      R.row(i) *= -1;
      Q.col(i) *= -1;
    }
  }
  return {R.topRows(r), Q.leftCols(r)};
}

// ---- at init: A, B as defined, base + s B A = W ------------------------------------------

template <class T>
void check_init(Init init, int niter, bool fan_in_fan_out, std::int64_t d_out, std::int64_t d_in, int r, double tol) {
  SCOPED_TRACE(lora::to_string(init, niter) + (fan_in_fan_out ? ", fan_in_fan_out" : "") + ", " +
               std::to_string(d_out) + " x " + std::to_string(d_in) + ", r " + std::to_string(r));
  lora::cpu::Context ctx;
  const std::int64_t rows = fan_in_fan_out ? d_in : d_out, cols = fan_in_fan_out ? d_out : d_in;
  Matrix<T> W = random_matrix<T>(rows, cols, 11);
  const LongDense original = as_dense<T>(W.view(), fan_in_fan_out);
  Config c;
  c.r = r;
  c.alpha = 5;
  c.init = init;
  c.pissa_niter = niter;
  c.fan_in_fan_out = fan_in_fan_out;
  lora::Linear<T, Backend> layer(ctx, W.view(), {}, c);
  const double s = c.scale();

  const LongDense A = as_dense<T>(layer.A()), B = as_dense<T>(layer.B());
  const LongDense rebuilt = as_dense<T>(layer.W(), fan_in_fan_out) + static_cast<long double>(s) * B * A;
  EXPECT_LE(max_abs(rebuilt - original), tol * max_abs(original)) << "residual + s B A is not W";
  EXPECT_GT(max_abs(as_dense<T>(layer.W(), fan_in_fan_out) - original), 0.1 * max_abs(original))
      << "W was not rewritten to the residual";

  if (init == Init::olora || niter == 0) {  // the exact definitions
    const Expected e = init == Init::pissa ? pissa_reference(original, r, s) : olora_reference(original, r, A);
    EXPECT_LE(max_abs(A - e.A), 1e3 * tol * max_abs(e.A)) << "A is not the definition";
    EXPECT_LE(max_abs(B - e.B), 1e3 * tol * max_abs(e.B)) << "B is not the definition";
  }
  // The initial values are kept and equal A and B.
  EXPECT_EQ(bytes_of(layer.adapter().initial_A()), bytes_of(layer.A()));
  EXPECT_EQ(bytes_of(layer.adapter().initial_B()), bytes_of(layer.B()));
  const std::size_t initial_bytes = static_cast<std::size_t>(r * (d_in + d_out)) * sizeof(T);
  EXPECT_EQ(layer.memory().frozen_bytes, layer.base().bytes() + initial_bytes);
}

TEST(PissaInit, ExactMatchesTheSvdAndRebuildsW) {
  for (bool t : {false, true}) {
    check_init<double>(Init::pissa, 0, t, 7, 11, 3, 1e-14);
    check_init<double>(Init::pissa, 0, t, 12, 5, 5, 1e-14);  // r = min(d_out, d_in)
    check_init<float>(Init::pissa, 0, t, 9, 6, 2, 1e-6);
  }
}

TEST(PissaInit, RandomizedRebuildsW) {
  for (bool t : {false, true}) {
    check_init<double>(Init::pissa, 2, t, 13, 8, 3, 1e-14);
    check_init<float>(Init::pissa, 4, t, 6, 10, 1, 1e-6);
  }
}

TEST(OloraInit, IsTheThinQrAndRebuildsW) {
  for (bool t : {false, true}) {
    check_init<double>(Init::olora, 0, t, 9, 6, 2, 1e-14);
    check_init<double>(Init::olora, 0, t, 5, 8, 5, 1e-14);  // d_out < d_in, r = min
    check_init<float>(Init::olora, 0, t, 7, 7, 3, 1e-6);
  }
}

// W with singular values 100, 40, 10 and then 1e-3 and below: the randomized
// SVD with 2 power iterations finds the top 3 triplets to ~(1e-3 / 10)^5, so
// s B A is the best rank-3 approximation (Eckart-Young) to 1e-10. The sketch
// is a function of (seed, stream): the same seed gives the same A and B bit
// for bit, another seed other bits but the same approximation.
TEST(PissaInit, RandomizedFindsThePlantedSubspace) {
  const std::int64_t m = 20, n = 14;
  const Eigen::MatrixXd U = Eigen::HouseholderQR<Eigen::MatrixXd>(Eigen::MatrixXd::Random(m, n)).householderQ() *
                            Eigen::MatrixXd::Identity(m, n);
  const Eigen::MatrixXd V = Eigen::HouseholderQR<Eigen::MatrixXd>(Eigen::MatrixXd::Random(n, n)).householderQ();
  Eigen::VectorXd S = Eigen::VectorXd::Zero(n);
  S.head(3) << 100, 40, 10;
  for (Eigen::Index i = 3; i < n; ++i) S(i) = 1e-3 / static_cast<double>(i);
  const Eigen::MatrixXd planted = U * S.asDiagonal() * V.transpose();
  const Eigen::MatrixXd best = U.leftCols(3) * S.head(3).asDiagonal() * V.leftCols(3).transpose();

  lora::cpu::Context ctx;
  auto run = [&](std::uint64_t seed, Matrix<double>& W) {
    W = Matrix<double>(m, n);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) W(i, j) = planted(i, j);
    Config c;
    c.r = 3;
    c.alpha = 6;
    c.init = Init::pissa;
    c.pissa_niter = 2;
    c.seed = seed;
    return lora::Linear<double, Backend>(ctx, W.view(), {}, c, /*stream=*/4);
  };
  Matrix<double> W1, W2, W3;
  const auto a = run(5, W1), b = run(5, W2), other = run(6, W3);
  const LongDense sBA = static_cast<long double>(a.scale()) * as_dense<double>(a.B()) * as_dense<double>(a.A());
  EXPECT_LE(max_abs(sBA - best.cast<long double>()), 1e-10 * 100);
  EXPECT_EQ(bytes_of(a.A()), bytes_of(b.A()));
  EXPECT_EQ(bytes_of(a.B()), bytes_of(b.B()));
  EXPECT_EQ(bytes_of(a.W()), bytes_of(b.W())) << "the same seed must rebuild the same residual (resuming relies on it)";
  EXPECT_NE(bytes_of(a.A()), bytes_of(other.A()));
  const LongDense sBA_other =
      static_cast<long double>(other.scale()) * as_dense<double>(other.B()) * as_dense<double>(other.A());
  EXPECT_LE(max_abs(sBA_other - best.cast<long double>()), 1e-10 * 100);
}

// reset_parameters() returns A and B to their initial values without touching
// W, so the layer computes the original W again.
TEST(PissaInit, ResetReturnsToTheInitialValues) {
  lora::cpu::Context ctx;
  Matrix<double> W = random_matrix<double>(6, 9, 3);
  const Matrix<double> original = W.clone();
  Config c;
  c.r = 2;
  c.init = Init::pissa;
  lora::Linear<double, Backend> layer(ctx, W.view(), {}, c);
  const std::vector<std::uint8_t> residual = bytes_of(layer.W());
  fill_random(layer.lora_A().value, 8);
  fill_random(layer.lora_B().value, 9);
  layer.reset_parameters();
  EXPECT_EQ(bytes_of(layer.A()), bytes_of(layer.adapter().initial_A()));
  EXPECT_EQ(bytes_of(layer.B()), bytes_of(layer.adapter().initial_B()));
  EXPECT_EQ(bytes_of(layer.W()), residual);
  const Matrix<double> x = random_matrix<double>(4, 9, 5);
  Matrix<double> y(4, 6);
  layer.inference(x.view(), y.view());
  const LongDense expected = as_dense<double>(x.view()) * as_dense<double>(original.view()).transpose();
  EXPECT_LE(max_abs(as_dense<double>(y.view()) - expected), 1e-13 * max_abs(expected));
}

// ---- refused ----------------------------------------------------------------------------

TEST(PissaInit, RefusesWhatCannotHoldTheResidual) {
  lora::cpu::Context ctx;
  Matrix<float> W = random_matrix<float>(6, 8, 1);
  Config c;
  c.r = 2;
  c.init = Init::pissa;
  expect_error([&] { (void)lora::Linear<float, Backend>(ctx, lora::MatrixView<const float>(W.view()), {}, c); },
               {"Linear", "read-only W", "writable view"});
  c.init = Init::olora;
  expect_error(
      [&] {
        (void)lora::Linear<float, Backend, lora::Nf4Base<float, Backend>>(
            lora::Nf4Base<float, Backend>::quantize(ctx, W.view()), c);
      },
      {"olora", "quantized (4-bit NF4)", "dense W"});
  c.r = 7;
  expect_error([&] { (void)lora::Linear<float, Backend>(ctx, W.view(), {}, c); }, {"Config.r = 7", "r <= min(d_out, d_in)"});
  c.r = 2;
  W(3, 4) = std::nanf("");
  expect_error([&] { (void)lora::Linear<float, Backend>(ctx, W.view(), {}, c); }, {"W[3, 4]", "finite"});
  W(3, 4) = 0.5f;
  c.use_dora = true;
  expect_error([&] { (void)lora::Linear<float, Backend>(ctx, W.view(), {}, c); }, {"use_dora", "not supported"});
  c.use_dora = false;
  c.init = Init::gaussian;
  c.pissa_niter = 2;
  expect_error([&] { (void)lora::Linear<float, Backend>(ctx, W.view(), {}, c); }, {"pissa_niter = 2", "Init::pissa"});

  // A set with a merged adapter: the decomposition would take the merge in.
  lora::AdapterSet<float, Backend> set(ctx, W.view());
  Config plain;
  plain.r = 2;
  set.add("a", plain);
  set.merge("a");
  c.init = Init::pissa;
  c.pissa_niter = 0;
  expect_error([&] { set.add("p", c); }, {"merged", "unmerge() first"});
  EXPECT_FALSE(set.contains("p"));
}

// ---- the PEFT config -----------------------------------------------------------------------

PeftConfig parsed(const nlohmann::ordered_json& init) {
  nlohmann::ordered_json j = {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"q"}}};
  j["init_lora_weights"] = init;
  return PeftConfig::from_json(j, "adapter_config.json");
}

TEST(PissaPeftConfig, ParsesRunsAndWritesBackPeftsStrings) {
  struct Case {
    nlohmann::ordered_json value;
    Init init;
    int niter;
  };
  for (const Case& k : {Case{true, Init::kaiming_uniform, 0}, Case{"gaussian", Init::gaussian, 0},
                        Case{"Gaussian", Init::gaussian, 0}, Case{"pissa", Init::pissa, 0},
                        Case{"pissa_niter_16", Init::pissa, 16}, Case{"olora", Init::olora, 0},
                        Case{"OLoRA", Init::olora, 0}}) {
    SCOPED_TRACE(k.value.dump());
    const PeftConfig c = parsed(k.value);
    const Config layer = c.resolver().new_adapter_config("q");
    EXPECT_EQ(layer.init, k.init);
    EXPECT_EQ(layer.pissa_niter, k.niter);
    EXPECT_EQ(c.layer_config("q").init, Init::kaiming_uniform) << "layer_config (for loading) never runs an init";
    EXPECT_EQ(c.to_json().at("init_lora_weights").dump(), k.value.dump()) << "written back as PEFT wrote it";
    EXPECT_FALSE(c.other.contains("init_lora_weights"));
  }
  EXPECT_EQ(PeftConfig().to_json().at("init_lora_weights"), true);
  EXPECT_EQ(lora::to_string(Init::pissa, 16), "pissa_niter_16");
  EXPECT_EQ(lora::to_string(Init::pissa), "pissa");
  EXPECT_EQ(lora::to_string(Init::olora), "olora");

  // Kept and written back, refused only for a new adapter.
  struct Refused {
    nlohmann::ordered_json value;
    std::string says;
  };
  for (const Refused& k : {Refused{false, "B non-zero"}, Refused{"loftq", "LoftQ"}, Refused{"eva", "pass over data"},
                           Refused{"corda", "preprocess_corda"}, Refused{"orthogonal", "not an init this library runs"},
                           Refused{"pissa_niter_0", "N an integer in [1, 999999]"},
                           Refused{"pissa_niter_x", "N an integer"}, Refused{"pissa2", "not an init"}}) {
    SCOPED_TRACE(k.value.dump());
    const PeftConfig c = parsed(k.value);
    EXPECT_EQ(c.to_json().at("init_lora_weights").dump(), k.value.dump());
    expect_error([&] { (void)c.resolver().new_adapter_config("q"); }, {"init_lora_weights = ", k.says});
    lora::cpu::Context ctx;
    Matrix<float> W = random_matrix<float>(4, 4, 2);
    lora::Model<float, Backend> model(ctx);
    model.add_base("q", W.view());
    expect_error([&] { model.add_adapter("a", c); }, {k.says});
    EXPECT_TRUE(model.adapters().empty());
  }
  expect_error([] { parsed(3); }, {"\"init_lora_weights\" is 3", "true, false or a string"});
}

// ---- a model: train on the residual, save for the original W ----------------------------

constexpr std::int64_t kRows = 5;

struct Layer {
  const char* name;
  std::int64_t d_out, d_in;
  bool fan_in_fan_out;
};
// q: 8 x 6, fc: stored d_in x d_out (GPT-2's Conv1D) 6 x 7, out: 6 x 7 (left alone by target_modules).
constexpr Layer kLayers[] = {{"h.0.q", 8, 6, false}, {"h.0.fc", 7, 8, true}, {"h.0.out", 6, 7, false}};

struct Run {
  lora::cpu::Context ctx;
  std::vector<Matrix<float>> originals, weights;
  lora::Model<float, Backend> model{ctx};

  explicit Run(const PeftConfig& config) {
    for (const Layer& l : kLayers) {
      originals.push_back(random_matrix<float>(l.fan_in_fan_out ? l.d_in : l.d_out,
                                               l.fan_in_fan_out ? l.d_out : l.d_in, 40 + originals.size()));
      weights.push_back(originals.back().clone());
      model.add_base(l.name, weights.back().view(), {}, l.fan_in_fan_out);
    }
    model.add_adapter("p", config, /*seed=*/3);
  }

  // Each layer's output on its own input: x_k (N x d_in) -> y_k.
  std::vector<Matrix<float>> outputs(const lora::Model<float, Backend>& m) const {
    std::vector<Matrix<float>> ys;
    for (std::size_t k = 0; k < std::size(kLayers); ++k) {
      const Matrix<float> x = random_matrix<float>(kRows, kLayers[k].d_in, 900 + k);
      ys.emplace_back(kRows, kLayers[k].d_out);
      m.module(kLayers[k].name).inference(x.view(), ys.back().view());
    }
    return ys;
  }

  // A few AdamW steps on 0.5 ||y - target||^2 per layer.
  void train(int steps) {
    lora::Adam<float, Backend> adam(ctx, lora::AdamOptions::adamw(5e-2, 0.0));
    adam.add_group(model.parameters("p"));
    for (int t = 0; t < steps; ++t) {
      for (std::size_t k = 0; k < std::size(kLayers); ++k) {
        auto& set = model.module(kLayers[k].name);
        if (!set.contains("p")) continue;
        const Matrix<float> x = random_matrix<float>(kRows, kLayers[k].d_in, 100 * t + k);
        const Matrix<float> target = random_matrix<float>(kRows, kLayers[k].d_out, 100 * t + k + 50);
        Matrix<float> y(kRows, kLayers[k].d_out);
        set.forward(x.view(), y.view());
        for (std::int64_t i = 0; i < y.size(); ++i) y.data()[i] -= target.data()[i];  // dL/dy
        set.backward(x.view(), y.view(), {});
      }
      adam.step();
    }
  }
};

// Trains a PiSSA / OLoRA adapter, saves it as a rank-2r LoRA, loads that in a
// fresh model over the untouched original weights (read-only views) and
// compares every layer's output with the trained residual model's.
void check_conversion(const PeftConfig& config, double alpha_factor) {
  Run run(config);
  for (std::size_t k = 0; k < std::size(kLayers); ++k) {  // W holds the residual where the adapter is
    const bool adapted = run.model.module(kLayers[k].name).contains("p");
    EXPECT_EQ(bytes_of(lora::MatrixView<const float>(run.weights[k].view())) !=
                  bytes_of(lora::MatrixView<const float>(run.originals[k].view())),
              adapted)
        << kLayers[k].name;
  }
  run.train(3);
  const std::vector<Matrix<float>> trained = run.outputs(run.model);

  TempDir dir;
  run.model.save_peft("p", dir / "residual");
  run.model.save_peft_as_lora("p", dir / "lora");
  const lora::io::Adapter residual = lora::io::load_peft(dir / "residual");
  const lora::io::Adapter converted = lora::io::load_peft(dir / "lora");
  // The unconverted file says how it was made; the converted one doubles its r
  // and patterns (save_peft writes the first module's r and alpha, the others as patterns).
  const PeftConfig& saved = residual.config;
  EXPECT_EQ(saved.to_json().at("init_lora_weights"), config.to_json().at("init_lora_weights"));
  const nlohmann::json j = converted.config.to_json();
  EXPECT_EQ(j.at("init_lora_weights"), true);
  EXPECT_EQ(j.at("r"), 2 * saved.r);
  EXPECT_EQ(converted.config.lora_alpha, saved.lora_alpha * alpha_factor);
  ASSERT_EQ(converted.config.rank_pattern.size(), saved.rank_pattern.size());
  for (std::size_t i = 0; i < saved.rank_pattern.size(); ++i)
    EXPECT_EQ(converted.config.rank_pattern[i].second, 2 * saved.rank_pattern[i].second);
  ASSERT_EQ(converted.config.alpha_pattern.size(), saved.alpha_pattern.size());
  for (std::size_t i = 0; i < saved.alpha_pattern.size(); ++i)
    EXPECT_EQ(converted.config.alpha_pattern[i].second, saved.alpha_pattern[i].second * alpha_factor);
  EXPECT_EQ(saved.rank_pattern.empty() && saved.alpha_pattern.empty(),
            config.rank_pattern.empty() && config.alpha_pattern.empty());
  for (const auto& [name, m] : converted.modules) {
    const auto& trained_adapter = run.model.module(name).get("p");
    EXPECT_EQ(m.r, 2 * trained_adapter.rank());
    EXPECT_NEAR(m.scale, trained_adapter.scale(), 1e-15 * trained_adapter.scale()) << name;
  }

  lora::cpu::Context ctx;
  lora::Model<float, Backend> fresh(ctx);
  for (std::size_t k = 0; k < std::size(kLayers); ++k)
    fresh.add_base(kLayers[k].name, lora::MatrixView<const float>(run.originals[k].view()), {},
                   kLayers[k].fan_in_fan_out);
  fresh.load_peft(dir / "lora", "p");
  const std::vector<Matrix<float>> loaded = run.outputs(fresh);
  for (std::size_t k = 0; k < std::size(kLayers); ++k) {
    const LongDense a = as_dense<float>(trained[k].view()), b = as_dense<float>(loaded[k].view());
    EXPECT_LE(max_abs(a - b), 1e-5 * max_abs(a)) << kLayers[k].name;
  }
}

TEST(PissaConversion, TrainedResidualEqualsTheRank2rLoraOnTheOriginalW) {
  PeftConfig c;
  c.target_modules = {"q"};
  c.r = 3;
  c.lora_alpha = 6;
  c.init_lora_weights = "pissa";
  {
    SCOPED_TRACE("pissa");
    check_conversion(c, 2.0);
  }
  {
    SCOPED_TRACE("pissa_niter_2, rank_pattern and alpha_pattern");
    c.target_modules = {"q", "out"};
    c.init_lora_weights = "pissa_niter_2";
    c.rank_pattern = {{"out", 2}};
    c.alpha_pattern = {{"out", 5}};
    check_conversion(c, 2.0);
  }
  {
    SCOPED_TRACE("olora, rsLoRA: alpha times sqrt(2)");
    c.init_lora_weights = "olora";
    c.rank_pattern.clear();
    c.alpha_pattern.clear();
    c.use_rslora = true;
    check_conversion(c, std::sqrt(2.0));
  }
  {
    SCOPED_TRACE("pissa, rsLoRA with rank_pattern and alpha_pattern (PEFT refuses this combination)");
    c.init_lora_weights = "pissa";
    c.rank_pattern = {{"out", 4}};
    c.alpha_pattern = {{"q", 3}};
    check_conversion(c, std::sqrt(2.0));
  }
}

TEST(PissaConversion, FanInFanOut) {
  PeftConfig c;
  c.target_modules = {"fc"};
  c.fan_in_fan_out = true;
  c.r = 2;
  c.lora_alpha = 3;
  c.init_lora_weights = "pissa";
  check_conversion(c, 2.0);
  c.init_lora_weights = "olora";
  check_conversion(c, 2.0);
}

// An adapter that did not start from W is already an ordinary LoRA; a model
// whose every selected module is checked before any W is written; loading a
// file that says "pissa" never writes W.
TEST(PissaConversion, RefusalsAndWhatStaysUntouched) {
  lora::cpu::Context ctx;
  Matrix<float> Wq = random_matrix<float>(8, 6, 1), Wv = random_matrix<float>(8, 6, 2);
  const Matrix<float> q0 = Wq.clone();
  {
    lora::Model<float, Backend> model(ctx);
    model.add_base("h.q", Wq.view());
    model.add_base("h.v", lora::MatrixView<const float>(Wv.view()));
    PeftConfig c;
    c.target_modules = {"q", "v"};
    c.r = 2;
    c.init_lora_weights = "pissa";
    expect_error([&] { model.add_adapter("p", c); }, {"module \"h.v\"", "read-only W"});
    EXPECT_TRUE(model.adapters().empty());
    EXPECT_EQ(bytes_of(lora::MatrixView<const float>(Wq.view())), bytes_of(lora::MatrixView<const float>(q0.view())))
        << "an error must leave every W as it was";

    c.target_modules = {"q"};
    c.init_lora_weights = true;
    model.add_adapter("plain", c);
    expect_error([&] { (void)model.to_peft_as_lora("plain"); }, {"no initial values", "already an ordinary LoRA"});

    // Init given by argument: recorded in the config.
    model.add_adapter("o", c, 0, Init::olora);
    EXPECT_EQ(model.adapter_config("o").to_json().at("init_lora_weights"), "olora");
    TempDir dir;
    model.save_peft("o", dir / "o");
    const std::vector<std::uint8_t> residual = bytes_of(model.module("h.q").W());
    lora::Model<float, Backend> other(ctx);
    Matrix<float> W2 = Wq.clone();
    other.add_base("h.q", W2.view());
    other.load_peft(dir / "o", "o");
    EXPECT_EQ(bytes_of(lora::MatrixView<const float>(W2.view())), residual) << "load_peft must not re-run the init";
    EXPECT_FALSE(other.module("h.q").get("o").has_initial());
  }
}

}  // namespace

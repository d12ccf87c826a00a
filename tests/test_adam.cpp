// lora::Adam against PyTorch's documented update rule, implemented here in
// double and independently of the library, step by step; per-group learning
// rates (LoRA+), zero_grad, global-norm clipping and the state it allocates;
// non-finite gradients as PyTorch treats them (and the opt-in skip); the
// misuses it refuses: a tensor in two groups, a layer freed under it, a group
// that does not exist.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "io_test_util.hpp"
#include "lora/lora.hpp"

namespace {

using io_test::expect_error;
using io_test::kInf;
using io_test::kNaN;
using lora::Parameter;
using lora::cpu::Matrix;

// PyTorch's Adam / AdamW pseudocode (torch.optim.Adam and torch.optim.AdamW docs), in double:
//   Adam:  g <- g + lambda theta
//   AdamW: theta <- theta - gamma lambda theta
//   m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
//   m_hat = m / (1 - beta1^t),      v_hat = v / (1 - beta2^t)
//   theta <- theta - gamma m_hat / (sqrt(v_hat) + eps)
struct ReferenceAdam {
  double beta1 = 0, beta2 = 0, eps = 0;
  bool decoupled = false;
  int t = 0;
  struct Tensor {
    std::vector<double> theta, m, v;
    double lr, weight_decay;
  };
  std::vector<Tensor> tensors;

  void step(const std::vector<std::vector<double>>& grads) {
    ++t;
    for (std::size_t k = 0; k < tensors.size(); ++k) {
      Tensor& p = tensors[k];
      for (std::size_t i = 0; i < p.theta.size(); ++i) {
        double g = grads[k][i];
        if (decoupled) {
          p.theta[i] -= p.lr * p.weight_decay * p.theta[i];
        } else {
          g += p.weight_decay * p.theta[i];
        }
        p.m[i] = beta1 * p.m[i] + (1 - beta1) * g;
        p.v[i] = beta2 * p.v[i] + (1 - beta2) * g * g;
        const double m_hat = p.m[i] / (1 - std::pow(beta1, t));
        const double v_hat = p.v[i] / (1 - std::pow(beta2, t));
        p.theta[i] -= p.lr * m_hat / (std::sqrt(v_hat) + eps);
      }
    }
  }
};

// Values with |theta| in [1, 2] and either sign: far from 0, so a relative
// tolerance means the same everywhere.
template <class P>
void fill_away_from_zero(Matrix<P>& m, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> mag(1.0, 2.0);
  std::bernoulli_distribution sign(0.5);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<P>(sign(gen) ? mag(gen) : -mag(gen));
}
// A gradient per step: mixed signs and magnitudes over three decades.
template <class P>
void fill_gradient(Matrix<P>& g, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<int> decade(0, 2);
  for (std::int64_t i = 0; i < g.size(); ++i) g.data()[i] = static_cast<P>(u(gen) * std::pow(10.0, -decade(gen)));
}
template <class P>
std::vector<double> to_vector(const P* data, std::int64_t n) {
  return std::vector<double>(data, data + n);
}

// Two tensors shaped like a LoRA pair (A: r x d_in, B: d_out x r), B in a
// LoRA+ group with lr x ratio, for `steps` steps against the reference.
template <class P>
void check_against_reference(bool decoupled, double tol) {
  lora::cpu::Context ctx;
  constexpr double kLr = 1e-2, kRatio = 4.0, kWeightDecay = 0.1;
  constexpr int kSteps = 6;
  lora::AdamOptions options;
  options.lr = kLr;
  options.weight_decay = kWeightDecay;
  options.decoupled_weight_decay = decoupled;
  lora::cpu::Adam<P> adam(ctx, options);

  Matrix<P> A(3, 7), dA(3, 7), B(5, 3), dB(5, 3);
  fill_away_from_zero(A, 1);
  fill_away_from_zero(B, 2);
  adam.add_group({{A.view(), dA.view(), "lora_A"}});
  adam.add_group({{B.view(), dB.view(), "lora_B"}}, kLr * kRatio);  // LoRA+: one line

  ReferenceAdam ref;
  ref.beta1 = options.beta1;
  ref.beta2 = options.beta2;
  ref.eps = options.eps;
  ref.decoupled = decoupled;
  const std::int64_t nA = A.size(), nB = B.size();
  ref.tensors.push_back({to_vector(A.data(), nA), std::vector<double>(nA), std::vector<double>(nA), kLr, kWeightDecay});
  ref.tensors.push_back(
      {to_vector(B.data(), nB), std::vector<double>(nB), std::vector<double>(nB), kLr * kRatio, kWeightDecay});
  const std::vector<double> A0 = ref.tensors[0].theta, B0 = ref.tensors[1].theta;

  for (int t = 1; t <= kSteps; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    fill_gradient(dA, 100 + t);
    fill_gradient(dB, 200 + t);
    adam.step();
    ref.step({to_vector(dA.data(), nA), to_vector(dB.data(), nB)});
    EXPECT_EQ(adam.step_count(), t);

    const auto moments = adam.moments();
    ASSERT_EQ(moments.size(), 2u);
    const P* params[2] = {A.data(), B.data()};
    for (std::size_t k = 0; k < 2; ++k) {
      const ReferenceAdam::Tensor& want = ref.tensors[k];
      // m can cancel to near 0 across steps: its error is measured against the tensor's largest |m|.
      const double m_scale = std::abs(*std::max_element(want.m.begin(), want.m.end(), [](double a, double b) {
        return std::abs(a) < std::abs(b);
      }));
      for (std::size_t i = 0; i < want.theta.size(); ++i) {
        const double got = params[k][i];
        EXPECT_LE(std::abs(got - want.theta[i]), tol * std::abs(want.theta[i])) << "tensor " << k << " [" << i << "]";
        EXPECT_LE(std::abs(moments[k].m.data[i] - want.m[i]), tol * m_scale) << "m of tensor " << k << " [" << i << "]";
        EXPECT_LE(std::abs(moments[k].v.data[i] - want.v[i]), tol * want.v[i]) << "v of tensor " << k << " [" << i << "]";
      }
    }
  }
  // The comparison had something to compare: every tensor moved by far more
  // than the tolerance, B (LoRA+ group) further than A.
  double moved_A = 0, moved_B = 0;
  for (std::int64_t i = 0; i < nA; ++i) moved_A = std::max(moved_A, std::abs(A.data()[i] - A0[static_cast<std::size_t>(i)]));
  for (std::int64_t i = 0; i < nB; ++i) moved_B = std::max(moved_B, std::abs(B.data()[i] - B0[static_cast<std::size_t>(i)]));
  EXPECT_GT(moved_A, 1e-2);
  EXPECT_GT(moved_B, 2 * moved_A);
}

TEST(Adam, MatchesPyTorchFormulaStepByStepFloat) { check_against_reference<float>(false, 1e-6); }
TEST(Adam, MatchesPyTorchFormulaStepByStepDouble) { check_against_reference<double>(false, 1e-13); }
TEST(AdamW, MatchesPyTorchFormulaStepByStepFloat) { check_against_reference<float>(true, 1e-6); }
TEST(AdamW, MatchesPyTorchFormulaStepByStepDouble) { check_against_reference<double>(true, 1e-13); }

// The first step of Adam moves every element by lr (m_hat = g, v_hat = g^2,
// eps negligible) against the sign of g: the bias correction in one line.
TEST(Adam, FirstStepMovesEachElementByLr) {
  lora::cpu::Context ctx;
  lora::AdamOptions options;
  options.lr = 0.01;
  lora::cpu::Adam<double> adam(ctx, options);
  Matrix<double> p(2, 3), g(2, 3);
  const double grads[6] = {0.3, -2.0, 1e-3, -1e-2, 5.0, -0.7};
  std::copy(grads, grads + 6, g.data());
  adam.add_group({{p.view(), g.view(), "p"}});
  adam.step();
  // Without the correction the move would be lr (1 - beta1) / sqrt(1 - beta2) = 3.16 lr.
  // |g| / (|g| + eps) differs from 1 by at most 1e-5 here, so 1e-6 absolute (1e-4 lr).
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(p.data()[i], grads[i] > 0 ? -0.01 : 0.01, 1e-6) << i;
}

TEST(Adam, ZeroGradClearsEveryGradientItWasGiven) {
  lora::cpu::Context ctx;
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  Matrix<float> a(2, 3), ga(2, 3), b(4, 1), gb(4, 1), other(2, 2), g_other(2, 2);
  fill_gradient(ga, 1);
  fill_gradient(gb, 2);
  std::fill(g_other.data(), g_other.data() + g_other.size(), 3.0f);
  adam.add_group({{a.view(), ga.view(), "a"}});
  adam.add_group({{b.view(), gb.view(), "b"}}, 0.5);
  adam.zero_grad();
  for (std::int64_t i = 0; i < ga.size(); ++i) EXPECT_EQ(ga.data()[i], 0.0f);
  for (std::int64_t i = 0; i < gb.size(); ++i) EXPECT_EQ(gb.data()[i], 0.0f);
  for (std::int64_t i = 0; i < g_other.size(); ++i) EXPECT_EQ(g_other.data()[i], 3.0f);  // not given: untouched
}

// torch.nn.utils.clip_grad_norm_: one norm over all tensors; when it exceeds
// max_norm every gradient is multiplied by max_norm / (norm + 1e-6).
TEST(Adam, ClipGradNormScalesByTheGlobalNorm) {
  lora::cpu::Context ctx;
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  Matrix<float> a(3, 4), ga(3, 4), b(5, 2), gb(5, 2);
  fill_gradient(ga, 10);
  fill_gradient(gb, 11);
  for (std::int64_t i = 0; i < gb.size(); ++i) gb.data()[i] *= 10.0f;  // tensors of different norms
  adam.add_group({{a.view(), ga.view(), "a"}});
  adam.add_group({{b.view(), gb.view(), "b"}}, 2e-3);
  const std::vector<double> ga0 = to_vector(ga.data(), ga.size()), gb0 = to_vector(gb.data(), gb.size());
  double sum = 0;
  for (double v : ga0) sum += v * v;
  for (double v : gb0) sum += v * v;
  const double norm = std::sqrt(sum);

  const double max_norm = norm / 3;
  EXPECT_NEAR(adam.clip_grad_norm(max_norm), norm, 1e-6 * norm);
  const double coef = max_norm / (norm + 1e-6);
  double after = 0;
  for (std::size_t i = 0; i < ga0.size(); ++i) {
    EXPECT_NEAR(ga.data()[i], ga0[i] * coef, 1e-6 * std::abs(ga0[i] * coef));
    after += static_cast<double>(ga.data()[i]) * ga.data()[i];
  }
  for (std::size_t i = 0; i < gb0.size(); ++i) {
    EXPECT_NEAR(gb.data()[i], gb0[i] * coef, 1e-6 * std::abs(gb0[i] * coef));
    after += static_cast<double>(gb.data()[i]) * gb.data()[i];
  }
  EXPECT_NEAR(std::sqrt(after), max_norm, 1e-6 * max_norm);

  // Below max_norm nothing changes, bit for bit; the norm is still returned.
  const std::vector<float> ga1(ga.data(), ga.data() + ga.size()), gb1(gb.data(), gb.data() + gb.size());
  EXPECT_NEAR(adam.clip_grad_norm(2 * max_norm), max_norm, 1e-6 * max_norm);
  EXPECT_EQ(std::memcmp(ga.data(), ga1.data(), ga.bytes()), 0);
  EXPECT_EQ(std::memcmp(gb.data(), gb1.data(), gb.bytes()), 0);
}

TEST(Adam, StateBytesAreTwoMomentsPerTrainableElement) {
  lora::cpu::Context ctx;
  lora::Config config;
  config.r = 4;
  // A 48 x 40 layer: W has 1920 elements and gets no state.
  Matrix<float> W(48, 40);
  lora::cpu::Linear<float> layer(ctx, W.view(), {}, config);
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions::adamw());
  EXPECT_EQ(adam.state_bytes(), 0u);
  adam.add_group({layer.lora_A()});
  adam.add_group({layer.lora_B()}, 1e-2);
  const std::size_t trainable = 4 * 40 + 48 * 4;  // A: r x d_in, B: d_out x r = 352
  EXPECT_EQ(static_cast<std::size_t>(layer.trainable_parameters()), trainable);
  EXPECT_EQ(adam.state_bytes(), 8 * trainable);   // 2 moments x 4 bytes
  EXPECT_NE(adam.state_bytes(), 8 * (trainable + 48 * 40));  // W would add 15,360

  Matrix<double> Wd(48, 40);
  lora::Linear<double, lora::cpu::Backend> layer_d(ctx, Wd.view(), {}, config);
  lora::cpu::Adam<double> adam_d(ctx, lora::AdamOptions{});
  adam_d.add_group(layer_d.parameters());
  EXPECT_EQ(adam_d.state_bytes(), 16 * trainable);  // 2 moments x 8 bytes
}

// ---- Misuse: the same tensor twice, a freed tensor, a group that does not exist ----

// PyTorch refuses a parameter in two groups ("some parameters appear in more
// than one parameter group"): the tempting LoRA+ spelling add_group({A, B});
// add_group({B}, 16 lr) would update B twice per step and count it twice.
TEST(Adam, ATensorMayBeInOneGroupOnlyAndOnlyOnce) {
  lora::cpu::Context ctx;
  lora::Config config;
  config.r = 2;
  Matrix<float> W(8, 6);
  lora::cpu::Linear<float> layer(ctx, W.view(), {}, config);
  const std::size_t trainable = 2 * 6 + 8 * 2;

  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  adam.add_group(layer.parameters());
  expect_error([&] { adam.add_group({layer.lora_B()}, 16e-3); }, {"\"lora_B\"", "group 0", "more than one"});
  EXPECT_EQ(adam.group_count(), 1u);
  EXPECT_EQ(adam.trainable_parameters(), static_cast<std::int64_t>(trainable));
  EXPECT_EQ(adam.state_bytes(), 8 * trainable);

  lora::cpu::Adam<float> twice(ctx, lora::AdamOptions{});
  expect_error([&] { twice.add_group({layer.lora_A(), layer.lora_B(), layer.lora_A()}); }, {"\"lora_A\"", "more than one"});
  EXPECT_EQ(twice.group_count(), 0u);
  EXPECT_EQ(twice.state_bytes(), 0u);

  // Two views of one buffer that share elements are one tensor as far as the update goes.
  Matrix<float> buffer(4, 3), g_whole(4, 3), g_rows(2, 3), g_tail(1, 3);
  const Parameter<float> whole{buffer.view(), g_whole.view(), "whole"};
  const Parameter<float> rows_1_2{{buffer.data() + 3, 2, 3}, g_rows.view(), "rows_1_2"};
  lora::cpu::Adam<float> overlap(ctx, lora::AdamOptions{});
  overlap.add_group({whole});
  expect_error([&] { overlap.add_group({rows_1_2}); }, {"\"rows_1_2\"", "\"whole\"", "group 0"});
  // ... and so are a gradient shared by two tensors, or a tensor that is its own gradient.
  lora::cpu::Adam<float> shared_grad(ctx, lora::AdamOptions{});
  Matrix<float> a(2, 3), b(2, 3), g(2, 3);
  expect_error([&] { shared_grad.add_group({{a.view(), g.view(), "a"}, {b.view(), g.view(), "b"}}); },
               {"\"b\"", "gradient", "more than one"});
  expect_error([&] { shared_grad.add_group({{a.view(), a.view(), "a"}}); }, {"\"a\"", "gradient"});

  // The LoRA+ way (B in its own group only) and adjacent, disjoint views are fine.
  lora::cpu::Adam<float> lora_plus(ctx, lora::AdamOptions{});
  lora_plus.add_group({layer.lora_A()});
  lora_plus.add_group({layer.lora_B()}, 16e-3);
  EXPECT_EQ(lora_plus.state_bytes(), 8 * trainable);
  const Parameter<float> rows_0_1{{buffer.data(), 2, 3}, g_rows.view(), "rows_0_1"};
  const Parameter<float> row_3{{buffer.data() + 9, 1, 3}, g_tail.view(), "row_3"};
  overlap = lora::cpu::Adam<float>(ctx, lora::AdamOptions{});
  overlap.add_group({rows_0_1, row_3});
  EXPECT_EQ(overlap.trainable_parameters(), 9);
}

// The optimizer holds views of tensors a layer owns. A layer destroyed, or
// another moved over it, frees them: step() must say so rather than write
// into freed memory (heap-use-after-free under ASan before the check).
TEST(Adam, UsingTensorsWhoseLayerWasReplacedOrDestroyedIsAnError) {
  lora::cpu::Context ctx;
  lora::Config config;
  config.r = 2;
  Matrix<float> W1(8, 6), W2(8, 6);
  lora::cpu::Linear<float> layer(ctx, W1.view(), {}, config);
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  adam.add_group(layer.parameters());
  layer = lora::cpu::Linear<float>(ctx, W2.view(), {}, config);  // frees the A, B the optimizer was given
  expect_error([&] { adam.step(); }, {"step", "\"lora_A\"", "group 0", "freed or replaced"});
  expect_error([&] { adam.zero_grad(); }, {"zero_grad", "freed or replaced"});
  expect_error([&] { adam.clip_grad_norm(1.0); }, {"clip_grad_norm", "freed or replaced"});
  EXPECT_EQ(adam.step_count(), 0);

  lora::cpu::Adam<float> outlived(ctx, lora::AdamOptions{});
  {
    lora::cpu::Linear<float> scoped(ctx, W2.view(), {}, config);
    outlived.add_group({scoped.lora_B()});
  }
  expect_error([&] { outlived.step(); }, {"\"lora_B\"", "freed or replaced"});
}

// Moving a layer moves its storage with it (a std::vector of layers
// reallocates): the optimizer keeps working and updates the moved layer.
TEST(Adam, ALayerMovedWithItsStorageKeepsTraining) {
  lora::cpu::Context ctx;
  lora::Config config;
  config.r = 2;
  Matrix<float> W(8, 6);
  std::vector<lora::cpu::Linear<float>> layers;
  layers.emplace_back(ctx, W.view(), lora::MatrixView<const float>{}, config);
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  adam.add_group(layers[0].parameters());
  const lora::MatrixView<float> grad = layers[0].lora_A().grad;
  std::fill(grad.data, grad.data + grad.size(), 0.5f);
  const std::vector<float> A0(layers[0].A().data, layers[0].A().data + layers[0].A().size());
  layers.reserve(layers.capacity() + 8);  // moves the layer; its A and B stay where they were
  adam.step();
  EXPECT_EQ(adam.step_count(), 1);
  // Adam's first step moves each element by lr against the sign of g.
  for (std::int64_t i = 0; i < layers[0].A().size(); ++i)
    EXPECT_NEAR(layers[0].A().data[i], A0[static_cast<std::size_t>(i)] - 1e-3f, 1e-6f) << i;
}

TEST(Adam, AGroupThatDoesNotExistIsALoraError) {
  lora::cpu::Context ctx;
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  Matrix<float> a(2, 2), ga(2, 2), b(2, 2), gb(2, 2);
  adam.add_group({{a.view(), ga.view(), "a"}});
  adam.add_group({{b.view(), gb.view(), "b"}}, 5e-3);
  EXPECT_EQ(adam.lr(1), 5e-3);
  expect_error([&] { adam.lr(2); }, {"lr", "group 2", "2 groups"});
  expect_error([&] { adam.set_lr(7, 1e-3); }, {"set_lr", "group 7", "2 groups"});
  EXPECT_EQ(adam.lr(0), 1e-3);
}

// ---- Non-finite gradients ---------------------------------------------------

// Gradients a = [1, +-inf or nan], b = [3, -4]; what torch.nn.utils.clip_grad_norm_
// (torch 1.13) does with max_norm = 1, read off a run of it:
//   inf: returns inf; coef = 1 / (inf + 1e-6) = 0, so a = [0, nan], b = [0, -0]
//   nan: returns nan; coef = nan, so every gradient is nan
// and with error_if_nonfinite=True it raises and leaves the gradients alone.
TEST(Adam, ClipGradNormPropagatesANonFiniteNormAsPyTorchDoes) {
  lora::cpu::Context ctx;
  for (const double bad : {kInf, -kInf, kNaN}) {
    SCOPED_TRACE("a[1] = " + std::to_string(bad));
    lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
    Matrix<float> a(1, 2), ga(1, 2), b(1, 2), gb(1, 2);
    adam.add_group({{a.view(), ga.view(), "a"}});
    adam.add_group({{b.view(), gb.view(), "b"}}, 1e-2);
    const auto reset = [&] {
      ga.data()[0] = 1.0f;
      ga.data()[1] = static_cast<float>(bad);
      gb.data()[0] = 3.0f;
      gb.data()[1] = -4.0f;
    };
    reset();
    const double norm = adam.clip_grad_norm(1.0);
    if (std::isnan(bad)) {
      EXPECT_TRUE(std::isnan(norm));
      for (float v : {ga.data()[0], ga.data()[1], gb.data()[0], gb.data()[1]}) EXPECT_TRUE(std::isnan(v)) << v;
    } else {
      EXPECT_EQ(norm, kInf);
      EXPECT_EQ(ga.data()[0], 0.0f);
      EXPECT_TRUE(std::isnan(ga.data()[1])) << ga.data()[1];  // inf * 0; the bug made it 0
      EXPECT_EQ(gb.data()[0], 0.0f);
      EXPECT_EQ(gb.data()[1], 0.0f);
      EXPECT_FALSE(std::signbit(gb.data()[0]));
      EXPECT_TRUE(std::signbit(gb.data()[1]));  // -4 * 0 = -0, as PyTorch's multiply gives
    }

    reset();
    expect_error([&] { adam.clip_grad_norm(1.0, /*error_if_nonfinite=*/true); },
                 {"clip_grad_norm", "non-finite", "\"a\"", "group 0"});
    const float bad_f = static_cast<float>(bad);
    EXPECT_EQ(ga.data()[0], 1.0f);
    EXPECT_EQ(std::memcmp(&ga.data()[1], &bad_f, sizeof bad_f), 0);
    EXPECT_EQ(gb.data()[0], 3.0f);
    EXPECT_EQ(gb.data()[1], -4.0f);
  }
  // A finite norm passes error_if_nonfinite and clips as before.
  lora::cpu::Adam<double> adam(ctx, lora::AdamOptions{});
  Matrix<double> p(1, 2), g(1, 2);
  g.data()[0] = 3.0;
  g.data()[1] = -4.0;
  adam.add_group({{p.view(), g.view(), "p"}});
  EXPECT_EQ(adam.clip_grad_norm(1.0, true), 5.0);
  EXPECT_NEAR(g.data()[0], 3.0 / (5.0 + 1e-6), 1e-15);
}

// Off by default: a non-finite gradient propagates into the parameters, as in
// PyTorch. With skip_nonfinite_steps the step is skipped, as a mixed-precision
// trainer (torch.cuda.amp.GradScaler) skips it: parameters, moments and step
// count stay bit for bit, skipped_steps() counts it, and the next finite step is
// the one a run without the bad step would take.
TEST(Adam, SkipNonfiniteStepsLeavesEverythingAsItWasAndCountsTheSkip) {
  lora::cpu::Context ctx;
  const auto fill = [](Matrix<float>& m, float v) { std::fill(m.data(), m.data() + m.size(), v); };
  Matrix<float> p(2, 3), g(2, 3), q(1, 4), gq(1, 4);
  fill_away_from_zero(p, 5);
  fill_away_from_zero(q, 6);

  // Default: propagate.
  {
    Matrix<float> p1 = p.clone(), g1(2, 3);
    lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
    adam.add_group({{p1.view(), g1.view(), "p"}});
    fill(g1, 0.25f);
    g1.data()[4] = static_cast<float>(kInf);
    EXPECT_TRUE(adam.step());
    EXPECT_EQ(adam.step_count(), 1);
    EXPECT_EQ(adam.skipped_steps(), 0);
    EXPECT_TRUE(std::isnan(p1.data()[4]));  // m / sqrt(v) = inf / inf
    EXPECT_NEAR(p1.data()[0], p.data()[0] - 1e-3f, 1e-6f);
  }

  lora::AdamOptions options;
  options.skip_nonfinite_steps = true;
  lora::cpu::Adam<float> adam(ctx, options);
  adam.add_group({{p.view(), g.view(), "p"}});
  adam.add_group({{q.view(), gq.view(), "q"}}, 1e-2);
  fill(g, 0.25f);
  fill(gq, -0.5f);
  ASSERT_TRUE(adam.step());  // one ordinary step, so the moments are not zero
  const std::vector<float> p1(p.data(), p.data() + p.size()), q1(q.data(), q.data() + q.size());
  std::vector<float> moments1;
  for (const auto& m : adam.moments()) {
    moments1.insert(moments1.end(), m.m.data, m.m.data + m.m.size());
    moments1.insert(moments1.end(), m.v.data, m.v.data + m.v.size());
  }
  const auto unchanged = [&] {
    std::vector<float> moments;
    for (const auto& m : adam.moments()) {
      moments.insert(moments.end(), m.m.data, m.m.data + m.m.size());
      moments.insert(moments.end(), m.v.data, m.v.data + m.v.size());
    }
    return std::memcmp(p.data(), p1.data(), p.bytes()) == 0 && std::memcmp(q.data(), q1.data(), q.bytes()) == 0 &&
           moments == moments1;
  };
  int skipped = 0;
  for (const double bad : {kInf, -kInf, kNaN}) {
    fill(g, 0.125f);
    gq.data()[2] = static_cast<float>(bad);  // one element of the second tensor
    EXPECT_FALSE(adam.step());
    ++skipped;
    EXPECT_TRUE(unchanged()) << bad;
    EXPECT_EQ(adam.step_count(), 1);
    EXPECT_EQ(adam.skipped_steps(), skipped);
  }
  // The next finite step is step 2 of a run that never saw the bad gradients.
  fill(g, 0.125f);
  fill(gq, 0.75f);
  EXPECT_TRUE(adam.step());
  EXPECT_EQ(adam.step_count(), 2);
  EXPECT_EQ(adam.skipped_steps(), 3);

  Matrix<float> rp(2, 3), rg(2, 3), rq(1, 4), rgq(1, 4);
  fill_away_from_zero(rp, 5);
  fill_away_from_zero(rq, 6);
  lora::cpu::Adam<float> reference(ctx, lora::AdamOptions{});
  reference.add_group({{rp.view(), rg.view(), "p"}});
  reference.add_group({{rq.view(), rgq.view(), "q"}}, 1e-2);
  fill(rg, 0.25f);
  fill(rgq, -0.5f);
  reference.step();
  fill(rg, 0.125f);
  fill(rgq, 0.75f);
  reference.step();
  EXPECT_EQ(std::memcmp(p.data(), rp.data(), p.bytes()), 0);
  EXPECT_EQ(std::memcmp(q.data(), rq.data(), q.bytes()), 0);
}

}  // namespace

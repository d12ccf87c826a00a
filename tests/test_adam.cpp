// lora::Adam against PyTorch's documented update rule, implemented here in
// double and independently of the library, step by step; per-group learning
// rates (LoRA+), zero_grad, global-norm clipping and the state it allocates.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "lora/lora.hpp"

namespace {

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

}  // namespace

// fit_lowrank: a frozen layer learns a hidden rank-r change from data alone.
//
// The data come from a layer whose weight is W + dW, dW of rank r; the model
// is the frozen W plus a LoRA adapter, y = x W^T + s (x A^T) B^T. Adam trains A
// and B on the mean squared error until s B A stands in for dW. The program
// prints what it trains and what that costs next to full fine-tuning, the loss
// as it falls, and how close s B A came to dW. It exits non-zero unless the
// held-out loss falls at least 100x and W is left bit for bit as it was.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "lora/lora.hpp"

namespace {

using lora::cpu::Matrix;
using Backend = lora::cpu::Backend;

constexpr std::int64_t kDim = 256;      // d_in = d_out
constexpr int kHiddenRank = 4;          // rank of dW
constexpr std::int64_t kTrainRows = 2048, kTestRows = 512, kBatch = 128;
constexpr int kSteps = 400, kPrintEvery = 40;
constexpr double kRequiredDrop = 100.0;

// Fills m with sigma * N(0, 1) from the library's counter-based generator
// (one stream per tensor), so every run and every platform sees the same data.
void fill_normal(Matrix<float>& m, double sigma, std::uint32_t stream) {
  for (std::int64_t i = 0; i < m.size(); ++i)
    m.data()[i] = static_cast<float>(sigma * lora::standard_normal(2024, stream, 0, static_cast<std::uint64_t>(i)));
}

// mean over elements of (a - b)^2
double mse(const Matrix<float>& a, const Matrix<float>& b) {
  double sum = 0.0;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a.data()[i]) - b.data()[i];
    sum += d * d;
  }
  return sum / static_cast<double>(a.size());
}

// ||m||_F
double frobenius(const Matrix<float>& m) {
  double sum = 0.0;
  for (std::int64_t i = 0; i < m.size(); ++i) sum += static_cast<double>(m.data()[i]) * m.data()[i];
  return std::sqrt(sum);
}

}  // namespace

int main() try {
  lora::cpu::Context ctx;
  const auto start = std::chrono::steady_clock::now();

  // 1. The frozen layer W (d_out x d_in, rows of unit length on average) and
  //    the hidden change dW = U V of rank r, about half as large as W.
  Matrix<float> W(kDim, kDim), U(kDim, kHiddenRank), V(kHiddenRank, kDim), dW(kDim, kDim);
  fill_normal(W, 1.0 / std::sqrt(double(kDim)), 1);
  fill_normal(U, 1.0, 2);
  fill_normal(V, 0.5 / std::sqrt(double(kHiddenRank * kDim)), 3);
  Backend::gemm<float, float>(ctx, lora::Op::N, lora::Op::N, 1.0, U.view(), V.view(), 0.0, dW.view());
  const Matrix<float> W_before = W.clone();
  std::printf("1. frozen layer W: %lld x %lld; hidden change dW of rank %d, ||dW|| / ||W|| = %.2f\n",
              static_cast<long long>(kDim), static_cast<long long>(kDim), kHiddenRank,
              frobenius(dW) / frobenius(W));

  // 2. Data from the changed layer: y = x (W + dW)^T, x ~ N(0, 1).
  //    Training and held-out rows come from different streams.
  Matrix<float> W_target = W.clone();
  Backend::add_scaled<float, float>(ctx, 1.0, dW.view(), W_target.view());
  Matrix<float> x_train(kTrainRows, kDim), y_train(kTrainRows, kDim), x_test(kTestRows, kDim), y_test(kTestRows, kDim);
  fill_normal(x_train, 1.0, 4);
  fill_normal(x_test, 1.0, 5);
  Backend::gemm<float, float>(ctx, lora::Op::N, lora::Op::T, 1.0, x_train.view(), W_target.view(), 0.0, y_train.view());
  Backend::gemm<float, float>(ctx, lora::Op::N, lora::Op::T, 1.0, x_test.view(), W_target.view(), 0.0, y_test.view());
  std::printf("2. data: %lld training rows, %lld held-out rows, y = x (W + dW)^T\n",
              static_cast<long long>(kTrainRows), static_cast<long long>(kTestRows));

  // 3. The adapter: A (r x d_in) kaiming-uniform, B (d_out x r) zero, so it
  //    starts as the frozen layer exactly. W is borrowed, never trained.
  lora::Config config;
  config.r = kHiddenRank;
  config.alpha = 2.0 * kHiddenRank;  // s = alpha / r = 2
  config.seed = 7;
  lora::cpu::Linear<float> layer(ctx, W.view(), {}, config);
  const std::int64_t trainable = layer.trainable_parameters(), full = layer.frozen_parameters();
  std::printf("3. adapter: r = %d, scale %.1f: %lld trainable parameters (A %lld x %lld, B %lld x %lld) = %.2f %% of %lld\n",
              layer.rank(), layer.scale(), static_cast<long long>(trainable), static_cast<long long>(layer.A().rows),
              static_cast<long long>(layer.A().cols), static_cast<long long>(layer.B().rows),
              static_cast<long long>(layer.B().cols), 100.0 * double(trainable) / double(full),
              static_cast<long long>(full));

  // 4. Adam over A and B only: two moments per trainable element. Its rate
  //    decays from lr to 0 along half a cosine: a constant lr leaves Adam
  //    circling the optimum at a distance ~ lr.
  lora::AdamOptions options;
  options.lr = 1e-2;
  lora::cpu::Adam<float> adam(ctx, options);
  adam.add_group(layer.parameters());
  lora::LrSchedule schedule;
  schedule.type = lora::LrScheduleType::cosine;
  schedule.total_steps = kSteps;
  const lora::LrScheduler scheduler(schedule, adam);
  const std::size_t full_state = 2 * sizeof(float) * static_cast<std::size_t>(full);
  std::printf("4. Adam state: %zu bytes; full fine-tuning of W would need 8 x %lld = %zu bytes (%.0fx more)\n",
              adam.state_bytes(), static_cast<long long>(full), full_state,
              double(full_state) / double(adam.state_bytes()));

  // 5. Train on minibatches: L = mean (y_hat - y)^2, dL/dy_hat = 2 (y_hat - y) / (N d_out).
  //    The held-out loss is measured in eval mode (no cache, no dropout).
  Matrix<float> y_hat(kBatch, kDim), dL_dy(kBatch, kDim), y_test_hat(kTestRows, kDim);
  auto test_loss = [&] {
    layer.forward(x_test.view(), y_test_hat.view(), lora::Mode::eval);
    return mse(y_test_hat, y_test);
  };
  const double initial = test_loss();
  std::printf("5. training, batch %lld, Adam lr %.0e with cosine decay; held-out MSE:\n", static_cast<long long>(kBatch),
              options.lr);
  std::printf("   step %4d  loss %.3e\n", 0, initial);
  double final_loss = initial;
  for (int step = 1; step <= kSteps; ++step) {
    const std::int64_t first = (step - 1) * kBatch % kTrainRows;
    const auto x = lora::MatrixView<const float>(x_train.view()).row_block(first, kBatch);
    const auto y = lora::MatrixView<const float>(y_train.view()).row_block(first, kBatch);
    layer.forward(x, y_hat.view(), lora::Mode::train);
    const float g = 2.0f / static_cast<float>(kBatch * kDim);
    for (std::int64_t i = 0; i < kBatch; ++i)
      for (std::int64_t j = 0; j < kDim; ++j) dL_dy(i, j) = g * (y_hat(i, j) - y(i, j));
    layer.backward(x, dL_dy.view(), {});  // no dL_dx: x is the input data
    scheduler.apply(adam);  // lr 0.5 (1 + cos(pi (step - 1) / kSteps))
    adam.step();
    if (step % kPrintEvery == 0) {
      final_loss = test_loss();
      std::printf("   step %4d  loss %.3e\n", step, final_loss);
    }
  }

  // 6. What it achieved: the loss ratio, s B A against dW, W untouched.
  Matrix<float> learned(kDim, kDim);
  Backend::gemm<float, float>(ctx, lora::Op::N, lora::Op::N, layer.scale(), layer.B(), layer.A(), 0.0, learned.view());
  Backend::add_scaled<float, float>(ctx, -1.0, dW.view(), learned.view());
  const double rel_error = frobenius(learned) / frobenius(dW);
  const double drop = initial / final_loss;
  const bool W_unchanged = std::memcmp(W.data(), W_before.data(), W.bytes()) == 0;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("6. held-out loss %.3e -> %.3e: %.2gx lower (required: %.0fx)\n", initial, final_loss, drop,
              kRequiredDrop);
  std::printf("   ||s B A - dW|| / ||dW|| = %.2e\n", rel_error);
  std::printf("   W bit-identical to before training: %s\n", W_unchanged ? "yes" : "NO");
  std::printf("   %d steps in %.2f s\n", kSteps, seconds);

  if (drop < kRequiredDrop || !W_unchanged) {
    std::fprintf(stderr, "FAILED: %s\n", !W_unchanged ? "W changed during training" : "the loss fell less than 100x");
    return 1;
  }
  return 0;
} catch (const lora::Error& e) {
  std::fprintf(stderr, "lora::Error: %s\n", e.what());
  return 1;
}

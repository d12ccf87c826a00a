// A user's program: one LoRA layer, one training step, and a check that the
// frozen weight stayed frozen. Exits non-zero on any failure.
#include <lora/lora.hpp>

#include <cstdio>
#include <vector>

int main() {
  lora::cpu::Context ctx;
  const int n = 4, d_in = 6, d_out = 5;
  std::vector<float> W(d_out * d_in), x(n * d_in), y(n * d_out), dL_dy(n * d_out, 1.0f);
  for (std::size_t i = 0; i < W.size(); ++i) W[i] = 0.01f * static_cast<float>(i);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
  const std::vector<float> W_before = W;

  lora::Config config;
  config.r = 2;
  config.alpha = 4;
  lora::cpu::Linear<float> layer(ctx, {W.data(), d_out, d_in}, {}, config);
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions::adamw(1e-2));
  adam.add_group(layer.parameters());

  layer.forward({x.data(), n, d_in}, {y.data(), n, d_out});
  layer.backward({x.data(), n, d_in}, {dL_dy.data(), n, d_out}, {});
  adam.step();

  const bool frozen = W == W_before;
  const bool b_moved = layer.B()(0, 0) != 0.0f;
  std::printf("lora %s consumer: trainable %lld, Adam state %zu bytes, W frozen: %s, B moved: %s\n", lora::kVersion,
              static_cast<long long>(layer.trainable_parameters()), adam.state_bytes(), frozen ? "yes" : "no",
              b_moved ? "yes" : "no");
  return frozen && b_moved && adam.state_bytes() == 8u * 22u ? 0 : 1;
}

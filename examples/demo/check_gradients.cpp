// Checks the demo model's backward against central differences, in double:
// every tensor of the base (full training) and every A and B of an adapter
// whose B is non-zero, on a 2-block model with odd sizes. Exits non-zero when
// a relative error exceeds 1e-6.
#include <cmath>
#include <cstdio>
#include <vector>

#include "model.hpp"

namespace {

using Model = demo::TinyLM<double>;

// max |analytic - numeric| / max(max |numeric|, 1e-6) over the elements of one tensor.
template <class Loss>
double check(const char* what, double* values, const double* analytic, std::int64_t n, Loss loss) {
  constexpr double kH = 1e-5;
  double max_diff = 0.0, max_ref = 1e-6;
  for (std::int64_t k = 0; k < n; ++k) {
    const double saved = values[k];
    values[k] = saved + kH;
    const double up = loss();
    values[k] = saved - kH;
    const double down = loss();
    values[k] = saved;
    const double numeric = (up - down) / (2 * kH);
    max_diff = std::max(max_diff, std::fabs(numeric - analytic[k]));
    max_ref = std::max(max_ref, std::fabs(numeric));
  }
  const double rel = max_diff / max_ref;
  std::printf("  %-34s %6lld elements  rel. error %.2e%s\n", what, static_cast<long long>(n), rel,
              rel <= 1e-6 ? "" : "  <-- FAIL");
  return rel;
}

}  // namespace

int main() {
  lora::cpu::Context ctx;
  demo::ModelConfig config;
  config.vocab = 7;
  config.d_model = 10;
  config.heads = 2;
  config.layers = 2;
  config.context = 5;
  Model model(ctx, config, 11);
  // Larger weights than the 0.02 init, so that every path carries signal.
  for (auto& m : model.tensors())
    for (std::int64_t k = 0; k < m.size(); ++k)
      m.data()[k] +=
          0.3 * lora::standard_normal(5, 0, 0, static_cast<std::uint64_t>(&m - &model.tensors()[0]) * 1000 + k);

  const int batch = 2, t = 5;
  const std::vector<int> tokens = {1, 4, 0, 6, 2, 3, 3, 5, 1, 0};
  const std::vector<int> targets = {4, 0, 6, 2, 3, 3, 5, 1, 0, 2};
  double worst = 0.0;

  std::printf("base tensors (full training):\n");
  std::vector<Model::Matrix> grads;
  for (const auto& m : model.tensors()) grads.emplace_back(m.rows(), m.cols());
  model.forward(tokens.data(), batch, t, nullptr, lora::Mode::train);
  model.backward(targets.data(), nullptr, &grads);
  auto base_loss = [&] {
    model.forward(tokens.data(), batch, t, nullptr, lora::Mode::eval);
    return model.loss(targets.data());
  };
  for (std::size_t i = 0; i < grads.size(); ++i)
    worst = std::max(worst, check(model.specs()[i].name.c_str(), model.tensors()[i].data(), grads[i].data(),
                                  grads[i].size(), base_loss));

  std::printf("adapter (r = 3, B non-zero):\n");
  lora::Config lc;
  lc.r = 3;
  lc.alpha = 6;
  lc.seed = 3;
  demo::Adapter<double> adapter = model.make_adapter("check", lc);
  for (auto& layer : adapter.layers) {
    auto B = layer.lora_B().value;
    for (std::int64_t k = 0; k < B.size(); ++k) B.data[k] = 0.2 * lora::standard_normal(9, layer.stream(), 0, k);
  }
  model.forward(tokens.data(), batch, t, &adapter, lora::Mode::train);
  model.backward(targets.data(), &adapter, nullptr);
  auto adapter_loss = [&] {
    model.forward(tokens.data(), batch, t, &adapter, lora::Mode::eval);
    return model.loss(targets.data());
  };
  for (std::size_t i = 0; i < adapter.layers.size(); ++i) {
    auto& layer = adapter.layers[i];
    const std::string a = model.linear_names()[i] + ".lora_A", b = model.linear_names()[i] + ".lora_B";
    // Copy the gradients first: the numeric loss runs forward again.
    const std::vector<double> dA(layer.dL_dA().data, layer.dL_dA().data + layer.dL_dA().size());
    const std::vector<double> dB(layer.dL_dB().data, layer.dL_dB().data + layer.dL_dB().size());
    worst = std::max(worst,
                     check(a.c_str(), layer.lora_A().value.data, dA.data(), layer.lora_A().value.size(), adapter_loss));
    worst = std::max(worst,
                     check(b.c_str(), layer.lora_B().value.data, dB.data(), layer.lora_B().value.size(), adapter_loss));
  }
  std::printf("worst relative error %.2e (limit 1e-6): %s\n", worst, worst <= 1e-6 ? "PASS" : "FAIL");
  return worst <= 1e-6 ? 0 : 1;
}

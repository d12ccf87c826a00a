// Checks the demo model's backward against central differences, in double:
// every tensor of the base (full training) and every A and B of an adapter
// whose B is non-zero, on a 2-block model with odd sizes (grouped-query
// attention: 4 query heads on 2 key/value heads). Exits non-zero when
// a relative error exceeds 1e-6.
#include <cmath>
#include <cstdio>
#include <vector>

#include "model.hpp"

namespace {

using Model = demo::LlamaLM<double>;

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
  std::printf("  %-60s %6lld elements  rel. error %.2e%s\n", what, static_cast<long long>(n), rel,
              rel <= 1e-6 ? "" : "  <-- FAIL");
  return rel;
}

}  // namespace

int main() {
  lora::cpu::Context ctx;
  demo::ModelConfig config;
  config.vocab = 7;
  config.d_model = 16;  // head size 4: RoPE turns 2 pairs per head
  config.heads = 4;
  config.kv_heads = 2;
  config.layers = 2;
  config.d_ff = 9;
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
  model.forward(tokens.data(), batch, t, lora::Mode::train);
  model.backward(targets.data(), &grads);
  auto loss = [&] {
    model.forward(tokens.data(), batch, t, lora::Mode::eval);
    return model.loss(targets.data());
  };
  for (std::size_t i = 0; i < grads.size(); ++i)
    worst = std::max(worst, check(model.specs()[i].name.c_str(), model.tensors()[i].data(), grads[i].data(),
                                  grads[i].size(), loss));

  std::printf("adapter (r = 3 on every linear layer, B non-zero):\n");
  lora::io::PeftConfig peft;
  peft.r = 3;
  peft.lora_alpha = 6;
  peft.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"};
  Model::Lora& lora_model = model.lora();
  lora_model.add_adapter("check", peft, /*seed=*/3);  // the first adapter: active
  for (const std::string& module : lora_model.modules()) {
    auto& adapter = lora_model.module(module).get("check");
    auto B = adapter.lora_B().value;
    for (std::int64_t k = 0; k < B.size(); ++k) B.data[k] = 0.2 * lora::standard_normal(9, adapter.stream(), 0, k);
  }
  model.forward(tokens.data(), batch, t, lora::Mode::train);
  model.backward(targets.data());
  for (const auto& p : lora_model.parameters()) {
    // Copy the gradient first: the numeric loss runs forward again.
    const std::vector<double> analytic(p.grad.data, p.grad.data + p.grad.size());
    worst = std::max(worst, check(p.name.c_str(), p.value.data, analytic.data(), p.value.size(), loss));
  }
  std::printf("worst relative error %.2e (limit 1e-6): %s\n", worst, worst <= 1e-6 ? "PASS" : "FAIL");
  return worst <= 1e-6 ? 0 : 1;
}

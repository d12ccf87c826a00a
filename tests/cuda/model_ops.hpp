// The model's own operations, written once against the Backend interface as
// backend_ops.hpp's: a Llama-like block adapted by a PeftConfig
// (target_modules, rank_pattern, alpha_pattern, dropout), every adapted
// module's training forward and backward, parameters() under PEFT's names,
// one AdamW step over them, the memory report with the optimizer, and merge.
// Host code: it includes <lora/model.hpp> (JSON, RE2), which nvcc cannot
// compile, so it runs on the GPU from a host .cpp (test_cuda_model_host.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/backend_ops.hpp"
#include "lora/model.hpp"

namespace lora::backend_ops {

// Module names in model order; the adapter targets q_proj, v_proj and down_proj.
inline const std::vector<std::string>& model_modules() {
  static const std::vector<std::string> names = {
      "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
      "model.layers.0.mlp.down_proj", "lm_head"};
  return names;
}
inline io::PeftConfig model_config() {
  io::PeftConfig c;
  c.r = 4;
  c.lora_alpha = 8.0;
  c.lora_dropout = 0.1;
  c.target_modules = {"q_proj", "v_proj", "down_proj"};
  c.rank_pattern = {{"v_proj", 6}};
  c.alpha_pattern = {{"down_proj", 3.0}};
  return c;
}

struct ModelRun {
  Outputs outputs;
  std::vector<std::string> selected;         // what add_adapter attached to
  std::vector<std::string> parameter_names;  // parameters(), in order
};

// q_proj, k_proj, v_proj, lm_head: kOut x kIn; down_proj: kIn x kOut (its x
// is dL_dy's shape and its dL/dy is x's). lm_head is read-only (not adapted:
// merging leaves it alone). Every B is set to values that depend only on its
// position, the same on every backend.
template <class T, class Backend>
ModelRun run_model(typename Backend::Context& ctx, const OpInputs& in) {
  using Space = typename Backend::Space;
  using MatT = typename Side<T, Backend>::template Matrix<T>;
  const Side<T, Backend> side{ctx};
  std::vector<MatT> W;
  for (const std::string& m : model_modules()) {
    const bool down = m.find("down_proj") != std::string::npos;
    W.push_back(side.make(in.W, down ? kIn : kOut, down ? kOut : kIn));
  }
  const MatT x = side.make(in.x, kRows, kIn), dL_dy = side.make(in.dL_dy, kRows, kOut);

  Model<T, Backend> model(ctx);
  for (std::size_t k = 0; k < W.size(); ++k) {
    if (model_modules()[k] == "lm_head") {
      model.add_base(model_modules()[k], MatrixView<const T, Space>(W[k].view()));
    } else {
      model.add_base(model_modules()[k], W[k].view());
    }
  }
  ModelRun run;
  run.selected = model.add_adapter("default", model_config(), 42);

  auto params = model.parameters();
  for (std::size_t k = 0; k < params.size(); ++k) {
    run.parameter_names.push_back(params[k].name);
    if (params[k].name.find(".lora_B.") == std::string::npos) continue;
    std::vector<float> B(static_cast<std::size_t>(params[k].value.rows * params[k].value.cols));
    for (std::size_t i = 0; i < B.size(); ++i) B[i] = 0.2f * static_cast<float>(std::sin(0.37 * i + k));
    side.put(B, params[k].value);
  }

  Outputs& out = run.outputs;
  for (const std::string& m : run.selected) {
    const bool down = m.find("down_proj") != std::string::npos;
    const MatT& xm = down ? dL_dy : x;
    const MatT& dym = down ? x : dL_dy;
    auto& set = model.module(m);
    MatT y(kRows, set.d_out()), dL_dx(kRows, set.d_in());
    typename AdapterSet<T, Backend>::ForwardState state;
    side.poison(y.view());
    set.forward(xm.view(), y.view(), state);
    side.poison(dL_dx.view());
    side.poison_grads(set.get("default"));
    set.backward(state, xm.view(), dym.view(), dL_dx.view());
    out.push_back({m + " y", side.get(y)});
    out.push_back({m + " dL_dx", side.get(dL_dx)});
    side.poison(y.view());
    set.inference(xm.view(), y.view());
    out.push_back({m + " y (inference)", side.get(y)});
  }
  for (const auto& p : params) out.push_back({p.name + " grad", side.get(p.grad)});

  Adam<typename Model<T, Backend>::Param, Backend> adam(ctx, AdamOptions::adamw(1e-3, 0.01));
  adam.add_group(params);
  adam.step();
  for (const auto& p : params) out.push_back({p.name + " after step", side.get(p.value)});
  out.push_back({"optimizer bytes", {static_cast<float>(model.memory(adam).optimizer_bytes)}});
  out.push_back({"8 x trainable parameters", {static_cast<float>(8 * model.trainable_parameters())}});

  // q_proj's output after the step, unmerged and merged.
  auto& q_proj = model.module(model_modules()[0]);
  MatT y(kRows, kOut);
  side.poison(y.view());
  q_proj.inference(x.view(), y.view());
  out.push_back({"q_proj y (trained)", side.get(y)});
  model.merge();
  for (std::size_t k = 0; k < W.size(); ++k) out.push_back({model_modules()[k] + " W merged", side.get(W[k])});
  side.poison(y.view());
  q_proj.inference(x.view(), y.view());
  out.push_back({"q_proj y (merged)", side.get(y)});
  return run;
}

}  // namespace lora::backend_ops

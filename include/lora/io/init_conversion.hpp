// A PiSSA or OLoRA adapter as an ordinary LoRA for the original weights (PEFT's
// save_pretrained(..., path_initial_model_for_weight_conversion=...)).
//
// Such an adapter was trained on the residual base W_res = W - s B0 A0 (A0, B0:
// its initial values). Its update of the original W is
//   W_res + s B A - W = s (B A - B0 A0) = s' B' A'
// with the rank-2r pair
//   A' = [A; A0]    (2r x d_in: A's rows, then A0's)
//   B' = [B, -B0]   (d_out x 2r: B's columns, then -B0's)
// and s' = s, which the config keeps by doubling r (and every rank_pattern
// value) and multiplying lora_alpha (and every alpha_pattern value) by 2, or by
// sqrt(2) with use_rslora (s = alpha / sqrt(r)). init_lora_weights becomes
// true: the result is a plain LoRA that PEFT, vLLM or llama.cpp apply to the
// untouched W. (PEFT refuses use_rslora together with rank_pattern or
// alpha_pattern here; the rule above keeps s for those too, so this writes them.)
#pragma once

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/io/peft.hpp"

namespace lora::io {

namespace detail {
// The adapter of a layer (lora::Linear) or the adapter itself.
template <class T, class Backend>
const LoraAdapter<T, Backend>& adapter_part(const Linear<T, Backend>& layer) {
  return layer.adapter();
}
template <class T, class Backend>
const LoraAdapter<T, Backend>& adapter_part(const LoraAdapter<T, Backend>& adapter) {
  return adapter;
}
}  // namespace detail

// The config of the converted adapter: r, rank_pattern doubled; lora_alpha,
// alpha_pattern times 2 (sqrt(2) with use_rslora); init_lora_weights true.
inline PeftConfig converted_config(PeftConfig config) {
  const double factor = config.use_rslora ? std::sqrt(2.0) : 2.0;
  LORA_CHECK(config.r <= (1 << 29), "converted_to_lora: r = " << config.r << " cannot double within [1, 2^30]");
  config.r *= 2;
  config.lora_alpha *= factor;
  for (auto& [pattern, r] : config.rank_pattern) {
    LORA_CHECK(r <= (1 << 29), "converted_to_lora: rank_pattern \"" << pattern << "\" = " << r
                                                                    << " cannot double within [1, 2^30]");
    r *= 2;
  }
  for (auto& [pattern, alpha] : config.alpha_pattern) alpha *= factor;
  config.init_lora_weights = true;
  return config;
}

// `trained` (a PiSSA / OLoRA adapter after training) as a rank-2r LoRA for
// the original W, given `initial` (the same adapter's initial A0 and B0: the
// same modules, shapes, ranks and scales). Tensors that are not LoRA pairs
// (other_tensors) are kept from `trained`. Everything is checked before
// anything is built.
inline Adapter converted_to_lora(const Adapter& trained, const Adapter& initial) {
  for (const auto& [name, m] : trained.modules) {
    const auto it = initial.modules.find(name);
    LORA_CHECK(it != initial.modules.end(), "converted_to_lora: module \"" << name << "\" of the trained adapter "
                                                                           << "is not in the initial one");
    const AdapterModule& m0 = it->second;
    LORA_CHECK(m0.A.rows() == m.A.rows() && m0.A.cols() == m.A.cols() && m0.B.rows() == m.B.rows() &&
                   m0.B.cols() == m.B.cols() && m0.r == m.r,
               "converted_to_lora: module \"" << name << "\": the trained adapter has A [" << m.A.rows() << ", "
                                              << m.A.cols() << "], B [" << m.B.rows() << ", " << m.B.cols()
                                              << "], the initial one A [" << m0.A.rows() << ", " << m0.A.cols()
                                              << "], B [" << m0.B.rows() << ", " << m0.B.cols() << "]");
    LORA_CHECK(std::fabs(m0.scale - m.scale) <= 1e-12 * std::fabs(m.scale),
               "converted_to_lora: module \"" << name << "\": scale " << m.scale << " trained, " << m0.scale
                                              << " initial; both must be the same adapter's");
  }
  LORA_CHECK(initial.modules.size() == trained.modules.size(),
             "converted_to_lora: the initial adapter has " << initial.modules.size() << " modules, the trained one "
                                                           << trained.modules.size());
  Adapter out;
  out.config = converted_config(trained.config);
  out.other_tensors = trained.other_tensors;
  out.file_metadata = trained.file_metadata;
  const PeftConfig::Resolver resolver = out.config.resolver();
  for (const auto& [name, m] : trained.modules) {
    const AdapterModule& m0 = initial.modules.at(name);
    AdapterModule c;
    c.r = 2 * m.r;
    c.alpha = resolver.alpha_for(name);
    c.scale = resolver.scale_for(name);
    LORA_CHECK(resolver.rank_for(name) == c.r && std::fabs(c.scale - m.scale) <= 1e-12 * std::fabs(m.scale),
               "converted_to_lora: module \"" << name << "\": r " << m.r << ", scale " << m.scale
                                              << " in the trained adapter's config do not match its tensors (the "
                                              << "converted config gives r " << resolver.rank_for(name) << ", scale "
                                              << c.scale << ")");
    c.stored_dtype = m.stored_dtype;
    const std::int64_t r = m.r, d_in = m.d_in(), d_out = m.d_out();
    c.A = cpu::Matrix<float>(2 * r, d_in);  // [A; A0]
    c.B = cpu::Matrix<float>(d_out, 2 * r);  // [B, -B0]
    for (std::int64_t i = 0; i < r; ++i)
      for (std::int64_t j = 0; j < d_in; ++j) {
        c.A(i, j) = m.A(i, j);
        c.A(r + i, j) = m0.A(i, j);
      }
    for (std::int64_t i = 0; i < d_out; ++i)
      for (std::int64_t j = 0; j < r; ++j) {
        c.B(i, j) = m.B(i, j);
        c.B(i, r + j) = -m0.B(i, j);
      }
    out.modules.emplace(name, std::move(c));
  }
  return out;
}

// The initial A0 and B0 of layers (lora::Linear) or adapters (lora::LoraAdapter)
// that PiSSA / OLoRA initialised, as an Adapter shaped as adapter_from_layers /
// adapter_from_adapters gives the trained ones (same config rules), for
// converted_to_lora.
template <class Layer>
Adapter initial_adapter_of(const std::vector<Named<Layer>>& layers, PeftConfig config = {}) {
  Adapter out = detail::adapter_of(layers, std::move(config));
  for (const Named<Layer>& l : layers) {
    const auto& adapter = detail::adapter_part(*l.layer);
    LORA_CHECK(adapter.has_initial(), "initial_adapter_of: \"" << l.name << "\" has no initial values (Config.init = "
                                                               << to_string(adapter.config().init)
                                                               << "); only pissa and olora adapters start from W, and "
                                                               << "any other is already an ordinary LoRA");
    AdapterModule& m = out.modules.at(l.name);
    auto to_float = [](auto view) {  // as module_from rounds A and B
      cpu::Matrix<float> f(view.rows, view.cols);
      for (std::int64_t i = 0; i < view.rows; ++i)
        for (std::int64_t j = 0; j < view.cols; ++j) f(i, j) = double_to_float(static_cast<double>(view(i, j)));
      return f;
    };
    m.A = to_float(adapter.initial_A());
    m.B = to_float(adapter.initial_B());
  }
  return out;
}

}  // namespace lora::io

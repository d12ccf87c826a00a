// lora::Config: the hyper-parameters of one adapter, as PEFT's LoraConfig
// names them, and the checks that reject invalid values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "lora/core/error.hpp"

namespace lora {

// How A and B start. kaiming_uniform and gaussian draw A and set B = 0, so a
// fresh adapter is a no-op. pissa and olora take A and B from the base weight
// W and write the residual W - s B A into the base, so base + adapter is still
// W (adapters/init.hpp; the base must be dense and writable).
enum class Init {
  kaiming_uniform,  // A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)): PEFT's and loralib's default
  gaussian,         // A ~ N(0, (1/r)^2): PEFT's init_lora_weights="gaussian"
  pissa,            // top-r singular triplets of W: "pissa" (exact) or "pissa_niter_N" (randomized)
  olora,            // the first r columns of Q and rows of R in W = Q R: "olora"
};

// PEFT's init_lora_weights string: "kaiming_uniform" (PEFT's true), "gaussian",
// "pissa", "pissa_niter_<pissa_niter>" (pissa_niter > 0), "olora".
inline std::string to_string(Init init, int pissa_niter = 0) {
  switch (init) {
    case Init::gaussian: return "gaussian";
    case Init::pissa: return pissa_niter > 0 ? "pissa_niter_" + std::to_string(pissa_niter) : "pissa";
    case Init::olora: return "olora";
    default: return "kaiming_uniform";
  }
}
// True for the inits that read and rewrite the base weight.
inline bool init_writes_base(Init init) { return init == Init::pissa || init == Init::olora; }

struct Config {
  int r = 8;                  // rank of the update B A
  double alpha = 8.0;         // lora_alpha: scale = alpha / r (alpha / sqrt(r) with rsLoRA)
  double dropout = 0.0;       // lora_dropout: probability of zeroing an input of the LoRA path
  bool use_rslora = false;    // rank-stabilised scaling (Kalajdzievski, 2023)
  bool fan_in_fan_out = false;  // the base stores W transposed, d_in x d_out (GPT-2's Conv1D)
  // DoRA (Liu et al., 2024; PEFT's use_dora): a trainable magnitude m, one per
  // output, rescales each output of W + s B A to m / ||W + s B A|| (adapters/lora.hpp).
  bool use_dora = false;
  Init init = Init::kaiming_uniform;
  int pissa_niter = 0;        // Init::pissa: 0 exact SVD; N > 0 randomized SVD with N power iterations
  std::uint64_t seed = 0;     // drives init and dropout through lora::random_bits

  // s in y = x W^T + s (x A^T) B^T.
  double scale() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r; }

  // Checks the values that do not depend on the layer's shape.
  void validate() const {
    LORA_CHECK(r >= 1, "Config.r = " << r << ": expected an integer >= 1");
    LORA_CHECK(std::isfinite(alpha) && alpha > 0.0, "Config.alpha = " << alpha << ": expected a finite value > 0");
    LORA_CHECK(std::isfinite(dropout) && dropout >= 0.0 && dropout < 1.0,
               "Config.dropout = " << dropout << ": expected a value in [0, 1)");
    LORA_CHECK(pissa_niter >= 0 && (pissa_niter == 0 || init == Init::pissa),
               "Config.pissa_niter = " << pissa_niter << " with init = " << to_string(init)
                                       << ": expected 0, or a count > 0 with Init::pissa (its randomized SVD)");
    LORA_CHECK(!(use_dora && init_writes_base(init)),
               "Config.use_dora with init = " << to_string(init, pissa_niter)
                                              << ": DoRA on a PiSSA / OLoRA residual base is not supported (its "
                                                 "cached norms of W and the conversion to the original W do not "
                                                 "cover it); use one or the other");
  }

  // Checks everything for a d_out x d_in layer. Any r >= 1 fits, as in PEFT:
  // r > min(d_in, d_out) wastes parameters (B A has rank min(d_in, d_out) at
  // most) but is valid, and adapters trained that way exist.
  void validate(std::int64_t d_in, std::int64_t d_out) const {
    validate();
    LORA_CHECK(d_in >= 1 && d_out >= 1, "layer shape d_out x d_in = " << d_out << " x " << d_in
                                                                      << ": expected both >= 1");
    LORA_CHECK(!init_writes_base(init) || r <= std::min(d_in, d_out),
               "Config.r = " << r << " with init = " << to_string(init, pissa_niter) << " on a " << d_out << " x "
                             << d_in << " layer: " << to_string(init) << " takes r "
                             << (init == Init::pissa ? "singular triplets" : "columns of Q") << " of W, which has "
                             << std::min(d_in, d_out) << "; expected r <= min(d_out, d_in)");
  }
};

}  // namespace lora

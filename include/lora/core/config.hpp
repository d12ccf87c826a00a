// lora::Config: the hyper-parameters of one adapter, as PEFT's LoraConfig
// names them, and the checks that reject invalid values.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "lora/core/error.hpp"

namespace lora {

// How A is initialised (B always starts at zero, so a fresh adapter is a no-op).
enum class Init {
  kaiming_uniform,  // A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)): PEFT's and loralib's default
  gaussian,         // A ~ N(0, (1/r)^2): PEFT's init_lora_weights="gaussian"
};

inline const char* to_string(Init init) { return init == Init::gaussian ? "gaussian" : "kaiming_uniform"; }

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
  std::uint64_t seed = 0;     // drives init and dropout through lora::random_bits

  // s in y = x W^T + s (x A^T) B^T.
  double scale() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r; }

  // Checks the values that do not depend on the layer's shape.
  void validate() const {
    LORA_CHECK(r >= 1, "Config.r = " << r << ": expected an integer >= 1");
    LORA_CHECK(std::isfinite(alpha) && alpha > 0.0, "Config.alpha = " << alpha << ": expected a finite value > 0");
    LORA_CHECK(std::isfinite(dropout) && dropout >= 0.0 && dropout < 1.0,
               "Config.dropout = " << dropout << ": expected a value in [0, 1)");
  }

  // Checks everything for a d_out x d_in layer. Any r >= 1 fits, as in PEFT:
  // r > min(d_in, d_out) wastes parameters (B A has rank min(d_in, d_out) at
  // most) but is valid, and adapters trained that way exist.
  void validate(std::int64_t d_in, std::int64_t d_out) const {
    validate();
    LORA_CHECK(d_in >= 1 && d_out >= 1, "layer shape d_out x d_in = " << d_out << " x " << d_in
                                                                      << ": expected both >= 1");
  }
};

}  // namespace lora

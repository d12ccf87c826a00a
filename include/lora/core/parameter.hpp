// Parameter: what a layer hands the optimizer for one trainable tensor, a
// view of its value and of its gradient (both in the parameter type P).
#pragma once

#include <string>

#include "lora/core/matrix_view.hpp"

namespace lora {

template <class P, class Space = HostSpace>
struct Parameter {
  MatrixView<P, Space> value;
  MatrixView<P, Space> grad;
  std::string name;  // e.g. "lora_A", for messages and checkpoints
};

// Bytes of each kind a layer or an optimizer holds, so LoRA and full
// fine-tuning can be compared without a profiler.
struct MemoryReport {
  std::size_t frozen_bytes = 0;      // W and bias (borrowed from the caller, counted for comparison)
  std::size_t parameter_bytes = 0;   // trainable tensors (and their low-precision compute copies)
  std::size_t gradient_bytes = 0;    // one gradient per trainable tensor
  std::size_t optimizer_bytes = 0;   // optimizer state (Adam: two moments per trainable element)
  std::size_t activation_bytes = 0;  // kept from forward for backward
  std::size_t workspace_bytes = 0;   // scratch reused across calls

  std::size_t total() const {
    return frozen_bytes + parameter_bytes + gradient_bytes + optimizer_bytes + activation_bytes + workspace_bytes;
  }
  MemoryReport& operator+=(const MemoryReport& o) {
    frozen_bytes += o.frozen_bytes;
    parameter_bytes += o.parameter_bytes;
    gradient_bytes += o.gradient_bytes;
    optimizer_bytes += o.optimizer_bytes;
    activation_bytes += o.activation_bytes;
    workspace_bytes += o.workspace_bytes;
    return *this;
  }
};

}  // namespace lora

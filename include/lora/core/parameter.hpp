// Parameter: what a layer hands the optimizer for one trainable tensor, a
// view of its value and of its gradient (both in the parameter type P).
#pragma once

#include <memory>
#include <string>

#include "lora/core/matrix_view.hpp"

namespace lora {

// Held by whatever owns the storage behind Parameters (a layer: its A, B and
// their gradients), which stamps each Parameter it hands out with watch().
// The token ends when its owner is destroyed or another owner is
// move-assigned over it, i.e. exactly when that storage is freed or replaced;
// it travels with the storage when the owner is moved (as a std::vector of
// layers does when it grows). The optimizer checks it before it touches a
// tensor, so a dangling view is an error, never a write into freed memory.
class StorageToken {
 public:
  StorageToken() : alive_(std::make_shared<char>()) {}
  StorageToken(StorageToken&&) noexcept = default;
  StorageToken& operator=(StorageToken&&) noexcept = default;  // the old storage's token ends
  StorageToken(const StorageToken&) = delete;  // a copy would outlive the storage it speaks for
  StorageToken& operator=(const StorageToken&) = delete;

  std::weak_ptr<const void> watch() const { return alive_; }

 private:
  std::shared_ptr<const void> alive_;
};

template <class P, class Space = HostSpace>
struct Parameter {
  MatrixView<P, Space> value;
  MatrixView<P, Space> grad;
  std::string name;  // e.g. "lora_A", for messages and checkpoints
  // The owner's StorageToken::watch(); empty for a tensor whose storage the
  // caller owns and keeps alive as long as the optimizer itself.
  std::weak_ptr<const void> storage = {};
};

// Bytes of each kind a layer or an optimizer holds, so LoRA and full
// fine-tuning can be compared without a profiler.
struct MemoryReport {
  std::size_t frozen_bytes = 0;      // W and bias (borrowed, counted for comparison); PiSSA / OLoRA: A0, B0 kept on the host
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

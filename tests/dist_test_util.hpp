// A communicator for tests of DataParallel without MPI or a second GPU: it
// claims `ranks` ranks that all hold this rank's buffers, so a sum multiplies
// by `ranks` and a broadcast changes nothing. In host memory, or (with a
// scale function) in device memory.
#pragma once

#include <functional>
#include <string>

#include "lora/dist/communicator.hpp"

namespace lora::test {

class Replicas final : public dist::Communicator {
 public:
  // scale(data, n, factor): multiplies n values in place; empty: host memory.
  using Scale = std::function<void(void* data, std::size_t n, bool is_double, double factor)>;
  explicit Replicas(int ranks, Scale device_scale = {}) : ranks_(ranks), scale_(std::move(device_scale)) {}

  dist::Memory memory() const override { return scale_ ? dist::Memory::device : dist::Memory::host; }
  int rank() const override { return 0; }
  int size() const override { return ranks_; }
  void allreduce_sum(float* data, std::size_t n) override { multiply(data, n, false); }
  void allreduce_sum(double* data, std::size_t n) override { multiply(data, n, true); }
  void broadcast(void*, std::size_t, int) override { ++broadcasts; }
  void barrier() override {}
  std::string describe() const override { return std::to_string(ranks_) + " replicas"; }

  int sums = 0, broadcasts = 0;  // calls seen

 private:
  template <class T>
  void multiply(T* data, std::size_t n, bool is_double) {
    ++sums;
    if (scale_) {
      scale_(data, n, is_double, ranks_);
      return;
    }
    for (std::size_t i = 0; i < n; ++i) data[i] *= static_cast<T>(ranks_);
  }

  int ranks_;
  Scale scale_;
};

}  // namespace lora::test

// What data-parallel training needs from a group of processes: who this one
// is, how many there are, a sum of a buffer over all of them, rank 0's buffer
// sent to all, and a barrier. lora::dist::Mpi (<lora/dist/mpi.hpp>) is the
// implementation over MPI, lora::dist::Nccl (<lora/dist/nccl.hpp>) over NCCL
// for GPU buffers; SingleProcess is the group of one (every call a
// no-op), so one training loop serves both.
//
// Buffers are in the memory the implementation names (memory()): host
// memory for SingleProcess and Mpi, device memory for Nccl. The calls are collective: every rank makes the same
// calls in the same order with the same sizes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lora::dist {

// Where a communicator's buffers live: host memory (MPI), or the GPU's (NCCL).
enum class Memory { host, device };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual Memory memory() const { return Memory::host; }
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // data[i] <- sum over ranks of data[i], on every rank. Every rank gets the
  // same bits (implementations guarantee it; Mpi reduces to rank 0 and
  // broadcasts when the library cannot promise it otherwise).
  virtual void allreduce_sum(float* data, std::size_t n) = 0;
  virtual void allreduce_sum(double* data, std::size_t n) = 0;
  // bytes[0, n) <- root's, on every rank.
  virtual void broadcast(void* bytes, std::size_t n, int root) = 0;
  virtual void barrier() = 0;
  virtual std::string describe() const = 0;  // for logs: "MPI (Open MPI v4.1.4), 2 processes"
};

// One process: the sum of one value is itself, rank 0's buffer is this one.
class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(float*, std::size_t) override {}
  void allreduce_sum(double*, std::size_t) override {}
  void broadcast(void*, std::size_t, int) override {}
  void barrier() override {}
  std::string describe() const override { return "single process"; }
};

}  // namespace lora::dist

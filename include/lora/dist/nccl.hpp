// lora::dist::Nccl: the Communicator over NCCL, for buffers in GPU memory
// (DataParallel<T, cuda::Backend> hands it its device bucket directly). One
// process per GPU; the ranks find each other through a bootstrap
// communicator (Mpi, usually), which carries NCCL's unique id from rank 0.
// Link lora::nccl (CMake: present when the CUDA backend is built and nccl.h
// and libnccl are found, e.g. in the CUDA toolkit or PyTorch's nvidia-nccl wheel).
//
//   lora::dist::Mpi world;
//   lora::dist::Nccl nccl(world, /*device=*/local_rank);
//   lora::dist::DataParallel<float, lora::cuda::Backend> dp(ctx, nccl, model.parameters());
//
// Each call is enqueued on the communicator's own stream and waited for, so
// a call returns with the result in place (DataParallel synchronizes the
// backend's stream before it). NCCL's ring and tree allreduce reduce each
// element on one rank and pass the result on: every rank gets the same bits.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

#include "lora/core/error.hpp"
#include "lora/dist/communicator.hpp"

namespace lora::dist {

namespace detail {
inline void nccl_check(ncclResult_t code, const char* what) {
  LORA_CHECK(code == ncclSuccess, "NCCL: " << what << " failed: " << ncclGetErrorString(code));
}
inline void nccl_cuda_check(cudaError_t code, const char* what) {
  LORA_CHECK(code == cudaSuccess, "NCCL communicator: " << what << " failed: " << cudaGetErrorString(code));
}
}  // namespace detail

class Nccl final : public Communicator {
 public:
  // Every rank of `bootstrap` joins, on `device` (its GPU).
  Nccl(Communicator& bootstrap, int device) : rank_(bootstrap.rank()), size_(bootstrap.size()), device_(device) {
    ncclUniqueId id{};
    if (rank_ == 0) detail::nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    bootstrap.broadcast(&id, sizeof id, 0);
    detail::nccl_cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    detail::nccl_cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    detail::nccl_check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    detail::nccl_cuda_check(cudaMalloc(&scratch_, sizeof(float)), "cudaMalloc");
  }
  ~Nccl() override {
    if (scratch_) cudaFree(scratch_);
    if (comm_) ncclCommDestroy(comm_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  Nccl(const Nccl&) = delete;
  Nccl& operator=(const Nccl&) = delete;

  Memory memory() const override { return Memory::device; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(float* data, std::size_t n) override { sum(data, n, ncclFloat32); }
  void allreduce_sum(double* data, std::size_t n) override { sum(data, n, ncclFloat64); }
  void broadcast(void* bytes, std::size_t n, int root) override {
    detail::nccl_check(ncclBroadcast(bytes, bytes, n, ncclUint8, root, comm_, stream_), "ncclBroadcast");
    wait();
  }
  // NCCL has no barrier: an allreduce of one value stands in for it.
  void barrier() override { sum(scratch_, 1, ncclFloat32); }
  std::string describe() const override {
    int version = 0;
    ncclGetVersion(&version);
    return "NCCL " + std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
           std::to_string(version % 100) + " (GPU " + std::to_string(device_) + "), " + std::to_string(size_) +
           (size_ == 1 ? " process" : " processes");
  }
  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }

 private:
  void sum(void* data, std::size_t n, ncclDataType_t type) {
    detail::nccl_check(ncclAllReduce(data, data, n, type, ncclSum, comm_, stream_), "ncclAllReduce");
    wait();
  }
  void wait() { detail::nccl_cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

  int rank_, size_, device_;
  cudaStream_t stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  float* scratch_ = nullptr;
};

}  // namespace lora::dist

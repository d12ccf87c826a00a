// lora::dist::Mpi: the Communicator over an MPI communicator (Open MPI,
// MPICH, ...). Link lora::mpi (CMake: present when find_package(MPI) finds
// MPI; Debian: libopenmpi-dev). MPI_Init and MPI_Finalize stay the caller's,
// or use MpiSession.
//
// allreduce_sum is MPI_Allreduce in place. MPI does not promise that every
// rank gets the same bits from it (an implementation may add in a different
// order on each rank), and data-parallel training needs them identical: with
// `identical_sums` (the default) the sum is MPI_Reduce to rank 0 and
// MPI_Bcast, one order for all; without it, MPI_Allreduce (faster on large
// groups; Open MPI's algorithms for a commutative sum on 2 processes give
// equal bits).
#pragma once

#include <mpi.h>

#include <string>

#include "lora/core/error.hpp"
#include "lora/dist/communicator.hpp"

namespace lora::dist {

namespace detail {
inline void mpi_check(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  LORA_CHECK(false, "MPI: " << what << " failed: " << std::string(text, static_cast<std::size_t>(length)));
}
}  // namespace detail

// MPI_Init_thread on construction (unless MPI is already initialised),
// MPI_Finalize on destruction (only if this object initialised it).
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) return;
    int provided = 0;
    detail::mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owner_ = true;
  }
  ~MpiSession() {
    if (owner_) MPI_Finalize();
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

 private:
  bool owner_ = false;
};

class Mpi final : public Communicator {
 public:
  explicit Mpi(MPI_Comm comm = MPI_COMM_WORLD, bool identical_sums = true)
      : comm_(comm), identical_sums_(identical_sums) {
    detail::mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(float* data, std::size_t n) override { sum(data, n, MPI_FLOAT); }
  void allreduce_sum(double* data, std::size_t n) override { sum(data, n, MPI_DOUBLE); }
  void broadcast(void* bytes, std::size_t n, int root) override {
    auto* p = static_cast<char*>(bytes);
    for (std::size_t done = 0; done < n;) {  // MPI counts are int
      const int chunk = static_cast<int>(std::min<std::size_t>(n - done, kMaxCount));
      detail::mpi_check(MPI_Bcast(p + done, chunk, MPI_BYTE, root, comm_), "MPI_Bcast");
      done += static_cast<std::size_t>(chunk);
    }
  }
  void barrier() override { detail::mpi_check(MPI_Barrier(comm_), "MPI_Barrier"); }
  std::string describe() const override {
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int length = 0;
    MPI_Get_library_version(version, &length);
    std::string v(version, static_cast<std::size_t>(length));
    v = v.substr(0, v.find_first_of(",\n"));
    return "MPI (" + v + "), " + std::to_string(size_) + (size_ == 1 ? " process" : " processes");
  }
  MPI_Comm comm() const { return comm_; }

 private:
  static constexpr std::size_t kMaxCount = 1u << 30;

  template <class T>
  void sum(T* data, std::size_t n, MPI_Datatype type) {
    for (std::size_t done = 0; done < n;) {
      const int chunk = static_cast<int>(std::min<std::size_t>(n - done, kMaxCount));
      T* p = data + done;
      if (identical_sums_) {
        detail::mpi_check(MPI_Reduce(rank_ == 0 ? MPI_IN_PLACE : p, rank_ == 0 ? p : nullptr, chunk, type, MPI_SUM, 0,
                                     comm_),
                          "MPI_Reduce");
        detail::mpi_check(MPI_Bcast(p, chunk, type, 0, comm_), "MPI_Bcast");
      } else {
        detail::mpi_check(MPI_Allreduce(MPI_IN_PLACE, p, chunk, type, MPI_SUM, comm_), "MPI_Allreduce");
      }
      done += static_cast<std::size_t>(chunk);
    }
  }

  MPI_Comm comm_;
  bool identical_sums_;
  int rank_ = 0, size_ = 1;
};

}  // namespace lora::dist

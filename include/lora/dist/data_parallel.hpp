// Data-parallel training of adapters: every process holds the same model and
// adapter, runs forward and backward on its own shard of the batch, and the
// trainable gradients are averaged over all processes before each (local,
// identical) optimizer step. With LoRA only A and B travel: a few hundred KB
// a step where full fine-tuning would send the whole model.
//
//   lora::dist::Mpi comm;                                  // or SingleProcess; Nccl for device buffers
//   lora::dist::DataParallel<float> dp(ctx, comm, model.parameters());
//   model.set_dropout_rank(comm.rank());                   // different masks per rank, reproducible
//   dp.broadcast_parameters();                             // rank 0's initial A and B everywhere
//   for (each step) {
//     ... forward / backward on this rank's rows (the loss a mean over them) ...
//     dp.allreduce_gradients(local_rows);                  // the mean over all ranks' rows, one call
//     adam.clip_grad_norm(1.0);                            // the global norm: every rank holds the same gradients
//     adam.step();
//   }
//   if (comm.rank() == 0) model.save_checkpoint(path, adam);   // resumes at any process count
//
// allreduce_gradients packs every gradient and the rank's count into one
// bucket (gradients multiplied by the count), sums it over the ranks in one
// allreduce, and divides by the total count: sum_r n_r g_r / sum_r n_r, the
// gradient of the mean loss over all rows, right for uneven shards (a rank
// with no rows contributes nothing). The bucket lives where the backend's
// tensors do (DataParallel<T, cuda::Backend>: on the GPU, packed by the
// backend's own copies); a communicator of host memory (Mpi) gets it through
// a host copy, one of device memory (Nccl) directly.
#pragma once

#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/core/parameter.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/dist/communicator.hpp"

namespace lora::dist {

template <class T, class Backend = cpu::Backend>
class DataParallel {
 public:
  using Space = typename Backend::Space;
  using Param = Parameter<T, Space>;
  using View = MatrixView<T, Space>;
  using Context = typename Backend::Context;

  DataParallel(Context& ctx, Communicator& comm, std::vector<Param> params)
      : ctx_(&ctx), comm_(&comm), params_(std::move(params)) {
    LORA_CHECK((comm.memory() == Memory::host || !std::is_same_v<Space, HostSpace>),
               "DataParallel: " << comm.describe() << " sums device memory; this backend's tensors are on the host");
    for (const Param& p : params_) {
      LORA_CHECK(p.value.rows == p.grad.rows && p.value.cols == p.grad.cols,
                 "DataParallel: " << p.name << " value and gradient differ in shape");
      elements_ += p.value.rows * p.value.cols;
    }
    bucket_ = Matrix(1, elements_ + 1);  // + the count
    scalar_ = typename Backend::template Matrix<double>(1, 1);
  }

  Communicator& comm() const { return *comm_; }
  // Elements, and bytes, of the one buffer allreduce_gradients sums each step.
  std::size_t bucket_elements() const { return static_cast<std::size_t>(elements_ + 1); }
  std::size_t bucket_bytes() const { return bucket_elements() * sizeof(T); }

  // Rank 0's values of every parameter, on every rank (the initial adapter).
  void broadcast_parameters() {
    pack(&Param::value);
    broadcast(bucket_.view());
    unpack(&Param::value);
  }

  // Whether every rank holds rank 0's values, bit for bit (collective; the
  // same answer on every rank).
  bool parameters_identical() {
    pack(&Param::value);
    Matrix root(1, elements_ + 1);
    Backend::convert(*ctx_, MatrixView<const T, Space>(bucket_.view()), root.view());
    broadcast(root.view());
    const std::vector<T> mine = to_host(bucket_.view()), theirs = to_host(root.view());
    const bool same = std::memcmp(mine.data(), theirs.data(), static_cast<std::size_t>(elements_) * sizeof(T)) == 0;
    return sum_scalar(same ? 0.0 : 1.0) == 0.0;
  }

  // Every gradient <- sum_r n_r g_r / sum_r n_r, where this rank's gradients
  // are of its loss averaged over `local_count` rows (tokens, examples: the
  // unit the loss is a mean over). One allreduce. Returns sum_r n_r.
  double allreduce_gradients(double local_count) {
    LORA_CHECK(local_count >= 0.0, "allreduce_gradients: local_count = " << local_count << ", expected >= 0");
    if (comm_->size() == 1) return local_count;  // the gradients are already the mean, bit for bit
    pack(&Param::grad);
    if (elements_ > 0) Backend::scale(*ctx_, gradients_part(bucket_.view()), local_count);
    from_host(std::vector<T>{static_cast<T>(local_count)}, count_part(bucket_.view()));
    sum(bucket_.view());
    const double total = static_cast<double>(to_host(count_part(bucket_.view()))[0]);
    LORA_CHECK(total > 0, "allreduce_gradients: no rank had any rows (total count 0)");
    if (elements_ > 0) Backend::scale(*ctx_, gradients_part(bucket_.view()), 1.0 / total);
    unpack(&Param::grad);
    return total;
  }

 private:
  using Matrix = typename Backend::template Matrix<T>;

  View gradients_part(View bucket) const { return View(bucket.data, 1, elements_); }
  View count_part(View bucket) const { return View(bucket.data + elements_, 1, 1); }

  // bucket_ <- each parameter's `field`, parameters in order, rows contiguous
  // (the backend's copies: on the GPU for a device backend).
  void pack(View Param::*field) {
    std::int64_t offset = 0;
    for (const Param& p : params_) {
      const View& m = p.*field;
      Backend::convert(*ctx_, MatrixView<const T, Space>(m), View(bucket_.view().data + offset, m.rows, m.cols));
      offset += m.rows * m.cols;
    }
  }
  void unpack(View Param::*field) {
    std::int64_t offset = 0;
    for (const Param& p : params_) {
      const View& m = p.*field;
      Backend::convert(*ctx_, MatrixView<const T, Space>(View(bucket_.view().data + offset, m.rows, m.cols)), m);
      offset += m.rows * m.cols;
    }
  }

  std::vector<T> to_host(View v) {
    std::vector<T> host(static_cast<std::size_t>(v.cols));
    Backend::copy_to_host(*ctx_, MatrixView<const T, Space>(v), MatrixView<T>(host.data(), 1, v.cols));
    return host;
  }
  void from_host(const std::vector<T>& host, View v) {
    Backend::copy_from_host(*ctx_, MatrixView<const T>(host.data(), 1, v.cols), v);
  }

  // The communicator's calls on a buffer of this backend: directly where it
  // reads that memory, else through a host copy.
  bool direct() const { return comm_->memory() == Memory::device || std::is_same_v<Space, HostSpace>; }
  void sum(View v) {
    if (direct()) {
      Backend::synchronize(*ctx_);  // the backend's writes land before the communicator reads
      comm_->allreduce_sum(v.data, static_cast<std::size_t>(v.cols));
      return;
    }
    std::vector<T> host = to_host(v);
    comm_->allreduce_sum(host.data(), host.size());
    from_host(host, v);
  }
  void broadcast(View v) {
    if (direct()) {
      Backend::synchronize(*ctx_);
      comm_->broadcast(v.data, static_cast<std::size_t>(v.cols) * sizeof(T), 0);
      return;
    }
    std::vector<T> host = to_host(v);
    comm_->broadcast(host.data(), host.size() * sizeof(T), 0);
    from_host(host, v);
  }
  double sum_scalar(double x) {
    if (comm_->memory() == Memory::host) {
      comm_->allreduce_sum(&x, 1);
      return x;
    }
    if constexpr (!std::is_same_v<Space, HostSpace>) {  // a device communicator: the value in device memory
      std::vector<double> host = {x};
      Backend::copy_from_host(*ctx_, MatrixView<const double>(host.data(), 1, 1), scalar_.view());
      Backend::synchronize(*ctx_);
      comm_->allreduce_sum(scalar_.view().data, 1);
      Backend::copy_to_host(*ctx_, MatrixView<const double, Space>(scalar_.view()), MatrixView<double>(host.data(), 1, 1));
      return host[0];
    }
    return x;  // not reached: the constructor refuses a device communicator for host tensors
  }

  Context* ctx_;
  Communicator* comm_;
  std::vector<Param> params_;
  std::int64_t elements_ = 0;
  Matrix bucket_;
  typename Backend::template Matrix<double> scalar_;
};

}  // namespace lora::dist

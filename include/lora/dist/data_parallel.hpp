// Data-parallel training of adapters: every process holds the same model and
// adapter, runs forward and backward on its own shard of the batch, and the
// trainable gradients are averaged over all processes before each (local,
// identical) optimizer step. With LoRA only A and B travel: a few hundred KB
// a step where full fine-tuning would send the whole model.
//
//   lora::dist::Mpi comm;                                  // or SingleProcess
//   lora::dist::DataParallel<float> dp(comm, model.parameters());
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
// allreduce_gradients packs every gradient, each multiplied by the rank's own
// count, and the count itself into one bucket, sums it over the ranks in one
// allreduce, and divides by the total count: sum_r n_r g_r / sum_r n_r, the
// gradient of the mean loss over all rows, right for uneven shards (a rank
// with no rows contributes nothing). Host memory (the CPU backend).
#pragma once

#include <cstring>
#include <utility>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/core/parameter.hpp"
#include "lora/dist/communicator.hpp"

namespace lora::dist {

template <class T>
class DataParallel {
 public:
  DataParallel(Communicator& comm, std::vector<Parameter<T>> params) : comm_(&comm), params_(std::move(params)) {
    std::size_t n = 1;  // + the count
    for (const Parameter<T>& p : params_) {
      LORA_CHECK(p.value.rows == p.grad.rows && p.value.cols == p.grad.cols,
                 "DataParallel: " << p.name << " value and gradient differ in shape");
      n += static_cast<std::size_t>(p.value.rows * p.value.cols);
    }
    bucket_.resize(n);
  }

  Communicator& comm() const { return *comm_; }
  // Elements, and bytes, of the one buffer allreduce_gradients sums each step.
  std::size_t bucket_elements() const { return bucket_.size(); }
  std::size_t bucket_bytes() const { return bucket_.size() * sizeof(T); }

  // Rank 0's values of every parameter, on every rank (the initial adapter).
  void broadcast_parameters() {
    pack(&Parameter<T>::value, 1.0);
    comm_->broadcast(bucket_.data(), bucket_bytes(), 0);
    unpack(&Parameter<T>::value, 1.0);
  }

  // Whether every rank holds rank 0's values, bit for bit (collective; the
  // same answer on every rank).
  bool parameters_identical() {
    pack(&Parameter<T>::value, 1.0);
    std::vector<T> root = bucket_;
    comm_->broadcast(root.data(), root.size() * sizeof(T), 0);
    double differ = std::memcmp(root.data(), bucket_.data(), bucket_bytes()) == 0 ? 0.0 : 1.0;
    comm_->allreduce_sum(&differ, 1);
    return differ == 0.0;
  }

  // Every gradient <- sum_r n_r g_r / sum_r n_r, where this rank's gradients
  // are of its loss averaged over `local_count` rows (tokens, examples: the
  // unit the loss is a mean over). One allreduce. Returns sum_r n_r.
  double allreduce_gradients(double local_count) {
    LORA_CHECK(local_count >= 0.0, "allreduce_gradients: local_count = " << local_count << ", expected >= 0");
    if (comm_->size() == 1) return local_count;  // the gradients are already the mean, bit for bit
    pack(&Parameter<T>::grad, local_count);
    bucket_.back() = static_cast<T>(local_count);
    comm_->allreduce_sum(bucket_.data(), bucket_.size());
    const double total = static_cast<double>(bucket_.back());
    LORA_CHECK(total > 0.0, "allreduce_gradients: no rank had any rows (total count 0)");
    unpack(&Parameter<T>::grad, total);
    return total;
  }

 private:
  // bucket_ <- factor * (each parameter's `field`), parameters in order, rows contiguous.
  void pack(MatrixView<T> Parameter<T>::*field, double factor) {
    std::size_t k = 0;
    const T f = static_cast<T>(factor);
    for (const Parameter<T>& p : params_) {
      const MatrixView<T>& m = p.*field;
      for (std::int64_t i = 0; i < m.rows; ++i)
        for (std::int64_t j = 0; j < m.cols; ++j) bucket_[k++] = factor == 1.0 ? m(i, j) : f * m(i, j);
    }
  }
  // Each parameter's `field` <- bucket_ / divisor.
  void unpack(MatrixView<T> Parameter<T>::*field, double divisor) {
    std::size_t k = 0;
    const T d = static_cast<T>(divisor);
    for (const Parameter<T>& p : params_) {
      const MatrixView<T>& m = p.*field;
      for (std::int64_t i = 0; i < m.rows; ++i)
        for (std::int64_t j = 0; j < m.cols; ++j) m(i, j) = divisor == 1.0 ? bucket_[k++] : bucket_[k++] / d;
    }
  }

  Communicator* comm_;
  std::vector<Parameter<T>> params_;
  std::vector<T> bucket_;
};

}  // namespace lora::dist

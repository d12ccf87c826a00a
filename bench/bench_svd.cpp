// Time of the truncated SVD behind `lora-tool extract` (and PiSSA's init) on
// one layer, both paths in one run:
//   BM_RandomizedSvd/d/r/p/q  linalg's randomized path (Halko et al. 2011, as
//                             torch.svd_lowrank): sketch of r + p columns, q power
//                             iterations, a QR after every product, then the exact
//                             SVD of the (r + p) x d projection
//   BM_ExactSvd/d/r           Eigen's BDCSVD of the whole matrix, first r kept
// The d x d float input has a decaying spectrum (a Gaussian matrix times
// diag(1/(1 + i)) in its columns) and is built once. Counter FLOP/s: the
// randomized path's 2 + 2q products of 2 d² (r + p) flops each (its QRs and
// small SVD are not counted); the exact one's is not set (BDCSVD's count
// depends on deflation). Times are wall clock; Eigen's products use OpenMP.
//
//   bench_svd --benchmark_filter='BM_RandomizedSvd/4096|BM_ExactSvd/1024'
#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <memory>

#include "lora/cpu/backend.hpp"
#include "lora/linalg/svd.hpp"

namespace {

const lora::cpu::Matrix<float>& layer(std::int64_t d) {
  static std::map<std::int64_t, std::unique_ptr<lora::cpu::Matrix<float>>> cache;
  auto& slot = cache[d];
  if (!slot) {
    slot = std::make_unique<lora::cpu::Matrix<float>>(d, d);
    for (std::int64_t i = 0; i < d; ++i)
      for (std::int64_t j = 0; j < d; ++j)
        (*slot)(i, j) = static_cast<float>(lora::standard_normal(1, 0, 0, static_cast<std::uint64_t>(i * d + j)) /
                                           (1.0 + static_cast<double>(j)));
  }
  return *slot;
}

void BM_RandomizedSvd(benchmark::State& state) {
  const std::int64_t d = state.range(0), r = state.range(1);
  lora::linalg::SvdOptions options;
  options.method = lora::linalg::SvdMethod::kRandomized;
  options.oversampling = state.range(2);
  options.power_iterations = static_cast<int>(state.range(3));
  const lora::cpu::Matrix<float>& W = layer(d);
  for (auto _ : state) benchmark::DoNotOptimize(lora::linalg::truncated_svd(W.view(), r, options));
  const double products = 2.0 + 2.0 * static_cast<double>(options.power_iterations);
  state.counters["FLOP/s"] = benchmark::Counter(products * 2.0 * static_cast<double>(d * d) * static_cast<double>(r + options.oversampling),
                                                benchmark::Counter::kIsIterationInvariantRate);
}
// r = 16 as the tool runs it (p = 10, q = 2) and as torch.svd_lowrank / PEFT's pissa_niter_2 (p = 0, q = 2).
BENCHMARK(BM_RandomizedSvd)
    ->ArgNames({"d", "r", "p", "q"})
    ->Args({4096, 16, 10, 2})
    ->Args({4096, 16, 0, 2})
    ->Args({1024, 16, 10, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_ExactSvd(benchmark::State& state) {
  const std::int64_t d = state.range(0), r = state.range(1);
  lora::linalg::SvdOptions options;
  options.method = lora::linalg::SvdMethod::kExact;
  const lora::cpu::Matrix<float>& W = layer(d);
  for (auto _ : state) benchmark::DoNotOptimize(lora::linalg::truncated_svd(W.view(), r, options));
}
BENCHMARK(BM_ExactSvd)->ArgNames({"d", "r"})->Args({1024, 16})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();

// Memory of LoRA against full fine-tuning of the same layer (workload.hpp).
//
//   bench_memory --mode report
//       For every configuration of bench_linear (d in {1024, 4096}, N in {512, 2048},
//       r in {8, 16, 64}): the bytes the library reports after one training step
//       (parameters, gradients, optimizer state, cached activations, workspace) and
//       the same for full fine-tuning; checks optimizer state == 8 B x trainable.
//   bench_memory --mode lora|nf4|full [--d 4096] [--n 2048] [--r 16] [--steps 10] [--dropout 0]
//       Runs that many training steps in this process and prints its peak resident
//       memory (getrusage ru_maxrss) and the per-step times. One mode per process,
//       so the peak belongs to that mode alone. nf4 is the lora step over an NF4
//       copy of W (QLoRA, double quantization, quantized in row chunks so the
//       dense W never exists whole); lora and nf4 print the base's bytes per weight.
//
// Output lines are key=value, one record per line, for bench/compare.sh.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "workload.hpp"

namespace {

using lora::bench::FullFineTune;
using lora::bench::LoraWorkload;
using lora::bench::Nf4LoraWorkload;
using lora::bench::Shape;

// Resident memory now (kB), from /proc/self/statm; 0 where that file is absent.
long rss_now_kb() {
  std::ifstream statm("/proc/self/statm");
  long pages_total = 0, pages_resident = 0;
  if (!(statm >> pages_total >> pages_resident)) return 0;
  return pages_resident * (sysconf(_SC_PAGESIZE) / 1024);
}

long peak_rss_kb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;  // kB on Linux
}

int threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void print_report(const char* mode, const Shape& s, const lora::MemoryReport& m, std::int64_t trainable,
                  std::size_t caller_bytes) {
  std::printf(
      "lib=lora mode=%s d=%lld n=%lld r=%d trainable=%lld frozen_bytes=%zu parameter_bytes=%zu gradient_bytes=%zu "
      "optimizer_bytes=%zu activation_bytes=%zu workspace_bytes=%zu caller_bytes=%zu total_bytes=%zu\n",
      mode, static_cast<long long>(s.d), static_cast<long long>(s.n), s.r, static_cast<long long>(trainable),
      m.frozen_bytes, m.parameter_bytes, m.gradient_bytes, m.optimizer_bytes, m.activation_bytes, m.workspace_bytes,
      caller_bytes, m.total() + caller_bytes);
}

// Every configuration's report; returns false if an optimizer holds other than 8 B per trainable element.
bool report_all() {
  bool ok = true;
  for (std::int64_t d : {1024, 4096}) {
    for (std::int64_t n : {512, 2048}) {
      {
        const Shape full_shape{d, n, 0, 0.0};
        FullFineTune full(full_shape);
        full.step();
        print_report("full", full_shape, full.memory(), full.trainable_parameters(), full.caller_bytes());
        ok = ok && full.memory().optimizer_bytes == 8u * static_cast<std::size_t>(full.trainable_parameters());
      }
      for (int r : {8, 16, 64}) {
        const Shape s{d, n, r, 0.0};
        LoraWorkload lora_run(s);
        lora_run.step();
        print_report("lora", s, lora_run.memory(), lora_run.trainable_parameters(), lora_run.caller_bytes());
        ok = ok && lora_run.memory().optimizer_bytes == 8u * static_cast<std::size_t>(lora_run.trainable_parameters());
      }
    }
  }
  std::printf("optimizer_state_is_8_bytes_per_trainable=%s\n", ok ? "yes" : "NO");
  return ok;
}

// Bytes of the frozen W per weight, for the workloads that report it.
template <class Workload>
auto print_base_bytes(const Workload& w, int) -> decltype(w.base_bytes_per_parameter(), void()) {
  std::printf(" base_bytes_per_param=%.4f", w.base_bytes_per_parameter());
}
template <class Workload>
void print_base_bytes(const Workload&, long) {}

template <class Workload>
void run_steps(const char* mode, const Shape& s, int steps) {
  const long base_rss = rss_now_kb();  // nothing allocated yet
  Workload w(s);
  std::vector<double> ms;
  for (int i = 0; i < steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    w.step();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  print_report(mode, s, w.memory(), w.trainable_parameters(), w.caller_bytes());
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  // The first step pays for page faults and thread start-up; the median skips it
  // only as much as any single outlier.
  const double median = sorted.empty() ? 0.0 : sorted[sorted.size() / 2];
  std::printf("lib=lora mode=%s d=%lld n=%lld r=%d dropout=%g threads=%d steps=%d median_ms=%.2f peak_rss_kb=%ld "
              "base_rss_kb=%ld",
              mode, static_cast<long long>(s.d), static_cast<long long>(s.n), s.r, s.dropout, threads(), steps, median,
              peak_rss_kb(), base_rss);
  print_base_bytes(w, 0);
  std::printf("\n");
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s --mode report|lora|nf4|full [--d D] [--n N] [--r R] [--steps S] [--dropout P]\n", argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode;
  Shape s{4096, 2048, 16, 0.0};
  int steps = 10;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage(argv[0]);
    const char* value = argv[++i];
    if (arg == "--mode") {
      mode = value;
    } else if (arg == "--d") {
      s.d = std::atoll(value);
    } else if (arg == "--n") {
      s.n = std::atoll(value);
    } else if (arg == "--r") {
      s.r = std::atoi(value);
    } else if (arg == "--steps") {
      steps = std::atoi(value);
    } else if (arg == "--dropout") {
      s.dropout = std::atof(value);
    } else {
      return usage(argv[0]);
    }
  }
  try {
    if (mode == "report") return report_all() ? 0 : 1;
    if (s.d < 1 || s.n < 1 || steps < 1) return usage(argv[0]);
    if (mode == "lora") {
      run_steps<LoraWorkload>("lora", s, steps);
    } else if (mode == "nf4") {
      run_steps<Nf4LoraWorkload>("nf4", s, steps);
    } else if (mode == "full") {
      s.r = 0;
      run_steps<FullFineTune>("full", s, steps);
    } else {
      return usage(argv[0]);
    }
  } catch (const lora::Error& e) {
    std::fprintf(stderr, "bench_memory: %s\n", e.what());
    return 1;
  }
  return 0;
}

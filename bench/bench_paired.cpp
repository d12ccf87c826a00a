// Step-by-step paired ratios on the CPU: the floor (the two frozen GEMMs), the
// LoRA step and the LoRA step with dropout 0.1 run one step each in turn, the
// order rotated every round, and each round's ratios are formed from its own
// three steps. A machine whose speed drifts (other tenants, clocks) moves all
// three steps of a round together, so the ratios keep what separate runs lose.
//
//   bench_paired [d] [N] [r] [rounds]       (default 4096 2048 16 15)
//
// Prints one line per round and the median, lowest and highest of each ratio.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include "workload.hpp"

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  using lora::bench::Shape;
  const std::int64_t d = argc > 1 ? std::atoll(argv[1]) : 4096;
  const std::int64_t n = argc > 2 ? std::atoll(argv[2]) : 2048;
  const int r = argc > 3 ? std::atoi(argv[3]) : 16;
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 15;
  if (d <= 0 || n <= 0 || r <= 0 || rounds <= 0) {
    std::fprintf(stderr, "usage: bench_paired [d] [N] [r] [rounds], all > 0\n");
    return 2;
  }
  lora::bench::FrozenGemms floor_work(Shape{d, n, 0, 0.0});
  lora::bench::LoraWorkload lora_work(Shape{d, n, r, 0.0});
  lora::bench::LoraWorkload dropout_work(Shape{d, n, r, 0.1});
  const std::vector<std::function<void()>> steps = {[&] { floor_work.step(); }, [&] { lora_work.step(); },
                                                    [&] { dropout_work.step(); }};
  for (const auto& step : steps) step();  // warm-up: page faults, thread pools

  // Small shapes repeat each step so that a timed unit lasts ~10 ms or more.
  const int repeat = static_cast<int>(std::clamp<double>(4e8 / (2.0 * static_cast<double>(n) * d * d), 1, 64));
  std::printf("bench_paired d=%lld N=%lld r=%d rounds=%d repeat=%d (ms per step)\n", static_cast<long long>(d),
              static_cast<long long>(n), r, rounds, repeat);
  std::printf("round  floor_ms  lora_ms  dropout_ms  lora/floor  dropout/floor  dropout/lora\n");
  std::vector<double> lora_floor, dropout_floor, dropout_lora;
  for (int round = 0; round < rounds; ++round) {
    double ms[3] = {};
    for (int k = 0; k < 3; ++k) {
      const int which = (k + round) % 3;  // rotate the order
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < repeat; ++i) steps[static_cast<std::size_t>(which)]();
      const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
      ms[which] = elapsed.count() / repeat;
    }
    lora_floor.push_back(ms[1] / ms[0]);
    dropout_floor.push_back(ms[2] / ms[0]);
    dropout_lora.push_back(ms[2] / ms[1]);
    std::printf("%5d %9.2f %8.2f %11.2f %11.3f %14.3f %13.3f\n", round, ms[0], ms[1], ms[2], lora_floor.back(),
                dropout_floor.back(), dropout_lora.back());
  }
  auto summary = [](const char* name, const std::vector<double>& v) {
    std::printf("%-14s median %.3f  lowest %.3f  highest %.3f\n", name, median(v),
                *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()));
  };
  summary("lora/floor", lora_floor);
  summary("dropout/floor", dropout_floor);
  summary("dropout/lora", dropout_lora);
  return 0;
}

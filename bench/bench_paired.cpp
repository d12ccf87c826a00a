// Step-by-step paired ratios on the CPU: the floor (the two frozen GEMMs), the
// LoRA step and the LoRA step with dropout 0.1 run one step each in turn, the
// order rotated every round, each timed after an untimed step of its own (so
// that its data is as warm as in a loop over it, at any shape and however many
// workloads the program holds), and each round's ratios are formed from its
// own steps. A machine whose speed drifts (other tenants, clocks) moves all steps
// of a round together, so the ratios keep what separate runs lose.
//
//   bench_paired [d] [N] [r] [rounds]       (default 4096 2048 16 15)
//
// Built as bench_ab (bench/ab.sh, LORA_PAIRED_AB), the program holds two
// revisions of the library, A and B, and times the LoRA and dropout steps of
// both beside one floor: a before/after comparison inside one process, with
// B/A formed per round.
//
// Prints one line per round and the median, lowest and highest of each ratio.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "paired.hpp"

#if defined(LORA_PAIRED_AB)
paired::Steps lora_paired_steps_a(std::int64_t d, std::int64_t n, int r, bool with_floor);
paired::Steps lora_paired_steps_b(std::int64_t d, std::int64_t n, int r, bool with_floor);
#else
paired::Steps lora_paired_steps(std::int64_t d, std::int64_t n, int r, bool with_floor);
#endif

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Unit {  // one timed step
  std::string name;
  std::function<void()> step;
};
struct Ratio {  // units[num] / units[den], one value per round
  std::string name;
  std::size_t num, den;
  std::vector<double> values;
};

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t d = argc > 1 ? std::atoll(argv[1]) : 4096;
  const std::int64_t n = argc > 2 ? std::atoll(argv[2]) : 2048;
  const int r = argc > 3 ? std::atoi(argv[3]) : 16;
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 15;
  if (d <= 0 || n <= 0 || r <= 0 || rounds <= 0) {
    std::fprintf(stderr, "usage: %s [d] [N] [r] [rounds], all > 0\n", argv[0]);
    return 2;
  }
#if defined(LORA_PAIRED_AB)
  const paired::Steps a = lora_paired_steps_a(d, n, r, true), b = lora_paired_steps_b(d, n, r, false);
  const std::vector<Unit> units = {
      {"floor", a.floor}, {"A:lora", a.lora}, {"A:dropout", a.dropout}, {"B:lora", b.lora}, {"B:dropout", b.dropout}};
  std::vector<Ratio> ratios = {{"A:lora/floor", 1, 0, {}},    {"B:lora/floor", 3, 0, {}},
                               {"A:dropout/floor", 2, 0, {}}, {"B:dropout/floor", 4, 0, {}},
                               {"B/A:lora", 3, 1, {}},        {"B/A:dropout", 4, 2, {}}};
#else
  const paired::Steps s = lora_paired_steps(d, n, r, true);
  const std::vector<Unit> units = {{"floor", s.floor}, {"lora", s.lora}, {"dropout", s.dropout}};
  std::vector<Ratio> ratios = {{"lora/floor", 1, 0, {}}, {"dropout/floor", 2, 0, {}}, {"dropout/lora", 2, 1, {}}};
#endif
  // Small shapes repeat each step so that a timed unit lasts ~10 ms or more.
  const int repeat = static_cast<int>(std::clamp<double>(4e8 / (2.0 * static_cast<double>(n) * d * d), 1, 64));
  std::printf("%s d=%lld N=%lld r=%d rounds=%d repeat=%d (ms per step)\nround", argv[0], static_cast<long long>(d),
              static_cast<long long>(n), r, rounds, repeat);
  auto width = [](const std::string& name) { return static_cast<int>(std::max<std::size_t>(name.size(), 8)); };
  for (const Unit& u : units) std::printf(" %*s", width(u.name), u.name.c_str());
  for (const Ratio& q : ratios) std::printf(" %*s", width(q.name), q.name.c_str());
  std::printf("\n");
  const std::size_t count = units.size();
  for (int round = 0; round < rounds; ++round) {
    std::vector<double> ms(count);
    for (std::size_t k = 0; k < count; ++k) {
      const std::size_t which = (k + static_cast<std::size_t>(round)) % count;  // rotate the order
      units[which].step();  // untimed: page faults, thread pools, and the unit's data as warm as in a loop over it
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < repeat; ++i) units[which].step();
      const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
      ms[which] = elapsed.count() / repeat;
    }
    std::printf("%5d", round);
    for (std::size_t k = 0; k < count; ++k) std::printf(" %*.2f", width(units[k].name), ms[k]);
    for (Ratio& q : ratios) {
      q.values.push_back(ms[q.num] / ms[q.den]);
      std::printf(" %*.3f", width(q.name), q.values.back());
    }
    std::printf("\n");
  }
  for (const Ratio& q : ratios) {
    const auto [lowest, highest] = std::minmax_element(q.values.begin(), q.values.end());
    std::printf("%-16s median %.3f  lowest %.3f  highest %.3f\n", q.name.c_str(), median(q.values), *lowest, *highest);
  }
  return 0;
}

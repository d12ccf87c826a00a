// The demo's training loop: random training windows, validation loss over
// fixed windows, progress lines and the loss curve of each phase
// (pretraining, each adapter, full fine-tuning).
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "model.hpp"
#include "text.hpp"

namespace demo {

// `batch` windows of t + 1 tokens at random offsets: inputs are tokens
// [o, o + t), targets [o + 1, o + t + 1).
inline void sample_windows(const std::vector<int>& tokens, int batch, int t, Rng& rng, std::vector<int>& inputs,
                           std::vector<int>& targets) {
  LORA_CHECK(tokens.size() > static_cast<std::size_t>(t) + 1,
             "training text: expected more than " << t + 1 << " tokens, found " << tokens.size());
  inputs.resize(static_cast<std::size_t>(batch) * t);
  targets.resize(inputs.size());
  for (int b = 0; b < batch; ++b) {
    const std::size_t offset = rng.below(tokens.size() - static_cast<std::size_t>(t));
    for (int i = 0; i < t; ++i) {
      inputs[static_cast<std::size_t>(b * t + i)] = tokens[offset + static_cast<std::size_t>(i)];
      targets[static_cast<std::size_t>(b * t + i)] = tokens[offset + static_cast<std::size_t>(i) + 1];
    }
  }
}

// Mean next-token loss (nats per character) over the non-overlapping windows
// [k t, k t + t) of `tokens`, at most `max_windows` of them, in batches, with
// the model's active adapters (none: the base alone).
template <class Net>
double evaluate(Net& model, const std::vector<int>& tokens, int batch, int t,
                std::size_t max_windows = static_cast<std::size_t>(-1)) {
  const std::size_t windows = std::min((tokens.size() - 1) / static_cast<std::size_t>(t), max_windows);
  LORA_CHECK(windows >= 1, "validation text: expected at least " << t + 1 << " tokens, found " << tokens.size());
  std::vector<int> inputs, targets;
  double total = 0.0;
  for (std::size_t first = 0; first < windows; first += static_cast<std::size_t>(batch)) {
    const int count = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(batch), windows - first));
    inputs.resize(static_cast<std::size_t>(count) * t);
    targets.resize(inputs.size());
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      const std::size_t position = first * static_cast<std::size_t>(t) + k;
      inputs[k] = tokens[position];
      targets[k] = tokens[position + 1];
    }
    model.forward(inputs.data(), count, t, lora::Mode::eval);
    total += model.loss(targets.data()) * count;
  }
  return total / static_cast<double>(windows);
}

// One row of a loss curve; NaN where a loss was not measured.
struct CurvePoint {
  std::string phase;
  int step;
  double train_loss;
  double val_loss;      // in-domain validation loss
  double general_loss;  // general-corpus validation loss of the model being trained
};

struct PhaseStats {
  int steps = 0;
  double train_seconds = 0.0;  // inside train steps only (evaluations excluded)
  std::int64_t tokens_per_step = 0;
  double ms_per_step() const { return 1e3 * train_seconds / std::max(1, steps); }
  double tokens_per_second() const {
    return static_cast<double>(tokens_per_step) * steps / std::max(1e-9, train_seconds);
  }
};

// Runs `steps` calls of train_step(step) -> loss, timing them; before the
// first step, every tenth of the way and at the end calls validate() ->
// {in-domain, general} losses, records a curve point and prints a progress
// line unless quiet.
inline PhaseStats run_phase(const std::string& phase, int steps, std::int64_t tokens_per_step, bool quiet,
                            const std::function<double(int)>& train_step,
                            const std::function<std::pair<double, double>()>& validate,
                            std::vector<CurvePoint>& curve) {
  using Clock = std::chrono::steady_clock;
  PhaseStats stats;
  stats.steps = steps;
  stats.tokens_per_step = tokens_per_step;
  const int report_every = std::max(1, steps / 10);
  double loss_sum = 0.0;
  int loss_count = 0;
  const double nan = std::nan("");
  {
    const auto [val, general] = validate();  // where the curve starts
    curve.push_back({phase, 0, nan, val, general});
  }
  for (int step = 0; step < steps; ++step) {
    const auto start = Clock::now();
    const double loss = train_step(step);
    stats.train_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    LORA_CHECK(std::isfinite(loss), phase << ": the training loss is " << loss << " at step " << step);
    loss_sum += loss;
    ++loss_count;
    const bool last = step + 1 == steps;
    if ((step + 1) % report_every != 0 && !last) {
      curve.push_back({phase, step + 1, loss, nan, nan});
      continue;
    }
    const auto [val, general] = validate();
    curve.push_back({phase, step + 1, loss, val, general});
    if (!quiet) {
      const double per_step = stats.train_seconds / (step + 1);
      std::printf("    %-18s step %5d/%-5d  loss %.3f  val %.3f  %6.1fk tok/s  %5.1f s left\n", phase.c_str(), step + 1,
                  steps, loss_sum / loss_count, val, static_cast<double>(tokens_per_step) / per_step / 1e3,
                  per_step * (steps - step - 1));
      std::fflush(stdout);
    }
    loss_sum = 0.0;
    loss_count = 0;
  }
  return stats;
}

}  // namespace demo

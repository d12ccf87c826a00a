// lora::LrScheduler: the learning-rate shapes transformers' get_scheduler
// offers as lr_scheduler_type, applied to an Adam as a multiplier of each
// group's own base rate (LoRA+ keeps B's larger rate). The multiplier is a pure
// function of Adam's step count, so a run resumed from a checkpoint (which
// restores the step count) gets the same rates with no scheduler state saved.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/optim/adam.hpp"

namespace lora {

// transformers' SchedulerType names (lr_scheduler_type) that lora implements.
enum class LrScheduleType { constant, constant_with_warmup, linear, cosine, cosine_with_min_lr };

inline constexpr LrScheduleType kLrScheduleTypes[] = {LrScheduleType::constant, LrScheduleType::constant_with_warmup,
                                                      LrScheduleType::linear, LrScheduleType::cosine,
                                                      LrScheduleType::cosine_with_min_lr};

inline const char* to_string(LrScheduleType type) {
  switch (type) {
    case LrScheduleType::constant: return "constant";
    case LrScheduleType::constant_with_warmup: return "constant_with_warmup";
    case LrScheduleType::linear: return "linear";
    case LrScheduleType::cosine: return "cosine";
    case LrScheduleType::cosine_with_min_lr: return "cosine_with_min_lr";
  }
  return "unknown";
}

// "cosine" -> LrScheduleType::cosine; anything else named by its transformers name.
inline LrScheduleType parse_lr_schedule_type(const std::string& name) {
  std::string accepted;
  for (const LrScheduleType type : kLrScheduleTypes) {
    if (name == to_string(type)) return type;
    accepted += std::string(accepted.empty() ? "" : ", ") + to_string(type);
  }
  LORA_CHECK(false, "lr_scheduler_type \"" << name << "\" is not supported; expected one of: " << accepted);
  return LrScheduleType::constant;  // not reached
}

// One schedule, with transformers' argument names. Steps count optimizer steps
// from 0; the rate at step t is base_lr * multiplier(t).
struct LrSchedule {
  LrScheduleType type = LrScheduleType::constant;
  std::int64_t warmup_steps = 0;  // num_warmup_steps: linear ramp from 0 (not for `constant`)
  std::int64_t total_steps = 0;   // num_training_steps: required (>= 1) by linear and the cosines
  double min_lr_rate = 0.0;       // cosine_with_min_lr only: the floor, as a fraction of the base rate

  bool decays() const {
    return type == LrScheduleType::linear || type == LrScheduleType::cosine ||
           type == LrScheduleType::cosine_with_min_lr;
  }

  void validate() const {
    const char* name = to_string(type);
    LORA_CHECK(warmup_steps >= 0, "LrSchedule.warmup_steps = " << warmup_steps << ", expected >= 0");
    LORA_CHECK(total_steps >= 0, "LrSchedule.total_steps = " << total_steps << ", expected >= 0");
    LORA_CHECK(type != LrScheduleType::constant || warmup_steps == 0,
               "LrSchedule.warmup_steps = " << warmup_steps
                                            << " with \"constant\", which has no warmup; use \"constant_with_warmup\"");
    LORA_CHECK(!decays() || total_steps >= 1,
               "LrSchedule.total_steps = " << total_steps << ": \"" << name << "\" needs the number of training steps (>= 1)");
    LORA_CHECK(total_steps == 0 || warmup_steps <= total_steps,
               "LrSchedule.warmup_steps = " << warmup_steps << ", expected <= total_steps = " << total_steps);
    LORA_CHECK(std::isfinite(min_lr_rate) && min_lr_rate >= 0.0 && min_lr_rate <= 1.0,
               "LrSchedule.min_lr_rate = " << min_lr_rate << ", expected a finite value in [0, 1]");
    LORA_CHECK(type == LrScheduleType::cosine_with_min_lr || min_lr_rate == 0.0,
               "LrSchedule.min_lr_rate = " << min_lr_rate << " with \"" << name
                                           << "\", which has no floor; use \"cosine_with_min_lr\"");
  }

  // transformers' lr_lambda (optimization.py), W = warmup_steps, T = total_steps:
  //   t < W:               t / max(1, W)
  //   constant(_with_warmup): 1
  //   linear:              max(0, (T - t) / max(1, T - W))
  //   cosine:              0.5 (1 + cos(pi p)),   p = (t - W) / max(1, T - W)   (num_cycles = 0.5)
  //   cosine_with_min_lr:  rate + (1 - rate) 0.5 (1 + cos(pi p))
  // Past T the decays hold their final value (t is taken as T): transformers'
  // cosine would rise again there.
  double multiplier(std::int64_t step) const {
    LORA_CHECK(step >= 0, "LrSchedule::multiplier: step = " << step << ", expected >= 0");
    if (step < warmup_steps) return static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup_steps));
    if (!decays()) return 1.0;
    const std::int64_t t = std::min(step, total_steps);
    const double span = static_cast<double>(std::max<std::int64_t>(1, total_steps - warmup_steps));
    if (type == LrScheduleType::linear) return std::max(0.0, static_cast<double>(total_steps - t) / span);
    const double pi = 3.14159265358979323846;
    const double cosine = 0.5 * (1.0 + std::cos(pi * static_cast<double>(t - warmup_steps) / span));
    if (type == LrScheduleType::cosine) return std::max(0.0, cosine);
    return std::max(0.0, min_lr_rate + (1.0 - min_lr_rate) * cosine);
  }
};

// A schedule over an optimizer's groups: group g's rate is base_lrs[g] *
// schedule.multiplier(adam.step_count()). Call apply(adam) before each
// adam.step(), as transformers calls lr_scheduler.step() after each
// optimizer step. A step skipped for non-finite gradients does not advance the
// step count, and so not the rate either (as the Trainer skips the scheduler).
//
// Resuming: load_checkpoint restores the step count (and the rates of the
// saved step); apply() then gives the rate of the next step. The base rates
// are not saved: they are what the trainer passes to add_group in every run.
class LrScheduler {
 public:
  LrScheduler(const LrSchedule& schedule, std::vector<double> base_lrs)
      : schedule_(schedule), base_lrs_(std::move(base_lrs)) {
    schedule_.validate();
    LORA_CHECK(!base_lrs_.empty(), "LrScheduler: no base rates; the optimizer has no groups yet");
    for (std::size_t g = 0; g < base_lrs_.size(); ++g)
      check_learning_rate(base_lrs_[g], "LrScheduler: base rate of group " + std::to_string(g));
  }

  // The base rates are the optimizer's group rates now: build it after the
  // add_group calls and before load_checkpoint, which sets the rates to those
  // of the saved step (a scheduler built after it would scale them twice).
  template <class P, class Backend>
  LrScheduler(const LrSchedule& schedule, const Adam<P, Backend>& adam)
      : LrScheduler(schedule, group_rates(adam)) {}

  // Sets every group's rate for the optimizer's next step.
  template <class P, class Backend>
  void apply(Adam<P, Backend>& adam) const {
    LORA_CHECK(adam.group_count() == base_lrs_.size(), "LrScheduler::apply: the optimizer has "
                                                           << adam.group_count() << " groups, the scheduler "
                                                           << base_lrs_.size() << " base rates");
    const double m = schedule_.multiplier(adam.step_count());
    for (std::size_t g = 0; g < base_lrs_.size(); ++g) adam.set_lr(g, base_lrs_[g] * m);
  }

  // Group g's rate at `step`.
  double lr(std::size_t group, std::int64_t step) const {
    LORA_CHECK(group < base_lrs_.size(),
               "LrScheduler::lr: group " << group << " does not exist; there are " << base_lrs_.size());
    return base_lrs_[group] * schedule_.multiplier(step);
  }

  const LrSchedule& schedule() const { return schedule_; }
  const std::vector<double>& base_lrs() const { return base_lrs_; }

 private:
  template <class P, class Backend>
  static std::vector<double> group_rates(const Adam<P, Backend>& adam) {
    LORA_CHECK(adam.step_count() == 0,
               "LrScheduler: the optimizer has taken " << adam.step_count()
                   << " steps, so its rates may already be scheduled; build the scheduler before "
                      "load_checkpoint, or pass the base rates");
    std::vector<double> rates;
    for (std::size_t g = 0; g < adam.group_count(); ++g) rates.push_back(adam.lr(g));
    return rates;
  }

  LrSchedule schedule_;
  std::vector<double> base_lrs_;
};

}  // namespace lora

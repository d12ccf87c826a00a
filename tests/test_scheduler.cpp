// lora::LrSchedule / LrScheduler against transformers' documented schedule
// formulas (optimization.py, get_*_schedule_with_warmup), worked by hand below,
// and against torch.optim.lr_scheduler.LambdaLR driving AdamW step by step;
// per-group base rates kept (LoRA+); a resumed run gets the same rates; the
// names and arguments it refuses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "io_test_util.hpp"
#include "lora/lora.hpp"

namespace {

using io_test::expect_error;
using lora::LrSchedule;
using lora::LrScheduler;
using lora::LrScheduleType;
using lora::Parameter;
using lora::cpu::Matrix;

LrSchedule schedule(LrScheduleType type, std::int64_t warmup, std::int64_t total, double min_lr_rate = 0.0) {
  LrSchedule s;
  s.type = type;
  s.warmup_steps = warmup;
  s.total_steps = total;
  s.min_lr_rate = min_lr_rate;
  return s;
}

// The schedules below use W = 3 warmup steps of T = 11, so T - W = 8 and
//   warmup (t < 3):  t / 3                        -> 0, 1/3, 2/3
//   linear:          (11 - t) / 8                 -> t = 3: 1, t = 7: 1/2, t = 10: 1/8, t = 11: 0
//   cosine:          (1 + cos(pi (t - 3) / 8)) / 2
//                      t = 5:  (1 + cos(pi/4)) / 2  = (1 + sqrt(1/2)) / 2
//                      t = 7:  (1 + cos(pi/2)) / 2  = 1/2
//                      t = 9:  (1 + cos(3pi/4)) / 2 = (1 - sqrt(1/2)) / 2
//                      t = 11: (1 + cos(pi)) / 2    = 0
//   min_lr rate 0.1: 0.1 + 0.9 * cosine            -> t = 7: 0.55, t = 11: 0.1
constexpr std::int64_t kW = 3, kT = 11;
constexpr double kTol = 1e-15;
const double kHalfRoot = std::sqrt(0.5);

TEST(LrSchedule, ConstantIsOneAtEveryStep) {
  const LrSchedule s = schedule(LrScheduleType::constant, 0, 0);
  for (const std::int64_t t : {0, 1, 7, 1000000}) EXPECT_EQ(s.multiplier(t), 1.0) << "step " << t;
}

TEST(LrSchedule, ConstantWithWarmupRampsThenHolds) {
  for (const std::int64_t total : {std::int64_t{0}, kT}) {  // the total is optional here
    const LrSchedule s = schedule(LrScheduleType::constant_with_warmup, kW, total);
    EXPECT_EQ(s.multiplier(0), 0.0);
    EXPECT_NEAR(s.multiplier(1), 1.0 / 3, kTol);
    EXPECT_NEAR(s.multiplier(2), 2.0 / 3, kTol);
    EXPECT_EQ(s.multiplier(3), 1.0);
    EXPECT_EQ(s.multiplier(50), 1.0);
  }
}

TEST(LrSchedule, LinearWarmsUpThenDecaysToZero) {
  const LrSchedule s = schedule(LrScheduleType::linear, kW, kT);
  EXPECT_EQ(s.multiplier(0), 0.0);
  EXPECT_NEAR(s.multiplier(2), 2.0 / 3, kTol);
  EXPECT_EQ(s.multiplier(3), 1.0);
  EXPECT_EQ(s.multiplier(7), 0.5);
  EXPECT_EQ(s.multiplier(10), 0.125);
  EXPECT_EQ(s.multiplier(11), 0.0);
  EXPECT_EQ(s.multiplier(20), 0.0);  // max(0, ...) past the end
  // No warmup: (4 - t) / 4 from the first step.
  const LrSchedule no_warmup = schedule(LrScheduleType::linear, 0, 4);
  EXPECT_EQ(no_warmup.multiplier(0), 1.0);
  EXPECT_EQ(no_warmup.multiplier(1), 0.75);
  // Warmup over every step (W = T = 4): t / 4, then (4 - 4) / max(1, 0) = 0.
  const LrSchedule all_warmup = schedule(LrScheduleType::linear, 4, 4);
  EXPECT_EQ(all_warmup.multiplier(3), 0.75);
  EXPECT_EQ(all_warmup.multiplier(4), 0.0);
}

TEST(LrSchedule, CosineWarmsUpThenFollowsHalfACosineToZero) {
  const LrSchedule s = schedule(LrScheduleType::cosine, kW, kT);
  EXPECT_EQ(s.multiplier(0), 0.0);
  EXPECT_NEAR(s.multiplier(1), 1.0 / 3, kTol);
  EXPECT_EQ(s.multiplier(3), 1.0);
  EXPECT_NEAR(s.multiplier(5), (1 + kHalfRoot) / 2, kTol);
  EXPECT_NEAR(s.multiplier(7), 0.5, kTol);
  EXPECT_NEAR(s.multiplier(9), (1 - kHalfRoot) / 2, kTol);
  EXPECT_EQ(s.multiplier(11), 0.0);
  // Past T the rate stays at its end; transformers' formula would rise again
  // ((1 + cos(pi 12/8)) / 2 = 1/2 at t = 15).
  EXPECT_EQ(s.multiplier(15), 0.0);
  // No warmup: (1 + cos(pi t / 4)) / 2 -> t = 0: 1, t = 2: 1/2.
  const LrSchedule no_warmup = schedule(LrScheduleType::cosine, 0, 4);
  EXPECT_EQ(no_warmup.multiplier(0), 1.0);
  EXPECT_NEAR(no_warmup.multiplier(2), 0.5, kTol);
}

TEST(LrSchedule, CosineWithMinLrFloorsAtTheRate) {
  const LrSchedule s = schedule(LrScheduleType::cosine_with_min_lr, kW, kT, 0.1);
  EXPECT_NEAR(s.multiplier(1), 1.0 / 3, kTol);  // the warmup starts from 0, not from the floor
  EXPECT_EQ(s.multiplier(3), 1.0);
  EXPECT_NEAR(s.multiplier(5), 0.1 + 0.9 * (1 + kHalfRoot) / 2, kTol);
  EXPECT_NEAR(s.multiplier(7), 0.55, kTol);
  EXPECT_NEAR(s.multiplier(11), 0.1, kTol);
  EXPECT_NEAR(s.multiplier(40), 0.1, kTol);
  // A rate of 0 is plain cosine.
  const LrSchedule zero = schedule(LrScheduleType::cosine_with_min_lr, kW, kT, 0.0);
  const LrSchedule cosine = schedule(LrScheduleType::cosine, kW, kT);
  for (std::int64_t t = 0; t <= kT; ++t) EXPECT_EQ(zero.multiplier(t), cosine.multiplier(t)) << "step " << t;
}

// Two tensors in two groups, as LoRA+ puts A and B, with base rates 2e-4 and
// 16 x 2e-4. Each holds one element; its gradient is set by the test.
struct TwoGroups {
  static constexpr double kLrA = 2e-4, kLrB = 16 * 2e-4;
  lora::cpu::Context ctx;
  Matrix<double> a{1, 1}, b{1, 1}, ga{1, 1}, gb{1, 1};
  lora::cpu::Adam<double> adam{ctx, lora::AdamOptions::adamw(kLrA, 0.0)};
  TwoGroups() {
    a.data()[0] = b.data()[0] = 0.0;
    ga.data()[0] = gb.data()[0] = 1.0;
    adam.add_group({Parameter<double>{a.view(), ga.view(), "lora_A"}});
    adam.add_group({Parameter<double>{b.view(), gb.view(), "lora_B"}}, kLrB);
  }
};

// torch 1.13: AdamW with groups {lr 2e-4}, {lr 3.2e-3} under
// LambdaLR(opt, transformers' cosine lambda with W = 3, T = 11); each group's
// lr read before each opt.step(), then sch.step() after it. The script:
//   for k in range(12): rows.append([g["lr"] for g in opt.param_groups]); loss.backward(); opt.step(); sch.step()
const std::vector<std::pair<double, double>> kTorchCosineRates = {
    {0.0, 0.0},                                         // step 0
    {6.666666666666667e-05, 0.0010666666666666667},     // step 1
    {0.00013333333333333334, 0.0021333333333333334},    // step 2
    {0.0002, 0.0032},                                   // step 3
    {0.0001923879532511287, 0.003078207252018059},      // step 4
    {0.00017071067811865476, 0.002731370849898476},     // step 5
    {0.000138268343236509, 0.002212293491784144},       // step 6
    {0.0001, 0.0016},                                   // step 7
    {6.173165676349103e-05, 0.0009877065082158564},     // step 8
    {2.9289321881345254e-05, 0.00046862915010152407},   // step 9
    {7.612046748871327e-06, 0.00012179274798194123},    // step 10
    {0.0, 0.0},                                         // step 11
};

TEST(LrScheduler, MatchesTorchLambdaLROnEachGroupStepByStep) {
  TwoGroups run;
  const LrScheduler scheduler(schedule(LrScheduleType::cosine, kW, kT), run.adam);
  EXPECT_EQ(scheduler.base_lrs(), (std::vector<double>{TwoGroups::kLrA, TwoGroups::kLrB}));
  double moved_a = 0.0, moved_b = 0.0;
  for (std::size_t k = 0; k < kTorchCosineRates.size(); ++k) {
    scheduler.apply(run.adam);
    EXPECT_NEAR(run.adam.lr(0), kTorchCosineRates[k].first, 1e-15 * TwoGroups::kLrA) << "step " << k;
    EXPECT_NEAR(run.adam.lr(1), kTorchCosineRates[k].second, 1e-15 * TwoGroups::kLrB) << "step " << k;
    EXPECT_EQ(scheduler.lr(1, static_cast<std::int64_t>(k)), run.adam.lr(1));
    ASSERT_TRUE(run.adam.step());
    // The rate reaches the update: with a constant gradient m_hat = g and
    // v_hat = g^2, so each step moves the element by lr g / (|g| + eps).
    moved_a += kTorchCosineRates[k].first / (1 + 1e-8);
    moved_b += kTorchCosineRates[k].second / (1 + 1e-8);
    EXPECT_NEAR(-run.a.data()[0], moved_a, 1e-12 * TwoGroups::kLrA) << "step " << k;
    EXPECT_NEAR(-run.b.data()[0], moved_b, 1e-12 * TwoGroups::kLrB) << "step " << k;
  }
}

// What load_checkpoint restores of the optimizer (io/checkpoint.hpp): the
// step count and each group's rate at the time of saving.
void restore_as_load_checkpoint_does(lora::cpu::Adam<double>& adam, const lora::cpu::Adam<double>& saved) {
  adam.set_step_count(saved.step_count());
  for (std::size_t g = 0; g < saved.group_count(); ++g) adam.set_lr(g, saved.lr(g));
}

TEST(LrScheduler, AResumedRunGetsTheSameRatesWithNoSavedState) {
  const LrSchedule linear = schedule(LrScheduleType::linear, kW, kT);
  std::vector<std::pair<double, double>> uninterrupted;
  {
    TwoGroups run;
    const LrScheduler scheduler(linear, run.adam);
    for (std::int64_t k = 0; k < kT; ++k) {
      scheduler.apply(run.adam);
      uninterrupted.emplace_back(run.adam.lr(0), run.adam.lr(1));
      run.adam.step();
    }
  }
  TwoGroups first;
  {
    const LrScheduler scheduler(linear, first.adam);
    for (int k = 0; k < 5; ++k) {
      scheduler.apply(first.adam);
      first.adam.step();
    }
  }
  // The second process: the same add_group calls, the scheduler built from
  // them, then the checkpoint; or the scheduler given its base rates after it.
  TwoGroups second, third;
  const LrScheduler built_before(linear, second.adam);
  restore_as_load_checkpoint_does(second.adam, first.adam);
  restore_as_load_checkpoint_does(third.adam, first.adam);
  const LrScheduler given_rates(linear, {TwoGroups::kLrA, TwoGroups::kLrB});
  for (std::int64_t k = 5; k < kT; ++k) {
    built_before.apply(second.adam);
    given_rates.apply(third.adam);
    const auto expected = uninterrupted[static_cast<std::size_t>(k)];
    EXPECT_EQ(second.adam.lr(0), expected.first) << "step " << k;
    EXPECT_EQ(second.adam.lr(1), expected.second) << "step " << k;
    EXPECT_EQ(third.adam.lr(0), expected.first) << "step " << k;
    EXPECT_EQ(third.adam.lr(1), expected.second) << "step " << k;
    second.adam.step();
    third.adam.step();
  }
  // Built from the optimizer after the restore, it would take the scheduled
  // rates for base rates: refused.
  expect_error([&] { LrScheduler(linear, first.adam); },
               {"the optimizer has taken 5 steps", "before load_checkpoint, or pass the base rates"});
}

TEST(LrScheduler, ASkippedStepDoesNotAdvanceTheRate) {
  lora::cpu::Context ctx;
  lora::AdamOptions options = lora::AdamOptions::adamw(1e-3, 0.0);
  options.skip_nonfinite_steps = true;
  Matrix<double> a(1, 1), ga(1, 1);
  a.data()[0] = 0.0;
  lora::cpu::Adam<double> adam(ctx, options);
  adam.add_group({Parameter<double>{a.view(), ga.view(), "lora_A"}});
  const LrScheduler scheduler(schedule(LrScheduleType::linear, 0, 4), adam);
  ga.data()[0] = 1.0;
  scheduler.apply(adam);
  ASSERT_TRUE(adam.step());
  ga.data()[0] = std::numeric_limits<double>::infinity();
  scheduler.apply(adam);
  EXPECT_EQ(adam.lr(0), 0.75e-3);  // (4 - 1) / 4
  ASSERT_FALSE(adam.step());
  ga.data()[0] = 1.0;
  scheduler.apply(adam);
  EXPECT_EQ(adam.lr(0), 0.75e-3);  // still step 1
}

TEST(LrScheduleType, ParsesTransformersNamesAndListsThemForAnUnknownOne) {
  EXPECT_EQ(lora::parse_lr_schedule_type("constant"), LrScheduleType::constant);
  EXPECT_EQ(lora::parse_lr_schedule_type("constant_with_warmup"), LrScheduleType::constant_with_warmup);
  EXPECT_EQ(lora::parse_lr_schedule_type("linear"), LrScheduleType::linear);
  EXPECT_EQ(lora::parse_lr_schedule_type("cosine"), LrScheduleType::cosine);
  EXPECT_EQ(lora::parse_lr_schedule_type("cosine_with_min_lr"), LrScheduleType::cosine_with_min_lr);
  for (const LrScheduleType type : lora::kLrScheduleTypes)
    EXPECT_EQ(lora::parse_lr_schedule_type(lora::to_string(type)), type);
  expect_error([] { lora::parse_lr_schedule_type("cosine_with_restarts"); },
               {"lr_scheduler_type \"cosine_with_restarts\" is not supported",
                "expected one of: constant, constant_with_warmup, linear, cosine, cosine_with_min_lr"});
  expect_error([] { lora::parse_lr_schedule_type("Cosine"); }, {"\"Cosine\" is not supported"});
}

TEST(LrScheduler, RefusesInvalidArguments) {
  const auto invalid = [](LrSchedule s, std::initializer_list<std::string> parts) {
    expect_error([&] { LrScheduler(s, {1e-3}); }, parts);
  };
  invalid(schedule(LrScheduleType::linear, 0, 0), {"LrSchedule.total_steps = 0", "\"linear\" needs the number"});
  invalid(schedule(LrScheduleType::cosine, 0, -1), {"LrSchedule.total_steps = -1", "expected >= 0"});
  invalid(schedule(LrScheduleType::cosine, 12, 11), {"warmup_steps = 12, expected <= total_steps = 11"});
  invalid(schedule(LrScheduleType::constant_with_warmup, 12, 11), {"warmup_steps = 12, expected <= total_steps = 11"});
  invalid(schedule(LrScheduleType::linear, -1, 11), {"LrSchedule.warmup_steps = -1, expected >= 0"});
  invalid(schedule(LrScheduleType::constant, 3, 0), {"warmup_steps = 3 with \"constant\"", "constant_with_warmup"});
  invalid(schedule(LrScheduleType::cosine_with_min_lr, 0, 11, std::nan("")),
          {"LrSchedule.min_lr_rate = nan", "finite value in [0, 1]"});
  invalid(schedule(LrScheduleType::cosine_with_min_lr, 0, 11, 1.5), {"min_lr_rate = 1.5", "in [0, 1]"});
  invalid(schedule(LrScheduleType::cosine, 0, 11, 0.1), {"min_lr_rate = 0.1 with \"cosine\"", "cosine_with_min_lr"});
  expect_error([] { LrScheduler(LrSchedule{}, {1e-3, -1.0}); }, {"base rate of group 1 = -1", "finite value >= 0"});
  expect_error([] { LrScheduler(LrSchedule{}, {std::numeric_limits<double>::infinity()}); },
               {"base rate of group 0 = inf"});
  expect_error([] { LrScheduler(LrSchedule{}, std::vector<double>{}); }, {"no base rates"});
  expect_error([] { LrSchedule{}.multiplier(-1); }, {"LrSchedule::multiplier: step = -1, expected >= 0"});

  TwoGroups run;
  const LrScheduler one_group(LrSchedule{}, {1e-3});
  expect_error([&] { one_group.apply(run.adam); }, {"the optimizer has 2 groups, the scheduler 1 base rates"});
  expect_error([&] { one_group.lr(1, 0); }, {"LrScheduler::lr: group 1 does not exist"});
  lora::cpu::Context ctx;
  const lora::cpu::Adam<double> no_groups(ctx, lora::AdamOptions{});
  expect_error([&] { LrScheduler(LrSchedule{}, no_groups); }, {"no base rates; the optimizer has no groups yet"});
}

}  // namespace

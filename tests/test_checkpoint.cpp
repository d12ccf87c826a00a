// Checkpoints: a run stopped after k steps and resumed from its checkpoint
// ends with adapters, Adam moments and step count bit-identical to a run that
// never stopped (dropout on, two layers, LoRA+ groups), in float and double;
// dropping the RNG position or the step count would break that (checked);
// a mismatched or broken checkpoint is refused and changes nothing; numbers
// read and write the same under a comma-decimal locale.
#include <gtest/gtest.h>

#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "io_test_util.hpp"
#include "lora/io/checkpoint.hpp"
#include "lora/lora.hpp"

namespace {

using io_test::expect_error;
using io_test::TempDir;

template <class T>
std::vector<T> wave(std::size_t n, double phase) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<T>(0.5 * std::sin(0.731 * static_cast<double>(i) + phase));
  return v;
}

// x (5 x 7) -> l1 (7 -> 6) -> l2 (6 -> 4, with bias) -> loss 0.5 ||y - t||^2, AdamW with
// lora_B in its own group at 4x the learning rate (LoRA+). Batch s is a pure function of s.
template <class T>
struct TrainingRun {
  static constexpr int kN = 5;
  static lora::Config config(int r, double alpha) {
    lora::Config c;
    c.r = r;
    c.alpha = alpha;
    c.dropout = 0.25;
    c.seed = 1234;
    return c;
  }
  explicit TrainingRun(int r1 = 3)
      : W1(wave<T>(6 * 7, 1.0)),
        W2(wave<T>(4 * 6, 2.0)),
        b2(wave<T>(4, 3.0)),
        l1(ctx, {W1.data(), 6, 7}, {}, config(r1, 6.0), 0),
        l2(ctx, {W2.data(), 4, 6}, {b2.data(), 1, 4}, config(2, 2.0), 1),
        adam(ctx, lora::AdamOptions::adamw(1e-2, 0.01)) {
    adam.add_group({l1.lora_A(), l2.lora_A()});
    adam.add_group({l1.lora_B(), l2.lora_B()}, 4e-2);
  }
  TrainingRun(const TrainingRun&) = delete;
  TrainingRun& operator=(const TrainingRun&) = delete;

  void step(int s) {
    const std::vector<T> x = wave<T>(kN * 7, 10.0 * s), t = wave<T>(kN * 4, 10.0 * s + 5);
    std::vector<T> h(kN * 6), y(kN * 4), dL_dh(kN * 6);
    l1.forward({x.data(), kN, 7}, {h.data(), kN, 6});
    l2.forward({h.data(), kN, 6}, {y.data(), kN, 4});
    std::vector<T> dL_dy(y.size());
    for (std::size_t i = 0; i < y.size(); ++i) dL_dy[i] = y[i] - t[i];
    l2.backward({h.data(), kN, 6}, {dL_dy.data(), kN, 4}, {dL_dh.data(), kN, 6});
    l1.backward({x.data(), kN, 7}, {dL_dh.data(), kN, 6}, {});
    adam.step();
  }
  std::vector<lora::io::NamedLayer<T, lora::cpu::Backend>> layers() { return {{"enc.l1", &l1}, {"enc.l2", &l2}}; }

  // Every bit of state a resume must reproduce.
  std::vector<T> state() {
    std::vector<T> out;
    auto append = [&](lora::MatrixView<const T> v) { out.insert(out.end(), v.data, v.data + v.size()); };
    append(l1.A());
    append(l1.B());
    append(l2.A());
    append(l2.B());
    for (auto& m : adam.moments()) {
      append(m.m);
      append(m.v);
    }
    return out;
  }

  lora::cpu::Context ctx;
  std::vector<T> W1, W2, b2;
  lora::cpu::Linear<T> l1, l2;
  lora::cpu::Adam<T> adam;
};

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
void check_resume_is_bit_identical() {
  constexpr int kSteps = 10, kStop = 4;
  TrainingRun<T> uninterrupted;
  const std::vector<T> initial = uninterrupted.state();
  for (int s = 0; s < kSteps; ++s) uninterrupted.step(s);
  ASSERT_FALSE(same_bits(initial, uninterrupted.state())) << "training must move the adapter";

  TempDir tmp;
  const std::string path = tmp / "ckpt.safetensors";
  {
    TrainingRun<T> first;
    for (int s = 0; s < kStop; ++s) first.step(s);
    first.adam.set_skipped_steps(2);  // as if two steps had been skipped for non-finite gradients
    lora::io::save_checkpoint(path, first.layers(), first.adam, {{"next_batch", std::to_string(kStop)}});
  }  // the first process is gone
  TrainingRun<T> resumed;
  const auto user = lora::io::load_checkpoint(path, resumed.layers(), resumed.adam);
  ASSERT_EQ(user.at("next_batch"), std::to_string(kStop));
  EXPECT_EQ(resumed.adam.step_count(), kStop);
  EXPECT_EQ(resumed.adam.skipped_steps(), 2);
  EXPECT_EQ(resumed.l1.dropout_calls(), static_cast<std::uint32_t>(kStop));
  for (int s = std::stoi(user.at("next_batch")); s < kSteps; ++s) resumed.step(s);

  EXPECT_TRUE(same_bits(resumed.state(), uninterrupted.state()));
  EXPECT_EQ(resumed.adam.step_count(), uninterrupted.adam.step_count());
  EXPECT_EQ(resumed.l2.dropout_calls(), uninterrupted.l2.dropout_calls());
}

TEST(Checkpoint, ResumedFloatRunIsBitIdenticalToAnUninterruptedOne) { check_resume_is_bit_identical<float>(); }
TEST(Checkpoint, ResumedDoubleRunIsBitIdenticalToAnUninterruptedOne) { check_resume_is_bit_identical<double>(); }

TEST(Checkpoint, WithoutTheRngPositionOrTheStepCountTheRunsWouldDiffer) {
  // The resume test above could pass by accident if the restored RNG position or
  // step did not matter; here each one is dropped in turn and the result differs.
  TrainingRun<float> uninterrupted;
  for (int s = 0; s < 6; ++s) uninterrupted.step(s);
  TempDir tmp;
  {
    TrainingRun<float> first;
    for (int s = 0; s < 3; ++s) first.step(s);
    lora::io::save_checkpoint(tmp / "c.safetensors", first.layers(), first.adam);
  }
  for (int variant = 0; variant < 2; ++variant) {
    TrainingRun<float> resumed;
    lora::io::load_checkpoint(tmp / "c.safetensors", resumed.layers(), resumed.adam);
    if (variant == 0) {
      resumed.l1.set_dropout_calls(0);
      resumed.l2.set_dropout_calls(0);
    } else {
      resumed.adam.set_step_count(0);
    }
    for (int s = 3; s < 6; ++s) resumed.step(s);
    EXPECT_FALSE(same_bits(resumed.state(), uninterrupted.state())) << "variant " << variant;
  }
}

TEST(Checkpoint, AMismatchedOrBrokenCheckpointIsRefusedAndChangesNothing) {
  TempDir tmp;
  const std::string path = tmp / "c.safetensors";
  {
    TrainingRun<float> run;
    run.step(0);
    lora::io::save_checkpoint(path, run.layers(), run.adam);
  }
  TrainingRun<float> other(/*r1=*/4);  // l1 has rank 4, the checkpoint rank 3
  const std::vector<float> before = other.state();
  expect_error([&] { lora::io::load_checkpoint(path, other.layers(), other.adam); }, {"\"enc.l1\"", "r = 3", "r = 4"});
  EXPECT_TRUE(same_bits(before, other.state()));
  EXPECT_EQ(other.adam.step_count(), 0);

  TrainingRun<float> partial;
  expect_error([&] {
    lora::io::load_checkpoint<float, lora::cpu::Backend, float>(path, {{"enc.l2", &partial.l2}}, partial.adam);
  }, {"\"enc.l1\"", "not given"});

  TrainingRun<double> wider;
  expect_error([&] { lora::io::load_checkpoint(path, wider.layers(), wider.adam); }, {"F32", "expected F64"});

  std::vector<std::uint8_t> bytes = io_test::read_file(path);
  bytes.resize(bytes.size() - 1);
  io_test::write_file(tmp / "cut.safetensors", bytes);
  TrainingRun<float> target;
  const std::vector<float> target_before = target.state();
  EXPECT_THROW(lora::io::load_checkpoint(tmp / "cut.safetensors", target.layers(), target.adam), lora::Error);
  EXPECT_TRUE(same_bits(target_before, target.state()));

  lora::io::SafetensorsWriter not_a_checkpoint;
  not_a_checkpoint.set_metadata("format", "pt");
  not_a_checkpoint.write(tmp / "adapter.safetensors");
  expect_error([&] { lora::io::load_checkpoint(tmp / "adapter.safetensors", target.layers(), target.adam); },
               {"not a lora checkpoint"});
}

// A copy of checkpoint `from` with metadata `key` set to `value`.
void rewrite_metadata(const std::string& from, const std::string& to, const std::string& key, const std::string& value) {
  const lora::io::SafetensorsReader reader = lora::io::SafetensorsReader::open(from);
  lora::io::SafetensorsWriter writer;
  for (const auto& [k, v] : reader.metadata()) writer.set_metadata(k, k == key ? value : v);
  for (const lora::io::TensorInfo& t : reader.tensors()) writer.add_raw(t.name, reader.read_raw(t.name));
  writer.write(to);
}

// docs/io.md promises that a bad checkpoint changes nothing. A learning rate
// that parses but is not one (nan, -1, inf, 1e999) used to be refused by
// Adam::set_lr only after A, B, the moments, the step and the dropout
// counters had been overwritten.
TEST(Checkpoint, ABadLearningRateIsRefusedBeforeAnythingIsRestored) {
  TempDir tmp;
  const std::string path = tmp / "c.safetensors";
  {
    TrainingRun<float> run;
    for (int s = 0; s < 3; ++s) run.step(s);
    lora::io::save_checkpoint(path, run.layers(), run.adam);
  }
  TrainingRun<float> target;
  target.step(7);  // a state unlike the checkpoint's: step 1, one dropout call per layer
  const std::vector<float> before = target.state();
  for (const std::string bad : {"nan", "-nan", "-1", "inf", "-inf", "1e999", "0x1p-3", " 0.04", ""}) {
    SCOPED_TRACE("adam.lr.1 = \"" + bad + "\"");
    rewrite_metadata(path, tmp / "bad.safetensors", "adam.lr.1", bad);
    expect_error([&] { lora::io::load_checkpoint(tmp / "bad.safetensors", target.layers(), target.adam); },
                 {"adam.lr.1", bad});
    EXPECT_TRUE(same_bits(before, target.state()));  // A, B and both moments of every tensor
    EXPECT_EQ(target.adam.step_count(), 1);
    EXPECT_EQ(target.l1.dropout_calls(), 1u);
    EXPECT_EQ(target.l2.dropout_calls(), 1u);
    EXPECT_EQ(target.adam.lr(0), 1e-2);
    EXPECT_EQ(target.adam.lr(1), 4e-2);
  }
  // The same file with a good learning rate loads: the refusals were the value's.
  rewrite_metadata(path, tmp / "good.safetensors", "adam.lr.1", "0.125");
  lora::io::load_checkpoint(tmp / "good.safetensors", target.layers(), target.adam);
  EXPECT_EQ(target.adam.lr(1), 0.125);
  EXPECT_EQ(target.adam.step_count(), 3);
  EXPECT_EQ(target.l1.dropout_calls(), 3u);
}

// Sets the C locale to one whose decimal separator is a comma, for its scope.
// scripts/install-deps.sh generates de_DE.UTF-8.
class CommaLocale {
 public:
  CommaLocale() : saved_(std::setlocale(LC_ALL, nullptr)) {
    for (const char* name : {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "it_IT.UTF-8", "es_ES.UTF-8",
                             "nl_NL.UTF-8", "ru_RU.UTF-8"}) {
      if (std::setlocale(LC_ALL, name) != nullptr && std::string(std::localeconv()->decimal_point) == ",") {
        name_ = name;
        return;
      }
    }
    std::setlocale(LC_ALL, saved_.c_str());
  }
  ~CommaLocale() { std::setlocale(LC_ALL, saved_.c_str()); }
  CommaLocale(const CommaLocale&) = delete;
  CommaLocale& operator=(const CommaLocale&) = delete;
  const std::string& name() const { return name_; }  // "" when none is installed

 private:
  std::string saved_, name_;
};

// A program that set a comma locale (LC_NUMERIC) used to write "0,04" (%.17g)
// and to refuse checkpoints written with "." (strtod). Numbers are now the
// shortest text that reads back to the same double, in any locale.
TEST(Checkpoint, NumbersReadAndWriteTheSameUnderACommaLocale) {
  TempDir tmp;
  TrainingRun<float> run;
  for (int s = 0; s < 2; ++s) run.step(s);
  lora::io::save_checkpoint(tmp / "c.safetensors", run.layers(), run.adam);  // in the "C" locale
  const std::vector<float> saved = run.state();
  {
    const CommaLocale comma;
    if (comma.name().empty()) GTEST_SKIP() << "no comma-decimal locale installed (scripts/install-deps.sh makes de_DE.UTF-8)";
    char printed[8];
    std::snprintf(printed, sizeof printed, "%.1f", 0.5);
    ASSERT_STREQ(printed, "0,5") << comma.name() << " is in effect for printf, as it was for the old writer";

    TrainingRun<float> resumed;
    lora::io::load_checkpoint(tmp / "c.safetensors", resumed.layers(), resumed.adam);
    EXPECT_TRUE(same_bits(resumed.state(), saved));
    EXPECT_EQ(resumed.adam.lr(1), 4e-2);
    lora::io::save_checkpoint(tmp / "comma.safetensors", run.layers(), run.adam);
  }
  // Python's repr() of each double: the shortest decimal that reads back to it.
  const auto reader = lora::io::SafetensorsReader::open(tmp / "comma.safetensors");
  EXPECT_EQ(reader.metadata().at("adam.lr.0"), "0.01");
  EXPECT_EQ(reader.metadata().at("adam.lr.1"), "0.04");
  EXPECT_EQ(reader.metadata().at("layers.enc.l1.scale"), "2");  // alpha / r = 6 / 3
  EXPECT_EQ(reader.metadata().at("layers.enc.l2.scale"), "1");  // 2 / 2
  TrainingRun<float> resumed;
  lora::io::load_checkpoint(tmp / "comma.safetensors", resumed.layers(), resumed.adam);
  EXPECT_TRUE(same_bits(resumed.state(), saved));
}

}  // namespace

// lora::Model and files: the real PEFT fixtures (../shared/fixtures/peft) attach
// to models with GPT-2's and DistilBERT's module names and load bit for bit
// (checked against the file read independently, byte by byte); save_peft ->
// load_peft round-trips; a whole-model checkpoint resumes a run with two
// adapters, dropout, LoRA+ groups and a schedule bit-identically, and a
// checkpoint of another model is refused without changing anything.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "io_test_util.hpp"
#include "lora/model.hpp"
#include "lora/optim/scheduler.hpp"

namespace {

using io_test::bytes_of;
using io_test::expect_error;
using io_test::fill_random;
using io_test::TempDir;
using lora::io::PeftConfig;
using lora::io::SafetensorsReader;
using Backend = lora::cpu::Backend;
template <class T>
using Matrix = lora::cpu::Matrix<T>;
using Names = std::vector<std::string>;

// A matrix's bytes, row by row: two of them are bit-identical when these are equal.

#define SKIP_WITHOUT_FIXTURES()                                 \
  const std::string fixtures = io_test::fixtures_dir();         \
  if (fixtures.empty()) GTEST_SKIP() << "LORA_FIXTURES_DIR (../shared/fixtures/peft) is absent"

// ---- the real PEFT adapters on models of matching names -------------------------------

using FloatModel = lora::Model<float, Backend>;

// Every frozen W of a fixture model is a read-only view over the start of one
// buffer (the largest W, 3072 x 768, fits every shape): loading needs the
// names, shapes and layouts, not distinct values, and GPT-2 in full would be 500 MB.
struct FixtureModel {
  lora::cpu::Context ctx;
  Matrix<float> storage{1, 3072 * 768};
  FloatModel model{ctx};

  FixtureModel() { fill_random(storage.view(), 17); }
  lora::MatrixView<const float> W(std::int64_t rows, std::int64_t cols) const { return {storage.data(), rows, cols}; }

  // GPT-2 (d_model 768, MLP 3072): Conv1D weights stored d_in x d_out
  // (fan_in_fan_out), and an nn.Linear head, 3072 x 768 here (GPT-2's is the
  // 50257 x 768 embedding; its size does not matter to these adapters).
  void add_gpt2() {
    for (int i = 0; i < 12; ++i) {
      const std::string h = "transformer.h." + std::to_string(i) + ".";
      model.add_base(h + "attn.c_attn", W(768, 2304), {}, true);
      model.add_base(h + "attn.c_proj", W(768, 768), {}, true);
      model.add_base(h + "mlp.c_fc", W(768, 3072), {}, true);
      model.add_base(h + "mlp.c_proj", W(3072, 768), {}, true);
    }
    model.add_base("lm_head", W(3072, 768));
  }
  // DistilBERT for sequence classification (6 labels): nn.Linear weights, d_out x d_in.
  void add_distilbert() {
    for (int i = 0; i < 6; ++i) {
      const std::string l = "distilbert.transformer.layer." + std::to_string(i) + ".";
      for (const char* m : {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"})
        model.add_base(l + m, W(768, 768));
      model.add_base(l + "ffn.lin1", W(3072, 768));
      model.add_base(l + "ffn.lin2", W(768, 3072));
    }
    model.add_base("pre_classifier", W(768, 768));
    model.add_base("classifier", W(6, 768));
  }
};

// The modules PEFT's documented rules give for the fixtures' configs, written
// out: GPT-2's ["c_attn", "c_proj"] is every name ending in ".c_attn" or
// ".c_proj" (attn.c_proj and mlp.c_proj; not c_fc, not lm_head), in model order;
// DistilBERT's ["q_lin", "v_lin"] the two attention projections of each layer.
Names gpt2_fixture_modules() {
  Names out;
  for (int i = 0; i < 12; ++i) {
    const std::string h = "transformer.h." + std::to_string(i) + ".";
    out.insert(out.end(), {h + "attn.c_attn", h + "attn.c_proj", h + "mlp.c_proj"});
  }
  return out;
}
Names distilbert_fixture_modules() {
  Names out;
  for (int i = 0; i < 6; ++i) {
    const std::string l = "distilbert.transformer.layer." + std::to_string(i) + ".attention.";
    out.insert(out.end(), {l + "q_lin", l + "v_lin"});
  }
  return out;
}

// The modules of a PEFT weights file, from its keys: "base_model.model.<module>.lora_{A,B}.weight".
std::set<std::string> lora_modules_of(const SafetensorsReader& file) {
  std::set<std::string> out;
  for (const lora::io::TensorInfo& t : file.tensors()) {
    for (const std::string suffix : {".lora_A.weight", ".lora_B.weight"}) {
      const std::size_t prefix = std::strlen(lora::io::kPeftKeyPrefix);
      if (t.name.rfind(lora::io::kPeftKeyPrefix, 0) == 0 && t.name.size() > prefix + suffix.size() &&
          t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) == 0)
        out.insert(t.name.substr(prefix, t.name.size() - prefix - suffix.size()));
    }
  }
  return out;
}
std::string key_of(const std::string& module, const char* ab) {
  return lora::io::kPeftKeyPrefix + module + ".lora_" + ab + ".weight";
}

// Every module of `adapter` holds exactly the file's A and B bytes (an F32 file:
// its bytes are the floats), with the file's shapes.
void expect_adapter_is_file(const FloatModel& model, const std::string& adapter, const SafetensorsReader& file,
                            const std::string& what) {
  for (const std::string& m : lora_modules_of(file)) {
    const auto& a = model.module(m).get(adapter);
    for (const char* ab : {"A", "B"}) {
      const std::string key = key_of(m, ab);
      ASSERT_EQ(file.info(key).dtype, lora::io::Dtype::F32) << what << ": " << key;
      const lora::MatrixView<const float> mine = ab[0] == 'A' ? a.A() : a.B();
      ASSERT_EQ(file.info(key).shape, (std::vector<std::int64_t>{mine.rows, mine.cols})) << what << ": " << key;
      EXPECT_TRUE(bytes_of(mine) == file.read_bytes(key)) << what << ": " << key << " differs from the file";
    }
  }
}

// y = x W_stored + s (x A^T) B^T for a fan_in_fan_out module, x W^T + ... for
// another, in double from the file's own A and B: the loaded module computes it.
void expect_forward_uses_file(FixtureModel& f, const std::string& module, const SafetensorsReader& file,
                              double scale) {
  const auto& set = f.model.module(module);
  const std::int64_t d_in = set.d_in(), d_out = set.d_out(), n = 2;
  const lora::MatrixView<const float> W = set.W();
  const std::vector<float> A = file.read<float>(key_of(module, "A")), B = file.read<float>(key_of(module, "B"));
  const auto r = static_cast<std::int64_t>(A.size()) / d_in;
  Matrix<float> x(n, d_in), y(n, d_out);
  fill_random(x.view(), 5);
  set.inference(x.view(), y.view());
  double worst = 0.0, largest_lora = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<double> xa(static_cast<std::size_t>(r), 0.0);
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t j = 0; j < d_in; ++j) xa[k] += double{x(i, j)} * A[static_cast<std::size_t>(k * d_in + j)];
    for (std::int64_t o = 0; o < d_out; ++o) {
      double base = 0.0, lora = 0.0;
      for (std::int64_t j = 0; j < d_in; ++j) base += double{x(i, j)} * (set.fan_in_fan_out() ? W(j, o) : W(o, j));
      for (std::int64_t k = 0; k < r; ++k) lora += xa[k] * B[static_cast<std::size_t>(o * r + k)];
      const double expected = base + scale * lora;
      worst = std::max(worst, std::fabs(y(i, o) - expected) / (1.0 + std::fabs(expected)));
      largest_lora = std::max(largest_lora, std::fabs(scale * lora));
    }
  }
  EXPECT_LE(worst, 1e-5) << module;
  EXPECT_GT(largest_lora, 1e-3) << module << ": the adapter's path should be visible in y";
}

TEST(ModelFixtures, Gpt2AttachesToAGpt2ShapedModelAndLoadsBitForBit) {
  SKIP_WITHOUT_FIXTURES();
  const std::string dir = fixtures + "/gpt2-c_attn-c_proj-r8";
  const SafetensorsReader file = SafetensorsReader::open(dir + "/adapter_model.safetensors");
  FixtureModel f;
  f.add_gpt2();
  EXPECT_EQ(f.model.modules().size(), 12u * 4 + 1);

  const Names on = f.model.load_peft(dir, "tigrinya");
  EXPECT_EQ(on, gpt2_fixture_modules());
  EXPECT_EQ(std::set<std::string>(on.begin(), on.end()), lora_modules_of(file)) << "exactly the file's modules";
  EXPECT_EQ(f.model.targets(f.model.adapter_config("tigrinya")), on) << "PEFT's rules pick the same set from the names";
  EXPECT_EQ(f.model.adapter_modules("tigrinya"), on);
  for (const char* other : {"transformer.h.0.mlp.c_fc", "transformer.h.11.mlp.c_fc", "lm_head"})
    EXPECT_EQ(f.model.module(other).size(), 0u) << other;
  // The first adapter of a model is active; r 8, lora_alpha 32 on every module (README).
  ASSERT_EQ(f.model.active_adapters().size(), 1u);
  EXPECT_EQ(f.model.active_adapters()[0].name, "tigrinya");
  for (const std::string& m : on) {
    EXPECT_EQ(f.model.module(m).get("tigrinya").rank(), 8) << m;
    EXPECT_EQ(f.model.module(m).get("tigrinya").scale(), 4.0) << m;
  }
  EXPECT_EQ(f.model.trainable_parameters("tigrinya"), 12 * (8 * (768 + 2304) + 8 * (768 + 768) + 8 * (3072 + 768)));
  expect_adapter_is_file(f.model, "tigrinya", file, "loaded");
  // Conv1D layout: y = x W + 4 (x A^T) B^T, with A and B as the file stores them.
  expect_forward_uses_file(f, "transformer.h.4.attn.c_attn", file, 4.0);
  expect_forward_uses_file(f, "transformer.h.9.mlp.c_proj", file, 4.0);

  // A model whose c_attn is stored d_out x d_in (no fan_in_fan_out) refuses
  // the adapter before it changes anything.
  FixtureModel transposed;
  for (int i = 0; i < 12; ++i) {
    const std::string h = "transformer.h." + std::to_string(i) + ".";
    transposed.model.add_base(h + "attn.c_attn", transposed.W(2304, 768));
    transposed.model.add_base(h + "attn.c_proj", transposed.W(768, 768));
    transposed.model.add_base(h + "mlp.c_proj", transposed.W(768, 3072));
  }
  expect_error([&] { transposed.model.load_peft(dir, "tigrinya"); }, {"fan_in_fan_out = 1", "d_out x d_in"});
  EXPECT_TRUE(transposed.model.adapters().empty());
  EXPECT_EQ(transposed.model.module("transformer.h.0.attn.c_attn").size(), 0u);
}

TEST(ModelFixtures, DistilbertAttachesAndItsModulesToSaveStayOutsideTheModel) {
  SKIP_WITHOUT_FIXTURES();
  const std::string dir = fixtures + "/distilbert-q_lin-v_lin-r8";
  const SafetensorsReader file = SafetensorsReader::open(dir + "/adapter_model.safetensors");
  FixtureModel f;
  f.add_distilbert();

  // Through io::load_peft, as a trainer that wants the modules_to_save tensors does.
  const lora::io::Adapter peft = lora::io::load_peft(dir);
  const Names on = f.model.load_peft(peft, "emotion");
  EXPECT_EQ(on, distilbert_fixture_modules());
  EXPECT_EQ(std::set<std::string>(on.begin(), on.end()), lora_modules_of(file));
  EXPECT_EQ(f.model.targets(f.model.adapter_config("emotion")), on);
  for (const std::string& m : on) {
    EXPECT_EQ(f.model.module(m).get("emotion").rank(), 8) << m;
    EXPECT_EQ(f.model.module(m).get("emotion").scale(), 2.0) << m << ": lora_alpha 16 / r 8";
  }
  expect_adapter_is_file(f.model, "emotion", file, "loaded");
  expect_forward_uses_file(f, "distilbert.transformer.layer.2.attention.v_lin", file, 2.0);

  // modules_to_save (pre_classifier, classifier) are whole trained copies of
  // those layers, not LoRA pairs: Model::load_peft attaches the LoRA pairs only
  // and keeps the copies with the adapter (other_tensors), byte for byte, for the
  // trainer to put into its own weights (the model borrows W and never replaces
  // it); the model's classifier modules get no adapter, and their W is untouched.
  std::set<std::string> others;
  for (const auto& [key, tensor] : f.model.other_tensors("emotion")) {
    others.insert(key);
    EXPECT_TRUE(tensor.bytes == file.read_bytes(key)) << key;
  }
  EXPECT_EQ(others, (std::set<std::string>{"base_model.model.classifier.bias", "base_model.model.classifier.weight",
                                           "base_model.model.pre_classifier.bias",
                                           "base_model.model.pre_classifier.weight"}));
  EXPECT_EQ(f.model.module("classifier").size(), 0u);
  EXPECT_EQ(f.model.module("pre_classifier").size(), 0u);
  EXPECT_EQ(f.model.module("distilbert.transformer.layer.0.attention.k_lin").size(), 0u);
  // The file's own modules_to_save line stays in the adapter's config.
  ASSERT_TRUE(f.model.adapter_config("emotion").modules_to_save.has_value());
  EXPECT_EQ(f.model.adapter_config("emotion").modules_to_save->front(), "pre_classifier");
}

// save_peft -> load_peft into a fresh model: the same modules, A and B bit for
// bit; the saved file's tensors are the original file's bytes, the
// DistilBERT file's modules_to_save tensors included.
TEST(ModelFixtures, SaveThenLoadIntoAFreshModelRoundTripsBitForBit) {
  SKIP_WITHOUT_FIXTURES();
  TempDir tmp;
  for (const std::string name : {"gpt2-c_attn-c_proj-r8", "distilbert-q_lin-v_lin-r8"}) {
    const bool gpt2 = name[0] == 'g';
    const SafetensorsReader original = SafetensorsReader::open(fixtures + "/" + name + "/adapter_model.safetensors");
    FixtureModel first, second;
    gpt2 ? first.add_gpt2() : first.add_distilbert();
    gpt2 ? second.add_gpt2() : second.add_distilbert();
    const Names on = first.model.load_peft(fixtures + "/" + name, "fixture");
    const std::string out = tmp / name;
    first.model.save_peft("fixture", out);

    const SafetensorsReader saved = SafetensorsReader::open(out + "/adapter_model.safetensors");
    const std::size_t others = gpt2 ? 0 : 4;  // classifier and pre_classifier, weight and bias
    EXPECT_EQ(saved.tensors().size(), 2 * on.size() + others) << name << ": the LoRA pairs and the other tensors";
    for (const auto& t : original.tensors()) {
      if (t.name.find(".lora_") != std::string::npos) continue;
      EXPECT_TRUE(saved.read_bytes(t.name) == original.read_bytes(t.name)) << name << ": " << t.name;
    }
    EXPECT_EQ(lora_modules_of(saved), lora_modules_of(original)) << name;
    for (const std::string& m : on) {
      for (const char* ab : {"A", "B"}) {
        const std::string key = key_of(m, ab);
        EXPECT_EQ(saved.info(key).dtype, lora::io::Dtype::F32) << key;
        EXPECT_EQ(saved.info(key).shape, original.info(key).shape) << key;
        EXPECT_TRUE(saved.read_bytes(key) == original.read_bytes(key)) << name << ": " << key;
      }
    }

    // Loaded back under another name into a fresh model: the same modules and bits.
    EXPECT_EQ(second.model.load_peft(out, "again"), on) << name;
    expect_adapter_is_file(second.model, "again", original, name + " reloaded");
    EXPECT_EQ(second.model.targets(second.model.adapter_config("again")), on) << name;
    const PeftConfig& c = second.model.adapter_config("again");
    EXPECT_EQ(c.r, 8) << name;
    EXPECT_EQ(c.lora_alpha, gpt2 ? 32.0 : 16.0) << name;
    EXPECT_EQ(c.fan_in_fan_out, gpt2) << name;
  }
}

// ---- a whole-model checkpoint --------------------------------------------------------

// A four-module chain trained with two adapters at once, dropout on, LoRA+
// groups (every A at lr, every B at 16 lr) and a cosine schedule with warmup:
//   h0 = q0(x), h1 = fc(h0), h2 = q1(h1), y = head(h2),   L = 0.5 ||y - target||^2
// Step t's x and target are a function of t alone, so a resumed run sees the
// same data as one that never stopped.
struct RunOptions {
  int rank_b = 2;       // adapter "b"'s r
  bool with_b = true;   // adapter "b" at all
};
struct TrainingRun {
  static constexpr std::int64_t kRows = 5;
  static constexpr int kSteps = 8;  // the checkpoint is taken after kSteps / 2
  struct Layer {
    const char* name;
    std::int64_t d_in, d_out;
  };
  static constexpr Layer kLayers[] = {
      {"blocks.0.attn.q", 6, 8}, {"blocks.0.mlp.fc", 8, 8}, {"blocks.1.attn.q", 8, 8}, {"head", 8, 5}};

  lora::cpu::Context ctx;
  std::vector<Matrix<float>> weights;
  FloatModel model{ctx};
  lora::Adam<float, Backend> adam{ctx, lora::AdamOptions::adamw(1e-2, 1e-2)};
  std::optional<lora::LrScheduler> scheduler;
  std::vector<lora::AdapterSet<float, Backend>::ForwardState> states =
      std::vector<lora::AdapterSet<float, Backend>::ForwardState>(std::size(kLayers));  // one per layer

  explicit TrainingRun(RunOptions o = {}) {
    weights.reserve(std::size(kLayers));
    for (const Layer& l : kLayers) {
      weights.emplace_back(l.d_out, l.d_in);
      fill_random(weights.back().view(), weights.size());
      model.add_base(l.name, weights.back().view());
    }
    PeftConfig a;  // q0, fc, q1
    a.target_modules = {"q", "fc"};
    a.r = 4;
    a.lora_alpha = 8;
    a.lora_dropout = 0.2;
    model.add_adapter("a", a, 7);
    if (o.with_b) {
      PeftConfig b;  // q0, q1 (r 3 by rank_pattern when rank_b is 2), head
      b.target_modules = {"q", "head"};
      b.r = o.rank_b;
      b.lora_alpha = 2;
      b.lora_dropout = 0.1;
      b.rank_pattern = {{"blocks.1.attn.q", 3}};
      model.add_adapter("b", b, 8);
      model.set_adapter({{"a", 1.0}, {"b", 0.5}});
    }
    // B starts at 0 as in PEFT; make it non-zero so that A learns from step 1.
    for (const std::string& name : model.adapters())
      for (auto p : model.parameters(name))
        if (p.name.find(".lora_B.") != std::string::npos) fill_random(p.value, std::hash<std::string>{}(p.name));
    lora::Model<float, Backend>::Parameters As, Bs;
    for (auto& p : model.parameters()) (p.name.find(".lora_B.") != std::string::npos ? Bs : As).push_back(p);
    adam.add_group(As, 1e-2);
    adam.add_group(Bs, 16e-2);  // LoRA+: B at lr x 16
    lora::LrSchedule schedule;
    schedule.type = lora::LrScheduleType::cosine;
    schedule.warmup_steps = 2;
    schedule.total_steps = kSteps;
    scheduler.emplace(schedule, adam);
  }

  // Optimizer step t (0-based).
  void step(int t) {
    Matrix<float> x(kRows, kLayers[0].d_in), target(kRows, kLayers[3].d_out);
    fill_random(x.view(), 1000 + static_cast<std::uint64_t>(t));
    fill_random(target.view(), 2000 + static_cast<std::uint64_t>(t));
    std::vector<Matrix<float>> h;  // h[0] = x, h[k + 1] = layer k's output
    h.push_back(std::move(x));
    for (std::size_t k = 0; k < std::size(kLayers); ++k) {
      h.emplace_back(kRows, kLayers[k].d_out);
      model.module(kLayers[k].name).forward(h[k].view(), h[k + 1].view(), states[k]);
    }
    Matrix<float> dL_dh(kRows, kLayers[3].d_out);  // dL/dy = y - target
    for (std::int64_t i = 0; i < dL_dh.size(); ++i) dL_dh.data()[i] = h.back().data()[i] - target.data()[i];
    for (std::size_t k = std::size(kLayers); k-- > 0;) {
      Matrix<float> dL_dx(k == 0 ? 0 : kRows, kLayers[k].d_in);
      model.module(kLayers[k].name)
          .backward(states[k], h[k].view(), dL_dh.view(), k == 0 ? lora::MatrixView<float>() : dL_dx.view());
      dL_dh = std::move(dL_dx);
    }
    scheduler->apply(adam);
    adam.step();
  }

  // Everything a resumed run must reproduce: every adapter's A, B and dropout
  // position, the optimizer's moments, step count and rates.
  struct Snapshot {
    std::vector<std::vector<std::uint8_t>> tensors;
    std::vector<std::uint32_t> dropout_calls;
    std::int64_t step = 0;
    std::vector<double> lrs;
    bool operator==(const Snapshot& o) const {
      return tensors == o.tensors && dropout_calls == o.dropout_calls && step == o.step && lrs == o.lrs;
    }
  };
  Snapshot snapshot() {
    Snapshot s;
    for (const std::string& name : model.adapters()) {
      for (const std::string& m : model.adapter_modules(name)) {
        const auto& a = model.module(m).get(name);
        s.tensors.push_back(bytes_of(a.A()));
        s.tensors.push_back(bytes_of(a.B()));
        s.dropout_calls.push_back(a.dropout_calls());
      }
    }
    for (const auto& m : adam.moments()) {
      s.tensors.push_back(bytes_of(lora::MatrixView<const float>(m.m)));
      s.tensors.push_back(bytes_of(lora::MatrixView<const float>(m.v)));
    }
    s.step = adam.step_count();
    for (std::size_t g = 0; g < adam.group_count(); ++g) s.lrs.push_back(adam.lr(g));
    return s;
  }
};

TEST(ModelCheckpoint, AResumedRunIsBitIdenticalToOneThatNeverStopped) {
  TempDir tmp;
  const std::string path = tmp / "step.safetensors";
  constexpr int k = TrainingRun::kSteps / 2;
  TrainingRun straight;
  EXPECT_EQ(straight.model.parameters().size(), 2u * (3 + 3));  // a: q0, fc, q1; b: q0, q1, head
  for (int t = 0; t < k; ++t) straight.step(t);
  straight.model.save_checkpoint(path, straight.adam, {{"next_step", std::to_string(k)}});
  const TrainingRun::Snapshot at_k = straight.snapshot();
  for (int t = k; t < TrainingRun::kSteps; ++t) straight.step(t);
  const TrainingRun::Snapshot at_end = straight.snapshot();
  EXPECT_FALSE(at_end == at_k) << "the second half trains";

  TrainingRun resumed;  // built the same way, scheduler included
  EXPECT_FALSE(resumed.snapshot() == at_k);
  const auto user = resumed.model.load_checkpoint(path, resumed.adam);
  EXPECT_EQ(user.at("next_step"), std::to_string(k));
  EXPECT_TRUE(resumed.snapshot() == at_k) << "the checkpoint restores the state of step k exactly";
  for (int t = std::stoi(user.at("next_step")); t < TrainingRun::kSteps; ++t) resumed.step(t);
  const TrainingRun::Snapshot resumed_end = resumed.snapshot();
  EXPECT_TRUE(resumed_end.tensors == at_end.tensors) << "A, B and Adam's moments bit for bit";
  EXPECT_EQ(resumed_end.dropout_calls, at_end.dropout_calls);
  EXPECT_EQ(resumed_end.dropout_calls.front(), static_cast<std::uint32_t>(TrainingRun::kSteps));
  EXPECT_EQ(resumed_end.step, TrainingRun::kSteps);
  EXPECT_EQ(resumed_end.lrs, at_end.lrs);
  // The schedule was at work: the last rates are the cosine's, not the base rates.
  EXPECT_EQ(at_end.lrs[0], straight.scheduler->lr(0, TrainingRun::kSteps - 1));
  EXPECT_LT(at_end.lrs[0], 1e-2);
  EXPECT_DOUBLE_EQ(at_end.lrs[1], 16 * at_end.lrs[0]);
}

TEST(ModelCheckpoint, ACheckpointOfAnotherModelIsRefusedAndChangesNothing) {
  TempDir tmp;
  const std::string path = tmp / "step.safetensors";
  TrainingRun saved;
  saved.step(0);
  saved.model.save_checkpoint(path, saved.adam);

  // Adapter "b" with another rank: r 4 where the checkpoint has r 2.
  TrainingRun other_rank(RunOptions{4, true});
  other_rank.step(0);
  other_rank.step(1);
  const TrainingRun::Snapshot before_rank = other_rank.snapshot();
  expect_error([&] { other_rank.model.load_checkpoint(path, other_rank.adam); },
               {"layer \"b/blocks.0.attn.q\" was saved with r = 2", "this layer has r = 4"});
  EXPECT_TRUE(other_rank.snapshot() == before_rank);

  // Adapter "b" missing: its tensors in the checkpoint have nowhere to go.
  TrainingRun missing(RunOptions{2, false});
  missing.step(0);
  const TrainingRun::Snapshot before_missing = missing.snapshot();
  expect_error([&] { missing.model.load_checkpoint(path, missing.adam); },
               {"holds layer \"b/blocks.0.attn.q\", which was not given"});
  EXPECT_TRUE(missing.snapshot() == before_missing);

  // The other way: a model with an adapter the checkpoint lacks.
  TempDir tmp2;
  missing.model.save_checkpoint(tmp2 / "a-only.safetensors", missing.adam);
  TrainingRun extra;
  extra.step(0);
  const TrainingRun::Snapshot before_extra = extra.snapshot();
  expect_error([&] { extra.model.load_checkpoint(tmp2 / "a-only.safetensors", extra.adam); },
               {"\"layers.b/blocks.0.attn.q.r\""});
  EXPECT_TRUE(extra.snapshot() == before_extra);
}

}  // namespace

// ---- DoRA: PEFT-format adapters in a model, against an independent torch re-implementation ----

namespace {

// A file of raw little-endian float64 values (what dora_reference.py writes).
std::vector<double> read_f64(const std::string& path) {
  const std::vector<std::uint8_t> bytes = io_test::read_file(path);
  std::vector<double> out(bytes.size() / 8);
  std::memcpy(out.data(), bytes.data(), out.size() * 8);
  return out;
}

}  // namespace

// tests/dora_reference.py writes DoRA adapters as PEFT saves them, their base
// weights and PEFT's DoRA forward and merge computed in torch from the rules alone.
// Loaded into a double model here, the layers' unmerged forward (training and
// inference) and merged weight equal torch's to rounding; saving the model's
// adapter and loading it into a fresh model keeps every magnitude bit for bit.
TEST(ModelDora, PeftDoraAdaptersGiveTheOutputsOfAnIndependentTorchReimplementation) {
  if (std::system("/usr/bin/python3 -c 'import torch' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "/usr/bin/python3 with torch is absent (Debian: apt-get install python3-torch)";
  TempDir tmp;
  const std::string script = (std::filesystem::path(__FILE__).parent_path() / "dora_reference.py").string();
  ASSERT_EQ(std::system(("/usr/bin/python3 '" + script + "' '" + tmp.path().string() + "'").c_str()), 0);

  for (const auto& [name, fan_in_fan_out] : {std::pair<std::string, bool>{"linear", false}, {"conv1d", true}}) {
    SCOPED_TRACE(name);
    const std::string dir = (tmp.path() / name).string();
    const lora::io::Adapter peft = lora::io::load_peft(dir + "/adapter");
    const SafetensorsReader weights = SafetensorsReader::open(dir + "/model.safetensors");
    lora::cpu::Context ctx;
    lora::Model<double, Backend> model(ctx);
    std::map<std::string, std::pair<std::vector<double>, std::vector<double>>> stored;  // W and bias of each module
    for (const auto& [module, m] : peft.modules) {
      auto& [W, bias] = stored[module];
      W = weights.read<double>(module + ".weight");
      bias = weights.read<double>(module + ".bias");
      const std::int64_t rows = fan_in_fan_out ? m.d_in() : m.d_out(), cols = fan_in_fan_out ? m.d_out() : m.d_in();
      model.add_base(module, lora::MatrixView<double>(W.data(), rows, cols),
                     lora::MatrixView<const double>(bias.data(), 1, m.d_out()), fan_in_fan_out);
    }
    ASSERT_EQ(model.load_peft(peft, "dora").size(), peft.modules.size());
    model.set_adapter("dora");
    EXPECT_EQ(model.trainable_parameters("dora"), peft.trainable_parameters()) << "A, B and m of every module";

    for (const auto& [module, m] : peft.modules) {
      SCOPED_TRACE(module);
      const std::vector<double> x = read_f64(dir + "/" + module + ".x.f64"), y = read_f64(dir + "/" + module + ".y.f64");
      const std::int64_t N = static_cast<std::int64_t>(x.size()) / m.d_in();
      const lora::MatrixView<const double> xv(x.data(), N, m.d_in());
      Matrix<double> inferred(N, m.d_out()), trained(N, m.d_out());
      model.module(module).inference(xv, inferred.view());
      model.module(module).forward(xv, trained.view(), lora::Mode::train);
      for (std::int64_t i = 0; i < N * m.d_out(); ++i) {
        const double scale = 1e-12 * (1.0 + std::fabs(y[static_cast<std::size_t>(i)]));
        ASSERT_NEAR(inferred.data()[i], y[static_cast<std::size_t>(i)], scale) << "inference, element " << i;
        ASSERT_NEAR(trained.data()[i], y[static_cast<std::size_t>(i)], scale) << "training forward, element " << i;
      }
    }

    // Saved from the layers and loaded into a fresh model: the same A, B and m, bit for bit.
    model.save_peft("dora", (tmp.path() / (name + "_saved")).string());
    const lora::io::Adapter saved = lora::io::load_peft((tmp.path() / (name + "_saved")).string());
    EXPECT_TRUE(saved.config.use_dora);
    for (const auto& [module, m] : peft.modules) {
      const lora::io::AdapterModule& s = saved.modules.at(module);
      EXPECT_EQ(bytes_of<float>(s.magnitude.view()), bytes_of<float>(m.magnitude.view())) << module;
      EXPECT_EQ(bytes_of<float>(s.A.view()), bytes_of<float>(m.A.view())) << module;
      EXPECT_EQ(bytes_of<float>(s.B.view()), bytes_of<float>(m.B.view())) << module;
    }

    // Merged into W: torch's W' = (m / n) o (W + s B A), in the stored layout.
    model.merge("dora");
    for (const auto& [module, m] : peft.modules) {
      const std::vector<double> expected = read_f64(dir + "/" + module + ".merged.f64");
      const std::vector<double>& W = stored.at(module).first;
      ASSERT_EQ(W.size(), expected.size());
      for (std::size_t i = 0; i < W.size(); ++i)
        ASSERT_NEAR(W[i], expected[i], 1e-12 * (1.0 + std::fabs(expected[i]))) << module << " element " << i;
    }
  }
}

// PEFT adapter directories: both real fixtures load with the right module
// names, shapes, ranks and scales (values checked against the file's raw
// bytes), save back byte for byte, and the GPT-2 one merges as W + s (B A)^T;
// configs follow PEFT's pattern rules and JSON layout; unsupported features
// are refused by name; DoRA adapters (lora_magnitude_vector) round-trip, broken
// ones are refused and merge_module scales each output of W + s B A to its
// magnitude; layers round-trip through a directory; untrusted
// directories (pathological patterns, deep JSON, huge or special files, symlink
// loops, mixed key spellings) get a lora::Error; saves are atomic as a pair,
// keep permissions and clean up after killed saves.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "io_test_util.hpp"
#include "lora/io/peft.hpp"
#include "lora/lora.hpp"

namespace {

using io_test::expect_error;
using io_test::TempDir;
using lora::io::Adapter;
using lora::io::AdapterModule;
using lora::io::Dtype;
using lora::io::PeftConfig;
using lora::io::SafetensorsWriter;
using Layer = lora::cpu::Linear<float>;

// A safetensors file read without lora::io: the header with nlohmann, F32 values with memcpy.
struct RawFile {
  explicit RawFile(const std::string& path) : bytes(io_test::read_file(path)) {
    std::uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(bytes.at(i)) << (8 * i);
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    data_start = 8 + n;
  }
  std::vector<float> floats(const std::string& name) const {
    const auto& entry = header.at(name);
    EXPECT_EQ(entry.at("dtype"), "F32");
    const auto begin = entry.at("data_offsets")[0].get<std::uint64_t>(), end = entry.at("data_offsets")[1].get<std::uint64_t>();
    std::vector<float> out((end - begin) / 4);
    std::memcpy(out.data(), bytes.data() + data_start + begin, end - begin);
    return out;
  }
  std::vector<std::uint8_t> bytes;
  nlohmann::json header;
  std::uint64_t data_start = 0;
};

std::vector<float> values(const lora::cpu::Matrix<float>& m) { return std::vector<float>(m.data(), m.data() + m.size()); }

std::string without_carriage_returns(std::vector<std::uint8_t> bytes) {
  std::string s(bytes.begin(), bytes.end());
  std::string out;
  for (char c : s)
    if (c != '\r') out += c;
  return out;
}

#define SKIP_WITHOUT_FIXTURES()                                                                   \
  const std::string fixtures = io_test::fixtures_dir();                                           \
  if (fixtures.empty()) GTEST_SKIP() << "LORA_FIXTURES_DIR (../shared/fixtures/peft) is absent"

// ---- the real adapters -----------------------------------------------------------------

TEST(PeftFixtures, Gpt2LoadsWithItsModulesShapesRanksAndScales) {
  SKIP_WITHOUT_FIXTURES();
  const std::string dir = fixtures + "/gpt2-c_attn-c_proj-r8";
  const Adapter a = lora::io::load_peft(dir);
  const RawFile raw(dir + "/adapter_model.safetensors");

  // The module names are what the file's keys say, and there are the README's 72 / 2 of them.
  std::set<std::string> expected;
  for (const auto& item : raw.header.items()) {
    const std::string key = item.key();
    if (key == "__metadata__") continue;
    ASSERT_EQ(key.rfind("base_model.model.", 0), 0u) << key;
    expected.insert(key.substr(17, key.size() - 17 - std::string(".lora_A.weight").size()));
  }
  EXPECT_EQ(expected.size(), 36u);
  std::set<std::string> loaded;
  for (const auto& [name, m] : a.modules) loaded.insert(name);
  EXPECT_EQ(loaded, expected);
  for (int layer = 0; layer < 12; ++layer) {
    const std::string h = "transformer.h." + std::to_string(layer);
    ASSERT_TRUE(a.modules.count(h + ".attn.c_attn") && a.modules.count(h + ".attn.c_proj") &&
                a.modules.count(h + ".mlp.c_proj"))
        << h;
  }

  // Shapes per GPT-2 (d_model 768; c_attn 768 -> 2304; mlp.c_proj 3072 -> 768), r = 8, s = 32 / 8.
  const auto& c_attn = a.modules.at("transformer.h.0.attn.c_attn");
  EXPECT_EQ(c_attn.A.rows(), 8);
  EXPECT_EQ(c_attn.A.cols(), 768);
  EXPECT_EQ(c_attn.B.rows(), 2304);
  EXPECT_EQ(c_attn.B.cols(), 8);
  const auto& mlp = a.modules.at("transformer.h.11.mlp.c_proj");
  EXPECT_EQ(mlp.d_in(), 3072);
  EXPECT_EQ(mlp.d_out(), 768);
  EXPECT_EQ(a.modules.at("transformer.h.5.attn.c_proj").d_in(), 768);
  EXPECT_EQ(a.modules.at("transformer.h.5.attn.c_proj").d_out(), 768);
  for (const auto& [name, m] : a.modules) {
    EXPECT_EQ(m.r, 8) << name;
    EXPECT_EQ(m.alpha, 32.0) << name;
    EXPECT_EQ(m.scale, 4.0) << name;
    EXPECT_EQ(m.stored_dtype, Dtype::F32) << name;
  }
  EXPECT_EQ(a.trainable_parameters(), 12 * (8 * (768 + 2304) + 8 * (768 + 768) + 8 * (3072 + 768)));
  EXPECT_TRUE(a.config.fan_in_fan_out);
  EXPECT_FALSE(a.config.use_rslora);
  EXPECT_EQ(a.config.target_modules, (std::vector<std::string>{"c_attn", "c_proj"}));
  EXPECT_EQ(a.config.task_type.value_or(""), "CAUSAL_LM");
  EXPECT_EQ(a.config.base_model_name_or_path.value_or(""), "gpt2");
  EXPECT_DOUBLE_EQ(a.config.lora_dropout, 0.05);
  EXPECT_TRUE(a.other_tensors.empty());
  EXPECT_EQ(a.file_metadata.at("format"), "pt");

  // The values are the file's bytes.
  for (const std::string name : {"transformer.h.0.attn.c_attn", "transformer.h.7.mlp.c_proj", "transformer.h.11.attn.c_proj"}) {
    EXPECT_EQ(values(a.modules.at(name).A), raw.floats("base_model.model." + name + ".lora_A.weight")) << name;
    EXPECT_EQ(values(a.modules.at(name).B), raw.floats("base_model.model." + name + ".lora_B.weight")) << name;
  }
  // And they are a trained adapter, not zeros (B starts at 0 in PEFT).
  double sum_sq = 0;
  for (float v : values(c_attn.B)) sum_sq += static_cast<double>(v) * v;
  EXPECT_GT(sum_sq, 0.0);
}

TEST(PeftFixtures, DistilbertLoadsAndReportsItsNonLoraTensors) {
  SKIP_WITHOUT_FIXTURES();
  const std::string dir = fixtures + "/distilbert-q_lin-v_lin-r8";
  const Adapter a = lora::io::load_peft(dir);
  ASSERT_EQ(a.modules.size(), 12u);
  for (int layer = 0; layer < 6; ++layer) {
    for (const char* proj : {"q_lin", "v_lin"}) {
      const std::string name = "distilbert.transformer.layer." + std::to_string(layer) + ".attention." + proj;
      ASSERT_TRUE(a.modules.count(name)) << name;
      const AdapterModule& m = a.modules.at(name);
      EXPECT_EQ(m.A.rows(), 8);
      EXPECT_EQ(m.A.cols(), 768);
      EXPECT_EQ(m.B.rows(), 768);
      EXPECT_EQ(m.B.cols(), 8);
      EXPECT_EQ(m.scale, 2.0) << "lora_alpha 16 / r 8";
    }
  }
  EXPECT_FALSE(a.config.fan_in_fan_out);
  EXPECT_EQ(a.config.task_type.value_or(""), "SEQ_CLS");
  ASSERT_TRUE(a.config.modules_to_save.has_value());
  EXPECT_EQ(*a.config.modules_to_save, (std::vector<std::string>{"pre_classifier", "classifier", "classifier", "score"}));
  EXPECT_EQ(a.config.other.at("peft_version"), "0.20.0") << "keys we do not model are kept";

  // modules_to_save copies are kept and listed, with their shapes.
  std::map<std::string, std::vector<std::int64_t>> other;
  for (const auto& [key, t] : a.other_tensors) other[key] = t.shape;
  EXPECT_EQ(other, (std::map<std::string, std::vector<std::int64_t>>{
                       {"base_model.model.classifier.bias", {6}},
                       {"base_model.model.classifier.weight", {6, 768}},
                       {"base_model.model.pre_classifier.bias", {768}},
                       {"base_model.model.pre_classifier.weight", {768, 768}}}));
  const RawFile raw(dir + "/adapter_model.safetensors");
  const std::vector<float> bias = lora::io::values_of<float>(a.other_tensors.at("base_model.model.classifier.bias"));
  EXPECT_EQ(bias, raw.floats("base_model.model.classifier.bias"));
}

TEST(PeftFixtures, SavingReproducesPeftsFilesByteForByte) {
  SKIP_WITHOUT_FIXTURES();
  TempDir tmp;
  for (const std::string name : {"gpt2-c_attn-c_proj-r8", "distilbert-q_lin-v_lin-r8"}) {
    const std::string src = fixtures + "/" + name, dst = tmp / name;
    lora::io::save_peft(lora::io::load_peft(src), dst);
    EXPECT_EQ(io_test::read_file(dst + "/adapter_model.safetensors"), io_test::read_file(src + "/adapter_model.safetensors"))
        << name;
    // The distilbert config was written on Windows (CRLF); PEFT on Linux writes what we write.
    EXPECT_EQ(without_carriage_returns(io_test::read_file(dst + "/adapter_config.json")),
              without_carriage_returns(io_test::read_file(src + "/adapter_config.json")))
        << name;
  }
}

TEST(PeftFixtures, MergingGpt2IntoASyntheticBaseAddsScaleTimesBATransposed) {
  SKIP_WITHOUT_FIXTURES();
  const Adapter a = lora::io::load_peft(fixtures + "/gpt2-c_attn-c_proj-r8");
  std::uint64_t state = 3;
  auto uniform = [&state] {  // a small LCG: W need only be arbitrary, not statistically good
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 11) * 0x1p-52 - 1.0;
  };
  double worst = 0.0;
  for (const auto& [name, m] : a.modules) {
    // GPT-2's Conv1D stores W^T: d_in x d_out.
    const std::int64_t d_in = m.d_in(), d_out = m.d_out();
    std::vector<double> W(static_cast<std::size_t>(d_in * d_out));
    for (double& w : W) w = uniform();
    std::vector<double> merged = W;
    lora::io::add_module_delta(m, /*fan_in_fan_out=*/true, 1.0, lora::MatrixView<double>(merged.data(), d_in, d_out));
    // Naive: merged[i][j] = W[i][j] + s sum_k B[j][k] A[k][i].
    std::vector<double> a_column(static_cast<std::size_t>(m.r));
    for (std::int64_t i = 0; i < d_in; ++i) {
      for (int k = 0; k < m.r; ++k) a_column[static_cast<std::size_t>(k)] = m.A(k, i);
      for (std::int64_t j = 0; j < d_out; ++j) {
        double dot = 0.0;
        for (int k = 0; k < m.r; ++k) dot += static_cast<double>(m.B(j, k)) * a_column[static_cast<std::size_t>(k)];
        const double expected = W[static_cast<std::size_t>(i * d_out + j)] + m.scale * dot;
        const double err = std::fabs(merged[static_cast<std::size_t>(i * d_out + j)] - expected) / (1.0 + std::fabs(expected));
        worst = std::max(worst, err);
      }
    }
  }
  EXPECT_LE(worst, 1e-14) << "double sums in another order differ by a few ulps, no more";

  // Without fan_in_fan_out the same adapter needs W as d_out x d_in: c_attn's 768 x 2304 is refused.
  const AdapterModule& c_attn = a.modules.at("transformer.h.0.attn.c_attn");
  std::vector<double> W(768 * 2304);
  expect_error([&] { lora::io::add_module_delta(c_attn, false, 1.0, lora::MatrixView<double>(W.data(), 768, 2304)); },
               {"[768, 2304]", "expected a [2304, 768] weight"});
}

// ---- adapter_config.json ------------------------------------------------------------------

TEST(PeftConfig, PatternsMatchAsPeftMatchesThem) {
  PeftConfig c;
  c.r = 8;
  c.lora_alpha = 16;
  // PEFT: the first key k (in order) for which re.match(rf"(.*\.)?({k})$", module) succeeds.
  c.rank_pattern = {{"q_proj", 4}, {"layers\\.1\\..*v_proj", 2}, {"v_proj", 6}};
  c.alpha_pattern = {{"v_proj", 32}};
  EXPECT_EQ(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
  EXPECT_EQ(c.rank_for("q_proj"), 4) << "a pattern matches the whole name too";
  EXPECT_EQ(c.rank_for("model.layers.1.self_attn.v_proj"), 2) << "the first matching pattern wins";
  EXPECT_EQ(c.rank_for("model.layers.0.self_attn.v_proj"), 6);
  EXPECT_EQ(c.rank_for("model.layers.0.self_attn.xq_proj"), 8) << "a suffix must start after a dot";
  EXPECT_EQ(c.rank_for("model.layers.0.self_attn.q_proj_extra"), 8) << "and reach the end";
  EXPECT_EQ(c.alpha_for("model.layers.0.self_attn.v_proj"), 32);
  EXPECT_EQ(c.alpha_for("model.layers.0.self_attn.q_proj"), 16);
  EXPECT_EQ(c.scale_for("model.layers.0.self_attn.q_proj"), 16.0 / 4);
  EXPECT_EQ(c.scale_for("model.layers.1.self_attn.v_proj"), 32.0 / 2);
  c.use_rslora = true;
  EXPECT_DOUBLE_EQ(c.scale_for("model.layers.0.self_attn.k_proj"), 16.0 / std::sqrt(8.0));
  const lora::Config layer = c.layer_config("model.layers.0.self_attn.q_proj");
  EXPECT_EQ(layer.r, 4);
  EXPECT_EQ(layer.alpha, 16);
  EXPECT_TRUE(layer.use_rslora);
  EXPECT_DOUBLE_EQ(layer.scale(), 16.0 / 2.0);
  c.rank_pattern = {{"(", 1}};
  expect_error([&] { (void)c.rank_for("x"); }, {"rank_pattern", "\"(\""});
}

TEST(PeftConfig, WritesTheTextPythonsJsonDumpsWrites) {
  PeftConfig c;
  c.r = 8;
  c.lora_alpha = 16;
  c.lora_dropout = 0.05;
  c.target_modules = {"q_proj", "v_proj"};
  c.base_model_name_or_path = "caf\xC3\xA9/model";
  c.task_type = "CAUSAL_LM";
  c.rank_pattern = {{"model\\.layers\\.1\\.q_proj", 4}};
  c.alpha_pattern = {{"v_proj", 32.5}};
  // Produced by Python 3: json.dumps(config, indent=2, sort_keys=True) for the same values.
  const std::string python = R"({
  "alpha_pattern": {
    "v_proj": 32.5
  },
  "base_model_name_or_path": "caf\u00e9/model",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "lora_alpha": 16,
  "lora_dropout": 0.05,
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {
    "model\\.layers\\.1\\.q_proj": 4
  },
  "revision": null,
  "target_modules": [
    "q_proj",
    "v_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
})";
  EXPECT_EQ(c.to_json_text(), python);
  // And it reads back to the same config.
  const PeftConfig back = PeftConfig::from_json(nlohmann::ordered_json::parse(python), "python");
  EXPECT_EQ(back.to_json_text(), python);
  EXPECT_EQ(back.rank_pattern, c.rank_pattern);
  EXPECT_EQ(back.alpha_pattern, c.alpha_pattern);
}

// ---- loading what is not supported, or not consistent ------------------------------------------

const char* kMinimalConfig = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]})";

// An adapter directory with the given config text and tensors.
std::string write_adapter(const TempDir& tmp, const std::string& name, const std::string& config,
                          const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& tensors) {
  const std::string dir = tmp / name;
  std::filesystem::create_directories(dir);
  io_test::write_file(dir + "/adapter_config.json", config);
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const auto& [key, shape] : tensors) {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    std::vector<float> v(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.25f * static_cast<float>(i + 1);
    w.add(key, shape, v.data());
  }
  w.write(dir + "/adapter_model.safetensors");
  return dir;
}

TEST(PeftLoad, RefusesUnsupportedFeaturesByName) {
  TempDir tmp;
  const std::string A = "base_model.model.m.q.lora_A.weight", B = "base_model.model.m.q.lora_B.weight";
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "embedding", kMinimalConfig,
                                            {{"base_model.model.embed.lora_embedding_A", {2, 10}},
                                             {"base_model.model.embed.lora_embedding_B", {4, 2}}}));
  }, {"lora_embedding", "embedding adapter"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "lora_bias", kMinimalConfig,
                                            {{A, {2, 3}}, {B, {5, 2}}, {"base_model.model.m.q.lora_B.bias", {5}}}));
  }, {"lora_B.bias", "not supported"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "ia3", R"({"peft_type": "IA3", "r": 2})", {}));
  }, {"IA3", "only \"LORA\""});
}

TEST(PeftLoad, RefusesInconsistentAdapters) {
  TempDir tmp;
  const std::string A = "base_model.model.m.q.lora_A.weight", B = "base_model.model.m.q.lora_B.weight";
  expect_error([&] { (void)lora::io::load_peft(write_adapter(tmp, "no_b", kMinimalConfig, {{A, {2, 3}}})); },
               {"\"m.q\"", "no lora_B"});
  expect_error([&] { (void)lora::io::load_peft(write_adapter(tmp, "rank", kMinimalConfig, {{A, {4, 3}}, {B, {5, 4}}})); },
               {"\"m.q\"", "rank 4", "r = 2"});
  expect_error([&] { (void)lora::io::load_peft(write_adapter(tmp, "pair", kMinimalConfig, {{A, {2, 3}}, {B, {5, 3}}})); },
               {"\"m.q\"", "[5, 3]"});
  expect_error([&] { (void)lora::io::load_peft(write_adapter(tmp, "vector", kMinimalConfig, {{A, {2}}, {B, {5, 2}}})); },
               {"[2]", "matrix"});
  expect_error([&] { (void)lora::io::load_peft(write_adapter(tmp, "json", "{\"peft_type\": ", {})); },
               {"adapter_config.json", "not valid JSON"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "r_type", R"({"peft_type": "LORA", "r": 2.5})", {}));
  }, {"\"r\"", "2.5"});
  expect_error([&] { (void)lora::io::load_peft(tmp / "absent"); }, {"not a directory"});
  const std::string pickle = tmp / "pickle";
  std::filesystem::create_directories(pickle);
  io_test::write_file(pickle + "/adapter_config.json", std::string(kMinimalConfig));
  io_test::write_file(pickle + "/adapter_model.bin", std::string("not ours"));
  expect_error([&] { (void)lora::io::load_peft(pickle); }, {"adapter_model.bin", "safe_serialization"});
}

TEST(PeftLoad, HonoursRankPatternAlphaPatternAndRsLora) {
  TempDir tmp;
  const std::string dir = write_adapter(
      tmp, "patterns",
      R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": true, "fan_in_fan_out": true,
          "rank_pattern": {"layers\\.1\\.q": 3}, "alpha_pattern": {"v": 9}})",
      {{"base_model.model.layers.0.q.lora_A.weight", {2, 3}}, {"base_model.model.layers.0.q.lora_B.weight", {5, 2}},
       {"base_model.model.layers.1.q.lora_A.weight", {3, 3}}, {"base_model.model.layers.1.q.lora_B.weight", {5, 3}},
       {"base_model.model.layers.0.v.lora_A.weight", {2, 3}}, {"base_model.model.layers.0.v.lora_B.weight", {4, 2}},
       {"base_model.model.layers.0.ln.weight", {3}}});
  const Adapter a = lora::io::load_peft(dir);
  ASSERT_EQ(a.modules.size(), 3u);
  EXPECT_EQ(a.modules.at("layers.0.q").r, 2);
  EXPECT_DOUBLE_EQ(a.modules.at("layers.0.q").scale, 4 / std::sqrt(2.0));
  EXPECT_EQ(a.modules.at("layers.1.q").r, 3);
  EXPECT_DOUBLE_EQ(a.modules.at("layers.1.q").scale, 4 / std::sqrt(3.0));
  EXPECT_EQ(a.modules.at("layers.0.v").alpha, 9);
  EXPECT_DOUBLE_EQ(a.modules.at("layers.0.v").scale, 9 / std::sqrt(2.0));
  EXPECT_TRUE(a.config.fan_in_fan_out);
  EXPECT_TRUE(a.config.layer_config("layers.0.v").fan_in_fan_out);
  ASSERT_EQ(a.other_tensors.size(), 1u) << "a trained LayerNorm weight is kept, not dropped";
  EXPECT_EQ(a.other_tensors.begin()->first, "base_model.model.layers.0.ln.weight");
  EXPECT_EQ(a.modules.at("layers.1.q").A(2, 2), 0.25f * 9) << "row-major [r, d_in]";
}

// ---- DoRA: lora_magnitude_vector --------------------------------------------------------------

// A module with arbitrary A, B and (for DoRA) a magnitude m in [0.5, 1.5): values from a seeded generator.
AdapterModule arbitrary_module(int r, std::int64_t d_in, std::int64_t d_out, double alpha, bool dora, std::uint64_t seed) {
  AdapterModule m;
  m.r = r;
  m.alpha = alpha;
  m.scale = alpha / r;
  m.A = lora::cpu::Matrix<float>(r, d_in);
  m.B = lora::cpu::Matrix<float>(d_out, r);
  io_test::fill_random(m.A.view(), seed);
  io_test::fill_random(m.B.view(), seed + 1);
  if (dora) {
    m.magnitude = lora::cpu::Matrix<float>(1, d_out);
    io_test::fill_random(m.magnitude.view(), seed + 2);
    for (std::int64_t o = 0; o < d_out; ++o) m.magnitude(0, o) += 1.0f;  // positive, as a norm is
  }
  return m;
}

Adapter dora_adapter() {
  Adapter a;
  a.config.r = 2;
  a.config.lora_alpha = 4;
  a.config.use_dora = true;
  a.config.target_modules = {"q", "v"};
  a.config.rank_pattern = {{"v", 3}};
  a.modules.emplace("m.q", arbitrary_module(2, 5, 7, 4, true, 11));
  a.modules.emplace("m.v", arbitrary_module(3, 5, 4, 4, true, 21));
  return a;
}

TEST(PeftDora, RoundTripThroughADirectoryBitForBitWithPeftsKeyAndShape) {
  const Adapter a = dora_adapter();
  EXPECT_EQ(a.trainable_parameters(), (2 * 5 + 7 * 2 + 7) + (3 * 5 + 4 * 3 + 4)) << "A, B and m of each module";
  TempDir tmp;
  lora::io::save_peft(a, tmp / "dora");

  // The file as PEFT writes it, read without lora::io: [d_out], F32, no ".weight".
  const RawFile file(tmp / "dora/adapter_model.safetensors");
  const auto& entry = file.header.at("base_model.model.m.q.lora_magnitude_vector");
  EXPECT_EQ(entry.at("shape"), nlohmann::json::array({7}));
  EXPECT_EQ(file.floats("base_model.model.m.q.lora_magnitude_vector"), values(a.modules.at("m.q").magnitude));
  EXPECT_EQ(file.header.at("base_model.model.m.v.lora_magnitude_vector").at("shape"), nlohmann::json::array({4}));
  EXPECT_EQ(file.header.size(), 1u + 3 * 2) << "metadata and A, B, m of two modules";
  const auto config = nlohmann::json::parse(without_carriage_returns(io_test::read_file(tmp / "dora/adapter_config.json")));
  EXPECT_EQ(config.at("use_dora"), true);

  const Adapter back = lora::io::load_peft(tmp / "dora");
  EXPECT_TRUE(back.config.use_dora);
  EXPECT_TRUE(back.config.layer_config("m.q").use_dora);
  ASSERT_EQ(back.modules.size(), 2u);
  for (const auto& [name, m] : a.modules) {
    const AdapterModule& b = back.modules.at(name);
    EXPECT_TRUE(b.dora()) << name;
    EXPECT_EQ(b.magnitude.rows(), 1) << name;
    EXPECT_EQ(values(b.A), values(m.A)) << name;
    EXPECT_EQ(values(b.B), values(m.B)) << name;
    EXPECT_EQ(values(b.magnitude), values(m.magnitude)) << name;
  }
  EXPECT_EQ(back.trainable_parameters(), a.trainable_parameters());

  // Half precision: the magnitude is stored like A and B, rounded to nearest even.
  lora::io::save_peft(a, tmp / "dora16", Dtype::BF16);
  const RawFile half(tmp / "dora16/adapter_model.safetensors");
  EXPECT_EQ(half.header.at("base_model.model.m.q.lora_magnitude_vector").at("dtype"), "BF16");
  const Adapter back16 = lora::io::load_peft(tmp / "dora16");
  const lora::cpu::Matrix<float>& m16 = back16.modules.at("m.q").magnitude;
  for (std::int64_t o = 0; o < 7; ++o) {
    const float x = a.modules.at("m.q").magnitude(0, o);
    EXPECT_LE(std::fabs(m16(0, o) - x), std::ldexp(std::fabs(x), -8)) << "bf16 keeps 8 significant bits";
  }
}

TEST(PeftDora, BrokenDoraFilesAreRefusedByName) {
  TempDir tmp;
  const std::string A = "base_model.model.m.q.lora_A.weight", B = "base_model.model.m.q.lora_B.weight";
  const std::string M = "base_model.model.m.q.lora_magnitude_vector";
  const std::string dora_config = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true})";
  const Adapter ok = lora::io::load_peft(write_adapter(tmp, "ok", dora_config, {{A, {2, 3}}, {B, {5, 2}}, {M, {5}}}));
  EXPECT_EQ(ok.modules.at("m.q").magnitude(0, 4), 0.25f * 5) << "m read as a 1 x d_out row";
  EXPECT_EQ(ok.trainable_parameters(), 6 + 10 + 5);

  expect_error([&] { (void)lora::io::load_peft(write_adapter(tmp, "missing", dora_config, {{A, {2, 3}}, {B, {5, 2}}})); },
               {"\"m.q\"", "no lora_magnitude_vector", "use_dora = true"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "short", dora_config, {{A, {2, 3}}, {B, {5, 2}}, {M, {4}}}));
  }, {"lora_magnitude_vector", "[4]", "expected [5]"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "matrix", dora_config, {{A, {2, 3}}, {B, {5, 2}}, {M, {5, 1}}}));
  }, {"lora_magnitude_vector", "[5, 1]", "expected [5]"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "not_dora", kMinimalConfig, {{A, {2, 3}}, {B, {5, 2}}, {M, {5}}}));
  }, {"lora_magnitude_vector", "DoRA magnitude", "use_dora"});
  expect_error([&] { (void)lora::io::load_peft(write_adapter(tmp, "alone", dora_config, {{M, {5}}})); },
               {"\"m.q\"", "no lora_A and lora_B"});
  expect_error([&] {  // the in-memory ModuleDict spelling, which PEFT never saves
    (void)lora::io::load_peft(write_adapter(tmp, "module_dict", dora_config,
                                            {{A, {2, 3}}, {B, {5, 2}}, {M + ".weight", {5}}}));
  }, {"lora_magnitude_vector.weight", "expected base_model.model.<module>.lora_magnitude_vector"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "unprefixed", dora_config,
                                            {{A, {2, 3}}, {B, {5, 2}}, {"m.q.lora_magnitude_vector", {5}}}));
  }, {"m.q.lora_magnitude_vector", "prefix"});

  // save_peft refuses what PEFT could not load back.
  Adapter a = dora_adapter();
  a.config.use_dora = false;
  expect_error([&] { lora::io::save_peft(a, tmp / "bad1"); }, {"\"m.q\"", "has a DoRA magnitude", "use_dora is false"});
  a = dora_adapter();
  a.modules.at("m.v").magnitude = lora::cpu::Matrix<float>();
  expect_error([&] { lora::io::save_peft(a, tmp / "bad2"); }, {"\"m.v\"", "has no DoRA magnitude", "use_dora is true"});
  a = dora_adapter();
  a.modules.at("m.v").magnitude = lora::cpu::Matrix<float>(1, 3);
  expect_error([&] { lora::io::save_peft(a, tmp / "bad3"); }, {"\"m.v\"", "DoRA magnitude is [1, 3]", "expected [1, 4]"});
  EXPECT_FALSE(std::filesystem::exists(tmp / "bad1") || std::filesystem::exists(tmp / "bad2") ||
               std::filesystem::exists(tmp / "bad3"));
}

TEST(PeftDora, MergeModuleScalesEveryOutputOfWPlusSBAToItsMagnitude) {
  const AdapterModule m = arbitrary_module(3, 9, 6, 5, true, 31);
  std::vector<double> W(6 * 9);
  io_test::fill_random(lora::MatrixView<double>(W.data(), 6, 9), 41);
  for (const double factor : {1.0, 0.5}) {
    const std::vector<double> expected = io_test::naive_merge(W, m, /*fan_in_fan_out=*/false, factor);
    std::vector<double> merged = W;
    lora::io::merge_module(m, false, factor, lora::MatrixView<double>(merged.data(), 6, 9));
    for (std::size_t k = 0; k < W.size(); ++k) ASSERT_NEAR(merged[k], expected[k], 1e-14) << "factor " << factor << " element " << k;
    // The property that defines DoRA: each output's row of the merged weight has norm m[o].
    for (std::int64_t o = 0; o < 6; ++o) {
      double sum = 0;
      for (std::int64_t i = 0; i < 9; ++i) sum += merged[static_cast<std::size_t>(o * 9 + i)] * merged[static_cast<std::size_t>(o * 9 + i)];
      EXPECT_NEAR(std::sqrt(sum), m.magnitude(0, o), 1e-14) << "output " << o;
    }

    // fan_in_fan_out: W stored as d_in x d_out; the norm is still per output (a column here).
    std::vector<double> Wt(9 * 6);
    for (std::int64_t o = 0; o < 6; ++o)
      for (std::int64_t i = 0; i < 9; ++i) Wt[static_cast<std::size_t>(i * 6 + o)] = W[static_cast<std::size_t>(o * 9 + i)];
    lora::io::merge_module(m, true, factor, lora::MatrixView<double>(Wt.data(), 9, 6));
    for (std::int64_t o = 0; o < 6; ++o)
      for (std::int64_t i = 0; i < 9; ++i)
        ASSERT_NEAR(Wt[static_cast<std::size_t>(i * 6 + o)], expected[static_cast<std::size_t>(o * 9 + i)], 1e-14);
  }

  // A plain LoRA module merges as W + s B A, as before.
  AdapterModule plain = arbitrary_module(3, 9, 6, 5, false, 31);
  std::vector<double> lora_merged = W, delta_only = W;
  lora::io::merge_module(plain, false, 1.0, lora::MatrixView<double>(lora_merged.data(), 6, 9));
  lora::io::add_module_delta(plain, false, 1.0, lora::MatrixView<double>(delta_only.data(), 6, 9));
  EXPECT_EQ(lora_merged, delta_only);

  // An output whose W + s B A is zero has no direction; a magnitude of the wrong length is refused.
  std::vector<double> zero(6 * 9, 0.0);
  AdapterModule zero_b = arbitrary_module(3, 9, 6, 5, true, 31);
  for (std::int64_t k = 0; k < 3; ++k) zero_b.B(2, k) = 0.0f;
  expect_error([&] { lora::io::merge_module(zero_b, false, 1.0, lora::MatrixView<double>(zero.data(), 6, 9)); },
               {"output 2", "norm 0", "undefined"});
  AdapterModule short_m = arbitrary_module(3, 9, 6, 5, true, 31);
  short_m.magnitude = lora::cpu::Matrix<float>(1, 5);
  expect_error([&] { lora::io::merge_module(short_m, false, 1.0, lora::MatrixView<double>(zero.data(), 6, 9)); },
               {"[1, 5]", "expected [1, 6]"});
}

TEST(PeftDora, ModulesGoOnlyIntoLayersOfTheirKindWithTheirMagnitude) {
  lora::cpu::Context ctx;
  const Adapter a = dora_adapter();
  std::vector<float> W(7 * 5, 0.1f), W2(7 * 5, 0.1f);
  Layer q(ctx, {W.data(), 7, 5}, {}, a.config.layer_config("m.q"), 0);
  EXPECT_TRUE(q.config().use_dora) << "layer_config carries use_dora";
  using Named = lora::io::NamedLayer<float, lora::cpu::Backend>;
  Adapter one = dora_adapter();
  one.modules.erase("m.v");
  lora::io::load_into_layers<float, lora::cpu::Backend>(one, {Named{"m.q", &q}});
  const AdapterModule& m = one.modules.at("m.q");
  for (std::int64_t o = 0; o < m.d_out(); ++o) EXPECT_EQ(q.magnitude()(0, o), m.magnitude(0, o)) << o;
  const Adapter back = lora::io::adapter_from_layers<float, lora::cpu::Backend>({Named{"m.q", &q}});
  EXPECT_TRUE(back.config.use_dora);
  EXPECT_EQ(back.modules.at("m.q").magnitude.view().cols, m.d_out());
  for (std::int64_t o = 0; o < m.d_out(); ++o) EXPECT_EQ(back.modules.at("m.q").magnitude(0, o), m.magnitude(0, o)) << o;

  // Either way round, m would be lost or invented: refused by name.
  lora::Config plain_config = a.config.layer_config("m.q");
  plain_config.use_dora = false;
  Layer plain(ctx, {W2.data(), 7, 5}, {}, plain_config, 0);
  expect_error([&] { lora::io::copy_module_to_layer(m, plain, "m.q"); }, {"m.q", "DoRA", "use_dora = false"});
  const AdapterModule without_m = arbitrary_module(2, 5, 7, 4, false, 11);
  expect_error([&] { lora::io::copy_module_to_layer(without_m, q, "m.q"); }, {"m.q", "plain LoRA", "use_dora = true"});
  expect_error([&] { (void)lora::io::adapter_from_layers<float, lora::cpu::Backend>({Named{"m.q", &q}, Named{"m.p", &plain}}); },
               {"\"m.p\"", "use_dora"});
}

// ---- layers <-> directory -------------------------------------------------------------------

TEST(PeftLayers, RoundTripThroughADirectoryBitForBit) {
  lora::cpu::Context ctx;
  std::vector<float> Wq(6 * 5, 0.1f), Wv(4 * 5, -0.2f), Wo(6 * 5, 0.3f);
  lora::Config cq;
  cq.r = 2;
  cq.alpha = 4;
  cq.seed = 1;
  lora::Config cv = cq;
  cv.r = 3;
  cv.alpha = 5;
  Layer q(ctx, {Wq.data(), 6, 5}, {}, cq, 0), v(ctx, {Wv.data(), 4, 5}, {}, cv, 1), o(ctx, {Wo.data(), 6, 5}, {}, cq, 2);
  // Give B non-zero values (a fresh B is 0) through the same route a trainer's optimizer takes.
  for (Layer* l : {&q, &v, &o}) {
    auto B = l->lora_B().value;
    for (std::int64_t i = 0; i < B.rows; ++i)
      for (std::int64_t j = 0; j < B.cols; ++j) B(i, j) = 0.01f * static_cast<float>(i * 7 + j) - 0.05f;
  }
  using Named = lora::io::NamedLayer<float, lora::cpu::Backend>;
  PeftConfig base_config;
  base_config.base_model_name_or_path = "tiny";
  const Adapter a = lora::io::adapter_from_layers<float, lora::cpu::Backend>(
      {Named{"model.layers.0.q_proj", &q}, Named{"model.layers.0.v_proj", &v}, Named{"model.layers.0.o_proj", &o}},
      base_config);
  EXPECT_EQ(a.config.r, 2);
  EXPECT_EQ(a.config.target_modules, (std::vector<std::string>{"o_proj", "q_proj", "v_proj"}));
  ASSERT_EQ(a.config.rank_pattern.size(), 1u);
  EXPECT_EQ(a.config.rank_for("model.layers.0.v_proj"), 3);
  EXPECT_EQ(a.config.rank_for("modelxlayersx0xv_proj"), 2) << "the pattern is escaped: its dots match only dots";
  EXPECT_EQ(a.config.alpha_for("model.layers.0.v_proj"), 5);

  TempDir tmp;
  lora::io::save_peft(a, tmp / "adapter");
  const Adapter back = lora::io::load_peft(tmp / "adapter");
  EXPECT_EQ(back.config.base_model_name_or_path.value_or(""), "tiny");

  // Fresh layers built from the loaded config get exactly the saved tensors.
  std::vector<float> Wq2 = Wq, Wv2 = Wv, Wo2 = Wo;
  Layer q2(ctx, {Wq2.data(), 6, 5}, {}, back.config.layer_config("model.layers.0.q_proj"), 7);
  Layer v2(ctx, {Wv2.data(), 4, 5}, {}, back.config.layer_config("model.layers.0.v_proj"), 8);
  Layer o2(ctx, {Wo2.data(), 6, 5}, {}, back.config.layer_config("model.layers.0.o_proj"), 9);
  lora::io::load_into_layers<float, lora::cpu::Backend>(
      back, {Named{"model.layers.0.q_proj", &q2}, Named{"model.layers.0.v_proj", &v2}, Named{"model.layers.0.o_proj", &o2}});
  for (auto [x, y] : {std::pair<Layer*, Layer*>{&q, &q2}, {&v, &v2}, {&o, &o2}}) {
    ASSERT_EQ(std::memcmp(x->A().data, y->A().data, static_cast<std::size_t>(x->A().size()) * 4), 0);
    ASSERT_EQ(std::memcmp(x->B().data, y->B().data, static_cast<std::size_t>(x->B().size()) * 4), 0);
    EXPECT_EQ(x->scale(), y->scale());
  }
}

TEST(PeftLayers, LoadIntoLayersChecksEverythingBeforeWritingAnything) {
  lora::cpu::Context ctx;
  std::vector<float> W1(4 * 3, 0.0f), W2(4 * 3, 0.0f);
  lora::Config c;
  c.r = 2;
  c.alpha = 2;
  Layer l1(ctx, {W1.data(), 4, 3}, {}, c, 0);
  lora::Config wrong_alpha = c;
  wrong_alpha.alpha = 3;
  Layer l2(ctx, {W2.data(), 4, 3}, {}, wrong_alpha, 1);

  Adapter a;
  a.config.r = 2;
  a.config.lora_alpha = 2;
  for (const char* name : {"a", "b"}) {
    AdapterModule m;
    m.r = 2;
    m.alpha = 2;
    m.scale = 1;
    m.A = lora::cpu::Matrix<float>(2, 3);
    m.B = lora::cpu::Matrix<float>(4, 2);
    m.B(0, 0) = 1.0f;
    a.modules.emplace(name, std::move(m));
  }
  const std::vector<float> A1_before(l1.A().data, l1.A().data + 6);
  using Named = lora::io::NamedLayer<float, lora::cpu::Backend>;
  expect_error([&] { lora::io::load_into_layers<float, lora::cpu::Backend>(a, {Named{"a", &l1}, Named{"b", &l2}}); },
               {"\"b\"", "scale 1.5"});
  EXPECT_EQ(std::vector<float>(l1.A().data, l1.A().data + 6), A1_before) << "layer a was not written";
  EXPECT_EQ(l1.B()(0, 0), 0.0f);
  expect_error([&] { lora::io::load_into_layers<float, lora::cpu::Backend>(a, {Named{"a", &l1}}); },
               {"no layer given", "\"b\""});
  expect_error([&] { lora::io::load_into_layers<float, lora::cpu::Backend>(a, {Named{"c", &l1}}); },
               {"no module \"c\""});
}

TEST(PeftSave, HalfPrecisionAdaptersRoundToNearestEven) {
  Adapter a;
  a.config.r = 1;
  a.config.lora_alpha = 1;
  AdapterModule m;
  m.r = 1;
  m.alpha = 1;
  m.scale = 1;
  m.A = lora::cpu::Matrix<float>(1, 3);
  m.B = lora::cpu::Matrix<float>(2, 1);
  m.A(0, 0) = 1.0f + 0x1p-11f;               // F16 tie: to even, 1.0
  m.A(0, 1) = 1.0f + 0x1.8p-11f;             // above the tie: 1 + 2^-10
  m.A(0, 2) = 70000.0f;                      // beyond the F16 range: inf
  m.B(0, 0) = 1.0f + 0x1p-8f + 0x1p-20f;     // BF16: up to 1 + 2^-7
  m.B(1, 0) = -3.0f;
  a.modules.emplace("m", std::move(m));
  TempDir tmp;
  lora::io::save_peft(a, tmp / "f16", Dtype::F16);
  lora::io::save_peft(a, tmp / "bf16", Dtype::BF16);
  const Adapter h = lora::io::load_peft(tmp / "f16"), b = lora::io::load_peft(tmp / "bf16");
  EXPECT_EQ(h.modules.at("m").stored_dtype, Dtype::F16);
  EXPECT_EQ(values(h.modules.at("m").A), (std::vector<float>{1.0f, 1.0f + 0x1p-10f, std::numeric_limits<float>::infinity()}));
  EXPECT_EQ(values(b.modules.at("m").B), (std::vector<float>{1.0f + 0x1p-7f, -3.0f}));
}

// ---- untrusted patterns, JSON, keys and files (issue 9) -------------------------------------

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

TEST(PeftPatterns, PathologicalPatternsRunInLinearTimeAndLongNamesAreRefused) {
  PeftConfig c;
  c.r = 8;
  // (a|aa)*b: std::regex backtracks exponentially (1.4 s at 32 characters, doubling every ~2 more).
  c.rank_pattern = {{"(a|aa)*b", 1}, {"q_proj", 2}};
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(c.rank_for(std::string(40, 'a')), 8);
  EXPECT_EQ(c.rank_for(std::string(4000, 'a')), 8);
  EXPECT_EQ(c.rank_for(std::string(4000, 'a') + "b"), 1);
  // A 4,000-character name: std::regex recursed once per character (a 50,000-character one overflowed the stack).
  EXPECT_EQ(c.rank_for(std::string(3990, 'x') + ".q_proj"), 2);
  EXPECT_LT(seconds_since(start), 1.0) << "linear-time matching takes microseconds here";
  // Beyond the bounds: a clear error, not a crash.
  expect_error([&] { (void)c.rank_for(std::string(50'000, 'x') + ".q_proj"); },
               {"rank_pattern", "50007 bytes", std::to_string(lora::io::kMaxModuleNameBytes)});
  c.rank_pattern = {{std::string(lora::io::kMaxPatternBytes + 1, 'a'), 1}};
  expect_error([&] { (void)c.rank_for("a"); }, {"rank_pattern", "more than the"});
  // Python features RE2 lacks are refused by name, with the pattern quoted.
  c.rank_pattern = {{"q(?=_proj)", 1}};
  expect_error([&] { (void)c.rank_for("q_proj"); }, {"rank_pattern", "\"q(?=_proj)\"", "RE2"});
  c.rank_pattern = {{"(q)\\1", 1}};
  expect_error([&] { (void)c.rank_for("qq"); }, {"rank_pattern", "RE2"});
  // 4,000 nested groups: RE2's parser and compiler do not recurse, so this is just a pattern.
  c.rank_pattern = {{std::string(4000, '(') + "q" + std::string(4000, ')'), 1}};
  EXPECT_EQ(c.rank_for("x.q"), 1);
}

TEST(PeftPatterns, TheResolverCompilesOnceAndAgreesWithTheConfig) {
  PeftConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.rank_pattern = {{"layers\\.[0-9]+\\.q", 2}};
  c.alpha_pattern = {{"v", 3}};
  const PeftConfig::Resolver resolver = c.resolver();
  c.r = 99;  // the resolver holds its own copy
  for (const std::string m : {"layers.0.q", "layers.12.q", "layers.0.v", "x.layers.1.q", "layersx0.q"}) {
    EXPECT_EQ(resolver.rank_for(m), m == "layers.0.v" || m == "layersx0.q" ? 4 : 2) << m;
    EXPECT_EQ(resolver.alpha_for(m), m == "layers.0.v" ? 3 : 8) << m;
  }
}

TEST(PeftLoad, DeeplyNestedOrHugeJsonValuesGiveAShortError) {
  TempDir tmp;
  const std::string A = "base_model.model.m.q.lora_A.weight", B = "base_model.model.m.q.lora_B.weight";
  // 100,000 levels of nesting in a key we do not interpret: nlohmann's recursion overflowed the stack.
  const std::string deep = std::string(100'000, '[') + std::string(100'000, ']');
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "deep", R"({"peft_type": "LORA", "r": 2, "x": )" + deep + "}",
                                            {{A, {2, 3}}, {B, {5, 2}}}));
  }, {"adapter_config.json", "nested deeper than 64"});
  // ... and in a key we do, where the error message printed (dump()ed) the value.
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "deep_r", R"({"peft_type": "LORA", "r": )" + deep + "}", {}));
  }, {"adapter_config.json", "nested deeper than 64"});
  // An 8 MB "r" is quoted as an excerpt, not whole.
  const std::string big(8 << 20, 'x');
  try {
    (void)lora::io::load_peft(write_adapter(tmp, "big", R"({"peft_type": "LORA", "r": ")" + big + "\"}", {}));
    ADD_FAILURE() << "an 8 MB string r was accepted";
  } catch (const lora::Error& e) {
    const std::string message = e.what();
    EXPECT_LT(message.size(), 1000u) << "the message holds " << message.size() << " bytes";
    EXPECT_NE(message.find("\"r\""), std::string::npos) << message;
    EXPECT_NE(message.find(std::to_string(big.size()) + " bytes"), std::string::npos) << message;
  }
  // 64 levels are fine (PEFT's own configs nest 3 deep).
  const std::string ok = std::string(63, '[') + std::string(63, ']');
  EXPECT_EQ(lora::io::load_peft(write_adapter(tmp, "ok", R"({"peft_type": "LORA", "r": 2, "x": )" + ok + "}",
                                              {{A, {2, 3}}, {B, {5, 2}}}))
                .modules.size(),
            1u);
}

TEST(PeftLoad, EveryConfigFieldIsTypeChecked) {
  TempDir tmp;
  const std::string A = "base_model.model.m.q.lora_A.weight", B = "base_model.model.m.q.lora_B.weight";
  const std::pair<const char*, const char*> cases[] = {
      {R"("use_dora": "yes")", "\"use_dora\""},       // truthy in Python: would be a DoRA adapter
      {R"("lora_bias": "no")", "\"lora_bias\""},
      {R"("use_rslora": 1)", "\"use_rslora\""},
      {R"("fan_in_fan_out": "false")", "\"fan_in_fan_out\""},
      {R"("bias": "some")", "\"bias\""},
      {R"("bias": 0)", "\"bias\""},
      {R"("modules_to_save": "lm_head")", "\"modules_to_save\""},
      {R"("target_modules": 5)", "\"target_modules\""},
      {R"("task_type": 3)", "\"task_type\""},
      {R"("rank_pattern": {"q": "4"})", "\"rank_pattern\""},
      {R"("alpha_pattern": [1])", "\"alpha_pattern\""},
  };
  int i = 0;
  for (const auto& [field, name] : cases) {
    const std::string config = std::string(R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, )") + field + "}";
    expect_error([&] {
      (void)lora::io::load_peft(write_adapter(tmp, "typed" + std::to_string(i++), config, {{A, {2, 3}}, {B, {5, 2}}}));
    }, {name, "expected"});
  }
  // null still means "PEFT's default".
  const Adapter a = lora::io::load_peft(write_adapter(
      tmp, "nulls", R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": null, "bias": null})",
      {{A, {2, 3}}, {B, {5, 2}}}));
  EXPECT_EQ(a.config.bias, "none");
}

TEST(PeftLoad, EveryLoraKeyCarriesPeftsPrefixAndNoModuleIsSpelledTwice) {
  TempDir tmp;
  const std::string A = "base_model.model.m.q.lora_A.weight", B = "base_model.model.m.q.lora_B.weight";
  // The same module with and without the prefix: one A was silently dropped.
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "twice", kMinimalConfig,
                                            {{A, {2, 3}}, {B, {5, 2}}, {"m.q.lora_A.weight", {2, 3}}}));
  }, {"\"base_model.model.m.q.lora_A.weight\"", "\"m.q.lora_A.weight\"", "\"m.q\""});
  // Keys without the prefix loaded, then failed in lora-tool inspect: refused at load, by name.
  expect_error([&] {
    (void)lora::io::load_peft(
        write_adapter(tmp, "bare", kMinimalConfig, {{"m.q.lora_A.weight", {2, 3}}, {"m.q.lora_B.weight", {5, 2}}}));
  }, {"\"m.q.lora_A.weight\"", "base_model.model.", "prefix"});
}

// A module of the given shape with every element set, and the adapter holding it.
Adapter one_module_adapter(const std::string& name, int r, double alpha, std::int64_t d_out, std::int64_t d_in) {
  Adapter a;
  a.config.r = r;
  a.config.lora_alpha = alpha;
  a.config.target_modules = {"gate"};
  AdapterModule m;
  m.r = r;
  m.alpha = alpha;
  m.scale = alpha / r;
  m.A = lora::cpu::Matrix<float>(r, d_in);
  m.B = lora::cpu::Matrix<float>(d_out, r);
  for (std::int64_t i = 0; i < m.A.size(); ++i) m.A.data()[i] = 0.01f * static_cast<float>((i * 37) % 23) - 0.1f;
  for (std::int64_t i = 0; i < m.B.size(); ++i) m.B.data()[i] = 0.02f * static_cast<float>((i * 11) % 17) - 0.15f;
  a.modules.emplace(name, std::move(m));
  return a;
}

TEST(PeftLayers, RankAboveTheSmallerDimensionLoadsAndComputesTheRightForward) {
  // PEFT's "all-linear" with r = 16 on an 8 x 64 router gate: legal in PEFT, refused by Linear before.
  constexpr std::int64_t d_out = 8, d_in = 64, N = 3;
  constexpr int r = 16;
  const Adapter saved = one_module_adapter("model.gate", r, 32.0, d_out, d_in);
  TempDir tmp;
  lora::io::save_peft(saved, tmp / "adapter");
  const Adapter a = lora::io::load_peft(tmp / "adapter");
  ASSERT_EQ(a.modules.at("model.gate").r, r);

  lora::cpu::Context ctx;
  std::vector<float> W(d_out * d_in), x(N * d_in), y(N * d_out);
  for (std::size_t i = 0; i < W.size(); ++i) W[i] = 0.001f * static_cast<float>(i % 29);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
  Layer gate(ctx, {W.data(), d_out, d_in}, {}, a.config.layer_config("model.gate"));
  using Named = lora::io::NamedLayer<float, lora::cpu::Backend>;
  lora::io::load_into_layers<float, lora::cpu::Backend>(a, {Named{"model.gate", &gate}});
  gate.forward({x.data(), N, d_in}, {y.data(), N, d_out}, lora::Mode::eval);

  // y = x W^T + (alpha / r) (x A^T) B^T, in double from the values saved.
  const AdapterModule& m = saved.modules.at("model.gate");
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t o = 0; o < d_out; ++o) {
      double expected = 0;
      for (std::int64_t i = 0; i < d_in; ++i) expected += double(x[n * d_in + i]) * W[o * d_in + i];
      for (std::int64_t k = 0; k < r; ++k) {
        double xa = 0;
        for (std::int64_t i = 0; i < d_in; ++i) xa += double(x[n * d_in + i]) * m.A(k, i);
        expected += 32.0 / r * xa * m.B(o, k);
      }
      EXPECT_NEAR(y[n * d_out + o], expected, 1e-5) << n << ", " << o;
    }
}

TEST(PeftLoad, HugeSpecialAndLoopingFilesGiveALoraErrorNamingTheFile) {
  TempDir tmp;
  const std::string dir = write_adapter(tmp, "huge", R"({"peft_type": "LORA", "r": 1, "lora_alpha": 1})", {});
  const std::string weights = dir + "/adapter_model.safetensors";
  // A valid header declaring a 1 TiB lora_A over a sparse file: allocating it first died (bad_alloc or the OOM killer).
  const std::string header =
      R"({"base_model.model.m.lora_A.weight":{"dtype":"F32","shape":[1,274877906944],"data_offsets":[16,1099511627792]},)"
      R"("base_model.model.m.lora_B.weight":{"dtype":"F32","shape":[4,1],"data_offsets":[0,16]}})";
  std::vector<std::uint8_t> head(8);
  for (int i = 0; i < 8; ++i) head[i] = static_cast<std::uint8_t>(header.size() >> (8 * i));
  head.insert(head.end(), header.begin(), header.end());
  io_test::write_file(weights, head);
  if (::truncate(weights.c_str(), static_cast<off_t>(head.size() + 1099511627792ull)) != 0)
    GTEST_SKIP() << "this file system holds no 1 TiB sparse file";
  expect_error([&] { (void)lora::io::load_peft(dir); }, {weights, "1099511627792", "bytes", "memory"});
  const auto reader = lora::io::SafetensorsReader::open(weights);
  expect_error([&] { (void)reader.read<float>("base_model.model.m.lora_A.weight"); },
               {weights, "\"base_model.model.m.lora_A.weight\"", "[1, 274877906944]", "1099511627776 bytes"});

  // A FIFO or a directory where the weights should be: said so (was "no such file"), and no hang on the FIFO.
  std::filesystem::remove(weights);
  ASSERT_EQ(::mkfifo(weights.c_str(), 0600), 0);
  expect_error([&] { (void)lora::io::load_peft(dir); }, {weights, "FIFO"});
  std::filesystem::remove(weights);
  std::filesystem::create_directory(weights);
  expect_error([&] { (void)lora::io::load_peft(dir); }, {weights, "directory"});
  std::filesystem::remove(weights);

  // Symlink loops, for a file and for the directory: std::filesystem::filesystem_error escaped.
  std::filesystem::create_symlink(weights, weights);
  expect_error([&] { (void)lora::io::load_peft(dir); }, {weights, "symbolic links"});
  std::filesystem::create_directory_symlink(tmp / "loop", tmp / "loop");
  expect_error([&] { (void)lora::io::load_peft(tmp / "loop"); }, {tmp / "loop", "symbolic links"});
}

// ---- saving: atomic as a pair, permissions kept, killed saves cleaned up -----------------------

// The temporaries (".<name>.tmp.<pid>.<n>") in `dir`.
std::vector<std::string> temporaries_in(const std::filesystem::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) out.push_back(e.path().filename().string());
  return out;
}

mode_t mode_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

TEST(PeftSave, ReSavingKeepsPermissionsAndTheDirectorysOtherFiles) {
  TempDir tmp;
  const std::string dir = tmp / "adapter";
  lora::io::save_peft(one_module_adapter("m.gate", 2, 4.0, 3, 5), dir);
  ASSERT_EQ(::chmod((dir + "/adapter_model.safetensors").c_str(), 0600), 0);
  ASSERT_EQ(::chmod((dir + "/adapter_config.json").c_str(), 0640), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 0750), 0);
  io_test::write_file(dir + "/README.md", std::string("# my adapter\n"));
  lora::io::save_peft(one_module_adapter("m.gate", 4, 4.0, 3, 5), dir);
  EXPECT_EQ(mode_of(dir + "/adapter_model.safetensors"), 0600u) << "a 0600 file became world-readable";
  EXPECT_EQ(mode_of(dir + "/adapter_config.json"), 0640u);
  EXPECT_EQ(mode_of(dir), 0750u);
  const std::vector<std::uint8_t> readme = io_test::read_file(dir + "/README.md");
  EXPECT_EQ(std::string(readme.begin(), readme.end()), "# my adapter\n");
  EXPECT_EQ(lora::io::load_peft(dir).modules.at("m.gate").r, 4);
  EXPECT_TRUE(temporaries_in(tmp.path()).empty());
  EXPECT_TRUE(temporaries_in(dir).empty());
  // A directory is replaced as a whole: one holding a subdirectory is refused, and left as it was.
  std::filesystem::create_directory(dir + "/checkpoint-1");
  expect_error([&] { lora::io::save_peft(one_module_adapter("m.gate", 2, 4.0, 3, 5), dir); },
               {dir, "\"checkpoint-1\"", "not a file"});
  EXPECT_EQ(lora::io::load_peft(dir).modules.at("m.gate").r, 4);
  EXPECT_TRUE(temporaries_in(tmp.path()).empty());
}

pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return child;  // reaped: no process has this pid until the kernel hands it out again
}

TEST(PeftSave, StaleTemporariesOfDeadWritersAreRemovedLiveOnesKept) {
  TempDir tmp;
  const std::string dir = tmp / "adapter";
  lora::io::save_peft(one_module_adapter("m.gate", 2, 4.0, 3, 5), dir);
  const std::string dead = std::to_string(dead_pid()), mine = std::to_string(::getpid());
  const std::vector<std::string> stale = {dir + "/.adapter_model.safetensors.tmp." + dead + ".0",
                                          dir + "/.adapter_config.json.tmp." + dead + ".7",
                                          tmp / (".adapter.tmp." + dead + ".3")};
  const std::vector<std::string> live = {dir + "/.adapter_model.safetensors.tmp." + mine + ".99",  // this process
                                         dir + "/.adapter_model.safetensors.tmp.1.5",  // pid 1 is always alive
                                         tmp / (".adapter.tmp.1.2")};
  for (const std::string& p : stale) io_test::write_file(p, std::string(1000, 'x'));
  std::filesystem::create_directory(tmp / (".adapter.tmp." + dead + ".4"));  // a killed save's directory
  io_test::write_file(tmp / (".adapter.tmp." + dead + ".4") + "/adapter_model.safetensors", std::string("half"));
  for (const std::string& p : live) io_test::write_file(p, std::string("busy"));

  lora::io::save_peft(one_module_adapter("m.gate", 2, 4.0, 3, 5), dir);
  for (const std::string& p : stale) EXPECT_FALSE(std::filesystem::exists(p)) << p << " was left behind";
  EXPECT_FALSE(std::filesystem::exists(tmp / (".adapter.tmp." + dead + ".4")));
  for (const std::string& p : live) EXPECT_TRUE(std::filesystem::exists(p)) << p << ", a live writer's, was removed";
}

TEST(PeftSave, SavesKilledAtRandomTimesLeaveAConsistentPairAndNoTemporariesForLong) {
  // Two adapters whose configs disagree (r = 2 vs r = 4): new weights beside an
  // old config fail to load. A child saves them in turn until it is SIGKILLed.
  TempDir tmp;
  const std::string dir = tmp / "adapter";
  const Adapter adapters[2] = {one_module_adapter("m.gate", 2, 4.0, 48, 320), one_module_adapter("m.gate", 4, 4.0, 48, 320)};
  lora::io::save_peft(adapters[0], dir);
  std::mt19937 rng(7);
  int leftovers = 0;
  for (int kill = 0; kill < 25; ++kill) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      for (int i = 0;; ++i) lora::io::save_peft(adapters[i % 2], dir);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng() % 30000));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the saving child stopped by itself";
    const Adapter a = lora::io::load_peft(dir);  // throws on a mixed pair
    const int r = a.modules.at("m.gate").r;
    EXPECT_TRUE(r == 2 || r == 4);
    leftovers += static_cast<int>(temporaries_in(tmp.path()).size() + temporaries_in(dir).size());
  }
  // The next save into the directory removes what the killed ones left.
  lora::io::save_peft(adapters[0], dir);
  EXPECT_TRUE(temporaries_in(tmp.path()).empty());
  EXPECT_TRUE(temporaries_in(dir).empty());
  std::cout << "killed saves left " << leftovers << " temporaries in all; none remain after the next save\n";
}

}  // namespace

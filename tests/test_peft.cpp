// PEFT adapter directories: both real fixtures load with the right module
// names, shapes, ranks and scales (values checked against the file's raw
// bytes), save back byte for byte, and the GPT-2 one merges as W + s (B A)^T;
// configs follow PEFT's pattern rules and JSON layout; unsupported features
// are refused by name; layers round-trip through a directory.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

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
    (void)lora::io::load_peft(write_adapter(tmp, "dora", kMinimalConfig,
                                            {{A, {2, 3}}, {B, {5, 2}}, {"base_model.model.m.q.lora_magnitude_vector", {5}}}));
  }, {"lora_magnitude_vector", "DoRA"});
  expect_error([&] {
    (void)lora::io::load_peft(write_adapter(tmp, "dora_config",
                                            R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true})",
                                            {{A, {2, 3}}, {B, {5, 2}}}));
  }, {"use_dora", "DoRA"});
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

}  // namespace

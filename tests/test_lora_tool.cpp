// lora-tool end to end: the executable runs as a user runs it, on files this
// test writes, and its outputs are read back and compared with naive double
// references: inspect on the real fixtures, merge (fan_in_fan_out, --scale,
// F16/BF16 bases, a sharded base, modules_to_save, GPT-2's real key names),
// extract (an exactly rank-r difference comes back to ~1e-5 with PEFT's B = U S, A = Vᵀ; energy
// thresholds give hand-derived ranks in rank_pattern), quantize to NF4 and merge onto the NF4
// base (dequant(W) + s B A in the dtype asked), DoRA adapters (inspect, and merges checked
// against tests/dora_reference.py, an independent torch re-implementation of PEFT's DoRA, and
// onto NF4), and errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io_test_util.hpp"
#include "lora/io/nf4.hpp"
#include "lora/io/peft.hpp"
#include "lora/io/safetensors.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/wait.h>
#endif

namespace {

using io_test::naive_merge;
using io_test::TempDir;
using lora::io::Adapter;
using lora::io::AdapterModule;
using lora::io::Dtype;
using lora::io::SafetensorsReader;
using lora::io::SafetensorsWriter;

struct ToolResult {
  int status = -1;
  std::string out, err;
};

#if defined(LORA_TOOL_PATH)
ToolResult run_tool(const TempDir& tmp, const std::string& args) {
  const std::string out = tmp / "stdout.txt", err = tmp / "stderr.txt";
  const std::string command = "'" + std::string(LORA_TOOL_PATH) + "' " + args + " > '" + out + "' 2> '" + err + "'";
  const int raw = std::system(command.c_str());
  ToolResult r;
#if defined(WEXITSTATUS)
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
#else
  r.status = raw;
#endif
  const auto o = io_test::read_file(out), e = io_test::read_file(err);
  r.out.assign(o.begin(), o.end());
  r.err.assign(e.begin(), e.end());
  return r;
}
#define SKIP_WITHOUT_TOOL() (void)0
#else
ToolResult run_tool(const TempDir&, const std::string&) { return {}; }
#define SKIP_WITHOUT_TOOL() GTEST_SKIP() << "lora-tool is not built (LORA_BUILD_TOOLS=OFF)"
#endif

#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE((text).find(part), std::string::npos) << "\"" << (text) << "\" lacks \"" << (part) << "\""

// Deterministic arbitrary values in [-1, 1).
std::vector<double> arbitrary(std::size_t n, std::uint64_t seed) {
  std::vector<double> v(n);
  for (double& x : v) {
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    x = static_cast<double>(seed >> 11) * 0x1p-52 - 1.0;
  }
  return v;
}
std::vector<float> as_floats(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

AdapterModule module_of(int r, std::int64_t d_in, std::int64_t d_out, double alpha, std::uint64_t seed) {
  AdapterModule m;
  m.r = r;
  m.alpha = alpha;
  m.scale = alpha / r;
  m.A = lora::cpu::Matrix<float>(r, d_in);
  m.B = lora::cpu::Matrix<float>(d_out, r);
  const std::vector<double> a = arbitrary(static_cast<std::size_t>(r * d_in), seed), b = arbitrary(static_cast<std::size_t>(d_out * r), seed + 1);
  for (std::int64_t i = 0; i < m.A.size(); ++i) m.A.data()[i] = static_cast<float>(a[static_cast<std::size_t>(i)]);
  for (std::int64_t i = 0; i < m.B.size(); ++i) m.B.data()[i] = static_cast<float>(b[static_cast<std::size_t>(i)]);
  return m;
}

// |got - expected| within half a float ulp of expected (plus a hair for double rounding-order noise).
void expect_correctly_rounded(const std::vector<float>& got, const std::vector<double>& expected, const std::string& what) {
  ASSERT_EQ(got.size(), expected.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const float e = static_cast<float>(expected[i]);
    const double ulp = static_cast<double>(std::nextafter(std::fabs(e), INFINITY)) - std::fabs(e);
    ASSERT_LE(std::fabs(static_cast<double>(got[i]) - expected[i]), 0.5 * ulp * (1 + 1e-6)) << what << " element " << i;
  }
}

void save_adapter(const std::string& dir, std::map<std::string, AdapterModule> modules, bool fan_in_fan_out,
                  std::map<std::string, lora::io::RawTensor> other = {}) {
  Adapter a;
  a.config.r = modules.begin()->second.r;
  a.config.lora_alpha = modules.begin()->second.alpha;
  a.config.fan_in_fan_out = fan_in_fan_out;
  a.config.use_dora = modules.begin()->second.dora();
  a.modules = std::move(modules);
  a.other_tensors = std::move(other);
  lora::io::save_peft(a, dir);
}

// ---- inspect --------------------------------------------------------------------------------

TEST(LoraToolInspect, ReportsTheRealAdapters) {
  SKIP_WITHOUT_TOOL();
  const std::string fixtures = io_test::fixtures_dir();
  if (fixtures.empty()) GTEST_SKIP() << "LORA_FIXTURES_DIR is absent";
  TempDir tmp;
  const std::string gpt2 = fixtures + "/gpt2-c_attn-c_proj-r8";
  const ToolResult r = run_tool(tmp, "inspect '" + gpt2 + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  // Totals computed here from the raw header: element counts and the data section's size.
  const auto bytes = io_test::read_file(gpt2 + "/adapter_model.safetensors");
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(bytes[i]) << (8 * i);
  const auto header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  std::uint64_t elements = 0;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") continue;
    std::uint64_t e = 1;
    for (const auto& d : item.value()["shape"]) e *= d.get<std::uint64_t>();
    elements += e;
  }
  EXPECT_CONTAINS(r.out, std::to_string(header.size() / 2) + " LoRA modules");
  EXPECT_CONTAINS(r.out, std::to_string(elements) + " trainable parameters");
  EXPECT_CONTAINS(r.out, std::to_string(bytes.size() - 8 - n) + " bytes (F32)");
  EXPECT_CONTAINS(r.out, "r = 8, lora_alpha = 32");
  EXPECT_CONTAINS(r.out, "fan_in_fan_out = true");
  EXPECT_CONTAINS(r.out, "transformer.h.0.attn.c_attn");
  EXPECT_CONTAINS(r.out, "[2304, 8]");
  EXPECT_EQ(r.out.find("non-LoRA"), std::string::npos);

  const ToolResult d = run_tool(tmp, "inspect '" + fixtures + "/distilbert-q_lin-v_lin-r8'");
  ASSERT_EQ(d.status, 0) << d.err;
  EXPECT_CONTAINS(d.out, "12 LoRA modules");
  EXPECT_CONTAINS(d.out, "4 non-LoRA tensors");
  EXPECT_CONTAINS(d.out, "base_model.model.pre_classifier.weight  F32 [768, 768]");
}

// ---- merge ----------------------------------------------------------------------------------

TEST(LoraToolMerge, Conv1DBaseWithScaleKeepsEverythingElseByteForByte) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  // A GPT-2-like adapter (keys under "transformer.") for a base saved without that prefix.
  const AdapterModule m = module_of(2, 6, 10, 5.0, 1);
  std::map<std::string, AdapterModule> modules;
  modules.emplace("transformer.h.0.attn.c_attn", module_of(2, 6, 10, 5.0, 1));
  save_adapter(tmp / "adapter", std::move(modules), /*fan_in_fan_out=*/true);

  const std::vector<double> W = arbitrary(6 * 10, 7);
  SafetensorsWriter base;
  base.set_metadata("format", "pt");
  base.set_metadata("note", "kept");
  base.add("h.0.attn.c_attn.weight", {6, 10}, as_floats(W).data());  // Conv1D: d_in x d_out
  base.add("h.0.ln.bias", {10}, as_floats(arbitrary(10, 9)).data(), Dtype::F16);
  base.add_raw("h.0.attn.bias", {Dtype::U8, {4}, {1, 2, 3, 4}});
  base.write(tmp / "model.safetensors");

  const ToolResult r = run_tool(tmp, "merge --base '" + tmp / "model.safetensors" + "' --adapter '" + tmp / "adapter" +
                                         "' --out '" + tmp / "merged.safetensors" + "' --scale 0.5");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "merged 1 LoRA modules");
  const SafetensorsReader in = SafetensorsReader::open(tmp / "model.safetensors");
  const SafetensorsReader out = SafetensorsReader::open(tmp / "merged.safetensors");
  EXPECT_EQ(out.metadata(), in.metadata());
  EXPECT_EQ(out.info("h.0.attn.c_attn.weight").dtype, Dtype::F32);
  expect_correctly_rounded(out.read<float>("h.0.attn.c_attn.weight"),
                           naive_merge(in.read<double>("h.0.attn.c_attn.weight"), m, true, 0.5), "c_attn");
  EXPECT_EQ(out.read_raw("h.0.ln.bias").bytes, in.read_raw("h.0.ln.bias").bytes);
  EXPECT_EQ(out.read_raw("h.0.attn.bias").bytes, in.read_raw("h.0.attn.bias").bytes);
}

TEST(LoraToolMerge, HalfPrecisionBasesKeepTheirDtypeAndRoundOnce) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  const AdapterModule q = module_of(3, 8, 5, 6.0, 21), v = module_of(3, 8, 4, 6.0, 23);
  std::map<std::string, AdapterModule> modules;
  modules.emplace("model.layers.0.q_proj", module_of(3, 8, 5, 6.0, 21));
  modules.emplace("model.layers.0.v_proj", module_of(3, 8, 4, 6.0, 23));
  save_adapter(tmp / "adapter", std::move(modules), /*fan_in_fan_out=*/false);
  SafetensorsWriter base;
  base.add("model.layers.0.q_proj.weight", {5, 8}, arbitrary(40, 3).data(), Dtype::F16);
  base.add("model.layers.0.v_proj.weight", {4, 8}, arbitrary(32, 4).data(), Dtype::BF16);
  base.write(tmp / "model.safetensors");
  const ToolResult r = run_tool(tmp, "merge --base '" + tmp.path().string() + "' --adapter '" + tmp / "adapter" +
                                         "' --out '" + tmp / "merged.safetensors" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  const SafetensorsReader in = SafetensorsReader::open(tmp / "model.safetensors");
  const SafetensorsReader out = SafetensorsReader::open(tmp / "merged.safetensors");
  EXPECT_EQ(out.info("model.layers.0.q_proj.weight").dtype, Dtype::F16);
  EXPECT_EQ(out.info("model.layers.0.v_proj.weight").dtype, Dtype::BF16);
  const std::vector<double> q_expected = naive_merge(in.read<double>("model.layers.0.q_proj.weight"), q, false, 1.0);
  const std::vector<double> v_expected = naive_merge(in.read<double>("model.layers.0.v_proj.weight"), v, false, 1.0);
  const auto q_bytes = out.read_bytes("model.layers.0.q_proj.weight"), v_bytes = out.read_bytes("model.layers.0.v_proj.weight");
  for (std::size_t i = 0; i < q_expected.size(); ++i)
    EXPECT_EQ(q_bytes[2 * i] | (q_bytes[2 * i + 1] << 8), lora::io::double_to_half(q_expected[i])) << i;
  for (std::size_t i = 0; i < v_expected.size(); ++i)
    EXPECT_EQ(v_bytes[2 * i] | (v_bytes[2 * i + 1] << 8), lora::io::double_to_bfloat16(v_expected[i])) << i;
}

TEST(LoraToolMerge, ShardedBaseWithModulesToSave) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  const AdapterModule a = module_of(2, 4, 3, 2.0, 31), b = module_of(2, 4, 3, 2.0, 33);
  std::map<std::string, AdapterModule> modules;
  modules.emplace("layers.0.q", module_of(2, 4, 3, 2.0, 31));
  modules.emplace("layers.1.q", module_of(2, 4, 3, 2.0, 33));
  const std::vector<float> head = as_floats(arbitrary(6, 41)), score = as_floats(arbitrary(2, 43));
  std::map<std::string, lora::io::RawTensor> other;
  {
    SafetensorsWriter w;  // encode the modules_to_save copies as F32 raw tensors
    w.add("h", {2, 3}, head.data());
    w.add("s", {2}, score.data());
    const SafetensorsReader rw = SafetensorsReader::from_memory(w.to_bytes());
    other["base_model.model.classifier.weight"] = rw.read_raw("h");
    other["base_model.model.score.weight"] = rw.read_raw("s");
  }
  save_adapter(tmp / "adapter", std::move(modules), false, std::move(other));

  std::filesystem::create_directories(tmp / "base");
  SafetensorsWriter s1, s2;
  s1.add("layers.0.q.weight", {3, 4}, arbitrary(12, 51).data());  // F64 (doubles)
  s1.add("embed.weight", {5, 4}, arbitrary(20, 52).data());
  s2.add("layers.1.q.weight", {3, 4}, arbitrary(12, 53).data(), Dtype::BF16);
  s2.add("classifier.weight", {2, 3}, arbitrary(6, 54).data(), Dtype::BF16);
  s1.write(tmp / "base/model-00001-of-00002.safetensors");
  s2.write(tmp / "base/model-00002-of-00002.safetensors");
  const nlohmann::ordered_json index = {
      {"metadata", {{"total_size", 12 * 8 + 20 * 8 + 12 * 2 + 6 * 2}}},
      {"weight_map",
       {{"classifier.weight", "model-00002-of-00002.safetensors"},
        {"embed.weight", "model-00001-of-00002.safetensors"},
        {"layers.0.q.weight", "model-00001-of-00002.safetensors"},
        {"layers.1.q.weight", "model-00002-of-00002.safetensors"}}}};
  io_test::write_file(tmp / "base/model.safetensors.index.json", index.dump(2));

  const ToolResult r = run_tool(tmp, "merge --base '" + tmp / "base/model.safetensors.index.json" + "' --adapter '" +
                                         tmp / "adapter" + "' --out '" + tmp / "merged" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "replaced classifier.weight");
  EXPECT_CONTAINS(r.out, "added base_model.model.score.weight");
  const auto out_index = nlohmann::json::parse(io_test::read_file(tmp / "merged/model.safetensors.index.json"));
  EXPECT_EQ(out_index["weight_map"]["layers.1.q.weight"], "model-00002-of-00002.safetensors");
  EXPECT_EQ(out_index["weight_map"]["score.weight"], "model-00002-of-00002.safetensors");
  EXPECT_EQ(out_index["metadata"]["total_size"], 12 * 8 + 20 * 8 + 12 * 2 + 6 * 2 + 2 * 4) << "tensor bytes, score.weight included";

  const SafetensorsReader in1 = SafetensorsReader::open(tmp / "base/model-00001-of-00002.safetensors");
  const SafetensorsReader in2 = SafetensorsReader::open(tmp / "base/model-00002-of-00002.safetensors");
  const SafetensorsReader out1 = SafetensorsReader::open(tmp / "merged/model-00001-of-00002.safetensors");
  const SafetensorsReader out2 = SafetensorsReader::open(tmp / "merged/model-00002-of-00002.safetensors");
  EXPECT_EQ(out1.info("layers.0.q.weight").dtype, Dtype::F64);
  const std::vector<double> expected_a = naive_merge(in1.read<double>("layers.0.q.weight"), a, false, 1);
  const std::vector<double> got_a = out1.read<double>("layers.0.q.weight");
  for (std::size_t i = 0; i < expected_a.size(); ++i) EXPECT_NEAR(got_a[i], expected_a[i], 1e-15) << i;
  EXPECT_EQ(out1.read_raw("embed.weight").bytes, in1.read_raw("embed.weight").bytes);
  const std::vector<double> expected_b = naive_merge(in2.read<double>("layers.1.q.weight"), b, false, 1);
  const auto b_bytes = out2.read_bytes("layers.1.q.weight");
  for (std::size_t i = 0; i < expected_b.size(); ++i)
    EXPECT_EQ(b_bytes[2 * i] | (b_bytes[2 * i + 1] << 8), lora::io::double_to_bfloat16(expected_b[i]));
  // modules_to_save: the base's classifier (BF16) takes the adapter's values; score is new, as the adapter stored it.
  EXPECT_EQ(out2.info("classifier.weight").dtype, Dtype::BF16);
  const std::vector<float> classifier = out2.read<float>("classifier.weight");
  for (std::size_t i = 0; i < head.size(); ++i)
    EXPECT_EQ(classifier[i], lora::io::bfloat16_to_float(lora::io::float_to_bfloat16(head[i])));
  EXPECT_EQ(out2.read<float>("score.weight"), score);
}

TEST(LoraToolMerge, TheGpt2FixtureMergesIntoABaseWithGpt2sOwnKeyNames) {
  SKIP_WITHOUT_TOOL();
  const std::string fixtures = io_test::fixtures_dir();
  if (fixtures.empty()) GTEST_SKIP() << "LORA_FIXTURES_DIR is absent";
  const std::string adapter_dir = fixtures + "/gpt2-c_attn-c_proj-r8";
  const Adapter adapter = lora::io::load_peft(adapter_dir);
  TempDir tmp;
  // The published gpt2 checkpoint names its tensors "h.N...." (no "transformer."); Conv1D weights are d_in x d_out, F16 here.
  SafetensorsWriter base;
  std::uint64_t seed = 100;
  for (const auto& [name, m] : adapter.modules)
    base.add(name.substr(std::string("transformer.").size()) + ".weight", {m.d_in(), m.d_out()},
             arbitrary(static_cast<std::size_t>(m.d_in() * m.d_out()), seed++).data(), Dtype::F16);
  base.write(tmp / "model.safetensors");
  const ToolResult r = run_tool(tmp, "merge --base '" + tmp / "model.safetensors" + "' --adapter '" + adapter_dir +
                                         "' --out '" + tmp / "merged.safetensors" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "merged 36 LoRA modules");
  const SafetensorsReader in = SafetensorsReader::open(tmp / "model.safetensors");
  const SafetensorsReader out = SafetensorsReader::open(tmp / "merged.safetensors");
  std::size_t checked = 0, changed = 0;
  for (const std::string name : {"transformer.h.0.attn.c_attn", "transformer.h.6.mlp.c_proj", "transformer.h.11.attn.c_proj"}) {
    const AdapterModule& m = adapter.modules.at(name);
    const std::string key = name.substr(12) + ".weight";
    const std::vector<double> W = in.read<double>(key);
    const std::vector<double> expected = naive_merge(W, m, /*fan_in_fan_out=*/true, 1.0);
    const auto bytes = out.read_bytes(key);
    ASSERT_EQ(out.info(key).dtype, Dtype::F16);
    for (std::size_t i = 0; i < expected.size(); ++i) {
      ASSERT_EQ(bytes[2 * i] | (bytes[2 * i + 1] << 8), lora::io::double_to_half(expected[i])) << key << " " << i;
      changed += lora::io::double_to_half(expected[i]) != lora::io::double_to_half(W[i]);
      ++checked;
    }
  }
  EXPECT_GT(changed, checked / 2) << "the adapter must visibly move the weights";
}

TEST(LoraToolMerge, ErrorsGoToStderrWithANonZeroStatus) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  std::map<std::string, AdapterModule> modules;
  modules.emplace("layers.0.q", module_of(2, 4, 3, 2.0, 1));
  save_adapter(tmp / "adapter", std::move(modules), false);
  SafetensorsWriter base;
  base.add("layers.0.k.weight", {3, 4}, arbitrary(12, 2).data());
  base.add("layers.0.q.weight", {4, 3}, arbitrary(12, 3).data());  // transposed: a Conv1D-like base
  base.write(tmp / "model.safetensors");
  SafetensorsWriter other_base;
  other_base.add("layers.0.k.weight", {3, 4}, arbitrary(12, 2).data());
  other_base.write(tmp / "other.safetensors");

  const std::string adapter = " --adapter '" + tmp / "adapter" + "'", out = " --out '" + tmp / "m.safetensors" + "'";
  ToolResult r = run_tool(tmp, "merge --base '" + tmp / "model.safetensors" + "'" + adapter + out);
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "[4, 3]");
  EXPECT_CONTAINS(r.err, "fan_in_fan_out");
  EXPECT_TRUE(r.out.empty());
  EXPECT_FALSE(std::filesystem::exists(tmp / "m.safetensors"));

  r = run_tool(tmp, "merge --base '" + tmp / "other.safetensors" + "'" + adapter + out);
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "layers.0.q.weight");

  r = run_tool(tmp, "merge --base '" + tmp / "model.safetensors" + "'" + adapter);
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "missing --out");
  EXPECT_CONTAINS(r.err, "usage:");

  r = run_tool(tmp, "merge --base '" + tmp / "absent.safetensors" + "'" + adapter + out);
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "absent.safetensors");

  io_test::write_file(tmp / "broken.safetensors", std::string("\x08\0\0\0\0\0\0\0{\"a\":}  ", 16));
  r = run_tool(tmp, "merge --base '" + tmp / "broken.safetensors" + "'" + adapter + out);
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "header JSON");

  std::filesystem::create_directories(tmp / "sharded");
  io_test::write_file(tmp / "sharded/model.safetensors.index.json",
                      std::string(R"({"weight_map": {"layers.0.q.weight": "../model.safetensors"}})"));
  r = run_tool(tmp, "merge --base '" + tmp / "sharded" + "'" + adapter + out);
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "not a file name");

  r = run_tool(tmp, "frobnicate");
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "unknown command");
}

// ---- extract ----------------------------------------------------------------------------------

TEST(LoraToolExtract, RecoversAnExactlyRankRDifference) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  constexpr int kRank = 3;
  // Two weights changed by a rank-3 update (one nn.Linear-like, one more), one untouched, one bias changed.
  struct Weight {
    std::string name;
    std::int64_t rows, cols;
  };
  const std::vector<Weight> weights = {{"layers.0.q.weight", 12, 9}, {"layers.0.v.weight", 8, 8}, {"layers.0.k.weight", 6, 9}};
  SafetensorsWriter base, tuned;
  std::map<std::string, std::vector<double>> delta;  // tuned - base, as stored (after float rounding)
  std::uint64_t seed = 1;
  for (const Weight& w : weights) {
    const std::vector<double> W = arbitrary(static_cast<std::size_t>(w.rows * w.cols), seed++);
    const std::vector<float> Wf = as_floats(W);
    std::vector<float> T = Wf;
    if (w.name != "layers.0.k.weight") {
      const std::vector<double> U = arbitrary(static_cast<std::size_t>(w.rows * kRank), seed++),
                                V = arbitrary(static_cast<std::size_t>(kRank * w.cols), seed++);
      for (std::int64_t i = 0; i < w.rows; ++i)
        for (std::int64_t j = 0; j < w.cols; ++j) {
          double d = 0;
          for (int k = 0; k < kRank; ++k) d += U[static_cast<std::size_t>(i * kRank + k)] * V[static_cast<std::size_t>(k * w.cols + j)];
          T[static_cast<std::size_t>(i * w.cols + j)] = static_cast<float>(Wf[static_cast<std::size_t>(i * w.cols + j)] + 0.5 * d);
        }
      std::vector<double> D(T.size());
      for (std::size_t i = 0; i < T.size(); ++i) D[i] = static_cast<double>(T[i]) - static_cast<double>(Wf[i]);
      delta[w.name] = D;
    }
    base.add(w.name, {w.rows, w.cols}, Wf.data());
    tuned.add(w.name, {w.rows, w.cols}, T.data());
  }
  const float bias_base[3] = {1, 2, 3}, bias_tuned[3] = {1, 2.5f, 3};
  base.add("layers.0.q.bias", {3}, bias_base);
  tuned.add("layers.0.q.bias", {3}, bias_tuned);
  base.write(tmp / "base.safetensors");
  tuned.write(tmp / "tuned.safetensors");

  const ToolResult r = run_tool(tmp, "extract --base '" + tmp / "base.safetensors" + "' --tuned '" + tmp / "tuned.safetensors" +
                                         "' --rank 3 --out '" + tmp / "extracted" + "' --base-name tiny");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.err, "layers.0.q.bias\" changed but is not a 2-D weight");
  const Adapter a = lora::io::load_peft(tmp / "extracted");
  ASSERT_EQ(a.modules.size(), 2u) << "the untouched weight gives no module";
  EXPECT_EQ(a.config.target_modules, (std::vector<std::string>{"q", "v"}));
  EXPECT_EQ(a.config.base_model_name_or_path.value_or(""), "tiny");
  for (const auto& [name, D] : delta) {
    const AdapterModule& m = a.modules.at(name.substr(0, name.size() - 7));
    EXPECT_EQ(m.r, kRank);
    EXPECT_EQ(m.alpha, kRank);
    EXPECT_EQ(m.scale, 1.0);
    double worst = 0, largest = 0;
    for (std::int64_t i = 0; i < m.d_out(); ++i)
      for (std::int64_t j = 0; j < m.d_in(); ++j) {
        double ba = 0;
        for (int k = 0; k < m.r; ++k) ba += static_cast<double>(m.B(i, k)) * static_cast<double>(m.A(k, j));
        worst = std::max(worst, std::fabs(ba - D[static_cast<std::size_t>(i * m.d_in() + j)]));
        largest = std::max(largest, std::fabs(D[static_cast<std::size_t>(i * m.d_in() + j)]));
      }
    EXPECT_LE(worst, 1e-5 * largest) << name << ": max |B A - D| = " << worst << ", max |D| = " << largest;
  }

  // Merging what was extracted into the base gives back the tuned weights.
  const ToolResult m = run_tool(tmp, "merge --base '" + tmp / "base.safetensors" + "' --adapter '" + tmp / "extracted" +
                                         "' --out '" + tmp / "remerged.safetensors" + "'");
  ASSERT_EQ(m.status, 0) << m.err;
  const SafetensorsReader remerged = SafetensorsReader::open(tmp / "remerged.safetensors");
  const SafetensorsReader tuned_file = SafetensorsReader::open(tmp / "tuned.safetensors");
  const std::vector<float> got = remerged.read<float>("layers.0.q.weight"), want = tuned_file.read<float>("layers.0.q.weight");
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5) << i;
}

TEST(LoraToolExtract, FanInFanOutAndRankLimits) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  // A Conv1D weight (d_in 7 x d_out 5) changed by a rank-1 update.
  const std::vector<float> W = as_floats(arbitrary(35, 5));
  std::vector<float> T = W;
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < 5; ++j) T[static_cast<std::size_t>(i * 5 + j)] += 0.1f * static_cast<float>((i + 1) * (j - 2));
  SafetensorsWriter base, tuned;
  base.add("h.0.attn.c_attn.weight", {7, 5}, W.data());
  tuned.add("h.0.attn.c_attn.weight", {7, 5}, T.data());
  base.write(tmp / "base.safetensors");
  tuned.write(tmp / "tuned.safetensors");
  const std::string files = " --base '" + tmp / "base.safetensors" + "' --tuned '" + tmp / "tuned.safetensors" + "'";
  ToolResult r = run_tool(tmp, "extract" + files + " --rank 1 --fan-in-fan-out --prefix transformer. --out '" + tmp / "a" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  const Adapter a = lora::io::load_peft(tmp / "a");
  ASSERT_TRUE(a.modules.count("transformer.h.0.attn.c_attn"));
  EXPECT_TRUE(a.config.fan_in_fan_out);
  EXPECT_EQ(a.modules.at("transformer.h.0.attn.c_attn").d_in(), 7);
  EXPECT_EQ(a.modules.at("transformer.h.0.attn.c_attn").d_out(), 5);

  r = run_tool(tmp, "extract" + files + " --rank 6 --out '" + tmp / "b" + "'");
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "exceeds min(d_out, d_in) = 5");
  r = run_tool(tmp, "extract" + files + " --rank 0 --out '" + tmp / "b" + "'");
  EXPECT_EQ(r.status, 2);
  r = run_tool(tmp, "extract" + files + " --rank 1 --target-modules nothing --out '" + tmp / "b" + "'");
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "no targeted 2-D weight differs");
}

// rows x cols with orthonormal columns: arbitrary columns, modified Gram-Schmidt twice.
std::vector<double> orthonormal_columns(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::vector<double> q = arbitrary(static_cast<std::size_t>(rows * cols), seed);
  auto at = [&](std::int64_t i, std::int64_t j) -> double& { return q[static_cast<std::size_t>(i * cols + j)]; };
  for (int pass = 0; pass < 2; ++pass)
    for (std::int64_t j = 0; j < cols; ++j) {
      for (std::int64_t k = 0; k < j; ++k) {
        double dot = 0;
        for (std::int64_t i = 0; i < rows; ++i) dot += at(i, k) * at(i, j);
        for (std::int64_t i = 0; i < rows; ++i) at(i, j) -= dot * at(i, k);
      }
      double norm = 0;
      for (std::int64_t i = 0; i < rows; ++i) norm += at(i, j) * at(i, j);
      for (std::int64_t i = 0; i < rows; ++i) at(i, j) /= std::sqrt(norm);
    }
  return q;
}

// U diag(S) Vᵀ, rows x cols, from orthonormal factors made here: its singular values are S.
std::vector<double> planted(std::int64_t rows, std::int64_t cols, const std::vector<double>& S, std::uint64_t seed) {
  const auto k = static_cast<std::int64_t>(S.size());
  const std::vector<double> U = orthonormal_columns(rows, k, seed), V = orthonormal_columns(cols, k, seed + 1);
  std::vector<double> D(static_cast<std::size_t>(rows * cols));
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j)
      for (std::int64_t c = 0; c < k; ++c)
        D[static_cast<std::size_t>(i * cols + j)] +=
            U[static_cast<std::size_t>(i * k + c)] * S[static_cast<std::size_t>(c)] * V[static_cast<std::size_t>(j * k + c)];
  return D;
}

// base.safetensors and tuned.safetensors (F32): tuned = base + the given delta, per weight.
void write_base_and_tuned(const TempDir& tmp, const std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<double>>>& deltas) {
  SafetensorsWriter base, tuned;
  std::uint64_t seed = 70;
  for (const auto& [name, shape_delta] : deltas) {
    const auto& [shape, delta] = shape_delta;
    const std::vector<double> W = arbitrary(delta.size(), seed++);
    std::vector<double> T(delta.size());
    for (std::size_t i = 0; i < delta.size(); ++i) T[i] = W[i] + delta[i];
    base.add(name, shape, as_floats(W).data());
    tuned.add(name, shape, as_floats(T).data());
  }
  base.write(tmp / "base.safetensors");
  tuned.write(tmp / "tuned.safetensors");
}

// PEFT's split (B = U_r S_r, A = V_rᵀ): A's rows orthonormal, B's columns orthogonal with
// norms S descending; and merging the adapter onto the base gives the tuned model back, on
// both SVD paths (randomized at torch.svd_lowrank's settings: r columns, 2 power iterations,
// exact here because the delta's range has dimension r), GPT-2's Conv1D layout included.
TEST(LoraToolExtract, RecoversAPlantedDeltaWithPeftsSplitOnBothPaths) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  const std::vector<double> S = {2.0, 1.0, 0.5};
  write_base_and_tuned(tmp, {{"model.layers.0.q_proj.weight", {{40, 24}, planted(40, 24, S, 1)}},
                             {"model.layers.0.o_proj.weight", {{24, 24}, planted(24, 24, S, 3)}}});
  for (const char* svd : {"exact", "randomized --oversample 0 --niter 2"}) {
    SCOPED_TRACE(svd);
    const ToolResult r = run_tool(tmp, "extract --base '" + tmp / "base.safetensors" + "' --tuned '" +
                                           tmp / "tuned.safetensors" + "' --rank 3 --svd " + svd + " --out '" +
                                           tmp / "x" + "'");
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_CONTAINS(r.out, "model.layers.0.q_proj: [40, 24] -> r 3, energy kept 1.000000");
    const Adapter a = lora::io::load_peft(tmp / "x");
    ASSERT_EQ(a.modules.size(), 2u);
    EXPECT_EQ(a.config.r, 3);
    EXPECT_EQ(a.config.lora_alpha, 3.0);
    EXPECT_TRUE(a.config.rank_pattern.empty());
    const AdapterModule& m = a.modules.at("model.layers.0.q_proj");
    for (int k = 0; k < 3; ++k) {
      for (int l = 0; l < 3; ++l) {
        double aa = 0, bb = 0;
        for (std::int64_t j = 0; j < m.d_in(); ++j) aa += static_cast<double>(m.A(k, j)) * m.A(l, j);
        for (std::int64_t i = 0; i < m.d_out(); ++i) bb += static_cast<double>(m.B(i, k)) * m.B(i, l);
        EXPECT_NEAR(aa, k == l ? 1.0 : 0.0, 1e-5) << "A A^T (" << k << ", " << l << ")";
        EXPECT_NEAR(bb, k == l ? S[static_cast<std::size_t>(k)] * S[static_cast<std::size_t>(k)] : 0.0, 1e-5)
            << "B^T B (" << k << ", " << l << ")";
      }
    }
    const ToolResult merged = run_tool(tmp, "merge --base '" + tmp / "base.safetensors" + "' --adapter '" + tmp / "x" +
                                                "' --out '" + tmp / "merged.safetensors" + "'");
    ASSERT_EQ(merged.status, 0) << merged.err;
    const SafetensorsReader got_file = SafetensorsReader::open(tmp / "merged.safetensors");
    const SafetensorsReader want_file = SafetensorsReader::open(tmp / "tuned.safetensors");
    for (const char* name : {"model.layers.0.q_proj.weight", "model.layers.0.o_proj.weight"}) {
      const std::vector<float> got = got_file.read<float>(name), want = want_file.read<float>(name);
      float worst = 0, largest = 0;
      for (std::size_t i = 0; i < got.size(); ++i) {
        worst = std::max(worst, std::fabs(got[i] - want[i]));
        largest = std::max(largest, std::fabs(want[i]));
      }
      EXPECT_LE(worst, 1e-5f * largest) << name;
    }
  }

  // A Conv1D weight stores Dᵀ (d_in x d_out): the adapter is of D, and merges back the same way.
  TempDir conv;
  write_base_and_tuned(conv, {{"h.0.attn.c_attn.weight", {{24, 40}, planted(24, 40, S, 5)}}});
  const ToolResult r = run_tool(conv, "extract --base '" + conv / "base.safetensors" + "' --tuned '" +
                                          conv / "tuned.safetensors" + "' --rank 3 --fan-in-fan-out --out '" + conv / "x" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  const Adapter extracted = lora::io::load_peft(conv / "x");
  const AdapterModule& m = extracted.modules.at("h.0.attn.c_attn");
  EXPECT_EQ(m.d_in(), 24);
  EXPECT_EQ(m.d_out(), 40);
  const ToolResult merged = run_tool(conv, "merge --base '" + conv / "base.safetensors" + "' --adapter '" + conv / "x" +
                                               "' --out '" + conv / "merged.safetensors" + "'");
  ASSERT_EQ(merged.status, 0) << merged.err;
  const std::vector<float> got = SafetensorsReader::open(conv / "merged.safetensors").read<float>("h.0.attn.c_attn.weight");
  const std::vector<float> want = SafetensorsReader::open(conv / "tuned.safetensors").read<float>("h.0.attn.c_attn.weight");
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-5f) << i;
}

// --rank 0.9 on deltas of known singular values (hand-derived ranks):
//   q: 4, 2, 1, 0.5    energies 16, 4, 1, 0.25 of 21.25: shares 0.753, 0.941 -> r 2
//   v: 1, 1, 1, 1      shares 0.25, 0.5, 0.75, 1                           -> r 4
//   k: 5               share 1                                              -> r 1
// r = lora_alpha = 4 (the largest); q and k in rank_pattern and alpha_pattern by full name.
TEST(LoraToolExtract, AnEnergyThresholdPicksEachModulesRank) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  write_base_and_tuned(tmp, {{"layers.0.q.weight", {{30, 20}, planted(30, 20, {4.0, 2.0, 1.0, 0.5}, 11)}},
                             {"layers.0.v.weight", {{20, 30}, planted(20, 30, {1.0, 1.0, 1.0, 1.0}, 13)}},
                             {"layers.0.k.weight", {{16, 16}, planted(16, 16, {5.0}, 15)}}});
  const ToolResult r = run_tool(tmp, "extract --base '" + tmp / "base.safetensors" + "' --tuned '" +
                                         tmp / "tuned.safetensors" + "' --rank 0.9 --out '" + tmp / "x" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "layers.0.q: [30, 20] -> r 2, energy kept 0.941176");  // 20 / 21.25
  EXPECT_CONTAINS(r.out, "layers.0.v: [20, 30] -> r 4, energy kept 1.000000");
  EXPECT_CONTAINS(r.out, "layers.0.k: [16, 16] -> r 1, energy kept 1.000000");
  const auto config = nlohmann::json::parse(io_test::read_file(tmp / "x/adapter_config.json"));
  EXPECT_EQ(config.at("r"), 4);
  EXPECT_EQ(config.at("lora_alpha"), 4);
  EXPECT_EQ(config.at("rank_pattern"), nlohmann::json::parse(R"({"layers\\.0\\.k": 1, "layers\\.0\\.q": 2})"));
  EXPECT_EQ(config.at("alpha_pattern"), nlohmann::json::parse(R"({"layers\\.0\\.k": 1, "layers\\.0\\.q": 2})"));
  const Adapter a = lora::io::load_peft(tmp / "x");
  EXPECT_EQ(a.modules.at("layers.0.q").r, 2);
  EXPECT_EQ(a.modules.at("layers.0.q").scale, 1.0);
  EXPECT_EQ(a.modules.at("layers.0.v").r, 4);
  EXPECT_EQ(a.modules.at("layers.0.k").r, 1);
  EXPECT_EQ(a.modules.at("layers.0.k").scale, 1.0);
}

// all-linear leaves embeddings and lm_head out (and says so); naming them takes them; bad options refused.
TEST(LoraToolExtract, TargetsAndBadArguments) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  write_base_and_tuned(tmp, {{"model.embed_tokens.weight", {{12, 8}, planted(12, 8, {1.0}, 21)}},
                             {"lm_head.weight", {{12, 8}, planted(12, 8, {1.0}, 23)}},
                             {"model.layers.0.mlp.up_proj.weight", {{12, 8}, planted(12, 8, {1.0}, 25)}}});
  const std::string files = " --base '" + tmp / "base.safetensors" + "' --tuned '" + tmp / "tuned.safetensors" + "'";
  ToolResult r = run_tool(tmp, "extract" + files + " --rank 1 --out '" + tmp / "a" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.err, "\"lm_head.weight\" changed but is not targeted (all-linear leaves out embeddings and lm_head");
  EXPECT_CONTAINS(r.err, "\"model.embed_tokens.weight\" changed but is not targeted");
  Adapter a = lora::io::load_peft(tmp / "a");
  ASSERT_EQ(a.modules.size(), 1u);
  EXPECT_TRUE(a.modules.count("model.layers.0.mlp.up_proj"));
  EXPECT_EQ(a.config.target_modules, std::vector<std::string>{"up_proj"});
  r = run_tool(tmp, "extract" + files + " --rank 1 --target-modules lm_head,up_proj --out '" + tmp / "b" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  a = lora::io::load_peft(tmp / "b");
  EXPECT_EQ(a.modules.size(), 2u);
  EXPECT_EQ(a.config.target_modules, (std::vector<std::string>{"lm_head", "up_proj"}));

  for (const char* bad : {"--rank 1.5", "--rank -0.5", "--rank 0", "--rank 1 --svd fast", "--rank 1 --niter -1",
                          "--rank 1 --oversample x", "--rank 1 --targets up_proj"}) {
    r = run_tool(tmp, "extract" + files + " " + bad + " --out '" + tmp / "c" + "'");
    EXPECT_EQ(r.status, 2) << bad;
  }
  r = run_tool(tmp, "extract" + files + " --rank 1.5 --out '" + tmp / "c" + "'");
  EXPECT_CONTAINS(r.err, "expected an integer >= 1 (the rank) or a number in (0, 1)");
  r = run_tool(tmp, "extract" + files + " --rank 9 --out '" + tmp / "c" + "'");
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "--rank 9 exceeds min(d_out, d_in) = 8");
}

// ---- quantize, and merge onto an NF4 base ---------------------------------------------------------

// module_of's A and B with a DoRA magnitude m in [0.5, 1.5).
AdapterModule dora_module_of(int r, std::int64_t d_in, std::int64_t d_out, double alpha, std::uint64_t seed) {
  AdapterModule m = module_of(r, d_in, d_out, alpha, seed);
  m.magnitude = lora::cpu::Matrix<float>(1, d_out);
  const std::vector<double> v = arbitrary(static_cast<std::size_t>(d_out), seed + 2);
  for (std::int64_t o = 0; o < d_out; ++o) m.magnitude(0, o) = static_cast<float>(1.0 + 0.5 * v[static_cast<std::size_t>(o)]);
  return m;
}

// A llama-like base: two linear weights (BF16 and F32; 350 and 280 values: partial blocks), an
// embedding, an output head, a norm; config.json beside it.
void write_llama_like_base(const TempDir& tmp) {
  std::filesystem::create_directories(tmp / "base");
  SafetensorsWriter base;
  base.add("model.layers.0.q_proj.weight", {5, 70}, arbitrary(350, 61).data(), Dtype::BF16);
  base.add("model.layers.0.v_proj.weight", {4, 70}, arbitrary(280, 62).data(), Dtype::F32);
  base.add("model.embed_tokens.weight", {10, 70}, arbitrary(700, 63).data(), Dtype::F32);
  base.add("lm_head.weight", {10, 70}, arbitrary(700, 64).data(), Dtype::F32);
  base.add("model.norm.weight", {70}, arbitrary(70, 65).data(), Dtype::F32);
  base.write(tmp / "base/model.safetensors");
  io_test::write_file(tmp / "base/config.json", std::string(R"({"model_type": "llama", "hidden_size": 70})"));
}

TEST(LoraToolQuantize, WritesTheLinearWeightsAsBitsandbytesNf4AndCopiesTheRest) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  write_llama_like_base(tmp);
  const ToolResult r = run_tool(tmp, "quantize --base '" + tmp / "base" + "' --out '" + tmp / "q" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "quantized 2 weights to NF4");
  const SafetensorsReader in = SafetensorsReader::open(tmp / "base/model.safetensors");
  const SafetensorsReader q = SafetensorsReader::open(tmp / "q/model.safetensors");
  EXPECT_EQ(lora::io::nf4_weight_names(q),
            (std::vector<std::string>{"model.layers.0.q_proj.weight", "model.layers.0.v_proj.weight"}));
  for (const std::string name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"})
    EXPECT_EQ(q.read_raw(name).bytes, in.read_raw(name).bytes) << name;
  // The tool's NF4 weights are the library's quantization of the stored values, with the stored dtype recorded.
  for (const std::string name : {"model.layers.0.q_proj.weight", "model.layers.0.v_proj.weight"}) {
    const lora::nf4::Weight got = lora::io::load_nf4_weight(q, name);
    const std::vector<float> values = in.read<float>(name);
    lora::nf4::Options options;
    options.dtype = in.info(name).dtype == Dtype::BF16 ? "bfloat16" : "float32";
    const lora::nf4::Weight want = lora::nf4::quantize(values.data(), got.rows, got.cols, got.cols, options);
    EXPECT_TRUE(got.nested()) << name;
    EXPECT_EQ(got.dtype, options.dtype) << name;
    EXPECT_EQ(got.packed, want.packed) << name;
    EXPECT_EQ(got.absmax_q, want.absmax_q) << name;
    EXPECT_EQ(got.nested_absmax, want.nested_absmax) << name;
  }
  const auto config = nlohmann::ordered_json::parse(io_test::read_file(tmp / "q/config.json"));
  EXPECT_EQ(config["model_type"], "llama");
  const auto parsed = lora::io::parse_quantization_config(config, "config.json");
  ASSERT_TRUE(parsed.has_value());
  EXPECT_TRUE(parsed->double_quant);
  EXPECT_EQ(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");

  // --modules with PEFT target names, and --no-double-quant.
  const ToolResult one = run_tool(tmp, "quantize --base '" + tmp / "base/model.safetensors" + "' --out '" + tmp / "q1" +
                                           "' --modules q_proj --no-double-quant");
  ASSERT_EQ(one.status, 0) << one.err;
  const SafetensorsReader q1 = SafetensorsReader::open(tmp / "q1/model.safetensors");
  EXPECT_EQ(lora::io::nf4_weight_names(q1), std::vector<std::string>{"model.layers.0.q_proj.weight"});
  EXPECT_EQ(q1.info("model.layers.0.q_proj.weight.absmax").dtype, Dtype::F32);
  EXPECT_EQ(q1.read_raw("model.layers.0.v_proj.weight").bytes, in.read_raw("model.layers.0.v_proj.weight").bytes);
  // A regex (full match).
  const ToolResult re = run_tool(tmp, "quantize --base '" + tmp / "base" + "' --out '" + tmp / "q2" + "' --modules '.*v_pr[o]j'");
  ASSERT_EQ(re.status, 0) << re.err;
  EXPECT_EQ(lora::io::nf4_weight_names(SafetensorsReader::open(tmp / "q2/model.safetensors")),
            std::vector<std::string>{"model.layers.0.v_proj.weight"});
  const ToolResult none = run_tool(tmp, "quantize --base '" + tmp / "base" + "' --out '" + tmp / "q3" + "' --modules k_proj");
  EXPECT_EQ(none.status, 1);
  EXPECT_CONTAINS(none.err, "selected by --modules");
  const ToolResult again = run_tool(tmp, "quantize --base '" + tmp / "q" + "' --out '" + tmp / "q4" + "'");
  EXPECT_EQ(again.status, 1);
  EXPECT_CONTAINS(again.err, "already holds NF4 weights");
}

TEST(LoraToolQuantize, MergeOntoTheNf4BaseIsDequantPlusDeltaDenseInTheDtypeAsked) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  write_llama_like_base(tmp);
  ASSERT_EQ(run_tool(tmp, "quantize --base '" + tmp / "base" + "' --out '" + tmp / "q" + "'").status, 0);
  const AdapterModule mq = module_of(2, 70, 5, 4.0, 71), mv = module_of(2, 70, 4, 4.0, 73);
  std::map<std::string, AdapterModule> modules;
  modules.emplace("model.layers.0.q_proj", module_of(2, 70, 5, 4.0, 71));
  modules.emplace("model.layers.0.v_proj", module_of(2, 70, 4, 4.0, 73));
  save_adapter(tmp / "adapter", std::move(modules), false);
  const SafetensorsReader q = SafetensorsReader::open(tmp / "q/model.safetensors");
  // The expected weights from the library's lower-level pieces: the NF4 weight as loaded,
  // dequantized (fp32 products, exact in double), plus s B A by a naive loop in double.
  const auto expected = [&](const std::string& name, const AdapterModule& m) {
    const std::vector<double> W = lora::nf4::dequantize<double>(lora::io::load_nf4_weight(q, name));
    return naive_merge(W, m, false, 1.0);
  };
  const std::vector<double> q_expected = expected("model.layers.0.q_proj.weight", mq);
  const std::vector<double> v_expected = expected("model.layers.0.v_proj.weight", mv);
  const std::vector<std::string> dense_names = {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.q_proj.weight",
                                                "model.layers.0.v_proj.weight", "model.norm.weight"};
  const auto names_of = [](const SafetensorsReader& r) {
    std::vector<std::string> out;
    for (const auto& t : r.tensors()) out.push_back(t.name);
    std::sort(out.begin(), out.end());
    return out;
  };

  // --dtype float32: every NF4 weight dense F32, correctly rounded from dequant(W) + s B A.
  ToolResult r = run_tool(tmp, "merge --base '" + tmp / "q" + "' --adapter '" + tmp / "adapter" + "' --out '" +
                                   tmp / "m32.safetensors" + "' --dtype float32");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "dequantized 2 NF4 weights into a dense model (F32)");
  EXPECT_CONTAINS(r.out, "nothing re-quantized");
  EXPECT_CONTAINS(r.out, "note: the base's config.json has a quantization_config");
  const SafetensorsReader m32 = SafetensorsReader::open(tmp / "m32.safetensors");
  EXPECT_EQ(names_of(m32), dense_names) << "the NF4 companions are dropped";
  for (const auto& t : m32.tensors()) EXPECT_NE(t.dtype, Dtype::U8) << t.name;
  EXPECT_EQ(m32.info("model.layers.0.q_proj.weight").shape, (std::vector<std::int64_t>{5, 70}));
  expect_correctly_rounded(m32.read<float>("model.layers.0.q_proj.weight"), q_expected, "q_proj");
  expect_correctly_rounded(m32.read<float>("model.layers.0.v_proj.weight"), v_expected, "v_proj");
  EXPECT_EQ(m32.read_raw("lm_head.weight").bytes, q.read_raw("lm_head.weight").bytes);

  // No --dtype: each weight in its quant state's dtype (q_proj bfloat16, v_proj float32), rounded once.
  r = run_tool(tmp, "merge --base '" + tmp / "q/model.safetensors" + "' --adapter '" + tmp / "adapter" + "' --out '" +
                        tmp / "m.safetensors" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  const SafetensorsReader m = SafetensorsReader::open(tmp / "m.safetensors");
  EXPECT_EQ(names_of(m), dense_names);
  ASSERT_EQ(m.info("model.layers.0.q_proj.weight").dtype, Dtype::BF16);
  const auto q_bytes = m.read_bytes("model.layers.0.q_proj.weight");
  for (std::size_t i = 0; i < q_expected.size(); ++i)
    ASSERT_EQ(q_bytes[2 * i] | (q_bytes[2 * i + 1] << 8), lora::io::double_to_bfloat16(q_expected[i])) << i;
  EXPECT_EQ(m.info("model.layers.0.v_proj.weight").dtype, Dtype::F32);

  // --dtype float16 on an untargeted NF4 weight: dequantized alone.
  std::map<std::string, AdapterModule> only_q;
  only_q.emplace("model.layers.0.q_proj", module_of(2, 70, 5, 4.0, 71));
  save_adapter(tmp / "adapter_q", std::move(only_q), false);
  r = run_tool(tmp, "merge --base '" + tmp / "q" + "' --adapter '" + tmp / "adapter_q" + "' --out '" +
                        tmp / "m16.safetensors" + "' --dtype float16");
  ASSERT_EQ(r.status, 0) << r.err;
  const SafetensorsReader m16 = SafetensorsReader::open(tmp / "m16.safetensors");
  const std::vector<double> v_plain = lora::nf4::dequantize<double>(lora::io::load_nf4_weight(q, "model.layers.0.v_proj.weight"));
  const auto v_bytes = m16.read_bytes("model.layers.0.v_proj.weight");
  ASSERT_EQ(m16.info("model.layers.0.v_proj.weight").dtype, Dtype::F16);
  for (std::size_t i = 0; i < v_plain.size(); ++i)
    ASSERT_EQ(v_bytes[2 * i] | (v_bytes[2 * i + 1] << 8), lora::io::double_to_half(v_plain[i])) << i;

  r = run_tool(tmp, "merge --base '" + tmp / "q" + "' --adapter '" + tmp / "adapter" + "' --out '" + tmp / "x.safetensors" +
                        "' --dtype float64");
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "--dtype \"float64\" is not float32, bfloat16 or float16");
}

TEST(LoraToolQuantize, InspectReportsNf4Weights) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  write_llama_like_base(tmp);
  ASSERT_EQ(run_tool(tmp, "quantize --base '" + tmp / "base" + "' --out '" + tmp / "q" + "'").status, 0);
  const ToolResult r = run_tool(tmp, "inspect '" + tmp / "q" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  // Bytes from the file's header: each weight's tensors, companions included.
  const SafetensorsReader q = SafetensorsReader::open(tmp / "q/model.safetensors");
  std::uint64_t q_bytes = 0, all_nf4 = 0;
  for (const auto& t : q.tensors()) {
    if (t.name.rfind("model.layers.0.q_proj.weight", 0) == 0) q_bytes += t.bytes();
    if (t.name.rfind("model.layers.0.", 0) == 0) all_nf4 += t.bytes();
  }
  EXPECT_CONTAINS(r.out, "quantization_config: bitsandbytes nf4, double quant yes, compute dtype float32");
  EXPECT_CONTAINS(r.out, "model.layers.0.q_proj.weight");
  EXPECT_CONTAINS(r.out, "[5, 70]         64     yes  bfloat16" + std::string(14 - std::to_string(q_bytes).size(), ' ') +
                             std::to_string(q_bytes));
  EXPECT_CONTAINS(r.out, "2 NF4 weights, 630 parameters, " + std::to_string(all_nf4) + " bytes");
  EXPECT_CONTAINS(r.out, "3 other tensors");

  const ToolResult dense = run_tool(tmp, "inspect '" + tmp / "base" + "'");
  ASSERT_EQ(dense.status, 0) << dense.err;
  EXPECT_CONTAINS(dense.out, "quantization_config: none");
  EXPECT_CONTAINS(dense.out, "0 NF4 weights");
}

// ---- DoRA ---------------------------------------------------------------------------------------

// A file of raw little-endian float64 values (what dora_reference.py writes).
std::vector<double> read_f64(const std::string& path) {
  const std::vector<std::uint8_t> bytes = io_test::read_file(path);
  std::vector<double> out(bytes.size() / 8);
  std::memcpy(out.data(), bytes.data(), out.size() * 8);
  return out;
}

TEST(LoraToolDora, MergeMatchesAnIndependentTorchReimplementationOfPeftsDora) {
  SKIP_WITHOUT_TOOL();
  if (std::system("/usr/bin/python3 -c 'import torch' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "/usr/bin/python3 with torch is absent (Debian: apt-get install python3-torch)";
  TempDir tmp;
  const std::string script = (std::filesystem::path(__FILE__).parent_path() / "dora_reference.py").string();
  ASSERT_EQ(std::system(("/usr/bin/python3 '" + script + "' '" + tmp.path().string() + "'").c_str()), 0);

  struct Case {
    std::string name;
    std::vector<std::string> modules;
    bool fan_in_fan_out;
    std::int64_t parameters;  // A, B and m of every module, from the script's sizes: r d_in + d_out r + d_out
  };
  const Case cases[] = {
      {"linear", {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}, false,
       (4 * 11 + 7 * 4 + 7) + (2 * 11 + 5 * 2 + 5)},
      {"conv1d", {"transformer.h.0.attn.c_attn"}, true, 3 * 9 + 13 * 3 + 13},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = tmp / c.name;
    const Adapter a = lora::io::load_peft(dir + "/adapter");
    EXPECT_TRUE(a.config.use_dora);
    EXPECT_EQ(a.config.fan_in_fan_out, c.fan_in_fan_out);
    ASSERT_EQ(a.modules.size(), c.modules.size());

    const ToolResult inspect = run_tool(tmp, "inspect '" + dir + "/adapter'");
    ASSERT_EQ(inspect.status, 0) << inspect.err;
    EXPECT_CONTAINS(inspect.out, "use_dora = true");
    EXPECT_CONTAINS(inspect.out, "m [d_out]");
    EXPECT_CONTAINS(inspect.out, std::to_string(c.modules.size()) + " DoRA modules");
    EXPECT_CONTAINS(inspect.out, std::to_string(c.parameters) + " trainable parameters");

    const ToolResult r = run_tool(tmp, "merge --base '" + dir + "/model.safetensors' --adapter '" + dir +
                                           "/adapter' --out '" + dir + "/merged.safetensors'");
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_CONTAINS(r.out, "merged " + std::to_string(c.modules.size()) + " DoRA modules");
    const SafetensorsReader base = SafetensorsReader::open(dir + "/model.safetensors");
    const SafetensorsReader merged = SafetensorsReader::open(dir + "/merged.safetensors");
    for (const std::string& module : c.modules) {
      SCOPED_TRACE(module);
      // 1. The merged weight is torch's W' = (m / ||W + s B A||_row) o (W + s B A), correctly rounded to F32.
      const std::vector<float> W = merged.read<float>(module + ".weight");
      expect_correctly_rounded(W, read_f64(dir + "/" + module + ".merged.f64"), "merged weight");
      EXPECT_EQ(merged.read_raw(module + ".bias").bytes, base.read_raw(module + ".bias").bytes);

      // 2. That weight in a plain linear layer gives PEFT's unmerged DoRA forward, y = x W^T + bias
      //    + (m / n - 1) o (x W^T) + (m / n) o s (x A^T) B^T, to within the rounding of W' to F32:
      //    |dy| <= sum_i |x_i| |W'_oi| 2^-24.
      const std::vector<std::int64_t> shape = merged.info(module + ".weight").shape;
      const std::int64_t d_out = c.fan_in_fan_out ? shape[1] : shape[0], d_in = c.fan_in_fan_out ? shape[0] : shape[1];
      const std::vector<double> x = read_f64(dir + "/" + module + ".x.f64"), y = read_f64(dir + "/" + module + ".y.f64");
      const std::vector<double> bias = merged.read<double>(module + ".bias");
      const std::int64_t N = static_cast<std::int64_t>(x.size()) / d_in;
      ASSERT_EQ(static_cast<std::int64_t>(y.size()), N * d_out);
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t o = 0; o < d_out; ++o) {
          double sum = bias[static_cast<std::size_t>(o)], bound = 0;
          for (std::int64_t i = 0; i < d_in; ++i) {
            const double w = W[static_cast<std::size_t>(c.fan_in_fan_out ? i * d_out + o : o * d_in + i)];
            sum += x[static_cast<std::size_t>(n * d_in + i)] * w;
            bound += std::fabs(x[static_cast<std::size_t>(n * d_in + i)] * w) * 0x1p-24;
          }
          ASSERT_LE(std::fabs(sum - y[static_cast<std::size_t>(n * d_out + o)]), bound + 1e-12) << "y[" << n << "][" << o << "]";
        }
    }
  }
}

TEST(LoraToolDora, MergeOntoAnNf4BaseIsDoraOfTheDequantizedWeight) {
  SKIP_WITHOUT_TOOL();
  TempDir tmp;
  write_llama_like_base(tmp);
  ASSERT_EQ(run_tool(tmp, "quantize --base '" + tmp / "base" + "' --out '" + tmp / "q" + "'").status, 0);
  std::map<std::string, AdapterModule> modules;
  modules.emplace("model.layers.0.q_proj", dora_module_of(2, 70, 5, 4.0, 81));
  modules.emplace("model.layers.0.v_proj", dora_module_of(2, 70, 4, 4.0, 83));
  save_adapter(tmp / "adapter", std::move(modules), false);
  const AdapterModule mq = dora_module_of(2, 70, 5, 4.0, 81), mv = dora_module_of(2, 70, 4, 4.0, 83);
  const SafetensorsReader q = SafetensorsReader::open(tmp / "q/model.safetensors");

  const ToolResult r = run_tool(tmp, "merge --base '" + tmp / "q" + "' --adapter '" + tmp / "adapter" + "' --out '" +
                                         tmp / "m.safetensors" + "' --dtype float32 --scale 0.5");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "merged 2 DoRA modules");
  EXPECT_CONTAINS(r.out, "W = (m / ||W + s B A||_row) o (W + s B A)");
  const SafetensorsReader m = SafetensorsReader::open(tmp / "m.safetensors");
  for (const auto& [name, module] : {std::pair<std::string, const AdapterModule*>{"model.layers.0.q_proj.weight", &mq},
                                     {"model.layers.0.v_proj.weight", &mv}}) {
    const std::vector<double> W = lora::nf4::dequantize<double>(lora::io::load_nf4_weight(q, name));
    expect_correctly_rounded(m.read<float>(name), naive_merge(W, *module, false, 0.5), name);
  }
}

// ---- export-gguf / import-gguf -----------------------------------------------------

TEST(LoraToolGguf, TheGpt2FixtureGoesToGgufAndBackUnchanged) {
  SKIP_WITHOUT_TOOL();
  const std::string fixtures = io_test::fixtures_dir();
  if (fixtures.empty()) GTEST_SKIP() << "LORA_FIXTURES_DIR is absent";
  TempDir tmp;
  const std::string gpt2 = fixtures + "/gpt2-c_attn-c_proj-r8";
  ToolResult r = run_tool(tmp, "export-gguf --adapter '" + gpt2 + "' --arch gpt2 --out '" + tmp / "a.gguf" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_CONTAINS(r.out, "transformer.h.0.attn.c_attn");
  EXPECT_CONTAINS(r.out, "blk.0.attn_qkv.weight");
  EXPECT_CONTAINS(r.out, "adapter.lora.alpha = ");
  EXPECT_EQ(r.out.find("folded"), std::string::npos) << r.out;  // scale = alpha / r everywhere
  r = run_tool(tmp, "import-gguf --adapter '" + tmp / "a.gguf" + "' --out '" + tmp / "back" + "'");
  ASSERT_EQ(r.status, 0) << r.err;
  const Adapter original = lora::io::load_peft(gpt2), back = lora::io::load_peft(tmp / "back");
  EXPECT_TRUE(back.config.fan_in_fan_out);
  ASSERT_EQ(back.modules.size(), original.modules.size());
  for (const auto& [name, m] : original.modules) {
    const AdapterModule& b = back.modules.at(name);
    EXPECT_EQ(b.scale, m.scale) << name;
    for (std::int64_t i = 0; i < m.A.size(); ++i) ASSERT_EQ(b.A.data()[i], m.A.data()[i]) << name;
    for (std::int64_t i = 0; i < m.B.size(); ++i) ASSERT_EQ(b.B.data()[i], m.B.data()[i]) << name;
  }
  r = run_tool(tmp, "export-gguf --adapter '" + gpt2 + "' --arch mamba --out '" + tmp / "b.gguf" + "'");
  EXPECT_EQ(r.status, 1);
  EXPECT_CONTAINS(r.err, "no table for architecture \"mamba\"");
  r = run_tool(tmp, "export-gguf --adapter '" + gpt2 + "' --out '" + tmp / "b.gguf" + "'");
  EXPECT_EQ(r.status, 2);
  EXPECT_CONTAINS(r.err, "missing --arch");
}

}  // namespace

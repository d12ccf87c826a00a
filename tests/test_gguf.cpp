// GGUF: the writer's bytes against a file laid out by hand from the format's
// description; every value type and tensor dtype round-trips bit for bit; every
// broken rule (and every truncation of a valid file) is a lora::Error naming the
// check. LoRA adapters as llama.cpp loads them: names, ggml shapes (read from
// the raw tensor infos), alpha, the scale folding of rsLoRA and rank/alpha
// patterns and the rotary row order of llama's q and k (checked as llama.cpp's
// alpha / r times the file's B A against s B A with the rows placed by the
// formula of convert_hf_to_gguf.py's permute), refusals by name, and the way
// back; the real GPT-2 PEFT fixture exported and re-read.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "cpu_test_util.hpp"
#include "io_test_util.hpp"
#include "lora/io/gguf_adapter.hpp"

namespace {

using io_test::expect_error;
using io_test::random_matrix;
using io_test::TempDir;
using lora::io::Adapter;
using lora::io::AdapterModule;
using lora::io::Dtype;
using lora::io::GgufReader;
using lora::io::GgufType;
using lora::io::GgufValue;
using lora::io::GgufWriter;

// Little-endian bytes appended by hand, as the format describes them.
struct Bytes {
  std::vector<std::uint8_t> v;
  Bytes& u32(std::uint32_t x) { return put(x, 4); }
  Bytes& u64(std::uint64_t x) { return put(x, 8); }
  Bytes& str(const std::string& s) {
    u64(s.size());
    v.insert(v.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& f32(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    return u32(u);
  }
  Bytes& zeros(std::size_t n) {
    v.insert(v.end(), n, 0);
    return *this;
  }
  Bytes& put(std::uint64_t x, int n) {
    for (int i = 0; i < n; ++i) v.push_back(static_cast<std::uint8_t>(x >> (8 * i)));
    return *this;
  }
};

TEST(Gguf, WriterLaysOutTheFileAsTheFormatDescribes) {
  GgufWriter w;
  w.set("general.architecture", GgufValue::string("llama"));
  w.set("adapter.lora.alpha", GgufValue::f32(16.0f));
  const std::vector<float> values = {1, 2, 3, 4, 5, 6};
  w.add("t.weight", lora::MatrixView<const float>{values.data(), 2, 3});

  Bytes b;
  b.v = {'G', 'G', 'U', 'F'};
  b.u32(3).u64(1).u64(2);
  b.str("general.architecture").u32(8).str("llama");
  b.str("adapter.lora.alpha").u32(6).f32(16.0f);
  b.str("t.weight").u32(2).u64(3).u64(2).u32(0).u64(0);  // ne innermost first: [3, 2]; F32; offset 0
  b.zeros((32 - b.v.size() % 32) % 32);
  for (float x : values) b.f32(x);
  b.zeros(32 - 24);  // the tensor padded to the alignment
  EXPECT_EQ(w.to_bytes(), b.v);

  const GgufReader r = GgufReader::from_memory(b.v);
  EXPECT_EQ(r.version(), 3u);
  EXPECT_EQ(r.get_string("general.architecture"), "llama");
  EXPECT_EQ(r.get("adapter.lora.alpha", GgufType::F32).real, 16.0);
  ASSERT_EQ(r.tensors().size(), 1u);
  EXPECT_EQ(r.info("t.weight").shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(r.read<float>("t.weight"), values);
}

TEST(Gguf, EveryValueTypeAndTensorDtypeRoundTripsBitForBit) {
  GgufWriter w;
  GgufValue u8;
  u8.type = GgufType::U8;
  u8.uint = 255;
  GgufValue i16;
  i16.type = GgufType::I16;
  i16.sint = -32768;
  GgufValue i64;
  i64.type = GgufType::I64;
  i64.sint = std::numeric_limits<std::int64_t>::min();
  w.set("a.u8", u8);
  w.set("a.i16", i16);
  w.set("a.u32", GgufValue::u32(0xFFFFFFFFu));
  w.set("a.i32", GgufValue::i32(-7));
  w.set("a.u64", GgufValue::u64(std::numeric_limits<std::uint64_t>::max()));
  w.set("a.i64", i64);
  w.set("a.f32", GgufValue::f32(-0.0f));
  w.set("a.f64", GgufValue::f64(std::numeric_limits<double>::quiet_NaN()));
  w.set("a.bool", GgufValue::boolean(true));
  w.set("a.string", GgufValue::string(std::string("with\0zero", 9)));
  w.set("a.strings", GgufValue::strings({"", "x", "\xC3\xA9"}));
  w.set("a.floats", GgufValue::array(GgufType::F32, {GgufValue::f32(1.5f), GgufValue::f32(-2.0f)}));
  w.set("a.empty", GgufValue::array(GgufType::I32, {}));
  w.set("general.alignment", GgufValue::u32(64));

  const lora::cpu::Matrix<double> m = random_matrix<double>(3, 5, 1);
  for (const Dtype d : {Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64})
    w.add(std::string("m.") + lora::io::dtype_name(d), m.view(), d);
  const std::vector<std::uint8_t> ints = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  w.add_raw("ints.4d", lora::io::RawTensor{Dtype::I16, {2, 2, 1, 2}, ints});
  w.add_raw("ints.1d", lora::io::RawTensor{Dtype::I32, {4}, ints});

  const std::vector<std::uint8_t> bytes = w.to_bytes();
  const GgufReader r = GgufReader::from_memory(bytes);
  ASSERT_EQ(r.metadata().size(), w.metadata().size());
  for (std::size_t i = 0; i < w.metadata().size(); ++i) {
    EXPECT_EQ(r.metadata()[i].first, w.metadata()[i].first);
    EXPECT_TRUE(r.metadata()[i].second == w.metadata()[i].second) << w.metadata()[i].first;
  }
  EXPECT_EQ(r.alignment(), 64u);
  EXPECT_EQ(r.data_offset() % 64, 0u);
  for (const auto& t : r.tensors()) EXPECT_EQ(t.offset % 64, 0u) << t.name;
  for (const Dtype d : {Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64}) {
    const std::string name = std::string("m.") + lora::io::dtype_name(d);
    lora::io::SafetensorsWriter s;  // the same rounding as the safetensors path: the stored bytes agree
    s.add(name, m.view(), d);
    const auto st = lora::io::SafetensorsReader::from_memory(s.to_bytes());
    EXPECT_EQ(r.read_raw(name).bytes, st.read_raw(name).bytes) << name;
    EXPECT_EQ(r.read<double>(name), st.read<double>(name)) << name;
  }
  EXPECT_EQ(r.read_raw("ints.4d").bytes, ints);
  EXPECT_EQ(r.info("ints.4d").shape, (std::vector<std::int64_t>{2, 2, 1, 2}));
  EXPECT_EQ(r.read_raw("ints.1d").bytes, ints);
  // Written again from what was read: the same bytes.
  GgufWriter again;
  for (const auto& [key, value] : r.metadata()) again.set(key, value);
  for (const auto& t : r.tensors()) again.add_raw(t.name, r.read_raw(t.name));
  EXPECT_EQ(again.to_bytes(), bytes);
}

// A small valid file, and the byte offsets of its parts, for the corruptions below.
struct Sample {
  std::vector<std::uint8_t> bytes;
  std::size_t kv_type_at = 0, bool_at = 0, n_dims_at = 0, type_at = 0, offset_at = 0;
};
Sample sample() {
  Bytes b;
  b.v = {'G', 'G', 'U', 'F'};
  b.u32(3).u64(1).u64(2);
  b.str("k.bool");
  Sample s;
  s.kv_type_at = b.v.size();
  b.u32(7);
  s.bool_at = b.v.size();
  b.v.push_back(1);
  b.str("k.arr").u32(9).u32(4).u64(2).u32(1).u32(2);
  b.str("t");
  s.n_dims_at = b.v.size();
  b.u32(1).u64(4);
  s.type_at = b.v.size();
  b.u32(0);
  s.offset_at = b.v.size();
  b.u64(0);
  b.zeros((32 - b.v.size() % 32) % 32);
  for (int i = 0; i < 4; ++i) b.f32(static_cast<float>(i));
  s.bytes = b.v;
  return s;
}

void expect_refused(std::vector<std::uint8_t> bytes, std::initializer_list<std::string> parts) {
  expect_error([&] { GgufReader::from_memory(std::move(bytes), "f.gguf"); }, parts);
}

TEST(Gguf, TheSampleIsValidAndEveryTruncationOfItIsRefused) {
  const Sample s = sample();
  const GgufReader r = GgufReader::from_memory(s.bytes);
  EXPECT_EQ(r.read<float>("t"), (std::vector<float>{0, 1, 2, 3}));
  EXPECT_EQ(r.find("k.bool")->uint, 1u);
  for (std::size_t n = 0; n < s.bytes.size(); ++n)
    expect_refused(std::vector<std::uint8_t>(s.bytes.begin(), s.bytes.begin() + static_cast<std::ptrdiff_t>(n)),
                   {"f.gguf: invalid GGUF file"});
}

TEST(Gguf, BrokenRulesAreRefusedByName) {
  const Sample s = sample();
  auto with = [&](std::size_t at, std::initializer_list<std::uint8_t> patch) {
    std::vector<std::uint8_t> b = s.bytes;
    std::size_t i = at;
    for (std::uint8_t x : patch) b.at(i++) = x;
    return b;
  };
  expect_refused(with(0, {'G', 'G', 'M', 'L'}), {"magic", "not a GGUF file"});
  expect_refused(with(4, {1}), {"version", "version 1"});
  expect_refused(with(8, {0, 0, 0, 0, 0, 0, 0, 1}), {"tensor count"});
  expect_refused(with(16, {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF}), {"metadata count"});
  expect_refused(with(s.kv_type_at, {13}), {"value type", "13"});
  expect_refused(with(s.bool_at, {2}), {"bool", "expected 0 or 1"});
  expect_refused(with(s.n_dims_at, {0}), {"dimensions", "0 dimensions"});
  expect_refused(with(s.n_dims_at, {5}), {"dimensions", "5 dimensions"});
  expect_refused(with(s.type_at, {2}), {"tensor type", "Q4_0", "quantized"});
  expect_refused(with(s.type_at, {99}), {"tensor type", "99 is unknown"});
  expect_refused(with(s.offset_at, {32}), {"tensor offset", "expected 0"});
  // Arrays of arrays, duplicate keys and tensors, long names, a bad alignment: written by hand.
  // kvs, then (unless tensor is null) two tensor infos of that name.
  auto file = [](const std::function<void(Bytes&)>& kvs, std::uint64_t n_kv, const char* tensor = nullptr) {
    Bytes b;
    b.v = {'G', 'G', 'U', 'F'};
    b.u32(3).u64(tensor ? 2 : 0).u64(n_kv);
    kvs(b);
    if (tensor) {
      b.str(tensor).u32(1).u64(1).u32(0).u64(0);
      b.str(tensor).u32(1).u64(1).u32(0).u64(32);
      b.zeros((32 - b.v.size() % 32) % 32 + 64);
    }
    return b.v;
  };
  expect_refused(file([](Bytes& b) { b.str("a").u32(9).u32(9).u64(0); }, 1), {"array of arrays"});
  expect_refused(file([](Bytes& b) { b.str("a").u32(4).u32(1).str("a").u32(4).u32(2); }, 2), {"duplicate key", "\"a\""});
  expect_refused(file([](Bytes& b) { b.str("general.alignment").u32(4).u32(48); }, 1), {"alignment", "power of two"});
  expect_refused(file([](Bytes&) {}, 0, "t"), {"duplicate tensor", "\"t\""});
  const std::string long_name(64, 'n');
  expect_refused(file([](Bytes&) {}, 0, long_name.c_str()), {"tensor name", "64 bytes"});
  expect_refused(file([](Bytes& b) { b.str("s").u32(8).u64(1u << 30); }, 1), {"truncated"});
  expect_refused(file([](Bytes& b) { b.str("a").u32(9).u32(4).u64(3).u32(1).u32(2).zeros(3); }, 1),
                 {"array length", "3 elements"});  // 3 u32 need 12 bytes, 11 are left
  expect_refused(file([](Bytes&) {}, 0, ""), {"tensor name", "empty"});
}

// ---- LoRA adapters ------------------------------------------------------------------

AdapterModule module(std::int64_t d_out, std::int64_t d_in, int r, double alpha, double scale, std::uint64_t seed) {
  AdapterModule m;
  m.A = random_matrix<float>(r, d_in, seed);
  m.B = random_matrix<float>(d_out, r, seed + 1);
  m.r = r;
  m.alpha = alpha;
  m.scale = scale;
  return m;
}

// A llama-named adapter of a base with 2 query heads and 1 key/value head of 6
// dimensions: r 4, alpha 8; v_proj at rank 2 (rank_pattern), o_proj at alpha 16 (alpha_pattern).
constexpr lora::io::GgufHeads kHeads{2, 1};
Adapter llama_adapter() {
  Adapter a;
  a.config.r = 4;
  a.config.lora_alpha = 8;
  a.config.target_modules = {"q_proj", "v_proj", "o_proj"};
  a.config.rank_pattern = {{"model\\.layers\\.1\\.self_attn\\.v_proj", 2}};
  a.config.alpha_pattern = {{"model\\.layers\\.0\\.self_attn\\.o_proj", 16.0}};
  a.modules.emplace("model.layers.0.self_attn.q_proj", module(12, 8, 4, 8, 2.0, 1));
  a.modules.emplace("model.layers.1.self_attn.v_proj", module(6, 8, 2, 8, 4.0, 3));
  a.modules.emplace("model.layers.0.self_attn.o_proj", module(8, 12, 4, 16, 4.0, 5));
  a.modules.emplace("model.layers.1.self_attn.k_proj", module(6, 8, 4, 8, 2.0, 7));
  return a;
}

// The file row of Hugging Face row o of a llama q (k) weight with heads of 6:
// numpy's w.reshape(n, 2, 3, d_in).swapaxes(1, 2) puts [h, j, i] at [h, i, j].
std::int64_t llama_row(const std::string& module, std::int64_t o) {
  if (module.find("q_proj") == std::string::npos && module.find("k_proj") == std::string::npos) return o;
  const std::int64_t h = o / 6, j = (o % 6) / 3, i = o % 3;
  return h * 6 + i * 2 + j;
}

// ne of a tensor as its info in the file says, found by its name (not through GgufReader).
std::vector<std::uint64_t> raw_ne(const std::vector<std::uint8_t>& file, const std::string& name) {
  Bytes key;
  key.str(name);
  const auto it = std::search(file.begin(), file.end(), key.v.begin(), key.v.end());
  EXPECT_NE(it, file.end()) << name;
  if (it == file.end()) return {};
  std::size_t at = static_cast<std::size_t>(it - file.begin()) + key.v.size();
  auto le = [&](int n) {
    std::uint64_t x = 0;
    for (int i = 0; i < n; ++i) x |= static_cast<std::uint64_t>(file.at(at + static_cast<std::size_t>(i))) << (8 * i);
    at += static_cast<std::size_t>(n);
    return x;
  };
  std::vector<std::uint64_t> ne(le(4));
  for (auto& d : ne) d = le(8);
  return ne;
}

TEST(GgufAdapter, ExportsAsLlamaCppReadsIt) {
  const Adapter a = llama_adapter();
  lora::io::GgufAdapterOptions options;
  options.architecture = "llama";
  options.heads = kHeads;
  lora::io::GgufAdapterReport report;
  const std::vector<std::uint8_t> bytes = lora::io::gguf_adapter(a, options, &report).to_bytes();
  const GgufReader r = GgufReader::from_memory(bytes);
  EXPECT_EQ(r.get_string("general.type"), "adapter");
  EXPECT_EQ(r.get_string("general.architecture"), "llama");
  EXPECT_EQ(r.get_string("adapter.type"), "lora");
  const double alpha = r.get("adapter.lora.alpha", GgufType::F32).real;
  EXPECT_EQ(alpha, 8.0);
  EXPECT_EQ(report.names.at("model.layers.1.self_attn.v_proj"), "blk.1.attn_v.weight");
  EXPECT_EQ(report.folded.size(), 1u);  // o_proj: alpha 16 on rank 4 is scale 4, llama.cpp gives 8 / 4
  EXPECT_EQ(report.folded.at("model.layers.0.self_attn.o_proj"), 2.0);
  for (const auto& [name, m] : a.modules) {
    const std::string g = report.names.at(name);
    // llama.cpp's checks, in ne: a.ne[0] = d_in of the base, b.ne[1] = d_out, a.ne[1] = b.ne[0] = r.
    const auto a_ne = raw_ne(bytes, g + ".lora_a"), b_ne = raw_ne(bytes, g + ".lora_b");
    EXPECT_EQ(a_ne, (std::vector<std::uint64_t>{static_cast<std::uint64_t>(m.d_in()), static_cast<std::uint64_t>(m.r)}));
    EXPECT_EQ(b_ne, (std::vector<std::uint64_t>{static_cast<std::uint64_t>(m.r), static_cast<std::uint64_t>(m.d_out())}));
    // llama.cpp's delta, alpha / r * B_file A_file, is this module's scale * B A.
    const std::vector<float> fa = r.read<float>(g + ".lora_a"), fb = r.read<float>(g + ".lora_b");
    for (std::int64_t o = 0; o < m.d_out(); ++o)
      for (std::int64_t i = 0; i < m.d_in(); ++i) {
        double want = 0, got = 0;
        for (int k = 0; k < m.r; ++k) {
          want += m.scale * static_cast<double>(m.B(o, k)) * static_cast<double>(m.A(k, i));
          got += alpha / m.r * static_cast<double>(fb[static_cast<std::size_t>(llama_row(name, o) * m.r + k)]) *
                 static_cast<double>(fa[static_cast<std::size_t>(k * m.d_in() + i)]);
        }
        EXPECT_NEAR(got, want, 1e-6 * (1 + std::abs(want))) << name;
      }
    EXPECT_EQ(r.read_raw(g + ".lora_a").bytes, io_test::bytes_of(m.A.view())) << name;  // A as is, always
    if (!report.folded.count(name) && llama_row(name, 1) == 1) {
      EXPECT_EQ(r.read_raw(g + ".lora_b").bytes, io_test::bytes_of(m.B.view())) << name;
    }
  }
}

TEST(GgufAdapter, RsloraFoldsEveryModuleAndF16HalvesTheFile) {
  Adapter a = llama_adapter();
  a.config.use_rslora = true;
  for (auto& [name, m] : a.modules) m.scale = m.alpha / std::sqrt(static_cast<double>(m.r));
  lora::io::GgufAdapterOptions options;
  options.architecture = "qwen2";
  lora::io::GgufAdapterReport report;
  lora::io::gguf_adapter(a, options, &report);
  EXPECT_EQ(report.folded.size(), 4u);
  EXPECT_DOUBLE_EQ(report.folded.at("model.layers.0.self_attn.q_proj"), 8.0 / 2.0 * 4 / 8);
  options.dtype = Dtype::F16;
  const GgufReader r = GgufReader::from_memory(lora::io::gguf_adapter(a, options).to_bytes());
  EXPECT_EQ(r.info("blk.0.attn_q.weight.lora_a").dtype, Dtype::F16);
}

TEST(GgufAdapter, RefusesWhatLlamaCppCannotApplyByName) {
  lora::io::GgufAdapterOptions options;
  options.architecture = "llama";
  expect_error([&] { lora::io::gguf_adapter(llama_adapter(), options); }, {"q_proj", "attention heads", "not given"});
  options.heads = {2, 0};
  expect_error([&] { lora::io::gguf_adapter(llama_adapter(), options); }, {"k_proj", "key/value heads"});
  options.heads = {4, 1};
  expect_error([&] { lora::io::gguf_adapter(llama_adapter(), options); }, {"q_proj", "12 rows", "4 heads"});
  options.heads = kHeads;
  Adapter dora = llama_adapter();
  dora.modules.begin()->second.magnitude = random_matrix<float>(1, dora.modules.begin()->second.d_out(), 9);
  expect_error([&] { lora::io::gguf_adapter(dora, options); }, {"DoRA", dora.modules.begin()->first});
  Adapter extra = llama_adapter();
  extra.other_tensors["base_model.model.score.weight"] = lora::io::RawTensor{Dtype::F32, {1}, {0, 0, 0, 0}};
  expect_error([&] { lora::io::gguf_adapter(extra, options); }, {"score.weight", "not a LoRA pair"});
  Adapter pissa = llama_adapter();
  pissa.config.init_lora_weights = std::string("pissa");
  expect_error([&] { lora::io::gguf_adapter(pissa, options); }, {"PiSSA", "converted_to_lora"});
  Adapter unnamed = llama_adapter();
  unnamed.modules.emplace("model.layers.0.self_attn.rotary", module(8, 8, 4, 8, 2.0, 7));
  expect_error([&] { lora::io::gguf_adapter(unnamed, options); }, {"self_attn.rotary", "no GGUF name", "llama"});
  options.architecture = "mamba";
  expect_error([&] { lora::io::gguf_adapter(llama_adapter(), options); }, {"mamba", "known:", "llama"});
}

TEST(GgufAdapter, ReadsBackTheModulesItWrote) {
  const Adapter a = llama_adapter();
  TempDir dir;
  lora::io::GgufAdapterOptions options;
  options.architecture = "llama";
  options.heads = kHeads;
  lora::io::save_gguf_adapter(a, dir / "a.gguf", options);
  expect_error([&] { lora::io::load_gguf_adapter(dir / "a.gguf"); }, {"attn_q.weight.lora_b", "attention heads"});
  const Adapter back = lora::io::load_gguf_adapter(dir / "a.gguf", kHeads);
  ASSERT_EQ(back.modules.size(), a.modules.size());
  EXPECT_EQ(back.config.r, 4);
  EXPECT_EQ(back.config.lora_alpha, 8.0);
  EXPECT_EQ(back.config.rank_pattern.size(), 1u);  // v_proj
  for (const auto& [name, m] : a.modules) {
    const AdapterModule& b = back.modules.at(name);
    EXPECT_EQ(b.r, m.r);
    EXPECT_EQ(b.scale, 8.0 / m.r);  // llama.cpp's scale; a folded module carries the rest in B
    EXPECT_EQ(io_test::bytes_of(b.A.view()), io_test::bytes_of(m.A.view())) << name;
    for (std::int64_t i = 0; i < m.B.rows(); ++i)
      for (std::int64_t k = 0; k < m.r; ++k)
        EXPECT_NEAR(b.scale * b.B(i, k), m.scale * m.B(i, k), 1e-6) << name;
    EXPECT_EQ(back.config.scale_for(name), b.scale) << name;  // the config says the same scale PEFT would use
  }
  expect_error([&] { lora::io::load_gguf_adapter(dir / "missing.gguf"); }, {"missing.gguf"});
  GgufWriter model;  // a model file, not an adapter
  model.set("general.architecture", GgufValue::string("llama"));
  model.set("general.type", GgufValue::string("model"));
  model.write(dir / "model.gguf");
  expect_error([&] { lora::io::load_gguf_adapter(dir / "model.gguf"); }, {"general.type", "\"model\"", "adapter"});
  GgufWriter stray = lora::io::gguf_adapter(a, options);  // a lora_a without its lora_b
  stray.add_raw("blk.9.attn_q.weight.lora_a", lora::io::RawTensor{Dtype::F32, {1, 1}, {0, 0, 0, 0}});
  expect_error([&] { lora::io::adapter_from_gguf(GgufReader::from_memory(stray.to_bytes()), kHeads); },
               {"blk.9.attn_q.weight.lora_a", "has no", "lora_b"});
}

TEST(GgufAdapter, TheRealGpt2FixtureExportsAndReadsBack) {
  const std::string fixtures = io_test::fixtures_dir();
  if (fixtures.empty()) {
    GTEST_SKIP() << "LORA_FIXTURES_DIR not set or missing";
  }
  const Adapter a = lora::io::load_peft(fixtures + "/gpt2-c_attn-c_proj-r8");
  TempDir dir;
  lora::io::GgufAdapterOptions options;
  options.architecture = "gpt2";
  const auto report = lora::io::save_gguf_adapter(a, dir / "gpt2.gguf", options);
  EXPECT_TRUE(report.folded.empty());
  EXPECT_EQ(report.names.at("transformer.h.0.attn.c_attn"), "blk.0.attn_qkv.weight");
  const Adapter back = lora::io::load_gguf_adapter(dir / "gpt2.gguf");
  EXPECT_TRUE(back.config.fan_in_fan_out);
  EXPECT_EQ(back.config.lora_alpha, a.config.lora_alpha);
  ASSERT_EQ(back.modules.size(), a.modules.size());
  for (const auto& [name, m] : a.modules) {
    const AdapterModule& b = back.modules.at(name);  // the fixture's names have the table's prefix
    EXPECT_EQ(b.scale, m.scale);
    EXPECT_EQ(io_test::bytes_of(b.A.view()), io_test::bytes_of(m.A.view())) << name;
    EXPECT_EQ(io_test::bytes_of(b.B.view()), io_test::bytes_of(m.B.view())) << name;
  }
}

}  // namespace

// NF4 weights in safetensors (io/nf4.hpp): the names, dtypes, shapes and JSON
// transformers + bitsandbytes write; a round trip bit for bit; a file written
// independently by tests/nf4_reference.py (torch, bitsandbytes' layout from its
// rules) loaded and dequantized to the script's own numbers; every kind of
// broken file refused with the tensor named; config.json's quantization_config.
#include <gtest/gtest.h>

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

namespace {

using io_test::expect_error;
using io_test::TempDir;
using lora::io::Dtype;
using lora::io::RawTensor;
using lora::io::SafetensorsReader;
using lora::io::SafetensorsWriter;

std::vector<float> gaussian_like(std::int64_t n, std::uint64_t seed) {
  std::vector<float> v(static_cast<std::size_t>(n));
  lora::MatrixView<float> view(v.data(), 1, n);
  io_test::fill_random(view, seed);
  for (float& x : v) x = x * x * x * 0.1f;  // heavier tails than uniform, like trained weights
  return v;
}

lora::nf4::Weight quantized(std::int64_t rows, std::int64_t cols, bool double_quant, const std::string& dtype,
                            std::uint64_t seed) {
  const std::vector<float> w = gaussian_like(rows * cols, seed);
  lora::nf4::Options options;
  options.double_quant = double_quant;
  options.dtype = dtype;
  return lora::nf4::quantize(w.data(), rows, cols, cols, options);
}

void expect_same_weight(const lora::nf4::Weight& got, const lora::nf4::Weight& want) {
  EXPECT_EQ(got.rows, want.rows);
  EXPECT_EQ(got.cols, want.cols);
  EXPECT_EQ(got.blocksize, want.blocksize);
  EXPECT_EQ(got.dtype, want.dtype);
  EXPECT_EQ(got.packed, want.packed);
  EXPECT_EQ(got.absmax_q, want.absmax_q);
  EXPECT_EQ(got.nested_blocksize, want.nested_blocksize);
  const auto bits = [](const std::vector<float>& v) {
    std::vector<std::uint32_t> out(v.size());
    if (!v.empty()) std::memcpy(out.data(), v.data(), v.size() * 4);
    return out;
  };
  EXPECT_EQ(bits(got.absmax), bits(want.absmax));
  EXPECT_EQ(bits(got.nested_absmax), bits(want.nested_absmax));
  EXPECT_EQ(bits(got.nested_code), bits(want.nested_code));
  EXPECT_EQ(bits({got.offset}), bits({want.offset}));
}

// ---- round trip and layout ------------------------------------------------------------------

TEST(Nf4Files, RoundTripIsBitForBitWithAndWithoutDoubleQuantOddSizes) {
  struct Case {
    std::int64_t rows, cols;
    bool double_quant;
    const char* dtype;
  };
  // 7 x 9 = 63 values (odd n, one partial block); 33 x 517 = 17061 values: 267 blocks, two nested blocks.
  for (const Case c : {Case{7, 9, false, "float32"}, Case{7, 9, true, "bfloat16"}, Case{33, 517, true, "float16"},
                       Case{33, 517, false, "float32"}}) {
    SCOPED_TRACE(std::to_string(c.rows) + " x " + std::to_string(c.cols) + (c.double_quant ? " double" : " single"));
    const lora::nf4::Weight w = quantized(c.rows, c.cols, c.double_quant, c.dtype, 11);
    SafetensorsWriter writer;
    lora::io::add_nf4_weight(writer, "model.q_proj.weight", w);
    const SafetensorsReader reader = SafetensorsReader::from_memory(writer.to_bytes());
    EXPECT_TRUE(lora::io::is_nf4_weight(reader, "model.q_proj.weight"));
    EXPECT_EQ(lora::io::nf4_weight_names(reader), std::vector<std::string>{"model.q_proj.weight"});
    expect_same_weight(lora::io::load_nf4_weight(reader, "model.q_proj.weight"), w);
    EXPECT_EQ(reader.tensors().size(), c.double_quant ? 6u : 4u);
  }
}

TEST(Nf4Files, TensorsHaveBitsandbytesNamesDtypesShapesAndJson) {
  const lora::nf4::Weight w = quantized(5, 27, true, "bfloat16", 3);  // 135 values: 3 blocks
  SafetensorsWriter writer;
  lora::io::add_nf4_weight(writer, "l.weight", w);
  const SafetensorsReader r = SafetensorsReader::from_memory(writer.to_bytes());
  const auto expect_info = [&](const std::string& name, Dtype dtype, std::vector<std::int64_t> shape) {
    ASSERT_TRUE(r.contains(name)) << name;
    EXPECT_EQ(r.info(name).dtype, dtype) << name;
    EXPECT_EQ(r.info(name).shape, shape) << name;
  };
  expect_info("l.weight", Dtype::U8, {68, 1});  // (135 + 1) / 2
  expect_info("l.weight.absmax", Dtype::U8, {3});
  expect_info("l.weight.quant_map", Dtype::F32, {16});
  expect_info("l.weight.nested_absmax", Dtype::F32, {1});
  expect_info("l.weight.nested_quant_map", Dtype::F32, {256});
  const auto text = r.read_bytes("l.weight.quant_state.bitsandbytes__nf4");
  const std::string json(text.begin(), text.end());
  // Python's json.dumps of as_dict's non-tensor items, in as_dict's order.
  const std::string prefix = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [5, 27], )"
                             R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": )";
  ASSERT_EQ(json.compare(0, prefix.size(), prefix), 0) << json;
  EXPECT_EQ(static_cast<float>(std::stod(json.substr(prefix.size()))), w.offset) << json;
  EXPECT_EQ(json.back(), '}');
  // The quant map: the 16 values of the issue, as float32.
  const double kNf4[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                           0.7229568362236023, 1.0};
  const std::vector<float> code = r.read<float>("l.weight.quant_map");
  for (int i = 0; i < 16; ++i) EXPECT_EQ(code[static_cast<std::size_t>(i)], static_cast<float>(kNf4[i])) << i;

  SafetensorsWriter single;
  lora::io::add_nf4_weight(single, "l.weight", quantized(5, 27, false, "float32", 3));
  const SafetensorsReader s = SafetensorsReader::from_memory(single.to_bytes());
  EXPECT_EQ(s.info("l.weight.absmax").dtype, Dtype::F32);
  EXPECT_FALSE(s.contains("l.weight.nested_absmax"));
  const auto single_text = s.read_bytes("l.weight.quant_state.bitsandbytes__nf4");
  EXPECT_EQ(std::string(single_text.begin(), single_text.end()),
            R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [5, 27]})");
}

// ---- a file written by a script from bitsandbytes' rules --------------------------------------

TEST(Nf4Files, LoadsAFileWrittenByTorchFromBitsandbytesRules) {
  if (std::system("/usr/bin/python3 -c 'import torch' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "/usr/bin/python3 with torch is absent (Debian: apt-get install python3-torch)";
  TempDir tmp;
  const std::string script = (std::filesystem::path(__FILE__).parent_path() / "nf4_reference.py").string();
  const std::string command = "/usr/bin/python3 '" + script + "' '" + tmp.path().string() + "'";
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  struct Case {
    const char* name;
    std::int64_t rows, cols, blocksize;
    bool nested;
    const char* dtype;
  };
  for (const Case c : {Case{"double_bf16", 24, 100, 64, true, "bfloat16"}, Case{"single_f32", 7, 9, 64, false, "float32"},
                       Case{"double_f16_many", 9, 2000, 64, true, "float16"},
                       Case{"single_b128", 5, 77, 128, false, "float32"}}) {
    SCOPED_TRACE(c.name);
    const lora::io::ModelReader model = lora::io::ModelReader::open(tmp / (std::string(c.name) + ".safetensors"));
    EXPECT_EQ(lora::io::nf4_weight_names(model), std::vector<std::string>{"layer.weight"});
    EXPECT_FALSE(lora::io::is_nf4_weight(model, "layer.bias"));
    const lora::nf4::Weight w = lora::io::load_nf4_weight(model, "layer.weight");
    EXPECT_EQ(w.rows, c.rows);
    EXPECT_EQ(w.cols, c.cols);
    EXPECT_EQ(w.blocksize, c.blocksize);
    EXPECT_EQ(w.nested(), c.nested);
    EXPECT_EQ(w.dtype, c.dtype);
    const std::vector<float> got = lora::nf4::dequantize<float>(w);
    const std::vector<std::uint8_t> raw = io_test::read_file(tmp / (std::string(c.name) + ".f32"));
    ASSERT_EQ(raw.size(), got.size() * 4);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      std::uint32_t want_bits = 0, got_bits = 0;
      std::memcpy(&want_bits, raw.data() + 4 * i, 4);  // little-endian on the machines the suite runs on
      std::memcpy(&got_bits, &got[i], 4);
      differ += want_bits != got_bits;
    }
    EXPECT_EQ(differ, 0u) << "of " << got.size() << " values";
  }
}

// ---- broken files ----------------------------------------------------------------------------

// A valid double-quantized weight's tensors, to break one at a time.
std::map<std::string, RawTensor> valid_tensors(bool double_quant) {
  SafetensorsWriter writer;
  lora::io::add_nf4_weight(writer, "m.weight", quantized(6, 50, double_quant, "float32", 5));
  const SafetensorsReader r = SafetensorsReader::from_memory(writer.to_bytes());
  std::map<std::string, RawTensor> out;
  for (const auto& t : r.tensors()) out[t.name] = r.read_raw(t.name);
  return out;
}

SafetensorsReader file_of(const std::map<std::string, RawTensor>& tensors) {
  SafetensorsWriter writer;
  for (const auto& [name, t] : tensors) writer.add_raw(name, t);
  return SafetensorsReader::from_memory(writer.to_bytes(), "broken.safetensors");
}

RawTensor json_tensor(const std::string& text) {
  return RawTensor{Dtype::U8, {static_cast<std::int64_t>(text.size())}, std::vector<std::uint8_t>(text.begin(), text.end())};
}

void expect_refused(const std::map<std::string, RawTensor>& tensors, std::initializer_list<std::string> parts) {
  const SafetensorsReader r = file_of(tensors);
  expect_error([&] { lora::io::load_nf4_weight(r, "m.weight"); }, parts);
}

TEST(Nf4Files, RefusesWrongDtypesAndShapes) {
  auto t = valid_tensors(true);
  t["m.weight"].dtype = Dtype::I8;
  expect_refused(t, {"broken.safetensors", "\"m.weight\"", "I8", "expected U8 [150, 1]"});

  t = valid_tensors(true);  // bnb_4bit_quant_storage=bfloat16 stores the packed bytes as BF16
  t["m.weight"] = RawTensor{Dtype::BF16, {75, 1}, std::vector<std::uint8_t>(150)};
  expect_refused(t, {"\"m.weight\"", "BF16", "quant_storage"});

  t = valid_tensors(true);
  t["m.weight"].shape = {150};
  expect_refused(t, {"\"m.weight\"", "[150]", "expected U8 [150, 1]"});

  t = valid_tensors(false);
  t["m.weight.absmax"].dtype = Dtype::U8;
  t["m.weight.absmax"].shape = {20};
  expect_refused(t, {"\"m.weight.absmax\"", "U8 [20]", "expected F32 [5]"});

  t = valid_tensors(true);
  t["m.weight.absmax"] = RawTensor{Dtype::U8, {4}, {1, 2, 3, 4}};
  expect_refused(t, {"\"m.weight.absmax\"", "expected U8 [5]"});

  t = valid_tensors(true);
  t["m.weight.nested_quant_map"].shape = {128};
  t["m.weight.nested_quant_map"].bytes.resize(512);
  expect_refused(t, {"\"m.weight.nested_quant_map\"", "expected F32 [256]"});

  t = valid_tensors(false);
  std::vector<std::uint8_t> inf = {0, 0, 0x80, 0x7f};  // +inf as an absmax
  std::copy(inf.begin(), inf.end(), t["m.weight.absmax"].bytes.begin() + 8);
  expect_refused(t, {"\"m.weight.absmax\"", "element 2", "finite"});
}

TEST(Nf4Files, RefusesAWrongQuantMapOrNestedCode) {
  auto t = valid_tensors(true);
  t["m.weight.quant_map"].bytes[4 * 3] ^= 1;  // element 3 off by an ulp
  expect_refused(t, {"\"m.weight.quant_map\"", "element 3", "NF4 code value"});

  t = valid_tensors(true);
  std::swap_ranges(t["m.weight.nested_quant_map"].bytes.begin() + 40, t["m.weight.nested_quant_map"].bytes.begin() + 44,
                   t["m.weight.nested_quant_map"].bytes.begin() + 800);  // elements 10 and 200 swapped: unsorted
  expect_refused(t, {"\"m.weight.nested_quant_map\"", "sorted"});
}

TEST(Nf4Files, RefusesAMissingCompanion) {
  for (const std::string name : {"m.weight", "m.weight.absmax", "m.weight.quant_map", "m.weight.nested_absmax",
                                 "m.weight.nested_quant_map"}) {
    auto t = valid_tensors(true);
    t.erase(name);
    expect_refused(t, {"NF4 weight \"m.weight\"", "\"" + name + "\" is missing"});
  }
  auto t = valid_tensors(true);  // nested tensors without nested keys in the JSON
  t["m.weight.quant_state.bitsandbytes__nf4"] =
      json_tensor(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [6, 50]})");
  expect_refused(t, {"\"m.weight.nested_absmax\" is present", "no nested_* keys"});
  t.erase("m.weight.nested_absmax");
  t.erase("m.weight.nested_quant_map");
  expect_refused(t, {"\"m.weight.absmax\"", "U8 [5], expected F32 [5]"});
  t = valid_tensors(false);
  t["m.weight.nested_absmax"] = RawTensor{Dtype::F32, {1}, {0, 0, 0x80, 0x3f}};
  expect_refused(t, {"\"m.weight.nested_absmax\"", "no nested_* keys"});
}

TEST(Nf4Files, RefusesBadJson) {
  const std::string base = R"("quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [6, 50])";
  const std::string nested = R"(, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5)";
  const std::vector<std::pair<std::string, std::string>> cases = {  // the JSON, a part of the message
      {"{" + base, "not valid JSON"},
      {"[1, 2]", "not a JSON object"},
      {"{" + base + ", \"extra\": 1}", "unknown key \"extra\""},
      {R"({"quant_type": "nf4", "dtype": "float32", "shape": [6, 50]})", "no \"blocksize\""},
      {R"({"quant_type": "nf4", "blocksize": -64, "dtype": "float32", "shape": [6, 50]})", "\"blocksize\" is -64"},
      {R"({"quant_type": "nf4", "blocksize": 63, "dtype": "float32", "shape": [6, 50]})", "even"},
      {R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float64", "shape": [6, 50]})", "\"dtype\" is \"float64\""},
      {R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [300]})", "\"shape\" is [300]"},
      {R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [5, 50]})", "expected U8 [125, 1]"},
      {R"({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [6, 50]})", "FP4 is not supported"},
      {"{" + base + R"(, "nested_blocksize": 256, "nested_dtype": "float32"})", "no \"nested_offset\""},
      {"{" + base + R"(, "nested_blocksize": 256, "nested_dtype": "float16", "nested_offset": 0.5})",
       "\"nested_dtype\" is \"float16\""},
      {"{" + base + R"(, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "x"})",
       "\"nested_offset\" is \"x\""},
      {"{" + base + R"(, "nested_blocksize": 2, "nested_dtype": "float32", "nested_offset": 0.5})",
       "expected F32 [3]"},  // 5 blocks in nested blocks of 2: 3 nested absmax values, the file has 1
  };
  for (const auto& [json, part] : cases) {
    SCOPED_TRACE(json);
    auto t = valid_tensors(json.find("nested") != std::string::npos);
    t["m.weight.quant_state.bitsandbytes__nf4"] = json_tensor(json);
    expect_refused(t, {"broken.safetensors: NF4 weight \"m.weight\"", part});
  }
  // The same JSON with nothing broken loads, as given (each case above breaks one thing); a
  // nested blocksize of 128 is loaded as the file says (5 blocks still make one nested block).
  auto t = valid_tensors(true);
  t["m.weight.quant_state.bitsandbytes__nf4"] = json_tensor("{" + base + nested + "}");
  EXPECT_EQ(lora::io::load_nf4_weight(file_of(t), "m.weight").offset, 0.5f);
  t["m.weight.quant_state.bitsandbytes__nf4"] =
      json_tensor("{" + base + R"(, "nested_blocksize": 128, "nested_dtype": "float32", "nested_offset": 0.5})");
  EXPECT_EQ(lora::io::load_nf4_weight(file_of(t), "m.weight").nested_blocksize, 128);
}

TEST(Nf4Files, Fp4WeightsAreRefusedByName) {
  auto t = valid_tensors(false);
  t["m.weight.quant_state.bitsandbytes__fp4"] = t["m.weight.quant_state.bitsandbytes__nf4"];
  t.erase("m.weight.quant_state.bitsandbytes__nf4");
  const SafetensorsReader r = file_of(t);
  EXPECT_FALSE(lora::io::is_nf4_weight(r, "m.weight"));
  expect_error([&] { lora::io::nf4_weight_names(r); }, {"\"m.weight\"", "FP4", "only NF4"});
}

// ---- config.json ------------------------------------------------------------------------------

TEST(Nf4Files, QuantizationConfigAsTransformersWritesIt) {
  // What BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  // bnb_4bit_compute_dtype=torch.bfloat16).to_dict() gives.
  const auto config = nlohmann::ordered_json::parse(R"({"model_type": "llama", "quantization_config": {
      "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "bfloat16",
      "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
      "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null,
      "llm_int8_threshold": 6.0, "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"}})");
  const auto c = lora::io::parse_quantization_config(config, "config.json");
  ASSERT_TRUE(c.has_value());
  EXPECT_TRUE(c->double_quant);
  EXPECT_EQ(c->compute_dtype, "bfloat16");
  EXPECT_EQ(lora::io::quantization_config_json(*c), config["quantization_config"]);
  EXPECT_FALSE(lora::io::parse_quantization_config(nlohmann::ordered_json::parse(R"({"model_type": "gpt2"})"), "c").has_value());

  const auto refused = [](const std::string& q, const std::string& part) {
    const auto j = nlohmann::ordered_json::parse(R"({"quantization_config": )" + q + "}");
    expect_error([&] { lora::io::parse_quantization_config(j, "config.json"); }, {"config.json: quantization_config", part});
  };
  refused(R"({"load_in_4bit": true, "bnb_4bit_quant_type": "fp4"})", "\"fp4\" is not supported");
  refused(R"({"load_in_4bit": true})", "\"fp4\" is not supported");  // BitsAndBytesConfig's default type
  refused(R"({"load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": "bfloat16"})", "only uint8");
  refused(R"({"load_in_8bit": true, "quant_method": "bitsandbytes"})", "load_in_8bit");
  refused(R"({"quant_method": "gptq", "bits": 4})", "\"gptq\" is not supported");
  refused(R"({"load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float64"})", "float64");
  refused(R"({"load_in_4bit": "yes", "bnb_4bit_quant_type": "nf4"})", "expected true or false");
}

}  // namespace

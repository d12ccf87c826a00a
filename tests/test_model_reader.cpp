// ModelReader: a model as one file, a sharded index and a directory; views that
// point into the file's own mapping (found in /proc/self/maps, not asked of the
// reader); BF16/F16/F64 converted to float against values worked out by hand;
// copies through a backend in blocks; and every broken model refused with a
// lora::Error that says what and where.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "io_test_util.hpp"
#include "lora/io/model_reader.hpp"

namespace {

using io_test::kInfF;

using io_test::expect_error;
using io_test::TempDir;
using lora::MatrixView;
using lora::io::Dtype;
using lora::io::ModelReader;
using lora::io::RawTensor;
using lora::io::SafetensorsReader;
using lora::io::SafetensorsWriter;


// values[i] = i + 0.25 * (i % 3), exact in float and double.
std::vector<float> ramp(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i) + 0.25f * static_cast<float>(i % 3);
  return v;
}

// Little-endian bytes of 16-bit words, written by hand.
RawTensor raw16(Dtype dtype, std::vector<std::int64_t> shape, const std::vector<std::uint16_t>& words) {
  RawTensor t{dtype, std::move(shape), {}};
  for (const std::uint16_t w : words) {
    t.bytes.push_back(static_cast<std::uint8_t>(w & 0xFF));
    t.bytes.push_back(static_cast<std::uint8_t>(w >> 8));
  }
  return t;
}

// The model every test reads: an F32 weight [3, 5], an F32 bias [5], BF16 and
// F16 weights [2, 3] given as bit patterns, an F64 weight [2, 3] and an I32 one.
SafetensorsWriter small_model() {
  SafetensorsWriter w;
  const std::vector<float> weight = ramp(15), bias = ramp(5);
  w.add("layers.0.weight", {3, 5}, weight.data());
  w.add("layers.0.bias", {5}, bias.data());
  // BF16: 1.5, -2.5, 1.0 / 2^-133 (the smallest subnormal), +inf, 0x3F81 = 1 + 2^-7.
  w.add_raw("bf16.weight", raw16(Dtype::BF16, {2, 3}, {0x3FC0, 0xC020, 0x3F80, 0x0001, 0x7F80, 0x3F81}));
  // F16: 1, -2, 0x3555 = 0.333251953125 / 2^-24 (the smallest subnormal), 65504 (the largest), -0.
  w.add_raw("f16.weight", raw16(Dtype::F16, {2, 3}, {0x3C00, 0xC000, 0x3555, 0x0001, 0x7BFF, 0x8000}));
  // F64 to float: 0.1 -> the float nearest 0.1; 1 + 2^-24 halfway -> 1 (even); 1 + 3 * 2^-24
  // halfway -> 1 + 2^-22 (even); 1e300 -> +inf; 2^-149 exactly; -(1 + 2^-23) exactly.
  const std::vector<double> f64 = {0.1, 1 + std::ldexp(1.0, -24), 1 + 3 * std::ldexp(1.0, -24), 1e300,
                                   std::ldexp(1.0, -149), -(1 + std::ldexp(1.0, -23))};
  w.add("f64.weight", {2, 3}, f64.data(), Dtype::F64);
  w.add_raw("int.weight", RawTensor{Dtype::I32, {1, 2}, std::vector<std::uint8_t>(8, 0)});
  return w;
}

void expect_ramp(MatrixView<const float> m, std::int64_t rows, std::int64_t cols) {
  ASSERT_EQ(m.rows, rows);
  ASSERT_EQ(m.cols, cols);
  const std::vector<float> want = ramp(static_cast<std::size_t>(rows * cols));
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) EXPECT_EQ(m(i, j), want[static_cast<std::size_t>(i * cols + j)]) << i << "," << j;
}

#if defined(__linux__)
// The file mapped at address p, from the kernel's own list of this process's mappings.
std::string mapped_file_at(const void* p) {
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    std::istringstream in(line);
    std::string range, perms, offset, dev, inode, path;
    in >> range >> perms >> offset >> dev >> inode;
    std::getline(in >> std::ws, path);
    const std::size_t dash = range.find('-');
    const std::uintptr_t begin = std::stoull(range.substr(0, dash), nullptr, 16);
    const std::uintptr_t end = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (at >= begin && at < end) return path;
  }
  return "";
}
#endif

// ---- one file, a directory, a sharded index ----------------------------------------------

TEST(ModelReader, OpensOneFileAndListsItsTensors) {
  TempDir tmp;
  small_model().write(tmp / "model.safetensors");
  for (const std::string& path : {tmp / "model.safetensors", tmp.path().string()}) {
    const ModelReader model = ModelReader::open(path);
    EXPECT_FALSE(model.sharded());
    EXPECT_EQ(model.source(), tmp / "model.safetensors");
    EXPECT_EQ(model.shard_files(), std::vector<std::string>{"model.safetensors"});
    EXPECT_EQ(model.names(), (std::vector<std::string>{"bf16.weight", "f16.weight", "f64.weight", "int.weight",
                                                       "layers.0.bias", "layers.0.weight"}));
    EXPECT_EQ(model.info("layers.0.weight").shape, (std::vector<std::int64_t>{3, 5}));
    EXPECT_EQ(model.info("layers.0.weight").dtype, Dtype::F32);
    EXPECT_EQ(model.info("layers.0.bias").shape, (std::vector<std::int64_t>{5}));
    EXPECT_EQ(model.info("bf16.weight").dtype, Dtype::BF16);
    EXPECT_EQ(model.info("int.weight").dtype, Dtype::I32);
    expect_ramp(model.read_matrix<float>("layers.0.weight").view(), 3, 5);
  }
}

// Two shards, the tensors of each read through the index and through its directory.
TEST(ModelReader, OpensAShardedModel) {
  TempDir tmp;
  SafetensorsWriter first, second;
  const std::vector<float> a = ramp(6), b = ramp(8);
  first.add("a.weight", {2, 3}, a.data());
  second.add("b.weight", {4, 2}, b.data(), Dtype::F64);
  second.add("b.bias", {2}, b.data());
  first.write(tmp / "model-00001-of-00002.safetensors");
  second.write(tmp / "model-00002-of-00002.safetensors");
  io_test::write_file(tmp / "model.safetensors.index.json",
                      R"({"metadata": {"total_size": 96}, "weight_map": {"b.weight": "model-00002-of-00002.safetensors",
                          "a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}})");
  for (const std::string& path : {tmp / "model.safetensors.index.json", tmp.path().string()}) {
    const ModelReader model = ModelReader::open(path);
    EXPECT_TRUE(model.sharded());
    EXPECT_EQ(model.source(), tmp / "model.safetensors.index.json");
    EXPECT_EQ(model.shard_files(), (std::vector<std::string>{"model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors"}));
    EXPECT_EQ(model.names(), (std::vector<std::string>{"a.weight", "b.bias", "b.weight"}));
    EXPECT_EQ(model.index().json["metadata"]["total_size"], 96);
    EXPECT_EQ(model.shard_of("b.weight").source(), tmp / "model-00002-of-00002.safetensors");
    expect_ramp(model.view<float>("a.weight"), 2, 3);
    expect_ramp(model.read_matrix<float>("b.weight").view(), 4, 2);  // F64 -> float, exact for these values
    std::vector<float> bias(2);
    model.read_into("b.bias", MatrixView<float>(bias.data(), 1, 2));
    EXPECT_EQ(bias, ramp(2));
  }
}

// ---- zero copy -----------------------------------------------------------------------------

TEST(ModelReader, ViewPointsIntoTheFilesMapping) {
  TempDir tmp;
  small_model().write(tmp / "model.safetensors");
  const ModelReader model = ModelReader::open(tmp / "model.safetensors");
  const MatrixView<const float> first = model.view<float>("layers.0.weight");
  const MatrixView<const float> second = model.view<float>("layers.0.weight");
  EXPECT_EQ(first.data, second.data);  // the same bytes both times: nothing was copied
  expect_ramp(first, 3, 5);
  const lora::io::HostTensor<float> loaded = model.load<float>("layers.0.weight");
  EXPECT_TRUE(loaded.borrowed());
  EXPECT_EQ(loaded.view().data, first.data);
  const lora::io::HostTensor<double> widened = model.load<double>("layers.0.weight");  // F32 -> double: a copy
  EXPECT_FALSE(widened.borrowed());
  EXPECT_EQ(widened.view()(2, 4), 14.5);  // element 14: 14 + 0.25 * (14 % 3)
  EXPECT_EQ(model.view<double>("f64.weight")(0, 0), 0.1);
#if defined(__linux__)
  // The kernel says the address belongs to a mapping of model.safetensors.
  EXPECT_EQ(std::filesystem::path(mapped_file_at(first.data)),
            std::filesystem::canonical(tmp.path() / "model.safetensors"));
  EXPECT_NE(std::filesystem::path(mapped_file_at(widened.view().data)),  // (and can tell a copy from it)
            std::filesystem::canonical(tmp.path() / "model.safetensors"));
#endif
}

// A header one byte longer than the writer makes it puts every tensor at an odd
// address: a view cannot be formed, a copy is made instead, with the same values.
TEST(ModelReader, MisalignedDataIsCopiedNotViewed) {
  TempDir tmp;
  SafetensorsWriter w;
  const std::vector<float> v = ramp(6);
  w.add("w", {2, 3}, v.data());
  const std::string header = w.header() + " ";
  std::vector<std::uint8_t> bytes(8);
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(header.size() >> (8 * i));
  bytes.insert(bytes.end(), header.begin(), header.end());
  const std::vector<std::uint8_t> file = w.to_bytes();
  bytes.insert(bytes.end(), file.end() - 24, file.end());  // the 6 floats
  io_test::write_file(tmp / "model.safetensors", bytes);

  const ModelReader model = ModelReader::open(tmp.path().string());
  ASSERT_EQ(model.shards()[0].data_offset() % 4, 1u);
  expect_error([&] { (void)model.view<float>("w"); }, {"\"w\"", "file byte " + std::to_string(8 + header.size()) + ",", "not aligned to 4 bytes", "load, read_into or copy_to"});
  const lora::io::HostTensor<float> loaded = model.load<float>("w");
  EXPECT_FALSE(loaded.borrowed());
  expect_ramp(loaded.view(), 2, 3);
}

// ---- conversions ---------------------------------------------------------------------------

TEST(ModelReader, ConvertsBf16F16AndF64ToFloat) {
  TempDir tmp;
  small_model().write(tmp / "model.safetensors");
  const ModelReader model = ModelReader::open(tmp / "model.safetensors");

  const lora::cpu::Matrix<float> bf16 = model.read_matrix<float>("bf16.weight");
  const float bf16_want[] = {1.5f, -2.5f, 1.0f, std::ldexp(1.0f, -133), kInfF, 1.0f + std::ldexp(1.0f, -7)};
  const lora::cpu::Matrix<float> f16 = model.read_matrix<float>("f16.weight");
  const float f16_want[] = {1.0f, -2.0f, 0.333251953125f, std::ldexp(1.0f, -24), 65504.0f, -0.0f};
  const lora::cpu::Matrix<float> f64 = model.read_matrix<float>("f64.weight");
  const float f64_want[] = {0.1f, 1.0f, 1.0f + std::ldexp(1.0f, -22), kInfF, std::ldexp(1.0f, -149),
                            -(1.0f + std::ldexp(1.0f, -23))};
  for (int k = 0; k < 6; ++k) {
    EXPECT_EQ(bf16(k / 3, k % 3), bf16_want[k]) << "bf16 element " << k;
    EXPECT_EQ(f16(k / 3, k % 3), f16_want[k]) << "f16 element " << k;
    EXPECT_EQ(f64(k / 3, k % 3), f64_want[k]) << "f64 element " << k;
  }
  EXPECT_TRUE(std::signbit(f16(1, 2)));
  EXPECT_EQ(model.read_matrix<double>("f64.weight")(0, 0), 0.1);  // F64 -> double is the stored value
  EXPECT_FALSE(model.load<float>("bf16.weight").borrowed());

  // read_into honours the destination's stride and leaves the padding alone.
  std::vector<float> padded(2 * 4, -7.0f);
  model.read_into("bf16.weight", MatrixView<float>(padded.data(), 2, 3, 4));
  EXPECT_EQ(padded, (std::vector<float>{1.5f, -2.5f, 1.0f, -7.0f, std::ldexp(1.0f, -133), kInfF,
                                        1.0f + std::ldexp(1.0f, -7), -7.0f}));
}

// A 16-bit type of a backend, known to the reader only through StoredDtype (as
// cuda_dtypes.hpp declares __nv_bfloat16): BF16 bytes go across as they are,
// other dtypes are rounded once to bfloat16, to nearest, ties to even.
struct Bf16Bits {
  std::uint16_t bits;
};

}  // namespace

template <>
struct lora::io::StoredDtype<Bf16Bits> {
  static constexpr Dtype value = Dtype::BF16;
};

namespace {

// A stand-in for a device backend: its own memory space, and a copy_from_host
// that records each call, so the blocks copy_to makes can be counted.
struct FakeDeviceSpace {};
struct FakeDevice {
  struct Context {
    int copies = 0;
    std::vector<const void*> sources;
  };
  using Space = FakeDeviceSpace;
  template <class T>
  static void copy_from_host(Context& ctx, MatrixView<const T, lora::HostSpace> host, MatrixView<T, FakeDeviceSpace> dst) {
    lora::check_shape(dst, host.rows, host.cols, "copy_from_host: dst");
    ++ctx.copies;
    ctx.sources.push_back(host.data);
    for (std::int64_t i = 0; i < host.rows; ++i)
      for (std::int64_t j = 0; j < host.cols; ++j) dst.data[i * dst.stride + j] = host(i, j);
  }
};

TEST(ModelReader, CopiesToA16BitBackendTypeBitsAsStoredOrRoundedOnce) {
  TempDir tmp;
  SafetensorsWriter w = small_model();
  // F32 to bfloat16 (ulp 2^-7 at 1): 1 + 2^-8 is halfway -> 1 (0x3F80, even); 1 + 3 * 2^-8 is halfway
  // -> 1 + 2^-6 (0x3F82, even); 1 + 2^-8 + 2^-20 is above halfway -> 1 + 2^-7 (0x3F81); -3 exactly (0xC040).
  const std::vector<float> f32 = {1 + std::ldexp(1.0f, -8), 1 + 3 * std::ldexp(1.0f, -8),
                                  1 + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20), -3.0f};
  w.add("f32.weight", {2, 2}, f32.data());
  w.write(tmp / "model.safetensors");
  const ModelReader model = ModelReader::open(tmp / "model.safetensors");

  FakeDevice::Context ctx;
  std::vector<Bf16Bits> same(6);
  model.copy_to<FakeDevice>(ctx, "bf16.weight", MatrixView<Bf16Bits, FakeDeviceSpace>(same.data(), 2, 3));
  EXPECT_EQ(ctx.copies, 1);  // in place: one copy, straight from the mapping
  EXPECT_EQ(ctx.sources[0], model.shard_of("bf16.weight").stored_bytes("bf16.weight"));
  const std::uint16_t stored[] = {0x3FC0, 0xC020, 0x3F80, 0x0001, 0x7F80, 0x3F81};
  for (int k = 0; k < 6; ++k) EXPECT_EQ(same[static_cast<std::size_t>(k)].bits, stored[k]) << k;

  std::vector<Bf16Bits> rounded(4);
  model.copy_to<FakeDevice>(ctx, "f32.weight", MatrixView<Bf16Bits, FakeDeviceSpace>(rounded.data(), 2, 2));
  const std::uint16_t want[] = {0x3F80, 0x3F82, 0x3F81, 0xC040};
  for (int k = 0; k < 4; ++k) EXPECT_EQ(rounded[static_cast<std::size_t>(k)].bits, want[k]) << k;
}

// A converted copy goes in blocks of about 1 MiB of the destination type:
// [600, 1000] F64 -> float is 2.4 MB, 262 rows (1,048,000 bytes) a block, so 3 copies.
TEST(ModelReader, CopyToConvertsInBlocksAndKeepsTheDestinationStride) {
  TempDir tmp;
  const std::int64_t rows = 600, cols = 1000;
  std::vector<double> values(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<double>(i) * 0.5;  // exact in float
  SafetensorsWriter w;
  w.add("big.weight", {rows, cols}, values.data(), Dtype::F64);
  w.add("same.weight", {rows, cols}, values.data(), Dtype::F32);
  w.write(tmp / "model.safetensors");
  const ModelReader model = ModelReader::open(tmp / "model.safetensors");

  FakeDevice::Context ctx;
  std::vector<float> device(static_cast<std::size_t>(rows * (cols + 3)), -1.0f);
  model.copy_to<FakeDevice>(ctx, "big.weight", MatrixView<float, FakeDeviceSpace>(device.data(), rows, cols, cols + 3));
  EXPECT_EQ(ctx.copies, 3);
  bool all_equal = true;
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j)
      all_equal &= device[static_cast<std::size_t>(i * (cols + 3) + j)] == static_cast<float>(values[static_cast<std::size_t>(i * cols + j)]);
    all_equal &= device[static_cast<std::size_t>(i * (cols + 3) + cols)] == -1.0f;
  }
  EXPECT_TRUE(all_equal);

  ctx = {};
  std::vector<float> direct(static_cast<std::size_t>(rows * cols));
  model.copy_to<FakeDevice>(ctx, "same.weight", MatrixView<float, FakeDeviceSpace>(direct.data(), rows, cols));
  EXPECT_EQ(ctx.copies, 1);
  EXPECT_EQ(ctx.sources[0], model.view<float>("same.weight").data);
  EXPECT_EQ(direct[static_cast<std::size_t>(rows * cols - 1)], static_cast<float>(values.back()));

  // The CPU backend's copy_to is read_into.
  lora::cpu::Context cpu;
  lora::cpu::Matrix<float> host(rows, cols);
  model.copy_to<lora::cpu::Backend>(cpu, "big.weight", host.view());
  EXPECT_EQ(std::memcmp(host.data(), direct.data(), direct.size() * sizeof(float)), 0);
}

// ---- broken models ---------------------------------------------------------------------------

TEST(ModelReader, RefusesWhatItCannotHand) {
  TempDir tmp;
  small_model().write(tmp / "model.safetensors");
  const ModelReader model = ModelReader::open(tmp / "model.safetensors");
  expect_error([&] { (void)model.info("layers.9.weight"); }, {"model.safetensors", "no tensor named \"layers.9.weight\""});
  expect_error([&] { (void)model.view<float>("layers.0.bias"); }, {"\"layers.0.bias\"", "[5]", "expected a 2-D", "read_into"});
  expect_error([&] { (void)model.read_matrix<float>("layers.0.bias"); }, {"[5]", "expected a 2-D"});
  expect_error([&] { (void)model.load<float>("layers.0.bias"); }, {"[5]", "expected a 2-D"});
  expect_error([&] { (void)model.view<float>("bf16.weight"); }, {"\"bf16.weight\"", "is stored as BF16", "a view as float needs F32"});
  expect_error([&] { (void)model.read_matrix<float>("int.weight"); }, {"\"int.weight\"", "I32", "only F16, BF16, F32 and F64"});
  std::vector<float> out(16);
  expect_error([&] { model.read_into("layers.0.weight", MatrixView<float>(out.data(), 5, 3)); },
               {"\"layers.0.weight\"", "[3, 5]", "the destination is [5, 3]"});
  expect_error([&] { model.read_into("layers.0.bias", MatrixView<float>(out.data(), 5, 1)); }, {"[5]", "[5, 1]"});
  FakeDevice::Context ctx;
  expect_error([&] { model.copy_to<FakeDevice>(ctx, "layers.0.weight", MatrixView<float, FakeDeviceSpace>(out.data(), 3, 4)); },
               {"copy_to", "[3, 5]", "[3, 4]"});
  EXPECT_EQ(ctx.copies, 0);
}

// A sharded model whose index and shards disagree, or cannot be read.
TEST(ModelReader, RefusesABrokenShardedModel) {
  TempDir tmp;
  SafetensorsWriter first, second;
  const std::vector<float> v = ramp(4);
  first.add("a", {2, 2}, v.data());
  second.add("b", {2, 2}, v.data());
  second.add("c", {4}, v.data());
  first.write(tmp / "s1.safetensors");
  second.write(tmp / "s2.safetensors");
  const std::string index = tmp / "model.safetensors.index.json";
  auto write_index = [&](const std::string& text) { io_test::write_file(index, text); };

  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}})");
  EXPECT_EQ(ModelReader::open(index).size(), 3u);  // the valid model the cases below break

  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s3.safetensors", "c": "s2.safetensors"}})");
  expect_error([&] { ModelReader::open(index); }, {"model.safetensors.index.json", "shard \"s3.safetensors\"", "no such file"});
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}})");
  expect_error([&] { ModelReader::open(index); }, {"weight_map puts \"b\" in s1.safetensors, which has no such tensor"});
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_error([&] { ModelReader::open(index); }, {"s2.safetensors holds \"c\", which the weight_map does not list"});
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "../s2.safetensors", "c": "s2.safetensors"}})");
  expect_error([&] { ModelReader::open(index); }, {"\"../s2.safetensors\"", "not a file name in the index's directory"});
  write_index(R"({"weight_map": {"a": "s1.safetensors",)");
  expect_error([&] { ModelReader::open(index); }, {"model.safetensors.index.json"});
  write_index(R"({"metadata": {}})");
  expect_error([&] { ModelReader::open(index); }, {"expected an object with a \"weight_map\" object"});

  // A shard that breaks the safetensors format is named with the check it fails.
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}})");
  std::vector<std::uint8_t> truncated = io_test::read_file(tmp / "s2.safetensors");
  truncated.resize(truncated.size() - 1);
  io_test::write_file(tmp / "s2.safetensors", truncated);
  expect_error([&] { ModelReader::open(index); }, {"shard \"s2.safetensors\"", "invalid safetensors file", "data_offsets"});

  expect_error([&] { ModelReader::open(tmp / "none"); }, {"none", "no such file"});
  std::filesystem::remove(index);
  expect_error([&] { ModelReader::open(tmp.path().string()); },
               {"holds neither model.safetensors nor model.safetensors.index.json"});
}

// The same check in memory, as the fuzzer drives it.
TEST(ModelReader, FromMemoryChecksAsOpenDoes) {
  SafetensorsWriter w;
  const std::vector<float> v = ramp(4);
  w.add("a", {2, 2}, v.data());
  const ModelReader model =
      ModelReader::from_memory(R"({"weight_map": {"a": "s.safetensors"}})", {{"s.safetensors", w.to_bytes()}});
  expect_ramp(model.view<float>("a"), 2, 2);
  expect_error([&] { ModelReader::from_memory(R"({"weight_map": {"a": "t.safetensors"}})", {{"s.safetensors", w.to_bytes()}}); },
               {"shard \"t.safetensors\"", "no such file"});
}

// map() accepts and refuses exactly what open() does, with the same message: every file of the fuzz corpus.
TEST(ModelReader, SafetensorsMapAgreesWithOpen) {
  const std::filesystem::path corpus = std::filesystem::path(__FILE__).parent_path().parent_path() / "fuzz" / "corpus";
  if (!std::filesystem::is_directory(corpus)) GTEST_SKIP() << corpus << " is absent";
  TempDir tmp;
  io_test::write_file(tmp / "empty.safetensors", std::vector<std::uint8_t>{});
  std::vector<std::string> files = {tmp / "empty.safetensors", tmp.path().string()};
  for (const auto& entry : std::filesystem::directory_iterator(corpus)) files.push_back(entry.path().string());
  auto error_of = [](auto&& read) -> std::string {
    try {
      read();
    } catch (const lora::Error& e) {
      return e.what();
    }
    return "";
  };
  int accepted = 0;
  for (const std::string& file : files) {
    const std::string opened = error_of([&] { (void)SafetensorsReader::open(file); });
    const std::string mapped = error_of([&] { (void)SafetensorsReader::map(file); });
    EXPECT_EQ(opened, mapped) << file;
    if (!opened.empty() || !mapped.empty()) continue;
    ++accepted;
    const SafetensorsReader a = SafetensorsReader::open(file), b = SafetensorsReader::map(file);
    ASSERT_EQ(a.tensors().size(), b.tensors().size()) << file;
    for (const lora::io::TensorInfo& t : a.tensors()) {
      EXPECT_EQ(a.read_bytes(t.name), b.read_bytes(t.name)) << file << ": " << t.name;
      EXPECT_EQ(a.stored_bytes(t.name), nullptr);  // open() reads the file on request
      EXPECT_EQ(b.stored_bytes(t.name), b.stored_bytes(b.tensors()[0].name) + t.begin);
    }
  }
  EXPECT_GE(accepted, 2);
}

}  // namespace

// Writes what our GPU NF4 quantizer makes of one seeded tensor, for
// bench/device/bnb_check.py to compare with bitsandbytes (or with a torch
// reimplementation of its rules). Usage: nf4_dump <out dir>
//
// The tensor: kRows x kCols fp32 values, N(0, 0.02^2)-shaped (Box-Muller over
// the library's counter RNG, seed 2024), so the file is the same on every run.
// For each dtype (float32, bfloat16, float16: the tensor rounded to it) and
// double quantization off / on, the directory gets <dtype>_dq<0|1>_<field>.bin
// (raw little-endian arrays: packed u8, absmax f32 or absmax_q u8 +
// nested_absmax f32 + nested_code f32, dequant = the GPU's dequantized values
// in that dtype, widened to f32), and meta.json names the shapes and offsets.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "lora/cuda.hpp"

namespace {

using lora::HostSpace;
using lora::MatrixView;
using lora::cuda::Backend;
using lora::cuda::DeviceSpace;
using lora::cuda::Matrix;
using lora::cuda::value_cast;

constexpr std::int64_t kRows = 257, kCols = 1000;  // 4016 blocks of 64, the last of 40; 16 nested blocks

template <class U>
void write(const std::string& path, const std::vector<U>& v) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  LORA_CHECK(f != nullptr, "nf4_dump: cannot write " << path);
  const std::size_t written = std::fwrite(v.data(), sizeof(U), v.size(), f);
  std::fclose(f);
  LORA_CHECK(written == v.size(), "nf4_dump: short write to " << path);
}

std::vector<float> seeded_tensor() {
  std::vector<float> w(static_cast<std::size_t>(kRows * kCols));
  for (std::size_t i = 0; i < w.size(); ++i) {
    const double u1 = lora::uniform01(lora::random_bits(2024, 1u, 0u, i)), u2 = lora::uniform01(lora::random_bits(2024, 2u, 0u, i));
    w[i] = static_cast<float>(0.02 * std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(6.283185307179586 * u2));
  }
  return w;
}

// Quantizes the tensor as T on the GPU (Nf4Base::quantize), writes its arrays
// and the GPU's dequantized values; returns its meta.json entry.
template <class T>
std::string dump(lora::cuda::Context& ctx, const std::vector<float>& w, const std::string& dtype, bool double_quant,
                 const std::string& dir) {
  std::vector<T> host(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) host[i] = value_cast<T>(w[i]);
  const Matrix<T> W = lora::cuda::to_device(ctx, MatrixView<const T, HostSpace>(host.data(), kRows, kCols));
  lora::nf4::Options options;
  options.double_quant = double_quant;
  options.dtype = dtype;
  const auto base = lora::cuda::Nf4Base<T>::quantize(ctx, W.view(), options);
  const lora::nf4::Weight q = base.to_host();
  Matrix<T> dense(kRows, kCols);
  base.dequantize(dense.view());
  std::vector<T> dense_host(w.size());
  Backend::copy_to_host<T>(ctx, dense.view(), MatrixView<T, HostSpace>(dense_host.data(), kRows, kCols));
  std::vector<float> dequant(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) dequant[i] = value_cast<float>(dense_host[i]);

  const std::string prefix = dir + "/" + dtype + "_dq" + (double_quant ? "1" : "0") + "_";
  write(prefix + "packed.bin", q.packed);
  write(prefix + "dequant.bin", dequant);
  if (double_quant) {
    write(prefix + "absmax_q.bin", q.absmax_q);
    write(prefix + "nested_absmax.bin", q.nested_absmax);
    write(prefix + "nested_code.bin", q.nested_code);
  } else {
    write(prefix + "absmax.bin", q.absmax);
  }
  char offset[64];
  std::snprintf(offset, sizeof(offset), "%.9g", static_cast<double>(q.offset));
  return "{\"dtype\": \"" + dtype + "\", \"double_quant\": " + (double_quant ? "true" : "false") +
         ", \"prefix\": \"" + dtype + "_dq" + (double_quant ? "1" : "0") + "_\", \"offset\": " + offset + "}";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: nf4_dump <out dir>\n");
    return 2;
  }
  if (lora::cuda::device_count() == 0) {
    std::fprintf(stderr, "nf4_dump: no CUDA device visible\n");
    return 1;
  }
  try {
    const std::string dir = argv[1];
    lora::cuda::Context ctx;
    const std::vector<float> w = seeded_tensor();
    write(dir + "/input.bin", w);
    std::string cases;
    for (const bool dq : {false, true}) {
      for (const std::string& entry : {dump<float>(ctx, w, "float32", dq, dir), dump<__nv_bfloat16>(ctx, w, "bfloat16", dq, dir),
                                       dump<__half>(ctx, w, "float16", dq, dir)}) {
        cases += (cases.empty() ? "" : ",\n    ") + entry;
      }
    }
    std::FILE* meta = std::fopen((dir + "/meta.json").c_str(), "w");
    LORA_CHECK(meta != nullptr, "nf4_dump: cannot write meta.json");
    std::fprintf(meta, "{\"rows\": %lld, \"cols\": %lld, \"blocksize\": %lld, \"nested_blocksize\": %lld,\n \"cases\": [\n    %s]}\n",
                 static_cast<long long>(kRows), static_cast<long long>(kCols), static_cast<long long>(lora::nf4::kBlocksize),
                 static_cast<long long>(lora::nf4::kNestedBlocksize), cases.c_str());
    std::fclose(meta);
    std::printf("nf4_dump: %lld x %lld tensor, 6 cases written to %s\n", static_cast<long long>(kRows),
                static_cast<long long>(kCols), dir.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nf4_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}

// NF4: bitsandbytes' 4-bit NormalFloat weights (QLoRA), bit for bit.
//
// A weight of n = rows x cols values, flattened row-major, is cut into blocks
// of `blocksize` (64) values. Each block keeps its absmax (the largest |w|);
// each value keeps the 4-bit index of the nearest of the 16 NF4 code values
// (kCode) to w / absmax, two indices per byte, the first value in the high
// nibble:
//   w_i = kCode[q_i] * absmax[i / blocksize]
// Double quantization stores the absmax values themselves in 8 bits:
// absmax - offset (offset = their mean) is quantized to bitsandbytes' 8-bit
// dynamic code (kDynamicCode) in blocks of 256, each with an fp32 absmax of
// its own:
//   absmax_b = kDynamicCode[q_b] * nested_absmax[b / 256] + offset
// which brings the base to 0.516 bytes per parameter (4 + 8/64 + 32/16384 bits).
//
// Every rounding follows bitsandbytes' CUDA kernels (kQuantizeBlockwise,
// dQuantizeNF4, dQuantize, kDequantizeBlockwise), so a weight quantized
// by either side dequantizes to the same numbers:
//   - a value is normalized as w * (1 / absmax) (a float reciprocal, then a
//     multiply), and goes to the upper of two code values only when it is
//     strictly above their midpoint (the midpoint computed in double and
//     rounded to float); a block of zeros stores index 0 (0 * inf is NaN,
//     which no midpoint is below) and dequantizes to -0;
//   - the 8-bit code is searched as dQuantize does (a binary search, then
//     the nearer neighbour by float midpoints);
//   - absmax_b is a float product, rounded, then a float sum, rounded (never
//     a fused multiply-add); w_i is one float product, then rounded to the
//     type it is dequantized to.
// What can differ is the offset: bitsandbytes takes torch's mean of the fp32
// absmax values (a float reduction in torch's order); here it is their exact
// mean rounded once to float. The two agree to an ulp, and stored files carry
// the offset, so loading is exact either way (as for the 8-bit code, below).
//
// This header holds the format: the codes, the per-value rules (host and
// device), a non-owning view of a quantized weight in any memory space, and
// the host quantizer / dequantizer. base/nf4.hpp is the frozen layer built on
// it; io/nf4.hpp reads and writes it in the files transformers writes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"  // LORA_HOST_DEVICE

namespace lora::nf4 {

// The values per block of the 4-bit weight and per block of the 8-bit absmax
// (bitsandbytes' defaults on CUDA).
inline constexpr std::int64_t kBlocksize = 64;
inline constexpr std::int64_t kNestedBlocksize = 256;

// The 16 NF4 code values (bitsandbytes' get_4bit_type("nf4"), the QLoRA paper's
// quantiles of N(0, 1) normalized to [-1, 1]).
LORA_HOST_DEVICE constexpr float code_value(int i) {
  constexpr float kValues[16] = {-1.0f,
                                 -0.6961928009986877f,
                                 -0.5250730514526367f,
                                 -0.39491748809814453f,
                                 -0.28444138169288635f,
                                 -0.18477343022823334f,
                                 -0.09105003625154495f,
                                 0.0f,
                                 0.07958029955625534f,
                                 0.16093020141124725f,
                                 0.24611230194568634f,
                                 0.33791524171829224f,
                                 0.44070982933044434f,
                                 0.5626170039176941f,
                                 0.7229568362236023f,
                                 1.0f};
  return kValues[i];
}

// The boundary between code values i and i + 1: their midpoint, computed in
// double and rounded to float (the thresholds of bitsandbytes' dQuantizeNF4).
LORA_HOST_DEVICE constexpr float code_threshold(int i) {
  return static_cast<float>((static_cast<double>(code_value(i)) + static_cast<double>(code_value(i + 1))) / 2.0);
}

// The 4-bit index of x (a value already divided by its block's absmax): the
// number of thresholds x is strictly above, so a value on a midpoint goes to
// the lower code value and NaN to index 0, as dQuantizeNF4's decision tree.
LORA_HOST_DEVICE inline std::uint8_t quantize_value(float x) {
  int index = 0;
#if defined(__CUDA_ARCH__)  // the device pass only: the host compiler warns about a pragma it does not know
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) index += x > code_threshold(i) ? 1 : 0;
  return static_cast<std::uint8_t>(index);
}

// bitsandbytes' 8-bit dynamic code (functional.create_dynamic_map(signed=True,
// max_exponent_bits=7, total_bits=8)): 256 sorted fp32 values in [-1, 1] whose
// spacing grows with their magnitude (a sign, a decimal exponent in unary, a
// linear fraction). The double-quantized absmax values index into it. The
// values are those torch computes in fp32 (torch 1.13 on x86-64); torch's
// linspace rounds by its CPU vector width, so another build may differ from
// them by an ulp in a few entries. Files carry the code they were made with
// (nested_quant_map), and dequantizing uses that one.
inline constexpr float kDynamicCode[256] = {
    -0x1.fc6666p-1f, -0x1.f53332p-1f, -0x1.ee0000p-1f, -0x1.e6ccccp-1f,
    -0x1.df9998p-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.ca0000p-1f,
    -0x1.c2ccccp-1f, -0x1.bb9998p-1f, -0x1.b46666p-1f, -0x1.ad3332p-1f,
    -0x1.a60000p-1f, -0x1.9eccccp-1f, -0x1.979998p-1f, -0x1.906666p-1f,
    -0x1.893334p-1f, -0x1.820000p-1f, -0x1.7acccep-1f, -0x1.73999ap-1f,
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5e0000p-1f, -0x1.56cccep-1f,
    -0x1.4f999ap-1f, -0x1.486666p-1f, -0x1.413334p-1f, -0x1.3a0000p-1f,
    -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f,
    -0x1.160000p-1f, -0x1.0eccccp-1f, -0x1.07999ap-1f, -0x1.006666p-1f,
    -0x1.f26668p-2f, -0x1.e40000p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6664p-2f, -0x1.9c0000p-2f, -0x1.8d9998p-2f,
    -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626664p-2f, -0x1.540000p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f,
    -0x1.0c0000p-2f, -0x1.fb3334p-3f, -0x1.de6668p-3f, -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f, -0x1.880000p-3f, -0x1.6b3332p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.f00000p-4f, -0x1.b66668p-4f,
    -0x1.93d70ap-4f, -0x1.8851eap-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f,
    -0x1.65c290p-4f, -0x1.5a3d70p-4f, -0x1.4eb850p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f,
    -0x1.09999ap-4f, -0x1.fc28f4p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.a00000p-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c28ep-5f,
    -0x1.fd70a4p-6f, -0x1.cf5c26p-6f, -0x1.a147aep-6f, -0x1.733334p-6f,
    -0x1.451eb8p-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c290p-7f,
    -0x1.3e76c8p-7f, -0x1.2c0830p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f,
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f,
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d500p-11f, -0x1.3dd982p-11f,
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f,
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0.0p+0f,
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f,
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d500p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f,
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c0830p-7f, 0x1.3e76c8p-7f, 0x1.75c290p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451eb8p-6f, 0x1.733334p-6f,
    0x1.a147aep-6f, 0x1.cf5c26p-6f, 0x1.fd70a4p-6f, 0x1.15c28ep-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f,
    0x1.88f5c2p-5f, 0x1.a00000p-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f4p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f,
    0x1.4eb850p-4f, 0x1.5a3d70p-4f, 0x1.65c290p-4f, 0x1.7147aep-4f,
    0x1.7ccccep-4f, 0x1.8851eap-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.f00000p-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f,
    0x1.6b3332p-3f, 0x1.880000p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6668p-3f, 0x1.fb3334p-3f, 0x1.0c0000p-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.540000p-2f,
    0x1.626664p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f,
    0x1.9c0000p-2f, 0x1.aa6664p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e40000p-2f, 0x1.f26668p-2f, 0x1.006666p-1f,
    0x1.07999ap-1f, 0x1.0eccccp-1f, 0x1.160000p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3a0000p-1f,
    0x1.413334p-1f, 0x1.486666p-1f, 0x1.4f999ap-1f, 0x1.56cccep-1f,
    0x1.5e0000p-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f,
    0x1.7acccep-1f, 0x1.820000p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.979998p-1f, 0x1.9eccccp-1f, 0x1.a60000p-1f, 0x1.ad3332p-1f,
    0x1.b46666p-1f, 0x1.bb9998p-1f, 0x1.c2ccccp-1f, 0x1.ca0000p-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df9998p-1f, 0x1.e6ccccp-1f,
    0x1.ee0000p-1f, 0x1.f53332p-1f, 0x1.fc6666p-1f, 0x1.p+0f,
};

// The index of x (already divided by its block's absmax) in a sorted 256-entry
// code: dQuantize's binary search over the upper 255 entries, then the nearer
// of the two neighbours by their float midpoint (x on a midpoint stays with
// the entry the search ended on).
LORA_HOST_DEVICE inline std::uint8_t quantize_dynamic(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float value = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > value) {
      lower_pivot = pivot;
      lower = value;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = value;
      pivot -= step;
    }
    value = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > value) return static_cast<std::uint8_t>(x > (upper + value) * 0.5f ? upper_pivot : pivot);
  return static_cast<std::uint8_t>(x < (lower + value) * 0.5f ? lower_pivot : pivot);
}

namespace detail {
// a * b + c with two roundings, never contracted into a fused multiply-add.
LORA_HOST_DEVICE inline float mul_add_unfused(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  volatile float product = a * b;  // a store the compiler cannot fuse across
  return product + c;
#endif
}
}  // namespace detail

// A quantized weight in one memory space, not owned: what the backends'
// kernels read. rows x cols is the weight's shape as stored (d_out x d_in, or
// d_in x d_out with fan_in_fan_out). Either `absmax` (fp32 per block) or the
// double-quantized trio (`absmax_q`, `nested_absmax`, `nested_code`) is set.
template <class Space = HostSpace>
struct View {
  const std::uint8_t* packed = nullptr;      // (n + 1) / 2 bytes
  const float* absmax = nullptr;             // blocks() values, or null when double-quantized
  const std::uint8_t* absmax_q = nullptr;    // blocks() indices into nested_code
  const float* nested_absmax = nullptr;      // one per nested block of absmax_q
  const float* nested_code = nullptr;        // 256 values
  float offset = 0.0f;
  std::int64_t rows = 0, cols = 0;
  std::int64_t blocksize = kBlocksize, nested_blocksize = kNestedBlocksize;

  LORA_HOST_DEVICE std::int64_t numel() const { return rows * cols; }
  LORA_HOST_DEVICE std::int64_t blocks() const { return (numel() + blocksize - 1) / blocksize; }
  LORA_HOST_DEVICE bool nested() const { return absmax == nullptr; }

  // absmax of block b (dequantized when double-quantized).
  LORA_HOST_DEVICE float block_absmax(std::int64_t b) const {
    if (!nested()) return absmax[b];
    return detail::mul_add_unfused(nested_code[absmax_q[b]], nested_absmax[b / nested_blocksize], offset);
  }
  // The 4-bit index of flat element i.
  LORA_HOST_DEVICE int index(std::int64_t i) const {
    const std::uint8_t byte = packed[i / 2];
    return (i % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
  }
};

// The options of quantize().
struct Options {
  std::int64_t blocksize = kBlocksize;  // 64 as bitsandbytes on CUDA; any even size >= 2
  bool double_quant = true;             // bnb_4bit_use_double_quant
  std::int64_t nested_blocksize = kNestedBlocksize;
  // The dtype the weight is kept in outside (recorded for the files:
  // quant_state.dtype, what dequantize gives back): "float32", "bfloat16" or
  // "float16". The values handed to quantize() are already in float.
  std::string dtype = "float32";
};

// A quantized weight in host memory, laid out as bitsandbytes keeps it.
struct Weight {
  std::int64_t rows = 0, cols = 0;
  std::int64_t blocksize = kBlocksize;
  std::string dtype = "float32";
  std::vector<std::uint8_t> packed;  // (n + 1) / 2 bytes, the first value of each pair in the high nibble
  std::vector<float> absmax;         // per block, when not double-quantized
  // Double quantization:
  std::vector<std::uint8_t> absmax_q;  // per block
  std::vector<float> nested_absmax;    // per nested block
  std::vector<float> nested_code;      // 256 values (kDynamicCode)
  std::int64_t nested_blocksize = kNestedBlocksize;
  float offset = 0.0f;

  std::int64_t numel() const { return rows * cols; }
  std::int64_t blocks() const { return (numel() + blocksize - 1) / blocksize; }
  bool nested() const { return !absmax_q.empty(); }
  // Bytes of quantized data (the packed values and the absmax statistics).
  std::size_t bytes() const {
    return packed.size() + absmax.size() * sizeof(float) + absmax_q.size() +
           (nested_absmax.size() + nested_code.size()) * sizeof(float);
  }
  View<HostSpace> view() const {
    View<HostSpace> v;
    v.packed = packed.data();
    v.absmax = nested() ? nullptr : absmax.data();
    v.absmax_q = nested() ? absmax_q.data() : nullptr;
    v.nested_absmax = nested() ? nested_absmax.data() : nullptr;
    v.nested_code = nested() ? nested_code.data() : nullptr;
    v.offset = offset;
    v.rows = rows;
    v.cols = cols;
    v.blocksize = blocksize;
    v.nested_blocksize = nested_blocksize;
    return v;
  }
};

// Checks that a weight is whole: sizes that agree with its shape and block
// sizes, indices inside the nested code. `what` names it in the error (a
// tensor name when it came from a file).
inline void check(const Weight& w, const std::string& what) {
  LORA_CHECK(w.rows >= 1 && w.cols >= 1, what << ": NF4 weight: expected a non-empty shape, found [" << w.rows << ", "
                                              << w.cols << "]");
  LORA_CHECK(w.blocksize >= 2 && w.blocksize % 2 == 0,
             what << ": NF4 weight: blocksize must be even and at least 2, found " << w.blocksize);
  const auto n = static_cast<std::size_t>(w.numel()), blocks = static_cast<std::size_t>(w.blocks());
  LORA_CHECK(w.packed.size() == (n + 1) / 2,
             what << ": NF4 weight: " << w.rows << " x " << w.cols << " values pack into " << (n + 1) / 2
                  << " bytes, found " << w.packed.size());
  if (!w.nested()) {
    LORA_CHECK(w.absmax.size() == blocks, what << ": NF4 weight: expected " << blocks << " absmax values (blocks of "
                                               << w.blocksize << "), found " << w.absmax.size());
    return;
  }
  LORA_CHECK(w.absmax.empty(), what << ": NF4 weight: both fp32 and 8-bit absmax values are set");
  LORA_CHECK(w.absmax_q.size() == blocks, what << ": NF4 weight: expected " << blocks << " 8-bit absmax values (blocks of "
                                               << w.blocksize << "), found " << w.absmax_q.size());
  LORA_CHECK(w.nested_blocksize >= 1, what << ": NF4 weight: nested blocksize must be positive, found "
                                           << w.nested_blocksize);
  const std::size_t nested_blocks =
      (blocks + static_cast<std::size_t>(w.nested_blocksize) - 1) / static_cast<std::size_t>(w.nested_blocksize);
  LORA_CHECK(w.nested_absmax.size() == nested_blocks,
             what << ": NF4 weight: expected " << nested_blocks << " nested absmax values (blocks of "
                  << w.nested_blocksize << "), found " << w.nested_absmax.size());
  LORA_CHECK(w.nested_code.size() == 256,
             what << ": NF4 weight: expected a 256-value nested code, found " << w.nested_code.size());
}

// The 4-bit half of bitsandbytes' quantize_4bit(quant_type="nf4"): rows x
// cols values (row stride `stride`, flattened row-major) in blocks of
// `blocksize`, each block's absmax into absmax[b] and its 4-bit indices into
// packed ((n + 1) / 2 bytes, written whole). Values are taken as float (a
// bf16 / fp16 value is the float it is exactly; a double is rounded to float).
template <class T>
void quantize_blocks(const T* w, std::int64_t rows, std::int64_t cols, std::int64_t stride, std::int64_t blocksize,
                     std::uint8_t* packed, float* absmax) {
  const std::int64_t n = rows * cols, blocks = (n + blocksize - 1) / blocksize;
  const auto at = [&](std::int64_t i) { return static_cast<float>(w[(i / cols) * stride + i % cols]); };
  std::fill(packed, packed + (n + 1) / 2, std::uint8_t{0});
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t first = b * blocksize, last = std::min(n, first + blocksize);
    float m = 0.0f;
    for (std::int64_t i = first; i < last; ++i) m = std::fmax(m, std::fabs(at(i)));
    absmax[b] = m;
    const float reciprocal = 1.0f / m;
    for (std::int64_t i = first; i < last; ++i) {
      const std::uint8_t q = quantize_value(at(i) * reciprocal);
      packed[i / 2] |= static_cast<std::uint8_t>(i % 2 == 0 ? q << 4 : q);
    }
    // An odd n pads the last byte with a zero value (as bitsandbytes' kernel
    // loads it), which the low nibble stores.
    if (last == n && n % 2 == 1) packed[n / 2] |= quantize_value(0.0f * reciprocal);
  }
}

// The 8-bit half (double quantization, bitsandbytes' quantize_blockwise of
// absmax - mean with the dynamic code): fills w.offset, w.absmax_q,
// w.nested_absmax and w.nested_code from the fp32 block absmax values, and
// clears w.absmax.
inline void quantize_absmax(const std::vector<float>& absmax, std::int64_t nested_blocksize, Weight& w) {
  LORA_CHECK(nested_blocksize >= 1, "nf4::quantize_absmax: nested_blocksize must be positive, found " << nested_blocksize);
  const auto blocks = static_cast<std::int64_t>(absmax.size());
  double sum = 0.0;
  for (float a : absmax) sum += a;
  w.offset = blocks == 0 ? 0.0f : static_cast<float>(sum / static_cast<double>(blocks));
  w.nested_blocksize = nested_blocksize;
  w.nested_code.assign(std::begin(kDynamicCode), std::end(kDynamicCode));
  w.absmax_q.assign(absmax.size(), 0);
  const std::int64_t nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
  w.nested_absmax.assign(static_cast<std::size_t>(nested_blocks), 0.0f);
  for (std::int64_t nb = 0; nb < nested_blocks; ++nb) {
    const std::int64_t first = nb * nested_blocksize, last = std::min(blocks, first + nested_blocksize);
    float m = 0.0f;
    for (std::int64_t b = first; b < last; ++b) m = std::fmax(m, std::fabs(absmax[static_cast<std::size_t>(b)] - w.offset));
    w.nested_absmax[static_cast<std::size_t>(nb)] = m;
    const float reciprocal = 1.0f / m;
    for (std::int64_t b = first; b < last; ++b) {
      w.absmax_q[static_cast<std::size_t>(b)] =
          quantize_dynamic(kDynamicCode, (absmax[static_cast<std::size_t>(b)] - w.offset) * reciprocal);
    }
  }
  w.absmax.clear();
}

// The arguments of a backend's nf4_quantize_blocks (both backends check the same):
// an even blocksize of at least 2, and the output buffers present unless W is empty.
inline void check_quantize_blocks_args(std::int64_t n, std::int64_t blocksize, const std::uint8_t* packed,
                                       const float* absmax) {
  LORA_CHECK(blocksize >= 2 && blocksize % 2 == 0,
             "nf4_quantize_blocks: blocksize must be even and at least 2, found " << blocksize);
  LORA_CHECK(n == 0 || (packed != nullptr && absmax != nullptr),
             "nf4_quantize_blocks: packed and absmax must point to buffers of (n + 1) / 2 bytes and n / blocksize "
             "floats");
}

// Checks quantize()'s arguments; `call` names the caller in the error.
inline void check_options(const char* call, std::int64_t rows, std::int64_t cols, std::int64_t stride,
                          const Options& options) {
  LORA_CHECK(rows >= 1 && cols >= 1 && stride >= cols,
             call << ": expected a non-empty rows x cols weight with stride >= cols, found " << rows << " x " << cols
                  << ", stride " << stride);
  LORA_CHECK(options.blocksize >= 2 && options.blocksize % 2 == 0,
             call << ": blocksize must be even and at least 2, found " << options.blocksize);
  LORA_CHECK(options.nested_blocksize >= 1,
             call << ": nested_blocksize must be positive, found " << options.nested_blocksize);
  LORA_CHECK(options.dtype == "float32" || options.dtype == "bfloat16" || options.dtype == "float16",
             call << ": dtype must be \"float32\", \"bfloat16\" or \"float16\", found \"" << options.dtype << "\"");
}

// Quantizes a rows x cols weight (row stride `stride`) as bitsandbytes'
// quantize_4bit(quant_type="nf4", blocksize, compress_statistics =
// double_quant) does, on the host.
template <class T>
Weight quantize(const T* w, std::int64_t rows, std::int64_t cols, std::int64_t stride, const Options& options = {}) {
  check_options("nf4::quantize", rows, cols, stride, options);
  Weight out;
  out.rows = rows;
  out.cols = cols;
  out.blocksize = options.blocksize;
  out.dtype = options.dtype;
  out.packed.resize(static_cast<std::size_t>((rows * cols + 1) / 2));
  out.absmax.resize(static_cast<std::size_t>(out.blocks()));
  quantize_blocks(w, rows, cols, stride, options.blocksize, out.packed.data(), out.absmax.data());
  if (options.double_quant) quantize_absmax(std::vector<float>(out.absmax), options.nested_blocksize, out);
  return out;
}

// Rows [first_row, first_row + count) of the dequantized weight into `out`
// (count x cols, row stride ld), as float or double: each value is the float
// kCode[q] * absmax, then converted (exactly, for double). It runs over the
// whole W twice per training step of a quantized base, so each run of a row
// inside one block (a segment) takes its absmax once and fills a 16-entry
// table of kCode[q] * absmax in T; a value is then one table lookup per
// nibble (the same float product and conversion, made once per code value).
template <class T>
void dequantize_rows(const View<HostSpace>& w, std::int64_t first_row, std::int64_t count, T* out, std::int64_t ld) {
  LORA_CHECK(first_row >= 0 && count >= 0 && first_row + count <= w.rows && ld >= w.cols,
             "nf4::dequantize_rows: rows [" << first_row << ", " << first_row + count << ") with ld " << ld
                                            << " of a " << w.rows << " x " << w.cols << " weight");
  T table[16];
  for (std::int64_t r = 0; r < count; ++r) {
    T* row = out + r * ld;
    std::int64_t i = (first_row + r) * w.cols;  // the flat index of row[0]
    const std::int64_t row_end = i + w.cols;
    while (i < row_end) {
      const std::int64_t block = i / w.blocksize;
      const std::int64_t segment_end = std::min(row_end, (block + 1) * w.blocksize);
      const float absmax = w.block_absmax(block);
      for (int q = 0; q < 16; ++q) table[q] = static_cast<T>(code_value(q) * absmax);
      const std::uint8_t* byte = w.packed + i / 2;
      T* value = row + (i - (row_end - w.cols));
      if (i % 2 == 1) {  // the segment starts on a low nibble
        *value++ = table[*byte++ & 0x0F];
        ++i;
      }
      for (; i + 2 <= segment_end; i += 2, ++byte, value += 2) {
        value[0] = table[*byte >> 4];
        value[1] = table[*byte & 0x0F];
      }
      if (i < segment_end) {  // and ends on a high nibble
        *value = table[*byte >> 4];
        ++i;
      }
    }
  }
}

// The whole weight dequantized (rows x cols, float or double).
template <class T = float>
std::vector<T> dequantize(const Weight& w) {
  std::vector<T> out(static_cast<std::size_t>(w.numel()));
  dequantize_rows(w.view(), 0, w.rows, out.data(), w.cols);
  return out;
}

}  // namespace lora::nf4

// The training steps every benchmark measures, written once so that the
// speed benchmark (bench_linear) and the memory benchmark (bench_memory) run
// exactly the same work:
//   LoraWorkload       lora::cpu::Linear<float> forward + backward + AdamW over A and B
//   Nf4LoraWorkload    the same step over an NF4 copy of the same W (QLoRA: lora::Nf4Base,
//                      blocks of 64, double quantization)
//   FullFineTune       the same layer with W trainable: + dL_dW and AdamW over W
//   FrozenGemms        y = x W^T and dL_dx = dL_dy W alone: the floor of a LoRA step
// dL_dy is a fixed random tensor, as if handed back by the next layer; dL_dx is
// always computed (the layer sits inside a network). No bias, as in the peer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <lora/lora.hpp>

namespace lora::bench {

using Mat = cpu::Matrix<float>;
using CView = MatrixView<const float, HostSpace>;

// One layer shape: d_in = d_out = d, n tokens, rank r, LoRA dropout p.
struct Shape {
  std::int64_t d = 0;
  std::int64_t n = 0;
  int r = 0;
  double dropout = 0.0;

  // Multiply-adds x2 of the frozen GEMMs and of the LoRA path (the GEMMs only;
  // Adam and dropout are elementwise and not counted).
  double base_gemm_flops() const { return 2.0 * static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(d); }
  // x A^T, xa B^T in forward; dL_dy B, dL_dB, dL_dA, g A in backward: each 2 N d r.
  double lora_gemm_flops() const { return 2.0 * static_cast<double>(n) * static_cast<double>(d) * r; }
  double forward_flops() const { return base_gemm_flops() + 2 * lora_gemm_flops(); }
  double backward_flops() const { return base_gemm_flops() + 4 * lora_gemm_flops(); }

  std::string name() const {
    return "d" + std::to_string(d) + "_N" + std::to_string(n) + "_r" + std::to_string(r);
  }
};

// Cheap deterministic fill in [-scale, scale) (splitmix64): benchmark data
// only, so it need not come from the library's RNG, just be fast to make.
// Value i depends on (seed, i) alone, so a matrix can be made piece by piece:
// fill_uniform_at(p, count, seed, first, scale) writes values [first, first + count).
inline void fill_uniform_at(float* p, std::int64_t count, std::uint64_t seed, std::int64_t first, float scale) {
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1 + static_cast<std::uint64_t>(first) * 0x9E3779B97F4A7C15ull;
  for (std::int64_t i = 0; i < count; ++i) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    p[i] = scale * (static_cast<float>(z >> 40) * 0x1p-23f - 1.0f);
  }
}
inline void fill_uniform(Mat& m, std::uint64_t seed, float scale) { fill_uniform_at(m.data(), m.size(), seed, 0, scale); }

// The frozen W of every workload: d x d, PyTorch's nn.Linear init range.
constexpr std::uint64_t kWeightSeed = 3;
inline float weight_scale(const Shape& s) { return 1.0f / std::sqrt(static_cast<float>(s.d)); }

// The NF4 copy of that W (blocks of 64, double quantization), quantized 256
// rows at a time so that the dense W never exists whole: the process's peak
// memory is then that of a base loaded already quantized (from a file).
inline nf4::Weight quantized_weight(const Shape& s) {
  const nf4::Options options;  // bitsandbytes' defaults: blocksize 64, double quantization
  nf4::Weight w;
  w.rows = s.d;
  w.cols = s.d;
  w.blocksize = options.blocksize;
  w.packed.resize(static_cast<std::size_t>((w.numel() + 1) / 2));
  std::vector<float> absmax(static_cast<std::size_t>(w.blocks()));
  constexpr std::int64_t kRowsPerChunk = 256;  // 256 d values: whole 64-value blocks for any d
  std::vector<float> chunk(static_cast<std::size_t>(kRowsPerChunk * s.d));
  for (std::int64_t r = 0; r < s.d; r += kRowsPerChunk) {
    const std::int64_t rows = std::min(kRowsPerChunk, s.d - r), first = r * s.d;
    fill_uniform_at(chunk.data(), rows * s.d, kWeightSeed, first, weight_scale(s));
    nf4::quantize_blocks(chunk.data(), rows, s.d, s.d, w.blocksize, w.packed.data() + first / 2,
                         absmax.data() + first / w.blocksize);
  }
  nf4::quantize_absmax(absmax, options.nested_blocksize, w);
  return w;
}

// What the caller of a layer holds in either mode: input, output, and the
// gradients flowing in and out. Same bytes for LoRA and full fine-tuning.
struct Activations {
  Mat x, y, dL_dy, dL_dx;
  explicit Activations(const Shape& s) : x(s.n, s.d), y(s.n, s.d), dL_dy(s.n, s.d), dL_dx(s.n, s.d) {
    fill_uniform(x, 1, 1.0f);
    fill_uniform(dL_dy, 2, 1e-3f);
  }
  std::size_t bytes() const { return x.bytes() + y.bytes() + dL_dy.bytes() + dL_dx.bytes(); }
};

// The frozen base of a LoRA workload, two kinds with one interface:
// DenseFrozen owns the dense W the layer borrows; Nf4Frozen owns nothing (the
// layer's Nf4Base holds the 4-bit W, made from the same values).
struct DenseFrozen {
  using Layer = cpu::Linear<float>;
  Mat W;
  explicit DenseFrozen(const Shape& s) : W(s.d, s.d) { fill_uniform(W, kWeightSeed, weight_scale(s)); }
  Layer make_layer(cpu::Context& ctx, const Shape&, const Config& config) {
    return Layer(ctx, W.view(), CView(), config);
  }
};
struct Nf4Frozen {
  using Layer = Linear<float, cpu::Backend, cpu::Nf4Base<float>>;
  explicit Nf4Frozen(const Shape&) {}
  Layer make_layer(cpu::Context& ctx, const Shape& s, const Config& config) {
    return Layer(cpu::Nf4Base<float>(ctx, quantized_weight(s)), config);
  }
};

// A frozen W (d x d) with a LoRA adapter (DoRA with kDora), trained by AdamW.
// Holds a pointer to its own context: construct in place, never move.
template <class Frozen, bool kDora = false>
class BasicLoraWorkload {
 public:
  explicit BasicLoraWorkload(const Shape& s)
      : shape_(s), io_(s), frozen_(s), layer_(frozen_.make_layer(ctx_, s, config(s))),
        adam_(ctx_, AdamOptions::adamw(1e-4)) {
    adam_.add_group(layer_.parameters());
    // B = 0 would let a sloppy kernel skip work; give it values as after training.
    Mat b(s.d, s.r);
    fill_uniform(b, 4, 1e-2f);
    auto B = layer_.lora_B().value;
    std::copy(b.data(), b.data() + b.size(), B.data);
  }
  BasicLoraWorkload(const BasicLoraWorkload&) = delete;
  BasicLoraWorkload& operator=(const BasicLoraWorkload&) = delete;

  void forward() { layer_.forward(io_.x.view(), io_.y.view(), Mode::train); }
  void backward() { layer_.backward(io_.x.view(), io_.dL_dy.view(), io_.dL_dx.view(), GradMode::overwrite); }
  void optimizer_step() { adam_.step(); }
  void step() {
    forward();
    backward();
    optimizer_step();
  }

  // The library's own report, with the optimizer's state added.
  MemoryReport memory() const {
    MemoryReport report = layer_.memory();
    report.optimizer_bytes = adam_.state_bytes();
    return report;
  }
  // Bytes of the frozen W per weight: 4 dense, ~0.516 in NF4 with double quantization.
  double base_bytes_per_parameter() const {
    return static_cast<double>(layer_.base().bytes()) / static_cast<double>(layer_.base().parameters());
  }
  std::int64_t trainable_parameters() const { return layer_.trainable_parameters(); }
  std::size_t caller_bytes() const { return io_.bytes(); }
  const Shape& shape() const { return shape_; }

 private:
  static Config config(const Shape& s) {
    Config c;
    c.r = s.r;
    c.alpha = 2.0 * s.r;
    c.dropout = s.dropout;
    c.seed = 7;
    c.use_dora = kDora;
    return c;
  }

  Shape shape_;
  cpu::Context ctx_;
  Activations io_;
  Frozen frozen_;
  typename Frozen::Layer layer_;
  cpu::Adam<float> adam_;
};
using LoraWorkload = BasicLoraWorkload<DenseFrozen>;
using Nf4LoraWorkload = BasicLoraWorkload<Nf4Frozen>;
using DoraWorkload = BasicLoraWorkload<DenseFrozen, true>;

// The same layer, fully fine-tuned: W trains, so backward adds
//   dL_dW = dL_dy^T x        (d_out x d_in) = (d_out x N)(N x d_in)
// and AdamW keeps two moments of W.
class FullFineTune {
 public:
  explicit FullFineTune(const Shape& s)
      : shape_(s), io_(s), W_(s.d, s.d), dL_dW_(s.d, s.d), adam_(ctx_, AdamOptions::adamw(1e-4)) {
    fill_uniform(W_, kWeightSeed, weight_scale(s));
    adam_.add_group({Parameter<float>{W_.view(), dL_dW_.view(), "W"}});
  }
  FullFineTune(const FullFineTune&) = delete;
  FullFineTune& operator=(const FullFineTune&) = delete;

  void step() {
    using B = cpu::Backend;
    // y = x W^T                       (N x d_out) = (N x d_in)(d_in x d_out)
    B::gemm<float, float>(ctx_, Op::N, Op::T, 1.0, io_.x.view(), W_.view(), 0.0, io_.y.view());
    // dL_dx = dL_dy W                 (N x d_in) = (N x d_out)(d_out x d_in)
    B::gemm<float, float>(ctx_, Op::N, Op::N, 1.0, io_.dL_dy.view(), W_.view(), 0.0, io_.dL_dx.view());
    // dL_dW = dL_dy^T x               (d_out x d_in) = (d_out x N)(N x d_in)
    B::gemm<float, float>(ctx_, Op::T, Op::N, 1.0, io_.dL_dy.view(), io_.x.view(), 0.0, dL_dW_.view());
    adam_.step();
  }

  MemoryReport memory() const {
    MemoryReport report;
    report.parameter_bytes = W_.bytes();
    report.gradient_bytes = dL_dW_.bytes();
    report.optimizer_bytes = adam_.state_bytes();
    return report;  // no cache of its own: x is the caller's
  }
  std::int64_t trainable_parameters() const { return W_.size(); }
  std::size_t caller_bytes() const { return io_.bytes(); }
  const Shape& shape() const { return shape_; }

 private:
  Shape shape_;
  cpu::Context ctx_;
  Activations io_;
  Mat W_, dL_dW_;
  cpu::Adam<float> adam_;
};

// The two GEMMs a LoRA step cannot avoid (W needs no gradient).
class FrozenGemms {
 public:
  explicit FrozenGemms(const Shape& s) : shape_(s), io_(s), W_(s.d, s.d) {
    fill_uniform(W_, kWeightSeed, weight_scale(s));
  }
  void step() {
    using B = cpu::Backend;
    B::gemm<float, float>(ctx_, Op::N, Op::T, 1.0, io_.x.view(), W_.view(), 0.0, io_.y.view());
    B::gemm<float, float>(ctx_, Op::N, Op::N, 1.0, io_.dL_dy.view(), W_.view(), 0.0, io_.dL_dx.view());
  }
  const Shape& shape() const { return shape_; }

 private:
  Shape shape_;
  cpu::Context ctx_;
  Activations io_;
  Mat W_;
};

}  // namespace lora::bench

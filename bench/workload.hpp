// The training steps every benchmark measures, written once so that the
// speed benchmark (bench_linear) and the memory benchmark (bench_memory) run
// exactly the same work:
//   LoraWorkload       lora::cpu::Linear<float> forward + backward + AdamW over A and B
//   FullFineTune       the same layer with W trainable: + dL_dW and AdamW over W
//   FrozenGemms        y = x W^T and dL_dx = dL_dy W alone: the floor of a LoRA step
// dL_dy is a fixed random tensor, as if handed back by the next layer; dL_dx is
// always computed (the layer sits inside a network). No bias, as in the peer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

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
inline void fill_uniform(Mat& m, std::uint64_t seed, float scale) {
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  float* p = m.data();
  for (std::int64_t i = 0; i < m.size(); ++i) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    p[i] = scale * (static_cast<float>(z >> 40) * 0x1p-23f - 1.0f);
  }
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

// A frozen W (d x d, PyTorch's nn.Linear init range) with a LoRA adapter.
// Holds a pointer to its own context: construct in place, never move.
class LoraWorkload {
 public:
  explicit LoraWorkload(const Shape& s)
      : shape_(s), io_(s), W_(s.d, s.d), layer_(ctx_, W_.view(), CView(), config(s)), adam_(ctx_, AdamOptions::adamw(1e-4)) {
    fill_uniform(W_, 3, 1.0f / std::sqrt(static_cast<float>(s.d)));
    adam_.add_group(layer_.parameters());
    // B = 0 would let a sloppy kernel skip work; give it values as after training.
    Mat b(s.d, s.r);
    fill_uniform(b, 4, 1e-2f);
    auto B = layer_.lora_B().value;
    std::copy(b.data(), b.data() + b.size(), B.data);
  }
  LoraWorkload(const LoraWorkload&) = delete;
  LoraWorkload& operator=(const LoraWorkload&) = delete;

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
    return c;
  }

  Shape shape_;
  cpu::Context ctx_;
  Activations io_;
  Mat W_;
  cpu::Linear<float> layer_;
  cpu::Adam<float> adam_;
};

// The same layer, fully fine-tuned: W trains, so backward adds
//   dL_dW = dL_dy^T x        (d_out x d_in) = (d_out x N)(N x d_in)
// and AdamW keeps two moments of W.
class FullFineTune {
 public:
  explicit FullFineTune(const Shape& s)
      : shape_(s), io_(s), W_(s.d, s.d), dL_dW_(s.d, s.d), adam_(ctx_, AdamOptions::adamw(1e-4)) {
    fill_uniform(W_, 3, 1.0f / std::sqrt(static_cast<float>(s.d)));
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
    fill_uniform(W_, 3, 1.0f / std::sqrt(static_cast<float>(s.d)));
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

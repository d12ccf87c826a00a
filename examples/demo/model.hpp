// A small character-level transformer (GPT-2 shape: pre-norm blocks of
// causal self-attention and a ReLU MLP). The network owns its tensors and runs
// its own graph; its linear layers are the frozen bases of a lora::Model, under
// PyTorch-style module names ("layers.0.attn.qkv_proj", ..., "lm_head"), so
// adapters attach to it by a PEFT LoraConfig and every forward applies the
// adapters that model has active (none: the base alone). Adding, switching,
// training or removing an adapter never writes W; only merging does.
//
// TinyLM<T> keeps each W dense (lora::DenseBase over the network's own
// tensor); TinyLM<T, lora::cpu::Nf4Base<T>> is the QLoRA network: each linear
// layer's W quantized to NF4 when the network is built, the dense copy freed.
#pragma once

#include <cmath>
#include <cstdint>
#include <lora/model.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.hpp"

namespace demo {

struct ModelConfig {
  int vocab = 0;
  int d_model = 64;
  int heads = 4;
  int layers = 1;
  int context = 64;  // the longest sequence (positions 0 .. context - 1)
  int d_ff() const { return 4 * d_model; }
};

template <class T, class Base = lora::cpu::DenseBase<T>>
class TinyLM {
 public:
  using Matrix = lora::cpu::Matrix<T>;
  using Lora = lora::Model<T, lora::cpu::Backend, Base>;  // the linear layers' frozen W and the adapters on them
  static constexpr bool kDenseBase = std::is_same_v<Base, lora::cpu::DenseBase<T>>;

  // How a fresh model fills a tensor (GPT-2's init): N(0, 0.02^2); the
  // projections into the residual stream N(0, (0.02 / sqrt(2 layers))^2);
  // layer-norm gains 1 and biases 0.
  enum class Fill { normal, residual, ones, zeros };

  // Tensor names and shapes, in storage order (PyTorch names, W as d_out x d_in).
  struct TensorSpec {
    std::string name;
    std::int64_t rows, cols;
    Fill fill;
  };
  static std::vector<TensorSpec> layout(const ModelConfig& c) {
    const std::int64_t d = c.d_model, f = c.d_ff();
    std::vector<TensorSpec> specs = {{"tok_emb.weight", c.vocab, d, Fill::normal},
                                     {"pos_emb.weight", c.context, d, Fill::normal}};
    for (int l = 0; l < c.layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      specs.insert(specs.end(), {{p + "ln1.weight", 1, d, Fill::ones},
                                 {p + "ln1.bias", 1, d, Fill::zeros},
                                 {p + "attn.qkv_proj.weight", 3 * d, d, Fill::normal},
                                 {p + "attn.out_proj.weight", d, d, Fill::residual},
                                 {p + "ln2.weight", 1, d, Fill::ones},
                                 {p + "ln2.bias", 1, d, Fill::zeros},
                                 {p + "mlp.fc_in.weight", f, d, Fill::normal},
                                 {p + "mlp.fc_out.weight", d, f, Fill::residual}});
    }
    specs.insert(specs.end(), {{"ln_f.weight", 1, d, Fill::ones},
                               {"ln_f.bias", 1, d, Fill::zeros},
                               {"lm_head.weight", c.vocab, d, Fill::normal}});
    return specs;
  }

  // A fresh model, every random number drawn from lora's RNG at (seed,
  // stream = tensor index).
  TinyLM(lora::cpu::Context& ctx, const ModelConfig& config, std::uint64_t seed)
      : ctx_(&ctx), config_(config), lora_(ctx) {
    const auto specs = layout(config);
    std::vector<Matrix> values;
    for (std::size_t i = 0; i < specs.size(); ++i) {
      Matrix m(specs[i].rows, specs[i].cols);
      const Fill fill = specs[i].fill;
      const double sigma = fill == Fill::residual ? 0.02 / std::sqrt(2.0 * config.layers) : 0.02;
      for (std::int64_t k = 0; k < m.size(); ++k) {
        const double normal =
            lora::standard_normal(seed, static_cast<std::uint32_t>(i), 0, static_cast<std::uint64_t>(k));
        m.data()[k] = fill == Fill::ones ? T(1) : fill == Fill::zeros ? T(0) : static_cast<T>(sigma * normal);
      }
      values.push_back(std::move(m));
    }
    init(std::move(values));
  }

  // A model from given tensors (a cached base, or a copy for full fine-tuning),
  // in layout() order and shapes.
  TinyLM(lora::cpu::Context& ctx, const ModelConfig& config, std::vector<Matrix> values)
      : ctx_(&ctx), config_(config), lora_(ctx) {
    const auto specs = layout(config);
    LORA_CHECK(values.size() == specs.size(),
               "TinyLM: expected " << specs.size() << " tensors, found " << values.size());
    for (std::size_t i = 0; i < specs.size(); ++i)
      lora::check_shape(values[i].view(), specs[i].rows, specs[i].cols, specs[i].name.c_str());
    init(std::move(values));
  }

  // The lora::Model borrows views of tensors_: the network stays where it is.
  TinyLM(const TinyLM&) = delete;
  TinyLM& operator=(const TinyLM&) = delete;

  const ModelConfig& config() const { return config_; }
  const std::vector<TensorSpec>& specs() const { return specs_; }
  std::vector<Matrix>& tensors() { return tensors_; }
  const std::vector<Matrix>& tensors() const { return tensors_; }
  std::vector<Matrix> clone_tensors() const {
    std::vector<Matrix> copy;
    for (const Matrix& m : tensors_) copy.push_back(m.clone());
    return copy;
  }
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (const Matrix& m : tensors_) n += m.size();
    if constexpr (!kDenseBase) {
      for (const auto* set : linears_) n += set->base().parameters();
    }
    return n;
  }

  // The linear layers: each W under its module name (a frozen base), and
  // the adapters attached to them. forward() applies its active adapters.
  Lora& lora() { return lora_; }
  const Lora& lora() const { return lora_; }

  // logits ((B t) x vocab) for `batch` sequences of t tokens each, every
  // linear layer with lora()'s active adapters. Mode::train keeps what
  // backward needs (each layer's ForwardState among it).
  void forward(const int* tokens, int batch, int t, lora::Mode mode) {
    LORA_CHECK(t >= 1 && t <= config_.context, "forward: t = " << t << ", expected 1 <= t <= " << config_.context);
    const std::int64_t n = static_cast<std::int64_t>(batch) * t;
    tokens_.assign(tokens, tokens + n);
    t_ = t;
    resize(n);
    embedding_forward<T>(tensors_[0].view(), tensors_[1].view(), tokens, t, blocks_[0].x.view());
    for (int l = 0; l < config_.layers; ++l) {
      BlockCache& c = blocks_[static_cast<std::size_t>(l)];
      const View<T> x_out =
          l + 1 < config_.layers ? blocks_[static_cast<std::size_t>(l) + 1].x.view() : x_final_.view();
      auto w = [&](BlockTensor k) { return ConstView<T>(tensors_[block_tensor(l, k)].view()); };
      // x_mid = x + out_proj(attention(qkv_proj(ln1(x))))
      layer_norm_forward<T>(c.x.view(), w(kLn1Gain), w(kLn1Bias), c.ln1.view(), c.ln1_xhat.view(), c.ln1_rstd.view());
      linear_forward(linear(l, kQkvLinear), mode, c.ln1.view(), c.qkv.view());
      attention_forward<T>(*ctx_, c.qkv.view(), t, config_.heads, c.probs.view(), c.att.view());
      linear_forward(linear(l, kOutLinear), mode, c.att.view(), c.x_mid.view());
      Backend::add_scaled(*ctx_, 1.0, ConstView<T>(c.x.view()), c.x_mid.view());
      // x_out = x_mid + fc_out(relu(fc_in(ln2(x_mid))))
      layer_norm_forward<T>(c.x_mid.view(), w(kLn2Gain), w(kLn2Bias), c.ln2.view(), c.ln2_xhat.view(),
                            c.ln2_rstd.view());
      linear_forward(linear(l, kFcInLinear), mode, c.ln2.view(), c.h.view());
      relu_forward<T>(c.h.view(), c.h_act.view());
      linear_forward(linear(l, kFcOutLinear), mode, c.h_act.view(), x_out);
      Backend::add_scaled(*ctx_, 1.0, ConstView<T>(c.x_mid.view()), x_out);
    }
    const std::size_t f = final_tensor();  // ln_f.weight, ln_f.bias, lm_head.weight
    layer_norm_forward<T>(x_final_.view(), tensors_[f].view(), tensors_[f + 1].view(), lnf_.view(), lnf_xhat_.view(),
                          lnf_rstd_.view());
    linear_forward(head_linear(), mode, lnf_.view(), logits_.view());
  }

  ConstView<T> logits() const { return logits_.view(); }

  // Mean cross-entropy of the last forward's logits against `targets` (B t of them).
  double loss(const int* targets) const { return cross_entropy<T>(logits_.view(), targets, View<T>()); }

  // After forward(..., Mode::train): the loss, and the gradients. The active
  // adapters' dL_dA and dL_dB are overwritten; with `grads` (one matrix per
  // tensor, layout() order), so is the gradient of every tensor of the base
  // (pretraining, full fine-tuning).
  double backward(const int* targets, std::vector<Matrix>* grads = nullptr) {
    LORA_CHECK(grads != nullptr || !lora_.active_adapters().empty(),
               "backward: nothing trains; activate an adapter or pass gradients for the base's tensors");
    LORA_CHECK(kDenseBase || grads == nullptr, "backward: a quantized base is frozen; only adapters train on it");
    if (grads) {
      LORA_CHECK(grads->size() == tensors_.size(), "backward: expected " << tensors_.size() << " gradients");
      for (Matrix& g : *grads) Backend::fill(*ctx_, g.view(), T(0));
    }
    const double loss = cross_entropy<T>(logits_.view(), targets, dlogits_.view());
    auto grad = [&](std::size_t i) { return grads ? (*grads)[i].view() : View<T>(); };
    const std::size_t f = final_tensor();
    linear_backward(head_linear(), lnf_.view(), dlogits_.view(), dln_.view(), grad(f + 2));
    Backend::fill(*ctx_, dx_.view(), T(0));
    layer_norm_backward<T>(dln_.view(), lnf_xhat_.view(), lnf_rstd_.view(), tensors_[f].view(), dx_.view(), grad(f),
                           grad(f + 1));
    for (int l = config_.layers - 1; l >= 0; --l) {
      BlockCache& c = blocks_[static_cast<std::size_t>(l)];
      auto w = [&](BlockTensor k) { return ConstView<T>(tensors_[block_tensor(l, k)].view()); };
      auto dw = [&](BlockTensor k) { return grad(block_tensor(l, k)); };
      // dx holds dL/dx_out: through the MLP into dL/dx_mid (the residual adds dx itself).
      linear_backward(linear(l, kFcOutLinear), c.h_act.view(), dx_.view(), dh_act_.view(), dw(kFcOut));
      relu_backward<T>(c.h.view(), dh_act_.view(), dh_.view());
      linear_backward(linear(l, kFcInLinear), c.ln2.view(), dh_.view(), dln_.view(), dw(kFcIn));
      layer_norm_backward<T>(dln_.view(), c.ln2_xhat.view(), c.ln2_rstd.view(), w(kLn2Gain), dx_.view(), dw(kLn2Gain),
                             dw(kLn2Bias));
      // dL/dx_mid through attention into dL/dx. Below block 0's qkv_proj only
      // the embeddings remain: skip that dL_dx when they do not train.
      linear_backward(linear(l, kOutLinear), c.att.view(), dx_.view(), datt_.view(), dw(kOut));
      attention_backward<T>(*ctx_, c.qkv.view(), c.probs.view(), datt_.view(), t_, config_.heads, dqkv_.view(),
                            dp_.view());
      const bool need_dx = grads != nullptr || l > 0;
      linear_backward(linear(l, kQkvLinear), c.ln1.view(), dqkv_.view(), need_dx ? dln_.view() : View<T>(),
                      dw(kQkv));
      if (need_dx)
        layer_norm_backward<T>(dln_.view(), c.ln1_xhat.view(), c.ln1_rstd.view(), w(kLn1Gain), dx_.view(), dw(kLn1Gain),
                               dw(kLn1Bias));
    }
    if (grads) embedding_backward<T>(dx_.view(), tokens_.data(), t_, grad(0), grad(1));
    return loss;
  }

  // Bytes of activations kept for backward (the linear layers' ForwardStates
  // among them) and of backward's workspaces.
  std::size_t activation_bytes() const {
    std::size_t bytes = x_final_.bytes() + lnf_.bytes() + lnf_xhat_.bytes() + lnf_rstd_.bytes() + logits_.bytes() +
                        dlogits_.bytes() + dx_.bytes() + dln_.bytes() + datt_.bytes() + dqkv_.bytes() + dh_.bytes() +
                        dh_act_.bytes() + dp_.bytes() + tokens_.size() * sizeof(int);
    for (const BlockCache& c : blocks_)
      bytes += c.x.bytes() + c.ln1.bytes() + c.ln1_xhat.bytes() + c.ln1_rstd.bytes() + c.qkv.bytes() + c.probs.bytes() +
               c.att.bytes() + c.x_mid.bytes() + c.ln2.bytes() + c.ln2_xhat.bytes() + c.ln2_rstd.bytes() + c.h.bytes() +
               c.h_act.bytes();
    for (const auto& state : states_) bytes += state.bytes();  // the adapters' x A^T
    return bytes;
  }
  // Bytes of the frozen weights: the dense tensors, and the quantized linear layers.
  std::size_t parameter_bytes() const {
    std::size_t n = 0;
    for (const Matrix& m : tensors_) n += m.bytes();
    if constexpr (!kDenseBase) {
      for (const auto* set : linears_) n += set->base().bytes();
    }
    return n;
  }

 private:
  struct BlockCache {
    Matrix x, ln1, ln1_xhat, ln1_rstd, qkv, probs, att, x_mid, ln2, ln2_xhat, ln2_rstd, h, h_act;
  };
  // A block's tensors in layout() order, and its linear layers in lora_.modules() order.
  enum BlockTensor : std::size_t {
    kLn1Gain,
    kLn1Bias,
    kQkv,
    kOut,
    kLn2Gain,
    kLn2Bias,
    kFcIn,
    kFcOut,
    kTensorsPerBlock
  };
  enum BlockLinear : int { kQkvLinear, kOutLinear, kFcInLinear, kFcOutLinear, kLinearsPerBlock };
  int linear(int layer, BlockLinear k) const { return kLinearsPerBlock * layer + k; }
  int head_linear() const { return kLinearsPerBlock * config_.layers; }

  // tensors_ index of a block's tensor (after tok_emb and pos_emb), and of ln_f.weight.
  std::size_t block_tensor(int layer, std::size_t k) const {
    return 2 + static_cast<std::size_t>(layer) * kTensorsPerBlock + k;
  }
  std::size_t final_tensor() const { return block_tensor(config_.layers, 0); }

  void init(std::vector<Matrix> values) {
    LORA_CHECK(config_.vocab >= 2 && config_.d_model >= 1 && config_.heads >= 1 &&
                   config_.d_model % config_.heads == 0 && config_.layers >= 1 && config_.context >= 1,
               "ModelConfig: vocab " << config_.vocab << ", d_model " << config_.d_model << ", heads " << config_.heads
                                     << ", layers " << config_.layers << ", context " << config_.context
                                     << ": expected vocab >= 2, d_model a multiple of heads, layers and context >= 1");
    specs_ = layout(config_);
    tensors_ = std::move(values);
    // Every linear layer's W, under its module name, is a frozen base of the
    // lora::Model; module i draws its adapters' init from RNG stream i.
    auto add_linear = [&](const std::string& name, std::size_t tensor) {
      if constexpr (kDenseBase) {
        linears_.push_back(&lora_.add_base(name, tensors_[tensor].view()));
      } else {  // W in 4 bits (bitsandbytes' NF4, double-quantized); the dense copy is dropped
        linears_.push_back(&lora_.add_base(name, Base::quantize(*ctx_, ConstView<T>(tensors_[tensor].view()))));
        tensors_[tensor] = Matrix();
      }
    };
    for (int l = 0; l < config_.layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      add_linear(p + "attn.qkv_proj", block_tensor(l, kQkv));
      add_linear(p + "attn.out_proj", block_tensor(l, kOut));
      add_linear(p + "mlp.fc_in", block_tensor(l, kFcIn));
      add_linear(p + "mlp.fc_out", block_tensor(l, kFcOut));
    }
    add_linear("lm_head", final_tensor() + 2);
    states_.resize(linears_.size());
    blocks_.resize(static_cast<std::size_t>(config_.layers));
  }

  // y = x W^T + sum_k w_k s_k (drop(x) A_k^T) B_k^T over the active adapters
  void linear_forward(int i, lora::Mode mode, View<T> x, View<T> y) {
    const std::size_t k = static_cast<std::size_t>(i);
    if (mode == lora::Mode::train) {
      linears_[k]->forward(x, y, states_[k]);
    } else {
      linears_[k]->inference(x, y);
    }
  }

  // dL_dx = dL_dy W (+ the adapters' paths; skipped when dL_dx is empty); the
  // active adapters' dL_dA, dL_dB overwritten; when dL_dW is given,
  // dL_dW = dL_dy^T x    (d_out x d_in) = (d_out x N)(N x d_in).
  void linear_backward(int i, View<T> x, View<T> dL_dy, View<T> dL_dx, View<T> dL_dW) {
    const std::size_t k = static_cast<std::size_t>(i);
    linears_[k]->backward(states_[k], x, dL_dy, dL_dx, lora::GradMode::overwrite);
    if (!dL_dW.empty())
      Backend::gemm<T, T>(*ctx_, lora::Op::T, lora::Op::N, 1.0, ConstView<T>(dL_dy), ConstView<T>(x), 0.0, dL_dW);
  }

  static void ensure(Matrix& m, std::int64_t rows, std::int64_t cols) {
    if (m.rows() != rows || m.cols() != cols) m = Matrix(rows, cols);
  }
  void resize(std::int64_t n) {
    const std::int64_t d = config_.d_model, f = config_.d_ff();
    for (BlockCache& c : blocks_) {
      for (Matrix* m : {&c.x, &c.ln1, &c.ln1_xhat, &c.att, &c.x_mid, &c.ln2, &c.ln2_xhat}) ensure(*m, n, d);
      ensure(c.ln1_rstd, n, 1);
      ensure(c.ln2_rstd, n, 1);
      ensure(c.qkv, n, 3 * d);
      ensure(c.probs, n * config_.heads, t_);
      ensure(c.h, n, f);
      ensure(c.h_act, n, f);
    }
    for (Matrix* m : {&x_final_, &lnf_, &lnf_xhat_, &dx_, &dln_, &datt_}) ensure(*m, n, d);
    ensure(lnf_rstd_, n, 1);
    ensure(logits_, n, config_.vocab);
    ensure(dlogits_, n, config_.vocab);
    ensure(dqkv_, n, 3 * d);
    ensure(dh_, n, f);
    ensure(dh_act_, n, f);
    ensure(dp_, t_, t_);
  }

  lora::cpu::Context* ctx_;
  ModelConfig config_;
  std::vector<TensorSpec> specs_;
  std::vector<Matrix> tensors_;
  Lora lora_;
  std::vector<typename Lora::Set*> linears_;                   // lora_'s modules, in lora_.modules() order
  std::vector<typename Lora::Set::ForwardState> states_;       // each layer's last training forward

  std::vector<int> tokens_;
  int t_ = 0;
  std::vector<BlockCache> blocks_;
  Matrix x_final_, lnf_, lnf_xhat_, lnf_rstd_, logits_, dlogits_;
  Matrix dx_, dln_, datt_, dqkv_, dh_, dh_act_, dp_;
};

}  // namespace demo

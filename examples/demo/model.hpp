// A small Llama (Hugging Face's LlamaForCausalLM, character-level): pre-norm
// blocks of RMSNorm, causal grouped-query self-attention with rotary position
// embeddings, and a SwiGLU MLP; a final RMSNorm and an untied output head. The
// network owns its tensors under Hugging Face's names and layout
// ("model.layers.0.self_attn.q_proj.weight", q_proj / k_proj rows in
// rotate-half order) and runs its own graph; its linear layers are the frozen
// bases of a lora::Model under their module names ("model.layers.0.self_attn.q_proj",
// ..., "lm_head"), so adapters attach by a PEFT LoraConfig and every forward
// applies the adapters that model has active (none: the base alone). Adding,
// switching, training or removing an adapter never writes W; only merging does.
//
// LlamaLM<T> keeps each W dense (lora::DenseBase over the network's own
// tensor); LlamaLM<T, lora::cpu::Nf4Base<T>> is the QLoRA network: each linear
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

// config.json's fields, by their names there.
struct ModelConfig {
  int vocab = 0;            // vocab_size
  int d_model = 128;        // hidden_size
  int heads = 4;            // num_attention_heads
  int kv_heads = 2;         // num_key_value_heads (grouped-query attention)
  int layers = 2;           // num_hidden_layers
  int d_ff = 352;           // intermediate_size
  int context = 64;         // the training window (max_position_embeddings)
  double rope_theta = 10000.0;
  double rms_eps = 1e-5;    // rms_norm_eps
  int head_dim() const { return d_model / heads; }
};

template <class T, class Base = lora::cpu::DenseBase<T>>
class LlamaLM {
 public:
  using Matrix = lora::cpu::Matrix<T>;
  using Lora = lora::Model<T, lora::cpu::Backend, Base>;  // the linear layers' frozen W and the adapters on them
  static constexpr bool kDenseBase = std::is_same_v<Base, lora::cpu::DenseBase<T>>;

  // How a fresh model fills a tensor (Llama's init): N(0, 0.02^2); the
  // projections into the residual stream (o_proj, down_proj)
  // N(0, (0.02 / sqrt(2 layers))^2); RMSNorm gains 1.
  enum class Fill { normal, residual, ones };

  // Tensor names and shapes, in storage order (Hugging Face names, W as
  // d_out x d_in, a norm's weight as 1 x d). `linear`: a linear layer's W,
  // whose module name is the tensor name less ".weight".
  struct TensorSpec {
    std::string name;
    std::int64_t rows, cols;
    Fill fill;
    bool linear;
  };
  static std::vector<TensorSpec> layout(const ModelConfig& c) {
    const std::int64_t d = c.d_model, f = c.d_ff, q = std::int64_t{c.heads} * c.head_dim(),
                       kv = std::int64_t{c.kv_heads} * c.head_dim();
    std::vector<TensorSpec> specs = {{"model.embed_tokens.weight", c.vocab, d, Fill::normal, false}};
    for (int l = 0; l < c.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      specs.insert(specs.end(), {{p + "input_layernorm.weight", 1, d, Fill::ones, false},
                                 {p + "self_attn.q_proj.weight", q, d, Fill::normal, true},
                                 {p + "self_attn.k_proj.weight", kv, d, Fill::normal, true},
                                 {p + "self_attn.v_proj.weight", kv, d, Fill::normal, true},
                                 {p + "self_attn.o_proj.weight", d, q, Fill::residual, true},
                                 {p + "post_attention_layernorm.weight", 1, d, Fill::ones, false},
                                 {p + "mlp.gate_proj.weight", f, d, Fill::normal, true},
                                 {p + "mlp.up_proj.weight", f, d, Fill::normal, true},
                                 {p + "mlp.down_proj.weight", d, f, Fill::residual, true}});
    }
    specs.insert(specs.end(), {{"model.norm.weight", 1, d, Fill::ones, false},
                               {"lm_head.weight", c.vocab, d, Fill::normal, true}});
    return specs;
  }

  // A fresh model, every random number drawn from lora's RNG at (seed,
  // stream = tensor index).
  LlamaLM(lora::cpu::Context& ctx, const ModelConfig& config, std::uint64_t seed)
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
        m.data()[k] = fill == Fill::ones ? T(1) : static_cast<T>(sigma * normal);
      }
      values.push_back(std::move(m));
    }
    init(std::move(values));
  }

  // A model from given tensors (a cached base, or a copy for full fine-tuning),
  // in layout() order and shapes.
  LlamaLM(lora::cpu::Context& ctx, const ModelConfig& config, std::vector<Matrix> values)
      : ctx_(&ctx), config_(config), lora_(ctx) {
    const auto specs = layout(config);
    LORA_CHECK(values.size() == specs.size(),
               "LlamaLM: expected " << specs.size() << " tensors, found " << values.size());
    for (std::size_t i = 0; i < specs.size(); ++i)
      lora::check_shape(values[i].view(), specs[i].rows, specs[i].cols, specs[i].name.c_str());
    init(std::move(values));
  }

  // The lora::Model borrows views of tensors_: the network stays where it is.
  LlamaLM(const LlamaLM&) = delete;
  LlamaLM& operator=(const LlamaLM&) = delete;

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

  // logits ((B t) x vocab) for `batch` sequences of t tokens each (positions
  // 0 .. t - 1; t may exceed the training context: RoPE has no table of
  // learned positions), every linear layer with lora()'s active adapters.
  // Mode::train keeps what backward needs (each layer's ForwardState among it).
  void forward(const int* tokens, int batch, int t, lora::Mode mode) {
    LORA_CHECK(batch >= 1 && t >= 1, "forward: batch = " << batch << ", t = " << t << ", expected both >= 1");
    const std::int64_t n = static_cast<std::int64_t>(batch) * t;
    tokens_.assign(tokens, tokens + n);
    t_ = t;
    resize(n);
    rope_.ensure(t, config_.head_dim(), config_.rope_theta);
    embedding_forward<T>(tensors_[0].view(), tokens, blocks_[0].x.view());
    for (int l = 0; l < config_.layers; ++l) {
      BlockCache& c = blocks_[static_cast<std::size_t>(l)];
      const View<T> x_out =
          l + 1 < config_.layers ? blocks_[static_cast<std::size_t>(l) + 1].x.view() : x_final_.view();
      auto w = [&](BlockTensor k) { return ConstView<T>(tensors_[block_tensor(l, k)].view()); };
      // x_mid = x + o_proj(attention(rope(q_proj(a)), rope(k_proj(a)), v_proj(a))),  a = rmsnorm(x)
      rms_norm_forward<T>(c.x.view(), w(kAttnNorm), config_.rms_eps, c.a.view(), c.a_rstd.view());
      linear_forward(linear(l, kQ), mode, c.a.view(), c.q.view());
      linear_forward(linear(l, kK), mode, c.a.view(), c.k.view());
      linear_forward(linear(l, kV), mode, c.a.view(), c.v.view());
      rope_apply<T>(c.q.view(), t, config_.head_dim(), rope_, false);
      rope_apply<T>(c.k.view(), t, config_.head_dim(), rope_, false);
      attention_forward<T>(*ctx_, c.q.view(), c.k.view(), c.v.view(), t, config_.heads, config_.kv_heads,
                           c.probs.view(), c.att.view());
      linear_forward(linear(l, kO), mode, c.att.view(), c.x_mid.view());
      Backend::add_scaled(*ctx_, 1.0, ConstView<T>(c.x.view()), c.x_mid.view());
      // x_out = x_mid + down_proj(silu(gate_proj(b)) o up_proj(b)),  b = rmsnorm(x_mid)
      rms_norm_forward<T>(c.x_mid.view(), w(kFfnNorm), config_.rms_eps, c.b.view(), c.b_rstd.view());
      linear_forward(linear(l, kGate), mode, c.b.view(), c.gate.view());
      linear_forward(linear(l, kUp), mode, c.b.view(), c.up.view());
      swiglu_forward<T>(c.gate.view(), c.up.view(), c.h.view());
      linear_forward(linear(l, kDown), mode, c.h.view(), x_out);
      Backend::add_scaled(*ctx_, 1.0, ConstView<T>(c.x_mid.view()), x_out);
    }
    const std::size_t f = final_tensor();  // model.norm.weight, lm_head.weight
    rms_norm_forward<T>(x_final_.view(), tensors_[f].view(), config_.rms_eps, xn_.view(), xn_rstd_.view());
    linear_forward(head_linear(), mode, xn_.view(), logits_.view());
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
    linear_backward(head_linear(), xn_.view(), dlogits_.view(), dn_.view(), grad(f + 1));
    Backend::fill(*ctx_, dx_.view(), T(0));
    rms_norm_backward<T>(dn_.view(), x_final_.view(), xn_rstd_.view(), tensors_[f].view(), dx_.view(), grad(f));
    const int hd = config_.head_dim();
    for (int l = config_.layers - 1; l >= 0; --l) {
      BlockCache& c = blocks_[static_cast<std::size_t>(l)];
      auto w = [&](BlockTensor k) { return ConstView<T>(tensors_[block_tensor(l, k)].view()); };
      auto dw = [&](BlockTensor k) { return grad(block_tensor(l, k)); };
      // dx holds dL/dx_out: through the MLP into dL/dx_mid (the residual adds dx itself).
      linear_backward(linear(l, kDown), c.h.view(), dx_.view(), dh_.view(), dw(kDownW));
      swiglu_backward<T>(c.gate.view(), c.up.view(), dh_.view(), dgate_.view(), dup_.view());
      linear_backward(linear(l, kGate), c.b.view(), dgate_.view(), dn_.view(), dw(kGateW));
      linear_backward(linear(l, kUp), c.b.view(), dup_.view(), dn2_.view(), dw(kUpW));
      Backend::add_scaled(*ctx_, 1.0, ConstView<T>(dn2_.view()), dn_.view());
      rms_norm_backward<T>(dn_.view(), c.x_mid.view(), c.b_rstd.view(), w(kFfnNorm), dx_.view(), dw(kFfnNorm));
      // dL/dx_mid through attention into dL/dx. Below block 0's projections
      // only the embedding remains: skip that dL_dx when it does not train.
      linear_backward(linear(l, kO), c.att.view(), dx_.view(), datt_.view(), dw(kOW));
      attention_backward<T>(*ctx_, c.q.view(), c.k.view(), c.v.view(), c.probs.view(), datt_.view(), t_,
                            config_.heads, config_.kv_heads, dq_.view(), dk_.view(), dv_.view(), dp_.view());
      rope_apply<T>(dq_.view(), t_, hd, rope_, true);
      rope_apply<T>(dk_.view(), t_, hd, rope_, true);
      const bool need_dx = grads != nullptr || l > 0;
      const View<T> da = need_dx ? dn_.view() : View<T>(), da_more = need_dx ? dn2_.view() : View<T>();
      linear_backward(linear(l, kQ), c.a.view(), dq_.view(), da, dw(kQW));
      linear_backward(linear(l, kK), c.a.view(), dk_.view(), da_more, dw(kKW));
      if (need_dx) Backend::add_scaled(*ctx_, 1.0, ConstView<T>(dn2_.view()), dn_.view());
      linear_backward(linear(l, kV), c.a.view(), dv_.view(), da_more, dw(kVW));
      if (need_dx) {
        Backend::add_scaled(*ctx_, 1.0, ConstView<T>(dn2_.view()), dn_.view());
        rms_norm_backward<T>(dn_.view(), c.x.view(), c.a_rstd.view(), w(kAttnNorm), dx_.view(), dw(kAttnNorm));
      }
    }
    if (grads) embedding_backward<T>(dx_.view(), tokens_.data(), grad(0));
    return loss;
  }

  // Bytes of activations kept for backward (the linear layers' ForwardStates
  // among them) and of backward's workspaces.
  std::size_t activation_bytes() const {
    std::size_t bytes = tokens_.size() * sizeof(int);
    for (const Matrix* m : {&x_final_, &xn_, &xn_rstd_, &logits_, &dlogits_, &dx_, &dn_, &dn2_, &datt_, &dq_, &dk_,
                            &dv_, &dh_, &dgate_, &dup_, &dp_})
      bytes += m->bytes();
    for (const BlockCache& c : blocks_)
      for (const Matrix* m : c.all()) bytes += m->bytes();
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
    Matrix x, a, a_rstd, q, k, v, probs, att, x_mid, b, b_rstd, gate, up, h;  // q and k after RoPE
    std::vector<const Matrix*> all() const {
      return {&x, &a, &a_rstd, &q, &k, &v, &probs, &att, &x_mid, &b, &b_rstd, &gate, &up, &h};
    }
  };
  // A block's tensors in layout() order, and its linear layers in lora_.modules() order.
  enum BlockTensor : std::size_t { kAttnNorm, kQW, kKW, kVW, kOW, kFfnNorm, kGateW, kUpW, kDownW, kTensorsPerBlock };
  enum BlockLinear : int { kQ, kK, kV, kO, kGate, kUp, kDown, kLinearsPerBlock };
  int linear(int layer, BlockLinear k) const { return kLinearsPerBlock * layer + k; }
  int head_linear() const { return kLinearsPerBlock * config_.layers; }

  // tensors_ index of a block's tensor (after embed_tokens), and of model.norm.weight.
  std::size_t block_tensor(int layer, std::size_t k) const {
    return 1 + static_cast<std::size_t>(layer) * kTensorsPerBlock + k;
  }
  std::size_t final_tensor() const { return block_tensor(config_.layers, 0); }

  void init(std::vector<Matrix> values) {
    const ModelConfig& c = config_;
    LORA_CHECK(c.vocab >= 2 && c.d_model >= 1 && c.heads >= 1 && c.kv_heads >= 1 && c.d_model % c.heads == 0 &&
                   c.head_dim() % 2 == 0 && c.heads % c.kv_heads == 0 && c.layers >= 1 && c.d_ff >= 1 &&
                   c.context >= 1,
               "ModelConfig: vocab " << c.vocab << ", d_model " << c.d_model << ", heads " << c.heads << ", kv_heads "
                                     << c.kv_heads << ", layers " << c.layers << ", d_ff " << c.d_ff
                                     << ": expected vocab >= 2, d_model = heads x an even head size, heads a "
                                        "multiple of kv_heads, the rest >= 1");
    specs_ = layout(c);
    tensors_ = std::move(values);
    // Every linear layer's W, under its module name, is a frozen base of the
    // lora::Model; module i draws its adapters' init from RNG stream i.
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      if (!specs_[i].linear) continue;
      const std::string module = specs_[i].name.substr(0, specs_[i].name.size() - std::string(".weight").size());
      if constexpr (kDenseBase) {
        linears_.push_back(&lora_.add_base(module, tensors_[i].view()));
      } else {  // W in 4 bits (bitsandbytes' NF4, double-quantized); the dense copy is dropped
        linears_.push_back(&lora_.add_base(module, Base::quantize(*ctx_, ConstView<T>(tensors_[i].view()))));
        tensors_[i] = Matrix();
      }
    }
    states_.resize(linears_.size());
    blocks_.resize(static_cast<std::size_t>(c.layers));
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
    const ModelConfig& c = config_;
    const std::int64_t d = c.d_model, f = c.d_ff, q = std::int64_t{c.heads} * c.head_dim(),
                       kv = std::int64_t{c.kv_heads} * c.head_dim();
    for (BlockCache& b : blocks_) {
      for (Matrix* m : {&b.x, &b.a, &b.x_mid, &b.b}) ensure(*m, n, d);
      for (Matrix* m : {&b.q, &b.att}) ensure(*m, n, q);
      for (Matrix* m : {&b.k, &b.v}) ensure(*m, n, kv);
      for (Matrix* m : {&b.gate, &b.up, &b.h}) ensure(*m, n, f);
      ensure(b.a_rstd, n, 1);
      ensure(b.b_rstd, n, 1);
      ensure(b.probs, n * c.heads, t_);
    }
    for (Matrix* m : {&x_final_, &xn_, &dx_, &dn_, &dn2_}) ensure(*m, n, d);
    for (Matrix* m : {&datt_, &dq_}) ensure(*m, n, q);
    for (Matrix* m : {&dk_, &dv_}) ensure(*m, n, kv);
    for (Matrix* m : {&dh_, &dgate_, &dup_}) ensure(*m, n, f);
    ensure(xn_rstd_, n, 1);
    ensure(logits_, n, c.vocab);
    ensure(dlogits_, n, c.vocab);
    ensure(dp_, t_, t_);
  }

  lora::cpu::Context* ctx_;
  ModelConfig config_;
  std::vector<TensorSpec> specs_;
  std::vector<Matrix> tensors_;
  Lora lora_;
  std::vector<typename Lora::Set*> linears_;              // lora_'s modules, in lora_.modules() order
  std::vector<typename Lora::Set::ForwardState> states_;  // each layer's last training forward

  std::vector<int> tokens_;
  int t_ = 0;
  RopeTables<T> rope_;
  std::vector<BlockCache> blocks_;
  Matrix x_final_, xn_, xn_rstd_, logits_, dlogits_;
  Matrix dx_, dn_, dn2_, datt_, dq_, dk_, dv_, dh_, dgate_, dup_, dp_;
};

}  // namespace demo

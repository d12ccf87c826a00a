// A tiny random Llama (GQA, 2 layers) and a random LoRA adapter on it, written
// twice: as llama.cpp loads them (base.gguf, adapter.gguf via save_gguf_adapter)
// and in Hugging Face's layout (hf/model.safetensors + hf/config.json, hf/adapter
// via save_peft) for reference.py. check.sh compares the two forwards. Also
// the adapter as F16 / BF16, and two wrong exports the comparison must catch.
//
//   make_tiny_llama OUT_DIR
//
// The weights are held in Hugging Face's order: q_proj / k_proj rows in
// rotate-half order within each head. The base files are written by the
// demo's writers (examples/demo/export.hpp: the GGUF gets those rows permuted
// to llama.cpp's interleaved rope order, as convert_hf_to_gguf.py does); the
// adapter's B rows are permuted by save_gguf_adapter itself (GgufAdapterOptions::heads).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "demo/export.hpp"
#include "demo/model.hpp"
#include "lora/io.hpp"

namespace {

// The model's hyperparameters (config.json's names in demo::ModelConfig).
struct TinyLlama {
  static constexpr int kVocab = 64;          // <unk> <s> </s>, newline and 60 printable characters
  static constexpr int kDim = 32;
  static constexpr int kHeads = 4;
  static constexpr int kKvHeads = 2;         // GQA: 2 query heads per key/value head
  static constexpr int kHeadDim = kDim / kHeads;
  static constexpr int kLayers = 2;
  static constexpr int kFfn = 64;
  static constexpr int kContext = 256;       // node-llama-cpp's smallest context

  static demo::ModelConfig config() {
    demo::ModelConfig c;
    c.vocab = kVocab;
    c.d_model = kDim;
    c.heads = kHeads;
    c.kv_heads = kKvHeads;
    c.layers = kLayers;
    c.d_ff = kFfn;
    c.context = kContext;
    return c;
  }
};

constexpr std::uint64_t kSeed = 20251205;

// rows x cols, entries N(mean, std^2) from lora's counter-based generator (stream = which tensor).
lora::cpu::Matrix<float> random_matrix(std::int64_t rows, std::int64_t cols, double std, std::uint64_t stream,
                                       double mean = 0.0) {
  lora::cpu::Matrix<float> m(rows, cols);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j)
      m(i, j) = static_cast<float>(mean + std * lora::standard_normal(kSeed, stream, 0, static_cast<std::uint64_t>(i * cols + j)));
  return m;
}

// The model's tensors in demo::LlamaLM's layout (Hugging Face's names and
// order; a norm's weight 1 x d): linear layers N(0, 1 / d_in), norms around 1
// (not exactly, so a missing weight shows), the embedding N(0, 1), the head
// at twice the usual scale (logits of standard deviation about 2, a
// distribution far from uniform).
std::vector<lora::cpu::Matrix<float>> random_model() {
  using Spec = demo::LlamaLM<float>::TensorSpec;
  std::vector<lora::cpu::Matrix<float>> t;
  std::uint64_t stream = 1;
  for (const Spec& spec : demo::LlamaLM<float>::layout(TinyLlama::config())) {
    const double std = spec.name == "lm_head.weight" ? 2.0 / std::sqrt(spec.cols)
                       : spec.linear                 ? 1.0 / std::sqrt(spec.cols)
                       : spec.rows == 1              ? 0.1
                                                     : 1.0;
    t.push_back(random_matrix(spec.rows, spec.cols, std, stream++, spec.rows == 1 ? 1.0 : 0.0));
  }
  return t;
}

// A random adapter on every linear layer of the blocks: r 4, lora_alpha 8, and
// patterns so that ranks and scales differ between modules:
//   layers.1 k_proj  r 2            llama.cpp's alpha / r is right with the pair's own rank
//   layers.1 q_proj  alpha 16       scale 4, not alpha / r = 2: B folded by 2 (and rows permuted)
//   layers.0 down_proj alpha 4      scale 1: B folded by 0.5
// B is random (not PEFT's zeros) so the adapter changes the output.
lora::io::Adapter random_adapter() {
  using M = TinyLlama;
  lora::io::Adapter a;
  a.config.r = 4;
  a.config.lora_alpha = 8.0;
  a.config.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  a.config.rank_pattern = {{"model.layers.1.self_attn.k_proj", 2}};
  a.config.alpha_pattern = {{"model.layers.1.self_attn.q_proj", 16.0}, {"model.layers.0.mlp.down_proj", 4.0}};
  a.config.base_model_name_or_path = "tiny-llama";
  a.config.task_type = "CAUSAL_LM";
  const lora::io::PeftConfig::Resolver resolve = a.config.resolver();
  const struct {
    const char* name;
    int d_out, d_in;
  } kModules[] = {{"self_attn.q_proj", M::kHeads * M::kHeadDim, M::kDim}, {"self_attn.k_proj", M::kKvHeads * M::kHeadDim, M::kDim},
                  {"self_attn.v_proj", M::kKvHeads * M::kHeadDim, M::kDim}, {"self_attn.o_proj", M::kDim, M::kHeads * M::kHeadDim},
                  {"mlp.gate_proj", M::kFfn, M::kDim}, {"mlp.up_proj", M::kFfn, M::kDim}, {"mlp.down_proj", M::kDim, M::kFfn}};
  std::uint64_t stream = 1000;
  for (int l = 0; l < M::kLayers; ++l)
    for (const auto& k : kModules) {
      const std::string name = "model.layers." + std::to_string(l) + "." + k.name;
      lora::io::AdapterModule m;
      m.r = resolve.rank_for(name);
      m.alpha = resolve.alpha_for(name);
      m.scale = resolve.scale_for(name);
      m.A = random_matrix(m.r, k.d_in, 1.0 / std::sqrt(k.d_in), stream++);
      m.B = random_matrix(k.d_out, m.r, 0.1, stream++);
      a.modules.emplace(name, std::move(m));
    }
  return a;
}

// A vocabulary llama.cpp's byte-level BPE loader ("gpt2") accepts: ids 0-2
// <unk> <s> </s>, 3 the newline, then single printable ASCII characters.
demo::GgufVocab tiny_vocab() {
  demo::GgufVocab v;
  v.add("<unk>", demo::GgufVocab::kUnknown);
  v.add("<s>", demo::GgufVocab::kControl);
  v.add("</s>", demo::GgufVocab::kControl);
  v.add(demo::gpt2_byte_text('\n'), demo::GgufVocab::kNormal);
  for (unsigned char c = '!'; v.tokens.size() < TinyLlama::kVocab; ++c) v.add(demo::gpt2_byte_text(c), demo::GgufVocab::kNormal);
  v.unknown = 0;
  v.bos = 1;
  v.eos = 2;
  return v;
}

// adapter.gguf (F32), adapter_f16.gguf, adapter_bf16.gguf (A and B rounded once,
// after folding), hf/adapter (PEFT), and two wrong exports that check.sh expects
// to disagree with the reference: adapter_unpermuted.gguf, B's q_proj / k_proj
// rows left in Hugging Face's order (an exporter that forgets llama.cpp's rope
// layout), and adapter_unfolded.gguf, every module at lora_alpha / r (one that
// ignores alpha_pattern).
lora::io::GgufAdapterReport write_adapters(const lora::io::Adapter& adapter, const std::string& out) {
  lora::io::save_peft(adapter, out + "/hf/adapter");
  lora::io::GgufAdapterOptions options;
  options.architecture = "llama";
  options.heads = {TinyLlama::kHeads, TinyLlama::kKvHeads};
  options.name = "tiny-llama-lora";
  const lora::io::GgufAdapterReport report = lora::io::save_gguf_adapter(adapter, out + "/adapter.gguf", options);
  for (const auto& [dtype, file] : {std::pair{lora::io::Dtype::F16, "adapter_f16.gguf"},
                                    std::pair{lora::io::Dtype::BF16, "adapter_bf16.gguf"}}) {
    lora::io::GgufAdapterOptions rounded = options;
    rounded.dtype = dtype;
    lora::io::save_gguf_adapter(adapter, out + "/" + file, rounded);
  }

  lora::io::GgufAdapterOptions unpermuted = options;
  lora::io::GgufNames::Architecture llama = unpermuted.names.at("llama");
  for (lora::io::GgufNames::Rule& rule : llama.rules) rule.rotary = lora::io::GgufNames::Rotary::none;
  unpermuted.names.set("llama", llama);
  lora::io::save_gguf_adapter(adapter, out + "/adapter_unpermuted.gguf", unpermuted);

  lora::io::Adapter unfolded = random_adapter();  // the same A and B: the generator is counter-based
  unfolded.config.alpha_pattern.clear();
  for (auto& [module, m] : unfolded.modules) {
    m.alpha = unfolded.config.lora_alpha;
    m.scale = m.alpha / m.r;
  }
  lora::io::save_gguf_adapter(unfolded, out + "/adapter_unfolded.gguf", options);
  return report;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " OUT_DIR\n";
    return 2;
  }
  const std::string out = argv[1];
  try {
    std::filesystem::create_directories(out + "/hf");
    std::vector<std::string> names;
    for (const auto& spec : demo::LlamaLM<float>::layout(TinyLlama::config())) names.push_back(spec.name);
    const std::vector<lora::cpu::Matrix<float>> model = random_model();
    demo::write_llama_gguf(TinyLlama::config(), names, model, tiny_vocab(), "tiny-llama", out + "/base.gguf");
    demo::write_hf_llama(TinyLlama::config(), names, model, tiny_vocab(), out + "/hf");

    const lora::io::Adapter adapter = random_adapter();
    const lora::io::GgufAdapterReport report = write_adapters(adapter, out);

    std::cout << "make_tiny_llama: " << out << "/base.gguf (" << model.size() << " tensors), " << out
              << "/adapter.gguf (" << report.names.size() << " modules, alpha " << report.alpha
              << "), adapter_{f16,bf16,unpermuted,unfolded}.gguf, hf/\n";
    for (const auto& [module, factor] : report.folded)
      std::cout << "  " << module << ": B folded by " << factor << " (scale " << adapter.modules.at(module).scale << ")\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "make_tiny_llama: " << e.what() << "\n";
    return 1;
  }
}

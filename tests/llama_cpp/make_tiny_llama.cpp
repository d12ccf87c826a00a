// A tiny random Llama (GQA, 2 layers) and a random LoRA adapter on it, written
// twice: as llama.cpp loads them (base.gguf, adapter.gguf via save_gguf_adapter)
// and in Hugging Face's layout (hf/model.safetensors + hf/config.json, hf/adapter
// via save_peft) for reference.py. check.sh compares the two forwards. Also
// the adapter as F16 / BF16, and two wrong exports the comparison must catch.
//
//   make_tiny_llama OUT_DIR
//
// The weights are held in Hugging Face's order: q_proj / k_proj rows in
// rotate-half order within each head. The base GGUF gets them permuted to
// llama.cpp's interleaved rope order, as convert_hf_to_gguf.py does; the
// adapter's B rows are permuted by save_gguf_adapter itself (GgufAdapterOptions::heads).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "lora/io.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_adapter.hpp"
#include "lora/lora.hpp"

namespace {

// The model's hyperparameters (config.json's names in the comments).
struct TinyLlama {
  static constexpr int kVocab = 64;          // vocab_size: <unk> <s> </s>, newline and 60 printable characters
  static constexpr int kDim = 32;            // hidden_size
  static constexpr int kHeads = 4;           // num_attention_heads
  static constexpr int kKvHeads = 2;         // num_key_value_heads (GQA: 2 query heads per key/value head)
  static constexpr int kHeadDim = kDim / kHeads;
  static constexpr int kLayers = 2;          // num_hidden_layers
  static constexpr int kFfn = 64;            // intermediate_size
  static constexpr int kContext = 256;       // max_position_embeddings (node-llama-cpp's smallest context)
  static constexpr double kRopeTheta = 10000.0;
  static constexpr double kRmsEps = 1e-5;
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

// The Hugging Face tensors of the model, by their HF names (1-D norms are 1 x d here).
struct HfTensor {
  std::string hf_name;
  std::string gguf_name;
  lora::cpu::Matrix<float> value;
  int rotary_heads = 0;  // > 0: q_proj / k_proj, rows permuted by this head count for the GGUF
  bool vector = false;   // a 1-D tensor (RMSNorm weight)
};

std::vector<HfTensor> random_model() {
  using M = TinyLlama;
  std::vector<HfTensor> t;
  std::uint64_t stream = 1;
  auto linear = [&](std::string hf, std::string gguf, int d_out, int d_in, int rotary_heads = 0) {
    t.push_back({std::move(hf), std::move(gguf), random_matrix(d_out, d_in, 1.0 / std::sqrt(d_in), stream++), rotary_heads, false});
  };
  auto norm = [&](std::string hf, std::string gguf) {  // around 1, not exactly, so a missing weight shows
    t.push_back({std::move(hf), std::move(gguf), random_matrix(1, M::kDim, 0.1, stream++, 1.0), 0, true});
  };
  t.push_back({"model.embed_tokens.weight", "token_embd.weight", random_matrix(M::kVocab, M::kDim, 1.0, stream++), 0, false});
  for (int l = 0; l < M::kLayers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".", gguf = "blk." + std::to_string(l) + ".";
    norm(hf + "input_layernorm.weight", gguf + "attn_norm.weight");
    linear(hf + "self_attn.q_proj.weight", gguf + "attn_q.weight", M::kHeads * M::kHeadDim, M::kDim, M::kHeads);
    linear(hf + "self_attn.k_proj.weight", gguf + "attn_k.weight", M::kKvHeads * M::kHeadDim, M::kDim, M::kKvHeads);
    linear(hf + "self_attn.v_proj.weight", gguf + "attn_v.weight", M::kKvHeads * M::kHeadDim, M::kDim);
    linear(hf + "self_attn.o_proj.weight", gguf + "attn_output.weight", M::kDim, M::kHeads * M::kHeadDim);
    norm(hf + "post_attention_layernorm.weight", gguf + "ffn_norm.weight");
    linear(hf + "mlp.gate_proj.weight", gguf + "ffn_gate.weight", M::kFfn, M::kDim);
    linear(hf + "mlp.up_proj.weight", gguf + "ffn_up.weight", M::kFfn, M::kDim);
    linear(hf + "mlp.down_proj.weight", gguf + "ffn_down.weight", M::kDim, M::kFfn);
  }
  norm("model.norm.weight", "output_norm.weight");
  // Twice the usual scale: logits of standard deviation about 2, a distribution far from uniform.
  t.push_back({"lm_head.weight", "output.weight", random_matrix(M::kVocab, M::kDim, 2.0 / std::sqrt(M::kDim), stream++), 0, false});
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

lora::io::RawTensor f32_vector(const lora::cpu::Matrix<float>& m) {
  lora::io::RawTensor t{lora::io::Dtype::F32, {m.size()}, std::vector<std::uint8_t>(static_cast<std::size_t>(m.size()) * 4)};
  std::memcpy(t.bytes.data(), m.view().data, t.bytes.size());  // little-endian hosts only, as the library
  return t;
}

// A vocabulary llama.cpp's byte-level BPE loader ("gpt2") accepts: ids 0-2
// <unk> <s> </s>, 3 the newline ("Ċ", GPT-2's printable stand-in for byte 0x0A),
// then single printable ASCII characters; no merges. Not SentencePiece ("llama"):
// its tokenizer falls back to the 256 byte tokens <0x00>..<0xFF> for any
// character outside the vocabulary, and llama.cpp throws (std::out_of_range,
// uncaught) when one is missing, as it is from 64 tokens; node-llama-cpp
// tokenizes a few strings of its own on loading. BPE drops such characters instead.
void set_tokenizer(lora::io::GgufWriter& w) {
  using lora::io::GgufType;
  using lora::io::GgufValue;
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "\xC4\x8A"};
  for (char c = '!'; tokens.size() < TinyLlama::kVocab; ++c) tokens.push_back(std::string(1, c));
  std::vector<GgufValue> types;
  for (std::size_t i = 0; i < tokens.size(); ++i)
    types.push_back(GgufValue::i32(i == 0 ? 2 : i < 3 ? 3 : 1));  // llama.cpp's token types: 1 normal, 2 unknown, 3 control
  w.set("tokenizer.ggml.model", GgufValue::string("gpt2"));
  w.set("tokenizer.ggml.pre", GgufValue::string("default"));
  w.set("tokenizer.ggml.tokens", GgufValue::strings(tokens));
  w.set("tokenizer.ggml.token_type", GgufValue::array(GgufType::I32, std::move(types)));
  w.set("tokenizer.ggml.merges", GgufValue::strings({}));
  w.set("tokenizer.ggml.unknown_token_id", GgufValue::u32(0));
  w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(1));
  w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(2));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(false));
  w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(false));
}

void write_base_gguf(const std::vector<HfTensor>& model, const std::string& path) {
  using lora::io::GgufValue;
  using M = TinyLlama;
  lora::io::GgufWriter w;
  w.set("general.architecture", GgufValue::string("llama"));
  w.set("general.name", GgufValue::string("tiny-llama"));
  w.set("llama.vocab_size", GgufValue::u32(M::kVocab));
  w.set("llama.context_length", GgufValue::u32(M::kContext));
  w.set("llama.embedding_length", GgufValue::u32(M::kDim));
  w.set("llama.block_count", GgufValue::u32(M::kLayers));
  w.set("llama.feed_forward_length", GgufValue::u32(M::kFfn));
  w.set("llama.attention.head_count", GgufValue::u32(M::kHeads));
  w.set("llama.attention.head_count_kv", GgufValue::u32(M::kKvHeads));
  w.set("llama.rope.dimension_count", GgufValue::u32(M::kHeadDim));
  w.set("llama.rope.freq_base", GgufValue::f32(static_cast<float>(M::kRopeTheta)));
  w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(static_cast<float>(M::kRmsEps)));
  set_tokenizer(w);
  for (const HfTensor& t : model) {
    if (t.vector) {
      w.add_raw(t.gguf_name, f32_vector(t.value));
    } else if (t.rotary_heads > 0) {  // convert_hf_to_gguf.py's permute, the same rule as the adapter's B rows
      const lora::cpu::Matrix<float> W = lora::io::permute_rotary_rows(t.value, t.rotary_heads, /*to_gguf=*/true, t.hf_name);
      w.add(t.gguf_name, W.view(), lora::io::Dtype::F32);
    } else {
      w.add(t.gguf_name, t.value.view(), lora::io::Dtype::F32);  // [d_out, d_in] row-major is ggml's ne = [d_in, d_out]
    }
  }
  w.write(path);
}

void write_hf_model(const std::vector<HfTensor>& model, const std::string& dir) {
  using M = TinyLlama;
  lora::io::SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const HfTensor& t : model) {
    if (t.vector)
      w.add(t.hf_name, {t.value.size()}, t.value.view().data, lora::io::Dtype::F32);
    else
      w.add(t.hf_name, t.value.view(), lora::io::Dtype::F32);
  }
  w.write(dir + "/model.safetensors");
  const nlohmann::json config = {
      {"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
      {"vocab_size", M::kVocab}, {"hidden_size", M::kDim}, {"intermediate_size", M::kFfn},
      {"num_hidden_layers", M::kLayers}, {"num_attention_heads", M::kHeads}, {"num_key_value_heads", M::kKvHeads},
      {"max_position_embeddings", M::kContext}, {"rope_theta", M::kRopeTheta}, {"rms_norm_eps", M::kRmsEps},
      {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"bos_token_id", 1}, {"eos_token_id", 2}};
  std::ofstream(dir + "/config.json") << config.dump(2) << "\n";
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
    const std::vector<HfTensor> model = random_model();
    write_base_gguf(model, out + "/base.gguf");
    write_hf_model(model, out + "/hf");

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

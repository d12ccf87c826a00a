// The demo's Llama as files other engines load: a complete llama.cpp model
// (GGUF: architecture metadata, a vocabulary, every tensor under its GGUF name)
// and a Hugging Face checkpoint (model.safetensors + config.json, what
// transformers' LlamaForCausalLM reads).
//
// The tensors are held in Hugging Face's names and layout: q_proj / k_proj
// rows in rotate-half order within each head. The GGUF gets those rows
// permuted to llama.cpp's interleaved RoPE order, as llama.cpp's
// convert_hf_to_gguf.py does (lora::io::permute_rotary_rows; an adapter's B
// rows get the same permutation from save_gguf_adapter).
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <lora/io.hpp>
#include <string>
#include <vector>

#include "model.hpp"

namespace demo {

// A vocabulary as llama.cpp's byte-level BPE tokenizer ("gpt2") reads it:
// each token's text in GPT-2's byte alphabet and its type (1 normal,
// 3 control), and the ids of BOS, EOS and, if any, the unknown token.
//
// Not SentencePiece ("llama"): that tokenizer falls back to the 256 byte
// tokens <0x00>..<0xFF> for a character outside the vocabulary, and llama.cpp
// throws (std::out_of_range, uncaught) when one is missing; node-llama-cpp
// tokenizes strings of its own on loading. BPE drops such characters instead.
struct GgufVocab {
  std::vector<std::string> tokens;
  std::vector<int> types;
  int bos = 0, eos = 0;
  int unknown = -1;  // < 0: none

  static constexpr int kNormal = 1, kUnknown = 2, kControl = 3;
  void add(std::string text, int type) {
    tokens.push_back(std::move(text));
    types.push_back(type);
  }
};

// Byte b as GPT-2's byte-level BPE writes it in a vocabulary: the printable
// bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF as themselves, every other byte as
// the code point 256 + n (n counting those others in byte order): a space is
// U+0120 "Ġ", a line break U+010A "Ċ". UTF-8 encoded.
inline std::string gpt2_byte_text(unsigned char b) {
  auto printable = [](int c) { return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE); };
  int code = b;
  if (!printable(b)) {
    code = 256;
    for (int c = 0; c < b; ++c) code += printable(c) ? 0 : 1;
  }
  std::string utf8;
  if (code < 0x80) {
    utf8 += static_cast<char>(code);
  } else {
    utf8 += static_cast<char>(0xC0 | (code >> 6));
    utf8 += static_cast<char>(0x80 | (code & 0x3F));
  }
  return utf8;
}

// The demo's vocabulary: one token per character, in id order, then
// end_of_text() as the control token llama.cpp uses for BOS and EOS.
inline GgufVocab character_vocab(const std::string& chars) {
  GgufVocab v;
  for (unsigned char c : chars) v.add(gpt2_byte_text(c), GgufVocab::kNormal);
  v.add("</s>", GgufVocab::kControl);
  v.bos = v.eos = static_cast<int>(chars.size());
  return v;
}

// llama.cpp's name of a Hugging Face Llama tensor ("model.layers.3.self_attn.q_proj.weight"
// -> "blk.3.attn_q.weight").
inline std::string gguf_tensor_name(const std::string& hf) {
  static const std::vector<std::pair<std::string, std::string>> kBlock = {
      {"input_layernorm", "attn_norm"},   {"self_attn.q_proj", "attn_q"},
      {"self_attn.k_proj", "attn_k"},     {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"}, {"post_attention_layernorm", "ffn_norm"},
      {"mlp.gate_proj", "ffn_gate"},      {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string prefix = "model.layers.";
  if (hf.compare(0, prefix.size(), prefix) == 0) {
    const std::size_t dot = hf.find('.', prefix.size());
    const std::string layer = hf.substr(prefix.size(), dot - prefix.size()), rest = hf.substr(dot + 1);
    for (const auto& [from, to] : kBlock)
      if (rest == from + ".weight") return "blk." + layer + "." + to + ".weight";
  }
  throw lora::Error("gguf_tensor_name: no llama.cpp name for the tensor '" + hf + "'");
}

// A 1 x d norm weight as the 1-D tensor both formats store.
inline lora::io::RawTensor f32_vector(const lora::cpu::Matrix<float>& m) {
  lora::io::RawTensor t{lora::io::Dtype::F32, {m.size()}, std::vector<std::uint8_t>(static_cast<std::size_t>(m.bytes()))};
  std::memcpy(t.bytes.data(), m.data(), t.bytes.size());  // little-endian hosts only, as the library
  return t;
}

// base.gguf for llama.cpp: general.architecture "llama", its hyperparameters,
// the vocabulary, and every tensor (F32) under its GGUF name.
inline void write_llama_gguf(const ModelConfig& c, const std::vector<std::string>& names,
                             const std::vector<lora::cpu::Matrix<float>>& tensors, const GgufVocab& vocab,
                             const std::string& model_name, const std::string& path) {
  using lora::io::GgufValue;
  LORA_CHECK(static_cast<int>(vocab.tokens.size()) == c.vocab,
             "write_llama_gguf: " << vocab.tokens.size() << " tokens for a vocabulary of " << c.vocab);
  lora::io::GgufWriter w;
  w.set("general.architecture", GgufValue::string("llama"));
  w.set("general.name", GgufValue::string(model_name));
  w.set("llama.vocab_size", GgufValue::u32(static_cast<std::uint32_t>(c.vocab)));
  w.set("llama.context_length", GgufValue::u32(static_cast<std::uint32_t>(c.context)));
  w.set("llama.embedding_length", GgufValue::u32(static_cast<std::uint32_t>(c.d_model)));
  w.set("llama.block_count", GgufValue::u32(static_cast<std::uint32_t>(c.layers)));
  w.set("llama.feed_forward_length", GgufValue::u32(static_cast<std::uint32_t>(c.d_ff)));
  w.set("llama.attention.head_count", GgufValue::u32(static_cast<std::uint32_t>(c.heads)));
  w.set("llama.attention.head_count_kv", GgufValue::u32(static_cast<std::uint32_t>(c.kv_heads)));
  w.set("llama.rope.dimension_count", GgufValue::u32(static_cast<std::uint32_t>(c.head_dim())));
  w.set("llama.rope.freq_base", GgufValue::f32(static_cast<float>(c.rope_theta)));
  w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(static_cast<float>(c.rms_eps)));

  std::vector<GgufValue> types;
  for (int type : vocab.types) types.push_back(GgufValue::i32(type));
  w.set("tokenizer.ggml.model", GgufValue::string("gpt2"));
  w.set("tokenizer.ggml.pre", GgufValue::string("default"));
  w.set("tokenizer.ggml.tokens", GgufValue::strings(vocab.tokens));
  w.set("tokenizer.ggml.token_type", GgufValue::array(lora::io::GgufType::I32, std::move(types)));
  w.set("tokenizer.ggml.merges", GgufValue::strings({}));  // one token per byte: nothing to merge
  w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(static_cast<std::uint32_t>(vocab.bos)));
  w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(static_cast<std::uint32_t>(vocab.eos)));
  if (vocab.unknown >= 0)
    w.set("tokenizer.ggml.unknown_token_id", GgufValue::u32(static_cast<std::uint32_t>(vocab.unknown)));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(false));
  w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(false));

  for (std::size_t i = 0; i < names.size(); ++i) {
    const std::string& hf = names[i];
    const lora::cpu::Matrix<float>& W = tensors[i];
    const std::string gguf = gguf_tensor_name(hf);
    const bool q = hf.find("self_attn.q_proj") != std::string::npos, k = hf.find("self_attn.k_proj") != std::string::npos;
    if (W.rows() == 1) {
      w.add_raw(gguf, f32_vector(W));
    } else if (q || k) {
      w.add(gguf, lora::io::permute_rotary_rows(W, q ? c.heads : c.kv_heads, /*to_gguf=*/true, hf).view(),
            lora::io::Dtype::F32);
    } else {
      w.add(gguf, W.view(), lora::io::Dtype::F32);  // [d_out, d_in] row-major is ggml's ne = [d_in, d_out]
    }
  }
  w.write(path);
}

// DIR/model.safetensors and DIR/config.json, as transformers' LlamaForCausalLM
// reads them (norm weights 1-D, as PyTorch stores them).
inline void write_hf_llama(const ModelConfig& c, const std::vector<std::string>& names,
                           const std::vector<lora::cpu::Matrix<float>>& tensors, const GgufVocab& vocab,
                           const std::string& dir) {
  std::filesystem::create_directories(dir);
  lora::io::SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (tensors[i].rows() == 1)
      w.add(names[i], {tensors[i].size()}, tensors[i].data(), lora::io::Dtype::F32);
    else
      w.add(names[i], tensors[i].view(), lora::io::Dtype::F32);
  }
  w.write(dir + "/model.safetensors");
  const nlohmann::json config = {{"architectures", {"LlamaForCausalLM"}},
                                 {"model_type", "llama"},
                                 {"vocab_size", c.vocab},
                                 {"hidden_size", c.d_model},
                                 {"intermediate_size", c.d_ff},
                                 {"num_hidden_layers", c.layers},
                                 {"num_attention_heads", c.heads},
                                 {"num_key_value_heads", c.kv_heads},
                                 {"head_dim", c.head_dim()},
                                 {"max_position_embeddings", c.context},
                                 {"rope_theta", c.rope_theta},
                                 {"rms_norm_eps", c.rms_eps},
                                 {"hidden_act", "silu"},
                                 {"attention_bias", false},
                                 {"mlp_bias", false},
                                 {"tie_word_embeddings", false},
                                 {"torch_dtype", "float32"},
                                 {"bos_token_id", vocab.bos},
                                 {"eos_token_id", vocab.eos}};
  std::ofstream out(dir + "/config.json");
  out << config.dump(2) << "\n";
  LORA_CHECK(out.good(), "write_hf_llama: writing " << dir << "/config.json failed");
}

}  // namespace demo

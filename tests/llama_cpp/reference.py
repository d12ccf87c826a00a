#!/usr/bin/env python3
"""Hugging Face's Llama forward in float64 numpy, independent of the lora library
and of llama.cpp, for tests/llama_cpp/check.sh.

    reference.py HF_DIR --tokens 5,17,9 [--adapter ADAPTER_DIR --scale 1] [--greedy 32]

HF_DIR holds config.json and model.safetensors in Hugging Face's names and
layout (q_proj / k_proj rows in rotate-half order); ADAPTER_DIR a PEFT adapter
(adapter_config.json, adapter_model.safetensors). Prints JSON
{"probs": [n_vocab], "greedy": [ids]}: the next-token distribution after the
prompt, and the greedy continuation (argmax, fed back).

The forward (modeling_llama.py), x of shape [T, d], positions 0..T-1:
    h = x + o_proj(attn(rmsnorm(x) * w_attn_norm))
    y = h + down(silu(gate(g)) * up(g)),  g = rmsnorm(h) * w_ffn_norm
    rmsnorm(x) = x / sqrt(mean(x^2) + eps)
    attn: q, k rotated by rotate-half RoPE, theta_i = base^(-2i/head_dim),
          q [n_head, T, hd], k/v shared by n_head / n_kv query heads (GQA),
          softmax(q k^T / sqrt(hd) + causal mask) v
    logits = lm_head(rmsnorm(y_last) * w_norm)
An adapted linear layer uses W + s * user_scale * B A, s = alpha / r of the
module (rank_pattern / alpha_pattern as PEFT resolves them; rsLoRA: alpha / sqrt(r)).
"""
import argparse
import json
import re
import struct
import sys

import numpy as np

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def read_safetensors(path):
    """{name: float64 array} from a safetensors file (u64 header size, JSON header, data)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        out[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(info["shape"]).astype(np.float64)
    return out


def pattern_value(patterns, module, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return default


def apply_adapter(weights, adapter_dir, user_scale):
    """W += user_scale * s * B A for each module of the PEFT adapter, in place."""
    with open(f"{adapter_dir}/adapter_config.json") as f:
        config = json.load(f)
    tensors = read_safetensors(f"{adapter_dir}/adapter_model.safetensors")
    prefix = "base_model.model."
    modules = sorted({k[len(prefix) : k.index(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    scales = {}
    for module in modules:
        A = tensors[f"{prefix}{module}.lora_A.weight"]
        B = tensors[f"{prefix}{module}.lora_B.weight"]
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        assert A.shape[0] == r and B.shape[1] == r, f"{module}: A {A.shape}, B {B.shape}, r {r}"
        s = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + user_scale * s * (B @ A)
        scales[module] = s
    return scales


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, theta):
    """Rotate-half RoPE on x [heads, T, hd]: pairs (i, i + hd/2) rotated by position * theta^(-2i/hd)."""
    _, T, hd = x.shape
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    angles = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
    rotated = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], axis=-1)
    return x * cos + rotated * sin


def forward(weights, config, tokens):
    """Next-token logits [n_vocab] after `tokens`."""
    d, n_head, n_kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps, theta = d // n_head, config["rms_norm_eps"], config["rope_theta"]
    T = len(tokens)
    x = weights["model.embed_tokens.weight"][tokens]  # [T, d]
    causal = np.triu(np.full((T, T), -np.inf), k=1)
    for l in range(config["num_hidden_layers"]):
        p = f"model.layers.{l}."
        W = lambda name: weights[p + name + ".weight"]  # noqa: E731
        a = rmsnorm(x, W("input_layernorm"), eps)
        q = (a @ W("self_attn.q_proj").T).reshape(T, n_head, hd).transpose(1, 0, 2)
        k = (a @ W("self_attn.k_proj").T).reshape(T, n_kv, hd).transpose(1, 0, 2)
        v = (a @ W("self_attn.v_proj").T).reshape(T, n_kv, hd).transpose(1, 0, 2)
        q, k = rope(q, theta), rope(k, theta)
        group = n_head // n_kv  # query head h reads key/value head h // group
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal  # [n_head, T, T]
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = (scores / scores.sum(axis=-1, keepdims=True)) @ v  # [n_head, T, hd]
        x = x + attn.transpose(1, 0, 2).reshape(T, d) @ W("self_attn.o_proj").T
        g = rmsnorm(x, W("post_attention_layernorm"), eps)
        gate = g @ W("mlp.gate_proj").T
        x = x + (gate / (1.0 + np.exp(-gate)) * (g @ W("mlp.up_proj").T)) @ W("mlp.down_proj").T
    return rmsnorm(x[-1], weights["model.norm.weight"], eps) @ weights["lm_head.weight"].T


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir")
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--greedy", type=int, default=0)
    args = parser.parse_args()
    with open(f"{args.hf_dir}/config.json") as f:
        config = json.load(f)
    weights = read_safetensors(f"{args.hf_dir}/model.safetensors")
    if args.adapter:
        apply_adapter(weights, args.adapter, args.scale)
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"probs": softmax(forward(weights, config, tokens)).tolist()}
    if args.greedy > 0:
        sequence, result["greedy"] = list(tokens), []
        for _ in range(args.greedy):  # the whole sequence again each step: no cache to get wrong
            sequence.append(int(np.argmax(forward(weights, config, sequence))))
            result["greedy"].append(sequence[-1])
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()

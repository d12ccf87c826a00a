"""Writes DoRA adapters as PEFT saves them, their base models, and what PEFT's DoRA
computes for them, from the rules alone (torch; no peft, no safetensors package,
no lora code), for test_lora_tool.cpp.

  python3 dora_reference.py OUT_DIR

For each case (nn.Linear layout, and GPT-2's Conv1D layout with fan_in_fan_out)
it writes into OUT_DIR/<case>/:
  adapter/adapter_config.json      peft_type LORA, use_dora true, r, lora_alpha, target_modules, ...
  adapter/adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, d_in],
                                   .lora_B.weight [d_out, r], .lora_magnitude_vector [d_out], F32
  model.safetensors                <module>.weight (d_out x d_in; d_in x d_out with fan_in_fan_out), <module>.bias, F32
  <module>.x.f64                   the input x, N x d_in
  <module>.y.f64                   PEFT's DoRA forward of x, unmerged:
                                     n = ||W + s B A||_row (detached: a constant here),
                                     y = x W^T + bias + (m / n - 1) o (x W^T) + (m / n) o s (x A^T) B^T
  <module>.merged.f64              PEFT's DoRA merge, W' = (m / n) o (W + s B A), in the stored layout
All .f64 files are raw little-endian float64, row-major; every value is computed in
float64 from the float32 values the files hold.
"""
import json
import os
import struct
import sys

import torch


def write_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors:
        data = struct.pack("<%df" % t.numel(), *t.to(torch.float32).flatten().tolist())
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_f64(path, t):
    with open(path, "wb") as f:
        f.write(struct.pack("<%dd" % t.numel(), *t.to(torch.float64).flatten().tolist()))


def make(out_dir, case, modules, fan_in_fan_out, seed):
    """modules: (name, d_in, d_out, r, alpha) of each adapted layer; r and alpha of the first are the config's."""
    gen = torch.Generator().manual_seed(seed)
    os.makedirs("%s/%s/adapter" % (out_dir, case), exist_ok=True)
    adapter, model = [], []
    first_r, first_alpha = modules[0][3], modules[0][4]
    rank_pattern, alpha_pattern = {}, {}
    for name, d_in, d_out, r, alpha in modules:
        if r != first_r:
            rank_pattern[name.split(".")[-1]] = r
        if alpha != first_alpha:
            alpha_pattern[name.split(".")[-1]] = alpha
        # float32 values, as a trained adapter holds; everything after is float64 on exactly these values.
        W = torch.randn(d_out, d_in, generator=gen).float().double()
        bias = torch.randn(d_out, generator=gen).float().double()
        A = (torch.rand(r, d_in, generator=gen) * 2 - 1).float().double()
        B = (torch.randn(d_out, r, generator=gen) * 0.3).float().double()
        s = alpha / r
        # PEFT starts m at ||W||_row and training moves it; any positive m will do.
        m = (W.norm(dim=1) * (1 + 0.2 * torch.randn(d_out, generator=gen).double())).float().double()
        x = torch.randn(3, d_in, generator=gen).double()

        n = (W + s * (B @ A)).norm(dim=1).detach()  # one norm per output: a row of the d_out x d_in weight
        scale = (m / n).view(1, -1)
        base = x @ W.T
        y = base + bias + (scale - 1) * base + scale * (s * ((x @ A.T) @ B.T))
        merged = scale.view(-1, 1) * (W + s * (B @ A))  # d_out x d_in
        assert torch.allclose(x @ merged.T + bias, y, rtol=0, atol=1e-12), "merged and unmerged forwards disagree"
        assert torch.allclose(merged.norm(dim=1), m, rtol=1e-12, atol=0), "a merged row's norm is not its magnitude"

        stored_W = W.T.contiguous() if fan_in_fan_out else W  # GPT-2's Conv1D stores W^T
        stored_merged = merged.T.contiguous() if fan_in_fan_out else merged
        prefix = "base_model.model." + name
        adapter += [(prefix + ".lora_A.weight", A), (prefix + ".lora_B.weight", B), (prefix + ".lora_magnitude_vector", m)]
        model += [(name + ".weight", stored_W), (name + ".bias", bias)]
        write_f64("%s/%s/%s.x.f64" % (out_dir, case, name), x)
        write_f64("%s/%s/%s.y.f64" % (out_dir, case, name), y)
        write_f64("%s/%s/%s.merged.f64" % (out_dir, case, name), stored_merged)

    write_safetensors("%s/%s/adapter/adapter_model.safetensors" % (out_dir, case), adapter, {"format": "pt"})
    write_safetensors("%s/%s/model.safetensors" % (out_dir, case), model, {"format": "pt"})
    config = {
        "peft_type": "LORA", "r": first_r, "lora_alpha": first_alpha, "use_dora": True, "use_rslora": False,
        "fan_in_fan_out": fan_in_fan_out, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
        "target_modules": sorted({name.split(".")[-1] for name, *_ in modules}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
    }
    with open("%s/%s/adapter/adapter_config.json" % (out_dir, case), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    out = sys.argv[1]
    # Odd sizes; v_proj with its own rank and alpha (rank_pattern, alpha_pattern).
    make(out, "linear", [("model.layers.0.self_attn.q_proj", 11, 7, 4, 8), ("model.layers.0.self_attn.v_proj", 11, 5, 2, 3)],
         False, 1)
    make(out, "conv1d", [("transformer.h.0.attn.c_attn", 9, 13, 3, 6)], True, 2)

"""Writes an NF4 safetensors file the way transformers + bitsandbytes lay one out,
from the rules alone (no bitsandbytes, no lora code), for test_nf4_files.cpp.

  python3 nf4_reference.py OUT_DIR

For each case it writes OUT_DIR/<case>.safetensors (the NF4 tensors of one
weight "layer.weight", plus a plain "layer.bias") and OUT_DIR/<case>.f32, the
weight dequantized here: raw little-endian float32, row-major. The rules:
  - blocks of `blocksize` values along the flattened row-major weight, absmax
    per block; each value the index of the nearest NF4 code value to w / absmax,
    two per byte, the first in the high nibble; shape [(n + 1) / 2, 1], uint8;
  - double quantization: absmax - mean(absmax) in blocks of 256, each scaled by
    its largest magnitude, nearest entry of the 8-bit dynamic code
    (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8));
  - dequantization: absmax_b = code8[q_b] * nested_absmax[b / 256] + offset,
    w_i = nf4[q_i] * absmax[i / blocksize], each in float32;
  - the quant state JSON is json.dumps of {quant_type, blocksize, dtype, shape,
    nested_blocksize, nested_dtype, nested_offset}, stored as a 1-D uint8 tensor.
"""
import json
import struct
import sys

import torch

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def dynamic_map():
    # signed, 7 exponent bits, 8 bits: for exponent i, 2**i + 1 boundaries in [0.1, 1],
    # the means of neighbours times 10**(i - 6), positive and negative; then 0 and 1.
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    assert len(data) == 256
    return torch.tensor(data, dtype=torch.float32)


def nearest(values, code):
    return (values.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(dim=1)


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def f32_bytes(t):
    return struct.pack("<%df" % t.numel(), *t.to(torch.float32).flatten().tolist())


def make(out_dir, case, rows, cols, blocksize, double_quant, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 0.05).to(dtype)
    flat = w.flatten().to(torch.float32)
    n = flat.numel()
    blocks = (n + blocksize - 1) // blocksize
    padded = torch.zeros(blocks * blocksize)
    padded[:n] = flat
    absmax = padded.view(blocks, blocksize).abs().max(dim=1).values
    code4 = torch.tensor(NF4, dtype=torch.float32)
    normalized = padded.view(blocks, blocksize) * (1.0 / absmax).unsqueeze(1)
    q = nearest(normalized.flatten(), code4)[: n + (n % 2)]  # an odd n packs one pad value 0.0
    packed = (q[0::2] * 16 + q[1::2]).to(torch.uint8)

    dtype_name = str(dtype).split(".")[1]
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype_name, "shape": [rows, cols]}
    name = "layer.weight"
    tensors = [(name, "U8", [packed.numel(), 1], bytes(packed.tolist())),
               (name + ".quant_map", "F32", [16], f32_bytes(code4))]
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        code8 = dynamic_map()
        nested_blocks = (blocks + 255) // 256
        nested_absmax = torch.zeros(nested_blocks)
        q8 = torch.zeros(blocks, dtype=torch.long)
        for b in range(nested_blocks):
            part = centred[b * 256:(b + 1) * 256]
            nested_absmax[b] = part.abs().max()
            q8[b * 256:(b + 1) * 256] = nearest(part * (1.0 / nested_absmax[b]), code8)
        # absmax as dequantized: a float32 product, then a float32 sum.
        scale = nested_absmax[torch.arange(blocks) // 256]
        absmax_used = (code8[q8] * scale) + offset
        state.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset.item()})
        tensors += [(name + ".absmax", "U8", [blocks], bytes(q8.to(torch.uint8).tolist())),
                    (name + ".nested_absmax", "F32", [nested_blocks], f32_bytes(nested_absmax)),
                    (name + ".nested_quant_map", "F32", [256], f32_bytes(code8))]
    else:
        absmax_used = absmax
        tensors.append((name + ".absmax", "F32", [blocks], f32_bytes(absmax)))
    packed_state = json.dumps(state).encode("utf-8")  # as pack_dict_to_tensor
    tensors.append((name + ".quant_state.bitsandbytes__nf4", "U8", [len(packed_state)], packed_state))
    tensors.append(("layer.bias", "F32", [rows], f32_bytes(torch.arange(rows, dtype=torch.float32))))
    write_safetensors("%s/%s.safetensors" % (out_dir, case), tensors)

    dequantized = code4[q[:n]] * absmax_used[torch.arange(n) // blocksize]
    with open("%s/%s.f32" % (out_dir, case), "wb") as f:
        f.write(f32_bytes(dequantized))


if __name__ == "__main__":
    out = sys.argv[1]
    make(out, "double_bf16", 24, 100, 64, True, torch.bfloat16, 1)     # 2400 values: 38 blocks, last one partial
    make(out, "single_f32", 7, 9, 64, False, torch.float32, 2)         # 63 values: an odd n
    make(out, "double_f16_many", 9, 2000, 64, True, torch.float16, 3)  # 282 blocks: two nested blocks
    make(out, "single_b128", 5, 77, 128, False, torch.float32, 4)      # blocksize 128

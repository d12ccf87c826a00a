#!/usr/bin/env python3
"""Our GPU NF4 quantization (bench/device/nf4_dump.cu's files) against bitsandbytes.

Usage: bnb_check.py <dir written by nf4_dump>

With bitsandbytes importable, each case (float32 / bfloat16 / float16, double
quantization off / on) of the seeded tensor is quantized by
bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64,
compress_statistics=...) on the GPU, and its packed bytes, absmax statistics
and dequantize_4bit values are compared with ours. Without it, the script says
so and compares against the reference below: the issue's rules written out in
torch on the CPU (every operation a separate IEEE fp32 op, so no fused
multiply-add), independent of our C++ code. Exit status 0 only when the packed
bytes, the 4-bit absmax / 8-bit indices and the dequantized values all match.

What may legitimately differ (quant/nf4.hpp): the double-quantization offset,
which bitsandbytes takes as torch's fp32 mean of the absmax values and we as
their exact mean rounded once; the two may be an ulp apart, which can move an
8-bit index. The script reports the offsets and, when they differ, compares
the dequantized values of bitsandbytes' own state run through our rules too.
"""
import json
import os
import sys

import numpy as np
import torch

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def create_dynamic_map():
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), as its rules say:
    for each decimal exponent e = -6..0, 2^(e+6) linear fractions: the midpoints of linspace(0.1, 1,
    2^(e+6) + 1) times +-10^e; then 0 and 1; sorted."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def nf4_index(x):
    """Index of each normalized value: the count of code midpoints (double, rounded to float) it is
    strictly above (NaN: none)."""
    mids = torch.tensor([(NF4[i] + NF4[i + 1]) / 2.0 for i in range(15)], dtype=torch.float64).float()
    return (x.unsqueeze(-1) > mids).sum(-1).to(torch.uint8)


def dynamic_index(code, x):
    """dQuantize: a binary search over the code, then the nearer neighbour by float midpoints."""
    n = x.numel()
    pivot = torch.full((n,), 127, dtype=torch.long)
    upper_pivot = torch.full((n,), 255, dtype=torch.long)
    lower_pivot = torch.zeros(n, dtype=torch.long)
    lower = torch.full((n,), -1.0)
    upper = torch.full((n,), 1.0)
    value = code[pivot]
    step = 64
    while step > 0:
        above = x > value
        lower_pivot = torch.where(above, pivot, lower_pivot)
        lower = torch.where(above, value, lower)
        upper_pivot = torch.where(above, upper_pivot, pivot)
        upper = torch.where(above, upper, value)
        pivot = torch.where(above, pivot + step, pivot - step)
        value = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[upper_pivot], upper)
    lower = torch.where(lower_pivot == 0, code[lower_pivot], lower)
    above = x > value
    up = torch.where(x > (upper + value) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + value) * 0.5, lower_pivot, pivot)
    return torch.where(above, up, down).to(torch.uint8)


def reference(w, blocksize, double_quant, nested_blocksize=256):
    """The issue's rules in torch (CPU, fp32): packed, absmax or (absmax_q, nested_absmax, code, offset),
    and the dequantized values in fp32."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    blocks = (n + blocksize - 1) // blocksize
    padded = torch.zeros(blocks * blocksize)
    padded[:n] = flat
    padded = padded.view(blocks, blocksize)
    absmax = padded.abs().max(1).values
    normalized = padded * (1.0 / absmax).unsqueeze(1)  # 1 / absmax as a float reciprocal, then a product
    q = nf4_index(normalized).reshape(-1)[: n + (n % 2)]  # an odd n's pad: a zero value of the last block
    packed = (q[0::2] << 4) | q[1::2]
    out = {"packed": packed}
    if double_quant:
        offset = torch.tensor(absmax.double().mean().item(), dtype=torch.float32)
        code = create_dynamic_map()
        centered = absmax - offset
        nb = (blocks + nested_blocksize - 1) // nested_blocksize
        pad = torch.zeros(nb * nested_blocksize)
        pad[:blocks] = centered
        nested = pad.view(nb, nested_blocksize).abs().max(1).values
        normalized8 = (pad.view(nb, nested_blocksize) * (1.0 / nested).unsqueeze(1)).reshape(-1)[:blocks]
        absmax_q = dynamic_index(code, normalized8)
        scale = code[absmax_q.long()] * nested.repeat_interleave(nested_blocksize)[:blocks]
        block_absmax = scale + offset  # two separate fp32 ops: no fused multiply-add
        out.update(absmax_q=absmax_q, nested_absmax=nested, nested_code=code, offset=offset.item())
    else:
        block_absmax = absmax
        out.update(absmax=absmax)
    codes = torch.tensor(NF4, dtype=torch.float32)
    out["dequant"] = codes[q[:n].long()] * block_absmax.repeat_interleave(blocksize)[:n]
    return out


def load(path, dtype, count=None):
    data = np.fromfile(path, dtype=dtype)
    return torch.from_numpy(data if count is None else data[:count])


def same_bits(a, b):
    a, b = a.contiguous().cpu(), b.contiguous().cpu()
    return a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                                              b.view(torch.uint8) if b.dtype != torch.uint8 else b)


def report(name, ok, detail=""):
    print(f"  {name:28s} {'EQUAL' if ok else 'DIFFERENT'}{'  ' + detail if detail else ''}")
    return ok


def mismatches(a, b):
    a, b = a.reshape(-1).cpu(), b.reshape(-1).cpu()
    if a.shape != b.shape:
        return f"sizes {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a.view(torch.int32) != b.view(torch.int32)) if a.dtype == torch.float32 else (a != b)
    return f"{int(diff.sum())} of {a.numel()} differ"


def main():
    directory = sys.argv[1]
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    rows, cols, blocksize = meta["rows"], meta["cols"], meta["blocksize"]
    w = load(os.path.join(directory, "input.bin"), np.float32).view(rows, cols)
    try:
        import bitsandbytes.functional as bnbf
        print(f"bitsandbytes {__import__('bitsandbytes').__version__}: comparing with its quantize_4bit / dequantize_4bit")
    except Exception as e:  # absent or unusable: the torch reference instead
        bnbf = None
        print(f"bitsandbytes is absent here ({type(e).__name__}: {e}); comparing with the torch reference of the rules")
    all_ok = True
    for case in meta["cases"]:
        dtype, dq, prefix = case["dtype"], case["double_quant"], os.path.join(directory, case["prefix"])
        print(f"{rows} x {cols} {dtype} double_quant={dq}")
        ours_packed = load(prefix + "packed.bin", np.uint8)
        ours_dequant = load(prefix + "dequant.bin", np.float32)
        x = w.to(DTYPES[dtype])
        if bnbf is not None:
            q, state = bnbf.quantize_4bit(x.cuda(), blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
            theirs = {"packed": q.reshape(-1).cpu(),
                      "dequant": bnbf.dequantize_4bit(q, state, quant_type="nf4").float().reshape(-1).cpu()}
            if dq:
                theirs.update(absmax_q=state.absmax.reshape(-1).cpu(), nested_absmax=state.state2.absmax.float().cpu(),
                              nested_code=state.state2.code.float().cpu(), offset=float(state.offset))
            else:
                theirs["absmax"] = state.absmax.float().cpu()
        else:
            theirs = reference(x.float(), blocksize, dq, meta["nested_blocksize"])
            theirs["dequant"] = theirs["dequant"].to(DTYPES[dtype]).float()
        ok = report("packed", same_bits(ours_packed, theirs["packed"]), mismatches(ours_packed, theirs["packed"]))
        if dq:
            ok &= report("absmax_q (8-bit)", same_bits(load(prefix + "absmax_q.bin", np.uint8), theirs["absmax_q"]),
                         mismatches(load(prefix + "absmax_q.bin", np.uint8), theirs["absmax_q"]))
            ok &= report("nested_absmax", same_bits(load(prefix + "nested_absmax.bin", np.float32), theirs["nested_absmax"]))
            report("nested_code (informative)", same_bits(load(prefix + "nested_code.bin", np.float32), theirs["nested_code"]),
                   mismatches(load(prefix + "nested_code.bin", np.float32), theirs["nested_code"]))
            ours_offset = np.float32(case["offset"])
            report("offset (informative)", ours_offset == np.float32(theirs["offset"]),
                   f"ours {float(ours_offset)!r} theirs {theirs['offset']!r}")
        else:
            ok &= report("absmax", same_bits(load(prefix + "absmax.bin", np.float32), theirs["absmax"]))
        ok &= report("dequantized values", same_bits(ours_dequant, theirs["dequant"]),
                     mismatches(ours_dequant, theirs["dequant"]))
        all_ok &= bool(ok)
    print("NF4 CHECK: " + ("all equal" if all_ok else "DIFFERENCES FOUND") +
          (" (against bitsandbytes)" if bnbf is not None else " (against the torch reference; bitsandbytes absent)"))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

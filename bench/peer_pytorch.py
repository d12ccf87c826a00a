#!/usr/bin/env python3
"""The PyTorch peer of bench_linear / bench_memory: the same layer as PEFT computes it.

  lora   y = base(x) + lora_B(lora_A(dropout(x))) * scaling, base frozen, AdamW over A and B
         (peft.tuners.lora.layer.Linear.forward, unmerged, one adapter)
  full   the same nn.Linear fully fine-tuned, AdamW over W
  floor  the two frozen GEMMs alone: y = x W^T and dL/dx = dL/dy W

Every step is a training step inside a network: x requires grad (dL/dx is computed)
and dL/dy is a fixed random tensor handed back by "the next layer". No bias, float32.
Run one mode per process so that the peak RSS belongs to that mode alone.

Prints one machine-parseable line per timed step and one summary line, key=value:
  peer=pytorch mode=lora d=4096 n=2048 r=16 dropout=0 threads=2 step=3 ms=812.41
  peer=pytorch mode=lora ... steps=10 median_ms=... min_ms=... max_ms=... peak_rss_kb=... base_rss_kb=... torch=1.13.1
Usage: peer_pytorch.py --mode lora --d 4096 --n 2048 --r 16 --threads 2 --steps 5
"""
import argparse
import math
import os
import resource
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F


class LoraLinear(nn.Module):
    """PEFT's LoRA Linear, reduced to one adapter without merging."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.base_layer.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        # PEFT starts B at zero; give it values as after some training, as bench_linear does.
        nn.init.uniform_(self.lora_B.weight, -1e-2, 1e-2)

    def forward(self, x):
        result = self.base_layer(x)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["lora", "full", "floor"], required=True)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base_rss = rss_kb()  # torch imported, nothing allocated yet

    d, n = args.d, args.n
    x = torch.rand(n, d).mul_(2).sub_(1)
    dL_dy = torch.rand(n, d).mul_(2e-3).sub_(1e-3)
    base = nn.Linear(d, d, bias=False)

    if args.mode == "lora":
        model = LoraLinear(base, args.r, alpha=2.0 * args.r, dropout=args.dropout)
        opt = torch.optim.AdamW([model.lora_A.weight, model.lora_B.weight], lr=1e-4, weight_decay=1e-2)
    elif args.mode == "full":
        model = base
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    else:
        model, opt = None, None
        W = base.weight.detach()
    x.requires_grad_(args.mode != "floor")

    def step():
        if model is None:
            y = F.linear(x, W)  # x W^T
            dL_dx = dL_dy.mm(W)  # dL/dy W
            return y, dL_dx
        x.grad = None
        opt.zero_grad(set_to_none=True)
        y = model(x)
        y.backward(dL_dy)
        opt.step()
        return y

    tag = (f"peer=pytorch mode={args.mode} d={d} n={n} r={args.r if args.mode == 'lora' else 0} "
           f"dropout={args.dropout:g} threads={torch.get_num_threads()}")
    for _ in range(args.warmup):
        step()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step()
        ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        print(f"{tag} step={i} ms={ms:.2f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{tag} steps={len(times)} median_ms={statistics.median(times):.2f} min_ms={min(times):.2f} "
          f"max_ms={max(times):.2f} peak_rss_kb={peak} base_rss_kb={base_rss} torch={torch.__version__}", flush=True)


if __name__ == "__main__":
    main()

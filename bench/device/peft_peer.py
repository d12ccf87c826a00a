#!/usr/bin/env python3
"""The PEFT peer of bench_cuda: the same LoRA layer in PyTorch + Hugging Face PEFT on the GPU.

  base   nn.Linear(d_in, d_out, bias=False) in bf16, frozen (PEFT freezes it)
  lora   LoraConfig(r=16, lora_alpha=16, lora_dropout=0, target_modules=["proj"]) via get_peft_model,
         with PEFT's defaults (recent PEFT keeps the adapter in fp32 over a bf16 base,
         autocast_adapter_dtype=True; the printed adapter_dtype= says what it chose), or with
         --adapter-dtype base the adapter in the base's dtype (autocast_adapter_dtype=False)
  step   y = model(x); y.backward(dL_dy); AdamW.step(); zero_grad()   x requires grad, so dL/dx is
         computed, as bench_cuda's layer computes it; B starts non-zero, as in bench_cuda
TF32 is off (torch.backends.cuda.matmul.allow_tf32 = False), as in the lora library by default.
Steps run back to back in groups of --inner, each group timed with CUDA events (GPU time,
including any wait for Python to launch work), as bench_cuda times 10 calls per iteration;
the median over the groups of the time per step is reported.

With --adapters K (K > 1) it times inference instead: K adapters added with add_adapter (same
config, B random), x as K sequences of tokens / K rows, and model(x, adapter_names=[...]) with
each sequence naming its own adapter (PEFT's mixed batch, which PEFT allows in eval mode only),
beside one adapter over the whole batch (bench_cuda's BM_MixedBatchInference / BM_LoraInference).

Prints key=value lines, machine-parseable:
  peer=peft what=fwd_bwd  ... median_ms=... tflops=...
  peer=peft what=train_step ... median_ms=... tflops=...
or, with --adapters K:
  peer=peft what=inference ... median_ms=...
  peer=peft what=mixed_inference ... median_ms=...
TFLOP/s count the same FLOPs as bench_cuda: 2 frozen GEMMs (x W^T, dL_dy W) + 6 small LoRA GEMMs
(inference: x W^T + 2 small GEMMs).
"""
import argparse
import statistics
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="N, rows of x (default 8192)")
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--d-out", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100, help="timed steps (default 100)")
    ap.add_argument("--inner", type=int, default=10, help="steps per timed group (default 10)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--adapter-dtype", choices=["peft", "base"], default="peft",
                    help="peft: PEFT's default (autocast_adapter_dtype=True: fp32 adapters over a 16-bit base); "
                         "base: autocast_adapter_dtype=False, the adapter in the base's dtype")
    ap.add_argument("--adamw", choices=["default", "foreach", "fused"], default="default",
                    help="torch.optim.AdamW implementation (default: PyTorch's choice, foreach on CUDA)")
    ap.add_argument("--adapters", type=int, default=1,
                    help="K > 1: time inference of a mixed batch over K adapters (adapter_names) instead")
    return ap.parse_args(argv)


def lora_flops(n, d_in, d_out, r):
    """2 frozen GEMMs + the 6 small LoRA GEMMs of forward and backward (as bench_cuda counts)."""
    return 2.0 * (2.0 * n * d_in * d_out) + 2.0 * n * r * (3.0 * d_in + 3.0 * d_out)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from torch import nn

    try:
        import peft
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        print(f"peer=peft error=no_peft detail={e!r}")
        return 2
    if not torch.cuda.is_available():
        print("peer=peft error=no_cuda_device")
        return 2

    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(args.d_in, args.d_out, bias=False)

        def forward(self, x):
            return self.proj(x)

    model = Model().to(device=device, dtype=dtype)
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=["proj"],
                        bias="none")
    model = get_peft_model(model, config, autocast_adapter_dtype=args.adapter_dtype == "peft")
    trainable = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable.append(p)
            if "lora_B" in name:
                with torch.no_grad():
                    p.uniform_(-1e-2, 1e-2)
    adapter_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    kwargs = {}
    if args.adamw == "foreach":
        kwargs["foreach"] = True
    elif args.adamw == "fused":
        kwargs["fused"] = True
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, **kwargs)

    x = (torch.rand(args.tokens, args.d_in, device=device) * 2 - 1).to(dtype).requires_grad_(True)
    dL_dy = ((torch.rand(args.tokens, args.d_out, device=device) * 2 - 1) * 1e-3).to(dtype)

    def fwd_bwd():
        x.grad = None  # written, not accumulated, like the layer's dL_dx
        y = model(x)
        y.backward(dL_dy)

    def train_step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def time_ms(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(max(1, args.steps // args.inner)):
            start.record()
            for _ in range(args.inner):
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / args.inner)
        return times

    if args.adapters > 1:
        return mixed_inference(args, torch, model, config, x, dtype, time_ms, adapter_dtypes, peft)

    flops = lora_flops(args.tokens, args.d_in, args.d_out, args.r)
    common = (f"peer=peft gpu={torch.cuda.get_device_name(0).replace(' ', '_')} dtype={args.dtype} "
              f"adapter_dtype={'/'.join(adapter_dtypes)} n={args.tokens} d_in={args.d_in} d_out={args.d_out} "
              f"r={args.r} dropout={args.dropout} adamw={args.adamw} steps={args.steps} inner={args.inner} "
              f"torch={torch.__version__} peft={peft.__version__}")
    for what, fn in (("fwd_bwd", fwd_bwd), ("train_step", train_step)):
        times = time_ms(fn)
        median = statistics.median(times)
        print(f"{common} what={what} median_ms={median:.4f} min_ms={min(times):.4f} max_ms={max(times):.4f} "
              f"gflops={flops / (median * 1e-3) * 1e-9:.1f} tflops={flops / (median * 1e-3) * 1e-12:.2f}",
              flush=True)
    return 0


def mixed_inference(args, torch, model, config, x, dtype, time_ms, adapter_dtypes, peft):
    """One adapter over the batch, then K adapters, one per sequence, in eval mode."""
    k = args.adapters
    if args.tokens % k != 0:
        print(f"peer=peft error=tokens_not_divisible tokens={args.tokens} adapters={k}")
        return 2
    names = ["default"] + [f"adapter_{i}" for i in range(1, k)]
    for name in names[1:]:
        model.add_adapter(name, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.uniform_(-1e-2, 1e-2)
    model.eval()
    batch = x.detach().reshape(k, args.tokens // k, args.d_in)
    per_sequence = [names[i] for i in range(k)]

    def inference():
        with torch.no_grad():
            model(batch)

    def mixed():
        with torch.no_grad():
            model(batch, adapter_names=per_sequence)

    flops = 2.0 * args.tokens * args.d_in * args.d_out + 2.0 * args.tokens * args.r * (args.d_in + args.d_out)
    common = (f"peer=peft gpu={torch.cuda.get_device_name(0).replace(' ', '_')} dtype={args.dtype} "
              f"adapter_dtype={'/'.join(adapter_dtypes)} n={args.tokens} d_in={args.d_in} d_out={args.d_out} "
              f"r={args.r} adapters={k} steps={args.steps} inner={args.inner} "
              f"torch={torch.__version__} peft={peft.__version__}")
    for what, fn in (("inference", inference), ("mixed_inference", mixed)):
        times = time_ms(fn)
        median = statistics.median(times)
        print(f"{common} what={what} median_ms={median:.4f} min_ms={min(times):.4f} max_ms={max(times):.4f} "
              f"tflops={flops / (median * 1e-3) * 1e-12:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

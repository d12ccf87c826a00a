// Speed of the LoRA layer on the CPU, beside the two baselines every ratio
// needs, in one binary and one run:
//   BM_LoraForward / BM_LoraForwardBackward / BM_LoraStep   the layer (step = fwd + bwd + AdamW)
//   BM_FrozenGemms      x W^T and dL_dy W alone: the floor of a LoRA step
//   BM_FullFineTune     the same layer with W trained (+ dL_dW and AdamW over W)
//   BM_LoraStepDropout  a step with lora_dropout = 0.1
//   BM_Nf4LoraStep      the LoRA step over an NF4 copy of W (QLoRA), same shapes: its
//                       ratio to BM_LoraStep is the cost of the 4-bit base (counter
//                       base_B/param: bytes of the frozen W per weight, 4 for dense)
//   BM_DoraStep         the same step with a DoRA adapter (Config.use_dora), same shapes: its
//                       ratio to BM_LoraStep is DoRA's cost (W A^T, d x d x r, for the norms;
//                       the column scalings; x W^T kept for dL/dm)
//   BM_Nf4Dequantize    nf4::dequantize_rows alone, on one thread and as the backend's op (ns/value)
//   BM_Part_*           the pieces of a LoRA step (skinny GEMMs, dropout, AdamW, DoRA's W A^T), to see where time goes
// Counters: FLOP/s (the GEMMs' 2 m n k, see workload.hpp) and bytes_per_second
// (every tensor read or written once: a lower bound of the memory traffic).
// Times are wall clock (the GEMMs are multithreaded), in ms per iteration.
//
// The default run takes ~100 s on 2 cores (d = 4096, N = 2048 steps take ~1 s
// each). Narrow it with --benchmark_filter, e.g. 'BM_LoraStep/d:4096/N:2048/r:16'.
#include <benchmark/benchmark.h>

#include <memory>
#include <string>
#include <typeinfo>

#include "workload.hpp"

namespace {

using lora::bench::Shape;

// Google Benchmark calls a benchmark function several times (to find an
// iteration count, and once per repetition); building a 4096 x 4096 workload
// each time would cost more than the step. One workload is kept alive,
// rebuilt only when the type or shape changes, and warmed up with one untimed
// step (page faults, thread pools) when built.
template <class Workload>
Workload& cached(const Shape& s) {
  static std::shared_ptr<void> slot;
  static std::string key;
  const std::string want = std::string(typeid(Workload).name()) + s.name() + "_p" + std::to_string(s.dropout);
  if (!slot || key != want) {
    slot.reset();  // free the previous one before allocating the next
    auto fresh = std::make_shared<Workload>(s);
    fresh->step();
    slot = fresh;
    key = want;
  }
  return *static_cast<Workload*>(slot.get());
}

Shape lora_shape(const benchmark::State& state, double dropout = 0.0) {
  return Shape{state.range(0), state.range(1), static_cast<int>(state.range(2)), dropout};
}

void set_counters(benchmark::State& state, double flops, double bytes) {
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
}

constexpr double kF = sizeof(float);

// Bytes of the tensors each phase touches once. x, y, dL_dy, dL_dx, W: N d or d^2;
// A, B and their gradients: r d each; Adam reads param, grad, m, v and writes param, m, v.
// W is counted at its stored size, w_bytes per weight (4 in fp32, ~0.52 in NF4).
double lora_forward_bytes(const Shape& s, double w_bytes = kF) {
  const double nd = double(s.n) * s.d, dd = double(s.d) * s.d, rd = double(s.r) * s.d;
  return kF * (2 * nd + 2 * rd) + w_bytes * dd;  // x, y, A, B; W
}
double lora_backward_bytes(const Shape& s, double w_bytes = kF) {
  const double nd = double(s.n) * s.d, dd = double(s.d) * s.d, rd = double(s.r) * s.d;
  return kF * (3 * nd + 4 * rd) + w_bytes * dd;  // x, dL_dy, dL_dx, A, B, dL_dA, dL_dB; W
}
double adam_bytes(double params) { return kF * 7 * params; }

void BM_LoraForward(benchmark::State& state) {
  const Shape s = lora_shape(state);
  auto& w = cached<lora::bench::LoraWorkload>(s);
  for (auto _ : state) w.forward();
  set_counters(state, s.forward_flops(), lora_forward_bytes(s));
}

void BM_LoraForwardBackward(benchmark::State& state) {
  const Shape s = lora_shape(state);
  auto& w = cached<lora::bench::LoraWorkload>(s);
  for (auto _ : state) {
    w.forward();
    w.backward();
  }
  set_counters(state, s.forward_flops() + s.backward_flops(), lora_forward_bytes(s) + lora_backward_bytes(s));
}

template <class Workload>
void lora_step(benchmark::State& state, double dropout) {
  const Shape s = lora_shape(state, dropout);
  auto& w = cached<Workload>(s);
  for (auto _ : state) w.step();
  const double w_bytes = w.base_bytes_per_parameter();
  set_counters(state, s.forward_flops() + s.backward_flops(),
               lora_forward_bytes(s, w_bytes) + lora_backward_bytes(s, w_bytes) +
                   adam_bytes(double(w.trainable_parameters())));
  state.counters["trainable"] = double(w.trainable_parameters());
  state.counters["base_B/param"] = w_bytes;
}
void BM_LoraStep(benchmark::State& state) { lora_step<lora::bench::LoraWorkload>(state, 0.0); }
void BM_LoraStepDropout(benchmark::State& state) { lora_step<lora::bench::LoraWorkload>(state, 0.1); }
// The same step over the NF4 base: each of forward and backward dequantizes W
// tile by tile (Nf4Base::kTileElements values each) and runs one GEMM per tile.
void BM_Nf4LoraStep(benchmark::State& state) { lora_step<lora::bench::Nf4LoraWorkload>(state, 0.0); }
// DoRA: FLOP/s counts the LoRA step's GEMMs only (its W A^T adds 2 d^2 r per step).
void BM_DoraStep(benchmark::State& state) { lora_step<lora::bench::DoraWorkload>(state, 0.0); }

void BM_FrozenGemms(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), 0, 0.0};
  auto& w = cached<lora::bench::FrozenGemms>(s);
  for (auto _ : state) w.step();
  const double nd = double(s.n) * s.d, dd = double(s.d) * s.d;
  set_counters(state, 2 * s.base_gemm_flops(), kF * (4 * nd + dd));
}

void BM_FullFineTune(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), 0, 0.0};
  auto& w = cached<lora::bench::FullFineTune>(s);
  for (auto _ : state) w.step();
  const double nd = double(s.n) * s.d, dd = double(s.d) * s.d;
  set_counters(state, 3 * s.base_gemm_flops(), kF * (4 * nd + 2 * dd) + adam_bytes(dd));
  state.counters["trainable"] = dd;
}

// ---- NF4 dequantization alone ------------------------------------------------
// rows x d values of the d x d NF4 W (double quantization) into an fp32 tile,
// as Nf4Base does once per tile in forward and again in backward. backend = 0:
// nf4::dequantize_rows; backend = 1: cpu::Backend::nf4_dequantize_rows (the
// base's call: the same on the calling thread, after its checks). Counter ns/value
// (wall clock), and bytes_per_second for the fp32 values written.
struct Nf4Tile {
  explicit Nf4Tile(const Shape& s) : weight(lora::bench::quantized_weight(s)), tile(s.n, s.d) {}
  void step() { dequantize(true); }
  void dequantize(bool backend) {
    if (backend) {
      lora::cpu::Backend::nf4_dequantize_rows<float>(ctx, weight.view(), 0, tile.view());
    } else {
      lora::nf4::dequantize_rows(weight.view(), 0, tile.rows(), tile.data(), tile.cols());
    }
  }

  lora::cpu::Context ctx;
  lora::nf4::Weight weight;
  lora::bench::Mat tile;
};
void BM_Nf4Dequantize(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), 0, 0.0};  // n: rows per tile
  auto& t = cached<Nf4Tile>(s);
  const bool backend = state.range(2) != 0;
  for (auto _ : state) t.dequantize(backend);
  const double values = double(s.n) * double(s.d);
  state.counters["ns/value"] =
      benchmark::Counter(values * 1e-9, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.SetBytesProcessed(static_cast<std::int64_t>(kF * values) * state.iterations());
}

// ---- the pieces of a LoRA step, each alone ----------------------------------
// Same buffers and calls as the layer makes (layers/linear.hpp), at one shape.
struct Parts {
  explicit Parts(const Shape& s)
      : shape(s), x(s.n, s.d), y(s.n, s.d), dL_dy(s.n, s.d), dL_dx(s.n, s.d), A(s.r, s.d), B(s.d, s.r),
        dL_dA(s.r, s.d), dL_dB(s.d, s.r), xa(s.n, s.r), g(s.n, s.r) {
    for (auto* mat : {&x, &y, &dL_dy, &dL_dx, &A, &B, &xa, &g}) lora::bench::fill_uniform(*mat, 11, 1.0f);
  }
  void step() {}  // for cached(): nothing to warm up beyond the first touch in the fill

  Shape shape;
  lora::cpu::Context ctx;
  lora::bench::Mat x, y, dL_dy, dL_dx, A, B, dL_dA, dL_dB, xa, g;
};

using lora::Op;
using Cpu = lora::cpu::Backend;

template <class Body>
void run_part(benchmark::State& state, double flops, double bytes, Body body) {
  const Shape s = lora_shape(state);
  auto& p = cached<Parts>(s);
  for (auto _ : state) body(p);
  set_counters(state, flops, bytes);
}

// Each skinny GEMM is 2 N d r FLOPs and streams one N x d matrix (two when it adds into one).
double skinny_flops(const benchmark::State& st) { return 2.0 * double(st.range(0)) * double(st.range(1)) * double(st.range(2)); }
double nd_bytes(const benchmark::State& st) { return kF * double(st.range(0)) * double(st.range(1)); }

// xa = x A^T                 (N x r) = (N x d)(d x r)
void BM_Part_xAt(benchmark::State& st) {
  run_part(st, skinny_flops(st), nd_bytes(st), [](Parts& p) {
    Cpu::gemm<float, float>(p.ctx, Op::N, Op::T, 1.0, p.x.view(), p.A.view(), 0.0, p.xa.view());
  });
}
// y += s xa B^T              (N x d) = (N x r)(r x d)
void BM_Part_yPlusXaBt(benchmark::State& st) {
  run_part(st, skinny_flops(st), 2 * nd_bytes(st), [](Parts& p) {
    Cpu::gemm<float, float>(p.ctx, Op::N, Op::T, 2.0, p.xa.view(), p.B.view(), 1.0, p.y.view());
  });
}
// g = dL_dy B                (N x r) = (N x d)(d x r)
void BM_Part_dyB(benchmark::State& st) {
  run_part(st, skinny_flops(st), nd_bytes(st), [](Parts& p) {
    Cpu::gemm<float, float>(p.ctx, Op::N, Op::N, 1.0, p.dL_dy.view(), p.B.view(), 0.0, p.g.view());
  });
}
// dL_dB = s dL_dy^T xa       (d x r) = (d x N)(N x r)
void BM_Part_dB(benchmark::State& st) {
  run_part(st, skinny_flops(st), nd_bytes(st), [](Parts& p) {
    Cpu::gemm<float, float>(p.ctx, Op::T, Op::N, 2.0, p.dL_dy.view(), p.xa.view(), 0.0, p.dL_dB.view());
  });
}
// dL_dA = s g^T x            (r x d) = (r x N)(N x d)
void BM_Part_dA(benchmark::State& st) {
  run_part(st, skinny_flops(st), nd_bytes(st), [](Parts& p) {
    Cpu::gemm<float, float>(p.ctx, Op::T, Op::N, 2.0, p.g.view(), p.x.view(), 0.0, p.dL_dA.view());
  });
}
// dL_dx += s g A             (N x d) = (N x r)(r x d)
void BM_Part_dxPlusGA(benchmark::State& st) {
  run_part(st, skinny_flops(st), 2 * nd_bytes(st), [](Parts& p) {
    Cpu::gemm<float, float>(p.ctx, Op::N, Op::N, 2.0, p.g.view(), p.A.view(), 1.0, p.dL_dx.view());
  });
}
// DoRA's W A^T through DenseBase::weight_matmul, once per forward (d x r) = (d x d)(d x r):
// 2 d^2 r FLOPs, streaming W once.
struct WeightPart {
  explicit WeightPart(const Shape& s) : W(s.d, s.d), A(s.r, s.d), WAt(s.d, s.r) {
    lora::bench::fill_uniform(W, 3, 1.0f);
    lora::bench::fill_uniform(A, 5, 1.0f);
  }
  void step() {}
  lora::cpu::Context ctx;
  lora::bench::Mat W, A, WAt;
};
void BM_Part_DoraWAt(benchmark::State& st) {
  const Shape s = lora_shape(st);
  auto& p = cached<WeightPart>(s);
  lora::cpu::DenseBase<float> base(p.ctx, p.W.view());
  for (auto _ : st) base.weight_matmul(p.A.view(), p.WAt.view());
  set_counters(st, 2.0 * double(s.d) * double(s.d) * s.r, kF * double(s.d) * double(s.d));
}
// drop(x) into a workspace, p = 0.1 (the layer does this 3 times per step with dropout on)
void BM_Part_Dropout(benchmark::State& st) {
  run_part(st, 0.0, 2 * nd_bytes(st), [](Parts& p) {
    Cpu::dropout<float>(p.ctx, p.x.view(), p.dL_dx.view(), 0.1f, 7, 0, 3);
  });
}
// One AdamW step of lora::Adam over a rows x cols tensor: the r (d + d)
// elements of A and B (BM_Part_AdamLora), or the d^2 of W (BM_Part_AdamFull).
struct AdamPart {
  explicit AdamPart(const Shape& s)
      : value(s.r, s.d), grad(s.r, s.d), adam(ctx, lora::AdamOptions::adamw(1e-4)) {
    lora::bench::fill_uniform(value, 12, 1.0f);
    lora::bench::fill_uniform(grad, 13, 1e-3f);
    adam.add_group({lora::Parameter<float>{value.view(), grad.view(), "p"}});
  }
  void step() { adam.step(); }

  lora::cpu::Context ctx;
  lora::bench::Mat value, grad;
  lora::cpu::Adam<float> adam;
};
void adam_part(benchmark::State& st, std::int64_t rows, std::int64_t cols) {
  auto& p = cached<AdamPart>(Shape{cols, 0, static_cast<int>(rows), 0.0});
  for (auto _ : st) p.step();
  set_counters(st, 0.0, adam_bytes(double(rows) * double(cols)));
}
void BM_Part_AdamLora(benchmark::State& st) { adam_part(st, 2 * st.range(2), st.range(0)); }
void BM_Part_AdamFull(benchmark::State& st) { adam_part(st, st.range(0), st.range(0)); }

const std::vector<std::int64_t> kDims = {1024, 4096};
const std::vector<std::int64_t> kTokens = {512, 2048};
const std::vector<std::int64_t> kRanks = {8, 16, 64};

// The grid of issue 4, and one token (N = 1: decoding, where x W^T is a GEMV).
void lora_args(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({kDims, kTokens, kRanks})->Args({4096, 1, 16})->ArgNames({"d", "N", "r"});
}
void base_args(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({kDims, kTokens})->Args({4096, 1})->ArgNames({"d", "N"});
}
// The pieces at the target shape of issue 4, at r = 64, and at the smallest shape.
void part_args(benchmark::internal::Benchmark* b) {
  b->Args({4096, 2048, 16})->Args({4096, 2048, 64})->Args({1024, 512, 8})->Args({1024, 512, 16})->ArgNames({"d", "N", "r"});
}

}  // namespace

#define LORA_BENCH(fn, args) BENCHMARK(fn)->Apply(args)->UseRealTime()->Unit(benchmark::kMillisecond)
LORA_BENCH(BM_FrozenGemms, base_args);
LORA_BENCH(BM_LoraForward, lora_args);
LORA_BENCH(BM_LoraForwardBackward, lora_args);
LORA_BENCH(BM_LoraStep, lora_args);
LORA_BENCH(BM_Nf4LoraStep, lora_args);
LORA_BENCH(BM_DoraStep, lora_args);
LORA_BENCH(BM_FullFineTune, base_args);
BENCHMARK(BM_LoraStepDropout)
    ->ArgsProduct({kDims, kTokens, {16}})
    ->ArgNames({"d", "N", "r"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
LORA_BENCH(BM_Part_xAt, part_args);
LORA_BENCH(BM_Part_yPlusXaBt, part_args);
LORA_BENCH(BM_Part_dyB, part_args);
LORA_BENCH(BM_Part_dB, part_args);
LORA_BENCH(BM_Part_dA, part_args);
LORA_BENCH(BM_Part_dxPlusGA, part_args);
LORA_BENCH(BM_Part_Dropout, part_args);
LORA_BENCH(BM_Part_DoraWAt, part_args);
LORA_BENCH(BM_Part_AdamLora, part_args);
// One default tile of Nf4Base at d = 4096 (1024 rows), and the whole W.
BENCHMARK(BM_Nf4Dequantize)
    ->ArgsProduct({{4096}, {1024, 4096}, {0, 1}})
    ->ArgNames({"d", "rows", "backend"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Part_AdamFull)->Args({4096, 2048, 0})->ArgNames({"d", "N", "r"})->UseRealTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();

// The CUDA backend at issue 3's shape: N = 8192 tokens, d_in = d_out = 4096,
// r = 16, bf16 activations and W (A, B, gradients, Adam state in fp32).
// Measured side by side in one binary and one run, GPU time by CUDA events:
//   BM_BareGemm              y = x W^T through cuBLAS: the ceiling
//   BM_FrozenForwardBackward x W^T and dL_dy W alone: what the frozen layer costs
//   BM_LoraForwardBackward   Linear::forward(train) + Linear::backward (dL_dx, dL_dA, dL_dB)
//   BM_LoraTrainStep         the same plus the fused AdamW step
//   BM_BackwardGemm          dL_dx = dL_dy W alone (the other frozen GEMM)
//   BM_LoraGemm/0..5         each small GEMM of the layer alone, with GB/s, to
//                            show where the time beyond the frozen GEMMs goes
//   BM_Nf4LoraStep           BM_LoraTrainStep over the same W quantized to NF4
//                            (cuda::Nf4Base, double quantization): each frozen
//                            GEMM runs tile by tile on W dequantized to bf16
//   BM_DoraTrainStep         BM_LoraTrainStep with a DoRA adapter (Config.use_dora):
//                            its ratio to BM_LoraTrainStep is DoRA's cost
//   BM_Nf4Dequantize         the whole 4096 x 4096 W dequantized once, with
//                            ns per value and GB/s (4-bit in, bf16 out)
//   BM_MixedBatchTrainStep   a mixed batch over an AdapterSet of kMixedAdapters
//                            adapters (r = 16 each): 16 sequences of 512 rows,
//                            each sequence its own adapter (PEFT's adapter_names,
//                            per sample), forward_mixed + backward + AdamW over all;
//                            its ratio to BM_LoraTrainStep is what serving many
//                            adapters in one batch costs
//   BM_MixedBatchTrainStepDropout  the same with lora_dropout 0.1 on every adapter,
//                            beside BM_LoraTrainStepDropout (a mask per adapter,
//                            drop(x) in windows of the batch's dropout rows)
//   BM_AddOrder/0..4         the options for adding LoRA's products into the frozen
//                            GEMMs' outputs (xa and g given): 0 forward base first
//                            (x W^T, then y += xa B^T with beta = 1), 1 the small
//                            product first and x W^T accumulated onto it (beta = 1
//                            on the big GEMM: the layers' order since issue 15,
//                            OutputMode), 2 one GEMM on concatenated operands
//                            [x | xa] [W | B]^T (the concatenation not timed);
//                            3 and 4 the backward's dL_dy W + g A in orders 0 and 1
//   BM_LoraInference, BM_MixedBatchInference
//                            the same without training (Mode::eval / inference_mixed),
//                            beside PEFT's adapter_names path (bench/device/peft_peer.py)
// Counters: TFLOP/s over the counted FLOPs (below) and ms, per call (the
// benchmark's own Time column is per iteration of 10 or 50 calls).
//
// FLOPs counted for the LoRA layer: the two frozen GEMMs, 2 N d_in d_out each
// (x W^T and dL_dy W), plus the six small GEMMs the layer actually runs,
// 2 N r d each: x A^T, xa B^T, dL_dy B, dL_dy^T xa, g^T x, g A. (Issue 3's text
// says four small ones; counting all six adds 0.4 % at this shape.) The
// elementwise work (casts, AdamW) is counted as zero FLOPs.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "lora/cuda.hpp"

namespace {

using bf16 = __nv_bfloat16;
using lora::MatrixView;
using lora::cuda::Backend;
using lora::cuda::DeviceSpace;
using lora::cuda::Matrix;

constexpr std::int64_t kTokens = 8192, kIn = 4096, kOut = 4096;
constexpr int kRank = 16;

constexpr double kGemmFlops = 2.0 * kTokens * kIn * kOut;
constexpr double kLoraSmallFlops = 2.0 * kTokens * kRank * (3.0 * kIn + 3.0 * kOut);
constexpr double kLoraFlops = 2.0 * kGemmFlops + kLoraSmallFlops;

// x[i, j] = scale * u, u ~ U(-1, 1) from the library's RNG (never zero-filled:
// tensor cores run faster on zeros, which would flatter every number here).
template <class T>
__global__ void fill_uniform_kernel(MatrixView<T, DeviceSpace> x, std::uint64_t seed, float scale) {
  const std::int64_t n = x.rows * x.cols;
  for (std::int64_t k = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float u = 2.0f * lora::uniform01(lora::random_bits(seed, 99u, 0u, static_cast<std::uint64_t>(k))) - 1.0f;
    x.data[k] = lora::cuda::value_cast<T>(scale * u);
  }
}
template <class T>
void fill_uniform(lora::cuda::Context& ctx, MatrixView<T, DeviceSpace> x, std::uint64_t seed, float scale) {
  fill_uniform_kernel<T><<<1024, 256, 0, ctx.stream()>>>(x, seed, scale);
  LORA_CUDA_CHECK_LAUNCH();
}

using Nf4Linear = lora::Linear<bf16, Backend, lora::cuda::Nf4Base<bf16>>;

// The mixed batch: kMixedAdapters adapters, each taking one contiguous
// sequence of kTokens / kMixedAdapters rows.
constexpr int kMixedAdapters = 16;

// Everything the benchmarks share, built once on first use.
struct Workload {
  lora::cuda::Context ctx;
  Matrix<bf16> W{kOut, kIn}, x{kTokens, kIn}, dL_dy{kTokens, kOut}, y{kTokens, kOut}, dL_dx{kTokens, kIn};
  // Operands of the small GEMMs, shaped as inside the layer.
  Matrix<bf16> A{kRank, kIn}, B{kOut, kRank}, xa{kTokens, kRank}, g{kTokens, kRank};
  Matrix<float> dL_dA{kRank, kIn}, dL_dB{kOut, kRank};
  // BM_AddOrder/2's concatenated operands: [x | xa] and [W | B].
  Matrix<bf16> x_xa{kTokens, kIn + kRank}, W_B{kOut, kIn + kRank};
  std::unique_ptr<lora::cuda::Linear<bf16>> layer;
  std::unique_ptr<lora::cuda::Adam<float>> adam;
  // The same layer with DoRA.
  std::unique_ptr<lora::cuda::Linear<bf16>> dora_layer;
  std::unique_ptr<lora::cuda::Adam<float>> dora_adam;
  // The same layer over W in NF4, and the whole W dequantized (BM_Nf4Dequantize).
  std::unique_ptr<Nf4Linear> nf4_layer;
  std::unique_ptr<lora::cuda::Adam<float>> nf4_adam;
  Matrix<bf16> W_dequantized{kOut, kIn};
  // The mixed batch (BM_MixedBatch*): the set, its optimizer, the row list.
  std::unique_ptr<lora::cuda::AdapterSet<bf16>> set;
  std::unique_ptr<lora::cuda::Adam<float>> set_adam;
  lora::cuda::AdapterSet<bf16>::ForwardState set_state;
  std::vector<std::string> row_adapters;
  cudaEvent_t start = nullptr, stop = nullptr;

  explicit Workload(double dropout) {
    fill_uniform(ctx, W.view(), 1, 1.0f / 64.0f);  // ~ U(-1/sqrt(d_in), 1/sqrt(d_in))
    fill_uniform(ctx, x.view(), 2, 1.0f);
    fill_uniform(ctx, dL_dy.view(), 3, 1e-3f);
    fill_uniform(ctx, A.view(), 5, 1.0f / 64.0f);
    fill_uniform(ctx, B.view(), 6, 1e-2f);
    fill_uniform(ctx, xa.view(), 7, 1.0f);
    fill_uniform(ctx, g.view(), 8, 1e-3f);
    fill_uniform(ctx, x_xa.view(), 9, 1.0f);
    fill_uniform(ctx, W_B.view(), 10, 1.0f / 64.0f);
    lora::Config config;
    config.r = kRank;
    config.alpha = 16.0;
    config.dropout = dropout;
    config.seed = 7;
    layer = std::make_unique<lora::cuda::Linear<bf16>>(ctx, W.view(), MatrixView<const bf16, DeviceSpace>(), config);
    fill_uniform(ctx, layer->lora_B().value, 4, 1e-2f);  // a trained-looking B, not zeros
    adam = std::make_unique<lora::cuda::Adam<float>>(ctx, lora::AdamOptions::adamw(1e-4, 0.01));
    adam->add_group(layer->parameters());
    lora::Config dora_config = config;
    dora_config.use_dora = true;
    dora_layer = std::make_unique<lora::cuda::Linear<bf16>>(ctx, W.view(), MatrixView<const bf16, DeviceSpace>(),
                                                            dora_config);
    fill_uniform(ctx, dora_layer->lora_B().value, 4, 1e-2f);
    dora_adam = std::make_unique<lora::cuda::Adam<float>>(ctx, lora::AdamOptions::adamw(1e-4, 0.01));
    dora_adam->add_group(dora_layer->parameters());
    nf4_layer = std::make_unique<Nf4Linear>(lora::cuda::Nf4Base<bf16>::quantize(ctx, W.view()), config);
    fill_uniform(ctx, nf4_layer->lora_B().value, 4, 1e-2f);
    nf4_adam = std::make_unique<lora::cuda::Adam<float>>(ctx, lora::AdamOptions::adamw(1e-4, 0.01));
    nf4_adam->add_group(nf4_layer->parameters());
    set = std::make_unique<lora::cuda::AdapterSet<bf16>>(ctx, MatrixView<const bf16, DeviceSpace>(W.view()));
    set_adam = std::make_unique<lora::cuda::Adam<float>>(ctx, lora::AdamOptions::adamw(1e-4, 0.01));
    for (int k = 0; k < kMixedAdapters; ++k) {
      const std::string name = "adapter_" + std::to_string(k);
      auto& adapter = set->add(name, config, static_cast<std::uint32_t>(k));
      fill_uniform(ctx, adapter.lora_B().value, 40 + k, 1e-2f);
      set_adam->add_group(adapter.parameters());
      row_adapters.insert(row_adapters.end(), kTokens / kMixedAdapters, name);
    }
    LORA_CUDA_CHECK(cudaEventCreate(&start));
    LORA_CUDA_CHECK(cudaEventCreate(&stop));
    ctx.synchronize();
  }
  ~Workload() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  Workload(const Workload&) = delete;
  Workload& operator=(const Workload&) = delete;

  void bare_gemm() {
    Backend::gemm<bf16, bf16>(ctx, lora::Op::N, lora::Op::T, 1.0, x.view(), W.view(), 0.0, y.view());
  }
  void backward_gemm() {
    Backend::gemm<bf16, bf16>(ctx, lora::Op::N, lora::Op::N, 1.0, dL_dy.view(), W.view(), 0.0, dL_dx.view());
  }
  void frozen_forward_backward() {
    bare_gemm();
    backward_gemm();
  }
  // The layer's six small GEMMs (s = 1 here; the scale does not change the work).
  static constexpr int kSmallGemms = 6;
  static const char* small_gemm_name(int which) {
    static const char* const names[kSmallGemms] = {
        "xa = x A^T", "y += xa B^T", "g = dL_dy B", "dL_dB = dL_dy^T xa (fp32 out)", "dL_dA = g^T x (fp32 out)",
        "dL_dx += g A"};
    return names[which];
  }
  // Bytes each must move at least: its operands read once, its output written
  // (and read, with beta = 1).
  static double small_gemm_bytes(int which) {
    const double big = 2.0 * kTokens * kIn;  // x, y, dL_dy, dL_dx: N x 4096 bf16
    const double thin = 2.0 * kTokens * kRank, small = 2.0 * kRank * kIn;
    switch (which) {
      case 0: case 2: return big + small + thin;
      case 1: case 5: return 2.0 * big + thin + small;
      default: return big + thin + 2.0 * small;  // fp32 output: 4 bytes per element
    }
  }
  void small_gemm(int which) {
    using lora::Op;
    switch (which) {
      case 0: Backend::gemm<bf16, bf16>(ctx, Op::N, Op::T, 1.0, x.view(), A.view(), 0.0, xa.view()); break;
      case 1: Backend::gemm<bf16, bf16>(ctx, Op::N, Op::T, 1.0, xa.view(), B.view(), 1.0, y.view()); break;
      case 2: Backend::gemm<bf16, bf16>(ctx, Op::N, Op::N, 1.0, dL_dy.view(), B.view(), 0.0, g.view()); break;
      case 3: Backend::gemm<bf16, float>(ctx, Op::T, Op::N, 1.0, dL_dy.view(), xa.view(), 0.0, dL_dB.view()); break;
      case 4: Backend::gemm<bf16, float>(ctx, Op::T, Op::N, 1.0, g.view(), x.view(), 0.0, dL_dA.view()); break;
      default: Backend::gemm<bf16, bf16>(ctx, Op::N, Op::N, 1.0, g.view(), A.view(), 1.0, dL_dx.view()); break;
    }
  }
  static constexpr int kAddOrders = 5;
  static const char* add_order_name(int which) {
    static const char* const names[kAddOrders] = {
        "fwd: y = x W^T; y += xa B^T (beta 1)", "fwd: y = xa B^T; y += x W^T (beta 1 on the big GEMM)",
        "fwd: y = [x | xa] [W | B]^T (one GEMM)", "bwd: dx = dy W; dx += g A (beta 1)",
        "bwd: dx = g A; dx += dy W (beta 1 on the big GEMM)"};
    return names[which];
  }
  void add_order(int which) {
    using lora::Op;
    switch (which) {
      case 0:
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::T, 1.0, x.view(), W.view(), 0.0, y.view());
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::T, 1.0, xa.view(), B.view(), 1.0, y.view());
        break;
      case 1:
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::T, 1.0, xa.view(), B.view(), 0.0, y.view());
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::T, 1.0, x.view(), W.view(), 1.0, y.view());
        break;
      case 2: Backend::gemm<bf16, bf16>(ctx, Op::N, Op::T, 1.0, x_xa.view(), W_B.view(), 0.0, y.view()); break;
      case 3:
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::N, 1.0, dL_dy.view(), W.view(), 0.0, dL_dx.view());
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::N, 1.0, g.view(), A.view(), 1.0, dL_dx.view());
        break;
      default:
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::N, 1.0, g.view(), A.view(), 0.0, dL_dx.view());
        Backend::gemm<bf16, bf16>(ctx, Op::N, Op::N, 1.0, dL_dy.view(), W.view(), 1.0, dL_dx.view());
        break;
    }
  }
  void lora_forward_backward() {
    layer->forward(x.view(), y.view(), lora::Mode::train);
    layer->backward(x.view(), dL_dy.view(), dL_dx.view());
  }
  void lora_train_step() {
    lora_forward_backward();
    adam->step();
  }
  void dora_train_step() {
    dora_layer->forward(x.view(), y.view(), lora::Mode::train);
    dora_layer->backward(x.view(), dL_dy.view(), dL_dx.view());
    dora_adam->step();
  }
  void nf4_train_step() {
    nf4_layer->forward(x.view(), y.view(), lora::Mode::train);
    nf4_layer->backward(x.view(), dL_dy.view(), dL_dx.view());
    nf4_adam->step();
  }
  void lora_inference() { layer->forward(x.view(), y.view(), lora::Mode::eval); }
  void mixed_train_step() {
    set->forward_mixed(x.view(), row_adapters, y.view(), set_state);
    set->backward(set_state, x.view(), dL_dy.view(), dL_dx.view());
    set_adam->step();
  }
  void mixed_inference() { set->inference_mixed(x.view(), row_adapters, y.view()); }
  void nf4_dequantize() {
    Backend::nf4_dequantize_rows<bf16>(ctx, nf4_layer->base().view(), 0, W_dequantized.view());
  }
};

// Released at the end of main, before the CUDA runtime shuts down.
std::unique_ptr<Workload> g_plain, g_dropout;

// nullptr (and the benchmark skipped) where there is no GPU.
Workload* workload(double dropout = 0.0) {
  if (lora::cuda::device_count() == 0) return nullptr;
  auto& slot = dropout > 0.0 ? g_dropout : g_plain;
  if (!slot) slot = std::make_unique<Workload>(dropout);
  return slot.get();
}

// Times `inner` back-to-back calls of `work` per iteration with CUDA events on
// the workload's stream (as in a training loop: the host runs ahead, so the
// gap between the start event and the first launch is spread over `inner`
// calls), and sets the counters per call from `flops` per call.
template <class Work>
void run(benchmark::State& state, Workload* w, double flops, Work work, int inner = 10) {
  if (w == nullptr) {
    state.SkipWithError("no CUDA device visible: CUDA benchmark skipped");
    return;
  }
  for (int i = 0; i < 3; ++i) work();  // cuBLAS heuristics, module loading, allocations
  w->ctx.synchronize();
  double seconds = 0.0;
  for (auto _ : state) {
    LORA_CUDA_CHECK(cudaEventRecord(w->start, w->ctx.stream()));
    for (int i = 0; i < inner; ++i) work();
    LORA_CUDA_CHECK(cudaEventRecord(w->stop, w->ctx.stream()));
    LORA_CUDA_CHECK(cudaEventSynchronize(w->stop));
    float ms = 0.0f;
    LORA_CUDA_CHECK(cudaEventElapsedTime(&ms, w->start, w->stop));
    state.SetIterationTime(ms * 1e-3);
    seconds += ms * 1e-3;
  }
  const double iterations = static_cast<double>(state.iterations()) * inner;
  state.counters["TFLOP/s"] = flops * iterations / seconds * 1e-12;
  state.counters["ms"] = seconds / iterations * 1e3;
  state.counters["GFLOP"] = flops * 1e-9;
}

void BM_BareGemm(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kGemmFlops, [w] { w->bare_gemm(); });
}
void BM_BackwardGemm(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kGemmFlops, [w] { w->backward_gemm(); });
}
void BM_LoraGemm(benchmark::State& state) {
  Workload* w = workload();
  const int which = static_cast<int>(state.range(0));
  state.SetLabel(Workload::small_gemm_name(which));
  run(state, w, 2.0 * kTokens * kRank * kIn, [w, which] { w->small_gemm(which); }, 50);
  if (w != nullptr) state.counters["GB/s"] = Workload::small_gemm_bytes(which) / (state.counters["ms"] * 1e-3) * 1e-9;
}
void BM_FrozenForwardBackward(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, 2.0 * kGemmFlops, [w] { w->frozen_forward_backward(); });
}
void BM_LoraForwardBackward(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kLoraFlops, [w] { w->lora_forward_backward(); });
}
void BM_LoraTrainStep(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kLoraFlops, [w] { w->lora_train_step(); });
}
void BM_LoraTrainStepDropout(benchmark::State& state) {
  Workload* w = workload(0.1);
  run(state, w, kLoraFlops, [w] { w->lora_train_step(); });
}

// FLOPs as BM_LoraTrainStep (DoRA's W A^T, 2 d_in d_out r, is not counted).
void BM_DoraTrainStep(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kLoraFlops, [w] { w->dora_train_step(); });
}

void BM_Nf4LoraStep(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kLoraFlops, [w] { w->nf4_train_step(); });
  if (w != nullptr) {
    state.counters["base bytes/param"] =
        static_cast<double>(w->nf4_layer->base().bytes()) / static_cast<double>(kIn * kOut);
  }
}
void BM_Nf4Dequantize(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, 0.0, [w] { w->nf4_dequantize(); }, 50);
  if (w == nullptr) return;
  // Bytes moved at least: the base read once (packed values and absmax
  // statistics), the bf16 W written once.
  const double values = static_cast<double>(kIn) * kOut;
  const double bytes = static_cast<double>(w->nf4_layer->base().bytes()) + 2.0 * values;
  state.counters["ns/value"] = state.counters["ms"] * 1e6 / values;
  state.counters["GB/s"] = bytes / (state.counters["ms"] * 1e-3) * 1e-9;
  state.counters.erase("TFLOP/s");
  state.counters.erase("GFLOP");
}

// FLOPs: the frozen GEMM and the one small product added into its output.
void BM_AddOrder(benchmark::State& state) {
  Workload* w = workload();
  const int which = static_cast<int>(state.range(0));
  state.SetLabel(Workload::add_order_name(which));
  run(state, w, kGemmFlops + 2.0 * kTokens * kRank * kOut, [w, which] { w->add_order(which); });
}

// FLOPs as BM_LoraTrainStep: the same rows, each through its own adapter.
void BM_MixedBatchTrainStep(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kLoraFlops, [w] { w->mixed_train_step(); });
}
void BM_MixedBatchTrainStepDropout(benchmark::State& state) {
  Workload* w = workload(0.1);
  run(state, w, kLoraFlops, [w] { w->mixed_train_step(); });
}
// Forward FLOPs: x W^T and the two small GEMMs of the forward.
constexpr double kInferenceFlops = kGemmFlops + 2.0 * kTokens * kRank * (kIn + kOut);
void BM_LoraInference(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kInferenceFlops, [w] { w->lora_inference(); });
}
void BM_MixedBatchInference(benchmark::State& state) {
  Workload* w = workload();
  run(state, w, kInferenceFlops, [w] { w->mixed_inference(); });
}

BENCHMARK(BM_BareGemm)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_BackwardGemm)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FrozenForwardBackward)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoraForwardBackward)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoraTrainStep)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoraTrainStepDropout)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DoraTrainStep)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Nf4LoraStep)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Nf4Dequantize)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AddOrder)->DenseRange(0, Workload::kAddOrders - 1)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MixedBatchTrainStep)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MixedBatchTrainStepDropout)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoraInference)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MixedBatchInference)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LoraGemm)->DenseRange(0, Workload::kSmallGemms - 1)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  std::string gpu = "none";
  if (lora::cuda::device_count() > 0) {
    cudaDeviceProp prop{};
    LORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    gpu = prop.name;
  }
  benchmark::AddCustomContext("gpu", gpu);
  benchmark::AddCustomContext("shape", "N=8192 d_in=4096 d_out=4096 r=16 bf16");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_plain.reset();
  g_dropout.reset();
  return 0;
}

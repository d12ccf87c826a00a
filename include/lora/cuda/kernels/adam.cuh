// The fused Adam/AdamW step: every trainable tensor of an optimizer updated by
// one kernel launch (per kAdamSlotsPerLaunch tensors). The slot table travels
// as a kernel parameter, so a step needs no host-to-device copy and no sync.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "lora/core/backend.hpp"
#include "lora/cuda/check.cuh"

namespace lora::cuda::kernels {

// 256 tensors = 128 LoRA layers per launch. The table is 14 KB (fp32) or
// 16 KB (fp64): kernel parameters may take up to 32764 bytes since CUDA 12.1
// on compute capability 7.0 and newer.
inline constexpr int kAdamSlotsPerLaunch = 256;

template <class P>
struct AdamSlotTable {
  AdamSlot<P> slot[kAdamSlotsPerLaunch];
  std::int64_t begin[kAdamSlotsPerLaunch + 1];  // slot s owns flat indices [begin[s], begin[s + 1])
  int count;
};
static_assert(sizeof(AdamSlotTable<double>) + sizeof(AdamStep<double>) <= 32764,
              "the Adam slot table must fit in a kernel's parameters");

// Roundings spelled out (no fused multiply-add), so each value is rounded
// where the CPU backend's C++ rounds it.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ inline float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ inline float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ inline double sqrt_rn(double a) { return __dsqrt_rn(a); }

// For element k of slot s (lr, wd its group's), t the step, bc_i = 1 - beta_i^t,
// c_i = 1 - beta_i (AdamStep::one_minus_beta_i, formed in double by lora::Adam, as the CPU uses it):
//   g = grad + wd * param                                  (Adam: L2 in the gradient)
//   param = param * (1 - lr * wd)                          (AdamW: decoupled decay)
//   m = beta1 m + c1 g;   v = beta2 v + c2 g^2
//   param = param - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
template <class P>
__global__ void adam_kernel(const AdamSlotTable<P> table, const AdamStep<P> h) {
  const P c1 = h.one_minus_beta1, c2 = h.one_minus_beta2;
  const std::int64_t total = table.begin[table.count];
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  // The slot holding i, by binary search once; then i only grows.
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.begin[mid] <= i) lo = mid; else hi = mid - 1;
  }
  int s = lo;
  for (; i < total; i += step) {
    while (i >= table.begin[s + 1]) ++s;
    const AdamSlot<P>& slot = table.slot[s];
    const std::int64_t k = i - table.begin[s];
    P g = slot.grad[k];
    P theta = slot.param[k];
    if (h.decoupled) {
      theta = mul_rn(theta, sub_rn(P(1), mul_rn(slot.lr, slot.weight_decay)));
    } else {
      g = add_rn(g, mul_rn(slot.weight_decay, theta));
    }
    const P m = add_rn(mul_rn(h.beta1, slot.m[k]), mul_rn(c1, g));
    const P v = add_rn(mul_rn(h.beta2, slot.v[k]), mul_rn(mul_rn(c2, g), g));
    slot.m[k] = m;
    slot.v[k] = v;
    const P denom = add_rn(div_rn(sqrt_rn(v), h.bias_correction2_sqrt), h.eps);
    const P step_size = div_rn(slot.lr, h.bias_correction1);
    slot.param[k] = sub_rn(theta, mul_rn(step_size, div_rn(m, denom)));
  }
}

// One launch per kAdamSlotsPerLaunch slots (one launch for any LoRA model up
// to 128 adapted layers), enqueued on `stream`.
template <class P>
void adam_step(cudaStream_t stream, const AdamSlot<P>* slots, std::size_t count, const AdamStep<P>& h) {
  for (std::size_t first = 0; first < count; first += kAdamSlotsPerLaunch) {
    AdamSlotTable<P> table{};
    table.count = static_cast<int>(std::min<std::size_t>(count - first, kAdamSlotsPerLaunch));
    table.begin[0] = 0;
    for (int s = 0; s < table.count; ++s) {
      table.slot[s] = slots[first + s];
      table.begin[s + 1] = table.begin[s] + slots[first + s].n;
    }
    const std::int64_t total = table.begin[table.count];
    if (total == 0) continue;
    constexpr int kThreads = 256;
    const int blocks = static_cast<int>(std::min<std::int64_t>((total + kThreads - 1) / kThreads, 4096));
    adam_kernel<P><<<blocks, kThreads, 0, stream>>>(table, h);
    LORA_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace lora::cuda::kernels

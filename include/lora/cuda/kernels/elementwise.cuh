// The backend's elementwise kernels, each an op(i, j) run by for_each_2d.
// 16-bit elements are computed in fp32 and rounded once on the way out.
#pragma once

#include <cstdint>
#include <type_traits>

#include "lora/core/matrix_view.hpp"
#include "lora/cuda/device_buffer.cuh"
#include "lora/cuda/numeric.cuh"

namespace lora::cuda::kernels {

template <class T>
using DeviceView = MatrixView<T, DeviceSpace>;

// x[i, j] = value
template <class T>
struct Fill {
  DeviceView<T> x;
  T value;
  __device__ void operator()(std::int64_t i, std::int64_t j) const { x(i, j) = value; }
};

// dst[i, j] = Td(src[i, j]), rounded to nearest even
template <class Ts, class Td>
struct Convert {
  DeviceView<const Ts> src;
  DeviceView<Td> dst;
  __device__ void operator()(std::int64_t i, std::int64_t j) const { dst(i, j) = value_cast<Td>(src(i, j)); }
};

// y[i, j] = y[i, j] + bias[0, j]                      y: N x d_out, bias: 1 x d_out
template <class T>
struct AddRowVector {
  DeviceView<T> y;
  DeviceView<const T> bias;
  __device__ void operator()(std::int64_t i, std::int64_t j) const {
    y(i, j) = value_cast<T>(value_cast<compute_t<T>>(y(i, j)) + value_cast<compute_t<T>>(bias(0, j)));
  }
};

// y[i, j] = Ty(double(y[i, j]) + alpha * double(x[i, j])): both roundings in
// double (no fused multiply-add), as the CPU backend does, then one to Ty.
template <class Tx, class Ty>
struct AddScaled {
  double alpha;
  DeviceView<const Tx> x;
  DeviceView<Ty> y;
  __device__ void operator()(std::int64_t i, std::int64_t j) const {
    y(i, j) = value_cast<Ty>(__dadd_rn(value_cast<double>(y(i, j)), __dmul_rn(alpha, value_cast<double>(x(i, j)))));
  }
};

// x[i, j] = x[i, j] * factor          (factor == 0 is a Fill: x is never read)
template <class T>
struct Scale {
  DeviceView<T> x;
  compute_t<T> factor;
  __device__ void operator()(std::int64_t i, std::int64_t j) const {
    x(i, j) = value_cast<T>(value_cast<compute_t<T>>(x(i, j)) * factor);
  }
};

// y[i, j] = v[0, j or i] x[i, j] + beta y[i, j]: v per column (kRows false)
// or per row; computed in the wider of Tv and compute_t<T>; beta == 0 never reads y.
template <class Tv, class T, bool kRows>
struct ScaleByVector {
  DeviceView<const Tv> v;
  DeviceView<const T> x;
  double beta;
  DeviceView<T> y;
  __device__ void operator()(std::int64_t i, std::int64_t j) const {
    using C = std::conditional_t<(sizeof(Tv) > sizeof(compute_t<T>)), Tv, compute_t<T>>;
    const C scaled = static_cast<C>(v(0, kRows ? i : j)) * value_cast<C>(x(i, j));
    y(i, j) = value_cast<T>(beta == 0.0 ? scaled : scaled + static_cast<C>(beta) * value_cast<C>(y(i, j)));
  }
};

// n = sqrt(sq + s cross), inv_n = 1 / n, c = m / n per column, in double (one row)
template <class P>
struct MagnitudeScale {
  DeviceView<const P> m, sq, cross;
  double s;
  DeviceView<P> inv_n, c;
  __device__ void operator()(std::int64_t, std::int64_t j) const {
    const double n = sqrt(static_cast<double>(sq(0, j)) + s * static_cast<double>(cross(0, j)));
    inv_n(0, j) = static_cast<P>(1.0 / n);
    c(0, j) = static_cast<P>(static_cast<double>(m(0, j)) / n);
  }
};

}  // namespace lora::cuda::kernels

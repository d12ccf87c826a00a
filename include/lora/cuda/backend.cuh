// The kernels of lora::cuda::Backend: the definitions of the ops that
// backend.hpp declares and that launch kernels. nvcc only. Every .cu file that
// includes it compiles the ops it uses; a program whose host .cpp files use
// lora::cuda has one .cu file define LORA_CUDA_IMPLEMENTATION before including
// <lora/cuda.hpp>, which compiles every op for every supported type here
// (docs/cuda.md).
#pragma once

#if !defined(__CUDACC__)
#error "lora/cuda/backend.cuh holds CUDA kernels: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "lora/core/backend.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/cuda/backend.hpp"
#include "lora/cuda/check.cuh"
#include "lora/cuda/kernels/adam.cuh"
#include "lora/cuda/kernels/dropout.cuh"
#include "lora/cuda/kernels/elementwise.cuh"
#include "lora/cuda/kernels/launch.cuh"
#include "lora/cuda/kernels/nf4.cuh"
#include "lora/cuda/kernels/reduce.cuh"
#include "lora/cuda/kernels/rows.cuh"
#include "lora/cuda/numeric.cuh"

namespace lora::cuda {

template <class T>
void Backend::add_row_vector(Context& ctx, MatrixView<T, DeviceSpace> y, MatrixView<const T, DeviceSpace> bias) {
  check_view(y, "add_row_vector: y");
  check_shape(bias, 1, y.cols, "add_row_vector: bias");
  kernels::for_each_2d(ctx.stream(), y.rows, y.cols, kernels::AddRowVector<T>{y, bias});
}

template <class T>
void Backend::dropout(Context& ctx, MatrixView<const T, DeviceSpace> x, MatrixView<T, DeviceSpace> out, float p,
                      std::uint64_t seed, std::uint32_t stream, std::uint32_t call) {
  check_view(x, "dropout: x");
  check_shape(out, x.rows, x.cols, "dropout: out");
  // Rounded exactly as the CPU backend rounds it: static_cast<T>(1.0 / (1.0 - p)).
  const auto keep_scale = static_cast<compute_t<T>>(1.0 / (1.0 - static_cast<double>(p)));
  kernels::for_each_2d(ctx.stream(), 1, kernels::Dropout<T>::blocks(x.rows, x.cols),
                       kernels::Dropout<T>{x, out, keep_scale, dropout_keep_threshold(p), seed, dropout_stream(stream),
                                           call});
}

template <class Word>
void Backend::dropout_mask(Context& ctx, std::int64_t cols, float p, std::uint64_t seed, std::uint32_t stream,
                           std::uint32_t call, MatrixView<Word, DeviceSpace> bits) {
  static_assert(std::is_same_v<Word, std::uint32_t>, "dropout_mask: the bits are 32-bit words");
  check_view(bits, "dropout_mask: bits");
  LORA_CHECK(cols >= 0 && bits.cols == dropout_mask_words(cols),
             "dropout_mask: bits has " << bits.cols << " words per row, a row of " << cols << " elements needs "
                                       << dropout_mask_words(cols));
  kernels::for_each_2d(ctx.stream(), bits.rows, bits.cols,
                       kernels::DropoutMask{bits, cols, dropout_keep_threshold(p), seed, dropout_stream(stream), call});
}

template <class T>
void Backend::apply_dropout_mask(Context& ctx, MatrixView<const T, DeviceSpace> x,
                                 MatrixView<const std::uint32_t, DeviceSpace> bits, float p,
                                 MatrixView<T, DeviceSpace> out) {
  check_view(x, "apply_dropout_mask: x");
  check_shape(bits, x.rows, dropout_mask_words(x.cols), "apply_dropout_mask: bits");
  check_shape(out, x.rows, x.cols, "apply_dropout_mask: out");
  const auto keep_scale = static_cast<compute_t<T>>(1.0 / (1.0 - static_cast<double>(p)));
  kernels::for_each_2d(ctx.stream(), x.rows, x.cols, kernels::ApplyDropoutMask<T>{x, bits, keep_scale, out});
}

template <class T>
void Backend::fill(Context& ctx, MatrixView<T, DeviceSpace> x, T value) {
  check_view(x, "fill: x");
  kernels::for_each_2d(ctx.stream(), x.rows, x.cols, kernels::Fill<T>{x, value});
}

template <class Tx, class Ty>
void Backend::add_scaled(Context& ctx, double alpha, MatrixView<const Tx, DeviceSpace> x,
                         MatrixView<Ty, DeviceSpace> y) {
  check_view(x, "add_scaled: x");
  check_shape(y, x.rows, x.cols, "add_scaled: y");
  kernels::for_each_2d(ctx.stream(), y.rows, y.cols, kernels::AddScaled<Tx, Ty>{alpha, x, y});
}

template <class Ts, class Td>
void Backend::convert(Context& ctx, MatrixView<const Ts, DeviceSpace> src, MatrixView<Td, DeviceSpace> dst) {
  check_view(src, "convert: src");
  check_shape(dst, src.rows, src.cols, "convert: dst");
  if constexpr (std::is_same_v<Ts, Td>) {
    copy_2d(ctx, src.data, src.stride, dst.data, dst.stride, src.rows, src.cols, cudaMemcpyDeviceToDevice);
  } else {
    kernels::for_each_2d(ctx.stream(), src.rows, src.cols, kernels::Convert<Ts, Td>{src, dst});
  }
}

template <class T>
void Backend::gather_rows(Context& ctx, MatrixView<const T, DeviceSpace> src,
                          MatrixView<const std::int64_t, DeviceSpace> rows, MatrixView<T, DeviceSpace> dst) {
  check_view(src, "gather_rows: src");
  check_shape(rows, 1, dst.rows, "gather_rows: rows");
  check_shape(dst, rows.cols, src.cols, "gather_rows: dst");
  check_row_indices(ctx, rows, src.rows, false, "gather_rows");
  kernels::for_each_2d(ctx.stream(), dst.rows, dst.cols, kernels::GatherRows<T>{src, rows, dst});
}

template <class T>
void Backend::scatter_add_rows(Context& ctx, MatrixView<const T, DeviceSpace> src,
                               MatrixView<const std::int64_t, DeviceSpace> rows, MatrixView<T, DeviceSpace> dst) {
  check_view(dst, "scatter_add_rows: dst");
  check_shape(rows, 1, src.rows, "scatter_add_rows: rows");
  check_shape(src, rows.cols, dst.cols, "scatter_add_rows: src");
  check_row_indices(ctx, rows, dst.rows, true, "scatter_add_rows");
  kernels::for_each_2d(ctx.stream(), src.rows, src.cols, kernels::ScatterAddRows<T>{src, rows, dst});
}

template <class T>
double Backend::sum_squares(Context& ctx, MatrixView<const T, DeviceSpace> x) {
  check_view(x, "sum_squares: x");
  if (x.rows == 0 || x.cols == 0) return 0.0;
  double* scratch = ctx.reduce_scratch();
  kernels::sum_squares(ctx.stream(), x, scratch, scratch + kernels::kReduceMaxBlocks);
  LORA_CUDA_CHECK(cudaMemcpyAsync(ctx.pinned_result(), scratch + kernels::kReduceMaxBlocks, sizeof(double),
                                  cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  return *ctx.pinned_result();
}

template <class T>
void Backend::sum_squares_each(Context& ctx, const MatrixView<const T, DeviceSpace>* xs, std::size_t count,
                               double* sums) {
  if (count == 0) return;
  for (std::size_t t = 0; t < count; ++t) check_view(xs[t], "sum_squares_each: xs[t]");
  double* results = ctx.device_sums(count);
  for (std::size_t t = 0; t < count; ++t) kernels::sum_squares(ctx.stream(), xs[t], ctx.reduce_scratch(), results + t);
  double* pinned = ctx.pinned_sums(count);
  LORA_CUDA_CHECK(
      cudaMemcpyAsync(pinned, results, count * sizeof(double), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  std::copy(pinned, pinned + count, sums);
}

template <class T>
void Backend::scale(Context& ctx, MatrixView<T, DeviceSpace> x, double factor) {
  check_view(x, "scale: x");
  if (factor == 0.0) {
    fill(ctx, x, value_cast<T>(0.0f));
  } else {
    kernels::for_each_2d(ctx.stream(), x.rows, x.cols, kernels::Scale<T>{x, static_cast<compute_t<T>>(factor)});
  }
}

template <class Tv, class T>
void Backend::scale_columns(Context& ctx, MatrixView<const Tv, DeviceSpace> v, MatrixView<const T, DeviceSpace> x,
                            double beta, MatrixView<T, DeviceSpace> y) {
  check_view(x, "scale_columns: x");
  check_shape(v, 1, x.cols, "scale_columns: v");
  check_shape(y, x.rows, x.cols, "scale_columns: y");
  kernels::for_each_2d(ctx.stream(), y.rows, y.cols, kernels::ScaleByVector<Tv, T, false>{v, x, beta, y});
}

template <class Tv, class T>
void Backend::scale_rows(Context& ctx, MatrixView<const Tv, DeviceSpace> v, MatrixView<const T, DeviceSpace> x,
                         double beta, MatrixView<T, DeviceSpace> y) {
  check_view(x, "scale_rows: x");
  check_shape(v, 1, x.rows, "scale_rows: v");
  check_shape(y, x.rows, x.cols, "scale_rows: y");
  kernels::for_each_2d(ctx.stream(), y.rows, y.cols, kernels::ScaleByVector<Tv, T, true>{v, x, beta, y});
}

template <class T, class Tout>
void Backend::column_dots(Context& ctx, double alpha, MatrixView<const T, DeviceSpace> a,
                          MatrixView<const T, DeviceSpace> b, double beta, MatrixView<Tout, DeviceSpace> out) {
  check_view(a, "column_dots: a");
  check_shape(b, a.rows, a.cols, "column_dots: b");
  check_shape(out, 1, a.cols, "column_dots: out");
  kernels::column_dots(ctx.stream(), alpha, a, b, beta, out);
}

template <class T, class Tout>
void Backend::row_dots(Context& ctx, double alpha, MatrixView<const T, DeviceSpace> a,
                       MatrixView<const T, DeviceSpace> b, double beta, MatrixView<Tout, DeviceSpace> out) {
  check_view(a, "row_dots: a");
  check_shape(b, a.rows, a.cols, "row_dots: b");
  check_shape(out, 1, a.rows, "row_dots: out");
  kernels::row_dots(ctx.stream(), alpha, a, b, beta, out);
}

template <class P>
void Backend::magnitude_scale(Context& ctx, MatrixView<const P, DeviceSpace> m, MatrixView<const P, DeviceSpace> sq,
                              MatrixView<const P, DeviceSpace> cross, double s, MatrixView<P, DeviceSpace> inv_n,
                              MatrixView<P, DeviceSpace> c) {
  check_shape(m, 1, m.cols, "magnitude_scale: m");
  check_shape(sq, 1, m.cols, "magnitude_scale: sq");
  check_shape(cross, 1, m.cols, "magnitude_scale: cross");
  check_shape(inv_n, 1, m.cols, "magnitude_scale: inv_n");
  check_shape(c, 1, m.cols, "magnitude_scale: c");
  kernels::for_each_2d(ctx.stream(), 1, m.cols, kernels::MagnitudeScale<P>{m, sq, cross, s, inv_n, c});
}

template <class T>
void Backend::nf4_dequantize_rows(Context& ctx, const nf4::View<DeviceSpace>& w, std::int64_t first_row,
                                  MatrixView<T, DeviceSpace> out) {
  check_view(out, "nf4_dequantize_rows: out");
  LORA_CHECK(out.cols == w.cols && first_row >= 0 && first_row + out.rows <= w.rows,
             "nf4_dequantize_rows: rows [" << first_row << ", " << first_row + out.rows << ") into a " << out.rows
                                           << " x " << out.cols << " view, of a " << w.rows << " x " << w.cols
                                           << " weight");
  LORA_CHECK(w.blocksize >= 2 && w.packed != nullptr && (w.absmax != nullptr || (w.absmax_q != nullptr &&
                                                         w.nested_absmax != nullptr && w.nested_code != nullptr)),
             "nf4_dequantize_rows: the weight's view is incomplete (packed, and absmax or the double-quantized trio)");
  kernels::nf4_dequantize_rows(ctx.stream(), w, first_row, out);
}

template <class T>
void Backend::nf4_quantize_blocks(Context& ctx, MatrixView<const T, DeviceSpace> W, std::int64_t blocksize,
                                  std::uint8_t* packed, float* absmax) {
  check_view(W, "nf4_quantize_blocks: W");
  nf4::check_quantize_blocks_args(W.rows * W.cols, blocksize, packed, absmax);
  kernels::nf4_quantize_blocks(ctx.stream(), W, blocksize, packed, absmax);
}

template <class P>
void Backend::adam_step(Context& ctx, const AdamSlot<P>* slots, std::size_t count, const AdamStep<P>& h) {
  static_assert(std::is_same_v<P, float> || std::is_same_v<P, double>, "Adam state is fp32 or fp64");
  kernels::adam_step(ctx.stream(), slots, count, h);
}

// Every op for every supported element type, compiled in the one .cu file of
// a program that defines LORA_CUDA_IMPLEMENTATION: what host .cpp files call.
#if defined(LORA_CUDA_IMPLEMENTATION)
#define LORA_CUDA_DETAIL_OPS_1(T)                                                                                      \
  template void Backend::add_row_vector<T>(Context&, MatrixView<T, DeviceSpace>, MatrixView<const T, DeviceSpace>);    \
  template void Backend::dropout<T>(Context&, MatrixView<const T, DeviceSpace>, MatrixView<T, DeviceSpace>, float,     \
                                    std::uint64_t, std::uint32_t, std::uint32_t);                                      \
  template void Backend::fill<T>(Context&, MatrixView<T, DeviceSpace>, T);                                             \
  template void Backend::apply_dropout_mask<T>(Context&, MatrixView<const T, DeviceSpace>,                             \
                                               MatrixView<const std::uint32_t, DeviceSpace>, float,                    \
                                               MatrixView<T, DeviceSpace>);                                            \
  template void Backend::gather_rows<T>(Context&, MatrixView<const T, DeviceSpace>,                                    \
                                        MatrixView<const std::int64_t, DeviceSpace>, MatrixView<T, DeviceSpace>);      \
  template void Backend::scatter_add_rows<T>(Context&, MatrixView<const T, DeviceSpace>,                               \
                                             MatrixView<const std::int64_t, DeviceSpace>, MatrixView<T, DeviceSpace>); \
  template double Backend::sum_squares<T>(Context&, MatrixView<const T, DeviceSpace>);                                 \
  template void Backend::sum_squares_each<T>(Context&, const MatrixView<const T, DeviceSpace>*, std::size_t, double*); \
  template void Backend::scale<T>(Context&, MatrixView<T, DeviceSpace>, double);                                       \
  template void Backend::nf4_dequantize_rows<T>(Context&, const nf4::View<DeviceSpace>&, std::int64_t,                 \
                                                MatrixView<T, DeviceSpace>);                                           \
  template void Backend::nf4_quantize_blocks<T>(Context&, MatrixView<const T, DeviceSpace>, std::int64_t,              \
                                                std::uint8_t*, float*)
#define LORA_CUDA_DETAIL_OPS_2(Ts, Td)                                                           \
  template void Backend::add_scaled<Ts, Td>(Context&, double, MatrixView<const Ts, DeviceSpace>, \
                                            MatrixView<Td, DeviceSpace>);                        \
  template void Backend::convert<Ts, Td>(Context&, MatrixView<const Ts, DeviceSpace>, MatrixView<Td, DeviceSpace>)
// The vector ops: Tv / Tout fp32 or fp64, T any element type.
#define LORA_CUDA_DETAIL_VECTOR_OPS(Tv, T)                                                                         \
  template void Backend::scale_columns<Tv, T>(Context&, MatrixView<const Tv, DeviceSpace>,                         \
                                              MatrixView<const T, DeviceSpace>, double, MatrixView<T, DeviceSpace>); \
  template void Backend::scale_rows<Tv, T>(Context&, MatrixView<const Tv, DeviceSpace>,                            \
                                           MatrixView<const T, DeviceSpace>, double, MatrixView<T, DeviceSpace>);    \
  template void Backend::column_dots<T, Tv>(Context&, double, MatrixView<const T, DeviceSpace>,                    \
                                            MatrixView<const T, DeviceSpace>, double, MatrixView<Tv, DeviceSpace>);  \
  template void Backend::row_dots<T, Tv>(Context&, double, MatrixView<const T, DeviceSpace>,                       \
                                         MatrixView<const T, DeviceSpace>, double, MatrixView<Tv, DeviceSpace>)
#define LORA_CUDA_DETAIL_VECTOR_OPS_ALL(Tv)         \
  LORA_CUDA_DETAIL_VECTOR_OPS(Tv, float);           \
  LORA_CUDA_DETAIL_VECTOR_OPS(Tv, double);          \
  LORA_CUDA_DETAIL_VECTOR_OPS(Tv, __nv_bfloat16);   \
  LORA_CUDA_DETAIL_VECTOR_OPS(Tv, __half);          \
  template void Backend::magnitude_scale<Tv>(Context&, MatrixView<const Tv, DeviceSpace>,                         \
                                             MatrixView<const Tv, DeviceSpace>, MatrixView<const Tv, DeviceSpace>, \
                                             double, MatrixView<Tv, DeviceSpace>, MatrixView<Tv, DeviceSpace>)
#define LORA_CUDA_DETAIL_OPS_FROM(Ts)        \
  LORA_CUDA_DETAIL_OPS_2(Ts, float);         \
  LORA_CUDA_DETAIL_OPS_2(Ts, double);        \
  LORA_CUDA_DETAIL_OPS_2(Ts, __nv_bfloat16); \
  LORA_CUDA_DETAIL_OPS_2(Ts, __half)
LORA_CUDA_DETAIL_OPS_1(float);
LORA_CUDA_DETAIL_OPS_1(double);
LORA_CUDA_DETAIL_OPS_1(__nv_bfloat16);
LORA_CUDA_DETAIL_OPS_1(__half);
LORA_CUDA_DETAIL_OPS_FROM(float);
LORA_CUDA_DETAIL_OPS_FROM(double);
LORA_CUDA_DETAIL_OPS_FROM(__nv_bfloat16);
LORA_CUDA_DETAIL_OPS_FROM(__half);
LORA_CUDA_DETAIL_VECTOR_OPS_ALL(float);
LORA_CUDA_DETAIL_VECTOR_OPS_ALL(double);
// Row indices (gather_rows, scatter_add_rows) are std::int64_t.
template void Backend::fill<std::int64_t>(Context&, MatrixView<std::int64_t, DeviceSpace>, std::int64_t);
template void Backend::dropout_mask<std::uint32_t>(Context&, std::int64_t, float, std::uint64_t, std::uint32_t,
                                                   std::uint32_t, MatrixView<std::uint32_t, DeviceSpace>);
template void Backend::adam_step<float>(Context&, const AdamSlot<float>*, std::size_t, const AdamStep<float>&);
template void Backend::adam_step<double>(Context&, const AdamSlot<double>*, std::size_t, const AdamStep<double>&);
#undef LORA_CUDA_DETAIL_VECTOR_OPS_ALL
#undef LORA_CUDA_DETAIL_VECTOR_OPS
#undef LORA_CUDA_DETAIL_OPS_FROM
#undef LORA_CUDA_DETAIL_OPS_2
#undef LORA_CUDA_DETAIL_OPS_1
#endif

}  // namespace lora::cuda

// lora::cuda::Backend as the host compiler sees it: the Context, the
// Backend's types and every op's declaration, and the ops that are host code
// (cuBLAS GEMMs, copies). The ops that launch kernels are defined in
// backend.cuh, which only nvcc compiles; a trainer's .cpp files include
// <lora/cuda.hpp> (this, without kernels) and one .cu file of the program
// compiles them for every supported type (LORA_CUDA_IMPLEMENTATION, see
// docs/cuda.md). Every op is enqueued on the Context's stream; only the ops
// that hand a value or a buffer to the host (sum_squares, sum_squares_each,
// copy_to_host, copy_from_host, synchronize) wait for it.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "lora/core/backend.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/cuda/check.cuh"
#include "lora/cuda/device_buffer.cuh"
#include "lora/cuda/numeric.cuh"
#include "lora/quant/nf4.hpp"

namespace lora::cuda {

namespace kernels {
// The most blocks kernels::sum_squares (kernels/reduce.cuh) uses; the Context
// keeps that many partial sums and the result.
inline constexpr int kReduceMaxBlocks = 1024;
}  // namespace kernels

// The number of visible CUDA devices; 0 when there is no driver or no device.
// Never throws: tests and programs use it to decide whether to use the GPU.
inline int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls do not see it
    return 0;
  }
  return count;
}

namespace detail {
struct StreamDeleter {
  void operator()(cudaStream_t stream) const noexcept { cudaStreamDestroy(stream); }
};
struct CublasDeleter {
  void operator()(cublasHandle_t handle) const noexcept { cublasDestroy(handle); }
};
struct PinnedDeleter {
  void operator()(double* ptr) const noexcept { cudaFreeHost(ptr); }
};
}  // namespace detail

// What every CUDA op needs: a stream, a cuBLAS handle bound to it, and small
// scratch buffers for reductions. Layers and optimizers borrow a Context and
// never own it; it must outlive them. Not copyable or movable (they keep a
// pointer to it); use one Context per host thread.
class Context {
 public:
  // A stream of its own (ordered with the legacy default stream, so plain
  // cudaMemcpy calls of the user's are ordered with the backend's work).
  Context() {
    require_device();
    cudaStream_t stream = nullptr;
    LORA_CUDA_CHECK(cudaStreamCreate(&stream));
    owned_stream_.reset(stream);
    init(stream);
  }
  // Borrows `stream` (e.g. a framework's current stream); it is never destroyed here.
  explicit Context(cudaStream_t stream) {
    require_device();
    init(stream);
  }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_.get(); }

  // TF32 tensor cores for fp32 GEMMs: about 10 mantissa bits per product, so
  // off by default (fp32 results then match the CPU to ~1e-6).
  bool allow_tf32() const { return allow_tf32_; }
  void set_allow_tf32(bool allow) { allow_tf32_ = allow; }

  // Waits until every op enqueued so far has finished, and reports any error
  // a kernel hit along the way.
  void synchronize() const { LORA_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  // Scratch for Backend::sum_squares: kReduceMaxBlocks + 1 device doubles and
  // one pinned host double. Not API.
  double* reduce_scratch() { return reduce_scratch_.data(); }
  double* pinned_result() { return pinned_result_.get(); }
  // Scratch for Backend::sum_squares_each: count results on the device and in
  // pinned host memory, grown when a call needs more (kept between calls). Not API.
  double* device_sums(std::size_t count) {
    if (device_sums_.size() < count) device_sums_ = DeviceBuffer<double>(count);
    return device_sums_.data();
  }
  // Device room for gemm_grouped's pointer arrays (grows, never shrinks).
  void** gemm_pointers(std::size_t count) {
    if (gemm_pointers_.size() < count) gemm_pointers_ = DeviceBuffer<void*>(count);
    return gemm_pointers_.data();
  }
  double* pinned_sums(std::size_t count) {
    if (pinned_sums_count_ < count) {
      double* pinned = nullptr;
      LORA_CUDA_CHECK(cudaMallocHost(&pinned, count * sizeof(double)));
      pinned_sums_.reset(pinned);
      pinned_sums_count_ = count;
    }
    return pinned_sums_.get();
  }

 private:
  static void require_device() {
    int count = 0;
    LORA_CUDA_CHECK(cudaGetDeviceCount(&count));
    LORA_CHECK(count > 0, "lora::cuda::Context: expected a CUDA device, found none");
  }
  void init(cudaStream_t stream) {
    stream_ = stream;
    cublasHandle_t handle = nullptr;
    LORA_CUBLAS_CHECK(cublasCreate(&handle));
    cublas_.reset(handle);
    LORA_CUBLAS_CHECK(cublasSetStream(handle, stream));
    // Tensor cores for 16-bit inputs; split-K partial sums kept in fp32 even
    // when the output is bf16/fp16; TF32 only through the compute type (gemm).
    LORA_CUBLAS_CHECK(cublasSetMathMode(
        handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    reduce_scratch_ = DeviceBuffer<double>(kernels::kReduceMaxBlocks + 1);
    double* pinned = nullptr;
    LORA_CUDA_CHECK(cudaMallocHost(&pinned, sizeof(double)));
    pinned_result_.reset(pinned);
  }

  // Declared so that the handle is destroyed before the stream it uses.
  std::unique_ptr<std::remove_pointer_t<cudaStream_t>, detail::StreamDeleter> owned_stream_;
  std::unique_ptr<std::remove_pointer_t<cublasHandle_t>, detail::CublasDeleter> cublas_;
  std::unique_ptr<double, detail::PinnedDeleter> pinned_result_;
  std::unique_ptr<double, detail::PinnedDeleter> pinned_sums_;
  std::size_t pinned_sums_count_ = 0;
  DeviceBuffer<double> reduce_scratch_;
  DeviceBuffer<double> device_sums_;
  DeviceBuffer<void*> gemm_pointers_;
  cudaStream_t stream_ = nullptr;
  bool allow_tf32_ = false;
};

namespace detail {

inline cublasOperation_t cublas_op(Op op) { return op == Op::T ? CUBLAS_OP_T : CUBLAS_OP_N; }

}  // namespace detail

struct Backend {
  using Context = cuda::Context;
  using Space = DeviceSpace;
  template <class T>
  using Matrix = cuda::Matrix<T>;
  template <class T>
  using View = MatrixView<T, DeviceSpace>;
  static constexpr const char* kName = "cuda";
  // The layer's dropout path works on row blocks of about this many elements
  // of an N x d_in matrix (8 MiB of bf16: each block's GEMMs stay large).
  static constexpr std::int64_t kRowBlockElements = std::int64_t{1} << 22;

  // c = alpha op(a) op(b) + beta c          c: m x n, op(a): m x k, op(b): k x n
  // Types: Tin = Tout in {fp32, fp64, bf16, fp16}, or 16-bit Tin with fp32 Tout
  // (the layer's gradient GEMMs). Products accumulate in fp32 (fp64 for fp64);
  // fp32 inputs use TF32 only when ctx.allow_tf32(). With beta == 0, c is
  // written without being read (cuBLAS's contract), so NaN in c never leaks.
  // c must not overlap a or b.
  //
  // Row-major -> column-major, derived once. cuBLAS is column-major. The bytes
  // of a row-major rows x cols matrix X with row stride ld are, read
  // column-major with leading dimension ld, the matrix X^T (cols x rows). So
  //   C = op(A) op(B)          (row-major, m x n)
  // is, in cuBLAS's eyes,
  //   C^T = op(B)^T op(A)^T    (column-major, n x m),
  // i.e. cublasGemmEx(op_b, op_a, n, m, k, B, ldb, A, lda, C, ldc): operands
  // swapped, m and n swapped, and each transpose flag unchanged, because the
  // buffer of B already reads as B^T: op(B)^T needs no transpose exactly when
  // op(B) = B^T's transpose, i.e. when op_b == N. The leading dimensions are
  // the row strides.
  template <class Tin, class Tout>
  static void gemm(Context& ctx, Op op_a, Op op_b, double alpha, MatrixView<const Tin, DeviceSpace> a,
                   MatrixView<const Tin, DeviceSpace> b, double beta, MatrixView<Tout, DeviceSpace> c) {
    static_assert(std::is_same_v<Tin, Tout> || (is_16bit_v<Tin> && std::is_same_v<Tout, float>),
                  "cuda gemm: Tin = Tout (fp32, fp64, bf16, fp16), or bf16/fp16 in with fp32 out");
    const GemmShape shape = gemm_shape(op_a, op_b, a, b, c);
    // Checked before the early returns, so that a size cuBLAS cannot take is
    // refused whatever the other sizes are.
    const auto [mi, ni, ki, lda, ldb, ldc] = checked_gemm_args("cuda gemm", shape, a, b, c);
    if (shape.m == 0 || shape.n == 0) return;
    if (shape.k == 0) {
      scale(ctx, c, beta);
      return;
    }
    const Scalar<Tin> alpha_s = static_cast<Scalar<Tin>>(alpha), beta_s = static_cast<Scalar<Tin>>(beta);
    LORA_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), detail::cublas_op(op_b), detail::cublas_op(op_a), ni, mi, ki, &alpha_s,
                                   b.data, Numeric<Tin>::kDataType, ldb, a.data, Numeric<Tin>::kDataType, lda, &beta_s,
                                   c.data, Numeric<Tout>::kDataType, ldc, compute_type<Tin>(ctx),
                                   CUBLAS_GEMM_DEFAULT));
  }

  // Every term's c = alpha op(a) op(b) + beta c in one cuBLAS launch
  // (cublasGemmGroupedBatchedEx, a group of one per term: each term its own
  // m, n, k, strides and scalars), the types and precision of gemm above.
  // The terms that launch cannot take (groupable) run one gemm each, as do
  // all of them when only one is left or, as a backstop, when cuBLAS answers
  // CUBLAS_STATUS_NOT_SUPPORTED. The terms may run concurrently: no term's c
  // may overlap another term's operands or output. Every term is checked
  // before anything is launched.
  template <class Tin, class Tout>
  static void gemm_grouped(Context& ctx, Op op_a, Op op_b,
                           const std::vector<GemmTerm<Tin, Tout, DeviceSpace>>& terms) {
    std::vector<GemmShape> shapes;
    std::vector<BlasGemmArgs> args;
    for (const auto& t : terms) {
      shapes.push_back(gemm_shape(op_a, op_b, t.a, t.b, t.c));
      args.push_back(checked_gemm_args("cuda gemm_grouped", shapes.back(), t.a, t.b, t.c));
    }
    std::vector<std::size_t> live;  // the terms with products to compute
    for (std::size_t i = 0; i < terms.size(); ++i) {
      if (shapes[i].m == 0 || shapes[i].n == 0) continue;
      if (shapes[i].k == 0) {
        scale(ctx, terms[i].c, terms[i].beta);  // as gemm does
        continue;
      }
      live.push_back(i);
    }
    std::vector<std::size_t> grouped, single;  // the grouped launch's terms; the rest, one gemm each
    for (const std::size_t i : live) (groupable(ctx, terms[i]) ? grouped : single).push_back(i);
    if (grouped.size() < 2 || !grouped_launch(ctx, op_a, op_b, terms, args, grouped))
      single.insert(single.end(), grouped.begin(), grouped.end());
    for (const std::size_t i : single) {
      const auto& t = terms[i];
      gemm<Tin, Tout>(ctx, op_a, op_b, t.alpha, t.a, t.b, t.beta, t.c);
    }
  }

  // y[i, :] += bias[0, :] for every row i.       y: N x d_out, bias: 1 x d_out
  template <class T>
  static void add_row_vector(Context& ctx, MatrixView<T, DeviceSpace> y, MatrixView<const T, DeviceSpace> bias);

  // out = x * keep / (1 - p), keep = dropout_keep(seed, stream, call, i * cols + j):
  // the CPU backend's mask, bit for bit. out may be x itself.
  template <class T>
  static void dropout(Context& ctx, MatrixView<const T, DeviceSpace> x, MatrixView<T, DeviceSpace> out, float p,
                      std::uint64_t seed, std::uint32_t stream, std::uint32_t call);

  // The keep bits of a rows x cols dropout (bits: rows x dropout_mask_words(cols)),
  // the CPU backend's dropout_mask bit for bit. Word: std::uint32_t (a
  // template only so that LORA_CUDA_IMPLEMENTATION compiles it once).
  template <class Word>
  static void dropout_mask(Context& ctx, std::int64_t cols, float p, std::uint64_t seed, std::uint32_t stream,
                           std::uint32_t call, MatrixView<Word, DeviceSpace> bits);

  // out = keep ? x / (1 - p) : 0, keep from bits (dropout_mask's layout):
  // dropout's result bit for bit. out may alias x.
  template <class T>
  static void apply_dropout_mask(Context& ctx, MatrixView<const T, DeviceSpace> x,
                                 MatrixView<const std::uint32_t, DeviceSpace> bits, float p,
                                 MatrixView<T, DeviceSpace> out);

  template <class T>
  static void fill(Context& ctx, MatrixView<T, DeviceSpace> x, T value);

  // y += alpha x, computed in double and rounded once to Ty.
  template <class Tx, class Ty>
  static void add_scaled(Context& ctx, double alpha, MatrixView<const Tx, DeviceSpace> x,
                         MatrixView<Ty, DeviceSpace> y);

  // dst = src, converting the element type (round to nearest even).
  template <class Ts, class Td>
  static void convert(Context& ctx, MatrixView<const Ts, DeviceSpace> src, MatrixView<Td, DeviceSpace> dst);

  // Host -> device and device -> host. Both return when the copy is complete,
  // so the host buffer may be reused or read at once; strides are honoured on
  // both sides. With these an adapter moves between backends (see transfer.cuh).
  template <class T>
  static void copy_from_host(Context& ctx, MatrixView<const T, HostSpace> host, MatrixView<T, DeviceSpace> dst) {
    check_shape(dst, host.rows, host.cols, "copy_from_host: dst");
    check_shape(host, dst.rows, dst.cols, "copy_from_host: host");
    copy_2d(ctx, host.data, host.stride, dst.data, dst.stride, host.rows, host.cols, cudaMemcpyHostToDevice);
    ctx.synchronize();
  }
  template <class T>
  static void copy_to_host(Context& ctx, MatrixView<const T, DeviceSpace> src, MatrixView<T, HostSpace> host) {
    check_shape(host, src.rows, src.cols, "copy_to_host: host");
    check_shape(src, host.rows, host.cols, "copy_to_host: src");
    copy_2d(ctx, src.data, src.stride, host.data, host.stride, src.rows, src.cols, cudaMemcpyDeviceToHost);
    ctx.synchronize();
  }

  // dst[i, :] = src[rows[0, i], :] for i < n.   dst: n x c, src: m x c, rows: 1 x n, each in [0, m)
  // The indices are read back and checked on the host first (one sync).
  template <class T>
  static void gather_rows(Context& ctx, MatrixView<const T, DeviceSpace> src,
                          MatrixView<const std::int64_t, DeviceSpace> rows, MatrixView<T, DeviceSpace> dst);

  // dst[rows[0, i], :] += src[i, :] for i < n.  src: n x c, dst: m x c, rows: 1 x n, distinct, each in [0, m)
  template <class T>
  static void scatter_add_rows(Context& ctx, MatrixView<const T, DeviceSpace> src,
                               MatrixView<const std::int64_t, DeviceSpace> rows, MatrixView<T, DeviceSpace> dst);

  // sum of x_ij^2, accumulated in double; waits for the result.
  template <class T>
  static double sum_squares(Context& ctx, MatrixView<const T, DeviceSpace> x);
  // sums[t] = sum_squares(xs[t]) for each of the count views (sums: host
  // memory): every reduction enqueued, then one transfer and one wait
  // (gradient clipping over all of a model's tensors).
  template <class T>
  static void sum_squares_each(Context& ctx, const MatrixView<const T, DeviceSpace>* xs, std::size_t count,
                               double* sums);

  // ---- per-row and per-column vectors (DoRA's magnitude, adapters/lora.hpp) ----
  // With beta == 0, y (out) is written without being read. y may be x itself.
  // Tv, Tout: fp32 or fp64; T: any of the four element types.

  // y[i, j] = v[0, j] x[i, j] + beta y[i, j]           x, y: n x d, v: 1 x d
  template <class Tv, class T>
  static void scale_columns(Context& ctx, MatrixView<const Tv, DeviceSpace> v, MatrixView<const T, DeviceSpace> x,
                            double beta, MatrixView<T, DeviceSpace> y);
  // y[i, j] = v[0, i] x[i, j] + beta y[i, j]           x, y: n x d, v: 1 x n
  template <class Tv, class T>
  static void scale_rows(Context& ctx, MatrixView<const Tv, DeviceSpace> v, MatrixView<const T, DeviceSpace> x,
                         double beta, MatrixView<T, DeviceSpace> y);
  // out[0, j] = alpha sum_i a[i, j] b[i, j] + beta out[0, j]     a, b: n x d, out: 1 x d
  // Accumulated in double, in a fixed order (the same bits on every run).
  template <class T, class Tout>
  static void column_dots(Context& ctx, double alpha, MatrixView<const T, DeviceSpace> a,
                          MatrixView<const T, DeviceSpace> b, double beta, MatrixView<Tout, DeviceSpace> out);
  // out[0, i] = alpha sum_j a[i, j] b[i, j] + beta out[0, i]     a, b: n x d, out: 1 x n
  // Accumulated in double, in a fixed order.
  template <class T, class Tout>
  static void row_dots(Context& ctx, double alpha, MatrixView<const T, DeviceSpace> a,
                       MatrixView<const T, DeviceSpace> b, double beta, MatrixView<Tout, DeviceSpace> out);
  // DoRA's column scale, in double: n_j = sqrt(sq[0, j] + s cross[0, j]),
  // inv_n[0, j] = 1 / n_j, c[0, j] = m[0, j] / n_j               (all 1 x d)
  template <class P>
  static void magnitude_scale(Context& ctx, MatrixView<const P, DeviceSpace> m, MatrixView<const P, DeviceSpace> sq,
                              MatrixView<const P, DeviceSpace> cross, double s, MatrixView<P, DeviceSpace> inv_n,
                              MatrixView<P, DeviceSpace> c);

  // x *= factor; factor == 0 writes zeros without reading x.
  template <class T>
  static void scale(Context& ctx, MatrixView<T, DeviceSpace> x, double factor);

  // Rows [first_row, first_row + out.rows) of the NF4 weight w dequantized
  // into out (out.cols == w.cols), as nf4::dequantize_rows does on the host,
  // bit for bit: each value the float nf4::code_value(q) * w.block_absmax(b),
  // then rounded to T. w's pointers are device memory.
  template <class T>
  static void nf4_dequantize_rows(Context& ctx, const nf4::View<DeviceSpace>& w, std::int64_t first_row,
                                  MatrixView<T, DeviceSpace> out);

  // nf4::quantize_blocks on the GPU, byte for byte: W (any stride, flattened
  // row-major) in blocks of `blocksize` -> packed ((n + 1) / 2 bytes) and
  // absmax (one float per block), both device memory.
  template <class T>
  static void nf4_quantize_blocks(Context& ctx, MatrixView<const T, DeviceSpace> W, std::int64_t blocksize,
                                  std::uint8_t* packed, float* absmax);

  // One Adam/AdamW step over every slot (lora::AdamStep gives the formula),
  // fused into one kernel launch per 256 slots. P: float or double.
  template <class P>
  static void adam_step(Context& ctx, const AdamSlot<P>* slots, std::size_t count, const AdamStep<P>& h);

  static void synchronize(Context& ctx) { ctx.synchronize(); }

 private:
  template <class T>
  static void copy_2d(Context& ctx, const T* src, std::int64_t src_stride, T* dst, std::int64_t dst_stride,
                      std::int64_t rows, std::int64_t cols, cudaMemcpyKind kind) {
    if (rows == 0 || cols == 0) return;
    LORA_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<std::size_t>(dst_stride) * sizeof(T), src,
                                      static_cast<std::size_t>(src_stride) * sizeof(T),
                                      static_cast<std::size_t>(cols) * sizeof(T), static_cast<std::size_t>(rows),
                                      kind, ctx.stream()));
  }

  // The scalars (alpha, beta) and the compute type of a GEMM on Tin inputs:
  // fp64 for double; fp32 otherwise, TF32 for fp32 inputs where ctx.allow_tf32().
  template <class Tin>
  using Scalar = std::conditional_t<std::is_same_v<Tin, double>, double, float>;
  template <class Tin>
  static cublasComputeType_t compute_type(const Context& ctx) {
    if constexpr (std::is_same_v<Tin, double>) return CUBLAS_COMPUTE_64F;
    return std::is_same_v<Tin, float> && ctx.allow_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  }
  // blas_gemm_args for `call`, refused by name when a size exceeds cuBLAS's int.
  template <class Tin, class Tout>
  static BlasGemmArgs checked_gemm_args(const char* call, const GemmShape& shape, MatrixView<const Tin, DeviceSpace> a,
                                        MatrixView<const Tin, DeviceSpace> b, MatrixView<Tout, DeviceSpace> c) {
    std::string too_large;
    const std::optional<BlasGemmArgs> args = blas_gemm_args(shape, a, b, c, &too_large);
    LORA_CHECK(args.has_value(), call << ": " << too_large << " exceeds cuBLAS's int limit "
                                      << std::numeric_limits<int>::max());
    return *args;
  }

  // Whether gemm_grouped's launch can take term t: one type for inputs and
  // output (16-bit inputs with an fp32 output, the gradients of a 16-bit
  // layer, are not among its types), and with 16-bit inputs or TF32 every
  // pointer 16-byte aligned: cuBLAS reads a pointer-array GEMM's pointers
  // only on the device, so it cannot pick a kernel that copes (gemm, which
  // sees them, can), and its documentation asks for that alignment there.
  template <class Tin, class Tout>
  static bool groupable(const Context& ctx, const GemmTerm<Tin, Tout, DeviceSpace>& t) {
    if constexpr (!std::is_same_v<Tin, Tout>) {
      return false;
    } else {
      if (!is_16bit_v<Tin> && compute_type<Tin>(ctx) != CUBLAS_COMPUTE_32F_FAST_TF32) return true;
      const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
      return aligned(t.a.data) && aligned(t.b.data) && aligned(t.c.data);
    }
  }

  // gemm_grouped's launch: terms[live[i]] as group i of cublasGemmGroupedBatchedEx,
  // swapped into cuBLAS's column-major view as in gemm. False, with no GEMM
  // run, when cuBLAS does not support the types for grouped GEMMs.
  template <class Tin, class Tout>
  static bool grouped_launch(Context& ctx, Op op_a, Op op_b, const std::vector<GemmTerm<Tin, Tout, DeviceSpace>>& terms,
                             const std::vector<BlasGemmArgs>& args, const std::vector<std::size_t>& live) {
    const std::size_t count = live.size();
    const std::vector<cublasOperation_t> first_op(count, detail::cublas_op(op_b)),
        second_op(count, detail::cublas_op(op_a));
    std::vector<int> m(count), n(count), k(count), ld_first(count), ld_second(count), ldc(count);
    const std::vector<int> group_size(count, 1);
    std::vector<Scalar<Tin>> alpha(count), beta(count);
    std::vector<void*> pointers(3 * count);  // b's, then a's, then c's
    for (std::size_t g = 0; g < count; ++g) {
      const GemmTerm<Tin, Tout, DeviceSpace>& t = terms[live[g]];
      const BlasGemmArgs& x = args[live[g]];
      m[g] = x.n;
      n[g] = x.m;
      k[g] = x.k;
      ld_first[g] = x.ldb;
      ld_second[g] = x.lda;
      ldc[g] = x.ldc;
      alpha[g] = static_cast<Scalar<Tin>>(t.alpha);
      beta[g] = static_cast<Scalar<Tin>>(t.beta);
      pointers[g] = const_cast<Tin*>(t.b.data);
      pointers[count + g] = const_cast<Tin*>(t.a.data);
      pointers[2 * count + g] = t.c.data;
    }
    // The pointer arrays live on the device; the copy from pageable memory is
    // staged before cudaMemcpyAsync returns, and ordered before the GEMM.
    void** device = ctx.gemm_pointers(pointers.size());
    LORA_CUDA_CHECK(cudaMemcpyAsync(device, pointers.data(), pointers.size() * sizeof(void*), cudaMemcpyHostToDevice,
                                    ctx.stream()));
    const cudaDataType_t in_type = Numeric<Tin>::kDataType, out_type = Numeric<Tout>::kDataType;
    const cublasStatus_t status = cublasGemmGroupedBatchedEx(
        ctx.cublas(), first_op.data(), second_op.data(), m.data(), n.data(), k.data(), alpha.data(), device, in_type,
        ld_first.data(), device + count, in_type, ld_second.data(), beta.data(), device + 2 * count, out_type,
        ldc.data(), static_cast<int>(count), group_size.data(), compute_type<Tin>(ctx));
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) return false;
    LORA_CUBLAS_CHECK(status);
    return true;
  }

  static void check_row_indices(Context& ctx, MatrixView<const std::int64_t, DeviceSpace> rows, std::int64_t limit,
                                bool distinct, const char* op) {
    std::vector<std::int64_t> host(static_cast<std::size_t>(rows.cols));
    copy_to_host(ctx, rows, MatrixView<std::int64_t, HostSpace>(host.data(), 1, rows.cols));
    for (std::size_t i = 0; i < host.size(); ++i) {
      LORA_CHECK(host[i] >= 0 && host[i] < limit,
                 op << ": rows[" << i << "] = " << host[i] << ", expected [0, " << limit << ")");
    }
    if (distinct) {
      std::sort(host.begin(), host.end());
      LORA_CHECK(std::adjacent_find(host.begin(), host.end()) == host.end(),
                 op << ": expected distinct row indices, found a repeated one");
    }
  }
};

static_assert(is_backend_v<Backend>, "lora::cuda::Backend must satisfy the Backend interface");

}  // namespace lora::cuda

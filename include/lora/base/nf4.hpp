// lora::Nf4Base: the frozen layer y = x dequant(W)^T + bias over a 4-bit NF4 W
// (QLoRA), W quantized as bitsandbytes does it (quant/nf4.hpp) and owned in
// the backend's memory.
//
//   W: d_out x d_in as stored (d_in x d_out with fan_in_fan_out), bias: 1 x d_out or empty (borrowed)
//   forward:          y     = x dequant(W)^T + bias   (x dequant(W) with fan_in_fan_out)
//   backward_input:   dL_dx = dL_dy dequant(W)        (dL_dy dequant(W)^T with fan_in_fan_out)
//   matmul, weight_matmul, row_norms_squared: what DoRA reads (QDoRA), as DenseBase
//
// W is never dequantized whole: forward and backward_input dequantize a tile
// of tile_rows() stored rows at a time (Backend::nf4_dequantize_rows) and
// feed it to the backend's GEMM, so the base's memory is the 4-bit W (0.516
// bytes per parameter with double quantization) plus one tile per caller.
// The tile is bounded: kTileElements values by default (16 MiB in fp32),
// set_tile_rows() to change it.
//
// The base is frozen for good: writable() is false and merging is refused
// (re-quantizing W + s B A would lose most of the update). A merged model is
// written densely instead: AdapterSet::merged_weight / Model::merged_weight
// write dequant(W) + s B A in the type the caller picks. Every operation is
// const except set_tile_rows, and forward / backward_input are safe to call
// from several threads at once (each call leases its own tile).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora/base/dense.hpp"
#include "lora/core/backend.hpp"
#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/quant/nf4.hpp"

namespace lora {

template <class T, class Backend>
class Nf4Base {
  static_assert(is_backend_v<Backend>, "Nf4Base<T, Backend>: Backend does not satisfy the Backend interface");
  static_assert(!std::is_const_v<T>, "Nf4Base<const T, Backend>: name the element type without const");

 public:
  using value_type = T;
  using backend_type = Backend;
  using Space = typename Backend::Space;
  using Context = typename Backend::Context;
  using View = MatrixView<T, Space>;
  using ConstView = MatrixView<const T, Space>;
  template <class U>
  using Matrix = typename Backend::template Matrix<U>;

  // Values per dequantized tile by default: 4 Mi (16 MiB in fp32; 1024 rows at
  // d_in = 4096). Smaller tiles cost GEMM efficiency on the CPU (each tile's
  // GEMM re-reads x or dL_dx), larger ones memory.
  static constexpr std::int64_t kTileElements = std::int64_t{1} << 22;

  // Uploads a quantized weight (from nf4::quantize or a file), after nf4::check.
  Nf4Base(Context& ctx, const nf4::Weight& w, ConstView bias = {}, bool fan_in_fan_out = false)
      : Nf4Base(ctx, upload(ctx, w), bias, fan_in_fan_out) {}

  // Quantizes a dense W (d_out x d_in, or d_in x d_out with fan_in_fan_out; any
  // stride) on the backend as nf4::quantize does on the host, byte for byte:
  // Backend::nf4_quantize_blocks, then the double quantization of the absmax
  // values (1/64 of W) on the host. W is only read; the base keeps no reference to it.
  static Nf4Base quantize(Context& ctx, ConstView W, const nf4::Options& options = {}, ConstView bias = {},
                          bool fan_in_fan_out = false) {
    check_view(W, "W", "Nf4Base::quantize");
    nf4::check_options("Nf4Base::quantize", W.rows, W.cols, W.stride, options);
    Storage s;
    s.rows = W.rows;
    s.cols = W.cols;
    s.blocksize = options.blocksize;
    s.dtype = options.dtype;
    const std::int64_t n = W.rows * W.cols, blocks = (n + options.blocksize - 1) / options.blocksize;
    s.packed = Matrix<std::uint8_t>(1, (n + 1) / 2);
    Matrix<float> absmax(1, blocks);
    Backend::template nf4_quantize_blocks<T>(ctx, W, options.blocksize, s.packed.data(), absmax.data());
    if (options.double_quant) {
      nf4::Weight nested;
      nf4::quantize_absmax(download(ctx, absmax), options.nested_blocksize, nested);
      s.absmax_q = upload(ctx, nested.absmax_q);
      s.nested_absmax = upload(ctx, nested.nested_absmax);
      s.nested_code = upload(ctx, nested.nested_code);
      s.nested_blocksize = nested.nested_blocksize;
      s.offset = nested.offset;
    } else {
      s.absmax = std::move(absmax);
    }
    return Nf4Base(ctx, std::move(s), bias, fan_in_fan_out);
  }

  Nf4Base(Nf4Base&&) noexcept = default;
  Nf4Base& operator=(Nf4Base&&) noexcept = default;
  Nf4Base(const Nf4Base&) = delete;
  Nf4Base& operator=(const Nf4Base&) = delete;

  std::int64_t d_in() const { return d_in_; }
  std::int64_t d_out() const { return d_out_; }
  bool fan_in_fan_out() const { return fan_in_fan_out_; }
  // Never: merging onto a 4-bit W is refused (add_delta).
  bool writable() const { return false; }
  // No dense W exists; an empty view (what the layers' overlap checks read).
  ConstView W() const { return {}; }
  ConstView bias() const { return bias_; }
  Context& context() const { return *ctx_; }

  // The quantized weight in the backend's memory (what its kernels read).
  nf4::View<Space> view() const {
    nf4::View<Space> v;
    v.packed = s_.packed.data();
    v.absmax = nested() ? nullptr : s_.absmax.data();
    v.absmax_q = nested() ? s_.absmax_q.data() : nullptr;
    v.nested_absmax = nested() ? s_.nested_absmax.data() : nullptr;
    v.nested_code = nested() ? s_.nested_code.data() : nullptr;
    v.offset = s_.offset;
    v.rows = s_.rows;
    v.cols = s_.cols;
    v.blocksize = s_.blocksize;
    v.nested_blocksize = s_.nested_blocksize;
    return v;
  }
  // A host copy, laid out as bitsandbytes keeps it (for saving).
  nf4::Weight to_host() const {
    nf4::Weight w;
    w.rows = s_.rows;
    w.cols = s_.cols;
    w.blocksize = s_.blocksize;
    w.dtype = s_.dtype;
    w.packed = download(*ctx_, s_.packed);
    if (nested()) {
      w.absmax_q = download(*ctx_, s_.absmax_q);
      w.nested_absmax = download(*ctx_, s_.nested_absmax);
      w.nested_code = download(*ctx_, s_.nested_code);
      w.nested_blocksize = s_.nested_blocksize;
      w.offset = s_.offset;
    } else {
      w.absmax = download(*ctx_, s_.absmax);
    }
    return w;
  }

  // d_out d_in (+ d_out with a bias): what full fine-tuning would train.
  std::int64_t parameters() const { return d_in_ * d_out_ + (bias_.empty() ? 0 : d_out_); }
  // The quantized W (packed values, absmax statistics, nested code) and the
  // bias: 0.516 bytes per weight with double quantization, 0.5625 without.
  std::size_t bytes() const {
    return s_.packed.bytes() + s_.absmax.bytes() + s_.absmax_q.bytes() + s_.nested_absmax.bytes() +
           s_.nested_code.bytes() + (bias_.empty() ? 0 : static_cast<std::size_t>(d_out_) * sizeof(T));
  }
  // The dequantized tiles held for reuse (one per thread that ran at once).
  std::size_t workspace_bytes() const { return tiles_->bytes(); }

  // Stored rows of W per dequantized tile (each tile holds tile_rows x W's
  // stored columns values). Not to be changed while another thread runs the base.
  std::int64_t tile_rows() const { return tile_rows_; }
  void set_tile_rows(std::int64_t rows) {
    LORA_CHECK(rows >= 1, "Nf4Base::set_tile_rows: expected at least 1 row per tile, found " << rows);
    tile_rows_ = std::min(rows, s_.rows);
  }

  // y = x dequant(W)^T + bias                         x: N x d_in, y: N x d_out
  // Tile k holds stored rows [r, r + t) of W:
  //   W stored d_out x d_in:  y[:, r:r+t] = x tile^T           (N x t) = (N x d_in)(d_in x t)
  //   fan_in_fan_out:         y += x[:, r:r+t] tile            (N x d_out) = (N x t)(t x d_out)
  // (y += x dequant(W)^T + bias with OutputMode::accumulate)
  void forward(ConstView x, View y, OutputMode mode = OutputMode::overwrite) const {
    detail::check_forward_args("Nf4Base::forward", x, y, d_in_, d_out_, ConstView(), bias_);
    if (x.rows == 0) return;
    run_tiles(x, y, !fan_in_fan_out_, mode);
    if (!bias_.empty()) Backend::add_row_vector(*ctx_, y, bias_);
  }

  // y = x dequant(W)^T, without the bias (what DoRA rescales)
  void matmul(ConstView x, View y) const {
    detail::check_forward_args("Nf4Base::matmul", x, y, d_in_, d_out_);
    if (x.rows == 0) return;
    run_tiles(x, y, !fan_in_fan_out_, OutputMode::overwrite);
  }

  // out = dequant(W) a^T                              a: k x d_in, out: d_out x k
  // (DoRA's W A^T), a tile of stored rows at a time:
  //   W stored d_out x d_in:  out[r:r+t, :] = tile a^T            (t x k) = (t x d_in)(d_in x k)
  //   fan_in_fan_out:         out += tile^T a[:, r:r+t]^T         (d_out x k) = (d_out x t)(t x k)
  void weight_matmul(ConstView a, View out) const {
    check_shape(a, a.rows, d_in_, "a", "Nf4Base::weight_matmul");
    check_shape(out, d_out_, a.rows, "out", "Nf4Base::weight_matmul");
    for_each_tile([&](std::int64_t r, std::int64_t t, ConstView tile) {
      if (fan_in_fan_out_) {
        Backend::template gemm<T, T>(*ctx_, Op::T, Op::T, 1.0, tile, a.col_block(r, t), r == 0 ? 0.0 : 1.0, out);
      } else {
        Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, 1.0, tile, a, 0.0, out.row_block(r, t));
      }
    });
  }

  // out[0, i] = ||dequant(W)[i, :]||^2 for each output i, in P (1 x d_out), on
  // the backend from one tile at a time, accumulated in double within a tile
  // (DoRA's cached base norms).
  template <class P>
  void row_norms_squared(MatrixView<P, Space> out) const {
    check_shape(out, 1, d_out_, "out", "Nf4Base::row_norms_squared");
    for_each_tile([&](std::int64_t r, std::int64_t t, ConstView tile) {
      if (fan_in_fan_out_) {  // output j is column j of every tile
        Backend::column_dots(*ctx_, 1.0, tile, tile, r == 0 ? 0.0 : 1.0, out);
      } else {  // output r + i is row i of this tile
        Backend::row_dots(*ctx_, 1.0, tile, tile, 0.0, out.col_block(r, t));
      }
    });
  }

  // dL_dx = dL_dy dequant(W)                          dL_dy: N x d_out, dL_dx: N x d_in
  //   W stored d_out x d_in:  dL_dx += dL_dy[:, r:r+t] tile    (N x d_in) = (N x t)(t x d_in)
  //   fan_in_fan_out:         dL_dx[:, r:r+t] = dL_dy tile^T   (N x t) = (N x d_out)(d_out x t)
  // (dL_dx += dL_dy dequant(W) with OutputMode::accumulate)
  void backward_input(ConstView dL_dy, View dL_dx, OutputMode mode = OutputMode::overwrite) const {
    check_shape(dL_dy, dL_dy.rows, d_out_, "dL_dy", "Nf4Base::backward_input");
    check_shape(dL_dx, dL_dy.rows, d_in_, "dL_dx", "Nf4Base::backward_input");
    check_disjoint("Nf4Base::backward_input", dL_dx, "dL_dx", dL_dy, "dL_dy");
    if (dL_dy.rows == 0) return;
    run_tiles(dL_dy, dL_dx, fan_in_fan_out_, mode);
  }

  // The whole dense W as stored (d_out x d_in, or d_in x d_out with
  // fan_in_fan_out), dequantized into out in any type the backend's
  // nf4_dequantize_rows takes: for whoever needs W itself (a dense merged model).
  template <class U>
  void dequantize(MatrixView<U, Space> out) const {
    check_shape(out, s_.rows, s_.cols, "out", "Nf4Base::dequantize");
    Backend::template nf4_dequantize_rows<U>(*ctx_, view(), 0, out);
  }

  // ||dequant(W)[i, :]|| for each output i (of the d_out x d_in weight, whatever
  // its storage), in double on the host, from one tile at a time: what DoRA's
  // magnitude starts from. Not for a hot loop.
  std::vector<double> row_norms() const {
    std::vector<double> squares(static_cast<std::size_t>(d_out_), 0.0);
    TileLease lease(*tiles_, tile_rows_, s_.cols);
    for (std::int64_t r = 0; r < s_.rows; r += tile_rows_) {
      const std::int64_t t = std::min(tile_rows_, s_.rows - r);
      const View tile = lease.tile.view().row_block(0, t);
      Backend::template nf4_dequantize_rows<T>(*ctx_, view(), r, tile);
      if (fan_in_fan_out_) {  // output j is column j of every tile
        for (std::int64_t j = 0; j < d_out_; ++j)
          squares[static_cast<std::size_t>(j)] += Backend::sum_squares(*ctx_, ConstView(tile.col_block(j, 1)));
      } else {  // output r + i is row i of this tile
        for (std::int64_t i = 0; i < t; ++i)
          squares[static_cast<std::size_t>(r + i)] = Backend::sum_squares(*ctx_, ConstView(tile.row_block(i, 1)));
      }
    }
    for (double& s : squares) s = std::sqrt(s);
    return squares;
  }

  // Merging (W <- W + s B A, and DoRA's row scaling) is refused: it would re-quantize W.
  template <class P>
  void add_delta(double, MatrixView<const P, Space>, MatrixView<const P, Space>) {
    refuse_merge();
  }
  template <class P>
  void scale_output_rows(MatrixView<const P, Space>) {
    refuse_merge();
  }

 private:
  // The quantized weight in the backend's memory, laid out as nf4::Weight.
  struct Storage {
    Matrix<std::uint8_t> packed;         // 1 x (n + 1) / 2
    Matrix<float> absmax;                // 1 x blocks; empty when double-quantized
    Matrix<std::uint8_t> absmax_q;       // 1 x blocks (double quantization)
    Matrix<float> nested_absmax;         // 1 x nested blocks
    Matrix<float> nested_code;           // 1 x 256
    float offset = 0.0f;
    std::int64_t rows = 0, cols = 0;
    std::int64_t blocksize = nf4::kBlocksize, nested_blocksize = nf4::kNestedBlocksize;
    std::string dtype = "float32";
  };

  // Dequantized tiles for reuse. A call leases one (a new one when none of the
  // right shape is free) and returns it when done: serial calls allocate once,
  // k threads running at once hold k tiles, and the lock is held only to pop
  // and push. On a GPU every call runs on the base's one stream, so a tile
  // returned while its GEMM is still queued is only written after it.
  class TilePool {
   public:
    Matrix<T> take(std::int64_t rows, std::int64_t cols) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        while (!free_.empty()) {
          Matrix<T> tile = std::move(free_.back());
          free_.pop_back();
          if (tile.rows() == rows && tile.cols() == cols) return tile;  // else the tile size changed: drop it
        }
      }
      return Matrix<T>(rows, cols);
    }
    void give_back(Matrix<T>&& tile) noexcept {
      try {
        std::lock_guard<std::mutex> lock(mutex_);
        free_.push_back(std::move(tile));
      } catch (...) {  // no room to keep it: it is freed instead
      }
    }
    std::size_t bytes() const {
      std::lock_guard<std::mutex> lock(mutex_);
      std::size_t n = 0;
      for (const Matrix<T>& tile : free_) n += tile.bytes();
      return n;
    }

   private:
    mutable std::mutex mutex_;
    std::vector<Matrix<T>> free_;
  };
  struct TileLease {
    TileLease(TilePool& pool_, std::int64_t rows, std::int64_t cols) : pool(pool_), tile(pool_.take(rows, cols)) {}
    ~TileLease() { pool.give_back(std::move(tile)); }
    TileLease(const TileLease&) = delete;
    TileLease& operator=(const TileLease&) = delete;
    TilePool& pool;
    Matrix<T> tile;
  };

  Nf4Base(Context& ctx, Storage&& s, ConstView bias, bool fan_in_fan_out)
      : ctx_(&ctx), s_(std::move(s)), bias_(bias), fan_in_fan_out_(fan_in_fan_out), tiles_(std::make_unique<TilePool>()) {
    d_out_ = fan_in_fan_out ? s_.cols : s_.rows;
    d_in_ = fan_in_fan_out ? s_.rows : s_.cols;
    tile_rows_ = std::clamp<std::int64_t>(kTileElements / s_.cols, 1, s_.rows);
    if (bias.empty()) return;
    check_view(bias, "bias", "Nf4Base");
    LORA_CHECK(bias.rows == 1 && bias.cols == d_out_,
               "Nf4Base: bias is [" << bias.rows << ", " << bias.cols << "] but W is [" << s_.rows << ", " << s_.cols
                                    << "], stored "
                                    << (fan_in_fan_out ? "d_in x d_out (fan_in_fan_out = true)" : "d_out x d_in")
                                    << ", so bias must be [1, " << d_out_ << "]");
  }

  bool nested() const { return s_.absmax.size() == 0; }

  static void refuse_merge() {
    LORA_CHECK(false, "merge: the base is NF4 (4-bit); merging onto it would re-quantize dequant(W) + s B A to 4 "
                      "bits, which loses most of the adapter's update (an NF4 step is larger than a typical "
                      "delta), so it is refused. Write a dense merged weight in the type you want instead: "
                      "AdapterSet::merged_weight(adapter, out) or Model::merged_weight(adapter, module, out)");
  }

  // f(r, t, tile) for each tile of stored rows [r, r + t), dequantized.
  template <class F>
  void for_each_tile(F&& f) const {
    TileLease lease(*tiles_, tile_rows_, s_.cols);
    const nf4::View<Space> w = view();
    for (std::int64_t r = 0; r < s_.rows; r += tile_rows_) {
      const std::int64_t t = std::min(tile_rows_, s_.rows - r);
      const View tile = lease.tile.view().row_block(0, t);
      Backend::template nf4_dequantize_rows<T>(*ctx_, w, r, tile);
      f(r, t, ConstView(tile));
    }
  }

  // One tile of stored rows at a time, out = a op(dequant(W)) (out += with OutputMode::accumulate):
  //   column_blocks:  out[:, r:r+t] = a tile^T         (a: N x stored cols)
  //   otherwise:      out += a[:, r:r+t] tile          (a: N x stored rows; the first tile overwrites)
  void run_tiles(ConstView a, View out, bool column_blocks, OutputMode mode) const {
    TileLease lease(*tiles_, tile_rows_, s_.cols);
    const nf4::View<Space> w = view();
    for (std::int64_t r = 0; r < s_.rows; r += tile_rows_) {
      const std::int64_t t = std::min(tile_rows_, s_.rows - r);
      const View tile = lease.tile.view().row_block(0, t);
      Backend::template nf4_dequantize_rows<T>(*ctx_, w, r, tile);
      if (column_blocks) {
        Backend::template gemm<T, T>(*ctx_, Op::N, Op::T, 1.0, a, ConstView(tile), output_beta(mode),
                                     out.col_block(r, t));
      } else {
        Backend::template gemm<T, T>(*ctx_, Op::N, Op::N, 1.0, a.col_block(r, t), ConstView(tile),
                                     r == 0 ? output_beta(mode) : 1.0, out);
      }
    }
  }

  template <class U>
  static Matrix<U> upload(Context& ctx, const std::vector<U>& host) {
    const auto n = static_cast<std::int64_t>(host.size());
    Matrix<U> m(1, n);
    if (n > 0) Backend::copy_from_host(ctx, MatrixView<const U, HostSpace>(host.data(), 1, n), m.view());
    return m;
  }
  template <class U>
  static std::vector<U> download(Context& ctx, const Matrix<U>& m) {
    std::vector<U> host(static_cast<std::size_t>(m.size()));
    if (!host.empty()) Backend::copy_to_host(ctx, m.view(), MatrixView<U, HostSpace>(host.data(), 1, m.size()));
    return host;
  }
  static Storage upload(Context& ctx, const nf4::Weight& w) {
    nf4::check(w, "Nf4Base");
    Storage s;
    s.rows = w.rows;
    s.cols = w.cols;
    s.blocksize = w.blocksize;
    s.dtype = w.dtype;
    s.packed = upload(ctx, w.packed);
    if (w.nested()) {
      s.absmax_q = upload(ctx, w.absmax_q);
      s.nested_absmax = upload(ctx, w.nested_absmax);
      s.nested_code = upload(ctx, w.nested_code);
      s.nested_blocksize = w.nested_blocksize;
      s.offset = w.offset;
    } else {
      s.absmax = upload(ctx, w.absmax);
    }
    return s;
  }

  Context* ctx_;
  Storage s_;
  ConstView bias_;
  bool fan_in_fan_out_;
  std::int64_t d_in_ = 0;
  std::int64_t d_out_ = 0;
  std::int64_t tile_rows_ = 1;
  std::unique_ptr<TilePool> tiles_;  // behind a pointer: the mutex stays put when the base moves
};

}  // namespace lora

// lora::Nf4Base: the 4-bit frozen base. Its forward and input gradient are
// checked against a DenseBase over nf4::dequantize(W) (the same numbers, one
// GEMM over all of W instead of one per tile), its gradients through a LoRA
// layer by central differences in double, and its place in AdapterSet / Model
// (training, memory, merging refused, dense merged weights) against naive
// loops in double over host copies.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "io_test_util.hpp"
#include "lora/model.hpp"

namespace {

using io_test::expect_error;
using io_test::fill_random;
using Backend = lora::cpu::Backend;
template <class T>
using Matrix = lora::cpu::Matrix<T>;
template <class T>
using ConstView = lora::MatrixView<const T>;
template <class T>
using Nf4 = lora::cpu::Nf4Base<T>;

// The stored shape of a d_out x d_in weight.
struct Layout {
  std::int64_t rows, cols;
};
Layout stored(std::int64_t d_out, std::int64_t d_in, bool fan_in_fan_out) {
  return fan_in_fan_out ? Layout{d_in, d_out} : Layout{d_out, d_in};
}

template <class T>
lora::nf4::Weight quantize_host(const Matrix<T>& W, bool double_quant = true) {
  lora::nf4::Options options;
  options.double_quant = double_quant;
  return lora::nf4::quantize(W.data(), W.rows(), W.cols(), W.cols(), options);
}

template <class T>
Matrix<T> dequantized(const lora::nf4::Weight& w) {
  Matrix<T> out(w.rows, w.cols);
  const std::vector<T> values = lora::nf4::dequantize<T>(w);
  std::copy(values.begin(), values.end(), out.data());
  return out;
}

// max |a - b| / max(1, max |b|)
template <class T>
double max_error(ConstView<T> a, ConstView<T> b) {
  double diff = 0.0, scale = 1.0;
  for (std::int64_t i = 0; i < a.rows; ++i) {
    for (std::int64_t j = 0; j < a.cols; ++j) {
      diff = std::max(diff, std::fabs(double(a(i, j)) - double(b(i, j))));
      scale = std::max(scale, std::fabs(double(b(i, j))));
    }
  }
  return diff / scale;
}

// ---- the base alone ----------------------------------------------------------------

struct BaseCase {
  std::int64_t d_out, d_in, n;
  bool fan_in_fan_out, bias, double_quant;
  std::int64_t tile_rows;  // 0: the default
};

template <class T>
void expect_base_equals_dense(const BaseCase& c, double tolerance) {
  SCOPED_TRACE(::testing::Message() << c.d_out << " x " << c.d_in << " N " << c.n << " fan_in_fan_out "
                                    << c.fan_in_fan_out << " bias " << c.bias << " tile " << c.tile_rows);
  lora::cpu::Context ctx;
  const Layout s = stored(c.d_out, c.d_in, c.fan_in_fan_out);
  Matrix<T> W(s.rows, s.cols), b(1, c.d_out), x(c.n, c.d_in), dL_dy(c.n, c.d_out);
  fill_random(W.view(), 1);
  fill_random(b.view(), 2);
  fill_random(x.view(), 3);
  fill_random(dL_dy.view(), 4);
  const ConstView<T> bias = c.bias ? ConstView<T>(b.view()) : ConstView<T>();

  const lora::nf4::Weight w = quantize_host(W, c.double_quant);
  Matrix<T> Wd = dequantized<T>(w);
  const lora::cpu::DenseBase<T> dense(ctx, ConstView<T>(Wd.view()), bias, c.fan_in_fan_out);
  Nf4<T> base(ctx, w, bias, c.fan_in_fan_out);
  if (c.tile_rows > 0) base.set_tile_rows(c.tile_rows);
  EXPECT_EQ(base.d_in(), c.d_in);
  EXPECT_EQ(base.d_out(), c.d_out);
  EXPECT_EQ(base.parameters(), dense.parameters());

  Matrix<T> y(c.n, c.d_out), y_ref(c.n, c.d_out), dL_dx(c.n, c.d_in), dL_dx_ref(c.n, c.d_in);
  Backend::fill(ctx, y.view(), T(7));  // stale contents must not leak in
  Backend::fill(ctx, dL_dx.view(), T(7));
  base.forward(x.view(), y.view());
  dense.forward(x.view(), y_ref.view());
  base.backward_input(dL_dy.view(), dL_dx.view());
  dense.backward_input(dL_dy.view(), dL_dx_ref.view());
  EXPECT_LE(max_error<T>(y.view(), y_ref.view()), tolerance);
  EXPECT_LE(max_error<T>(dL_dx.view(), dL_dx_ref.view()), tolerance);

  // OutputMode::accumulate adds onto what the output holds (every tile, both layouts, both bases).
  Matrix<T> y0(c.n, c.d_out), dx0(c.n, c.d_in), y_sum(c.n, c.d_out), dx_sum(c.n, c.d_in);
  fill_random(y0.view(), 5);
  fill_random(dx0.view(), 6);
  for (std::int64_t i = 0; i < c.n; ++i) {
    for (std::int64_t j = 0; j < c.d_out; ++j) y_sum(i, j) = y0(i, j) + y(i, j);
    for (std::int64_t j = 0; j < c.d_in; ++j) dx_sum(i, j) = dx0(i, j) + dL_dx(i, j);
  }
  Matrix<T> y_acc = y0.clone(), dx_acc = dx0.clone(), y_acc_ref = y0.clone(), dx_acc_ref = dx0.clone();
  base.forward(x.view(), y_acc.view(), lora::OutputMode::accumulate);
  base.backward_input(dL_dy.view(), dx_acc.view(), lora::OutputMode::accumulate);
  dense.forward(x.view(), y_acc_ref.view(), lora::OutputMode::accumulate);
  dense.backward_input(dL_dy.view(), dx_acc_ref.view(), lora::OutputMode::accumulate);
  EXPECT_LE(max_error<T>(y_acc.view(), y_sum.view()), tolerance);
  EXPECT_LE(max_error<T>(dx_acc.view(), dx_sum.view()), tolerance);
  EXPECT_LE(max_error<T>(y_acc_ref.view(), y_sum.view()), tolerance);
  EXPECT_LE(max_error<T>(dx_acc_ref.view(), dx_sum.view()), tolerance);

  // The dense W it stands for, and its row norms.
  Matrix<T> out(s.rows, s.cols);
  base.dequantize(out.view());
  EXPECT_EQ(std::memcmp(out.data(), Wd.data(), Wd.bytes()), 0);
  const std::vector<double> norms = base.row_norms(), norms_ref = dense.row_norms();
  ASSERT_EQ(norms.size(), static_cast<std::size_t>(c.d_out));
  for (std::size_t i = 0; i < norms.size(); ++i) EXPECT_NEAR(norms[i], norms_ref[i], 1e-12 * (1 + norms_ref[i]));
}

const BaseCase kBaseCases[] = {
    {5, 7, 3, false, false, true, 0},      // one tile, odd sizes, blocks across rows
    {5, 7, 3, true, true, true, 2},        // fan_in_fan_out, bias, 4 tiles (the last of 1 row)
    {67, 130, 9, false, true, true, 16},   // not multiples of 64, 5 tiles
    {130, 67, 4, true, false, false, 33},  // fan_in_fan_out without double quantization, 3 tiles
    {64, 128, 1, false, true, true, 64},   // N = 1, exactly one tile
    {33, 1, 2, false, true, false, 5},     // d_in = 1: n odd, the last byte half used
};

TEST(Nf4Base, ForwardAndInputGradientEqualDenseBaseOverDequantizedW) {
  for (const BaseCase& c : kBaseCases) {
    expect_base_equals_dense<float>(c, 1e-5);
    expect_base_equals_dense<double>(c, 1e-13);
  }
}

TEST(Nf4Base, QuantizeOnTheBackendEqualsHostQuantizeByteForByte) {
  lora::cpu::Context ctx;
  Matrix<float> buffer(37, 50);
  fill_random(buffer.view(), 5);
  const ConstView<float> W = ConstView<float>(buffer.view()).col_block(3, 45);  // strided, n = 37 x 45 odd
  for (const bool double_quant : {true, false}) {
    lora::nf4::Options options;
    options.double_quant = double_quant;
    options.nested_blocksize = 8;  // several nested blocks from 27 absmax values
    options.dtype = "bfloat16";
    const lora::nf4::Weight host = lora::nf4::quantize(W.data, W.rows, W.cols, W.stride, options);
    const lora::nf4::Weight got = Nf4<float>::quantize(ctx, W, options).to_host();
    EXPECT_EQ(got.rows, 37);
    EXPECT_EQ(got.cols, 45);
    EXPECT_EQ(got.blocksize, host.blocksize);
    EXPECT_EQ(got.dtype, "bfloat16");
    EXPECT_EQ(got.packed, host.packed);
    EXPECT_EQ(got.nested(), double_quant);
    ASSERT_EQ(got.absmax.size(), host.absmax.size());  // empty when double-quantized: no memcmp on a null pointer
    if (!host.absmax.empty()) {
      EXPECT_EQ(std::memcmp(got.absmax.data(), host.absmax.data(), host.absmax.size() * 4), 0);
    }
    EXPECT_EQ(got.absmax_q, host.absmax_q);
    EXPECT_EQ(got.nested_absmax, host.nested_absmax);
    EXPECT_EQ(got.nested_code, host.nested_code);
    EXPECT_EQ(got.nested_blocksize, host.nested_blocksize);
    EXPECT_EQ(std::memcmp(&got.offset, &host.offset, sizeof(float)), 0);
  }
}

TEST(Nf4Base, BytesAreTheQuantizedWeight) {
  lora::cpu::Context ctx;
  Matrix<float> W(130, 67), b(1, 130);
  fill_random(W.view(), 6);
  // n = 8710 values: 4355 packed bytes, 137 blocks of 64, one nested block of 256.
  const Nf4<float> nested(ctx, quantize_host(W, true));
  EXPECT_EQ(nested.bytes(), 4355u + 137u + 4u + 256u * 4u);
  const Nf4<float> plain(ctx, quantize_host(W, false), ConstView<float>(b.view()));
  EXPECT_EQ(plain.bytes(), 4355u + 137u * 4u + 130u * 4u);  // and the fp32 bias
  EXPECT_EQ(plain.parameters(), 130 * 67 + 130);
  EXPECT_FALSE(plain.writable());
  EXPECT_TRUE(plain.W().empty());
}

TEST(Nf4Base, RejectsAWeightThatDoesNotCheckAndABiasThatDoesNotFit) {
  lora::cpu::Context ctx;
  Matrix<float> W(6, 10), b(1, 10);
  fill_random(W.view(), 7);
  lora::nf4::Weight w = quantize_host(W);
  w.packed.pop_back();
  expect_error([&] { Nf4<float> base(ctx, w); }, {"Nf4Base", "pack into 30 bytes, found 29"});
  expect_error([&] { Nf4<float> base(ctx, quantize_host(W), ConstView<float>(b.view())); },
               {"Nf4Base: bias is [1, 10]", "bias must be [1, 6]"});
  lora::nf4::Options odd;
  odd.blocksize = 63;
  expect_error([&] { Nf4<float>::quantize(ctx, W.view(), odd); }, {"Nf4Base::quantize", "blocksize must be even"});
  Nf4<float> base(ctx, quantize_host(W));
  expect_error([&] { base.set_tile_rows(0); }, {"set_tile_rows", "at least 1"});
  Matrix<float> x(2, 9), y(2, 6);
  expect_error([&] { base.forward(x.view(), y.view()); }, {"Nf4Base::forward: x: expected shape [2, 10]"});
}

// Two threads on one base (tiles smaller than W, so each call leases a tile
// and runs several GEMMs) give what one thread gives.
TEST(Nf4Base, ForwardFromTwoThreadsAtOnceEqualsSerial) {
  lora::cpu::Context ctx;
  Matrix<float> W(300, 200), x1(40, 200), x2(40, 200);
  fill_random(W.view(), 8);
  fill_random(x1.view(), 9);
  fill_random(x2.view(), 10);
  Nf4<float> base(ctx, quantize_host(W));
  base.set_tile_rows(32);
  Matrix<float> serial1(40, 300), serial2(40, 300), dx_serial(40, 200);
  base.forward(x1.view(), serial1.view());
  base.forward(x2.view(), serial2.view());
  base.backward_input(serial1.view(), dx_serial.view());
  std::vector<Matrix<float>> y1, y2, dx;
  for (int k = 0; k < 20; ++k) {
    y1.emplace_back(40, 300);
    y2.emplace_back(40, 300);
    dx.emplace_back(40, 200);
  }
  std::thread a([&] {
    for (auto& y : y1) base.forward(x1.view(), y.view());
  });
  std::thread b([&] {
    for (std::size_t k = 0; k < y2.size(); ++k) {
      base.forward(x2.view(), y2[k].view());
      base.backward_input(serial1.view(), dx[k].view());
    }
  });
  a.join();
  b.join();
  for (std::size_t k = 0; k < y1.size(); ++k) {
    EXPECT_EQ(std::memcmp(y1[k].data(), serial1.data(), serial1.bytes()), 0) << k;
    EXPECT_EQ(std::memcmp(y2[k].data(), serial2.data(), serial2.bytes()), 0) << k;
    EXPECT_EQ(std::memcmp(dx[k].data(), dx_serial.data(), dx_serial.bytes()), 0) << k;
  }
  EXPECT_GE(base.workspace_bytes(), std::size_t{32 * 200 * 4});  // at least one tile kept for reuse
  EXPECT_LE(base.workspace_bytes(), std::size_t{2 * 32 * 200 * 4});  // at most one per thread
}

// ---- gradients through an NF4 base -----------------------------------------------------

using Nf4Linear = lora::Linear<double, Backend, Nf4<double>>;

// L = sum(y o G) with y the layer's inference: dL_dy = G.
double loss(const Nf4Linear& layer, const Matrix<double>& x, const Matrix<double>& G) {
  Matrix<double> y(x.rows(), layer.d_out());
  layer.inference(x.view(), y.view());
  double sum = 0.0;
  for (std::int64_t i = 0; i < y.size(); ++i) sum += y.data()[i] * G.data()[i];
  return sum;
}

// Central differences of L over every element of v against `analytic`.
double gradient_error(const Nf4Linear& layer, const Matrix<double>& x, const Matrix<double>& G,
                      lora::MatrixView<double> v, ConstView<double> analytic) {
  constexpr double h = 1e-5;
  double worst = 0.0;
  for (std::int64_t i = 0; i < v.rows; ++i) {
    for (std::int64_t j = 0; j < v.cols; ++j) {
      const double saved = v(i, j);
      v(i, j) = saved + h;
      const double plus = loss(layer, x, G);
      v(i, j) = saved - h;
      const double minus = loss(layer, x, G);
      v(i, j) = saved;
      const double numeric = (plus - minus) / (2 * h);
      worst = std::max(worst, std::fabs(numeric - analytic(i, j)) / std::max(1.0, std::fabs(numeric)));
    }
  }
  return worst;
}

TEST(Nf4Base, GradientsThroughTheBaseMatchCentralDifferences) {
  struct Case {
    std::int64_t d_out, d_in, n;
    int r;
    bool fan_in_fan_out;
  };
  for (const Case& c : {Case{11, 13, 5, 1, false}, Case{11, 13, 5, 11, true}, Case{9, 70, 1, 3, false},
                        Case{70, 9, 4, 9, true}}) {
    SCOPED_TRACE(::testing::Message() << c.d_out << " x " << c.d_in << " N " << c.n << " r " << c.r);
    lora::cpu::Context ctx;
    const Layout s = stored(c.d_out, c.d_in, c.fan_in_fan_out);
    Matrix<double> W(s.rows, s.cols), b(1, c.d_out), x(c.n, c.d_in), G(c.n, c.d_out);
    fill_random(W.view(), 11);
    fill_random(b.view(), 12);
    fill_random(x.view(), 13);
    fill_random(G.view(), 14);
    lora::Config config;
    config.r = c.r;
    config.alpha = 2.0 * c.r;
    config.fan_in_fan_out = c.fan_in_fan_out;
    Nf4<double> base = Nf4<double>::quantize(ctx, W.view(), {}, b.view(), c.fan_in_fan_out);
    base.set_tile_rows(4);
    Nf4Linear layer(std::move(base), config);
    fill_random(layer.lora_B().value, 15);  // B != 0, so dL_dA is not 0

    Matrix<double> y(c.n, c.d_out), dL_dx(c.n, c.d_in);
    layer.forward(x.view(), y.view());
    layer.backward(x.view(), G.view(), dL_dx.view());
    EXPECT_LE(gradient_error(layer, x, G, layer.lora_A().value, layer.dL_dA()), 1e-6);
    EXPECT_LE(gradient_error(layer, x, G, layer.lora_B().value, layer.dL_dB()), 1e-6);
    EXPECT_LE(gradient_error(layer, x, G, x.view(), dL_dx.view()), 1e-6);
  }
}

TEST(Nf4Base, LinearOverNf4RefusesToMergeAndSaysWhatToDo) {
  lora::cpu::Context ctx;
  Matrix<float> W(6, 8);
  fill_random(W.view(), 16);
  lora::Linear<float, Backend, Nf4<float>> layer(Nf4<float>::quantize(ctx, W.view()), lora::Config{});
  expect_error([&] { layer.merge(); }, {"NF4", "re-quantize", "merged_weight"});
  EXPECT_FALSE(layer.merged());
  lora::Config fan;
  fan.fan_in_fan_out = true;
  expect_error([&] { lora::Linear<float, Backend, Nf4<float>> bad(Nf4<float>::quantize(ctx, W.view()), fan); },
               {"Config.fan_in_fan_out = 1, expected 0"});
}

// ---- a model over NF4 bases ----------------------------------------------------------

// dequant(W) + s B A (stored layout), naively in double from host copies.
Matrix<double> merged_reference(const lora::nf4::Weight& w, ConstView<float> A, ConstView<float> B, double s,
                                bool fan_in_fan_out) {
  Matrix<double> out = dequantized<double>(w);
  for (std::int64_t o = 0; o < B.rows; ++o) {
    for (std::int64_t i = 0; i < A.cols; ++i) {
      double delta = 0.0;
      for (std::int64_t k = 0; k < A.rows; ++k) delta += double(B(o, k)) * double(A(k, i));
      (fan_in_fan_out ? out(i, o) : out(o, i)) += s * delta;
    }
  }
  return out;
}

TEST(Nf4Base, ModelOverNf4BasesTrainsCountsQuantizedBytesAndWritesDenseMergedWeights) {
  lora::cpu::Context ctx;
  using Model = lora::Model<float, Backend, Nf4<float>>;
  Model model(ctx);
  const char* names[] = {"layers.0.q_proj", "layers.0.v_proj", "layers.0.o_proj"};
  const std::int64_t d = 48, n = 16;
  std::vector<Matrix<float>> dense;
  std::vector<lora::nf4::Weight> host;
  for (int m = 0; m < 3; ++m) {
    dense.emplace_back(d, d);
    fill_random(dense.back().view(), 20 + m);
    host.push_back(quantize_host(dense.back()));
    Nf4<float> base(ctx, host.back());
    base.set_tile_rows(10);
    model.add_base(names[m], std::move(base));
  }
  lora::io::PeftConfig config;
  config.r = 4;
  config.lora_alpha = 8;
  config.target_modules = {"q_proj", "v_proj"};
  EXPECT_EQ(model.add_adapter("default", config, 3), (std::vector<std::string>{names[0], names[1]}));

  // Memory: the quantized bytes of each base (d^2 / 2 packed + 36 blocks + one nested block + the code).
  const std::size_t per_base = d * d / 2 + 36 + 4 + 256 * 4;
  lora::Adam<float, Backend> adam(ctx, lora::AdamOptions::adamw(1e-2, 0.0));
  adam.add_group(model.parameters());
  EXPECT_EQ(model.memory().frozen_bytes, 3 * per_base);
  EXPECT_EQ(model.frozen_parameters(), 3 * d * d);
  EXPECT_EQ(model.trainable_parameters(), 2 * 4 * (d + d));

  // Train q_proj's adapter to reproduce a target layer's output: the loss falls.
  Matrix<float> x(n, d), target(n, d), y(n, d), dL_dy(n, d);
  fill_random(x.view(), 30);
  fill_random(target.view(), 31);
  auto& q = model.module(names[0]);
  typename Model::Set::ForwardState state;
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 30; ++step) {
    q.forward(x.view(), y.view(), state);
    double l = 0.0;
    for (std::int64_t i = 0; i < y.size(); ++i) {
      const double r = double(y.data()[i]) - double(target.data()[i]);
      l += r * r / double(y.size());
      dL_dy.data()[i] = static_cast<float>(2 * r / double(y.size()));
    }
    if (step == 0) first = l;
    last = l;
    q.backward(state, x.view(), dL_dy.view(), {});
    adam.step();
  }
  EXPECT_LT(last, 0.9 * first) << "first " << first << " last " << last;

  // Merging onto NF4 is refused, with why and what instead; nothing changes.
  expect_error([&] { model.merge("default"); }, {"NF4", "re-quantize", "merged_weight"});
  EXPECT_EQ(model.merged(), "");
  expect_error([&] { model.module(names[0]).merge("default"); }, {"NF4", "merged_weight"});

  // Dense merged weights in fp32 and fp64: dequant(W) + s B A, or dequant(W) off the adapter.
  const double s = 8.0 / 4.0;
  for (int m = 0; m < 3; ++m) {
    SCOPED_TRACE(names[m]);
    Matrix<double> ref = dequantized<double>(host[m]);
    if (m < 2) {
      const auto& a = model.module(names[m]).get("default");
      ref = merged_reference(host[m], a.A(), a.B(), s, false);
    }
    Matrix<float> out(d, d);
    Matrix<double> out64(d, d);
    model.merged_weight("default", names[m], out.view());
    model.merged_weight("default", names[m], out64.view());
    Matrix<double> widened(d, d);
    Backend::convert(ctx, ConstView<float>(out.view()), widened.view());
    EXPECT_LE(max_error<double>(widened.view(), ref.view()), 1e-6);
    EXPECT_LE(max_error<double>(out64.view(), ref.view()), 1e-6);  // B A in fp32, added in double
  }
  // The update is really there (not a copy of dequant(W)).
  Matrix<float> merged_q(d, d), base_q(d, d);
  model.merged_weight("default", names[0], merged_q.view());
  model.module(names[0]).base_weight(base_q.view());
  EXPECT_GT(max_error<float>(merged_q.view(), base_q.view()), 1e-3);
  expect_error([&] { model.merged_weight("other", names[0], merged_q.view()); }, {"unknown adapter \"other\""});
  Matrix<float> wrong(d, d + 1);
  expect_error([&] { model.merged_weight("default", names[0], wrong.view()); }, {"out: expected shape [48, 48]"});
}

// With a dense base, merged_weight is exactly what merge() leaves in W (the
// same add_delta on a copy of W), for either layout.
TEST(Nf4Base, MergedWeightOverADenseBaseEqualsMergeBitForBit) {
  for (const bool fan_in_fan_out : {false, true}) {
    lora::cpu::Context ctx;
    const Layout s = stored(7, 5, fan_in_fan_out);
    Matrix<float> W(s.rows, s.cols);
    fill_random(W.view(), 40);
    lora::cpu::AdapterSet<float> set(ctx, W.view(), {}, fan_in_fan_out);
    lora::Config config;
    config.r = 3;
    config.fan_in_fan_out = fan_in_fan_out;
    fill_random(set.add("a", config).lora_B().value, 41);
    Matrix<float> out(s.rows, s.cols);
    set.merged_weight("a", out.view());
    set.merge("a");
    EXPECT_EQ(std::memcmp(out.data(), W.data(), W.bytes()), 0);
    Matrix<float> again(s.rows, s.cols);
    set.merged_weight("a", again.view());  // merged: W already holds it
    EXPECT_EQ(std::memcmp(again.data(), W.data(), W.bytes()), 0);
    set.add("b", config);
    expect_error([&] { set.merged_weight("b", again.view()); }, {"adapter \"a\" is merged into W"});
  }
}

}  // namespace

// Every invalid configuration, shape and call order is rejected with a
// lora::Error whose message names the field or tensor, the value or shape
// found and what was expected; and the scale follows from alpha and r.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "io_test_util.hpp"
#include "lora/lora.hpp"

namespace {

using io_test::expect_error;
using io_test::kInf;
using io_test::kNaN;
using lora::Config;
using lora::Mode;
using lora::cpu::Matrix;
using Layer = lora::cpu::Linear<float>;

Config config_with_r(int r) {
  Config c;
  c.r = r;
  return c;
}

// ---- Config ------------------------------------------------------------------

TEST(Config, RejectsRankBelowOne) {
  expect_error([] { config_with_r(0).validate(); }, {"Config.r = 0", ">= 1"});
  expect_error([] { config_with_r(-3).validate(); }, {"Config.r = -3", ">= 1"});
}

TEST(Config, RejectsNonPositiveOrNonFiniteAlpha) {
  for (double alpha : {0.0, -1.5, kNaN, kInf, -kInf}) {
    Config c;
    c.alpha = alpha;
    std::ostringstream value;
    value << "Config.alpha = " << alpha;
    const std::string expected = value.str();
    expect_error([&] { c.validate(); }, {expected.c_str(), "finite", "> 0"});
  }
}

TEST(Config, RejectsDropoutOutsideZeroToOne) {
  for (double p : {-0.1, 1.0, 1.5, kNaN, kInf}) {
    Config c;
    c.dropout = p;
    std::ostringstream value;
    value << "Config.dropout = " << p;
    const std::string expected = value.str();
    expect_error([&] { c.validate(); }, {expected.c_str(), "[0, 1)"});
  }
}

TEST(Config, AcceptsTheEdgesOfEveryRange) {
  Config c;
  c.r = 1;
  c.alpha = 1e-30;
  c.dropout = 0.0;
  EXPECT_NO_THROW(c.validate());
  c.dropout = std::nextafter(1.0, 0.0);
  EXPECT_NO_THROW(c.validate());
}

TEST(Config, ScaleIsAlphaOverROrOverSqrtRWithRsLora) {
  Config c;
  c.r = 8;
  c.alpha = 16.0;
  EXPECT_DOUBLE_EQ(c.scale(), 2.0);
  c.use_rslora = true;
  EXPECT_DOUBLE_EQ(c.scale(), 16.0 / std::sqrt(8.0));  // 5.656854...

  // The layer uses the config's scale (its effect on y is checked against a
  // naive reference in test_linear.cpp).
  lora::cpu::Context ctx;
  Matrix<float> W(9, 10);
  c.r = 4;
  c.alpha = 3.0;
  c.use_rslora = false;
  EXPECT_DOUBLE_EQ(Layer(ctx, W.view(), {}, c).scale(), 0.75);
  c.use_rslora = true;
  EXPECT_DOUBLE_EQ(Layer(ctx, W.view(), {}, c).scale(), 1.5);
}

// PEFT accepts any r >= 1, r > min(d_in, d_out) included (r = 16 on an 8 x 64
// router gate under "all-linear"), so such adapters exist; they used to be
// refused here. Their numbers are checked in test_linear.cpp.
TEST(Config, AnyRankFromOneUpFitsTheLayer) {
  lora::cpu::Context ctx;
  Matrix<float> W(6, 4);  // d_out = 6, d_in = 4
  for (int r : {1, 4, 5, 16}) {
    const Layer layer(ctx, W.view(), {}, config_with_r(r));
    EXPECT_EQ(layer.rank(), r);
    EXPECT_EQ(layer.A().rows, r);
    EXPECT_EQ(layer.B().cols, r);
    EXPECT_EQ(layer.trainable_parameters(), r * (4 + 6));
  }
  // Transposed base (GPT-2 Conv1D): W is d_in x d_out = 6 x 4, so d_out = 4.
  Config c = config_with_r(5);
  c.fan_in_fan_out = true;
  EXPECT_EQ(Layer(ctx, W.view(), {}, c).d_out(), 4);

  // The shape-free checks run at construction too.
  expect_error([&] { Layer(ctx, W.view(), {}, config_with_r(0)); }, {"Config.r = 0"});
  Config bad_p;
  bad_p.r = 2;
  bad_p.dropout = kNaN;
  expect_error([&] { Layer(ctx, W.view(), {}, bad_p); }, {"Config.dropout = nan"});
}

// ---- AdamOptions -------------------------------------------------------------

TEST(AdamOptions, RejectsEveryInvalidValue) {
  lora::cpu::Context ctx;
  struct Case {
    const char* field;
    double value;
    const char* range;
  };
  const Case cases[] = {
      {"lr", -1e-3, ">= 0"},          {"lr", kNaN, ">= 0"},          {"lr", kInf, ">= 0"},
      {"beta1", -0.1, "[0, 1)"},      {"beta1", 1.0, "[0, 1)"},      {"beta1", kNaN, "[0, 1)"},
      {"beta2", -0.5, "[0, 1)"},      {"beta2", 1.0, "[0, 1)"},      {"beta2", kNaN, "[0, 1)"},
      {"eps", -1e-8, ">= 0"},         {"eps", kInf, ">= 0"},         {"eps", kNaN, ">= 0"},
      {"weight_decay", -0.01, ">= 0"}, {"weight_decay", kNaN, ">= 0"},
  };
  for (const Case& c : cases) {
    lora::AdamOptions o;
    const std::string field = c.field;
    if (field == "lr") o.lr = c.value;
    if (field == "beta1") o.beta1 = c.value;
    if (field == "beta2") o.beta2 = c.value;
    if (field == "eps") o.eps = c.value;
    if (field == "weight_decay") o.weight_decay = c.value;
    std::ostringstream value;
    value << "AdamOptions." << c.field << " = " << c.value;
    const std::string expected = value.str();
    SCOPED_TRACE(expected);
    expect_error([&] { lora::cpu::Adam<float>(ctx, o); }, {expected.c_str(), c.range});
  }
  EXPECT_NO_THROW(lora::cpu::Adam<float>(ctx, lora::AdamOptions::adamw()));
}

TEST(AdamOptions, RejectsInvalidGroupsAndClipNorms) {
  lora::cpu::Context ctx;
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions{});
  Matrix<float> value(3, 4), grad(3, 4), wrong_grad(4, 3);
  expect_error([&] { adam.add_group({{value.view(), grad.view(), "A"}}, -1.0); }, {"lr = -1"});
  expect_error([&] { adam.add_group({{value.view(), grad.view(), "A"}}, kNaN); }, {"lr = nan"});
  expect_error([&] { adam.add_group({{value.view(), grad.view(), "A"}}, 0.1, -0.5); }, {"weight_decay = -0.5"});
  expect_error([&] { adam.add_group({{value.view(), wrong_grad.view(), "A"}}); },
               {"A.grad", "expected shape [3, 4]", "found [4, 3]"});
  EXPECT_EQ(adam.group_count(), 0u);
  expect_error([&] { adam.clip_grad_norm(0.0); }, {"max_norm = 0"});
  expect_error([&] { adam.clip_grad_norm(-1.0); }, {"max_norm = -1"});
}

// ---- shapes ------------------------------------------------------------------

// d_out = 6, d_in = 4, r = 2, N = 3.
struct ShapeFixture : ::testing::Test {
  lora::cpu::Context ctx;
  Matrix<float> W{6, 4}, bias{1, 6};
  Matrix<float> x{3, 4}, y{3, 6}, dL_dy{3, 6}, dL_dx{3, 4};
  Layer layer{ctx, W.view(), bias.view(), config_with_r(2)};
};

TEST_F(ShapeFixture, ForwardRejectsWrongXAndY) {
  Matrix<float> x_wide(3, 5), y_short(2, 6), y_narrow(3, 7);
  expect_error([&] { layer.forward(x_wide.view(), y.view()); },
               {"Linear::forward: x: expected shape [3, 4], found [3, 5]"});
  expect_error([&] { layer.forward(x.view(), y_short.view()); }, {": y: expected shape [3, 6], found [2, 6]"});
  expect_error([&] { layer.forward(x.view(), y_narrow.view(), Mode::eval); },
               {": y: expected shape [3, 6], found [3, 7]"});
}

TEST_F(ShapeFixture, BackwardRejectsWrongGradientShapes) {
  layer.forward(x.view(), y.view(), Mode::train);
  Matrix<float> dL_dy_wrong(3, 5), dL_dx_wrong(3, 6), x_wrong(3, 5);
  expect_error([&] { layer.backward(x.view(), dL_dy_wrong.view(), dL_dx.view()); },
               {": dL_dy: expected shape [3, 6], found [3, 5]"});
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), dL_dx_wrong.view()); },
               {": dL_dx: expected shape [3, 4], found [3, 6]"});
  expect_error([&] { layer.backward(x_wrong.view(), dL_dy.view(), {}); }, {": x: expected shape [3, 4], found [3, 5]"});
  // The cache still holds the good forward: a correct call works afterwards.
  EXPECT_NO_THROW(layer.backward(x.view(), dL_dy.view(), dL_dx.view()));
}

TEST_F(ShapeFixture, BackwardRejectsXOfAnotherBatchWithoutWritingDLDx) {
  layer.forward(x.view(), y.view(), Mode::train);
  // x, dL_dy, dL_dx agree with each other (N = 2) but not with the cached forward (N = 3).
  Matrix<float> x2(2, 4), dL_dy2(2, 6), dL_dx2(2, 4);
  for (std::int64_t i = 0; i < dL_dy2.size(); ++i) dL_dy2.data()[i] = 1.0f;
  for (std::int64_t i = 0; i < dL_dx2.size(); ++i) dL_dx2.data()[i] = 7.0f;
  W(0, 0) = 1.0f;  // so that dL_dy W would not be zero
  expect_error([&] { layer.backward(x2.view(), dL_dy2.view(), dL_dx2.view()); }, {"x: expected", "3", "found"});
  for (std::int64_t i = 0; i < dL_dx2.size(); ++i) EXPECT_EQ(dL_dx2.data()[i], 7.0f) << "dL_dx written at " << i;
}

TEST_F(ShapeFixture, ConstructionRejectsWrongBiasAndEmptyW) {
  Matrix<float> bias_short(1, 5), bias_column(6, 1), empty_rows(0, 4);
  expect_error([&] { Layer(ctx, W.view(), bias_short.view(), config_with_r(2)); },
               {"Linear: bias is [1, 5] but W is [6, 4], stored d_out x d_in, so bias must be [1, 6]"});
  expect_error([&] { Layer(ctx, W.view(), bias_column.view(), config_with_r(2)); },
               {"Linear: bias is [6, 1]", "bias must be [1, 6]"});
  expect_error([&] { Layer(ctx, empty_rows.view(), {}, config_with_r(2)); }, {": W: expected a non-empty matrix", "[0, 4]"});
  expect_error([&] { Layer(ctx, lora::MatrixView<float>(), {}, config_with_r(2)); },
               {": W: expected a non-empty matrix", "[0, 0]"});
  // With fan_in_fan_out the bias has d_out = W.cols entries.
  Config c = config_with_r(2);
  c.fan_in_fan_out = true;
  expect_error([&] { Layer(ctx, W.view(), bias.view(), c); },
               {"Linear: bias is [1, 6] but W is [6, 4], stored d_in x d_out (fan_in_fan_out = true)",
                "bias must be [1, 4]", "set Config.fan_in_fan_out = false"});
}

// A W passed transposed used to be reported as a wrong bias shape, with the
// library's file:line in front. The message now names the call, W's shape
// and the likely mistake; file:line appears only in a debug build.
TEST(Errors, TransposedWIsReportedAgainstW) {
  lora::cpu::Context ctx;
  Matrix<float> W_transposed(4, 6), bias(1, 6);  // meant: d_out = 6, d_in = 4, so W is 6 x 4
  try {
    Layer(ctx, W_transposed.view(), bias.view(), config_with_r(2));
    ADD_FAILURE() << "expected a lora::Error";
  } catch (const lora::Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("Linear: bias is [1, 6] but W is [4, 6], stored d_out x d_in, so bias must be [1, 4]; is W "
                           "transposed? A base stored d_in x d_out (GPT-2's Conv1D) needs Config.fan_in_fan_out = true"),
              std::string::npos)
        << message;
#ifdef NDEBUG
    EXPECT_EQ(message.rfind("Linear: ", 0), 0u) << "a release build's message starts with the call: " << message;
#else
    EXPECT_NE(message.find("linear.hpp:"), std::string::npos) << "a debug build adds file:line: " << message;
#endif
  }
}

TEST_F(ShapeFixture, ErrorsNameTheCallAndStartThereInARelease) {
  Matrix<float> x_wide(3, 5);
  try {
    layer.forward(x_wide.view(), y.view());
    ADD_FAILURE() << "expected a lora::Error";
  } catch (const lora::Error& e) {
    const std::string message = e.what();
#ifdef NDEBUG
    EXPECT_EQ(message, "Linear::forward: x: expected shape [3, 4], found [3, 5]");
#else
    EXPECT_NE(message.find("matrix_view.hpp:"), std::string::npos) << message;
    EXPECT_NE(message.find(": Linear::forward: x: expected shape [3, 4], found [3, 5]"), std::string::npos) << message;
#endif
  }
}

// ---- views ---------------------------------------------------------------------

// Every view is checked before anything reads or writes memory: negative sizes
// (they reached Eigen, whose assertion aborts), strides below the width (W with
// stride < cols made OpenBLAS print "parameter number 8 had an illegal value"
// and return garbage), null data, and extents whose (rows - 1) * stride
// overflows (undefined behaviour, then wild reads). y stays as it was.
TEST_F(ShapeFixture, InvalidViewsAreRejectedBeforeAnythingIsWritten) {
  using CView = lora::MatrixView<const float>;
  constexpr std::int64_t kHuge = std::numeric_limits<std::int64_t>::max() / 2;
  for (std::int64_t i = 0; i < y.size(); ++i) y.data()[i] = 7.0f;
  expect_error([&] { layer.forward(CView(x.data(), -1, 4), y.view()); },
               {"Linear::forward: x: shape [-1, 4] has a negative size"});
  expect_error([&] { layer.forward(CView(x.data(), 3, -4), y.view()); }, {"Linear::forward: x: expected shape [3, 4]"});
  expect_error([&] { layer.forward(CView(x.data(), 3, 4, 2), y.view()); },
               {"Linear::forward: x: stride 2 is smaller than cols 4"});
  expect_error([&] { layer.forward(CView(nullptr, 3, 4), y.view()); },
               {"Linear::forward: x: null data for a non-empty [3, 4] matrix"});
  expect_error([&] { layer.forward(CView(x.data(), 3, 4, kHuge), y.view()); },
               {"Linear::forward: x: [3, 4] with stride", "the extent overflows"});
  expect_error([&] { layer.forward(x.view(), lora::MatrixView<float>(y.data(), 3, 6, 5)); },
               {"Linear::forward: y: stride 5 is smaller than cols 6"});
  for (std::int64_t i = 0; i < y.size(); ++i) EXPECT_EQ(y.data()[i], 7.0f) << "y written at " << i;

  layer.forward(x.view(), y.view(), Mode::train);
  for (std::int64_t i = 0; i < dL_dx.size(); ++i) dL_dx.data()[i] = 7.0f;
  expect_error([&] { layer.backward(x.view(), CView(dL_dy.data(), 3, 6, kHuge), dL_dx.view()); },
               {"Linear::backward: dL_dy: [3, 6] with stride", "the extent overflows"});
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), lora::MatrixView<float>(dL_dx.data(), 3, 4, 1)); },
               {"Linear::backward: dL_dx: stride 1 is smaller than cols 4"});
  for (std::int64_t i = 0; i < dL_dx.size(); ++i) EXPECT_EQ(dL_dx.data()[i], 7.0f) << "dL_dx written at " << i;

  // The frozen base: W with stride < cols, or a negative or overflowing bias.
  expect_error([&] { Layer(ctx, lora::MatrixView<float>(W.data(), 6, 4, 2), {}, config_with_r(2)); },
               {"Linear: W: stride 2 is smaller than cols 4"});
  expect_error([&] { Layer(ctx, lora::MatrixView<float>(W.data(), 6, 4, kHuge), {}, config_with_r(2)); },
               {"Linear: W: [6, 4] with stride", "the extent overflows"});
  expect_error([&] { Layer(ctx, W.view(), CView(bias.data(), 1, -6), config_with_r(2)); },
               {"Linear: bias: shape [1, -6] has a negative size"});

  // The backend's own entry points check their views too.
  for (std::int64_t i = 0; i < y.size(); ++i) y.data()[i] = 7.0f;
  expect_error([&] { lora::cpu::Backend::gemm<float, float>(ctx, lora::Op::N, lora::Op::T, 1.0, CView(x.data(), -3, 4),
                                                            W.view(), 0.0, y.view()); },
               {"gemm: a: shape [-3, 4] has a negative size"});
  expect_error([&] { lora::cpu::Backend::fill(ctx, lora::MatrixView<float>(y.data(), 3, 6, kHuge), 0.0f); },
               {"fill: x: [3, 6] with stride", "the extent overflows"});
  for (std::int64_t i = 0; i < y.size(); ++i) EXPECT_EQ(y.data()[i], 7.0f) << "y written at " << i;
}

// ---- outputs that overlap inputs -------------------------------------------------

// y = x W^T + ... with y in x's memory overwrites x while the GEMM still reads
// it; backward writes dL_dx = dL_dy W before it reads x (for dL_dA) or while it
// reads dL_dy. All of these computed wrong numbers without a word; now each
// throws, naming both arguments, before anything is written.
TEST(Aliasing, LinearRefusesOutputsThatOverlapInputs) {
  lora::cpu::Context ctx;
  // A square layer (d_in = d_out = 5), so x, y, dL_dy and dL_dx all have one shape.
  Matrix<float> W(5, 5), bias(1, 5), x(3, 5), y(3, 5), dL_dy(3, 5), dL_dx(3, 5);
  for (Matrix<float>* m : {&W, &bias, &x, &dL_dy})
    for (std::int64_t i = 0; i < m->size(); ++i) m->data()[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
  Layer layer(ctx, W.view(), bias.view(), config_with_r(2));
  const Matrix<float> x_before = x.clone(), dL_dy_before = dL_dy.clone(), W_before = W.clone();
  const auto unchanged = [](const Matrix<float>& now, const Matrix<float>& before, const char* what) {
    EXPECT_EQ(std::memcmp(now.data(), before.data(), now.bytes()), 0) << what << " was written";
  };

  for (Mode mode : {Mode::train, Mode::eval}) {
    expect_error([&] { layer.forward(x.view(), x.view(), mode); }, {"Linear::forward: y overlaps x"});
  }
  expect_error([&] { layer.base_forward(x.view(), x.view()); }, {"Linear::base_forward: y overlaps x"});
  expect_error([&] { layer.forward_lora(x.view(), x.view(), Mode::eval); }, {"Linear::forward_lora: y overlaps x"});
  // Partial overlap: y is rows 1..3 of a buffer whose rows 0..2 are x.
  Matrix<float> buf(4, 5);
  expect_error([&] { layer.forward(buf.view().row_block(0, 3), buf.view().row_block(1, 3)); },
               {"Linear::forward: y overlaps x"});
  expect_error([&] { layer.forward(x.view(), W.view().row_block(2, 3)); }, {"Linear::forward: y overlaps W"});
  Matrix<float> y_and_bias(4, 5);  // a layer whose bias is row 3 of a buffer, and a y that covers it
  Layer layer_b(ctx, W.view(), y_and_bias.view().row_block(3, 1), config_with_r(2));
  expect_error([&] { layer_b.forward(x.view(), y_and_bias.view().row_block(1, 3)); }, {"Linear::forward: y overlaps bias"});
  unchanged(x, x_before, "x");
  unchanged(W, W_before, "W");

  layer.forward(x.view(), y.view(), Mode::train);
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), x.view()); }, {"Linear::backward: dL_dx overlaps x"});
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), dL_dy.view()); },
               {"Linear::backward: dL_dx overlaps dL_dy", "give dL_dx a buffer of its own"});
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), W.view().row_block(0, 3)); },
               {"Linear::backward: dL_dx overlaps W"});
  expect_error([&] { layer.backward_lora(x.view(), dL_dy.view(), x.view()); },
               {"Linear::backward_lora: dL_dx overlaps x"});
  unchanged(x, x_before, "x");
  unchanged(dL_dy, dL_dy_before, "dL_dy");
  unchanged(W, W_before, "W");
  // The cache survived: the correct call works.
  EXPECT_NO_THROW(layer.backward(x.view(), dL_dy.view(), dL_dx.view()));

  // A bias inside W would change when merge() writes W.
  Matrix<float> W_and_bias(6, 5);
  expect_error([&] { Layer(ctx, W_and_bias.view().row_block(0, 5), W_and_bias.view().row_block(4, 1), config_with_r(2)); },
               {"Linear: W (which merge() writes) overlaps bias"});
  EXPECT_NO_THROW(Layer(ctx, W_and_bias.view().row_block(0, 5), W_and_bias.view().row_block(5, 1), config_with_r(2)));
}

// The overlap test is exact for strided views: blocks of one buffer that
// interleave row by row share no byte.
TEST(Aliasing, OverlapsIsExactForStridedViews) {
  std::vector<float> buf(10 * 12);
  const auto view = [&](std::int64_t row, std::int64_t col, std::int64_t rows, std::int64_t cols, std::int64_t stride) {
    return lora::MatrixView<float>(buf.data() + row * 12 + col, rows, cols, stride);
  };
  // Column blocks [0, 5) and [5, 12) of every row: disjoint, though their address ranges interleave.
  EXPECT_FALSE(lora::overlaps(view(0, 0, 10, 5, 12), view(0, 5, 10, 7, 12)));
  EXPECT_TRUE(lora::overlaps(view(0, 0, 10, 6, 12), view(0, 5, 10, 7, 12)));  // column 5 in both
  // The last element of one view is the first of the other.
  EXPECT_TRUE(lora::overlaps(view(0, 0, 3, 12, 12), view(2, 11, 1, 1, 12)));
  EXPECT_FALSE(lora::overlaps(view(0, 0, 3, 12, 12), view(3, 0, 1, 12, 12)));
  // Different strides: rows 0, 2, 4, ... (stride 24) against rows 1, 3 (stride 24, offset one row).
  EXPECT_FALSE(lora::overlaps(view(0, 0, 5, 12, 24), view(1, 0, 4, 12, 24)));
  // ... and against one row read as a 1 x 12 view at row 4.
  EXPECT_TRUE(lora::overlaps(view(0, 0, 5, 12, 24), view(4, 3, 1, 2, 12)));
  // A tall thin view whose stride jumps over a short wide one.
  EXPECT_FALSE(lora::overlaps(view(0, 0, 10, 1, 12), view(0, 1, 1, 11, 12)));
  EXPECT_TRUE(lora::overlaps(view(0, 0, 10, 1, 12), view(5, 0, 1, 11, 12)));
  // Empty views overlap nothing.
  EXPECT_FALSE(lora::overlaps(view(0, 0, 0, 5, 12), view(0, 0, 10, 12, 12)));
  // Different element types, same bytes: a float view and a byte view of one buffer.
  const lora::MatrixView<const unsigned char> bytes(reinterpret_cast<const unsigned char*>(buf.data()) + 4 * 5, 1, 4);
  EXPECT_TRUE(lora::overlaps(view(0, 5, 1, 1, 12), bytes));
  EXPECT_FALSE(lora::overlaps(view(0, 4, 1, 1, 12), bytes));
}

// ---- call order ----------------------------------------------------------------

TEST_F(ShapeFixture, BackwardNeedsATrainForward) {
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), dL_dx.view()); }, {"backward: no cache"});
  layer.forward(x.view(), y.view(), Mode::eval);
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), dL_dx.view()); }, {"backward: no cache"});
  // An eval forward after a train forward drops the cache as well.
  layer.forward(x.view(), y.view(), Mode::train);
  EXPECT_NO_THROW(layer.backward(x.view(), dL_dy.view(), dL_dx.view()));
  layer.forward(x.view(), y.view(), Mode::eval);
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), dL_dx.view()); }, {"backward: no cache"});
}

TEST_F(ShapeFixture, MergedLayerCannotTrain) {
  layer.forward(x.view(), y.view(), Mode::train);  // a cache exists ...
  layer.merge();                                   // ... and merging invalidates it
  EXPECT_TRUE(layer.merged());
  expect_error([&] { layer.backward(x.view(), dL_dy.view(), dL_dx.view()); }, {"backward: no cache"});
  expect_error([&] { layer.forward(x.view(), y.view(), Mode::train); }, {"merged layer", "unmerge()"});
  EXPECT_NO_THROW(layer.forward(x.view(), y.view(), Mode::eval));
  // The LoRA path alone: W already holds the update, so adding it to a base
  // output would count it twice (it did, in Mode::eval). Refused in both modes.
  for (Mode mode : {Mode::eval, Mode::train}) {
    expect_error([&] { layer.forward_lora(x.view(), y.view(), mode); },
                 {"Linear::forward_lora: the adapter is merged into W", "already includes its update", "unmerge()"});
  }
  expect_error([&] { layer.merge(); }, {"merge: the adapter is already merged"});
  layer.unmerge();
  EXPECT_FALSE(layer.merged());
  EXPECT_NO_THROW(layer.forward(x.view(), y.view(), Mode::train));
}

TEST_F(ShapeFixture, UnmergeWhenNotMergedIsRejected) {
  expect_error([&] { layer.unmerge(); }, {"unmerge: the adapter is not merged"});
  EXPECT_FALSE(layer.merged());
}

}  // namespace

// Every invalid configuration, shape and call order is rejected with a
// lora::Error whose message names the field or tensor, the value or shape
// found and what was expected; and the scale follows from alpha and r.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>

#include "lora/lora.hpp"

namespace {

using lora::Config;
using lora::Mode;
using lora::cpu::Matrix;
using Layer = lora::cpu::Linear<float>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Runs f, expects a lora::Error (any other exception fails the test by
// escaping), and checks that its message contains every one of `parts`.
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
  } catch (const lora::Error& e) {
    const std::string message = e.what();
    for (const char* part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "message \"" << message << "\" lacks \"" << part << "\"";
    return;
  }
  ADD_FAILURE() << "expected a lora::Error mentioning \"" << *parts.begin() << "\"";
}

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

TEST(Config, RankAboveMinOfLayerShapeIsRejectedAtConstruction) {
  lora::cpu::Context ctx;
  Matrix<float> W(6, 4);  // d_out = 6, d_in = 4: r <= 4
  expect_error([&] { Layer(ctx, W.view(), {}, config_with_r(5)); },
               {"Config.r = 5", "[1, 4]", "6 x 4"});
  EXPECT_EQ(Layer(ctx, W.view(), {}, config_with_r(4)).rank(), 4);

  // Transposed base (GPT-2 Conv1D): W is d_in x d_out = 6 x 4, so d_out = 4.
  Config c = config_with_r(5);
  c.fan_in_fan_out = true;
  expect_error([&] { Layer(ctx, W.view(), {}, c); }, {"Config.r = 5", "[1, 4]", "4 x 6"});

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
  expect_error([&] { layer.forward(x_wide.view(), y.view()); }, {": x: expected shape [3, 4], found [3, 5]"});
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
               {": bias: expected shape [1, 6], found [1, 5]"});
  expect_error([&] { Layer(ctx, W.view(), bias_column.view(), config_with_r(2)); },
               {": bias: expected shape [1, 6], found [6, 1]"});
  expect_error([&] { Layer(ctx, empty_rows.view(), {}, config_with_r(2)); }, {": W: expected a non-empty matrix", "[0, 4]"});
  expect_error([&] { Layer(ctx, lora::MatrixView<float>(), {}, config_with_r(2)); },
               {": W: expected a non-empty matrix", "[0, 0]"});
  // With fan_in_fan_out the bias has d_out = W.cols entries.
  Config c = config_with_r(2);
  c.fan_in_fan_out = true;
  expect_error([&] { Layer(ctx, W.view(), bias.view(), c); }, {": bias: expected shape [1, 4], found [1, 6]"});
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

// lora::Model: PEFT's target rules on GPT-2-like and Llama-like module lists
// (the expected sets written out by hand from PEFT's documented rules), and
// the model-level operations: adapters per module, parameters, memory,
// merging, weighted adapters. Mixed-batch training and a tied layer (two
// forwards, then two backwards) are checked against running each part alone.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "io_test_util.hpp"
#include "lora/model.hpp"

namespace {

using io_test::expect_error;
using io_test::fill_random;
using lora::WeightedAdapter;
using lora::io::PeftConfig;
using Backend = lora::cpu::Backend;
template <class T>
using Matrix = lora::cpu::Matrix<T>;
using Names = std::vector<std::string>;

template <class T>
std::vector<T> snapshot(lora::MatrixView<const T> v) {
  std::vector<T> out;
  for (std::int64_t i = 0; i < v.rows; ++i)
    for (std::int64_t j = 0; j < v.cols; ++j) out.push_back(v(i, j));
  return out;
}

// ---- target selection ---------------------------------------------------------------

// A two-block Llama: model.layers.{0,1}.self_attn.{q,k,v,o}_proj, .mlp.{gate,up,down}_proj, lm_head.
Names llama_modules() {
  Names out;
  for (int i = 0; i < 2; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const char* m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                          "mlp.up_proj", "mlp.down_proj"})
      out.push_back(p + m);
  }
  out.push_back("lm_head");
  return out;
}
// A two-block GPT-2: transformer.h.{0,1}.attn.{c_attn,c_proj}, .mlp.{c_fc,c_proj}, lm_head.
Names gpt2_modules() {
  Names out;
  for (int i = 0; i < 2; ++i) {
    const std::string p = "transformer.h." + std::to_string(i) + ".";
    for (const char* m : {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}) out.push_back(p + m);
  }
  out.push_back("lm_head");
  return out;
}

PeftConfig targets_list(Names targets) {
  PeftConfig c;
  c.target_modules = std::move(targets);
  return c;
}
PeftConfig targets_string(std::string s) {
  PeftConfig c;
  c.target_modules_regex = std::move(s);
  return c;
}
Names select(const PeftConfig& c, const Names& modules, const std::string& head = "lm_head") {
  return lora::io::select_target_modules(c, modules, head);
}

TEST(Targets, ListEntriesMatchWholeNamesOrDotSuffixes) {
  // q_proj, v_proj: every name ending in ".q_proj" or ".v_proj".
  EXPECT_EQ(select(targets_list({"q_proj", "v_proj"}), llama_modules()),
            (Names{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                   "model.layers.1.self_attn.v_proj"}));
  // "proj" is no name's last component: a suffix must follow a dot, so nothing matches.
  EXPECT_EQ(select(targets_list({"proj"}), llama_modules()), Names{});
  // A longer suffix: "mlp.c_proj" picks the MLP's c_proj, not attn.c_proj.
  EXPECT_EQ(select(targets_list({"mlp.c_proj"}), gpt2_modules()),
            (Names{"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}));
  // c_proj alone: both (the GPT-2 fixture's target list adapts 36 modules this way).
  EXPECT_EQ(select(targets_list({"c_attn", "c_proj"}), gpt2_modules()),
            (Names{"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                   "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"}));
  // A whole name is an entry too.
  EXPECT_EQ(select(targets_list({"lm_head"}), gpt2_modules()), Names{"lm_head"});
}

TEST(Targets, AStringIsAFullMatchRegex) {
  EXPECT_EQ(select(targets_string(R"(.*\.1\.self_attn\.(q|k)_proj)"), llama_modules()),
            (Names{"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}));
  // Full match: "q_proj" alone matches no whole name (re.fullmatch, not re.search).
  EXPECT_EQ(select(targets_string("q_proj"), llama_modules()), Names{});
  EXPECT_EQ(select(targets_string(".*mlp.*"), gpt2_modules()),
            (Names{"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc",
                   "transformer.h.1.mlp.c_proj"}));
  expect_error([] { select(targets_string("(?=q)q_proj"), llama_modules()); }, {"target_modules", "RE2"});
}

TEST(Targets, AllLinearIsEveryModuleButTheOutputHead) {
  Names llama = llama_modules();
  llama.pop_back();  // everything but lm_head
  EXPECT_EQ(select(targets_string("all-linear"), llama_modules()), llama);
  EXPECT_EQ(select(targets_string("ALL-LINEAR"), llama_modules()), llama);  // PEFT lowercases it
  Names gpt2 = gpt2_modules();
  gpt2.pop_back();
  EXPECT_EQ(select(targets_string("all-linear"), gpt2_modules()), gpt2);
  // Without a head every module is linear and adapted.
  EXPECT_EQ(select(targets_string("all-linear"), gpt2_modules(), ""), gpt2_modules());
  // The head goes by its last component: naming "mlp.c_fc"'s as the head drops
  // every c_fc (PEFT turns all-linear into a list of last components first).
  EXPECT_EQ(select(targets_string("all-linear"), gpt2_modules(), "c_fc"),
            (Names{"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                   "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj",
                   "lm_head"}));
}

TEST(Targets, ExcludeModulesComesFirst) {
  PeftConfig c = targets_list({"q_proj", "v_proj"});
  c.exclude_modules = {"0.self_attn.q_proj"};  // a dot suffix of model.layers.0.self_attn.q_proj only
  EXPECT_EQ(select(c, llama_modules()), (Names{"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                                               "model.layers.1.self_attn.v_proj"}));
  PeftConfig all = targets_string("all-linear");
  all.exclude_modules_regex = R"(.*\.mlp\..*)";
  EXPECT_EQ(select(all, llama_modules()),
            (Names{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                   "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"}));
}

TEST(Targets, LayersToTransformPicksLayerIndices) {
  PeftConfig c = targets_list({"q_proj", "down_proj"});
  c.layers_to_transform = {1};
  c.layers_pattern = {"layers"};
  EXPECT_EQ(select(c, llama_modules()), (Names{"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}));
  // Without a pattern, the index after any "<name>." works: "model.layers.0." -> 0.
  c.layers_pattern.clear();
  c.layers_to_transform = {0};
  EXPECT_EQ(select(c, llama_modules()), (Names{"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}));
  // GPT-2's "h": transformer.h.1.attn.c_attn -> 1.
  PeftConfig g = targets_list({"c_attn"});
  g.layers_to_transform = {1};
  g.layers_pattern = {"h"};
  EXPECT_EQ(select(g, gpt2_modules()), Names{"transformer.h.1.attn.c_attn"});
  // A pattern that is not in the names: no layer index, nothing adapted.
  g.layers_pattern = {"blocks"};
  EXPECT_EQ(select(g, gpt2_modules()), Names{});
  // An entry that is a whole name is adapted whatever its layer (PEFT checks
  // layers_to_transform only for suffix matches).
  PeftConfig whole = targets_list({"model.layers.0.mlp.up_proj", "gate_proj"});
  whole.layers_to_transform = {1};
  EXPECT_EQ(select(whole, llama_modules()), (Names{"model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate_proj"}));
}

// ---- a small model -----------------------------------------------------------------

// A tiny Llama in double: every module of llama_modules() with its own W
// (d_model 6, MLP 10, vocabulary 9), biases on the MLP's up_proj only.
struct TinyLlama {
  static constexpr std::int64_t kModel = 6, kMlp = 10, kVocab = 9;
  lora::cpu::Context ctx;
  std::vector<Matrix<double>> weights;
  Matrix<double> up_bias{1, kMlp};
  lora::Model<double, Backend> model{ctx};

  TinyLlama() {
    weights.reserve(llama_modules().size());
    std::uint64_t seed = 1;
    fill_random(up_bias.view(), 99);
    for (const std::string& name : llama_modules()) {
      const auto [d_out, d_in] = shape_of(name);
      weights.emplace_back(d_out, d_in);
      fill_random(weights.back().view(), seed++);
      const bool up = name.find("up_proj") != std::string::npos;
      model.add_base(name, weights.back().view(), up ? lora::MatrixView<const double>(up_bias.view()) : lora::MatrixView<const double>());
    }
  }
  static std::pair<std::int64_t, std::int64_t> shape_of(const std::string& name) {
    if (name == "lm_head") return {kVocab, kModel};
    if (name.find("gate_proj") != std::string::npos || name.find("up_proj") != std::string::npos) return {kMlp, kModel};
    if (name.find("down_proj") != std::string::npos) return {kModel, kMlp};
    return {kModel, kModel};
  }
};

TEST(Model, AddAdapterAppliesRankAndAlphaPatternsPerModule) {
  TinyLlama t;
  PeftConfig c = targets_list({"q_proj", "v_proj", "down_proj"});
  c.r = 4;
  c.lora_alpha = 8;
  c.rank_pattern = {{"q_proj", 2}, {"layers.1.self_attn.v_proj", 3}};
  c.alpha_pattern = {{"v_proj", 6}};
  const Names adapted = t.model.add_adapter("a", c);
  EXPECT_EQ(adapted, (Names{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                            "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                            "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"}));
  // (r, alpha) by hand: q_proj (2, 8); v_proj (4, 6), but layer 1's v_proj (3, 6); down_proj (4, 8).
  const std::vector<std::pair<int, double>> expected = {{2, 8}, {4, 6}, {4, 8}, {2, 8}, {3, 6}, {4, 8}};
  for (std::size_t k = 0; k < adapted.size(); ++k) {
    const auto& a = t.model.module(adapted[k]).get("a");
    EXPECT_EQ(a.rank(), expected[k].first) << adapted[k];
    EXPECT_DOUBLE_EQ(a.scale(), expected[k].second / expected[k].first) << adapted[k];
  }
  EXPECT_FALSE(t.model.module("model.layers.0.self_attn.k_proj").contains("a"));
  // The first adapter is active; r (d_in + d_out) summed over the modules.
  EXPECT_EQ(t.model.active_adapters().size(), 1u);
  EXPECT_EQ(t.model.trainable_parameters("a"), 2 * 12 + 4 * 12 + 4 * 16 + 2 * 12 + 3 * 12 + 4 * 16);
  // Parameters named as PEFT names them, in module order, A before B.
  const auto params = t.model.parameters();
  ASSERT_EQ(params.size(), 12u);
  EXPECT_EQ(params[0].name, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.a.weight");
  EXPECT_EQ(params[11].name, "base_model.model.model.layers.1.mlp.down_proj.lora_B.a.weight");
}

TEST(Model, RefusesWhatPeftRefusesAndChangesNothing) {
  TinyLlama t;
  expect_error([&] { t.model.add_adapter("a", targets_list({"nothing_here"})); },
               {"add_adapter(\"a\")", "match none of the model's 15 modules"});
  EXPECT_TRUE(t.model.adapters().empty());
  PeftConfig conv = targets_list({"q_proj"});
  conv.fan_in_fan_out = true;  // these W are stored d_out x d_in
  expect_error([&] { t.model.add_adapter("a", conv); }, {"fan_in_fan_out = 1", "d_out x d_in"});
  EXPECT_FALSE(t.model.module("model.layers.0.self_attn.q_proj").contains("a"));
  t.model.add_adapter("a", targets_list({"q_proj"}));
  expect_error([&] { t.model.add_adapter("a", targets_list({"k_proj"})); }, {"already has an adapter \"a\""});
  expect_error([&] { t.model.add_adapter("__base__", targets_list({"k_proj"})); }, {"not a valid adapter name"});
  expect_error([&] { t.model.set_adapter("zz"); }, {"set_adapter: unknown adapter \"zz\"", "\"a\""});
  expect_error([&] { t.model.module("model.layers.9.q"); }, {"unknown module \"model.layers.9.q\""});
  Matrix<double> W(2, 2);
  expect_error([&] { t.model.add_base("extra", W.view()); }, {"add every base before the first adapter"});
}

// Several adapters: set_adapter switches what every module applies; a weighted
// set is the weighted sum; add_weighted_adapter equals it exactly; delete removes.
TEST(Model, SwitchingWeightingCombiningAndDeletingAdapters) {
  TinyLlama t;
  PeftConfig qv = targets_list({"q_proj", "v_proj"});
  PeftConfig qk = targets_list({"q_proj", "k_proj"});
  qk.r = 3;
  t.model.add_adapter("a", qv, 1);
  t.model.add_adapter("b", qk, 2);
  EXPECT_EQ(t.model.adapters(), (Names{"a", "b"}));
  // Give B a value so each adapter changes its modules' outputs.
  for (const char* name : {"a", "b"})
    for (auto p : t.model.parameters(name))
      if (p.name.find("lora_B") != std::string::npos) fill_random(p.value, std::hash<std::string>{}(p.name));

  Matrix<double> x(4, TinyLlama::kModel), y(4, TinyLlama::kModel), ya(4, TinyLlama::kModel), yb(4, TinyLlama::kModel),
      base(4, TinyLlama::kModel);
  fill_random(x.view(), 7);
  const std::string q = "model.layers.0.self_attn.q_proj", v = "model.layers.1.self_attn.v_proj";
  auto& mq = t.model.module(q);
  mq.base_forward(x.view(), base.view());
  t.model.set_adapter("a");
  mq.inference(x.view(), ya.view());
  t.model.set_adapter("b");
  mq.inference(x.view(), yb.view());
  // v_proj holds only a: under "b" it is the base alone.
  Matrix<double> yv(4, TinyLlama::kModel), yv_base(4, TinyLlama::kModel);
  t.model.module(v).inference(x.view(), yv.view());
  t.model.module(v).base_forward(x.view(), yv_base.view());
  EXPECT_EQ(snapshot<double>(yv.view()), snapshot<double>(yv_base.view()));

  // Weighted: y = base + 0.5 (ya - base) - 2 (yb - base).
  t.model.set_adapter({{"a", 0.5}, {"b", -2.0}});
  mq.inference(x.view(), y.view());
  for (std::int64_t i = 0; i < y.size(); ++i) {
    const double expected = base.data()[i] + 0.5 * (ya.data()[i] - base.data()[i]) - 2.0 * (yb.data()[i] - base.data()[i]);
    EXPECT_NEAR(y.data()[i], expected, 1e-12);
  }
  const Names combined = t.model.add_weighted_adapter("ab", {{"a", 0.5}, {"b", -2.0}});
  EXPECT_EQ(combined.size(), 6u);  // q, k, v of both blocks: the union
  EXPECT_EQ(t.model.module(q).get("ab").rank(), 8 + 3);
  Matrix<double> y_ab(4, TinyLlama::kModel);
  t.model.set_adapter("ab");
  mq.inference(x.view(), y_ab.view());
  for (std::int64_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y_ab.data()[i], y.data()[i], 1e-12);

  t.model.delete_adapter("a");
  EXPECT_EQ(t.model.adapters(), (Names{"b", "ab"}));
  EXPECT_FALSE(mq.contains("a"));
  EXPECT_EQ(t.model.active_adapters().size(), 1u);  // "ab" stays active
}

// merge writes every adapted W once; unmerge restores it; merge_and_unload keeps it.
TEST(Model, MergeUnmergeAndMergeAndUnload) {
  TinyLlama t;
  t.model.add_adapter("a", targets_string("all-linear"), 5);
  for (auto p : t.model.parameters("a"))
    if (p.name.find("lora_B") != std::string::npos) fill_random(p.value, 3);
  std::vector<std::vector<double>> before;
  for (const auto& w : t.weights) before.push_back(snapshot<double>(w.view()));
  Matrix<double> x(3, TinyLlama::kModel), y_adapted(3, TinyLlama::kModel), y_merged(3, TinyLlama::kModel);
  fill_random(x.view(), 8);
  const std::string q = "model.layers.1.self_attn.q_proj";
  t.model.module(q).inference(x.view(), y_adapted.view());

  t.model.merge();
  EXPECT_EQ(t.model.merged(), "a");
  t.model.module(q).inference(x.view(), y_merged.view());
  for (std::int64_t i = 0; i < y_merged.size(); ++i) EXPECT_NEAR(y_merged.data()[i], y_adapted.data()[i], 1e-12);
  for (std::size_t k = 0; k + 1 < t.weights.size(); ++k)
    EXPECT_NE(snapshot<double>(t.weights[k].view()), before[k]) << "module " << k << " was not merged";
  EXPECT_EQ(snapshot<double>(t.weights.back().view()), before.back()) << "lm_head is not adapted by all-linear";
  expect_error([&] { t.model.set_adapter(std::vector<WeightedAdapter>{}); }, {"is merged; unmerge() first"});
  Matrix<double> dL_dy(3, TinyLlama::kModel);
  lora::AdapterSet<double, Backend>::ForwardState state;
  expect_error([&] { t.model.module(q).forward(x.view(), y_merged.view(), state); }, {"is merged into W"});

  t.model.unmerge();
  for (std::size_t k = 0; k < t.weights.size(); ++k) {
    const auto now = snapshot<double>(t.weights[k].view());
    for (std::size_t i = 0; i < now.size(); ++i) EXPECT_NEAR(now[i], before[k][i], 1e-14);
  }
  t.model.merge_and_unload();
  EXPECT_TRUE(t.model.adapters().empty());
  Matrix<double> y_unloaded(3, TinyLlama::kModel);
  t.model.module(q).inference(x.view(), y_unloaded.view());  // the bases alone now hold the update
  for (std::int64_t i = 0; i < y_unloaded.size(); ++i) EXPECT_NEAR(y_unloaded.data()[i], y_adapted.data()[i], 1e-12);
}

// A base over a read-only W: everything but merging, which says why.
TEST(Model, AReadOnlyBaseTrainsButRefusesToMerge) {
  lora::cpu::Context ctx;
  Matrix<float> W(5, 4);
  fill_random(W.view(), 1);
  const Matrix<float>& frozen = W;
  lora::Model<float, Backend> model(ctx);
  model.add_base("layer.proj", frozen.view());  // MatrixView<const float>
  model.add_adapter("a", targets_list({"proj"}));
  Matrix<float> x(2, 4), y(2, 5), dL_dy(2, 5), dL_dx(2, 4);
  fill_random(x.view(), 2);
  fill_random(dL_dy.view(), 3);
  auto& m = model.module("layer.proj");
  lora::AdapterSet<float, Backend>::ForwardState state;
  m.forward(x.view(), y.view(), state);
  m.backward(state, x.view(), dL_dy.view(), dL_dx.view());
  expect_error([&] { model.merge(); }, {"merge: module \"layer.proj\" was added over a read-only W"});
  EXPECT_EQ(model.merged(), "");
  lora::Linear<float, Backend> linear(ctx, frozen.view(), {}, lora::Config{});
  expect_error([&] { linear.merge(); }, {"read-only W", "writable view"});
}

TEST(Model, MemoryIsTheSumOfItsModulesPlusTheOptimizer) {
  TinyLlama t;
  PeftConfig c = targets_list({"q_proj", "up_proj"});
  c.r = 2;
  t.model.add_adapter("a", c);
  lora::Adam<double, Backend> adam(t.ctx, lora::AdamOptions{});
  adam.add_group(t.model.parameters(), 1e-3);
  const std::size_t d = sizeof(double);
  // Frozen: 8 of 6x6, 4 of 10x6 (gate, up x2 blocks) + 2 of 6x10 (down) ... written per module:
  // q,k,v,o: 4 x 36; gate, up: 2 x 60 (+ up's bias 10); down: 60; per block 4*36 + 3*60 + 10; lm_head 54.
  const std::size_t frozen = (2 * (4 * 36 + 3 * 60 + 10) + 54) * d;
  // Trainable: q_proj r 2 (6 + 6), up_proj r 2 (6 + 10), two blocks; gradients the same.
  const std::size_t trainable = 2 * (2 * 12 + 2 * 16) * d;
  const lora::MemoryReport m = t.model.memory(adam);
  EXPECT_EQ(m.frozen_bytes, frozen);
  EXPECT_EQ(m.parameter_bytes, trainable);
  EXPECT_EQ(m.gradient_bytes, trainable);
  EXPECT_EQ(m.optimizer_bytes, 2 * trainable);
  EXPECT_EQ(m.activation_bytes, 0u);
  EXPECT_EQ(t.model.memory().optimizer_bytes, 0u);
  EXPECT_EQ(t.model.frozen_parameters() * static_cast<std::int64_t>(d), static_cast<std::int64_t>(frozen));
}

// ---- forward state: mixed batches and tied layers ------------------------------------

// Gradients of a mixed batch (each row names its adapter) equal those of each
// adapter trained on its own rows alone; so do y and dL_dx, row by row.
TEST(ForwardState, MixedBatchTrainingEqualsEachAdapterOnItsOwnRows) {
  lora::cpu::Context ctx;
  const std::int64_t d_in = 7, d_out = 5, n = 7;
  Matrix<double> W(d_out, d_in), bias(1, d_out), x(n, d_in), y(n, d_out), dL_dy(n, d_out), dL_dx(n, d_in);
  fill_random(W.view(), 1);
  fill_random(bias.view(), 2);
  fill_random(x.view(), 3);
  fill_random(dL_dy.view(), 4);
  // Two identical sets: one trains the mixed batch, the other each adapter alone.
  auto make = [&] {
    lora::AdapterSet<double, Backend> set(ctx, W.view(), bias.view());
    for (int k = 0; k < 3; ++k) {
      lora::Config c;
      c.r = 2 + k;
      c.alpha = 3.0;
      c.dropout = 0.25;
      c.seed = 11;
      auto& a = set.add(std::string(1, static_cast<char>('a' + k)), c, static_cast<std::uint32_t>(k));
      fill_random(a.lora_B().value, 20 + static_cast<std::uint64_t>(k));
    }
    return set;
  };
  auto mixed = make(), alone = make();
  // a: rows 0, 3, 5 (gathered); b: rows 1, 2 (one run); c: row 6; row 4: the base.
  const Names rows = {"a", "b", "b", "a", "", "a", "c"};
  lora::AdapterSet<double, Backend>::ForwardState state;
  mixed.forward_mixed(x.view(), rows, y.view(), state);
  mixed.backward(state, x.view(), dL_dy.view(), dL_dx.view());

  for (const std::string name : {"a", "b", "c"}) {
    std::vector<std::int64_t> mine;
    for (std::int64_t i = 0; i < n; ++i)
      if (rows[static_cast<std::size_t>(i)] == name) mine.push_back(i);
    const auto m = static_cast<std::int64_t>(mine.size());
    Matrix<double> xs(m, d_in), ys(m, d_out), dys(m, d_out), dxs(m, d_in);
    for (std::int64_t r = 0; r < m; ++r) {
      for (std::int64_t j = 0; j < d_in; ++j) xs(r, j) = x(mine[r], j);
      for (std::int64_t j = 0; j < d_out; ++j) dys(r, j) = dL_dy(mine[r], j);
    }
    alone.set_active(name);
    lora::AdapterSet<double, Backend>::ForwardState own;
    alone.forward(xs.view(), ys.view(), own);
    alone.backward(own, xs.view(), dys.view(), dxs.view());
    const auto& got = mixed.get(name);
    const auto& want = alone.get(name);
    const auto ga = snapshot<double>(got.dL_dA()), wa = snapshot<double>(want.dL_dA());
    const auto gb = snapshot<double>(got.dL_dB()), wb = snapshot<double>(want.dL_dB());
    for (std::size_t i = 0; i < ga.size(); ++i) EXPECT_NEAR(ga[i], wa[i], 1e-13) << name << " dL_dA[" << i << "]";
    for (std::size_t i = 0; i < gb.size(); ++i) EXPECT_NEAR(gb[i], wb[i], 1e-13) << name << " dL_dB[" << i << "]";
    EXPECT_NE(std::fabs(wa[0]) + std::fabs(wb[0]), 0.0);
    for (std::int64_t r = 0; r < m; ++r) {
      for (std::int64_t j = 0; j < d_out; ++j) EXPECT_NEAR(y(mine[r], j), ys(r, j), 1e-13) << name << " y";
      for (std::int64_t j = 0; j < d_in; ++j) EXPECT_NEAR(dL_dx(mine[r], j), dxs(r, j), 1e-13) << name << " dL_dx";
    }
  }
  // The base row: y = x W^T + bias, dL_dx = dL_dy W.
  for (std::int64_t o = 0; o < d_out; ++o) {
    double want = bias(0, o);
    for (std::int64_t j = 0; j < d_in; ++j) want += x(4, j) * W(o, j);
    EXPECT_NEAR(y(4, o), want, 1e-13);
  }
  for (std::int64_t j = 0; j < d_in; ++j) {
    double want = 0;
    for (std::int64_t o = 0; o < d_out; ++o) want += dL_dy(4, o) * W(o, j);
    EXPECT_NEAR(dL_dx(4, j), want, 1e-13);
  }
}

// Mixed batches of 1, 3 and 17 adapters of different ranks (r = 1 and r = 64
// among them), some with dropout and some without, at odd sizes: one
// adapter's rows a contiguous run, the others' scattered among base rows (so
// gathered). y, dL_dx (with GradMode::accumulate too) and every adapter's
// gradients equal each adapter run alone on its own rows. Adapter 0 has the
// first `run` rows, the others share `3 count + 8 + spread` more.
void expect_mixed_batches_equal_each_adapter_alone(std::int64_t d_in, int run, int spread) {
  lora::cpu::Context ctx;
  const std::int64_t d_out = 29;
  Matrix<double> W(d_out, d_in), bias(1, d_out);
  fill_random(W.view(), 1);
  fill_random(bias.view(), 2);
  for (const int count : {1, 3, 17}) {
    SCOPED_TRACE(::testing::Message() << count << " adapters, d_in " << d_in);
    const auto name = [](int k) { return "adapter" + std::to_string(k); };
    auto make = [&] {
      lora::AdapterSet<double, Backend> set(ctx, W.view(), bias.view());
      for (int k = 0; k < count; ++k) {
        lora::Config c;
        c.r = k == 0 ? 1 : k == 1 ? 64 : 2 + (5 * k) % 11;
        c.alpha = 3.0 + k;
        c.dropout = k % 2 == 0 ? 0.2 : 0.0;
        c.seed = 11;
        auto& a = set.add(name(k), c, static_cast<std::uint32_t>(k));
        fill_random(a.lora_B().value, 20 + static_cast<std::uint64_t>(k));
      }
      return set;
    };
    // Adapter 0's run of rows; then every 7th row the base, the rest spread over adapters 1.. (or the base).
    Names rows;
    for (int i = 0; i < run; ++i) rows.push_back(name(0));
    // j: the adapter rows so far; 7 is prime to 2 and 16
    for (int i = run, j = 0; i < run + 3 * count + 8 + spread; ++i) {
      rows.push_back(i % 7 == 6 || count == 1 ? (i % 2 == 0 ? "" : "__base__") : name(1 + (7 * j++) % (count - 1)));
    }
    const auto n = static_cast<std::int64_t>(rows.size());
    Matrix<double> x(n, d_in), y(n, d_out), dL_dy(n, d_out), dL_dx(n, d_in), dL_dx_twice(n, d_in);
    fill_random(x.view(), 3);
    fill_random(dL_dy.view(), 4);
    auto mixed = make(), alone = make();
    lora::AdapterSet<double, Backend>::ForwardState state;
    Backend::fill(ctx, y.view(), std::numeric_limits<double>::quiet_NaN());
    Backend::fill(ctx, dL_dx.view(), std::numeric_limits<double>::quiet_NaN());
    mixed.forward_mixed(x.view(), rows, y.view(), state);
    mixed.backward(state, x.view(), dL_dy.view(), dL_dx.view());

    for (int k = 0; k < count; ++k) {
      std::vector<std::int64_t> mine;
      for (std::int64_t i = 0; i < n; ++i)
        if (rows[static_cast<std::size_t>(i)] == name(k)) mine.push_back(i);
      const auto m = static_cast<std::int64_t>(mine.size());
      ASSERT_GT(m, 0) << name(k) << " has no rows: the case tests nothing for it";
      Matrix<double> xs(m, d_in), ys(m, d_out), dys(m, d_out), dxs(m, d_in);
      for (std::int64_t r = 0; r < m; ++r) {
        for (std::int64_t j = 0; j < d_in; ++j) xs(r, j) = x(mine[r], j);
        for (std::int64_t j = 0; j < d_out; ++j) dys(r, j) = dL_dy(mine[r], j);
      }
      alone.set_active(name(k));
      lora::AdapterSet<double, Backend>::ForwardState own;
      alone.forward(xs.view(), ys.view(), own);
      alone.backward(own, xs.view(), dys.view(), dxs.view());
      const auto ga = snapshot<double>(mixed.get(name(k)).dL_dA()), wa = snapshot<double>(alone.get(name(k)).dL_dA());
      const auto gb = snapshot<double>(mixed.get(name(k)).dL_dB()), wb = snapshot<double>(alone.get(name(k)).dL_dB());
      for (std::size_t i = 0; i < ga.size(); ++i) ASSERT_NEAR(ga[i], wa[i], 1e-12) << name(k) << " dL_dA[" << i << "]";
      for (std::size_t i = 0; i < gb.size(); ++i) ASSERT_NEAR(gb[i], wb[i], 1e-12) << name(k) << " dL_dB[" << i << "]";
      ASSERT_NE(std::fabs(wa[0]) + std::fabs(wb[0]), 0.0);
      for (std::int64_t r = 0; r < m; ++r) {
        for (std::int64_t j = 0; j < d_out; ++j) ASSERT_NEAR(y(mine[r], j), ys(r, j), 1e-12) << name(k) << " y";
        for (std::int64_t j = 0; j < d_in; ++j) ASSERT_NEAR(dL_dx(mine[r], j), dxs(r, j), 1e-12) << name(k) << " dL_dx";
      }
    }
    // Base rows: y = x W^T + bias, dL_dx = dL_dy W.
    for (std::int64_t i = 0; i < n; ++i) {
      const std::string& r = rows[static_cast<std::size_t>(i)];
      if (!r.empty() && r != "__base__") continue;
      for (std::int64_t o = 0; o < d_out; ++o) {
        double want = bias(0, o);
        for (std::int64_t j = 0; j < d_in; ++j) want += x(i, j) * W(o, j);
        ASSERT_NEAR(y(i, o), want, 1e-12) << "base row " << i;
      }
      for (std::int64_t j = 0; j < d_in; ++j) {
        double want = 0;
        for (std::int64_t o = 0; o < d_out; ++o) want += dL_dy(i, o) * W(o, j);
        ASSERT_NEAR(dL_dx(i, j), want, 1e-12) << "base row " << i;
      }
    }
    // GradMode::accumulate: a second backward on the same state doubles every gradient.
    std::vector<std::vector<double>> once;
    for (int k = 0; k < count; ++k) once.push_back(snapshot<double>(mixed.get(name(k)).dL_dA()));
    mixed.backward(state, x.view(), dL_dy.view(), dL_dx_twice.view(), lora::GradMode::accumulate);
    for (int k = 0; k < count; ++k) {
      const auto twice = snapshot<double>(mixed.get(name(k)).dL_dA());
      for (std::size_t i = 0; i < twice.size(); ++i) ASSERT_NEAR(twice[i], 2 * once[k][i], 1e-12) << name(k);
    }
    EXPECT_EQ(std::memcmp(dL_dx_twice.data(), dL_dx.data(), dL_dx.bytes()), 0) << "dL_dx of the same backward";
  }
}

TEST(ForwardState, MixedBatchesOfOneThreeAndSeventeenAdaptersEqualEachAdapterAlone) {
  expect_mixed_batches_equal_each_adapter_alone(37, 4, 0);
}

// The same at d_in = 3001: the dropout rows of the batch are formed in
// windows of Backend::kRowBlockElements / 3001 = 87 rows, cut inside
// adapters' rows (adapter 0's 100 among them) at other places than alone.
TEST(ForwardState, MixedBatchesWhoseDropoutRowsSpanSeveralWindowsEqualEachAdapterAlone) {
  static_assert(Backend::kRowBlockElements / 3001 < 100, "adapter 0's rows must span two windows");
  expect_mixed_batches_equal_each_adapter_alone(3001, 100, 150);
}

// LoraAdapter::forward_segments and backward_segments refuse, before writing
// anything, one ForwardState in two segments and (when training) one adapter
// in two segments: its g and gradients are one per adapter, and the grouped
// GEMMs' outputs would overlap. An inference may run one adapter on two
// segments, each with its own workspace: y equals one call over all rows.
TEST(ForwardState, SegmentsRefuseASharedStateAndOneAdapterTwiceInTraining) {
  using Adapter = lora::LoraAdapter<double, Backend>;
  lora::cpu::Context ctx;
  lora::Config c;
  c.r = 2;
  c.alpha = 4.0;
  Adapter a(ctx, 5, 3, c), b(ctx, 5, 3, c);
  fill_random(a.lora_B().value, 1);
  fill_random(b.lora_B().value, 2);
  Matrix<double> x(4, 5), y(4, 3), dL_dy(4, 3), dL_dx(4, 5), window;
  fill_random(x.view(), 3);
  fill_random(dL_dy.view(), 4);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Backend::fill(ctx, y.view(), nan);
  Adapter::ForwardState s0, s1;
  const auto rows = [&](Adapter& adapter, Adapter::ForwardState& state, std::int64_t first) {
    return Adapter::Segment{&adapter, &state, x.view().row_block(first, 2), y.view().row_block(first, 2),
                            lora::OutputMode::overwrite};
  };
  expect_error([&] { Adapter::forward_segments({rows(a, s0, 0), rows(a, s1, 2)}, true, window); },
               {"forward_segments", "an adapter in two segments"});
  expect_error([&] { Adapter::forward_segments({rows(a, s0, 0), rows(b, s0, 2)}, true, window); },
               {"forward_segments", "share one ForwardState"});
  expect_error([&] { Adapter::forward_segments({rows(a, s0, 0), rows(b, s0, 2)}, false, window); },
               {"inference_segments", "share one ForwardState"});
  for (std::int64_t i = 0; i < y.size(); ++i) ASSERT_TRUE(std::isnan(y.data()[i])) << "y written before the refusal";
  EXPECT_EQ(a.dropout_calls(), 0u);

  Adapter::forward_segments({rows(a, s0, 0), rows(a, s1, 2)}, false, window);
  Matrix<double> whole(4, 3);
  Backend::fill(ctx, whole.view(), 0.0);
  a.inference(x.view(), whole.view());
  for (std::int64_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y.data()[i], whole.data()[i], 1e-15);

  // backward_segments: a's forward on rows 0-1 and b's on rows 2-3, then a backward naming a twice.
  Adapter::forward_segments({rows(a, s0, 0), rows(b, s1, 2)}, true, window);
  const auto back = [&](Adapter& adapter, const Adapter::ForwardState& state, std::int64_t first) {
    return Adapter::ConstSegment{&adapter, &state, x.view().row_block(first, 2), dL_dx.view().row_block(first, 2),
                                 lora::OutputMode::overwrite, dL_dy.view().row_block(first, 2)};
  };
  expect_error([&] { Adapter::backward_segments({back(a, s0, 0), back(a, s0, 2)}, lora::GradMode::overwrite, window); },
               {"backward_segments", "share one ForwardState"});
  expect_error([&] { Adapter::backward_segments({back(a, s0, 0), back(a, s1, 2)}, lora::GradMode::overwrite, window); },
               {"backward_segments", "an adapter in two segments"});
}

// A tied layer: two forwards, then their backwards in reverse order, the
// second accumulating. The gradients are the sum of each call's alone (with
// dropout: each forward keeps its own mask position in its state).
TEST(ForwardState, TwoForwardsThenTwoBackwardsSumTheGradients) {
  lora::cpu::Context ctx;
  const std::int64_t d_in = 6, d_out = 4;
  Matrix<double> W(d_out, d_in), x1(3, d_in), x2(5, d_in), y1(3, d_out), y2(5, d_out), dy1(3, d_out), dy2(5, d_out),
      dx1(3, d_in), dx2(5, d_in);
  for (auto [m, s] : {std::pair{&W, 1}, {&x1, 2}, {&x2, 3}, {&dy1, 4}, {&dy2, 5}}) fill_random(m->view(), s);
  lora::Config c;
  c.r = 3;
  c.dropout = 0.3;
  c.seed = 5;
  lora::DenseBase<double, Backend> base(ctx, W.view());
  lora::LoraAdapter<double, Backend> tied(base, c), twin(base, c);
  for (auto* a : {&tied, &twin}) fill_random(a->lora_B().value, 9);

  auto s1 = tied.forward(x1.view(), y1.view());
  auto s2 = tied.forward(x2.view(), y2.view());
  tied.backward(s2, x2.view(), dy2.view(), dx2.view());
  tied.backward(s1, x1.view(), dy1.view(), dx1.view(), lora::GradMode::accumulate);

  // The twin runs each call alone, in the same order (so the same dropout positions).
  Matrix<double> y(5, d_out), dx(5, d_in);
  const auto t1 = twin.forward(x1.view(), y.view().row_block(0, 3));
  twin.backward(t1, x1.view(), dy1.view(), dx.view().row_block(0, 3));
  const auto gA1 = snapshot<double>(twin.dL_dA()), gB1 = snapshot<double>(twin.dL_dB());
  const auto t2 = twin.forward(x2.view(), y.view());
  twin.backward(t2, x2.view(), dy2.view(), dx.view());
  const auto gA2 = snapshot<double>(twin.dL_dA()), gB2 = snapshot<double>(twin.dL_dB());
  const auto gA = snapshot<double>(tied.dL_dA()), gB = snapshot<double>(tied.dL_dB());
  for (std::size_t i = 0; i < gA.size(); ++i) EXPECT_NEAR(gA[i], gA1[i] + gA2[i], 1e-13);
  for (std::size_t i = 0; i < gB.size(); ++i) EXPECT_NEAR(gB[i], gB1[i] + gB2[i], 1e-13);

  // A state belongs to its adapter and to a training forward.
  expect_error([&] { twin.backward(s1, x1.view(), dy1.view(), dx1.view()); }, {"filled by another adapter"});
  lora::LoraAdapter<double, Backend>::ForwardState empty;
  expect_error([&] { tied.backward(empty, x1.view(), dy1.view(), dx1.view()); }, {"holds no training forward"});
  expect_error([&] { tied.backward(s1, x2.view(), dy2.view(), dx2.view()); }, {"expected 3 rows (as in forward)"});
}

}  // namespace

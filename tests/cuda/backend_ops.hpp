// Every operation below the model (a dense base, one adapter, a set of
// adapters), written once against the Backend interface, as ggml's
// test-backend-ops runs each op on every backend: run_*<T, Backend>(ctx, in)
// performs one operation on one backend and returns its outputs by name, as
// floats on the host. A test runs it on the CPU (fp32) and on another backend
// (T: fp32, bf16, fp16) with the same inputs and compares output by output.
// Host code only: no CUDA, no files (the model's own operations need
// <lora/model.hpp>, which a .cu file cannot include: see test_cuda_model_host.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "lora/lora.hpp"

namespace lora::backend_ops {

// Named outputs of one operation on one backend, in the order produced.
using Outputs = std::vector<std::pair<std::string, std::vector<float>>>;

inline const std::vector<float>* find_output(const Outputs& outputs, const std::string& name) {
  for (const auto& [key, value] : outputs)
    if (key == name) return &value;
  return nullptr;
}

// The shapes every operation uses: not multiples of 8 or 16.
constexpr std::int64_t kRows = 37, kIn = 53, kOut = 45;

// The host inputs, already rounded to the narrowest T under test (so every
// backend starts from identical numbers). B values are fp32 masters.
struct OpInputs {
  std::vector<float> W;             // kOut x kIn (read as kIn x kOut with fan_in_fan_out)
  std::vector<float> bias;          // 1 x kOut
  std::vector<float> x, x2;         // kRows x kIn
  std::vector<float> dL_dy, dL_dy2; // kRows x kOut
  std::vector<std::vector<float>> B;  // B of adapter k: kOut x rank(k) (set_configs()[k].r)
};

// The adapters of a set: ranks, alphas (rsLoRA on one), dropout from the caller.
inline std::vector<Config> set_configs(double dropout) {
  std::vector<Config> out;
  const int ranks[] = {3, 5, 2};
  const double alphas[] = {6.0, 5.0, 8.0};
  for (int k = 0; k < 3; ++k) {
    Config c;
    c.r = ranks[k];
    c.alpha = alphas[k];
    c.use_rslora = k == 2;
    c.dropout = dropout;
    c.seed = 1234 + static_cast<std::uint64_t>(k);
    out.push_back(c);
  }
  return out;
}
inline const char* set_name(std::size_t k) {
  static const char* const names[] = {"a", "b", "c"};
  return names[k];
}

// A mixed batch: "a" on rows 0..9 (one contiguous run: row blocks), "b" on
// every third row after that and "c" on the rows between (gathered), the
// rest (every third, and the last row) on the frozen layer alone.
inline std::vector<std::string> mixed_rows() {
  std::vector<std::string> rows(static_cast<std::size_t>(kRows));
  for (std::int64_t i = 0; i < kRows; ++i) {
    const auto at = static_cast<std::size_t>(i);
    if (i < 10) {
      rows[at] = "a";
    } else if (i == kRows - 1) {
      rows[at] = "";
    } else {
      const char* cycle[] = {"b", "c", "__base__"};
      rows[at] = cycle[i % 3];
    }
  }
  return rows;
}

// Host <-> backend for any element type, through fp32 on the backend (the
// backend's own rounding: round to nearest even).
template <class T, class Backend>
struct Side {
  using Context = typename Backend::Context;
  using Space = typename Backend::Space;
  template <class U>
  using Matrix = typename Backend::template Matrix<U>;

  Context& ctx;

  Matrix<T> make(const std::vector<float>& host, std::int64_t rows, std::int64_t cols) const {
    Matrix<T> out(rows, cols);
    put(host, out.view());
    return out;
  }
  // dst = the host values (dst.rows x dst.cols, row-major), converted to U.
  template <class U>
  void put(const std::vector<float>& host, MatrixView<U, Space> dst) const {
    LORA_CHECK(host.size() == static_cast<std::size_t>(dst.rows * dst.cols), "put: size mismatch");
    Matrix<float> f(dst.rows, dst.cols);
    Backend::copy_from_host(ctx, MatrixView<const float, HostSpace>(host.data(), dst.rows, dst.cols), f.view());
    Backend::convert(ctx, MatrixView<const float, Space>(f.view()), dst);
  }
  template <class U>
  std::vector<float> get(MatrixView<const U, Space> v) const {
    Matrix<float> f(v.rows, v.cols);
    Backend::convert(ctx, v, f.view());
    std::vector<float> out(static_cast<std::size_t>(v.rows * v.cols));
    Backend::copy_to_host(ctx, MatrixView<const float, Space>(f.view()),
                          MatrixView<float, HostSpace>(out.data(), v.rows, v.cols));
    return out;
  }
  template <class U>
  std::vector<float> get(const Matrix<U>& m) const {
    return get(m.view());
  }
  template <class U>
  std::vector<float> get(MatrixView<U, Space> v) const {
    return get(MatrixView<const U, Space>(v));
  }
  // NaN in every element, so an element an operation fails to write fails the comparison.
  template <class U>
  void poison(MatrixView<U, Space> v) const {
    Matrix<float> f(v.rows, v.cols);
    Backend::fill(ctx, f.view(), std::numeric_limits<float>::quiet_NaN());
    Backend::convert(ctx, MatrixView<const float, Space>(f.view()), v);
  }
  // B of an adapter from host values.
  template <class Adapter>
  void set_B(Adapter& adapter, const std::vector<float>& B) const {
    put(B, adapter.lora_B().value);
  }
  // NaN in an adapter's gradients, before a backward that overwrites them.
  template <class Adapter>
  void poison_grads(Adapter& adapter) const {
    poison(adapter.lora_A().grad);
    poison(adapter.lora_B().grad);
  }
};

// DenseBase over a read-only W: forward, backward_input, row norms, and a
// refused add_delta ("add_delta refused" = {1}).
template <class T, class Backend>
Outputs run_dense_base(typename Backend::Context& ctx, const OpInputs& in, bool fan_in_fan_out) {
  const Side<T, Backend> side{ctx};
  using ConstView = MatrixView<const T, typename Backend::Space>;
  const auto W = side.make(in.W, fan_in_fan_out ? kIn : kOut, fan_in_fan_out ? kOut : kIn);
  const auto bias = side.make(in.bias, 1, kOut);
  const auto x = side.make(in.x, kRows, kIn);
  const auto dL_dy = side.make(in.dL_dy, kRows, kOut);
  DenseBase<T, Backend> base(ctx, ConstView(W.view()), bias.view(), fan_in_fan_out);
  typename Side<T, Backend>::template Matrix<T> y(kRows, kOut), dL_dx(kRows, kIn);
  side.poison(y.view());
  side.poison(dL_dx.view());
  base.forward(x.view(), y.view());
  base.backward_input(dL_dy.view(), dL_dx.view());
  std::vector<float> norms;
  for (double n : base.row_norms()) norms.push_back(static_cast<float>(n));
  float refused = 0.0f;
  try {
    typename Side<T, Backend>::template Matrix<float> A(2, kIn), B(kOut, 2);
    base.add_delta(1.0, MatrixView<const float, typename Backend::Space>(B.view()),
                   MatrixView<const float, typename Backend::Space>(A.view()));
  } catch (const Error&) {
    refused = 1.0f;
  }
  return {{"y", side.get(y)}, {"dL_dx", side.get(dL_dx)}, {"row_norms", norms}, {"add_delta refused", {refused}}};
}

// One LoraAdapter over a dense base, with an explicit state:
//   training forward + backward (dropout p), inference after it; then a tied
//   layer: two forwards (x, x2) before two backwards (the second accumulating),
//   and the same two steps on a twin adapter (same seed: same A, same masks),
//   one forward/backward at a time, whose gradients the tied ones must sum to.
template <class T, class Backend>
Outputs run_adapter(typename Backend::Context& ctx, const OpInputs& in, double dropout) {
  const Side<T, Backend> side{ctx};
  using Space = typename Backend::Space;
  using View = MatrixView<T, Space>;
  using MatT = typename Side<T, Backend>::template Matrix<T>;
  const MatT W = side.make(in.W, kOut, kIn), bias = side.make(in.bias, 1, kOut);
  const MatT x = side.make(in.x, kRows, kIn), x2 = side.make(in.x2, kRows, kIn);
  const MatT dL_dy = side.make(in.dL_dy, kRows, kOut), dL_dy2 = side.make(in.dL_dy2, kRows, kOut);
  const DenseBase<T, Backend> base(ctx, MatrixView<const T, Space>(W.view()), bias.view());
  Config config = set_configs(dropout)[1];
  LoraAdapter<T, Backend> adapter(base, config, 7), twin(base, config, 7);
  side.set_B(adapter, in.B[1]);
  side.set_B(twin, in.B[1]);

  Outputs out;
  MatT y(kRows, kOut), y2(kRows, kOut), dL_dx(kRows, kIn), dL_dx2(kRows, kIn);
  auto forward = [&](LoraAdapter<T, Backend>& a, const MatT& xin, MatT& yout,
                     typename LoraAdapter<T, Backend>::ForwardState& state) {
    side.poison(yout.view());
    base.forward(xin.view(), yout.view());
    a.forward(xin.view(), yout.view(), state);
  };
  auto backward = [&](LoraAdapter<T, Backend>& a, const typename LoraAdapter<T, Backend>::ForwardState& state,
                      const MatT& xin, const MatT& dy, MatT& dx, GradMode mode) {
    side.poison(dx.view());
    if (mode == GradMode::overwrite) side.poison_grads(a);
    base.backward_input(dy.view(), dx.view());
    a.backward(state, xin.view(), dy.view(), View(dx.view()), mode);
  };

  typename LoraAdapter<T, Backend>::ForwardState s1, s2;
  forward(adapter, x, y, s1);
  backward(adapter, s1, x, dL_dy, dL_dx, GradMode::overwrite);
  out.push_back({"y", side.get(y)});
  out.push_back({"dL_dx", side.get(dL_dx)});
  out.push_back({"dL_dA", side.get(adapter.dL_dA())});
  out.push_back({"dL_dB", side.get(adapter.dL_dB())});
  side.poison(y.view());
  base.forward(x.view(), y.view());
  adapter.inference(x.view(), y.view());
  out.push_back({"y (inference)", side.get(y)});

  // The tied layer: forward x, forward x2, backward x2, backward x (accumulating).
  forward(adapter, x, y, s1);
  forward(adapter, x2, y2, s2);
  backward(adapter, s2, x2, dL_dy2, dL_dx2, GradMode::overwrite);
  backward(adapter, s1, x, dL_dy, dL_dx, GradMode::accumulate);
  out.push_back({"tied y", side.get(y)});
  out.push_back({"tied y2", side.get(y2)});
  out.push_back({"tied dL_dx", side.get(dL_dx)});
  out.push_back({"tied dL_dx2", side.get(dL_dx2)});
  out.push_back({"tied dL_dA", side.get(adapter.dL_dA())});
  out.push_back({"tied dL_dB", side.get(adapter.dL_dB())});

  // The twin draws the same dropout positions: its first training forward is
  // at position 0 as the adapter's was, so run it once to reach position 1,
  // then x (position 1) and x2 (position 2) one step at a time.
  typename LoraAdapter<T, Backend>::ForwardState t;
  forward(twin, x, y, t);
  forward(twin, x, y, t);
  backward(twin, t, x, dL_dy, dL_dx, GradMode::overwrite);
  std::vector<float> dA = side.get(twin.dL_dA()), dB = side.get(twin.dL_dB());
  forward(twin, x2, y2, t);
  backward(twin, t, x2, dL_dy2, dL_dx2, GradMode::overwrite);
  const std::vector<float> dA2 = side.get(twin.dL_dA()), dB2 = side.get(twin.dL_dB());
  for (std::size_t i = 0; i < dA.size(); ++i) dA[i] += dA2[i];
  for (std::size_t i = 0; i < dB.size(); ++i) dB[i] += dB2[i];
  out.push_back({"separate dL_dA sum", dA});
  out.push_back({"separate dL_dB sum", dB});
  out.push_back({"dropout calls", {static_cast<float>(adapter.dropout_calls())}});
  return out;
}

// The three adapters of set_configs() on a writable W (with a bias), their B
// from the inputs (a fresh B = 0 would hide dL/dA and the adapters' dL/dx).
template <class T, class Backend>
struct SetProblem {
  using Space = typename Backend::Space;
  using MatT = typename Side<T, Backend>::template Matrix<T>;
  Side<T, Backend> side;
  MatT W, bias, x, dL_dy, y, dL_dx;
  AdapterSet<T, Backend> set;

  SetProblem(typename Backend::Context& ctx, const OpInputs& in, double dropout)
      : side{ctx},
        W(side.make(in.W, kOut, kIn)),
        bias(side.make(in.bias, 1, kOut)),
        x(side.make(in.x, kRows, kIn)),
        dL_dy(side.make(in.dL_dy, kRows, kOut)),
        y(kRows, kOut),
        dL_dx(kRows, kIn),
        set(ctx, W.view(), bias.view()) {
    const std::vector<Config> configs = set_configs(dropout);
    for (std::size_t k = 0; k < configs.size(); ++k) {
      side.set_B(set.add(set_name(k), configs[k], static_cast<std::uint32_t>(k)), in.B[k]);
    }
  }
  // NaN in dL_dx and every adapter's gradients, before a backward.
  void poison_outputs() {
    side.poison(dL_dx.view());
    for (std::size_t k = 0; k < 3; ++k) side.poison_grads(set.get(set_name(k)));
  }
  void grads(Outputs& out) const {
    for (std::size_t k = 0; k < 3; ++k) {
      out.push_back({std::string(set_name(k)) + " dL_dA", side.get(set.get(set_name(k)).dL_dA())});
      out.push_back({std::string(set_name(k)) + " dL_dB", side.get(set.get(set_name(k)).dL_dB())});
    }
  }
};

// A weighted active set {a: 0.5, b: -1.25, c: 2}: training forward and
// backward with an explicit state (dropout p), then inference.
template <class T, class Backend>
Outputs run_set_weighted(typename Backend::Context& ctx, const OpInputs& in, double dropout) {
  SetProblem<T, Backend> p(ctx, in, dropout);
  p.set.set_active({{"a", 0.5}, {"b", -1.25}, {"c", 2.0}});
  typename AdapterSet<T, Backend>::ForwardState state;
  p.side.poison(p.y.view());
  p.set.forward(p.x.view(), p.y.view(), state);
  p.poison_outputs();
  p.set.backward(state, p.x.view(), p.dL_dy.view(), p.dL_dx.view());
  Outputs out{{"y", p.side.get(p.y)}, {"dL_dx", p.side.get(p.dL_dx)}};
  p.grads(out);
  p.side.poison(p.y.view());
  p.set.inference(p.x.view(), p.y.view());
  out.push_back({"y (inference)", p.side.get(p.y)});
  return out;
}

// A mixed batch (mixed_rows(): one contiguous group, two gathered, base-only
// rows), in training (dropout p) and backward, then inference_mixed.
template <class T, class Backend>
Outputs run_set_mixed(typename Backend::Context& ctx, const OpInputs& in, double dropout) {
  SetProblem<T, Backend> p(ctx, in, dropout);
  const std::vector<std::string> rows = mixed_rows();
  typename AdapterSet<T, Backend>::ForwardState state;
  p.side.poison(p.y.view());
  p.set.forward_mixed(p.x.view(), rows, p.y.view(), state);
  p.poison_outputs();
  p.set.backward(state, p.x.view(), p.dL_dy.view(), p.dL_dx.view());
  Outputs out{{"y", p.side.get(p.y)}, {"dL_dx", p.side.get(p.dL_dx)}};
  p.grads(out);
  p.side.poison(p.y.view());
  p.set.inference_mixed(p.x.view(), rows, p.y.view());
  out.push_back({"y (inference)", p.side.get(p.y)});
  return out;
}

// A mixed batch over `count` adapters of ranks 1, 64 and 2..12 (the GPU's
// grouped GEMMs: one group per adapter, r = 1 and r = 64 among them): row i
// uses adapter (3 i + i / 5) % (count + 1), the last index meaning the frozen
// layer alone. Training forward (dropout p), backward, every adapter's
// gradients, then inference_mixed. B of adapter k: 0.05 sin(0.37 j + k), j
// its element index (any fixed values, the same on both backends).
template <class T, class Backend>
Outputs run_set_mixed_many(typename Backend::Context& ctx, const OpInputs& in, int count, double dropout) {
  const Side<T, Backend> side{ctx};
  using MatT = typename Side<T, Backend>::template Matrix<T>;
  const MatT W = side.make(in.W, kOut, kIn), bias = side.make(in.bias, 1, kOut);
  const MatT x = side.make(in.x, kRows, kIn), dL_dy = side.make(in.dL_dy, kRows, kOut);
  MatT y(kRows, kOut), dL_dx(kRows, kIn);
  AdapterSet<T, Backend> set(ctx, W.view(), bias.view());
  auto name = [](int k) { return "adapter " + std::to_string(k); };
  for (int k = 0; k < count; ++k) {
    Config c;
    c.r = k == 0 ? 1 : k == 1 ? 64 : 2 + (5 * k) % 11;
    c.alpha = 2.0 + k;
    c.dropout = dropout;
    c.seed = 500 + static_cast<std::uint64_t>(k);
    std::vector<float> B(static_cast<std::size_t>(kOut * c.r));
    for (std::size_t j = 0; j < B.size(); ++j) B[j] = 0.05f * std::sin(0.37f * static_cast<float>(j) + k);
    side.set_B(set.add(name(k), c, static_cast<std::uint32_t>(k)), B);
  }
  std::vector<std::string> rows(static_cast<std::size_t>(kRows));
  for (std::int64_t i = 0; i < kRows; ++i) {
    const int k = static_cast<int>((3 * i + i / 5) % (count + 1));
    rows[static_cast<std::size_t>(i)] = k == count ? AdapterSet<T, Backend>::kBase : name(k);
  }
  typename AdapterSet<T, Backend>::ForwardState state;
  side.poison(y.view());
  set.forward_mixed(x.view(), rows, y.view(), state);
  side.poison(dL_dx.view());
  for (int k = 0; k < count; ++k) side.poison_grads(set.get(name(k)));
  set.backward(state, x.view(), dL_dy.view(), dL_dx.view());
  Outputs out{{"y", side.get(y)}, {"dL_dx", side.get(dL_dx)}};
  for (int k = 0; k < count; ++k) {
    out.push_back({name(k) + " dL_dA", side.get(set.get(name(k)).dL_dA())});
    out.push_back({name(k) + " dL_dB", side.get(set.get(name(k)).dL_dB())});
  }
  side.poison(y.view());
  set.inference_mixed(x.view(), rows, y.view());
  out.push_back({"y (inference)", side.get(y)});
  return out;
}

// combine("ab", {a: 0.7, b: -0.4}) (its A and B, and its output beside the
// weighted activation of the same terms), then merge("ab") and unmerge()
// on the writable W: W after each, the merged output.
template <class T, class Backend>
Outputs run_set_combine_merge(typename Backend::Context& ctx, const OpInputs& in) {
  SetProblem<T, Backend> p(ctx, in, 0.0);
  Outputs out;
  const auto& combined = p.set.combine("ab", {{"a", 0.7}, {"b", -0.4}});
  out.push_back({"combined A", p.side.get(combined.A())});
  out.push_back({"combined B", p.side.get(combined.B())});
  p.set.set_active({{"a", 0.7}, {"b", -0.4}});
  p.side.poison(p.y.view());
  p.set.inference(p.x.view(), p.y.view());
  out.push_back({"y (weighted a, b)", p.side.get(p.y)});
  p.set.set_active("ab");
  p.side.poison(p.y.view());
  p.set.inference(p.x.view(), p.y.view());
  out.push_back({"y (combined)", p.side.get(p.y)});
  p.set.merge("ab");
  out.push_back({"W merged", p.side.get(p.W)});
  p.side.poison(p.y.view());
  p.set.inference(p.x.view(), p.y.view());
  out.push_back({"y (merged)", p.side.get(p.y)});
  p.set.unmerge();
  out.push_back({"W unmerged", p.side.get(p.W)});
  return out;
}

}  // namespace lora::backend_ops

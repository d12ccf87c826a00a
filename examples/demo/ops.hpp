// The pieces of a small Llama that are not linear layers: the token
// embedding, RMSNorm, rotary position embeddings (RoPE), causal grouped-query
// self-attention, the SwiGLU gate and softmax cross-entropy, each with its
// backward. Rows are tokens: a batch of B sequences of t tokens is a (B t) x d
// matrix, sequence b in rows [b t, b t + t), position = row mod t. Matrix
// products go through lora::cpu::Backend::gemm, like the library's own.
// The formulas are Hugging Face's modeling_llama.py (rotate-half RoPE).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <lora/lora.hpp>
#include <vector>

namespace demo {

using lora::cpu::Backend;
template <class T>
using View = lora::MatrixView<T>;
template <class T>
using ConstView = lora::MatrixView<const T>;
template <class T>
using Matrix = lora::cpu::Matrix<T>;

// x[r, :] = tok_emb[tokens[r], :]       x: N x d
template <class T>
void embedding_forward(ConstView<T> tok_emb, const int* tokens, View<T> x) {
  for (std::int64_t row = 0; row < x.rows; ++row) {
    const int token = tokens[row];
    LORA_CHECK(token >= 0 && token < tok_emb.rows,
               "embedding: token " << token << " outside [0, " << tok_emb.rows << ")");
    for (std::int64_t j = 0; j < x.cols; ++j) x(row, j) = tok_emb(token, j);
  }
}

// dtok_emb[tokens[r], :] += dx[r, :]
template <class T>
void embedding_backward(ConstView<T> dx, const int* tokens, View<T> dtok_emb) {
  for (std::int64_t row = 0; row < dx.rows; ++row)
    for (std::int64_t j = 0; j < dx.cols; ++j) dtok_emb(tokens[row], j) += dx(row, j);
}

// Per row: rstd = 1 / sqrt(mean_j x^2 + eps),  y = x rstd o gain.
// x, y: N x d; gain: 1 x d; rstd: N x 1 (kept for backward, with x).
template <class T>
void rms_norm_forward(ConstView<T> x, ConstView<T> gain, double eps, View<T> y, View<T> rstd) {
  const std::int64_t d = x.cols;
  for (std::int64_t i = 0; i < x.rows; ++i) {
    double sum = 0.0;
    for (std::int64_t j = 0; j < d; ++j) sum += static_cast<double>(x(i, j)) * x(i, j);
    const T r = static_cast<T>(1.0 / std::sqrt(sum / static_cast<double>(d) + eps));
    rstd(i, 0) = r;
    for (std::int64_t j = 0; j < d; ++j) y(i, j) = x(i, j) * r * gain(0, j);
  }
}

// Given dy (N x d), with xhat = x rstd and g = dy o gain:
//   dx    += rstd (g - xhat mean_j(g o xhat))     (added: x is the residual stream)
//   dgain += sum_i dy o xhat                     (skipped when dgain is empty)
template <class T>
void rms_norm_backward(ConstView<T> dy, ConstView<T> x, ConstView<T> rstd, ConstView<T> gain, View<T> dx,
                       View<T> dgain) {
  const std::int64_t d = dy.cols;
  for (std::int64_t i = 0; i < dy.rows; ++i) {
    const double r = rstd(i, 0);
    double mean_gx = 0.0;
    for (std::int64_t j = 0; j < d; ++j) mean_gx += static_cast<double>(dy(i, j)) * gain(0, j) * x(i, j) * r;
    mean_gx /= static_cast<double>(d);
    for (std::int64_t j = 0; j < d; ++j) {
      const double xhat = x(i, j) * r;
      dx(i, j) += static_cast<T>(r * (static_cast<double>(dy(i, j)) * gain(0, j) - xhat * mean_gx));
      if (!dgain.empty()) dgain(0, j) += static_cast<T>(dy(i, j) * xhat);
    }
  }
}

// Rotary position embeddings, Hugging Face's rotate-half layout: within each
// head of hd columns, column i < hd/2 pairs with column i + hd/2 and the pair
// turns by the angle pos theta^(-2i / hd):
//   (a, b) -> (a cos - b sin, b cos + a sin)
// The tables hold cos and sin for positions 0 .. t - 1 (t x hd/2 each).
template <class T>
struct RopeTables {
  Matrix<T> cos, sin;
  double theta = 0.0;
  int head_dim = 0;

  void ensure(int t, int hd, double base) {
    if (cos.rows() >= t && head_dim == hd && theta == base) return;
    theta = base;
    head_dim = hd;
    const int half = hd / 2;
    cos = Matrix<T>(t, half);
    sin = Matrix<T>(t, half);
    for (int pos = 0; pos < t; ++pos)
      for (int i = 0; i < half; ++i) {
        const double angle = pos * std::pow(base, -2.0 * i / hd);
        cos(pos, i) = static_cast<T>(std::cos(angle));
        sin(pos, i) = static_cast<T>(std::sin(angle));
      }
  }
};

// x ((B t) x (heads hd)) turned in place; `inverse` turns back (the
// transpose of the rotation: what backward applies to dL/dx).
template <class T>
void rope_apply(View<T> x, int t, int hd, const RopeTables<T>& tables, bool inverse) {
  const std::int64_t half = hd / 2, heads = x.cols / hd;
  const T sign = inverse ? T(-1) : T(1);
  for (std::int64_t row = 0; row < x.rows; ++row) {
    const std::int64_t pos = row % t;
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < half; ++i) {
        T& a = x(row, h * hd + i);
        T& b = x(row, h * hd + half + i);
        const T c = tables.cos(pos, i), s = sign * tables.sin(pos, i);
        const T a0 = a;
        a = a0 * c - b * s;
        b = b * c + a0 * s;
      }
  }
}

// Causal grouped-query self-attention: query head h (of H) reads key/value
// head h / (H / Hkv). For each sequence b and head h (hd columns each):
//   S = Q K^T / sqrt(hd)       (t x t), S[i, j] = -inf for j > i
//   P = softmax of each row of S,   O = P V      (t x hd)
// q, out: (B t) x (H hd); k, v: (B t) x (Hkv hd); probs: (B H t) x t, block
// (b H + h) holds P (kept for backward).
template <class T>
void attention_forward(lora::cpu::Context& ctx, ConstView<T> q, ConstView<T> k, ConstView<T> v, int t, int heads,
                       int kv_heads, View<T> probs, View<T> out) {
  const std::int64_t hd = q.cols / heads, batch = q.rows / t, group = heads / kv_heads;
  LORA_CHECK(q.cols == heads * hd && k.cols == kv_heads * hd && heads % kv_heads == 0 && q.rows % t == 0,
             "attention: " << heads << " heads, " << kv_heads << " key/value heads, q cols " << q.cols << ", k cols "
                           << k.cols);
  lora::check_shape(probs, batch * heads * t, t, "attention probs");
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t g = h / group;
      const ConstView<T> qh = q.row_block(b * t, t).col_block(h * hd, hd),
                         kh = k.row_block(b * t, t).col_block(g * hd, hd),
                         vh = v.row_block(b * t, t).col_block(g * hd, hd);
      const View<T> p = probs.row_block((b * heads + h) * t, t);
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::T, scale, qh, kh, 0.0, p);
      for (std::int64_t i = 0; i < t; ++i) {
        T max = p(i, 0);
        for (std::int64_t j = 1; j <= i; ++j) max = std::max(max, p(i, j));
        double sum = 0.0;
        for (std::int64_t j = 0; j <= i; ++j) {
          p(i, j) = std::exp(p(i, j) - max);
          sum += p(i, j);
        }
        const T inv = static_cast<T>(1.0 / sum);
        for (std::int64_t j = 0; j <= i; ++j) p(i, j) *= inv;
        for (std::int64_t j = i + 1; j < t; ++j) p(i, j) = T(0);
      }
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::N, 1.0, ConstView<T>(p), vh, 0.0,
                          out.row_block(b * t, t).col_block(h * hd, hd));
    }
}

// Given dO ((B t) x (H hd)), for each sequence and head:
//   dV += P^T dO,  dP = dO V^T,  dS = P o (dP - rowsum(dP o P)),
//   dQ = dS K / sqrt(hd),  dK += dS^T Q / sqrt(hd)
// (a key/value head sums over the query heads that read it); dp: a t x t workspace.
template <class T>
void attention_backward(lora::cpu::Context& ctx, ConstView<T> q, ConstView<T> k, ConstView<T> v, ConstView<T> probs,
                        ConstView<T> dout, int t, int heads, int kv_heads, View<T> dq, View<T> dk, View<T> dv,
                        View<T> dp) {
  const std::int64_t hd = q.cols / heads, batch = q.rows / t, group = heads / kv_heads;
  lora::check_shape(dp, t, t, "attention dP workspace");
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  Backend::fill(ctx, dk, T(0));
  Backend::fill(ctx, dv, T(0));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t g = h / group;
      const ConstView<T> qh = q.row_block(b * t, t).col_block(h * hd, hd),
                         kh = k.row_block(b * t, t).col_block(g * hd, hd),
                         vh = v.row_block(b * t, t).col_block(g * hd, hd),
                         dO = dout.row_block(b * t, t).col_block(h * hd, hd);
      const ConstView<T> p = probs.row_block((b * heads + h) * t, t);
      Backend::gemm<T, T>(ctx, lora::Op::T, lora::Op::N, 1.0, p, dO, 1.0, dv.row_block(b * t, t).col_block(g * hd, hd));
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::T, 1.0, dO, vh, 0.0, dp);
      for (std::int64_t i = 0; i < t; ++i) {
        double dot = 0.0;
        for (std::int64_t j = 0; j <= i; ++j) dot += static_cast<double>(dp(i, j)) * p(i, j);
        for (std::int64_t j = 0; j < t; ++j) dp(i, j) = static_cast<T>(p(i, j) * (dp(i, j) - dot));  // 0 for j > i
      }
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::N, scale, ConstView<T>(dp), kh, 0.0,
                          dq.row_block(b * t, t).col_block(h * hd, hd));
      Backend::gemm<T, T>(ctx, lora::Op::T, lora::Op::N, scale, ConstView<T>(dp), qh, 1.0,
                          dk.row_block(b * t, t).col_block(g * hd, hd));
    }
}

// SwiGLU: h = silu(gate) o up,  silu(z) = z sigmoid(z)
template <class T>
void swiglu_forward(ConstView<T> gate, ConstView<T> up, View<T> h) {
  for (std::int64_t i = 0; i < gate.rows; ++i)
    for (std::int64_t j = 0; j < gate.cols; ++j) {
      const T z = gate(i, j);
      h(i, j) = z / (T(1) + std::exp(-z)) * up(i, j);
    }
}

// dgate = dh o up o silu'(gate),  silu'(z) = s (1 + z (1 - s)), s = sigmoid(z);  dup = dh o silu(gate)
template <class T>
void swiglu_backward(ConstView<T> gate, ConstView<T> up, ConstView<T> dh, View<T> dgate, View<T> dup) {
  for (std::int64_t i = 0; i < gate.rows; ++i)
    for (std::int64_t j = 0; j < gate.cols; ++j) {
      const T z = gate(i, j), s = T(1) / (T(1) + std::exp(-z));
      dgate(i, j) = dh(i, j) * up(i, j) * s * (T(1) + z * (T(1) - s));
      dup(i, j) = dh(i, j) * z * s;
    }
}

// Mean over rows of -log softmax(logits)[i, target_i]       logits: N x V
// and, when dlogits is not empty, its gradient (softmax - onehot(target)) / N.
template <class T>
double cross_entropy(ConstView<T> logits, const int* targets, View<T> dlogits) {
  const std::int64_t n = logits.rows, vocab = logits.cols;
  std::vector<T> e(static_cast<std::size_t>(vocab));
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    T max = logits(i, 0);
    for (std::int64_t j = 1; j < vocab; ++j) max = std::max(max, logits(i, j));
    double sum = 0.0;
    for (std::int64_t j = 0; j < vocab; ++j) sum += e[static_cast<std::size_t>(j)] = std::exp(logits(i, j) - max);
    total += std::log(sum) - static_cast<double>(logits(i, targets[i]) - max);
    if (dlogits.empty()) continue;
    const T inv = static_cast<T>(1.0 / (sum * static_cast<double>(n)));
    for (std::int64_t j = 0; j < vocab; ++j) dlogits(i, j) = e[static_cast<std::size_t>(j)] * inv;
    dlogits(i, targets[i]) -= static_cast<T>(1.0 / static_cast<double>(n));
  }
  return total / static_cast<double>(n);
}

}  // namespace demo

// The pieces of a small transformer that are not linear layers: token and
// position embeddings, layer norm, ReLU, causal self-attention and softmax
// cross-entropy, each with its backward. Rows are tokens: a batch of B
// sequences of t tokens is a (B t) x d matrix, sequence b in rows [b t, b t + t).
// Matrix products go through lora::cpu::Backend::gemm, like the library's own.
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

// x[b t + i, :] = tok_emb[tokens[b t + i], :] + pos_emb[i, :]       x: (B t) x d
template <class T>
void embedding_forward(ConstView<T> tok_emb, ConstView<T> pos_emb, const int* tokens, int t, View<T> x) {
  LORA_CHECK(x.rows % t == 0 && t <= pos_emb.rows, "embedding: " << x.rows << " rows are not sequences of t = " << t
                                                                 << " <= " << pos_emb.rows << " positions");
  for (std::int64_t row = 0; row < x.rows; ++row) {
    const int token = tokens[row];
    LORA_CHECK(token >= 0 && token < tok_emb.rows,
               "embedding: token " << token << " outside [0, " << tok_emb.rows << ")");
    const std::int64_t pos = row % t;
    for (std::int64_t j = 0; j < x.cols; ++j) x(row, j) = tok_emb(token, j) + pos_emb(pos, j);
  }
}

// dtok_emb[tokens[r], :] += dx[r, :];  dpos_emb[r mod t, :] += dx[r, :]
template <class T>
void embedding_backward(ConstView<T> dx, const int* tokens, int t, View<T> dtok_emb, View<T> dpos_emb) {
  for (std::int64_t row = 0; row < dx.rows; ++row) {
    const int token = tokens[row];
    const std::int64_t pos = row % t;
    for (std::int64_t j = 0; j < dx.cols; ++j) {
      dtok_emb(token, j) += dx(row, j);
      dpos_emb(pos, j) += dx(row, j);
    }
  }
}

// Per row: xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps);  y = xhat o gain + bias.
// x, y, xhat: N x d; gain, bias: 1 x d; rstd: N x 1 (xhat and rstd kept for backward).
template <class T>
void layer_norm_forward(ConstView<T> x, ConstView<T> gain, ConstView<T> bias, View<T> y, View<T> xhat, View<T> rstd) {
  constexpr double kEps = 1e-5;
  const std::int64_t d = x.cols;
  for (std::int64_t i = 0; i < x.rows; ++i) {
    double mean = 0.0, var = 0.0;
    for (std::int64_t j = 0; j < d; ++j) mean += x(i, j);
    mean /= static_cast<double>(d);
    for (std::int64_t j = 0; j < d; ++j) var += (x(i, j) - mean) * (x(i, j) - mean);
    var /= static_cast<double>(d);
    const T r = static_cast<T>(1.0 / std::sqrt(var + kEps));
    rstd(i, 0) = r;
    for (std::int64_t j = 0; j < d; ++j) {
      xhat(i, j) = static_cast<T>(x(i, j) - mean) * r;
      y(i, j) = xhat(i, j) * gain(0, j) + bias(0, j);
    }
  }
}

// Given dy (N x d):  g = dy o gain
//   dx  += rstd (g - mean_j(g) - xhat mean_j(g o xhat))     (added: x feeds a residual stream)
//   dgain += sum_i dy o xhat,  dbias += sum_i dy             (skipped when dgain is empty)
template <class T>
void layer_norm_backward(ConstView<T> dy, ConstView<T> xhat, ConstView<T> rstd, ConstView<T> gain, View<T> dx,
                         View<T> dgain, View<T> dbias) {
  const std::int64_t d = dy.cols;
  for (std::int64_t i = 0; i < dy.rows; ++i) {
    double mean_g = 0.0, mean_gx = 0.0;
    for (std::int64_t j = 0; j < d; ++j) {
      const double g = static_cast<double>(dy(i, j)) * gain(0, j);
      mean_g += g;
      mean_gx += g * xhat(i, j);
    }
    mean_g /= static_cast<double>(d);
    mean_gx /= static_cast<double>(d);
    for (std::int64_t j = 0; j < d; ++j) {
      const double g = static_cast<double>(dy(i, j)) * gain(0, j);
      dx(i, j) += static_cast<T>(rstd(i, 0) * (g - mean_g - xhat(i, j) * mean_gx));
    }
    if (dgain.empty()) continue;
    for (std::int64_t j = 0; j < d; ++j) {
      dgain(0, j) += dy(i, j) * xhat(i, j);
      dbias(0, j) += dy(i, j);
    }
  }
}

// ReLU (the original Transformer's MLP): y = max(x, 0). A tanh GELU costs a
// quarter of a training step here (one exp per element) for no visible gain.
template <class T>
void relu_forward(ConstView<T> x, View<T> y) {
  for (std::int64_t i = 0; i < x.rows; ++i)
    for (std::int64_t j = 0; j < x.cols; ++j) y(i, j) = x(i, j) > T(0) ? x(i, j) : T(0);
}

// dx = dy where x > 0, else 0
template <class T>
void relu_backward(ConstView<T> x, ConstView<T> dy, View<T> dx) {
  for (std::int64_t i = 0; i < x.rows; ++i)
    for (std::int64_t j = 0; j < x.cols; ++j) dx(i, j) = x(i, j) > T(0) ? dy(i, j) : T(0);
}

// Causal multi-head self-attention for each sequence b and head h (dh = d / H):
//   S = Q K^T / sqrt(dh)       (t x t) = (t x dh)(dh x t), S[i, j] = -inf for j > i
//   P = softmax of each row of S,   O = P V      (t x dh) = (t x t)(t x dh)
// qkv: (B t) x 3d = [Q | K | V], head h in columns h dh .. h dh + dh of each;
// probs: (B H t) x t, block (b H + h) holds P (kept for backward); out: (B t) x d.
template <class T>
void attention_forward(lora::cpu::Context& ctx, ConstView<T> qkv, int t, int heads, View<T> probs, View<T> out) {
  const std::int64_t d = out.cols, dh = d / heads, batch = out.rows / t;
  LORA_CHECK(d % heads == 0 && qkv.cols == 3 * d && out.rows % t == 0,
             "attention: d = " << d << ", heads = " << heads << ", qkv cols " << qkv.cols);
  lora::check_shape(probs, batch * heads * t, t, "attention probs");
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  for (std::int64_t b = 0; b < batch; ++b) {
    const ConstView<T> rows = qkv.row_block(b * t, t);
    for (std::int64_t h = 0; h < heads; ++h) {
      const ConstView<T> q = rows.col_block(h * dh, dh), k = rows.col_block(d + h * dh, dh),
                         v = rows.col_block(2 * d + h * dh, dh);
      const View<T> p = probs.row_block((b * heads + h) * t, t);
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::T, scale, q, k, 0.0, p);
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
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::N, 1.0, ConstView<T>(p), v, 0.0,
                          out.row_block(b * t, t).col_block(h * dh, dh));
    }
  }
}

// Given dO ((B t) x d), for each sequence and head:
//   dV = P^T dO,  dP = dO V^T,  dS = P o (dP - rowsum(dP o P)),
//   dQ = dS K / sqrt(dh),  dK = dS^T Q / sqrt(dh)
// written into dqkv ((B t) x 3d, same layout as qkv); dp: a t x t workspace.
template <class T>
void attention_backward(lora::cpu::Context& ctx, ConstView<T> qkv, ConstView<T> probs, ConstView<T> dout, int t,
                        int heads, View<T> dqkv, View<T> dp) {
  const std::int64_t d = dout.cols, dh = d / heads, batch = dout.rows / t;
  lora::check_shape(dqkv, dout.rows, 3 * d, "attention dqkv");
  lora::check_shape(dp, t, t, "attention dP workspace");
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  for (std::int64_t b = 0; b < batch; ++b) {
    const ConstView<T> rows = qkv.row_block(b * t, t);
    const View<T> drows = dqkv.row_block(b * t, t);
    const ConstView<T> dO_b = dout.row_block(b * t, t);
    for (std::int64_t h = 0; h < heads; ++h) {
      const ConstView<T> q = rows.col_block(h * dh, dh), k = rows.col_block(d + h * dh, dh),
                         v = rows.col_block(2 * d + h * dh, dh), dO = dO_b.col_block(h * dh, dh);
      const ConstView<T> p = probs.row_block((b * heads + h) * t, t);
      Backend::gemm<T, T>(ctx, lora::Op::T, lora::Op::N, 1.0, p, dO, 0.0, drows.col_block(2 * d + h * dh, dh));
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::T, 1.0, dO, v, 0.0, dp);
      for (std::int64_t i = 0; i < t; ++i) {
        double dot = 0.0;
        for (std::int64_t j = 0; j <= i; ++j) dot += static_cast<double>(dp(i, j)) * p(i, j);
        for (std::int64_t j = 0; j < t; ++j) dp(i, j) = static_cast<T>(p(i, j) * (dp(i, j) - dot));  // 0 for j > i
      }
      Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::N, scale, ConstView<T>(dp), k, 0.0, drows.col_block(h * dh, dh));
      Backend::gemm<T, T>(ctx, lora::Op::T, lora::Op::N, scale, ConstView<T>(dp), q, 0.0,
                          drows.col_block(d + h * dh, dh));
    }
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

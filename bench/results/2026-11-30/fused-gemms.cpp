// The lead: A stored under W in one (d_out + r) x d_in buffer, so that
//   [y | xa] = x [W; A]^T   (one GEMM instead of x W^T and x A^T), and
//   dL/dx = [dL/dy | s g] [W; A]  (one GEMM instead of dL/dy W and s g A).
// Times (min over reps, 2 threads) of the separate and the fused forms at N = 2048, d = 4096, r = 16.
#include <cblas.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <vector>
template <class F> double best(F f, int reps = 7) { double b = 1e18; for (int i = 0; i < reps; ++i) { auto t = std::chrono::steady_clock::now(); f(); b = std::min(b, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count()); } return b; }
int main() {
  const int N = 2048, d = 4096, r = 16;
  std::vector<float> x(size_t(N) * d, 0.5f), WA(size_t(d + r) * d, 0.01f), y(size_t(N) * d), xa(size_t(N) * r), yxa(size_t(N) * (d + r));
  std::vector<float> dy(size_t(N) * d, 1e-3f), g(size_t(N) * r, 1e-3f), dx(size_t(N) * d), dyg(size_t(N) * (d + r));
  const float* W = WA.data(); const float* A = WA.data() + size_t(d) * d;
  double sep_f = best([&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, d, d, 1, x.data(), d, W, d, 0, y.data(), d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, r, d, 1, x.data(), d, A, d, 0, xa.data(), r); });
  double fused_f = best([&] { cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, d + r, d, 1, x.data(), d, WA.data(), d, 0, yxa.data(), d + r); });
  double copy_out = best([&] { for (int i = 0; i < N; ++i) std::memcpy(&y[size_t(i) * d], &yxa[size_t(i) * (d + r)], sizeof(float) * d); });
  double sep_b = best([&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, d, d, 1, dy.data(), d, W, d, 0, dx.data(), d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, d, r, 2, g.data(), r, A, d, 1, dx.data(), d); });
  double copy_in = best([&] { for (int i = 0; i < N; ++i) { std::memcpy(&dyg[size_t(i) * (d + r)], &dy[size_t(i) * d], sizeof(float) * d); std::memcpy(&dyg[size_t(i) * (d + r) + d], &g[size_t(i) * r], sizeof(float) * r); } });
  double fused_b = best([&] { cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, d, d + r, 1, dyg.data(), d + r, WA.data(), d, 0, dx.data(), d); });
  printf("forward:  x W^T + x A^T separately %.1f ms | x [W;A]^T fused %.1f ms (+ %.1f ms to copy y out of the N x (d+r) result)\n", sep_f, fused_f, copy_out);
  printf("backward: dL/dy W + s g A separately %.1f ms | [dL/dy, s g] [W;A] fused %.1f ms (+ %.1f ms to build [dL/dy, s g])\n", sep_b, fused_b, copy_in);
}

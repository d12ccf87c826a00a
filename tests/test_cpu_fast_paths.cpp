// The CPU backend's fast paths give what their plain definitions give:
// dropout (one Philox call per four elements, rows on several threads) against
// lora::dropout_keep called element by element, at sizes that take the
// parallel branch, with odd widths, strided views and in place; adam_step
// (chunked, vectorised, threaded) against a one-element-at-a-time loop of the
// formula, over tensors whose sizes end mid-chunk; the threads both run on
// (detail::parallel_rows: every row once, errors passed back, the same bits on
// any number of threads); gemm on both sides of the
// Eigen/CBLAS split (and the dimension-1 products kept on Eigen) against a
// triple loop, every transpose combination, with strides, alpha and beta.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "lora/lora.hpp"

namespace {

using Backend = lora::cpu::Backend;
using lora::cpu::Matrix;

template <class T>
void fill_nonzero(Matrix<T>& m, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(0.5, 2.0);  // never 0: a dropped element is visible
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(gen));
}

// out_ij == (dropout_keep(seed, stream, call, i * cols + j, p) ? x_ij / (1 - p) : 0), bit for bit.
template <class T>
void expect_definition(lora::MatrixView<const T> x, lora::MatrixView<const T> out, const Matrix<T>& x_before, float p,
                       std::uint64_t seed, std::uint32_t stream, std::uint32_t call) {
  const T keep_scale = static_cast<T>(1.0 / (1.0 - static_cast<double>(p)));
  std::int64_t kept = 0, wrong = 0;
  for (std::int64_t i = 0; i < x.rows; ++i) {
    for (std::int64_t j = 0; j < x.cols; ++j) {
      const bool keep = lora::dropout_keep(seed, stream, call, static_cast<std::uint64_t>(i * x.cols + j), p);
      const T want = keep ? x_before(i, j) * keep_scale : T(0);
      kept += keep;
      wrong += out(i, j) != want;
    }
  }
  EXPECT_EQ(wrong, 0) << "elements that differ from dropout_keep's definition";
  // The mask must mix, or the comparison above proves little (p <= 0.3 keeps most).
  if (x.size() >= 15) {
    EXPECT_GT(kept, x.size() / 2);
    EXPECT_LT(kept, x.size());
  }
}

TEST(CpuDropout, MatchesDropoutKeepElementByElement) {
  lora::cpu::Context ctx;
  // 1031 x 1021 = 1,052,651 elements: the parallel branch (from 2^20); 1021 is
  // odd, so rows start at every phase of the four-element Philox blocks.
  // 300 x 131 and 3 x 5 run on one thread.
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{1031, 1021}, {300, 131}, {3, 5}, {1, 1}}) {
    SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols));
    Matrix<float> x(rows, cols), out(rows, cols);
    fill_nonzero(x, 1);
    Backend::dropout<float>(ctx, x.view(), out.view(), 0.3f, 0x1234'5678'9abcull, 5, 17);
    expect_definition<float>(x.view(), out.view(), x, 0.3f, 0x1234'5678'9abcull, 5, 17);
  }
  // Layer streams from 2^31 on: their RNG stream 2 s + 1 needs 33 bits.
  for (const std::uint32_t stream : {0x8000'0005u, 0xffff'ffffu}) {
    SCOPED_TRACE("stream " + std::to_string(stream));
    Matrix<float> x(300, 131), out(300, 131);
    fill_nonzero(x, 2);
    Backend::dropout<float>(ctx, x.view(), out.view(), 0.3f, 77, stream, 4);
    expect_definition<float>(x.view(), out.view(), x, 0.3f, 77, stream, 4);
  }
}

TEST(CpuDropout, StridedAndInPlace) {
  lora::cpu::Context ctx;
  const std::int64_t rows = 257, cols = 129;
  Matrix<double> buf(rows, cols + 6), reference(rows, cols);
  fill_nonzero(buf, 2);
  auto block = buf.view().col_block(3, cols);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) reference(i, j) = block(i, j);
  const double left = buf(0, 2), right = buf(rows - 1, cols + 3);
  Backend::dropout<double>(ctx, block, block, 0.25f, 99, 0, 3);  // in place, stride cols + 6
  expect_definition<double>(block, block, reference, 0.25f, 99, 0, 3);
  EXPECT_EQ(buf(0, 2), left) << "wrote outside the view";
  EXPECT_EQ(buf(rows - 1, cols + 3), right) << "wrote outside the view";
}

TEST(CpuDropout, RejectsMismatchedOutput) {
  lora::cpu::Context ctx;
  Matrix<float> x(4, 6), out(4, 5);
  EXPECT_THROW(Backend::dropout<float>(ctx, x.view(), out.view(), 0.1f, 1, 0, 0), lora::Error);
}

// ---- dropout as bits: dropout_mask, apply_dropout_mask ------------------------

// The integer test the mask kernels use is uniform01(bits) >= p, for every one
// of the 2^24 values uniform01 can take.
TEST(CpuDropoutMask, IntegerThresholdIsTheFloatTest) {
  for (const float p : {1e-8f, 0.1f, 0.25f, 1.0f / 3.0f, 0.5f, 0.9f, std::nextafter(1.0f, 0.0f), 0.0f, 1.0f}) {
    const std::uint32_t t = lora::dropout_keep_threshold(p);
    std::int64_t wrong = 0;
    for (std::uint32_t u = 0; u < (1u << 24); ++u) wrong += (u >= t) != (lora::uniform01(u << 8) >= p);
    EXPECT_EQ(wrong, 0) << "p = " << p;
  }
}

// bits(i, w) bit q == dropout_keep(seed, stream, call, i * cols + 32 w + q, p), and 0 past cols.
void expect_mask_definition(lora::MatrixView<const std::uint32_t> bits, std::int64_t cols, float p,
                            std::uint64_t seed, std::uint32_t stream, std::uint32_t call) {
  std::int64_t wrong = 0, kept = 0;
  for (std::int64_t i = 0; i < bits.rows; ++i) {
    for (std::int64_t j = 0; j < 32 * bits.cols; ++j) {
      const bool bit = ((bits(i, j / 32) >> (j % 32)) & 1u) != 0;
      const bool want = j < cols && lora::dropout_keep(seed, stream, call, static_cast<std::uint64_t>(i * cols + j), p);
      wrong += bit != want;
      kept += bit;
    }
  }
  EXPECT_EQ(wrong, 0) << "bits that differ from dropout_keep's definition";
  if (bits.rows * cols >= 15) {
    EXPECT_GT(kept, 0);
    EXPECT_LT(kept, bits.rows * cols);
  }
}

TEST(CpuDropoutMask, BitsAreDropoutKeep) {
  lora::cpu::Context ctx;
  // 1031 x 1021: the parallel branch, rows at every phase of the Philox
  // blocks; 7 x 64: whole words; 300 x 131, 3 x 5, 1 x 1: ragged last words.
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{1031, 1021}, {7, 64}, {300, 131}, {3, 5}, {1, 1}}) {
    for (const std::uint32_t stream : {5u, 0xffff'ffffu}) {
      SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols) + ", stream " + std::to_string(stream));
      const std::int64_t words = lora::dropout_mask_words(cols);
      Matrix<std::uint32_t> buf(rows, words + 2);  // strided: two words of padding per row
      std::fill_n(buf.data(), buf.size(), 0xdeadbeefu);
      auto bits = buf.view().col_block(1, words);
      Backend::dropout_mask(ctx, cols, 0.3f, 0x1234'5678'9abcull, stream, 17, bits);
      expect_mask_definition(bits, cols, 0.3f, 0x1234'5678'9abcull, stream, 17);
      for (std::int64_t i = 0; i < rows; ++i) {
        EXPECT_EQ(buf(i, 0), 0xdeadbeefu) << "wrote outside the view";
        EXPECT_EQ(buf(i, words + 1), 0xdeadbeefu) << "wrote outside the view";
      }
    }
  }
  Matrix<std::uint32_t> short_rows(2, 1);
  EXPECT_THROW(Backend::dropout_mask(ctx, 33, 0.1f, 1, 0, 0, short_rows.view()), lora::Error);
}

// The portable build of the kernels (what a CPU without AVX-512 runs) and the
// dispatched one (AVX-512 where this CPU has it) give the same bits, from any
// phase of the four-element Philox blocks and past 2^32 elements.
TEST(CpuDropoutMask, PortableAndDispatchedKernelsAgree) {
  const std::uint32_t threshold = lora::dropout_keep_threshold(0.4f);
  const std::uint64_t rng_stream = lora::dropout_stream(9);
  const std::uint64_t firsts[] = {0, 1, 6, (std::uint64_t{1} << 40) + 3};
  for (const std::uint64_t first : firsts) {
    for (const std::int64_t count : {std::int64_t{1}, std::int64_t{31}, std::int64_t{64}, std::int64_t{1000}}) {
      SCOPED_TRACE("first " + std::to_string(first) + ", count " + std::to_string(count));
      std::vector<std::uint32_t> scratch(lora::cpu::detail::keep_bits_scratch(count));
      const auto words = static_cast<std::size_t>(lora::dropout_mask_words(count));
      std::vector<std::uint32_t> portable(words), dispatched(words), want(words, 0);
      lora::cpu::detail::keep_bits_impl(7, rng_stream, 3, first, count, threshold, scratch.data(), portable.data());
      lora::cpu::detail::keep_bits(7, rng_stream, 3, first, count, threshold, scratch.data(), dispatched.data());
      for (std::int64_t q = 0; q < count; ++q)
        if (lora::dropout_keep(7, 9, 3, first + static_cast<std::uint64_t>(q), 0.4f)) want[q / 32] |= 1u << (q % 32);
      EXPECT_EQ(portable, want);
      EXPECT_EQ(dispatched, want);

      std::vector<float> x(static_cast<std::size_t>(count));
      std::vector<float> out_portable(x.size(), 1.5f), out_dispatched(x.size(), 1.5f);
      for (std::size_t j = 0; j < x.size(); ++j) x[j] = 0.5f + 0.001f * static_cast<float>(j);
      lora::cpu::detail::apply_bits_impl(x.data(), want.data(), count, 1.25f, out_portable.data());
      lora::cpu::detail::apply_bits(x.data(), want.data(), count, 1.25f, out_dispatched.data());
      EXPECT_EQ(std::memcmp(out_portable.data(), out_dispatched.data(), x.size() * sizeof(float)), 0);
    }
  }
}

// apply_dropout_mask is dropout, bit for bit; a row block of the mask goes
// with the same rows of x (the layer's row blocks), in place too.
template <class T>
void check_apply_dropout_mask() {
  lora::cpu::Context ctx;
  const std::int64_t rows = 37, cols = 75;
  const float p = 0.35f;
  Matrix<T> x(rows, cols), dropped(rows, cols), out(rows, cols);
  fill_nonzero(x, 3);
  Matrix<std::uint32_t> bits(rows, lora::dropout_mask_words(cols));
  Backend::dropout_mask(ctx, cols, p, 11, 2, 5, bits.view());
  Backend::dropout<T>(ctx, x.view(), dropped.view(), p, 11, 2, 5);
  std::fill_n(out.data(), out.size(), std::numeric_limits<T>::quiet_NaN());  // never read
  Backend::apply_dropout_mask<T>(ctx, x.view(), bits.view(), p, out.view());
  EXPECT_EQ(std::memcmp(out.data(), dropped.data(), out.bytes()), 0);
  // in place on rows [10, 30) of x only
  Matrix<T> before = x.clone();
  Backend::apply_dropout_mask<T>(ctx, x.view().row_block(10, 20), bits.view().row_block(10, 20), p,
                                 x.view().row_block(10, 20));
  std::int64_t wrong = 0;
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) wrong += x(i, j) != (i >= 10 && i < 30 ? dropped(i, j) : before(i, j));
  EXPECT_EQ(wrong, 0);
  EXPECT_THROW(Backend::apply_dropout_mask<T>(ctx, x.view(), bits.view().row_block(0, 5), p, out.view()),
               lora::Error);
}
TEST(CpuDropoutMask, ApplyIsDropoutBitForBit) {
  check_apply_dropout_mask<float>();
  check_apply_dropout_mask<double>();
}

// PyTorch's Adam/AdamW for one element, in double: the formula of lora::AdamStep.
struct AdamReference {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, lr = 1e-2, wd = 0.1;
  void step(double& theta, double g, double& m, double& v, int t, bool decoupled) const {
    if (decoupled) {
      theta *= 1.0 - lr * wd;
    } else {
      g += wd * theta;
    }
    m = beta1 * m + (1.0 - beta1) * g;
    v = beta2 * v + (1.0 - beta2) * g * g;
    const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
    theta -= lr / bc1 * m / (std::sqrt(v) / std::sqrt(bc2) + eps);
  }
  // The same hyperparameters for Backend::adam_step's step t.
  lora::AdamStep<float> hyper(int t, bool decoupled) const {
    lora::AdamStep<float> h{};
    h.beta1 = static_cast<float>(beta1);
    h.beta2 = static_cast<float>(beta2);
    h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    h.eps = static_cast<float>(eps);
    h.bias_correction1 = static_cast<float>(1.0 - std::pow(beta1, t));
    h.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
    h.decoupled = decoupled;
    return h;
  }
};

TEST(CpuAdam, ChunkedStepMatchesTheFormulaElementByElement) {
  lora::cpu::Context ctx;
  const AdamReference ref;
  // 1,100,003 elements: the parallel branch (from 2^20), 537 full chunks and a
  // ragged one; 70,001: one thread, many chunks; 5: one short chunk.
  for (const std::int64_t n : {std::int64_t{1100003}, std::int64_t{70001}, std::int64_t{5}}) {
    for (const bool decoupled : {true, false}) {
      SCOPED_TRACE("n = " + std::to_string(n) + (decoupled ? " AdamW" : " Adam"));
      std::mt19937_64 gen(static_cast<std::uint64_t>(n) + decoupled);
      std::normal_distribution<double> dist;
      std::vector<float> param(n), grad(n), m(n, 0.0f), v(n, 0.0f);
      std::vector<double> theta(n), m_ref(n, 0.0), v_ref(n, 0.0);
      for (std::int64_t i = 0; i < n; ++i) param[i] = static_cast<float>(theta[i] = dist(gen));
      for (int t = 1; t <= 3; ++t) {
        for (std::int64_t i = 0; i < n; ++i) grad[i] = static_cast<float>(dist(gen) * (i % 7 == 0 ? 1e-4 : 1.0));
        const lora::AdamStep<float> h = ref.hyper(t, decoupled);
        const lora::AdamSlot<float> slot{param.data(), grad.data(), m.data(), v.data(), n,
                                         static_cast<float>(ref.lr), static_cast<float>(ref.wd)};
        Backend::adam_step<float>(ctx, &slot, 1, h);
        for (std::int64_t i = 0; i < n; ++i) ref.step(theta[i], grad[i], m_ref[i], v_ref[i], t, decoupled);
      }
      // Every element moved (lr = 1e-2 per step, ~0.03 in all) and sits where the
      // formula puts it, up to float rounding: the worst of 1.1M elements is 2.7e-6
      // (a plain float loop of the formula lands on the same floats); an element
      // skipped or updated twice is off by 1e-2 or more.
      double worst = 0.0;
      for (std::int64_t i = 0; i < n; ++i) {
        worst = std::max(worst, std::abs(param[i] - theta[i]) / (std::abs(theta[i]) + 1e-2));
      }
      EXPECT_LE(worst, 1e-5);
    }
  }
}

#if defined(_OPENMP)
// OMP_NUM_THREADS for one scope: detail::parallel_rows takes its thread count
// from OpenMP's setting.
class OmpThreads {
 public:
  explicit OmpThreads(int n) : before_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~OmpThreads() { omp_set_num_threads(before_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int before_;
};

struct Chunk {
  std::int64_t begin, end;
  std::thread::id thread;
};
std::vector<Chunk> chunks_of(std::int64_t rows, std::int64_t elements) {
  std::mutex mutex;
  std::vector<Chunk> chunks;
  lora::cpu::detail::parallel_rows(rows, elements, [&](std::int64_t begin, std::int64_t end) {
    const std::lock_guard<std::mutex> lock(mutex);
    chunks.push_back({begin, end, std::this_thread::get_id()});
  });
  std::sort(chunks.begin(), chunks.end(), [](const Chunk& a, const Chunk& b) { return a.begin < b.begin; });
  return chunks;
}

TEST(CpuParallelRows, EveryRowOnceInContiguousChunksOnSeparateThreads) {
  const std::int64_t threshold = lora::cpu::detail::kParallelMinElements;
  for (const int threads : {1, 2, 3, 7}) {
    const OmpThreads setting(threads);
    for (auto [rows, elements] : {std::pair<std::int64_t, std::int64_t>{1000, threshold - 1}, {1000, threshold},
                                  {1000, 64 * threshold}, {5, 64 * threshold}, {1, 64 * threshold}, {0, threshold}}) {
      SCOPED_TRACE(std::to_string(threads) + " threads, " + std::to_string(rows) + " rows, " +
                   std::to_string(elements) + " elements");
      const std::vector<Chunk> chunks = chunks_of(rows, elements);
      std::int64_t next = 0;
      for (const Chunk& c : chunks) {
        EXPECT_EQ(c.begin, next) << "a row skipped or run twice";
        EXPECT_LT(c.begin, c.end) << "an empty chunk";
        next = c.end;
      }
      EXPECT_EQ(next, rows);
      if (rows == 0) continue;
      // Below the threshold, or with one row or one thread allowed: one call, here.
      const bool parallel = elements >= threshold && rows > 1 && threads > 1;
      if (!parallel) {
        ASSERT_EQ(chunks.size(), 1u);
        EXPECT_EQ(chunks[0].thread, std::this_thread::get_id());
        continue;
      }
      // Never more chunks than OMP_NUM_THREADS or rows; each on its own thread,
      // the first on the calling one.
      EXPECT_GE(chunks.size(), 2u);
      EXPECT_LE(chunks.size(), static_cast<std::size_t>(std::min<std::int64_t>(threads, rows)));
      for (std::size_t i = 0; i < chunks.size(); ++i) {
        EXPECT_EQ(chunks[i].thread == std::this_thread::get_id(), i == 0);
        for (std::size_t j = 0; j < i; ++j) EXPECT_NE(chunks[i].thread, chunks[j].thread);
      }
    }
  }
}

// Called inside the user's own OpenMP team, each member runs its rows alone
// (as a nested OpenMP region would), instead of starting threads of its own.
TEST(CpuParallelRows, InsideAnOpenMpRegionRunsOnTheCallingThread) {
  const OmpThreads setting(3);
  const std::int64_t elements = 64 * lora::cpu::detail::kParallelMinElements;
  std::vector<std::size_t> chunks(3, 0);
  std::vector<int> alone(3, 0);
#pragma omp parallel num_threads(3)
  {
    const std::vector<Chunk> mine = chunks_of(100, elements);
    const auto me = static_cast<std::size_t>(omp_get_thread_num());
    chunks[me] = mine.size();
    alone[me] = mine.size() == 1 && mine[0].thread == std::this_thread::get_id() && mine[0].end == 100;
  }
  for (std::size_t t = 0; t < 3; ++t) {
    EXPECT_EQ(chunks[t], 1u) << "team member " << t;
    EXPECT_TRUE(alone[t]) << "team member " << t;
  }
  EXPECT_GE(chunks_of(100, elements).size(), 2u) << "outside the region the rows are split";
}

TEST(CpuParallelRows, AThrownErrorReachesTheCallerAfterEveryOtherChunkRan) {
  const OmpThreads setting(4);
  const std::int64_t rows = 400, elements = lora::cpu::detail::kParallelMinElements * 8;
  // The chunk of row 0 runs on the calling thread, the last row's on a started one.
  for (const std::int64_t bad_row : {std::int64_t{0}, rows - 1}) {
    std::atomic<std::int64_t> ran{0};
    auto run = [&] {
      lora::cpu::detail::parallel_rows(rows, elements, [&](std::int64_t begin, std::int64_t end) {
        if (begin <= bad_row && bad_row < end) throw std::runtime_error("chunk failed");
        ran += end - begin;
      });
    };
    EXPECT_THROW(run(), std::runtime_error);
    EXPECT_EQ(ran.load(), rows - rows / 4) << "bad row " << bad_row;  // four chunks of 100 rows, one failed
  }
}

// Dropout, its mask and Adam give the same bits on 1, 2, 3 and 7 threads.
TEST(CpuParallelRows, DropoutMaskAndAdamDoNotDependOnTheThreadCount) {
  lora::cpu::Context ctx;
  const std::int64_t rows = 1031, cols = 1021;  // 1,052,651 elements: parallel
  Matrix<float> x(rows, cols);
  fill_nonzero(x, 3);
  const std::int64_t n = 1100003;
  std::vector<float> grad(n);
  std::mt19937_64 gen(11);
  std::normal_distribution<float> dist;
  for (float& g : grad) g = dist(gen);
  struct Result {
    std::vector<std::uint32_t> bits;
    std::vector<float> dropped, param;
  };
  auto run = [&](int threads) {
    const OmpThreads setting(threads);
    Result r;
    Matrix<std::uint32_t> bits(rows, lora::dropout_mask_words(cols));
    Backend::dropout_mask(ctx, cols, 0.1f, 99, 4, 2, bits.view());
    r.bits.assign(bits.data(), bits.data() + bits.size());
    Matrix<float> out(rows, cols);
    Backend::dropout<float>(ctx, x.view(), out.view(), 0.1f, 99, 4, 2);
    r.dropped.assign(out.data(), out.data() + out.size());
    r.param.assign(n, 1.0f);
    std::vector<float> m(n, 0.0f), v(n, 0.0f);
    const AdamReference ref;
    const lora::AdamSlot<float> slot{r.param.data(), grad.data(), m.data(), v.data(), n, static_cast<float>(ref.lr),
                                     static_cast<float>(ref.wd)};
    Backend::adam_step<float>(ctx, &slot, 1, ref.hyper(1, true));
    return r;
  };
  const Result one = run(1);
  EXPECT_NE(one.param, std::vector<float>(n, 1.0f)) << "Adam moved nothing";
  for (const int threads : {2, 3, 7}) {
    const Result many = run(threads);
    EXPECT_EQ(many.bits, one.bits) << threads << " threads";
    EXPECT_EQ(many.dropped, one.dropped) << threads << " threads";
    EXPECT_EQ(many.param, one.param) << threads << " threads";
  }
}
#endif

// c = alpha op(a) op(b) + beta c, in double, one multiply-add at a time.
void naive_gemm(lora::Op op_a, lora::Op op_b, double alpha, const Matrix<double>& a, const Matrix<double>& b,
                double beta, Matrix<double>& c) {
  const std::int64_t k = op_a == lora::Op::N ? a.cols() : a.rows();
  for (std::int64_t i = 0; i < c.rows(); ++i) {
    for (std::int64_t j = 0; j < c.cols(); ++j) {
      double sum = 0.0;
      for (std::int64_t p = 0; p < k; ++p) {
        sum += (op_a == lora::Op::N ? a(i, p) : a(p, i)) * (op_b == lora::Op::N ? b(p, j) : b(j, p));
      }
      c(i, j) = alpha * sum + beta * c(i, j);
    }
  }
}

TEST(CpuGemm, BothSidesOfTheCblasSplitMatchATripleLoop) {
  lora::cpu::Context ctx;
  struct Shape {
    std::int64_t m, n, k;
  };
  // 31^3 < 2^15 <= 33^3: Eigen below, the CBLAS (when built with one) above;
  // m, n or k = 1 stay on Eigen at any size; 3 x 300 x 129 is a skinny CBLAS call.
  for (const Shape sh : {Shape{31, 31, 31}, Shape{33, 33, 33}, Shape{1, 300, 257}, Shape{257, 1, 300},
                         Shape{40, 300, 1}, Shape{3, 300, 129}}) {
    for (const lora::Op op_a : {lora::Op::N, lora::Op::T}) {
      for (const lora::Op op_b : {lora::Op::N, lora::Op::T}) {
        SCOPED_TRACE(std::to_string(sh.m) + " x " + std::to_string(sh.n) + " x " + std::to_string(sh.k) + " ops " +
                     std::to_string(static_cast<int>(op_a)) + std::to_string(static_cast<int>(op_b)));
        Matrix<double> a = op_a == lora::Op::N ? Matrix<double>(sh.m, sh.k) : Matrix<double>(sh.k, sh.m);
        Matrix<double> b = op_b == lora::Op::N ? Matrix<double>(sh.k, sh.n) : Matrix<double>(sh.n, sh.k);
        fill_nonzero(a, 3);
        fill_nonzero(b, 4);
        // c is a block of a wider buffer: the stride must be honoured and the margin left alone.
        Matrix<double> buf(sh.m, sh.n + 3), want(sh.m, sh.n);
        fill_nonzero(buf, 5);
        auto c = buf.view().col_block(1, sh.n);
        for (std::int64_t i = 0; i < sh.m; ++i)
          for (std::int64_t j = 0; j < sh.n; ++j) want(i, j) = c(i, j);
        const double left = buf(sh.m - 1, 0), right = buf(0, sh.n + 2);
        Backend::gemm<double, double>(ctx, op_a, op_b, 0.75, a.view(), b.view(), -0.5, c);
        naive_gemm(op_a, op_b, 0.75, a, b, -0.5, want);
        double worst = 0.0;
        for (std::int64_t i = 0; i < sh.m; ++i)
          for (std::int64_t j = 0; j < sh.n; ++j)
            worst = std::max(worst, std::abs(c(i, j) - want(i, j)) / (1.0 + std::abs(want(i, j))));
        EXPECT_LE(worst, 1e-12);
        EXPECT_EQ(buf(sh.m - 1, 0), left) << "wrote left of the block";
        EXPECT_EQ(buf(0, sh.n + 2), right) << "wrote right of the block";
      }
    }
  }
}

// BLAS takes int sizes and strides: blas_gemm_args names the first that does not fit.
TEST(CpuGemm, BlasGemmArgsNameTheFirstValuePastInt) {
  float dummy = 0.0f;  // never read: the function only looks at the shapes
  using CView = lora::MatrixView<const float>;
  const std::int64_t big = std::int64_t{1} << 31;  // INT_MAX + 1
  const auto args = [&](lora::GemmShape shape, std::int64_t lda, std::int64_t ldb, std::int64_t ldc) {
    std::string why;
    const auto got = lora::blas_gemm_args(shape, CView(&dummy, 1, 1, lda), CView(&dummy, 1, 1, ldb),
                                          lora::MatrixView<float>(&dummy, 1, 1, ldc), &why);
    return got ? std::string("fits") : why;
  };
  EXPECT_EQ(args({2, 3, 4}, 5, 6, 7), "fits");
  EXPECT_EQ(args({2, 3, big - 1}, big - 1, 6, 7), "fits");
  EXPECT_EQ(args({big, 3, 4}, 5, 6, 7), "m = 2147483648");
  EXPECT_EQ(args({2, big, 4}, 5, 6, 7), "n = 2147483648");
  EXPECT_EQ(args({2, 3, 3 * (big / 2)}, 5, 6, 7), "k = 3221225472");
  EXPECT_EQ(args({2, 3, 4}, big + 64, 6, 7), "lda (a's row stride) = 2147483712");
  EXPECT_EQ(args({2, 3, 4}, 5, big, 7), "ldb (b's row stride) = 2147483648");
  EXPECT_EQ(args({2, 3, 4}, 5, 6, big), "ldc (c's row stride) = 2147483648");
  const auto fits = lora::blas_gemm_args(lora::GemmShape{2, 3, 4}, CView(&dummy, 1, 1, 5), CView(&dummy, 1, 1, 6),
                                         lora::MatrixView<float>(&dummy, 1, 1, 7));
  ASSERT_TRUE(fits.has_value());
  EXPECT_EQ(fits->m, 2);
  EXPECT_EQ(fits->k, 4);
  EXPECT_EQ(fits->lda, 5);
  EXPECT_EQ(fits->ldc, 7);
}

// Address space without memory: pages are committed only where touched.
class Reservation {
 public:
  explicit Reservation(std::size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : p;
  }
  ~Reservation() {
    if (data_ != nullptr) munmap(data_, bytes_);
  }
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;
  float* floats() const { return static_cast<float*>(data_); }

 private:
  std::size_t bytes_;
  void* data_;
};

// A view whose row stride exceeds INT_MAX elements (rows of a huge buffer, or
// a tall matrix read by column blocks) at a size that takes the CBLAS path
// (2 x 128 x 128 = 2^15 multiply-adds). CBLAS's int stride used to be the
// truncated value: OpenBLAS refused it and c kept its old contents. Such a
// GEMM now runs on Eigen's 64-bit indices and gives the triple loop's numbers.
TEST(CpuGemm, StridesPastIntGiveTheTripleLoopsNumbers) {
  lora::cpu::Context ctx;
  const std::int64_t m = 2, n = 128, k = 128;
  const std::int64_t stride = (std::int64_t{1} << 31) + 64;  // > INT_MAX: int(stride) is negative
  const std::size_t bytes = static_cast<std::size_t>(stride + k) * sizeof(float);
  const Reservation a_space(bytes), c_space(bytes);
  if (a_space.floats() == nullptr || c_space.floats() == nullptr) GTEST_SKIP() << "cannot reserve 2 x 8 GiB of address space";
  const lora::MatrixView<float> a(a_space.floats(), m, k, stride), c(c_space.floats(), m, n, stride);
  Matrix<float> b(n, k), a_dense(m, k);
  fill_nonzero(b, 6);
  fill_nonzero(a_dense, 7);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < k; ++j) a(i, j) = a_dense(i, j);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) c(i, j) = -1.0f;  // stale contents that beta = 0 must not keep
  // c = a b^T            (2 x 128) = (2 x 128)(128 x 128)
  Backend::gemm<float, float>(ctx, lora::Op::N, lora::Op::T, 1.0, lora::MatrixView<const float>(a), b.view(), 0.0, c);
  Matrix<double> a_d(m, k), b_d(n, k), want_d(m, n);
  for (std::int64_t i = 0; i < a_d.size(); ++i) a_d.data()[i] = a_dense.data()[i];
  for (std::int64_t i = 0; i < b_d.size(); ++i) b_d.data()[i] = b.data()[i];
  naive_gemm(lora::Op::N, lora::Op::T, 1.0, a_d, b_d, 0.0, want_d);
  double worst = 0.0;
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j)
      worst = std::max(worst, std::abs(static_cast<double>(c(i, j)) - want_d(i, j)) / (1.0 + std::abs(want_d(i, j))));
  EXPECT_LE(worst, 1e-5);
}

}  // namespace

// data_parallel: the demo's Llama adapters trained on N processes over MPI.
//
//   mpirun -np 2 ./build/examples/data_parallel [--steps N] [--batch B] [--dropout P]
//   mpirun -np 2 ./build/examples/data_parallel --bench-allreduce
//   (as root, or with more ranks than cores, Open MPI wants --allow-run-as-root / --oversubscribe)
//
// Every rank builds the same base (a fixed seed) and adapter (rank 0's,
// broadcast), draws the same global batch of B windows of the legal corpus,
// and trains on its own slice of them (B / N windows, the remainder to the
// first ranks); DataParallel averages the gradients over all ranks' tokens in
// one allreduce, the global norm is clipped, and every rank takes the same
// AdamW step. Dropout masks differ per rank (Model::set_dropout_rank). It
// prints the loss, tokens/s per process and in total, the bytes one step
// sends against what full fine-tuning would send, and checks at the end that
// every rank holds the same adapter bit for bit (exit 1 otherwise).
//
// --bench-allreduce times DataParallel's one allreduce for the demo's adapter
// and for a Llama-2-7B-shaped adapter set (32 layers, d 4096, intermediate
// 11008, r 16 on q, k, v, o, gate, up, down: 40.0M parameters, 160 MB in float).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <lora/dist/data_parallel.hpp>
#include <lora/dist/mpi.hpp>
#include <lora/model.hpp>
#include <string>
#include <vector>

#include "demo/model.hpp"
#include "demo/text.hpp"
#include "demo/training.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct Options {
  int steps = 60;
  int batch = 16;  // windows per step, over all ranks
  double dropout = 0.0;
  bool bench_allreduce = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] {
      LORA_CHECK(i + 1 < argc, a << " needs a value");
      return std::atof(argv[++i]);
    };
    if (a == "--steps") {
      o.steps = static_cast<int>(value());
    } else if (a == "--batch") {
      o.batch = static_cast<int>(value());
    } else if (a == "--dropout") {
      o.dropout = value();
    } else if (a == "--bench-allreduce") {
      o.bench_allreduce = true;
    } else {
      LORA_CHECK(false, "unknown argument " << a
                                            << "; usage: data_parallel [--steps N] [--batch B] [--dropout P] "
                                               "[--bench-allreduce]");
    }
  }
  LORA_CHECK(o.steps >= 1 && o.batch >= 1, "--steps and --batch must be >= 1");
  return o;
}

// The demo's model at its default size.
demo::ModelConfig model_config(int vocab) {
  demo::ModelConfig c;
  c.vocab = vocab;
  return c;
}

lora::io::PeftConfig adapter_config(double dropout) {
  lora::io::PeftConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.lora_dropout = dropout;
  c.target_modules = {"o_proj", "down_proj", "lm_head"};  // the demo's
  return c;
}

// Mean seconds of one allreduce of `elements` floats (after 2 untimed), and the slowest rank's.
double time_allreduce(lora::dist::Communicator& comm, std::size_t elements, int repeats) {
  std::vector<float> bucket(elements, 1.0f);
  for (int k = 0; k < 2; ++k) comm.allreduce_sum(bucket.data(), bucket.size());
  comm.barrier();
  const auto start = Clock::now();
  for (int k = 0; k < repeats; ++k) comm.allreduce_sum(bucket.data(), bucket.size());
  double t = seconds_since(start) / repeats;
  std::vector<double> all(static_cast<std::size_t>(comm.size()), 0.0);
  all[static_cast<std::size_t>(comm.rank())] = t;
  comm.allreduce_sum(all.data(), all.size());
  return *std::max_element(all.begin(), all.end());
}

int bench_allreduce(lora::dist::Communicator& comm, int vocab) {
  lora::cpu::Context ctx;
  demo::LlamaLM<float> net(ctx, model_config(vocab), 1);
  net.lora().add_adapter("default", adapter_config(0.0), 100);
  lora::dist::DataParallel<float> dp(ctx, comm, net.lora().parameters());
  // Llama-2-7B: 32 layers, hidden 4096, intermediate 11008, 32 heads (no GQA), vocab 32000.
  const std::int64_t d = 4096, f = 11008, layers = 32, r = 16;
  const std::int64_t adapter7b = layers * r * (4 * (d + d) + 2 * (d + f) + (f + d));
  const std::int64_t model7b = layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * 32000 * d + d;
  struct Case {
    const char* name;
    std::size_t elements;
    std::int64_t full_model;
    int repeats;
  } cases[] = {{"demo adapter (r 4, o/down/lm_head)", dp.bucket_elements(), net.parameter_count(), 200},
               {"Llama-2-7B shape, r 16 on q,k,v,o,gate,up,down", static_cast<std::size_t>(adapter7b) + 1, model7b, 5}};
  // Mpi's default sum (reduce to rank 0 + broadcast: the same bits on every
  // rank) and MPI_Allreduce (identical_sums = false).
  lora::dist::Mpi plain(MPI_COMM_WORLD, /*identical_sums=*/false);
  if (comm.rank() == 0)
    std::printf("allreduce of DataParallel's one bucket (float), %s:\n  %-48s %12s %14s %14s %14s %8s\n",
                comm.describe().c_str(), "adapter", "bytes", "reduce+bcast", "MPI_Allreduce", "full FT bytes",
                "ratio");
  for (const Case& c : cases) {
    const double t = time_allreduce(comm, c.elements, c.repeats), t_plain = time_allreduce(plain, c.elements, c.repeats);
    const double bytes = static_cast<double>(c.elements) * sizeof(float), full = static_cast<double>(c.full_model) * 4;
    if (comm.rank() == 0)
      std::printf("  %-48s %12.0f %11.3f ms %11.3f ms %14.3g %7.0fx\n", c.name, bytes, 1e3 * t, 1e3 * t_plain, full,
                  full / bytes);
  }
  return 0;
}

int train(lora::dist::Communicator& comm, const Options& o) {
  const int rank = comm.rank(), size = comm.size();
  // The demo's corpora, generated the same on every rank.
  const std::string general = demo::general_text(60'000, 2024), legal = demo::legal_text(100'000, 2024);
  const demo::Vocab vocab({&general, &legal});
  const std::vector<int> tokens = vocab.encode(legal);

  lora::cpu::Context ctx;
  demo::LlamaLM<float> net(ctx, model_config(vocab.size() + 1), /*seed=*/1);  // every rank: the same base
  auto& model = net.lora();
  model.set_dropout_rank(static_cast<std::uint32_t>(rank));
  model.add_adapter("legal", adapter_config(o.dropout), /*seed=*/100);
  lora::dist::DataParallel<float> dp(ctx, comm, model.parameters());
  dp.broadcast_parameters();  // rank 0's A and B everywhere
  lora::cpu::Adam<float> adam(ctx, lora::AdamOptions::adamw(1e-2, 0.0));
  adam.add_group(model.parameters());

  // This rank's windows of each global batch: [first, first + mine).
  const int t = net.config().context;
  const int mine = o.batch / size + (rank < o.batch % size ? 1 : 0);
  const int first = rank * (o.batch / size) + std::min(rank, o.batch % size);
  LORA_CHECK(mine >= 1, "--batch " << o.batch << " gives rank " << rank << " no window; use --batch >= " << size);
  if (rank == 0)
    std::printf("data_parallel: %s; the demo's Llama (%lld parameters), adapter %lld parameters on o_proj, down_proj, "
                "lm_head;\n  %d windows of %d characters per step over all ranks, %d steps, dropout %.2f\n",
                comm.describe().c_str(), static_cast<long long>(net.parameter_count()),
                static_cast<long long>(model.trainable_parameters("legal")), o.batch, t, o.steps, o.dropout);

  demo::Rng rng(2024, 300);  // the same draws on every rank
  std::vector<int> inputs, targets;
  double compute = 0.0, communicate = 0.0, loss_sum = 0.0;
  bool identical = true;
  const auto start = Clock::now();
  for (int step = 1; step <= o.steps; ++step) {
    demo::sample_windows(tokens, o.batch, t, rng, inputs, targets);
    auto t0 = Clock::now();
    const std::size_t offset = static_cast<std::size_t>(first) * t;
    net.forward(inputs.data() + offset, mine, t, lora::Mode::train);
    const double local_loss = net.backward(targets.data() + offset);
    compute += seconds_since(t0);
    t0 = Clock::now();
    dp.allreduce_gradients(static_cast<double>(mine) * t);
    double loss = local_loss * mine * t;  // the global batch's mean loss, for the log
    comm.allreduce_sum(&loss, 1);
    loss /= static_cast<double>(o.batch) * t;
    communicate += seconds_since(t0);
    adam.clip_grad_norm(1.0);  // every rank holds the averaged gradient: the global norm
    adam.step();
    loss_sum += loss;
    if (rank == 0 && (step == 1 || step % std::max(1, o.steps / 6) == 0 || step == o.steps))
      std::printf("  step %4d  loss %.4f\n", step, loss);
  }
  const double wall = seconds_since(start);
  identical = dp.parameters_identical();

  // Each rank's tokens/s, gathered by a sum over one-hot slots.
  std::vector<double> rates(static_cast<std::size_t>(size), 0.0);
  rates[static_cast<std::size_t>(rank)] = static_cast<double>(mine) * t * o.steps / wall;
  comm.allreduce_sum(rates.data(), rates.size());
  if (rank == 0) {
    double total = 0.0;
    std::printf("tokens/s per process:");
    for (int r = 0; r < size; ++r) {
      std::printf(" %.0f", rates[static_cast<std::size_t>(r)]);
      total += rates[static_cast<std::size_t>(r)];
    }
    const double lora_bytes = static_cast<double>(dp.bucket_bytes()),
                 full_bytes = static_cast<double>(net.parameter_count()) * sizeof(float);
    std::printf("; total %.0f tokens/s (%.1f ms/step: %.1f compute, %.2f allreduce on rank 0)\n", total,
                1e3 * wall / o.steps, 1e3 * compute / o.steps, 1e3 * communicate / o.steps);
    std::printf("bytes summed per step: %.0f (LoRA: A and B gradients + the token count), full fine-tuning would "
                "send %.0f (%.0fx more)\n",
                lora_bytes, full_bytes, full_bytes / lora_bytes);
    std::printf("adapters on all %d ranks bit-identical after %d steps: %s\n", size, o.steps,
                identical ? "yes" : "NO");
  }
  return identical ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  lora::dist::MpiSession session(&argc, &argv);
  try {
    lora::dist::Mpi comm;
    const Options options = parse(argc, argv);
    if (options.bench_allreduce) return bench_allreduce(comm, 79);
    return train(comm, options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "data_parallel: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);  // the other ranks may be waiting in a collective
    return 2;
  }
}

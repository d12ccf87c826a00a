// domain_adaptation: one small language model adapted to two domains with
// LoRA, and every claim of LoRA measured in the same run.
//
//   1. Data        three corpora from fixed-seed grammars (general prose, legal
//                  contracts, clinical notes), or your own files
//   2. Base model  a character-level Llama whose linear layers are the
//                  frozen bases of a lora::Model (by module name), pretrained on
//                  the general corpus (cached on disk as safetensors, so the
//                  second run skips this step)
//   3. Adapters    one r = 8 adapter per domain, attached by a PEFT LoraConfig,
//                  trained with the base frozen, saved as a PEFT directory
//   4. Full FT     a copy of the base fine-tuned on the first domain, same steps,
//                  optimizer and schedule, for comparison; and QLoRA: the first
//                  adapter trained again on an NF4 (4-bit) copy of the base
//   5. Table       trainable parameters, optimizer state, memory, time per step,
//                  in-domain and general validation loss before and after
//   6. Load        the PEFT directories back onto the one base, compared bit for bit
//   7. Samples     text from the base and from base + each adapter, side by side
//   8. Merge       the first adapter merged into W: outputs equal the unmerged ones
//
// It exits non-zero unless each adapter cuts its in-domain validation loss by
// at least 30 % (the QLoRA one too, ending within 5 % of the dense-base
// adapter's loss), the base's general loss with the adapters detached is
// bit-identical to before, merged and unmerged outputs agree within 1e-5, and
// the saved adapters load back equal.
//
//   domain_adaptation [--small] [--quiet] [--out DIR] [--retrain] [--threads N]
//                     [--steps-scale X] [--base FILE] [--domain NAME=FILE]...
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <lora/model.hpp>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "demo/export.hpp"
#include "demo/model.hpp"
#include "demo/text.hpp"
#include "demo/training.hpp"

namespace {

namespace fs = std::filesystem;
using Network = demo::LlamaLM<float>;
using Nf4Network = demo::LlamaLM<float, lora::cpu::Nf4Base<float>>;  // QLoRA: the linear layers' W in NF4
using Matrix = lora::cpu::Matrix<float>;

constexpr std::uint64_t kDataSeed = 2024;  // the generated corpora and the training batches

// ---- options and sizes ----------------------------------------------------------

struct Options {
  bool help = false;
  bool small = false;
  bool quiet = false;
  bool retrain = false;
  std::string llama_runtime;  // node-llama-cpp's directory: run the exported files in llama.cpp
  int threads = 1;
  double steps_scale = 1.0;
  std::string out_dir;
  std::string base_file;
  std::vector<std::pair<std::string, std::string>> domain_files;  // name, path
};

const char* const kUsage =
    "usage: domain_adaptation [--small] [--quiet] [--out DIR] [--retrain] [--threads N]\n"
    "                         [--steps-scale X] [--base FILE] [--domain NAME=FILE]... [--llama-runtime DIR]\n"
    "  --small           a reduced model and fewer steps (a few seconds; what the test runs)\n"
    "  --quiet           no progress lines\n"
    "  --out DIR         where the base cache, adapters, CSV and chart data go\n"
    "                    (default: domain_adaptation_out beside the executable)\n"
    "  --retrain         pretrain the base even when a cached one matches\n"
    "  --threads N       CPU threads for the GEMMs (default 1: the model is too small to gain from more)\n"
    "  --steps-scale X   multiply every phase's number of steps by X\n"
    "  --base FILE       pretrain on this text instead of the generated general prose\n"
    "  --domain NAME=FILE  adapt to this text (repeatable; replaces the legal and clinical corpora)\n"
    "  --llama-runtime DIR  run the exported GGUF files in llama.cpp (node-llama-cpp, installed there by\n"
    "                    scripts/install-llama-runtime.sh DIR; default: $LORA_LLAMA_RUNTIME) and compare\n";

[[noreturn]] void usage_error(const std::string& message) { throw std::invalid_argument(message + "\n" + kUsage); }

Options parse_options(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) usage_error(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--small") {
      o.small = true;
    } else if (a == "--quiet") {
      o.quiet = true;
    } else if (a == "--retrain") {
      o.retrain = true;
    } else if (a == "--llama-runtime") {
      o.llama_runtime = value(i);
    } else if (a == "--out") {
      o.out_dir = value(i);
    } else if (a == "--threads") {
      o.threads = std::atoi(value(i).c_str());
      if (o.threads < 1) usage_error("--threads: expected an integer >= 1");
    } else if (a == "--steps-scale") {
      o.steps_scale = std::atof(value(i).c_str());
      if (!(o.steps_scale > 0.0 && o.steps_scale <= 100.0)) usage_error("--steps-scale: expected a number in (0, 100]");
    } else if (a == "--base") {
      o.base_file = value(i);
    } else if (a == "--domain") {
      const std::string v = value(i);
      const std::size_t eq = v.find('=');
      const std::string name = v.substr(0, std::min(eq, v.size()));
      const bool name_ok = !name.empty() && name.find_first_not_of(
                                                "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                "0123456789_-") == std::string::npos;
      if (eq == std::string::npos || !name_ok || eq + 1 == v.size())
        usage_error("--domain " + v +
                    ": expected NAME=FILE, NAME of letters, digits, '_' or '-' (it names a directory)");
      o.domain_files.emplace_back(name, v.substr(eq + 1));
    } else if (a == "--help" || a == "-h") {
      o.help = true;
    } else {
      usage_error("unknown argument " + a);
    }
  }
  if (o.llama_runtime.empty() && std::getenv("LORA_LLAMA_RUNTIME")) o.llama_runtime = std::getenv("LORA_LLAMA_RUNTIME");
  if (o.out_dir.empty()) o.out_dir = (fs::path(argv[0]).parent_path() / "domain_adaptation_out").string();
  return o;
}

// Everything that sets the size of the run.
struct Sizes {
  demo::ModelConfig model;
  std::size_t general_chars, domain_chars;  // generated corpus sizes
  int batch;
  int pretrain_steps, finetune_steps;
  double pretrain_lr, finetune_lr;
  int curve_windows;  // validation windows per curve point (the table uses all)
  int sample_chars;
  double temperature;  // for the samples
};

Sizes make_sizes(const Options& o) {
  Sizes s;
  if (o.small) {
    s.model.d_model = 32;
    s.model.heads = 2;
    s.model.kv_heads = 1;
    s.model.d_ff = 96;
    s.model.layers = 1;
    s.model.context = 32;
    s.general_chars = 60'000;
    s.domain_chars = 24'000;
    s.batch = 8;
    s.pretrain_steps = 800;
    s.finetune_steps = 400;
    s.curve_windows = 32;
    s.sample_chars = 120;
  } else {
    s.model.d_model = 128;
    s.model.heads = 4;
    s.model.kv_heads = 2;
    s.model.d_ff = 352;
    s.model.layers = 2;
    s.model.context = 64;
    s.general_chars = 300'000;
    s.domain_chars = 100'000;
    s.batch = 8;
    s.pretrain_steps = 2000;
    s.finetune_steps = 400;
    s.curve_windows = 64;
    s.sample_chars = 240;
  }
  s.pretrain_lr = 1e-2;
  s.finetune_lr = 1e-2;  // the adapters and full fine-tuning alike
  s.temperature = 0.3;
  s.pretrain_steps = std::max(1, static_cast<int>(std::lround(s.pretrain_steps * o.steps_scale)));
  s.finetune_steps = std::max(1, static_cast<int>(std::lround(s.finetune_steps * o.steps_scale)));
  return s;
}

// ---- small helpers ---------------------------------------------------------------

// 64-bit FNV-1a, to name the base cache after everything it depends on.
std::uint64_t fnv1a(const std::string& bytes, std::uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string with_commas(std::int64_t n) {
  std::string digits = std::to_string(n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string human_bytes(std::size_t bytes) {
  char buf[32];
  if (bytes < 1024) {
    std::snprintf(buf, sizeof buf, "%zu B", bytes);
  } else if (bytes < 1024 * 1024) {
    std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / (1024.0 * 1024.0));
  }
  return buf;
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

bool same_matrix(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

bool same_tensors(const std::vector<Matrix>& a, const std::vector<Matrix>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same_matrix(a[i], b[i])) return false;
  return true;
}

void set_threads(int threads) {
  Eigen::setNbThreads(threads);
#if defined(LORA_HAS_CBLAS) && defined(OPENBLAS_VERSION)
  openblas_set_num_threads(threads);
#endif
}

// ---- the base model's cache (safetensors) -------------------------------------------

void save_base(const Network& model, const std::string& path, const std::string& key) {
  lora::io::SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.set_metadata("demo_cache_key", key);
  for (std::size_t i = 0; i < model.tensors().size(); ++i) writer.add(model.specs()[i].name, model.tensors()[i].view());
  writer.write(path);
}

// The cached tensors, or an empty vector when the file is absent or was made
// for other data, sizes or settings.
std::vector<Matrix> load_base(const demo::ModelConfig& config, const std::string& path, const std::string& key) {
  if (!fs::exists(path)) return {};
  const auto reader = lora::io::SafetensorsReader::open(path);
  const auto found = reader.metadata().find("demo_cache_key");
  if (found == reader.metadata().end() || found->second != key) return {};
  std::vector<Matrix> tensors;
  for (const auto& spec : Network::layout(config)) {
    Matrix m(spec.rows, spec.cols);
    reader.read_into(spec.name, m.view());
    tensors.push_back(std::move(m));
  }
  return tensors;
}

// ---- generation --------------------------------------------------------------------

// `chars` characters after `prompt`, sampled at temperature `temperature` from
// the network with its active adapters, random draws from (seed, 7).
std::string sample(Network& model, const demo::Vocab& vocab, const std::string& prompt, int chars, double temperature,
                   std::uint64_t seed) {
  demo::Rng rng(seed, 7);
  std::vector<int> tokens = vocab.encode(prompt);
  std::string out;
  const int context = model.config().context;
  for (int n = 0; n < chars; ++n) {
    const int t = std::min<int>(context, static_cast<int>(tokens.size()));
    model.forward(tokens.data() + tokens.size() - static_cast<std::size_t>(t), 1, t, lora::Mode::eval);
    const auto logits = model.logits();
    const std::int64_t last = t - 1;
    float max = logits(last, 0);
    for (std::int64_t j = 1; j < logits.cols; ++j) max = std::max(max, logits(last, j));
    std::vector<double> p(static_cast<std::size_t>(logits.cols));
    double sum = 0.0;
    for (std::int64_t j = 0; j < logits.cols; ++j)
      sum += p[static_cast<std::size_t>(j)] = std::exp((logits(last, j) - max) / temperature);
    double u = rng.uniform() * sum;
    int next = static_cast<int>(logits.cols) - 1;
    for (std::int64_t j = 0; j < logits.cols; ++j) {
      u -= p[static_cast<std::size_t>(j)];
      if (u < 0) {
        next = static_cast<int>(j);
        break;
      }
    }
    if (next == vocab.end_of_text()) break;
    tokens.push_back(next);
    out += vocab.decode(next);
  }
  return out;
}

// Columns of text printed side by side, each wrapped at `width`.
void print_columns(const std::vector<std::string>& titles, const std::vector<std::string>& texts, std::size_t width) {
  std::vector<std::vector<std::string>> columns;
  for (const std::string& text : texts) {
    std::vector<std::string> lines(1);
    for (char c : text) {
      if (c == '\n') {
        lines.emplace_back();
        continue;
      }
      if (lines.back().size() == width) lines.emplace_back();
      lines.back() += (c == '\t' || c == '\r') ? ' ' : c;
    }
    columns.push_back(std::move(lines));
  }
  std::size_t rows = 0;
  for (const auto& c : columns) rows = std::max(rows, c.size());
  auto row = [&](auto cell) {
    std::string line = "    ";
    for (std::size_t k = 0; k < columns.size(); ++k) {
      std::string s = cell(k);
      s.resize(width, ' ');
      line += s + (k + 1 < columns.size() ? " | " : "");
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::printf("%s\n", line.c_str());
  };
  row([&](std::size_t k) { return titles[k]; });
  row([&](std::size_t) { return std::string(width, '-'); });
  for (std::size_t r = 0; r < rows; ++r)
    row([&](std::size_t k) { return r < columns[k].size() ? columns[k][r] : std::string(); });
}

// A loss curve as CSV: phase,step,train_loss,val_loss,general_val_loss with
// an empty field where a loss was not measured.
void write_curve(const std::string& path, const std::vector<demo::CurvePoint>& curve) {
  std::ofstream csv(path);
  LORA_CHECK(csv.is_open(), "cannot write " << path);
  auto field = [](double v) {
    char buf[32] = "";
    if (!std::isnan(v)) std::snprintf(buf, sizeof buf, "%.6g", v);
    return std::string(buf);
  };
  csv << "phase,step,train_loss,val_loss,general_val_loss\n";
  for (const auto& p : curve)
    csv << p.phase << ',' << p.step << ',' << field(p.train_loss) << ',' << field(p.val_loss) << ','
        << field(p.general_loss) << '\n';
  LORA_CHECK(csv.good(), "writing " << path << " failed");
}

// ---- training --------------------------------------------------------------------

// Gradient buffers for every tensor of a network (pretraining, full
// fine-tuning) and the lora::Parameter list that hands each tensor and its
// gradient to Adam.
struct FullGradients {
  std::vector<Matrix> grads;
  std::vector<lora::Parameter<float>> params;

  explicit FullGradients(Network& net) {
    for (const Matrix& w : net.tensors()) grads.emplace_back(w.rows(), w.cols());
    for (std::size_t i = 0; i < grads.size(); ++i)
      params.push_back({net.tensors()[i].view(), grads[i].view(), net.specs()[i].name});
  }
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const Matrix& g : grads) n += g.bytes();
    return n;
  }
};

// Every phase's learning rate: a linear warmup over the first 5 % of its
// steps, then half a cosine down to 10 % of the base rate (transformers'
// cosine_with_min_lr).
lora::LrSchedule schedule_for(int steps) {
  lora::LrSchedule schedule;
  schedule.type = lora::LrScheduleType::cosine_with_min_lr;
  schedule.warmup_steps = steps / 20;
  schedule.total_steps = steps;
  schedule.min_lr_rate = 0.1;
  return schedule;
}

// One optimizer step of a phase: `batch` random windows of `tokens`, forward
// and backward (into the active adapters' dL_dA and dL_dB, or, with `grads`,
// into every tensor of the network), gradients clipped to norm 1, the
// scheduled learning rate, one Adam step. Returns the batch's loss.
template <class Net>
struct TrainingStep {
  Net* net;
  std::vector<Matrix>* grads;  // null: only the active adapters train
  lora::cpu::Adam<float>* adam;
  const lora::LrScheduler* scheduler;
  const std::vector<int>* tokens;
  int batch;
  demo::Rng rng;
  std::vector<int> inputs{}, targets{};

  double operator()(int /*step*/) {
    const int t = net->config().context;
    demo::sample_windows(*tokens, batch, t, rng, inputs, targets);
    net->forward(inputs.data(), batch, t, lora::Mode::train);
    const double loss = net->backward(targets.data(), grads);
    adam->clip_grad_norm(1.0);
    scheduler->apply(*adam);  // the rate of step adam->step_count()
    adam->step();
    return loss;
  }
};

// ---- what the steps share ----------------------------------------------------------------

// One fine-tuning method's results.
struct MethodResult {
  std::string label;
  std::int64_t trainable = 0;
  lora::MemoryReport memory;  // what training holds: weights, gradients, optimizer state, activations
  demo::PhaseStats stats;
  double domain_before = 0, domain_after = 0;
  double general_before = 0, general_after = 0;
  double general_detached = std::nan("");  // LoRA only: the base alone after training
};

// One model (the base, or base + an adapter) run by llama.cpp and by this
// library on the same token ids.
struct LlamaCppCheck {
  std::string label;
  double max_prob_diff = 0;     // max over the vocabulary of |p_llama.cpp - p_lora| after the prompt
  double adapter_effect = 0;    // max |p_base+adapter - p_base| by this library: what the check must see
  int greedy_equal = 0, greedy = 0;  // equal tokens of the greedy continuations, of how many
  bool pass() const { return max_prob_diff < 1e-4 && greedy_equal == greedy; }
};

struct Domain {
  demo::Corpus corpus;
  std::vector<int> train, val;
  double loss_before = 0.0;          // the base's validation loss on it
  std::string adapter_dir;           // its adapter, saved as a PEFT directory
  lora::io::Adapter saved;           // what was saved (a host copy), to compare the reload with
  double general_curve_trained = 0;  // general loss on the curve windows with its adapter, as trained
};

struct Run {
  Options options;
  Sizes sizes;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  lora::cpu::Context ctx;
  // 1. Data
  demo::Corpus general;
  std::vector<Domain> domains;
  std::unique_ptr<demo::Vocab> vocab;
  std::vector<int> general_train, general_val;
  // 2. Base model
  std::unique_ptr<Network> net;
  bool from_cache = false;
  std::string key;                      // the cache's name: everything the base depends on
  std::vector<Matrix> base_snapshot;    // the base's tensors after pretraining
  double general_before = 0, general_curve_before = 0;
  // 3-8. Results
  std::vector<demo::CurvePoint> curve;
  std::vector<MethodResult> results;  // full fine-tuning first, then one per adapter
  std::optional<MethodResult> qlora;  // the first adapter on an NF4 copy of the base
  double qlora_quant_error = 0, qlora_delta = 0;  // ||W - dequant(W)|| and the dense adapter's ||s B A||, all layers
  double general_detached = 0, general_curve_detached = 0;
  bool base_untouched = false, reload_equal = true;
  double merge_error = 0;
  // 9-10. The files for other engines, and llama.cpp's verdict on them
  std::string export_dir;               // base.gguf, hf/, one GGUF per adapter
  std::vector<LlamaCppCheck> llama_cpp;  // empty: the check did not run
  std::string llama_cpp_skipped;        // why not

  explicit Run(const Options& o) : options(o), sizes(make_sizes(o)) {}
  int batch() const { return sizes.batch; }
  int context() const { return net->config().context; }
  std::int64_t tokens_per_step() const { return static_cast<std::int64_t>(batch()) * context(); }
  double evaluate(const std::vector<int>& tokens, bool curve_windows = false) {
    return demo::evaluate(*net, tokens, batch(), context(),
                          curve_windows ? static_cast<std::size_t>(sizes.curve_windows) : static_cast<std::size_t>(-1));
  }
};

// Which adapter the network applies: one by name, or none ("": the base alone).
void use_adapter(Network& net, const std::string& name) {
  if (name.empty()) {
    net.lora().set_adapter(std::vector<lora::WeightedAdapter>{});
  } else {
    net.lora().set_adapter(name);
  }
}

bool same_adapter(const lora::io::Adapter& a, const lora::io::Adapter& b) {
  if (a.modules.size() != b.modules.size()) return false;
  for (const auto& [name, m] : a.modules) {
    const auto found = b.modules.find(name);
    if (found == b.modules.end() || !same_matrix(m.A, found->second.A) || !same_matrix(m.B, found->second.B) ||
        m.scale != found->second.scale)
      return false;
  }
  return true;
}

// ---- the steps ------------------------------------------------------------------------

// 1. Three corpora (or the user's files) and their character vocabulary.
void make_data(Run& r) {
  const Options& o = r.options;
  const std::size_t min_val_chars = static_cast<std::size_t>(4 * (r.sizes.model.context + 1));
  const std::string general_text =
      o.base_file.empty() ? demo::general_text(r.sizes.general_chars, kDataSeed) : demo::read_file(o.base_file);
  r.general = demo::split_corpus("general", general_text, 0.1, min_val_chars);
  if (o.domain_files.empty()) {
    r.domains.push_back(
        {demo::split_corpus("legal", demo::legal_text(r.sizes.domain_chars, kDataSeed), 0.1, min_val_chars)});
    r.domains.push_back(
        {demo::split_corpus("clinical", demo::clinical_text(r.sizes.domain_chars, kDataSeed), 0.1, min_val_chars)});
  } else {
    for (const auto& [name, path] : o.domain_files)
      r.domains.push_back({demo::split_corpus(name, demo::read_file(path), 0.1, min_val_chars)});
  }
  std::vector<const std::string*> all_text = {&r.general.train, &r.general.val};
  for (const Domain& d : r.domains) {
    all_text.push_back(&d.corpus.train);
    all_text.push_back(&d.corpus.val);
  }
  r.vocab = std::make_unique<demo::Vocab>(all_text);
  r.general_train = r.vocab->encode(r.general.train);
  r.general_val = r.vocab->encode(r.general.val);
  for (Domain& d : r.domains) {
    d.train = r.vocab->encode(d.corpus.train);
    d.val = r.vocab->encode(d.corpus.val);
  }
  std::printf("1. Data: %zu corpora, %d-symbol character vocabulary\n", r.domains.size() + 1, r.vocab->size());
  auto describe = [](const demo::Corpus& c, const char* role) {
    const std::string first = c.train.substr(0, std::min<std::size_t>(c.train.find('\n'), 70));
    std::printf("   %-9s %-16s %8s train + %7s val chars   \"%s...\"\n", c.name.c_str(), role,
                with_commas(static_cast<std::int64_t>(c.train.size())).c_str(),
                with_commas(static_cast<std::int64_t>(c.val.size())).c_str(), first.c_str());
  };
  describe(r.general, "(pretraining)");
  for (const Domain& d : r.domains) describe(d.corpus, "(adaptation)");
}

// 2. The base: loaded from the cache, or pretrained on the general corpus
// (every tensor trained) and cached; then its validation losses.
void make_base(Run& r) {
  demo::ModelConfig config = r.sizes.model;
  config.vocab = r.vocab->size() + 1;  // the characters and end_of_text()
  // The cache is named after everything the pretrained tensors depend on
  // (bump "v2" when the code changes what a step computes).
  std::ostringstream key_text;
  key_text << "v3 llama vocab=" << r.vocab->chars() << " d=" << config.d_model << " h=" << config.heads
           << " kv=" << config.kv_heads << " ff=" << config.d_ff << " l=" << config.layers << " ctx=" << config.context << " batch=" << r.batch()
           << " steps=" << r.sizes.pretrain_steps << " lr=" << r.sizes.pretrain_lr
           << " text=" << fnv1a(r.general.train);
  char key[17];
  std::snprintf(key, sizeof key, "%016" PRIx64, fnv1a(key_text.str()));
  r.key = key;
  const std::string cache_path = (fs::path(r.options.out_dir) / ("base_" + r.key + ".safetensors")).string();
  std::vector<Matrix> cached = r.options.retrain ? std::vector<Matrix>() : load_base(config, cache_path, r.key);
  r.from_cache = !cached.empty();
  r.net = r.from_cache ? std::make_unique<Network>(r.ctx, config, std::move(cached))
                       : std::make_unique<Network>(r.ctx, config, /*seed=*/1);
  std::printf(
      "\n2. Base model: a %d-block Llama (RMSNorm, RoPE, grouped-query attention with %d heads on %d key/value "
      "heads, SwiGLU MLP),\n   hidden size %d, intermediate size %d, context %d, %s parameters; its %zu linear "
      "layers are the frozen bases of a lora::Model\n",
      config.layers, config.heads, config.kv_heads, config.d_model, config.d_ff, config.context,
      with_commas(r.net->parameter_count()).c_str(), r.net->lora().modules().size());
  if (r.from_cache) {
    std::printf("   loaded the pretrained base from %s (cached; --retrain to pretrain again)\n", cache_path.c_str());
  } else {
    std::printf("   pretraining on the general corpus: %d steps of %d x %d characters, Adam lr %.0e\n",
                r.sizes.pretrain_steps, r.batch(), r.context(), r.sizes.pretrain_lr);
    FullGradients gradients(*r.net);
    lora::cpu::Adam<float> adam(r.ctx, lora::AdamOptions::adamw(r.sizes.pretrain_lr, 0.01));
    adam.add_group(gradients.params);
    const lora::LrScheduler scheduler(schedule_for(r.sizes.pretrain_steps), adam);
    std::vector<demo::CurvePoint> pretrain_curve;
    const demo::PhaseStats stats = demo::run_phase(
        "pretrain", r.sizes.pretrain_steps, r.tokens_per_step(), r.options.quiet,
        TrainingStep<Network>{r.net.get(), &gradients.grads, &adam, &scheduler, &r.general_train, r.batch(),
                              demo::Rng(kDataSeed, 100)},
        [&] {
          const double g = r.evaluate(r.general_val, true);
          return std::make_pair(g, g);
        },
        pretrain_curve);
    save_base(*r.net, cache_path, r.key);
    write_curve((fs::path(r.options.out_dir) / "pretrain_loss.csv").string(), pretrain_curve);
    std::printf("   pretrained in %.1f s (%.1f ms/step, %.1fk tokens/s); cached to %s\n", stats.train_seconds,
                stats.ms_per_step(), stats.tokens_per_second() / 1e3, cache_path.c_str());
  }
  r.base_snapshot = r.net->clone_tensors();
  r.general_before = r.evaluate(r.general_val);
  r.general_curve_before = r.evaluate(r.general_val, true);
  std::printf("   base validation loss (nats/char): general %.4f", r.general_before);
  for (Domain& d : r.domains) {
    d.loss_before = r.evaluate(d.val);
    std::printf(", %s %.4f", d.corpus.name.c_str(), d.loss_before);
  }
  std::printf("\n");
}

// 3. One domain's adapter: attached by `config`, trained with the base
// frozen, measured, saved as a PEFT directory, and removed (the next one
// trains alone; step 6 loads them back).
void train_adapter(Run& r, const lora::io::PeftConfig& config, std::size_t i) {
  Domain& d = r.domains[i];
  const std::string& name = d.corpus.name;
  lora::cpu::Model<float>& model = r.net->lora();
  model.add_adapter(name, config, /*seed=*/100 + i);  // A random, B = 0: the network is still the base
  model.set_adapter(name);
  lora::cpu::Adam<float> adam(r.ctx, lora::AdamOptions::adamw(r.sizes.finetune_lr, 0.0));
  adam.add_group(model.parameters());  // the active adapter's A and B on every layer
  const lora::LrScheduler scheduler(schedule_for(r.sizes.finetune_steps), adam);

  MethodResult result;
  result.label = "LoRA " + name;
  result.stats = demo::run_phase(
      "lora_" + name, r.sizes.finetune_steps, r.tokens_per_step(), r.options.quiet,
      TrainingStep<Network>{r.net.get(), nullptr, &adam, &scheduler, &d.train, r.batch(),
                   demo::Rng(kDataSeed, 200 + static_cast<std::uint32_t>(i))},
      [&] { return std::make_pair(r.evaluate(d.val, true), r.evaluate(r.general_val, true)); }, r.curve);
  // Memory while training: the model's report (the linear layers' W, the
  // adapter's A, B and gradients, Adam's moments), with the whole frozen base
  // (embeddings and norms too) and the network's activations (the adapters'
  // x A^T among them).
  result.memory = model.memory(adam);
  result.memory.frozen_bytes = r.net->parameter_bytes();
  result.memory.activation_bytes += r.net->activation_bytes();
  result.trainable = model.trainable_parameters(name);
  result.domain_before = d.loss_before;
  result.domain_after = r.evaluate(d.val);
  result.general_before = r.general_before;
  result.general_after = r.evaluate(r.general_val);
  r.results.push_back(result);

  d.adapter_dir = (fs::path(r.options.out_dir) / "adapters" / name).string();
  model.save_peft(name, d.adapter_dir);  // adapter_config.json + adapter_model.safetensors
  d.saved = model.to_peft(name);
  d.general_curve_trained = r.evaluate(r.general_val, true);
  model.delete_adapter(name);
}

// 3. After the adapters: no adapter left, the base alone must be the base
// as before training, bit for bit (W was never written).
void measure_detached_base(Run& r) {
  r.general_detached = r.evaluate(r.general_val);
  r.general_curve_detached = r.evaluate(r.general_val, true);
  r.base_untouched = same_tensors(r.net->tensors(), r.base_snapshot);
  for (MethodResult& m : r.results) m.general_detached = r.general_detached;
}

// 4. Full fine-tuning of a copy of the base on the first domain: the same
// steps, batches, optimizer and schedule, every tensor trained.
void full_finetuning(Run& r) {
  const Domain& first = r.domains.front();
  Network full(r.ctx, r.net->config(), r.net->clone_tensors());
  FullGradients gradients(full);
  lora::cpu::Adam<float> adam(r.ctx, lora::AdamOptions::adamw(r.sizes.finetune_lr, 0.0));
  adam.add_group(gradients.params);
  const lora::LrScheduler scheduler(schedule_for(r.sizes.finetune_steps), adam);
  const int batch = r.batch(), t = r.context();
  const std::size_t windows = static_cast<std::size_t>(r.sizes.curve_windows);
  MethodResult result;
  result.label = "full FT " + first.corpus.name;
  result.stats = demo::run_phase(
      "full_" + first.corpus.name, r.sizes.finetune_steps, r.tokens_per_step(), r.options.quiet,
      TrainingStep<Network>{&full, &gradients.grads, &adam, &scheduler, &first.train, batch,
                   demo::Rng(kDataSeed, 200)},  // the batches the first adapter saw
      [&] {
        return std::make_pair(demo::evaluate(full, first.val, batch, t, windows),
                              demo::evaluate(full, r.general_val, batch, t, windows));
      },
      r.curve);
  // Memory while training: every tensor, a gradient for each, the optimizer's
  // moments and the network's activations.
  result.memory.parameter_bytes = full.parameter_bytes();
  result.memory.gradient_bytes = gradients.bytes();
  result.memory.optimizer_bytes = adam.state_bytes();
  result.memory.activation_bytes = full.activation_bytes();
  result.trainable = full.parameter_count();
  result.domain_before = first.loss_before;
  result.domain_after = demo::evaluate(full, first.val, batch, t);
  result.general_before = r.general_before;
  result.general_after = demo::evaluate(full, r.general_val, batch, t);
  r.results.insert(r.results.begin(), result);
}

// 4. QLoRA: the first domain's adapter trained again, with the same config,
// seed, batches, optimizer and schedule, on a copy of the base whose linear
// layers hold W in 4 bits (bitsandbytes' NF4, double-quantized; the dense W
// dropped). Also how far NF4 moves W, beside how far the adapter moves it.
void train_qlora(Run& r, const lora::io::PeftConfig& config) {
  const Domain& first = r.domains.front();
  const std::string& name = first.corpus.name;
  Nf4Network net(r.ctx, r.net->config(), r.net->clone_tensors());
  auto& model = net.lora();
  for (const auto& [module, m] : first.saved.modules) {  // the dense-base adapter, as saved
    const auto W = r.net->lora().module(module).W();
    Matrix dequantized(W.rows, W.cols), delta(W.rows, W.cols);
    model.module(module).base().dequantize(dequantized.view());
    lora::cpu::Backend::gemm<float, float>(r.ctx, lora::Op::N, lora::Op::N, m.scale, m.B.view(), m.A.view(), 0.0,
                                           delta.view());
    for (std::int64_t i = 0; i < W.rows; ++i)
      for (std::int64_t j = 0; j < W.cols; ++j) {
        const double e = static_cast<double>(W(i, j)) - dequantized.data()[i * W.cols + j];
        const double d = delta.data()[i * W.cols + j];
        r.qlora_quant_error += e * e;
        r.qlora_delta += d * d;
      }
  }
  r.qlora_quant_error = std::sqrt(r.qlora_quant_error);
  r.qlora_delta = std::sqrt(r.qlora_delta);

  MethodResult result;
  result.label = "QLoRA " + name;
  result.domain_before = demo::evaluate(net, first.val, r.batch(), r.context());
  result.general_before = demo::evaluate(net, r.general_val, r.batch(), r.context());
  model.add_adapter(name, config, /*seed=*/100);  // as the first adapter: same A at init
  lora::cpu::Adam<float> adam(r.ctx, lora::AdamOptions::adamw(r.sizes.finetune_lr, 0.0));
  adam.add_group(model.parameters());
  const lora::LrScheduler scheduler(schedule_for(r.sizes.finetune_steps), adam);
  const std::size_t windows = static_cast<std::size_t>(r.sizes.curve_windows);
  result.stats = demo::run_phase(
      "qlora_" + name, r.sizes.finetune_steps, r.tokens_per_step(), r.options.quiet,
      TrainingStep<Nf4Network>{&net, nullptr, &adam, &scheduler, &first.train, r.batch(),
                               demo::Rng(kDataSeed, 200)},  // the batches the first adapter saw
      [&] {
        return std::make_pair(demo::evaluate(net, first.val, r.batch(), r.context(), windows),
                              demo::evaluate(net, r.general_val, r.batch(), r.context(), windows));
      },
      r.curve);
  result.memory = model.memory(adam);
  result.memory.frozen_bytes = net.parameter_bytes();
  result.memory.activation_bytes += net.activation_bytes();
  result.trainable = model.trainable_parameters(name);
  result.domain_after = demo::evaluate(net, first.val, r.batch(), r.context());
  result.general_after = demo::evaluate(net, r.general_val, r.batch(), r.context());
  r.qlora = result;
  std::printf("   QLoRA: the %s adapter again on an NF4 copy of the base (linear layers %s -> %s); NF4 moves W by "
              "||W - dequant(W)|| = %.3f, the dense-base adapter moves it by ||s B A|| = %.3f (ratio %.2f)\n",
              name.c_str(), human_bytes(r.net->lora().memory().frozen_bytes).c_str(),
              human_bytes(model.memory().frozen_bytes).c_str(), r.qlora_quant_error, r.qlora_delta,
              r.qlora_quant_error / r.qlora_delta);
}

// 5. The table: what each method trains, holds and achieves.
void print_table(const Run& r) {
  std::printf("   %-16s %10s %8s %11s %11s %9s %19s %19s %14s\n", "method", "trainable", "% model", "Adam state",
              "train mem", "ms/step", "in-domain val loss", "general val loss", "general, base");
  std::printf("   %-16s %10s %8s %11s %11s %9s %19s %19s %14s\n", "", "params", "", "", "", "", "before -> after",
              "before -> after", "alone after");
  std::vector<MethodResult> rows = r.results;
  if (r.qlora) rows.push_back(*r.qlora);
  for (const MethodResult& m : rows) {
    char detached[32] = "-";
    if (!std::isnan(m.general_detached)) std::snprintf(detached, sizeof detached, "%.4f", m.general_detached);
    std::printf("   %-16s %10s %7.2f%% %11s %11s %9.1f    %.4f -> %.4f    %.4f -> %.4f %14s\n", m.label.c_str(),
                with_commas(m.trainable).c_str(), 100.0 * m.trainable / r.net->parameter_count(),
                human_bytes(m.memory.optimizer_bytes).c_str(), human_bytes(m.memory.total()).c_str(),
                m.stats.ms_per_step(), m.domain_before, m.domain_after, m.general_before, m.general_after, detached);
  }
  std::printf("\n   train memory = weights + gradients + Adam state + activations (lora::MemoryReport sums):\n");
  for (const MethodResult& m : rows) {
    const lora::MemoryReport& b = m.memory;
    std::printf("   %-16s frozen %10s  trainable %10s  gradients %10s  Adam %10s  activations %10s\n", m.label.c_str(),
                human_bytes(b.frozen_bytes).c_str(), human_bytes(b.parameter_bytes).c_str(),
                human_bytes(b.gradient_bytes).c_str(), human_bytes(b.optimizer_bytes).c_str(),
                human_bytes(b.activation_bytes + b.workspace_bytes).c_str());
  }
  // What grows with the number of trainable parameters: their values, gradients and moments.
  auto scaling = [](const lora::MemoryReport& m) { return m.parameter_bytes + m.gradient_bytes + m.optimizer_bytes; };
  const std::size_t full_bytes = scaling(r.results.front().memory), lora_bytes = scaling(r.results[1].memory);
  std::printf(
      "   trainable + gradients + Adam: %s for full fine-tuning, %s for one adapter (%.1fx less); at this "
      "toy size the activations dominate both\n",
      human_bytes(full_bytes).c_str(), human_bytes(lora_bytes).c_str(),
      static_cast<double>(full_bytes) / static_cast<double>(lora_bytes));
}

// 6. One adapter back from its PEFT directory onto the base, beside the
// others: its A and B must be what was saved, bit for bit, and its outputs
// those of the adapter as trained.
void reload_adapter(Run& r, Domain& d) {
  lora::cpu::Model<float>& model = r.net->lora();
  const std::string& name = d.corpus.name;
  model.load_peft(d.adapter_dir, name);
  model.set_adapter(name);
  const bool equal = same_adapter(model.to_peft(name), d.saved);
  const bool same_loss = same_bits(r.evaluate(r.general_val, true), d.general_curve_trained);
  r.reload_equal = r.reload_equal && equal && same_loss;
  std::printf("   %-9s <- %s  (%zu modules, %s parameters; A and B %s, outputs %s)\n", name.c_str(),
              d.adapter_dir.c_str(), model.adapter_modules(name).size(),
              with_commas(model.trainable_parameters(name)).c_str(), equal ? "bit-identical" : "DIFFER",
              same_loss ? "identical" : "DIFFER");
}

// 7. Text from the base and from each adapter in turn, the same random draws.
void print_samples(Run& r) {
  std::vector<std::string> titles = {"base"}, texts;
  use_adapter(*r.net, "");
  texts.push_back(sample(*r.net, *r.vocab, "\n", r.sizes.sample_chars, r.sizes.temperature, 7));
  for (const std::string& name : r.net->lora().adapters()) {
    use_adapter(*r.net, name);
    titles.push_back("base + " + name);
    texts.push_back(sample(*r.net, *r.vocab, "\n", r.sizes.sample_chars, r.sizes.temperature, 7));
  }
  print_columns(titles, texts, r.options.small ? 30 : 36);
}

// 8. The first adapter merged into W (inference at the base's cost): the
// logits must equal the unmerged adapter's up to rounding. Then unmerged, and
// W restored to the exact base.
void merge_first(Run& r) {
  Network& net = *r.net;
  lora::cpu::Model<float>& model = net.lora();
  const Domain& first = r.domains.front();
  const int t = r.context();
  std::vector<int> probe(first.val.begin(),
                         first.val.begin() + std::min<std::size_t>(first.val.size() - 1,
                                                                   static_cast<std::size_t>(r.batch()) * t));
  const int probe_rows = static_cast<int>(probe.size()) / t;
  probe.resize(static_cast<std::size_t>(probe_rows) * t);

  use_adapter(net, first.corpus.name);
  net.forward(probe.data(), probe_rows, t, lora::Mode::eval);
  Matrix unmerged(net.logits().rows, net.logits().cols);
  lora::cpu::Backend::copy_to_host(r.ctx, net.logits(), unmerged.view());
  const std::string unmerged_text = sample(net, *r.vocab, "\n", 80, r.sizes.temperature, 11);

  model.merge(first.corpus.name);  // W <- W + s B A in every adapted layer
  net.forward(probe.data(), probe_rows, t, lora::Mode::eval);
  double max_diff = 0.0, max_ref = 0.0;
  for (std::int64_t k = 0; k < unmerged.size(); ++k) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(net.logits().data[k] - unmerged.data()[k])));
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(unmerged.data()[k])));
  }
  r.merge_error = max_diff / std::max(max_ref, 1e-30);
  const std::string merged_text = sample(net, *r.vocab, "\n", 80, r.sizes.temperature, 11);
  model.unmerge();  // W <- W - s B A

  double unmerge_residual = 0.0;
  for (std::size_t i = 0; i < r.base_snapshot.size(); ++i)
    for (std::int64_t k = 0; k < r.base_snapshot[i].size(); ++k)
      unmerge_residual = std::max(unmerge_residual, static_cast<double>(std::fabs(net.tensors()[i].data()[k] -
                                                                                    r.base_snapshot[i].data()[k])));
  for (std::size_t i = 0; i < r.base_snapshot.size(); ++i)  // back to the exact base
    std::memcpy(net.tensors()[i].data(), r.base_snapshot[i].data(), r.base_snapshot[i].bytes());
  std::printf(
      "   %s merged into W (W <- W + s B A): logits on %d x %d %s characters differ from the unmerged "
      "adapter's by %.2e (max relative);\n   sampled text %s; after unmerge, max |W - W0| = %.2e (rounding), W then "
      "restored\n",
      first.corpus.name.c_str(), probe_rows, t, first.corpus.name.c_str(), r.merge_error,
      merged_text == unmerged_text ? "identical" : "differs", unmerge_residual);
}

// 9. The base as a llama.cpp model (GGUF) and as a Hugging Face checkpoint;
// each adapter as a llama.cpp LoRA adapter (GGUF), beside its PEFT directory
// from step 3.
void export_files(Run& r) {
  const Network& net = *r.net;
  const demo::ModelConfig& c = net.config();
  r.export_dir = (fs::path(r.options.out_dir) / "llama").string();
  fs::create_directories(r.export_dir);
  std::vector<std::string> names;
  for (const auto& spec : net.specs()) names.push_back(spec.name);
  const demo::GgufVocab vocab = demo::character_vocab(r.vocab->chars());
  demo::write_llama_gguf(c, names, net.tensors(), vocab, "domain_adaptation base " + r.key, r.export_dir + "/base.gguf");
  demo::write_hf_llama(c, names, net.tensors(), vocab, r.export_dir + "/hf");
  std::printf("   in %s/:\n", r.export_dir.c_str());
  std::printf("   %-14s llama.cpp model: %zu tensors (F32), %d tokens (byte-level BPE \"gpt2\": one per character, "
              "</s> for BOS / EOS); q_proj, k_proj rows in llama.cpp's RoPE order\n",
              "base.gguf", names.size(), c.vocab);
  std::printf("   %-14s model.safetensors + config.json (transformers' LlamaForCausalLM)\n", "hf/");
  for (const Domain& d : r.domains) {
    lora::io::GgufAdapterOptions options;
    options.architecture = "llama";
    options.heads = {c.heads, c.kv_heads};  // B's q_proj / k_proj rows permuted as the base's
    options.name = d.corpus.name;
    const std::string path = r.export_dir + "/" + d.corpus.name + ".gguf";
    const lora::io::GgufAdapterReport report = lora::io::save_gguf_adapter(d.saved, path, options);
    std::printf("   %-14s llama.cpp LoRA adapter: %zu modules (%s, ...), alpha %g, %s\n",
                (d.corpus.name + ".gguf").c_str(),
                report.names.size(), report.names.begin()->second.c_str(), report.alpha,
                report.folded.empty() ? "no scale folded into B (every module at alpha / r)"
                                      : "some modules' scale folded into B");
  }
}

// A word for the shell: 'text', each ' written '\''.
std::string shell_word(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

#ifndef LORA_DEMO_LLAMA_EVAL
#define LORA_DEMO_LLAMA_EVAL "scripts/llama-eval.mjs"
#endif

// llama.cpp's next-token probabilities after `tokens` and its greedy
// continuation (scripts/llama-eval.mjs: node-llama-cpp, CPU, F32 KV cache).
std::pair<std::vector<double>, std::vector<int>> run_llama_cpp(const Run& r, const std::string& adapter,
                                                               const std::vector<int>& tokens, int greedy) {
  std::string ids;
  for (int t : tokens) ids += (ids.empty() ? "" : ",") + std::to_string(t);
  std::string command = "node " + shell_word(LORA_DEMO_LLAMA_EVAL) + " --runtime " +
                        shell_word(r.options.llama_runtime) + " --model " + shell_word(r.export_dir + "/base.gguf") +
                        " --tokens " + ids + " --greedy " + std::to_string(greedy);
  if (!adapter.empty()) command += " --lora " + shell_word(adapter) + " --scale 1";
  FILE* pipe = popen(command.c_str(), "r");
  LORA_CHECK(pipe != nullptr, "llama.cpp check: cannot run " << command);
  std::string out;
  char buf[4096];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) out.append(buf, n);
  const int status = pclose(pipe);
  LORA_CHECK(status == 0, "llama.cpp check: `" << command << "` failed (status " << status << ")");
  const nlohmann::json result = nlohmann::json::parse(out);
  return {result.at("probs").get<std::vector<double>>(), result.at("greedy").get<std::vector<int>>()};
}

// This library's next-token probabilities after `tokens` (the network's active
// adapters), in double from the float logits.
std::vector<double> next_token_probs(Network& net, const std::vector<int>& tokens) {
  net.forward(tokens.data(), 1, static_cast<int>(tokens.size()), lora::Mode::eval);
  const auto logits = net.logits();
  const std::int64_t last = logits.rows - 1;
  double max = logits(last, 0), sum = 0.0;
  for (std::int64_t j = 1; j < logits.cols; ++j) max = std::max<double>(max, logits(last, j));
  std::vector<double> p(static_cast<std::size_t>(logits.cols));
  for (std::int64_t j = 0; j < logits.cols; ++j) sum += p[static_cast<std::size_t>(j)] = std::exp(logits(last, j) - max);
  for (double& v : p) v /= sum;
  return p;
}

// The greedy continuation: argmax of each next-token distribution, fed back.
std::vector<int> greedy_tokens(Network& net, std::vector<int> tokens, int n) {
  std::vector<int> out;
  for (int k = 0; k < n; ++k) {
    const std::vector<double> p = next_token_probs(net, tokens);
    out.push_back(static_cast<int>(std::max_element(p.begin(), p.end()) - p.begin()));
    tokens.push_back(out.back());
  }
  return out;
}

// 10. The exported files in the real llama.cpp engine: the base alone and
// with each adapter, on a prompt from the matching validation text. llama.cpp's
// next-token distribution must equal this library's forward within 1e-4 and
// the greedy continuations must be identical.
void check_llama_cpp(Run& r) {
  constexpr int kPrompt = 12, kGreedy = 32;
  const std::string& runtime = r.options.llama_runtime;
  if (runtime.empty() || !fs::exists(fs::path(runtime) / "node_modules" / "node-llama-cpp")) {
    r.llama_cpp_skipped = runtime.empty() ? "no llama.cpp runtime given (--llama-runtime DIR or $LORA_LLAMA_RUNTIME)"
                                          : "no node-llama-cpp under " + runtime;
    std::printf("   skipped: %s; scripts/install-llama-runtime.sh DIR installs one (node >= 20, 85 MB from npm)\n",
                r.llama_cpp_skipped.c_str());
    return;
  }
  auto prompt = [&](const std::vector<int>& text) { return std::vector<int>(text.begin(), text.begin() + kPrompt); };
  auto decode = [&](const std::vector<int>& ids) {
    std::string s;
    for (int id : ids) s += id == r.vocab->end_of_text() ? std::string("</s>") : std::string(1, r.vocab->decode(id));
    for (char& ch : s) ch = ch == '\n' ? '|' : ch;
    return s;
  };
  std::printf("   %d-token prompts from each validation text, %d greedy tokens; node-llama-cpp in %s\n", kPrompt,
              kGreedy, runtime.c_str());
  std::vector<std::pair<std::string, std::vector<int>>> runs = {{"", prompt(r.general_val)}};
  for (const Domain& d : r.domains) runs.emplace_back(d.corpus.name, prompt(d.val));
  nlohmann::json record = nlohmann::json::array();  // for a third opinion (tests/llama_cpp/demo.sh)
  for (const auto& [name, tokens] : runs) {
    LlamaCppCheck check;
    check.label = name.empty() ? "base" : "base + " + name;
    use_adapter(*r.net, name);
    const std::vector<double> ours = next_token_probs(*r.net, tokens);
    const std::vector<int> our_greedy = greedy_tokens(*r.net, tokens, kGreedy);
    const auto [theirs, their_greedy] =
        run_llama_cpp(r, name.empty() ? "" : r.export_dir + "/" + name + ".gguf", tokens, kGreedy);
    LORA_CHECK(theirs.size() == ours.size(), "llama.cpp check: " << theirs.size() << " probabilities, expected "
                                                                 << ours.size());
    for (std::size_t j = 0; j < ours.size(); ++j)
      check.max_prob_diff = std::max(check.max_prob_diff, std::fabs(theirs[j] - ours[j]));
    check.greedy = kGreedy;
    for (std::size_t k = 0; k < our_greedy.size() && k < their_greedy.size(); ++k)
      check.greedy_equal += our_greedy[k] == their_greedy[k] ? 1 : 0;
    if (!name.empty()) {  // how far the adapter moves this library's distribution: what the check can see
      use_adapter(*r.net, "");
      const std::vector<double> base = next_token_probs(*r.net, tokens);
      for (std::size_t j = 0; j < ours.size(); ++j)
        check.adapter_effect = std::max(check.adapter_effect, std::fabs(ours[j] - base[j]));
    }
    std::printf("   %-16s max |p_llama.cpp - p_lora| = %.2e   greedy %d/%d equal", check.label.c_str(),
                check.max_prob_diff, check.greedy_equal, check.greedy);
    if (!name.empty()) std::printf("   (the adapter moves p by up to %.3f)", check.adapter_effect);
    std::printf("\n      llama.cpp: \"%s\" -> \"%s\"\n", decode(tokens).c_str(), decode(their_greedy).c_str());
    r.llama_cpp.push_back(check);
    const auto domain = std::find_if(r.domains.begin(), r.domains.end(), [&](const Domain& d) { return d.corpus.name == name; });
    record.push_back({{"label", check.label},
                      {"peft_dir", domain == r.domains.end() ? nlohmann::json() : nlohmann::json(domain->adapter_dir)},
                      {"tokens", tokens},
                      {"probs_lora", ours},
                      {"probs_llama_cpp", theirs},
                      {"greedy_lora", our_greedy}});
  }
  use_adapter(*r.net, "");
  std::ofstream(r.export_dir + "/llama_cpp_check.json") << record.dump() << "\n";
}

// 9. The loss curves as CSV, the checks, and the exit code.
int finish(Run& r) {
  const std::string csv_path = (fs::path(r.options.out_dir) / "finetune_loss.csv").string();
  // The base alone on the general corpus, before and after all training: the
  // flat line of the forgetting chart.
  const double nan = std::nan("");
  r.curve.push_back({"base_alone", 0, nan, nan, r.general_curve_before});
  r.curve.push_back({"base_alone", r.sizes.finetune_steps, nan, nan, r.general_curve_detached});
  write_curve(csv_path, r.curve);
  std::printf(
      "\n11. Loss curves: %s (and pretrain_loss.csv from the run that pretrained);\n"
      "   chart: examples/plot_demo.sh %s  (gnuplot; writes demo_loss.png there)\n",
      csv_path.c_str(), r.options.out_dir.c_str());

  bool ok = true;
  auto check = [&](bool pass, const std::string& what) {
    std::printf("   [%s] %s\n", pass ? "PASS" : "FAIL", what.c_str());
    ok = ok && pass;
  };
  char line[512];
  std::printf("\nChecks:\n");
  for (std::size_t i = 1; i < r.results.size(); ++i) {
    const MethodResult& m = r.results[i];
    const double cut = 1.0 - m.domain_after / m.domain_before;
    std::snprintf(line, sizeof line, "%s cuts %s val loss by %.1f %% (%.4f -> %.4f; required >= 30 %%)",
                  m.label.c_str(), r.domains[i - 1].corpus.name.c_str(), 100.0 * cut, m.domain_before, m.domain_after);
    check(cut >= 0.30, line);
  }
  const bool same_general = same_bits(r.general_before, r.general_detached);
  std::snprintf(line, sizeof line,
                "base general val loss with the adapters detached: %.9g before, %.9g after (%s); W %s",
                r.general_before, r.general_detached, same_general ? "bit-identical" : "DIFFERENT",
                r.base_untouched ? "unchanged bit for bit" : "CHANGED");
  check(same_general && r.base_untouched, line);
  std::snprintf(line, sizeof line, "merged vs unmerged logits: max relative difference %.2e (required <= 1e-5)",
                r.merge_error);
  check(r.merge_error <= 1e-5, line);
  check(r.reload_equal, "saved adapters load back equal (A and B bit for bit, same outputs)");
  for (const LlamaCppCheck& c : r.llama_cpp) {
    std::snprintf(line, sizeof line,
                  "llama.cpp runs the exported %s: max |p_llama.cpp - p_lora| %.2e (required < 1e-4), greedy "
                  "%d/%d tokens equal", c.label.c_str(), c.max_prob_diff, c.greedy_equal, c.greedy);
    check(c.pass(), line);
  }
  if (r.llama_cpp.empty()) std::printf("   [skip] llama.cpp check: %s\n", r.llama_cpp_skipped.c_str());
  if (r.qlora) {
    const MethodResult& q = *r.qlora;
    const MethodResult& dense = r.results[1];
    const double cut = 1.0 - q.domain_after / q.domain_before, gap = q.domain_after / dense.domain_after - 1.0;
    std::snprintf(line, sizeof line,
                  "%s cuts %s val loss by %.1f %% (%.4f -> %.4f), %+.2f %% from %s on the dense base "
                  "(required: >= 30 %% and within 5 %%)",
                  q.label.c_str(), r.domains.front().corpus.name.c_str(), 100.0 * cut, q.domain_before,
                  q.domain_after, 100.0 * gap, dense.label.c_str());
    check(cut >= 0.30 && std::fabs(gap) <= 0.05, line);
  }
  const MethodResult& full = r.results.front();
  std::printf(
      "   [info] full fine-tuning moved general val loss %.4f -> %.4f (%+.1f %%); the base with adapters "
      "detached: %+.1f %%\n",
      full.general_before, full.general_after, 100.0 * (full.general_after / full.general_before - 1.0),
      100.0 * (r.general_detached / r.general_before - 1.0));

  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("\nTotal %.1f s (%s), peak RSS of the process %.1f MiB. %s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - r.start).count(),
              r.from_cache ? "base from cache" : "including pretraining", usage.ru_maxrss / 1024.0,
              ok ? "All checks passed." : "SOME CHECKS FAILED.");
  return ok ? 0 : 1;
}

}  // namespace

int run(const Options& options) {
  Run r(options);
  set_threads(options.threads);
  fs::create_directories(options.out_dir);
  std::printf("domain_adaptation: LoRA on a small character-level Llama (lora %s, CPU, float)\n", lora::kVersion);
  std::printf("output directory: %s\n\n", options.out_dir.c_str());

  // 1. Data: general prose to pretrain on, one corpus per domain to adapt to.
  make_data(r);

  // 2. Base model: a transformer whose linear layers are the frozen bases of a
  //    lora::Model (add_base, by module name), pretrained or loaded from the cache.
  make_base(r);

  // 3. Adapters: PEFT's LoraConfig picks the layers; one adapter per domain,
  //    trained with the base frozen, saved as a PEFT directory, then removed.
  lora::io::PeftConfig config;
  config.r = 4;
  config.lora_alpha = 8;
  // The layers that write into the residual stream, and the head: at this
  // budget (under 2 % of the model) they adapt best of the subsets tried
  // (legal val loss 1.28, against 1.31 for v_proj + o_proj + down_proj and
  // 1.72 for q_proj + k_proj + v_proj + o_proj).
  config.target_modules = {"o_proj", "down_proj", "lm_head"};
  config.task_type = "CAUSAL_LM";
  config.base_model_name_or_path = "domain_adaptation base " + r.key;
  std::printf("\n3. Adapters: r = %d, alpha = %.0f on %zu of %zu linear layers, base frozen; %d steps each, "
              "Adam lr %.0e\n",
              config.r, config.lora_alpha, r.net->lora().targets(config).size(), r.net->lora().modules().size(),
              r.sizes.finetune_steps, r.sizes.finetune_lr);
  for (std::size_t i = 0; i < r.domains.size(); ++i) train_adapter(r, config, i);
  measure_detached_base(r);

  // 4. Full fine-tuning of a copy of the base, and QLoRA, for comparison.
  std::printf("\n4. Full fine-tuning: a copy of the base, every tensor trained on %s; same steps, optimizer and "
              "schedule\n", r.domains.front().corpus.name.c_str());
  full_finetuning(r);
  train_qlora(r, config);

  // 5. The table.
  std::printf("\n5. Results (validation loss in nats per character; lower is better)\n\n");
  print_table(r);

  // 6. Load: every adapter back from its PEFT directory, side by side on the one base.
  std::printf("\n6. Load: the PEFT adapter directories (adapter_model.safetensors + adapter_config.json) back onto "
              "the base\n");
  for (Domain& d : r.domains) reload_adapter(r, d);

  // 7. Samples: switch adapters with set_adapter; W never changes.
  std::printf("\n7. Samples (prompt: a line break; temperature %.1f; same random draws for each model)\n\n",
              r.sizes.temperature);
  print_samples(r);

  // 8. Merge the first adapter into W for inference, then unmerge.
  std::printf("\n8. Merge:\n");
  merge_first(r);

  // 9. Export: the base and the adapters as llama.cpp and Hugging Face load them.
  std::printf("\n9. Export: the base for llama.cpp and transformers, the adapters for llama.cpp (PEFT: step 3)\n");
  export_files(r);

  // 10. The exported files in llama.cpp, against this library's forward.
  std::printf("\n10. llama.cpp: the exported base, alone and with each adapter, against this library's forward\n");
  check_llama_cpp(r);

  // 11. Curves, and the verdict.
  return finish(r);
}

int main(int argc, char** argv) {
  try {
    const Options options = parse_options(argc, argv);
    if (options.help) {
      std::printf("%s", kUsage);
      return 0;
    }
    return run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "domain_adaptation: error: %s\n", e.what());
    return 2;
  }
}

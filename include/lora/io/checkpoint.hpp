// Training checkpoints: every layer's (or adapter's) A and B, the optimizer's
// moments and step count, and each one's dropout RNG position (dropout_calls()),
// in one safetensors file written atomically. A run stopped after step k and
// resumed from its checkpoint produces bit-identical adapters to one that
// never stopped: tensors are stored in the parameter type itself (F32 or F64,
// no rounding), and dropout masks are a pure function of (seed, stream, call).
//
//   layers.<name>.lora_A, layers.<name>.lora_B      [r, d_in], [d_out, r]
//   layers.<name>.lora_magnitude_vector             [1, d_out], DoRA layers only (Config.use_dora)
//   adam.<i>.exp_avg, adam.<i>.exp_avg_sq           moments of the optimizer's i-th tensor (Adam::moments() order)
//   __metadata__  format = "lora-checkpoint", version = "1",
//                 layers.<name>.dropout_calls, layers.<name>.r, layers.<name>.scale,
//                 adam.step, adam.skipped_steps, adam.tensors, adam.groups, adam.lr.<g>,
//                 user.<key> (the caller's own values)
// Numbers are written and read with std::to_chars / std::from_chars: the
// same text in every locale (a comma-decimal LC_NUMERIC changes nothing).
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/io/peft.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/layers/linear.hpp"
#include "lora/optim/adam.hpp"

namespace lora::io {

inline constexpr const char* kCheckpointFormat = "lora-checkpoint";
inline constexpr const char* kCheckpointVersion = "1";

namespace detail {

// The shortest text that reads back as the same double (what Python's repr
// gives), independent of the locale.
inline std::string exact_double(double x) {
  char buffer[32];  // the longest is 24 characters, e.g. -2.2250738585072014e-308
  const std::to_chars_result r = std::to_chars(buffer, buffer + sizeof buffer, x);
  LORA_ASSERT(r.ec == std::errc());
  return std::string(buffer, r.ptr);
}

inline const std::string& checkpoint_meta(const SafetensorsReader& reader, const std::string& key) {
  const auto it = reader.metadata().find(key);
  LORA_CHECK(it != reader.metadata().end(), reader.source() << ": checkpoint metadata has no \"" << key << "\"");
  return it->second;
}
// All of `text` as a T (std::from_chars: no sign for unsigned, no spaces,
// no hex, "." as the decimal point in any locale); false if it is not one.
template <class T>
bool parse_whole(const std::string& text, T& value) {
  const char* end = text.data() + text.size();
  const std::from_chars_result r = std::from_chars(text.data(), end, value);
  return r.ec == std::errc() && r.ptr == end;
}
inline std::uint64_t checkpoint_u64(const SafetensorsReader& reader, const std::string& key) {
  const std::string& text = checkpoint_meta(reader, key);
  std::uint64_t v = 0;
  LORA_CHECK(parse_whole(text, v), reader.source() << ": checkpoint metadata \"" << key << "\" = \"" << text
                                                   << "\", expected an unsigned 64-bit integer");
  return v;
}
inline double checkpoint_double(const SafetensorsReader& reader, const std::string& key) {
  const std::string& text = checkpoint_meta(reader, key);
  double v = 0.0;
  LORA_CHECK(parse_whole(text, v) && std::isfinite(v), reader.source() << ": checkpoint metadata \"" << key << "\" = \""
                                                                       << text << "\", expected a finite number");
  return v;
}

// A backend matrix -> a host copy in the same type.
template <class Backend, class P>
cpu::Matrix<P> to_host(typename Backend::Context& ctx, MatrixView<const P, typename Backend::Space> src) {
  cpu::Matrix<P> host(src.rows, src.cols);
  Backend::copy_to_host(ctx, src, host.view());
  return host;
}

// The checkpoint writer and reader for either kind of named layer (Named<Linear> or Named<LoraAdapter>).
template <class Layer, class P, class Backend>
SafetensorsWriter checkpoint_writer_of(const std::vector<Named<Layer>>& layers, Adam<P, Backend>& adam,
                                       const std::map<std::string, std::string>& user) {
  static_assert(std::is_same_v<P, typename Layer::Param>, "save_checkpoint: Adam<P> must use the layers' parameter type");
  LORA_CHECK(!layers.empty() && layers.front().layer != nullptr, "save_checkpoint: no layers");
  typename Backend::Context& ctx = layers.front().layer->context();
  SafetensorsWriter writer;
  writer.set_metadata("format", kCheckpointFormat);
  writer.set_metadata("version", kCheckpointVersion);
  std::set<std::string> names;
  for (const Named<Layer>& l : layers) {
    LORA_CHECK(l.layer != nullptr && !l.name.empty() && names.insert(l.name).second,
               "save_checkpoint: layer \"" << l.name << "\" is null, unnamed or listed twice");
    const std::string key = "layers." + l.name;
    writer.add(key + ".lora_A", detail::to_host<Backend, P>(ctx, l.layer->A()).view());
    writer.add(key + ".lora_B", detail::to_host<Backend, P>(ctx, l.layer->B()).view());
    if (l.layer->use_dora())
      writer.add(key + ".lora_magnitude_vector", detail::to_host<Backend, P>(ctx, l.layer->magnitude()).view());
    writer.set_metadata(key + ".dropout_calls", std::to_string(l.layer->dropout_calls()));
    writer.set_metadata(key + ".r", std::to_string(l.layer->rank()));
    writer.set_metadata(key + ".scale", detail::exact_double(l.layer->scale()));
  }
  const auto moments = adam.moments();
  for (std::size_t i = 0; i < moments.size(); ++i) {
    const std::string key = "adam." + std::to_string(i);
    writer.add(key + ".exp_avg", detail::to_host<Backend, P>(ctx, moments[i].m).view());
    writer.add(key + ".exp_avg_sq", detail::to_host<Backend, P>(ctx, moments[i].v).view());
  }
  Backend::synchronize(ctx);
  writer.set_metadata("adam.step", std::to_string(adam.step_count()));
  writer.set_metadata("adam.skipped_steps", std::to_string(adam.skipped_steps()));
  writer.set_metadata("adam.tensors", std::to_string(moments.size()));
  writer.set_metadata("adam.groups", std::to_string(adam.group_count()));
  for (std::size_t g = 0; g < adam.group_count(); ++g)
    writer.set_metadata("adam.lr." + std::to_string(g), detail::exact_double(adam.lr(g)));
  for (const auto& [key, value] : user) writer.set_metadata("user." + key, value);
  return writer;
}


template <class Layer, class P, class Backend>
std::map<std::string, std::string> load_checkpoint_of(const SafetensorsReader& reader,
                                                   const std::vector<Named<Layer>>& layers,
                                                   Adam<P, Backend>& adam) {
  static_assert(std::is_same_v<P, typename Layer::Param>, "load_checkpoint: Adam<P> must use the layers' parameter type");
  LORA_CHECK(!layers.empty(), "load_checkpoint: no layers");
  const std::string& path = reader.source();
  LORA_CHECK(reader.metadata().count("format") && reader.metadata().at("format") == kCheckpointFormat,
             path << ": not a lora checkpoint (metadata \"format\" is not \"" << kCheckpointFormat << "\")");
  LORA_CHECK(detail::checkpoint_meta(reader, "version") == kCheckpointVersion,
             path << ": checkpoint version \"" << detail::checkpoint_meta(reader, "version") << "\", expected \""
                  << kCheckpointVersion << "\"");

  // Reads tensor `name` into a host matrix of exactly rows x cols in type P.
  auto read_exact = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    LORA_CHECK(reader.contains(name), path << ": the checkpoint has no tensor \"" << name << "\"");
    const TensorInfo& t = reader.info(name);
    LORA_CHECK(t.dtype == dtype_of<P>(), path << ": tensor \"" << name << "\" is " << dtype_name(t.dtype) << ", expected "
                                              << dtype_name(dtype_of<P>()) << " (the parameter type, for an exact resume)");
    cpu::Matrix<P> host(rows, cols);
    reader.read_into(name, host.view());  // checks the shape
    return host;
  };

  struct LayerState {
    cpu::Matrix<P> A, B, magnitude;  // magnitude: DoRA layers only
    std::uint32_t dropout_calls;
  };
  std::vector<LayerState> layer_states;
  std::set<std::string> names;
  for (const Named<Layer>& l : layers) {
    LORA_CHECK(l.layer != nullptr && names.insert(l.name).second,
               "load_checkpoint: layer \"" << l.name << "\" is null or listed twice");
    LORA_CHECK(!is_merged(*l.layer), "load_checkpoint: layer \"" << l.name << "\" is merged; unmerge() it first");
    const std::string key = "layers." + l.name;
    const std::uint64_t r = detail::checkpoint_u64(reader, key + ".r");
    const double scale = detail::checkpoint_double(reader, key + ".scale");
    LORA_CHECK(r == static_cast<std::uint64_t>(l.layer->rank()) && scale == l.layer->scale(),
               path << ": layer \"" << l.name << "\" was saved with r = " << r << ", scale = " << scale
                    << "; this layer has r = " << l.layer->rank() << ", scale = " << l.layer->scale());
    const std::uint64_t calls = detail::checkpoint_u64(reader, key + ".dropout_calls");
    LORA_CHECK(calls <= UINT32_MAX, path << ": " << key << ".dropout_calls = " << calls << " does not fit 32 bits");
    const std::string magnitude = key + ".lora_magnitude_vector";
    LORA_CHECK(l.layer->use_dora() || !reader.contains(magnitude),
               path << ": layer \"" << l.name << "\" was saved as a DoRA layer (it has \"" << magnitude
                    << "\"); this layer is plain LoRA (Config.use_dora = false)");
    layer_states.push_back({read_exact(key + ".lora_A", l.layer->rank(), l.layer->d_in()),
                            read_exact(key + ".lora_B", l.layer->d_out(), l.layer->rank()),
                            l.layer->use_dora() ? read_exact(magnitude, 1, l.layer->d_out()) : cpu::Matrix<P>(),
                            static_cast<std::uint32_t>(calls)});
  }
  for (const TensorInfo& t : reader.tensors()) {
    if (t.name.compare(0, 7, "layers.") != 0) continue;
    const std::string layer = t.name.substr(7, t.name.rfind('.') - 7);
    LORA_CHECK(names.count(layer), path << ": the checkpoint holds layer \"" << layer
                                        << "\", which was not given; a partial restore would not resume the run");
  }

  auto moments = adam.moments();
  const std::uint64_t saved_tensors = detail::checkpoint_u64(reader, "adam.tensors");
  LORA_CHECK(saved_tensors == moments.size(), path << ": the checkpoint's optimizer has " << saved_tensors
                                                   << " tensors, this one " << moments.size());
  const std::uint64_t groups = detail::checkpoint_u64(reader, "adam.groups");
  LORA_CHECK(groups == adam.group_count(),
             path << ": the checkpoint's optimizer has " << groups << " groups, this one " << adam.group_count());
  std::vector<cpu::Matrix<P>> m_host, v_host;
  for (std::size_t i = 0; i < moments.size(); ++i) {
    const std::string key = "adam." + std::to_string(i);
    m_host.push_back(read_exact(key + ".exp_avg", moments[i].m.rows, moments[i].m.cols));
    v_host.push_back(read_exact(key + ".exp_avg_sq", moments[i].v.rows, moments[i].v.cols));
  }
  std::vector<double> lrs;
  for (std::size_t g = 0; g < groups; ++g) {
    const std::string key = "adam.lr." + std::to_string(g);
    lrs.push_back(detail::checkpoint_double(reader, key));
    check_learning_rate(lrs.back(), path + ": " + key);
  }
  const std::uint64_t step = detail::checkpoint_u64(reader, "adam.step");
  LORA_CHECK(step <= static_cast<std::uint64_t>(INT64_MAX), path << ": adam.step = " << step << " is out of range");
  // Absent from checkpoints written before skipped steps were counted.
  const std::uint64_t skipped =
      reader.metadata().count("adam.skipped_steps") ? detail::checkpoint_u64(reader, "adam.skipped_steps") : 0;
  LORA_CHECK(skipped <= static_cast<std::uint64_t>(INT64_MAX),
             path << ": adam.skipped_steps = " << skipped << " is out of range");

  // Everything checked: apply.
  typename Backend::Context& ctx = layers.front().layer->context();
  for (std::size_t i = 0; i < layers.size(); ++i) {
    Layer& layer = *layers[i].layer;
    Backend::copy_from_host(ctx, MatrixView<const P, HostSpace>(layer_states[i].A.view()), layer.lora_A().value);
    Backend::copy_from_host(ctx, MatrixView<const P, HostSpace>(layer_states[i].B.view()), layer.lora_B().value);
    if (layer.use_dora())
      Backend::copy_from_host(ctx, MatrixView<const P, HostSpace>(layer_states[i].magnitude.view()),
                              layer.lora_magnitude().value);
    layer.set_dropout_calls(layer_states[i].dropout_calls);
  }
  for (std::size_t i = 0; i < moments.size(); ++i) {
    Backend::copy_from_host(ctx, MatrixView<const P, HostSpace>(m_host[i].view()), moments[i].m);
    Backend::copy_from_host(ctx, MatrixView<const P, HostSpace>(v_host[i].view()), moments[i].v);
  }
  Backend::synchronize(ctx);
  adam.set_step_count(static_cast<std::int64_t>(step));
  adam.set_skipped_steps(static_cast<std::int64_t>(skipped));
  for (std::size_t g = 0; g < lrs.size(); ++g) adam.set_lr(g, lrs[g]);

  std::map<std::string, std::string> user;
  for (const auto& [key, value] : reader.metadata())
    if (key.compare(0, 5, "user.") == 0) user.emplace(key.substr(5), value);
  return user;
}

}  // namespace detail

// The checkpoint of `layers` (lora::Linear) or `adapters` (lora::LoraAdapter)
// and `adam` as a safetensors writer, ready to write to a file
// (save_checkpoint) or to memory (to_bytes). A lora::Model writes its own
// (Model::save_checkpoint) through the adapter form.
template <class T, class Backend, class P>
SafetensorsWriter checkpoint_writer(const std::vector<NamedLayer<T, Backend>>& layers, Adam<P, Backend>& adam,
                                    const std::map<std::string, std::string>& user = {}) {
  return detail::checkpoint_writer_of(layers, adam, user);
}
template <class T, class Backend, class P>
SafetensorsWriter checkpoint_writer(const std::vector<NamedAdapter<T, Backend>>& adapters, Adam<P, Backend>& adam,
                                    const std::map<std::string, std::string>& user = {}) {
  return detail::checkpoint_writer_of(adapters, adam, user);
}

// Writes `path` atomically. The optimizer must hold (at least) the layers'
// tensors; `user` values (data position, epoch, ...) come back from load_checkpoint.
template <class T, class Backend, class P>
void save_checkpoint(const std::string& path, const std::vector<NamedLayer<T, Backend>>& layers, Adam<P, Backend>& adam,
                     const std::map<std::string, std::string>& user = {}) {
  checkpoint_writer(layers, adam, user).write(path);
}

template <class T, class Backend, class P>
void save_checkpoint(const std::string& path, const std::vector<NamedAdapter<T, Backend>>& adapters,
                     Adam<P, Backend>& adam, const std::map<std::string, std::string>& user = {}) {
  checkpoint_writer(adapters, adam, user).write(path);
}

// Restores what save_checkpoint wrote into layers and an optimizer built the
// same way (same layer names, shapes, ranks and scales; same tensors added to
// the optimizer in the same order). Everything (every field, tensor shape and
// learning rate) is read and checked before anything is written, so a bad or
// mismatched checkpoint changes nothing.
// Returns the `user` values given to save_checkpoint.
// This overload restores from a reader that is already open (a file, or
// bytes in memory: SafetensorsReader::from_memory); messages name its source().
template <class T, class Backend, class P>
std::map<std::string, std::string> load_checkpoint(const SafetensorsReader& reader,
                                                   const std::vector<NamedLayer<T, Backend>>& layers,
                                                   Adam<P, Backend>& adam) {
  return detail::load_checkpoint_of(reader, layers, adam);
}
template <class T, class Backend, class P>
std::map<std::string, std::string> load_checkpoint(const SafetensorsReader& reader,
                                                   const std::vector<NamedAdapter<T, Backend>>& adapters,
                                                   Adam<P, Backend>& adam) {
  return detail::load_checkpoint_of(reader, adapters, adam);
}

template <class T, class Backend, class P>
std::map<std::string, std::string> load_checkpoint(const std::string& path,
                                                   const std::vector<NamedLayer<T, Backend>>& layers,
                                                   Adam<P, Backend>& adam) {
  LORA_CHECK(!layers.empty(), "load_checkpoint: no layers");
  return load_checkpoint(SafetensorsReader::open(path), layers, adam);
}

template <class T, class Backend, class P>
std::map<std::string, std::string> load_checkpoint(const std::string& path,
                                                   const std::vector<NamedAdapter<T, Backend>>& adapters,
                                                   Adam<P, Backend>& adam) {
  LORA_CHECK(!adapters.empty(), "load_checkpoint: no layers");
  return load_checkpoint(SafetensorsReader::open(path), adapters, adam);
}

}  // namespace lora::io

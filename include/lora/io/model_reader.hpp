// The frozen weights of a model, read from where Hugging Face puts them: one
// .safetensors file, or a sharded model (model.safetensors.index.json beside
// its shards). Every shard is memory-mapped and validated when the reader is
// opened; a named 2-D tensor is then handed to a base in the form it needs:
//
//   view<T>       a MatrixView into the mapping, no copy (the stored dtype is T's and aligned for T)
//   load<T>       that view when it can be one, else a converted copy the result owns
//   read_into<T>  a converting copy into the caller's host matrix (any stride)
//   read_matrix<T> the same into a new cpu::Matrix<T>
//   copy_to<Backend>  straight into a backend's matrix (the GPU for lora::cuda::Backend): the
//                 stored bytes as they are when the dtype is T's, else converted on the host
//                 in blocks of about 1 MiB first
//
// Conversions (F16, BF16, F32, F64 to T) round once, to nearest, ties to even;
// widening is exact (see float16.hpp). T is float or double here; <lora/io/cuda_dtypes.hpp>
// adds the CUDA backend's __nv_bfloat16 (stored as BF16) and __half (F16).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/cpu/backend.hpp"
#include "lora/io/file.hpp"
#include "lora/io/safetensors.hpp"

namespace lora::io {

// The safetensors dtype whose little-endian bytes are a T as it lies in memory.
// Defined for float (F32) and double (F64); cuda_dtypes.hpp adds the 16-bit GPU types.
template <class T>
struct StoredDtype;
template <>
struct StoredDtype<float> {
  static constexpr Dtype value = Dtype::F32;
};
template <>
struct StoredDtype<double> {
  static constexpr Dtype value = Dtype::F64;
};

namespace detail {

template <class T, class = void>
struct has_stored_dtype : std::false_type {};
template <class T>
struct has_stored_dtype<T, std::void_t<decltype(StoredDtype<T>::value)>> : std::true_type {};

// out[i] = element i of `bytes` (stored as `from`, a floating dtype) as T. The
// bytes are copied as they are when `from` is T's own dtype; float and double
// convert as decode() does; any other T (a 16-bit GPU type) goes through
// double, which holds every stored value exactly, and is rounded once to T's dtype.
template <class T>
void decode_as(Dtype from, const std::uint8_t* bytes, std::size_t count, T* out) {
  static_assert(has_stored_dtype<T>::value, "decode_as<T>: T has no StoredDtype (include lora/io/cuda_dtypes.hpp for GPU types)");
  constexpr Dtype kTo = StoredDtype<T>::value;
  if (from == kTo) {
    if (count != 0) std::memcpy(out, bytes, count * sizeof(T));
  } else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    decode(from, bytes, count, out);
  } else {
    double wide[256];
    const std::size_t in_size = dtype_size(from);
    for (std::size_t done = 0; done < count;) {
      const std::size_t n = std::min<std::size_t>(count - done, std::size(wide));
      decode(from, bytes + done * in_size, n, wide);
      encode(kTo, wide, n, reinterpret_cast<std::uint8_t*>(out + done));
      done += n;
    }
  }
}

}  // namespace detail

// A 2-D tensor as T on the host: a view into a ModelReader's mapping when the
// stored bytes already are T (borrowed() is true; valid while the reader
// lives), else a converted copy it owns. Move-only, as cpu::Matrix.
template <class T>
class HostTensor {
 public:
  MatrixView<const T, HostSpace> view() const { return view_; }
  bool borrowed() const { return owned_.size() == 0 && view_.size() != 0; }

 private:
  friend class ModelReader;
  explicit HostTensor(MatrixView<const T, HostSpace> borrowed) : view_(borrowed) {}
  explicit HostTensor(cpu::Matrix<T> owned) : owned_(std::move(owned)) { view_ = owned_.view(); }

  cpu::Matrix<T> owned_;  // moving a cpu::Matrix keeps its buffer, so view_ stays valid
  MatrixView<const T, HostSpace> view_;
};

// A model's tensors by name, across one file or all the shards of an index.
// Opening checks everything before any tensor is handed out: every shard's
// header (as SafetensorsReader does), and that the index's weight_map and the
// shards agree tensor for tensor. Tensor data is paged in when it is read.
// Copies share the mappings.
class ModelReader {
 public:
  static constexpr const char* kSingleFile = "model.safetensors";
  static constexpr const char* kIndexFile = "model.safetensors.index.json";

  // `path`: a .safetensors file, a model.safetensors.index.json (any *.json is
  // read as an index), or a directory holding model.safetensors (preferred) or
  // model.safetensors.index.json.
  static ModelReader open(const std::string& path) {
    return detail::with_file_errors(path, [&] {
      namespace fs = std::filesystem;
      fs::path p(path);
      if (fs::is_directory(p)) {
        if (fs::exists(p / kSingleFile)) {
          p /= kSingleFile;
        } else {
          LORA_CHECK(fs::exists(p / kIndexFile),
                     path << ": a directory that holds neither " << kSingleFile << " nor " << kIndexFile);
          p /= kIndexFile;
        }
      }
      ModelReader model;
      model.source_ = p.string();
      if (p.extension() != ".json") {
        model.shard_files_.push_back(p.filename().string());
        model.shards_.push_back(SafetensorsReader::map(p.string()));
        model.place_single_file();
        return model;
      }
      model.sharded_ = true;
      model.index_ = read_safetensors_index(p.string());
      const fs::path dir = p.parent_path();
      model.place_shards([&](const std::string& shard) { return SafetensorsReader::map((dir / shard).string()); });
      return model;
    });
  }

  // A sharded model held in memory: the index's text and each shard's bytes by
  // file name (what the fuzzer and the tests use); checked as open() checks.
  static ModelReader from_memory(const std::string& index_text, const std::map<std::string, std::vector<std::uint8_t>>& shards,
                                 const std::string& source = "<memory>/model.safetensors.index.json") {
    ModelReader model;
    model.source_ = source;
    model.sharded_ = true;
    model.index_ = parse_safetensors_index(index_text, source);
    model.place_shards([&](const std::string& shard) {
      const auto it = shards.find(shard);
      LORA_CHECK(it != shards.end(), "cannot open " << shard << ": no such file");
      return SafetensorsReader::from_memory(it->second, shard);
    });
    return model;
  }

  // The file opened: the .safetensors file, or the index of a sharded model.
  const std::string& source() const { return source_; }
  bool sharded() const { return sharded_; }
  // The index as read (its JSON kept whole, to write an updated copy); empty for one file.
  const SafetensorsIndex& index() const { return index_; }
  // The shards' file names (one for a single file), in name order, and their readers, in the same order.
  const std::vector<std::string>& shard_files() const { return shard_files_; }
  const std::vector<SafetensorsReader>& shards() const { return shards_; }

  std::size_t size() const { return where_.size(); }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  // Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(where_.size());
    for (const auto& [name, shard] : where_) out.push_back(name);
    return out;
  }
  // The shard that holds `name`; a lora::Error names the model when none does.
  const SafetensorsReader& shard_of(const std::string& name) const {
    const auto it = where_.find(name);
    LORA_CHECK(it != where_.end(), source_ << ": no tensor named " << detail::quote_excerpt(name) << " (the model has "
                                           << where_.size() << " tensors)");
    return shards_[it->second];
  }
  // Name, dtype, shape and byte range of `name`.
  const TensorInfo& info(const std::string& name) const { return shard_of(name).info(name); }

  // The stored tensor as a [rows, cols] view into the mapping, without a copy.
  // The tensor must be 2-D, stored as T's dtype, and aligned for T in memory
  // (each is checked; load<T> copies instead when one fails).
  template <class T>
  MatrixView<const T, HostSpace> view(const std::string& name) const {
    const TensorInfo& t = matrix_info(name, "view");
    const T* data = in_place<T>(t);
    if (data == nullptr && t.numel != 0) {
      const char* type = std::is_same_v<T, float> ? "float" : std::is_same_v<T, double> ? "double" : "T";
      const char* instead = " (load, read_into or copy_to copy and convert instead)";
      LORA_CHECK(t.dtype == StoredDtype<T>::value, "ModelReader::view: " << where(t) << " is stored as " << dtype_name(t.dtype)
                                                       << "; a view as " << type << " needs " << dtype_name(StoredDtype<T>::value)
                                                       << instead);
      LORA_CHECK(false, "ModelReader::view: " << where(t) << " lies at file byte " << shard_of(name).data_offset() + t.begin
                                              << ", not aligned to " << alignof(T) << " bytes for a view as " << type << instead);
    }
    return {data, t.shape[0], t.shape[1]};
  }

  // The 2-D tensor as T: view<T> when it can be one, else a converted copy.
  template <class T>
  HostTensor<T> load(const std::string& name) const {
    const TensorInfo& t = matrix_info(name, "load");
    if (const T* data = in_place<T>(t)) return HostTensor<T>(MatrixView<const T, HostSpace>(data, t.shape[0], t.shape[1]));
    return HostTensor<T>(read_matrix<T>(name));
  }

  // A converted copy of the 2-D tensor in a new matrix.
  template <class T>
  cpu::Matrix<T> read_matrix(const std::string& name) const {
    const TensorInfo& t = matrix_info(name, "read_matrix");
    cpu::Matrix<T> out = detail::allocate_for(where(t) + " " + shape_string(t.shape), t.numel * sizeof(T),
                                              [&] { return cpu::Matrix<T>(t.shape[0], t.shape[1]); });
    read_into(name, out.view());
    return out;
  }

  // Copies the tensor into `out`, converting to T. `out` must have the
  // tensor's shape: [rows, cols] for a 2-D tensor, [1, n] for a 1-D [n] (a bias).
  template <class T>
  void read_into(const std::string& name, MatrixView<T, HostSpace> out) const {
    const TensorInfo& t = fitting_info(name, out, "read_into");
    read_rows(t, 0, out);
  }

  // Copies the tensor into a matrix of `Backend` (on the GPU for the CUDA
  // backend), shaped as read_into's `out`. The stored bytes go as they are
  // when the dtype is T's (aligned or not); otherwise the tensor is converted
  // on the host a block of rows (about 1 MiB) at a time and each block copied.
  // Returns when the copy is complete.
  template <class Backend, class T>
  void copy_to(typename Backend::Context& ctx, const std::string& name, MatrixView<T, typename Backend::Space> dst) const {
    const TensorInfo& t = fitting_info(name, dst, "copy_to");
    if constexpr (std::is_same_v<typename Backend::Space, HostSpace>) {
      read_into(name, dst);  // one memory space: convert straight into dst
    } else {
      if (dst.size() == 0) return;
      if (const T* data = in_place<T>(t)) {
        Backend::copy_from_host(ctx, MatrixView<const T, HostSpace>(data, dst.rows, dst.cols), dst);
        return;
      }
      const std::int64_t block = std::max<std::int64_t>(1, static_cast<std::int64_t>(kBlockBytes / sizeof(T)) / dst.cols);
      const std::int64_t block_rows = std::min(block, dst.rows);
      std::vector<T> staging = detail::allocate_for(where(t) + ": staging", static_cast<std::uint64_t>(block_rows * dst.cols) * sizeof(T),
                                                    [&] { return std::vector<T>(static_cast<std::size_t>(block_rows * dst.cols)); });
      for (std::int64_t row = 0; row < dst.rows; row += block_rows) {
        const std::int64_t n = std::min(block_rows, dst.rows - row);
        const MatrixView<T, HostSpace> host(staging.data(), n, dst.cols);
        read_rows(t, row, host);
        Backend::copy_from_host(ctx, MatrixView<const T, HostSpace>(host), dst.row_block(row, n));
      }
    }
  }

 private:
  static constexpr std::size_t kBlockBytes = std::size_t{1} << 20;

  ModelReader() = default;

  void place_single_file() {
    for (const TensorInfo& t : shards_[0].tensors()) where_.emplace(t.name, 0);
  }

  // Opens each shard the weight_map names (once, in name order) with open_shard,
  // then checks that the weight_map and the shards agree tensor for tensor.
  template <class OpenShard>
  void place_shards(OpenShard&& open_shard) {
    std::map<std::string, std::size_t> ids;
    for (const auto& [tensor, shard] : index_.weight_map) ids.emplace(shard, 0);
    for (auto& [shard, id] : ids) {
      id = shards_.size();
      shard_files_.push_back(shard);
      try {
        shards_.push_back(open_shard(shard));
      } catch (const Error& e) {
        throw Error(source_ + ": shard " + detail::quote_excerpt(shard) + " of its weight_map: " + e.what());
      }
    }
    for (const auto& [tensor, shard] : index_.weight_map) {
      const std::size_t id = ids.at(shard);
      LORA_CHECK(shards_[id].contains(tensor), source_ << ": weight_map puts " << detail::quote_excerpt(tensor) << " in "
                                                       << shard << ", which has no such tensor");
      where_.emplace(tensor, id);
    }
    for (std::size_t id = 0; id < shards_.size(); ++id)
      for (const TensorInfo& t : shards_[id].tensors()) {
        const auto it = where_.find(t.name);
        LORA_CHECK(it != where_.end() && it->second == id,
                   source_ << ": " << shard_files_[id] << " holds " << detail::quote_excerpt(t.name) << ", which the weight_map "
                           << (it == where_.end() ? "does not list" : "places in " + shard_files_[it->second]));
      }
  }

  // "<file>: tensor "name"" for messages.
  std::string where(const TensorInfo& t) const {
    return shard_of(t.name).source() + ": tensor " + detail::quote_excerpt(t.name);
  }

  // The info of a floating tensor that is 2-D, for the calls that take their shape from the file.
  const TensorInfo& matrix_info(const std::string& name, const char* call) const {
    const TensorInfo& t = floating_info(name, call);
    LORA_CHECK(t.shape.size() == 2, "ModelReader::" << call << ": " << where(t) << " has shape " << shape_string(t.shape)
                                                    << ", expected a 2-D [rows, cols] matrix"
                                                    << (t.shape.size() == 1 ? " (read a 1-D tensor with read_into a [1, n] view)" : ""));
    return t;
  }

  // The info of a floating tensor whose shape `out` has ([rows, cols], or [1, n] for a 1-D [n]).
  template <class T, class Space>
  const TensorInfo& fitting_info(const std::string& name, const MatrixView<T, Space>& out, const char* call) const {
    const TensorInfo& t = floating_info(name, call);
    LORA_CHECK(detail::fits_matrix(t.shape, out.rows, out.cols),
               "ModelReader::" << call << ": " << where(t) << " has shape " << shape_string(t.shape)
                               << ", the destination is [" << out.rows << ", " << out.cols << "]");
    check_view(out, name.c_str(), call);
    return t;
  }

  const TensorInfo& floating_info(const std::string& name, const char* call) const {
    const TensorInfo& t = info(name);
    LORA_CHECK(is_floating(t.dtype), "ModelReader::" << call << ": " << where(t) << " has dtype " << dtype_name(t.dtype)
                                                     << "; only F16, BF16, F32 and F64 convert to floating point");
    return t;
  }

  // The tensor's bytes as T's in the mapping, when they are stored as T and
  // aligned for it there; else nullptr.
  template <class T>
  const T* in_place(const TensorInfo& t) const {
    static_assert(detail::has_stored_dtype<T>::value, "ModelReader: T has no StoredDtype (include lora/io/cuda_dtypes.hpp for GPU types)");
    if (t.dtype != StoredDtype<T>::value || t.numel == 0) return nullptr;
    const std::uint8_t* bytes = shard_of(t.name).stored_bytes(t.name);
    if (bytes == nullptr || reinterpret_cast<std::uintptr_t>(bytes) % alignof(T) != 0) return nullptr;
    return reinterpret_cast<const T*>(bytes);
  }

  // out = rows [first, first + out.rows) of tensor t (out.cols wide), converted to T.
  template <class T>
  void read_rows(const TensorInfo& t, std::int64_t first, MatrixView<T, HostSpace> out) const {
    const std::uint8_t* bytes = shard_of(t.name).stored_bytes(t.name);
    LORA_ASSERT(bytes != nullptr);  // every shard is mapped or in memory
    const auto row_bytes = static_cast<std::size_t>(out.cols) * dtype_size(t.dtype);
    for (std::int64_t i = 0; i < out.rows && out.cols != 0; ++i)
      detail::decode_as(t.dtype, bytes + static_cast<std::size_t>(first + i) * row_bytes, static_cast<std::size_t>(out.cols),
                        out.data + i * out.stride);
  }

  std::string source_;
  bool sharded_ = false;
  SafetensorsIndex index_;
  std::vector<std::string> shard_files_;
  std::vector<SafetensorsReader> shards_;
  std::map<std::string, std::size_t> where_;  // tensor -> index into shards_
};

}  // namespace lora::io

// Reading and writing GGUF files, the container of llama.cpp / ggml (version 3;
// version 2 is read too). All little-endian:
//
//   u32 magic "GGUF", u32 version, u64 tensor_count, u64 kv_count
//   kv_count times:     string key, u32 value type, value
//   tensor_count times: string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset
//   zero padding to the alignment (the u32 key general.alignment, else 32)
//   the data section: each tensor at its offset, counted from the section's start
//
// where a string is a u64 byte count and the bytes (no terminating zero), and
// a value is one of the scalar types below, a string, or an array (u32 element
// type, u64 count, the elements; arrays of arrays are refused, as ggml does).
//
// Shapes: ggml lists dimensions innermost first (ne[0] is the contiguous one);
// this file speaks row-major, as safetensors does: `shape` is ne reversed, so
// a PEFT lora_A of r x d_in has shape {r, d_in} here and ne = [d_in, r] in the
// file, which is what llama.cpp expects of a `.lora_a` tensor.
//
// GgufReader checks every rule before it hands out a value or a tensor, to the
// letter of ggml's own reader (a tensor's offset is exactly where the one
// before it ends, padded to the alignment; names shorter than 64 bytes; at
// most 4 dimensions): a file that breaks one is a lora::Error naming the check
// and the byte offset, never a crash. GgufWriter writes what that reader and
// ggml accept, atomically. Tensor data: F32, F16, BF16, F64 (converted as
// safetensors.hpp converts) and the integer types I8..I64 as raw bytes; the
// quantized ggml types are named and refused.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/file.hpp"
#include "lora/io/safetensors.hpp"

namespace lora::io {

// The metadata value types of the format, with their numbers in the file.
enum class GgufType : std::uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9, U64 = 10,
  I64 = 11, F64 = 12
};

inline const char* gguf_type_name(GgufType t) {
  static const char* const kNames[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array",
                                       "u64", "i64", "f64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? kNames[i] : "unknown";
}

// One metadata value: a scalar (held as uint, sint or real by its type), a
// string, or an array of scalars or strings (element type `element`).
struct GgufValue {
  GgufType type = GgufType::U32;
  std::uint64_t uint = 0;   // U8, U16, U32, U64, BOOL (0 or 1)
  std::int64_t sint = 0;    // I8, I16, I32, I64
  double real = 0.0;        // F32 (a float's value), F64
  std::string text;         // STRING
  GgufType element = GgufType::U8;  // ARRAY
  std::vector<GgufValue> items;     // ARRAY

  static GgufValue u32(std::uint32_t v) { return unsigned_of(GgufType::U32, v); }
  static GgufValue u64(std::uint64_t v) { return unsigned_of(GgufType::U64, v); }
  static GgufValue i32(std::int32_t v) { return signed_of(GgufType::I32, v); }
  static GgufValue f32(float v) { return real_of(GgufType::F32, v); }
  static GgufValue f64(double v) { return real_of(GgufType::F64, v); }
  static GgufValue boolean(bool v) { return unsigned_of(GgufType::BOOL, v ? 1 : 0); }
  static GgufValue string(std::string v) {
    GgufValue g;
    g.type = GgufType::STRING;
    g.text = std::move(v);
    return g;
  }
  // An array of `element` values, each of which must have that type.
  static GgufValue array(GgufType element, std::vector<GgufValue> items) {
    LORA_CHECK(element != GgufType::ARRAY, "GgufValue::array: arrays of arrays are not part of GGUF as ggml reads it");
    for (const GgufValue& v : items)
      LORA_CHECK(v.type == element, "GgufValue::array: an item of type " << gguf_type_name(v.type) << " in an array of "
                                                                         << gguf_type_name(element));
    GgufValue g;
    g.type = GgufType::ARRAY;
    g.element = element;
    g.items = std::move(items);
    return g;
  }
  static GgufValue strings(const std::vector<std::string>& v) {
    std::vector<GgufValue> items;
    items.reserve(v.size());
    for (const std::string& s : v) items.push_back(string(s));
    return array(GgufType::STRING, std::move(items));
  }

  bool operator==(const GgufValue& o) const {
    return type == o.type && uint == o.uint && sint == o.sint && same_real(o) && text == o.text &&
           (type != GgufType::ARRAY || (element == o.element && items == o.items));
  }
  bool operator!=(const GgufValue& o) const { return !(*this == o); }

 private:
  static GgufValue unsigned_of(GgufType t, std::uint64_t v) {
    GgufValue g;
    g.type = t;
    g.uint = v;
    return g;
  }
  static GgufValue signed_of(GgufType t, std::int64_t v) {
    GgufValue g;
    g.type = t;
    g.sint = v;
    return g;
  }
  static GgufValue real_of(GgufType t, double v) {
    GgufValue g;
    g.type = t;
    g.real = v;
    return g;
  }
  bool same_real(const GgufValue& o) const {  // bit for bit, so a NaN read back equals the NaN written
    return std::memcmp(&real, &o.real, sizeof real) == 0;
  }
};

// ggml's tensor types that this library reads and writes, with their numbers.
enum class GgmlType : std::uint32_t { F32 = 0, F16 = 1, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30 };

namespace detail {

struct GgmlTypeEntry {
  std::uint32_t id;
  const char* name;
  bool plain;  // one element per value, no blocks: the types this library reads
  Dtype dtype;
};
// Every ggml type ggml knew at the time of writing, so a refusal can name it.
inline constexpr GgmlTypeEntry kGgmlTypes[] = {
    {0, "F32", true, Dtype::F32},     {1, "F16", true, Dtype::F16},     {2, "Q4_0", false, Dtype::U8},
    {3, "Q4_1", false, Dtype::U8},    {6, "Q5_0", false, Dtype::U8},    {7, "Q5_1", false, Dtype::U8},
    {8, "Q8_0", false, Dtype::U8},    {9, "Q8_1", false, Dtype::U8},    {10, "Q2_K", false, Dtype::U8},
    {11, "Q3_K", false, Dtype::U8},   {12, "Q4_K", false, Dtype::U8},   {13, "Q5_K", false, Dtype::U8},
    {14, "Q6_K", false, Dtype::U8},   {15, "Q8_K", false, Dtype::U8},   {16, "IQ2_XXS", false, Dtype::U8},
    {17, "IQ2_XS", false, Dtype::U8}, {18, "IQ3_XXS", false, Dtype::U8}, {19, "IQ1_S", false, Dtype::U8},
    {20, "IQ4_NL", false, Dtype::U8}, {21, "IQ3_S", false, Dtype::U8},  {22, "IQ2_S", false, Dtype::U8},
    {23, "IQ4_XS", false, Dtype::U8}, {24, "I8", true, Dtype::I8},      {25, "I16", true, Dtype::I16},
    {26, "I32", true, Dtype::I32},    {27, "I64", true, Dtype::I64},    {28, "F64", true, Dtype::F64},
    {29, "IQ1_M", false, Dtype::U8},  {30, "BF16", true, Dtype::BF16},  {34, "TQ1_0", false, Dtype::U8},
    {35, "TQ2_0", false, Dtype::U8},  {39, "MXFP4", false, Dtype::U8},
};

inline const GgmlTypeEntry* ggml_type_entry(std::uint32_t id) {
  for (const GgmlTypeEntry& e : kGgmlTypes)
    if (e.id == id) return &e;
  return nullptr;
}

inline GgmlType ggml_type_of(Dtype d) {
  for (const GgmlTypeEntry& e : kGgmlTypes)
    if (e.plain && e.dtype == d) return static_cast<GgmlType>(e.id);
  LORA_CHECK(false, "GGUF has no tensor type for dtype " << dtype_name(d) << " (it has F32, F16, BF16, F64, I8..I64)");
}

[[noreturn]] inline void gguf_fail(const std::string& source, const char* check, const std::string& details) {
  throw Error(source + ": invalid GGUF file: " + check + ": " + details);
}

// Bounds-checked little-endian reads over the header; every overrun names what was being read and where.
class GgufCursor {
 public:
  GgufCursor(const std::uint8_t* data, std::uint64_t size, const std::string& source)
      : data_(data), size_(size), source_(source) {}

  std::uint64_t at() const { return at_; }
  std::uint64_t left() const { return size_ - at_; }

  const std::uint8_t* take(std::uint64_t n, const std::string& what) {
    if (n > left())
      gguf_fail(source_, "truncated", what + " needs " + std::to_string(n) + " bytes at byte " + std::to_string(at_) +
                                          ", but the file ends at byte " + std::to_string(size_));
    const std::uint8_t* p = data_ + at_;
    at_ += n;
    return p;
  }
  std::uint8_t u8(const std::string& what) { return *take(1, what); }
  std::uint16_t u16(const std::string& what) { return load_le16(take(2, what)); }
  std::uint32_t u32(const std::string& what) { return load_le32(take(4, what)); }
  std::uint64_t u64(const std::string& what) { return load_le64(take(8, what)); }
  std::string string(const std::string& what) {
    const std::uint64_t n = u64(what + " (its length)");
    const std::uint8_t* p = take(n, what + " of " + std::to_string(n) + " bytes");
    return std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
  }

 private:
  const std::uint8_t* data_;
  std::uint64_t size_;
  std::uint64_t at_ = 0;
  const std::string& source_;
};

inline std::uint64_t gguf_pad(std::uint64_t n, std::uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

}  // namespace detail

// The alignment of the data section and of every tensor when general.alignment is absent.
inline constexpr std::uint32_t kGgufDefaultAlignment = 32;
// ggml's GGML_MAX_NAME: a tensor name holds at most 63 bytes.
inline constexpr std::size_t kGgufMaxNameBytes = 63;
// ggml's GGML_MAX_DIMS.
inline constexpr std::uint32_t kGgufMaxDims = 4;

struct GgufTensorInfo {
  std::string name;
  std::uint32_t ggml_type = 0;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;  // row-major: ne reversed
  std::uint64_t offset = 0;         // in the data section
  std::uint64_t numel = 0;
  std::uint64_t bytes() const { return numel * dtype_size(dtype); }
};

// A validated GGUF file (see the top of this file), mapped or in memory.
class GgufReader {
 public:
  static GgufReader map(const std::string& path) {
    return detail::with_file_errors(path, [&] {
      GgufReader r;
      r.source_ = path;
      r.mapping_ = std::make_shared<const detail::MappedFile>(path);
      r.parse();
      return r;
    });
  }
  static GgufReader from_memory(std::vector<std::uint8_t> bytes, std::string source = "<memory>") {
    GgufReader r;
    r.source_ = std::move(source);
    r.memory_ = std::make_shared<const std::vector<std::uint8_t>>(std::move(bytes));
    r.parse();
    return r;
  }

  const std::string& source() const { return source_; }
  std::uint32_t version() const { return version_; }
  std::uint32_t alignment() const { return alignment_; }
  std::uint64_t data_offset() const { return data_offset_; }

  // Keys in file order, and a value by key (nullptr when absent).
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const GgufValue* find(const std::string& key) const {
    const auto it = keys_.find(key);
    return it == keys_.end() ? nullptr : &metadata_[it->second].second;
  }
  // The value of `key`, which must be present with type `type`.
  const GgufValue& get(const std::string& key, GgufType type) const {
    const GgufValue* v = find(key);
    LORA_CHECK(v != nullptr, source_ << ": no metadata key \"" << key << "\"");
    LORA_CHECK(v->type == type, source_ << ": metadata key \"" << key << "\" is " << gguf_type_name(v->type) << ", expected "
                                        << gguf_type_name(type));
    return *v;
  }
  const std::string& get_string(const std::string& key) const { return get(key, GgufType::STRING).text; }

  // Tensors in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const GgufTensorInfo& info(const std::string& name) const {
    const auto it = index_.find(name);
    LORA_CHECK(it != index_.end(), source_ << ": no tensor named " << detail::quote_excerpt(name));
    return tensors_[it->second];
  }
  const std::uint8_t* stored_bytes(const std::string& name) const {
    return contents() + data_offset_ + info(name).offset;
  }
  RawTensor read_raw(const std::string& name) const {
    const GgufTensorInfo& t = info(name);
    const std::uint8_t* p = stored_bytes(name);
    return RawTensor{t.dtype, t.shape, std::vector<std::uint8_t>(p, p + t.bytes())};
  }
  // All elements, row-major, as T (float or double); the tensor must be F32, F16, BF16 or F64.
  template <class T>
  std::vector<T> read(const std::string& name) const {
    const GgufTensorInfo& t = info(name);
    LORA_CHECK(is_floating(t.dtype), source_ << ": tensor " << detail::quote_excerpt(name) << " is "
                                             << dtype_name(t.dtype) << ", not a floating type");
    std::vector<T> out = detail::allocate_for(source_ + ": tensor " + detail::quote_excerpt(name), t.numel * sizeof(T),
                                              [&] { return std::vector<T>(static_cast<std::size_t>(t.numel)); });
    detail::decode(t.dtype, stored_bytes(name), static_cast<std::size_t>(t.numel), out.data());
    return out;
  }
  // A 2-D tensor of shape [out.rows, out.cols] (a 1-D one into 1 x cols) into `out`.
  template <class T>
  void read_into(const std::string& name, MatrixView<T, HostSpace> out) const {
    const GgufTensorInfo& t = info(name);
    detail::check_fits_matrix(source_, name, t.shape, out.rows, out.cols);
    LORA_CHECK(is_floating(t.dtype), source_ << ": tensor " << detail::quote_excerpt(name) << " is "
                                             << dtype_name(t.dtype) << ", not a floating type");
    const std::uint8_t* p = stored_bytes(name);
    const std::size_t row_bytes = static_cast<std::size_t>(out.cols) * dtype_size(t.dtype);
    for (std::int64_t i = 0; i < out.rows; ++i)
      detail::decode(t.dtype, p + static_cast<std::size_t>(i) * row_bytes, static_cast<std::size_t>(out.cols),
                     out.data + i * out.stride);
  }

 private:
  GgufReader() = default;

  const std::uint8_t* contents() const { return mapping_ ? mapping_->data() : memory_->data(); }
  std::uint64_t size() const { return mapping_ ? mapping_->size() : memory_->size(); }

  void parse() {
    static const std::uint8_t kEmpty[1] = {0};
    const std::uint8_t* data = size() ? contents() : kEmpty;
    detail::GgufCursor in(data, size(), source_);
    const std::uint8_t* magic = in.take(4, "the magic \"GGUF\"");
    if (std::memcmp(magic, "GGUF", 4) != 0)
      detail::gguf_fail(source_, "magic", "bytes [0, 4) are not \"GGUF\": not a GGUF file");
    version_ = in.u32("the version");
    if (version_ != 2 && version_ != 3)
      detail::gguf_fail(source_, "version",
                        "version " + std::to_string(version_) + "; this library reads versions 2 and 3 (1 is obsolete)");
    const std::uint64_t n_tensors = in.u64("the tensor count");
    const std::uint64_t n_kv = in.u64("the metadata count");
    // Each key/value takes at least 13 bytes and each tensor info 24: counts the file cannot hold are refused
    // before anything is reserved for them.
    if (n_kv > in.left() / 13)
      detail::gguf_fail(source_, "metadata count", std::to_string(n_kv) + " key/value pairs cannot fit in the " +
                                                       std::to_string(in.left()) + " bytes left");
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      const std::uint64_t where = in.at();
      std::string key = in.string("metadata key " + std::to_string(i));
      if (key.empty()) detail::gguf_fail(source_, "metadata key", "key " + std::to_string(i) + " at byte " + std::to_string(where) + " is empty");
      if (keys_.count(key))
        detail::gguf_fail(source_, "duplicate key", detail::quote_excerpt(key) + " appears more than once (again at byte " +
                                                        std::to_string(where) + ")");
      const GgufType type = value_type(in, "the type of " + detail::quote_excerpt(key));
      GgufValue value = read_value(in, type, key);
      keys_.emplace(key, metadata_.size());
      metadata_.emplace_back(std::move(key), std::move(value));
    }
    if (const GgufValue* a = find("general.alignment")) {
      if (a->type != GgufType::U32 || a->uint == 0 || (a->uint & (a->uint - 1)) != 0)
        detail::gguf_fail(source_, "alignment", "general.alignment must be a u32 power of two, found " +
                                                    std::string(gguf_type_name(a->type)) + " " + std::to_string(a->uint));
      alignment_ = static_cast<std::uint32_t>(a->uint);
    }
    if (n_tensors > in.left() / 24)
      detail::gguf_fail(source_, "tensor count", std::to_string(n_tensors) + " tensor infos cannot fit in the " +
                                                     std::to_string(in.left()) + " bytes left");
    std::uint64_t expected_offset = 0;  // ggml's rule: each tensor starts where the one before it ends, padded
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      const std::uint64_t where = in.at();
      t.name = in.string("the name of tensor " + std::to_string(i));
      const std::string tensor = "tensor " + detail::quote_excerpt(t.name) + " (info at byte " + std::to_string(where) + ")";
      if (t.name.empty()) detail::gguf_fail(source_, "tensor name", tensor + ": an empty name");
      if (t.name.size() > kGgufMaxNameBytes)
        detail::gguf_fail(source_, "tensor name", tensor + ": " + std::to_string(t.name.size()) + " bytes, more than ggml's " +
                                                      std::to_string(kGgufMaxNameBytes));
      if (index_.count(t.name)) detail::gguf_fail(source_, "duplicate tensor", tensor + " appears more than once");
      const std::uint32_t n_dims = in.u32(tensor + ": n_dims");
      if (n_dims < 1 || n_dims > kGgufMaxDims)
        detail::gguf_fail(source_, "dimensions", tensor + ": " + std::to_string(n_dims) + " dimensions, expected 1 to " +
                                                     std::to_string(kGgufMaxDims));
      std::vector<std::uint64_t> ne(n_dims);
      for (std::uint32_t d = 0; d < n_dims; ++d) ne[d] = in.u64(tensor + ": ne[" + std::to_string(d) + "]");
      t.ggml_type = in.u32(tensor + ": its type");
      const detail::GgmlTypeEntry* type = detail::ggml_type_entry(t.ggml_type);
      if (type == nullptr)
        detail::gguf_fail(source_, "tensor type", tensor + ": ggml type " + std::to_string(t.ggml_type) + " is unknown");
      if (!type->plain)
        detail::gguf_fail(source_, "tensor type", tensor + ": ggml type " + type->name +
                                                      " is quantized; this library reads F32, F16, BF16, F64 and I8..I64");
      t.dtype = type->dtype;
      t.numel = 1;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const std::uint64_t limit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / 8;
        if (ne[d] > limit || (t.numel != 0 && ne[d] > limit / t.numel))
          detail::gguf_fail(source_, "shape", tensor + ": the element count overflows");
        t.numel *= ne[d];
        t.shape.insert(t.shape.begin(), static_cast<std::int64_t>(ne[d]));
      }
      t.offset = in.u64(tensor + ": its offset");
      if (t.offset != expected_offset)
        detail::gguf_fail(source_, "tensor offset", tensor + ": offset " + std::to_string(t.offset) + ", expected " +
                                                        std::to_string(expected_offset) +
                                                        " (where the tensor before it ends, padded to the alignment)");
      expected_offset = detail::gguf_pad(t.offset + t.bytes(), alignment_);
      index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }
    data_offset_ = detail::gguf_pad(in.at(), alignment_);
    const std::uint64_t needed = tensors_.empty() ? 0 : tensors_.back().offset + tensors_.back().bytes();
    if (data_offset_ > size() || needed > size() - data_offset_)
      detail::gguf_fail(source_, "truncated", "the data section starts at byte " + std::to_string(data_offset_) +
                                                  " and needs " + std::to_string(needed) + " bytes, but the file holds " +
                                                  std::to_string(size()));
  }

  GgufType value_type(detail::GgufCursor& in, const std::string& what) const {
    const std::uint64_t where = in.at();
    const std::uint32_t t = in.u32(what);
    if (t > static_cast<std::uint32_t>(GgufType::F64))
      detail::gguf_fail(source_, "value type", what + " at byte " + std::to_string(where) + " is " + std::to_string(t) +
                                                   ", not a GGUF type (0 to 12)");
    return static_cast<GgufType>(t);
  }

  // The fewest bytes a value of type t takes in the file (a string: its length).
  static std::uint64_t min_bytes(GgufType t) {
    switch (t) {
      case GgufType::U16: case GgufType::I16: return 2;
      case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
      case GgufType::U64: case GgufType::I64: case GgufType::F64: case GgufType::STRING: return 8;
      default: return 1;
    }
  }

  GgufValue read_value(detail::GgufCursor& in, GgufType type, const std::string& key) const {
    const std::string what = "the value of " + detail::quote_excerpt(key);
    GgufValue v;
    v.type = type;
    switch (type) {
      case GgufType::U8: v.uint = in.u8(what); break;
      case GgufType::I8: v.sint = static_cast<std::int8_t>(in.u8(what)); break;
      case GgufType::U16: v.uint = in.u16(what); break;
      case GgufType::I16: v.sint = static_cast<std::int16_t>(in.u16(what)); break;
      case GgufType::U32: v.uint = in.u32(what); break;
      case GgufType::I32: v.sint = static_cast<std::int32_t>(in.u32(what)); break;
      case GgufType::U64: v.uint = in.u64(what); break;
      case GgufType::I64: v.sint = static_cast<std::int64_t>(in.u64(what)); break;
      case GgufType::F32: v.real = float_from_bits(in.u32(what)); break;
      case GgufType::F64: v.real = detail::double_from_bits(in.u64(what)); break;
      case GgufType::BOOL: {
        const std::uint64_t where = in.at();
        v.uint = in.u8(what);
        if (v.uint > 1)
          detail::gguf_fail(source_, "bool", what + " at byte " + std::to_string(where) + " is " + std::to_string(v.uint) +
                                                 ", expected 0 or 1");
        break;
      }
      case GgufType::STRING: v.text = in.string(what); break;
      case GgufType::ARRAY: {
        v.element = value_type(in, "the element type of " + detail::quote_excerpt(key));
        if (v.element == GgufType::ARRAY)
          detail::gguf_fail(source_, "value type", detail::quote_excerpt(key) + " is an array of arrays, which ggml refuses");
        const std::uint64_t n = in.u64("the length of " + detail::quote_excerpt(key));
        if (n > in.left() / min_bytes(v.element))  // refused before anything is reserved for it
          detail::gguf_fail(source_, "array length", detail::quote_excerpt(key) + " has " + std::to_string(n) +
                                                         " elements, more than the " + std::to_string(in.left()) +
                                                         " bytes left can hold");
        v.items.reserve(static_cast<std::size_t>(n));
        for (std::uint64_t i = 0; i < n; ++i) v.items.push_back(read_value(in, v.element, key));
        break;
      }
    }
    return v;
  }

  std::string source_;
  std::shared_ptr<const detail::MappedFile> mapping_;
  std::shared_ptr<const std::vector<std::uint8_t>> memory_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = kGgufDefaultAlignment;
  std::uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::unordered_map<std::string, std::size_t> keys_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
};

// Collects metadata and tensors (each kept in the order first given), then
// writes one GGUF version 3 file that GgufReader and ggml accept.
class GgufWriter {
 public:
  // Sets `key` (replacing its value, keeping its place). general.alignment must be a u32 power of two.
  void set(const std::string& key, GgufValue value) {
    LORA_CHECK(!key.empty(), "GgufWriter::set: an empty key");
    if (key == "general.alignment")
      LORA_CHECK(value.type == GgufType::U32 && value.uint != 0 && (value.uint & (value.uint - 1)) == 0,
                 "GgufWriter: general.alignment must be a u32 power of two");
    check_value(key, value);
    const auto it = keys_.find(key);
    if (it != keys_.end()) {
      metadata_[it->second].second = std::move(value);
      return;
    }
    keys_.emplace(key, metadata_.size());
    metadata_.emplace_back(key, std::move(value));
  }

  // A row-major host matrix as a 2-D tensor of shape [rows, cols], stored as `dtype` (F32, F16, BF16, F64).
  template <class T>
  void add(const std::string& name, MatrixView<T, HostSpace> m, Dtype dtype = Dtype::F32) {
    using U = std::remove_const_t<T>;
    LORA_CHECK(is_floating(dtype), "GgufWriter::add: tensor \"" << name << "\": dtype " << dtype_name(dtype)
                                                                 << " is not a floating type");
    RawTensor t{dtype, {m.rows, m.cols}, std::vector<std::uint8_t>(static_cast<std::size_t>(m.size()) * dtype_size(dtype))};
    const std::size_t row_bytes = static_cast<std::size_t>(m.cols) * dtype_size(dtype);
    for (std::int64_t i = 0; i < m.rows; ++i)
      detail::encode<U>(dtype, m.data + i * m.stride, static_cast<std::size_t>(m.cols),
                        t.bytes.data() + static_cast<std::size_t>(i) * row_bytes);
    add_raw(name, std::move(t));
  }

  // A tensor as stored bytes (little-endian, row-major `shape`, 1 to 4 dimensions).
  void add_raw(const std::string& name, RawTensor tensor) {
    LORA_CHECK(!name.empty() && name.size() <= kGgufMaxNameBytes,
               "GgufWriter: tensor name " << detail::quote_excerpt(name) << " must hold 1 to " << kGgufMaxNameBytes
                                          << " bytes (ggml's limit)");
    LORA_CHECK(!index_.count(name), "GgufWriter: tensor \"" << name << "\" added twice");
    LORA_CHECK(!tensor.shape.empty() && tensor.shape.size() <= kGgufMaxDims,
               "GgufWriter: tensor \"" << name << "\" has " << tensor.shape.size() << " dimensions, GGUF takes 1 to "
                                       << kGgufMaxDims);
    detail::ggml_type_of(tensor.dtype);  // throws for a dtype GGUF does not have
    std::uint64_t numel = 0;
    LORA_CHECK(checked_numel(tensor.shape, &numel) && numel * dtype_size(tensor.dtype) == tensor.bytes.size(),
               "GgufWriter: tensor \"" << name << "\" of shape " << shape_string(tensor.shape) << " " << dtype_name(tensor.dtype)
                                       << " has " << tensor.bytes.size() << " bytes");
    index_.emplace(name, tensors_.size());
    tensors_.emplace_back(name, std::move(tensor));
  }

  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }

  std::vector<std::uint8_t> to_bytes() const {
    std::vector<std::uint8_t> out;
    emit([&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(p);
      out.insert(out.end(), b, b + n);
    });
    return out;
  }
  void write(const std::string& path) const {
    write_file_atomically(path, [&](FileSink& sink) { emit([&](const void* p, std::size_t n) { sink.write(p, n); }); });
  }

 private:
  static void check_value(const std::string& key, const GgufValue& v) {
    if (v.type != GgufType::ARRAY) return;
    LORA_CHECK(v.element != GgufType::ARRAY, "GgufWriter: key \"" << key << "\" is an array of arrays");
    for (const GgufValue& item : v.items)
      LORA_CHECK(item.type == v.element, "GgufWriter: key \"" << key << "\" mixes " << gguf_type_name(item.type) << " into an array of "
                                                             << gguf_type_name(v.element));
  }

  std::uint64_t alignment() const {
    const auto it = keys_.find("general.alignment");
    return it == keys_.end() ? kGgufDefaultAlignment : metadata_[it->second].second.uint;
  }

  template <class Out>
  static void put_value(Out& out, const GgufValue& v) {
    std::uint8_t b[8] = {};
    auto u = [&](std::uint64_t x, int bytes) {
      for (int i = 0; i < bytes; ++i) b[i] = static_cast<std::uint8_t>(x >> (8 * i));
      out(b, static_cast<std::size_t>(bytes));
    };
    switch (v.type) {
      case GgufType::U8: case GgufType::BOOL: u(v.uint, 1); break;
      case GgufType::I8: u(static_cast<std::uint64_t>(v.sint), 1); break;
      case GgufType::U16: u(v.uint, 2); break;
      case GgufType::I16: u(static_cast<std::uint64_t>(v.sint), 2); break;
      case GgufType::U32: u(v.uint, 4); break;
      case GgufType::I32: u(static_cast<std::uint64_t>(v.sint), 4); break;
      case GgufType::U64: u(v.uint, 8); break;
      case GgufType::I64: u(static_cast<std::uint64_t>(v.sint), 8); break;
      case GgufType::F32: u(float_bits(static_cast<float>(v.real)), 4); break;
      case GgufType::F64: u(detail::double_bits(v.real), 8); break;
      case GgufType::STRING:
        u(v.text.size(), 8);
        out(v.text.data(), v.text.size());
        break;
      case GgufType::ARRAY:
        u(static_cast<std::uint32_t>(v.element), 4);
        u(v.items.size(), 8);
        for (const GgufValue& item : v.items) put_value(out, item);
        break;
    }
  }

  template <class Out>
  void emit(Out&& out) const {
    std::uint8_t b[8] = {};
    auto u = [&](std::uint64_t x, int bytes) {
      for (int i = 0; i < bytes; ++i) b[i] = static_cast<std::uint8_t>(x >> (8 * i));
      out(b, static_cast<std::size_t>(bytes));
    };
    auto str = [&](const std::string& s) {
      u(s.size(), 8);
      out(s.data(), s.size());
    };
    std::uint64_t written = 0;
    auto counted = [&](const void* p, std::size_t n) {
      out(p, n);
      written += n;
    };
    out("GGUF", 4);
    u(3, 4);
    u(tensors_.size(), 8);
    u(metadata_.size(), 8);
    written = 24;
    // The header's size is needed for the padding: count it as it is written.
    for (const auto& [key, value] : metadata_) {
      str(key);
      u(static_cast<std::uint32_t>(value.type), 4);
      written += 12 + key.size();
      put_value(counted, value);
    }
    const std::uint64_t align = alignment();
    std::uint64_t offset = 0;
    for (const auto& [name, t] : tensors_) {
      str(name);
      u(t.shape.size(), 4);
      for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) u(static_cast<std::uint64_t>(*d), 8);
      u(static_cast<std::uint32_t>(detail::ggml_type_of(t.dtype)), 4);
      u(offset, 8);
      written += 8 + name.size() + 4 + 8 * t.shape.size() + 4 + 8;
      offset = detail::gguf_pad(offset + t.bytes.size(), align);
    }
    static const std::uint8_t kZeros[256] = {};
    auto pad_to = [&](std::uint64_t from, std::uint64_t to) {
      for (std::uint64_t n = to - from; n > 0;) {
        const std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(n, sizeof kZeros));
        out(kZeros, k);
        n -= k;
      }
    };
    pad_to(written, detail::gguf_pad(written, align));
    for (const auto& [name, t] : tensors_) {
      out(t.bytes.data(), t.bytes.size());
      pad_to(t.bytes.size(), detail::gguf_pad(t.bytes.size(), align));
    }
  }

  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::unordered_map<std::string, std::size_t> keys_;
  std::vector<std::pair<std::string, RawTensor>> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
};

}  // namespace lora::io

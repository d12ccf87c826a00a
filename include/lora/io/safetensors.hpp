// Reading and writing safetensors files, Hugging Face's format for tensors:
//
//   bytes [0, 8)         N, the header length: a little-endian u64, N <= 100,000,000
//   bytes [8, 8 + N)     the header, a UTF-8 JSON object padded with spaces:
//                          {"__metadata__": {"key": "value", ...},
//                           "<name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
//   bytes [8 + N, size)  the data section: each tensor row-major and little-endian at
//                        [begin, end), counted from the start of the section
//
// SafetensorsReader checks every rule of the format before it hands out one
// tensor (a file that breaks one gets a lora::Error naming the check and the
// tensor or byte offset, never a crash or half a result). SafetensorsWriter
// lays files out as the reference implementation does (tensors ordered by
// dtype alignment, largest first, then by name; compact JSON padded with
// spaces to a multiple of 8 bytes) and writes them atomically.
//
// Conversions (see float16.hpp): reading F16, BF16 or F32 into float or
// double, and F64 into double, is exact; F64 into float rounds to nearest
// (ties to even, +-inf beyond the float range). Writing rounds to nearest,
// ties to even, once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/file.hpp"
#include "lora/io/float16.hpp"
#include "lora/io/json.hpp"

namespace lora::io {

// The header may not exceed this many bytes (the reference implementation's limit).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// The safetensors dtypes, in the reference implementation's order (increasing
// alignment), which is also the order the writer lays tensors out in (reversed).
enum class Dtype : std::uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

namespace detail {
struct DtypeEntry {
  Dtype dtype;
  const char* name;
  std::size_t size;
};
inline constexpr DtypeEntry kDtypes[] = {
    {Dtype::BOOL, "BOOL", 1}, {Dtype::U8, "U8", 1},   {Dtype::I8, "I8", 1},     {Dtype::F8_E5M2, "F8_E5M2", 1},
    {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::I16, "I16", 2}, {Dtype::U16, "U16", 2}, {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2}, {Dtype::I32, "I32", 4}, {Dtype::U32, "U32", 4},   {Dtype::F32, "F32", 4},
    {Dtype::F64, "F64", 8},   {Dtype::I64, "I64", 8}, {Dtype::U64, "U64", 8},
};
}  // namespace detail

inline const char* dtype_name(Dtype d) { return detail::kDtypes[static_cast<std::size_t>(d)].name; }
inline std::size_t dtype_size(Dtype d) { return detail::kDtypes[static_cast<std::size_t>(d)].size; }
// True for the dtypes the reader converts to float/double and the writer converts to.
inline bool is_floating(Dtype d) { return d == Dtype::F16 || d == Dtype::BF16 || d == Dtype::F32 || d == Dtype::F64; }
// The dtype named `name` ("F32", ...); false when the name is unknown.
inline bool parse_dtype(const std::string& name, Dtype* out) {
  for (const detail::DtypeEntry& e : detail::kDtypes) {
    if (name == e.name) {
      *out = e.dtype;
      return true;
    }
  }
  return false;
}

template <class T>
constexpr Dtype dtype_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "dtype_of<T>: T must be float or double");
  return std::is_same_v<T, float> ? Dtype::F32 : Dtype::F64;
}

// "[8, 768]"
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The product of `shape`, or false when a dimension is negative or a partial
// product overflows 64 bits (the reference implementation rejects those too).
inline bool checked_numel(const std::vector<std::int64_t>& shape, std::uint64_t* out) {
  std::uint64_t n = 1;
  for (const std::int64_t d : shape) {
    if (d < 0) return false;
    const auto u = static_cast<std::uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u) return false;
    n *= u;
  }
  *out = n;
  return true;
}

// One tensor's entry in the header. begin/end count from the data section.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::uint64_t numel = 0;  // product of shape (1 for a scalar)

  std::uint64_t bytes() const { return end - begin; }
};

// A tensor's raw contents, whatever its dtype: what is kept and written back
// when the data is not ours to interpret (integer buffers, extra tensors).
struct RawTensor {
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};

namespace detail {

inline std::uint16_t load_le16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] | (p[1] << 8)); }
inline std::uint32_t load_le32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
inline std::uint64_t load_le64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(load_le32(p)) | (static_cast<std::uint64_t>(load_le32(p + 4)) << 32);
}
inline void store_le16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
}
inline void store_le32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
inline void store_le64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
inline double double_from_bits(std::uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}
inline std::uint64_t double_bits(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}

// out[i] = element i of `bytes` (little-endian `dtype`) as T, by the rules at the top of this file.
template <class T>
void decode(Dtype dtype, const std::uint8_t* bytes, std::size_t count, T* out) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "decode: T must be float or double");
  switch (dtype) {
    case Dtype::F32:
      for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<T>(float_from_bits(load_le32(bytes + 4 * i)));
      return;
    case Dtype::F64:
      for (std::size_t i = 0; i < count; ++i) {
        const double d = double_from_bits(load_le64(bytes + 8 * i));
        if constexpr (std::is_same_v<T, float>) {
          out[i] = double_to_float(d);
        } else {
          out[i] = d;
        }
      }
      return;
    case Dtype::F16:
      for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<T>(half_to_float(load_le16(bytes + 2 * i)));
      return;
    case Dtype::BF16:
      for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<T>(bfloat16_to_float(load_le16(bytes + 2 * i)));
      return;
    default:
      LORA_CHECK(false, "decode: dtype " << dtype_name(dtype) << " is not a floating type");
  }
}

// Element i of `in` stored as little-endian `dtype` at out + i * dtype_size(dtype).
template <class T>
void encode(Dtype dtype, const T* in, std::size_t count, std::uint8_t* out) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "encode: T must be float or double");
  constexpr bool kDouble = std::is_same_v<T, double>;
  switch (dtype) {
    case Dtype::F32:
      for (std::size_t i = 0; i < count; ++i) {
        const float f = kDouble ? double_to_float(static_cast<double>(in[i])) : static_cast<float>(in[i]);
        store_le32(out + 4 * i, float_bits(f));
      }
      return;
    case Dtype::F64:
      for (std::size_t i = 0; i < count; ++i) store_le64(out + 8 * i, double_bits(static_cast<double>(in[i])));
      return;
    case Dtype::F16:
      for (std::size_t i = 0; i < count; ++i) {
        store_le16(out + 2 * i, kDouble ? double_to_half(static_cast<double>(in[i])) : float_to_half(static_cast<float>(in[i])));
      }
      return;
    case Dtype::BF16:
      for (std::size_t i = 0; i < count; ++i) {
        store_le16(out + 2 * i, kDouble ? double_to_bfloat16(static_cast<double>(in[i]))
                                        : float_to_bfloat16(static_cast<float>(in[i])));
      }
      return;
    default:
      LORA_CHECK(false, "encode: cannot store floating-point values as " << dtype_name(dtype));
  }
}

// Does a stored tensor of `shape` read into a rows x cols matrix: [rows, cols], or [cols] into one row?
inline bool fits_matrix(const std::vector<std::int64_t>& shape, std::int64_t rows, std::int64_t cols) {
  return (shape.size() == 2 && shape[0] == rows && shape[1] == cols) ||
         (shape.size() == 1 && rows == 1 && shape[0] == cols);
}
// fits_matrix, or a lora::Error naming the file, the tensor and both shapes.
inline void check_fits_matrix(const std::string& source, const std::string& name, const std::vector<std::int64_t>& shape,
                              std::int64_t rows, std::int64_t cols) {
  LORA_CHECK(fits_matrix(shape, rows, cols), source << ": tensor " << quote_excerpt(name) << " has shape "
                                                    << shape_string(shape) << ", expected [" << rows << ", " << cols << "]");
}

// Every rejection of a file goes through here, so messages read alike:
// "<file>: invalid safetensors file: <check>: <where and what>".
[[noreturn]] inline void fail_check(const std::string& source, const char* check, const std::string& details) {
  throw Error(source + ": invalid safetensors file: " + check + ": " + details);
}

struct ParsedHeader {
  std::vector<TensorInfo> tensors;  // in header order
  std::map<std::string, std::string> metadata;
};

// A SAX handler for the header: a small state machine that accepts exactly
// the header's grammar, so nothing but names, shapes and offsets is ever
// stored (no DOM of an untrusted 100 MB header) and nesting never goes deeper
// than the format allows. Every departure throws through fail_check.
class HeaderParser final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit HeaderParser(const std::string& source) : source_(source) {}

  ParsedHeader take() { return std::move(result_); }
  bool done() const { return state_ == State::done; }

  bool null() override { unexpected("null"); }
  bool boolean(bool) override { unexpected("a boolean"); }
  bool number_integer(number_integer_t) override { unexpected("a signed integer"); }
  bool number_float(number_float_t, const string_t& text) override { unexpected("the number " + text); }
  bool binary(binary_t&) override { unexpected("binary data"); }

  bool number_unsigned(number_unsigned_t value) override {
    if (state_ == State::shape_items) {
      if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail_check(source_, "shape", "tensor " + quote_excerpt(current_.name) + ": dimension " + std::to_string(value) +
                                         " exceeds 2^63 - 1");
      current_.shape.push_back(static_cast<std::int64_t>(value));
      return true;
    }
    if (state_ == State::offsets_items) {
      if (offsets_seen_ == 2)
        fail_check(source_, "header structure",
                   "tensor " + quote_excerpt(current_.name) + ": data_offsets has more than two entries");
      (offsets_seen_ == 0 ? current_.begin : current_.end) = value;
      ++offsets_seen_;
      return true;
    }
    unexpected("the number " + std::to_string(value));
  }

  bool string(string_t& value) override {
    if (state_ == State::meta_value) {
      result_.metadata.emplace(meta_key_, value);
      state_ = State::meta_keys;
      return true;
    }
    if (state_ == State::dtype_value) {
      if (!parse_dtype(value, &current_.dtype)) {
        std::string known;
        for (const DtypeEntry& e : kDtypes) known += std::string(known.empty() ? "" : ", ") + e.name;
        fail_check(source_, "dtype",
                   "tensor " + quote_excerpt(current_.name) + " has dtype " + quote_excerpt(value) + "; expected one of " + known);
      }
      state_ = State::fields;
      return true;
    }
    unexpected("a string");
  }

  bool start_object(std::size_t) override {
    switch (state_) {
      case State::top:
        state_ = State::top_keys;
        return true;
      case State::entry_start:
        state_ = State::fields;
        return true;
      case State::meta_start:
        state_ = State::meta_keys;
        return true;
      default:
        unexpected("an object");
    }
  }

  bool key(string_t& k) override {
    if (state_ == State::top_keys) {
      if (!names_.insert(k).second)
        fail_check(source_, "duplicate name", quote_excerpt(k) + " appears more than once in the header");
      if (k == "__metadata__") {
        state_ = State::meta_start;
      } else {
        current_ = TensorInfo{};
        current_.name = k;
        seen_dtype_ = seen_shape_ = seen_offsets_ = false;
        state_ = State::entry_start;
      }
      return true;
    }
    if (state_ == State::meta_keys) {
      if (result_.metadata.count(k))
        fail_check(source_, "duplicate name", "__metadata__ key " + quote_excerpt(k) + " appears more than once");
      meta_key_ = k;
      state_ = State::meta_value;
      return true;
    }
    // state_ == fields (the JSON grammar allows a key nowhere else)
    bool* seen = k == "dtype" ? &seen_dtype_ : k == "shape" ? &seen_shape_ : k == "data_offsets" ? &seen_offsets_ : nullptr;
    if (seen == nullptr)
      fail_check(source_, "header structure",
                 "tensor " + quote_excerpt(current_.name) + " has an unknown field " + quote_excerpt(k) +
                     " (expected dtype, shape, data_offsets)");
    if (*seen)
      fail_check(source_, "duplicate name", "tensor " + quote_excerpt(current_.name) + " gives " + k + " twice");
    *seen = true;
    state_ = k == "dtype" ? State::dtype_value : k == "shape" ? State::shape_start : State::offsets_start;
    return true;
  }

  bool end_object() override {
    switch (state_) {
      case State::top_keys:
        state_ = State::done;
        return true;
      case State::meta_keys:
        state_ = State::top_keys;
        return true;
      case State::fields: {
        const char* missing = !seen_dtype_ ? "dtype" : !seen_shape_ ? "shape" : !seen_offsets_ ? "data_offsets" : nullptr;
        if (missing)
          fail_check(source_, "header structure", "tensor " + quote_excerpt(current_.name) + " has no " + missing);
        result_.tensors.push_back(std::move(current_));
        state_ = State::top_keys;
        return true;
      }
      default:
        unexpected("the end of an object");
    }
  }

  bool start_array(std::size_t) override {
    if (state_ == State::shape_start) {
      state_ = State::shape_items;
      return true;
    }
    if (state_ == State::offsets_start) {
      offsets_seen_ = 0;
      state_ = State::offsets_items;
      return true;
    }
    unexpected("an array");
  }

  bool end_array() override {
    if (state_ == State::shape_items) {
      state_ = State::fields;
      return true;
    }
    if (state_ == State::offsets_items) {
      if (offsets_seen_ != 2)
        fail_check(source_, "header structure",
                   "tensor " + quote_excerpt(current_.name) + ": data_offsets has " + std::to_string(offsets_seen_) +
                       " entries, expected two");
      state_ = State::fields;
      return true;
    }
    unexpected("the end of an array");
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& ex) override {
    std::string what = ex.what();
    if (what.size() > 300) what = what.substr(0, 300) + "...";
    fail_check(source_, "header JSON",
               "not valid JSON near header byte " + std::to_string(position) + " (file byte " +
                   std::to_string(8 + position) + "): " + what);
  }

 private:
  enum class State {
    top, top_keys, entry_start, fields, dtype_value, shape_start, shape_items, offsets_start, offsets_items,
    meta_start, meta_keys, meta_value, done
  };

  [[noreturn]] void unexpected(const std::string& found) const {
    std::string expected;
    const std::string tensor = "tensor " + quote_excerpt(current_.name);
    switch (state_) {
      case State::top: expected = "the header to be a JSON object"; break;
      case State::entry_start: expected = tensor + " to be an object {dtype, shape, data_offsets}"; break;
      case State::dtype_value: expected = tensor + ": dtype to be a string"; break;
      case State::shape_start:
      case State::shape_items: expected = tensor + ": shape to be an array of non-negative integers"; break;
      case State::offsets_start:
      case State::offsets_items: expected = tensor + ": data_offsets to be two non-negative integers"; break;
      case State::meta_start: expected = "__metadata__ to be an object of strings"; break;
      case State::meta_value: expected = "__metadata__ value " + quote_excerpt(meta_key_) + " to be a string"; break;
      default: expected = "the header's structure"; break;
    }
    fail_check(source_, "header structure", "expected " + expected + ", found " + found);
  }

  const std::string& source_;
  State state_ = State::top;
  ParsedHeader result_;
  std::unordered_set<std::string> names_;
  TensorInfo current_;
  bool seen_dtype_ = false, seen_shape_ = false, seen_offsets_ = false;
  int offsets_seen_ = 0;
  std::string meta_key_;
};

// The header bytes -> tensors and metadata, with every rule of the format
// checked against a data section of `data_size` bytes.
inline ParsedHeader parse_header(const char* header, std::size_t n, std::uint64_t data_size, const std::string& source) {
  if (n == 0 || header[0] != '{')
    fail_check(source, "header start", "the header (file byte 8) must begin with '{'");
  // JSON text holds no NUL byte, but the JSON parser stops at one: what follows it would go unread.
  if (const void* nul = std::memchr(header, '\0', n)) {
    const std::size_t at = static_cast<std::size_t>(static_cast<const char*>(nul) - header);
    fail_check(source, "header JSON",
               "header byte " + std::to_string(at) + " (file byte " + std::to_string(8 + at) +
                   ") is a NUL byte; the header must be UTF-8 JSON text padded with spaces");
  }
  HeaderParser parser(source);
  try {
    nlohmann::json::sax_parse(header, header + n, &parser, nlohmann::json::input_format_t::json, /*strict=*/true);
  } catch (const nlohmann::json::exception& e) {  // defensive: the handler reports errors itself
    fail_check(source, "header JSON", e.what());
  }
  if (!parser.done()) fail_check(source, "header JSON", "the header ends before its JSON object does");
  ParsedHeader parsed = parser.take();

  // Offsets, sizes, overlaps and coverage, with each tensor's file byte range in the message.
  const std::uint64_t data_start = 8 + n;
  auto where = [&](const TensorInfo& t) {
    return "tensor " + quote_excerpt(t.name) + " at data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
           ") (file bytes [" + std::to_string(data_start + t.begin) + ", " + std::to_string(data_start + t.end) + "))";
  };
  for (TensorInfo& t : parsed.tensors) {
    if (t.begin > t.end) fail_check(source, "data_offsets", where(t) + ": begin is after end");
    if (t.end > data_size)
      fail_check(source, "data_offsets",
                 where(t) + ": ends past the data section, which holds " + std::to_string(data_size) + " bytes");
    std::uint64_t bytes = 0;
    if (!checked_numel(t.shape, &t.numel) || t.numel > std::numeric_limits<std::uint64_t>::max() / dtype_size(t.dtype))
      fail_check(source, "shape", "tensor " + quote_excerpt(t.name) + ": shape " + shape_string(t.shape) +
                                      " has more elements than 64 bits count");
    bytes = t.numel * dtype_size(t.dtype);
    if (bytes != t.end - t.begin)
      fail_check(source, "byte size",
                 where(t) + ": shape " + shape_string(t.shape) + " x " + dtype_name(t.dtype) + " (" +
                     std::to_string(dtype_size(t.dtype)) + " bytes) needs " + std::to_string(bytes) +
                     " bytes, the offsets hold " + std::to_string(t.end - t.begin));
  }
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(parsed.tensors.size());
  for (const TensorInfo& t : parsed.tensors) by_offset.push_back(&t);
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t covered = 0;  // the data section's bytes [0, covered) belong to the tensors seen so far
  const TensorInfo* previous = nullptr;
  for (const TensorInfo* t : by_offset) {
    if (t->begin < covered)
      fail_check(source, "overlap", where(*t) + " overlaps " + where(*previous));
    if (t->begin > covered)
      fail_check(source, "gap",
                 "data section bytes [" + std::to_string(covered) + ", " + std::to_string(t->begin) + ") (file bytes [" +
                     std::to_string(data_start + covered) + ", " + std::to_string(data_start + t->begin) +
                     ")) belong to no tensor; the next is " + where(*t));
    covered = t->end;
    previous = t;
  }
  if (covered != data_size)
    fail_check(source, "coverage",
               "the data section holds " + std::to_string(data_size) + " bytes but the tensors cover only [0, " +
                   std::to_string(covered) + "); file bytes [" + std::to_string(data_start + covered) + ", " +
                   std::to_string(data_start + data_size) + ") belong to no tensor");
  return parsed;
}

}  // namespace detail

// A raw tensor's elements as T (float or double), converted as SafetensorsReader::read does.
template <class T>
std::vector<T> values_of(const RawTensor& t) {
  LORA_CHECK(is_floating(t.dtype), "values_of: dtype " << dtype_name(t.dtype)
                                                       << " does not convert to floating point (F16, BF16, F32, F64 do)");
  const std::size_t n = t.bytes.size() / dtype_size(t.dtype);
  std::vector<T> out(n);
  detail::decode(t.dtype, t.bytes.data(), n, out.data());
  return out;
}

// A validated safetensors file: the header is parsed and checked when the
// reader is made; tensor data is read on request (from the file for open(),
// from the mapping for map(), from memory for from_memory()).
class SafetensorsReader {
 public:
  // Opens and validates `path`. Throws lora::Error on any I/O failure or broken
  // rule, naming the file (and what is there instead of a regular file).
  static SafetensorsReader open(const std::string& path) {
    return detail::with_file_errors(path, [&] {
      detail::check_regular_file(path);
      SafetensorsReader reader;
      reader.source_ = path;
      std::error_code ec;
      const std::uint64_t size = std::filesystem::file_size(path, ec);
      LORA_CHECK(!ec, "cannot open " << path << ": " << ec.message());
      std::ifstream in(path, std::ios::binary);
      LORA_CHECK(in.is_open(), "cannot open " << path);
      reader.file_size_ = size;
      std::uint8_t prefix[8] = {};
      if (size >= 8) {
        in.read(reinterpret_cast<char*>(prefix), 8);
        LORA_CHECK(in.gcount() == 8, "reading " << path << ": short read");
      }
      const std::uint64_t n = reader.check_header_length(prefix);
      std::string header(static_cast<std::size_t>(n), '\0');
      in.read(header.data(), static_cast<std::streamsize>(n));
      LORA_CHECK(static_cast<std::uint64_t>(in.gcount()) == n, "reading " << path << ": short read in the header");
      reader.finish(header.data(), static_cast<std::size_t>(n));
      return reader;
    });
  }

  // Opens and validates `path` memory-mapped (read-only; see detail::MappedFile):
  // the reader holds the mapping, stored_bytes() points into it, and tensor data
  // is paged in from the file only when it is touched. Throws as open() does.
  static SafetensorsReader map(const std::string& path) {
    return detail::with_file_errors(path, [&] {
      SafetensorsReader reader;
      reader.source_ = path;
      reader.mapping_ = std::make_shared<const detail::MappedFile>(path);
      reader.file_size_ = reader.mapping_->size();
      const std::uint8_t* all = reader.mapping_->data();
      const std::uint8_t none[8] = {};
      const std::uint64_t n = reader.check_header_length(all ? all : none);
      reader.finish(reinterpret_cast<const char*>(all) + 8, static_cast<std::size_t>(n));
      return reader;
    });
  }

  // Validates a whole file held in memory (what the fuzzer and the tests use).
  static SafetensorsReader from_memory(std::vector<std::uint8_t> bytes, std::string source = "<memory>") {
    SafetensorsReader reader;
    reader.source_ = std::move(source);
    reader.memory_ = std::move(bytes);
    reader.in_memory_ = true;
    reader.file_size_ = reader.memory_.size();
    const std::uint64_t n = reader.check_header_length(reader.memory_.data());
    reader.finish(reinterpret_cast<const char*>(reader.memory_.data()) + 8, static_cast<std::size_t>(n));
    return reader;
  }

  const std::string& source() const { return source_; }
  // Tensors in the order of their data.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const {
    const auto it = index_.find(name);
    LORA_CHECK(it != index_.end(), source_ << ": no tensor named \"" << name << "\"");
    return tensors_[it->second];
  }
  // 8 + N: the file offset of the data section.
  std::uint64_t data_offset() const { return data_offset_; }
  std::uint64_t file_size() const { return file_size_; }

  // The tensor's stored bytes (little-endian, row-major) where they lie in
  // memory: in the mapping of a reader made by map(), in the buffer of one made
  // by from_memory(); nullptr for a reader made by open(), which reads the file
  // on request. Valid while this reader (or a copy of it) lives.
  const std::uint8_t* stored_bytes(const std::string& name) const {
    const TensorInfo& t = info(name);
    const std::uint8_t* all = contents();
    return all ? all + data_offset_ + t.begin : nullptr;
  }

  // The tensor's bytes as stored (little-endian, row-major).
  std::vector<std::uint8_t> read_bytes(const std::string& name) const {
    const TensorInfo& t = info(name);
    std::vector<std::uint8_t> out = allocate(t, t.bytes(), [&] { return std::vector<std::uint8_t>(t.bytes()); });
    std::size_t done = 0;
    for_each_chunk(t, [&](const std::uint8_t* bytes, std::size_t n) {
      std::memcpy(out.data() + done, bytes, n);
      done += n;
    });
    return out;
  }

  RawTensor read_raw(const std::string& name) const {
    const TensorInfo& t = info(name);
    return RawTensor{t.dtype, t.shape, read_bytes(name)};
  }

  // All elements, row-major, converted to T (float or double) by the rules at
  // the top of this file. The tensor must be F16, BF16, F32 or F64.
  template <class T>
  std::vector<T> read(const std::string& name) const {
    const TensorInfo& t = check_floating(name);
    std::vector<T> out = allocate(t, t.numel * sizeof(T), [&] { return std::vector<T>(t.numel); });
    std::size_t done = 0;
    for_each_chunk(t, [&](const std::uint8_t* bytes, std::size_t n) {
      const std::size_t count = n / dtype_size(t.dtype);
      detail::decode(t.dtype, bytes, count, out.data() + done);
      done += count;
    });
    return out;
  }

  // Reads a 2-D tensor [rows, cols] (or a 1-D [cols] into a 1 x cols view)
  // into `out`, which must have exactly that shape; converted as read<T>.
  // Nothing of the tensor's size is allocated: it is decoded as it is read.
  template <class T>
  void read_into(const std::string& name, MatrixView<T, HostSpace> out) const {
    const TensorInfo& t = check_floating(name);
    detail::check_fits_matrix(source_, name, t.shape, out.rows, out.cols);
    check_shape(out, out.rows, out.cols, name.c_str());
    if (out.size() == 0) return;  // (a [2^62, 0] tensor must not loop 2^62 times)
    const std::size_t element = dtype_size(t.dtype);
    std::int64_t row = 0, col = 0;  // where the next element goes
    for_each_chunk(t, [&](const std::uint8_t* bytes, std::size_t n) {
      for (std::size_t left = n / element; left > 0;) {  // the chunk may end and begin mid-row
        const std::size_t count = std::min<std::size_t>(left, static_cast<std::size_t>(out.cols - col));
        detail::decode(t.dtype, bytes, count, out.data + row * out.stride + col);
        bytes += count * element;
        left -= count;
        col += static_cast<std::int64_t>(count);
        if (col == out.cols) {
          col = 0;
          ++row;
        }
      }
    });
  }

 private:
  SafetensorsReader() = default;

  // Tensors are read in pieces of this many bytes (a multiple of every dtype's size).
  static constexpr std::size_t kChunkBytes = std::size_t{1} << 20;

  // make() allocates `bytes` for tensor t, or a lora::Error names the tensor, its size and the file.
  template <class F>
  auto allocate(const TensorInfo& t, std::uint64_t bytes, F&& make) const -> decltype(make()) {
    return detail::allocate_for(source_ + ": tensor " + detail::quote_excerpt(t.name) + " " + shape_string(t.shape) +
                                    " " + dtype_name(t.dtype),
                                bytes, std::forward<F>(make));
  }

  // Calls consume(bytes, n) on the tensor's stored bytes in order, at most
  // kChunkBytes at a time, each piece a whole number of elements.
  template <class F>
  void for_each_chunk(const TensorInfo& t, F&& consume) const {
    if (t.bytes() == 0) return;
    if (const std::uint8_t* all = contents()) {
      for (std::uint64_t at = 0; at < t.bytes(); at += kChunkBytes)
        consume(all + data_offset_ + t.begin + at,
                static_cast<std::size_t>(std::min<std::uint64_t>(kChunkBytes, t.bytes() - at)));
      return;
    }
    detail::with_file_errors(source_, [&] {
      detail::check_regular_file(source_);
      std::error_code ec;
      const std::uint64_t size = std::filesystem::file_size(source_, ec);
      LORA_CHECK(!ec && size == file_size_, source_ << ": the file changed since it was opened (" << file_size_
                                                    << " bytes then, " << (ec ? 0 : size) << " now)");
      std::ifstream in(source_, std::ios::binary);
      LORA_CHECK(in.is_open(), "cannot open " << source_);
      in.seekg(static_cast<std::streamoff>(data_offset_ + t.begin));
      std::vector<std::uint8_t> buffer(static_cast<std::size_t>(std::min<std::uint64_t>(kChunkBytes, t.bytes())));
      for (std::uint64_t at = 0; at < t.bytes(); at += buffer.size()) {
        const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), t.bytes() - at));
        in.read(reinterpret_cast<char*>(buffer.data()), static_cast<std::streamsize>(n));
        LORA_CHECK(in.good(), source_ << ": short read of tensor " << detail::quote_excerpt(t.name) << " at byte "
                                      << data_offset_ + t.begin + at);
        consume(buffer.data(), n);
      }
    });
  }

  const TensorInfo& check_floating(const std::string& name) const {
    const TensorInfo& t = info(name);
    LORA_CHECK(is_floating(t.dtype), source_ << ": tensor \"" << name << "\" has dtype " << dtype_name(t.dtype)
                                             << "; only F16, BF16, F32 and F64 convert to floating point");
    return t;
  }

  // The first 8 bytes (when the file has them) -> N, checked against the limits and the file size.
  std::uint64_t check_header_length(const std::uint8_t* prefix) const {
    if (file_size_ < 8)
      detail::fail_check(source_, "file size",
                         "the file holds " + std::to_string(file_size_) + " bytes, fewer than the 8-byte header length");
    const std::uint64_t n = detail::load_le64(prefix);
    if (n > kMaxHeaderBytes)
      detail::fail_check(source_, "header length",
                         "bytes [0, 8) give a header of " + std::to_string(n) + " bytes, more than the limit of " +
                             std::to_string(kMaxHeaderBytes));
    if (n > file_size_ - 8)
      detail::fail_check(source_, "header length",
                         "bytes [0, 8) give a header of " + std::to_string(n) + " bytes, but the file holds only " +
                             std::to_string(file_size_ - 8) + " bytes after them");
    return n;
  }

  void finish(const char* header, std::size_t n) {
    data_offset_ = 8 + n;
    detail::ParsedHeader parsed = detail::parse_header(header, n, file_size_ - data_offset_, source_);
    metadata_ = std::move(parsed.metadata);
    tensors_ = std::move(parsed.tensors);
    std::stable_sort(tensors_.begin(), tensors_.end(),
                     [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  // The whole file when the reader holds it (from_memory, map), else nullptr.
  const std::uint8_t* contents() const {
    return mapping_ ? mapping_->data() : in_memory_ ? memory_.data() : nullptr;
  }

  std::string source_;
  bool in_memory_ = false;
  std::vector<std::uint8_t> memory_;
  std::shared_ptr<const detail::MappedFile> mapping_;  // shared: copies of a mapped reader share one mapping
  std::uint64_t file_size_ = 0;
  std::uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors and metadata, then writes one safetensors file laid out as
// the reference implementation lays it out, so a file written here matches,
// byte for byte, what Python's safetensors writes for the same tensors.
class SafetensorsWriter {
 public:
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // values: numel(shape) elements of T (float or double), row-major, stored as `dtype`.
  template <class T>
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const T* values,
           Dtype dtype = dtype_of<T>()) {
    LORA_CHECK(is_floating(dtype), "SafetensorsWriter::add(\"" << name << "\"): cannot store floating-point values as "
                                                               << dtype_name(dtype) << "; use add_raw");
    const std::uint64_t n = element_count(name, shape);
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(n * dtype_size(dtype)));
    detail::encode(dtype, values, static_cast<std::size_t>(n), bytes.data());
    insert(name, RawTensor{dtype, shape, std::move(bytes)});
  }

  // A host matrix (any stride) as a [rows, cols] tensor.
  template <class T>
  void add(const std::string& name, MatrixView<T, HostSpace> m, Dtype dtype = dtype_of<std::remove_const_t<T>>()) {
    using U = std::remove_const_t<T>;
    LORA_CHECK(is_floating(dtype), "SafetensorsWriter::add(\"" << name << "\"): cannot store floating-point values as "
                                                               << dtype_name(dtype) << "; use add_raw");
    check_shape(m, m.rows, m.cols, name.c_str());
    const std::vector<std::int64_t> shape{m.rows, m.cols};
    const std::uint64_t n = element_count(name, shape);
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(n * dtype_size(dtype)));
    const std::size_t row_bytes = static_cast<std::size_t>(m.cols) * dtype_size(dtype);
    for (std::int64_t i = 0; i < m.rows && n != 0; ++i)
      detail::encode<U>(dtype, m.data + i * m.stride, static_cast<std::size_t>(m.cols),
                        bytes.data() + static_cast<std::size_t>(i) * row_bytes);
    insert(name, RawTensor{dtype, shape, std::move(bytes)});
  }

  // Bytes already in the stored form (any dtype); their count must match the shape.
  void add_raw(const std::string& name, RawTensor tensor) {
    const std::uint64_t n = element_count(name, tensor.shape);
    LORA_CHECK(tensor.bytes.size() == n * dtype_size(tensor.dtype),
               "SafetensorsWriter::add_raw(\"" << name << "\"): shape " << shape_string(tensor.shape) << " x "
                                               << dtype_name(tensor.dtype) << " needs " << n * dtype_size(tensor.dtype)
                                               << " bytes, found " << tensor.bytes.size());
    insert(name, std::move(tensor));
  }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  std::size_t size() const { return tensors_.size(); }

  // The header exactly as written after the 8-byte length: compact JSON,
  // __metadata__ first (when there is any), then the tensors in data order,
  // padded with spaces to a multiple of 8 bytes.
  std::string header() const {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json meta = nlohmann::ordered_json::object();
      for (const auto& [key, value] : metadata_) meta[key] = value;
      j["__metadata__"] = std::move(meta);
    }
    std::uint64_t offset = 0;
    for (const auto* entry : ordered()) {
      const RawTensor& t = entry->second;
      nlohmann::ordered_json info = nlohmann::ordered_json::object();
      info["dtype"] = dtype_name(t.dtype);
      info["shape"] = t.shape;
      info["data_offsets"] = {offset, offset + t.bytes.size()};
      offset += t.bytes.size();
      j[entry->first] = std::move(info);
    }
    std::string text;
    try {
      text = j.dump();
    } catch (const nlohmann::json::exception& e) {
      LORA_CHECK(false, "SafetensorsWriter: a tensor name or metadata string is not valid UTF-8: " << e.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');
    return text;
  }

  // The whole file in memory.
  std::vector<std::uint8_t> to_bytes() const {
    std::vector<std::uint8_t> out;
    emit([&](const void* data, std::size_t n) {
      const auto* p = static_cast<const std::uint8_t*>(data);
      out.insert(out.end(), p, p + n);
    });
    return out;
  }

  // Writes `path` atomically (see atomic_file.hpp): an interrupted write leaves the previous file intact.
  void write(const std::string& path) const {
    detail::with_file_errors(path, [&] { write_file_atomically(path, [&](FileSink& sink) { write_to(sink); }); });
  }
  // The whole file into `sink` (what write() and write_directory_atomically's callers use).
  void write_to(FileSink& sink) const {
    emit([&](const void* d, std::size_t n) { sink.write(d, n); });
  }

 private:
  using Entry = std::pair<const std::string, RawTensor>;

  static std::uint64_t element_count(const std::string& name, const std::vector<std::int64_t>& shape) {
    std::uint64_t n = 0;
    LORA_CHECK(checked_numel(shape, &n) && n <= (std::uint64_t{1} << 60),
               "SafetensorsWriter: tensor \"" << name << "\" has an invalid shape " << shape_string(shape));
    return n;
  }

  void insert(const std::string& name, RawTensor tensor) {
    LORA_CHECK(name != "__metadata__", "SafetensorsWriter: \"__metadata__\" is reserved and cannot name a tensor");
    LORA_CHECK(tensors_.emplace(name, std::move(tensor)).second,
               "SafetensorsWriter: a tensor named \"" << name << "\" was already added");
  }

  // The reference order: dtype descending (largest alignment first), then name.
  std::vector<const Entry*> ordered() const {
    std::vector<const Entry*> out;
    for (const Entry& e : tensors_) out.push_back(&e);
    std::stable_sort(out.begin(), out.end(),
                     [](const Entry* a, const Entry* b) { return a->second.dtype > b->second.dtype; });
    return out;  // std::map iteration already sorted each dtype's names
  }

  template <class Out>
  void emit(Out&& out) const {
    const std::string h = header();
    std::uint8_t prefix[8];
    detail::store_le64(prefix, h.size());
    out(prefix, 8);
    out(h.data(), h.size());
    for (const Entry* e : ordered())
      if (!e->second.bytes.empty()) out(e->second.bytes.data(), e->second.bytes.size());
  }

  std::map<std::string, RawTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// ---- model.safetensors.index.json: the index of a sharded model ---------------------------

//   {"metadata": {"total_size": <bytes>, ...}, "weight_map": {"<tensor>": "<shard file>", ...}}
// Each shard is a file in the index's own directory: a name, never a path.
struct SafetensorsIndex {
  nlohmann::ordered_json json;                                    // the whole file, to write an updated copy back
  std::vector<std::pair<std::string, std::string>> weight_map;   // tensor -> shard file name, in file order
};

// The index in `text` (the contents of `source`, named in every error), checked as above.
inline SafetensorsIndex parse_safetensors_index(const std::string& text, const std::string& source) {
  SafetensorsIndex index;
  index.json = parse_untrusted_json(text, source);
  LORA_CHECK(index.json.is_object() && index.json.contains("weight_map") && index.json.at("weight_map").is_object(),
             source << ": expected an object with a \"weight_map\" object");
  for (const auto& [tensor, file] : index.json.at("weight_map").items()) {
    LORA_CHECK(file.is_string(), source << ": weight_map[" << detail::quote_excerpt(tensor) << "] is "
                                        << detail::json_excerpt(file) << ", expected a file name");
    const std::string& shard = file.get_ref<const std::string&>();
    LORA_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard.find('\\') == std::string::npos &&
                   shard != "." && shard != "..",
               source << ": weight_map[" << detail::quote_excerpt(tensor) << "] = " << detail::quote_excerpt(shard)
                      << " is not a file name in the index's directory");
    index.weight_map.emplace_back(tensor, shard);
  }
  return index;
}

// Reads and checks a model.safetensors.index.json of at most 256 MB.
inline SafetensorsIndex read_safetensors_index(const std::string& path) {
  return detail::with_file_errors(path, [&] {
    return parse_safetensors_index(detail::read_text_file(path, std::uintmax_t{1} << 28), path);
  });
}

}  // namespace lora::io

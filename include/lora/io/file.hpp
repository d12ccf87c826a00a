// Reading files the library does not control: every failure becomes a
// lora::Error that names the file and the real problem (a directory, a FIFO,
// a symlink loop, a tensor larger than the machine's memory), never a foreign
// exception (std::filesystem::filesystem_error, std::bad_alloc) or a hang on a
// FIFO that nobody writes.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "lora/core/error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LORA_HAS_MMAP 1
#endif

namespace lora::io::detail {

// Untrusted text in a message: quoted, and cut to `max` bytes with the full size said.
inline std::string quote_excerpt(const std::string& s, std::size_t max = 200) {
  if (s.size() <= max) return "\"" + s + "\"";
  return "\"" + s.substr(0, max) + "\"... (" + std::to_string(s.size()) + " bytes)";
}

// Throws unless `path` (after symlinks) is a regular file: names what is there instead.
inline void check_regular_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    LORA_CHECK(false, "cannot open " << path << ": " << ec.message());  // a symlink loop, a permission, ...
  const char* found = "it is not a regular file";
  switch (status.type()) {
    case fs::file_type::regular: return;
    case fs::file_type::not_found: found = "no such file"; break;
    case fs::file_type::directory: found = "it is a directory, expected a regular file"; break;
    case fs::file_type::fifo: found = "it is a FIFO (named pipe), expected a regular file"; break;
    case fs::file_type::socket: found = "it is a socket, expected a regular file"; break;
    case fs::file_type::block:
    case fs::file_type::character: found = "it is a device, expected a regular file"; break;
    default: break;
  }
  LORA_CHECK(false, "cannot open " << path << ": " << found);
}

// Runs f(); a std::filesystem::filesystem_error or std::bad_alloc escaping it
// becomes a lora::Error naming `path` (what the caller was reading or writing).
template <class F>
auto with_file_errors(const std::string& path, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::filesystem::filesystem_error& e) {
    throw Error(path + ": " + e.code().message() + " (" + e.what() + ")");
  } catch (const std::bad_alloc&) {
    throw Error(path + ": out of memory while reading or writing it");
  }
}

// The machine's physical memory in bytes, or 0 when it cannot be told.
inline std::uint64_t physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
#endif
  return 0;
}

// Throws unless `bytes` of `what` (tensors, with their file) could fit in this
// machine's memory: a header may declare a 64 GiB tensor in a sparse file, and
// allocating it first would end in the out-of-memory killer, not an error.
inline void check_fits_in_memory(const std::string& what, std::uint64_t bytes) {
  const std::uint64_t memory = physical_memory_bytes();
  LORA_CHECK(memory == 0 || bytes <= memory, what << ": " << bytes << " bytes (" << (bytes >> 30)
                                                  << " GiB) needed in memory, more than this machine's " << memory
                                                  << " bytes (" << (memory >> 30) << " GiB)");
}

// What make() allocates for `bytes` bytes of `what` (a tensor, with its file):
// checked as check_fits_in_memory checks, and a failed allocation becomes a
// lora::Error naming `what` and its size.
template <class F>
auto allocate_for(const std::string& what, std::uint64_t bytes, F&& make) -> decltype(make()) {
  check_fits_in_memory(what, bytes);
  try {
    return make();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {  // std::bad_alloc, or std::length_error from a container
    throw Error(what + ": allocating " + std::to_string(bytes) + " bytes (" + std::to_string(bytes >> 30) +
                " GiB) for it failed: " + e.what());
  }
}

// The whole of a small file (a JSON config), at most `max_bytes` of it.
inline std::string read_text_file(const std::string& path, std::uintmax_t max_bytes) {
  check_regular_file(path);
  std::error_code ec;
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  LORA_CHECK(!ec, "cannot open " << path << ": " << ec.message());
  LORA_CHECK(size <= max_bytes, path << " holds " << size << " bytes, more than the " << max_bytes << " expected");
  std::ifstream in(path, std::ios::binary);
  LORA_CHECK(in.is_open(), "cannot open " << path);
  std::string text(static_cast<std::size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  LORA_CHECK(static_cast<std::uintmax_t>(in.gcount()) == size, "reading " << path << ": short read");
  return text;
}

// A whole regular file, read-only in memory: mapped with POSIX mmap where
// there is one (pages are read when first touched and shared with the page
// cache; nothing is copied), read into a buffer elsewhere. Move-only; the
// destructor unmaps. A file truncated by another process while it is mapped
// faults on access (SIGBUS), as every mmap reader does (safetensors' own,
// llama.cpp): map files that are not being rewritten.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path) : path_(path) {
    check_regular_file(path);
#if defined(LORA_HAS_MMAP)
    // O_NONBLOCK: a FIFO swapped in after the check above must not hang open(); fstat then refuses it.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    LORA_CHECK(fd >= 0, "cannot open " << path << ": " << std::strerror(errno));
    struct stat st {};
    const bool stat_ok = ::fstat(fd, &st) == 0;
    const int stat_errno = errno;
    if (!stat_ok || !S_ISREG(st.st_mode)) {
      ::close(fd);
      LORA_CHECK(false, "cannot open " << path << ": "
                                       << (stat_ok ? "it is not a regular file" : std::strerror(stat_errno)));
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size > std::numeric_limits<std::size_t>::max()) {
      ::close(fd);
      LORA_CHECK(false, path << ": " << size << " bytes do not fit this machine's address space");
    }
    size_ = static_cast<std::size_t>(size);
    if (size_ > 0) {  // mmap of 0 bytes is an error; an empty file maps to nothing
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int map_errno = errno;
      ::close(fd);  // the mapping keeps the file open
      LORA_CHECK(p != MAP_FAILED, "cannot map " << path << " (" << size_ << " bytes): " << std::strerror(map_errno));
      data_ = static_cast<const std::uint8_t*>(p);
      mapped_ = true;
    } else {
      ::close(fd);
    }
#else
    std::error_code ec;
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    LORA_CHECK(!ec, "cannot open " << path << ": " << ec.message());
    buffer_ = allocate_for(path, size, [&] { return std::vector<std::uint8_t>(static_cast<std::size_t>(size)); });
    std::ifstream in(path, std::ios::binary);
    LORA_CHECK(in.is_open(), "cannot open " << path);
    in.read(reinterpret_cast<char*>(buffer_.data()), static_cast<std::streamsize>(size));
    LORA_CHECK(static_cast<std::uintmax_t>(in.gcount()) == size, "reading " << path << ": short read");
    data_ = buffer_.data();
    size_ = buffer_.size();
#endif
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept { swap(other); }
  MappedFile& operator=(MappedFile&& other) noexcept {
    MappedFile(std::move(other)).swap(*this);
    return *this;
  }
  ~MappedFile() {
#if defined(LORA_HAS_MMAP)
    if (mapped_) ::munmap(const_cast<std::uint8_t*>(data_), size_);
#endif
  }

  const std::string& path() const { return path_; }
  const std::uint8_t* data() const { return data_; }  // nullptr for an empty file
  std::size_t size() const { return size_; }
  // True when the bytes are a mapping of the file (not a copy of it).
  bool mapped() const { return mapped_; }

 private:
  void swap(MappedFile& other) noexcept {
    std::swap(path_, other.path_);
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(mapped_, other.mapped_);
    buffer_.swap(other.buffer_);
  }

  std::string path_;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::vector<std::uint8_t> buffer_;  // the file's bytes where there is no mmap
};

}  // namespace lora::io::detail

// Atomic file replacement: readers of `path` see either the previous file or
// the complete new one, never a prefix. The new contents go to a temporary file
// in the same directory (same file system, so the rename is atomic), which is
// flushed, fsync'ed and then renamed over `path`; the directory is fsync'ed so
// the rename itself survives a crash. On any failure the temporary file is
// removed and `path` is left as it was.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "lora/core/error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#define LORA_IO_POSIX 1
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace lora::io {

// Where write_file_atomically's callback writes: buffered, checked writes to the temporary file.
class FileSink {
 public:
  void write(const void* data, std::size_t n) {
    const auto* bytes = static_cast<const std::uint8_t*>(data);
    if (buffer_.size() + n > kBufferBytes) flush();
    if (n >= kBufferBytes) {
      write_out(bytes, n);
    } else {
      buffer_.insert(buffer_.end(), bytes, bytes + n);
    }
  }
  void write(const std::string& s) { write(s.data(), s.size()); }
  std::uint64_t bytes_written() const { return written_ + buffer_.size(); }

 private:
  template <class F>
  friend void write_file_atomically(const std::string& path, F&& fill);

  static constexpr std::size_t kBufferBytes = std::size_t{1} << 20;

  explicit FileSink(std::string temp_path) : temp_path_(std::move(temp_path)) {}

  void flush() {
    if (!buffer_.empty()) write_out(buffer_.data(), buffer_.size());
    buffer_.clear();
  }

#if defined(LORA_IO_POSIX)
  void write_out(const std::uint8_t* data, std::size_t n) {
    while (n > 0) {
      const ::ssize_t done = ::write(fd_, data, n);
      if (done < 0 && errno == EINTR) continue;
      LORA_CHECK(done > 0, "writing " << temp_path_ << ": " << std::strerror(errno));
      data += done;
      n -= static_cast<std::size_t>(done);
      written_ += static_cast<std::uint64_t>(done);
    }
  }
  int fd_ = -1;
#else
  void write_out(const std::uint8_t* data, std::size_t n) {
    out_.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n));
    LORA_CHECK(out_.good(), "writing " << temp_path_ << " failed");
    written_ += n;
  }
  std::ofstream out_;
#endif

  std::string temp_path_;
  std::vector<std::uint8_t> buffer_;
  std::uint64_t written_ = 0;
};

namespace detail {
// A name no other writer (thread or process) uses at the same time: ".<name>.tmp.<pid>.<n>".
inline std::string temporary_path_for(const std::filesystem::path& path) {
  static std::atomic<std::uint64_t> counter{0};
#if defined(LORA_IO_POSIX)
  const long pid = static_cast<long>(::getpid());
#else
  const long pid = 0;
#endif
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  return (dir / ("." + path.filename().string() + ".tmp." + std::to_string(pid) + "." + std::to_string(counter++)))
      .string();
}
}  // namespace detail

// Calls fill(FileSink&) to produce the new contents of `path`, then replaces
// `path` atomically. An exception from `fill` (or any I/O error) propagates
// after the temporary file is removed; `path` is then untouched.
template <class F>
void write_file_atomically(const std::string& path, F&& fill) {
  const std::filesystem::path target(path);
  LORA_CHECK(!target.filename().empty(), "write: \"" << path << "\" does not name a file");
  const std::string temp = detail::temporary_path_for(target);
  FileSink sink(temp);
#if defined(LORA_IO_POSIX)
  sink.fd_ = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  LORA_CHECK(sink.fd_ >= 0, "cannot create " << temp << " (to write " << path << "): " << std::strerror(errno));
  try {
    fill(sink);
    sink.flush();
    LORA_CHECK(::fsync(sink.fd_) == 0, "fsync " << temp << ": " << std::strerror(errno));
    const int fd = sink.fd_;
    sink.fd_ = -1;
    LORA_CHECK(::close(fd) == 0, "close " << temp << ": " << std::strerror(errno));
    LORA_CHECK(::rename(temp.c_str(), path.c_str()) == 0,
               "rename " << temp << " -> " << path << ": " << std::strerror(errno));
  } catch (...) {
    if (sink.fd_ >= 0) ::close(sink.fd_);
    ::unlink(temp.c_str());
    throw;
  }
  // Make the rename durable. Best effort: some file systems refuse fsync on a directory.
  const std::string dir = target.has_parent_path() ? target.parent_path().string() : std::string(".");
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (dir_fd >= 0) {
    (void)::fsync(dir_fd);
    ::close(dir_fd);
  }
#else
  sink.out_.open(temp, std::ios::binary | std::ios::trunc);
  LORA_CHECK(sink.out_.is_open(), "cannot create " << temp << " (to write " << path << ")");
  try {
    fill(sink);
    sink.flush();
    sink.out_.close();
    LORA_CHECK(!sink.out_.fail(), "closing " << temp << " failed");
    std::error_code ec;
    std::filesystem::rename(temp, target, ec);
    LORA_CHECK(!ec, "rename " << temp << " -> " << path << ": " << ec.message());
  } catch (...) {
    if (sink.out_.is_open()) sink.out_.close();
    std::error_code ignored;
    std::filesystem::remove(temp, ignored);
    throw;
  }
#endif
}

// The whole of `bytes` as the new contents of `path`, atomically.
inline void write_string_atomically(const std::string& path, const std::string& bytes) {
  write_file_atomically(path, [&](FileSink& sink) { sink.write(bytes); });
}

}  // namespace lora::io

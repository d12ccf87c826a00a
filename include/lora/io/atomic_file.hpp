// Atomic file replacement: readers of `path` see either the previous file or
// the complete new one, never a prefix. The new contents go to a temporary file
// in the same directory (same file system, so the rename is atomic), which is
// flushed, fsync'ed and then renamed over `path`; the directory is fsync'ed so
// the rename itself survives a crash. On any failure the temporary file is
// removed and `path` is left as it was. A replaced file keeps its permission
// bits (a 0600 file stays 0600).
//
// write_directory_atomically does the same for a directory of files that must
// change together (a PEFT adapter's weights and config).
//
// Temporaries are named ".<name>.tmp.<pid>.<n>". A writer killed mid-write
// leaves its temporary behind; the next write of the same name in that
// directory removes it once no process with that pid is alive (the temporary
// of a live writer, in this process or another, is never touched).
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include "lora/core/error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#define LORA_IO_POSIX 1
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>
#endif
#if defined(__linux__)
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28)
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

inline long current_pid() {
#if defined(LORA_IO_POSIX)
  return static_cast<long>(::getpid());
#else
  return 0;
#endif
}

// A name no other writer (thread or process) uses at the same time: ".<name>.tmp.<pid>.<n>".
inline std::filesystem::path temporary_path_for(const std::filesystem::path& dir, const std::string& name) {
  static std::atomic<std::uint64_t> counter{0};
  return dir / ("." + name + ".tmp." + std::to_string(current_pid()) + "." + std::to_string(counter++));
}

inline std::filesystem::path parent_or_dot(const std::filesystem::path& path) {
  return path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
}

// The writer's pid when `entry` is a temporary (".<name>.tmp.<pid>.<n>") of
// `name`, or of any name when `name` is empty; else -1.
inline long temporary_writer(const std::string& entry, const std::string& name = "") {
  const std::size_t tag = entry.rfind(".tmp.");
  if (entry.size() < 2 || entry[0] != '.' || tag == std::string::npos || tag < 1) return -1;
  if (!name.empty() && entry.compare(0, tag, "." + name) != 0) return -1;
  const std::string rest = entry.substr(tag + 5);  // "<pid>.<n>"
  const std::size_t dot = rest.find('.');
  if (dot == 0 || dot == std::string::npos || dot > 10 || dot + 1 == rest.size()) return -1;
  for (std::size_t i = 0; i < rest.size(); ++i)
    if (i != dot && (rest[i] < '0' || rest[i] > '9')) return -1;
  const long long pid = std::stoll(rest.substr(0, dot));
  return pid <= 0x7FFFFFFF ? static_cast<long>(pid) : -1;
}

// False only when no process has that pid (a pid of another user's live process counts as alive).
inline bool process_alive(long pid) {
#if defined(LORA_IO_POSIX)
  if (pid <= 0 || pid == current_pid()) return true;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
#else
  (void)pid;
  return true;
#endif
}

// Removes the temporaries of `name` in `dir` whose writer is gone (best effort: errors are ignored).
inline void remove_stale_temporaries(const std::filesystem::path& dir, const std::string& name) {
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec), end;
  std::vector<std::filesystem::path> stale;
  for (; !ec && it != end; it.increment(ec)) {
    const long pid = temporary_writer(it->path().filename().string(), name);
    if (pid >= 0 && !process_alive(pid)) stale.push_back(it->path());
  }
  for (const auto& path : stale) std::filesystem::remove_all(path, ec);
}

// fsync a directory so renames in it survive a crash. Best effort: some file systems refuse it.
inline void sync_directory(const std::filesystem::path& dir) {
#if defined(LORA_IO_POSIX)
  const int fd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);
    ::close(fd);
  }
#else
  (void)dir;
#endif
}

}  // namespace detail

// Calls fill(FileSink&) to produce the new contents of `path`, then replaces
// `path` atomically. An exception from `fill` (or any I/O error) propagates
// after the temporary file is removed; `path` is then untouched.
template <class F>
void write_file_atomically(const std::string& path, F&& fill) {
  const std::filesystem::path target(path);
  LORA_CHECK(!target.filename().empty(), "write: \"" << path << "\" does not name a file");
  const std::filesystem::path dir = detail::parent_or_dot(target);
  const std::string name = target.filename().string();
  detail::remove_stale_temporaries(dir, name);
  const std::string temp = detail::temporary_path_for(dir, name).string();
  FileSink sink(temp);
#if defined(LORA_IO_POSIX)
  // A file being replaced keeps its permissions; the temporary never has wider ones than the final file.
  struct stat old_file {};
  const bool replacing = ::stat(path.c_str(), &old_file) == 0 && S_ISREG(old_file.st_mode);
  sink.fd_ = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, replacing ? 0600 : 0666);
  LORA_CHECK(sink.fd_ >= 0, "cannot create " << temp << " (to write " << path << "): " << std::strerror(errno));
  try {
    fill(sink);
    sink.flush();
    if (replacing)
      LORA_CHECK(::fchmod(sink.fd_, old_file.st_mode & 07777) == 0, "chmod " << temp << ": " << std::strerror(errno));
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
  detail::sync_directory(dir);
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

// Where write_directory_atomically's callback writes the new directory's files.
class DirectorySink {
 public:
  // The file `name` (no directories) of the new directory, filled as write_file_atomically fills it.
  template <class F>
  void write(const std::string& name, F&& fill) {
    LORA_CHECK(!name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos,
               "write: \"" << name << "\" is not a file name");
    LORA_CHECK(names_.insert(name).second, "write: " << name << " is written twice");
    write_file_atomically((dir_ / name).string(), std::forward<F>(fill));
  }
  void write(const std::string& name, const std::string& bytes) {
    write(name, [&](FileSink& sink) { sink.write(bytes); });
  }

 private:
  template <class F>
  friend void write_directory_atomically(const std::string& dir, F&& fill);

  explicit DirectorySink(std::filesystem::path dir) : dir_(std::move(dir)) {}

  std::filesystem::path dir_;
  std::set<std::string> names_;
};

// Calls fill(DirectorySink&) to write the files of a new `dir` into a fresh
// temporary directory beside it, then puts that directory in dir's place in one
// step, so readers see all the old files or all the new ones. The previous
// directory stays whole until the new one is complete: an exception from
// `fill` (or any I/O error) leaves it untouched. Files of the previous
// directory that `fill` does not write are carried over (hard links; a
// subdirectory cannot be and is refused); the directory and each replaced file
// keep their permission bits. Linux swaps the two directories atomically
// (renameat2 RENAME_EXCHANGE); where that is unavailable, dir is absent for an
// instant between two renames, and a crash there leaves the previous directory
// as ".<name>.old.<pid>.<n>" beside it.
template <class F>
void write_directory_atomically(const std::string& dir, F&& fill) {
  namespace fs = std::filesystem;
  LORA_CHECK(!dir.empty(), "write: an empty path names no directory");
  std::error_code ec;
  const fs::file_status status = fs::status(dir, ec);  // (follows a symlink: its target is replaced)
  LORA_CHECK(!ec || ec == std::errc::no_such_file_or_directory, dir << ": " << ec.message());
  const bool exists = fs::exists(status);
  LORA_CHECK(!exists || fs::is_directory(status), dir << ": exists and is not a directory");
  fs::path target = exists ? fs::canonical(dir, ec) : fs::absolute(dir, ec).lexically_normal();
  LORA_CHECK(!ec, dir << ": " << ec.message());
  if (target.filename().empty()) target = target.parent_path();  // "out/" -> "out"
  const fs::path parent = target.parent_path();
  const std::string name = target.filename().string();
  LORA_CHECK(!name.empty() && name != "." && name != "..", dir << ": does not name a directory that can be replaced");
  fs::create_directories(parent, ec);
  LORA_CHECK(fs::is_directory(parent, ec), "cannot create directory " << parent.string() << ": " << ec.message());
  detail::remove_stale_temporaries(parent, name);

  const fs::path temp = detail::temporary_path_for(parent, name);
#if defined(LORA_IO_POSIX)
  LORA_CHECK(::mkdir(temp.c_str(), exists ? 0700 : 0777) == 0,
             "cannot create " << temp.string() << " (to write " << dir << "): " << std::strerror(errno));
#else
  LORA_CHECK(fs::create_directory(temp, ec), "cannot create " << temp.string() << " (to write " << dir << "): " << ec.message());
#endif
  try {
    DirectorySink sink(temp);
    fill(sink);
    if (exists) {
      for (fs::directory_iterator it(target, ec), end; !ec && it != end; it.increment(ec)) {
        const fs::path& from = it->path();
        const std::string entry = from.filename().string();
        const fs::file_status kind = fs::symlink_status(from, ec);
        LORA_CHECK(!ec, from.string() << ": " << ec.message());
        if (sink.names_.count(entry)) {  // replaced: keeps its permissions
          if (fs::is_regular_file(kind)) fs::permissions(temp / entry, kind.permissions(), ec);
          LORA_CHECK(!ec, "chmod " << (temp / entry).string() << ": " << ec.message());
          continue;
        }
        const long writer = detail::temporary_writer(entry);
        if (writer >= 0 && !detail::process_alive(writer)) continue;  // stale: goes with the old directory
        if (fs::is_symlink(kind)) {
          fs::copy_symlink(from, temp / entry, ec);
        } else if (fs::is_regular_file(kind)) {
          fs::create_hard_link(from, temp / entry, ec);
          if (ec) fs::copy_file(from, temp / entry, ec);
        } else {
          LORA_CHECK(false, dir << " holds \"" << entry << "\", which is not a file; the directory is "
                                << "replaced as a whole, so it may hold only files: move it out or write elsewhere");
        }
        LORA_CHECK(!ec, "carrying " << from.string() << " over to the new " << dir << ": " << ec.message());
      }
      LORA_CHECK(!ec, "listing " << target.string() << ": " << ec.message());
      fs::permissions(temp, fs::status(target, ec).permissions(), ec);
      LORA_CHECK(!ec, "chmod " << temp.string() << ": " << ec.message());
    }
    detail::sync_directory(temp);
    bool swapped = false;
#if defined(RENAME_EXCHANGE)
    if (exists) {
      if (::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
        swapped = true;
        fs::remove_all(temp, ec);  // the previous directory, now under the temporary name
      } else {
        LORA_CHECK(errno == EINVAL || errno == ENOSYS || errno == ENOTSUP,
                   "exchange " << temp.string() << " <-> " << target.string() << ": " << std::strerror(errno));
      }
    }
#endif
    if (!swapped && exists) {
      fs::path old = temp;
      old.replace_filename("." + name + ".old" + temp.filename().string().substr(name.size() + 5));
      fs::rename(target, old, ec);
      LORA_CHECK(!ec, "rename " << target.string() << " -> " << old.string() << ": " << ec.message());
      fs::rename(temp, target, ec);
      if (ec) {
        std::error_code ignored;
        fs::rename(old, target, ignored);
        LORA_CHECK(false, "rename " << temp.string() << " -> " << target.string() << ": " << ec.message());
      }
      fs::remove_all(old, ec);
    } else if (!swapped) {
      fs::rename(temp, target, ec);
      LORA_CHECK(!ec, "rename " << temp.string() << " -> " << target.string() << ": " << ec.message());
    }
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(temp, ignored);
    throw;
  }
  detail::sync_directory(parent);
}

}  // namespace lora::io

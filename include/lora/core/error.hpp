// lora::Error and the checks that throw it. Every precondition the library
// relies on is checked with LORA_CHECK and reported as "what was expected,
// what was found", naming the call and the argument.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace lora {

// The one exception type the library throws. what() names the call and the
// argument ("Linear::forward: x: expected shape [8, 16], found [8, 15]"); in a
// debug build (NDEBUG not defined) it starts with the library's file:line too.
// A failed CUDA or cuBLAS call (cuda/check.cuh) always names its file:line:
// that call is the library's own, not the caller's.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {

// Throws Error(message), prefixed with "file:line: " when file is not null.
[[noreturn]] inline void throw_error(const char* file, int line, const std::string& message) {
  if (file == nullptr) throw Error(message);
  std::ostringstream out;
  out << file << ':' << line << ": " << message;
  throw Error(out.str());
}

}  // namespace detail
}  // namespace lora

// Where a check sits in the library's headers: useful to whoever debugs the
// library, noise to a caller whose argument was wrong, so debug builds only.
#ifdef NDEBUG
#define LORA_DETAIL_FILE nullptr
#else
#define LORA_DETAIL_FILE __FILE__
#endif

// LORA_CHECK(cond, message-stream): always on. The message is a stream
// expression, e.g. LORA_CHECK(r > 0, "Config.r = " << r << ", expected >= 1").
#define LORA_CHECK(cond, message)                                                     \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::ostringstream lora_check_stream_;                                          \
      lora_check_stream_ << message;                                                  \
      ::lora::detail::throw_error(LORA_DETAIL_FILE, __LINE__, lora_check_stream_.str()); \
    }                                                                                 \
  } while (false)

// LORA_ASSERT(cond): internal invariants, debug builds only.
#ifdef NDEBUG
#define LORA_ASSERT(cond) ((void)0)
#else
#define LORA_ASSERT(cond) \
  LORA_CHECK(cond, "internal invariant violated: " #cond)
#endif

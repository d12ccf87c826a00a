// lora::Error and the checks that throw it. Every precondition the library
// relies on is checked with LORA_CHECK and reported as "what was expected,
// what was found, where".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace lora {

// The one exception type the library throws. what() reads
// "<file>:<line>: <message>" so a failure in a user's trainer points here.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& message) {
  std::ostringstream out;
  out << file << ':' << line << ": " << message;
  throw Error(out.str());
}

}  // namespace detail
}  // namespace lora

// LORA_CHECK(cond, message-stream): always on. The message is a stream
// expression, e.g. LORA_CHECK(r > 0, "Config.r = " << r << ", expected >= 1").
#define LORA_CHECK(cond, message)                                        \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::ostringstream lora_check_stream_;                             \
      lora_check_stream_ << message;                                     \
      ::lora::detail::throw_error(__FILE__, __LINE__, lora_check_stream_.str()); \
    }                                                                    \
  } while (false)

// LORA_ASSERT(cond): internal invariants, debug builds only.
#ifdef NDEBUG
#define LORA_ASSERT(cond) ((void)0)
#else
#define LORA_ASSERT(cond) \
  LORA_CHECK(cond, "internal invariant violated: " #cond)
#endif

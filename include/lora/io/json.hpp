// JSON from files the library does not control (adapter_config.json,
// model.safetensors.index.json): parsed with a bound on nesting depth
// (nlohmann's dump() and value handling recurse once per level, so a file
// nested 100,000 levels deep would overflow the stack), and quoted in error
// messages only as a short excerpt (an 8 MB string stays out of the message).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "lora/core/error.hpp"
#include "lora/io/file.hpp"

namespace lora::io {

// The deepest nesting accepted in an untrusted JSON file (PEFT's configs nest 3 levels).
inline constexpr int kMaxJsonDepth = 64;

namespace detail {

// A JSON value as the file spells it, cut as quote_excerpt cuts (a long string
// is cut before it is printed; invalid UTF-8 at the cut is replaced, not thrown on).
inline std::string json_excerpt(const nlohmann::ordered_json& value, std::size_t max = 200) {
  constexpr auto kReplace = nlohmann::ordered_json::error_handler_t::replace;
  if (value.is_string() && value.get_ref<const std::string&>().size() > max) {
    const std::string& s = value.get_ref<const std::string&>();
    return nlohmann::ordered_json(s.substr(0, max)).dump(-1, ' ', false, kReplace) + "... (a string of " +
           std::to_string(s.size()) + " bytes)";
  }
  const std::string text = value.dump(-1, ' ', false, kReplace);
  if (text.size() <= max) return text;
  return text.substr(0, max) + "... (" + std::to_string(text.size()) + " bytes)";
}

}  // namespace detail

// Parses `text` (the contents of `source`, named in every error) into an
// ordered DOM (object keys keep the file's order). Throws lora::Error on
// invalid JSON and on nesting deeper than `max_depth`.
inline nlohmann::ordered_json parse_untrusted_json(const std::string& text, const std::string& source,
                                                   int max_depth = kMaxJsonDepth) {
  using Json = nlohmann::ordered_json;
  // Called as each value opens; depth counts the enclosing containers (0 at the top).
  const Json::parser_callback_t bound_depth = [&](int depth, Json::parse_event_t event, Json&) {
    if (event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start)
      LORA_CHECK(depth < max_depth, source << ": JSON nested deeper than " << max_depth << " levels");
    return true;
  };
  try {
    return Json::parse(text, bound_depth);
  } catch (const nlohmann::json::exception& e) {
    std::string what = e.what();
    if (what.size() > 300) what = what.substr(0, 300) + "...";
    throw Error(source + ": not valid JSON: " + what);
  }
}

// A JSON file of at most `max_bytes`, parsed as parse_untrusted_json does.
inline nlohmann::ordered_json read_untrusted_json(const std::string& path, std::uintmax_t max_bytes) {
  return parse_untrusted_json(detail::read_text_file(path, max_bytes), path);
}

}  // namespace lora::io

#pragma once
/// @file error.hpp
/// The one exception type of the library, and the argument checks that throw it.

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace af {

/// Thrown on a bad shape, value or file. The message names the offending value and what was expected,
/// e.g. `matmul: inner dimensions differ: a is [4, 8], b is [6, 3] (expected b to have 8 rows)`.
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& message);
};

/// Throws af::Error with the formatted message. Use it as `if (!ok) fail(...)` where building the message's
/// arguments costs something (a shape's string): the arguments are then evaluated only on failure.
template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> message, Args&&... args) {
  throw Error(fmt::format(message, std::forward<Args>(args)...));
}

/// Throws af::Error with the formatted message when `condition` is false. Its arguments are evaluated
/// whether or not it throws: keep them cheap (numbers), or use `fail`.
template <class... Args>
void require(bool condition, fmt::format_string<Args...> message, Args&&... args) {
  if (!condition) throw Error(fmt::format(message, std::forward<Args>(args)...));
}

}  // namespace af

#pragma once
// The message of the af::Error a piece of code throws, for tests of bad input.
#include "af/error.hpp"

#include <catch2/catch.hpp>

#include <exception>
#include <functional>
#include <string>

namespace af_test {

/// The message of the af::Error that `run` throws; any other exception, or none, fails the test.
inline std::string error_of(const std::function<void()>& run) {
  try {
    run();
  } catch (const af::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected af::Error, got another exception: " << e.what());
  }
  FAIL("expected af::Error, nothing was thrown");
  return {};
}

}  // namespace af_test

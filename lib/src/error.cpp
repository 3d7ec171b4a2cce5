#include "af/error.hpp"

namespace af {

Error::Error(const std::string& message) : std::invalid_argument(message) {}

}  // namespace af

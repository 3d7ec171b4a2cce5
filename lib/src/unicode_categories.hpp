#pragma once
/// @file unicode_categories.hpp
/// The Unicode classes the byte-level BPE pre-tokenizer asks about, with the generated range table behind
/// them (unicode_categories.cpp, written by scripts/generate_unicode_categories.py).

#include <cstddef>
#include <cstdint>

namespace af::unicode {

/// What the pre-tokenizer's regex needs to know about a code point.
enum class CharClass : std::uint8_t {
  other,       ///< none of the below (punctuation, symbols, marks, controls, bytes of invalid UTF-8)
  letter,      ///< general category L (Lu, Ll, Lt, Lm, Lo): \p{L}
  number,      ///< general category N (Nd, Nl, No): \p{N}
  whitespace,  ///< the White_Space property: \s
};

/// One run of code points [first, last] of the same class (letter or number).
struct CategoryRange {
  std::uint32_t first;
  std::uint32_t last;
  CharClass char_class;
};

/// The Unicode version the table was generated from.
extern const char* const unicode_version;
/// The letter and number ranges, sorted by `first`, disjoint.
extern const CategoryRange category_ranges[];
extern const std::size_t category_range_count;

}  // namespace af::unicode

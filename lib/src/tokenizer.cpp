#include "af/tokenizer.hpp"

#include "af/error.hpp"
#include "unicode_categories.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <queue>

namespace af {

namespace {

using unicode::CharClass;

// ---------------------------------------------------------------------------------------------------------
// UTF-8 and the character classes

/// A code point's place in the text; invalid UTF-8 gives one unit per byte, with code point `no_code_point`.
struct Unit {
  std::uint32_t code_point;
  std::uint32_t offset;  ///< of its first byte
  CharClass char_class;
};

constexpr std::uint32_t no_code_point = 0xFFFFFFFF;

/// The code point starting at text[pos] and its length in bytes; {no_code_point, 1} where the bytes there
/// are not valid UTF-8 (a stray continuation byte, an overlong form, a surrogate, a value past U+10FFFF or a
/// sequence cut short).
std::pair<std::uint32_t, std::size_t> next_code_point(std::string_view text, std::size_t pos) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(pos);
  if (lead < 0x80) return {lead, 1};
  std::size_t length = 0;
  std::uint32_t value = 0, minimum = 0;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2, value = lead & 0x1Fu, minimum = 0x80;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3, value = lead & 0x0Fu, minimum = 0x800;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4, value = lead & 0x07u, minimum = 0x10000;
  } else {
    return {no_code_point, 1};
  }
  if (text.size() - pos < length) return {no_code_point, 1};
  for (std::size_t i = 1; i < length; ++i) {
    if ((byte(pos + i) & 0xC0u) != 0x80u) return {no_code_point, 1};
    value = (value << 6) | (byte(pos + i) & 0x3Fu);
  }
  if (value < minimum || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return {no_code_point, 1};
  return {value, length};
}

/// Unicode's White_Space property (what \s matches in Oniguruma and in llama.cpp's tables).
bool is_white_space(std::uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

CharClass classify(std::uint32_t c) {
  if (c == no_code_point) return CharClass::other;
  if (c < 0x80) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CharClass::letter;
    if (c >= '0' && c <= '9') return CharClass::number;
    return is_white_space(c) ? CharClass::whitespace : CharClass::other;
  }
  if (is_white_space(c)) return CharClass::whitespace;
  const unicode::CategoryRange* begin = unicode::category_ranges;
  const unicode::CategoryRange* end = begin + unicode::category_range_count;
  const auto* it = std::upper_bound(
      begin, end, c, [](std::uint32_t value, const unicode::CategoryRange& range) { return value < range.first; });
  if (it == begin) return CharClass::other;
  --it;
  return c <= it->last ? it->char_class : CharClass::other;
}

std::vector<Unit> units_of(std::string_view text) {
  std::vector<Unit> units;
  units.reserve(text.size());
  for (std::size_t pos = 0; pos < text.size();) {
    const auto [code_point, length] = next_code_point(text, pos);
    units.push_back({code_point, static_cast<std::uint32_t>(pos), classify(code_point)});
    pos += length;
  }
  return units;
}

/// The length in units of the GPT-2 regex's match at units[i], the text ending at units[end]:
///   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::size_t gpt2_match_length(const std::vector<Unit>& units, std::size_t i, std::size_t end) {
  const auto code_point = [&](std::size_t k) { return k < end ? units[k].code_point : no_code_point; };
  const auto run_end = [&](std::size_t k, CharClass char_class) {
    while (k < end && units[k].char_class == char_class) ++k;
    return k;
  };
  if (code_point(i) == '\'') {
    const std::uint32_t first = code_point(i + 1), second = code_point(i + 2);
    if (first == 's' || first == 't' || first == 'm' || first == 'd') return 2;
    if ((first == 'r' && second == 'e') || (first == 'v' && second == 'e') || (first == 'l' && second == 'l')) {
      return 3;
    }
  }
  // ` ?X+` for X = letters, numbers, and everything that is neither nor white space.
  for (const CharClass char_class : {CharClass::letter, CharClass::number, CharClass::other}) {
    std::size_t start = i;
    if (code_point(i) == ' ' && i + 1 < end && units[i + 1].char_class == char_class) start = i + 1;
    if (units[start].char_class == char_class) return run_end(start, char_class) - i;
  }
  // What is left starts with white space. `\s+(?!\S)`: all of it at the end, else all but the last (which
  // then starts the next word); a single one before a non-space falls through to `\s+`.
  const std::size_t stop = run_end(i, CharClass::whitespace);
  if (stop == end || stop - i == 1) return stop - i;
  return stop - i - 1;
}

// ---------------------------------------------------------------------------------------------------------
// The byte alphabet

struct ByteAlphabet {
  std::array<std::string, 256> spelling;              // byte -> UTF-8 of its character
  std::array<std::int16_t, 0x144> byte_of_character;  // code point -> byte, or -1

  ByteAlphabet() {
    byte_of_character.fill(-1);
    std::uint32_t next_extra = 0x100;
    for (int byte = 0; byte < 256; ++byte) {
      const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE;
      const std::uint32_t character = printable ? static_cast<std::uint32_t>(byte) : next_extra++;
      byte_of_character[character] = static_cast<std::int16_t>(byte);
      std::string& text = spelling[static_cast<std::size_t>(byte)];
      if (character < 0x80) {
        text.push_back(static_cast<char>(character));
      } else {
        text.push_back(static_cast<char>(0xC0 | (character >> 6)));
        text.push_back(static_cast<char>(0x80 | (character & 0x3F)));
      }
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

/// The bytes a normal token's text stands for; throws af::Error naming the token and the character when a
/// character is not in the byte alphabet.
std::string bytes_of_token_text(std::string_view text, std::size_t id) {
  const ByteAlphabet& alphabet = byte_alphabet();
  std::string bytes;
  for (std::size_t pos = 0; pos < text.size();) {
    const auto [code_point, length] = next_code_point(text, pos);
    if (code_point == no_code_point) {
      fail("tokenizer: token {} ({:?}) is not valid UTF-8 at byte {}", id, text, pos);
    }
    if (code_point >= alphabet.byte_of_character.size() || alphabet.byte_of_character[code_point] < 0) {
      fail("tokenizer: token {} ({:?}) has the character U+{:04X}, which is not in the byte alphabet", id, text,
           code_point);
    }
    bytes.push_back(static_cast<char>(alphabet.byte_of_character[code_point]));
    pos += length;
  }
  return bytes;
}

constexpr std::uint64_t pair_key(TokenId left, TokenId right) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) | static_cast<std::uint32_t>(right);
}

bool is_special(TokenType type) { return type == TokenType::control || type == TokenType::user_defined; }

/// The length of the longest prefix of `bytes` that does not end inside a multi-byte UTF-8 character that
/// later bytes could still complete.
std::size_t complete_prefix_length(std::string_view bytes) {
  const std::size_t size = bytes.size();
  for (std::size_t back = 1; back <= std::min<std::size_t>(3, size); ++back) {
    const auto byte = static_cast<unsigned char>(bytes[size - back]);
    if ((byte & 0xC0u) == 0x80u) continue;  // a continuation byte: look for its lead
    std::size_t needed = 1;
    if (byte >= 0xC2 && byte <= 0xDF) needed = 2;
    if (byte >= 0xE0 && byte <= 0xEF) needed = 3;
    if (byte >= 0xF0 && byte <= 0xF4) needed = 4;
    return back < needed ? size - back : size;
  }
  return size;
}

}  // namespace

// -------------------------------------------------------------------------------------------------------------
// Pre-tokenizer

PreTokenizer pre_tokenizer_named(std::string_view name) {
  if (name == "smollm" || name == "starcoder") return PreTokenizer::smollm;
  if (name == "gpt-2" || name == "gpt2") return PreTokenizer::gpt2;
  fail("tokenizer: the pre-tokenizer {:?} is not implemented (expected \"smollm\", \"starcoder\" or \"gpt-2\")", name);
}

std::vector<std::string_view> split_words(std::string_view text, PreTokenizer pre_tokenizer) {
  const std::vector<Unit> units = units_of(text);
  const auto offset = [&](std::size_t k) { return k < units.size() ? units[k].offset : text.size(); };
  std::vector<std::string_view> words;
  const auto emit = [&](std::size_t first, std::size_t last) {
    words.push_back(text.substr(offset(first), offset(last) - offset(first)));
  };
  const bool digits_alone = pre_tokenizer == PreTokenizer::smollm;
  for (std::size_t i = 0; i < units.size();) {
    if (digits_alone && units[i].char_class == CharClass::number) {
      emit(i, i + 1);
      ++i;
      continue;
    }
    // The regex runs over the stretch up to the next number as if it were the whole text.
    std::size_t end = i;
    while (end < units.size() && !(digits_alone && units[end].char_class == CharClass::number)) ++end;
    while (i < end) {
      const std::size_t length = gpt2_match_length(units, i, end);
      emit(i, i + length);
      i += length;
    }
  }
  return words;
}

std::string_view byte_to_alphabet(unsigned char byte) { return byte_alphabet().spelling[byte]; }

// -------------------------------------------------------------------------------------------------------------
// Tokenizer

Tokenizer Tokenizer::from_gguf(const gguf::File& file) {
  const std::string_view model = file.string("tokenizer.ggml.model");
  require(model == "gpt2", "tokenizer: {}: tokenizer.ggml.model is {:?} (expected \"gpt2\", byte-level BPE)",
          file.source(), model);
  Vocabulary vocabulary;
  const std::span<const std::string> tokens = file.strings("tokenizer.ggml.tokens");
  vocabulary.tokens.assign(tokens.begin(), tokens.end());
  const std::span<const std::string> merges = file.strings("tokenizer.ggml.merges");
  vocabulary.merges.assign(merges.begin(), merges.end());
  if (file.find("tokenizer.ggml.token_type") != nullptr) {
    vocabulary.token_types = file.integers("tokenizer.ggml.token_type");
  }
  if (file.find("tokenizer.ggml.pre") == nullptr) {
    fail("tokenizer: {}: tokenizer.ggml.pre is missing (expected the pre-tokenizer's name)", file.source());
  }
  vocabulary.pre_tokenizer = pre_tokenizer_named(file.string("tokenizer.ggml.pre"));
  const auto optional_id = [&](std::string_view key) -> std::optional<TokenId> {
    if (file.find(key) == nullptr) return std::nullopt;
    const std::uint64_t id = file.unsigned_integer(key);
    require(id < tokens.size(), "tokenizer: {}: {} is {} (expected below the vocabulary size {})", file.source(), key,
            id, tokens.size());
    return static_cast<TokenId>(id);
  };
  vocabulary.bos_id = optional_id("tokenizer.ggml.bos_token_id");
  vocabulary.eos_id = optional_id("tokenizer.ggml.eos_token_id");
  if (const gguf::Value* add_bos = file.find("tokenizer.ggml.add_bos_token")) {
    const bool* flag = std::get_if<bool>(&add_bos->data);
    require(flag != nullptr, "tokenizer: {}: tokenizer.ggml.add_bos_token is a {} (expected a bool)", file.source(),
            gguf::name_of(add_bos->type));
    vocabulary.add_bos = *flag;
  }
  return from_vocabulary(std::move(vocabulary));
}

Tokenizer Tokenizer::from_vocabulary(Vocabulary vocabulary) {
  Tokenizer tokenizer;
  const std::size_t count = vocabulary.tokens.size();
  require(count > 0, "tokenizer: the vocabulary is empty");
  require(count <= static_cast<std::size_t>(std::numeric_limits<TokenId>::max()),
          "tokenizer: the vocabulary has {} tokens (expected at most {})", count, std::numeric_limits<TokenId>::max());
  require(vocabulary.token_types.empty() || vocabulary.token_types.size() == count,
          "tokenizer: there are {} token types for {} tokens", vocabulary.token_types.size(), count);

  tokenizer.types_.resize(count, TokenType::normal);
  tokenizer.decoded_.resize(count);
  tokenizer.ids_.reserve(count);
  for (std::size_t id = 0; id < count; ++id) {
    const std::string& text = vocabulary.tokens[id];
    if (!vocabulary.token_types.empty()) {
      const std::int64_t type = vocabulary.token_types[id];
      require(type >= 0 && type <= 6, "tokenizer: token {} ({:?}) has the type {} (expected 0 to 6)", id, text, type);
      tokenizer.types_[id] = static_cast<TokenType>(type);
    }
    require(!text.empty(), "tokenizer: token {} is empty", id);
    const auto [where, inserted] = tokenizer.ids_.emplace(text, static_cast<TokenId>(id));
    if (!inserted) fail("tokenizer: token {} ({:?}) repeats token {}", id, text, where->second);
    if (is_special(tokenizer.types_[id])) {
      tokenizer.decoded_[id] = text;
      tokenizer.special_ids_.push_back(static_cast<TokenId>(id));
    } else {
      tokenizer.decoded_[id] = bytes_of_token_text(text, id);
    }
  }
  tokenizer.tokens_ = std::move(vocabulary.tokens);
  std::stable_sort(tokenizer.special_ids_.begin(), tokenizer.special_ids_.end(), [&](TokenId a, TokenId b) {
    return tokenizer.tokens_[static_cast<std::size_t>(a)].size() >
           tokenizer.tokens_[static_cast<std::size_t>(b)].size();
  });
  for (int byte = 0; byte < 256; ++byte) {
    const std::optional<TokenId> id = tokenizer.find(byte_to_alphabet(static_cast<unsigned char>(byte)));
    tokenizer.byte_tokens_[byte] = id.value_or(-1);
  }

  tokenizer.merges_.reserve(vocabulary.merges.size());
  for (std::size_t rank = 0; rank < vocabulary.merges.size(); ++rank) {
    const std::string_view merge = vocabulary.merges[rank];
    const std::size_t space = merge.find(' ');
    if (space == std::string_view::npos || space == 0 || space + 1 == merge.size() ||
        merge.find(' ', space + 1) != std::string_view::npos) {
      fail("tokenizer: merge {} ({:?}) is not two tokens separated by one space", rank, merge);
    }
    const std::string_view left = merge.substr(0, space), right = merge.substr(space + 1);
    const std::optional<TokenId> left_id = tokenizer.find(left), right_id = tokenizer.find(right);
    if (!left_id) fail("tokenizer: merge {} ({:?}) names {:?}, which is not in the vocabulary", rank, merge, left);
    if (!right_id) fail("tokenizer: merge {} ({:?}) names {:?}, which is not in the vocabulary", rank, merge, right);
    const std::string joined = std::string(left) + std::string(right);
    const std::optional<TokenId> result = tokenizer.find(joined);
    if (!result) fail("tokenizer: merge {} ({:?}) makes {:?}, which is not in the vocabulary", rank, merge, joined);
    const auto [where, inserted] =
        tokenizer.merges_.emplace(pair_key(*left_id, *right_id), Merge{static_cast<std::int32_t>(rank), *result});
    if (!inserted) fail("tokenizer: merge {} ({:?}) repeats merge {}", rank, merge, where->second.rank);
  }

  const auto check_optional = [&](const std::optional<TokenId>& id, std::string_view what) {
    require(!id || (*id >= 0 && static_cast<std::size_t>(*id) < count), "tokenizer: the {} id is {} (expected 0 to {})",
            what, id.value_or(0), count - 1);
  };
  check_optional(vocabulary.bos_id, "BOS");
  check_optional(vocabulary.eos_id, "EOS");
  tokenizer.bos_id_ = vocabulary.bos_id;
  tokenizer.eos_id_ = vocabulary.eos_id;
  tokenizer.add_bos_ = vocabulary.add_bos;
  tokenizer.pre_tokenizer_ = vocabulary.pre_tokenizer;
  return tokenizer;
}

void Tokenizer::encode_word(std::string_view word, std::vector<TokenId>& out) const {
  // One symbol per byte, in a doubly linked list; a merge joins a symbol with its right neighbour.
  struct Symbol {
    TokenId id;  // -1: a byte without a token (no merge can involve it, and it gives no id)
    std::int32_t previous, next;
  };
  std::vector<Symbol> symbols(word.size());
  const auto size = static_cast<std::int32_t>(word.size());
  for (std::int32_t i = 0; i < size; ++i) {
    symbols[static_cast<std::size_t>(i)] = {byte_tokens_[static_cast<unsigned char>(word[static_cast<std::size_t>(i)])],
                                            i - 1, i + 1 < size ? i + 1 : -1};
  }
  // Candidate merges, the lowest rank first and among equal ranks the leftmost. A candidate goes stale when
  // either symbol has been merged since; it is then skipped.
  struct Candidate {
    std::int32_t rank, left, right;
    TokenId left_id, right_id, result;
    bool operator>(const Candidate& other) const { return rank != other.rank ? rank > other.rank : left > other.left; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  const auto consider = [&](std::int32_t left, std::int32_t right) {
    if (left < 0 || right < 0) return;
    const TokenId left_id = symbols[static_cast<std::size_t>(left)].id;
    const TokenId right_id = symbols[static_cast<std::size_t>(right)].id;
    if (left_id < 0 || right_id < 0) return;
    const auto found = merges_.find(pair_key(left_id, right_id));
    if (found != merges_.end()) queue.push({found->second.rank, left, right, left_id, right_id, found->second.result});
  };
  for (std::int32_t i = 0; i + 1 < size; ++i) consider(i, i + 1);
  while (!queue.empty()) {
    const Candidate candidate = queue.top();
    queue.pop();
    Symbol& left = symbols[static_cast<std::size_t>(candidate.left)];
    Symbol& right = symbols[static_cast<std::size_t>(candidate.right)];
    if (left.id != candidate.left_id || left.next != candidate.right || right.id != candidate.right_id) continue;
    left.id = candidate.result;
    left.next = right.next;
    if (right.next >= 0) symbols[static_cast<std::size_t>(right.next)].previous = candidate.left;
    right.id = -2;  // gone
    consider(left.previous, candidate.left);
    consider(candidate.left, left.next);
  }
  for (std::int32_t i = size > 0 ? 0 : -1; i >= 0; i = symbols[static_cast<std::size_t>(i)].next) {
    if (symbols[static_cast<std::size_t>(i)].id >= 0) out.push_back(symbols[static_cast<std::size_t>(i)].id);
  }
}

std::vector<TokenId> Tokenizer::encode(std::string_view text, bool parse_special) const {
  std::vector<TokenId> ids;
  const auto encode_text = [&](std::string_view piece) {
    for (const std::string_view word : split_words(piece, pre_tokenizer_)) encode_word(word, ids);
  };
  if (!parse_special || special_ids_.empty()) {
    encode_text(text);
    return ids;
  }
  std::array<bool, 256> starts_special{};
  for (const TokenId id : special_ids_)
    starts_special[static_cast<unsigned char>(tokens_[static_cast<std::size_t>(id)][0])] = true;
  std::size_t plain_start = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    std::optional<TokenId> match;
    if (starts_special[static_cast<unsigned char>(text[pos])]) {
      for (const TokenId id : special_ids_) {  // longest first
        if (text.substr(pos).starts_with(tokens_[static_cast<std::size_t>(id)])) {
          match = id;
          break;
        }
      }
    }
    if (!match) {
      ++pos;
      continue;
    }
    encode_text(text.substr(plain_start, pos - plain_start));
    ids.push_back(*match);
    pos += tokens_[static_cast<std::size_t>(*match)].size();
    plain_start = pos;
  }
  encode_text(text.substr(plain_start));
  return ids;
}

void Tokenizer::check_id(TokenId id) const {
  require(id >= 0 && static_cast<std::size_t>(id) < tokens_.size(),
          "tokenizer: token id {} is out of range (expected 0 to {})", id, tokens_.size() - 1);
}

std::string Tokenizer::decode(std::span<const TokenId> ids, bool skip_special) const {
  std::string text;
  for (const TokenId id : ids) {
    check_id(id);
    if (skip_special && types_[static_cast<std::size_t>(id)] == TokenType::control) continue;
    text += decoded_[static_cast<std::size_t>(id)];
  }
  return text;
}

std::string Tokenizer::token_bytes(TokenId id) const {
  check_id(id);
  return decoded_[static_cast<std::size_t>(id)];
}

const std::string& Tokenizer::token_text(TokenId id) const {
  check_id(id);
  return tokens_[static_cast<std::size_t>(id)];
}

TokenType Tokenizer::token_type(TokenId id) const {
  check_id(id);
  return types_[static_cast<std::size_t>(id)];
}

std::optional<TokenId> Tokenizer::find(std::string_view text) const {
  const auto found = ids_.find(std::string(text));
  if (found == ids_.end()) return std::nullopt;
  return found->second;
}

// -------------------------------------------------------------------------------------------------------------
// Streaming

TokenStreamDecoder::TokenStreamDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(&tokenizer), skip_special_(skip_special) {}

std::string TokenStreamDecoder::push(TokenId id) {
  const TokenId one[] = {id};
  pending_ += tokenizer_->decode(one, skip_special_);
  const std::size_t ready = complete_prefix_length(pending_);
  std::string text = pending_.substr(0, ready);
  pending_.erase(0, ready);
  return text;
}

std::string TokenStreamDecoder::finish() {
  std::string text;
  text.swap(pending_);
  return text;
}

// -------------------------------------------------------------------------------------------------------------
// Chat template

const std::string_view smollm2_chat_template =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

void check_chat_template(std::string_view template_text) {
  if (template_text == smollm2_chat_template) return;
  const auto [here, there] = std::mismatch(template_text.begin(), template_text.end(), smollm2_chat_template.begin(),
                                           smollm2_chat_template.end());
  const auto at = static_cast<std::size_t>(here - template_text.begin());
  fail(
      "chat template: the file's template ({} bytes) is not the SmolLM2 ChatML template this code implements "
      "({} bytes): they differ from byte {} on, {:?} instead of {:?}",
      template_text.size(), smollm2_chat_template.size(), at, template_text.substr(at, 24),
      smollm2_chat_template.substr(at, 24));
}

void check_chat_template(const gguf::File& file) {
  if (file.find("tokenizer.chat_template") == nullptr) {
    fail("chat template: {}: tokenizer.chat_template is missing", file.source());
  }
  check_chat_template(file.string("tokenizer.chat_template"));
}

std::string format_chat(std::span<const ChatMessage> messages, bool add_generation_prompt) {
  std::string text;
  if (!messages.empty() && messages.front().role != "system") {
    text += "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
  }
  for (const ChatMessage& message : messages) {
    text += "<|im_start|>";
    text += message.role;
    text += '\n';
    text += message.content;
    text += "<|im_end|>\n";
  }
  if (add_generation_prompt) text += "<|im_start|>assistant\n";
  return text;
}

}  // namespace af

#pragma once
/// @file tokenizer.hpp
/// The SmolLM2 tokenizer and chat template, built from the GGUF file's own metadata.
///
/// The tokenizer is GPT-2's byte-level BPE (`tokenizer.ggml.model` = "gpt2"):
///   1. the pre-tokenizer splits the text into words (for `tokenizer.ggml.pre` = "smollm": every code point
///      of Unicode category N alone, then GPT-2's regex over the rest, see split_words);
///   2. each byte of a word becomes one printable character of the byte alphabet (byte_to_alphabet), so
///      that any bytes, valid UTF-8 or not, have a spelling;
///   3. the word's characters are merged pairwise, always the pair whose merge comes first in
///      `tokenizer.ggml.merges` (leftmost among equals), until no listed merge applies;
///   4. the pieces are looked up in `tokenizer.ggml.tokens`.
/// Control tokens (`tokenizer.ggml.token_type` 3: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...) are
/// plain text to BPE unless encode is asked to parse them.

#include "af/gguf.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace af {

/// A token's index in the vocabulary.
using TokenId = std::int32_t;

/// `tokenizer.ggml.token_type`, llama.cpp's numbering.
enum class TokenType : std::int32_t {
  undefined = 0,
  normal = 1,
  unknown = 2,
  control = 3,       ///< `<|im_start|>` and the like: parsed by encode(text, true), never made by BPE
  user_defined = 4,  ///< added text, parsed like control tokens
  unused = 5,
  byte = 6,
};

/// The pre-tokenizer: how text is cut into words before BPE.
enum class PreTokenizer {
  /// llama.cpp's "smollm" (also its "starcoder"), and the `Digits(individual_digits) + ByteLevel` sequence of
  /// the model's own Hugging Face tokenizer.json: every code point of category N is a word alone, then GPT-2's
  /// regex.
  smollm,
  /// GPT-2's regex alone: what transformers' GGUF converter builds for any "gpt2" model, whatever
  /// `tokenizer.ggml.pre` says. It differs from smollm only where white space or a letter run meets a digit
  /// ("a  1" gives "a", " ", " 1" here and "a", "  ", "1" under smollm).
  gpt2,
};

/// The name `tokenizer.ggml.pre` gives to the pre-tokenizer; throws af::Error naming any other name.
PreTokenizer pre_tokenizer_named(std::string_view name);

/// Cuts `text` into the pre-tokenizer's words, as views into `text`. GPT-2's regex, implemented by hand:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// (the contractions are lower case only; `\s` is Unicode White_Space). A byte that is not part of valid UTF-8
/// counts as one code point of no class (like punctuation). Concatenating the words gives `text` back.
std::vector<std::string_view> split_words(std::string_view text, PreTokenizer pre_tokenizer);

/// The printable character (UTF-8) that stands for `byte` in the vocabulary: GPT-2's bytes_to_unicode.
/// Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other 68 are
/// U+0100 onwards in byte order (the space 0x20 is 'Ġ', U+0120).
std::string_view byte_to_alphabet(unsigned char byte);

/// A byte-level BPE tokenizer.
class Tokenizer {
 public:
  /// Everything a tokenizer is made from; from_gguf fills it from the file's metadata.
  struct Vocabulary {
    std::vector<std::string> tokens;        ///< the token texts by id, in the byte alphabet (control: raw text)
    std::vector<std::string> merges;        ///< "left right", in rank order (first = merged first)
    std::vector<std::int64_t> token_types;  ///< TokenType per token; empty means all normal
    std::optional<TokenId> bos_id, eos_id;
    bool add_bos = false;  ///< `tokenizer.ggml.add_bos_token`; absent in the file means false
    PreTokenizer pre_tokenizer = PreTokenizer::smollm;
  };

  /// Builds the tokenizer from the file's `tokenizer.ggml` keys. Throws af::Error when `tokenizer.ggml.model` is not
  /// "gpt2", `tokenizer.ggml.pre` names a pre-tokenizer not implemented here, and for everything
  /// from_vocabulary rejects. The chat template is not looked at (see check_chat_template).
  static Tokenizer from_gguf(const gguf::File& file);

  /// Builds the tokenizer from its parts. Throws af::Error naming the offending value for: an empty
  /// vocabulary, more tokens than TokenId holds, a duplicate token text, a normal token with a character
  /// outside the byte alphabet (or text that is not UTF-8), a token type array of another length or an
  /// unknown type, a merge that is not two tokens separated by one space, names a token that is not in the
  /// vocabulary, or whose result is not in it, the same merge listed twice, and a BOS or EOS id out of range.
  static Tokenizer from_vocabulary(Vocabulary vocabulary);

  /// The ids of `text`. With `parse_special`, the texts of control and user-defined tokens are cut out
  /// first (leftmost, longest first) and become their ids; without, they are ordinary text. No BOS is added
  /// (see add_bos). Any bytes are accepted; a byte whose single-byte token is missing from the vocabulary
  /// (this model lacks 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2 and 0xF5..0xFF) and that
  /// no merge absorbs is dropped, as Hugging Face tokenizers and llama.cpp drop it.
  std::vector<TokenId> encode(std::string_view text, bool parse_special = false) const;

  /// The bytes `ids` stand for, concatenated. Control tokens give their text (Hugging Face's
  /// decode(skip_special_tokens=False)) or nothing with `skip_special`. The result is the exact bytes, so
  /// decode(encode(s)) == s for any s whose bytes all have tokens; where the bytes are not valid UTF-8 (a
  /// sequence cut in the middle) Hugging Face would show U+FFFD instead. Throws af::Error for an id out of
  /// range.
  std::string decode(std::span<const TokenId> ids, bool skip_special = false) const;

  /// The bytes one token stands for (a control token: its text). Throws af::Error for an id out of range.
  std::string token_bytes(TokenId id) const;
  /// The token's text as the vocabulary spells it (in the byte alphabet): "Ġthe" for " the".
  const std::string& token_text(TokenId id) const;
  TokenType token_type(TokenId id) const;
  /// The id of the token spelled `text` in the vocabulary, if there is one.
  std::optional<TokenId> find(std::string_view text) const;

  std::size_t vocabulary_size() const { return tokens_.size(); }
  std::optional<TokenId> bos_id() const { return bos_id_; }
  std::optional<TokenId> eos_id() const { return eos_id_; }
  /// Whether a prompt should start with BOS (`tokenizer.ggml.add_bos_token`; false for SmolLM2, and the
  /// chat template writes no BOS either).
  bool add_bos() const { return add_bos_; }
  PreTokenizer pre_tokenizer() const { return pre_tokenizer_; }

 private:
  Tokenizer() = default;
  void encode_word(std::string_view word, std::vector<TokenId>& out) const;
  void check_id(TokenId id) const;

  struct Merge {
    std::int32_t rank;
    TokenId result;
  };
  std::vector<std::string> tokens_;
  std::vector<TokenType> types_;
  std::vector<std::string> decoded_;  ///< the bytes of each token
  std::unordered_map<std::string, TokenId> ids_;
  std::unordered_map<std::uint64_t, Merge> merges_;  ///< key: left id << 32 | right id
  TokenId byte_tokens_[256] = {};                    ///< the single-byte token of each byte, or -1
  std::vector<TokenId> special_ids_;                 ///< control and user-defined tokens, longest text first
  std::optional<TokenId> bos_id_, eos_id_;
  bool add_bos_ = false;
  PreTokenizer pre_tokenizer_ = PreTokenizer::smollm;
};

/// Decodes a stream of tokens one at a time into UTF-8 text, never cutting a character in two: the bytes of
/// a multi-byte character that is not complete yet are held back until the tokens that complete it come.
/// Bytes that cannot start or continue valid UTF-8 are passed on at once, as they are.
class TokenStreamDecoder {
 public:
  /// Keeps a reference to `tokenizer`, which must outlive the decoder.
  explicit TokenStreamDecoder(const Tokenizer& tokenizer, bool skip_special = false);
  /// The text that `id` completes (possibly empty). Throws af::Error for an id out of range.
  std::string push(TokenId id);
  /// The bytes still held back (an incomplete character at the end of the stream), and resets.
  std::string finish();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;
};

/// One message of a chat.
struct ChatMessage {
  std::string role;  ///< "system", "user" or "assistant"
  std::string content;
};

/// The exact text of SmolLM2-Instruct's `tokenizer.chat_template` (ChatML with a default system message),
/// the one template format_chat implements.
extern const std::string_view smollm2_chat_template;

/// Throws af::Error unless `template_text` is smollm2_chat_template byte for byte; the message says the
/// template is not the one this code implements and where it first differs.
void check_chat_template(std::string_view template_text);

/// Reads `tokenizer.chat_template` from `file` and checks it (check_chat_template); throws af::Error when
/// the key is missing.
void check_chat_template(const gguf::File& file);

/// The prompt text the template makes of `messages` (what transformers' apply_chat_template(messages,
/// tokenize=False, add_generation_prompt=...) gives): when the first message is not a system message, a
/// default one first, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging
/// Face<|im_end|>\n"; then each message as "<|im_start|>{role}\n{content}<|im_end|>\n"; then, with
/// `add_generation_prompt`, "<|im_start|>assistant\n". No messages give only the generation prompt. Encode
/// the result with parse_special = true.
std::string format_chat(std::span<const ChatMessage> messages, bool add_generation_prompt);

}  // namespace af

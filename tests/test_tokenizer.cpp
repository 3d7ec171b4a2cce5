// Specifications of af::Tokenizer, the streaming decoder and the chat template: hand-made vocabularies (label
// cpu), and the model file against the reference cases recorded from transformers' GGUF tokenizer
// (tests/real_model/*.json; hidden tests run by CTest as tokenizer_model_file, skipped without the file).
#include "af/error.hpp"
#include "af/gguf.hpp"
#include "af/tokenizer.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

using af::TokenId;
using Catch::Contains;

namespace {

/// Whether `text` is valid UTF-8 (no overlongs, surrogates or values past U+10FFFF).
bool is_valid_utf8(std::string_view text) {
  for (std::size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    std::size_t length = lead < 0x80                    ? 1
                         : lead >= 0xC2 && lead <= 0xDF ? 2
                         : lead >= 0xE0 && lead <= 0xEF ? 3
                         : lead >= 0xF0 && lead <= 0xF4 ? 4
                                                        : 0;
    if (length == 0 || i + length > text.size()) return false;
    std::uint32_t value = length == 1 ? lead : lead & (0x7Fu >> length);
    for (std::size_t k = 1; k < length; ++k) {
      const auto byte = static_cast<unsigned char>(text[i + k]);
      if ((byte & 0xC0u) != 0x80u) return false;
      value = (value << 6) | (byte & 0x3Fu);
    }
    constexpr std::uint32_t minimum[] = {0, 0, 0x80, 0x800, 0x10000};
    if (value < minimum[length] || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return false;
    i += length;
  }
  return true;
}

/// A vocabulary of the 256 byte characters plus `extra` tokens, with `merges`.
af::Tokenizer::Vocabulary byte_vocabulary(std::vector<std::string> extra = {}, std::vector<std::string> merges = {}) {
  af::Tokenizer::Vocabulary vocabulary;
  for (int byte = 0; byte < 256; ++byte) {
    vocabulary.tokens.emplace_back(af::byte_to_alphabet(static_cast<unsigned char>(byte)));
  }
  for (std::string& token : extra) vocabulary.tokens.push_back(std::move(token));
  vocabulary.merges = std::move(merges);
  return vocabulary;
}

std::vector<std::string> words(std::string_view text, af::PreTokenizer pre_tokenizer = af::PreTokenizer::smollm) {
  std::vector<std::string> result;
  for (const std::string_view word : af::split_words(text, pre_tokenizer)) result.emplace_back(word);
  return result;
}

std::string stream_decode(const af::Tokenizer& tokenizer, const std::vector<TokenId>& ids, bool check_pieces) {
  af::TokenStreamDecoder decoder(tokenizer);
  std::string text;
  for (const TokenId id : ids) {
    const std::string piece = decoder.push(id);
    if (check_pieces) CHECK(is_valid_utf8(piece));
    text += piece;
  }
  return text + decoder.finish();
}

}  // namespace

TEST_CASE("tokenizer: the byte alphabet is GPT-2's bytes_to_unicode", "[tokenizer]") {
  CHECK(af::byte_to_alphabet('a') == "a");
  CHECK(af::byte_to_alphabet('!') == "!");
  CHECK(af::byte_to_alphabet(' ') == "\u0120");   // Ġ
  CHECK(af::byte_to_alphabet('\n') == "\u010A");  // Ċ
  CHECK(af::byte_to_alphabet(0x00) == "\u0100");
  CHECK(af::byte_to_alphabet(0xA1) == "\u00A1");
  CHECK(af::byte_to_alphabet(0xAD) == "\u0143");  // the 68th and last byte moved up
  CHECK(af::byte_to_alphabet(0xFF) == "\u00FF");
}

TEST_CASE("tokenizer: the pre-tokenizer splits like GPT-2's regex, digits alone under smollm", "[tokenizer]") {
  using V = std::vector<std::string>;
  CHECK(words("Hello, world!") == V{"Hello", ",", " world", "!"});
  CHECK(words("Hello  world") == V{"Hello", " ", " world"});
  CHECK(words("trailing   ") == V{"trailing", "   "});
  CHECK(words("\n\nx") == V{"\n", "\n", "x"});
  CHECK(words("it's WE'RE they'll") == V{"it", "'s", " WE", "'", "RE", " they", "'ll"});
  CHECK(words("x 1234") == V{"x", " ", "1", "2", "3", "4"});
  CHECK(words("x 1234", af::PreTokenizer::gpt2) == V{"x", " 1234"});
  CHECK(words("a  1") == V{"a", "  ", "1"});
  CHECK(words("a  1", af::PreTokenizer::gpt2) == V{"a", " ", " 1"});
  CHECK(words("caf\u00e9 \u4e2d\u6587!!") == V{"caf\u00e9", " \u4e2d\u6587", "!!"});
  CHECK(words("A\u00a0B") == V{"A", "\u00a0", "B"});                    // NBSP is white space
  CHECK(words("a\u200bb") == V{"a", "\u200b", "b"});                    // the zero-width space is not
  CHECK(words("x\u00bd") == V{"x", "\u00bd"});                          // ½ is \p{N}
  CHECK(words("a\xff\xfe b\x80") == V{"a", "\xff\xfe", " b", "\x80"});  // invalid bytes: no class
  CHECK(words("").empty());
  const std::string text = "  mixed\t\n text, 12 numbers\xe2\x82 and 'quotes'  ";
  std::string joined;
  for (const std::string& word : words(text)) joined += word;
  CHECK(joined == text);
}

TEST_CASE("tokenizer: BPE applies the lowest-ranked merge first, the leftmost among equals", "[tokenizer]") {
  // Tokens 256.. are "ab", "bc", "aa"; merges: "b c" before "a b".
  const af::Tokenizer tokenizer =
      af::Tokenizer::from_vocabulary(byte_vocabulary({"ab", "bc", "aa"}, {"b c", "a b", "a a"}));
  CHECK(tokenizer.encode("abc") == std::vector<TokenId>{'a', 257});
  CHECK(tokenizer.encode("ab") == std::vector<TokenId>{256});
  CHECK(tokenizer.encode("aaa") == std::vector<TokenId>{258, 'a'});
  CHECK(tokenizer.encode(" ab") == std::vector<TokenId>{' ', 256});  // " ab" is one word, but no merge has Ġ
  CHECK(tokenizer.decode(tokenizer.encode("x abc!\xff")) == "x abc!\xff");
  CHECK(tokenizer.find("ab") == 256);
  CHECK_FALSE(tokenizer.find("zz").has_value());
  CHECK(tokenizer.token_bytes(' ') == " ");
  CHECK(tokenizer.token_text(' ') == "\u0120");
  CHECK_THROWS_WITH(tokenizer.decode(std::vector<TokenId>{259}), Contains("token id 259 is out of range"));
  CHECK_THROWS_WITH(tokenizer.decode(std::vector<TokenId>{-1}), Contains("token id -1 is out of range"));
}

TEST_CASE("tokenizer: control tokens are parsed only when asked, and decode to their text", "[tokenizer]") {
  af::Tokenizer::Vocabulary vocabulary = byte_vocabulary({"<|a|>", "<|a|>x"});
  vocabulary.token_types.assign(vocabulary.tokens.size(), 1);
  vocabulary.token_types[256] = 3;
  vocabulary.token_types[257] = 3;
  const af::Tokenizer tokenizer = af::Tokenizer::from_vocabulary(vocabulary);
  CHECK(tokenizer.encode("<|a|>", true) == std::vector<TokenId>{256});
  CHECK(tokenizer.encode("q<|a|>xy<|a|", true) == std::vector<TokenId>{'q', 257, 'y', '<', '|', 'a', '|'});
  CHECK(tokenizer.encode("<|a|>", false) == std::vector<TokenId>{'<', '|', 'a', '|', '>'});
  const std::vector<TokenId> ids{'h', 256, 'i'};
  CHECK(tokenizer.decode(ids) == "h<|a|>i");
  CHECK(tokenizer.decode(ids, true) == "hi");
  CHECK(tokenizer.token_type(256) == af::TokenType::control);
}

TEST_CASE("tokenizer: a byte without a token is dropped", "[tokenizer]") {
  af::Tokenizer::Vocabulary vocabulary = byte_vocabulary();
  vocabulary.tokens[0xFF] = "<unused>";  // no token spells 0xFF now
  vocabulary.token_types.assign(256, 1);
  vocabulary.token_types[0xFF] = 3;
  const af::Tokenizer tokenizer = af::Tokenizer::from_vocabulary(vocabulary);
  CHECK(tokenizer.encode("a\xff"
                         "b") == std::vector<TokenId>{'a', 'b'});
}

TEST_CASE("tokenizer: the stream decoder holds back an incomplete UTF-8 character", "[tokenizer]") {
  const af::Tokenizer tokenizer = af::Tokenizer::from_vocabulary(byte_vocabulary());
  af::TokenStreamDecoder decoder(tokenizer);
  CHECK(decoder.push('a') == "a");
  CHECK(decoder.push(0xE2).empty());  // the euro sign, E2 82 AC, one byte at a time
  CHECK(decoder.push(0x82).empty());
  CHECK(decoder.push(0xAC) == "\u20ac");
  CHECK(decoder.push(0xF0).empty());  // cut off at the end of the stream: finish gives the bytes
  CHECK(decoder.push(0x9F).empty());
  CHECK(decoder.finish() == "\xf0\x9f");
  CHECK(decoder.push(0xFF) == "\xff");  // can never start a character: passed on at once
  CHECK(decoder.push(0x80) == "\x80");  // a stray continuation byte likewise
  CHECK(decoder.push(0xC3).empty());
  CHECK(decoder.push('x') == "\xc3x");  // a lead byte that is not continued is passed on
  CHECK(decoder.finish().empty());
  CHECK_THROWS_AS(decoder.push(256), af::Error);
}

TEST_CASE("tokenizer: a malformed vocabulary throws af::Error naming the value", "[tokenizer]") {
  const auto rejects = [](af::Tokenizer::Vocabulary vocabulary, const std::string& message) {
    CHECK_THROWS_WITH(af::Tokenizer::from_vocabulary(std::move(vocabulary)), Contains(message));
  };
  rejects(af::Tokenizer::Vocabulary{}, "the vocabulary is empty");
  rejects(byte_vocabulary({"ab", "ab"}), "token 257 (\"ab\") repeats token 256");
  rejects(byte_vocabulary({"a b"}), "token 256 (\"a b\") has the character U+0020, which is not in the byte alphabet");
  rejects(byte_vocabulary({"\u4e2d"}), "has the character U+4E2D");
  rejects(byte_vocabulary({"a\xff"}), "token 256 (\"a\\xff\") is not valid UTF-8 at byte 1");
  rejects(byte_vocabulary({""}), "token 256 is empty");
}

TEST_CASE("tokenizer: malformed merges, types and ids are rejected", "[tokenizer]") {
  const auto rejects = [](af::Tokenizer::Vocabulary vocabulary, const std::string& message) {
    CHECK_THROWS_WITH(af::Tokenizer::from_vocabulary(std::move(vocabulary)), Contains(message));
  };
  af::Tokenizer::Vocabulary small;
  small.tokens = {"a", "b", "ab"};
  af::Tokenizer::Vocabulary v = small;
  v.merges = {"a z"};
  rejects(v, "merge 0 (\"a z\") names \"z\", which is not in the vocabulary");
  v.merges = {"a b", "b a"};
  rejects(v, "merge 1 (\"b a\") makes \"ba\", which is not in the vocabulary");
  v.merges = {"a b", "a b"};
  rejects(v, "merge 1 (\"a b\") repeats merge 0");
  v.merges = {"ab"};
  rejects(v, "merge 0 (\"ab\") is not two tokens separated by one space");
  v.merges = {"a  b"};
  rejects(v, "merge 0 (\"a  b\") is not two tokens separated by one space");
  v.merges = {" a"};
  rejects(v, "is not two tokens separated by one space");
  v = small;
  v.token_types = {1, 1};
  rejects(v, "there are 2 token types for 3 tokens");
  v.token_types = {1, 9, 1};
  rejects(v, "token 1 (\"b\") has the type 9");
  v = small;
  v.bos_id = 3;
  rejects(v, "the BOS id is 3 (expected 0 to 2)");
  v = small;
  v.eos_id = -1;
  rejects(v, "the EOS id is -1");
}

TEST_CASE("chat template: ChatML with a default system message", "[tokenizer]") {
  const std::string system =
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
      "Face<|im_end|>\n";
  CHECK(af::format_chat({}, false).empty());
  CHECK(af::format_chat({}, true) == "<|im_start|>assistant\n");
  const std::vector<af::ChatMessage> user{{"user", "Hi"}};
  CHECK(af::format_chat(user, false) == system + "<|im_start|>user\nHi<|im_end|>\n");
  const std::vector<af::ChatMessage> with_system{{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello"}};
  CHECK(af::format_chat(with_system, true) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
        "<|im_end|>\n<|im_start|>assistant\n");
  // A system message later on does not stop the default one.
  const std::vector<af::ChatMessage> late_system{{"user", "Hi"}, {"system", "S"}};
  CHECK(af::format_chat(late_system, false).starts_with(system));

  CHECK_NOTHROW(af::check_chat_template(af::smollm2_chat_template));
  std::string changed(af::smollm2_chat_template);
  changed.replace(changed.find("SmolLM"), 6, "OtherLM");
  CHECK_THROWS_WITH(
      af::check_chat_template(changed),
      Contains("is not the SmolLM2 ChatML template this code implements") && Contains("differ from byte 144 on"));
  CHECK_THROWS_WITH(af::check_chat_template(""), Contains("(0 bytes)"));
}

// ---------------------------------------------------------------------------------------------------------------
// The model file. Hidden from the discovered tests: CTest runs them as tokenizer_model_file, skipped when the
// file is not there (tests/CMakeLists.txt).

namespace {

const af::gguf::File& model_file() {
  static const af::gguf::File file = af::gguf::File::open(AF_MODEL_GGUF);
  return file;
}

const af::Tokenizer& model_tokenizer() {
  static const af::Tokenizer tokenizer = af::Tokenizer::from_gguf(model_file());
  return tokenizer;
}

nlohmann::json read_cases(const std::string& name) {
  std::ifstream in(std::filesystem::path(AF_REAL_MODEL_DIR) / name);
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

std::vector<TokenId> ids_of(const nlohmann::json& array) { return array.get<std::vector<TokenId>>(); }

}  // namespace

TEST_CASE("tokenizer: the SmolLM2 model file's tokenizer", "[.model]") {
  const af::Tokenizer& tokenizer = model_tokenizer();
  CHECK(tokenizer.vocabulary_size() == 49152);
  CHECK(tokenizer.pre_tokenizer() == af::PreTokenizer::smollm);
  CHECK(tokenizer.bos_id() == 1);
  CHECK(tokenizer.eos_id() == 2);
  CHECK_FALSE(tokenizer.add_bos());  // tokenizer.ggml.add_bos_token = false: neither reference adds a BOS
  CHECK(tokenizer.token_type(0) == af::TokenType::control);
  CHECK(tokenizer.token_text(1) == "<|im_start|>");
  CHECK(tokenizer.token_text(2) == "<|im_end|>");
  CHECK_NOTHROW(af::check_chat_template(model_file()));
}

TEST_CASE("tokenizer: the model file against transformers' ids", "[.model]") {
  const af::Tokenizer& tokenizer = model_tokenizer();
  const nlohmann::json cases = read_cases("tokenizer_cases.json");
  REQUIRE(cases["cases"].size() >= 40);
  for (const nlohmann::json& c : cases["cases"]) {
    const std::string text = c["text"].get<std::string>();
    INFO("text: " << text);
    const std::vector<TokenId> ids = ids_of(c["ids"]), ids_special = ids_of(c["ids_special"]);
    CHECK(tokenizer.encode(text, false) == ids);
    CHECK(tokenizer.encode(text, true) == ids_special);
    CHECK(tokenizer.decode(ids) == text);
    CHECK(tokenizer.decode(ids_special) == c["hf_decode"].get<std::string>());
    CHECK(stream_decode(tokenizer, ids, true) == text);
    CHECK(stream_decode(tokenizer, ids_special, true) == text);
  }
}

TEST_CASE("tokenizer: the model file's chat template against transformers' apply_chat_template", "[.model]") {
  const af::Tokenizer& tokenizer = model_tokenizer();
  const nlohmann::json cases = read_cases("chat_template_cases.json");
  REQUIRE_FALSE(cases["cases"].empty());
  for (const nlohmann::json& c : cases["cases"]) {
    INFO("case: " << c["name"].get<std::string>());
    std::vector<af::ChatMessage> messages;
    for (const nlohmann::json& m : c["messages"]) {
      messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    const std::string text = af::format_chat(messages, c["add_generation_prompt"].get<bool>());
    CHECK(text == c["text"].get<std::string>());
    CHECK(tokenizer.encode(text, true) == ids_of(c["ids"]));
  }
}

TEST_CASE("tokenizer: the smollm pre-tokenizer where transformers' GGUF converter differs", "[.model]") {
  // scripts/record_pretokenizer_divergence.py: transformers' GGUF tokenizer (GPT-2's ByteLevel alone) and the
  // same vocabulary behind the model's own Digits(individual_digits) + ByteLevel pre-tokenizer.
  const af::gguf::File& file = model_file();
  af::Tokenizer::Vocabulary vocabulary;
  vocabulary.tokens.assign(file.strings("tokenizer.ggml.tokens").begin(), file.strings("tokenizer.ggml.tokens").end());
  vocabulary.merges.assign(file.strings("tokenizer.ggml.merges").begin(), file.strings("tokenizer.ggml.merges").end());
  vocabulary.token_types = file.integers("tokenizer.ggml.token_type");
  vocabulary.pre_tokenizer = af::PreTokenizer::gpt2;
  const af::Tokenizer gpt2 = af::Tokenizer::from_vocabulary(std::move(vocabulary));
  const af::Tokenizer& smollm = model_tokenizer();
  struct Case {
    std::string text;
    std::vector<TokenId> gpt2, smollm;
  };
  const std::vector<Case> cases{
      {"a  1", {81, 216, 216, 33}, {81, 256, 33}},
      {"abc  123", {25276, 216, 216, 33, 34, 35}, {25276, 256, 33, 34, 35}},
      {"version  2.0   beta", {5903, 216, 216, 34, 30, 32, 256, 11345}, {5903, 256, 34, 30, 32, 256, 11345}},
      {"\n\n1", {198, 198, 33}, {1116, 33}},
  };
  for (const Case& c : cases) {
    INFO("text: " << c.text);
    CHECK(gpt2.encode(c.text) == c.gpt2);
    CHECK(smollm.encode(c.text) == c.smollm);
  }
  // The recorded cases do not tell the two apart: gpt2 gives transformers' ids too.
  const nlohmann::json recorded = read_cases("tokenizer_cases.json");
  for (const nlohmann::json& c : recorded["cases"]) {
    CHECK(gpt2.encode(c["text"].get<std::string>()) == ids_of(c["ids"]));
  }
}

TEST_CASE("tokenizer: the model file with bytes that are not UTF-8", "[.model]") {
  const af::Tokenizer& tokenizer = model_tokenizer();
  // Every byte the vocabulary spells comes back, valid UTF-8 or not.
  const std::string invalid = "\x80lone continuation, cut \xe2\x82, overlong \xc0\xaf, surrogate \xed\xa0\x80 end";
  const std::string spelled = "\x80lone continuation, cut \xe2\x82, overlong \xaf, surrogate \xed\xa0\x80 end";
  CHECK(tokenizer.decode(tokenizer.encode(invalid)) == spelled);  // 0xC0 has no token: dropped
  CHECK(stream_decode(tokenizer, tokenizer.encode(spelled), false) == spelled);
  CHECK(tokenizer.encode("\x04\xff").empty());
  for (int byte = 0; byte < 256; ++byte) {
    const std::string one(1, static_cast<char>(byte));
    const bool spelled_by_a_token = tokenizer.find(af::byte_to_alphabet(static_cast<unsigned char>(byte))).has_value();
    CHECK(tokenizer.decode(tokenizer.encode(one)) == (spelled_by_a_token ? one : ""));
  }
}

TEST_CASE("tokenizer: encoding 100 KB of text takes well under a second", "[.model]") {
  const af::Tokenizer& tokenizer = model_tokenizer();
#ifdef __SANITIZE_ADDRESS__
  const double time_limit = 10.0;  // AddressSanitizer's checks slow every access down several times
#else
  const double time_limit = 1.0;
#endif
  std::string text;
  const nlohmann::json cases = read_cases("tokenizer_cases.json");
  while (text.size() < 100'000) {
    for (const nlohmann::json& c : cases["cases"]) text += c["text"].get<std::string>() + "\n";
  }
  const auto start = std::chrono::steady_clock::now();
  const std::vector<TokenId> ids = tokenizer.encode(text, true);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO(ids.size() << " tokens in " << seconds << " s");
  CHECK(tokenizer.decode(ids) == text);
  CHECK(seconds < time_limit);
  // One long word (no white space) is merged with a heap, not pair by pair from the start each time.
  const std::string word(50'000, 'a');
  const auto word_start = std::chrono::steady_clock::now();
  CHECK(tokenizer.decode(tokenizer.encode(word)) == word);
  const double word_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - word_start).count();
  INFO("a word of 50000 bytes in " << word_seconds << " s");
  CHECK(word_seconds < time_limit);
}

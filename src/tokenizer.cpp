// Tokenizers: the built-in byte tokenizer and a byte-level BPE that reads an HF tokenizer.json.
//
// The BPE follows HF tokenizers (tokenizers/src/{tokenizer/added_vocabulary.rs,
// pre_tokenizers/{byte_level,split,sequence}.rs, models/bpe/{model,word}.rs,
// decoders/byte_level.rs}) step by step so that encode() gives exactly HF's ids:
//   1. added tokens are split out first: those with normalized=false on the raw text, then those
//      with normalized=true inside each remaining gap (two passes, as HF does), leftmost-longest,
//      honouring single_word / lstrip / rstrip;
//   2. each gap goes through the pre-tokenizer (ByteLevel, or Split(Regex) steps then ByteLevel);
//   3. each piece is BPE-merged by rank exactly like HF's Word::merge_all (a heap of (rank, pos)),
//      with ignore_merges and a per-piece cache.
// The post_processor (e.g. Llama 3's TemplateProcessing that adds <|begin_of_text|>) is parsed
// past but NOT applied: encode() never adds BOS/EOS; callers add them explicitly.
//
// Regexes are compiled once with PCRE2 in UTF + UCP mode. HF uses Oniguruma, whose \s is the
// Unicode White_Space property; PCRE2's UCP \s also matches U+180E, so \s and \S are rewritten
// to \p{White_Space} / \P{White_Space} before compiling. PCRE2_MATCH_INVALID_UTF lets invalid
// UTF-8 through (HF cannot be given it at all): invalid bytes match nothing, so runs of them
// fall into the gaps between matches and become pieces of their own, which the byte-level
// mapping encodes losslessly; decode() then shows them as U+FFFD, as HF's decoder would.
// PCRE2's Unicode tables (10.42: Unicode 14) can be older than HF's, so characters assigned
// since then may split differently.
#include "ranktune/tokenizer.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <shared_mutex>
#include <sstream>
#include <unordered_map>
#include <variant>

#include "ranktune/error.h"

#ifdef RANKTUNE_HAVE_PCRE2
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#endif

namespace ranktune {
namespace {

// ---- small helpers -----------------------------------------------------------------------------

uint64_t fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string hex64(uint64_t v) {
  static const char* digits = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) out[static_cast<size_t>(i)] = digits[v & 15];
  return out;
}

// Length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 if the bytes there are not
// one; *valid_prefix gets how many bytes form the longest prefix of a valid sequence (>= 1),
// which is what Rust's from_utf8_lossy replaces by one U+FFFD.
size_t utf8_sequence_at(std::string_view s, size_t i, size_t* valid_prefix = nullptr) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (valid_prefix) *valid_prefix = 1;
  if (b < 0x80) return 1;
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2, hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return 0;
  }
  size_t j = i + 1;
  for (size_t k = 0; k < need; ++k, ++j) {
    if (j >= s.size()) return 0;
    const auto c = static_cast<unsigned char>(s[j]);
    if (c < (k == 0 ? lo : 0x80) || c > (k == 0 ? hi : 0xBF)) return 0;
    if (valid_prefix) *valid_prefix = j - i + 1;
  }
  return need + 1;
}

char32_t decode_utf8(std::string_view s, size_t i, size_t len) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (len == 1) return b;
  char32_t cp = b & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

struct Char {
  char32_t cp;  // U+FFFD for an invalid byte
  size_t len;   // bytes (1 for an invalid byte)
};

Char char_at(std::string_view s, size_t i) {
  const size_t len = utf8_sequence_at(s, i);
  if (len == 0) return {0xFFFD, 1};
  return {decode_utf8(s, i, len), len};
}

// The character that ends just before position `end` (end > 0).
Char char_before(std::string_view s, size_t end) {
  for (size_t len = 1; len <= 4 && len <= end; ++len) {
    const size_t start = end - len;
    if (utf8_sequence_at(s, start) == len) return {decode_utf8(s, start, len), len};
    if ((static_cast<unsigned char>(s[start]) & 0xC0) != 0x80) break;  // a lead byte: stop
  }
  return {0xFFFD, 1};
}

// Rust's char::is_whitespace (the Unicode White_Space property).
bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// ---- added / special tokens split out before pre-tokenization ---------------------------------

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

// A run of the input: either an added token (id >= 0) or plain text [begin, end) (id < 0).
struct Segment {
  size_t begin, end;
  int32_t id;
};

// Leftmost-longest literal matching of a set of added tokens (HF uses aho-corasick with
// MatchKind::LeftmostLongest), then HF's single_word / lstrip / rstrip rules.
class AddedTokenSplitter {
 public:
  AddedTokenSplitter() = default;
  explicit AddedTokenSplitter(std::vector<AddedToken> tokens) : tokens_(std::move(tokens)) {
    for (size_t i = 0; i < tokens_.size(); ++i) {
      if (tokens_[i].content.empty()) continue;
      by_first_byte_[static_cast<unsigned char>(tokens_[i].content[0])].push_back(i);
    }
    for (auto& list : by_first_byte_) {
      std::stable_sort(list.begin(), list.end(), [&](size_t a, size_t b) {
        return tokens_[a].content.size() > tokens_[b].content.size();
      });
    }
  }
  bool empty() const { return tokens_.empty(); }
  bool has_single_word() const {
    return std::any_of(tokens_.begin(), tokens_.end(),
                       [](const AddedToken& t) { return t.single_word; });
  }

  // Appends the segments of `text` (offsets relative to `base`) to `out`. `is_word_char` is the
  // Rust regex crate's Unicode \w (what HF tests), needed only for single_word tokens.
  template <typename IsWordChar>
  void split(std::string_view text, size_t base, const IsWordChar& is_word_char,
             std::vector<Segment>& out) const {
    size_t start_offset = 0;
    size_t pos = 0;
    while (pos < text.size()) {
      // Find the leftmost match and, at that position, the longest token.
      size_t match_start = text.size();
      const AddedToken* token = nullptr;
      for (size_t i = pos; i < text.size() && !token; ++i) {
        for (size_t index : by_first_byte_[static_cast<unsigned char>(text[i])]) {
          const std::string& c = tokens_[index].content;
          if (text.compare(i, c.size(), c) == 0) {
            token = &tokens_[index];
            match_start = i;
            break;
          }
        }
      }
      if (!token) break;
      size_t start = match_start;
      size_t stop = match_start + token->content.size();
      pos = stop;  // the next search starts after this match even if it is rejected below
      if (token->single_word) {
        const bool start_space = start == 0 || !is_word_char(char_before(text, start).cp);
        const bool stop_space = stop == text.size() || !is_word_char(char_at(text, stop).cp);
        if (!start_space || !stop_space) continue;
      }
      if (token->lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          const Char c = char_before(text, new_start);
          if (!is_whitespace(c.cp)) break;
          new_start -= c.len;
        }
        start = std::max(new_start, start_offset);
      }
      if (token->rstrip) {
        while (stop < text.size()) {
          const Char c = char_at(text, stop);
          if (!is_whitespace(c.cp)) break;
          stop += c.len;
        }
      }
      if (start > start_offset) out.push_back({base + start_offset, base + start, -1});
      out.push_back({base + start, base + stop, token->id});
      start_offset = stop;
    }
    if (start_offset < text.size()) out.push_back({base + start_offset, base + text.size(), -1});
  }

 private:
  std::vector<AddedToken> tokens_;
  std::array<std::vector<size_t>, 256> by_first_byte_;
};

// ---- the byte tokenizer
// --------------------------------------------------------------------------

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr std::array<const char*, 6> kSpecials = {
      "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
      "<|end_header_id|>", "<|eot_id|>",      "<|pad|>"};

  ByteTokenizer() {
    std::vector<AddedToken> tokens;
    std::string definition = "ranktune byte tokenizer v1: bytes 0..255";
    for (size_t i = 0; i < kSpecials.size(); ++i) {
      tokens.push_back(
          {kSpecials[i], static_cast<int32_t>(256 + i), false, false, false, false, true});
      definition += std::string(", ") + kSpecials[i] + "=" + std::to_string(256 + i);
    }
    splitter_ = AddedTokenSplitter(std::move(tokens));
    hash_ = hex64(fnv1a64(definition));
  }

  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    std::vector<Segment> segments;
    splitter_.split(
        text, 0, [](char32_t) { return false; }, segments);
    for (const Segment& s : segments) {
      if (s.id >= 0) {
        ids.push_back(s.id);
        continue;
      }
      for (size_t i = s.begin; i < s.end; ++i) ids.push_back(static_cast<unsigned char>(text[i]));
    }
    return ids;
  }

  // Ids outside [0, vocab_size) are skipped (as HF does), so a model whose embedding is padded
  // past the vocabulary can still be decoded.
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    out.reserve(ids.size());
    for (int32_t id : ids) {
      if (id >= 0 && id < 256) {
        out += static_cast<char>(id);
      } else if (id >= 256 && id < vocab_size()) {
        out += kSpecials[static_cast<size_t>(id - 256)];
      }
    }
    return out;
  }

  int64_t vocab_size() const override { return 256 + static_cast<int64_t>(kSpecials.size()); }

  std::optional<int32_t> token_id(std::string_view token) const override {
    for (size_t i = 0; i < kSpecials.size(); ++i) {
      if (token == kSpecials[i]) return static_cast<int32_t>(256 + i);
    }
    return std::nullopt;
  }

  std::string hash() const override { return hash_; }
  std::string kind() const override { return "byte"; }

 private:
  AddedTokenSplitter splitter_;
  std::string hash_;
};

// ---- tokenizer.json
// ------------------------------------------------------------------------------

std::filesystem::path resolve_tokenizer_path(const std::string& spec) {
  namespace fs = std::filesystem;
  fs::path path(spec);
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    fs::path file = path / "tokenizer.json";
    RT_REQUIRE(fs::is_regular_file(file, ec),
               "tokenizer directory " + path.string() +
                   " has no tokenizer.json; give the directory of an HF tokenizer (the file saved "
                   "by tokenizer.save()/save_pretrained) or 'byte'");
    return file;
  }
  RT_REQUIRE(fs::exists(path, ec),
             "tokenizer " + spec +
                 ": no such file or directory; give 'byte' for the built-in byte tokenizer or the "
                 "path of an HF tokenizer.json (or of a directory holding one)");
  RT_REQUIRE(fs::is_regular_file(path, ec), "tokenizer " + spec + " is not a regular file");
  return path;
}

#ifdef RANKTUNE_HAVE_PCRE2

// ---- byte-level BPE (needs PCRE2) ----------------------------------------------------------

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t valid_prefix = 1;
    const size_t len = utf8_sequence_at(s, i, &valid_prefix);
    if (len > 0) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += valid_prefix;
    }
  }
  return out;
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 upwards.
std::array<char32_t, 256> bytes_to_unicode() {
  std::array<char32_t, 256> map{};
  std::array<bool, 256> printable{};
  for (int b = '!'; b <= '~'; ++b) printable[static_cast<size_t>(b)] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) printable[static_cast<size_t>(b)] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) printable[static_cast<size_t>(b)] = true;
  char32_t next = 256;
  for (size_t b = 0; b < 256; ++b) map[b] = printable[b] ? static_cast<char32_t>(b) : next++;
  return map;
}

std::string read_file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  RT_REQUIRE(in, "cannot open tokenizer file " + path.string() + ": " + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  RT_REQUIRE(!in.bad(), "cannot read tokenizer file " + path.string());
  return buffer.str();
}

// A compiled PCRE2 pattern, shared read-only between threads.
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) : where_(where) {
    std::string translated = literal ? pattern : translate(pattern);
    uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF;
    if (literal) options |= PCRE2_LITERAL;
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                          options, &error_code, &error_offset, nullptr);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error_code, message, sizeof(message));
      throw UserError(where + ": cannot compile the regex '" + pattern + "' at offset " +
                      std::to_string(error_offset) + ": " + reinterpret_cast<const char*>(message));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // without JIT support, pcre2_match interprets
    uint32_t captures = 0;
    pcre2_pattern_info(code_, PCRE2_INFO_CAPTURECOUNT, &captures);
    ovector_pairs_ = captures + 1;
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  uint32_t ovector_pairs() const { return ovector_pairs_; }

  // Per-call matching state (PCRE2 match data and JIT stacks are not shareable between threads).
  struct Scratch {
    explicit Scratch(uint32_t ovector_pairs)
        : match_data(pcre2_match_data_create(ovector_pairs, nullptr)),
          context(pcre2_match_context_create(nullptr)) {
      RT_ASSERT(match_data && context, "pcre2: out of memory");
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() {
      pcre2_match_data_free(match_data);
      pcre2_match_context_free(context);
      if (jit_stack) pcre2_jit_stack_free(jit_stack);
    }
    // JIT code runs on 32 KiB of machine stack by default; a match that needs more (long
    // backtracking runs) gets a larger JIT stack, made on first need.
    bool grow_jit_stack() {
      if (jit_stack) return false;
      jit_stack = pcre2_jit_stack_create(256 * 1024, 64 * 1024 * 1024, nullptr);
      if (!jit_stack) return false;
      pcre2_jit_stack_assign(context, nullptr, jit_stack);
      return true;
    }
    pcre2_match_data* match_data;
    pcre2_match_context* context;
    pcre2_jit_stack* jit_stack = nullptr;
  };

  // Calls fn(start, end) for each match, iterating like the Rust onig crate's find_iter (which
  // HF uses): an empty match right where the previous match ended is skipped.
  template <typename Fn>
  void for_each_match(std::string_view s, Scratch& scratch, const Fn& fn) const {
    size_t last_end = 0;
    bool have_last_match = false;
    size_t last_match_end = 0;
    const auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    while (last_end <= s.size()) {
      int rc =
          pcre2_match(code_, subject, s.size(), last_end, 0, scratch.match_data, scratch.context);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT && scratch.grow_jit_stack()) {
        rc =
            pcre2_match(code_, subject, s.size(), last_end, 0, scratch.match_data, scratch.context);
      }
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {  // the interpreter keeps its backtracking on the heap
        rc = pcre2_match(code_, subject, s.size(), last_end, PCRE2_NO_JIT, scratch.match_data,
                         scratch.context);
      }
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        throw UserError(where_ + ": the regex failed on the input text (" +
                        reinterpret_cast<const char*>(message) + ")");
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.match_data);
      const size_t start = ovector[0], end = ovector[1];
      if (start == end && have_last_match && last_match_end == end) {
        last_end += last_end < s.size() ? std::max<size_t>(1, utf8_sequence_at(s, last_end)) : 1;
        continue;
      }
      last_end = end;
      last_match_end = end;
      have_last_match = true;
      fn(start, end);
    }
  }

  bool matches_whole(std::string_view s, Scratch& scratch) const {
    const int rc =
        pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0,
                    PCRE2_ANCHORED | PCRE2_ENDANCHORED, scratch.match_data, scratch.context);
    return rc >= 0;
  }

 private:
  // Oniguruma's \s is White_Space; PCRE2's UCP \s is \p{Z}, \h and \v, which adds U+180E.
  static std::string translate(const std::string& pattern) {
#if PCRE2_MAJOR > 10 || (PCRE2_MAJOR == 10 && PCRE2_MINOR >= 40)
    std::string out;
    out.reserve(pattern.size() + 32);
    for (size_t i = 0; i < pattern.size(); ++i) {
      if (pattern[i] == '\\' && i + 1 < pattern.size()) {
        const char next = pattern[++i];
        if (next == 's') {
          out += "\\p{White_Space}";
        } else if (next == 'S') {
          out += "\\P{White_Space}";
        } else {
          out += '\\';
          out += next;
        }
      } else {
        out += pattern[i];
      }
    }
    return out;
#else
    return pattern;
#endif
  }

  std::string where_;  // the file and key, for messages
  pcre2_code* code_ = nullptr;
  uint32_t ovector_pairs_ = 1;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitStep {
  std::unique_ptr<Regex> regex;
  SplitBehavior behavior;
  bool invert;
};
// Last step: optionally prefix a space, optionally split with the GPT-2 regex (Isolated); the
// byte-to-character mapping itself is folded into the BPE (one byte = one initial symbol).
struct ByteLevelStep {
  bool add_prefix_space;
  std::unique_ptr<Regex> regex;  // null when use_regex is false
};
using PreTokenizerStep = std::variant<SplitStep, ByteLevelStep>;

// The GPT-2 pattern HF's ByteLevel pre-tokenizer uses when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Merge {
  int32_t rank;
  int32_t new_id;
};

// Hash maps keyed by std::string that can be probed with a std::string_view (no copy per lookup).
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename Value>
using StringMap = std::unordered_map<std::string, Value, StringHash, std::equal_to<>>;

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(const std::filesystem::path& path, const std::string& file_bytes);

  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> token_id(std::string_view token) const override;
  std::string hash() const override { return hash_; }
  std::string kind() const override { return "bpe"; }

 private:
  struct EncodeScratch {
    explicit EncodeScratch(uint32_t ovector_pairs) : regex(ovector_pairs) {}
    Regex::Scratch regex;
    std::vector<Segment> segments, inner_segments;
  };

  void load(const nlohmann::json& root);
  void load_model(const nlohmann::json& model);
  void load_added_tokens(const nlohmann::json& added);
  void load_pre_tokenizer(const nlohmann::json& pre);
  void add_pre_tokenizer_step(const nlohmann::json& step, const std::string& where);
  std::unique_ptr<Regex> compile(const std::string& pattern, bool literal,
                                 const std::string& where);

  template <typename Emit>
  void pre_tokenize(std::string_view piece, size_t step, EncodeScratch& scratch,
                    const Emit& emit) const;
  void encode_piece(std::string_view piece, std::vector<int32_t>& ids) const;
  void merge_word(std::string_view piece, std::vector<int32_t>& out) const;
  bool is_word_char(char32_t c, EncodeScratch& scratch) const;

  std::string file_;  // for messages
  std::string hash_;
  int64_t vocab_size_ = 0;

  // model
  StringMap<int32_t> vocab_;             // token as written in the file
  StringMap<int32_t> bytes_vocab_;       // token as the bytes it stands for
  std::array<int32_t, 256> byte_ids_{};  // the id of each single byte, or -1
  std::unordered_map<uint64_t, Merge> merges_;
  bool ignore_merges_ = false;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;

  // added tokens
  std::vector<AddedToken> added_;
  AddedTokenSplitter raw_splitter_;         // normalized == false: matched on the raw text
  AddedTokenSplitter normalized_splitter_;  // normalized == true: matched inside each gap
  std::unique_ptr<Regex> word_char_;        // Rust regex's \w, for single_word

  std::vector<PreTokenizerStep> steps_;
  uint32_t ovector_pairs_ = 1;

  std::vector<std::string> id_bytes_;  // what each id decodes to, before from_utf8_lossy
  std::vector<bool> id_known_;

  // Per-piece cache (HF keeps one too). Readers share the lock; it stops growing when full.
  static constexpr size_t kCacheCapacity = 1 << 16;
  mutable std::shared_mutex cache_mutex_;
  mutable StringMap<std::vector<int32_t>> cache_;
};

BpeTokenizer::BpeTokenizer(const std::filesystem::path& path, const std::string& file_bytes)
    : file_(path.string()), hash_(hex64(fnv1a64(file_bytes))) {
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(file_bytes);
  } catch (const nlohmann::json::exception& e) {
    throw UserError("tokenizer file " + file_ + " is not valid JSON (" + e.what() +
                    "); point the tokenizer at an HF tokenizer.json");
  }
  RT_REQUIRE(root.is_object(),
             "tokenizer file " + file_ + " is not a JSON object; expected an HF tokenizer.json");
  try {
    load(root);
  } catch (const nlohmann::json::exception& e) {
    throw UserError("tokenizer file " + file_ + " has an unexpected structure (" + e.what() +
                    "); expected an HF tokenizer.json");
  }
}

void BpeTokenizer::load(const nlohmann::json& root) {
  RT_REQUIRE(root.contains("model") && root["model"].is_object(),
             "tokenizer file " + file_ + " has no \"model\" object; expected an HF tokenizer.json");
  load_model(root["model"]);
  if (root.contains("added_tokens") && !root["added_tokens"].is_null())
    load_added_tokens(root["added_tokens"]);

  if (root.contains("normalizer") && !root["normalizer"].is_null()) {
    const auto& n = root["normalizer"];
    const std::string type = n.value("type", "");
    const bool empty_sequence =
        type == "Sequence" && n.contains("normalizers") && n["normalizers"].empty();
    RT_REQUIRE(empty_sequence,
               "tokenizer file " + file_ + ": normalizer \"" + type +
                   "\" is not supported; ranktune supports byte-level BPE tokenizers "
                   "without a normalizer (\"normalizer\": null), such as Llama 3's and GPT-2's");
  }

  RT_REQUIRE(root.contains("pre_tokenizer") && !root["pre_tokenizer"].is_null(),
             "tokenizer file " + file_ +
                 " has no pre_tokenizer; ranktune needs a byte-level BPE "
                 "(pre_tokenizer ByteLevel, or a Sequence of Split steps ending with ByteLevel)");
  load_pre_tokenizer(root["pre_tokenizer"]);

  RT_REQUIRE(root.contains("decoder") && root["decoder"].is_object() &&
                 root["decoder"].value("type", "") == "ByteLevel",
             "tokenizer file " + file_ + ": decoder must be ByteLevel (found " +
                 (root.contains("decoder") ? root["decoder"].dump() : std::string("none")) +
                 "); ranktune supports byte-level BPE tokenizers");
  // post_processor (e.g. TemplateProcessing with <|begin_of_text|>), truncation and padding are
  // deliberately not applied: encode() adds no special tokens; the caller adds BOS/EOS.

  for (const auto& [token, id] : vocab_)
    vocab_size_ = std::max<int64_t>(vocab_size_, int64_t{id} + 1);
  for (const AddedToken& t : added_)
    vocab_size_ = std::max<int64_t>(vocab_size_, int64_t{t.id} + 1);

  // The bytes a token stands for, if every character of it is a byte-level one.
  std::unordered_map<char32_t, unsigned char> char_to_byte;
  const auto b2u = bytes_to_unicode();
  for (size_t b = 0; b < 256; ++b) char_to_byte[b2u[b]] = static_cast<unsigned char>(b);
  auto token_bytes = [&](const std::string& token) -> std::optional<std::string> {
    std::string bytes;
    for (size_t i = 0; i < token.size();) {
      const Char c = char_at(token, i);
      auto it = char_to_byte.find(c.cp);
      if (it == char_to_byte.end()) return std::nullopt;
      bytes += static_cast<char>(it->second);
      i += c.len;
    }
    return bytes;
  };
  // What each id decodes to: HF's ByteLevel decoder maps every character of a token back to its
  // byte or, if some character is not a byte-level one, keeps the token's UTF-8 as it is. HF
  // looks ids up in the added vocabulary first, so added tokens are written last.
  id_bytes_.assign(static_cast<size_t>(vocab_size_), {});
  id_known_.assign(static_cast<size_t>(vocab_size_), false);
  for (const auto& [token, id] : vocab_) {
    std::optional<std::string> bytes = token_bytes(token);
    id_bytes_[static_cast<size_t>(id)] = bytes.value_or(token);
    id_known_[static_cast<size_t>(id)] = true;
    // Only tokens made of byte-level characters can come out of the byte-level pre-tokenizer.
    if (bytes) bytes_vocab_.emplace(std::move(*bytes), id);
  }
  for (const AddedToken& t : added_) {
    id_bytes_[static_cast<size_t>(t.id)] = token_bytes(t.content).value_or(t.content);
    id_known_[static_cast<size_t>(t.id)] = true;
  }
}

void BpeTokenizer::load_model(const nlohmann::json& model) {
  const std::string where = "tokenizer file " + file_;
  const std::string type = model.value("type", model.contains("merges") ? "BPE" : "");
  RT_REQUIRE(type == "BPE",
             where + ": model.type is \"" + type +
                 "\"; ranktune supports only byte-level \"BPE\" models (Llama 3, GPT-2 style)");
  auto optional_string = [&](const char* key) -> std::string {
    if (!model.contains(key) || model[key].is_null()) return "";
    return model[key].get<std::string>();
  };
  RT_REQUIRE(!model.contains("dropout") || model["dropout"].is_null() ||
                 model["dropout"].get<double>() == 0.0,
             where +
                 ": model.dropout is set; BPE dropout is a training-time augmentation that "
                 "ranktune does not apply; set it to null");
  RT_REQUIRE(optional_string("continuing_subword_prefix").empty() &&
                 optional_string("end_of_word_suffix").empty(),
             where +
                 ": model.continuing_subword_prefix / end_of_word_suffix are not supported "
                 "(they are not used by byte-level BPE)");
  RT_REQUIRE(!model.value("byte_fallback", false),
             where + ": model.byte_fallback is not supported with a byte-level BPE");
  ignore_merges_ = model.value("ignore_merges", false);
  fuse_unk_ = model.value("fuse_unk", false);

  RT_REQUIRE(model.contains("vocab") && model["vocab"].is_object(),
             where + ": model.vocab is missing or not an object");
  for (const auto& [token, id] : model["vocab"].items()) {
    RT_REQUIRE(
        id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < (int64_t{1} << 31),
        where + ": model.vocab[\"" + token + "\"] is not a valid id");
    vocab_.emplace(token, id.get<int32_t>());
  }
  const std::string unk = optional_string("unk_token");
  if (!unk.empty()) {
    auto it = vocab_.find(unk);
    RT_REQUIRE(it != vocab_.end(),
               where + ": model.unk_token \"" + unk + "\" is not in model.vocab");
    unk_id_ = it->second;
  }

  const auto b2u = bytes_to_unicode();
  for (size_t b = 0; b < 256; ++b) {
    std::string ch;
    append_utf8(ch, b2u[b]);
    auto it = vocab_.find(ch);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }

  RT_REQUIRE(model.contains("merges") && model["merges"].is_array(),
             where + ": model.merges is missing or not a list");
  const auto& merges = model["merges"];
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& m = merges[rank];
    std::string a, b;
    if (m.is_string()) {  // legacy "a b"
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      RT_REQUIRE(space != std::string::npos && s.find(' ', space + 1) == std::string::npos,
                 where + ": model.merges[" + std::to_string(rank) + "] = \"" + s +
                     "\" is not of the form \"a b\"");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else {
      RT_REQUIRE(m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string(),
                 where + ": model.merges[" + std::to_string(rank) +
                     "] is neither \"a b\" nor [\"a\", \"b\"]");
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    }
    auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
    RT_REQUIRE(ia != vocab_.end() && ib != vocab_.end() && iab != vocab_.end(),
               where + ": model.merges[" + std::to_string(rank) + "] (\"" + a + "\", \"" + b +
                   "\") uses a token that is not in model.vocab");
    // A pair listed twice takes its later rank: HF collects the merges into a map, last wins.
    merges_.insert_or_assign(pair_key(ia->second, ib->second),
                             Merge{static_cast<int32_t>(rank), iab->second});
  }
}

void BpeTokenizer::load_added_tokens(const nlohmann::json& added) {
  const std::string where = "tokenizer file " + file_;
  RT_REQUIRE(added.is_array(), where + ": added_tokens is not a list");
  std::vector<AddedToken> raw, normalized;
  for (size_t i = 0; i < added.size(); ++i) {
    const auto& t = added[i];
    RT_REQUIRE(t.is_object() && t.contains("id") && t["id"].is_number_integer() &&
                   t["id"].get<int64_t>() >= 0 && t.contains("content") && t["content"].is_string(),
               where + ": added_tokens[" + std::to_string(i) +
                   "] needs an integer \"id\" and a string \"content\"");
    AddedToken token;
    token.content = t["content"].get<std::string>();
    token.id = t["id"].get<int32_t>();
    token.special = t.value("special", false);
    token.single_word = t.value("single_word", false);
    token.lstrip = t.value("lstrip", false);
    token.rstrip = t.value("rstrip", false);
    token.normalized = t.value("normalized", !token.special);
    added_.push_back(token);
    (token.normalized ? normalized : raw).push_back(token);
  }
  raw_splitter_ = AddedTokenSplitter(std::move(raw));
  normalized_splitter_ = AddedTokenSplitter(std::move(normalized));
  if (raw_splitter_.has_single_word() || normalized_splitter_.has_single_word()) {
#if PCRE2_MAJOR > 10 || (PCRE2_MAJOR == 10 && PCRE2_MINOR >= 40)
    word_char_ = compile(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", false,
                         where + " (single_word)");
#else
    word_char_ =
        compile(R"([\p{L}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])", false, where + " (single_word)");
#endif
  }
}

std::unique_ptr<Regex> BpeTokenizer::compile(const std::string& pattern, bool literal,
                                             const std::string& where) {
  auto regex = std::make_unique<Regex>(pattern, literal, where);
  ovector_pairs_ = std::max(ovector_pairs_, regex->ovector_pairs());
  return regex;
}

void BpeTokenizer::load_pre_tokenizer(const nlohmann::json& pre) {
  const std::string where = "tokenizer file " + file_ + ": pre_tokenizer";
  RT_REQUIRE(pre.is_object(), where + " is not an object");
  if (pre.value("type", "") == "Sequence") {
    RT_REQUIRE(pre.contains("pretokenizers") && pre["pretokenizers"].is_array(),
               where + " is a Sequence without a \"pretokenizers\" list");
    const auto& list = pre["pretokenizers"];
    for (size_t i = 0; i < list.size(); ++i) {
      add_pre_tokenizer_step(list[i], where + ".pretokenizers[" + std::to_string(i) + "]");
    }
  } else {
    add_pre_tokenizer_step(pre, where);
  }
  // The BPE runs on byte-level characters, so ByteLevel must come last (and only once).
  const bool byte_level_last =
      !steps_.empty() && std::holds_alternative<ByteLevelStep>(steps_.back()) &&
      std::count_if(steps_.begin(), steps_.end(), [](const PreTokenizerStep& s) {
        return std::holds_alternative<ByteLevelStep>(s);
      }) == 1;
  RT_REQUIRE(byte_level_last, where +
                                  " must end with a single ByteLevel step (as Llama 3's and "
                                  "GPT-2's do); ranktune supports only byte-level BPE tokenizers");
}

void BpeTokenizer::add_pre_tokenizer_step(const nlohmann::json& step, const std::string& where) {
  RT_REQUIRE(step.is_object(), where + " is not an object");
  const std::string type = step.value("type", "");
  if (type == "ByteLevel") {
    std::unique_ptr<Regex> regex;
    if (step.value("use_regex", true)) regex = compile(kGpt2Pattern, false, where);
    steps_.emplace_back(ByteLevelStep{step.value("add_prefix_space", true), std::move(regex)});
    return;
  }
  if (type == "Split") {
    RT_REQUIRE(step.contains("pattern") && step["pattern"].is_object(),
               where + " (Split) has no pattern");
    const auto& pattern = step["pattern"];
    std::unique_ptr<Regex> regex;
    if (pattern.contains("Regex")) {
      regex = compile(pattern["Regex"].get<std::string>(), false, where);
    } else if (pattern.contains("String")) {
      const std::string literal = pattern["String"].get<std::string>();
      RT_REQUIRE(!literal.empty(), where + " (Split) has an empty String pattern");
      regex = compile(literal, true, where);
    } else {
      throw UserError(where + " (Split): pattern must be {\"Regex\": ...} or {\"String\": ...}");
    }
    const std::string behavior = step.value("behavior", "");
    SplitBehavior b;
    if (behavior == "Removed")
      b = SplitBehavior::kRemoved;
    else if (behavior == "Isolated")
      b = SplitBehavior::kIsolated;
    else if (behavior == "MergedWithPrevious")
      b = SplitBehavior::kMergedWithPrevious;
    else if (behavior == "MergedWithNext")
      b = SplitBehavior::kMergedWithNext;
    else if (behavior == "Contiguous")
      b = SplitBehavior::kContiguous;
    else
      throw UserError(where + " (Split): unknown behavior \"" + behavior + "\"");
    steps_.emplace_back(SplitStep{std::move(regex), b, step.value("invert", false)});
    return;
  }
  throw UserError(where + ": pre-tokenizer \"" + type +
                  "\" is not supported; ranktune supports "
                  "ByteLevel and Sequence[Split(...), ..., ByteLevel] (Llama 3 / GPT-2 style)");
}

// HF's split (normalizer.rs): the matches and the gaps between them, flagged, then merged or
// dropped according to the behaviour; empty pieces are dropped.
template <typename Emit>
void split_with(const Regex& regex, SplitBehavior behavior, bool invert, std::string_view s,
                Regex::Scratch& scratch, const Emit& emit) {
  struct Span {
    size_t begin, end;
    bool flag;  // is a match (input) / is to be removed (output)
  };
  std::vector<Span> spans;
  size_t prev = 0;
  regex.for_each_match(s, scratch, [&](size_t begin, size_t end) {
    if (prev != begin) spans.push_back({prev, begin, false});
    spans.push_back({begin, end, true});
    prev = end;
  });
  if (prev != s.size()) spans.push_back({prev, s.size(), false});
  if (invert) {
    for (Span& span : spans) span.flag = !span.flag;
  }

  std::vector<Span> pieces;
  pieces.reserve(spans.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      pieces = std::move(spans);
      break;
    case SplitBehavior::kIsolated:
      for (const Span& span : spans) pieces.push_back({span.begin, span.end, false});
      break;
    case SplitBehavior::kContiguous:
      for (const Span& span : spans) {
        if (span.flag == previous_match && !pieces.empty()) {
          pieces.back().end = span.end;
        } else {
          pieces.push_back({span.begin, span.end, false});
        }
        previous_match = span.flag;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& span : spans) {
        if (span.flag && !previous_match && !pieces.empty()) {
          pieces.back().end = span.end;
        } else {
          pieces.push_back({span.begin, span.end, false});
        }
        previous_match = span.flag;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->flag && !previous_match && !pieces.empty()) {
          pieces.back().begin = it->begin;
        } else {
          pieces.push_back({it->begin, it->end, false});
        }
        previous_match = it->flag;
      }
      std::reverse(pieces.begin(), pieces.end());
      break;
  }
  for (const Span& piece : pieces) {
    if (!piece.flag && piece.end > piece.begin)
      emit(s.substr(piece.begin, piece.end - piece.begin));
  }
}

std::unique_ptr<Tokenizer> make_bpe_tokenizer(const std::filesystem::path& path) {
  return std::make_unique<BpeTokenizer>(path, read_file_bytes(path));
}

template <typename Emit>
void BpeTokenizer::pre_tokenize(std::string_view piece, size_t step, EncodeScratch& scratch,
                                const Emit& emit) const {
  if (auto* split = std::get_if<SplitStep>(&steps_[step])) {
    split_with(*split->regex, split->behavior, split->invert, piece, scratch.regex,
               [&](std::string_view sub) { pre_tokenize(sub, step + 1, scratch, emit); });
    return;
  }
  const auto& byte_level = std::get<ByteLevelStep>(steps_[step]);  // always the last step
  std::string prefixed;
  if (byte_level.add_prefix_space && (piece.empty() || piece.front() != ' ')) {
    prefixed.reserve(piece.size() + 1);
    prefixed += ' ';
    prefixed += piece;
    piece = prefixed;
  }
  if (byte_level.regex) {
    split_with(*byte_level.regex, SplitBehavior::kIsolated, false, piece, scratch.regex, emit);
  } else {
    emit(piece);
  }
}

bool BpeTokenizer::is_word_char(char32_t c, EncodeScratch& scratch) const {
  if (c < 0x80) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }
  std::string utf8;
  append_utf8(utf8, c);
  return word_char_ && word_char_->matches_whole(utf8, scratch.regex);
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 16);
  EncodeScratch scratch(ovector_pairs_);
  auto is_word = [&](char32_t c) { return is_word_char(c, scratch); };
  auto encode_gap = [&](std::string_view gap) {
    pre_tokenize(gap, 0, scratch, [&](std::string_view piece) { encode_piece(piece, ids); });
  };
  // Added tokens with normalized=false are matched on the raw text, then those with
  // normalized=true inside each gap (there is no normalizer, so the gap is its own normal form).
  raw_splitter_.split(text, 0, is_word, scratch.segments);
  for (const Segment& segment : scratch.segments) {
    if (segment.id >= 0) {
      ids.push_back(segment.id);
      continue;
    }
    const std::string_view gap = text.substr(segment.begin, segment.end - segment.begin);
    if (normalized_splitter_.empty()) {
      encode_gap(gap);
      continue;
    }
    scratch.inner_segments.clear();
    normalized_splitter_.split(gap, 0, is_word, scratch.inner_segments);
    for (const Segment& inner : scratch.inner_segments) {
      if (inner.id >= 0) {
        ids.push_back(inner.id);
      } else {
        encode_gap(gap.substr(inner.begin, inner.end - inner.begin));
      }
    }
  }
  return ids;
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& ids) const {
  if (piece.size() == 1 && byte_ids_[static_cast<unsigned char>(piece[0])] >= 0) {
    ids.push_back(byte_ids_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (ignore_merges_) {  // Llama 3: a piece that is itself a token is taken whole
    auto it = bytes_vocab_.find(piece);
    if (it != bytes_vocab_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  {
    std::shared_lock lock(cache_mutex_);
    auto it = cache_.find(piece);
    if (it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> word;
  merge_word(piece, word);
  ids.insert(ids.end(), word.begin(), word.end());
  std::unique_lock lock(cache_mutex_);
  if (cache_.size() < kCacheCapacity) cache_.emplace(std::string(piece), std::move(word));
}

// HF's BPE::merge_word + Word::merge_all: the piece's bytes are the initial symbols (one
// byte-level character each); a min-heap on (rank, position) merges the best pair first, and an
// entry whose pair has changed since it was pushed is skipped.
void BpeTokenizer::merge_word(std::string_view piece, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    size_t len;  // bytes; 0 once merged into its left neighbour
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  auto add = [&](int32_t id, size_t len) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, len});
  };
  size_t pending_unk_len = 0;  // bytes covered by an unk symbol not added yet
  for (unsigned char byte : piece) {
    const int32_t id = byte_ids_[byte];
    if (id >= 0) {
      if (pending_unk_len > 0) add(*unk_id_, pending_unk_len);
      pending_unk_len = 0;
      add(id, 1);
    } else if (unk_id_) {  // a byte missing from the vocabulary (no unk_token: dropped, as HF)
      if (pending_unk_len > 0 && !fuse_unk_) add(*unk_id_, pending_unk_len), pending_unk_len = 0;
      pending_unk_len += 1;
    }
  }
  if (pending_unk_len > 0) add(*unk_id_, pending_unk_len);

  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
  };
  auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::vector<Candidate> heap_storage;
  heap_storage.reserve(symbols.size());
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(
      later, std::move(heap_storage));
  auto find_merge = [&](int32_t a, int32_t b) -> const Merge* {
    auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const Merge* m = find_merge(symbols[i].id, symbols[i + 1].id)) {
      queue.push({m->rank, static_cast<int32_t>(i), m->new_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[static_cast<size_t>(top.pos)];
    if (left.len == 0 || left.next == -1) continue;
    const Symbol right = symbols[static_cast<size_t>(left.next)];
    const Merge* current = find_merge(left.id, right.id);
    if (!current || current->new_id != top.new_id) continue;  // stale entry
    symbols[static_cast<size_t>(left.next)].len = 0;
    left.id = top.new_id;
    left.len += right.len;
    left.next = right.next;
    if (right.next >= 0) symbols[static_cast<size_t>(right.next)].prev = top.pos;
    if (left.prev >= 0) {
      if (const Merge* m = find_merge(symbols[static_cast<size_t>(left.prev)].id, left.id)) {
        queue.push({m->rank, left.prev, m->new_id});
      }
    }
    if (left.next >= 0) {
      if (const Merge* m = find_merge(left.id, symbols[static_cast<size_t>(left.next)].id)) {
        queue.push({m->rank, top.pos, m->new_id});
      }
    }
  }
  for (const Symbol& s : symbols) {
    if (s.len != 0) out.push_back(s.id);
  }
}

// HF's ByteLevel decoder: every token's characters back to bytes, then from_utf8_lossy over the
// whole sequence (a cut multi-byte character becomes U+FFFD). Unknown ids are skipped, as in HF.
std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (id >= 0 && id < vocab_size_ && id_known_[static_cast<size_t>(id)])
      bytes += id_bytes_[static_cast<size_t>(id)];
  }
  return utf8_lossy(bytes);
}

// Added tokens by content, then model tokens as written in the file (byte-level characters, so
// printable-ASCII tokens such as "<|endoftext|>" read as themselves).
std::optional<int32_t> BpeTokenizer::token_id(std::string_view token) const {
  for (const AddedToken& t : added_) {
    if (t.content == token) return t.id;
  }
  auto it = vocab_.find(token);
  if (it != vocab_.end()) return it->second;
  return std::nullopt;
}

#endif  // RANKTUNE_HAVE_PCRE2

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  const std::filesystem::path path = resolve_tokenizer_path(spec);
#ifdef RANKTUNE_HAVE_PCRE2
  return make_bpe_tokenizer(path);
#else
  throw UserError("cannot load tokenizer " + path.string() +
                  ": ranktune was built without PCRE2 (libpcre2-8), which BPE tokenizers need; "
                  "install it (Debian/Ubuntu: apt-get install libpcre2-dev) and rebuild, or use "
                  "tokenizer: byte");
#endif
}

}  // namespace ranktune

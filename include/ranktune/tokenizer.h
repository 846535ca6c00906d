// Tokenizers: a byte-level tokenizer that needs no file (the quickstart's), and a byte-level BPE
// that reads an HF tokenizer.json and gives exactly HF tokenizers' ids.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ranktune {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Plain text to ids. Special/added tokens written literally in the text are matched as the
  // HF tokenizer does (added tokens are split out before the pre-tokenizer). No BOS is added.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;  // ids are in [0, vocab_size)
  // The id of a special/added token such as "<|eot_id|>", if the tokenizer has it.
  virtual std::optional<int32_t> token_id(std::string_view token) const = 0;
  // A stable hash (hex) of the tokenizer's definition, recorded in datasets and checkpoints.
  virtual std::string hash() const = 0;
  virtual std::string kind() const = 0;  // "byte" or "bpe"
};

// "byte" gives the built-in byte tokenizer (ids 0..255 are bytes, then Llama 3's special tokens
// <|begin_of_text|>, <|end_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>, and
// <|pad|>); anything else is the path of a tokenizer.json (or of a directory holding one).
// Throws UserError naming the file on a missing or malformed tokenizer.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec);

}  // namespace ranktune

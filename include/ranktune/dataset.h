// SFT data: `ranktune prep` turns a JSONL file into token ids and loss labels in an HDF5 file;
// TokenDataset opens that file and checks it against the model; DataLoader deals its rows out to
// ranks as batches in a seeded, platform-independent order that checkpoints can resume exactly.
//
// File layout (ranktune dataset format version 1), all 1-D:
//   /input_ids       int32 [n_tokens]     the records' tokens, concatenated
//   /labels          int32 [n_tokens]     the token where it is trained on, else -100
//   /record_offsets  int64 [n_records+1]  record i is tokens
//                                         [record_offsets[i], record_offsets[i+1])
//   /row_offsets     int64 [n_rows+1]     packed files only: row r is records
//                                         [row_offsets[r], row_offsets[r+1]), so a packed row
//                                         knows its record (document) boundaries
// Root attributes: ranktune_format_version, format, chat_template, train_on_responses_only,
// tokenizer_hash, tokenizer_kind, vocab_size, pad_id, end_token_id, max_seq_length, n_records,
// n_rows, n_tokens, n_trained_tokens, n_truncated, packed, source.
//
// labels hold the token itself, not the next one: the shift to next-token targets happens when a
// batch is built, so it never crosses a record boundary. A record's first label is always -100
// (nothing predicts a record's first token), so n_trained_tokens is exactly the number of loss
// terms the file yields at full length.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace ranktune {

class Tokenizer;

inline constexpr int32_t kIgnoreIndex = -100;        // label/target of a token that is not trained
inline constexpr int64_t kDatasetFormatVersion = 1;  // bumped when the file layout changes

// ---- prep ---------------------------------------------------------------------------------------

// Record formats (one JSON object per line):
//   "text"              {"text": ...}; loss on every token.
//   "prompt_completion" {"prompt": ..., "completion": ...}; rendered prompt+completion, loss on the
//                       completion only when train_on_responses_only.
//   "alpaca"            {"instruction": ..., "input": ... (optional), "output": ...}; rendered
//                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
//                       + "{output}" (the Input block left out when input is empty or absent);
//                       loss on the output only when train_on_responses_only.
//   "messages"          {"messages": [{"role": ..., "content": ...}, ...]}; rendered with Llama 3's
//                       chat template ("<|begin_of_text|>" then per message
//                       "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"); loss
//                       on each assistant message's content and its <|eot_id|> only when
//                       train_on_responses_only.
//   "auto"              picks one of the above from the first record's keys.
// Every record starts with <|begin_of_text|> when the tokenizer has it; non-chat records end with
// an end token that is trained on (<|end_of_text|>, else <|eot_id|>, else none). Special tokens are
// inserted by id; the text pieces between them (and the prompt and completion) are encoded
// separately, so a label boundary is always a token boundary.
struct PrepOptions {
  std::string input_path;   // JSONL
  std::string output_path;  // .h5; written as "<output_path>.tmp", then renamed
  const Tokenizer& tokenizer;
  std::string format = "auto";  // "auto" | "text" | "prompt_completion" | "alpaca" | "messages"
  int64_t max_seq_length = 2048;  // longer records are truncated (their tail is dropped)
  bool packing = false;  // pack consecutive records whole into rows of max_seq_length tokens
  bool train_on_responses_only = true;
  std::string chat_template = "llama3";
};

struct PrepSummary {
  std::string input_path;
  std::string output_path;
  std::string format;  // resolved (never "auto")
  int64_t max_seq_length = 0;
  bool packed = false;
  bool train_on_responses_only = true;
  int64_t n_records = 0;
  int64_t n_tokens = 0;          // after truncation
  int64_t n_trained_tokens = 0;  // labels != -100
  int64_t n_truncated = 0;       // records cut to max_seq_length
  int64_t n_untrained = 0;       // records left with no trained token (e.g. truncated away)
  int64_t longest_record = 0;    // tokens, before truncation
  int64_t n_rows = 0;            // = n_records unpacked; packed rows otherwise

  // A few lines for a person: counts, how much is trained on, packing fill, and what to do
  // about truncated or untrained records.
  std::string report() const;
};

// Reads, renders, tokenizes and writes the dataset. Throws UserError naming file:line for bad
// JSON or a record without the format's keys, and for an unknown format or chat template; the
// output file is then left as it was (nothing is written until the whole input has been read).
PrepSummary prep_dataset(const PrepOptions& options);

// ---- the dataset --------------------------------------------------------------------------------

struct RowSplit {
  std::vector<int64_t> train;  // ascending row indices
  std::vector<int64_t> eval;
};

// A prepped file, held in memory (8 bytes per token). Row r is record r of an unpacked file, or
// packed row r of a packed file.
class TokenDataset {
 public:
  // Reads and validates `path` against a model with `model_vocab_size` ids. Throws UserError
  // naming the file when it is missing or not a ranktune dataset, when a dataset or attribute is
  // missing (naming it), when it was written by a newer ranktune, when its tokenizer's vocab is
  // larger than the model's, or when a token id or label is outside [0, model_vocab_size)
  // (naming the record).
  static TokenDataset open(const std::string& path, int64_t model_vocab_size);

  const std::string& path() const { return path_; }
  int64_t n_rows() const;
  int64_t n_records() const { return static_cast<int64_t>(record_offsets_.size()) - 1; }
  int64_t n_tokens() const { return static_cast<int64_t>(input_ids_.size()); }
  int64_t n_trained_tokens() const { return n_trained_tokens_; }
  int64_t vocab_size() const { return vocab_size_; }  // the tokenizer's, as recorded
  int64_t max_seq_length() const { return max_seq_length_; }  // packed: the row length
  bool packed() const { return packed_; }
  int32_t pad_id() const { return pad_id_; }
  const std::string& format() const { return format_; }
  const std::string& tokenizer_hash() const { return tokenizer_hash_; }
  const std::string& tokenizer_kind() const { return tokenizer_kind_; }

  // Records [row_record_begin(r), row_record_end(r)) make up row r.
  int64_t row_record_begin(int64_t row) const;
  int64_t row_record_end(int64_t row) const;
  int64_t row_length(int64_t row) const;  // tokens in the row before padding
  std::span<const int32_t> record_input_ids(int64_t record) const;
  std::span<const int32_t> record_labels(int64_t record) const;

  std::vector<int64_t> all_rows() const;  // 0 .. n_rows-1
  // A deterministic holdout when no eval file is given: round(eval_fraction * n_rows) rows (at
  // least one when eval_fraction > 0) chosen by a seeded permutation; the rest are train. Throws
  // UserError when either side would be empty.
  RowSplit split(double eval_fraction, uint64_t seed) const;

 private:
  std::string path_;
  std::string format_, tokenizer_hash_, tokenizer_kind_;
  int64_t vocab_size_ = 0, max_seq_length_ = 0, n_trained_tokens_ = 0;
  int32_t pad_id_ = 0;
  bool packed_ = false;
  std::vector<int32_t> input_ids_, labels_;
  std::vector<int64_t> record_offsets_, row_offsets_;  // row_offsets_ empty when unpacked
};

// ---- batches ------------------------------------------------------------------------------------

// B rows of T tokens, row-major [B*T].
struct Batch {
  int64_t batch_size = 0, seq_len = 0;
  std::vector<int32_t> input_ids;  // pad id at padding
  // Next-token targets: targets[t] = labels[t+1] when t+1 is in the same record, else -100 (so
  // also at padding and at the last position).
  std::vector<int32_t> targets;
  std::vector<int32_t> positions;  // position within the record; restarts at 0 for each record
  // Packed rows only (empty otherwise): the record's index within its row, 0, 1, 2, ...; the
  // padding at the end of a row counts as one more record (so doc ids never decrease along a row
  // and attention masked by "same doc id" keeps records apart). Padding positions restart at 0.
  std::vector<int32_t> doc_ids;
  int64_t n_target_tokens = 0;  // targets != -100
  int64_t epoch = 0;
  int64_t step_in_epoch = 0;
  std::vector<int64_t> rows;  // dataset row of each batch row; -1 for an all-padding row
};

// Builds a batch of `batch_size` rows x `seq_len` tokens from `rows` (at most batch_size of them;
// the rest of the batch is padding with no targets). Unpacked rows longer than seq_len are cut;
// packed files need seq_len >= their max_seq_length (UserError otherwise).
Batch make_batch(const TokenDataset& data, std::span<const int64_t> rows, int64_t batch_size,
                 int64_t seq_len);

// Evaluation: every one of `rows` exactly once, in order, spread over ranks (row i goes to rank
// i % world_size) in groups of at most batch_size for make_batch. Every rank gets the same number
// of groups (some short or empty), so ranks that step in lockstep stay in lockstep.
std::vector<std::vector<int64_t>> eval_row_groups(std::span<const int64_t> rows,
                                                  int64_t batch_size, int rank, int world_size);

// A fixed, platform-independent permutation of 0..n-1: splitmix64 seeded from (seed, stream), and
// Fisher-Yates with rejection sampling. Identical on every compiler and standard library.
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed, uint64_t stream);

// Where a DataLoader is in its data; saved in checkpoints.
struct DataLoaderState {
  int64_t epoch = 0;
  int64_t row_offset = 0;  // rows of this epoch's permutation already dealt out (all ranks)
  uint64_t seed = 0;       // for checking that a resume uses the same order
  int64_t n_rows = 0;
};

// Training batches. Each epoch deals out a permutation of `rows` seeded by (seed, epoch): each
// step takes the next global batch of world_size*batch_size rows in permutation order, and rank r
// gets rows [r*batch_size, (r+1)*batch_size) of it. So ranks read disjoint slices, and N ranks
// with batch b see exactly the rows 1 rank with batch N*b sees. The rows left over at the end of an
// epoch (fewer than a global batch) are dropped for that epoch; the next epoch reshuffles them in.
//
// Recommended use with gradient accumulation: at the start of an optimizer step call next() once
// per micro-batch (building a batch is cheap next to running it), sum their n_target_tokens,
// all-reduce that sum over ranks, and scale each micro-batch's summed loss by 1/global_sum, so the
// loss is the mean over every target token of the step whatever the split. peek_target_tokens()
// gives the same local count without taking the batches.
class DataLoader {
 public:
  // `data` must outlive the loader. Throws UserError when `rows` holds fewer than one global
  // batch, or when seq_len is shorter than a packed file's rows.
  DataLoader(const TokenDataset& data, std::vector<int64_t> rows, int64_t batch_size,
             int64_t seq_len, uint64_t seed, int rank, int world_size);

  Batch next();
  // Target tokens in this rank's next k batches, without taking them.
  int64_t peek_target_tokens(int64_t k) const;

  int64_t steps_per_epoch() const { return n_rows() / global_batch(); }
  int64_t epoch() const { return epoch_; }
  int64_t step_in_epoch() const { return row_offset_ / global_batch(); }
  int64_t n_rows() const { return static_cast<int64_t>(rows_.size()); }
  int64_t global_batch() const { return batch_size_ * world_size_; }

  DataLoaderState state() const;
  // Continues exactly where `state` left off (also with another world size or batch size, as
  // long as the rows and seed are the same). Throws UserError when seed or row count differ.
  void restore(const DataLoaderState& state);

 private:
  void start_epoch(int64_t epoch);
  std::vector<int64_t> epoch_order(int64_t epoch) const;

  const TokenDataset* data_;
  std::vector<int64_t> rows_;
  int64_t batch_size_, seq_len_;
  uint64_t seed_;
  int rank_, world_size_;
  int64_t epoch_ = 0, row_offset_ = 0;
  std::vector<int64_t> order_;  // this epoch's permutation of rows_
};

}  // namespace ranktune

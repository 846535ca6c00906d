// SFT data: JSONL -> rendered, tokenized, labelled records in HDF5 (prep), and the HDF5 file ->
// validated rows -> seeded, rank-sliced batches (TokenDataset, DataLoader). See dataset.h.
#include "ranktune/dataset.h"

#include <hdf5.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <utility>

#include "ranktune/error.h"
#include "h5_util.h"
#include "ranktune/tokenizer.h"

namespace ranktune {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string with_commas(int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}

// ---- HDF5 handles and helpers -------------------------------------------------------------------

using h5::H5Id;
using h5::H5QuietErrors;

class H5Writer {
 public:
  H5Writer(const std::string& tmp_path, const std::string& shown_path) : shown_path_(shown_path) {
    H5Id fapl = h5::file_access_plist(/*lock=*/true);
    file_ = H5Id(H5Fcreate(tmp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    if (!file_.valid())
      fail("cannot create " + tmp_path + " (check that the directory is writable)");
  }

  template <class T>
  void write_array(const char* name, const std::vector<T>& values) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8);
    const hid_t mem_type = sizeof(T) == 4 ? H5T_NATIVE_INT32 : H5T_NATIVE_INT64;
    const hid_t file_type = sizeof(T) == 4 ? H5T_STD_I32LE : H5T_STD_I64LE;
    const hsize_t n = values.size();
    H5Id space(H5Screate_simple(1, &n, nullptr), H5Sclose);
    H5Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    check(space.valid() && dcpl.valid(), name);
    // Chunked and compressed: labels are mostly -100 and token ids small, so files shrink ~3x;
    // the loader reads each dataset whole, so chunk size only matters for the writer's memory.
    const hsize_t chunk = std::clamp<hsize_t>(n, 1, hsize_t{1} << 20);
    check(H5Pset_chunk(dcpl.get(), 1, &chunk) >= 0, name);
    if (H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0) {
      check(H5Pset_shuffle(dcpl.get()) >= 0 && H5Pset_deflate(dcpl.get(), 4) >= 0, name);
    }
    H5Id dset(H5Dcreate2(file_.get(), name, file_type, space.get(), H5P_DEFAULT, dcpl.get(),
                         H5P_DEFAULT),
              H5Dclose);
    check(dset.valid(), name);
    if (n > 0) {
      check(H5Dwrite(dset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) >= 0,
            name);
    }
  }

  void attr(const char* name, int64_t value) {
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id attr(H5Acreate2(file_.get(), name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
              H5Aclose);
    check(attr.valid() && H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) >= 0, name);
  }

  // Fixed-length UTF-8 strings: h5py and h5dump read them as they are.
  void attr(const char* name, const std::string& value) {
    H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
    check(type.valid(), name);
    check(H5Tset_size(type.get(), std::max<size_t>(value.size(), 1)) >= 0 &&
              H5Tset_strpad(type.get(), H5T_STR_NULLPAD) >= 0 &&
              H5Tset_cset(type.get(), H5T_CSET_UTF8) >= 0,
          name);
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id attr(H5Acreate2(file_.get(), name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
              H5Aclose);
    std::string padded = value.empty() ? std::string(1, '\0') : value;
    check(attr.valid() && H5Awrite(attr.get(), type.get(), padded.data()) >= 0, name);
  }

  void close() { check(file_.close() >= 0, "the file (flush)"); }

 private:
  void check(bool ok, const std::string& what) {
    if (!ok) fail("writing " + what + " failed (is the disk full?)");
  }
  [[noreturn]] void fail(const std::string& why) {
    throw UserError(shown_path_ + ": cannot write the dataset: " + why);
  }

  std::string shown_path_;
  H5Id file_;
};

std::string rerun_hint() {
  return "Re-run `ranktune prep` to rebuild it.";
}

class H5Reader {
 public:
  explicit H5Reader(const std::string& path) : path_(path) {
    H5Id fapl = h5::file_access_plist(/*lock=*/true);
    file_ = H5Id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose);
    if (!file_.valid())
      throw UserError(path + ": cannot open it as an HDF5 file (unreadable or damaged). " +
                      rerun_hint());
  }

  bool has_attr(const char* name) const { return H5Aexists(file_.get(), name) > 0; }
  bool has_dataset(const char* name) const {
    return H5Lexists(file_.get(), name, H5P_DEFAULT) > 0;
  }

  int64_t attr_i64(const char* name) const {
    H5Id attr = open_attr(name);
    H5Id type(H5Aget_type(attr.get()), H5Tclose);
    if (H5Tget_class(type.get()) != H5T_INTEGER) damaged(std::string("attribute ") + name);
    int64_t value = 0;
    if (H5Aread(attr.get(), H5T_NATIVE_INT64, &value) < 0)
      damaged(std::string("attribute ") + name);
    return value;
  }

  std::string attr_str(const char* name) const {
    H5Id attr = open_attr(name);
    H5Id type(H5Aget_type(attr.get()), H5Tclose);
    if (H5Tget_class(type.get()) != H5T_STRING) damaged(std::string("attribute ") + name);
    if (H5Tis_variable_str(type.get()) > 0) {  // as h5py writes str attributes
      H5Id mem_type(H5Tcopy(H5T_C_S1), H5Tclose);
      char* text = nullptr;
      if (H5Tset_size(mem_type.get(), H5T_VARIABLE) < 0 ||
          H5Aread(attr.get(), mem_type.get(), &text) < 0 || text == nullptr)
        damaged(std::string("attribute ") + name);
      std::string value(text);
      H5free_memory(text);
      return value;
    }
    std::string buffer(H5Tget_size(type.get()), '\0');
    if (H5Aread(attr.get(), type.get(), buffer.data()) < 0)
      damaged(std::string("attribute ") + name);
    return buffer.substr(0, std::min(buffer.size(), std::strlen(buffer.c_str())));
  }

  template <class T>
  std::vector<T> array(const char* name) const {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8);
    if (!has_dataset(name)) missing(std::string("dataset ") + name);
    H5Id dset(H5Dopen2(file_.get(), name, H5P_DEFAULT), H5Dclose);
    if (!dset.valid()) damaged(std::string("dataset ") + name);
    H5Id type(H5Dget_type(dset.get()), H5Tclose);
    H5Id space(H5Dget_space(dset.get()), H5Sclose);
    if (H5Tget_class(type.get()) != H5T_INTEGER || H5Sget_simple_extent_ndims(space.get()) != 1)
      damaged(std::string("dataset ") + name + " (expected a 1-D integer array)");
    hsize_t n = 0;
    H5Sget_simple_extent_dims(space.get(), &n, nullptr);
    std::vector<T> values(n);
    const hid_t mem_type = sizeof(T) == 4 ? H5T_NATIVE_INT32 : H5T_NATIVE_INT64;
    if (n > 0 &&
        H5Dread(dset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) < 0)
      damaged(std::string("dataset ") + name);
    return values;
  }

  [[noreturn]] void missing(const std::string& what) const {
    throw UserError(path_ + ": has no " + what +
                    "; it is not a complete ranktune dataset (an interrupted or foreign file). " +
                    rerun_hint());
  }
  [[noreturn]] void damaged(const std::string& what) const {
    throw UserError(path_ + ": cannot read " + what + "; the file is damaged. " + rerun_hint());
  }

 private:
  H5Id open_attr(const char* name) const {
    if (!has_attr(name)) missing(std::string("attribute ") + name);
    H5Id attr(H5Aopen(file_.get(), name, H5P_DEFAULT), H5Aclose);
    if (!attr.valid()) damaged(std::string("attribute ") + name);
    return attr;
  }

  std::string path_;
  H5Id file_;
};

// ---- rendering records --------------------------------------------------------------------------

enum class Format { text, prompt_completion, alpaca, messages };

const char* format_name(Format f) {
  switch (f) {
    case Format::text: return "text";
    case Format::prompt_completion: return "prompt_completion";
    case Format::alpaca: return "alpaca";
    case Format::messages: return "messages";
  }
  return "?";
}

std::optional<Format> parse_format(const std::string& name) {
  if (name == "text") return Format::text;
  if (name == "prompt_completion") return Format::prompt_completion;
  if (name == "alpaca") return Format::alpaca;
  if (name == "messages") return Format::messages;
  return std::nullopt;
}

struct SpecialIds {
  std::optional<int32_t> begin_of_text, end, start_header, end_header, eot, pad;
};

SpecialIds special_ids(const Tokenizer& tok) {
  SpecialIds s;
  s.begin_of_text = tok.token_id("<|begin_of_text|>");
  s.end = tok.token_id("<|end_of_text|>");
  if (!s.end) s.end = tok.token_id("<|eot_id|>");
  s.start_header = tok.token_id("<|start_header_id|>");
  s.end_header = tok.token_id("<|end_header_id|>");
  s.eot = tok.token_id("<|eot_id|>");
  s.pad = tok.token_id("<|pad|>");
  if (!s.pad) s.pad = tok.token_id("<|finetune_right_pad_id|>");  // Llama 3.1+
  return s;
}

// Where a record came from, for error messages.
struct RecordSource {
  const std::string& path;
  int64_t line;
  Format format;

  std::string where() const { return path + ":" + std::to_string(line); }
  [[noreturn]] void fail(const std::string& what) const {
    throw UserError(where() + ": " + what);
  }
};

std::string keys_of(const json& object) {
  std::string out;
  for (const auto& [key, value] : object.items()) out += (out.empty() ? "" : ", ") + key;
  return out.empty() ? "none" : out;
}

Format detect_format(const json& record, const RecordSource& src) {
  if (record.contains("messages")) return Format::messages;
  if (record.contains("prompt") && record.contains("completion")) return Format::prompt_completion;
  if (record.contains("instruction") && record.contains("output")) return Format::alpaca;
  if (record.contains("text")) return Format::text;
  src.fail("cannot tell the record format from its keys (" + keys_of(record) +
           "); expected \"text\", \"prompt\" + \"completion\", \"instruction\" + \"output\" "
           "(Alpaca) or \"messages\". Fix the file or set the format explicitly.");
}

const char* format_keys(Format f) {
  switch (f) {
    case Format::text: return "\"text\"";
    case Format::prompt_completion: return "\"prompt\" and \"completion\"";
    case Format::alpaca: return "\"instruction\" and \"output\" (and optionally \"input\")";
    case Format::messages: return "\"messages\": [{\"role\": ..., \"content\": ...}, ...]";
  }
  return "?";
}

// The string at `key`; "" for an absent or null optional key.
std::string string_field(const json& object, const char* key, bool required,
                         const RecordSource& src, const std::string& context = "record") {
  auto it = object.find(key);
  if (it == object.end() || (!required && it->is_null())) {
    if (!required) return {};
    src.fail(context + " has no \"" + key + "\" key (keys: " + keys_of(object) +
             "); every record of a " + format_name(src.format) + " file needs " +
             format_keys(src.format) + ".");
  }
  if (!it->is_string()) {
    std::string hint;
    if (src.format == Format::prompt_completion && it->is_array())
      hint = " Conversational prompt/completion records are not supported; write them as "
             "\"messages\".";
    src.fail(context + "'s \"" + key + "\" must be a string, not " + it->type_name() + "." +
             hint);
  }
  return it->get<std::string>();
}

// One record's tokens and labels as they are built.
class RecordBuilder {
 public:
  explicit RecordBuilder(const Tokenizer& tok) : tok_(tok) {}

  void text(std::string_view s, bool trained) {
    if (s.empty()) return;
    for (int32_t id : tok_.encode(s)) token(id, trained);
  }
  void token(int32_t id, bool trained) {
    ids_.push_back(id);
    labels_.push_back(trained ? id : kIgnoreIndex);
  }
  std::vector<int32_t>& ids() { return ids_; }
  std::vector<int32_t>& labels() { return labels_; }

 private:
  const Tokenizer& tok_;
  std::vector<int32_t> ids_, labels_;
};

struct RenderOptions {
  bool responses_only;
  SpecialIds specials;
};

void render_record(const json& record, const RecordSource& src, const RenderOptions& opt,
                   RecordBuilder& out) {
  const SpecialIds& sp = opt.specials;
  const bool all = !opt.responses_only;
  if (sp.begin_of_text) out.token(*sp.begin_of_text, false);
  switch (src.format) {
    case Format::text:
      out.text(string_field(record, "text", true, src), true);
      break;
    case Format::prompt_completion: {
      std::string prompt = string_field(record, "prompt", true, src);
      std::string completion = string_field(record, "completion", true, src);
      out.text(prompt, all);
      out.text(completion, true);
      break;
    }
    case Format::alpaca: {
      std::string instruction = string_field(record, "instruction", true, src);
      std::string input = string_field(record, "input", false, src);
      std::string output = string_field(record, "output", true, src);
      std::string prompt = "### Instruction:\n" + instruction + "\n\n";
      if (!input.empty()) prompt += "### Input:\n" + input + "\n\n";
      prompt += "### Response:\n";
      out.text(prompt, all);
      out.text(output, true);
      break;
    }
    case Format::messages: {
      const json& messages = record.at("messages");  // present: checked by the caller
      if (!messages.is_array() || messages.empty())
        src.fail("\"messages\" must be a non-empty array of {\"role\", \"content\"} objects.");
      for (size_t m = 0; m < messages.size(); ++m) {
        const std::string context = "message " + std::to_string(m);
        if (!messages[m].is_object())
          src.fail(context + " must be an object with \"role\" and \"content\".");
        std::string role = string_field(messages[m], "role", true, src, context);
        std::string content = string_field(messages[m], "content", true, src, context);
        const bool trained = all || role == "assistant";
        out.token(*sp.start_header, all);
        out.text(role, all);
        out.token(*sp.end_header, all);
        out.text("\n\n", all);
        out.text(content, trained);
        out.token(*sp.eot, trained);
      }
      break;
    }
  }
  if (src.format != Format::messages && sp.end) out.token(*sp.end, true);
  // Nothing predicts a record's first token, so its label never becomes a target.
  if (!out.labels().empty()) out.labels()[0] = kIgnoreIndex;
}

// The whole input, rendered and tokenized.
struct Tokenized {
  Format format = Format::text;
  std::vector<int32_t> input_ids, labels;
  std::vector<int64_t> record_offsets{0};
  int64_t n_truncated = 0, n_untrained = 0, longest = 0, n_trained = 0;
};

Tokenized read_jsonl(const PrepOptions& opt, std::optional<Format> format,
                     const RenderOptions& render) {
  std::ifstream in(opt.input_path, std::ios::binary);
  if (!in)
    throw UserError(opt.input_path + ": cannot open the prep input (" + std::strerror(errno) +
                    "); check the path.");
  Tokenized out;
  const int64_t vocab = opt.tokenizer.vocab_size();
  std::string line;
  int64_t line_no = 0;
  bool first = true;
  while (std::getline(in, line)) {
    ++line_no;
    if (line_no == 1 && line.starts_with("\xEF\xBB\xBF")) line.erase(0, 3);  // UTF-8 BOM
    if (line.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    RecordSource src{opt.input_path, line_no, format.value_or(Format::text)};
    json record;
    try {
      record = json::parse(line);
    } catch (const json::parse_error& e) {
      std::string detail = e.what();
      if (auto pos = detail.find("] "); pos != std::string::npos) detail.erase(0, pos + 2);
      src.fail("not valid JSON (" + detail + "). Each line of a JSONL file must hold one JSON "
               "object.");
    }
    if (!record.is_object())
      src.fail(std::string("expected a JSON object, got ") + record.type_name() + ".");
    if (first) {
      if (!format) format = detect_format(record, src);
      src.format = *format;
      out.format = *format;
      if (*format == Format::messages && (!render.specials.start_header ||
                                          !render.specials.end_header || !render.specials.eot))
        throw UserError(opt.input_path + ": the llama3 chat template needs the tokens "
                        "<|start_header_id|>, <|end_header_id|> and <|eot_id|>, which this " +
                        opt.tokenizer.kind() +
                        " tokenizer lacks; use a Llama 3 tokenizer, or the text / "
                        "prompt_completion format.");
      first = false;
    }
    if (src.format == Format::messages && !record.contains("messages"))
      string_field(record, "messages", true, src);  // throws the missing-key message

    RecordBuilder builder(opt.tokenizer);
    render_record(record, src, render, builder);
    std::vector<int32_t>& ids = builder.ids();
    std::vector<int32_t>& labels = builder.labels();
    for (int32_t id : ids)
      RT_ASSERT(id >= 0 && id < vocab, "tokenizer produced id " + std::to_string(id) +
                                           " outside its vocab of " + std::to_string(vocab));
    out.longest = std::max<int64_t>(out.longest, static_cast<int64_t>(ids.size()));
    if (static_cast<int64_t>(ids.size()) > opt.max_seq_length) {
      ids.resize(opt.max_seq_length);
      labels.resize(opt.max_seq_length);
      ++out.n_truncated;
    }
    const int64_t trained =
        std::count_if(labels.begin(), labels.end(), [](int32_t l) { return l != kIgnoreIndex; });
    out.n_trained += trained;
    if (trained == 0) ++out.n_untrained;
    out.input_ids.insert(out.input_ids.end(), ids.begin(), ids.end());
    out.labels.insert(out.labels.end(), labels.begin(), labels.end());
    out.record_offsets.push_back(static_cast<int64_t>(out.input_ids.size()));
  }
  if (in.bad())
    throw UserError(opt.input_path + ": read error after line " + std::to_string(line_no) + ".");
  if (first)
    throw UserError(opt.input_path + ": has no records (the file is empty); it needs one JSON "
                    "object per line.");
  return out;
}

// Greedy packing: consecutive records go into a row while they fit whole; row r holds records
// [row_offsets[r], row_offsets[r+1]).
std::vector<int64_t> pack_rows(const std::vector<int64_t>& record_offsets, int64_t row_length) {
  std::vector<int64_t> row_offsets{0};
  const int64_t n_records = static_cast<int64_t>(record_offsets.size()) - 1;
  int64_t filled = 0;
  for (int64_t r = 0; r < n_records; ++r) {
    const int64_t len = record_offsets[r + 1] - record_offsets[r];
    if (filled > 0 && filled + len > row_length) {
      row_offsets.push_back(r);
      filled = 0;
    }
    filled += len;
  }
  row_offsets.push_back(n_records);
  return row_offsets;
}

// Removes the temporary file unless the write went through.
class TmpFileGuard {
 public:
  explicit TmpFileGuard(fs::path path) : path_(std::move(path)) {}
  ~TmpFileGuard() {
    if (armed_) {
      std::error_code ec;
      fs::remove(path_, ec);
    }
  }
  void disarm() { armed_ = false; }
  TmpFileGuard(const TmpFileGuard&) = delete;
  TmpFileGuard& operator=(const TmpFileGuard&) = delete;

 private:
  fs::path path_;
  bool armed_ = true;
};

// ---- the order of rows --------------------------------------------------------------------------

uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  uint64_t next() { return mix64(state_ += 0x9E3779B97F4A7C15ull); }
  // Uniform in [0, bound) without modulo bias: reject the lowest 2^64 mod bound values.
  uint64_t below(uint64_t bound) {
    const uint64_t threshold = (0 - bound) % bound;
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % bound;
    }
  }

 private:
  uint64_t state_;
};

constexpr uint64_t kSplitStream = ~uint64_t{0};  // epochs use streams 0, 1, 2, ...

}  // namespace

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<int64_t> perm(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  SplitMix64 rng(mix64(seed) ^ mix64(stream ^ 0xD6E8FEB86659FD93ull));
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(perm[i], perm[j]);
  }
  return perm;
}

// ---- prep ---------------------------------------------------------------------------------------

std::string PrepSummary::report() const {
  std::ostringstream s;
  auto pct = [](int64_t part, int64_t whole) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f%%", whole > 0 ? 100.0 * part / whole : 0.0);
    return std::string(buf);
  };
  s << "ranktune prep: " << input_path << " -> " << output_path << "\n";
  s << "  format        " << format
    << (format == "text"                ? " (loss on all tokens)"
        : train_on_responses_only ? " (loss on responses only)"
                                  : " (loss on all tokens)")
    << "\n";
  s << "  records       " << with_commas(n_records);
  if (n_truncated > 0)
    s << " (" << with_commas(n_truncated) << " truncated to " << max_seq_length << " tokens)";
  s << "\n";
  s << "  tokens        " << with_commas(n_tokens) << ", trained on "
    << with_commas(n_trained_tokens)
    << " (" << pct(n_trained_tokens, n_tokens) << ")\n";
  s << "  longest       " << with_commas(longest_record) << " tokens (max_seq_length "
    << max_seq_length << ")\n";
  if (packed)
    s << "  rows          " << with_commas(n_rows) << " packed rows of " << max_seq_length
      << " tokens, " << pct(n_tokens, n_rows * max_seq_length) << " filled\n";
  else
    s << "  rows          " << with_commas(n_rows) << " (one record each, unpacked)\n";
  if (n_truncated > 0)
    s << "  note: " << with_commas(n_truncated)
      << " records lost their tail to truncation; raise max_seq_length (longest is "
      << longest_record << ") to keep them whole.\n";
  if (n_untrained > 0)
    s << "  note: " << with_commas(n_untrained)
      << " records have no trained tokens (a response truncated away, or no assistant turn); "
         "they cost compute but add no loss.\n";
  return s.str();
}

PrepSummary prep_dataset(const PrepOptions& opt) {
  const H5QuietErrors quiet;
  std::optional<Format> format;
  if (opt.format != "auto") {
    format = parse_format(opt.format);
    if (!format)
      throw UserError(opt.input_path + ": unknown dataset format \"" + opt.format +
                      "\"; use auto, text, prompt_completion, alpaca or messages.");
  }
  if (opt.chat_template != "llama3")
    throw UserError(opt.input_path + ": unknown chat template \"" + opt.chat_template +
                    "\"; the supported one is llama3.");
  if (opt.max_seq_length < 2)
    throw UserError(opt.input_path + ": max_seq_length is " + std::to_string(opt.max_seq_length) +
                    "; it must be at least 2 tokens.");
  if (fs::exists(opt.output_path) && fs::exists(opt.input_path) &&
      fs::equivalent(opt.output_path, opt.input_path))
    throw UserError(opt.output_path + ": the output would overwrite the input; choose another "
                    "output path.");

  RenderOptions render{opt.train_on_responses_only, special_ids(opt.tokenizer)};
  Tokenized data = read_jsonl(opt, format, render);

  const int32_t end_token = render.specials.end.value_or(-1);
  const int32_t pad_id = render.specials.pad.value_or(render.specials.end.value_or(0));
  const bool packed = opt.packing;
  const std::vector<int64_t> row_offsets =
      packed ? pack_rows(data.record_offsets, opt.max_seq_length) : std::vector<int64_t>{};

  PrepSummary summary;
  summary.input_path = opt.input_path;
  summary.output_path = opt.output_path;
  summary.format = format_name(data.format);
  summary.max_seq_length = opt.max_seq_length;
  summary.packed = packed;
  summary.train_on_responses_only = opt.train_on_responses_only;
  summary.n_records = static_cast<int64_t>(data.record_offsets.size()) - 1;
  summary.n_tokens = static_cast<int64_t>(data.input_ids.size());
  summary.n_trained_tokens = data.n_trained;
  summary.n_truncated = data.n_truncated;
  summary.n_untrained = data.n_untrained;
  summary.longest_record = data.longest;
  summary.n_rows = packed ? static_cast<int64_t>(row_offsets.size()) - 1 : summary.n_records;

  // Everything that can go wrong with the input has; now write "<out>.tmp" and rename it over.
  const fs::path out_path(opt.output_path);
  const fs::path tmp_path(opt.output_path + ".tmp");
  if (out_path.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(out_path.parent_path(), ec);
    if (ec)
      throw UserError(opt.output_path + ": cannot create its directory (" + ec.message() + ").");
  }
  TmpFileGuard guard(tmp_path);
  {
    H5Writer w(tmp_path.string(), opt.output_path);
    w.write_array("/input_ids", data.input_ids);
    w.write_array("/labels", data.labels);
    w.write_array("/record_offsets", data.record_offsets);
    if (packed) w.write_array("/row_offsets", row_offsets);
    w.attr("ranktune_format_version", kDatasetFormatVersion);
    w.attr("format", summary.format);
    w.attr("chat_template", data.format == Format::messages ? opt.chat_template : std::string());
    w.attr("train_on_responses_only", int64_t{opt.train_on_responses_only});
    w.attr("tokenizer_hash", opt.tokenizer.hash());
    w.attr("tokenizer_kind", opt.tokenizer.kind());
    w.attr("vocab_size", opt.tokenizer.vocab_size());
    w.attr("pad_id", int64_t{pad_id});
    w.attr("end_token_id", int64_t{end_token});
    w.attr("max_seq_length", opt.max_seq_length);
    w.attr("n_records", summary.n_records);
    w.attr("n_rows", summary.n_rows);
    w.attr("n_tokens", summary.n_tokens);
    w.attr("n_trained_tokens", summary.n_trained_tokens);
    w.attr("n_truncated", summary.n_truncated);
    w.attr("packed", int64_t{packed});
    w.attr("source", opt.input_path);
    w.close();
  }
  std::error_code ec;
  fs::rename(tmp_path, out_path, ec);
  if (ec)
    throw UserError(opt.output_path + ": cannot move " + tmp_path.string() + " into place (" +
                    ec.message() + ").");
  guard.disarm();
  return summary;
}

// ---- TokenDataset -------------------------------------------------------------------------------

TokenDataset TokenDataset::open(const std::string& path, int64_t model_vocab_size) {
  RT_ASSERT(model_vocab_size > 0, "model vocab size must be positive");
  const H5QuietErrors quiet;
  if (!fs::exists(path))
    throw UserError(path + ": no such dataset file; make it from JSONL with `ranktune prep`.");
  if (H5Fis_hdf5(path.c_str()) <= 0)
    throw UserError(path + ": not an HDF5 file; training data must be made with `ranktune prep` "
                    "(it converts JSONL to .h5).");
  H5Reader in(path);
  if (!in.has_attr("ranktune_format_version"))
    in.missing("attribute ranktune_format_version (it was not made by `ranktune prep`)");
  const int64_t version = in.attr_i64("ranktune_format_version");
  if (version > kDatasetFormatVersion)
    throw UserError(path + ": was written by a newer ranktune (dataset format version " +
                    std::to_string(version) + "; this build reads up to " +
                    std::to_string(kDatasetFormatVersion) +
                    "). Upgrade ranktune, or re-run `ranktune prep` with this one.");
  if (version < 1) in.damaged("attribute ranktune_format_version");

  TokenDataset d;
  d.path_ = path;
  d.format_ = in.attr_str("format");
  d.tokenizer_hash_ = in.attr_str("tokenizer_hash");
  d.tokenizer_kind_ = in.attr_str("tokenizer_kind");
  d.vocab_size_ = in.attr_i64("vocab_size");
  d.max_seq_length_ = in.attr_i64("max_seq_length");
  d.packed_ = in.attr_i64("packed") != 0;
  const int64_t pad_id = in.attr_i64("pad_id");
  const int64_t n_records_attr = in.attr_i64("n_records");

  if (d.vocab_size_ > model_vocab_size)
    throw UserError(path + ": was tokenized with a " + d.tokenizer_kind_ + " tokenizer of " +
                    std::to_string(d.vocab_size_) + " ids (hash " + d.tokenizer_hash_ +
                    "), more than the model's vocab_size of " + std::to_string(model_vocab_size) +
                    ". Re-run `ranktune prep` with the model's tokenizer.");
  if (pad_id < 0 || pad_id >= model_vocab_size)
    throw UserError(path + ": its pad id " + std::to_string(pad_id) +
                    " is outside the model's vocab [0, " + std::to_string(model_vocab_size) +
                    "). Re-run `ranktune prep` with the model's tokenizer.");
  d.pad_id_ = static_cast<int32_t>(pad_id);
  if (d.max_seq_length_ < 1) in.damaged("attribute max_seq_length");

  d.input_ids_ = in.array<int32_t>("/input_ids");
  d.labels_ = in.array<int32_t>("/labels");
  d.record_offsets_ = in.array<int64_t>("/record_offsets");
  if (d.labels_.size() != d.input_ids_.size())
    in.damaged("/labels (its length differs from /input_ids)");
  const std::vector<int64_t>& ro = d.record_offsets_;
  bool offsets_ok = ro.size() >= 2 && ro.front() == 0 &&
                    ro.back() == static_cast<int64_t>(d.input_ids_.size()) &&
                    static_cast<int64_t>(ro.size()) - 1 == n_records_attr;
  for (size_t i = 1; offsets_ok && i < ro.size(); ++i) offsets_ok = ro[i] >= ro[i - 1];
  if (!offsets_ok) in.damaged("/record_offsets (not n_records+1 increasing offsets)");
  if (d.packed_) {
    d.row_offsets_ = in.array<int64_t>("/row_offsets");
    const std::vector<int64_t>& rw = d.row_offsets_;
    bool rows_ok = rw.size() >= 2 && rw.front() == 0 && rw.back() == n_records_attr;
    for (size_t r = 1; rows_ok && r < rw.size(); ++r)
      rows_ok = rw[r] >= rw[r - 1] && ro[rw[r]] - ro[rw[r - 1]] <= d.max_seq_length_;
    if (!rows_ok) in.damaged("/row_offsets (rows must be increasing and fit max_seq_length)");
  }

  // Every id must index the model's embedding; name the first record that does not.
  auto check_ids = [&](const std::vector<int32_t>& values, const char* name, bool allow_ignore) {
    for (size_t i = 0; i < values.size(); ++i) {
      const int32_t v = values[i];
      if ((v >= 0 && v < model_vocab_size) || (allow_ignore && v == kIgnoreIndex)) continue;
      const int64_t record =
          std::upper_bound(ro.begin(), ro.end(), static_cast<int64_t>(i)) - ro.begin() - 1;
      throw UserError(path + ": record " + std::to_string(record) + " has " + name + " " +
                      std::to_string(v) + " (token " + std::to_string(i - ro[record]) +
                      " of the record), outside the model's vocab [0, " +
                      std::to_string(model_vocab_size) +
                      "). The file was made with another tokenizer or is damaged; re-run "
                      "`ranktune prep` with the model's tokenizer.");
    }
  };
  check_ids(d.input_ids_, "token id", false);
  check_ids(d.labels_, "label", true);
  d.n_trained_tokens_ = std::count_if(d.labels_.begin(), d.labels_.end(),
                                      [](int32_t l) { return l != kIgnoreIndex; });
  return d;
}

int64_t TokenDataset::n_rows() const {
  return packed_ ? static_cast<int64_t>(row_offsets_.size()) - 1 : n_records();
}

int64_t TokenDataset::row_record_begin(int64_t row) const {
  RT_ASSERT(row >= 0 && row < n_rows(), "row index out of range");
  return packed_ ? row_offsets_[row] : row;
}

int64_t TokenDataset::row_record_end(int64_t row) const {
  RT_ASSERT(row >= 0 && row < n_rows(), "row index out of range");
  return packed_ ? row_offsets_[row + 1] : row + 1;
}

int64_t TokenDataset::row_length(int64_t row) const {
  return record_offsets_[row_record_end(row)] - record_offsets_[row_record_begin(row)];
}

std::span<const int32_t> TokenDataset::record_input_ids(int64_t record) const {
  RT_ASSERT(record >= 0 && record < n_records(), "record index out of range");
  return std::span<const int32_t>(input_ids_)
      .subspan(record_offsets_[record], record_offsets_[record + 1] - record_offsets_[record]);
}

std::span<const int32_t> TokenDataset::record_labels(int64_t record) const {
  RT_ASSERT(record >= 0 && record < n_records(), "record index out of range");
  return std::span<const int32_t>(labels_)
      .subspan(record_offsets_[record], record_offsets_[record + 1] - record_offsets_[record]);
}

std::vector<int64_t> TokenDataset::all_rows() const {
  std::vector<int64_t> rows(n_rows());
  for (int64_t r = 0; r < n_rows(); ++r) rows[r] = r;
  return rows;
}

RowSplit TokenDataset::split(double eval_fraction, uint64_t seed) const {
  if (!(eval_fraction > 0.0 && eval_fraction < 1.0))
    throw UserError(path_ + ": eval fraction " + std::to_string(eval_fraction) +
                    " must be between 0 and 1 (exclusive).");
  const int64_t n = n_rows();
  const int64_t n_eval =
      std::max<int64_t>(1, std::llround(eval_fraction * static_cast<double>(n)));
  if (n_eval >= n)
    throw UserError(path_ + ": has " + std::to_string(n) + " rows; holding out " +
                    std::to_string(n_eval) + " for eval leaves none to train on. Lower the "
                    "eval fraction or give an eval file.");
  const std::vector<int64_t> perm = seeded_permutation(n, seed, kSplitStream);
  RowSplit s;
  s.eval.assign(perm.begin(), perm.begin() + n_eval);
  s.train.assign(perm.begin() + n_eval, perm.end());
  std::sort(s.eval.begin(), s.eval.end());
  std::sort(s.train.begin(), s.train.end());
  return s;
}

// ---- batches ------------------------------------------------------------------------------------

namespace {

void check_seq_len(const TokenDataset& data, int64_t seq_len) {
  if (seq_len < 1) throw UserError(data.path() + ": sequence length must be positive.");
  if (data.packed() && seq_len < data.max_seq_length())
    throw UserError(data.path() + ": rows were packed to " +
                    std::to_string(data.max_seq_length()) + " tokens, longer than the training "
                    "sequence length of " + std::to_string(seq_len) +
                    ". Re-run `ranktune prep` with max_seq_length " + std::to_string(seq_len) +
                    " or raise the training max_seq_length.");
}

// Writes dataset row `row` (or padding, for row -1) into one batch row of seq_len tokens;
// returns its number of targets.
int64_t fill_row(const TokenDataset& data, int64_t row, int64_t seq_len, int32_t* ids,
                 int32_t* targets, int32_t* positions, int32_t* doc_ids) {
  int64_t t = 0, n_targets = 0;
  int32_t doc = 0;
  if (row >= 0) {
    for (int64_t rec = data.row_record_begin(row); rec < data.row_record_end(row); ++rec, ++doc) {
      std::span<const int32_t> rec_ids = data.record_input_ids(rec);
      std::span<const int32_t> rec_labels = data.record_labels(rec);
      // Unpacked rows are cut to seq_len; packed rows fit (check_seq_len).
      const int64_t len = std::min<int64_t>(static_cast<int64_t>(rec_ids.size()), seq_len - t);
      for (int64_t k = 0; k < len; ++k, ++t) {
        ids[t] = rec_ids[k];
        targets[t] = k + 1 < len ? rec_labels[k + 1] : kIgnoreIndex;
        positions[t] = static_cast<int32_t>(k);
        if (doc_ids) doc_ids[t] = doc;
        n_targets += targets[t] != kIgnoreIndex;
      }
    }
  }
  // Padding: in a packed row one more "record" with positions from 0; unpacked, positions go on.
  const int64_t pad_start = t;
  for (; t < seq_len; ++t) {
    ids[t] = data.pad_id();
    targets[t] = kIgnoreIndex;
    positions[t] = static_cast<int32_t>(doc_ids ? t - pad_start : t);
    if (doc_ids) doc_ids[t] = doc;
  }
  return n_targets;
}

int64_t row_target_count(const TokenDataset& data, int64_t row, int64_t seq_len) {
  int64_t n = 0, t = 0;
  for (int64_t rec = data.row_record_begin(row); rec < data.row_record_end(row); ++rec) {
    std::span<const int32_t> labels = data.record_labels(rec);
    const int64_t len = std::min<int64_t>(static_cast<int64_t>(labels.size()), seq_len - t);
    for (int64_t k = 1; k < len; ++k) n += labels[k] != kIgnoreIndex;
    t += len;
  }
  return n;
}

}  // namespace

Batch make_batch(const TokenDataset& data, std::span<const int64_t> rows, int64_t batch_size,
                 int64_t seq_len) {
  check_seq_len(data, seq_len);
  RT_ASSERT(static_cast<int64_t>(rows.size()) <= batch_size, "more rows than the batch holds");
  Batch b;
  b.batch_size = batch_size;
  b.seq_len = seq_len;
  const size_t n = static_cast<size_t>(batch_size * seq_len);
  b.input_ids.resize(n);
  b.targets.resize(n);
  b.positions.resize(n);
  if (data.packed()) b.doc_ids.resize(n);
  b.rows.assign(batch_size, -1);
  for (int64_t i = 0; i < batch_size; ++i) {
    const int64_t row = i < static_cast<int64_t>(rows.size()) ? rows[i] : -1;
    RT_ASSERT(row >= -1 && row < data.n_rows(), "row index out of range");
    b.rows[i] = row;
    const size_t at = static_cast<size_t>(i * seq_len);
    b.n_target_tokens +=
        fill_row(data, row, seq_len, b.input_ids.data() + at, b.targets.data() + at,
                 b.positions.data() + at, data.packed() ? b.doc_ids.data() + at : nullptr);
  }
  return b;
}

std::vector<std::vector<int64_t>> eval_row_groups(std::span<const int64_t> rows,
                                                  int64_t batch_size, int rank, int world_size) {
  RT_ASSERT(batch_size > 0 && world_size > 0 && rank >= 0 && rank < world_size,
            "bad eval batch/rank arguments");
  std::vector<int64_t> mine;
  for (size_t i = static_cast<size_t>(rank); i < rows.size(); i += world_size)
    mine.push_back(rows[i]);
  const int64_t most_per_rank = (static_cast<int64_t>(rows.size()) + world_size - 1) / world_size;
  const int64_t n_groups = (most_per_rank + batch_size - 1) / batch_size;
  std::vector<std::vector<int64_t>> groups(n_groups);
  for (size_t i = 0; i < mine.size(); ++i) groups[i / batch_size].push_back(mine[i]);
  return groups;
}

// ---- DataLoader ---------------------------------------------------------------------------------

DataLoader::DataLoader(const TokenDataset& data, std::vector<int64_t> rows, int64_t batch_size,
                       int64_t seq_len, uint64_t seed, int rank, int world_size)
    : data_(&data),
      rows_(std::move(rows)),
      batch_size_(batch_size),
      seq_len_(seq_len),
      seed_(seed),
      rank_(rank),
      world_size_(world_size) {
  RT_ASSERT(world_size > 0 && rank >= 0 && rank < world_size, "bad rank/world size");
  if (batch_size < 1) throw UserError(data.path() + ": batch size must be positive.");
  check_seq_len(data, seq_len);
  for (int64_t r : rows_) RT_ASSERT(r >= 0 && r < data.n_rows(), "row index out of range");
  if (n_rows() < global_batch())
    throw UserError(data.path() + ": has " + std::to_string(n_rows()) +
                    " training rows, fewer than one global batch of " +
                    std::to_string(global_batch()) + " (" + std::to_string(world_size) +
                    " ranks x batch size " + std::to_string(batch_size) +
                    "). Lower the batch size or add data.");
  start_epoch(0);
}

std::vector<int64_t> DataLoader::epoch_order(int64_t epoch) const {
  const std::vector<int64_t> perm =
      seeded_permutation(n_rows(), seed_, static_cast<uint64_t>(epoch));
  std::vector<int64_t> order(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) order[i] = rows_[perm[i]];
  return order;
}

void DataLoader::start_epoch(int64_t epoch) {
  epoch_ = epoch;
  row_offset_ = 0;
  order_ = epoch_order(epoch);
}

Batch DataLoader::next() {
  const std::span<const int64_t> mine =
      std::span<const int64_t>(order_).subspan(row_offset_ + rank_ * batch_size_, batch_size_);
  Batch b = make_batch(*data_, mine, batch_size_, seq_len_);
  b.epoch = epoch_;
  b.step_in_epoch = row_offset_ / global_batch();
  row_offset_ += global_batch();
  // The rows left that cannot fill a global batch are dropped for this epoch.
  if (row_offset_ + global_batch() > n_rows()) start_epoch(epoch_ + 1);
  return b;
}

int64_t DataLoader::peek_target_tokens(int64_t k) const {
  int64_t total = 0, offset = row_offset_, epoch = epoch_;
  std::vector<int64_t> later_order;
  const std::vector<int64_t>* order = &order_;
  for (int64_t step = 0; step < k; ++step) {
    for (int64_t i = 0; i < batch_size_; ++i)
      total += row_target_count(*data_, (*order)[offset + rank_ * batch_size_ + i], seq_len_);
    offset += global_batch();
    if (offset + global_batch() > n_rows()) {
      later_order = epoch_order(++epoch);
      order = &later_order;
      offset = 0;
    }
  }
  return total;
}

DataLoaderState DataLoader::state() const {
  return DataLoaderState{epoch_, row_offset_, seed_, n_rows()};
}

void DataLoader::restore(const DataLoaderState& s) {
  if (s.seed != seed_ || s.n_rows != n_rows())
    throw UserError(data_->path() + ": cannot resume the data order: the checkpoint was taken "
                    "with seed " + std::to_string(s.seed) + " over " + std::to_string(s.n_rows) +
                    " training rows, this run has seed " + std::to_string(seed_) + " over " +
                    std::to_string(n_rows()) + ". Resume with the same data, eval split and "
                    "seed, or start a new run.");
  RT_ASSERT(s.epoch >= 0 && s.row_offset >= 0 && s.row_offset <= s.n_rows,
            "bad data loader state");
  if (s.row_offset + global_batch() > n_rows()) {
    start_epoch(s.epoch + 1);
  } else {
    if (s.epoch != epoch_) order_ = epoch_order(s.epoch);
    epoch_ = s.epoch;
    row_offset_ = s.row_offset;
  }
}

}  // namespace ranktune

// Tokenizers: the byte tokenizer, and id-for-id parity of the byte-level BPE with HF tokenizers on
// the fixtures made by tools/make_tokenizer_fixtures.py (tests/fixtures/tokenizer/).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "ranktune/error.h"
#include "ranktune/tokenizer.h"

namespace ranktune {
namespace {

namespace fs = std::filesystem;

const fs::path kFixtures = fs::path(RANKTUNE_FIXTURES) / "tokenizer";

// A directory under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() / ("ranktune_tokenizer_test_" + std::to_string(::getpid()) +
                                         "_" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path write(const std::string& name, const std::string& contents) const {
    const fs::path file = path_ / name;
    std::ofstream(file, std::ios::binary) << contents;
    return file;
  }

 private:
  fs::path path_;
};

// The message of the UserError that load_tokenizer(spec) throws ("" if it throws none).
std::string load_error(const std::string& spec) {
  try {
    load_tokenizer(spec);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

// ---- byte tokenizer ---------------------------------------------------------------------------

TEST(TokenizerByte, VocabularyAndSpecialIds) {
  auto tok = load_tokenizer("byte");
  EXPECT_EQ(tok->kind(), "byte");
  EXPECT_EQ(tok->vocab_size(), 262);
  EXPECT_EQ(tok->token_id("<|begin_of_text|>"), 256);
  EXPECT_EQ(tok->token_id("<|end_of_text|>"), 257);
  EXPECT_EQ(tok->token_id("<|start_header_id|>"), 258);
  EXPECT_EQ(tok->token_id("<|end_header_id|>"), 259);
  EXPECT_EQ(tok->token_id("<|eot_id|>"), 260);
  EXPECT_EQ(tok->token_id("<|pad|>"), 261);
  EXPECT_EQ(tok->token_id("<|endoftext|>"), std::nullopt);
  EXPECT_EQ(tok->token_id("a"), std::nullopt);
  EXPECT_EQ(tok->hash().size(), 16u);
  EXPECT_EQ(tok->hash(), load_tokenizer("byte")->hash());
}

TEST(TokenizerByte, EncodeSplitsOutSpecialTokens) {
  auto tok = load_tokenizer("byte");
  EXPECT_EQ(tok->encode("<|begin_of_text|>hi<|eot_id|>"),
            (std::vector<int32_t>{256, 'h', 'i', 260}));
  EXPECT_EQ(tok->encode("<|start_header_id|>user<|end_header_id|>\n\n"),
            (std::vector<int32_t>{258, 'u', 's', 'e', 'r', 259, '\n', '\n'}));
  EXPECT_EQ(tok->encode("<|pad|><|end_of_text|>"), (std::vector<int32_t>{261, 257}));
  // Almost-specials stay bytes.
  const std::string almost = "<|eot_id| <eot_id|> <|EOT_ID|>";
  const auto ids = tok->encode(almost);
  ASSERT_EQ(ids.size(), almost.size());
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids[i], static_cast<unsigned char>(almost[i]));
  EXPECT_TRUE(tok->encode("").empty());
  EXPECT_EQ(tok->decode({256, 'h', 'i', 260}), "<|begin_of_text|>hi<|eot_id|>");
}

TEST(TokenizerByte, RoundTripRandomBytesIncludingInvalidUtf8) {
  auto tok = load_tokenizer("byte");
  std::mt19937 rng(7);
  const std::vector<std::string> specials = {"<|begin_of_text|>", "<|eot_id|>", "<|pad|>", "<|",
                                             "|>"};
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    const int n = static_cast<int>(rng() % 300);
    for (int i = 0; i < n; ++i) {
      if (rng() % 40 == 0) {
        text += specials[rng() % specials.size()];
      } else {
        text += static_cast<char>(rng() & 0xFF);  // any byte: invalid UTF-8 and NULs included
      }
    }
    const auto ids = tok->encode(text);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->vocab_size());
    ASSERT_EQ(tok->decode(ids), text) << "trial " << trial;
  }
}

TEST(TokenizerByte, DecodeSkipsIdsOutsideTheVocabulary) {
  auto tok = load_tokenizer("byte");
  EXPECT_EQ(tok->decode({'a', 262, -1, 100000, 'b'}), "ab");
}

// ---- byte-level BPE: parity with HF -----------------------------------------------------------

#ifdef RANKTUNE_HAVE_PCRE2

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

const nlohmann::json& expected() {
  static const nlohmann::json data =
      nlohmann::json::parse(read_file(kFixtures / "expected_ids.json"));
  return data;
}

std::string show(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else
      out += static_cast<char>(c);
  }
  return out;
}

// Loads the fixture tokenizer `name` of expected_ids.json, applying its "patch" if it has one.
std::unique_ptr<Tokenizer> load_fixture(const std::string& name, const TempDir& tmp) {
  const auto& entry = expected()["tokenizers"][name];
  const fs::path file = kFixtures / entry["file"].get<std::string>();
  if (!entry.contains("patch")) return load_tokenizer(file.string());
  auto json = nlohmann::json::parse(read_file(file));
  for (const auto& [key, value] : entry["patch"].items()) {
    EXPECT_EQ(key, "pre_tokenizer.add_prefix_space");
    json["pre_tokenizer"]["add_prefix_space"] = value;
  }
  return load_tokenizer(tmp.write(name + ".json", json.dump()).string());
}

class TokenizerParity : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerParity, IdsMatchHuggingFaceForEveryCase) {
  TempDir tmp;
  auto tok = load_fixture(GetParam(), tmp);
  const auto& cases = expected()["cases"];
  const auto& want = expected()["tokenizers"][GetParam()]["ids"];
  ASSERT_EQ(cases.size(), want.size());
  size_t mismatches = 0, compared = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string text = cases[i].get<std::string>();
    const auto ids = tok->encode(text);
    const auto expected_ids = want[i].get<std::vector<int32_t>>();
    compared += expected_ids.size();
    if (ids != expected_ids) {
      ++mismatches;
      ADD_FAILURE() << GetParam() << " case " << i << " \"" << show(text).substr(0, 200)
                    << "\": " << ::testing::PrintToString(ids)
                    << "\n  HF: " << ::testing::PrintToString(expected_ids);
    }
  }
  EXPECT_EQ(mismatches, 0u) << "of " << cases.size() << " cases";
  EXPECT_GT(compared, 2000u);  // the fixtures are not trivially empty
}

TEST_P(TokenizerParity, DecodeMatchesHuggingFace) {
  TempDir tmp;
  auto tok = load_fixture(GetParam(), tmp);
  const auto& entry = expected()["tokenizers"][GetParam()];
  const auto& cases = expected()["cases"];
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto ids = entry["ids"][i].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->decode(ids), entry["decoded"][i].get<std::string>()) << "case " << i;
  }
  // Prefixes that cut multi-byte characters: HF's from_utf8_lossy gives U+FFFD.
  for (const auto& partial : entry["partial_decodes"]) {
    const auto ids = partial["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->decode(ids), partial["text"].get<std::string>())
        << ::testing::PrintToString(ids);
  }
}

TEST_P(TokenizerParity, DecodeOfEncodeIsTheText) {
  TempDir tmp;
  auto tok = load_fixture(GetParam(), tmp);
  const auto& entry = expected()["tokenizers"][GetParam()];
  const auto& cases = expected()["cases"];
  size_t round_trips = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string text = cases[i].get<std::string>();
    // lstrip/rstrip added tokens (gpt2's <mask>, <rs>) swallow whitespace, and a prefix space is
    // added, so those cases are not expected to round trip (nor do they in HF).
    if (entry["decoded"][i].get<std::string>() != text) continue;
    EXPECT_EQ(tok->decode(tok->encode(text)), text) << "case " << i << " \"" << show(text) << "\"";
    ++round_trips;
  }
  if (GetParam() != "gpt2_prefix_space") EXPECT_GE(round_trips, cases.size() - 3);
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, TokenizerParity,
                         ::testing::Values("llama3", "gpt2", "gpt2_prefix_space"));

TEST(TokenizerBpe, CorpusFileMatchesTheRecordedCases) {
  const std::string corpus = read_file(kFixtures / "corpus.txt");
  const auto& cases = expected()["cases"];
  const size_t n = expected()["corpus_lines"].get<size_t>();
  std::vector<std::string> lines;
  std::istringstream in(corpus);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), n) << "tests/fixtures/tokenizer/corpus.txt was changed or mangled "
                                "(line endings?); rerun tools/make_tokenizer_fixtures.py";
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(lines[i], cases[i].get<std::string>());
  EXPECT_EQ(cases.back().get<std::string>(), corpus);  // the whole corpus is the last case
}

TEST(TokenizerBpe, SpecialTokensAndNoBos) {
  auto tok = load_tokenizer((kFixtures / "llama3").string());  // a directory works too
  EXPECT_EQ(tok->kind(), "bpe");
  EXPECT_EQ(tok->vocab_size(), 1511);
  const int32_t bos = tok->token_id("<|begin_of_text|>").value();
  const int32_t eot = tok->token_id("<|eot_id|>").value();
  EXPECT_EQ(bos, 1500);
  EXPECT_EQ(eot, 1509);
  EXPECT_EQ(tok->token_id("<|no_such_token|>"), std::nullopt);
  // encode() applies no post_processor: the TemplateProcessing BOS in the file is not added.
  const auto ids = tok->encode("Hello world");
  ASSERT_FALSE(ids.empty());
  EXPECT_NE(ids.front(), bos);
  EXPECT_EQ(tok->encode("<|begin_of_text|>"), std::vector<int32_t>{bos});
  const auto chat = tok->encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
  EXPECT_EQ(chat.front(), tok->token_id("<|start_header_id|>").value());
  EXPECT_EQ(chat.back(), eot);
  EXPECT_EQ(tok->decode(chat), "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
  EXPECT_TRUE(tok->encode("").empty());

  auto gpt2 = load_tokenizer((kFixtures / "gpt2" / "tokenizer.json").string());
  EXPECT_EQ(gpt2->token_id("<|endoftext|>"), 1200);
  EXPECT_EQ(gpt2->vocab_size(), 1204);
}

TEST(TokenizerBpe, HashIsStableAndTellsFilesApart) {
  auto a = load_tokenizer((kFixtures / "llama3").string());
  auto b = load_tokenizer((kFixtures / "llama3" / "tokenizer.json").string());
  auto c = load_tokenizer((kFixtures / "gpt2").string());
  EXPECT_EQ(a->hash().size(), 16u);
  EXPECT_EQ(a->hash().find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(a->hash(), b->hash());
  EXPECT_NE(a->hash(), c->hash());
  EXPECT_NE(a->hash(), load_tokenizer("byte")->hash());
}

TEST(TokenizerBpe, InvalidUtf8IsEncodedAndDecodesLossily) {
  auto tok = load_tokenizer((kFixtures / "llama3").string());
  const std::string text = "abc\xff\xfe def \xe4\xb8 end\xc3";
  const auto ids = tok->encode(text);
  for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < tok->vocab_size());
  // Every byte is kept; decode() then replaces the invalid ones as HF's decoder would.
  EXPECT_EQ(tok->decode(ids), "abc\xEF\xBF\xBD\xEF\xBF\xBD def \xEF\xBF\xBD end\xEF\xBF\xBD");
  EXPECT_EQ(tok->decode({999999, -5}), "");  // unknown ids are skipped, as in HF
}

TEST(TokenizerBpe, ConcurrentEncodeAgreesWithSerial) {
  auto tok = load_tokenizer((kFixtures / "gpt2").string());
  const std::string corpus = read_file(kFixtures / "corpus.txt");
  const auto want = expected()["tokenizers"]["gpt2"]["ids"].back().get<std::vector<int32_t>>();
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 5; ++r) ok[static_cast<size_t>(t)] += tok->encode(corpus) == want;
    });
  }
  for (auto& thread : threads) thread.join();
  for (int n : ok) EXPECT_EQ(n, 5);
}

TEST(TokenizerBpe, LongInputsDoNotBreakTheRegex) {
  auto tok = load_tokenizer((kFixtures / "llama3").string());
  for (const std::string text : {std::string(200000, ' ') + "x", std::string(100000, 'a'),
                                 std::string(50000, '\n') + "y", std::string(60000, '7')}) {
    EXPECT_EQ(tok->decode(tok->encode(text)), text);
  }
}

#endif  // RANKTUNE_HAVE_PCRE2

// ---- errors -----------------------------------------------------------------------------------

TEST(TokenizerErrors, MissingFileNamesThePath) {
  const std::string spec = "/nonexistent/dir/tokenizer.json";
  const std::string message = load_error(spec);
  EXPECT_NE(message.find(spec), std::string::npos) << message;
  EXPECT_NE(message.find("byte"), std::string::npos) << message;  // says what else to give

  TempDir tmp;
  const std::string dir_message = load_error(tmp.path().string());
  EXPECT_NE(dir_message.find(tmp.path().string()), std::string::npos) << dir_message;
  EXPECT_NE(dir_message.find("tokenizer.json"), std::string::npos) << dir_message;
}

#ifdef RANKTUNE_HAVE_PCRE2

TEST(TokenizerErrors, MalformedJsonNamesTheFile) {
  TempDir tmp;
  const fs::path file = tmp.write("tokenizer.json", "{\"model\": {\"type\": \"BPE\", ");
  const std::string message = load_error(file.string());
  EXPECT_NE(message.find(file.string()), std::string::npos) << message;
  EXPECT_NE(message.find("JSON"), std::string::npos) << message;
  // The directory form names the file inside it.
  EXPECT_NE(load_error(tmp.path().string()).find(file.string()), std::string::npos);
}

TEST(TokenizerErrors, UnsupportedDefinitionsNameFileAndProblem) {
  TempDir tmp;
  const auto base = nlohmann::json::parse(read_file(kFixtures / "llama3" / "tokenizer.json"));
  struct Case {
    std::string what;
    std::function<void(nlohmann::json&)> edit;
  };
  const std::vector<Case> cases = {
      {"WordPiece", [](nlohmann::json& j) { j["model"]["type"] = "WordPiece"; }},
      {"NFKC",
       [](nlohmann::json& j) {
         j["normalizer"] = {{"type", "NFKC"}};
       }},
      {"Metaspace",
       [](nlohmann::json& j) {
         j["pre_tokenizer"] = {{"type", "Metaspace"}};
       }},
      {"decoder", [](nlohmann::json& j) { j["decoder"] = nullptr; }},
      {"merges[0]",
       [](nlohmann::json& j) {
         j["model"]["merges"][0] = {"no_such", "token"};
       }},
      {"merges[1]", [](nlohmann::json& j) { j["model"]["merges"][1] = "a b c"; }},
      {"model", [](nlohmann::json& j) { j.erase("model"); }},
      {"vocab", [](nlohmann::json& j) { j["model"]["vocab"] = 3; }},
      {"regex",
       [](nlohmann::json& j) {
         j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
       }},
      {"added_tokens[0]", [](nlohmann::json& j) { j["added_tokens"][0].erase("content"); }},
      {"ByteLevel", [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"].erase(1); }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    auto json = base;
    cases[i].edit(json);
    const fs::path file = tmp.write("bad" + std::to_string(i) + ".json", json.dump());
    const std::string message = load_error(file.string());
    EXPECT_NE(message.find(file.string()), std::string::npos) << cases[i].what << ": " << message;
    EXPECT_NE(message.find(cases[i].what), std::string::npos) << cases[i].what << ": " << message;
  }
}

TEST(TokenizerBpe, LegacyAndPairMergesLoadTheSame) {
  TempDir tmp;
  auto json = nlohmann::json::parse(read_file(kFixtures / "llama3" / "tokenizer.json"));
  ASSERT_TRUE(json["model"]["merges"][0].is_array());
  for (auto& merge : json["model"]["merges"]) {
    merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  }
  auto legacy = load_tokenizer(tmp.write("legacy.json", json.dump()).string());
  auto pairs = load_tokenizer((kFixtures / "llama3").string());
  const std::string corpus = read_file(kFixtures / "corpus.txt");
  EXPECT_EQ(legacy->encode(corpus), pairs->encode(corpus));
}

#else

TEST(TokenizerErrors, BuiltWithoutPcre2SaysSo) {
  const std::string message = load_error((kFixtures / "llama3").string());
  EXPECT_NE(message.find("PCRE2"), std::string::npos) << message;
  EXPECT_NE(message.find("tokenizer.json"), std::string::npos) << message;
}

#endif  // RANKTUNE_HAVE_PCRE2

}  // namespace
}  // namespace ranktune

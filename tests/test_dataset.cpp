// Dataset prep (rendering, labels, truncation, packing, errors, atomic write), the loader's
// validation, and the DataLoader's order, rank slicing, targets and resume.
#include <hdf5.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <gtest/gtest.h>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "ranktune/dataset.h"
#include "ranktune/error.h"
#include "ranktune/tokenizer.h"

namespace fs = std::filesystem;
using namespace ranktune;

namespace {

// Token ids of the built-in byte tokenizer.
constexpr int32_t kBos = 256, kEnd = 257, kStartHeader = 258, kEndHeader = 259, kEot = 260,
                  kPad = 261, kByteVocab = 262;

std::vector<int32_t> bytes(std::string_view s) {
  std::vector<int32_t> ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

std::vector<int32_t> concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

std::vector<int32_t> ignored(size_t n) { return std::vector<int32_t>(n, kIgnoreIndex); }

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return "";
}

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("ranktune_") + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    tok_ = load_tokenizer("byte");
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write_jsonl(const std::string& name, const std::vector<std::string>& lines) {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    for (const auto& l : lines) out << l << "\n";
    return path;
  }

  PrepSummary prep(const std::vector<std::string>& lines, const std::string& format = "auto",
                   int64_t max_seq_length = 64, bool packing = false,
                   bool responses_only = true) {
    return prep_dataset(PrepOptions{.input_path = write_jsonl("in.jsonl", lines),
                                    .output_path = out_path(),
                                    .tokenizer = *tok_,
                                    .format = format,
                                    .max_seq_length = max_seq_length,
                                    .packing = packing,
                                    .train_on_responses_only = responses_only});
  }

  std::string out_path() const { return (dir_ / "out.h5").string(); }
  TokenDataset open(int64_t vocab = kByteVocab) { return TokenDataset::open(out_path(), vocab); }

  // n text records of varied lengths.
  std::vector<std::string> text_records(int n, int min_len = 1, int spread = 7) {
    std::vector<std::string> lines;
    for (int i = 0; i < n; ++i)
      lines.push_back("{\"text\": \"" + std::string(min_len + (i * 5) % spread, 'a' + i % 26) +
                      "\"}");
    return lines;
  }

  fs::path dir_;
  std::unique_ptr<Tokenizer> tok_;
};

std::vector<int32_t> to_vec(std::span<const int32_t> s) { return {s.begin(), s.end()}; }

// ---- rendering and labels -----------------------------------------------------------------------

TEST_F(DatasetTest, TextTrainsOnEveryTokenAndEndToken) {
  PrepSummary s = prep({R"({"text": "hi there"})"});
  EXPECT_EQ(s.format, "text");
  TokenDataset d = open();
  ASSERT_EQ(d.n_records(), 1);
  EXPECT_EQ(to_vec(d.record_input_ids(0)), concat({{kBos}, bytes("hi there"), {kEnd}}));
  // The first label is never a target; everything after it is trained.
  EXPECT_EQ(to_vec(d.record_labels(0)), concat({{kIgnoreIndex}, bytes("hi there"), {kEnd}}));
  EXPECT_EQ(s.n_tokens, 10);
  EXPECT_EQ(s.n_trained_tokens, 9);
  EXPECT_EQ(d.tokenizer_hash(), tok_->hash());
  EXPECT_EQ(d.tokenizer_kind(), "byte");
  EXPECT_EQ(d.pad_id(), kPad);
}

TEST_F(DatasetTest, PromptCompletionMasksThePrompt) {
  PrepSummary s = prep({R"({"prompt": "23+58=", "completion": "81"})"});
  EXPECT_EQ(s.format, "prompt_completion");
  TokenDataset d = open();
  EXPECT_EQ(to_vec(d.record_input_ids(0)), concat({{kBos}, bytes("23+58=81"), {kEnd}}));
  EXPECT_EQ(to_vec(d.record_labels(0)), concat({ignored(7), bytes("81"), {kEnd}}));
  EXPECT_EQ(s.n_trained_tokens, 3);

  prep({R"({"prompt": "23+58=", "completion": "81"})"}, "auto", 64, false,
       /*responses_only=*/false);
  TokenDataset all = open();
  EXPECT_EQ(to_vec(all.record_labels(0)), concat({ignored(1), bytes("23+58=81"), {kEnd}}));
}

TEST_F(DatasetTest, AlpacaRendersInputBlockOnlyWhenPresent) {
  prep({R"({"instruction": "Add.", "input": "2 3", "output": "5"})",
        R"({"instruction": "Say hi.", "input": "", "output": "hi"})",
        R"({"instruction": "Nap.", "output": "zz"})"});
  TokenDataset d = open();
  ASSERT_EQ(d.format(), "alpaca");
  const std::string p0 = "### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n";
  EXPECT_EQ(to_vec(d.record_input_ids(0)), concat({{kBos}, bytes(p0), bytes("5"), {kEnd}}));
  EXPECT_EQ(to_vec(d.record_labels(0)), concat({ignored(1 + p0.size()), bytes("5"), {kEnd}}));
  const std::string p1 = "### Instruction:\nSay hi.\n\n### Response:\n";
  EXPECT_EQ(to_vec(d.record_input_ids(1)), concat({{kBos}, bytes(p1), bytes("hi"), {kEnd}}));
  EXPECT_EQ(to_vec(d.record_labels(1)), concat({ignored(1 + p1.size()), bytes("hi"), {kEnd}}));
  EXPECT_EQ(to_vec(d.record_input_ids(2)),
            concat({{kBos}, bytes("### Instruction:\nNap.\n\n### Response:\n"), bytes("zz"),
                    {kEnd}}));
}

TEST_F(DatasetTest, MessagesUseLlama3TemplateAndTrainOnAssistantTurns) {
  prep({R"({"messages": [{"role": "system", "content": "Be brief."}, )"
        R"({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, )"
        R"({"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]})"},
       "auto", 256);
  TokenDataset d = open();
  ASSERT_EQ(d.format(), "messages");
  auto turn = [](const std::string& role, const std::string& content) {
    return concat({{kStartHeader}, bytes(role), {kEndHeader}, bytes("\n\n"), bytes(content),
                   {kEot}});
  };
  auto masked_turn = [&](const std::string& role, const std::string& content) {
    return ignored(turn(role, content).size());
  };
  auto trained_turn = [](const std::string& role, const std::string& content) {
    return concat({ignored(1 + role.size() + 1 + 2), bytes(content), {kEot}});
  };
  EXPECT_EQ(to_vec(d.record_input_ids(0)),
            concat({{kBos}, turn("system", "Be brief."), turn("user", "2+2?"),
                    turn("assistant", "4"), turn("user", "3+3?"), turn("assistant", "6")}));
  // No end token after the last <|eot_id|> of a chat.
  EXPECT_EQ(to_vec(d.record_labels(0)),
            concat({ignored(1), masked_turn("system", "Be brief."), masked_turn("user", "2+2?"),
                    trained_turn("assistant", "4"), masked_turn("user", "3+3?"),
                    trained_turn("assistant", "6")}));
  EXPECT_EQ(d.n_trained_tokens(), 4);

  prep({R"({"messages": [{"role": "user", "content": "hi"}, )"
        R"({"role": "assistant", "content": "yo"}]})"},
       "messages", 64, false, /*responses_only=*/false);
  TokenDataset all = open();
  std::vector<int32_t> expected = to_vec(all.record_input_ids(0));
  expected[0] = kIgnoreIndex;
  EXPECT_EQ(to_vec(all.record_labels(0)), expected);
}

TEST_F(DatasetTest, AutoDetectsFromFirstRecordAndRejectsUnknownKeys) {
  EXPECT_EQ(prep({R"({"text": "a", "id": 3})"}).format, "text");
  EXPECT_EQ(prep({R"({"prompt": "a", "completion": "b"})"}).format, "prompt_completion");
  EXPECT_EQ(prep({R"({"instruction": "a", "output": "b"})"}).format, "alpaca");
  EXPECT_EQ(prep({R"({"messages": [{"role": "user", "content": "a"}]})"}).format, "messages");
  const std::string msg = message_of([&] { prep({R"({"question": "a", "answer": "b"})"}); });
  EXPECT_NE(msg.find("in.jsonl:1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("question"), std::string::npos) << msg;
}

TEST_F(DatasetTest, TruncationIsCountedAndKeepsTheHead) {
  PrepSummary s = prep({R"({"text": "abcdefghijklmnop"})", R"({"text": "abc"})"}, "text", 8);
  EXPECT_EQ(s.n_truncated, 1);
  EXPECT_EQ(s.longest_record, 18);
  TokenDataset d = open();
  EXPECT_EQ(to_vec(d.record_input_ids(0)), concat({{kBos}, bytes("abcdefg")}));
  EXPECT_EQ(to_vec(d.record_input_ids(1)), concat({{kBos}, bytes("abc"), {kEnd}}));
  EXPECT_NE(s.report().find("truncated"), std::string::npos) << s.report();

  // A completion cut away entirely leaves a record with nothing to train on.
  PrepSummary cut = prep({R"({"prompt": "a long prompt", "completion": "x"})"}, "auto", 6);
  EXPECT_EQ(cut.n_untrained, 1);
  EXPECT_EQ(cut.n_trained_tokens, 0);
}

// ---- errors and atomic write --------------------------------------------------------------------

TEST_F(DatasetTest, BadJsonNamesFileAndLine) {
  const std::string msg = message_of([&] {
    prep({R"({"text": "ok"})", "", R"({"text": "broken)"});
  });
  EXPECT_NE(msg.find((dir_ / "in.jsonl").string() + ":3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("JSON"), std::string::npos) << msg;
}

TEST_F(DatasetTest, MissingKeyNamesFileLineAndKey) {
  const std::string msg = message_of([&] {
    prep({R"({"prompt": "a", "completion": "b"})", R"({"prompt": "c"})"});
  });
  EXPECT_NE(msg.find("in.jsonl:2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"completion\""), std::string::npos) << msg;

  const std::string role = message_of([&] {
    prep({R"({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]})"});
  });
  EXPECT_NE(role.find("in.jsonl:1"), std::string::npos) << role;
  EXPECT_NE(role.find("message 1"), std::string::npos) << role;
}

TEST_F(DatasetTest, FailedPrepLeavesNoFileBehind) {
  EXPECT_THROW(prep({R"({"text": "a"})", "not json"}), UserError);
  EXPECT_FALSE(fs::exists(out_path()));
  EXPECT_FALSE(fs::exists(out_path() + ".tmp"));

  // An existing output survives a failed prep untouched.
  prep({R"({"text": "a"})"});
  const auto size = fs::file_size(out_path());
  EXPECT_THROW(prep({R"({"text": "a"})", R"({"txt": "b"})"}), UserError);
  EXPECT_EQ(fs::file_size(out_path()), size);
  EXPECT_EQ(open().n_records(), 1);
  EXPECT_FALSE(fs::exists(out_path() + ".tmp"));
}

TEST_F(DatasetTest, OutOfRangeTokenNamesFileAndRecord) {
  prep({R"({"text": "aa"})", R"({"text": "bb"})", R"({"text": "cc"})"});
  {  // Record 2 is tokens [8, 12): BOS c c END. Write a bad id over its second token.
    hid_t file = H5Fopen(out_path().c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    hid_t dset = H5Dopen2(file, "/input_ids", H5P_DEFAULT);
    hid_t space = H5Dget_space(dset);
    const hsize_t at = 9, one = 1;
    H5Sselect_hyperslab(space, H5S_SELECT_SET, &at, nullptr, &one, nullptr);
    hid_t mem = H5Screate_simple(1, &one, nullptr);
    const int32_t bad = 5000;
    ASSERT_GE(H5Dwrite(dset, H5T_NATIVE_INT32, mem, space, H5P_DEFAULT, &bad), 0);
    H5Sclose(mem);
    H5Sclose(space);
    H5Dclose(dset);
    H5Fclose(file);
  }
  const std::string msg = message_of([&] { open(); });
  EXPECT_NE(msg.find(out_path()), std::string::npos) << msg;
  EXPECT_NE(msg.find("record 2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("5000"), std::string::npos) << msg;
}

TEST_F(DatasetTest, VocabLargerThanModelIsRejected) {
  prep({R"({"text": "a"})"});
  const std::string msg = message_of([&] { open(/*vocab=*/200); });
  EXPECT_NE(msg.find(out_path()), std::string::npos) << msg;
  EXPECT_NE(msg.find("262"), std::string::npos) << msg;
  EXPECT_NE(msg.find("ranktune prep"), std::string::npos) << msg;
  EXPECT_EQ(open(/*vocab=*/512).n_records(), 1);  // a larger (padded) model vocab is fine
}

TEST_F(DatasetTest, MissingDatasetOrFileIsNamed) {
  prep({R"({"text": "a"})"});
  hid_t file = H5Fopen(out_path().c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(H5Ldelete(file, "/labels", H5P_DEFAULT), 0);
  H5Fclose(file);
  const std::string msg = message_of([&] { open(); });
  EXPECT_NE(msg.find("/labels"), std::string::npos) << msg;
  EXPECT_NE(msg.find("ranktune prep"), std::string::npos) << msg;

  const std::string none = message_of([&] { TokenDataset::open((dir_ / "nope.h5").string(), 9); });
  EXPECT_NE(none.find("nope.h5"), std::string::npos) << none;
  const std::string jsonl = write_jsonl("x.jsonl", {"{}"});
  const std::string not_h5 = message_of([&] { TokenDataset::open(jsonl, 9); });
  EXPECT_NE(not_h5.find("not an HDF5 file"), std::string::npos) << not_h5;
}

// ---- packing ------------------------------------------------------------------------------------

TEST_F(DatasetTest, PackingKeepsRecordsWholeWithDocIdsAndPositions) {
  // Record lengths (BOS + text + END): 5, 6, 4, 7, 3.
  PrepSummary s = prep({R"({"text": "abc"})", R"({"text": "defg"})", R"({"text": "hi"})",
                        R"({"text": "jklmn"})", R"({"text": "o"})"},
                       "text", 12, /*packing=*/true);
  EXPECT_EQ(s.n_rows, 3);  // [5+6], [4+7], [3]
  TokenDataset d = open();
  ASSERT_TRUE(d.packed());
  ASSERT_EQ(d.n_rows(), 3);
  EXPECT_EQ(d.row_record_begin(1), 2);
  EXPECT_EQ(d.row_record_end(1), 4);
  int64_t records = 0;
  for (int64_t r = 0; r < d.n_rows(); ++r) {
    EXPECT_LE(d.row_length(r), 12);
    records += d.row_record_end(r) - d.row_record_begin(r);
  }
  EXPECT_EQ(records, 5);

  const std::vector<int64_t> rows{1};
  Batch b = make_batch(d, rows, 1, 12);
  const std::vector<int32_t> ids = concat({{kBos}, bytes("hi"), {kEnd}, {kBos}, bytes("jklmn"),
                                           {kEnd}, {kPad}});
  EXPECT_EQ(b.input_ids, ids);
  EXPECT_EQ(b.doc_ids, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2}));
  EXPECT_EQ(b.positions, (std::vector<int32_t>{0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0}));
  // Targets never cross into the next record: the END of "hi" has no target.
  const std::vector<int32_t> targets = concat({bytes("hi"), {kEnd}, {kIgnoreIndex},
                                               bytes("jklmn"), {kEnd}, {kIgnoreIndex},
                                               {kIgnoreIndex}});
  EXPECT_EQ(b.targets, targets);
  EXPECT_EQ(b.n_target_tokens, 9);

  // Packed rows cannot be cut to a shorter training sequence.
  EXPECT_THROW(make_batch(d, rows, 1, 8), UserError);
}

TEST_F(DatasetTest, PackedPromptCompletionTargetsFollowLabels) {
  prep({R"({"prompt": "1+1=", "completion": "2"})", R"({"prompt": "2+2=", "completion": "4"})"},
       "auto", 32, /*packing=*/true);
  TokenDataset d = open();
  ASSERT_EQ(d.n_rows(), 1);
  const std::vector<int64_t> rows{0};
  Batch b = make_batch(d, rows, 1, 32);
  // Per record: BOS 1 + 1 = 2 END; targets are the completion "2" (predicted at '=') and END.
  std::vector<int32_t> expected(32, kIgnoreIndex);
  expected[4] = '2';
  expected[5] = kEnd;
  expected[7 + 4] = '4';
  expected[7 + 5] = kEnd;
  EXPECT_EQ(b.targets, expected);
  EXPECT_EQ(b.n_target_tokens, 4);
}

// ---- batches ------------------------------------------------------------------------------------

TEST_F(DatasetTest, UnpackedTargetsShiftAndPad) {
  prep({R"({"prompt": "ab", "completion": "cd"})", R"({"prompt": "x", "completion": "yz"})"},
       "prompt_completion");
  TokenDataset d = open();
  const std::vector<int64_t> rows{0};
  Batch b = make_batch(d, rows, 2, 8);  // second batch row is all padding
  ASSERT_EQ(b.input_ids.size(), 16u);
  EXPECT_TRUE(b.doc_ids.empty());
  EXPECT_EQ(std::vector<int32_t>(b.input_ids.begin(), b.input_ids.begin() + 8),
            concat({{kBos}, bytes("abcd"), {kEnd}, {kPad, kPad}}));
  EXPECT_EQ(std::vector<int32_t>(b.targets.begin(), b.targets.begin() + 8),
            concat({ignored(2), bytes("cd"), {kEnd}, ignored(3)}));
  EXPECT_EQ(std::vector<int32_t>(b.positions.begin(), b.positions.begin() + 8),
            (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(std::vector<int32_t>(b.targets.begin() + 8, b.targets.end()), ignored(8));
  EXPECT_EQ(b.rows, (std::vector<int64_t>{0, -1}));
  EXPECT_EQ(b.n_target_tokens, 3);

  // Cut to 4 tokens: the last kept position has no target.
  Batch cut = make_batch(d, rows, 1, 4);
  EXPECT_EQ(cut.input_ids, concat({{kBos}, bytes("abc")}));
  EXPECT_EQ(cut.targets, concat({ignored(2), bytes("c"), ignored(1)}));
}

TEST_F(DatasetTest, PermutationIsFixedAcrossPlatforms) {
  // Same values from a Python transcription of splitmix64 + Fisher-Yates (see dataset.cpp).
  EXPECT_EQ(seeded_permutation(10, 1234, 0),
            (std::vector<int64_t>{4, 3, 0, 1, 6, 5, 7, 8, 9, 2}));
  EXPECT_EQ(seeded_permutation(10, 1234, 1),
            (std::vector<int64_t>{5, 3, 6, 1, 4, 2, 7, 8, 9, 0}));
  EXPECT_EQ(seeded_permutation(10, 42, 0), (std::vector<int64_t>{7, 2, 1, 9, 5, 4, 0, 6, 8, 3}));
  EXPECT_TRUE(seeded_permutation(0, 1, 0).empty());
}

TEST_F(DatasetTest, LoaderOrderIsSeededAndReshuffledEachEpoch) {
  prep(text_records(23));
  TokenDataset d = open();
  auto epoch_rows = [&](uint64_t seed, int epochs) {
    DataLoader loader(d, d.all_rows(), 4, 16, seed, 0, 1);
    EXPECT_EQ(loader.steps_per_epoch(), 5);  // 23 rows / 4: the last 3 are dropped each epoch
    std::vector<std::vector<int64_t>> out(epochs);
    for (int e = 0; e < epochs; ++e)
      for (int s = 0; s < 5; ++s) {
        Batch b = loader.next();
        EXPECT_EQ(b.epoch, e);
        EXPECT_EQ(b.step_in_epoch, s);
        out[e].insert(out[e].end(), b.rows.begin(), b.rows.end());
      }
    return out;
  };
  const auto a = epoch_rows(7, 3), again = epoch_rows(7, 3), other = epoch_rows(8, 1);
  EXPECT_EQ(a, again);
  EXPECT_NE(a[0], a[1]);
  EXPECT_NE(a[1], a[2]);
  EXPECT_NE(a[0], other[0]);
  for (const auto& rows : a) {
    EXPECT_EQ(std::set<int64_t>(rows.begin(), rows.end()).size(), 20u);  // no repeats in an epoch
  }
}

TEST_F(DatasetTest, RanksGetDisjointSlicesOfTheGlobalBatch) {
  prep(text_records(31));
  TokenDataset d = open();
  const RowSplit split = d.split(0.1, 3);
  DataLoader single(d, split.train, 6, 16, 11, 0, 1);
  std::vector<DataLoader> ranks;
  for (int r = 0; r < 3; ++r) ranks.emplace_back(d, split.train, 2, 16, 11, r, 3);
  EXPECT_EQ(single.steps_per_epoch(), ranks[0].steps_per_epoch());
  for (int step = 0; step < 2 * single.steps_per_epoch() + 1; ++step) {
    Batch global = single.next();
    std::vector<int64_t> joined;
    std::vector<int32_t> joined_ids, joined_targets;
    int64_t tokens = 0;
    for (auto& loader : ranks) {
      Batch b = loader.next();
      joined.insert(joined.end(), b.rows.begin(), b.rows.end());
      joined_ids.insert(joined_ids.end(), b.input_ids.begin(), b.input_ids.end());
      joined_targets.insert(joined_targets.end(), b.targets.begin(), b.targets.end());
      tokens += b.n_target_tokens;
    }
    EXPECT_EQ(joined, global.rows) << "step " << step;
    EXPECT_EQ(std::set<int64_t>(joined.begin(), joined.end()).size(), joined.size());
    EXPECT_EQ(joined_ids, global.input_ids);
    EXPECT_EQ(joined_targets, global.targets);
    EXPECT_EQ(tokens, global.n_target_tokens);
  }
}

TEST_F(DatasetTest, RestoreResumesExactly) {
  prep(text_records(17));
  TokenDataset d = open();
  DataLoader a(d, d.all_rows(), 3, 16, 5, 0, 1);
  for (int i = 0; i < 7; ++i) a.next();  // into the second epoch (5 steps per epoch)
  const DataLoaderState saved = a.state();
  EXPECT_EQ(saved.epoch, 1);
  std::vector<std::vector<int64_t>> expected;
  for (int i = 0; i < 6; ++i) expected.push_back(a.next().rows);

  DataLoader b(d, d.all_rows(), 3, 16, 5, 0, 1);
  b.restore(saved);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(b.next().rows, expected[i]) << i;

  // The same position read by 3 ranks of batch 1.
  std::vector<DataLoader> ranks;
  for (int r = 0; r < 3; ++r) {
    ranks.emplace_back(d, d.all_rows(), 1, 16, 5, r, 3);
    ranks.back().restore(saved);
  }
  for (int i = 0; i < 6; ++i) {
    std::vector<int64_t> joined;
    for (auto& loader : ranks) joined.push_back(loader.next().rows[0]);
    EXPECT_EQ(joined, expected[i]) << i;
  }

  DataLoader other_seed(d, d.all_rows(), 3, 16, 6, 0, 1);
  EXPECT_THROW(other_seed.restore(saved), UserError);
}

TEST_F(DatasetTest, PeekCountsTheNextBatchesTargets) {
  prep(text_records(13, 1, 9), "text", 6);
  TokenDataset d = open();
  DataLoader loader(d, d.all_rows(), 2, 6, 9, 1, 2);  // 3 steps per epoch: peeks cross epochs
  for (int step = 0; step < 5; ++step) {
    const int64_t peeked = loader.peek_target_tokens(4);
    const DataLoaderState before = loader.state();
    int64_t taken = 0;
    for (int k = 0; k < 4; ++k) taken += loader.next().n_target_tokens;
    EXPECT_EQ(peeked, taken) << step;
    loader.restore(before);
    loader.next();
  }
}

TEST_F(DatasetTest, SplitIsDeterministicAndDisjoint) {
  prep(text_records(50));
  TokenDataset d = open();
  const RowSplit a = d.split(0.1, 1), b = d.split(0.1, 1), c = d.split(0.1, 2);
  EXPECT_EQ(a.eval, b.eval);
  EXPECT_NE(a.eval, c.eval);
  EXPECT_EQ(a.eval.size(), 5u);
  EXPECT_EQ(a.train.size(), 45u);
  std::set<int64_t> all(a.train.begin(), a.train.end());
  all.insert(a.eval.begin(), a.eval.end());
  EXPECT_EQ(all.size(), 50u);
  EXPECT_EQ(d.split(0.001, 1).eval.size(), 1u);
  EXPECT_THROW(d.split(1.0, 1), UserError);
  EXPECT_THROW(DataLoader(d, a.eval, 6, 16, 1, 0, 1), UserError);  // fewer rows than a batch
}

TEST_F(DatasetTest, EvalGroupsCoverEveryRowOnceInLockstep) {
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < 11; ++i) rows.push_back(100 + i);
  std::vector<int64_t> seen;
  size_t n_groups = 0;
  for (int r = 0; r < 3; ++r) {
    auto groups = eval_row_groups(rows, 2, r, 3);
    if (r == 0) n_groups = groups.size();
    EXPECT_EQ(groups.size(), n_groups);  // 4 rows on ranks 0,1 -> 2 groups; rank 2 too
    for (const auto& g : groups) {
      EXPECT_LE(g.size(), 2u);
      seen.insert(seen.end(), g.begin(), g.end());
    }
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, rows);
}

// ---- the committed quickstart data --------------------------------------------------------------

TEST_F(DatasetTest, QuickstartDataIsHeldOutAndPreps) {
  const fs::path dir = fs::path(RANKTUNE_SOURCE_DIR) / "jobs/data/quickstart";
  auto prompts = [](const fs::path& path) {
    std::set<std::string> out;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) out.insert(line.substr(0, line.find(',')));
    return out;
  };
  const std::set<std::string> train = prompts(dir / "train.jsonl");
  const std::set<std::string> eval = prompts(dir / "eval.jsonl");
  EXPECT_EQ(eval.size(), 500u);
  for (const auto& p : eval) EXPECT_EQ(train.count(p), 0u) << p;

  PrepSummary s = prep_dataset(PrepOptions{.input_path = (dir / "train.jsonl").string(),
                                           .output_path = out_path(),
                                           .tokenizer = *tok_,
                                           .max_seq_length = 32});
  EXPECT_EQ(s.format, "prompt_completion");
  EXPECT_EQ(s.n_records, static_cast<int64_t>(train.size()));
  EXPECT_EQ(s.n_truncated, 0);
  EXPECT_EQ(s.n_untrained, 0);
}

}  // namespace

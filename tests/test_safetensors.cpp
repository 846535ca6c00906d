// The safetensors reader/writer and the HF checkpoint lookup: round trips, every class of corrupt
// file (each a UserError naming the file), shards, and the Python-written fixtures.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "ranktune/error.h"
#include "ranktune/safetensors.h"
#include "ranktune/tensor.h"

namespace fs = std::filesystem;
using namespace ranktune;

namespace {

// A fresh directory per test, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "ranktune_st_XXXXXX").string();
    RT_ASSERT(::mkdtemp(pattern.data()) != nullptr, "mkdtemp");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// A file of an arbitrary header and data, for building corrupt files.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes,
               uint64_t header_len_override = 0) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header_len_override ? header_len_override : header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  const std::vector<char> data(data_bytes, 1);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

// Runs `fn`, expects a UserError, and returns its message.
template <class Fn>
std::string user_error(Fn&& fn) {
  try {
    fn();
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return "";
}

#define EXPECT_HAS(haystack, needle) EXPECT_NE((haystack).find(needle), std::string::npos) << (haystack)

std::string corrupt_error(const TempDir& dir, const std::string& header, size_t data_bytes,
                          uint64_t header_len_override = 0) {
  const std::string path = dir.file("bad.safetensors");
  write_raw(path, header, data_bytes, header_len_override);
  const std::string msg = user_error([&] { SafetensorsFile f(path); });
  EXPECT_HAS(msg, path);
  return msg;
}

}  // namespace

TEST(SafetensorsRoundTrip, AllWriterDtypesAndMetadata) {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  const std::vector<float> f32 = {1.5f, -2.0f, 0.0f, 3.25f, 1e-30f, -7.0f};
  std::vector<uint16_t> bf16;
  for (float x : {1.0f, -0.5f, 3.140625f, 65504.0f}) bf16.push_back(f32_to_bf16(x));
  const std::vector<int32_t> i32 = {0, -1, 2147483647};
  const std::vector<int64_t> i64 = {5, -100, 7, 123456};
  const float scalar = 42.0f;

  SafetensorsWriter w;
  w.add_f32("a.weight", {2, 3}, f32);
  w.add_bf16("b", {4}, bf16);
  w.add_i32("ids", {3}, i32);
  w.add_i64("labels", {2, 2}, i64);
  w.add_f32("loss", {}, std::span<const float>(&scalar, 1));
  w.add_f32("empty", {0, 5}, {});
  w.set_metadata("format", "pt");
  w.set_metadata("note", "ranktune test");
  w.write(path);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.names().size(), 6u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "ranktune test");

  EXPECT_EQ(f.info("a.weight").dtype, StDType::f32);
  EXPECT_EQ(f.info("a.weight").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f.read_f32("a.weight"), f32);

  EXPECT_EQ(f.info("b").dtype, StDType::bf16);
  EXPECT_EQ(f.read_bf16("b"), bf16);
  const std::vector<float> b = f.read_f32("b");
  ASSERT_EQ(b.size(), 4u);
  EXPECT_EQ(b[0], 1.0f);
  EXPECT_EQ(b[1], -0.5f);
  EXPECT_EQ(b[2], 3.140625f);
  EXPECT_EQ(b[3], bf16_to_f32(f32_to_bf16(65504.0f)));

  EXPECT_EQ(f.read_i32("ids"), i32);
  EXPECT_EQ(f.info("labels").dtype, StDType::i64);
  EXPECT_EQ(f.read_i32("labels"), (std::vector<int32_t>{5, -100, 7, 123456}));

  EXPECT_TRUE(f.info("loss").shape.empty());
  EXPECT_EQ(f.info("loss").numel(), 1);
  EXPECT_EQ(f.read_f32("loss"), std::vector<float>{42.0f});
  EXPECT_EQ(f.info("empty").numel(), 0);
  EXPECT_TRUE(f.read_f32("empty").empty());

  // f32 read as bf16 rounds to nearest even.
  const std::vector<uint16_t> a_bf16 = f.read_bf16("a.weight");
  for (size_t i = 0; i < f32.size(); ++i) EXPECT_EQ(a_bf16[i], f32_to_bf16(f32[i]));

  // The data section starts 8-byte aligned, as the reference writer pads it.
  uint64_t header_len = 0;
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(&header_len), 8);
  EXPECT_EQ(header_len % 8, 0u);
}

TEST(SafetensorsRoundTrip, OverwritesAtomically) {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  const std::vector<float> one = {1.0f}, two = {2.0f, 3.0f};
  SafetensorsWriter w1;
  w1.add_f32("x", {1}, one);
  w1.write(path);
  SafetensorsWriter w2;
  w2.add_f32("x", {2}, two);
  w2.write(path);
  EXPECT_EQ(SafetensorsFile(path).read_f32("x"), two);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(SafetensorsRoundTrip, BorrowedF16AndConversions) {
  TempDir dir;
  const std::string path = dir.file("h.safetensors");
  const std::vector<float> values = {0.0f,
                                     -0.0f,
                                     1.0f,
                                     -2.5f,
                                     65504.0f,
                                     6.103515625e-05f /* min normal */,
                                     5.960464477539063e-08f /* min subnormal */,
                                     0.333251953125f,
                                     std::numeric_limits<float>::infinity()};
  std::vector<uint16_t> halves;
  for (float v : values) halves.push_back(f32_to_f16(v));
  SafetensorsWriter w;
  w.add_borrowed("h", StDType::f16, {static_cast<int64_t>(halves.size())}, halves.data(), halves.size() * 2);
  w.write(path);
  SafetensorsFile f(path);
  EXPECT_EQ(f.info("h").dtype, StDType::f16);
  const std::vector<float> back = f.read_f32("h");
  ASSERT_EQ(back.size(), values.size());
  for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(back[i], values[i]) << i;
  EXPECT_TRUE(std::signbit(back[1]));
}

TEST(SafetensorsRoundTrip, HalfConversionIsExactForEveryHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float x = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(x))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(x), h) << "half 0x" << std::hex << h;
  }
  // Ties round to even; overflow goes to inf.
  EXPECT_EQ(f32_to_f16(1.0f + 1.0f / 2048.0f), f32_to_f16(1.0f));
  EXPECT_EQ(f32_to_f16(1.0f + 3.0f / 2048.0f), f32_to_f16(1.0f + 2.0f / 1024.0f));
  EXPECT_EQ(f32_to_f16(70000.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(1e-9f), 0);
}

TEST(SafetensorsErrors, TooShort) {
  TempDir dir;
  const std::string path = dir.file("short.safetensors");
  std::ofstream(path) << "abc";
  const std::string msg = user_error([&] { SafetensorsFile f(path); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "too short");
}

TEST(SafetensorsErrors, MissingFile) {
  TempDir dir;
  const std::string path = dir.file("nope.safetensors");
  const std::string msg = user_error([&] { SafetensorsFile f(path); });
  EXPECT_HAS(msg, path);
}

TEST(SafetensorsErrors, HeaderLengthBeyondFile) {
  TempDir dir;
  const std::string msg = corrupt_error(dir, "{}", 0, 1000);
  EXPECT_HAS(msg, "header length");
  corrupt_error(dir, "{}", 0, uint64_t{1} << 62);
}

TEST(SafetensorsErrors, MalformedJson) {
  TempDir dir;
  EXPECT_HAS(corrupt_error(dir, R"({"a": {"dtype": "F32", )", 0), "not valid JSON");
  EXPECT_HAS(corrupt_error(dir, "[1, 2]", 0), "JSON object");
  EXPECT_HAS(corrupt_error(dir, R"({"a": 5})", 0), "'a'");
}

TEST(SafetensorsErrors, OffsetsOutOfRange) {
  TempDir dir;
  const std::string msg = corrupt_error(dir, R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 12);
  EXPECT_HAS(msg, "'w'");
  EXPECT_HAS(msg, "outside");
  EXPECT_HAS(corrupt_error(dir, R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", 12), "'w'");
  EXPECT_HAS(corrupt_error(dir, R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 12), "data_offsets");
  EXPECT_HAS(corrupt_error(dir, R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 12),
             "data_offsets");
}

TEST(SafetensorsErrors, Overlapping) {
  TempDir dir;
  const std::string msg = corrupt_error(dir,
                                        R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                        12);
  EXPECT_HAS(msg, "overlap");
  EXPECT_HAS(msg, "'a'");
  EXPECT_HAS(msg, "'b'");
}

TEST(SafetensorsErrors, SizeDisagreesWithShape) {
  TempDir dir;
  const std::string msg =
      corrupt_error(dir, R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}})", 16);
  EXPECT_HAS(msg, "'w'");
  EXPECT_HAS(msg, "[2, 3]");
  EXPECT_HAS(msg, "12 bytes");
  // A shape whose element count overflows.
  corrupt_error(dir, R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", 16);
}

TEST(SafetensorsErrors, UnknownDtype) {
  TempDir dir;
  const std::string msg = corrupt_error(dir, R"({"w": {"dtype": "F4_E2M1", "shape": [2], "data_offsets": [0, 1]}})", 8);
  EXPECT_HAS(msg, "'w'");
  EXPECT_HAS(msg, "F4_E2M1");
}

TEST(SafetensorsErrors, BadShapeAndEntries) {
  TempDir dir;
  EXPECT_HAS(corrupt_error(dir, R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 8), "shape");
  EXPECT_HAS(corrupt_error(dir, R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 8), "shape");
  EXPECT_HAS(corrupt_error(dir, R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 8), "'w'");
  EXPECT_HAS(corrupt_error(dir, R"({"w": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}})", 8), "dtype");
}

TEST(SafetensorsErrors, DuplicateNameAndBadMetadata) {
  TempDir dir;
  EXPECT_HAS(corrupt_error(dir,
                           R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                               "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                           8),
             "twice");
  EXPECT_HAS(corrupt_error(dir, R"({"__metadata__": {"step": 5}})", 0), "__metadata__");
}

TEST(SafetensorsErrors, AccessErrorsNameFileAndTensor) {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  const std::vector<int32_t> ids = {1, 2};
  const std::vector<int64_t> big = {int64_t{1} << 40};
  const std::vector<float> w = {1.0f, 2.0f};
  SafetensorsWriter writer;
  writer.add_i32("ids", {2}, ids);
  writer.add_i64("big", {1}, big);
  writer.add_f32("w", {2}, w);
  writer.write(path);
  SafetensorsFile f(path);

  std::string msg = user_error([&] { f.info("missing"); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "'missing'");
  msg = user_error([&] { f.read_f32("ids"); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "'ids'");
  msg = user_error([&] { f.read_i32("w"); });
  EXPECT_HAS(msg, "'w'");
  msg = user_error([&] { f.read_i32("big"); });
  EXPECT_HAS(msg, "int32");
  msg = user_error([&] { f.expect_shape("w", {2, 1}); });
  EXPECT_HAS(msg, "[2]");
  EXPECT_HAS(msg, "[2, 1]");
  f.expect_shape("w", {2});
}

TEST(SafetensorsErrors, WriteToMissingDirectory) {
  TempDir dir;
  const std::string path = dir.file("no/such/dir/t.safetensors");
  SafetensorsWriter w;
  const std::vector<float> x = {1.0f};
  w.add_f32("x", {1}, x);
  EXPECT_HAS(user_error([&] { w.write(path); }), path);
}

TEST(SafetensorsFileMove, MovedFileStillReads) {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  const std::vector<float> x = {1.0f, 2.0f};
  SafetensorsWriter w;
  w.add_f32("x", {2}, x);
  w.write(path);
  std::vector<SafetensorsFile> files;
  for (int i = 0; i < 5; ++i) files.emplace_back(path);  // reallocation moves them
  SafetensorsFile moved = std::move(files[2]);
  EXPECT_EQ(moved.read_f32("x"), x);
  EXPECT_EQ(files[4].read_f32("x"), x);
}

// ---- HF checkpoint directories --------------------------------------------------------------------

namespace {
void write_one(const std::string& path, const std::string& name, std::vector<float> values) {
  SafetensorsWriter w;
  w.add_f32(name, {static_cast<int64_t>(values.size())}, values);
  w.write(path);
}
}  // namespace

TEST(SafetensorsCheckpoint, SingleFile) {
  TempDir dir;
  write_one(dir.file("model.safetensors"), "model.norm.weight", {1.0f, 2.0f});
  HfCheckpoint ckpt(dir.path().string());
  EXPECT_FALSE(ckpt.sharded());
  EXPECT_EQ(ckpt.names(), std::vector<std::string>{"model.norm.weight"});
  EXPECT_EQ(ckpt.read_f32("model.norm.weight"), (std::vector<float>{1.0f, 2.0f}));
  const std::string msg = user_error([&] { ckpt.info("lm_head.weight"); });
  EXPECT_HAS(msg, "lm_head.weight");
  EXPECT_HAS(msg, dir.file("model.safetensors"));
}

TEST(SafetensorsCheckpoint, ShardedIndex) {
  TempDir dir;
  {
    SafetensorsWriter w;
    const std::vector<float> a = {1.0f}, b = {2.0f, 3.0f};
    w.add_f32("a", {1}, a);
    w.add_f32("b", {2}, b);
    w.write(dir.file("model-00001-of-00002.safetensors"));
  }
  write_one(dir.file("model-00002-of-00002.safetensors"), "c", {4.0f, 5.0f, 6.0f});
  std::ofstream(dir.file("model.safetensors.index.json")) << R"({"metadata": {"total_size": 24},
      "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                     "c": "model-00002-of-00002.safetensors"}})";
  HfCheckpoint ckpt(dir.path().string());
  EXPECT_TRUE(ckpt.sharded());
  EXPECT_EQ(ckpt.n_files(), 2u);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(ckpt.read_f32("c"), (std::vector<float>{4.0f, 5.0f, 6.0f}));
  EXPECT_EQ(ckpt.read_f32("b"), (std::vector<float>{2.0f, 3.0f}));
  EXPECT_EQ(ckpt.file_of("c").path(), dir.file("model-00002-of-00002.safetensors"));
  ckpt.expect_shape("c", {3});
}

TEST(SafetensorsCheckpoint, BrokenIndexes) {
  TempDir dir;
  const std::string index = dir.file("model.safetensors.index.json");
  write_one(dir.file("s1.safetensors"), "a", {1.0f});

  std::ofstream(index) << R"({"weight_map": {"a": "s1.safetensors", "z": "s2.safetensors"}})";
  std::string msg = user_error([&] { HfCheckpoint c(dir.path().string()); });
  EXPECT_HAS(msg, index);
  EXPECT_HAS(msg, "s2.safetensors");

  std::ofstream(index) << R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})";
  msg = user_error([&] { HfCheckpoint c(dir.path().string()); });
  EXPECT_HAS(msg, "'b'");
  EXPECT_HAS(msg, "s1.safetensors");

  std::ofstream(index) << R"({"weight_map": {"a": "../s1.safetensors"}})";
  EXPECT_HAS(user_error([&] { HfCheckpoint c(dir.path().string()); }), "outside");

  std::ofstream(index) << R"({"weights": {}})";
  EXPECT_HAS(user_error([&] { HfCheckpoint c(dir.path().string()); }), "weight_map");

  std::ofstream(index) << "{not json";
  EXPECT_HAS(user_error([&] { HfCheckpoint c(dir.path().string()); }), index);
}

TEST(SafetensorsCheckpoint, NoWeights) {
  TempDir dir;
  std::string msg = user_error([&] { HfCheckpoint c(dir.path().string()); });
  EXPECT_HAS(msg, dir.path().string());
  EXPECT_HAS(msg, "model.safetensors");
  std::ofstream(dir.file("pytorch_model.bin")) << "x";
  EXPECT_HAS(user_error([&] { HfCheckpoint c(dir.path().string()); }), "safe_serialization");
  EXPECT_HAS(user_error([&] { HfCheckpoint c(dir.file("missing_dir")); }), "missing_dir");
}

TEST(SafetensorsCheckpoint, AdapterStem) {
  TempDir dir;
  write_one(dir.file("adapter_model.safetensors"), "base_model.model.x.lora_A.weight", {1.0f});
  HfCheckpoint ckpt(dir.path().string(), "adapter_model");
  EXPECT_TRUE(ckpt.contains("base_model.model.x.lora_A.weight"));
}

// ---- files written by Python's safetensors (tools/make_fixtures.py) ------------------------------

TEST(SafetensorsFixtures, PythonWrittenFilesRead) {
  const fs::path root = fs::path(RANKTUNE_FIXTURES) / "hf";
  if (!fs::is_directory(root)) GTEST_SKIP() << "no fixtures in " << root;
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (!fs::exists(entry.path() / "expected.safetensors")) continue;
    ++cases;
    SafetensorsFile expected((entry.path() / "expected.safetensors").string());
    EXPECT_EQ(expected.info("loss").shape, std::vector<int64_t>{1});
    const std::vector<float> loss = expected.read_f32("loss");
    EXPECT_TRUE(std::isfinite(loss[0]) && loss[0] > 0.0f) << entry.path();
    EXPECT_HAS(expected.metadata().at("fixture"), "\"case\": \"" + entry.path().filename().string() + "\"");
    SafetensorsFile inputs((entry.path() / "inputs.safetensors").string());
    EXPECT_EQ(inputs.info("input_ids").dtype, StDType::i32);
    EXPECT_EQ(inputs.info("labels").shape, inputs.info("input_ids").shape);
    const std::vector<int32_t> labels = inputs.read_i32("labels");
    EXPECT_NE(std::count(labels.begin(), labels.end(), -100), 0) << entry.path();
    EXPECT_EQ(expected.info("logits").shape.size(), 3u);
  }
  EXPECT_GT(cases, 0);
}

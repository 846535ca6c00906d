// Reading and writing the safetensors format, and finding tensors across an HF model directory's
// shards.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
// {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
// and then the data, each tensor's bytes at [begin, end) counted from the end of the header.
// Every problem with a file (truncated, bad JSON, offsets that overlap or disagree with the shape,
// a dtype we don't know) is a UserError naming the file and, where there is one, the tensor.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ranktune/error.h"

namespace ranktune {

// The element types of the safetensors format.
enum class StDType : uint8_t { boolean, u8, i8, i16, u16, f16, bf16, i32, u32, f32, f64, i64, u64, f8_e4m3, f8_e5m2 };

const char* st_dtype_name(StDType t);  // "F32", "BF16", ...
size_t st_dtype_size(StDType t);       // bytes per element

struct StTensorInfo {
  std::string name;
  StDType dtype = StDType::f32;
  std::vector<int64_t> shape;  // [] for a scalar (one element)
  uint64_t begin = 0;          // byte range in the data section
  uint64_t end = 0;

  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
  std::string shape_str() const;  // "[2, 3]"
};

// A memory-mapped safetensors file, validated on open. Move-only.
class SafetensorsFile {
 public:
  // Maps and validates the file; UserError naming the file on any problem.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensor names in the order of their data in the file.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // UserError naming the file and the tensor when it is absent.
  const StTensorInfo& info(const std::string& name) const;
  // The "__metadata__" entries (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The tensor's raw little-endian bytes (valid while this object lives).
  std::span<const std::byte> bytes(const std::string& name) const;

  // UserError "tensor X in FILE has shape [..], expected [..]" unless the shapes agree.
  void expect_shape(const std::string& name, const std::vector<int64_t>& shape) const;

  // F32, F16, BF16 or F64 converted to float; UserError for any other dtype.
  std::vector<float> read_f32(const std::string& name) const;
  // The same into caller memory of exactly info(name).numel() floats.
  void read_f32_into(const std::string& name, std::span<float> out) const;
  // F32/F16/BF16/F64 as bf16 bits (round to nearest even from wider types).
  std::vector<uint16_t> read_bf16(const std::string& name) const;
  // I32, I64, I16, I8, U8, U16, U32 or U64 as int32; UserError for float dtypes and for values
  // outside the int32 range.
  std::vector<int32_t> read_i32(const std::string& name) const;

 private:
  const StTensorInfo& checked_info(const std::string& name) const;
  void unmap();

  std::string path_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0;
  const std::byte* data_ = nullptr;  // start of the data section
  std::vector<std::string> names_;
  std::map<std::string, StTensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Collects named tensors and writes one safetensors file atomically ("<path>.tmp", fsync, rename).
// The add_* calls copy the data; add_borrowed keeps a pointer that must stay valid until write().
// A duplicate name or data whose size disagrees with the shape is a programming error (assert).
class SafetensorsWriter {
 public:
  void add_f32(const std::string& name, std::vector<int64_t> shape, std::span<const float> data);
  void add_bf16(const std::string& name, std::vector<int64_t> shape, std::span<const uint16_t> data);
  void add_i32(const std::string& name, std::vector<int64_t> shape, std::span<const int32_t> data);
  void add_i64(const std::string& name, std::vector<int64_t> shape, std::span<const int64_t> data);
  void add_borrowed(const std::string& name, StDType dtype, std::vector<int64_t> shape, const void* data,
                    size_t nbytes);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  size_t size() const { return entries_.size(); }

  // Writes the file; UserError naming the path when the file system refuses.
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    StDType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> owned;
    const std::byte* data;
    size_t nbytes;
  };
  void add_copy(const std::string& name, StDType dtype, std::vector<int64_t> shape, const void* data, size_t nbytes);
  void check_new(const std::string& name, StDType dtype, const std::vector<int64_t>& shape, size_t nbytes) const;
  std::vector<std::unique_ptr<Entry>> entries_;
  std::map<std::string, std::string> metadata_;
};

// IEEE half <-> float (round to nearest even).
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float x);

// Writes `content` to `path` atomically: "<path>.tmp", fsync, rename, fsync of the directory.
// UserError naming the path when the file system refuses.
void write_file_atomic(const std::string& path, std::span<const std::byte> content);
void write_file_atomic(const std::string& path, const std::string& content);

// The tensors of an HF model directory: either one "<stem>.safetensors" or the shards listed by
// "<stem>.safetensors.index.json" ({"weight_map": {tensor name: shard file}}). stem is "model" for
// base models and "adapter_model" for PEFT adapters. Lookups by name find the right shard.
class HfCheckpoint {
 public:
  explicit HfCheckpoint(const std::string& model_dir, const std::string& stem = "model");

  const std::string& dir() const { return dir_; }
  // The file that was found: "<dir>/model.safetensors" or "<dir>/model.safetensors.index.json".
  const std::string& source() const { return source_; }
  bool sharded() const { return sharded_; }
  size_t n_files() const { return files_.size(); }
  // All tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  // The shard holding the tensor; UserError naming the checkpoint and the tensor when absent.
  const SafetensorsFile& file_of(const std::string& name) const;
  const StTensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  std::vector<float> read_f32(const std::string& name) const { return file_of(name).read_f32(name); }
  void read_f32_into(const std::string& name, std::span<float> out) const { file_of(name).read_f32_into(name, out); }
  std::vector<uint16_t> read_bf16(const std::string& name) const { return file_of(name).read_bf16(name); }
  std::vector<int32_t> read_i32(const std::string& name) const { return file_of(name).read_i32(name); }
  void expect_shape(const std::string& name, const std::vector<int64_t>& shape) const {
    file_of(name).expect_shape(name, shape);
  }

 private:
  std::string dir_;
  std::string source_;
  bool sharded_ = false;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

}  // namespace ranktune

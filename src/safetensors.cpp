#include "ranktune/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

#include "ranktune/error.h"
#include "ranktune/tensor.h"

namespace ranktune {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; ranktune reads it in place on little-endian hosts");

namespace {

using json = nlohmann::json;

// The reference implementation refuses larger headers; so do we (a corrupt length would
// otherwise make us parse the whole file as JSON).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeName {
  StDType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeName kDTypes[] = {
    {StDType::boolean, "BOOL", 1}, {StDType::u8, "U8", 1},           {StDType::i8, "I8", 1},
    {StDType::i16, "I16", 2},      {StDType::u16, "U16", 2},         {StDType::f16, "F16", 2},
    {StDType::bf16, "BF16", 2},    {StDType::i32, "I32", 4},         {StDType::u32, "U32", 4},
    {StDType::f32, "F32", 4},      {StDType::f64, "F64", 8},         {StDType::i64, "I64", 8},
    {StDType::u64, "U64", 8},      {StDType::f8_e4m3, "F8_E4M3", 1}, {StDType::f8_e5m2, "F8_E5M2", 1},
};

bool parse_dtype(const std::string& s, StDType* out) {
  for (const DTypeName& d : kDTypes) {
    if (s == d.name) {
      *out = d.dtype;
      return true;
    }
  }
  return false;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Elements of a shape, or -1 when the product overflows int64.
int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return -1;
  }
  return n;
}

template <class T>
T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::string errno_text() { return std::strerror(errno); }

// A file written under "<path>.tmp" and renamed over `path` on commit(); removed if never committed.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    RT_REQUIRE(fd_ >= 0,
               "cannot create " + tmp_ + ": " + errno_text() + " (check that the directory exists and is writable)");
  }
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, std::min<size_t>(n, size_t{1} << 30));
      if (w < 0 && errno == EINTR) continue;
      RT_REQUIRE(w > 0, "cannot write " + tmp_ + ": " + errno_text() + " (is the disk full?)");
      p += w;
      n -= static_cast<size_t>(w);
    }
  }

  void commit() {
    RT_REQUIRE(::fsync(fd_) == 0, "cannot flush " + tmp_ + " to disk: " + errno_text());
    const int rc = ::close(fd_);
    fd_ = -1;
    RT_REQUIRE(rc == 0, "cannot close " + tmp_ + ": " + errno_text());
    RT_REQUIRE(::rename(tmp_.c_str(), path_.c_str()) == 0,
               "cannot rename " + tmp_ + " to " + path_ + ": " + errno_text());
    committed_ = true;
    // Make the rename itself durable; a failure here leaves a complete file, so it is not an error.
    std::string dir = std::filesystem::path(path_).parent_path().string();
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

// ---- dtypes and conversions -------------------------------------------------------------------

const char* st_dtype_name(StDType t) {
  for (const DTypeName& d : kDTypes)
    if (d.dtype == t) return d.name;
  return "?";
}

size_t st_dtype_size(StDType t) {
  for (const DTypeName& d : kDTypes)
    if (d.dtype == t) return d.size;
  return 0;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

uint16_t f32_to_f16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan (keep nan quiet)
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {               // below the smallest normal half (2^-14): subnormal or zero
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24 for exp in [102, 112]
    const uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    const uint32_t rounded = half + ((rem > mid || (rem == mid && (half & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | rounded);
  }
  // Normal: rebias the exponent, round the mantissa to 10 bits (nearest even); a carry rolls into
  // the exponent, which is what we want.
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

// ---- StTensorInfo -------------------------------------------------------------------------------

int64_t StTensorInfo::numel() const { return checked_numel(shape); }

std::string StTensorInfo::shape_str() const { return shape_string(shape); }

// ---- SafetensorsFile ----------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const std::string where = "safetensors file " + path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  RT_REQUIRE(fd >= 0, "cannot open " + where + ": " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw UserError(where + " is not a regular file");
  }
  const auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    throw UserError(where + " is " + std::to_string(file_size) +
                    " bytes long, too short for the 8-byte header length; the file is truncated or not "
                    "a safetensors file");
  }
  void* p = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  RT_REQUIRE(p != MAP_FAILED, "cannot map " + where + ": " + std::strerror(map_errno));
  map_ = static_cast<const std::byte*>(p);
  map_size_ = file_size;

  try {
    const uint64_t header_len = load<uint64_t>(map_);
    RT_REQUIRE(header_len <= kMaxHeaderBytes && header_len <= file_size - 8,
               where + ": the header length field says " + std::to_string(header_len) +
                   " bytes but the file has only " + std::to_string(file_size - 8) +
                   " after it; the file is truncated or not a safetensors file");
    const uint64_t data_size = file_size - 8 - header_len;
    data_ = map_ + 8 + header_len;

    // Parse, refusing duplicate top-level names (JSON parsers disagree about which one wins).
    std::set<std::string> seen;
    std::string duplicate;
    json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
      if (event == json::parse_event_t::key && depth == 1 && parsed.is_string()) {
        const std::string key = parsed.get<std::string>();
        if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
      }
      return true;
    };
    const char* text = reinterpret_cast<const char*>(map_ + 8);
    json header;
    try {
      header = json::parse(text, text + header_len, on_event);
    } catch (const json::parse_error& e) {
      throw UserError(where + ": the header is not valid JSON (" + e.what() +
                      "); the file is corrupt or not a safetensors file");
    }
    RT_REQUIRE(header.is_object(), where + ": the header must be a JSON object of tensors");
    RT_REQUIRE(duplicate.empty(), where + ": the header names tensor '" + duplicate + "' twice");

    std::vector<const StTensorInfo*> by_offset;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        RT_REQUIRE(v.is_object() || v.is_null(), where + ": __metadata__ must be an object of strings");
        if (v.is_null()) continue;
        for (auto m = v.begin(); m != v.end(); ++m) {
          RT_REQUIRE(m.value().is_string(),
                     where + ": __metadata__ entry '" + m.key() + "' must be a string, got " + m.value().dump());
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      const std::string what = "tensor '" + name + "' in " + where;
      RT_REQUIRE(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
                 what + " must be an object with dtype, shape and data_offsets, got " + v.dump());
      StTensorInfo info;
      info.name = name;
      RT_REQUIRE(v["dtype"].is_string(), what + ": dtype must be a string");
      const std::string dtype = v["dtype"].get<std::string>();
      RT_REQUIRE(parse_dtype(dtype, &info.dtype),
                 what + " has dtype '" + dtype +
                     "', which ranktune does not know (F32, F16, BF16, F64, I64, I32, ... are supported); "
                     "convert the checkpoint to bf16 or f32");
      RT_REQUIRE(v["shape"].is_array(), what + ": shape must be an array of non-negative integers");
      for (const json& d : v["shape"]) {
        RT_REQUIRE(d.is_number_unsigned() && d.get<uint64_t>() <= uint64_t{1} << 62,
                   what + ": shape must be an array of non-negative integers, got " + v["shape"].dump());
        info.shape.push_back(d.get<int64_t>());
      }
      const json& off = v["data_offsets"];
      RT_REQUIRE(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                 what + ": data_offsets must be two non-negative integers, got " + off.dump());
      info.begin = off[0].get<uint64_t>();
      info.end = off[1].get<uint64_t>();
      RT_REQUIRE(info.begin <= info.end && info.end <= data_size,
                 what + " has data_offsets [" + std::to_string(info.begin) + ", " + std::to_string(info.end) +
                     "] outside the " + std::to_string(data_size) +
                     " data bytes of the file; the file is truncated or corrupt");
      const int64_t numel = info.numel();
      uint64_t expected = 0;
      RT_REQUIRE(
          numel >= 0 && !__builtin_mul_overflow(static_cast<uint64_t>(numel), st_dtype_size(info.dtype), &expected),
          what + " has a shape " + info.shape_str() + " too large to address");
      RT_REQUIRE(info.nbytes() == expected, what + " has shape " + info.shape_str() + " and dtype " + dtype + " (" +
                                                std::to_string(expected) + " bytes) but its data_offsets span " +
                                                std::to_string(info.nbytes()) + " bytes");
      tensors_.emplace(name, std::move(info));
    }

    for (const auto& [name, info] : tensors_) by_offset.push_back(&info);
    std::sort(by_offset.begin(), by_offset.end(), [](const StTensorInfo* a, const StTensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
    });
    const StTensorInfo* prev = nullptr;
    for (const StTensorInfo* t : by_offset) {
      names_.push_back(t->name);
      if (t->nbytes() == 0) continue;
      RT_REQUIRE(prev == nullptr || t->begin >= prev->end, where + ": the data of tensors '" + prev->name + "' and '" +
                                                               t->name + "' overlap; the file is corrupt");
      prev = t;
    }
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

void SafetensorsFile::unmap() {
  if (map_ != nullptr) ::munmap(const_cast<std::byte*>(map_), map_size_);
  map_ = nullptr;
  data_ = nullptr;
  map_size_ = 0;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      map_size_(std::exchange(other.map_size_, 0)),
      data_(std::exchange(other.data_, nullptr)),
      names_(std::move(other.names_)),
      tensors_(std::move(other.tensors_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    data_ = std::exchange(other.data_, nullptr);
    names_ = std::move(other.names_);
    tensors_ = std::move(other.tensors_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

const StTensorInfo& SafetensorsFile::checked_info(const std::string& name) const {
  auto it = tensors_.find(name);
  RT_REQUIRE(it != tensors_.end(), "safetensors file " + path_ + " has no tensor '" + name + "'");
  return it->second;
}

const StTensorInfo& SafetensorsFile::info(const std::string& name) const { return checked_info(name); }

std::span<const std::byte> SafetensorsFile::bytes(const std::string& name) const {
  const StTensorInfo& t = checked_info(name);
  return {data_ + t.begin, static_cast<size_t>(t.nbytes())};
}

void SafetensorsFile::expect_shape(const std::string& name, const std::vector<int64_t>& shape) const {
  const StTensorInfo& t = checked_info(name);
  RT_REQUIRE(t.shape == shape, "tensor '" + name + "' in " + path_ + " has shape " + t.shape_str() + ", expected " +
                                   shape_string(shape) + "; the checkpoint does not match the model config");
}

void SafetensorsFile::read_f32_into(const std::string& name, std::span<float> out) const {
  const StTensorInfo& t = checked_info(name);
  const int64_t n = t.numel();
  RT_ASSERT(static_cast<int64_t>(out.size()) == n,
            "read_f32_into: destination size " + std::to_string(out.size()) + " != numel of " + name);
  const std::byte* src = data_ + t.begin;
  float* dst = out.data();
  switch (t.dtype) {
    case StDType::f32:
      if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case StDType::bf16:
#pragma omp parallel for if (n > (1 << 20))
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load<uint16_t>(src + 2 * i));
      return;
    case StDType::f16:
#pragma omp parallel for if (n > (1 << 20))
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load<uint16_t>(src + 2 * i));
      return;
    case StDType::f64:
#pragma omp parallel for if (n > (1 << 20))
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load<double>(src + 8 * i));
      return;
    default:
      throw UserError("tensor '" + name + "' in " + path_ + " has dtype " + st_dtype_name(t.dtype) +
                      "; expected a floating-point tensor (F32, BF16, F16 or F64)");
  }
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name) const {
  std::vector<float> out(static_cast<size_t>(checked_info(name).numel()));
  read_f32_into(name, out);
  return out;
}

std::vector<uint16_t> SafetensorsFile::read_bf16(const std::string& name) const {
  const StTensorInfo& t = checked_info(name);
  const auto n = static_cast<size_t>(t.numel());
  std::vector<uint16_t> out(n);
  if (t.dtype == StDType::bf16) {
    if (n > 0) std::memcpy(out.data(), data_ + t.begin, n * 2);
    return out;
  }
  const std::vector<float> wide = read_f32(name);
  for (size_t i = 0; i < n; ++i) out[i] = f32_to_bf16(wide[i]);
  return out;
}

std::vector<int32_t> SafetensorsFile::read_i32(const std::string& name) const {
  const StTensorInfo& t = checked_info(name);
  const auto n = static_cast<size_t>(t.numel());
  const std::byte* src = data_ + t.begin;
  std::vector<int32_t> out(n);
  auto narrow = [&](auto v, size_t i) {
    RT_REQUIRE(std::in_range<int32_t>(v), "tensor '" + name + "' in " + path_ + " holds " + std::to_string(v) +
                                              " at element " + std::to_string(i) +
                                              ", outside the int32 range ranktune uses for ids");
    return static_cast<int32_t>(v);
  };
  switch (t.dtype) {
    case StDType::i32:
      if (n > 0) std::memcpy(out.data(), src, n * 4);
      break;
    case StDType::i64:
      for (size_t i = 0; i < n; ++i) out[i] = narrow(load<int64_t>(src + 8 * i), i);
      break;
    case StDType::u64:
      for (size_t i = 0; i < n; ++i) out[i] = narrow(load<uint64_t>(src + 8 * i), i);
      break;
    case StDType::u32:
      for (size_t i = 0; i < n; ++i) out[i] = narrow(load<uint32_t>(src + 4 * i), i);
      break;
    case StDType::i16:
      for (size_t i = 0; i < n; ++i) out[i] = load<int16_t>(src + 2 * i);
      break;
    case StDType::u16:
      for (size_t i = 0; i < n; ++i) out[i] = load<uint16_t>(src + 2 * i);
      break;
    case StDType::i8:
      for (size_t i = 0; i < n; ++i) out[i] = load<int8_t>(src + i);
      break;
    case StDType::u8:
    case StDType::boolean:
      for (size_t i = 0; i < n; ++i) out[i] = load<uint8_t>(src + i);
      break;
    default:
      throw UserError("tensor '" + name + "' in " + path_ + " has dtype " + st_dtype_name(t.dtype) +
                      "; expected an integer tensor (I32 or I64)");
  }
  return out;
}

// ---- SafetensorsWriter --------------------------------------------------------------------------

void SafetensorsWriter::check_new(const std::string& name, StDType dtype, const std::vector<int64_t>& shape,
                                  size_t nbytes) const {
  RT_ASSERT(name != "__metadata__" && !name.empty(), "safetensors tensor name '" + name + "' is reserved");
  for (const auto& e : entries_) RT_ASSERT(e->name != name, "safetensors tensor '" + name + "' added twice");
  const int64_t numel = checked_numel(shape);
  RT_ASSERT(numel >= 0 && static_cast<size_t>(numel) * st_dtype_size(dtype) == nbytes,
            "safetensors tensor '" + name + "': " + std::to_string(nbytes) + " bytes do not fit shape " +
                shape_string(shape));
}

void SafetensorsWriter::add_copy(const std::string& name, StDType dtype, std::vector<int64_t> shape, const void* data,
                                 size_t nbytes) {
  check_new(name, dtype, shape, nbytes);
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->dtype = dtype;
  e->shape = std::move(shape);
  e->owned.resize(nbytes);
  if (nbytes > 0) std::memcpy(e->owned.data(), data, nbytes);
  e->data = e->owned.data();
  e->nbytes = nbytes;
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::add_f32(const std::string& name, std::vector<int64_t> shape, std::span<const float> data) {
  add_copy(name, StDType::f32, std::move(shape), data.data(), data.size_bytes());
}
void SafetensorsWriter::add_bf16(const std::string& name, std::vector<int64_t> shape, std::span<const uint16_t> data) {
  add_copy(name, StDType::bf16, std::move(shape), data.data(), data.size_bytes());
}
void SafetensorsWriter::add_i32(const std::string& name, std::vector<int64_t> shape, std::span<const int32_t> data) {
  add_copy(name, StDType::i32, std::move(shape), data.data(), data.size_bytes());
}
void SafetensorsWriter::add_i64(const std::string& name, std::vector<int64_t> shape, std::span<const int64_t> data) {
  add_copy(name, StDType::i64, std::move(shape), data.data(), data.size_bytes());
}

void SafetensorsWriter::add_borrowed(const std::string& name, StDType dtype, std::vector<int64_t> shape,
                                     const void* data, size_t nbytes) {
  check_new(name, dtype, shape, nbytes);
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->dtype = dtype;
  e->shape = std::move(shape);
  e->data = static_cast<const std::byte*>(data);
  e->nbytes = nbytes;
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::write(const std::string& path) const {
  json header = json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& e : entries_) {
    header[e->name] = {
        {"dtype", st_dtype_name(e->dtype)}, {"shape", e->shape}, {"data_offsets", {offset, offset + e->nbytes}}};
    offset += e->nbytes;
  }
  std::string text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_len = text.size();

  AtomicFile out(path);
  out.write(&header_len, 8);
  out.write(text.data(), text.size());
  for (const auto& e : entries_) out.write(e->data, e->nbytes);
  out.commit();
}

void write_file_atomic(const std::string& path, std::span<const std::byte> content) {
  AtomicFile out(path);
  out.write(content.data(), content.size());
  out.commit();
}

void write_file_atomic(const std::string& path, const std::string& content) {
  AtomicFile out(path);
  out.write(content.data(), content.size());
  out.commit();
}

// ---- HfCheckpoint -------------------------------------------------------------------------------

HfCheckpoint::HfCheckpoint(const std::string& model_dir, const std::string& stem) : dir_(model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  RT_REQUIRE(fs::is_directory(dir), "model directory " + model_dir + " does not exist or is not a directory");
  const fs::path single = dir / (stem + ".safetensors");
  const fs::path index = dir / (stem + ".safetensors.index.json");

  if (fs::exists(single)) {  // transformers prefers the single file too
    source_ = single.string();
    files_.emplace_back(source_);
    for (const std::string& name : files_.back().names()) where_[name] = 0;
    return;
  }
  if (!fs::exists(index)) {
    std::string hint;
    if (fs::exists(dir / (stem == "model" ? "pytorch_model.bin" : stem + ".bin")) ||
        fs::exists(dir / (stem == "model" ? "pytorch_model.bin.index.json" : stem + ".bin.index.json")))
      hint =
          "; it has PyTorch .bin weights: re-save the model with save_pretrained(..., "
          "safe_serialization=True) to get safetensors";
    throw UserError("model directory " + model_dir + " has neither " + stem + ".safetensors nor " + stem +
                    ".safetensors.index.json" + hint);
  }

  source_ = index.string();
  sharded_ = true;
  json j;
  {
    std::ifstream in(index);
    RT_REQUIRE(in.good(), "cannot read " + source_);
    try {
      j = json::parse(in);
    } catch (const json::parse_error& e) {
      throw UserError(source_ + " is not valid JSON: " + e.what());
    }
  }
  RT_REQUIRE(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
             source_ + " has no \"weight_map\" object (tensor name -> shard file)");
  std::map<std::string, std::string> weight_map;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    RT_REQUIRE(it.value().is_string(),
               source_ + ": weight_map entry '" + it.key() + "' must name a shard file, got " + it.value().dump());
    weight_map[it.key()] = it.value().get<std::string>();
  }
  RT_REQUIRE(!weight_map.empty(), source_ + ": weight_map is empty");

  std::map<std::string, size_t> shard_index;
  for (const auto& [name, shard] : weight_map) {
    auto it = shard_index.find(shard);
    if (it == shard_index.end()) {
      const fs::path rel(shard);
      RT_REQUIRE(!rel.is_absolute() && rel.lexically_normal().string().rfind("..", 0) != 0,
                 source_ + ": shard '" + shard + "' for tensor '" + name + "' lies outside the model directory");
      const fs::path file = dir / rel;
      RT_REQUIRE(fs::exists(file), source_ + " lists tensor '" + name + "' in shard " + shard + ", but " +
                                       file.string() + " does not exist; the download is incomplete");
      files_.emplace_back(file.string());
      it = shard_index.emplace(shard, files_.size() - 1).first;
    }
    RT_REQUIRE(files_[it->second].contains(name),
               source_ + " lists tensor '" + name + "' in shard " + shard + ", but " + files_[it->second].path() +
                   " has no such tensor; the index and the shards do not belong together");
    where_[name] = it->second;
  }
}

std::vector<std::string> HfCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

const SafetensorsFile& HfCheckpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  RT_REQUIRE(it != where_.end(), "checkpoint " + source_ + " has no tensor '" + name + "'");
  return files_[it->second];
}

}  // namespace ranktune

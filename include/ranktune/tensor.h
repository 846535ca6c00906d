// Typed, non-owning views over raw buffers, and the owning buffers behind them.
// A Tensor is a pointer plus dtype, device and a row-major shape of up to 4 dims. 2-D views may
// have a row stride larger than their column count (a column slice of a wider matrix, e.g. the
// q part of the fused qkv projection output).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "ranktune/error.h"

namespace ranktune {

enum class DType : uint8_t { f32, bf16, i32, u8 };
enum class Device : uint8_t { cpu, cuda };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::u8: return 1;
  }
  return 0;
}
const char* dtype_name(DType t);

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int ndim = 0;
  std::array<int64_t, 4> shape{0, 0, 0, 0};
  int64_t row_stride = 0;  // elements between consecutive rows of a 2-D view; 0 = contiguous

  Tensor() = default;
  Tensor(void* p, DType t, Device d, std::initializer_list<int64_t> dims);

  bool empty() const { return data == nullptr; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape[static_cast<size_t>(i)]; }
  // Rows and columns of the tensor seen as a matrix: all leading dims are rows.
  int64_t rows() const;
  int64_t cols() const { return ndim == 0 ? 1 : shape[static_cast<size_t>(ndim - 1)]; }
  int64_t ld() const { return row_stride ? row_stride : cols(); }
  bool contiguous() const { return row_stride == 0 || row_stride == cols() || rows() <= 1; }

  template <class T>
  T* ptr() const { return static_cast<T*>(data); }

  // The same memory seen with another shape (must be contiguous and have the same numel).
  Tensor view(std::initializer_list<int64_t> dims) const;
  // Rows [r0, r0+n) of the matrix view.
  Tensor row_slice(int64_t r0, int64_t n) const;
  // Columns [c0, c0+n) of the matrix view (keeps the row stride).
  Tensor col_slice(int64_t c0, int64_t n) const;
  // The same rows seen n columns wide, n <= ld(): a padded matrix with its padding columns (the
  // fused LoRA projections keep their adapters' part there).
  Tensor with_cols(int64_t n) const;
  // A flat range [offset, offset+n) as a 1-D tensor.
  Tensor flat_slice(int64_t offset, int64_t n) const;
  std::string describe() const;
};

// Owning memory on the host or a GPU. Move-only; frees in the destructor.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device device, size_t bytes);  // zero-filled
  // Page-locked host memory (cudaMallocHost), for asynchronous copies to and from a GPU.
  static Buffer pinned_host(size_t bytes);
  ~Buffer();
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  Tensor as(DType t, std::initializer_list<int64_t> dims, size_t byte_offset = 0) const;

 private:
  void release();
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_ = Device::cpu;
  bool pinned_ = false;
};

// bf16 <-> f32 on the host (round to nearest even, as the GPU's __float2bfloat16 does).
uint16_t f32_to_bf16(float x);
float bf16_to_f32(uint16_t x);

}  // namespace ranktune

#include "ranktune/tensor.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <utility>

#include "ranktune/memory_plan.h"

#ifdef RANKTUNE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace ranktune {

void assert_fail(const char* cond, const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "ranktune: internal error at %s:%d: %s (%s)\n", file, line, msg.c_str(), cond);
  std::abort();
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
  }
  return "?";
}

Tensor::Tensor(void* p, DType t, Device d, std::initializer_list<int64_t> dims)
    : data(p), dtype(t), device(d) {
  RT_ASSERT(dims.size() <= 4, "at most 4 dims");
  for (int64_t v : dims) shape[static_cast<size_t>(ndim++)] = v;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[static_cast<size_t>(i)];
  return n;
}

int64_t Tensor::rows() const {
  int64_t r = 1;
  for (int i = 0; i + 1 < ndim; ++i) r *= shape[static_cast<size_t>(i)];
  return r;
}

Tensor Tensor::view(std::initializer_list<int64_t> dims) const {
  RT_ASSERT(contiguous(), "view of a strided tensor");
  Tensor t(data, dtype, device, dims);
  RT_ASSERT(t.numel() == numel(), "view changes numel: " + describe());
  return t;
}

Tensor Tensor::row_slice(int64_t r0, int64_t n) const {
  RT_ASSERT(r0 >= 0 && r0 + n <= rows(), "row slice out of range: " + describe());
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(r0 * ld()) * dtype_size(dtype);
  t.ndim = 2;
  t.shape = {n, cols(), 0, 0};
  return t;
}

Tensor Tensor::col_slice(int64_t c0, int64_t n) const {
  RT_ASSERT(c0 >= 0 && c0 + n <= cols(), "column slice out of range: " + describe());
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(c0) * dtype_size(dtype);
  t.row_stride = ld();
  t.ndim = 2;
  t.shape = {rows(), n, 0, 0};
  return t;
}

Tensor Tensor::with_cols(int64_t n) const {
  RT_ASSERT(n >= 0 && n <= ld(), "with_cols(" + std::to_string(n) + ") past the row stride: " + describe());
  Tensor t = *this;
  t.row_stride = ld();
  t.ndim = 2;
  t.shape = {rows(), n, 0, 0};
  return t;
}

Tensor Tensor::flat_slice(int64_t offset, int64_t n) const {
  RT_ASSERT(contiguous() && offset >= 0 && offset + n <= numel(), "flat slice out of range");
  Tensor t = *this;
  t.data = static_cast<char*>(data) + static_cast<size_t>(offset) * dtype_size(dtype);
  t.ndim = 1;
  t.shape = {n, 0, 0, 0};
  t.row_stride = 0;
  return t;
}

std::string Tensor::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype) << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? "," : "") << shape[static_cast<size_t>(i)];
  os << "]";
  if (row_stride) os << " ld=" << row_stride;
  os << (device == Device::cpu ? " cpu" : " cuda");
  return os.str();
}

Buffer::Buffer(Device device, size_t bytes) : bytes_(bytes), device_(device) {
  if (bytes == 0) return;
  if (device == Device::cpu) {
    data_ = std::calloc(1, bytes);
    if (!data_) throw UserError("out of host memory allocating " + std::to_string(bytes) + " bytes");
    return;
  }
#ifdef RANKTUNE_HAVE_CUDA
  cudaError_t err = cudaMalloc(&data_, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    data_ = nullptr;
    bytes_ = 0;
    RT_ASSERT(err == cudaErrorMemoryAllocation, std::string("cudaMalloc: ") + cudaGetErrorString(err));
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    throw UserError("out of GPU memory allocating " + std::to_string(bytes >> 20) + " MiB (" +
                    std::to_string(free_b >> 20) + " MiB free of " + std::to_string(total_b >> 20) +
                    " MiB). " + out_of_memory_advice());
  }
  err = cudaMemset(data_, 0, bytes);
  RT_ASSERT(err == cudaSuccess, cudaGetErrorString(err));
#else
  throw UserError("this ranktune was built without CUDA");
#endif
}

Buffer Buffer::pinned_host(size_t bytes) {
  Buffer b;
  b.device_ = Device::cpu;
  if (bytes == 0) return b;
#ifdef RANKTUNE_HAVE_CUDA
  const cudaError_t err = cudaMallocHost(&b.data_, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    b.data_ = nullptr;
    throw UserError("cannot pin " + std::to_string(bytes >> 20) +
                    " MiB of host memory for offloaded checkpoints (" + cudaGetErrorString(err) +
                    "): use model.gradient_checkpointing: true instead of offload");
  }
  b.bytes_ = bytes;
  b.pinned_ = true;
  std::memset(b.data_, 0, bytes);
  return b;
#else
  return Buffer(Device::cpu, bytes);
#endif
}

Buffer::~Buffer() { release(); }

Buffer::Buffer(Buffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      device_(o.device_),
      pinned_(std::exchange(o.pinned_, false)) {}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    device_ = o.device_;
    pinned_ = std::exchange(o.pinned_, false);
  }
  return *this;
}

void Buffer::release() {
  if (!data_) return;
  if (pinned_) {
#ifdef RANKTUNE_HAVE_CUDA
    cudaFreeHost(data_);
#endif
  } else if (device_ == Device::cpu) {
    std::free(data_);
  } else {
#ifdef RANKTUNE_HAVE_CUDA
    cudaFree(data_);
#endif
  }
  data_ = nullptr;
  bytes_ = 0;
}

Tensor Buffer::as(DType t, std::initializer_list<int64_t> dims, size_t byte_offset) const {
  Tensor v(static_cast<char*>(data_) + byte_offset, t, device_, dims);
  RT_ASSERT(byte_offset + v.nbytes() <= bytes_, "tensor view past the end of its buffer");
  return v;
}

uint16_t f32_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace ranktune

// The CUDA backend's ops (all but attention, tested in gpu_attention.cpp) against the CPU backend,
// through the Backend interface only. Inputs are fresh random values each run, rounded to bf16 so
// both backends see exactly the same numbers; the GPU's outputs are poisoned with NaN first, so
// every element an op must write is checked to be written, and elements around strided views are
// checked to be left alone. Results are compared by relative L2 error ||gpu - cpu|| / ||cpu||:
// 1e-2 where the GPU rounds activations to bf16 (8 significant bits: one rounding is <= 2^-9
// relative), tighter where it writes f32.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "gpu_skip.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "ranktune/backend.h"

namespace {

using ranktune::Backend;
using ranktune::Buffer;
using ranktune::DType;
using ranktune::Tensor;

constexpr double kBf16Tol = 1e-2;  // outputs rounded to bf16
constexpr double kF32Tol = 1e-4;   // f32 outputs from bf16 inputs, fp32 accumulation
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

float round_bf16(float x) { return ranktune::bf16_to_f32(ranktune::f32_to_bf16(x)); }

// A matrix (or vector) on one backend: a rows x cols view with row stride ld, starting `offset`
// elements into an allocation of its own, so a test can check that an op wrote every element of the
// view and nothing around it. Values cross the interface as floats (ints and codes exactly).
class Mat {
 public:
  Mat(Backend& be, DType dtype, int64_t rows, int64_t cols, int64_t ld = 0, int64_t offset = 0,
      bool vector = false)
      : be_(&be),
        dtype_(dtype),
        rows_(rows),
        cols_(cols),
        ld_(ld ? ld : cols),
        offset_(offset),
        total_(offset + rows * (ld ? ld : cols)),
        buf_(be.alloc(static_cast<size_t>(total_) * ranktune::dtype_size(dtype))) {
    const size_t at = static_cast<size_t>(offset_) * ranktune::dtype_size(dtype);
    if (vector)
      view = buf_.as(dtype, {rows_ * cols_}, at);
    else if (ld_ == cols_)
      view = buf_.as(dtype, {rows_, cols_}, at);
    else
      view = buf_.as(dtype, {rows_, ld_}, at).col_slice(0, cols_);
    set_all(poison());
  }

  static Mat vec(Backend& be, DType dtype, int64_t n, int64_t offset = 0) {
    return Mat(be, dtype, 1, n, 0, offset, true);
  }

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }

  // Writes the view (rows*cols values, row-major); everything around it holds the poison.
  void set(const std::vector<float>& values) {
    ASSERT_EQ(values.size(), static_cast<size_t>(rows_ * cols_));
    std::vector<float> all(static_cast<size_t>(total_), poison());
    for (int64_t r = 0; r < rows_; ++r)
      for (int64_t c = 0; c < cols_; ++c)
        all[static_cast<size_t>(offset_ + r * ld_ + c)] =
            values[static_cast<size_t>(r * cols_ + c)];
    store(all);
  }

  void set_all(float value) { store(std::vector<float>(static_cast<size_t>(total_), value)); }
  void poison_view() { set(std::vector<float>(static_cast<size_t>(rows_ * cols_), poison())); }

  std::vector<float> get() const {
    const std::vector<float> all = load();
    std::vector<float> out(static_cast<size_t>(rows_ * cols_));
    for (int64_t r = 0; r < rows_; ++r)
      for (int64_t c = 0; c < cols_; ++c)
        out[static_cast<size_t>(r * cols_ + c)] = all[static_cast<size_t>(offset_ + r * ld_ + c)];
    return out;
  }

  // Elements outside the view that no longer hold the poison.
  int64_t touched_outside() const {
    const std::vector<float> all = load();
    int64_t touched = 0;
    for (int64_t i = 0; i < total_; ++i) {
      const int64_t local = i - offset_;
      const bool inside = local >= 0 && local < rows_ * ld_ && local % ld_ < cols_;
      if (!inside && !is_poison(all[static_cast<size_t>(i)])) ++touched;
    }
    return touched;
  }

  Tensor view;

 private:
  float poison() const { return dtype_ == DType::f32 || dtype_ == DType::bf16 ? kNaN : 0.f; }
  bool is_poison(float x) const { return std::isnan(poison()) ? std::isnan(x) : x == poison(); }

  void store(const std::vector<float>& all) {
    std::vector<uint8_t> raw(static_cast<size_t>(total_) * ranktune::dtype_size(dtype_));
    for (size_t i = 0; i < all.size(); ++i) {
      switch (dtype_) {
        case DType::f32: std::memcpy(&raw[i * 4], &all[i], 4); break;
        case DType::bf16: {
          const uint16_t h = ranktune::f32_to_bf16(all[i]);
          std::memcpy(&raw[i * 2], &h, 2);
          break;
        }
        case DType::i32: {
          const auto v = static_cast<int32_t>(all[i]);
          std::memcpy(&raw[i * 4], &v, 4);
          break;
        }
        case DType::u8: raw[i] = static_cast<uint8_t>(all[i]); break;
      }
    }
    be_->upload(buf_.as(DType::u8, {static_cast<int64_t>(raw.size())}), raw.data());
  }

  std::vector<float> load() const {
    std::vector<uint8_t> raw(static_cast<size_t>(total_) * ranktune::dtype_size(dtype_));
    be_->download(raw.data(), buf_.as(DType::u8, {static_cast<int64_t>(raw.size())}));
    std::vector<float> all(static_cast<size_t>(total_));
    for (size_t i = 0; i < all.size(); ++i) {
      switch (dtype_) {
        case DType::f32: std::memcpy(&all[i], &raw[i * 4], 4); break;
        case DType::bf16: {
          uint16_t h;
          std::memcpy(&h, &raw[i * 2], 2);
          all[i] = ranktune::bf16_to_f32(h);
          break;
        }
        case DType::i32: {
          int32_t v;
          std::memcpy(&v, &raw[i * 4], 4);
          all[i] = static_cast<float>(v);
          break;
        }
        case DType::u8: all[i] = raw[i]; break;
      }
    }
    return all;
  }

  Backend* be_;
  DType dtype_;
  int64_t rows_, cols_, ld_, offset_, total_;
  Buffer buf_;
};

// The same logical matrix on the GPU and the CPU. Activations are bf16 on the GPU and f32 on the
// CPU; values set through the pair are rounded to bf16 first whenever either side is bf16.
struct Pair {
  Pair(Backend& gpu_be, Backend& cpu_be, DType gpu_dtype, DType cpu_dtype, int64_t rows,
       int64_t cols, int64_t ld = 0, int64_t offset = 0, bool vector = false)
      : gpu(gpu_be, gpu_dtype, rows, cols, ld, offset, vector),
        cpu(cpu_be, cpu_dtype, rows, cols, ld, offset, vector),
        round(gpu_dtype == DType::bf16 || cpu_dtype == DType::bf16) {}

  void set(std::vector<float> values) {
    if (round)
      for (float& v : values) v = round_bf16(v);
    gpu.set(values);
    cpu.set(values);
  }

  Mat gpu, cpu;
  bool round;
};

double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    diff += d * d;
    norm += static_cast<double>(want[i]) * want[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

int64_t count_nonfinite(const std::vector<float>& v) {
  return std::count_if(v.begin(), v.end(), [](float x) { return !std::isfinite(x); });
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class GpuOps : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    if (!gpu_) {
      gpu_ = ranktune::make_cuda_backend(0);
      cpu_ = ranktune::make_cpu_backend();
    }
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    RecordProperty("seed", std::to_string(seed_));
  }

  static void TearDownTestSuite() {
    gpu_.reset();
    cpu_.reset();
  }

  Backend& gpu() { return *gpu_; }
  Backend& cpu() { return *cpu_; }

  Pair act(int64_t rows, int64_t cols, int64_t ld = 0, int64_t offset = 0) {
    return Pair(gpu(), cpu(), DType::bf16, DType::f32, rows, cols, ld, offset);
  }
  Pair act_vec(int64_t n) { return Pair(gpu(), cpu(), DType::bf16, DType::f32, 1, n, 0, 0, true); }
  Pair f32(int64_t rows, int64_t cols, int64_t ld = 0, int64_t offset = 0) {
    return Pair(gpu(), cpu(), DType::f32, DType::f32, rows, cols, ld, offset);
  }
  Pair f32_vec(int64_t n, int64_t offset = 0) {
    return Pair(gpu(), cpu(), DType::f32, DType::f32, 1, n, 0, offset, true);
  }
  Pair i32_vec(int64_t n) { return Pair(gpu(), cpu(), DType::i32, DType::i32, 1, n, 0, 0, true); }

  std::vector<float> normal(int64_t n, float stddev = 1.f, float mean = 0.f) {
    std::normal_distribution<float> dist(mean, stddev);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) {
      do x = dist(rng_);
      while (x == 0.f);  // never zeros: they hide unwritten outputs
    }
    return v;
  }

  std::vector<float> uniform(int64_t n, float lo, float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = dist(rng_);
    return v;
  }

  std::vector<float> ints(int64_t n, int lo, int hi) {
    std::uniform_int_distribution<int> dist(lo, hi);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = static_cast<float>(dist(rng_));
    return v;
  }

  // The GPU result is fully written and within tol of the CPU's.
  void expect_close(const Mat& gpu_mat, const Mat& cpu_mat, double tol, const std::string& what) {
    const std::vector<float> got = gpu_mat.get(), want = cpu_mat.get();
    EXPECT_EQ(count_nonfinite(got), 0) << what << ": unwritten (NaN) elements, seed " << seed_;
    EXPECT_EQ(count_nonfinite(want), 0) << what << ": the CPU reference is not finite";
    EXPECT_LE(rel_l2(got, want), tol) << what << ", seed " << seed_;
    EXPECT_EQ(gpu_mat.touched_outside(), 0) << what << ": wrote outside its view, seed " << seed_;
  }
  void expect_close(const Pair& p, double tol, const std::string& what) {
    expect_close(p.gpu, p.cpu, tol, what);
  }

  static inline std::unique_ptr<Backend> gpu_, cpu_;
  uint32_t seed_ = 0;
  std::mt19937 rng_;
};

// ---- memory, elementwise, reductions ------------------------------------------------------------

TEST_F(GpuOps, CopyConvertsAndRespectsStrides) {
  struct Shape {
    int64_t rows, cols, ld_src, ld_dst, offset;
  };
  for (const Shape s : {Shape{37, 41, 45, 48, 0}, Shape{64, 96, 96, 96, 0}, Shape{5, 24, 40, 32, 8},
                        Shape{7, 16, 16, 16, 1}, Shape{3, 1, 1, 1, 0}}) {
    const std::string where = std::to_string(s.rows) + "x" + std::to_string(s.cols) + " ld " +
                              std::to_string(s.ld_src) + "->" + std::to_string(s.ld_dst) +
                              " offset " + std::to_string(s.offset);
    const std::vector<float> values = normal(s.rows * s.cols);
    std::vector<float> rounded = values;
    for (float& v : rounded) v = round_bf16(v);

    Mat src_f32(gpu(), DType::f32, s.rows, s.cols, s.ld_src, s.offset);
    src_f32.set(values);
    Mat to_bf16(gpu(), DType::bf16, s.rows, s.cols, s.ld_dst, s.offset);
    gpu().copy(to_bf16.view, src_f32.view);
    EXPECT_TRUE(bitwise_equal(to_bf16.get(), rounded)) << "f32 -> bf16 " << where;
    EXPECT_EQ(to_bf16.touched_outside(), 0) << where;

    Mat to_f32(gpu(), DType::f32, s.rows, s.cols, s.ld_src, s.offset);
    gpu().copy(to_f32.view, to_bf16.view);
    EXPECT_TRUE(bitwise_equal(to_f32.get(), rounded)) << "bf16 -> f32 " << where;
    EXPECT_EQ(to_f32.touched_outside(), 0) << where;

    Mat bf16_copy(gpu(), DType::bf16, s.rows, s.cols, s.ld_src, s.offset);
    gpu().copy(bf16_copy.view, to_bf16.view);
    EXPECT_TRUE(bitwise_equal(bf16_copy.get(), rounded)) << "bf16 -> bf16 " << where;
    EXPECT_EQ(bf16_copy.touched_outside(), 0) << where;

    Mat f32_copy(gpu(), DType::f32, s.rows, s.cols, s.ld_dst, s.offset);
    gpu().copy(f32_copy.view, src_f32.view);
    EXPECT_TRUE(bitwise_equal(f32_copy.get(), values)) << "f32 -> f32 " << where;
    EXPECT_EQ(f32_copy.touched_outside(), 0) << where;
  }
}

// copy_batch: blocks of 16-byte rows go 16 bytes per access, a launch with any other block goes
// element by element, and more than 64 blocks take several launches; every block lands where copy()
// would put it, and nothing around it changes. Uploads and downloads of padded views move the view.
TEST_F(GpuOps, CopyBatchAndPaddedUploadDownload) {
  struct Shape {
    int64_t rows, cols, ld_src, ld_dst;
  };
  const std::vector<Shape> aligned = {{128, 16, 16, 2096}, {40, 48, 2096, 48}, {9, 8, 8, 24}};
  const std::vector<Shape> odd = {{7, 3, 3, 11}, {5, 16, 16, 20}};
  for (const bool with_odd : {false, true}) {
    std::vector<Shape> shapes;
    for (int i = 0; i < 70; ++i) shapes.push_back(aligned[static_cast<size_t>(i) % aligned.size()]);
    if (with_odd) shapes.insert(shapes.begin() + 3, odd.begin(), odd.end());
    std::vector<Mat> srcs, dsts;
    std::vector<std::vector<float>> values;
    std::vector<std::pair<Tensor, Tensor>> batch;
    for (const Shape& sh : shapes) {
      srcs.emplace_back(gpu(), DType::bf16, sh.rows, sh.cols, sh.ld_src);
      dsts.emplace_back(gpu(), DType::bf16, sh.rows, sh.cols, sh.ld_dst);
      values.push_back(normal(sh.rows * sh.cols));
      for (float& v : values.back()) v = round_bf16(v);
      srcs.back().set(values.back());
    }
    for (size_t i = 0; i < shapes.size(); ++i) batch.emplace_back(dsts[i].view, srcs[i].view);
    gpu().copy_batch(batch);
    for (size_t i = 0; i < shapes.size(); ++i) {
      const std::string where = "block " + std::to_string(i) + (with_odd ? " (with odd blocks)" : "");
      EXPECT_TRUE(bitwise_equal(dsts[i].get(), values[i])) << where;
      EXPECT_EQ(dsts[i].touched_outside(), 0) << where;
    }
  }

  Mat padded(gpu(), DType::bf16, 33, 40, 56);
  std::vector<float> values = normal(33 * 40);
  for (float& v : values) v = round_bf16(v);
  std::vector<uint16_t> raw(values.size());
  for (size_t i = 0; i < values.size(); ++i) raw[i] = ranktune::f32_to_bf16(values[i]);
  gpu().upload(padded.view, raw.data());
  EXPECT_TRUE(bitwise_equal(padded.get(), values));
  EXPECT_EQ(padded.touched_outside(), 0);
  std::vector<uint16_t> back(raw.size(), 0);
  gpu().download(back.data(), padded.view);
  EXPECT_EQ(back, raw);
}

TEST_F(GpuOps, FillAndScale) {
  for (const int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000003}}) {
    for (const int64_t offset : {int64_t{0}, int64_t{1}}) {
      for (const DType dtype : {DType::f32, DType::bf16}) {
        const std::string where = std::string(ranktune::dtype_name(dtype)) + " n " +
                                  std::to_string(n) + " offset " + std::to_string(offset);
        Mat x = Mat::vec(gpu(), dtype, n, offset);
        gpu().fill(x.view, 1.75f);
        std::vector<float> got = x.get();
        EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](float v) { return v == 1.75f; }))
            << "fill " << where;
        EXPECT_EQ(x.touched_outside(), 0) << where;

        std::vector<float> values = normal(n);
        if (dtype == DType::bf16)
          for (float& v : values) v = round_bf16(v);
        x.set(values);
        gpu().scale(x.view, 0.3f);
        std::vector<float> want = values;
        for (float& v : want) v = dtype == DType::bf16 ? round_bf16(v * 0.3f) : v * 0.3f;
        EXPECT_TRUE(bitwise_equal(x.get(), want)) << "scale " << where;
        EXPECT_EQ(x.touched_outside(), 0) << where;
      }
    }
  }
  // Strided fills, with zero (a 2-D memset) and with a value (by rows).
  for (const float value : {0.f, -2.5f}) {
    Mat x(gpu(), DType::bf16, 9, 37, 40);
    gpu().fill(x.view, value);
    const std::vector<float> got = x.get();
    EXPECT_TRUE(std::all_of(got.begin(), got.end(), [&](float v) { return v == value; }));
    EXPECT_EQ(x.touched_outside(), 0);
  }
}

TEST_F(GpuOps, AddStrided) {
  struct Shape {
    int64_t rows, cols, ld_y, ld_x;
  };
  for (const Shape s : {Shape{37, 41, 48, 45}, Shape{64, 96, 96, 96}, Shape{5, 24, 32, 40}}) {
    const std::string where = std::to_string(s.rows) + "x" + std::to_string(s.cols);
    Pair y = act(s.rows, s.cols, s.ld_y), x = act(s.rows, s.cols, s.ld_x);
    y.set(normal(s.rows * s.cols));
    x.set(normal(s.rows * s.cols));
    gpu().add(y.gpu.view, x.gpu.view);
    cpu().add(y.cpu.view, x.cpu.view);
    expect_close(y, kBf16Tol, "add bf16 " + where);

    Pair y32 = f32(s.rows, s.cols, s.ld_y), x32 = f32(s.rows, s.cols, s.ld_x);
    y32.set(normal(s.rows * s.cols));
    x32.set(normal(s.rows * s.cols));
    gpu().add(y32.gpu.view, x32.gpu.view);
    cpu().add(y32.cpu.view, x32.cpu.view);
    expect_close(y32, 0.0, "add f32 " + where);
  }
}

TEST_F(GpuOps, SumSquaresMatchesCpuAndIsDeterministic) {
  for (const int64_t n : {int64_t{1}, int64_t{1001}, int64_t{3000017}}) {
    for (const int64_t offset : {int64_t{0}, int64_t{1}}) {
      Pair x = f32_vec(n, offset);
      x.set(normal(n));
      const double got = gpu().sum_squares(x.gpu.view);
      const double want = cpu().sum_squares(x.cpu.view);
      EXPECT_NEAR(got, want, 1e-12 * want) << "n " << n << " offset " << offset;
      EXPECT_EQ(got, gpu().sum_squares(x.gpu.view)) << "not deterministic, n " << n;
    }
  }
}

TEST_F(GpuOps, DropoutMatchesCpuMask) {
  struct Shape {
    int64_t rows, cols, ld;
  };
  for (const Shape s : {Shape{37, 41, 48}, Shape{64, 96, 96}, Shape{5, 24, 27}}) {
    const float p = 0.25f;
    const uint64_t seed = rng_();
    Pair in = act(s.rows, s.cols, s.ld);
    in.set(normal(s.rows * s.cols));
    Pair out = act(s.rows, s.cols, s.ld);
    gpu().dropout(out.gpu.view, in.gpu.view, p, seed);
    cpu().dropout(out.cpu.view, in.cpu.view, p, seed);
    expect_close(out, kBf16Tol, "dropout");
    const std::vector<float> got = out.gpu.get(), want = out.cpu.get();
    int64_t mask_mismatch = 0, dropped = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      mask_mismatch += (got[i] == 0.f) != (want[i] == 0.f);
      dropped += want[i] == 0.f;
    }
    EXPECT_EQ(mask_mismatch, 0);
    EXPECT_GT(dropped, 0);
    // In place gives the same result.
    gpu().dropout(in.gpu.view, in.gpu.view, p, seed);
    EXPECT_TRUE(bitwise_equal(in.gpu.get(), got)) << "in-place dropout differs";
  }
}

// ---- embedding ----------------------------------------------------------------------------------

TEST_F(GpuOps, EmbeddingForwardCopiesRows) {
  for (const int64_t channels : {int64_t{24}, int64_t{96}, int64_t{37}}) {
    const int64_t vocab = 100, n = 64;
    Pair table = act(vocab, channels);
    table.set(normal(vocab * channels));
    Pair tokens = i32_vec(n);
    tokens.set(ints(n, 0, static_cast<int>(vocab - 1)));
    Pair out = act(n, channels);
    gpu().embedding_forward(out.gpu.view, tokens.gpu.view, table.gpu.view);
    cpu().embedding_forward(out.cpu.view, tokens.cpu.view, table.cpu.view);
    expect_close(out, 0.0, "embedding forward C=" + std::to_string(channels));
  }
}

TEST_F(GpuOps, EmbeddingBackwardSumsInOrderAndIsDeterministic) {
  // A small vocabulary with many repeats, then Llama 3's (17-bit ids: five radix passes of the GPU's
  // sort) over more positions than the sort's 512 threads, ids from a few hundred spread over it.
  struct Case {
    int64_t vocab, n, channels;
  };
  const Case cases[] = {{50, 300, 24}, {50, 300, 96}, {50, 300, 37}, {128256, 4100, 64}};
  for (const Case& k : cases) {
    for (const float beta : {0.f, 0.5f, 1.f}) {
      const std::string where = "vocab " + std::to_string(k.vocab) + " n " + std::to_string(k.n) +
                                " C=" + std::to_string(k.channels) + " beta " + std::to_string(beta);
      Pair dout = act(k.n, k.channels);
      dout.set(normal(k.n * k.channels));
      Pair tokens = i32_vec(k.n);
      std::vector<float> ids = ints(k.n, 0, static_cast<int>(std::min<int64_t>(k.vocab, 300) - 1));
      for (float& id : ids) id = static_cast<float>(static_cast<int64_t>(id) * 427 % k.vocab);
      ids.back() = static_cast<float>(k.vocab - 1);
      tokens.set(ids);
      Pair dtable = f32(k.vocab, k.channels);
      const std::vector<float> initial = normal(k.vocab * k.channels);
      dtable.set(initial);
      if (beta == 0.f) dtable.gpu.poison_view();  // not read
      gpu().embedding_backward(dtable.gpu.view, dout.gpu.view, tokens.gpu.view, beta);
      cpu().embedding_backward(dtable.cpu.view, dout.cpu.view, tokens.cpu.view, beta);
      // Both add each token's rows in order of position, in fp32: the same bits.
      EXPECT_TRUE(bitwise_equal(dtable.gpu.get(), dtable.cpu.get())) << "GPU differs from the CPU, " << where;
      expect_close(dtable, 1e-6, "embedding backward " + where);

      const std::vector<float> first = dtable.gpu.get();
      dtable.gpu.set(initial);
      gpu().embedding_backward(dtable.gpu.view, dout.gpu.view, tokens.gpu.view, beta);
      EXPECT_TRUE(bitwise_equal(dtable.gpu.get(), first)) << "not deterministic, " << where;
    }
  }
}

// ---- RMSNorm ------------------------------------------------------------------------------------

TEST_F(GpuOps, RmsnormForward) {
  struct Shape {
    int64_t rows, channels;
  };
  for (const Shape s : {Shape{33, 24}, Shape{33, 96}, Shape{33, 37}, Shape{17, 2048},
                        Shape{5, 1001}, Shape{4, 4096}, Shape{3, 8192}}) {
    for (const bool with_delta : {false, true}) {
      const std::string where = std::to_string(s.rows) + "x" + std::to_string(s.channels) +
                                (with_delta ? " with delta" : " without delta");
      const int64_t n = s.rows * s.channels;
      // With a delta, norm_out has padding columns (a fused LoRA projection's input): left alone.
      const int64_t norm_ld = with_delta ? s.channels + 8 : 0;
      Pair residual_in = act(s.rows, s.channels), delta = act(s.rows, s.channels);
      Pair residual_out = act(s.rows, s.channels), norm_out = act(s.rows, s.channels, norm_ld);
      Pair rstd = f32_vec(s.rows), weight = act_vec(s.channels);
      residual_in.set(normal(n));
      delta.set(normal(n, 0.5f));
      weight.set(uniform(s.channels, 0.5f, 1.5f));
      const Tensor gpu_delta = with_delta ? delta.gpu.view : Tensor();
      const Tensor cpu_delta = with_delta ? delta.cpu.view : Tensor();
      gpu().residual_rmsnorm_forward(residual_out.gpu.view, norm_out.gpu.view, rstd.gpu.view,
                                     residual_in.gpu.view, gpu_delta, weight.gpu.view, 1e-5f);
      cpu().residual_rmsnorm_forward(residual_out.cpu.view, norm_out.cpu.view, rstd.cpu.view,
                                     residual_in.cpu.view, cpu_delta, weight.cpu.view, 1e-5f);
      expect_close(norm_out, kBf16Tol, "norm_out " + where);
      expect_close(rstd, 1e-3, "rstd " + where);
      if (with_delta) {
        expect_close(residual_out, kBf16Tol, "residual_out " + where);
      } else {
        const std::vector<float> untouched = residual_out.gpu.get();
        EXPECT_EQ(count_nonfinite(untouched), static_cast<int64_t>(untouched.size()))
            << "residual_out written without a delta, " << where;
      }
    }
  }
}

TEST_F(GpuOps, RmsnormBackward) {
  struct Shape {
    int64_t rows, channels;
  };
  // The large row counts give the persistent grid several rows per block.
  for (const Shape s : {Shape{33, 24}, Shape{33, 96}, Shape{33, 37}, Shape{17, 2048},
                        Shape{5, 1001}, Shape{4, 8192}, Shape{9000, 24}, Shape{6000, 96}}) {
    for (const int mode : {0, 1, 2, 3}) {  // dweight beta 0.5, beta 0, none; in place
      const std::string where = std::to_string(s.rows) + "x" + std::to_string(s.channels) +
                                " mode " + std::to_string(mode);
      const int64_t n = s.rows * s.channels;
      // dnorm is a padded dx (fused LoRA's dy B in its extra columns) unless it is dresidual too.
      const int64_t dnorm_ld = mode == 3 ? 0 : s.channels + 8;
      Pair x = act(s.rows, s.channels), dnorm = act(s.rows, s.channels, dnorm_ld);
      Pair dresidual = act(s.rows, s.channels);
      Pair weight = act_vec(s.channels), rstd = f32_vec(s.rows), dweight = f32_vec(s.channels);
      x.set(normal(n));
      dnorm.set(normal(n));
      dresidual.set(normal(n));
      weight.set(uniform(s.channels, 0.5f, 1.5f));
      // rstd as the forward computes it, from the bf16 x.
      const std::vector<float> xs = x.cpu.get();
      std::vector<float> r(static_cast<size_t>(s.rows));
      for (int64_t row = 0; row < s.rows; ++row) {
        double sum = 0.0;
        for (int64_t c = 0; c < s.channels; ++c)
          sum += std::pow(xs[static_cast<size_t>(row * s.channels + c)], 2);
        r[static_cast<size_t>(row)] = static_cast<float>(1.0 / std::sqrt(sum / s.channels + 1e-5));
      }
      rstd.set(r);
      const std::vector<float> dweight_initial = normal(s.channels);
      dweight.set(dweight_initial);
      const float beta = mode == 0 ? 0.5f : 0.f;
      if (mode == 1) dweight.gpu.poison_view();
      const bool with_dweight = mode != 2;
      const bool in_place = mode == 3;
      const Tensor gpu_dres = in_place ? dnorm.gpu.view : dresidual.gpu.view;
      const Tensor cpu_dres = in_place ? dnorm.cpu.view : dresidual.cpu.view;
      gpu().rmsnorm_backward(gpu_dres, with_dweight ? dweight.gpu.view : Tensor(), beta,
                             dnorm.gpu.view, x.gpu.view, weight.gpu.view, rstd.gpu.view);
      cpu().rmsnorm_backward(cpu_dres, with_dweight ? dweight.cpu.view : Tensor(), beta,
                             dnorm.cpu.view, x.cpu.view, weight.cpu.view, rstd.cpu.view);
      if (in_place)
        expect_close(dnorm, kBf16Tol, "dresidual (in place) " + where);
      else
        expect_close(dresidual, kBf16Tol, "dresidual " + where);
      if (with_dweight) {
        expect_close(dweight, kF32Tol, "dweight " + where);
        if (!in_place) {  // determinism: the same inputs again
          const std::vector<float> first = dweight.gpu.get();
          dweight.gpu.set(dweight_initial);
          gpu().rmsnorm_backward(dresidual.gpu.view, dweight.gpu.view, beta, dnorm.gpu.view,
                                 x.gpu.view, weight.gpu.view, rstd.gpu.view);
          EXPECT_TRUE(bitwise_equal(dweight.gpu.get(), first)) << "not deterministic, " << where;
        }
      } else {
        const std::vector<float> untouched = dweight.gpu.get();
        EXPECT_TRUE(bitwise_equal(untouched, dweight.cpu.get())) << "dweight written, " << where;
      }
    }
  }
}

// ---- GEMM ---------------------------------------------------------------------------------------

TEST_F(GpuOps, MatmulAllTransposesStridesAndBetas) {
  struct Shape {
    int64_t m, n, k;
  };
  struct Out {
    bool f32;
    float alpha, beta;
  };
  for (const Shape s : {Shape{37, 24, 96}, Shape{24, 96, 37}, Shape{128, 96, 64}, Shape{5, 7, 3},
                        Shape{64, 2048, 256}}) {
    for (const int trans : {0, 1, 2, 3}) {
      const bool ta = trans & 1, tb = trans & 2;
      for (const Out o : {Out{false, 1.f, 0.f}, Out{true, 1.f, 0.f}, Out{true, 1.f, 1.f},
                          Out{false, 0.7f, 0.5f}, Out{true, 0.25f, 1.f}}) {
        for (const bool strided : {false, true}) {
          const std::string where = std::to_string(s.m) + "x" + std::to_string(s.n) + "x" +
                                    std::to_string(s.k) + (ta ? " a^T" : "") + (tb ? " b^T" : "") +
                                    (o.f32 ? " f32" : " bf16") + " alpha " +
                                    std::to_string(o.alpha) + " beta " + std::to_string(o.beta) +
                                    (strided ? " strided" : "");
          const int64_t a_rows = ta ? s.k : s.m, a_cols = ta ? s.m : s.k;
          const int64_t b_rows = tb ? s.n : s.k, b_cols = tb ? s.k : s.n;
          // Strided: column slices of wider matrices, at odd offsets.
          const int64_t pad = strided ? 5 : 0, off = strided ? 3 : 0;
          Pair a = act(a_rows, a_cols, a_cols + pad, off);
          Pair b = act(b_rows, b_cols, b_cols + pad, off);
          Pair out = o.f32 ? f32(s.m, s.n, s.n + pad, off) : act(s.m, s.n, s.n + pad, off);
          a.set(normal(a_rows * a_cols));
          b.set(normal(b_rows * b_cols));
          if (o.beta != 0.f) out.set(normal(s.m * s.n));  // else: NaN, which must not be read
          gpu().matmul(out.gpu.view, a.gpu.view, b.gpu.view, ta, tb, o.alpha, o.beta);
          cpu().matmul(out.cpu.view, a.cpu.view, b.cpu.view, ta, tb, o.alpha, o.beta);
          expect_close(out, o.f32 ? kF32Tol : kBf16Tol, "matmul " + where);

          if (o.beta == 0.f) {  // determinism
            const std::vector<float> first = out.gpu.get();
            gpu().matmul(out.gpu.view, a.gpu.view, b.gpu.view, ta, tb, o.alpha, o.beta);
            EXPECT_TRUE(bitwise_equal(out.gpu.get(), first)) << "not deterministic, " << where;
          }
        }
      }
    }
  }
}

// ---- RoPE ---------------------------------------------------------------------------------------

TEST_F(GpuOps, RopeForwardBackward) {
  for (const int64_t head_dim : {int64_t{128}, int64_t{64}, int64_t{24}}) {
    const int64_t n = 17, n_heads = 3, qkv_cols = 5 * head_dim, max_pos = 64, half = head_dim / 2;
    std::vector<float> cos_table(static_cast<size_t>(max_pos * half)), sin_table(cos_table.size());
    for (int64_t p = 0; p < max_pos; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = p * std::pow(10000.0, -2.0 * i / head_dim);
        cos_table[static_cast<size_t>(p * half + i)] = static_cast<float>(std::cos(angle));
        sin_table[static_cast<size_t>(p * half + i)] = static_cast<float>(std::sin(angle));
      }
    Pair cos = f32(max_pos, half), sin = f32(max_pos, half), positions = i32_vec(n);
    cos.set(cos_table);
    sin.set(sin_table);
    positions.set(ints(n, 0, static_cast<int>(max_pos - 1)));
    // q: the first n_heads heads of a fused [n, 5 heads] row; k: one head at column 3*head_dim.
    Pair qkv = act(n, qkv_cols);
    const std::vector<float> values = normal(n * qkv_cols);
    qkv.set(values);
    for (const auto& [c0, heads] : {std::pair<int64_t, int64_t>{0, n_heads}, {3 * head_dim, 1}}) {
      const std::string where =
          "head_dim " + std::to_string(head_dim) + " at column " + std::to_string(c0);
      const Tensor gpu_x = qkv.gpu.view.col_slice(c0, heads * head_dim);
      const Tensor cpu_x = qkv.cpu.view.col_slice(c0, heads * head_dim);
      gpu().rope_forward(gpu_x, positions.gpu.view, cos.gpu.view, sin.gpu.view, head_dim);
      cpu().rope_forward(cpu_x, positions.cpu.view, cos.cpu.view, sin.cpu.view, head_dim);
      expect_close(qkv, kBf16Tol, "rope forward " + where);
      gpu().rope_backward(gpu_x, positions.gpu.view, cos.gpu.view, sin.gpu.view, head_dim);
      cpu().rope_backward(cpu_x, positions.cpu.view, cos.cpu.view, sin.cpu.view, head_dim);
      expect_close(qkv, kBf16Tol, "rope backward " + where);
    }
    // Backward undoes forward (a rotation by the negative angle), up to bf16 rounding.
    EXPECT_LE(rel_l2(qkv.gpu.get(), values), kBf16Tol) << "head_dim " << head_dim;
  }
}

// ---- SwiGLU -------------------------------------------------------------------------------------

TEST_F(GpuOps, SwigluForwardBackward) {
  // pad: h and dh with padding columns (the down projection's input and dx under fused LoRA).
  for (const int64_t ffn : {int64_t{96}, int64_t{37}, int64_t{2048}})
    for (const int64_t pad : {int64_t{0}, int64_t{16}}) {
      const int64_t n = 19, ld = pad ? ffn + pad : 0;
      const std::string where = "ffn " + std::to_string(ffn) + " pad " + std::to_string(pad);
      Pair gate_up = act(n, 2 * ffn), h = act(n, ffn, ld), dh = act(n, ffn, ld), dgate_up = act(n, 2 * ffn);
      gate_up.set(normal(n * 2 * ffn, 2.f));
      dh.set(normal(n * ffn));
      auto halves = [&](const Mat& m) { return std::pair{m.view.col_slice(0, ffn), m.view.col_slice(ffn, ffn)}; };
      const auto [gpu_gate, gpu_up] = halves(gate_up.gpu);
      const auto [cpu_gate, cpu_up] = halves(gate_up.cpu);
      gpu().swiglu_forward(h.gpu.view, gpu_gate, gpu_up);
      cpu().swiglu_forward(h.cpu.view, cpu_gate, cpu_up);
      expect_close(h, kBf16Tol, "swiglu forward " + where);

      const auto [gpu_dgate, gpu_dup] = halves(dgate_up.gpu);
      const auto [cpu_dgate, cpu_dup] = halves(dgate_up.cpu);
      gpu().swiglu_backward(gpu_dgate, gpu_dup, dh.gpu.view, gpu_gate, gpu_up, Tensor());
      cpu().swiglu_backward(cpu_dgate, cpu_dup, dh.cpu.view, cpu_gate, cpu_up, Tensor());
      expect_close(dgate_up, kBf16Tol, "swiglu backward " + where);

      // In place (dgate_up aliasing gate_up) and writing h as well (a recomputed layer's backward):
      // the same dgate_up, and h bitwise as the forward wrote it.
      const std::vector<float> forward_h = h.gpu.get();
      h.gpu.poison_view();
      gpu().swiglu_backward(gpu_gate, gpu_up, dh.gpu.view, gpu_gate, gpu_up, h.gpu.view);
      EXPECT_TRUE(bitwise_equal(gate_up.gpu.get(), dgate_up.gpu.get())) << "in place, " << where;
      EXPECT_TRUE(bitwise_equal(h.gpu.get(), forward_h)) << "h from the backward, " << where;
    }
}

// ---- cross-entropy ------------------------------------------------------------------------------

TEST_F(GpuOps, CrossEntropyLargeVocabWithIgnoredRows) {
  for (const int64_t vocab : {int64_t{128256}, int64_t{37}, int64_t{32000}}) {
    const int64_t n = 6;
    const float grad_scale = 0.25f;
    const std::string where = "vocab " + std::to_string(vocab);
    Pair logits = f32(n, vocab), dlogits = act(n, vocab), losses = f32_vec(n), targets = i32_vec(n);
    logits.set(normal(n * vocab, 2.f));
    std::vector<float> t = ints(n, 0, static_cast<int>(vocab - 1));
    t[1] = t[4] = -100;
    targets.set(t);
    gpu().cross_entropy(losses.gpu.view, dlogits.gpu.view, logits.gpu.view, targets.gpu.view,
                        grad_scale);
    cpu().cross_entropy(losses.cpu.view, dlogits.cpu.view, logits.cpu.view, targets.cpu.view,
                        grad_scale);
    expect_close(losses, 1e-5, "losses " + where);
    expect_close(dlogits, kBf16Tol, "dlogits " + where);
    const std::vector<float> loss = losses.gpu.get(), grad = dlogits.gpu.get();
    EXPECT_EQ(loss[1], 0.f);
    EXPECT_EQ(loss[4], 0.f);
    for (const int64_t row : {1, 4})
      EXPECT_TRUE(std::all_of(grad.begin() + row * vocab, grad.begin() + (row + 1) * vocab,
                              [](float v) { return v == 0.f; }))
          << "ignored row " << row << " has a gradient, " << where;

    // Forward only: the same losses, bitwise, and no gradient.
    Mat losses_only = Mat::vec(gpu(), DType::f32, n);
    gpu().cross_entropy(losses_only.view, Tensor(), logits.gpu.view, targets.gpu.view, grad_scale);
    EXPECT_TRUE(bitwise_equal(losses_only.get(), loss)) << "forward only, " << where;

    // bf16 logits with the gradient written over them (the model's LM head): bitwise what f32
    // logits holding the same bf16-rounded values give.
    std::vector<float> rounded = logits.gpu.get();
    for (float& v : rounded) v = ranktune::bf16_to_f32(ranktune::f32_to_bf16(v));
    Mat rounded_f32(gpu(), DType::f32, n, vocab), in_place(gpu(), DType::bf16, n, vocab);
    rounded_f32.set(rounded);
    in_place.set(rounded);
    Mat losses_f32 = Mat::vec(gpu(), DType::f32, n), losses_bf16 = Mat::vec(gpu(), DType::f32, n);
    gpu().cross_entropy(losses_f32.view, dlogits.gpu.view, rounded_f32.view, targets.gpu.view, grad_scale);
    gpu().cross_entropy(losses_bf16.view, in_place.view, in_place.view, targets.gpu.view, grad_scale);
    EXPECT_TRUE(bitwise_equal(losses_bf16.get(), losses_f32.get())) << "bf16 in place, losses, " << where;
    EXPECT_TRUE(bitwise_equal(in_place.get(), dlogits.gpu.get())) << "bf16 in place, dlogits, " << where;
  }
}

// ---- optimizers ---------------------------------------------------------------------------------

TEST_F(GpuOps, AdamWMatchesCpuOverSteps) {
  for (const int64_t offset : {int64_t{0}, int64_t{1}}) {  // vector path and element path
    for (const bool with_compute : {true, false}) {
      const int64_t n = 10007;
      const std::string where =
          "offset " + std::to_string(offset) + (with_compute ? " with compute" : "");
      Pair master = f32_vec(n, offset), m = f32_vec(n, offset), v = f32_vec(n, offset);
      Pair grad = f32_vec(n, offset);
      master.set(normal(n));
      m.set(normal(n, 1e-2f));
      v.set(uniform(n, 1e-6f, 1e-4f));
      Mat compute = Mat::vec(gpu(), DType::bf16, n, offset);
      ranktune::AdamWParams p;
      p.lr = 1e-2f;
      p.weight_decay = 0.1f;
      p.grad_scale = 0.5f;
      for (int64_t step = 1; step <= 3; ++step) {
        p.step = step;
        grad.set(normal(n, 1e-2f));
        gpu().adamw_step(master.gpu.view, with_compute ? compute.view : Tensor(), grad.gpu.view,
                         m.gpu.view, v.gpu.view, p);
        cpu().adamw_step(master.cpu.view, master.cpu.view, grad.cpu.view, m.cpu.view, v.cpu.view,
                         p);
      }
      expect_close(master, 1e-6, "master " + where);
      expect_close(m, 1e-6, "m " + where);
      expect_close(v, 1e-6, "v " + where);
      const std::vector<float> got = compute.get();
      if (with_compute) {
        std::vector<float> want = master.gpu.get();
        for (float& x : want) x = round_bf16(x);
        EXPECT_TRUE(bitwise_equal(got, want)) << "compute is not bf16(master), " << where;
      } else {
        EXPECT_EQ(count_nonfinite(got), n) << "compute written, " << where;
      }
    }
  }
}

TEST_F(GpuOps, AdamW8BitMatchesCpuOverSteps) {
  for (const int64_t offset : {int64_t{0}, int64_t{1}}) {  // vector path and element path
    const int64_t n = 3 * ranktune::kAdam8BitBlock + 123;
    const int64_t n_blocks = (n + ranktune::kAdam8BitBlock - 1) / ranktune::kAdam8BitBlock;
    const std::string where = "offset " + std::to_string(offset);
    Pair master = f32_vec(n, offset), grad = f32_vec(n, offset);
    Pair m_q(gpu(), cpu(), DType::u8, DType::u8, 1, n, 0, offset, true);
    Pair v_q(gpu(), cpu(), DType::u8, DType::u8, 1, n, 0, offset, true);
    Pair m_absmax = f32_vec(n_blocks), v_absmax = f32_vec(n_blocks);
    master.set(normal(n));
    m_q.set(ints(n, 0, 255));
    v_q.set(ints(n, 0, 255));
    m_absmax.set(uniform(n_blocks, 1e-3f, 1e-2f));
    v_absmax.set(uniform(n_blocks, 1e-5f, 1e-4f));
    Mat compute = Mat::vec(gpu(), DType::bf16, n, offset);
    ranktune::AdamWParams p;
    p.lr = 1e-2f;
    p.weight_decay = 0.1f;
    for (int64_t step = 1; step <= 3; ++step) {
      p.step = step;
      grad.set(normal(n, 1e-2f));
      gpu().adamw8bit_step(master.gpu.view, compute.view, grad.gpu.view, m_q.gpu.view, v_q.gpu.view,
                           m_absmax.gpu.view, v_absmax.gpu.view, p);
      cpu().adamw8bit_step(master.cpu.view, master.cpu.view, grad.cpu.view, m_q.cpu.view,
                           v_q.cpu.view, m_absmax.cpu.view, v_absmax.cpu.view, p);
    }
    expect_close(master, 1e-5, "master " + where);
    expect_close(m_absmax, 1e-5, "m absmax " + where);
    expect_close(v_absmax, 1e-5, "v absmax " + where);
    // Codes: equal, or one apart where the fp32 moment sits on a rounding boundary.
    for (const Pair* codes : {&m_q, &v_q}) {
      const std::vector<float> got = codes->gpu.get(), want = codes->cpu.get();
      int64_t off_by_one = 0, further = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const float d = std::fabs(got[i] - want[i]);
        off_by_one += d == 1.f;
        further += d > 1.f;
      }
      EXPECT_EQ(further, 0) << where;
      EXPECT_LE(off_by_one, n / 1000) << where;
      EXPECT_EQ(codes->gpu.touched_outside(), 0) << where;
    }
    std::vector<float> want = master.gpu.get();
    for (float& x : want) x = round_bf16(x);
    EXPECT_TRUE(bitwise_equal(compute.get(), want)) << "compute is not bf16(master), " << where;
  }
}

// ---- the factory --------------------------------------------------------------------------------

TEST(GpuBackendFactory, RejectsDevicesThatDoNotExist) {
  SKIP_WITHOUT_GPU();
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess);
  EXPECT_THROW(ranktune::make_cuda_backend(-1), ranktune::UserError);
  EXPECT_THROW(ranktune::make_cuda_backend(count), ranktune::UserError);
  const auto backend = ranktune::make_cuda_backend(0);
  EXPECT_EQ(backend->device(), ranktune::Device::cuda);
  EXPECT_EQ(backend->act_dtype(), DType::bf16);
  EXPECT_EQ(backend->name().rfind("cuda:0 (", 0), 0u) << backend->name();
}

}  // namespace

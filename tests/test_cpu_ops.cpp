// The CPU backend against independent references: gradients against central finite differences of
// a scalar loss L = sum(out * W) with random W, forwards against naive double-precision loops, the
// optimizers against the PyTorch formula, and determinism across runs and thread counts. Sizes are
// tiny (and odd, to cross the backend's tile and block edges) so the whole suite runs in seconds.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ranktune/backend.h"

namespace ranktune {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> random_values(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A contiguous [rows, cols] f32 view of host storage (the CPU backend works on host memory).
Tensor matrix(std::vector<float>& storage, int64_t rows, int64_t cols) {
  EXPECT_GE(static_cast<int64_t>(storage.size()), rows * cols);
  return Tensor(storage.data(), DType::f32, Device::cpu, {rows, cols});
}

Tensor vector_f32(std::vector<float>& storage) {
  return Tensor(storage.data(), DType::f32, Device::cpu, {static_cast<int64_t>(storage.size())});
}

Tensor vector_i32(std::vector<int32_t>& storage) {
  return Tensor(storage.data(), DType::i32, Device::cpu, {static_cast<int64_t>(storage.size())});
}

float& at(const Tensor& t, int64_t r, int64_t c) { return t.ptr<float>()[r * t.ld() + c]; }

// sum(out * weights) in double, both [rows, cols] views.
double weighted_sum(const Tensor& out, const Tensor& weights) {
  double sum = 0.0;
  for (int64_t r = 0; r < out.rows(); ++r)
    for (int64_t c = 0; c < out.cols(); ++c)
      sum += static_cast<double>(at(out, r, c)) * at(weights, r, c);
  return sum;
}

// Sets the OpenMP thread count for a scope.
class ThreadCount {
 public:
  explicit ThreadCount(int n) : previous_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(previous_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int previous_;
};

// Compares the analytic gradient grad (same shape as input) with central differences of loss()
// taken by perturbing each element of input in place.
void expect_gradient(const std::string& what, const Tensor& input, const Tensor& grad,
                     const std::function<double()>& loss, float eps = 1e-2f, double rtol = 1e-2,
                     double atol = 1e-3) {
  ASSERT_EQ(input.rows(), grad.rows());
  ASSERT_EQ(input.cols(), grad.cols());
  // Thousands of tiny forward calls: on one thread they do not pay a parallel-region wake-up each,
  // which dominates on a loaded machine. (Multi-threaded results are checked bitwise elsewhere.)
  const ThreadCount single_thread(1);
  int failures = 0;
  for (int64_t r = 0; r < input.rows(); ++r) {
    for (int64_t c = 0; c < input.cols(); ++c) {
      float& x = at(input, r, c);
      const float saved = x;
      const float x_plus = saved + eps, x_minus = saved - eps;
      x = x_plus;
      const double loss_plus = loss();
      x = x_minus;
      const double loss_minus = loss();
      x = saved;
      const double numeric =
          (loss_plus - loss_minus) / (static_cast<double>(x_plus) - static_cast<double>(x_minus));
      const double analytic = at(grad, r, c);
      if (std::fabs(analytic - numeric) > atol + rtol * std::fabs(numeric) && failures++ < 5)
        ADD_FAILURE() << what << "[" << r << "," << c << "]: analytic " << analytic
                      << " vs finite difference " << numeric;
    }
  }
  EXPECT_EQ(failures, 0) << what << ": elements off";
}

// ---- memory, copies, elementwise -------------------------------------------------------------

TEST(CpuOps, IdentityAllocAndCopies) {
  auto backend = make_cpu_backend();
  EXPECT_EQ(backend->name(), "cpu");
  EXPECT_EQ(backend->device(), Device::cpu);
  EXPECT_EQ(backend->act_dtype(), DType::f32);

  Buffer buffer = backend->alloc(40 * sizeof(float));
  Tensor t = buffer.as(DType::f32, {4, 10});
  for (int64_t i = 0; i < 40; ++i) EXPECT_EQ(t.ptr<float>()[i], 0.0f);
  std::vector<float> host = random_values(40, 1), back(40);
  backend->upload(t, host.data());
  backend->download(back.data(), t);
  EXPECT_EQ(host, back);

  // Strided f32 copy into the middle columns of a wider matrix leaves the other columns alone.
  std::vector<float> wide(4 * 16, -7.0f);
  Tensor dst = matrix(wide, 4, 16).col_slice(3, 10);
  backend->copy(dst, t);
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t c = 0; c < 16; ++c)
      EXPECT_EQ(wide[static_cast<size_t>(r * 16 + c)],
                c >= 3 && c < 13 ? host[static_cast<size_t>(r * 10 + c - 3)] : -7.0f);

  // f32 -> bf16 rounds as f32_to_bf16 does; bf16 -> f32 is exact.
  std::vector<uint16_t> half(40);
  Tensor t_bf16(half.data(), DType::bf16, Device::cpu, {4, 10});
  backend->copy(t_bf16, dst);
  for (size_t i = 0; i < 40; ++i) EXPECT_EQ(half[i], f32_to_bf16(host[i]));
  std::vector<float> widened(40);
  backend->copy(matrix(widened, 4, 10), t_bf16);
  for (size_t i = 0; i < 40; ++i) EXPECT_EQ(widened[i], bf16_to_f32(half[i]));

  backend->fill(dst, 2.5f);
  backend->scale(dst, -2.0f);
  for (int64_t r = 0; r < 4; ++r) {
    EXPECT_EQ(wide[static_cast<size_t>(r * 16 + 2)], -7.0f);
    EXPECT_EQ(wide[static_cast<size_t>(r * 16 + 3)], -5.0f);
    EXPECT_EQ(wide[static_cast<size_t>(r * 16 + 12)], -5.0f);
    EXPECT_EQ(wide[static_cast<size_t>(r * 16 + 13)], -7.0f);
  }

  // y += x between two strided views.
  std::vector<float> other = random_values(4 * 12, 2);
  Tensor x = matrix(other, 4, 12).col_slice(1, 10);
  backend->add(dst, x);
  for (int64_t r = 0; r < 4; ++r) {
    EXPECT_EQ(wide[static_cast<size_t>(r * 16 + 2)], -7.0f);
    for (int64_t c = 0; c < 10; ++c) EXPECT_EQ(at(dst, r, c), -5.0f + at(x, r, c));
  }
}

TEST(CpuOps, SumSquaresIsExactAndThreadCountIndependent) {
  auto backend = make_cpu_backend();
  std::vector<float> x = random_values(100003, 2, -3.0f, 3.0f);
  long double reference = 0.0L;
  for (float v : x) reference += static_cast<long double>(v) * v;
  const auto sum_squares_on = [&](int threads) {
    const ThreadCount scope(threads);
    return backend->sum_squares(vector_f32(x));
  };
  const double one_thread = sum_squares_on(1), three_threads = sum_squares_on(3);
  EXPECT_NEAR(one_thread, static_cast<double>(reference), 1e-11 * static_cast<double>(reference));
  EXPECT_EQ(one_thread, three_threads);
}

TEST(CpuOps, DropoutMaskRateRepeatAndIdentity) {
  auto backend = make_cpu_backend();
  const int64_t rows = 200, cols = 500, ld = 503;
  const float p = 0.1f;
  const uint64_t seed = 1234;
  std::vector<float> in_storage = random_values(static_cast<size_t>(rows * ld), 3, 0.5f, 1.5f);
  Tensor in = matrix(in_storage, rows, ld).col_slice(1, cols);
  std::vector<float> out_storage(static_cast<size_t>(rows * ld), -9.0f);
  Tensor out = matrix(out_storage, rows, ld).col_slice(2, cols);

  backend->dropout(out, in, p, seed);
  int64_t dropped = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      // The mask is indexed by the logical position, not the memory offset of the strided view.
      const bool keep = dropout_keep(seed, static_cast<uint64_t>(r * cols + c), p);
      EXPECT_EQ(at(out, r, c), keep ? at(in, r, c) * (1.0f / (1.0f - p)) : 0.0f);
      dropped += keep ? 0 : 1;
    }
    EXPECT_EQ(out_storage[static_cast<size_t>(r * ld + 1)], -9.0f);  // outside the view
  }
  // 100k Bernoulli(0.1) draws: the standard deviation of the rate is ~0.001.
  EXPECT_NEAR(static_cast<double>(dropped) / static_cast<double>(rows * cols), p, 0.005);

  std::vector<float> first(out_storage);
  backend->dropout(out, in, p, seed);
  EXPECT_EQ(first, out_storage) << "same seed, same mask";
  backend->dropout(out, in, p, seed + 1);
  EXPECT_NE(first, out_storage) << "another seed, another mask";

  backend->dropout(out, in, 0.0f, seed);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(at(out, r, c), at(in, r, c));
}

// ---- matmul ------------------------------------------------------------------------------------

// A [rows, cols] view into a wider, randomly filled matrix, starting at column `offset`.
struct StridedMatrix {  // not copyable: view points into storage
  std::vector<float> storage;
  Tensor view;
  StridedMatrix(int64_t rows, int64_t cols, int64_t extra_cols, uint32_t seed, float fill = 0.0f,
                bool random = true) {
    const int64_t ld = cols + extra_cols;
    storage = random ? random_values(static_cast<size_t>(rows * ld), seed)
                     : std::vector<float>(static_cast<size_t>(rows * ld), fill);
    view = matrix(storage, rows, ld).col_slice(extra_cols / 2, cols);
  }
  StridedMatrix(const StridedMatrix&) = delete;
  StridedMatrix& operator=(const StridedMatrix&) = delete;
};

// op(m)[i, j] of a view.
double op_at(const Tensor& m, bool trans, int64_t i, int64_t j) {
  return trans ? at(m, j, i) : at(m, i, j);
}

TEST(CpuOps, MatmulMatchesReferenceForAllTransposes) {
  auto backend = make_cpu_backend();
  // Crosses the backend's 16-row, 256-column and 128-deep tiles.
  const int64_t M = 37, N = 300, K = 150;
  for (bool trans_a : {false, true}) {
    for (bool trans_b : {false, true}) {
      SCOPED_TRACE(std::string("trans_a ") + (trans_a ? "1" : "0") + ", trans_b " +
                   (trans_b ? "1" : "0"));
      StridedMatrix a(trans_a ? K : M, trans_a ? M : K, 5, 10);
      StridedMatrix b(trans_b ? N : K, trans_b ? K : N, 3, 11);
      StridedMatrix out(M, N, 4, 12);

      // beta == 0: out starts as NaN and must not be read.
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) at(out.view, i, j) = kNaN;
      backend->matmul(out.view, a.view, b.view, trans_a, trans_b, 1.0f, 0.0f);
      int bad = 0;
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) {
          double ref = 0.0;
          for (int64_t k = 0; k < K; ++k)
            ref += op_at(a.view, trans_a, i, k) * op_at(b.view, trans_b, k, j);
          bad += !(std::fabs(at(out.view, i, j) - ref) <= 1e-4);
        }
      }
      EXPECT_EQ(bad, 0) << "elements off with beta 0";

      // alpha/beta accumulate into the previous contents.
      StridedMatrix acc(M, N, 4, 12), acc_before(M, N, 4, 12);
      backend->matmul(acc.view, a.view, b.view, trans_a, trans_b, 1.5f, 0.5f);
      bad = 0;
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) {
          double ref = 0.0;
          for (int64_t k = 0; k < K; ++k)
            ref += op_at(a.view, trans_a, i, k) * op_at(b.view, trans_b, k, j);
          ref = 1.5 * ref + 0.5 * at(acc_before.view, i, j);
          bad += !(std::fabs(at(acc.view, i, j) - ref) <= 2e-4);
        }
      }
      EXPECT_EQ(bad, 0) << "elements off with alpha 1.5, beta 0.5";
      // Columns outside the out view are untouched.
      for (int64_t i = 0; i < M; ++i) {
        const size_t first = static_cast<size_t>(i * (N + 4)), last = first + N + 3;
        EXPECT_EQ(acc.storage[first], acc_before.storage[first]);
        EXPECT_EQ(acc.storage[last], acc_before.storage[last]);
      }
    }
  }
}

// The backward of out = op(a) @ op(b), written with the matmul op itself as the model does, and
// accumulated (beta 1) into gradients that already hold something.
TEST(CpuOps, MatmulGradientsByFiniteDifferences) {
  auto backend = make_cpu_backend();
  const int64_t M = 5, N = 7, K = 9;
  for (bool trans_a : {false, true}) {
    for (bool trans_b : {false, true}) {
      SCOPED_TRACE(std::string("trans_a ") + (trans_a ? "1" : "0") + ", trans_b " +
                   (trans_b ? "1" : "0"));
      StridedMatrix a(trans_a ? K : M, trans_a ? M : K, 2, 20);
      StridedMatrix b(trans_b ? N : K, trans_b ? K : N, 3, 21);
      StridedMatrix out(M, N, 1, 22);
      std::vector<float> w_storage = random_values(static_cast<size_t>(M * N), 23);
      Tensor w = matrix(w_storage, M, N);
      const auto loss = [&] {
        backend->matmul(out.view, a.view, b.view, trans_a, trans_b, 1.0f, 0.0f);
        return weighted_sum(out.view, w);
      };
      StridedMatrix da(a.view.rows(), a.view.cols(), 2, 24),
          db(b.view.rows(), b.view.cols(), 1, 25);
      const std::vector<float> da_before = da.storage, db_before = db.storage;
      // dop(a) = dout @ op(b)^T, dop(b) = op(a)^T @ dout, transposed back where the operand was.
      if (!trans_a)
        backend->matmul(da.view, w, b.view, false, !trans_b, 1.0f, 1.0f);
      else
        backend->matmul(da.view, b.view, w, trans_b, true, 1.0f, 1.0f);
      if (!trans_b)
        backend->matmul(db.view, a.view, w, !trans_a, false, 1.0f, 1.0f);
      else
        backend->matmul(db.view, w, a.view, true, trans_a, 1.0f, 1.0f);
      for (size_t i = 0; i < da.storage.size(); ++i) da.storage[i] -= da_before[i];
      for (size_t i = 0; i < db.storage.size(); ++i) db.storage[i] -= db_before[i];
      expect_gradient("da", a.view, da.view, loss);
      expect_gradient("db", b.view, db.view, loss);
    }
  }
}

// ---- embedding ---------------------------------------------------------------------------------

TEST(CpuOps, EmbeddingForwardAndBackward) {
  auto backend = make_cpu_backend();
  const int64_t vocab = 7, channels = 70, n_tokens = 12;  // 70 crosses the 64-column blocks
  std::vector<int32_t> token_ids = {3, 1, 3, 0, 6, 3, 1, 2, 2, 5, 3, 0};  // repeats; 4 unused
  Tensor tokens = vector_i32(token_ids);
  std::vector<float> table_storage = random_values(static_cast<size_t>(vocab * channels), 30);
  Tensor table = matrix(table_storage, vocab, channels);
  std::vector<float> out_storage(static_cast<size_t>(n_tokens * channels));
  Tensor out = matrix(out_storage, n_tokens, channels);
  std::vector<float> w_storage = random_values(static_cast<size_t>(n_tokens * channels), 31);
  Tensor w = matrix(w_storage, n_tokens, channels);

  backend->embedding_forward(out, tokens, table);
  for (int64_t n = 0; n < n_tokens; ++n)
    for (int64_t c = 0; c < channels; ++c) ASSERT_EQ(at(out, n, c), at(table, token_ids[n], c));

  // beta 0 overwrites (dtable starts as NaN).
  std::vector<float> dtable_storage(static_cast<size_t>(vocab * channels), kNaN);
  Tensor dtable = matrix(dtable_storage, vocab, channels);
  backend->embedding_backward(dtable, w, tokens, 0.0f);
  expect_gradient("dtable", table, dtable, [&] {
    backend->embedding_forward(out, tokens, table);
    return weighted_sum(out, w);
  });

  // beta 0.5: bitwise the serial loop "scale, then add rows in order of n".
  std::vector<float> prior = random_values(dtable_storage.size(), 32);
  std::vector<float> expected(prior);
  for (float& x : expected) x *= 0.5f;
  for (int64_t n = 0; n < n_tokens; ++n)
    for (int64_t c = 0; c < channels; ++c)
      expected[static_cast<size_t>(token_ids[n] * channels + c)] += at(w, n, c);
  dtable_storage = prior;
  backend->embedding_backward(dtable, w, tokens, 0.5f);
  EXPECT_EQ(dtable_storage, expected);
}

// ---- RMSNorm -----------------------------------------------------------------------------------

TEST(CpuOps, ResidualRmsnormGradients) {
  auto backend = make_cpu_backend();
  const int64_t n_rows = 6, channels = 70;
  const float eps = 1e-5f;
  const size_t size = static_cast<size_t>(n_rows * channels);
  std::vector<float> residual_in_s = random_values(size, 40), delta_s = random_values(size, 41);
  std::vector<float> weight_s = random_values(static_cast<size_t>(channels), 42, 0.5f, 1.5f);
  std::vector<float> residual_out_s(size), norm_out_s(size), rstd_s(static_cast<size_t>(n_rows));
  std::vector<float> w_norm_s = random_values(size, 43), w_residual_s = random_values(size, 44);
  Tensor residual_in = matrix(residual_in_s, n_rows, channels),
         delta = matrix(delta_s, n_rows, channels);
  Tensor residual_out = matrix(residual_out_s, n_rows, channels);
  Tensor norm_out = matrix(norm_out_s, n_rows, channels), rstd = vector_f32(rstd_s);
  Tensor weight = vector_f32(weight_s).view({1, channels});
  Tensor w_norm = matrix(w_norm_s, n_rows, channels),
         w_residual = matrix(w_residual_s, n_rows, channels);

  // With the residual add: L = sum(w_norm * norm_out) + sum(w_residual * residual_out).
  const auto loss = [&] {
    backend->residual_rmsnorm_forward(residual_out, norm_out, rstd, residual_in, delta, weight,
                                      eps);
    return weighted_sum(norm_out, w_norm) + weighted_sum(residual_out, w_residual);
  };
  loss();
  for (int64_t n = 0; n < n_rows; ++n) {
    double sum_sq = 0.0;
    for (int64_t c = 0; c < channels; ++c) {
      const double x = static_cast<double>(at(residual_in, n, c)) + at(delta, n, c);
      EXPECT_EQ(at(residual_out, n, c), at(residual_in, n, c) + at(delta, n, c));
      sum_sq += x * x;
    }
    EXPECT_NEAR(rstd_s[static_cast<size_t>(n)], 1.0 / std::sqrt(sum_sq / channels + eps), 1e-6);
  }
  // The gradient reaching residual_out arrives in dresidual; the norm's dx accumulates onto it.
  std::vector<float> dresidual_s(w_residual_s), dweight_s(static_cast<size_t>(channels), kNaN);
  Tensor dresidual = matrix(dresidual_s, n_rows, channels);
  Tensor dweight = vector_f32(dweight_s).view({1, channels});
  backend->rmsnorm_backward(dresidual, dweight, 0.0f, w_norm, residual_out, weight, rstd);
  expect_gradient("d residual_in", residual_in, dresidual, loss);
  expect_gradient("d delta", delta, dresidual, loss);
  expect_gradient("d weight", weight, dweight, loss);

  // dweight_beta accumulates; dresidual gets the same dx added again.
  const std::vector<float> dweight_first(dweight_s);
  backend->rmsnorm_backward(dresidual, dweight, 0.5f, w_norm, residual_out, weight, rstd);
  for (int64_t c = 0; c < channels; ++c)
    EXPECT_NEAR(dweight_s[static_cast<size_t>(c)], 1.5f * dweight_first[static_cast<size_t>(c)],
                1e-5);

  // Without the residual add: x = residual_in, residual_out is not touched.
  std::fill(residual_out_s.begin(), residual_out_s.end(), kNaN);
  const auto loss_no_delta = [&] {
    backend->residual_rmsnorm_forward(residual_out, norm_out, rstd, residual_in, Tensor(), weight,
                                      eps);
    return weighted_sum(norm_out, w_norm);
  };
  loss_no_delta();
  EXPECT_TRUE(std::isnan(residual_out_s[0]));
  std::fill(dresidual_s.begin(), dresidual_s.end(), 0.0f);
  backend->rmsnorm_backward(dresidual, Tensor(), 0.0f, w_norm, residual_in, weight, rstd);
  expect_gradient("d residual_in without delta", residual_in, dresidual, loss_no_delta);
}

// ---- RoPE
// ----------------------------------------------------------------------------------------

TEST(CpuOps, RopeMatchesRotateHalfAndItsGradient) {
  auto backend = make_cpu_backend();
  const int64_t n_rows = 5, n_heads = 3, head_dim = 6, half = head_dim / 2, max_pos = 16;
  std::vector<float> cos_s(static_cast<size_t>(max_pos * half)), sin_s(cos_s.size());
  for (int64_t pos = 0; pos < max_pos; ++pos) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = pos * std::pow(10000.0, -2.0 * static_cast<double>(i) / head_dim);
      cos_s[static_cast<size_t>(pos * half + i)] = static_cast<float>(std::cos(angle));
      sin_s[static_cast<size_t>(pos * half + i)] = static_cast<float>(std::sin(angle));
    }
  }
  Tensor cos = matrix(cos_s, max_pos, half), sin = matrix(sin_s, max_pos, half);
  std::vector<int32_t> position_ids = {0, 7, 3, 15, 1};
  Tensor positions = vector_i32(position_ids);

  // x is the q part of a fused projection: a strided column slice.
  StridedMatrix x(n_rows, n_heads * head_dim, 4, 50);
  const std::vector<float> x_original = x.storage;
  backend->rope_forward(x.view, positions, cos, sin, head_dim);
  StridedMatrix original(n_rows, n_heads * head_dim, 4, 50);
  for (int64_t n = 0; n < n_rows; ++n) {
    for (int64_t h = 0; h < n_heads; ++h) {
      for (int64_t i = 0; i < half; ++i) {
        const double c = cos_s[static_cast<size_t>(position_ids[n] * half + i)];
        const double s = sin_s[static_cast<size_t>(position_ids[n] * half + i)];
        const double x1 = at(original.view, n, h * head_dim + i);
        const double x2 = at(original.view, n, h * head_dim + i + half);
        EXPECT_NEAR(at(x.view, n, h * head_dim + i), x1 * c - x2 * s, 1e-6);
        EXPECT_NEAR(at(x.view, n, h * head_dim + i + half), x2 * c + x1 * s, 1e-6);
      }
    }
    EXPECT_EQ(x.storage[static_cast<size_t>(n * 22)], x_original[static_cast<size_t>(n * 22)]);
  }
  // The backward is the inverse rotation: forward then backward gives x back.
  backend->rope_backward(x.view, positions, cos, sin, head_dim);
  for (size_t i = 0; i < x.storage.size(); ++i) EXPECT_NEAR(x.storage[i], x_original[i], 1e-6);

  StridedMatrix rotated(n_rows, n_heads * head_dim, 2, 0, 0.0f, false);
  std::vector<float> w_storage =
      random_values(static_cast<size_t>(n_rows * n_heads * head_dim), 51);
  Tensor w = matrix(w_storage, n_rows, n_heads * head_dim);
  StridedMatrix dx(n_rows, n_heads * head_dim, 6, 0, 0.0f, false);
  backend->copy(dx.view, w);
  backend->rope_backward(dx.view, positions, cos, sin, head_dim);
  expect_gradient("rope dx", x.view, dx.view, [&] {
    backend->copy(rotated.view, x.view);
    backend->rope_forward(rotated.view, positions, cos, sin, head_dim);
    return weighted_sum(rotated.view, w);
  });
}

// ---- attention
// -----------------------------------------------------------------------------------

struct AttnCase {
  int64_t batch, seq_len, n_heads, n_kv_heads, head_dim;
  bool packed;  // with doc_ids
};

TEST(CpuOps, AttentionMatchesReferenceAndGradients) {
  auto backend = make_cpu_backend();
  const AttnCase cases[] = {
      {2, 5, 4, 2, 6, false}, {2, 5, 4, 1, 6, false},  {2, 7, 4, 2, 6, true},
      {1, 9, 4, 1, 12, true}, {2, 6, 4, 4, 12, false},
  };
  for (const AttnCase& tc : cases) {
    SCOPED_TRACE("B " + std::to_string(tc.batch) + " T " + std::to_string(tc.seq_len) + " H " +
                 std::to_string(tc.n_heads) + " Hkv " + std::to_string(tc.n_kv_heads) + " D " +
                 std::to_string(tc.head_dim) + (tc.packed ? " packed" : ""));
    const AttnShape shape{tc.batch,    tc.seq_len,
                          tc.n_heads,  tc.n_kv_heads,
                          tc.head_dim, 1.0f / std::sqrt(static_cast<float>(tc.head_dim))};
    const int64_t B = tc.batch, T = tc.seq_len, H = tc.n_heads, Hkv = tc.n_kv_heads,
                  D = tc.head_dim, N = B * T;
    const int64_t q_cols = H * D, kv_cols = Hkv * D, qkv_cols = q_cols + 2 * kv_cols;
    // q, k, v as column slices of one fused [N, qkv] matrix with 3 padding columns.
    std::vector<float> qkv_s =
        random_values(static_cast<size_t>(N * (qkv_cols + 3)), 60, -1.5f, 1.5f);
    Tensor qkv = matrix(qkv_s, N, qkv_cols + 3);
    Tensor q = qkv.col_slice(1, q_cols), k = qkv.col_slice(1 + q_cols, kv_cols),
           v = qkv.col_slice(1 + q_cols + kv_cols, kv_cols);
    std::vector<int32_t> doc_s(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n)  // documents of 2-3 tokens, ids restarting per batch row
      doc_s[static_cast<size_t>(n)] = static_cast<int32_t>(10 * (n / T) + (n % T + 1) / 3);
    Tensor doc_ids = tc.packed ? vector_i32(doc_s) : Tensor();
    StridedMatrix out(N, q_cols, 2, 0, 0.0f, false);
    std::vector<float> lse_s(static_cast<size_t>(B * H * T));
    Tensor lse = Tensor(lse_s.data(), DType::f32, Device::cpu, {B, H, T});

    backend->attention_forward(out.view, lse, q, k, v, doc_ids, shape);
    // Reference: the full masked score matrix of each (b, h) in double.
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t kvh = h / (H / Hkv);
        for (int64_t t = 0; t < T; ++t) {
          std::vector<double> scores(static_cast<size_t>(T), -INFINITY);
          for (int64_t j = 0; j < T; ++j) {
            const bool visible =
                j <= t && (!tc.packed || doc_s[static_cast<size_t>(b * T + j)] ==
                                             doc_s[static_cast<size_t>(b * T + t)]);
            if (!visible) continue;
            double s = 0.0;
            for (int64_t d = 0; d < D; ++d)
              s += static_cast<double>(at(q, b * T + t, h * D + d)) * at(k, b * T + j, kvh * D + d);
            scores[static_cast<size_t>(j)] = s * shape.scale;
          }
          double sum = 0.0;
          for (double s : scores) sum += std::exp(s);
          EXPECT_NEAR(lse_s[static_cast<size_t>((b * H + h) * T + t)], std::log(sum), 1e-5);
          for (int64_t d = 0; d < D; ++d) {
            double o = 0.0;
            for (int64_t j = 0; j < T; ++j)
              o += std::exp(scores[static_cast<size_t>(j)]) / sum * at(v, b * T + j, kvh * D + d);
            EXPECT_NEAR(at(out.view, b * T + t, h * D + d), o, 1e-5);
          }
        }
      }
    }

    std::vector<float> w_s = random_values(static_cast<size_t>(N * q_cols), 61);
    Tensor w = matrix(w_s, N, q_cols);
    // dq/dk/dv are written, not accumulated: their buffer starts as NaN.
    std::vector<float> dqkv_s(qkv_s.size(), kNaN);
    Tensor dqkv = matrix(dqkv_s, N, qkv_cols + 3);
    Tensor dq = dqkv.col_slice(1, q_cols), dk = dqkv.col_slice(1 + q_cols, kv_cols),
           dv = dqkv.col_slice(1 + q_cols + kv_cols, kv_cols);
    backend->attention_backward(dq, dk, dv, w, out.view, lse, q, k, v, doc_ids, shape);
    StridedMatrix scratch_out(N, q_cols, 0, 0, 0.0f, false);
    std::vector<float> scratch_lse(lse_s.size());
    Tensor scratch_lse_t(scratch_lse.data(), DType::f32, Device::cpu, {B, H, T});
    const auto loss = [&] {
      backend->attention_forward(scratch_out.view, scratch_lse_t, q, k, v, doc_ids, shape);
      return weighted_sum(scratch_out.view, w);
    };
    expect_gradient("dq", q, dq, loss);
    expect_gradient("dk", k, dk, loss);
    expect_gradient("dv", v, dv, loss);
  }
}

// ---- SwiGLU
// --------------------------------------------------------------------------------------

TEST(CpuOps, SwigluGradients) {
  auto backend = make_cpu_backend();
  const int64_t n_rows = 4, ffn = 13;
  std::vector<float> gate_up_s =
      random_values(static_cast<size_t>(n_rows * 2 * ffn), 70, -4.0f, 4.0f);
  Tensor gate_up = matrix(gate_up_s, n_rows, 2 * ffn);
  Tensor gate = gate_up.col_slice(0, ffn), up = gate_up.col_slice(ffn, ffn);
  std::vector<float> h_s(static_cast<size_t>(n_rows * ffn)), w_s = random_values(h_s.size(), 71);
  Tensor h = matrix(h_s, n_rows, ffn), w = matrix(w_s, n_rows, ffn);

  backend->swiglu_forward(h, gate, up);
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t c = 0; c < ffn; ++c) {
      const double g = at(gate, r, c);
      EXPECT_NEAR(at(h, r, c), g / (1.0 + std::exp(-g)) * at(up, r, c), 1e-5);
    }

  std::vector<float> dgate_up_s(gate_up_s.size(), kNaN);
  Tensor dgate_up = matrix(dgate_up_s, n_rows, 2 * ffn);
  Tensor dgate = dgate_up.col_slice(0, ffn), dup = dgate_up.col_slice(ffn, ffn);
  backend->swiglu_backward(dgate, dup, w, gate, up, Tensor());
  // Asked for h too (a recomputed layer's backward), it writes the forward's h to the bit and the
  // same gradients.
  std::vector<float> h2_s(h_s.size(), kNaN), dgate_up2_s(gate_up_s.size(), kNaN);
  Tensor h2 = matrix(h2_s, n_rows, ffn), dgate_up2 = matrix(dgate_up2_s, n_rows, 2 * ffn);
  backend->swiglu_backward(dgate_up2.col_slice(0, ffn), dgate_up2.col_slice(ffn, ffn), w, gate, up, h2);
  EXPECT_EQ(0, std::memcmp(h2_s.data(), h_s.data(), h_s.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(dgate_up2_s.data(), dgate_up_s.data(), dgate_up_s.size() * sizeof(float)));
  const auto loss = [&] {
    backend->swiglu_forward(h, gate, up);
    return weighted_sum(h, w);
  };
  expect_gradient("dgate", gate, dgate, loss);
  expect_gradient("dup", up, dup, loss);

  // Saturated gates stay finite.
  at(gate, 0, 0) = -200.0f;
  at(gate, 0, 1) = 200.0f;
  backend->swiglu_forward(h, gate, up);
  backend->swiglu_backward(dgate, dup, w, gate, up, Tensor());
  for (float x : h_s) EXPECT_TRUE(std::isfinite(x));
  for (float x : dgate_up_s) EXPECT_TRUE(std::isfinite(x));
}

// ---- cross-entropy ---------------------------------------------------------------------------

TEST(CpuOps, CrossEntropyLossesIgnoredRowsAndGradient) {
  auto backend = make_cpu_backend();
  const int64_t n_rows = 6, vocab = 11;
  const float grad_scale = 0.25f;
  std::vector<float> logits_s = random_values(static_cast<size_t>(n_rows * vocab), 80, -3.0f, 3.0f);
  Tensor logits = matrix(logits_s, n_rows, vocab);
  std::vector<int32_t> target_s = {3, -100, 0, 10, -100, 7};
  Tensor targets = vector_i32(target_s);
  std::vector<float> losses_s(static_cast<size_t>(n_rows), kNaN);
  Tensor losses = vector_f32(losses_s);
  std::vector<float> dlogits_s(logits_s.size(), kNaN);
  Tensor dlogits = matrix(dlogits_s, n_rows, vocab);

  backend->cross_entropy(losses, dlogits, logits, targets, grad_scale);
  for (int64_t n = 0; n < n_rows; ++n) {
    if (target_s[static_cast<size_t>(n)] == -100) {
      EXPECT_EQ(losses_s[static_cast<size_t>(n)], 0.0f);
      for (int64_t c = 0; c < vocab; ++c) EXPECT_EQ(at(dlogits, n, c), 0.0f);
      continue;
    }
    double sum = 0.0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(static_cast<double>(at(logits, n, c)));
    EXPECT_NEAR(losses_s[static_cast<size_t>(n)],
                std::log(sum) - at(logits, n, target_s[static_cast<size_t>(n)]), 1e-5);
  }
  std::vector<float> forward_only(static_cast<size_t>(n_rows));
  backend->cross_entropy(vector_f32(forward_only), Tensor(), logits, targets, grad_scale);
  EXPECT_EQ(forward_only, losses_s);

  // dlogits is the gradient of grad_scale * sum(losses).
  expect_gradient("dlogits", logits, dlogits, [&] {
    backend->cross_entropy(vector_f32(forward_only), Tensor(), logits, targets, grad_scale);
    double sum = 0.0;
    for (float l : forward_only) sum += l;
    return grad_scale * sum;
  });

  // Huge logits do not overflow: shifting a row by 1000 keeps its loss and gradient.
  std::vector<float> shifted_s(logits_s);
  for (int64_t c = 0; c < vocab; ++c) shifted_s[static_cast<size_t>(vocab + c)] += 1000.0f;
  for (int64_t c = 0; c < vocab; ++c) shifted_s[static_cast<size_t>(c)] += 1000.0f;
  std::vector<float> shifted_losses(static_cast<size_t>(n_rows)), shifted_grad(logits_s.size());
  backend->cross_entropy(vector_f32(shifted_losses), matrix(shifted_grad, n_rows, vocab),
                         matrix(shifted_s, n_rows, vocab), targets, grad_scale);
  EXPECT_NEAR(shifted_losses[0], losses_s[0], 1e-3);
  for (int64_t c = 0; c < vocab; ++c)
    EXPECT_NEAR(shifted_grad[static_cast<size_t>(c)], dlogits_s[static_cast<size_t>(c)], 1e-4);
}

// ---- optimizers ------------------------------------------------------------------------------

TEST(CpuOps, AdamWMatchesPyTorchFormula) {
  auto backend = make_cpu_backend();
  const int64_t n = 1000;
  AdamWParams params;
  params.lr = 1e-2f;
  params.weight_decay = 0.1f;
  params.grad_scale = 0.5f;
  std::vector<float> master = random_values(static_cast<size_t>(n), 90), m(static_cast<size_t>(n)),
                     v(static_cast<size_t>(n)), compute(static_cast<size_t>(n), kNaN);
  std::vector<double> ref_p(master.begin(), master.end()), ref_m(static_cast<size_t>(n)),
      ref_v(static_cast<size_t>(n));
  for (int64_t step = 1; step <= 5; ++step) {
    std::vector<float> grad =
        random_values(static_cast<size_t>(n), 91 + static_cast<uint32_t>(step));
    params.step = step;
    // Alternate between a separate compute copy and compute aliasing master.
    Tensor compute_t = step % 2 ? vector_f32(compute) : vector_f32(master);
    backend->adamw_step(vector_f32(master), compute_t, vector_f32(grad), vector_f32(m),
                        vector_f32(v), params);
    // torch.optim.AdamW, written out per element in double.
    const double b1 = params.beta1, b2 = params.beta2, lr = params.lr;
    for (size_t i = 0; i < static_cast<size_t>(n); ++i) {
      const double g = static_cast<double>(grad[i]) * params.grad_scale;
      ref_p[i] -= lr * params.weight_decay * ref_p[i];
      ref_m[i] = b1 * ref_m[i] + (1 - b1) * g;
      ref_v[i] = b2 * ref_v[i] + (1 - b2) * g * g;
      const double m_hat = ref_m[i] / (1 - std::pow(b1, step));
      const double v_hat = ref_v[i] / (1 - std::pow(b2, step));
      ref_p[i] -= lr * m_hat / (std::sqrt(v_hat) + params.eps);
    }
    for (size_t i = 0; i < static_cast<size_t>(n); ++i) {
      ASSERT_NEAR(master[i], ref_p[i], 1e-6 + 1e-5 * std::fabs(ref_p[i])) << "step " << step;
      ASSERT_NEAR(m[i], ref_m[i], 1e-6 * (1 + std::fabs(ref_m[i])));
      ASSERT_NEAR(v[i], ref_v[i], 1e-6 * (1 + std::fabs(ref_v[i])));
    }
    if (step % 2) {
      EXPECT_EQ(compute, master) << "compute is the cast copy of master";
    }
  }
}

TEST(CpuOps, Adam8BitQuantizeAndFreshState) {
  const float* signed_map = adam8bit_signed_map();
  const float* unsigned_map = adam8bit_unsigned_map();
  for (int i = 0; i < 256; ++i) {
    EXPECT_EQ(adam8bit_quantize(signed_map, signed_map[i]), i);
    EXPECT_EQ(adam8bit_quantize(unsigned_map, unsigned_map[i]), i);
  }
  // Nearest wins, an exact tie goes to the lower index (on a map of the integers 0..255, where
  // midpoints are exact), and values beyond the ends clamp.
  float integers[256];
  for (int i = 0; i < 256; ++i) integers[i] = static_cast<float>(i);
  EXPECT_EQ(adam8bit_quantize(integers, 10.4f), 10);
  EXPECT_EQ(adam8bit_quantize(integers, 10.6f), 11);
  EXPECT_EQ(adam8bit_quantize(integers, 10.5f), 10);
  EXPECT_EQ(adam8bit_quantize(signed_map, 5.0f), 255);
  EXPECT_EQ(adam8bit_quantize(signed_map, -5.0f), 0);
  EXPECT_EQ(adam8bit_quantize(unsigned_map, -1.0f), 0);

  std::vector<uint8_t> m_q(10, 0xAB), v_q(10, 0xAB);
  adam8bit_init_state(m_q.data(), v_q.data(), 10);
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(m_q[static_cast<size_t>(i)], 127);
    EXPECT_EQ(signed_map[m_q[static_cast<size_t>(i)]], 0.0f);
    EXPECT_EQ(unsigned_map[v_q[static_cast<size_t>(i)]], 0.0f);
  }
}

// 8-bit AdamW state on the host: 2 bytes per parameter plus one f32 absmax per 2048 per moment.
struct Adam8BitState {
  std::vector<uint8_t> m_q, v_q;
  std::vector<float> m_absmax, v_absmax;
  explicit Adam8BitState(int64_t n)
      : m_q(static_cast<size_t>(n)),
        v_q(static_cast<size_t>(n)),
        m_absmax(static_cast<size_t>((n + kAdam8BitBlock - 1) / kAdam8BitBlock)),
        v_absmax(m_absmax.size()) {
    adam8bit_init_state(m_q.data(), v_q.data(), n);
  }
  size_t bytes() const {
    return m_q.size() + v_q.size() + (m_absmax.size() + v_absmax.size()) * sizeof(float);
  }
  void step(Backend& backend, std::vector<float>& master, std::vector<float>& grad,
            const AdamWParams& p) {
    backend.adamw8bit_step(
        vector_f32(master), Tensor(), vector_f32(grad),
        Tensor(m_q.data(), DType::u8, Device::cpu, {static_cast<int64_t>(m_q.size())}),
        Tensor(v_q.data(), DType::u8, Device::cpu, {static_cast<int64_t>(v_q.size())}),
        vector_f32(m_absmax), vector_f32(v_absmax), p);
  }
};

// Minimizes 0.5 * sum a_i (p_i - target_i)^2 from the same start with fp32 and 8-bit AdamW.
struct Quadratic {
  std::vector<float> curvature, target, start;
  explicit Quadratic(int64_t n)
      : curvature(random_values(static_cast<size_t>(n), 100, 0.5f, 2.0f)),
        target(random_values(static_cast<size_t>(n), 101)),
        start(random_values(static_cast<size_t>(n), 102)) {}
  void gradient(const std::vector<float>& p, std::vector<float>& grad) const {
    for (size_t i = 0; i < p.size(); ++i) grad[i] = curvature[i] * (p[i] - target[i]);
  }
  double loss(const std::vector<float>& p) const {
    double sum = 0.0;
    for (size_t i = 0; i < p.size(); ++i)
      sum += 0.5 * curvature[i] * (static_cast<double>(p[i]) - target[i]) * (p[i] - target[i]);
    return sum;
  }
};

TEST(CpuOps, AdamW8BitTracksFp32AdamW) {
  auto backend = make_cpu_backend();
  const ThreadCount single_thread(1);  // 100 small calls; see expect_gradient
  const int64_t n = 5000;  // two full blocks and a partial one
  const Quadratic problem(n);
  AdamWParams params;
  params.lr = 1e-2f;
  params.weight_decay = 0.01f;

  std::vector<float> p32(problem.start), m(static_cast<size_t>(n)), v(static_cast<size_t>(n));
  std::vector<float> p8(problem.start), grad(static_cast<size_t>(n));
  Adam8BitState state(n);
  EXPECT_EQ(state.bytes(), 2 * static_cast<size_t>(n) + 2 * 3 * sizeof(float));
  for (int64_t step = 1; step <= 50; ++step) {
    params.step = step;
    problem.gradient(p32, grad);
    backend->adamw_step(vector_f32(p32), Tensor(), vector_f32(grad), vector_f32(m), vector_f32(v),
                        params);
    problem.gradient(p8, grad);
    state.step(*backend, p8, grad, params);
    // A fresh state decodes to exact zeros and the step uses the unquantized new moments, so the
    // first step is exactly fp32 AdamW's.
    if (step == 1) {
      ASSERT_EQ(p8, p32);
    }
  }
  double max_diff = 0.0, mean_diff = 0.0, mean_moved = 0.0;
  for (size_t i = 0; i < p8.size(); ++i) {
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(p8[i]) - p32[i]));
    mean_diff += std::fabs(static_cast<double>(p8[i]) - p32[i]) / static_cast<double>(n);
    mean_moved +=
        std::fabs(static_cast<double>(p32[i]) - problem.start[i]) / static_cast<double>(n);
  }
  const double loss_start = problem.loss(problem.start), loss32 = problem.loss(p32),
               loss8 = problem.loss(p8);
  // Measured: loss within 0.1-2%, mean |p8 - p32| ~3% of the mean distance moved, max ~0.05 (on
  // parameters that start near their target, whose tiny moments quantize coarsely against a block
  // absmax set by large ones; inherent to blockwise quantization).
  EXPECT_LT(loss32, 0.5 * loss_start);
  EXPECT_NEAR(loss8, loss32, 0.03 * loss32);
  EXPECT_LT(mean_diff, 0.05 * mean_moved)
      << "max diff " << max_diff << ", mean moved " << mean_moved;
  EXPECT_LT(max_diff, 0.1);
}

TEST(CpuOps, AdamW8BitRejectsAWrongStateLayout) {
  // One absmax per started block of kAdam8BitBlock: 2049 parameters need two.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const int64_t n = kAdam8BitBlock + 1;
  std::vector<float> p(static_cast<size_t>(n)), grad(static_cast<size_t>(n));
  Adam8BitState state(n);
  ASSERT_EQ(state.m_absmax.size(), 2u);
  state.m_absmax.pop_back();
  EXPECT_DEATH(state.step(*make_cpu_backend(), p, grad, AdamWParams{}), "m_absmax");
}

// One step from a used state, checked against its definition: decode, fp32 AdamW, re-encode each
// moment as the nearest map entry to value / (new block absmax).
TEST(CpuOps, AdamW8BitStepDecodesUpdatesAndRequantizes) {
  auto backend = make_cpu_backend();
  const int64_t n = 5000;
  const Quadratic problem(n);
  AdamWParams params;
  params.lr = 1e-2f;
  params.weight_decay = 0.1f;
  params.grad_scale = 0.7f;
  std::vector<float> p(problem.start), grad(static_cast<size_t>(n));
  Adam8BitState state(n);
  for (int64_t step = 1; step <= 6; ++step) {
    params.step = step;
    problem.gradient(p, grad);
    if (step < 6) {
      state.step(*backend, p, grad, params);
      continue;
    }
    const float* signed_map = adam8bit_signed_map();
    const float* unsigned_map = adam8bit_unsigned_map();
    std::vector<float> m_new(static_cast<size_t>(n)), v_new(static_cast<size_t>(n)), p_new(p);
    for (size_t i = 0; i < p.size(); ++i) {
      const size_t block = i / kAdam8BitBlock;
      const double m = signed_map[state.m_q[i]] * state.m_absmax[block];
      const double v = unsigned_map[state.v_q[i]] * state.v_absmax[block];
      const double g = static_cast<double>(grad[i]) * params.grad_scale;
      m_new[i] = static_cast<float>(params.beta1 * m + (1 - params.beta1) * g);
      v_new[i] = static_cast<float>(params.beta2 * v + (1 - params.beta2) * g * g);
      const double m_hat = m_new[i] / (1 - std::pow(params.beta1, 6.0));
      const double v_hat = v_new[i] / (1 - std::pow(params.beta2, 6.0));
      p_new[i] = static_cast<float>(p[i] * (1 - params.lr * params.weight_decay) -
                                    params.lr * m_hat / (std::sqrt(v_hat) + params.eps));
    }
    state.step(*backend, p, grad, params);
    for (size_t block = 0; block < state.m_absmax.size(); ++block) {
      float m_max = 0.0f, v_max = 0.0f;
      for (size_t i = block * kAdam8BitBlock; i < std::min(p.size(), (block + 1) * kAdam8BitBlock);
           ++i) {
        m_max = std::max(m_max, std::fabs(m_new[i]));
        v_max = std::max(v_max, v_new[i]);
      }
      EXPECT_NEAR(state.m_absmax[block], m_max, 1e-6 * m_max);
      EXPECT_NEAR(state.v_absmax[block], v_max, 1e-6 * v_max);
    }
    int misplaced = 0;
    for (size_t i = 0; i < p.size(); ++i) {
      ASSERT_NEAR(p[i], p_new[i], 1e-6) << "element " << i;
      // The chosen code is the nearest (up to rounding of the reference) of all 256.
      const size_t block = i / kAdam8BitBlock;
      const double m_err = std::fabs(signed_map[state.m_q[i]] * state.m_absmax[block] - m_new[i]);
      const double v_err = std::fabs(unsigned_map[state.v_q[i]] * state.v_absmax[block] - v_new[i]);
      for (int code = 0; code < 256; ++code) {
        misplaced += std::fabs(signed_map[code] * state.m_absmax[block] - m_new[i]) <
                     m_err - 1e-6 * state.m_absmax[block];
        misplaced += std::fabs(unsigned_map[code] * state.v_absmax[block] - v_new[i]) <
                     v_err - 1e-6 * state.v_absmax[block];
      }
    }
    EXPECT_EQ(misplaced, 0);
  }
}

TEST(CpuOps, AdamW8BitIsDeterministicAndFreshStateWorks) {
  auto backend = make_cpu_backend();
  const int64_t n = 5000;
  const Quadratic problem(n);
  AdamWParams params;
  params.lr = 1e-2f;
  std::vector<float> grad(static_cast<size_t>(n));
  const auto run = [&](int threads, bool init_state) {
    const ThreadCount scope(threads);
    std::vector<float> p(problem.start);
    Adam8BitState state(n);
    if (!init_state) {  // a zero-filled state, as alloc returns, decodes to the same zeros
      std::fill(state.m_q.begin(), state.m_q.end(), 0);
      std::fill(state.v_q.begin(), state.v_q.end(), 0);
    }
    for (int64_t step = 1; step <= 10; ++step) {
      params.step = step;
      problem.gradient(p, grad);
      state.step(*backend, p, grad, params);
    }
    return std::make_pair(p, state);
  };
  const auto [p_a, state_a] = run(1, true);
  const auto [p_b, state_b] = run(3, true);
  const auto [p_c, state_c] = run(2, false);
  EXPECT_EQ(p_a, p_b);
  EXPECT_EQ(state_a.m_q, state_b.m_q);
  EXPECT_EQ(state_a.v_q, state_b.v_q);
  EXPECT_EQ(state_a.m_absmax, state_b.m_absmax);
  EXPECT_EQ(state_a.v_absmax, state_b.v_absmax);
  EXPECT_EQ(p_a, p_c);
}

// ---- determinism across thread counts ------------------------------------------------------

TEST(CpuOps, BackwardOpsAreBitwiseIdenticalAcrossThreadCounts) {
  auto backend = make_cpu_backend();
  const AttnShape shape{2, 33, 4, 2, 12, 1.0f / std::sqrt(12.0f)};
  const int64_t N = shape.batch * shape.seq_len, q_cols = 48, kv_cols = 24, channels = 130;
  const auto run = [&](int threads) {
    const ThreadCount scope(threads);
    std::vector<float> results;
    const auto keep = [&](const std::vector<float>& v) {
      results.insert(results.end(), v.begin(), v.end());
    };
    std::vector<float> q_s = random_values(static_cast<size_t>(N * q_cols), 110),
                       k_s = random_values(static_cast<size_t>(N * kv_cols), 111),
                       v_s = random_values(static_cast<size_t>(N * kv_cols), 112),
                       dout_s = random_values(q_s.size(), 113), out_s(q_s.size()),
                       lse_s(static_cast<size_t>(shape.batch * shape.n_heads * shape.seq_len)),
                       dq_s(q_s.size()), dk_s(k_s.size()), dv_s(v_s.size());
    Tensor q = matrix(q_s, N, q_cols), k = matrix(k_s, N, kv_cols), v = matrix(v_s, N, kv_cols);
    backend->attention_forward(matrix(out_s, N, q_cols), vector_f32(lse_s), q, k, v, Tensor(),
                               shape);
    backend->attention_backward(matrix(dq_s, N, q_cols), matrix(dk_s, N, kv_cols),
                                matrix(dv_s, N, kv_cols), matrix(dout_s, N, q_cols),
                                matrix(out_s, N, q_cols), vector_f32(lse_s), q, k, v, Tensor(),
                                shape);
    keep(out_s), keep(lse_s), keep(dq_s), keep(dk_s), keep(dv_s);

    std::vector<float> a_s = random_values(static_cast<size_t>(N * channels), 114),
                       w_s = random_values(static_cast<size_t>(300 * channels), 115),
                       y_s(static_cast<size_t>(N * 300));
    backend->matmul(matrix(y_s, N, 300), matrix(a_s, N, channels), matrix(w_s, 300, channels),
                    false, true, 1.0f, 0.0f);
    backend->matmul(matrix(w_s, 300, channels), matrix(y_s, N, 300), matrix(a_s, N, channels), true,
                    false, 1.0f, 1.0f);
    keep(y_s), keep(w_s);

    std::vector<float> weight_s = random_values(static_cast<size_t>(channels), 116),
                       rstd_s(static_cast<size_t>(N)), norm_s(a_s.size()), dres_s(a_s.size()),
                       dweight_s(static_cast<size_t>(channels));
    Tensor weight = vector_f32(weight_s).view({1, channels});
    backend->residual_rmsnorm_forward(Tensor(), matrix(norm_s, N, channels), vector_f32(rstd_s),
                                      matrix(a_s, N, channels), Tensor(), weight, 1e-5f);
    backend->rmsnorm_backward(
        matrix(dres_s, N, channels), vector_f32(dweight_s).view({1, channels}), 0.0f,
        matrix(norm_s, N, channels), matrix(a_s, N, channels), weight, vector_f32(rstd_s));
    keep(norm_s), keep(dres_s), keep(dweight_s);

    std::vector<int32_t> token_s(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i)
      token_s[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7) % 5);
    std::vector<float> dtable_s(static_cast<size_t>(5 * channels));
    backend->embedding_backward(matrix(dtable_s, 5, channels), matrix(a_s, N, channels),
                                vector_i32(token_s), 0.0f);
    keep(dtable_s);
    return results;
  };
  const std::vector<float> one = run(1), two = run(2), three = run(3);
  ASSERT_EQ(one.size(), two.size());
  EXPECT_EQ(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(one.data(), three.data(), one.size() * sizeof(float)), 0);
}

}  // namespace
}  // namespace ranktune

// The MPI communicator under mpirun (2 and 3 ranks): the same interface the NCCL one implements.
// Sums of host values, bucket sums started during "backward" and finished once, and ZeRO-1's
// reduces to the shards' owners and broadcasts from them, over pieces of unequal sizes.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/comm.h"
#include "ranktune/optimizer.h"

using namespace ranktune;

namespace {

int world_rank(int* world) {
  int rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

Tensor host(std::vector<float>& v) {
  return Tensor(v.data(), DType::f32, Device::cpu, {static_cast<int64_t>(v.size())});
}

}  // namespace

TEST(MpiComm, HostValuesAndBucketSums) {
  int world = 0;
  const int rank = world_rank(&world);
  auto comm = make_mpi_communicator(60);
  EXPECT_EQ(comm->world_size(), world);
  EXPECT_EQ(comm->rank(), rank);
  EXPECT_DOUBLE_EQ(comm->sum(rank + 1.0, "a test sum"), world * (world + 1) / 2.0);
  EXPECT_EQ(comm->max(rank * 10, "a test max"), (world - 1) * 10);
  comm->barrier("a test barrier");
  // Two buckets of a flat gradient, started one after the other, summed once finished.
  std::vector<float> grad(10);
  for (size_t i = 0; i < grad.size(); ++i) grad[i] = static_cast<float>(rank * 100 + static_cast<int>(i));
  Tensor g = host(grad);
  comm->start_sum(g.flat_slice(6, 4));
  comm->start_sum(g.flat_slice(0, 6));
  comm->finish_started("a test step");
  for (size_t i = 0; i < grad.size(); ++i)
    EXPECT_FLOAT_EQ(grad[i], 100.f * world * (world - 1) / 2 + static_cast<float>(world * static_cast<int>(i))) << i;
}

// ZeRO-1's gradient path: runs of a flat buffer cut at shard boundaries, each piece summed into its
// owner's copy only, several reduces in flight at once, finished together.
TEST(MpiComm, ReducesToOwnersOverUnequalPieces) {
  int world = 0;
  const int rank = world_rank(&world);
  auto comm = make_mpi_communicator(60);
  // Shard r holds r + 2 elements; rank r's value at i is distinct from every other rank's.
  std::vector<int64_t> offsets{0};
  for (int r = 0; r < world; ++r) offsets.push_back(offsets.back() + r + 2);
  const int64_t n = offsets.back();
  std::vector<float> full(static_cast<size_t>(n));
  const auto value = [](int r, int64_t i) { return static_cast<float>((r + 1) * 1000 + i * (r + 3)); };
  for (int64_t i = 0; i < n; ++i) full[static_cast<size_t>(i)] = value(rank, i);
  // Pieces in a "backward" order: each shard split in two unequal parts, the last shard first.
  Tensor g = host(full);
  for (int r = world - 1; r >= 0; --r) {
    const int64_t begin = offsets[static_cast<size_t>(r)], end = offsets[static_cast<size_t>(r) + 1];
    comm->start_reduce(g.flat_slice(begin + 1, end - begin - 1), r);
    comm->start_reduce(g.flat_slice(begin, 1), r);
  }
  comm->finish_started("a test reduce");
  for (int64_t i = offsets[static_cast<size_t>(rank)]; i < offsets[static_cast<size_t>(rank) + 1]; ++i) {
    float sum = 0;
    for (int r = 0; r < world; ++r) sum += value(r, i);
    EXPECT_EQ(full[static_cast<size_t>(i)], sum) << i;  // small integers: exact in fp32
  }
}

// ZeRO-1's weight path: each rank's tensors, pieces of unequal sizes, broadcast from their owner in
// rounds as the optimizer starts them (round k: every owner's k-th tensor), finished once.
TEST(MpiComm, BroadcastsFromOwnersInRounds) {
  int world = 0;
  const int rank = world_rank(&world);
  auto comm = make_mpi_communicator(60);
  // Rank r owns r + 1 tensors, tensor t of it holding t + 2 elements.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> owned(static_cast<size_t>(world));
  int64_t n = 0;
  for (int r = 0; r < world; ++r)
    for (int t = 0; t <= r; ++t) {
      owned[static_cast<size_t>(r)].push_back({n, t + 2});
      n += t + 2;
    }
  const auto value = [](int r, int64_t i) { return static_cast<float>((r + 1) * 1000 + i); };
  std::vector<float> full(static_cast<size_t>(n), -1.f);
  for (const auto& [offset, size] : owned[static_cast<size_t>(rank)])
    for (int64_t i = offset; i < offset + size; ++i) full[static_cast<size_t>(i)] = value(rank, i);
  Tensor w = host(full);
  for (int k = 0; k < world; ++k) {  // one batch per round, as the optimizer starts them
    std::vector<Communicator::Broadcast> batch;
    for (int r = 0; r < world; ++r)
      if (k <= r)
        batch.push_back({w.flat_slice(owned[static_cast<size_t>(r)][static_cast<size_t>(k)].first,
                                      owned[static_cast<size_t>(r)][static_cast<size_t>(k)].second),
                         r});
    comm->start_broadcasts(batch);
  }
  comm->finish_started("a test broadcast");
  for (int r = 0; r < world; ++r)
    for (const auto& [offset, size] : owned[static_cast<size_t>(r)])
      for (int64_t i = offset; i < offset + size; ++i) EXPECT_EQ(full[static_cast<size_t>(i)], value(r, i)) << i;
}

// The GradReducer under ZeRO-1: buckets whose runs of adjacent tensors straddle shard boundaries
// (the shards of zero_shard_cuts, as the optimizer cuts them), reduced in backward order; each rank
// ends with the sums over its own shard.
TEST(MpiComm, GradReducerSumsEachShardOnItsOwner) {
  int world = 0;
  const int rank = world_rank(&world);
  auto comm = make_mpi_communicator(60);
  // Two layers between the embedding and the final norm, as the model lays them out.
  ParamGroup params;
  const std::vector<std::pair<int64_t, int>> tensors{{2, -1}, {2, 0}, {2, 0}, {2, 1}, {2, 1}, {6, -1}};
  std::vector<int64_t> sizes;
  for (const auto& [numel, layer] : tensors) {
    params.specs.push_back({"t" + std::to_string(params.specs.size()), {numel}, params.numel, numel, layer, false});
    params.numel += numel;
    sizes.push_back(numel);
  }
  std::vector<float> grad(static_cast<size_t>(params.numel));
  const auto value = [](int r, int64_t i) { return static_cast<float>((r + 1) * 100 + i * (2 * r + 1)); };
  for (int64_t i = 0; i < params.numel; ++i) grad[static_cast<size_t>(i)] = value(rank, i);
  params.grad = host(grad);
  const std::vector<size_t> cuts = zero_shard_cuts(sizes, world);
  std::vector<int64_t> offsets;
  for (size_t c : cuts) offsets.push_back(c < params.specs.size() ? params.specs[c].offset : params.numel);
  GradReducer reducer(*comm, params, 2, 0, &offsets);
  for (int bucket : {1, 0, 2}) reducer.reduce_bucket(bucket);
  reducer.finish(1);
  const int64_t begin = offsets[static_cast<size_t>(rank)], end = offsets[static_cast<size_t>(rank) + 1];
  // Cuts inside a bucket's run: layer 1's [6, 10) on 2 ranks, layer 0's [2, 6) on 3.
  if (world == 2) EXPECT_EQ(offsets, (std::vector<int64_t>{0, 8, 16}));
  if (world == 3) EXPECT_EQ(offsets, (std::vector<int64_t>{0, 4, 10, 16}));
  for (int64_t i = begin; i < end; ++i) {
    float sum = 0;
    for (int r = 0; r < world; ++r) sum += value(r, i);
    EXPECT_EQ(grad[static_cast<size_t>(i)], sum) << i;
  }
}

// ZeRO-1's weight all-gather runs on into the next forward, which waits layer by layer
// (Optimizer::wait_for_weights). A communicator that records what the optimizer asks of it: for
// every layer, the wait must cover each round whose broadcasts hold any of the layer's tensors,
// and the head's wait (layer L) must also finish the gather on the host. The updated weights must
// match an unsharded optimizer's on every rank.
namespace {

class RecordingCommunicator final : public Communicator {
 public:
  explicit RecordingCommunicator(Communicator& inner) : Communicator(MPI_COMM_WORLD, 60), inner_(inner) {}
  std::string name() const override { return inner_.name(); }
  void start_sum(Tensor x) override {
    sums.push_back({x.data, x.numel()});
    inner_.start_sum(x);
  }
  void start_reduce(Tensor x, int root) override { inner_.start_reduce(x, root); }
  void start_broadcasts(const std::vector<Broadcast>& batch) override {
    std::vector<std::pair<const void*, int64_t>> ranges;
    for (const Broadcast& b : batch) ranges.push_back({b.x.data, b.x.numel()});
    batches.push_back(ranges);
    inner_.start_broadcasts(batch);
  }
  void finish_started(const std::string& what) override {
    ++finished;
    inner_.finish_started(what);
  }
  int mark() override {
    const int m = inner_.mark();
    marks.push_back({m, batches.size()});  // the mark, and how many batches were started before it
    return m;
  }
  void compute_waits_for(int mark, const std::string& what) override {
    waited.push_back(mark);
    inner_.compute_waits_for(mark, what);
  }

  std::vector<std::pair<const void*, int64_t>> sums;
  std::vector<std::vector<std::pair<const void*, int64_t>>> batches;
  std::vector<std::pair<int, size_t>> marks;
  std::vector<int> waited;
  int finished = 0;

 private:
  Communicator& inner_;
};

}  // namespace

TEST(MpiComm, ZeroGatherIsWaitedForLayerByLayer) {
  int world = 0;
  const int rank = world_rank(&world);
  auto mpi = make_mpi_communicator(60);
  RecordingCommunicator comm(*mpi);
  auto be = make_cpu_backend();
  // An embedding, three layers of a norm and two matrices, a final norm: sizes that put round cuts
  // inside tensors.
  std::vector<std::tuple<int64_t, int, bool>> tensors{{20, -1, false}};
  for (int l = 0; l < 3; ++l) tensors.insert(tensors.end(), {{3, l, true}, {11, l, false}, {7, l, false}});
  tensors.push_back({3, -1, true});
  ParamGroup sharded, whole;
  for (ParamGroup* g : {&sharded, &whole})
    for (const auto& [numel, layer, norm] : tensors) {
      g->specs.push_back({"t" + std::to_string(g->specs.size()), {numel}, g->numel, numel, layer, norm});
      g->numel += numel;
    }
  const ParamGroup& params = sharded;
  std::vector<float> weights(static_cast<size_t>(params.numel)), grad(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    weights[i] = 0.01f * static_cast<float>(i % 17) - 0.05f;
    grad[i] = 0.003f * static_cast<float>(i % 5) - 0.004f;
  }
  std::vector<float> reference = weights, ref_grad = grad;
  sharded.compute = sharded.master = host(weights);  // the CPU path: the master is the compute copy
  sharded.grad = host(grad);
  whole.compute = whole.master = host(reference);
  whole.grad = host(ref_grad);
  TrainingSection tc;
  tc.optim = "adamw";
  tc.weight_decay = 0.1;
  Optimizer zero(*be, sharded, tc, &comm), plain(*be, whole, tc, nullptr);
  zero.step(1e-2, 1.f);
  plain.step(1e-2, 1.f);
  ASSERT_FALSE(comm.batches.empty());
  EXPECT_EQ(comm.finished, 0) << "step() returns with the gather in flight";
  const auto overlaps = [&](const std::pair<const void*, int64_t>& range, int layer_key) {
    const float* lo = static_cast<const float*>(range.first);
    for (const ParamSpec& p : params.specs) {
      const int key = p.layer >= 0 ? p.layer : (p.offset == 0 ? -1 : 3);
      const float* a = weights.data() + p.offset;
      if (key == layer_key && a < lo + range.second && lo < a + p.numel) return true;
    }
    return false;
  };
  int most = -1;
  for (int layer = -1; layer <= 3; ++layer) {
    const size_t before = comm.waited.size();
    zero.wait_for_weights(layer);
    int waited = -1;
    if (comm.waited.size() > before) waited = comm.waited.back();
    // Batches started before the waited mark are covered.
    size_t covered = 0;
    for (const auto& [m, n_batches] : comm.marks)
      if (m == waited) covered = n_batches;
    for (size_t b = 0; b < comm.batches.size(); ++b)
      for (const auto& range : comm.batches[b])
        if (overlaps(range, layer)) EXPECT_LT(b, covered) << "layer " << layer << " reads round " << b << " unwaited";
    most = std::max(most, waited);
  }
  EXPECT_EQ(comm.finished, 1) << "the head's wait finishes the gather on the host";
  EXPECT_LT(comm.waited.front(), most) << "the embedding's wait is not the whole gather";
  for (size_t i = 0; i < weights.size(); ++i) EXPECT_FLOAT_EQ(weights[i], reference[i]) << i;
  zero.wait_for_weights(0);  // nothing in flight: a no-op
  EXPECT_EQ(comm.finished, 1);
}

// distributed.ddp_bucket_cap_mb: reported buckets are held until they reach the cap together (or
// the last is reported), then summed as one group whose adjacent runs are one all-reduce. Four
// layers of 3 elements (12 bytes each) between two global tensors with no gradient bucket of their
// own here (the LoRA layout: layers only), reported in backward order over two steps.
TEST(MpiComm, GradReducerGroupsBucketsUpToTheCap) {
  int world = 0;
  const int rank = world_rank(&world);
  auto mpi = make_mpi_communicator(60);
  ParamGroup params;
  for (int layer = 0; layer < 4; ++layer) {
    params.specs.push_back({"t" + std::to_string(layer), {3}, params.numel, 3, layer, false});
    params.numel += 3;
  }
  const auto value = [](int r, int64_t i, int step) { return static_cast<float>((r + 1) * 10 + i * (r + 2) + step); };
  struct Case {
    int64_t cap_bytes;
    std::vector<size_t> sums_after_report;  // all-reduces started after each of buckets 3, 2, 1, 0
    std::vector<int64_t> sizes;             // their sizes, in start order
  };
  for (const Case& c : {Case{0, {1, 2, 3, 4}, {3, 3, 3, 3}}, Case{24, {0, 1, 1, 2}, {6, 6}},
                        Case{25, {0, 0, 1, 2}, {9, 3}}, Case{int64_t{25} << 20, {0, 0, 0, 1}, {12}}}) {
    RecordingCommunicator comm(*mpi);
    std::vector<float> grad(static_cast<size_t>(params.numel));
    params.grad = host(grad);
    GradReducer reducer(comm, params, 4, c.cap_bytes);
    for (int step = 0; step < 2; ++step) {
      for (int64_t i = 0; i < params.numel; ++i) grad[static_cast<size_t>(i)] = value(rank, i, step);
      comm.sums.clear();
      for (int k = 0; k < 4; ++k) {
        reducer.reduce_bucket(3 - k);
        EXPECT_EQ(comm.sums.size(), c.sums_after_report[static_cast<size_t>(k)])
            << "cap " << c.cap_bytes << " report " << k;
      }
      reducer.reduce_bucket(4);  // the global bucket: no tensors here
      reducer.finish(step + 1);
      EXPECT_EQ(reducer.collectives_last_step(), static_cast<int>(c.sizes.size()));
      std::vector<int64_t> sizes;
      for (const auto& [data, n] : comm.sums) sizes.push_back(n);
      EXPECT_EQ(sizes, c.sizes) << "cap " << c.cap_bytes;
      for (int64_t i = 0; i < params.numel; ++i) {
        float sum = 0;
        for (int r = 0; r < world; ++r) sum += value(r, i, step);
        EXPECT_EQ(grad[static_cast<size_t>(i)], sum) << "cap " << c.cap_bytes << " element " << i;
      }
    }
  }
}

// The MPI communicator under mpirun (2 and 3 ranks): the same interface the NCCL one implements.
// Sums of host values, bucket sums started during "backward" and finished once, and ZeRO-1's
// reduce-scatter and all-gather over shards of unequal sizes.
#include <gtest/gtest.h>
#include <mpi.h>

#include <numeric>
#include <vector>

#include "ranktune/comm.h"

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
  comm->finish_sums("a test step");
  for (size_t i = 0; i < grad.size(); ++i)
    EXPECT_FLOAT_EQ(grad[i], 100.f * world * (world - 1) / 2 + static_cast<float>(world * static_cast<int>(i))) << i;
}

TEST(MpiComm, ReduceScatterAndAllGatherOverUnequalShards) {
  int world = 0;
  const int rank = world_rank(&world);
  auto comm = make_mpi_communicator(60);
  // Shard r holds r + 2 elements.
  std::vector<int64_t> offsets{0};
  for (int r = 0; r < world; ++r) offsets.push_back(offsets.back() + r + 2);
  const int64_t n = offsets.back();
  std::vector<float> full(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) full[static_cast<size_t>(i)] = static_cast<float>((rank + 1) * (i + 1));
  comm->reduce_scatter_sum(host(full), offsets);
  const float ranks_sum = static_cast<float>(world * (world + 1) / 2);
  for (int64_t i = offsets[static_cast<size_t>(rank)]; i < offsets[static_cast<size_t>(rank) + 1]; ++i)
    EXPECT_FLOAT_EQ(full[static_cast<size_t>(i)], ranks_sum * static_cast<float>(i + 1)) << i;
  // Each rank's shard (now the sums) goes to every rank.
  for (int64_t i = 0; i < n; ++i)
    if (i < offsets[static_cast<size_t>(rank)] || i >= offsets[static_cast<size_t>(rank) + 1])
      full[static_cast<size_t>(i)] = -1.f;
  comm->all_gather(host(full), offsets);
  for (int64_t i = 0; i < n; ++i)
    EXPECT_FLOAT_EQ(full[static_cast<size_t>(i)], ranks_sum * static_cast<float>(i + 1)) << i;
}

// Under mpirun: every rank sees the same world, a distinct rank, and a local rank from the launcher.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <memory>
#include <string>

#include "ranktune/launch.h"

using namespace ranktune;

TEST(MpiLaunch, RanksAndLocalRanks) {
  LaunchInfo li = detect_launch();
  int world = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  EXPECT_EQ(li.world_size, world);
  EXPECT_EQ(li.rank, rank);
  EXPECT_EQ(li.local_size, world);  // one node
  EXPECT_EQ(li.local_rank, rank);
  EXPECT_EQ(li.local_rank_source, "OMPI_COMM_WORLD_LOCAL_RANK");
  nlohmann::json report = env_report(li, nullptr);
  if (rank == 0) {
    EXPECT_EQ(report["ranks"].get<int>(), world);
    ASSERT_EQ(report["per_rank"].size(), static_cast<size_t>(world));
    for (int r = 0; r < world; ++r) EXPECT_EQ(report["per_rank"][static_cast<size_t>(r)]["rank"].get<int>(), r);
  }
}

// Reductions over ranks: one interface, two implementations.
//   MPI  (src/comm.cpp): the CPU path; non-blocking MPI collectives on host buffers.
//   NCCL (src/comm_nccl.cu): the GPU path; NCCL collectives on a communication stream that waits
//        for the compute stream by an event, so a gradient bucket is summed while backward goes
//        on, and a weight is broadcast while the optimizer updates the next one.
// MPI bootstraps both (rank 0 makes the ncclUniqueId and broadcasts it), and
// host scalars (loss, token counts, stop signals) always go over MPI.
//
// Every collective runs under a watchdog. Entering a collective, a rank tells
// every peer its collective count (a small MPI message); waiting, it polls. A
// rank that waits longer than distributed.timeout_s names the peers whose count
// is behind its own -- the ranks that hung or died before reaching the
// collective -- and aborts the whole job, so no rank is left hanging.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ranktune/backend.h"
#include "ranktune/launch.h"
#include "ranktune/model.h"
#include "ranktune/tensor.h"

namespace ranktune {

class Watchdog {
 public:
  Watchdog(MPI_Comm comm, double timeout_s);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // This rank enters its next collective, named `what` for messages.
  void enter(const std::string& what);
  // Polls done() until it returns true. After timeout_s (0 = never) it reports
  // the ranks behind this one, calls on_abort (the NCCL communicator is aborted
  // there) and ends the job.
  void wait(const std::function<bool()>& done, const std::function<void()>& on_abort = {});
  // Reports `error` (an asynchronous NCCL error, say) for the current
  // collective and ends the job.
  [[noreturn]] void fail(const std::string& error, const std::function<void()>& on_abort = {});

 private:
  void drain();  // reads the peers' announcements that have arrived
  std::string behind() const;

  MPI_Comm comm_;
  int rank_ = 0, world_ = 1;
  double timeout_s_;
  int64_t count_ = 0;
  std::string what_;
  std::vector<int64_t> peer_count_;
  std::vector<MPI_Request> sends_;
  std::vector<std::unique_ptr<int64_t>> send_values_;
};

class Communicator {
 public:
  Communicator(MPI_Comm comm, double timeout_s);
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  virtual std::string name() const = 0;  // "NCCL 2.28.3" or "MPI (Open MPI ...)"

  // ---- device tensors: started in the same order on every rank, finished together ----------------
  // Each start may return before the collective is done; x must stay untouched until
  // finish_started().
  // Sums the f32 tensor x over ranks, in place on every rank (data parallel: a gradient bucket,
  // started during backward as the ledger reports it ready).
  virtual void start_sum(Tensor x) = 0;
  // Sums the f32 tensor x over ranks into root's x; the other ranks' x is left undefined (ZeRO-1: a
  // piece of a gradient bucket, to the rank whose shard holds it).
  virtual void start_reduce(Tensor x, int root) = 0;
  // The gradients over the copy engines on one host (distributed.grad_reduce: auto): NCCL's kernels
  // would take SMs from backward for as long as the gradients cross. `grad` is the flat gradient
  // buffer; from now on start_sum() or start_reduce() of a slice of it copies the slice into a
  // receive buffer on the other GPUs (CUDA IPC) on a copy stream, which no SM serves, and the
  // receiver adds the copies to its own as soon as they have arrived, beside backward;
  // finish_started() waits for the adds.
  //   ZeRO-1 (shard_offsets: world + 1 offsets, shard r = [shard_offsets[r], shard_offsets[r+1])):
  //     start_reduce(slice, root) copies it to its root only.
  //   All-reduce (shard_offsets empty; LoRA's adapters): start_sum(slice) copies it to every other
  //     rank, and each rank adds the world's copies in rank order, ((g0 + g1) + g2) + ..., so every
  //     rank holds the same bits, as NCCL's all-reduce leaves them.
  // Collective; every rank gets the same answer. false (and nothing changes) where this
  // communicator cannot: MPI, ranks on several hosts, no peer access between the GPUs, or too
  // little memory for the receive buffers.
  virtual bool reduce_by_peer_copies(Tensor grad, const std::vector<int64_t>& shard_offsets) {
    (void)grad, (void)shard_offsets;
    return false;
  }
  // Bytes of GPU memory reduce_by_peer_copies() allocates on each rank: a receive slot of
  // slot_numel f32 values per other rank (ZeRO-1: the rank's shard; all-reduce: the whole buffer),
  // plus a few flags (src/memory_plan.cpp plans them).
  static int64_t peer_copy_bytes(int64_t slot_numel, int world);
  // reduce_by_peer_copies() has said yes: the gradients cross over the copy engines.
  virtual bool copies_gradients() const { return false; }
  // Copies each root's x to every rank; f32 or the activation dtype (ZeRO-1: updated weights'
  // compute copies, each from the rank that updated it). One batch is one launch on the GPU (an
  // NCCL group): many small broadcasts would each pay NCCL's latency.
  struct Broadcast {
    Tensor x;
    int root = 0;
  };
  virtual void start_broadcasts(const std::vector<Broadcast>& batch) = 0;
  // Waits until every started collective is done and visible to the backend's later work. `what`
  // names the batch for the watchdog's messages.
  virtual void finish_started(const std::string& what) = 0;
  // A point in the order of started collectives, for compute_waits_for(): valid until the next
  // finish_started().
  virtual int mark() = 0;
  // The backend's later work waits until every collective started before `mark` is done (ZeRO-1:
  // the next forward waits for the part of the weight all-gather that holds a layer). On the GPU
  // the compute stream waits and the host goes on; the host itself watches them in the next
  // finish_started(). MPI: the host waits for them, under the watchdog.
  virtual void compute_waits_for(int mark, const std::string& what) = 0;

  // ---- host values: every rank calls these in the same order
  // ---------------------------------
  double sum(double x, const std::string& what);
  int max(int x, const std::string& what);
  void barrier(const std::string& what);

 protected:
  // One value over ranks (MPI_Iallreduce) under the watchdog.
  void host_allreduce(const void* in, void* out, MPI_Datatype type, MPI_Op op, const std::string& what);
  // Waits for MPI requests under the watchdog.
  void wait_mpi(std::vector<MPI_Request>& requests, const std::function<void()>& on_abort = {});

  MPI_Comm comm_;
  int rank_ = 0, world_ = 1;
  Watchdog watchdog_;
};

// Data-parallel gradient reduction through a communicator: a bucket -- a layer's tensors, or the
// embedding, final norm and head -- is reduced when the model's ledger reports it ready (during
// the last micro-batch's backward, in backward order), as the runs of adjacent tensors it holds.
// Reported buckets are held back until they reach cap_bytes together (distributed.ddp_bucket_cap_mb,
// as DDP's bucket_cap_mb; 0: each bucket alone) or the last one is reported, and then reduced as
// one group whose adjacent runs are merged: LoRA's layers are a few MB each, and a collective per
// layer would pay its latency, and take SMs from backward's kernels, sixteen times. When the
// communicator copies the gradients over the copy engines (copies_gradients()) nothing is held:
// a copy costs no SM and little latency, so each bucket goes as soon as it is ready.
// finish() waits for every reduction before the gradients are read. Without shard offsets
// each run is summed on every rank (all-reduce). Under ZeRO-1 (shard_offsets: the optimizer's
// Optimizer::shard_offsets(), world + 1 element offsets of the shards in the flat gradient buffer)
// each run is cut at the shard boundaries and each piece summed into its owner's buffer only, so
// after finish() each rank holds the summed gradients of its own shard (the rest is undefined).
class GradReducer {
 public:
  GradReducer(Communicator& comm, ParamGroup& params, int n_layers, int64_t cap_bytes,
              const std::vector<int64_t>* shard_offsets = nullptr);
  // Also exchange the model's embedding rows (LlamaModel::EmbeddingRows) when their bucket is
  // reported, and add them to the gradient in finish(). A no-op for a model without the exchange.
  void exchange_embedding_rows(LlamaModel& model);
  void reduce_bucket(int bucket);
  void finish(int64_t step);
  // Collectives started in the last step (merged runs): one per group of buckets and owner.
  int collectives_last_step() const { return started_last_step_; }

 private:
  struct Piece {
    int64_t offset = 0, numel = 0;
    int owner = -1;  // the rank that receives the sum; -1: every rank (all-reduce)
  };
  void start_held();

  Communicator& comm_;
  Tensor grad_;
  bool sharded_ = false;
  int64_t cap_bytes_ = 0;
  std::vector<std::vector<Piece>> pieces_;  // per bucket
  int buckets_with_pieces_ = 0;
  std::vector<Piece> held_;  // reported, not started yet
  int64_t held_bytes_ = 0;
  int reported_ = 0, started_ = 0, started_last_step_ = 0;
  LlamaModel* rows_model_ = nullptr;        // exchanges its embedding rows
  bool rows_started_ = false;
};

// NCCL when the backend is a GPU (and ranktune was built with CUDA), MPI
// otherwise. Collective: every rank calls it.
std::unique_ptr<Communicator> make_communicator(Backend& backend, double timeout_s);
std::unique_ptr<Communicator> make_mpi_communicator(double timeout_s);
#ifdef RANKTUNE_HAVE_CUDA
std::unique_ptr<Communicator> make_nccl_communicator(Backend& backend, double timeout_s);
#endif

}  // namespace ranktune

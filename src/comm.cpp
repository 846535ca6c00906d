// The watchdog, the host-value collectives and the MPI communicator of the CPU
// path (see include/ranktune/comm.h). The NCCL communicator is in
// src/comm_nccl.cu.
#include "ranktune/comm.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "ranktune/error.h"

namespace ranktune {

namespace {

constexpr int kHeartbeatTag = 7301;

std::string mpi_library_version() {
  char buf[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(buf, &len);
  std::string v(buf, static_cast<size_t>(len));
  const size_t comma = v.find(',');
  return comma == std::string::npos ? v : v.substr(0, comma);
}

}  // namespace

// ---- watchdog
// ----------------------------------------------------------------------------------

Watchdog::Watchdog(MPI_Comm comm, double timeout_s) : comm_(comm), timeout_s_(timeout_s) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &world_);
  peer_count_.assign(static_cast<size_t>(world_), 0);
}

Watchdog::~Watchdog() {
  // Announcements still in flight are small and were sent eagerly; cancel what
  // is left.
  for (MPI_Request& r : sends_)
    if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
}

void Watchdog::enter(const std::string& what) {
  ++count_;
  what_ = what;
  if (world_ == 1) return;
  // Completed announcements are let go; each new one owns its value until MPI
  // is done with it.
  for (size_t i = 0; i < sends_.size();) {
    int done = 0;
    MPI_Test(&sends_[i], &done, MPI_STATUS_IGNORE);
    if (done) {
      sends_.erase(sends_.begin() + static_cast<std::ptrdiff_t>(i));
      send_values_.erase(send_values_.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
  for (int peer = 0; peer < world_; ++peer) {
    if (peer == rank_) continue;
    send_values_.push_back(std::make_unique<int64_t>(count_));
    sends_.push_back(MPI_REQUEST_NULL);
    MPI_Isend(send_values_.back().get(), 1, MPI_INT64_T, peer, kHeartbeatTag, comm_, &sends_.back());
  }
}

void Watchdog::drain() {
  for (;;) {
    int flag = 0;
    MPI_Status st;
    MPI_Iprobe(MPI_ANY_SOURCE, kHeartbeatTag, comm_, &flag, &st);
    if (!flag) return;
    int64_t value = 0;
    MPI_Recv(&value, 1, MPI_INT64_T, st.MPI_SOURCE, kHeartbeatTag, comm_, MPI_STATUS_IGNORE);
    int64_t& seen = peer_count_[static_cast<size_t>(st.MPI_SOURCE)];
    seen = std::max(seen, value);
  }
}

std::string Watchdog::behind() const {
  std::string ranks;
  int n = 0;
  for (int peer = 0; peer < world_; ++peer) {
    if (peer == rank_ || peer_count_[static_cast<size_t>(peer)] >= count_) continue;
    ranks += (n++ ? ", " : "") + std::to_string(peer);
  }
  if (n == 0)
    return "every rank reached it, so the collective itself is stuck (a "
           "network or NCCL problem)";
  return std::string(n == 1 ? "rank " : "ranks ") + ranks + (n == 1 ? " has" : " have") +
         " not reached it (hung or died before it)";
}

void Watchdog::wait(const std::function<bool()>& done, const std::function<void()>& on_abort) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    if (done()) return;
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (timeout_s_ > 0 && waited > timeout_s_) {
      drain();
      char secs[32];
      std::snprintf(secs, sizeof secs, "%g", timeout_s_);
      fail(std::string("waited ") + secs + " s (distributed.timeout_s) in " + what_ + ": " + behind(), on_abort);
    }
    // Spin for the first second: a collective usually completes within microseconds of its last
    // peer arriving, and a sleeping waiter would add its oversleep to every step. After that, a
    // long wait costs no CPU.
    if (waited < 1.0)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void Watchdog::fail(const std::string& error, const std::function<void()>& on_abort) {
  std::fprintf(stderr,
               "ranktune: rank %d: %s. Aborting every rank. (If steps are "
               "legitimately this slow, raise "
               "distributed.timeout_s.)\n",
               rank_, error.c_str());
  std::fflush(stderr);
  if (on_abort) on_abort();
  MPI_Abort(comm_, 1);
  std::_Exit(1);
}

// ---- the communicator's host-value collectives
// -----------------------------------------------------

Communicator::Communicator(MPI_Comm comm, double timeout_s) : comm_(comm), watchdog_(comm, timeout_s) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &world_);
}

void Communicator::wait_mpi(std::vector<MPI_Request>& requests, const std::function<void()>& on_abort) {
  watchdog_.wait(
      [&] {
        int done = 0;
        MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE);
        return done != 0;
      },
      on_abort);
}

void Communicator::host_allreduce(const void* in, void* out, MPI_Datatype type, MPI_Op op, const std::string& what) {
  watchdog_.enter(what);
  std::vector<MPI_Request> req(1);
  MPI_Iallreduce(in, out, 1, type, op, comm_, &req[0]);
  wait_mpi(req);
}

double Communicator::sum(double x, const std::string& what) {
  if (world_ == 1) return x;
  double out = 0;
  host_allreduce(&x, &out, MPI_DOUBLE, MPI_SUM, what);
  return out;
}

int Communicator::max(int x, const std::string& what) {
  if (world_ == 1) return x;
  int out = 0;
  host_allreduce(&x, &out, MPI_INT, MPI_MAX, what);
  return out;
}

void Communicator::barrier(const std::string& what) {
  if (world_ == 1) return;
  watchdog_.enter(what);
  std::vector<MPI_Request> req(1);
  MPI_Ibarrier(comm_, &req[0]);
  wait_mpi(req);
}

// ---- data-parallel gradient reduction ----------------------------------------------------------

int64_t Communicator::peer_copy_bytes(int64_t slot_numel, int world) {
  RT_ASSERT(world >= 1 && slot_numel >= 0, "peer_copy_bytes: a slot size and a world");
  const auto round_up = [](int64_t x) { return (x + 255) / 256 * 256; };
  // The receive slots, then the flags: two 32-bit words per rank and two staging words.
  return round_up((world - 1) * slot_numel * static_cast<int64_t>(sizeof(float))) + round_up((2 * world + 2) * 4);
}

GradReducer::GradReducer(Communicator& comm, ParamGroup& params, int n_layers, int64_t cap_bytes,
                         const std::vector<int64_t>* shard_offsets)
    : comm_(comm), grad_(params.grad), sharded_(shard_offsets != nullptr), cap_bytes_(cap_bytes) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> runs(static_cast<size_t>(n_layers + 1));
  for (const ParamSpec& p : params.specs) {
    auto& r = runs[static_cast<size_t>(p.layer >= 0 ? p.layer : n_layers)];
    if (!r.empty() && r.back().first + r.back().second == p.offset)
      r.back().second += p.numel;
    else
      r.push_back({p.offset, p.numel});
  }
  RT_ASSERT(!sharded_ || static_cast<int>(shard_offsets->size()) == comm.world_size() + 1,
            "one shard offset per rank, and the end");
  pieces_.resize(runs.size());
  for (size_t b = 0; b < runs.size(); ++b) {
    for (const auto& [offset, n] : runs[b]) {
      if (!sharded_) {
        pieces_[b].push_back({offset, n, -1});
        continue;
      }
      // Shard r is [offsets[r], offsets[r+1]); a run of adjacent tensors may span several.
      const std::vector<int64_t>& cut = *shard_offsets;
      for (int r = 0; r < comm.world_size(); ++r) {
        const int64_t begin = std::max(offset, cut[static_cast<size_t>(r)]);
        const int64_t end = std::min(offset + n, cut[static_cast<size_t>(r) + 1]);
        if (begin < end) pieces_[b].push_back({begin, end - begin, r});
      }
    }
    if (!pieces_[b].empty()) ++buckets_with_pieces_;
  }
}

void GradReducer::exchange_embedding_rows(LlamaModel& model) {
  if (model.embedding_rows().bucket >= 0) rows_model_ = &model;
}

void GradReducer::reduce_bucket(int bucket) {
  if (rows_model_ && bucket == rows_model_->embedding_rows().bucket) {
    // Each rank's slot of the rows and token ids, from that rank to all.
    const LlamaModel::EmbeddingRows& e = rows_model_->embedding_rows();
    std::vector<Communicator::Broadcast> batch;
    for (int r = 0; r < comm_.world_size(); ++r) {
      batch.push_back({e.rows.row_slice(r * e.rows_per_rank, e.rows_per_rank), r});
      batch.push_back({e.tokens.flat_slice(r * e.rows_per_rank, e.rows_per_rank), r});
    }
    comm_.start_broadcasts(batch);
    rows_started_ = true;
    return;
  }
  const std::vector<Piece>& pieces = pieces_[static_cast<size_t>(bucket)];
  if (pieces.empty()) return;
  for (const Piece& p : pieces) {
    held_.push_back(p);
    held_bytes_ += p.numel * static_cast<int64_t>(sizeof(float));
  }
  ++reported_;
  if (comm_.copies_gradients() || held_bytes_ >= cap_bytes_ || reported_ == buckets_with_pieces_) start_held();
}

// The held buckets as one group: runs that are adjacent in the gradient buffer and go to the same
// rank become one collective.
void GradReducer::start_held() {
  std::sort(held_.begin(), held_.end(), [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
  std::vector<Piece> merged;
  for (const Piece& p : held_) {
    if (!merged.empty() && merged.back().offset + merged.back().numel == p.offset && merged.back().owner == p.owner)
      merged.back().numel += p.numel;
    else
      merged.push_back(p);
  }
  for (const Piece& p : merged) {
    if (p.owner < 0)
      comm_.start_sum(grad_.flat_slice(p.offset, p.numel));
    else
      comm_.start_reduce(grad_.flat_slice(p.offset, p.numel), p.owner);
  }
  started_ += static_cast<int>(merged.size());
  held_.clear();
  held_bytes_ = 0;
}

void GradReducer::finish(int64_t step) {
  RT_ASSERT(held_.empty() && reported_ == buckets_with_pieces_,
            "every gradient bucket is reported once per step before the reduction is finished");
  reported_ = 0;
  started_last_step_ = started_;
  started_ = 0;
  comm_.finish_started(std::string(sharded_ ? "the gradient reduce to the shards' owners" : "the gradient all-reduce") +
                       " of step " + std::to_string(step));
  if (rows_started_) rows_model_->add_exchanged_embedding_rows();
  rows_started_ = false;
}

// ---- MPI: the CPU path
// ---------------------------------------------------------------------------

namespace {

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(double timeout_s) : Communicator(MPI_COMM_WORLD, timeout_s) {}

  std::string name() const override { return "MPI (" + mpi_library_version() + ")"; }

  void start_sum(Tensor x) override {
    if (world_ == 1) return;
    check(x, "start_sum");
    pending_.push_back(MPI_REQUEST_NULL);
    MPI_Iallreduce(MPI_IN_PLACE, x.data, count(x), MPI_FLOAT, MPI_SUM, comm_, &pending_.back());
  }

  void start_reduce(Tensor x, int root) override {
    if (world_ == 1) return;
    check(x, "start_reduce");
    RT_ASSERT(root >= 0 && root < world_, "start_reduce: a root rank in the world");
    pending_.push_back(MPI_REQUEST_NULL);
    // The root sums into its own x; the others only send theirs.
    MPI_Ireduce(rank_ == root ? MPI_IN_PLACE : x.data, rank_ == root ? x.data : nullptr, count(x), MPI_FLOAT, MPI_SUM,
                root, comm_, &pending_.back());
  }

  void start_broadcasts(const std::vector<Broadcast>& batch) override {
    if (world_ == 1) return;
    for (const Broadcast& b : batch) {
      RT_ASSERT(b.x.device == Device::cpu && b.x.contiguous() &&
                    (b.x.dtype == DType::f32 || b.x.dtype == DType::bf16 || b.x.dtype == DType::i32),
                "MPI start_broadcasts: a contiguous f32, bf16 or i32 host tensor");
      RT_ASSERT(b.root >= 0 && b.root < world_, "start_broadcasts: a root rank in the world");
      pending_.push_back(MPI_REQUEST_NULL);
      // A copy does no arithmetic, so bf16 travels as its 16-bit pattern.
      const MPI_Datatype type =
          b.x.dtype == DType::bf16 ? MPI_UINT16_T : (b.x.dtype == DType::i32 ? MPI_INT32_T : MPI_FLOAT);
      MPI_Ibcast(b.x.data, count(b.x), type, b.root, comm_, &pending_.back());
    }
  }

  void finish_started(const std::string& what) override {
    if (world_ == 1 || pending_.empty()) return;
    watchdog_.enter(what);
    wait_mpi(pending_);
    pending_.clear();
  }

  int mark() override { return static_cast<int>(pending_.size()); }

  void compute_waits_for(int mark, const std::string& what) override {
    if (world_ == 1 || mark == 0) return;
    RT_ASSERT(mark <= static_cast<int>(pending_.size()), "compute_waits_for: a mark since the last finish_started()");
    std::vector<MPI_Request> first(pending_.begin(), pending_.begin() + mark);
    watchdog_.enter(what);
    wait_mpi(first);
    std::copy(first.begin(), first.end(), pending_.begin());  // MPI_REQUEST_NULL once done
  }

 private:
  static void check(const Tensor& x, const char* op) {
    RT_ASSERT(x.device == Device::cpu && x.dtype == DType::f32 && x.contiguous(),
              std::string("MPI ") + op + ": a contiguous f32 host tensor");
  }
  // MPI counts are ints: a piece of 2^31 elements or more would need chunking, which the CPU path's
  // model sizes have not called for.
  static int count(const Tensor& x) {
    RT_ASSERT(x.numel() < (int64_t{1} << 31), "an MPI collective over 2^31 elements or more");
    return static_cast<int>(x.numel());
  }
  std::vector<MPI_Request> pending_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(double timeout_s) {
  return std::make_unique<MpiCommunicator>(timeout_s);
}

std::unique_ptr<Communicator> make_communicator(Backend& backend, double timeout_s) {
#ifdef RANKTUNE_HAVE_CUDA
  if (backend.device() == Device::cuda) return make_nccl_communicator(backend, timeout_s);
#endif
  (void)backend;
  return make_mpi_communicator(timeout_s);
}

}  // namespace ranktune

// The NCCL communicator of the GPU path (see include/ranktune/comm.h): one
// communicator per run, bootstrapped over MPI; collectives on a communication
// stream of their own.
//
// Ordering: every start (start_sum, start_reduce, start_broadcasts) records an event on the compute
// stream (after the kernels that wrote its tensor) and makes the communication stream wait for it,
// so a gradient bucket is reduced while the compute stream goes on with the backward of earlier
// layers, and an updated weight is broadcast while the optimizer updates the next. finish_started()
// records one event after every collective started since the last, and the compute stream waits
// for it before anything reads their results. The host polls that event under the watchdog,
// together with ncclCommGetAsyncError, so a stuck or failed collective ends the job with a message
// instead of a hang.
//
// The gradient reduce over the copy engines (reduce_by_peer_copies): NCCL's kernels take SMs from
// backward's GEMMs for as long as the gradients cross. On one host each rank instead maps every
// other rank's receive buffer (CUDA IPC) and copies its pieces there on a copy stream, which no SM
// serves: under ZeRO-1 a piece goes to the owner of its shard, in an all-reduce (LoRA) to every
// other rank. The receiver adds each piece's copies to its own on a stream beside backward as soon
// as they have arrived. Each rank's buffer holds one slot per other rank (of its shard, or of the
// whole buffer), then the flags, 32-bit counters compared with CUDA's stream memory operations:
//   arrived[r]:  how many pieces rank r has copied here so far (every step counts on)
//   consumed[o]: the steps whose pieces receiver o has added, so its slots are free again
// A sender's first copy of step k waits (on its copy stream) for consumed[o] >= k-1 of every
// receiver o; a receiver's add of its n-th piece waits (on its add stream) for arrived[r] >= n of
// every sender r: every rank starts the same pieces in the same order. A counter travels as a
// 4-byte copy behind the data on the same stream, so it lands after the data. The compute stream
// waits for the adds in finish_started(), and the host watches it pass them under the watchdog, as
// it watches NCCL.
#include <cuda.h>  // the stream memory operations' types; the functions come via cudaGetDriverEntryPointByVersion
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <exception>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "kernels.h"
#include "ranktune/comm.h"
#include "ranktune/error.h"

#define ncclCheck(call)                                                                              \
  do {                                                                                               \
    const ncclResult_t nccl_check_result_ = (call);                                                  \
    if (nccl_check_result_ != ncclSuccess)                                                           \
      ::ranktune::assert_fail(#call, __FILE__, __LINE__,                                             \
                              std::string("NCCL error: ") + ncclGetErrorString(nccl_check_result_)); \
  } while (0)

namespace ranktune {

namespace {

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Backend& backend, double timeout_s)
      : Communicator(MPI_COMM_WORLD, timeout_s),
        device_(backend.device_index()),
        compute_(static_cast<cudaStream_t>(backend.native_stream())) {
    RT_ASSERT(device_ >= 0 && compute_ != nullptr, "NCCL communicator needs a CUDA backend");
    cudaCheck(cudaSetDevice(device_));
    int least = 0, greatest = 0;
    cudaCheck(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    // High priority: a bucket's all-reduce should not wait behind the backward
    // kernels queued after it.
    cudaCheck(cudaStreamCreateWithPriority(&comm_stream_, cudaStreamNonBlocking, greatest));
    cudaCheck(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    if (world_ == 1) return;
    ncclUniqueId id{};
    if (rank_ == 0) ncclCheck(ncclGetUniqueId(&id));
    barrier("the NCCL set-up");
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, comm_);
    ncclCheck(ncclCommInitRank(&nccl_, world_, id, rank_));
  }

  ~NcclCommunicator() override {
    if (peer_) close_peer_copies();
    if (comm_stream_) (void)cudaStreamSynchronize(comm_stream_);
    if (nccl_) (void)ncclCommDestroy(nccl_);
    for (cudaEvent_t e : ready_) (void)cudaEventDestroy(e);
    for (cudaEvent_t e : marks_) (void)cudaEventDestroy(e);
    if (done_) (void)cudaEventDestroy(done_);
    if (comm_stream_) (void)cudaStreamDestroy(comm_stream_);
  }

  std::string name() const override {
    int v = 0;
    ncclGetVersion(&v);
    return "NCCL " + std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." +
           std::to_string(v % 100);
  }

  void start_sum(Tensor x) override {
    if (world_ == 1) return;
    check(x, "start_sum");
    if (peer_ && summing_ && in_grad(x)) {
      start_peer_sum(x);
      return;
    }
    after_compute(comm_stream_);
    ncclCheck(ncclAllReduce(x.data, x.data, static_cast<size_t>(x.numel()), ncclFloat32, ncclSum, nccl_, comm_stream_));
    pending_ = true;
  }

  void start_reduce(Tensor x, int root) override {
    if (world_ == 1) return;
    check(x, "start_reduce");
    RT_ASSERT(root >= 0 && root < world_, "start_reduce: a root rank in the world");
    if (peer_ && !summing_ && in_grad(x)) {
      start_peer_copy(x, root);
      return;
    }
    after_compute(comm_stream_);
    ncclCheck(
        ncclReduce(x.data, x.data, static_cast<size_t>(x.numel()), ncclFloat32, ncclSum, root, nccl_, comm_stream_));
    pending_ = true;
  }

  void start_broadcasts(const std::vector<Broadcast>& batch) override {
    if (world_ == 1 || batch.empty()) return;
    for (const Broadcast& b : batch) {
      RT_ASSERT(b.x.device == Device::cuda && b.x.contiguous() &&
                    (b.x.dtype == DType::f32 || b.x.dtype == DType::bf16 || b.x.dtype == DType::i32),
                "NCCL start_broadcasts: a contiguous f32, bf16 or i32 GPU tensor");
      RT_ASSERT(b.root >= 0 && b.root < world_, "start_broadcasts: a root rank in the world");
    }
    after_compute(comm_stream_);
    ncclCheck(ncclGroupStart());
    for (const Broadcast& b : batch) {
      const ncclDataType_t type =
          b.x.dtype == DType::bf16 ? ncclBfloat16 : (b.x.dtype == DType::i32 ? ncclInt32 : ncclFloat32);
      ncclCheck(ncclBroadcast(b.x.data, b.x.data, static_cast<size_t>(b.x.numel()), type, b.root, nccl_, comm_stream_));
    }
    ncclCheck(ncclGroupEnd());
    pending_ = true;
  }

  void finish_started(const std::string& what) override {
    const bool peer = peer_step_;
    if (peer) finish_peer_copies();
    if (world_ == 1 || (!pending_ && !peer)) return;
    wait_comm(what, peer);
    pending_ = false;
    n_ready_used_ = 0;
    n_marks_used_ = 0;
  }

  int mark() override {
    if (world_ == 1) return 0;
    if (n_marks_used_ == marks_.size()) {
      cudaEvent_t e = nullptr;
      cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      marks_.push_back(e);
    }
    cudaCheck(cudaEventRecord(marks_[n_marks_used_], comm_stream_));
    return static_cast<int>(n_marks_used_++);
  }

  void compute_waits_for(int mark, const std::string&) override {
    if (world_ == 1) return;
    RT_ASSERT(mark >= 0 && static_cast<size_t>(mark) < n_marks_used_,
              "compute_waits_for: a mark since the last finish_started()");
    cudaCheck(cudaStreamWaitEvent(compute_, marks_[static_cast<size_t>(mark)], 0));
  }

  bool copies_gradients() const override { return peer_; }

  bool reduce_by_peer_copies(Tensor grad, const std::vector<int64_t>& shard_offsets) override {
    if (world_ == 1) return false;
    const bool summing = shard_offsets.empty();
    RT_ASSERT(
        grad.device == Device::cuda && grad.dtype == DType::f32 && grad.contiguous() &&
            (summing || (static_cast<int>(shard_offsets.size()) == world_ + 1 && shard_offsets.back() == grad.numel())),
        "reduce_by_peer_copies: the flat f32 gradient buffer and one shard offset per rank and the end, or none");
    cudaCheck(cudaSetDevice(device_));
    // Every rank on this host, the stream memory operations at hand, room for the buffer.
    MPI_Comm node = MPI_COMM_NULL;
    MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
    int on_host = 0;
    MPI_Comm_size(node, &on_host);
    MPI_Comm_free(&node);
    bool ok = on_host == world_ && load_stream_memops();
    const auto me = static_cast<size_t>(rank_);
    const int64_t bytes = peer_copy_bytes(summing ? grad.numel() : shard_offsets[me + 1] - shard_offsets[me], world_);
    size_t free_bytes = 0, total = 0;
    if (ok) cudaCheck(cudaMemGetInfo(&free_bytes, &total));
    // Leave 1 GiB for what is allocated later (cuBLAS workspaces, NCCL's buffers).
    ok = ok && static_cast<int64_t>(free_bytes) >= bytes + (int64_t{1} << 30);
    if (ok && cudaMalloc(&base_, static_cast<size_t>(bytes)) != cudaSuccess) {
      (void)cudaGetLastError();
      base_ = nullptr;
      ok = false;
    }
    if (ok) cudaCheck(cudaMemset(base_, 0, static_cast<size_t>(bytes)));
    cudaCheck(cudaDeviceSynchronize());  // the zeroed flags are in place before any peer maps them
    if (max(ok ? 0 : 1, "the copy-engine reduce's set-up") != 0) {
      if (base_) cudaCheck(cudaFree(base_));
      base_ = nullptr;
      return false;
    }
    // Every rank maps every other rank's buffer.
    cudaIpcMemHandle_t mine{};
    cudaCheck(cudaIpcGetMemHandle(&mine, base_));
    std::vector<cudaIpcMemHandle_t> handles(static_cast<size_t>(world_));
    MPI_Allgather(&mine, sizeof mine, MPI_BYTE, handles.data(), sizeof mine, MPI_BYTE, comm_);
    peer_base_.assign(static_cast<size_t>(world_), nullptr);
    for (int r = 0; r < world_; ++r) {
      if (r == rank_) continue;
      if (cudaIpcOpenMemHandle(&peer_base_[static_cast<size_t>(r)], handles[static_cast<size_t>(r)],
                               cudaIpcMemLazyEnablePeerAccess) != cudaSuccess) {
        (void)cudaGetLastError();
        peer_base_[static_cast<size_t>(r)] = nullptr;
        ok = false;
      }
    }
    if (max(ok ? 0 : 1, "the copy-engine reduce's mapping") != 0) {
      for (void* p : peer_base_)
        if (p) (void)cudaIpcCloseMemHandle(p);
      peer_base_.clear();
      cudaCheck(cudaFree(base_));
      base_ = nullptr;
      return false;
    }
    grad_ = grad;
    offsets_ = shard_offsets;
    summing_ = summing;
    cudaCheck(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
    cudaCheck(cudaStreamCreateWithFlags(&add_stream_, cudaStreamNonBlocking));
    sent_.assign(static_cast<size_t>(world_), 0);
    cudaCheck(cudaEventCreateWithFlags(&copy_done_, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&peer_done_, cudaEventDisableTiming));
    peer_ = true;
    return true;
  }

 private:
  // ---- the copy-engine reduce ----
  // Rank `at`'s buffer (this rank's or a mapped peer's): its slots, then its flags.
  char* buffer_of(int at) const {
    return static_cast<char*>(at == rank_ ? base_ : peer_base_[static_cast<size_t>(at)]);
  }
  bool in_grad(const Tensor& x) const {
    return x.ptr<float>() >= grad_.ptr<float>() && x.ptr<float>() + x.numel() <= grad_.ptr<float>() + grad_.numel();
  }
  // What receiver `at`'s slots hold: its shard (ZeRO-1) or the whole buffer (all-reduce).
  int64_t slot_begin(int at) const { return summing_ ? 0 : offsets_[static_cast<size_t>(at)]; }
  int64_t slot_numel(int at) const {
    return summing_ ? grad_.numel() : offsets_[static_cast<size_t>(at) + 1] - offsets_[static_cast<size_t>(at)];
  }
  // Receiver `at`'s slot for sender `sender`, in `at`'s buffer as this rank addresses it.
  float* slot(int at, int sender) const {
    const int index = sender < at ? sender : sender - 1;
    return reinterpret_cast<float*>(buffer_of(at)) + index * slot_numel(at);
  }
  // Rank `at`'s flags: arrived[world], consumed[world], and two staging words.
  uint32_t* flags(int at) const {
    const int64_t slots = (world_ - 1) * slot_numel(at) * static_cast<int64_t>(sizeof(float));
    return reinterpret_cast<uint32_t*>(buffer_of(at) + (slots + 255) / 256 * 256);
  }
  uint32_t* arrived(int at, int sender) const { return flags(at) + sender; }
  uint32_t* consumed(int at, int owner) const { return flags(at) + world_ + owner; }
  uint32_t* staging(int which) const { return flags(rank_) + 2 * world_ + which; }

  bool load_stream_memops() {
    if (wait_value_ && write_value_) return true;
    void* wait = nullptr;
    void* write = nullptr;
    cudaDriverEntryPointQueryResult q1{}, q2{};
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &wait, 12000, cudaEnableDefault, &q1) != cudaSuccess ||
        cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &write, 12000, cudaEnableDefault, &q2) !=
            cudaSuccess ||
        q1 != cudaDriverEntryPointSuccess || q2 != cudaDriverEntryPointSuccess || !wait || !write) {
      (void)cudaGetLastError();
      return false;
    }
    wait_value_ = reinterpret_cast<StreamValueFn>(wait);
    write_value_ = reinterpret_cast<StreamValueFn>(write);
    return true;
  }
  void wait_value(cudaStream_t stream, const uint32_t* at, uint32_t value) {
    const CUresult r = wait_value_(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(at), value,
                                   CU_STREAM_WAIT_VALUE_GEQ);
    RT_ASSERT(r == CUDA_SUCCESS, "cuStreamWaitValue32 failed with CUresult " + std::to_string(static_cast<int>(r)));
  }
  // Writes `value` into `to` (this rank's or a peer's word) behind the work queued on `stream`.
  void post_value(cudaStream_t stream, int which, uint32_t* to, uint32_t value) {
    const CUresult r =
        write_value_(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(staging(which)), value, 0);
    RT_ASSERT(r == CUDA_SUCCESS, "cuStreamWriteValue32 failed with CUresult " + std::to_string(static_cast<int>(r)));
    cudaCheck(cudaMemcpyAsync(to, staging(which), sizeof(uint32_t), cudaMemcpyDefault, stream));
  }

  // y += x on the add stream.
  void add(float* y, const float* x, int64_t n) { kernels::add_f32(y, n, x, n, 1, n, add_stream_); }
  // The first copy of a step waits until the receivers have added the last step's slots.
  void arm_copies() {
    if (copy_armed_) return;
    for (int o = 0; o < world_; ++o)
      if (o != rank_) wait_value(copy_stream_, consumed(rank_, o), seq_);
    copy_armed_ = true;
  }
  // Copies x (a slice of the gradients, written by the compute stream) into this rank's slot on
  // `to`'s GPU, then counts it in `to`'s arrived[].
  void send_piece(Tensor x, int to) {
    const int64_t offset = x.ptr<float>() - grad_.ptr<float>() - slot_begin(to);
    cudaCheck(cudaMemcpyAsync(slot(to, rank_) + offset, x.data, x.nbytes(), cudaMemcpyDefault, copy_stream_));
    post_value(copy_stream_, 0, arrived(to, rank_), ++sent_[static_cast<size_t>(to)]);
  }
  // The add stream waits until every other rank's copy of this rank's next piece has arrived.
  void wait_for_pieces() {
    ++received_;
    for (int from = 0; from < world_; ++from)
      if (from != rank_) wait_value(add_stream_, arrived(rank_, from), received_);
  }

  // ZeRO-1: a piece of root's shard. Every other rank copies it into its slot on the root's GPU
  // once its compute stream has written it; the root adds the slots' copies to its own on the add
  // stream as soon as they have arrived, while backward goes on (the ledger reports a piece once it
  // is final for the step, so nothing writes it meanwhile).
  void start_peer_copy(Tensor x, int root) {
    const int64_t offset = x.ptr<float>() - grad_.ptr<float>();
    RT_ASSERT(offset >= slot_begin(root) && offset + x.numel() <= slot_begin(root) + slot_numel(root),
              "start_reduce: a piece of the gradients inside its root's shard");
    peer_step_ = true;
    if (root == rank_) {
      after_compute(add_stream_);
      wait_for_pieces();
      for (int from = 0; from < world_; ++from)
        if (from != rank_) add(x.ptr<float>(), slot(rank_, from) + (offset - slot_begin(rank_)), x.numel());
      return;
    }
    arm_copies();
    after_compute(copy_stream_);
    send_piece(x, root);
  }

  // All-reduce: every rank copies its piece to every other rank, then sums the world's copies into
  // its own in rank order: the slots of the ranks below it into the lowest one's slot, that into its
  // own piece (fp32 addition commutes, so this is (g0 + ... + g_{rank-1}) + g_rank to the bit), and
  // then the slots of the ranks above it one by one. Its own adds wait until its copies have read
  // the piece.
  void start_peer_sum(Tensor x) {
    const int64_t offset = x.ptr<float>() - grad_.ptr<float>();
    peer_step_ = true;
    arm_copies();
    after_compute(copy_stream_);
    for (int to = 0; to < world_; ++to)
      if (to != rank_) send_piece(x, to);
    after(copy_stream_, add_stream_);
    wait_for_pieces();
    float* below = nullptr;
    for (int from = 0; from < rank_; ++from) {
      float* s = slot(rank_, from) + offset;
      if (below)
        add(below, s, x.numel());
      else
        below = s;
    }
    if (below) add(x.ptr<float>(), below, x.numel());
    for (int from = rank_ + 1; from < world_; ++from) add(x.ptr<float>(), slot(rank_, from) + offset, x.numel());
  }

  // The end of a step's reduce: the compute stream waits for this rank's copies (backward rewrites
  // the gradients next step) and for its adds; the adds' end frees the slots for the next step.
  void finish_peer_copies() {
    ++seq_;
    cudaCheck(cudaEventRecord(copy_done_, copy_stream_));
    cudaCheck(cudaStreamWaitEvent(compute_, copy_done_, 0));
    for (int r = 0; r < world_; ++r)
      if (r != rank_) post_value(add_stream_, 1, consumed(r, rank_), seq_);
    cudaCheck(cudaEventRecord(peer_done_, add_stream_));
    cudaCheck(cudaStreamWaitEvent(compute_, peer_done_, 0));
    copy_armed_ = false;
    peer_step_ = false;
  }

  // No rank frees its buffer while another may still write into it: each waits for its own GPU,
  // then for every rank to have done so.
  void close_peer_copies() {
    (void)cudaSetDevice(device_);
    (void)cudaDeviceSynchronize();
    if (std::uncaught_exceptions() == 0) MPI_Barrier(comm_);
    for (void* p : peer_base_)
      if (p) (void)cudaIpcCloseMemHandle(p);
    if (base_) (void)cudaFree(base_);
    if (copy_done_) (void)cudaEventDestroy(copy_done_);
    if (peer_done_) (void)cudaEventDestroy(peer_done_);
    if (copy_stream_) (void)cudaStreamDestroy(copy_stream_);
    if (add_stream_) (void)cudaStreamDestroy(add_stream_);
    peer_ = false;
  }

  static void check(const Tensor& x, const char* op) {
    RT_ASSERT(x.device == Device::cuda && x.dtype == DType::f32 && x.contiguous(),
              std::string("NCCL ") + op + ": a contiguous f32 GPU tensor");
  }

  // `stream` (communication, copy or add) waits for what the compute stream has queued so far.
  void after_compute(cudaStream_t stream) { after(compute_, stream); }
  // `waiter` waits for what `stream` has queued so far.
  void after(cudaStream_t stream, cudaStream_t waiter) {
    if (n_ready_used_ == ready_.size()) {
      cudaEvent_t e = nullptr;
      cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      ready_.push_back(e);
    }
    cudaEvent_t e = ready_[n_ready_used_++];
    cudaCheck(cudaEventRecord(e, stream));
    cudaCheck(cudaStreamWaitEvent(waiter, e, 0));
  }

  // The compute stream waits for every collective queued so far; the host
  // watches them finish, and with `peer` the compute stream pass the peer copies' adds.
  void wait_comm(const std::string& what, bool peer = false) {
    if (pending_) {
      cudaCheck(cudaEventRecord(done_, comm_stream_));
      cudaCheck(cudaStreamWaitEvent(compute_, done_, 0));
    }
    watchdog_.enter(what);
    const auto abort = [this] { (void)ncclCommAbort(nccl_); };
    watchdog_.wait(
        [&] {
          ncclResult_t async = ncclSuccess;
          ncclCheck(ncclCommGetAsyncError(nccl_, &async));
          if (async != ncclSuccess)
            watchdog_.fail(std::string("NCCL reported ") + ncclGetErrorString(async) + " in " + what +
                               " (another rank probably died)",
                           abort);
          for (cudaEvent_t e : {pending_ ? done_ : nullptr, peer ? peer_done_ : nullptr}) {
            if (e == nullptr) continue;
            const cudaError_t q = cudaEventQuery(e);
            if (q == cudaErrorNotReady) return false;
            cudaCheck(q);
          }
          return true;
        },
        abort);
  }

  int device_;
  cudaStream_t compute_;
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  std::vector<cudaEvent_t> ready_;
  size_t n_ready_used_ = 0;
  std::vector<cudaEvent_t> marks_;  // mark(): recorded on the communication stream
  size_t n_marks_used_ = 0;
  ncclComm_t nccl_ = nullptr;
  bool pending_ = false;

  // The copy-engine reduce (reduce_by_peer_copies).
  using StreamValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
  StreamValueFn wait_value_ = nullptr, write_value_ = nullptr;  // cuStreamWaitValue32, cuStreamWriteValue32
  bool peer_ = false;
  bool summing_ = false;  // all-reduce (every rank receives every piece), not ZeRO-1's reduce
  Tensor grad_;
  std::vector<int64_t> offsets_;
  void* base_ = nullptr;          // this rank's slots and flags
  std::vector<void*> peer_base_;  // the other ranks', mapped
  cudaStream_t copy_stream_ = nullptr;
  cudaEvent_t copy_done_ = nullptr, peer_done_ = nullptr;
  cudaStream_t add_stream_ = nullptr;  // the receiver's adds, beside backward
  uint32_t seq_ = 0;                   // steps whose reduce finished
  uint32_t received_ = 0;              // pieces this rank has received so far (every step)
  std::vector<uint32_t> sent_;         // pieces sent to each rank so far
  bool peer_step_ = false, copy_armed_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Backend& backend, double timeout_s) {
  return std::make_unique<NcclCommunicator>(backend, timeout_s);
}

}  // namespace ranktune

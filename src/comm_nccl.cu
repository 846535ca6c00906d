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
#include <cuda_runtime.h>
#include <nccl.h>

#include <string>
#include <vector>

#include "cuda_check.h"
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
    after_compute();
    ncclCheck(ncclAllReduce(x.data, x.data, static_cast<size_t>(x.numel()), ncclFloat32, ncclSum, nccl_, comm_stream_));
    pending_ = true;
  }

  void start_reduce(Tensor x, int root) override {
    if (world_ == 1) return;
    check(x, "start_reduce");
    RT_ASSERT(root >= 0 && root < world_, "start_reduce: a root rank in the world");
    after_compute();
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
    after_compute();
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
    if (world_ == 1 || !pending_) return;
    wait_comm(what);
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

 private:
  static void check(const Tensor& x, const char* op) {
    RT_ASSERT(x.device == Device::cuda && x.dtype == DType::f32 && x.contiguous(),
              std::string("NCCL ") + op + ": a contiguous f32 GPU tensor");
  }

  // The communication stream waits for what the compute stream has queued so
  // far.
  void after_compute() {
    if (n_ready_used_ == ready_.size()) {
      cudaEvent_t e = nullptr;
      cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      ready_.push_back(e);
    }
    cudaEvent_t e = ready_[n_ready_used_++];
    cudaCheck(cudaEventRecord(e, compute_));
    cudaCheck(cudaStreamWaitEvent(comm_stream_, e, 0));
  }

  // The compute stream waits for every collective queued so far; the host
  // watches them finish.
  void wait_comm(const std::string& what) {
    cudaCheck(cudaEventRecord(done_, comm_stream_));
    cudaCheck(cudaStreamWaitEvent(compute_, done_, 0));
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
          const cudaError_t q = cudaEventQuery(done_);
          if (q == cudaErrorNotReady) return false;
          cudaCheck(q);
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
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Backend& backend, double timeout_s) {
  return std::make_unique<NcclCommunicator>(backend, timeout_s);
}

}  // namespace ranktune

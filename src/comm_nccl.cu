// The NCCL communicator of the GPU path (see include/ranktune/comm.h): one
// communicator per run, bootstrapped over MPI; collectives on a communication
// stream of their own.
//
// Ordering: start_sum() records an event on the compute stream (after the
// kernels that wrote the gradient bucket) and makes the communication stream
// wait for it, so the bucket is summed while the compute stream goes on with
// the backward of earlier layers. finish_sums() records one event after every
// sum of the step, and the compute stream waits for it before the gradient norm
// and the optimizer read the gradients. The host polls that event under the
// watchdog, together with ncclCommGetAsyncError, so a stuck or failed
// collective ends the job with a message instead of a hang.
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

  void finish_sums(const std::string& what) override {
    if (world_ == 1 || !pending_) return;
    wait_comm(what);
    pending_ = false;
    n_ready_used_ = 0;
  }

  // Shards differ in size (they hold whole tensors), so the reduce-scatter is one reduce per
  // shard to its owner, and the all-gather one broadcast per shard from its owner, each batch
  // grouped into one NCCL launch.
  void reduce_scatter_sum(Tensor full, const std::vector<int64_t>& offsets) override {
    check(full, "reduce_scatter_sum");
    if (world_ == 1) return;
    after_compute();
    ncclCheck(ncclGroupStart());
    for (int r = 0; r < world_; ++r) {
      float* shard = full.ptr<float>() + offsets[static_cast<size_t>(r)];
      const size_t n = static_cast<size_t>(offsets[static_cast<size_t>(r) + 1] - offsets[static_cast<size_t>(r)]);
      ncclCheck(ncclReduce(shard, shard, n, ncclFloat32, ncclSum, r, nccl_, comm_stream_));
    }
    ncclCheck(ncclGroupEnd());
    wait_comm("the gradient reduce-scatter");
    n_ready_used_ = 0;
  }

  void all_gather(Tensor full, const std::vector<int64_t>& offsets) override {
    check(full, "all_gather");
    if (world_ == 1) return;
    after_compute();
    const ncclDataType_t type = full.dtype == DType::bf16 ? ncclBfloat16 : ncclFloat32;
    const int64_t elem = static_cast<int64_t>(dtype_size(full.dtype));
    ncclCheck(ncclGroupStart());
    for (int r = 0; r < world_; ++r) {
      char* shard = static_cast<char*>(full.data) + offsets[static_cast<size_t>(r)] * elem;
      const size_t n = static_cast<size_t>(offsets[static_cast<size_t>(r) + 1] - offsets[static_cast<size_t>(r)]);
      ncclCheck(ncclBroadcast(shard, shard, n, type, r, nccl_, comm_stream_));
    }
    ncclCheck(ncclGroupEnd());
    wait_comm("the weight all-gather");
    n_ready_used_ = 0;
  }

 private:
  static void check(const Tensor& x, const char* op) {
    RT_ASSERT(x.device == Device::cuda && (x.dtype == DType::f32 || x.dtype == DType::bf16) && x.contiguous(),
              std::string("NCCL ") + op + ": a contiguous f32 or bf16 GPU tensor");
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
  ncclComm_t nccl_ = nullptr;
  bool pending_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Backend& backend, double timeout_s) {
  return std::make_unique<NcclCommunicator>(backend, timeout_s);
}

}  // namespace ranktune

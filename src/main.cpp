// ranktune: fine-tune Llama models with LoRA, QLoRA or full fine-tuning on CPUs, one GPU, or many
// MPI ranks. main() owns MPI and maps errors to exit codes; the subcommands live in src/cmd_*.cpp.
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include <mpi.h>

#include "ranktune/cli.h"
#include "ranktune/error.h"

namespace {

const char* kUsage =
    "usage: ranktune <command> [args]\n"
    "\n"
    "commands:\n"
    "  train CONFIG [--set section.key=value]...   fine-tune as the run config says\n"
    "  eval CONFIG [--set ...]                     mean loss of the configured model on its data (one JSON line)\n"
    "  generate CONFIG --prompt TEXT [...]         sample from the model (+ adapter)\n"
    "  export CONFIG --format peft|merged --output DIR [--checkpoint latest|PATH]\n"
    "                                              a checkpoint as a PEFT adapter or a merged HF model\n"
    "  prep INPUT.jsonl OUTPUT.h5 [...]            tokenize JSONL records into an HDF5 token dataset\n"
    "  env [CONFIG]                                the detected ranks, GPUs and versions as JSON\n"
    "  config --reference | CONFIG                 print every key with its default, or the resolved config\n"
    "\n"
    "`ranktune <command> --help` for a command's options. Run under mpirun/srun for several ranks.\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace ranktune;
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? kExitUserError : 0;
  }
  if (std::string(argv[1]) == "--version") {
    std::printf("ranktune %s\n", RANKTUNE_VERSION);
    return 0;
  }
  const std::map<std::string, int (*)(const Args&, const LaunchInfo&)> commands = {
      {"train", cmd_train}, {"eval", cmd_eval}, {"env", cmd_env},
      {"config", cmd_config}, {"prep", cmd_prep}, {"generate", cmd_generate},
      {"export", cmd_export}};
  const std::string name = argv[1];
  auto it = commands.find(name);
  if (it == commands.end()) {
    std::fprintf(stderr, "ranktune: unknown command '%s'\n\n%s", name.c_str(), kUsage);
    return kExitUserError;
  }
  Args args(argv + 2, argv + argc);

  MpiSession mpi(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int code = 0;
  try {
    LaunchInfo li = detect_launch();
    code = it->second(args, li);
  } catch (const UserError& e) {
    // Every rank usually meets the same error; rank 0 speaks for them, others only if they alone fail.
    std::fprintf(stderr, "ranktune %s: error: %s\n", name.c_str(), e.what());
    code = kExitUserError;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ranktune %s: internal error (rank %d): %s\n", name.c_str(), rank, e.what());
    code = 1;
  }
  std::fflush(stdout);
  std::fflush(stderr);
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  // Never leave other ranks hanging; a requeue exit is agreed by every rank, so they end together.
  if (code != 0 && code != kExitRequeue && world > 1) MPI_Abort(MPI_COMM_WORLD, code);
  return code;
}

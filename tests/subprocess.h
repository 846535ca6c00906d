// Running the ranktune binary (or mpirun) from tests as a user would: in the source directory,
// stdout and stderr together, with the exit code.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

struct CommandResult {
  int code = -1;  // exit status, -1 when killed by a signal
  std::string output;
};

inline CommandResult run_command(const std::string& cmd, int omp_threads) {
  CommandResult r;
  const std::string full = "cd " + std::string(RANKTUNE_SOURCE_DIR) +
                           " && OMP_NUM_THREADS=" + std::to_string(omp_threads) + " " + cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// An empty directory of its own for a test, named after it and this process.
inline std::string fresh_temp_dir(const std::string& name) {
  const std::filesystem::path d =
      std::filesystem::temp_directory_path() / ("ranktune_" + name + "_" + std::to_string(getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

// The "loss" of every line of a run's metrics.jsonl.
inline std::vector<double> logged_losses(const std::string& output_dir) {
  std::ifstream in(output_dir + "/metrics.jsonl");
  std::vector<double> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}

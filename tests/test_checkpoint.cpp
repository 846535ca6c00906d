// Checkpoints, resume, preemption, bad steps and export: the HDF5 round trip in process, and whole
// runs of the binary that are killed, corrupted, signalled or poisoned and then resumed, compared
// with uninterrupted runs.
#include <gtest/gtest.h>

#include <hdf5.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "subprocess.h"

#include "ranktune/backend.h"
#include "ranktune/checkpoint.h"
#include "ranktune/config.h"
#include "ranktune/hf_config.h"
#include "ranktune/model.h"
#include "ranktune/optimizer.h"
#include "ranktune/safetensors.h"
#include "ranktune/weights.h"

namespace fs = std::filesystem;
using namespace ranktune;

namespace {

using RunResult = CommandResult;

RunResult run(const std::string& cmd) { return run_command(cmd, 1); }

std::string temp_dir(const std::string& name) { return fresh_temp_dir("ckpt_" + name); }

const char* kConfig =
    "model:\n"
    "  architecture: {vocab_size: 262, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2,\n"
    "                 num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64,\n"
    "                 tie_word_embeddings: true}\n"
    "  tokenizer: byte\n"
    "  max_seq_length: 12\n"
    "lora: {enabled: true, r: 4, lora_alpha: 8}\n"
    "data: {train_file: jobs/data/quickstart/train.jsonl, format: prompt_completion}\n"
    "training: {max_steps: 10, learning_rate: 1.0e-2, warmup_steps: 2, gradient_accumulation_steps: 2,\n"
    "           per_device_train_batch_size: 4}\n"
    "logging: {logging_steps: 1}\n";

std::string write_config(const std::string& dir) {
  const std::string path = dir + "/run.yaml";
  std::ofstream(path) << kConfig;
  return path;
}

std::string train(const std::string& cfg, const std::string& out, const std::string& extra = "") {
  return std::string(RANKTUNE_BINARY) + " train " + cfg + " --set training.output_dir=" + out + " " + extra;
}

// metrics.jsonl without the timing fields.
std::vector<std::string> metrics(const std::string& dir) {
  std::ifstream in(dir + "/metrics.jsonl");
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    for (const char* k : {"tokens_per_s", "mfu", "mem_gib", "elapsed_s"}) j.erase(k);
    out.push_back(j.dump());
  }
  return out;
}

std::vector<double> losses(const std::string& dir) {
  std::vector<double> out;
  for (const auto& line : metrics(dir)) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}

void expect_bitwise(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << what;
}

// ---- the file format, in process --------------------------------------------------------------------

struct Trained {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Optimizer> opt;
  RunConfig cfg;
};

Trained make_trained(const std::string& optim, int updates) {
  Trained t;
  t.cfg = parse_run_config(kConfig, "run.yaml", {"training.optim=" + optim});
  t.backend = make_cpu_backend();
  t.model = std::make_unique<LlamaModel>(*t.backend, model_options_from(t.cfg, resolve_arch(t.cfg), 2));
  t.model->init_base_random(1);
  t.model->init_lora(2);
  t.opt = std::make_unique<Optimizer>(*t.backend, t.model->trainable(), t.cfg.training);
  ParamGroup& g = t.model->trainable();
  uint64_t state = 7;
  for (int u = 0; u < updates; ++u) {
    float* grad = g.grad.ptr<float>();
    for (int64_t i = 0; i < g.numel; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      grad[i] = static_cast<float>(static_cast<int64_t>(state >> 40) % 2001 - 1000) * 1e-3f;
    }
    t.opt->step(1e-2, 1.f);
  }
  return t;
}

TrainProgress sample_progress() {
  TrainProgress p;
  p.step = 3;
  p.optimizer_steps = 3;
  p.total_steps = 10;
  p.warmup_steps = 2;
  p.epoch = 0.125;
  p.global_batch = 8;
  p.world_size = 2;
  p.tokens_total = 1234;
  p.loss_since_log = 5.4321;
  p.steps_since_log = 1;
  p.loader = DataLoaderState{1, 48, 3407, 9500};
  return p;
}

void check_round_trip(const std::string& optim) {
  const std::string dir = temp_dir("roundtrip_" + optim);
  Trained a = make_trained(optim, 3);
  const std::string path = dir + "/" + checkpoint_file_name(3);
  save_checkpoint(path, *a.model, *a.opt, sample_progress(), a.cfg.to_yaml(), "hash123");
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  CheckpointData c = read_checkpoint(path);
  EXPECT_EQ(c.tokenizer_hash, "hash123");
  EXPECT_EQ(c.config_yaml, a.cfg.to_yaml());
  EXPECT_EQ(c.ranktune_version, RANKTUNE_VERSION);
  const TrainProgress p = sample_progress();
  EXPECT_EQ(c.progress.step, p.step);
  EXPECT_EQ(c.progress.total_steps, p.total_steps);
  EXPECT_EQ(c.progress.warmup_steps, p.warmup_steps);
  EXPECT_EQ(c.progress.epoch, p.epoch);
  EXPECT_EQ(c.progress.world_size, p.world_size);
  EXPECT_EQ(c.progress.tokens_total, p.tokens_total);
  EXPECT_EQ(c.progress.loss_since_log, p.loss_since_log);
  EXPECT_EQ(c.progress.loader.epoch, p.loader.epoch);
  EXPECT_EQ(c.progress.loader.row_offset, p.loader.row_offset);
  EXPECT_EQ(c.progress.loader.seed, p.loader.seed);
  EXPECT_EQ(c.progress.loader.n_rows, p.loader.n_rows);

  Trained b = make_trained(optim, 0);
  restore_weights(*b.model, c);
  b.opt->restore(c.optimizer, path);
  for (const ParamSpec& s : a.model->trainable().specs)
    expect_bitwise(a.model->get_tensor(s.name), b.model->get_tensor(s.name), s.name);
  const OptimizerState sa = a.opt->state(), sb = b.opt->state();
  EXPECT_EQ(sb.step, 3);
  EXPECT_EQ(sb.kind, optim);
  expect_bitwise(sa.m, sb.m, "m");
  expect_bitwise(sa.v, sb.v, "v");
  expect_bitwise(sa.m_absmax, sb.m_absmax, "m_absmax");
  expect_bitwise(sa.v_absmax, sb.v_absmax, "v_absmax");
  EXPECT_EQ(sa.m_codes, sb.m_codes);
  EXPECT_EQ(sa.v_codes, sb.v_codes);
  if (optim == "adamw_8bit") EXPECT_FALSE(sa.m_codes.empty());
  else EXPECT_FALSE(sa.m.empty());
  // One more update with the same gradients in both: the states really are the same.
  std::memcpy(b.model->trainable().grad.ptr<float>(), a.model->trainable().grad.ptr<float>(),
              static_cast<size_t>(a.model->trainable().numel) * 4);
  a.opt->step(1e-2, 1.f);
  b.opt->step(1e-2, 1.f);
  for (const ParamSpec& s : a.model->trainable().specs)
    expect_bitwise(a.model->get_tensor(s.name), b.model->get_tensor(s.name), s.name + " after a step");
}

TEST(CheckpointFile, RoundTripAdamW) { check_round_trip("adamw"); }
TEST(CheckpointFile, RoundTripAdamW8bit) { check_round_trip("adamw_8bit"); }

TEST(CheckpointFile, RefusesNonFiniteValues) {
  const std::string dir = temp_dir("nonfinite");
  Trained a = make_trained("adamw", 1);
  const ParamSpec& first = a.model->trainable().specs.front();
  std::vector<float> w = a.model->get_tensor(first.name);
  w[1] = std::nanf("");
  a.model->set_tensor(first.name, w);
  const std::string path = dir + "/" + checkpoint_file_name(1);
  try {
    save_checkpoint(path, *a.model, *a.opt, sample_progress(), "", "h");
    FAIL() << "saved a NaN";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(first.name), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

// The byte offset of a dataset's data in the file (contiguous storage).
uint64_t dataset_offset(const std::string& path, const std::string& name) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t d = H5Dopen2(f, name.c_str(), H5P_DEFAULT);
  const haddr_t off = H5Dget_offset(d);
  H5Dclose(d);
  H5Fclose(f);
  return off;
}

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x10);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

TEST(CheckpointFile, CorruptAndTruncatedFilesAreReported) {
  const std::string dir = temp_dir("corrupt");
  Trained a = make_trained("adamw", 1);
  const std::string good = dir + "/" + checkpoint_file_name(1), bad = dir + "/" + checkpoint_file_name(2),
                    cut = dir + "/" + checkpoint_file_name(3);
  save_checkpoint(good, *a.model, *a.opt, sample_progress(), "", "h");
  fs::copy_file(good, bad);
  fs::copy_file(good, cut);
  const std::string name = "/weights/" + a.model->trainable().specs[2].name;
  flip_byte(bad, dataset_offset(bad, name) + 5);
  try {
    read_checkpoint(bad);
    FAIL() << "read a corrupt file";
  } catch (const UserError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(bad), std::string::npos) << msg;
    EXPECT_NE(msg.find(name), std::string::npos) << msg;
    EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;
  }
  fs::resize_file(cut, fs::file_size(cut) / 2);
  EXPECT_THROW(read_checkpoint(cut), UserError);
  // latest: newest first, the broken ones skipped with a reason each.
  std::vector<std::string> skipped;
  auto found = find_resume_checkpoint("latest", dir, &skipped);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->path, good);
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_NE(skipped[0].find(cut), std::string::npos);
  EXPECT_NE(skipped[1].find(bad), std::string::npos);
  EXPECT_FALSE(find_resume_checkpoint("latest", dir + "/none", &skipped).has_value());
}

TEST(CheckpointFile, PruneKeepsTheNewest) {
  const std::string dir = temp_dir("prune");
  for (int s : {2, 4, 6, 8}) std::ofstream(dir + "/" + checkpoint_file_name(s)) << "x";
  std::ofstream(dir + "/" + checkpoint_file_name(10) + ".tmp") << "partial";
  const auto removed = prune_checkpoints(dir, 2);
  EXPECT_EQ(removed.size(), 3u);
  EXPECT_EQ(list_checkpoints(dir), (std::vector<std::string>{dir + "/" + checkpoint_file_name(8),
                                                             dir + "/" + checkpoint_file_name(6)}));
}

// ---- whole runs -----------------------------------------------------------------------------------------

// A straight run of `extra` settings, and the same run stopped by SIGUSR1 (sent by the process to
// itself in step 5) and resumed: exit 75, then metrics and adapter bitwise the same.
void check_interrupted_equals_straight(const std::string& name, const std::string& extra, size_t lines_at_5 = 5,
                                       size_t lines = 10) {
  const std::string dir = temp_dir(name);
  const std::string cfg = write_config(dir);
  RunResult r = run(train(cfg, dir + "/straight", extra));
  ASSERT_EQ(r.code, 0) << r.output;
  r = run("RANKTUNE_FAULT=sigusr1_at_step=5 " + train(cfg, dir + "/resumed", extra));
  ASSERT_EQ(r.code, 75) << r.output;
  EXPECT_NE(r.output.find("SIGUSR1 received: stopped after step 5/10"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/resumed/checkpoints/" + checkpoint_file_name(5)));
  if (extra.find("save_total_limit=1") != std::string::npos)
    EXPECT_EQ(list_checkpoints(dir + "/resumed/checkpoints").size(), 1u);
  EXPECT_EQ(metrics(dir + "/resumed").size(), lines_at_5);
  r = run(train(cfg, dir + "/resumed", extra + " --resume latest"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from " + dir + "/resumed/checkpoints/" + checkpoint_file_name(5) + " at step 5"),
            std::string::npos)
      << r.output;
  const auto straight = metrics(dir + "/straight"), resumed = metrics(dir + "/resumed");
  ASSERT_EQ(straight.size(), lines);
  EXPECT_EQ(resumed, straight);
  const CheckpointData a = read_checkpoint(dir + "/straight/checkpoints/" + checkpoint_file_name(10)),
                       b = read_checkpoint(dir + "/resumed/checkpoints/" + checkpoint_file_name(10));
  ASSERT_EQ(a.weights.size(), b.weights.size());
  for (size_t i = 0; i < a.weights.size(); ++i) expect_bitwise(a.weights[i].values, b.weights[i].values, a.weights[i].name);
  expect_bitwise(a.optimizer.m, b.optimizer.m, "m");
  EXPECT_EQ(a.optimizer.m_codes, b.optimizer.m_codes);
}

TEST(Resume, BitwiseAfterSigusr1Lora) { check_interrupted_equals_straight("lora", ""); }
TEST(Resume, BitwiseAfterSigusr1Lora8bit) {
  check_interrupted_equals_straight("lora8", "--set training.optim=adamw_8bit --set lora.lora_dropout=0.1");
}
TEST(Resume, BitwiseAfterSigusr1FullFineTuning) {
  check_interrupted_equals_straight("full", "--set lora.enabled=false --set training.learning_rate=1e-3 "
                                            "--set logging.logging_steps=3 --set checkpoint.save_steps=2 --set checkpoint.save_total_limit=1",
                                    1, 4);
}

TEST(Resume, KillDuringSaveKeepsThePreviousCheckpoint) {
  const std::string dir = temp_dir("kill");
  const std::string cfg = write_config(dir);
  RunResult r = run(train(cfg, dir + "/straight"));
  ASSERT_EQ(r.code, 0) << r.output;
  r = run("RANKTUNE_FAULT=kill_during_save=6 " + train(cfg, dir + "/killed", "--set checkpoint.save_steps=2"));
  ASSERT_TRUE(r.code == -1 || r.code == 128 + SIGKILL) << r.output;
  const std::string ckpts = dir + "/killed/checkpoints/";
  EXPECT_TRUE(fs::exists(ckpts + checkpoint_file_name(6) + ".tmp"));
  EXPECT_FALSE(fs::exists(ckpts + checkpoint_file_name(6)));
  EXPECT_EQ(list_checkpoints(ckpts).front(), ckpts + checkpoint_file_name(4));
  r = run(train(cfg, dir + "/killed", "--set checkpoint.save_steps=2 --resume latest"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from " + ckpts + checkpoint_file_name(4) + " at step 4"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(ckpts + checkpoint_file_name(6) + ".tmp"));
  // Steps 5 and 6 were logged before the kill and are logged again by the resumed run, once.
  EXPECT_EQ(metrics(dir + "/killed"), metrics(dir + "/straight"));
}

TEST(Resume, CorruptNewestFallsBackToTheOlderOne) {
  const std::string dir = temp_dir("corruptrun");
  const std::string cfg = write_config(dir);
  RunResult r = run(train(cfg, dir + "/straight", "--set checkpoint.save_steps=5"));
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string ckpts = dir + "/straight/checkpoints/";
  ASSERT_EQ(list_checkpoints(ckpts).size(), 2u);
  const auto before = metrics(dir + "/straight");
  const std::string newest = ckpts + checkpoint_file_name(10);
  flip_byte(newest, dataset_offset(newest, "/optimizer/v") + 11);
  r = run(train(cfg, dir + "/straight", "--set checkpoint.save_steps=5 --resume latest"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("resume: skipped " + newest + ": " + newest + ": dataset /optimizer/v does not match its checksum"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("resumed from " + ckpts + checkpoint_file_name(5) + " at step 5"), std::string::npos) << r.output;
  EXPECT_EQ(metrics(dir + "/straight"), before);
  EXPECT_NO_THROW(read_checkpoint(newest));  // rewritten whole by the resumed run
  // An explicit path is read as it is: a corrupt one is an error, not skipped.
  flip_byte(newest, dataset_offset(newest, "/optimizer/v") + 11);
  r = run(train(cfg, dir + "/straight", "--resume " + newest));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("does not match its checksum"), std::string::npos) << r.output;
}

TEST(Resume, FromTwoRanksOnOne) {
  const std::string dir = temp_dir("ranks");
  const std::string cfg = write_config(dir);
  const std::string mpi = std::string(RANKTUNE_MPIEXEC) + " --allow-run-as-root --oversubscribe -np 2 ";
  RunResult r = run("RANKTUNE_FAULT=sigusr1_at_step=5 " + mpi +
              train(cfg, dir + "/run", "--set model.enable_multi_gpu=true --set training.per_device_train_batch_size=2"));
  ASSERT_EQ(r.code, 75) << r.output;
  EXPECT_EQ(metrics(dir + "/run").size(), 5u);
  // Another global batch is refused with the numbers to use.
  r = run(train(cfg, dir + "/run", "--set training.per_device_train_batch_size=2 --resume latest"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("saved by a run with 8 sequences per step"), std::string::npos) << r.output;
  r = run(train(cfg, dir + "/run", "--resume latest"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("(saved on 2 ranks, continuing on 1)"), std::string::npos) << r.output;
  r = run(train(cfg, dir + "/one"));
  ASSERT_EQ(r.code, 0) << r.output;
  const auto mixed = losses(dir + "/run"), one = losses(dir + "/one");
  ASSERT_EQ(mixed.size(), 10u);
  ASSERT_EQ(one.size(), 10u);
  for (size_t i = 0; i < one.size(); ++i) EXPECT_NEAR(mixed[i], one[i], 1e-5 * std::fabs(one[i])) << "step " << i + 1;
}

// Starts a 400-step run in the background, sends `sig` once it has logged its first line, and
// returns the exit status.
int run_and_signal(const std::string& cfg, const std::string& out, int sig) {
  const pid_t pid = fork();
  if (pid < 0) return -2;
  if (pid == 0) {
    (void)!freopen("/dev/null", "w", stdout);
    (void)!chdir(RANKTUNE_SOURCE_DIR);
    setenv("OMP_NUM_THREADS", "1", 1);
    execl(RANKTUNE_BINARY, RANKTUNE_BINARY, "train", cfg.c_str(), "--set", ("training.output_dir=" + out).c_str(),
          "--set", "training.max_steps=400", "--set", "logging.logging_steps=50", static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < 1000 && metrics(out).empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  kill(pid, sig);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(Resume, Sigusr1FromOutside) {
  const std::string dir = temp_dir("signal");
  const std::string cfg = write_config(dir);
  const std::string extra = "--set training.max_steps=400 --set logging.logging_steps=50";
  ASSERT_EQ(run_and_signal(cfg, dir + "/run", SIGUSR1), 75) << "the run ended before the signal came";
  const auto ckpts = list_checkpoints(dir + "/run/checkpoints");
  ASSERT_EQ(ckpts.size(), 1u);
  EXPECT_LT(read_checkpoint(ckpts.front()).progress.step, 400);
  RunResult r = run(train(cfg, dir + "/run", extra + " --resume latest"));
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(train(cfg, dir + "/straight", extra));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(metrics(dir + "/run"), metrics(dir + "/straight"));
}

TEST(Resume, SigtermAndSigintSaveAndExit75) {
  const std::string dir = temp_dir("sigterm");
  const std::string cfg = write_config(dir);
  for (int sig : {SIGTERM, SIGINT}) {
    const std::string out = dir + "/run" + std::to_string(sig);
    ASSERT_EQ(run_and_signal(cfg, out, sig), 75) << "signal " << sig;
    const auto ckpts = list_checkpoints(out + "/checkpoints");
    ASSERT_EQ(ckpts.size(), 1u);
    EXPECT_NO_THROW(read_checkpoint(ckpts.front()));
  }
}

TEST(BadSteps, NanStepIsSkippedAndNeverSaved) {
  const std::string dir = temp_dir("nan");
  const std::string cfg = write_config(dir);
  RunResult r = run("RANKTUNE_FAULT=nan_loss_at_step=3 " + train(cfg, dir + "/run", "--set checkpoint.save_steps=1"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("step 3: non-finite loss or gradient norm"), std::string::npos) << r.output;
  const auto lines = metrics(dir + "/run");
  ASSERT_EQ(lines.size(), 10u);
  const auto step3 = nlohmann::json::parse(lines[2]);
  EXPECT_EQ(step3["skipped_steps"], 1) << lines[2];
  EXPECT_TRUE(step3["loss"].is_null()) << lines[2];
  for (size_t i = 3; i < lines.size(); ++i) {
    const auto j = nlohmann::json::parse(lines[i]);
    EXPECT_TRUE(j["loss"].is_number() && std::isfinite(j["loss"].get<double>())) << lines[i];
    EXPECT_TRUE(j["grad_norm"].is_number() && std::isfinite(j["grad_norm"].get<double>())) << lines[i];
  }
  const auto ckpts = list_checkpoints(dir + "/run/checkpoints");
  ASSERT_EQ(ckpts.size(), 10u);
  for (const auto& path : ckpts) {
    const CheckpointData c = read_checkpoint(path);
    for (const auto& t : c.weights)
      for (float x : t.values) ASSERT_TRUE(std::isfinite(x)) << path << " " << t.name;
    for (float x : c.optimizer.m) ASSERT_TRUE(std::isfinite(x)) << path;
    for (float x : c.optimizer.v) ASSERT_TRUE(std::isfinite(x)) << path;
  }
  // The skipped step changed nothing: the weights after step 3 are those after step 2.
  const CheckpointData s2 = read_checkpoint(dir + "/run/checkpoints/" + checkpoint_file_name(2)),
                       s3 = read_checkpoint(dir + "/run/checkpoints/" + checkpoint_file_name(3));
  for (size_t i = 0; i < s2.weights.size(); ++i) expect_bitwise(s2.weights[i].values, s3.weights[i].values, s2.weights[i].name);
  EXPECT_EQ(s3.optimizer.step, 2);
}

TEST(Export, PeftAndMergedMatchTheCheckpoint) {
  const std::string dir = temp_dir("export");
  const std::string cfg = write_config(dir);
  RunResult r = run(train(cfg, dir + "/run"));
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string set = " --set training.output_dir=" + dir + "/run";
  r = run(std::string(RANKTUNE_BINARY) + " export " + cfg + set + " --format peft --output " + dir + "/peft");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(std::string(RANKTUNE_BINARY) + " export " + cfg + set + " --checkpoint " + dir + "/run/checkpoints/" +
          checkpoint_file_name(10) + " --format merged --output " + dir + "/merged");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(std::string(RANKTUNE_BINARY) + " export " + cfg + set + " --format onnx --output " + dir + "/x");
  EXPECT_EQ(r.code, 2) << r.output;

  const CheckpointData c = read_checkpoint(dir + "/run/checkpoints/" + checkpoint_file_name(10));
  const auto weight = [&](const std::string& name) {
    for (const auto& t : c.weights)
      if (t.name == name) return t.values;
    ADD_FAILURE() << "no " << name;
    return std::vector<float>{};
  };
  SafetensorsFile peft(dir + "/peft/adapter_model.safetensors");
  ASSERT_EQ(peft.names().size(), c.weights.size());
  for (const auto& t : c.weights) expect_bitwise(peft.read_f32("base_model.model." + t.name), t.values, t.name);
  EXPECT_EQ(read_peft_config(dir + "/peft").r, 4);

  // Merged: the base (the seed's random init) + 2 * B A, rounded to bf16.
  const RunConfig rc = load_run_config(cfg);
  auto be = make_cpu_backend();
  LlamaModel base(*be, model_options_from(rc, resolve_arch(rc), 1));
  base.init_base_random(static_cast<uint64_t>(rc.training.seed));
  SafetensorsFile merged(dir + "/merged/model.safetensors");
  EXPECT_FALSE(merged.contains("lm_head.weight"));  // tied
  EXPECT_EQ(merged.names().size(), base.base().specs.size());
  EXPECT_EQ(read_hf_config(dir + "/merged").arch.hidden_size, 32);
  int merged_modules = 0;
  for (const ParamSpec& p : base.base().specs) {
    ASSERT_EQ(merged.info(p.name).dtype, StDType::bf16) << p.name;
    std::vector<float> expect = base.get_tensor(p.name);
    const std::string prefix = p.name.substr(0, p.name.size() - 7);
    if (base.lora().find(prefix + ".lora_A.weight")) {
      ++merged_modules;
      const auto a = weight(prefix + ".lora_A.weight"), b = weight(prefix + ".lora_B.weight");
      const int64_t r4 = 4, in = p.shape[1];
      for (int64_t o = 0; o < p.shape[0]; ++o)
        for (int64_t i = 0; i < in; ++i) {
          double d = 0;
          for (int64_t k = 0; k < r4; ++k) d += static_cast<double>(b[o * r4 + k]) * a[k * in + i];
          expect[o * in + i] = static_cast<float>(expect[o * in + i] + 2.0 * d);
        }
    }
    const std::vector<uint16_t> got = merged.read_bf16(p.name);
    ASSERT_EQ(got.size(), expect.size());
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], f32_to_bf16(expect[i])) << p.name << " [" << i << "]";
  }
  EXPECT_GT(merged_modules, 0);
}

TEST(Train, UnwritableOutputDirIsReportedFirst) {
  const std::string dir = temp_dir("unwritable");
  const std::string cfg = write_config(dir);
  std::ofstream(dir + "/file") << "not a directory";
  RunResult r = run(train(cfg, dir + "/file/out"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("training.output_dir = " + dir + "/file/out cannot be written"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("data:"), std::string::npos) << r.output;  // nothing prepared or trained
  r = run(train(cfg, dir + "/out", "--resume " + dir + "/missing.h5"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("missing.h5: no such checkpoint"), std::string::npos) << r.output;
}

}  // namespace

// HDF5 training checkpoints (layout in include/ranktune/checkpoint.h): atomic writes, a checksum
// per dataset, and the search for the newest valid checkpoint on resume.
#include "ranktune/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <hdf5.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <utility>

#include "ranktune/error.h"
#include "h5_util.h"

namespace ranktune {
namespace fs = std::filesystem;

namespace {

using h5::H5Id;
using h5::H5QuietErrors;

uint64_t fnv1a64(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  RT_REQUIRE(fd >= 0, path + ": cannot open it to flush it to disk: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  RT_REQUIRE(rc == 0 || directory, path + ": fsync failed (is the disk full?): " + std::strerror(errno));
}

// Datasets with their checksum attribute. Contiguous storage: the bytes on disk are the bytes
// hashed, and h5dump shows them as they are.
class Writer {
 public:
  explicit Writer(const std::string& tmp_path) : path_(tmp_path) {
    H5Id fapl = h5::file_access_plist(/*lock=*/false);
    file_ = H5Id(H5Fcreate(tmp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    RT_REQUIRE(file_.valid(), tmp_path + ": cannot create the checkpoint (check that the directory is writable)");
  }
  void group(const std::string& name) {
    H5Id g(H5Gcreate2(file_.get(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    check(g.valid(), name);
  }
  void array(const std::string& name, hid_t file_type, hid_t mem_type, const void* data, size_t elem_size,
             const std::vector<int64_t>& shape) {
    std::vector<hsize_t> dims(shape.begin(), shape.end());
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    H5Id space(dims.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
               H5Sclose);
    check(space.valid(), name);
    H5Id dset(H5Dcreate2(file_.get(), name.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
              H5Dclose);
    check(dset.valid(), name);
    if (n > 0) check(H5Dwrite(dset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0, name);
    checksum_attr(dset.get(), fnv1a64(data, n * elem_size), name);
  }
  void f32(const std::string& name, const std::vector<int64_t>& shape, const float* data) {
    array(name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, data, 4, shape);
  }
  void u8(const std::string& name, const std::vector<uint8_t>& v) {
    array(name, H5T_STD_U8LE, H5T_NATIVE_UINT8, v.data(), 1, {static_cast<int64_t>(v.size())});
  }
  void i64(const std::string& name, int64_t x) { array(name, H5T_STD_I64LE, H5T_NATIVE_INT64, &x, 8, {}); }
  void u64(const std::string& name, uint64_t x) { array(name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &x, 8, {}); }
  void f64(const std::string& name, double x) { array(name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &x, 8, {}); }
  void str(const std::string& name, const std::string& value) {
    H5Id type = string_type(value.size());
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id dset(H5Dcreate2(file_.get(), name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
              H5Dclose);
    check(dset.valid(), name);
    std::string padded = value.empty() ? std::string(1, '\0') : value;
    check(H5Dwrite(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, padded.data()) >= 0, name);
    checksum_attr(dset.get(), fnv1a64(padded.data(), padded.size()), name);
  }
  void attr_i64(const std::string& obj, const char* name, int64_t x) {
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id a(H5Acreate_by_name(file_.get(), obj.c_str(), name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT,
                             H5P_DEFAULT),
           H5Aclose);
    check(a.valid() && H5Awrite(a.get(), H5T_NATIVE_INT64, &x) >= 0, name);
  }
  void attr_str(const std::string& obj, const char* name, const std::string& value) {
    H5Id type = string_type(value.size());
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id a(H5Acreate_by_name(file_.get(), obj.c_str(), name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT,
                             H5P_DEFAULT),
           H5Aclose);
    std::string padded = value.empty() ? std::string(1, '\0') : value;
    check(a.valid() && H5Awrite(a.get(), type.get(), padded.data()) >= 0, name);
  }
  void close() {
    check(H5Fflush(file_.get(), H5F_SCOPE_GLOBAL) >= 0, "the file (flush)");
    check(file_.close() >= 0, "the file (close)");
  }

 private:
  H5Id string_type(size_t n) {
    H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
    check(type.valid() && H5Tset_size(type.get(), std::max<size_t>(n, 1)) >= 0 &&
              H5Tset_strpad(type.get(), H5T_STR_NULLPAD) >= 0 && H5Tset_cset(type.get(), H5T_CSET_UTF8) >= 0,
          "a string type");
    return type;
  }
  void checksum_attr(hid_t obj, uint64_t sum, const std::string& name) {
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id a(H5Acreate2(obj, "fnv1a64", H5T_STD_U64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    check(a.valid() && H5Awrite(a.get(), H5T_NATIVE_UINT64, &sum) >= 0, name + " (checksum)");
  }
  void check(bool ok, const std::string& what) {
    RT_REQUIRE(ok, path_ + ": writing " + what + " failed (is the disk full?)");
  }
  std::string path_;
  H5Id file_;
};

class Reader {
 public:
  explicit Reader(const std::string& path) : path_(path) {
    RT_REQUIRE(fs::exists(path), path + ": no such checkpoint");
    H5Id fapl = h5::file_access_plist(/*lock=*/false);
    file_ = H5Id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose);
    RT_REQUIRE(file_.valid(), path + ": cannot open it as an HDF5 file (truncated or damaged)");
  }
  bool exists(const std::string& name) const {
    return H5Lexists(file_.get(), name.c_str(), H5P_DEFAULT) > 0 &&
           H5Oexists_by_name(file_.get(), name.c_str(), H5P_DEFAULT) > 0;
  }
  int64_t attr_i64(const std::string& obj, const char* name) const {
    H5Id a(H5Aopen_by_name(file_.get(), obj.c_str(), name, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    int64_t x = 0;
    fail_unless(a.valid() && H5Aread(a.get(), H5T_NATIVE_INT64, &x) >= 0, obj + " attribute " + name, "missing or unreadable");
    return x;
  }
  std::string attr_str(const std::string& obj, const char* name) const {
    H5Id a(H5Aopen_by_name(file_.get(), obj.c_str(), name, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    fail_unless(a.valid(), obj + " attribute " + name, "missing");
    H5Id type(H5Aget_type(a.get()), H5Tclose);
    fail_unless(type.valid() && H5Tget_class(type.get()) == H5T_STRING && !H5Tis_variable_str(type.get()),
                obj + " attribute " + name, "not a fixed-length string");
    std::string s(H5Tget_size(type.get()), '\0');
    fail_unless(H5Aread(a.get(), type.get(), s.data()) >= 0, obj + " attribute " + name, "unreadable");
    return s.substr(0, s.find('\0'));
  }
  // The dataset's shape and its bytes converted to mem_type, verified against its checksum.
  template <class T>
  std::vector<T> array(const std::string& name, hid_t mem_type, std::vector<int64_t>* shape = nullptr) const {
    H5Id dset = open(name);
    H5Id space(H5Dget_space(dset.get()), H5Sclose);
    const int nd = H5Sget_simple_extent_ndims(space.get());
    fail_unless(nd >= 0 && nd <= 4, name, "has a bad shape");
    std::vector<hsize_t> dims(static_cast<size_t>(nd));
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    size_t n = 1;
    for (hsize_t d : dims) n *= static_cast<size_t>(d);
    std::vector<T> out(n);
    if (n > 0) fail_unless(H5Dread(dset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) >= 0, name, "unreadable");
    verify(dset.get(), name, out.data(), n * sizeof(T));
    if (shape) shape->assign(dims.begin(), dims.end());
    return out;
  }
  template <class T>
  T scalar(const std::string& name, hid_t mem_type) const {
    auto v = array<T>(name, mem_type);
    fail_unless(v.size() == 1, name, "is not a scalar");
    return v[0];
  }
  std::string str(const std::string& name) const {
    H5Id dset = open(name);
    H5Id type(H5Dget_type(dset.get()), H5Tclose);
    fail_unless(type.valid() && H5Tget_class(type.get()) == H5T_STRING && !H5Tis_variable_str(type.get()), name,
                "is not a fixed-length string");
    std::string s(H5Tget_size(type.get()), '\0');
    fail_unless(H5Dread(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, s.data()) >= 0, name, "unreadable");
    verify(dset.get(), name, s.data(), s.size());
    return s.substr(0, s.find('\0'));
  }
  std::vector<std::string> members(const std::string& group) const {
    H5Id g(H5Gopen2(file_.get(), group.c_str(), H5P_DEFAULT), H5Gclose);
    fail_unless(g.valid(), group, "missing");
    H5G_info_t info;
    fail_unless(H5Gget_info(g.get(), &info) >= 0, group, "unreadable");
    std::vector<std::string> names;
    for (hsize_t i = 0; i < info.nlinks; ++i) {
      const ssize_t len = H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
      fail_unless(len > 0, group, "unreadable");
      std::string name(static_cast<size_t>(len) + 1, '\0');
      H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT);
      name.resize(static_cast<size_t>(len));
      names.push_back(name);
    }
    return names;
  }
  void fail_unless(bool ok, const std::string& what, const std::string& why) const {
    RT_REQUIRE(ok, path_ + ": " + what + " is " + why + " (truncated or damaged checkpoint)");
  }

 private:
  H5Id open(const std::string& name) const {
    fail_unless(H5Lexists(file_.get(), name.c_str(), H5P_DEFAULT) > 0, "dataset " + name, "missing");
    H5Id dset(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
    fail_unless(dset.valid(), "dataset " + name, "unreadable");
    return dset;
  }
  void verify(hid_t dset, const std::string& name, const void* data, size_t nbytes) const {
    H5Id a(H5Aopen(dset, "fnv1a64", H5P_DEFAULT), H5Aclose);
    uint64_t stored = 0;
    fail_unless(a.valid() && H5Aread(a.get(), H5T_NATIVE_UINT64, &stored) >= 0, "the checksum of dataset " + name,
                "missing");
    RT_REQUIRE(stored == fnv1a64(data, nbytes),
               path_ + ": dataset " + name + " does not match its checksum (the file is corrupt)");
  }
  std::string path_;
  H5Id file_;
};

template <class T>
void require_finite(const std::vector<T>& v, const std::string& what, const std::string& path) {
  for (size_t i = 0; i < v.size(); ++i)
    RT_REQUIRE(std::isfinite(v[i]), path + ": not saved: " + what + " holds a non-finite value at index " +
                                        std::to_string(i) + " (the run has diverged: lower training.learning_rate)");
}

std::vector<float> master_values(LlamaModel& model, const Optimizer& optimizer, const ParamGroup& g,
                                 const ParamSpec& p) {
  std::vector<float> held;
  if (optimizer.master_values(p, &held)) return held;  // ZeRO-1: gathered from the shards
  if (g.master.empty() || g.master.dtype != DType::f32) return model.get_tensor(p.name);
  std::vector<float> out(static_cast<size_t>(p.numel));
  model.backend().download(out.data(), g.master_view(p));
  return out;
}

}  // namespace

int64_t fault_value(const std::string& name) {
  const char* env = std::getenv("RANKTUNE_FAULT");
  if (!env) return -1;
  const std::string spec = env;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t end = std::min(spec.find(',', start), spec.size());
    const std::string item = spec.substr(start, end - start);
    const size_t eq = item.find('=');
    if (item.substr(0, eq) == name) return eq == std::string::npos ? 0 : std::atoll(item.c_str() + eq + 1);
    start = end + 1;
  }
  return -1;
}

std::string checkpoint_file_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld.h5", static_cast<long long>(step));
  return buf;
}

void save_checkpoint(const std::string& path, LlamaModel& model, const Optimizer& optimizer,
                     const TrainProgress& progress, const std::string& config_yaml,
                     const std::string& tokenizer_hash) {
  H5QuietErrors quiet;
  ParamGroup& params = model.trainable();
  // Everything comes to the host and is checked before the first byte is written.
  std::vector<std::vector<float>> weights;
  for (const ParamSpec& p : params.specs) {
    weights.push_back(master_values(model, optimizer, params, p));
    require_finite(weights.back(), "weight " + p.name, path);
  }
  const OptimizerState opt = optimizer.state();
  require_finite(opt.m, "optimizer state m", path);
  require_finite(opt.v, "optimizer state v", path);
  require_finite(opt.m_absmax, "optimizer state m_absmax", path);
  require_finite(opt.v_absmax, "optimizer state v_absmax", path);

  const std::string tmp = path + ".tmp";
  fs::remove(tmp);
  {
    Writer w(tmp);
    w.attr_i64("/", "format_version", kCheckpointFormatVersion);
    w.attr_str("/", "ranktune_version", RANKTUNE_VERSION);
    w.group("/meta");
    w.str("/meta/config_yaml", config_yaml);
    w.str("/meta/tokenizer_hash", tokenizer_hash);
    w.str("/meta/ranktune_version", RANKTUNE_VERSION);
    w.group("/state");
    const TrainProgress& s = progress;
    w.i64("/state/step", s.step);
    w.i64("/state/optimizer_steps", s.optimizer_steps);
    w.i64("/state/total_steps", s.total_steps);
    w.i64("/state/warmup_steps", s.warmup_steps);
    w.f64("/state/epoch", s.epoch);
    w.i64("/state/global_batch", s.global_batch);
    w.i64("/state/world_size", s.world_size);
    w.i64("/state/bad_steps_in_row", s.bad_steps_in_row);
    w.i64("/state/tokens_total", s.tokens_total);
    w.f64("/state/loss_since_log", s.loss_since_log);
    w.i64("/state/steps_since_log", s.steps_since_log);
    w.i64("/state/skipped_since_log", s.skipped_since_log);
    w.i64("/state/loader_epoch", s.loader.epoch);
    w.i64("/state/loader_row_offset", s.loader.row_offset);
    w.u64("/state/loader_seed", s.loader.seed);
    w.i64("/state/loader_n_rows", s.loader.n_rows);
    w.group("/weights");
    for (size_t i = 0; i < params.specs.size(); ++i)
      w.f32("/weights/" + params.specs[i].name, params.specs[i].shape, weights[i].data());
    if (fault_value("kill_during_save") == s.step) {
      std::fprintf(stderr, "RANKTUNE_FAULT: killing the process halfway through writing %s\n", tmp.c_str());
      std::fflush(stderr);
      std::raise(SIGKILL);
    }
    w.group("/optimizer");
    w.attr_str("/optimizer", "kind", opt.kind);
    w.i64("/optimizer/step", opt.step);
    if (opt.kind == "adamw_8bit") {
      w.u8("/optimizer/m_codes", opt.m_codes);
      w.u8("/optimizer/v_codes", opt.v_codes);
      w.f32("/optimizer/m_absmax", {static_cast<int64_t>(opt.m_absmax.size())}, opt.m_absmax.data());
      w.f32("/optimizer/v_absmax", {static_cast<int64_t>(opt.v_absmax.size())}, opt.v_absmax.data());
    } else {
      w.f32("/optimizer/m", {static_cast<int64_t>(opt.m.size())}, opt.m.data());
      w.f32("/optimizer/v", {static_cast<int64_t>(opt.v.size())}, opt.v.data());
    }
    w.close();
  }
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  RT_REQUIRE(!ec, path + ": cannot rename " + tmp + " to it: " + ec.message());
  fsync_path(fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string(), true);
}

CheckpointData read_checkpoint(const std::string& path) {
  H5QuietErrors quiet;
  Reader r(path);
  const int64_t version = r.attr_i64("/", "format_version");
  RT_REQUIRE(version == kCheckpointFormatVersion,
             path + ": checkpoint format version " + std::to_string(version) + ", this ranktune reads version " +
                 std::to_string(kCheckpointFormatVersion) + ": resume with the ranktune that wrote it (" +
                 r.attr_str("/", "ranktune_version") + ")");
  CheckpointData c;
  c.path = path;
  c.ranktune_version = r.str("/meta/ranktune_version");
  c.config_yaml = r.str("/meta/config_yaml");
  c.tokenizer_hash = r.str("/meta/tokenizer_hash");
  TrainProgress& s = c.progress;
  const auto i64 = [&](const char* name) { return r.scalar<int64_t>(std::string("/state/") + name, H5T_NATIVE_INT64); };
  const auto f64 = [&](const char* name) { return r.scalar<double>(std::string("/state/") + name, H5T_NATIVE_DOUBLE); };
  s.step = i64("step");
  s.optimizer_steps = i64("optimizer_steps");
  s.total_steps = i64("total_steps");
  s.warmup_steps = i64("warmup_steps");
  s.epoch = f64("epoch");
  s.global_batch = i64("global_batch");
  s.world_size = i64("world_size");
  s.bad_steps_in_row = i64("bad_steps_in_row");
  s.tokens_total = i64("tokens_total");
  s.loss_since_log = f64("loss_since_log");
  s.steps_since_log = i64("steps_since_log");
  s.skipped_since_log = i64("skipped_since_log");
  s.loader.epoch = i64("loader_epoch");
  s.loader.row_offset = i64("loader_row_offset");
  s.loader.seed = r.scalar<uint64_t>("/state/loader_seed", H5T_NATIVE_UINT64);
  s.loader.n_rows = i64("loader_n_rows");
  for (const std::string& name : r.members("/weights")) {
    CheckpointTensor t;
    t.name = name;
    t.values = r.array<float>("/weights/" + name, H5T_NATIVE_FLOAT, &t.shape);
    c.weights.push_back(std::move(t));
  }
  OptimizerState& o = c.optimizer;
  o.kind = r.attr_str("/optimizer", "kind");
  o.step = r.scalar<int64_t>("/optimizer/step", H5T_NATIVE_INT64);
  if (o.kind == "adamw_8bit") {
    o.m_codes = r.array<uint8_t>("/optimizer/m_codes", H5T_NATIVE_UINT8);
    o.v_codes = r.array<uint8_t>("/optimizer/v_codes", H5T_NATIVE_UINT8);
    o.m_absmax = r.array<float>("/optimizer/m_absmax", H5T_NATIVE_FLOAT);
    o.v_absmax = r.array<float>("/optimizer/v_absmax", H5T_NATIVE_FLOAT);
  } else {
    o.m = r.array<float>("/optimizer/m", H5T_NATIVE_FLOAT);
    o.v = r.array<float>("/optimizer/v", H5T_NATIVE_FLOAT);
  }
  return c;
}

void restore_weights(LlamaModel& model, const CheckpointData& ckpt) {
  const ParamGroup& params = model.trainable();
  for (const ParamSpec& p : params.specs) {
    auto it = std::find_if(ckpt.weights.begin(), ckpt.weights.end(), [&](const CheckpointTensor& t) { return t.name == p.name; });
    RT_REQUIRE(it != ckpt.weights.end(), ckpt.path + ": has no weight " + p.name +
                                             ": it was saved by a run with other LoRA settings or another training mode");
    RT_REQUIRE(it->shape == p.shape, ckpt.path + ": weight " + p.name + " has another shape than this model's: " +
                                         "resume with the same model and LoRA settings");
    model.set_tensor(p.name, it->values);
  }
  RT_REQUIRE(ckpt.weights.size() == params.specs.size(),
             ckpt.path + ": holds " + std::to_string(ckpt.weights.size()) + " trainable tensors, this model has " +
                 std::to_string(params.specs.size()) + ": resume with the same model and LoRA settings");
}

std::vector<std::string> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return {};
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() != checkpoint_file_name(0).size() || name.rfind("step-", 0) != 0 || name.substr(name.size() - 3) != ".h5")
      continue;
    const std::string digits = name.substr(5, name.size() - 8);
    if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    found.push_back({std::stoll(digits), e.path().string()});
  }
  std::sort(found.rbegin(), found.rend());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

std::vector<std::string> prune_checkpoints(const std::string& dir, int64_t keep) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step-", 0) == 0 && name.size() > 7 && name.substr(name.size() - 7) == ".h5.tmp") {
      fs::remove(e.path(), ec);
      removed.push_back(e.path().string());
    }
  }
  if (keep <= 0) return removed;
  const auto all = list_checkpoints(dir);
  for (size_t i = static_cast<size_t>(keep); i < all.size(); ++i) {
    fs::remove(all[i], ec);
    removed.push_back(all[i]);
  }
  return removed;
}

std::optional<CheckpointData> find_resume_checkpoint(const std::string& spec, const std::string& dir,
                                                     std::vector<std::string>* skipped) {
  if (spec != "latest" && !fs::is_directory(spec)) return read_checkpoint(spec);
  const std::string where = spec == "latest" ? dir : spec;
  const auto all = list_checkpoints(where);
  if (all.empty()) return std::nullopt;
  for (const std::string& path : all) {
    try {
      return read_checkpoint(path);
    } catch (const UserError& e) {
      if (skipped) skipped->push_back(std::string("skipped ") + path + ": " + e.what());
    }
  }
  throw UserError("--resume latest: none of the " + std::to_string(all.size()) + " checkpoints in " + where +
                  " reads back whole (each is listed above): start a new run or resume from a copy");
}

}  // namespace ranktune

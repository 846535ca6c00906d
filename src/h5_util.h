// Small RAII helpers over the HDF5 C API, shared by the dataset and checkpoint files.
#pragma once
#include <hdf5.h>

#include <utility>

namespace ranktune::h5 {

// An HDF5 id that closes itself.
class H5Id {
 public:
  H5Id() = default;
  H5Id(hid_t id, herr_t (*close_fn)(hid_t)) : id_(id), close_fn_(close_fn) {}
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  H5Id(H5Id&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)), close_fn_(other.close_fn_) {}
  H5Id& operator=(H5Id&& other) noexcept {
    if (this != &other) {
      close();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
      close_fn_ = other.close_fn_;
    }
    return *this;
  }
  ~H5Id() { close(); }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  herr_t close() {
    herr_t status = 0;
    if (id_ >= 0) status = close_fn_(id_);
    id_ = H5I_INVALID_HID;
    return status;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_fn_)(hid_t) = nullptr;
};

// HDF5 prints its error stack to stderr by default; ours become UserErrors instead, so the stack
// is silenced while we work and restored after.
class H5QuietErrors {
 public:
  H5QuietErrors() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~H5QuietErrors() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  H5QuietErrors(const H5QuietErrors&) = delete;
  H5QuietErrors& operator=(const H5QuietErrors&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// File access properties: with lock, HDF5 locks the file where the file system supports it and
// carries on where it does not (it otherwise refuses to open files on e.g. some Lustre/NFS mounts);
// without, no locking at all (checkpoints: written under a temporary name and renamed, read by one
// process).
inline H5Id file_access_plist(bool lock) {
  H5Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (fapl.valid()) H5Pset_file_locking(fapl.get(), lock, true);
  return fapl;
}

}  // namespace ranktune::h5

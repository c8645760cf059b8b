// File I/O of the host-emulator runners (run_*.cpp): each is run as `run_X DIR`, reads
// DIR/params.txt ("key value" lines) and raw allocations DIR/<name>.bin, writes its outputs back
// into DIR and exits 0 = ran clean, 2 = bad usage, 3 = a checked fault (emu::fatal, message on
// stderr), 4 = shared-memory races (listed on stderr).
#pragma once

#include "host_primitives.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <string>

namespace runner {

// One allocation's bytes in 256-byte aligned storage, as torch's allocator gives; `bytes` (what the
// emulator registers) is the file's exact size.
struct Blob {
  std::unique_ptr<unsigned char, void (*)(void*)> mem{nullptr, std::free};
  size_t bytes = 0;
  unsigned char* data() { return mem.get(); }
};

inline Blob read_blob(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) emu::fatal("cannot read " + path);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Blob b;
  b.bytes = s.size();
  b.mem.reset(static_cast<unsigned char*>(std::aligned_alloc(256, ((s.size() + 255) / 256 + 1) * 256)));
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

inline void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), std::streamsize(bytes));
}

// The run directory and its params.txt.
struct RunDir {
  std::string dir;
  std::map<std::string, std::string> kv;

  const std::string& need(const std::string& k) const {
    auto it = kv.find(k);
    if (it == kv.end()) emu::fatal("params.txt lacks " + k);
    return it->second;
  }
  int64_t I(const std::string& k) const { return int64_t(std::stoll(need(k))); }
  bool has(const std::string& k) const { return kv.count(k) != 0; }
  std::string path(const std::string& name) const { return dir + "/" + name; }
  Blob read(const std::string& name) const { return read_blob(path(name)); }
  void write(const std::string& name, const void* data, size_t bytes) const { write_file(path(name), data, bytes); }
};

// argv's DIR with its params.txt read; exits with status 2 and a usage line on a bad command line.
inline RunDir open_run_dir(int argc, char** argv, const char* program) {
  if (argc != 2) {
    std::cerr << "usage: " << program << " DIR\n";
    std::exit(2);
  }
  RunDir run;
  run.dir = argv[1];
  std::ifstream f(run.path("params.txt"));
  std::string k, v;
  while (f >> k >> v) run.kv[k] = v;
  return run;
}

// The runner's exit status once its outputs are written: 4 with the races on stderr, else 0.
inline int exit_status() {
  if (!emu::machine().races.empty()) {
    for (auto& r : emu::machine().races) std::cerr << "RACE: " << r << "\n";
    return 4;
  }
  return 0;
}

}  // namespace runner

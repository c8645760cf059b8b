// Runs csrc/merge.cuh's in-place merge kernel on the host emulator (host_primitives.h,
// host_stream_primitives.h), with the launcher's own parameter logic (make_merge_params).
//
//   run_merge DIR
//
// DIR/params.txt holds "key value" lines (see `need` below); DIR/{w,a,b}.bin and, when present,
// DIR/{codes,esc_index,esc_value,status}.bin hold each allocation's raw bytes (the tensor starts
// *_off elements in). Writes every writable allocation back as DIR/<name>_out.bin, per-byte store
// and read counts of W and the codes (DIR/{w,codes}_{stores,reads}.bin) and DIR/plan.txt.
// Exit status 0 = ran clean; 3 = a checked fault (message on stderr); 4 = shared-memory races.
#include "host_stream_primitives.h"
#include "merge.cuh"

#include <fstream>
#include <iostream>
#include <map>
#include <memory>

using namespace lora_kernels;

namespace {

struct Blob {
  std::unique_ptr<unsigned char, void (*)(void*)> mem{nullptr, std::free};
  size_t bytes = 0;
  unsigned char* data() { return mem.get(); }
};

Blob read_blob(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) emu::fatal("cannot read " + path);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Blob b;
  b.bytes = s.size();
  // 256-byte aligned storage, as torch's allocator gives; the registered size is the exact size.
  b.mem.reset(static_cast<unsigned char*>(std::aligned_alloc(256, ((s.size() + 255) / 256 + 1) * 256)));
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), std::streamsize(bytes));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: run_merge DIR\n";
    return 2;
  }
  const std::string dir = argv[1];
  std::map<std::string, std::string> kv;
  {
    std::ifstream f(dir + "/params.txt");
    std::string k, v;
    while (f >> k >> v) kv[k] = v;
  }
  auto need = [&](const char* k) -> const std::string& {
    auto it = kv.find(k);
    if (it == kv.end()) emu::fatal(std::string("params.txt lacks ") + k);
    return it->second;
  };
  auto I = [&](const char* k) { return int64_t(std::stoll(need(k))); };

  const int wtype = int(I("wtype"));  // 0 fp16, 1 bf16, 2 fp32
  const bool adapter_fp32 = I("adapter_fp32") != 0;
  const bool has_codes = I("has_codes") != 0, has_escapes = I("has_escapes") != 0, has_status = I("has_status") != 0;
  const int w_bytes = wtype == 2 ? 4 : 2, a_bytes = adapter_fp32 ? 4 : 2;

  Blob w = read_blob(dir + "/w.bin"), a = read_blob(dir + "/a.bin"), b = read_blob(dir + "/b.bin");
  Blob codes, esc_index, esc_value, status;
  std::vector<uint8_t> w_stores(w.bytes, 0), w_reads(w.bytes, 0), c_stores, c_reads, ei_stores, ev_stores, st_stores;
  emu::register_allocation("weight", w.data(), w.bytes, &w_stores);
  emu::count_reads(w.data(), w.bytes, &w_reads);
  emu::register_allocation("lora_a", a.data(), a.bytes, nullptr);
  emu::register_allocation("lora_b", b.data(), b.bytes, nullptr);
  if (has_codes) {
    codes = read_blob(dir + "/codes.bin");
    c_stores.assign(codes.bytes, 0);
    c_reads.assign(codes.bytes, 0);
    emu::register_allocation("codes", codes.data(), codes.bytes, &c_stores);
    emu::count_reads(codes.data(), codes.bytes, &c_reads);
  }
  if (has_escapes) {
    esc_index = read_blob(dir + "/esc_index.bin");
    esc_value = read_blob(dir + "/esc_value.bin");
    ei_stores.assign(esc_index.bytes, 0);
    ev_stores.assign(esc_value.bytes, 0);
    emu::register_allocation("escape_index", esc_index.data(), esc_index.bytes, &ei_stores);
    emu::register_allocation("escape_value", esc_value.data(), esc_value.bytes, &ev_stores);
  }
  if (has_status) {
    status = read_blob(dir + "/status.bin");
    st_stores.assign(status.bytes, 0);
    emu::register_allocation("status", status.data(), status.bytes, &st_stores);
  }

  MergeArgs x{};
  x.w = w.data() + I("w_off") * w_bytes;
  x.rows = I("rows"); x.cols = I("cols"); x.s0 = I("s0"); x.s1 = I("s1");
  x.fan_in_fan_out = I("fan_in_fan_out") != 0;
  x.w_bytes = w_bytes;
  x.a = a.data() + I("a_off") * a_bytes; x.a_s0 = I("a_s0"); x.a_s1 = I("a_s1");
  x.b = b.data() + I("b_off") * a_bytes; x.b_s0 = I("b_s0"); x.b_s1 = I("b_s1");
  x.rank = int(I("rank"));
  x.adapter_fp32 = adapter_fp32;
  if (has_codes) {
    x.codes = reinterpret_cast<int8_t*>(codes.data()) + I("c_off");
    x.c_s0 = I("c_s0"); x.c_s1 = I("c_s1");
  }
  if (has_escapes) {
    x.esc_index = reinterpret_cast<int64_t*>(esc_index.data());
    x.esc_value = esc_value.data();
    x.esc_capacity = int64_t(esc_index.bytes / 8);
  }
  x.status = has_status ? reinterpret_cast<int32_t*>(status.data()) : nullptr;
  x.scale = std::stof(need("scale"));
  x.mode = int(I("mode"));
  x.subtract = I("subtract") != 0;
  x.gated = I("gated") != 0;
  const MergeParams p = make_merge_params(x);
  const int64_t grid = merge_grid(p.P, p.Q, int(I("num_sms")), int(I("ctas_per_sm")));
  const size_t smem = merge_smem_bytes(p.pitch, adapter_fp32);
  emu::machine().rng.seed(uint64_t(I("seed")));
  {
    std::ofstream f(dir + "/plan.txt");
    f << "P " << p.P << "\nQ " << p.Q << "\ntransposed " << int(merge_layout_of(x).transposed)
      << "\ngrid " << grid << "\ntiles " << merge_num_tiles(p.P, p.Q) << "\nsmem_bytes " << smem
      << "\nrank_chunk " << p.rank_chunk << "\npitch " << p.pitch << "\nw_vec " << p.w_vec << "\nc_vec " << p.c_vec
      << "\nldw_p " << p.ldw_p << "\nldw_q " << p.ldw_q << "\n";
  }

  auto run_all = [&](auto wt, auto f32) {
    using Wt = decltype(wt);
    constexpr bool kF32 = decltype(f32)::value;
    for (int64_t pid = 0; pid < grid; ++pid)
      emu::run_cta(kMergeThreads, smem, [&](int tid) {
        merge_cta<Wt, kF32>(p, emu::machine().smem.data(), int(pid), int(grid), tid);
      });
  };
  using T = std::true_type;
  using F = std::false_type;
  if (wtype == 2) {
    if (!adapter_fp32) emu::fatal("an fp32 weight needs fp32 adapters");
    run_all(MergeFp32{}, T{});
  } else if (wtype == 1) {
    adapter_fp32 ? run_all(MergeBf16{}, T{}) : run_all(MergeBf16{}, F{});
  } else {
    adapter_fp32 ? run_all(MergeFp16{}, T{}) : run_all(MergeFp16{}, F{});
  }

  write_file(dir + "/w_out.bin", w.data(), w.bytes);
  write_file(dir + "/w_stores.bin", w_stores.data(), w_stores.size());
  write_file(dir + "/w_reads.bin", w_reads.data(), w_reads.size());
  if (has_codes) {
    write_file(dir + "/codes_out.bin", codes.data(), codes.bytes);
    write_file(dir + "/codes_stores.bin", c_stores.data(), c_stores.size());
    write_file(dir + "/codes_reads.bin", c_reads.data(), c_reads.size());
  }
  if (has_escapes) {
    write_file(dir + "/esc_index_out.bin", esc_index.data(), esc_index.bytes);
    write_file(dir + "/esc_value_out.bin", esc_value.data(), esc_value.bytes);
  }
  if (has_status) write_file(dir + "/status_out.bin", status.data(), status.bytes);
  if (!emu::machine().races.empty()) {
    for (auto& r : emu::machine().races) std::cerr << "RACE: " << r << "\n";
    return 4;
  }
  return 0;
}

// Runs csrc/lora_linear.cuh's fused forward on the host emulator (host_primitives.h).
//
//   run_lora_linear DIR
//
// DIR/params.txt holds "key value" lines (see `need` below); DIR/{x,w,a,b,bias}.bin hold the raw
// bytes of each input allocation (the tensor starts *_off elements in). Writes DIR/y.bin and
// DIR/t.bin (the output allocations after the run, prefilled by the caller's y_init.bin /
// t_init.bin), DIR/y_counts.bin and DIR/t_counts.bin (stores per byte) and DIR/plan.txt.
// Exit status 0 = ran clean; 3 = a checked fault (message on stderr); 4 = shared-memory races.
#include "host_primitives.h"
#include "lora_linear.cuh"

#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>

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
    std::cerr << "usage: run_lora_linear DIR\n";
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

  const bool bf16 = I("bf16") != 0, has_bias = I("has_bias") != 0;
  Blob x = read_blob(dir + "/x.bin"), w = read_blob(dir + "/w.bin"), a = read_blob(dir + "/a.bin");
  Blob b = read_blob(dir + "/b.bin"), y = read_blob(dir + "/y_init.bin"), t = read_blob(dir + "/t_init.bin");
  Blob bias;
  if (has_bias) bias = read_blob(dir + "/bias.bin");
  std::vector<uint8_t> y_counts(y.bytes, 0), t_counts(t.bytes, 0);
  emu::register_allocation("x", x.data(), x.bytes, nullptr);
  emu::register_allocation("weight", w.data(), w.bytes, nullptr);
  emu::register_allocation("lora_a", a.data(), a.bytes, nullptr);
  emu::register_allocation("lora_b", b.data(), b.bytes, nullptr);
  if (has_bias) emu::register_allocation("bias", bias.data(), bias.bytes, nullptr);
  emu::register_allocation("y", y.data(), y.bytes, &y_counts);
  emu::register_allocation("t", t.data(), t.bytes, &t_counts);

  LoraLinearParams p{};
  p.M = I("M"); p.N = I("N"); p.K = I("K");
  p.rank = int(I("rank")); p.a_rows = int(I("a_rows"));
  p.a_split = I("a_split") != 0; p.b_fp32 = I("b_fp32") != 0;
  p.bias_fp32 = I("bias_fp32") != 0; p.save_t = I("save_t") != 0;
  p.ldx = I("ldx"); p.ldw = I("ldw"); p.lda = I("lda");
  p.ldb_n = I("ldb_n"); p.ldb_r = I("ldb_r"); p.ldy = I("ldy"); p.ldt = I("ldt");
  p.scale = std::stof(need("scale"));
  const int b_elem = p.b_fp32 ? 4 : 2, bias_elem = p.bias_fp32 ? 4 : 2;
  p.x = reinterpret_cast<const uint16_t*>(x.data()) + I("x_off");
  p.w = reinterpret_cast<const uint16_t*>(w.data()) + I("w_off");
  p.a = reinterpret_cast<const uint16_t*>(a.data()) + I("a_off");
  p.b = b.data() + I("b_off") * b_elem;
  p.bias = has_bias ? bias.data() + I("bias_off") * bias_elem : nullptr;
  p.y = reinterpret_cast<uint16_t*>(y.data()) + I("y_off");
  p.t = reinterpret_cast<float*>(t.data()) + I("t_off");
  // The same conditions as the CUDA launcher (csrc/lora_linear_launch.cu).
  p.aligned16 = rows_16byte_aligned(p.x, p.ldx, p.M) && rows_16byte_aligned(p.w, p.ldw, p.N) &&
                rows_16byte_aligned(p.a, p.lda, p.a_rows);
  p.y_pairs = output_pairs_aligned(p.y, p.ldy, p.M);

  const LaunchPlan plan = plan_lora_linear(p.M, p.N, p.a_rows, int(I("num_sms")), int(I("tile_kind")),
                                           int(I("tiles_per_cta")));
  if (plan.error) emu::fatal(std::string("plan: ") + plan.error);
  p.tiles_per_cta = plan.tiles_per_cta;
  p.group_m = int(kv.count("group_m") ? I("group_m") : plan.group_m);
  emu::machine().rng.seed(uint64_t(I("seed")));
  {
    std::ofstream f(dir + "/plan.txt");
    f << "tile_kind " << plan.tile_kind << "\nrb " << plan.rb << "\ntiles_per_cta " << plan.tiles_per_cta
      << "\ngrid " << plan.grid << "\nthreads " << plan.threads << "\nsmem_bytes " << plan.smem_bytes
      << "\naligned16 " << p.aligned16 << "\ny_pairs " << p.y_pairs << "\n";
  }

  auto run_all = [&](auto ty) {
    using Ty = decltype(ty);
    dispatch_tile(plan.tile_kind, plan.rb, [&](auto cfg, auto rb) {
      using Cfg = decltype(cfg);
      constexpr int RB = decltype(rb)::value;
      for (int64_t pid = 0; pid < plan.grid; ++pid) {
        emu::run_cta(plan.threads, plan.smem_bytes, [&](int tid) {
          lora_linear_cta<Ty, Cfg, RB>(p, emu::machine().smem.data(), int(pid), tid);
        });
      }
    });
  };
  if (bf16) run_all(Bf16{});
  else run_all(Fp16{});

  write_file(dir + "/y.bin", y.data(), y.bytes);
  write_file(dir + "/t.bin", t.data(), t.bytes);
  write_file(dir + "/y_counts.bin", y_counts.data(), y_counts.size());
  write_file(dir + "/t_counts.bin", t_counts.data(), t_counts.size());
  if (!emu::machine().races.empty()) {
    for (auto& r : emu::machine().races) std::cerr << "RACE: " << r << "\n";
    return 4;
  }
  return 0;
}

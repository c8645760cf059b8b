// Runs csrc/multi_lora.cuh's segmented shrink or expand on the host emulator (host_primitives.h).
//
//   run_multi_lora DIR
//
// DIR/params.txt holds "key value" lines (see `I(...)` below); `mode` is "shrink" or "expand".
// Inputs are raw allocations DIR/<name>.bin (the tensor starts <name>_off elements in):
//   shrink: x, a, scales, ranks (if has_ranks), work, sorted; output t (prefilled by t_init.bin)
//   expand: y (prefilled by y_init.bin, updated in place), t, b, ranks, work, sorted
// Writes DIR/out.bin (the output allocation after the run) and DIR/out_counts.bin (stores per
// byte). Exit status 0 = ran clean; 3 = a checked fault (message on stderr); 4 = races.
#include "host_primitives.h"
#include "multi_lora.cuh"

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

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool rows_aligned16(const void* base, int64_t elem, std::initializer_list<int64_t> strides) {
  if (!aligned16(base)) return false;
  for (int64_t s : strides)
    if ((s * elem) % 16) return false;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: run_multi_lora DIR\n";
    return 2;
  }
  const std::string dir = argv[1];
  std::map<std::string, std::string> kv;
  {
    std::ifstream f(dir + "/params.txt");
    std::string k, v;
    while (f >> k >> v) kv[k] = v;
  }
  auto need = [&](const std::string& k) -> const std::string& {
    auto it = kv.find(k);
    if (it == kv.end()) emu::fatal("params.txt lacks " + k);
    return it->second;
  };
  auto I = [&](const std::string& k) { return int64_t(std::stoll(need(k))); };
  std::map<std::string, Blob> blobs;
  std::map<std::string, std::vector<uint8_t>> unreadable;  // DIR/<name>.noread: 1 per byte never to be read
  auto input = [&](const std::string& name, size_t elem) -> unsigned char* {
    blobs[name] = read_blob(dir + "/" + name + ".bin");
    std::ifstream mask(dir + "/" + name + ".noread", std::ios::binary);
    if (mask) {
      std::string m((std::istreambuf_iterator<char>(mask)), std::istreambuf_iterator<char>());
      if (m.size() != blobs[name].bytes) emu::fatal(name + ".noread does not match " + name + ".bin");
      unreadable[name].assign(m.begin(), m.end());
      emu::register_input(name, blobs[name].data(), blobs[name].bytes, &unreadable[name]);
    } else {
      emu::register_allocation(name, blobs[name].data(), blobs[name].bytes, nullptr);
    }
    return blobs[name].data() + I(name + "_off") * elem;
  };
  const bool bf16 = I("bf16") != 0, has_ranks = I("has_ranks") != 0, shrink = need("mode") == "shrink";
  emu::machine().rng.seed(uint64_t(I("seed")));
  const int32_t* ranks = has_ranks ? reinterpret_cast<const int32_t*>(input("ranks", 4)) : nullptr;
  const int32_t* work = reinterpret_cast<const int32_t*>(input("work", 4));
  const int32_t* sorted = reinterpret_cast<const int32_t*>(input("sorted", 4));
  Blob out = read_blob(dir + "/out_init.bin");
  std::vector<uint8_t> counts(out.bytes, 0);
  emu::register_allocation("out", out.data(), out.bytes, &counts);

  MultiLaunchPlan plan;
  std::function<void(int64_t, int, int)> cta;
  MultiShrinkParams sp{};
  MultiExpandParams ep{};
  if (shrink) {
    sp.a_fp32 = I("a_fp32") != 0;
    sp.x = reinterpret_cast<const uint16_t*>(input("x", 2));
    sp.a = input("a", sp.a_fp32 ? 4 : 2);
    sp.scales = reinterpret_cast<const float*>(input("scales", 4));
    sp.ranks = ranks;
    sp.work = work;
    sp.sorted_tokens = sorted;
    sp.t = reinterpret_cast<float*>(out.data()) + I("out_off");
    sp.M = I("M"); sp.K = I("K"); sp.num_items = I("num_items"); sp.R = int(I("R")); sp.item_m = int(I("item_m"));
    sp.ldx = I("ldx"); sp.lda_l = I("lda_l"); sp.lda_r = I("lda_r"); sp.ldt = I("ldt");
    // The same conditions as the CUDA launcher (csrc/multi_lora.cpp).
    sp.x_vec = rows_aligned16(sp.x, 2, {sp.M > 1 ? sp.ldx : 0});
    sp.a_vec = rows_aligned16(sp.a, sp.a_fp32 ? 4 : 2, {I("L") > 1 ? sp.lda_l : 0, sp.R > 1 ? sp.lda_r : 0});
    plan = plan_multi_shrink(sp.num_items, sp.R, sp.item_m, sp.a_fp32);
    cta = [&](int64_t item, int y, int tid) {
      if (sp.item_m == kShrinkSmall) {
        if (bf16) multi_shrink_cta<Bf16, ShrinkSmall>(sp, emu::machine().smem.data(), item, y, tid);
        else multi_shrink_cta<Fp16, ShrinkSmall>(sp, emu::machine().smem.data(), item, y, tid);
      } else {
        if (bf16) multi_shrink_cta<Bf16, ShrinkLarge>(sp, emu::machine().smem.data(), item, y, tid);
        else multi_shrink_cta<Fp16, ShrinkLarge>(sp, emu::machine().smem.data(), item, y, tid);
      }
    };
  } else {
    ep.b_fp32 = I("b_fp32") != 0;
    ep.y = reinterpret_cast<uint16_t*>(out.data()) + I("out_off");
    ep.t = reinterpret_cast<const float*>(input("t", 4));
    ep.b = input("b", ep.b_fp32 ? 4 : 2);
    ep.ranks = ranks;
    ep.work = work;
    ep.sorted_tokens = sorted;
    ep.M = I("M"); ep.N = I("N"); ep.num_items = I("num_items"); ep.R = int(I("R")); ep.item_m = int(I("item_m"));
    ep.ldy_m = I("ldy_m"); ep.ldy_n = I("ldy_n"); ep.ldt_m = I("ldt_m"); ep.ldt_r = I("ldt_r");
    ep.ldb_l = I("ldb_l"); ep.ldb_n = I("ldb_n"); ep.ldb_r = I("ldb_r");
    ep.b_vec = (ep.R <= 1 || ep.ldb_r == 1) &&
               rows_aligned16(ep.b, ep.b_fp32 ? 4 : 2, {I("L") > 1 ? ep.ldb_l : 0, ep.N > 1 ? ep.ldb_n : 0});
    plan = plan_multi_expand(ep.num_items, ep.N, ep.R, ep.item_m);
    cta = [&](int64_t item, int y, int tid) {
      if (bf16) multi_expand_cta<Bf16>(ep, emu::machine().smem.data(), item, y, tid);
      else multi_expand_cta<Fp16>(ep, emu::machine().smem.data(), item, y, tid);
    };
  }
  if (plan.error) emu::fatal(std::string("plan: ") + plan.error);
  {
    std::ofstream f(dir + "/plan.txt");
    f << "grid_x " << plan.grid_x << "\ngrid_y " << plan.grid_y << "\nthreads " << plan.threads << "\nsmem_bytes "
      << plan.smem_bytes << "\nvec " << (shrink ? int(sp.x_vec) * 2 + int(sp.a_vec) : int(ep.b_vec)) << "\n";
  }
  for (int64_t x = 0; x < plan.grid_x; ++x)
    for (int y = 0; y < int(plan.grid_y); ++y)
      emu::run_cta(plan.threads, plan.smem_bytes, [&](int tid) { cta(x, y, tid); });

  write_file(dir + "/out.bin", out.data(), out.bytes);
  write_file(dir + "/out_counts.bin", counts.data(), counts.size());
  if (!emu::machine().races.empty()) {
    for (auto& r : emu::machine().races) std::cerr << "RACE: " << r << "\n";
    return 4;
  }
  return 0;
}

// Runs csrc/multi_lora/multi_lora.cuh's segmented shrink or expand on the host emulator (host_primitives.h).
//
//   run_multi_lora DIR
//
// DIR/params.txt holds "key value" lines (see `in.I(...)` below); `mode` is "shrink", "expand" or
// "linear". Inputs are raw allocations DIR/<name>.bin (the tensor starts <name>_off elements in),
// DIR/<name>.noread optionally marks bytes that must never be read; the output allocation is
// prefilled by DIR/out_init.bin:
//   shrink: x, a0 .. a{S-1}, scales, ranks (if has_ranks), work, sorted; output t [S, M, R]
//   expand: t [S, M, R], b0 .. b{S-1}, ranks, work, sorted; output y (updated in place; slice s
//           at columns offset + N0 + .. + N{s-1})
//   linear: x, w, b, bias (if has_bias), t, ranks, sorted, sorted_adapter, slot_start; output y
// Writes DIR/out.bin (the output allocation after the run) and DIR/out_counts.bin (stores per
// byte). Exit status: runner_io.h.
#include "host_primitives.h"
#include "multi_lora/multi_lora.cuh"
#include "multi_lora/multi_lora_linear.cuh"
#include "runner_io.h"

using namespace lora_kernels;
using runner::Blob;

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool rows_aligned16(const void* base, int64_t elem, std::initializer_list<int64_t> strides) {
  if (!aligned16(base)) return false;
  for (int64_t s : strides)
    if ((s * elem) % 16) return false;
  return true;
}

// What a run reads: params.txt's values and the input allocations (registered with the emulator).
struct Inputs : runner::RunDir {
  std::map<std::string, Blob> blobs;
  std::map<std::string, std::vector<uint8_t>> unreadable;  // DIR/<name>.noread: 1 per byte never to be read

  // The allocation DIR/<name>.bin, registered; returns the tensor's start (<name>_off elements in).
  unsigned char* input(const std::string& name, size_t elem) {
    blobs[name] = read(name + ".bin");
    std::ifstream mask(path(name + ".noread"), std::ios::binary);
    if (mask) {
      std::string m((std::istreambuf_iterator<char>(mask)), std::istreambuf_iterator<char>());
      if (m.size() != blobs[name].bytes) emu::fatal(name + ".noread does not match " + name + ".bin");
      unreadable[name].assign(m.begin(), m.end());
      emu::register_input(name, blobs[name].data(), blobs[name].bytes, &unreadable[name]);
    } else {
      emu::register_allocation(name, blobs[name].data(), blobs[name].bytes, nullptr);
    }
    return blobs[name].data() + I(name + "_off") * elem;
  }
  const int32_t* ints(const std::string& name) { return reinterpret_cast<const int32_t*>(input(name, 4)); }
};

void run_shrink(Inputs& in, unsigned char* out, std::ofstream& plan_file) {
  MultiShrinkParams p{};
  const bool bf16 = in.I("bf16") != 0;
  p.a_fp32 = in.I("a_fp32") != 0;
  p.S = int(in.I("S"));
  if (p.S < 1 || p.S > kMultiMaxSlices) emu::fatal("S out of range");
  p.x = reinterpret_cast<const uint16_t*>(in.input("x", 2));
  for (int s = 0; s < p.S; ++s) p.a[s] = in.input("a" + std::to_string(s), p.a_fp32 ? 4 : 2);
  p.scales = reinterpret_cast<const float*>(in.input("scales", 4));
  p.ranks = in.I("has_ranks") ? in.ints("ranks") : nullptr;
  p.work = in.ints("work");
  p.sorted_tokens = in.ints("sorted");
  p.t = reinterpret_cast<float*>(out);
  p.M = in.I("M"); p.K = in.I("K"); p.num_items = in.I("num_items"); p.R = int(in.I("R"));
  p.L = int(in.I("L"));
  p.item_m = int(in.I("item_m"));
  p.row_split = in.has("row_split") ? int(in.I("row_split")) : 1;
  p.ldx = in.I("ldx"); p.lda_l = in.I("lda_l"); p.lda_r = in.I("lda_r");
  p.ldt_s = in.I("ldt_s"); p.ldt = in.I("ldt");
  // The same conditions as the CUDA launcher (csrc/multi_lora/multi_lora.cpp).
  p.x_vec = rows_aligned16(p.x, 2, {p.M > 1 ? p.ldx : 0});
  p.a_vec = true;
  for (int s = 0; s < p.S; ++s)
    p.a_vec = p.a_vec && rows_aligned16(p.a[s], p.a_fp32 ? 4 : 2, {p.L > 1 ? p.lda_l : 0, p.R > 1 ? p.lda_r : 0});
  const MultiLaunchPlan plan = plan_multi_shrink(p.num_items, p.R, p.item_m, p.a_fp32, p.S, p.row_split);
  if (plan.error) emu::fatal(std::string("plan: ") + plan.error);
  plan_file << "grid_x " << plan.grid_x << "\ngrid_y " << plan.grid_y << "\ngrid_z " << plan.grid_z
            << "\nsmem_bytes " << plan.smem_bytes << "\nx_vec " << p.x_vec << "\na_vec " << p.a_vec << "\n";
  for (int slice = 0; slice < int(plan.grid_z); ++slice)
    for (int64_t item = 0; item < plan.grid_x; ++item)
      for (int chunk = 0; chunk < int(plan.grid_y); ++chunk)
        emu::run_cta(plan.threads, plan.smem_bytes, [&](int tid) {
          unsigned char* smem = emu::machine().smem.data();
          if (p.item_m == kShrinkSmall) {
            if (bf16) multi_shrink_cta<Bf16, ShrinkSmall>(p, smem, item, chunk, slice, tid);
            else multi_shrink_cta<Fp16, ShrinkSmall>(p, smem, item, chunk, slice, tid);
          } else {
            if (bf16) multi_shrink_cta<Bf16, ShrinkLarge>(p, smem, item, chunk, slice, tid);
            else multi_shrink_cta<Fp16, ShrinkLarge>(p, smem, item, chunk, slice, tid);
          }
        });
}

void run_expand(Inputs& in, unsigned char* out, std::ofstream& plan_file) {
  MultiExpandParams p{};
  const bool bf16 = in.I("bf16") != 0;
  p.b_fp32 = in.I("b_fp32") != 0;
  p.S = int(in.I("S"));
  if (p.S < 1 || p.S > kMultiMaxSlices) emu::fatal("S out of range");
  p.y = reinterpret_cast<uint16_t*>(out);
  p.t = reinterpret_cast<const float*>(in.input("t", 4));
  p.ranks = in.I("has_ranks") ? in.ints("ranks") : nullptr;
  p.work = in.ints("work");
  p.sorted_tokens = in.ints("sorted");
  p.M = in.I("M"); p.num_items = in.I("num_items"); p.R = int(in.I("R"));
  p.L = int(in.I("L"));
  p.item_m = int(in.I("item_m"));
  p.ldy_m = in.I("ldy_m"); p.ldy_n = in.I("ldy_n");
  p.ldt_s = in.I("ldt_s"); p.ldt_m = in.I("ldt_m"); p.ldt_r = in.I("ldt_r");
  int64_t col = in.I("offset"), widest = 0;
  std::string vecs;
  for (int s = 0; s < p.S; ++s) {
    const std::string k = std::to_string(s);
    MultiExpandSlice& sl = p.slices[s];
    sl.b = in.input("b" + k, p.b_fp32 ? 4 : 2);
    sl.N = in.I("N" + k);
    sl.col = col;
    col += sl.N;
    widest = sl.N > widest ? sl.N : widest;
    sl.ldb_l = in.I("ldb_l" + k); sl.ldb_n = in.I("ldb_n" + k); sl.ldb_r = in.I("ldb_r" + k);
    sl.b_vec = (p.R <= 1 || sl.ldb_r == 1) &&
               rows_aligned16(sl.b, p.b_fp32 ? 4 : 2, {p.L > 1 ? sl.ldb_l : 0, sl.N > 1 ? sl.ldb_n : 0});
    sl.y_pairs = (sl.N <= 1 || p.ldy_n == 1) && output_pairs_aligned(p.y + sl.col, p.ldy_m, p.M);
    vecs += "b_vec" + k + " " + std::to_string(int(sl.b_vec)) + "\ny_pairs" + k + " " +
            std::to_string(int(sl.y_pairs)) + "\n";
  }
  const MultiLaunchPlan plan = plan_multi_expand(p.num_items, widest, p.R, p.item_m, p.S);
  if (plan.error) emu::fatal(std::string("plan: ") + plan.error);
  plan_file << "grid_x " << plan.grid_x << "\ngrid_y " << plan.grid_y << "\ngrid_z " << plan.grid_z << "\n" << vecs;
  for (int slice = 0; slice < int(plan.grid_z); ++slice)
    for (int64_t item = 0; item < plan.grid_x; ++item)
      for (int ntile = 0; ntile < int(plan.grid_y); ++ntile)
        emu::run_cta(plan.threads, plan.smem_bytes, [&](int tid) {
          unsigned char* smem = emu::machine().smem.data();
          if (bf16) multi_expand_cta<Bf16>(p, smem, item, ntile, slice, tid);
          else multi_expand_cta<Fp16>(p, smem, item, ntile, slice, tid);
        });
}

void run_linear(Inputs& in, unsigned char* out, std::ofstream& plan_file) {
  MultiLinearParams p{};
  const bool bf16 = in.I("bf16") != 0;
  p.b_fp32 = in.I("b_fp32") != 0;
  p.bias_fp32 = in.I("bias_fp32") != 0;
  p.x = reinterpret_cast<const uint16_t*>(in.input("x", 2));
  p.w = reinterpret_cast<const uint16_t*>(in.input("w", 2));
  p.b = in.input("b", p.b_fp32 ? 4 : 2);
  p.bias = in.I("has_bias") ? in.input("bias", p.bias_fp32 ? 4 : 2) : nullptr;
  p.t = reinterpret_cast<const float*>(in.input("t", 4));
  p.ranks = in.I("has_ranks") ? in.ints("ranks") : nullptr;
  p.sorted_tokens = in.ints("sorted");
  p.sorted_adapter = in.ints("sorted_adapter");
  p.slot_start = in.ints("slot_start");
  p.y = reinterpret_cast<uint16_t*>(out);
  p.M = in.I("M"); p.N = in.I("N"); p.K = in.I("K"); p.L = int(in.I("L")); p.R = int(in.I("R"));
  p.ldx = in.I("ldx"); p.ldw = in.I("ldw"); p.ldy = in.I("ldy"); p.ldt_m = in.I("ldt_m"); p.ldt_r = in.I("ldt_r");
  p.ldb_l = in.I("ldb_l"); p.ldb_n = in.I("ldb_n"); p.ldb_r = in.I("ldb_r");
  // The same conditions as the CUDA launcher (csrc/multi_lora/multi_lora.cpp).
  p.aligned16 = rows_16byte_aligned(p.x, p.ldx, p.M) && rows_16byte_aligned(p.w, p.ldw, p.N);
  p.y_pairs = output_pairs_aligned(p.y, p.ldy, p.M);
  const LaunchPlan plan = plan_multi_linear(p.M, p.N, p.R, int(in.I("tile_kind")), int(in.I("tiles_per_cta")));
  if (plan.error) emu::fatal(std::string("plan: ") + plan.error);
  p.tiles_per_cta = plan.tiles_per_cta;
  p.group_m = int(in.has("group_m") ? in.I("group_m") : plan.group_m);
  plan_file << "tile_kind " << plan.tile_kind << "\ngrid " << plan.grid << "\ntiles_per_cta " << plan.tiles_per_cta
            << "\naligned16 " << p.aligned16 << "\ny_pairs " << p.y_pairs << "\n";
  for (int64_t pid = 0; pid < plan.grid; ++pid)
    emu::run_cta(plan.threads, plan.smem_bytes, [&](int tid) {
      unsigned char* smem = emu::machine().smem.data();
      if (plan.tile_kind == kTileSmall) {
        if (bf16) multi_linear_cta<Bf16, SmallTile>(p, smem, int(pid), tid);
        else multi_linear_cta<Fp16, SmallTile>(p, smem, int(pid), tid);
      } else {
        if (bf16) multi_linear_cta<Bf16, LargeTile>(p, smem, int(pid), tid);
        else multi_linear_cta<Fp16, LargeTile>(p, smem, int(pid), tid);
      }
    });
}

}  // namespace

int main(int argc, char** argv) {
  Inputs in{runner::open_run_dir(argc, argv, "run_multi_lora")};
  emu::machine().rng.seed(uint64_t(in.I("seed")));
  Blob out = in.read("out_init.bin");
  std::vector<uint8_t> counts(out.bytes, 0);
  emu::register_allocation("out", out.data(), out.bytes, &counts);
  unsigned char* out_start = out.data() + in.I("out_off") * (in.need("mode") == "shrink" ? 4 : 2);
  std::ofstream plan_file(in.path("plan.txt"));
  const std::string& mode = in.need("mode");
  if (mode == "shrink") run_shrink(in, out_start, plan_file);
  else if (mode == "expand") run_expand(in, out_start, plan_file);
  else if (mode == "linear") run_linear(in, out_start, plan_file);
  else emu::fatal("unknown mode " + mode);
  plan_file.close();

  in.write("out.bin", out.data(), out.bytes);
  in.write("out_counts.bin", counts.data(), counts.size());
  return runner::exit_status();
}

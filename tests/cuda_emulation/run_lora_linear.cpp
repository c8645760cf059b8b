// Runs csrc/lora_linear/lora_linear.cuh's fused forward on the host emulator (host_primitives.h).
//
//   run_lora_linear DIR
//
// DIR/params.txt holds "key value" lines (see `in.I(...)` below); DIR/{x,w,a,b,bias}.bin hold the raw
// bytes of each input allocation (the tensor starts *_off elements in). Writes DIR/y.bin and
// DIR/t.bin (the output allocations after the run, prefilled by the caller's y_init.bin /
// t_init.bin), DIR/y_counts.bin and DIR/t_counts.bin (stores per byte) and DIR/plan.txt.
// Exit status: runner_io.h.
#include "host_primitives.h"
#include "lora_linear/lora_linear.cuh"
#include "runner_io.h"

using namespace lora_kernels;
using runner::Blob;

int main(int argc, char** argv) {
  const runner::RunDir in = runner::open_run_dir(argc, argv, "run_lora_linear");
  const bool bf16 = in.I("bf16") != 0, has_bias = in.I("has_bias") != 0;
  Blob x = in.read("x.bin"), w = in.read("w.bin"), a = in.read("a.bin");
  Blob b = in.read("b.bin"), y = in.read("y_init.bin"), t = in.read("t_init.bin");
  Blob bias;
  if (has_bias) bias = in.read("bias.bin");
  std::vector<uint8_t> y_counts(y.bytes, 0), t_counts(t.bytes, 0);
  emu::register_allocation("x", x.data(), x.bytes, nullptr);
  emu::register_allocation("weight", w.data(), w.bytes, nullptr);
  emu::register_allocation("lora_a", a.data(), a.bytes, nullptr);
  emu::register_allocation("lora_b", b.data(), b.bytes, nullptr);
  if (has_bias) emu::register_allocation("bias", bias.data(), bias.bytes, nullptr);
  emu::register_allocation("y", y.data(), y.bytes, &y_counts);
  emu::register_allocation("t", t.data(), t.bytes, &t_counts);

  LoraLinearParams p{};
  p.M = in.I("M"); p.N = in.I("N"); p.K = in.I("K");
  p.rank = int(in.I("rank")); p.a_rows = int(in.I("a_rows"));
  p.a_split = in.I("a_split") != 0; p.b_fp32 = in.I("b_fp32") != 0;
  p.bias_fp32 = in.I("bias_fp32") != 0; p.save_t = in.I("save_t") != 0;
  p.ldx = in.I("ldx"); p.ldw = in.I("ldw"); p.lda = in.I("lda");
  p.ldb_n = in.I("ldb_n"); p.ldb_r = in.I("ldb_r"); p.ldy = in.I("ldy"); p.ldt = in.I("ldt");
  p.scale = std::stof(in.need("scale"));
  const int b_elem = p.b_fp32 ? 4 : 2, bias_elem = p.bias_fp32 ? 4 : 2;
  p.x = reinterpret_cast<const uint16_t*>(x.data()) + in.I("x_off");
  p.w = reinterpret_cast<const uint16_t*>(w.data()) + in.I("w_off");
  p.a = reinterpret_cast<const uint16_t*>(a.data()) + in.I("a_off");
  p.b = b.data() + in.I("b_off") * b_elem;
  p.bias = has_bias ? bias.data() + in.I("bias_off") * bias_elem : nullptr;
  p.y = reinterpret_cast<uint16_t*>(y.data()) + in.I("y_off");
  p.t = reinterpret_cast<float*>(t.data()) + in.I("t_off");
  // The same conditions as the CUDA launcher (csrc/lora_linear/lora_linear.cpp).
  p.x_aligned16 = rows_16byte_aligned(p.x, p.ldx, p.M);
  p.w_aligned16 = rows_16byte_aligned(p.w, p.ldw, p.N);
  p.a_aligned16 = rows_16byte_aligned(p.a, p.lda, p.a_rows);
  p.y_pairs = output_pairs_aligned(p.y, p.ldy, p.M);

  const LaunchPlan plan = plan_lora_linear(p.M, p.N, p.a_rows, int(in.I("num_sms")), int(in.I("tile_kind")),
                                           int(in.I("tiles_per_cta")));
  if (plan.error) emu::fatal(std::string("plan: ") + plan.error);
  p.tiles_per_cta = plan.tiles_per_cta;
  p.group_m = int(in.has("group_m") ? in.I("group_m") : plan.group_m);
  emu::machine().rng.seed(uint64_t(in.I("seed")));
  {
    std::ofstream f(in.path("plan.txt"));
    f << "tile_kind " << plan.tile_kind << "\nrb " << plan.rb << "\ntiles_per_cta " << plan.tiles_per_cta
      << "\ngrid " << plan.grid << "\nthreads " << plan.threads << "\nsmem_bytes " << plan.smem_bytes
      << "\nx_aligned16 " << p.x_aligned16 << "\nw_aligned16 " << p.w_aligned16 << "\na_aligned16 "
      << p.a_aligned16 << "\ny_pairs " << p.y_pairs << "\n";
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

  in.write("y.bin", y.data(), y.bytes);
  in.write("t.bin", t.data(), t.bytes);
  in.write("y_counts.bin", y_counts.data(), y_counts.size());
  in.write("t_counts.bin", t_counts.data(), t_counts.size());
  return runner::exit_status();
}

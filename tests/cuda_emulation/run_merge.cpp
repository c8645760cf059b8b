// Runs csrc/merge/merge.cuh's in-place merge kernel on the host emulator (host_primitives.h,
// host_stream_primitives.h), with the launcher's own parameter logic (make_merge_params).
//
//   run_merge DIR
//
// DIR/params.txt holds "key value" lines (see `in.I(...)` below); DIR/{w,a,b}.bin and, when present,
// DIR/{codes,esc_index,esc_value,status}.bin hold each allocation's raw bytes (the tensor starts
// *_off elements in). Writes every writable allocation back as DIR/<name>_out.bin, per-byte store
// and read counts of W and the codes (DIR/{w,codes}_{stores,reads}.bin) and DIR/plan.txt.
// Exit status: runner_io.h.
#include "host_stream_primitives.h"
#include "merge/merge.cuh"
#include "runner_io.h"

using namespace lora_kernels;
using runner::Blob;

int main(int argc, char** argv) {
  const runner::RunDir in = runner::open_run_dir(argc, argv, "run_merge");
  const int wtype = int(in.I("wtype"));  // 0 fp16, 1 bf16, 2 fp32
  const bool adapter_fp32 = in.I("adapter_fp32") != 0;
  const bool has_codes = in.I("has_codes") != 0, has_escapes = in.I("has_escapes") != 0;
  const bool has_status = in.I("has_status") != 0;
  const int w_bytes = wtype == 2 ? 4 : 2, a_bytes = adapter_fp32 ? 4 : 2;

  Blob w = in.read("w.bin"), a = in.read("a.bin"), b = in.read("b.bin");
  Blob codes, esc_index, esc_value, status;
  std::vector<uint8_t> w_stores(w.bytes, 0), w_reads(w.bytes, 0), c_stores, c_reads, ei_stores, ev_stores, st_stores;
  emu::register_allocation("weight", w.data(), w.bytes, &w_stores);
  emu::count_reads(w.data(), w.bytes, &w_reads);
  emu::register_allocation("lora_a", a.data(), a.bytes, nullptr);
  emu::register_allocation("lora_b", b.data(), b.bytes, nullptr);
  if (has_codes) {
    codes = in.read("codes.bin");
    c_stores.assign(codes.bytes, 0);
    c_reads.assign(codes.bytes, 0);
    emu::register_allocation("codes", codes.data(), codes.bytes, &c_stores);
    emu::count_reads(codes.data(), codes.bytes, &c_reads);
  }
  if (has_escapes) {
    esc_index = in.read("esc_index.bin");
    esc_value = in.read("esc_value.bin");
    ei_stores.assign(esc_index.bytes, 0);
    ev_stores.assign(esc_value.bytes, 0);
    emu::register_allocation("escape_index", esc_index.data(), esc_index.bytes, &ei_stores);
    emu::register_allocation("escape_value", esc_value.data(), esc_value.bytes, &ev_stores);
  }
  if (has_status) {
    status = in.read("status.bin");
    st_stores.assign(status.bytes, 0);
    emu::register_allocation("status", status.data(), status.bytes, &st_stores);
  }

  MergeArgs x{};
  x.w = w.data() + in.I("w_off") * w_bytes;
  x.rows = in.I("rows"); x.cols = in.I("cols"); x.s0 = in.I("s0"); x.s1 = in.I("s1");
  x.fan_in_fan_out = in.I("fan_in_fan_out") != 0;
  x.w_bytes = w_bytes;
  x.a = a.data() + in.I("a_off") * a_bytes; x.a_s0 = in.I("a_s0"); x.a_s1 = in.I("a_s1");
  x.b = b.data() + in.I("b_off") * a_bytes; x.b_s0 = in.I("b_s0"); x.b_s1 = in.I("b_s1");
  x.rank = int(in.I("rank"));
  x.adapter_fp32 = adapter_fp32;
  if (has_codes) {
    x.codes = reinterpret_cast<int8_t*>(codes.data()) + in.I("c_off");
    x.c_s0 = in.I("c_s0"); x.c_s1 = in.I("c_s1");
  }
  if (has_escapes) {
    x.esc_index = reinterpret_cast<int64_t*>(esc_index.data());
    x.esc_value = esc_value.data();
    x.esc_capacity = int64_t(esc_index.bytes / 8);
  }
  x.status = has_status ? reinterpret_cast<int32_t*>(status.data()) : nullptr;
  x.scale = std::stof(in.need("scale"));
  x.mode = int(in.I("mode"));
  x.subtract = in.I("subtract") != 0;
  x.gated = in.I("gated") != 0;
  const MergeParams p = make_merge_params(x);
  const int64_t grid = merge_grid(p.P, p.Q, int(in.I("num_sms")), int(in.I("ctas_per_sm")));
  const size_t smem = merge_smem_bytes(p.pitch, adapter_fp32);
  emu::machine().rng.seed(uint64_t(in.I("seed")));
  {
    std::ofstream f(in.path("plan.txt"));
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

  in.write("w_out.bin", w.data(), w.bytes);
  in.write("w_stores.bin", w_stores.data(), w_stores.size());
  in.write("w_reads.bin", w_reads.data(), w_reads.size());
  if (has_codes) {
    in.write("codes_out.bin", codes.data(), codes.bytes);
    in.write("codes_stores.bin", c_stores.data(), c_stores.size());
    in.write("codes_reads.bin", c_reads.data(), c_reads.size());
  }
  if (has_escapes) {
    in.write("esc_index_out.bin", esc_index.data(), esc_index.bytes);
    in.write("esc_value_out.bin", esc_value.data(), esc_value.bytes);
  }
  if (has_status) in.write("status_out.bin", status.data(), status.bytes);
  return runner::exit_status();
}

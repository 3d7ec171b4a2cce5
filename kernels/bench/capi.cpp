// The decode kernels behind a C interface, for the benchmark scripts (bench_decode.py, bench_prefill.py,
// bench_paged.py and bench_mla.py, through ctypes). Every function returns 0, or 1 with the exception's message in
// `error`.
#include "af/kernels/decode.hpp"
#include "af/kernels/mla_decode.hpp"
#include "af/kernels/paged_decode.hpp"
#include "af/kernels/prefill.hpp"

#include <cstdio>
#include <exception>

namespace {

template <class Body>
int guarded(char* error, int error_size, Body body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, static_cast<std::size_t>(error_size), "%s", e.what());
    return 1;
  }
}

af::kernels::DecodeShape shape_of(long long batch, long long q_heads, long long kv_heads, long long head_dim,
                                  long long seq_len) {
  return {batch, q_heads, kv_heads, head_dim, seq_len};
}

af::MlaDecodeShape mla_shape_of(long long batch, long long q_heads, long long page_size, long long max_pages_per_seq,
                                long long num_pages) {
  af::MlaDecodeShape s;
  s.batch = batch;
  s.q_heads = q_heads;
  s.page_size = page_size;
  s.max_pages_per_seq = max_pages_per_seq;
  s.num_pages = num_pages;
  return s;
}

}  // namespace

extern "C" {

/// Plans `version` ("v1_naive" ... "best") for the shape: the version that runs, splits, keys per split and
/// workspace bytes. `splits` 0 lets the plan choose.
int af_decode_plan(const char* version, long long batch, long long q_heads, long long kv_heads, long long head_dim,
                   long long seq_len, int sm_count, int splits, int* out_version, int* out_splits,
                   long long* out_keys_per_split, long long* out_workspace_bytes, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    const auto plan = af::kernels::plan_decode(shape_of(batch, q_heads, kv_heads, head_dim, seq_len),
                                               af::kernels::decode_version_from_name(version), sm_count, splits);
    *out_version = static_cast<int>(plan.version);
    *out_splits = plan.splits;
    *out_keys_per_split = plan.keys_per_split;
    *out_workspace_bytes = static_cast<long long>(plan.workspace_bytes);
  });
}

/// Runs a plan from af_decode_plan on `stream` (a cudaStream_t; null for the default stream).
int af_decode_run(int version, int splits, long long keys_per_split, long long workspace_bytes, long long batch,
                  long long q_heads, long long kv_heads, long long head_dim, long long seq_len, const void* q,
                  const void* k, const void* v, void* out, float scale, void* workspace, void* stream, char* error,
                  int error_size) {
  return guarded(error, error_size, [&] {
    af::kernels::DecodePlan plan;
    plan.version = static_cast<af::kernels::DecodeVersion>(version);
    plan.splits = splits;
    plan.keys_per_split = keys_per_split;
    plan.workspace_bytes = static_cast<std::size_t>(workspace_bytes);
    af::kernels::decode_attention(plan, shape_of(batch, q_heads, kv_heads, head_dim, seq_len),
                                  static_cast<const std::uint16_t*>(q), static_cast<const std::uint16_t*>(k),
                                  static_cast<const std::uint16_t*>(v), static_cast<std::uint16_t*>(out), scale,
                                  workspace, plan.workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

/// Runs the causal varlen prefill (af/kernels/prefill.hpp) on `stream`: packed q [total_q, q_heads, head_dim],
/// k, v [total_k, kv_heads, head_dim], cumulative counts cu_q, cu_k [batch + 1] (int32), all on the device.
int af_prefill_run(long long batch, long long q_heads, long long kv_heads, long long head_dim, long long max_query_len,
                   const void* q, const void* k, const void* v, const void* cu_q, const void* cu_k, void* out,
                   float scale, void* stream, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    af::kernels::prefill_attention({batch, q_heads, kv_heads, head_dim}, max_query_len,
                                   static_cast<const std::uint16_t*>(q), static_cast<const std::uint16_t*>(k),
                                   static_cast<const std::uint16_t*>(v), static_cast<const std::int32_t*>(cu_q),
                                   static_cast<const std::int32_t*>(cu_k), static_cast<std::uint16_t*>(out), scale,
                                   static_cast<cudaStream_t>(stream));
  });
}

/// Plans and runs the paged decode (af/kernels/paged_decode.hpp) over bf16 pools (fp8 = 0: k and v bf16, the
/// scales null) or FP8 pools (fp8 = 1: k and v E4M3 codes, k_scales and v_scales float32 per row) on `stream`.
/// With `workspace` null it only plans: *out_splits and *out_workspace_bytes say what a run needs.
int af_paged_decode(int fp8, long long batch, long long q_heads, long long kv_heads, long long head_dim,
                    long long page_size, long long max_pages_per_seq, long long num_pages, int sm_count, int splits,
                    const void* q, const void* k, const void* k_scales, const void* v, const void* v_scales,
                    const void* block_table, const void* lengths, void* out, float scale, void* workspace,
                    long long workspace_bytes, void* stream, int* out_splits, long long* out_workspace_bytes,
                    char* error, int error_size) {
  return guarded(error, error_size, [&] {
    const af::PagedDecodeShape shape{batch, q_heads, kv_heads, head_dim, page_size, max_pages_per_seq, num_pages};
    const auto format = fp8 != 0 ? af::PagedKvFormat::fp8_e4m3 : af::PagedKvFormat::bf16;
    const auto plan = af::kernels::plan_paged_decode(shape, sm_count, splits, format);
    *out_splits = plan.splits;
    *out_workspace_bytes = static_cast<long long>(plan.workspace_bytes);
    if (workspace == nullptr && plan.workspace_bytes > 0) return;
    const auto bytes = static_cast<std::size_t>(workspace_bytes);
    const auto* table = static_cast<const std::int32_t*>(block_table);
    const auto* lens = static_cast<const std::int32_t*>(lengths);
    if (fp8 != 0)
      af::kernels::paged_decode_attention_fp8(
          plan, shape, static_cast<const std::uint16_t*>(q), static_cast<const std::uint8_t*>(k),
          static_cast<const float*>(k_scales), static_cast<const std::uint8_t*>(v), static_cast<const float*>(v_scales),
          table, lens, static_cast<std::uint16_t*>(out), scale, workspace, bytes, static_cast<cudaStream_t>(stream));
    else
      af::kernels::paged_decode_attention(plan, shape, static_cast<const std::uint16_t*>(q),
                                          static_cast<const std::uint16_t*>(k), static_cast<const std::uint16_t*>(v),
                                          table, lens, static_cast<std::uint16_t*>(out), scale, workspace, bytes,
                                          static_cast<cudaStream_t>(stream));
  });
}

/// Plans MLA decode (af/kernels/mla_decode.hpp; latent 512, RoPE 64) for the shape: splits, pages per split and
/// workspace bytes. `splits` 0 lets the plan choose.
int af_mla_decode_plan(long long batch, long long q_heads, long long page_size, long long max_pages_per_seq,
                       long long num_pages, int sm_count, int splits, int* out_splits, int* out_pages_per_split,
                       long long* out_workspace_bytes, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    const auto plan = af::kernels::plan_mla_decode(
        mla_shape_of(batch, q_heads, page_size, max_pages_per_seq, num_pages), sm_count, splits);
    *out_splits = plan.splits;
    *out_pages_per_split = plan.pages_per_split;
    *out_workspace_bytes = static_cast<long long>(plan.workspace_bytes);
  });
}

/// Runs a plan from af_mla_decode_plan on `stream`: absorbed queries q [batch, q_heads, 576], the page pool
/// cache [num_pages, page_size, 576] (bf16), block_table [batch, max_pages_per_seq] and lengths [batch] (int32),
/// out [batch, q_heads, 512] (bf16), all on the device.
int af_mla_decode_run(int splits, int pages_per_split, long long workspace_bytes, long long batch, long long q_heads,
                      long long page_size, long long max_pages_per_seq, long long num_pages, const void* q,
                      const void* cache, const void* block_table, const void* lengths, void* out, float scale,
                      void* workspace, void* stream, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    af::kernels::MlaDecodePlan plan;
    plan.splits = splits;
    plan.pages_per_split = pages_per_split;
    plan.workspace_bytes = static_cast<std::size_t>(workspace_bytes);
    af::kernels::mla_decode_attention(plan, mla_shape_of(batch, q_heads, page_size, max_pages_per_seq, num_pages),
                                      static_cast<const std::uint16_t*>(q), static_cast<const std::uint16_t*>(cache),
                                      static_cast<const std::int32_t*>(block_table),
                                      static_cast<const std::int32_t*>(lengths), static_cast<std::uint16_t*>(out),
                                      scale, workspace, plan.workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"

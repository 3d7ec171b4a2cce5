// MLA decode: the absorbed path of multi-head latent attention over a paged latent cache (af/mla_decode.hpp).
// DeepSeek-V2 (arXiv:2405.04434, section 2.1) caches per token a latent c of 512 values and a RoPE key k_pe of
// 64, shared by every query head; with W_UK absorbed into the query, head h scores token j by q_h . [c_j ; k_pe_j]
// (576 values) and mixes the latents c_j (512 values). It is attention with one KV head, keys 576 wide and values
// the first 512 of them, for many heads at once: DeepSeek-V3 (arXiv:2412.19437) has 128. FlashMLA
// (github.com/deepseek-ai/FlashMLA) computes it with 64 heads per block on Hopper's wgmma; this kernel keeps
// mma.sync.m16n8k16 (kernels/mma_tile.cuh) and takes 16 heads per block, the rows of one mma tile.
//
// A block: 16 query heads of one sequence and one split of its pages, 4 warps. Per tile of mla_tile_tokens
// cached rows, staged in shared memory by cp.async (double-buffered, each thread finding its token's page in the
// block table) and read there by all 16 heads:
//   S = Q K^T   split along the 576 key dimensions: warp w multiplies its 144 (9 mma steps, the query
//               fragments held in registers for the whole block) for every token of the tile, and leaves a
//               partial S in shared memory;
//   softmax     every warp sums the 4 partials for the whole tile (the same sums in the same order, so every
//               warp holds the same S), then runs the online softmax on its registers: all warps keep the same
//               running maximum and sum, and no other exchange is needed;
//   O += P V    split along the 512 output dimensions: warp w owns 128 of them (16 tiles of 16 x 8, 64 float32
//               accumulators a thread), the value rows read from the same staged tile.
// Like decode_paged.cu, the lengths are read on the device, the split count is fixed on the host from the
// capacity, and a split that lies wholly past its sequence's length writes an empty partial (output 0,
// log-sum-exp -inf) that the combine kernel (decode_combine.cu, head_dim 512) weights by exp2(-inf) = 0.
#include "mma_tile.cuh"

#include "af/kernels/cuda_check.hpp"

namespace af::kernels::detail {
namespace {

constexpr int mla_latent = 512;         // kv_lora_rank: the value width
constexpr int mla_width = 576;          // latent + qk_rope_head_dim (64): the key width
constexpr int mla_warps = 4;            // 576 / 16 = 36 key steps, 9 a warp; 512 / 4 = 128 outputs a warp
constexpr int mla_tile_tokens = 64;     // cached rows staged per tile (FlashMLA's page size is 64 too)
constexpr int mla_row = mla_width + 8;  // a staged row in bf16: 1168 bytes, 16 more than the data
constexpr int mla_key_steps = mla_width / 16 / mla_warps;  // mma steps of S = Q K^T per warp: 9
constexpr int mla_out_tiles = mla_latent / 8 / mla_warps;  // 8-wide output tiles per warp: 16
static_assert(mla_width % (16 * mla_warps) == 0 && mla_latent % (16 * mla_warps) == 0);

// Shared memory of a block: two staged tiles and the warps' partial scores. The row of 1168 bytes puts the 8
// rows that one ldmatrix reads (8 tokens, 16 bytes each) in 8 different 16-byte bank groups (1168 = 73 x 16;
// 1152 = 9 x 128 would put them all in the same group). A partial-score row holds Tokens + 8 floats, so that
// the float2 stores of rows g = 0..3 of a half-warp land in 4 different 32-byte groups.
template <int Tokens>
struct MlaSmem {
  static constexpr int score_row = Tokens + 8;
  static constexpr std::size_t tile_bytes = std::size_t{Tokens} * mla_row * sizeof(std::uint16_t);
  static constexpr std::size_t scores_bytes = std::size_t{mla_warps} * 16 * score_row * sizeof(float);
  static constexpr std::size_t bytes = 2 * tile_bytes + scores_bytes;
};

__device__ __forceinline__ std::uint32_t smem_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory without passing through registers (cp.async, sm_80 and later), cached
// in L2 only (.cg): every row is read once by this block; the other head tiles of the same sequence find it in L2.
__device__ __forceinline__ void copy16_async(std::uint16_t* dst, const std::uint16_t* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void copy_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8 x 8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8. Lane
// (g, t) receives row g, columns 2t and 2t + 1 of each matrix (ldmatrix), or with .trans rows 2t and 2t + 1 of
// column g: the mma B operand when the rows are the B matrix's columns (keys, for S = Q K^T) or its rows
// (tokens of V, for O = P V).
__device__ __forceinline__ void load_matrices(std::uint32_t (&r)[4], const std::uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
__device__ __forceinline__ void load_matrices_transposed(std::uint32_t (&r)[4], const std::uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// [mla-stage]
// Starts the copy of the tile of cached rows tile_begin .. tile_begin + Tokens - 1 into `tile`: 128 / Tokens
// threads per token, each finding its token's page in the block table once and copying every
// (128 / Tokens)-th 16-byte piece of the 1152-byte row. Rows at or past key_end are copied from row
// key_end - 1 instead: finite values, which the softmax weighs by 0 (a 0 times a stale NaN would not be 0).
template <int Tokens>
__device__ __forceinline__ void stage_tile(std::uint16_t* tile, const MlaDecodeArgs& a, const std::int32_t* table,
                                           std::int64_t tile_begin, std::int64_t key_end) {
  constexpr int threads_per_token = mla_warps * 32 / Tokens;
  constexpr int pieces = mla_width / 8 / threads_per_token;  // 16-byte pieces per thread
  static_assert(mla_warps * 32 % Tokens == 0 && mla_width / 8 % threads_per_token == 0);
  const int token = threadIdx.x / threads_per_token, first_piece = threadIdx.x % threads_per_token;
  const std::int64_t j = min(tile_begin + token, key_end - 1);
  const std::int64_t page = __ldg(table + (j >> a.page_shift));
  const std::uint16_t* src =
      a.cache + ((page << a.page_shift) + (j & ((std::int64_t{1} << a.page_shift) - 1))) * mla_width;
  std::uint16_t* dst = tile + token * mla_row;
#pragma unroll
  for (int i = 0; i < pieces; ++i) {
    const int piece = first_piece + i * threads_per_token;
    copy16_async(dst + piece * 8, src + piece * 8);
  }
  copy_commit();
}
// [/mla-stage]

template <int Tokens>
__global__ void __launch_bounds__(mla_warps * 32, 1) decode_mla_kernel(MlaDecodeArgs a) {
  using Smem = MlaSmem<Tokens>;
  constexpr int n_tiles = Tokens / 8;   // 8-token tiles of S
  constexpr int p_steps = Tokens / 16;  // 16-token mma steps of O += P V
  extern __shared__ __align__(16) unsigned char smem[];
  auto* tiles = reinterpret_cast<std::uint16_t*>(smem);                     // [2][Tokens][mla_row]
  auto* partial_s = reinterpret_cast<float*>(smem + 2 * Smem::tile_bytes);  // [mla_warps][16][score_row]

  const int head_tile = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int h0 = head_tile * 16, rows = min(16, a.q_heads - h0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  // [mla-split-range]
  // This split's pages and the empty split's partial, as the paged decode has them (decode_common.cuh).
  const KeyRange keys = paged_split_keys(a.lengths, b, split, a.max_pages_per_seq, a.pages_per_split, a.page_shift);
  const std::int64_t key_begin = keys.begin, key_end = keys.end;
  const std::int32_t* table = a.block_table + std::int64_t{b} * a.max_pages_per_seq;
  if (key_begin >= key_end) {
    write_empty_split<mla_latent>(a.out, a.partial_o, a.partial_lse, a.q_heads, a.splits, b, h0, rows, split);
    return;
  }
  // [/mla-split-range]

  // The first tile's copy goes out before anything else, so that its latency overlaps the query loads.
  stage_tile<Tokens>(tiles, a, table, key_begin, key_end);

  // [mla-query]
  // This warp's 144 key dimensions of the 16 queries as mma A fragments, for the whole block: step s covers
  // dimensions 16 (9 warp + s) .. + 15; lane (g, t) holds rows g and g + 8, columns 2t, 2t + 1 and 2t + 8,
  // 2t + 9. Rows past the last head are 0 (their scores are 0, their outputs never written).
  std::uint32_t qa[mla_key_steps][4];
#pragma unroll
  for (int s = 0; s < mla_key_steps; ++s) {
    const int col = 16 * (mla_key_steps * warp + s) + 2 * t;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // row g, then row g + 8
      const int r = g + 8 * half;
      std::uint32_t lo = 0, hi = 0;
      if (r < rows) {
        const std::uint16_t* row = a.q + (std::int64_t{b} * a.q_heads + h0 + r) * mla_width + col;
        lo = __ldg(reinterpret_cast<const unsigned int*>(row));
        hi = __ldg(reinterpret_cast<const unsigned int*>(row + 8));
      }
      qa[s][half] = lo;      // a0 (row g) / a1 (row g + 8): columns 2t, 2t + 1
      qa[s][2 + half] = hi;  // a2 / a3: columns 2t + 8, 2t + 9
    }
  }
  // [/mla-query]

  float o[mla_out_tiles][4];  // this warp's 128 output dimensions of rows g and g + 8, mma C layout
#pragma unroll
  for (int n = 0; n < mla_out_tiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-FLT_MAX, -FLT_MAX}, l[2] = {0.0f, 0.0f};  // rows g and g + 8; l: this lane's tokens only

  const std::int64_t tile_count = (key_end - key_begin + Tokens - 1) / Tokens;
  for (std::int64_t it = 0; it < tile_count; ++it) {
    const std::int64_t tile_begin = key_begin + it * Tokens;
    const std::uint16_t* tile = tiles + (it % 2) * Tokens * mla_row;
    // [mla-pipeline]
    // This thread's copies of the tile are done; the barrier makes every thread's visible, and tells that every
    // warp has finished the previous tile, so that its buffer can take the next tile while this one is used.
    copy_wait_all();
    __syncthreads();
    if (it + 1 < tile_count)
      stage_tile<Tokens>(tiles + ((it + 1) % 2) * Tokens * mla_row, a, table, tile_begin + Tokens, key_end);
    // [/mla-pipeline]

    // [mla-scores]
    // Partial S over this warp's 144 dimensions for every token of the tile. One ldmatrix.x4 gives the B
    // fragments of two 8-token tiles: matrices (tokens 0-7, dims 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15)
    // of the pair, each lane pointing at one token's row.
    float part[n_tiles][4];
#pragma unroll
    for (int j = 0; j < n_tiles; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < mla_key_steps; ++s) {
      const int dim = 16 * (mla_key_steps * warp + s) + 8 * ((lane / 8) % 2);
#pragma unroll
      for (int pair = 0; pair < n_tiles / 2; ++pair) {
        const int token = 16 * pair + 8 * (lane / 16) + lane % 8;
        std::uint32_t kb[4];
        load_matrices(kb, tile + token * mla_row + dim);
        mma_bf16(part[2 * pair], qa[s], kb[0], kb[1]);
        mma_bf16(part[2 * pair + 1], qa[s], kb[2], kb[3]);
      }
    }
    float* mine = partial_s + warp * 16 * Smem::score_row;
#pragma unroll
    for (int j = 0; j < n_tiles; ++j) {
      *reinterpret_cast<float2*>(mine + g * Smem::score_row + 8 * j + 2 * t) = make_float2(part[j][0], part[j][1]);
      *reinterpret_cast<float2*>(mine + (g + 8) * Smem::score_row + 8 * j + 2 * t) =
          make_float2(part[j][2], part[j][3]);
    }
    __syncthreads();
    // Every warp adds the 4 partials of the whole tile in the same order: all warps hold the same S (rows g and
    // g + 8, tokens 8j + 2t and 8j + 2t + 1), masked past the split's end and in log2 units.
    float sc[n_tiles][4];
#pragma unroll
    for (int j = 0; j < n_tiles; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int offset = (g + 8 * half) * Smem::score_row + 8 * j + 2 * t;
        float2 sum = *reinterpret_cast<const float2*>(partial_s + offset);
#pragma unroll
        for (int w = 1; w < mla_warps; ++w) {
          const float2 x = *reinterpret_cast<const float2*>(partial_s + w * 16 * Smem::score_row + offset);
          sum.x += x.x;
          sum.y += x.y;
        }
        const std::int64_t token = tile_begin + 8 * j + 2 * t;
        sc[j][2 * half] = token < key_end ? sum.x * a.scale_log2 : -INFINITY;
        sc[j][2 * half + 1] = token + 1 < key_end ? sum.y * a.scale_log2 : -INFINITY;
      }
    // [/mla-scores]

    // [mla-softmax]
    // The online softmax of rows g and g + 8 over the tile: the 4 lanes of a row (t = 0..3) hold its tokens.
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < n_tiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) row_max[e / 2] = fmaxf(row_max[e / 2], sc[j][e]);
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
      const float m_new = fmaxf(m[r], row_max[r]);  // finite: the tile's first token is below key_end
      alpha[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
    // P as the A operand of O += P V: the S accumulators are already in A's layout (tokens 2t, 2t + 1 from tile
    // 2k, tokens 2t + 8, 2t + 9 from tile 2k + 1), rounded to bf16.
    std::uint32_t pa[p_steps][4];
#pragma unroll
    for (int k = 0; k < p_steps; ++k) {
      float p[2][4];
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[jj][e] = exp2f(sc[2 * k + jj][e] - m[e / 2]);  // 0 for a masked token
          l[e / 2] += p[jj][e];
        }
      pa[k][0] = pack_bf16(p[0][0], p[0][1]);
      pa[k][1] = pack_bf16(p[0][2], p[0][3]);
      pa[k][2] = pack_bf16(p[1][0], p[1][1]);
      pa[k][3] = pack_bf16(p[1][2], p[1][3]);
    }
#pragma unroll
    for (int n = 0; n < mla_out_tiles; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    // [/mla-softmax]

    // [mla-values]
    // O += P V on this warp's 128 latent dimensions: the value rows are the first 512 values of the staged rows.
    // One ldmatrix.x4.trans gives the B fragments of two 8-dimension tiles for 16 tokens: matrices (tokens 0-7,
    // dims 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
#pragma unroll
    for (int k = 0; k < p_steps; ++k) {
      const int token = 16 * k + 8 * ((lane / 8) % 2) + lane % 8;
#pragma unroll
      for (int pair = 0; pair < mla_out_tiles / 2; ++pair) {
        const int dim = 128 * warp + 16 * pair + 8 * (lane / 16);
        std::uint32_t vb[4];
        load_matrices_transposed(vb, tile + token * mla_row + dim);
        mma_bf16(o[2 * pair], pa[k], vb[0], vb[1]);
        mma_bf16(o[2 * pair + 1], pa[k], vb[2], vb[3]);
      }
    }
    // [/mla-values]
  }

  // The combine kernel (launched as a programmatic dependent) may start its launch now; it waits for this
  // grid's memory before reading the partials.
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  // [mla-store]
  // The 4 lanes of a row each summed their own tokens; every warp holds the whole sum, so each writes its 128
  // dimensions alone: the output (one split), or the partial normalised by its own sum and lse = m + log2(l).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = g + 8 * half;
    if (r >= rows) continue;
    const std::int64_t head = std::int64_t{b} * a.q_heads + h0 + r;  // [batch, q_heads] flattened
    const float inv = 1.0f / l[half];
#pragma unroll
    for (int n = 0; n < mla_out_tiles; ++n) {
      const int dim = 128 * warp + 8 * n + 2 * t;
      const float x = o[n][2 * half] * inv, y = o[n][2 * half + 1] * inv;
      if (a.splits == 1) {
        *reinterpret_cast<std::uint32_t*>(a.out + head * mla_latent + dim) = pack_bf16(x, y);
      } else {
        *reinterpret_cast<float2*>(a.partial_o + (head * a.splits + split) * mla_latent + dim) = make_float2(x, y);
      }
    }
    if (a.splits > 1 && warp == 0 && t == 0) a.partial_lse[head * a.splits + split] = m[half] + log2f(l[half]);
  }
  // [/mla-store]
}

// More than 48 KiB of dynamic shared memory must be allowed per kernel (per device) before a launch asks for it.
template <int Tokens>
void allow_smem() {
  CUDA_CHECK(cudaFuncSetAttribute(decode_mla_kernel<Tokens>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(MlaSmem<Tokens>::bytes)));
}

// Two tiles of 64 tokens need 164 KiB of shared memory: Hopper gives a block up to 227 KiB, an A100 163 KiB and
// the sm_86/sm_89 cards 99 KiB. Where 64 does not fit, the kernel stages 32 tokens at a time (85 KiB).
bool wide_tiles_fit() {
  int device = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return optin >= static_cast<int>(MlaSmem<mla_tile_tokens>::bytes);
}

template <int Tokens>
int blocks_per_sm() {
  allow_smem<Tokens>();
  int blocks = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_mla_kernel<Tokens>, mla_warps * 32,
                                                           MlaSmem<Tokens>::bytes));
  return blocks;
}

template <int Tokens>
void launch(const MlaDecodeArgs& a, cudaStream_t stream) {
  allow_smem<Tokens>();
  const dim3 grid(static_cast<unsigned>((a.q_heads + 15) / 16), static_cast<unsigned>(a.splits),
                  static_cast<unsigned>(a.batch));
  decode_mla_kernel<Tokens><<<grid, mla_warps * 32, MlaSmem<Tokens>::bytes, stream>>>(a);
  AF_CHECK_LAUNCH();
}

}  // namespace

int mla_blocks_per_sm() {
  return wide_tiles_fit() ? blocks_per_sm<mla_tile_tokens>() : blocks_per_sm<mla_tile_tokens / 2>();
}

void launch_decode_mla(const MlaDecodeArgs& a, cudaStream_t stream) {
  if (wide_tiles_fit())
    launch<mla_tile_tokens>(a, stream);
  else
    launch<mla_tile_tokens / 2>(a, stream);
}

}  // namespace af::kernels::detail

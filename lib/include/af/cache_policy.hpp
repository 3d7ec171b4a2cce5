#pragma once
/// @file cache_policy.hpp
/// The cache tricks of chapters 05-12 applied to a model trained with the full cache (chapter 17): how the
/// cache stores keys and values (bf16, INT8, FP8 E4M3, 2- or 4-bit with a full-precision residual as KIVI
/// does) and which cached tokens each decode step reads (all, a sliding window, sink tokens plus a window, the
/// exact top-k per query head, Quest's pages chosen by their key bounds, H2O's heavy hitters).
///
/// Every query of a forward pass sees the cache as the policy presents it at that query's decode step, as if
/// the text were decoded one token at a time: a prefill is a batch of decode steps, not a dense pass. The
/// cache counts, per step, the bytes it holds and the bytes the step reads.

#include "af/grouped_attention.hpp"
#include "af/rope.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace af {

/// How the cache stores K and V.
enum class KvStorage {
  f32,   ///< float32, exact (the reference)
  bf16,  ///< bf16, rounded to nearest (the baseline of every selection policy)
  int8,  ///< INT8: keys per channel over blocks of `block` tokens, values per token; one float32 scale each
  e4m3,  ///< FP8 E4M3: keys and values per token, one float32 scale each (amax / 448)
  int4,  ///< KIVI-style 4-bit: keys per channel over blocks, values per token in groups of 32 channels;
         ///< asymmetric (float32 minimum and step per group)
  int2,  ///< the same with 2 bits
};

/// Which cached tokens a decode step reads.
enum class KvSelection {
  all,            ///< every cached token
  window,         ///< the last `window` tokens
  sinks,          ///< the first `sinks` tokens and the last `window` (StreamingLLM)
  top_k,          ///< per query head, the `top_k` tokens of largest score (exact; the indexer's ceiling)
  pages,          ///< per query head, `pages` pages of `page` tokens: the current one and the others of
                  ///< largest bound max(q_i min_i, q_i max_i) summed over channels (Quest)
  heavy_hitters,  ///< per KV head, `budget` tokens: the last budget/2 and the rest by accumulated attention
                  ///< (H2O); evicted tokens never return
};

/// Where the sink tokens sit when the window has moved past them.
enum class SinkPositions {
  original,  ///< at the positions they were cached at (the query is far from them)
  in_cache,  ///< at their slots in the cache: the sinks just before the window (StreamingLLM's choice)
};

/// One point of a sweep: a storage and a selection with its knobs.
struct CachePolicy {
  KvStorage storage = KvStorage::bf16;
  KvSelection selection = KvSelection::all;
  std::int64_t window = 0;  ///< window, sinks: tokens in the window
  std::int64_t sinks = 0;   ///< sinks: the first tokens kept
  SinkPositions sink_positions = SinkPositions::original;
  std::int64_t top_k = 0;         ///< top_k: tokens per query head
  std::int64_t page = 16;         ///< pages: tokens per page
  std::int64_t pages = 0;         ///< pages: pages read per query head, the current one included
  std::int64_t budget = 0;        ///< heavy_hitters: tokens held per KV head
  std::int64_t block = 32;        ///< int8, int4, int2: tokens per key block; the newest incomplete block stays
                                  ///< bf16 (the residual)
  std::int64_t value_group = 32;  ///< int4, int2: channels per value group

  /// A short label, e.g. "window W=256" or "int4 (block 32)".
  std::string label() const;
  /// The method's name without its knob, e.g. "window" or "int4".
  std::string method() const;
  /// Throws af::Error naming the first knob out of range for `head_dim` (a selection needs bf16 or f32
  /// storage; a quantized storage reads every token).
  void validate(std::int64_t head_dim) const;
};

/// What the policy attention counted at one position, summed over layers and KV heads.
struct StepTraffic {
  double bytes_held = 0;       ///< K, V, their scales and the policy's own state
  double bytes_read = 0;       ///< what the step's attention reads: the chosen tokens' K and V (and scales)
  double selection_bytes = 0;  ///< what choosing them reads besides: Quest's page bounds, exact top-k's keys
};

/// Attention of one model's layers through a CachePolicy; holds the state that outlives a forward pass
/// (H2O's accumulated scores and survivors) and the traffic per position.
class PolicyAttention {
 public:
  /// `layers` layers of `shape`; `rope` (the model's) re-rotates sink keys for SinkPositions::in_cache.
  /// Throws af::Error when the policy is invalid for the shape.
  PolicyAttention(CachePolicy policy, std::int64_t layers, const GroupedShape& shape, const Rope& rope);

  const CachePolicy& policy() const { return policy_; }
  /// Forgets the sequence: the next attend of layer 0 must start at position 0.
  void reset();

  /// Layer `layer`'s attention of the queries `q [T, H d]` (rotated, at positions n - T .. n - 1 where n is
  /// cache.size()) over the cache as the policy presents it at each query's step; returns `[T, H d]`.
  /// Layers must be called in order for each batch of positions. Throws af::Error on a shape mismatch, a
  /// layer out of order or positions that do not continue the policy's state.
  Tensor attend(std::int64_t layer, ConstMatrix q, const GroupedKvCache& cache);

  /// The traffic counted at each position so far (index = position).
  const std::vector<StepTraffic>& traffic() const { return traffic_; }

 private:
  struct HeavyHitters {
    std::vector<std::int64_t> tokens;  // the held tokens, in position order
    std::vector<double> score;         // their accumulated attention (summed over the group's heads)
  };
  CachePolicy policy_;
  std::int64_t layers_;
  GroupedShape shape_;
  const Rope* rope_;
  std::vector<HeavyHitters> heavy_;          // [layer * G + g]
  std::vector<std::int64_t> next_position_;  // per layer: the position its next query must have
  std::vector<StepTraffic> traffic_;
};

}  // namespace af

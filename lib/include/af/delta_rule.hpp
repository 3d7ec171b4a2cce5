#pragma once
/// @file delta_rule.hpp
/// The gated delta rule (chapter 14): linear attention whose state is corrected, not only added to. Per head a
/// state S of `[d_k, d_v]` maps a key to a value; each step decays it, reads what the new key currently
/// retrieves, and writes the difference to the new value at a learning rate beta:
///
///     S <- diag(exp(g_t)) S                      (the gate: one log-decay per step, or one per key channel)
///     u_t = beta_t (v_t - S^T k_t)               (the correction: what k_t should retrieve minus what it does)
///     S <- S + k_t u_t^T                         (a rank-one write)
///     o_t = S^T q_t
///
/// With unit-norm keys and beta = 1 the write replaces what k_t retrieved by v_t exactly, which is why the
/// rule recalls where chapter 13's additive state blurs. Gated DeltaNet (Qwen3-Next's linear-attention
/// layers) has one log-decay per head and step; Kimi Delta Attention one per key channel.
///
/// Two forms compute the same outputs and final state: the recurrence, one step at a time (decode), and the
/// chunked form (prefill), which writes each chunk of C steps as matrix products: inside a chunk the
/// corrections u solve a unit lower-triangular system (I + A) U = B (the "UT transform"), and the state
/// enters only at the chunk's edges.

#include "af/tensor.hpp"

#include <cstdint>

namespace af {

/// The inputs of a delta-rule layer for T steps of H heads: queries and keys `[T, H, d_k]`, values
/// `[T, H, d_v]`, log-decays `[T, H]` (one per head) or `[T, H, d_k]` (one per key channel; all <= 0), and
/// learning rates beta `[T, H]`. Queries and keys are used as given (a layer normalises and scales them).
struct DeltaRuleInputs {
  Tensor q, k, v, log_decay, beta;

  std::int64_t steps() const { return q.dim(0); }
  std::int64_t heads() const { return q.dim(1); }
  std::int64_t key_dim() const { return q.dim(2); }
  std::int64_t value_dim() const { return v.dim(2); }
  /// Whether the decay is per key channel (Kimi Delta Attention) rather than per head (Gated DeltaNet).
  bool per_channel_decay() const { return log_decay.rank() == 3; }
  /// Throws af::Error naming the first tensor whose shape disagrees with q's, a log-decay above 0 or a NaN.
  void validate() const;
};

/// The state of every head, `[H, d_k, d_v]`, zero for a new sequence.
Tensor delta_rule_initial_state(std::int64_t heads, std::int64_t key_dim, std::int64_t value_dim);

/// The recurrence, step by step from `state` (updated in place): returns the outputs `[T, H, d_v]`.
Tensor delta_rule_recurrent(const DeltaRuleInputs& in, Tensor& state);

/// The chunked form with chunks of `chunk` steps (the last may be shorter): the same outputs and final state
/// as the recurrence, up to rounding. Throws af::Error for chunk < 1. Long chunks with strong decay lose
/// precision (the form divides by the decay accumulated inside a chunk); 64 is the usual size.
Tensor delta_rule_chunked(const DeltaRuleInputs& in, Tensor& state, std::int64_t chunk = 64);

}  // namespace af

#pragma once
/// @file grad_cores.hpp
/// Forward and backward passes of the token-mixing cores that are not softmax attention, for training tiny
/// models from scratch with hand-written gradients: decayed linear attention (chapter 13), the gated delta rule
/// and the pieces of a Gated DeltaNet layer around it (chapter 14), and DeepSeek V3.2's lightning indexer with
/// its training loss (chapter 11).
///
/// Every function is a free function over plain row-major spans with explicit sizes, templated on the scalar
/// type T (instantiated for float and double). A forward writes its outputs; the matching backward takes the
/// inputs, whatever the forward saved, and the upstream gradient, and *adds* the input gradients into the spans
/// it is given (zero them first), so that an input used twice collects both contributions. Sums inside a
/// function run in double whatever T is. Sizes and domains are checked: a span of the wrong length, a size
/// below 1 or a value outside its domain throws af::Error naming the value and what was expected.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace af::grad {

/// The sizes of a per-head sequence mixer: T steps of H heads, keys and queries of d_k channels, values of d_v.
/// Queries and keys are laid out `[T, H, d_k]`, values and outputs `[T, H, d_v]`, one scalar per step and head
/// `[T, H]`.
struct SeqDims {
  std::int64_t steps = 0;      ///< T
  std::int64_t heads = 0;      ///< H
  std::int64_t key_dim = 0;    ///< d_k
  std::int64_t value_dim = 0;  ///< d_v
};

// --- Decayed linear attention (chapter 13) -----------------------------------------------------------------

/// Causal decayed linear attention of every head: S_t = lambda S_{t-1} + k_t^T v_t (S_{-1} = 0, `[d_k, d_v]`),
/// o_t = q_t S_t, with lambda = exp(-slopes[h]) per head; no scale, no softmax. `q`, `k` `[T, H, d_k]`, `v`
/// `[T, H, d_v]`, `slopes` `[H]` (each >= 0 and finite) -> `out` `[T, H, d_v]`. The same outputs as
/// af::linear_attention_recurrent from a zero state, head by head. Saves nothing: the backward needs only the
/// inputs.
template <class T>
void linear_attention_forward(std::span<const T> q, std::span<const T> k, std::span<const T> v,
                              std::span<const T> slopes, const SeqDims& dims, std::span<T> out);

/// The gradients of linear_attention_forward, given `d_out` `[T, H, d_v]`: adds into `d_q`, `d_k` `[T, H, d_k]`,
/// `d_v` `[T, H, d_v]` and, unless it is empty (fixed slopes), `d_slopes` `[H]`. One pass forward in time
/// rebuilds the states for d_q and carries R_t = dS_t/dlambda = lambda R_{t-1} + S_{t-1} for the slope; one pass
/// backward carries dS_t = q_t^T dO_t + lambda dS_{t+1} for d_k and d_v. O(T d_k d_v) time per head and
/// O(d_k d_v) memory.
template <class T>
void linear_attention_backward(std::span<const T> q, std::span<const T> k, std::span<const T> v,
                               std::span<const T> slopes, const SeqDims& dims, std::span<const T> d_out,
                               std::span<T> d_q, std::span<T> d_k, std::span<T> d_v, std::span<T> d_slopes);

// --- The gated delta rule (chapter 14) ---------------------------------------------------------------------

/// Values the gated delta rule's forward saves for its backward: every head's state before the first step and
/// after each step, `[H, T + 1, d_k, d_v]`, that is H (T + 1) d_k d_v values of T (for H = 4, T = 256,
/// d_k = d_v = 32 in float: 4.2 MB per layer and sequence).
std::int64_t delta_rule_saved_states(const SeqDims& dims);

/// The gated delta rule of every head from a zero state, exactly as af::delta_rule_recurrent computes it with a
/// per-head log-decay: S' = exp(g_t) S_{t-1}, u_t = beta_t (v_t - S'^T k_t), S_t = S' + k_t u_t^T, o_t = S_t^T q_t.
/// `q`, `k` `[T, H, d_k]`, `v` `[T, H, d_v]`, `log_decay` `[T, H]` (each <= 0), `beta` `[T, H]` -> `out`
/// `[T, H, d_v]`, and `states` (delta_rule_saved_states(dims) values, `[H, T + 1, d_k, d_v]`) for the backward.
/// Value heads that share a key head (Qwen3-Next's GQA-like layout) are passed with q and k repeated per value
/// head; sum their gradients back onto the key head.
template <class T>
void delta_rule_forward(std::span<const T> q, std::span<const T> k, std::span<const T> v, std::span<const T> log_decay,
                        std::span<const T> beta, const SeqDims& dims, std::span<T> out, std::span<T> states);

/// The gradients of delta_rule_forward, given its inputs, the `states` it saved and `d_out` `[T, H, d_v]`: adds
/// into `d_q`, `d_k` `[T, H, d_k]`, `d_v` `[T, H, d_v]`, `d_log_decay` and `d_beta` `[T, H]`. Walks the steps
/// backwards carrying dS, the gradient of the state, in O(T d_k d_v) per head: from o_t = S_t^T q_t,
/// dS += q_t dO_t^T and dq_t = S_t dO_t; from the write, dk_t += dS u_t, du_t = dS^T k_t; from the correction,
/// dv_t = beta_t du_t, dbeta_t = du_t . (v_t - r_t), dr_t = -beta_t du_t with r_t = S'^T k_t, so dS' = dS + k_t
/// dr_t^T and dk_t += S' dr_t; from the decay, dg_t = <dS', S'> and dS_{t-1} = exp(g_t) dS'.
template <class T>
void delta_rule_backward(std::span<const T> q, std::span<const T> k, std::span<const T> v, std::span<const T> log_decay,
                         std::span<const T> beta, std::span<const T> states, const SeqDims& dims,
                         std::span<const T> d_out, std::span<T> d_q, std::span<T> d_k, std::span<T> d_v,
                         std::span<T> d_log_decay, std::span<T> d_beta);

// --- The pieces of a Gated DeltaNet layer (chapter 14) -----------------------------------------------------

/// The short causal depthwise convolution with SiLU of Qwen3-Next's layer over `x` `[T, C]` with `weight`
/// `[C, K]`: out[t, c] = silu(sum_{i < K} weight[c, i] x[t - K + 1 + i, c]), zeros before the first token.
/// Saves nothing: the backward recomputes the K-term sums.
template <class T>
void short_conv_forward(std::span<const T> x, std::span<const T> weight, std::int64_t steps, std::int64_t channels,
                        std::int64_t kernel, std::span<T> out);

/// The gradients of short_conv_forward, given `d_out` `[T, C]`: adds into `d_x` `[T, C]` and `d_weight` `[C, K]`,
/// with silu'(p) = sigmoid(p) (1 + p (1 - sigmoid(p))).
template <class T>
void short_conv_backward(std::span<const T> x, std::span<const T> weight, std::int64_t steps, std::int64_t channels,
                         std::int64_t kernel, std::span<const T> d_out, std::span<T> d_x, std::span<T> d_weight);

/// The epsilon of Qwen3-Next's (and the FLA library's) L2 norm of queries and keys.
inline constexpr double l2norm_eps = 1e-6;

/// Each of the `rows` rows of `x` `[rows, dim]` scaled to unit length, times `scale`: x s / sqrt(|x|^2 + eps)
/// (eps inside the root, as transformers' `l2norm` of Qwen3-Next computes it; the layer passes s = 1/sqrt(d_k)
/// for queries and 1 for keys). Writes `out` `[rows, dim]`.
template <class T>
void l2norm_forward(std::span<const T> x, std::int64_t rows, std::int64_t dim, double scale, double eps,
                    std::span<T> out);

/// The gradient of l2norm_forward: with n = sqrt(|x|^2 + eps), d_x += s/n (d_out - x (x . d_out) / n^2).
template <class T>
void l2norm_backward(std::span<const T> x, std::int64_t rows, std::int64_t dim, double scale, double eps,
                     std::span<const T> d_out, std::span<T> d_x);

/// The gated RMSNorm of Qwen3-Next's layer, per row of `o` `[rows, dim]` (one value head's output):
/// out = o / sqrt(mean(o^2) + eps) * weight * silu(z), with `z` `[rows, dim]` the gate and `weight` `[dim]`.
template <class T>
void gated_rms_norm_forward(std::span<const T> o, std::span<const T> z, std::span<const T> weight, std::int64_t rows,
                            std::int64_t dim, double eps, std::span<T> out);

/// The gradients of gated_rms_norm_forward: adds into `d_o`, `d_z` `[rows, dim]` and `d_weight` `[dim]`. With
/// n = o r (r = 1/sqrt(mean(o^2) + eps)) and dn = d_out weight silu(z): d_o = r (dn - n mean(dn n)).
template <class T>
void gated_rms_norm_backward(std::span<const T> o, std::span<const T> z, std::span<const T> weight, std::int64_t rows,
                             std::int64_t dim, double eps, std::span<const T> d_out, std::span<T> d_o, std::span<T> d_z,
                             std::span<T> d_weight);

/// softplus(x) = log(1 + e^x), and x itself above 20 (torch's threshold, which the layers keep).
double softplus(double x);
/// The derivative of softplus as torch takes it: sigmoid(x), and 1 above the threshold.
double softplus_grad(double x);

/// Gated DeltaNet's gates from the projections `a`, `b` `[T, H]` and the parameters `a_log`, `dt_bias` `[H]`:
/// log_decay = -exp(A_log) softplus(a + dt_bias) (always <= 0) and beta = sigmoid(b), both `[T, H]`.
template <class T>
void deltanet_gates_forward(std::span<const T> a, std::span<const T> b, std::span<const T> a_log,
                            std::span<const T> dt_bias, std::int64_t steps, std::int64_t heads, std::span<T> log_decay,
                            std::span<T> beta);

/// The gradients of deltanet_gates_forward, given `d_log_decay` and `d_beta` `[T, H]`: adds into `d_a`, `d_b`
/// `[T, H]` and `d_a_log`, `d_dt_bias` `[H]`. d(log_decay)/dA_log = log_decay; d(log_decay)/da =
/// d(log_decay)/d(dt_bias) = -exp(A_log) softplus'(a + dt_bias); dbeta/db = beta (1 - beta).
template <class T>
void deltanet_gates_backward(std::span<const T> a, std::span<const T> b, std::span<const T> a_log,
                             std::span<const T> dt_bias, std::int64_t steps, std::int64_t heads,
                             std::span<const T> d_log_decay, std::span<const T> d_beta, std::span<T> d_a,
                             std::span<T> d_b, std::span<T> d_a_log, std::span<T> d_dt_bias);

// --- DeepSeek V3.2's lightning indexer (chapter 11) --------------------------------------------------------

/// The sizes of the indexer: T queries against S >= T keys, query t at position S - T + t (so a training pass
/// over one sequence has S = T), `heads` index heads of `head_dim`. Index queries are `[T, heads, head_dim]`,
/// index keys `[S, head_dim]` (one per token, shared by the heads), head weights `[T, heads]`, scores `[T, S]`.
struct IndexerDims {
  std::int64_t queries = 0;   ///< T
  std::int64_t keys = 0;      ///< S
  std::int64_t heads = 0;     ///< index heads
  std::int64_t head_dim = 0;  ///< index head dimension
};

/// The index scores I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s]) for every query and key (unmasked, as
/// af::index_scores computes them; the scales heads^-1/2 head_dim^-1/2 are folded into w by the caller).
template <class T>
void indexer_scores_forward(std::span<const T> q, std::span<const T> k, std::span<const T> w, const IndexerDims& dims,
                            std::span<T> scores);

/// The gradients of indexer_scores_forward, given `d_scores` `[T, S]` (zero where a key is masked): adds into
/// `d_q` `[T, heads, head_dim]`, `d_k` `[S, head_dim]` and `d_w` `[T, heads]`. ReLU'(0) is taken as 0.
template <class T>
void indexer_scores_backward(std::span<const T> q, std::span<const T> k, std::span<const T> w, const IndexerDims& dims,
                             std::span<const T> d_scores, std::span<T> d_q, std::span<T> d_k, std::span<T> d_w);

/// The indexer's target, as DeepSeek-V3.2-Exp states it: the main attention's probabilities `probs`
/// `[heads, T, S]` (any number of heads) summed over the heads and L1-normalised over the keys of each query.
/// Writes `target` `[T, S]`; a row that sums to 0 stays 0. The target is a constant for the indexer's loss.
template <class T>
void indexer_target(std::span<const T> probs, std::int64_t heads, std::int64_t queries, std::int64_t keys,
                    std::span<T> target);

/// The indexer's training loss, sum over queries t of KL(p_t || softmax(I_t)) over the keys of a set A_t, with
/// p = `target` `[T, S]` (detached) and I = `scores` `[T, S]`. A_t is every key query t may see (the dense warm-up
/// stage) when `selected` is empty, otherwise the non-negative entries of row t of `selected` `[T, top_k]`
/// (the sparse stage; causal, no repeats). p is restricted to A_t and L1-normalised there (a no-op when it comes
/// from attention over the same keys), so each term is a KL divergence of two distributions and >= 0; a query
/// whose p has no mass on A_t adds nothing; terms with p = 0 count 0.
template <class T>
double indexer_loss_forward(std::span<const T> scores, std::span<const T> target, const IndexerDims& dims,
                            std::span<const std::int64_t> selected, std::int64_t top_k);

/// The gradient of indexer_loss_forward times `d_loss`: adds d_loss (softmax(I_t) - p_t / sum_{A_t} p) on A_t
/// into `d_scores` `[T, S]` (0 elsewhere).
template <class T>
void indexer_loss_backward(std::span<const T> scores, std::span<const T> target, const IndexerDims& dims,
                           std::span<const std::int64_t> selected, std::int64_t top_k, double d_loss,
                           std::span<T> d_scores);

/// For each query, the at most `top_k` keys it may see (causal) with the highest scores, best first; of equal
/// scores the lower position first; keys scored -inf are never chosen; rows with fewer keys are padded with -1.
/// Returns T top_k positions, row-major, as af::select_top_k does under the causal mask. Selection has no
/// gradient. Throws af::Error for top_k < 1 or a NaN score.
template <class T>
std::vector<std::int64_t> indexer_top_k(std::span<const T> scores, const IndexerDims& dims, std::int64_t top_k);

}  // namespace af::grad

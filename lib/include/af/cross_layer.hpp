#pragma once
/// @file cross_layer.hpp
/// Cross-layer KV sharing (chapter 15): some layers keep no cache of their own and attend over the keys and
/// values of an earlier layer. A layer that reads another's cache projects only its queries; the cache, the key
/// and value projections and the bytes they would write are gone, while its queries, its attention over the
/// shared entries and its output projection remain.
///
/// Two rules are given here. Gemma 3n's (Hugging Face transformers 5.17, `Gemma3nTextAttention`): the last
/// `num_kv_shared_layers` layers read the cache of the last layer before them that has the same attention type
/// (sliding or full). Cross-Layer Attention's (Brandon et al. 2024): each group of `factor` adjacent layers reads
/// the cache of its first layer. The execution part is Gemma 3n's attention layer: an RMSNorm with a gain on each
/// query and key head, an RMSNorm without gain on each value head, RoPE with a base per attention type, and a
/// softmax scale of 1.

#include "af/accounting.hpp"
#include "af/grouped_attention.hpp"
#include "af/numeric.hpp"
#include "af/sliding_window.hpp"
#include "af/tensor.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace af {

/// The attention type of one layer: windowed (a ring of `window` entries) or full (every earlier token).
enum class LayerKind { sliding, full };

/// "sliding_attention" or "full_attention", the names of transformers' `layer_types`.
std::string_view name_of(LayerKind kind);
/// The kind named "sliding_attention" or "full_attention"; throws af::Error naming any other string.
LayerKind layer_kind_named(std::string_view name);

/// Which layer keeps a cache and which layer's cache each layer reads.
struct KvSharingPlan {
  std::vector<LayerKind> kinds;      ///< per layer
  std::vector<std::int64_t> source;  ///< per layer: the layer whose cache it reads (itself when it keeps one)

  std::int64_t layers() const { return static_cast<std::int64_t>(kinds.size()); }
  /// Whether `layer` keeps (and projects into) a cache of its own.
  bool owns(std::int64_t layer) const;
  /// Layers that keep a cache, in all and of one kind.
  std::int64_t owners() const;
  std::int64_t owners(LayerKind kind) const;
  /// Layers that read a cache they did not write.
  std::int64_t readers() const { return layers() - owners(); }
  /// Throws af::Error naming the layer when the two lists differ in length, a layer reads a later layer or one
  /// that does not keep a cache, or a layer reads a cache of the other kind.
  void validate() const;
};

/// Every layer keeps its own cache.
KvSharingPlan no_kv_sharing(std::vector<LayerKind> kinds);
/// Gemma 3n's rule: layers from L - `shared` on read the cache of the last layer before L - `shared` of their own
/// kind. Throws af::Error when `shared` is negative, not below the layer count (transformers then silently shares
/// nothing), or leaves a kind without an earlier layer to read.
KvSharingPlan gemma3n_kv_sharing(std::vector<LayerKind> kinds, std::int64_t shared);
/// Cross-Layer Attention: layers g f .. g f + f - 1 read layer g f's cache (`factor` f; the last group may be
/// shorter). Throws af::Error for f < 1 or a group that mixes kinds.
KvSharingPlan cla_kv_sharing(std::vector<LayerKind> kinds, std::int64_t factor);
/// Gemma 3n's attention pattern over `layers` layers: four sliding layers, then a full one (layer i is full when
/// (i + 1) mod 5 = 0), as transformers' default `layer_types` and google-deepmind/gemma's pattern have it.
std::vector<LayerKind> gemma3n_layer_kinds(std::int64_t layers);

/// The cache accounting of a grouped-query stack whose layers may share caches.
struct CrossLayerModel {
  std::string name;
  std::string source;
  KvSharingPlan plan;
  std::int64_t heads = 0;     ///< query heads per layer
  std::int64_t kv_heads = 0;  ///< KV heads per layer
  std::int64_t head_dim = 0;
  std::int64_t window = 0;  ///< tokens a sliding layer keeps and reads
  DType dtype = DType::bf16;

  /// Throws af::Error naming the first size out of range or a bad plan.
  void validate() const;
  /// Bytes one token's K and V take in one cache: 2 G d bytes_of(dtype).
  std::int64_t bytes_per_token_per_cache() const;
  /// Entries one layer of `kind` keeps (and one decode query reads) at context t: min(t, W) or t.
  std::int64_t stored_tokens(LayerKind kind, std::int64_t t) const;
  /// Bytes one sequence holds after t tokens: the caches of the owners only.
  std::int64_t bytes_stored(std::int64_t t) const;
  /// Cached entries one decode step reads at context t, and their bytes: every layer reads, owner or not.
  std::int64_t entries_read(std::int64_t t) const;
  std::int64_t bytes_read(std::int64_t t) const;
  /// Bytes written to the caches per generated token: one K and V per owner.
  std::int64_t bytes_written_per_token() const;
  /// Multiply-adds of the projections per token: q and o in every layer, k and v in the owners (hidden = H d).
  std::int64_t projection_macs_per_token() const;
  /// The same model with every layer keeping its own cache.
  CrossLayerModel unshared() const;
};

/// Gemma 3n E2B and E4B (text decoder): 30 and 35 layers, the last 10 and 15 reading earlier caches; 8 query
/// heads, 2 KV heads of 256; sliding window 512; four sliding layers then one full (google-deepmind/gemma,
/// gm/nn/gemma3n/_gemma3n.py: 20 unshared KV layers in both; transformers' Gemma3nTextConfig defaults for E4B).
CrossLayerModel gemma3n_e2b(DType dtype = DType::bf16);
CrossLayerModel gemma3n_e4b(DType dtype = DType::bf16);

/// The sizes of one Gemma 3n attention layer.
struct Gemma3nShape {
  GroupedShape grouped;           ///< hidden, H, G, d (d even)
  std::int64_t window = 0;        ///< sliding_window
  double local_rope_base = 1e4;   ///< rope_theta of sliding layers
  double global_rope_base = 1e6;  ///< rope_theta of full layers
  double norm_eps = 1e-6;         ///< rms_norm_eps of the q, k and v norms
  /// Throws af::Error naming the first value out of range.
  void validate() const;
  /// The window of a layer of `kind`: `window`, or no limit for a full layer.
  std::int64_t window_of(LayerKind kind) const;
};

/// One layer's parameters under transformers' names. A layer that reads another's cache has no k_proj, v_proj
/// or k_norm (empty tensors).
struct Gemma3nWeights {
  Tensor q_proj;  ///< [H d, hidden]
  Tensor q_norm;  ///< [d], the gain itself (not 1 + w)
  Tensor k_proj;  ///< [G d, hidden] or empty
  Tensor k_norm;  ///< [d] or empty
  Tensor v_proj;  ///< [G d, hidden] or empty
  Tensor o_proj;  ///< [hidden, H d]
  bool projects_kv() const { return !k_proj.empty(); }
  /// Throws af::Error naming the first tensor whose shape disagrees with `shape`, or a partial set of K/V tensors.
  void validate(const Gemma3nShape& shape) const;
};

/// The queries of `x [T, hidden]` at `positions`: projected, RMS-normalised per head with q_norm, rotated (half
/// split, the base of `kind`). `[T, H d]`.
Tensor gemma3n_queries(ConstMatrix x, std::span<const std::int64_t> positions, const Gemma3nShape& shape,
                       LayerKind kind, const Gemma3nWeights& weights);

/// Keys and values `[T, G d]` each: keys normalised with k_norm and rotated, values RMS-normalised without gain.
/// Throws af::Error for a layer without K/V projections.
std::pair<Tensor, Tensor> gemma3n_keys_values(ConstMatrix x, std::span<const std::int64_t> positions,
                                              const Gemma3nShape& shape, LayerKind kind, const Gemma3nWeights& weights);

/// What one cache hands to the layers that read it during one call: the entries it held before the call and the
/// call's new ones, `[m, G d]` each, with their sequence indices. A ring cannot serve a prompt longer than its
/// window once the prompt has been written into it; the hand-off keeps the whole call's keys.
struct KvHandoff {
  Tensor keys;
  Tensor values;
  std::vector<std::int64_t> index;
};

/// The hand-off of `cache` for new keys and values `[n, G d]` (not yet appended).
KvHandoff hand_off(const RollingKvCache& cache, ConstMatrix new_keys, ConstMatrix new_values);

/// The attention of queries `q [T, H d]` at sequence indices `query_index` over a hand-off, under the window of
/// `kind`, with softmax scale 1, projected by o_proj to `[T, hidden]`.
Tensor gemma3n_attend(ConstMatrix q, std::span<const std::int64_t> query_index, const KvHandoff& kv,
                      const Gemma3nShape& shape, LayerKind kind, const Gemma3nWeights& weights);

/// The caches of a stack under a plan: one ring per owner (`window` slots for a sliding layer, `capacity` for a
/// full one, which then never wraps), none for a reader.
class CrossLayerKvCache {
 public:
  /// Throws af::Error for a bad plan or sizes < 1.
  CrossLayerKvCache(const KvSharingPlan& plan, std::int64_t kv_heads, std::int64_t head_dim, std::int64_t window,
                    std::int64_t capacity);
  /// The cache layer `layer` reads (its own or its source's).
  const RollingKvCache& read_by(std::int64_t layer) const;
  /// Appends the next n tokens' keys and values to an owner's cache; throws af::Error for a reader or when a full
  /// layer's capacity would be passed.
  void append(std::int64_t owner, ConstMatrix keys, ConstMatrix values);
  /// Tokens written so far to the first layer's cache (the sequence index of the next token before a call).
  std::int64_t seen() const { return rings_.front().seen(); }
  /// Bytes all caches hold now (float32 keys and values).
  std::int64_t bytes_held() const;
  /// Caches kept: one per owner.
  std::int64_t caches() const { return static_cast<std::int64_t>(rings_.size()); }

 private:
  KvSharingPlan plan_;
  std::int64_t capacity_;
  std::vector<std::int64_t> slot_;  // per layer: index of its owner's ring in rings_
  std::vector<RollingKvCache> rings_;
};

/// A stack of Gemma 3n attention layers with residual connections, h <- h + layer(h), over the next tokens
/// `x [T, hidden]` at `positions`: each owner projects its keys and values, hands them off and appends them to its
/// cache; each reader attends over its source's hand-off of the same call. Returns h `[T, hidden]`.
Tensor cross_layer_stack(ConstMatrix x, std::span<const std::int64_t> positions, const Gemma3nShape& shape,
                         const KvSharingPlan& plan, std::span<const Gemma3nWeights> layers, CrossLayerKvCache& cache);

}  // namespace af

#include "af/cross_layer.hpp"

#include "af/error.hpp"
#include "af/linalg.hpp"
#include "af/rope.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace af {

std::string_view name_of(LayerKind kind) { return kind == LayerKind::sliding ? "sliding_attention" : "full_attention"; }

LayerKind layer_kind_named(std::string_view name) {
  if (name == "sliding_attention") return LayerKind::sliding;
  if (name == "full_attention") return LayerKind::full;
  fail("layer type \"{}\" (expected \"sliding_attention\" or \"full_attention\")", name);
}

bool KvSharingPlan::owns(std::int64_t layer) const {
  require(layer >= 0 && layer < layers(), "KvSharingPlan: layer {} (expected 0..{})", layer, layers() - 1);
  return source[static_cast<std::size_t>(layer)] == layer;
}

std::int64_t KvSharingPlan::owners() const {
  std::int64_t n = 0;
  for (std::int64_t l = 0; l < layers(); ++l) n += owns(l);
  return n;
}

std::int64_t KvSharingPlan::owners(LayerKind kind) const {
  std::int64_t n = 0;
  for (std::int64_t l = 0; l < layers(); ++l) n += owns(l) && kinds[static_cast<std::size_t>(l)] == kind;
  return n;
}

void KvSharingPlan::validate() const {
  require(!kinds.empty(), "KvSharingPlan: no layers (expected at least one)");
  require(source.size() == kinds.size(), "KvSharingPlan: {} sources for {} layers (expected one per layer)",
          source.size(), kinds.size());
  for (std::int64_t l = 0; l < layers(); ++l) {
    const std::int64_t s = source[static_cast<std::size_t>(l)];
    require(s >= 0 && s <= l, "KvSharingPlan: layer {} reads layer {} (expected a layer in 0..{})", l, s, l);
    require(source[static_cast<std::size_t>(s)] == s,
            "KvSharingPlan: layer {} reads layer {}, which keeps no cache (it reads layer {})", l, s,
            source[static_cast<std::size_t>(s)]);
    require(kinds[static_cast<std::size_t>(s)] == kinds[static_cast<std::size_t>(l)],
            "KvSharingPlan: layer {} ({}) reads layer {} ({}) (expected a cache of its own kind)", l,
            name_of(kinds[static_cast<std::size_t>(l)]), s, name_of(kinds[static_cast<std::size_t>(s)]));
  }
}

KvSharingPlan no_kv_sharing(std::vector<LayerKind> kinds) {
  KvSharingPlan plan{std::move(kinds), {}};
  for (std::int64_t l = 0; l < plan.layers(); ++l) plan.source.push_back(l);
  plan.validate();
  return plan;
}

// [gemma3n-rule]
KvSharingPlan gemma3n_kv_sharing(std::vector<LayerKind> kinds, std::int64_t shared) {
  const auto L = static_cast<std::int64_t>(kinds.size());
  require(shared >= 0 && shared < L,
          "num_kv_shared_layers {} (expected 0..{} for {} layers: at least one layer must "
          "keep a cache)",
          shared, L - 1, L);
  KvSharingPlan plan = no_kv_sharing(std::move(kinds));
  const std::int64_t first_shared = L - shared;
  for (std::int64_t l = first_shared; l < L; ++l) {
    std::int64_t source = first_shared - 1;  // the last layer before the shared ones with the same kind
    while (source >= 0 && plan.kinds[static_cast<std::size_t>(source)] != plan.kinds[static_cast<std::size_t>(l)])
      --source;
    require(source >= 0, "num_kv_shared_layers {}: layer {} ({}) has no {} layer before layer {} to read", shared, l,
            name_of(plan.kinds[static_cast<std::size_t>(l)]), name_of(plan.kinds[static_cast<std::size_t>(l)]),
            first_shared);
    plan.source[static_cast<std::size_t>(l)] = source;
  }
  plan.validate();
  return plan;
}
// [/gemma3n-rule]

KvSharingPlan cla_kv_sharing(std::vector<LayerKind> kinds, std::int64_t factor) {
  require(factor >= 1, "CLA sharing factor {} (expected >= 1 layers per cache)", factor);
  KvSharingPlan plan = no_kv_sharing(std::move(kinds));
  for (std::int64_t l = 0; l < plan.layers(); ++l) {
    const std::int64_t first = l - l % factor;
    require(plan.kinds[static_cast<std::size_t>(first)] == plan.kinds[static_cast<std::size_t>(l)],
            "CLA sharing factor {}: layer {} ({}) and layer {} ({}) share a cache (expected one kind per group)",
            factor, first, name_of(plan.kinds[static_cast<std::size_t>(first)]), l,
            name_of(plan.kinds[static_cast<std::size_t>(l)]));
    plan.source[static_cast<std::size_t>(l)] = first;
  }
  plan.validate();
  return plan;
}

std::vector<LayerKind> gemma3n_layer_kinds(std::int64_t layers) {
  require(layers >= 1, "layers {} (expected >= 1)", layers);
  std::vector<LayerKind> kinds;
  for (std::int64_t i = 0; i < layers; ++i) kinds.push_back((i + 1) % 5 == 0 ? LayerKind::full : LayerKind::sliding);
  return kinds;
}

void CrossLayerModel::validate() const {
  require(heads >= 1 && kv_heads >= 1 && head_dim >= 1 && window >= 1,
          "{}: heads {}, kv_heads {}, head_dim {}, window {} (expected all >= 1)", name, heads, kv_heads, head_dim,
          window);
  require(heads % kv_heads == 0, "{}: {} heads are not a multiple of {} KV heads", name, heads, kv_heads);
  plan.validate();
}

std::int64_t CrossLayerModel::bytes_per_token_per_cache() const { return 2 * kv_heads * head_dim * bytes_of(dtype); }

std::int64_t CrossLayerModel::stored_tokens(LayerKind kind, std::int64_t t) const {
  require(t >= 0, "{}: context {} (expected >= 0)", name, t);
  return kind == LayerKind::sliding ? std::min(t, window) : t;
}

// [bytes-held]
std::int64_t CrossLayerModel::bytes_stored(std::int64_t t) const {
  std::int64_t entries = 0;
  for (std::int64_t l = 0; l < plan.layers(); ++l)
    if (plan.owns(l)) entries += stored_tokens(plan.kinds[static_cast<std::size_t>(l)], t);
  return entries * bytes_per_token_per_cache();
}

std::int64_t CrossLayerModel::entries_read(std::int64_t t) const {
  std::int64_t entries = 0;
  for (std::int64_t l = 0; l < plan.layers(); ++l) entries += stored_tokens(plan.kinds[static_cast<std::size_t>(l)], t);
  return entries;
}
// [/bytes-held]

std::int64_t CrossLayerModel::bytes_read(std::int64_t t) const { return entries_read(t) * bytes_per_token_per_cache(); }

std::int64_t CrossLayerModel::bytes_written_per_token() const { return plan.owners() * bytes_per_token_per_cache(); }

std::int64_t CrossLayerModel::projection_macs_per_token() const {
  const std::int64_t hidden = heads * head_dim, q_and_o = 2 * hidden * heads * head_dim;
  const std::int64_t k_and_v = 2 * hidden * kv_heads * head_dim;
  return plan.layers() * q_and_o + plan.owners() * k_and_v;
}

CrossLayerModel CrossLayerModel::unshared() const {
  CrossLayerModel m = *this;
  m.name += ", no sharing";
  m.plan = no_kv_sharing(plan.kinds);
  return m;
}

namespace {

CrossLayerModel gemma3n(std::string name, std::int64_t layers, std::int64_t shared, DType dtype) {
  CrossLayerModel m{std::move(name),
                    "google-deepmind/gemma gm/nn/gemma3n/_gemma3n.py (num_layers, 20 unshared KV layers, 8 heads, 2 KV "
                    "heads of 256, window 512, 4 local : 1 global)",
                    gemma3n_kv_sharing(gemma3n_layer_kinds(layers), shared),
                    8,
                    2,
                    256,
                    512,
                    dtype};
  m.validate();
  return m;
}

}  // namespace

CrossLayerModel gemma3n_e2b(DType dtype) { return gemma3n("Gemma 3n E2B", 30, 10, dtype); }
CrossLayerModel gemma3n_e4b(DType dtype) { return gemma3n("Gemma 3n E4B", 35, 15, dtype); }

void Gemma3nShape::validate() const {
  grouped.validate();
  require(grouped.head_dim % 2 == 0, "Gemma3nShape: head_dim {} is odd (expected an even size: RoPE rotates pairs)",
          grouped.head_dim);
  require(window >= 1, "Gemma3nShape: sliding window {} (expected >= 1)", window);
  require(
      std::isfinite(local_rope_base) && local_rope_base > 1 && std::isfinite(global_rope_base) && global_rope_base > 1,
      "Gemma3nShape: RoPE bases {} and {} (expected finite and > 1)", local_rope_base, global_rope_base);
  require(std::isfinite(norm_eps) && norm_eps > 0, "Gemma3nShape: norm eps {} (expected > 0)", norm_eps);
}

std::int64_t Gemma3nShape::window_of(LayerKind kind) const {
  return kind == LayerKind::sliding ? window : std::numeric_limits<std::int64_t>::max();
}

void Gemma3nWeights::validate(const Gemma3nShape& s) const {
  s.validate();
  const GroupedShape& g = s.grouped;
  const auto check = [](const char* name, const Tensor& t, const Shape& expected) {
    if (t.shape() != expected) fail("Gemma3nWeights: {} is {} (expected {})", name, t.shape().str(), expected.str());
  };
  check("q_proj", q_proj, Shape{g.heads * g.head_dim, g.hidden});
  check("q_norm", q_norm, Shape{g.head_dim});
  check("o_proj", o_proj, Shape{g.hidden, g.heads * g.head_dim});
  require(k_proj.empty() == v_proj.empty() && k_proj.empty() == k_norm.empty(),
          "Gemma3nWeights: k_proj {}, v_proj {}, k_norm {} (expected all three or none)",
          k_proj.empty() ? "absent" : "present", v_proj.empty() ? "absent" : "present",
          k_norm.empty() ? "absent" : "present");
  if (projects_kv()) {
    check("k_proj", k_proj, Shape{g.kv_heads * g.head_dim, g.hidden});
    check("v_proj", v_proj, Shape{g.kv_heads * g.head_dim, g.hidden});
    check("k_norm", k_norm, Shape{g.head_dim});
  }
}

namespace {

// x / sqrt(mean(x^2) + eps), times `gain` when one is given, over each head of d values of each row, in place.
void rms_norm_heads(Matrix x, std::int64_t d, std::span<const float> gain, double eps) {
  for (std::int64_t r = 0; r < x.rows; ++r)
    for (std::int64_t h = 0; h < x.cols / d; ++h) {
      float* v = x.row(r).data() + h * d;
      double squares = 0;
      for (std::int64_t i = 0; i < d; ++i) squares += static_cast<double>(v[i]) * v[i];
      const double inv = 1.0 / std::sqrt(squares / static_cast<double>(d) + eps);
      for (std::int64_t i = 0; i < d; ++i)
        v[i] = static_cast<float>(v[i] * inv * (gain.empty() ? 1.0 : gain[static_cast<std::size_t>(i)]));
    }
}

Rope rope_of(const Gemma3nShape& s, LayerKind kind) {
  return Rope(s.grouped.head_dim, kind == LayerKind::sliding ? s.local_rope_base : s.global_rope_base,
              RopeLayout::half_split);
}

void require_rows(ConstMatrix x, std::span<const std::int64_t> positions, const Gemma3nShape& s, const char* what) {
  require(x.cols == s.grouped.hidden && x.rows >= 1, "{}: input {} (expected [T, {}])", what, x.shape_str(),
          s.grouped.hidden);
  require(static_cast<std::int64_t>(positions.size()) == x.rows, "{}: {} positions for {} tokens (expected one each)",
          what, positions.size(), x.rows);
}

}  // namespace

// [queries]
Tensor gemma3n_queries(ConstMatrix x, std::span<const std::int64_t> positions, const Gemma3nShape& s, LayerKind kind,
                       const Gemma3nWeights& w) {
  w.validate(s);
  require_rows(x, positions, s, "gemma3n_queries");
  Tensor q = linear(x, w.q_proj.matrix());  // [T, H d]
  rms_norm_heads(q.matrix(), s.grouped.head_dim, w.q_norm.values(), s.norm_eps);
  rope_of(s, kind).rotate_rows(q.matrix(), positions);
  return q;
}
// [/queries]

// [keys-values]
std::pair<Tensor, Tensor> gemma3n_keys_values(ConstMatrix x, std::span<const std::int64_t> positions,
                                              const Gemma3nShape& s, LayerKind kind, const Gemma3nWeights& w) {
  w.validate(s);
  require_rows(x, positions, s, "gemma3n_keys_values");
  require(w.projects_kv(), "gemma3n_keys_values: the layer has no k_proj and v_proj (it reads another layer's cache)");
  Tensor k = linear(x, w.k_proj.matrix()), v = linear(x, w.v_proj.matrix());  // [T, G d] each
  rms_norm_heads(k.matrix(), s.grouped.head_dim, w.k_norm.values(), s.norm_eps);
  rms_norm_heads(v.matrix(), s.grouped.head_dim, {}, s.norm_eps);  // no gain on values
  rope_of(s, kind).rotate_rows(k.matrix(), positions);
  return {std::move(k), std::move(v)};
}
// [/keys-values]

// [hand-off]
KvHandoff hand_off(const RollingKvCache& cache, ConstMatrix new_keys, ConstMatrix new_values) {
  const std::int64_t width = cache.kv_heads() * cache.head_dim(), held = cache.size(), n = new_keys.rows;
  require(new_keys.cols == width && new_values.cols == width && new_values.rows == n,
          "hand_off: new keys {} and values {} (expected [n, {}] each)", new_keys.shape_str(), new_values.shape_str(),
          width);
  KvHandoff kv{Tensor(Shape{held + n, width}), Tensor(Shape{held + n, width}), cache.slot_indices()};
  std::ranges::copy(to_tensor(cache.keys()).values(), kv.keys.data());
  std::ranges::copy(to_tensor(cache.values()).values(), kv.values.data());
  std::ranges::copy(to_tensor(new_keys).values(), kv.keys.data() + held * width);
  std::ranges::copy(to_tensor(new_values).values(), kv.values.data() + held * width);
  for (std::int64_t i = 0; i < n; ++i) kv.index.push_back(cache.seen() + i);
  return kv;
}
// [/hand-off]

Tensor gemma3n_attend(ConstMatrix q, std::span<const std::int64_t> query_index, const KvHandoff& kv,
                      const Gemma3nShape& s, LayerKind kind, const Gemma3nWeights& w) {
  w.validate(s);
  require(static_cast<std::int64_t>(kv.index.size()) == kv.keys.dim(0) && kv.keys.shape() == kv.values.shape(),
          "gemma3n_attend: hand-off of keys {}, values {} and {} indices (expected one index per row)",
          kv.keys.shape().str(), kv.values.shape().str(), kv.index.size());
  const Tensor attended = windowed_grouped_attend(q, query_index, kv.keys.matrix(), kv.values.matrix(), kv.index,
                                                  s.grouped, s.window_of(kind), AttentionOptions{true, 1.0});
  return linear(attended.matrix(), w.o_proj.matrix());
}

CrossLayerKvCache::CrossLayerKvCache(const KvSharingPlan& plan, std::int64_t kv_heads, std::int64_t head_dim,
                                     std::int64_t window, std::int64_t capacity)
    : plan_(plan), capacity_(capacity) {
  plan_.validate();
  require(window >= 1 && capacity >= 1, "CrossLayerKvCache: window {}, capacity {} (expected both >= 1)", window,
          capacity);
  slot_.assign(static_cast<std::size_t>(plan_.layers()), -1);
  for (std::int64_t l = 0; l < plan_.layers(); ++l)
    if (plan_.owns(l)) {
      slot_[static_cast<std::size_t>(l)] = static_cast<std::int64_t>(rings_.size());
      rings_.emplace_back(plan_.kinds[static_cast<std::size_t>(l)] == LayerKind::sliding ? window : capacity, kv_heads,
                          head_dim);
    }
  for (std::int64_t l = 0; l < plan_.layers(); ++l)
    slot_[static_cast<std::size_t>(l)] = slot_[static_cast<std::size_t>(plan_.source[static_cast<std::size_t>(l)])];
}

const RollingKvCache& CrossLayerKvCache::read_by(std::int64_t layer) const {
  require(layer >= 0 && layer < plan_.layers(), "CrossLayerKvCache: layer {} (expected 0..{})", layer,
          plan_.layers() - 1);
  return rings_[static_cast<std::size_t>(slot_[static_cast<std::size_t>(layer)])];
}

void CrossLayerKvCache::append(std::int64_t owner, ConstMatrix keys, ConstMatrix values) {
  require(plan_.owns(owner),
          "CrossLayerKvCache::append: layer {} reads layer {}'s cache (expected a layer that keeps "
          "one)",
          owner, plan_.source[static_cast<std::size_t>(owner)]);
  RollingKvCache& ring = rings_[static_cast<std::size_t>(slot_[static_cast<std::size_t>(owner)])];
  require(plan_.kinds[static_cast<std::size_t>(owner)] == LayerKind::sliding || ring.seen() + keys.rows <= capacity_,
          "CrossLayerKvCache::append: {} + {} tokens in full layer {} (expected at most the capacity {})", ring.seen(),
          keys.rows, owner, capacity_);
  ring.append(keys, values);
}

std::int64_t CrossLayerKvCache::bytes_held() const {
  std::int64_t bytes = 0;
  for (const RollingKvCache& ring : rings_) bytes += ring.bytes_held();
  return bytes;
}

// [stack]
Tensor cross_layer_stack(ConstMatrix x, std::span<const std::int64_t> positions, const Gemma3nShape& s,
                         const KvSharingPlan& plan, std::span<const Gemma3nWeights> layers, CrossLayerKvCache& cache) {
  plan.validate();
  require(static_cast<std::int64_t>(layers.size()) == plan.layers(),
          "cross_layer_stack: {} layers of weights for a plan of {} layers", layers.size(), plan.layers());
  require_rows(x, positions, s, "cross_layer_stack");
  std::vector<std::int64_t> query_index;
  for (std::int64_t i = 0; i < x.rows; ++i) query_index.push_back(cache.seen() + i);
  std::vector<KvHandoff> handoffs(layers.size());  // filled at each owner, read by the layers after it
  Tensor h = to_tensor(x);
  for (std::int64_t l = 0; l < plan.layers(); ++l) {
    const auto at = static_cast<std::size_t>(l);
    const LayerKind kind = plan.kinds[at];
    const Gemma3nWeights& w = layers[at];
    require(w.projects_kv() == plan.owns(l), "cross_layer_stack: layer {} {} K/V projections (the plan says it {})", l,
            w.projects_kv() ? "has" : "lacks", plan.owns(l) ? "keeps a cache" : "reads another layer's cache");
    if (plan.owns(l)) {
      const auto [k, v] = gemma3n_keys_values(h.matrix(), positions, s, kind, w);
      handoffs[at] = hand_off(cache.read_by(l), k.matrix(), v.matrix());
      cache.append(l, k.matrix(), v.matrix());
    }
    const Tensor q = gemma3n_queries(h.matrix(), positions, s, kind, w);
    const Tensor out =
        gemma3n_attend(q.matrix(), query_index, handoffs[static_cast<std::size_t>(plan.source[at])], s, kind, w);
    for (std::int64_t i = 0; i < h.numel(); ++i) h.data()[i] += out.data()[i];
  }
  return h;
}
// [/stack]

}  // namespace af

#pragma once
/// @file train.hpp
/// Training tiny decoder models from scratch: a flat parameter store, the ops of a Llama-style decoder with
/// hand-written backward passes, a decoder whose token mixer is pluggable, AdamW with a cosine schedule and
/// gradient clipping, and a training step that runs the sequences of a batch on threads.
///
/// Every op is a free function template over the scalar type `T` (instantiated for `float` and `double`), so
/// that the code that trains in float32 is the code whose gradients are checked against finite differences
/// in float64. Conventions shared by every op:
/// - matrices are row-major `[rows, cols]` views (af::train::View), a sequence's activations `[T, D]`;
/// - a forward writes (overwrites) its outputs and saves what its backward needs in arrays the caller owns;
/// - a backward *adds* to every gradient it produces, inputs and parameters alike, so that residual branches
///   and shared inputs need no extra buffers; the caller zeroes gradients once.

#include "af/error.hpp"

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace af::train {

// ---------------------------------------------------------------------------------------------------------
// Views and the parameter store
// ---------------------------------------------------------------------------------------------------------

/// A contiguous row-major matrix of `rows` x `cols` values of type `T` (`float`, `double` or a const one).
template <class T>
struct View {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;

  T& operator()(std::int64_t row, std::int64_t col) const { return data[row * cols + col]; }
  /// The first value of row `r`.
  T* row(std::int64_t r) const { return data + r * cols; }
  std::int64_t size() const { return rows * cols; }
  operator View<const T>() const  // NOLINT: implicit, as T* to const T*
      requires(!std::is_const_v<T>) {
    return {data, rows, cols};
  }
};

/// `values` as a `[rows, cols]` matrix; throws af::Error when it does not hold exactly rows * cols values.
template <class T>
View<T> as_matrix(std::span<T> values, std::int64_t rows, std::int64_t cols) {
  require(rows >= 0 && cols >= 0 && static_cast<std::int64_t>(values.size()) == rows * cols,
          "as_matrix: {} values cannot be viewed as [{}, {}] (expected rows * cols values)", values.size(), rows, cols);
  return {values.data(), rows, cols};
}

/// How a parameter is initialised (af::train::initial_parameters).
enum class Init {
  normal,             ///< normal(0, stddev): embeddings, input projections, the LM head
  output_projection,  ///< normal(0, stddev / sqrt(2 L)): projections that write into the residual stream
  ones,               ///< 1: RMSNorm gains
  zeros,              ///< 0: biases and gates that should start closed
  fan_in_uniform,     ///< uniform(-1/sqrt(n), 1/sqrt(n)), n = size / shape[0]: torch's default for nn.Conv1d
  log_decay_rate,     ///< log(uniform(0.01, 16)): Qwen3-Next's A_log, decay rates exp(A_log) in [0.01, 16)
  time_step_bias,     ///< log(expm1(dt)), dt log-uniform in [0.001, 0.1]: softplus(bias) = dt (Mamba's dt_bias)
};

/// One named parameter: a slice of the flat parameter vector.
struct Slice {
  std::string name;                 ///< e.g. `layers.0.mixer.q_proj.weight`
  std::int64_t offset = 0;          ///< first value in the flat vector
  std::vector<std::int64_t> shape;  ///< row-major; `[out, in]` for a projection
  std::int64_t size = 0;            ///< product of shape
  Init init = Init::normal;         ///< how initial_parameters fills it
  bool decay = true;                ///< whether AdamW applies weight decay to it

  /// The slice of `params` (which must hold the whole layout) as a matrix: `[shape[0], rest]`, or `[1, n]`
  /// for a vector.
  template <class T>
  View<T> matrix(std::span<T> params) const {
    require(static_cast<std::int64_t>(params.size()) >= offset + size,
            "Slice::matrix: {} has values [{}, {}) but the parameter vector holds {}", name, offset, offset + size,
            params.size());
    const std::int64_t rows = shape.size() >= 2 ? shape[0] : 1;
    return {params.data() + offset, rows, size / rows};
  }
  /// The slice of `params` as a flat span.
  template <class T>
  std::span<T> values(std::span<T> params) const {
    return {matrix(params).data, static_cast<std::size_t>(size)};
  }
};

/// The layout of a model's parameters: named slices of one flat vector, in the order they were added. A
/// gradient (and each optimizer moment) is a vector of the same size with the same layout.
class Layout {
 public:
  /// Appends a parameter and returns its index. Throws af::Error for an empty or duplicate name, an empty
  /// shape or a dimension < 1.
  std::size_t add(const std::string& name, std::vector<std::int64_t> shape, Init init, bool decay);
  /// The parameter called `name`; throws af::Error naming it when there is none.
  const Slice& slice(const std::string& name) const;
  const Slice& slice(std::size_t index) const { return slices_.at(index); }
  bool contains(const std::string& name) const;
  const std::vector<Slice>& slices() const { return slices_; }
  /// Values in all: the size of a parameter or gradient vector.
  std::int64_t size() const { return size_; }

 private:
  std::vector<Slice> slices_;
  std::int64_t size_ = 0;
};

/// Fills a parameter vector for `layout`, slice by slice in layout order, drawing from af::Rng(seed) with
/// normals for Init::normal (standard deviation `stddev`) and Init::output_projection (`stddev / sqrt(2
/// layers)`, GPT-2's scaling, so the residual stream's variance does not grow with depth), uniforms for
/// Init::fan_in_uniform, Init::log_decay_rate and Init::time_step_bias (their logarithms and exponentials from basic
/// IEEE-754 operations only), ones and zeros for the
/// others. Deterministic on every platform. Throws af::Error for stddev < 0 or layers < 1.
std::vector<float> initial_parameters(const Layout& layout, std::uint64_t seed, double stddev, std::int64_t layers);

// ---------------------------------------------------------------------------------------------------------
// Ops: forward and backward
// ---------------------------------------------------------------------------------------------------------

/// out[t] = table[tokens[t]]. `table` is `[V, D]`, `out` `[T, D]`. Throws af::Error for a token outside
/// [0, V) or mismatched shapes.
template <class T>
void embedding_forward(View<const T> table, std::span<const std::int32_t> tokens, View<T> out);
/// dtable[tokens[t]] += dout[t].
template <class T>
void embedding_backward(std::span<const std::int32_t> tokens, View<const T> dout, View<T> dtable);

/// RMSNorm with gain w: y = x w / sqrt(mean(x^2) + eps), row by row. Saves r = 1/sqrt(mean(x^2) + eps) per
/// row in `inv_rms` [T].
template <class T>
void rms_norm_forward(View<const T> x, std::span<const T> gain, T eps, View<T> y, std::span<T> inv_rms);
/// dx += r (w dy) - x r^3 mean(w dy x);  dgain += sum over rows of dy x r.
template <class T>
void rms_norm_backward(View<const T> x, std::span<const T> gain, std::span<const T> inv_rms, View<const T> dy,
                       View<T> dx, std::span<T> dgain);

/// y = x W^T: `x` [T, in], `weight` [out, in] (the layout of torch.nn.Linear), `y` [T, out].
template <class T>
void linear_forward(View<const T> x, View<const T> weight, View<T> y);
/// dx += dy W;  dweight += dy^T x.
template <class T>
void linear_backward(View<const T> x, View<const T> weight, View<const T> dy, View<T> dx, View<T> dweight);

/// h = silu(gate) * up elementwise, silu(g) = g sigmoid(g).
template <class T>
void swiglu_forward(View<const T> gate, View<const T> up, View<T> hidden);
/// dgate += dh up silu'(gate), silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g);  dup += dh silu(gate).
template <class T>
void swiglu_backward(View<const T> gate, View<const T> up, View<const T> dhidden, View<T> dgate, View<T> dup);

/// What the SwiGLU MLP's backward needs: the gate and up projections and their product, each `[T, ffn]`.
template <class T>
struct MlpTape {
  std::vector<T> gate, up, hidden;
};

/// The weights of a SwiGLU MLP: gate and up `[ffn, D]`, down `[D, ffn]`.
template <class T>
struct MlpWeights {
  View<T> gate, up, down;
};

/// y = down(silu(gate(x)) * up(x)), the Llama MLP; `x` and `y` are `[T, D]`.
template <class T>
void mlp_forward(View<const T> x, const MlpWeights<const T>& weights, View<T> y, MlpTape<T>& tape);
/// Adds the gradients of x and of the three weights.
template <class T>
void mlp_backward(View<const T> x, const MlpWeights<const T>& weights, const MlpTape<T>& tape, View<const T> dy,
                  View<T> dx, const MlpWeights<T>& dweights);

/// Rotary position embedding in place, half-split pairs (x[i], x[i + d/2]) as Hugging Face's Llama rotates
/// them (af::RopeLayout::half_split): every `head_dim` block of row t is rotated by the angles t base^(-2i/d)
/// (the row index is the position). `x` is `[T, heads * head_dim]`. Throws af::Error for an odd head_dim or
/// a row length that is not a multiple of it.
template <class T>
void rope_forward(View<T> x, std::int64_t head_dim, double base);
/// The backward of rope_forward, in place: a rotation's transpose is the rotation by the opposite angle, so
/// `dx` (the gradient of the rotated values) becomes the gradient of the values before rotation.
template <class T>
void rope_backward(View<T> dx, std::int64_t head_dim, double base);

/// The shape and mask of causal softmax attention with `heads` query heads sharing `kv_heads` key/value
/// heads (GQA: query head h reads kv head h / (heads / kv_heads); kv_heads = heads is MHA, 1 is MQA).
/// Query i attends to key j when j <= i, and
/// - when `window` > 0, i - window < j (a window of `window` keys, the query's own included);
/// - when `allowed_keys` is not empty, j is in allowed_keys[g * T + i] for the query's kv group g (DSA-style
///   top-k selection: one strictly increasing list of key positions per query per kv group).
/// Queries and keys have `head_dim` channels per head (the scale is 1/sqrt(head_dim)); values and outputs have
/// `value_dim` (MLA's d_v differs from its d_n + d_r), or head_dim when value_dim is 0.
struct AttentionShape {
  std::int64_t heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 1;
  std::int64_t window = 0;
  std::span<const std::vector<std::int32_t>> allowed_keys;
  std::int64_t value_dim = 0;

  /// The channels of a value head: value_dim, or head_dim when it is 0.
  std::int64_t value_channels() const { return value_dim > 0 ? value_dim : head_dim; }
};

/// softmax(q k^T / sqrt(d) + mask) v per head. `q` is `[T, heads * d]`, `k` `[T, kv_heads * d]`, `v`
/// `[T, kv_heads * d_v]`, `out` `[T, heads * d_v]` (d_v = shape.value_channels()); `weights` [heads, T, T] receives the
/// attention weights (zero where masked), which the backward needs. Throws af::Error for mismatched shapes, heads not a
/// multiple of kv_heads, a negative window, a malformed allowed-key list (wrong count, a key outside [0, i], not
/// strictly increasing), or a query left with no key.
template <class T>
void attention_forward(View<const T> q, View<const T> k, View<const T> v, const AttentionShape& shape, View<T> out,
                       std::span<T> weights);
/// With dP = dout v^T and dS = P (dP - rowsum(P dP)): dq += dS k / sqrt(d), dk += dS^T q / sqrt(d),
/// dv += P^T dout (per head; kv heads sum over their query heads).
template <class T>
void attention_backward(View<const T> q, View<const T> k, View<const T> v, const AttentionShape& shape,
                        std::span<const T> weights, View<const T> dout, View<T> dq, View<T> dk, View<T> dv);

/// A target below zero is not scored (Hugging Face's -100 reads the same).
inline constexpr std::int32_t ignored_target = -1;

/// The summed negative log-likelihood (natural log, accumulated in double) of the scored targets:
/// sum over t with targets[t] >= 0 of logsumexp(logits[t]) - logits[t][targets[t]]. `logits` is `[T, V]`.
/// Throws af::Error for a target >= V or mismatched sizes.
template <class T>
double cross_entropy_forward(View<const T> logits, std::span<const std::int32_t> targets);
/// dlogits[t] += scale (softmax(logits[t]) - onehot(targets[t])) on scored rows; `scale` is what the summed
/// loss is multiplied by (1 / scored tokens for a mean).
template <class T>
void cross_entropy_backward(View<const T> logits, std::span<const std::int32_t> targets, T scale, View<T> dlogits);

// ---------------------------------------------------------------------------------------------------------
// Token mixers
// ---------------------------------------------------------------------------------------------------------

/// What a mixer's forward saves for its backward; each mixer defines its own.
class MixerTape {
 public:
  virtual ~MixerTape() = default;
};

/// A token mixer: the part of a decoder block that moves information between positions (softmax attention,
/// linear attention, a delta rule, ...). A mixer is built once per layer; add_parameters registers its
/// parameters in the model's layout, after which forward and backward are const and may run on several
/// threads at once, each call with its own tape and gradient buffer. Positions are the row indices.
class Mixer {
 public:
  virtual ~Mixer() = default;
  /// Adds this mixer's parameters to `layout` as `prefix` + name, and remembers where they are.
  virtual void add_parameters(Layout& layout, const std::string& prefix) = 0;
  /// A short description, e.g. `softmax attention, 4 heads, 2 kv heads, head_dim 8, window 0`.
  virtual std::string describe() const = 0;

  /// y = mixer(x) for one sequence: `x` and `y` are `[T, D]`, `params` the whole parameter vector.
  virtual std::unique_ptr<MixerTape> forward(std::span<const float> params, View<const float> x,
                                             View<float> y) const = 0;
  virtual std::unique_ptr<MixerTape> forward(std::span<const double> params, View<const double> x,
                                             View<double> y) const = 0;
  /// Adds the gradient of x to `dx` and of the mixer's parameters to `grads` (the whole gradient vector),
  /// given the gradient `dy` of its output and the tape of the forward that produced it.
  virtual void backward(std::span<const float> params, const MixerTape& tape, View<const float> dy, View<float> dx,
                        std::span<float> grads) const = 0;
  virtual void backward(std::span<const double> params, const MixerTape& tape, View<const double> dy, View<double> dx,
                        std::span<double> grads) const = 0;
};

/// Implements Mixer's float and double overloads with the templates `forward_typed<T>` and
/// `backward_typed<T>` of `Derived` (which has the same parameters as forward and backward).
template <class Derived>
class MixerOf : public Mixer {
 public:
  std::unique_ptr<MixerTape> forward(std::span<const float> params, View<const float> x, View<float> y) const override {
    return self().template forward_typed<float>(params, x, y);
  }
  std::unique_ptr<MixerTape> forward(std::span<const double> params, View<const double> x,
                                     View<double> y) const override {
    return self().template forward_typed<double>(params, x, y);
  }
  void backward(std::span<const float> params, const MixerTape& tape, View<const float> dy, View<float> dx,
                std::span<float> grads) const override {
    self().template backward_typed<float>(params, tape, dy, dx, grads);
  }
  void backward(std::span<const double> params, const MixerTape& tape, View<const double> dy, View<double> dx,
                std::span<double> grads) const override {
    self().template backward_typed<double>(params, tape, dy, dx, grads);
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

/// The options of softmax attention as a mixer.
struct SoftmaxAttentionOptions {
  std::int64_t heads = 4;      ///< H query heads
  std::int64_t kv_heads = 4;   ///< G key/value heads: H for MHA, 1 for MQA, between for GQA
  std::int64_t head_dim = 8;   ///< d
  std::int64_t window = 0;     ///< sliding window W (keys i - W < j <= i); 0 for full causal attention
  double rope_base = 10000.0;  ///< RoPE theta
};

/// Softmax attention with RoPE, the Llama layer: q = x Wq^T, k = x Wk^T, v = x Wv^T (no biases), RoPE on q and
/// k (half-split), attention_forward, then the output projection Wo. Parameters `q_proj.weight` [H d, D],
/// `k_proj.weight` and `v_proj.weight` [G d, D], `o_proj.weight` [D, H d] (Init::output_projection).
class SoftmaxAttention : public MixerOf<SoftmaxAttention> {
 public:
  /// Throws af::Error for heads, kv_heads, head_dim or hidden < 1, heads not a multiple of kv_heads, an odd
  /// head_dim, a negative window or rope_base <= 1.
  SoftmaxAttention(std::int64_t hidden, const SoftmaxAttentionOptions& options);

  void add_parameters(Layout& layout, const std::string& prefix) override;
  std::string describe() const override;
  const SoftmaxAttentionOptions& options() const { return options_; }

  /// The tape: the input, the rotated q and k, v, the attention weights and the heads' concatenated output.
  template <class T>
  struct Tape : MixerTape {
    std::vector<T> x, q, k, v, weights, mixed;
  };
  template <class T>
  std::unique_ptr<MixerTape> forward_typed(std::span<const T> params, View<const T> x, View<T> y) const;
  template <class T>
  void backward_typed(std::span<const T> params, const MixerTape& tape, View<const T> dy, View<T> dx,
                      std::span<T> grads) const;

 private:
  AttentionShape attention_shape() const;

  std::int64_t hidden_;
  SoftmaxAttentionOptions options_;
  Slice q_, k_, v_, o_;  // where add_parameters put the projections
};

// ---------------------------------------------------------------------------------------------------------
// The decoder
// ---------------------------------------------------------------------------------------------------------

/// The decoder's sizes.
struct ModelConfig {
  std::int64_t vocab = 16;   ///< V
  std::int64_t hidden = 32;  ///< D
  std::int64_t layers = 2;   ///< L
  std::int64_t ffn = 64;     ///< the SwiGLU MLP's inner width
  double rms_eps = 1e-6;     ///< RMSNorm epsilon
  double init_std = 0.02;    ///< standard deviation of Init::normal
};

/// One training sequence: `tokens` [T], and `targets` [T] with targets[t] the token position t should
/// predict, or a negative value (af::train::ignored_target) where position t is not scored.
struct Sequence {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;
};

/// A decoder-only language model. Its parameters carry Hugging Face Llama's names, without the prefix
/// `model.`, and with `mixer` for `self_attn`:
/// - the token embedding `embed_tokens.weight` [V, D];
/// - L blocks, block l being x + mixer(RMSNorm(x)) then x + MLP(RMSNorm(x)): the gains
///   `layers.l.input_layernorm.weight` and `layers.l.post_attention_layernorm.weight` [D], the mixer's own
///   parameters under `layers.l.mixer.`, and the SwiGLU MLP's `layers.l.mlp.gate_proj.weight`,
///   `layers.l.mlp.up_proj.weight` [ffn, D] and `layers.l.mlp.down_proj.weight` [D, ffn];
/// - a final RMSNorm `norm.weight` [D] and an untied LM head `lm_head.weight` [V, D].
///
/// Weight decay applies to every projection and the head, not to the embedding or the norm gains.
class Model {
 public:
  /// Builds the mixer of layer l with `make_mixer(l)` and lays out every parameter. Throws af::Error for a
  /// size < 1, rms_eps <= 0, init_std < 0, or a factory that returns no mixer.
  Model(const ModelConfig& config, const std::function<std::unique_ptr<Mixer>(std::int64_t layer)>& make_mixer);

  const ModelConfig& config() const { return config_; }
  const Layout& layout() const { return layout_; }
  const Mixer& mixer(std::int64_t layer) const { return *mixers_.at(static_cast<std::size_t>(layer)); }

  /// af::train::initial_parameters of the layout with the config's init_std and layer count.
  std::vector<float> initial_parameters(std::uint64_t seed) const;

  /// The logits [T, V] (row-major) of every position of `tokens`.
  template <class T>
  std::vector<T> logits(std::span<const T> params, std::span<const std::int32_t> tokens) const;

  /// The summed NLL of `sequence`'s scored targets; adds `scale` times its gradient with respect to the
  /// parameters to `grads` (so scale = 1 / scored tokens of the batch gives the batch mean's gradient).
  /// Throws af::Error for a parameter or gradient vector of the wrong size, an empty sequence, tokens and
  /// targets of different lengths, or a token or target outside the vocabulary.
  template <class T>
  double loss_and_gradient(std::span<const T> params, const Sequence& sequence, double scale, std::span<T> grads) const;

  /// The summed NLL of `sequence`'s scored targets (forward only).
  template <class T>
  double loss(std::span<const T> params, const Sequence& sequence) const;

  /// Throws af::Error naming the first problem of `sequence` (see loss_and_gradient).
  void check_sequence(const Sequence& sequence) const;

 private:
  template <class T>
  double run(std::span<const T> params, const Sequence& sequence, double scale, std::span<T> grads,
             std::vector<T>* logits_out) const;

  /// Indices in layout_ of one block's parameters besides the mixer's.
  struct BlockSlices {
    std::size_t mixer_norm = 0, mlp_norm = 0, gate = 0, up = 0, down = 0;
  };

  ModelConfig config_;
  Layout layout_;
  std::vector<std::unique_ptr<Mixer>> mixers_;
  std::vector<BlockSlices> blocks_;
  std::size_t embedding_ = 0, final_norm_ = 0, head_ = 0;
};

// ---------------------------------------------------------------------------------------------------------
// Optimisation
// ---------------------------------------------------------------------------------------------------------

/// The number of scored targets in a batch.
std::int64_t scored_targets(std::span<const Sequence> batch);

/// The gradient of the batch's mean loss (summed NLL / scored targets) into `grads` (overwritten); returns
/// the mean loss. Sequences run on `threads` OpenMP threads (0: the OpenMP default), each into its own
/// gradient buffer in `workspace` (resized as needed: batch size x parameters), and the buffers are summed
/// in sequence order, so the result is bitwise the same on any number of threads. Throws af::Error for a
/// batch with no scored target, a bad sequence (Model::check_sequence) or a vector of the wrong size.
double batch_gradient(const Model& model, std::span<const float> params, std::span<const Sequence> batch,
                      std::span<float> grads, int threads, std::vector<std::vector<float>>& workspace);

/// The mean loss of a batch (forward only, same threading and order as batch_gradient).
double batch_loss(const Model& model, std::span<const float> params, std::span<const Sequence> batch, int threads);

/// Scales `grads` by max_norm / norm when their L2 norm (computed in double) exceeds `max_norm`, and returns
/// the norm before clipping. Throws af::Error for max_norm <= 0.
double clip_gradient_norm(std::span<float> grads, double max_norm);

/// A learning rate that rises linearly over `warmup_steps` to `peak_lr`, then follows a half cosine down to
/// `final_lr` at `total_steps` (and stays there).
struct CosineSchedule {
  double peak_lr = 1e-3;
  double final_lr = 1e-4;
  std::int64_t warmup_steps = 10;
  std::int64_t total_steps = 100;

  /// The rate for step `step` (0-based): peak (step + 1) / warmup during warmup, then
  /// final + (peak - final) (1 + cos(pi p)) / 2 with p = (step - warmup) / (total - warmup) clamped to [0, 1].
  /// Throws af::Error for a negative step, warmup < 0, total <= warmup, or rates outside 0 <= final <= peak.
  double at(std::int64_t step) const;
};

/// AdamW's hyperparameters (Loshchilov and Hutter 2019).
struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

/// AdamW with bias correction and decoupled weight decay. At step t (from 1), for each value:
///   p <- p (1 - lr wd)  (only for slices with decay)
///   m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
///   p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
/// The moments are float32; each update is computed in double.
class AdamW {
 public:
  /// Throws af::Error for betas outside [0, 1), eps <= 0 or a negative weight decay.
  AdamW(const Layout& layout, const AdamWConfig& config);
  /// One update with learning rate `lr`; throws af::Error for vectors of the wrong size or lr < 0.
  void step(std::span<float> params, std::span<const float> grads, double lr);
  std::int64_t steps_done() const { return steps_; }

 private:
  AdamWConfig config_;
  std::vector<float> m_, v_;
  std::vector<std::uint8_t> decay_;
  std::int64_t steps_ = 0;
};

/// Everything a training run needs besides the model and the data.
struct TrainConfig {
  CosineSchedule schedule;
  AdamWConfig adamw;
  double clip_norm = 1.0;  ///< gradient-norm clipping threshold; 0 turns clipping off
  int threads = 0;         ///< OpenMP threads per step; 0 for the OpenMP default
};

/// What one training step reports.
struct StepStats {
  std::int64_t step = 0;            ///< 0-based index of the step
  double loss = 0.0;                ///< mean loss of the batch, before the update
  double grad_norm = 0.0;           ///< the gradient's L2 norm before clipping
  double lr = 0.0;                  ///< the learning rate used
  std::int64_t scored_targets = 0;  ///< targets the loss averaged over
};

/// Trains a model's parameters: batch_gradient, clip_gradient_norm, the schedule's rate, AdamW.
class Trainer {
 public:
  /// Throws af::Error for parameters of the wrong size or a negative clip_norm.
  Trainer(const Model& model, std::vector<float> parameters, const TrainConfig& config);
  /// One step on `batch`.
  StepStats train_step(std::span<const Sequence> batch);
  std::span<const float> parameters() const { return parameters_; }
  std::int64_t steps_done() const { return optimizer_.steps_done(); }

 private:
  const Model& model_;
  TrainConfig config_;
  std::vector<float> parameters_, grads_;
  std::vector<std::vector<float>> workspace_;
  AdamW optimizer_;
};

}  // namespace af::train

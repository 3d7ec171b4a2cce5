// The training mixers (af/train_mixers.hpp): each forward against the library's inference layer on the same
// weights, each whole-model parameter gradient against central finite differences in float64, DSA's indexer
// gradient against finite differences of its KL loss, and bad options.
#include "af/error.hpp"
#include "af/gated_deltanet.hpp"
#include "af/linalg.hpp"
#include "af/linear_attention.hpp"
#include "af/mla.hpp"
#include "af/random.hpp"
#include "af/rope.hpp"
#include "af/train.hpp"
#include "af/train_mixers.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "error_of.hpp"

namespace train = af::train;

namespace {

/// Central differences in float64 with step 1e-6 (truncation ~1e-12, rounding ~1e-10 on losses of size ~1).
constexpr double fd_step = 1e-6;

/// max |analytic - numeric| over the entries of `input` that `checked` accepts (every entry when empty);
/// infinite when any value is not finite.
double max_fd_error(std::vector<double>& input, const std::vector<double>& analytic,
                    const std::function<double()>& loss, const std::function<bool(std::size_t)>& checked = {}) {
  REQUIRE(analytic.size() == input.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < input.size(); ++i) {
    if (checked && !checked(i)) continue;
    const double saved = input[i];
    input[i] = saved + fd_step;
    const double up = loss();
    input[i] = saved - fd_step;
    const double down = loss();
    input[i] = saved;
    const double error = std::abs(analytic[i] - (up - down) / (2.0 * fd_step));
    if (!std::isfinite(error)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, error);
  }
  return worst;
}

/// max |a - b| / max |b|; infinite when any value is not finite.
template <class A, class B>
double relative_error(std::span<const A> a, std::span<const B> b) {
  REQUIRE(a.size() == b.size());
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    diff = std::max(diff, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return diff / std::max(scale, 1e-30);
}

train::ModelConfig tiny_config() {
  train::ModelConfig config;
  config.vocab = 7;
  config.hidden = 8;
  config.layers = 2;
  config.ffn = 12;
  config.init_std = 0.5;  // large, so that every path carries a gradient well above the rounding error
  return config;
}

/// Parameters in float64 with the norm gains moved off 1, so their gradients are checked in general.
std::vector<double> double_parameters(const train::Model& model, std::uint64_t seed) {
  const std::vector<float> initial = model.initial_parameters(seed);
  std::vector<double> params(initial.begin(), initial.end());
  af::Rng rng(seed + 1);
  for (const train::Slice& slice : model.layout().slices())
    if (slice.init == train::Init::ones)
      for (double& g : slice.values(std::span<double>(params))) g += 0.3 * rng.normal();
  return params;
}

const train::Sequence sequence{{3, 1, 6, 0, 3, 2}, {1, train::ignored_target, 0, 3, 2, 5}};
constexpr double mean_scale = 1.0 / 5.0;  // the mean over the 5 scored targets

struct GradientCheck {
  double error = 0.0;    ///< max |analytic - central difference| over the checked parameters
  double largest = 0.0;  ///< the largest |gradient| among them
};

/// The model's parameter gradient of the mean loss against central differences, over the parameters whose
/// name `checked` accepts (all when empty).
GradientCheck check_model_gradient(const train::Model& model, std::uint64_t seed,
                                   const std::function<bool(const std::string&)>& checked = {}) {
  auto params = double_parameters(model, seed);
  std::vector<double> grads(params.size());
  model.loss_and_gradient<double>(params, sequence, mean_scale, grads);
  std::vector<char> include(params.size(), 1);
  if (checked)
    for (const train::Slice& slice : model.layout().slices())
      std::fill_n(include.begin() + slice.offset, slice.size, checked(slice.name) ? 1 : 0);
  GradientCheck result;
  result.error = max_fd_error(
      params, grads, [&] { return mean_scale * model.loss<double>(params, sequence); },
      [&](std::size_t i) { return include[i] != 0; });
  for (std::size_t i = 0; i < grads.size(); ++i)
    if (include[i] != 0) result.largest = std::max(result.largest, std::abs(grads[i]));
  return result;
}

/// Copies `tensor` into the parameter called `name`.
void put(std::vector<float>& params, const train::Layout& layout, const std::string& name, const af::Tensor& tensor) {
  const train::Slice& slice = layout.slice(name);
  REQUIRE(slice.size == tensor.numel());
  std::copy(tensor.data(), tensor.data() + tensor.numel(), params.begin() + slice.offset);
}

template <class T>
train::View<const T> cview(const std::vector<T>& v, std::int64_t rows, std::int64_t cols) {
  return train::as_matrix(std::span<const T>(v), rows, cols);
}
template <class T>
train::View<T> view(std::vector<T>& v, std::int64_t rows, std::int64_t cols) {
  return train::as_matrix(std::span<T>(v), rows, cols);
}

/// The gradient tolerance of the whole-model checks: 1e-7 absolute on gradients of size ~0.1 to 1.
constexpr double model_tolerance = 1e-7;

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Gated DeltaNet
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("The Gated DeltaNet mixer's forward equals af::gated_deltanet on the same weights", "[train_mixers]") {
  af::Rng rng(201);
  const std::int64_t hidden = 16, Hk = 2, Hv = 4, dk = 4, dv = 3, K = 4;
  const af::GatedDeltaNetShape s{hidden, Hk, Hv, dk, dv, K, 1e-6};
  af::GatedDeltaNetWeights w;
  w.in_proj_qkvz = af::random_normal(af::Shape{2 * Hk * dk + 2 * Hv * dv, hidden}, rng, 0.3);
  w.in_proj_ba = af::random_normal(af::Shape{2 * Hv, hidden}, rng, 0.3);
  w.conv = af::random_normal(af::Shape{s.conv_channels(), K}, rng, 0.5);
  w.dt_bias = af::random_normal(af::Shape{Hv}, rng, 0.5);
  w.a_log = af::random_uniform(af::Shape{Hv}, rng, -2.0, 0.5);
  w.norm = af::random_uniform(af::Shape{dv}, rng, 0.5, 1.5);
  w.out_proj = af::random_normal(af::Shape{hidden, Hv * dv}, rng, 0.3);

  train::GatedDeltaNetMixer mixer(hidden, {Hk, Hv, dk, dv, K, 1e-6});
  train::Layout layout;
  mixer.add_parameters(layout, "mixer.");
  std::vector<float> params(static_cast<std::size_t>(layout.size()));
  put(params, layout, "mixer.in_proj_qkvz.weight", w.in_proj_qkvz);
  put(params, layout, "mixer.in_proj_ba.weight", w.in_proj_ba);
  put(params, layout, "mixer.conv1d.weight", w.conv);
  put(params, layout, "mixer.dt_bias", w.dt_bias);
  put(params, layout, "mixer.A_log", w.a_log);
  put(params, layout, "mixer.norm.weight", w.norm);
  put(params, layout, "mixer.out_proj.weight", w.out_proj);
  for (const std::int64_t T : {1, 7}) {
    const af::Tensor x = af::random_normal(af::Shape{T, hidden}, rng);
    af::GatedDeltaNetCache cache(s);
    const af::Tensor expected = af::gated_deltanet(x.matrix(), s, w, cache, 4);
    std::vector<float> y(static_cast<std::size_t>(T * hidden));
    mixer.forward(params, train::View<const float>{x.data(), T, hidden}, view(y, T, hidden));
    const double error = relative_error<float, float>(y, expected.values());
    INFO("T " << T << ": relative error " << error);
    CHECK(error < 1e-5);
  }
  CHECK(mixer.describe() ==
        "gated deltanet, 2 key heads, 4 value heads, d_k 4, d_v 3, conv 4; state 48 + conv 84 values per sequence");
}

TEST_CASE("The Gated DeltaNet mixer starts from Qwen3-Next's A_log and conv initialisation and Mamba's dt_bias",
          "[train_mixers]") {
  const train::Model model(tiny_config(), [](std::int64_t) {
    return std::make_unique<train::GatedDeltaNetMixer>(8, train::GatedDeltaNetOptions{2, 4, 2, 2, 3, 1e-6});
  });
  const std::vector<float> params = model.initial_parameters(5);
  const train::Layout& layout = model.layout();
  for (const float a : layout.slice("layers.1.mixer.A_log").values(std::span<const float>(params))) {
    CHECK(a >= std::log(0.01f) - 1e-6f);
    CHECK(a < std::log(16.0f));
  }
  // softplus(dt_bias) = dt, log-uniform in [0.001, 0.1].
  std::vector<double> time_steps;
  for (const float b : layout.slice("layers.0.mixer.dt_bias").values(std::span<const float>(params)))
    time_steps.push_back(std::log1p(std::exp(static_cast<double>(b))));
  for (const double dt : time_steps) {
    CHECK(dt >= 0.001 * (1 - 1e-5));
    CHECK(dt <= 0.1 * (1 + 1e-5));
  }
  CHECK(time_steps[0] != time_steps[1]);
  for (const float c : layout.slice("layers.0.mixer.conv1d.weight").values(std::span<const float>(params)))
    CHECK(std::abs(c) <= 1.0f / std::sqrt(3.0f));
  CHECK(!layout.slice("layers.0.mixer.A_log").decay);
  CHECK(layout.slice("layers.0.mixer.out_proj.weight").init == train::Init::output_projection);
}

TEST_CASE("A model with Gated DeltaNet mixers has the parameter gradient of central differences", "[train_mixers]") {
  struct Case {
    const char* name;
    train::GatedDeltaNetOptions options;
  };
  const Case cases[] = {{"2 value heads per key head", {1, 2, 4, 3, 3, 1e-6}},
                        {"one value head per key head, kernel 1", {2, 2, 2, 2, 1, 1e-6}}};
  for (const Case& c : cases) {
    const train::Model model(tiny_config(),
                             [&](std::int64_t) { return std::make_unique<train::GatedDeltaNetMixer>(8, c.options); });
    const GradientCheck check = check_model_gradient(model, 21);
    INFO(c.name << " (" << model.layout().size() << " parameters): max error " << check.error << ", largest gradient "
                << check.largest);
    CHECK(check.largest > 1e-2);
    CHECK(check.error < model_tolerance);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Lightning attention
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("The linear attention mixer's forward equals af::lightning_attention on the same weights", "[train_mixers]") {
  af::Rng rng(202);
  const std::int64_t hidden = 16, H = 2, d = 4;
  const af::LightningShape shape{hidden, H, d, 3};
  af::LightningWeights w;
  w.qkv_proj = af::random_normal(af::Shape{3 * H * d, hidden}, rng, 0.3);
  w.output_gate = af::random_normal(af::Shape{H * d, hidden}, rng, 0.3);
  w.norm = af::random_uniform(af::Shape{H * d}, rng, 0.5, 1.5);
  w.out_proj = af::random_normal(af::Shape{hidden, H * d}, rng, 0.3);
  train::LinearAttentionMixer mixer(hidden, {H, d, 1, 3, w.norm_eps});
  CHECK(mixer.slopes() == af::lightning_slopes(H, 1, 3));
  train::Layout layout;
  mixer.add_parameters(layout, "");
  std::vector<float> params(static_cast<std::size_t>(layout.size()));
  put(params, layout, "qkv_proj.weight", w.qkv_proj);
  put(params, layout, "output_gate.weight", w.output_gate);
  put(params, layout, "norm.weight", w.norm);
  put(params, layout, "out_proj.weight", w.out_proj);
  for (const std::int64_t T : {1, 8}) {
    const af::Tensor x = af::random_normal(af::Shape{T, hidden}, rng);
    af::LinearState state(H, d, d);
    const af::Tensor expected = af::lightning_attention(x.matrix(), shape, w, mixer.slopes(), state);
    std::vector<float> y(static_cast<std::size_t>(T * hidden));
    mixer.forward(params, train::View<const float>{x.data(), T, hidden}, view(y, T, hidden));
    const double error = relative_error<float, float>(y, expected.values());
    INFO("T " << T << ": relative error " << error);
    CHECK(error < 1e-5);
  }
  CHECK(mixer.describe() ==
        "lightning attention, 2 heads, head_dim 4, slopes 0.0313 .. 0.00195; state 32 values "
        "per sequence");
}

TEST_CASE("A model with linear attention mixers has the parameter gradient of central differences", "[train_mixers]") {
  const train::ModelConfig config = tiny_config();
  const train::Model model(config, [&](std::int64_t layer) {
    return std::make_unique<train::LinearAttentionMixer>(8, train::LinearAttentionOptions{2, 3, layer, config.layers});
  });
  const GradientCheck check = check_model_gradient(model, 22);
  INFO(model.layout().size() << " parameters: max error " << check.error << ", largest gradient " << check.largest);
  CHECK(check.largest > 1e-2);
  CHECK(check.error < model_tolerance);
}

// ---------------------------------------------------------------------------------------------------------
// MLA
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("The MLA mixer's forward equals af::mla_attention without a query low-rank path", "[train_mixers]") {
  af::Rng rng(203);
  const std::int64_t hidden = 16, H = 2, r = 6, dn = 4, dr = 2, dv = 3, T = 7;
  const af::MlaShape s{hidden, H, 0, r, dn, dr, dv, 1e-6};
  af::MlaWeights w;
  w.q_proj = af::random_normal(af::Shape{H * (dn + dr), hidden}, rng, 0.3);
  w.kv_a_proj_with_mqa = af::random_normal(af::Shape{r + dr, hidden}, rng, 0.3);
  w.kv_a_layernorm = af::random_uniform(af::Shape{r}, rng, 0.5, 1.5);
  w.kv_b_proj = af::random_normal(af::Shape{H * (dn + dv), r}, rng, 0.5);
  w.o_proj = af::random_normal(af::Shape{hidden, H * dv}, rng, 0.3);
  train::MlaMixer mixer(hidden, {H, dn, dr, dv, r, 10000.0, 1e-6});
  train::Layout layout;
  mixer.add_parameters(layout, "");
  std::vector<float> params(static_cast<std::size_t>(layout.size()));
  put(params, layout, "q_proj.weight", w.q_proj);
  put(params, layout, "kv_a_proj_with_mqa.weight", w.kv_a_proj_with_mqa);
  put(params, layout, "kv_a_layernorm.weight", w.kv_a_layernorm);
  put(params, layout, "kv_b_proj.weight", w.kv_b_proj);
  put(params, layout, "o_proj.weight", w.o_proj);
  const af::Tensor x = af::random_normal(af::Shape{T, hidden}, rng);
  std::vector<std::int64_t> positions(T);
  std::iota(positions.begin(), positions.end(), 0);
  const af::Rope rope(dr, 10000.0, af::RopeLayout::half_split);
  af::MlaCache cache(T, r, dr);
  const af::Tensor expected =
      af::mla_attention(x.matrix(), positions, s, w, rope, af::mla_softmax_scale(s, {}), af::MlaPath::naive, cache);
  std::vector<float> y(static_cast<std::size_t>(T * hidden));
  mixer.forward(params, train::View<const float>{x.data(), T, hidden}, view(y, T, hidden));
  const double error = relative_error<float, float>(y, expected.values());
  INFO("relative error " << error);
  CHECK(error < 1e-5);
  CHECK(mixer.describe() == "MLA, 2 heads, d_n 4, d_r 2, d_v 3, latent 6; cache 8 values per token (MHA: 18)");
}

TEST_CASE("A model with MLA mixers has the parameter gradient of central differences", "[train_mixers]") {
  struct Case {
    const char* name;
    train::MlaOptions options;
  };
  const Case cases[] = {{"d_v < d_n + d_r", {2, 2, 2, 3, 3, 10000.0, 1e-6}},
                        {"d_v > d_n + d_r", {2, 1, 2, 5, 4, 100.0, 1e-6}}};
  for (const Case& c : cases) {
    const train::Model model(tiny_config(),
                             [&](std::int64_t) { return std::make_unique<train::MlaMixer>(8, c.options); });
    const GradientCheck check = check_model_gradient(model, 23);
    INFO(c.name << " (" << model.layout().size() << " parameters): max error " << check.error << ", largest gradient "
                << check.largest);
    CHECK(check.largest > 1e-2);
    CHECK(check.error < model_tolerance);
  }
}

// ---------------------------------------------------------------------------------------------------------
// DSA
// ---------------------------------------------------------------------------------------------------------

namespace {

/// Random float64 parameters for a layout, normal(0, 0.5) everywhere.
std::vector<double> random_parameters(const train::Layout& layout, std::uint64_t seed) {
  af::Rng rng(seed);
  std::vector<double> params(static_cast<std::size_t>(layout.size()));
  for (double& p : params) p = 0.5 * rng.normal();
  return params;
}

bool is_indexer(const std::string& name) { return name.find(".indexer.") != std::string::npos; }

}  // namespace

TEST_CASE("DSA with top_k >= T equals softmax attention on the same weights", "[train_mixers]") {
  const std::int64_t hidden = 8, T = 6;
  for (const std::int64_t top_k : {T, T + 3}) {
    train::DsaMixer dsa(hidden, {4, 2, 4, 10000.0, 2, 3, top_k, 1.0});
    train::SoftmaxAttention softmax(hidden, {4, 2, 4, 0, 10000.0});
    train::Layout dsa_layout, softmax_layout;
    dsa.add_parameters(dsa_layout, "m.");
    softmax.add_parameters(softmax_layout, "m.");
    const std::vector<double> dsa_params = random_parameters(dsa_layout, 31);
    std::vector<double> softmax_params(static_cast<std::size_t>(softmax_layout.size()));
    for (const train::Slice& slice : softmax_layout.slices()) {
      const train::Slice& from = dsa_layout.slice(slice.name);
      std::copy_n(dsa_params.begin() + from.offset, from.size, softmax_params.begin() + slice.offset);
    }
    af::Rng rng(32);
    std::vector<double> x(static_cast<std::size_t>(T * hidden)), y_dsa(x.size()), y_softmax(x.size());
    for (double& v : x) v = rng.normal();
    dsa.forward(dsa_params, cview(x, T, hidden), view(y_dsa, T, hidden));
    softmax.forward(softmax_params, cview(x, T, hidden), view(y_softmax, T, hidden));
    const double error = relative_error<double, double>(y_dsa, y_softmax);
    INFO("top_k " << top_k << ": relative error " << error);
    CHECK(error < 1e-14);
  }
}

TEST_CASE("A model with DSA mixers has the main path's gradient of central differences and none into the indexer",
          "[train_mixers]") {
  // top_k 2 of 6 positions: the selection really drops keys. A perturbation of 1e-6 that changed the selection
  // would show as an error far above the tolerance.
  const train::Model model(tiny_config(), [](std::int64_t) {
    return std::make_unique<train::DsaMixer>(8, train::DsaOptions{2, 1, 4, 10000.0, 2, 3, 2, 0.0});
  });
  const GradientCheck check =
      check_model_gradient(model, 24, [](const std::string& name) { return !is_indexer(name); });
  INFO(model.layout().size() << " parameters: max error " << check.error << ", largest gradient " << check.largest);
  CHECK(check.largest > 1e-2);
  CHECK(check.error < model_tolerance);
  // With indexer_loss_weight 0 the indexer gets no gradient at all: the main loss sends none through top-k.
  auto params = double_parameters(model, 24);
  std::vector<double> grads(params.size());
  model.loss_and_gradient<double>(params, sequence, mean_scale, grads);
  for (const train::Slice& slice : model.layout().slices())
    if (is_indexer(slice.name))
      for (const double g : slice.values(std::span<const double>(grads))) CHECK(g == 0.0);
}

TEST_CASE("DSA's indexer gradient equals central differences of its KL loss and does not reach the input",
          "[train_mixers]") {
  const std::int64_t hidden = 8, T = 7;
  for (const double weight : {1.0, 2.5}) {
    train::DsaMixer mixer(hidden, {4, 2, 4, 10000.0, 2, 3, 3, weight});
    train::Layout layout;
    mixer.add_parameters(layout, "layers.0.mixer.");
    std::vector<double> params = random_parameters(layout, 41);
    af::Rng rng(42);
    std::vector<double> x(static_cast<std::size_t>(T * hidden)), y(x.size());
    for (double& v : x) v = rng.normal();
    using Tape = train::DsaMixer::Tape<double>;
    const auto base = mixer.forward(params, cview(x, T, hidden), view(y, T, hidden));
    const auto& base_tape = dynamic_cast<const Tape&>(*base);
    CHECK(base_tape.indexer_loss > 0.0);
    // The gradient of the indexer loss alone: the main loss's upstream gradient is zero.
    std::vector<double> dy(x.size(), 0.0), dx(x.size(), 0.0), grads(params.size(), 0.0);
    mixer.backward(params, *base, cview(dy, T, hidden), view(dx, T, hidden), grads);
    for (const double g : dx) CHECK(g == 0.0);
    std::vector<char> indexer(params.size(), 0);
    for (const train::Slice& slice : layout.slices()) {
      std::fill_n(indexer.begin() + slice.offset, slice.size, is_indexer(slice.name) ? 1 : 0);
      if (!is_indexer(slice.name))
        for (const double g : slice.values(std::span<const double>(grads))) CHECK(g == 0.0);
    }
    bool selection_fixed = true;
    const double error = max_fd_error(
        params, grads,
        [&] {
          const auto tape = mixer.forward(params, cview(x, T, hidden), view(y, T, hidden));
          const auto& typed = dynamic_cast<const Tape&>(*tape);
          selection_fixed = selection_fixed && typed.selected == base_tape.selected;
          return weight * typed.indexer_loss;
        },
        [&](std::size_t i) { return indexer[i] != 0; });
    double largest = 0.0;
    for (std::size_t i = 0; i < grads.size(); ++i)
      if (indexer[i] != 0) largest = std::max(largest, std::abs(grads[i]));
    INFO("weight " << weight << ": KL " << base_tape.indexer_loss << ", max error " << error << ", largest gradient "
                   << largest);
    CHECK(selection_fixed);
    CHECK(largest > 1e-3);
    CHECK(error < 1e-8);
  }
  CHECK(train::DsaMixer(8, {4, 2, 4, 10000.0, 2, 3, 3, 1.0}).describe() ==
        "DSA, 4 heads, 2 kv heads, head_dim 4, top-k 3; indexer 2 heads of 3, loss weight 1");
}

// ---------------------------------------------------------------------------------------------------------
// Bad options
// ---------------------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------------------
// Token shift
// ---------------------------------------------------------------------------------------------------------

TEST_CASE("The token shift feeds its inner mixer x[t] + s x[t - 1]", "[train_mixers]") {
  const std::int64_t hidden = 8, T = 5;
  const train::SoftmaxAttentionOptions options{2, 1, 4, 0, 10000.0};
  train::TokenShiftMixer shifted(hidden, std::make_unique<train::SoftmaxAttention>(hidden, options));
  train::SoftmaxAttention plain(hidden, options);
  train::Layout shifted_layout, plain_layout;
  shifted.add_parameters(shifted_layout, "m.");
  plain.add_parameters(plain_layout, "m.");
  std::vector<double> params(static_cast<std::size_t>(shifted_layout.size()));
  af::Rng rng(3);
  for (double& p : params) p = rng.normal();
  std::vector<double> plain_params(static_cast<std::size_t>(plain_layout.size()));
  for (const train::Slice& slice : plain_layout.slices())
    std::copy_n(params.begin() + shifted_layout.slice(slice.name).offset, slice.size,
                plain_params.begin() + slice.offset);
  std::vector<double> x(static_cast<std::size_t>(T * hidden)), u = x, y(x.size()), y_plain(x.size());
  for (double& v : x) v = rng.normal();
  const std::span<const double> s = shifted_layout.slice("m.shift.weight").values(std::span<const double>(params));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < hidden; ++c)
      u[static_cast<std::size_t>(t * hidden + c)] =
          x[static_cast<std::size_t>(t * hidden + c)] +
          (t > 0 ? s[c] * x[static_cast<std::size_t>((t - 1) * hidden + c)] : 0.0);
  shifted.forward(params, cview(x, T, hidden), view(y, T, hidden));
  plain.forward(plain_params, cview(u, T, hidden), view(y_plain, T, hidden));
  CHECK(relative_error<double, double>(y, y_plain) < 1e-15);
  CHECK(shifted.describe().starts_with("token shift, then softmax attention"));
  CHECK(!shifted_layout.slice("m.shift.weight").decay);
}

TEST_CASE("A model with token-shifted mixers has the parameter gradient of central differences", "[train_mixers]") {
  const std::function<std::unique_ptr<train::Mixer>()> inners[] = {
      [] {
        return std::make_unique<train::SoftmaxAttention>(8, train::SoftmaxAttentionOptions{2, 2, 4, 0, 10000.0});
      },
      [] {
        return std::make_unique<train::GatedDeltaNetMixer>(8, train::GatedDeltaNetOptions{1, 2, 4, 3, 3, 1e-6});
      }};
  for (const auto& inner : inners) {
    const train::Model model(tiny_config(),
                             [&](std::int64_t) { return std::make_unique<train::TokenShiftMixer>(8, inner()); });
    // The shifts start at 0; move them off it so that the shifted path carries a gradient too.
    auto params = double_parameters(model, 9);
    af::Rng rng(10);
    for (const train::Slice& slice : model.layout().slices())
      if (slice.name.ends_with("shift.weight"))
        for (double& v : slice.values(std::span<double>(params))) v = 0.5 * rng.normal();
    std::vector<double> grads(params.size());
    model.loss_and_gradient<double>(params, sequence, mean_scale, grads);
    const double error = max_fd_error(params, grads, [&] { return mean_scale * model.loss<double>(params, sequence); });
    double largest_shift = 0.0;
    for (const train::Slice& slice : model.layout().slices())
      if (slice.name.ends_with("shift.weight"))
        for (const double g : slice.values(std::span<const double>(grads)))
          largest_shift = std::max(largest_shift, std::abs(g));
    INFO(model.mixer(0).describe() << ": max error " << error << ", largest shift gradient " << largest_shift);
    CHECK(largest_shift > 1e-3);
    CHECK(error < model_tolerance);
  }
}

TEST_CASE("Training mixers reject bad options with af::Error naming the value", "[train_mixers]") {
  using af_test::error_of;
  CHECK_THAT(error_of([] {
               train::GatedDeltaNetMixer(8, {2, 3, 4, 4, 4, 1e-6});
             }),
             Catch::Contains("value_heads 3 is not a multiple of key_heads 2"));
  CHECK_THAT(error_of([] { train::GatedDeltaNetMixer(8, {2, 2, 4, 4, 0, 1e-6}); }), Catch::Contains("conv_kernel 0"));
  CHECK_THAT(error_of([] { train::LinearAttentionMixer(8, {2, 4, 3, 3, 1e-6}); }), Catch::Contains("layer 3 of 3"));
  CHECK_THAT(error_of([] { train::MlaMixer(8, {2, 4, 3, 4, 4, 10000.0, 1e-6}); }), Catch::Contains("rope_dim is 3"));
  CHECK_THAT(error_of([] { train::DsaMixer(8, {4, 2, 4, 10000.0, 2, 3, 0, 1.0}); }), Catch::Contains("top_k 0"));
  CHECK_THAT(error_of([] {
               train::DsaMixer(8, {4, 2, 4, 10000.0, 2, 3, 2, -1.0});
             }),
             Catch::Contains("indexer_loss_weight is -1"));
  CHECK_THAT(error_of([] { train::TokenShiftMixer(8, nullptr); }), Catch::Contains("inner mixer is null"));
  CHECK_THAT(error_of([] {
               train::TokenShiftMixer(0,
                                      std::make_unique<train::SoftmaxAttention>(8, train::SoftmaxAttentionOptions{}));
             }),
             Catch::Contains("hidden is 0"));
  train::MlaMixer unplaced(8, {});
  std::vector<float> x(16), y(16), params;
  CHECK_THAT(error_of([&] { unplaced.forward(params, cview(x, 2, 8), view(y, 2, 8)); }),
             Catch::Contains("add_parameters was not called"));
}

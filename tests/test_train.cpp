// Training from scratch (af/train.hpp): every op's backward and the whole decoder's parameter gradient
// against central finite differences in float64, the training step's independence of the thread count,
// AdamW against a hand computation, a loss that falls on a trivial task.
#include "af/error.hpp"
#include "af/random.hpp"
#include "af/safetensors.hpp"
#include "af/train.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <vector>

#include "error_of.hpp"

namespace train = af::train;

namespace {

/// Central differences in float64: step h = 1e-6 (truncation error ~h^2, rounding ~1e-16 / h, both far
/// below the tolerances used).
constexpr double fd_step = 1e-6;

std::vector<double> random_values(af::Rng& rng, std::int64_t count, double stddev = 1.0) {
  std::vector<double> values(static_cast<std::size_t>(count));
  for (double& v : values) v = stddev * rng.normal();
  return values;
}

/// The largest |analytic - numeric| over every entry of `input`, where numeric is the central difference of
/// `loss` when that entry moves by +-fd_step. Any non-finite value makes it infinite (so the check fails).
double max_fd_error(std::vector<double>& input, const std::vector<double>& analytic,
                    const std::function<double()>& loss) {
  REQUIRE(analytic.size() == input.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < input.size(); ++i) {
    const double saved = input[i];
    input[i] = saved + fd_step;
    const double up = loss();
    input[i] = saved - fd_step;
    const double down = loss();
    input[i] = saved;
    const double numeric = (up - down) / (2.0 * fd_step);
    const double error = std::abs(analytic[i] - numeric);
    if (!std::isfinite(error)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, error);
  }
  return worst;
}

double weighted_sum(const std::vector<double>& values, const std::vector<double>& weights) {
  return std::inner_product(values.begin(), values.end(), weights.begin(), 0.0);
}

train::View<double> view(std::vector<double>& v, std::int64_t rows, std::int64_t cols) {
  return train::as_matrix(std::span<double>(v), rows, cols);
}
train::View<const double> cview(const std::vector<double>& v, std::int64_t rows, std::int64_t cols) {
  return train::as_matrix(std::span<const double>(v), rows, cols);
}

/// The tolerance of every op check: 1e-7 absolute on gradients of size ~1.
constexpr double op_tolerance = 1e-7;

}  // namespace

TEST_CASE("Embedding backward equals finite differences", "[train]") {
  af::Rng rng(1);
  const std::int64_t vocab = 5, width = 3;
  const std::vector<std::int32_t> tokens{4, 0, 4, 2};
  auto table = random_values(rng, vocab * width);
  const auto probe = random_values(rng, 4 * width);
  const auto loss = [&] {
    std::vector<double> out(4 * width);
    train::embedding_forward<double>(cview(table, vocab, width), tokens, view(out, 4, width));
    return weighted_sum(out, probe);
  };
  std::vector<double> dtable(table.size());
  train::embedding_backward<double>(tokens, cview(probe, 4, width), view(dtable, vocab, width));
  const double error = max_fd_error(table, dtable, loss);
  INFO("max error " << error);
  CHECK(error < op_tolerance);
  CHECK(dtable[1 * width] == 0.0);  // token 1 never occurs
}

TEST_CASE("RMSNorm backward equals finite differences for x and the gain", "[train]") {
  af::Rng rng(2);
  const std::int64_t rows = 3, cols = 6;
  auto x = random_values(rng, rows * cols);
  auto gain = random_values(rng, cols);
  const auto probe = random_values(rng, rows * cols);
  const double eps = 1e-6;
  const auto loss = [&] {
    std::vector<double> y(x.size()), inv(rows);
    train::rms_norm_forward<double>(cview(x, rows, cols), gain, eps, view(y, rows, cols), inv);
    return weighted_sum(y, probe);
  };
  std::vector<double> y(x.size()), inv(rows), dx(x.size()), dgain(gain.size());
  train::rms_norm_forward<double>(cview(x, rows, cols), gain, eps, view(y, rows, cols), inv);
  train::rms_norm_backward<double>(cview(x, rows, cols), gain, inv, cview(probe, rows, cols), view(dx, rows, cols),
                                   dgain);
  const double error_x = max_fd_error(x, dx, loss), error_gain = max_fd_error(gain, dgain, loss);
  INFO("max error x " << error_x << ", gain " << error_gain);
  CHECK(error_x < op_tolerance);
  CHECK(error_gain < op_tolerance);
}

TEST_CASE("Linear backward equals finite differences for x and W", "[train]") {
  af::Rng rng(3);
  const std::int64_t rows = 3, in = 5, out = 4;
  auto x = random_values(rng, rows * in);
  auto w = random_values(rng, out * in);
  const auto probe = random_values(rng, rows * out);
  const auto loss = [&] {
    std::vector<double> y(rows * out);
    train::linear_forward<double>(cview(x, rows, in), cview(w, out, in), view(y, rows, out));
    return weighted_sum(y, probe);
  };
  std::vector<double> dx(x.size()), dw(w.size());
  train::linear_backward<double>(cview(x, rows, in), cview(w, out, in), cview(probe, rows, out), view(dx, rows, in),
                                 view(dw, out, in));
  const double error_x = max_fd_error(x, dx, loss), error_w = max_fd_error(w, dw, loss);
  INFO("max error x " << error_x << ", W " << error_w);
  CHECK(error_x < op_tolerance);
  CHECK(error_w < op_tolerance);
}

TEST_CASE("SwiGLU and the SwiGLU MLP backward equal finite differences", "[train]") {
  af::Rng rng(4);
  const std::int64_t rows = 3, width = 4, ffn = 6;
  SECTION("the elementwise gate") {
    auto gate = random_values(rng, rows * ffn, 2.0);
    auto up = random_values(rng, rows * ffn);
    const auto probe = random_values(rng, rows * ffn);
    const auto loss = [&] {
      std::vector<double> h(gate.size());
      train::swiglu_forward<double>(cview(gate, rows, ffn), cview(up, rows, ffn), view(h, rows, ffn));
      return weighted_sum(h, probe);
    };
    std::vector<double> dgate(gate.size()), dup(up.size());
    train::swiglu_backward<double>(cview(gate, rows, ffn), cview(up, rows, ffn), cview(probe, rows, ffn),
                                   view(dgate, rows, ffn), view(dup, rows, ffn));
    const double error_gate = max_fd_error(gate, dgate, loss), error_up = max_fd_error(up, dup, loss);
    INFO("max error gate " << error_gate << ", up " << error_up);
    CHECK(error_gate < op_tolerance);
    CHECK(error_up < op_tolerance);
  }
  SECTION("the MLP") {
    auto x = random_values(rng, rows * width);
    auto wg = random_values(rng, ffn * width), wu = random_values(rng, ffn * width),
         wd = random_values(rng, width * ffn);
    const auto probe = random_values(rng, rows * width);
    const auto weights = [&] {
      return train::MlpWeights<const double>{cview(wg, ffn, width), cview(wu, ffn, width), cview(wd, width, ffn)};
    };
    const auto loss = [&] {
      std::vector<double> y(x.size());
      train::MlpTape<double> tape;
      train::mlp_forward<double>(cview(x, rows, width), weights(), view(y, rows, width), tape);
      return weighted_sum(y, probe);
    };
    std::vector<double> y(x.size()), dx(x.size()), dwg(wg.size()), dwu(wu.size()), dwd(wd.size());
    train::MlpTape<double> tape;
    train::mlp_forward<double>(cview(x, rows, width), weights(), view(y, rows, width), tape);
    train::mlp_backward<double>(cview(x, rows, width), weights(), tape, cview(probe, rows, width),
                                view(dx, rows, width),
                                {view(dwg, ffn, width), view(dwu, ffn, width), view(dwd, width, ffn)});
    const double errors[] = {max_fd_error(x, dx, loss), max_fd_error(wg, dwg, loss), max_fd_error(wu, dwu, loss),
                             max_fd_error(wd, dwd, loss)};
    INFO("max errors x " << errors[0] << ", gate " << errors[1] << ", up " << errors[2] << ", down " << errors[3]);
    for (const double e : errors) CHECK(e < op_tolerance);
  }
}

TEST_CASE("RoPE backward equals finite differences; RoPE rotates half-split pairs", "[train]") {
  af::Rng rng(5);
  const std::int64_t rows = 5, head_dim = 6, heads = 2;
  auto x = random_values(rng, rows * heads * head_dim);
  const auto probe = random_values(rng, x.size());
  const auto loss = [&] {
    std::vector<double> y = x;
    train::rope_forward(view(y, rows, heads * head_dim), head_dim, 100.0);
    return weighted_sum(y, probe);
  };
  std::vector<double> dx = probe;
  train::rope_backward(view(dx, rows, heads * head_dim), head_dim, 100.0);
  const double error = max_fd_error(x, dx, loss);
  INFO("max error " << error);
  CHECK(error < op_tolerance);
  // Half-split pairs: with position 1 and pair 0 (angle 1 radian), (x0, x3) -> (x0 cos 1 - x3 sin 1, ...).
  std::vector<double> one_row(head_dim * 2, 0.0);
  one_row[head_dim + 0] = 1.0;  // row 1, element 0
  train::rope_forward(view(one_row, 2, head_dim), head_dim, 100.0);
  CHECK(std::abs(one_row[head_dim + 0] - std::cos(1.0)) < 1e-15);
  CHECK(std::abs(one_row[head_dim + 3] - std::sin(1.0)) < 1e-15);
}

TEST_CASE("Attention backward equals finite differences for MHA, GQA, MQA, a window and selected keys", "[train]") {
  struct Case {
    const char* name;
    std::int64_t heads, kv_heads, window;
    bool select;
  };
  const Case cases[] = {{"MHA", 2, 2, 0, false},          {"GQA", 4, 2, 0, false},
                        {"MQA", 3, 1, 0, false},          {"window 2", 2, 1, 2, false},
                        {"selected keys", 4, 2, 0, true}, {"window 3 and selected keys", 2, 2, 3, true}};
  const std::int64_t length = 5, d = 3;
  for (const Case& c : cases) {
    af::Rng rng(6);
    std::vector<std::vector<std::int32_t>> allowed;
    if (c.select)
      for (std::int64_t g = 0; g < c.kv_heads; ++g)
        for (std::int64_t i = 0; i < length; ++i) {
          std::vector<std::int32_t> keys;
          for (std::int32_t j = 0; j <= i; ++j)
            if (j == i || rng.below(2) == 0) keys.push_back(j);  // the query's own key and a random half
          allowed.push_back(keys);
        }
    const train::AttentionShape shape{c.heads, c.kv_heads, d, c.window, allowed, 0};
    auto q = random_values(rng, length * c.heads * d);
    auto k = random_values(rng, length * c.kv_heads * d);
    auto v = random_values(rng, length * c.kv_heads * d);
    const auto probe = random_values(rng, q.size());
    std::vector<double> weights(static_cast<std::size_t>(c.heads * length * length));
    const auto forward = [&] {
      std::vector<double> out(q.size());
      train::attention_forward<double>(cview(q, length, c.heads * d), cview(k, length, c.kv_heads * d),
                                       cview(v, length, c.kv_heads * d), shape, view(out, length, c.heads * d),
                                       weights);
      return weighted_sum(out, probe);
    };
    forward();
    std::vector<double> dq(q.size()), dk(k.size()), dv(v.size());
    train::attention_backward<double>(cview(q, length, c.heads * d), cview(k, length, c.kv_heads * d),
                                      cview(v, length, c.kv_heads * d), shape, weights,
                                      cview(probe, length, c.heads * d), view(dq, length, c.heads * d),
                                      view(dk, length, c.kv_heads * d), view(dv, length, c.kv_heads * d));
    const double eq = max_fd_error(q, dq, forward), ek = max_fd_error(k, dk, forward),
                 ev = max_fd_error(v, dv, forward);
    INFO(c.name << ": max error q " << eq << ", k " << ek << ", v " << ev);
    CHECK(eq < op_tolerance);
    CHECK(ek < op_tolerance);
    CHECK(ev < op_tolerance);
    // The mask: row i of every head has weight only on keys it may attend, and sums to 1.
    forward();
    for (std::int64_t h = 0; h < c.heads; ++h)
      for (std::int64_t i = 0; i < length; ++i) {
        double total = 0.0;
        for (std::int64_t j = 0; j < length; ++j) {
          const double w = weights[static_cast<std::size_t>((h * length + i) * length + j)];
          bool allowed_key = j <= i && (c.window == 0 || j > i - c.window);
          if (c.select) {
            const auto& list = allowed[static_cast<std::size_t>((h / (c.heads / c.kv_heads)) * length + i)];
            allowed_key = allowed_key && std::find(list.begin(), list.end(), j) != list.end();
          }
          if (!allowed_key) CHECK(w == 0.0);
          total += w;
        }
        CHECK(std::abs(total - 1.0) < 1e-12);
      }
  }
}

TEST_CASE("Cross-entropy backward equals finite differences and skips ignored positions", "[train]") {
  af::Rng rng(7);
  const std::int64_t rows = 4, vocab = 5;
  const std::vector<std::int32_t> targets{3, train::ignored_target, 0, -100};
  auto logits = random_values(rng, rows * vocab, 2.0);
  const double scale = 0.5;
  const auto loss = [&] { return scale * train::cross_entropy_forward<double>(cview(logits, rows, vocab), targets); };
  std::vector<double> dlogits(logits.size());
  train::cross_entropy_backward<double>(cview(logits, rows, vocab), targets, scale, view(dlogits, rows, vocab));
  const double error = max_fd_error(logits, dlogits, loss);
  INFO("max error " << error);
  CHECK(error < op_tolerance);
  for (std::int64_t c = 0; c < vocab; ++c) {
    CHECK(dlogits[static_cast<std::size_t>(1 * vocab + c)] == 0.0);
    CHECK(dlogits[static_cast<std::size_t>(3 * vocab + c)] == 0.0);
  }
  // Uniform logits score ln V per scored row.
  const std::vector<double> flat(static_cast<std::size_t>(rows * vocab), 0.25);
  CHECK(std::abs(train::cross_entropy_forward<double>(cview(flat, rows, vocab), targets) - 2.0 * std::log(5.0)) <
        1e-12);
}

namespace {

train::ModelConfig tiny_config() {
  train::ModelConfig config;
  config.vocab = 7;
  config.hidden = 8;
  config.layers = 2;
  config.ffn = 12;
  config.rms_eps = 1e-6;
  config.init_std = 0.5;  // large, so that every path carries a gradient well above the rounding error
  return config;
}

train::Model softmax_model(const train::ModelConfig& config, const train::SoftmaxAttentionOptions& options) {
  return train::Model(config,
                      [&](std::int64_t) { return std::make_unique<train::SoftmaxAttention>(config.hidden, options); });
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

}  // namespace

TEST_CASE("The decoder's parameter gradient equals finite differences for MHA, GQA, MQA and a window", "[train]") {
  struct Case {
    const char* name;
    train::SoftmaxAttentionOptions options;
  };
  const Case cases[] = {
      {"MHA", {2, 2, 4, 0, 10000.0}},
      {"GQA", {4, 2, 2, 0, 10000.0}},
      {"MQA", {2, 1, 4, 0, 10000.0}},
      {"window 2", {2, 2, 4, 2, 100.0}},
  };
  const train::Sequence sequence{{3, 1, 6, 0, 3, 2}, {1, train::ignored_target, 0, 3, 2, 5}};
  for (const Case& c : cases) {
    const train::Model model = softmax_model(tiny_config(), c.options);
    auto params = double_parameters(model, 11);
    std::vector<double> grads(params.size());
    const double scale = 1.0 / 5.0;  // the mean over the 5 scored targets
    const double nll = model.loss_and_gradient<double>(params, sequence, scale, grads);
    CHECK(std::abs(nll - model.loss<double>(params, sequence)) < 1e-12);
    const double error = max_fd_error(params, grads, [&] { return scale * model.loss<double>(params, sequence); });
    double largest = 0.0;
    for (const double g : grads) largest = std::max(largest, std::abs(g));
    INFO(c.name << " (" << model.layout().size() << " parameters): max error " << error << ", largest gradient "
                << largest);
    CHECK(largest > 1e-2);
    CHECK(error < 1e-7);
  }
}

TEST_CASE("The float and double decoders agree", "[train]") {
  const train::Model model = softmax_model(tiny_config(), {4, 2, 2, 0, 10000.0});
  const std::vector<float> params = model.initial_parameters(3);
  const std::vector<double> params64(params.begin(), params.end());
  const train::Sequence sequence{{3, 1, 6, 0, 3, 2}, {1, 4, 0, 3, 2, 5}};
  std::vector<float> grads(params.size());
  std::vector<double> grads64(params.size());
  const double loss = model.loss_and_gradient<float>(params, sequence, 1.0, grads);
  const double loss64 = model.loss_and_gradient<double>(params64, sequence, 1.0, grads64);
  double error = 0.0;
  for (std::size_t i = 0; i < grads.size(); ++i) error = std::max(error, std::abs(grads[i] - grads64[i]));
  INFO("loss " << loss << " vs " << loss64 << ", max gradient difference " << error);
  CHECK(std::abs(loss - loss64) < 1e-5);
  CHECK(error < 1e-5);
}

namespace {

/// Sequences of random tokens whose targets are the previous token (a copy one step back); position 0 is not
/// scored.
std::vector<train::Sequence> previous_token_batch(af::Rng& rng, std::int64_t count, std::int64_t length,
                                                  std::int64_t vocab) {
  std::vector<train::Sequence> batch(static_cast<std::size_t>(count));
  for (train::Sequence& s : batch) {
    for (std::int64_t t = 0; t < length; ++t) s.tokens.push_back(static_cast<std::int32_t>(rng.below(vocab)));
    s.targets.push_back(train::ignored_target);
    for (std::int64_t t = 1; t < length; ++t) s.targets.push_back(s.tokens[static_cast<std::size_t>(t - 1)]);
  }
  return batch;
}

}  // namespace

TEST_CASE("The batch gradient and the training step are bitwise the same on 1 and 2 threads", "[train]") {
  train::ModelConfig config = tiny_config();
  config.init_std = 0.1;
  const train::Model model = softmax_model(config, {2, 1, 4, 0, 10000.0});
  af::Rng rng(8);
  const auto batch = previous_token_batch(rng, 5, 7, config.vocab);
  const std::vector<float> params = model.initial_parameters(4);
  std::vector<std::vector<float>> workspace;
  std::vector<float> one(params.size()), two(params.size());
  const double loss_one = train::batch_gradient(model, params, batch, one, 1, workspace);
  const double loss_two = train::batch_gradient(model, params, batch, two, 2, workspace);
  CHECK(loss_one == loss_two);
  CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
  CHECK(train::batch_loss(model, params, batch, 2) == loss_one);

  train::TrainConfig train_config;
  train_config.schedule = {1e-2, 1e-3, 2, 6};
  std::vector<std::vector<float>> trained;
  for (const int threads : {1, 2}) {
    train_config.threads = threads;
    train::Trainer trainer(model, params, train_config);
    for (int step = 0; step < 3; ++step) trainer.train_step(batch);
    trained.emplace_back(trainer.parameters().begin(), trainer.parameters().end());
  }
  CHECK(std::memcmp(trained[0].data(), trained[1].data(), trained[0].size() * sizeof(float)) == 0);
  CHECK(trained[0] != params);
}

TEST_CASE("AdamW's first two steps match a hand computation", "[train]") {
  train::Layout layout;
  layout.add("w", {2}, train::Init::normal, true);
  layout.add("gain", {1}, train::Init::ones, false);
  const train::AdamWConfig config{0.9, 0.95, 1e-8, 0.1};
  train::AdamW adamw(layout, config);
  std::vector<float> params{0.5f, -1.0f, 2.0f};
  const std::vector<float> g1{0.1f, -0.2f, 0.3f};
  const double lr = 0.01;
  adamw.step(params, g1, lr);
  // Step 1: m = 0.1 g, v = 0.05 g^2, so m / (1 - 0.9) = g and v / (1 - 0.95) = g^2: the step is lr g / (|g| + eps).
  const auto step1 = [&](double p, double g, bool decay) {
    return p * (decay ? 1.0 - lr * 0.1 : 1.0) - lr * g / (std::abs(g) + 1e-8);
  };
  const double expected1[] = {step1(0.5, 0.1f, true), step1(-1.0, -0.2f, true), step1(2.0, 0.3f, false)};
  for (int i = 0; i < 3; ++i) CHECK(std::abs(params[static_cast<std::size_t>(i)] - expected1[i]) < 1e-7);
  CHECK(std::abs(expected1[0] - 0.4895) < 1e-6);  // 0.5 * 0.999 - 0.01
  // Step 2 with twice the gradient: m = 0.09 g + 0.2 g = 0.29 g, v = 0.0475 g^2 + 0.2 g^2 = 0.2475 g^2;
  // corrected by 1 - 0.81 = 0.19 and 1 - 0.9025 = 0.0975: the step is lr (0.29 / 0.19) / sqrt(0.2475 / 0.0975)
  // sign(g) = 0.0095799 sign(g).
  std::vector<float> g2(g1.size());
  for (std::size_t i = 0; i < g1.size(); ++i) g2[i] = 2.0f * g1[i];
  const std::vector<float> before = params;
  adamw.step(params, g2, lr);
  const double ratio = (0.29 / 0.19) / std::sqrt(0.2475 / 0.0975);
  CHECK(std::abs(ratio - 0.9579859) < 1e-7);
  const double expected2[] = {before[0] * (1.0 - lr * 0.1) - lr * ratio, before[1] * (1.0 - lr * 0.1) + lr * ratio,
                              before[2] - lr * ratio};
  for (int i = 0; i < 3; ++i) CHECK(std::abs(params[static_cast<std::size_t>(i)] - expected2[i]) < 1e-6);
  CHECK(adamw.steps_done() == 2);
}

TEST_CASE("The cosine schedule warms up linearly and decays to its final rate; clipping scales to the bound",
          "[train]") {
  const train::CosineSchedule schedule{1.0, 0.1, 4, 14};
  CHECK(schedule.at(0) == 0.25);
  CHECK(schedule.at(3) == 1.0);
  CHECK(std::abs(schedule.at(4) - 1.0) < 1e-15);
  CHECK(std::abs(schedule.at(9) - 0.55) < 1e-15);  // halfway: final + (peak - final) / 2
  CHECK(std::abs(schedule.at(14) - 0.1) < 1e-15);
  CHECK(std::abs(schedule.at(100) - 0.1) < 1e-15);
  std::vector<float> grads{3.0f, 4.0f};
  CHECK(train::clip_gradient_norm(grads, 1.0) == 5.0);
  CHECK(std::abs(grads[0] - 0.6f) < 1e-7);
  CHECK(std::abs(grads[1] - 0.8f) < 1e-7);
  CHECK(train::clip_gradient_norm(grads, 2.0) == Approx(1.0));
  CHECK(std::abs(grads[0] - 0.6f) < 1e-7);  // under the bound: unchanged
}

TEST_CASE("A tiny model learns to predict the previous token", "[train]") {
  // Two layers of two heads, hidden 16, 150 steps of 8 random sequences: a fresh model scores ln 8 = 2.08 nats;
  // one that has learnt to attend one position back scores near 0 (0.0005 here; under 0.01 for other seeds).
  train::ModelConfig config;
  config.vocab = 8;
  config.hidden = 16;
  config.layers = 2;
  config.ffn = 32;
  const train::Model model = softmax_model(config, {2, 2, 8, 0, 10000.0});
  af::Rng rng(9);
  const auto held_out = previous_token_batch(rng, 8, 12, config.vocab);
  const std::int64_t steps = 150;
  train::TrainConfig train_config;
  train_config.schedule = {2e-2, 2e-3, 5, steps};
  train_config.adamw.weight_decay = 0.0;
  train_config.threads = 1;
  train::Trainer trainer(model, model.initial_parameters(5), train_config);
  const double before = train::batch_loss(model, trainer.parameters(), held_out, 1);
  for (std::int64_t step = 0; step < steps; ++step) trainer.train_step(previous_token_batch(rng, 8, 12, config.vocab));
  const double after = train::batch_loss(model, trainer.parameters(), held_out, 1);
  INFO("held-out loss " << before << " -> " << after << " (ln 8 = " << std::log(8.0) << ")");
  CHECK(std::abs(before - std::log(8.0)) < 0.1);  // a fresh model is near uniform
  CHECK(after < 0.05);
  CHECK(trainer.steps_done() == steps);
}

TEST_CASE("Training arguments out of range throw af::Error naming the value", "[train]") {
  using af_test::error_of;
  const train::Model model = softmax_model(tiny_config(), {2, 2, 4, 0, 10000.0});
  const std::vector<float> params = model.initial_parameters(1);
  std::vector<float> grads(params.size());
  CHECK_THAT(error_of([&] {
               model.loss_and_gradient<float>(params, {{1, 9}, {2, 3}}, 1.0, grads);
             }),
             Catch::Contains("token 9 at position 1"));
  CHECK_THAT(error_of([&] { model.loss<float>(params, {{1, 2}, {2}}); }), Catch::Contains("2 tokens but 1 targets"));
  CHECK_THAT(error_of([] {
               train::SoftmaxAttention(8, {3, 2, 4, 0, 10000.0});
             }),
             Catch::Contains("heads 3 is not a multiple of kv_heads 2"));
  CHECK_THAT(error_of([] { train::SoftmaxAttention(8, {2, 2, 3, 0, 10000.0}); }), Catch::Contains("head_dim is 3"));
  train::Layout layout;
  layout.add("w", {2}, train::Init::zeros, false);
  CHECK_THAT(error_of([&] { layout.add("w", {3}, train::Init::zeros, false); }), Catch::Contains("'w' is already"));
  CHECK_THAT(error_of([&] { layout.slice("v"); }), Catch::Contains("no parameter named 'v'"));
  CHECK_THAT(error_of([] {
               (void)train::CosineSchedule{1.0, 0.1, 5, 5}.at(0);
             }),
             Catch::Contains("warmup 5 and total 5"));
  std::vector<double> q(6), k(3), v(3), out(6), w(2 * 3 * 3);
  const std::vector<std::vector<std::int32_t>> allowed{{0}, {1, 0}, {2}};
  CHECK_THAT(error_of([&] {
               train::attention_forward<double>(cview(q, 3, 2), cview(k, 3, 1), cview(v, 3, 1), {2, 1, 1, 0, allowed},
                                                view(out, 3, 2), w);
             }),
             Catch::Contains("not strictly increasing"));
  std::vector<std::vector<float>> workspace;
  const std::vector<train::Sequence> unscored{{{1, 2}, {-1, -1}}};
  CHECK_THAT(error_of([&] { train::batch_gradient(model, params, unscored, grads, 1, workspace); }),
             Catch::Contains("no scored target"));
}

namespace {

/// The Hugging Face name of one of the store's parameters: `model.` in front (the head aside), `self_attn`
/// for `mixer`.
std::string hugging_face_name(const std::string& name) {
  if (name == "lm_head.weight") return name;
  std::string hf = "model." + name;
  const auto mixer = hf.find(".mixer.");
  if (mixer != std::string::npos) hf.replace(mixer, 7, ".self_attn.");
  return hf;
}

template <class T>
double max_abs_error(std::span<const T> actual, std::span<const float> expected) {
  REQUIRE(actual.size() == expected.size());
  double worst = 0.0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double error = std::abs(static_cast<double>(actual[i]) - static_cast<double>(expected[i]));
    if (!std::isfinite(error)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, error);
  }
  return worst;
}

double max_abs(std::span<const float> values) {
  double largest = 0.0;
  for (const float v : values) largest = std::max(largest, static_cast<double>(std::abs(v)));
  return largest;
}

/// Runs the recorded Llama case in scalar type T and compares the loss, the logits and every gradient.
/// Tolerances, relative to the largest magnitude of each expected tensor: loss 1e-5, logits 1e-5, gradients
/// 3e-5 (the reference is float32; the float run sums in other orders, the double run does not round).
template <class T>
void check_llama_case(const af::SafetensorsFile& file, const nlohmann::json& case_json) {
  const auto& hf = case_json.at("config");
  train::ModelConfig config;
  config.vocab = hf.at("vocab_size");
  config.hidden = hf.at("hidden_size");
  config.layers = hf.at("num_hidden_layers");
  config.ffn = hf.at("intermediate_size");
  config.rms_eps = hf.at("rms_norm_eps");
  REQUIRE(hf.at("tie_word_embeddings") == false);
  REQUIRE(hf.at("rope_parameters").at("rope_type") == "default");
  train::SoftmaxAttentionOptions options;
  options.heads = hf.at("num_attention_heads");
  options.kv_heads = hf.at("num_key_value_heads");
  options.head_dim = hf.at("head_dim");
  options.rope_base = hf.at("rope_parameters").at("rope_theta");
  const train::Model model = softmax_model(config, options);

  // The weights, by name.
  std::vector<T> params(static_cast<std::size_t>(model.layout().size()));
  std::size_t recorded_parameters = 0;
  for (const std::string& name : file.names()) recorded_parameters += name.starts_with("param.") ? 1 : 0;
  REQUIRE(recorded_parameters == model.layout().slices().size());
  for (const train::Slice& slice : model.layout().slices()) {
    const af::Tensor weight = file.tensor("param." + hugging_face_name(slice.name));
    REQUIRE(std::vector<std::int64_t>(weight.shape().dims().begin(), weight.shape().dims().end()) == slice.shape);
    std::copy(weight.values().begin(), weight.values().end(), slice.values(std::span<T>(params)).begin());
  }

  // The sequences: Hugging Face scores labels[t + 1] with the logits of position t.
  const std::int64_t batch = case_json.at("batch"), length = case_json.at("length");
  const std::vector<std::int64_t> ids = file.integers("input_ids"), labels = file.integers("labels");
  REQUIRE(static_cast<std::int64_t>(ids.size()) == batch * length);
  std::vector<train::Sequence> sequences(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t t = 0; t < length; ++t) {
      const auto at = static_cast<std::size_t>(b * length + t);
      sequences[static_cast<std::size_t>(b)].tokens.push_back(static_cast<std::int32_t>(ids[at]));
      sequences[static_cast<std::size_t>(b)].targets.push_back(
          t + 1 < length && labels[at + 1] >= 0 ? static_cast<std::int32_t>(labels[at + 1]) : train::ignored_target);
    }
  const std::int64_t scored = train::scored_targets(sequences);
  REQUIRE(scored == case_json.at("scored_targets").get<std::int64_t>());

  std::vector<T> grads(params.size());
  double total_nll = 0.0;
  for (const train::Sequence& s : sequences)
    total_nll += model.loss_and_gradient<T>(params, s, 1.0 / static_cast<double>(scored), grads);
  const double loss = total_nll / static_cast<double>(scored);
  const double expected_loss = file.tensor("loss").values()[0];
  INFO("loss " << loss << ", expected " << expected_loss);
  CHECK(std::abs(loss - expected_loss) <= 1e-5 * std::max(1.0, std::abs(expected_loss)));

  const af::Tensor expected_logits = file.tensor("logits");
  double logit_error = 0.0;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::vector<T> logits = model.logits<T>(params, sequences[static_cast<std::size_t>(b)].tokens);
    logit_error = std::max(
        logit_error, max_abs_error<T>(logits, expected_logits.values().subspan(
                                                  static_cast<std::size_t>(b * length * config.vocab), logits.size())));
  }
  const double logit_scale = max_abs(expected_logits.values());
  INFO("logits: max error " << logit_error << " (largest logit " << logit_scale << ")");
  CHECK(logit_error <= 1e-5 * logit_scale);

  double worst_ratio = 0.0;
  std::string worst_name;
  for (const train::Slice& slice : model.layout().slices()) {
    const af::Tensor expected = file.tensor("grad." + hugging_face_name(slice.name));
    const double error = max_abs_error<T>(slice.values(std::span<const T>(grads)), expected.values());
    const double scale = max_abs(expected.values());
    REQUIRE(scale > 0.0);
    if (error / scale > worst_ratio) {
      worst_ratio = error / scale;
      worst_name = slice.name;
    }
  }
  INFO("gradients: worst max error / largest gradient " << worst_ratio << " (" << worst_name << ")");
  CHECK(worst_ratio <= 3e-5);
}

}  // namespace

TEST_CASE("The decoder's loss, logits and gradients match PyTorch autograd through Hugging Face Llama", "[train]") {
  const std::filesystem::path directory = std::filesystem::path(AF_TRAIN_CASES) / "llama_tiny";
  const af::SafetensorsFile file = af::SafetensorsFile::read(directory / "tensors.safetensors");
  std::ifstream case_stream(directory / "case.json");
  REQUIRE(case_stream);
  const nlohmann::json case_json = nlohmann::json::parse(case_stream);
  SECTION("float") { check_llama_case<float>(file, case_json); }
  SECTION("double") { check_llama_case<double>(file, case_json); }
}

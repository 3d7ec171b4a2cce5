// Chapter 06 — rotary position embedding (RoPE).
//
// Builds the rotation from scratch in both pairing conventions (adjacent pairs as in the RoFormer paper, and
// the half-split "rotate_half" form of the Llama family), the permutation between them, and Llama 3.1's
// frequency scaling. Checks the relative-position property on random vectors, the from-scratch code against
// the library (af::Rope) and float64, and GQA with RoPE in prefill against decode; then shows what caching
// rotated keys means when tokens are evicted, and where the rotation frequencies run out of training.
//
//   build/bin/ch06_rotary_position_embedding [--seq-len 12] [--head-dim 16] [--base 10000] [--seed 6] [--out DIR]

#include "af/error.hpp"
#include "af/grouped_attention.hpp"
#include "af/linalg.hpp"
#include "af/program.hpp"
#include "af/random.hpp"
#include "af/rope.hpp"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <numbers>
#include <vector>

namespace {

using af::Shape;
using af::Tensor;

// [inverse-frequencies]
// Pair i turns by theta_i = base^(-2i/d) radians per position: the first pairs spin fast, the last ones slowly.
std::vector<double> inverse_frequencies(std::int64_t head_dim, double base) {
  std::vector<double> theta;
  for (std::int64_t i = 0; i < head_dim / 2; ++i)
    theta.push_back(std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim)));
  return theta;
}
// [/inverse-frequencies]

// [rotate-adjacent]
// The paper's form: (x[2i], x[2i+1]) is a complex number, multiplied by e^(i * position * theta_i).
void rotate_adjacent(std::span<float> x, const std::vector<double>& theta, double position) {
  for (std::size_t i = 0; i < theta.size(); ++i) {
    const double c = std::cos(position * theta[i]), s = std::sin(position * theta[i]);
    const double re = x[2 * i], im = x[2 * i + 1];
    x[2 * i] = static_cast<float>(re * c - im * s);
    x[2 * i + 1] = static_cast<float>(re * s + im * c);
  }
}
// [/rotate-adjacent]

// [rotate-half]
// The Llama form: pair i is (x[i], x[i + d/2]). Written as Hugging Face writes it:
// x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x[d/2:], x[:d/2]) and each angle used twice.
void rotate_half_split(std::span<float> x, const std::vector<double>& theta, double position) {
  const std::size_t half = theta.size();
  std::vector<float> rotated_half(x.size());
  for (std::size_t i = 0; i < half; ++i) {
    rotated_half[i] = -x[i + half];
    rotated_half[i + half] = x[i];
  }
  for (std::size_t j = 0; j < x.size(); ++j) {
    const double angle = position * theta[j % half];
    x[j] = static_cast<float>(x[j] * std::cos(angle) + rotated_half[j] * std::sin(angle));
  }
}
// [/rotate-half]

// [llama3-scaling]
// Llama 3.1's rescaling: pairs whose wavelength (2 pi / theta) exceeds the original context / low_freq_factor
// turn `factor` times slower; pairs shorter than context / high_freq_factor are left alone; between, a blend.
std::vector<double> llama3_scaled(std::vector<double> theta, const af::Llama3Scaling& s) {
  for (double& t : theta) {
    const double wavelength = 2.0 * std::numbers::pi / t;
    const double ratio = s.original_context / wavelength;  // how many turns the pair makes in the old context
    if (ratio < s.low_freq_factor) {
      t /= s.factor;
    } else if (ratio <= s.high_freq_factor) {
      const double blend = (ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      t = (1.0 - blend) * t / s.factor + blend * t;
    }
  }
  return theta;
}
// [/llama3-scaling]

std::vector<float> random_vector(af::Rng& rng, std::int64_t n) {
  const Tensor t = af::random_normal(Shape{n}, rng);
  return {t.values().begin(), t.values().end()};
}

double dot64(std::span<const float> a, std::span<const float> b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double{a[i]} * b[i];
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Chapter 06: rotary position embedding", "ch06_rotary_position_embedding"};
  std::int64_t seq_len = 12, head_dim = 16;
  double base = 10000.0;
  std::uint64_t seed = 6;
  std::string out_dir;
  app.add_option("--seq-len", seq_len, "Tokens in the GQA prefill/decode check")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--head-dim", head_dim, "Head dimension d (even)")->check(CLI::Range(2, 1024))->capture_default_str();
  app.add_option("--base", base, "RoPE base theta")->check(af::finite_range(1.0001, 1e9))->capture_default_str();
  app.add_option("--seed", seed, "Seed of the random vectors and weights")
      ->check(af::seed_value())
      ->capture_default_str();
  app.add_option("--out", out_dir, "Directory for the figure data (wavelengths.dat, decay.dat) and numbers.json")
      ->check(af::output_directory());

  return af::run_program(app, argc, argv, [&] {
    // The GQA check (4 heads of d, hidden 4 d) projects T x 16 d^2 and attends T x T x d: both stay within seconds.
    af::require_product_within({{"--seq-len", seq_len}, {"--head-dim", head_dim}, {"--head-dim", head_dim}}, 1 << 24);
    af::require_product_within({{"--seq-len", seq_len}, {"--seq-len", seq_len}, {"--head-dim", head_dim}}, 1 << 25);
    af::require(head_dim % 2 == 0, "--head-dim {} is odd (expected an even head dimension: RoPE rotates pairs)",
                head_dim);
    af::Rng rng(seed);
    const std::vector<double> theta = inverse_frequencies(head_dim, base);
    fmt::print("RoPE: head_dim {} ({} pairs), base {:g}; pair i turns by base^(-2i/d) per position\n", head_dim,
               head_dim / 2, base);
    fmt::print(
        "  fastest pair: {:.4f} rad/token (wavelength {:.2f} tokens); slowest: {:.3g} rad/token ({:.4g} tokens)\n\n",
        theta.front(), 2 * std::numbers::pi / theta.front(), theta.back(), 2 * std::numbers::pi / theta.back());

    af::Checks checks;
    const af::Rope lib_adjacent(head_dim, base, af::RopeLayout::adjacent),
        lib_half(head_dim, base, af::RopeLayout::half_split);
    double vs_lib = 0.0, vs_f64 = 0.0, relative = 0.0, permuted = 0.0;
    const auto perm = af::adjacent_to_half_split(head_dim);
    for (int trial = 0; trial < 200; ++trial) {
      const auto q = random_vector(rng, head_dim), k = random_vector(rng, head_dim);
      const double m = static_cast<double>(rng.below(8192)), n = static_cast<double>(rng.below(8192));
      const double shift = static_cast<double>(rng.below(8192));
      auto a = q, b = q, a_lib = q, b_lib = q;
      rotate_adjacent(a, theta, m);
      rotate_half_split(b, theta, m);
      lib_adjacent.rotate(a_lib, m);
      lib_half.rotate(b_lib, m);
      vs_lib = af::worse(vs_lib, af::worse(af::max_abs_diff(a, a_lib), af::max_abs_diff(b, b_lib)));
      for (std::size_t i = 0; i < theta.size(); ++i) {  // float64: the rotation of a complex number
        const double c = std::cos(m * theta[i]), s = std::sin(m * theta[i]);
        vs_f64 = af::worse(vs_f64, std::abs(a[2 * i] - (q[2 * i] * c - q[2 * i + 1] * s)));
        vs_f64 = af::worse(vs_f64, std::abs(a[2 * i + 1] - (q[2 * i] * s + q[2 * i + 1] * c)));
      }
      // [relative-position]
      // The score of q at position m against k at position n must not change when both move by `shift`.
      auto qm = q, kn = k, qs = q, ks = k;
      rotate_half_split(qm, theta, m);
      rotate_half_split(kn, theta, n);
      rotate_half_split(qs, theta, m + shift);
      rotate_half_split(ks, theta, n + shift);
      relative = af::worse(relative, std::abs(dot64(qm, kn) - dot64(qs, ks)) / (1.0 + std::abs(dot64(qm, kn))));
      // [/relative-position]
      // [layout-permutation]
      // Half-split rotation of the permuted vector = permutation of the adjacent rotation.
      std::vector<float> q_permuted(q.size()), a_permuted(q.size());
      for (std::size_t j = 0; j < q.size(); ++j) {
        q_permuted[j] = q[static_cast<std::size_t>(perm[j])];
        a_permuted[j] = a[static_cast<std::size_t>(perm[j])];
      }
      rotate_half_split(q_permuted, theta, m);
      permuted = af::worse(permuted, af::max_abs_diff(q_permuted, a_permuted));
      // [/layout-permutation]
    }
    checks.expect_close("rotations vs lib/ af::Rope (both layouts)", vs_lib, 1e-5);
    checks.expect_close("adjacent rotation vs float64 complex product", vs_f64, 1e-5);
    checks.expect_close("q.k at (m, n) vs at (m + s, n + s), relative", relative, 1e-4);
    checks.expect_close("half-split(P x) vs P adjacent(x)", permuted, 1e-5);

    const af::Llama3Scaling llama31{8.0, 1.0, 4.0, 8192.0};
    const auto scaled = llama3_scaled(inverse_frequencies(128, 500000.0), llama31);
    const af::Rope lib_scaled(128, 500000.0, af::RopeLayout::half_split, llama31);
    double scaling_error = 0.0;
    for (std::size_t i = 0; i < scaled.size(); ++i)
      scaling_error = af::worse(scaling_error, std::abs(scaled[i] - lib_scaled.inverse_frequencies()[i]) / scaled[i]);
    checks.expect_close("llama3 frequencies vs lib/, relative", scaling_error, 1e-12);

    // [rope-gqa]
    // GQA with RoPE (the library's rotary_grouped_attention): prefill and token-by-token decode agree because
    // each key is rotated once, by its own position, before it is cached.
    const std::int64_t heads = 4, kv_heads = 2, hidden = heads * head_dim;
    const af::GroupedShape shape{hidden, heads, kv_heads, head_dim};
    const double in = 1.0 / std::sqrt(static_cast<double>(hidden));
    const af::GroupedWeights w{af::random_normal(Shape{hidden, hidden}, rng, in),
                               af::random_normal(Shape{kv_heads * head_dim, hidden}, rng, in),
                               af::random_normal(Shape{kv_heads * head_dim, hidden}, rng, in),
                               af::random_normal(Shape{hidden, hidden}, rng, in),
                               {},
                               {},
                               {}};
    const Tensor x = af::random_normal(Shape{seq_len, hidden}, rng);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(seq_len));
    for (std::int64_t t = 0; t < seq_len; ++t) positions[static_cast<std::size_t>(t)] = t;
    af::GroupedKvCache prefill_cache(seq_len, kv_heads, head_dim), decode_cache(seq_len, kv_heads, head_dim);
    const Tensor prefill = af::rotary_grouped_attention(x.matrix(), positions, shape, w, lib_half, {}, prefill_cache);
    Tensor decoded(Shape{seq_len, hidden});
    for (std::int64_t t = 0; t < seq_len; ++t)
      std::ranges::copy(af::rotary_grouped_attention(x.matrix().rows_slice(t, 1), std::span(positions).subspan(t, 1),
                                                     shape, w, lib_half, {}, decode_cache)
                            .values(),
                        decoded.data() + t * hidden);
    // [/rope-gqa]
    checks.expect_close("GQA + RoPE: decode through the cache vs prefill",
                        af::max_abs_diff(decoded.values(), prefill.values()),
                        af::scaled_tolerance(1e-5, af::max_abs(prefill.values())));

    // [evict-and-shift]
    // Evict the first E cached tokens and let the rest move up by E positions (what a rolling cache that
    // re-numbers its slots does). A cached key was rotated for its old position; rotating it by -E more gives
    // exactly the key the model would have computed at the new position.
    const std::int64_t evicted = std::min<std::int64_t>(3, seq_len - 1);
    double reposition_error = 0.0;
    for (std::int64_t t = evicted; t < seq_len; ++t)
      for (std::int64_t g = 0; g < kv_heads; ++g) {
        std::vector<float> moved(prefill_cache.keys(g).row(t).begin(), prefill_cache.keys(g).row(t).end());
        lib_half.rotate(moved, -static_cast<double>(evicted));
        const Tensor k_row = af::linear(x.matrix().rows_slice(t, 1), w.k_proj.matrix());
        std::vector<float> fresh(k_row.values().begin() + g * head_dim, k_row.values().begin() + (g + 1) * head_dim);
        lib_half.rotate(fresh, static_cast<double>(t - evicted));
        reposition_error = af::worse(reposition_error, af::max_abs_diff(moved, fresh));
      }
    // [/evict-and-shift]
    checks.expect_close("cached key turned back by E vs key at t - E", reposition_error, 1e-5);

    fmt::print("\nReal models' RoPE (published configurations)\n");
    fmt::print("  {:<20} {:>12}  {}\n", "model", "base", "notes");
    fmt::print("  {:<20} {:>12}  {}\n", "Llama-3.1", "500000",
               "llama3 scaling: factor 8, low 1, high 4, original context 8192");
    fmt::print("  {:<20} {:>12}  {}\n", "Gemma 3 27B", "10000 / 1e6",
               "local layers / global layers (global scale factor 8)");
    fmt::print("  {:<20} {:>12}  {}\n", "gpt-oss", "150000", "half-split; YaRN factor 32 from a 4096 context");
    fmt::print("  {:<20} {:>12}  {}\n", "MiniMax-M1", "1e7", "on 64 of the 128 dimensions of each head");
    fmt::print("  {:<20} {:>12}  {}\n", "DeepSeek-V4", "10000/160000",
               "adjacent pairs; on the last 64 dimensions only");

    // [unseen-angles]
    // Where it fails: a pair whose wavelength exceeds the training context never completed a turn in training;
    // it has seen angles up to context * theta_i only. At a longer context it is shown angles it never saw.
    // Llama 3 trained on 8K tokens; Llama 3.1's scaling slows those pairs down so that longer contexts map back.
    const auto plain = inverse_frequencies(128, 500000.0);
    const double trained = 8192.0;
    const auto unseen = [&](const std::vector<double>& used, double context) {
      int pairs = 0;
      for (std::size_t i = 0; i < plain.size(); ++i)
        if (trained * plain[i] < 2 * std::numbers::pi && context * used[i] > trained * plain[i]) ++pairs;
      return pairs;
    };
    // [/unseen-angles]
    af::BookNumbers numbers;
    int slow_pairs = 0;
    for (double t : plain) slow_pairs += trained * t < 2 * std::numbers::pi ? 1 : 0;
    numbers.print("slow_pairs", "{}", slow_pairs);
    numbers.print("unseen_unscaled_16k", "{}", unseen(plain, 16384));
    numbers.print("unseen_scaled_64k", "{}", unseen(scaled, 65536));
    numbers.print("unseen_scaled_128k", "{}", unseen(scaled, 131072));
    // The span of wavelengths of a 128-dim head (the figure): the fastest pair, and the slowest at base 500000.
    numbers.print("shortest_wavelength", "{:.1f}", 2 * std::numbers::pi / plain.front());
    numbers.print("longest_wavelength_millions", "{:.1f}", 2 * std::numbers::pi / plain.back() / 1e6);
    fmt::print(
        "\nPairs of a 128-dim head (base 500000, trained on 8K tokens) shown angles beyond their training range\n");
    fmt::print("  {:<28} {:>8} {:>8} {:>8} {:>8}\n", "context", "8K", "16K", "64K", "128K");
    for (const auto& [name, used] :
         {std::pair{"unscaled frequencies", plain}, std::pair{"llama3-scaled (Llama 3.1)", scaled}})
      fmt::print("  {:<28} {:>8} {:>8} {:>8} {:>8}\n", name, unseen(used, 8192), unseen(used, 16384),
                 unseen(used, 65536), unseen(used, 131072));

    if (!out_dir.empty()) {
      const std::filesystem::path dir = af::make_output_directory(out_dir);
      numbers.write(dir);
      af::write_output_file(dir / "wavelengths.dat", [&](af::OutputFile& f) {
        f.print(
            "# wavelength (tokens per turn) of each pair of a 128-dim head: pair base10000 base500000 llama3_scaled\n");
        const auto b10k = inverse_frequencies(128, 10000.0);
        for (std::size_t i = 0; i < plain.size(); ++i)
          f.print("{} {:.6e} {:.6e} {:.6e}\n", i, 2 * std::numbers::pi / b10k[i], 2 * std::numbers::pi / plain[i],
                  2 * std::numbers::pi / scaled[i]);
      });
      // The mean score of a vector with itself at distance r, over random vectors: rotation decorrelates
      // distant positions, the slower the lower the base.
      af::write_output_file(dir / "decay.dat", [&](af::OutputFile& g) {
        g.print("# distance mean_normalised_score_base10000 mean_normalised_score_base500000 (128-dim, 64 vectors)\n");
        const af::Rope r10k(128, 10000.0, af::RopeLayout::half_split), r500k(128, 500000.0, af::RopeLayout::half_split);
        std::vector<std::vector<float>> vectors;
        for (int i = 0; i < 64; ++i) vectors.push_back(random_vector(rng, 128));
        for (double r = 0; r <= 65536; r = (r < 1 ? 1 : r * 1.25)) {
          double s10 = 0.0, s500 = 0.0;
          for (const auto& v : vectors) {
            auto a = v, b = v;
            r10k.rotate(a, r);
            r500k.rotate(b, r);
            s10 += dot64(v, a) / dot64(v, v);
            s500 += dot64(v, b) / dot64(v, v);
          }
          g.print("{:.1f} {:.6f} {:.6f}\n", r, s10 / 64, s500 / 64);
        }
      });
    }
    return checks.all_passed();
  });
}

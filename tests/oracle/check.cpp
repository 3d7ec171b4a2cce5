// The comparison oracle_check makes for one case: read it, run the library's implementation of its mechanism,
// compare every output with the expected one (NaN and infinity never pass), compare the selections, and report a
// tensor of the case that nothing read.
#include "af/compare.hpp"
#include "af/error.hpp"
#include "oracle.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <string_view>

namespace oracle {

namespace {

constexpr std::string_view selected_prefix = "expected.selected.";

/// Rows of `expected.selected.<name>` whose set of chosen indices (ignoring order and -1 padding) differs from
/// what the library chose. A case whose tensor the runner did not produce, or whose shape differs, is
/// malformed for this build (CaseError).
std::int64_t mismatched_rows(const Case& c, const std::string& tensor_name, const std::vector<Selection>& selected) {
  const std::string name = tensor_name.substr(selected_prefix.size());
  const auto mine = std::find_if(selected.begin(), selected.end(), [&](const auto& s) { return s.name == name; });
  if (mine == selected.end())
    throw CaseError(fmt::format("{}: the case records {} but the {} runner chooses no \"{}\" entries", c.name,
                                tensor_name, c.reference, name));
  const auto& stored = c.tensors.stored(tensor_name);
  if (stored.shape.empty())
    throw CaseError(fmt::format("{}: tensor \"{}\" is a scalar (expected [.., rows, k])", c.name, tensor_name));
  const std::int64_t k = stored.shape.back();
  std::vector<std::int64_t> expected;
  try {
    expected = c.tensors.integers(tensor_name);
  } catch (const af::Error& e) {
    throw CaseError(fmt::format("{}: tensor \"{}\": {}", c.name, tensor_name, e.what()));
  }
  const std::int64_t rows = k > 0 ? static_cast<std::int64_t>(expected.size()) / k : 0;
  if (mine->k != k || mine->rows != rows || static_cast<std::int64_t>(mine->indices.size()) != rows * k)
    throw CaseError(fmt::format("{}: tensor \"{}\" holds {} rows of {} but the library chose {} rows of {}", c.name,
                                tensor_name, rows, k, mine->rows, mine->k));
  const auto as_set = [k](const std::vector<std::int64_t>& all, std::int64_t row) {
    std::vector<std::int64_t> chosen;
    for (std::int64_t j = 0; j < k; ++j)
      if (const auto index = all[static_cast<std::size_t>(row * k + j)]; index >= 0) chosen.push_back(index);
    std::sort(chosen.begin(), chosen.end());
    return chosen;
  };
  std::int64_t mismatched = 0;
  for (std::int64_t row = 0; row < rows; ++row)
    if (as_set(expected, row) != as_set(mine->indices, row)) ++mismatched;
  return mismatched;
}

/// The float tensors of the case holding a NaN or an infinity (the contract: a NaN or infinity anywhere fails).
std::vector<std::string> non_finite_tensors(const Case& c) {
  std::vector<std::string> found;
  const af::SafetensorsFile& file = c.tensors.file();
  for (const auto& name : file.names()) {
    const af::DType dtype = file.stored(name).dtype;
    if (dtype == af::DType::i64 || dtype == af::DType::i32) continue;
    if (!std::isfinite(af::max_abs(file.tensor(name).values()))) found.push_back(name);
  }
  return found;
}

/// `input.position_ids`, where present, is what the module saw: it starts at the case's position_offset, and every id
/// lies in [0, max_position_offset + 2 max_tokens] (so that no RoPE angle is absurd). The ids after the first are the
/// reference's (usually position_offset + 0 ... T+N-1); a runner uses them as they are, so a decode step recorded at
/// another position than the case claims fails, it is not malformed. Read whether or not the mechanism uses positions.
void check_positions(const Case& c) {
  if (!c.tensors.contains("input.position_ids")) return;
  const std::vector<std::int64_t> positions = c.positions(c.prefill_len + c.decode_steps);
  constexpr std::int64_t largest = max_position_offset + 2 * max_tokens;
  if (positions.front() != c.position_offset)
    throw CaseError(fmt::format("{}: tensor \"input.position_ids\" starts at {} (expected position_offset {})", c.name,
                                positions.front(), c.position_offset));
  for (std::size_t i = 0; i < positions.size(); ++i)
    if (positions[i] < 0 || positions[i] > largest)
      throw CaseError(fmt::format("{}: tensor \"input.position_ids\" holds {} at index {} (expected 0 ... {})", c.name,
                                  positions[i], i, largest));
}

/// Compares the library's cache with the recorded one (StateComparison) and appends its line to `report`: the
/// same bound as the outputs' (the case's max_abs, times max(1, max|expected|) over this comparison's values when
/// the tolerance is relative), NaN and infinity failing. False when it fails; true when it passes or the case does
/// not record the tensor (the line says so).
bool compare_state(const Case& c, const StateComparison& state, std::string& report) {
  constexpr std::string_view prefix = "expected.";
  const std::string label =
      state.tensor.starts_with(prefix) ? state.tensor.substr(prefix.size()) : state.tensor;  // e.g. prefill.conv_state
  if (!state.expected) {
    report += fmt::format("    cache {} not compared (the case has no {})\n", label, state.tensor);
    return true;
  }
  if (state.expected->shape() != state.got.shape()) {
    report += fmt::format("    cache {} ({}): FAIL: the library holds {} where the case's part is {}\n", label,
                          state.what, state.got.shape().str(), state.expected->shape().str());
    return false;
  }
  const double error = af::max_abs_diff(state.got.values(), state.expected->values());
  const double tolerance =
      c.relative_to_expected ? af::scaled_tolerance(c.max_abs, af::max_abs(state.expected->values())) : c.max_abs;
  const bool pass = af::within_tolerance(error, tolerance);
  report += fmt::format("    cache {} ({})  max abs error {:.2e}  tolerance {:.2e}  {}\n", label, state.what, error,
                        tolerance, pass ? "PASS" : "FAIL");
  return pass;
}

/// Checks the case; the verdict and the lines, or an exception for a malformed case.
CheckResult check_or_throw(const Case& c, const std::map<std::string, Runner>& table) {
  const auto runner = table.find(c.reference);
  if (runner == table.end()) {
    std::string known;
    for (const auto& [reference, _] : table) known += (known.empty() ? "" : ", ") + reference;
    throw CaseError(
        fmt::format("{}: case.json \"reference\" is \"{}\", which this build does not check (it checks: {})", c.name,
                    c.reference, known));
  }
  const std::int64_t T = c.prefill_len, N = c.decode_steps;
  if (!c.tensors.contains("expected.prefill"))
    throw CaseError(fmt::format("{}: tensors.safetensors has no tensor \"expected.prefill\"", c.name));
  const std::vector<std::int64_t> prefill_shape = c.tensors.stored("expected.prefill").shape;
  if (prefill_shape.size() != 3 || prefill_shape[0] != 1 || prefill_shape[1] != T || prefill_shape[2] < 1)
    throw CaseError(fmt::format("{}: tensor \"expected.prefill\" has shape [{}] (expected [1, prefill_len {}, hidden])",
                                c.name, fmt::join(prefill_shape, ", "), T));
  const std::int64_t hidden = prefill_shape[2];
  const af::Tensor prefill = c.tensor("expected.prefill", af::Shape{1, T, hidden});
  const af::Tensor decode = N > 0 || c.tensors.contains("expected.decode")
                                ? c.tensor("expected.decode", af::Shape{1, N, hidden})
                                : af::Tensor(af::Shape{1, 0, hidden});
  check_positions(c);

  CheckResult result{Verdict::pass, ""};
  if (const auto bad = non_finite_tensors(c); !bad.empty()) {
    result.report =
        fmt::format("{:<30} {:<20} FAIL: NaN or infinity in {}\n", c.name, c.reference, fmt::join(bad, ", "));
    result.verdict = Verdict::fail;
    return result;
  }
  // The bound: max_abs, times max(1, largest |expected|) when the tolerance is relative.
  const double tolerance =
      c.relative_to_expected
          ? af::scaled_tolerance(c.max_abs, af::worse(af::max_abs(prefill.values()), af::max_abs(decode.values())))
          : c.max_abs;

  const std::vector<Outputs> all = runner->second(c);
  bool compared_everything = !all.empty();  // what the runner returned was looked at in full
  if (all.empty()) {
    result.report = fmt::format("{:<30} {:<20} FAIL: the runner returned no outputs\n", c.name, c.reference);
    result.verdict = Verdict::fail;
  }
  for (const Outputs& got : all) {
    const std::string mechanism = got.path.empty() ? c.reference : c.reference + "/" + got.path;
    if (got.prefill.shape() != af::Shape{T, hidden} || got.decode.shape() != af::Shape{N, hidden}) {
      result.report += fmt::format(
          "{:<30} {:<20} FAIL: the runner returned prefill {} and decode {} (expected [{}, {}] "
          "and [{}, {}])\n",
          c.name, mechanism, got.prefill.shape().str(), got.decode.shape().str(), T, hidden, N, hidden);
      result.verdict = Verdict::fail;
      compared_everything = false;
      continue;
    }
    const double error = af::worse(af::max_abs_diff(got.prefill.values(), prefill.values()),
                                   af::max_abs_diff(got.decode.values(), decode.values()));
    std::string selection_note;
    std::int64_t selection_mismatches = 0;
    for (const std::string& tensor_name : c.tensors.names()) {
      if (!tensor_name.starts_with(selected_prefix)) continue;
      const std::int64_t mismatched = mismatched_rows(c, tensor_name, got.selected);
      selection_mismatches += mismatched;
      selection_note += fmt::format("  {} rows differ {}", tensor_name.substr(selected_prefix.size()), mismatched);
    }
    for (const Selection& chosen : got.selected)
      if (!c.tensors.contains(std::string(selected_prefix) + chosen.name))
        selection_note +=
            fmt::format("  {} not compared (the case has no {}{})", chosen.name, selected_prefix, chosen.name);
    const bool pass = af::within_tolerance(error, tolerance) && selection_mismatches == 0;
    if (!pass) result.verdict = Verdict::fail;
    // The case and the path on one line, the comparison on the next, so that a line fits the book's code column.
    result.report += fmt::format("{:<30} {}\n    max abs error {:.2e}  tolerance {:.2e}{}  {}\n", c.name, mechanism,
                                 error, tolerance, selection_note, pass ? "PASS" : "FAIL");
    for (const StateComparison& state : got.states) {
      if (!compare_state(c, state, result.report)) result.verdict = Verdict::fail;
    }
  }
  // (Only once everything was compared: a runner that returned nothing or the wrong shape has failed already.)
  if (const auto unread = c.tensors.unread(); compared_everything && !unread.empty())
    throw CaseError(
        fmt::format("{}: tensors.safetensors holds {} that neither the {} runner nor the harness reads "
                    "(the case and the runner disagree about the mechanism)",
                    c.name, fmt::join(unread, ", "), c.reference));
  return result;
}

}  // namespace

CheckResult check_case(const std::filesystem::path& dir, const std::map<std::string, Runner>& table) {
  std::string name = dir.filename().string();
  if (name.empty()) name = dir.parent_path().filename().string();
  std::string message;
  try {
    const Case c = read_case(dir);
    name = c.name;
    return check_or_throw(c, table);
  } catch (const CaseError& e) {
    message = e.what();
  } catch (const af::Error& e) {
    message = fmt::format("{}: {}", name, e.what());
  } catch (const nlohmann::json::exception& e) {  // a field read without a type check (names the JSON path)
    message = fmt::format("{}: a case.json field is missing or has the wrong type: {}", name, e.what());
  } catch (const std::exception& e) {
    message = fmt::format("{}: {}", name, e.what());
  } catch (...) {
    message = fmt::format("{}: an exception that is not a std::exception", name);
  }
  return {Verdict::malformed, fmt::format("{:<30} MALFORMED {}\n", name, message)};
}

}  // namespace oracle

#!/usr/bin/env python3
"""Write the oracle cases of Attention Forge (the contract: ORACLE.md; the format: tests/oracle/README.md).

Each case is one directory, <out>/<name>/, holding
  case.json            reference, layer_type, config, prefill_len, decode_steps, seed, tolerance,
                       description, generator
  tensors.safetensors  the module's parameters under their Hugging Face names, input.hidden_states,
                       input.position_ids, expected.prefill, expected.decode

Usage (on a machine with torch, transformers and safetensors; runs on the CPU in float32):
  python3 tests/oracle/make_cases.py --out tests/oracle/cases            # every case
  python3 tests/oracle/make_cases.py --out DIR --only sdpa_single_head_causal
  python3 tests/oracle/make_cases.py --list                               # needs no torch
  python3 tests/oracle/make_cases.py --out DIR --selftest                 # also checks uncommitted shapes

Extending: a reference is a pair of functions given to register_reference("name", ...): `record` builds
the module from a seeded generator and records prefill + decode through the reference's own cache;
`check` recomputes the expected outputs independently in float64. Cases are CaseSpec entries added with
add_case(...). Nothing is written unless the float64 check agrees.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
from typing import Any, Callable

try:  # torch is needed to generate cases, not to --list them
    import torch
    import torch.nn.functional as F
    _Module = torch.nn.Module
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None
    F = None
    _Module = object

SCRIPT = "tests/oracle/make_cases.py"
DEVICE = "cpu"
DTYPE_NAME = "float32"

# The ORACLE.md default: pass when max|got - expected| <= max_abs * max(1, max|expected|), where
# max|expected| is taken over all expected.* float tensors of the case together.
DEFAULT_TOLERANCE = {"max_abs": 1e-4, "relative_to": "max(1, max|expected|)"}

# The generator's own float64 recomputation must agree with the recorded float32 outputs to this,
# relative to max(1, max|reference|), before a case is written.
SELF_CHECK_LIMIT = 1e-5


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One case to record. `config` holds the reference's knobs; its builder completes it."""
    name: str
    reference: str
    seed: int
    prefill_len: int
    decode_steps: int
    config: dict[str, Any]
    description: str
    layer_type: str | None = None          # None: the reference's default layer type
    tolerance: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    committed: bool = True                 # False: built and checked by --selftest only, never written


@dataclasses.dataclass
class Recording:
    """What a reference's `record` returns."""
    config: dict[str, Any]                 # the full configuration the module was built from
    params: dict[str, Any]                 # name relative to the module -> float32 tensor
    hidden_states: Any                     # [1, T+N, hidden] float32
    position_ids: Any                      # [1, T+N] int64
    prefill: Any                           # [1, T, hidden] float32
    decode: Any                            # [1, N, hidden] float32
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # further tensors, saved as named


@dataclasses.dataclass(frozen=True)
class Reference:
    name: str
    layer_type: str
    record: Callable[[CaseSpec], Recording]
    # check(recording, spec) -> {tensor name: float64 tensor it recomputed}, compared to what was saved
    check: Callable[[Recording, CaseSpec], dict[str, Any]]
    summary: str


REFERENCES: dict[str, Reference] = {}
CASES: dict[str, CaseSpec] = {}


def register_reference(name: str, *, layer_type: str, record, check, summary: str) -> None:
    """Add a reference to the registry: `record(spec) -> Recording`, `check(recording, spec) -> dict`."""
    if name in REFERENCES:
        raise ValueError(f"reference {name!r} registered twice")
    REFERENCES[name] = Reference(name, layer_type, record, check, summary)


def add_case(spec: CaseSpec) -> None:
    if spec.name in CASES:
        raise ValueError(f"case {spec.name!r} defined twice")
    if spec.prefill_len < 1 or spec.decode_steps < 0:
        raise ValueError(f"case {spec.name!r}: need prefill_len >= 1 and decode_steps >= 0")
    CASES[spec.name] = spec


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

def seeded_generator(seed: int):
    g = torch.Generator(device=DEVICE)
    g.manual_seed(seed)
    return g


def randn(g, *shape: int, std: float = 1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float32, device=DEVICE) * std


def position_ids(total: int):
    return torch.arange(total, dtype=torch.int64, device=DEVICE).unsqueeze(0)


def relative_error(got, want) -> float:
    """max|got - want| / max(1, max|want|), in float64."""
    got = got.to(torch.float64)
    want = want.to(torch.float64)
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


# --------------------------------------------------------------------------------------------------
# Reference "sdpa": projections + torch.nn.functional.scaled_dot_product_attention
# --------------------------------------------------------------------------------------------------
#
# Parameters (names relative to the module, Hugging Face layout: out_features x in_features):
#   q_proj.weight [H*d, hidden]   k_proj.weight [G*d, hidden]   v_proj.weight [G*d, hidden]
#   o_proj.weight [hidden, H*d]   and, with attention_bias, q_proj.bias [H*d], k_proj.bias [G*d],
#   v_proj.bias [G*d] (o_proj has no bias).
# Head h of q occupies rows h*d .. h*d+d-1 of q_proj.weight (likewise k, v); query head h reads
# key/value head h // (H/G) (torch's enable_gqa, Hugging Face's repeat_kv).

SDPA_DEFAULTS = {
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "is_causal": True,
    "scale": None,            # None: 1/sqrt(head_dim); the float used is written to case.json
    "attention_bias": False,
}
SDPA_BIAS_STD = 0.5           # biases large enough that forgetting one fails the tolerance


def sdpa_config(partial: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(SDPA_DEFAULTS)
    cfg.update(partial)
    for key in ("hidden_size", "head_dim"):
        if key not in cfg:
            raise ValueError(f"sdpa config needs {key!r}")
    H, G = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if H < 1 or G < 1 or H % G != 0:
        raise ValueError(f"sdpa config: num_attention_heads {H} must be a multiple of num_key_value_heads {G}")
    if cfg["scale"] is None:
        cfg["scale"] = 1.0 / math.sqrt(cfg["head_dim"])
    cfg["scale"] = float(cfg["scale"])
    ordered = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "is_causal",
               "scale", "attention_bias"]
    return {k: cfg[k] for k in ordered} | {k: v for k, v in cfg.items() if k not in ordered}


class SdpaAttention(_Module):
    """Attention from four projections and torch's SDPA, with its own key/value cache."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, d = cfg["hidden_size"], cfg["head_dim"]
        self.H, self.G, self.d = cfg["num_attention_heads"], cfg["num_key_value_heads"], d
        self.scale = cfg["scale"]
        self.is_causal = cfg["is_causal"]
        bias = cfg["attention_bias"]
        self.q_proj = torch.nn.Linear(hidden, self.H * d, bias=bias, dtype=torch.float32)
        self.k_proj = torch.nn.Linear(hidden, self.G * d, bias=bias, dtype=torch.float32)
        self.v_proj = torch.nn.Linear(hidden, self.G * d, bias=bias, dtype=torch.float32)
        self.o_proj = torch.nn.Linear(self.H * d, hidden, bias=False, dtype=torch.float32)

    def forward(self, hidden_states, cache: dict[str, Any], *, decode: bool):
        b, L, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, L, self.H, self.d).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, L, self.G, self.d).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, L, self.G, self.d).transpose(1, 2)
        # The reference's own cache: concatenation along the sequence axis.
        cache["k"] = k if cache.get("k") is None else torch.cat([cache["k"], k], dim=2)
        cache["v"] = v if cache.get("v") is None else torch.cat([cache["v"], v], dim=2)
        # PITFALL: torch's is_causal mask is aligned top-left (query i sees keys 0..i). A single
        # decode query against S cached keys would then see key 0 only. The new token must see
        # every cached key, so decode calls use is_causal=False whatever the config says.
        causal = self.is_causal and not decode
        out = F.scaled_dot_product_attention(
            q, cache["k"], cache["v"], is_causal=causal, scale=self.scale,
            enable_gqa=(self.H != self.G))
        out = out.transpose(1, 2).reshape(b, L, self.H * self.d)
        return self.o_proj(out)


def record_sdpa(spec: CaseSpec) -> Recording:
    cfg = sdpa_config(spec.config)
    T, N = spec.prefill_len, spec.decode_steps
    hidden, d, H, G = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    g = seeded_generator(spec.seed)
    # Draw order is part of the case's definition: weights, then biases, then the input.
    params = {
        "q_proj.weight": randn(g, H * d, hidden, std=1 / math.sqrt(hidden)),
        "k_proj.weight": randn(g, G * d, hidden, std=1 / math.sqrt(hidden)),
        "v_proj.weight": randn(g, G * d, hidden, std=1 / math.sqrt(hidden)),
        "o_proj.weight": randn(g, hidden, H * d, std=1 / math.sqrt(H * d)),
    }
    if cfg["attention_bias"]:
        params["q_proj.bias"] = randn(g, H * d, std=SDPA_BIAS_STD)
        params["k_proj.bias"] = randn(g, G * d, std=SDPA_BIAS_STD)
        params["v_proj.bias"] = randn(g, G * d, std=SDPA_BIAS_STD)
    x = randn(g, 1, T + N, hidden)

    module = SdpaAttention(cfg).eval()
    missing, unexpected = module.load_state_dict(params, strict=True)
    assert not missing and not unexpected

    cache: dict[str, Any] = {}
    with torch.no_grad():
        prefill = module(x[:, :T], cache, decode=False)
        steps = [module(x[:, T + i:T + i + 1], cache, decode=True) for i in range(N)]
    decode = torch.cat(steps, dim=1) if steps else torch.zeros(1, 0, hidden, dtype=torch.float32)
    assert cache["k"].shape[2] == T + N

    return Recording(config=cfg, params=params, hidden_states=x, position_ids=position_ids(T + N),
                     prefill=prefill.contiguous(), decode=decode.contiguous())


def check_sdpa(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    """Independent float64 recomputation: explicit matmuls, a position mask over all T+N tokens at
    once, and softmax. No SDPA, no cache."""
    cfg = rec.config
    T, N = spec.prefill_len, spec.decode_steps
    H, G, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    L = T + N
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]                     # [L, hidden]

    def proj(name):
        y = x @ p[f"{name}.weight"].T
        return y + p[f"{name}.bias"] if f"{name}.bias" in p else y

    q = proj("q_proj").reshape(L, H, d)
    k = proj("k_proj").reshape(L, G, d)
    v = proj("v_proj").reshape(L, G, d)

    # Row i is the token at position i. Decode rows (i >= T) see keys 0..i. Prefill rows see keys
    # 0..i when causal, all T prefill keys otherwise.
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(L).unsqueeze(0)
    if cfg["is_causal"]:
        allowed = j <= i
    else:
        allowed = torch.where(i < T, j < T, j <= i)

    heads = []
    for h in range(H):
        kv = h // (H // G)
        s = (q[:, h, :] @ k[:, kv, :].T) * cfg["scale"]
        s = s.masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        w = w / w.sum(dim=1, keepdim=True)
        heads.append(w @ v[:, kv, :])
    out = torch.cat(heads, dim=1) @ p["o_proj.weight"].T               # [L, hidden]
    return {"expected.prefill": out[:T].unsqueeze(0), "expected.decode": out[T:].unsqueeze(0)}


register_reference(
    "sdpa", layer_type="attention", record=record_sdpa, check=check_sdpa,
    summary="q/k/v/o projections + torch SDPA, own concatenating KV cache (MHA/MQA/GQA by head counts)")


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

def _sdpa_case(name, seed, T, N, description, committed=True, **config):
    add_case(CaseSpec(name=name, reference="sdpa", seed=seed, prefill_len=T, decode_steps=N,
                      config=config, description=description, committed=committed))


_sdpa_case("sdpa_single_head_causal", 1001, 7, 5,
           "Single-head causal attention: causal prefill of 7 tokens, then 5 decode steps through the cache.",
           hidden_size=64, head_dim=16)
_sdpa_case("sdpa_single_head_noncausal", 1002, 9, 4,
           "Single-head non-causal attention: bidirectional prefill of 9 tokens; each of the 4 decode "
           "steps attends to every cached token (itself included).",
           hidden_size=48, head_dim=32, is_causal=False)
_sdpa_case("sdpa_single_head_bias_scale", 1003, 12, 6,
           "Single-head causal attention with q/k/v projection biases (o_proj has none) and a softmax "
           "scale of 0.3 instead of 1/sqrt(head_dim).",
           hidden_size=96, head_dim=24, attention_bias=True, scale=0.3)
_sdpa_case("sdpa_single_head_prefill1", 1004, 1, 8,
           "Single-head causal attention: a one-token prefill, then 8 decode steps (the cache grows 1 -> 9).",
           hidden_size=32, head_dim=8)
_sdpa_case("sdpa_single_head_wide", 1005, 33, 3,
           "Single-head causal attention, wide: hidden 256, head_dim 128, prefill of 33 tokens, 3 decode steps.",
           hidden_size=256, head_dim=128)

# Chapters 02-04: several heads. Query head h reads KV head h // (H // G) (SDPA's enable_gqa).
_sdpa_case("sdpa_mha_h4", 2001, 9, 4,
           "Multi-head attention, H = G = 4 heads of dimension 16: causal prefill of 9, then 4 decode steps.",
           hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=4)
_sdpa_case("sdpa_gqa_h8_g2", 2002, 11, 5,
           "Grouped-query attention, H = 8 query heads sharing G = 2 KV heads (groups of 4), with biases.",
           hidden_size=64, head_dim=8, num_attention_heads=8, num_key_value_heads=2, attention_bias=True)
_sdpa_case("sdpa_gqa_h6_g3", 2003, 5, 6,
           "Grouped-query attention, H = 6, G = 3 (groups of 2), head_dim 16, scale 0.2.",
           hidden_size=48, head_dim=16, num_attention_heads=6, num_key_value_heads=3, scale=0.2)
_sdpa_case("sdpa_mqa_h4", 2004, 7, 5,
           "Multi-query attention, H = 4 query heads sharing one KV head.",
           hidden_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=1)
_sdpa_case("sdpa_mqa_noncausal", 2005, 6, 3,
           "Multi-query attention, H = 4, G = 1, non-causal prefill.",
           hidden_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=1, is_causal=False)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

def generator_info(argv: list[str]) -> dict[str, Any]:
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    import safetensors
    return {
        "command": " ".join(["python3", SCRIPT] + argv),
        "torch": torch.__version__,
        "transformers": tf_version,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "device": DEVICE,
        "dtype": DTYPE_NAME,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }


def configure_torch() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)          # tiny shapes; one thread keeps the float32 sums reproducible


def validate(rec: Recording, spec: CaseSpec) -> float:
    T, N = spec.prefill_len, spec.decode_steps
    hidden = rec.config["hidden_size"]
    shapes = {"input.hidden_states": (rec.hidden_states, (1, T + N, hidden), torch.float32),
              "input.position_ids": (rec.position_ids, (1, T + N), torch.int64),
              "expected.prefill": (rec.prefill, (1, T, hidden), torch.float32),
              "expected.decode": (rec.decode, (1, N, hidden), torch.float32)}
    for name, (t, shape, dtype) in shapes.items():
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise AssertionError(f"{spec.name}: {name} is {tuple(t.shape)} {t.dtype}, want {shape} {dtype}")
    for name, t in list(rec.params.items()) + list(rec.extra.items()):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise AssertionError(f"{spec.name}: {name} is {t.dtype}, want float32")
    for name, t in [("input.hidden_states", rec.hidden_states), ("expected.prefill", rec.prefill),
                    ("expected.decode", rec.decode)] + list(rec.params.items()):
        if not torch.isfinite(t).all():
            raise AssertionError(f"{spec.name}: {name} is not finite")
        if t.numel() and float(t.abs().max()) == 0.0:
            raise AssertionError(f"{spec.name}: {name} is all zeros")

    recomputed = REFERENCES[spec.reference].check(rec, spec)
    saved = {"expected.prefill": rec.prefill, "expected.decode": rec.decode} | rec.extra
    worst = 0.0
    for name, want in recomputed.items():
        got = saved[name]
        if got.numel() == 0:
            continue
        err = relative_error(got, want)
        worst = max(worst, err)
        if not err < SELF_CHECK_LIMIT:
            raise AssertionError(f"{spec.name}: {name} differs from the float64 recomputation by {err:.3e} "
                                 f"(relative to max(1, max|ref|)); limit {SELF_CHECK_LIMIT:g}")
    return worst


def write_case(out_dir: str, spec: CaseSpec, rec: Recording, gen: dict[str, Any]) -> str:
    from safetensors.torch import save_file
    case_dir = os.path.join(out_dir, spec.name)
    os.makedirs(case_dir, exist_ok=True)
    tensors = {name: t.detach().to(DEVICE).contiguous() for name, t in rec.params.items()}
    tensors |= {"input.hidden_states": rec.hidden_states, "input.position_ids": rec.position_ids,
                "expected.prefill": rec.prefill, "expected.decode": rec.decode}
    tensors |= {name: t.contiguous() for name, t in rec.extra.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(case_dir, "tensors.safetensors"),
              metadata={"format": "pt"})
    meta = {
        "name": spec.name,
        "reference": spec.reference,
        "layer_type": spec.layer_type or REFERENCES[spec.reference].layer_type,
        "description": spec.description,
        "config": rec.config,
        "prefill_len": spec.prefill_len,
        "decode_steps": spec.decode_steps,
        "seed": spec.seed,
        "tolerance": spec.tolerance,
        "generator": gen,
    }
    with open(os.path.join(case_dir, "case.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return case_dir


def pitfall_demo() -> float:
    """Show the decode pitfall: with one query and several keys, is_causal=True lets the query see
    key 0 only. Returns the difference from attending to everything (must be large)."""
    g = seeded_generator(7)
    q, k, v = randn(g, 1, 1, 1, 8), randn(g, 1, 1, 5, 8), randn(g, 1, 1, 5, 8)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if not torch.allclose(top_left, v[:, :, :1], atol=1e-6):
        raise AssertionError("torch's is_causal is no longer top-left aligned; revisit the decode path")
    full = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    return float((full - top_left).abs().max())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="directory to write <out>/<case>/{case.json,tensors.safetensors}")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="write only these cases")
    ap.add_argument("--list", action="store_true", help="list references and cases, then exit")
    ap.add_argument("--selftest", action="store_true",
                    help="also build and check the uncommitted selftest_* cases (never written)")
    args = ap.parse_args(argv)

    if args.list:
        for r in REFERENCES.values():
            print(f"reference {r.name:<12} layer_type={r.layer_type:<10} {r.summary}")
        for s in CASES.values():
            tag = "" if s.committed else "  [selftest only]"
            print(f"case {s.name:<32} reference={s.reference:<8} T={s.prefill_len:<3} N={s.decode_steps:<3}"
                  f" seed={s.seed}{tag}")
        return 0
    if not args.out:
        ap.error("--out DIR is required (or --list)")
    if torch is None:
        print("make_cases.py: torch is not installed here; run it where torch and transformers are", file=sys.stderr)
        return 2

    if args.only:
        unknown = [n for n in args.only if n not in CASES]
        if unknown:
            ap.error(f"unknown case(s): {', '.join(unknown)} (see --list)")
        chosen = [CASES[n] for n in args.only]
    else:
        chosen = [s for s in CASES.values() if s.committed]
    if args.selftest:
        chosen += [s for s in CASES.values() if not s.committed and s not in chosen]

    configure_torch()
    gen = generator_info(argv)
    print(f"generator: torch {gen['torch']}, transformers {gen['transformers']}, safetensors "
          f"{gen['safetensors']}, python {gen['python']}, device {gen['device']}")
    if args.selftest:
        print(f"pitfall: is_causal=True with 1 query x 5 keys sees key 0 only (differs by {pitfall_demo():.3f})")

    for spec in chosen:
        rec = REFERENCES[spec.reference].record(spec)
        err = validate(rec, spec)
        # Determinism: a second recording from the same seed must be bit-identical.
        again = REFERENCES[spec.reference].record(spec)
        for a, b in [(rec.prefill, again.prefill), (rec.decode, again.decode)]:
            if not torch.equal(a, b):
                raise AssertionError(f"{spec.name}: two recordings from seed {spec.seed} differ")
        max_expected = max(float(t.abs().max()) for t in (rec.prefill, rec.decode) if t.numel())
        where = write_case(args.out, spec, rec, gen) if spec.committed else "(not written)"
        c = rec.config
        heads = f"H={c.get('num_attention_heads')} G={c.get('num_key_value_heads')}"
        print(f"{spec.name:<32} {spec.reference:<6} hidden={c.get('hidden_size'):<4} d={c.get('head_dim'):<4} "
              f"{heads} T={spec.prefill_len:<3} N={spec.decode_steps:<3} causal={c.get('is_causal')!s:<5} "
              f"bias={c.get('attention_bias')!s:<5} scale={c.get('scale'):.6g} "
              f"hidden_states={list(rec.hidden_states.shape)} prefill={list(rec.prefill.shape)} "
              f"decode={list(rec.decode.shape)} max|expected|={max_expected:.4f} self_check={err:.2e} {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

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
import traceback
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

# A contrast (a deliberately wrong recomputation, e.g. RoPE without the llama3 scaling) must differ from
# the recorded outputs by at least this, relative to max(1, max|ref|): 100x the default tolerance.
CONTRAST_MIN = 1e-2


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
    position_offset: int = 0               # position id of the first token (Hugging Face references)


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
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)   # further case.json fields


@dataclasses.dataclass(frozen=True)
class Reference:
    name: str
    layer_type: str
    record: Callable[[CaseSpec], Recording]
    # check(recording, spec) -> {tensor name: float64 tensor it recomputed}, compared to what was saved
    check: Callable[[Recording, CaseSpec], dict[str, Any]]
    summary: str
    # describe(recording, spec) -> the reference-specific part of the summary line
    describe: Callable[[Recording, CaseSpec], str] | None = None
    # contrasts(recording, spec) -> {label: relative error of a deliberately wrong float64 recomputation}.
    # Each must exceed CONTRAST_MIN: it shows the case catches that mistake.
    contrasts: Callable[[Recording, CaseSpec], dict[str, float]] | None = None
    # notes(recording, spec) -> extra lines printed under the summary line
    notes: Callable[[Recording, CaseSpec], list[str]] | None = None


REFERENCES: dict[str, Reference] = {}
CASES: dict[str, CaseSpec] = {}


def register_reference(name: str, *, layer_type: str, record, check, summary: str,
                       describe=None, contrasts=None, notes=None) -> None:
    """Add a reference to the registry: `record(spec) -> Recording`, `check(recording, spec) -> dict`;
    optionally `describe`, `contrasts` and `notes` for the summary (see Reference)."""
    if name in REFERENCES:
        raise ValueError(f"reference {name!r} registered twice")
    REFERENCES[name] = Reference(name, layer_type, record, check, summary, describe, contrasts, notes)


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


def describe_sdpa(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"hidden={c['hidden_size']:<4} d={c['head_dim']:<4} H={c['num_attention_heads']} "
            f"G={c['num_key_value_heads']} causal={c['is_causal']!s:<5} bias={c['attention_bias']!s:<5} "
            f"scale={c['scale']:.6g}")


register_reference(
    "sdpa", layer_type="attention", record=record_sdpa, check=check_sdpa, describe=describe_sdpa,
    summary="q/k/v/o projections + torch SDPA, own concatenating KV cache (MHA/MQA/GQA by head counts)")


# --------------------------------------------------------------------------------------------------
# Hugging Face references: a tiny random-weight model, one layer's attention module hooked
# --------------------------------------------------------------------------------------------------
#
# The model (LlamaModel / DeepseekV3Model, attn_implementation="eager", float32) is built from a tiny
# config with torch.manual_seed(seed); then every parameter of the hooked attention module
# (model.layers[HF_HOOKED_LAYER].self_attn) is overwritten from seeded_generator(seed), in sorted
# name order: RMSNorm weights 1 + 0.2*N(0,1) (so a forgotten norm weight fails), biases 0.5*N(0,1),
# matrices N(0,1)/sqrt(fan_in). Then token ids are drawn (uniform over the vocabulary). The model runs
# a prefill of T tokens and N single-token steps through its own DynamicCache (use_cache=True,
# explicit position_ids = offset + 0 .. T+N-1); a forward pre-hook and a forward hook (with_kwargs=True)
# on the module record its input hidden_states and position_ids and its output (the first element of
# the tuple it returns).

HF_HOOKED_LAYER = 1            # layers.1.self_attn: its input has passed through a whole decoder layer
HF_NORM_WEIGHT_STD = 0.2
HF_BIAS_STD = 0.5

LLAMA_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": False,
}

DEEPSEEK_V3_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 2,      # every layer dense: no mixture of experts is built
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def json_safe(value):
    """A JSON-serialisable copy of a config value: containers recursed, torch dtypes and other objects
    stringified, non-finite floats kept out of the JSON (as strings)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _hf_init_params(module, g) -> dict[str, Any]:
    """Overwrite every parameter of `module` with seeded values; return {name: tensor}."""
    if list(module.named_buffers()):
        raise AssertionError(f"attention module has buffers {[n for n, _ in module.named_buffers()]}; save them too")
    params = {}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("norm.weight"):
                value = 1.0 + randn(g, *p.shape, std=HF_NORM_WEIGHT_STD)
            elif name.endswith(".bias"):
                value = randn(g, *p.shape, std=HF_BIAS_STD)
            elif p.ndim == 2:
                value = randn(g, *p.shape, std=1 / math.sqrt(p.shape[1]))
            else:
                raise AssertionError(f"no initialisation rule for parameter {name} {tuple(p.shape)}")
            p.copy_(value)
            params[name] = value.clone()
    return params


def _hf_record(spec: CaseSpec, config_cls, model_cls, config_kwargs: dict[str, Any]) -> Recording:
    T, N = spec.prefill_len, spec.decode_steps
    L = T + N
    config = config_cls(**config_kwargs)
    torch.manual_seed(spec.seed)                       # the rest of the model (embeddings, MLPs, norms)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    if model.config._attn_implementation != "eager":
        raise AssertionError(f"{spec.name}: attention implementation is {model.config._attn_implementation}")
    attn = model.layers[HF_HOOKED_LAYER].self_attn

    g = seeded_generator(spec.seed)
    params = _hf_init_params(attn, g)
    ids = torch.randint(0, config.vocab_size, (1, L), generator=g, dtype=torch.int64)
    pos = torch.arange(spec.position_offset, spec.position_offset + L, dtype=torch.int64).unsqueeze(0)

    seen: dict[str, list] = {"hidden_states": [], "position_ids": [], "output": []}

    def pre_hook(module, args, kwargs):
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["hidden_states"].append(hs.detach().clone())
        seen["position_ids"].append(kwargs["position_ids"].detach().clone())

    def post_hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        seen["output"].append(out.detach().clone())

    from transformers import DynamicCache
    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True),
               attn.register_forward_hook(post_hook, with_kwargs=True)]
    try:
        with torch.no_grad():
            cache = DynamicCache(config=config)
            model(input_ids=ids[:, :T], position_ids=pos[:, :T], past_key_values=cache, use_cache=True)
            for i in range(N):
                model(input_ids=ids[:, T + i:T + i + 1], position_ids=pos[:, T + i:T + i + 1],
                      past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    if len(seen["output"]) != N + 1 or cache.get_seq_length() != L:
        raise AssertionError(f"{spec.name}: {len(seen['output'])} module calls, cache length "
                             f"{cache.get_seq_length()}; want {N + 1} and {L}")
    if [t.shape[1] for t in seen["hidden_states"]] != [T] + [1] * N:
        raise AssertionError(f"{spec.name}: unexpected call lengths {[t.shape for t in seen['hidden_states']]}")
    hidden_states = torch.cat(seen["hidden_states"], dim=1).to(torch.float32).contiguous()
    position_ids = torch.cat(seen["position_ids"], dim=1).to(torch.int64).contiguous()
    if not torch.equal(position_ids, pos):
        raise AssertionError(f"{spec.name}: the module saw position ids {position_ids.tolist()}, passed {pos.tolist()}")
    prefill = seen["output"][0].contiguous()
    decode = (torch.cat(seen["output"][1:], dim=1) if N else
              torch.zeros(1, 0, config.hidden_size, dtype=torch.float32)).contiguous()
    return Recording(config=json_safe(config.to_dict()), params=params, hidden_states=hidden_states,
                     position_ids=position_ids, prefill=prefill, decode=decode,
                     meta={"module": f"layers.{HF_HOOKED_LAYER}.self_attn",
                           "position_offset": spec.position_offset})


# ---- float64 pieces shared by the checks (written from the formulas; no transformers code) ----------

def rope_inv_freq64(dim: int, rope_parameters: dict[str, Any], *, ignore_scaling: bool = False):
    """Inverse frequencies theta^(-2i/dim), i = 0 .. dim/2-1, in float64; with rope_type "llama3" (and
    not ignore_scaling), Llama 3.1's band-wise scaling."""
    theta = float(rope_parameters["rope_theta"])
    if float(rope_parameters.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor")
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kind = rope_parameters.get("rope_type", "default")
    if kind == "default" or ignore_scaling:
        return inv
    if kind != "llama3":
        raise NotImplementedError(f"rope_type {kind!r}")
    factor = float(rope_parameters["factor"])
    low, high = float(rope_parameters["low_freq_factor"]), float(rope_parameters["high_freq_factor"])
    old_ctx = float(rope_parameters["original_max_position_embeddings"])
    out = inv.clone()
    for i, f in enumerate(inv.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:                 # high-frequency band: unchanged
            out[i] = f
        elif wavelen > old_ctx / low:                # low-frequency band: divided by factor
            out[i] = f / factor
        else:                                        # between: interpolate in 1/wavelength
            smooth = (old_ctx / wavelen - low) / (high - low)
            out[i] = (1 - smooth) * f / factor + smooth * f
    return out


def rope64(x, positions, inv_freq, *, interleaved: bool):
    """Rotate the last axis of x [L, ..., dim] by position * inv_freq. interleaved: pairs (2i, 2i+1),
    output in the same interleaved order; otherwise pairs (i, i + dim/2) (rotate_half)."""
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]             # [L, dim/2]
    shape = [ang.shape[0]] + [1] * (x.ndim - 2) + [ang.shape[1]]
    cos, sin = torch.cos(ang).reshape(shape), torch.sin(ang).reshape(shape)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(x.shape)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rms_norm64(x, weight, eps: float):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def causal_attention64(q, k, v, scale: float):
    """q [L, H, dq], k [L, H or 1 or G, dq], v [L, ., dv]: row i sees keys 0..i (the prefill's causal mask
    and, for the decode rows, every cached key). Query head h reads KV head h // (H / G)."""
    L, H = q.shape[0], q.shape[1]
    G = k.shape[1]
    allowed = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    heads = []
    for h in range(H):
        kv = h // (H // G)
        s = (q[:, h, :] @ k[:, kv, :].T) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        heads.append((w / w.sum(dim=1, keepdim=True)) @ v[:, kv, :])
    return torch.cat(heads, dim=1)                                             # [L, H*dv]


def _linear64(x, p, name):
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def _split_expected(out, T):
    return {"expected.prefill": out[:T].unsqueeze(0), "expected.decode": out[T:].unsqueeze(0)}


def _contrast_error(rec: Recording, recomputed: dict[str, Any]) -> float:
    saved = {"expected.prefill": rec.prefill, "expected.decode": rec.decode}
    want = torch.cat([saved[k].to(torch.float64).reshape(-1) for k in saved])
    got = torch.cat([recomputed[k].reshape(-1) for k in saved])
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


# ---- Reference "llama": transformers' LlamaAttention ------------------------------------------------
#
# Parameters: q_proj.weight [H*d, hidden], k_proj.weight [G*d, hidden], v_proj.weight [G*d, hidden],
# o_proj.weight [hidden, H*d]; with attention_bias also q_proj.bias, k_proj.bias, v_proj.bias AND
# o_proj.bias [hidden] (Llama puts a bias on all four). RoPE (half-split, rotate_half) on q and k after
# the projections, keys cached after rotation; scale d^-0.5; GQA by repeat_kv; causal.

def llama_config_kwargs(partial: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(LLAMA_DEFAULTS))
    cfg.update(partial)
    return cfg


def record_llama(spec: CaseSpec) -> Recording:
    from transformers import LlamaConfig, LlamaModel
    return _hf_record(spec, LlamaConfig, LlamaModel, llama_config_kwargs(spec.config))


def _llama64(rec: Recording, spec: CaseSpec, *, ignore_scaling: bool = False):
    c = rec.config
    H, G, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(spec.position_offset, spec.position_offset + L)   # not the recorded ones
    inv = rope_inv_freq64(d, c["rope_parameters"], ignore_scaling=ignore_scaling)
    q = rope64(_linear64(x, p, "q_proj").reshape(L, H, d), positions, inv, interleaved=False)
    k = rope64(_linear64(x, p, "k_proj").reshape(L, G, d), positions, inv, interleaved=False)
    v = _linear64(x, p, "v_proj").reshape(L, G, d)
    out = _linear64(causal_attention64(q, k, v, d ** -0.5), p, "o_proj")
    return _split_expected(out, spec.prefill_len)


def check_llama(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _llama64(rec, spec)


def llama3_bands(rope_parameters: dict[str, Any], dim: int) -> list[tuple[int, float, str]]:
    """(pair index, wavelength 2*pi/inv_freq before scaling, band) for each rotary pair."""
    inv = rope_inv_freq64(dim, rope_parameters, ignore_scaling=True)
    old_ctx = float(rope_parameters["original_max_position_embeddings"])
    hi_wl = old_ctx / float(rope_parameters["high_freq_factor"])
    lo_wl = old_ctx / float(rope_parameters["low_freq_factor"])
    bands = []
    for i, f in enumerate(inv.tolist()):
        wl = 2 * math.pi / f
        bands.append((i, wl, "high(kept)" if wl < hi_wl else "low(/factor)" if wl > lo_wl else "mid(smoothed)"))
    return bands


def contrasts_llama(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    if rec.config["rope_parameters"].get("rope_type", "default") == "default":
        return {}
    return {"no_llama3_scaling": _contrast_error(rec, _llama64(rec, spec, ignore_scaling=True))}


def notes_llama(rec: Recording, spec: CaseSpec) -> list[str]:
    rp = rec.config["rope_parameters"]
    if rp.get("rope_type", "default") != "llama3":
        return []
    old_ctx = float(rp["original_max_position_embeddings"])
    lines = [f"  llama3 bands: high_freq_wavelen = {old_ctx / float(rp['high_freq_factor']):g}, "
             f"low_freq_wavelen = {old_ctx / float(rp['low_freq_factor']):g}, factor = {rp['factor']}"]
    lines += [f"    pair {i:2d}: wavelength {wl:12.3f}  {band}" for i, wl, band in
              llama3_bands(rp, rec.config["head_dim"])]
    counts = {b: sum(1 for *_, x in llama3_bands(rp, rec.config["head_dim"]) if x == b)
              for b in ("high(kept)", "mid(smoothed)", "low(/factor)")}
    if min(counts.values()) == 0:
        raise AssertionError(f"{spec.name}: a llama3 band is empty: {counts}")
    lines.append(f"  llama3 band counts: {counts}")
    return lines


def describe_llama(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    rp = c["rope_parameters"]
    return (f"hidden={c['hidden_size']:<4} d={c['head_dim']:<4} H={c['num_attention_heads']} "
            f"G={c['num_key_value_heads']} theta={rp['rope_theta']:g} rope_type={rp.get('rope_type')} "
            f"bias={c['attention_bias']!s:<5} scale={c['head_dim'] ** -0.5:.6g} offset={spec.position_offset}")


register_reference(
    "llama", layer_type="attention", record=record_llama, check=check_llama, describe=describe_llama,
    contrasts=contrasts_llama, notes=notes_llama,
    summary="transformers LlamaAttention (eager) in a tiny LlamaModel: GQA, half-split RoPE, llama3 scaling")


# ---- Reference "deepseek_v3": transformers' DeepseekV3Attention (Multi-head Latent Attention) --------
#
# Parameters (H = num_attention_heads, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim,
# r = kv_lora_rank, rq = q_lora_rank):
#   with q_lora_rank: q_a_proj.weight [rq, hidden], q_a_layernorm.weight [rq], q_b_proj.weight [H*(dn+dr), rq]
#   without:          q_proj.weight [H*(dn+dr), hidden]
#   kv_a_proj_with_mqa.weight [r+dr, hidden], kv_a_layernorm.weight [r], kv_b_proj.weight [H*(dn+dv), r],
#   o_proj.weight [hidden, H*dv]; with attention_bias: q_a_proj.bias, kv_a_proj_with_mqa.bias, o_proj.bias.
# Both RMSNorms inside the module are built with the class default eps = 1e-6 (not config.rms_norm_eps,
# which only the decoder layer's norms use); the cases keep rms_norm_eps = 1e-6 so both readings agree.
DEEPSEEK_V3_NORM_EPS = 1e-6


def deepseek_v3_config_kwargs(partial: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(DEEPSEEK_V3_DEFAULTS))
    cfg.update(partial)
    # The config's default num_key_value_heads is 128, not "same as num_attention_heads"; the module expands
    # every head's key itself, and num_key_value_groups = H // num_key_value_heads must be 1.
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    return cfg


def record_deepseek_v3(spec: CaseSpec) -> Recording:
    from transformers import DeepseekV3Config, DeepseekV3Model
    return _hf_record(spec, DeepseekV3Config, DeepseekV3Model, deepseek_v3_config_kwargs(spec.config))


def _deepseek_v3_64(rec: Recording, spec: CaseSpec, *, interleaved: bool | None = None):
    c = rec.config
    H, dn, dr, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    r, rq = c["kv_lora_rank"], c["q_lora_rank"]
    rp = c["rope_parameters"]
    if rp.get("rope_type", "default") != "default":
        raise NotImplementedError("deepseek_v3 check: rope scaling (YaRN mscale) is not handled")
    if c["num_key_value_heads"] != H:
        raise AssertionError("deepseek_v3: num_key_value_heads must equal num_attention_heads")
    if interleaved is None:
        interleaved = bool(c["rope_interleave"])
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(spec.position_offset, spec.position_offset + L)
    inv = rope_inv_freq64(dr, rp)

    if rq is None:
        q = _linear64(x, p, "q_proj")
    else:
        q = _linear64(rms_norm64(_linear64(x, p, "q_a_proj"), p["q_a_layernorm.weight"], DEEPSEEK_V3_NORM_EPS),
                      p, "q_b_proj")
    q = q.reshape(L, H, dn + dr)
    q_nope, q_pe = q[..., :dn], rope64(q[..., dn:], positions, inv, interleaved=interleaved)

    kv_a = _linear64(x, p, "kv_a_proj_with_mqa")                               # [L, r + dr]
    c_kv = rms_norm64(kv_a[:, :r], p["kv_a_layernorm.weight"], DEEPSEEK_V3_NORM_EPS)
    k_pe = rope64(kv_a[:, None, r:], positions, inv, interleaved=interleaved)   # [L, 1, dr], all heads
    kv = (c_kv @ p["kv_b_proj.weight"].T).reshape(L, H, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]

    q_full = torch.cat([q_nope, q_pe], dim=-1)
    k_full = torch.cat([k_nope, k_pe.expand(L, H, dr)], dim=-1)
    out = _linear64(causal_attention64(q_full, k_full, v, (dn + dr) ** -0.5), p, "o_proj")
    return _split_expected(out, spec.prefill_len)


def check_deepseek_v3(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _deepseek_v3_64(rec, spec)


def contrasts_deepseek_v3(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    other = "half_split" if rec.config["rope_interleave"] else "interleaved"
    return {f"rope_{other}": _contrast_error(rec, _deepseek_v3_64(rec, spec,
                                                                  interleaved=not rec.config["rope_interleave"]))}


def describe_deepseek_v3(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"hidden={c['hidden_size']:<4} H={c['num_attention_heads']} q_lora={c['q_lora_rank']} "
            f"kv_lora={c['kv_lora_rank']} nope={c['qk_nope_head_dim']} rope={c['qk_rope_head_dim']} "
            f"v={c['v_head_dim']} interleave={c['rope_interleave']!s:<5} "
            f"theta={c['rope_parameters']['rope_theta']:g} "
            f"scale={(c['qk_nope_head_dim'] + c['qk_rope_head_dim']) ** -0.5:.6g}")


register_reference(
    "deepseek_v3", layer_type="attention", record=record_deepseek_v3, check=check_deepseek_v3,
    describe=describe_deepseek_v3, contrasts=contrasts_deepseek_v3,
    summary="transformers DeepseekV3Attention (MLA, eager) in a tiny dense DeepseekV3Model, latent cache")


# ---- Reference "mistral": transformers' MistralAttention with a sliding window ------------------------
#
# Parameters as for "llama" without biases: q_proj.weight [H*d, hidden], k_proj.weight [G*d, hidden],
# v_proj.weight [G*d, hidden], o_proj.weight [hidden, H*d]. Half-split RoPE on q and k, keys cached after
# rotation, scale d^-0.5, GQA by repeat_kv. The window (transformers' masking_utils, sliding_window_overlay
# AND the causal mask): key k is visible to query q iff  k <= q  and  k > q - sliding_window,  i.e.
# 0 <= q - k < W: the query sees itself and the W - 1 tokens before it. The model's DynamicCache keeps a
# sliding layer's last W - 1 keys between calls (with the new token that makes W). The cases use
# T + N > W + 1 so that the window edge is crossed during the prefill and again during decode.

MISTRAL_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def mistral_config_kwargs(partial: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(MISTRAL_DEFAULTS))
    cfg.update(partial)
    return cfg


def record_mistral(spec: CaseSpec) -> Recording:
    from transformers import MistralConfig, MistralModel
    cfg = mistral_config_kwargs(spec.config)
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or spec.prefill_len + spec.decode_steps <= window + 1:
        raise AssertionError(f"{spec.name}: need an integer sliding_window and T + N > W + 1, got W={window}")
    rec = _hf_record(spec, MistralConfig, MistralModel, cfg)
    if rec.config.get("sliding_window") != window:
        raise AssertionError(f"{spec.name}: the built config has sliding_window {rec.config.get('sliding_window')}")
    return rec


def windowed_attention64(q, k, v, scale: float, window: int | None):
    """causal_attention64 with a window: row i sees keys j with 0 <= i - j < window (None: all j <= i)."""
    L, H = q.shape[0], q.shape[1]
    G = k.shape[1]
    distance = torch.arange(L)[:, None] - torch.arange(L)[None, :]            # i - j
    allowed = distance >= 0 if window is None else (distance >= 0) & (distance < window)
    heads = []
    for h in range(H):
        kv = h // (H // G)
        s = (q[:, h, :] @ k[:, kv, :].T) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        heads.append((w / w.sum(dim=1, keepdim=True)) @ v[:, kv, :])
    return torch.cat(heads, dim=1)                                             # [L, H*dv]


def _mistral64(rec: Recording, spec: CaseSpec, *, window_shift: int = 0, no_window: bool = False):
    c = rec.config
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or c["hidden_size"] // H
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(spec.position_offset, spec.position_offset + L)
    inv = rope_inv_freq64(d, c["rope_parameters"])
    q = rope64(_linear64(x, p, "q_proj").reshape(L, H, d), positions, inv, interleaved=False)
    k = rope64(_linear64(x, p, "k_proj").reshape(L, G, d), positions, inv, interleaved=False)
    v = _linear64(x, p, "v_proj").reshape(L, G, d)
    window = None if no_window else c["sliding_window"] + window_shift
    out = _linear64(windowed_attention64(q, k, v, d ** -0.5, window), p, "o_proj")
    return _split_expected(out, spec.prefill_len)


def check_mistral(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _mistral64(rec, spec)


def contrasts_mistral(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    # The off-by-one reading (q - k <= W) and no window at all must both be caught.
    return {"window_edge_q-k<=W": _contrast_error(rec, _mistral64(rec, spec, window_shift=1)),
            "no_window": _contrast_error(rec, _mistral64(rec, spec, no_window=True))}


def describe_mistral(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return (f"hidden={c['hidden_size']:<4} d={d:<4} H={c['num_attention_heads']} G={c['num_key_value_heads']} "
            f"W={c['sliding_window']} theta={c['rope_parameters']['rope_theta']:g} offset={spec.position_offset}")


register_reference(
    "mistral", layer_type="sliding_attention", record=record_mistral, check=check_mistral,
    describe=describe_mistral, contrasts=contrasts_mistral,
    summary="transformers MistralAttention (eager) in a tiny MistralModel: GQA, RoPE, sliding window 0<=q-k<W")


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


# Chapter 09: kept sink tokens (StreamingLLM). No model layer ships this mask, so the reference is the sdpa
# module's projections with torch SDPA under an explicit boolean mask: query q sees key k iff k <= q and
# (k < sinks or q - k < window). Its own cache evicts: after every call it keeps the first `sinks` tokens and
# the last window - 1 (all the next query can see besides itself), so the stream of T + N > sinks + window
# tokens really runs through a bounded cache. No RoPE: the positions question is the library's (tested in
# tests/test_sinks.cpp); this case pins the mask and the eviction.

def _sink_visible(q_idx, k_idx, sinks: int, window: int):
    q = q_idx.unsqueeze(1)
    k = k_idx.unsqueeze(0)
    return (k <= q) & ((k < sinks) | (q - k < window))


def record_sdpa_sinks(spec: CaseSpec) -> Recording:
    cfg = sdpa_config(spec.config)
    S, W = int(cfg["sinks"]), int(cfg["window"])
    T, N = spec.prefill_len, spec.decode_steps
    if T + N <= S + W:
        raise ValueError(f"{spec.name}: T + N = {T + N} must exceed sinks + window = {S + W}")
    hidden, d, H, G = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    g = seeded_generator(spec.seed)
    params = {
        "q_proj.weight": randn(g, H * d, hidden, std=1 / math.sqrt(hidden)),
        "k_proj.weight": randn(g, G * d, hidden, std=1 / math.sqrt(hidden)),
        "v_proj.weight": randn(g, G * d, hidden, std=1 / math.sqrt(hidden)),
        "o_proj.weight": randn(g, hidden, H * d, std=1 / math.sqrt(H * d)),
    }
    x = randn(g, 1, T + N, hidden)
    module = SdpaAttention(cfg).eval()
    missing, unexpected = module.load_state_dict(params, strict=True)
    assert not missing and not unexpected

    cache = {"k": None, "v": None, "idx": torch.zeros(0, dtype=torch.int64, device=DEVICE)}
    held_max = 0

    def step(chunk, first):
        nonlocal held_max
        b, L, _ = chunk.shape
        q = module.q_proj(chunk).view(b, L, H, d).transpose(1, 2)
        k = module.k_proj(chunk).view(b, L, G, d).transpose(1, 2)
        v = module.v_proj(chunk).view(b, L, G, d).transpose(1, 2)
        new_idx = torch.arange(first, first + L, dtype=torch.int64, device=DEVICE)
        keys = k if cache["k"] is None else torch.cat([cache["k"], k], dim=2)
        values = v if cache["v"] is None else torch.cat([cache["v"], v], dim=2)
        idx = torch.cat([cache["idx"], new_idx])
        mask = _sink_visible(new_idx, idx, S, W)                     # [L, held + L], True = attend
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=cfg["scale"],
                                             enable_gqa=(H != G))
        # Evict: keep the sinks and the last W - 1 tokens.
        keep = (idx < S) | (idx > idx.max() - W)
        cache["k"], cache["v"], cache["idx"] = keys[:, :, keep], values[:, :, keep], idx[keep]
        held_max = max(held_max, int(keep.sum()))
        return module.o_proj(out.transpose(1, 2).reshape(b, L, H * d))

    with torch.no_grad():
        prefill = step(x[:, :T], 0)
        steps = [step(x[:, T + i:T + i + 1], T + i) for i in range(N)]
    decode = torch.cat(steps, dim=1) if steps else torch.zeros(1, 0, hidden, dtype=torch.float32)
    assert held_max <= S + W, (held_max, S, W)
    return Recording(config=cfg, params=params, hidden_states=x, position_ids=position_ids(T + N),
                     prefill=prefill.contiguous(), decode=decode.contiguous(),
                     meta={"max_cached_tokens": held_max})


def check_sdpa_sinks(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    """float64 from the formulas: all T + N tokens at once under the explicit sink + window mask."""
    cfg = rec.config
    T, N = spec.prefill_len, spec.decode_steps
    H, G, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    L = T + N
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    q = (x @ p["q_proj.weight"].T).reshape(L, H, d)
    k = (x @ p["k_proj.weight"].T).reshape(L, G, d)
    v = (x @ p["v_proj.weight"].T).reshape(L, G, d)
    i = torch.arange(L)
    allowed = _sink_visible(i, i, int(cfg["sinks"]), int(cfg["window"]))
    heads = []
    for h in range(H):
        kv = h // (H // G)
        s = ((q[:, h, :] @ k[:, kv, :].T) * cfg["scale"]).masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        heads.append((w / w.sum(dim=1, keepdim=True)) @ v[:, kv, :])
    out = torch.cat(heads, dim=1) @ p["o_proj.weight"].T
    return {"expected.prefill": out[:T].unsqueeze(0), "expected.decode": out[T:].unsqueeze(0)}


def describe_sdpa_sinks(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"H={c['num_attention_heads']} G={c['num_key_value_heads']} d={c['head_dim']} sinks={c['sinks']} "
            f"window={c['window']} T+N={spec.prefill_len + spec.decode_steps} "
            f"max_cached={rec.meta['max_cached_tokens']}")


register_reference(
    "sdpa_sinks", layer_type="attention", record=record_sdpa_sinks, check=check_sdpa_sinks,
    describe=describe_sdpa_sinks,
    summary="projections + torch SDPA under an explicit sink + window boolean mask, own evicting cache")

add_case(CaseSpec(name="sdpa_sinks_s2_w4_gqa", reference="sdpa_sinks", seed=9001, prefill_len=5, decode_steps=14,
                  config={"hidden_size": 32, "head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "sinks": 2, "window": 4},
                  description="Kept sinks (StreamingLLM): 2 sinks + window 4, H = 4, G = 2; prefill 5, 14 decode "
                              "steps (19 tokens through a cache of at most 6: the window wraps three times)."))
add_case(CaseSpec(name="sdpa_sinks_s4_w3_prefill_long", reference="sdpa_sinks", seed=9002, prefill_len=12,
                  decode_steps=9,
                  config={"hidden_size": 48, "head_dim": 16, "num_attention_heads": 3, "num_key_value_heads": 1,
                          "sinks": 4, "window": 3},
                  description="Kept sinks: 4 sinks + window 3, MQA (H = 3, G = 1); a prefill of 12 longer than the "
                              "cache (7), then 9 decode steps."))


# Chapters on RoPE, GQA/MQA and MLA: the real Hugging Face modules (see "Hugging Face references").
def _hf_case(reference, name, seed, T, N, description, offset=0, **config):
    add_case(CaseSpec(name=name, reference=reference, seed=seed, prefill_len=T, decode_steps=N,
                      config=config, description=description, position_offset=offset))


_hf_case("llama", "llama_mha", 3001, 9, 4,
         "transformers LlamaAttention, multi-head: H = G = 4 heads of dimension 16, RoPE theta 10000 "
         "(half-split), causal prefill of 9, then 4 decode steps through DynamicCache.",
         hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_hf_case("llama", "llama_gqa", 3002, 11, 5,
         "transformers LlamaAttention, grouped-query: H = 8 query heads sharing G = 2 KV heads, head_dim 16, "
         "RoPE theta 500000, with attention_bias (Llama then has biases on q, k, v AND o_proj).",
         hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, attention_bias=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
_hf_case("llama", "llama_mqa", 3003, 7, 5,
         "transformers LlamaAttention, multi-query: H = 4 query heads sharing one KV head of dimension 8, "
         "RoPE theta 10000.",
         hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_hf_case("llama", "llama31_rope_scaling", 3004, 20, 6,
         "transformers LlamaAttention with Llama 3.1 RoPE scaling (rope_type llama3, factor 8, low/high freq "
         "factors 1/4, original_max_position_embeddings 32, theta 500000; head_dim 32 puts rotary pairs in all "
         "three bands), GQA H = 4, G = 2; positions start at 24.",
         offset=24,
         hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
_hf_case("deepseek_v3", "deepseek_v3_q_lora", 4001, 8, 5,
         "transformers DeepseekV3Attention (MLA): q through q_a_proj -> RMSNorm -> q_b_proj (q_lora_rank 24), "
         "latent kv_lora_rank 32, 4 heads, qk_nope 16 + qk_rope 8, v 16, interleaved RoPE (rope_interleave true), "
         "the model's cache holds the normalised latent and the rotated shared k_pe.",
         hidden_size=64, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
         qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True)
_hf_case("deepseek_v3", "deepseek_v3_no_q_lora", 4002, 9, 4,
         "transformers DeepseekV3Attention (MLA) without query compression (q_lora_rank null: one q_proj), "
         "kv_lora_rank 32, 4 heads, qk_nope 16 + qk_rope 8, v 16, interleaved RoPE.",
         hidden_size=64, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
         qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True)
_hf_case("deepseek_v3", "deepseek_v3_half_split", 4003, 10, 3,
         "transformers DeepseekV3Attention (MLA) with rope_interleave false: RoPE pairs (i, i + 4) of the 8 rotary "
         "dimensions (rotate_half) instead of adjacent pairs; q_lora_rank 24, kv_lora_rank 32, 4 heads.",
         hidden_size=64, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
         qk_rope_head_dim=8, v_head_dim=16, rope_interleave=False)
_hf_case("mistral", "mistral_window5_gqa", 5001, 9, 8,
         "transformers MistralAttention with sliding_window 5: GQA H = 4, G = 2, head_dim 16, RoPE theta 10000; "
         "prefill of 9 (queries past position 4 lose their oldest keys), then 8 decode steps through the model's "
         "DynamicCache, whose sliding layers keep only the last W - 1 keys: T + N = 17 > W, the ring wraps.",
         hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_hf_case("mistral", "mistral_window3_mqa_offset", 5002, 4, 11,
         "transformers MistralAttention with sliding_window 3: MQA H = 4, G = 1, head_dim 8, RoPE theta 1e6, "
         "positions start at 40; a prefill of 4 then 11 decode steps (T + N = 15, five times the window).",
         offset=40,
         hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=3,
         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


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
    }
    meta |= rec.meta
    meta["generator"] = gen
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


def write_checked_case(args, spec: CaseSpec, gen: dict[str, Any]) -> None:
    """Record `spec`, validate it (shapes, float64 self-check, contrasts, determinism), write it when
    committed and print its summary line; raise on any failure."""
    ref = REFERENCES[spec.reference]
    rec = ref.record(spec)
    contrasts = ref.contrasts(rec, spec) if ref.contrasts else {}
    try:
        err = validate(rec, spec)
    except AssertionError as e:
        raise AssertionError(f"{e}; contrasts {contrasts}") from e
    # Determinism: a second recording from the same seed must be bit-identical.
    again = REFERENCES[spec.reference].record(spec)
    for a, b in [(rec.prefill, again.prefill), (rec.decode, again.decode)]:
        if not torch.equal(a, b):
            raise AssertionError(f"{spec.name}: two recordings from seed {spec.seed} differ")
    max_expected = max(float(t.abs().max()) for t in (rec.prefill, rec.decode) if t.numel())
    for label, value in contrasts.items():
        if not value > CONTRAST_MIN:
            raise AssertionError(f"{spec.name}: the wrong recomputation {label!r} differs by only {value:.3e}; "
                                 f"the case would not catch that mistake")
    where = write_case(args.out, spec, rec, gen) if spec.committed else "(not written)"
    shown = ref.describe(rec, spec) if ref.describe else ""
    contrast_text = "".join(f" contrast[{k}]={v:.2e}" for k, v in contrasts.items())
    print(f"{spec.name:<32} {spec.reference:<11} {shown} T={spec.prefill_len:<3} N={spec.decode_steps:<3} "
          f"hidden_states={list(rec.hidden_states.shape)} prefill={list(rec.prefill.shape)} "
          f"decode={list(rec.decode.shape)} max|expected|={max_expected:.4f} self_check={err:.2e}"
          f"{contrast_text} {where}")
    for line in (ref.notes(rec, spec) if ref.notes else []):
        print(line)


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
            print(f"case {s.name:<32} reference={s.reference:<11} T={s.prefill_len:<3} N={s.decode_steps:<3}"
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

    failed = []
    for spec in chosen:
        try:
            write_checked_case(args, spec, gen)
        except Exception as e:  # report every case, then fail
            failed.append(spec.name)
            print(f"{spec.name:<32} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(limit=-4, file=sys.stdout)
    if failed:
        print(f"make_cases.py: {len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

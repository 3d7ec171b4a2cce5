#!/usr/bin/env python3
"""Write the oracle cases of Attention Forge (the contract and the format: tests/oracle/README.md).

Each case is one directory, <out>/<name>/, holding
  case.json            reference, layer_type, config, prefill_len, decode_steps, seed, tolerance,
                       description, generator
  tensors.safetensors  the module's parameters under their Hugging Face names, input.hidden_states,
                       input.position_ids, expected.prefill, expected.decode (and, for some references,
                       expected.selected.* indices or the layer's cache, expected.{prefill,final}.*)

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

# The contract's default tolerance: pass when max|got - expected| <= max_abs * max(1, max|expected|), where
# max|expected| is taken over expected.prefill and expected.decode together (a recorded cache state,
# expected.<when>.<kind>, is compared against its own scale).
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
HF_SINK_STD = 1.0            # sink logits on the scale of the scores, so a dropped sink fails

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
            elif name == "sinks":      # gpt-oss: one learned logit per query head
                value = randn(g, *p.shape, std=HF_SINK_STD)
            elif p.ndim == 2:
                value = randn(g, *p.shape, std=1 / math.sqrt(p.shape[1]))
            else:
                raise AssertionError(f"no initialisation rule for parameter {name} {tuple(p.shape)}")
            p.copy_(value)
            params[name] = value.clone()
    return params


def _hf_record(spec: CaseSpec, config_cls, model_cls, config_kwargs: dict[str, Any], attach=None,
               init_params=None) -> Recording:
    """`attach(attn)`, when given, registers further hooks on the attention module (or its submodules) and returns
    their handles; they are removed with the others. `init_params(attn, g)`, when given, draws the module's
    parameters instead of `_hf_init_params` (e.g. Gemma's zero-centred norm gains)."""
    T, N = spec.prefill_len, spec.decode_steps
    L = T + N
    config = config_cls(**config_kwargs)
    torch.manual_seed(spec.seed)                       # the rest of the model (embeddings, MLPs, norms)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    if model.config._attn_implementation != "eager":
        raise AssertionError(f"{spec.name}: attention implementation is {model.config._attn_implementation}")
    attn = model.layers[HF_HOOKED_LAYER].self_attn

    g = seeded_generator(spec.seed)
    params = (init_params or _hf_init_params)(attn, g)
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
    if attach is not None:
        handles += attach(attn)
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


def deepseek_softmax_scale64(c: dict[str, Any], *, mscale_squared: bool = True) -> float:
    """(dn + dr)^-0.5, times mscale(factor, mscale_all_dim)^2 = (0.1 mscale_all_dim ln(factor) + 1)^2 when the rope
    is scaled and mscale_all_dim is set (DeepSeek-V3 as released: YaRN factor 40, mscale_all_dim 1)."""
    scale = (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]) ** -0.5
    rp = c["rope_parameters"]
    if mscale_squared and rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
        factor = float(rp["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(rp["mscale_all_dim"]) * math.log(factor) + 1.0
        scale *= m * m
    return scale


def deepseek_rope64(c: dict[str, Any], *, default_frequencies: bool = False):
    """(inverse frequencies over qk_rope_head_dim, factor on the rotated values): default RoPE, or YaRN's."""
    rp, dr = c["rope_parameters"], c["qk_rope_head_dim"]
    kind = rp.get("rope_type", "default")
    if kind == "default" or default_frequencies:
        att = yarn_inv_freq64(dr, rp, c["max_position_embeddings"])[1] if kind == "yarn" else 1.0
        return rope_inv_freq64(dr, {"rope_type": "default", "rope_theta": rp["rope_theta"]}), att
    if kind != "yarn":
        raise NotImplementedError(f"deepseek check: rope_type {kind!r}")
    return yarn_inv_freq64(dr, rp, c["max_position_embeddings"])


def _deepseek_v3_64(rec: Recording, spec: CaseSpec, *, interleaved: bool | None = None,
                    mscale_squared: bool = True, default_frequencies: bool = False):
    c = rec.config
    H, dn, dr, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    r, rq = c["kv_lora_rank"], c["q_lora_rank"]
    if c["num_key_value_heads"] != H:
        raise AssertionError("deepseek_v3: num_key_value_heads must equal num_attention_heads")
    if interleaved is None:
        interleaved = bool(c["rope_interleave"])
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(spec.position_offset, spec.position_offset + L)
    inv, att = deepseek_rope64(c, default_frequencies=default_frequencies)

    if rq is None:
        q = _linear64(x, p, "q_proj")
    else:
        q = _linear64(rms_norm64(_linear64(x, p, "q_a_proj"), p["q_a_layernorm.weight"], DEEPSEEK_V3_NORM_EPS),
                      p, "q_b_proj")
    q = q.reshape(L, H, dn + dr)
    q_nope, q_pe = q[..., :dn], rope64(q[..., dn:], positions, inv, interleaved=interleaved) * att

    kv_a = _linear64(x, p, "kv_a_proj_with_mqa")                               # [L, r + dr]
    c_kv = rms_norm64(kv_a[:, :r], p["kv_a_layernorm.weight"], DEEPSEEK_V3_NORM_EPS)
    k_pe = rope64(kv_a[:, None, r:], positions, inv, interleaved=interleaved) * att   # [L, 1, dr], all heads
    kv = (c_kv @ p["kv_b_proj.weight"].T).reshape(L, H, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]

    q_full = torch.cat([q_nope, q_pe], dim=-1)
    k_full = torch.cat([k_nope, k_pe.expand(L, H, dr)], dim=-1)
    scale = deepseek_softmax_scale64(c, mscale_squared=mscale_squared)
    out = _linear64(causal_attention64(q_full, k_full, v, scale), p, "o_proj")
    return _split_expected(out, spec.prefill_len)


def check_deepseek_v3(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _deepseek_v3_64(rec, spec)


def contrasts_deepseek_v3(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    other = "half_split" if rec.config["rope_interleave"] else "interleaved"
    out = {f"rope_{other}": _contrast_error(rec, _deepseek_v3_64(rec, spec,
                                                                 interleaved=not rec.config["rope_interleave"]))}
    if rec.config["rope_parameters"].get("rope_type", "default") == "yarn":
        out["no_mscale_squared"] = _contrast_error(rec, _deepseek_v3_64(rec, spec, mscale_squared=False))
    return out


def notes_deepseek_v3(rec: Recording, spec: CaseSpec) -> list[str]:
    # Over a few tokens only the faster pairs move q . k, so YaRN's frequency change may stay small: reported.
    if rec.config["rope_parameters"].get("rope_type", "default") != "yarn":
        return []
    err = _contrast_error(rec, _deepseek_v3_64(rec, spec, default_frequencies=True))
    c = rec.config
    return [f"    softmax scale {deepseek_softmax_scale64(c):.6g} = {deepseek_softmax_scale64(c, mscale_squared=False):.6g}"
            f" x mscale^2; yarn frequencies replaced by theta^(-2i/d) would differ by {err:.2e}"]


def describe_deepseek_v3(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"hidden={c['hidden_size']:<4} H={c['num_attention_heads']} q_lora={c['q_lora_rank']} "
            f"kv_lora={c['kv_lora_rank']} nope={c['qk_nope_head_dim']} rope={c['qk_rope_head_dim']} "
            f"v={c['v_head_dim']} interleave={c['rope_interleave']!s:<5} "
            f"theta={c['rope_parameters']['rope_theta']:g} rope_type={c['rope_parameters'].get('rope_type')} "
            f"scale={deepseek_softmax_scale64(c):.6g}")


register_reference(
    "deepseek_v3", layer_type="attention", record=record_deepseek_v3, check=check_deepseek_v3,
    describe=describe_deepseek_v3, contrasts=contrasts_deepseek_v3, notes=notes_deepseek_v3,
    summary="transformers DeepseekV3Attention (MLA, eager) in a tiny dense DeepseekV3Model, latent cache")


# ---- Reference "deepseek_v32": transformers' DeepseekV32Attention (DeepSeek sparse attention) ---------------
#
# Parameters: those of "deepseek_v3" with q_lora_rank set (the indexer reads MLA's normalised query latent), plus
# the indexer's (Hi = index_n_heads, Di = index_head_dim, rq = q_lora_rank, dr = qk_rope_head_dim):
#   indexer.wq_b.weight [Hi*Di, rq], indexer.wk.weight [Di, hidden], indexer.k_norm.weight [Di] and
#   indexer.k_norm.bias [Di] (nn.LayerNorm, eps 1e-6), indexer.weights_proj.weight [Hi, hidden].
# MLA rotates the LAST dr dims of q and k_pe in adjacent pairs (the module always does); the indexer rotates the
# FIRST dr dims of its queries and key in half-split pairs (rotate_half). Index score of key j for query i:
#   I[i, j] = sum_h (weights_proj x_i)_h * Hi^-0.5 * ReLU(q_ih . k_j * Di^-0.5), over the keys i may see;
# the module keeps torch.topk(min(index_topk, keys)) and masks every other key out of MLA's softmax.
# Selections: a forward hook on the indexer records its output [1, rows, min(k, keys)] for the prefill and for each
# decode step. They are stored as expected.selected.prefill [1, T, k] and expected.selected.decode [1, N, k] (int64):
# a prefill row that sees fewer than k keys gets from topk some causally masked keys too (their scores are the
# mask's minimum); those are dropped and the row is padded with -1 to k columns. A sum of ReLUs is exactly 0 for a
# key no head likes, so ties are possible: the generator refuses a case whose float64 index scores have a gap
# between the k-th and (k+1)-th visible key below DEEPSEEK_V32_TIE_MARGIN (relative to the row's largest |score|),
# because the reference's choice there is implementation-defined (torch.topk does not specify tie order).
DEEPSEEK_V32_TIE_MARGIN = 1e-4


def deepseek_v32_config_kwargs(partial: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(DEEPSEEK_V3_DEFAULTS))
    cfg.update(partial)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    return cfg


def _selected_stored(indices, first_row: int, k: int):
    """The indexer's output [1, rows, m] for rows at cache positions first_row.. as [1, rows, k] int64 sets:
    causally masked entries dropped, -1 padding."""
    out = torch.full((1, indices.shape[1], k), -1, dtype=torch.int64)
    for r in range(indices.shape[1]):
        visible = first_row + r + 1
        valid = [int(j) for j in indices[0, r].tolist() if int(j) < visible]
        if len(set(valid)) != len(valid) or len(valid) != min(k, visible):
            raise AssertionError(f"row {first_row + r}: the indexer chose {indices[0, r].tolist()}; "
                                 f"{len(valid)} visible, want {min(k, visible)} distinct")
        out[0, r, :len(valid)] = torch.tensor(valid, dtype=torch.int64)
    return out


def record_deepseek_v32(spec: CaseSpec) -> Recording:
    from transformers import DeepseekV32Config, DeepseekV32Model
    T, N = spec.prefill_len, spec.decode_steps
    cfg = deepseek_v32_config_kwargs(spec.config)
    k = cfg["index_topk"]
    if T + N <= k:
        raise AssertionError(f"{spec.name}: need T + N > index_topk, got {T} + {N} <= {k}")
    seen: list = []

    def attach(attn):
        def post(module, args, kwargs, output):
            seen.append(output.detach().clone().to(torch.int64))
        return [attn.indexer.register_forward_hook(post, with_kwargs=True)]

    rec = _hf_record(spec, DeepseekV32Config, DeepseekV32Model, cfg, attach=attach)
    if len(seen) != N + 1 or seen[0].shape[1] != T:
        raise AssertionError(f"{spec.name}: indexer outputs {[tuple(s.shape) for s in seen]}")
    rec.extra["expected.selected.prefill"] = _selected_stored(seen[0], 0, k)
    if N:
        rec.extra["expected.selected.decode"] = torch.cat([_selected_stored(seen[1 + i], T + i, k) for i in range(N)],
                                                          dim=1)
    rec.meta["selected_form"] = ("expected.selected.* [1, rows, index_topk] int64: the indexer's top-k per row as a "
                                 "set; causally masked entries that torch.topk returns for rows seeing fewer than k "
                                 "keys are dropped, rows padded with -1")
    return rec


def _deepseek_v32_64(rec: Recording, spec: CaseSpec, *, index_interleaved: bool = False, dense: bool = False,
                     mscale_squared: bool = True):
    """float64 recomputation: (outputs, chosen [L, L] bool, smallest relative boundary gap, its row)."""
    c = rec.config
    H, dn, dr, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    r, Hi, Di, k = c["kv_lora_rank"], c["index_n_heads"], c["index_head_dim"], c["index_topk"]
    L = spec.prefill_len + spec.decode_steps
    p = {name: t.to(torch.float64) for name, t in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(spec.position_offset, spec.position_offset + L)
    inv, att = deepseek_rope64(c)            # one rotary embedding for MLA and the indexer (YaRN's when scaled)

    q_lat = rms_norm64(_linear64(x, p, "q_a_proj"), p["q_a_layernorm.weight"], DEEPSEEK_V3_NORM_EPS)
    q = (q_lat @ p["q_b_proj.weight"].T).reshape(L, H, dn + dr)
    q_full = torch.cat([q[..., :dn], rope64(q[..., dn:], positions, inv, interleaved=True) * att], dim=-1)
    kv_a = _linear64(x, p, "kv_a_proj_with_mqa")
    c_kv = rms_norm64(kv_a[:, :r], p["kv_a_layernorm.weight"], DEEPSEEK_V3_NORM_EPS)
    k_pe = rope64(kv_a[:, None, r:], positions, inv, interleaved=True) * att
    kv = (c_kv @ p["kv_b_proj.weight"].T).reshape(L, H, dn + dv)
    k_full = torch.cat([kv[..., :dn], k_pe.expand(L, H, dr)], dim=-1)
    v = kv[..., dn:]

    qi = (q_lat @ p["indexer.wq_b.weight"].T).reshape(L, Hi, Di)
    qi = torch.cat([rope64(qi[..., :dr], positions, inv, interleaved=index_interleaved) * att, qi[..., dr:]], dim=-1)
    ki = x @ p["indexer.wk.weight"].T
    mean = ki.mean(dim=-1, keepdim=True)
    var = ((ki - mean) ** 2).mean(dim=-1, keepdim=True)
    ki = (ki - mean) / torch.sqrt(var + 1e-6) * p["indexer.k_norm.weight"] + p["indexer.k_norm.bias"]
    ki = torch.cat([rope64(ki[:, None, :dr], positions, inv, interleaved=index_interleaved)[:, 0] * att, ki[:, dr:]],
                   dim=-1)
    head_w = (x @ p["indexer.weights_proj.weight"].T) * Hi ** -0.5                      # [L, Hi]
    scores = torch.einsum("ih,ihj->ij", head_w, torch.relu(torch.einsum("ihd,jd->ihj", qi, ki) * Di ** -0.5))

    chosen = torch.zeros(L, L, dtype=torch.bool)
    smallest, where = math.inf, -1
    for i in range(L):
        row = scores[i, :i + 1].tolist()
        order = sorted(range(i + 1), key=lambda j: (-row[j], j))
        chosen[i, order[:k]] = True
        if i + 1 > k:
            gap = (row[order[k - 1]] - row[order[k]]) / max(max(abs(s) for s in row), 1e-30)
            if gap < smallest:
                smallest, where = gap, i
    causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    allowed = causal if dense else chosen & causal
    heads = []
    for h in range(H):
        s = (q_full[:, h, :] @ k_full[:, h, :].T) * deepseek_softmax_scale64(c, mscale_squared=mscale_squared)
        s = s.masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        heads.append((w / w.sum(dim=1, keepdim=True)) @ v[:, h, :])
    out = _linear64(torch.cat(heads, dim=1), p, "o_proj")
    return _split_expected(out, spec.prefill_len), chosen, smallest, where


def _recorded_sets(rec: Recording) -> list[set[int]]:
    rows = [rec.extra["expected.selected.prefill"][0]]
    if "expected.selected.decode" in rec.extra:
        rows.append(rec.extra["expected.selected.decode"][0])
    return [set(j for j in row.tolist() if j >= 0) for row in torch.cat(rows, dim=0)]


def check_deepseek_v32(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    out, chosen, gap, row = _deepseek_v32_64(rec, spec)
    if not gap >= DEEPSEEK_V32_TIE_MARGIN:
        raise AssertionError(f"{spec.name}: near tie at the top-k boundary in row {row}: relative gap {gap:.2e} < "
                             f"{DEEPSEEK_V32_TIE_MARGIN:g}; the reference's choice is implementation-defined there, "
                             f"so the case is not written (change the seed, index_n_heads or index_topk)")
    recorded = _recorded_sets(rec)
    for i, got in enumerate(recorded):
        want = set(torch.nonzero(chosen[i]).flatten().tolist())
        if got != want:
            raise AssertionError(f"{spec.name}: row {i}: the indexer chose {sorted(got)}, float64 {sorted(want)}")
    return out


def contrasts_deepseek_v32(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    # Attending to every causal key instead of the selection must be caught: the case tests the selection.
    out = {"dense_mla": _contrast_error(rec, _deepseek_v32_64(rec, spec, dense=True)[0])}
    if rec.config["rope_parameters"].get("rope_type", "default") == "yarn":
        out["no_mscale_squared"] = _contrast_error(rec, _deepseek_v32_64(rec, spec, mscale_squared=False)[0])
    return out


def notes_deepseek_v32(rec: Recording, spec: CaseSpec) -> list[str]:
    _, chosen, gap, row = _deepseek_v32_64(rec, spec)
    _, other, _, _ = _deepseek_v32_64(rec, spec, index_interleaved=True)
    k = rec.config["index_topk"]
    L = spec.prefill_len + spec.decode_steps
    differ = sum(1 for i in range(L) if not torch.equal(chosen[i], other[i]))
    return [f"  smallest relative gap between the k-th and (k+1)-th index score: {gap:.3e} (row {row}); "
            f"rows seeing fewer than k = {k} keys (padded with -1): {min(k - 1, L)}",
            f"  rows whose selection changes if the indexer's RoPE were interleaved (the V3.2-Exp bug): {differ} of {L}"]


def describe_deepseek_v32(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"hidden={c['hidden_size']:<4} H={c['num_attention_heads']} q_lora={c['q_lora_rank']} "
            f"kv_lora={c['kv_lora_rank']} nope={c['qk_nope_head_dim']} rope={c['qk_rope_head_dim']} "
            f"v={c['v_head_dim']} index_heads={c['index_n_heads']} index_dim={c['index_head_dim']} "
            f"topk={c['index_topk']} offset={spec.position_offset}")


register_reference(
    "deepseek_v32", layer_type="deepseek_sparse_attention", record=record_deepseek_v32, check=check_deepseek_v32,
    describe=describe_deepseek_v32, contrasts=contrasts_deepseek_v32, notes=notes_deepseek_v32,
    summary="transformers DeepseekV32Attention (MLA + lightning indexer top-k, eager) in a tiny dense "
            "DeepseekV32Model; selected indices hooked from the indexer")


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


# ---- Reference "gpt_oss": transformers' GptOssAttention ------------------------------------------
#
# Parameters: q_proj/k_proj/v_proj/o_proj weights AND biases (attention_bias true, as gpt-oss ships), and
# `sinks` [H], one learned logit per query head. RoPE half-split (the two halves of head_dim, rotate_half style)
# with YaRN: inverse frequencies blended between kept and divided by `factor` over a ramp in the pair index, and
# cos/sin multiplied by the attention factor. Scale head_dim^-0.5. Eager attention appends each head's sink
# logit as one more column of scores, subtracts the row maximum, takes the softmax and drops that column.
# layer_types decides the mask: sliding_attention sees 0 <= q - k < sliding_window (sequence indices),
# full_attention every earlier key; the hooked layer takes the case's layer_type.

GPT_OSS_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "attention_bias": True,
    "tie_word_embeddings": False,
}


def gpt_oss_config_kwargs(partial: dict[str, Any], layer_type: str) -> dict[str, Any]:
    cfg = json.loads(json.dumps(GPT_OSS_DEFAULTS))
    cfg.update(partial)
    types = ["sliding_attention"] * cfg["num_hidden_layers"]
    types[HF_HOOKED_LAYER] = layer_type
    cfg["layer_types"] = types
    return cfg


def record_gpt_oss(spec: CaseSpec) -> Recording:
    from transformers import GptOssConfig, GptOssModel
    layer_type = spec.layer_type or "sliding_attention"
    cfg = gpt_oss_config_kwargs(spec.config, layer_type)
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or spec.prefill_len + spec.decode_steps <= window + 1:
        raise AssertionError(f"{spec.name}: need an integer sliding_window and T + N > W + 1, got W={window}")
    rec = _hf_record(spec, GptOssConfig, GptOssModel, cfg)
    if rec.config["layer_types"][HF_HOOKED_LAYER] != layer_type:
        raise AssertionError(f"{spec.name}: hooked layer is {rec.config['layer_types'][HF_HOOKED_LAYER]}")
    if rec.config["rope_parameters"].get("rope_type") != "yarn":
        raise AssertionError(f"{spec.name}: rope_parameters {rec.config['rope_parameters']}")
    if "sinks" not in rec.params:
        raise AssertionError(f"{spec.name}: the attention module has no sinks parameter")
    return rec


def yarn_inv_freq64(dim: int, rp: dict[str, Any], max_position_embeddings: int):
    """YaRN (Peng et al. 2023) from its formulas, in float64: (inverse frequencies, attention factor).
    The ramp runs over the pair index between the indices whose wavelength fits beta_fast and beta_slow
    times into the original context; factor on cos/sin 0.1 ln(factor) + 1 unless given (or an mscale ratio)."""
    theta = float(rp["rope_theta"])
    L0 = float(rp["original_max_position_embeddings"])
    factor = rp.get("factor")
    factor = float(max_position_embeddings) / L0 if factor is None else float(factor)
    beta_fast = float(rp.get("beta_fast") or 32)
    beta_slow = float(rp.get("beta_slow") or 1)

    def pair_at(rotations):                       # 2 pi theta^(2i/dim) * rotations = L0, solved for i
        return dim / 2 * math.log(L0 / (2 * math.pi * rotations)) / math.log(theta)

    low, high = pair_at(beta_fast), pair_at(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    base = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv = base * (1 - ramp) + base / factor * ramp

    def m(weight):
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0
    if rp.get("attention_factor") is not None:
        att = float(rp["attention_factor"])
    elif rp.get("mscale") and rp.get("mscale_all_dim"):
        att = m(float(rp["mscale"])) / m(float(rp["mscale_all_dim"]))
    else:
        att = m(1.0)
    return inv, att


def _gpt_oss64(rec: Recording, spec: CaseSpec, *, sinks: bool = True, window_shift: int = 0,
               window_for_full: bool = False, yarn_frequencies: bool = True, attention_factor: bool = True):
    c = rec.config
    H, G, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(spec.position_offset, spec.position_offset + L)
    rp = c["rope_parameters"]
    inv, att = yarn_inv_freq64(d, rp, c["max_position_embeddings"])
    if not yarn_frequencies:
        inv = float(rp["rope_theta"]) ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if not attention_factor:
        att = 1.0
    q = rope64(_linear64(x, p, "q_proj").reshape(L, H, d), positions, inv, interleaved=False) * att
    k = rope64(_linear64(x, p, "k_proj").reshape(L, G, d), positions, inv, interleaved=False) * att
    v = _linear64(x, p, "v_proj").reshape(L, G, d)
    sliding = c["layer_types"][HF_HOOKED_LAYER] == "sliding_attention"
    distance = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    allowed = distance >= 0
    if sliding or window_for_full:
        allowed &= distance < c["sliding_window"] + window_shift
    heads = []
    for h in range(H):
        kv = h // (H // G)
        s = ((q[:, h, :] @ k[:, kv, :].T) * d ** -0.5).masked_fill(~allowed, float("-inf"))
        if sinks:
            s = torch.cat([s, p["sinks"][h].expand(L, 1)], dim=1)
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        w = w / w.sum(dim=1, keepdim=True)
        heads.append(w[:, :L] @ v[:, kv, :])                                  # the sink column dropped
    out = _linear64(torch.cat(heads, dim=1), p, "o_proj")
    return _split_expected(out, spec.prefill_len)


def check_gpt_oss(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _gpt_oss64(rec, spec)


def contrasts_gpt_oss(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    out = {"no_sinks": _contrast_error(rec, _gpt_oss64(rec, spec, sinks=False)),
           "no_yarn_attention_factor": _contrast_error(rec, _gpt_oss64(rec, spec, attention_factor=False))}
    if rec.config["layer_types"][HF_HOOKED_LAYER] == "sliding_attention":
        out["window_edge_q-k<=W"] = _contrast_error(rec, _gpt_oss64(rec, spec, window_shift=1))
    else:
        out["windowed_like_sliding"] = _contrast_error(rec, _gpt_oss64(rec, spec, window_for_full=True))
    return out


def notes_gpt_oss(rec: Recording, spec: CaseSpec) -> list[str]:
    # RoPE is relative: over a few tokens only the frequencies of the faster pairs move q . k, so how much YaRN's
    # frequency change matters depends on the settings; reported, not required (the oracle's own tolerance is
    # 100x tighter than the contrast limit).
    err = _contrast_error(rec, _gpt_oss64(rec, spec, yarn_frequencies=False))
    return [f"    yarn frequencies replaced by theta^(-2i/d) (attention factor kept) would differ by {err:.2e}"]


def describe_gpt_oss(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    rp = c["rope_parameters"]
    return (f"{c['layer_types'][HF_HOOKED_LAYER]:<17} hidden={c['hidden_size']} d={c['head_dim']} "
            f"H={c['num_attention_heads']} G={c['num_key_value_heads']} W={c['sliding_window']} "
            f"yarn factor={rp.get('factor')} offset={spec.position_offset}")


register_reference(
    "gpt_oss", layer_type="sliding_attention", record=record_gpt_oss, check=check_gpt_oss,
    describe=describe_gpt_oss, contrasts=contrasts_gpt_oss, notes=notes_gpt_oss,
    summary="transformers GptOssAttention (eager) in a tiny GptOssModel: GQA with biases, YaRN RoPE, "
            "learned sink logits, sliding (0<=q-k<W) or full layers")


# ---- Reference "flex_block_mask": torch flex_attention with a BlockMask ---------------------------
#
# The chapter-10 block pattern as a mask_mod (absolute positions: token p in block p // block; key block kb
# visited by query block qb when kb <= qb and (qb - kb < local_blocks or kb < global_blocks or (stride > 0 and
# (qb - kb) % stride == 0)); inside it the causal edge key <= query), create_block_mask's tables, and
# flex_attention run eagerly (unfused, on the CPU). Prefill: one call over T tokens with blocks of `block`
# on both sides. Decode: flex has no cache of its own, so the module keeps one (every token: a later query
# block may visit any block) and each step calls flex_attention with one query over the whole cache; the
# step's BlockMask is built for that call (one query row, key blocks of `block` over the cache) and its
# mask_mod adds the query's absolute position, t - 1, to flex's q_idx (which counts from 0 in every call).

FLEX_DEFAULTS = {"num_attention_heads": 1, "num_key_value_heads": 1, "global_blocks": 0, "stride": 0}


def _pattern_allows(q, k, cfg):
    """The block pattern's element rule; q, k ints or integer tensors."""
    b = cfg["block"]
    qb, kb = q // b, k // b
    back = qb - kb
    seen = (back < cfg["local_blocks"]) | (kb < cfg["global_blocks"])
    if cfg["stride"] > 0:
        seen = seen | (back % cfg["stride"] == 0)
    return (k <= q) & seen


@dataclasses.dataclass(frozen=True)
class ReleasedMaskMod:
    """A mask function that ships in a released library, and the block pattern it equals (checked by the tables:
    check_flex_block_mask compares the BlockMask flex built from it with the tables written out from the pattern)."""
    pattern: dict[str, int]                # local_blocks, global_blocks, stride it must be recorded with
    make: Callable[[dict[str, Any], int], Any]

    def require(self, cfg: dict[str, Any]) -> None:
        for key, want in self.pattern.items():
            if cfg[key] != want:
                raise ValueError(f"mask_mod needs {key} = {want} (the block pattern it equals), not {cfg[key]}")

    def build(self, cfg: dict[str, Any], q_offset: int):
        return self.make(cfg, q_offset)


def _transformers_chunked(cfg: dict[str, Any], q_offset: int):
    """Llama 4's chunked attention as transformers 5.17 builds it for flex: chunked_causal_mask_function (a query
    sees the causal part of its own chunk of `block` tokens), shifted by add_offsets_to_mask_function."""
    from transformers.masking_utils import add_offsets_to_mask_function, chunked_causal_mask_function
    no_left_padding = torch.zeros(1, dtype=torch.int64)
    return add_offsets_to_mask_function(chunked_causal_mask_function(cfg["block"], no_left_padding), q_offset, 0)


RELEASED_MASK_MODS = {
    "transformers.masking_utils.chunked_causal_mask_function": ReleasedMaskMod(
        pattern={"local_blocks": 1, "global_blocks": 0, "stride": 0}, make=_transformers_chunked),
}


def _flex_rows(bm, width: int):
    """A BlockMask's (partial, full) key-block lists per query-block row, padded with -1 to `width`."""
    rows = []
    for num, idx in [(bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)]:
        num, idx = num[0, 0], idx[0, 0]
        table = torch.full((num.shape[0], width), -1, dtype=torch.int64)
        for r in range(num.shape[0]):
            n = int(num[r])
            table[r, :n] = idx[r, :n].to(torch.int64)
        rows.append(table)
    return rows


def record_flex_block_mask(spec: CaseSpec) -> Recording:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    cfg = dict(FLEX_DEFAULTS)
    cfg.update(spec.config)
    T, N = spec.prefill_len, spec.decode_steps
    hidden, d, H, G, B = (cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"],
                          cfg["num_key_value_heads"], cfg["block"])
    width = -(-(T + N) // B)
    g = seeded_generator(spec.seed)
    params = {
        "q_proj.weight": randn(g, H * d, hidden, std=1 / math.sqrt(hidden)),
        "k_proj.weight": randn(g, G * d, hidden, std=1 / math.sqrt(hidden)),
        "v_proj.weight": randn(g, G * d, hidden, std=1 / math.sqrt(hidden)),
        "o_proj.weight": randn(g, hidden, H * d, std=1 / math.sqrt(H * d)),
    }
    x = randn(g, 1, T + N, hidden)

    released = cfg.get("mask_mod")
    if released is not None:
        if released not in RELEASED_MASK_MODS:
            raise ValueError(f"{spec.name}: mask_mod {released!r} is not one of {sorted(RELEASED_MASK_MODS)}")
        RELEASED_MASK_MODS[released].require(cfg)

    def mask_at(offset):
        if released is not None:  # the released mask function, with transformers' own offset wrapper
            return RELEASED_MASK_MODS[released].build(cfg, offset)

        def mask_mod(b, h, q_idx, kv_idx):
            return _pattern_allows(q_idx + offset, kv_idx, cfg)
        return mask_mod

    def project(chunk):
        L = chunk.shape[1]
        q = (chunk @ params["q_proj.weight"].T).view(1, L, H, d).transpose(1, 2)
        k = (chunk @ params["k_proj.weight"].T).view(1, L, G, d).transpose(1, 2)
        v = (chunk @ params["v_proj.weight"].T).view(1, L, G, d).transpose(1, 2)
        return q, k, v

    def attend(q, k, v, bm):
        out = flex_attention(q, k, v, block_mask=bm, enable_gqa=(H != G))
        return out.transpose(1, 2).reshape(1, q.shape[2], H * d) @ params["o_proj.weight"].T

    partial, full = [], []
    with torch.no_grad():
        q, k, v = project(x[:, :T])
        bm = create_block_mask(mask_at(0), 1, 1, T, T, device=DEVICE, BLOCK_SIZE=B)
        prefill = attend(q, k, v, bm)
        p_rows, f_rows = _flex_rows(bm, width)
        partial.append(p_rows)
        full.append(f_rows)
        cache_k, cache_v = k, v
        q_block = cfg.get("decode_q_block")
        steps = []
        for i in range(N):
            t = T + i + 1
            q, k, v = project(x[:, t - 1:t])
            cache_k, cache_v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
            if q_block is None:      # one query row per decode block mask where flex accepts it
                try:
                    bm = create_block_mask(mask_at(t - 1), 1, 1, 1, t, device=DEVICE, BLOCK_SIZE=(1, B))
                    steps.append(attend(q, cache_k, cache_v, bm))
                    q_block = 1
                except Exception as e:  # noqa: BLE001 - recorded in the summary; falls back to square blocks
                    print(f"{spec.name}: flex refused a decode BlockMask with one-row query blocks ({e}); using {B}")
                    q_block = B
                    bm = create_block_mask(mask_at(t - 1), 1, 1, 1, t, device=DEVICE, BLOCK_SIZE=(B, B))
                    steps.append(attend(q, cache_k, cache_v, bm))
            else:
                bm = create_block_mask(mask_at(t - 1), 1, 1, 1, t, device=DEVICE, BLOCK_SIZE=(q_block, B))
                steps.append(attend(q, cache_k, cache_v, bm))
            p_rows, f_rows = _flex_rows(bm, width)
            partial.append(p_rows)
            full.append(f_rows)
    cfg["decode_q_block"] = q_block if q_block is not None else 1
    decode = torch.cat(steps, dim=1) if steps else torch.zeros(1, 0, hidden, dtype=torch.float32)
    return Recording(config=cfg, params=params, hidden_states=x, position_ids=position_ids(T + N),
                     prefill=prefill.contiguous(), decode=decode.contiguous(),
                     extra={"expected.selected.kv_blocks": torch.cat(partial).contiguous(),
                            "expected.selected.full_kv_blocks": torch.cat(full).contiguous()},
                     meta={"flex_attention": "eager (unfused), CPU", "selected_rows":
                           f"{-(-T // B)} prefill query blocks, then one row per decode step"})


def _flex_tables64(cfg, T: int, N: int):
    """The tables written out block by block from the element rule, flex's way: the mask padded to whole
    blocks with 'masked', a block visited when any element is allowed, full when all of its padded area is."""
    B, qb_dec = cfg["block"], cfg["decode_q_block"]
    width = -(-(T + N) // B)

    def row(queries, q_rows, keys):
        part, full = [], []
        for kb in range(-(-keys // B)):
            ks = range(kb * B, min((kb + 1) * B, keys))
            allowed = [bool(_pattern_allows(qq, kk, cfg)) for qq in queries for kk in ks]
            if not any(allowed):
                continue
            whole = all(allowed) and len(ks) == B and len(queries) == q_rows
            (full if whole else part).append(kb)
        return part + [-1] * (width - len(part)), full + [-1] * (width - len(full))

    rows = [row(list(range(r * B, min((r + 1) * B, T))), B, T) for r in range(-(-T // B))]
    rows += [row([T + i], qb_dec, T + i + 1) for i in range(N)]
    return (torch.tensor([r[0] for r in rows], dtype=torch.int64),
            torch.tensor([r[1] for r in rows], dtype=torch.int64))


def _flex64(rec: Recording, spec: CaseSpec, *, dense: bool = False, decode_offset: bool = True):
    cfg = rec.config
    T, N = spec.prefill_len, spec.decode_steps
    H, G, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    L = T + N
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    q = (x @ p["q_proj.weight"].T).reshape(L, H, d)
    k = (x @ p["k_proj.weight"].T).reshape(L, G, d)
    v = (x @ p["v_proj.weight"].T).reshape(L, G, d)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        qpos = i if (decode_offset or i < T) else 0          # the mistake: flex's q_idx taken as the position
        for j in range(i + 1):
            allowed[i, j] = True if dense else bool(_pattern_allows(qpos, j, cfg))
    heads = []
    for h in range(H):
        kv = h // (H // G)
        s = ((q[:, h, :] @ k[:, kv, :].T) * d ** -0.5).masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        heads.append((w / w.sum(dim=1, keepdim=True)) @ v[:, kv, :])
    out = torch.cat(heads, dim=1) @ p["o_proj.weight"].T
    return _split_expected(out, T)


def check_flex_block_mask(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    partial, full = _flex_tables64(rec.config, spec.prefill_len, spec.decode_steps)
    for name, want in [("kv_blocks", partial), ("full_kv_blocks", full)]:
        got = rec.extra[f"expected.selected.{name}"]
        if got.shape != want.shape or not torch.equal(got, want):
            raise AssertionError(f"{spec.name}: flex's {name} table differs from the one written out from the "
                                 f"element rule:\n{got.tolist()}\nwant\n{want.tolist()}")
    return _flex64(rec, spec)


def contrasts_flex_block_mask(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    return {"dense_causal": _contrast_error(rec, _flex64(rec, spec, dense=True)),
            "decode_without_offset": _contrast_error(rec, _flex64(rec, spec, decode_offset=False))}


def describe_flex_block_mask(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"H={c['num_attention_heads']} G={c['num_key_value_heads']} block={c['block']} "
            f"local={c['local_blocks']} global={c['global_blocks']} stride={c['stride']} "
            f"decode_q_block={c['decode_q_block']}")


def notes_flex_block_mask(rec: Recording, spec: CaseSpec) -> list[str]:
    p, f = rec.extra["expected.selected.kv_blocks"], rec.extra["expected.selected.full_kv_blocks"]
    return [f"    row {r:>2}: partial {[i for i in p[r].tolist() if i >= 0]} full {[i for i in f[r].tolist() if i >= 0]}"
            for r in range(p.shape[0])]


register_reference(
    "flex_block_mask", layer_type="block_sparse", record=record_flex_block_mask, check=check_flex_block_mask,
    describe=describe_flex_block_mask, contrasts=contrasts_flex_block_mask, notes=notes_flex_block_mask,
    summary="torch flex_attention (eager) with create_block_mask over local/global/strided blocks; "
            "outputs and the BlockMask's partial/full tables")


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
# DeepSeek-V3's rope as released (config.json of deepseek-ai/DeepSeek-V3: rope_theta 10000, rope_scaling yarn,
# factor 40, mscale 1.0, mscale_all_dim 1.0, original_max_position_embeddings 4096, beta_fast 32, beta_slow 1,
# max_position_embeddings 163840), with small dimensions.
_DEEPSEEK_V3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}
_hf_case("deepseek_v3", "deepseek_v3_yarn", 4004, 20, 6,
         "transformers DeepseekV3Attention (MLA) with DeepSeek-V3's released rope settings (YaRN factor 40, mscale and "
         "mscale_all_dim 1, original context 4096, beta 32/1, theta 10000; max_position_embeddings 163840): YaRN "
         "frequencies on the 16 rotary dimensions (attention factor mscale/mscale_all_dim = 1 on cos/sin) and the "
         "softmax scale (16 + 16)^-1/2 times (0.1 ln 40 + 1)^2; q_lora_rank 24, kv_lora_rank 32, 4 heads, v 16; "
         "prefill 20, then 6 decode steps.",
         hidden_size=64, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
         qk_rope_head_dim=16, v_head_dim=16, rope_interleave=True, max_position_embeddings=163840,
         rope_parameters=dict(_DEEPSEEK_V3_YARN))
_hf_case("deepseek_v32", "deepseek_v32_k4", 6001, 8, 6,
         "transformers DeepseekV32Attention (DeepSeek sparse attention): MLA (4 heads, q_lora_rank 24, kv_lora_rank 32, "
         "qk_nope 16 + qk_rope 8, v 16) with a lightning indexer of 8 heads of dimension 16 choosing index_topk = 4 keys "
         "per query; prefill 8 then 6 decode steps (T + N = 14 > k). Prefill rows 0-2 see fewer than 4 keys: their "
         "stored selections drop the causally masked entries torch.topk returns and are padded with -1.",
         hidden_size=64, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
         qk_rope_head_dim=8, v_head_dim=16, index_n_heads=8, index_head_dim=16, index_topk=4)
_hf_case("deepseek_v32", "deepseek_v32_k8_offset", 6002, 12, 7,
         "transformers DeepseekV32Attention: MLA (4 heads, q_lora_rank 32, kv_lora_rank 32, qk_nope 16 + qk_rope 8, "
         "v 16) with an indexer of 16 heads of dimension 32 choosing index_topk = 8; positions start at 20; prefill 12 "
         "then 7 decode steps (T + N = 19 > k). Prefill rows 0-6 see fewer than 8 keys: masked entries dropped, -1 "
         "padding.",
         offset=20,
         hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
         qk_rope_head_dim=8, v_head_dim=16, index_n_heads=16, index_head_dim=32, index_topk=8)
_hf_case("deepseek_v32", "deepseek_v32_k4_yarn", 6003, 10, 6,
         "transformers DeepseekV32Attention with DeepSeek-V3's released YaRN settings (factor 40, mscale and "
         "mscale_all_dim 1, original context 4096, beta 32/1, theta 10000): MLA (4 heads, q_lora_rank 24, kv_lora_rank "
         "32, qk_nope 16 + qk_rope 8, v 16) whose softmax scale carries (0.1 ln 40 + 1)^2, and an indexer of 8 heads of "
         "16 choosing index_topk = 4, both rotating with YaRN's frequencies; prefill 10, then 6 decode steps. Prefill "
         "rows 0-2 see fewer than 4 keys: masked entries dropped, -1 padding.",
         hidden_size=64, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
         qk_rope_head_dim=8, v_head_dim=16, index_n_heads=8, index_head_dim=16, index_topk=4,
         max_position_embeddings=163840, rope_parameters=dict(_DEEPSEEK_V3_YARN))
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


# Chapter 09: learned sink logits, the real gpt-oss attention layer (GptOssAttention, eager) with YaRN RoPE.
_GPT_OSS_YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
add_case(CaseSpec(
    name="gpt_oss_sliding_w4_yarn_offset", reference="gpt_oss", seed=9101, prefill_len=7, decode_steps=6,
    layer_type="sliding_attention", position_offset=3000,
    config={"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "sliding_window": 4, "max_position_embeddings": 131072, "rope_parameters": dict(_GPT_OSS_YARN)},
    description="transformers GptOssAttention, banded layer (sliding_attention, sliding_window 4): GQA H = 4, "
                "G = 2, head_dim 16, q/k/v/o biases, one learned sink logit per head; YaRN RoPE with gpt-oss's "
                "settings (theta 150000, factor 32, beta 32/1, no truncation, original context 4096: pairs 0-2 "
                "kept, 3-4 blended, 5-7 stretched; cos/sin times 0.1 ln 32 + 1); positions start at 3000; prefill "
                "of 7 then 6 decode steps through the model's DynamicCache (T + N = 13 > W)."))
add_case(CaseSpec(
    name="gpt_oss_full_yarn_mscale", reference="gpt_oss", seed=9102, prefill_len=9, decode_steps=5,
    layer_type="full_attention", position_offset=400,
    config={"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
            "sliding_window": 4, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 4.0,
                                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                "original_max_position_embeddings": 64}},
    description="transformers GptOssAttention, dense layer (full_attention; the config's sliding_window 4 belongs "
                "to the other layers): GQA H = 8, G = 2, head_dim 16, biases, sink logits; YaRN with factor 8, "
                "beta 4/1, truncation (the default), original context 64 (small, so that the blended pairs 1-2 "
                "rotate fast enough to matter over 14 tokens), and the attention factor from the mscale ratio "
                "(mscale 1, mscale_all_dim 0.5); positions start at 400; prefill 9, decode 5."))

# Chapter 10: block-sparse attention against torch's flex_attention and its BlockMask (see the reference above).
_FLEX_DECODE = ("Decode: flex keeps no cache, so the module appends each token's k, v to its own and calls "
                "flex_attention with one query over the whole cache, with a BlockMask built for that step (one "
                "query row, key blocks of the case's size; the mask function adds the query's absolute position "
                "to flex's q_idx, which restarts at 0 in every call). expected.selected.* hold the BlockMask "
                "tables, partial and full key blocks per query-block row: the prefill rows, then one per step.")
add_case(CaseSpec(
    name="flex_block_mask_local_global_b3", reference="flex_block_mask", seed=9201, prefill_len=10,
    decode_steps=6,
    config={"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "block": 3,
            "local_blocks": 1, "global_blocks": 1, "stride": 0},
    description="Block pattern: the diagonal block plus one global block, blocks of 3 (T = 10 and T + N = 16 are "
                "not multiples of 3), MQA H = 2, head_dim 16. Prefill: one flex call over 10 tokens. "
                + _FLEX_DECODE))
add_case(CaseSpec(
    name="flex_block_mask_strided_b4", reference="flex_block_mask", seed=9202, prefill_len=22, decode_steps=5,
    config={"hidden_size": 64, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "block": 4,
            "local_blocks": 2, "global_blocks": 0, "stride": 3},
    description="Block pattern: two local blocks and every third block back, blocks of 4 (T = 22), GQA H = 4, "
                "G = 2. " + _FLEX_DECODE))
add_case(CaseSpec(
    name="flex_block_mask_chunked_transformers_b4", reference="flex_block_mask", seed=9204, prefill_len=11,
    decode_steps=7,
    config={"hidden_size": 32, "head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "block": 4,
            "local_blocks": 1, "global_blocks": 0, "stride": 0,
            "mask_mod": "transformers.masking_utils.chunked_causal_mask_function"},
    description="A released mask: the BlockMask is built from transformers' chunked_causal_mask_function (Llama 4's "
                "chunked attention, chunks of 4) with its add_offsets_to_mask_function for the decode steps, not "
                "from the project's block rule; chunked attention is the block pattern with the diagonal block "
                "only (local 1, no global or strided blocks), which the generator checks table by table. GQA H = 4, "
                "G = 2 (T = 11, T + N = 18). " + _FLEX_DECODE))
add_case(CaseSpec(
    name="flex_block_mask_all_b5", reference="flex_block_mask", seed=9203, prefill_len=13, decode_steps=9,
    config={"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "block": 5,
            "local_blocks": 1, "global_blocks": 1, "stride": 2},
    description="Block pattern: local, global and strided blocks together (diagonal, block 0, every second block "
                "back), blocks of 5 (T = 13, T + N = 22), MHA H = G = 2. " + _FLEX_DECODE))


# ---- Reference "deepseek_v4": transformers' DeepseekV4Attention (CSA, HCA, sliding) -------------------
#
# The module (model.layers[1].self_attn of a tiny DeepseekV4Model, eager, float32) as the decoder layer calls
# it: its input is input_layernorm(collapsed), where `collapsed` is the hyper-connection's pre-weighted sum
# of the hc_mult residual streams (the mHC mixing before and after the module is not attention and is not
# recorded). Parameters (relative to self_attn): q_a_proj [d_c, hidden], q_a_norm [d_c], q_b_proj [H*c, d_c],
# kv_proj [c, hidden], kv_norm [c], o_a_proj [g*d_g, H*c/g], o_b_proj [hidden, g*d_g], sinks [H]; CSA/HCA add
# compressor.{kv_proj, gate_proj} [s*c, hidden] (s = 2 for CSA's overlapping windows, 1 for HCA),
# compressor.position_bias [m, s*c], compressor.kv_norm [c]; CSA adds compressor.indexer.{kv_proj,
# gate_proj} [2*c_I, hidden], .position_bias [m, 2*c_I], .kv_norm [c_I], .q_b_proj [H_I*c_I, d_c],
# .scorer.weights_proj [H_I, hidden]. The rotary buffers (inv_freq) are not saved: they follow from the config.
# Initialisation: as the other Hugging Face references, plus sinks N(0,1) and position_bias N(0,1) (the model
# initialises both to zero, which would hide them).
#
# Selections: a forward hook on compressor.indexer records what it returns for every call ([1, S, k_call]
# with k_call = min(index_topk, entries so far), picks past the query's causal limit already -1); rows are
# padded with -1 to index_topk and concatenated over the prefill and decode calls into
# expected.selected.indexer [1, T+N, index_topk]. A hook on the scorer records the raw index scores; a case
# whose top-k boundary is a near tie (the k-th and (k+1)-th valid scores within DEEPSEEK_V4_TIE_GAP of each
# other, relative to the row's largest |score|) is refused: torch.topk's order among equal scores is not
# specified, and float32 rounding could flip such a pick.

DEEPSEEK_V4_DEFAULTS = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "partial_rotary_factor": 0.5,     # RoPE on the last 8 of 16 dimensions (published: 64 of 512)
    "q_lora_rank": 24,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "hc_mult": 2,
    "sliding_window": 6,
    "o_groups": 2,
    "o_lora_rank": 12,
    "index_n_heads": 4,
    "index_head_dim": 16,
    "index_topk": 2,
    # Tiny ratios, same code paths as the published 4 (CSA, overlapping) and 128 (HCA).
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
DEEPSEEK_V4_TIE_GAP = 1e-3
DEEPSEEK_V4_POSITION_BIAS_STD = 1.0


def deepseek_v4_config_kwargs(partial: dict[str, Any], layer_type: str) -> dict[str, Any]:
    cfg = json.loads(json.dumps(DEEPSEEK_V4_DEFAULTS))
    cfg.update(partial)
    cfg["layer_types"] = ["sliding_attention", layer_type]
    return cfg


def _v4_init_params(module, g) -> dict[str, Any]:
    params = {}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("norm.weight"):
                value = 1.0 + randn(g, *p.shape, std=HF_NORM_WEIGHT_STD)
            elif name == "sinks":
                value = randn(g, *p.shape, std=HF_SINK_STD)
            elif name.endswith("position_bias"):
                value = randn(g, *p.shape, std=DEEPSEEK_V4_POSITION_BIAS_STD)
            elif p.ndim == 2:
                value = randn(g, *p.shape, std=1 / math.sqrt(p.shape[1]))
            else:
                raise AssertionError(f"no initialisation rule for parameter {name} {tuple(p.shape)}")
            p.copy_(value)
            params[name] = value.clone()
    return params


def record_deepseek_v4(spec: CaseSpec) -> Recording:
    from transformers import DeepseekV4Config, DeepseekV4Model, DynamicCache
    T, N = spec.prefill_len, spec.decode_steps
    L = T + N
    config = DeepseekV4Config(**deepseek_v4_config_kwargs(spec.config, spec.layer_type))
    torch.manual_seed(spec.seed)
    model = DeepseekV4Model._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    attn = model.layers[HF_HOOKED_LAYER].self_attn
    if attn.layer_type != spec.layer_type:
        raise AssertionError(f"{spec.name}: hooked layer is {attn.layer_type}, want {spec.layer_type}")
    g = seeded_generator(spec.seed)
    params = _v4_init_params(attn, g)
    ids = torch.randint(0, config.vocab_size, (1, L), generator=g, dtype=torch.int64)
    pos = torch.arange(spec.position_offset, spec.position_offset + L, dtype=torch.int64).unsqueeze(0)
    seen: dict[str, list] = {"hidden_states": [], "position_ids": [], "output": [], "picks": [], "scores": []}

    def pre_hook(module, args, kwargs):
        seen["hidden_states"].append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone())
        seen["position_ids"].append(kwargs["position_ids"].clone())

    def post_hook(module, args, kwargs, output):
        seen["output"].append((output[0] if isinstance(output, tuple) else output).clone())

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True),
               attn.register_forward_hook(post_hook, with_kwargs=True)]
    if spec.layer_type == "compressed_sparse_attention":
        indexer = attn.compressor.indexer
        handles.append(indexer.register_forward_hook(lambda m, a, o: seen["picks"].append(o.clone())))
        handles.append(indexer.scorer.register_forward_hook(lambda m, a, o: seen["scores"].append(o.clone())))
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
    if len(seen["output"]) != N + 1 or [t.shape[1] for t in seen["hidden_states"]] != [T] + [1] * N:
        raise AssertionError(f"{spec.name}: module calls {[t.shape for t in seen['hidden_states']]}")
    position_ids = torch.cat(seen["position_ids"], dim=1).to(torch.int64).contiguous()
    if not torch.equal(position_ids, pos):
        raise AssertionError(f"{spec.name}: the module saw position ids {position_ids.tolist()}")
    extra, meta = {}, {"module": f"layers.{HF_HOOKED_LAYER}.self_attn", "position_offset": spec.position_offset}
    if spec.layer_type == "compressed_sparse_attention":
        k = config.index_topk
        m = config.compress_rates["compressed_sparse_attention"]
        rows, ties = [], 0
        for picks, scores, p in zip(seen["picks"], seen["scores"], seen["position_ids"]):
            for r in range(picks.shape[1]):
                row = picks[0, r].tolist()
                s = scores[0, r].to(torch.float64)
                limit = (int(p[0, r]) + 1) // m
                valid = s[:limit]
                if valid.numel() > k:
                    top = torch.sort(valid, descending=True).values
                    gap = float(top[k - 1] - top[k])
                    if not gap > DEEPSEEK_V4_TIE_GAP * max(1e-6, float(valid.abs().max())):
                        ties += 1
                want = sorted(torch.topk(valid, min(k, valid.numel())).indices.tolist()) if limit else []
                if sorted(i for i in row if i >= 0) != want:
                    raise AssertionError(f"{spec.name}: indexer picks {row} are not the top-{k} of {s.tolist()}")
                rows.append(row + [-1] * (k - len(row)))
        if ties:
            raise AssertionError(f"{spec.name}: {ties} rows have a near tie at the top-{k} boundary; "
                                 f"choose another seed")
        extra["expected.selected.indexer"] = torch.tensor([rows], dtype=torch.int64)
        meta["selected"] = {"indexer": "compressor.indexer's output per call, -1 for picks past the query's "
                                       "causal limit (as the reference returns them) and as padding to index_topk"}
    return Recording(config=json_safe(config.to_dict()), params=params,
                     hidden_states=torch.cat(seen["hidden_states"], dim=1).contiguous(), position_ids=position_ids,
                     prefill=seen["output"][0].contiguous(),
                     decode=(torch.cat(seen["output"][1:], dim=1) if N else
                             torch.zeros(1, 0, config.hidden_size)).contiguous(),
                     extra=extra, meta=meta)


def _v4_compress64(x, p, prefix, c, m, overlap, positions_inv, eps, *, overlap_off=False, rope_at_end=False,
                   att=1.0):
    """Entries of the compressor `prefix` over the whole sequence, float64, from the formula."""
    kv, gate = _linear64(x, p, f"{prefix}kv_proj"), _linear64(x, p, f"{prefix}gate_proj")
    bias = p[f"{prefix}position_bias"]
    n = x.shape[0] // m
    out = []
    for e in range(n):
        own = slice(c, 2 * c) if overlap else slice(0, c)
        kvs = [kv[e * m:(e + 1) * m, own]]
        gs = [gate[e * m:(e + 1) * m, own] + bias[:, own]]
        if overlap and e > 0 and not overlap_off:
            kvs.insert(0, kv[(e - 1) * m:e * m, :c])
            gs.insert(0, gate[(e - 1) * m:e * m, :c] + bias[:, :c])
        w = torch.softmax(torch.cat(gs), dim=0)
        out.append((w * torch.cat(kvs)).sum(dim=0))
    if not out:
        return torch.zeros(0, c, dtype=torch.float64)
    ent = rms_norm64(torch.stack(out), p[f"{prefix}kv_norm.weight"], eps)
    at = torch.arange(n, dtype=torch.float64) * m + (m - 1 if rope_at_end else 0)
    return _v4_rope_tail(ent[:, None, :], at, positions_inv, att)[:, 0, :]


def _v4_rope_tail(x, positions, inv, att=1.0):
    """Interleaved RoPE on the last 2 * len(inv) values; the rotated values times `att` (YaRN's factor on cos and
    sin, which V4's config forces to 1 for its compressed layers)."""
    r = 2 * inv.shape[0]
    return torch.cat([x[..., :-r], att * rope64(x[..., -r:], positions, inv, interleaved=True)], dim=-1)


def _deepseek_v4_64(rec: Recording, spec: CaseSpec, *, unrotate=True, sink=True, entries=True,
                    overlap_off=False, rope_at_end=False, yarn=True):
    c = rec.config
    kind = spec.layer_type
    H, D = c["num_attention_heads"], c["head_dim"]
    r = int(D * c["partial_rotary_factor"])
    eps, W = c["rms_norm_eps"], c["sliding_window"]
    rp = c["rope_parameters"]["main" if kind == "sliding_attention" else "compress"]
    inv, att = float(rp["rope_theta"]) ** (-torch.arange(0, r, 2, dtype=torch.float64) / r), 1.0
    if rp.get("rope_type", "default") == "yarn" and yarn:
        inv, att = yarn_inv_freq64(r, rp, c["max_position_embeddings"])
    elif rp.get("rope_type", "default") not in ("default", "yarn"):
        raise NotImplementedError(f"deepseek_v4 check: rope type {rp.get('rope_type')}")
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    pos = torch.arange(spec.position_offset, spec.position_offset + L, dtype=torch.float64)

    q_res = rms_norm64(_linear64(x, p, "q_a_proj"), p["q_a_norm.weight"], eps)
    q = _linear64(q_res, p, "q_b_proj").reshape(L, H, D)
    q = _v4_rope_tail(q / torch.sqrt((q * q).mean(-1, keepdim=True) + eps), pos, inv, att)
    kv = _v4_rope_tail(rms_norm64(_linear64(x, p, "kv_proj"), p["kv_norm.weight"], eps)[:, None, :], pos, inv,
                       att)[:, 0]
    m = c["compress_rates"].get(kind, 0) if kind != "sliding_attention" else 0
    csa = kind == "compressed_sparse_attention"
    ent = (_v4_compress64(x, p, "compressor.", D, m, csa, inv, eps, overlap_off=overlap_off, rope_at_end=rope_at_end,
                          att=att) if m else None)
    selected = []
    if csa:
        Hi, Di, k = c["index_n_heads"], c["index_head_dim"], c["index_topk"]
        keys = _v4_compress64(x, p, "compressor.indexer.", Di, m, True, inv, eps, att=att)
        qi = _v4_rope_tail(_linear64(q_res, p, "compressor.indexer.q_b_proj").reshape(L, Hi, Di), pos, inv, att)
        wts = _linear64(x, p, "compressor.indexer.scorer.weights_proj") * Hi ** -0.5
        scores = (torch.relu(torch.einsum("thd,ed->the", qi, keys)) * Di ** -0.5 * wts[:, :, None]).sum(1)
    out = torch.zeros(L, H, D, dtype=torch.float64)
    for t in range(L):
        rows = [kv[j] for j in range(max(0, t - W + 1), t + 1)]
        limit = (int(pos[t]) + 1) // m if m else 0
        if m and entries:
            if csa:
                chosen = sorted(torch.topk(scores[t, :limit], min(k, limit)).indices.tolist()) if limit else []
                selected.append(chosen)
                rows += [ent[e] for e in chosen]
            else:
                rows += [ent[e] for e in range(limit)]
        keys_t = torch.stack(rows)                                              # [n, D]
        logits = (q[t] @ keys_t.T) * D ** -0.5                                  # [H, n]
        if sink:
            logits = torch.cat([logits, p["sinks"][:, None]], dim=1)
        w = torch.softmax(logits, dim=1)[:, :keys_t.shape[0]]
        out[t] = w @ keys_t
    if unrotate:
        out = _v4_rope_tail(out, -pos, inv, att)
    G, dg = c["o_groups"], c["o_lora_rank"]
    grouped = out.reshape(L, G, H * D // G)
    wa = p["o_a_proj.weight"].reshape(G, dg, H * D // G)
    mid = torch.einsum("tgi,goi->tgo", grouped, wa).reshape(L, G * dg)
    result = _split_expected(_linear64(mid, p, "o_b_proj"), spec.prefill_len)
    return result, selected


def check_deepseek_v4(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    result, selected = _deepseek_v4_64(rec, spec)
    if "expected.selected.indexer" in rec.extra:
        got = [sorted(i for i in row if i >= 0) for row in rec.extra["expected.selected.indexer"][0].tolist()]
        if got != selected:
            raise AssertionError(f"{spec.name}: recorded selections differ from the float64 top-k")
    return result


def contrasts_deepseek_v4(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    out = {"no_output_unrotation": _contrast_error(rec, _deepseek_v4_64(rec, spec, unrotate=False)[0]),
           "no_sink": _contrast_error(rec, _deepseek_v4_64(rec, spec, sink=False)[0])}
    if spec.layer_type != "sliding_attention":
        out["window_only"] = _contrast_error(rec, _deepseek_v4_64(rec, spec, entries=False)[0])
        if rec.config["rope_parameters"]["compress"].get("rope_type") == "yarn":
            out["default_rope"] = _contrast_error(rec, _deepseek_v4_64(rec, spec, yarn=False)[0])
    return out


def notes_deepseek_v4(rec: Recording, spec: CaseSpec) -> list[str]:
    if spec.layer_type == "sliding_attention":
        return []
    notes = [f"  entry RoPE at the block's last token instead of its first: "
             f"{_contrast_error(rec, _deepseek_v4_64(rec, spec, rope_at_end=True)[0]):.2e}"]
    if spec.layer_type == "compressed_sparse_attention":
        notes.append(f"  CSA without the overlapping half (Ca of the previous block): "
                     f"{_contrast_error(rec, _deepseek_v4_64(rec, spec, overlap_off=True)[0]):.2e}")
    return notes


def describe_deepseek_v4(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    m = c["compress_rates"].get(spec.layer_type, 0)
    return (f"{spec.layer_type:<28} H={c['num_attention_heads']} c={c['head_dim']} W={c['sliding_window']} m={m} "
            f"topk={c['index_topk'] if spec.layer_type == 'compressed_sparse_attention' else '-'}")


register_reference(
    "deepseek_v4", layer_type="compressed_sparse_attention", record=record_deepseek_v4, check=check_deepseek_v4,
    describe=describe_deepseek_v4, contrasts=contrasts_deepseek_v4, notes=notes_deepseek_v4,
    summary="transformers DeepseekV4Attention (eager) in a tiny DeepseekV4Model: sliding, CSA (+ indexer), HCA")


def _v4_case(name, seed, layer_type, T, N, description, **config):
    add_case(CaseSpec(name=name, reference="deepseek_v4", seed=seed, prefill_len=T, decode_steps=N, config=config,
                      description=description, layer_type=layer_type))


_v4_case("deepseek_v4_sliding", 12001, "sliding_attention", 9, 8,
         "transformers DeepseekV4Attention, sliding-only layer: 4 heads sharing one K = V head of 16 (RoPE on the "
         "last 8, interleaved, theta 10000), per-head sinks, window 6, grouped output projection (2 groups of 12); "
         "a prefill of 9, then 8 decode steps.")
_v4_case("deepseek_v4_csa", 12002, "compressed_sparse_attention", 10, 11,
         "transformers DeepseekV4Attention, CSA layer: compress ratio 4 (overlapping windows, the published value), "
         "indexer with 4 heads of 16 and top-2, window 6, compress theta 160000; the prefill of 10 ends inside a "
         "block (2 tokens pending), the 11 decode steps complete the blocks at 12, 16 and 20.")
_v4_case("deepseek_v4_csa_topk_all", 12003, "compressed_sparse_attention", 7, 13,
         "transformers DeepseekV4Attention, CSA layer with index_topk 8 >= every entry count reached (5): the "
         "selection is every complete entry; prefill of 7 (3 pending), 13 decode steps.",
         index_topk=8)
_v4_case("deepseek_v4_csa_yarn", 12005, "compressed_sparse_attention", 10, 14,
         "transformers DeepseekV4Attention, CSA layer with the published kind of compressed-layer RoPE: YaRN (factor "
         "16, beta 32/1) on theta 160000, its attention factor forced to 1 by the config, but an original context of "
         "16 tokens (published: 65536) so that YaRN changes the rotations within this short case; the sliding layer "
         "keeps plain RoPE. Prefill of 10 (2 pending), 14 decode steps.",
         rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16,
                          "beta_fast": 32.0, "beta_slow": 1.0})
_v4_case("deepseek_v4_hca", 12004, "heavily_compressed_attention", 13, 12,
         "transformers DeepseekV4Attention, HCA layer: compress ratio 8 (tiny for the published 128, the same "
         "non-overlapping code path), window 6; the prefill of 13 ends inside a block (5 pending), the 12 decode "
         "steps complete the blocks at 16 and 24.")


# ---- Reference "minimax": transformers' MiniMaxLightningAttention and MiniMaxAttention ----------------
#
# A tiny MiniMaxModel whose layer_types mix "full_attention" and "linear_attention"; the hooked layer's index
# is the case's `layer_idx` (the lightning layer's decay depends on it). Recorded through the model's own
# MiniMaxCache: a prefill of T tokens, then N single-token steps.
# Lightning ("linear_attention") parameters: qkv_proj.weight [3*H*d, hidden] (head h's rows: q, k, v of d
# each, in that order), output_gate.weight [H*d, hidden], norm.weight [H*d], out_proj.weight [hidden, H*d].
# q, k, v = SiLU(x W_qkv^T) per head; no scale, no softmax; slope of head h (0-based) of layer l of L:
# 2^(-8(h+1)/H) * (1 - l/(L-1+1e-5) + 1e-5); o_t = sum_{j<=t} exp(-s (t-j)) (q_t.k_j) v_j; the prefill in
# blocks of block_size, decode token by token through the [H, d, d] state; RMSNorm over all H*d outputs with
# the class default eps 1e-6; times sigmoid(x W_gate^T); out_proj. The module's buffers (slopes and decay
# tables) are derived from the config and layer index and are not saved.
# Full ("full_attention") parameters: q_proj, k_proj, v_proj, o_proj as Llama without biases; RoPE over the
# whole head_dim (this port ignores any partial rotary setting), half-split, scale d^-0.5, causal GQA.

MINIMAX_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_local_experts": 2,
    "num_experts_per_tok": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
MINIMAX_NORM_EPS = 1e-6      # MiniMaxRMSNorm's default, used by the lightning layer's own norm


def minimax_config_kwargs(partial: dict[str, Any]) -> tuple[dict[str, Any], int]:
    cfg = json.loads(json.dumps(MINIMAX_DEFAULTS))
    cfg.update(partial)
    layer = cfg.pop("hooked_layer")
    return cfg, layer


def _draw_params(module, g, drawn: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Overwrite every parameter of `module` with seeded values and return {name: tensor}: a parameter named in
    `drawn` from N(mean, std^2); a depthwise convolution weight [C, 1, K] from N(0, 1/K); any other matrix from
    N(0, 1/fan_in)."""
    params = {}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name in drawn:
                mean, std = drawn[name]
                value = mean + randn(g, *p.shape, std=std)
            elif name == "conv1d.weight":
                value = randn(g, *p.shape, std=1 / math.sqrt(p.shape[-1]))
            elif p.ndim == 2:
                value = randn(g, *p.shape, std=1 / math.sqrt(p.shape[1]))
            else:
                raise AssertionError(f"no initialisation rule for parameter {name} {tuple(p.shape)}")
            p.copy_(value)
            params[name] = value.clone()
    return params


def _record_through_cache(spec: CaseSpec, model, attn, config, g, make_cache, after_call=None):
    """Random token ids from `g`; a prefill of T tokens and N single-token steps of `model` through the cache
    `make_cache()` builds (the model's own), with `attn`'s inputs and outputs hooked. `after_call(i, cache)`, when
    given, runs after each call of the model (i = 0 the prefill, i = 1 .. N the decode steps), e.g. to copy what
    the cache holds then. Returns (position ids, hidden_states, prefill, decode, cache)."""
    T, N = spec.prefill_len, spec.decode_steps
    L = T + N
    ids = torch.randint(0, config.vocab_size, (1, L), generator=g, dtype=torch.int64)
    pos = torch.arange(L, dtype=torch.int64).unsqueeze(0)
    seen: dict[str, list] = {"hidden_states": [], "output": []}

    def pre_hook(module, args, kwargs_):
        hs = kwargs_["hidden_states"] if "hidden_states" in kwargs_ else args[0]
        seen["hidden_states"].append(hs.detach().clone())

    def post_hook(module, args, kwargs_, output):
        out = output[0] if isinstance(output, tuple) else output
        seen["output"].append(out.detach().clone())

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True),
               attn.register_forward_hook(post_hook, with_kwargs=True)]
    try:
        with torch.no_grad():
            cache = make_cache()
            model(input_ids=ids[:, :T], position_ids=pos[:, :T], past_key_values=cache, use_cache=True)
            if after_call is not None:
                after_call(0, cache)
            for i in range(N):
                model(input_ids=ids[:, T + i:T + i + 1], position_ids=pos[:, T + i:T + i + 1],
                      past_key_values=cache, use_cache=True)
                if after_call is not None:
                    after_call(i + 1, cache)
    finally:
        for h in handles:
            h.remove()
    if [t.shape[1] for t in seen["hidden_states"]] != [T] + [1] * N:
        raise AssertionError(f"{spec.name}: unexpected call lengths {[t.shape for t in seen['hidden_states']]}")
    hidden_states = torch.cat(seen["hidden_states"], dim=1).to(torch.float32).contiguous()
    prefill = seen["output"][0].contiguous()
    decode = (torch.cat(seen["output"][1:], dim=1) if N else
              torch.zeros(1, 0, config.hidden_size, dtype=torch.float32)).contiguous()
    return pos, hidden_states, prefill, decode, cache


def _linear_state_recorder(spec: CaseSpec, layer: int):
    """An `after_call` for _record_through_cache that copies what the hooked linear-attention layer's cache entry
    (transformers' LinearAttentionLayer inside DynamicCache) holds after the prefill and after the last call: its
    convolution state conv_states[0] [1, C, K] and its recurrent state recurrent_states[0] [1, H, d_k, d_v], as
    expected.{prefill,final}.{conv_state,recurrent_state}. The entry must hold exactly one state of each kind
    (index 0): one convolution over [q | k | v] together, not one per projection. Returns (after_call, the dict
    it fills)."""
    states: dict[str, Any] = {}

    def after_call(i, cache):
        if i not in (0, spec.decode_steps):
            return
        entry = cache.layers[layer]
        conv = [j for j, ready in entry.is_conv_states_initialized.items() if ready]
        recurrent = [j for j, ready in entry.is_recurrent_states_initialized.items() if ready]
        if conv != [0] or recurrent != [0]:
            raise AssertionError(f"{spec.name}: layer {layer}'s cache holds conv states {conv} and recurrent states "
                                 f"{recurrent}; want exactly [0] of each")
        whens = (["prefill"] if i == 0 else []) + (["final"] if i == spec.decode_steps else [])
        for when in whens:
            for kind, value in (("conv_state", entry.conv_states[0]), ("recurrent_state", entry.recurrent_states[0])):
                if value.dtype != torch.float32:
                    raise AssertionError(f"{spec.name}: the cache's {kind} is {value.dtype}, want float32")
                states[f"expected.{when}.{kind}"] = value.detach().clone().contiguous()

    return after_call, states


def _conv_state64(mixed, t: int, K: int, *, reversed_time: bool = False):
    """What the reference's convolution state holds after t tokens, from the formula: the convolution's inputs
    (mixed [L, C], before the convolution) at positions t-K .. t-1, zeros before the first token, laid out
    [1, C, K] oldest first. reversed_time: newest first (a deliberate mistake)."""
    padded = torch.cat([torch.zeros(K, mixed.shape[1], dtype=torch.float64), mixed[:t]])
    window = padded[-K:]                                                       # [K, C]
    if reversed_time:
        window = window.flip(0)
    return window.T.unsqueeze(0).contiguous()


def _delta_states64(states_at: dict[int, Any], mixed, T: int, L: int, K: int, *, conv_state_reversed: bool = False,
                    final_state_step_early: bool = False) -> dict[str, Any]:
    """The expected.{prefill,final}.{conv_state,recurrent_state} tensors from a float64 recomputation:
    `states_at[t]` is the delta rule's state [H, d_k, d_v] after t tokens. The two flags are deliberate mistakes
    (contrasts): the convolution state newest first, and the final recurrent state one token early."""
    final = L - 1 if final_state_step_early else L
    return {"expected.prefill.conv_state": _conv_state64(mixed, T, K),
            "expected.prefill.recurrent_state": states_at[T].unsqueeze(0),
            "expected.final.conv_state": _conv_state64(mixed, L, K, reversed_time=conv_state_reversed),
            "expected.final.recurrent_state": states_at[final].unsqueeze(0)}


def _state_contrasts(rec: Recording, spec: CaseSpec, recompute) -> dict[str, float]:
    """Contrasts on the recorded cache states: `recompute(**flags)` is the float64 recomputation with a deliberate
    mistake; each error is relative to max(1, max|recorded state|)."""
    out = {"conv_state_newest_first": relative_error(rec.extra["expected.final.conv_state"],
                                                     recompute(conv_state_reversed=True)["expected.final.conv_state"])}
    if spec.decode_steps > 0:
        out["final_state_one_token_early"] = relative_error(
            rec.extra["expected.final.recurrent_state"],
            recompute(final_state_step_early=True)["expected.final.recurrent_state"])
    return out


def record_minimax(spec: CaseSpec) -> Recording:
    from transformers import MiniMaxConfig, MiniMaxModel
    from transformers.models.minimax.modeling_minimax import MiniMaxCache
    kwargs, layer = minimax_config_kwargs(spec.config)
    config = MiniMaxConfig(**kwargs)
    if config.layer_types[layer] != spec.layer_type:
        raise AssertionError(f"{spec.name}: layer {layer} is {config.layer_types[layer]}, want {spec.layer_type}")
    torch.manual_seed(spec.seed)
    model = MiniMaxModel._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    attn = model.layers[layer].self_attn
    g = seeded_generator(spec.seed)
    params = _draw_params(attn, g, {"norm.weight": (1.0, HF_NORM_WEIGHT_STD)})
    pos, hidden_states, prefill, decode, cache = _record_through_cache(spec, model, attn, config, g, MiniMaxCache)
    meta = {"module": f"layers.{layer}.self_attn", "layer_idx": layer}
    if spec.layer_type == "linear_attention":
        meta["state_shape"] = list(cache.linear_cache[layer].shape)
    return Recording(config=json_safe(config.to_dict()), params=params, hidden_states=hidden_states,
                     position_ids=pos, prefill=prefill, decode=decode, meta=meta)


def minimax_slopes64(H: int, layer: int, layers: int, *, depth_factor: bool = True):
    s = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    return s * (1 - layer / (layers - 1 + 1e-5) + 1e-5) if depth_factor else s


def _minimax_linear64(rec: Recording, spec: CaseSpec, *, depth_factor: bool = True, per_head_norm: bool = False,
                      no_decay: bool = False):
    c = rec.config
    H = c["num_attention_heads"]
    d = c.get("head_dim") or c["hidden_size"] // H
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    qkv = F.silu(x @ p["qkv_proj.weight"].T).reshape(L, H, 3 * d)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    s = minimax_slopes64(H, rec.meta["layer_idx"], c["num_hidden_layers"], depth_factor=depth_factor)
    if no_decay:
        s = torch.zeros_like(s)
    distance = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).to(torch.float64)    # t - j
    heads = []
    for h in range(H):
        w = (q[:, h, :] @ k[:, h, :].T) * torch.exp(-s[h] * distance.clamp(min=0))
        w = w.masked_fill(distance < 0, 0.0)
        heads.append(w @ v[:, h, :])
    y = torch.cat(heads, dim=1)                                                              # [L, H*d]
    if per_head_norm:
        y = torch.cat([rms_norm64(y[:, h * d:(h + 1) * d], p["norm.weight"][h * d:(h + 1) * d], MINIMAX_NORM_EPS)
                       for h in range(H)], dim=1)
    else:
        y = rms_norm64(y, p["norm.weight"], MINIMAX_NORM_EPS)
    y = torch.sigmoid(x @ p["output_gate.weight"].T) * y
    return _split_expected(y @ p["out_proj.weight"].T, spec.prefill_len)


def _minimax_full64(rec: Recording, spec: CaseSpec, *, rotary_dim_half: bool = False):
    c = rec.config
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or c["hidden_size"] // H
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(L)
    r = d // 2 if rotary_dim_half else d
    inv = rope_inv_freq64(r, c["rope_parameters"])

    def rotate(t):
        return torch.cat([rope64(t[..., :r], positions, inv, interleaved=False), t[..., r:]], dim=-1)

    q = rotate((x @ p["q_proj.weight"].T).reshape(L, H, d))
    k = rotate((x @ p["k_proj.weight"].T).reshape(L, G, d))
    v = (x @ p["v_proj.weight"].T).reshape(L, G, d)
    return _split_expected(causal_attention64(q, k, v, d ** -0.5) @ p["o_proj.weight"].T, spec.prefill_len)


def check_minimax(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    if spec.layer_type == "linear_attention":
        return _minimax_linear64(rec, spec)
    return _minimax_full64(rec, spec)


def contrasts_minimax(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    if spec.layer_type == "linear_attention":
        out = {"norm_per_head": _contrast_error(rec, _minimax_linear64(rec, spec, per_head_norm=True)),
               "no_decay": _contrast_error(rec, _minimax_linear64(rec, spec, no_decay=True))}
        if rec.meta["layer_idx"] > 0:
            out["no_depth_factor"] = _contrast_error(rec, _minimax_linear64(rec, spec, depth_factor=False))
        return out
    return {"rotary_dim_half": _contrast_error(rec, _minimax_full64(rec, spec, rotary_dim_half=True))}


def describe_minimax(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    H = c["num_attention_heads"]
    d = c.get("head_dim") or c["hidden_size"] // H
    text = (f"{spec.layer_type:<16} layer={rec.meta['layer_idx']}/{c['num_hidden_layers']} hidden={c['hidden_size']} "
            f"H={H} d={d}")
    if spec.layer_type == "linear_attention":
        return text + f" block={c['block_size']} state={rec.meta['state_shape']}"
    return text + f" G={c['num_key_value_heads']} theta={c['rope_parameters']['rope_theta']:g}"


register_reference(
    "minimax", layer_type="linear_attention", record=record_minimax, check=check_minimax,
    describe=describe_minimax, contrasts=contrasts_minimax,
    summary="transformers MiniMaxLightningAttention / MiniMaxAttention (eager) in a tiny MiniMaxModel, MiniMaxCache")

add_case(CaseSpec(name="minimax_lightning_layer2_block4", reference="minimax", seed=13001, prefill_len=10,
                  decode_steps=7, layer_type="linear_attention",
                  config={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                          "block_size": 4, "hooked_layer": 2},
                  description="MiniMax lightning attention, layer 2 of 4 (depth factor 1/3), H = 4 heads of d = 8, "
                              "block 4: a prefill of 10 (two full blocks and a partial one), then 7 decode steps "
                              "through MiniMaxCache's [1, 4, 8, 8] state (T + N = 17 crosses two block edges)."))
add_case(CaseSpec(name="minimax_lightning_layer1_block8", reference="minimax", seed=13002, prefill_len=21,
                  decode_steps=5, layer_type="linear_attention",
                  config={"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                          "block_size": 8, "hooked_layer": 1},
                  description="MiniMax lightning attention, layer 1 of 4, H = 2 heads of d = 16, block 8: a prefill "
                              "of 21 (two blocks and 5 tokens), then 5 decode steps through the state."))
add_case(CaseSpec(name="minimax_full_gqa_layer3", reference="minimax", seed=13003, prefill_len=9,
                  decode_steps=5, layer_type="full_attention",
                  config={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                          "block_size": 4, "hooked_layer": 3,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0}},
                  description="MiniMax full-attention layer 3 of 4 (after two lightning layers): GQA H = 4, G = 2, "
                              "d = 8, RoPE theta 1e7 over the whole head dim (half-split), prefill 9, 5 decode "
                              "steps through MiniMaxCache's KV layers."))


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
                    ("expected.decode", rec.decode)] + list(rec.params.items()) + [
                        (n, t) for n, t in rec.extra.items() if t.is_floating_point()]:
        if not torch.isfinite(t).all():
            raise AssertionError(f"{spec.name}: {name} is not finite")
        if t.numel() and float(t.abs().max()) == 0.0:
            raise AssertionError(f"{spec.name}: {name} is all zeros")

    recomputed = REFERENCES[spec.reference].check(rec, spec)
    saved = {"expected.prefill": rec.prefill, "expected.decode": rec.decode} | rec.extra
    worst = 0.0
    for name, want in recomputed.items():
        got = saved[name]
        if tuple(got.shape) != tuple(want.shape):
            raise AssertionError(f"{spec.name}: {name} is {tuple(got.shape)}; the float64 recomputation gives "
                                 f"{tuple(want.shape)}")
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
    if sorted(rec.extra) != sorted(again.extra):
        raise AssertionError(f"{spec.name}: two recordings from seed {spec.seed} hold different extra tensors")
    for a, b in [(rec.prefill, again.prefill), (rec.decode, again.decode)] + [(rec.extra[n], again.extra[n])
                                                                              for n in rec.extra]:
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


# ---- References "qwen3" and "gemma3": QK normalisation (Qwen3Attention, Gemma3Attention) ------------------------
#
# Both are GQA layers with q_proj/k_proj/v_proj/o_proj (biases on all four with attention_bias) and two RMSNorm
# gains over head_dim, q_norm.weight and k_norm.weight, applied to every query and key head after the projections
# and before the half-split RoPE (keys cached after both). Qwen3's RMSNorm multiplies by w (drawn 1 + 0.2 N(0,1));
# Gemma's by 1 + w (w drawn 0.2 N(0,1): zero-centred). Qwen3 scales the scores by head_dim^-0.5; Gemma 3 by
# query_pre_attn_scalar^-0.5, and takes its rotary settings per layer kind from rope_parameters[layer_type]
# (sliding_attention: the local base, rope_local_base_freq in older configs; full_attention: rope_theta, with
# linear scaling in the released models). A sliding_attention layer sees 0 <= q - k < sliding_window, as Mistral's.
# transformers 5.17's Gemma3Attention never passes attn_logit_softcapping on (the field exists; Gemma 3 replaced
# Gemma 2's soft-capping with the QK norm), so the cases keep it null.

QWEN3_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": False,
}

GEMMA3_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}


def _qk_norm_config(defaults: dict[str, Any], partial: dict[str, Any], layer_type: str, other: str):
    cfg = json.loads(json.dumps(defaults))
    cfg.update(partial)
    types = [other] * cfg["num_hidden_layers"]
    types[HF_HOOKED_LAYER] = layer_type
    cfg["layer_types"] = types
    return cfg


def _check_hooked_layer(rec: Recording, spec: CaseSpec, layer_type: str) -> None:
    if rec.config["layer_types"][HF_HOOKED_LAYER] != layer_type:
        raise AssertionError(f"{spec.name}: hooked layer is {rec.config['layer_types'][HF_HOOKED_LAYER]}")
    if layer_type == "sliding_attention" and spec.prefill_len + spec.decode_steps <= rec.config["sliding_window"] + 1:
        raise AssertionError(f"{spec.name}: need T + N > W + 1 so that the window edge is crossed")


def record_qwen3(spec: CaseSpec) -> Recording:
    from transformers import Qwen3Config, Qwen3Model
    layer_type = spec.layer_type or "full_attention"
    cfg = _qk_norm_config(QWEN3_DEFAULTS, spec.config, layer_type, "full_attention")
    cfg["use_sliding_window"] = layer_type == "sliding_attention" or cfg.get("use_sliding_window", False)
    rec = _hf_record(spec, Qwen3Config, Qwen3Model, cfg)
    _check_hooked_layer(rec, spec, layer_type)
    return rec


def record_gemma3(spec: CaseSpec) -> Recording:
    from transformers import Gemma3TextConfig, Gemma3TextModel
    layer_type = spec.layer_type or "sliding_attention"
    other = "full_attention" if layer_type == "sliding_attention" else "sliding_attention"
    cfg = _qk_norm_config(GEMMA3_DEFAULTS, spec.config, layer_type, other)
    rec = _hf_record(spec, Gemma3TextConfig, Gemma3TextModel, cfg,
                     init_params=lambda attn, g: _draw_params(attn, g, {"q_norm.weight": (0.0, HF_NORM_WEIGHT_STD),
                                                                        "k_norm.weight": (0.0, HF_NORM_WEIGHT_STD)}))
    _check_hooked_layer(rec, spec, layer_type)
    if rec.config.get("attn_logit_softcapping") is not None:
        raise AssertionError(f"{spec.name}: attn_logit_softcapping must stay null (5.17 never applies it)")
    return rec


def _rope_inv_freq_any64(dim: int, rp: dict[str, Any]):
    """rope_inv_freq64 plus linear scaling (every frequency divided by factor)."""
    if rp.get("rope_type", "default") == "linear":
        return rope_inv_freq64(dim, {"rope_type": "default", "rope_theta": rp["rope_theta"]}) / float(rp["factor"])
    return rope_inv_freq64(dim, rp)


def _qk_norm64(rec: Recording, spec: CaseSpec, *, gain_offset: float, scale: float, rope_parameters: dict[str, Any],
               window_shift: int = 0, no_norm: bool = False, norm_after_rope: bool = False):
    c = rec.config
    H, G, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(spec.position_offset, spec.position_offset + L)
    inv = _rope_inv_freq_any64(d, rope_parameters)

    def norm(t, w):
        return t if no_norm else rms_norm64(t, gain_offset + w, c["rms_norm_eps"])

    def rotate(t):
        return rope64(t, positions, inv, interleaved=False)

    q = _linear64(x, p, "q_proj").reshape(L, H, d)
    k = _linear64(x, p, "k_proj").reshape(L, G, d)
    if norm_after_rope:
        q, k = norm(rotate(q), p["q_norm.weight"]), norm(rotate(k), p["k_norm.weight"])
    else:
        q, k = rotate(norm(q, p["q_norm.weight"])), rotate(norm(k, p["k_norm.weight"]))
    v = _linear64(x, p, "v_proj").reshape(L, G, d)
    sliding = c["layer_types"][HF_HOOKED_LAYER] == "sliding_attention"
    window = c["sliding_window"] + window_shift if sliding else None
    out = _linear64(windowed_attention64(q, k, v, scale, window), p, "o_proj")
    return _split_expected(out, spec.prefill_len)


def _qwen3_64(rec: Recording, spec: CaseSpec, **kw):
    c = rec.config
    kw.setdefault("gain_offset", 0.0)
    kw.setdefault("scale", c["head_dim"] ** -0.5)
    kw.setdefault("rope_parameters", c["rope_parameters"])
    return _qk_norm64(rec, spec, **kw)


def check_qwen3(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _qwen3_64(rec, spec)


def contrasts_qwen3(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    out = {"no_qk_norm": _contrast_error(rec, _qwen3_64(rec, spec, no_norm=True)),
           "qk_norm_after_rope": _contrast_error(rec, _qwen3_64(rec, spec, norm_after_rope=True)),
           "gain_1_plus_w": _contrast_error(rec, _qwen3_64(rec, spec, gain_offset=1.0))}
    if rec.config["layer_types"][HF_HOOKED_LAYER] == "sliding_attention":
        out["window_edge_q-k<=W"] = _contrast_error(rec, _qwen3_64(rec, spec, window_shift=1))
    return out


def describe_qwen3(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"{c['layer_types'][HF_HOOKED_LAYER]:<17} hidden={c['hidden_size']} d={c['head_dim']} "
            f"H={c['num_attention_heads']} G={c['num_key_value_heads']} W={c.get('sliding_window')} "
            f"theta={c['rope_parameters']['rope_theta']:g} bias={c['attention_bias']} offset={spec.position_offset}")


register_reference(
    "qwen3", layer_type="full_attention", record=record_qwen3, check=check_qwen3, describe=describe_qwen3,
    contrasts=contrasts_qwen3,
    summary="transformers Qwen3Attention (eager) in a tiny Qwen3Model: GQA, per-head QK RMSNorm (gain w) before RoPE")


def _gemma3_64(rec: Recording, spec: CaseSpec, *, other_layer_rope: bool = False, linear_scaling: bool = True, **kw):
    c = rec.config
    layer_type = c["layer_types"][HF_HOOKED_LAYER]
    if other_layer_rope:
        layer_type = "full_attention" if layer_type == "sliding_attention" else "sliding_attention"
    rp = dict(c["rope_parameters"][layer_type])
    if not linear_scaling:
        rp = {"rope_type": "default", "rope_theta": rp["rope_theta"]}
    kw.setdefault("gain_offset", 1.0)
    kw.setdefault("scale", float(c["query_pre_attn_scalar"]) ** -0.5)
    return _qk_norm64(rec, spec, rope_parameters=rp, **kw)


def check_gemma3(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _gemma3_64(rec, spec)


def contrasts_gemma3(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    c = rec.config
    out = {"gain_w_not_1_plus_w": _contrast_error(rec, _gemma3_64(rec, spec, gain_offset=0.0)),
           "scale_head_dim": _contrast_error(rec, _gemma3_64(rec, spec, scale=c["head_dim"] ** -0.5)),
           "other_layer_kind_rope": _contrast_error(rec, _gemma3_64(rec, spec, other_layer_rope=True))}
    if c["layer_types"][HF_HOOKED_LAYER] == "sliding_attention":
        out["window_edge_q-k<=W"] = _contrast_error(rec, _gemma3_64(rec, spec, window_shift=1))
    elif c["rope_parameters"]["full_attention"].get("rope_type") == "linear":
        out["no_linear_scaling"] = _contrast_error(rec, _gemma3_64(rec, spec, linear_scaling=False))
    return out


def describe_gemma3(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    lt = c["layer_types"][HF_HOOKED_LAYER]
    rp = c["rope_parameters"][lt]
    return (f"{lt:<17} hidden={c['hidden_size']} d={c['head_dim']} H={c['num_attention_heads']} "
            f"G={c['num_key_value_heads']} W={c['sliding_window']} query_pre_attn_scalar={c['query_pre_attn_scalar']} "
            f"rope={rp.get('rope_type')} theta={rp['rope_theta']:g} factor={rp.get('factor')} "
            f"offset={spec.position_offset}")


register_reference(
    "gemma3", layer_type="sliding_attention", record=record_gemma3, check=check_gemma3, describe=describe_gemma3,
    contrasts=contrasts_gemma3,
    summary="transformers Gemma3Attention (eager) in a tiny Gemma3TextModel: GQA, per-head QK RMSNorm (gain 1 + w), "
            "query_pre_attn_scalar, local/global RoPE, sliding window 0<=q-k<W")

# Gemma 3's two rotary settings (Gemma 3 technical report: local base 10,000; global base 1,000,000 with positional
# interpolation by 8), in transformers 5's per-layer-kind form.
_GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}
add_case(CaseSpec(
    name="qwen3_qk_norm_gqa", reference="qwen3", seed=15001, prefill_len=9, decode_steps=5,
    layer_type="full_attention",
    config={"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    description="transformers Qwen3Attention: GQA H = 8, G = 2, head_dim 16, q and k RMSNorm'd per head (gain w) "
                "before RoPE (theta 1e6, half-split); prefill 9, then 5 decode steps through DynamicCache."))
add_case(CaseSpec(
    name="qwen3_qk_norm_sliding_bias_offset", reference="qwen3", seed=15002, prefill_len=6, decode_steps=7,
    layer_type="sliding_attention", position_offset=50,
    config={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
            "attention_bias": True, "sliding_window": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    description="transformers Qwen3Attention, a sliding_attention layer (use_sliding_window, sliding_window 4): MQA "
                "H = 4, G = 1, head_dim 8, biases on q, k, v and o_proj, QK RMSNorm before RoPE; positions start at "
                "50; prefill 6, then 7 decode steps (T + N = 13 > W + 1)."))
add_case(CaseSpec(
    name="gemma3_sliding_w4_local_base", reference="gemma3", seed=15101, prefill_len=9, decode_steps=6,
    layer_type="sliding_attention",
    config={"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "query_pre_attn_scalar": 24, "sliding_window": 4, "rope_parameters": json.loads(json.dumps(_GEMMA3_ROPE))},
    description="transformers Gemma3Attention, a local (sliding_attention, window 4) layer of a model whose other "
                "layer is global: GQA H = 4, G = 2, head_dim 16, QK RMSNorm with gain 1 + w, scores scaled by "
                "query_pre_attn_scalar^-1/2 = 24^-1/2 (not 16^-1/2), RoPE base 10000 (the local base; the global "
                "layer's is 1e6 with linear factor 8); prefill 9, then 6 decode steps."))
add_case(CaseSpec(
    name="gemma3_global_linear8_offset", reference="gemma3", seed=15102, prefill_len=8, decode_steps=5,
    layer_type="full_attention", position_offset=100,
    config={"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "query_pre_attn_scalar": 24, "sliding_window": 4, "rope_parameters": json.loads(json.dumps(_GEMMA3_ROPE))},
    description="transformers Gemma3Attention, a global (full_attention) layer beside a local one: MQA H = 4, G = 1, "
                "head_dim 16, QK RMSNorm with gain 1 + w, query_pre_attn_scalar 24, RoPE base 1e6 with linear "
                "scaling 8 (as Gemma 3 ships its global layers; the local layer's base is 10000, its window 4); "
                "positions start at 100; prefill 8, then 5 decode steps."))


# ---- Reference "qwen3_next": transformers' Qwen3NextGatedDeltaNet ("linear_attention" layers) ---------
#
# A tiny Qwen3NextModel whose hooked layer is a Gated DeltaNet layer, recorded through the model's own cache
# (DynamicCache with the layer's convolution and recurrent states): a prefill of T tokens (the chunked rule,
# chunks of 64), then N single-token steps (the recurrent rule, the convolution updated from its state).
# Parameters: in_proj_qkvz.weight [2*Hk*dk + 2*Hv*dv, hidden] (per key head g: q_g, k_g, the r = Hv/Hk value
# heads' v, their z), in_proj_ba.weight [2*Hv, hidden] (per key head: b of its r value heads, then a),
# conv1d.weight [C, 1, K] (C = 2*Hk*dk + Hv*dv; depthwise over [q all heads | k | v], causal, no bias, then
# SiLU), dt_bias [Hv], A_log [Hv], norm.weight [dv], out_proj.weight [hidden, Hv*dv].
# q, k: x / sqrt(sum x^2 + 1e-6) per head, q also times dk^-0.5; value head h reads key head h // r;
# beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias); per step S <- exp(g) S, u = beta (v - S^T k),
# S <- S + k u^T, o = S^T q; then o / sqrt(mean o^2 + eps) * norm.weight * silu(z) per value head; out_proj.
# A linear case also saves the layer's cache after the prefill and after the last call (_linear_state_recorder):
# conv_state [1, C, K], the last K convolution inputs oldest first (the library keeps K - 1: the update never
# reads the oldest again), and recurrent_state [1, Hv, dk, dv], S above.

QWEN3_NEXT_DEFAULTS = {
    "vocab_size": 64,
    "intermediate_size": 32,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_experts": 2,
    "num_experts_per_tok": 1,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
}


def record_qwen3_next(spec: CaseSpec) -> Recording:
    from transformers import DynamicCache, Qwen3NextConfig, Qwen3NextModel
    kwargs = json.loads(json.dumps(QWEN3_NEXT_DEFAULTS))
    kwargs.update(spec.config)
    layer = kwargs.pop("hooked_layer")
    config = Qwen3NextConfig(**kwargs)
    if config.layer_types[layer] != spec.layer_type:
        raise AssertionError(f"{spec.name}: layer {layer} is {config.layer_types[layer]}, want {spec.layer_type}")
    torch.manual_seed(spec.seed)
    model = Qwen3NextModel._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    linear = spec.layer_type == "linear_attention"
    attn = model.layers[layer].linear_attn if linear else model.layers[layer].self_attn
    g = seeded_generator(spec.seed)
    params = _draw_params(attn, g, {"norm.weight": (1.0, HF_NORM_WEIGHT_STD),
                                    "q_norm.weight": (0.0, HF_NORM_WEIGHT_STD),  # zero-centred: gain 1 + weight
                                    "k_norm.weight": (0.0, HF_NORM_WEIGHT_STD),
                                    "dt_bias": (0.0, 0.5),
                                    "A_log": (-0.5, 0.5)})                       # rates exp(A_log) ~ 0.1 .. 3
    after_call, states = _linear_state_recorder(spec, layer) if linear else (None, {})
    pos, hidden_states, prefill, decode, cache = _record_through_cache(spec, model, attn, config, g,
                                                                       lambda: DynamicCache(config=config), after_call)
    meta = {"module": f"layers.{layer}.{'linear_attn' if linear else 'self_attn'}", "layer_idx": layer}
    if linear:
        meta["state_shape"] = list(cache.layers[layer].recurrent_states[0].shape)
    return Recording(config=json_safe(config.to_dict()), params=params, hidden_states=hidden_states,
                     position_ids=pos, prefill=prefill, decode=decode, extra=states, meta=meta)


def _qwen3_next_full64(rec: Recording, spec: CaseSpec, *, no_gate: bool = False, plain_gain: bool = False,
                       full_rotary: bool = False):
    c = rec.config
    H, G, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    rp = c["rope_parameters"]
    r = d if full_rotary else int(d * rp.get("partial_rotary_factor", 1.0))
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    qg = (x @ p["q_proj.weight"].T).reshape(L, H, 2 * d)
    q, gate = qg[..., :d], qg[..., d:].reshape(L, H * d)
    k = (x @ p["k_proj.weight"].T).reshape(L, G, d)
    v = (x @ p["v_proj.weight"].T).reshape(L, G, d)

    def norm(t, w):
        gain = w if plain_gain else 1.0 + w
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + c["rms_norm_eps"]) * gain

    positions = torch.arange(L)
    # The frequencies over the rotated channels only: theta^(-2i/r), i < r/2.
    inv = rope_inv_freq64(r, {key: value for key, value in rp.items() if key != "partial_rotary_factor"})

    def rotate(t):
        return torch.cat([rope64(t[..., :r], positions, inv, interleaved=False), t[..., r:]], dim=-1)

    q, k = rotate(norm(q, p["q_norm.weight"])), rotate(norm(k, p["k_norm.weight"]))
    y = causal_attention64(q, k, v, d ** -0.5)
    if not no_gate:
        y = y * torch.sigmoid(gate)
    return _split_expected(y @ p["o_proj.weight"].T, spec.prefill_len)


def _qwen3_next64(rec: Recording, spec: CaseSpec, *, no_conv: bool = False, head_modulo: bool = False,
                  no_l2norm: bool = False, **state_mistakes):
    c = rec.config
    Hk, Hv = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv, K = c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]
    r = Hv // Hk
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    qkvz = (x @ p["in_proj_qkvz.weight"].T).reshape(L, Hk, 2 * dk + 2 * r * dv)
    ba = (x @ p["in_proj_ba.weight"].T).reshape(L, Hk, 2 * r)
    q, k = qkvz[..., :dk].reshape(L, Hk * dk), qkvz[..., dk:2 * dk].reshape(L, Hk * dk)
    v = qkvz[..., 2 * dk:2 * dk + r * dv].reshape(L, Hv * dv)
    z = qkvz[..., 2 * dk + r * dv:].reshape(L, Hv, dv)
    b, a = ba[..., :r].reshape(L, Hv), ba[..., r:].reshape(L, Hv)
    mixed = torch.cat([q, k, v], dim=1)                                        # [L, C]
    if no_conv:
        conv = mixed * torch.sigmoid(mixed)
    else:
        w = p["conv1d.weight"][:, 0, :]                                        # [C, K]
        padded = torch.cat([torch.zeros(K - 1, mixed.shape[1], dtype=torch.float64), mixed])
        conv = sum(w[:, i] * padded[i:i + L] for i in range(K))
        conv = conv * torch.sigmoid(conv)
    q = conv[:, :Hk * dk].reshape(L, Hk, dk)
    k = conv[:, Hk * dk:2 * Hk * dk].reshape(L, Hk, dk)
    v = conv[:, 2 * Hk * dk:].reshape(L, Hv, dv)
    if not no_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * dk ** -0.5
    beta = torch.sigmoid(b)
    gate = -torch.exp(p["A_log"]) * F.softplus(a + p["dt_bias"])             # [L, Hv]
    out = torch.zeros(L, Hv, dv, dtype=torch.float64)
    states_at = {t: torch.zeros(Hv, dk, dv, dtype=torch.float64) for t in range(L + 1)}   # after t tokens
    for h in range(Hv):
        kh = h % Hk if head_modulo else h // r
        S = torch.zeros(dk, dv, dtype=torch.float64)
        for t in range(L):
            S = S * torch.exp(gate[t, h])
            u = beta[t, h] * (v[t, h] - S.T @ k[t, kh])
            S = S + torch.outer(k[t, kh], u)
            out[t, h] = S.T @ q[t, kh]
            states_at[t + 1][h] = S
    y = out / torch.sqrt((out * out).mean(-1, keepdim=True) + c["rms_norm_eps"]) * p["norm.weight"] * F.silu(z)
    return (_split_expected(y.reshape(L, Hv * dv) @ p["out_proj.weight"].T, spec.prefill_len)
            | _delta_states64(states_at, mixed, spec.prefill_len, L, K, **state_mistakes))


def check_qwen3_next(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _qwen3_next64(rec, spec) if spec.layer_type == "linear_attention" else _qwen3_next_full64(rec, spec)


def contrasts_qwen3_next(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    if spec.layer_type == "full_attention":
        return {"no_output_gate": _contrast_error(rec, _qwen3_next_full64(rec, spec, no_gate=True)),
                "gain_w_not_1_plus_w": _contrast_error(rec, _qwen3_next_full64(rec, spec, plain_gain=True)),
                "rotate_whole_head": _contrast_error(rec, _qwen3_next_full64(rec, spec, full_rotary=True))}
    out = {"no_conv": _contrast_error(rec, _qwen3_next64(rec, spec, no_conv=True)),
           "no_l2norm": _contrast_error(rec, _qwen3_next64(rec, spec, no_l2norm=True))}
    out |= _state_contrasts(rec, spec, lambda **mistake: _qwen3_next64(rec, spec, **mistake))
    c = rec.config
    if c["linear_num_value_heads"] > c["linear_num_key_heads"] > 1:
        out["value_head_h_mod_Hk"] = _contrast_error(rec, _qwen3_next64(rec, spec, head_modulo=True))
    return out


def describe_qwen3_next(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    if spec.layer_type == "full_attention":
        return (f"gated attention layer={rec.meta['layer_idx']}/{c['num_hidden_layers']} hidden={c['hidden_size']} "
                f"H={c['num_attention_heads']} G={c['num_key_value_heads']} d={c['head_dim']} "
                f"rotary={c['rope_parameters'].get('partial_rotary_factor', 1.0):g}")
    return (f"gated deltanet layer={rec.meta['layer_idx']}/{c['num_hidden_layers']} hidden={c['hidden_size']} "
            f"Hk={c['linear_num_key_heads']} Hv={c['linear_num_value_heads']} dk={c['linear_key_head_dim']} "
            f"dv={c['linear_value_head_dim']} conv={c['linear_conv_kernel_dim']} state={rec.meta['state_shape']}")


register_reference(
    "qwen3_next", layer_type="linear_attention", record=record_qwen3_next, check=check_qwen3_next,
    describe=describe_qwen3_next, contrasts=contrasts_qwen3_next,
    summary="transformers Qwen3NextGatedDeltaNet in a tiny Qwen3NextModel, through its DynamicCache")

add_case(CaseSpec(name="qwen3_next_gdn_hk2_hv4", reference="qwen3_next", seed=14001, prefill_len=70,
                  decode_steps=6, layer_type="linear_attention",
                  config={"hidden_size": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                          "linear_key_head_dim": 8, "linear_value_head_dim": 6, "linear_conv_kernel_dim": 4,
                          "hooked_layer": 1},
                  description="Qwen3-Next Gated DeltaNet, layer 1 of 4: 2 key heads of 8 shared by 4 value heads of "
                              "6, convolution width 4; a prefill of 70 (a chunk of 64 and 6 more), then 6 decode steps "
                              "through the cache's convolution and [1, 4, 8, 6] recurrent states."))
add_case(CaseSpec(name="qwen3_next_full_gated_gqa", reference="qwen3_next", seed=14003, prefill_len=9,
                  decode_steps=6, layer_type="full_attention",
                  config={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                          "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                          "linear_value_head_dim": 6, "hooked_layer": 3,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25}},
                  description="Qwen3-Next gated full attention, layer 3 of 4 (after three Gated DeltaNet layers): GQA "
                              "H = 4, G = 2, d = 16, q and k RMSNorm with gain 1 + w, RoPE on the first 4 channels "
                              "of each head (partial factor 0.25, half-split), sigmoid output gate; prefill 9, then 6 "
                              "decode steps."))
add_case(CaseSpec(name="qwen3_next_gdn_short_prefill", reference="qwen3_next", seed=14002, prefill_len=3,
                  decode_steps=5, layer_type="linear_attention",
                  config={"hidden_size": 24, "linear_num_key_heads": 1, "linear_num_value_heads": 2,
                          "linear_key_head_dim": 16, "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4,
                          "hooked_layer": 0},
                  description="Qwen3-Next Gated DeltaNet, layer 0: one key head of 16 shared by 2 value heads of 8; a "
                              "prefill of 3 (shorter than the convolution), then 5 decode steps."))


# ---- Reference "kimi_linear": transformers' KimiLinearDeltaAttention (Kimi Delta Attention layers) ------
#
# A tiny KimiLinearModel hooked at a KDA layer (`layers.<layer_idx>.self_attn`), recorded through its
# DynamicCache: chunked prefill of T tokens, then N recurrent steps. Parameters: q_proj, k_proj, v_proj [H*d,
# hidden]; conv1d.weight [3*H*d, 1, K] (depthwise over [q | k | v], causal, SiLU); forget_gate.f_a_proj [d,
# hidden], forget_gate.f_b_proj [H*d, d], forget_gate.dt_bias [H*d], forget_gate.A_log [1, 1, H, 1]; b_proj [H,
# hidden]; g_a_proj [d, hidden], g_b_proj [H*d, d]; o_norm.weight [d]; o_proj [hidden, H*d].
# Per-channel log-decay -exp(A_log[h]) softplus(f_b(f_a x) + dt_bias); beta = sigmoid(b_proj x); unit q and k,
# q times d^-0.5; the delta rule per head; o / sqrt(mean o^2 + eps) * o_norm.weight * sigmoid(g_b(g_a x)).

KIMI_LINEAR_DEFAULTS = {
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "intermediate_size": 32,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "kv_lora_rank": 8,
    "q_lora_rank": None,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "num_local_experts": 2,
    "num_experts_per_tok": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "layer_types": ["linear_attention", "linear_attention", "full_attention"],
    "mlp_layer_types": ["dense", "dense", "dense"],
}


def record_kimi_linear(spec: CaseSpec) -> Recording:
    from transformers import DynamicCache, KimiLinearConfig, KimiLinearModel
    kwargs = json.loads(json.dumps(KIMI_LINEAR_DEFAULTS))
    kwargs.update(spec.config)
    layer = kwargs.pop("hooked_layer")
    config = KimiLinearConfig(**kwargs)
    if config.layer_types[layer] != "linear_attention":
        raise AssertionError(f"{spec.name}: layer {layer} is {config.layer_types[layer]}")
    torch.manual_seed(spec.seed)
    model = KimiLinearModel._from_config(config, dtype=torch.float32).eval()
    attn = model.layers[layer].self_attn
    g = seeded_generator(spec.seed)
    params = _draw_params(attn, g, {"o_norm.weight": (1.0, HF_NORM_WEIGHT_STD),
                                    "forget_gate.dt_bias": (0.0, 0.5),
                                    "forget_gate.A_log": (-1.0, 0.5)})
    after_call, states = _linear_state_recorder(spec, layer)
    pos, hidden_states, prefill, decode, cache = _record_through_cache(spec, model, attn, config, g,
                                                                       lambda: DynamicCache(config=config), after_call)
    return Recording(config=json_safe(config.to_dict()), params=params, hidden_states=hidden_states,
                     position_ids=pos, prefill=prefill, decode=decode, extra=states,
                     meta={"module": f"layers.{layer}.self_attn", "layer_idx": layer,
                           "state_shape": list(cache.layers[layer].recurrent_states[0].shape)})


def _kimi_linear64(rec: Recording, spec: CaseSpec, *, per_head_decay: bool = False, silu_gate: bool = False,
                   no_conv: bool = False, **state_mistakes):
    c = rec.config
    H, d, K = c["linear_num_heads"], c["linear_head_dim"], c["linear_conv_kernel_dim"]
    L = spec.prefill_len + spec.decode_steps
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    mixed = torch.cat([x @ p["q_proj.weight"].T, x @ p["k_proj.weight"].T, x @ p["v_proj.weight"].T], dim=1)
    if no_conv:
        conv = mixed
    else:
        w = p["conv1d.weight"][:, 0, :]
        padded = torch.cat([torch.zeros(K - 1, mixed.shape[1], dtype=torch.float64), mixed])
        conv = sum(w[:, i] * padded[i:i + L] for i in range(K))
    conv = conv * torch.sigmoid(conv)
    q, k, v = (conv[:, i * H * d:(i + 1) * H * d].reshape(L, H, d) for i in range(3))
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * d ** -0.5
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    pre = (x @ p["forget_gate.f_a_proj.weight"].T @ p["forget_gate.f_b_proj.weight"].T + p["forget_gate.dt_bias"])
    rate = torch.exp(p["forget_gate.A_log"].reshape(H))
    gate = -rate[None, :, None] * F.softplus(pre.reshape(L, H, d))          # [L, H, d] log-decays
    if per_head_decay:
        gate = gate.mean(-1, keepdim=True).expand(L, H, d)
    beta = torch.sigmoid(x @ p["b_proj.weight"].T)
    out = torch.zeros(L, H, d, dtype=torch.float64)
    states_at = {t: torch.zeros(H, d, d, dtype=torch.float64) for t in range(L + 1)}       # after t tokens
    for h in range(H):
        S = torch.zeros(d, d, dtype=torch.float64)
        for t in range(L):
            S = torch.exp(gate[t, h])[:, None] * S
            u = beta[t, h] * (v[t, h] - S.T @ k[t, h])
            S = S + torch.outer(k[t, h], u)
            out[t, h] = S.T @ q[t, h]
            states_at[t + 1][h] = S
    og = (x @ p["g_a_proj.weight"].T @ p["g_b_proj.weight"].T).reshape(L, H, d)
    act = F.silu(og) if silu_gate else torch.sigmoid(og)
    y = out / torch.sqrt((out * out).mean(-1, keepdim=True) + c["rms_norm_eps"]) * p["o_norm.weight"] * act
    return (_split_expected(y.reshape(L, H * d) @ p["o_proj.weight"].T, spec.prefill_len)
            | _delta_states64(states_at, mixed, spec.prefill_len, L, K, **state_mistakes))


def check_kimi_linear(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _kimi_linear64(rec, spec)


def contrasts_kimi_linear(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    return {"decay_per_head": _contrast_error(rec, _kimi_linear64(rec, spec, per_head_decay=True)),
            "silu_output_gate": _contrast_error(rec, _kimi_linear64(rec, spec, silu_gate=True)),
            "no_conv": _contrast_error(rec, _kimi_linear64(rec, spec, no_conv=True))} | _state_contrasts(
                rec, spec, lambda **mistake: _kimi_linear64(rec, spec, **mistake))


def describe_kimi_linear(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    return (f"KDA layer={rec.meta['layer_idx']}/{c['num_hidden_layers']} hidden={c['hidden_size']} "
            f"H={c['linear_num_heads']} d={c['linear_head_dim']} conv={c['linear_conv_kernel_dim']} "
            f"state={rec.meta['state_shape']}")


register_reference(
    "kimi_linear", layer_type="linear_attention", record=record_kimi_linear, check=check_kimi_linear,
    describe=describe_kimi_linear, contrasts=contrasts_kimi_linear,
    summary="transformers KimiLinearDeltaAttention in a tiny KimiLinearModel, through its DynamicCache")

add_case(CaseSpec(name="kimi_linear_kda_h2", reference="kimi_linear", seed=14101, prefill_len=67, decode_steps=6,
                  layer_type="linear_attention",
                  config={"hidden_size": 32, "linear_attn_config": {"num_heads": 2, "head_dim": 8,
                                                                    "short_conv_kernel_size": 4},
                          "hooked_layer": 1},
                  description="Kimi Delta Attention, layer 1 of 3: H = 2 heads of d = 8, a decay per key channel, "
                              "convolution width 4; a prefill of 67 (a chunk of 64 and 3 more), then 6 decode steps "
                              "through the cache's convolution and [1, 2, 8, 8] recurrent states."))


# ---- Reference "gemma3n": transformers' Gemma3nTextAttention, cross-layer KV sharing ------------------
#
# A tiny Gemma3nTextModel whose last `num_kv_shared_layers` layers keep no cache: each reads the keys and values
# of the last earlier layer of its own type (sliding or full), which the model hands it per call in
# `shared_kv_states` (the owner stores the full-length keys and values of the call there, because a sliding
# cache past its window no longer holds a long prompt's early keys). The hooked module of a reader has only
# q_proj, q_norm and o_proj; the pre-hook records the shared keys and values it is given at every call, and the
# case stores them once per token as `input.shared_keys` and `input.shared_values` [1, G, T+N, d] (after the
# owner's k_norm, v_norm and RoPE), checking that each call's hand-off is exactly the rows the ring of a sliding
# owner (the last W - 1 tokens before the call, then the call's own) or the whole cache of a full owner holds.
# An owner's case records the layer that computes them: k_proj, v_proj, k_norm (with gain), v_norm (no gain).
# Gemma 3n's attention: an RMSNorm with gain on every query and key head, one without gain on every value head,
# half-split RoPE with rope_parameters[layer_type].rope_theta, softmax scale 1 (no 1/sqrt(d)), and the window
# 0 <= q - k < sliding_window on sliding layers.

GEMMA3N_DEFAULTS = {
    "vocab_size": 64,
    "vocab_size_per_layer_input": 64,
    "hidden_size_per_layer_input": 8,
    "intermediate_size": 64,
    "laurel_rank": 4,
    "altup_num_inputs": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                    "full_attention"],
    "num_hidden_layers": 5,
    "num_kv_shared_layers": 2,
}


def record_gemma3n(spec: CaseSpec) -> Recording:
    from transformers import DynamicCache, Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextModel
    kwargs = json.loads(json.dumps(GEMMA3N_DEFAULTS))
    kwargs.update(spec.config)
    layer = kwargs.pop("hooked_layer")
    config = Gemma3nTextConfig(**kwargs)
    if config.layer_types[layer] != spec.layer_type:
        raise AssertionError(f"{spec.name}: layer {layer} is {config.layer_types[layer]}, not {spec.layer_type}")
    torch.manual_seed(spec.seed)
    model = Gemma3nTextModel._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    attn = model.layers[layer].self_attn
    owner = attn.kv_shared_layer_index if attn.is_kv_shared_layer else None
    g = seeded_generator(spec.seed)
    params = _hf_init_params(attn, g)
    handed: list[tuple[Any, Any]] = []

    def kv_hook(module, args, kwargs_):
        if owner is not None:
            k, v = kwargs_["shared_kv_states"][owner]
            handed.append((k.detach().clone(), v.detach().clone()))
        return None

    handle = attn.register_forward_pre_hook(kv_hook, with_kwargs=True)
    try:
        pos, hidden_states, prefill, decode, cache = _record_through_cache(spec, model, attn, config, g,
                                                                           lambda: DynamicCache(config=config))
    finally:
        handle.remove()
    T, N = spec.prefill_len, spec.decode_steps
    extra, meta = {}, {"module": f"layers.{layer}.self_attn", "layer_index": layer}
    if len(cache.layers) != config.num_hidden_layers - config.num_kv_shared_layers:
        raise AssertionError(f"{spec.name}: the cache has {len(cache.layers)} layers")
    if owner is not None:
        keys = torch.cat([handed[0][0]] + [k[:, :, -1:, :] for k, _ in handed[1:]], dim=2).contiguous()
        values = torch.cat([handed[0][1]] + [v[:, :, -1:, :] for _, v in handed[1:]], dim=2).contiguous()
        W = config.sliding_window if config.layer_types[layer] == "sliding_attention" else None
        for i, (k, v) in enumerate(handed):
            stop = T + i                                  # call 0 is the prefill, call i >= 1 the token T + i - 1
            start = 0 if i == 0 or W is None else max(0, stop - W)
            if not (torch.equal(k, keys[:, :, start:stop, :]) and torch.equal(v, values[:, :, start:stop, :])):
                raise AssertionError(f"{spec.name}: call {i} was handed {tuple(k.shape)} keys, not tokens "
                                     f"{start}..{stop - 1}")
        extra = {"input.shared_keys": keys, "input.shared_values": values}
        meta.update({"kv_shared_layer_index": owner,
                     "handed_lengths": [int(k.shape[2]) for k, _ in handed]})
    return Recording(config=json_safe(config.to_dict()), params=params, hidden_states=hidden_states,
                     position_ids=pos, prefill=prefill, decode=decode, extra=extra, meta=meta)


def _gemma3n64(rec: Recording, spec: CaseSpec, *, scale: float | None = None, window_shift: int = 0,
               no_window: bool = False, other_base: bool = False, value_gain_free: bool = True):
    c = rec.config
    layer = rec.meta["layer_index"]
    kind = c["layer_types"][layer]
    H, G, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    L = spec.prefill_len + spec.decode_steps
    eps = c["rms_norm_eps"]
    p = {k: v.to(torch.float64) for k, v in rec.params.items()}
    x = rec.hidden_states.to(torch.float64)[0]
    positions = torch.arange(L)
    rope_kind = ("full_attention" if kind == "sliding_attention" else "sliding_attention") if other_base else kind
    inv = rope_inv_freq64(d, c["rope_parameters"][rope_kind])
    q = rms_norm64(_linear64(x, p, "q_proj").reshape(L, H, d), p["q_norm.weight"], eps)
    q = rope64(q, positions, inv, interleaved=False)
    if "k_proj.weight" in p:
        k = rms_norm64(_linear64(x, p, "k_proj").reshape(L, G, d), p["k_norm.weight"], eps)
        k = rope64(k, positions, inv, interleaved=False)
        v = _linear64(x, p, "v_proj").reshape(L, G, d)
        if value_gain_free:
            v = rms_norm64(v, 1.0, eps)
    else:
        k = rec.extra["input.shared_keys"].to(torch.float64)[0].transpose(0, 1)      # [L, G, d]
        v = rec.extra["input.shared_values"].to(torch.float64)[0].transpose(0, 1)
    window = None if (no_window or kind == "full_attention") else c["sliding_window"] + window_shift
    out = windowed_attention64(q, k, v, 1.0 if scale is None else scale, window)
    return _split_expected(_linear64(out, p, "o_proj"), spec.prefill_len)


def check_gemma3n(rec: Recording, spec: CaseSpec) -> dict[str, Any]:
    return _gemma3n64(rec, spec)


def contrasts_gemma3n(rec: Recording, spec: CaseSpec) -> dict[str, float]:
    d = rec.config["head_dim"]
    out = {"scale_1/sqrt(d)": _contrast_error(rec, _gemma3n64(rec, spec, scale=d ** -0.5)),
           "rope_base_of_other_kind": _contrast_error(rec, _gemma3n64(rec, spec, other_base=True))}
    if rec.config["layer_types"][rec.meta["layer_index"]] == "sliding_attention":
        out["no_window"] = _contrast_error(rec, _gemma3n64(rec, spec, no_window=True))
        out["window_edge_q-k<=W"] = _contrast_error(rec, _gemma3n64(rec, spec, window_shift=1))
    if "k_proj.weight" in rec.params:
        out["no_value_norm"] = _contrast_error(rec, _gemma3n64(rec, spec, value_gain_free=False))
    return out


def describe_gemma3n(rec: Recording, spec: CaseSpec) -> str:
    c = rec.config
    layer = rec.meta["layer_index"]
    role = (f"reads layer {rec.meta['kv_shared_layer_index']} (handed {rec.meta['handed_lengths']})"
            if "kv_shared_layer_index" in rec.meta else "keeps its cache")
    return (f"layer={layer}/{c['num_hidden_layers']} shared={c['num_kv_shared_layers']} H={c['num_attention_heads']} "
            f"G={c['num_key_value_heads']} d={c['head_dim']} W={c['sliding_window']} {role}")


register_reference(
    "gemma3n", layer_type="sliding_attention", record=record_gemma3n, check=check_gemma3n,
    describe=describe_gemma3n, contrasts=contrasts_gemma3n,
    summary="transformers Gemma3nTextAttention in a tiny Gemma3nTextModel: a layer that reads an earlier layer's "
            "keys and values (shared_kv_states), or one that keeps its own")

GEMMA3N_SIZES = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                 "sliding_window": 4}

add_case(CaseSpec(name="gemma3n_shared_sliding_w4", reference="gemma3n", seed=15101, prefill_len=7, decode_steps=6,
                  layer_type="sliding_attention", config={**GEMMA3N_SIZES, "hooked_layer": 3},
                  description="Gemma 3n layer 3 of 5 (sliding, window 4) keeps no cache: it reads layer 1's keys and "
                              "values, handed to it per call (the whole prefill of 7, then the owner's ring of 3 "
                              "plus the new token). H = 4, G = 2, d = 8; the prefill and decode run past the window."))
add_case(CaseSpec(name="gemma3n_shared_full", reference="gemma3n", seed=15102, prefill_len=5, decode_steps=5,
                  layer_type="full_attention", config={**GEMMA3N_SIZES, "hooked_layer": 4},
                  description="Gemma 3n layer 4 of 5 (full) keeps no cache: it reads layer 2's keys and values, the "
                              "whole context at every call. H = 4, G = 2, d = 8, RoPE base of the full layers."))
add_case(CaseSpec(name="gemma3n_owner_sliding_w4", reference="gemma3n", seed=15103, prefill_len=6, decode_steps=5,
                  layer_type="sliding_attention", config={**GEMMA3N_SIZES, "hooked_layer": 1},
                  description="Gemma 3n layer 1 of 5 (sliding, window 4), the layer whose cache layer 3 reads: "
                              "q, k and v projections, q/k RMSNorm with gain, v RMSNorm without, scale 1."))


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

#!/usr/bin/env python3
"""Prefill and append benchmark: the project's causal varlen kernel (kernels/prefill_mma.cu) and the peers, on
every shape of SHAPES (below), in one process and one GPU run, with the timer of bench_decode.py.

Every implementation reads the same bf16 tensors: the packed varlen layout q [total_q, q_heads, d], k and v
[total_k, kv_heads, d] for the project and FlashInfer's ragged prefill; the padded [batch, heads, len, d] views
of the same values for PyTorch's SDPA (FlashAttention 2, cuDNN and memory-efficient backends, the causal mask
aligned to the bottom right so that an append's queries see the whole cache) and FlexAttention (compiled, the same
mask as a block mask). FlashAttention 3 has no wheel on PyPI: it is timed where it is installed (its row says "failed" otherwise).

  * correct first: output poisoned with NaN, relative Frobenius error against float32 PyTorch on upcast
    inputs; NaN fails; bf16 must land under 1e-2;
  * then timed: CUDA events, a GPU sleep before each start event, warm-up, median and p95;
  * TFLOP/s counts the causal products only (4 x d FLOPs per visible query-key pair and head,
    af::varlen_attention_causal_flops).

  python3 kernels/bench/bench_prefill.py --lib build/lib/libaf_kernels_capi.so --out prefill.csv --commit SHA
"""
import argparse
import ctypes
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import provenance, rel_error, time_calls, write_rows  # noqa: E402

SHAPES = [  # name, batch, new queries, keys (cache after the append), q heads, kv heads, head dim
    ("llama3-8b-prefill-4k", 1, 4096, 4096, 32, 8, 128),
    ("llama3-8b-prefill-b8-1k", 8, 1024, 1024, 32, 8, 128),
    ("llama3-8b-append-128", 16, 128, 4224, 32, 8, 128),
    ("qwen3-30b-a3b-prefill-4k", 1, 4096, 4096, 32, 4, 128),
    ("qwen3-235b-a22b-prefill-4k", 1, 4096, 4096, 64, 4, 128),
    ("qwen3-235b-a22b-append-128", 16, 128, 4224, 64, 4, 128),
]


COLUMNS = ["shape", "batch", "query_len", "key_len", "q_heads", "kv_heads", "head_dim", "causal_flops", "impl",
           "source", "ms_median", "ms_p95", "tflops", "rel_err", "iters", "status"]


def causal_flops(b, lq, lk, hq, d):
    pairs = lq * (lk - lq) + lq * (lq + 1) / 2
    return b * pairs * hq * 4.0 * d


def reference(q, k, v, b, lq, lk):
    """Float32 causal attention per sequence (bottom-right aligned), a few heads at a time."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    heads = max(1, int(1e9 // (lq * lk * 4)))
    for s in range(b):
        qs, ks, vs = q[s * lq:(s + 1) * lq].float(), k[s * lk:(s + 1) * lk].float(), v[s * lk:(s + 1) * lk].float()
        for h0 in range(0, hq, heads):
            hs = range(h0, min(hq, h0 + heads))
            kh = torch.stack([ks[:, h // g] for h in hs], 0)
            vh = torch.stack([vs[:, h // g] for h in hs], 0)
            scores = torch.einsum("qhd,hkd->hqk", qs[:, h0:h0 + len(hs)], kh) / math.sqrt(d)
            p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            out[s * lq:(s + 1) * lq, h0:h0 + len(hs)] = torch.einsum("hqk,hkd->qhd", p, vh)
    return out


def project_runner(lib_path, b, lq, lk, hq, hkv, d, cu_q, cu_k):
    lib = ctypes.CDLL(lib_path)
    ll, p, f, i = ctypes.c_longlong, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.af_prefill_run.argtypes = [ll, ll, ll, ll, ll, p, p, p, p, p, p, f, p, ctypes.c_char_p, i]
    err = ctypes.create_string_buffer(1024)
    scale = 1.0 / math.sqrt(d)

    def run(q, k, v, out):
        stream = torch.cuda.current_stream().cuda_stream
        if lib.af_prefill_run(b, hq, hkv, d, lq, q.data_ptr(), k.data_ptr(), v.data_ptr(), cu_q.data_ptr(),
                              cu_k.data_ptr(), out.data_ptr(), scale, stream, err, 1024):
            raise RuntimeError(err.value.decode())
        return out
    return run


def sdpa_runner(backend, b, lq, lk, hq, hkv, d):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(lq, lk)

    def run(q, k, v, out):
        qp = q.view(b, lq, hq, d).transpose(1, 2)
        kp = k.view(b, lk, hkv, d).transpose(1, 2)
        vp = v.view(b, lk, hkv, d).transpose(1, 2)
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, enable_gqa=True)
        if out is not None:
            out.copy_(o.transpose(1, 2).reshape(b * lq, hq, d))
        return o
    return run


def flex_runner(b, lq, lk, hq, hkv, d):
    """FlexAttention (torch.compile'd), the causal mask aligned to the bottom right as a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = lk - lq

    def causal(batch, head, qi, ki):
        return ki <= qi + offset

    mask = create_block_mask(causal, B=None, H=None, Q_LEN=lq, KV_LEN=lk, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, out):
        qp = q.view(b, lq, hq, d).transpose(1, 2)
        kp = k.view(b, lk, hkv, d).transpose(1, 2)
        vp = v.view(b, lk, hkv, d).transpose(1, 2)
        o = compiled(qp, kp, vp, block_mask=mask, enable_gqa=True)
        if out is not None:
            out.copy_(o.transpose(1, 2).reshape(b * lq, hq, d))
        return o
    return run


def fa3_runner(lq, lk, cu_q, cu_k):
    """FlashAttention 3's varlen entry (module flash_attn_interface, built from its repository's hopper/ folder);
    its causal mask is aligned to the bottom right, as the project's."""
    import flash_attn_interface

    def run(q, k, v, out):
        o = flash_attn_interface.flash_attn_varlen_func(q, k, v, cu_q, cu_k, lq, lk, causal=True)
        o = o[0] if isinstance(o, tuple) else o
        if out is not None:
            out.copy_(o)
        return o
    return run


def flashinfer_runner(b, lq, lk, hq, hkv, d, cu_q, cu_k):
    import flashinfer
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    w.plan(cu_q, cu_k, hq, hkv, d, causal=True, q_data_type=torch.bfloat16)

    def run(q, k, v, out):
        o = w.run(q, k, v)
        if out is not None:
            out.copy_(o)
        return o
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="build/lib/libaf_kernels_capi.so")
    ap.add_argument("--out", default="prefill.csv")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--shapes", default="all", help="comma-separated names from SHAPES, or all")
    ap.add_argument("--flashinfer", action="store_true", help="also time FlashInfer's ragged prefill")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend

    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    rows = []
    for name, b, lq, lk, hq, hkv, d in shapes:
        gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)))
        mk = lambda *size: torch.randn(*size, generator=gen, device="cuda").to(torch.bfloat16)  # noqa: E731
        q, k, v = mk(b * lq, hq, d), mk(b * lk, hkv, d), mk(b * lk, hkv, d)
        cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device="cuda")
        cu_k = torch.arange(0, (b + 1) * lk, lk, dtype=torch.int32, device="cuda")
        ref = reference(q, k, v, b, lq, lk)
        out = torch.empty_like(q)
        flops = causal_flops(b, lq, lk, hq, d)
        impls = [("project_prefill_mma", "project", lambda: project_runner(args.lib, b, lq, lk, hq, hkv, d, cu_q, cu_k))]
        impls += [(f"sdpa_{n}", "peer", lambda be=be: sdpa_runner(be, b, lq, lk, hq, hkv, d))
                  for n, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]]
        impls.append(("flex_compiled", "peer", lambda: flex_runner(b, lq, lk, hq, hkv, d)))
        impls.append(("flash_attn_3", "peer", lambda: fa3_runner(lq, lk, cu_q, cu_k)))  # "failed" if absent
        if args.flashinfer:
            impls.append(("flashinfer_prefill", "peer", lambda: flashinfer_runner(b, lq, lk, hq, hkv, d, cu_q, cu_k)))
        for impl, source, make in impls:
            row = dict(shape=name, batch=b, query_len=lq, key_len=lk, q_heads=hq, kv_heads=hkv, head_dim=d,
                       impl=impl, source=source, causal_flops=int(flops))
            try:
                run = make()
                out.fill_(float("nan"))
                run(q, k, v, out)
                torch.cuda.synchronize()
                err = rel_error(out, ref)
                row["rel_err"] = err
                row["status"] = "ok" if err < 1e-2 else "WRONG"
                target = out if source == "project" else None
                med, p95 = time_calls(lambda i: run(q, k, v, target), warmup=5, iters=30)
                row.update(ms_median=med, ms_p95=p95, tflops=flops / med / 1e9, iters=30)
            except Exception as e:
                row["status"] = "failed: " + (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            rows.append(row)
            print(f"  {name:28s} {impl:22s} {row.get('status', ''):8.8s} err {row.get('rel_err', float('nan')):.2e} "
                  f"median {row.get('ms_median', float('nan')):8.3f} ms  p95 {row.get('ms_p95', float('nan')):8.3f}  "
                  f"{row.get('tflops', 0):6.1f} TFLOP/s", flush=True)
        del q, k, v, ref, out
        torch.cuda.empty_cache()
    header = provenance(args.commit, __file__)
    header["method"] = ("CUDA events, GPU sleep before each start event, warm-up 5, median and p95 of 30; TFLOP/s = "
                        "causal FLOPs (4 d per visible pair and head) / median; rel_err = ||out - ref|| / ||ref|| "
                        "against float32 on upcast inputs")
    write_rows(args.out, rows, header, COLUMNS)


if __name__ == "__main__":
    main()

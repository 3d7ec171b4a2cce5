#!/usr/bin/env python3
"""Paged decode benchmark: the project's paged kernel over bf16 and FP8 E4M3 pools (kernels/decode_paged.cu)
and FlashInfer's paged decode (bf16 and FP8, page size 16, so that its split-KV engages), on every shape of
SHAPES, in one process and one GPU run, with the timer of bench_decode.py.

The project and FlashInfer's bf16 paths read the same tensors: pools [num_pages, kv_heads, page_size, d] ("HND"),
one shuffled block table, ragged lengths. The FP8 formats differ, so each FP8 path reads its own codes of the
same bf16 values: the project's chapter 05 format (one float32 scale per token and KV head, 4 more bytes per
row) and FlashInfer's (one scale per tensor, passed to run()). Each is checked against float32 attention over
the values its own codes hold.

  * correct first: output poisoned with NaN, relative Frobenius error against float32 PyTorch; NaN fails;
    under 1e-2 passes;
  * then timed: CUDA events, a GPU sleep before each start event, warm-up, median and p95;
  * GB/s counts the pools' bytes the lengths reach (codes and scales), af::paged_decode_kv_bytes.

  python3 kernels/bench/bench_paged.py --lib build/lib/libaf_kernels_capi.so --out paged.csv --commit SHA
"""
import argparse
import ctypes
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import provenance, rel_error, time_calls, write_rows  # noqa: E402

PAGE = 16
SHAPES = [  # name, lengths (one per sequence), q heads, kv heads, head dim
    ("llama3-8b-b1-32k", [32768], 32, 8, 128),
    ("llama3-8b-b32-ragged", None, 32, 8, 128),  # 32 lengths uniform in 1..4096 (fixed seed)
    ("llama3-8b-b256-4k", [4096] * 256, 32, 8, 128),
    ("qwen3-30b-a3b-b64-4k", [4096] * 64, 32, 4, 128),
    ("qwen3-235b-a22b-b64-4k", [4096] * 64, 64, 4, 128),
]
COLUMNS = ["shape", "batch", "tokens", "q_heads", "kv_heads", "head_dim", "page_size", "format", "impl", "source",
           "kv_bytes", "splits", "ms_median", "ms_p95", "gbps", "rel_err", "iters", "status"]


def quantize_rows(pool):
    """Chapter 05's fp8_token: per pool row (token, KV head) scale = amax / 448, codes E4M3 (saturating)."""
    x = pool.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    codes = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scale.squeeze(-1).contiguous()


def gather(pool, table, lengths, b):
    """Sequence b's keys or values [kv_heads, length, d] in float32, through the block table."""
    n = int(lengths[b])
    pages = table[b, :(n + PAGE - 1) // PAGE].long()
    return pool[pages].float().permute(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])[:, :n]


def reference(q, k, v, table, lengths):
    hq, d = q.shape[1], q.shape[2]
    g = hq // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        kb = gather(k, table, lengths, b).repeat_interleave(g, 0)
        vb = gather(v, table, lengths, b).repeat_interleave(g, 0)
        p = (torch.einsum("hd,hkd->hk", q[b].float(), kb) / math.sqrt(d)).softmax(-1)
        out[b] = torch.einsum("hk,hkd->hd", p, vb)
    return out


def project_runner(lib, fp8, shape, sm_count, q, k, ks, v, vs, table, lengths):
    b, hq, hkv, d, pages_per_seq, num_pages = shape
    p, ll, i, f = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
    lib.af_paged_decode.argtypes = [i, ll, ll, ll, ll, ll, ll, ll, i, i, p, p, p, p, p, p, p, p, f, p, ll, p,
                                    ctypes.POINTER(i), ctypes.POINTER(ll), ctypes.c_char_p, i]
    err = ctypes.create_string_buffer(1024)
    splits, ws_bytes = i(0), ll(0)
    scale = 1.0 / math.sqrt(d)
    ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731

    def call(out, workspace, stream):
        if lib.af_paged_decode(fp8, b, hq, hkv, d, PAGE, pages_per_seq, num_pages, sm_count, 0, ptr(q), ptr(k),
                               ptr(ks), ptr(v), ptr(vs), ptr(table), ptr(lengths), ptr(out), scale, workspace,
                               ws_bytes.value, stream, ctypes.byref(splits), ctypes.byref(ws_bytes), err, 1024):
            raise RuntimeError(err.value.decode())

    call(None, None, None)  # plan only
    workspace = torch.empty(max(1, ws_bytes.value), dtype=torch.uint8, device="cuda")

    def run(out):
        call(out, workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
        return out
    return run, splits.value


def flashinfer_runner(fp8, hq, hkv, d, table, lengths, k, v, k_scale=None, v_scale=None):
    import flashinfer
    b = table.shape[0]
    used = (lengths + PAGE - 1) // PAGE
    indptr = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    indptr[1:] = torch.cumsum(used, 0)
    indices = torch.cat([table[s, :int(used[s])] for s in range(b)]).int()
    last = (lengths - 1) % PAGE + 1
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "HND")
    w.plan(indptr, indices, last.int(), hq, hkv, d, PAGE, q_data_type=torch.bfloat16,
           kv_data_type=torch.float8_e4m3fn if fp8 else torch.bfloat16)

    def run(q, out):
        o = w.run(q, (k, v), k_scale=k_scale, v_scale=v_scale) if fp8 else w.run(q, (k, v))
        if out is not None:
            out.copy_(o)
        return o
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="build/lib/libaf_kernels_capi.so")
    ap.add_argument("--out", default="paged.csv")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--shapes", default="all", help="comma-separated names from SHAPES, or all")
    ap.add_argument("--flashinfer", action="store_true", help="also time FlashInfer's paged decode")
    args = ap.parse_args()
    lib = ctypes.CDLL(args.lib)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    rows = []
    for name, lens, hq, hkv, d in shapes:
        gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)))
        if lens is None:
            lens = torch.randint(1, 4097, (32,), generator=torch.Generator().manual_seed(7)).tolist()
        b = len(lens)
        pages_per_seq = (max(lens) + PAGE - 1) // PAGE
        num_pages = b * pages_per_seq
        lengths = torch.tensor(lens, dtype=torch.int32, device="cuda")
        table = torch.randperm(num_pages, generator=gen, device="cuda").int().view(b, pages_per_seq).contiguous()
        mk = lambda *size: torch.randn(*size, generator=gen, device="cuda").to(torch.bfloat16)  # noqa: E731
        q, k, v = mk(b, hq, d), mk(num_pages, hkv, PAGE, d), mk(num_pages, hkv, PAGE, d)
        k8, ks = quantize_rows(k)
        v8, vs = quantize_rows(v)
        shape = (b, hq, hkv, d, pages_per_seq, num_pages)
        tokens = sum(lens)
        bytes_of = {"bf16": tokens * hkv * 2 * d * 2, "fp8_row": tokens * hkv * 2 * (d + 4),
                    "fp8_tensor": tokens * hkv * 2 * d}
        refs = {"bf16": reference(q, k, v, table, lengths),
                "fp8_row": reference(q, k8.float() * ks[..., None], v8.float() * vs[..., None], table, lengths)}
        impls = [("project_paged", "project", "bf16",
                  lambda: project_runner(lib, 0, shape, sm_count, q, k, None, v, None, table, lengths)),
                 ("project_paged_fp8", "project", "fp8_row",
                  lambda: project_runner(lib, 1, shape, sm_count, q, k8, ks, v8, vs, table, lengths))]
        if args.flashinfer:
            kt, vt = k.float().abs().amax() / 448.0, v.float().abs().amax() / 448.0
            k8t, v8t = (k.float() / kt).to(torch.float8_e4m3fn), (v.float() / vt).to(torch.float8_e4m3fn)
            refs["fp8_tensor"] = reference(q, k8t.float() * kt, v8t.float() * vt, table, lengths)
            impls += [("flashinfer_paged", "peer", "bf16",
                       lambda: (flashinfer_runner(False, hq, hkv, d, table, lengths, k, v), 0)),
                      ("flashinfer_paged_fp8", "peer", "fp8_tensor",
                       lambda: (flashinfer_runner(True, hq, hkv, d, table, lengths, k8t, v8t, float(kt),
                                                  float(vt)), 0))]
        out = torch.empty_like(q)
        for impl, source, fmt, make in impls:
            row = dict(shape=name, batch=b, tokens=tokens, q_heads=hq, kv_heads=hkv, head_dim=d, page_size=PAGE,
                       format=fmt, impl=impl, source=source, kv_bytes=bytes_of[fmt])
            try:
                runner, splits = make()
                row["splits"] = splits
                call = (lambda o: runner(o)) if source == "project" else (lambda o: runner(q, o))
                out.fill_(float("nan"))
                call(out)
                torch.cuda.synchronize()
                err = rel_error(out, refs[fmt])
                row.update(rel_err=err, status="ok" if err < 1e-2 else "WRONG")
                target = out if source == "project" else None
                med, p95 = time_calls(lambda i: call(target), warmup=10, iters=50)
                row.update(ms_median=med, ms_p95=p95, gbps=bytes_of[fmt] / med / 1e6, iters=50)
            except Exception as e:
                row["status"] = "failed: " + (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            rows.append(row)
            print(f"  {name:26s} {impl:22s} {row.get('status', ''):8.8s} err {row.get('rel_err', float('nan')):.2e} "
                  f"median {row.get('ms_median', float('nan')):8.4f} ms  p95 {row.get('ms_p95', float('nan')):8.4f}"
                  f"  {row.get('gbps', 0):7.0f} GB/s", flush=True)
        del q, k, v, k8, v8, out, refs
        torch.cuda.empty_cache()
    header = provenance(args.commit, __file__)
    header["method"] = ("CUDA events, GPU sleep before each start event, warm-up 10, median and p95 of 50; GB/s = "
                        "bytes of K and V the lengths reach (codes and scales) / median; rel_err = ||out - ref|| / "
                        "||ref|| against float32 over the values each format's codes hold")
    write_rows(args.out, rows, header, COLUMNS)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""MLA decode benchmark: the project's kernel (kernels/decode_mla.cu) and its peers on DeepSeek-V3's decode shape
(128 query heads, latent 512 + RoPE 64, pages of 64 tokens), batch 1 to 128, every sequence 4096 or 32768 tokens.

The project's kernel comes in through ctypes from build/lib/libaf_kernels_capi.so (target af_kernels_capi). The
peers, each imported in a try/except and skipped when missing, read the same tensors:
  * FlashMLA's flash_mla_with_kvcache (github.com/deepseek-ai/FlashMLA): the pool viewed as
    [num_pages, 64, 1, 576], the queries as [batch, 1, 128, 576];
  * FlashInfer's flashinfer.mla.BatchMLAPagedAttentionWrapper: the latent and RoPE parts of the same pool and of
    the same queries as strided views (contiguous copies, made once before timing, if it refuses views).
Method (as bench_decode.py): correct first (output poisoned with NaN, relative Frobenius error against float32
PyTorch on the first sequences, bf16 must land under 1e-2), then CUDA events around each call with a GPU sleep
queued before the start event, 10 warm-up calls, median and p95 of 50, cache pools rotated so that no call finds
the previous call's rows in L2. GB/s counts the bytes one step must read at least once (af::mla_decode_bytes:
the cached rows once, however many heads share them, plus queries, outputs and table entries); TFLOP/s counts
2 x heads x (576 + 512) per cached token (af::mla_decode_flops).

  python3 kernels/bench/bench_mla.py --lib build/lib/libaf_kernels_capi.so --out mla_h100.csv --commit SHA

A program, not a test: it needs a GPU and PyTorch, and nothing runs it in CI.
"""
import argparse
import ctypes
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import provenance, time_calls, write_rows  # noqa: E402

LATENT, ROPE, WIDTH = 512, 64, 576
L2_BYTES = 50e6
COLUMNS = ["batch", "seq_len", "q_heads", "page_size", "impl", "splits", "bytes", "flops", "ms_median", "ms_p95",
           "gbps", "tflops", "rel_err", "status"]


class Project:
    """The project's MLA decode through the C interface of kernels/bench/capi.cpp."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        ll, i, p, f = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        self.lib.af_mla_decode_plan.argtypes = [ll, ll, ll, ll, ll, i, i, ctypes.POINTER(i), ctypes.POINTER(i),
                                                ctypes.POINTER(ll), ctypes.c_char_p, i]
        self.lib.af_mla_decode_run.argtypes = [i, i, ll, ll, ll, ll, ll, ll, p, p, p, p, p, f, p, p,
                                               ctypes.c_char_p, i]
        self.err = ctypes.create_string_buffer(1024)

    def runner(self, batch, heads, page_size, max_pages, num_pages, sm_count, scale, splits=0):
        n, pps, ws = ctypes.c_int(), ctypes.c_int(), ctypes.c_longlong()
        if self.lib.af_mla_decode_plan(batch, heads, page_size, max_pages, num_pages, sm_count, splits,
                                       ctypes.byref(n), ctypes.byref(pps), ctypes.byref(ws), self.err, 1024):
            raise RuntimeError(self.err.value.decode())
        workspace = torch.empty(max(ws.value, 16), dtype=torch.uint8, device="cuda")  # allocated once, here

        def run(q, cache, table, lengths, out):
            stream = torch.cuda.current_stream().cuda_stream
            if self.lib.af_mla_decode_run(n.value, pps.value, ws.value, batch, heads, page_size, max_pages, num_pages,
                                          q.data_ptr(), cache.data_ptr(), table.data_ptr(), lengths.data_ptr(),
                                          out.data_ptr(), scale, workspace.data_ptr(), stream, self.err, 1024):
                raise RuntimeError(self.err.value.decode())
            return out
        return run, n.value


def flashmla_peer(batch, heads, page_size, scale):
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata

    def build(q, cache, table, lengths):
        metadata, splits = get_mla_metadata(lengths, heads, 1)  # (seqlens, q heads per KV head, KV heads)

        def run(q, cache, table, lengths, out):
            o, _ = flash_mla_with_kvcache(q.view(batch, 1, heads, WIDTH), cache.view(-1, page_size, 1, WIDTH), table,
                                          lengths, LATENT, metadata, splits, softmax_scale=scale, causal=False)
            if out is not None:
                out.copy_(o.view(batch, heads, LATENT))
            return o
        return run
    return build


def flashinfer_peer(batch, heads, page_size, scale):
    import flashinfer

    def build(q, cache, table, lengths):
        pages = (lengths + page_size - 1) // page_size
        kv_indptr = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
        kv_indptr[1:] = torch.cumsum(pages, 0)
        kv_indices = torch.cat([table[b, :int(pages[b])] for b in range(batch)]).to(torch.int32)
        qo_indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        w = flashinfer.mla.BatchMLAPagedAttentionWrapper(ws)
        w.plan(qo_indptr, kv_indptr, kv_indices, lengths, heads, LATENT, ROPE, page_size, False, scale,
               torch.bfloat16, torch.bfloat16)
        state = {"copied": False}

        def parts(q, cache):
            if state["copied"]:
                return (q[..., :LATENT].contiguous(), q[..., LATENT:].contiguous(), cache[..., :LATENT].contiguous(),
                        cache[..., LATENT:].contiguous())
            return q[..., :LATENT], q[..., LATENT:], cache[..., :LATENT], cache[..., LATENT:]

        try:
            w.run(*parts(q, cache))
        except Exception:  # strided views refused: contiguous copies (made per set, before timing)
            state["copied"] = True
        copies = {}

        def run(q, cache, table, lengths, out):
            key = (q.data_ptr(), cache.data_ptr())
            if key not in copies:
                copies[key] = parts(q, cache)
            o = w.run(*copies[key])
            if out is not None:
                out.copy_(o.view(batch, heads, LATENT))
            return o
        run.copied = state["copied"]
        return run
    return build


def reference(q, cache, table, lengths, page_size, scale, sequences):
    """float32 PyTorch on upcast inputs for the first `sequences` sequences: [sequences, heads, 512]."""
    outs = []
    for b in range(sequences):
        n = int(lengths[b])
        pages = table[b, :(n + page_size - 1) // page_size].long()
        rows = cache[pages].reshape(-1, WIDTH)[:n].float()
        weights = (q[b].float() @ rows.T * scale).softmax(-1)
        outs.append(weights @ rows[:, :LATENT])
    return torch.stack(outs)


def rel_error(out, ref):
    out = out[:ref.shape[0]].float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def bench_case(batch, seq_len, heads, page_size, project, sm_count, peers, rows, splits=0):
    max_pages = (seq_len + page_size - 1) // page_size
    num_pages = batch * max_pages
    mscale = 0.1 * math.log(40.0) + 1.0
    scale = mscale * mscale / math.sqrt(192.0)  # DeepSeek-V3: 1/sqrt(128 + 64) times YaRN's mscale^2
    tokens = batch * seq_len
    nbytes = tokens * WIDTH * 2 + batch * heads * (WIDTH + LATENT) * 2 + batch * max_pages * 4 + batch * 4
    flops = 2.0 * tokens * heads * (WIDTH + LATENT)
    sets = max(2, math.ceil(3 * L2_BYTES / nbytes))
    gen = torch.Generator(device="cuda").manual_seed(batch * 100003 + seq_len)
    lengths = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    # Shuffled pages: consecutive pages of one sequence lie far apart in the pool.
    table = torch.randperm(num_pages, generator=gen, device="cuda").to(torch.int32).view(batch, max_pages)

    def randn(*size):
        return torch.randn(*size, generator=gen, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    inputs = [(randn(batch, heads, WIDTH), randn(num_pages, page_size, WIDTH)) for _ in range(sets)]
    check = min(batch, 4)
    ref = reference(inputs[0][0], inputs[0][1], table, lengths, page_size, scale, check)
    out = torch.empty(batch, heads, LATENT, dtype=torch.bfloat16, device="cuda")

    impls = []
    if project is not None:
        try:
            run, n = project.runner(batch, heads, page_size, max_pages, num_pages, sm_count, scale, splits)
            impls.append(("af_mla_decode", lambda q, c, t, lens, run=run: run, n, True))
        except Exception as e:
            rows.append(dict(batch=batch, seq_len=seq_len, impl="af_mla_decode", status=f"unsupported: {e}"))
    for name, peer in peers:
        impls.append((name, peer(batch, heads, page_size, scale), 0, False))

    for impl, make, n, ours in impls:
        row = dict(batch=batch, seq_len=seq_len, q_heads=heads, page_size=page_size, impl=impl, splits=n,
                   bytes=int(nbytes), flops=flops)
        try:
            run = make(inputs[0][0], inputs[0][1], table, lengths)
            out.fill_(float("nan"))  # poison: every element must be written
            run(inputs[0][0], inputs[0][1], table, lengths, out)
            torch.cuda.synchronize()
            row["rel_err"] = rel_error(out, ref)
            row["status"] = "ok" if row["rel_err"] < 1e-2 else "WRONG"  # NaN compares false: fails
            if getattr(run, "copied", False):
                row["status"] += " (contiguous copies of the latent and RoPE parts)"
            target = out if ours else None
            med, p95 = time_calls(lambda i: run(inputs[i % sets][0], inputs[i % sets][1], table, lengths, target))
            row.update(ms_median=med, ms_p95=p95, gbps=nbytes / med / 1e6, tflops=flops / med / 1e9)
        except Exception as e:
            row["status"] = "failed: " + (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        rows.append(row)
        print(f"  b {batch:4d} len {seq_len:6d} {impl:22s} {row.get('status', '')[:8]:8s} "
              f"err {row.get('rel_err', float('nan')):.2e} median {row.get('ms_median', float('nan')):8.4f} ms "
              f"{row.get('gbps', 0):7.0f} GB/s {row.get('tflops', 0):6.1f} TFLOP/s", flush=True)
    del inputs, ref, out
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="build/lib/libaf_kernels_capi.so")
    ap.add_argument("--out", default="mla_h100.csv")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--lengths", default="4096,32768")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--splits", type=int, default=0, help="force the project's split count (0: its plan)")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()

    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    project = Project(args.lib)
    peers = []
    if not args.no_peers:
        for name, module, peer in [("flashmla", "flash_mla", flashmla_peer),
                                   ("flashinfer_mla", "flashinfer", flashinfer_peer)]:
            try:
                __import__(module)
                peers.append((name, peer))
            except Exception as e:  # not installed (or not built for this GPU): skipped, said in the output
                print(f"{name}: not available ({type(e).__name__}: {e})", flush=True)
    rows = []
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        for batch in [int(x) for x in args.batches.split(",")]:
            bench_case(batch, seq_len, args.heads, args.page_size, project, sm_count, peers, rows, args.splits)

    header = provenance(args.commit, __file__)
    header["method"] = ("CUDA events, GPU sleep before each start event, warm-up 10, median and p95 of 50, cache pools "
                        "rotated beyond L2; GB/s = bytes read at least once (cached rows + queries + outputs + table) "
                        "/ median; TFLOP/s = 2 x heads x (576 + 512) x tokens / median; rel_err against float32 "
                        "PyTorch on upcast inputs (first 4 sequences)")
    write_rows(args.out, rows, header, COLUMNS)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()

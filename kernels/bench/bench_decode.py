#!/usr/bin/env python3
"""Decode-attention benchmark: the project's kernel versions and the peers, on every decode shape of SHAPES
(below), in one process and one GPU run, with one timer.

The project's kernels come in through ctypes from build/lib/libaf_kernels_capi.so (target af_kernels_capi), so
that they and the peers (cuDNN SDPA, SDPA's FlashAttention, FlexAttention compiled, eager grouped bmm, and
FlashInfer's batch decode when it is installed) read the same tensors and are timed by the same code:

  * correct first: fresh random bf16 inputs per shape, output poisoned with NaN before the run, relative
    Frobenius error against PyTorch on float32-upcast inputs; NaN fails; bf16 must land under 1e-2;
  * then timed: CUDA events around each call, a GPU sleep queued before the start event so that host-side
    launch overhead (ctypes, PyTorch dispatch) is not counted for anyone, 10 warm-up calls, 50 timed calls,
    median and p95, K/V sets rotated so that no call finds the previous call's cache in L2 (50 MB);
  * the read ceiling of the card measured in the same run by a read-only streaming kernel.

  python3 kernels/bench/bench_decode.py --lib build/lib/libaf_kernels_capi.so --out results.csv --commit SHA

Prints a short table last; writes the CSV with a provenance header (# lines).
"""
import argparse
import ctypes
import datetime
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [  # name, batch, cached tokens, q heads, kv heads, head dim (the serving shapes timed)
    ("llama3-8b", 256, 4096, 32, 8, 128),
    ("qwen3-30b-a3b", 256, 4096, 32, 4, 128),
    ("qwen3-235b-a22b", 256, 4096, 64, 4, 128),
    ("llama3-8b-b1-128k", 1, 131072, 32, 8, 128),
    ("llama3-8b-b8-32k", 8, 32768, 32, 8, 128),
    ("mha-b64-8k", 64, 8192, 32, 32, 128),
]
VERSIONS = ["v1_naive", "v2_gqa", "v3_split", "v4_mma", "v5_pipelined", "best"]
L2_BYTES = 50e6


class Project:
    """The project's decode kernels through the C interface of kernels/bench/capi.cpp."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        ll, i, p, f = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        self.lib.af_decode_plan.argtypes = [ctypes.c_char_p, ll, ll, ll, ll, ll, i, i, ctypes.POINTER(i),
                                            ctypes.POINTER(i), ctypes.POINTER(ll), ctypes.POINTER(ll),
                                            ctypes.c_char_p, i]
        self.lib.af_decode_run.argtypes = [i, i, ll, ll, ll, ll, ll, ll, ll, p, p, p, p, f, p, p, ctypes.c_char_p, i]
        self.lib.af_read_only.argtypes = [p, ll, p, i, i, p]
        self.err = ctypes.create_string_buffer(1024)

    def plan(self, version, shape, sm_count, splits=0):
        _, b, s, hq, hkv, d = shape
        v, n, kps, ws = ctypes.c_int(), ctypes.c_int(), ctypes.c_longlong(), ctypes.c_longlong()
        if self.lib.af_decode_plan(version.encode(), b, hq, hkv, d, s, sm_count, splits, ctypes.byref(v),
                                   ctypes.byref(n), ctypes.byref(kps), ctypes.byref(ws), self.err, 1024):
            raise RuntimeError(self.err.value.decode())
        return v.value, n.value, kps.value, ws.value

    def runner(self, version, shape, sm_count, splits=0):
        _, b, s, hq, hkv, d = shape
        v, splits, kps, ws_bytes = self.plan(version, shape, sm_count, splits)
        workspace = torch.empty(max(ws_bytes, 16), dtype=torch.uint8, device="cuda")  # allocated once, here
        scale = 1.0 / math.sqrt(d)

        def run(q, k, vv, out):
            stream = torch.cuda.current_stream().cuda_stream
            if self.lib.af_decode_run(v, splits, kps, ws_bytes, b, hq, hkv, d, s, q.data_ptr(), k.data_ptr(),
                                      vv.data_ptr(), out.data_ptr(), scale, workspace.data_ptr(), stream,
                                      self.err, 1024):
                raise RuntimeError(self.err.value.decode())
        return run, splits

    def read_ceiling(self, nbytes=4 << 30, repeats=20):
        buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        sink = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        best = 0.0
        for blocks_per_sm, threads in [(4, 512), (8, 256), (2, 1024), (16, 256)]:
            def call():
                stream = torch.cuda.current_stream().cuda_stream
                if self.lib.af_read_only(buf.data_ptr(), nbytes, sink.data_ptr(), sms * blocks_per_sm, threads, stream):
                    raise RuntimeError("read-only kernel failed")
            med, _ = time_calls(lambda i: call(), warmup=3, iters=repeats)
            best = max(best, nbytes / med / 1e6)
        del buf
        return best


def provenance(commit, script):
    """The first lines of a result file: the GPU, driver, CUDA and PyTorch versions, date, commit and command."""
    return {
        "gpu": torch.cuda.get_device_properties(0).name,
        "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip(),
        "cuda": torch.version.cuda, "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit, "command": " ".join([os.path.relpath(script)] + sys.argv[1:]),
    }


def time_calls(call, warmup=10, iters=50):
    """Median and p95 milliseconds of `call(i)`, CUDA events, a GPU sleep before each start event."""
    for i in range(warmup):
        call(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(200_000)  # ~0.1 ms of GPU work while the host queues the events and the call
        start.record()
        call(warmup + i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]


def reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float32 on upcast inputs, a chunk of sequences at a time."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    chunk = max(1, int(2e9 // (k[0].numel() * 4 * 2)))
    for b0 in range(0, b, chunk):
        qs = q[b0:b0 + chunk].float().view(-1, hkv, g, d)
        ks, vs = k[b0:b0 + chunk].float(), v[b0:b0 + chunk].float()
        scores = torch.einsum("bhgd,bhsd->bhgs", qs, ks) / math.sqrt(d)
        out[b0:b0 + chunk] = torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), vs).reshape(-1, hq, d)
        del ks, vs, scores
    return out


def rel_error(out, ref):
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def peers(shape, flashinfer, wanted):
    """(name, make) pairs; make(q, k, v) returns a callable computing out [b, hq, d] from those tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _, b, s, hq, hkv, d = shape
    g = hq // hkv

    def sdpa(backend):
        def make():
            def run(q, k, v, out):
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(q.view(b, hq, 1, d), k, v, enable_gqa=True)
                out.copy_(o.view(b, hq, d)) if out is not None else None
                return o
            return run
        return make

    def flex():
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v, out):
            o = compiled(q.view(b, hq, 1, d), k, v, enable_gqa=True)
            out.copy_(o.view(b, hq, d)) if out is not None else None
            return o
        return run

    def eager():
        def run(q, k, v, out):
            scores = torch.matmul(q.view(b, hkv, g, d), k.transpose(-1, -2)) / math.sqrt(d)
            o = torch.matmul(scores.float().softmax(-1).to(q.dtype), v)
            out.copy_(o.view(b, hq, d)) if out is not None else None
            return o
        return run

    result = [("cudnn_sdpa", sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION)),
              ("flex_compiled", flex), ("eager_bmm", eager)]
    result = [(name, make) for name, make in result if name in wanted]
    if flashinfer:
        result += flashinfer_peers(shape)
    return result


def flashinfer_peers(shape):
    import flashinfer
    _, b, s, hq, hkv, d = shape

    def make(tensor_cores):
        def build():
            ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "HND", use_tensor_cores=tensor_cores)
            # One page per sequence of page_size = s: the paged cache [pages, kv_heads, page, d] is exactly
            # the project's [batch, kv_heads, seq, d].
            indptr = torch.arange(b + 1, dtype=torch.int32, device="cuda")
            indices = torch.arange(b, dtype=torch.int32, device="cuda")
            last = torch.full((b,), s, dtype=torch.int32, device="cuda")
            w.plan(indptr, indices, last, hq, hkv, d, s, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)

            def run(q, k, v, out):
                o = w.run(q, (k, v))
                out.copy_(o) if out is not None else None
                return o
            return run
        return build
    return [("flashinfer_decode", make(False)), ("flashinfer_decode_tc", make(True))]


def bench_shape(shape, project, sm_count, versions, use_peers, flashinfer, rows, log, wanted=(), sweep=()):
    name, b, s, hq, hkv, d = shape
    kv_bytes = 2.0 * b * hkv * s * d * 2
    sets = max(2, math.ceil(3 * L2_BYTES / kv_bytes))
    gen = torch.Generator(device="cuda").manual_seed(hash(name) % (1 << 31))

    def randn(*size):
        return torch.randn(*size, generator=gen, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    inputs = [(randn(b, hq, d), randn(b, hkv, s, d), randn(b, hkv, s, d)) for _ in range(sets)]
    ref = reference(*inputs[0])
    out = torch.empty(b, hq, d, dtype=torch.bfloat16, device="cuda")

    impls = []
    if project is not None:
        for version in versions:
            try:
                run, splits = project.runner(version, shape, sm_count)
                impls.append((version, "project", lambda run=run: run, splits))
            except Exception as e:  # a version that does not support the shape
                rows.append(dict(shape=name, impl=version, source="project", status=f"unsupported: {e}"))
        for item in sweep:  # "v4_mma:1,2,4": the same kernel with the split count forced
            version, counts = item.split(":")
            for n in counts.split(","):
                run, splits = project.runner(version, shape, sm_count, int(n))
                impls.append((f"{version}/s{n}", "project-sweep", lambda run=run: run, splits))
    if use_peers:
        for peer, make in peers(shape, flashinfer, wanted):
            impls.append((peer, "peer", make, 0))

    for impl, source, make, splits in impls:
        row = dict(shape=name, impl=impl, source=source, splits=splits)
        try:
            t0 = time.time()
            run = make()
            out.fill_(float("nan"))  # poison: every element must be written
            run(*inputs[0], out)
            torch.cuda.synchronize()
            err = rel_error(out, ref)
            row["rel_err"] = err
            row["status"] = "ok" if err < 1e-2 else "WRONG"  # NaN compares false: fails
            target = out if source.startswith("project") else None  # peers return their own output
            probe, _ = time_calls(lambda i: run(*inputs[i % sets], target), warmup=1, iters=3)
            iters = 50 if probe < 20 else 10
            med, p95 = time_calls(lambda i: run(*inputs[i % sets], target), warmup=10 if probe < 20 else 2,
                                  iters=iters)
            row.update(ms_median=med, ms_p95=p95, gbps=kv_bytes / med / 1e6, iters=iters,
                       setup_s=round(time.time() - t0, 1))
        except Exception as e:
            row["status"] = "failed: " + (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        rows.append(row)
        print(f"  {name:18s} {impl:22s} {row.get('status', ''):8.8s} err {row.get('rel_err', float('nan')):.2e} "
              f"median {row.get('ms_median', float('nan')):8.4f} ms  p95 {row.get('ms_p95', float('nan')):8.4f}  "
              f"{row.get('gbps', 0):7.0f} GB/s", file=log, flush=True)
    del inputs, ref, out
    torch.cuda.empty_cache()


COLUMNS = ["shape", "batch", "seq_len", "q_heads", "kv_heads", "head_dim", "kv_bytes", "impl", "source", "splits",
           "ms_median", "ms_p95", "gbps", "pct_of_read_ceiling", "read_ceiling_gbps", "rel_err", "iters", "status"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default="build/lib/libaf_kernels_capi.so")
    ap.add_argument("--out", default="decode_h100.csv")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--shapes", default="all", help="comma-separated names from SHAPES, or all")
    ap.add_argument("--versions", default=",".join(VERSIONS))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--sweep", default="", help="e.g. 'v4_mma:1,2,4': also time these forced split counts")
    ap.add_argument("--peers", default="cudnn_sdpa,sdpa_flash,flex_compiled,eager_bmm",
                    help="comma-separated PyTorch peers to time")
    ap.add_argument("--flashinfer", action="store_true", help="also time FlashInfer's batch decode")
    ap.add_argument("--flashinfer-only", action="store_true", help="(internal) only FlashInfer, rows to --out")
    args = ap.parse_args()

    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    props = torch.cuda.get_device_properties(0)
    rows = []
    if args.flashinfer_only:
        for shape in shapes:
            rows = []
            _flashinfer_only(shape, rows)
            write_rows(args.out, rows, {})
        return
    project = Project(args.lib)
    ceiling = project.read_ceiling()
    print(f"read-only streaming kernel: {ceiling:.0f} GB/s", flush=True)
    for shape in shapes:
        bench_shape(shape, project, props.multi_processor_count, args.versions.split(","), not args.no_peers,
                    False, rows, sys.stdout, args.peers.split(","), [x for x in args.sweep.split(";") if x])

    if args.flashinfer:
        fi_csv = args.out + ".flashinfer.csv"
        cmd = [sys.executable, __file__, "--flashinfer-only", "--out", fi_csv, "--shapes",
               ",".join(s[0] for s in shapes)]
        t0 = time.time()
        try:
            subprocess.run(cmd, timeout=int(os.environ.get("AF_FLASHINFER_TIMEOUT", "240")), check=False)
        except subprocess.TimeoutExpired:
            print(f"FlashInfer: stopped after {time.time() - t0:.0f} s (JIT compilation budget)", flush=True)
        if os.path.exists(fi_csv):
            rows += read_rows(fi_csv)
        else:
            rows.append(dict(shape="all", impl="flashinfer_decode", source="peer", status="failed: no result"))

    shape_info = {s[0]: s for s in SHAPES}
    for r in rows:
        if r.get("shape") in shape_info:
            _, b, s, hq, hkv, d = shape_info[r["shape"]]
            r.update(batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d, kv_bytes=int(2 * b * hkv * s * d * 2))
        r["read_ceiling_gbps"] = round(ceiling, 1)
        if r.get("gbps"):
            r["pct_of_read_ceiling"] = round(100.0 * float(r["gbps"]) / ceiling, 1)
    header = provenance(args.commit, __file__)
    header["method"] = ("CUDA events, GPU sleep before each start event, warm-up 10, median and p95 of 50, K/V sets "
                        "rotated beyond L2; GB/s = K+V bytes / median; rel_err = ||out - ref|| / ||ref|| against "
                        "float32 on upcast inputs")
    header["read_ceiling"] = "read-only streaming kernel (kernels/bench/read_ceiling.cu), best of 4 launch shapes, 4 GiB"
    write_rows(args.out, rows, header)
    print_table(rows, ceiling)


def _flashinfer_only(shape, rows):
    name, b, s, hq, hkv, d = shape
    gen = torch.Generator(device="cuda").manual_seed(7)
    kv_bytes = 2.0 * b * hkv * s * d * 2
    sets = max(2, math.ceil(3 * L2_BYTES / kv_bytes))
    mk = lambda *size: torch.randn(*size, generator=gen, device="cuda").to(torch.bfloat16)  # noqa: E731
    inputs = [(mk(b, hq, d), mk(b, hkv, s, d), mk(b, hkv, s, d)) for _ in range(sets)]
    ref = reference(*inputs[0])
    out = torch.empty(b, hq, d, dtype=torch.bfloat16, device="cuda")
    for impl, make in flashinfer_peers(shape):
        row = dict(shape=name, impl=impl, source="peer", splits=0)
        try:
            t0 = time.time()
            run = make()
            out.fill_(float("nan"))
            run(*inputs[0], out)
            torch.cuda.synchronize()
            row["rel_err"] = rel_error(out, ref)
            row["status"] = "ok" if row["rel_err"] < 1e-2 else "WRONG"
            med, p95 = time_calls(lambda i: run(*inputs[i % sets], None))
            row.update(ms_median=med, ms_p95=p95, gbps=kv_bytes / med / 1e6, iters=50)
            print(f"  {name:18s} {impl:22s} {row['status']} err {row['rel_err']:.2e} median {med:.4f} ms "
                  f"(setup {time.time() - t0:.0f} s)", flush=True)
        except Exception as e:
            row["status"] = "failed: " + (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            print(f"  {name} {impl}: {row['status']}", flush=True)
        rows.append(row)
    del inputs, ref
    torch.cuda.empty_cache()


def write_rows(path, rows, header, columns=None):
    """A result CSV: the header as '# key: value' lines, then the columns' names and one line per row (floats to
    6 significant digits, commas in a cell turned into ';'). An empty header appends to an existing file."""
    columns = columns or COLUMNS
    mode = "a" if (not header and os.path.exists(path)) else "w"
    with open(path, mode) as f:
        for key, value in header.items():
            f.write(f"# {key}: {value}\n")
        if mode == "w":
            f.write(",".join(columns) + "\n")
        for r in rows:
            cells = []
            for c in columns:
                v = r.get(c, "")
                if isinstance(v, float):
                    v = f"{v:.6g}"
                cells.append(str(v).replace(",", ";"))
            f.write(",".join(cells) + "\n")


def read_rows(path):
    rows = []
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if not line.startswith("#")]
    cols = lines[0].split(",")
    for line in lines[1:]:
        r = dict(zip(cols, line.split(",")))
        for c in ("ms_median", "ms_p95", "gbps", "rel_err"):
            if r.get(c):
                r[c] = float(r[c])
        rows.append({k: v for k, v in r.items() if v != ""})
    return rows


def print_table(rows, ceiling):
    impls = []
    for r in rows:
        if r["impl"] not in impls and r.get("shape") != "all":
            impls.append(r["impl"])
    by = {(r["shape"], r["impl"]): r for r in rows}
    print(f"\nread ceiling {ceiling:.0f} GB/s; cells: median ms (% of read ceiling); x = failed or wrong")
    print(f"{'shape':18s} " + " ".join(f"{i[:14]:>15s}" for i in impls))
    for shape in dict.fromkeys(r["shape"] for r in rows if r.get("shape") != "all"):
        cells = []
        for i in impls:
            r = by.get((shape, i))
            if r is None or "ms_median" not in r:
                cells.append(f"{'-' if r is None else 'x':>15s}")
            else:
                mark = "" if r.get("status") == "ok" else "!"
                cells.append(f"{r['ms_median']:8.3f}({100 * r['gbps'] / ceiling:3.0f}%){mark}".rjust(15))
        print(f"{shape:18s} " + " ".join(cells))


if __name__ == "__main__":
    main()

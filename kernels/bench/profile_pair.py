#!/usr/bin/env python3
"""Runs one decode shape of bench_decode.py's SHAPES through the project's best kernel and through the peers, a few calls each,
so that Nsight Compute can profile the kernels side by side (kernels/NOTES.md, "Where the last percent goes"):

  ncu --clock-control none -k regex:'decode_mma|sdpa|fmha|flash' --launch-skip 4 --launch-count 6 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
      --section Occupancy -o prof python3 kernels/bench/profile_pair.py --shape llama3-8b-b1-128k
"""
import argparse
import math

import torch

from bench_decode import SHAPES, Project, peers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="build/lib/libaf_kernels_capi.so")
    ap.add_argument("--shape", default="llama3-8b-b1-128k")
    ap.add_argument("--version", default="v5_pipelined")
    ap.add_argument("--peers", default="cudnn_sdpa,flashinfer_decode_tc")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    shape = next(s for s in SHAPES if s[0] == args.shape)
    _, b, s, hq, hkv, d = shape
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(*size, generator=gen, device="cuda").to(torch.bfloat16)
               for size in [(b, hq, d), (b, hkv, s, d), (b, hkv, s, d)])
    out = torch.empty(b, hq, d, dtype=torch.bfloat16, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    run, splits = Project(args.lib).runner(args.version, shape, sms)
    print(f"{args.version}: {splits} splits")
    for _ in range(args.calls):
        run(q, k, v, out)
    torch.cuda.synchronize()
    wanted = args.peers.split(",")
    flashinfer = any(p.startswith("flashinfer") for p in wanted)
    try:
        makers = peers(shape, flashinfer, wanted)
    except ImportError as e:
        print("peers:", e)
        makers = peers(shape, False, wanted)
    for name, make in makers:
        if name not in wanted:
            continue
        call = make()
        for _ in range(args.calls):
            call(q, k, v, None)
        torch.cuda.synchronize()
        print(f"{name}: {args.calls} calls")


if __name__ == "__main__":
    main()

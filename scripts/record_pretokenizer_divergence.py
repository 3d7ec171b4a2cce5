#!/usr/bin/env python3
"""Prints the ids behind the "smollm versus gpt2 pre-tokenizer" checks of tests/test_tokenizer.cpp.

transformers' GGUF converter gives every "gpt2" model GPT-2's ByteLevel pre-tokenizer and ignores
tokenizer.ggml.pre; the model's own tokenizer.json (and llama.cpp's "smollm") first cut out every digit
(Digits(individual_digits=True)). The two differ where white space runs into a digit. This prints, for a few
such strings, the ids under both pre-tokenizers over the GGUF's own vocabulary and merges.

Usage: /work/scratch/venv-ref/bin/python scripts/record_pretokenizer_divergence.py MODEL_DIR GGUF_NAME
"""
import sys

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

STRINGS = ["a  1", "abc  123", "version  2.0   beta", "\n\n1"]


def main() -> None:
    backend = AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2]).backend_tokenizer
    gpt2 = {s: backend.encode(s, add_special_tokens=False).ids for s in STRINGS}
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
    ])
    for s in STRINGS:
        print(repr(s), "gpt2", gpt2[s], "smollm", backend.encode(s, add_special_tokens=False).ids)


if __name__ == "__main__":
    main()

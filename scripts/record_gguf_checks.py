#!/usr/bin/env python3
"""Records an independent check of the model file for tests/test_gguf.cpp: PyPI's `gguf` package (the
reader maintained with llama.cpp) opens SmolLM2-135M-Instruct.Q4_1.gguf and dequantizes a few tensors; this
script writes, for each, its type and shape, the first 64 values and the float64 sum and sum of squares of
the values, to tests/data/gguf_smollm2_checks.json. The C++ reader must reproduce them.

Run it in a scratch virtual environment outside the repository (the package is not one of the build's):
    python3 -m venv /tmp/venv-gguf && /tmp/venv-gguf/bin/pip install gguf numpy
    bash scripts/fetch_model.sh
    /tmp/venv-gguf/bin/python scripts/record_gguf_checks.py build/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/data/gguf_smollm2_checks.json
Recorded with gguf 0.19.0 and numpy 2.4.6.
"""
import json
import sys
from importlib import metadata

import gguf
import numpy as np

# (tensor, rows taken): the first `rows` rows of the tensor in ggml order (rows of dims[0] elements);
# None takes the whole tensor.
CHECKED = [
    ("token_embd.weight", 4),
    ("blk.0.attn_q.weight", None),
    ("blk.0.attn_k.weight", None),
    ("blk.29.ffn_down.weight", None),
    ("blk.0.attn_norm.weight", None),
    ("output_norm.weight", None),
]


def main(model_path, out_path):
    reader = gguf.GGUFReader(model_path)
    by_name = {t.name: t for t in reader.tensors}
    checks = []
    for name, rows in CHECKED:
        t = by_name[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        dims = [int(d) for d in t.shape]  # ggml order: the row length first
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if rows is not None:
            values = values[: rows * dims[0]]
        as64 = values.astype(np.float64)
        checks.append(
            {
                "name": name,
                "type": t.tensor_type.name,
                "dims": dims,
                "count": int(values.size),
                # float32 values written through float64 reprs, which the C++ side parses back exactly
                "first": [float(v) for v in values[:64]],
                "sum": float(as64.sum()),
                "sum_of_squares": float((as64 * as64).sum()),
            }
        )
    source = f"gguf {metadata.version('gguf')}, numpy {np.__version__}, from {model_path.split('/')[-1]}"
    with open(out_path, "w") as out:
        out.write('{"source": ' + json.dumps(source) + ',\n "tensors": [\n  ')
        out.write(",\n  ".join(json.dumps(check) for check in checks))
        out.write("\n]}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

#!/usr/bin/env python3
"""Records tests/train_cases/llama_tiny/: a tiny random-weight Hugging Face `LlamaForCausalLM`, its loss on a
batch of token ids with labels, its logits, and the gradient of that loss with respect to every parameter,
computed by PyTorch autograd. tests/test_train.cpp loads the weights into af::train::Model and compares its
forward and hand-written backward with these, so CI checks the training code against PyTorch without Python.

The model: vocab 32, hidden 32, 2 layers, 4 query heads, 2 KV heads (GQA), head_dim 8, intermediate 64,
RMSNorm eps 1e-6, RoPE theta 10000 (rope_type "default": half-split pairs, `rotate_half`), untied embeddings,
no biases, SiLU, eager attention. Weights are normal(0, 0.3) (`initializer_range`, larger than usual so that
every gradient is well above float32 rounding), and the norm gains are 1 + normal(0, 0.2) so that their
gradients are exercised away from 1. Everything is float32 on the CPU, TF32 off; the loss is the model's own
(`LlamaForCausalLM(input_ids, labels=labels).loss`: labels shifted left by one, positions labelled -100 not
scored, the mean over every scored position of the batch). Deterministic for a given seed.

  /work/scratch/venv-ref/bin/python tests/train_cases/record_llama_grads.py
"""

import argparse
import datetime
import json
import platform
from pathlib import Path

import safetensors
import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "llama_tiny"))
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()  # no dropout (there is none in Llama; eval only makes it explicit)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))

    generator = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.length), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt that is not scored
    labels[1, torch.randperm(args.length, generator=generator)[:4]] = -100  # scattered unscored positions

    output = model(input_ids=input_ids, labels=labels)
    output.loss.backward()

    tensors = {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "logits": output.logits.detach().to(torch.float32).contiguous(),
        "loss": output.loss.detach().reshape(1).to(torch.float32).contiguous(),
    }
    for name, parameter in model.named_parameters():
        tensors["param." + name] = parameter.detach().contiguous()
        tensors["grad." + name] = parameter.grad.detach().contiguous()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "tensors.safetensors"))
    scored = int((labels[:, 1:] != -100).sum())
    case = {
        "description": "A tiny random LlamaForCausalLM (GQA): loss, logits and every parameter's gradient by "
        "PyTorch autograd, float32. See tests/train_cases/record_llama_grads.py.",
        "reference": "llama",
        "dtype": "float32",
        "config": {
            key: config.to_dict()[key]
            for key in [
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                "hidden_act", "initializer_range",
            ]
        },
        "batch": args.batch,
        "length": args.length,
        "scored_targets": scored,
        "loss": float(output.loss.detach()),
        "seed": args.seed,
        "tensors": "tensors.safetensors: param.<HF name> and grad.<HF name> for every parameter, input_ids and "
        "labels [batch, length] (int64, -100 = not scored), logits [batch, length, vocab], loss [1]",
        "tolerance": "see tests/test_train.cpp",
        "generator": {
            "command": "/work/scratch/venv-ref/bin/python tests/train_cases/record_llama_grads.py",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "recorded_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "device": "cpu, 2 threads",
        },
    }
    (out / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    print(f"loss {float(output.loss.detach()):.6f} over {scored} scored targets; wrote {out}")


if __name__ == "__main__":
    main()

"""Write a tiny llama-architecture GGUF model with seeded random weights.

    python examples/llama_cpp/make_tiny_model.py OUT.gguf [--seed N]

No download: a real model server (llama-cpp-python's `llama_cpp.server`) loads it in well
under a second on a CPU and answers chat, completions (streamed too) and embeddings with it.
What it says is noise; that it says it through the real server's own code is the point.

The model: 2 layers, width 64, context 512, about 0.5 MB of float32. The vocabulary is a
SentencePiece ("llama") one of ~360 tokens: <unk>, <s>, </s>, the 256 byte-fallback tokens
(so any prompt tokenizes) and one token per printable ASCII character ("▁" for a space). The
output layer writes only those characters: the special and byte rows are zero while the rest
are large, so the text generated is printable ASCII and end-of-sequence is, in practice,
never chosen (a stream runs to `max_tokens`). `llama.pooling_type` (mean) lets the server
answer /v1/embeddings when started with `--embedding True`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

N_CTX = 512
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
SPACE = "\u2581"  # SentencePiece's visible space
# A chat template in the GGUF's metadata: the server formats chat requests with it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: specials, byte fallbacks, then the printable characters."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    chars = [SPACE if c == " " else c for c in map(chr, range(32, 127))]
    tokens += chars
    types += [gguf.TokenType.NORMAL] * len(chars)
    # Single characters only: no merges to score, every score the same.
    scores = [0.0] * len(tokens)
    return tokens, scores, [int(t) for t in types]


def write(out: Path, seed: int, n_ctx: int = N_CTX) -> None:
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)

    def weights(*shape: int, scale: float | None = None) -> np.ndarray:
        # numpy's (rows, cols) is GGUF's (ne1, ne0): a matrix mapping `cols` inputs to `rows`.
        std = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_pooling_type(gguf.PoolingType.MEAN)

    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD, scale=1.0))
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for part in ("q", "k", "v", "output"):
            w.add_tensor(f"{blk}.attn_{part}.weight", weights(N_EMBD, N_EMBD))
        w.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_gate.weight", weights(N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_up.weight", weights(N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_down.weight", weights(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    # Large logits for the characters, zero for the rest: printable text, no early end.
    output = weights(n_vocab, N_EMBD, scale=1.0)
    output[: 3 + 256] = 0.0
    w.add_tensor("output.weight", output)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a tiny random llama GGUF model.")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--seed", type=int, default=0, help="the weights' seed [default: 0]")
    p.add_argument("--context", type=int, default=N_CTX,
                   help=f"the context length it was 'trained' for [default: {N_CTX}]")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(args.out, args.seed, args.context)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.2f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

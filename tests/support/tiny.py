"""Tiny random-weight F32 GGUF models, written with the gguf package, for exact tests.

``write_model(path, arch, layer_map=...)`` writes the same weights with its layers physically
duplicated in the order of layer_map: the independent reference for a layer schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
MOE_ARCH = "qwen3moe"  # qwen3's attention, a mixture-of-experts FFN in every layer (softmax router, top-k, normalized)


@dataclass(frozen=True)
class Spec:
    arch: str
    n_layer: int = 6
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_ff: int = 96
    n_vocab: int = 288  # 3 control, 256 byte-fallback, 29 words
    n_ctx: int = 512
    eps: float = 1e-6
    rope_base: float = 10000.0
    rope_base_swa: float = 10000.0
    n_swa: int = 5  # gemma3: a window smaller than the test prompts
    swa_pattern: tuple[bool, ...] = (True, True, False, True, True, False)  # gemma3: 2 global layers of 6
    n_expert: int = 6  # qwen3moe
    n_expert_used: int = 2
    n_ff_exp: int = 32

    @property
    def neox(self) -> bool:
        return self.arch != "llama"


def make_weights(spec: Spec, seed: int = 0, f16: bool = False) -> dict[str, np.ndarray]:
    """Random weights, named as in GGUF, shaped as numpy (rows = output features); with f16, the matrices
    are float16, drawn in float32 (faster, another stream: for speed, not for the exact tests)."""
    rng = np.random.default_rng(seed)
    E, H, KV, D, F, V = spec.n_embd, spec.n_head, spec.n_head_kv, spec.head_dim, spec.n_ff, spec.n_vocab

    def mat(rows: int, cols: int) -> np.ndarray:
        if f16:
            m = rng.standard_normal((rows, cols), dtype=np.float32)
            m *= 1 / np.sqrt(cols)
            return m.astype(np.float16)
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {
        "token_embd.weight": (
            mat(V, E) * np.sqrt(E) if f16 else rng.standard_normal((V, E)) * (0.2 if spec.arch == "gemma3" else 1.0)
        ).astype(np.float16 if f16 else np.float32),
        "output_norm.weight": norm(E),
    }
    if spec.arch != "gemma3":
        w["output.weight"] = mat(V, E)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(E)
        w[p + "attn_q.weight"] = mat(H * D, E)
        w[p + "attn_k.weight"] = mat(KV * D, E)
        w[p + "attn_v.weight"] = mat(KV * D, E)
        w[p + "attn_output.weight"] = mat(E, H * D)
        w[p + "ffn_norm.weight"] = norm(E)
        if spec.arch == MOE_ARCH:
            X, FE = spec.n_expert, spec.n_ff_exp
            w[p + "ffn_gate_inp.weight"] = mat(X, E) * 4  # a router with clear preferences
            w[p + "ffn_gate_exps.weight"] = np.stack([mat(FE, E) for _ in range(X)])
            w[p + "ffn_up_exps.weight"] = np.stack([mat(FE, E) for _ in range(X)])
            w[p + "ffn_down_exps.weight"] = np.stack([mat(E, FE) for _ in range(X)])
        else:
            w[p + "ffn_gate.weight"] = mat(F, E)
            w[p + "ffn_up.weight"] = mat(F, E)
            w[p + "ffn_down.weight"] = mat(E, F)
        if spec.arch == "qwen2":
            for t, n in (("q", H * D), ("k", KV * D), ("v", KV * D)):
                w[p + f"attn_{t}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if spec.arch in ("qwen3", "gemma3", MOE_ARCH):
            w[p + "attn_q_norm.weight"] = norm(D)
            w[p + "attn_k_norm.weight"] = norm(D)
        if spec.arch == "gemma3":
            w[p + "post_attention_norm.weight"] = norm(E)
            w[p + "post_ffw_norm.weight"] = norm(E)
    return w


def layer_weights(weights: dict[str, np.ndarray], il: int) -> dict[str, np.ndarray]:
    """The tensors of layer il, keyed without the blk.N. prefix."""
    p = f"blk.{il}."
    return {k[len(p) :]: v for k, v in weights.items() if k.startswith(p)}


def write_model(
    path: str | Path,
    spec: Spec,
    weights: dict[str, np.ndarray],
    layer_map: list[int] | None = None,
    extra_kv: dict | None = None,
) -> Path:
    """Write the GGUF (F32, or F16 where make_weights made float16); layer_map lists the physical layer
    behind each written layer."""
    layer_map = list(range(spec.n_layer)) if layer_map is None else list(layer_map)
    arch = spec.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(len(layer_map))
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.eps)
    w.add_rope_freq_base(spec.rope_base)
    f16 = any(t.dtype == np.float16 for t in weights.values())
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    if arch == MOE_ARCH:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
        w.add_expert_feed_forward_length(spec.n_ff_exp)
    if arch == "gemma3":
        w.add_sliding_window(spec.n_swa)
        w.add_array(f"{arch}.attention.sliding_window_pattern", [bool(spec.swa_pattern[il]) for il in layer_map])
        w.add_float32(f"{arch}.rope.freq_base_swa", spec.rope_base_swa)
    # a tiny SentencePiece vocabulary with byte fallback, so any text tokenizes
    n_words = spec.n_vocab - 259
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"\u2581w{i}" for i in range(n_words)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n_words)])
    w.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * n_words
    )
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in weights.items():
        if not name.startswith("blk."):
            w.add_tensor(name, t)
    for v, il in enumerate(layer_map):
        for name, t in layer_weights(weights, il).items():
            w.add_tensor(f"blk.{v}.{name}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# a llama-shaped model of about 1.1B parameters (TinyLlama's shape), big enough to load a GPU
BIG = Spec("llama", n_layer=22, n_embd=2048, n_head=32, n_head_kv=4, head_dim=64, n_ff=5632, n_vocab=32000, n_ctx=2048)


def main() -> None:
    """python tests/support/tiny.py OUT.gguf [--layers N --embd N --ff N]: a random F16 llama (BIG by default)."""
    import argparse
    import dataclasses

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=BIG.n_layer)
    ap.add_argument("--embd", type=int, default=BIG.n_embd, help="a multiple of 64 (the head size)")
    ap.add_argument("--ff", type=int, default=BIG.n_ff)
    args = ap.parse_args()
    heads = args.embd // BIG.head_dim
    spec = dataclasses.replace(
        BIG, n_layer=args.layers, n_embd=args.embd, n_head=heads, n_head_kv=max(1, heads // 8), n_ff=args.ff
    )
    write_model(args.out, spec, make_weights(spec, seed=0, f16=True))
    print(args.out)


if __name__ == "__main__":
    main()

"""A plain numpy forward pass of the tiny test models, with layer schedules and every mix.

Written from the architectures' definitions and the mixing rules of docs/method.md, independently of the
C++ patch: the reference the patched backend is checked against.
"""

from __future__ import annotations

import numpy as np

from tiny import Spec, layer_weights

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def gelu_ggml(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU: tanh approximation looked up in an fp16 table."""
    x16 = x.astype(np.float16).astype(np.float32)
    y = 0.5 * x16 * (1.0 + np.tanh(np.float32(0.7978845608028654) * x16 * (1.0 + np.float32(0.044715) * x16 * x16)))
    y = y.astype(np.float16).astype(np.float32)
    return np.where(x <= -10, 0.0, np.where(x >= 10, x, y))


def rope(x: np.ndarray, pos: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """x: [tokens, heads, dim]; rotary embedding of every head."""
    d = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, d, 2) / d)  # [tokens, d/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def moe_ffn(spec: Spec, w: dict, h: np.ndarray, route: list | None) -> np.ndarray:
    """qwen3moe's FFN: softmax router, the top n_expert_used experts, their weights normalized to sum 1.

    ``route``: None, or a list that pass 0 fills with its (experts, weights) and later passes read (the
    MoE routing freeze): the experts then run on the current h with pass 0's choice and weights."""
    if route:
        experts, gates = route[0]
    else:
        logits = h @ w["ffn_gate_inp.weight"].T  # [tokens, n_expert]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        experts = np.argsort(-probs, axis=-1, kind="stable")[:, : spec.n_expert_used]
        gates = np.take_along_axis(probs, experts, axis=-1)
        gates = gates / gates.sum(-1, keepdims=True)
        if route is not None:
            route.append((experts, gates))
    out = np.zeros_like(h)
    for k in range(spec.n_expert_used):
        for e in np.unique(experts[:, k]):
            rows = experts[:, k] == e
            x = h[rows]
            gate, up = x @ w["ffn_gate_exps.weight"][e].T, x @ w["ffn_up_exps.weight"][e].T
            act = (gate / (1.0 + np.exp(-gate))) * up
            out[rows] += gates[rows, k : k + 1] * (act @ w["ffn_down_exps.weight"][e].T)
    return out


def _qkv(spec: Spec, w: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    T, H, KV, D = len(x), spec.n_head, spec.n_head_kv, spec.head_dim
    h = rms_norm(x, w["attn_norm.weight"], spec.eps)
    q, k, v = h @ w["attn_q.weight"].T, h @ w["attn_k.weight"].T, h @ w["attn_v.weight"].T
    if "attn_q.bias" in w:
        q, k, v = q + w["attn_q.bias"], k + w["attn_k.bias"], v + w["attn_v.bias"]
    q, k, v = q.reshape(T, H, D), k.reshape(T, KV, D), v.reshape(T, KV, D)
    if "attn_q_norm.weight" in w:
        q, k = rms_norm(q, w["attn_q_norm.weight"], spec.eps), rms_norm(k, w["attn_k_norm.weight"], spec.eps)
    return q, k, v


def layer(
    spec: Spec,
    w: dict,
    x: np.ndarray,
    pos: np.ndarray,
    swa: bool,
    route: list | None = None,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """One decoder layer of the architecture on the states x [tokens, n_embd] at positions pos; ``route``: see
    moe_ffn. ``keys``: the states [0..pos[-1]] whose K/V the layer attends to (its KV slot), else x itself."""
    H, KV, D = spec.n_head, spec.n_head_kv, spec.head_dim
    q = _qkv(spec, w, x)[0]
    keys = x if keys is None else keys
    kpos = pos if keys is x else np.arange(len(keys))
    _, k, v = _qkv(spec, w, keys)
    base = spec.rope_base_swa if swa else spec.rope_base
    q, k = rope(q, pos, base, spec.neox), rope(k, kpos, base, spec.neox)
    k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
    allowed = kpos[None, :] <= pos[:, None]
    if swa:
        allowed &= pos[:, None] - kpos[None, :] < spec.n_swa
    scores = np.where(allowed[None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    attn = np.einsum("hts,shd->thd", p, v).reshape(len(x), H * D) @ w["attn_output.weight"].T
    if spec.arch == "gemma3":
        attn = rms_norm(attn, w["post_attention_norm.weight"], spec.eps)
    x = x + attn
    h = rms_norm(x, w["ffn_norm.weight"], spec.eps)
    if "ffn_gate_inp.weight" in w:
        return x + moe_ffn(spec, w, h, route)
    gate, up = h @ w["ffn_gate.weight"].T, h @ w["ffn_up.weight"].T
    act = gelu_ggml(gate) if spec.arch == "gemma3" else gate / (1.0 + np.exp(-gate))
    ffn = (act * up) @ w["ffn_down.weight"].T
    if spec.arch == "gemma3":
        ffn = rms_norm(ffn, w["post_ffw_norm.weight"], spec.eps)
    return x + ffn


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & M64
        return x ^ (x >> np.uint64(31))


def noise_directions(seed: int, il: int, pos: np.ndarray, n_embd: int) -> np.ndarray:
    """The noise control's standard normal draws for virtual layer il, keyed by position."""
    h_layer = _splitmix64(_splitmix64(np.uint64(seed)) ^ np.uint64(il))
    h_token = _splitmix64(h_layer ^ pos.astype(np.uint32).astype(np.uint64))[:, None]
    d = np.arange(n_embd, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        r1 = _splitmix64((h_token + np.uint64(2) * d) & M64)
        r2 = _splitmix64((h_token + np.uint64(2) * d + np.uint64(1)) & M64)
    u1 = ((r1 >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    u2 = (r2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _norm(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(x * x, axis=-1, keepdims=True))


def paper_row(name: str, t: int, param: float) -> np.ndarray:
    """The paper code's effective weights at pass t: the softmax over tau = 0..t of its preset row."""
    preset = np.zeros(t + 1)
    if name == "paper-no":
        preset[t] = 1.0
    elif name == "paper-uniform":
        preset[:] = 1.0
    elif name == "paper-ema":
        preset[0], preset[t] = 1 - param, param
    e = np.exp(preset)
    return e / e.sum()


BLOCK_RULES = ("euler", "anchored", "inputanchor", "momentum")


def block_step(
    name: str, x0: np.ndarray, x: np.ndarray, g: np.ndarray, natural: np.ndarray, t: int, K: int, p, prev: np.ndarray
):
    """The block's next input after pass t (its output after the last pass), for a block rule; ``prev`` is the
    block's input at pass t - 1 (x0 at pass 0)."""
    if name == "euler":
        h = 1.0 / K if p is None else p
        return x + h * (g - x)
    if name == "anchored":
        h = x + (g - x) / K
        return p * natural + (1 - p) * h if t == K - 1 else h
    if name == "inputanchor":
        return p * g + (1 - p) * x0
    if name == "momentum":  # heavy ball: a damped Euler step plus mu times the last step taken
        return x + (g - x) / K + (p * (x - prev) if t else 0.0)
    raise ValueError(name)


def mix_passes(
    name: str,
    outs: list[np.ndarray],
    beta: float,
    temperature: float,
    noise: np.ndarray | None,
    param: float | None = None,
    row: np.ndarray | None = None,
) -> np.ndarray:
    """The state passed on after pass t = len(outs)-1, from the raw outputs C[0..t] of one block layer
    (``row``: the weights of a ``weights`` table at this layer and pass)."""
    t, ref, cur = len(outs) - 1, outs[0], outs[-1]
    if t == 0 or name == "none":
        return cur
    if name.startswith("paper-"):
        return np.einsum("p,ptd->td", paper_row(name, t, param), np.stack(outs))
    if name == "weights":
        return np.einsum("p,ptd->td", row[: t + 1], np.stack(outs))
    if name == "uniform":
        return np.mean(outs, axis=0)
    if name == "ema":
        return (1 - beta) * ref + beta * cur
    if name == "autoalign":
        cos = np.stack([np.sum(ref * c, -1) / (_norm(ref)[:, 0] * _norm(c)[:, 0]) for c in outs])  # [t+1, tokens]
        wts = np.exp((cos - cos.max(0)) / temperature)
        wts /= wts.sum(0)
        return np.einsum("pt,ptd->td", wts, np.stack(outs))
    if name == "noise":
        size = _norm(np.mean(outs, axis=0) - ref)
        return ref + noise / _norm(noise) * size
    raise ValueError(name)


def forward(
    spec: Spec,
    weights: dict,
    tokens: list[int],
    start: int = 0,
    end: int = 0,
    count: int = 1,
    mix: str = "none",
    beta: float = 0.5,
    temperature: float = 1.0,
    seed: int = 0,
    param: float | None = None,
    table: np.ndarray | None = None,
    generated: np.ndarray | None = None,
    moe: str = "free",
    kv: str = "exact",
    step: int | list[int] | None = None,
) -> np.ndarray:
    """Logits of every position for the plan (start, end, count) with the given mix.

    ``param``: a rule's parameter; ``table``: a weights table [m][K][K]; ``generated``: a mask of the
    positions decoded as generated tokens under decode bypass: they run pass 0 of the block only, and
    the K/V that they leave for pass t >= 1 are their pass-0 K/V, i.e. computed from their pass-0 input
    of that block layer (their rows of the later passes' inputs are replaced by it). ``moe``: "freeze"
    makes the later passes of a block layer route as its pass 0 did (moe_ffn).

    The tokens are evaluated ``step`` at a time, or in ubatches of the sizes listed (all at once by default).
    ``kv``: the KV mode. "exact": every pass has its own KV slot. "first" and "last": the passes of a block layer share
    one slot; the tokens of a ubatch attend among themselves to the K/V of their own pass, and to the K/V
    that pass 0 ("first") or the last pass ("last") left in the slot for the earlier ubatches' tokens."""
    n = len(tokens)
    sizes = step if isinstance(step, list) else [step or n] * -(-n // (step or n))
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] >= n, "the ubatches cover the tokens"
    emb = weights["token_embd.weight"][tokens].astype(np.float64)
    if spec.arch == "gemma3":
        emb = emb * np.sqrt(spec.n_embd)
    layers = [layer_weights(weights, il) for il in range(spec.n_layer)]
    swa = [spec.arch == "gemma3" and spec.swa_pattern[il] for il in range(spec.n_layer)]
    gen_all = np.zeros(n, bool) if generated is None else np.asarray(generated, bool)
    slots: dict[tuple[int, int], np.ndarray] = {}  # (layer, pass) -> the states whose K/V the slot holds
    m = end - start
    out = []
    for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True):
        rows = slice(int(c0), min(n, int(c1)))
        pos, x, gen = np.arange(n)[rows], emb[rows], gen_all[rows]

        def run(il: int, x: np.ndarray, t: int = 0, route: list | None = None, rows=rows, pos=pos) -> np.ndarray:
            slot = slots.setdefault((il, t if kv == "exact" else 0), np.zeros((n, x.shape[1])))
            slot[rows] = x  # this ubatch's K/V, of this pass
            return layer(spec, layers[il], x, pos, swa[il], route, slot[: rows.stop])

        for il in range(start):
            x = run(il, x)
        if m > 0:
            outs: list[list[np.ndarray]] = [[] for _ in range(m)]
            inputs0: list[np.ndarray] = []  # the pass-0 input of each block layer
            routes: list[list | None] = [[] if moe == "freeze" else None for _ in range(m)]
            x0 = x_in = x_prev = x
            for t in range(count):
                for j in range(m):
                    il = start + j
                    if t == 0:
                        inputs0.append(x)
                    x = np.where(gen[:, None], inputs0[j], x)  # generated tokens: pass-0 inputs (and K/V)
                    outs[j].append(run(il, x, t, routes[j]))
                    if mix in BLOCK_RULES:
                        x = outs[j][-1]
                        if j == m - 1:
                            x = block_step(mix, x0, x_in, x, outs[m - 1][0], t, count, param, x_prev)
                            x_prev, x_in = x_in, x
                        continue
                    virtual = start + t * m + j
                    noise = noise_directions(seed, virtual, pos, spec.n_embd) if mix == "noise" and t else None
                    row = table[j][t] if table is not None else None
                    x = mix_passes(mix, outs[j], beta, temperature, noise, param, row)
            x = np.where(gen[:, None], outs[m - 1][0], x)  # generated tokens leave the block after pass 0
            if kv == "first":
                for j in range(m):
                    slots[(start + j, 0)][rows] = inputs0[j]  # the slot keeps pass 0's K/V
        for il in range(max(end, start), spec.n_layer):
            x = run(il, x)
        x = rms_norm(x, weights["output_norm.weight"], spec.eps)
        head = weights.get("output.weight", weights["token_embd.weight"])
        out.append(x @ head.T)
    return np.concatenate(out)

"""Tracr-compiled programs as wrapperlab ``Transformer`` s (paper App. B.1, Alg. 1–2).

A compiler as a short pipeline of named stages, each testable alone:

1. ``compile_program(spec)``  RASP program -> tracr's assembled JAX model            (needs ``wrapperlab[tracr]``)
2. ``convert(assembled)``     -> ``CompiledModel``: ModelConfig + torch state dict + ``TracrMeta``  (needs JAX)
3. ``save`` / ``load``        safetensors + JSON (checksummed; never unpickled)       (no JAX)
4. ``CompiledModel.build()``  -> ``Transformer`` that every training stage and analysis uses unchanged (no JAX)
5. ``check_port(spec, n)``    the port and tracr's own JAX model on ``n`` random inputs, position by position

The port maps tracr's parameters one to one: ``token_embed`` -> ``tok_emb``; ``pos_embed`` (max_seq_len + 1 rows;
row 0, the BOS position, is all zero) -> ``pos_emb``; per layer ``attn/{query,key,value}`` -> the fused ``qkv``
(head-major, as tracr lays them out), ``attn/linear`` -> ``attn.proj``, ``mlp/linear_1|2`` -> ``mlp.fc|proj``;
biases kept. No LayerNorm, ReLU, attention logits scaled by 1/sqrt(key_size) with ``d_head = key_size``,
non-causal unless compiled causal (tracr masks no padding, and neither do we). The unembedding is not among
tracr's params: it is recovered by passing the identity matrix through tracr's own unembed module and becomes
``head`` (``d_vocab_out`` = size of the program's output space; 1 for a numerical output, whose value is
``logits[..., 0]``). Token ids are tracr's input-encoder ids; output class ids are its output-encoder ids.

Positions: tracr prepends BOS at position 0 and gives the token at position p >= 1 the RASP index p - 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save as st_save

from wrapperlab.fileio import IntegrityError, read_verified_tensors
from wrapperlab.models.registry import ModelFamily, register
from wrapperlab.models.transformer import ModelConfig, Transformer, gpt_components
from wrapperlab.tasks.tracr_programs import (  # noqa: F401  (re-exported: the program files' format lives there)
    BOS,
    FORMAT,
    PAD,
    SHIPPED,
    TracrError,
    TracrMeta,
    _jsonable,
    read_program,
    shipped_dir,
)


def require_tracr() -> None:
    try:
        import haiku  # noqa: F401
        import jax  # noqa: F401
        import tracr  # noqa: F401
    except ImportError as e:
        raise TracrError(f"this needs the tracr extra ({e.name} is not installed): "
                         f"pip install 'wrapperlab[tracr]'") from None


# ============================================================================ programs
@dataclass(frozen=True)
class ProgramSpec:
    """A RASP program with the settings it is compiled with and a generator of valid random inputs.

    ``build`` returns the RASP SOp (it imports tracr lazily); ``sample(rng, length)`` returns one input (without
    BOS) of the given length; lengths are drawn uniformly from ``lengths``."""

    name: str
    build: Callable[[], Any]
    vocab: tuple
    max_seq_len: int
    lengths: tuple[int, int]
    causal: bool = False
    sample: Callable[[np.random.Generator, int], list] | None = None
    note: str = ""
    mlp_exactness: int = 100

    def draw(self, rng: np.random.Generator) -> list:
        n = int(rng.integers(self.lengths[0], self.lengths[1] + 1))
        if self.sample is not None:
            return self.sample(rng, n)
        return [self.vocab[i] for i in rng.integers(0, len(self.vocab), size=n)]


def _rasp():
    require_tracr()
    from tracr.compiler import lib
    from tracr.rasp import rasp
    return rasp, lib


def counter_program(operand: str = "a"):
    """Alg. 1 of the paper (App. B.1), compiled to count ``operand``."""
    rasp, _ = _rasp()
    is_op = (rasp.tokens == operand).named("bin")
    bin_idx = rasp.Select(is_op, rasp.indices, rasp.Comparison.EQ).named("bin_idx")
    count = rasp.SelectorWidth(bin_idx).named(f"count_{operand}")
    idx_sel = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.EQ).named("idx_sel")
    return rasp.Aggregate(idx_sel, count).named("counter")


def max_identifier_program(rank: int = 5):
    """Alg. 2 of the paper (App. B.1): the ``rank``-th "largest" token, where a > b > c > ... (so the rank-th
    alphabetically smallest)."""
    rasp, _ = _rasp()
    var_small = rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.LT).named("var_small")
    sum_small = rasp.SelectorWidth(var_small).named("sum_small")
    bin_target = (sum_small == rank - 1).named("bin_target")
    select_idx = rasp.Select(bin_target, rasp.indices, rasp.Comparison.EQ).named("select_idx")
    return rasp.Aggregate(select_idx, rasp.tokens).named("max_identifier")


def _distinct(vocab: tuple) -> Callable[[np.random.Generator, int], list]:
    return lambda rng, n: [vocab[i] for i in rng.choice(len(vocab), size=n, replace=False)]


LETTERS9 = tuple("abcdefghi")
LETTERS26 = tuple("abcdefghijklmnopqrstuvwxyz")
COUNTER_LEN = 44  # letters per Counter input; + BOS = the 45 positions of the paper's attention maps
MAXID_LEN = 10  # 10 distinct letters (paper App. B.1, Fig. 13)


def _lib(fn_name: str, *args, **kw):
    def build():
        rasp, lib = _rasp()
        resolved = [a(rasp) if callable(a) else a for a in args]
        return getattr(lib, fn_name)(*resolved, **kw)
    return build


def _toks(rasp):
    return rasp.tokens


def _program_registry() -> dict[str, ProgramSpec]:
    """The paper's two programs plus every program of tracr's ``compiler/lib.py``, with the small settings of
    tracr's own ``test_cases.py``. Programs whose docstring requires unique keys get distinct-token inputs."""
    abcd, paren = tuple("abcd"), tuple("abc()")
    nums = (1, 2, 3, 4)
    specs = [
        ProgramSpec("counter", lambda: counter_program("a"), LETTERS9, COUNTER_LEN, (COUNTER_LEN, COUNTER_LEN),
                    mlp_exactness=1000,
                    note="paper Alg. 1: count 'a'; 44 letters a-i drawn with replacement; mlp_exactness 1000 "
                         "(at tracr's default 100 counts >= 10 come out one too low: 98.2 % on this task)"),
        ProgramSpec("max-identifier", lambda: max_identifier_program(5), LETTERS26, MAXID_LEN,
                    (MAXID_LEN, MAXID_LEN), sample=_distinct(LETTERS26),
                    note="paper Alg. 2: 5th largest of 10 distinct letters from 26"),
        ProgramSpec("length", _lib("make_length"), abcd, 5, (1, 5)),
        ProgramSpec("reverse", _lib("make_reverse", _toks), abcd, 5, (1, 5)),
        ProgramSpec("pair_balance", _lib("make_pair_balance", _toks, "(", ")"), paren, 10, (1, 10)),
        ProgramSpec("shuffle_dyck", _lib("make_shuffle_dyck", ["()", "{}", "[]"]), tuple("(){}[]"), 6, (1, 6)),
        ProgramSpec("shuffle_dyck2", _lib("make_shuffle_dyck2"), tuple("(){}"), 5, (1, 5)),
        ProgramSpec("hist", _lib("make_hist"), abcd, 5, (1, 5)),
        ProgramSpec("sort_unique", _lib("make_sort_unique", _toks, _toks), nums, 5, (1, 4), sample=_distinct(nums),
                    note="keys must be unique (lib docstring)"),
        ProgramSpec("sort", _lib("make_sort", _toks, _toks, max_seq_len=5, min_key=1), nums, 5, (1, 5)),
        ProgramSpec("sort_freq", _lib("make_sort_freq", 5), nums, 5, (1, 5)),
        ProgramSpec("frac_prevs", lambda: _rasp()[1].make_frac_prevs(_rasp()[0].tokens == "("), paren, 10, (1, 10)),
        ProgramSpec("frac_prevs_causal", lambda: _rasp()[1].make_frac_prevs(_rasp()[0].tokens == "("), paren, 10,
                    (1, 10), causal=True),
        ProgramSpec("shift_by", lambda: _rasp()[1].shift_by(2, _rasp()[0].tokens), abcd, 5, (1, 5)),
        ProgramSpec("detect_pattern", _lib("detect_pattern", _toks, "abc"), abcd, 5, (1, 5)),
        ProgramSpec("count_less_freq", _lib("make_count_less_freq", 2), abcd, 6, (1, 6)),
        ProgramSpec("count", _lib("make_count", _toks, "a"), tuple("abc"), 8, (1, 8)),
        ProgramSpec("nary_sequencemap", lambda: _rasp()[1].make_nary_sequencemap(
            lambda x, y, z: x + y - z, _rasp()[0].tokens, _rasp()[0].tokens, _rasp()[0].indices), nums, 5, (1, 5)),
    ]
    return {s.name: s for s in specs}


PROGRAMS = _program_registry()


def get_program(name: str) -> ProgramSpec:
    if name not in PROGRAMS:
        raise TracrError(f"unknown program {name!r}; choose from {', '.join(PROGRAMS)}")
    return PROGRAMS[name]


# ============================================================================ compile + convert
def compile_program(spec: ProgramSpec, mlp_exactness: int | None = None):
    """Stage 1: tracr's ``compile_rasp_to_model`` with wrapperlab's BOS/PAD names."""
    require_tracr()
    import itertools

    from tracr.compiler import compiling
    from tracr.rasp import rasp

    # RASP labels are name_<global counter>, and labels order the residual basis: restart the counter (above the
    # ids of expressions tracr's lib builds at import) so a compile does not depend on what ran before it.
    rasp.RASPExpr._ids = itertools.count(10_000)
    return compiling.compile_rasp_to_model(spec.build(), vocab=set(spec.vocab), max_seq_len=spec.max_seq_len,
                                           causal=spec.causal, compiler_bos=BOS, compiler_pad=PAD,
                                           mlp_exactness=mlp_exactness or spec.mlp_exactness)


class TracrModelConfig(ModelConfig):
    """The shape of a compiled program: ``Transformer``'s config, family ``tracr``."""

    family: Literal["tracr"] = "tracr"  # type: ignore[assignment]


@dataclass
class CompiledModel:
    config: TracrModelConfig
    state: dict[str, torch.Tensor]
    meta: TracrMeta

    def build(self) -> Transformer:
        model = Transformer(self.config)
        own = model.state_dict()
        bad = sorted(set(own) ^ set(self.state)) or [k for k in own if own[k].shape != self.state[k].shape]
        if bad:
            raise TracrError(f"tracr program {self.meta.program}: weights do not fit the model ({bad[0]!r})")
        model.load_state_dict({k: v.clone() for k, v in self.state.items()})
        return model.eval()


def _unembed_matrix(assembled) -> np.ndarray:
    import haiku as hk
    import jax.numpy as jnp

    d = assembled.params["token_embed"]["embeddings"].shape[1]

    @hk.without_apply_rng
    @hk.transform
    def unembed(x):
        return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

    out = np.asarray(unembed.apply(assembled.params, jnp.eye(d)), dtype=np.float32)
    return out.reshape(d, -1)  # numerical outputs come back squeezed to (d,)


def convert(assembled, program: str, compiler: dict | None = None) -> CompiledModel:
    """Stage 2: tracr params -> wrapperlab state dict (see the module docstring for the mapping)."""
    p = {k: {n: np.asarray(v, dtype=np.float32) for n, v in d.items()} for k, d in assembled.params.items()}
    mc = assembled.model_config
    tok, pos = p["token_embed"]["embeddings"], p["pos_embed"]["embeddings"]
    d_model = tok.shape[1]
    unembed = _unembed_matrix(assembled)
    cfg = TracrModelConfig(vocab_size=tok.shape[0], seq_len=pos.shape[0], d_model=d_model, n_layer=mc.num_layers,
                      n_head=mc.num_heads, d_head=mc.key_size, d_mlp=mc.mlp_hidden_size, norm="none", act="relu",
                      causal=bool(mc.causal), bias=True, d_vocab_out=unembed.shape[1])
    t = torch.from_numpy
    state = {"tok_emb.weight": t(tok.copy()), "pos_emb.weight": t(pos.copy()), "head.weight": t(unembed.T.copy())}
    for layer in range(mc.num_layers):
        pre = f"transformer/layer_{layer}"
        q, k, v = (p[f"{pre}/attn/{n}"] for n in ("query", "key", "value"))
        lin, f1, f2 = p[f"{pre}/attn/linear"], p[f"{pre}/mlp/linear_1"], p[f"{pre}/mlp/linear_2"]
        b = f"blocks.{layer}"
        state[f"{b}.attn.qkv.weight"] = t(np.concatenate([q["w"], k["w"], v["w"]], axis=1).T.copy())
        state[f"{b}.attn.qkv.bias"] = t(np.concatenate([q["b"], k["b"], v["b"]]))
        state[f"{b}.attn.proj.weight"] = t(lin["w"].T.copy())
        state[f"{b}.attn.proj.bias"] = t(lin["b"].copy())
        state[f"{b}.mlp.fc.weight"] = t(f1["w"].T.copy())
        state[f"{b}.mlp.fc.bias"] = t(f1["b"].copy())
        state[f"{b}.mlp.proj.weight"] = t(f2["w"].T.copy())
        state[f"{b}.mlp.proj.bias"] = t(f2["b"].copy())
    enc = assembled.input_encoder.encoding_map
    input_vocab = [None] * len(enc)
    for value, i in enc.items():
        input_vocab[i] = _jsonable(value)
    out_enc = getattr(assembled.output_encoder, "encoding_map", None)
    output_vocab = None
    if out_enc is not None:
        output_vocab = [None] * len(out_enc)
        for value, i in out_enc.items():
            output_vocab[i] = _jsonable(value)
    import tracr
    meta = TracrMeta(program=program, input_vocab=input_vocab, output_vocab=output_vocab,
                     max_seq_len=pos.shape[0] - 1, causal=bool(mc.causal),
                     residual_labels=list(assembled.residual_labels),
                     compiler={**(compiler or {}), "tracr": getattr(tracr, "__version__", "tracr-pypi 1.0.0")})
    return CompiledModel(cfg, state, meta)


@torch.no_grad()
def balance(model: Transformer) -> Transformer:
    """Rescale the compiled weights without changing the function (in place; returns the model).

    Tracr writes large constants (attention coldness and ``mlp_exactness``, e.g. 100 or 1000) into one factor of
    each product and 1 into the other, so hidden activations reach ~1000 and N(0, 1e-3) noise on the small factor
    destroys the program. Each product is rebalanced so both factors have the same norm, using exact symmetries:
    ReLU is positively homogeneous (hidden unit i: ``fc`` row and bias / s, ``proj`` column * s), and for every head
    dimension j the score q_j k_j and the output v_j proj_j are unchanged by q_j / s, k_j * s (v_j / s, proj_j * s).
    """
    for block in model.blocks:
        _balance_pair(block.mlp.fc.weight, block.mlp.fc.bias, block.mlp.proj.weight, None)
        inner = block.attn.proj.weight.shape[1]
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        q, k, v = (slice(i * inner, (i + 1) * inner) for i in range(3))
        _balance_pair(w[q], b[q], w[k].T, b[k])
        _balance_pair(w[v], b[v], block.attn.proj.weight, None)
    return model


def _balance_pair(a_w: torch.Tensor, a_b: torch.Tensor | None, c_w: torch.Tensor, c_b: torch.Tensor | None) -> None:
    """Unit i is row i of ``a_w`` (+ ``a_b[i]``) and column i of ``c_w`` (+ ``c_b[i]``); scale them to equal norm."""
    na = a_w.pow(2).sum(1) + (a_b.pow(2) if a_b is not None else 0)
    nc = c_w.pow(2).sum(0) + (c_b.pow(2) if c_b is not None else 0)
    live = (na > 0) & (nc > 0)
    s = torch.where(live, (na / nc.clamp_min(1e-30)).pow(0.25), torch.ones_like(na))
    a_w.div_(s[:, None])
    if a_b is not None:
        a_b.div_(s)
    c_w.mul_(s[None, :])
    if c_b is not None:
        c_b.mul_(s)


def compile_and_convert(name: str, mlp_exactness: int | None = None) -> tuple[CompiledModel, Any]:
    spec = get_program(name)
    mlp_exactness = mlp_exactness or spec.mlp_exactness
    assembled = compile_program(spec, mlp_exactness)
    compiler = {"vocab": sorted(_jsonable(v) for v in spec.vocab), "max_seq_len": spec.max_seq_len,
                "causal": spec.causal, "mlp_exactness": mlp_exactness}
    return convert(assembled, name, compiler), assembled


# ============================================================================ files
def _stem(name: str) -> str:
    return name.replace("-", "_")


def save(cm: CompiledModel, directory: str | Path) -> Path:
    """Stage 3: ``<dir>/<name>.safetensors`` + ``<dir>/<name>.json`` (the JSON records the tensor file's SHA-256).
    Both are written atomically, tensors first."""
    from wrapperlab.fileio import atomic_write_bytes, atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = st_save({k: v.contiguous() for k, v in sorted(cm.state.items())})
    stem = _stem(cm.meta.program)
    atomic_write_bytes(directory / f"{stem}.safetensors", data)
    doc = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "model": cm.config.model_dump(mode="json"),
           "meta": cm.meta.__dict__}
    atomic_write_text(directory / f"{stem}.json", json.dumps(doc, indent=1) + "\n")
    return directory / f"{stem}.json"


def load(name_or_path: str | Path) -> CompiledModel:
    """A shipped program by name (``counter``, ``max-identifier``) or a ``.json`` written by ``save``."""
    p, doc = read_program(name_or_path)
    try:
        state = read_verified_tensors(p.with_suffix(".safetensors"), doc.get("sha256"))
    except IntegrityError as e:
        raise TracrError(str(e)) from None
    try:
        cfg = TracrModelConfig.model_validate({**doc["model"], "family": "tracr"})
        meta = TracrMeta(**doc["meta"])
    except Exception as e:  # pydantic and dataclass construction raise their own types
        raise TracrError(f"{p}: unreadable compiled model ({e.__class__.__name__})") from None
    return CompiledModel(cfg, state, meta)


# ============================================================================ check
@dataclass
class CheckResult:
    program: str
    n: int
    categorical: bool
    mismatches: list[dict]
    max_abs_diff: float  # largest |tracr - port| over the output scores (numerical: the values)
    positions: int  # compared (input, position) pairs
    ties: int = 0  # categorical positions where tracr's own top scores tie (RASP output undefined there)

    @property
    def ok(self) -> bool:
        return not self.mismatches


@torch.no_grad()
def port_scores(model: Transformer, ids: np.ndarray) -> np.ndarray:
    """Output scores of the port, (b, t, d_vocab_out), for equal-length encoded inputs (BOS included).
    Categorical output = argmax; numerical output = ``[..., 0]``."""
    return model(torch.from_numpy(ids)).numpy()


def check_port(name: str, n: int = 1000, seed: int = 0, tol: float = 1e-5, cm: CompiledModel | None = None,
               assembled=None) -> CheckResult:
    """Run the port and tracr's JAX model on ``n`` random valid inputs and compare every position after BOS.

    Numerical output: |tracr - port| <= ``tol``. Categorical output: the same class. Where tracr's own output
    scores tie (top two within ``tol``: an Aggregate over several selected positions, whose RASP value is
    undefined, e.g. Max-identifier at index 0), the port must pick one of the tied classes; such positions are
    counted in ``ties``."""
    require_tracr()
    import jax

    spec = get_program(name)
    if cm is None or assembled is None:
        cm, assembled = compile_and_convert(name)
    model = cm.build()
    unembed = cm.state["head.weight"].numpy().T
    rng = np.random.default_rng(seed)
    inputs = [spec.draw(rng) for _ in range(n)]
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        by_len.setdefault(len(x), []).append(i)
    fwd = jax.jit(assembled.forward)
    mismatches, max_diff, positions, ties = [], 0.0, 0, 0
    for _length, idx in sorted(by_len.items()):
        ids = np.array([cm.meta.encode(inputs[i]) for i in idx], dtype=np.int64)
        out = fwd(assembled.params, ids)
        ref = np.asarray(out.transformer_output.output, dtype=np.float64) @ unembed  # tracr's scores
        ref_dec = np.asarray(out.unembedded_output)
        ours = port_scores(model, ids).astype(np.float64)
        ref, ref_dec, ours = ref[:, 1:], ref_dec[:, 1:], ours[:, 1:]  # position 0 is BOS (tracr overwrites it)
        positions += ref_dec.size
        max_diff = max(max_diff, float(np.abs(ref - ours).max()))
        if cm.meta.categorical:
            pick = ours.argmax(-1)
            top = ref.max(-1, keepdims=True)
            tied = (ref >= top - tol).sum(-1) > 1
            ties += int(tied.sum())
            in_set = np.take_along_axis(ref, pick[..., None], -1)[..., 0] >= top[..., 0] - tol
            bad = np.argwhere(np.where(tied, ~in_set, pick != ref_dec))
            got = pick
        else:
            got = ours[..., 0]
            bad = np.argwhere(np.abs(ref_dec - got) > tol)
        for r, c in bad[:20]:
            mismatches.append({"input": [_jsonable(v) for v in inputs[idx[r]]], "position": int(c) + 1,
                               "tracr": _decode(cm.meta, ref_dec[r, c]), "port": _decode(cm.meta, got[r, c])})
    return CheckResult(name, n, cm.meta.categorical, mismatches, max_diff, positions, ties)


def _decode(meta: TracrMeta, v) -> Any:
    return meta.output_vocab[int(v)] if meta.categorical else float(v)


def diff_compiled(a: CompiledModel, b: CompiledModel) -> list[str]:
    """Differences between two compiled models (empty = identical tensors, config and meta)."""
    out = []
    if a.config != b.config:
        out.append("model config differs")
    am, bm = dict(a.meta.__dict__), dict(b.meta.__dict__)
    am["compiler"] = {k: v for k, v in am["compiler"].items() if k != "tracr"}
    bm["compiler"] = {k: v for k, v in bm["compiler"].items() if k != "tracr"}
    for k in am:
        if am[k] != bm.get(k):
            out.append(f"meta.{k} differs")
    for k in sorted(set(a.state) | set(b.state)):
        if k not in a.state or k not in b.state:
            out.append(f"tensor {k} present in only one")
        elif a.state[k].shape != b.state[k].shape or not torch.equal(a.state[k], b.state[k]):
            out.append(f"tensor {k} differs")
    return out


@torch.no_grad()
def compiled_start(task_cfg, seed: int) -> Transformer:
    """The compiled program as the starting point of a fine-tune (paper App. C.1): tracr's weights,
    function-preservingly rebalanced (``task.balance``), plus N(0, init_noise²) on every weight (seeded)."""
    model = load(task_cfg.program).build().train()
    if task_cfg.balance:
        balance(model)
    if task_cfg.init_noise > 0:
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * task_cfg.init_noise)
    return model


FAMILY = register(ModelFamily(
    "tracr", TracrModelConfig, lambda cfg, vocab, seq: Transformer(cfg), gpt_components,
    "a compiled RASP program ported to Transformer (no LayerNorm, ReLU, non-causal)", default_for_tasks=("tracr",),
    shape_from_task=lambda task_cfg: load(task_cfg.program).config, pretrained=compiled_start))

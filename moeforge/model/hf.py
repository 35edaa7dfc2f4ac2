"""Hugging Face DeepSeek-V3 interop: tensor names, config.json, export and import.

Choices:
- One name table, our name -> HF name (:func:`hf_name`); the reverse direction is derived
  from it over the keys a model of the given config has, so the two directions cannot
  drift apart. The expected keys and shapes come from building the model on the meta
  device (no memory), which is also what shape checks compare against.
- Routed experts are stacked here (``experts.w1`` [E, inter, dim]) and per-expert on
  disk (``mlp.experts.{j}.gate_proj.weight``, what ``save_pretrained`` writes in 5.x and
  what the released V3 checkpoint has). Import also takes transformers' in-memory fused
  layout (``experts.gate_up_proj`` [E, 2*inter, dim], gate rows first; ``experts.down_proj``).
- MTP module k is the extra layer ``model.layers.{n_layers + k}`` with ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` and, as in the released checkpoint, copies
  of the embedding and head (``embed_tokens``, ``shared_head.head``) that import ignores
  because ours are shared. transformers builds no MTP layer and skips those keys. A
  checkpoint without the MTP layer (transformers' own saves) imports with mtp_depth 0.
- config.json carries both spellings of the rotary settings: ``rope_parameters``
  (transformers 5.x) and ``rope_theta`` + ``rope_scaling`` (4.x, vLLM, the original V3
  file). YaRN's softmax correction maps to ``mscale == mscale_all_dim`` (then HF's cos/sin
  factor is 1 and its softmax factor equals ours); other combinations are refused on import.
  Fields HF has no place for (mtp_lambda, balancing speeds, YaRN settings while YaRN is
  off) ride along under a ``"moeforge"`` key so a round trip returns the same ModelConfig.
- Import dequantizes FP8 checkpoints: ``float8_e4m3fn`` weights times their FP32
  ``weight_scale_inv`` per 128x128 block (multiplied despite the name; edge blocks are
  partial), using :mod:`moeforge.fp8.quant`. A ``rope_interleave: false`` checkpoint gets
  its rope rows permuted into our adjacent-pair layout.
- Files are streamed: export plans shards from shapes, then materialises one shard at a
  time (per-expert slices are read with ``get_slice``); import reads tensor by tensor.
- ``moeforge export`` also takes a sharded (DCP) checkpoint directory written under any
  layout (FSDP, TP, EP shards): ``train.distributed.read_model`` assembles the full
  tensors in one process (no process group) and they are exported as a state dict.
  That holds the whole model in memory once, unlike the streamed safetensors path.
- Every problem with a file is a :class:`UserError` with one line naming tensor and file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeforge.config import ModelConfig
from moeforge.errors import ConfigError, UserError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
# fields without an HF counterpart, carried under "moeforge" in config.json
_EXTRA = ("mtp_lambda", "bias_update_speed", "seq_aux_alpha", "original_seq_len", "beta_fast", "beta_slow", "mscale")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- names
def _block_name(rest: str) -> str:
    parts = rest.split(".")
    if rest == "attn_norm.weight":
        return "input_layernorm.weight"
    if rest == "ffn_norm.weight":
        return "post_attention_layernorm.weight"
    if parts[0] == "attn":
        return f"self_attn.{_ATTN[parts[1]]}.weight"
    if rest == "ffn.gate.weight":
        return "mlp.gate.weight"
    if rest == "ffn.gate.bias":
        return "mlp.gate.e_score_correction_bias"
    if parts[1] == "experts":  # stacked: one HF tensor per expert
        return f"mlp.experts.{{j}}.{_MLP[parts[2]]}.weight"
    if parts[1] == "shared_experts":
        return f"mlp.shared_experts.{_MLP[parts[2]]}.weight"
    return f"mlp.{_MLP[parts[1]]}.weight"  # dense SwiGLU layer


def hf_name(key: str, n_layers: int) -> str:
    """HF name of one of our state-dict keys; stacked expert keys give a ``{j}`` template."""
    if key in _TOP:
        return _TOP[key]
    kind, idx, rest = key.split(".", 2)
    if kind == "layers":
        return f"model.layers.{idx}.{_block_name(rest)}"
    prefix = f"model.layers.{n_layers + int(idx)}."
    return prefix + (_MTP[rest] if rest in _MTP else _block_name(rest.removeprefix("block.")))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Our state-dict keys (parameters and the persistent balancing bias) with shape and dtype."""
    from moeforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- config.json
def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for ``DeepseekV3ForCausalLM`` describing ``cfg``."""
    if cfg.attn_type != "mla":
        raise UserError(f"model.attn_type={cfg.attn_type!r}: the HF DeepSeek-V3 layout has MLA attention only")
    if cfg.score_func != "sigmoid" and cfg.n_dense_layers < cfg.n_layers:
        raise UserError(f"model.score_func={cfg.score_func!r}: the HF DeepSeek-V3 router is sigmoid only")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1.0:
        rope.update(rope_type="yarn", factor=cfg.rope_factor, original_max_position_embeddings=cfg.original_seq_len,
                    beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale, mscale_all_dim=cfg.mscale)
    legacy = None if cfg.rope_factor <= 1.0 else {k: v for k, v in rope.items() if k != "rope_theta"} | {"type": "yarn"}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups, "routed_scaling_factor": cfg.route_scale, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": cfg.mtp_depth,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "hidden_act": "silu", "attention_bias": False,
        "rope_interleave": True, "tie_word_embeddings": False,
        "rope_parameters": rope, "rope_theta": cfg.rope_theta, "rope_scaling": legacy,
        "dtype": str(dtype).removeprefix("torch."),
        "moeforge": {k: getattr(cfg, k) for k in _EXTRA},
    }


def model_config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF DeepSeek-V3 config.json dict (UserError naming the field)."""
    def bad(field: str, why: str) -> UserError:
        return UserError(f"{where}: {field} {why}")

    if d.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise bad("model_type", f"is {d.get('model_type')!r}; only deepseek_v3 can be imported")
    for field, want in (("hidden_act", "silu"), ("norm_topk_prob", True), ("attention_bias", False),
                        ("scoring_func", "sigmoid"), ("tie_word_embeddings", False), ("moe_layer_freq", 1)):
        if d.get(field, want) != want:
            raise bad(field, f"is {d[field]!r}; moeforge's DeepSeek-V3 model needs {want!r}")
    try:
        kw = {k: v for k, v in (d.get("moeforge") or {}).items() if k in _EXTRA}
        kw.update(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], inter_dim=d["intermediate_size"],
            moe_inter_dim=d["moe_intermediate_size"], n_layers=d["num_hidden_layers"],
            n_dense_layers=d.get("first_k_dense_replace", 0), n_heads=d["num_attention_heads"], attn_type="mla",
            q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"], n_routed_experts=d["n_routed_experts"],
            n_shared_experts=d.get("n_shared_experts") or 0, n_activated_experts=d["num_experts_per_tok"],
            n_expert_groups=d.get("n_group") or 1, n_limited_groups=d.get("topk_group") or 1,
            score_func="sigmoid", route_scale=float(d.get("routed_scaling_factor", 1.0)),
            mtp_depth=d.get("num_nextn_predict_layers", 0), max_seq_len=d["max_position_embeddings"],
            norm_eps=d.get("rms_norm_eps", 1e-6), init_std=d.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise bad(e.args[0], "is missing") from None
    # 4.x and the original V3 file put YaRN under rope_scaling; 5.x prefers that key too when both exist
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        factor = rope.get("factor") or kw["max_seq_len"] / rope["original_max_position_embeddings"]
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        # HF scales cos/sin by get_mscale(f, mscale)/get_mscale(f, mscale_all_dim) and the softmax by
        # get_mscale(f, mscale_all_dim)^2; we have only the latter, so the former must be exactly 1.
        if not m or m != m_all or rope.get("attention_factor") not in (None, 1.0) or not rope.get("truncate", True):
            raise bad("rope_scaling", f"{rope} is a YaRN variant moeforge does not implement "
                      "(needs mscale == mscale_all_dim, no attention_factor, truncate true)")
        kw.update(rope_factor=float(factor), mscale=float(m_all),
                  original_seq_len=rope.get("original_max_position_embeddings", kw["max_seq_len"]),
                  beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1))
    elif kind != "default":
        raise bad("rope_parameters.rope_type", f"is {kind!r}; only default and yarn are supported")
    try:
        cfg = ModelConfig(**kw)
        cfg.validate()
    except (ConfigError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


# ----------------------------------------------------------------------------- reading tensors
class _Tensors:
    """Named tensors from safetensors files (lazily) or a dict, with where each one lives."""

    def __init__(self, files: dict[str, Path] | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                 label: str = "<state dict>"):
        self._files, self._dict, self._label = files or {}, tensors, label
        self._keys = set(tensors.keys() if tensors is not None else self._files)  # asked per tensor: keep one set
        self._open: dict[Path, object] = {}

    @classmethod
    def from_path(cls, path: str | Path) -> "_Tensors":
        p = Path(path)
        if p.is_file():
            files = [p]
        elif (p / INDEX).is_file():
            try:
                index = json.loads((p / INDEX).read_text())
                return cls({k: p / f for k, f in index["weight_map"].items()}, label=str(p))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{p / INDEX}: not a safetensors index ({type(e).__name__}: {e})") from None
        else:
            files = sorted(p.glob("*.safetensors"))
        if not files:
            raise UserError(f"{p}: no safetensors weights found")
        out = {}
        for f in files:
            try:  # a pickle (.bin/.pt) renamed to .safetensors is refused here, never unpickled
                with safe_open(f, "pt") as h:
                    out.update({k: f for k in h.keys()})
            except Exception as e:  # SafetensorError, OSError
                raise UserError(f"{f}: cannot read safetensors ({e})") from None
        return cls(out, label=str(p))

    def keys(self) -> set[str]:
        return self._keys

    def where(self, key: str) -> str:
        """The file holding ``key`` (the checkpoint itself for a tensor that is missing)."""
        return str(self._files.get(key, self._label))

    def _handle(self, key: str):
        f = self._files[key]
        if f not in self._open:
            try:
                self._open[f] = safe_open(f, "pt")
            except Exception as e:  # a missing or corrupt shard
                raise UserError(f"{f}: cannot read safetensors ({e})") from None
        return self._open[f]

    def get(self, key: str) -> torch.Tensor:
        return self._dict[key] if self._dict is not None else self._handle(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._dict is not None:
            return tuple(self._dict[key].shape)
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get_row(self, key: str, j: int) -> torch.Tensor:
        """Index j of the first dim without reading the rest (one expert of a stack)."""
        return self._dict[key][j] if self._dict is not None else self._handle(key).get_slice(key)[j]


# ----------------------------------------------------------------------------- export
def _plan_hf(cfg: ModelConfig, shapes: dict) -> Iterator[tuple[str, tuple, str, int | None]]:
    """(hf name, shape, our key, expert index or None) for every tensor of the HF checkpoint."""
    for key, (shape, _) in shapes.items():
        name = hf_name(key, cfg.n_layers)
        if "{j}" in name:
            for j in range(shape[0]):
                yield name.format(j=j), tuple(shape[1:]), key, j
        else:
            yield name, tuple(shape), key, None
    for k in range(cfg.mtp_depth):  # the released checkpoint repeats the shared embedding and head per MTP layer
        yield f"model.layers.{cfg.n_layers + k}.embed_tokens.weight", tuple(shapes["embed.weight"][0]), "embed.weight", None
        yield f"model.layers.{cfg.n_layers + k}.shared_head.head.weight", tuple(shapes["head.weight"][0]), "head.weight", None


def _check_ours(src: _Tensors, shapes: dict, skip_mtp: bool = False) -> None:
    have = src.keys()
    for key, (shape, _) in shapes.items():
        if key not in have:
            raise UserError(f"missing tensor {key} in {src.where(key)}")
        if src.shape(key) != tuple(shape):
            raise UserError(f"tensor {key} in {src.where(key)} has shape {list(src.shape(key))}, "
                            f"the config needs {list(shape)}")
    for key in sorted(have - shapes.keys()):
        if not (skip_mtp and key.startswith("mtp.")):
            raise UserError(f"unexpected tensor {key} in {src.where(key)} (not part of this model config)")


def _as_source(model_or_checkpoint) -> tuple[_Tensors, ModelConfig | None]:
    if isinstance(model_or_checkpoint, torch.nn.Module):
        sd = {k: v.detach() for k, v in model_or_checkpoint.state_dict().items()}
        return _Tensors(tensors=sd, label="<model>"), getattr(model_or_checkpoint, "cfg", None)
    if isinstance(model_or_checkpoint, Mapping):  # a full state dict with our names
        return _Tensors(tensors=model_or_checkpoint), None
    p = Path(model_or_checkpoint)
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file():
        raise UserError(f"{model_or_checkpoint}: no {WEIGHTS} found")
    return _Tensors.from_path(p), None


def export(model_or_checkpoint, out_dir: str | Path, cfg: ModelConfig | None = None, *,
           dtype: torch.dtype | None = None, max_shard_bytes: int = 5_000_000_000,
           extra_config: dict | None = None) -> Path:
    """Write an HF DeepSeek-V3 checkpoint (config.json + safetensors) to ``out_dir``.

    ``model_or_checkpoint`` is a Transformer, a state dict, or a safetensors file /
    checkpoint dir with our names (then ``cfg`` is required). ``dtype`` None keeps the weights' dtype; the router
    weight and bias stay FP32 as transformers keeps them. ``extra_config`` is merged into
    config.json (token ids, say; bos/eos also go to generation_config.json).
    """
    src, model_cfg = _as_source(model_or_checkpoint)
    cfg = cfg or model_cfg
    if cfg is None:
        raise UserError("export from a checkpoint file needs the model config (--config)")
    shapes = expected_shapes(cfg)
    _check_ours(src, shapes)
    dtype = dtype or src.get("embed.weight").dtype
    config = hf_config(cfg, dtype) | (extra_config or {})

    def out_dtype(key: str) -> torch.dtype:
        return torch.float32 if key.endswith(("gate.weight", "gate.bias")) and ".ffn." in key else dtype

    # group tensors into shards by size before reading any of them
    shards: list[list[tuple]] = [[]]
    size = 0
    for item in _plan_hf(cfg, shapes):
        nbytes = torch.Size(item[1]).numel() * out_dtype(item[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / WEIGHTS, out / INDEX]:
        stale.unlink(missing_ok=True)  # a previous export with another shard count must not mix in
    weight_map, total = {}, 0
    for n, items in enumerate(shards, start=1):
        fname = WEIGHTS if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, _, key, j in items:
            t = src.get(key) if j is None else src.get_row(key, j)
            tensors[name] = t.to(out_dtype(key)).contiguous().clone()  # clone: no storage shared between keys
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    if gen:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- import
def _dequantize(src: _Tensors, key: str, block: tuple[int, int]) -> torch.Tensor:
    from moeforge.fp8.quant import Fp8Tensor, dequantize

    t = src.get(key)
    if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t
    skey = key + "_scale_inv"
    if skey not in src.keys():
        raise UserError(f"FP8 tensor {key} in {src.where(key)} has no {skey}")
    scale = src.get(skey).float()
    want = tuple(-(-n // b) for n, b in zip(t.shape, block))
    if tuple(scale.shape) != want:
        raise UserError(f"tensor {skey} in {src.where(skey)} has shape {list(scale.shape)}, "
                        f"{list(t.shape)} in {block[0]}x{block[1]} blocks needs {list(want)}")
    return dequantize(Fp8Tensor(t, scale, block), torch.float32)


def _rope_rows_from_halves(w: torch.Tensor, stride: int, offset: int, rope: int) -> torch.Tensor:
    """Reorder the rope rows of w from HF's rotate-half layout (pairs i, i + R/2) to adjacent pairs."""
    perm = torch.stack([torch.arange(rope // 2), torch.arange(rope // 2) + rope // 2], dim=-1).flatten()
    w = w.clone()
    v = w.view(-1, stride, w.shape[-1])
    v[:, offset : offset + rope] = v[:, offset : offset + rope][:, perm]
    return w


def from_hf_state_dict(src: _Tensors | Mapping[str, torch.Tensor], cfg: ModelConfig, *,
                       dtype: torch.dtype | None = torch.float32, fp8_block: tuple[int, int] = (128, 128),
                       rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict from HF-named tensors (per-expert or fused experts, FP8 or not)."""
    if not isinstance(src, _Tensors):
        src = _Tensors(tensors=src)
    have, used = src.keys(), set()

    def read(name: str, shape: tuple) -> torch.Tensor:
        if name not in have:
            raise UserError(f"missing tensor {name} in {src.where(name)}")
        t = _dequantize(src, name, fp8_block)
        used.update((name, name + "_scale_inv"))
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"tensor {name} in {src.where(name)} has shape {list(t.shape)}, the config needs {list(shape)}")
        return t if dtype is None else t.to(dtype)

    out = {}
    for key, (shape, _) in expected_shapes(cfg).items():
        name = hf_name(key, cfg.n_layers)
        if "{j}" not in name:
            out[key] = read(name, shape)
            continue
        prefix = name.split(".{j}.")[0]
        fused_name = prefix + (".down_proj" if key.endswith(".w2") else ".gate_up_proj")
        if name.format(j=0) in have or fused_name not in have:  # per-expert (and what a miss reports)
            out[key] = torch.stack([read(name.format(j=j), shape[1:]) for j in range(shape[0])])
        elif key.endswith(".w2"):
            out[key] = read(fused_name, shape)
        else:  # fused gate_up_proj: gate rows first, then up rows
            e, inter, dim = shape
            fused = read(fused_name, (e, 2 * inter, dim))
            out[key] = (fused[:, :inter] if key.endswith(".w1") else fused[:, inter:]).contiguous()
    if not rope_interleave:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        for key in out:
            if key.endswith(("attn.wq.weight", "attn.wq_b.weight")):
                out[key] = _rope_rows_from_halves(out[key], qk, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim)
            elif key.endswith("attn.wkv_a.weight"):
                out[key] = _rope_rows_from_halves(out[key], out[key].shape[0], cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    for k in range(cfg.mtp_depth):  # copies of the shared embedding and head; ours are shared
        used.update(f"model.layers.{cfg.n_layers + k}.{n}" for n in ("embed_tokens.weight", "shared_head.head.weight"))
    for name in sorted(have - used):
        if not name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this derived buffer
            raise UserError(f"unexpected tensor {name} in {src.where(name)} (no moeforge counterpart)")
    return out


def import_hf(path: str | Path, dtype: torch.dtype | None = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF DeepSeek-V3 checkpoint directory: (ModelConfig, state dict with our names).

    FP8 weights are dequantized to FP32; ``dtype`` None keeps other tensors as stored.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        d = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    cfg = model_config_from_hf(d, str(p / "config.json"))
    src = _Tensors.from_path(p)
    have = src.keys()
    # transformers' save_pretrained writes no MTP layer even when num_nextn_predict_layers says 1
    depth = 0
    while depth < cfg.mtp_depth and any(k.startswith(f"model.layers.{cfg.n_layers + depth}.") for k in have):
        depth += 1
    cfg = dataclasses.replace(cfg, mtp_depth=depth)
    q = d.get("quantization_config") or {}
    if q and (q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3"):
        raise UserError(f"{p / 'config.json'}: quantization_config {q} is not supported (only fp8 e4m3 blocks)")
    block = tuple(q.get("weight_block_size") or (128, 128))
    sd = from_hf_state_dict(src, cfg, dtype=dtype, fp8_block=block, rope_interleave=d.get("rope_interleave", True))
    return cfg, sd


# ----------------------------------------------------------------------------- our own weights
def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(path), metadata={"format": "pt"})


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load weights into ``model`` from our safetensors (file or dir with model.safetensors)
    or from an HF DeepSeek-V3 directory. MTP tensors are skipped if the model dropped MTP."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():  # HF directories have config.json, ours config.toml
        _, sd = import_hf(p, dtype=None)
    else:
        src, _ = _as_source(p)
        shapes = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
        _check_ours(src, shapes, skip_mtp=len(getattr(model, "mtp", [])) == 0)
        sd = {k: src.get(k) for k in shapes}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("mtp.")]
    if missing or unexpected:
        raise UserError(f"{p}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def model_toml(cfg: ModelConfig) -> str:
    """The [model] section of a moeforge TOML recipe for ``cfg``."""
    def val(v) -> str:
        return "true" if v is True else "false" if v is False else json.dumps(v) if isinstance(v, str) else repr(v)

    return "[model]\n" + "".join(f"{f.name} = {val(getattr(cfg, f.name))}\n" for f in dataclasses.fields(cfg))


# ----------------------------------------------------------------------------- CLI
def _export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeforge export", description="write a Hugging Face DeepSeek-V3 checkpoint")
    ap.add_argument("--weights", required=True,
                    help="model.safetensors with moeforge names, or a checkpoint dir (single-process or sharded)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=["same", "fp32", "bf16"], default="same")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to copy beside the weights")
    return ap


def cli_export(argv: list[str]) -> int:
    from moeforge.cli import parse_config_args

    args, cfg = parse_config_args(argv, _export_parser())
    weights = Path(args.weights)
    if args.config is None and weights.is_dir():
        # a checkpoint directory knows its own config: config.toml (from `moeforge import`) or the
        # resolved config the trainer keeps in state.json
        toml = weights / "config.toml"
        if not toml.is_file() and (weights / "state.json").is_file():
            model = json.loads((weights / "state.json").read_text()).get("config", {}).get("model")
            if model is not None:
                toml = Path(tempfile.mkdtemp()) / "config.toml"
                try:
                    toml.write_text(model_toml(ModelConfig(**model)))
                except TypeError as e:
                    raise UserError(f"{weights / 'state.json'}: config.model does not fit this moeforge ({e})") from None
        if toml.is_file():
            args, cfg = parse_config_args(argv + ["--config", str(toml)], _export_parser())
    dtype = None if args.dtype == "same" else _DTYPES[args.dtype]
    source = weights
    from moeforge.train.distributed import is_sharded, read_model

    if weights.is_dir() and is_sharded(weights):
        # a distributed (DCP) checkpoint of any layout: its shards are read into full tensors
        # in this process (no process group), then exported like any state dict
        source = read_model(weights)
    out = export(source, args.out, cfg.model, dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 1e9))
    if args.tokenizer:
        if not Path(args.tokenizer).is_file():
            raise UserError(f"tokenizer file not found: {args.tokenizer}")
        shutil.copyfile(args.tokenizer, out / "tokenizer.json")
    print(f"exported {weights} -> {out} (Hugging Face DeepSeek-V3 layout)")
    return 0


def cli_import(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="moeforge import", description="read a Hugging Face DeepSeek-V3 checkpoint")
    ap.add_argument("--hf", required=True, help="directory with config.json and safetensors")
    ap.add_argument("--out", required=True, help="output directory for model.safetensors and config.toml")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args(argv)
    cfg, sd = import_hf(args.hf, dtype=_DTYPES[args.dtype])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(sd, out / WEIGHTS)
    (out / "config.toml").write_text(f"# imported from {args.hf}\n" + model_toml(cfg))
    n = sum(t.numel() for t in sd.values())
    print(f"imported {args.hf} -> {out}: {n:,} parameters, {cfg.n_layers} layers, mtp_depth {cfg.mtp_depth}")
    return 0

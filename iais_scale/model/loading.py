"""Weights in: the text side from a BERT folder, or a whole UNITER checkpoint, mapped name by name.

Importers run on an ordinary (not yet DeepSpeed-wrapped) model: under ZeRO-3 the engine partitions
the parameters, so load first, then call ``deepspeed.initialize``. (Weights out, DeepSpeed -> Hugging
Face: ``iais_scale.checkpoint.export_hf``.)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import BertConfig

from .configuration import CrossModalConfig
from .encoder import CrossModalModel

PathLike = str | os.PathLike


@dataclass
class LoadReport:
    """What an import did, in the model's and the checkpoint's own names."""

    loaded: list[str] = field(default_factory=list)  # model keys filled (tied aliases included)
    missing: list[str] = field(default_factory=list)  # model keys left as initialised
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys not used

    def __str__(self) -> str:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        return (
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: [{short(self.missing)}];"
            f" unexpected {len(self.unexpected)}: [{short(self.unexpected)}]"
        )


# ----------------------------------------------------------------------------- shared machinery

# Which config field sizes each model tensor, for errors a user can act on.
_SHAPE_HINTS = (
    ("text_embeddings.word_embeddings", "vocab_size"),
    ("mlm.predictions.bias", "vocab_size"),
    ("mlm.predictions.decoder", "vocab_size"),
    ("text_embeddings.position_embeddings", "max_position_embeddings"),
    ("text_embeddings.token_type_embeddings", "type_vocab_size"),
    ("region_embeddings.feature_linear", "region_feature_dim / hidden_size"),
    ("region_embeddings.box_linear", "region_geometry_dim / hidden_size"),
    ("intermediate.dense", "intermediate_size / hidden_size"),
    ("output.dense", "intermediate_size / hidden_size"),
)
# Persistent in old checkpoints, derived (non-persistent buffers) in ours: nothing to load.
_DERIVED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _hint(model_key: str) -> str:
    for prefix, fields in _SHAPE_HINTS:
        if prefix in model_key:
            return fields
    return "hidden_size"


def _tf_layer_norm_names(key: str) -> str:
    """TF-era BERT/UNITER checkpoints name LayerNorm parameters gamma/beta."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def _layer_count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _apply(model: CrossModalModel, mapped: dict[str, tuple[str, Tensor]], unexpected: list[str]) -> LoadReport:
    """Copy ``{model key: (checkpoint key, tensor)}`` into the model after checking every shape.

    All mismatches are reported at once. Tied parameters (the MLM decoder shares the word embeddings)
    are one tensor reached by two names: the first-registered name is filled; a second source for
    the same tensor counts as loaded when its values agree and as unexpected when they do not.
    """
    params = model.state_dict(keep_vars=True)
    unexpected = list(unexpected) + [src for dst, (src, _) in mapped.items() if dst not in params]
    mapped = {dst: v for dst, v in mapped.items() if dst in params}
    bad = [
        f"{src} {tuple(t.shape)} -> {dst} {tuple(params[dst].shape)} (config: {_hint(dst)})"
        for dst, (src, t) in mapped.items()
        if t.shape != params[dst].shape
    ]
    if bad:
        raise ValueError("checkpoint tensors do not match the model config:\n  " + "\n  ".join(bad))

    canonical = {id(p): name for name, p in model.named_parameters()}  # first name of each tied tensor
    order = sorted(mapped, key=lambda k: canonical.get(id(params[k])) != k)  # canonical names first
    written: dict[int, Tensor] = {}
    report = LoadReport(unexpected=sorted(set(unexpected)))
    with torch.no_grad():
        for dst in order:
            src, t = mapped[dst]
            target = params[dst]
            if id(target) in written:
                if torch.equal(written[id(target)], t.to(target.dtype)):
                    report.loaded.append(dst)
                else:
                    report.unexpected.append(src)  # untied in the checkpoint, tied in our model
                continue
            target.copy_(t.to(target.dtype))
            written[id(target)] = t.to(target.dtype)
            report.loaded.append(dst)
    report.missing = [k for k, p in params.items() if id(p) not in written]
    # A tied alias filled through its other name is loaded, not missing.
    report.loaded += [k for k, p in params.items() if id(p) in written and k not in report.loaded]
    report.loaded.sort()
    report.unexpected = sorted(set(report.unexpected))
    return report


def _mlm_target(rest: str) -> list[str]:
    """``predictions.*`` of a BERT MLM head -> our ``mlm.predictions.*``.

    transformers ties ``decoder.bias`` to ``predictions.bias`` in ``BertForMaskedLM`` but our model
    does not, and the forward pass adds ``decoder.bias``: the checkpoint's output bias goes to both.
    """
    if rest == "predictions.bias":
        return ["mlm.predictions.bias", "mlm.predictions.decoder.bias"]
    return [f"mlm.{rest}"]


# ----------------------------------------------------------------------------- BERT


def _read_bert_state_dict(folder: Path) -> dict[str, Tensor]:
    """The weights of a ``transformers`` checkpoint folder: safetensors first, else pytorch_model.bin."""
    from safetensors.torch import load_file

    for name, index, load in (
        ("model.safetensors", "model.safetensors.index.json", load_file),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    ):
        if (folder / name).is_file():
            return dict(load(folder / name))
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load(folder / shard).items()}
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (or their sharded index)")


def config_from_bert(folder: PathLike, **overrides) -> CrossModalConfig:
    """A ``CrossModalConfig`` with the text side of the BERT in ``folder`` (its config.json).

    Copies the sizes, layer-norm eps, activation, dropouts, pad id and initializer range; when the
    folder holds a tokenizer, ``cls_token_id``/``sep_token_id`` come from it. ``overrides`` win,
    e.g. ``config_from_bert(folder, region_feature_dim=2048, iais_layers=[-1])``.
    """
    folder = Path(folder)
    bert = BertConfig.from_json_file(str(folder / "config.json"))
    if getattr(bert, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder}: position_embedding_type={bert.position_embedding_type!r}; only 'absolute' is supported")
    kw = dict(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        max_position_embeddings=bert.max_position_embeddings,
        type_vocab_size=max(2, bert.type_vocab_size),  # type 1 marks image tokens; a 1-type BERT fails the shape check
        layer_norm_eps=bert.layer_norm_eps,
        hidden_dropout_prob=bert.hidden_dropout_prob,
        attention_probs_dropout_prob=bert.attention_probs_dropout_prob,
        initializer_range=bert.initializer_range,
        pad_token_id=bert.pad_token_id,
    )
    if {"cls_token_id", "sep_token_id"} - overrides.keys() and any(
        (folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")
    ):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)  # never code from a download
        kw.update({k: v for k, v in (("cls_token_id", tok.cls_token_id), ("sep_token_id", tok.sep_token_id)) if v is not None})
    kw.update(overrides)
    return CrossModalConfig(**kw)


def init_from_bert(model: CrossModalModel, folder: PathLike) -> LoadReport:
    """Copy a BERT folder's weights into the text side of ``model``; the image side stays as initialised.

    ``embeddings.*`` -> ``text_embeddings``, ``encoder.layer.N.*`` -> ``layers.N``, ``pooler.*`` ->
    ``pooler`` and, when the checkpoint has one, ``cls.predictions.*`` -> ``mlm``. Keys may carry the
    ``bert.`` prefix (``BertFor*`` heads) or not (``BertModel``, sentence-transformers); gamma/beta
    LayerNorm names are accepted. Any shape or layer-count difference from ``model.config`` raises
    ``ValueError`` (build the config with ``config_from_bert``); other checkpoint heads (NSP,
    classifiers) are reported as unexpected.
    """
    folder = Path(folder)
    state = {_tf_layer_norm_names(k.removeprefix("bert.")): v for k, v in _read_bert_state_dict(folder).items()}
    n_ckpt = _layer_count(state, r"encoder\.layer\.(\d+)\.")
    if n_ckpt != model.config.num_hidden_layers:
        raise ValueError(f"{folder} has {n_ckpt} layers, the model {model.config.num_hidden_layers} (num_hidden_layers)")

    mapped: dict[str, tuple[str, Tensor]] = {}
    unexpected: list[str] = []
    for key, t in state.items():
        if key in _DERIVED_BUFFERS:
            continue
        if key.startswith("embeddings."):
            targets = ["text_" + key]
        elif key.startswith("encoder.layer."):
            targets = ["layers." + key.removeprefix("encoder.layer.")]
        elif key.startswith("pooler."):
            targets = [key]
        elif key.startswith("cls.predictions."):
            targets = _mlm_target(key.removeprefix("cls."))
        else:
            targets = []
        for dst in targets:
            mapped[dst] = (key, t)
        if not targets:
            unexpected.append(key)
    return _apply(model, mapped, unexpected)


# ----------------------------------------------------------------------------- UNITER

_UNITER_IMAGE = {
    "img_linear": "feature_linear",
    "img_layer_norm": "feature_norm",
    "pos_linear": "box_linear",
    "pos_layer_norm": "box_norm",
    "LayerNorm": "norm",
}


def import_uniter(model: CrossModalModel, state_dict_or_path: Mapping[str, Tensor] | PathLike, *,
                  itm_init: str = "row1") -> LoadReport:
    """Map a UNITER checkpoint (a flat state dict, or the path of its ``.pt``) onto ``model``.

    ``uniter.embeddings`` -> ``text_embeddings``; ``uniter.img_embeddings`` -> ``region_embeddings``
    (img_linear/img_layer_norm -> feature_linear/feature_norm, pos_linear/pos_layer_norm ->
    box_linear/box_norm, LayerNorm -> norm; ``mask_embedding`` is MRM-only: unexpected);
    ``uniter.encoder.layer.N`` -> ``layers.N``; ``uniter.pooler`` -> ``pooler``; ``cls.predictions``
    -> ``mlm`` (decoder tied to the word embeddings); ``feat_regress.*`` -> ``mrfr.*`` where the model
    has such a tensor, else unexpected, like ``region_classifier.*``.

    The matching score: ``rank_output`` (Linear(hidden, 1), retrieval fine-tunes) maps to ``itm``
    directly. Otherwise the pretraining ``itm_output`` (Linear(hidden, 2), softmax over
    {mismatch, match}) becomes the single logit: ``itm_init="row1"`` copies row 1 (``w1·x + b1``, the
    authors' ``init_output`` before fine-tuning); ``"difference"`` uses ``(w1 - w0)·x + (b1 - b0)``,
    whose sigmoid equals UNITER's softmax probability of "match". When both exist, ``rank_output``
    wins and ``itm_output`` is reported as unexpected.

    UNITER's image features are 2048-d with a 7-d box: ``region_feature_dim`` and
    ``region_geometry_dim`` must match (``ValueError`` naming the tensor otherwise).
    """
    if isinstance(state_dict_or_path, Mapping):
        raw = dict(state_dict_or_path)
    else:
        raw = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
    if raw and all(k.startswith("module.") for k in raw):  # saved from a DataParallel/DDP wrapper
        raw = {k.removeprefix("module."): v for k, v in raw.items()}
    state = {_tf_layer_norm_names(k): v for k, v in raw.items()}

    n_ckpt = _layer_count(state, r"uniter\.encoder\.layer\.(\d+)\.")
    if n_ckpt != model.config.num_hidden_layers:
        raise ValueError(f"UNITER checkpoint has {n_ckpt} layers, the model {model.config.num_hidden_layers} (num_hidden_layers)")
    model_keys = model.state_dict().keys()
    mapped: dict[str, tuple[str, Tensor]] = {}
    unexpected: list[str] = []
    has_rank = "rank_output.weight" in state
    for key, t in state.items():
        targets: list[str] = []
        if key.startswith("uniter.embeddings."):
            if key.removeprefix("uniter.") not in _DERIVED_BUFFERS:
                targets = ["text_" + key.removeprefix("uniter.")]
            else:
                continue
        elif key.startswith("uniter.img_embeddings."):
            module, _, leaf = key.removeprefix("uniter.img_embeddings.").partition(".")
            if module in _UNITER_IMAGE:
                targets = [f"region_embeddings.{_UNITER_IMAGE[module]}.{leaf}"]
        elif key.startswith("uniter.encoder.layer."):
            targets = ["layers." + key.removeprefix("uniter.encoder.layer.")]
        elif key.startswith("uniter.pooler."):
            targets = [key.removeprefix("uniter.")]
        elif key.startswith("cls.predictions."):
            targets = _mlm_target(key.removeprefix("cls."))
        elif key.startswith("rank_output."):
            targets = ["itm." + key.removeprefix("rank_output.")]
        elif key == "feat_regress.weight" and "mrfr.bias" in model_keys:
            # UNITER ties it to img_linear.weight; our head reuses region_embeddings.feature_linear.weight.
            targets = ["region_embeddings.feature_linear.weight"]
        elif key.startswith("feat_regress.") and "mrfr." + key.removeprefix("feat_regress.") in model_keys:
            targets = ["mrfr." + key.removeprefix("feat_regress.")]
        for dst in targets:
            mapped[dst] = (key, t)
        if not targets and not (key.startswith("itm_output.") and not has_rank):
            unexpected.append(key)
    if not has_rank and "itm_output.weight" in state:
        w, b = state["itm_output.weight"], state.get("itm_output.bias")
        if w.shape[0] != 2:
            raise ValueError(f"itm_output.weight {tuple(w.shape)}: expected UNITER's 2-way ITM head")
        if itm_init not in ("row1", "difference"):
            raise ValueError(f"itm_init: 'row1' or 'difference', got {itm_init!r}")
        row1 = itm_init == "row1"
        mapped["itm.weight"] = ("itm_output.weight", (w[1] if row1 else w[1] - w[0]).unsqueeze(0))
        if b is not None:
            mapped["itm.bias"] = ("itm_output.bias", (b[1] if row1 else b[1] - b[0]).unsqueeze(0))
    return _apply(model, mapped, unexpected)


# ----------------------------------------------------------------------------- checks before a run


def checkpoint_vocab_size(kind: str, path: PathLike) -> int | None:
    """The number of word embeddings of an ``init_from`` source, read without building a model
    (``bert``: its config.json; ``uniter``: the tensor's shape, memory-mapped)."""
    path = Path(path)
    if kind == "bert":
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json not found (a BERT checkpoint folder)")
        return BertConfig.from_json_file(str(path / "config.json")).vocab_size
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a UNITER checkpoint .pt)")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("uniter.embeddings.word_embeddings.weight", "module.uniter.embeddings.word_embeddings.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise ValueError(f"{path}: no uniter.embeddings.word_embeddings.weight: not a UNITER checkpoint")

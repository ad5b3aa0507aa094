"""LLaVA-More (and other original-LLaVA `llava_llama` checkpoints) converted to HF Llava.

The original LLaVA repository saves a `LlavaLlamaForCausalLM`: the Llama weights under their
usual names (`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`), the projector as
`model.mm_projector.{0,2}` (`mm_projector_type: mlp2x_gelu`), and the CLIP tower either under
`model.vision_tower.vision_tower.vision_model.*` or only by name in `mm_vision_tower`. It has no
`<image>` token: LLaVA splices the image features in at a sentinel id (-200) that the
tokenizer never produces. `convert_llava_llama` writes one `LlavaForConditionalGeneration`
folder with an added `<image>` token (and a pad token when the tokenizer has none), embeddings
resized to match, and a processor that pads images to a square of the CLIP mean colour at the
tower's resolution (`image_aspect_ratio: pad`) and expands `<image>` to one token per patch.

Visual tokens: CLIP ViT-L/14 at 336 px has (336 / 14)^2 = 576 patches plus a CLS token;
`mm_vision_select_feature: patch` drops CLS, so the language model sees 576 image positions.
The converted config records it as `image_seq_length`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from vlmdiff.files import atomic_dir, read_json_object
from vlmdiff.logs import Log
from vlmdiff.models.build import save_atomic

IMAGE_TOKEN = "<image>"
# Llama-3.1 reserves this id for padding; using it adds no row to the embeddings.
LLAMA3_PAD_TOKENS = ("<|finetune_right_pad_id|>",)
FALLBACK_PAD = "<pad>"
LLAVA_MORE_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
# LLaVA-More's `llama_3_1` conversation renders [system, user "<image>\n{question}"] through
# the Llama-3.1-Instruct template (whose system turn opens with the knowledge-cutoff lines).
# Message content may be a string or a list of {"type": "image"} / {"type": "text"} items.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{ 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{{ '" + LLAVA_MORE_SYSTEM_PROMPT + "' }}{% set loop_messages = messages %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% set ns = namespace(text='') %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set ns.text = ns.text + '<image>\\n' %}"
    "{% else %}{% set ns.text = ns.text + item['text'] %}{% endif %}{% endfor %}"
    "{{ ns.text | trim }}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
_TOWER_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "vision_model.")
_LM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file or key."""


# ------------------------------------------------------------------------------------ sources


def is_hub_id(value: str) -> bool:
    """`owner/name` that is not an existing local path."""
    return bool(_HUB_ID.match(value)) and not Path(value).exists()


def resolve_source(
    value: str,
    key: str,
    *,
    revision: str | None = None,
    allow_patterns: Iterable[str] | None = None,
) -> Path:
    """A local folder as is; a Hub id through `snapshot_download` (only then is the network
    used). Anything else is an error naming the config key."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if not is_hub_id(value):
        raise FileNotFoundError(f"config key '{key}': {value!r} is neither a local path nor a Hub id")
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns) if allow_patterns is not None else None
    return Path(snapshot_download(value, revision=revision, allow_patterns=patterns))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, naming the file when it is missing or malformed."""
    return read_json_object(path, ConversionError)


def model_format(config: Mapping[str, Any]) -> str:
    """"llava_llama" (original LLaVA), "llava" (HF Llava) or "llama" (a plain HF Llama LM)."""
    model_type = config.get("model_type")
    if model_type == "llava_llama" or "mm_projector_type" in config:
        return "llava_llama"
    if model_type in ("llava", "llama"):
        return model_type
    raise ConversionError(
        f"model_type {model_type!r} is not supported (llava_llama, llava, llama)"
    )


def text_dims(config: Mapping[str, Any]) -> tuple[int, int]:
    """(hidden size, decoder layers) of a model's language part, any supported format."""
    text = config["text_config"] if model_format(config) == "llava" else config
    return int(text["hidden_size"]), int(text["num_hidden_layers"])


# ------------------------------------------------------------------------------------ weights


def read_weights(folder: Path, keep: Callable[[str], bool] = lambda k: True) -> dict[str, torch.Tensor]:
    """Tensors of every `*.safetensors` file in `folder` (else `*.bin`), filtered by `keep`."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is no mapping
                    if keep(name):
                        out[name] = fh.get_tensor(name)
        return out
    for file in sorted(folder.glob("*.bin")):
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        out.update({k: v for k, v in state.items() if keep(k)})
    return out


def map_llava_llama_keys(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-LLaVA (and CLIP) tensor names -> `LlavaForConditionalGeneration` names."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        new = _map_key(name)
        if new is None:
            raise ConversionError(f"unexpected tensor {name!r} in the checkpoint")
        if new:
            out[new] = t
    return out


def _map_key(name: str) -> str | None:
    """The HF name, "" for tensors deliberately dropped, None for unknown ones."""
    for old, new in _PROJECTOR.items():
        if name.startswith(old):
            return "model.multi_modal_projector." + new + name[len(old):]
    for prefix in _TOWER_PREFIXES:
        if name.startswith(prefix):
            return "model.vision_tower." + name[len(prefix):]
    for prefix in _LM_PREFIXES:
        if name.startswith(prefix):
            return "model.language_model." + name[len("model."):]
    if name == "lm_head.weight":
        return name
    if name.startswith(("text_model.", "visual_projection.", "text_projection.")) or name in (
        "logit_scale",
    ):
        return ""  # the rest of a full CLIP checkpoint
    if name.endswith("rotary_emb.inv_freq"):
        return ""  # recomputed from the config
    return None


# ------------------------------------------------------------------------------------ configs


def text_config(config: Mapping[str, Any]) -> Any:
    """The LlamaConfig inside an original-LLaVA config (LLaVA's own fields dropped)."""
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict())
    fields = {k: v for k, v in config.items() if k in known and k not in ("model_type", "architectures")}
    return LlamaConfig(**fields)


def vision_config_from(folder: Path) -> Any:
    """The CLIPVisionConfig of a CLIP folder (a full CLIPModel's or a vision tower's)."""
    from transformers import CLIPVisionConfig

    raw = read_json(folder / "config.json")
    if "vision_config" in raw:
        raw = raw["vision_config"]
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    return CLIPVisionConfig(**raw)


def check_llava_options(config: Mapping[str, Any], source: Path) -> None:
    """Stop on original-LLaVA options that HF Llava cannot express."""
    where = source / "config.json"
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"{where}: mm_projector_type {projector!r}; only 'mlp2x_gelu' converts")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ConversionError(f"{where}: mm_use_im_start_end/mm_use_im_patch_token are not supported")
    if config.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise ConversionError(
            f"{where}: mm_vision_select_feature {config['mm_vision_select_feature']!r} "
            "(patch, cls_patch)"
        )
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise ConversionError(f"{where}: image_aspect_ratio {aspect!r} (pad, square)")


def image_seq_length(image_size: int, patch_size: int, select_feature: str = "patch") -> int:
    """Image positions the LM sees: one per patch, plus CLS for `cls_patch`."""
    return (image_size // patch_size) ** 2 + (select_feature == "cls_patch")


# ------------------------------------------------------------------------------------ tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Add `<image>` (and a pad token if missing), set LLaVA-More's chat template, and let the
    template alone place `<|begin_of_text|>` (Llama-3's tokenizer adds one on every call, which
    with a chat template doubles it)."""
    from tokenizers import processors

    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in LLAMA3_PAD_TOKENS if t in vocab), FALLBACK_PAD)
        tokenizer.add_special_tokens({"pad_token": pad})
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.post_processor is not None:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def make_processor(tokenizer: Any, vision: Any, pad_to_square: bool, select_feature: str) -> Any:
    """LlavaProcessor: CLIP preprocessing at the tower's size (mean-colour square padding when
    `pad_to_square`), `<image>` expanded to one token per image position."""
    from transformers import LlavaProcessor

    try:
        from transformers import LlavaImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import LlavaImageProcessor as ImageProcessor

    size = vision.image_size
    image_processor = ImageProcessor(
        do_pad=pad_to_square,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="full" if select_feature == "cls_patch" else "default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


# ------------------------------------------------------------------------------------ convert


def convert_llava_llama(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    base_lm: str | os.PathLike | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Convert an original-LLaVA checkpoint folder into an HF Llava folder at `dst`.

    `vision_tower` (a CLIP folder) overrides the checkpoint's `mm_vision_tower`; `base_lm` (an HF
    Llama folder) supplies language weights and tokenizer a stage-1 checkpoint (projector only)
    lacks. Written to `<dst>.tmp`, then renamed. Returns a summary.
    """
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    src = Path(src)
    raw = read_json(src / "config.json")
    if model_format(raw) != "llava_llama":
        raise ConversionError(f"{src / 'config.json'}: not an original-LLaVA (llava_llama) config")
    check_llava_options(raw, src)
    weights = read_weights(src)
    log(f"{src}: {len(weights)} tensors")
    has_lm = any(k.startswith(_LM_PREFIXES) for k in weights)
    lm_dir = Path(base_lm) if base_lm is not None else None
    if not has_lm:
        if lm_dir is None:
            raise ConversionError(
                f"{src} holds no language-model weights (a stage-1 projector checkpoint?); "
                "give the LM it was built on (config key source.lm)"
            )
        weights.update(read_weights(lm_dir, lambda k: k.startswith(_LM_PREFIXES) or k == "lm_head.weight"))
        log(f"language weights from {lm_dir}")
    tower_dir = _tower_folder(raw, src, vision_tower)
    if not any(k.startswith(_TOWER_PREFIXES[0]) for k in weights):
        weights.update(read_weights(tower_dir, lambda k: k.startswith("vision_model.")))
        log(f"vision tower weights from {tower_dir}")
    state = map_llava_llama_keys(weights)

    tok_dir = src if (src / "tokenizer_config.json").is_file() else lm_dir
    if tok_dir is None:
        raise ConversionError(f"{src}: no tokenizer files; give source.lm")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tok_dir))
    vision = vision_config_from(tower_dir)
    text = text_config(raw)
    select = raw.get("mm_vision_select_feature", "patch")
    n_image = image_seq_length(vision.image_size, vision.patch_size, select)
    dtype = _dtype(raw, state)
    state = _resize_vocab(state, len(tokenizer), dtype)
    text.vocab_size = state["model.language_model.embed_tokens.weight"].shape[0]
    text.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if select == "cls_patch" else "default",
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if extra or missing:
        raise ConversionError(
            f"{src}: tensors do not fit the model built from its config: missing {missing[:8]}, "
            f"unexpected {extra[:8]}"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.config.dtype = dtype
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = _eos_ids(tokenizer)
    processor = make_processor(tokenizer, vision, raw.get("image_aspect_ratio") == "pad", select)

    out = Path(dst)
    save_atomic([model, processor], out)
    summary = {
        "source": str(src),
        "vision_tower": str(tower_dir),
        "base_lm": str(lm_dir) if lm_dir is not None and not has_lm else None,
        "d_model": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
        "image_token_id": config.image_token_id,
        "pad_token": tokenizer.pad_token,
        "image_seq_length": n_image,
        "image_size": vision.image_size,
        "pad_to_square": raw.get("image_aspect_ratio") == "pad",
        "dtype": str(dtype).removeprefix("torch."),
    }
    log(f"wrote {out}: {json.dumps(summary)}")
    return summary


def _tower_folder(raw: Mapping[str, Any], src: Path, override: str | os.PathLike | None) -> Path:
    """The CLIP folder: the override, else `mm_vision_tower` (a local folder or a Hub id)."""
    if override is not None:
        folder = Path(override)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"vision tower folder {folder}: config.json is missing")
        return folder
    name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not name:
        raise ConversionError(f"{src / 'config.json'}: mm_vision_tower is missing")
    return resolve_source(
        str(name), "mm_vision_tower", allow_patterns=["*.json", "*.safetensors", "*.txt"]
    )


def _dtype(raw: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The checkpoint's declared dtype, else that of its embeddings."""
    name = raw.get("torch_dtype") or raw.get("dtype")
    if isinstance(name, str) and hasattr(torch, name):
        return getattr(torch, name)
    return state["model.language_model.embed_tokens.weight"].dtype


def _resize_vocab(
    state: dict[str, torch.Tensor], vocab: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Grow embeddings and LM head to `vocab` rows, new rows at the mean of the old ones (the
    `<image>` row is never read: image features replace it)."""
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name not in state:
            continue
        w = state[name]
        if w.shape[0] < vocab:
            mean = w.float().mean(dim=0, keepdim=True).to(w.dtype)
            state[name] = torch.cat([w, mean.expand(vocab - w.shape[0], -1)], dim=0)
    return state


def _eos_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids: `<|eot_id|>` where present, and the tokenizer's EOS."""
    ids = [tokenizer.eos_token_id]
    eot = tokenizer.get_vocab().get("<|eot_id|>")
    if eot is not None and eot not in ids:
        ids.insert(0, eot)
    return [i for i in ids if i is not None]


def import_vlm(
    source: str,
    dst: str | os.PathLike,
    *,
    key: str = "source.vlm",
    revision: str | None = None,
    vision_tower: str | None = None,
    base_lm: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """An HF Llava folder at `dst` from a local folder or Hub id in either format (HF Llava is
    copied as is)."""
    folder = resolve_source(source, key, revision=revision)
    raw = read_json(folder / "config.json")
    fmt = model_format(raw)
    if fmt == "llava_llama":
        tower = resolve_source(vision_tower, "source.vision_tower") if vision_tower else None
        lm = resolve_source(base_lm, "source.lm") if base_lm else None
        return convert_llava_llama(folder, dst, vision_tower=tower, base_lm=lm, log=log)
    if fmt != "llava":
        raise ConversionError(f"config key '{key}': {folder} is a {fmt!r} model, not a VLM")
    copy_folder(folder, dst)
    vision = raw.get("vision_config", {})
    summary = {
        "source": str(folder),
        "d_model": text_dims(raw)[0],
        "n_layers": text_dims(raw)[1],
        "image_token_id": raw.get("image_token_id", raw.get("image_token_index")),
        "image_seq_length": raw.get("image_seq_length"),
        "image_size": vision.get("image_size"),
    }
    log(f"copied {folder} -> {dst}: {json.dumps(summary)}")
    return summary


def import_vlm_job(
    *,
    source: str,
    key: str,
    revision: str | None,
    vision_tower: str | None,
    base_lm: str | None,
    out: Mapping[str, str | os.PathLike],
    log: Log = print,
) -> dict[str, Any]:
    """The `import_vlm` and `import_vlm_stage1` rules: `import_vlm` into `out["model"]`, its
    summary to `out["summary"]` (JSON)."""
    from vlmdiff.world.datasets import write_json

    summary = import_vlm(source, out["model"], key=key, revision=revision,
                         vision_tower=vision_tower, base_lm=base_lm, log=log)
    write_json(summary, out["summary"])
    return summary


def import_lm_job(
    *, source: str, revision: str | None, out: Mapping[str, str | os.PathLike], log: Log = print
) -> dict[str, Any]:
    """The `import_lm` rule: the base language model (an HF Llama folder or Hub id) copied to
    `out["model"]`."""
    dst = out["model"]
    folder = resolve_source(source, "source.lm", revision=revision)
    raw = read_json(folder / "config.json")
    if model_format(raw) != "llama":
        raise ConversionError(f"config key 'source.lm': {folder} is no Llama language model")
    copy_folder(folder, dst)
    d_model, n_layers = text_dims(raw)
    log(f"copied {folder} -> {dst}")
    return {"source": str(folder), "d_model": d_model, "n_layers": n_layers}


def copy_folder(src: Path, dst: str | os.PathLike) -> Path:
    """Copy the files of a model folder (links resolved) into `dst`, atomically."""
    out = Path(dst)
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, symlinks=False, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git*", ".cache"))
    return out

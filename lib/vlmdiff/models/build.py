"""Building, saving and loading the toy language model and its LLaVA-style VLM."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlmdiff.config import section
from vlmdiff.files import atomic_dir
from vlmdiff.inputs import CHAT_TEMPLATE
from vlmdiff.models.tokenizer import IMAGE_TOKEN

try:  # transformers >= 5 names the PIL-only backend explicitly; torchvision is optional here
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as _ImageProcessor


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_lm(
    tokenizer: PreTrainedTokenizerFast,
    cfg: Mapping[str, Any],
    seed: int,
    attn_implementation: str = "eager",
) -> LlamaForCausalLM:
    """A fresh Llama language model sized by the `lm` config section."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"],
        max_position_embeddings=cfg["max_position"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
        initializer_range=cfg.get("init_std") or 0.02,
    )
    return LlamaForCausalLM(config)


def make_image_processor(image_size: int) -> Any:
    """CLIP's image processor at our size, pixels scaled to [-1, 1]."""
    return _ImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def vision_config(vision_cfg: Mapping[str, Any], image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=vision_cfg["hidden_size"],
        intermediate_size=vision_cfg["intermediate_size"],
        num_hidden_layers=vision_cfg["num_layers"],
        num_attention_heads=vision_cfg["num_heads"],
        image_size=image_size,
        patch_size=vision_cfg["patch_size"],
        projection_dim=vision_cfg["hidden_size"],
    )


def build_vision_tower(vision_cfg: Mapping[str, Any], image_size: int, seed: int) -> CLIPVisionModel:
    """A fresh CLIP vision tower sized by the `vision` config section."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(vision_config(vision_cfg, image_size))
    init_positions(tower, vision_cfg)
    return tower


def init_positions(tower: torch.nn.Module, vision_cfg: Mapping[str, Any]) -> None:
    """`position_init: sincos` overwrites the random patch positions with 2-D sin-cos codes."""
    if section("vision", vision_cfg)["position_init"] != "sincos":
        return
    emb = tower.embeddings
    grid = emb.image_size // emb.patch_size
    with torch.no_grad():
        pos = emb.position_embedding.weight
        pos[0].zero_()  # the class token: CLIP keeps it, the projector never sees it
        # about the spread of a fresh patch embedding's output on [-1, 1] pixels
        pos[1:] = 0.5 * sincos_2d(grid, pos.shape[1])


def make_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int
) -> LlavaProcessor:
    """A LlavaProcessor whose `<image>` expands to one token per patch (CLS dropped)."""
    return LlavaProcessor(
        image_processor=make_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_vlm(
    lm: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    vision_cfg: Mapping[str, Any],
    image_size: int,
    seed: int,
    attn_implementation: str = "eager",
    vision_tower: CLIPVisionModel | None = None,
) -> LlavaForConditionalGeneration:
    """Wrap a trained LM with a CLIP vision tower (fresh, or `vision_tower`'s weights) and a
    fresh 2-layer GELU projector."""
    torch.manual_seed(seed)
    n_patches = (image_size // vision_cfg["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=vision_config(vision_cfg, image_size),
        text_config=lm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_cfg["feature_layer"],
    )
    config._attn_implementation = attn_implementation
    vlm = LlavaForConditionalGeneration(config)
    if vision_tower is not None:
        try:
            vlm.model.vision_tower.load_state_dict(vision_tower.state_dict())
        except RuntimeError as err:
            raise ValueError(f"the pretrained vision tower does not match the vision config: {err}") from None
    else:
        init_positions(vlm.model.vision_tower, vision_cfg)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    vlm.generation_config.pad_token_id = tokenizer.pad_token_id
    vlm.generation_config.eos_token_id = tokenizer.eos_token_id
    return vlm


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine patch positions (MAE's recipe), row-major `[grid * grid, dim]`:
    half the channels encode the column, half the row, so x and y are linearly readable from
    the first step on instead of having to be learnt from scratch."""
    if dim % 4:
        raise ValueError(f"vision.hidden_size must be a multiple of 4 for sincos positions, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(v: torch.Tensor) -> torch.Tensor:
        angles = v.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


def projector(model: torch.nn.Module) -> torch.nn.Module:
    """A VLM's multimodal projector, whose outputs are the layer-0 image token embeddings."""
    inner = getattr(model, "model", model)
    return inner.multi_modal_projector


def save_atomic(obj_list: list[Any], out_dir: Path) -> None:
    """`save_pretrained` each object into a temporary folder, then move it into place."""
    with atomic_dir(out_dir) as tmp:
        for obj in obj_list:
            obj.save_pretrained(tmp)


def load_lm(
    path: Path, device: torch.device | str = "cpu", attn_implementation: str | None = "eager"
) -> tuple[LlamaForCausalLM, Any]:
    """The LM and its tokenizer. Eager attention by default: on CPU it beats SDPA for these
    sizes, and attention-level analyses need the attention weights."""
    from transformers import AutoTokenizer

    path = _existing(path)
    kwargs = _kwargs(attn_implementation, None)
    model = LlamaForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_vlm(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = "eager",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    path = _existing(path)
    kwargs = _kwargs(attn_implementation, dtype)
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def load_vision_tower(path: Path) -> CLIPVisionModel:
    """A vision tower saved by the `pretrain_vision` rule."""
    return CLIPVisionModel.from_pretrained(_existing(path)).eval()


def _kwargs(attn_implementation: str | None, dtype: torch.dtype | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    return kwargs


def _existing(path: Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}: config.json is missing")
    return path

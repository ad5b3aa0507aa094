"""Building, saving and loading the toy language model and its LLaVA-style VLM."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

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

_T = TypeVar("_T")


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
    position_code: str = "none",
    position_scale: float = 1.0,
) -> LlavaForConditionalGeneration:
    """Wrap a trained LM with a CLIP vision tower (fresh, or `vision_tower`'s weights) and a
    fresh 2-layer GELU projector; `position_code` adds a fixed code of each patch's place to
    the projector's output (`set_image_position_code`)."""
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
    set_image_position_code(vlm, position_code, position_scale)
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


# ------------------------------------------------------------------ image position code

IMAGE_POSITION_CODES = ("none", "sincos2d")
# config.json keys: a saved VLM says which code its projector adds, so every load restores it
POSITION_CODE_KEY, POSITION_SCALE_KEY = "vlmdiff_image_position_code", "vlmdiff_image_position_scale"


def image_position_table(grid: int, dim: int) -> torch.Tensor:
    """`sincos_2d` of a `grid x grid` patch grid, centred over the patches and scaled to a mean
    row norm of 1, `[grid * grid, dim]`: it moves no token's mean and has a fixed loudness."""
    table = sincos_2d(grid, dim)
    table = table - table.mean(dim=0, keepdim=True)
    return table / table.norm(dim=1).mean()


def set_image_position_code(vlm: torch.nn.Module, code: str, scale: float) -> None:
    """Add a fixed, parameter-free code of each patch's column and row to every image token
    after the projector, `scale` times the projected content's mean token norm (computed per
    forward pass, so training can neither wipe the code nor drown it). It is recorded in the
    VLM's config, so `load_vlm` restores it from a saved folder. `none` adds nothing."""
    if code not in IMAGE_POSITION_CODES:
        raise ValueError(f"vlm.image_position_code must be one of {IMAGE_POSITION_CODES}, "
                         f"got {code!r}")
    if scale < 0:
        raise ValueError(f"vlm.image_position_scale must be >= 0, got {scale}")
    setattr(vlm.config, POSITION_CODE_KEY, code)
    setattr(vlm.config, POSITION_SCALE_KEY, float(scale))
    attach_image_position_code(vlm)


def attach_image_position_code(vlm: torch.nn.Module) -> None:
    """Hook the code that `vlm`'s config names onto its projector (once)."""
    code = getattr(vlm.config, POSITION_CODE_KEY, "none")
    proj = projector(vlm)
    if code == "none" or hasattr(proj, "position_code"):
        return
    n = int(vlm.config.image_seq_length)
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"image_position_code needs a square patch grid, got {n} image tokens")
    dim = vlm.config.get_text_config().hidden_size
    # not persistent: the table follows from the config, so the weights stay plain LLaVA ones
    proj.register_buffer("position_code", image_position_table(grid, dim), persistent=False)
    scale = float(getattr(vlm.config, POSITION_SCALE_KEY))

    def add_code(module: torch.nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        loud = out.detach().norm(dim=-1).mean()
        return out + (scale * loud) * module.position_code.to(out.dtype)

    proj.register_forward_hook(add_code)


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
    model, tokenizer = _loading(
        path, "LM", lambda: (LlamaForCausalLM.from_pretrained(path, **kwargs),
                             AutoTokenizer.from_pretrained(path))
    )
    return model.to(device).eval(), tokenizer


def load_vlm(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = "eager",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The VLM (with its image position code, if it has one) and its processor."""
    path = _existing(path)
    kwargs = _kwargs(attn_implementation, dtype)
    model, processor = _loading(
        path, "VLM", lambda: (LlavaForConditionalGeneration.from_pretrained(path, **kwargs),
                              AutoProcessor.from_pretrained(path))
    )
    attach_image_position_code(model)
    return model.to(device).eval(), processor


def load_vision_tower(path: Path) -> CLIPVisionModel:
    """A vision tower saved by the `pretrain_vision` rule."""
    path = _existing(path)
    return _loading(path, "vision tower", lambda: CLIPVisionModel.from_pretrained(path)).eval()


class ModelLoadError(OSError):
    """A saved model folder cannot be loaded: a file in it is truncated or malformed."""


def _loading(path: Path, what: str, load: Callable[[], _T]) -> _T:
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(
            f"{path}: the saved {what} cannot be loaded ({type(e).__name__}: {e}); "
            "delete the folder and re-run the job that wrote it"
        ) from e


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

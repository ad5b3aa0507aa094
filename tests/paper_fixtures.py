"""Tiny fixtures in the exact on-disk formats of the paper's sources: an original-LLaVA
(`llava_llama`) checkpoint with a Llama-3-style tokenizer, a CLIP folder, a Llama-Scope release,
VQAv2 parquet in the `lmms-lab/VQAv2` layout, VSR JSONL and a COCO image folder."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]
TEXTS = [
    "Is the cat to the left of the dog?",
    "What colour is the bus?",
    "How many people are there?",
    "What does the sign say?",
    "Is the cup on top of the table?",
    "You are a helpful language and vision assistant.",
    "Describe the positions of objects in the image.",
] * 4
D_MODEL, N_LAYERS, VISION_HIDDEN, IMAGE_SIZE, PATCH = 32, 2, 24, 28, 14


def write_llama3_tokenizer(folder: Path, reserved_pad: bool = True) -> Any:
    """A byte-level BPE tokenizer with Llama-3's special tokens and BOS post-processor
    (without Llama-3.1's reserved pad token unless `reserved_pad`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[t for t in LLAMA3_SPECIALS if reserved_pad or "pad" not in t],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    fast.save_pretrained(folder)
    return fast


def clip_vision_dict() -> dict[str, Any]:
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "projection_dim": 16,
    }


def write_clip(folder: Path, seed: int = 0) -> Path:
    """A full-CLIP-style folder (config with `vision_config`, `vision_model.*` and a few
    `text_model.*` tensors), as `openai/clip-vit-large-patch14-336` is laid out."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**clip_vision_dict()))
    state = {}
    for k, v in tower.state_dict().items():
        name = k if k.startswith("vision_model.") else "vision_model." + k
        state[name] = v.detach().clone().contiguous()
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 16)
    state["logit_scale"] = torch.tensor(2.6)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    config = {"model_type": "clip", "vision_config": clip_vision_dict(), "text_config": {}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def llava_llama_config(vocab: int, clip_dir: str, **overrides: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": D_MODEL,
        "intermediate_size": 64,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": vocab,
        "bos_token_id": 0,
        "eos_token_id": 4,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "mm_hidden_size": VISION_HIDDEN,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": clip_dir,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        **overrides,
    }


def write_llava_llama(
    folder: Path, clip_dir: Path, *, tower_in_checkpoint: bool = True, seed: int = 1,
    reserved_pad: bool = True, **overrides: Any
) -> dict[str, torch.Tensor]:
    """A LLaVA-repository checkpoint: config.json, one safetensors file, tokenizer files.
    Returns the raw tensors written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = write_llama3_tokenizer(folder, reserved_pad)
    config = llava_llama_config(len(tok), str(clip_dir), **overrides)
    config["bos_token_id"] = tok.bos_token_id
    config["eos_token_id"] = tok.eos_token_id
    torch.manual_seed(seed)
    fields = {k: v for k, v in config.items() if not k.startswith("mm_")}
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    with torch.no_grad():  # non-trivial norms, so a mis-mapped norm would show
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    tensors = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    tensors["model.mm_projector.0.weight"] = torch.randn(D_MODEL, VISION_HIDDEN, generator=gen) * 0.2
    tensors["model.mm_projector.0.bias"] = torch.randn(D_MODEL, generator=gen) * 0.1
    tensors["model.mm_projector.2.weight"] = torch.randn(D_MODEL, D_MODEL, generator=gen) * 0.2
    tensors["model.mm_projector.2.bias"] = torch.randn(D_MODEL, generator=gen) * 0.1
    if tower_in_checkpoint:
        from safetensors.torch import load_file

        clip = load_file(str(clip_dir / "model.safetensors"))
        for k, v in clip.items():
            if k.startswith("vision_model."):
                tensors["model.vision_tower.vision_tower." + k] = v
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return tensors


# ------------------------------------------------------------------------------------ SAEs


def write_llama_scope(root: Path, layers: range | list[int], d_model: int = D_MODEL, d_sae: int = 128) -> Path:
    """A release snapshot: one `Llama3_1-8B-Base-L{L}R-8x` folder per layer."""
    for layer in layers:
        gen = torch.Generator().manual_seed(layer)
        folder = root / f"Llama3_1-8B-Base-L{layer}R-8x"
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        tensors = {
            "encoder.weight": torch.randn(d_sae, d_model, generator=gen) / math.sqrt(d_model),
            "encoder.bias": torch.randn(d_sae, generator=gen) * 0.1,
            "decoder.weight": torch.randn(d_model, d_sae, generator=gen) * 0.5,
            "decoder.bias": torch.randn(d_model, generator=gen) * 0.1,
        }
        save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
        hook = f"blocks.{layer}.hook_resid_post"
        hp = {
            "d_model": d_model,
            "d_sae": d_sae,
            "act_fn": "jumprelu",
            "jump_relu_threshold": 0.3,
            "top_k": 50,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": 3.0, "out": 3.5},
            "sparsity_include_decoder_norm": True,
            "use_decoder_bias": True,
            "apply_decoder_bias_to_pre_encoder": False,
            "hook_point_in": hook,
            "hook_point_out": hook,
        }
        (folder / "hyperparams.json").write_text(json.dumps(hp))
    return root


# ------------------------------------------------------------------------------------ data

QUESTIONS = [
    ("Is the cat to the left of the dog?", "yes/no", "yes", "is the"),
    ("What colour is the bus?", "other", "red", "what color is the"),
    ("How many people are there?", "number", "2", "how many"),
    ("What does the sign say?", "other", "stop", "what does the"),
    ("Is the cup on top of the table?", "yes/no", "no", "is the"),
    ("What is behind the fence?", "other", "tree", "what is"),
]


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def vqav2_schema(with_answers: bool = True) -> pa.Schema:
    """`lmms-lab/VQAv2`'s parquet schema (the test split has nulls where answers would be)."""
    answers = pa.list_(
        pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
    )
    features = {
        "question_type": {"dtype": "string", "_type": "Value"},
        "multiple_choice_answer": {"dtype": "string", "_type": "Value"},
        "answers": [{"answer": {"dtype": "string", "_type": "Value"},
                     "answer_confidence": {"dtype": "string", "_type": "Value"},
                     "answer_id": {"dtype": "int64", "_type": "Value"}}],
        "image_id": {"dtype": "int64", "_type": "Value"},
        "answer_type": {"dtype": "string", "_type": "Value"},
        "question_id": {"dtype": "int64", "_type": "Value"},
        "question": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
    }
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema(
        [
            ("question_type", pa.string()),
            ("multiple_choice_answer", pa.string()),
            ("answers", answers),
            ("image_id", pa.int64()),
            ("answer_type", pa.string()),
            ("question_id", pa.int64()),
            ("question", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ],
        metadata=meta,
    )


def write_vqav2(root: Path, splits: dict[str, int], files_per_split: int = 2) -> Path:
    """`root/data/{split}-0000i-of-0000n.parquet` with `n_rows` rows per split; images differ
    per split (validation from COCO val2014 ids, test from test2015 ids)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for s, (split, n_rows) in enumerate(splits.items()):
        rows = []
        for i in range(n_rows):
            q, atype, ans, qtype = QUESTIONS[i % len(QUESTIONS)]
            image_id = (s + 1) * 100_000 + i // 2  # two questions per image
            test = split.startswith("test")
            rows.append({
                "question_type": qtype,
                "multiple_choice_answer": None if test else ans,
                "answers": None if test else [
                    {"answer": ans, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)
                ],
                "image_id": image_id,
                "answer_type": atype,
                "question_id": image_id * 1000 + i % 2,
                "question": q,
                "image": {"bytes": jpeg(image_id), "path": f"COCO_{split}_{image_id:012d}.jpg"},
            })
        schema = vqav2_schema()
        bounds = np.linspace(0, n_rows, files_per_split + 1).astype(int)
        for f in range(files_per_split):
            part = rows[bounds[f]:bounds[f + 1]]
            table = pa.Table.from_pylist(part, schema=schema)
            pq.write_table(table, root / "data" / f"{split}-{f:05d}-of-{files_per_split:05d}.parquet")
    return root


VSR_ROWS = [
    ("000000000001.jpg", "The cat is to the left of the dog.", 1, "left of"),
    ("000000000002.jpg", "The cup is on top of the table.", 0, "on top of"),
    ("000000000003.jpg", "The bus is behind the car.", 1, "behind"),
    ("000000000004.jpg", "The person is under the umbrella.", 1, "under"),
    ("000000000005.jpg", "The dog is in front of the bench.", 0, "in front of"),
    ("000000000006.jpg", "The horse is far away from the car.", 1, "far away from"),
]


def write_vsr(folder: Path, coco: Path, missing: int = 0, split: str = "test") -> Path:
    """`{split}.jsonl` rows as `cambridgeltl/vsr_random` holds them, and a COCO folder with the
    images (train2017/ and val2017/); the last `missing` images are left out."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption, label, relation) in enumerate(VSR_ROWS):
        sub = "train2017" if i % 2 == 0 else "val2017"
        lines.append(json.dumps({
            "image": image,
            "image_link": f"http://images.cocodataset.org/{sub}/{image}",
            "caption": caption,
            "label": label,
            "relation": relation,
            "annotator_id": i,
            "vote_true_validator_id": [1, 2],
            "vote_false_validator_id": [],
        }))
        if i < len(VSR_ROWS) - missing:
            (coco / sub).mkdir(parents=True, exist_ok=True)
            (coco / sub / image).write_bytes(jpeg(1000 + i, (48, 32)))
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder

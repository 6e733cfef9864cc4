#!/usr/bin/env python3
"""Builds the tiny random-weights Idefics3 (SmolVLM-shaped) fixture and transformers' reference
outputs for it, so that turbine's vision path is checked against the reference without torch in
CI. The fixture is committed under tests/fixtures/tiny-idefics3/; rerun this only to change it.

Needs torch, transformers and pillow (a separate venv; see tests/fixtures/tiny-idefics3/README.md):

    python3 -m venv /root/.cache/turbine/ref-venv
    /root/.cache/turbine/ref-venv/bin/pip install torch transformers pillow
    /root/.cache/turbine/ref-venv/bin/python scripts/make-vlm-fixture.py tests/fixtures/tiny-idefics3

What it writes into OUT:
  config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json,
  preprocessor_config.json, processor_config.json, chat_template.json, generation_config.json:
      an HF directory in SmolVLM's layout, loadable by `Idefics3ForConditionalGeneration`
      and by turbine (`model.path`).
  images/a.png, images/b.png: the two reference images (PNG, so every decoder sees the same
      pixels).
  reference.safetensors: per image i, `pixel_values.i` ([tiles, 3, H, W], what the processor
      made), `image_embeds.i` ([tiles, image_seq_len, text_hidden], the connector's output),
      `first_logits.i` (the logits of the first generated position).
  reference.json: per image, the prompt's text and token ids, the greedy tokens, and the
      smallest top-1/top-2 logit margin seen while generating (near-ties make "exact" moot).

Weights are random with a larger spread than transformers' init, so logits are far from
uniform and greedy decoding is decisive; all shapes are tiny (a few MB in all).
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)

SEED = 1234
# Tiny shapes: vision 32x32 tiles of 8x8 patches (16 patches), pixel shuffle by 2 -> 4 image
# tokens per tile; a tile grid of up to 2x2 plus the global image.
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (VISION["image_size"] // VISION["patch_size"]) ** 2 // SCALE_FACTOR**2
TILE = VISION["image_size"]
LONGEST_EDGE = 2 * TILE
MAX_NEW_TOKENS = 8
LOGIT_SCALE = 10.0
MIN_MARGIN = 0.1

# SmolVLM's chat template, extended so a message's content may also be a plain string.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>"]
IMAGE_SPECIAL = ["<fake_token_around_image>", "<image>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]

CORPUS = [
    "User: What is in this picture? Assistant: A red square on a blue sky.",
    "User: Describe the image. Assistant: There are stripes, a circle and some green grass.",
    "The quick brown fox jumps over the lazy dog. 0123456789 .,;:!?'\"()[]{}<>-_=+/*&%$#@",
    "images, colours, shapes: red green blue yellow white black square circle line",
]


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=TEXT["max_position_embeddings"],
    )
    fast.add_special_tokens({"additional_special_tokens": IMAGE_SPECIAL})
    return fast


def make_images():
    """Two small deterministic pictures: one wider than a tile (split 2x1), one tiny."""
    rng = np.random.default_rng(SEED)
    a = np.zeros((40, 56, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:40, 0:56]
    a[..., 0] = (xx * 4) % 256
    a[..., 1] = (yy * 6) % 256
    a[..., 2] = ((xx + yy) * 3) % 256
    a[10:25, 8:30] = [230, 30, 40]
    b = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    b[5:15, 6:18] = [20, 200, 90]
    return [Image.fromarray(a, "RGB"), Image.fromarray(b, "RGB")]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def reference(model, processor):
    """transformers' outputs for the two images: token ids, pixel values, embeddings, greedy."""
    refs = {}
    tensors = {}
    prompts = ["What is in this picture?", "Describe the image."]
    for i, (img, question) in enumerate(zip(make_images(), prompts)):
        name = "ab"[i]
        data = png_bytes(img)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": question}],
            }
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=[[img]], return_tensors="pt")
        with torch.no_grad():
            pixel_values = inputs["pixel_values"]
            pixel_mask = inputs.get("pixel_attention_mask")
            embeds = model.model.get_image_features(pixel_values, pixel_mask).pooler_output[0]
            gen = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = gen.sequences[0, prompt_len:].tolist()
        margins = []
        for s in gen.scores:
            top2 = torch.topk(s[0], 2).values
            margins.append(float(top2[0] - top2[1]))
        tiles = pixel_values.shape[1]
        tensors[f"pixel_values.{i}"] = pixel_values[0].contiguous().float()
        tensors[f"image_embeds.{i}"] = (
            embeds.reshape(tiles, IMAGE_SEQ_LEN, -1).contiguous().float()
        )
        tensors[f"first_logits.{i}"] = gen.scores[0][0].contiguous().float()
        refs[name] = {
            "image": f"images/{name}.png",
            "size": [img.width, img.height],
            "question": question,
            "prompt_text": text,
            "prompt_ids": inputs["input_ids"][0].tolist(),
            "tiles": tiles,
            "greedy_tokens": new_tokens,
            "min_top2_margin": min(margins),
        }
    return refs, tensors


def write_images(out: Path) -> None:
    for name, img in zip("ab", make_images()):
        (out / "images" / f"{name}.png").write_bytes(png_bytes(img))


def random_model(config, seed: int):
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn_like(p) * (1.5 / fan_in**0.5))
        # Sharp logits: the gaps between the top tokens grow with the head's scale.
        model.lm_head.weight.mul_(LOGIT_SCALE)
    return model


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)

    tokenizer = build_tokenizer(out)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Idefics3Config(
        vision_config=VISION,
        text_config=dict(
            TEXT,
            model_type="llama",
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        ),
        scale_factor=SCALE_FACTOR,
        image_token_id=image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    # The first seed from SEED whose greedy steps all have a top-1/top-2 margin of at least
    # MIN_MARGIN: a near-tie would make "the same greedy tokens" a coin toss for any
    # implementation that rounds differently.
    for seed in range(SEED, SEED + 64):
        model = random_model(config, seed)
        refs, tensors = reference(model, processor)
        if min(r["min_top2_margin"] for r in refs.values()) >= MIN_MARGIN:
            break
    else:
        raise SystemExit(f"no seed in {SEED}..{SEED + 64} gives margins >= {MIN_MARGIN}")
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)

    processor.save_pretrained(out)
    # The tokenizer's own template too, for loaders that read only tokenizer_config.json.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")

    write_images(out)
    save_file(tensors, str(out / "reference.safetensors"))

    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": seed,
        "image_token_id": image_token_id,
        "image_seq_len": IMAGE_SEQ_LEN,
        "max_new_tokens": MAX_NEW_TOKENS,
        "images": refs,
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: v["greedy_tokens"] for k, v in refs.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny-idefics3"))

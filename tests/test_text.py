"""minisd.text: captions, tokenizers (against open_clip's), encoders and the text conditioner."""

from __future__ import annotations

import re

import pytest
import torch

from minisd import text
from minisd.conditioning import ConditionedUNet, TextConditioner
from minisd.text import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    DIGIT_WORDS,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    CLIPTextEncoder,
    PretrainedTextEncoder,
    TransformerTextConfig,
    TransformerTextEncoder,
    caption,
    random_captions,
)

SENTENCES = [
    "a handwritten digit seven",
    "A photograph of an astronaut riding a horse",
    "the number 7, written twice: 77!",
    "don't panic -- it's only café art",
    "",
    "a " * 100,  # longer than 77 tokens: truncated, as open_clip does
]


@pytest.fixture(scope="module")
def minilm() -> PretrainedTextEncoder:
    return PretrainedTextEncoder()


# ----- captions -------------------------------------------------------------------------------
def test_captions_name_the_digit_in_words_or_numerals() -> None:
    assert caption(7) == "a handwritten digit seven"
    for template in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES:
        for d in range(10):
            c = caption(d, template)
            assert DIGIT_WORDS[d] in c.split() or str(d) in c.split(), (template, d)
    with pytest.raises(ValueError, match="int 0-9"):
        caption(10)
    with pytest.raises(ValueError, match="int 0-9"):
        caption(True)


def test_held_out_phrasings_are_never_trained_on() -> None:
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    train = {caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES}
    held = {caption(d, t) for d in range(10) for t in HELD_OUT_TEMPLATES}
    assert not train & held
    # not a prefix or a case variant either
    lower = {c.lower() for c in train}
    assert not any(c.lower() in lower for c in held)


def test_random_captions_use_every_template_and_follow_the_generator() -> None:
    labels = torch.arange(10).repeat(50)
    a = random_captions(labels, generator=torch.Generator().manual_seed(0))
    b = random_captions(labels, generator=torch.Generator().manual_seed(0))
    assert a == b and len(a) == 500
    used = {
        t
        for c, d in zip(a, labels.tolist(), strict=True)
        for t in TRAIN_TEMPLATES
        if caption(d, t) == c
    }
    assert used == set(TRAIN_TEMPLATES)
    with pytest.raises(ValueError, match="at least one template"):
        random_captions([1], templates=())


# ----- tokenizers -----------------------------------------------------------------------------
def test_clip_tokenizer_ids_equal_open_clips() -> None:
    import open_clip

    ref = open_clip.get_tokenizer("ViT-L-14")  # SD v1's text encoder's tokenizer
    ours = CLIPTextEncoder.__new__(CLIPTextEncoder)  # tokenizer only, no 123M weights
    ours.tokenizer, ours.max_length = text.clip_tokenizer(), 77
    with pytest.warns(UserWarning, match="truncated"):
        ids = ours.tokenize(SENTENCES)
    want = ref(SENTENCES)
    # open_clip pads with 0 after the end token; SD pads with the end token itself (49407)
    for got_row, want_row in zip(ids.tolist(), want.tolist(), strict=True):
        n = next(i for i, v in enumerate(want_row) if v == CLIP_EOS_ID) + 1
        assert got_row[:n] == want_row[:n]
        assert got_row[n:] == [CLIP_EOS_ID] * (77 - n)
    assert ids.shape == (6, 77) and (ids[:, 0] == CLIP_BOS_ID).all()
    assert ids[4, :2].tolist() == [CLIP_BOS_ID, CLIP_EOS_ID]  # the empty prompt
    assert ids[5, -1] == CLIP_EOS_ID  # truncated, still ended


def test_wordpiece_splits_words_clip_bpe_does_not_need_to() -> None:
    tok = text.wordpiece_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("an mnist digit")["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and "##ist" in "".join(pieces[1:-1])
    clip = text.clip_tokenizer()
    assert clip.convert_ids_to_tokens(clip("seven")["input_ids"]) == [
        "<|startoftext|>",
        "seven</w>",
        "<|endoftext|>",
    ]


# ----- encoders -------------------------------------------------------------------------------
def test_pretrained_encoder_is_frozen_deterministic_and_one_vector_per_token(minilm) -> None:
    assert minilm.dim == 384 and minilm.max_length == 32
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()  # the owner's mode must not switch on its dropout
    a = minilm.encode(["a handwritten digit seven", "the number 7"])
    b = minilm.encode(["the number 7", "a handwritten digit seven"])
    assert a.shape == (2, 32, 384)
    torch.testing.assert_close(a, b.flip(0))
    ids = minilm.tokenize(["the number 7"])
    mask = minilm.attention_mask(ids)
    assert mask[0].tolist() == [True] * 5 + [False] * 27  # [CLS] the number 7 [SEP]
    # padding does not leak into the real tokens: a longer pad gives the same vectors
    longer = PretrainedTextEncoder(max_length=40)
    torch.testing.assert_close(longer.encode("the number 7")[:, :5], a[1:, :5])


def test_long_prompts_are_truncated_with_a_warning_and_bad_prompts_refused(minilm) -> None:
    with pytest.warns(UserWarning, match="longer than the encoder's 32 tokens"):
        ids = minilm.tokenize("seven " * 40)
    assert ids.shape == (1, 32)
    with pytest.raises(ValueError, match="empty list of prompts"):
        minilm.tokenize([])
    with pytest.raises(TypeError, match=re.escape("caption(7)")):
        minilm.tokenize(["seven", 7])
    with pytest.raises(TypeError, match="string or a list of strings"):
        minilm.tokenize(torch.tensor([7]))
    with pytest.raises(ValueError, match=r"shape \(B, 32\)"):
        minilm(torch.zeros(2, 8, dtype=torch.long))


def test_sd_v1_text_encoder_has_clips_size() -> None:
    with torch.device("meta"):
        enc = CLIPTextEncoder()
    # OpenAI CLIP ViT-L/14's text tower, as in SD v1's cond_stage_model.transformer
    assert sum(p.numel() for p in enc.parameters()) == 123_060_480
    assert enc.dim == 768 and enc.max_length == 77 and enc.attention_mask(None) is None


def test_jointly_trained_encoder_masks_padding_and_learns() -> None:
    torch.manual_seed(0)
    enc = TransformerTextEncoder(TransformerTextConfig(dim=32, depth=1, heads=2))
    ids = enc.tokenize(["seven", "the number 7"])
    out = enc(ids)
    assert out.shape == (2, 32, 32)
    # the padding's embedding cannot change a real token's vector: it is masked out
    with torch.no_grad():
        enc.token_emb.weight[enc.pad_id] += 5.0
    torch.testing.assert_close(enc(ids)[0, :3], out[0, :3])
    assert not torch.allclose(enc(ids)[0, 3:], out[0, 3:])
    with pytest.raises(ValueError, match="dim must divide by heads"):
        TransformerTextConfig(dim=30, heads=4)


# ----- the text conditioner -------------------------------------------------------------------
def test_text_conditioner_batches_drops_and_caches(minilm) -> None:
    cond = TextConditioner(minilm)
    ids = cond.batch(["seven", "two", "one"], 3)
    assert ids.shape == (3, 32) and torch.equal(cond.batch(ids, 3), ids)
    assert torch.equal(cond.batch("seven", 3), cond.batch(["seven"] * 3, 3))
    null = cond.batch(None, 2)
    assert torch.equal(null, minilm.tokenize(["", ""]))
    with pytest.raises(ValueError, match="need one prompt or 3 prompts"):
        cond.batch(["a", "b"], 3)
    kwargs = cond.model_kwargs(ids)
    assert set(kwargs) == {"context", "context_mask"}
    torch.testing.assert_close(kwargs["context"], minilm(ids))
    assert len(cond._cache) == 3
    cond.model_kwargs(cond.batch(["two", "two"], 2))
    assert len(cond._cache) == 3  # seen before: not encoded again
    dropped = cond.drop(ids, 0.5, torch.Generator().manual_seed(0))
    rows = [torch.equal(dropped[i], null[0]) or torch.equal(dropped[i], ids[i]) for i in range(3)]
    assert all(rows) and not torch.equal(dropped, ids)
    assert torch.equal(cond.drop(ids, 0.0, torch.Generator()), ids)


def test_conditioned_unet_trains_the_text_encoder_with_it() -> None:
    import dataclasses

    from minisd.diffusion import diffusion_loss_fn
    from minisd.schedule import NoiseSchedule
    from minisd.train import TrainConfig, fit
    from minisd.unet import TINY, UNetModel

    torch.manual_seed(0)
    enc = TransformerTextEncoder(TransformerTextConfig(dim=16, depth=1, heads=2))
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1, context_dim=16))
    model = ConditionedUNet(unet, TextConditioner(enc))
    before = enc.token_emb.weight.detach().clone()
    prompts = ["dark", "bright"] * 8
    x = torch.tensor([-0.8, 0.8] * 8).view(-1, 1, 1, 1).expand(16, 1, 8, 8).contiguous()
    data = (x, model.conditioner.batch(prompts, 16))
    cfg = TrainConfig(steps=3, batch_size=8, ema_decay=None, log_every=1)
    fit(
        model,
        diffusion_loss_fn(NoiseSchedule("linear", 50), class_dropout=0.1),
        data,
        cfg,
        progress=False,
    )
    assert not torch.equal(enc.token_emb.weight, before)
    assert any(k.startswith("conditioner.encoder.") for k in model.state_dict())


def test_text_models_save_load_and_sample_from_prompts(tmp_path, minilm) -> None:
    import dataclasses

    from minisd.evaluation import generate
    from minisd.pretrained import DiffusionModel, load_diffusion, save_diffusion
    from minisd.schedule import NoiseSchedule
    from minisd.unet import TINY, UNetModel

    torch.manual_seed(0)
    schedule = NoiseSchedule("linear", 20)
    for encoder in (minilm, TransformerTextEncoder(TransformerTextConfig(dim=16, heads=2))):
        cfg = dataclasses.replace(TINY, in_channels=1, out_channels=1, context_dim=encoder.dim)
        unet = UNetModel(cfg).eval()
        from helpers import randomize

        randomize(unet, std=0.1)
        model = DiffusionModel(unet, schedule, "eps", {}, conditioner=TextConditioner(encoder))
        config = model.sampler_config("ddim", 4)
        seven = generate(model, 4, config, image_size=8, cond="a handwritten seven")
        two = generate(model, 4, config, image_size=8, cond=["two"] * 4)
        assert not torch.allclose(seven, two)
        path = save_diffusion(tmp_path / "m.safetensors", unet, schedule, "eps",
                              conditioner=model.conditioner, dtype=torch.float32)  # fmt: skip
        back = load_diffusion(path)
        stored = list(back.unet.state_dict())
        assert back.metadata["text_encoder"]["kind"] in ("pretrained", "transformer")
        again = generate(back, 4, config, image_size=8, cond="a handwritten seven")
        torch.testing.assert_close(again, seven, atol=1e-5, rtol=0)
        assert stored == list(unet.state_dict())
        from minisd.checkpoint import load_tensors

        has_text = any(k.startswith("cond_stage_model.") for k in load_tensors(path)[0])
        assert has_text == (encoder is not minilm)  # a named pretrained encoder is not copied
    with pytest.raises(ValueError, match="pass conditioner=TextConditioner"):
        DiffusionModel(unet, schedule, "eps", {})


def test_prompts_per_digit_take_the_phrasings_in_turn() -> None:
    from minisd.evaluation import prompts_per_digit

    prompts, digits = prompts_per_digit(HELD_OUT_TEMPLATES[:3], 4)
    assert digits.tolist() == [d for d in range(10) for _ in range(4)]
    assert prompts[:4] == [caption(0, HELD_OUT_TEMPLATES[i % 3]) for i in range(4)]
    with pytest.raises(ValueError, match="n_per_digit >= 1"):
        prompts_per_digit(TRAIN_TEMPLATES, 0)


@pytest.mark.slow
def test_text_train_sample_and_evaluate_text_commands(tmp_path, monkeypatch, capsys) -> None:
    from minisd import classifier, cli, data, evaluation, metrics
    from minisd.checkpoint import load_json
    from minisd.pretrained import CHECKPOINTS, load_diffusion

    if not (data.data_root() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.skip("real MNIST not in the data folder (set MINISD_DATA, as .ci/run does)")
    small_reference = classifier.classify(
        classifier.load_classifier(), data.load_mnist(train=True, download=False, limit=500)[0]
    )[0]
    monkeypatch.setattr(evaluation, "reference_features", lambda clf: small_reference)
    monkeypatch.setattr(metrics, "reference_features", lambda clf: small_reference)
    vae = str(CHECKPOINTS / "vae_mnist_f4.safetensors")
    out = tmp_path / "text.safetensors"
    kinds = {"minilm": "pretrained", "joint": "transformer"}
    for encoder, kind in kinds.items():
        args = ["--limit", "64", "--preset", "TINY", "--steps", "2", "--batch-size", "8"]
        cli.main(["train", "--latent-vae", vae, "--text-encoder", encoder, *args,
                  "--export", str(out)])  # fmt: skip
        model = load_diffusion(out)
        assert model.metadata["text_encoder"]["kind"] == kind
        assert model.unet.config.context_dim == model.conditioner.encoder.dim
    sample = tmp_path / "s.pt"
    cli.main(["sample", "--checkpoint", str(out), "--prompt", "a handwritten 7", "--n", "2",
              "--steps", "2", "--out", "", "--save-tensor", str(sample)])  # fmt: skip
    assert torch.load(sample).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="--label: .* is not class-conditional"):
        cli.main(["sample", "--checkpoint", str(out), "--label", "3", "--out", ""])
    cli.main(["evaluate-text", "--checkpoint", str(out), "--n-per-digit", "1",
              "--n-unconditional", "10", "--steps", "2", "--write-sidecar"])  # fmt: skip
    metrics_ = load_json(out.with_suffix(".json"))["metrics"]
    assert metrics_["text"]["standard"]["n"] == metrics_["text"]["held_out"]["n"] == 10
    assert metrics_["guidance_scale"] == 1.0 and metrics_["meets_bar"] is False
    assert "text bar: NOT met" in capsys.readouterr().out


def test_sd_v2_text_encoder_is_openclip_vit_h_up_to_its_penultimate_layer() -> None:
    from minisd.text import SD_V2_PAD_TOKEN, sd_v2_text_config

    with torch.device("meta"):
        enc = CLIPTextEncoder(sd_v2_text_config(), pad_token=SD_V2_PAD_TOKEN)
    # 23 of OpenCLIP ViT-H/14's 24 text layers: diffusers' SD 2.1 text_encoder has this count
    assert sum(p.numel() for p in enc.parameters()) == 340_387_840
    assert enc.dim == 1024 and enc.pad_id == 0  # SD 2.x pads with "!" (id 0), as OpenCLIP does
    assert enc.tokenize("a cat")[0, :5].tolist() == [49406, 320, 2368, 49407, 0]

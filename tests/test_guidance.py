"""Classifier-free guidance: the formula, one batched pass, its two ends, negatives, bad input."""

import dataclasses
import math

import pytest
import torch
from helpers import randomize, save_tiny_text_model

from minisd.guidance import check_scale, classifier_free
from minisd.pretrained import DiffusionModel
from minisd.schedule import NoiseSchedule
from minisd.unet import TINY, UNetModel

CLASS_UNET = dataclasses.replace(TINY, in_channels=1, out_channels=1, num_classes=10)


def class_model(prediction: str = "eps") -> DiffusionModel:
    torch.manual_seed(0)
    unet = UNetModel(CLASS_UNET).eval()
    randomize(unet, std=0.1)
    return DiffusionModel(unet, NoiseSchedule("linear", 50), prediction, {})


def test_guidance_extrapolates_from_the_unconditional_prediction():
    calls = []

    def model_fn(x, t, y):  # eps depends on the label linearly: easy to predict by hand
        calls.append(len(x))
        return x * 0 + y.float()[:, None]

    x, t = torch.zeros(3, 2), torch.tensor([5, 5, 5])
    cond, null = {"y": torch.tensor([7, 7, 7])}, {"y": torch.tensor([10, 10, 10])}
    for s in (0.0, 1.0, 2.5, 7.5):
        eps = classifier_free(model_fn, cond, null, s)(x, t)
        assert torch.allclose(eps, torch.full((3, 2), 10 + s * (7 - 10)))
    # Ho & Salimans' weight w is SD's scale minus one: (1 + w) eps_c - w eps_u
    w = 1.5
    assert torch.allclose(classifier_free(model_fn, cond, null, 1 + w)(x, t),
                          torch.full((3, 2), (1 + w) * 7 - w * 10))  # fmt: skip
    assert calls[:4] == [3, 3, 6, 6]  # scales 0 and 1 need one half; others one batch of 2B


def test_batched_guidance_equals_two_separate_passes():
    model = class_model()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([3, 10, 30, 49])
    cond, null = model.condition([1, 2, 3, 4], 4), model.condition(None, 4)
    with torch.no_grad():
        eps_c, eps_u = model.unet(x, t, **cond), model.unet(x, t, **null)
    guided = classifier_free(model._model_fn, cond, null, 4.0)(x, t)
    torch.testing.assert_close(guided, eps_u + 4.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, eps_c, atol=1e-3)


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    model = class_model()
    config = model.sampler_config("ddim", 5)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    plain = model.sample(x_T, config, cond=3)
    assert torch.equal(model.sample(x_T, config, cond=3, guidance_scale=1.0), plain)
    null = model.sample(x_T, config, cond=None)
    assert torch.equal(model.sample(x_T, config, cond=3, guidance_scale=0.0), null)
    guided = model.sample(x_T, config, cond=3, guidance_scale=3.0)
    assert not torch.allclose(guided, plain, atol=1e-3)
    # the negative condition replaces the null one: guiding 3 away from 3 is just 3
    same = model.sample(x_T, config, cond=3, guidance_scale=3.0, negative=3)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(model.sample(x_T, config, cond=3, guidance_scale=3.0, negative=5),
                              guided, atol=1e-3)  # fmt: skip


def test_guiding_a_v_model_combines_before_converting_to_noise():
    model = class_model("v")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 40])
    guided = model.guided_eps_fn([1, 2], 2, 2.0)(x, t)
    eps_c = model.eps_fn(**model.condition([1, 2], 2))(x, t)
    eps_u = model.eps_fn(**model.condition(None, 2))(x, t)
    torch.testing.assert_close(guided, eps_u + 2.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


def test_generate_passes_guidance_and_per_sample_negatives_through_its_batches():
    from minisd.evaluation import generate

    model = class_model()
    config = model.sampler_config("ddim", 4)
    whole = generate(model, 6, config, image_size=8, cond=2, guidance_scale=2.0,
                     negative=[0, 1, 2, 3, 4, 5])  # fmt: skip
    parts = generate(model, 6, config, image_size=8, cond=2, guidance_scale=2.0,
                     negative=[0, 1, 2, 3, 4, 5], batch_size=4)  # fmt: skip
    assert whole.shape == parts.shape == (6, 1, 8, 8)
    plain = generate(model, 6, config, image_size=8, cond=2)
    torch.testing.assert_close(whole[2], plain[2], atol=1e-5, rtol=0)  # negative 2 = cond 2


@pytest.mark.parametrize(
    ("scale", "error", "match"),
    [
        (math.nan, ValueError, "finite and >= 0"),
        (-1.0, ValueError, "finite and >= 0"),
        (math.inf, ValueError, "finite"),
        ("high", TypeError, "must be a number"),
        (None, TypeError, "must be a number"),
    ],
)
def test_bad_scales_say_what_is_expected(scale, error, match):
    with pytest.raises(error, match=match):
        check_scale(scale)
    with pytest.raises(error, match=match):
        class_model().sample(torch.randn(1, 1, 8, 8), cond=1, guidance_scale=scale)


def test_guidance_needs_a_conditional_model_and_matching_arguments():
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1)).eval()
    model = DiffusionModel(unet, NoiseSchedule("linear", 10), "eps", {})
    with pytest.raises(ValueError, match="unconditional; use scale 1"):
        model.sample(torch.randn(1, 1, 8, 8), guidance_scale=2.0)
    with pytest.raises(ValueError, match="same arguments"):
        classifier_free(lambda x, t, **k: x, {"y": 1}, {"context": 2}, 2.0)


# ----- the text-to-image command --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_text_checkpoint(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("text") / "text.safetensors", 50)


def test_generate_writes_one_row_per_prompt_and_the_tensor(tiny_text_checkpoint, tmp_path):
    from minisd import cli
    from minisd.evaluation import generate
    from minisd.pretrained import load_diffusion

    out, pt = tmp_path / "grid.png", tmp_path / "grid.pt"
    cli.main(["generate", "a handwritten seven", "two", "--checkpoint", str(tiny_text_checkpoint),
              "--n", "3", "--steps", "4", "--guidance", "2.5", "--negative", "one",
              "--out", str(out), "--save-tensor", str(pt), "--seed", "5"])  # fmt: skip
    images = torch.load(pt)
    assert images.shape == (6, 1, 28, 28) and images.abs().max() <= 1
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    model = load_diffusion(tiny_text_checkpoint)
    expected = generate(model, 6, model.sampler_config("dpm++2m", 4), 5,
                        cond=["a handwritten seven"] * 3 + ["two"] * 3, guidance_scale=2.5,
                        negative="one")  # fmt: skip
    torch.testing.assert_close(images, expected)  # the command draws what `generate` draws
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary files left


def test_generate_checks_its_outputs_and_model_before_sampling(tiny_text_checkpoint, tmp_path):
    from minisd import cli
    from minisd.pretrained import save_diffusion

    run = ["generate", "seven", "--checkpoint", str(tiny_text_checkpoint), "--steps", "2"]
    for extra, match in (
        (["--out", str(tmp_path / "missing" / "g.png")], "does not exist; create it first"),
        (["--out", str(tmp_path / "g.txt")], r"one of \.png"),
        (["--out", str(tmp_path)], "one of"),
        (["--out", "", "--save-tensor", str(tmp_path / "g.npy")], r"\.pt"),
        (["--out", ""], "nothing to write"),
        (["--n", "0", "--out", str(tmp_path / "g.png")], "at least 1"),
    ):
        with pytest.raises(ValueError, match=match):
            cli.main(run + extra)
    assert not list(tmp_path.iterdir())
    class_path = save_diffusion(tmp_path / "class.safetensors", class_model().unet,
                                NoiseSchedule("linear", 50), "eps")  # fmt: skip
    with pytest.raises(ValueError, match="not a text-to-image model"):
        cli.main(["generate", "seven", "--checkpoint", str(class_path), "--out",
                  str(tmp_path / "g.png")])  # fmt: skip


# ----- classifier guidance ----------------------------------------------------------------------
class LinearClassifier(torch.nn.Module):
    """logits = W flatten(x) (+ t, which cancels in the softmax): its gradient is known."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T + t.float()[:, None]


def test_classifier_guidance_adds_the_scaled_gradient_of_log_p():
    from minisd.guidance import classifier_guidance

    schedule = NoiseSchedule("linear", 50)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 8, generator=g)
    clf = LinearClassifier(weight)
    x, t, y = (
        torch.randn(4, 2, 2, 2, generator=g),
        torch.tensor([3, 10, 20, 49]),
        torch.tensor([0, 1, 2, 1]),
    )
    eps_fn = lambda x, t: 0.5 * x  # noqa: E731
    with torch.no_grad():  # as inside every sampler
        got = classifier_guidance(eps_fn, clf, y, 2.0, schedule)(x, t)
    probs = (x.flatten(1) @ weight.T).softmax(-1)  # grad log p_y = W_y - sum_k p_k W_k
    grad = (weight[y] - probs @ weight).view_as(x)
    ab = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(got, 0.5 * x - 2.0 * (1 - ab).sqrt() * grad)
    assert torch.equal(classifier_guidance(eps_fn, clf, y, 0, schedule)(x, t), 0.5 * x)
    for scale, error in ((float("nan"), ValueError), (-1.0, ValueError), ("big", TypeError)):
        with pytest.raises(error):
            classifier_guidance(eps_fn, clf, y, scale, schedule)
    with pytest.raises(ValueError, match="one label per sample"):
        classifier_guidance(eps_fn, clf, y[:2], 1.0, schedule)(x, t)


def test_noisy_classifier_learns_labels_from_noisy_inputs():
    from minisd.guidance import NoisyClassifier, NoisyClassifierConfig, noisy_classifier_loss_fn
    from minisd.train import TrainConfig, fit

    cfg = NoisyClassifierConfig(in_channels=2, model_channels=8, norm_groups=4)
    torch.manual_seed(0)
    clf = NoisyClassifier(cfg)
    labels = torch.arange(64) % 2
    x0 = torch.randn(64, 2, 4, 4) * 0.3 + (labels.float() * 2 - 1).view(-1, 1, 1, 1)  # +-1 blobs
    assert clf(x0, torch.zeros(64, dtype=torch.long)).shape == (64, 10)
    schedule = NoiseSchedule("linear", 100)
    config = TrainConfig(steps=60, batch_size=32, lr=3e-3, ema_decay=None, log_every=10)
    result = fit(clf, noisy_classifier_loss_fn(schedule), (x0, labels), config, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0]
    clean = clf.eval()(x0, torch.zeros(64, dtype=torch.long)).argmax(1)
    assert (clean == labels).float().mean() > 0.9  # it reads lightly noised inputs
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        clf(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="divide by norm_groups"):
        NoisyClassifierConfig(model_channels=6, norm_groups=4)


# ----- the quality/diversity curve --------------------------------------------------------------
def test_best_guidance_picks_the_most_accurate_smallest_scale_and_checks_the_bar():
    from minisd.evaluation import best_guidance

    def row(scale, standard, held_out):
        return {"scale": scale, "standard": {"accuracy": standard},
                "held_out": {"accuracy": held_out}}  # fmt: skip

    rows = [row(1, 0.93, 0.91), row(3, 0.995, 0.97), row(5, 0.995, 0.98), row(9, 0.97, 0.99)]
    best, ok, why = best_guidance(rows)
    assert best["scale"] == 3 and ok and "guidance scale 3: 99.5%" in why
    best, ok, _ = best_guidance([row(1, 0.93, 0.91), row(3, 0.995, 0.85)])
    assert best["scale"] == 3 and not ok  # the held-out phrasings miss their 90%


def test_within_class_diversity_is_the_mean_pairwise_distance_per_class():
    from minisd.metrics import within_class_diversity

    features = torch.tensor([[0.0, 0], [3, 4], [0, 0], [0, 2], [9, 9]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one sample: no pairs, left out
    assert within_class_diversity(features, labels) == pytest.approx((5 + 2) / 2)
    with pytest.raises(ValueError, match="one label per feature"):
        within_class_diversity(features, labels[:3])
    with pytest.raises(ValueError, match="at least two samples"):
        within_class_diversity(features[:2], torch.tensor([0, 1]))


def test_guidance_curve_command_writes_rows_samples_and_plot(tiny_text_checkpoint, tmp_path,
                                                             monkeypatch):  # fmt: skip
    import json

    from minisd import cli
    from minisd.checkpoint import load_tensors

    _stub_scoring(monkeypatch)
    out = tmp_path / "curve.json"
    cli.main(["guidance-curve", "--checkpoint", str(tiny_text_checkpoint), "--scales", "0", "1",
              "3", "--n-per-digit", "2", "--steps", "2", "--keep", "1",
              "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["scale"] for r in results["rows"]] == [0.0, 1.0, 3.0]
    assert all(r["standard"]["n"] == r["held_out"]["n"] == 20 for r in results["rows"])
    assert results["baseline"]["n"] == 20 and results["sampler"] == "DPM++2M-2"
    assert isinstance(results["meets_bar"], bool) and results["best_scale"] in (0.0, 1.0, 3.0)
    kept, _ = load_tensors(out.with_suffix(".safetensors"))
    assert {k: tuple(v.shape) for k, v in kept.items()} == {
        f"scale {s}": (10, 1, 28, 28) for s in ("0", "1", "3")
    }
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="distinct guidance scales"):
        cli.main(["guidance-curve", "--checkpoint", str(tiny_text_checkpoint), "--scales", "1",
                  "1", "--out", str(out)])  # fmt: skip


def test_classifier_guided_model_steers_the_unconditional_prediction(tiny_text_checkpoint):
    from minisd.evaluation import generate
    from minisd.guidance import classifier_guidance, with_classifier_guidance
    from minisd.pretrained import load_diffusion

    model = load_diffusion(tiny_text_checkpoint)
    clf = LinearClassifier(torch.randn(10, 28 * 28, generator=torch.Generator().manual_seed(1)))
    guided = with_classifier_guidance(model, clf, 3.0)
    config = model.sampler_config("ddim", 3)
    labels = torch.tensor([7, 2, 7, 0])
    got = generate(guided, 4, config, seed=2, cond=labels)
    null = model.condition(None, 4)  # the empty prompt
    eps_fn = classifier_guidance(model.eps_fn(**null), clf, labels, 3.0, model.schedule)
    x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    expected = model.decode(config.sample(eps_fn, x_T, model.schedule)).clamp(-1, 1)
    torch.testing.assert_close(got, expected)
    unconditional = generate(model, 4, config, seed=2)
    torch.testing.assert_close(generate(guided, 4, config, seed=2), unconditional)
    assert not torch.allclose(got, unconditional)
    with pytest.raises(ValueError, match="its own scale"):
        generate(guided, 4, config, cond=labels, guidance_scale=2.0)
    with pytest.raises(ValueError, match="a label 0-9 for every sample"):
        generate(guided, 2, config, cond=torch.tensor([3, 10]))


def test_train_noisy_classifier_exports_a_loadable_classifier(tmp_path, monkeypatch):
    from minisd import cli, data
    from minisd.checkpoint import load_json
    from minisd.pretrained import load_noisy_classifier, save_autoencoder
    from minisd.vae import MNIST_F4, AutoencoderKL

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 28, 28, generator=g) * 2 - 1, torch.arange(24) % 10
    monkeypatch.setattr(data, "load_mnist", lambda train, limit=None: (x[:limit], y[:limit]))
    torch.manual_seed(0)
    vae_path, out = tmp_path / "vae.safetensors", tmp_path / "noisy.safetensors"
    save_autoencoder(
        vae_path, AutoencoderKL(dataclasses.replace(MNIST_F4, ch=8, norm_num_groups=4))
    )
    cli.main(["train-noisy-classifier", "--vae", str(vae_path), "--model-channels", "16",
              "--steps", "3", "--batch-size", "8", "--warmup", "1",
              "--export", str(out)])  # fmt: skip
    clf = load_noisy_classifier(out)
    assert clf.config.in_channels == 4 and clf.config.model_channels == 16
    assert clf.schedule.num_timesteps == 1000 and not clf.training
    assert clf(torch.zeros(2, 4, 8, 8), torch.tensor([0, 999])).shape == (2, 10)
    sidecar = load_json(out.with_suffix(".json"))
    assert sidecar["steps"] == 3 and sidecar["commands"][0].startswith(
        "python -m minisd train-noisy-classifier"
    )
    assert set(sidecar["test_accuracy_by_t"]) == {"0", "250", "500", "750", "999"}
    with pytest.raises(ValueError, match=r"\.safetensors"):
        cli.main(["train-noisy-classifier", "--vae", str(vae_path), "--steps", "1",
                  "--export", str(tmp_path / "noisy.pt")])  # fmt: skip
    with pytest.raises(ValueError, match="not a minisd noisy classifier"):
        load_noisy_classifier(vae_path)


def test_guidance_explorer_redraws_what_generate_draws(tiny_text_checkpoint):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minisd.evaluation import generate
    from minisd.pretrained import load_diffusion
    from minisd.widgets import GuidanceExplorer, draw_guidance_explorer

    model = load_diffusion(tiny_text_checkpoint)
    ex = GuidanceExplorer(model, "seven", n=3)
    assert ex.state.error is None and ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    ex.steps.value = 3
    ex.scale.value = 5.0
    want = generate(model, 3, model.sampler_config("dpm++2m", 3), 0, cond="seven",
                    guidance_scale=5.0)  # fmt: skip
    assert ex.state.scale == 5.0 and torch.equal(ex.state.images, want)
    ex.sampler.value, ex.seed.value, ex.prompt.value = "ddim", 4, "two"
    assert (ex.state.sampler, ex.state.seed, ex.state.prompt) == ("ddim", 4, "two")
    _, state = draw_guidance_explorer(model, "two", -1.0, "ddim", 3, 0, n=2)
    assert state.images is None and ">= 0" in state.error  # refused, shown as a message
    _, state = draw_guidance_explorer(model, "two", 1.0, "euler", 3, 0, n=2)
    assert "unknown sampler" in state.error
    plt.close("all")


def _stub_scoring(monkeypatch):
    """The project classifier, its reference features and the test set, small and random."""
    from minisd import evaluation
    from minisd.classifier import MnistClassifier

    torch.manual_seed(0)
    classifier = MnistClassifier().eval()
    images = torch.rand(20, 1, 28, 28) * 2 - 1
    monkeypatch.setattr(evaluation, "load_classifier", lambda: classifier)
    monkeypatch.setattr(evaluation, "reference_features", lambda c: torch.randn(50, 128))
    test_set = lambda train, limit: (images[:limit], torch.arange(limit) % 10)  # noqa: E731
    monkeypatch.setattr(evaluation, "load_mnist", test_set)
    return classifier


def test_compare_guidance_scores_both_methods_at_the_same_settings(
    tiny_text_checkpoint, tmp_path, monkeypatch
):
    import json

    from minisd import cli, evaluation
    from minisd.checkpoint import file_sha256, load_tensors
    from minisd.guidance import NoisyClassifier, NoisyClassifierConfig
    from minisd.pretrained import load_diffusion, save_noisy_classifier

    classifier = _stub_scoring(monkeypatch)
    torch.manual_seed(0)
    noisy = NoisyClassifier(NoisyClassifierConfig(in_channels=1, model_channels=8)).eval()
    clf_path = save_noisy_classifier(tmp_path / "noisy.safetensors", noisy,
                                     NoiseSchedule("linear", 50))  # fmt: skip
    out = tmp_path / "cg.json"
    run = ["compare-guidance", "--checkpoint", str(tiny_text_checkpoint), "--classifier",
           str(clf_path), "--n-per-digit", "2", "--steps", "2", "--keep", "1"]  # fmt: skip
    cli.main(run + ["--cfg-scales", "1", "2", "--cg-scales", "0", "5", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["noisy_classifier_sha256"] == file_sha256(clf_path)
    assert [(r["method"], r["scale"]) for r in results["rows"]] == [
        ("classifier-free", 1.0), ("classifier-free", 2.0), ("classifier", 0.0), ("classifier", 5.0)
    ]  # fmt: skip
    for r in results["rows"]:
        assert r["n"] == 20 and 0 <= r["accuracy"] <= 1 and len(r["per_digit"]) == 10
        assert r["mnist_fid"] > 0 and r["diversity"] > 0 and r["seconds_per_sample"] > 0
        assert 0 <= r["guide_accuracy"] <= 1
    kept, _ = load_tensors(out.with_suffix(".safetensors"))
    assert set(kept) == {"classifier-free 1", "classifier-free 2", "classifier 0", "classifier 5"}
    # classifier guidance at scale 0 is the unconditional model; both are scored by the project
    # classifier, on the digit each sample was asked for
    model = load_diffusion(tiny_text_checkpoint)
    digits = torch.arange(10).repeat_interleave(2)
    unconditional = evaluation.generate(model, 20, model.sampler_config("dpm++2m", 2), 0)
    torch.testing.assert_close(kept["classifier 0"], unconditional[::2])
    expected = evaluation.digit_accuracy(unconditional, digits, classifier)["accuracy"]
    assert results["rows"][2]["accuracy"] == pytest.approx(expected)
    t0 = torch.zeros(20, dtype=torch.long)
    guide = (noisy(unconditional, t0).argmax(1) == digits).float().mean().item()  # pixel model
    assert results["rows"][2]["guide_accuracy"] == pytest.approx(guide)
    other = save_noisy_classifier(tmp_path / "other.safetensors", noisy,
                                  NoiseSchedule("cosine", 50))  # fmt: skip
    with pytest.raises(ValueError, match="another noise schedule"):
        cli.main(["compare-guidance", "--checkpoint", str(tiny_text_checkpoint), "--classifier",
                  str(other), "--out", str(tmp_path / "x.json")])  # fmt: skip
    with pytest.raises(ValueError, match="distinct guidance scales"):
        cli.main(run + ["--cg-scales", "1", "1", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(run + ["--out", str(tmp_path / "missing" / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_compare_samplers_scores_a_text_model_on_its_prompts(
    tiny_text_checkpoint, tmp_path, monkeypatch
):
    import json

    from minisd import cli, evaluation
    from minisd.pretrained import load_diffusion
    from minisd.text import TRAIN_TEMPLATES

    classifier = _stub_scoring(monkeypatch)
    monkeypatch.setattr("minisd.classifier.load_classifier", lambda: classifier)
    monkeypatch.setattr("minisd.metrics.reference_features", lambda c: torch.randn(50, 128))
    out = tmp_path / "samplers.json"
    run = [
        "compare-samplers",
        "--checkpoint",
        str(tiny_text_checkpoint),
        "--n",
        "20",
        "--ddim-steps",
        "2",
        "--dpm-steps",
        "2",
        "3",
        "--guidance",
        "2",
        "--keep",
        "4",
    ]
    cli.main(run + ["--out", str(out)])
    results = json.loads(out.read_text())
    assert [r["name"] for r in results["rows"]] == ["DDIM-2", "DPM++2M-2", "DPM++2M-3"]
    assert results["guidance_scale"] == 2.0
    model = load_diffusion(tiny_text_checkpoint)
    prompts, digits = evaluation.prompts_per_digit(TRAIN_TEMPLATES, 2)
    images = evaluation.generate(model, 20, model.sampler_config("dpm++2m", 3), 0, cond=prompts,
                                 guidance_scale=2.0)  # fmt: skip
    expected = evaluation.digit_accuracy(images, digits, classifier)["accuracy"]
    assert results["rows"][2]["accuracy"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="multiple of 10"):
        cli.main(run[:4] + ["15", "--out", str(out)])
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(run + ["--out", str(tmp_path / "no" / "s.json")])


def test_generate_rejects_bad_settings_before_sampling(tiny_text_checkpoint, tmp_path, capsys):
    """Zero or negative steps, a NaN or negative scale, an unknown sampler, no prompts or a
    non-string prompt: each a clear error, and nothing written."""
    from minisd import cli
    from minisd.evaluation import generate
    from minisd.pretrained import load_diffusion

    run = ["generate", "seven", "--checkpoint", str(tiny_text_checkpoint),
           "--out", str(tmp_path / "g.png")]  # fmt: skip
    for extra, match in (
        (["--steps", "0"], "steps must be a positive int, got 0"),
        (["--steps", "-3"], "steps must be a positive int, got -3"),
        (["--steps", "60"], r"num_steps must be an int in \[1, 49\]"),
        (["--guidance", "nan"], "finite and >= 0"),
        (["--guidance", "-2"], "finite and >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            cli.main(run + extra)
    for args in (run + ["--sampler", "euler"], ["generate", "--out", str(tmp_path / "g.png")]):
        with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the choices
            cli.main(args)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'euler'" in err and "dpm++2m" in err
    assert "the following arguments are required: prompts" in err
    assert not list(tmp_path.iterdir())
    model = load_diffusion(tiny_text_checkpoint)
    with pytest.raises(ValueError, match="empty list of prompts"):
        generate(model, 2, model.sampler_config("ddim", 2), cond=[])
    with pytest.raises(TypeError, match="prompts must be strings, got int 7"):
        generate(model, 2, model.sampler_config("ddim", 2), cond=["seven", 7])
    with pytest.raises(ValueError, match="unknown sampler .euler.; choose one of ddim, ddpm, dpm"):
        model.sampler_config("euler", 10)


def test_results_record_repository_paths_that_hold_on_another_clone(tmp_path):
    from minisd.pretrained import CHECKPOINTS
    from minisd.provenance import repo_path

    assert repo_path(CHECKPOINTS / "ldm_text_mnist.safetensors") == (
        "data/checkpoints/ldm_text_mnist.safetensors"
    )  # the commands' default, an absolute path, is recorded relative to the repository
    assert repo_path("data/checkpoints/x.safetensors") == "data/checkpoints/x.safetensors"
    assert repo_path(tmp_path / "m.safetensors") == str(tmp_path / "m.safetensors")

"""Metrics: Fréchet distance against references and closed forms, KID's unbiasedness, the
classifier's shapes and errors, and the shipped checkpoint on real MNIST digits."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

from minisd import classifier, data, metrics
from minisd.checkpoint import save_tensors


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def reference_fid_numpy(a: torch.Tensor, b: torch.Tensor) -> float:
    """A different route to tr (S_a S_b)^(1/2): the eigenvalues of the non-symmetric product."""
    a, b = a.numpy(), b.numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b)
    tr_covmean = np.sqrt(np.clip(eig.real, 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def poly_kernel(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u @ v.T / u.shape[1] + 1) ** 3


def test_kid_matches_a_loop_over_distinct_pairs():
    x, y = gaussian(6, 4, 0), gaussian(6, 4, 1, shift=0.5)

    def k(u: torch.Tensor, v: torch.Tensor) -> float:
        return float((u @ v / 4 + 1) ** 3)

    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    expected = (
        sum(k(x[i], x[j]) for i, j in pairs) / len(pairs)
        + sum(k(y[i], y[j]) for i, j in pairs) / len(pairs)
        - 2 * sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    )
    mean, std = metrics.kernel_inception_distance(x, y, subsets=3, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0, abs=1e-12)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    a, b = gaussian(300, 6, 0), gaussian(200, 6, 1, shift=0.5, scale=1.5)
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    diff = (a.mean(0) - b.mean(0)).numpy()
    expected = diff @ diff + np.trace(cov_a + cov_b - 2 * covmean)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_non_symmetric_eigenvalue_route():
    mix = gaussian(8, 8, 5)  # correlated features, as real ones are
    a, b = gaussian(400, 8, 0) @ mix, gaussian(300, 8, 1, shift=0.3) @ mix.T
    assert metrics.frechet_distance(a, b) == pytest.approx(reference_fid_numpy(a, b), rel=1e-8)


def test_frechet_closed_forms():
    a = gaussian(500, 5, 0)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    # Same covariance, mean shifted by mu: the distance is exactly |mu|^2.
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(14.25, rel=1e-9)
    # Diagonal covariances: sum (sqrt(var_a) - sqrt(var_b))^2, here (1 - 2)^2 per dimension.
    b = (a - a.mean(0)) / a.std(0)
    assert metrics.frechet_distance(b, 2 * b) == pytest.approx(5.0, abs=0.05)


def test_frechet_is_biased_up_at_small_n():
    """Two samples of one distribution: the true distance is 0; the estimate falls like 1/n."""
    small = [
        metrics.frechet_distance(gaussian(100, 16, s), gaussian(100, 16, s + 50)) for s in range(5)
    ]
    large = [
        metrics.frechet_distance(gaussian(2000, 16, s), gaussian(2000, 16, s + 50))
        for s in range(5)
    ]
    assert np.mean(small) > 10 * np.mean(large) > 0


def test_kid_is_unbiased_where_the_plug_in_estimate_is_not():
    runs = [
        metrics.kernel_inception_distance(
            gaussian(100, 8, s), gaussian(100, 8, s + 100), subsets=1
        )[0]
        for s in range(30)
    ]
    mean, sem = np.mean(runs), np.std(runs) / np.sqrt(len(runs))
    assert abs(mean) < 3 * sem
    # The biased (V-statistic) estimate, diagonals kept, sits clearly above 0 for the same data.
    x, y = gaussian(100, 8, 0), gaussian(100, 8, 100)
    k = poly_kernel
    biased = (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item()
    assert biased > 10 * sem


def test_kid_subsets_and_shift():
    a, b = gaussian(300, 8, 0), gaussian(300, 8, 1)
    same_mean, same_std = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=100)
    assert abs(same_mean) < 3 * same_std
    shifted, _ = metrics.kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=100)
    assert shifted > 10 * same_std
    again = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=100)
    assert again == (same_mean, same_std)  # seeded subsets


def test_metric_input_errors():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        metrics.frechet_distance(torch.zeros(10), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.kernel_inception_distance(torch.zeros(10, 3), torch.zeros(10, 2))


def test_class_histogram_and_confident_fraction():
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.1, 0.9, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(metrics.class_histogram(probs), torch.tensor([0.25, 0.25, 0.5]))
    assert metrics.confident_fraction(probs) == pytest.approx(0.75)  # 0.95, 0.9, 1.0
    assert metrics.confident_fraction(probs, threshold=0.96) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="summing to 1"):
        metrics.class_histogram(probs * 2)
    with pytest.raises(ValueError, match="threshold"):
        metrics.confident_fraction(probs, threshold=0.0)


def test_classifier_shapes_and_errors():
    model = classifier.MnistClassifier().eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, classifier.ClassifierConfig().hidden)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    for bad in (torch.zeros(3, 28, 28), torch.zeros(3, 3, 28, 28), torch.zeros(3, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
            model(bad)
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(3, 1, 28, 28, dtype=torch.uint8))


def test_random_shift_moves_whole_images():
    x = torch.full((4, 1, 28, 28), -1.0)
    x[:, :, 10:18, 10:18] = 1.0
    shifted = classifier.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert (shifted == 1.0).sum(dim=(1, 2, 3)).tolist() == [64] * 4  # nothing cut off or added


def test_evaluate_samples_report_and_errors():
    model = classifier.MnistClassifier().eval()
    g = torch.Generator().manual_seed(0)
    reference = metrics.reference_features(model, torch.rand(64, 1, 28, 28, generator=g) * 2 - 1)
    samples = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
    report = metrics.evaluate_samples(samples, model, reference, kid_subsets=5)
    assert (report.n, report.n_reference, report.kid_subset_size) == (32, 64, 32)
    assert sum(report.class_fractions) == pytest.approx(1.0)
    assert "32 vs 64" in str(report)
    assert "baseline" in report.table(report.__class__(**{**report.__dict__, "label": "baseline"}))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metrics.evaluate_samples(samples * 127.5 + 127.5, model, reference)


def test_load_classifier_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        classifier.load_classifier(tmp_path / "nope.safetensors")


def test_checkpoint_round_trip(tmp_path):
    model = classifier.MnistClassifier().eval()
    path = tmp_path / "c.safetensors"
    save_tensors(path, model.state_dict(), {"config": asdict(model.config)})
    loaded = classifier.load_classifier(path)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.skipif(
    not classifier.DEFAULT_CLASSIFIER.is_file(), reason="no shipped classifier checkpoint"
)
@pytest.mark.skipif(
    not (data.data_root() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(),
    reason="real MNIST not in the data folder (set MINISD_DATA)",
)
def test_shipped_classifier_reads_real_digits():
    images, labels = data.load_mnist(train=False, download=False, limit=1000)
    assert classifier.accuracy(classifier.load_classifier(), images, labels) >= 0.985


def test_cli_baseline_without_checkpoint_fails_helpfully(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        classifier.main(["baseline", "--classifier", str(tmp_path / "missing.safetensors")])

"""Measuring MNIST samples: from the penultimate features of the course's classifier
(`minisd.classifier`), MNIST-FID and KID, plus the class histogram and confident fraction.

FID (Heusel et al. 2017) is biased upward at small sample counts: the same real images score
several times worse at 1k than at 10k. KID (Bińkowski et al. 2018) is unbiased. So a number is
only meaningful beside its sample count and the real-vs-real baseline (MNIST test vs train
images) at that count; `SampleReport.table(baseline)` prints both.

    python -m minisd.classifier baseline --n 1000 10000   # the real-vs-real scores

Notation: features f = the classifier's penultimate activations (N, D); mu, S = their mean and
covariance; k(x, y) = (x.y / D + 1)^3 is KID's polynomial kernel.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from minisd.classifier import MnistClassifier, check_images, classify
from minisd.data import load_mnist

# Model samples may overshoot [-1, 1] a little; values beyond this mean the wrong range ([0, 255]).
RANGE_SLACK = 0.5


# ----- the metrics: pure functions over features --------------------------------------------
def _features64(feats: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or len(feats) < 2:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{name} must be features (N, D) with N >= 2, got {got}")
    return feats.detach().to("cpu", torch.float64)


@contextmanager
def _one_thread():
    """Run small eigensolvers on one thread: on a busy 2-core machine torch's threaded LAPACK
    spends ~1.7 s per 128 x 128 eigh waiting for a second core, against ~1 ms on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    a, b = _features64(feats_a, "feats_a"), _features64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    # tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): the same eigenvalues, but symmetric.
    with _one_thread():
        root_a = _sqrt_psd(cov_a)
        m = root_a @ cov_b @ root_a
        tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return max(d.item(), 0.0)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3: diagonal terms k(x_i, x_i) left out."""
    m, n, d = len(x), len(y), x.shape[1]
    k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2 * k_xy.mean()


def kernel_inception_distance(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, sec. 3): mean and std of the unbiased MMD^2 over random
    subsets of `min(subset_size, N_a, N_b)` features from each set."""
    a, b = _features64(feats_a, "feats_a"), _features64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    estimates = torch.stack(
        [
            _mmd2_unbiased(
                a[torch.randperm(len(a), generator=g)[:m]],
                b[torch.randperm(len(b), generator=g)[:m]],
            )
            for _ in range(subsets)
        ]
    )
    std = estimates.std().item() if subsets > 1 else 0.0
    return estimates.mean().item(), std


def _check_probs(probs: torch.Tensor) -> None:
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probs must be (N, num_classes) with N >= 1, got {tuple(probs.shape)}")
    if probs.min() < 0 or not torch.allclose(probs.sum(-1), torch.ones(()).to(probs), atol=1e-3):
        raise ValueError("probs must be non-negative rows summing to 1 (softmax of the logits)")


def class_histogram(probs: torch.Tensor) -> torch.Tensor:
    """Fraction of samples per predicted class (argmax), shape (num_classes,)."""
    _check_probs(probs)
    counts = torch.bincount(probs.argmax(-1), minlength=probs.shape[1])
    return counts.float() / len(probs)


def confident_fraction(probs: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of samples whose top class probability is at least `threshold`."""
    _check_probs(probs)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
    return (probs.max(-1).values >= threshold).float().mean().item()


# ----- one-call evaluation and the real-vs-real baseline -------------------------------------
def within_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """How varied the samples of one class are: the mean pairwise Euclidean distance between
    the classifier features of samples with the same label, averaged over the labels with at
    least two samples. Guidance trades this away for accuracy; real digits give the reference."""
    features = _features64(features, "features")
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != (len(features),):
        raise ValueError(f"need one label per feature row, got {tuple(labels.shape)}")
    per_class = [torch.pdist(features[labels == c]).mean() for c in labels.unique()
                 if int((labels == c).sum()) >= 2]  # fmt: skip
    if not per_class:
        raise ValueError("need at least two samples of some label to measure diversity")
    return torch.stack(per_class).mean().item()


@dataclass(frozen=True)
class SampleReport:
    n: int  # samples measured
    n_reference: int  # reference (MNIST train) images they are compared with
    mnist_fid: float
    kid_mean: float
    kid_std: float  # over KID subsets; the subset size is min(kid_subset_size, n, n_reference)
    kid_subset_size: int
    confident_fraction: float
    class_fractions: tuple[float, ...]
    threshold: float = 0.9
    label: str = "samples"

    def table(self, baseline: SampleReport | None = None) -> str:
        """The metrics as text, with the real-vs-real baseline in a second column if given."""
        cols = [self] if baseline is None else [self, baseline]
        rows = [
            ("", [r.label for r in cols]),
            ("n (vs n reference)", [f"{r.n} vs {r.n_reference}" for r in cols]),
            ("MNIST-FID (biased up at small n)", [f"{r.mnist_fid:.3f}" for r in cols]),
            (
                "KID (mean +- std over subsets)",
                [f"{r.kid_mean:.5f} +- {r.kid_std:.5f} (m={r.kid_subset_size})" for r in cols],
            ),
            (
                f"confident (p >= {self.threshold:g})",
                [f"{100 * r.confident_fraction:.1f}%" for r in cols],
            ),
            (
                "classes 0..9 (%)",
                [" ".join(f"{100 * f:.0f}" for f in r.class_fractions) for r in cols],
            ),
        ]
        widths = [max(len(row[1][i]) for row in rows) for i in range(len(cols))]
        lines = [
            f"{name:<34}" + "  ".join(f"{v:<{w}}" for v, w in zip(vals, widths, strict=True))
            for name, vals in rows
        ]
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.table()


def reference_features(
    classifier: MnistClassifier,
    images: torch.Tensor | None = None,
    root: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Features (N, D) of the reference set, by default all 60k MNIST train images. Compute once
    and pass to `evaluate_samples`/`real_baseline`."""
    if images is None:
        images, _ = load_mnist(train=True, root=root)
    return classify(classifier, images)[0]


def evaluate_samples(
    samples: torch.Tensor,
    classifier: MnistClassifier,
    reference: torch.Tensor,
    threshold: float = 0.9,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    label: str = "samples",
) -> SampleReport:
    """All metrics for samples (N, 1, 28, 28) in [-1, 1] against `reference`, which is either
    features from `reference_features` (fast) or reference images (featurised on every call)."""
    check_images(samples, "samples")
    lo, hi = samples.min().item(), samples.max().item()
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(
            f"samples must lie in [-1, 1] (the course's range), got [{lo:.3g}, {hi:.3g}]; "
            "rescale [0, 255] images with x / 127.5 - 1"
        )
    if reference.ndim == 4:
        reference = reference_features(classifier, reference)
    feats, probs = classify(classifier, samples.clamp(-1, 1))
    kid_mean, kid_std = kernel_inception_distance(
        feats, reference, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    return SampleReport(
        n=len(samples),
        n_reference=len(reference),
        mnist_fid=frechet_distance(feats, reference),
        kid_mean=kid_mean,
        kid_std=kid_std,
        kid_subset_size=min(kid_subset_size, len(samples), len(reference)),
        confident_fraction=confident_fraction(probs, threshold),
        class_fractions=tuple(class_histogram(probs).tolist()),
        threshold=threshold,
        label=label,
    )


def real_baseline(
    n: int,
    classifier: MnistClassifier,
    reference: torch.Tensor | None = None,
    test_images: torch.Tensor | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    **kwargs,
) -> SampleReport:
    """The same metrics for n random MNIST test images vs the train reference: the score of a
    perfect generator at this n, to print beside every model's score."""
    if test_images is None:
        test_images, _ = load_mnist(train=False, root=root)
    if not 2 <= n <= len(test_images):
        raise ValueError(f"n must lie in [2, {len(test_images)}] (the test images), got {n}")
    if reference is None:
        reference = reference_features(classifier, root=root)
    pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(seed))[:n]
    return evaluate_samples(
        test_images[pick], classifier, reference, seed=seed, label="real test", **kwargs
    )


if __name__ == "__main__":  # the command the shipped classifier's sidecar records
    from minisd.classifier import main

    main()

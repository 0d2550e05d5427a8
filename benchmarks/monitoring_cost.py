"""Cost of one spectral evaluation (RankMe + effective rank + alpha-ReQ) of SpectrumCallback.

Compares two exact float64 routes on random embeddings:
  * svd:  ``torch.linalg.svdvals`` of the raw matrix (RankMe) and of the centred one (covariance);
  * gram: what ``ssl_lightning.callbacks.spectrum`` does: one Gram product (min(N, D) square) and
          two symmetric eigen-solves (raw and centred Gram).
It also times the quickstart's shapes (360 validation digits; 256-d feats, 128-d embeds) and
states them as a fraction of a quickstart epoch (17 epochs in about 145 s on 2 CPU cores,
validation every epoch; benchmarks/RESULTS.md).

    nice -n 19 python benchmarks/monitoring_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ssl_lightning.metrics.spectrum import (
    alpha_req_from_eigenvalues,
    effective_rank_from_eigenvalues,
    rankme_from_singular_values,
    spectrum,
)

QUICKSTART_EPOCH_S = 145 / 17


def measures_by_gram(x: torch.Tensor) -> dict[str, float]:
    result = spectrum(x)
    return {
        "rankme": rankme_from_singular_values(result.singular_values),
        "erank": effective_rank_from_eigenvalues(result.covariance_eigenvalues),
        "alpha": alpha_req_from_eigenvalues(result.covariance_eigenvalues)[0],
    }


def measures_by_svd(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    sigma = torch.linalg.svdvals(x)
    covariance = torch.linalg.svdvals(x - x.mean(0)) ** 2 / (len(x) - 1)
    return {
        "rankme": rankme_from_singular_values(sigma),
        "erank": effective_rank_from_eigenvalues(covariance),
        "alpha": alpha_req_from_eigenvalues(covariance)[0],
    }


def timed(function, x: torch.Tensor) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    values = function(x)
    return time.perf_counter() - start, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=25_600)
    parser.add_argument("--dim", type=int, default=2_048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.samples, args.dim, generator=torch.Generator().manual_seed(0))

    gram_s, gram_values = timed(measures_by_gram, x)
    svd_s, svd_values = timed(measures_by_svd, x)
    quickstart_s = sum(timed(measures_by_gram, torch.randn(360, d))[0] for d in (256, 128))
    results = {
        "shape": [args.samples, args.dim],
        "threads": args.threads,
        "gram_route_s": round(gram_s, 2),
        "svd_route_s": round(svd_s, 2),
        "speed_up": round(svd_s / gram_s, 1),
        "max_abs_difference": max(abs(gram_values[k] - svd_values[k]) for k in gram_values),
        "values": gram_values,
        "quickstart_feats_and_embeds_s": round(quickstart_s, 4),
        "quickstart_fraction_of_epoch": round(quickstart_s / QUICKSTART_EPOCH_S, 5),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

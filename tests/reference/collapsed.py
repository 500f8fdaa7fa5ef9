"""log p(data | globals) of a model with its chains marginalized by the exact kernels, through the model code.

The oracle the peer tests (hmmlearn, pykalman, statsmodels) compare against: the globals are fixed by
``ppl.condition``, the chains' tables are built by the tabulate interpreter and their log normalizers
summed.
"""
import torch

import ppl
from ppl.handlers import tabulate
from ppl.inference.chains import collapsed_log_normalizer


def exact_log_likelihood(model, values: dict, *args, **kwargs) -> torch.Tensor:
    """log p(data | values) with every chain marginalized exactly: a scalar (detached)."""
    conditioned = ppl.condition(model, values)
    spec = ppl.compile(conditioned, *args, **kwargs).facts.collapse_spec()
    tables = tabulate(conditioned, args, kwargs, spec)
    return sum(collapsed_log_normalizer(t) for t in tables.values()).detach()

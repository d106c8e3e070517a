"""Which table metrics are better when lower (pure Python: the config and the tables read it without lm-eval)."""

from __future__ import annotations

# Task metrics where lower is better; every other lm-eval metric (acc, acc_norm, exact_match, ...) is a fraction
# where higher is better.
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def is_lower_better(metric: str) -> bool:
    """For a table metric: perplexity datasets and perplexity-like task metrics are lower-is-better."""
    if "." not in metric:
        return True
    return metric.partition(".")[2].split("|")[0] in LOWER_IS_BETTER

"""Evaluation of trained models."""

from bmojo.evaluation.loglikelihood import loglikelihood
from bmojo.evaluation.perplexity import PerplexityResult, perplexity_at
from bmojo.evaluation.recall import RecallReport, distance_bucket, evaluate_recall

__all__ = ["PerplexityResult", "RecallReport", "distance_bucket", "evaluate_recall", "loglikelihood", "perplexity_at"]

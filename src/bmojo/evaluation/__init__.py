"""Evaluation of trained models."""

from bmojo.evaluation.recall import RecallReport, distance_bucket, evaluate_recall

__all__ = ["RecallReport", "distance_bucket", "evaluate_recall"]

"""Validation graders: GSM8K / MATH500 (math-verify), ARC-Challenge (choice letter), HumanEval
(pass@1, sandboxed execution). See `registry` for the entry points re-exported here."""
from megatron_intuitor.evaluation.registry import (DATASETS, accuracy, grade, grade_record,
                                                   metric_name, validation_metrics)

__all__ = ["DATASETS", "accuracy", "grade", "grade_record", "metric_name", "validation_metrics"]

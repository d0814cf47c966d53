"""Stage two: train a student against a teacher cache (`train_student`) and score models on
a cache (`evaluate_model`)."""

from kdcache.student.evaluate import evaluate, evaluate_model
from kdcache.student.train import TrainConfig, train_student

__all__ = ["TrainConfig", "train_student", "evaluate", "evaluate_model"]

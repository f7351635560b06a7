from .classifier import DigitsClassifier, embed_and_classify, load_classifier
from .stats import fid_from_features, frechet_distance, gaussian_stats, precision_recall

__all__ = ["DigitsClassifier", "embed_and_classify", "load_classifier", "fid_from_features", "frechet_distance",
           "gaussian_stats", "precision_recall"]

from .digits import NUM_CLASSES as DIGITS_CLASSES
from .digits import load_digits_tensors, train_test_split
from .latents import LatentFolder

__all__ = ["DIGITS_CLASSES", "load_digits_tensors", "train_test_split", "LatentFolder"]

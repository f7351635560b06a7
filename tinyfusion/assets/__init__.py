"""The embedded default: the digits teacher and the digits feature net, shipped with the package."""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TEACHER_PATH = os.path.join(ASSETS_DIR, "digits_teacher.safetensors")
CLASSIFIER_PATH = os.path.join(ASSETS_DIR, "digits_classifier.safetensors")

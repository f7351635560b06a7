"""The embedded default: the digits teacher and the digits feature net, shipped with the package."""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TEACHER_PATH = os.path.join(ASSETS_DIR, "digits_teacher.safetensors")
SIT_TEACHER_PATH = os.path.join(ASSETS_DIR, "digits_sit_teacher.safetensors")
CLASSIFIER_PATH = os.path.join(ASSETS_DIR, "digits_classifier.safetensors")


def default_teacher(model=None):
    """The shipped digits teacher for --model dit (the default) or sit."""
    return SIT_TEACHER_PATH if model == "sit" else TEACHER_PATH


def add_model_arg(parser):
    parser.add_argument("--model", choices=["dit", "sit"],
                        help="dit (Gaussian diffusion) or sit (flow matching on the same network); default: what "
                             "the checkpoint's metadata says, else dit. Without --ckpt it picks that shipped teacher")

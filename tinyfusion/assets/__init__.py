"""The embedded default: the digits teacher and the digits feature net, shipped with the package."""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TEACHER_PATH = os.path.join(ASSETS_DIR, "digits_teacher.safetensors")
SIT_TEACHER_PATH = os.path.join(ASSETS_DIR, "digits_sit_teacher.safetensors")
MAR_TEACHER_PATH = os.path.join(ASSETS_DIR, "digits_mar_teacher.safetensors")
CLASSIFIER_PATH = os.path.join(ASSETS_DIR, "digits_classifier.safetensors")


def default_teacher(model=None):
    """The shipped digits teacher for --model dit (the default), sit or mar."""
    from ..errors import UserError

    path = {"sit": SIT_TEACHER_PATH, "mar": MAR_TEACHER_PATH}.get(model, TEACHER_PATH)
    if not os.path.isfile(path):
        raise UserError(f"no shipped digits {model} teacher in this version; give --ckpt")
    return path


def add_model_arg(parser, default_ckpt=True):
    """--model; `default_ckpt`: the command falls back to a shipped teacher when --ckpt is not given."""
    parser.add_argument("--model", choices=["dit", "sit", "mar"],
                        help="dit (Gaussian diffusion), sit (flow matching on the same network) or mar (masked "
                             "autoregressive with a diffusion head); default: what the checkpoint says, else dit"
                             + (". Without --ckpt it picks that shipped teacher" if default_ckpt else ""))

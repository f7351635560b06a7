"""The digits feature net: a small CNN whose penultimate layer plays Inception's role for FID."""
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.features = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, x):
        """Penultimate features (pre-activation, so the covariance is full rank) of images in [-1, 1]."""
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        return self.features(self.conv(x).flatten(1))

    def forward(self, x):
        return self.head(self.dropout(F.relu(self.embed(x))))


def load_classifier(path=None):
    from safetensors.torch import load_file

    from ..assets import CLASSIFIER_PATH

    net = DigitsClassifier()
    net.load_state_dict(load_file(path or CLASSIFIER_PATH))
    return net.eval()


@torch.no_grad()
def embed_and_classify(net, images, batch_size=500):
    """(features (N, 64) float64, predicted labels (N,)) for images (N, 1, H, W) in [-1, 1]."""
    feats, preds = [], []
    for chunk in images.split(batch_size):
        f = net.embed(chunk.float())
        feats.append(f.double())
        preds.append(net.head(F.relu(f)).argmax(1))
    return torch.cat(feats), torch.cat(preds)

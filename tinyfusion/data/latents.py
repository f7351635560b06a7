"""Pre-extracted latents in the official layout: `<root>/<name>_features/*.npy` + `<root>/<name>_labels/*.npy`.

Each feature file holds one latent (C, H, W) or a stack (K, C, H, W), e.g. the image and its horizontal
flip; one of the K is drawn per access, as the official training code does.
"""
import glob
import os

import numpy as np
import torch

from ..errors import UserError


def find_layout(root):
    if not os.path.isdir(root):
        raise UserError(f"{root}: data folder does not exist")
    feats = sorted(glob.glob(os.path.join(root, "*_features")))
    if not feats:
        raise UserError(f"{root}: no '*_features' folder (expected <name>_features/ and <name>_labels/)")
    labels = feats[0][: -len("_features")] + "_labels"
    if not os.path.isdir(labels):
        raise UserError(f"{root}: {os.path.basename(feats[0])} has no matching {os.path.basename(labels)} folder")
    return feats[0], labels


class LatentFolder(torch.utils.data.Dataset):
    def __init__(self, root, num_classes=None):
        self.features_dir, self.labels_dir = find_layout(root)
        self.names = sorted(n for n in os.listdir(self.features_dir) if n.endswith(".npy") and not n.startswith("."))
        if not self.names:
            raise UserError(f"{self.features_dir}: no .npy files")
        missing = [n for n in self.names if not os.path.isfile(os.path.join(self.labels_dir, n))]
        if missing:
            raise UserError(f"{self.labels_dir}: no label file for {len(missing)} features (e.g. {missing[0]})")
        self.num_classes = num_classes
        self.latent_shape = tuple(self._features(0).shape[1:])

    def __len__(self):
        return len(self.names)

    def _features(self, i):
        x = np.load(os.path.join(self.features_dir, self.names[i]))
        return x[None] if x.ndim == 3 else x

    def label(self, i):
        y = int(np.asarray(np.load(os.path.join(self.labels_dir, self.names[i]))).reshape(-1)[0])
        if y < 0 or (self.num_classes is not None and y >= self.num_classes):
            raise UserError(f"{self.names[i]}: label {y} is outside 0..{self.num_classes - 1}")
        return y

    def __getitem__(self, i):
        x = self._features(i)
        pick = np.random.randint(len(x))
        return torch.from_numpy(np.ascontiguousarray(x[pick])).float(), self.label(i)

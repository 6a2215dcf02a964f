"""Where in the frame: Grad-CAM (Captum's LayerGradCam on the CNN's last convolution) at a sequence's most important
frames, for ``featseq explain``.

The frames are those the cache recorded (its ``/frames``, or decoded at their cached timestamps by featurize's
decoder, through sequence.frames.Frames). Each frame goes through the CNN, its embedding replaces that frame's
features in the sequence the model read, and the gradient of the class probability at the last convolution's
output gives the heat map (ReLU of the channel-weighted activations, upsampled to the frame, scaled to 0..1).

* A fine-tuned run: its own trained CNN (the checkpoint's trunk), the network that made its prediction.
* A frozen-feature run: the backbone that made the cache's features (built from the cache's featurize spec). The
  CNN was not trained with the sequence model; the map shows which pixels of the frame moved the frozen features
  in the direction the sequence model reads, and is labelled as such.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from featseq.featurize import backbones as bb
from featseq.common.errors import UserError
from featseq.featurize.spec import FeatureSpec

from .attribution import _no_cudnn, captum_attr

FINETUNED = "Grad-CAM through the run's fine-tuned CNN"
FROZEN = "Grad-CAM through the frozen backbone that made the features (not trained with this model)"


def run_backbone(run, spec: FeatureSpec, what: str) -> bb.Backbone:
    """The CNN of a run's features: the cache's backbone (``spec``), with a fine-tuned run's trained trunk loaded."""
    backbone = bb.create_backbone(spec.backbone, spec.check_weights(what), spec.seed, spec.pool, spec.crops, spec.size)
    if run.trunk_state is not None:
        backbone.trunk.load_state_dict(run.trunk_state)
    backbone.trunk.eval()
    return backbone


def last_conv(trunk: nn.Module) -> nn.Module:
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("Grad-CAM needs a convolutional backbone; this one has no Conv2d layer (use --gradcam 0)")
    return convs[-1]


def frame_cams(backbone: bb.Backbone, head: nn.Module, frames: np.ndarray, positions: list[int], x: torch.Tensor,
               mask: torch.Tensor, target: int, device: torch.device) -> list[np.ndarray]:
    """(S, S) heat maps in [0, 1] of ``frames`` (k, S, S, 3) uint8, the frames at ``positions`` of one sequence whose
    model inputs are ``x`` (L, D) with ``mask`` (L,), for class ``target``."""
    ca = captum_attr()
    trunk = backbone.trunk.to(device).eval()
    head.eval().to(device)
    x, mask = x.to(device).float(), mask.to(device)
    cam = None
    out = []
    for frame, t in zip(frames, positions):
        def forward(img, t=t):
            seq = x.unsqueeze(0).repeat(len(img), 1, 1)
            seq[:, t] = trunk(img).flatten(1).float()
            return torch.softmax(head(seq, mask.unsqueeze(0).expand(len(img), -1)), 1)

        cam = ca.LayerGradCam(forward, last_conv(trunk))
        img = bb.preprocess(frame[None], backbone.entry, device, channels_last=False)
        with _no_cudnn(device):
            a = cam.attribute(img, target=int(target), relu_attributions=True)
        a = ca.LayerAttribution.interpolate(a.detach(), tuple(frame.shape[:2]), "bilinear")[0, 0].cpu().numpy()
        out.append(a / a.max() if a.max() > 0 else a)
    return out

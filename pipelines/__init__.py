"""R-CNN and Fast R-CNN, and what they share: backbones, proposals, box coding, sampling, timing."""

"""Per-example transforms: CT preprocessing (orientation, spacing, HU window, foreground crop), image
preprocessing (fundus crop, resize, ImageNet normalisation), iBOT block masking, BERT MLM corruption."""

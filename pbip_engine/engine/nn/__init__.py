"""Networks shared by methods: multi-scale backbones (timm, MiT) and the stage-2 segmentation heads."""

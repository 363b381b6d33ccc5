"""transferlab: adapt an ImageNet-pretrained CNN to your own images, reproducibly
(the DVC stages are in transferlab.stages; README: Layout)."""

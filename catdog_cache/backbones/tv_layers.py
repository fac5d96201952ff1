"""The torchvision plugin's layer names, shared by its description (tvmodels) and its models (tv_net) so that
neither imports the other back: tvmodels imports tv_net (torch) only to build a model, and tv_net never imports
tvmodels. Imports nothing."""

FINAL = "logits-input"  # the layer name recorded for "input of the final Linear"

"""Models: the built-in networks (the paper's AlexNet and LeNet included), timm and torchvision
models by name, and pretrained classifiers as KD teachers."""

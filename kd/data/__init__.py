"""Data: dataset registry and ImageFolder reading, streaming, splits, the decoded-data cache,
device batches and batched on-device augmentation."""

"""Stored soft labels: a teacher runs once over the training split, students read its logits per sample.

* `kd.softlabels.artifact`: the file (`soft_labels.safetensors`), its checks, and `SoftLabels`,
  the lookup module a per-sample KD method uses instead of a teacher network.
* `kd.softlabels.export`: the teacher's pass over a training split (`kd soft-labels`).
"""

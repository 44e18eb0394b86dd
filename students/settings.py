"""The student stage's own settings: where its soft targets come from (declared once, see `kd.training.settings`)."""

from __future__ import annotations

from kd.models.pretrained import TEACHER_CLASSES_HELP, TEACHER_IMAGE_SIZE_HELP, TEACHER_MODEL_HELP, TEACHER_WEIGHTS_HELP
from kd.training.settings import Setting, Settings, settings_class

STUDENT_SETTINGS: tuple[Setting, ...] = (
    Setting("proxy", None, "C-matrix file: proxy-teacher targets (1-a)*onehot + a*C[y], no teacher network (method proxy).",
            path="file", resume=True),
    Setting("teacher", None, "Teacher run directory: classic per-sample KD (method kd). Or use --teacher-model.",
            path="dir", resume=True),
    Setting("teacher_model", None, TEACHER_MODEL_HELP + " Classic per-sample KD (method kd); an alternative to --teacher.",
            metavar="NAME", resume=True),
    Setting("teacher_weights", None, TEACHER_WEIGHTS_HELP, path="file"),
    Setting("teacher_image_size", None, TEACHER_IMAGE_SIZE_HELP, type=int, metavar="N"),
    Setting("teacher_classes", None, TEACHER_CLASSES_HELP, path="file"),
    Setting("soft_labels", None, "Stored soft labels (`kd soft-labels`): per-sample KD (method kd, dkd or dist) from the "
            "teacher's logits in the file, looked up per sample, no teacher network run. An alternative to --teacher.",
            path="file", resume=True),
)

StudentSettings = settings_class("StudentSettings", STUDENT_SETTINGS, base=Settings)

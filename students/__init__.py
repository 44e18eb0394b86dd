"""Student stage: distill from a proxy C-matrix or a teacher network (see the student-stage issue)."""

"""The refusal a teacher cache raises: one line naming what does not match and the fix."""


class TeacherCacheError(ValueError):
    """A teacher cache that cannot serve this run (other data, windows, teacher, settings), or
    that is damaged or incomplete."""

"""STUB: being written (replace this whole file)."""


def dipu(*a, **k):
    raise NotImplementedError('dipu is not written yet')


"""STUB: being written (replace this whole file)."""


class DIPU:
    def __init__(self, *a, **k):
        raise NotImplementedError('DIPU is not written yet')


class CMDIE:
    def __init__(self, *a, **k):
        raise NotImplementedError('CMDIE is not written yet')

